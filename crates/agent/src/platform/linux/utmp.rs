//! utmp(5) records, parsed by hand (no getutent: it is not thread-safe).
//!
//! The layout is glibc's on 64-bit Linux (x86_64, aarch64), 384 bytes:
//!
//! | offset | field | type |
//! |---|---|---|
//! | 0 | ut_type | i16 (+2 padding) |
//! | 4 | ut_pid | i32 |
//! | 8 | ut_line | 32 bytes |
//! | 40 | ut_id | 4 bytes |
//! | 44 | ut_user | 32 bytes |
//! | 76 | ut_host | 256 bytes |
//! | 332 | ut_exit | 2 × i16 |
//! | 336 | ut_session | i32 |
//! | 340 | ut_tv | 2 × i32 (seconds, microseconds) |
//! | 348 | ut_addr_v6 | 4 × i32 |
//! | 364 | unused | 20 bytes |
//!
//! Only `USER_PROCESS` (7) records are sessions. Integers are in the
//! machine's byte order.

use kvm_agent_protocol::methods::info::LoggedInUser;

use crate::platform::rfc3339_utc;

/// Size of one record.
pub const UTMP_RECORD_LEN: usize = 384;
/// `ut_type` of a login session.
pub const USER_PROCESS: i16 = 7;

const LINE: std::ops::Range<usize> = 8..40;
const USER: std::ops::Range<usize> = 44..76;
const HOST: std::ops::Range<usize> = 76..332;
const TV_SEC: std::ops::Range<usize> = 340..344;

fn text(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    let s = String::from_utf8_lossy(&field[..end]).trim().to_owned();
    (!s.is_empty()).then_some(s)
}

/// Every login session in a utmp file's bytes; a trailing partial record is
/// ignored.
pub fn parse_utmp(bytes: &[u8]) -> Vec<LoggedInUser> {
    bytes
        .chunks_exact(UTMP_RECORD_LEN)
        .filter_map(|r| {
            if i16::from_ne_bytes([r[0], r[1]]) != USER_PROCESS {
                return None;
            }
            let user = text(&r[USER])?;
            // glibc keeps seconds in 32 bits; read them unsigned, which is
            // right until 2106.
            let secs = i64::from(u32::from_ne_bytes(r[TV_SEC].try_into().ok()?));
            Some(LoggedInUser {
                user,
                terminal: text(&r[LINE]),
                host: text(&r[HOST]),
                login_time: rfc3339_utc(secs),
                login_time_epoch: secs,
            })
        })
        .collect()
}

/// Build one record (for tests, here and in the handler's).
#[cfg(test)]
pub fn record(ut_type: i16, user: &str, line: &str, host: &str, secs: u32) -> Vec<u8> {
    let mut r = vec![0u8; UTMP_RECORD_LEN];
    r[0..2].copy_from_slice(&ut_type.to_ne_bytes());
    r[4..8].copy_from_slice(&1234i32.to_ne_bytes());
    r[LINE][..line.len()].copy_from_slice(line.as_bytes());
    r[USER][..user.len()].copy_from_slice(user.as_bytes());
    r[HOST][..host.len()].copy_from_slice(host.as_bytes());
    r[TV_SEC].copy_from_slice(&secs.to_ne_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_process_records_only() {
        let mut file = Vec::new();
        file.extend(record(2, "reboot", "~", "6.1.0", 1_767_250_000)); // BOOT_TIME
        file.extend(record(6, "LOGIN", "tty1", "", 1_767_250_001)); // LOGIN_PROCESS
        file.extend(record(USER_PROCESS, "root", "tty1", "", 1_767_254_531));
        file.extend(record(8, "", "pts/1", "", 1_767_254_600)); // DEAD_PROCESS
        file.extend(record(
            USER_PROCESS,
            "alice",
            "pts/0",
            "192.0.2.15",
            1_767_258_843,
        ));
        // Full-width fields have no NUL.
        let long_user = "u".repeat(32);
        file.extend(record(USER_PROCESS, &long_user, &"p".repeat(32), "", 0));
        file.extend_from_slice(&[0u8; 100]); // a torn write
        let users = parse_utmp(&file);
        assert_eq!(users.len(), 3);
        assert_eq!(
            users[0],
            LoggedInUser {
                user: "root".into(),
                terminal: Some("tty1".into()),
                host: None,
                login_time: "2026-01-01T08:02:11Z".into(),
                login_time_epoch: 1_767_254_531,
            }
        );
        assert_eq!(users[1].host.as_deref(), Some("192.0.2.15"));
        assert_eq!(users[1].login_time, "2026-01-01T09:14:03Z");
        assert_eq!(users[2].user, long_user);
        assert_eq!(users[2].login_time, "1970-01-01T00:00:00Z");
        assert!(parse_utmp(&[]).is_empty());
    }
}
