//! Authentication of requests (optional; off unless
//! `security.hmac_key_file` is set): the shared keys, the clock check and the
//! replay cache. The canonical forms and the MAC are the protocol crate's
//! ([`kvm_agent_protocol::auth`]), shared with the host client.
//!
//! [`crate::dispatch::admit`] calls [`Authenticator::check`] first, before
//! the method or params are looked at.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kvm_agent_protocol::auth::{self, Failure, Key, KeyError, ResponseSigner};
pub use kvm_agent_protocol::auth::{now_ms, random_nonce};
use kvm_agent_protocol::jsonrpc::Request;
use kvm_agent_protocol::{ErrorCode, ErrorObject};
use serde_json::json;

use crate::config::SecuritySection;

/// Nonces remembered at most. When the cache is full of nonces still inside
/// the window, authenticated requests are refused with -32009 until some
/// expire.
pub const REPLAY_CACHE_CAPACITY: usize = 100_000;

/// Why the key files cannot be used: the agent refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        /// `security.hmac_key_file` or `security.hmac_previous_key_file`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Someone other than root (or the agent's user) could read or change it.
    #[error("{key}: refusing key file {path}: it {problem}; {remedy}")]
    Insecure {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with its ownership, mode or ACL.
        problem: String,
        /// What it must be instead, and how (`platform::guard_remedy`).
        remedy: String,
    },
    /// The file does not hold a usable key.
    #[error("{key}: {path}: {source} (generate one with: openssl rand -hex 32 > {path})")]
    Invalid {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with the key.
        source: KeyError,
    },
}

/// The authentication state of the agent: keys, allowed skew, replay cache.
#[derive(Debug)]
pub struct Authenticator {
    /// Current key first, then the previous one (rotation). Empty: off.
    keys: Vec<Key>,
    max_skew_ms: u64,
    seen: Mutex<ReplayCache>,
}

/// Why [`Authenticator::check`] refuses a request.
#[derive(Debug)]
pub enum Refused {
    /// -32008: missing, malformed, bad MAC, stale, replayed. Never signed.
    Failed(Failure),
    /// -32009: the request is authentic but the replay cache is full. The
    /// reply is signed.
    CacheFull(ResponseSigner),
}

impl Refused {
    /// The reply.
    pub fn error(&self) -> ErrorObject {
        match self {
            Refused::Failed(f) => f.error(),
            Refused::CacheFull(_) => {
                ErrorObject::with_message(ErrorCode::Busy, "Busy: replay_cache reached")
                    .data(json!({ "limit": "replay_cache", "value": REPLAY_CACHE_CAPACITY }))
            }
        }
    }
}

impl Authenticator {
    /// Authentication off: every request passes, nothing is signed.
    pub fn off() -> Self {
        Self::with_keys(Vec::new(), 0)
    }

    /// Authentication with these keys (current first), `max_skew_seconds`
    /// either side of the agent's clock.
    pub fn with_keys(keys: Vec<Key>, max_skew_seconds: u64) -> Self {
        Self {
            keys,
            max_skew_ms: max_skew_seconds.saturating_mul(1000),
            seen: Mutex::new(ReplayCache::default()),
        }
    }

    /// Read the key files the configuration names (none: off).
    pub fn from_config(security: &SecuritySection) -> Result<Self, KeyFileError> {
        let mut keys = Vec::new();
        if let Some(path) = &security.hmac_key_file {
            keys.push(load_key("security.hmac_key_file", path)?);
            if let Some(prev) = &security.hmac_previous_key_file {
                keys.push(load_key("security.hmac_previous_key_file", prev)?);
            }
        }
        Ok(Self::with_keys(keys, security.hmac_max_skew_seconds))
    }

    /// Whether requests must be authenticated.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The keys, current first (empty: off): `agent_ready` is signed with
    /// each.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// Check a request now. `Ok(None)`: authentication is off;
    /// `Ok(Some(signer))`: authentic, and the signer signs its response.
    pub fn check(&self, req: &Request) -> Result<Option<ResponseSigner>, Refused> {
        self.check_at(req, now_ms())
    }

    /// [`Authenticator::check`] with the clock given.
    pub fn check_at(&self, req: &Request, now_ms: u64) -> Result<Option<ResponseSigner>, Refused> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let v = auth::verify_request(&self.keys, req, now_ms, self.max_skew_ms)
            .map_err(Refused::Failed)?;
        let signer = ResponseSigner::new(
            self.keys[v.key_index].clone(),
            req.raw_id
                .as_deref()
                .map(|r| r.get().to_owned())
                .unwrap_or_default(),
            v.nonce.clone(),
        );
        let expires = v.ts.saturating_add(self.max_skew_ms);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.insert(v.nonce, expires, now_ms) {
            Ok(()) => Ok(Some(signer)),
            Err(CacheError::Replayed) => Err(Refused::Failed(Failure::Replayed)),
            Err(CacheError::Stale) => Err(Refused::Failed(Failure::Stale)),
            Err(CacheError::Full) => Err(Refused::CacheFull(signer)),
        }
    }
}

/// Nonces seen, each until its request's `ts` + skew has passed (after that
/// a request with that `ts` is stale anyway).
#[derive(Debug, Default)]
struct ReplayCache {
    expiry: HashMap<String, u64>,
    by_expiry: BinaryHeap<Reverse<(u64, String)>>,
    /// The latest clock reading seen: if the clock steps back, requests
    /// whose nonces were already forgotten are still refused as stale.
    high_water_ms: u64,
}

enum CacheError {
    Replayed,
    Stale,
    Full,
}

impl ReplayCache {
    fn insert(&mut self, nonce: String, expires: u64, now_ms: u64) -> Result<(), CacheError> {
        self.high_water_ms = self.high_water_ms.max(now_ms);
        while let Some(Reverse((e, _))) = self.by_expiry.peek() {
            if *e >= self.high_water_ms {
                break;
            }
            if let Some(Reverse((_, n))) = self.by_expiry.pop() {
                self.expiry.remove(&n);
            }
        }
        if expires < self.high_water_ms {
            return Err(CacheError::Stale);
        }
        if self.expiry.contains_key(&nonce) {
            return Err(CacheError::Replayed);
        }
        if self.expiry.len() >= REPLAY_CACHE_CAPACITY {
            return Err(CacheError::Full);
        }
        self.expiry.insert(nonce.clone(), expires);
        self.by_expiry.push(Reverse((expires, nonce)));
        Ok(())
    }
}

fn load_key(key: &'static str, path: &Path) -> Result<Key, KeyFileError> {
    check_key_file(key, path)?;
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        key,
        path: path.to_owned(),
        source,
    })?;
    Key::from_hex(&text).map_err(|source| KeyFileError::Invalid {
        key,
        path: path.to_owned(),
        source,
    })
}

/// A key file must be a regular file that nobody but the administrators (or
/// the agent's own account, for development) can read or change.
fn check_key_file(key: &'static str, path: &Path) -> Result<(), KeyFileError> {
    use crate::platform::{self, Guard, GuardError};
    platform::check_guarded(path, Guard::ReadOrChange).map_err(|e| match e {
        GuardError::Read(source) => KeyFileError::Read {
            key,
            path: path.to_owned(),
            source,
        },
        GuardError::Insecure(problem) => KeyFileError::Insecure {
            key,
            path: path.to_owned(),
            problem,
            remedy: platform::guard_remedy(Guard::ReadOrChange, path),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_agent_protocol::jsonrpc::{parse_frame, Id, Incoming};

    const NOW: u64 = 1_700_000_000_000;

    fn key(first: u8) -> Key {
        Key::from_bytes(&(first..first + 32).collect::<Vec<u8>>()).unwrap()
    }

    fn signed(k: &Key, ts: u64, nonce: &[u8; 16]) -> Request {
        let mut out = Vec::new();
        auth::write_signed_request::<serde_json::Value>(
            &mut out,
            k,
            Some(&Id::from(1)),
            "ping",
            None,
            ts,
            nonce,
        )
        .unwrap();
        match parse_frame(&out, 16) {
            Incoming::Single(Ok(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    fn failure(r: Result<Option<ResponseSigner>, Refused>) -> Failure {
        match r {
            Err(Refused::Failed(f)) => f,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn off_lets_everything_through() {
        let a = Authenticator::off();
        assert!(!a.is_enabled());
        assert!(matches!(
            a.check_at(&signed(&key(0), 1, &[0; 16]), NOW),
            Ok(None)
        ));
    }

    #[test]
    fn nonces_are_refused_a_second_time_within_the_window() {
        let a = Authenticator::with_keys(vec![key(0)], 300);
        assert!(matches!(
            a.check_at(&signed(&key(0), NOW, &[1; 16]), NOW),
            Ok(Some(_))
        ));
        assert_eq!(
            failure(a.check_at(&signed(&key(0), NOW, &[1; 16]), NOW + 1000)),
            Failure::Replayed
        );
        // Another nonce is fine.
        assert!(a.check_at(&signed(&key(0), NOW, &[2; 16]), NOW).is_ok());
        // A bad MAC with a fresh nonce does not enter the cache.
        assert_eq!(
            failure(a.check_at(&signed(&key(9), NOW, &[3; 16]), NOW)),
            Failure::BadMac
        );
        assert!(a.check_at(&signed(&key(0), NOW, &[3; 16]), NOW).is_ok());
    }

    #[test]
    fn expired_nonces_are_forgotten_and_a_clock_step_back_does_not_revive_them() {
        let a = Authenticator::with_keys(vec![key(0)], 1);
        assert!(a.check_at(&signed(&key(0), NOW, &[1; 16]), NOW).is_ok());
        // Later: the same request is stale, and its nonce pruned.
        assert_eq!(
            failure(a.check_at(&signed(&key(0), NOW, &[1; 16]), NOW + 5000)),
            Failure::Stale
        );
        assert!(a
            .check_at(&signed(&key(0), NOW + 5000, &[4; 16]), NOW + 5000)
            .is_ok());
        assert_eq!(a.seen.lock().unwrap().expiry.len(), 1);
        // The clock steps back: the forgotten nonce is still refused.
        assert_eq!(
            failure(a.check_at(&signed(&key(0), NOW, &[1; 16]), NOW)),
            Failure::Stale
        );
    }

    #[test]
    fn rotation_accepts_the_previous_key_only_when_configured() {
        let old = key(0);
        let new = key(50);
        let rotating = Authenticator::with_keys(vec![new.clone(), old.clone()], 300);
        assert!(rotating.check_at(&signed(&old, NOW, &[1; 16]), NOW).is_ok());
        assert!(rotating.check_at(&signed(&new, NOW, &[2; 16]), NOW).is_ok());
        let rotated = Authenticator::with_keys(vec![new], 300);
        assert_eq!(
            failure(rotated.check_at(&signed(&old, NOW, &[3; 16]), NOW)),
            Failure::BadMac
        );
    }

    #[test]
    fn a_full_cache_answers_busy_signed() {
        let a = Authenticator::with_keys(vec![key(0)], 300);
        {
            let mut seen = a.seen.lock().unwrap();
            for i in 0..REPLAY_CACHE_CAPACITY {
                seen.insert(format!("{i:032x}"), NOW + 300_000, NOW)
                    .unwrap_or_else(|_| panic!("insert {i}"));
            }
        }
        let r = a
            .check_at(&signed(&key(0), NOW, &[7; 16]), NOW)
            .unwrap_err();
        assert!(matches!(r, Refused::CacheFull(_)));
        let e = r.error();
        assert_eq!(e.kind(), Some(ErrorCode::Busy));
        assert_eq!(e.data.unwrap()["limit"], "replay_cache");
        // Once the window has passed, room again.
        assert!(a
            .check_at(&signed(&key(0), NOW + 301_000, &[7; 16]), NOW + 301_000)
            .is_ok());
    }

    #[test]
    fn random_nonces_differ() {
        assert_ne!(random_nonce(), random_nonce());
    }

    #[cfg(unix)]
    #[test]
    fn key_files_must_be_private_and_hold_a_hex_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kva-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hmac.key");
        let hex = auth::to_hex(&(0u8..32).collect::<Vec<_>>());
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        let section = |p: &Path| SecuritySection {
            hmac_key_file: Some(p.to_owned()),
            ..SecuritySection::default()
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Authenticator::from_config(&section(&path)).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, KeyFileError::Insecure { .. }), "{e}");
        assert!(
            msg.contains("security.hmac_key_file") && msg.contains("chmod 600"),
            "{msg}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(Authenticator::from_config(&section(&path)).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let a = Authenticator::from_config(&section(&path)).unwrap();
        assert!(a.is_enabled());
        std::fs::write(&path, &hex[..60]).unwrap();
        let e = Authenticator::from_config(&section(&path)).unwrap_err();
        assert!(matches!(e, KeyFileError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("security.hmac_key_file"), "{e}");
        let e = Authenticator::from_config(&section(&dir.join("absent"))).unwrap_err();
        assert!(matches!(e, KeyFileError::Read { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
