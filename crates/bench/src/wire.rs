//! Minimal blocking clients for both agents, written for the benchmark so
//! that both sides pay the same client costs: one unix stream, a buffered
//! reader, requests written as prepared text.
//!
//! - [`Kva`]: our agent's frames (4-byte big-endian length, JSON-RPC 2.0).
//! - [`Qga`]: qemu-guest-agent's stream of JSON objects, one answer a line.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Bound on every blocking read and write of these clients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(300);

fn open(path: &Path) -> io::Result<(BufReader<UnixStream>, UnixStream)> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let reader = BufReader::with_capacity(64 << 10, stream.try_clone()?);
    Ok((reader, stream))
}

fn other(what: String) -> io::Error {
    io::Error::other(what)
}

/// One connection to our agent.
#[derive(Debug)]
pub struct Kva {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    body: Vec<u8>,
    out: Vec<u8>,
}

/// A request frame, ready to write.
pub fn kva_frame(id: u64, method: &str, params: Option<&str>) -> Vec<u8> {
    let body = match params {
        Some(p) => format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{p}}}"#),
        None => format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}"}}"#),
    };
    let mut frame = Vec::with_capacity(body.len() + 4);
    let len = u32::try_from(body.len()).expect("small request");
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body.as_bytes());
    frame
}

/// Read one frame's body into `body`.
pub fn read_kva_frame(reader: &mut impl Read, body: &mut Vec<u8>) -> io::Result<()> {
    let mut header = [0u8; 4];
    reader.read_exact(&mut header)?;
    let len = u32::from_be_bytes(header) as usize;
    body.clear();
    body.resize(len, 0);
    reader.read_exact(body)
}

impl Kva {
    /// Connect and wait for `agent_ready`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let (reader, writer) = open(path)?;
        let mut conn = Self {
            reader,
            writer,
            next_id: 1,
            body: Vec::new(),
            out: Vec::new(),
        };
        read_kva_frame(&mut conn.reader, &mut conn.body)?;
        if !contains(&conn.body, b"agent_ready") {
            return Err(other(format!(
                "the agent's first frame is not agent_ready: {}",
                String::from_utf8_lossy(&conn.body)
            )));
        }
        Ok(conn)
    }

    /// The stream, for pipelining from another thread.
    pub fn try_clone_writer(&self) -> io::Result<UnixStream> {
        self.writer.try_clone()
    }

    /// Read one frame (answers or notifications).
    pub fn read_frame(&mut self) -> io::Result<&[u8]> {
        read_kva_frame(&mut self.reader, &mut self.body)?;
        Ok(&self.body)
    }

    /// Call `method` and wait for its answer: the raw body, checked to be a
    /// result (an error answer is an error).
    pub fn call_raw(&mut self, method: &str, params: Option<&str>) -> io::Result<&[u8]> {
        let id = self.next_id;
        self.next_id += 1;
        self.out = kva_frame(id, method, params);
        self.writer.write_all(&self.out)?;
        let want = format!(r#""id":{id},"#);
        loop {
            read_kva_frame(&mut self.reader, &mut self.body)?;
            if contains(&self.body, want.as_bytes()) {
                break;
            }
        }
        if contains(&self.body[..self.body.len().min(64)], br#""error""#)
            || !contains(&self.body, br#""result""#)
        {
            return Err(other(format!(
                "{method} failed: {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(600)])
            )));
        }
        Ok(&self.body)
    }
}

/// One connection to qemu-guest-agent.
#[derive(Debug)]
pub struct Qga {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: Vec<u8>,
}

impl Qga {
    /// Connect and resynchronise with `guest-sync-delimited` (qemu-ga keeps
    /// its parser state across clients, so a new client starts with 0xFF).
    pub fn connect(path: &Path) -> io::Result<Self> {
        let (reader, writer) = open(path)?;
        let mut conn = Self {
            reader,
            writer,
            line: Vec::new(),
        };
        conn.sync()?;
        Ok(conn)
    }

    /// Connect without resynchronising (the parser is known to be clean).
    pub fn connect_plain(path: &Path) -> io::Result<Self> {
        let (reader, writer) = open(path)?;
        Ok(Self {
            reader,
            writer,
            line: Vec::new(),
        })
    }

    fn sync(&mut self) -> io::Result<()> {
        let id = std::process::id() as u64 * 1000 + 7;
        // 0xFF (not UTF-8: a raw byte) resets qemu-ga's parser.
        let mut bytes = vec![0xffu8];
        bytes.extend_from_slice(
            qga_request("guest-sync-delimited", Some(&format!(r#"{{"id":{id}}}"#))).as_bytes(),
        );
        self.writer.write_all(&bytes)?;
        let mut skipped = Vec::new();
        self.reader.read_until(0xff, &mut skipped)?;
        loop {
            self.read_line()?;
            let v: Value = serde_json::from_slice(&self.line).map_err(|e| other(e.to_string()))?;
            if v["return"] == id {
                return Ok(());
            }
        }
    }

    /// The stream, for pipelining from another thread.
    pub fn try_clone_writer(&self) -> io::Result<UnixStream> {
        self.writer.try_clone()
    }

    /// Bound the next reads.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.writer.set_read_timeout(timeout)
    }

    /// Write raw request text.
    pub fn send(&mut self, text: &[u8]) -> io::Result<()> {
        self.writer.write_all(text)
    }

    /// Read one answer line (without checking it).
    pub fn read_line(&mut self) -> io::Result<&[u8]> {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "qemu-ga closed the connection",
            ));
        }
        Ok(&self.line)
    }

    /// Read one answer line and fail on an `error` answer.
    pub fn read_ok(&mut self) -> io::Result<&[u8]> {
        self.read_line()?;
        if self.line.starts_with(br#"{"error""#) {
            return Err(other(format!(
                "qemu-ga: {}",
                String::from_utf8_lossy(&self.line[..self.line.len().min(600)])
            )));
        }
        Ok(&self.line)
    }

    /// Run `execute` and return the raw answer line (checked not to be an error).
    pub fn call_raw(&mut self, execute: &str, arguments: Option<&str>) -> io::Result<&[u8]> {
        let request = qga_request(execute, arguments);
        self.writer.write_all(request.as_bytes())?;
        self.read_ok()
    }

    /// Run `execute` and return its `return`.
    pub fn call(&mut self, execute: &str, arguments: Option<&str>) -> io::Result<Value> {
        let line = self.call_raw(execute, arguments)?;
        let v: Value = serde_json::from_slice(line).map_err(|e| other(e.to_string()))?;
        Ok(v["return"].clone())
    }
}

/// One qemu-ga command line.
pub fn qga_request(execute: &str, arguments: Option<&str>) -> String {
    match arguments {
        Some(a) => format!("{{\"execute\":\"{execute}\",\"arguments\":{a}}}\n"),
        None => format!("{{\"execute\":\"{execute}\"}}\n"),
    }
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
