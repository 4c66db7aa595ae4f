//! Race-free resolution of a path below an allowed directory, on Windows.
//!
//! The lexical checks ([`super::path::check_windows`]) have already split
//! the path into an allowed directory (the root) and the components below
//! it, refusing streams, device names, short names and names Win32 would
//! rewrite. Here every name is opened with the `\\?\` prefix (no Win32
//! rewriting, no `MAX_PATH`), `FILE_FLAG_OPEN_REPARSE_POINT` (a link is
//! opened itself, never followed) and `FILE_FLAG_BACKUP_SEMANTICS` (so a
//! directory opens and can be recognised):
//!
//! 1. The root must be a directory that is not a reparse point
//!    (`root_not_directory` otherwise; its own parents are the
//!    administrator's choice and may be links).
//! 2. Each component below it is opened in turn and checked on the open
//!    handle (`GetFileInformationByHandleEx(FileAttributeTagInfo)`): a
//!    symbolic link is `symlink`, a junction or mount point
//!    `mount_crossing`, any other reparse point `reparse_point`, a file
//!    `not_a_directory`. Every directory handle is held, without
//!    `FILE_SHARE_DELETE`, until the operation ends: none of them can be
//!    renamed, deleted or replaced by a link meanwhile, so the names used
//!    next still lead through the directories checked.
//! 3. The file itself is checked on its open handle: a disk file
//!    (`GetFileType`; `device` otherwise), not a reparse point, not a
//!    directory (`directory`), one link (`hard_link`, for reading and for
//!    overwriting, as on Linux).
//!
//! Names are compared case-insensitively; names starting with the
//! temporary-file prefix in any case are `reserved_name`.
//!
//! Each handle's final path (`GetFinalPathNameByHandleW`) must also be its
//! directory's final path plus its name (`symlink` otherwise): a link the
//! file system does not show as a reparse point, as Wine shows the host's
//! symbolic links, is caught that way when it is in place. Wine computes
//! that path apart from the open, so under Wine a link swapped in during a
//! resolution can still escape; on Windows links are reparse points and the
//! race does not arise.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::path::{Path, PathBuf};

use windows_sys::Win32::Foundation::{
    ERROR_ALREADY_EXISTS, ERROR_DIRECTORY, ERROR_FILENAME_EXCED_RANGE, ERROR_FILE_NOT_FOUND,
    ERROR_PATH_NOT_FOUND, GENERIC_READ, HANDLE, INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateDirectoryW, CreateFileW, FileAttributeTagInfo, GetFileInformationByHandle,
    GetFileInformationByHandleEx, GetFileType, GetFinalPathNameByHandleW,
    BY_HANDLE_FILE_INFORMATION, FILE_ATTRIBUTE_DIRECTORY, FILE_ATTRIBUTE_REPARSE_POINT,
    FILE_ATTRIBUTE_TAG_INFO, FILE_FLAG_BACKUP_SEMANTICS, FILE_FLAG_OPEN_REPARSE_POINT,
    FILE_NAME_NORMALIZED, FILE_READ_ATTRIBUTES, FILE_SHARE_DELETE, FILE_SHARE_READ,
    FILE_SHARE_WRITE, FILE_TRAVERSE, FILE_TYPE_DISK, OPEN_EXISTING, SYNCHRONIZE,
};

use super::path::{eq_ignore_case, win_drive_parts, Lexical};
use super::Reason;

/// Prefix of the agent's temporary files; names starting with it (in any
/// case) are refused as targets.
pub use super::temp_name::TEMP_PREFIX;

/// A file's name in its directory.
pub type Name = String;

const IO_REPARSE_TAG_SYMLINK: u32 = 0xA000_000C;
const IO_REPARSE_TAG_MOUNT_POINT: u32 = 0xA000_0003;

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

/// Resolves paths below allowed directories (one strategy on Windows;
/// the type mirrors the Unix one).
#[derive(Clone, Copy, Debug, Default)]
pub struct Resolver {
    _one: (),
}

/// A directory opened beneath a root, with the handles that pin it and
/// every directory above it up to the root.
#[derive(Debug)]
pub struct Dir {
    /// Its path, `\\?\`-prefixed.
    pub path: PathBuf,
    /// Its final path as the system reports it for the open handle.
    pub final_path: String,
    handles: Vec<OwnedHandle>,
}

impl Dir {
    /// The `\\?\` path of `name` in this directory, NUL-terminated.
    pub fn child(&self, name: &str) -> Vec<u16> {
        wide(&self.path.join(name))
    }

    /// The handle of the directory itself.
    pub fn handle(&self) -> HANDLE {
        self.handles
            .last()
            .map_or(INVALID_HANDLE_VALUE, |h| h.as_raw_handle() as HANDLE)
    }
}

/// A directory opened beneath a root, and the name of the file in it.
#[derive(Debug)]
pub struct Target {
    /// The parent directory.
    pub dir: Dir,
    /// The file's name in it.
    pub name: Name,
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
    /// Open an existing regular file for reading.
    pub fn open_read(&self, lex: &Lexical<'_>) -> Result<Opened, ResolveError> {
        let (last, parents) = lex
            .rel
            .split_last()
            .ok_or(ResolveError::Refused(Reason::Directory))?;
        file_name(last)?;
        let dir = self.open_dir(lex.root, parents, false)?;
        let h = open(
            &dir.child(last),
            GENERIC_READ,
            FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
        )
        .map_err(not_found_or_io)?;
        let info = check_regular(&h)?;
        check_final(&h, &dir, last)?;
        Ok(Opened {
            file: File::from(h),
            size: (u64::from(info.nFileSizeHigh) << 32) | u64::from(info.nFileSizeLow),
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
        file_name(last)?;
        let dir = self.open_dir(lex.root, parents, create_parents)?;
        let existed = check_target(&dir, last, overwrite)?;
        Ok(Target {
            dir,
            name: (*last).to_owned(),
            existed,
        })
    }

    /// Open the directory `comps` below `root`, each component checked and
    /// held.
    pub fn open_dir(&self, root: &Path, comps: &[&str], create: bool) -> Result<Dir, ResolveError> {
        let mut dir = open_root(root)?;
        for comp in comps {
            let path = dir.path.join(comp);
            let w = wide(&path);
            let mut tries = 0;
            let h = loop {
                tries += 1;
                match open_dir_handle(&w) {
                    Ok(h) => break h,
                    Err(e) if create && tries < 4 && is_not_found(&e) => {
                        // SAFETY: NUL-terminated path; no security attributes.
                        if unsafe { CreateDirectoryW(w.as_ptr(), std::ptr::null()) } == 0 {
                            let e = io::Error::last_os_error();
                            if e.raw_os_error() != Some(ERROR_ALREADY_EXISTS as i32) {
                                return Err(not_found_or_io(e));
                            }
                        }
                    }
                    Err(e) => return Err(not_found_or_io(e)),
                }
            };
            let (attrs, tag) = tag_info(&h)?;
            if let Some(r) = reparse_reason(attrs, tag) {
                return Err(ResolveError::Refused(r));
            }
            if attrs & FILE_ATTRIBUTE_DIRECTORY == 0 {
                return Err(ResolveError::Refused(Reason::NotADirectory));
            }
            dir.final_path = check_final(&h, &dir, comp)?;
            dir.handles.push(h);
            dir.path = path;
        }
        Ok(dir)
    }
}

/// Whether `name` may be a target: not the agent's temporary-file pattern
/// (in any case).
fn file_name(name: &str) -> Result<(), ResolveError> {
    let p = TEMP_PREFIX.len();
    if name.len() >= p && name.is_char_boundary(p) && eq_ignore_case(&name[..p], TEMP_PREFIX) {
        return Err(ResolveError::Refused(Reason::ReservedName));
    }
    Ok(())
}

/// Check what is at `dir`\`name` before writing there. Returns whether
/// something is there.
pub fn check_target(dir: &Dir, name: &str, overwrite: bool) -> Result<bool, ResolveError> {
    match open(
        &dir.child(name),
        FILE_READ_ATTRIBUTES,
        FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
    ) {
        Ok(h) => {
            check_regular(&h)?;
            check_final(&h, dir, name)?;
            if !overwrite {
                return Err(ResolveError::Exists);
            }
            Ok(true)
        }
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(not_found_or_io(e)),
    }
}

/// The `\\?\` form of an allowed directory (a drive-letter path).
pub fn long_root(root: &Path) -> Result<PathBuf, ResolveError> {
    let s = root
        .to_str()
        .ok_or(ResolveError::Refused(Reason::RootNotDirectory))?;
    let (drive, comps) =
        win_drive_parts(s).map_err(|_| ResolveError::Refused(Reason::RootNotDirectory))?;
    let mut p = PathBuf::from(format!(r"\\?\{drive}:\"));
    for c in comps {
        match c {
            "." => {}
            ".." => return Err(ResolveError::Refused(Reason::RootNotDirectory)),
            c => p.push(c),
        }
    }
    Ok(p)
}

/// Open an allowed directory: it must be a directory, not a reparse point.
pub fn open_root(root: &Path) -> Result<Dir, ResolveError> {
    let path = long_root(root)?;
    let h = open_dir_handle(&wide(&path)).map_err(|e| {
        if is_not_found(&e) {
            ResolveError::NotFound
        } else {
            ResolveError::Io(e)
        }
    })?;
    let (attrs, _) = tag_info(&h)?;
    if attrs & FILE_ATTRIBUTE_REPARSE_POINT != 0 || attrs & FILE_ATTRIBUTE_DIRECTORY == 0 {
        return Err(ResolveError::Refused(Reason::RootNotDirectory));
    }
    let final_path = final_path(&h)?;
    // The root's own name must be its final name: otherwise it is a link
    // the system does not show as a reparse point (as Wine shows the
    // host's symbolic links). Its parents may be links.
    let last = |p: &str| -> String {
        p.trim_end_matches('\\')
            .rsplit('\\')
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    if !eq_ignore_case(&last(&final_path), &last(&path.to_string_lossy())) {
        return Err(ResolveError::Refused(Reason::RootNotDirectory));
    }
    Ok(Dir {
        path,
        final_path,
        handles: vec![h],
    })
}

/// Check, on the open handle `h` of `name` in `dir`, that the system's
/// final path for it is `dir`'s final path and `name` (ignoring case):
/// anything else went through a link, whether or not the file system shows
/// it as a reparse point. Returns that final path.
fn check_final(h: &OwnedHandle, dir: &Dir, name: &str) -> Result<String, ResolveError> {
    let got = final_path(h)?;
    let want = format!(r"{}\{name}", dir.final_path.trim_end_matches('\\'));
    if !eq_ignore_case(&got, &want) {
        return Err(ResolveError::Refused(Reason::Symlink));
    }
    Ok(got)
}

/// The refusal for a reparse point, if it is one.
fn reparse_reason(attrs: u32, tag: u32) -> Option<Reason> {
    if attrs & FILE_ATTRIBUTE_REPARSE_POINT == 0 {
        return None;
    }
    Some(match tag {
        IO_REPARSE_TAG_SYMLINK => Reason::Symlink,
        IO_REPARSE_TAG_MOUNT_POINT => Reason::MountCrossing,
        _ => Reason::ReparsePoint,
    })
}

/// Check an open handle: a disk file, not a reparse point, not a
/// directory, one link. Returns its information.
pub fn check_regular(h: &OwnedHandle) -> Result<BY_HANDLE_FILE_INFORMATION, ResolveError> {
    // SAFETY: a valid open handle.
    if unsafe { GetFileType(h.as_raw_handle() as HANDLE) } != FILE_TYPE_DISK {
        return Err(ResolveError::Refused(Reason::Device));
    }
    let (attrs, tag) = tag_info(h)?;
    if let Some(r) = reparse_reason(attrs, tag) {
        return Err(ResolveError::Refused(r));
    }
    if attrs & FILE_ATTRIBUTE_DIRECTORY != 0 {
        return Err(ResolveError::Refused(Reason::Directory));
    }
    let info = by_handle(h)?;
    if info.nNumberOfLinks > 1 {
        return Err(ResolveError::Refused(Reason::HardLink));
    }
    Ok(info)
}

/// `GetFileInformationByHandle`.
pub fn by_handle(h: &OwnedHandle) -> io::Result<BY_HANDLE_FILE_INFORMATION> {
    // SAFETY: plain data, filled by the call.
    let mut info: BY_HANDLE_FILE_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: a valid handle and a pointer to a structure of the right type.
    if unsafe { GetFileInformationByHandle(h.as_raw_handle() as HANDLE, &mut info) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// The attributes and reparse tag of an open handle.
fn tag_info(h: &OwnedHandle) -> io::Result<(u32, u32)> {
    let mut info = FILE_ATTRIBUTE_TAG_INFO::default();
    // SAFETY: a valid handle; the buffer is a FILE_ATTRIBUTE_TAG_INFO of
    // the size passed.
    let ok = unsafe {
        GetFileInformationByHandleEx(
            h.as_raw_handle() as HANDLE,
            FileAttributeTagInfo,
            (&mut info as *mut FILE_ATTRIBUTE_TAG_INFO).cast(),
            std::mem::size_of::<FILE_ATTRIBUTE_TAG_INFO>() as u32,
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.FileAttributes, info.ReparseTag))
}

/// The normalised final path of an open handle (`\\?\C:\...`).
pub fn final_path(h: &OwnedHandle) -> io::Result<String> {
    let mut buf = vec![0u16; 512];
    loop {
        // SAFETY: a valid handle and a buffer of the length passed.
        let n = unsafe {
            GetFinalPathNameByHandleW(
                h.as_raw_handle() as HANDLE,
                buf.as_mut_ptr(),
                buf.len() as u32,
                FILE_NAME_NORMALIZED,
            )
        } as usize;
        if n == 0 {
            return Err(io::Error::last_os_error());
        }
        if n < buf.len() {
            return Ok(String::from_utf16_lossy(&buf[..n]));
        }
        buf.resize(n + 1, 0);
    }
}

/// Whether `path` is `root` or below it, by whole components, ignoring
/// case.
pub fn is_below(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('\\');
    let mut p = path.split('\\');
    root.split('\\')
        .all(|r| p.next().is_some_and(|c| eq_ignore_case(c, r)))
}

/// The table key of an upload: the directory's volume and file index, and
/// the name upper-cased (names are case-insensitive).
pub fn dir_key(dir: &Dir, name: &str) -> io::Result<(u64, u64, Name)> {
    let h = dir
        .handles
        .last()
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let info = by_handle(h)?;
    let index = (u64::from(info.nFileIndexHigh) << 32) | u64::from(info.nFileIndexLow);
    Ok((
        u64::from(info.dwVolumeSerialNumber),
        index,
        name.chars().flat_map(char::to_uppercase).collect(),
    ))
}

/// The size of an open file.
pub fn file_size(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.len())
}

/// A NUL-terminated wide string.
pub fn wide(p: &Path) -> Vec<u16> {
    OsStr::new(p).encode_wide().chain(Some(0)).collect()
}

/// Open a directory (or whatever is there) without following a reparse
/// point, held against rename and delete (no `FILE_SHARE_DELETE`; the
/// traverse right makes the share mode count).
fn open_dir_handle(path: &[u16]) -> io::Result<OwnedHandle> {
    open(
        path,
        FILE_TRAVERSE | FILE_READ_ATTRIBUTES | SYNCHRONIZE,
        FILE_SHARE_READ | FILE_SHARE_WRITE,
    )
}

/// `CreateFileW(OPEN_EXISTING)` with `FILE_FLAG_OPEN_REPARSE_POINT |
/// FILE_FLAG_BACKUP_SEMANTICS`.
pub fn open(path: &[u16], access: u32, share: u32) -> io::Result<OwnedHandle> {
    create(
        path,
        access,
        share,
        OPEN_EXISTING,
        FILE_FLAG_OPEN_REPARSE_POINT | FILE_FLAG_BACKUP_SEMANTICS,
    )
}

/// `CreateFileW`.
pub fn create(
    path: &[u16],
    access: u32,
    share: u32,
    disposition: u32,
    flags: u32,
) -> io::Result<OwnedHandle> {
    // SAFETY: NUL-terminated path; no security attributes or template.
    let h = unsafe {
        CreateFileW(
            path.as_ptr(),
            access,
            share,
            std::ptr::null(),
            disposition,
            flags,
            std::ptr::null_mut(),
        )
    };
    if h == INVALID_HANDLE_VALUE || h.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new handle we own.
    Ok(unsafe { OwnedHandle::from_raw_handle(h as _) })
}

fn is_not_found(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(|c| c as u32),
        Some(ERROR_FILE_NOT_FOUND | ERROR_PATH_NOT_FOUND)
    )
}

fn not_found_or_io(e: io::Error) -> ResolveError {
    match e.raw_os_error().map(|c| c as u32) {
        Some(ERROR_FILE_NOT_FOUND | ERROR_PATH_NOT_FOUND) => ResolveError::NotFound,
        Some(ERROR_FILENAME_EXCED_RANGE) => ResolveError::Refused(Reason::TooLong),
        Some(ERROR_DIRECTORY) => ResolveError::Refused(Reason::NotADirectory),
        _ => ResolveError::Io(e),
    }
}
