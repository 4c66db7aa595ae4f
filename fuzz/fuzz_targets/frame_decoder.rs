//! The frame decoder (crates/protocol/src/frame.rs) on any byte stream, cut
//! into reads of any sizes.
//!
//! Input: byte 0 picks the limit (small, so oversized frames are common),
//! byte 1 seeds the read sizes, the rest is the stream. Checked:
//! - however the stream is cut into reads, and whether large bodies go
//!   through `body_spare`/`commit_body` (as the agent's and the client's
//!   readers do) or through `decode`, the same events come out;
//! - every `decode` call makes progress while input is left;
//! - no frame exceeds the limit, every oversized header is reported once,
//!   and the frames plus the skipped bodies account for the whole stream;
//! - re-encoding the frames gives back the stream's frames byte for byte.
#![no_main]

use kvm_agent_protocol::frame::{self, Decoded, FrameDecoder, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fn one_shot(max: u32, stream: &[u8]) -> (Vec<Decoded>, usize) {
    let mut dec = FrameDecoder::new(max);
    let mut events = Vec::new();
    let mut input = stream;
    while !input.is_empty() {
        let (used, ev) = dec.decode(input);
        assert!(used > 0, "decode made no progress with input left");
        assert!(used <= input.len());
        input = &input[used..];
        events.extend(ev);
    }
    let pending = match dec.body_bytes_missing() {
        Some(_) => 1,
        None => usize::from(!dec.is_idle()),
    };
    (events, pending)
}

fn cut(max: u32, stream: &[u8], seed: u8) -> Vec<Decoded> {
    let mut dec = FrameDecoder::new(max);
    let mut events = Vec::new();
    let mut rest = stream;
    let mut s = u32::from(seed) | 1;
    while !rest.is_empty() {
        // xorshift: read sizes from 1 to 64 bytes.
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        let size = (s % 64 + 1) as usize;
        let mut chunk = &rest[..size.min(rest.len())];
        rest = &rest[chunk.len()..];
        // Like the readers: when a body is pending, sometimes read straight
        // into the decoder's buffer.
        if s & 0x100 != 0 {
            if let Some(missing) = dec.body_bytes_missing() {
                let take = missing.min(chunk.len());
                let spare = dec.body_spare(take).expect("a body is pending");
                spare.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                events.extend(dec.commit_body());
            }
        }
        while !chunk.is_empty() {
            let (used, ev) = dec.decode(chunk);
            assert!(used > 0, "decode made no progress with input left");
            chunk = &chunk[used..];
            events.extend(ev);
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = u32::from(data[0]) * 4;
    let seed = data[1];
    let stream = &data[2..];

    let (events, _) = one_shot(max, stream);
    assert_eq!(cut(max, stream, seed), events, "the cut changed the frames");

    // Walk the stream by hand and compare.
    let mut pos = 0;
    let mut expected = Vec::new();
    while stream.len() - pos >= HEADER_LEN {
        let len = u32::from_be_bytes(stream[pos..pos + HEADER_LEN].try_into().unwrap());
        pos += HEADER_LEN;
        if len > max {
            expected.push(Decoded::TooLarge { len, max });
            pos = pos.saturating_add(len as usize).min(stream.len());
        } else if stream.len() - pos >= len as usize {
            expected.push(Decoded::Frame(stream[pos..pos + len as usize].to_vec()));
            pos += len as usize;
        } else {
            break;
        }
    }
    assert_eq!(events, expected);
    for ev in &events {
        if let Decoded::Frame(body) = ev {
            assert!(body.len() <= max as usize);
            let again = frame::encode(body);
            let (back, pending) = one_shot(max, &again);
            assert_eq!(back, vec![Decoded::Frame(body.clone())]);
            assert_eq!(pending, 0);
        }
    }
});
