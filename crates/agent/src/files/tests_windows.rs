//! The Windows hostile-path table and the upload machinery, against a
//! scratch tree (run under Wine in CI:
//! `cargo xtask windows-cargo test -p kvm-manager-agent --lib -- files`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_agent_protocol::codec;

use super::path;
use super::resolve::{self, ResolveError, Resolver};
use super::table::Progress;
use super::test_tree::{entries, upload_file, Op, Outcome, Tree, W, WO, WP};
use super::upload::{self, CommitError, Temp};
use super::{read_at, write_all_at, Reason};

/// The whole path pipeline: lexical rules, then the resolver; for reads the
/// content read must come from inside the root.
fn attempt(roots: &[PathBuf], p: &str, op: Op) -> Outcome {
    let lex = match path::check(p, roots) {
        Ok(l) => l,
        Err(r) => return Outcome::Refused(r),
    };
    let r = match op {
        Op::Read => Resolver::default().open_read(&lex).map(|o| {
            let mut buf = vec![0u8; 64];
            let n = read_at(&o.file, &mut buf, 0).unwrap();
            assert_ne!(
                &buf[..n],
                b"outside secret",
                "{p}: read a file outside the root"
            );
        }),
        Op::Write { overwrite, parents } => Resolver::default()
            .open_write(&lex, parents, overwrite)
            .map(drop),
    };
    match r {
        Ok(()) => Outcome::Ok,
        Err(ResolveError::Refused(r)) => Outcome::Refused(r),
        Err(ResolveError::NotFound) => Outcome::NotFound,
        Err(ResolveError::Exists) => Outcome::Exists,
        Err(ResolveError::Io(e)) => panic!("{p}: unexpected I/O error {e}"),
    }
}

#[test]
fn hostile_paths_are_refused_with_their_reason() {
    let t = Tree::new("hostile");
    let root = t.root.clone();
    let roots = vec![root.clone()];
    let rs = root.display().to_string();
    let out = t.outside.display().to_string();
    let fwd = rs.replace('\\', "/");
    let drive = &rs[..2];
    let no_drive = &rs[2..];

    // Set-ups.
    std::fs::hard_link(t.outside.join("secret"), root.join("hard")).unwrap();
    std::fs::write(root.join("exists"), "old").unwrap();
    let file_root = t.base.join("file_root");
    std::fs::write(&file_root, "").unwrap();
    std::fs::write(root.join(".kva-upload.00000000000000aa.tmp"), "").unwrap();

    use Outcome::{Exists, NotFound, Refused};
    use Reason::*;
    let long_name = format!(r"{rs}\{}", "n".repeat(path::NAME_MAX + 1));
    let long_path = format!("{rs}{}", r"\d".repeat(path::WIN_PATH_MAX / 2 + 1));
    let upper = rs.to_uppercase();
    let lower = rs.to_lowercase();
    let cases: Vec<(String, Op, Outcome, Vec<PathBuf>)> = vec![
        // Traversal, with `\` and `/`.
        (
            format!(r"{rs}\..\outside\secret"),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        (
            format!("{fwd}/../outside/secret"),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        (
            format!(r"{rs}\.\..\outside\secret"),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        (
            format!(r"{rs}\sub\..\..\outside\secret"),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        (format!(r"{rs}/sub\../x"), W, Refused(DotDot), roots.clone()),
        (
            format!(r"{rs}\sub\.."),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        // Not a drive-letter path.
        (
            format!(r"{drive}file"),
            Op::Read,
            Refused(Relative),
            roots.clone(),
        ),
        (
            no_drive.to_owned() + r"\file",
            Op::Read,
            Refused(Relative),
            roots.clone(),
        ),
        (r"file".into(), Op::Read, Refused(Relative), roots.clone()),
        (
            r"\\localhost\C$\windows\win.ini".into(),
            Op::Read,
            Refused(Unc),
            roots.clone(),
        ),
        (
            format!(r"\\127.0.0.1\c${no_drive}\file"),
            Op::Read,
            Refused(Unc),
            roots.clone(),
        ),
        (
            format!(r"\\?\{rs}\file"),
            Op::Read,
            Refused(DevicePath),
            roots.clone(),
        ),
        (
            format!(r"\\?\UNC\localhost\c${no_drive}\file"),
            Op::Read,
            Refused(DevicePath),
            roots.clone(),
        ),
        (
            format!(r"\\.\{rs}\file"),
            Op::Read,
            Refused(DevicePath),
            roots.clone(),
        ),
        (
            r"\\.\PhysicalDrive0".into(),
            Op::Read,
            Refused(DevicePath),
            roots.clone(),
        ),
        (
            format!(r"\??\{rs}\file"),
            Op::Read,
            Refused(DevicePath),
            roots.clone(),
        ),
        // Alternate data streams.
        (
            format!(r"{rs}\file:evil"),
            W,
            Refused(Stream),
            roots.clone(),
        ),
        (
            format!(r"{rs}\file::$DATA"),
            Op::Read,
            Refused(Stream),
            roots.clone(),
        ),
        (
            format!(r"{rs}\file:evil:$DATA"),
            Op::Read,
            Refused(Stream),
            roots.clone(),
        ),
        (
            format!(r"{rs}\sub::$INDEX_ALLOCATION\inner"),
            Op::Read,
            Refused(Stream),
            roots.clone(),
        ),
        // Reserved device names in every spelling.
        (
            format!(r"{rs}\CON"),
            Op::Read,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\con.txt"),
            W,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\NuL.tar.gz"),
            W,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\aux.c"),
            W,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\prn .txt"),
            W,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\COM1"),
            Op::Read,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\lpt9.log"),
            W,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!("{rs}\\COM\u{b9}"),
            W,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!("{rs}\\lpt\u{b3}.x"),
            W,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\CONOUT$"),
            W,
            Refused(DeviceName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\nul\x"),
            WP,
            Refused(DeviceName),
            roots.clone(),
        ),
        // Names Win32 would rewrite.
        (
            format!(r"{rs}\file."),
            Op::Read,
            Refused(TrailingDotOrSpace),
            roots.clone(),
        ),
        (
            format!(r"{rs}\file "),
            Op::Read,
            Refused(TrailingDotOrSpace),
            roots.clone(),
        ),
        (
            format!(r"{rs}\file. ."),
            W,
            Refused(TrailingDotOrSpace),
            roots.clone(),
        ),
        (
            format!(r"{rs}\sub.\inner"),
            Op::Read,
            Refused(TrailingDotOrSpace),
            roots.clone(),
        ),
        (
            format!(r"{rs}\..."),
            W,
            Refused(TrailingDotOrSpace),
            roots.clone(),
        ),
        // 8.3 short names.
        (
            format!(r"{rs}\FILE~1"),
            Op::Read,
            Refused(ShortName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\.KVA-U~1.TMP"),
            WO,
            Refused(ShortName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\SUB~12\inner"),
            Op::Read,
            Refused(ShortName),
            roots.clone(),
        ),
        // Wildcards and other characters Windows names cannot hold.
        (
            format!(r"{rs}\fil?"),
            Op::Read,
            Refused(InvalidCharacter),
            roots.clone(),
        ),
        (
            format!(r"{rs}\*"),
            Op::Read,
            Refused(InvalidCharacter),
            roots.clone(),
        ),
        (
            format!(r"{rs}\<file>"),
            Op::Read,
            Refused(InvalidCharacter),
            roots.clone(),
        ),
        (
            format!("{rs}\\a\u{1b}b"),
            W,
            Refused(InvalidCharacter),
            roots.clone(),
        ),
        // NUL, length.
        (
            format!("{rs}\\file\0.txt"),
            Op::Read,
            Refused(Nul),
            roots.clone(),
        ),
        (long_name, W, Refused(TooLong), roots.clone()),
        (long_path, WP, Refused(TooLong), roots.clone()),
        (String::new(), Op::Read, Refused(Empty), roots.clone()),
        // Outside, and the root's name as a prefix only.
        (
            format!(r"{out}\secret"),
            Op::Read,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        (
            format!(r"{rs}x\file"),
            Op::Read,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        (
            r"C:\windows\win.ini".into(),
            Op::Read,
            Refused(OutsideAllowed),
            roots.clone(),
        ),
        (
            format!(r"{rs}\file"),
            Op::Read,
            Refused(OutsideAllowed),
            vec![],
        ),
        // Case variants of the root are the root.
        (
            format!(r"{upper}\FILE"),
            Op::Read,
            Outcome::Ok,
            roots.clone(),
        ),
        (
            format!(r"{lower}\sub\INNER"),
            Op::Read,
            Outcome::Ok,
            roots.clone(),
        ),
        (
            format!(r"{upper}\..\outside\secret"),
            Op::Read,
            Refused(DotDot),
            roots.clone(),
        ),
        // Directories, files in the way, and what is found.
        (rs.clone(), Op::Read, Refused(Directory), roots.clone()),
        (format!(r"{rs}\"), W, Refused(Directory), roots.clone()),
        (
            format!(r"{rs}\sub"),
            Op::Read,
            Refused(Directory),
            roots.clone(),
        ),
        (format!(r"{rs}\sub"), WO, Refused(Directory), roots.clone()),
        (
            format!(r"{rs}\file\x"),
            Op::Read,
            Refused(NotADirectory),
            roots.clone(),
        ),
        (
            format!(r"{rs}\file\x"),
            WP,
            Refused(NotADirectory),
            roots.clone(),
        ),
        (
            format!(r"{rs}\hard"),
            Op::Read,
            Refused(HardLink),
            roots.clone(),
        ),
        (format!(r"{rs}\hard"), WO, Refused(HardLink), roots.clone()),
        (
            format!(r"{rs}\.kva-upload.00000000000000aa.tmp"),
            Op::Read,
            Refused(ReservedName),
            roots.clone(),
        ),
        (
            format!(r"{rs}\.KVA-UPLOAD.x"),
            W,
            Refused(ReservedName),
            roots.clone(),
        ),
        // Roots that are not directories.
        (
            format!(r"{}\x", file_root.display()),
            Op::Read,
            Refused(RootNotDirectory),
            vec![file_root.clone()],
        ),
        (
            format!(r"{}\missing\x", t.base.display()),
            Op::Read,
            NotFound,
            vec![t.base.join("missing")],
        ),
        // Existing and missing targets.
        (format!(r"{rs}\exists"), W, Exists, roots.clone()),
        (format!(r"{rs}\exists"), WO, Outcome::Ok, roots.clone()),
        (format!(r"{rs}\missing"), Op::Read, NotFound, roots.clone()),
        (format!(r"{rs}\a\b\c"), W, NotFound, roots.clone()),
        (format!(r"{rs}\a\b\c"), WP, Outcome::Ok, roots.clone()),
        (
            format!("{fwd}/sub/inner"),
            Op::Read,
            Outcome::Ok,
            roots.clone(),
        ),
    ];
    assert!(cases.len() >= 40);
    for (p, op, want, roots) in cases {
        assert_eq!(attempt(&roots, &p, op), want, "{p:?} {op:?}");
    }
    // create_parents made the directories inside the root only.
    assert!(root.join("a").join("b").is_dir());
    assert_eq!(
        std::fs::read_to_string(t.outside.join("secret")).unwrap(),
        "outside secret"
    );
}

/// Make a symbolic link `link` -> `target` (relative, in `dir`) with the
/// host's `ln`: Wine 8's CreateSymbolicLinkW creates nothing, and Wine
/// shows the host's symbolic links to Windows programs. On Windows this
/// uses `mklink`.
fn host_symlink(dir: &Path, target: &str, link: &str, is_dir: bool) {
    let wine = std::env::var_os("WINEPREFIX").is_some() || Path::new(r"Z:\bin\ln").exists();
    if wine {
        // Wine starts a host program but gives no handle to wait on: wait
        // for the link to appear instead.
        let _ = std::process::Command::new(r"Z:\bin\ln")
            .args(["-s", &target.replace('\\', "/"), link])
            .current_dir(dir)
            .spawn();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::symlink_metadata(dir.join(link)).is_err()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    } else {
        let mut c = std::process::Command::new("cmd");
        c.arg("/c").arg("mklink");
        if is_dir {
            c.arg("/d");
        }
        let status = c.args([link, target]).current_dir(dir).status();
        assert!(status.unwrap().success(), "cannot link {link} -> {target}");
    }
    assert!(
        std::fs::symlink_metadata(dir.join(link)).is_ok(),
        "cannot link {link} -> {target}"
    );
}

/// Symbolic links leading outside the root (a directory link, a file link,
/// the root itself a link) are refused on their own handle.
#[test]
fn links_to_outside_the_root_are_refused() {
    let t = Tree::new("links");
    let roots = vec![t.root.clone()];
    host_symlink(&t.root, r"..\outside", "dlink", true);
    host_symlink(&t.root, r"..\outside\secret", "flink", false);
    host_symlink(&t.root, "file", "in_link", false);
    for (rel, op, want) in [
        (r"dlink\secret", Op::Read, Reason::Symlink),
        (r"dlink\new", WP, Reason::Symlink),
        ("flink", Op::Read, Reason::Symlink),
        ("flink", WO, Reason::Symlink),
        ("in_link", Op::Read, Reason::Symlink),
    ] {
        let got = attempt(&roots, &t.r(rel), op);
        assert_eq!(got, Outcome::Refused(want), "{rel} {op:?}");
    }
    assert_eq!(
        std::fs::read_to_string(t.outside.join("secret")).unwrap(),
        "outside secret"
    );
    assert!(!t.outside.join("new").exists());
    // The root itself as a link.
    host_symlink(&t.base, "root", "root_link", true);
    let link_root = t.base.join("root_link");
    let p = format!(r"{}\file", link_root.display());
    assert_eq!(
        attempt(&[link_root], &p, Op::Read),
        Outcome::Refused(Reason::RootNotDirectory)
    );
    // Wine removes what host links lead to but not the links: the host's
    // `rm` removes the scratch tree (by its relative name).
    if std::env::var_os("WINEPREFIX").is_some() {
        if let (Some(parent), Some(name)) = (t.base.parent(), t.base.file_name()) {
            let _ = std::process::Command::new(r"Z:\bin\rm")
                .arg("-rf")
                .arg(name)
                .current_dir(parent)
                .spawn();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while std::fs::symlink_metadata(&t.base).is_ok() && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

#[test]
fn round_trip_with_sha256() {
    let t = Tree::new("roundtrip");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
    upload_file(&t, r"deep\er\data.bin", &data, false).unwrap();
    let roots = vec![t.root.clone()];
    let p = t.r(r"DEEP\er\Data.BIN");
    let lex = path::check(&p, &roots).unwrap();
    let opened = Resolver::default().open_read(&lex).unwrap();
    assert_eq!(opened.size, data.len() as u64);
    let mut progress = Progress::default();
    let mut back = vec![0u8; data.len()];
    let mut off = 0;
    while off < back.len() {
        let n = read_at(&opened.file, &mut back[off..], off as u64).unwrap();
        assert!(n > 0);
        progress
            .record(off as u64, &back[off..off + n], &opened.file, false)
            .unwrap();
        off += n;
    }
    assert_eq!(back, data);
    let sha = progress.finish(&opened.file, opened.size).unwrap();
    assert_eq!(sha, codec::sha256_hex(&data));
    assert_eq!(resolve::file_size(&opened.file).unwrap(), data.len() as u64);
    assert_eq!(entries(&t.root.join("deep").join("er")), ["data.bin"]);
}

#[test]
fn a_dropped_upload_leaves_the_target_untouched() {
    let t = Tree::new("atomic");
    let roots = vec![t.root.clone()];
    let p = t.r("file");
    let lex = path::check(&p, &roots).unwrap();
    let target = Resolver::default().open_write(&lex, false, true).unwrap();
    assert!(target.existed);
    let temp = Temp::create(Arc::new(target.dir)).unwrap();
    write_all_at(&temp.file, b"half of the new cont", 0).unwrap();
    assert_eq!(entries(&t.root).len(), 3);
    // Nobody else can write, rename or delete the open temporary file.
    let tp = t.root.join(temp.name());
    assert!(std::fs::OpenOptions::new().write(true).open(&tp).is_err());
    assert!(std::fs::rename(&tp, t.root.join("stolen")).is_err());
    assert!(std::fs::remove_file(&tp).is_err());
    drop(temp);
    assert_eq!(
        std::fs::read_to_string(t.root.join("file")).unwrap(),
        "inside"
    );
    assert_eq!(entries(&t.root), ["file", "sub"]);
}

/// An owner cannot be set on Windows: refused, nothing committed.
#[test]
fn an_owner_cannot_be_set() {
    let t = Tree::new("owner");
    upload_file(&t, "target", b"first", false).unwrap();
    let roots = vec![t.root.clone()];
    let p = t.r("target");
    let lex = path::check(&p, &roots).unwrap();
    let target = Resolver::default().open_write(&lex, false, true).unwrap();
    let temp = Temp::create(Arc::new(target.dir)).unwrap();
    assert!(matches!(
        temp.commit(&target.name, 0o600, (Some(0), None), true),
        Err(CommitError::Io(_))
    ));
    assert_eq!(
        std::fs::read_to_string(t.root.join("target")).unwrap(),
        "first"
    );
    assert_eq!(entries(&t.root), ["file", "sub", "target"]);
}

/// The directories of a resolved target are held: they cannot be renamed
/// away (and replaced by a link) while the upload is open.
#[test]
fn resolved_directories_cannot_be_renamed_meanwhile() {
    let t = Tree::new("pinned");
    let roots = vec![t.root.clone()];
    let p = t.r(r"sub\new");
    let lex = path::check(&p, &roots).unwrap();
    let target = Resolver::default().open_write(&lex, false, false).unwrap();
    assert!(std::fs::rename(t.root.join("sub"), t.root.join("moved")).is_err());
    assert!(std::fs::rename(&t.root, t.base.join("moved_root")).is_err());
    drop(target);
    std::fs::rename(t.root.join("sub"), t.root.join("moved")).unwrap();
}

#[test]
fn stale_temporaries_are_removed_but_live_ones_kept() {
    let t = Tree::new("stale");
    std::fs::create_dir_all(t.root.join("a").join("b")).unwrap();
    let stale = [
        t.root.join(".kva-upload.00000000000000aa.tmp"),
        t.root
            .join("a")
            .join("b")
            .join(".KVA-UPLOAD.00000000000000BB.TMP"),
    ];
    for s in &stale {
        std::fs::write(s, "partial").unwrap();
    }
    // Not ours by pattern: kept.
    std::fs::write(t.root.join(".kva-upload.notours.tmp"), "").unwrap();
    std::fs::write(t.root.join(".kva-upload.00000000000000cc.tmp.bak"), "").unwrap();
    // A live upload: open, kept.
    let dir = Arc::new(resolve::open_root(&t.root).unwrap());
    let live = Temp::create(dir).unwrap();
    assert_eq!(upload::remove_stale(&[&t.root]), 2);
    assert!(stale.iter().all(|s| !s.exists()));
    let left = entries(&t.root);
    assert!(left.contains(&live.name().to_owned()), "{left:?}");
    assert!(left.contains(&".kva-upload.notours.tmp".to_owned()));
    assert!(upload::is_temp_name(live.name().as_bytes()));
    drop(live);
    assert_eq!(upload::remove_stale(&[&t.root]), 0);
    assert_eq!(
        entries(&t.root),
        [
            ".kva-upload.00000000000000cc.tmp.bak",
            ".kva-upload.notours.tmp",
            "a",
            "file",
            "sub"
        ]
    );
}

/// The six methods end to end through the dispatcher (policy, handlers,
/// the table): round trips with sha256, chunked upload, refusals with their
/// wire reasons, overwrite refusal, `uid` refused.
#[test]
fn the_methods_work_through_the_dispatcher() {
    use serde_json::{json, Value};

    use crate::audit::{Auditor, Origin, PendingAudit};
    use crate::context::Context;
    use crate::dispatch::{execute, prepare};

    let t = Tree::new("methods");
    let (_ctl, shutdown) = crate::shutdown::channel();
    let config = crate::config::Config::parse(
        &format!(
            "[security]\nallowed_file_paths = ['{}']\n",
            t.root.display()
        ),
        "t.toml".as_ref(),
    )
    .unwrap();
    let ctx = Context::with_auditor(config, shutdown, Arc::new(Auditor::new(vec![], true)));
    let call = |method: &str, params: Value| -> Result<Value, Value> {
        let raw = serde_json::value::to_raw_value(&params).unwrap();
        let run = async {
            let call = prepare(&ctx, method, Some(&raw))?;
            let origin = Origin::new(&crate::transport::Peer::Unix {
                pid: None,
                uid: None,
            });
            let mut audit = PendingAudit::open(ctx.auditor.clone(), &origin, Some(method), None);
            execute(&ctx, call, &mut audit).await
        };
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run)
            .map(|r| serde_json::from_str(r.result.get()).unwrap())
            .map_err(|e| serde_json::to_value(kvm_agent_protocol::ErrorObject::from(&e)).unwrap())
    };
    let b64 = |d: &[u8]| {
        let mut s = String::new();
        codec::base64_encode_into(d, &mut s);
        s
    };
    let path = t.r(r"up\a.txt");

    // copy_to_guest, then copy_from_guest through another spelling.
    let r = call(
        "copy_to_guest",
        json!({"path": path, "content_base64": b64(b"hello windows"), "create_parents": true,
               "sha256": codec::sha256_hex(b"hello windows")}),
    )
    .unwrap();
    assert_eq!(r["size"], 13);
    assert_eq!(r["path"], path);
    let back = call(
        "copy_from_guest",
        json!({"path": path.to_uppercase().replace('\\', "/")}),
    )
    .unwrap();
    assert_eq!(back["content_base64"], b64(b"hello windows"));
    assert_eq!(back["sha256"], codec::sha256_hex(b"hello windows"));

    // Without overwrite the existing file stays: -32002.
    let e = call(
        "copy_to_guest",
        json!({"path": path, "content_base64": b64(b"other")}),
    )
    .unwrap_err();
    assert_eq!(e["code"], -32002);
    assert_eq!(
        std::fs::read_to_string(t.root.join("up").join("a.txt")).unwrap(),
        "hello windows"
    );

    // Handles: a chunked upload with sha256 at close, read back in chunks.
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
    let big = t.r(r"up\big.bin");
    let h = call("file_open", json!({"path": big, "access": "write"})).unwrap()["handle"].clone();
    let w = call(
        "file_write",
        json!({"handle": h, "offset": 0, "data_base64": b64(&data[..1000])}),
    )
    .unwrap();
    assert_eq!(w["written"], 1000);
    // Resuming (after a reconnect), spelled in another case: the same
    // upload, 1000 bytes in.
    let resumed = call(
        "file_open",
        json!({"path": big.to_uppercase(), "access": "write", "resume": true}),
    )
    .unwrap();
    assert_eq!(resumed["handle"], h);
    assert_eq!(resumed["size"], 1000);
    for (i, c) in data.chunks(1000).enumerate().skip(1).rev() {
        let w = call(
            "file_write",
            json!({"handle": h, "offset": i * 1000, "data_base64": b64(c)}),
        )
        .unwrap();
        assert_eq!(w["written"], 1000);
    }
    let closed = call(
        "file_close",
        json!({"handle": h, "size": 3000, "sha256": codec::sha256_hex(&data)}),
    )
    .unwrap();
    assert_eq!(closed["committed"], true);
    let h = call("file_open", json!({"path": big, "access": "read"})).unwrap();
    assert_eq!(h["size"], 3000);
    let h = h["handle"].clone();
    let mut got = Vec::new();
    loop {
        let r = call(
            "file_read",
            json!({"handle": h, "offset": got.len(), "length": 1024}),
        )
        .unwrap();
        let mut chunk = Vec::new();
        codec::base64_decode_into(r["data_base64"].as_str().unwrap().as_bytes(), &mut chunk)
            .unwrap();
        got.extend_from_slice(&chunk);
        if r["eof"] == true {
            break;
        }
    }
    assert_eq!(got, data);
    let closed = call("file_close", json!({"handle": h})).unwrap();
    assert_eq!(closed["sha256"], codec::sha256_hex(&data));

    // Refusals carry their reason.
    for (p, reason) in [
        (t.r(r"up\a.txt:evil"), "stream"),
        (t.r("NUL.txt"), "device_name"),
        (t.r("x."), "trailing_dot_or_space"),
        (t.r(r"..\outside\secret"), "dotdot"),
        (format!(r"\\?\{}", t.r("file")), "device_path"),
        (t.r("sub"), "directory"),
    ] {
        let e = call("copy_from_guest", json!({ "path": p })).unwrap_err();
        assert_eq!(e["code"], -32000, "{p}");
        assert_eq!(e["data"]["reason"], reason, "{p}");
    }
    // An owner cannot be set on Windows; nothing is written.
    let e = call(
        "copy_to_guest",
        json!({"path": t.r("owned"), "content_base64": b64(b"x"), "uid": 0}),
    )
    .unwrap_err();
    assert_eq!(e["code"], -32602);
    assert_eq!(e["data"]["kind"], "owner");
    assert!(!t.root.join("owned").exists());
    assert_eq!(entries(&t.root), ["file", "sub", "up"]);
    assert_eq!(entries(&t.root.join("up")), ["a.txt", "big.bin"]);
}
