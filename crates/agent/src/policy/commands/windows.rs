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

use std::os::windows::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use windows_sys::Win32::Foundation::{LocalFree, HANDLE, INVALID_HANDLE_VALUE};
use windows_sys::Win32::Security::Authorization::{
    ConvertSidToStringSidW, GetNamedSecurityInfoW, SE_FILE_OBJECT,
};
use windows_sys::Win32::Security::{
    GetAce, GetTokenInformation, TokenUser, ACCESS_ALLOWED_ACE, ACL, DACL_SECURITY_INFORMATION,
    INHERIT_ONLY_ACE, OWNER_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, PSID, TOKEN_QUERY,
    TOKEN_USER,
};
use windows_sys::Win32::Storage::FileSystem::{
    FindClose, FindFirstFileW, FILE_ATTRIBUTE_DIRECTORY, WIN32_FIND_DATAW,
};
use windows_sys::Win32::System::SystemInformation::GetSystemDirectoryW;
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

use super::Refusal;

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

fn wide(p: &Path) -> Vec<u16> {
    p.as_os_str()
        .encode_wide()
        .chain(std::iter::once(0))
        .collect()
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

/// Rights that let an account change what runs, per place.
const GENERIC_ALL: u32 = 0x1000_0000;
const GENERIC_WRITE: u32 = 0x4000_0000;
const DELETE: u32 = 0x0001_0000;
const WRITE_DAC: u32 = 0x0004_0000;
const WRITE_OWNER: u32 = 0x0008_0000;
const FILE_WRITE_DATA: u32 = 0x2; // FILE_ADD_FILE on a directory
const FILE_APPEND_DATA: u32 = 0x4;
const FILE_DELETE_CHILD: u32 = 0x40;
const ALWAYS: u32 = GENERIC_ALL | DELETE | WRITE_DAC | WRITE_OWNER;
/// The program file itself.
pub const FILE_RIGHTS: u32 = ALWAYS | GENERIC_WRITE | FILE_WRITE_DATA | FILE_APPEND_DATA;
/// The directory holding it.
pub const PARENT_RIGHTS: u32 = ALWAYS | GENERIC_WRITE | FILE_WRITE_DATA | FILE_DELETE_CHILD;
/// The directories above.
pub const ANCESTOR_RIGHTS: u32 = ALWAYS | FILE_DELETE_CHILD;
const ACCESS_ALLOWED_ACE_TYPE: u8 = 0;

/// SYSTEM, Administrators, TrustedInstaller, CREATOR OWNER (stands for the
/// owner, checked separately).
const TRUSTED: [&str; 4] = [
    "S-1-5-18",
    "S-1-5-32-544",
    "S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464",
    "S-1-3-0",
];

/// One allow entry of a DACL: who, what, and whether it applies to the
/// object itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    /// The account's SID, as a string.
    pub sid: String,
    /// The access mask.
    pub mask: u32,
    /// Inherit-only entries only apply to objects created below.
    pub inherit_only: bool,
}

/// Whether an object with this owner and these allow entries is safe where
/// `rights` are the dangerous ones; the reason when it is not.
pub fn judge(
    what: &str,
    owner: &str,
    dacl: Option<&[Allow]>,
    rights: u32,
    me: Option<&str>,
) -> Result<(), String> {
    let trusted = |sid: &str| TRUSTED.contains(&sid) || Some(sid) == me;
    if !trusted(owner) || owner == "S-1-3-0" {
        return Err(format!(
            "{what} is owned by {owner}, not SYSTEM, Administrators or TrustedInstaller"
        ));
    }
    let Some(dacl) = dacl else {
        return Err(format!("{what} has no DACL: everyone may change it"));
    };
    for a in dacl {
        if !a.inherit_only && a.mask & rights != 0 && !trusted(&a.sid) {
            return Err(format!(
                "{what} may be changed by {} (rights {:#x})",
                a.sid,
                a.mask & rights
            ));
        }
    }
    Ok(())
}

/// A SID as `S-1-...`.
///
/// # Safety
/// `sid` points to a valid SID.
unsafe fn sid_string(sid: PSID) -> Option<String> {
    let mut s: *mut u16 = std::ptr::null_mut();
    // SAFETY: `sid` is valid (caller); `s` is writable.
    if unsafe { ConvertSidToStringSidW(sid, &mut s) } == 0 {
        return None;
    }
    let mut len = 0;
    // SAFETY: on success `s` is a NUL-terminated string from LocalAlloc:
    // every unit read is at or before its NUL.
    while unsafe { *s.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` units before the NUL were just read.
    let text = String::from_utf16(unsafe { std::slice::from_raw_parts(s, len) }).ok();
    // SAFETY: `s` was allocated by the call above and is not used again.
    unsafe { LocalFree(s.cast()) };
    text
}

/// The owner and allow entries of a file or directory.
fn security(path: &Path) -> Result<(String, Option<Vec<Allow>>), String> {
    let mut owner: PSID = std::ptr::null_mut();
    let mut dacl: *mut ACL = std::ptr::null_mut();
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: a NUL-terminated path; every out pointer is writable or null.
    let code = unsafe {
        GetNamedSecurityInfoW(
            wide(path).as_ptr(),
            SE_FILE_OBJECT,
            OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
            &mut owner,
            std::ptr::null_mut(),
            &mut dacl,
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    if code != 0 {
        return Err(format!(
            "{}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(code as i32)
        ));
    }
    // SAFETY: `owner` and `dacl` point into `sd`, alive until LocalFree.
    let result = unsafe { read_security(owner, dacl) };
    // SAFETY: `sd` was allocated by GetNamedSecurityInfoW; nothing points
    // into it any more.
    unsafe { LocalFree(sd) };
    result.ok_or_else(|| format!("{}: unreadable owner or DACL", path.display()))
}

/// # Safety
/// `owner` is null or a valid SID; `dacl` is null or a valid ACL.
unsafe fn read_security(owner: PSID, dacl: *mut ACL) -> Option<(String, Option<Vec<Allow>>)> {
    if owner.is_null() {
        return None;
    }
    // SAFETY: `owner` is a valid SID (caller).
    let owner = unsafe { sid_string(owner) }?;
    if dacl.is_null() {
        return Some((owner, None));
    }
    let mut allows = Vec::new();
    // SAFETY: `dacl` is a valid ACL (caller).
    let count = unsafe { (*dacl).AceCount };
    for i in 0..u32::from(count) {
        let mut ace: *mut core::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `i` is below the ACL's entry count; `ace` is writable.
        if unsafe { GetAce(dacl, i, &mut ace) } == 0 {
            return None;
        }
        let ace = ace.cast::<ACCESS_ALLOWED_ACE>();
        // SAFETY: every ACE starts with an ACE_HEADER.
        let header = unsafe { (*ace).Header };
        if header.AceType != ACCESS_ALLOWED_ACE_TYPE {
            continue;
        }
        // SAFETY: an ACCESS_ALLOWED_ACE: mask, then the SID at SidStart.
        let (mask, sid) = unsafe { ((*ace).Mask, sid_string((&raw mut (*ace).SidStart).cast())) };
        allows.push(Allow {
            sid: sid?,
            mask,
            inherit_only: u32::from(header.AceFlags) & INHERIT_ONLY_ACE != 0,
        });
    }
    Some((owner, Some(allows)))
}

/// The agent's own user SID.
fn my_sid() -> Option<String> {
    let mut token: HANDLE = std::ptr::null_mut();
    // SAFETY: the pseudo handle of this process; `token` is writable.
    if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
        return None;
    }
    let mut buf = [0u64; 64];
    let mut len = 0u32;
    // SAFETY: `buf` is writable for its size and 8-byte aligned.
    let ok = unsafe {
        GetTokenInformation(
            token,
            TokenUser,
            buf.as_mut_ptr().cast(),
            (buf.len() * 8) as u32,
            &mut len,
        )
    };
    // SAFETY: `token` was opened above and is not used again.
    unsafe { windows_sys::Win32::Foundation::CloseHandle(token) };
    if ok == 0 {
        return None;
    }
    // SAFETY: GetTokenInformation wrote a TOKEN_USER whose SID is in `buf`.
    unsafe { sid_string((*buf.as_ptr().cast::<TOKEN_USER>()).User.Sid) }
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
        judge(
            &p.display().to_string(),
            &owner,
            dacl.as_deref(),
            rights,
            me.as_deref(),
        )
        .map_err(Refusal::Untrusted)
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

    fn allow(sid: &str, mask: u32) -> Allow {
        Allow {
            sid: sid.into(),
            mask,
            inherit_only: false,
        }
    }

    const USERS: &str = "S-1-5-32-545";
    const AUTHENTICATED: &str = "S-1-5-11";
    const ME: &str = "S-1-5-21-1-2-3-1000";
    const READ_EXECUTE: u32 = 0x1200a9;

    #[test]
    fn trust_decisions() {
        let system_dacl = [
            allow("S-1-5-18", 0x1f01ff),
            allow("S-1-5-32-544", 0x1f01ff),
            allow(USERS, READ_EXECUTE),
        ];
        let judge = |owner: &str, dacl: Option<&[Allow]>, rights: u32| {
            judge("x", owner, dacl, rights, Some(ME))
        };
        assert_eq!(judge("S-1-5-18", Some(&system_dacl), FILE_RIGHTS), Ok(()));
        assert_eq!(judge(ME, Some(&system_dacl), FILE_RIGHTS), Ok(()));
        // Owned by another user.
        assert!(judge(USERS, Some(&system_dacl), FILE_RIGHTS).is_err());
        assert!(judge("S-1-3-0", Some(&system_dacl), FILE_RIGHTS).is_err());
        // No DACL: everyone has full control.
        assert!(judge("S-1-5-18", None, FILE_RIGHTS).is_err());
        // Users may write the file, or add a DLL beside it.
        let mut writable = system_dacl.to_vec();
        writable.push(allow(USERS, 0x2));
        assert!(judge("S-1-5-18", Some(&writable), FILE_RIGHTS).is_err());
        assert!(judge("S-1-5-18", Some(&writable), PARENT_RIGHTS).is_err());
        // ...but adding entries to a directory further up is harmless (the
        // root of C:\ lets every user create folders).
        let root = [
            allow("S-1-5-18", 0x1f01ff),
            allow(AUTHENTICATED, 0x4),
            allow(USERS, READ_EXECUTE),
        ];
        assert_eq!(judge("S-1-5-18", Some(&root), ANCESTOR_RIGHTS), Ok(()));
        assert!(judge("S-1-5-18", Some(&root), PARENT_RIGHTS).is_ok());
        let mut deletable = root.to_vec();
        deletable.push(allow(AUTHENTICATED, FILE_DELETE_CHILD));
        assert!(judge("S-1-5-18", Some(&deletable), ANCESTOR_RIGHTS).is_err());
        for right in [GENERIC_ALL, DELETE, WRITE_DAC, WRITE_OWNER] {
            let d = [allow(USERS, right)];
            assert!(judge("S-1-5-18", Some(&d), ANCESTOR_RIGHTS).is_err());
        }
        // Inherit-only entries do not apply to the object itself.
        let inherited = [Allow {
            sid: "S-1-5-11".into(),
            mask: 0x1301bf,
            inherit_only: true,
        }];
        assert_eq!(judge("S-1-5-18", Some(&inherited), PARENT_RIGHTS), Ok(()));
    }

    /// Add to `path`'s DACL an entry granting Everyone `rights`.
    fn grant_everyone(path: &Path, rights: u32) {
        use windows_sys::Win32::Security::Authorization::{
            ConvertStringSidToSidW, SetEntriesInAclW, SetNamedSecurityInfoW, EXPLICIT_ACCESS_W,
            GRANT_ACCESS, TRUSTEE_IS_SID, TRUSTEE_IS_WELL_KNOWN_GROUP, TRUSTEE_W,
        };
        let mut everyone: PSID = std::ptr::null_mut();
        let sid: Vec<u16> = "S-1-1-0\0".encode_utf16().collect();
        // SAFETY: a NUL-terminated SID string; `everyone` is writable.
        assert_ne!(
            unsafe { ConvertStringSidToSidW(sid.as_ptr(), &mut everyone) },
            0
        );
        let mut old: *mut ACL = std::ptr::null_mut();
        let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
        // SAFETY: as in `security`.
        let code = unsafe {
            GetNamedSecurityInfoW(
                wide(path).as_ptr(),
                SE_FILE_OBJECT,
                DACL_SECURITY_INFORMATION,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut old,
                std::ptr::null_mut(),
                &mut sd,
            )
        };
        assert_eq!(code, 0);
        let entry = EXPLICIT_ACCESS_W {
            grfAccessPermissions: rights,
            grfAccessMode: GRANT_ACCESS,
            grfInheritance: 0,
            Trustee: TRUSTEE_W {
                TrusteeForm: TRUSTEE_IS_SID,
                TrusteeType: TRUSTEE_IS_WELL_KNOWN_GROUP,
                ptstrName: everyone.cast(),
                ..Default::default()
            },
        };
        let mut new: *mut ACL = std::ptr::null_mut();
        // SAFETY: one valid entry; `old` is the object's DACL (alive in
        // `sd`); `new` is writable.
        assert_eq!(unsafe { SetEntriesInAclW(1, &entry, old, &mut new) }, 0);
        // SAFETY: a NUL-terminated path and the ACL just made.
        let code = unsafe {
            SetNamedSecurityInfoW(
                wide(path).as_ptr(),
                SE_FILE_OBJECT,
                DACL_SECURITY_INFORMATION,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                new,
                std::ptr::null(),
            )
        };
        // SAFETY: each was allocated by the calls above, and is not used
        // again.
        unsafe {
            LocalFree(new.cast());
            LocalFree(sd);
            LocalFree(everyone);
        }
        assert_eq!(code, 0, "SetNamedSecurityInfoW");
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
