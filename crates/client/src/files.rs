//! Chunked file transfer with the agent's `file_*` methods: [`upload`] and
//! [`download`], pipelined, sha256-verified end to end, resumable.
//!
//! - Chunks of `chunk_bytes` (default: 1 MiB, at most the agent's
//!   `max_chunk_bytes`) are sent in order with up to `pipeline` requests in
//!   flight, so the agent's running hash follows along and neither side
//!   waits for a round trip per chunk.
//! - Uploads: the local file is hashed as it is read; `file_close` commits
//!   only when the agent's size and sha256 equal the local ones.
//! - Downloads go to `DEST.kva-part` beside the destination, renamed over it
//!   once the sha256 of what was received equals the agent's.
//! - `resume`: an upload asks the agent for the unfinished upload to the
//!   same path (`file_open` with `resume`) and continues from the bytes it
//!   holds; a download continues from the size of an existing `.kva-part`.
//!   Either way the whole file's sha256 is checked at the end.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use kvm_agent_protocol::attachment::Attachment;
use kvm_agent_protocol::buffers;
use kvm_agent_protocol::codec::{self, Sha256Stream};
use kvm_agent_protocol::methods::files::{
    Access, FileCloseParams, FileOpenParams, FileReadParams, FileWritten,
};
use kvm_agent_protocol::methods::{FileReadMethod, FileWriteMethod, Method};
use serde_json::value::RawValue;
use tokio::task::JoinSet;

use crate::{Client, ClientError};

/// Suffix of a partial download.
pub const PART_SUFFIX: &str = ".kva-part";

/// How a transfer runs.
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// Replace an existing destination.
    pub overwrite: bool,
    /// Upload: permission bits of the new file.
    pub mode: Option<u32>,
    /// Upload: create missing parent directories in the guest.
    pub create_parents: bool,
    /// Continue an interrupted transfer.
    pub resume: bool,
    /// Bytes per chunk (capped by the agent's `max_chunk_bytes`).
    pub chunk_bytes: u32,
    /// Chunks in flight at once.
    pub pipeline: usize,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self {
            overwrite: false,
            mode: None,
            create_parents: false,
            resume: false,
            chunk_bytes: 1 << 20,
            pipeline: 4,
        }
    }
}

/// What a transfer did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transferred {
    /// The file's size.
    pub size: u64,
    /// Its sha256.
    pub sha256: String,
    /// Bytes that were already there (resumed), not sent again.
    pub resumed_from: u64,
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Local {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The destination exists (and `overwrite` is false).
    #[error("{0} exists; pass --overwrite to replace it")]
    Exists(PathBuf),
    /// What arrived is not what was sent.
    #[error("verification failed: {0}")]
    Mismatch(String),
}

/// Progress callback: bytes done, bytes in all.
pub type Progress<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// How chunks cross the wire with this agent.
#[derive(Clone, Copy, Debug)]
struct Wire {
    /// Chunk size: the caller's, within the agent's limit.
    chunk: u32,
    /// Chunks travel as attachments (protocol 1.1, no authentication), not
    /// as base64 inside the JSON.
    attachments: bool,
}

async fn wire(client: &Client, opts: &TransferOptions) -> Result<Wire, ClientError> {
    let caps = client.get_capabilities().await?;
    let version = caps
        .protocol_version
        .split_once('.')
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?)));
    Ok(Wire {
        chunk: opts
            .chunk_bytes
            .clamp(1, caps.limits.max_chunk_bytes.max(1)),
        attachments: version.is_some_and(|v| v >= (1, 1)) && !client.authenticates(),
    })
}

/// Upload the local file `local` to `guest`.
pub async fn upload(
    client: &Client,
    local: &Path,
    guest: &str,
    opts: &TransferOptions,
    progress: Progress<'_>,
) -> Result<Transferred, TransferError> {
    let lerr = |source| TransferError::Local {
        path: local.to_owned(),
        source,
    };
    let mut file = File::open(local).map_err(lerr)?;
    let total = file.metadata().map_err(lerr)?.len();
    let wire = wire(client, opts).await?;
    let chunk = wire.chunk as usize;
    let opened = client
        .file_open(&FileOpenParams {
            path: guest.to_owned(),
            access: Access::Write,
            overwrite: opts.overwrite,
            mode: opts.mode,
            create_parents: opts.create_parents,
            uid: None,
            gid: None,
            resume: opts.resume,
        })
        .await?;
    let handle = opened.handle;
    let mut start = opened.size.unwrap_or(0).min(total);
    let mut hasher = Sha256Stream::new();
    let mut buf = vec![0u8; chunk];
    // The agent already has [0, start): hash it locally, do not send it.
    let mut hashed = 0u64;
    while hashed < start {
        let n = chunk.min((start - hashed) as usize);
        let got = file.read(&mut buf[..n]).map_err(lerr)?;
        if got == 0 {
            start = hashed;
            break;
        }
        hasher.update(&buf[..got]);
        hashed += got as u64;
    }
    let resumed_from = start;
    let mut offset = start;
    let mut acked = start;
    progress(offset, total);
    let mut inflight: JoinSet<Result<u64, ClientError>> = JoinSet::new();
    let result: Result<(), TransferError> = async {
        loop {
            // With attachments each chunk is read into its own buffer, which
            // the connection writes as it is and then gives back to the pool
            // (read into its spare capacity: never zeroed first).
            let (n, attached) = if wire.attachments {
                let mut bytes = Vec::new();
                buffers::reserve_pooled(&mut bytes, chunk);
                (&mut file)
                    .take(chunk as u64)
                    .read_to_end(&mut bytes)
                    .map_err(lerr)?;
                (bytes.len(), Some(bytes))
            } else {
                (read_full(&mut file, &mut buf).map_err(lerr)?, None)
            };
            if n == 0 {
                break;
            }
            let params = match &attached {
                Some(bytes) => {
                    hasher.update(bytes);
                    RawValue::from_string(format!(r#"{{"handle":{handle},"offset":{offset}}}"#))
                        .expect("valid JSON")
                }
                None => {
                    hasher.update(&buf[..n]);
                    write_params(handle, offset, &buf[..n])
                }
            };
            offset += n as u64;
            while inflight.len() >= opts.pipeline.max(1) {
                acked += join(&mut inflight).await?;
                progress(acked, total);
            }
            let c = client.clone();
            inflight.spawn(async move {
                let (raw, _) = c
                    .call_json_attached(FileWriteMethod::NAME, &params, attached)
                    .await?;
                let w: FileWritten = serde_json::from_str(raw.get()).map_err(|e| {
                    ClientError::Protocol(format!("unexpected file_write result: {e}"))
                })?;
                Ok(w.written)
            });
        }
        while !inflight.is_empty() {
            acked += join(&mut inflight).await?;
            progress(acked, total);
        }
        Ok(())
    }
    .await;
    result?;
    let sha256 = hasher.finish();
    let closed = client
        .file_close(&FileCloseParams {
            handle,
            abort: false,
            size: Some(offset),
            sha256: Some(sha256.clone()),
        })
        .await?;
    progress(offset, total);
    if !closed.committed || closed.sha256 != sha256 || closed.size != offset {
        return Err(TransferError::Mismatch(format!(
            "the agent has {} bytes with sha256 {}; {} bytes with sha256 {sha256} were sent",
            closed.size, closed.sha256, offset
        )));
    }
    Ok(Transferred {
        size: offset,
        sha256,
        resumed_from,
    })
}

async fn join(set: &mut JoinSet<Result<u64, ClientError>>) -> Result<u64, ClientError> {
    match set.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(ClientError::Protocol(format!("a chunk task failed: {e}"))),
        None => Ok(0),
    }
}

fn read_full(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `file_write` params, encoded here: the chunk is base64-encoded straight
/// into the request's JSON text (base64 needs no escaping).
fn write_params(handle: u64, offset: u64, data: &[u8]) -> Box<RawValue> {
    let head = format!(r#"{{"handle":{handle},"offset":{offset},"data_base64":""#);
    let mut s = String::with_capacity(head.len() + codec::encoded_len(data.len()) + 2);
    s.push_str(&head);
    codec::base64_encode_into(data, &mut s);
    s.push_str("\"}");
    RawValue::from_string(s).expect("valid JSON")
}

/// A `file_read` result, borrowing the chunk's text from the reply.
#[derive(serde::Deserialize)]
struct ChunkRef<'a> {
    #[serde(borrow, default)]
    data_base64: Option<&'a str>,
    eof: bool,
}

/// A chunk read: its offset, its bytes, whether it reached the end.
type Chunk = (u64, Attachment, bool);

/// The partial file a download of `dest` writes to.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(PART_SUFFIX);
    PathBuf::from(s)
}

/// Download `guest` to the local file `dest` (through `dest.kva-part`).
pub async fn download(
    client: &Client,
    guest: &str,
    dest: &Path,
    opts: &TransferOptions,
    progress: Progress<'_>,
) -> Result<Transferred, TransferError> {
    if dest.exists() && !opts.overwrite {
        return Err(TransferError::Exists(dest.to_owned()));
    }
    let part = part_path(dest);
    let perr = |source| TransferError::Local {
        path: part.clone(),
        source,
    };
    let wire = wire(client, opts).await?;
    let chunk = wire.chunk;
    let opened = client
        .file_open(&FileOpenParams {
            path: guest.to_owned(),
            access: Access::Read,
            overwrite: false,
            mode: None,
            create_parents: false,
            uid: None,
            gid: None,
            resume: false,
        })
        .await?;
    let handle = opened.handle;
    let total = opened.size.unwrap_or(0);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(!opts.resume)
        .open(&part)
        .map_err(perr)?;
    let mut hasher = Sha256Stream::new();
    let mut start = 0u64;
    if opts.resume {
        // Keep what is there (up to the remote size), hashing it.
        let have = file.metadata().map_err(perr)?.len().min(total);
        file.set_len(have).map_err(perr)?;
        let mut buf = vec![0u8; 1 << 20];
        while start < have {
            let n = read_full(
                &mut file,
                &mut buf[..(1usize << 20).min((have - start) as usize)],
            )
            .map_err(perr)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            start += n as u64;
        }
    }
    let resumed_from = start;
    progress(start, total);
    let mut next = start;
    let mut written = start;
    let mut inflight: JoinSet<Result<Chunk, ClientError>> = JoinSet::new();
    let mut ready = std::collections::BTreeMap::<u64, Attachment>::new();
    let mut eof_seen = false;
    let result: Result<(), TransferError> = async {
        loop {
            while !eof_seen && inflight.len() < opts.pipeline.max(1) && next < total.max(1) {
                let c = client.clone();
                let offset = next;
                next += u64::from(chunk);
                inflight.spawn(async move {
                    let params = serde_json::value::to_raw_value(&FileReadParams {
                        handle,
                        offset,
                        length: chunk,
                        attachment: wire.attachments,
                    })
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                    let (raw, attached) = c
                        .call_json_attached(FileReadMethod::NAME, &params, None)
                        .await?;
                    // Borrowed from the reply: the chunk's text is decoded in
                    // place, never copied into a String first.
                    let r: ChunkRef<'_> = serde_json::from_str(raw.get()).map_err(|e| {
                        ClientError::Protocol(format!("unexpected file_read result: {e}"))
                    })?;
                    let data = match (r.data_base64, attached) {
                        (None, Some(bytes)) => bytes,
                        (Some(text), None) => codec::base64_decode(text.as_bytes())
                            .map(Attachment::from_vec)
                            .map_err(|e| {
                                ClientError::Protocol(format!("bad base64 from the agent: {e}"))
                            })?,
                        _ => {
                            return Err(ClientError::Protocol(
                                "file_read: the chunk must come either as data_base64 or as an attachment".into(),
                            ))
                        }
                    };
                    Ok((offset, data, r.eof))
                });
            }
            let Some(done) = inflight.join_next().await else {
                break;
            };
            let (offset, data, eof) =
                done.map_err(|e| ClientError::Protocol(format!("a chunk task failed: {e}")))??;
            if eof {
                eof_seen = true;
            }
            ready.insert(offset, data);
            // Write and hash in order.
            while let Some(attachment) = ready.remove(&written) {
                let data = attachment.as_bytes();
                write_all_at(&file, data, written).map_err(perr)?;
                hasher.update(data);
                written += data.len() as u64;
                progress(written, total.max(written));
                if data.len() < chunk as usize {
                    eof_seen = true;
                }
                // The frame's buffer serves the next chunk's frame.
                buffers::recycle(attachment.into_buffer());
            }
        }
        Ok(())
    }
    .await;
    let closed = client
        .file_close(&FileCloseParams {
            handle,
            abort: false,
            size: None,
            sha256: None,
        })
        .await;
    result?;
    let closed = closed?;
    file.set_len(written).map_err(perr)?;
    file.sync_all().map_err(perr)?;
    let sha256 = hasher.finish();
    if closed.sha256 != sha256 || closed.size != written {
        return Err(TransferError::Mismatch(format!(
            "received {written} bytes with sha256 {sha256}, but the guest file has {} bytes with sha256 {} (it may have changed during the copy; {} is kept)",
            closed.size,
            closed.sha256,
            part.display()
        )));
    }
    std::fs::rename(&part, dest).map_err(|source| TransferError::Local {
        path: dest.to_owned(),
        source,
    })?;
    Ok(Transferred {
        size: written,
        sha256,
        resumed_from,
    })
}

/// Write all of `data` at `offset` of `file` (positional, whatever the
/// file's cursor).
fn write_all_at(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, data, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < data.len() {
            let n = std::os::windows::fs::FileExt::seek_write(
                file,
                &data[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            done += n;
        }
        Ok(())
    }
}
