//! An AF_VSOCK listener (`vsock:PORT`): hosts connect to the guest's CID on
//! this port, several at once. Only the host (CID 2) is served: processes in
//! the guest itself could otherwise connect through vsock's loopback
//! transport and act with the agent's privileges.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::fd_stream::{register, FdStream};
use super::{Connection, Peer};

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockTransport {
    fd: AsyncFd<OwnedFd>,
    port: u32,
}

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

impl VsockTransport {
    /// Listen on `port` for any CID.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = sockaddr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen on a bound socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd: register(fd, Interest::READABLE)?,
            port,
        })
    }

    /// The port listened on.
    pub fn port(&self) -> u32 {
        self.port
    }

    async fn accept_one(&self) -> io::Result<Connection> {
        loop {
            let mut guard = self.fd.readable().await?;
            let accepted = guard.try_io(|fd| {
                let mut addr = sockaddr(0, 0);
                let mut len = size_of::<libc::sockaddr_vm>() as libc::socklen_t;
                // SAFETY: `addr`/`len` describe a writable sockaddr_vm.
                let raw = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        (&mut addr as *mut libc::sockaddr_vm).cast(),
                        &mut len,
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if raw < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    // SAFETY: accept4 returned a fresh descriptor we own.
                    Ok((unsafe { OwnedFd::from_raw_fd(raw) }, addr))
                }
            });
            match accepted {
                Ok(Ok((fd, addr))) if addr.svm_cid != libc::VMADDR_CID_HOST => {
                    // Guest-local processes can reach a vsock listener
                    // through the loopback transport: only the host may talk
                    // to the agent this way.
                    log::warn!(
                        "vsock: refusing a connection from cid {} port {}: only the host (cid {}) is served",
                        addr.svm_cid,
                        addr.svm_port,
                        libc::VMADDR_CID_HOST
                    );
                    drop(fd);
                }
                Ok(Ok((fd, addr))) => {
                    let fd = Arc::new(register(fd, Interest::READABLE | Interest::WRITABLE)?);
                    return Ok(Connection {
                        stream: Box::new(FdStream::new(fd)),
                        initial: Vec::new(),
                        peer: Peer::Vsock {
                            cid: addr.svm_cid,
                            port: addr.svm_port,
                        },
                    });
                }
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }
}

impl super::Listener for VsockTransport {
    async fn accept(&self) -> io::Result<Connection> {
        self.accept_one().await
    }
}
