//! The guest's initramfs: busybox, `/init` (init.sh beside this file), the
//! static agent and the kernel modules, as an uncompressed cpio "newc"
//! archive (written here: no cpio tool needed, and no decompression at boot).
//!
//! Cached under a name made from a hash of everything in it, so it is rebuilt
//! exactly when the agent, the script, busybox or the modules change.

use std::fs;
use std::path::{Path, PathBuf};

use crate::Result;

const INIT: &str = include_str!("init.sh");

/// Agent configurations the guest's /init selects with `kva.config=NAME`
/// (installed as `/etc/kva/NAME.toml`).
pub const CONFIGS: &[(&str, &str)] = &[
    ("e2e", include_str!("configs/e2e.toml")),
    ("qga", include_str!("configs/qga.toml")),
];

/// The folders every image has.
const DIRS: &[&str] = &[
    "bin",
    "dev",
    "etc",
    "etc/kva",
    "lib",
    "lib/modules",
    "sbin",
    "proc",
    "sys",
];

/// A file added to an initramfs beyond the usual contents: its path inside
/// (no leading `/`; missing parent folders are added), permission bits and
/// bytes.
pub type Extra = (String, u32, Vec<u8>);

/// Build (or reuse) the initramfs, with `extra` files beyond the usual
/// contents, cached in the folder `cache/<folder>` (the VM tests' image in
/// `initramfs`, the benchmark's in its own; each folder keeps only its
/// newest image); returns its path.
pub fn build_in(
    cache: &Path,
    folder: &str,
    agent: &Path,
    busybox: &Path,
    modules: &[(String, PathBuf)],
    extra: &[Extra],
) -> Result<PathBuf> {
    let read = |p: &Path| fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let agent = read(agent)?;
    let busybox = read(busybox)?;
    let mut module_files = Vec::new();
    for (name, path) in modules {
        module_files.push((name.as_str(), read(path)?));
    }
    let order: String = modules.iter().map(|(n, _)| format!("{n}\n")).collect();

    let mut archive = Cpio::default();
    for dir in DIRS {
        archive.dir(dir);
    }
    archive.char_device("dev/console", 5, 1);
    archive.file("init", 0o755, INIT.as_bytes());
    archive.file("bin/busybox", 0o755, &busybox);
    archive.file("sbin/kvm-manager-agent", 0o755, &agent);
    archive.file("etc/kva-modules", 0o644, order.as_bytes());
    for (name, text) in CONFIGS {
        archive.file(&format!("etc/kva/{name}.toml"), 0o644, text.as_bytes());
    }
    for (name, bytes) in &module_files {
        archive.file(&format!("lib/modules/{name}.ko"), 0o644, bytes);
    }
    let mut made: Vec<String> = Vec::new();
    for (path, perm, bytes) in extra {
        let mut parent = String::new();
        for part in path
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !DIRS.contains(&parent.as_str()) && !made.contains(&parent) {
                archive.dir(&parent);
                made.push(parent.clone());
            }
        }
        archive.file(path, *perm, bytes);
    }
    let bytes = archive.finish();

    let dir = cache.join(folder);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(format!("initramfs-{:016x}.cpio", fnv1a(&bytes)));
    if !path.exists() {
        // Keep the folder small: only the newest image is useful.
        for old in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let _ = fs::remove_file(old.path());
        }
        let tmp = path.with_extension("part");
        fs::write(&tmp, &bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        fs::rename(&tmp, &path).map_err(|e| format!("cannot rename to {}: {e}", path.display()))?;
    }
    Ok(path)
}

/// 64-bit FNV-1a: a stable content hash for cache names (not for security).
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A cpio "newc" archive, as the kernel's initramfs unpacker reads it.
#[derive(Default)]
pub(super) struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the same inputs give the same bytes
            u32::try_from(data.len()).expect("initramfs members are small"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("short names"),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub(super) fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub(super) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    pub(super) fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = c.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        // Header (110) + "init\0" padded to 116, then 10 bytes of data padded to 12.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
        assert_eq!(&bytes[128..134], b"070701");
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
