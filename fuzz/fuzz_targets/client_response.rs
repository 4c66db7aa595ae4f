//! What the host client does with a frame from the agent (the steps of
//! `Shared::on_frame` in crates/client/src/connection.rs, which is private):
//! `jsonrpc::parse_from_agent`; for `agent_ready`, the MAC check and the
//! decoding of its params; for responses, the MAC check and the decoding of
//! the result into the method's typed result (`Client::decode`), for every
//! method of the protocol.
//!
//! Checked beyond "no panic": a typed result that decodes, written back as
//! JSON, decodes again to the same JSON (what the client accepts, the
//! agent's types can say), and a batch holds only responses.
#![no_main]

use kvm_agent_client::protocol::methods::{self, Method};
use kvm_agent_protocol::auth::{self, Key};
use kvm_agent_protocol::jsonrpc::{self, FromAgent, Response};
use kvm_agent_protocol::notifications::AgentReady;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned>(text: &str) {
    let Ok(v) = serde_json::from_str::<T>(text) else {
        return;
    };
    let once = serde_json::to_string(&v).expect("a decoded value serializes");
    let again: T = serde_json::from_str(&once)
        .unwrap_or_else(|e| panic!("written back, it no longer decodes: {e}: {once}"));
    assert_eq!(serde_json::to_string(&again).unwrap(), once);
}

fn results(text: &str) {
    macro_rules! each {
        ($($m:ident),*) => { $( round_trip::<<methods::$m as Method>::Result>(text); )* };
    }
    each!(
        PingMethod,
        GetCapabilitiesMethod,
        GetInfoMethod,
        GetMetricsMethod,
        GetUsersMethod,
        ShutdownMethod,
        RebootMethod,
        ExecMethod,
        ExecStartMethod,
        ExecStatusMethod,
        ExecKillMethod,
        CopyToGuestMethod,
        CopyFromGuestMethod,
        FileOpenMethod,
        FileReadMethod,
        FileWriteMethod,
        FileCloseMethod
    );
}

fn response(key: &Key, r: &Response) {
    let _ = auth::verify_response(
        key,
        &r.id.to_string(),
        "0123456789abcdef0123456789abcdef",
        r,
    );
    match &r.outcome {
        Ok(raw) => results(raw.get()),
        Err(e) => {
            let _ = e.kind();
            let _ = serde_json::to_string(e).unwrap();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let key = Key::from_bytes(&[0x11; 32]).unwrap();
    match jsonrpc::parse_from_agent(data) {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(FromAgent::Notification(n)) => {
            let _ = auth::verify_notification(&key, &n);
            let params = n.params.as_deref().map_or("null", |p| p.get());
            round_trip::<AgentReady>(params);
        }
        Ok(FromAgent::Response(r)) => response(&key, &r),
        Ok(FromAgent::Batch(rs)) => {
            for r in &rs {
                response(&key, r);
            }
        }
    }
});
