//! The Windows release exe and its MSI (wixl), and the MSI's test under
//! Wine.
//!
//! [`build`] makes the release `kvm-manager-agent.exe` (checked to import
//! system DLLs only: the C runtime is linked statically, no mingw DLL) and
//! `kvm-manager-agent-VERSION-x64.msi` from `packaging/windows/` with
//! `wixl -a x64`. `cargo xtask dist` puts both in `target/dist/`.
//!
//! [`check`] installs the MSI under Wine and checks what it did. Wine kills
//! services when its last ordinary process exits, so every check that needs
//! the running service happens inside one `wine cmd /c SCRIPT` session:
//!
//! 1. install: the exe and the config are in place, the service is
//!    registered (automatic start, LocalSystem, `--service`) and running, the
//!    Event Log source is registered, and the service answers `ping` on
//!    `\\.\pipe\kvm-manager-agent` (the `pipe_ping` example);
//! 2. uninstall: the service, the source, the files and folders are gone.
//!
//! No upgrade test: under Wine 8 an upgrade to a higher version installs and
//! the service answers, but Wine's msi replaces a changed config (Windows'
//! rule for changed unversioned files keeps it) and a later `msiexec /x`
//! returned 0 yet left the product installed. Upgrades need a real Windows.
//!
//! Wine cannot show the recovery actions (QueryServiceConfig2W lacks that
//! level) nor a real SCM's restart: those need a real Windows.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Windows, TARGET};
use crate::test::{Counts, Report, Suite};
use crate::{cmd, Result};

/// The service name, the pipe the shipped config serves, and the folder
/// name under Program Files and ProgramData.
const SERVICE: &str = "kvm-manager-agent";
const PIPE: &str = r"\\.\pipe\kvm-manager-agent";
const FOLDER: &str = "KVM Manager Agent";

/// DLLs the agent may import: Windows' own (`api-ms-win-*` sets included).
/// Anything else (libgcc_s, libwinpthread, a C++ runtime) would have to be
/// shipped beside the exe.
const SYSTEM_DLLS: &[&str] = &[
    "advapi32.dll",
    "bcrypt.dll",
    "bcryptprimitives.dll",
    "combase.dll",
    "iphlpapi.dll",
    "kernel32.dll",
    "msvcrt.dll",
    "netapi32.dll",
    "ntdll.dll",
    "ole32.dll",
    "oleaut32.dll",
    "psapi.dll",
    "secur32.dll",
    "shell32.dll",
    "user32.dll",
    "userenv.dll",
    "ws2_32.dll",
    "wtsapi32.dll",
];

/// What [`build`] made.
#[derive(Debug)]
pub struct Built {
    /// The release agent.
    pub exe: PathBuf,
    /// The MSI.
    pub msi: PathBuf,
}

/// `cargo build --release` of the agent for Windows, its imports checked.
pub fn release_exe(windows: &Windows) -> Result<PathBuf> {
    let mut cargo = windows.cargo("build");
    cargo.args(["--release", "-p", "kvm-manager-agent", "--bin", SERVICE]);
    cmd::run(&mut cargo)?;
    let exe = windows
        .root
        .join("target/windows")
        .join(TARGET)
        .join("release")
        .join(format!("{SERVICE}.exe"));
    check_imports(&exe)?;
    Ok(exe)
}

/// The DLLs `exe` imports, from `objdump -p`.
fn imports(exe: &Path) -> Result<Vec<String>> {
    let mut objdump = Command::new("x86_64-w64-mingw32-objdump");
    objdump.arg("-p").arg(exe);
    let (status, out) = cmd::output(&mut objdump)?;
    cmd::check(&objdump, status)?;
    Ok(parse_imports(&out))
}

/// The imported DLLs, lower case, each once, in order of first appearance.
fn parse_imports(objdump: &str) -> Vec<String> {
    let mut dlls: Vec<String> = Vec::new();
    for name in objdump
        .lines()
        .filter_map(|l| l.trim().strip_prefix("DLL Name:"))
        .map(|n| n.trim().to_ascii_lowercase())
    {
        if !dlls.contains(&name) {
            dlls.push(name);
        }
    }
    dlls
}

fn is_system_dll(name: &str) -> bool {
    SYSTEM_DLLS.contains(&name) || name.starts_with("api-ms-win-")
}

/// Fail unless `exe` imports system DLLs only.
fn check_imports(exe: &Path) -> Result {
    let dlls = imports(exe)?;
    if dlls.is_empty() {
        return Err(format!("objdump found no imports in {}", exe.display()));
    }
    let foreign: Vec<&String> = dlls.iter().filter(|d| !is_system_dll(d)).collect();
    if !foreign.is_empty() {
        return Err(format!(
            "{} imports DLLs that Windows does not ship: {foreign:?}",
            exe.display()
        ));
    }
    println!(
        "xtask: {} imports system DLLs only: {}",
        exe.display(),
        dlls.join(", ")
    );
    Ok(())
}

/// `wixl -a x64` over packaging/windows/kvm-manager-agent.wxs. wixl takes
/// `Source` paths relative to its working folder only (an absolute one is
/// "not found"), so the two files are staged beside each other first.
pub fn msi(exe: &Path, config: &Path, version: &str, out: &Path) -> Result {
    let root = crate::root();
    let stage = root.join("target/windows/wixl-stage");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage).map_err(|e| format!("cannot create {}: {e}", stage.display()))?;
    for (from, name) in [(exe, "kvm-manager-agent.exe"), (config, "config.toml")] {
        fs::copy(from, stage.join(name))
            .map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    }
    let out = std::path::absolute(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut wixl = Command::new("wixl");
    wixl.current_dir(&stage)
        .args(["-a", "x64", "-D"])
        .arg(format!("Version={version}"))
        .args([
            "-D",
            "AgentExe=kvm-manager-agent.exe",
            "-D",
            "Config=config.toml",
            "-o",
        ])
        .arg(&out)
        .arg(root.join("packaging/windows/kvm-manager-agent.wxs"));
    cmd::run(&mut wixl)
}

/// The release exe and the MSI of `version`, into `dir`.
pub fn build(windows: &Windows, version: &str, dir: &Path) -> Result<Built> {
    let exe = release_exe(windows)?;
    let config = crate::root().join("packaging/windows/config.toml");
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let msi_path = dir.join(format!("{SERVICE}-{version}-x64.msi"));
    msi(&exe, &config, version, &msi_path)?;
    Ok(Built { exe, msi: msi_path })
}

/// One named check of the MSI test.
struct Checks {
    results: Vec<(String, bool)>,
}

impl Checks {
    fn check(&mut self, what: impl Into<String>, ok: bool) {
        let what = what.into();
        println!("xtask: msi: {} {what}", if ok { "ok  " } else { "FAIL" });
        self.results.push((what, ok));
    }
}

/// A `wine cmd /c` session in the test folder: runs `script` (written as
/// `name.cmd`) and returns its output.
fn session(windows: &Windows, dir: &Path, name: &str, script: &str) -> Result<String> {
    let file = dir.join(format!("{name}.cmd"));
    fs::write(&file, script.replace('\n', "\r\n"))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    let mut wine = windows.wine(&["cmd", "/c", &format!(r"C:\xtask-msi\{name}.cmd")]);
    cmd::announce(&wine);
    let out = wine
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", cmd::display(&wine)))?;
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    println!("{text}");
    // Let the wineserver (and the services it killed) finish.
    let mut wait = Command::new("wineserver");
    wait.arg("-w");
    windows.wine_env(&mut wait);
    cmd::run(&mut wait)?;
    Ok(text)
}

/// The value after `KEY=` on its own line of a session's output.
fn marker<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

/// The commands that check the installed service inside a session.
fn service_checks(pipe_ping: &str) -> String {
    format!(
        "sc query {SERVICE}\n\
         reg query HKLM\\SYSTEM\\CurrentControlSet\\Services\\{SERVICE} /v Start\n\
         reg query HKLM\\SYSTEM\\CurrentControlSet\\Services\\{SERVICE} /v ImagePath\n\
         reg query HKLM\\SYSTEM\\CurrentControlSet\\Services\\{SERVICE} /v ObjectName\n\
         reg query HKLM\\SYSTEM\\CurrentControlSet\\Services\\EventLog\\Application\\{SERVICE} /v TypesSupported\n\
         echo eventsource=%ERRORLEVEL%\n\
         {pipe_ping} {PIPE} 30\n\
         echo ping=%ERRORLEVEL%\n"
    )
}

fn check_installed(checks: &mut Checks, when: &str, out: &str) {
    checks.check(
        format!("{when}: msiexec /i succeeded"),
        marker(out, "install") == Some("0"),
    );
    checks.check(
        format!("{when}: the service is running"),
        out.lines()
            .any(|l| l.contains("STATE") && l.contains("RUNNING")),
    );
    checks.check(
        format!("{when}: automatic start (Start = 2)"),
        out.lines()
            .any(|l| l.contains("Start") && l.contains("REG_DWORD") && l.contains("0x2")),
    );
    checks.check(
        format!("{when}: ImagePath runs the installed exe with --service"),
        out.lines().any(|l| {
            l.contains("ImagePath")
                && l.contains(&format!(r"Program Files\{FOLDER}\{SERVICE}.exe"))
                && l.contains("--service")
        }),
    );
    checks.check(
        format!("{when}: runs as LocalSystem"),
        out.lines()
            .any(|l| l.contains("ObjectName") && l.contains("LocalSystem")),
    );
    checks.check(
        format!("{when}: Event Log source registered"),
        marker(out, "eventsource") == Some("0"),
    );
    checks.check(
        format!("{when}: the service answers ping on {PIPE}"),
        marker(out, "ping") == Some("0")
            && out.contains("pipe_ping:")
            && out.contains(r#""result":{}"#),
    );
}

/// The MSI test under Wine; one suite in `report`.
pub fn check(windows: &Windows, report: &mut Report) -> Result {
    let version = crate::dist::workspace_version()?;
    let work = windows.root.join("target/windows/msi-test");
    let _ = fs::remove_dir_all(&work);
    let built = build(windows, &version, &work)?;
    let mut ping = windows.cargo("build");
    ping.args(["-p", "kvm-manager-agent", "--example", "pipe_ping"]);
    cmd::run(&mut ping)?;
    let ping_exe = windows
        .root
        .join("target/windows")
        .join(TARGET)
        .join("debug/examples/pipe_ping.exe");

    // The test folder inside the prefix: C:\xtask-msi.
    let drive_c = windows.prefix.join("drive_c");
    let dir = drive_c.join("xtask-msi");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let copy = |from: &Path, name: &str| {
        fs::copy(from, dir.join(name))
            .map(|_| ())
            .map_err(|e| format!("cannot copy {}: {e}", from.display()))
    };
    copy(&built.msi, "agent.msi")?;
    copy(&ping_exe, "pipe_ping.exe")?;
    let exe = drive_c
        .join("Program Files")
        .join(FOLDER)
        .join(format!("{SERVICE}.exe"));
    let config_dir = drive_c.join("ProgramData").join(FOLDER);
    let config = config_dir.join("config.toml");
    let shipped = fs::read(crate::root().join("packaging/windows/config.toml"))
        .map_err(|e| format!("cannot read packaging/windows/config.toml: {e}"))?;
    let pipe_ping = r"C:\xtask-msi\pipe_ping.exe";
    let mut checks = Checks {
        results: Vec::new(),
    };

    // 1. Install.
    let out = session(
        windows,
        &dir,
        "install",
        &format!(
            "msiexec /i C:\\xtask-msi\\agent.msi /qn\n\
             echo install=%ERRORLEVEL%\n{}",
            service_checks(pipe_ping)
        ),
    )?;
    check_installed(&mut checks, "install", &out);
    checks.check(
        "install: the exe is under Program Files",
        fs::read(&exe).ok() == fs::read(&built.exe).ok(),
    );
    checks.check(
        "install: the shipped config is in ProgramData",
        fs::read(&config).ok().as_deref() == Some(shipped.as_slice()),
    );
    checks.check(
        "install: the transfer folder (default allowed directory) is in ProgramData",
        config_dir.join("transfer").is_dir(),
    );

    // 2. Uninstall.
    let out = session(
        windows,
        &dir,
        "uninstall",
        &format!(
            "msiexec /x C:\\xtask-msi\\agent.msi /qn\n\
             echo uninstall=%ERRORLEVEL%\n\
             sc query {SERVICE}\n\
             reg query HKLM\\SYSTEM\\CurrentControlSet\\Services\\{SERVICE}\n\
             echo service=%ERRORLEVEL%\n\
             reg query HKLM\\SYSTEM\\CurrentControlSet\\Services\\EventLog\\Application\\{SERVICE}\n\
             echo eventsource=%ERRORLEVEL%\n"
        ),
    )?;
    checks.check(
        "uninstall: msiexec /x succeeded",
        marker(&out, "uninstall") == Some("0"),
    );
    checks.check(
        "uninstall: the service is gone",
        marker(&out, "service").is_some_and(|c| c != "0"),
    );
    checks.check(
        "uninstall: the Event Log source is gone",
        marker(&out, "eventsource").is_some_and(|c| c != "0"),
    );
    checks.check(
        "uninstall: the exe and its folder are gone",
        !exe.parent().is_some_and(Path::exists),
    );
    checks.check(
        "uninstall: the config and its folder are gone",
        !config_dir.exists(),
    );
    let _ = fs::remove_dir_all(&dir);

    let failed: Vec<&str> = checks
        .results
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(w, _)| w.as_str())
        .collect();
    report.suites.push(Suite {
        label: "windows: MSI install, service, ping, uninstall under Wine".into(),
        counts: Counts {
            passed: (checks.results.len() - failed.len()) as u64,
            failed: failed.len() as u64,
            ignored: 0,
        },
    });
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("MSI checks failed: {failed:?}"))
    }
}

/// `cargo xtask windows-msi`: [`check`] alone.
pub fn run() -> Result {
    crate::ensure::all(super::NEEDS)?;
    let windows = Windows::prepare()?;
    let mut report = Report::default();
    let checked = check(&windows, &mut report);
    for suite in &report.suites {
        println!(
            "xtask: {}: {} passed, {} failed",
            suite.label, suite.counts.passed, suite.counts.failed
        );
    }
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_from_objdump() {
        let text = "\tDLL Name: KERNEL32.dll\n\tvma:  Hint/Ord Member-Name\n\tDLL Name: api-ms-win-core-synch-l1-2-0.dll\n\tDLL Name: libgcc_s_seh-1.dll\n\tDLL Name: kernel32.dll\n";
        let dlls = parse_imports(text);
        assert_eq!(
            dlls,
            [
                "kernel32.dll",
                "api-ms-win-core-synch-l1-2-0.dll",
                "libgcc_s_seh-1.dll"
            ]
        );
        assert!(is_system_dll(&dlls[0]) && is_system_dll(&dlls[1]));
        assert!(!is_system_dll(&dlls[2]));
    }

    #[test]
    fn markers() {
        let out = "x\ninstall=0\n  ping=1603 \n";
        assert_eq!(marker(out, "install"), Some("0"));
        assert_eq!(marker(out, "ping"), Some("1603"));
        assert_eq!(marker(out, "eventsource"), None);
    }
}
