//! The [`EventStore`] trait every backend implements, and the run metadata it keeps.
//!
//! The engine only talks to this trait, so a Postgres store can be added without touching it.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::record::{genesis_hash, hex, record_hash};
use crate::{Hash, NewEvent, RunId, Seq, StoreError, StoredEvent, VerifyReport};

/// A boxed, sendable future: the return type of the [`EventStore`] methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a run is in its life. The numeric codes are stored and never change; binary formats
/// store the code, human-readable ones (JSON) the lowercase name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum RunStatus {
    /// Created but not started yet.
    Pending,
    /// Started and not finished; after a crash, runs left here are recovered.
    Running,
    /// Finished with an output.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped on request.
    Cancelled,
    /// Parked until a timer fires or a signal arrives; not executing anywhere. Runs here are
    /// woken from the wake-up index, not by scanning runs.
    Waiting,
}

impl RunStatus {
    /// Every status, in code order.
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Pending,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Waiting,
    ];

    /// The stored one-byte code.
    pub fn code(self) -> u8 {
        match self {
            RunStatus::Pending => 0,
            RunStatus::Running => 1,
            RunStatus::Completed => 2,
            RunStatus::Failed => 3,
            RunStatus::Cancelled => 4,
            RunStatus::Waiting => 5,
        }
    }

    /// The status for a stored code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The lowercase name used by the CLI and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Waiting => "waiting",
        }
    }

    /// Whether the run can make no more progress.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

impl Serialize for RunStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(self.as_str())
        } else {
            s.serialize_u8(self.code())
        }
    }
}

impl<'de> Deserialize<'de> for RunStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(D::Error::custom)
        } else {
            let c = u8::deserialize(d)?;
            RunStatus::from_code(c)
                .ok_or_else(|| D::Error::custom(format!("unknown run status code {c}")))
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown status `{s}`; expected one of pending, running, waiting, completed, failed, cancelled"
                )
            })
    }
}

/// What a new run is: recorded in the runs table when it is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRun {
    /// The run's id.
    pub id: RunId,
    /// The registered workflow name.
    pub workflow: String,
    /// The workflow's version at creation.
    pub version: u32,
    /// The run that started this one, if any.
    pub parent: Option<RunId>,
    /// Free-form labels for finding runs later.
    pub labels: BTreeMap<String, String>,
    /// The status to create the run with (usually running).
    pub status: RunStatus,
}

/// A run's row in the runs table: what `cairn runs` lists without reading events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMeta {
    /// The run's id.
    pub id: RunId,
    /// The registered workflow name.
    pub workflow: String,
    /// The workflow's version at creation.
    pub version: u32,
    /// The current status.
    pub status: RunStatus,
    /// Creation time, microseconds since the Unix epoch.
    pub created_us: i64,
    /// Last change, microseconds since the Unix epoch.
    pub updated_us: i64,
    /// The run that started this one, if any.
    pub parent: Option<RunId>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// How many events the run has (the next sequence number).
    pub events: u64,
    /// The chain hash of the last event.
    pub head: Hash,
    /// When a waiting run is due to be woken (microseconds since the epoch), if it has a timer.
    pub wake_at_us: Option<i64>,
}

/// A change to a run's row made atomically with an append.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunUpdate {
    /// The new status, if it changes.
    pub status: Option<RunStatus>,
    /// A condition the write must meet.
    pub guard: Guard,
    /// `Some(Some(t))` sets the wake-up time, `Some(None)` clears it, `None` leaves it.
    pub wake_at_us: Option<Option<i64>>,
}

impl RunUpdate {
    /// An update that only changes the status.
    pub fn status(status: RunStatus) -> Self {
        RunUpdate {
            status: Some(status),
            ..Self::default()
        }
    }
}

/// Which runs to list.
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    /// Only runs with this status (served from an index, not a scan).
    pub status: Option<RunStatus>,
    /// At most this many runs, newest first.
    pub limit: Option<usize>,
}

/// What an append wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The sequence number of the first event written (equals `next` if none were).
    pub first: Seq,
    /// The run's event count after the append.
    pub next: Seq,
    /// The chain hash after the append.
    pub head: Hash,
}

/// A condition an append must meet, checked atomically with the write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Guard {
    /// Append unconditionally.
    #[default]
    None,
    /// Append only if the run has not finished (completed, failed or cancelled); otherwise
    /// fail with [`StoreError::RunFinished`]. Terminal events use it, so a run never gets two.
    NotFinished,
}

/// A durable, append-only log of runs and their events.
///
/// Writes are ordered when the method is called, not when the returned future is polled: a
/// caller may drop the future of an append it does not need to wait for, and a later append to
/// the same run still lands after it. The future resolves once the write is durable.
pub trait EventStore: Send + Sync + 'static {
    /// Creates a run and appends its first events in one atomic write.
    fn create_run(
        &self,
        run: NewRun,
        events: Vec<NewEvent>,
    ) -> BoxFuture<'static, Result<Appended, StoreError>>;

    /// Appends events to a run and applies `update` to its row, atomically, if the update's
    /// guard holds.
    fn write(
        &self,
        run: RunId,
        events: Vec<NewEvent>,
        update: RunUpdate,
    ) -> BoxFuture<'static, Result<Appended, StoreError>>;

    /// Appends events to a run and optionally changes its status, atomically, if `guard`
    /// holds.
    fn append_guarded(
        &self,
        run: RunId,
        events: Vec<NewEvent>,
        status: Option<RunStatus>,
        guard: Guard,
    ) -> BoxFuture<'static, Result<Appended, StoreError>> {
        self.write(
            run,
            events,
            RunUpdate {
                status,
                guard,
                wake_at_us: None,
            },
        )
    }

    /// Appends events to a run and optionally changes its status, atomically.
    fn append(
        &self,
        run: RunId,
        events: Vec<NewEvent>,
        status: Option<RunStatus>,
    ) -> BoxFuture<'static, Result<Appended, StoreError>> {
        self.append_guarded(run, events, status, Guard::None)
    }

    /// The largest event payload this store accepts, in bytes.
    fn max_payload_bytes(&self) -> usize;

    /// The run's metadata, or `None` if there is no such run.
    fn run(&self, id: RunId) -> BoxFuture<'_, Result<Option<RunMeta>, StoreError>>;

    /// Runs matching the filter, newest first.
    fn list_runs(&self, filter: RunFilter) -> BoxFuture<'_, Result<Vec<RunMeta>, StoreError>>;

    /// Waiting runs whose wake-up time is at or before `now_us`, earliest first (from the
    /// wake-up index), at most `limit`.
    fn due_wakeups(
        &self,
        now_us: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(RunId, i64)>, StoreError>>;

    /// The earliest wake-up time of any waiting run, if there is one.
    fn next_wakeup(&self) -> BoxFuture<'_, Result<Option<i64>, StoreError>>;

    /// Up to `limit` events of a run starting at `from`, in order.
    fn read(
        &self,
        run: RunId,
        from: Seq,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<StoredEvent>, StoreError>>;

    /// Waits until every write issued so far is durable.
    fn flush(&self) -> BoxFuture<'static, Result<(), StoreError>>;

    /// Waits until every write issued so far is durable and visible to readers in other
    /// processes (the embedded store checkpoints; a server-backed store only needs `flush`).
    fn publish(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        self.flush()
    }

    /// Recomputes a run's hash chain from its first event and compares it with what is stored.
    fn verify(&self, run: RunId) -> BoxFuture<'_, Result<VerifyReport, StoreError>> {
        Box::pin(async move {
            let meta = self.run(run).await?.ok_or(StoreError::UnknownRun(run))?;
            let mut checker = ChainChecker::new(run);
            let mut from = Seq(0);
            loop {
                let page = self.read(run, from, 4096).await?;
                let Some(last) = page.last() else { break };
                from = Seq(last.seq.0 + 1);
                for ev in &page {
                    checker.check(ev);
                }
            }
            Ok(checker.finish(Some(&meta)))
        })
    }
}

/// Checks a run's events in order against the chain; see [`verify_events`].
struct ChainChecker {
    run: RunId,
    prev: Hash,
    count: u64,
    problem: Option<String>,
}

impl ChainChecker {
    fn new(run: RunId) -> Self {
        ChainChecker {
            run,
            prev: genesis_hash(run),
            count: 0,
            problem: None,
        }
    }

    fn check(&mut self, ev: &StoredEvent) {
        if self.problem.is_some() {
            return;
        }
        if ev.seq.0 != self.count {
            self.problem = Some(format!(
                "sequence gap: expected event {} but found {}",
                self.count, ev.seq
            ));
            return;
        }
        let h = record_hash(&self.prev, ev.seq, ev.ts_us, &ev.payload);
        if h != ev.hash {
            self.problem = Some(format!(
                "event {} does not match its hash: it or an earlier event was changed",
                ev.seq
            ));
            return;
        }
        self.prev = h;
        self.count += 1;
    }

    fn finish(mut self, meta: Option<&RunMeta>) -> VerifyReport {
        if let (None, Some(m)) = (&self.problem, meta) {
            if m.events != self.count {
                self.problem = Some(format!(
                    "the run row says {} events but {} were found",
                    m.events, self.count
                ));
            } else if m.head != self.prev {
                self.problem = Some("the run's head hash does not match its last event".into());
            }
        }
        VerifyReport {
            run: self.run.to_string(),
            events: self.count,
            head: hex(&self.prev),
            problem: self.problem,
        }
    }
}

/// Checks a sequence of events (e.g. an exported history) against the hash chain of `run`.
pub fn verify_events<'a>(
    run: RunId,
    events: impl IntoIterator<Item = &'a StoredEvent>,
) -> VerifyReport {
    let mut c = ChainChecker::new(run);
    for ev in events {
        c.check(ev);
    }
    c.finish(None)
}
