//! The embedded default backend: one redb file, written through a write-ahead log by a
//! group-commit writer.
//!
//! Appends from every run and fan-out branch go through one channel to the writer thread. It
//! takes everything queued, works out its changes against its run cache, appends them to the
//! write-ahead log (`<store>.wal`) as one record, fdatasyncs it once
//! ([`Durability::Immediate`]), tells each caller its events are durable, and only then hands
//! the changes to the apply thread, which writes them into an open redb write transaction
//! (events gathered per run into chunks, `chunks.rs`). So a batch costs one small fdatasync,
//! neither the callers nor the writer wait for B-tree inserts, and throughput grows with
//! concurrency. A caller that is
//! alone (nothing else in flight) commits on its own thread instead, saving two thread
//! wake-ups: the sequential case. The transaction is committed into the redb file (a
//! checkpoint) every 250 ms, when a reader in this process asks, or when the log is full;
//! opening the store replays the log past the last checkpoint.
//!
//! The file is opened in redb's `SingleWriter` mode: one process writes, and any number of
//! processes may open it read-only at the same time (`cairn runs` while a batch runs); they
//! see what the writer has checkpointed.

use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{
    ConcurrencyMode, Database, DatabaseError, ReadOnlyDatabase, ReadableDatabase, ReadableTable,
    TableDefinition, TableError, TableHandle,
};
use tokio::sync::oneshot;

use crate::chunks::{EVENT_CHUNKS, Pending};
use crate::record::{decode, encode, genesis_hash, now_micros, record_hash};
use crate::store::{
    Appended, BoxFuture, EventStore, Guard, NewRun, RunFilter, RunMeta, RunStatus, RunUpdate,
};
use crate::wal::{Change, PendingWrite, Wal, WriteError};
use crate::{Hash, NewEvent, RunId, Seq, StoreError, StoredEvent};

/// One row per event: how stores of format 1 held events (still read; no longer written).
const EVENTS: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("events");
const RUNS: TableDefinition<u128, &[u8]> = TableDefinition::new("runs");
const RUNS_BY_STATUS: TableDefinition<(u8, u128), ()> = TableDefinition::new("runs_by_status");
const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
const WAKEUPS: TableDefinition<(i64, u128), ()> = TableDefinition::new("wakeups");
const WAL_STATE: TableDefinition<&str, u64> = TableDefinition::new("wal_state");

/// The store-level format version: bumped only by a change old binaries cannot read.
/// 2: events are written as chunks (`chunks.rs`); a store of format 1 is read as it is and
/// raised to 2 when opened for writing.
const STORE_FORMAT: u32 = 2;
/// The version byte in front of each runs-table row.
const RUN_ROW_VERSION: u8 = 1;

/// When a write is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// fdatasync the write-ahead log at every group commit: an acknowledged event survives a
    /// crash or power loss. Default.
    #[default]
    Immediate,
    /// No fsync of the write-ahead log: faster, but a crash of the machine may lose
    /// acknowledged events (benchmarks and tests only). Checkpoints are still fsynced.
    None,
}

/// How to open a [`RedbStore`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Create the file if it does not exist.
    pub create: bool,
    /// Open without the write lock: reads work while another process writes.
    pub read_only: bool,
    /// Commit durability.
    pub durability: Durability,
    /// The largest event payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// redb's page cache, in bytes.
    pub cache_bytes: usize,
    /// How long acknowledged changes may stay only in the write-ahead log before they are
    /// checkpointed into the redb file, where readers in other processes see them.
    pub checkpoint_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            create: true,
            read_only: false,
            durability: Durability::Immediate,
            max_payload_bytes: 16 * 1024 * 1024,
            cache_bytes: 256 * 1024 * 1024,
            checkpoint_interval: CHECKPOINT_INTERVAL,
        }
    }
}

/// The most operations one group commit takes.
const BATCH_OPS_MAX: usize = 8192;
/// The most payload bytes one group commit takes (an op is never split).
const BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;
/// The most operations queued for the writer; a caller beyond it waits (backpressure).
const QUEUE_OPS_MAX: usize = 16_384;
/// The most run rows the writer keeps cached.
const RUN_CACHE_MAX: usize = 65_536;

enum Db {
    Rw(Arc<Database>),
    Ro(ReadOnlyDatabase),
}

impl Db {
    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        Ok(match self {
            Db::Rw(db) => db.begin_read()?,
            Db::Ro(db) => db.begin_read()?,
        })
    }
}

/// Where an operation's result goes. Dropping it (after sending or not) ends the operation's
/// time in flight.
struct Reply {
    tx: Option<oneshot::Sender<Result<Appended, StoreError>>>,
    inflight: Option<Arc<AtomicUsize>>,
}

impl Reply {
    fn new(inflight: &Arc<AtomicUsize>) -> (Self, oneshot::Receiver<Result<Appended, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        inflight.fetch_add(1, Ordering::AcqRel);
        (
            Reply {
                tx: Some(tx),
                inflight: Some(Arc::clone(inflight)),
            },
            rx,
        )
    }

    fn send(mut self, r: Result<Appended, StoreError>) {
        // Out of flight before the caller can see the answer: a sequential caller's next
        // operation then finds itself alone.
        self.leave();
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(r);
        }
    }

    fn leave(&mut self) {
        if let Some(i) = self.inflight.take() {
            i.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.leave();
    }
}

enum Op {
    Create {
        run: NewRun,
        events: Vec<NewEvent>,
        reply: Reply,
    },
    Append {
        run: RunId,
        events: Vec<NewEvent>,
        update: RunUpdate,
        reply: Reply,
    },
    Flush {
        reply: Reply,
    },
    /// Commit the open transaction so that readers see everything acknowledged.
    Checkpoint {
        reply: Reply,
    },
    /// Wakes the writer thread (no reply, not counted as queued): to write the open record a
    /// caller added to while it waited for work, or to schedule a checkpoint for changes a
    /// caller committed itself.
    Tick,
}

/// What an operation asks of the writer: work (with where its result goes), a checkpoint, or
/// only a wake-up.
enum Split {
    Work(Reply, Work),
    Checkpoint(Reply),
    Tick,
}

impl Op {
    fn split(self) -> Split {
        match self {
            Op::Create { run, events, reply } => Split::Work(reply, Work::Create(run, events)),
            Op::Append {
                run,
                events,
                update,
                reply,
            } => Split::Work(reply, Work::Append(run, events, update)),
            Op::Flush { reply } => Split::Work(reply, Work::Flush),
            Op::Checkpoint { reply } => Split::Checkpoint(reply),
            Op::Tick => Split::Tick,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Op::Create { events, .. } | Op::Append { events, .. } => {
                events.iter().map(|e| e.payload.len() + 48).sum()
            }
            Op::Flush { .. } | Op::Checkpoint { .. } | Op::Tick => 0,
        }
    }
}

/// Counters of the group-commit writer since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Group commits: batches made durable (one write-ahead-log fdatasync each).
    pub commits: u64,
    /// Events written.
    pub events: u64,
    /// Operations (appends, creates, flushes) served.
    pub ops: u64,
    /// Checkpoints: commits of logged changes into the redb file.
    pub checkpoints: u64,
    /// Commits a caller made on its own thread because the writer was idle (included in
    /// `commits`): the sequential case, which then costs no thread hand-off.
    pub leader_commits: u64,
    /// Durable writes of the write-ahead log: an `O_DIRECT | O_DSYNC` write, or a write and an
    /// fdatasync where direct I/O is refused (one per commit that wrote a log record; a batch
    /// made durable by a checkpoint, or with `Durability::None`, needs none).
    pub syncs: u64,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    events: AtomicU64,
    ops: AtomicU64,
    checkpoints: AtomicU64,
    leader_commits: AtomicU64,
    syncs: AtomicU64,
}

struct Inner {
    path: PathBuf,
    counters: Arc<Counters>,
    /// Set while acknowledged changes are not yet checkpointed into the redb file.
    dirty: Arc<AtomicBool>,
    db: Db,
    tx: Option<mpsc::SyncSender<Op>>,
    /// The writer state, shared by the writer thread and callers that commit themselves.
    shared: Option<Arc<Shared>>,
    writer: Option<JoinHandle<()>>,
    max_payload_bytes: usize,
}

/// What the writer thread and committing callers share.
struct Shared {
    writer: Mutex<Writer>,
    /// Operations sent to the writer thread and not yet applied. A caller may commit its own
    /// operation only while this is zero, so it never overtakes one sent before it.
    queued: AtomicUsize,
    /// Operations accepted and not yet answered (queued, being written, or waiting for their
    /// fdatasync). A caller commits itself only when this is zero: it is alone. Under
    /// concurrency callers leave the disk to the writer thread, keeping their own threads
    /// free.
    inflight: Arc<AtomicUsize>,
    /// Operations in a row that found nothing else in flight. The leader path needs a streak
    /// of [`LEADER_STREAK`]: a sequential caller has one, while the first op to find the store
    /// idle after a burst (the tail of a batch, a lull between waves) still goes to the writer
    /// thread instead of blocking a runtime thread for a whole disk write.
    alone_streak: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Writer> {
        // The writer's state is consistent between operations; a panic inside one leaves at
        // worst an open transaction that the next failure path rebuilds from the log.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer's lock if it is free now. A caller that does not get it queues its operation
    /// for the writer thread instead of waiting: measured (session 9, interleaved medians),
    /// waiting for the lock cost `bench many` about 23% (three threads taking turns on it for
    /// every operation), and spinning for it a few microseconds gained nothing over not
    /// waiting.
    fn try_lock(&self) -> Option<MutexGuard<'_, Writer>> {
        match self.writer.try_lock() {
            Ok(w) => Some(w),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the channel, then wait for the writer to finish what was queued, so that the
        // file lock is released when the store is dropped.
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// The embedded event store: a redb file with a group-commit writer thread.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn map_open_error(path: &Path, e: DatabaseError) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::AlreadyOpen {
                path: path.to_path_buf(),
            }
        }
        DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::NotFound =>
        {
            StoreError::NotFound {
                path: path.to_path_buf(),
            }
        }
        DatabaseError::Storage(redb::StorageError::Io(io))
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: io.to_string(),
            }
        }
        DatabaseError::Storage(redb::StorageError::Io(io)) => {
            StoreError::Backend(format!("cannot open {}: {io}", path.display()))
        }
        other => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

impl RedbStore {
    /// Opens (creating if needed) the store at `path` for writing with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    /// Opens an existing store read-only; works while another process writes to it.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(
            path,
            StoreOptions {
                create: false,
                read_only: true,
                ..StoreOptions::default()
            },
        )
    }

    /// Opens the store at `path` with explicit options.
    pub fn open_with(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let exists = path.exists();
        if !exists && (opts.read_only || !opts.create) {
            return Err(StoreError::NotFound { path });
        }
        if exists && path.is_dir() {
            return Err(StoreError::Corrupt {
                path,
                detail: "it is a directory".into(),
            });
        }
        let mut builder = Database::builder();
        builder
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .set_cache_size(opts.cache_bytes);
        if opts.read_only {
            // A writer that died may have left acknowledged changes only in its write-ahead
            // log. If no writer holds the store now, a short read-write open replays them, so
            // this reader sees everything that was acknowledged.
            let wal_len = std::fs::metadata(crate::wal::wal_path(&path)).map(|m| m.len());
            if wal_len.is_ok_and(|n| n > 0) {
                match Self::open_with(
                    &path,
                    StoreOptions {
                        create: false,
                        read_only: false,
                        ..opts.clone()
                    },
                ) {
                    Ok(s) => drop(s),
                    // A live writer has them and checkpoints them within moments.
                    Err(StoreError::AlreadyOpen { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            let db = match builder.open_read_only(&path) {
                Ok(db) => db,
                // A writer died mid-commit and the file needs redb's repair, which a read-only
                // handle may not do. If no writer holds the file, repair it with a short
                // read-write open (repair only rolls back to the last durable commit).
                Err(DatabaseError::RepairAborted) => {
                    drop(
                        Database::builder()
                            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
                            .create(&path)
                            .map_err(|e| map_open_error(&path, e))?,
                    );
                    builder
                        .open_read_only(&path)
                        .map_err(|e| map_open_error(&path, e))?
                }
                Err(e) => return Err(map_open_error(&path, e)),
            };
            let txn = db.begin_read()?;
            match txn.open_table(META) {
                Ok(t) => {
                    let v = t.get("format_version")?.map(|v| v.value());
                    check_format(&path, v)?;
                }
                Err(TableError::TableDoesNotExist(_)) => {
                    if txn.list_tables()?.next().is_some() {
                        return Err(not_cairn(&path));
                    }
                }
                Err(e) => return Err(e.into()),
            }
            drop(txn);
            return Ok(RedbStore {
                inner: Arc::new(Inner {
                    path,
                    counters: Arc::default(),
                    dirty: Arc::default(),
                    db: Db::Ro(db),
                    tx: None,
                    shared: None,
                    writer: None,
                    max_payload_bytes: opts.max_payload_bytes,
                }),
            });
        }
        let db = builder
            .create(&path)
            .map_err(|e| map_open_error(&path, e))?;
        init_format(&path, &db)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::sync_channel(QUEUE_OPS_MAX);
        let writer_db = Arc::clone(&db);
        let durability = opts.durability;
        let counters: Arc<Counters> = Arc::default();
        let writer_counters = Arc::clone(&counters);
        let dirty: Arc<AtomicBool> = Arc::default();
        // Recovery from the write-ahead log happens here, so its errors surface at open.
        let w = Writer::open(
            writer_db,
            path.clone(),
            durability,
            opts.checkpoint_interval,
            writer_counters,
            Arc::clone(&dirty),
            // A log without its store file (deleted, or moved away) belongs to another store.
            !exists,
        )?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(w),
            queued: AtomicUsize::new(0),
            inflight: Arc::default(),
            alone_streak: AtomicUsize::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("cairn-writer".into())
            .spawn(move || writer_thread(&thread_shared, &rx))
            .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                path,
                counters,
                dirty,
                db: Db::Rw(db),
                tx: Some(tx),
                shared: Some(shared),
                writer: Some(writer),
                max_payload_bytes: opts.max_payload_bytes,
            }),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// What the group-commit writer has done since the store was opened.
    pub fn writer_stats(&self) -> WriterStats {
        let c = &self.inner.counters;
        WriterStats {
            commits: c.commits.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            ops: c.ops.load(Ordering::Relaxed),
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            leader_commits: c.leader_commits.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
        }
    }

    /// Whether this handle can only read.
    pub fn is_read_only(&self) -> bool {
        self.inner.tx.is_none()
    }

    fn send(
        &self,
        make: impl FnOnce(Reply) -> Op,
    ) -> BoxFuture<'static, Result<Appended, StoreError>> {
        let (Some(tx), Some(shared)) = (&self.inner.tx, &self.inner.shared) else {
            return Box::pin(async { Err(StoreError::ReadOnly) });
        };
        let alone = shared.inflight.load(Ordering::Acquire) == 0;
        let streak = if alone {
            shared.alone_streak.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            shared.alone_streak.store(0, Ordering::Relaxed);
            0
        };
        let (reply, rx) = Reply::new(&shared.inflight);
        let op = make(reply);
        // Under load: nothing queued before this operation and the lock free, so work it out
        // into the open record here, on this thread (no hand-off to the writer thread, which
        // only seals and writes). If a write is in flight the writer thread takes the open
        // record when it returns; if it is waiting for work, wake it. (A sequential caller
        // takes the leader path below instead.)
        if shared.queued.load(Ordering::Acquire) == 0
            && !matches!(op, Op::Checkpoint { .. })
            && let Some(mut w) = shared.try_lock()
            && shared.queued.load(Ordering::Acquire) == 0
            && (streak < LEADER_STREAK || w.writing || !w.open.is_empty())
            // Beyond a batch's worth the caller queues (and waits when the queue is full).
            && w.open.ops < BATCH_OPS_MAX as u64
            && w.open.bytes < BATCH_BYTES_MAX
        {
            w.prepare(vec![op]);
            let wake = std::mem::take(&mut w.idle);
            drop(w);
            if wake {
                let _ = tx.try_send(Op::Tick);
            }
            return Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? });
        }
        // Leader path: when nothing is queued, open or being written and this caller has been
        // alone for a streak of ops (a sequential workflow), commit on this thread (one durable
        // log write) instead of waking the writer thread and being woken by it. A sequential
        // workflow then pays the disk's latency and little else.
        if streak >= LEADER_STREAK && shared.queued.load(Ordering::Acquire) == 0 {
            match shared.writer.try_lock() {
                Ok(mut w)
                    if shared.queued.load(Ordering::Acquire) == 0
                        && !w.writing
                        && w.open.is_empty() =>
                {
                    let was_clean = w.dirty_since.is_none();
                    // Written, fdatasynced and answered on this thread.
                    let answers = w.commit_batch(vec![op]);
                    self.inner
                        .counters
                        .leader_commits
                        .fetch_add(1, Ordering::Relaxed);
                    let now_dirty = w.dirty_since.is_some();
                    drop(w);
                    answers.send();
                    if was_clean && now_dirty {
                        // The writer thread schedules the checkpoint.
                        let _ = tx.try_send(Op::Tick);
                    }
                    return Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? });
                }
                // Busy, poisoned, or an op was queued meanwhile: queue behind it.
                _ => {}
            }
        }
        self.enqueue(tx, shared, op, rx)
    }

    fn enqueue(
        &self,
        tx: &mpsc::SyncSender<Op>,
        shared: &Shared,
        op: Op,
        rx: oneshot::Receiver<Result<Appended, StoreError>>,
    ) -> BoxFuture<'static, Result<Appended, StoreError>> {
        shared.queued.fetch_add(1, Ordering::AcqRel);
        let sent = tx.send(op).map_err(|_| {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            StoreError::Closed
        });
        Box::pin(async move {
            sent?;
            rx.await.map_err(|_| StoreError::Closed)?
        })
    }

    /// Before a read: if acknowledged changes are not checkpointed yet, have the writer
    /// checkpoint them, so that a reader in this process sees everything it was told is durable.
    fn fresh(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        if !self.inner.dirty.load(Ordering::Acquire) {
            return Box::pin(async { Ok(()) });
        }
        let f = self.send(|reply| Op::Checkpoint { reply });
        Box::pin(async move { f.await.map(|_| ()) })
    }

    fn check_sizes(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        for e in events {
            if e.payload.len() > self.inner.max_payload_bytes {
                return Err(StoreError::PayloadTooLarge {
                    bytes: e.payload.len(),
                    max_bytes: self.inner.max_payload_bytes,
                });
            }
        }
        Ok(())
    }

    fn read_run(&self, id: RunId) -> Result<Option<RunMeta>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = match txn.open_table(RUNS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match table.get(id.as_u128())? {
            Some(v) => decode_run(&self.inner.path, v.value()).map(Some),
            None => Ok(None),
        }
    }

    fn read_runs(&self, filter: &RunFilter) -> Result<Vec<RunMeta>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let runs = match txn.open_table(RUNS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        match filter.status {
            None => {
                for row in runs.iter()?.rev() {
                    if out.len() >= limit {
                        break;
                    }
                    let (_, v) = row?;
                    out.push(decode_run(&self.inner.path, v.value())?);
                }
            }
            Some(status) => {
                let idx = txn.open_table(RUNS_BY_STATUS)?;
                let c = status.code();
                for row in idx.range((c, 0u128)..=(c, u128::MAX))?.rev() {
                    if out.len() >= limit {
                        break;
                    }
                    let (k, _) = row?;
                    let id = k.value().1;
                    if let Some(v) = runs.get(id)? {
                        out.push(decode_run(&self.inner.path, v.value())?);
                    }
                }
            }
        }
        Ok(out)
    }

    fn read_wakeups(
        &self,
        until_us: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(RunId, i64)>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = match txn.open_table(WAKEUPS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let end = until_us.unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for row in table
            .range((i64::MIN, 0u128)..=(end, u128::MAX))?
            .take(limit)
        {
            let (k, _) = row?;
            let (t, id) = k.value();
            out.push((RunId::from_u128(id), t));
        }
        Ok(out)
    }

    fn read_events(
        &self,
        run: RunId,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let id = run.as_u128();
        let mut out = Vec::with_capacity(limit.min(4096));
        // A run's events from before format 2 (one row each), then those in chunks: the
        // chunks of a run only ever follow its rows.
        match txn.open_table(EVENTS) {
            Ok(table) => {
                for row in table.range((id, from.0)..=(id, u64::MAX))?.take(limit) {
                    let (k, v) = row?;
                    out.push(decode(run, Seq(k.value().1), v.value())?);
                }
            }
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let next = out.last().map_or(from, |e| Seq(e.seq.0 + 1));
        match txn.open_table(EVENT_CHUNKS) {
            Ok(table) => crate::chunks::read(&table, run, next, limit, &mut out)?,
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(out)
    }
}

fn not_cairn(path: &Path) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: "the file is a redb database without cairn's tables".into(),
    }
}

fn check_format(path: &Path, found: Option<u32>) -> Result<(), StoreError> {
    match found {
        Some(v) if v > STORE_FORMAT => Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found: v,
            supported: STORE_FORMAT,
        }),
        _ => Ok(()),
    }
}

fn init_format(path: &Path, db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    let ours = [
        "events",
        "event_chunks",
        "runs",
        "runs_by_status",
        "meta",
        "wakeups",
        "wal_state",
    ];
    let foreign = txn.list_tables()?.any(|t| !ours.contains(&t.name()));
    {
        let mut meta = txn.open_table(META)?;
        let found = meta.get("format_version")?.map(|v| v.value());
        if found.is_none() && foreign {
            return Err(not_cairn(path));
        }
        check_format(path, found)?;
        // A new store, or one of an older format this binary writes in its own from now on
        // (format 1 → 2: new events go to chunks; an older binary must then refuse the file
        // rather than miss them).
        if found != Some(STORE_FORMAT) {
            meta.insert("format_version", STORE_FORMAT)?;
        }
        // Creating the tables up front lets read-only handles open them before the first run.
        txn.open_table(EVENT_CHUNKS)?;
        txn.open_table(RUNS)?;
        txn.open_table(RUNS_BY_STATUS)?;
        txn.open_table(WAKEUPS)?;
        txn.open_table(WAL_STATE)?;
    }
    txn.commit()?;
    Ok(())
}

fn encode_run(meta: &RunMeta) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(meta, vec![RUN_ROW_VERSION])
        .map_err(|e| StoreError::Backend(format!("cannot encode a run row: {e}")))
}

fn decode_run(path: &Path, bytes: &[u8]) -> Result<RunMeta, StoreError> {
    match bytes.split_first() {
        Some((&v, body)) if v == RUN_ROW_VERSION => {
            postcard::from_bytes(body).map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("a run row cannot be decoded: {e}"),
            })
        }
        Some((&v, _)) if v > RUN_ROW_VERSION => Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found: u32::from(v),
            supported: u32::from(RUN_ROW_VERSION),
        }),
        _ => Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: "a run row is empty or has an unknown version".into(),
        }),
    }
}

/// The group-commit writer: owns all writes to the file.
///
/// Each batch is applied to an open redb write transaction, logged to the write-ahead log
/// (one fdatasync), and acknowledged. The transaction is committed as a checkpoint every
/// [`StoreOptions::checkpoint_interval`], when a reader in this process asks, or when the log is full.
struct Writer {
    db: Arc<Database>,
    path: PathBuf,
    /// Cached run rows, so an append does not read the row back first.
    runs: FxHashMap<u128, RunMeta>,
    /// Runs whose cached row is newer than the row in the open transaction only by `events`,
    /// `head` and `updated_us`: a plain append does not log or write the row (recovery rebuilds
    /// those fields from the logged events); the row is written at the next checkpoint.
    stale_rows: FxHashSet<u128>,
    counters: Arc<Counters>,
    wal: Wal,
    /// The open transaction holding everything logged since the last checkpoint, and the
    /// logged batches the apply thread has yet to write into it.
    txn: Arc<Txn>,
    /// Whether a transaction is open (only this writer opens and commits it).
    has_txn: bool,
    /// The apply thread (joined on drop).
    applier: Option<JoinHandle<()>>,
    /// The last log sequence number written.
    lsn: u64,
    /// When the oldest change not yet checkpointed was made.
    dirty_since: Option<Instant>,
    /// How long changes may wait in the log before a checkpoint.
    interval: Duration,
    /// Set while changes are not checkpointed, so same-process readers ask for a checkpoint.
    dirty: Arc<AtomicBool>,
    /// Set after a failure the writer cannot recover from; every later write gets it.
    failed: Option<String>,
    /// The operations worked out since the last record was sealed: the next log record.
    open: OpenRecord,
    /// Set while the writer thread writes a sealed record (outside the lock): nothing else may
    /// write the log or checkpoint until it is done.
    writing: bool,
    /// Set while the writer thread waits for work with nothing open: a caller that adds to
    /// the open record wakes it.
    idle: bool,
    /// A failure met while a record was being written, which only the writer thread may
    /// recover from (recovery rereads and restarts the log): until it has, operations are
    /// refused with it.
    broken: Option<String>,
}

/// Operations worked out (their run-cache changes made, their changes and answers kept) and
/// not yet written: the writer thread seals them into one log record when its previous write
/// returns, writes it without the lock, and answers them.
#[derive(Default)]
struct OpenRecord {
    changes: Vec<Change>,
    answers: Vec<(Reply, Result<Appended, StoreError>)>,
    ops: u64,
    events: u64,
    /// The operations' payload bytes (as [`Op::bytes`] counts them).
    bytes: usize,
}

impl OpenRecord {
    fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

/// A sealed record being written: what to answer and apply once it is durable.
struct InFlight {
    changes: Vec<Change>,
    answers: Vec<(Reply, Result<Appended, StoreError>)>,
    ops: u64,
    events: u64,
}

/// What [`Writer::seal_start`] made of the open record.
enum Sealed {
    /// Nothing to write (no changes, made durable by a checkpoint, or failed): answer these.
    Done(Answers),
    /// Encode this record, with this sequence number (outside the lock), then
    /// [`Writer::seal_place`].
    Encode(u64, InFlight),
}

/// What [`Writer::seal_place`] (or [`Writer::seal`]) made of a sealed record.
enum Placed {
    /// Nothing to write (it failed): answer these.
    Done(Answers),
    /// Write this record (outside the lock), then [`Writer::finish`].
    Write(PendingWrite, InFlight),
}

/// The error of an operation refused because the writer stopped after `failure`.
fn stopped(failure: &str) -> String {
    format!("the store's writer stopped after a failure ({failure}); reopen the store")
}

/// Operations in a row that must find nothing else in flight before a caller commits itself.
/// Interleaved medians (session 4): `many` 188k steps/s with 1 (every lone op), 223k with 5,
/// 226k with the leader path off; `seq` and `fanout` the same within noise with 5.
const LEADER_STREAK: usize = 5;

/// Committed batches left queued for the apply thread before a commit wakes it; the writer
/// thread also wakes it for any backlog when it runs out of work. Waking it after every commit
/// (a futex wake, and a thread taking a core for a few microseconds of B-tree inserts) cost
/// more than the inserts: interleaved medians (session 9, `bench fanout --branches 10000
/// --rounds 5`, 8 runs each): 84.8k branches/s waking after every commit, 92.3k with 16,
/// 93.5k with 64, CPU per branch 11.2 → 9.7 µs; `bench many --workflows 1000` 222k → 236k
/// steps/s, `seq` 6.8k → 8.0k (6 and 4 runs). A checkpoint or a reader in this process applies
/// whatever is queued itself, so the backlog only moves the B-tree work, never its outcome.
const APPLY_BACKLOG: usize = 64;

/// The default of [`StoreOptions::checkpoint_interval`].
///
/// Each checkpoint writes every page the transaction dirtied and fsyncs twice, so under load a
/// longer interval writes hot pages once instead of several times: measured on `bench many
/// --workflows 5000`, 128k steps/s at 50 ms, 158k at 150 ms, 172k at 250 ms, 194k at 1 s.
/// Readers in other processes lag by up to this much.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// The log is checkpointed and restarted once it holds this many bytes.
const WAL_BYTES_MAX: u64 = 32 * 1024 * 1024;

impl Writer {
    /// A writer over `db`, after replaying whatever the log holds past the last checkpoint.
    fn open(
        db: Arc<Database>,
        path: PathBuf,
        durability: Durability,
        interval: Duration,
        counters: Arc<Counters>,
        dirty: Arc<AtomicBool>,
        fresh: bool,
    ) -> Result<Self, StoreError> {
        let wal = Wal::open(&path, durability == Durability::Immediate)?;
        let txn = Arc::new(Txn::default());
        let applier = {
            let txn = Arc::clone(&txn);
            std::thread::Builder::new()
                .name("cairn-apply".into())
                .spawn(move || apply_thread(&txn))
                .map_err(|e| StoreError::Backend(format!("cannot start the apply thread: {e}")))?
        };
        let mut w = Writer {
            db,
            path,
            runs: FxHashMap::with_capacity_and_hasher(4096, Default::default()),
            stale_rows: FxHashSet::default(),
            counters,
            wal,
            txn,
            has_txn: false,
            applier: Some(applier),
            lsn: 0,
            dirty_since: None,
            interval,
            dirty,
            failed: None,
            open: OpenRecord::default(),
            writing: false,
            idle: false,
            broken: None,
        };
        if fresh {
            w.wal.truncate()?;
        }
        w.recover()?;
        w.wal.preallocate()?;
        Ok(w)
    }

    /// Replays the log after the last checkpoint into a fresh transaction and checkpoints it.
    fn recover(&mut self) -> Result<(), StoreError> {
        let shared = Arc::clone(&self.txn);
        let mut slot = shared.discard();
        self.has_txn = false;
        self.runs.clear();
        self.stale_rows.clear();
        let mut open = OpenTxn::new(self.db.begin_write()?);
        let txn = &open.txn;
        let checkpoint = {
            let t = txn.open_table(WAL_STATE)?;
            t.get("checkpoint_lsn")?.map(|v| v.value()).unwrap_or(0)
        };
        let records = self.wal.scan(checkpoint)?;
        if let Some((first, _)) = records.first()
            && *first != checkpoint + 1
        {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!(
                    "the write-ahead log starts at record {first} but the store's checkpoint is {checkpoint}"
                ),
            });
        }
        self.lsn = checkpoint;
        // The last logged event of each run: plain appends do not log the run's row, so its
        // event count, head and update time are rebuilt from them.
        let mut last: FxHashMap<u128, (u64, &[u8])> = FxHashMap::default();
        for (lsn, changes) in &records {
            apply(&mut open, changes)?;
            for c in changes {
                if let Change::Event { run, seq, bytes } = c {
                    last.insert(*run, (*seq, bytes.as_slice()));
                }
            }
            self.lsn = *lsn;
        }
        {
            let mut runs = open.txn.open_table(RUNS)?;
            for (run, (seq, bytes)) in last {
                let id = RunId::from_u128(run);
                let mut meta = match runs.get(run)? {
                    Some(row) => decode_run(&self.path, row.value())?,
                    None => {
                        return Err(StoreError::Corrupt {
                            path: self.path.clone(),
                            detail: format!(
                                "the write-ahead log has events of run {id}, which has no row"
                            ),
                        });
                    }
                };
                if meta.events <= seq {
                    let rec = decode(id, Seq(seq), bytes)?;
                    meta.events = seq + 1;
                    meta.head = rec.hash;
                    meta.updated_us = meta.updated_us.max(rec.ts_us);
                    runs.insert(run, encode_run(&meta)?.as_slice())?;
                }
            }
        }
        *slot = Some(open);
        self.has_txn = true;
        drop(slot);
        self.checkpoint()
    }

    /// Whether the oldest unchecked change has waited a full interval.
    fn checkpoint_due(&self) -> bool {
        self.dirty_since
            .is_some_and(|since| since.elapsed() >= self.interval)
    }

    /// Commits the open transaction (with redb's fsyncs) and restarts the log.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        let shared = Arc::clone(&self.txn);
        let mut open = shared.drained()?;
        self.stage_rows_into(open.as_ref().map(|o| &o.txn))?;
        let taken = open.take();
        self.has_txn = false;
        let Some(OpenTxn { txn, mut pending }) = taken else {
            return Ok(());
        };
        pending.flush(&txn)?;
        {
            let mut t = txn.open_table(WAL_STATE)?;
            t.insert("checkpoint_lsn", self.lsn)?;
        }
        txn.commit()?;
        self.wal.reset();
        self.dirty_since = None;
        self.dirty.store(false, Ordering::Release);
        self.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the rows of runs appended to since they were last written into the open
    /// transaction.
    fn stage_rows(&mut self) -> Result<(), StoreError> {
        if self.stale_rows.is_empty() {
            return Ok(());
        }
        let shared = Arc::clone(&self.txn);
        let open = shared.drained()?;
        self.stage_rows_into(open.as_ref().map(|o| &o.txn))
    }

    /// [`Writer::stage_rows`] into a drained transaction.
    fn stage_rows_into(&mut self, txn: Option<&redb::WriteTransaction>) -> Result<(), StoreError> {
        if self.stale_rows.is_empty() {
            return Ok(());
        }
        let Some(txn) = txn else {
            return Ok(());
        };
        let mut runs = txn.open_table(RUNS)?;
        for id in self.stale_rows.drain() {
            if let Some(meta) = self.runs.get(&id) {
                runs.insert(id, encode_run(meta)?.as_slice())?;
            }
        }
        Ok(())
    }

    fn checkpoint_or_fail(&mut self) {
        if let Err(e) = self.checkpoint() {
            self.fail(e);
        }
    }

    /// After a failure mid-batch: drop the open transaction and rebuild it from the log; if
    /// even that fails, refuse every later write (reopening the store recovers).
    fn fail(&mut self, e: StoreError) {
        // The open record's operations were worked out on top of what failed.
        self.fail_open(&e.to_string());
        drop(self.txn.discard());
        self.has_txn = false;
        if let Err(again) = self.recover() {
            self.failed = Some(format!(
                "{e}; recovery from the write-ahead log failed: {again}"
            ));
        }
    }

    /// Answers the open record's operations with an error: they were worked out on top of a
    /// write or state that failed, and are not recorded.
    fn fail_open(&mut self, why: &str) {
        let open = std::mem::take(&mut self.open);
        for (reply, _) in open.answers {
            reply.send(Err(StoreError::Backend(format!(
                "not recorded: an earlier write to the store failed ({why})"
            ))));
        }
    }

    /// Works out `batch` into the open record (the writer thread's batch, or one operation of
    /// a caller that holds the lock): run-cache changes now, the log record when the writer
    /// thread seals it. A `Checkpoint` has the open record written first.
    fn prepare(&mut self, batch: Vec<Op>) {
        // A failed apply: rebuild from the log (not while a record is being written: the
        // writer thread does it when the write returns).
        if !self.writing
            && let Some(e) = self.txn.take_error()
        {
            self.fail(StoreError::Backend(e));
        }
        let mut work = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for op in batch {
            self.open.bytes += op.bytes();
            match op.split() {
                Split::Work(reply, w) => {
                    replies.push(reply);
                    work.push(w);
                }
                Split::Checkpoint(reply) => {
                    self.prepare_work(std::mem::take(&mut work), std::mem::take(&mut replies));
                    self.flush_open();
                    let r = match &self.failed {
                        Some(f) => Err(StoreError::Backend(stopped(f))),
                        None => match self.checkpoint() {
                            Ok(()) => Ok(()),
                            Err(e) => {
                                let msg = e.to_string();
                                // Rebuilt from the log and checkpointed: the reader sees
                                // everything after all, unless that failed too.
                                self.fail(e);
                                if self.failed.is_some() {
                                    Err(StoreError::Backend(msg))
                                } else {
                                    Ok(())
                                }
                            }
                        },
                    };
                    reply.send(r.map(|()| Appended {
                        first: Seq(0),
                        next: Seq(0),
                        head: [0; 32],
                    }));
                }
                Split::Tick => {}
            }
        }
        self.prepare_work(work, replies);
    }

    /// [`Writer::prepare`] for operations without a `Checkpoint`.
    fn prepare_work(&mut self, work: Vec<Work>, replies: Vec<Reply>) {
        if replies.is_empty() {
            return;
        }
        let refused = match (&self.failed, &self.broken) {
            (Some(f), _) => Some(stopped(f)),
            (None, Some(b)) => Some(format!("not recorded: a write to the store failed ({b})")),
            (None, None) => None,
        };
        if let Some(msg) = refused {
            for reply in replies {
                reply.send(Err(StoreError::Backend(msg.clone())));
            }
            return;
        }
        let ops = work.len() as u64;
        let events = work.iter().map(Work::events).sum::<usize>() as u64;
        match self.write_batch(work) {
            Ok((results, changes)) => {
                if self.open.changes.is_empty() {
                    self.open.changes = changes;
                } else {
                    self.open.changes.extend(changes);
                }
                self.open.answers.extend(replies.into_iter().zip(results));
                self.open.ops += ops;
                self.open.events += events;
            }
            Err(e) => {
                let msg = e.to_string();
                self.fail_soon(e);
                for reply in replies {
                    reply.send(Err(StoreError::Backend(msg.clone())));
                }
            }
        }
        if self.runs.len() > RUN_CACHE_MAX {
            // The rows of the evicted runs go into the transaction first (it is committed only
            // by a checkpoint, which writes the open record first).
            match self.stage_rows() {
                Ok(()) => self.runs.clear(),
                Err(e) => self.fail_soon(e),
            }
        }
    }

    /// [`Writer::fail`] now, or, while a record is being written, as soon as it is (by the
    /// writer thread; operations are refused until then).
    fn fail_soon(&mut self, e: StoreError) {
        if self.writing {
            let msg = e.to_string();
            self.fail_open(&msg);
            self.broken.get_or_insert(msg);
        } else {
            self.fail(e);
        }
    }

    /// Seals the open record: the next log record, to write outside the lock (or answered
    /// here when it has nothing to write). Only when no write is in flight.
    fn seal(&mut self) -> Placed {
        match self.seal_start() {
            Sealed::Encode(lsn, flight) => {
                let rec = crate::wal::encode_record(lsn, &flight.changes);
                self.seal_place(rec, flight)
            }
            Sealed::Done(answers) => Placed::Done(answers),
        }
    }

    /// The first half of [`Writer::seal`]: takes the open record and gives it its sequence
    /// number; the caller encodes it ([`crate::wal::encode_record`], without the lock) and
    /// hands it to [`Writer::seal_place`].
    fn seal_start(&mut self) -> Sealed {
        debug_assert!(!self.writing, "one record written at a time");
        let open = std::mem::take(&mut self.open);
        match self.log_fits(&open.changes) {
            Ok(true) => {
                self.writing = true;
                Sealed::Encode(
                    self.lsn,
                    InFlight {
                        changes: open.changes,
                        answers: open.answers,
                        ops: open.ops,
                        events: open.events,
                    },
                )
            }
            Ok(false) => {
                if !open.changes.is_empty() {
                    // Made durable by a checkpoint.
                    self.counters.commits.fetch_add(1, Ordering::Relaxed);
                    self.counters.ops.fetch_add(open.ops, Ordering::Relaxed);
                    self.counters
                        .events
                        .fetch_add(open.events, Ordering::Relaxed);
                }
                Sealed::Done(Answers {
                    list: open.answers,
                    apply: None,
                })
            }
            Err(e) => {
                let msg = e.to_string();
                self.fail(e);
                Sealed::Done(Answers {
                    list: open
                        .answers
                        .into_iter()
                        .map(|(reply, _)| (reply, Err(StoreError::Backend(msg.clone()))))
                        .collect(),
                    apply: None,
                })
            }
        }
    }

    /// The second half of [`Writer::seal`]: places the encoded record in the log.
    fn seal_place(&mut self, rec: Result<Vec<u8>, StoreError>, flight: InFlight) -> Placed {
        match rec.and_then(|rec| self.wal.place(&rec)) {
            Ok(pending) => {
                self.logged();
                Placed::Write(pending, flight)
            }
            Err(e) => {
                self.writing = false;
                let msg = e.to_string();
                self.broken = None;
                self.fail(e);
                Placed::Done(Answers {
                    list: flight
                        .answers
                        .into_iter()
                        .map(|(reply, _)| (reply, Err(StoreError::Backend(msg.clone()))))
                        .collect(),
                    apply: None,
                })
            }
        }
    }

    /// After the sealed record's write: counts it and queues its changes for the apply thread,
    /// or fails it (and the open record, worked out on top of it). Returns its answers.
    fn finish(
        &mut self,
        pending: PendingWrite,
        flight: InFlight,
        written: Result<(), WriteError>,
    ) -> Answers {
        self.writing = false;
        let durable = pending.durable();
        self.wal.written(pending);
        let error = match written {
            Ok(()) => {
                if durable {
                    self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                }
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                self.counters.ops.fetch_add(flight.ops, Ordering::Relaxed);
                self.counters
                    .events
                    .fetch_add(flight.events, Ordering::Relaxed);
                self.txn.defer(flight.changes);
                if let Some(b) = self.broken.take() {
                    // A failure met while this record was written: recover now (from the log,
                    // which has this record: its answers stand).
                    self.fail(StoreError::Backend(b));
                }
                return Answers {
                    list: flight.answers,
                    apply: Some(Arc::clone(&self.txn)),
                };
            }
            // Nothing of it is durable: rebuild from the log (failing the open record too).
            Err(WriteError::Write(e)) => {
                self.broken = None;
                let msg = e.to_string();
                self.fail(e);
                msg
            }
            // The kernel may have dropped the log's unwritten pages: stop until a reopen.
            Err(WriteError::Sync(e)) => {
                self.broken = None;
                let msg = e.to_string();
                self.failed = Some(msg.clone());
                self.fail_open(&msg);
                msg
            }
        };
        Answers {
            list: flight
                .answers
                .into_iter()
                .map(|(reply, _)| (reply, Err(StoreError::Backend(error.clone()))))
                .collect(),
            apply: None,
        }
    }

    /// Writes the open record now, holding the lock (before a checkpoint, or at close).
    fn flush_open(&mut self) {
        if self.open.is_empty() {
            return;
        }
        match self.seal() {
            Placed::Done(answers) => answers.send(),
            Placed::Write(mut pending, flight) => {
                let written = pending.write();
                self.finish(pending, flight, written).send();
            }
        }
    }

    /// Commits a batch: works out its changes, writes them to the log as one record,
    /// fdatasyncs the log (one fdatasync for the whole batch), answers every operation, and
    /// only then queues the changes for the apply thread (neither the callers nor this thread
    /// wait for the B-tree inserts; the log is what makes them durable).
    #[must_use = "the answers must be sent"]
    fn commit_batch(&mut self, batch: Vec<Op>) -> Answers {
        let mut answers = Answers {
            list: Vec::with_capacity(batch.len()),
            apply: None,
        };
        if batch.iter().all(|op| matches!(op, Op::Tick)) {
            return answers;
        }
        // The apply thread failed on an earlier batch: rebuild the transaction from the log.
        if let Some(e) = self.txn.take_error() {
            self.fail(StoreError::Backend(e));
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut work = Vec::with_capacity(batch.len());
        let mut want_checkpoint = false;
        let mut checkpoint_ops: Vec<usize> = Vec::new();
        for op in batch {
            match op.split() {
                Split::Work(reply, w) => {
                    replies.push(reply);
                    work.push(w);
                }
                Split::Checkpoint(reply) => {
                    want_checkpoint = true;
                    checkpoint_ops.push(replies.len());
                    replies.push(reply);
                    work.push(Work::Flush);
                }
                Split::Tick => {}
            }
        }
        if let Some(f) = &self.failed {
            let msg = stopped(f);
            for reply in replies {
                answers
                    .list
                    .push((reply, Err(StoreError::Backend(msg.clone()))));
            }
            return answers;
        }
        let ops = work.len() as u64;
        let events = work.iter().map(Work::events).sum::<usize>() as u64;
        let outcome = self.write_batch(work).and_then(|(results, changes)| {
            let pending = self.log(&changes)?;
            Ok((results, pending.map(|p| (p, changes))))
        });
        // The record's durable write. A failed fdatasync fails the batch and stops the writer:
        // the kernel may have dropped the log's unwritten pages, so only a reopen (which
        // replays what the log really holds) can tell what is durable.
        let mut deferred = None;
        let outcome = match outcome {
            Ok((results, Some((mut pending, changes)))) => {
                let written = pending.write();
                let durable = pending.durable();
                self.wal.written(pending);
                match written {
                    Ok(()) => {
                        if durable {
                            self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                        }
                        deferred = Some(changes);
                        Ok(results)
                    }
                    Err(WriteError::Write(e)) => Err(e),
                    Err(WriteError::Sync(e)) => {
                        self.failed = Some(e.to_string());
                        Err(e)
                    }
                }
            }
            Ok((results, None)) => Ok(results),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(mut results) => {
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                self.counters.ops.fetch_add(ops, Ordering::Relaxed);
                self.counters.events.fetch_add(events, Ordering::Relaxed);
                // The batch is durable in the log; a failed checkpoint only fails the readers
                // that asked for it (their read would not see everything).
                if want_checkpoint
                    && let Err(e) = deferred
                        .take()
                        .map_or(Ok(()), |c| self.apply_changes(&c))
                        .and_then(|()| self.checkpoint())
                {
                    let msg = e.to_string();
                    // `fail` rebuilds the transaction from the log and checkpoints it: the
                    // readers then see everything after all, unless that failed too.
                    self.fail(e);
                    if self.failed.is_some() {
                        for (i, r) in results.iter_mut().enumerate() {
                            if checkpoint_ops.contains(&i) {
                                *r = Err(StoreError::Backend(msg.clone()));
                            }
                        }
                    }
                }
                answers.list.extend(replies.into_iter().zip(results));
                // Into the open transaction off the callers' wait (queued here, in log order;
                // the apply thread is woken after the answers): the log has the batch, and a
                // failure there rebuilds the transaction from it.
                if let Some(c) = deferred {
                    self.txn.defer(c);
                    answers.apply = Some(Arc::clone(&self.txn));
                }
            }
            Err(e) => {
                // Nothing of this batch is durable; rebuild the open transaction from the log.
                let msg = e.to_string();
                if self.failed.is_none() {
                    self.fail(e);
                }
                for reply in replies {
                    answers
                        .list
                        .push((reply, Err(StoreError::Backend(msg.clone()))));
                }
            }
        }
        if self.runs.len() > RUN_CACHE_MAX {
            // The rows of the evicted runs go into the transaction first.
            match self.stage_rows() {
                Ok(()) => self.runs.clear(),
                Err(e) => self.fail(e),
            }
        }
        answers
    }

    /// Applies a batch's changes to the open transaction now, after every batch queued before.
    fn apply_changes(&self, changes: &[Change]) -> Result<(), StoreError> {
        match self.txn.drained()?.as_mut() {
            Some(open) => apply(open, changes),
            None => Err(StoreError::Closed),
        }
    }

    /// Prepares a batch's changes as one log record, returning it for the caller to write
    /// (then the changes go to the open transaction); or, for a batch too large for the log or
    /// an empty one, returns `None` after applying the changes and making them durable by a
    /// checkpoint (or having none).
    fn log(&mut self, changes: &[Change]) -> Result<Option<PendingWrite>, StoreError> {
        if !self.log_fits(changes)? {
            return Ok(None);
        }
        let pending = self.wal.prepare(self.lsn, changes)?;
        self.logged();
        Ok(Some(pending))
    }

    /// Before a batch's changes are logged: gives them the next sequence number and returns
    /// `true` if they go into the log as one record; or, for a batch too large for the log or
    /// an empty one, returns `false` after applying the changes and making them durable by a
    /// checkpoint (or having none).
    fn log_fits(&mut self, changes: &[Change]) -> Result<bool, StoreError> {
        if changes.is_empty() {
            return Ok(false);
        }
        self.lsn += 1;
        let size: u64 = changes
            .iter()
            .map(|c| match c {
                Change::Event { bytes, .. } => bytes.len() as u64 + 24,
                Change::Run { row, .. } => row.len() as u64 + 24,
                _ => 32,
            })
            .sum();
        if size > WAL_BYTES_MAX / 2 {
            // Too large for the log: make it durable in redb directly.
            self.apply_changes(changes)?;
            return self.checkpoint().map(|()| false);
        }
        if self.wal.len() + size > WAL_BYTES_MAX {
            // The log is full: checkpoint what it holds and start over, with the new changes
            // in the open transaction, so the checkpoint covers them too.
            self.apply_changes(changes)?;
            return self.checkpoint().map(|()| false);
        }
        Ok(true)
    }

    /// After a record was placed in the log: the changes wait for a checkpoint from now.
    fn logged(&mut self) {
        if self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Works out a batch against the run cache (reading the open transaction on a miss) and
    /// returns the per-op results and the changes to log and then apply; nothing is written
    /// here. Per-op logical errors (unknown run, duplicate id, finished run) are returned in
    /// the results and change nothing.
    #[allow(clippy::type_complexity)]
    fn write_batch(
        &mut self,
        work: Vec<Work>,
    ) -> Result<(Vec<Result<Appended, StoreError>>, Vec<Change>), StoreError> {
        let shared = Arc::clone(&self.txn);
        if !self.has_txn {
            let mut open = shared.drained()?;
            if open.is_none() {
                *open = Some(OpenTxn::new(self.db.begin_write()?));
            }
            self.has_txn = true;
        }
        // The rows of runs not in the cache, read in one go (after the queued batches are
        // applied): a batch of appends to cached runs needs no read and does not wait for the
        // apply thread.
        let missing: Vec<u128> = work
            .iter()
            .filter_map(|w| match w {
                Work::Create(run, _) => Some(run.id.as_u128()),
                Work::Append(run, _, _) => Some(run.as_u128()),
                Work::Flush => None,
            })
            .filter(|id| !self.runs.contains_key(id))
            .collect();
        let mut stored: FxHashMap<u128, Option<Vec<u8>>> =
            FxHashMap::with_capacity_and_hasher(missing.len(), Default::default());
        if !missing.is_empty() {
            let open = shared.drained()?;
            let txn = &open.as_ref().ok_or(StoreError::Closed)?.txn;
            let runs = txn.open_table(RUNS)?;
            for id in missing {
                let row = runs.get(id)?.map(|v| v.value().to_vec());
                stored.insert(id, row);
            }
        }
        let mut results = Vec::with_capacity(work.len());
        // One change per event plus a few per op: allocated once, not grown.
        let events: usize = work.iter().map(Work::events).sum();
        let mut changes = Vec::with_capacity(events + work.len() * 2);
        // Runs whose row must be logged (created, or status or wake-up changed).
        let mut logged: Vec<u128> = Vec::new();
        let now = now_micros();
        {
            for w in work {
                match w {
                    Work::Flush => results.push(Ok(Appended {
                        first: Seq(0),
                        next: Seq(0),
                        head: [0; 32],
                    })),
                    Work::Create(run, evs) => {
                        let id = run.id.as_u128();
                        if self.runs.contains_key(&id)
                            || stored.get(&id).is_some_and(Option::is_some)
                        {
                            results.push(Err(StoreError::RunExists(run.id)));
                            continue;
                        }
                        let mut meta = RunMeta {
                            id: run.id,
                            workflow: run.workflow,
                            version: run.version,
                            status: run.status,
                            created_us: now,
                            updated_us: now,
                            parent: run.parent,
                            labels: run.labels,
                            events: 0,
                            head: genesis_hash(run.id),
                            wake_at_us: None,
                        };
                        changes.push(Change::Status {
                            code: meta.status.code(),
                            run: id,
                            present: true,
                        });
                        let a = append_events(&mut changes, &mut meta, &evs)?;
                        self.runs.insert(id, meta);
                        logged.push(id);
                        results.push(Ok(a));
                    }
                    Work::Append(run, evs, update) => {
                        let id = run.as_u128();
                        let meta = match self.runs.entry(id) {
                            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                            std::collections::hash_map::Entry::Vacant(v) => {
                                let Some(Some(row)) = stored.get(&id) else {
                                    results.push(Err(StoreError::UnknownRun(run)));
                                    continue;
                                };
                                v.insert(decode_run(&self.path, row)?)
                            }
                        };
                        if update.guard == Guard::NotFinished && meta.status.is_terminal() {
                            results.push(Err(StoreError::RunFinished {
                                run,
                                status: meta.status,
                            }));
                            continue;
                        }
                        let a = append_events(&mut changes, meta, &evs)?;
                        let mut row_changed = false;
                        if let Some(s) = update.status
                            && s != meta.status
                        {
                            row_changed = true;
                            changes.push(Change::Status {
                                code: meta.status.code(),
                                run: id,
                                present: false,
                            });
                            changes.push(Change::Status {
                                code: s.code(),
                                run: id,
                                present: true,
                            });
                            meta.status = s;
                        }
                        if let Some(wake) = update.wake_at_us
                            && wake != meta.wake_at_us
                        {
                            row_changed = true;
                            if let Some(old) = meta.wake_at_us {
                                changes.push(Change::Wake {
                                    at_us: old,
                                    run: id,
                                    present: false,
                                });
                            }
                            if let Some(new) = wake {
                                changes.push(Change::Wake {
                                    at_us: new,
                                    run: id,
                                    present: true,
                                });
                            }
                            meta.wake_at_us = wake;
                        }
                        meta.updated_us = now;
                        if row_changed {
                            logged.push(id);
                        } else {
                            self.stale_rows.insert(id);
                        }
                        results.push(Ok(a));
                    }
                }
            }
        }
        logged.sort_unstable();
        logged.dedup();
        for id in logged {
            if let Some(meta) = self.runs.get(&id) {
                self.stale_rows.remove(&id);
                changes.push(Change::Run {
                    run: id,
                    row: encode_run(meta)?,
                });
            }
        }
        Ok((results, changes))
    }
}

/// The writer thread: the log's only writer under load. It works the operations queued for it
/// into the open record (callers that find the lock free and nothing queued add theirs
/// themselves), seals the open record into one log record the moment its previous write
/// returns, writes it without holding the lock (so operations keep being worked out meanwhile:
/// the next record is ready when this write returns), answers its operations, and checkpoints
/// on schedule (also for changes callers committed themselves).
fn writer_thread(shared: &Shared, rx: &mpsc::Receiver<Op>) {
    let txn = Arc::clone(&shared.lock().txn);
    let mut carried: Option<Op> = None;
    loop {
        let mut batch: Vec<Op> = carried.take().into_iter().collect();
        let mut bytes = batch.first().map_or(0, Op::bytes);
        while batch.len() < BATCH_OPS_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(op) => {
                    bytes += op.bytes();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        let mut w = shared.lock();
        w.idle = false;
        if !batch.is_empty() {
            let queued = batch.iter().filter(|op| !matches!(op, Op::Tick)).count();
            w.prepare(batch);
            // Worked out: callers may add their own operations again once the queue is empty.
            shared.queued.fetch_sub(queued, Ordering::AcqRel);
        }
        if w.open.is_empty() {
            // Nothing to write: checkpoint if due, and wait for work (a caller that adds to
            // the open record meanwhile sees `idle` and wakes this thread).
            if w.checkpoint_due() {
                w.checkpoint_or_fail();
            }
            let wait = w
                .dirty_since
                .map(|since| (since + w.interval).saturating_duration_since(Instant::now()));
            w.idle = true;
            drop(w);
            // Have the apply thread take what commits left it (under load it is woken only for
            // a backlog of `APPLY_BACKLOG` batches).
            txn.wake();
            let got = match wait {
                Some(wait) => rx.recv_timeout(wait).map_err(|e| match e {
                    mpsc::RecvTimeoutError::Timeout => false,
                    mpsc::RecvTimeoutError::Disconnected => true,
                }),
                None => rx.recv().map_err(|_| true),
            };
            match got {
                Ok(op) => carried = Some(op),
                Err(false) => {}
                Err(true) => break,
            }
            continue;
        }
        let placed = match w.seal_start() {
            Sealed::Encode(lsn, flight) => {
                // Encoded without the lock: callers keep working out operations meanwhile.
                drop(w);
                let rec = crate::wal::encode_record(lsn, &flight.changes);
                w = shared.lock();
                w.seal_place(rec, flight)
            }
            Sealed::Done(answers) => Placed::Done(answers),
        };
        let answers = match placed {
            Placed::Done(answers) => {
                drop(w);
                answers
            }
            Placed::Write(mut pending, flight) => {
                drop(w);
                let written = pending.write();
                let mut w = shared.lock();
                let answers = w.finish(pending, flight, written);
                // Under steady load the open record is never empty here: checkpoint on schedule
                // anyway (answering first, then writing the open record), so readers in other
                // processes lag by one interval, not by a full log.
                if w.checkpoint_due() {
                    answers.send();
                    w.flush_open();
                    w.checkpoint_or_fail();
                    continue;
                }
                answers
            }
        };
        answers.send();
    }
    // Closing: write what is open, checkpoint everything and empty the log.
    let mut w = shared.lock();
    w.flush_open();
    if w.failed.is_none() && w.checkpoint().is_ok() {
        let _ = w.wal.truncate();
    }
}

/// A committed batch's answers, sent once the writer's lock is released (a caller answered
/// can then commit its next operation itself at once), and then the apply thread's wake-up.
struct Answers {
    list: Vec<(Reply, Result<Appended, StoreError>)>,
    /// The apply thread to wake: the batch's changes are queued for it.
    apply: Option<Arc<Txn>>,
}

impl Answers {
    /// Answers every caller, then wakes the apply thread.
    fn send(self) {
        for (reply, r) in self.list {
            reply.send(r);
        }
        if let Some(txn) = self.apply {
            txn.wake_for_backlog();
        }
    }
}

/// The open redb transaction, shared by the writer and the apply thread, and the logged
/// batches waiting to be written into it.
///
/// Batches are applied in the order they were logged: the apply thread and the writer (when it
/// needs the transaction: a read on a run-cache miss, a checkpoint) both take batches off the
/// queue only while holding `open`.
#[derive(Default)]
struct Txn {
    /// The open transaction (`None` between a checkpoint and the next batch).
    open: Mutex<Option<OpenTxn>>,
    /// Logged batches not yet applied, and the apply thread's state.
    queue: Mutex<ApplyQueue>,
    /// Wakes the apply thread.
    wake: Condvar,
}

#[derive(Default)]
struct ApplyQueue {
    batches: VecDeque<Vec<Change>>,
    /// The apply thread is waiting on `wake`.
    idle: bool,
    /// The writer is gone: the apply thread exits once the queue is empty.
    closed: bool,
    /// A failed apply: the writer rebuilds the transaction from the log.
    error: Option<String>,
    /// Tests: make the next apply fail.
    #[cfg(test)]
    fail_next: bool,
}

impl Txn {
    fn queue(&self) -> MutexGuard<'_, ApplyQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_open(&self) -> MutexGuard<'_, Option<OpenTxn>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a logged batch for the apply thread, without waking it: [`Txn::wake`] does,
    /// once the batch's callers are answered.
    fn defer(&self, changes: Vec<Change>) {
        self.queue().batches.push_back(changes);
    }

    /// Wakes the apply thread if it waits and [`APPLY_BACKLOG`] batches are queued (after each
    /// commit; the writer thread wakes it for any backlog before it waits for work).
    fn wake_for_backlog(&self) {
        let mut q = self.queue();
        if q.idle && q.batches.len() >= APPLY_BACKLOG {
            q.idle = false;
            self.wake.notify_one();
        }
    }

    /// Wakes the apply thread if it waits and batches are queued.
    fn wake(&self) {
        let mut q = self.queue();
        if q.idle && !q.batches.is_empty() {
            q.idle = false;
            self.wake.notify_one();
        }
    }

    /// The open transaction with every queued batch applied (here, if the apply thread has not
    /// got to them yet); an error if an apply failed (the caller rebuilds from the log).
    fn drained(&self) -> Result<MutexGuard<'_, Option<OpenTxn>>, StoreError> {
        let mut open = self.lock_open();
        apply_queued(&mut open, self)?;
        Ok(open)
    }

    /// Drops the open transaction and everything queued (the log holds it all), for a rebuild.
    fn discard(&self) -> MutexGuard<'_, Option<OpenTxn>> {
        let mut open = self.lock_open();
        *open = None;
        let mut q = self.queue();
        q.batches.clear();
        q.error = None;
        drop(q);
        open
    }

    /// A failed apply since the last call, if any.
    fn take_error(&self) -> Option<String> {
        self.queue().error.take()
    }
}

/// Applies the queued batches, in order, to `open` (held by the caller).
fn apply_queued(open: &mut Option<OpenTxn>, txn: &Txn) -> Result<(), StoreError> {
    loop {
        let next = {
            let mut q = txn.queue();
            if let Some(e) = &q.error {
                return Err(StoreError::Backend(e.clone()));
            }
            q.batches.pop_front()
        };
        let Some(changes) = next else {
            return Ok(());
        };
        #[cfg(test)]
        if std::mem::take(&mut txn.queue().fail_next) {
            let e = StoreError::Backend("injected apply failure".into());
            txn.queue().error = Some(e.to_string());
            return Err(e);
        }
        let applied = match open.as_mut() {
            Some(t) => apply(t, &changes),
            None => Err(StoreError::Backend(
                "a logged batch has no open transaction to go into".into(),
            )),
        };
        if let Err(e) = applied {
            txn.queue().error = Some(e.to_string());
            return Err(e);
        }
    }
}

/// The apply thread: writes logged, answered batches into the open transaction, off the
/// writer's path (run rows and index entries as B-tree inserts, events into their runs'
/// chunks). Exits when the writer closes.
fn apply_thread(txn: &Txn) {
    lower_priority();
    loop {
        {
            let mut q = txn.queue();
            // After a failed apply, nothing more until the writer rebuilds (which clears it).
            while (q.batches.is_empty() || q.error.is_some()) && !q.closed {
                q.idle = true;
                q = txn.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.idle = false;
            if q.closed && (q.batches.is_empty() || q.error.is_some()) {
                return;
            }
        }
        let mut open = txn.lock_open();
        // An error is recorded in the queue for the writer, which rebuilds from the log.
        let _ = apply_queued(&mut open, txn);
    }
}

/// Lowers the calling thread's scheduling priority (nice 10): the apply thread's work is
/// background work, and when both cores are busy the writer and the callers' threads should
/// run first. Lowering one's own priority needs no privilege; if it fails nothing changes.
/// Measured (session 4, interleaved medians of 6): `fanout` 108k → 120k branches/s, `many`
/// unchanged.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread, with no pointers involved.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

impl Drop for Writer {
    /// Stops the apply thread (the final checkpoint has drained its queue).
    fn drop(&mut self) {
        {
            let mut q = self.txn.queue();
            q.closed = true;
            self.txn.wake.notify_one();
        }
        if let Some(t) = self.applier.take() {
            let _ = t.join();
        }
    }
}

/// An open write transaction and the events applied to it that wait in chunks (inserted when
/// a chunk fills, when its run parks or finishes, or when the transaction is committed:
/// `chunks.rs`).
struct OpenTxn {
    txn: redb::WriteTransaction,
    pending: Pending,
}

impl OpenTxn {
    fn new(txn: redb::WriteTransaction) -> Self {
        OpenTxn {
            txn,
            pending: Pending::default(),
        }
    }
}

/// Applies logged changes to a transaction, in order (the live path and recovery share it).
fn apply(open: &mut OpenTxn, changes: &[Change]) -> Result<(), StoreError> {
    let OpenTxn { txn, pending } = open;
    // Tables are opened when first needed: most batches touch only the events.
    let mut events = None;
    let mut runs = None;
    let mut by_status = None;
    let mut wakeups = None;
    for c in changes {
        match c {
            Change::Event { run, seq, bytes } => {
                pending.push(opened(&mut events, txn, EVENT_CHUNKS)?, *run, *seq, bytes)?;
            }
            Change::Run { run, row } => {
                opened(&mut runs, txn, RUNS)?.insert(*run, row.as_slice())?;
            }
            Change::Status { code, run, present } => {
                // A run that finished or parked appends nothing for a while: its chunk is
                // whole (its events come before this change).
                if *present
                    && pending.is_open(*run)
                    && RunStatus::from_code(*code)
                        .is_some_and(|s| s.is_terminal() || s == RunStatus::Waiting)
                {
                    pending.close(opened(&mut events, txn, EVENT_CHUNKS)?, *run)?;
                }
                let t = opened(&mut by_status, txn, RUNS_BY_STATUS)?;
                if *present {
                    t.insert((*code, *run), ())?;
                } else {
                    t.remove((*code, *run))?;
                }
            }
            Change::Wake {
                at_us,
                run,
                present,
            } => {
                let t = opened(&mut wakeups, txn, WAKEUPS)?;
                if *present {
                    t.insert((*at_us, *run), ())?;
                } else {
                    t.remove((*at_us, *run))?;
                }
            }
        }
    }
    Ok(())
}

/// The table in `slot`, opened in `txn` on first use.
fn opened<'s, 't, K: redb::Key + 'static, V: redb::Value + 'static>(
    slot: &'s mut Option<redb::Table<'t, K, V>>,
    txn: &'t redb::WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<&'s mut redb::Table<'t, K, V>, StoreError> {
    if slot.is_none() {
        *slot = Some(txn.open_table(def)?);
    }
    slot.as_mut()
        .ok_or_else(|| StoreError::Backend("a table could not be opened".into()))
}

enum Work {
    Create(NewRun, Vec<NewEvent>),
    Append(RunId, Vec<NewEvent>, RunUpdate),
    Flush,
}

impl Work {
    /// The events this work appends.
    fn events(&self) -> usize {
        match self {
            Work::Create(_, e) | Work::Append(_, e, _) => e.len(),
            Work::Flush => 0,
        }
    }
}

fn append_events(
    changes: &mut Vec<Change>,
    meta: &mut RunMeta,
    events: &[NewEvent],
) -> Result<Appended, StoreError> {
    let first = Seq(meta.events);
    let id = meta.id.as_u128();
    let mut head: Hash = meta.head;
    let mut seq = meta.events;
    for e in events {
        head = record_hash(&head, Seq(seq), e.ts_us, &e.payload);
        let bytes = encode(e.ts_us, &head, &e.payload)?;
        changes.push(Change::Event {
            run: id,
            seq,
            bytes,
        });
        seq += 1;
    }
    meta.events = seq;
    meta.head = head;
    Ok(Appended {
        first,
        next: Seq(seq),
        head,
    })
}

impl EventStore for RedbStore {
    fn create_run(
        &self,
        run: NewRun,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'static, Result<Appended, StoreError>> {
        if let Err(e) = self.check_sizes(&events) {
            return Box::pin(async move { Err(e) });
        }
        self.send(|reply| Op::Create { run, events, reply })
    }

    fn write(
        &self,
        run: RunId,
        events: Vec<NewEvent>,
        update: RunUpdate,
    ) -> BoxFuture<'static, Result<Appended, StoreError>> {
        if let Err(e) = self.check_sizes(&events) {
            return Box::pin(async move { Err(e) });
        }
        self.send(|reply| Op::Append {
            run,
            events,
            update,
            reply,
        })
    }

    fn max_payload_bytes(&self) -> usize {
        self.inner.max_payload_bytes
    }

    fn run(&self, id: RunId) -> BoxFuture<'_, Result<Option<RunMeta>, StoreError>> {
        // The writer's cache holds the newest row of every run written since it was last
        // cleared: answering from it spares a checkpoint (a redb commit) per read under load.
        // `try_lock`: a writer busy with a checkpoint must not block this (async) caller's
        // thread; the checkpointed path below waits without blocking.
        if let Some(shared) = &self.inner.shared
            && let Ok(w) = shared.writer.try_lock()
            && let Some(meta) = w.runs.get(&id.as_u128()).cloned()
        {
            return Box::pin(async move { Ok(Some(meta)) });
        }
        let fresh = self.fresh();
        Box::pin(async move {
            fresh.await?;
            self.read_run(id)
        })
    }

    fn list_runs(&self, filter: RunFilter) -> BoxFuture<'_, Result<Vec<RunMeta>, StoreError>> {
        let fresh = self.fresh();
        Box::pin(async move {
            fresh.await?;
            self.read_runs(&filter)
        })
    }

    fn due_wakeups(
        &self,
        now_us: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(RunId, i64)>, StoreError>> {
        let fresh = self.fresh();
        Box::pin(async move {
            fresh.await?;
            self.read_wakeups(Some(now_us), limit)
        })
    }

    fn next_wakeup(&self) -> BoxFuture<'_, Result<Option<i64>, StoreError>> {
        let fresh = self.fresh();
        Box::pin(async move {
            fresh.await?;
            self.read_wakeups(None, 1)
                .map(|v| v.first().map(|(_, t)| *t))
        })
    }

    fn read(
        &self,
        run: RunId,
        from: Seq,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEvent>, StoreError>> {
        let fresh = self.fresh();
        Box::pin(async move {
            fresh.await?;
            self.read_events(run, from, limit)
        })
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let f = self.send(|reply| Op::Flush { reply });
        Box::pin(async move { f.await.map(|_| ()) })
    }

    fn publish(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        // What a read in this process needs is what other processes need: a checkpoint of
        // whatever is outstanding (nothing when clean or read-only).
        self.fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RunStatus;
    use std::collections::BTreeMap;

    fn new_run(id: RunId) -> NewRun {
        NewRun {
            id,
            workflow: "wf".into(),
            version: 1,
            parent: None,
            labels: BTreeMap::new(),
            status: RunStatus::Running,
        }
    }

    fn ev(s: &str) -> NewEvent {
        NewEvent::now(s.as_bytes().to_vec())
    }

    fn writer(store: &RedbStore) -> MutexGuard<'_, Writer> {
        store
            .inner
            .shared
            .as_ref()
            .expect("a writing handle")
            .lock()
    }

    async fn payloads(store: &RedbStore, id: RunId) -> Vec<String> {
        store
            .read(id, Seq(0), 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.payload).unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_streak_of_lone_ops_commits_on_the_callers_thread() {
        // Regression for a flaky integration test: after concurrent work (streak reset), a
        // short run of lone appends goes to the writer thread, and only from the
        // `LEADER_STREAK`-th on does the caller commit itself.
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let id = RunId::new();
        store.create_run(new_run(id), vec![]).await.unwrap();
        let shared = store.inner.shared.as_ref().unwrap();
        shared.alone_streak.store(0, Ordering::Relaxed);
        let before = store.writer_stats();
        for _ in 0..LEADER_STREAK - 1 {
            store.append(id, vec![ev("x")], None).await.unwrap();
        }
        assert_eq!(store.writer_stats().leader_commits, before.leader_commits);
        for _ in 0..50 {
            store.append(id, vec![ev("y")], None).await.unwrap();
        }
        // Not every one of them: the writer thread may hold its lock for a checkpoint.
        assert!(store.writer_stats().leader_commits > before.leader_commits);
    }

    /// Commits wake the apply thread only for a backlog; once the writer runs out of work it
    /// has the apply thread take the rest, so a quiet store does not leave committed batches
    /// outside the open transaction until the next checkpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_apply_thread_takes_a_short_backlog_once_the_writer_is_idle() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            checkpoint_interval: Duration::from_secs(3600),
            ..StoreOptions::default()
        };
        let store = RedbStore::open_with(dir.path().join("s.redb"), opts).unwrap();
        let id = RunId::new();
        store.create_run(new_run(id), vec![]).await.unwrap();
        // Concurrent appends: they go to the writer thread, in fewer than APPLY_BACKLOG commits.
        let appends: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(
                    async move { store.append(id, vec![ev(&format!("e{i}"))], None).await },
                )
            })
            .collect();
        for a in appends {
            a.await.unwrap().unwrap();
        }
        let queued = || writer(&store).txn.queue().batches.len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while queued() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            queued(),
            0,
            "the idle writer had the apply thread take the backlog"
        );
        assert_eq!(store.writer_stats().checkpoints, 1, "only the one at open");
        assert_eq!(payloads(&store, id).await.len(), 8);
    }

    /// Workflows appending at once, their operations worked out into the open record while a
    /// record is written: a failed write fails its operations and those worked out on top of
    /// it, and nothing else. What was acknowledged is exactly what each run holds, in order,
    /// with an intact chain, also after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_under_load_fails_only_what_it_and_the_open_record_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open(&path).unwrap();
        let ids: Vec<RunId> = (0..16).map(|_| RunId::new()).collect();
        for id in &ids {
            store.create_run(new_run(*id), vec![]).await.unwrap();
        }
        let tasks: Vec<_> = ids
            .iter()
            .map(|&id| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut kept = Vec::new();
                    for i in 0..90 {
                        let p = format!("{id}-{i}");
                        match store.append(id, vec![ev(&p)], None).await {
                            Ok(_) => kept.push(p),
                            Err(e) => {
                                let e = e.to_string();
                                assert!(
                                    e.contains("cannot write the write-ahead log")
                                        || e.contains("not recorded"),
                                    "{e}"
                                );
                            }
                        }
                    }
                    (id, kept)
                })
            })
            .collect();
        // Three failures, each once a few more records went in (while the workflows append),
        // injected from a thread of its own so that both runtime threads run workflows.
        let injector = {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut next = store.writer_stats().commits + 4;
                for _ in 0..3 {
                    while store.writer_stats().commits < next {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    writer(&store).wal.fail_next_write();
                    next = store.writer_stats().commits + 6;
                }
            })
        };
        let mut refused = 0;
        injector.join().unwrap();
        for t in tasks {
            let (id, kept) = t.await.unwrap();
            refused += 90 - kept.len();
            assert_eq!(payloads(&store, id).await, kept, "run {id}");
            assert!(store.verify(id).await.unwrap().ok());
        }
        assert!(refused > 0, "the injected failure failed some operations");
        let kept: Vec<Vec<String>> = {
            let mut v = Vec::new();
            for id in &ids {
                v.push(payloads(&store, *id).await);
            }
            v
        };
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        for (id, kept) in ids.iter().zip(kept) {
            assert_eq!(payloads(&store, *id).await, kept);
            assert!(store.verify(*id).await.unwrap().ok());
        }
    }

    #[tokio::test]
    async fn a_failed_apply_is_redone_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let id = RunId::new();
        store.create_run(new_run(id), vec![ev("a")]).await.unwrap();
        writer(&store).txn.queue().fail_next = true;
        // Acknowledged once logged; its apply then fails (on the apply thread or in the drain
        // of the next read), and the transaction is rebuilt from the log.
        // An operation worked out before the failed apply is noticed, and not yet written, is
        // refused (the writer rebuilds from the log, which does not have it); a retry goes in.
        let append = |s: &'static str| {
            let store = store.clone();
            async move {
                if let Err(e) = store.append(id, vec![ev(s)], None).await {
                    assert!(e.to_string().contains("not recorded"), "{e}");
                    store.append(id, vec![ev(s)], None).await.unwrap();
                }
            }
        };
        append("b").await;
        append("c").await;
        assert_eq!(payloads(&store, id).await, ["a", "b", "c"]);
        assert!(
            !writer(&store).txn.queue().fail_next,
            "the injected failure happened"
        );
        store.append(id, vec![ev("d")], None).await.unwrap();
        assert_eq!(payloads(&store, id).await, ["a", "b", "c", "d"]);
        assert!(store.verify(id).await.unwrap().ok());
        assert_eq!(store.run(id).await.unwrap().unwrap().events, 4);
        drop(store);
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        assert_eq!(payloads(&store, id).await, ["a", "b", "c", "d"]);
    }

    #[tokio::test]
    async fn a_failed_log_write_fails_only_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let id = RunId::new();
        store.create_run(new_run(id), vec![ev("a")]).await.unwrap();
        writer(&store).wal.fail_next_write();
        let err = store.append(id, vec![ev("b")], None).await.unwrap_err();
        assert!(
            err.to_string().contains("cannot write the write-ahead log"),
            "{err}"
        );
        // Nothing of it was logged: the writer rebuilt its state from the log and goes on, and
        // the next event takes the failed one's place in the chain.
        let a = store.append(id, vec![ev("c")], None).await.unwrap();
        assert_eq!(a.first, Seq(1));
        assert_eq!(payloads(&store, id).await, ["a", "c"]);
        assert!(store.verify(id).await.unwrap().ok());
    }

    #[tokio::test]
    async fn a_failed_fdatasync_stops_the_writer_until_the_store_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let store = RedbStore::open(&path).unwrap();
        writer(&store).wal.force_buffered();
        let id = RunId::new();
        store.create_run(new_run(id), vec![ev("a")]).await.unwrap();
        writer(&store).wal.fail_next_sync();
        let err = store.append(id, vec![ev("b")], None).await.unwrap_err();
        assert!(err.to_string().contains("cannot fsync"), "{err}");
        // The kernel may have dropped the log's unwritten pages: no later write is accepted.
        let err = store.append(id, vec![ev("c")], None).await.unwrap_err();
        assert!(err.to_string().contains("reopen the store"), "{err}");
        drop(store);
        // Reopened: everything acknowledged is there; the failed append's outcome is unknown
        // to its caller, so it may or may not have reached the log.
        let store = RedbStore::open(&path).unwrap();
        let got = payloads(&store, id).await;
        assert!(got == ["a"] || got == ["a", "b"], "{got:?}");
        store.append(id, vec![ev("d")], None).await.unwrap();
        assert_eq!(payloads(&store, id).await.last().unwrap(), "d");
        assert!(store.verify(id).await.unwrap().ok());
    }
}
