//! CPU times, memory, process count and volumes.

use kvm_agent_protocol::methods::info::MemoryMetrics;
use windows_sys::Wdk::System::SystemInformation::{
    NtQuerySystemInformation, SystemProcessorPerformanceInformation,
};
use windows_sys::Win32::Foundation::{FILETIME, STATUS_INFO_LENGTH_MISMATCH};
use windows_sys::Win32::Storage::FileSystem::{
    GetDiskFreeSpaceExW, GetDriveTypeW, GetLogicalDriveStringsW, GetVolumeInformationW,
    QueryDosDeviceW,
};
use windows_sys::Win32::System::Ioctl::{DISK_PERFORMANCE, IOCTL_DISK_PERFORMANCE};
use windows_sys::Win32::System::ProcessStatus::{GetPerformanceInfo, PERFORMANCE_INFORMATION};
use windows_sys::Win32::System::SystemInformation::{
    GetNativeSystemInfo, GlobalMemoryStatusEx, MEMORYSTATUSEX, SYSTEM_INFO,
};
use windows_sys::Win32::System::Threading::GetSystemTimes;
use windows_sys::Win32::System::WindowsProgramming::{
    DRIVE_CDROM, DRIVE_FIXED, DRIVE_RAMDISK, DRIVE_REMOTE, DRIVE_REMOVABLE,
    SYSTEM_PROCESSOR_PERFORMANCE_INFORMATION,
};
use windows_sys::Win32::System::IO::DeviceIoControl;

use super::wide::{filetime, from_wide, to_wide};
use super::{last_error, nt_error, PlatformError};
use crate::platform::{CpuSample, CpuTimes, DiskCounters, FsKind, FsStats, Mount};

/// busy/total from idle, kernel (which includes idle) and user times.
fn times(idle: u64, kernel: u64, user: u64) -> CpuTimes {
    let total = kernel.saturating_add(user);
    CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    }
}

/// Each processor of the calling thread's processor group (up to 64), in
/// 100 ns units.
fn per_cpu() -> Result<Vec<(u32, CpuTimes)>, PlatformError> {
    const CALL: &str = "NtQuerySystemInformation(SystemProcessorPerformanceInformation)";
    let mut info = SYSTEM_INFO::default();
    // SAFETY: a valid out pointer; the call cannot fail.
    unsafe { GetNativeSystemInfo(&mut info) };
    let item = std::mem::size_of::<SYSTEM_PROCESSOR_PERFORMANCE_INFORMATION>();
    let mut count = (info.dwNumberOfProcessors as usize).max(1);
    for _ in 0..4 {
        let mut buf = vec![SYSTEM_PROCESSOR_PERFORMANCE_INFORMATION::default(); count];
        let mut len = 0u32;
        // SAFETY: `buf` holds `count` entries, the byte length passed.
        let status = unsafe {
            NtQuerySystemInformation(
                SystemProcessorPerformanceInformation,
                buf.as_mut_ptr().cast(),
                (count * item) as u32,
                &mut len,
            )
        };
        if status == STATUS_INFO_LENGTH_MISMATCH {
            count = (len as usize / item).max(count * 2);
            continue;
        }
        if status < 0 {
            return Err(nt_error(CALL, status));
        }
        buf.truncate(len as usize / item);
        return Ok(buf
            .iter()
            .zip(0u32..)
            .map(|(p, n)| {
                (
                    n,
                    times(p.IdleTime as u64, p.KernelTime as u64, p.UserTime as u64),
                )
            })
            .collect());
    }
    Err(nt_error(CALL, STATUS_INFO_LENGTH_MISMATCH))
}

/// Cumulative CPU times in 100 ns units: the total from GetSystemTimes
/// (every processor group), each CPU from NtQuerySystemInformation.
pub fn cpu_times() -> Result<CpuSample, PlatformError> {
    let mut idle = FILETIME::default();
    let mut kernel = FILETIME::default();
    let mut user = FILETIME::default();
    // SAFETY: three valid out pointers.
    if unsafe { GetSystemTimes(&mut idle, &mut kernel, &mut user) } == 0 {
        return Err(last_error("GetSystemTimes"));
    }
    Ok(CpuSample {
        total: times(filetime(idle), filetime(kernel), filetime(user)),
        per_cpu: per_cpu()?,
    })
}

fn performance_info() -> Result<PERFORMANCE_INFORMATION, PlatformError> {
    let mut perf = PERFORMANCE_INFORMATION {
        cb: std::mem::size_of::<PERFORMANCE_INFORMATION>() as u32,
        ..Default::default()
    };
    // SAFETY: a valid out pointer with its size.
    if unsafe { GetPerformanceInfo(&mut perf, perf.cb) } == 0 {
        return Err(last_error("GetPerformanceInfo"));
    }
    Ok(perf)
}

/// `SYSTEM_PAGEFILE_INFORMATION`: one page file, sizes in pages.
#[repr(C)]
#[derive(Clone, Copy)]
struct PageFile {
    next_entry_offset: u32,
    total_size: u32,
    total_in_use: u32,
    peak_usage: u32,
    /// UNICODE_STRING: length, maximum length, pointer.
    name: [usize; 2],
}

/// SystemPageFileInformation (not named in windows-sys).
const SYSTEM_PAGE_FILE_INFORMATION: i32 = 18;

/// Total size and use of all page files, in pages. Wine's ntdll does not
/// know this class (STATUS_INVALID_INFO_CLASS).
fn page_files() -> Result<(u64, u64), PlatformError> {
    const CALL: &str = "NtQuerySystemInformation(SystemPageFileInformation)";
    let item = std::mem::size_of::<PageFile>();
    // u64 elements keep the entries aligned; each entry is followed by its name.
    let mut buf = vec![0u64; 512];
    for _ in 0..6 {
        let bytes = buf.len() * 8;
        let mut len = 0u32;
        // SAFETY: `buf` holds `bytes` writable, aligned bytes.
        let status = unsafe {
            NtQuerySystemInformation(
                SYSTEM_PAGE_FILE_INFORMATION,
                buf.as_mut_ptr().cast(),
                bytes as u32,
                &mut len,
            )
        };
        if status == STATUS_INFO_LENGTH_MISMATCH {
            buf = vec![0u64; (len as usize).div_ceil(8).max(buf.len() * 2)];
            continue;
        }
        if status < 0 {
            return Err(nt_error(CALL, status));
        }
        let len = (len as usize).min(bytes);
        let (mut total, mut used, mut offset) = (0u64, 0u64, 0usize);
        while offset + item <= len {
            // SAFETY: `offset + item` bytes are within what the call wrote;
            // the read is unaligned-safe.
            let pf = unsafe {
                std::ptr::read_unaligned(buf.as_ptr().cast::<u8>().add(offset).cast::<PageFile>())
            };
            total += u64::from(pf.total_size);
            used += u64::from(pf.total_in_use);
            if pf.next_entry_offset == 0 {
                break;
            }
            offset += pf.next_entry_offset as usize;
        }
        return Ok((total, used));
    }
    Err(nt_error(CALL, STATUS_INFO_LENGTH_MISMATCH))
}

/// GlobalMemoryStatusEx.
fn memory_status() -> Result<MEMORYSTATUSEX, PlatformError> {
    let mut m = MEMORYSTATUSEX {
        dwLength: std::mem::size_of::<MEMORYSTATUSEX>() as u32,
        ..Default::default()
    };
    // SAFETY: a valid out pointer whose length field is set.
    if unsafe { GlobalMemoryStatusEx(&mut m) } == 0 {
        return Err(last_error("GlobalMemoryStatusEx"));
    }
    Ok(m)
}

/// The protocol's figures from physical memory, the system cache and the
/// page files (all in bytes). Windows counts its standby list as available
/// and these APIs give no separate free figure: `free_bytes` is available
/// minus the system cache (the standby list and the system working set).
fn memory_from(m: &MEMORYSTATUSEX, cache: u64, swap_total: u64, swap_used: u64) -> MemoryMetrics {
    let total = m.ullTotalPhys;
    let available = m.ullAvailPhys.min(total);
    MemoryMetrics {
        total_bytes: total,
        available_bytes: available,
        used_bytes: total - available,
        free_bytes: available.saturating_sub(cache),
        cache_bytes: cache,
        swap_total_bytes: swap_total,
        swap_used_bytes: swap_used.min(swap_total),
    }
}

/// Memory from GlobalMemoryStatusEx and GetPerformanceInfo, swap from the
/// page files (NtQuerySystemInformation). An error when the page files
/// cannot be read (under Wine): swap figures are never guessed.
pub fn memory() -> Result<MemoryMetrics, PlatformError> {
    let m = memory_status()?;
    let perf = performance_info()?;
    let page = perf.PageSize as u64;
    let (swap_pages, swap_used_pages) = page_files()?;
    Ok(memory_from(
        &m,
        (perf.SystemCache as u64).saturating_mul(page),
        swap_pages.saturating_mul(page),
        swap_used_pages.saturating_mul(page),
    ))
}

/// Windows has no load average.
pub fn load_average() -> Result<Option<[f64; 3]>, PlatformError> {
    Ok(None)
}

/// Number of processes (GetPerformanceInfo).
pub fn process_count() -> Result<u64, PlatformError> {
    Ok(u64::from(performance_info()?.ProcessCount))
}

/// How many `\\.\PhysicalDriveN` numbers are probed.
const MAX_PHYSICAL_DRIVES: u32 = 64;

/// The counters of one physical drive, None when there is no such drive or
/// it keeps no counters.
fn physical_drive(n: u32) -> Option<DiskCounters> {
    use std::os::windows::fs::OpenOptionsExt;
    use std::os::windows::io::AsRawHandle;
    let name = format!(r"\\.\PhysicalDrive{n}");
    // No access rights: IOCTL_DISK_PERFORMANCE needs none, and nothing is
    // read from or written to the disk. FILE_SHARE_READ | FILE_SHARE_WRITE.
    let file = std::fs::OpenOptions::new()
        .access_mode(0)
        .share_mode(3)
        .open(&name)
        .ok()?;
    let mut perf = DISK_PERFORMANCE::default();
    let mut returned = 0u32;
    // SAFETY: an open handle; no input; the output is a live DISK_PERFORMANCE
    // of the size passed; synchronous (no OVERLAPPED).
    let ok = unsafe {
        DeviceIoControl(
            file.as_raw_handle(),
            IOCTL_DISK_PERFORMANCE,
            std::ptr::null(),
            0,
            (&mut perf as *mut DISK_PERFORMANCE).cast(),
            std::mem::size_of::<DISK_PERFORMANCE>() as u32,
            &mut returned,
            std::ptr::null_mut(),
        )
    };
    if ok == 0 || (returned as usize) < std::mem::size_of::<DISK_PERFORMANCE>() {
        log::debug!(
            "{name}: no performance counters: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(DiskCounters {
        name: format!("PhysicalDrive{n}"),
        read_bytes: perf.BytesRead as u64,
        write_bytes: perf.BytesWritten as u64,
        read_ops: u64::from(perf.ReadCount),
        write_ops: u64::from(perf.WriteCount),
    })
}

/// Counters of the physical drives (IOCTL_DISK_PERFORMANCE on
/// `\\.\PhysicalDriveN`, named `PhysicalDriveN`); drives that cannot be
/// opened or keep no counters are left out. Operation counts are 32-bit and
/// wrap.
pub fn disk_counters() -> Result<Vec<DiskCounters>, PlatformError> {
    Ok((0..MAX_PHYSICAL_DRIVES)
        .filter_map(physical_drive)
        .collect())
}

/// The drive roots (`C:\`), sized by the call's own answer.
fn drive_roots() -> Result<Vec<String>, PlatformError> {
    // SAFETY: size 0 with a null buffer asks for the size.
    let mut need = unsafe { GetLogicalDriveStringsW(0, std::ptr::null_mut()) };
    for _ in 0..4 {
        if need == 0 {
            return Err(last_error("GetLogicalDriveStringsW"));
        }
        let mut buf = vec![0u16; need as usize + 1];
        // SAFETY: `buf` holds `buf.len()` writable units.
        let got = unsafe { GetLogicalDriveStringsW(buf.len() as u32, buf.as_mut_ptr()) };
        if got as usize <= buf.len() && got != 0 {
            return Ok(buf[..got as usize]
                .split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(String::from_utf16_lossy)
                .collect());
        }
        need = got;
    }
    Err(last_error("GetLogicalDriveStringsW"))
}

/// The file system's name (`NTFS`), None when the drive has no medium.
fn fs_name(root: &[u16]) -> Option<String> {
    let mut name = [0u16; 261];
    // SAFETY: a NUL-terminated root; the name buffer's size is passed; the
    // other outputs are optional.
    let ok = unsafe {
        GetVolumeInformationW(
            root.as_ptr(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            name.as_mut_ptr(),
            name.len() as u32,
        )
    };
    (ok != 0).then(|| from_wide(&name))
}

/// The NT device behind a drive letter (`\Device\HarddiskVolume3`).
fn dos_device(drive: &str) -> Option<String> {
    let name = to_wide(drive);
    let mut buf = vec![0u16; 1024];
    for _ in 0..4 {
        // SAFETY: a NUL-terminated name; `buf`'s size is passed.
        let n = unsafe { QueryDosDeviceW(name.as_ptr(), buf.as_mut_ptr(), buf.len() as u32) };
        if n != 0 {
            return Some(from_wide(&buf[..n as usize]));
        }
        // ERROR_INSUFFICIENT_BUFFER: no size is given back; try twice as big.
        if std::io::Error::last_os_error().raw_os_error() != Some(122) {
            return None;
        }
        buf = vec![0u16; buf.len() * 2];
    }
    None
}

/// The drive's kind, or None for drives not reported (no root directory,
/// unknown type).
fn kind(drive_type: u32) -> Option<FsKind> {
    match drive_type {
        DRIVE_FIXED | DRIVE_REMOVABLE | DRIVE_CDROM => Some(FsKind::Local),
        DRIVE_REMOTE => Some(FsKind::Network),
        DRIVE_RAMDISK => Some(FsKind::Pseudo),
        _ => None,
    }
}

/// Drive letters with a mounted file system: mount point `C:\`, type
/// `NTFS`, device the NT device name (else the drive itself). Drives
/// without a medium are left out. Volumes mounted on folders are not
/// listed yet.
pub fn mounts() -> Result<Vec<Mount>, PlatformError> {
    let mut list = Vec::new();
    for root in drive_roots()? {
        let wroot = to_wide(&root);
        // SAFETY: a NUL-terminated root path.
        let Some(kind) = kind(unsafe { GetDriveTypeW(wroot.as_ptr()) }) else {
            continue;
        };
        // A network drive's server may hang; its type is asked only when it is
        // reported at all, by the caller's deadline-guarded fs_stats.
        let fs_type = if kind == FsKind::Network {
            String::new()
        } else {
            match fs_name(&wroot) {
                Some(t) => t,
                None => continue,
            }
        };
        let letter = root.trim_end_matches('\\');
        list.push(Mount {
            device: dos_device(letter).unwrap_or_else(|| letter.to_owned()),
            mount_point: root,
            fs_type,
            kind,
        });
    }
    Ok(list)
}

/// Sizes of the volume at `mount_point` (GetDiskFreeSpaceExW). Windows has
/// no inodes: those figures are 0. May block on a network drive.
pub fn fs_stats(mount_point: &str) -> Result<FsStats, PlatformError> {
    let path = to_wide(mount_point);
    let (mut available, mut total, mut free) = (0u64, 0u64, 0u64);
    // SAFETY: a NUL-terminated path and three valid out pointers.
    if unsafe { GetDiskFreeSpaceExW(path.as_ptr(), &mut available, &mut total, &mut free) } == 0 {
        return Err(PlatformError::io(
            mount_point,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(FsStats {
        total_bytes: total,
        used_bytes: total.saturating_sub(free),
        available_bytes: available,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_grow() {
        let a = cpu_times().unwrap();
        assert!(a.total.total > 0 && a.total.busy <= a.total.total, "{a:?}");
        assert!(!a.per_cpu.is_empty());
        let numbers: Vec<u32> = a.per_cpu.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, (0..a.per_cpu.len() as u32).collect::<Vec<_>>());
        // Burn some CPU so that at least one clock tick passes.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let b = cpu_times().unwrap();
        assert!(b.total.total >= a.total.total, "{a:?} then {b:?}");
        assert!(b.total.busy >= a.total.busy, "{a:?} then {b:?}");
        assert!(
            b.total.total > a.total.total,
            "no time passed: {a:?} then {b:?}"
        );
        assert_eq!(a.per_cpu.len(), b.per_cpu.len());
        for ((_, x), (_, y)) in a.per_cpu.iter().zip(&b.per_cpu) {
            assert!(y.total >= x.total && y.busy >= x.busy, "{x:?} then {y:?}");
        }
    }

    #[test]
    fn memory_figures() {
        let m = MEMORYSTATUSEX {
            ullTotalPhys: 4_000,
            ullAvailPhys: 3_000,
            ..Default::default()
        };
        let f = memory_from(&m, 1_000, 500, 100);
        assert_eq!(
            (f.total_bytes, f.available_bytes, f.used_bytes, f.free_bytes),
            (4_000, 3_000, 1_000, 2_000)
        );
        assert_eq!(
            (f.cache_bytes, f.swap_total_bytes, f.swap_used_bytes),
            (1_000, 500, 100)
        );
        // A cache larger than what is available leaves nothing free.
        assert_eq!(memory_from(&m, 3_500, 0, 0).free_bytes, 0);
    }

    #[test]
    fn live_memory() {
        let status = memory_status().unwrap();
        let (total, available) = (status.ullTotalPhys, status.ullAvailPhys);
        assert!(total > 0 && available <= total, "{available} of {total}");
        let perf = performance_info().unwrap();
        assert!(perf.PageSize >= 4096, "page size {}", perf.PageSize);
        match memory() {
            Ok(m) => {
                assert_eq!(m.total_bytes, status.ullTotalPhys);
                assert!(m.available_bytes <= m.total_bytes, "{m:?}");
                assert!(m.free_bytes <= m.available_bytes, "{m:?}");
                assert!(m.swap_used_bytes <= m.swap_total_bytes, "{m:?}");
            }
            // Wine's ntdll has no SystemPageFileInformation: the error must
            // name that call and say so, nothing else may fail.
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("SystemPageFileInformation"), "{text}");
                assert!(text.contains("0xc0000003"), "{text}");
            }
        }
    }

    #[test]
    fn processes_include_this_one() {
        assert!(process_count().unwrap() >= 1);
    }

    #[test]
    fn volumes() {
        let mounts = mounts().unwrap();
        // The Wine prefix's drive_c, or a real system drive.
        let c = mounts
            .iter()
            .find(|m| m.mount_point.eq_ignore_ascii_case("C:\\"))
            .unwrap_or_else(|| panic!("no C: in {mounts:?}"));
        assert_eq!(c.kind, FsKind::Local);
        assert!(!c.fs_type.is_empty() && !c.device.is_empty(), "{c:?}");
        let s = fs_stats(&c.mount_point).unwrap();
        assert!(s.total_bytes > 0, "{s:?}");
        assert!(
            s.used_bytes <= s.total_bytes && s.available_bytes <= s.total_bytes,
            "{s:?}"
        );
        assert!(fs_stats("Q:\\no\\such\\volume\\").is_err());
    }

    #[test]
    fn disks() {
        // Wine has no \\.\PhysicalDriveN: the list is empty there.
        let disks = disk_counters().unwrap();
        for d in &disks {
            let n: u32 = d
                .name
                .strip_prefix("PhysicalDrive")
                .unwrap()
                .parse()
                .unwrap();
            assert!(n < MAX_PHYSICAL_DRIVES);
        }
        assert_eq!(physical_drive(MAX_PHYSICAL_DRIVES + 1000), None);
    }

    #[test]
    fn drive_kinds() {
        assert_eq!(kind(DRIVE_FIXED), Some(FsKind::Local));
        assert_eq!(kind(DRIVE_REMOTE), Some(FsKind::Network));
        assert_eq!(kind(DRIVE_RAMDISK), Some(FsKind::Pseudo));
        assert_eq!(kind(0), None);
        assert_eq!(kind(1), None);
    }
}
