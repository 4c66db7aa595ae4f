//! `pipe_ping PATH [SECONDS]`: send one `ping` to an agent listening on a
//! Windows named pipe (`\\.\pipe\NAME`, the `pipe:NAME` transport) and
//! check the answer. The MSI test of `cargo xtask test windows` runs it
//! under Wine against the installed service.
//!
//! The pipe is opened as a file (std's `OpenOptions`), retried for up to
//! SECONDS (default 20) while it does not exist yet or all its instances
//! are busy; the agent's `agent_ready` notification is read past. Exit
//! status 0 when the answer is a `ping` result, 1 otherwise, 2 on a bad
//! command line.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kvm_agent_protocol::frame::{self, Decoded, FrameDecoder, DEFAULT_MAX_FRAME_BYTES};

const ID: &str = "pipe-ping";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (path, seconds) = match args.as_slice() {
        [path] => (path.as_str(), 20),
        [path, s] => match s.parse() {
            Ok(s) => (path.as_str(), s),
            Err(_) => return usage(),
        },
        _ => return usage(),
    };
    match ping(Path::new(path), Duration::from_secs(seconds)) {
        Ok(answer) => {
            println!("pipe_ping: {path}: {answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pipe_ping: {path}: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage() -> ExitCode {
    eprintln!(r"usage: pipe_ping \\.\pipe\NAME [SECONDS]");
    ExitCode::from(2)
}

fn open(path: &Path, patience: Duration) -> Result<File, String> {
    let deadline = Instant::now() + patience;
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => return Ok(f),
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("cannot open after {patience:?}: {e}")),
        }
    }
}

fn ping(path: &Path, patience: Duration) -> Result<String, String> {
    let mut pipe = open(path, patience)?;
    let request = format!(r#"{{"jsonrpc":"2.0","id":"{ID}","method":"ping"}}"#);
    pipe.write_all(&frame::encode(request.as_bytes()))
        .map_err(|e| format!("write: {e}"))?;
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = pipe.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the agent closed the pipe before answering".into());
        }
        let mut input = &buf[..n];
        while !input.is_empty() {
            let (used, decoded) = decoder.decode(input);
            input = &input[used..];
            let body = match decoded {
                Some(Decoded::Frame(body)) => body,
                Some(Decoded::TooLarge { len, max }) => {
                    return Err(format!("a frame of {len} bytes (limit {max})"))
                }
                None => continue,
            };
            let value: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&body)))?;
            if value.get("id").and_then(|i| i.as_str()) != Some(ID) {
                // agent_ready and other notifications.
                continue;
            }
            return match value.get("result") {
                Some(result) if result.is_object() => Ok(value.to_string()),
                _ => Err(format!("not a ping result: {value}")),
            };
        }
    }
}
