//! Files that steer the agent (its configuration, its keys): owned by root
//! or the agent's own user, and without the group and other permission
//! bits that would let anybody else change (or, for keys, read) them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::platform::{Guard, GuardError};

/// Whether `path` is safe from other accounts as `guard` says.
pub fn check_guarded(path: &Path, guard: Guard) -> Result<(), GuardError> {
    let meta = std::fs::metadata(path).map_err(GuardError::Read)?;
    if guard == Guard::ReadOrChange && !meta.is_file() {
        return Err(GuardError::Insecure("is not a regular file".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(GuardError::Insecure(format!(
            "is owned by uid {}",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    match guard {
        Guard::Change if mode & 0o022 != 0 => Err(GuardError::Insecure(format!(
            "is writable by group or others (mode {mode:o})"
        ))),
        Guard::ReadOrChange if mode & 0o077 != 0 => Err(GuardError::Insecure(format!(
            "is accessible to group or others (mode {mode:o})"
        ))),
        _ => Ok(()),
    }
}

/// Create the new file `path` with `contents`, mode 0600: a file
/// [`check_guarded`] accepts as a secret.
pub fn create_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// What to require of `path`, and the commands that make it so.
pub fn guard_remedy(guard: Guard, path: &Path) -> String {
    let p = path.display();
    match guard {
        Guard::Change => format!(
            "it must be owned by root and not writable by group or others \
             (chown root {p}; chmod go-w {p})"
        ),
        Guard::ReadOrChange => format!(
            "it must be owned by root and have no group or other permissions \
             (chown root {p}; chmod 600 {p})"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn modes_that_let_others_in_are_refused() {
        let dir = std::env::temp_dir().join(format!("kva-guarded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("file");
        std::fs::write(&f, "x").unwrap();
        let set = |mode| std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode));
        for (mode, change_ok, read_ok) in [
            (0o600, true, true),
            (0o400, true, true),
            (0o644, true, false),
            (0o640, true, false),
            (0o604, true, false),
            (0o664, false, false),
            (0o646, false, false),
        ] {
            set(mode).unwrap();
            assert_eq!(
                check_guarded(&f, Guard::Change).is_ok(),
                change_ok,
                "{mode:o}"
            );
            assert_eq!(
                check_guarded(&f, Guard::ReadOrChange).is_ok(),
                read_ok,
                "{mode:o}"
            );
        }
        let key = dir.join("key");
        create_private(&key, b"00").unwrap();
        check_guarded(&key, Guard::ReadOrChange).unwrap();
        assert!(create_private(&key, b"00").is_err(), "only a new file");
        crate::platform::tests::directories_and_absent_files_are_refused(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
