//! Owners and DACLs of files: who besides the administrators may read or
//! change a file. The allowlist's trust checks (`policy/commands/windows.rs`)
//! and [`check_guarded`] (the configuration and key files) judge them here.
//!
//! Trusted accounts: SYSTEM, Administrators, TrustedInstaller, and the
//! agent's own account (for development). Only allow entries that apply to
//! the object itself count; deny entries are not needed to refuse.

use std::os::windows::ffi::OsStrExt;
use std::path::Path;

use windows_sys::Win32::Foundation::{LocalFree, HANDLE, INVALID_HANDLE_VALUE};
use windows_sys::Win32::Security::Authorization::{
    ConvertSidToStringSidW, ConvertStringSidToSidW, GetNamedSecurityInfoW, SetEntriesInAclW,
    ACCESS_MODE, EXPLICIT_ACCESS_W, SET_ACCESS, SE_FILE_OBJECT, TRUSTEE_IS_SID, TRUSTEE_IS_USER,
    TRUSTEE_TYPE, TRUSTEE_W,
};
use windows_sys::Win32::Security::{
    GetAce, GetTokenInformation, InitializeSecurityDescriptor, SetSecurityDescriptorControl,
    SetSecurityDescriptorDacl, TokenUser, ACCESS_ALLOWED_ACE, ACL, DACL_SECURITY_INFORMATION,
    INHERIT_ONLY_ACE, OWNER_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, PSID, SECURITY_ATTRIBUTES,
    SECURITY_DESCRIPTOR, SE_DACL_PROTECTED, TOKEN_QUERY, TOKEN_USER,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, CREATE_NEW, FILE_ALL_ACCESS, FILE_ATTRIBUTE_NORMAL, FILE_GENERIC_WRITE,
};
use windows_sys::Win32::System::SystemServices::SECURITY_DESCRIPTOR_REVISION;
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

use crate::platform::{Guard, GuardError};

/// A path as a NUL-terminated wide string.
pub fn wide(p: &Path) -> Vec<u16> {
    p.as_os_str()
        .encode_wide()
        .chain(std::iter::once(0))
        .collect()
}

/// Rights that let an account change a file or what runs from it.
pub const GENERIC_ALL: u32 = 0x1000_0000;
const GENERIC_WRITE: u32 = 0x4000_0000;
pub const DELETE: u32 = 0x0001_0000;
pub const WRITE_DAC: u32 = 0x0004_0000;
pub const WRITE_OWNER: u32 = 0x0008_0000;
pub const FILE_WRITE_DATA: u32 = 0x2; // FILE_ADD_FILE on a directory
const FILE_APPEND_DATA: u32 = 0x4;
pub const FILE_DELETE_CHILD: u32 = 0x40;
const ALWAYS: u32 = GENERIC_ALL | DELETE | WRITE_DAC | WRITE_OWNER;
/// A file: a program, or the configuration.
pub const FILE_RIGHTS: u32 = ALWAYS | GENERIC_WRITE | FILE_WRITE_DATA | FILE_APPEND_DATA;
/// The directory holding a program.
pub const PARENT_RIGHTS: u32 = ALWAYS | GENERIC_WRITE | FILE_WRITE_DATA | FILE_DELETE_CHILD;
/// The directories above.
pub const ANCESTOR_RIGHTS: u32 = ALWAYS | FILE_DELETE_CHILD;
const ACCESS_ALLOWED_ACE_TYPE: u8 = 0;

/// SYSTEM, Administrators, TrustedInstaller, CREATOR OWNER (stands for the
/// owner, checked separately).
pub const TRUSTED: [&str; 4] = [
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
/// `rights` are the dangerous ones; when it is not, why, as a phrase that
/// follows the object's name ("is owned by ...", "may be changed by ...";
/// `done` says what the rights allow: "changed", "read or changed").
pub fn judge(
    owner: &str,
    dacl: Option<&[Allow]>,
    rights: u32,
    done: &str,
    me: Option<&str>,
) -> Result<(), String> {
    let trusted = |sid: &str| TRUSTED.contains(&sid) || Some(sid) == me;
    if !trusted(owner) || owner == "S-1-3-0" {
        return Err(format!(
            "is owned by {owner}, not SYSTEM, Administrators or TrustedInstaller"
        ));
    }
    let Some(dacl) = dacl else {
        return Err("has no DACL: everyone has every right to it".into());
    };
    for a in dacl {
        if !a.inherit_only && a.mask & rights != 0 && !trusted(&a.sid) {
            return Err(format!(
                "may be {done} by {} (rights {:#x})",
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
pub fn security(path: &Path) -> Result<(String, Option<Vec<Allow>>), String> {
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
pub fn my_sid() -> Option<String> {
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

/// Rights that let an account read a file's contents.
const GENERIC_READ: u32 = 0x8000_0000;
const FILE_READ_DATA: u32 = 0x1;
/// A secret file: reading it, or any right that lets one change it.
pub const SECRET_RIGHTS: u32 = FILE_RIGHTS | GENERIC_READ | FILE_READ_DATA;

/// Whether `path` is safe from other accounts as `guard` says: owned by a
/// trusted account, and no other account granted the rights to change it
/// (or, for a secret, to read it).
pub fn check_guarded(path: &Path, guard: Guard) -> Result<(), GuardError> {
    let meta = std::fs::metadata(path).map_err(GuardError::Read)?;
    if guard == Guard::ReadOrChange && !meta.is_file() {
        return Err(GuardError::Insecure("is not a regular file".into()));
    }
    let (owner, dacl) = security(path).map_err(|e| {
        GuardError::Read(std::io::Error::other(format!(
            "cannot read its owner and DACL: {e}"
        )))
    })?;
    let (rights, done) = match guard {
        Guard::Change => (FILE_RIGHTS, "changed"),
        Guard::ReadOrChange => (SECRET_RIGHTS, "read or changed"),
    };
    judge(&owner, dacl.as_deref(), rights, done, my_sid().as_deref()).map_err(GuardError::Insecure)
}

/// What to require of `path`, and the command that makes it so.
pub fn guard_remedy(guard: Guard, path: &Path) -> String {
    let p = path.display();
    match guard {
        Guard::Change => format!(
            "it must be owned by SYSTEM or Administrators, and only they may change it \
             (icacls \"{p}\" /setowner Administrators; icacls \"{p}\" /inheritance:r \
             /grant:r SYSTEM:F Administrators:F Users:R)"
        ),
        Guard::ReadOrChange => format!(
            "it must be owned by SYSTEM or Administrators, and only they may read or change it \
             (icacls \"{p}\" /setowner Administrators; icacls \"{p}\" /inheritance:r \
             /grant:r SYSTEM:F Administrators:F)"
        ),
    }
}

/// An entry for SetEntriesInAclW: `rights` for the account `sid`, on the
/// object only (no inheritance).
fn explicit_access(
    sid: PSID,
    rights: u32,
    mode: ACCESS_MODE,
    kind: TRUSTEE_TYPE,
) -> EXPLICIT_ACCESS_W {
    EXPLICIT_ACCESS_W {
        grfAccessPermissions: rights,
        grfAccessMode: mode,
        grfInheritance: 0,
        Trustee: TRUSTEE_W {
            TrusteeForm: TRUSTEE_IS_SID,
            TrusteeType: kind,
            ptstrName: sid.cast(),
            ..Default::default()
        },
    }
}

/// Create the new file `path` with `contents` and a DACL, protected from
/// inheritance, that grants the agent's own account, and nobody else, full
/// control: a file [`check_guarded`] accepts as a secret. (The DACL is given
/// at creation: Wine turns it into the file's unix mode then, but ignores a
/// DACL set later that takes rights away.)
pub fn create_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::windows::io::FromRawHandle;

    let fail = |call: &str| std::io::Error::other(format!("{call} failed"));
    let me = my_sid().ok_or_else(|| fail("GetTokenInformation(TokenUser)"))?;
    let text: Vec<u16> = me.encode_utf16().chain(std::iter::once(0)).collect();
    let mut sid: PSID = std::ptr::null_mut();
    // SAFETY: a NUL-terminated SID string; `sid` is writable.
    if unsafe { ConvertStringSidToSidW(text.as_ptr(), &mut sid) } == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let entry = explicit_access(sid, FILE_ALL_ACCESS, SET_ACCESS, TRUSTEE_IS_USER);
    let mut acl: *mut ACL = std::ptr::null_mut();
    // SAFETY: one valid entry (its SID alive until freed below), no old
    // ACL; `acl` is writable.
    let code = unsafe { SetEntriesInAclW(1, &entry, std::ptr::null(), &mut acl) };
    // SAFETY: allocated by ConvertStringSidToSidW; the ACL holds a copy.
    unsafe { LocalFree(sid) };
    if code != 0 {
        return Err(std::io::Error::from_raw_os_error(code as i32));
    }
    // SAFETY: all zeroes is a valid bit pattern for this plain struct;
    // InitializeSecurityDescriptor fills it in.
    let mut sd: SECURITY_DESCRIPTOR = unsafe { std::mem::zeroed() };
    let psd: PSECURITY_DESCRIPTOR = (&raw mut sd).cast();
    // SAFETY: `psd` points to a writable descriptor that lives until the
    // end of this function; `acl` is valid until freed below.
    let described = unsafe {
        InitializeSecurityDescriptor(psd, SECURITY_DESCRIPTOR_REVISION) != 0
            && SetSecurityDescriptorDacl(psd, 1, acl, 0) != 0
            && SetSecurityDescriptorControl(psd, SE_DACL_PROTECTED, SE_DACL_PROTECTED) != 0
    };
    let created = described.then(|| {
        let sa = SECURITY_ATTRIBUTES {
            nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: psd,
            bInheritHandle: 0,
        };
        // SAFETY: a NUL-terminated path and valid attributes.
        unsafe {
            CreateFileW(
                wide(path).as_ptr(),
                FILE_GENERIC_WRITE,
                0,
                &sa,
                CREATE_NEW,
                FILE_ATTRIBUTE_NORMAL,
                std::ptr::null_mut(),
            )
        }
    });
    let error = std::io::Error::last_os_error();
    // SAFETY: allocated by SetEntriesInAclW; the file, if created, has its
    // own copy of the descriptor.
    unsafe { LocalFree(acl.cast()) };
    match created {
        Some(h) if h != INVALID_HANDLE_VALUE => {
            // SAFETY: a fresh handle we own, closed by the File.
            let mut file = unsafe { std::fs::File::from_raw_handle(h) };
            file.write_all(contents)?;
            file.sync_all()
        }
        _ => Err(error),
    }
}

#[cfg(test)]
pub mod test_support {
    //! Changing DACLs in tests.

    use super::*;
    use windows_sys::Win32::Security::Authorization::{
        SetNamedSecurityInfoW, GRANT_ACCESS, TRUSTEE_IS_WELL_KNOWN_GROUP,
    };

    /// Add to `path`'s DACL an entry granting Everyone `rights`.
    pub fn grant_everyone(path: &Path, rights: u32) {
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
        let entry = explicit_access(everyone, rights, GRANT_ACCESS, TRUSTEE_IS_WELL_KNOWN_GROUP);
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
}

#[cfg(test)]
mod tests {
    use super::test_support::grant_everyone;
    use super::*;

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
            judge(owner, dacl, rights, "changed", Some(ME))
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

    /// A key file the test's account alone may touch, then one Everyone
    /// may read, then one Everyone may write.
    #[test]
    fn secrets_others_may_read_are_refused() {
        let dir = std::env::temp_dir().join(format!("kva-guard-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("hmac.key");
        create_private(&key, b"00").unwrap();
        assert!(create_private(&key, b"00").is_err(), "only a new file");
        check_guarded(&key, Guard::ReadOrChange).unwrap();
        check_guarded(&key, Guard::Change).unwrap();
        grant_everyone(&key, FILE_READ_DATA);
        let e = check_guarded(&key, Guard::ReadOrChange).unwrap_err();
        assert!(
            matches!(&e, GuardError::Insecure(p) if p.contains("S-1-1-0") && p.contains("read")),
            "{e:?}"
        );
        // Reading is fine for a configuration file.
        check_guarded(&key, Guard::Change).unwrap();
        grant_everyone(&key, FILE_WRITE_DATA);
        assert!(matches!(
            check_guarded(&key, Guard::Change),
            Err(GuardError::Insecure(p)) if p.contains("S-1-1-0")
        ));
        crate::platform::tests::directories_and_absent_files_are_refused(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
