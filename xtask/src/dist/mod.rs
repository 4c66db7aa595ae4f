//! `cargo xtask dist`: every artifact a user installs, in `target/dist/`.
//!
//! - `kvm-manager-agent`: the static agent (glibc `+crt-static`, built by
//!   [`crate::vm::build_static_agent`]), checked to need no shared library
//!   and no loader, to be stripped and to stay under [`MAX_AGENT_BYTES`];
//! - `kvm-agent-ctl`: the host CLI (an ordinary dynamic build);
//! - the .deb of each ([`deb`]: dpkg-deb over a staging tree that we lay out
//!   ourselves, with hand-written maintainer scripts from `packaging/deb/`);
//! - the .rpm of each ([`rpm`]: a spec written here, built with rpmbuild
//!   from Debian's `rpm` package; scriptlets from `packaging/rpm/`);
//! - the tarball with `install.sh` and `uninstall.sh` ([`tarball`]);
//! - the man pages ([`man`]) and the shell completions, also shipped on
//!   their own;
//! - the Windows agent, `kvm-manager-agent.exe` (release, static C runtime:
//!   checked to import system DLLs only), and its MSI,
//!   `kvm-manager-agent-VERSION-x64.msi` (wixl; [`crate::windows::msi`]);
//! - `SHA256SUMS`.
//!
//! The files the packages install come from `packaging/` and the crates; see
//! docs/packaging.md for the layout and the reasons.

pub mod checks;
mod deb;
mod man;
mod rpm;
mod tarball;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::ensure::{self, Need};
use crate::vm::elf;
use crate::{cmd, Result};

pub const AGENT: &str = "kvm-manager-agent";
pub const CTL: &str = "kvm-agent-ctl";
/// The static agent must stay under 3 MB (qemu-ga: 1 MB plus 5 MB of libraries).
pub const MAX_AGENT_BYTES: u64 = 3_000_000;
/// Where the project lives, for package metadata.
pub const HOMEPAGE: &str = "https://github.com/kvm-manager/kvm-manager-agent";
pub const MAINTAINER: &str =
    "kvm-manager-agent developers <kvm-manager-agent@users.noreply.github.com>";

/// Tools the packaging needs, installed when missing.
pub const NEEDS: &[Need] = &[
    Need::Apt("dpkg-dev"),
    Need::Apt("rpm"),
    Need::Apt("gzip"),
    Need::Apt("xz-utils"),
];

const HELP: &str = "\
Usage: cargo xtask dist

Builds every artifact into target/dist/: the static agent, kvm-agent-ctl,
their .deb and .rpm packages, the agent's tarball (install.sh,
uninstall.sh), the man pages, the shell completions, the Windows agent
(kvm-manager-agent.exe) and its MSI, and SHA256SUMS.
";

/// What `dist` produced.
#[derive(Debug)]
pub struct Dist {
    pub dir: PathBuf,
    /// The workspace version, e.g. `0.1.0`.
    pub version: String,
    pub agent_deb: PathBuf,
    pub ctl_deb: PathBuf,
    pub agent_rpm: PathBuf,
    pub ctl_rpm: PathBuf,
    pub tarball: PathBuf,
    files: Files,
}

/// The installed files' contents, shared by every package format.
#[derive(Debug, Clone)]
pub struct Files {
    pub agent: Vec<u8>,
    pub ctl: Vec<u8>,
    pub config: Vec<u8>,
    pub unit: Vec<u8>,
    pub agent_man_gz: Vec<u8>,
    pub ctl_man_gz: Vec<u8>,
    pub bash: Vec<u8>,
    pub zsh: Vec<u8>,
    pub fish: Vec<u8>,
    /// `Depends:` of kvm-agent-ctl's .deb, from dpkg-shlibdeps.
    pub ctl_depends: String,
}

/// `cargo xtask dist`
pub fn run(args: &[String]) -> Result {
    if let Some(a) = args.first() {
        if a == "-h" || a == "--help" {
            print!("{HELP}");
            return Ok(());
        }
        return Err(format!(
            "unknown argument `{a}` (see `cargo xtask dist --help`)"
        ));
    }
    let dist = build()?;
    dist.print_summary();
    Ok(())
}

/// Build everything into `target/dist/`.
pub fn build() -> Result<Dist> {
    ensure::all(NEEDS)?;
    let version = workspace_version()?;
    let agent_path = crate::vm::build_static_agent()?;
    let agent = check_agent_binary(&agent_path)?;
    let ctl_path = build_ctl()?;
    let ctl = read(&ctl_path)?;

    let root = crate::root();
    let man_source = fs::read_to_string(root.join("packaging/man/kvm-manager-agent.8"))
        .map_err(|e| format!("cannot read packaging/man/kvm-manager-agent.8: {e}"))?;
    let agent_man = man_source.replace("@VERSION@", &version);
    let ctl_man = man::ctl_page(&ctl_path, &version)?;
    let completion = |shell: &str| -> Result<Vec<u8>> {
        let (status, out) = cmd::output(Command::new(&ctl_path).args(["completions", shell]))?;
        if !status.success() || out.is_empty() {
            return Err(format!(
                "`kvm-agent-ctl completions {shell}` failed ({status})"
            ));
        }
        Ok(out.into_bytes())
    };
    let files = Files {
        agent,
        ctl,
        config: read(&root.join("crates/agent/config.toml"))?,
        unit: read(&root.join("packaging/systemd/kvm-manager-agent.service"))?,
        agent_man_gz: gzip(agent_man.as_bytes())?,
        ctl_man_gz: gzip(ctl_man.as_bytes())?,
        bash: completion("bash")?,
        zsh: completion("zsh")?,
        fish: completion("fish")?,
        ctl_depends: deb::shlibdeps(&ctl_path)?,
    };

    let dir = crate::vm::target_dir().join("dist");
    let _ = fs::remove_dir_all(&dir);
    mkdir(&dir)?;
    write(&dir.join(AGENT), &files.agent, 0o755)?;
    write(&dir.join(CTL), &files.ctl, 0o755)?;
    write(
        &dir.join("kvm-manager-agent.8.gz"),
        &files.agent_man_gz,
        0o644,
    )?;
    write(&dir.join("kvm-agent-ctl.1.gz"), &files.ctl_man_gz, 0o644)?;
    let comp = dir.join("completions");
    mkdir(&comp)?;
    write(&comp.join("kvm-agent-ctl.bash"), &files.bash, 0o644)?;
    write(&comp.join("_kvm-agent-ctl"), &files.zsh, 0o644)?;
    write(&comp.join("kvm-agent-ctl.fish"), &files.fish, 0o644)?;

    let deb_version = format!("{version}-1");
    let agent_deb = deb::agent(&files, &deb_version, &files.config, &dir)?;
    let ctl_deb = deb::ctl(&files, &deb_version, &dir)?;
    let agent_rpm = rpm::agent(&files, &version, &dir)?;
    let ctl_rpm = rpm::ctl(&files, &version, &dir)?;
    let tarball = tarball::build(&files, &version, &dir)?;
    windows_artifacts(&version, &dir)?;

    let dist = Dist {
        dir,
        version,
        agent_deb,
        ctl_deb,
        agent_rpm,
        ctl_rpm,
        tarball,
        files,
    };
    dist.write_sums()?;
    Ok(dist)
}

impl Dist {
    /// The agent's .deb again, as the next version (`VERSION+SUFFIX-1`), with
    /// `extra` appended to its default configuration: for upgrade tests.
    pub fn agent_deb_next(&self, suffix: &str, extra: &str, out: &Path) -> Result<PathBuf> {
        let mut config = self.files.config.clone();
        config.extend_from_slice(extra.as_bytes());
        mkdir(out)?;
        deb::agent(
            &self.files,
            &format!("{}+{suffix}-1", self.version),
            &config,
            out,
        )
    }

    /// The Debian version of the packages `dist` made.
    pub fn deb_version(&self) -> String {
        format!("{}-1", self.version)
    }

    fn artifacts(&self) -> Vec<PathBuf> {
        let mut all: Vec<PathBuf> = Vec::new();
        let mut todo = vec![self.dir.clone()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else if p.file_name().is_some_and(|n| n != "SHA256SUMS") {
                    all.push(p);
                }
            }
        }
        all.sort();
        all
    }

    fn write_sums(&self) -> Result {
        let mut sha = Command::new("sha256sum");
        sha.current_dir(&self.dir);
        for p in self.artifacts() {
            sha.arg(p.strip_prefix(&self.dir).unwrap_or(&p));
        }
        let (status, out) = cmd::output(&mut sha)?;
        cmd::check(&sha, status)?;
        fs::write(self.dir.join("SHA256SUMS"), out)
            .map_err(|e| format!("cannot write SHA256SUMS: {e}"))
    }

    pub fn print_summary(&self) {
        println!("\nxtask: artifacts in {}:", self.dir.display());
        for p in self.artifacts() {
            let size = fs::metadata(&p).map_or(0, |m| m.len());
            println!(
                "  {:>10}  {:>9}  {}",
                size,
                human(size),
                p.strip_prefix(&self.dir).unwrap_or(&p).display()
            );
        }
    }
}

/// `1234567` as `1.18 MiB`.
pub fn human(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss, reason = "sizes for display")]
    let b = bytes as f64;
    if bytes >= 1 << 20 {
        format!("{:.2} MiB", b / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// `version` of `[workspace.package]` in the root Cargo.toml.
pub fn workspace_version() -> Result<String> {
    let text = fs::read_to_string(crate::root().join("Cargo.toml"))
        .map_err(|e| format!("cannot read Cargo.toml: {e}"))?;
    parse_workspace_version(&text).ok_or_else(|| "no version in [workspace.package]".into())
}

fn parse_workspace_version(text: &str) -> Option<String> {
    let mut in_section = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == "[workspace.package]";
        } else if in_section {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == "version" {
                    return Some(v.trim().trim_matches('"').to_string());
                }
            }
        }
    }
    None
}

/// The static agent's bytes, once checked: no loader, no shared library,
/// stripped, under the size limit.
fn check_agent_binary(path: &Path) -> Result<Vec<u8>> {
    let bytes = read(path)?;
    let what = path.display().to_string();
    let size = bytes.len() as u64;
    println!("xtask: static agent {what}: {size} bytes ({})", human(size));
    if !elf::is_static(&bytes, &what)? {
        return Err(format!("{what} asks for a dynamic loader (PT_INTERP)"));
    }
    let needed = elf::needed_libraries(&bytes, &what)?;
    if needed > 0 {
        return Err(format!(
            "{what} needs {needed} shared libraries (DT_NEEDED)"
        ));
    }
    if elf::has_symtab(&bytes, &what)? {
        return Err(format!("{what} is not stripped (it has a .symtab)"));
    }
    if size >= MAX_AGENT_BYTES {
        return Err(format!(
            "the static agent is {size} bytes ({}), over the limit of {MAX_AGENT_BYTES} bytes",
            human(size)
        ));
    }
    Ok(bytes)
}

/// The Windows release exe and its MSI, into `dir`.
fn windows_artifacts(version: &str, dir: &Path) -> Result {
    ensure::all(crate::windows::NEEDS)?;
    let windows = crate::windows::Windows::prepare()?;
    let built = crate::windows::msi::build(&windows, version, dir)?;
    write(&dir.join(format!("{AGENT}.exe")), &read(&built.exe)?, 0o644)
}

/// `kvm-agent-ctl`, an ordinary release build for hosts.
fn build_ctl() -> Result<PathBuf> {
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "kvm-agent-client", "--bin", CTL]))?;
    Ok(crate::vm::target_dir().join("release").join(CTL))
}

pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub fn mkdir(path: &Path) -> Result {
    fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// Write `data` to `path` (creating its folders) with `mode`.
pub fn write(path: &Path, data: &[u8], mode: u32) -> Result {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        mkdir(parent)?;
    }
    fs::write(path, data).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

/// `gzip -9n`: no name or time stamp, so the same input gives the same bytes.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run gzip: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot wait for gzip: {e}"))?;
    let _ = feeder.join();
    if !out.status.success() {
        return Err(format!("gzip failed ({})", out.status));
    }
    Ok(out.stdout)
}

/// One installed file: its path from the root, mode and content.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

impl Entry {
    pub fn new(path: &str, mode: u32, data: &[u8]) -> Self {
        Self {
            path: path.trim_start_matches('/').to_string(),
            mode,
            data: data.to_vec(),
        }
    }
}

/// Write the entries under `root`.
pub fn lay_out(root: &Path, entries: &[Entry]) -> Result {
    for e in entries {
        write(&root.join(&e.path), &e.data, e.mode)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_workspace_version() {
        let text = "[workspace]\nmembers = []\n\n[workspace.package]\nversion = \"1.2.3\"\nedition = \"2021\"\n\n[package]\nversion = \"9\"\n";
        assert_eq!(parse_workspace_version(text).as_deref(), Some("1.2.3"));
        assert!(parse_workspace_version("[package]\nversion = \"1\"\n").is_none());
        assert!(workspace_version().is_ok());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(2048), "2.0 KiB");
        assert_eq!(human(3 << 20), "3.00 MiB");
    }
}
