//! Which accelerator the guests run with: KVM where it works, else TCG.
//!
//! `KVA_VM_ACCEL` decides: `kvm` or `tcg` force one; `auto` (the default)
//! probes. The probe:
//!
//! 1. `/dev/kvm` must open read-write, else TCG at once.
//! 2. A real boot: QEMU with `-accel kvm`, the guest kernel and no root file
//!    system. A kernel that works gets as far as mounting the root, fails,
//!    prints "Unable to mount root fs" and panics (`panic=-1` with
//!    `-no-reboot`: QEMU exits). Under KVM that takes well under a second,
//!    under TCG about two; the probe allows [`PROBE_DEADLINE`]. On the
//!    project's machines `/dev/kvm` exists but Debian's kernel prints nothing
//!    at all under it (it fails with emulation errors after ~100 s), so the
//!    probe times out and TCG is chosen.
//!
//! The answer is cached per host boot (the key holds the host's boot id and
//! the QEMU binary and kernel used), in `<cache>/accel/`: the probe costs its
//! deadline once, then nothing. The choice and its reason are printed, and
//! passed to the tests as `KVA_VM_ACCEL=kvm|tcg`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::initramfs::fnv1a;
use crate::Result;

/// How long a kernel gets to reach its root mount under `-accel kvm`.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// The accelerator to use (`"kvm"` or `"tcg"`), printing what was chosen and why.
pub fn choose(qemu: &Path, kernel: &Path, cache: &Path) -> Result<&'static str> {
    let (accel, why) = decide(qemu, kernel, cache)?;
    println!("xtask: accelerator: {accel} ({why})");
    Ok(accel)
}

fn decide(qemu: &Path, kernel: &Path, cache: &Path) -> Result<(&'static str, String)> {
    match std::env::var("KVA_VM_ACCEL").as_deref() {
        Ok("kvm") => return Ok(("kvm", "KVA_VM_ACCEL=kvm".into())),
        Ok("tcg") => return Ok(("tcg", "KVA_VM_ACCEL=tcg".into())),
        Ok("auto" | "") | Err(_) => {}
        Ok(other) => return Err(format!("KVA_VM_ACCEL={other}: expected kvm, tcg or auto")),
    }
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Ok(("tcg", format!("/dev/kvm cannot be opened read-write: {e}")));
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let stamp = |p: &Path| {
        fs::metadata(p)
            .map(|m| format!("{}:{}:{:?}", p.display(), m.len(), m.modified().ok()))
            .unwrap_or_default()
    };
    let key = fnv1a(format!("{}|{}|{}", boot_id.trim(), stamp(qemu), stamp(kernel)).as_bytes());
    let dir = cache.join("accel");
    let cached = dir.join(format!("{key:016x}"));
    if let Ok(text) = fs::read_to_string(&cached) {
        let (accel, why) = text.split_once('\n').unwrap_or((text.as_str(), ""));
        let accel = match accel.trim() {
            "kvm" => "kvm",
            _ => "tcg",
        };
        return Ok((
            accel,
            format!("{} — probed earlier in this host boot", why.trim()),
        ));
    }
    let (accel, why) = probe(qemu, kernel)?;
    let _ = fs::remove_dir_all(&dir);
    if fs::create_dir_all(&dir).is_ok() {
        let _ = fs::write(&cached, format!("{accel}\n{why}\n"));
    }
    Ok((accel, why))
}

/// QEMU, killed when dropped.
struct Probe(Child);

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn probe(qemu: &Path, kernel: &Path) -> Result<(&'static str, String)> {
    let started = Instant::now();
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "kvm", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot", "-smp", "1", "-m", "128M"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1", "-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    println!(
        "xtask: probing KVM: booting {} with -accel kvm (up to {} s)",
        kernel.display(),
        PROBE_DEADLINE.as_secs()
    );
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let out = child.stdout.take().expect("piped");
    let _guard = Probe(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = started + PROBE_DEADLINE;
    let mut lines = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                lines += 1;
                if line.contains("Unable to mount root fs") || line.contains("Kernel panic") {
                    return Ok((
                        "kvm",
                        format!(
                            "a probe kernel booted to its root mount under -accel kvm in {:.1} s",
                            started.elapsed().as_secs_f64()
                        ),
                    ));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Ok((
                    "tcg",
                    format!(
                        "/dev/kvm opens, but a probe kernel did not reach its root mount under \
                         -accel kvm within {} s ({lines} console lines)",
                        PROBE_DEADLINE.as_secs()
                    ),
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Ok((
                    "tcg",
                    format!(
                        "QEMU with -accel kvm exited after {:.1} s before the probe kernel \
                         reached its root mount ({lines} console lines)",
                        started.elapsed().as_secs_f64()
                    ),
                ))
            }
        }
    }
}
