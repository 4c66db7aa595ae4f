//! shutdown and reboot for real, in busybox guests: graceful (busybox
//! `poweroff`/`reboot`, which signal the guest's /init) and forced
//! (reboot(2) from the agent). A shutdown makes QEMU exit; a reboot brings
//! the agent back with a new boot id, and the client, still connected to
//! QEMU's chardev socket, sees the new `agent_ready`. See the crate's doc for
//! how to run these.

use std::time::{Duration, Instant};

use kvm_agent_client::protocol::methods::power::{PowerAction, PowerParams};
use kvm_agent_client::Client;
use kvm_agent_vmtest::{check_agent, runtime, GuestConfig, Vm, TIMEOUT};

fn confirmed(force: bool) -> PowerParams {
    PowerParams {
        force,
        confirm: true,
        delay_seconds: 0,
        message: Some("kvm-manager-agent VM test".into()),
    }
}

fn shutdown(name: &str, force: bool) {
    let mut vm = Vm::boot(name, GuestConfig::default());
    vm.wait_port_open();
    let asked = runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect");
        check_agent(&client).await;
        // Without confirm: nothing happens.
        let refused = client
            .shutdown(&PowerParams {
                force,
                ..PowerParams::default()
            })
            .await
            .expect_err("shutdown without confirm");
        assert_eq!(refused.code(), Some(-32007), "{refused}");
        let accepted = client.shutdown(&confirmed(force)).await.expect("shutdown");
        assert_eq!(accepted.action, PowerAction::Shutdown);
        assert_eq!(accepted.force, force);
        Instant::now()
    });
    let status = vm.wait_qemu_exit();
    vm.log(&format!(
        "QEMU exited ({status}) {:.1}s after the answer (force: {force})",
        asked.elapsed().as_secs_f64()
    ));
    let console = vm.console().lines_since(0).join("\n");
    if !force {
        assert!(
            console.contains("KVA-INIT poweroff requested"),
            "the graceful shutdown did not go through busybox poweroff and init"
        );
    } else {
        assert!(!console.contains("KVA-INIT poweroff requested"));
    }
}

fn reboot(name: &str, force: bool) {
    let vm = Vm::boot(
        name,
        GuestConfig {
            reboot: true,
            ..GuestConfig::default()
        },
    );
    vm.wait_port_open();
    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect");
        let first = check_agent(&client).await;
        let accepted = client.reboot(&confirmed(force)).await.expect("reboot");
        assert_eq!(accepted.action, PowerAction::Reboot);
        let asked = Instant::now();
        // The client reconnects by itself when its connection is lost; on
        // virtio-serial it usually stays connected to QEMU's socket and the
        // new boot's agent_ready arrives on it.
        let deadline = Instant::now() + TIMEOUT;
        let ready = loop {
            if let Some(r) = client.agent_ready() {
                if r.boot_id != first {
                    break r;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agent_ready with a new boot id"
            );
            let _ = client.ping().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        vm.log(&format!(
            "agent back {:.1}s after the reboot answer (force: {force}): boot_id {} -> {}",
            asked.elapsed().as_secs_f64(),
            first,
            ready.boot_id
        ));
        let again = check_agent(&client).await;
        assert_eq!(again, ready.boot_id);
    });
    let console = vm.console().lines_since(0).join("\n");
    assert_eq!(
        console.matches("KVA-AGENT-PID").count(),
        2,
        "the guest's init should have started the agent twice"
    );
    assert_eq!(console.contains("KVA-INIT reboot requested"), !force);
}

#[test]
fn graceful_shutdown_powers_the_guest_off() {
    shutdown("power_shutdown", false);
}

#[test]
fn forced_shutdown_powers_the_guest_off() {
    shutdown("power_shutdown_forced", true);
}

#[test]
fn graceful_reboot_brings_the_agent_back_with_a_new_boot_id() {
    reboot("power_reboot", false);
}

#[test]
fn forced_reboot_brings_the_agent_back_with_a_new_boot_id() {
    reboot("power_reboot_forced", true);
}
