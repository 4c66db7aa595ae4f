//! One-host ports on Windows: the virtio-serial port of virtio-win's vioser
//! driver (`virtio-serial[:NAME_OR_PATH]`) and the COM-port fallback
//! (`com:COMn`).
//!
//! **Opening.** `virtio-serial:NAME` opens `\\.\Global\NAME` (default
//! `org.kvmmanager.agent.0`, the name vioser gives the port the host
//! declared); `virtio-serial:PATH` with an absolute path (`\\...` or
//! `C:\...`) opens that path, which is how the tests put a named pipe in the
//! device's place. `com:COMn` opens `\\.\COMn` and sets it to 115200 baud,
//! 8 data bits, no parity, 1 stop bit, no flow control ([`com_dcb`]) with
//! read timeouts that block until a byte arrives and then return at the
//! first pause ([`com_timeouts`]). The device is opened exclusively (share
//! mode 0), like the Linux port: one agent, one host at a time.
//!
//! **Waiting.** While the device cannot be opened (the driver is not loaded
//! yet, no such port, or the previous holder still has it) the agent retries
//! with a growing delay, 100 ms doubling up to 5 s, and says so once. It
//! never spins: a session that ends without a byte from the host also makes
//! the next open wait for the next delay, so a device that fails at once
//! costs at most one open every 5 s.
//!
//! **Sessions.** A session starts when the device opens and ends when a
//! read or a write fails or reads end of stream (the pipe's server went
//! away; vioser's behaviour when the host closes its side is the driver's:
//! this needs a real guest to confirm), or when the agent drops the
//! connection. The handle is then closed and the device reopened for the
//! next host.
//!
//! **I/O.** tokio has no type for a Windows device handle, so each session
//! has two dedicated threads doing blocking overlapped I/O on the handle
//! (opened `FILE_FLAG_OVERLAPPED`, because on a synchronous handle Windows
//! serialises all I/O and a pending read would block every write): the
//! reader issues `ReadFile` and waits for it with `GetOverlappedResult`, the
//! writer likewise with `WriteFile`, so reads and writes proceed at the same
//! time. They are bridged to the async side through an in-memory
//! [`tokio::io::duplex`] pipe whose near end is the connection's stream.
//! When either side ends, `CancelIoEx` wakes the other thread; the next
//! session starts only after both threads have let go of the handle.

use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::runtime::Handle as Runtime;
use tokio::sync::mpsc;
use windows_sys::Win32::Devices::Communication::{
    GetCommState, PurgeComm, SetCommState, SetCommTimeouts, COMMTIMEOUTS, DCB, NOPARITY,
    ONESTOPBIT, PURGE_RXCLEAR, PURGE_TXCLEAR,
};
use windows_sys::Win32::Foundation::{
    GetLastError, ERROR_IO_PENDING, GENERIC_READ, GENERIC_WRITE, HANDLE, INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, ReadFile, WriteFile, FILE_FLAG_OVERLAPPED, FILE_SHARE_NONE, OPEN_EXISTING,
};
use windows_sys::Win32::System::Threading::CreateEventW;
use windows_sys::Win32::System::IO::{CancelIoEx, GetOverlappedResult, OVERLAPPED};

use super::{Connection, Peer};

/// The first delay between attempts to open an absent device.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The longest delay between attempts to open an absent device.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Bytes buffered between the device threads and the connection, each way.
const BRIDGE_BUFFER: usize = 64 * 1024;

/// A one-host port on Windows.
#[derive(Debug)]
pub struct PortTransport {
    kind: Kind,
    retry: Duration,
    /// The previous session: closes when both its threads are done, and
    /// whether the host sent anything during it.
    previous: Option<(mpsc::Receiver<()>, Arc<AtomicBool>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    VirtioSerial(String),
    Com(String),
}

impl PortTransport {
    /// A virtio-serial port given by name or absolute path.
    pub fn virtio_serial(name_or_path: &str) -> Self {
        Self::new(Kind::VirtioSerial(name_or_path.to_owned()))
    }

    /// A serial port, as in `COM2`.
    pub fn com(port: &str) -> Self {
        Self::new(Kind::Com(port.to_owned()))
    }

    fn new(kind: Kind) -> Self {
        Self {
            kind,
            retry: FIRST_RETRY,
            previous: None,
        }
    }

    fn device_path(&self) -> String {
        match &self.kind {
            Kind::VirtioSerial(n) => virtio_device_path(n),
            Kind::Com(p) => com_device_path(p),
        }
    }

    fn peer(&self, path: &str) -> Peer {
        match &self.kind {
            Kind::VirtioSerial(_) => Peer::VirtioSerial {
                port: PathBuf::from(path),
            },
            Kind::Com(p) => Peer::Com { port: p.clone() },
        }
    }

    fn next_retry(&mut self) -> Duration {
        let wait = self.retry;
        self.retry = (self.retry * 2).min(MAX_RETRY);
        wait
    }

    /// Open the device (waiting for it if need be) and hand over the
    /// session. Call again when the session has ended.
    pub async fn accept(&mut self) -> io::Result<Connection> {
        if let Some((mut done, heard)) = self.previous.take() {
            // Both threads drop their sender once they let go of the handle.
            let _ = done.recv().await;
            if heard.load(Ordering::Relaxed) {
                self.retry = FIRST_RETRY;
            } else {
                tokio::time::sleep(self.next_retry()).await;
            }
        }
        let path = self.device_path();
        let mut last_error: Option<i32> = None;
        loop {
            match open_device(&path).and_then(|h| self.prepare(h)) {
                Ok(handle) => {
                    log::info!("opened {path}");
                    let heard = Arc::new(AtomicBool::new(false));
                    let (stream, done) = start_session(handle, heard.clone())?;
                    self.previous = Some((done, heard));
                    return Ok(Connection {
                        stream: Box::new(stream),
                        initial: Vec::new(),
                        peer: self.peer(&path),
                    });
                }
                Err(e) => {
                    if last_error != e.raw_os_error() || last_error.is_none() {
                        log::info!("cannot open {path} ({e}); waiting for it");
                        last_error = Some(e.raw_os_error().unwrap_or(-1));
                    }
                    tokio::time::sleep(self.next_retry()).await;
                }
            }
        }
    }

    /// Port settings (COM only).
    fn prepare(&self, handle: OwnedHandle) -> io::Result<OwnedHandle> {
        if let Kind::Com(_) = self.kind {
            configure_com(&handle)?;
        }
        Ok(handle)
    }
}

impl super::SessionSource for PortTransport {
    async fn accept(&mut self) -> io::Result<Connection> {
        PortTransport::accept(self).await
    }
}

/// The device path for `virtio-serial:NAME_OR_PATH`.
pub fn virtio_device_path(name_or_path: &str) -> String {
    let b = name_or_path.as_bytes();
    let drive = b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && b[2] == b'\\';
    if name_or_path.starts_with(r"\\") || drive {
        name_or_path.to_owned()
    } else {
        format!(r"\\.\Global\{name_or_path}")
    }
}

/// The device path for `com:COMn` (`\\.\` is required from COM10 on and
/// harmless below).
pub fn com_device_path(port: &str) -> String {
    format!(r"\\.\{port}")
}

/// `dcb` (as `GetCommState` returned it) set to 115200 8N1, binary, no
/// parity check, no hardware or software flow control, DTR and RTS on.
pub fn com_dcb(mut dcb: DCB) -> DCB {
    // The DCB bit field, least significant first: fBinary, fParity,
    // fOutxCtsFlow, fOutxDsrFlow, fDtrControl (2 bits), fDsrSensitivity,
    // fTXContinueOnXoff, fOutX, fInX, fErrorChar, fNull, fRtsControl
    // (2 bits), fAbortOnError, 17 reserved bits.
    const F_BINARY: u32 = 1 << 0;
    const DTR_CONTROL_ENABLE: u32 = 1 << 4;
    const RTS_CONTROL_ENABLE: u32 = 1 << 12;
    const RESERVED: u32 = !((1 << 15) - 1);
    dcb.DCBlength = std::mem::size_of::<DCB>() as u32;
    dcb.BaudRate = 115_200;
    dcb._bitfield = (dcb._bitfield & RESERVED) | F_BINARY | DTR_CONTROL_ENABLE | RTS_CONTROL_ENABLE;
    dcb.ByteSize = 8;
    dcb.Parity = NOPARITY;
    dcb.StopBits = ONESTOPBIT;
    dcb
}

/// Read: wait as long as it takes for the first byte (no periodic
/// wake-ups), then return once the line has been quiet for 10 ms (at
/// 115200 baud a byte takes under 0.1 ms). Write: give up after 5 s plus
/// 1 ms per byte, so a port nobody drains cannot hold a session forever.
pub fn com_timeouts() -> COMMTIMEOUTS {
    COMMTIMEOUTS {
        ReadIntervalTimeout: 10,
        ReadTotalTimeoutMultiplier: 0,
        ReadTotalTimeoutConstant: 0,
        WriteTotalTimeoutMultiplier: 1,
        WriteTotalTimeoutConstant: 5000,
    }
}

fn configure_com(handle: &OwnedHandle) -> io::Result<()> {
    let h = handle.as_raw_handle() as HANDLE;
    // SAFETY: DCB is plain data; all zeroes is a valid value to fill in.
    let mut dcb: DCB = unsafe { std::mem::zeroed() };
    dcb.DCBlength = std::mem::size_of::<DCB>() as u32;
    // SAFETY: a valid handle and a valid DCB to write to.
    if unsafe { GetCommState(h, &mut dcb) } == 0 {
        return Err(io::Error::last_os_error());
    }
    let dcb = com_dcb(dcb);
    // SAFETY: a valid handle and DCB.
    if unsafe { SetCommState(h, &dcb) } == 0 {
        return Err(io::Error::last_os_error());
    }
    let timeouts = com_timeouts();
    // SAFETY: a valid handle and COMMTIMEOUTS.
    if unsafe { SetCommTimeouts(h, &timeouts) } == 0 {
        return Err(io::Error::last_os_error());
    }
    // Whatever an earlier session left in the buffers is not for this one.
    // SAFETY: a valid handle; failure only leaves stale bytes.
    unsafe { PurgeComm(h, PURGE_RXCLEAR | PURGE_TXCLEAR) };
    Ok(())
}

fn open_device(path: &str) -> io::Result<OwnedHandle> {
    let wide: Vec<u16> = path.encode_utf16().chain(Some(0)).collect();
    // SAFETY: a NUL-terminated UTF-16 path; no security attributes or
    // template; the result is checked.
    let h = unsafe {
        CreateFileW(
            wide.as_ptr(),
            GENERIC_READ | GENERIC_WRITE,
            FILE_SHARE_NONE,
            std::ptr::null(),
            OPEN_EXISTING,
            FILE_FLAG_OVERLAPPED,
            std::ptr::null_mut(),
        )
    };
    if h == INVALID_HANDLE_VALUE {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh handle that we own.
    Ok(unsafe { OwnedHandle::from_raw_handle(h) })
}

/// What the two threads of a session share.
struct Device {
    handle: OwnedHandle,
    /// Set by the thread that ends first; the other stops at its next look.
    closing: AtomicBool,
    /// Set when the reader has returned (no read pending any more).
    reader_done: AtomicBool,
}

impl Device {
    fn raw(&self) -> HANDLE {
        self.handle.as_raw_handle() as HANDLE
    }

    /// Stop the other thread: cancel whatever I/O is pending on the handle.
    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        // SAFETY: a valid handle; cancelling nothing is harmless.
        unsafe { CancelIoEx(self.raw(), std::ptr::null()) };
    }
}

/// Start the reader and writer threads of a session. Returns the
/// connection's end of the bridge, and a receiver that closes when both
/// threads are done with the handle.
fn start_session(
    handle: OwnedHandle,
    heard: Arc<AtomicBool>,
) -> io::Result<(DuplexStream, mpsc::Receiver<()>)> {
    let runtime = Runtime::current();
    let device = Arc::new(Device {
        handle,
        closing: AtomicBool::new(false),
        reader_done: AtomicBool::new(false),
    });
    let (near, far) = tokio::io::duplex(BRIDGE_BUFFER);
    let (far_read, far_write) = tokio::io::split(far);
    let (done_tx, done_rx) = mpsc::channel::<()>(1);
    {
        let (device, runtime, done) = (device.clone(), runtime.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name("kva-port-read".into())
            .spawn(move || {
                read_loop(&device, far_write, &runtime, &heard);
                device.reader_done.store(true, Ordering::SeqCst);
                drop(device);
                drop(done);
            })?;
    }
    let writer = {
        let device = device.clone();
        std::thread::Builder::new()
            .name("kva-port-write".into())
            .spawn(move || {
                write_loop(&device, far_read, &runtime);
                // The reader may have checked `closing` just before we set
                // it, and then started a read: cancel until it is gone.
                while !device.reader_done.load(Ordering::SeqCst) {
                    device.close();
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(device);
                drop(done_tx);
            })
    };
    if let Err(e) = writer {
        // The reader must not wait for a host forever on a session nobody uses.
        device.close();
        return Err(e);
    }
    Ok((near, done_rx))
}

fn read_loop(
    device: &Device,
    mut bridge: WriteHalf<DuplexStream>,
    runtime: &Runtime,
    heard: &AtomicBool,
) {
    let mut buf = vec![0u8; BRIDGE_BUFFER];
    match Event::new() {
        Ok(event) => loop {
            if device.closing.load(Ordering::SeqCst) {
                break;
            }
            let len = buf.len() as u32;
            let ptr = buf.as_mut_ptr();
            // SAFETY: `buf` and the OVERLAPPED outlive the operation:
            // `overlapped` waits for its completion (or cancellation).
            let read = overlapped(device.raw(), &event, |ov| unsafe {
                ReadFile(device.raw(), ptr, len, std::ptr::null_mut(), ov)
            });
            match read {
                Ok(0) => {
                    log::debug!("port: end of stream");
                    break;
                }
                Ok(n) => {
                    heard.store(true, Ordering::Relaxed);
                    if runtime.block_on(bridge.write_all(&buf[..n])).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    log::debug!("port: read ended: {e}");
                    break;
                }
            }
        },
        Err(e) => log::error!("port: cannot create an event: {e}"),
    }
    // The connection reads end of stream; the writer stops too.
    let _ = runtime.block_on(bridge.shutdown());
    device.close();
}

fn write_loop(device: &Device, mut bridge: ReadHalf<DuplexStream>, runtime: &Runtime) {
    let event = match Event::new() {
        Ok(e) => e,
        Err(e) => {
            log::error!("port: cannot create an event: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; BRIDGE_BUFFER];
    'session: loop {
        let n = match runtime.block_on(bridge.read(&mut buf)) {
            Ok(0) | Err(_) => break, // the connection is gone
            Ok(n) => n,
        };
        let mut sent = 0;
        while sent < n {
            if device.closing.load(Ordering::SeqCst) {
                break 'session;
            }
            let chunk = &buf[sent..n];
            // SAFETY: `buf` and the OVERLAPPED outlive the operation:
            // `overlapped` waits for its completion (or cancellation).
            let wrote = overlapped(device.raw(), &event, |ov| unsafe {
                WriteFile(
                    device.raw(),
                    chunk.as_ptr(),
                    chunk.len() as u32,
                    std::ptr::null_mut(),
                    ov,
                )
            });
            match wrote {
                Ok(0) => {
                    log::debug!("port: write timed out");
                    break 'session;
                }
                Ok(k) => sent += k,
                Err(e) => {
                    log::debug!("port: write failed: {e}");
                    break 'session;
                }
            }
        }
    }
    device.close();
}

/// A manual-reset event for overlapped I/O.
struct Event(OwnedHandle);

impl Event {
    fn new() -> io::Result<Self> {
        // SAFETY: no security attributes, no name; the result is checked.
        let h = unsafe { CreateEventW(std::ptr::null(), 1, 0, std::ptr::null()) };
        if h.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh handle that we own.
        Ok(Self(unsafe { OwnedHandle::from_raw_handle(h) }))
    }
}

/// Start an overlapped operation with `start` and wait for it to finish.
/// Returns the bytes transferred.
fn overlapped(
    handle: HANDLE,
    event: &Event,
    start: impl FnOnce(*mut OVERLAPPED) -> windows_sys::core::BOOL,
) -> io::Result<usize> {
    let mut ov = OVERLAPPED {
        hEvent: event.0.as_raw_handle() as HANDLE,
        ..Default::default()
    };
    if start(&mut ov) == 0 {
        // SAFETY: reads the calling thread's last error.
        let e = unsafe { GetLastError() };
        if e != ERROR_IO_PENDING {
            return Err(io::Error::from_raw_os_error(e as i32));
        }
    }
    let mut n = 0u32;
    // SAFETY: `ov` is the operation's OVERLAPPED; waiting (bWait = TRUE)
    // means it is complete when this returns, success or not.
    if unsafe { GetOverlappedResult(handle, &ov, &mut n, 1) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths() {
        assert_eq!(
            virtio_device_path("org.kvmmanager.agent.0"),
            r"\\.\Global\org.kvmmanager.agent.0"
        );
        assert_eq!(virtio_device_path(r"\\.\pipe\x"), r"\\.\pipe\x");
        assert_eq!(virtio_device_path(r"C:\dev\port"), r"C:\dev\port");
        assert_eq!(com_device_path("COM2"), r"\\.\COM2");
        assert_eq!(com_device_path("COM12"), r"\\.\COM12");
    }

    #[test]
    fn com_is_115200_8n1_without_flow_control() {
        // SAFETY: DCB is plain data.
        let mut before: DCB = unsafe { std::mem::zeroed() };
        // Whatever the driver had: odd parity, CTS/DSR/XON flow control,
        // DTR handshake, abort on error, and a reserved bit that must stay.
        before.BaudRate = 9600;
        before.ByteSize = 7;
        before.Parity = 1;
        before.StopBits = 2;
        before._bitfield = 0b0111_1111_1111_1110 | (1 << 20);
        let dcb = com_dcb(before);
        assert_eq!(dcb.DCBlength as usize, std::mem::size_of::<DCB>());
        assert_eq!(dcb.BaudRate, 115_200);
        assert_eq!(
            (dcb.ByteSize, dcb.Parity, dcb.StopBits),
            (8, NOPARITY, ONESTOPBIT)
        );
        let bit = |n: u32| dcb._bitfield >> n & 1;
        assert_eq!(bit(0), 1, "fBinary");
        assert_eq!(bit(1), 0, "fParity");
        assert_eq!((bit(2), bit(3)), (0, 0), "no CTS/DSR output flow control");
        assert_eq!(dcb._bitfield >> 4 & 3, 1, "DTR_CONTROL_ENABLE");
        assert_eq!(bit(6), 0, "fDsrSensitivity");
        assert_eq!((bit(8), bit(9)), (0, 0), "no XON/XOFF");
        assert_eq!((bit(10), bit(11)), (0, 0), "no error char, NULs kept");
        assert_eq!(dcb._bitfield >> 12 & 3, 1, "RTS_CONTROL_ENABLE");
        assert_eq!(bit(14), 0, "fAbortOnError");
        assert_eq!(bit(20), 1, "reserved bits left alone");
    }

    #[test]
    fn com_reads_block_for_the_first_byte_and_writes_give_up() {
        let t = com_timeouts();
        // A positive interval with zero totals: the read waits for the first
        // byte without a deadline, then returns at the first 10 ms pause.
        // (MAXDWORD interval with zero totals would return at once: a spin.)
        assert_eq!(t.ReadIntervalTimeout, 10);
        assert_eq!(
            (t.ReadTotalTimeoutMultiplier, t.ReadTotalTimeoutConstant),
            (0, 0)
        );
        assert!(t.WriteTotalTimeoutConstant > 0, "writes have a deadline");
    }

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let mut t = PortTransport::virtio_serial("x");
        let waits: Vec<_> = (0..8).map(|_| t.next_retry()).collect();
        assert_eq!(waits[0], FIRST_RETRY);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*waits.last().unwrap(), MAX_RETRY);
    }
}
