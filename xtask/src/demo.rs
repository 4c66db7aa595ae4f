//! `cargo xtask demo`: boot the minimal busybox guest under QEMU with the
//! agent inside, and show the real `kvm-agent-ctl` talking to it over the
//! guest's virtio-serial port: info, metrics, an allowed and a refused exec,
//! a file to the guest and back with its sha256, and a shutdown that makes
//! QEMU exit. The guest images come from `cargo xtask vm-test`'s image step
//! (installed, built and cached on first use).
//!
//! `cargo xtask demo --local`: the agent on a unix socket in a temporary
//! folder on this machine, no VM.
//!
//! QEMU (or the local agent) is stopped and the temporary folder removed on
//! every exit path, by the guards' `Drop`.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{cmd, Result};

/// How long the agent gets to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(args: &[String]) -> Result {
    match args {
        [] => vm_demo(),
        [a] if a == "--local" => local_demo(),
        [a, ..] => Err(format!("`cargo xtask demo` takes only --local (got `{a}`)")),
    }
}

/// The local demo: the agent on a unix socket, no VM.
fn local_demo() -> Result {
    explain("Build the guest agent and the host CLI (release profile).");
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "kvm-manager-agent",
        "-p",
        "kvm-agent-client",
    ]))?;
    let release = target_dir().join("release");
    let agent_bin = existing(release.join("kvm-manager-agent"))?;
    let ctl_bin = existing(release.join("kvm-agent-ctl"))?;

    // Declared before the agent so that it is dropped after it.
    let dir = TempDir::new("kvm-agent-demo")?;
    let socket = dir.path().join("agent.sock");
    let log_path = dir.path().join("agent.log");
    let connect = format!("unix:{}", socket.display());

    explain(
        "Start the agent. In a VM it talks over virtio-serial or vsock; here it \
         listens on a unix socket in a fresh temporary folder. Its log (stderr) \
         goes to agent.log there and is shown at the end.",
    );
    let log = File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot duplicate the log file handle: {e}"))?;
    let mut command = Command::new(&agent_bin);
    command
        .arg("--transport")
        .arg(&connect)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    cmd::announce(&command);
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", agent_bin.display()))?;
    let mut agent = Agent { child: Some(child) };

    if let Err(e) = agent.wait_for_socket(&socket) {
        show_log(&log_path);
        return Err(e);
    }
    println!("agent is up: {} exists", socket.display());

    let ctl = |what: &str| {
        let mut c = Command::new(&ctl_bin);
        c.args(["--connect", &connect, what]);
        c
    };

    explain("Ping the agent: the cheapest round trip, to check it answers.");
    cmd::run(&mut ctl("ping"))?;

    explain("Ask which protocol version and methods this agent offers.");
    cmd::run(&mut ctl("caps"))?;

    explain(
        "Ask for guest information (OS, kernel, hostname, network interfaces). \
         An agent whose platform lacks this handler answers with a \"not \
         implemented\" error: the demo shows the answer either way and goes on.",
    );
    let mut info = ctl("info");
    let status = cmd::status(&mut info)?;
    if !status.success() {
        println!("(kvm-agent-ctl: {}; continuing)", ctl_exit_meaning(status));
    }

    explain("Stop the agent with SIGTERM, as a service manager would, and wait for it.");
    let status = agent.stop()?;
    println!("agent exited: {status}");
    show_log(&log_path);
    if !status.success() {
        return Err(format!(
            "the agent did not exit cleanly after SIGTERM ({status})"
        ));
    }

    explain("Done. The temporary folder is removed.");
    drop(dir);
    Ok(())
}

/// How long the guest gets to boot and open the agent's port.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long QEMU gets to exit after the shutdown answer.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);
/// The demo file's size.
const DEMO_FILE_BYTES: usize = 4 << 20;

/// The demo with a real guest.
fn vm_demo() -> Result {
    let started = Instant::now();
    explain(
        "Prepare the guest: QEMU, Debian's kernel and a busybox initramfs holding \
         the agent as a static binary (installed, built and cached on first use; \
         the same images as `cargo xtask vm-test`).",
    );
    let images = crate::vm::prepare()?;
    let var = |k: &str| {
        images
            .get(k)
            .map(Path::to_path_buf)
            .ok_or_else(|| format!("the image step did not provide {k}"))
    };
    let (qemu, kernel, initramfs) = (
        var("KVA_VM_QEMU")?,
        var("KVA_VM_KERNEL")?,
        var("KVA_VM_INITRAMFS")?,
    );
    let accel = var("KVA_VM_ACCEL")?.display().to_string();

    explain("Build the host CLI, kvm-agent-ctl (release profile).");
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "kvm-agent-client"]))?;
    let ctl_bin = existing(target_dir().join("release").join("kvm-agent-ctl"))?;

    // Declared before the guest so that it is removed after QEMU is gone.
    let dir = TempDir::new("kvm-agent-demo")?;
    let socket = dir.path().join("agent.sock");
    let console_log = dir.path().join("console.log");
    explain(&format!(
        "Boot the guest (-accel {accel}, 512 MiB). Its /init starts the agent with \
         the configuration xtask/src/vm/configs/e2e.toml (exec allowed for uname, \
         sha256sum and `ls -l /tmp`; files under /tmp). The agent's virtio-serial \
         port org.kvmmanager.agent.0 is a unix socket on this side: {}",
        socket.display()
    ));
    let mut command = Command::new(&qemu);
    command
        .args(["-accel", &accel, "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot", "-smp", "1", "-m", "512M"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 kva.late=none kva.log=debug kva.config=e2e kva.tmp_mib=64",
            "-serial",
            "stdio",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
        ])
        .arg(format!(
            "socket,id=kva,path={},server=on,wait=off",
            socket.display()
        ))
        .args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=kva,name=org.kvmmanager.agent.0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd::announce(&command);
    let booted = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let console = Console::start(
        child.stdout.take().expect("piped"),
        File::create(&console_log)
            .map_err(|e| format!("cannot create {}: {e}", console_log.display()))?,
    );
    let mut guest = Guest { child: Some(child) };
    let ready = console.wait_for("opened virtio-serial port", BOOT_TIMEOUT);
    if let Err(e) = ready {
        show_console(&console_log, 20);
        return Err(e);
    }
    println!(
        "the agent opened its port {:.1} s after QEMU started",
        booted.elapsed().as_secs_f64()
    );

    let connect = format!("unix:{}", socket.display());
    let ctl = |args: &[&str]| {
        let mut c = Command::new(&ctl_bin);
        c.args(["--connect", &connect]).args(args);
        c
    };
    // One kvm-agent-ctl after the other on the same port: the next one
    // connects once the agent has seen the previous one leave (its
    // "disconnected" log line). A host that reconnects faster than the guest
    // notices gets no new agent_ready on virtio-serial: the guest sees no
    // disconnect at all (a known limitation, see the VM tests' notes).
    let ctl_status = |args: &[&str]| -> Result<ExitStatus> {
        let status = cmd::status(&mut ctl(args))?;
        console.wait_for("disconnected", BOOT_TIMEOUT)?;
        Ok(status)
    };
    let ctl_run = |args: &[&str]| -> Result {
        let mut c = ctl(args);
        let status = cmd::status(&mut c)?;
        console.wait_for("disconnected", BOOT_TIMEOUT)?;
        cmd::check(&c, status)
    };

    explain("Who is there: OS, kernel, hostname, interfaces, boot id, uptime.");
    ctl_run(&["info"])?;

    explain("Metrics: CPU, memory, disks, network, as the guest sees them.");
    ctl_run(&["metrics"])?;

    explain(
        "Run an allowed command in the guest; its output streams back and \
         kvm-agent-ctl exits with its exit code.",
    );
    ctl_run(&["exec", "--no-stdin", "--", "uname", "-a"])?;

    explain(
        "A command that is not on the allowlist is refused by the agent \
         (error -32000, exit code 1): no shell, no way around the list.",
    );
    let status = ctl_status(&["exec", "--no-stdin", "--", "cat", "/etc/passwd"])?;
    println!("(kvm-agent-ctl: {})", ctl_exit_meaning(status));
    if status.code() != Some(1) {
        return Err("the refused exec did not exit with 1".into());
    }

    let local = dir.path().join("demo.bin");
    let back = dir.path().join("back.bin");
    fs::write(&local, pseudo_random(DEMO_FILE_BYTES))
        .map_err(|e| format!("cannot write {}: {e}", local.display()))?;
    explain(&format!(
        "A file round trip: {} MiB of random bytes to the guest's /tmp and back, \
         in chunks (file_open, file_write/file_read, file_close), the sha256 \
         checked at both ends by kvm-agent-ctl.",
        DEMO_FILE_BYTES >> 20
    ));
    let local_s = local.display().to_string();
    let back_s = back.display().to_string();
    ctl_run(&["cp", &local_s, "guest:/tmp/demo.bin"])?;
    explain("The guest's own sha256sum of what arrived (an allowed exec):");
    ctl_run(&["exec", "--no-stdin", "--", "sha256sum", "/tmp/demo.bin"])?;
    ctl_run(&["cp", "guest:/tmp/demo.bin", &back_s])?;
    explain("And here, the file sent and the file that came back:");
    cmd::run(Command::new("sha256sum").arg(&local).arg(&back))?;
    let same = fs::read(&local).map_err(|e| e.to_string())?
        == fs::read(&back).map_err(|e| e.to_string())?;
    if !same {
        return Err("the file came back different".into());
    }
    println!("identical: yes");

    explain(
        "Shut the guest down through the agent (--yes confirms). The agent \
         answers first, then powers off; QEMU exits.",
    );
    cmd::run(&mut ctl(&["shutdown", "--yes"]))?;
    let status = guest.wait_exit(POWEROFF_TIMEOUT)?;
    println!("QEMU exited: {status}");

    explain("The guest console's last lines (the agent's log and its audit trail):");
    show_console(&console_log, 12);
    explain(&format!(
        "Done in {:.0} s. The temporary folder is removed.",
        started.elapsed().as_secs_f64()
    ));
    drop(dir);
    Ok(())
}

/// Reproducible pseudo-random bytes (xorshift64*).
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn show_console(path: &Path, last: usize) {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("KVA-CPU")).collect();
            for line in &lines[lines.len().saturating_sub(last)..] {
                println!("  guest| {line}");
            }
        }
        Err(e) => println!("(cannot read {}: {e})", path.display()),
    }
}

/// The guest's serial console: every line written to a file and handed to
/// whoever waits for one.
struct Console {
    lines: mpsc::Receiver<String>,
}

impl Console {
    fn start(out: impl Read + Send + 'static, mut log: File) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { lines: rx }
    }

    /// Wait for a line containing `needle`.
    fn wait_for(&self, needle: &str, limit: Duration) -> Result {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(()),
                Ok(line) if line.contains("KVA-AGENT-EXITED") => {
                    return Err(format!("the agent exited in the guest: {line}"))
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no {needle:?} on the guest console within {} s",
                        limit.as_secs()
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("QEMU exited before {needle:?} appeared"))
                }
            }
        }
    }
}

/// QEMU, killed when dropped unless it has exited.
struct Guest {
    child: Option<Child>,
}

impl Guest {
    fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().ok_or("QEMU is not running")?;
        let started = Instant::now();
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| format!("cannot wait for QEMU: {e}"))?
            {
                self.child = None;
                return Ok(status);
            }
            if started.elapsed() >= limit {
                return Err(format!(
                    "QEMU still runs {} s after the shutdown",
                    limit.as_secs()
                ));
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn explain(text: &str) {
    println!("\n# {text}");
}

fn existing(path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("the build did not produce {}", path.display()))
    }
}

/// cargo's target folder: `$CARGO_TARGET_DIR` or `target/` in the workspace.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => crate::root().join(dir),
        None => crate::root().join("target"),
    }
}

/// The CLI's documented exit codes.
fn ctl_exit_meaning(status: ExitStatus) -> String {
    let meaning = match status.code() {
        Some(1) => "the agent answered with an error",
        Some(2) => "usage error",
        Some(3) => "could not connect",
        Some(4) => "malformed answer",
        _ => "unexpected exit",
    };
    format!("{status}, {meaning}")
}

fn show_log(path: &Path) {
    println!("\n# The agent's log:");
    match fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => println!("(empty)"),
        Ok(text) => {
            for line in text.lines() {
                println!("  | {line}");
            }
        }
        Err(e) => println!("(cannot read {}: {e})", path.display()),
    }
}

/// The running agent; stopped on drop if still running.
#[derive(Debug)]
struct Agent {
    child: Option<Child>,
}

impl Agent {
    /// Poll for the socket; fail if the agent exits or the time runs out.
    fn wait_for_socket(&mut self, socket: &Path) -> Result {
        let started = Instant::now();
        loop {
            if fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "the agent exited before creating {} ({status})",
                        socket.display()
                    ));
                }
            }
            if started.elapsed() >= SOCKET_TIMEOUT {
                return Err(format!(
                    "the agent did not create {} within {} s",
                    socket.display(),
                    SOCKET_TIMEOUT.as_secs()
                ));
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL. Returns how it exited.
    fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err("the agent is not running".into());
        };
        let pid = child.id().to_string();
        // `kill` as the shell's builtin: no libc, no procps needed.
        let mut term = Command::new("sh");
        term.args(["-c", "kill -TERM \"$1\"", "kill", &pid]);
        println!("$ kill -TERM {pid}");
        let sent = term.status().is_ok_and(|s| s.success());
        let started = Instant::now();
        while sent && started.elapsed() < STOP_TIMEOUT {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("cannot wait for the agent: {e}")),
            }
        }
        eprintln!(
            "xtask: the agent (pid {pid}) did not exit within {} s of SIGTERM: killing it",
            STOP_TIMEOUT.as_secs()
        );
        let _ = child.kill();
        let status = child
            .wait()
            .map_err(|e| format!("cannot wait for the agent: {e}"))?;
        Err(format!(
            "the agent ignored SIGTERM and had to be killed ({status})"
        ))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.stop() {
                eprintln!("xtask: while stopping the agent: {e}");
            }
        }
    }
}

/// A fresh folder under the system's temporary folder, removed on drop.
#[derive(Debug)]
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(prefix: &str) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos:09}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Self { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("xtask: cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dir_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("xtask-test").unwrap();
        let path = dir.path().to_path_buf();
        fs::write(path.join("f"), "x").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn agent_guard_stops_a_child_on_drop() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let started = Instant::now();
        drop(Agent { child: Some(child) });
        assert!(started.elapsed() < STOP_TIMEOUT);
        // The child was reaped: `kill -0` finds no such process any more.
        let alive = Command::new("sh")
            .args(["-c", "kill -0 \"$1\" 2>/dev/null", "kill", &pid.to_string()])
            .status()
            .unwrap();
        assert!(!alive.success());
    }

    #[test]
    fn stop_reports_how_the_child_exited() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let mut agent = Agent { child: Some(child) };
        let status = agent.stop().unwrap();
        // `sleep` does not catch SIGTERM: it dies of it.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(15));
        assert!(agent.stop().is_err());
    }
}
