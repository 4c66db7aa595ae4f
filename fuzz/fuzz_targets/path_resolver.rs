//! The file-path rules against a scratch tree: the lexical check
//! (`files::path::check`) then the race-free resolver (`files::resolve`),
//! both strategies (openat2 and the `O_NOFOLLOW` walk), for reading and for
//! writing (without creating anything, so the tree never changes).
//!
//! The tree, made once per process under the temporary directory:
//!
//! ```text
//! root/file                 regular file (allowed to read)
//! root/sub/inner            regular file
//! root/sub/deeper/leaf      regular file
//! root/hard, root/hard2     one file with two links (refused)
//! root/fifo                 a FIFO (refused, never opened)
//! root/to-secret -> ../outside/secret
//! root/to-outside -> ../outside          (a directory link)
//! root/to-file -> file                   (a link inside the root)
//! root/sub/up -> ..
//! root/.kva-upload.x        the temporary-file pattern (refused as a target)
//! outside/secret            must never be opened
//! ```
//!
//! Input: byte 0 chooses the operation, the rest is the path (UTF-8); a
//! path not starting with `/` is taken relative to the root. Checked: what
//! opens for reading is one of the regular files under the root; the
//! directory a write would go to is one of the root's directories; the two
//! strategies give the same answer.
#![no_main]

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::OnceLock;

use kvm_manager_agent::files::path;
use kvm_manager_agent::files::resolve::{fstat, ResolveError, Resolver, Strategy};
use libfuzzer_sys::fuzz_target;

struct Tree {
    roots: Vec<PathBuf>,
    files: HashSet<(u64, u64)>,
    dirs: HashSet<(u64, u64)>,
}

fn id(st: &libc::stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn meta_id(p: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.dev(), m.ino())
}

fn tree() -> &'static Tree {
    static T: OnceLock<Tree> = OnceLock::new();
    T.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("kva-fuzz-resolver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "secret").unwrap();
        std::fs::write(root.join("file"), "file").unwrap();
        std::fs::write(root.join("sub/inner"), "inner").unwrap();
        std::fs::write(root.join("sub/deeper/leaf"), "leaf").unwrap();
        std::fs::write(root.join("hard"), "hard").unwrap();
        std::fs::hard_link(root.join("hard"), root.join("hard2")).unwrap();
        std::fs::write(root.join(".kva-upload.x"), "temp").unwrap();
        let fifo =
            std::ffi::CString::new(root.join("fifo").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        symlink("../outside/secret", root.join("to-secret")).unwrap();
        symlink("../outside", root.join("to-outside")).unwrap();
        symlink("file", root.join("to-file")).unwrap();
        symlink("..", root.join("sub/up")).unwrap();
        let files = ["file", "sub/inner", "sub/deeper/leaf", ".kva-upload.x"]
            .iter()
            .map(|f| meta_id(&root.join(f)))
            .collect();
        let dirs = ["", "sub", "sub/deeper"]
            .iter()
            .map(|d| meta_id(&root.join(d)))
            .collect();
        Tree {
            roots: vec![root],
            files,
            dirs,
        }
    })
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Read((u64, u64)),
    Write((u64, u64), Vec<u8>, bool),
    Refused(&'static str),
    NotFound,
    Exists,
    Io(Option<i32>),
}

fn err(e: ResolveError) -> Outcome {
    match e {
        ResolveError::Refused(r) => Outcome::Refused(r.as_str()),
        ResolveError::NotFound => Outcome::NotFound,
        ResolveError::Exists => Outcome::Exists,
        ResolveError::Io(e) => Outcome::Io(e.raw_os_error()),
    }
}

fn run(t: &Tree, lex: &path::Lexical<'_>, strategy: Strategy, op: u8) -> Outcome {
    let r = Resolver::new(strategy);
    if op % 3 == 0 {
        match r.open_read(lex) {
            Ok(opened) => {
                let st = fstat(opened.file.as_raw_fd()).unwrap();
                assert!(
                    t.files.contains(&id(&st)),
                    "opened a file that is not a regular file of the root: {lex:?}"
                );
                Outcome::Read(id(&st))
            }
            Err(e) => err(e),
        }
    } else {
        match r.open_write(lex, false, op % 3 == 2) {
            Ok(target) => {
                let st = fstat(target.dir.as_raw_fd()).unwrap();
                assert!(
                    t.dirs.contains(&id(&st)),
                    "a write would land outside the root's directories: {lex:?}"
                );
                let name = target.name.as_bytes().to_vec();
                assert!(!name.is_empty() && !name.contains(&b'/'), "{name:?}");
                assert!(name != b"." && name != b"..", "{name:?}");
                Outcome::Write(id(&st), name, target.existed)
            }
            Err(e) => err(e),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let t = tree();
    let Some((&op, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let full;
    let p = if text.starts_with('/') {
        text
    } else {
        full = format!("{}/{text}", t.roots[0].display());
        &full
    };
    let Ok(lex) = path::check(p, &t.roots) else {
        return;
    };
    let auto = run(t, &lex, Strategy::Auto, op);
    let walk = run(t, &lex, Strategy::Walk, op);
    assert_eq!(auto, walk, "openat2 and the walk disagree on {p:?}");
});
