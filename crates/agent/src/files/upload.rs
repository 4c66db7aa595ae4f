//! Atomic uploads: a temporary file in the target's directory, renamed over
//! the target only once complete and verified.
//!
//! - The temporary file is `.kva-upload.<16 hex digits>.tmp`, created with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600, through the fd of the
//!   resolved directory (never by path), and locked with `flock(LOCK_EX)`
//!   for as long as the agent has it open.
//! - Commit: owner and mode set on the open file, `fsync`, then
//!   `renameat2(RENAME_NOREPLACE)` (or a plain rename with `overwrite`), then
//!   `fsync` of the directory. Without `overwrite`, a file created at the
//!   target meanwhile is never replaced: the commit fails with -32002.
//! - A temporary file that is dropped without a commit (abort, error,
//!   expiry, a failed check) is unlinked. One left by a crash is removed at
//!   the next start-up by [`remove_stale`]: a file in an allowed directory
//!   (or below, at most [`STALE_SCAN_DEPTH`] levels and
//!   [`STALE_SCAN_ENTRIES`] entries per root, never following links or
//!   crossing mounts) whose name matches the pattern exactly, that is a
//!   regular file owned by the agent's user with one link, and that no live
//!   agent holds locked.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use super::resolve::{fstat, fstatat_nofollow, open_root, openat, ResolveError};
use super::temp_name::new_temp_name;
pub use super::temp_name::{
    is_temp_name, CommitError, STALE_SCAN_DEPTH, STALE_SCAN_ENTRIES, TEMP_SUFFIX,
};

/// A temporary file being written. Dropped without [`Temp::commit`], it is
/// removed.
#[derive(Debug)]
pub struct Temp {
    dir: Arc<OwnedFd>,
    name: CString,
    /// The open temporary file.
    pub file: File,
    removed: bool,
}

impl Temp {
    /// Create a fresh temporary file (mode 0600, locked) in `dir`.
    pub fn create(dir: Arc<OwnedFd>) -> io::Result<Temp> {
        for _ in 0..16 {
            let name = CString::new(new_temp_name()).expect("no NUL");
            match openat(
                dir.as_raw_fd(),
                &name,
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            ) {
                Ok(fd) => {
                    let temp = Temp {
                        dir,
                        name,
                        file: File::from(fd),
                        removed: false,
                    };
                    // SAFETY: flock on our own open fd.
                    if unsafe { libc::flock(temp.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }
                        != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    return Ok(temp);
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::from_raw_os_error(libc::EEXIST))
    }

    /// The temporary file's name.
    pub fn name(&self) -> &CStr {
        &self.name
    }

    /// Set owner (when given) and mode, fsync, rename over `target` in the
    /// same directory (never replacing an existing file unless
    /// `overwrite`), fsync the directory.
    pub fn commit(
        mut self,
        target: &CStr,
        mode: u32,
        owner: (Option<u32>, Option<u32>),
        overwrite: bool,
    ) -> Result<(), CommitError> {
        let fd = self.file.as_raw_fd();
        if owner.0.is_some() || owner.1.is_some() {
            let uid = owner.0.map_or(u32::MAX, |u| u as libc::uid_t);
            let gid = owner.1.map_or(u32::MAX, |g| g as libc::gid_t);
            // SAFETY: valid fd; -1 (u32::MAX) leaves that id unchanged.
            if unsafe { libc::fchown(fd, uid, gid) } != 0 {
                return Err(CommitError::Io(io::Error::last_os_error()));
            }
        }
        // SAFETY: valid fd.
        if unsafe { libc::fchmod(fd, mode as libc::mode_t) } != 0 {
            return Err(CommitError::Io(io::Error::last_os_error()));
        }
        self.file.sync_all().map_err(CommitError::Io)?;
        let dir = self.dir.as_raw_fd();
        rename(dir, &self.name, target, overwrite)?;
        self.removed = true;
        // SAFETY: valid fd.
        if unsafe { libc::fsync(dir) } != 0 {
            log::warn!(
                "fsync of the directory of {target:?} failed: {}",
                io::Error::last_os_error()
            );
        }
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.removed {
            // SAFETY: valid dir fd and NUL-terminated name.
            if unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) } != 0 {
                log::warn!(
                    "cannot remove the temporary file {:?}: {}",
                    self.name,
                    io::Error::last_os_error()
                );
            }
        }
    }
}

fn rename(dir: RawFd, from: &CStr, to: &CStr, overwrite: bool) -> Result<(), CommitError> {
    #[cfg(target_os = "linux")]
    {
        let flags = if overwrite { 0 } else { libc::RENAME_NOREPLACE };
        // SAFETY: valid fds and NUL-terminated names.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                dir,
                from.as_ptr(),
                dir,
                to.as_ptr(),
                flags,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => return Err(CommitError::Exists),
            // No renameat2, or a file system without RENAME_NOREPLACE: fall
            // back below.
            Some(libc::ENOSYS | libc::EINVAL | libc::EPERM) => {}
            _ => return Err(CommitError::Io(e)),
        }
    }
    if overwrite {
        // SAFETY: valid fds and NUL-terminated names.
        if unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) } != 0 {
            return Err(CommitError::Io(io::Error::last_os_error()));
        }
        return Ok(());
    }
    // link(2) never replaces: EEXIST if the target appeared.
    // SAFETY: valid fds and NUL-terminated names.
    if unsafe { libc::linkat(dir, from.as_ptr(), dir, to.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EEXIST) {
            CommitError::Exists
        } else {
            CommitError::Io(e)
        });
    }
    // SAFETY: as above.
    unsafe { libc::unlinkat(dir, from.as_ptr(), 0) };
    Ok(())
}

/// Remove temporary files left by an agent that died, below each root.
/// Returns how many were removed.
pub fn remove_stale(roots: &[impl AsRef<Path>]) -> usize {
    let mut removed = 0;
    for root in roots {
        let root = root.as_ref();
        let fd = match open_root(root) {
            Ok(fd) => fd,
            Err(ResolveError::NotFound) => continue,
            Err(e) => {
                log::warn!("not cleaning {}: {e:?}", root.display());
                continue;
            }
        };
        let Ok(st) = fstat(fd.as_raw_fd()) else {
            continue;
        };
        let mut budget = STALE_SCAN_ENTRIES;
        removed += scan(fd, st.st_dev, STALE_SCAN_DEPTH, &mut budget, root);
    }
    removed
}

fn scan(dir: OwnedFd, dev: libc::dev_t, depth: usize, budget: &mut usize, shown: &Path) -> usize {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut removed = 0;
    let names = match read_names(&dir, budget) {
        Ok(n) => n,
        Err(e) => {
            log::debug!("cannot list {}: {e}", shown.display());
            return 0;
        }
    };
    for name in names {
        let Ok(st) = fstatat_nofollow(dir.as_raw_fd(), &name) else {
            continue;
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR if depth > 0 && st.st_dev == dev => {
                if let Ok(sub) = openat(
                    dir.as_raw_fd(),
                    &name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0,
                ) {
                    let shown = shown.join(name.to_string_lossy().as_ref());
                    removed += scan(sub, dev, depth - 1, budget, &shown);
                }
            }
            libc::S_IFREG
                if is_temp_name(name.as_bytes())
                    && st.st_uid == me
                    && st.st_nlink == 1
                    && remove_if_unlocked(&dir, &name, &st) =>
            {
                log::info!(
                    "removed a stale upload: {}",
                    shown.join(name.to_string_lossy().as_ref()).display()
                );
                removed += 1;
            }
            _ => {}
        }
    }
    removed
}

fn remove_if_unlocked(dir: &OwnedFd, name: &CStr, st: &libc::stat) -> bool {
    let Ok(fd) = openat(
        dir.as_raw_fd(),
        name,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        0,
    ) else {
        return false;
    };
    // SAFETY: flock on our own fd; a live agent holds its temporaries locked.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return false;
    }
    let same = fstat(fd.as_raw_fd()).is_ok_and(|o| o.st_ino == st.st_ino && o.st_dev == st.st_dev);
    // SAFETY: valid dir fd and NUL-terminated name.
    same && unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } == 0
}

/// The names in a directory (not `.` and `..`), at most `budget` of them.
fn read_names(dir: &OwnedFd, budget: &mut usize) -> io::Result<Vec<CString>> {
    let fd = dir.try_clone()?;
    // SAFETY: fdopendir takes ownership of a valid fd (released from
    // `fd`); closedir below closes it.
    let d = unsafe { libc::fdopendir(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    while *budget > 0 {
        // SAFETY: `d` is an open DIR stream.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid entry whose d_name is
        // NUL-terminated.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b == b"." || b == b".." {
            continue;
        }
        *budget -= 1;
        out.push(name.to_owned());
    }
    // SAFETY: `d` is open and closed once.
    unsafe { libc::closedir(d) };
    Ok(out)
}
