//! get_info, get_metrics and get_users answered from inside a real guest:
//! the figures must be the guest's, not the host's. See the crate's doc for
//! how to run it.

use kvm_agent_client::protocol::methods::core::OsFamily;
use kvm_agent_client::protocol::methods::info::{GetInfoParams, GetMetricsParams};
use kvm_agent_client::Client;
use kvm_agent_vmtest::{runtime, GuestConfig, Vm};

#[test]
fn guest_information_comes_from_the_guest() {
    let vm = Vm::boot("guest_info", GuestConfig::default());
    vm.wait_port_open();
    let host_boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    runtime().block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect to the guest's agent");
        let ready = client.agent_ready().expect("agent_ready");

        let info = client
            .get_info(&GetInfoParams {
                all_interfaces: true,
            })
            .await
            .expect("get_info in the guest");
        assert_eq!(info.os.family, OsFamily::Linux);
        assert_eq!(info.boot_id, ready.boot_id);
        assert_ne!(info.boot_id, host_boot_id.trim(), "the host's boot id");
        // The guest runs Debian's 6.1 kernel, whatever the host runs.
        assert!(
            info.os.kernel_release.starts_with("6.1.")
                && info.os.kernel_release.ends_with("-amd64"),
            "guest kernel: {}",
            info.os.kernel_release
        );
        assert_eq!(info.os.machine, "x86_64");
        // The busybox initramfs has no os-release: not an error, just unknown.
        assert_eq!(info.os.pretty_name, None);
        assert!(info.uptime_seconds < vm.uptime().as_secs_f64() + 1.0);
        assert!(
            info.interfaces.iter().any(|i| i.name == "lo"),
            "{:?}",
            info.interfaces
        );
        println!(
            "    guest: {} {} up {:.1} s",
            info.hostname, info.os.kernel_release, info.uptime_seconds
        );

        let metrics = client
            .get_metrics(&GetMetricsParams::default())
            .await
            .expect("get_metrics in the guest");
        // QEMU gives the guest one CPU and 256 MiB (less what the kernel keeps).
        assert_eq!(metrics.cpu.per_cpu.len(), 1, "{:?}", metrics.cpu.per_cpu);
        let total = metrics.memory.total_bytes;
        assert!(
            total > 128 << 20 && total <= 256 << 20,
            "guest memory {total}"
        );
        assert!(metrics.memory.available_bytes <= total);
        assert!(metrics.cpu.process_count >= 2);
        assert!(
            metrics.interval_ms.is_some(),
            "the start-up sample gives a window"
        );
        println!(
            "    guest memory {} MiB, {} processes, cpu {:?}%",
            total >> 20,
            metrics.cpu.process_count,
            metrics.cpu.usage_percent
        );

        // No utmp in the initramfs: an empty list, not an error.
        let users = client.get_users().await.expect("get_users in the guest");
        assert!(users.users.is_empty(), "{:?}", users.users);
    });
}
