//! Open file handles: the table, its limits and idle expiry, and the running
//! SHA-256 of each transfer.
//!
//! Handles are `u64`s counted from 1, never reused while the agent runs, and
//! usable from any connection: a write handle outlives the connection that
//! opened it until it is closed or has been idle for
//! `[limits] file_handle_idle_seconds`, so that a host can resume an upload
//! after reconnecting (`file_open` with `resume`). Expiry discards an
//! unfinished upload (its temporary file is removed).
//!
//! Hashing: each handle keeps a running SHA-256 of the prefix of the file
//! transferred so far. A chunk that continues the prefix is hashed from the
//! buffer in hand; chunks that arrive ahead of it are remembered as ranges
//! and hashed, read back from the file, once the prefix reaches them, so
//! pipelined chunks finishing out of order cost a read from the page cache,
//! not a second pass. At `file_close` whatever is not hashed yet is read
//! back; only a write that rewrites bytes already hashed forces a full
//! re-read of the file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use kvm_agent_protocol::codec::Sha256Stream;

use super::resolve::Name;
use super::upload::Temp;
use super::FileError;

/// What a handle is for.
#[derive(Debug)]
pub enum State {
    /// Reading an existing file.
    Read {
        /// The file.
        file: File,
    },
    /// Writing a temporary file, to be committed over `target`.
    Write(Upload),
    /// Closed (a late operation finds this and answers "no handle").
    Closed,
}

/// An upload in progress.
#[derive(Debug)]
pub struct Upload {
    /// The temporary file.
    pub temp: Temp,
    /// The target's name in the temporary file's directory.
    pub target: Name,
    /// Replace an existing target at commit.
    pub overwrite: bool,
    /// Permission bits set at commit.
    pub mode: u32,
    /// Owner and group set at commit.
    pub owner: (Option<u32>, Option<u32>),
}

/// One open handle.
#[derive(Debug)]
pub struct Handle {
    /// Its number.
    pub id: u64,
    /// The resolved path, for messages and the audit trail.
    pub path: String,
    /// For uploads: the directory's device and inode and the target name,
    /// by which `resume` finds the upload again.
    pub key: Option<(u64, u64, Name)>,
    /// Operations take it shared; closing takes it exclusively, so a close
    /// waits for the chunks in flight.
    pub state: RwLock<State>,
    /// The running hash.
    pub progress: Mutex<Progress>,
    /// Signalled whenever the running hash advances (see [`Handle::record`]).
    turn: Condvar,
    conn: AtomicU64,
    last_used: Mutex<Instant>,
    busy: AtomicUsize,
}

impl Handle {
    /// Mark the handle in use until the guard is dropped (it does not
    /// expire meanwhile).
    pub fn use_guard(self: &Arc<Self>) -> UseGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        UseGuard(self.clone())
    }

    /// Whether this is an upload.
    pub fn is_write(&self) -> bool {
        self.key.is_some()
    }

    /// Add a chunk read or written at `offset` to the running hash.
    ///
    /// Pipelined chunks run on several threads and may get here out of
    /// order. A chunk just ahead of the hash waits for its turn a little
    /// while (the chunks before it are normally in flight), so that it is
    /// hashed from memory now rather than read back from the file later;
    /// past [`TURN_WAIT`] it is deferred as before (a host may well send
    /// chunks out of order and wait for each answer).
    pub fn record(&self, offset: u64, data: &[u8], file: &File, write: bool) -> io::Result<()> {
        self.record_waiting(offset, data, file, write, TURN_WAIT)
    }

    /// [`Handle::record`], waiting at most `wait` for the chunk's turn.
    pub fn record_waiting(
        &self,
        offset: u64,
        data: &[u8],
        file: &File,
        write: bool,
        wait: Duration,
    ) -> io::Result<()> {
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + wait;
        while progress.waits_for_turn(offset) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            progress = self
                .turn
                .wait_timeout(progress, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let r = progress.record(offset, data, file, write);
        drop(progress);
        self.turn.notify_all();
        r
    }
}

/// How long a chunk ahead of the running hash waits for the chunks before
/// it (see [`Handle::record`]).
const TURN_WAIT: Duration = Duration::from_millis(20);

/// Keeps a handle from expiring while an operation runs.
#[derive(Debug)]
pub struct UseGuard(Arc<Handle>);

impl Drop for UseGuard {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The running SHA-256 of a transfer's prefix.
#[derive(Debug, Default)]
pub struct Progress {
    hasher: Sha256Stream,
    upto: u64,
    ahead: BTreeMap<u64, u64>,
    dirty: bool,
}

/// Bytes read back at a time when catching up.
const READ_BACK: usize = 1 << 20;

impl Progress {
    /// Whether a chunk at `offset` is ahead of the hash, which could
    /// still catch up with it.
    fn waits_for_turn(&self, offset: u64) -> bool {
        !self.dirty && offset > self.upto
    }

    /// The bytes hashed contiguously from offset 0 (for an upload that
    /// rewrote hashed bytes: 0, nothing is trusted).
    pub fn contiguous(&self) -> u64 {
        if self.dirty {
            0
        } else {
            self.upto
        }
    }

    /// Record that `data` is now at `offset` of `file` (written there, or
    /// read from there).
    pub fn record(&mut self, offset: u64, data: &[u8], file: &File, write: bool) -> io::Result<()> {
        if self.dirty || data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        if offset > self.upto {
            let e = self.ahead.entry(offset).or_insert(end);
            *e = (*e).max(end);
            return Ok(());
        }
        if write && offset < self.upto {
            // Bytes already hashed were rewritten: re-read at close.
            self.dirty = true;
            self.ahead.clear();
            return Ok(());
        }
        if end > self.upto {
            self.hasher.update(&data[(self.upto - offset) as usize..]);
            self.upto = end;
        }
        self.catch_up(file)
    }

    /// Hash ranges done earlier that the prefix now reaches, read back from
    /// `file`.
    fn catch_up(&mut self, file: &File) -> io::Result<()> {
        while let Some((&s, &e)) = self.ahead.first_key_value() {
            if s > self.upto {
                break;
            }
            self.ahead.remove(&s);
            if e > self.upto {
                self.read_back(file, e)?;
            }
        }
        Ok(())
    }

    fn read_back(&mut self, file: &File, to: u64) -> io::Result<()> {
        let mut buf = vec![0u8; READ_BACK.min((to.saturating_sub(self.upto)) as usize)];
        while self.upto < to {
            let n = READ_BACK.min((to - self.upto) as usize);
            let got = super::read_at(file, &mut buf[..n], self.upto)?;
            if got == 0 {
                // The file is shorter than expected (a reader's file shrank).
                break;
            }
            self.hasher.update(&buf[..got]);
            self.upto += got as u64;
        }
        Ok(())
    }

    /// The SHA-256 of the first `size` bytes of `file`, reading back what
    /// was not hashed on the way.
    pub fn finish(mut self, file: &File, size: u64) -> io::Result<String> {
        if self.dirty || self.upto > size {
            self = Progress::default();
        }
        if size > self.upto {
            self.read_back(file, size)?;
        }
        Ok(self.hasher.finish())
    }
}

/// The limits of the table.
#[derive(Clone, Copy, Debug)]
pub struct TableLimits {
    /// Handles opened by one connection.
    pub per_connection: u32,
    /// Handles in all.
    pub total: u32,
    /// Idle time after which a handle is closed.
    pub idle: Duration,
}

/// The table of open handles.
#[derive(Debug)]
pub struct FileTable {
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next: AtomicU64,
    limits: TableLimits,
    sweeper: AtomicBool,
}

impl FileTable {
    /// An empty table.
    pub fn new(limits: TableLimits) -> Arc<Self> {
        Arc::new(Self {
            handles: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            limits,
            sweeper: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no handle is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Add a handle opened by connection `conn`, within the limits.
    pub fn insert(
        self: &Arc<Self>,
        conn: u64,
        path: String,
        key: Option<(u64, u64, Name)>,
        state: State,
    ) -> Result<Arc<Handle>, FileError> {
        self.start_sweeper();
        let mut handles = self.lock();
        if handles.len() >= self.limits.total as usize {
            return Err(FileError::Busy {
                limit: "max_file_handles_total",
                value: self.limits.total,
            });
        }
        let mine = handles
            .values()
            .filter(|h| h.conn.load(Ordering::Relaxed) == conn)
            .count();
        if mine >= self.limits.per_connection as usize {
            return Err(FileError::Busy {
                limit: "max_file_handles_per_connection",
                value: self.limits.per_connection,
            });
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(Handle {
            id,
            path,
            key,
            state: RwLock::new(state),
            progress: Mutex::new(Progress::default()),
            turn: Condvar::new(),
            conn: AtomicU64::new(conn),
            last_used: Mutex::new(Instant::now()),
            busy: AtomicUsize::new(0),
        });
        handles.insert(id, h.clone());
        Ok(h)
    }

    /// The handle `id`.
    pub fn get(&self, id: u64) -> Result<Arc<Handle>, FileError> {
        self.lock()
            .get(&id)
            .cloned()
            .ok_or(FileError::NoHandle { handle: id })
    }

    /// Take `id` out of the table (it is then closed by its taker).
    pub fn remove(&self, id: u64) -> Result<Arc<Handle>, FileError> {
        self.lock()
            .remove(&id)
            .ok_or(FileError::NoHandle { handle: id })
    }

    /// The most recently used upload to `key`, now owned by `conn`.
    pub fn find_upload(&self, key: &(u64, u64, Name), conn: u64) -> Option<Arc<Handle>> {
        let handles = self.lock();
        let h = handles
            .values()
            .filter(|h| h.key.as_ref() == Some(key))
            .max_by_key(|h| *h.last_used.lock().unwrap_or_else(|e| e.into_inner()))?
            .clone();
        h.conn.store(conn, Ordering::Relaxed);
        Some(h)
    }

    /// Close handles idle for longer than the limit (uploads discarded).
    /// Returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let idle = self.limits.idle;
        let expired: Vec<Arc<Handle>> = {
            let mut handles = self.lock();
            let ids: Vec<u64> = handles
                .values()
                .filter(|h| {
                    h.busy.load(Ordering::Acquire) == 0
                        && now.saturating_duration_since(
                            *h.last_used.lock().unwrap_or_else(|e| e.into_inner()),
                        ) >= idle
                })
                .map(|h| h.id)
                .collect();
            ids.iter().filter_map(|id| handles.remove(id)).collect()
        };
        for h in &expired {
            log::info!(
                "file handle {} ({}) expired after {} s idle{}",
                h.id,
                h.path,
                idle.as_secs(),
                if h.is_write() {
                    "; upload discarded"
                } else {
                    ""
                }
            );
            let mut state = h.state.write().unwrap_or_else(|e| e.into_inner());
            *state = State::Closed;
        }
        expired.len()
    }

    /// Start the task that expires idle handles (once, on first use).
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.sweeper.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        let every =
            (self.limits.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        rt.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(table) = weak.upgrade() else { return };
                let now = Instant::now();
                // Removing temporaries is file-system work: off the runtime.
                let _ = tokio::task::spawn_blocking(move || table.expire(now)).await;
            }
        });
    }
}
