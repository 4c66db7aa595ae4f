//! `cargo xtask vm-test`: boot real guests under QEMU and test the agent's
//! virtio-serial and vsock transports there (the harness is crates/vmtest).
//!
//! Steps: install the host tools when missing ([`prereqs`]), build the agent
//! as a static binary, fetch and unpack Debian's kernel ([`kernel`]), pack a
//! busybox initramfs ([`initramfs`]), then run the harness's tests with the
//! paths in `KVA_VM_*` environment variables.
//!
//! Everything built or downloaded lives outside the checkout, in
//! `$XDG_CACHE_HOME/kvm-manager-agent` (or `$HOME/.cache/kvm-manager-agent`);
//! guest console logs go to `target/vmtest/<test>/`.

pub mod accel;
pub mod debian;
pub(crate) mod elf;
pub(crate) mod initramfs;
mod kernel;
pub(crate) mod prereqs;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::test::{run_cargo_test, Report};
use crate::{cmd, Result};

/// The harness package.
pub const HARNESS: &str = "kvm-agent-vmtest";

/// Guests the harness may run at once (2 cores: more only slows all down).
const TEST_THREADS: &str = "--test-threads=2";

const HELP: &str = "\
Usage: cargo xtask vm-test [--env] [TEST_FILTER...] [-- HARNESS_ARGS...]

Builds the static agent, the guest kernel and initramfs (cached), installs
QEMU and vhost-device-vsock when missing, then runs the VM tests of
crates/vmtest (at most two guests at once).

  --env    Build everything, then print the environment the tests need
           (`export KVA_VM_...=...` lines, after the build's own output)
           instead of running them
";

/// What the harness needs, as environment variables.
#[derive(Debug)]
pub struct Images {
    vars: Vec<(&'static str, PathBuf)>,
}

/// `cargo xtask vm-test [...]`
pub fn run(args: &[String]) -> Result {
    let mut print_env = false;
    let mut filters = Vec::new();
    let mut harness_args = Vec::new();
    let mut rest = args.iter();
    for arg in rest.by_ref() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            "--env" => print_env = true,
            "--" => break,
            a if a.starts_with('-') => {
                return Err(format!(
                    "unknown option `{a}` (see `cargo xtask vm-test --help`)"
                ))
            }
            f => filters.push(f.to_string()),
        }
    }
    harness_args.extend(rest.cloned());
    let images = prepare()?;
    if print_env {
        for (k, v) in &images.vars {
            println!("export {k}={}", v.display());
        }
        return Ok(());
    }
    let mut report = Report::default();
    run_harness(&images, &filters, &harness_args, &mut report)
}

/// The `vm` step of `cargo xtask test`.
pub fn step(report: &mut Report) -> Result {
    let images = prepare()?;
    run_harness(&images, &[], &[], report)
}

fn run_harness(
    images: &Images,
    filters: &[String],
    extra: &[String],
    report: &mut Report,
) -> Result {
    let mut test = cmd::cargo();
    test.args(["test", "-p", HARNESS, "--no-fail-fast", "--"]);
    test.arg(TEST_THREADS).args(filters).args(extra);
    for (k, v) in &images.vars {
        test.env(k, v);
    }
    run_cargo_test(&mut test, report)
}

impl Images {
    /// Set every `KVA_VM_*` variable on `cmd`.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
    }

    /// The value of one of the `KVA_VM_*` variables.
    pub fn get(&self, key: &str) -> Option<&Path> {
        self.vars
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_path())
    }
}

/// Install, build and cache everything the guests need.
pub fn prepare() -> Result<Images> {
    prepare_with("initramfs", &[])
}

/// [`prepare`], with `extra` files in the initramfs, which is cached in its
/// own `folder` of the cache.
pub(crate) fn prepare_with(folder: &str, extra: &[initramfs::Extra]) -> Result<Images> {
    let started = Instant::now();
    let tools = prereqs::ensure_all()?;
    let cache = cache_dir()?;
    println!("xtask: VM images are cached in {}", cache.display());
    let agent = build_static_agent()?;
    let kernel = kernel::prepare(&cache)?;
    let module_names: Vec<&str> = kernel.modules.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "xtask: kernel {} with modules {}",
        kernel.package,
        module_names.join(" ")
    );
    let initramfs = initramfs::build_in(
        &cache,
        folder,
        &agent,
        &tools.busybox,
        &kernel.modules,
        extra,
    )?;
    let accel = accel::choose(&tools.qemu, &kernel.vmlinux, &cache)?;
    println!(
        "xtask: initramfs {} ({} KiB); images ready in {:.1}s",
        initramfs.display(),
        std::fs::metadata(&initramfs).map_or(0, |m| m.len() / 1024),
        started.elapsed().as_secs_f64()
    );
    Ok(Images {
        vars: vec![
            ("KVA_VM_QEMU", tools.qemu),
            ("KVA_VM_VHOST_DEVICE_VSOCK", tools.vhost_device_vsock),
            ("KVA_VM_KERNEL", kernel.vmlinux),
            ("KVA_VM_INITRAMFS", initramfs),
            ("KVA_VM_LOG_DIR", target_dir().join("vmtest")),
            ("KVA_VM_ACCEL", PathBuf::from(accel)),
        ],
    })
}

/// `$XDG_CACHE_HOME/kvm-manager-agent`, else `$HOME/.cache/kvm-manager-agent`.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").ok_or("neither XDG_CACHE_HOME nor HOME is set")?)
                .join(".cache")
        }
    };
    let dir = base.join("kvm-manager-agent");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("target"))
}

/// The agent as a static binary (glibc, `+crt-static`), in its own target
/// folder so the different RUSTFLAGS do not invalidate the usual build.
/// Optimised for size (`opt-level = "s"`): this is the binary the packages
/// ship, and it must stay under 3 MB (`cargo xtask dist` checks); at the
/// default level 3 it had reached 3.15 MB, at "s" 2.59 MB.
pub(crate) fn build_static_agent() -> Result<PathBuf> {
    let triple = "x86_64-unknown-linux-gnu";
    let dir = target_dir().join("static");
    let mut build = cmd::cargo();
    build
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "-p",
            "kvm-manager-agent",
            "--target",
            triple,
            "--config",
            "profile.release.opt-level=\"s\"",
        ])
        .arg("--target-dir")
        .arg(&dir);
    cmd::run(&mut build)?;
    let bin = dir.join(triple).join("release").join("kvm-manager-agent");
    check_static(&bin)?;
    Ok(bin)
}

fn check_static(bin: &Path) -> Result {
    let bytes = std::fs::read(bin).map_err(|e| format!("cannot read {}: {e}", bin.display()))?;
    if elf::is_static(&bytes, &bin.display().to_string())? {
        Ok(())
    } else {
        Err(format!(
            "{} asks for a dynamic loader (PT_INTERP): it would not run in the busybox guest",
            bin.display()
        ))
    }
}
