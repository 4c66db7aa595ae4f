//! The Debian guest: bookworm with systemd booted from a disk image, for the
//! packaging tests (`cargo xtask test debian`, which builds the images and
//! the packages; see xtask/src/vm/debian.rs).
//!
//! Besides the agent's virtio-serial port (a unix chardev socket, as in
//! [`crate::Vm`]) the guest has a test-only root shell on its second serial
//! port (ttyS1, another unix socket): [`DebianVm::sh`] sends one command line
//! and reads its output up to an end marker with the exit status. The guest
//! console (ttyS0: kernel, systemd) goes to `console.log`, the shell's output
//! to `shell.log`, both in `target/vmtest/<test>/`.
//!
//! Environment (set by xtask): `KVA_VM_QEMU`, `KVA_VM_KERNEL`,
//! `KVA_VM_LOG_DIR`, `KVA_DEBIAN_DISK` (root disk, booted with
//! `snapshot=on`), `KVA_DEBIAN_INITRAMFS`, `KVA_DEBIAN_PAYLOAD` (ext4 image
//! with the packages, the guest's /dev/vdb), `KVA_DEBIAN_VERSION_OLD` and
//! `KVA_DEBIAN_VERSION_NEW` (the versions of agent-old.deb and agent-new.deb).

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_agent_client::Target;
use serde_json::json;

use crate::{
    accel, die_with_parent, lock_ignoring_poison, Console, Qmp, Slot, PORT_ID, PORT_NAME, TIMEOUT,
};

/// Paths and versions from xtask.
#[derive(Debug, Clone)]
pub struct DebianImages {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub disk: PathBuf,
    pub initramfs: PathBuf,
    pub payload: PathBuf,
    pub log_dir: PathBuf,
    pub version_old: String,
    pub version_new: String,
}

impl DebianImages {
    /// Read the variables; panics (fails the test) when one is missing.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: the Debian guest tests need the images and packages \
                     that `cargo xtask test debian` builds"
                )
            })
        };
        let existing = |name: &str| {
            let p = PathBuf::from(var(name));
            assert!(p.exists(), "{name}={} does not exist", p.display());
            p
        };
        Self {
            qemu: existing("KVA_VM_QEMU"),
            kernel: existing("KVA_VM_KERNEL"),
            disk: existing("KVA_DEBIAN_DISK"),
            initramfs: existing("KVA_DEBIAN_INITRAMFS"),
            payload: existing("KVA_DEBIAN_PAYLOAD"),
            log_dir: PathBuf::from(var("KVA_VM_LOG_DIR")),
            version_old: var("KVA_DEBIAN_VERSION_OLD"),
            version_new: var("KVA_DEBIAN_VERSION_NEW"),
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running Debian guest; QEMU dies when it is dropped.
#[derive(Debug)]
pub struct DebianVm {
    name: String,
    log_dir: PathBuf,
    sock_dir: PathBuf,
    qemu: Child,
    console: Arc<Console>,
    shell_out: Arc<Console>,
    shell_in: Mutex<UnixStream>,
    qmp: Qmp,
    booted: Instant,
    commands: AtomicU32,
    _slot: Slot,
}

/// What a shell command did.
#[derive(Debug)]
pub struct Output {
    pub status: i32,
    pub text: String,
}

impl DebianVm {
    /// Boot the guest for test `name`, and wait for its test shell.
    pub fn boot(name: &str, images: &DebianImages) -> Self {
        let slot = Slot::take();
        let log_dir = images.log_dir.join(name);
        let _ = fs::remove_dir_all(&log_dir);
        fs::create_dir_all(&log_dir).expect("create the log folder");
        let sock_dir = std::env::temp_dir().join(format!(
            "kva-deb-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&sock_dir);
        fs::create_dir_all(&sock_dir).expect("create the socket folder");
        let sock = |n: &str| sock_dir.join(n).display().to_string();

        let mut cmd = Command::new(&images.qemu);
        cmd.args(["-accel", accel(), "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot", "-smp", "1", "-m", "512M"])
            .arg("-kernel")
            .arg(&images.kernel)
            .arg("-initrd")
            .arg(&images.initramfs)
            .args([
                "-append",
                "console=ttyS0 quiet panic=-1 systemd.show_status=1 random.trust_cpu=on",
            ])
            .args(["-serial", "stdio"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=shell,path={},server=on,wait=off",
                sock("shell.sock")
            ))
            .args(["-serial", "chardev:shell"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,snapshot=on",
                images.disk.display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,readonly=on",
                images.payload.display()
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock("qmp.sock")))
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=kva,path={},server=on,wait=off",
                sock("kva.sock")
            ))
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=vser0.0,chardev=kva,id={PORT_ID},name={PORT_NAME}"
            ));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(log_dir.join("qemu.log")).expect("create qemu.log"));
        die_with_parent(&mut cmd);
        let mut line = images.qemu.display().to_string();
        for a in cmd.get_args() {
            let _ = write!(line, " {}", a.to_string_lossy());
        }
        let _ = fs::write(log_dir.join("qemu-command.txt"), format!("{line}\n"));
        let booted = Instant::now();
        let mut qemu = cmd.spawn().expect("start QEMU");
        let console = Console::start(
            log_dir.join("console.log"),
            qemu.stdout.take().expect("piped"),
        );
        let qmp = Qmp::connect(&sock_dir.join("qmp.sock"), &mut qemu);
        // The shell's socket exists once QMP answers (QEMU made all chardevs).
        let shell =
            UnixStream::connect(sock_dir.join("shell.sock")).expect("connect to the test shell");
        let shell_out = Console::start(
            log_dir.join("shell.log"),
            shell.try_clone().expect("clone the shell socket"),
        );
        let vm = Self {
            name: name.to_string(),
            log_dir,
            sock_dir,
            qemu,
            console,
            shell_out,
            shell_in: Mutex::new(shell),
            qmp,
            booted,
            commands: AtomicU32::new(0),
            _slot: slot,
        };
        vm.log(&format!(
            "booting the Debian guest (logs in {})",
            vm.log_dir.display()
        ));
        vm.shell_out.wait_contains(0, "KVA-SHELL-READY");
        vm.log("the test shell is up");
        vm
    }

    pub fn log(&self, what: &str) {
        println!(
            "[{} +{:.1}s] {what}",
            self.name,
            self.booted.elapsed().as_secs_f64()
        );
    }

    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Run `command` (one line of bash) as root in the guest, with no
    /// standard input; returns its exit status and output (stdout and stderr).
    pub fn sh(&self, command: &str) -> Output {
        assert!(!command.contains('\n'), "one line per command");
        let n = self.commands.fetch_add(1, Ordering::Relaxed);
        let marker = format!("KVA-RC-{n}:");
        let from = self.shell_out.mark();
        {
            let mut w = lock_ignoring_poison(&self.shell_in);
            writeln!(
                w,
                "{{ {command} ; }} </dev/null 2>&1; kva_rc=$?; echo \"\"; echo \"{marker}$kva_rc\""
            )
            .expect("write to the test shell");
        }
        let (end, status) =
            self.shell_out
                .wait_for(from, &format!("the end of `{command}`"), |l| {
                    l.strip_prefix(&marker)
                        .and_then(|s| s.trim().parse::<i32>().ok())
                });
        let mut lines = self.shell_out.lines_since(from);
        lines.truncate(end - from - 1);
        // The empty line the host added before the marker.
        if lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        let text = lines.join("\n");
        self.log(&format!("$ {command}  -> {status}"));
        for l in &lines {
            println!("    | {l}");
        }
        Output { status, text }
    }

    /// [`Self::sh`], failing the test unless it exits with 0; returns the output.
    pub fn ok(&self, command: &str) -> String {
        let out = self.sh(command);
        assert_eq!(
            out.status, 0,
            "`{command}` failed ({}):\n{}",
            out.status, out.text
        );
        out.text
    }

    /// Send a command without waiting for it (poweroff).
    pub fn send(&self, command: &str) {
        let mut w = lock_ignoring_poison(&self.shell_in);
        writeln!(w, "{command}").expect("write to the test shell");
        self.log(&format!("$ {command}  (not waiting)"));
    }

    /// Wait until QEMU exits by itself; returns its exit status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.qemu.try_wait().expect("wait for QEMU") {
                self.log(&format!("QEMU exited: {s}"));
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU did not exit within {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client target for the agent's virtio-serial port.
    pub fn serial_target(&self) -> Target {
        Target::Unix(self.sock_dir.join("kva.sock"))
    }

    /// Wait until the guest has opened the agent's port (QMP
    /// `VSERPORT_CHANGE` with `open: true`, or already open when asked).
    pub fn wait_port_open(&self) {
        let chardevs = self.qmp.execute("query-chardev", json!({}));
        let open_now = chardevs
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["label"] == "kva" && c["frontend-open"] == true);
        if !open_now {
            self.qmp.wait("VSERPORT_CHANGE open=true", |st| {
                st.events
                    .iter()
                    .any(|e| {
                        e["event"] == "VSERPORT_CHANGE"
                            && e["data"]["id"] == PORT_ID
                            && e["data"]["open"] == true
                    })
                    .then_some(())
            });
        }
        self.log("the guest opened the agent's virtio-serial port");
    }
}

impl Drop for DebianVm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = fs::remove_dir_all(&self.sock_dir);
        if std::thread::panicking() {
            let mut msg = format!(
                "\n[{}] test failed; logs in {}\n[{}] last console lines:\n",
                self.name,
                self.log_dir.display(),
                self.name
            );
            for line in self.console.tail(30) {
                let _ = writeln!(msg, "    {line}");
            }
            let _ = writeln!(msg, "[{}] last shell lines:", self.name);
            for line in self.shell_out.tail(30) {
                let _ = writeln!(msg, "    {line}");
            }
            eprintln!("{msg}");
        }
    }
}

/// The overall exposure `systemd-analyze security UNIT` printed, e.g. 4.2.
pub fn exposure(analyze_output: &str) -> Option<f64> {
    let line = analyze_output
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let rest = line.split_once(": ")?.1;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exposure_line() {
        let out = "  NAME  DESCRIPTION  EXPOSURE\n✗ PrivateNetwork= ...  0.5\n\n→ Overall exposure level for kvm-manager-agent.service: 4.1 OK 🙂\n";
        assert_eq!(exposure(out), Some(4.1));
        assert_eq!(exposure("nothing"), None);
    }
}
