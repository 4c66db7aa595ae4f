//! `copy_to_guest`, `copy_from_guest` and the chunked `file_*` methods.

use serde::{Deserialize, Serialize};

/// Params of `copy_to_guest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyToGuestParams {
    /// Absolute path inside an allowed directory.
    pub path: String,
    /// The whole file, standard base64.
    pub content_base64: String,
    /// Replace an existing file.
    #[serde(default)]
    pub overwrite: bool,
    /// Permission bits of the new file (default 0o600 = 384).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Create missing parent directories inside the allowed directory.
    #[serde(default)]
    pub create_parents: bool,
    /// Expected sha256, lower-case hex; the file is committed only on a match.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Owner of the new file (only when the agent runs as root; default:
    /// the agent's user).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group of the new file (only when the agent runs as root; default:
    /// the agent's group).
    #[serde(default)]
    pub gid: Option<u32>,
}

/// A file written and committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCommitted {
    /// The path written.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, lower-case hex.
    pub sha256: String,
}

/// Params of `copy_from_guest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyFromGuestParams {
    /// Absolute path inside an allowed directory.
    pub path: String,
}

/// Result of `copy_from_guest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileContent {
    /// The whole file, standard base64.
    pub content_base64: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, lower-case hex.
    pub sha256: String,
}

/// Direction of a file handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Read an existing file.
    Read,
    /// Write a new file (or replace one, with `overwrite`).
    Write,
}

/// Params of `file_open`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOpenParams {
    /// Absolute path inside an allowed directory.
    pub path: String,
    /// `read` or `write`.
    pub access: Access,
    /// Writing: replace an existing file.
    #[serde(default)]
    pub overwrite: bool,
    /// Writing: permission bits of the new file (default 0o600 = 384).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Writing: create missing parent directories inside the allowed directory.
    #[serde(default)]
    pub create_parents: bool,
    /// Writing: owner of the new file (only when the agent runs as root).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Writing: group of the new file (only when the agent runs as root).
    #[serde(default)]
    pub gid: Option<u32>,
    /// Writing: continue an unfinished upload to the same path (its handle
    /// is returned, with `size` = the bytes it holds contiguously from
    /// offset 0); a new upload is started when there is none.
    #[serde(default)]
    pub resume: bool,
}

/// Result of `file_open`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOpened {
    /// Handle for the other `file_*` methods.
    pub handle: u64,
    /// Reading: the file's size when opened. Writing: `null` for a new
    /// upload; for a resumed one, the bytes it holds contiguously from
    /// offset 0 (continue from there).
    pub size: Option<u64>,
}

/// Params of `file_read`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReadParams {
    /// A read handle.
    pub handle: u64,
    /// Byte offset to read from.
    pub offset: u64,
    /// Bytes to read, at most `max_chunk_bytes`.
    pub length: u32,
    /// Return the bytes as an attachment of the response instead of
    /// `data_base64` (protocol 1.1; see [`crate::attachment`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attachment: bool,
}

/// Result of `file_read`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChunk {
    /// The bytes read, standard base64 (fewer than asked only at end of
    /// file); absent when they come as the response's attachment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// The read reached the end of the file.
    pub eof: bool,
}

/// Params of `file_write`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWriteParams {
    /// A write handle.
    pub handle: u64,
    /// Byte offset to write at.
    pub offset: u64,
    /// The bytes, standard base64, at most `max_chunk_bytes` decoded.
    /// Absent when the bytes come as the request's attachment instead
    /// (exactly one of the two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// The request's attachment, when it has one (not a JSON member: the
    /// receiver puts it here after decoding the params).
    #[serde(skip)]
    pub attachment: Option<crate::attachment::Attachment>,
}

/// Result of `file_write`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWritten {
    /// Bytes written.
    pub written: u64,
}

/// Params of `file_close`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCloseParams {
    /// The handle.
    pub handle: u64,
    /// Writing: discard the upload instead of committing it.
    #[serde(default)]
    pub abort: bool,
    /// Writing: expected size; the file is committed only on a match.
    #[serde(default)]
    pub size: Option<u64>,
    /// Writing: expected sha256, lower-case hex; committed only on a match.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// Result of `file_close`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileClosed {
    /// Size of the whole file.
    pub size: u64,
    /// sha256 of the whole file, lower-case hex.
    pub sha256: String,
    /// Writing: the file was renamed into place (false after `abort`).
    pub committed: bool,
}
