//! `copy_to_guest`, `copy_from_guest`, `file_open`, `file_read`,
//! `file_write`, `file_close`.
//!
//! The dispatcher's policy has already checked each path lexically
//! ([`crate::files::path`]); here it is resolved race-free
//! ([`crate::files::resolve`]), uploads go through temporary files
//! ([`crate::files::upload`]) and handles live in the context's
//! [`FileTable`](crate::files::table::FileTable). All file-system work runs
//! on tokio's blocking pool, so a connection keeps answering `ping` while a
//! large chunk is written. Each call adds its facts to the audit record:
//! the resolved path, the handle, bytes and, when known, the sha256; a
//! refusal adds its reason.
//!
//! The same code serves Windows, where `resolve` and `upload` are the
//! Windows modules and the path rules are Windows ones; there `mode` is
//! checked but not applied and `uid`/`gid` are refused (-32602 kind
//! `owner`) before anything is written.

use kvm_agent_protocol::methods::files::{
    CopyFromGuestParams, CopyToGuestParams, FileCloseParams, FileClosed, FileCommitted,
    FileOpenParams, FileOpened, FileReadParams, FileWriteParams, FileWritten,
};
use kvm_agent_protocol::MethodName;
use serde_json::value::RawValue;

use crate::audit::PendingAudit;
use crate::context::Context;
use crate::dispatch::Reply;
use crate::files::FileError;

/// Default permission bits of a new file.
pub const DEFAULT_MODE: u32 = 0o600;

/// Record a failure's facts (the refusal reason) in the audit record.
fn note_error(audit: &mut PendingAudit, e: &FileError) {
    if let Some(r) = e.reason() {
        audit.detail("reason", r.as_str());
    }
    if let FileError::Refused { path, .. } = e {
        audit.detail("path", path.as_str());
    }
}

pub use imp::*;

mod imp {
    use std::fs::File;
    use std::sync::Arc;

    use kvm_agent_protocol::attachment::Attachment;
    use kvm_agent_protocol::codec;

    use super::*;
    use crate::files::path::{self, Lexical};
    use crate::files::resolve::{self, ResolveError, Resolver};
    use crate::files::table::{Handle, Progress, State, Upload};
    use crate::files::upload::{CommitError, Temp};
    use crate::files::{read_at, write_all_at};

    fn take_buffer() -> Vec<u8> {
        kvm_agent_protocol::buffers::take()
    }

    /// Return a buffer for reuse. Buffers over `max` (the chunk limit) go
    /// back to the allocator (and, with `files::tune_allocator`, to the
    /// kernel).
    fn give_buffer(b: Vec<u8>, max: usize) {
        kvm_agent_protocol::buffers::give(b, max);
    }

    /// Run file-system work on the blocking pool.
    async fn blocking<T: Send + 'static>(
        method: MethodName,
        f: impl FnOnce() -> Result<T, FileError> + Send + 'static,
    ) -> Result<T, FileError> {
        tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
            Err(FileError::Io {
                path: method.as_str().to_owned(),
                os_error: 0,
                detail: "cancelled".into(),
            })
        })
    }

    fn lexical<'a>(
        ctx: &'a Context,
        method: MethodName,
        path: &'a str,
    ) -> Result<Lexical<'a>, FileError> {
        path::check(path, &ctx.config.security.allowed_file_paths).map_err(|reason| {
            FileError::Refused {
                method,
                path: path.to_owned(),
                reason,
            }
        })
    }

    fn resolve_error(method: MethodName, path: &str, e: ResolveError) -> FileError {
        match e {
            ResolveError::Refused(reason) => FileError::Refused {
                method,
                path: path.to_owned(),
                reason,
            },
            ResolveError::NotFound => FileError::NotFound {
                path: path.to_owned(),
            },
            ResolveError::Exists => FileError::Exists {
                path: path.to_owned(),
            },
            ResolveError::Io(e) => FileError::io(path, &e),
        }
    }

    fn check_mode(method: MethodName, mode: Option<u32>) -> Result<u32, FileError> {
        let mode = mode.unwrap_or(DEFAULT_MODE);
        if mode > 0o777 {
            return Err(FileError::Invalid {
                method,
                kind: "mode",
                reason: format!(
                    "mode {mode} is over 511 (0o777): setuid, setgid and sticky bits cannot be set"
                ),
                expected: None,
                actual: None,
            });
        }
        Ok(mode)
    }

    /// `uid`/`gid`: POSIX ids, which Windows files do not have: refused
    /// there (-32602 kind `owner`), before anything is written.
    fn check_owner(
        method: MethodName,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), FileError> {
        if cfg!(windows) && (uid.is_some() || gid.is_some()) {
            return Err(FileError::Invalid {
                method,
                kind: "owner",
                reason: "uid and gid cannot be set on Windows".into(),
                expected: None,
                actual: None,
            });
        }
        Ok(())
    }

    fn check_sha(method: MethodName, sha: &Option<String>) -> Result<(), FileError> {
        match sha {
            Some(s) if !codec::is_sha256_hex(s) => Err(FileError::Invalid {
                method,
                kind: "sha256",
                reason: "sha256 must be 64 lower-case hex digits".into(),
                expected: None,
                actual: None,
            }),
            _ => Ok(()),
        }
    }

    fn mismatch(
        method: MethodName,
        kind: &'static str,
        expected: String,
        actual: String,
    ) -> FileError {
        FileError::Invalid {
            method,
            kind,
            reason: format!(
                "{} mismatch: expected {expected}, the file has {actual}; nothing was committed",
                if kind == "size_mismatch" {
                    "size"
                } else {
                    "sha256"
                }
            ),
            expected: Some(expected),
            actual: Some(actual),
        }
    }

    /// Decoded size of base64 text, or `TooLarge` over `max`, checked
    /// before decoding anything.
    fn check_encoded(text: &str, max: u64) -> Result<(), FileError> {
        let b = text.as_bytes();
        let pad = b.iter().rev().take(2).take_while(|c| **c == b'=').count();
        let size = (b.len() / 4 * 3).saturating_sub(pad) as u64;
        if size > max {
            return Err(FileError::TooLarge {
                max_bytes: max,
                size,
            });
        }
        Ok(())
    }

    fn decode(method: MethodName, text: &str, out: &mut Vec<u8>) -> Result<(), FileError> {
        codec::base64_decode_into(text.as_bytes(), out).map_err(|e| FileError::Invalid {
            method,
            kind: "base64",
            reason: e.to_string(),
            expected: None,
            actual: None,
        })
    }

    fn commit_error(path: &str, e: CommitError) -> FileError {
        match e {
            CommitError::Exists => FileError::Exists {
                path: path.to_owned(),
            },
            CommitError::Io(e) => FileError::io(path, &e),
        }
    }

    /// `copy_to_guest`.
    pub async fn copy_to_guest(
        ctx: &Context,
        p: CopyToGuestParams,
        audit: &mut PendingAudit,
    ) -> Result<FileCommitted, FileError> {
        let r = copy_to_guest_inner(ctx, p, audit).await;
        if let Err(e) = &r {
            note_error(audit, e);
        }
        r
    }

    async fn copy_to_guest_inner(
        ctx: &Context,
        p: CopyToGuestParams,
        audit: &mut PendingAudit,
    ) -> Result<FileCommitted, FileError> {
        const M: MethodName = MethodName::CopyToGuest;
        let lex = lexical(ctx, M, &p.path)?;
        let shown = lex.display();
        audit.detail("path", shown.as_str());
        let mode = check_mode(M, p.mode)?;
        check_owner(M, p.uid, p.gid)?;
        check_sha(M, &p.sha256)?;
        let max = u64::from(ctx.limits().max_chunk_bytes);
        check_encoded(&p.content_base64, max)?;
        let roots = ctx.config.security.allowed_file_paths.clone();
        let path = p.path.clone();
        let result = blocking(M, move || {
            let lex = path::check(&path, &roots).expect("checked");
            let mut data = take_buffer();
            decode(M, &p.content_base64, &mut data)?;
            drop(p.content_base64);
            let sha = codec::sha256_hex(&data);
            if let Some(want) = &p.sha256 {
                if *want != sha {
                    return Err(mismatch(M, "sha256_mismatch", want.clone(), sha));
                }
            }
            let target = Resolver::default()
                .open_write(&lex, p.create_parents, p.overwrite)
                .map_err(|e| resolve_error(M, &path, e))?;
            let shown = lex.display();
            let dir = Arc::new(target.dir);
            let temp = Temp::create(dir).map_err(|e| FileError::io(&shown, &e))?;
            write_all_at(&temp.file, &data, 0).map_err(|e| FileError::io(&shown, &e))?;
            temp.commit(&target.name, mode, (p.uid, p.gid), p.overwrite)
                .map_err(|e| commit_error(&shown, e))?;
            let size = data.len() as u64;
            give_buffer(data, max as usize);
            Ok(FileCommitted {
                path: shown,
                size,
                sha256: sha,
            })
        })
        .await?;
        audit.detail("bytes", result.size);
        audit.detail("sha256", result.sha256.as_str());
        Ok(result)
    }

    /// `copy_from_guest`: the result, serialized here so the content is
    /// encoded once, straight into the reply.
    pub async fn copy_from_guest(
        ctx: &Context,
        p: CopyFromGuestParams,
        audit: &mut PendingAudit,
    ) -> Result<Box<RawValue>, FileError> {
        const M: MethodName = MethodName::CopyFromGuest;
        let r = async {
            let lex = lexical(ctx, M, &p.path)?;
            audit.detail("path", lex.display());
            let max = u64::from(ctx.limits().max_chunk_bytes);
            let roots = ctx.config.security.allowed_file_paths.clone();
            blocking(M, move || {
                let lex = path::check(&p.path, &roots).expect("checked");
                let opened = Resolver::default()
                    .open_read(&lex)
                    .map_err(|e| resolve_error(M, &p.path, e))?;
                if opened.size > max {
                    return Err(FileError::TooLarge {
                        max_bytes: max,
                        size: opened.size,
                    });
                }
                // The file as long as it was when opened.
                let mut data = take_buffer();
                if data.len() < opened.size as usize {
                    data.resize(opened.size as usize, 0);
                }
                let n = read_full(&opened.file, &mut data[..opened.size as usize], 0)
                    .map_err(|e| FileError::io(&p.path, &e))?;
                let sha = codec::sha256_hex(&data[..n]);
                let mut s = String::with_capacity(codec::encoded_len(n) + 128);
                s.push_str(r#"{"content_base64":""#);
                codec::base64_encode_into(&data[..n], &mut s);
                s.push_str(&format!(r#"","size":{n},"sha256":"{sha}"}}"#));
                give_buffer(data, max as usize);
                let raw = RawValue::from_string(s).expect("valid JSON");
                Ok((raw, n as u64, sha))
            })
            .await
        }
        .await;
        match r {
            Ok((raw, size, sha)) => {
                audit.detail("bytes", size);
                audit.detail("sha256", sha);
                Ok(raw)
            }
            Err(e) => {
                note_error(audit, &e);
                Err(e)
            }
        }
    }

    /// Read until `buf` is full or end of file; returns the bytes read.
    fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match read_at(file, &mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// `file_open`.
    pub async fn open(
        ctx: &Context,
        p: FileOpenParams,
        audit: &mut PendingAudit,
    ) -> Result<FileOpened, FileError> {
        let r = open_inner(ctx, p, audit).await;
        if let Err(e) = &r {
            note_error(audit, e);
        }
        r
    }

    async fn open_inner(
        ctx: &Context,
        p: FileOpenParams,
        audit: &mut PendingAudit,
    ) -> Result<FileOpened, FileError> {
        use kvm_agent_protocol::methods::files::Access;
        const M: MethodName = MethodName::FileOpen;
        let lex = lexical(ctx, M, &p.path)?;
        let shown = lex.display();
        audit.detail("path", shown.as_str());
        audit.detail(
            "access",
            match p.access {
                Access::Read => "read",
                Access::Write => "write",
            },
        );
        let mode = check_mode(M, p.mode)?;
        check_owner(M, p.uid, p.gid)?;
        let roots = ctx.config.security.allowed_file_paths.clone();
        let table = ctx.files.clone();
        let conn = audit.connection();
        let (handle, size, resumed) = blocking(M, move || {
            let lex = path::check(&p.path, &roots).expect("checked");
            let shown = lex.display();
            let resolver = Resolver::default();
            match p.access {
                Access::Read => {
                    let opened = resolver
                        .open_read(&lex)
                        .map_err(|e| resolve_error(M, &p.path, e))?;
                    let h = table.insert(conn, shown, None, State::Read { file: opened.file })?;
                    Ok((h.id, Some(opened.size), false))
                }
                Access::Write => {
                    let target = resolver
                        .open_write(&lex, p.create_parents, p.overwrite)
                        .map_err(|e| resolve_error(M, &p.path, e))?;
                    let key = resolve::dir_key(&target.dir, &target.name)
                        .map_err(|e| FileError::io(&shown, &e))?;
                    if p.resume {
                        if let Some(h) = table.find_upload(&key, conn) {
                            let mut state = h.state.write().unwrap_or_else(|e| e.into_inner());
                            if let State::Write(u) = &mut *state {
                                u.overwrite = p.overwrite;
                                u.mode = mode;
                                u.owner = (p.uid, p.gid);
                                let have = h
                                    .progress
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .contiguous();
                                return Ok((h.id, Some(have), true));
                            }
                        }
                    }
                    let temp = Temp::create(Arc::new(target.dir))
                        .map_err(|e| FileError::io(&shown, &e))?;
                    let h = table.insert(
                        conn,
                        shown,
                        Some(key),
                        State::Write(Upload {
                            temp,
                            target: target.name,
                            overwrite: p.overwrite,
                            mode,
                            owner: (p.uid, p.gid),
                        }),
                    )?;
                    Ok((h.id, if p.resume { Some(0) } else { None }, p.resume))
                }
            }
        })
        .await?;
        audit.detail("handle", handle);
        if resumed {
            audit.detail("resumed_at", size.unwrap_or(0));
        }
        Ok(FileOpened { handle, size })
    }

    /// `file_read`: the result, serialized here so the chunk is encoded
    /// once, straight into the reply; with `attachment`, the bytes follow
    /// the result in the frame as they were read.
    pub async fn read(
        ctx: &Context,
        p: FileReadParams,
        audit: &mut PendingAudit,
    ) -> Result<Reply, FileError> {
        const M: MethodName = MethodName::FileRead;
        audit.detail("handle", p.handle);
        audit.detail("offset", p.offset);
        let max = ctx.limits().max_chunk_bytes;
        let r = async {
            if p.length > max {
                return Err(FileError::TooLarge {
                    max_bytes: u64::from(max),
                    size: u64::from(p.length),
                });
            }
            let h = ctx.files.get(p.handle)?;
            audit.detail("path", h.path.as_str());
            blocking(M, move || read_chunk(&h, p, max as usize)).await
        }
        .await;
        match r {
            Ok((reply, n)) => {
                audit.detail("bytes", n);
                Ok(reply)
            }
            Err(e) => {
                note_error(audit, &e);
                Err(e)
            }
        }
    }

    fn read_chunk(
        h: &Arc<Handle>,
        p: FileReadParams,
        max: usize,
    ) -> Result<(Reply, u64), FileError> {
        let _in_use = h.use_guard();
        let state = h.state.read().unwrap_or_else(|e| e.into_inner());
        let file = match &*state {
            State::Read { file } => file,
            State::Write(_) => {
                return Err(FileError::Invalid {
                    method: MethodName::FileRead,
                    kind: "access",
                    reason: format!("handle {} is open for writing", h.id),
                    expected: None,
                    actual: None,
                })
            }
            State::Closed => return Err(FileError::NoHandle { handle: h.id }),
        };
        let mut buf = take_buffer();
        if buf.len() < p.length as usize {
            buf.resize(p.length as usize, 0);
        }
        let n = read_full(file, &mut buf[..p.length as usize], p.offset)
            .map_err(|e| FileError::io(&h.path, &e))?;
        let size = resolve::file_size(file).map_err(|e| FileError::io(&h.path, &e))?;
        let eof = n < p.length as usize || p.offset + n as u64 >= size;
        h.record(p.offset, &buf[..n], file, false)
            .map_err(|e| FileError::io(&h.path, &e))?;
        if p.attachment {
            let result = if eof {
                r#"{"eof":true}"#
            } else {
                r#"{"eof":false}"#
            };
            buf.truncate(n);
            let reply = Reply {
                result: RawValue::from_string(result.to_owned()).expect("valid JSON"),
                attachment: Some(buf),
            };
            return Ok((reply, n as u64));
        }
        // Exactly the reply's size: no reallocation when it becomes a RawValue.
        const HEAD: &str = r#"{"data_base64":""#;
        let tail = if eof {
            r#"","eof":true}"#
        } else {
            r#"","eof":false}"#
        };
        let mut s = String::with_capacity(HEAD.len() + codec::encoded_len(n) + tail.len());
        s.push_str(HEAD);
        codec::base64_encode_into(&buf[..n], &mut s);
        s.push_str(tail);
        give_buffer(buf, max);
        let result = RawValue::from_string(s).expect("valid JSON");
        Ok((Reply::from(result), n as u64))
    }

    /// `file_write`: the bytes come as `data_base64` or, with protocol 1.1,
    /// as the request's attachment, written from the frame's own buffer.
    pub async fn write(
        ctx: &Context,
        p: FileWriteParams,
        audit: &mut PendingAudit,
    ) -> Result<FileWritten, FileError> {
        const M: MethodName = MethodName::FileWrite;
        audit.detail("handle", p.handle);
        audit.detail("offset", p.offset);
        let max = ctx.limits().max_chunk_bytes;
        let max_file = ctx.config.limits.max_file_bytes;
        let r = async {
            match (&p.data_base64, &p.attachment) {
                (Some(text), None) => check_encoded(text, u64::from(max))?,
                (None, Some(a)) if a.len() as u64 > u64::from(max) => {
                    return Err(FileError::TooLarge {
                        max_bytes: u64::from(max),
                        size: a.len() as u64,
                    })
                }
                (None, Some(_)) => {}
                (Some(_), Some(_)) | (None, None) => {
                    return Err(FileError::Invalid {
                        method: M,
                        kind: "data",
                        reason: "the bytes come either as data_base64 or as an attachment: \
                                 exactly one of the two"
                            .into(),
                        expected: None,
                        actual: None,
                    })
                }
            }
            let h = ctx.files.get(p.handle)?;
            audit.detail("path", h.path.as_str());
            blocking(M, move || write_chunk(&h, p, max as usize, max_file)).await
        }
        .await;
        match r {
            Ok(n) => {
                audit.detail("bytes", n);
                Ok(FileWritten { written: n })
            }
            Err(e) => {
                note_error(audit, &e);
                Err(e)
            }
        }
    }

    /// The bytes of a `file_write`: decoded into a pooled buffer, or the
    /// attachment as it arrived. Either way the buffer returns to the pool.
    enum Chunk {
        Decoded(Vec<u8>),
        Attached(Attachment),
    }

    impl Chunk {
        fn bytes(&self) -> &[u8] {
            match self {
                Chunk::Decoded(b) => b,
                Chunk::Attached(a) => a.as_bytes(),
            }
        }

        fn recycle(self, max: usize) {
            match self {
                Chunk::Decoded(b) => give_buffer(b, max),
                // The frame's buffer: the chunk plus a little JSON.
                Chunk::Attached(a) => give_buffer(a.into_buffer(), max + (64 << 10)),
            }
        }
    }

    fn write_chunk(
        h: &Arc<Handle>,
        p: FileWriteParams,
        max: usize,
        max_file: u64,
    ) -> Result<u64, FileError> {
        const M: MethodName = MethodName::FileWrite;
        let _in_use = h.use_guard();
        let FileWriteParams {
            offset,
            data_base64,
            attachment,
            ..
        } = p;
        let chunk = match (data_base64, attachment) {
            (_, Some(a)) => Chunk::Attached(a),
            (Some(text), None) => {
                let mut buf = take_buffer();
                decode(M, &text, &mut buf)?;
                Chunk::Decoded(buf)
            }
            (None, None) => Chunk::Decoded(Vec::new()),
        };
        let data = chunk.bytes();
        let end = offset.saturating_add(data.len() as u64);
        if end > max_file {
            return Err(FileError::TooLarge {
                max_bytes: max_file,
                size: end,
            });
        }
        let state = h.state.read().unwrap_or_else(|e| e.into_inner());
        let file = match &*state {
            State::Write(u) => &u.temp.file,
            State::Read { .. } => {
                return Err(FileError::Invalid {
                    method: M,
                    kind: "access",
                    reason: format!("handle {} is open for reading", h.id),
                    expected: None,
                    actual: None,
                })
            }
            State::Closed => return Err(FileError::NoHandle { handle: h.id }),
        };
        write_all_at(file, data, offset).map_err(|e| FileError::io(&h.path, &e))?;
        h.record(offset, data, file, true)
            .map_err(|e| FileError::io(&h.path, &e))?;
        let n = data.len() as u64;
        drop(state);
        chunk.recycle(max);
        Ok(n)
    }

    /// `file_close`.
    pub async fn close(
        ctx: &Context,
        p: FileCloseParams,
        audit: &mut PendingAudit,
    ) -> Result<FileClosed, FileError> {
        const M: MethodName = MethodName::FileClose;
        audit.detail("handle", p.handle);
        let r = async {
            check_sha(M, &p.sha256)?;
            let h = ctx.files.remove(p.handle)?;
            audit.detail("path", h.path.as_str());
            if p.abort {
                audit.detail("abort", true);
            }
            blocking(M, move || close_handle(&h, p)).await
        }
        .await;
        match r {
            Ok(c) => {
                audit.detail("bytes", c.size);
                audit.detail("sha256", c.sha256.as_str());
                audit.detail("committed", c.committed);
                Ok(c)
            }
            Err(e) => {
                note_error(audit, &e);
                Err(e)
            }
        }
    }

    fn close_handle(h: &Arc<Handle>, p: FileCloseParams) -> Result<FileClosed, FileError> {
        const M: MethodName = MethodName::FileClose;
        // Waits for chunks still in flight on this handle.
        let state = std::mem::replace(
            &mut *h.state.write().unwrap_or_else(|e| e.into_inner()),
            State::Closed,
        );
        let progress = std::mem::take(&mut *h.progress.lock().unwrap_or_else(|e| e.into_inner()));
        let io = |e: std::io::Error| FileError::io(&h.path, &e);
        let summary = |file: &File, progress: Progress| -> Result<(u64, String), FileError> {
            let size = resolve::file_size(file).map_err(io)?;
            Ok((size, progress.finish(file, size).map_err(io)?))
        };
        match state {
            State::Closed => Err(FileError::NoHandle { handle: h.id }),
            State::Read { file } => {
                let (size, sha256) = summary(&file, progress)?;
                Ok(FileClosed {
                    size,
                    sha256,
                    committed: false,
                })
            }
            State::Write(u) => {
                let (size, sha256) = summary(&u.temp.file, progress)?;
                if p.abort {
                    return Ok(FileClosed {
                        size,
                        sha256,
                        committed: false,
                    });
                }
                if let Some(want) = p.size {
                    if want != size {
                        return Err(mismatch(
                            M,
                            "size_mismatch",
                            want.to_string(),
                            size.to_string(),
                        ));
                    }
                }
                if let Some(want) = &p.sha256 {
                    if *want != sha256 {
                        return Err(mismatch(M, "sha256_mismatch", want.clone(), sha256));
                    }
                }
                u.temp
                    .commit(&u.target, u.mode, u.owner, u.overwrite)
                    .map_err(|e| commit_error(&h.path, e))?;
                Ok(FileClosed {
                    size,
                    sha256,
                    committed: true,
                })
            }
        }
    }
}
