//! Host tools the VM tests need, installed when missing: QEMU from
//! bookworm-backports, busybox-static, xz, and `vhost-device-vsock` from the
//! crates registry. A tool that cannot be installed fails the task.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ensure::{self, Need};
use crate::{cmd, Result};

/// Debian packages taken from the default suite.
const APT: &[Need] = &[Need::Apt("busybox-static"), Need::Apt("xz-utils")];

const VHOST_DEVICE_VSOCK: Need = Need::CargoTool {
    krate: "vhost-device-vsock",
    version: None,
    bin: "vhost-device-vsock",
};

/// Where the backports entry is written (only when QEMU must be installed).
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/kvm-manager-agent-backports.sources";

/// Paths of the tools, once present.
#[derive(Debug)]
pub struct Tools {
    pub qemu: PathBuf,
    pub vhost_device_vsock: PathBuf,
    pub busybox: PathBuf,
}

pub fn ensure_all() -> Result<Tools> {
    ensure::all(APT)?;
    ensure_qemu()?;
    ensure::all(&[VHOST_DEVICE_VSOCK])?;
    let found = |bin: &str| {
        ensure::find_binary(bin)
            .ok_or_else(|| format!("`{bin}` is not in PATH after installing it"))
    };
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.is_file() {
        return Err("busybox-static is installed but /bin/busybox is missing".into());
    }
    Ok(Tools {
        qemu: found("qemu-system-x86_64")?,
        vhost_device_vsock: found("vhost-device-vsock")?,
        busybox,
    })
}

/// `qemu-system-x86` from bookworm-backports: bookworm's own 7.2 conflicts
/// with the backported qemu-utils these machines ship.
fn ensure_qemu() -> Result {
    ensure_backports("qemu-system-x86")
}

/// Install the Debian package `package` from bookworm-backports when it is
/// missing, adding a backports entry derived from the machine's own apt
/// sources first when there is none.
pub(crate) fn ensure_backports(package: &str) -> Result {
    if ensure::dpkg_installed(package) {
        return Ok(());
    }
    let sources = std::fs::read_dir("/etc/apt/sources.list.d")
        .map_err(|e| format!("cannot list /etc/apt/sources.list.d: {e}"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sources"))
        .filter(|p| p != Path::new(BACKPORTS_SOURCES));
    let mut entry = None;
    for path in sources {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if let Some(e) = bookworm_entry(&text) {
            entry = Some(e);
            break;
        }
    }
    let Some((uris, signed_by)) = entry else {
        return Err("no apt sources entry with the `bookworm` suite in \
                    /etc/apt/sources.list.d/*.sources: cannot derive a mirror for \
                    bookworm-backports (QEMU comes from there)"
            .into());
    };
    let mut text = format!(
        "# Written by `cargo xtask` (kvm-manager-agent) for QEMU and qemu-guest-agent.\n\
         Types: deb\nURIs: {uris}\nSuites: bookworm-backports\nComponents: main\n"
    );
    if let Some(key) = signed_by {
        text.push_str(&format!("Signed-By: {key}\n"));
    }
    if Path::new(BACKPORTS_SOURCES).exists() {
        println!("xtask: {BACKPORTS_SOURCES} is there already");
    } else {
        println!("xtask: adding {BACKPORTS_SOURCES} (bookworm-backports, mirror {uris})");
        std::fs::write(BACKPORTS_SOURCES, text)
            .map_err(|e| format!("cannot write {BACKPORTS_SOURCES} (run as root): {e}"))?;
    }
    let apt = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    cmd::run(apt().args(["update", "-q"]))?;
    cmd::run(apt().args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-t",
        "bookworm-backports",
        package,
    ]))?;
    if ensure::dpkg_installed(package) {
        Ok(())
    } else {
        Err(format!(
            "apt-get finished but {package} is still not installed"
        ))
    }
}

/// `URIs` and `Signed-By` of the deb822 stanza whose `Suites` include `bookworm`.
pub(super) fn bookworm_entry(text: &str) -> Option<(String, Option<String>)> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
            })
        };
        let suites = field("Suites").unwrap_or_default();
        if suites.split_whitespace().any(|s| s == "bookworm") {
            let uris = field("URIs")?;
            let uri = uris.split_whitespace().next()?.to_string();
            return Some((uri, field("Signed-By")));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bookworm_stanza() {
        let text =
            "Types: deb\nURIs: http://m.example/debian-security\nSuites: bookworm-security\n\
                    Components: main\n\n# comment\nTypes: deb\nURIs: http://m.example/debian\n\
                    Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n";
        assert_eq!(
            bookworm_entry(text),
            Some((
                "http://m.example/debian".to_string(),
                Some("/k.gpg".to_string())
            ))
        );
        assert_eq!(bookworm_entry("Suites: trixie\nURIs: x\n"), None);
    }
}
