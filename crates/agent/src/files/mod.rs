//! File transfer: the path rules, the race-free resolver, the table of open
//! handles and atomic uploads.
//!
//! - [`path`]: the lexical checks the dispatcher's policy runs for every
//!   file call (absolute, no NUL, no `..`, inside an allowed directory).
//! - [`resolve`]: the race-free resolution beneath the allowed directory
//!   (openat2 with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`,
//!   or an `O_NOFOLLOW` walk from the directory's fd where openat2 is
//!   missing or filtered), and the checks on what it finds.
//! - [`upload`]: temporary files, commit by rename, clean-up at start-up.
//! - [`table`]: open handles, their limits and expiry, and the running
//!   SHA-256 of each transfer.
//!
//! The handlers of the six methods are in [`crate::handlers::files`].
//!
//! On Windows, [`resolve`] and [`upload`] are their Windows versions
//! (`resolve_windows.rs`, `upload_windows.rs`) with the same names: handle
//! based checks instead of file descriptors, a rename by handle instead of
//! `renameat2` (see each module).

pub mod path;
#[cfg(unix)]
pub mod resolve;
#[cfg(windows)]
#[path = "resolve_windows.rs"]
pub mod resolve;
pub mod table;
pub mod temp_name;
#[cfg(unix)]
pub mod upload;
#[cfg(windows)]
#[path = "upload_windows.rs"]
pub mod upload;

#[cfg(test)]
mod test_tree;
#[cfg(all(test, unix))]
mod tests;
#[cfg(test)]
mod tests_upload;
#[cfg(all(test, windows))]
mod tests_windows;

/// Read into `buf` at `offset` (one call; fewer bytes at end of file).
pub fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    #[cfg(unix)]
    return std::os::unix::fs::FileExt::read_at(file, buf, offset);
    #[cfg(windows)]
    return std::os::windows::fs::FileExt::seek_read(file, buf, offset);
}

/// Write all of `data` at `offset`.
pub fn write_all_at(file: &std::fs::File, data: &[u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    return std::os::unix::fs::FileExt::write_all_at(file, data, offset);
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < data.len() {
            match std::os::windows::fs::FileExt::seek_write(
                file,
                &data[done..],
                offset + done as u64,
            ) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

use kvm_agent_protocol::{ErrorCode, ErrorObject, MethodName};
use serde_json::json;

/// Keep the agent's memory bounded under large transfers, whatever the
/// file's size. With glibc: at most two malloc heaps (the blocking pool runs
/// file work on several threads, and per-thread heaps keep what they once
/// held); blocks of 2 MiB and more (the buffers of large chunks) mapped on
/// their own and returned to the kernel when freed; at most 4 MiB kept free
/// at the top of a heap. Smaller blocks (1 MiB chunks, the default of the
/// host tools) are reused from the heap without new page faults. Other C
/// libraries (musl) return large blocks at once. Called once at start-up.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before the agent starts its threads' heavy allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Why a path or the file it names is refused: the `reason` of a -32000
/// error, also written to the audit record. The set is fixed within a major
/// protocol version (docs/protocol.md, "File paths").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The path is empty.
    Empty,
    /// Not absolute.
    Relative,
    /// Contains a NUL character.
    Nul,
    /// Has a `..` component.
    DotDot,
    /// Not inside any of `allowed_file_paths`.
    OutsideAllowed,
    /// Longer than `PATH_MAX`, or a component longer than `NAME_MAX`.
    TooLong,
    /// A symbolic link, anywhere in the path below the allowed directory.
    Symlink,
    /// A component other than the last is not a directory.
    NotADirectory,
    /// A directory where a file is expected (also the allowed directory
    /// itself, and a path ending in `/`).
    Directory,
    /// A FIFO (named pipe).
    Fifo,
    /// A unix socket.
    Socket,
    /// A character or block device.
    Device,
    /// A regular file with more than one hard link.
    HardLink,
    /// The path crosses into another file system (a mount point below the
    /// allowed directory).
    MountCrossing,
    /// The allowed directory itself is a symbolic link or not a directory.
    RootNotDirectory,
    /// The name is one the agent uses for its temporary files.
    ReservedName,
    /// Windows: a UNC path (`\\server\share\...`).
    Unc,
    /// Windows: a device or namespace path (`\\?\`, `\\.\`, `\??\`).
    DevicePath,
    /// Windows: an alternate data stream (a `:` after the drive).
    Stream,
    /// Windows: a reserved device name (`CON`, `NUL`, `COM1`, ...) as a
    /// component, with any extension.
    DeviceName,
    /// Windows: a name ending in a dot or a space (Win32 strips them).
    TrailingDotOrSpace,
    /// Windows: a name that may be an 8.3 short name (`~` and a digit).
    ShortName,
    /// Windows: a character no Windows name may hold (`<>"|?*`, controls).
    InvalidCharacter,
    /// Windows: a reparse point other than a symbolic link or a junction.
    ReparsePoint,
}

impl Reason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Empty => "empty",
            Reason::Relative => "relative",
            Reason::Nul => "nul",
            Reason::DotDot => "dotdot",
            Reason::OutsideAllowed => "outside_allowed",
            Reason::TooLong => "too_long",
            Reason::Symlink => "symlink",
            Reason::NotADirectory => "not_a_directory",
            Reason::Directory => "directory",
            Reason::Fifo => "fifo",
            Reason::Socket => "socket",
            Reason::Device => "device",
            Reason::HardLink => "hard_link",
            Reason::MountCrossing => "mount_crossing",
            Reason::RootNotDirectory => "root_not_directory",
            Reason::ReservedName => "reserved_name",
            Reason::Unc => "unc",
            Reason::DevicePath => "device_path",
            Reason::Stream => "stream",
            Reason::DeviceName => "device_name",
            Reason::TrailingDotOrSpace => "trailing_dot_or_space",
            Reason::ShortName => "short_name",
            Reason::InvalidCharacter => "invalid_character",
            Reason::ReparsePoint => "reparse_point",
        }
    }

    /// Every reason, for documentation checks.
    pub const ALL: [Reason; 24] = [
        Reason::Empty,
        Reason::Relative,
        Reason::Nul,
        Reason::DotDot,
        Reason::OutsideAllowed,
        Reason::TooLong,
        Reason::Symlink,
        Reason::NotADirectory,
        Reason::Directory,
        Reason::Fifo,
        Reason::Socket,
        Reason::Device,
        Reason::HardLink,
        Reason::MountCrossing,
        Reason::RootNotDirectory,
        Reason::ReservedName,
        Reason::Unc,
        Reason::DevicePath,
        Reason::Stream,
        Reason::DeviceName,
        Reason::TrailingDotOrSpace,
        Reason::ShortName,
        Reason::InvalidCharacter,
        Reason::ReparsePoint,
    ];

    /// A phrase for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::Empty => "the path is empty",
            Reason::Relative => "the path is not absolute",
            Reason::Nul => "the path contains a NUL character",
            Reason::DotDot => "the path has a '..' component",
            Reason::OutsideAllowed => "the path is outside the allowed directories",
            Reason::TooLong => "the path or one of its names is too long",
            Reason::Symlink => "the path goes through a symbolic link",
            Reason::NotADirectory => "a component of the path is not a directory",
            Reason::Directory => "the path names a directory, not a file",
            Reason::Fifo => "the path names a FIFO",
            Reason::Socket => "the path names a socket",
            Reason::Device => "the path names a device",
            Reason::HardLink => "the file has more than one hard link",
            Reason::MountCrossing => "the path crosses a mount point",
            Reason::RootNotDirectory => {
                "the allowed directory is a symbolic link or not a directory"
            }
            Reason::ReservedName => "the name is reserved for the agent's temporary files",
            Reason::Unc => "the path is a UNC path",
            Reason::DevicePath => "the path is a device or namespace path",
            Reason::Stream => "the path names an alternate data stream",
            Reason::DeviceName => "the path has a reserved device name",
            Reason::TrailingDotOrSpace => "a name ends in a dot or a space",
            Reason::ShortName => "a name may be an 8.3 short name",
            Reason::InvalidCharacter => "a name has a character Windows does not allow",
            Reason::ReparsePoint => "the path goes through a reparse point",
        }
    }
}

/// The config key path refusals name.
pub const PATH_CONFIG_KEY: &str = "security.allowed_file_paths";

/// Why a file call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// The path is refused: -32000.
    #[error("{method}: {path:?}: {}", reason.describe())]
    Refused {
        /// The method.
        method: MethodName,
        /// The path as given.
        path: String,
        /// Why.
        reason: Reason,
    },
    /// No such file or directory: -32001 `{"path"}`.
    #[error("{path}: no such file or directory")]
    NotFound {
        /// The path.
        path: String,
    },
    /// No such handle: -32001 `{"handle"}`.
    #[error("no file handle {handle}")]
    NoHandle {
        /// The handle.
        handle: u64,
    },
    /// The target exists and `overwrite` is false: -32002.
    #[error("{path} exists and overwrite is false")]
    Exists {
        /// The path.
        path: String,
    },
    /// An OS call failed: -32003.
    #[error("{path}: {detail}")]
    Io {
        /// The path.
        path: String,
        /// errno.
        os_error: i32,
        /// Its text.
        detail: String,
    },
    /// Over a size limit: -32005.
    #[error("{size} bytes is over the limit of {max_bytes}")]
    TooLarge {
        /// The limit.
        max_bytes: u64,
        /// The size asked for.
        size: u64,
    },
    /// A handle limit: -32009.
    #[error("{limit} reached ({value})")]
    Busy {
        /// `max_file_handles_per_connection` or `max_file_handles_total`.
        limit: &'static str,
        /// Its value.
        value: u32,
    },
    /// Params that are well-formed JSON but unusable (bad base64, a read
    /// handle written to, a size or sha256 mismatch at close): -32602.
    #[error("{method}: {reason}")]
    Invalid {
        /// The method.
        method: MethodName,
        /// Machine-readable kind (`base64`, `access`, `size_mismatch`,
        /// `sha256_mismatch`, `mode`, `sha256`).
        kind: &'static str,
        /// Text.
        reason: String,
        /// For mismatches: what the host expected.
        expected: Option<String>,
        /// For mismatches: what the agent has.
        actual: Option<String>,
    },
    /// Not available on this platform: -32006.
    #[error("file transfer is not supported on this platform")]
    Unsupported {
        /// The method.
        method: MethodName,
    },
}

impl FileError {
    /// An I/O error on `path`.
    pub fn io(path: &str, e: &std::io::Error) -> Self {
        FileError::Io {
            path: path.to_owned(),
            os_error: e.raw_os_error().unwrap_or(0),
            detail: e.to_string(),
        }
    }

    /// The refusal reason, when this is one.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            FileError::Refused { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

impl From<&FileError> for ErrorObject {
    fn from(e: &FileError) -> Self {
        match e {
            FileError::Refused {
                method,
                path,
                reason,
            } => ErrorObject::with_message(
                ErrorCode::Denied,
                format!("Denied by policy: {}", reason.describe()),
            )
            .data(json!({
                "method": method.as_str(),
                "config_key": PATH_CONFIG_KEY,
                "path": path,
                "reason": reason.as_str(),
            })),
            FileError::NotFound { path } => {
                ErrorObject::new(ErrorCode::NotFound).data(json!({ "path": path }))
            }
            FileError::NoHandle { handle } => {
                ErrorObject::new(ErrorCode::NotFound).data(json!({ "handle": handle }))
            }
            FileError::Exists { path } => {
                ErrorObject::new(ErrorCode::AlreadyExists).data(json!({ "path": path }))
            }
            FileError::Io {
                path,
                os_error,
                detail,
            } => ErrorObject::new(ErrorCode::Io)
                .data(json!({ "path": path, "os_error": os_error, "detail": detail })),
            FileError::TooLarge { max_bytes, size } => ErrorObject::new(ErrorCode::PayloadTooLarge)
                .data(json!({ "max_bytes": max_bytes, "size": size })),
            FileError::Busy { limit, value } => {
                ErrorObject::with_message(ErrorCode::Busy, format!("Busy: {limit} reached"))
                    .data(json!({ "limit": limit, "value": value }))
            }
            FileError::Invalid {
                method,
                kind,
                reason,
                expected,
                actual,
            } => {
                let mut data = json!({ "method": method.as_str(), "reason": reason, "kind": kind });
                if let Some(x) = expected {
                    data["expected"] = json!(x);
                }
                if let Some(x) = actual {
                    data["actual"] = json!(x);
                }
                ErrorObject::with_message(
                    ErrorCode::InvalidParams,
                    format!("Invalid params: {reason}"),
                )
                .data(data)
            }
            FileError::Unsupported { method } => {
                ErrorObject::new(ErrorCode::Unsupported).data(json!({ "method": method.as_str() }))
            }
        }
    }
}

#[cfg(test)]
mod reason_tests {
    use super::Reason;

    /// Every refusal reason is on the wire, so docs/protocol.md names each.
    #[test]
    fn every_reason_is_documented() {
        let doc = include_str!("../../../../docs/protocol.md");
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        for name in &names {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is not in docs/protocol.md"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}
