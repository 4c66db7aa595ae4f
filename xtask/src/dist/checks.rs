//! The `packages` step of `cargo xtask test`: build every artifact with
//! `dist`, then check them without a VM: lintian on the .debs, their file
//! lists, modes and conffiles, the .rpm's files and scriptlets and an install
//! into a scratch root, and the tarball's install.sh/uninstall.sh with
//! --destdir. (The .deb under systemd and the tarball in a chroot are checked
//! by the `debian` step, which has a Debian root file system.)

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{tarball, Dist};
use crate::ensure::Need;
use crate::test::{Counts, Report, Suite};
use crate::{cmd, Result};

/// What the step needs besides [`super::NEEDS`].
pub const NEEDS: &[Need] = &[
    Need::Apt("dpkg-dev"),
    Need::Apt("rpm"),
    Need::Apt("gzip"),
    Need::Apt("xz-utils"),
    Need::Apt("lintian"),
];

/// Named checks, each passing or failing on its own; the step fails when one does.
#[derive(Debug, Default)]
pub struct Checks {
    label: String,
    passed: u64,
    failures: Vec<String>,
}

impl Checks {
    pub fn new(label: &str) -> Self {
        Self {
            label: label.into(),
            ..Self::default()
        }
    }

    pub fn check(&mut self, name: &str, f: impl FnOnce() -> Result) {
        println!("\n--- check: {name}");
        match f() {
            Ok(()) => {
                println!("--- ok: {name}");
                self.passed += 1;
            }
            Err(e) => {
                println!("--- FAILED: {name}: {e}");
                self.failures.push(format!("{name}: {e}"));
            }
        }
    }

    /// Add the counts to the report; an error listing the failures, if any.
    pub fn finish(self, report: &mut Report) -> Result {
        let failed = self.failures.len() as u64;
        println!("{}: {} passed, {} failed", self.label, self.passed, failed);
        report.suites.push(Suite {
            label: self.label,
            counts: Counts {
                passed: self.passed,
                failed,
                ignored: 0,
            },
        });
        if self.failures.is_empty() {
            Ok(())
        } else {
            Err(self.failures.join("; "))
        }
    }
}

pub fn step(report: &mut Report) -> Result {
    let dist = super::build()?;
    dist.print_summary();
    let mut c = Checks::new("packages");
    c.check("maintainer scripts parse (sh -n)", maintainer_scripts_parse);
    for deb in [&dist.agent_deb, &dist.ctl_deb] {
        let name = deb
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        c.check(&format!("lintian {name}"), || lintian(deb));
    }
    c.check("agent .deb: files, modes, conffiles, scripts", || {
        agent_deb_layout(&dist)
    });
    c.check("ctl .deb: files and dependencies", || ctl_deb_layout(&dist));
    c.check("agent .rpm: rpm -qlp and rpm -qp --scripts", || {
        agent_rpm_query(&dist)
    });
    c.check("agent .rpm: install into a scratch root and erase", || {
        rpm_scratch_root(&dist)
    });
    c.check("ctl .rpm: rpm -qlp", || ctl_rpm_query(&dist));
    c.check(
        "tarball: install.sh and uninstall.sh with --destdir",
        || tarball_destdir(&dist),
    );
    c.finish(report)
}

fn output_ok(c: &mut Command) -> Result<String> {
    let (status, out) = cmd::output(c)?;
    cmd::check(c, status)?;
    Ok(out)
}

fn maintainer_scripts_parse() -> Result {
    let root = crate::root().join("packaging");
    for f in [
        "deb/postinst",
        "deb/prerm",
        "deb/postrm",
        "rpm/post.sh",
        "rpm/preun.sh",
        "rpm/postun.sh",
        "tarball/install.sh",
        "tarball/uninstall.sh",
    ] {
        cmd::run(Command::new("sh").arg("-n").arg(root.join(f)))?;
    }
    Ok(())
}

fn lintian(deb: &Path) -> Result {
    // Errors and warnings fail; info tags are shown. Overrides live in the
    // package (/usr/share/lintian/overrides), each with its reason.
    cmd::run(
        Command::new("lintian")
            .args(["--fail-on", "error,warning", "--display-info"])
            .arg(deb),
    )?;
    // The overridden tags with their reasons, for the log only (lintian
    // counts overridden warnings as failures under --show-overrides).
    let _ = cmd::status(
        Command::new("lintian")
            .args(["--show-overrides", "--no-tag-display-limit"])
            .arg(deb),
    );
    Ok(())
}

/// `dpkg-deb -c` as path -> (mode string, owner).
fn deb_listing(deb: &Path) -> Result<BTreeMap<String, (String, String)>> {
    let out = output_ok(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let mut map = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let path = f[5].trim_start_matches('.').to_string();
        map.insert(path, (f[0].to_string(), f[1].to_string()));
    }
    Ok(map)
}

fn expect_files(list: &BTreeMap<String, (String, String)>, want: &[(&str, &str)]) -> Result {
    for (path, mode) in want {
        match list.get(*path) {
            None => return Err(format!("{path} is missing")),
            Some((m, owner)) if m != mode || owner != "root/root" => {
                return Err(format!("{path} is {m} {owner}, want {mode} root/root"))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn agent_deb_layout(dist: &Dist) -> Result {
    let list = deb_listing(&dist.agent_deb)?;
    expect_files(
        &list,
        &[
            ("/usr/bin/kvm-manager-agent", "-rwxr-xr-x"),
            ("/etc/kvm-manager-agent/config.toml", "-rw-r--r--"),
            (
                "/lib/systemd/system/kvm-manager-agent.service",
                "-rw-r--r--",
            ),
            ("/usr/share/man/man8/kvm-manager-agent.8.gz", "-rw-r--r--"),
            ("/usr/share/doc/kvm-manager-agent/copyright", "-rw-r--r--"),
            (
                "/usr/share/doc/kvm-manager-agent/changelog.Debian.gz",
                "-rw-r--r--",
            ),
        ],
    )?;
    let work = scratch("deb-control")?;
    cmd::run(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&dist.agent_deb)
            .arg(&work),
    )?;
    let conf = fs::read_to_string(work.join("conffiles")).map_err(|e| e.to_string())?;
    if conf.trim() != "/etc/kvm-manager-agent/config.toml" {
        return Err(format!("conffiles is {conf:?}"));
    }
    for s in ["postinst", "prerm", "postrm"] {
        let text = fs::read_to_string(work.join(s)).map_err(|e| format!("{s}: {e}"))?;
        let mode = fs::metadata(work.join(s))
            .map_err(|e| e.to_string())?
            .permissions()
            .mode();
        if mode & 0o111 == 0 {
            return Err(format!("{s} is not executable"));
        }
        let must = match s {
            "postinst" => "deb-systemd-helper enable",
            "prerm" => "deb-systemd-invoke stop",
            _ => "rm -rf /etc/kvm-manager-agent",
        };
        if !text.contains(must) {
            return Err(format!("{s} lacks `{must}`"));
        }
    }
    let control = fs::read_to_string(work.join("control")).map_err(|e| e.to_string())?;
    println!("{control}");
    if control.contains("\nDepends:") {
        return Err("the static agent's package should depend on nothing".into());
    }
    Ok(())
}

fn ctl_deb_layout(dist: &Dist) -> Result {
    let list = deb_listing(&dist.ctl_deb)?;
    expect_files(
        &list,
        &[
            ("/usr/bin/kvm-agent-ctl", "-rwxr-xr-x"),
            ("/usr/share/man/man1/kvm-agent-ctl.1.gz", "-rw-r--r--"),
            (
                "/usr/share/bash-completion/completions/kvm-agent-ctl",
                "-rw-r--r--",
            ),
            (
                "/usr/share/zsh/vendor-completions/_kvm-agent-ctl",
                "-rw-r--r--",
            ),
            (
                "/usr/share/fish/vendor_completions.d/kvm-agent-ctl.fish",
                "-rw-r--r--",
            ),
        ],
    )?;
    let depends = output_ok(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&dist.ctl_deb)
            .arg("Depends"),
    )?;
    println!("Depends: {}", depends.trim());
    if !depends.contains("libc6") {
        return Err(format!("Depends lacks libc6: {depends:?}"));
    }
    Ok(())
}

fn rpm_list(rpm: &Path) -> Result<Vec<String>> {
    let out = output_ok(Command::new("rpm").args(["-qlp"]).arg(rpm))?;
    println!("{out}");
    Ok(out.lines().map(str::to_string).collect())
}

fn agent_rpm_query(dist: &Dist) -> Result {
    let files = rpm_list(&dist.agent_rpm)?;
    let want = [
        "/etc/kvm-manager-agent",
        "/etc/kvm-manager-agent/config.toml",
        "/usr/bin/kvm-manager-agent",
        "/usr/lib/systemd/system-preset/90-kvm-manager-agent.preset",
        "/usr/lib/systemd/system/kvm-manager-agent.service",
        "/usr/share/man/man8/kvm-manager-agent.8.gz",
    ];
    if files != want {
        return Err(format!("rpm -qlp lists {files:?}, want {want:?}"));
    }
    let scripts = output_ok(
        Command::new("rpm")
            .args(["-qp", "--scripts"])
            .arg(&dist.agent_rpm),
    )?;
    println!("{scripts}");
    for must in [
        "postinstall scriptlet",
        "systemctl --no-reload preset kvm-manager-agent.service",
        "preuninstall scriptlet",
        "systemctl --no-reload disable --now kvm-manager-agent.service",
        "postuninstall scriptlet",
        "systemctl try-restart kvm-manager-agent.service",
    ] {
        if !scripts.contains(must) {
            return Err(format!("rpm -qp --scripts lacks {must:?}"));
        }
    }
    let config = output_ok(
        Command::new("rpm")
            .args(["-qp", "--configfiles"])
            .arg(&dist.agent_rpm),
    )?;
    if config.trim() != "/etc/kvm-manager-agent/config.toml" {
        return Err(format!("config files: {config:?}"));
    }
    let info = output_ok(
        Command::new("rpm")
            .args(["-qp", "--qf", "%{NAME} %{VERSION} %{ARCH} %{LICENSE}\\n"])
            .arg(&dist.agent_rpm),
    )?;
    let want = format!("kvm-manager-agent {} x86_64 Apache-2.0", dist.version);
    if info.trim() != want {
        return Err(format!("rpm header says {info:?}, want {want:?}"));
    }
    Ok(())
}

fn ctl_rpm_query(dist: &Dist) -> Result {
    let files = rpm_list(&dist.ctl_rpm)?;
    for must in [
        "/usr/bin/kvm-agent-ctl",
        "/usr/share/man/man1/kvm-agent-ctl.1.gz",
        "/usr/share/bash-completion/completions/kvm-agent-ctl",
        "/usr/share/zsh/site-functions/_kvm-agent-ctl",
        "/usr/share/fish/vendor_completions.d/kvm-agent-ctl.fish",
    ] {
        if !files.iter().any(|f| f == must) {
            return Err(format!("{must} is not in the rpm"));
        }
    }
    Ok(())
}

fn rpm_in(root: &Path) -> Command {
    let mut c = Command::new("rpm");
    c.arg("--root").arg(root).args(["--dbpath", "/var/lib/rpm"]);
    c
}

fn rpm_scratch_root(dist: &Dist) -> Result {
    let root = scratch("rpm-root")?;
    // No shell in the scratch root, so no scriptlets: they are checked above.
    cmd::run(
        rpm_in(&root)
            .args(["-i", "--nodeps", "--noscripts"])
            .arg(&dist.agent_rpm),
    )?;
    let q = output_ok(rpm_in(&root).args(["-q", "kvm-manager-agent"]))?;
    if !q.starts_with(&format!("kvm-manager-agent-{}-1", dist.version)) {
        return Err(format!("rpm -q says {q:?}"));
    }
    for (path, mode) in [
        ("usr/bin/kvm-manager-agent", 0o755),
        ("etc/kvm-manager-agent/config.toml", 0o644),
        ("usr/lib/systemd/system/kvm-manager-agent.service", 0o644),
        ("usr/share/man/man8/kvm-manager-agent.8.gz", 0o644),
    ] {
        let m = fs::metadata(root.join(path)).map_err(|e| format!("{path}: {e}"))?;
        if m.permissions().mode() & 0o7777 != mode {
            return Err(format!(
                "{path} has mode {:o}",
                m.permissions().mode() & 0o7777
            ));
        }
    }
    let installed = fs::read(root.join("usr/bin/kvm-manager-agent")).map_err(|e| e.to_string())?;
    if installed != dist.files.agent {
        return Err("the installed agent differs from the built one".into());
    }
    // Sizes, digests, modes and owners as recorded (no /bin/sh here: --nodeps).
    cmd::run(rpm_in(&root).args(["-V", "--nodeps", "kvm-manager-agent"]))?;
    // A changed %config(noreplace) survives erase as .rpmsave.
    let conf = root.join("etc/kvm-manager-agent/config.toml");
    let mut text = fs::read_to_string(&conf).map_err(|e| e.to_string())?;
    text.push_str("# changed by the test\n");
    fs::write(&conf, &text).map_err(|e| e.to_string())?;
    cmd::run(rpm_in(&root).args(["-e", "--nodeps", "--noscripts", "kvm-manager-agent"]))?;
    if root.join("usr/bin/kvm-manager-agent").exists() {
        return Err("rpm -e left the binary".into());
    }
    let saved = fs::read_to_string(root.join("etc/kvm-manager-agent/config.toml.rpmsave"))
        .map_err(|e| format!("no config.toml.rpmsave after erasing a changed config: {e}"))?;
    if saved != text {
        return Err("config.toml.rpmsave is not the changed config".into());
    }
    Ok(())
}

/// A fresh folder under target/dist-test.
pub fn scratch(name: &str) -> Result<PathBuf> {
    let dir = crate::vm::target_dir().join("dist-test").join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
    }
    super::mkdir(&dir)?;
    Ok(dir)
}

/// Every file, link and folder under `root`: path -> (kind and mode, content
/// or link target).
pub fn snapshot(root: &Path) -> Result<BTreeMap<String, (String, Vec<u8>)>> {
    let mut map = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let e = e.map_err(|e| e.to_string())?;
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            let m = fs::symlink_metadata(&p).map_err(|e| e.to_string())?;
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                let t = fs::read_link(&p).map_err(|e| e.to_string())?;
                map.insert(rel, ("link".into(), t.display().to_string().into_bytes()));
            } else if m.is_dir() {
                map.insert(rel, (format!("dir {mode:o}"), Vec::new()));
                todo.push(p);
            } else {
                let data = fs::read(&p).map_err(|e| e.to_string())?;
                map.insert(rel, (format!("file {mode:o}"), data));
            }
        }
    }
    Ok(map)
}

/// Extract the tarball into `into`; returns the folder with install.sh.
pub fn extract_tarball(dist: &Dist, into: &Path) -> Result<PathBuf> {
    cmd::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&dist.tarball)
            .arg("-C")
            .arg(into),
    )?;
    Ok(into.join(tarball::base_name(&dist.version)))
}

fn run_script(c: &mut Command) -> Result<String> {
    cmd::announce(c);
    let out = c
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cmd::display(c)))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{text}");
    cmd::check(c, out.status)?;
    Ok(text)
}

fn tarball_destdir(dist: &Dist) -> Result {
    let work = scratch("tarball-destdir")?;
    let src = extract_tarball(dist, &work)?;
    let dest = work.join("root");
    let install = |extra: &[&str]| {
        run_script(
            Command::new(src.join("install.sh"))
                .arg("--destdir")
                .arg(&dest)
                .args(extra),
        )
    };
    install(&[])?;
    let first = snapshot(&dest)?;
    let get = |snap: &BTreeMap<String, (String, Vec<u8>)>, p: &str| -> Result<(String, Vec<u8>)> {
        snap.get(p)
            .cloned()
            .ok_or_else(|| format!("{p} was not installed"))
    };
    let (kind, data) = get(&first, "usr/local/bin/kvm-manager-agent")?;
    if kind != "file 755" || data != dist.files.agent {
        return Err(format!(
            "usr/local/bin/kvm-manager-agent: {kind}, or other content"
        ));
    }
    let (kind, data) = get(&first, "etc/kvm-manager-agent/config.toml")?;
    if kind != "file 644" || data != dist.files.config {
        return Err(format!("config.toml: {kind}, or not the default"));
    }
    let (_, unit) = get(&first, "etc/systemd/system/kvm-manager-agent.service")?;
    if !String::from_utf8_lossy(&unit).contains("\nExecStart=/usr/local/bin/kvm-manager-agent\n") {
        return Err("the unit's ExecStart does not point at /usr/local/bin".into());
    }
    let (kind, target) = get(
        &first,
        "etc/systemd/system/multi-user.target.wants/kvm-manager-agent.service",
    )?;
    if kind != "link" || target != b"/etc/systemd/system/kvm-manager-agent.service" {
        return Err("the unit is not enabled (multi-user.target.wants link)".into());
    }
    get(&first, "usr/local/share/man/man8/kvm-manager-agent.8.gz")?;

    // Idempotent: a second run leaves exactly the same tree.
    install(&[])?;
    if snapshot(&dest)? != first {
        return Err("a second install.sh changed the installed tree".into());
    }

    // A changed config is kept; the new default goes beside it.
    let conf = dest.join("etc/kvm-manager-agent/config.toml");
    let mut changed = dist.files.config.clone();
    changed.extend_from_slice(b"# changed by the admin\n");
    fs::write(&conf, &changed).map_err(|e| e.to_string())?;
    let said = install(&[])?;
    if fs::read(&conf).map_err(|e| e.to_string())? != changed {
        return Err("install.sh overwrote a changed config.toml".into());
    }
    let new = fs::read(dest.join("etc/kvm-manager-agent/config.toml.new"))
        .map_err(|e| format!("no config.toml.new beside a changed config: {e}"))?;
    if new != dist.files.config || !said.contains("config.toml.new") {
        return Err("config.toml.new is not the default, or install.sh did not say so".into());
    }

    // Uninstall keeps the changed config; --purge removes everything.
    run_script(
        Command::new(src.join("uninstall.sh"))
            .arg("--destdir")
            .arg(&dest),
    )?;
    let after = snapshot(&dest)?;
    let files: Vec<&String> = after
        .iter()
        .filter(|(_, (k, _))| !k.starts_with("dir"))
        .map(|(p, _)| p)
        .collect();
    let kept = [
        "etc/kvm-manager-agent/config.toml",
        "etc/kvm-manager-agent/config.toml.new",
    ];
    if files.iter().any(|f| !kept.contains(&f.as_str()))
        || !files.iter().any(|f| f.as_str() == kept[0])
    {
        return Err(format!(
            "after uninstall.sh the files are {files:?}, want only {kept:?}"
        ));
    }
    run_script(
        Command::new(src.join("uninstall.sh"))
            .arg("--destdir")
            .arg(&dest)
            .arg("--purge"),
    )?;
    let left: Vec<String> = snapshot(&dest)?
        .into_iter()
        .filter(|(_, (k, _))| !k.starts_with("dir"))
        .map(|(p, _)| p)
        .collect();
    if !left.is_empty() {
        return Err(format!("uninstall.sh --purge left {left:?}"));
    }

    // Another prefix: the unit follows it.
    let dest2 = work.join("root2");
    run_script(
        Command::new(src.join("install.sh"))
            .arg("--destdir")
            .arg(&dest2)
            .args(["--prefix", "/opt/kva"]),
    )?;
    let unit = fs::read_to_string(dest2.join("etc/systemd/system/kvm-manager-agent.service"))
        .map_err(|e| e.to_string())?;
    if !unit.contains("\nExecStart=/opt/kva/bin/kvm-manager-agent\n")
        || !dest2.join("opt/kva/bin/kvm-manager-agent").exists()
    {
        return Err("--prefix /opt/kva: binary or ExecStart not there".into());
    }
    Ok(())
}
