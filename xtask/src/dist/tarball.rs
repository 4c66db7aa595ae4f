//! `kvm-manager-agent-VERSION-x86_64-linux.tar.gz`: the agent for
//! distributions without a package manager that knows it.
//!
//! ```text
//! kvm-manager-agent-VERSION-x86_64-linux/
//!   install.sh  uninstall.sh
//!   bin/kvm-manager-agent
//!   etc/config.toml
//!   systemd/kvm-manager-agent.service
//!   man/kvm-manager-agent.8.gz
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{lay_out, read, Entry, Files};
use crate::{cmd, Result};

/// The folder name inside the tarball (and the tarball's name without `.tar.gz`).
pub fn base_name(version: &str) -> String {
    format!("kvm-manager-agent-{version}-x86_64-linux")
}

pub fn build(files: &Files, version: &str, out: &Path) -> Result<PathBuf> {
    let base = base_name(version);
    let work = crate::vm::target_dir().join("dist-work").join("tarball");
    let _ = fs::remove_dir_all(&work);
    let scripts = crate::root().join("packaging/tarball");
    lay_out(
        &work.join(&base),
        &[
            Entry::new("install.sh", 0o755, &read(&scripts.join("install.sh"))?),
            Entry::new("uninstall.sh", 0o755, &read(&scripts.join("uninstall.sh"))?),
            Entry::new("bin/kvm-manager-agent", 0o755, &files.agent),
            Entry::new("etc/config.toml", 0o644, &files.config),
            Entry::new("systemd/kvm-manager-agent.service", 0o644, &files.unit),
            Entry::new("man/kvm-manager-agent.8.gz", 0o644, &files.agent_man_gz),
        ],
    )?;
    let tarball = out.join(format!("{base}.tar.gz"));
    cmd::run(
        Command::new("tar")
            .args([
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--sort=name",
                "-czf",
            ])
            .arg(&tarball)
            .arg("-C")
            .arg(&work)
            .arg(&base),
    )?;
    Ok(tarball)
}
