//! Property test (proptest) against the real agent binary: whatever bytes a
//! host sends, each frame earns at most one reply frame, and the agent keeps
//! serving: the connection that carried them, and a fresh one.
//!
//! Each case is a sequence of frames, every one of them either random bytes,
//! JSON-looking junk, a valid request or notification, a batch, an empty
//! body, or a header announcing more than the limit (its body following),
//! sent in one write on a new connection and followed by a ping.

#![cfg(unix)]

mod common;

use common::Agent;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

const MAX_FRAME: u32 = 4096;

#[derive(Debug, Clone)]
enum Frame {
    /// A body, framed with its own length.
    Body(Vec<u8>),
    /// A header announcing `len` (more than the limit), then `len` bytes.
    Oversized(u32),
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let json_ish = prop::collection::vec(
        prop::sample::select(br#"{}[]:," 0123456789.eE+-truefalsnl\u"#.to_vec()),
        0..64,
    );
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        json_ish,
        "[a-z_]{0,12}"
            .prop_map(|m| format!(r#"{{"jsonrpc":"2.0","id":7,"method":"{m}"}}"#).into_bytes()),
        Just(br#"{"jsonrpc":"2.0","method":"ping"}"#.to_vec()),
        Just(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"ping"},3]"#
                .to_vec()
        ),
        Just(br#"{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}"#.to_vec()),
        Just(b"[]".to_vec()),
        Just(Vec::new()),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        8 => body().prop_map(Frame::Body),
        1 => (MAX_FRAME + 1..MAX_FRAME * 3).prop_map(Frame::Oversized),
    ]
}

#[test]
fn any_frames_earn_at_most_one_reply_each_and_the_agent_keeps_serving() {
    let agent = Agent::start(&format!("[limits]\nmax_frame_bytes = {MAX_FRAME}\n"));
    let mut runner = TestRunner::new(Config {
        cases: 96,
        ..Config::default()
    });
    let strategy = prop::collection::vec(frame(), 1..24);
    runner
        .run(&strategy, |frames| {
            let mut c = agent.connect();
            let mut bytes = Vec::new();
            for f in &frames {
                match f {
                    Frame::Body(b) => {
                        bytes.extend_from_slice(&(b.len() as u32).to_be_bytes());
                        bytes.extend_from_slice(b);
                    }
                    Frame::Oversized(len) => {
                        bytes.extend_from_slice(&len.to_be_bytes());
                        bytes.extend(std::iter::repeat_n(b'x', *len as usize));
                    }
                }
            }
            c.send_raw(&bytes);
            c.send(br#"{"jsonrpc":"2.0","id":"after","method":"ping"}"#);
            // Replies may come in any order (a batch is answered once all
            // its requests are): read until the ping's answer, then close
            // our side and read the rest until the agent closes.
            let mut replies = 0;
            let mut pinged = false;
            loop {
                if pinged {
                    if c.closed_by_agent_after_replies(&mut replies) {
                        break;
                    }
                    continue;
                }
                let reply: Value = c.recv();
                if reply["id"] == "after" && reply.get("result").is_some() {
                    pinged = true;
                    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
                    continue;
                }
                replies += 1;
            }
            prop_assert!(
                replies <= frames.len(),
                "{replies} replies to {} frames",
                frames.len()
            );
            // The agent serves the next host.
            agent.connect().assert_ping_is_next();
            Ok(())
        })
        .unwrap();
    let mut fresh = agent.connect();
    fresh.assert_ping_is_next();
}

trait DrainReplies {
    /// Read one reply (counting it) or EOF; true at EOF.
    fn closed_by_agent_after_replies(&mut self, replies: &mut usize) -> bool;
}

impl DrainReplies for common::Conn {
    fn closed_by_agent_after_replies(&mut self, replies: &mut usize) -> bool {
        use std::io::Read;
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return true,
            Err(e) => panic!("reading a reply: {e}"),
            Ok(()) => {}
        }
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        self.stream.read_exact(&mut body).unwrap();
        serde_json::from_slice::<Value>(&body).expect("the agent sends JSON");
        *replies += 1;
        false
    }
}
