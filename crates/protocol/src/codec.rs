//! Standard base64 (RFC 4648 §4, with padding) and SHA-256 as the protocol
//! uses them for file contents, shared by the agent and the host client.
//!
//! The functions append to or decode into caller-owned buffers, so a
//! transfer can reuse one buffer per chunk and never copy a chunk twice.
//! base64 is `base64-simd`'s (AVX2 or SSE4.1 when the CPU has them, chosen at
//! run time; scalar otherwise), several times faster than a scalar codec.

use base64_simd::STANDARD;
use sha2::{Digest, Sha256};

/// Why base64 text does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid base64: {0}")]
pub struct Base64Error(String);

/// Bytes `n` bytes take in base64.
pub const fn encoded_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Largest number of bytes `text_len` characters of base64 can hold.
pub const fn decoded_len_max(text_len: usize) -> usize {
    text_len.div_ceil(4) * 3
}

/// Append the base64 of `data` to `out`.
pub fn base64_encode_into(data: &[u8], out: &mut String) {
    STANDARD.encode_append(data, out);
}

/// The base64 of `data`.
pub fn base64_encode(data: &[u8]) -> String {
    STANDARD.encode_to_string(data)
}

/// Decode `text` into `out` (cleared first). Padding is required; no
/// whitespace is allowed.
pub fn base64_decode_into(text: &[u8], out: &mut Vec<u8>) -> Result<(), Base64Error> {
    out.clear();
    STANDARD
        .decode_append(text, out)
        .map_err(|e| Base64Error(e.to_string()))
}

/// Decode `text`.
pub fn base64_decode(text: &[u8]) -> Result<Vec<u8>, Base64Error> {
    let mut out = Vec::new();
    base64_decode_into(text, &mut out)?;
    Ok(out)
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// A running SHA-256 (the `sha2` crate's, which uses the CPU's SHA
/// extensions when present).
#[derive(Clone, Debug, Default)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    /// A fresh hash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The hash of everything added, lower-case hex.
    pub fn finish(self) -> String {
        hex(&self.0.finalize())
    }
}

/// Whether `s` is a SHA-256 as the protocol writes it: 64 lower-case hex
/// digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_rejects() {
        for n in 0..70usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let mut text = String::new();
            base64_encode_into(&data, &mut text);
            assert_eq!(text.len(), encoded_len(n));
            assert_eq!(base64_decode(text.as_bytes()).unwrap(), data);
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        for bad in ["aGVsbG8", "aGVs bG8=", "aGVsbG8==", "a===", "aGVs\nbG8="] {
            assert!(base64_decode(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sha256_vectors() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut s = Sha256Stream::new();
        s.update(b"ab");
        s.update(b"c");
        assert_eq!(s.finish(), sha256_hex(b"abc"));
        assert!(is_sha256_hex(&sha256_hex(b"abc")));
        assert!(!is_sha256_hex(&sha256_hex(b"abc").to_uppercase()));
    }
}
