//! Prerequisites: what a task needs, installed when missing or reported clearly.
//!
//! A task declares its needs as a list of [`Need`]s and calls [`all`] before it
//! runs anything. Nothing is ever skipped because a tool is missing: it is
//! installed (Debian packages with apt-get, tools from the crates registry with
//! `cargo install --locked`) or the task fails saying what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{cmd, Result};

/// One prerequisite of a task.
#[allow(
    dead_code,
    reason = "apt packages and cargo tools are for the steps still to come (VM, Windows, fuzz)"
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A cargo subcommand that comes as a rustup component (rustfmt, clippy).
    /// Only checked: rustup cannot download components on these machines.
    Component {
        /// The cargo subcommand, as in `cargo <subcommand> --version`.
        subcommand: &'static str,
        /// The rustup component that provides it.
        component: &'static str,
    },
    /// A Debian package, installed with apt-get when `dpkg -s` says it is missing.
    Apt(&'static str),
    /// A binary from the crates registry, installed with `cargo install --locked`.
    CargoTool {
        /// The crate to install.
        krate: &'static str,
        /// An exact version to install, or `None` for the newest.
        version: Option<&'static str>,
        /// The binary it provides.
        bin: &'static str,
    },
}

/// Make sure every need is met, in the order given (all apt packages in one go).
pub fn all(needs: &[Need]) -> Result {
    let mut unique: Vec<Need> = Vec::new();
    for need in needs {
        if !unique.contains(need) {
            unique.push(*need);
        }
    }
    let needs = unique;
    for need in &needs {
        if let Need::Component {
            subcommand,
            component,
        } = *need
        {
            component_present(subcommand, component)?;
        }
    }
    let apt: Vec<&str> = needs
        .iter()
        .filter_map(|n| match n {
            Need::Apt(package) => Some(*package),
            _ => None,
        })
        .collect();
    apt_packages(&apt)?;
    for need in &needs {
        if let Need::CargoTool {
            krate,
            version,
            bin,
        } = *need
        {
            cargo_tool(krate, version, bin)?;
        }
    }
    Ok(())
}

/// Check that `cargo <subcommand> --version` works.
pub fn component_present(subcommand: &str, component: &str) -> Result {
    let mut check = cmd::cargo();
    check.args([subcommand, "--version"]);
    if cmd::quietly_succeeds(&mut check) {
        Ok(())
    } else {
        Err(format!(
            "`cargo {subcommand}` is not available: the rustup component `{component}` \
             is missing for this toolchain (`rustup component add {component}` where \
             rustup can download; these machines' images ship it)"
        ))
    }
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Install the Debian packages that `dpkg -s` does not report as installed.
/// `apt-get update` runs once per xtask run, before the first install.
pub fn apt_packages(packages: &[&str]) -> Result {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing Debian packages: {}", missing.join(" "));
    if !is_root() {
        return Err(format!(
            "Debian packages {} are missing and installing them needs root: \
             run `apt-get install -y --no-install-recommends {}` as root, or run xtask as root",
            missing.join(", "),
            missing.join(" ")
        ));
    }
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        let mut update = apt_get();
        update.args(["update", "-q"]);
        if let Err(e) = cmd::run(&mut update) {
            APT_UPDATED.store(false, Ordering::SeqCst);
            return Err(e);
        }
    }
    let mut install = apt_get();
    install.args(["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&missing);
    cmd::run(&mut install)?;
    let still_missing: Vec<&str> = missing.into_iter().filter(|p| !dpkg_installed(p)).collect();
    if still_missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "apt-get finished but these packages are still not installed: {}",
            still_missing.join(", ")
        ))
    }
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// What `dpkg -s PACKAGE` says; false when dpkg is absent or does not know it.
pub fn dpkg_installed(package: &str) -> bool {
    match cmd::output(Command::new("dpkg").args(["-s", package])) {
        Ok((status, out)) => status.success() && dpkg_status_installed(&out),
        Err(_) => false,
    }
}

/// True when a `dpkg -s` report has a `Status:` line ending in `installed`
/// (`install ok installed`), as opposed to `config-files` or `not-installed`.
fn dpkg_status_installed(report: &str) -> bool {
    report.lines().any(|line| {
        line.strip_prefix("Status:")
            .is_some_and(|s| s.split_whitespace().last() == Some("installed"))
    })
}

fn is_root() -> bool {
    matches!(
        cmd::output(Command::new("id").arg("-u")),
        Ok((status, out)) if status.success() && out.trim() == "0"
    )
}

/// Install `krate` with `cargo install --locked` unless its binary is already
/// there (at `version` when one is given, as `cargo install --list` reports).
pub fn cargo_tool(krate: &str, version: Option<&str>, bin: &str) -> Result {
    let (_, list) = cmd::output(cmd::cargo().args(["install", "--list"]))?;
    let installed = installed_version(&list, krate);
    let have = match (version, installed.as_deref()) {
        (Some(want), Some(got)) => want == got && find_binary(bin).is_some(),
        (Some(_), None) => false,
        (None, _) => find_binary(bin).is_some(),
    };
    if have {
        return Ok(());
    }
    let mut install = cmd::cargo();
    install.args(["install", "--locked", krate]);
    if let Some(version) = version {
        install.args(["--version", version]);
    }
    cmd::run(&mut install)?;
    match find_binary(bin) {
        Some(_) => Ok(()),
        None => Err(format!(
            "`cargo install {krate}` finished but `{bin}` is not in PATH nor in {}",
            cargo_bin_dir().map_or("$CARGO_HOME/bin".into(), |d| d.display().to_string())
        )),
    }
}

/// The version `cargo install --list` reports for `krate` (lines `name v1.2.3:`).
fn installed_version(list: &str, krate: &str) -> Option<String> {
    list.lines()
        .filter(|line| !line.starts_with(char::is_whitespace))
        .find_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let version = words.next()?.trim_end_matches(':').strip_prefix('v')?;
            (name == krate).then(|| version.to_string())
        })
}

fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").join("bin"))
}

/// Where `bin` is: in PATH, or in cargo's install folder.
pub fn find_binary(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(cargo_bin_dir())
        .map(|dir| dir.join(bin))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_status_lines() {
        let installed = "Package: tar\nStatus: install ok installed\nPriority: required\n";
        assert!(dpkg_status_installed(installed));
        assert!(!dpkg_status_installed(
            "Package: foo\nStatus: deinstall ok config-files\n"
        ));
        assert!(!dpkg_status_installed(
            "Package: foo\nStatus: install ok not-installed\n"
        ));
        assert!(!dpkg_status_installed(""));
    }

    #[test]
    fn cargo_install_list() {
        let list = "cargo-deb v2.7.0:\n    cargo-deb\nvhost-device-vsock v0.2.0 (/src):\n    vhost-device-vsock\n";
        assert_eq!(
            installed_version(list, "cargo-deb").as_deref(),
            Some("2.7.0")
        );
        assert_eq!(
            installed_version(list, "vhost-device-vsock").as_deref(),
            Some("0.2.0")
        );
        assert_eq!(installed_version(list, "cargo"), None);
        assert_eq!(installed_version(list, "vhost-device-vsock:"), None);
    }

    #[test]
    fn finds_sh_but_not_nonsense() {
        assert!(find_binary("sh").is_some());
        assert!(find_binary("no-such-binary-for-xtask-tests").is_none());
    }

    #[test]
    fn dpkg_knows_nothing_of_a_made_up_package() {
        assert!(!dpkg_installed("no-such-package-for-xtask-tests"));
    }
}
