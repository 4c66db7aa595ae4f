//! Opening the byte stream to a [`Target`]: unix sockets, AF_VSOCK, and the
//! hybrid-vsock `CONNECT` handshake.

use std::io;
use std::pin::Pin;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::error::ClientError;
use crate::target::Target;

/// A connected byte stream to the agent.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A boxed [`Stream`].
pub(crate) type BoxStream = Pin<Box<dyn Stream>>;

/// Longest `OK ...` line accepted from a hybrid-vsock multiplexer.
const MAX_HANDSHAKE_LINE: usize = 256;

/// Open the stream. No timeout here: the caller bounds the whole set-up.
pub(crate) async fn connect(target: &Target) -> Result<BoxStream, ClientError> {
    let connect_err = |source: io::Error| ClientError::Connect {
        target: target.clone(),
        source,
    };
    match target {
        Target::Unix(path) => {
            let s = unix_connect(path).await.map_err(connect_err)?;
            Ok(Box::pin(s))
        }
        Target::HybridVsock { path, port } => {
            let s = unix_connect(path).await.map_err(connect_err)?;
            let s = hybrid_handshake(s, *port).await.map_err(connect_err)?;
            Ok(Box::pin(s))
        }
        Target::Vsock { cid, port } => vsock_connect(target, *cid, *port).await,
        Target::Pipe(name) => {
            let s = pipe_connect(name).await.map_err(connect_err)?;
            Ok(Box::pin(s))
        }
    }
}

/// Open a named pipe, waiting while all its instances are busy (the agent
/// creates the next instance right after a client connects).
#[cfg(windows)]
async fn pipe_connect(name: &str) -> io::Result<tokio::net::windows::named_pipe::NamedPipeClient> {
    const ERROR_PIPE_BUSY: i32 = 231;
    loop {
        match tokio::net::windows::named_pipe::ClientOptions::new().open(name) {
            Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

/// Named pipes are a Windows thing: elsewhere the connect fails with
/// `Unsupported`.
#[cfg(not(windows))]
async fn pipe_connect(_name: &str) -> io::Result<tokio::io::DuplexStream> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "named pipe targets are only supported on Windows",
    ))
}

#[cfg(unix)]
async fn unix_connect(path: &std::path::Path) -> io::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::connect(path).await
}

/// Unix sockets (and hybrid vsock, which goes through one) are not available
/// to this client on other hosts: the connect fails with `Unsupported`.
#[cfg(not(unix))]
async fn unix_connect(_path: &std::path::Path) -> io::Result<tokio::io::DuplexStream> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "unix socket targets are only supported on unix hosts",
    ))
}

/// Run the hybrid-vsock handshake on `stream`: send `CONNECT <port>\n`, read
/// exactly one line, which must start with `OK `. Reads byte by byte so that
/// nothing after the line (the agent's first frame) is consumed.
pub(crate) async fn hybrid_handshake<S>(mut stream: S, port: u32) -> io::Result<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    stream.flush().await?;
    let mut line = Vec::with_capacity(32);
    {
        // A BufReader over a one-byte buffer never reads past the newline.
        let mut reader = BufReader::with_capacity(1, &mut stream);
        loop {
            let buf = reader.fill_buf().await?;
            let Some(&b) = buf.first() else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "hybrid vsock: connection closed during the handshake for port {port} \
                         (is the agent listening on that port?)"
                    ),
                ));
            };
            reader.consume(1);
            if b == b'\n' {
                break;
            }
            line.push(b);
            if line.len() > MAX_HANDSHAKE_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "hybrid vsock: handshake reply line too long",
                ));
            }
        }
    }
    let text = String::from_utf8_lossy(&line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    if text.starts_with("OK ") && text.len() > 3 {
        Ok(stream)
    } else {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock: CONNECT {port} answered {text:?}, expected \"OK <port>\""),
        ))
    }
}

#[cfg(not(target_os = "linux"))]
async fn vsock_connect(_target: &Target, _cid: u32, _port: u32) -> Result<BoxStream, ClientError> {
    Err(ClientError::Unsupported(
        "vsock targets are only supported on Linux hosts".into(),
    ))
}

#[cfg(target_os = "linux")]
async fn vsock_connect(target: &Target, cid: u32, port: u32) -> Result<BoxStream, ClientError> {
    let s = vsock::VsockStream::connect(cid, port)
        .await
        .map_err(|source| ClientError::Connect {
            target: target.clone(),
            source,
        })?;
    Ok(Box::pin(s))
}

#[cfg(target_os = "linux")]
mod vsock {
    //! A non-blocking AF_VSOCK stream driven by tokio's `AsyncFd`.

    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::pin::Pin;
    use std::task::{ready, Context, Poll};

    use tokio::io::unix::AsyncFd;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    #[derive(Debug)]
    pub(super) struct VsockStream {
        fd: AsyncFd<OwnedFd>,
    }

    impl VsockStream {
        pub(super) async fn connect(cid: u32, port: u32) -> io::Result<Self> {
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
            // SAFETY: `raw` is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
            let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            addr.svm_cid = cid;
            addr.svm_port = port;
            // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            };
            // SAFETY: the AsyncFd owns `fd`, so the descriptor stays open for
            // as long as it is registered.
            let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINPROGRESS) {
                    return Err(err);
                }
                // Wait for the connection to complete, then read its outcome.
                let mut guard = fd.writable().await?;
                guard.retain_ready();
                let mut so_error: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: the out pointers point at live locals of the right size.
                let rc = unsafe {
                    libc::getsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        std::ptr::addr_of_mut!(so_error).cast(),
                        &mut len,
                    )
                };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                if so_error != 0 {
                    return Err(io::Error::from_raw_os_error(so_error));
                }
            }
            Ok(Self { fd })
        }
    }

    impl AsyncRead for VsockStream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            loop {
                let mut guard = ready!(self.fd.poll_read_ready(cx))?;
                let unfilled = buf.initialize_unfilled();
                let res = guard.try_io(|fd| {
                    // SAFETY: `unfilled` is a valid writable buffer of that length.
                    let n = unsafe {
                        libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                    };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                });
                match res {
                    Ok(Ok(n)) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Ok(Err(e)) => return Poll::Ready(Err(e)),
                    Err(_would_block) => continue,
                }
            }
        }
    }

    impl AsyncWrite for VsockStream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            loop {
                let mut guard = ready!(self.fd.poll_write_ready(cx))?;
                let res = guard.try_io(|fd| {
                    // SAFETY: `data` is a valid readable buffer of that length.
                    let n = unsafe {
                        libc::send(
                            fd.as_raw_fd(),
                            data.as_ptr().cast(),
                            data.len(),
                            libc::MSG_NOSIGNAL,
                        )
                    };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                });
                match res {
                    Ok(r) => return Poll::Ready(r),
                    Err(_would_block) => continue,
                }
            }
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            // SAFETY: shutdown(2) on a descriptor we own.
            let rc = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
            if rc < 0 {
                Poll::Ready(Err(io::Error::last_os_error()))
            } else {
                Poll::Ready(Ok(()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Plays the VMM side: reads the CONNECT line, answers `reply`, then
    /// sends `after` (what the guest would send first).
    async fn multiplexer(
        mut server: tokio::io::DuplexStream,
        reply: &'static [u8],
        after: &'static [u8],
    ) -> String {
        let mut line = Vec::new();
        loop {
            let b = server.read_u8().await.unwrap();
            if b == b'\n' {
                break;
            }
            line.push(b);
        }
        server.write_all(reply).await.unwrap();
        server.write_all(after).await.unwrap();
        // Keep the stream open until the client is done reading.
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest).await;
        String::from_utf8(line).unwrap()
    }

    #[tokio::test]
    async fn handshake_accepts_ok_and_keeps_following_bytes() {
        let (client, server) = tokio::io::duplex(1024);
        let vmm = tokio::spawn(multiplexer(server, b"OK 1073741824\n", b"guest"));
        let mut s = hybrid_handshake(client, 52).await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"guest");
        drop(s);
        assert_eq!(vmm.await.unwrap(), "CONNECT 52");
    }

    #[tokio::test]
    async fn handshake_rejects_anything_but_ok() {
        for reply in [&b"ERR no listener\n"[..], b"OK\n", b"ok 5\n", b""] {
            let (client, server) = tokio::io::duplex(1024);
            let vmm = tokio::spawn(async move {
                let mut server = server;
                let mut line = [0u8; 11];
                server.read_exact(&mut line).await.unwrap();
                server.write_all(reply).await.unwrap();
                drop(server);
            });
            let err = hybrid_handshake(client, 52).await.unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::UnexpectedEof
                ),
                "{reply:?}: {err}"
            );
            vmm.await.unwrap();
        }
    }

    #[tokio::test]
    async fn handshake_rejects_endless_line() {
        let (client, server) = tokio::io::duplex(4096);
        let _vmm = tokio::spawn(async move {
            let mut server = server;
            let mut line = [0u8; 11];
            server.read_exact(&mut line).await.unwrap();
            let _ = server.write_all(&[b'x'; 1000]).await;
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
        });
        let err = hybrid_handshake(client, 52).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
