//! Framing: a 4-byte big-endian length `N`, then `N` bytes of UTF-8 JSON.
//!
//! [`FrameDecoder`] is a push decoder with no I/O of its own: the caller hands
//! it whatever bytes arrived and gets back complete frames. A frame whose
//! declared length exceeds the limit is reported once, as soon as its header
//! is seen, and its body is then skipped without being buffered, so a hostile
//! length costs no memory and the stream stays in sync.

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default largest frame body, in bytes (16 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;

/// Smallest limit either side accepts: every single request and response of
/// fixed size fits in it (a reply too large for the limit, such as the answer
/// to a long batch, is replaced by a `payload_too_large` error).
pub const MIN_MAX_FRAME_BYTES: u32 = 4096;

/// What the decoder produced from the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// One complete frame body (possibly empty).
    Frame(Vec<u8>),
    /// A header announced `len` bytes, more than `max`. The body is being
    /// skipped; this is reported once per such frame.
    TooLarge {
        /// The length the header announced.
        len: u32,
        /// The limit in force.
        max: u32,
    },
}

#[derive(Debug)]
enum State {
    Header { buf: [u8; HEADER_LEN], got: usize },
    Body { buf: Vec<u8>, len: usize },
    Skip { remaining: usize },
}

/// Incremental frame decoder. Feed it with [`FrameDecoder::decode`].
#[derive(Debug)]
pub struct FrameDecoder {
    max: u32,
    state: State,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: u32) -> Self {
        Self {
            max: max_frame_bytes,
            state: State::Header {
                buf: [0; HEADER_LEN],
                got: 0,
            },
        }
    }

    /// The limit this decoder enforces.
    pub fn max_frame_bytes(&self) -> u32 {
        self.max
    }

    /// Forget any partial frame: the peer went away and the next bytes start
    /// a fresh stream.
    pub fn reset(&mut self) {
        self.state = State::Header {
            buf: [0; HEADER_LEN],
            got: 0,
        };
    }

    /// True when no partial frame is pending.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header { got: 0, .. })
    }

    /// Consume bytes from `input`. Returns how many bytes were used and, when
    /// a frame completed or an oversized header was seen, that event. Call
    /// again with the rest of the input until it is used up.
    pub fn decode(&mut self, input: &[u8]) -> (usize, Option<Decoded>) {
        let mut used = 0;
        loop {
            match &mut self.state {
                State::Header { buf, got } => {
                    let take = (HEADER_LEN - *got).min(input.len() - used);
                    buf[*got..*got + take].copy_from_slice(&input[used..used + take]);
                    *got += take;
                    used += take;
                    if *got < HEADER_LEN {
                        return (used, None);
                    }
                    let len = u32::from_be_bytes(*buf);
                    if len > self.max {
                        self.state = State::Skip {
                            remaining: len as usize,
                        };
                        return (used, Some(Decoded::TooLarge { len, max: self.max }));
                    }
                    if len == 0 {
                        self.reset();
                        return (used, Some(Decoded::Frame(Vec::new())));
                    }
                    // Grow with the data actually received rather than
                    // trusting the header with a large allocation up front.
                    let initial = (len as usize).min(input.len() - used).max(64);
                    self.state = State::Body {
                        buf: Vec::with_capacity(initial),
                        len: len as usize,
                    };
                }
                State::Body { buf, len } => {
                    let take = (*len - buf.len()).min(input.len() - used);
                    buf.extend_from_slice(&input[used..used + take]);
                    used += take;
                    if buf.len() < *len {
                        return (used, None);
                    }
                    let frame = std::mem::take(buf);
                    self.reset();
                    return (used, Some(Decoded::Frame(frame)));
                }
                State::Skip { remaining } => {
                    let take = (*remaining).min(input.len() - used);
                    *remaining -= take;
                    used += take;
                    if *remaining > 0 {
                        return (used, None);
                    }
                    self.reset();
                }
            }
        }
    }

    /// While a body is being collected: the bytes still missing. Lets a
    /// reader size its next read to land a large frame in few system calls.
    pub fn body_bytes_missing(&self) -> Option<usize> {
        match &self.state {
            State::Body { buf, len } => Some(len - buf.len()),
            _ => None,
        }
    }

    /// While a body is being collected, a buffer with room for at least
    /// `want` more bytes, to read into directly (skipping one copy for large
    /// frames). Commit what was read with [`FrameDecoder::commit_body`].
    pub fn body_spare(&mut self, want: usize) -> Option<&mut Vec<u8>> {
        match &mut self.state {
            State::Body { buf, len } => {
                let want = want.min(*len - buf.len());
                buf.reserve(want);
                Some(buf)
            }
            _ => None,
        }
    }

    /// After bytes were appended to the vector from
    /// [`FrameDecoder::body_spare`]: the completed frame, if it is complete.
    pub fn commit_body(&mut self) -> Option<Decoded> {
        match &mut self.state {
            State::Body { buf, len } if buf.len() >= *len => {
                debug_assert_eq!(buf.len(), *len, "read past the frame body");
                let frame = std::mem::take(buf);
                self.reset();
                Some(Decoded::Frame(frame))
            }
            _ => None,
        }
    }
}

/// Write the length prefix for a body of `len` bytes.
pub fn header(len: u32) -> [u8; HEADER_LEN] {
    len.to_be_bytes()
}

/// Prefix `body` with its length.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header(body.len() as u32));
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_events(dec: &mut FrameDecoder, mut input: &[u8]) -> Vec<Decoded> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (used, ev) = dec.decode(input);
            input = &input[used..];
            out.extend(ev);
            assert!(used > 0 || input.is_empty());
        }
        out
    }

    #[test]
    fn decodes_back_to_back_frames() {
        let mut bytes = encode(b"{\"a\":1}");
        bytes.extend(encode(b""));
        bytes.extend(encode(b"xyz"));
        let mut dec = FrameDecoder::new(1024);
        assert_eq!(
            all_events(&mut dec, &bytes),
            vec![
                Decoded::Frame(b"{\"a\":1}".to_vec()),
                Decoded::Frame(vec![]),
                Decoded::Frame(b"xyz".to_vec())
            ]
        );
        assert!(dec.is_idle());
    }

    #[test]
    fn decodes_one_byte_at_a_time() {
        let bytes = [encode(b"hello"), encode(b"world")].concat();
        let mut dec = FrameDecoder::new(1024);
        let mut events = Vec::new();
        for b in &bytes {
            let (used, ev) = dec.decode(std::slice::from_ref(b));
            assert_eq!(used, 1);
            events.extend(ev);
        }
        assert_eq!(
            events,
            vec![
                Decoded::Frame(b"hello".to_vec()),
                Decoded::Frame(b"world".to_vec())
            ]
        );
    }

    #[test]
    fn oversized_frame_is_reported_once_and_skipped() {
        let mut bytes = header(5000).to_vec();
        bytes.extend(std::iter::repeat_n(b'x', 5000));
        bytes.extend(encode(b"ok"));
        let mut dec = FrameDecoder::new(4096);
        assert_eq!(
            all_events(&mut dec, &bytes),
            vec![
                Decoded::TooLarge {
                    len: 5000,
                    max: 4096
                },
                Decoded::Frame(b"ok".to_vec())
            ]
        );
    }

    #[test]
    fn oversized_header_allocates_nothing() {
        let mut dec = FrameDecoder::new(4096);
        let (_, ev) = dec.decode(&header(u32::MAX));
        assert_eq!(
            ev,
            Some(Decoded::TooLarge {
                len: u32::MAX,
                max: 4096
            })
        );
        assert!(dec.body_bytes_missing().is_none());
    }

    #[test]
    fn frame_at_exactly_the_limit_is_accepted() {
        let body = vec![b'a'; 4096];
        let mut dec = FrameDecoder::new(4096);
        assert_eq!(
            all_events(&mut dec, &encode(&body)),
            vec![Decoded::Frame(body)]
        );
    }

    #[test]
    fn reset_drops_a_partial_frame() {
        let mut dec = FrameDecoder::new(1024);
        let partial = &encode(b"truncated")[..7];
        assert!(all_events(&mut dec, partial).is_empty());
        assert!(!dec.is_idle());
        dec.reset();
        assert_eq!(
            all_events(&mut dec, &encode(b"fresh")),
            vec![Decoded::Frame(b"fresh".to_vec())]
        );
    }

    #[test]
    fn direct_body_reads_complete_the_frame() {
        let mut dec = FrameDecoder::new(1 << 20);
        let (used, ev) = dec.decode(&header(10));
        assert_eq!((used, ev), (4, None));
        assert_eq!(dec.body_bytes_missing(), Some(10));
        dec.body_spare(10).unwrap().extend_from_slice(b"0123");
        assert_eq!(dec.commit_body(), None);
        dec.body_spare(6).unwrap().extend_from_slice(b"456789");
        assert_eq!(
            dec.commit_body(),
            Some(Decoded::Frame(b"0123456789".to_vec()))
        );
        assert!(dec.is_idle());
    }
}
