//! Atomic uploads on Windows: a temporary file in the target's directory,
//! moved over the target only once complete and verified.
//!
//! - The temporary file is `.kva-upload.<16 hex digits>.tmp`, created with
//!   `CREATE_NEW` and `FILE_FLAG_OPEN_REPARSE_POINT` by its `\\?\` path in
//!   the resolved directory, which the [`Dir`] holds open against rename
//!   and delete. Its handle shares reading only: while the agent has it
//!   open nobody else can write, rename or delete it, and an exclusive
//!   open (the start-up clean-up's) fails; that is its lock.
//! - Commit: `FlushFileBuffers` (`File::sync_all`), then a rename of that
//!   handle to the target's name relative to the directory's handle
//!   (`NtSetInformationFile(FileRenameInformation)`, `ReplaceIfExists`
//!   only with `overwrite`): without it a file created at the target
//!   meanwhile is never replaced (the commit fails with -32002). `mode` has no meaning
//!   on Windows and is not applied (the file inherits its directory's
//!   ACL); an owner is refused before an upload starts.
//! - A temporary file dropped without a commit is deleted through its own
//!   handle (`FileDispositionInfo`), never by name. One left by a crash is
//!   removed at the next start-up by [`remove_stale`]: below each allowed
//!   directory (at most [`STALE_SCAN_DEPTH`] levels and
//!   [`STALE_SCAN_ENTRIES`] entries per root, never entering reparse
//!   points), a file whose name matches the pattern exactly (in any case),
//!   that opens exclusively (no live agent has it open), is a disk file
//!   with one link, not a reparse point, and whose final path is still
//!   below the root; it is deleted through that handle.

use std::fs::File;
use std::io;
use std::os::windows::fs::MetadataExt;
use std::os::windows::io::{AsRawHandle, OwnedHandle};
use std::path::Path;
use std::sync::Arc;

use windows_sys::Wdk::Storage::FileSystem::{
    FileRenameInformation, NtSetInformationFile, FILE_RENAME_INFORMATION,
};
use windows_sys::Win32::Foundation::{
    RtlNtStatusToDosError, ERROR_ALREADY_EXISTS, ERROR_FILE_EXISTS, GENERIC_READ, GENERIC_WRITE,
    HANDLE,
};
use windows_sys::Win32::Storage::FileSystem::{
    FileDispositionInfo, SetFileInformationByHandle, CREATE_NEW, DELETE, FILE_ATTRIBUTE_DIRECTORY,
    FILE_ATTRIBUTE_NORMAL, FILE_ATTRIBUTE_REPARSE_POINT, FILE_DISPOSITION_INFO,
    FILE_FLAG_OPEN_REPARSE_POINT, FILE_READ_ATTRIBUTES, FILE_SHARE_DELETE, FILE_SHARE_READ,
    FILE_SHARE_WRITE,
};
use windows_sys::Win32::System::IO::IO_STATUS_BLOCK;

use super::path::eq_ignore_case;
use super::resolve::{check_regular, create, final_path, open, open_root, Dir, ResolveError};
use super::temp_name::new_temp_name;
pub use super::temp_name::{
    is_temp_name, CommitError, STALE_SCAN_DEPTH, STALE_SCAN_ENTRIES, TEMP_SUFFIX,
};

/// A temporary file being written. Dropped without [`Temp::commit`], it is
/// removed.
#[derive(Debug)]
pub struct Temp {
    dir: Arc<Dir>,
    name: String,
    /// The open temporary file.
    pub file: File,
    removed: bool,
}

impl Temp {
    /// Create a fresh temporary file in `dir`.
    pub fn create(dir: Arc<Dir>) -> io::Result<Temp> {
        for _ in 0..16 {
            let name = new_temp_name();
            match create(
                &dir.child(&name),
                GENERIC_READ | GENERIC_WRITE | DELETE,
                FILE_SHARE_READ,
                CREATE_NEW,
                FILE_ATTRIBUTE_NORMAL | FILE_FLAG_OPEN_REPARSE_POINT,
            ) {
                Ok(h) => {
                    return Ok(Temp {
                        dir,
                        name,
                        file: File::from(h),
                        removed: false,
                    })
                }
                Err(e) if is_exists(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::from_raw_os_error(ERROR_FILE_EXISTS as i32))
    }

    /// The temporary file's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Flush and move over `target` in the same directory (never replacing
    /// an existing file unless `overwrite`). `mode` is not applied on
    /// Windows; an owner cannot be set (refused).
    pub fn commit(
        mut self,
        target: &str,
        _mode: u32,
        owner: (Option<u32>, Option<u32>),
        overwrite: bool,
    ) -> Result<(), CommitError> {
        if owner.0.is_some() || owner.1.is_some() {
            return Err(CommitError::Io(io::Error::from(io::ErrorKind::Unsupported)));
        }
        self.file.sync_all().map_err(CommitError::Io)?;
        let h = self.file.as_raw_handle() as HANDLE;
        if let Err(e) = rename_by_handle(h, self.dir.handle(), target, overwrite) {
            return Err(if is_exists(&e) {
                CommitError::Exists
            } else {
                CommitError::Io(e)
            });
        }
        self.removed = true;
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = delete_by_handle(self.file.as_raw_handle() as HANDLE) {
                log::warn!("cannot remove the temporary file {:?}: {e}", self.name);
            }
        }
    }
}

/// Rename the file open as `h` (with `DELETE` access) to `name` in the
/// directory open as `dir`, replacing an existing file only when
/// `replace`: `NtSetInformationFile(FileRenameInformation)` with the
/// directory's handle as the root and the bare name, so neither the
/// temporary file nor the directory is named by path. (The Win32
/// `SetFileInformationByHandle` would do the same on Windows, but Wine
/// takes its name for a DOS path.)
fn rename_by_handle(h: HANDLE, dir: HANDLE, name: &str, replace: bool) -> io::Result<()> {
    let wname: Vec<u16> = name.encode_utf16().collect();
    let head = std::mem::offset_of!(FILE_RENAME_INFORMATION, FileName);
    let bytes = head + (wname.len() + 1) * 2;
    // u64s: aligned for FILE_RENAME_INFORMATION; zeroed, so the name ends
    // in NUL.
    let mut buf = vec![0u64; bytes.div_ceil(8)];
    let info = buf.as_mut_ptr().cast::<FILE_RENAME_INFORMATION>();
    // SAFETY: `buf` is zeroed, aligned and `bytes` long: room for the
    // structure's head and the name after it.
    unsafe {
        (*info).Anonymous.ReplaceIfExists = replace;
        (*info).RootDirectory = dir;
        (*info).FileNameLength = (wname.len() * 2) as u32;
        std::ptr::copy_nonoverlapping(
            wname.as_ptr(),
            std::ptr::addr_of_mut!((*info).FileName).cast::<u16>(),
            wname.len(),
        );
    }
    let mut iosb = IO_STATUS_BLOCK::default();
    // SAFETY: valid handles; the buffer holds a FILE_RENAME_INFORMATION of
    // `bytes`; `iosb` lives across the (synchronous) call.
    let status = unsafe {
        NtSetInformationFile(
            h,
            &mut iosb,
            info.cast(),
            bytes as u32,
            FileRenameInformation,
        )
    };
    if status < 0 {
        // SAFETY: a pure conversion of a status code.
        let code = unsafe { RtlNtStatusToDosError(status) };
        return Err(io::Error::from_raw_os_error(code as i32));
    }
    Ok(())
}

fn is_exists(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(|c| c as u32),
        Some(ERROR_FILE_EXISTS | ERROR_ALREADY_EXISTS)
    )
}

/// Mark the file open as `h` (with `DELETE` access) for deletion at its
/// last close.
fn delete_by_handle(h: HANDLE) -> io::Result<()> {
    let info = FILE_DISPOSITION_INFO { DeleteFile: true };
    // SAFETY: a valid handle and a FILE_DISPOSITION_INFO of the size passed.
    let ok = unsafe {
        SetFileInformationByHandle(
            h,
            FileDispositionInfo,
            (&info as *const FILE_DISPOSITION_INFO).cast(),
            std::mem::size_of::<FILE_DISPOSITION_INFO>() as u32,
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Remove temporary files left by an agent that died, below each root.
/// Returns how many were removed.
pub fn remove_stale(roots: &[impl AsRef<Path>]) -> usize {
    let mut removed = 0;
    for root in roots {
        let root = root.as_ref();
        let dir = match open_root(root) {
            Ok(d) => d,
            Err(ResolveError::NotFound) => continue,
            Err(e) => {
                log::warn!("not cleaning {}: {e:?}", root.display());
                continue;
            }
        };
        let Some(h) = dir_handle(&dir) else { continue };
        let Ok(root_final) = final_path(&h) else {
            continue;
        };
        let mut budget = STALE_SCAN_ENTRIES;
        removed += scan(&dir.path, &root_final, STALE_SCAN_DEPTH, &mut budget);
    }
    removed
}

fn dir_handle(dir: &Dir) -> Option<OwnedHandle> {
    open(
        &super::resolve::wide(&dir.path),
        FILE_READ_ATTRIBUTES,
        FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
    )
    .ok()
}

fn scan(dir: &Path, root_final: &str, depth: usize, budget: &mut usize) -> usize {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            log::debug!("cannot list {}: {e}", dir.display());
            return 0;
        }
    };
    for entry in entries {
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        let Ok(entry) = entry else { continue };
        // DirEntry::metadata does not follow reparse points.
        let Ok(md) = entry.metadata() else { continue };
        let attrs = md.file_attributes();
        if attrs & FILE_ATTRIBUTE_REPARSE_POINT != 0 {
            continue;
        }
        let path = entry.path();
        if attrs & FILE_ATTRIBUTE_DIRECTORY != 0 {
            if depth > 0 {
                removed += scan(&path, root_final, depth - 1, budget);
            }
        } else if is_temp_name(entry.file_name().as_encoded_bytes())
            && remove_if_unlocked(&path, root_final)
        {
            log::info!("removed a stale upload: {}", path.display());
            removed += 1;
        }
    }
    removed
}

fn remove_if_unlocked(path: &Path, root_final: &str) -> bool {
    // Share nothing: fails while a live agent has the file open.
    let Ok(h) = open(
        &super::resolve::wide(path),
        DELETE | FILE_READ_ATTRIBUTES,
        0,
    ) else {
        return false;
    };
    check_regular(&h).is_ok()
        && final_path(&h).is_ok_and(|p| {
            super::resolve::is_below(&p, root_final) && !eq_ignore_case(&p, root_final)
        })
        && delete_by_handle(h.as_raw_handle() as HANDLE).is_ok()
}
