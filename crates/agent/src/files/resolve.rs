//! Race-free resolution of a path below an allowed directory.
//!
//! The lexical checks ([`super::path`]) have already split the path into an
//! allowed directory (the root) and the components below it. Here:
//!
//! 1. The root is opened with `O_NOFOLLOW | O_DIRECTORY`: it must be a real
//!    directory, not a symbolic link (its own parents are the
//!    administrator's choice and may be links).
//! 2. The parent directory of the file is opened from the root's fd with
//!    `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//!    RESOLVE_NO_XDEV)`. Where openat2 is missing (Linux before 5.6, other
//!    Unixes) or filtered by seccomp (`ENOSYS`, `EPERM`), the same is done
//!    by a walk: one `openat(O_NOFOLLOW | O_DIRECTORY)` per component from
//!    the root's fd, checking that the device stays the root's. Either way a
//!    symbolic link anywhere below the root, or a directory swapped for one
//!    between check and use, makes the resolution fail: nothing is ever
//!    followed. Links inside the root pointing inside it are refused too;
//!    the rule is the simplest that is obviously safe.
//! 3. The file itself is looked at with `fstatat(AT_SYMLINK_NOFOLLOW)` and,
//!    for reading, opened with `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY` and
//!    checked again with `fstat` on the open fd (the check that counts):
//!    only a regular file with one hard link is accepted. A FIFO is refused
//!    without being opened, and `O_NONBLOCK` guarantees that even one
//!    swapped in at the last moment never blocks the agent.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use super::path::Lexical;
use super::Reason;

/// Prefix of the agent's temporary files; names starting with it are refused
/// as targets.
pub use super::temp_name::TEMP_PREFIX;

/// A file's name in its directory.
pub type Name = CString;

/// Why a resolution failed.
#[derive(Debug)]
pub enum ResolveError {
    /// Refused by the path rules.
    Refused(Reason),
    /// A component or the file does not exist.
    NotFound,
    /// Writing without `overwrite`, and the file exists.
    Exists,
    /// An OS call failed otherwise.
    Io(io::Error),
}

impl From<io::Error> for ResolveError {
    fn from(e: io::Error) -> Self {
        ResolveError::Io(e)
    }
}

/// How directories are resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// openat2 when the kernel has it (the default), else the walk.
    Auto,
    /// Always the component walk (as on kernels without openat2; for tests).
    Walk,
}

/// 0: not tried yet, 1: works, 2: unavailable (ENOSYS, EPERM, EINVAL).
static OPENAT2: AtomicU8 = AtomicU8::new(0);

/// Resolves paths below allowed directories.
#[derive(Clone, Copy, Debug)]
pub struct Resolver {
    strategy: Strategy,
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new(Strategy::Auto)
    }
}

/// A directory opened beneath a root, and the name of the file in it.
#[derive(Debug)]
pub struct Target {
    /// The parent directory (`O_RDONLY | O_DIRECTORY`, so it can be fsynced).
    pub dir: OwnedFd,
    /// The file's name in it.
    pub name: CString,
    /// Whether a file of that name existed when looked at.
    pub existed: bool,
}

/// A file opened for reading.
#[derive(Debug)]
pub struct Opened {
    /// The open file.
    pub file: File,
    /// Its size when opened.
    pub size: u64,
}

impl Resolver {
    /// A resolver using `strategy`.
    pub fn new(strategy: Strategy) -> Self {
        Self { strategy }
    }

    /// Whether openat2 is in use (after the first resolution).
    pub fn uses_openat2(&self) -> bool {
        self.strategy == Strategy::Auto && OPENAT2.load(Ordering::Relaxed) == 1
    }

    /// Open an existing regular file for reading.
    pub fn open_read(&self, lex: &Lexical<'_>) -> Result<Opened, ResolveError> {
        let (last, parents) = lex
            .rel
            .split_last()
            .ok_or(ResolveError::Refused(Reason::Directory))?;
        let name = file_name(last)?;
        let root = open_root(lex.root)?;
        let dir = self.open_dir(&root, parents, false)?;
        let st = fstatat_nofollow(dir.as_raw_fd(), &name).map_err(not_found_or_io)?;
        check_regular(&st)?;
        let fd = openat(
            dir.as_raw_fd(),
            &name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
            0,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ResolveError::Refused(Reason::Symlink),
            Some(libc::ENXIO) => ResolveError::Refused(Reason::Socket),
            _ => not_found_or_io(e),
        })?;
        let st = fstat(fd.as_raw_fd())?;
        check_regular(&st)?;
        Ok(Opened {
            file: File::from(fd),
            size: st.st_size as u64,
        })
    }

    /// Open the directory a file is to be written in (creating missing
    /// directories below the root when `create_parents`), and check what is
    /// there now under the file's name: nothing, or (with `overwrite`) a
    /// regular file with one link.
    pub fn open_write(
        &self,
        lex: &Lexical<'_>,
        create_parents: bool,
        overwrite: bool,
    ) -> Result<Target, ResolveError> {
        let (last, parents) = lex
            .rel
            .split_last()
            .ok_or(ResolveError::Refused(Reason::Directory))?;
        let name = file_name(last)?;
        let root = open_root(lex.root)?;
        let dir = self.open_dir(&root, parents, create_parents)?;
        let existed = check_target(dir.as_raw_fd(), &name, overwrite)?;
        Ok(Target { dir, name, existed })
    }

    /// Open the directory `comps` below `root`.
    pub fn open_dir(
        &self,
        root: &OwnedFd,
        comps: &[&str],
        create: bool,
    ) -> Result<OwnedFd, ResolveError> {
        if comps.is_empty() {
            return Ok(root.try_clone()?);
        }
        if self.strategy == Strategy::Auto && OPENAT2.load(Ordering::Relaxed) != 2 {
            match dirs_openat2(root, comps) {
                Ok(fd) => {
                    OPENAT2.store(1, Ordering::Relaxed);
                    return Ok(fd);
                }
                Err(Openat2::Unavailable) => OPENAT2.store(2, Ordering::Relaxed),
                Err(Openat2::Failed(ResolveError::NotFound)) if create => {}
                Err(Openat2::Failed(e)) => return Err(e),
                Err(Openat2::Retry) => {}
            }
        }
        walk_dirs(root, comps, create)
    }
}

/// Whether `name` may be a target: not too long, no NUL (both already
/// excluded lexically), not the agent's temporary-file pattern.
fn file_name(name: &str) -> Result<CString, ResolveError> {
    if name.starts_with(TEMP_PREFIX) {
        return Err(ResolveError::Refused(Reason::ReservedName));
    }
    CString::new(name).map_err(|_| ResolveError::Refused(Reason::Nul))
}

/// Check what is at `dir`/`name` before writing there. Returns whether
/// something is there.
pub fn check_target(dir: RawFd, name: &CStr, overwrite: bool) -> Result<bool, ResolveError> {
    match fstatat_nofollow(dir, name) {
        Ok(st) => {
            check_regular(&st)?;
            if !overwrite {
                return Err(ResolveError::Exists);
            }
            Ok(true)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(ResolveError::Io(e)),
    }
}

/// Open an allowed directory: it must be a directory itself, not a link.
pub fn open_root(root: &Path) -> Result<OwnedFd, ResolveError> {
    let c = CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| ResolveError::Refused(Reason::Nul))?;
    openat(
        libc::AT_FDCWD,
        &c,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        0,
    )
    .map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => ResolveError::Refused(Reason::RootNotDirectory),
        Some(libc::ENOENT) => ResolveError::NotFound,
        _ => ResolveError::Io(e),
    })
}

/// The refusal for a file of this type and link count, if any.
pub fn check_regular(st: &libc::stat) -> Result<(), ResolveError> {
    let reason = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG if st.st_nlink > 1 => Reason::HardLink,
        libc::S_IFREG => return Ok(()),
        libc::S_IFDIR => Reason::Directory,
        libc::S_IFLNK => Reason::Symlink,
        libc::S_IFIFO => Reason::Fifo,
        libc::S_IFSOCK => Reason::Socket,
        _ => Reason::Device,
    };
    Err(ResolveError::Refused(reason))
}

fn not_found_or_io(e: io::Error) -> ResolveError {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ResolveError::NotFound,
        Some(libc::ENAMETOOLONG) => ResolveError::Refused(Reason::TooLong),
        Some(libc::ENOTDIR) => ResolveError::Refused(Reason::NotADirectory),
        _ => ResolveError::Io(e),
    }
}

enum Openat2 {
    Unavailable,
    Retry,
    Failed(ResolveError),
}

#[cfg(target_os = "linux")]
fn dirs_openat2(root: &OwnedFd, comps: &[&str]) -> Result<OwnedFd, Openat2> {
    let path = CString::new(comps.join("/"))
        .map_err(|_| Openat2::Failed(ResolveError::Refused(Reason::Nul)))?;
    // SAFETY: open_how is plain data; all-zero is its "nothing set" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH
        | libc::RESOLVE_NO_SYMLINKS
        | libc::RESOLVE_NO_MAGICLINKS
        | libc::RESOLVE_NO_XDEV;
    for _ in 0..16 {
        // SAFETY: valid fd, NUL-terminated path, `how` lives across the call
        // and its size is passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a new fd we own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = io::Error::last_os_error();
        let refused = |r| Err(Openat2::Failed(ResolveError::Refused(r)));
        return match e.raw_os_error() {
            // A rename elsewhere in the tree raced the lookup: try again.
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::E2BIG) => {
                Err(Openat2::Unavailable)
            }
            Some(libc::ELOOP) => refused(Reason::Symlink),
            Some(libc::EXDEV) => refused(Reason::MountCrossing),
            Some(libc::ENOTDIR) => refused(Reason::NotADirectory),
            Some(libc::ENAMETOOLONG) => refused(Reason::TooLong),
            Some(libc::ENOENT) => Err(Openat2::Failed(ResolveError::NotFound)),
            _ => Err(Openat2::Failed(ResolveError::Io(e))),
        };
    }
    Err(Openat2::Retry)
}

#[cfg(not(target_os = "linux"))]
fn dirs_openat2(_root: &OwnedFd, _comps: &[&str]) -> Result<OwnedFd, Openat2> {
    Err(Openat2::Unavailable)
}

/// The fallback: one `O_NOFOLLOW` open per component, staying on the
/// root's device; missing directories created (mode 0755) when `create`.
fn walk_dirs(root: &OwnedFd, comps: &[&str], create: bool) -> Result<OwnedFd, ResolveError> {
    let root_dev = fstat(root.as_raw_fd())?.st_dev;
    let mut cur = root.try_clone()?;
    for comp in comps {
        let name = CString::new(*comp).map_err(|_| ResolveError::Refused(Reason::Nul))?;
        let mut tries = 0;
        let next = loop {
            tries += 1;
            match openat(
                cur.as_raw_fd(),
                &name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0,
            ) {
                Ok(fd) => break fd,
                Err(e) => match e.raw_os_error() {
                    Some(libc::ENOENT) if create && tries < 4 => {
                        // SAFETY: valid dir fd and NUL-terminated name.
                        let r = unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) };
                        if r != 0 {
                            let e = io::Error::last_os_error();
                            if e.raw_os_error() != Some(libc::EEXIST) {
                                return Err(not_found_or_io(e));
                            }
                        }
                    }
                    // O_NOFOLLOW met a symbolic link.
                    Some(libc::ELOOP) => return Err(ResolveError::Refused(Reason::Symlink)),
                    Some(libc::ENOTDIR) => {
                        // (Gone meanwhile: a race, reported as not found.)
                        let st =
                            fstatat_nofollow(cur.as_raw_fd(), &name).map_err(not_found_or_io)?;
                        return Err(ResolveError::Refused(
                            if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                                Reason::Symlink
                            } else {
                                Reason::NotADirectory
                            },
                        ));
                    }
                    _ => return Err(not_found_or_io(e)),
                },
            }
        };
        if fstat(next.as_raw_fd())?.st_dev != root_dev {
            return Err(ResolveError::Refused(Reason::MountCrossing));
        }
        cur = next;
    }
    Ok(cur)
}

/// The table key of an upload: the directory's device and inode, and the
/// name.
pub fn dir_key(dir: &OwnedFd, name: &CStr) -> io::Result<(u64, u64, Name)> {
    let st = fstat(dir.as_raw_fd())?;
    Ok((st.st_dev as u64, st.st_ino as u64, name.to_owned()))
}

/// The size of an open file.
pub fn file_size(file: &File) -> io::Result<u64> {
    Ok(fstat(file.as_raw_fd())?.st_size as u64)
}

/// `openat(2)`.
pub fn openat(dir: RawFd, name: &CStr, flags: i32, mode: libc::mode_t) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: NUL-terminated name; the fd returned is new and ours.
        let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, mode as libc::c_uint) };
        if fd >= 0 {
            // SAFETY: as above.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `fstat(2)`.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled by the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a stat.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// `fstatat(2)` without following a final symbolic link.
pub fn fstatat_nofollow(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled by the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated name, valid pointer to a stat.
    if unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}
