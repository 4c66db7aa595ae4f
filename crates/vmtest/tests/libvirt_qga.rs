//! libvirt as a real client of the agent's qemu-guest-agent front end: a
//! private libvirtd (crates/vmtest/src/libvirt.rs) runs a TCG domain booting
//! the busybox guest with the agent's `qga` configuration, libvirt owns the
//! `org.qemu.guest_agent.0` channel, and virsh's agent commands must succeed
//! and agree with what the same guest reports through the native protocol
//! (its own port, a second channel of the domain). See the crate's doc for
//! how to run this.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kvm_agent_client::protocol::methods::info::{GetInfoParams, GuestInfo};
use kvm_agent_client::{Client, Target};
use kvm_agent_vmtest::libvirt::{Domain, Libvirt};
use kvm_agent_vmtest::{runtime, Vm, TIMEOUT};
use serde_json::Value;

const DOMAIN: &str = "kva-qga";

/// The guest's `get_info` (every interface) through the native protocol.
fn native_info(dom: &Domain<'_>) -> GuestInfo {
    runtime().block_on(async {
        let client = Client::connect(Target::Unix(dom.native_socket()), Vm::client_options())
            .await
            .expect("connect to the agent's own port");
        client
            .get_info(&GetInfoParams {
                all_interfaces: true,
            })
            .await
            .expect("get_info")
    })
}

/// `virsh qemu-agent-command DOM JSON`, parsed.
fn agent_command(lv: &Libvirt, json: &str) -> Value {
    let out = lv.virsh(&["qemu-agent-command", DOMAIN, json]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{json}: {e}: {out:?}"))
}

/// Wait until libvirt talks to the agent: `guest-ping` through libvirt
/// succeeds (libvirt connects when the guest opens the port, then syncs).
/// Retried once a second for at most [`TIMEOUT`]; returns the reply.
fn wait_agent(lv: &Libvirt) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    let mut tries = 0;
    loop {
        tries += 1;
        match lv.try_virsh(&["qemu-agent-command", DOMAIN, r#"{"execute":"guest-ping"}"#]) {
            Ok(out) => {
                lv.log(&format!(
                    "guest-ping through libvirt answered after {tries} tries: {}",
                    out.trim()
                ));
                return serde_json::from_str(out.trim())
                    .unwrap_or_else(|e| panic!("guest-ping: {e}: {out:?}"));
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "libvirt never reached the agent in {TIMEOUT:?}: {e}"
            ),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `key : value` lines of `virsh guestinfo`.
fn fields(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.split_once(" : "))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The rows of a virsh table (after the `----` rule), split on spaces.
fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .skip_while(|l| !l.starts_with("---"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn libvirt_drives_the_qga_front_end() {
    let lv = Libvirt::start("libvirt_qga");
    let dom = lv.start_domain(
        DOMAIN,
        "console=ttyS0 quiet panic=-1 kva.agent=virtio-serial kva.late=none \
         kva.log=debug kva.config=qga kva.tmp_mib=16 kva.lo=up kva.disk=/mnt/data",
        Some(16),
    );
    let booted = dom.console().wait_contains(0, "KVA-AGENT-PID");
    let native = native_info(&dom);
    lv.log(&format!(
        "native get_info: host {:?}, kernel {}, interfaces {:?}",
        native.hostname,
        native.os.kernel_release,
        native
            .interfaces
            .iter()
            .map(|i| (&i.name, &i.addresses))
            .collect::<Vec<_>>()
    ));

    // qemu-agent-command: guest-ping, then guest-info.
    let ping = wait_agent(&lv);
    assert_eq!(ping, serde_json::json!({"return": {}}));
    let info = agent_command(&lv, r#"{"execute":"guest-info"}"#);
    let version = info["return"]["version"].as_str().unwrap_or_default();
    assert!(!version.is_empty(), "guest-info without a version: {info}");
    let commands = info["return"]["supported_commands"]
        .as_array()
        .unwrap_or_else(|| panic!("guest-info without supported_commands: {info}"));
    for name in [
        "guest-ping",
        "guest-network-get-interfaces",
        "guest-get-fsinfo",
        "guest-get-time",
        "guest-shutdown",
    ] {
        assert!(
            commands
                .iter()
                .any(|c| c["name"] == name && c["enabled"] == true),
            "guest-info does not list {name} as enabled: {info}"
        );
    }
    lv.log(&format!(
        "guest-info: version {version}, {} commands",
        commands.len()
    ));

    // domifaddr --source agent: every address the native protocol reports.
    let ifaddr = lv.virsh(&["domifaddr", DOMAIN, "--source", "agent"]);
    lv.log(&format!("virsh domifaddr --source agent:\n{ifaddr}"));
    let table = rows(&ifaddr);
    assert!(!table.is_empty(), "domifaddr listed nothing: {ifaddr:?}");
    // Rows `NAME [MAC] PROTOCOL ADDRESS/PREFIX` (no MAC for lo); more
    // addresses of the same interface follow as rows whose name is `-`;
    // `N/A` when an interface has none.
    let mut listed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut name = String::new();
    for r in &table {
        assert!(
            r.len() == 3 || r.len() == 4,
            "domifaddr row {r:?} in {ifaddr:?}"
        );
        if r[0] != "-" {
            name = r[0].clone();
        }
        let (protocol, address) = (&r[r.len() - 2], &r[r.len() - 1]);
        let addrs = listed.entry(name.clone()).or_default();
        if address != "N/A" {
            let (ip, prefix) = address.split_once('/').expect("address/prefix");
            let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{address}: {e}"));
            let prefix: u8 = prefix.parse().unwrap_or_else(|e| panic!("{address}: {e}"));
            let want = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
            assert_eq!(protocol, want, "domifaddr row {r:?}");
            addrs.insert(format!("{ip}/{prefix}"));
        }
    }
    let expected: BTreeMap<String, BTreeSet<String>> = native
        .interfaces
        .iter()
        .map(|i| {
            let addrs = i
                .addresses
                .iter()
                .map(|a| format!("{}/{}", a.address, a.prefix_len))
                .collect();
            (i.name.clone(), addrs)
        })
        .collect();
    assert_eq!(
        listed, expected,
        "domifaddr --source agent and the native get_info disagree"
    );
    assert!(
        expected
            .get("lo")
            .is_some_and(|a| a.contains("127.0.0.1/8")),
        "the guest's lo should be up with 127.0.0.1/8 (kva.lo=up): {expected:?}"
    );

    // guestinfo: host name and kernel as the native protocol says.
    let guestinfo = lv.virsh(&["guestinfo", DOMAIN]);
    lv.log(&format!("virsh guestinfo:\n{guestinfo}"));
    let gi = fields(&guestinfo);
    let get = |key: &str| {
        gi.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("virsh guestinfo has no {key}: {guestinfo}"))
    };
    assert_eq!(get("hostname"), native.hostname);
    assert_eq!(get("os.kernel-release"), native.os.kernel_release);
    assert_eq!(get("os.machine"), native.os.machine);
    assert!(get("user.count").parse::<u32>().is_ok(), "{guestinfo}");
    // guest-get-disks: the domain's one disk, matched to its target name.
    assert_eq!(get("disk.count"), "1", "{guestinfo}");
    assert_eq!(get("disk.0.name"), "/dev/vda", "{guestinfo}");
    assert_eq!(get("disk.0.alias"), "vda", "{guestinfo}");
    get("timezone.offset")
        .parse::<i32>()
        .unwrap_or_else(|e| panic!("timezone.offset: {e}: {guestinfo}"));

    // domfsinfo: the file systems on the guest's disks, as the agent's
    // guest-get-fsinfo lists them (like qemu-ga, only those on block
    // devices): the ext4 disk on /mnt/data, which libvirt must match to the
    // domain's disk `vda` through the PCI address the agent reports.
    let fs = agent_command(&lv, r#"{"execute":"guest-get-fsinfo"}"#);
    lv.log(&format!("guest-get-fsinfo: {fs}"));
    let fs = fs["return"]
        .as_array()
        .unwrap_or_else(|| panic!("guest-get-fsinfo: {fs}"))
        .clone();
    let fsinfo = lv.virsh(&["domfsinfo", DOMAIN]);
    lv.log(&format!("virsh domfsinfo:\n{fsinfo}"));
    let table = rows(&fsinfo);
    let mounts: BTreeSet<String> = table.iter().map(|r| r[0].clone()).collect();
    let want: BTreeSet<String> = fs
        .iter()
        .map(|f| f["mountpoint"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(mounts, want, "domfsinfo and guest-get-fsinfo: {fsinfo}");
    let data = table
        .iter()
        .find(|r| r[0] == "/mnt/data")
        .unwrap_or_else(|| panic!("domfsinfo does not list /mnt/data: {fsinfo:?}"));
    assert_eq!(
        data[1..],
        ["vda", "ext4", "vda"].map(String::from),
        "domfsinfo row for /mnt/data (mount point, name, type, target): {fsinfo:?}"
    );

    // domtime: the guest's clock, seconds since the epoch.
    let time = lv.virsh(&["domtime", DOMAIN]);
    lv.log(&format!("virsh domtime: {}", time.trim()));
    let seconds: u64 = time
        .trim()
        .strip_prefix("Time:")
        .unwrap_or_else(|| panic!("domtime: {time:?}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("domtime: {e}: {time:?}"));
    assert!(seconds > 0, "{time:?}");

    // reboot --mode agent: the guest reboots through its init, the agent
    // comes back, libvirt reconnects.
    let mark = dom.console().mark();
    let out = lv.virsh(&["reboot", DOMAIN, "--mode", "agent"]);
    lv.log(&format!("virsh reboot --mode agent: {}", out.trim()));
    let mark = dom
        .console()
        .wait_contains(mark, "KVA-INIT reboot requested");
    dom.console().wait_contains(mark, "KVA-AGENT-PID");
    assert!(mark > booted);
    let ping = wait_agent(&lv);
    assert_eq!(ping, serde_json::json!({"return": {}}));
    let after = native_info(&dom);
    assert_ne!(
        after.boot_id, native.boot_id,
        "the native protocol reports the same boot id after the reboot"
    );
    lv.log(&format!(
        "rebooted: boot id {} -> {}",
        native.boot_id, after.boot_id
    ));

    // shutdown --mode agent: the guest powers off; libvirt sees it shut off.
    let mark = dom.console().mark();
    let out = lv.virsh(&["shutdown", DOMAIN, "--mode", "agent"]);
    lv.log(&format!("virsh shutdown --mode agent: {}", out.trim()));
    dom.console()
        .wait_contains(mark, "KVA-INIT poweroff requested");
    dom.wait_state("shut off");
    lv.log("domain shut off");
}
