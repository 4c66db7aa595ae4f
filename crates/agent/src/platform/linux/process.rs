//! Starting and signalling the processes of `exec`: a new session (so a
//! process group to kill as a whole), privileges dropped to a `run_as` user,
//! and that user looked up in /etc/passwd and /etc/group directly (the agent
//! is a static binary: no NSS).

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;

use kvm_agent_protocol::methods::exec::Signal;

use super::super::PlatformError;

/// A user to run a command as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserIds {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
    /// Home directory.
    pub home: String,
}

/// `name` from /etc/passwd, with its groups from /etc/group.
pub fn lookup_user(name: &str) -> Result<Option<UserIds>, PlatformError> {
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(|e| PlatformError::io("/etc/passwd", e))?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    Ok(parse_user(&passwd, &group, |fields| fields[0] == name))
}

/// The user with id `uid` (the agent's own, for HOME and USER).
pub fn lookup_uid(uid: u32) -> Option<UserIds> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let uid = uid.to_string();
    parse_user(&passwd, &group, |fields| fields[2] == uid)
}

/// The agent's effective user id.
pub fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Find a passwd line (`name:x:uid:gid:gecos:home:shell`) and the groups
/// listing the user (`name:x:gid:user1,user2`).
pub fn parse_user(passwd: &str, group: &str, wanted: impl Fn(&[&str]) -> bool) -> Option<UserIds> {
    let fields = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && !f[0].starts_with('#') && wanted(f))?;
    let (uid, gid) = (fields[2].parse().ok()?, fields[3].parse().ok()?);
    let name = fields[0].to_owned();
    let mut groups = vec![gid];
    for g in group.lines() {
        let f: Vec<&str> = g.split(':').collect();
        if f.len() < 4 {
            continue;
        }
        if f[3].split(',').any(|m| m == name) {
            if let Ok(id) = f[2].parse() {
                if !groups.contains(&id) {
                    groups.push(id);
                }
            }
        }
    }
    Some(UserIds {
        name,
        uid,
        gid,
        groups,
        home: fields[5].to_owned(),
    })
}

/// Prepare `cmd` to start in a session of its own (its pid is then its
/// process group id) and, with `user`, with that user's ids and groups.
pub fn isolate(cmd: &mut std::process::Command, user: Option<&UserIds>) {
    let ids = user.map(|u| (u.uid, u.gid, u.groups.clone()));
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A started command and everything it starts: its process group (the
/// command's pid, as [`isolate`] made it a session leader).
#[derive(Debug)]
pub struct ProcessTree {
    pgid: u32,
}

impl ProcessTree {
    /// The group of `child`, started by a command prepared with [`isolate`].
    pub fn adopt(child: &tokio::process::Child) -> Result<Self, PlatformError> {
        let pgid = child.id().ok_or_else(|| {
            PlatformError::io(
                "the child process",
                io::Error::other("the child has already been waited for"),
            )
        })?;
        Ok(Self { pgid })
    }

    /// The command's own process id.
    pub fn id(&self) -> u32 {
        self.pgid
    }

    /// Send `signal` to every process of the group.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        signal_group(self.pgid, signal)
    }

    /// Whether the group still has members.
    pub fn alive(&self) -> bool {
        group_alive(self.pgid)
    }
}

/// Send `signal` to every process of the group `pgid`.
fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) with a negative pid signals a process group.
    if unsafe { libc::kill(-(pgid as i32), signal) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SIGKILL, for timeouts.
pub const SIGKILL: i32 = libc::SIGKILL;

/// The signal number of a protocol signal.
pub fn signal_number(s: Signal) -> Result<i32, PlatformError> {
    Ok(match s {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
        Signal::Int => libc::SIGINT,
        Signal::Hup => libc::SIGHUP,
    })
}

/// Exit code or terminating signal.
pub fn exit_parts(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.code(), status.signal())
}

/// Whether a process group still has members.
fn group_alive(pgid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(-(pgid as i32), 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        app:x:1000:1000:App,,,:/home/app:/bin/sh\n";
    const GROUP: &str =
        "root:x:0:\nadm:x:4:syslog,app\nnogroup:x:65534:\napp:x:1000:\ndocker:x:999:app\n";

    #[test]
    fn users_and_their_groups() {
        let u = parse_user(PASSWD, GROUP, |f| f[0] == "app").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![1000, 4, 999]);
        assert_eq!(u.home, "/home/app");
        let n = parse_user(PASSWD, GROUP, |f| f[2] == "65534").unwrap();
        assert_eq!(n.name, "nobody");
        assert_eq!(n.groups, vec![65534]);
        assert!(parse_user(PASSWD, GROUP, |f| f[0] == "ghost").is_none());
        assert!(parse_user("bad line\n", "", |_| true).is_none());
    }
}
