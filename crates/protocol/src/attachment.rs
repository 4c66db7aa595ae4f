//! Binary attachments (protocol 1.1): raw bytes carried in the same frame
//! as a message, after its JSON text and one NUL byte:
//!
//! ```text
//! [N: u32 big-endian][JSON text][0x00][attachment bytes]
//! ```
//!
//! JSON text never contains a raw NUL byte (RFC 8259 requires control
//! characters in strings to be escaped, and NUL is not whitespace), so the
//! first NUL of a body always ends its JSON. Only `file_write` requests and
//! the responses to `file_read` requests with `"attachment": true` carry
//! one: file chunks then cross the wire as they are, with no base64 to
//! encode, scan and decode (docs/protocol.md §3.2).

/// The byte between a body's JSON text and its attachment.
pub const SEPARATOR: u8 = 0;

/// Where a frame body's attachment starts (the index after its separator),
/// if it has one.
pub fn start(body: &[u8]) -> Option<usize> {
    memchr::memchr(SEPARATOR, body).map(|at| at + 1)
}

/// A frame body split into its JSON text and its attachment, if any.
pub fn split(body: &[u8]) -> (&[u8], Option<&[u8]>) {
    match start(body) {
        Some(at) => (&body[..at - 1], Some(&body[at..])),
        None => (body, None),
    }
}

/// The bytes of an attachment, kept in the buffer the frame was read into so
/// that they are never copied on the way to a handler.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attachment {
    buf: Vec<u8>,
    start: usize,
}

impl Attachment {
    /// The attachment of `frame`, which starts at `start` (as found by
    /// [`start`]).
    ///
    /// # Panics
    /// When `start` is past the end of `frame`.
    pub fn from_frame(frame: Vec<u8>, start: usize) -> Self {
        assert!(start <= frame.len(), "attachment start past the frame");
        Self { buf: frame, start }
    }

    /// An attachment of exactly `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self {
            buf: bytes,
            start: 0,
        }
    }

    /// The attached bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Their number.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole buffer the attachment lives in (JSON text included), for
    /// reuse by the next frame.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Attachment({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_the_first_nul() {
        assert_eq!(split(b"{}"), (&b"{}"[..], None));
        assert_eq!(split(b"{}\0"), (&b"{}"[..], Some(&b""[..])));
        assert_eq!(split(b"{}\0a\0b"), (&b"{}"[..], Some(&b"a\0b"[..])));
        assert_eq!(start(b"{}\0ab"), Some(3));
    }

    #[test]
    fn keeps_the_frame_buffer() {
        let a = Attachment::from_frame(b"{}\0abc".to_vec(), 3);
        assert_eq!(a.as_bytes(), b"abc");
        assert_eq!(a.len(), 3);
        assert_eq!(format!("{a:?}"), "Attachment(3 bytes)");
        assert_eq!(a.into_buffer(), b"{}\0abc");
        assert!(Attachment::from_vec(Vec::new()).is_empty());
    }
}
