//! The names of upload temporaries and the bounds of the start-up sweep,
//! the same on every platform (`upload.rs`, `upload_windows.rs`), and how a
//! commit fails.

use std::hash::{BuildHasher, Hasher};
use std::io;

/// Prefix of the temporary files uploads write before their commit; the
/// resolver refuses paths that name one.
pub const TEMP_PREFIX: &str = ".kva-upload.";
/// Suffix of the temporary files.
pub const TEMP_SUFFIX: &str = ".tmp";
/// How deep below an allowed directory start-up looks for stale temporaries.
pub const STALE_SCAN_DEPTH: usize = 8;
/// How many directory entries start-up looks at per allowed directory.
pub const STALE_SCAN_ENTRIES: usize = 100_000;

/// A new temporary name: the prefix, 16 random lowercase hex digits, the
/// suffix.
pub fn new_temp_name() -> String {
    format!("{TEMP_PREFIX}{:016x}{TEMP_SUFFIX}", random_u64())
}

/// Whether `name` is one of the agent's temporary-file names (on Windows in
/// any case: its names are case-insensitive).
pub fn is_temp_name(name: &[u8]) -> bool {
    let same = |a: &[u8], b: &[u8]| {
        if cfg!(windows) {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    let hex = |b: &u8| {
        matches!(b, b'0'..=b'9' | b'a'..=b'f') || (cfg!(windows) && matches!(b, b'A'..=b'F'))
    };
    let (p, s) = (TEMP_PREFIX.as_bytes(), TEMP_SUFFIX.as_bytes());
    name.len() == p.len() + 16 + s.len()
        && same(&name[..p.len()], p)
        && same(&name[name.len() - s.len()..], s)
        && name[p.len()..p.len() + 16].iter().all(hex)
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// How a commit failed.
#[derive(Debug)]
pub enum CommitError {
    /// The target appeared meanwhile and `overwrite` is false.
    Exists,
    /// An OS call failed.
    Io(io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_names_are_temp_names() {
        let n = new_temp_name();
        assert!(is_temp_name(n.as_bytes()), "{n}");
        assert_ne!(n, new_temp_name());
        assert!(!is_temp_name(b".kva-upload.0123456789abcdef.tm"));
        assert!(!is_temp_name(b".kva-upload.0123456789abcdeg.tmp"));
        assert!(!is_temp_name(b"file.tmp"));
        assert_eq!(
            is_temp_name(b".KVA-UPLOAD.0123456789ABCDEF.TMP"),
            cfg!(windows)
        );
    }
}
