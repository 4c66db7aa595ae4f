//! What the file tests of both platforms share (`tests.rs`,
//! `tests_windows.rs`, `tests_upload.rs`): a scratch tree with an allowed
//! root and a secret outside it, the operations and outcomes of the
//! hostile-path tables, and an upload from start to commit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::path;
use super::resolve::Resolver;
use super::upload::{CommitError, Temp};
use super::{write_all_at, Reason};

/// A scratch directory with an allowed root and a secret outside it.
pub struct Tree {
    pub base: PathBuf,
    pub root: PathBuf,
    pub outside: PathBuf,
}

impl Tree {
    pub fn new(tag: &str) -> Tree {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir().join(format!(
            "kva-files-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "outside secret").unwrap();
        std::fs::write(root.join("file"), "inside").unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub").join("inner"), "inner").unwrap();
        Tree {
            base,
            root,
            outside,
        }
    }

    /// `rel` (written with this platform's separators) inside the root.
    pub fn r(&self, rel: &str) -> String {
        format!("{}{}{rel}", self.root.display(), std::path::MAIN_SEPARATOR)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        // A tmpfs some Linux tests mount inside the root.
        #[cfg(target_os = "linux")]
        {
            let mnt = self.root.join("mnt");
            if mnt.exists() {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&mnt)
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Op {
    Read,
    Write { overwrite: bool, parents: bool },
}

pub const W: Op = Op::Write {
    overwrite: false,
    parents: false,
};
pub const WO: Op = Op::Write {
    overwrite: true,
    parents: false,
};
pub const WP: Op = Op::Write {
    overwrite: true,
    parents: true,
};

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Refused(Reason),
    NotFound,
    Exists,
}

/// The names in `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// An upload to `rel`: temporary, chunks written, committed; returns the
/// commit's outcome.
pub fn upload_file(t: &Tree, rel: &str, data: &[u8], overwrite: bool) -> Result<(), CommitError> {
    let roots = vec![t.root.clone()];
    let p = t.r(rel);
    let lex = path::check(&p, &roots).unwrap();
    let target = Resolver::default()
        .open_write(&lex, true, overwrite)
        .unwrap();
    let temp = Temp::create(Arc::new(target.dir)).unwrap();
    for (i, chunk) in data.chunks(7).enumerate() {
        write_all_at(&temp.file, chunk, (i * 7) as u64).unwrap();
    }
    temp.commit(&target.name, 0o600, (None, None), overwrite)
}
