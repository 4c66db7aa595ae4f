//! [`AuthKey`]: the shared key that signs requests and verifies the agent's
//! responses and `agent_ready` when the agent has authentication on
//! (docs/protocol.md, "Authentication").

use std::path::{Path, PathBuf};

pub(crate) use kvm_agent_protocol::auth::{now_ms, random_nonce};
use kvm_agent_protocol::auth::{Key, KeyError};

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
