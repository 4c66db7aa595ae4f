//! The time zone: its IANA name from /etc/timezone (Debian and derivatives)
//! or from the target of the /etc/localtime symlink (the part after
//! `zoneinfo/`); its current UTC offset from localtime_r(3)'s `tm_gmtoff`
//! (glibc reads /etc/localtime itself, or the `TZ` variable when set).

use kvm_agent_protocol::methods::info::Timezone;

extern "C" {
    fn tzset();
}

/// The name in /etc/timezone's first line, if it looks like a zone name.
pub fn name_from_etc_timezone(text: &str) -> Option<String> {
    let name = text.lines().next()?.trim();
    valid_name(name).then(|| name.to_owned())
}

/// The zone name in a /etc/localtime symlink target
/// (`/usr/share/zoneinfo/Europe/Paris`, `../usr/share/zoneinfo/posix/UTC`).
pub fn name_from_link(target: &str) -> Option<String> {
    let (_, name) = target.rsplit_once("zoneinfo/")?;
    let name = ["posix/", "right/"]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    valid_name(name).then(|| name.to_owned())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.split('/').any(|p| p.is_empty() || p == "..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-+".contains(&b))
}

/// The current offset from UTC, east positive.
pub fn utc_offset_seconds() -> i32 {
    // SAFETY: tzset and time have no preconditions; localtime_r writes only
    // to the tm we pass.
    unsafe {
        tzset();
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return 0;
        }
        tm.tm_gmtoff as i32
    }
}

/// Name (when known) and offset.
pub fn current() -> Timezone {
    let name = std::fs::read_to_string("/etc/timezone")
        .ok()
        .and_then(|t| name_from_etc_timezone(&t))
        .or_else(|| {
            std::fs::read_link("/etc/localtime")
                .ok()
                .and_then(|p| name_from_link(&p.to_string_lossy()))
        });
    Timezone {
        name,
        utc_offset_seconds: utc_offset_seconds(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            name_from_etc_timezone("Europe/Paris\n").as_deref(),
            Some("Europe/Paris")
        );
        assert_eq!(name_from_etc_timezone("\n"), None);
        assert_eq!(
            name_from_link("/usr/share/zoneinfo/America/Argentina/Buenos_Aires").as_deref(),
            Some("America/Argentina/Buenos_Aires")
        );
        assert_eq!(
            name_from_link("../usr/share/zoneinfo/posix/Etc/UTC").as_deref(),
            Some("Etc/UTC")
        );
        assert_eq!(name_from_link("/etc/some-file"), None);
        assert_eq!(name_from_link("/usr/share/zoneinfo/../../etc/passwd"), None);
    }

    #[test]
    fn offset_is_within_a_day() {
        assert!(utc_offset_seconds().abs() <= 14 * 3600);
    }
}
