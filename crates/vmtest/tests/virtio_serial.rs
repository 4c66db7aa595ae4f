//! The agent's virtio-serial transport in a real guest: a port that appears
//! after the agent started, host sessions that come and go (with half a frame
//! left behind), and no busy loop in any host state. See the crate's doc for
//! how to run these.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use kvm_agent_client::Client;
use kvm_agent_vmtest::{check_agent, runtime, GuestConfig, Vm, TIMEOUT};

/// CPU bound for a 5 s window: an idle agent uses 0-1 ticks; one that spins
/// uses about 500.
const WINDOW_SECONDS: usize = 5;
const MAX_IDLE_TICKS: u64 = 5;

#[test]
fn late_device_is_picked_up_and_served() {
    let vm = Vm::boot("late_device", GuestConfig::default());
    let console = vm.console();
    let started = console.wait_contains(0, "KVA-AGENT-PID");
    vm.log("the agent is running; virtio_console is not loaded yet");
    let waiting = console.wait_contains(started, "is not there yet");
    let (loaded_at, _) = console.wait_for(waiting, "the late modules", |l| {
        l.contains("KVA-LATE-LOADED").then_some(())
    });
    let loaded = Instant::now();
    vm.log("virtio_console loaded by init, after the agent said the port was not there yet");

    vm.wait_port_open();
    vm.log(&format!(
        "the agent opened the port {:.1}s after the module was loaded",
        loaded.elapsed().as_secs_f64()
    ));
    // Found through inotify (or the port's name arriving), not by the
    // agent's 30 s safety-net rescan.
    console.wait_port_found_by_event(loaded_at);

    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect to the virtio-serial chardev and receive agent_ready");
        check_agent(&client).await;
    });
}

/// Read one frame (4-byte big-endian length, then the body) from a raw stream.
fn read_frame(stream: &mut UnixStream) -> String {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).expect("read a frame length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).expect("read a frame body");
    String::from_utf8_lossy(&body).into_owned()
}

#[test]
fn reconnect_after_half_a_frame() {
    let vm = Vm::boot("reconnect", GuestConfig::default());
    vm.wait_port_open();
    let console = vm.console();

    // A raw session: take agent_ready, then send half a frame and leave.
    let mut raw = UnixStream::connect(vm.serial_socket()).expect("connect to the chardev socket");
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    let ready = read_frame(&mut raw);
    assert!(
        ready.contains("agent_ready"),
        "first frame is not agent_ready: {ready}"
    );
    let mark = console.mark();
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    raw.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    raw.write_all(&body[..body.len() / 2]).unwrap();
    raw.flush().unwrap();
    drop(raw);
    vm.log("sent half a frame and disconnected");
    let after = console.wait_contains(mark, "dropped a partial frame");
    console.wait_contains(mark, "disconnected");
    vm.log("the agent dropped the partial frame when the host left");

    // A new session starts clean: agent_ready again, and ping works.
    // Each session gets its own runtime: dropping the runtime drops the
    // client's tasks, and so closes its socket, at once.
    let boot_id = runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("reconnect after half a frame");
        check_agent(&client).await
    });
    let mut mark = console.wait_contains(after, "disconnected");

    // Sessions come and go.
    for round in 1..=5 {
        let id = runtime().block_on(async {
            let client = Client::connect(vm.serial_target(), Vm::client_options())
                .await
                .unwrap_or_else(|e| panic!("connect, round {round}: {e}"));
            let ready = client.agent_ready().expect("agent_ready");
            client
                .ping()
                .await
                .unwrap_or_else(|e| panic!("ping, round {round}: {e}"));
            ready.boot_id
        });
        assert_eq!(id, boot_id, "the boot id changed without a reboot");
        mark = console.wait_contains(mark, "disconnected");
        vm.log(&format!(
            "session {round}: agent_ready, ping, disconnect: ok"
        ));
    }

    // A host that connects and leaves at once, without reading anything,
    // leaves nothing behind either.
    drop(UnixStream::connect(vm.serial_socket()).expect("connect"));
    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect after a brief session");
        check_agent(&client).await;
    });
}

#[test]
fn no_busy_loop_in_any_host_state() {
    let vm = Vm::boot("idle_cpu", GuestConfig::default());
    vm.wait_port_open();
    let console = vm.console();
    let rt = runtime();

    // The port is open in the guest, nobody on the host side: IN+HUP.
    vm.assert_quiet("no host was connected", WINDOW_SECONDS, MAX_IDLE_TICKS);

    // A host connected and idle.
    let client = rt.block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect");
        check_agent(&client).await;
        client
    });
    vm.assert_quiet(
        "a host was connected and idle",
        WINDOW_SECONDS,
        MAX_IDLE_TICKS,
    );

    // The host left: back to HUP, after a session. (Dropping the runtime
    // drops the client's tasks and closes its socket.)
    let mark = console.mark();
    drop(client);
    drop(rt);
    console.wait_contains(mark, "disconnected");
    vm.assert_quiet(
        "the host had disconnected (HUP)",
        WINDOW_SECONDS,
        MAX_IDLE_TICKS,
    );

    // And the agent still serves the next host.
    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect again");
        check_agent(&client).await;
    });
}

#[test]
fn waiting_for_the_port_uses_no_cpu_and_it_is_still_picked_up() {
    // virtio_console comes 12 s after the agent: room for a 5 s window in
    // which the agent waits for a device that does not exist yet.
    let vm = Vm::boot(
        "waiting_for_port",
        GuestConfig {
            late_after_seconds: 12,
            ..GuestConfig::default()
        },
    );
    let console = vm.console();
    let waiting = console.wait_contains(0, "is not there yet");
    let (at, ticks) = vm.cpu_window(waiting, WINDOW_SECONDS);
    let used = ticks[ticks.len() - 1] - ticks[0];
    vm.log(&format!(
        "agent CPU while waiting for its port to appear: {used} ticks in {WINDOW_SECONDS} s \
         (samples {ticks:?}, bound {MAX_IDLE_TICKS})"
    ));
    let lines = console.lines_since(waiting);
    assert!(
        !lines[..at - waiting]
            .iter()
            .any(|l| l.contains("KVA-LATE-LOADED")),
        "virtio_console was loaded during the window: the window did not measure the wait"
    );
    assert!(
        used <= MAX_IDLE_TICKS,
        "the agent used {used} clock ticks in {WINDOW_SECONDS} s while waiting for its \
         port to appear (bound {MAX_IDLE_TICKS}); samples {ticks:?}"
    );

    let (loaded_at, _) = console.wait_for(at, "the late modules", |l| {
        l.contains("KVA-LATE-LOADED").then_some(())
    });
    let loaded = Instant::now();
    vm.wait_port_open();
    vm.log(&format!(
        "the agent opened the port {:.1}s after the module was loaded",
        loaded.elapsed().as_secs_f64()
    ));
    // Found through inotify (or the port's name arriving), not by the
    // agent's 30 s safety-net rescan.
    console.wait_port_found_by_event(loaded_at);
    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect");
        check_agent(&client).await;
    });
}
