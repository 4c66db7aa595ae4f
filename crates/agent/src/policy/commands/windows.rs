//! The allowlist's names and trust checks on Windows.
//!
//! # Names
//! - An absolute path is `X:\dir\...\name.exe`: a drive letter, `\` as the
//!   only separator, no `.`, `..` or empty components. UNC paths
//!   (`\\server\share`), device and verbatim prefixes (`\\.\`, `\\?\`),
//!   drive-relative (`C:x`) and rooted (`\x`) paths, `/`, alternate data
//!   streams (`name:stream`), wildcards, components ending in `.` or space
//!   (Windows drops those: `a.exe.` would be another spelling of `a.exe`)
//!   and reserved device names (`CON`, `NUL`, `COM1`...) are refused.
//! - A bare name is looked up in the system directory
//!   (GetSystemDirectoryW, `C:\Windows\System32`) only.
//! - The program must be an `.exe` named with its extension: there is no
//!   PATHEXT guessing, and `.bat`/`.cmd` are refused because CreateProcess
//!   runs them through cmd.exe (a shell).
//! - The command is its canonical directory (junctions, symlinks and 8.3
//!   short names resolved, case as stored) plus its file name as stored on
//!   disk (FindFirstFileW: case and 8.3 short name resolved, a symlink kept
//!   as itself). So `c:\windows\system32\WHOAMI.EXE` and
//!   `C:\Windows\System32\whoami.exe` are the same command: Windows
//!   compares names case-insensitively, and so does the allowlist.
//!
//! # Trust
//! The file, its directory and every directory above (of the named path and
//! of the file it leads to) must be owned by SYSTEM, Administrators,
//! TrustedInstaller or the agent's own user, and no other account may be
//! granted, by an allow entry of its DACL that applies to the object itself:
//! - on the file: write, append, delete, change of permissions or owner;
//! - on its directory: adding a file (a DLL placed beside a program is
//!   loaded first), deleting children, delete, permissions, owner;
//! - on the directories above: deleting children, delete, permissions,
//!   owner (so none can be renamed away and replaced). Adding entries is
//!   allowed there: every user may create folders at the root of `C:\`.

use std::path::{Path, PathBuf};

use windows_sys::Win32::Foundation::{HANDLE, INVALID_HANDLE_VALUE};
use windows_sys::Win32::Storage::FileSystem::{
    FindClose, FindFirstFileW, FILE_ATTRIBUTE_DIRECTORY, WIN32_FIND_DATAW,
};
use windows_sys::Win32::System::SystemInformation::GetSystemDirectoryW;

use super::Refusal;
use crate::platform::acl::{
    judge, my_sid, security, wide, ANCESTOR_RIGHTS, FILE_RIGHTS, PARENT_RIGHTS,
};

/// Reserved device names: a file "named" so is a device.
const RESERVED: [&str; 22] = [
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// How a request names a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name<'a> {
    /// `X:\...\name.exe`, checked.
    Absolute(&'a str),
    /// `name.exe`, to look up in the system directory.
    Bare(&'a str),
}

fn bad(reason: &str) -> Refusal {
    Refusal::BadName(reason.to_owned())
}

/// One path component: not empty, `.` or `..`, no stream, wildcard or
/// separator, no trailing dot or space, not a device.
fn component_ok(c: &str) -> Result<(), Refusal> {
    if c.is_empty() || c == "." || c == ".." {
        return Err(bad(
            "an absolute path must be plain: no \".\", \"..\" or empty components",
        ));
    }
    if c.chars()
        .any(|ch| matches!(ch, ':' | '/' | '*' | '?' | '"' | '<' | '>' | '|') || ch < ' ')
    {
        return Err(bad(
            "a path component cannot hold a stream (\":\"), \"/\", wildcards or control characters",
        ));
    }
    if c.ends_with('.') || c.ends_with(' ') {
        return Err(bad("a path component cannot end with \".\" or a space"));
    }
    let stem = c.split('.').next().unwrap_or(c).trim_end();
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(stem)) {
        return Err(bad("reserved device names (CON, NUL, COM1...) are refused"));
    }
    Ok(())
}

/// Check a command name lexically (nothing is read from disk).
pub fn parse(command: &str) -> Result<Name<'_>, Refusal> {
    if command.is_empty() || command.contains('\0') {
        return Err(bad("not a command name"));
    }
    let b = command.as_bytes();
    let name = if b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && b[2] == b'\\' {
        for c in command[3..].split('\\') {
            component_ok(c)?;
        }
        Name::Absolute(command)
    } else if command.contains(['\\', '/', ':']) || command == "." || command == ".." {
        return Err(bad(
            "neither an absolute path (X:\\...) nor a bare name (UNC, \\\\?\\ and relative paths are refused)",
        ));
    } else {
        component_ok(command)?;
        Name::Bare(command)
    };
    let file = command.rsplit('\\').next().unwrap_or(command);
    let ext = file.rsplit_once('.').map(|(_, e)| e);
    if !ext.is_some_and(|e| e.eq_ignore_ascii_case("exe")) {
        return Err(bad(
            "only .exe programs, named with their extension (.bat and .cmd would run cmd.exe)",
        ));
    }
    Ok(name)
}

/// The system directory (`C:\Windows\System32`).
pub fn system_directory() -> Option<PathBuf> {
    let mut buf = [0u16; 512];
    // SAFETY: `buf` is writable for the length given.
    let n = unsafe { GetSystemDirectoryW(buf.as_mut_ptr(), buf.len() as u32) } as usize;
    (n > 0 && n < buf.len()).then(|| PathBuf::from(String::from_utf16_lossy(&buf[..n])))
}

/// `\\?\C:\x` as `C:\x` (the verbatim prefix canonicalize adds).
fn plain(p: PathBuf) -> PathBuf {
    match p.to_str().and_then(|s| s.strip_prefix(r"\\?\")) {
        Some(rest) if rest.as_bytes().get(1) == Some(&b':') => PathBuf::from(rest),
        _ => p,
    }
}

/// The name of `path`'s last component as stored, and whether it is a
/// directory; None when it does not exist.
fn stored_name(path: &Path) -> Option<(String, bool)> {
    let mut data = WIN32_FIND_DATAW::default();
    // SAFETY: a NUL-terminated path without wildcards (refused by `parse`);
    // `data` is writable.
    let h: HANDLE = unsafe { FindFirstFileW(wide(path).as_ptr(), &mut data) };
    if h == INVALID_HANDLE_VALUE {
        return None;
    }
    // SAFETY: `h` is the open search handle just returned.
    unsafe { FindClose(h) };
    let end = data.cFileName.iter().position(|c| *c == 0).unwrap_or(260);
    let name = String::from_utf16_lossy(&data.cFileName[..end]);
    Some((name, data.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY != 0))
}

/// The path a command name stands for: canonical directory plus the name
/// as stored.
pub fn locate(command: &str) -> Result<PathBuf, Refusal> {
    let named = match parse(command)? {
        Name::Absolute(p) => PathBuf::from(p),
        Name::Bare(n) => system_directory().ok_or(Refusal::NotFound)?.join(n),
    };
    let (Some(dir), Some(_)) = (named.parent(), named.file_name()) else {
        return Err(bad("not a file path"));
    };
    let dir = plain(std::fs::canonicalize(dir).map_err(|_| Refusal::NotFound)?);
    let (name, is_dir) = stored_name(&named).ok_or(Refusal::NotFound)?;
    if is_dir {
        return Err(Refusal::NotFound);
    }
    let path = dir.join(name);
    if !path.metadata().is_ok_and(|m| m.is_file()) {
        return Err(Refusal::NotFound);
    }
    Ok(path)
}

/// The file `path` leads to, its directory and the directories above (of
/// `path` and of that file) can be changed by trusted accounts alone.
pub fn check_trusted(path: &Path) -> Result<(), Refusal> {
    let me = my_sid();
    let target = plain(
        std::fs::canonicalize(path)
            .map_err(|e| Refusal::Untrusted(format!("{}: {e}", path.display())))?,
    );
    let check = |p: &Path, rights: u32| -> Result<(), Refusal> {
        let (owner, dacl) = security(p).map_err(Refusal::Untrusted)?;
        judge(&owner, dacl.as_deref(), rights, "changed", me.as_deref())
            .map_err(|why| Refusal::Untrusted(format!("{} {why}", p.display())))
    };
    for p in [path, target.as_path()] {
        check(p, FILE_RIGHTS)?;
        for (i, dir) in p.ancestors().skip(1).enumerate() {
            if dir.as_os_str().is_empty() {
                continue;
            }
            check(
                dir,
                if i == 0 {
                    PARENT_RIGHTS
                } else {
                    ANCESTOR_RIGHTS
                },
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::acl::test_support::grant_everyone;
    use crate::platform::acl::{FILE_WRITE_DATA, TRUSTED};

    #[test]
    fn the_windows_path_table() {
        let ok = [
            (r"C:\Windows\System32\whoami.exe", true),
            (r"c:\windows\system32\WHOAMI.EXE", true),
            (r"D:\Program Files\App\app.exe", true),
            ("whoami.exe", false),
            ("WhoAmI.Exe", false),
        ];
        for (name, absolute) in ok {
            let parsed = parse(name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(matches!(parsed, Name::Absolute(_)), absolute, "{name}");
        }
        let refused = [
            "",
            "whoami",
            r"C:\Windows\System32\whoami",
            r"C:\Windows\System32\script.bat",
            r"C:\Windows\System32\script.CMD",
            r"C:\Windows\System32\..\System32\whoami.exe",
            r"C:\Windows\.\System32\whoami.exe",
            r"C:\Windows\\System32\whoami.exe",
            r"C:\Windows\System32\",
            r"C:/Windows/System32/whoami.exe",
            r"C:\Windows/System32\whoami.exe",
            r"C:Windows\whoami.exe",
            r"\Windows\System32\whoami.exe",
            r"\\server\share\whoami.exe",
            r"\\?\C:\Windows\System32\whoami.exe",
            r"\\.\C:\Windows\System32\whoami.exe",
            r"\??\C:\Windows\System32\whoami.exe",
            r"C:\Windows\System32\whoami.exe:stream",
            r"C:\Windows\System32\whoami.exe::$DATA",
            r"C:\Windows\System32\whoami.exe.",
            r"C:\Windows\System32\whoami.exe ",
            r"C:\Windows. \System32\whoami.exe",
            r"C:\Windows\System32\who*.exe",
            r"C:\Windows\System32\who?mi.exe",
            r"C:\Windows\System32\NUL.exe",
            r"C:\Windows\System32\con.exe",
            r"C:\Windows\COM1\whoami.exe",
            r"C:\Windows\lpt9.txt\whoami.exe",
            "nul.exe",
            "..",
            ".",
            r"System32\whoami.exe",
            "whoami.exe\0",
        ];
        for name in refused {
            assert!(
                matches!(parse(name), Err(Refusal::BadName(_))),
                "{name:?} was not refused"
            );
        }
    }

    #[test]
    fn names_resolve_case_insensitively_to_the_stored_name() {
        let sys = system_directory().unwrap();
        let canonical = locate(r"C:\Windows\System32\whoami.exe").unwrap();
        assert_eq!(canonical.file_name().unwrap(), "whoami.exe");
        assert!(canonical.starts_with(plain(std::fs::canonicalize(&sys).unwrap())));
        assert!(!canonical.to_string_lossy().starts_with(r"\\?\"));
        for other in [
            r"c:\windows\system32\WHOAMI.EXE",
            r"C:\WINDOWS\SYSTEM32\WhoAmI.exe",
            "whoami.exe",
            "WHOAMI.EXE",
        ] {
            assert_eq!(locate(other).unwrap(), canonical, "{other}");
        }
        assert_eq!(locate("no-such-program.exe"), Err(Refusal::NotFound));
        assert_eq!(
            locate(r"C:\Windows\System32\no-such-program.exe"),
            Err(Refusal::NotFound)
        );
        // A directory is not a program, even named like one.
        let dir = std::env::temp_dir().join("kva-dir.exe");
        std::fs::create_dir_all(&dir).unwrap();
        let named = plain(std::fs::canonicalize(&dir).unwrap());
        assert_eq!(
            locate(named.to_str().unwrap()),
            Err(Refusal::NotFound),
            "{named:?}"
        );
        std::fs::remove_dir(&dir).unwrap();
    }

    /// A program, then its directory, made changeable by Everyone.
    #[test]
    fn programs_others_may_change_are_refused() {
        let dir = std::env::temp_dir().join(format!("kva-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dir = plain(std::fs::canonicalize(&dir).unwrap());
        let prog = dir.join("prog.exe");
        std::fs::copy(locate("whoami.exe").unwrap(), &prog).unwrap();
        assert_eq!(check_trusted(&prog), Ok(()));
        grant_everyone(&prog, FILE_WRITE_DATA);
        let e = check_trusted(&prog).unwrap_err();
        assert!(
            matches!(&e, Refusal::Untrusted(r) if r.contains("S-1-1-0") && r.contains("prog.exe")),
            "{e:?}"
        );
        let other = dir.join("other.exe");
        std::fs::copy(locate("whoami.exe").unwrap(), &other).unwrap();
        assert_eq!(check_trusted(&other), Ok(()));
        // Adding files to the directory: a DLL beside the program.
        grant_everyone(&dir, FILE_WRITE_DATA);
        let e = check_trusted(&other).unwrap_err();
        assert!(
            matches!(&e, Refusal::Untrusted(r) if r.contains("S-1-1-0") && !r.contains("other.exe")),
            "{e:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Under Wine the system files are owned by the prefix's user (the
    /// agent's own here) and only it and SYSTEM may write them: trusted.
    #[test]
    fn system_programs_are_trusted() {
        let path = locate("whoami.exe").unwrap();
        let me = my_sid().unwrap();
        assert!(me.starts_with("S-1-5-"), "{me}");
        let (owner, dacl) = security(&path).unwrap();
        assert!(owner == me || TRUSTED.contains(&owner.as_str()), "{owner}");
        assert!(!dacl.unwrap().is_empty());
        assert_eq!(check_trusted(&path), Ok(()));
        assert!(matches!(
            check_trusted(&path.with_file_name("no-such-program.exe")),
            Err(Refusal::Untrusted(_))
        ));
    }
}
