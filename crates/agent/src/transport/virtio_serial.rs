//! The guest side of a virtio-serial port (`virtio-serial[:NAME_OR_PATH]`).
//!
//! A port is a character device that stays open across host sessions. How it
//! behaves (see the virtio_console driver):
//!
//! | host side        | poll()      | read()            | write()  |
//! |------------------|-------------|-------------------|----------|
//! | not connected    | IN+HUP      | 0 at once         | EAGAIN   |
//! | connected, idle  | OUT         | EAGAIN            | works    |
//! | data arriving    | IN+OUT      | data              | works    |
//!
//! So `read() == 0` means "no host right now", not end of file, and HUP stays
//! set for as long as no host is attached. Level-triggered polling would spin,
//! and tokio treats HUP as final, so the port is watched through a private
//! edge-triggered epoll instance: it reports a change (host connects, data
//! arrives) once, and is quiet otherwise. While no host is attached the agent
//! sleeps in the kernel: no timer, no wake-ups.
//!
//! Each host session gets its own registration of the port with tokio (a
//! `dup` of the descriptor), dropped when the host leaves.
//!
//! The device may not exist yet when the agent starts (the driver loads late,
//! or udev has not made the symlink): the agent waits for it with inotify on
//! `/dev` and picks it up when it appears.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::fd_stream::{read_fd, register, FdStream};
use super::{Connection, Peer};

/// How long to wait between looks for the device when inotify says nothing
/// (a safety net; inotify normally reports the device at once).
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);

/// How often a waiting read of a host session looks at the port anyway
/// (see `FdStream::with_recheck`).
const SESSION_RECHECK: Duration = Duration::from_secs(1);

/// A virtio-serial port, opened when it appears.
#[derive(Debug)]
pub struct VirtioSerialTransport {
    name_or_path: String,
    port: Option<Port>,
}

#[derive(Debug)]
struct Port {
    path: PathBuf,
    fd: OwnedFd,
    /// Private edge-triggered epoll watching `fd`, itself watched by tokio.
    watch: AsyncFd<OwnedFd>,
}

impl VirtioSerialTransport {
    /// A port given by name (`org.kvmmanager.agent.0`) or device path.
    pub fn new(name_or_path: &str) -> Self {
        Self {
            name_or_path: name_or_path.to_owned(),
            port: None,
        }
    }

    /// Wait until a host opens its side of the port, and hand over the
    /// session. Call again when the session has ended.
    pub async fn accept(&mut self) -> io::Result<Connection> {
        loop {
            if self.port.is_none() {
                self.port = Some(open_when_present(&self.name_or_path).await?);
            }
            let port = self.port.as_ref().expect("just opened");
            match port.wait_for_host().await {
                Ok(initial) => {
                    // SAFETY: dup of a descriptor we own; the result is checked.
                    let raw = unsafe { libc::fcntl(port.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
                    if raw < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // SAFETY: a fresh descriptor we own.
                    let session_fd = unsafe { OwnedFd::from_raw_fd(raw) };
                    let fd = Arc::new(register(
                        session_fd,
                        Interest::READABLE | Interest::WRITABLE,
                    )?);
                    log::info!("host connected on {}", port.path.display());
                    return Ok(Connection {
                        stream: Box::new(FdStream::with_recheck(fd, SESSION_RECHECK)),
                        initial,
                        peer: Peer::VirtioSerial {
                            port: port.path.clone(),
                        },
                    });
                }
                Err(e) => {
                    log::warn!(
                        "virtio-serial port {} failed ({e}); waiting for it to come back",
                        port.path.display()
                    );
                    self.port = None;
                }
            }
        }
    }
}

impl super::SessionSource for VirtioSerialTransport {
    async fn accept(&mut self) -> io::Result<Connection> {
        VirtioSerialTransport::accept(self).await
    }
}

impl Port {
    fn open(path: &Path) -> io::Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in device path"))?;
        // SAFETY: a valid C string and flags; the result is checked.
        let raw = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let watch = edge_triggered_watch(&fd)?;
        Ok(Self {
            path: path.to_owned(),
            fd,
            watch,
        })
    }

    /// Returns when a host is attached, with whatever it already sent.
    async fn wait_for_host(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut said = false;
        loop {
            match read_fd(&self.fd, &mut buf) {
                Ok(0) if !said => {
                    log::info!("waiting for a host on {}", self.path.display());
                    said = true;
                }
                Ok(0) => {}
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Vec::new()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            // No host: sleep until the port's state changes.
            let mut guard = self.watch.readable().await?;
            drain_epoll(self.watch.get_ref())?;
            guard.clear_ready();
        }
    }
}

/// An epoll instance with `fd` registered edge-triggered, wrapped for tokio.
fn edge_triggered_watch(fd: &OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: plain epoll_create1; the result is checked.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: both descriptors are open; `event` is valid.
    if unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            &mut event,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    register(epoll, Interest::READABLE)
}

fn drain_epoll(epoll: &OwnedFd) -> io::Result<()> {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
    loop {
        // SAFETY: `events` is writable for its length; timeout 0 never blocks.
        let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), events.as_mut_ptr(), 4, 0) };
        match n {
            0 => return Ok(()),
            n if n > 0 => continue,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// The device path for a port name or path, if the device exists now.
pub fn resolve(name_or_path: &str) -> Option<PathBuf> {
    resolve_in(
        name_or_path,
        Path::new("/dev"),
        Path::new("/sys/class/virtio-ports"),
    )
}

fn resolve_in(name_or_path: &str, dev: &Path, sysfs: &Path) -> Option<PathBuf> {
    if name_or_path.starts_with('/') {
        let p = PathBuf::from(name_or_path);
        return p.exists().then_some(p);
    }
    let by_name = dev.join("virtio-ports").join(name_or_path);
    if by_name.exists() {
        return Some(by_name);
    }
    // Without udev there is no symlink: find the vportNpM whose name matches.
    let mut entries: Vec<_> = std::fs::read_dir(sysfs).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|entry| {
        let name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        let node = dev.join(entry.file_name());
        (name.trim_end() == name_or_path && node.exists()).then_some(node)
    })
}

/// Open the port, waiting for it to appear first if need be.
async fn open_when_present(name_or_path: &str) -> io::Result<Port> {
    let mut announced = false;
    let mut name_wait = NAME_WAIT;
    let mut name_waited = Duration::ZERO;
    let watcher = DevWatcher::new();
    loop {
        // Whether some port still waits for its name, asked *before* looking
        // for ours: a name that arrives between the two looks is then either
        // seen by `resolve` or makes this true. (Asked the other way round, a
        // name arriving in between left the agent in the long wait below,
        // with nothing in /dev to wake it.)
        let unnamed = !name_or_path.starts_with('/') && unnamed_ports(Path::new(SYSFS_PORTS));
        if let Some(path) = resolve(name_or_path) {
            match Port::open(&path) {
                Ok(port) => {
                    log::info!("opened virtio-serial port {}", path.display());
                    return Ok(port);
                }
                Err(e) => log::warn!("cannot open {}: {e}; will retry", path.display()),
            }
        } else if !announced {
            log::info!("virtio-serial port {name_or_path} is not there yet; waiting for it");
            announced = true;
        }
        // A port's device node appears before the host has told the guest
        // its name (a separate control message; without udev nothing in
        // /dev changes when it arrives). While some port is still unnamed,
        // look again soon, then less and less often, for a bounded while.
        let wait = if unnamed && name_waited < NAME_WAIT_TOTAL {
            let wait = name_wait;
            name_waited += wait;
            name_wait = (name_wait * 3 / 2).min(NAME_WAIT_MAX);
            wait
        } else {
            RESCAN_INTERVAL
        };
        let woken = match &watcher {
            Ok(w) => w.wait(wait).await,
            Err(_) => {
                tokio::time::sleep(wait).await;
                Wake::Timer
            }
        };
        // The vm suite reads these to check that a port which appears is
        // found through an event, not by the safety net.
        let why = match woken {
            Wake::Event => "something changed in /dev",
            Wake::Timer if wait == RESCAN_INTERVAL => "safety net: nothing changed in /dev",
            Wake::Timer => "a port's name may have arrived",
        };
        log::debug!("looking for virtio-serial port {name_or_path} again ({why})");
    }
}

/// What ended a wait for the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Something changed in the watched directories.
    Event,
    /// The wait's time ran out.
    Timer,
}

/// Where the kernel lists virtio-serial ports.
const SYSFS_PORTS: &str = "/sys/class/virtio-ports";

/// How long to wait for a port's name to arrive, at the first look; each
/// next look waits half as long again, up to [`NAME_WAIT_MAX`].
const NAME_WAIT: Duration = Duration::from_millis(100);

/// The longest wait between looks for a port's name.
const NAME_WAIT_MAX: Duration = Duration::from_secs(2);

/// Looks for names while a port is unnamed for this long in all (about 25
/// looks): a slow guest (TCG under load) may take seconds to get the name,
/// and a port the host never names must not keep the agent awake.
const NAME_WAIT_TOTAL: Duration = Duration::from_secs(40);

/// Whether a port exists whose name the host has not sent yet (the driver
/// creates the `name` attribute only when the name arrives).
fn unnamed_ports(sysfs: &Path) -> bool {
    std::fs::read_dir(sysfs).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            std::fs::read_to_string(e.path().join("name"))
                .map_or(true, |n| matches!(n.trim(), "" | "(null)"))
        })
    })
}

/// inotify on `/dev` and `/dev/virtio-ports`: wakes when device nodes or
/// udev's symlinks appear.
struct DevWatcher {
    fd: AsyncFd<OwnedFd>,
}

impl DevWatcher {
    fn new() -> io::Result<Self> {
        // SAFETY: plain inotify_init1; the result is checked.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            log::warn!("inotify unavailable ({e}); looking for the port every {RESCAN_INTERVAL:?}");
            return Err(e);
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let w = Self {
            fd: register(fd, Interest::READABLE)?,
        };
        w.add_watches();
        Ok(w)
    }

    fn add_watches(&self) {
        for dir in [c"/dev", c"/dev/virtio-ports"] {
            // SAFETY: valid C strings; failure (directory absent) is fine.
            unsafe {
                libc::inotify_add_watch(
                    self.fd.get_ref().as_raw_fd(),
                    dir.as_ptr(),
                    libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB,
                );
            }
        }
    }

    /// Wait for a change in the watched directories, or `limit`.
    async fn wait(&self, limit: Duration) -> Wake {
        match tokio::time::timeout(limit, self.fd.readable()).await {
            Ok(Ok(mut guard)) => {
                let mut buf = [0u8; 4096];
                while read_fd(self.fd.get_ref(), &mut buf).is_ok_and(|n| n > 0) {}
                guard.clear_ready();
                // /dev/virtio-ports may have just been created.
                self.add_watches();
                Wake::Event
            }
            // The registration failed (not expected): wait out the time
            // rather than look again at once.
            Ok(Err(_)) => {
                tokio::time::sleep(limit).await;
                Wake::Timer
            }
            Err(_) => Wake::Timer,
        }
    }
}

impl std::fmt::Debug for DevWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevWatcher").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_by_udev_symlink_then_by_sysfs_name() {
        let root = std::env::temp_dir().join(format!("kva-vport-{}", std::process::id()));
        let dev = root.join("dev");
        let sys = root.join("sys");
        std::fs::create_dir_all(dev.join("virtio-ports")).unwrap();
        for (port, name) in [
            ("vport0p1", "org.qemu.guest_agent.0"),
            ("vport1p1", "org.kvmmanager.agent.0"),
        ] {
            std::fs::create_dir_all(sys.join(port)).unwrap();
            std::fs::write(sys.join(port).join("name"), format!("{name}\n")).unwrap();
            std::fs::write(dev.join(port), "").unwrap();
        }
        assert_eq!(
            resolve_in("org.kvmmanager.agent.0", &dev, &sys),
            Some(dev.join("vport1p1"))
        );
        assert_eq!(resolve_in("org.example.absent", &dev, &sys), None);
        assert!(!unnamed_ports(&sys));
        std::fs::create_dir_all(sys.join("vport2p1")).unwrap();
        std::fs::write(sys.join("vport2p1").join("name"), "\n").unwrap();
        assert!(unnamed_ports(&sys), "a port whose name has not arrived");
        std::fs::write(dev.join("virtio-ports/org.kvmmanager.agent.0"), "").unwrap();
        assert_eq!(
            resolve_in("org.kvmmanager.agent.0", &dev, &sys),
            Some(dev.join("virtio-ports/org.kvmmanager.agent.0"))
        );
        let explicit = dev.join("vport0p1");
        assert_eq!(
            resolve_in(explicit.to_str().unwrap(), &dev, &sys),
            Some(explicit)
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
