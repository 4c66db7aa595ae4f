//! The QGA byte stream: JSON objects back to back, no framing.
//!
//! A host writes `{"execute": ...}` objects one after another, with or
//! without whitespace between them, in pieces of any size. [`Splitter`]
//! finds where each message ends without parsing it: it tracks the nesting
//! of `{}`/`[]` and whether it is inside a string. What it hands over is
//! then parsed as JSON by the caller.
//!
//! Rules:
//! - A message starts with `{` or `[` at the top level and ends where its
//!   nesting returns to zero.
//! - Anything else at the top level other than whitespace is a *bad run*:
//!   the bytes up to the next whitespace, `{`, `[` or 0xFF (a string, a
//!   number, a stray `}`...). A run earns exactly one error, reported when
//!   it starts, however long it is; further runs before the next message
//!   or 0xFF earn none (`} } } }` is one error, not four).
//! - A message longer than the size limit earns one error when it crosses
//!   the limit; its remaining bytes are skipped without being kept (the
//!   nesting is still followed, to find its end).
//! - A 0xFF byte (never valid in UTF-8 JSON) drops whatever is partly read
//!   and starts afresh: a host resynchronises by sending it, then
//!   `guest-sync-delimited`.
//! - Memory: at most the size limit per connection, whatever arrives.

/// What one call to [`Splitter::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete message (bytes from its `{` or `[` to the matching close).
    Message(Vec<u8>),
    /// Bytes at the top level that cannot start a message.
    BadRun,
    /// A message went past the size limit; its rest is skipped.
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// A message nests deeper than [`MAX_DEPTH`]; its rest is skipped.
    TooDeep,
}

/// Deepest nesting of a message (QEMU's JSON parser allows as much).
pub const MAX_DEPTH: u32 = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between messages.
    Top,
    /// Inside a bad run at the top level.
    Bad {
        /// The run started with `"`: spaces inside it do not end it.
        in_string: bool,
        escaped: bool,
    },
    /// Inside a message (`keep`: still buffering it; else skipping).
    Message {
        depth: u32,
        in_string: bool,
        escaped: bool,
        keep: bool,
    },
}

/// Cuts a byte stream into messages.
#[derive(Debug)]
pub struct Splitter {
    state: State,
    buf: Vec<u8>,
    limit: usize,
    /// A bad run was reported and no message has started since.
    quiet: bool,
}

impl Splitter {
    /// A splitter refusing messages longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            state: State::Top,
            buf: Vec::new(),
            limit,
            quiet: false,
        }
    }

    /// Whether nothing is partly read (a new connection may start here).
    pub fn is_idle(&self) -> bool {
        self.state == State::Top
    }

    /// Forget anything partly read (a new host connected).
    pub fn reset(&mut self) {
        self.state = State::Top;
        self.buf = Vec::new();
        self.quiet = false;
    }

    /// Consume bytes from `input` up to and including the first event, and
    /// return how many were used with that event (`None`: all were used and
    /// no event happened). Call again with the rest.
    pub fn push(&mut self, input: &[u8]) -> (usize, Option<Event>) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            i += 1;
            if b == 0xFF {
                self.reset();
                continue;
            }
            match &mut self.state {
                State::Top => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' | b'[' => {
                        self.quiet = false;
                        self.buf.clear();
                        self.buf.push(b);
                        self.state = State::Message {
                            depth: 1,
                            in_string: false,
                            escaped: false,
                            keep: true,
                        };
                    }
                    _ => {
                        self.state = State::Bad {
                            in_string: b == b'"',
                            escaped: false,
                        };
                        if !self.quiet {
                            self.quiet = true;
                            return (i, Some(Event::BadRun));
                        }
                    }
                },
                State::Bad { in_string, escaped } => {
                    if *in_string {
                        if *escaped {
                            *escaped = false;
                        } else if b == b'\\' {
                            *escaped = true;
                        } else if b == b'"' {
                            *in_string = false;
                        }
                    } else {
                        match b {
                            b' ' | b'\t' | b'\r' | b'\n' => self.state = State::Top,
                            b'{' | b'[' => {
                                // A message may follow garbage directly.
                                self.state = State::Top;
                                i -= 1;
                            }
                            b'"' => *in_string = true,
                            _ => {}
                        }
                    }
                }
                State::Message {
                    depth,
                    in_string,
                    escaped,
                    keep,
                } => {
                    let mut done = false;
                    if *in_string {
                        if *escaped {
                            *escaped = false;
                        } else if b == b'\\' {
                            *escaped = true;
                        } else if b == b'"' {
                            *in_string = false;
                        }
                    } else {
                        match b {
                            b'"' => *in_string = true,
                            b'{' | b'[' => {
                                *depth = depth.saturating_add(1);
                                if *depth == MAX_DEPTH + 1 && *keep {
                                    *keep = false;
                                    self.buf = Vec::new();
                                    return (i, Some(Event::TooDeep));
                                }
                            }
                            b'}' | b']' => {
                                *depth -= 1;
                                done = *depth == 0;
                            }
                            _ => {}
                        }
                    }
                    if *keep {
                        if self.buf.len() >= self.limit {
                            *keep = false;
                            self.buf = Vec::new();
                            if done {
                                self.state = State::Top;
                            }
                            return (i, Some(Event::TooLarge { limit: self.limit }));
                        }
                        self.buf.push(b);
                    }
                    if done {
                        let kept = *keep;
                        self.state = State::Top;
                        if kept {
                            let message = std::mem::take(&mut self.buf);
                            return (i, Some(Event::Message(message)));
                        }
                    }
                }
            }
        }
        (i, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event from feeding `chunks` one after another.
    fn events(limit: usize, chunks: &[&[u8]]) -> Vec<Event> {
        let mut s = Splitter::new(limit);
        let mut out = Vec::new();
        for chunk in chunks {
            let mut rest = *chunk;
            loop {
                let (used, event) = s.push(rest);
                rest = &rest[used..];
                match event {
                    Some(e) => out.push(e),
                    None => break,
                }
            }
        }
        out
    }

    fn msg(s: &str) -> Event {
        Event::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn back_to_back_and_split() {
        let two = br#"{"execute":"a"}{"execute":"b","arguments":{"x":"}{"}}"#;
        assert_eq!(
            events(1024, &[two]),
            [
                msg(r#"{"execute":"a"}"#),
                msg(r#"{"execute":"b","arguments":{"x":"}{"}}"#)
            ]
        );
        let bytes: Vec<&[u8]> = two.chunks(1).collect();
        assert_eq!(events(1024, &bytes).len(), 2);
        let escaped = br#" {"a":"\"}\\"} "#;
        assert_eq!(events(1024, &[escaped]), [msg(r#"{"a":"\"}\\"}"#)]);
        assert_eq!(events(1024, &[b"[1,[2]]\n"]), [msg("[1,[2]]")]);
    }

    #[test]
    fn one_error_per_bad_run_and_a_message_right_after() {
        assert_eq!(
            events(1024, &[b"}}} xyz \"a b\" 42{\"e\":1} x {} x"]),
            [
                Event::BadRun,
                msg("{\"e\":1}"),
                Event::BadRun,
                msg("{}"),
                Event::BadRun
            ]
        );
        let run: Vec<u8> = std::iter::repeat_n(b'x', 100_000).collect();
        assert_eq!(events(16, &[&run, b"\n{}"]), [Event::BadRun, msg("{}")]);
    }

    #[test]
    fn ff_resets_the_parser() {
        assert_eq!(
            events(1024, &[b"{\"execute\":\"gue", &[0xFF], b"{\"x\":1}"]),
            [msg("{\"x\":1}")]
        );
        // Inside a bad run, and inside a string.
        assert_eq!(
            events(1024, &[b"garbage\xff{\"a\":\"\xff{}"]),
            [Event::BadRun, msg("{}")]
        );
    }

    #[test]
    fn too_large_is_one_error_and_the_rest_is_skipped_unkept() {
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'{', 10_000));
        big.extend_from_slice(b"\"}");
        let mut s = Splitter::new(64);
        let (used, e) = s.push(&big);
        assert_eq!(e, Some(Event::TooLarge { limit: 64 }));
        assert_eq!(s.push(&big[used..]), (big.len() - used, None));
        assert!(s.buf.capacity() == 0 && s.is_idle());
        assert_eq!(events(64, &[&big, b"{}"]).len(), 2);
        // Exactly at the limit is fine.
        assert_eq!(events(2, &[b"{}"]), [msg("{}")]);
        assert_eq!(events(1, &[b"{}{}"]).len(), 2);
    }

    #[test]
    fn too_deep_is_one_error_at_once() {
        let deep: Vec<u8> = std::iter::repeat_n(b'[', 5000).collect();
        assert_eq!(events(1 << 20, &[&deep]), [Event::TooDeep]);
        let mut ok: Vec<u8> = std::iter::repeat_n(b'[', 1024).collect();
        ok.extend(std::iter::repeat_n(b']', 1024));
        assert_eq!(events(1 << 20, &[&ok]).len(), 1);
        assert!(matches!(events(1 << 20, &[&ok])[0], Event::Message(_)));
    }

    #[test]
    fn reset_drops_a_half_message() {
        let mut s = Splitter::new(64);
        assert_eq!(s.push(b"{\"execute\":"), (11, None));
        assert!(!s.is_idle());
        s.reset();
        assert_eq!(s.push(b"{}"), (2, Some(msg("{}"))));
    }
}
