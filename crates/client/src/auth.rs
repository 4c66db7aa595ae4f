//! [`AuthKey`]: the shared key that signs requests and verifies the agent's
//! responses and `agent_ready` when the agent has authentication on
//! (docs/protocol.md, "Authentication").

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_agent_protocol::auth::{Key, KeyError, NONCE_BYTES};

/// A shared key for authenticated requests. `Debug` never shows it.
#[derive(Clone, Debug)]
pub struct AuthKey(pub(crate) Key);

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthKeyError {
    /// The file could not be read.
    #[error("cannot read the key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("the key file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: KeyError,
    },
}

impl AuthKey {
    /// Read a key file: the key as hex digits (at least 64, i.e. 32 bytes),
    /// surrounding whitespace ignored; the same file format as the agent's
    /// `security.hmac_key_file`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, AuthKeyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| AuthKeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_hex(&text).map_err(|source| AuthKeyError::Invalid {
            path: path.to_owned(),
            source,
        })
    }

    /// A key from its hex text.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        Key::from_hex(text).map(Self)
    }

    /// A key from raw bytes (at least 32).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        Key::from_bytes(bytes).map(Self)
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// 16 fresh random bytes: from the kernel's random source where there is
/// one; otherwise from std's randomly keyed hasher over the clock and a
/// counter (a nonce must be unique, not secret).
pub(crate) fn random_nonce() -> [u8; NONCE_BYTES] {
    let mut out = [0u8; NONCE_BYTES];
    #[cfg(unix)]
    {
        use std::io::Read;
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut out))
            .is_ok()
        {
            return out;
        }
    }
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for half in out.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u128(nanos);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}
