//! The real agent binary driven by the real host client library.

mod common;

use common::{Agent, PATIENCE};
use kvm_agent_client::{Client, ClientOptions, Target};
use kvm_agent_protocol::methods::core::OsFamily;
use kvm_agent_protocol::methods::info::GetInfoParams;
use kvm_agent_protocol::{ErrorCode, MethodName, PROTOCOL_VERSION};

/// The agent's endpoint as a client target: its unix socket, or on Windows
/// its named pipe.
fn target(agent: &Agent) -> Target {
    if cfg!(windows) {
        Target::Pipe(agent.socket.display().to_string())
    } else {
        Target::Unix(agent.socket.clone())
    }
}

/// The family this agent reports.
const FAMILY: OsFamily = if cfg!(windows) {
    OsFamily::Windows
} else {
    OsFamily::Linux
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn options() -> ClientOptions {
    ClientOptions {
        call_timeout: PATIENCE,
        connect_timeout: PATIENCE,
        ..ClientOptions::default()
    }
}

#[test]
fn client_talks_to_the_agent() {
    let agent = Agent::start("");
    runtime().block_on(async {
        let client = Client::connect(target(&agent), options())
            .await
            .expect("connect");
        let ready = client.agent_ready().expect("agent_ready arrives first");
        assert_eq!(ready.protocol_version, PROTOCOL_VERSION);
        assert_eq!(ready.os_family, FAMILY);
        #[cfg(target_os = "linux")]
        {
            let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
            assert_eq!(ready.boot_id, boot_id.trim());
        }

        client.ping().await.expect("ping");
        let caps = client.get_capabilities().await.expect("caps");
        // Every method but exec (off by default), in protocol order.
        let expected: Vec<&str> = MethodName::ALL
            .iter()
            .map(|m| m.as_str())
            .filter(|m| !m.starts_with("exec"))
            .collect();
        assert_eq!(caps.methods, expected);
        assert_eq!(caps.limits.max_frame_bytes, 16 << 20);
        assert_eq!(caps.limits.max_chunk_bytes, 8 << 20);
        assert!(!caps.auth_required);

        let info = client
            .get_info(&GetInfoParams::default())
            .await
            .expect("get_info");
        assert_eq!(info.os.family, FAMILY);
        assert_eq!(info.boot_id, ready.boot_id);
        let err = client
            .call_raw(
                "copy_from_guest",
                Some(serde_json::json!({"path": "/etc/shadow"})),
            )
            .await
            .expect_err("outside the allowed directories");
        assert_eq!(err.error_code(), Some(ErrorCode::Denied));
    });
}

#[test]
fn many_concurrent_calls_on_one_connection() {
    let agent = Agent::start("");
    runtime().block_on(async {
        let client = std::sync::Arc::new(Client::connect(target(&agent), options()).await.unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..500 {
            let c = client.clone();
            tasks.spawn(async move {
                if i % 2 == 0 {
                    c.ping().await.map(|_| ())
                } else {
                    c.get_capabilities().await.map(|_| ())
                }
            });
        }
        let mut ok = 0;
        while let Some(r) = tasks.join_next().await {
            r.unwrap().expect("call");
            ok += 1;
        }
        assert_eq!(ok, 500);
    });
}

// Unix only: the restart stops the agent with SIGTERM, which Windows does
// not have (stopping the Windows agent is the service's business).
#[cfg(unix)]
#[test]
fn client_reconnects_to_a_restarted_agent() {
    let agent = Agent::start("");
    let rt = runtime();
    let client = rt.block_on(async {
        let c = Client::connect(target(&agent), options()).await.unwrap();
        c.ping().await.unwrap();
        c
    });
    let mut agent = agent;
    let status = agent.restart();
    assert!(status.success(), "{status:?}");
    rt.block_on(async {
        // The first call after the loss may report it; the client then
        // reconnects by itself.
        let mut answered = false;
        for _ in 0..3 {
            if client.ping().await.is_ok() {
                answered = true;
                break;
            }
        }
        assert!(answered, "the client did not reconnect");
        assert!(client.agent_ready().is_some());
    });
}

/// A file goes to the guest and comes back through the client's chunked
/// transfers (raw attachments, several chunks in flight), sha256 checked
/// at both ends; a path outside the allowed directory is refused. On
/// Windows this crosses the named pipe and the Windows path rules.
#[test]
fn a_file_goes_to_the_guest_and_back() {
    use kvm_agent_client::files::{download, upload, TransferOptions};

    let scratch = common::Scratch::new("e2e-files");
    let root = scratch.0.join("allowed");
    std::fs::create_dir_all(&root).unwrap();
    let agent = Agent::start(&format!(
        "[security]\nallowed_file_paths = [{}]\n",
        common::toml_path(&root)
    ));
    // 3 MiB and a bit, not a multiple of the chunk size.
    let data: Vec<u8> = (0u32..(3 << 20) + 4099)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let local = scratch.0.join("local.bin");
    std::fs::write(&local, &data).unwrap();
    let guest = root.join("uploaded.bin");
    let guest = guest.to_str().unwrap();
    let opts = TransferOptions {
        chunk_bytes: 1 << 20,
        ..TransferOptions::default()
    };
    runtime().block_on(async {
        let client = Client::connect(target(&agent), options())
            .await
            .expect("connect");
        let up = upload(&client, &local, guest, &opts, &mut |_, _| {})
            .await
            .expect("upload");
        assert_eq!(up.size, data.len() as u64);
        assert_eq!(std::fs::read(guest).unwrap(), data);

        let back = scratch.0.join("downloaded.bin");
        let down = download(&client, guest, &back, &opts, &mut |_, _| {})
            .await
            .expect("download");
        assert_eq!(down.sha256, up.sha256);
        assert_eq!(std::fs::read(&back).unwrap(), data);

        let outside = scratch.0.join("local.bin");
        let err = client
            .call_raw(
                "copy_from_guest",
                Some(serde_json::json!({ "path": outside.to_str().unwrap() })),
            )
            .await
            .expect_err("outside the allowed directory");
        assert_eq!(err.error_code(), Some(ErrorCode::Denied));
    });
}
