//! What the file tests of both platforms share (`tests.rs`,
//! `tests_windows.rs`): a scratch tree with an allowed root and a secret
//! outside it, and the operations and outcomes of the hostile-path tables.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use super::Reason;

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
