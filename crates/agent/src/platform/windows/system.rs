//! Boot id, OS version, computer names, uptime and time zone.

use kvm_agent_protocol::methods::info::{OsInfo, Timezone};
use windows_sys::Wdk::System::SystemInformation::{
    NtQuerySystemInformation, SystemTimeOfDayInformation,
};
use windows_sys::Wdk::System::SystemServices::RtlGetVersion;
use windows_sys::Win32::Foundation::{ERROR_MORE_DATA, ERROR_SUCCESS};
use windows_sys::Win32::System::Registry::{RegGetValueW, HKEY_LOCAL_MACHINE, RRF_RT_REG_SZ};
use windows_sys::Win32::System::SystemInformation::{
    ComputerNameDnsFullyQualified, ComputerNameDnsHostname, GetComputerNameExW,
    GetNativeSystemInfo, GetTickCount64, COMPUTER_NAME_FORMAT, OSVERSIONINFOEXW, OSVERSIONINFOW,
    PROCESSOR_ARCHITECTURE, PROCESSOR_ARCHITECTURE_AMD64, PROCESSOR_ARCHITECTURE_ARM64,
    PROCESSOR_ARCHITECTURE_INTEL, SYSTEM_INFO,
};
use windows_sys::Win32::System::Time::{
    GetDynamicTimeZoneInformation, DYNAMIC_TIME_ZONE_INFORMATION, TIME_ZONE_ID_INVALID,
};

use super::wide::{from_wide, to_wide};
use super::{last_error, nt_error, PlatformError, OS_FAMILY};

/// `SYSTEM_TIMEOFDAY_INFORMATION` (windows-sys only has it as opaque bytes).
#[repr(C)]
#[derive(Default)]
struct TimeOfDay {
    boot_time: i64,
    current_time: i64,
    time_zone_bias: i64,
    time_zone_id: u32,
    reserved: u32,
    /// What clock changes since boot have added to `boot_time`.
    boot_time_bias: u64,
    sleep_time_bias: u64,
}

/// The boot time as a FILETIME count, with the shifts that setting the
/// clock applies to it taken back out, so it stays the same all boot long.
fn boot_time() -> Result<i64, PlatformError> {
    let mut tod = TimeOfDay::default();
    let mut len = 0u32;
    // SAFETY: the buffer is a live TimeOfDay of the size passed; `len` is a
    // valid out pointer.
    let status = unsafe {
        NtQuerySystemInformation(
            SystemTimeOfDayInformation,
            (&mut tod as *mut TimeOfDay).cast(),
            std::mem::size_of::<TimeOfDay>() as u32,
            &mut len,
        )
    };
    if status < 0 {
        return Err(nt_error(
            "NtQuerySystemInformation(SystemTimeOfDayInformation)",
            status,
        ));
    }
    Ok(tod.boot_time.wrapping_sub(tod.boot_time_bias as i64))
}

/// Identifies the current boot: its start time in 100 ns units since 1601
/// (decimal). Empty, which hosts treat as unknown, if that cannot be read.
pub fn boot_id() -> String {
    match boot_time() {
        Ok(t) => t.to_string(),
        Err(e) => {
            log::warn!("cannot read the boot time: {e}");
            String::new()
        }
    }
}

/// A string value under HKLM; None when it is missing or empty.
fn hklm_string(subkey: &str, value: &str) -> Option<String> {
    let subkey = to_wide(subkey);
    let value = to_wide(value);
    let mut bytes = 0u32;
    // SAFETY: NUL-terminated strings; null data with a valid size pointer
    // asks for the size only.
    let rc = unsafe {
        RegGetValueW(
            HKEY_LOCAL_MACHINE,
            subkey.as_ptr(),
            value.as_ptr(),
            RRF_RT_REG_SZ,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut bytes,
        )
    };
    if rc != ERROR_SUCCESS {
        return None;
    }
    // The value may grow between the calls: ask again with the new size.
    for _ in 0..4 {
        let mut buf = vec![0u16; (bytes as usize).div_ceil(2)];
        let mut len = (buf.len() * 2) as u32;
        // SAFETY: `buf` holds `len` writable bytes.
        let rc = unsafe {
            RegGetValueW(
                HKEY_LOCAL_MACHINE,
                subkey.as_ptr(),
                value.as_ptr(),
                RRF_RT_REG_SZ,
                std::ptr::null_mut(),
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        match rc {
            ERROR_SUCCESS => {
                let s = from_wide(&buf).trim().to_owned();
                return (!s.is_empty()).then_some(s);
            }
            ERROR_MORE_DATA => bytes = len,
            _ => return None,
        }
    }
    None
}

/// `uname -m`-style name of the machine's native architecture.
fn machine() -> String {
    let mut info = SYSTEM_INFO::default();
    // SAFETY: a valid out pointer; the call cannot fail.
    unsafe { GetNativeSystemInfo(&mut info) };
    // SAFETY: both views of the union are plain integers.
    let arch: PROCESSOR_ARCHITECTURE = unsafe { info.Anonymous.Anonymous.wProcessorArchitecture };
    match arch {
        PROCESSOR_ARCHITECTURE_AMD64 => "x86_64".into(),
        PROCESSOR_ARCHITECTURE_ARM64 => "aarch64".into(),
        PROCESSOR_ARCHITECTURE_INTEL => "i686".into(),
        other => format!("unknown-{other}"),
    }
}

/// What the registry's product name and version, and RtlGetVersion, say.
#[derive(Debug, Default)]
struct Version {
    major: u32,
    minor: u32,
    build: u32,
    workstation: bool,
    product_name: Option<String>,
    display_version: Option<String>,
}

/// The OsInfo fields from the raw figures. Windows 11 kept "Windows 10" in
/// the registry's ProductName; client builds from 22000 on are Windows 11.
fn assemble(v: Version) -> OsInfo {
    let name = v.product_name.map(|n| match n.strip_prefix("Windows 10") {
        Some(rest) if v.workstation && v.build >= 22_000 => format!("Windows 11{rest}"),
        _ => n,
    });
    let pretty_name = match (&name, &v.display_version) {
        (Some(n), Some(d)) => Some(format!("{n} {d}")),
        (Some(n), None) => Some(n.clone()),
        _ => None,
    };
    OsInfo {
        family: OS_FAMILY,
        name,
        version: v.display_version,
        id: None,
        version_id: Some(format!("{}.{}.{}", v.major, v.minor, v.build)),
        pretty_name,
        kernel_release: v.build.to_string(),
        machine: machine(),
    }
}

/// Product name and display version from the registry (null when absent),
/// version and build from RtlGetVersion (which, unlike GetVersionEx, does
/// not depend on the exe's manifest), native architecture.
pub fn os_info() -> Result<OsInfo, PlatformError> {
    let info = rtl_version()?;
    const KEY: &str = r"SOFTWARE\Microsoft\Windows NT\CurrentVersion";
    Ok(assemble(Version {
        major: info.dwMajorVersion,
        minor: info.dwMinorVersion,
        build: info.dwBuildNumber,
        // VER_NT_WORKSTATION
        workstation: info.wProductType == 1,
        product_name: hklm_string(KEY, "ProductName"),
        // DisplayVersion since 20H2, ReleaseId (2004 and before) otherwise.
        display_version: hklm_string(KEY, "DisplayVersion")
            .or_else(|| hklm_string(KEY, "ReleaseId")),
    }))
}

/// The kernel's version as qemu-ga's Windows build gives `kernel-version`:
/// major and minor (`10.0`).
pub fn kernel_version() -> Option<String> {
    let info = rtl_version().ok()?;
    Some(format!("{}.{}", info.dwMajorVersion, info.dwMinorVersion))
}

/// RtlGetVersion's answer.
fn rtl_version() -> Result<OSVERSIONINFOEXW, PlatformError> {
    let mut info = OSVERSIONINFOEXW {
        dwOSVersionInfoSize: std::mem::size_of::<OSVERSIONINFOEXW>() as u32,
        ..Default::default()
    };
    // SAFETY: an OSVERSIONINFOEXW whose size field says so, which
    // RtlGetVersion accepts in place of OSVERSIONINFOW.
    let status =
        unsafe { RtlGetVersion((&mut info as *mut OSVERSIONINFOEXW).cast::<OSVERSIONINFOW>()) };
    if status < 0 {
        return Err(nt_error("RtlGetVersion", status));
    }
    Ok(info)
}

/// GetComputerNameExW for `format`, sized by its own answer.
fn computer_name(format: COMPUTER_NAME_FORMAT, call: &str) -> Result<String, PlatformError> {
    let mut size = 0u32;
    // SAFETY: a null buffer with size 0 asks for the size.
    if unsafe { GetComputerNameExW(format, std::ptr::null_mut(), &mut size) } != 0 {
        return Ok(String::new());
    }
    for _ in 0..4 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(ERROR_MORE_DATA as i32) {
            return Err(PlatformError::io(call, err));
        }
        let mut buf = vec![0u16; size as usize];
        // SAFETY: `buf` holds `size` writable UTF-16 units.
        if unsafe { GetComputerNameExW(format, buf.as_mut_ptr(), &mut size) } != 0 {
            return Ok(from_wide(&buf[..(size as usize).min(buf.len())]));
        }
    }
    Err(last_error(call))
}

/// The computer's DNS host name (without domain).
pub fn hostname() -> Result<String, PlatformError> {
    computer_name(
        ComputerNameDnsHostname,
        "GetComputerNameExW(ComputerNameDnsHostname)",
    )
}

/// The host name with the computer's primary DNS suffix (configured, not
/// looked up), when it has one.
pub fn fqdn(hostname: &str) -> Option<String> {
    let full = computer_name(
        ComputerNameDnsFullyQualified,
        "GetComputerNameExW(ComputerNameDnsFullyQualified)",
    )
    .ok()?;
    (full.contains('.') && !full.eq_ignore_ascii_case(hostname)).then_some(full)
}

/// Seconds since boot (GetTickCount64, millisecond resolution; includes
/// time asleep).
pub fn uptime_seconds() -> Result<f64, PlatformError> {
    // SAFETY: no preconditions.
    Ok(unsafe { GetTickCount64() } as f64 / 1000.0)
}

/// The zone's name and current offset. Windows names zones by its own key
/// names ("W. Europe Standard Time"), not IANA names: the name is null
/// except for "UTC", which is the same in both.
pub fn timezone() -> Timezone {
    let mut tz = DYNAMIC_TIME_ZONE_INFORMATION::default();
    // SAFETY: a valid out pointer.
    let id = unsafe { GetDynamicTimeZoneInformation(&mut tz) };
    if id == TIME_ZONE_ID_INVALID {
        log::warn!(
            "GetDynamicTimeZoneInformation: {}",
            std::io::Error::last_os_error()
        );
        return Timezone {
            name: None,
            utc_offset_seconds: 0,
        };
    }
    let key = from_wide(&tz.TimeZoneKeyName);
    Timezone {
        name: (key == "UTC").then_some(key),
        utc_offset_seconds: offset_seconds(id, &tz),
    }
}

/// UTC = local + bias (minutes): east of Greenwich the bias is negative.
fn offset_seconds(id: u32, tz: &DYNAMIC_TIME_ZONE_INFORMATION) -> i32 {
    // TIME_ZONE_ID_STANDARD = 1, TIME_ZONE_ID_DAYLIGHT = 2, else unknown
    // (no daylight saving rules).
    let extra = match id {
        1 => tz.StandardBias,
        2 => tz.DaylightBias,
        _ => 0,
    };
    -(tz.Bias + extra) * 60
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_id_is_stable_and_in_the_past() {
        let a = boot_id();
        let t: i64 = a.parse().expect(&a);
        assert!(t > super::super::wide::UNIX_EPOCH_AS_FILETIME, "{t}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(boot_id(), a);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let booted = super::super::wide::filetime_to_unix_seconds(t);
        assert!(booted <= now, "boot {booted} after now {now}");
    }

    #[test]
    fn live_os_info() {
        let os = os_info().unwrap();
        assert_eq!(os.family, OS_FAMILY);
        let version_id = os.version_id.clone().unwrap();
        let parts: Vec<u32> = version_id.split('.').map(|p| p.parse().unwrap()).collect();
        assert_eq!(parts.len(), 3, "{version_id}");
        // The test prefix is set to Windows 10 (xtask/src/windows.rs).
        assert_eq!(parts[..2], [10, 0], "{version_id}");
        assert_eq!(os.kernel_release, parts[2].to_string());
        assert!(parts[2] > 0);
        assert_eq!(os.machine, "x86_64");
        if let Some(name) = &os.name {
            assert!(!name.is_empty());
            assert!(os
                .pretty_name
                .as_deref()
                .unwrap()
                .starts_with(name.as_str()));
        }
    }

    #[test]
    fn windows_11_is_named_so() {
        let v = |build, workstation| Version {
            major: 10,
            minor: 0,
            build,
            workstation,
            product_name: Some("Windows 10 Pro".into()),
            display_version: Some("23H2".into()),
        };
        let os = assemble(v(22_631, true));
        assert_eq!(os.name.as_deref(), Some("Windows 11 Pro"));
        assert_eq!(os.pretty_name.as_deref(), Some("Windows 11 Pro 23H2"));
        assert_eq!(os.version.as_deref(), Some("23H2"));
        assert_eq!(os.version_id.as_deref(), Some("10.0.22631"));
        assert_eq!(os.kernel_release, "22631");
        assert_eq!(os.id, None);
        assert_eq!(
            assemble(v(19_045, true)).name.as_deref(),
            Some("Windows 10 Pro")
        );
        // A server build keeps its name.
        assert_eq!(
            assemble(v(26_100, false)).name.as_deref(),
            Some("Windows 10 Pro")
        );
        let bare = assemble(Version {
            build: 1,
            ..Default::default()
        });
        assert_eq!(
            (bare.name, bare.pretty_name, bare.version),
            (None, None, None)
        );
    }

    #[test]
    fn hostname_matches_the_api() {
        let name = hostname().unwrap();
        assert!(!name.is_empty());
        assert!(!name.contains('\0'));
        let mut buf = [0u16; 256];
        let mut size = buf.len() as u32;
        // SAFETY: `buf` holds `size` units.
        let ok =
            unsafe { GetComputerNameExW(ComputerNameDnsHostname, buf.as_mut_ptr(), &mut size) };
        assert_ne!(ok, 0);
        assert_eq!(name, String::from_utf16(&buf[..size as usize]).unwrap());
        if let Some(full) = fqdn(&name) {
            assert!(full.contains('.'), "{full}");
            assert_ne!(full, name);
        }
    }

    #[test]
    fn uptime_grows() {
        let a = uptime_seconds().unwrap();
        assert!(a > 0.0);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let b = uptime_seconds().unwrap();
        assert!(b > a, "{a} then {b}");
    }

    #[test]
    fn timezone_offsets() {
        let tz = timezone();
        assert!(tz.utc_offset_seconds.abs() <= 14 * 3600, "{tz:?}");
        assert_eq!(tz.utc_offset_seconds % 60, 0);
        let mut paris = DYNAMIC_TIME_ZONE_INFORMATION {
            Bias: -60,
            StandardBias: 0,
            DaylightBias: -60,
            ..Default::default()
        };
        assert_eq!(offset_seconds(1, &paris), 3600);
        assert_eq!(offset_seconds(2, &paris), 7200);
        assert_eq!(offset_seconds(0, &paris), 3600);
        paris.Bias = 300;
        assert_eq!(offset_seconds(1, &paris), -18_000);
    }
}
