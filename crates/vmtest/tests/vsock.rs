//! The agent's vsock transport in a real guest, reached through
//! vhost-device-vsock's hybrid vsock socket. See the crate's doc for how to
//! run it.

use kvm_agent_client::Client;
use kvm_agent_vmtest::{check_agent, runtime, GuestConfig, Vm, VSOCK_PORT};

#[test]
fn vsock_serves_two_clients_at_once() {
    let vm = Vm::boot(
        "vsock",
        GuestConfig {
            agent: "vsock",
            late: "",
            virtio_serial: false,
            vsock: true,
            ..GuestConfig::default()
        },
    );
    let console = vm.console();
    console.wait_contains(0, &format!("listening on vsock:{VSOCK_PORT}"));
    vm.log("the agent listens on vsock");

    runtime().block_on(async {
        let a = Client::connect(vm.vsock_target(), Vm::client_options())
            .await
            .expect("first client over hybrid vsock");
        let b = Client::connect(vm.vsock_target(), Vm::client_options())
            .await
            .expect("second client over hybrid vsock, the first still connected");
        let id_a = check_agent(&a).await;
        let id_b = check_agent(&b).await;
        assert_eq!(
            id_a, id_b,
            "two connections to one guest saw different boot ids"
        );

        // Both at once: interleaved calls on both connections.
        for _ in 0..10 {
            let (ra, rb) = tokio::join!(a.ping(), b.ping());
            ra.expect("ping on the first connection");
            rb.expect("ping on the second connection");
        }
        assert!(a.is_connected().await && b.is_connected().await);
        vm.log("two vsock clients served at once");
    });

    vm.assert_quiet("listening on vsock, no client", 5, 5);
}
