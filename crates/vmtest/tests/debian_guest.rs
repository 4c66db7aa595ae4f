//! The agent under systemd in the Debian bookworm guest, as a service: killed
//! with SIGKILL, systemd restarts it (`Restart=always`) and a client that
//! stayed connected recovers by itself, same boot id; and a real login (agetty
//! `--autologin root` on the serial console, so login(1) writes the utmp
//! record) shows in `get_users`.
//!
//! Needs `cargo xtask test debian` (images and packages; see
//! kvm_agent_vmtest::debian).

use std::time::{Duration, Instant};

use kvm_agent_client::Client;
use kvm_agent_vmtest::debian::{DebianImages, DebianVm};
use kvm_agent_vmtest::{check_agent, runtime, Vm};

const UNIT: &str = "kvm-manager-agent.service";

fn main_pid(vm: &DebianVm) -> u32 {
    vm.ok(&format!("systemctl show -p MainPID --value {UNIT}"))
        .trim()
        .parse()
        .expect("a MainPID")
}

#[test]
fn killed_agent_is_restarted_and_a_console_login_is_listed() {
    let images = DebianImages::from_env();
    let vm = DebianVm::boot("debian_guest", &images);
    vm.sh("systemctl is-system-running --wait");
    vm.ok("mount -o ro /dev/vdb /mnt && dpkg -i /mnt/agent-old.deb");
    vm.wait_port_open();

    let rt = runtime();
    let client = rt.block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect to the agent");
        check_agent(&client).await;
        client
    });
    let boot_id = client.agent_ready().expect("agent_ready").boot_id;

    // SIGKILL: no clean-up of any kind in the agent.
    let pid = main_pid(&vm);
    assert_ne!(pid, 0);
    vm.ok(&format!("kill -KILL {pid}"));
    let killed = Instant::now();
    // Wait for systemd's restart (RestartSec=2s) before sending: a request
    // written while the guest still has the dead agent's port open is
    // discarded by the guest kernel when the port closes. The client stays
    // connected to QEMU's chardev; the ping waits in the port until the
    // restarted agent opens it, greets with agent_ready and answers.
    // Nothing in the test reconnects.
    while main_pid(&vm) == pid || main_pid(&vm) == 0 {
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "systemd did not restart the agent"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    rt.block_on(async {
        client
            .ping()
            .await
            .expect("ping answered by the restarted agent");
    });
    vm.log(&format!(
        "after SIGKILL the restarted agent answered in {:.1} s (RestartSec=2s)",
        killed.elapsed().as_secs_f64()
    ));
    let new_pid = main_pid(&vm);
    assert!(new_pid != 0 && new_pid != pid, "MainPID {pid} -> {new_pid}");
    assert_eq!(
        vm.ok(&format!("systemctl show -p NRestarts --value {UNIT}"))
            .trim(),
        "1"
    );
    let ready = client.agent_ready().expect("agent_ready");
    assert_eq!(ready.boot_id, boot_id, "no reboot happened");
    vm.ok(&format!(
        "journalctl -b -u {UNIT} --no-pager -o cat | grep -E 'host connected|Main process exited|Scheduled restart'"
    ));
    let connects = vm.ok(&format!(
        "journalctl -b -u {UNIT} --no-pager -o cat | grep -c 'host connected on'"
    ));
    assert_eq!(
        connects.trim(),
        "2",
        "the restarted agent greeted the same host connection"
    );

    // A real login on the serial console: agetty --autologin root runs
    // login(1), which writes root's USER_PROCESS record to utmp.
    let mark = vm.console().mark();
    vm.ok(
        "mkdir -p /run/systemd/system/serial-getty@ttyS0.service.d && \
         printf '[Service]\\nExecStart=\\nExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 %%I $TERM\\n' \
         > /run/systemd/system/serial-getty@ttyS0.service.d/autologin.conf && \
         systemctl daemon-reload && systemctl restart serial-getty@ttyS0.service",
    );
    vm.console().wait_contains(mark, "(automatic login)");
    // login(1) writes utmp just before it starts the shell.
    vm.ok("for i in $(seq 1 100); do who | grep -q '^root *ttyS0' && break; sleep 0.1; done; who");
    let now = vm
        .ok("date +%s")
        .trim()
        .parse::<i64>()
        .expect("the guest's clock");
    let users = rt
        .block_on(client.get_users())
        .expect("get_users after the login");
    println!("    get_users: {users:?}");
    let root = users
        .users
        .iter()
        .find(|u| u.user == "root" && u.terminal.as_deref() == Some("ttyS0"))
        .unwrap_or_else(|| panic!("no root session on ttyS0 in {users:?}"));
    assert!(
        (now - 300..=now).contains(&root.login_time_epoch),
        "login time {} ({}) vs the guest's clock {now}",
        root.login_time_epoch,
        root.login_time
    );
    vm.log(&format!(
        "get_users lists root on ttyS0, logged in at {}",
        root.login_time
    ));
}
