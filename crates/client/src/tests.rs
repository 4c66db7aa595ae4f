//! Client tests against an in-process fake agent on a unix socket in a
//! temporary directory.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_agent_protocol::frame;
use kvm_agent_protocol::methods::core::OsFamily;
use kvm_agent_protocol::methods::exec::{Encoding, ExecParams};
use kvm_agent_protocol::methods::power::PowerParams;
use kvm_agent_protocol::ErrorCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::{Client, ClientError, ClientOptions, Target, Unmatched};

const SHORT: Duration = Duration::from_millis(200);

/// What the fake does with one request.
enum Act {
    /// Send this message (a whole JSON-RPC object).
    Send(Value),
    /// Send this message after a while, without holding up other requests.
    SendAfter(Duration, Value),
    /// Send these raw frame bodies.
    Raw(Vec<Vec<u8>>),
    /// Never answer.
    Silent,
    /// Close the connection.
    Close,
}

fn ok(req: &Value, result: Value) -> Act {
    Act::Send(json!({"jsonrpc": "2.0", "id": req["id"], "result": result}))
}

fn err(req: &Value, code: i64, message: &str, data: Value) -> Act {
    Act::Send(json!({
        "jsonrpc": "2.0", "id": req["id"],
        "error": {"code": code, "message": message, "data": data}
    }))
}

fn capabilities() -> Value {
    json!({
        "protocol_version": "1.0",
        "agent_version": "0.0.0-fake",
        "os_family": "linux",
        "methods": ["ping", "get_capabilities"],
        "limits": {
            "max_frame_bytes": 16777216,
            "max_chunk_bytes": 1048576,
            "max_batch_len": 16,
            "max_requests_per_connection": 32
        },
        "auth_required": false
    })
}

/// The default behaviour: ping, get_capabilities, `echo` (result = params),
/// everything else "not implemented".
fn standard(_conn: usize, req: &Value) -> Act {
    match req["method"].as_str().unwrap_or_default() {
        "ping" => ok(req, json!({})),
        "get_capabilities" => ok(req, capabilities()),
        "echo" => ok(req, req["params"].clone()),
        m => err(req, -32010, "Not implemented", json!({ "method": m })),
    }
}

type Handler = Arc<dyn Fn(usize, &Value) -> Act + Send + Sync>;

#[derive(Clone, Copy)]
struct FakeOpts {
    send_ready: bool,
    /// Play the hybrid-vsock multiplexer first: expect `CONNECT <port>`.
    hvsock_port: Option<u32>,
}

impl Default for FakeOpts {
    fn default() -> Self {
        Self {
            send_ready: true,
            hvsock_port: None,
        }
    }
}

struct Fake {
    dir: PathBuf,
    path: PathBuf,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Value>>>,
    task: JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fake {
    fn target(&self) -> Target {
        Target::Unix(self.path.clone())
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kvm-agent-client-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fake(handler: impl Fn(usize, &Value) -> Act + Send + Sync + 'static) -> Fake {
    fake_with(FakeOpts::default(), handler)
}

fn fake_with(
    opts: FakeOpts,
    handler: impl Fn(usize, &Value) -> Act + Send + Sync + 'static,
) -> Fake {
    let dir = temp_dir();
    let path = dir.join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let handler: Handler = Arc::new(handler);
    let task = {
        let connections = connections.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let n = connections.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(serve(stream, n, opts, handler.clone(), requests.clone()));
            }
        })
    };
    Fake {
        dir,
        path,
        connections,
        requests,
        task,
    }
}

async fn write_frame(w: &tokio::sync::Mutex<WriteHalf<UnixStream>>, body: &[u8]) {
    let _ = w.lock().await.write_all(&frame::encode(body)).await;
}

async fn serve(
    mut stream: UnixStream,
    conn: usize,
    opts: FakeOpts,
    handler: Handler,
    requests: Arc<Mutex<Vec<Value>>>,
) {
    if let Some(port) = opts.hvsock_port {
        let mut line = Vec::new();
        loop {
            let Ok(b) = stream.read_u8().await else {
                return;
            };
            if b == b'\n' {
                break;
            }
            line.push(b);
        }
        if line != format!("CONNECT {port}").as_bytes() {
            let _ = stream.write_all(b"ERR unknown port\n").await;
            return;
        }
        stream.write_all(b"OK 1073741824\n").await.unwrap();
    }
    let (mut rd, wr) = tokio::io::split(stream);
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    if opts.send_ready {
        let ready = json!({
            "jsonrpc": "2.0", "method": "agent_ready",
            "params": {
                "agent_version": "0.0.0-fake", "protocol_version": "1.0",
                "boot_id": format!("boot-{conn}"), "os_family": "linux"
            }
        });
        write_frame(&wr, ready.to_string().as_bytes()).await;
    }
    loop {
        let Ok(len) = rd.read_u32().await else { return };
        let mut body = vec![0u8; len as usize];
        if rd.read_exact(&mut body).await.is_err() {
            return;
        }
        let req: Value = serde_json::from_slice(&body).unwrap();
        requests.lock().unwrap().push(req.clone());
        match handler(conn, &req) {
            Act::Send(v) => write_frame(&wr, v.to_string().as_bytes()).await,
            Act::SendAfter(d, v) => {
                let wr = wr.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    write_frame(&wr, v.to_string().as_bytes()).await;
                });
            }
            Act::Raw(frames) => {
                for f in frames {
                    write_frame(&wr, &f).await;
                }
            }
            Act::Silent => {}
            Act::Close => return,
        }
    }
}

fn short_opts() -> ClientOptions {
    ClientOptions {
        call_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    }
}

#[tokio::test]
async fn typed_calls_round_trip() {
    let agent = fake(standard);
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let ready = client.agent_ready().expect("agent_ready is kept");
    assert_eq!(ready.boot_id, "boot-1");
    assert_eq!(ready.os_family, OsFamily::Linux);

    client.ping().await.unwrap();
    let caps = client.get_capabilities().await.unwrap();
    assert_eq!(caps.limits.max_batch_len, 16);
    assert_eq!(caps.methods.len(), 2);

    let reqs = agent.requests.lock().unwrap().clone();
    assert_eq!(reqs[0]["jsonrpc"], "2.0");
    assert_eq!(reqs[0]["method"], "ping");
    assert_eq!(reqs[0]["params"], json!({}));
    assert!(reqs[0]["id"].is_u64());
    assert_ne!(reqs[0]["id"], reqs[1]["id"]);
}

#[tokio::test]
async fn raw_call_returns_the_result_and_omits_absent_params() {
    let agent = fake(standard);
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let v = client
        .call_raw("echo", Some(json!({"a": [1, 2]})))
        .await
        .unwrap();
    assert_eq!(v, json!({"a": [1, 2]}));
    client.call_raw("ping", None).await.unwrap();
    let reqs = agent.requests.lock().unwrap().clone();
    assert!(reqs[1].get("params").is_none());
}

#[tokio::test]
async fn pipelined_calls_each_get_their_own_answer() {
    // Answers come back in reverse order of the requests.
    let agent = fake(|_, req| {
        let n = req["params"]["n"].as_u64().unwrap_or(0);
        let delay = Duration::from_millis((20 - n) * 10);
        Act::SendAfter(
            delay,
            json!({"jsonrpc": "2.0", "id": req["id"], "result": {"n": n}}),
        )
    });
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..20u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let v = client
                .call_raw("echo", Some(json!({"n": n})))
                .await
                .unwrap();
            assert_eq!(v["n"], n);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(agent.connections(), 1, "all calls share one connection");
}

#[tokio::test]
async fn agent_errors_keep_code_message_and_data() {
    let agent = fake(standard);
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let e = client.get_users().await.unwrap_err();
    assert!(e.is_agent_error(), "{e}");
    assert_eq!(e.code(), Some(-32010));
    assert_eq!(e.error_code(), Some(ErrorCode::NotImplemented));
    let obj = e.agent_error().unwrap();
    assert_eq!(obj.data, Some(json!({"method": "get_users"})));

    let e = client.shutdown(&PowerParams::default()).await.unwrap_err();
    assert_eq!(e.code(), Some(-32010));
    let reqs = agent.requests.lock().unwrap().clone();
    assert_eq!(reqs[1]["params"]["confirm"], false);
}

#[tokio::test]
async fn result_of_the_wrong_shape_is_a_protocol_error() {
    let agent = fake(|_, req| ok(req, json!({"unexpected": true})));
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let e = client.get_capabilities().await.unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    // The connection itself is fine.
    client.ping().await.unwrap();
}

#[tokio::test]
async fn a_call_times_out_and_the_connection_stays_usable() {
    let agent = fake(|c, req| match req["method"].as_str() {
        Some("hang") => Act::Silent,
        _ => standard(c, req),
    });
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let e = client
        .call_raw_with_timeout("hang", None, SHORT)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    assert!(e.is_connection_error());
    client.ping().await.unwrap();
    assert_eq!(agent.connections(), 1);
}

#[tokio::test]
async fn default_call_timeout_applies() {
    let agent = fake(|_, _| Act::Silent);
    let opts = ClientOptions {
        call_timeout: SHORT,
        ..short_opts()
    };
    let client = Client::connect(agent.target(), opts).await.unwrap();
    let e = client.ping().await.unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
}

#[tokio::test]
async fn reconnects_after_the_agent_drops_the_connection() {
    // The first connection dies on its first request; later ones behave.
    let agent = fake(|conn, req| {
        if conn == 1 {
            Act::Close
        } else {
            standard(conn, req)
        }
    });
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    assert_eq!(client.agent_ready().unwrap().boot_id, "boot-1");

    let e = client.ping().await.unwrap_err();
    assert!(matches!(e, ClientError::Disconnected(_)), "{e}");
    assert!(e.is_connection_error());

    // The next call reconnects and waits for the new agent_ready.
    client.ping().await.unwrap();
    assert_eq!(agent.connections(), 2);
    assert_eq!(client.agent_ready().unwrap().boot_id, "boot-2");
}

#[tokio::test]
async fn without_reconnect_calls_fail_until_reconnect_is_called() {
    let agent = fake(|conn, req| {
        if conn == 1 {
            Act::Close
        } else {
            standard(conn, req)
        }
    });
    let opts = ClientOptions {
        reconnect: false,
        ..short_opts()
    };
    let client = Client::connect(agent.target(), opts).await.unwrap();
    assert!(client.ping().await.is_err());
    let e = client.ping().await.unwrap_err();
    assert!(matches!(e, ClientError::Disconnected(_)), "{e}");
    assert!(!client.is_connected().await);
    client.reconnect().await.unwrap();
    client.ping().await.unwrap();
    assert_eq!(client.agent_ready().unwrap().boot_id, "boot-2");
}

#[tokio::test]
async fn calls_in_flight_fail_when_the_connection_drops() {
    let agent = fake(|_, req| match req["method"].as_str() {
        Some("die") => Act::Close,
        _ => Act::Silent,
    });
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.call_raw("hang", None).await })
    };
    // Let the first request reach the agent before killing the connection.
    while agent.requests.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = client.call_raw("die", None).await.unwrap_err();
    assert!(matches!(e, ClientError::Disconnected(_)), "{e}");
    let e = waiting.await.unwrap().unwrap_err();
    assert!(matches!(e, ClientError::Disconnected(_)), "{e}");
}

#[tokio::test]
async fn hybrid_vsock_handshake_then_protocol() {
    let agent = fake_with(
        FakeOpts {
            hvsock_port: Some(1024),
            ..FakeOpts::default()
        },
        standard,
    );
    let target: Target = format!("hvsock:{}:1024", agent.path.display())
        .parse()
        .unwrap();
    let client = Client::connect(target, short_opts()).await.unwrap();
    assert_eq!(client.agent_ready().unwrap().boot_id, "boot-1");
    client.ping().await.unwrap();

    // A port nobody listens on: the multiplexer refuses.
    let target: Target = format!("hvsock:{}:9", agent.path.display())
        .parse()
        .unwrap();
    let e = Client::connect(target, short_opts()).await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
}

#[tokio::test]
async fn connect_waits_for_agent_ready_within_the_connect_timeout() {
    let agent = fake_with(
        FakeOpts {
            send_ready: false,
            ..FakeOpts::default()
        },
        standard,
    );
    let opts = ClientOptions {
        connect_timeout: SHORT,
        ..short_opts()
    };
    let e = Client::connect(agent.target(), opts.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");

    // Without wait_for_ready the connection is usable at once.
    let opts = ClientOptions {
        wait_for_ready: false,
        ..opts
    };
    let client = Client::connect(agent.target(), opts).await.unwrap();
    assert!(client.agent_ready().is_none());
    client.ping().await.unwrap();
    let e = client.wait_ready(SHORT).await.unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
}

#[tokio::test]
async fn wait_ready_returns_the_current_agent_ready() {
    let agent = fake(standard);
    let client = Client::lazy(agent.target(), short_opts());
    assert!(client.agent_ready().is_none());
    let ready = client.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ready.boot_id, "boot-1");
    assert_eq!(client.agent_ready(), Some(ready));
}

#[tokio::test]
async fn connect_errors_name_the_target() {
    let dir = temp_dir();
    let target = Target::Unix(dir.join("nobody-here.sock"));
    let e = Client::connect(target.clone(), short_opts())
        .await
        .unwrap_err();
    match &e {
        ClientError::Connect { target: t, .. } => assert_eq!(t, &target),
        other => panic!("{other}"),
    }
    assert!(e.is_connection_error());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn null_id_error_fails_the_sole_outstanding_call() {
    let agent = fake(|_, _| {
        Act::Send(json!({
            "jsonrpc": "2.0", "id": null,
            "error": {"code": -32700, "message": "Parse error"}
        }))
    });
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let e = client.ping().await.unwrap_err();
    assert_eq!(e.code(), Some(-32700), "{e}");
}

#[tokio::test]
async fn null_id_error_with_several_calls_in_flight_goes_to_the_handler() {
    // "first" is never answered; when "second" arrives the fake sends a
    // null-id error and then the answer to "second". While the error is read
    // both calls are outstanding, so the client cannot know which one it
    // answers and fails neither.
    let agent = fake(|_, req| {
        match req["method"].as_str() {
        Some("first") => Act::Silent,
        _ => Act::Raw(vec![
            json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "Parse error"}})
                .to_string()
                .into_bytes(),
            json!({"jsonrpc": "2.0", "id": req["id"], "result": "second"})
                .to_string()
                .into_bytes(),
        ]),
    }
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let opts = ClientOptions {
        on_unmatched: Some({
            let seen = seen.clone();
            Arc::new(move |u| seen.lock().unwrap().push(u))
        }),
        ..short_opts()
    };
    let client = Client::connect(agent.target(), opts).await.unwrap();
    let first = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call_raw_with_timeout("first", None, Duration::from_secs(2))
                .await
        })
    };
    while agent.requests.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let second = client.call_raw("second", None).await.unwrap();
    assert_eq!(second, json!("second"));
    let e = first.await.unwrap().unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    let seen = seen.lock().unwrap().clone();
    assert!(
        matches!(&seen[..], [Unmatched::ErrorResponse(e)] if e.code == -32700),
        "{seen:?}"
    );
}

#[tokio::test]
async fn oversized_answer_is_skipped_and_the_stream_stays_in_sync() {
    let agent = fake(|c, req| match req["method"].as_str() {
        Some("big") => ok(req, json!("x".repeat(5000))),
        _ => standard(c, req),
    });
    let opts = ClientOptions {
        max_frame_bytes: 4096,
        ..short_opts()
    };
    let client = Client::connect(agent.target(), opts).await.unwrap();
    let e = client.call_raw("big", None).await.unwrap_err();
    assert!(
        matches!(e, ClientError::FrameTooLarge { max: 4096, .. }),
        "{e}"
    );
    assert!(e.is_protocol_error());
    client.ping().await.unwrap();
    assert_eq!(agent.connections(), 1);
}

#[tokio::test]
async fn large_answers_arrive_whole() {
    let big = "y".repeat(3 * 1024 * 1024 + 17);
    let expected = big.clone();
    let agent = fake(move |_, req| ok(req, json!(big)));
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let v = client.call_raw("big", None).await.unwrap();
    assert_eq!(v.as_str().unwrap().len(), expected.len());
    assert_eq!(v, json!(expected));
}

#[tokio::test]
async fn oversized_request_is_refused_locally() {
    let agent = fake(standard);
    let opts = ClientOptions {
        max_frame_bytes: 4096,
        ..short_opts()
    };
    let client = Client::connect(agent.target(), opts).await.unwrap();
    let e = client
        .call_raw("echo", Some(json!({"x": "z".repeat(5000)})))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::RequestTooLarge { max: 4096, .. }),
        "{e}"
    );
    assert!(agent.requests.lock().unwrap().is_empty());
    client.ping().await.unwrap();
}

#[tokio::test]
async fn malformed_message_closes_the_connection() {
    let agent = fake(|conn, req| {
        if conn == 1 {
            Act::Raw(vec![b"{not json".to_vec()])
        } else {
            standard(conn, req)
        }
    });
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let e = client.ping().await.unwrap_err();
    assert!(matches!(e, ClientError::Protocol(_)), "{e}");
    assert!(e.is_protocol_error());
    client.ping().await.unwrap();
    assert_eq!(agent.connections(), 2);
}

#[tokio::test]
async fn late_answers_and_unknown_notifications_are_ignored() {
    let agent = fake(|c, req| match req["method"].as_str() {
        Some("slow") => Act::SendAfter(
            Duration::from_millis(600),
            json!({"jsonrpc": "2.0", "id": req["id"], "result": {}}),
        ),
        _ => {
            let note = json!({"jsonrpc": "2.0", "method": "something_new", "params": {}});
            let Act::Send(answer) = standard(c, req) else {
                unreachable!()
            };
            Act::Raw(vec![
                note.to_string().into_bytes(),
                answer.to_string().into_bytes(),
            ])
        }
    });
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let e = client
        .call_raw_with_timeout("slow", None, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }));
    client.ping().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.ping().await.unwrap();
    assert_eq!(agent.connections(), 1);
}

#[tokio::test]
async fn exec_sends_the_params_struct() {
    let agent = fake(|_, req| {
        ok(
            req,
            json!({
                "exit_code": 3, "signal": null,
                "stdout": {"encoding": "utf-8", "data": "hi\n"},
                "stderr": {"encoding": "base64", "data": "/w=="},
                "stdout_truncated": false, "stderr_truncated": false,
                "timed_out": false, "duration_ms": 4
            }),
        )
    });
    let client = Client::connect(agent.target(), short_opts()).await.unwrap();
    let r = client
        .exec(&ExecParams {
            command: "echo".into(),
            args: vec!["hi".into()],
            timeout_ms: Some(1000),
            ..ExecParams::default()
        })
        .await
        .unwrap();
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.stderr.encoding, Encoding::Base64);
    let reqs = agent.requests.lock().unwrap().clone();
    assert_eq!(reqs[0]["method"], "exec");
    assert_eq!(reqs[0]["params"]["command"], "echo");
    assert_eq!(reqs[0]["params"]["args"], json!(["hi"]));
}
