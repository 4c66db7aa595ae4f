//! Reliability of the agent inside a busybox guest: 1,000 host sessions that
//! each end in the middle of a frame, with flat descriptors and memory; and
//! a port hot-plugged with QMP while the agent waits for it, then a minute
//! with no host attached at ~0 CPU. The figures come from the guest's init
//! (`KVA-CPU <ticks> fds=<n> rss_kib=<kib>` once a second), not from the
//! agent. See the crate's doc for how to run these.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use kvm_agent_client::Client;
use kvm_agent_vmtest::{check_agent, runtime, AgentStat, GuestConfig, Vm, TIMEOUT};
use serde_json::Value;

/// Host sessions in the reconnect test.
const SESSIONS: u32 = 1000;
/// Sessions before the "before" figures are taken (allocator warm-up).
const WARM_UP: u32 = 20;
/// Resident memory the agent may gain over the sessions after warm-up.
const MAX_RSS_GROWTH_KIB: u64 = 1024;

fn read_frame(stream: &mut UnixStream) -> Value {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).expect("read a frame length");
    let len = u32::from_be_bytes(len) as usize;
    assert!(
        len < 1 << 20,
        "implausible frame length {len}: garbled stream"
    );
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("read a frame body");
    serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("garbled frame ({e}): {:?}", String::from_utf8_lossy(&body)))
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn stat_now(vm: &Vm) -> AgentStat {
    vm.console().next_stat(vm.console().mark()).1
}

#[test]
fn a_thousand_sessions_cut_mid_frame() {
    let vm = Vm::boot(
        "reconnect_1000",
        GuestConfig {
            late: "",
            log_level: "info",
            ..GuestConfig::default()
        },
    );
    vm.wait_port_open();
    let console = vm.console();
    let idle = stat_now(&vm);
    vm.log(&format!("agent before any session: {idle:?}"));

    let mut boot_id = String::new();
    let mut mark = console.mark();
    let mut before = None;
    let started = Instant::now();
    for n in 1..=SESSIONS {
        let mut s = UnixStream::connect(vm.serial_socket()).expect("connect to the chardev");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        // Every session starts with a fresh agent_ready, from the same boot.
        let ready = read_frame(&mut s);
        assert_eq!(
            ready["method"], "agent_ready",
            "session {n}: first frame {ready}"
        );
        let id = ready["params"]["boot_id"].as_str().unwrap_or_default();
        if boot_id.is_empty() {
            boot_id = id.to_string();
        }
        assert_eq!(id, boot_id, "session {n}: boot id changed");
        // A whole request, answered correctly (its own id, a result).
        let ping = format!(r#"{{"jsonrpc":"2.0","id":{n},"method":"ping"}}"#);
        s.write_all(&frame(ping.as_bytes())).unwrap();
        let answer = read_frame(&mut s);
        assert_eq!(answer["id"], n, "session {n}: answer {answer}");
        assert!(
            answer.get("result").is_some() && answer.get("error").is_none(),
            "session {n}: answer {answer}"
        );
        // Then a request cut short (in the length prefix, or in the body),
        // and the host leaves.
        let next = frame(
            format!(
                r#"{{"jsonrpc":"2.0","id":{},"method":"ping"}}"#,
                n + 1_000_000
            )
            .as_bytes(),
        );
        let cut = if n % 2 == 0 { 2 } else { next.len() / 2 };
        s.write_all(&next[..cut]).unwrap();
        drop(s);
        // The agent noticed the host left and dropped the partial request,
        // and waits for the next host: only then is the next session a new
        // one for it. (A host that reconnects faster than the guest sees it
        // leave is the same session to the guest: virtio-serial only tells
        // the guest whether a host is attached now.)
        mark = console.wait_contains(mark, "dropped a partial frame");
        mark = console.wait_contains(mark, "waiting for a host on");
        if n == WARM_UP {
            let b = stat_now(&vm);
            vm.log(&format!("agent after {WARM_UP} sessions: {b:?}"));
            before = Some(b);
        }
        if n % 250 == 0 {
            vm.log(&format!(
                "{n} sessions in {:.1} s: {:?}",
                started.elapsed().as_secs_f64(),
                stat_now(&vm)
            ));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let before = before.expect("warm-up figures");
    let after = stat_now(&vm);
    vm.log(&format!(
        "{SESSIONS} sessions (agent_ready, ping, cut mid-frame) in {elapsed:.1} s; agent \
         before: {} fds, {} KiB RSS; after: {} fds, {} KiB RSS",
        before.fds, before.rss_kib, after.fds, after.rss_kib
    ));
    assert_eq!(
        after.fds, before.fds,
        "the agent's open descriptors grew: {before:?} -> {after:?}"
    );
    assert!(
        after.rss_kib <= before.rss_kib + MAX_RSS_GROWTH_KIB,
        "the agent's memory grew by more than {MAX_RSS_GROWTH_KIB} KiB: {before:?} -> {after:?}"
    );

    // The real client still works after all that.
    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect after the sessions");
        assert_eq!(check_agent(&client).await, boot_id);
    });
}

/// CPU bound for a minute with no host: an idle agent uses 0-2 ticks; one
/// that spins uses about 6,000.
const IDLE_SECONDS: usize = 60;
const MAX_IDLE_TICKS: u64 = 10;

#[test]
fn hot_plugged_port_is_picked_up_then_a_quiet_minute() {
    let vm = Vm::boot(
        "hotplug",
        GuestConfig {
            late: "",
            port_at_boot: false,
            ..GuestConfig::default()
        },
    );
    let console = vm.console();
    let waiting = console.wait_contains(0, "is not there yet");
    vm.log("the guest booted without the port; the agent waits for it");

    let plugged = Instant::now();
    vm.hotplug_port();
    vm.wait_port_open();
    let latency = plugged.elapsed().as_secs_f64();
    // Found through inotify (or the port's name arriving), not by the
    // agent's 30 s safety-net rescan.
    let opened = console.wait_port_found_by_event(waiting);
    vm.log(&format!(
        "the agent opened the hot-plugged port {latency:.1} s after device_add: {}",
        console.lines_since(opened - 1)[0]
    ));

    // A minute with the port open and no host attached.
    vm.assert_quiet(
        "no host was attached (a minute)",
        IDLE_SECONDS,
        MAX_IDLE_TICKS,
    );

    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect to the hot-plugged port");
        check_agent(&client).await;
    });
}
