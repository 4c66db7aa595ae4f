//! Upload machinery tests that hold on both platforms, against a scratch
//! tree: a commit never replaces a file created meanwhile, and the running
//! SHA-256 of chunks that arrive in any order.

use std::sync::Arc;
use std::time::Duration;

use kvm_agent_protocol::codec;

use super::path;
use super::resolve::Resolver;
use super::table::{self, Progress};
use super::test_tree::{entries, upload_file, Tree};
use super::upload::{CommitError, Temp};
use super::write_all_at;

#[test]
fn commit_never_replaces_a_file_created_meanwhile() {
    let t = Tree::new("commit");
    let roots = vec![t.root.clone()];
    let p = t.r("target");
    let lex = path::check(&p, &roots).unwrap();
    let target = Resolver::default().open_write(&lex, false, false).unwrap();
    let temp = Temp::create(Arc::new(target.dir)).unwrap();
    write_all_at(&temp.file, b"new", 0).unwrap();
    std::fs::write(t.root.join("target"), "raced in").unwrap();
    assert!(matches!(
        temp.commit(&target.name, 0o600, (None, None), false),
        Err(CommitError::Exists)
    ));
    assert_eq!(
        std::fs::read_to_string(t.root.join("target")).unwrap(),
        "raced in"
    );
    assert_eq!(entries(&t.root), ["file", "sub", "target"]);
    // With overwrite the new content replaces it.
    upload_file(&t, "target", b"replaced", true).unwrap();
    assert_eq!(
        std::fs::read_to_string(t.root.join("target")).unwrap(),
        "replaced"
    );
    assert_eq!(entries(&t.root), ["file", "sub", "target"]);
}

/// Chunks recorded in any order hash to the file's SHA-256; a rewrite of
/// hashed bytes falls back to reading the file back.
#[test]
fn running_hash_survives_any_chunk_order() {
    let t = Tree::new("hash");
    let path = t.root.join("h");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = codec::sha256_hex(&data);
    let chunks: Vec<(usize, usize)> = (0..data.len())
        .step_by(7000)
        .map(|s| (s, (s + 7000).min(data.len())))
        .collect();
    let mut seed = 12345u64;
    for round in 0..20 {
        let mut order = chunks.clone();
        for i in (1..order.len()).rev() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            order.swap(i, (seed >> 33) as usize % (i + 1));
        }
        if round == 0 {
            order = chunks.clone();
        }
        file.set_len(0).unwrap();
        let mut p = Progress::default();
        for (s, e) in &order {
            write_all_at(&file, &data[*s..*e], *s as u64).unwrap();
            p.record(*s as u64, &data[*s..*e], &file, true).unwrap();
        }
        if round == 1 {
            // A rewrite of the first chunk.
            write_all_at(&file, &data[..10], 0).unwrap();
            p.record(0, &data[..10], &file, true).unwrap();
            assert_eq!(p.contiguous(), 0);
        }
        assert_eq!(
            p.finish(&file, data.len() as u64).unwrap(),
            want,
            "round {round}"
        );
    }
}

/// A chunk that reaches the hash before the chunk in front of it waits for
/// it and is hashed from memory, not read back from the file: the file here
/// holds other bytes, so only hashing from memory gives the data's SHA-256.
#[test]
fn a_chunk_ahead_waits_for_its_turn_and_is_hashed_from_memory() {
    let t = Tree::new("turn");
    let path = t.root.join("zeros");
    std::fs::write(&path, vec![0u8; 2000]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let table = table::FileTable::new(table::TableLimits {
        per_connection: 4,
        total: 4,
        idle: Duration::from_secs(600),
    });
    let file = std::fs::File::open(&path).unwrap();
    let h = table
        .insert(
            1,
            path.display().to_string(),
            None,
            table::State::Read { file },
        )
        .unwrap();
    let data: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8 + 1).collect();
    let zeros = std::fs::File::open(&path).unwrap();
    std::thread::scope(|s| {
        let ahead = s.spawn(|| {
            // Waits (up to a minute here) until offset 0 is hashed.
            h.record_waiting(1000, &data[1000..], &zeros, false, Duration::from_secs(60))
                .unwrap();
        });
        // Whether or not the other thread is waiting yet, the order of the
        // hash is the same; the wait only decides memory or read-back.
        h.record(0, &data[..1000], &zeros, false).unwrap();
        ahead.join().unwrap();
    });
    let progress = std::mem::take(&mut *h.progress.lock().unwrap());
    assert_eq!(progress.contiguous(), 2000);
    assert_eq!(
        progress.finish(&zeros, 2000).unwrap(),
        codec::sha256_hex(&data),
        "the chunk ahead was read back from the file instead of hashed from memory"
    );
}
