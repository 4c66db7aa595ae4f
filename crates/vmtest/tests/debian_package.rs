//! The agent's .deb in a real Debian bookworm guest under systemd: install
//! (postinst enables and starts the unit, the agent answers on its
//! virtio-serial port), the unit's `systemd-analyze security` exposure
//! against a bare unit, an upgrade that keeps a changed configuration,
//! kvm-agent-ctl's .deb, remove and purge leaving nothing behind, then a
//! reinstall with exec allowed, and a shutdown through the agent.
//!
//! Needs `cargo xtask test debian` (images and packages; see
//! kvm_agent_vmtest::debian). One boot for the whole story.

use kvm_agent_client::protocol::methods::exec::ExecParams;
use kvm_agent_client::protocol::methods::info::GetInfoParams;
use kvm_agent_client::protocol::methods::power::PowerParams;
use kvm_agent_client::Client;
use kvm_agent_vmtest::debian::{exposure, DebianImages, DebianVm};
use kvm_agent_vmtest::{check_agent, runtime, Vm};

const UNIT: &str = "kvm-manager-agent.service";
const CONF: &str = "/etc/kvm-manager-agent/config.toml";

/// Connect through the virtio-serial chardev, check agent_ready, ping and
/// get_capabilities; returns the guest's host name from get_info.
fn talk_to_agent(vm: &DebianVm) -> String {
    vm.wait_port_open();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect to the agent's virtio-serial port");
        check_agent(&client).await;
        let info = client
            .get_info(&GetInfoParams::default())
            .await
            .expect("get_info");
        let os = serde_json::to_value(&info).expect("info as JSON");
        println!("    get_info: {os}");
        let hostname = os["hostname"].as_str().unwrap_or_default().to_string();
        let pretty = os.to_string();
        assert!(
            pretty.contains("Debian"),
            "get_info does not name Debian: {pretty}"
        );
        hostname
    })
}

/// The audit trail under systemd goes to journald with structured fields:
/// the requests `talk_to_agent` sent are there, one record each.
fn check_audit_in_journal(vm: &DebianVm) {
    // journald files datagrams asynchronously: wait until the last one is in.
    let query = "journalctl -o json --no-pager KVA_AUDIT=1";
    vm.ok(&format!(
        "for i in $(seq 1 100); do {query} KVA_METHOD=get_info | grep -q KVA_METHOD && break; sleep 0.1; done"
    ));
    let out = vm.ok(query);
    let records: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let count = |method: &str| records.iter().filter(|r| r["KVA_METHOD"] == method).count();
    assert_eq!(count("ping"), 1, "ping records in the journal: {out}");
    assert_eq!(count("get_capabilities"), 1, "{out}");
    assert_eq!(count("get_info"), 1, "{out}");
    for r in &records {
        assert_eq!(r["SYSLOG_IDENTIFIER"], "kvm-manager-agent", "{r}");
        assert_eq!(r["KVA_TRANSPORT"], "virtio-serial", "{r}");
        assert_eq!(r["KVA_DECISION"], "allowed", "{r}");
        assert_eq!(r["KVA_OUTCOME"], "ok", "{r}");
        assert!(
            r["KVA_PEER"]
                .as_str()
                .unwrap_or_default()
                .starts_with("virtio-serial /dev/"),
            "{r}"
        );
        assert!(
            r["MESSAGE"]
                .as_str()
                .unwrap_or_default()
                .starts_with("audit: "),
            "{r}"
        );
    }
    vm.log(&format!(
        "journald holds {} audit records with KVA_* fields",
        records.len()
    ));
}

fn main_pid(vm: &DebianVm) -> String {
    vm.ok(&format!("systemctl show -p MainPID --value {UNIT}"))
        .trim()
        .to_string()
}

#[test]
fn deb_install_upgrade_remove_purge_under_systemd() {
    let images = DebianImages::from_env();
    let mut vm = DebianVm::boot("debian_package", &images);
    let state = vm.sh("systemctl is-system-running --wait");
    vm.log(&format!("system state: {}", state.text.trim()));
    vm.ok("mount -o ro /dev/vdb /mnt && ls -l /mnt");
    assert_ne!(
        vm.sh("dpkg-query -W kvm-manager-agent").status,
        0,
        "the agent is installed before the test installed it"
    );

    // Install: a real dpkg -i, whose postinst enables and starts the unit.
    vm.ok("dpkg -i /mnt/agent-old.deb");
    assert_eq!(
        vm.ok(&format!("systemctl is-enabled {UNIT}")).trim(),
        "enabled"
    );
    assert_eq!(
        vm.ok(&format!("systemctl is-active {UNIT}")).trim(),
        "active"
    );
    assert_eq!(
        vm.ok("dpkg-query -W -f '${Version}' kvm-manager-agent")
            .trim(),
        images.version_old
    );
    vm.ok(&format!(
        "stat -c '%a %U:%G %n' {CONF} /usr/bin/kvm-manager-agent"
    ));
    let hostname = talk_to_agent(&vm);
    assert_eq!(hostname, "kva-debian");
    check_audit_in_journal(&vm);
    vm.ok(&format!("journalctl -b -u {UNIT} --no-pager | tail -n 20"));

    // The hardened unit against the same service with no hardening at all.
    vm.ok(
        "printf '[Service]\\nExecStart=/usr/bin/kvm-manager-agent\\nRestart=always\\n' \
         > /run/systemd/system/kva-bare.service && systemctl daemon-reload",
    );
    let bare = vm.ok("systemd-analyze security --no-pager kva-bare.service");
    let hardened = vm.ok(&format!("systemd-analyze security --no-pager {UNIT}"));
    let (bare, hardened) = (
        exposure(&bare).expect("an exposure level for the bare unit"),
        exposure(&hardened).expect("an exposure level for the unit"),
    );
    vm.log(&format!(
        "systemd-analyze security: bare unit {bare}, kvm-manager-agent.service {hardened}"
    ));
    assert!(
        hardened <= 5.0 && hardened < bare,
        "exposure {hardened} (bare {bare}): the hardening regressed"
    );
    // The agent really runs under it and still works (it answered above).
    let pid = main_pid(&vm);
    vm.ok(&format!(
        "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/{pid}/status"
    ));

    // Upgrade to the next version after changing the configuration: the
    // change is kept (the new default lands beside it as .dpkg-dist) and the
    // agent is restarted with the new binary.
    vm.ok(&format!(
        "sed -i 's/^log_level = \"info\"/log_level = \"debug\"/' {CONF} && grep -n '^log_level' {CONF}"
    ));
    vm.ok("dpkg --force-confold -i /mnt/agent-new.deb");
    assert_eq!(
        vm.ok("dpkg-query -W -f '${Version}' kvm-manager-agent")
            .trim(),
        images.version_new
    );
    assert!(
        vm.ok(&format!("grep '^log_level' {CONF}"))
            .contains("\"debug\""),
        "the upgrade did not keep the changed config"
    );
    vm.ok(&format!("grep -q 'test1 upgrade' {CONF}.dpkg-dist"));
    assert_eq!(
        vm.ok(&format!("systemctl is-active {UNIT}")).trim(),
        "active"
    );
    let new_pid = main_pid(&vm);
    assert_ne!(new_pid, pid, "the upgrade did not restart the agent");
    talk_to_agent(&vm);

    // kvm-agent-ctl's package installs (its dependencies are bookworm's),
    // runs, and ships its completions.
    vm.ok("dpkg -i /mnt/ctl.deb && kvm-agent-ctl --version");
    vm.ok(
        "test -s /usr/share/bash-completion/completions/kvm-agent-ctl && \
         test -s /usr/share/zsh/vendor-completions/_kvm-agent-ctl && \
         test -s /usr/share/fish/vendor_completions.d/kvm-agent-ctl.fish && \
         test -s /usr/share/man/man1/kvm-agent-ctl.1.gz",
    );
    vm.ok("dpkg --purge kvm-agent-ctl && ! test -e /usr/bin/kvm-agent-ctl");

    // Remove: the agent stops, the binary goes, the conffile stays.
    let files = vm.ok("dpkg -L kvm-manager-agent");
    vm.ok("dpkg --remove kvm-manager-agent");
    assert_ne!(vm.sh(&format!("systemctl is-active {UNIT}")).status, 0);
    vm.ok("! test -e /usr/bin/kvm-manager-agent && test -e /etc/kvm-manager-agent/config.toml");
    assert!(vm
        .ok("dpkg -l kvm-manager-agent")
        .contains("rc  kvm-manager-agent"));

    // Purge: nothing left, not even the folder, the enablement or dpkg's record.
    vm.ok("dpkg --purge kvm-manager-agent");
    assert_ne!(vm.sh("dpkg-query -W kvm-manager-agent").status, 0);
    let mut left = Vec::new();
    for f in files.lines().map(str::trim).filter(|f| f.starts_with('/')) {
        let is_ours = f.contains("kvm-manager-agent");
        if is_ours && vm.sh(&format!("test -e '{f}'")).status == 0 {
            left.push(f.to_string());
        }
    }
    assert!(left.is_empty(), "purge left {left:?}");
    vm.ok("! test -e /etc/kvm-manager-agent && \
         ! test -e /etc/systemd/system/multi-user.target.wants/kvm-manager-agent.service && \
         ! ls /var/lib/systemd/deb-systemd-helper-enabled/ | grep -q kvm-manager-agent && \
         ! ls /var/lib/systemd/deb-systemd-helper-masked/ 2>/dev/null | grep -q kvm-manager-agent");
    assert_eq!(
        vm.ok(&format!("systemctl show -p LoadState --value {UNIT}"))
            .trim(),
        "not-found"
    );

    // Installed again after the purge, with /usr/bin/id allowed and
    // /usr/bin/whoami allowed as nobody: exec, run_as and a
    // graceful shutdown work under the hardened unit (NoNewPrivileges,
    // the capability bounding set and the system call filter are inherited by
    // the commands the agent runs, systemctl poweroff among them).
    vm.ok("dpkg -i /mnt/agent-old.deb");
    vm.ok(&format!(
        "sed -i -e 's/^enable_exec = false/enable_exec = true/' \
         -e 's|^allowed_commands = \\[\\]|allowed_commands = [\"/usr/bin/id\"]|' {CONF} \
         && printf '\\n[[security.commands]]\\npath = \"/usr/bin/whoami\"\\nrun_as = \"nobody\"\\n' >> {CONF} \
         && grep -nE '^(enable_exec|allowed_commands|path|run_as)' {CONF} && systemctl restart {UNIT}"
    ));
    vm.wait_port_open();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(vm.serial_target(), Vm::client_options())
            .await
            .expect("connect to the reinstalled agent");
        let ran = client
            .exec(&ExecParams {
                command: "/usr/bin/id".into(),
                args: vec!["-u".into()],
                ..ExecParams::default()
            })
            .await
            .expect("exec /usr/bin/id -u");
        println!("    exec /usr/bin/id -u: {ran:?}");
        assert_eq!(ran.exit_code, Some(0), "id -u failed: {ran:?}");
        assert_eq!(ran.stdout.data.trim(), "0", "id -u under the unit: {ran:?}");
        // run_as under the unit: CAP_SETUID/CAP_SETGID are in its bounding set.
        let as_nobody = client
            .exec(&ExecParams {
                command: "/usr/bin/whoami".into(),
                ..ExecParams::default()
            })
            .await
            .expect("exec /usr/bin/whoami (run_as nobody)");
        println!("    exec /usr/bin/whoami as nobody: {as_nobody:?}");
        assert_eq!(
            as_nobody.stdout.data.trim(),
            "nobody",
            "run_as: {as_nobody:?}"
        );
        let accepted = client
            .shutdown(&PowerParams {
                confirm: true,
                ..PowerParams::default()
            })
            .await
            .expect("shutdown");
        println!("    shutdown: {accepted:?}");
    });
    let status = vm.wait_exit();
    assert!(
        status.success(),
        "QEMU exited with {status} after the agent's shutdown"
    );
}
