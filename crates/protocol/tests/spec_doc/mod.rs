//! Reading docs/protocol.md: its fenced blocks, what each one is by its info
//! string, and the hex dumps of its frames.
//!
//! Shared by the protocol crate's `spec_examples` test (the examples against
//! the protocol types) and the agent crate's `spec_replies` test (the
//! examples against the running agent), which includes this file with
//! `#[path = "../../protocol/tests/spec_doc/mod.rs"] mod spec_doc;`. It uses
//! nothing but std, so it builds in either crate.

#![allow(dead_code)] // each test uses a different part

use std::path::Path;

/// The specification's text.
pub fn read_doc() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One fenced block of the document.
#[derive(Debug)]
pub struct Block {
    /// 1-based line of the opening fence.
    pub line: usize,
    /// The language, first word of the info string.
    pub lang: String,
    /// The rest of the info string.
    pub tags: Vec<String>,
    /// The content, without the final newline.
    pub body: String,
}

/// Every fenced block, in document order.
pub fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(usize, Vec<String>, Vec<&str>)> = None;
    for (i, line) in doc.lines().enumerate() {
        match &mut open {
            None => {
                if let Some(info) = line.strip_prefix("```") {
                    let words = info.split_whitespace().map(str::to_owned).collect();
                    open = Some((i + 1, words, Vec::new()));
                }
            }
            Some((_, _, body)) if line.trim_end() != "```" => body.push(line),
            Some(_) => {
                let (line, mut words, body) = open.take().expect("open block");
                let lang = if words.is_empty() {
                    String::new()
                } else {
                    words.remove(0)
                };
                out.push(Block {
                    line,
                    lang,
                    tags: words,
                    body: body.join("\n"),
                });
            }
        }
    }
    assert!(open.is_none(), "unclosed fenced block");
    out
}

/// What a block is, from its info string.
#[derive(Debug)]
pub enum Kind {
    /// ```` ```json request ````: a request or a batch, host to agent.
    Request,
    /// ```` ```json response M... ````: one method name (or `error`) per
    /// response of the frame.
    Response(Vec<String>),
    /// ```` ```json error ````: one error response.
    Error,
    /// ```` ```json notification ````: a notification from the agent.
    Notification,
    /// ```` ```hex frame ````: a complete frame holding a valid request.
    HexFrame(Vec<u8>),
    /// ```` ```text malformed ````: a frame body the agent rejects.
    Malformed(Vec<u8>),
    /// ```` ```hex malformed ````: a complete frame the agent rejects.
    MalformedFrame(Vec<u8>),
    /// ```` ```hex oversize ````: the start of a frame above the default limit.
    Oversize(Vec<u8>),
    /// ```` ```text noreply ````: the agent sends nothing.
    NoReply,
    /// ```` ```LANG auth-NAME ````: part of the authentication worked example
    /// (§13.5), checked by `auth_example.rs`; holds `auth-NAME`.
    AuthExample(String),
    /// Not an example (shell commands, configuration, diagrams).
    Unchecked,
}

impl Kind {
    /// Whether this block is an input the next block shows the reply to.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Kind::Malformed(_) | Kind::MalformedFrame(_) | Kind::Oversize(_)
        )
    }
}

/// Classify a block; an example tag the tests do not know is an error, so
/// nothing escapes checking.
pub fn kind(b: &Block) -> Result<Kind, String> {
    let tags: Vec<&str> = b.tags.iter().map(String::as_str).collect();
    Ok(match (b.lang.as_str(), tags.as_slice()) {
        ("json" | "hex" | "text", [t]) if t.starts_with("auth-") => {
            Kind::AuthExample((*t).to_owned())
        }
        ("json", ["request"]) => Kind::Request,
        ("json", ["response", methods @ ..]) if !methods.is_empty() => {
            Kind::Response(methods.iter().map(|m| (*m).to_owned()).collect())
        }
        ("json", ["error"]) => Kind::Error,
        ("json", ["notification"]) => Kind::Notification,
        ("json", _) => return Err(format!("json block with unknown tags {tags:?}")),
        ("hex", ["frame"]) => Kind::HexFrame(hex_bytes(&b.body)?),
        ("hex", ["malformed"]) => Kind::MalformedFrame(hex_bytes(&b.body)?),
        ("hex", ["oversize"]) => Kind::Oversize(hex_bytes(&b.body)?),
        ("hex", _) => return Err(format!("hex block with unknown tags {tags:?}")),
        ("text", ["malformed"]) => Kind::Malformed(b.body.clone().into_bytes()),
        ("text", ["noreply"]) => Kind::NoReply,
        (_, [t, ..]) if ["request", "response", "error", "malformed"].contains(t) => {
            return Err(format!("example tag {t:?} on a {:?} block", b.lang))
        }
        _ => Kind::Unchecked,
    })
}

/// Decode a dump: each line is an offset, up to 16 hex bytes and, between
/// bars, the same bytes as ASCII with `.` for the unprintable ones.
pub fn hex_bytes(dump: &str) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    for line in dump.lines().filter(|l| !l.trim().is_empty()) {
        let (hex, ascii) = line
            .split_once('|')
            .ok_or_else(|| format!("no ASCII column in {line:?}"))?;
        let mut words = hex.split_whitespace();
        let offset = words.next().ok_or("empty dump line")?;
        let offset = usize::from_str_radix(offset.trim_end_matches(':'), 16)
            .map_err(|e| format!("offset {offset:?}: {e}"))?;
        if offset != bytes.len() {
            return Err(format!("offset {offset:#x}, expected {:#x}", bytes.len()));
        }
        let start = bytes.len();
        for w in words {
            bytes.push(u8::from_str_radix(w, 16).map_err(|e| format!("byte {w:?}: {e}"))?);
        }
        let shown: String = bytes[start..]
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        if ascii.trim_end().trim_end_matches('|') != shown {
            return Err(format!("ASCII column {ascii:?} does not show {shown:?}"));
        }
    }
    Ok(bytes)
}

/// The text under `heading` (a whole heading line), up to the next heading
/// of the same or a higher level.
pub fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let level = heading.len() - heading.trim_start_matches('#').len();
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"))
        + heading.len()
        + 2;
    let body = &doc[start..];
    let mut end = 0;
    for line in body.split_inclusive('\n') {
        let hashes = line.len() - line.trim_start_matches('#').len();
        if (1..=level).contains(&hashes) && line[hashes..].starts_with(' ') {
            break;
        }
        end += line.len();
    }
    &body[..end]
}
