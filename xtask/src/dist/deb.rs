//! The .deb packages, built with plain `dpkg-deb` over a staging tree.
//!
//! Why not cargo-deb: the agent's package is mostly not cargo's business
//! (a binary built with other flags, a conffile, a systemd unit, maintainer
//! scripts with a purge step, a lintian override), and dpkg-deb is already
//! on every Debian machine: the tree below is the whole package, in plain
//! sight, with nothing to install from the crates registry.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{lay_out, mkdir, write, Entry, Files, AGENT, CTL, HOMEPAGE, MAINTAINER};
use crate::{cmd, Result};

/// One binary package.
struct Package<'a> {
    name: &'a str,
    version: &'a str,
    depends: Option<&'a str>,
    summary: &'a str,
    description: &'a str,
    entries: Vec<Entry>,
    conffiles: &'a [&'a str],
    /// (name, content) of maintainer scripts.
    scripts: Vec<(&'a str, Vec<u8>)>,
}

/// The agent's .deb with `config` as its default configuration.
pub fn agent(files: &Files, version: &str, config: &[u8], out: &Path) -> Result<PathBuf> {
    let root = crate::root().join("packaging/deb");
    let script = |name: &str| super::read(&root.join(name));
    let mut entries = vec![
        Entry::new("usr/bin/kvm-manager-agent", 0o755, &files.agent),
        Entry::new("etc/kvm-manager-agent/config.toml", 0o644, config),
        Entry::new(
            "lib/systemd/system/kvm-manager-agent.service",
            0o644,
            &files.unit,
        ),
        Entry::new(
            "usr/share/man/man8/kvm-manager-agent.8.gz",
            0o644,
            &files.agent_man_gz,
        ),
        Entry::new(
            "usr/share/lintian/overrides/kvm-manager-agent",
            0o644,
            &script("kvm-manager-agent.lintian-overrides")?,
        ),
    ];
    entries.extend(docs(AGENT, version)?);
    build(
        &Package {
            name: AGENT,
            version,
            depends: None,
            summary: "guest agent for KVM virtual machines",
            description: "kvm-manager-agent runs inside a KVM guest and serves the host over\n\
                          virtio-serial or vsock: guest information and metrics, logged-in\n\
                          users, power control, commands on an allowlist and file transfer\n\
                          confined to allowed directories, each request audited.\n\
                          .\n\
                          One statically linked binary; it waits for its virtio-serial port\n\
                          when the port appears late. Configuration in\n\
                          /etc/kvm-manager-agent/config.toml.",
            entries,
            conffiles: &["/etc/kvm-manager-agent/config.toml"],
            scripts: vec![
                ("postinst", script("postinst")?),
                ("prerm", script("prerm")?),
                ("postrm", script("postrm")?),
            ],
        },
        out,
    )
}

/// kvm-agent-ctl's .deb, for hosts.
pub fn ctl(files: &Files, version: &str, out: &Path) -> Result<PathBuf> {
    let overrides =
        super::read(&crate::root().join("packaging/deb/kvm-agent-ctl.lintian-overrides"))?;
    let mut entries = vec![
        Entry::new("usr/bin/kvm-agent-ctl", 0o755, &files.ctl),
        Entry::new(
            "usr/share/lintian/overrides/kvm-agent-ctl",
            0o644,
            &overrides,
        ),
        Entry::new(
            "usr/share/man/man1/kvm-agent-ctl.1.gz",
            0o644,
            &files.ctl_man_gz,
        ),
        Entry::new(
            "usr/share/bash-completion/completions/kvm-agent-ctl",
            0o644,
            &files.bash,
        ),
        Entry::new(
            "usr/share/zsh/vendor-completions/_kvm-agent-ctl",
            0o644,
            &files.zsh,
        ),
        Entry::new(
            "usr/share/fish/vendor_completions.d/kvm-agent-ctl.fish",
            0o644,
            &files.fish,
        ),
    ];
    entries.extend(docs(CTL, version)?);
    build(
        &Package {
            name: CTL,
            version,
            depends: Some(&files.ctl_depends),
            summary: "host command-line client for kvm-manager-agent",
            description: "kvm-agent-ctl talks to a kvm-manager-agent inside a guest through\n\
                          QEMU's virtio-serial chardev socket, AF_VSOCK or hybrid vsock:\n\
                          guest information and metrics, users, exec, file copy, shutdown\n\
                          and reboot. Shell completions for bash, zsh and fish included.",
            entries,
            conffiles: &[],
            scripts: vec![],
        },
        out,
    )
}

/// copyright and changelog.Debian.gz under /usr/share/doc/NAME.
fn docs(name: &str, version: &str) -> Result<Vec<Entry>> {
    let copyright = super::read(&crate::root().join("packaging/deb/copyright"))?;
    let changelog = format!(
        "{name} ({version}) unstable; urgency=medium\n\n  \
         * Built by `cargo xtask dist` from the kvm-manager-agent sources.\n\n \
         -- {MAINTAINER}  {}\n",
        changelog_date()?
    );
    Ok(vec![
        Entry::new(
            &format!("usr/share/doc/{name}/copyright"),
            0o644,
            &copyright,
        ),
        Entry::new(
            &format!("usr/share/doc/{name}/changelog.Debian.gz"),
            0o644,
            &super::gzip(changelog.as_bytes())?,
        ),
    ])
}

/// The last commit's date (RFC 2822), else now.
fn changelog_date() -> Result<String> {
    let mut git = Command::new("git");
    git.current_dir(crate::root())
        .args(["log", "-1", "--format=%cD"]);
    if let Ok((status, out)) = cmd::output(&mut git) {
        if status.success() && !out.trim().is_empty() {
            return Ok(out.trim().to_string());
        }
    }
    let (_, out) = cmd::output(Command::new("date").arg("-R"))?;
    Ok(out.trim().to_string())
}

fn build(p: &Package, out: &Path) -> Result<PathBuf> {
    let stage = crate::vm::target_dir()
        .join("dist-work")
        .join(format!("deb-{}-{}", p.name, p.version));
    let _ = fs::remove_dir_all(&stage);
    mkdir(&stage)?;
    lay_out(&stage, &p.entries)?;

    let debian = stage.join("DEBIAN");
    mkdir(&debian)?;
    // Installed-Size: KiB, each file rounded up, as dpkg-gencontrol counts.
    let mut kib: u64 = 0;
    for e in &p.entries {
        kib += (e.data.len() as u64).div_ceil(1024);
    }
    let mut control = format!(
        "Package: {}\nVersion: {}\nArchitecture: amd64\nMaintainer: {MAINTAINER}\n\
         Installed-Size: {kib}\n",
        p.name, p.version
    );
    if let Some(d) = p.depends {
        control.push_str(&format!("Depends: {d}\n"));
    }
    control.push_str(&format!(
        "Section: admin\nPriority: optional\nHomepage: {HOMEPAGE}\nDescription: {}\n",
        p.summary
    ));
    for line in p.description.lines() {
        control.push_str(&format!(" {}\n", line.trim()));
    }
    write(&debian.join("control"), control.as_bytes(), 0o644)?;
    if !p.conffiles.is_empty() {
        let list: String = p.conffiles.iter().map(|c| format!("{c}\n")).collect();
        write(&debian.join("conffiles"), list.as_bytes(), 0o644)?;
    }
    for (name, data) in &p.scripts {
        write(&debian.join(name), data, 0o755)?;
    }
    // md5sums of every file but the conffiles, as dh_md5sums writes it.
    let mut md5 = Command::new("md5sum");
    md5.current_dir(&stage);
    for e in &p.entries {
        if !p
            .conffiles
            .iter()
            .any(|c| c.trim_start_matches('/') == e.path)
        {
            md5.arg(&e.path);
        }
    }
    let (status, sums) = cmd::output(&mut md5)?;
    cmd::check(&md5, status)?;
    write(&debian.join("md5sums"), sums.as_bytes(), 0o644)?;

    let deb = out.join(format!("{}_{}_amd64.deb", p.name, p.version));
    cmd::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// The `Depends:` a dynamic binary needs, from dpkg-shlibdeps (which wants
/// a debian/control beside it: a throwaway one).
pub fn shlibdeps(binary: &Path) -> Result<String> {
    let dir = crate::vm::target_dir().join("dist-work").join("shlibdeps");
    let _ = fs::remove_dir_all(&dir);
    write(
        &dir.join("debian/control"),
        format!("Source: {CTL}\n\nPackage: {CTL}\nArchitecture: any\n").as_bytes(),
        0o644,
    )?;
    let mut c = Command::new("dpkg-shlibdeps");
    c.current_dir(&dir).arg("-O").arg(binary);
    let (status, out) = cmd::output(&mut c)?;
    cmd::check(&c, status)?;
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "dpkg-shlibdeps gave no shlibs:Depends for {}",
                binary.display()
            )
        })
}
