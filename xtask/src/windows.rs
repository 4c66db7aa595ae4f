//! The Windows target, built and tested on Linux: `cargo xtask test windows`
//! and `cargo xtask windows-cargo ARGS...`.
//!
//! - Toolchain: Debian's `rustc-web`/`cargo-web` with the std source
//!   (`rust-web-src`) and clippy (`rust-web-clippy`), building std for
//!   `x86_64-pc-windows-gnu` (`build-std`, hence `RUSTC_BOOTSTRAP=1`).
//!   rustup cannot download the Windows std on these machines, and rustup's
//!   own toolchains cannot build Debian's std source, so rustup's
//!   `~/.cargo/bin` must not shadow Debian's binaries: the commands run
//!   Debian's cargo with Debian's bin folder first in PATH.
//! - The cargo settings live in `.cargo/windows.toml`, passed with
//!   `--config`: a plain `cargo` run never sees them.
//! - Linker: mingw-w64. Runner: Wine, in a prefix of our own under
//!   `target/wine-prefix` (Windows 10 version, no Mono/Gecko).
//! - Wine 8.0 lacks `bcryptprimitives.dll!ProcessPrng`, which every Rust exe
//!   imports: without it each one exits at once with status 53.
//!   `windows/processprng.c` is a stand-in built with mingw and copied into
//!   the prefix's system32. It is for tests here only and never shipped.
//! - Output goes to `target/windows/` so that the two toolchains never share
//!   (and rebuild) each other's artifacts, nor wait on each other's lock.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod msi;

use crate::ensure::Need;
use crate::test::Report;
use crate::{cmd, Result};

/// Debian packages the Windows build and its tests need.
pub const NEEDS: &[Need] = &[
    Need::Apt("rustc-web"),
    Need::Apt("cargo-web"),
    Need::Apt("rust-web-src"),
    Need::Apt("rust-web-clippy"),
    Need::Apt("gcc-mingw-w64-x86-64"),
    Need::Apt("wine"),
    Need::Apt("wine64"),
    // wixl builds the MSI (`msi`).
    Need::Apt("wixl"),
];

/// The Rust target.
pub const TARGET: &str = "x86_64-pc-windows-gnu";

/// The crates that must build and pass their tests on Windows (not xtask,
/// not the VM harness).
pub const PACKAGES: &[&str] = &[
    "kvm-agent-protocol",
    "kvm-manager-agent",
    "kvm-agent-client",
];

/// Where Debian's rustc-web, cargo-web and clippy put their binaries.
const DEBIAN_BIN: &str = "/usr/bin";

/// The mingw-w64 C compiler (also cargo's linker, see `.cargo/windows.toml`).
const MINGW_GCC: &str = "x86_64-w64-mingw32-gcc";

/// Written into the prefix once it is fully set up.
const PREFIX_READY: &str = ".xtask-ready";

/// Variables set by rustup or by the cargo that runs xtask, which must not
/// reach Debian's cargo.
const HOST_TOOLCHAIN_VARS: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
];

/// Everything a Windows cargo command needs, once set up.
#[derive(Debug)]
pub struct Windows {
    root: PathBuf,
    prefix: PathBuf,
}

impl Windows {
    /// Set up the Wine prefix and the ProcessPrng stand-in (the packages in
    /// [`NEEDS`] must be installed already).
    pub fn prepare() -> Result<Self> {
        let root = crate::root();
        let prefix = root.join("target").join("wine-prefix");
        let this = Self { root, prefix };
        this.ensure_prefix()?;
        this.install_shim()?;
        Ok(this)
    }

    /// `cargo SUBCOMMAND --config .cargo/windows.toml` with Debian's
    /// toolchain, the Windows target directory and the Wine prefix. The
    /// option comes after the subcommand: an external subcommand such as
    /// `clippy` runs `cargo check` itself, and only options after its name
    /// reach that inner cargo (before it, clippy would check for Linux).
    pub fn cargo(&self, subcommand: &str) -> Command {
        let mut cargo = Command::new(Path::new(DEBIAN_BIN).join("cargo"));
        cargo.current_dir(&self.root);
        for var in HOST_TOOLCHAIN_VARS {
            cargo.env_remove(var);
        }
        cargo
            .env("PATH", debian_first_path())
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", self.root.join("target").join("windows"));
        self.wine_env(&mut cargo);
        cargo.args([subcommand, "--config", ".cargo/windows.toml"]);
        cargo
    }

    fn wine_env(&self, cmd: &mut Command) {
        cmd.env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            // No Mono or Gecko install prompts when the prefix is created.
            .env("WINEDLLOVERRIDES", "mscoree,mshtml=");
    }

    fn wine(&self, args: &[&str]) -> Command {
        let mut wine = Command::new("wine");
        wine.args(args);
        self.wine_env(&mut wine);
        wine
    }

    fn system32(&self) -> PathBuf {
        self.prefix.join("drive_c").join("windows").join("system32")
    }

    /// Create the prefix unless a complete one is there; a half-made one
    /// (interrupted set-up) is removed and made again.
    fn ensure_prefix(&self) -> Result {
        if self.prefix.join(PREFIX_READY).is_file() && self.system32().is_dir() {
            return Ok(());
        }
        if self.prefix.exists() {
            fs::remove_dir_all(&self.prefix)
                .map_err(|e| format!("cannot remove {}: {e}", self.prefix.display()))?;
        }
        fs::create_dir_all(&self.prefix)
            .map_err(|e| format!("cannot create {}: {e}", self.prefix.display()))?;
        println!("xtask: creating the Wine prefix {}", self.prefix.display());
        cmd::run(&mut self.wine(&["wineboot", "--init"]))?;
        cmd::run(&mut self.wine(&["winecfg", "/v", "win10"]))?;
        // Let the wineserver write the registry and exit.
        let mut wait = Command::new("wineserver");
        wait.arg("-w");
        self.wine_env(&mut wait);
        cmd::run(&mut wait)?;
        if !self.system32().is_dir() {
            return Err(format!(
                "wineboot finished but {} does not exist",
                self.system32().display()
            ));
        }
        fs::write(self.prefix.join(PREFIX_READY), "")
            .map_err(|e| format!("cannot write in {}: {e}", self.prefix.display()))
    }

    /// Build `bcryptprimitives.dll` from `windows/processprng.c` (when the
    /// source is newer) and copy it into system32 (when it differs).
    fn install_shim(&self) -> Result {
        let source = self
            .root
            .join("xtask")
            .join("src")
            .join("windows")
            .join("processprng.c");
        let out_dir = self.root.join("target").join("windows").join("shim");
        let dll = out_dir.join("bcryptprimitives.dll");
        if !is_newer(&dll, &source) {
            fs::create_dir_all(&out_dir)
                .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
            let mut gcc = Command::new(MINGW_GCC);
            gcc.args(["-shared", "-O2", "-s", "-Wall", "-Wextra", "-Werror", "-o"])
                .arg(&dll)
                .arg(&source)
                .arg("-ladvapi32");
            cmd::run(&mut gcc)?;
        }
        let built = fs::read(&dll).map_err(|e| format!("cannot read {}: {e}", dll.display()))?;
        let installed = self.system32().join("bcryptprimitives.dll");
        if fs::read(&installed).ok().as_deref() != Some(built.as_slice()) {
            fs::write(&installed, &built)
                .map_err(|e| format!("cannot write {}: {e}", installed.display()))?;
            println!(
                "xtask: installed the ProcessPrng stand-in as {}",
                installed.display()
            );
        }
        Ok(())
    }
}

/// PATH with Debian's bin folder first, so that `cargo`, `rustc`,
/// `cargo-clippy` and `clippy-driver` are Debian's, not rustup's proxies.
fn debian_first_path() -> OsString {
    let rest = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(PathBuf::from(DEBIAN_BIN))
        .chain(std::env::split_paths(&rest).filter(|d| d != Path::new(DEBIAN_BIN)));
    std::env::join_paths(dirs).unwrap_or(rest)
}

/// True when `target` exists and was modified after `source`.
fn is_newer(target: &Path, source: &Path) -> bool {
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    match (modified(target), modified(source)) {
        (Some(t), Some(s)) => t > s,
        _ => false,
    }
}

fn package_args(cmd: &mut Command) {
    for package in PACKAGES {
        cmd.args(["--package", package]);
    }
}

/// The `windows` step of `cargo xtask test`: clippy with warnings as errors
/// for the Windows target, then the tests under Wine, then the MSI installed,
/// upgraded and removed under Wine ([`msi::check`]).
pub fn step(report: &mut Report) -> Result {
    let windows = Windows::prepare()?;

    let mut clippy = windows.cargo("clippy");
    package_args(&mut clippy);
    clippy.args(["--all-targets", "--", "-D", "warnings"]);
    let linted = cmd::run(&mut clippy);

    let mut test = windows.cargo("test");
    package_args(&mut test);
    test.arg("--no-fail-fast");
    let before = report.suites.len();
    let tested = crate::test::run_cargo_test(&mut test, report);
    for suite in &mut report.suites[before..] {
        suite.label = format!("windows: {}", suite.label);
    }
    let traced = event_log_trace(&windows, report);
    let installed = msi::check(&windows, report);
    let failures: Vec<String> = [linted, tested, traced, installed]
        .into_iter()
        .filter_map(|r| r.err())
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// Wine's ReportEventW stores nothing (it is a stub that returns success),
/// but it writes the strings it was given to its `eventlog` debug channel:
/// run the Event Log sink's test once more with that channel on and check
/// that both records arrived with their summaries and event types (trace
/// for information, warn for warning).
fn event_log_trace(windows: &Windows, report: &mut Report) -> Result {
    let test = "audit::eventlog::tests::records_reach_report_event";
    let mut cargo = windows.cargo("test");
    cargo
        .args([
            "--package",
            "kvm-manager-agent",
            "--lib",
            "--",
            "--exact",
            test,
        ])
        .env("WINEDEBUG", "-all,+eventlog");
    cmd::announce(&cargo);
    let out = cargo
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", cmd::display(&cargo)))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = [
        r#"trace:eventlog:ReportEventW L"audit: exec 7 from virtio-serial host: allowed, ok in 42 us""#,
        r#"warn:eventlog:ReportEventW L"audit: exec 7 from virtio-serial host: allowed, error in 42 us""#,
        r#"ReportEventW L"{\"decision\":\"allowed\""#,
    ];
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|line| !stderr.contains(line))
        .collect();
    let ok = out.status.success() && missing.is_empty();
    report.suites.push(crate::test::Suite {
        label: "windows: Event Log strings seen by Wine's ReportEventW".into(),
        counts: crate::test::Counts {
            passed: u64::from(ok),
            failed: u64::from(!ok),
            ignored: 0,
        },
    });
    if ok {
        println!("xtask: Wine's ReportEventW received both records' strings");
        Ok(())
    } else {
        println!("{stderr}");
        Err(format!(
            "the Event Log test ({}) did not show these ReportEventW lines: {missing:?}",
            out.status
        ))
    }
}

/// `cargo xtask windows-cargo ARGS...`: any cargo command for the Windows
/// target (`build --release -p kvm-manager-agent`, `test -p kvm-agent-protocol`).
pub fn run(args: &[String]) -> Result {
    if args.is_empty() {
        return Err(
            "usage: cargo xtask windows-cargo <CARGO ARGS>... (e.g. `build -p kvm-manager-agent`)"
                .into(),
        );
    }
    crate::ensure::all(NEEDS)?;
    let windows = Windows::prepare()?;
    let mut cargo = windows.cargo(&args[0]);
    cargo.args(&args[1..]);
    cmd::run(&mut cargo)?;
    println!("xtask: Windows artifacts are under target/windows/{TARGET}/");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_bin_comes_first_once() {
        let path = debian_first_path();
        let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        assert_eq!(dirs[0], Path::new(DEBIAN_BIN));
        assert_eq!(
            dirs.iter().filter(|d| *d == Path::new(DEBIAN_BIN)).count(),
            1
        );
    }

    #[test]
    fn the_cargo_config_names_the_target() {
        let config = fs::read_to_string(crate::root().join(".cargo/windows.toml")).unwrap();
        assert!(config.contains(&format!("target = \"{TARGET}\"")));
        assert!(config.contains(&format!("linker = \"{MINGW_GCC}\"")));
    }
}
