//! UTF-16 strings and FILETIME figures.

use windows_sys::Win32::Foundation::FILETIME;

/// `s` as a NUL-terminated UTF-16 string.
pub fn to_wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// The text of `buf` up to its first NUL (all of it without one); unpaired
/// surrogates become U+FFFD.
pub fn from_wide(buf: &[u16]) -> String {
    let end = buf.iter().position(|c| *c == 0).unwrap_or(buf.len());
    String::from_utf16_lossy(&buf[..end])
}

/// The NUL-terminated string at `p`; None for a null pointer.
///
/// # Safety
/// `p` is null or points to a readable NUL-terminated UTF-16 string.
pub unsafe fn from_wide_ptr(p: *const u16) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let mut len = 0;
    // SAFETY: the caller guarantees a NUL within the readable string, and
    // every index read is at or before it.
    while unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` units before the NUL were just read.
    Some(String::from_utf16_lossy(unsafe {
        std::slice::from_raw_parts(p, len)
    }))
}

/// A FILETIME as one 64-bit count of 100 ns units.
pub fn filetime(ft: FILETIME) -> u64 {
    (u64::from(ft.dwHighDateTime) << 32) | u64::from(ft.dwLowDateTime)
}

/// 100 ns units from 1601-01-01 (FILETIME's epoch) to 1970-01-01.
pub const UNIX_EPOCH_AS_FILETIME: i64 = 116_444_736_000_000_000;

/// Whole seconds since the Unix epoch of a FILETIME-style count (floor).
pub fn filetime_to_unix_seconds(ft: i64) -> i64 {
    (ft - UNIX_EPOCH_AS_FILETIME).div_euclid(10_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::rfc3339_utc;

    #[test]
    fn wide_round_trip() {
        let w = to_wide("héllo €");
        assert_eq!(w.last(), Some(&0));
        assert_eq!(from_wide(&w), "héllo €");
        // SAFETY: `w` is NUL-terminated and alive.
        assert_eq!(
            unsafe { from_wide_ptr(w.as_ptr()) }.as_deref(),
            Some("héllo €")
        );
        // SAFETY: null is allowed.
        assert_eq!(unsafe { from_wide_ptr(std::ptr::null()) }, None);
        assert_eq!(from_wide(&[0x61, 0x62]), "ab");
    }

    #[test]
    fn filetimes() {
        let ft = FILETIME {
            dwLowDateTime: 1,
            dwHighDateTime: 2,
        };
        assert_eq!(filetime(ft), (2 << 32) | 1);
        assert_eq!(filetime_to_unix_seconds(UNIX_EPOCH_AS_FILETIME), 0);
        assert_eq!(
            filetime_to_unix_seconds(UNIX_EPOCH_AS_FILETIME + 17_672_545_310_000_000),
            1_767_254_531
        );
        assert_eq!(filetime_to_unix_seconds(UNIX_EPOCH_AS_FILETIME - 1), -1);
        assert_eq!(rfc3339_utc(1_767_254_531), "2026-01-01T08:02:11Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59Z");
    }
}
