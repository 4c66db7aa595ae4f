//! The .rpm packages: a spec written here and `rpmbuild -bb` from Debian's
//! `rpm` package over files we lay out ourselves (no %build: the binaries
//! are already built). The systemd scriptlets are written out by hand in
//! `packaging/rpm/` since the distributions' rpm macros are not available.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{lay_out, mkdir, read, Entry, Files, AGENT, CTL, HOMEPAGE};
use crate::{cmd, Result};

struct Spec<'a> {
    name: &'a str,
    version: &'a str,
    summary: &'a str,
    description: &'a str,
    requires: Option<&'a str>,
    entries: Vec<Entry>,
    /// Entries that are `%config(noreplace)`.
    config: &'a [&'a str],
    /// Folders the package owns.
    dirs: &'a [&'a str],
    /// (section, script) pairs: `post`, `preun`, `postun`.
    scripts: Vec<(&'a str, String)>,
}

pub fn agent(files: &Files, version: &str, out: &Path) -> Result<PathBuf> {
    let rpm = crate::root().join("packaging/rpm");
    let script = |name: &str| -> Result<String> {
        Ok(String::from_utf8_lossy(&read(&rpm.join(name))?).into_owned())
    };
    build(
        &Spec {
            name: AGENT,
            version,
            summary: "Guest agent for KVM virtual machines",
            description: "kvm-manager-agent runs inside a KVM guest and serves the host over\n\
                          virtio-serial or vsock: guest information and metrics, users, power\n\
                          control, allowlisted commands and file transfer confined to allowed\n\
                          directories, each request audited. One statically linked binary.",
            requires: None,
            entries: vec![
                Entry::new("usr/bin/kvm-manager-agent", 0o755, &files.agent),
                Entry::new("etc/kvm-manager-agent/config.toml", 0o644, &files.config),
                Entry::new(
                    "usr/lib/systemd/system/kvm-manager-agent.service",
                    0o644,
                    &files.unit,
                ),
                Entry::new(
                    "usr/lib/systemd/system-preset/90-kvm-manager-agent.preset",
                    0o644,
                    &read(&rpm.join("kvm-manager-agent.preset"))?,
                ),
                Entry::new(
                    "usr/share/man/man8/kvm-manager-agent.8.gz",
                    0o644,
                    &files.agent_man_gz,
                ),
            ],
            config: &["etc/kvm-manager-agent/config.toml"],
            dirs: &["etc/kvm-manager-agent"],
            scripts: vec![
                ("post", script("post.sh")?),
                ("preun", script("preun.sh")?),
                ("postun", script("postun.sh")?),
            ],
        },
        out,
    )
}

pub fn ctl(files: &Files, version: &str, out: &Path) -> Result<PathBuf> {
    build(
        &Spec {
            name: CTL,
            version,
            summary: "Host command-line client for kvm-manager-agent",
            description: "kvm-agent-ctl talks to a kvm-manager-agent inside a guest through\n\
                          QEMU's virtio-serial chardev socket, AF_VSOCK or hybrid vsock.\n\
                          Shell completions for bash, zsh and fish included.",
            requires: Some("glibc"),
            entries: vec![
                Entry::new("usr/bin/kvm-agent-ctl", 0o755, &files.ctl),
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
                    "usr/share/zsh/site-functions/_kvm-agent-ctl",
                    0o644,
                    &files.zsh,
                ),
                Entry::new(
                    "usr/share/fish/vendor_completions.d/kvm-agent-ctl.fish",
                    0o644,
                    &files.fish,
                ),
            ],
            config: &[],
            dirs: &[],
            scripts: vec![],
        },
        out,
    )
}

fn spec_text(s: &Spec, buildroot_src: &Path) -> String {
    let mut t = String::new();
    let _ = write!(
        t,
        "Name: {}\nVersion: {}\nRelease: 1\nSummary: {}\nLicense: Apache-2.0\nURL: {HOMEPAGE}\n\
         BuildArch: x86_64\n\
         # Dependencies are declared, not computed: the agent is static.\nAutoReqProv: no\n",
        s.name, s.version, s.summary
    );
    if let Some(r) = s.requires {
        let _ = writeln!(t, "Requires: {r}");
    }
    let _ = write!(
        t,
        "\n%description\n{}\n\n%install\nmkdir -p %{{buildroot}}\ncp -a {}/. %{{buildroot}}/\n\n",
        s.description,
        buildroot_src.display()
    );
    for (section, body) in &s.scripts {
        let _ = write!(t, "%{section}\n{}\n", body.trim_end());
        t.push('\n');
    }
    t.push_str("%files\n");
    for d in s.dirs {
        let _ = writeln!(t, "%dir %attr(0755,root,root) /{d}");
    }
    for e in &s.entries {
        let attr = format!("%attr({:04o},root,root)", e.mode);
        if s.config.contains(&e.path.as_str()) {
            let _ = writeln!(t, "%config(noreplace) {attr} /{}", e.path);
        } else if e.path.starts_with("usr/share/man/") {
            let _ = writeln!(t, "%doc {attr} /{}", e.path);
        } else {
            let _ = writeln!(t, "{attr} /{}", e.path);
        }
    }
    t
}

fn build(s: &Spec, out: &Path) -> Result<PathBuf> {
    let work = crate::vm::target_dir()
        .join("dist-work")
        .join(format!("rpm-{}", s.name));
    let _ = fs::remove_dir_all(&work);
    let files = work.join("files");
    mkdir(&files)?;
    lay_out(&files, &s.entries)?;
    let top = work.join("top");
    mkdir(&top)?;
    let spec = work.join(format!("{}.spec", s.name));
    fs::write(&spec, spec_text(s, &files))
        .map_err(|e| format!("cannot write {}: {e}", spec.display()))?;
    let define = |c: &mut Command, kv: String| {
        c.arg("--define").arg(kv);
    };
    let mut rb = Command::new("rpmbuild");
    rb.args(["-bb", "--target", "x86_64-linux"]);
    define(&mut rb, format!("_topdir {}", top.display()));
    // Nothing to post-process: the binaries are stripped, the man pages
    // compressed, and there is no debuginfo to split out.
    define(&mut rb, "__os_install_post %{nil}".into());
    define(&mut rb, "debug_package %{nil}".into());
    define(&mut rb, "_build_id_links none".into());
    // xz payload: read by every rpm still in use (zstd needs rpm >= 4.14.2).
    define(&mut rb, "_binary_payload w6.xzdio".into());
    rb.arg(&spec);
    cmd::run(&mut rb)?;
    let name = format!("{}-{}-1.x86_64.rpm", s.name, s.version);
    let built = top.join("RPMS/x86_64").join(&name);
    let dest = out.join(&name);
    fs::copy(&built, &dest).map_err(|e| format!("cannot copy {}: {e}", built.display()))?;
    Ok(dest)
}
