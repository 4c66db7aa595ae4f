//! `cargo xtask demo`: build the agent and the CLI, run the agent on a unix
//! socket in a temporary folder, and show `kvm-agent-ctl` talking to it.
//!
//! The agent is stopped (SIGTERM, then SIGKILL if it lingers) and the folder
//! removed on every exit path, by the guards' `Drop`.

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{cmd, Result};

/// How long the agent gets to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(args: &[String]) -> Result {
    if let Some(arg) = args.first() {
        return Err(format!(
            "`cargo xtask demo` takes no arguments (got `{arg}`)"
        ));
    }

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
