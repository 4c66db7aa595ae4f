//! The Windows virtio-serial transport with a named pipe standing in for
//! vioser's device: the test is "the host" (the pipe's server) and the
//! agent opens `virtio-serial:\\.\pipe\NAME` as it would open
//! `\\.\Global\org.kvmmanager.agent.0`. Checked: a ping, a host that
//! disconnects and comes back, and a device that appears after the agent
//! started, without spinning while it waits. What vioser itself does (and COM ports, which must never be
//! opened under Wine) needs a real Windows guest.

// Windows only: on Linux the virtio-serial transport is a character device,
// tested in real guests (crates/vmtest).
#![cfg(windows)]

mod common;

use std::process::{Child, Command, Stdio};

use common::{agent_binary, power_log, toml_path, Scratch, PATIENCE};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};

/// The agent on `virtio-serial:PATH`, killed on drop.
struct PortAgent {
    child: Child,
    _scratch: Scratch,
}

impl PortAgent {
    fn start(device: &str) -> Self {
        let scratch = Scratch::new("vport");
        let config = scratch.0.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[audit]\ndestination = \"none\"\njsonl_path = {}\n",
                toml_path(&scratch.0.join("audit.jsonl"))
            ),
        )
        .unwrap();
        let child = Command::new(agent_binary())
            .env("KVA_POWER_DRY_RUN", power_log(&config))
            .arg("--config")
            .arg(&config)
            .arg("--transport")
            .arg(format!("virtio-serial:{device}"))
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the agent");
        PortAgent {
            child,
            _scratch: scratch,
        }
    }
}

impl Drop for PortAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn device_name(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(r"\\.\pipe\kva-vport-{tag}-{}-{n}", std::process::id())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The host side: a pipe instance, waiting until the agent opens it.
async fn host_session(name: &str, first: bool) -> NamedPipeServer {
    let server = ServerOptions::new()
        .first_pipe_instance(first)
        .create(name)
        .expect("create the stand-in device");
    tokio::time::timeout(PATIENCE, server.connect())
        .await
        .expect("the agent opened the device")
        .expect("connect");
    server
}

async fn recv(s: &mut NamedPipeServer) -> Value {
    let read = async {
        let mut header = [0u8; 4];
        s.read_exact(&mut header).await?;
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        s.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(PATIENCE, read)
        .await
        .expect("a frame in time")
        .expect("a frame");
    serde_json::from_slice(&body).expect("JSON")
}

async fn call(s: &mut NamedPipeServer, body: &str) -> Value {
    let mut framed = (body.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(body.as_bytes());
    s.write_all(&framed).await.unwrap();
    recv(s).await
}

/// A fresh session: `agent_ready` first, then a ping with this id.
async fn ready_and_ping(s: &mut NamedPipeServer, id: u32) {
    let ready = recv(s).await;
    assert_eq!(ready["method"], "agent_ready", "{ready}");
    let reply = call(
        s,
        &format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#),
    )
    .await;
    assert_eq!(reply, json!({"jsonrpc":"2.0","id":id,"result":{}}));
}

#[test]
fn ping_then_the_host_leaves_and_comes_back() {
    let name = device_name("reconnect");
    runtime().block_on(async {
        let first = ServerOptions::new()
            .first_pipe_instance(true)
            .create(&name)
            .unwrap();
        let _agent = PortAgent::start(&name);
        tokio::time::timeout(PATIENCE, first.connect())
            .await
            .expect("the agent opened the device")
            .unwrap();
        let mut first = first;
        ready_and_ping(&mut first, 1).await;
        // Several requests in one session.
        let caps = call(
            &mut first,
            r#"{"jsonrpc":"2.0","id":2,"method":"get_capabilities"}"#,
        )
        .await;
        assert_eq!(caps["result"]["os_family"], "windows", "{caps}");
        // The host goes away; the agent reopens the device for the next.
        drop(first);
        for id in [3, 4] {
            let mut again = host_session(&name, true).await;
            ready_and_ping(&mut again, id).await;
            // This time the host disconnects without closing its handle.
            again.disconnect().unwrap();
        }
    });
}

#[test]
fn a_device_that_appears_late_is_picked_up() {
    let name = device_name("late");
    let _agent = PortAgent::start(&name);
    runtime().block_on(async {
        // The agent is waiting for a device that does not exist yet (it
        // retries with a growing delay): let it miss a few times.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let mut host = host_session(&name, true).await;
        ready_and_ping(&mut host, 1).await;
    });
}

/// CPU time (kernel + user) the process has used so far.
fn cpu_time(child: &Child) -> std::time::Duration {
    use std::os::windows::io::AsRawHandle;
    use windows_sys::Win32::Foundation::FILETIME;
    use windows_sys::Win32::System::Threading::GetProcessTimes;
    let zero = FILETIME {
        dwLowDateTime: 0,
        dwHighDateTime: 0,
    };
    let (mut created, mut exited, mut kernel, mut user) = (zero, zero, zero, zero);
    // SAFETY: a live process handle owned by `child`, valid out pointers.
    let ok = unsafe {
        GetProcessTimes(
            child.as_raw_handle(),
            &mut created,
            &mut exited,
            &mut kernel,
            &mut user,
        )
    };
    assert_ne!(
        ok,
        0,
        "GetProcessTimes: {}",
        std::io::Error::last_os_error()
    );
    let ticks = |t: FILETIME| (u64::from(t.dwHighDateTime) << 32) | u64::from(t.dwLowDateTime);
    // FILETIME counts 100 ns.
    std::time::Duration::from_nanos((ticks(kernel) + ticks(user)) * 100)
}

#[test]
fn waiting_for_an_absent_device_costs_no_cpu() {
    let name = device_name("idle");
    let mut agent = PortAgent::start(&name);
    // Past start-up, then a few seconds of waiting for the device: a loop
    // that retried without its growing delay would burn those seconds.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = cpu_time(&agent.child);
    // The measure works: starting up took some CPU.
    assert!(before > std::time::Duration::ZERO, "no CPU time reported");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let used = cpu_time(&agent.child) - before;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited"
    );
    assert!(
        used < std::time::Duration::from_millis(300),
        "{used:?} of CPU in 3 s of waiting"
    );
    // It was waiting, not stuck: the device appears and it answers.
    runtime().block_on(async {
        let mut host = host_session(&name, true).await;
        ready_and_ping(&mut host, 1).await;
    });
}
