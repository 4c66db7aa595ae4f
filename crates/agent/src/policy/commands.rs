//! The exec allowlist: which program a request names, and whether an entry
//! of `[security] allowed_commands` or `[[security.commands]]` allows it
//! with these arguments.
//!
//! # How a command is identified
//!
//! A request (and an allowlist entry) names a command by absolute path or by
//! bare name. A bare name is looked up in [`SEARCH_PATH`], fixed here: never
//! the agent's `PATH`, never the request's `env`. An absolute path must be
//! plain: no `.` or `..` components, no empty ones.
//!
//! The command is then **its canonical directory plus its own file name**:
//! symlinks among the directories are resolved (on a merged-/usr system
//! `/bin/sh` and `/usr/bin/sh` are the same command), but the last component
//! is kept as named, even when it is a symlink. So:
//!
//! - `python3` -> `/usr/bin/python3` (a link to `python3.11`) is allowed by
//!   an entry `python3` or `/usr/bin/python3`, and runs `python3.11` (the
//!   kernel follows the link at exec);
//! - a link to an allowed program under another name, or in another
//!   directory, is *not* that program. Multi-call binaries (busybox,
//!   coreutils' single binary) choose what to do from the name they are
//!   run by: comparing the programs the links lead to would let `sh` in as
//!   "the same file as" an allowed `ls`.
//!
//! Before anything runs, the file the path leads to must be a regular,
//! executable file, and it and every directory above it (of the named path
//! and, for a link, of its target) must be owned by root (or by the agent's
//! own user) and not writable by group or others: nobody else can swap the
//! program that will run as root.
//!
//! The path that is checked is the path that is run, and it is resolved
//! again when the process starts, so what runs has passed this check.
//!
//! On Windows, names, the comparison (case-insensitive) and the trust check
//! (owners and DACLs instead of uid and mode) follow Windows rules: see
//! the `windows` submodule.

#[cfg(not(windows))]
use std::path::Path;
use std::path::PathBuf;

use crate::config::{glob_match, CommandRule, SecuritySection};

/// Where bare names are looked up, in order.
pub const SEARCH_PATH: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// [`SEARCH_PATH`] as a `PATH` value, given to every command.
pub const SEARCH_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the allowlist granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The path to run: canonical directory plus the name as given.
    pub path: PathBuf,
    /// Run as this user instead of the agent's.
    pub run_as: Option<String>,
    /// The entry that allowed it (`security.allowed_commands[2]`,
    /// `security.commands[0]`).
    pub entry: String,
}

/// Why a command is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a usable name (relative path with `/`, `..`, empty, NUL).
    BadName(String),
    /// Named by the allowlist, but not on this system.
    NotFound,
    /// No entry names this command.
    NotListed,
    /// Entries name the command, but none allows these arguments.
    Arguments,
    /// The file or a directory above it could be changed by someone else.
    Untrusted(String),
    /// The environment sets a variable `security.exec_env` does not allow.
    Env(String),
}

impl Refusal {
    /// The reason sent to the host.
    pub fn reason(&self) -> String {
        match self {
            Self::BadName(r) | Self::Untrusted(r) => r.clone(),
            Self::NotFound => "not found in the search path or not a file".into(),
            Self::NotListed => "not in the allowlist".into(),
            Self::Arguments => "the allowlist does not allow these arguments".into(),
            Self::Env(name) => {
                format!("environment variable {name:?} is not allowed by security.exec_env")
            }
        }
    }

    /// The configuration key that decided.
    pub fn config_key(&self) -> &'static str {
        match self {
            Self::Arguments => "security.commands",
            Self::Env(_) => "security.exec_env",
            _ => "security.allowed_commands",
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    args: Option<Vec<Vec<String>>>,
    run_as: Option<String>,
    key: String,
}

/// The allowlist in force.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    entries: Vec<Entry>,
    env: Vec<String>,
}

impl Allowlist {
    /// The allowlist of a `[security]` section.
    pub fn from_config(sec: &SecuritySection) -> Self {
        let plain = sec.allowed_commands.iter().enumerate().map(|(i, c)| Entry {
            name: c.clone(),
            args: None,
            run_as: None,
            key: format!("security.allowed_commands[{i}]"),
        });
        let rules =
            sec.commands
                .iter()
                .enumerate()
                .map(|(i, CommandRule { path, args, run_as })| Entry {
                    name: path.clone(),
                    args: args.clone(),
                    run_as: run_as.clone(),
                    key: format!("security.commands[{i}]"),
                });
        Self {
            entries: plain.chain(rules).collect(),
            env: sec.exec_env.clone(),
        }
    }

    /// Whether `command` with `args` and `env` may run, and how.
    pub fn check<'a>(
        &self,
        command: &str,
        args: &[String],
        env: impl IntoIterator<Item = &'a String>,
    ) -> Result<Grant, Refusal> {
        for name in env {
            if !self.env.iter().any(|p| glob_match(p, name)) {
                return Err(Refusal::Env(name.clone()));
            }
        }
        let path = match locate(command) {
            Ok(p) => p,
            // Say "not found" only for names the allowlist itself uses:
            // the host learns nothing about other programs.
            Err(Refusal::NotFound) if self.entries.iter().any(|e| e.name == command) => {
                return Err(Refusal::NotFound)
            }
            Err(Refusal::NotFound) => return Err(Refusal::NotListed),
            Err(e) => return Err(e),
        };
        let mut named = false;
        for entry in &self.entries {
            if locate(&entry.name).ok().as_ref() != Some(&path) {
                continue;
            }
            named = true;
            if entry
                .args
                .as_ref()
                .is_none_or(|p| p.iter().any(|p| args_match(p, args)))
            {
                check_trusted(&path)?;
                return Ok(Grant {
                    path,
                    run_as: entry.run_as.clone(),
                    entry: entry.key.clone(),
                });
            }
        }
        Err(if named {
            Refusal::Arguments
        } else {
            Refusal::NotListed
        })
    }
}

/// Whether `args` fit one argument pattern list.
pub fn args_match(patterns: &[String], args: &[String]) -> bool {
    let (fixed, rest) = match patterns.split_last() {
        Some((last, fixed)) if last == "**" => (fixed, true),
        _ => (patterns, false),
    };
    if args.len() < fixed.len() || (!rest && args.len() != fixed.len()) {
        return false;
    }
    fixed.iter().zip(args).all(|(p, a)| glob_match(p, a))
}

#[cfg(windows)]
pub mod windows;
#[cfg(windows)]
pub use windows::{check_trusted, locate};

/// The path a command name stands for: canonical directory plus the name.
#[cfg(not(windows))]
pub fn locate(command: &str) -> Result<PathBuf, Refusal> {
    if command.is_empty() || command.contains('\0') {
        return Err(Refusal::BadName("not a command name".into()));
    }
    let named = if command.starts_with('/') {
        let plain = command
            .split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..");
        if !plain {
            return Err(Refusal::BadName(
                "an absolute path must be plain: no \".\", \"..\" or empty components".into(),
            ));
        }
        PathBuf::from(command)
    } else if command.contains('/') || command == "." || command == ".." {
        return Err(Refusal::BadName(
            "neither an absolute path nor a bare name".into(),
        ));
    } else {
        SEARCH_PATH
            .iter()
            .map(|d| Path::new(d).join(command))
            .find(|p| p.metadata().is_ok_and(|m| m.is_file()))
            .ok_or(Refusal::NotFound)?
    };
    let (Some(dir), Some(name)) = (named.parent(), named.file_name()) else {
        return Err(Refusal::BadName("not a file path".into()));
    };
    let dir = std::fs::canonicalize(dir).map_err(|_| Refusal::NotFound)?;
    let path = dir.join(name);
    if !path.metadata().is_ok_and(|m| m.is_file()) {
        return Err(Refusal::NotFound);
    }
    Ok(path)
}

/// The file `path` leads to is a regular executable file, and it and every
/// directory above it (of `path` and of the file it leads to) can be
/// changed by root (or the agent's user) alone.
#[cfg(unix)]
pub fn check_trusted(path: &Path) -> Result<(), Refusal> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let ok = |p: &Path| -> Result<std::fs::Metadata, Refusal> {
        let m = p
            .metadata()
            .map_err(|e| Refusal::Untrusted(format!("{}: {e}", p.display())))?;
        if m.uid() != 0 && m.uid() != me {
            return Err(Refusal::Untrusted(format!(
                "{} is owned by uid {}, not root",
                p.display(),
                m.uid()
            )));
        }
        if m.mode() & 0o022 != 0 {
            return Err(Refusal::Untrusted(format!(
                "{} is writable by group or others (mode {:o})",
                p.display(),
                m.mode() & 0o7777
            )));
        }
        Ok(m)
    };
    let target = std::fs::canonicalize(path)
        .map_err(|e| Refusal::Untrusted(format!("{}: {e}", path.display())))?;
    for p in [path, target.as_path()] {
        for dir in p.ancestors().skip(1) {
            ok(dir)?;
        }
    }
    let m = ok(&target)?;
    if !m.is_file() || m.mode() & 0o111 == 0 {
        return Err(Refusal::Untrusted(format!(
            "{} is not an executable file",
            target.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn list(text: &str) -> Allowlist {
        let c = crate::config::Config::parse(text, Path::new("t.toml")).unwrap();
        Allowlist::from_config(&c.security)
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[cfg(unix)]
    const NO_ENV: [&String; 0] = [];

    #[test]
    fn argument_patterns() {
        assert!(args_match(&s(&["status", "*"]), &s(&["status", "ssh"])));
        assert!(!args_match(&s(&["status", "*"]), &s(&["status"])));
        assert!(!args_match(&s(&["status", "*"]), &s(&["status", "a", "b"])));
        assert!(!args_match(&s(&["status", "*"]), &s(&["stop", "ssh"])));
        assert!(args_match(&s(&["-sh", "/var/*"]), &s(&["-sh", "/var/log"])));
        assert!(!args_match(&s(&["-sh", "/var/*"]), &s(&["-sh", "/etc"])));
        assert!(args_match(&s(&["list", "**"]), &s(&["list"])));
        assert!(args_match(&s(&["list", "**"]), &s(&["list", "-a", "b"])));
        assert!(!args_match(&s(&["list", "**"]), &s(&[])));
        assert!(args_match(&s(&[]), &s(&[])));
        assert!(!args_match(&s(&[]), &s(&["x"])));
    }

    // The allowlist resolves names in a Unix search path.
    #[cfg(unix)]
    #[test]
    fn names_resolve_through_the_fixed_search_path_only() {
        let p = locate("sh").unwrap();
        assert!(SEARCH_PATH
            .iter()
            .any(|d| std::fs::canonicalize(d).unwrap() == p.parent().unwrap()));
        assert_eq!(locate("no-such-command-kva"), Err(Refusal::NotFound));
        assert!(matches!(locate("../bin/sh"), Err(Refusal::BadName(_))));
        assert!(matches!(locate("bin/sh"), Err(Refusal::BadName(_))));
        assert!(matches!(
            locate("/usr/bin/../bin/sh"),
            Err(Refusal::BadName(_))
        ));
        assert!(matches!(locate("/usr/bin//sh"), Err(Refusal::BadName(_))));
        assert!(matches!(locate("/usr/bin/./sh"), Err(Refusal::BadName(_))));
        assert!(matches!(locate(""), Err(Refusal::BadName(_))));
        // /bin/sh and the bare name are the same command.
        assert_eq!(locate("/bin/sh").unwrap(), locate("sh").unwrap());
    }

    // The allowlist resolves names in a Unix search path.
    #[cfg(unix)]
    #[test]
    fn entries_and_refusals() {
        let a = list(
            "[security]\nallowed_commands = [\"sh\"]\n\
             [[security.commands]]\npath = \"/bin/echo\"\nargs = [[\"hello\", \"*\"]]\nrun_as = \"nobody\"\n",
        );
        let g = a.check("/bin/sh", &s(&["-c", "true"]), NO_ENV).unwrap();
        assert_eq!(g.entry, "security.allowed_commands[0]");
        assert_eq!(g.run_as, None);
        let g = a.check("echo", &s(&["hello", "world"]), NO_ENV).unwrap();
        assert_eq!(g.entry, "security.commands[0]");
        assert_eq!(g.run_as.as_deref(), Some("nobody"));
        assert_eq!(
            a.check("echo", &s(&["bye"]), NO_ENV),
            Err(Refusal::Arguments)
        );
        assert_eq!(a.check("cat", &[], NO_ENV), Err(Refusal::NotListed));
        assert_eq!(
            a.check("no-such-command-kva", &[], NO_ENV),
            Err(Refusal::NotListed)
        );
        let path = "PATH".to_string();
        assert_eq!(
            a.check("sh", &[], [&path]),
            Err(Refusal::Env("PATH".into()))
        );
        let lang = "LC_ALL".to_string();
        assert!(a.check("sh", &[], [&lang]).is_ok());
        let missing = list("[security]\nallowed_commands = [\"no-such-command-kva\"]\n");
        assert_eq!(
            missing.check("no-such-command-kva", &[], NO_ENV),
            Err(Refusal::NotFound)
        );
    }

    // The allowlist resolves names in a Unix search path.
    #[cfg(unix)]
    #[test]
    fn a_symlink_to_an_allowed_program_is_not_that_program() {
        let dir = std::env::temp_dir().join(format!("kva-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("true-link");
        std::os::unix::fs::symlink(locate("true").unwrap(), &link).unwrap();
        let a = list("[security]\nallowed_commands = [\"true\"]\n");
        assert_eq!(
            a.check(link.to_str().unwrap(), &[], NO_ENV),
            Err(Refusal::NotListed)
        );
        // Listed by its own path, it is still refused: /tmp is writable by all.
        let a = list(&format!(
            "[security]\nallowed_commands = [{:?}]\n",
            link.to_str().unwrap()
        ));
        assert!(matches!(
            a.check(link.to_str().unwrap(), &[], NO_ENV),
            Err(Refusal::Untrusted(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
