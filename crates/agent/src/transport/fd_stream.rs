//! A non-blocking file descriptor as an async byte stream (vsock sockets and
//! virtio-serial ports, which tokio has no type for).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Register an owned descriptor with the reactor.
pub(crate) fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is open and always returns the same descriptor
    // until it is dropped, which only the AsyncFd can do.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// `read(2)` into `buf`.
pub(crate) fn read_fd(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for writes of its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn write_fd(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for reads of its length.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// An async stream over a shared non-blocking descriptor. A `read` of 0
/// bytes is end of stream (for a virtio port: the host closed its side).
#[derive(Debug)]
pub(crate) struct FdStream {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// For a virtio-serial session: while a read waits, look at the port
    /// anyway this often (see [`FdStream::with_recheck`]).
    recheck: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl FdStream {
    /// Wrap a descriptor already registered with the reactor.
    pub(crate) fn new(fd: Arc<AsyncFd<OwnedFd>>) -> Self {
        Self { fd, recheck: None }
    }

    /// Like [`FdStream::new`], and while a read waits for readiness, try the
    /// read anyway every `period`. The VM suite saw a virtio-serial session
    /// stall about once in a few hundred host reconnects: data or the host's
    /// departure arrived and no readiness event followed. Until that lost
    /// wake-up is explained, a waiting read costs one system call per
    /// `period` instead of possibly waiting forever, and says when it
    /// recovered something.
    pub(crate) fn with_recheck(fd: Arc<AsyncFd<OwnedFd>>, period: Duration) -> Self {
        Self {
            fd,
            recheck: Some((period, Box::pin(tokio::time::sleep(period)))),
        }
    }

    /// A read that readiness did not announce: called when the recheck
    /// timer fires while a read is pending.
    fn poll_recheck(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some((period, sleep)) = &mut self.recheck else {
            return Poll::Pending;
        };
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            sleep.as_mut().reset(Instant::now() + *period);
            match read_fd(self.fd.get_ref(), buf.initialize_unfilled()) {
                Ok(n) => {
                    log::warn!(
                        "virtio-serial: a read found {} without a readiness event (lost wake-up recovered)",
                        if n == 0 { "the host gone".to_owned() } else { format!("{n} bytes") }
                    );
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = match this.fd.poll_read_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => return this.poll_recheck(cx, buf),
            };
            // tokio keeps "closed" readiness forever: once the peer is gone,
            // a would-block must end the stream, not spin.
            let closed = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| read_fd(fd.get_ref(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if closed => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            // A virtio port whose host left answers EAGAIN with HUP set, and
            // tokio never clears HUP: report the broken pipe instead of spinning.
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|fd| write_fd(fd.get_ref(), buf)) {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if closed => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
