//! Power off and restart. Graceful: ask the init system, found at run time
//! (`systemctl` where systemd runs, else sysvinit's `shutdown`, else the
//! `poweroff`/`reboot` of busybox and others). Forced: sync(2), then
//! reboot(2), with no external program.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use kvm_agent_protocol::methods::power::PowerAction;

use super::super::PlatformError;
use crate::policy::commands::SEARCH_PATH;

fn find(name: &str) -> Option<PathBuf> {
    SEARCH_PATH
        .iter()
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The command a graceful `action` runs on this system, found now.
pub fn graceful_command(action: PowerAction, message: Option<&str>) -> Option<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    if std::path::Path::new("/run/systemd/system").is_dir() {
        if let Some(systemctl) = find("systemctl") {
            let verb = match action {
                PowerAction::Shutdown => "poweroff",
                PowerAction::Reboot => "reboot",
            };
            let mut argv = vec![path(systemctl), verb.to_owned()];
            if let Some(m) = message {
                argv.push(format!("--message={m}"));
            }
            return Some(argv);
        }
    }
    // sysvinit's shutdown (busybox has none), which tells users why.
    if let Some(shutdown) = find("shutdown") {
        let flags: &[&str] = match action {
            PowerAction::Shutdown => &["-h", "-P", "now"],
            PowerAction::Reboot => &["-r", "now"],
        };
        let mut argv = vec![path(shutdown)];
        argv.extend(s(flags));
        if let Some(m) = message {
            argv.push(m.to_owned());
        }
        return Some(argv);
    }
    let name = match action {
        PowerAction::Shutdown => "poweroff",
        PowerAction::Reboot => "reboot",
    };
    find(name).map(|p| vec![path(p)])
}

/// Ask the init system to power off or restart, and wait for the request
/// to be taken (the command's own exit).
pub fn graceful(action: PowerAction, message: Option<&str>) -> Result<(), PlatformError> {
    let argv = graceful_command(action, message).ok_or(PlatformError::Unsupported {
        what: "graceful power control without systemctl, shutdown, poweroff or reboot",
    })?;
    log::warn!("power: running {argv:?}");
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .env("PATH", crate::policy::commands::SEARCH_PATH_ENV)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| PlatformError::io(argv[0].clone(), e))?;
    if !status.success() {
        return Err(PlatformError::Malformed {
            source_name: argv[0].clone(),
            problem: format!("exited with {status}"),
        });
    }
    Ok(())
}

/// Sync filesystems, then power off or restart at once.
pub fn forced(action: PowerAction) -> Result<(), PlatformError> {
    log::warn!("power: forced {action:?}: sync, then reboot(2)");
    // SAFETY: sync and reboot have no memory preconditions; reboot only
    // returns on failure.
    unsafe {
        libc::sync();
        let cmd = match action {
            PowerAction::Shutdown => libc::RB_POWER_OFF,
            PowerAction::Reboot => libc::RB_AUTOBOOT,
        };
        libc::reboot(cmd);
    }
    Err(PlatformError::io(
        "reboot(2)",
        std::io::Error::last_os_error(),
    ))
}
