//! What a frame from the host goes through before any handler runs: JSON-RPC
//! parsing (`jsonrpc::parse_frame`), method and params decoding
//! (`Call::decode`), then the agent's gate `dispatch::admit` (audit record,
//! policy: exec allowlist, lexical file-path rules), with a policy that
//! enables exec and file transfer so that those checks are reached. Nothing
//! is executed: admitted calls are dropped.
//!
//! Checked beyond "no panic":
//! - a frame earns at most one frame-level error, and a batch never holds
//!   more elements than the limit;
//! - the id of every request comes back unchanged through the agent's
//!   response writer and the client's response parser;
//! - `admit` agrees with `Call::decode` (an undecodable call is never
//!   admitted) and a call that passes `admit` passes the policy.
#![no_main]

use std::sync::{Arc, OnceLock};

use kvm_agent_protocol::jsonrpc::{self, FromAgent, Id, Incoming, Request};
use kvm_agent_protocol::methods::Call;
use kvm_agent_protocol::{ErrorCode, ErrorObject};
use kvm_manager_agent::audit::{Auditor, Origin};
use kvm_manager_agent::config::Config;
use kvm_manager_agent::context::Context;
use kvm_manager_agent::dispatch;
use kvm_manager_agent::shutdown;
use kvm_manager_agent::transport::Peer;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

const MAX_BATCH: usize = 8;

const CONFIG: &str = r#"
[limits]
max_batch_len = 8

[security]
enable_exec = true
enable_file_copy = true
allowed_commands = ["/bin/true", "uname"]
allowed_file_paths = ["/tmp/kva-fuzz-root", "/var/tmp"]
disabled_methods = ["reboot"]
exec_env = ["LANG", "LC_*"]

[[security.commands]]
path = "/bin/echo"
args = [["hello", "*"], ["-n", "**"]]

[audit]
destination = "none"
jsonl_path = "/dev/null"
"#;

struct Fixture {
    ctx: Arc<Context>,
    origin: Origin,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let config = Config::parse(CONFIG, "fuzz.toml".as_ref()).expect("the fuzz config is valid");
        let (controller, shutdown) = shutdown::channel();
        // The controller lives as long as the process.
        std::mem::forget(controller);
        let auditor = Arc::new(Auditor::new(Vec::new(), false));
        Fixture {
            ctx: Context::with_auditor(config, shutdown, auditor),
            origin: Origin::new(&Peer::Unix {
                pid: None,
                uid: Some(0),
            }),
        }
    })
}

/// The id as the agent writes it in its response and the client reads it.
fn echoed(id: &Id) -> Id {
    let mut out = Vec::new();
    let result = RawValue::from_string("{}".into()).unwrap();
    jsonrpc::write_response(&mut out, id, Ok(&result));
    match jsonrpc::parse_from_agent(&out) {
        Ok(FromAgent::Response(r)) => r.id,
        other => panic!("the client cannot read the agent's response {out:?}: {other:?}"),
    }
}

/// Integers and strings come back exactly; other numbers come back as a
/// float (docs/protocol.md §4.1), and serde_json's default float parser is
/// not correctly rounded: it may be off by one unit in the last place.
fn same_id(a: &Id, b: &Id) -> bool {
    match (a, b) {
        (Id::Number(x), Id::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= x.abs().max(y.abs()) * 4.0 * f64::EPSILON
        }
        _ => a == b,
    }
}

fn check_request(f: &Fixture, req: Request) {
    if let Some(id) = &req.id {
        let back = echoed(id);
        assert!(
            same_id(&back, id),
            "the id did not survive the round trip: {id:?} {back:?}"
        );
    }
    let decoded = Call::decode(&req.method, req.params.as_deref());
    let policy_ok = decoded
        .as_ref()
        .map(|call| f.ctx.policy.check(call).is_ok())
        .unwrap_or(false);
    match dispatch::admit(&f.ctx, &f.origin, req) {
        Ok(admitted) => {
            assert!(decoded.is_ok(), "admitted a call that does not decode");
            assert!(policy_ok, "admitted a call the policy refuses");
            assert_eq!(admitted.call.method(), decoded.unwrap().method());
        }
        Err(refusal) => {
            let error: &ErrorObject = &refusal.error;
            assert!(error.code <= -32000, "odd error code {}", error.code);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    match jsonrpc::parse_frame(data, MAX_BATCH) {
        Incoming::Invalid(e) => {
            assert!(
                [
                    i64::from(ErrorCode::ParseError.code()),
                    i64::from(ErrorCode::InvalidRequest.code()),
                    i64::from(ErrorCode::PayloadTooLarge.code()),
                ]
                .contains(&e.code),
                "unexpected frame-level error {e:?}"
            );
        }
        Incoming::Single(Ok(req)) => check_request(f, req),
        Incoming::Single(Err(rejected)) => {
            assert_eq!(
                rejected.error.code,
                i64::from(ErrorCode::InvalidRequest.code())
            );
            assert!(same_id(&echoed(&rejected.id), &rejected.id));
        }
        Incoming::Batch(items) => {
            assert!(!items.is_empty() && items.len() <= MAX_BATCH);
            for item in items {
                match item {
                    Ok(req) => check_request(f, req),
                    Err(rejected) => assert!(same_id(&echoed(&rejected.id), &rejected.id)),
                }
            }
        }
    }
});
