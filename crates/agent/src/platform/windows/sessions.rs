//! Logged-in users: the sessions of the Remote Desktop Services API (WTS),
//! which covers the console as well as remote sessions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kvm_agent_protocol::methods::info::LoggedInUser;
use windows_sys::Win32::System::RemoteDesktop::{
    WTSClientAddress, WTSEnumerateSessionsW, WTSFreeMemory, WTSQuerySessionInformationW,
    WTSSessionInfo, WTSINFOW, WTS_CLIENT_ADDRESS, WTS_CURRENT_SERVER_HANDLE, WTS_INFO_CLASS,
    WTS_SESSION_INFOW,
};

use super::wide::{filetime_to_unix_seconds, from_wide};
use super::{last_error, PlatformError};
use crate::platform::rfc3339_utc;

/// Memory that WTS allocated, freed with WTSFreeMemory when dropped.
struct WtsMemory<T> {
    ptr: *mut T,
    bytes: usize,
}

impl<T> Drop for WtsMemory<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the pointer came from a WTS call and is freed once.
            unsafe { WTSFreeMemory(self.ptr.cast()) };
        }
    }
}

/// One class of information about a session; None when WTS has none.
fn query<T: Copy>(session: u32, class: WTS_INFO_CLASS) -> Option<T> {
    let mut ptr: *mut u16 = std::ptr::null_mut();
    let mut bytes = 0u32;
    // SAFETY: valid out pointers; WTS allocates the buffer.
    let ok = unsafe {
        WTSQuerySessionInformationW(
            WTS_CURRENT_SERVER_HANDLE,
            session,
            class,
            &mut ptr,
            &mut bytes,
        )
    };
    let mem = WtsMemory {
        ptr: ptr.cast::<T>(),
        bytes: bytes as usize,
    };
    if ok == 0 || mem.ptr.is_null() || mem.bytes < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: WTS wrote at least a T's bytes there; the read is
    // unaligned-safe and copies it out before the memory is freed.
    Some(unsafe { std::ptr::read_unaligned(mem.ptr) })
}

/// The remote client's address: AF_INET keeps the address in bytes 2..6,
/// AF_INET6 in bytes 2..18 (after the port, as in a sockaddr).
fn client_address(a: &WTS_CLIENT_ADDRESS) -> Option<IpAddr> {
    match a.AddressFamily {
        2 => {
            let b = &a.Address;
            let ip = Ipv4Addr::new(b[2], b[3], b[4], b[5]);
            (!ip.is_unspecified()).then_some(IpAddr::V4(ip))
        }
        23 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a.Address[2..18]);
            let ip = Ipv6Addr::from(octets);
            (!ip.is_unspecified()).then_some(IpAddr::V6(ip))
        }
        _ => None,
    }
}

/// A session as the protocol shows it: None for sessions without a user
/// (services, the listener, an empty console) or without a logon time.
fn to_user(station: String, info: &WTSINFOW, client: Option<IpAddr>) -> Option<LoggedInUser> {
    let user = from_wide(&info.UserName);
    if user.is_empty() || info.LogonTime <= 0 {
        return None;
    }
    let domain = from_wide(&info.Domain);
    let secs = filetime_to_unix_seconds(info.LogonTime);
    Some(LoggedInUser {
        user: if domain.is_empty() {
            user
        } else {
            format!("{domain}\\{user}")
        },
        terminal: (!station.is_empty()).then_some(station),
        host: client.map(|ip| ip.to_string()),
        login_time: rfc3339_utc(secs),
        login_time_epoch: secs,
    })
}

/// One entry per session with a user, in WTS order. The user is
/// `DOMAIN\name`; the terminal the window station (`Console`,
/// `RDP-Tcp#3`); the host the client's address for remote sessions.
pub fn logged_in_users() -> Result<Vec<LoggedInUser>, PlatformError> {
    let mut ptr: *mut WTS_SESSION_INFOW = std::ptr::null_mut();
    let mut count = 0u32;
    // SAFETY: valid out pointers; WTS allocates the array.
    let ok =
        unsafe { WTSEnumerateSessionsW(WTS_CURRENT_SERVER_HANDLE, 0, 1, &mut ptr, &mut count) };
    let sessions = WtsMemory { ptr, bytes: 0 };
    if ok == 0 {
        return Err(last_error("WTSEnumerateSessionsW"));
    }
    let list: &[WTS_SESSION_INFOW] = if sessions.ptr.is_null() || count == 0 {
        &[]
    } else {
        // SAFETY: WTS returned `count` entries at `ptr`, alive until
        // `sessions` is dropped at the end of this function.
        unsafe { std::slice::from_raw_parts(sessions.ptr, count as usize) }
    };
    let mut users = Vec::new();
    for s in list {
        // SAFETY: the station name is null or a NUL-terminated string in
        // the WTS array.
        let station = unsafe { super::wide::from_wide_ptr(s.pWinStationName) }.unwrap_or_default();
        let Some(info) = query::<WTSINFOW>(s.SessionId, WTSSessionInfo) else {
            continue;
        };
        let client = query::<WTS_CLIENT_ADDRESS>(s.SessionId, WTSClientAddress)
            .and_then(|a| client_address(&a));
        users.extend(to_user(station, &info, client));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::windows::wide::UNIX_EPOCH_AS_FILETIME;

    fn wide<const N: usize>(s: &str) -> [u16; N] {
        let mut a = [0u16; N];
        for (d, c) in a.iter_mut().zip(s.encode_utf16()) {
            *d = c;
        }
        a
    }

    #[test]
    fn sessions_become_users() {
        let info = WTSINFOW {
            UserName: wide("alice"),
            Domain: wide("WIN-APP01"),
            LogonTime: UNIX_EPOCH_AS_FILETIME + 17_672_588_430_000_000,
            ..Default::default()
        };
        let ip = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 15)));
        let u = to_user("RDP-Tcp#3".into(), &info, ip).unwrap();
        assert_eq!(u.user, "WIN-APP01\\alice");
        assert_eq!(u.terminal.as_deref(), Some("RDP-Tcp#3"));
        assert_eq!(u.host.as_deref(), Some("192.0.2.15"));
        assert_eq!(u.login_time, "2026-01-01T09:14:03Z");
        assert_eq!(u.login_time_epoch, 1_767_258_843);
        let nobody = WTSINFOW {
            LogonTime: info.LogonTime,
            ..Default::default()
        };
        assert_eq!(to_user("Services".into(), &nobody, None), None);
        let no_time = WTSINFOW {
            UserName: wide("bob"),
            ..Default::default()
        };
        assert_eq!(to_user("Console".into(), &no_time, None), None);
    }

    #[test]
    fn client_addresses() {
        let mut a = WTS_CLIENT_ADDRESS {
            AddressFamily: 2,
            ..Default::default()
        };
        a.Address[2..6].copy_from_slice(&[192, 0, 2, 15]);
        assert_eq!(client_address(&a), Some("192.0.2.15".parse().unwrap()));
        a.Address = [0; 20];
        assert_eq!(client_address(&a), None);
        a.AddressFamily = 23;
        a.Address[2] = 0x20;
        a.Address[3] = 0x01;
        a.Address[17] = 1;
        assert_eq!(client_address(&a), Some("2001::1".parse().unwrap()));
        a.AddressFamily = 0;
        assert_eq!(client_address(&a), None);
    }

    #[test]
    fn live_sessions() {
        // Under Wine WTS reports one console session, whose user may or may
        // not be filled in; each listed user must hold together.
        let users = logged_in_users().unwrap();
        for u in &users {
            assert!(!u.user.is_empty() && !u.user.ends_with('\\'), "{u:?}");
            assert!(u.login_time_epoch > 0, "{u:?}");
            assert_eq!(u.login_time, rfc3339_utc(u.login_time_epoch));
        }
        // WTS itself answers and its memory is ours to free.
        let mut ptr: *mut WTS_SESSION_INFOW = std::ptr::null_mut();
        let mut count = 0u32;
        // SAFETY: valid out pointers.
        let ok =
            unsafe { WTSEnumerateSessionsW(WTS_CURRENT_SERVER_HANDLE, 0, 1, &mut ptr, &mut count) };
        let _free = WtsMemory { ptr, bytes: 0 };
        assert_ne!(ok, 0);
        assert!(
            users.len() <= count as usize,
            "{users:?} from {count} sessions"
        );
    }
}
