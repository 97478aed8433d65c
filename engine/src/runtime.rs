//! The runtime: starts runs, executes many at once on tokio, resumes interrupted runs, and
//! records how each run ends.
//!
//! Architecture invariant: a run's terminal event (completed, failed, cancelled) is written by
//! the task executing it, or by `cancel` only when no task in this process executes it; so a
//! run never gets two terminal events.

use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use cairn_storage::{
    EventStore, Guard, NewEvent, NewRun, RunFilter, RunId, RunMeta, RunStatus, RunUpdate, Seq,
    StoreError,
};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::context::{LiveState, RunShared, WorkflowContext};
use crate::error::{EngineError, Interrupt, WorkflowError};
use crate::event::{Event, Payload};
use crate::registry::{Registered, Registry};
use crate::state::{Replayer, RunState};

/// How many events one read of a history takes.
const READ_PAGE_EVENTS: usize = 8192;

/// How a run ended, or that it was interrupted.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunOutcome {
    /// The run.
    pub run_id: String,
    /// Completed, failed, cancelled, or running if it was interrupted by shutdown.
    pub status: RunStatus,
    /// The output, if completed.
    pub output: Option<serde_json::Value>,
    /// The error, if failed or cancelled.
    pub error: Option<String>,
    /// Steps answered from the log in this execution.
    pub steps_replayed: u64,
    /// Steps executed in this execution.
    pub steps_executed: u64,
}

/// A started or resumed run: its id, and a way to wait for its outcome.
pub struct RunHandle {
    /// The run's id.
    pub id: RunId,
    join: JoinHandle<Result<RunOutcome, EngineError>>,
}

impl RunHandle {
    /// Waits for the run to finish (or be interrupted) and returns its outcome.
    pub async fn wait(self) -> Result<RunOutcome, EngineError> {
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(EngineError::Panicked {
                run: self.id,
                detail: e.to_string(),
            }),
        }
    }
}

/// What to start: a workflow, its input and optional labels.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// The registered workflow name.
    pub workflow: String,
    /// The input, as JSON.
    pub input: serde_json::Value,
    /// Labels stored with the run.
    pub labels: BTreeMap<String, String>,
    /// The parent run, if this run is a child.
    pub parent: Option<RunId>,
    /// The id to create the run with (child runs record it first); `None`: a fresh one.
    pub id: Option<RunId>,
    /// The run fails as timed out if it has not finished this long after it starts (the
    /// deadline is recorded, so it holds across restarts).
    pub timeout: Option<Duration>,
}

impl StartOptions {
    /// Options for `workflow` with `input` and nothing else.
    pub fn new(workflow: &str, input: serde_json::Value) -> Self {
        StartOptions {
            workflow: workflow.to_string(),
            input,
            labels: BTreeMap::new(),
            parent: None,
            id: None,
            timeout: None,
        }
    }
}

/// A run executing (or about to execute) in this process.
#[derive(Clone)]
pub(crate) struct ActiveRun {
    /// Cancelled when the run is cancelled.
    pub(crate) cancel: CancellationToken,
    /// The reason given to `cancel`, recorded in the run's `run_cancelled` event.
    pub(crate) reason: Arc<Mutex<Option<String>>>,
    /// Woken when a signal is delivered to the run.
    pub(crate) signal: Arc<tokio::sync::Notify>,
    /// Set to true when the run's task has stopped.
    pub(crate) stopped: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for ActiveRun {
    fn default() -> Self {
        ActiveRun {
            cancel: CancellationToken::new(),
            reason: Arc::default(),
            signal: Arc::default(),
            stopped: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }
}

/// Settings of an [`Engine`].
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// At most this many runs execute at once in this process; more are queued durably
    /// (status `pending`) and start in the order they were created. `None`: no limit.
    pub max_running: Option<usize>,
    /// A sleep or signal wait longer than this parks the run (status `waiting`, in the
    /// wake-up index) instead of keeping it in memory.
    pub suspend_after: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_running: None,
            suspend_after: Duration::from_secs(60),
        }
    }
}

/// How a person resolves an at-most-once step that was interrupted while running.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum StepResolution {
    /// Its effect happened: record this output as the step's result.
    Done(serde_json::Value),
    /// Its effect did not happen: run it again.
    Retry,
}

/// What checking a recorded history against today's code found ([`Engine::check`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckReport {
    /// The run checked.
    pub run_id: String,
    /// Its workflow.
    pub workflow: String,
    /// Recorded operations today's code reached and matched.
    pub steps_replayed: u64,
    /// Where today's code departs from the history, if it does.
    pub divergence: Option<String>,
    /// Where the history ends, if the code goes on past it (an unfinished run).
    pub history_ends_at: Option<String>,
}

impl CheckReport {
    /// Whether today's code matches the history as far as the history goes.
    pub fn ok(&self) -> bool {
        self.divergence.is_none()
    }
}

/// What `signal` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignalDelivery {
    /// The run executes in this process and was woken.
    Notified,
    /// The run was parked (`waiting`); it is now `running` and must be resumed (the worker
    /// or `cairn signal` does it).
    Woken,
    /// The signal is recorded; the run will see it when it next waits for it.
    Recorded,
}

/// How a cancel request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// The run was not executing and is now recorded as cancelled.
    Cancelled,
    /// The run is executing in this process; it stops now (its step in flight is abandoned)
    /// and records `run_cancelled` itself. Wait on its handle for the final status.
    Requested,
    /// The run had already finished with this status; nothing was changed.
    AlreadyFinished(RunStatus),
}

/// What `recover` did: the runs it resumed and the ones it could not.
pub struct Recovered {
    /// Handles of the resumed runs, oldest first.
    pub handles: Vec<RunHandle>,
    /// Runs that could not be resumed (unknown workflow, version mismatch, damaged history),
    /// with the reason; they are left as they were.
    pub failed: Vec<(RunId, EngineError)>,
}

/// Removes a claimed run from the active map unless the claim was handed to a task.
struct Claim<'a> {
    inner: &'a EngineInner,
    id: RunId,
    active: Option<ActiveRun>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.active.is_some() {
            lock(&self.inner.active).remove(&self.id);
        }
    }
}

pub(crate) struct EngineInner {
    store: Arc<dyn EventStore>,
    registry: Registry,
    active: Mutex<FxHashMap<RunId, ActiveRun>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    options: EngineOptions,
    /// With `max_running`: run slots, handed out strictly in request order.
    slots: Option<Arc<tokio::sync::Semaphore>>,
    slot_queue: Mutex<Option<tokio::sync::mpsc::UnboundedSender<SlotRequest>>>,
}

type SlotRequest = tokio::sync::oneshot::Sender<tokio::sync::OwnedSemaphorePermit>;

/// The workflow engine: a store, a registry, and the runs executing in this process.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

impl Engine {
    /// An engine over `store` that can run the workflows in `registry`.
    pub fn new(store: impl EventStore, registry: Registry) -> Self {
        Self::with_store(Arc::new(store), registry)
    }

    /// Like [`Engine::new`] for a store that is already shared.
    pub fn with_store(store: Arc<dyn EventStore>, registry: Registry) -> Self {
        Self::with_options(store, registry, EngineOptions::default())
    }

    /// An engine with explicit settings.
    pub fn with_options(
        store: Arc<dyn EventStore>,
        registry: Registry,
        options: EngineOptions,
    ) -> Self {
        let slots = options
            .max_running
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1))));
        Engine {
            inner: Arc::new(EngineInner {
                store,
                registry,
                active: Mutex::new(FxHashMap::default()),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                options,
                slots,
                slot_queue: Mutex::new(None),
            }),
        }
    }

    pub(crate) fn from_inner(inner: Arc<EngineInner>) -> Self {
        Engine { inner }
    }

    /// Asks for a run slot; requests are served strictly in the order they are made, so
    /// queued runs start in order.
    fn request_slot(
        &self,
    ) -> Option<tokio::sync::oneshot::Receiver<tokio::sync::OwnedSemaphorePermit>> {
        let slots = self.inner.slots.as_ref()?;
        let mut q = lock(&self.inner.slot_queue);
        let tx = q.get_or_insert_with(|| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SlotRequest>();
            let slots = Arc::clone(slots);
            tokio::spawn(async move {
                while let Some(req) = rx.recv().await {
                    let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                        break;
                    };
                    // A requester that went away gives its slot back by dropping it.
                    let _ = req.send(permit);
                }
            });
            tx
        });
        let (req, rx) = tokio::sync::oneshot::channel();
        tx.send(req).ok()?;
        Some(rx)
    }

    /// The store this engine writes to.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The registered workflows.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Starts workflow `workflow` with `input`; returns once the run is durably created.
    pub async fn start<I: Serialize>(
        &self,
        workflow: &str,
        input: &I,
    ) -> Result<RunHandle, EngineError> {
        let input = serde_json::to_value(input).map_err(|e| EngineError::BadInput {
            workflow: workflow.to_string(),
            detail: e.to_string(),
        })?;
        self.start_with(StartOptions::new(workflow, input)).await
    }

    /// Starts a run described by `opts`. An invalid input writes nothing.
    pub async fn start_with(&self, opts: StartOptions) -> Result<RunHandle, EngineError> {
        let wf = self.lookup(&opts.workflow)?;
        let input = Payload::from_value(&opts.input).map_err(|e| EngineError::BadInput {
            workflow: opts.workflow.clone(),
            detail: e.to_string(),
        })?;
        (wf.check_input)(&input).map_err(|detail| EngineError::BadInput {
            workflow: opts.workflow.clone(),
            detail,
        })?;
        let id = opts.id.unwrap_or_default();
        let start = Event::RunStarted {
            workflow: opts.workflow.clone(),
            version: wf.version,
            input,
            parent: opts.parent,
        };
        let ne = NewEvent::now(start.encode());
        let mut stored = vec![cairn_storage::StoredEvent {
            seq: Seq(0),
            ts_us: ne.ts_us,
            payload: ne.payload.clone(),
            hash: [0; 32],
        }];
        let mut first = vec![ne];
        if let Some(t) = opts.timeout {
            let deadline = Event::RunDeadlineSet {
                deadline_us: first[0]
                    .ts_us
                    .saturating_add(i64::try_from(t.as_micros()).unwrap_or(i64::MAX)),
            };
            let ne = NewEvent::now(deadline.encode());
            stored.push(cairn_storage::StoredEvent {
                seq: Seq(1),
                ts_us: ne.ts_us,
                payload: ne.payload.clone(),
                hash: [0; 32],
            });
            first.push(ne);
        }
        self.inner
            .store
            .create_run(
                NewRun {
                    id,
                    workflow: opts.workflow,
                    version: wf.version,
                    parent: opts.parent,
                    labels: opts.labels,
                    // With a limit on running runs, a new run waits for a slot durably. A
                    // child run uses its parent's slot: queuing it behind parents that wait
                    // for their children could deadlock.
                    status: if self.inner.slots.is_some() && opts.parent.is_none() {
                        RunStatus::Pending
                    } else {
                        RunStatus::Running
                    },
                },
                first,
            )
            .await?;
        let state = crate::state::fold(id, &stored)?;
        let claim = self.claim(id)?;
        let queued = self.inner.slots.is_some() && state.parent.is_none();
        Ok(self.spawn(claim, state, wf, queued))
    }

    /// Marks `id` as executing in this process; fails if it already is. Taken before any
    /// await, so two concurrent resumes of one run cannot both execute it.
    fn claim(&self, id: RunId) -> Result<Claim<'_>, EngineError> {
        let mut active = lock(&self.inner.active);
        if active.contains_key(&id) {
            return Err(EngineError::AlreadyActive(id));
        }
        let a = ActiveRun::default();
        active.insert(id, a.clone());
        Ok(Claim {
            inner: &self.inner,
            id,
            active: Some(a),
        })
    }

    /// The registered workflow of a recorded run, refusing a version other than the recorded one.
    pub(crate) fn lookup_recorded(
        &self,
        id: RunId,
        state: &RunState,
    ) -> Result<Registered, EngineError> {
        let wf = self.lookup(&state.workflow)?;
        if wf.version != state.version {
            return Err(EngineError::VersionMismatch {
                run: id,
                workflow: state.workflow.clone(),
                recorded: state.version,
                registered: wf.version,
            });
        }
        Ok(wf)
    }

    fn lookup(&self, name: &str) -> Result<Registered, EngineError> {
        self.inner
            .registry
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownWorkflow {
                name: name.to_string(),
                known: self.inner.registry.known(),
            })
    }

    /// Reads a run's whole history and folds it into its state (the replayer, for audit).
    pub async fn load(&self, id: RunId) -> Result<RunState, EngineError> {
        load_state(self.inner.store.as_ref(), id).await
    }

    /// Resumes a run from its log: recorded steps are answered from it, execution continues at
    /// the first step it does not have. A finished run returns its recorded outcome.
    pub async fn resume(&self, id: RunId) -> Result<RunHandle, EngineError> {
        let claim = self.claim(id)?;
        let state = self.load(id).await?;
        if state.status.is_terminal() {
            let outcome = outcome_of(id, &state, 0, 0);
            return Ok(RunHandle {
                id,
                join: tokio::spawn(async move { Ok(outcome) }),
            });
        }
        let wf = self.lookup_recorded(id, &state)?;
        let mut state = state;
        let resumed = Event::RunResumed {
            events_before: state.events,
        };
        let ne = NewEvent::now(resumed.encode());
        let ts = ne.ts_us;
        let pending = self.run_meta(id).await?.status == RunStatus::Pending;
        let a = self
            .inner
            .store
            .write(
                id,
                vec![ne],
                RunUpdate {
                    // A queued run stays pending until it gets a slot.
                    status: (!pending).then_some(RunStatus::Running),
                    guard: Guard::NotFinished,
                    wake_at_us: Some(None),
                },
            )
            .await?;
        state.apply_event(id, a.first.0, ts, resumed)?;
        Ok(self.spawn(claim, state, wf, pending))
    }

    /// Resumes every run that is `running` or `pending` but not executing in this process —
    /// the runs a dead process left behind. A run that cannot be resumed does not stop the
    /// others; it is reported in [`Recovered::failed`] and left as it was.
    pub async fn recover(&self) -> Result<Recovered, EngineError> {
        let mut ids = Vec::new();
        for status in [RunStatus::Running, RunStatus::Pending] {
            let runs = self
                .inner
                .store
                .list_runs(RunFilter {
                    status: Some(status),
                    limit: None,
                })
                .await?;
            ids.extend(runs.into_iter().map(|m| m.id));
        }
        ids.sort();
        let mut out = Recovered {
            handles: Vec::new(),
            failed: Vec::new(),
        };
        for id in ids {
            match self.resume(id).await {
                Ok(h) => out.handles.push(h),
                // Executing here already: nothing to recover.
                Err(EngineError::AlreadyActive(_)) => {}
                Err(e) => out.failed.push((id, e)),
            }
        }
        Ok(out)
    }

    /// Cancels a run. A run executing here stops at once (its step in flight is abandoned,
    /// and its side effects may be partial) and records `run_cancelled` with `reason`; a run
    /// not executing is recorded as cancelled directly. A finished run is left as it was.
    pub async fn cancel(&self, id: RunId, reason: &str) -> Result<CancelOutcome, EngineError> {
        let meta = self.run_meta(id).await?;
        if meta.status.is_terminal() {
            return Ok(CancelOutcome::AlreadyFinished(meta.status));
        }
        if let Some(a) = lock(&self.inner.active).get(&id) {
            // The executing task writes the terminal event when it sees the token.
            *lock(&a.reason) = Some(reason.to_string());
            a.cancel.cancel();
            return Ok(CancelOutcome::Requested);
        }
        let ev = Event::RunCancelled {
            reason: reason.to_string(),
        };
        // Guarded: if the run finished meanwhile, its terminal event stays the only one.
        let r = self
            .inner
            .store
            .write(
                id,
                vec![NewEvent::now(ev.encode())],
                RunUpdate {
                    status: Some(RunStatus::Cancelled),
                    guard: Guard::NotFinished,
                    // A parked run leaves the wake-up index: nothing is left to wake.
                    wake_at_us: Some(None),
                },
            )
            .await;
        match r {
            Ok(_) => {
                // Its unfinished children go with it.
                let state = self.load(id).await?;
                for c in state.children.values().filter(|c| c.ok.is_none()) {
                    Box::pin(self.cancel(c.child, "its parent was cancelled")).await?;
                }
                // A parent parked waiting for this run learns that it ended.
                wake_parent(&self.inner, state.parent.as_deref()).await;
                Ok(CancelOutcome::Cancelled)
            }
            Err(StoreError::RunFinished { status, .. }) => {
                Ok(CancelOutcome::AlreadyFinished(status))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Delivers signal `name` with `data` to a run. The signal is appended to the run's log
    /// (so it is not lost if the run is not waiting yet); a run executing here is woken, and a
    /// parked run is marked `running` so that it is resumed.
    pub async fn signal(
        &self,
        id: RunId,
        name: &str,
        data: serde_json::Value,
    ) -> Result<SignalDelivery, EngineError> {
        let meta = self.run_meta(id).await?;
        let data = Payload::from_value(&data).map_err(|e| EngineError::BadInput {
            workflow: meta.workflow.clone(),
            detail: format!("the signal's data cannot be encoded: {e}"),
        })?;
        let waiting = meta.status == RunStatus::Waiting;
        let ev = Event::SignalSent {
            name: name.to_string(),
            data,
        };
        let r = self
            .inner
            .store
            .write(
                id,
                vec![NewEvent::now(ev.encode())],
                RunUpdate {
                    status: waiting.then_some(RunStatus::Running),
                    guard: Guard::NotFinished,
                    wake_at_us: waiting.then_some(None),
                },
            )
            .await;
        match r {
            Ok(_) => {}
            Err(StoreError::RunFinished { status, .. }) => {
                return Err(EngineError::RunFinished { run: id, status });
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(a) = lock(&self.inner.active).get(&id) {
            a.signal.notify_one();
            return Ok(SignalDelivery::Notified);
        }
        Ok(if waiting {
            SignalDelivery::Woken
        } else {
            SignalDelivery::Recorded
        })
    }

    /// Resolves a step that needs review (an at-most-once step interrupted while running): records
    /// its output (`Done`) or schedules another attempt (`Retry`), and marks the run `running`
    /// so that `resume`, `recover` or the worker continues it.
    pub async fn resolve_step(
        &self,
        id: RunId,
        path: &crate::event::StepPath,
        resolution: StepResolution,
    ) -> Result<(), EngineError> {
        if lock(&self.inner.active).contains_key(&id) {
            return Err(EngineError::AlreadyActive(id));
        }
        let state = self.load(id).await?;
        if state.status.is_terminal() {
            return Err(EngineError::RunFinished {
                run: id,
                status: state.status,
            });
        }
        let not = |detail: String| EngineError::NotInReview {
            run: id,
            path: path.to_string(),
            detail,
        };
        let rec = state
            .steps
            .get(path)
            .ok_or_else(|| not("there is no step there".into()))?;
        if !rec.in_flight() {
            return Err(not(
                format!("step `{}` is {:?}", rec.name, rec.status).to_lowercase()
            ));
        }
        let ev = match resolution {
            StepResolution::Done(v) => Event::StepCompleted {
                path: path.clone(),
                name: rec.name.clone(),
                attempt: rec.attempts,
                started_us: rec.started_us,
                output: Payload::from_value(&v).map_err(|e| EngineError::BadInput {
                    workflow: state.workflow.clone(),
                    detail: format!("the output cannot be encoded: {e}"),
                })?,
            },
            StepResolution::Retry => Event::StepFailed {
                path: path.clone(),
                name: rec.name.clone(),
                attempt: rec.attempts,
                started_us: rec.started_us,
                error: "reviewed: run it again".into(),
                retry_at_us: Some(cairn_storage::now_micros()),
            },
        };
        self.inner
            .store
            .write(
                id,
                vec![NewEvent::now(ev.encode())],
                RunUpdate {
                    status: Some(RunStatus::Running),
                    guard: Guard::NotFinished,
                    wake_at_us: Some(None),
                },
            )
            .await?;
        Ok(())
    }

    /// Runs today's code of run `id`'s workflow against its recorded history without executing
    /// anything or writing anything: every operation must be answered from the log. Reports the
    /// first divergence (a different step at a position, a changed output type, code that ends
    /// early or finishes differently), or where the history ends. For CI over saved histories.
    pub async fn check(&self, id: RunId) -> Result<CheckReport, EngineError> {
        let state = self.load(id).await?;
        let wf = self.lookup_recorded(id, &state)?;
        Ok(self.check_state(id, state, wf).await?.0)
    }

    /// [`Engine::check`] for a history already folded into `state` (a fork checks its copied
    /// history before writing it). Besides the report, returns the interrupt behind a
    /// divergence, if the code stopped on one (code ending early counts as a non-determinism).
    pub(crate) async fn check_state(
        &self,
        id: RunId,
        state: RunState,
        wf: Registered,
    ) -> Result<(CheckReport, Option<Interrupt>), EngineError> {
        let recorded_status = state.status;
        let recorded_output = state.output.as_ref().map(Payload::to_json);
        let recorded_error = state.error.clone();
        let workflow = state.workflow.clone();
        let input = state.input.clone();
        let shared = Arc::new(RunShared {
            run_id: id,
            store: Arc::clone(&self.inner.store),
            state: Mutex::new(LiveState::new(state)),
            cancel: CancellationToken::new(),
            shutdown: self.inner.shutdown.child_token(),
            interrupt: Mutex::new(None),
            signal: Arc::default(),
            engine: Arc::downgrade(&self.inner),
            suspend_after: self.inner.options.suspend_after,
            check_only: true,
            step_spans: Default::default(),
            meter: Default::default(),
        });
        let ctx = WorkflowContext::root(Arc::clone(&shared));
        let root = ctx.clone();
        let result = match tokio::spawn((wf.run)(ctx, input)).await {
            Ok(r) => r,
            Err(e) => {
                return Err(EngineError::Panicked {
                    run: id,
                    detail: e.to_string(),
                });
            }
        };
        let mut report = CheckReport {
            run_id: id.to_string(),
            workflow,
            steps_replayed: lock(&shared.state).replayed,
            divergence: None,
            history_ends_at: None,
        };
        let interrupt = shared.take_interrupt().or(match &result {
            Err(WorkflowError::Interrupted(i)) => Some(i.clone()),
            _ => None,
        });
        match interrupt {
            Some(Interrupt::EndOfHistory { path, name, .. }) => {
                report.history_ends_at = Some(format!("step {path} `{name}`"));
                return Ok((report, None));
            }
            Some(i) => {
                report.divergence = Some(i.to_string());
                return Ok((report, Some(i)));
            }
            None => {}
        }
        if let Some((path, recorded)) = root.unreached_recorded() {
            report.divergence = Some(format!(
                "today's code finishes before step {path}, where the history has `{recorded}`"
            ));
            let i = Interrupt::NonDeterminism {
                run: id,
                path,
                recorded,
                found: "the end of the workflow".into(),
            };
            return Ok((report, Some(i)));
        }
        let (today, today_text) = match &result {
            Ok(out) => (RunStatus::Completed, out.to_json().to_string()),
            Err(e) => (RunStatus::Failed, e.to_string()),
        };
        match recorded_status {
            RunStatus::Completed | RunStatus::Failed if recorded_status != today => {
                report.divergence = Some(format!(
                    "today's code ends {today} ({today_text}), the history {recorded_status}"
                ));
            }
            RunStatus::Completed => {
                let out = result.as_ref().ok().map(Payload::to_json);
                if out != recorded_output {
                    report.divergence = Some(format!(
                        "today's code completes with {}, the history with {}",
                        out.unwrap_or_default(),
                        recorded_output.unwrap_or_default()
                    ));
                }
            }
            RunStatus::Failed => {
                if recorded_error.as_deref() != Some(today_text.as_str()) {
                    report.divergence = Some(format!(
                        "today's code fails with `{today_text}`, the history with `{}`",
                        recorded_error.unwrap_or_default()
                    ));
                }
            }
            // Unfinished or cancelled: the code reached the end the history has not.
            _ => {
                report.history_ends_at = Some(format!("the run's end ({today})"));
            }
        }
        Ok((report, None))
    }

    /// Waits until run `id` stops executing and returns its outcome as recorded; a run that is
    /// neither finished nor executing here is resumed first.
    pub async fn wait_for(&self, id: RunId) -> Result<RunOutcome, EngineError> {
        let stopped = lock(&self.inner.active)
            .get(&id)
            .map(|a| a.stopped.subscribe());
        match stopped {
            Some(mut rx) => {
                let _ = rx.wait_for(|s| *s).await;
            }
            None => {
                let meta = self.run_meta(id).await?;
                if !meta.status.is_terminal() && meta.status != RunStatus::Waiting {
                    match self.resume(id).await {
                        Ok(h) => return h.wait().await,
                        // Claimed between our look and our resume: wait for that execution.
                        Err(EngineError::AlreadyActive(_)) => {
                            return Box::pin(self.wait_for(id)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        let state = self.load(id).await?;
        Ok(outcome_of(id, &state, 0, 0))
    }

    /// Resumes every parked run whose wake-up time has come (from the wake-up index).
    pub async fn wake_due(&self) -> Result<Recovered, EngineError> {
        let due = self
            .inner
            .store
            .due_wakeups(cairn_storage::now_micros(), 1024)
            .await?;
        let mut out = Recovered {
            handles: Vec::new(),
            failed: Vec::new(),
        };
        for (id, _) in due {
            // Defensive: a finished run has nothing to wake; drop its stale index entry.
            if let Some(meta) = self.inner.store.run(id).await?
                && meta.status.is_terminal()
            {
                self.inner
                    .store
                    .write(
                        id,
                        Vec::new(),
                        RunUpdate {
                            wake_at_us: Some(None),
                            ..RunUpdate::default()
                        },
                    )
                    .await?;
                continue;
            }
            match self.resume(id).await {
                Ok(h) => out.handles.push(h),
                Err(EngineError::AlreadyActive(_)) => {}
                Err(e) => out.failed.push((id, e)),
            }
        }
        Ok(out)
    }

    /// The timer service: recovers interrupted runs once, then until shutdown wakes parked runs
    /// when their time comes. Errors of single runs are passed to `on_failed`; handles of the
    /// runs it starts are passed to `on_started`.
    pub async fn serve_timers(
        &self,
        on_started: impl Fn(RunHandle),
        on_failed: impl Fn(RunId, EngineError),
    ) -> Result<(), EngineError> {
        const POLL: Duration = Duration::from_millis(500);
        // Interrupted runs are recovered once, at start. Afterwards only due timers wake runs
        // (signals to parked runs come through this engine and resume them directly), so a
        // run that stops on non-determinism is not resumed over and over.
        let mut first = Some(self.recover().await?);
        while !self.inner.shutdown.is_cancelled() {
            let woken = self.wake_due().await?;
            for r in first.take().into_iter().chain([woken]) {
                for (id, e) in r.failed {
                    on_failed(id, e);
                }
                for h in r.handles {
                    on_started(h);
                }
            }
            let next = self.inner.store.next_wakeup().await?;
            let nap = next
                .map(|t| crate::context::from_micros(t - cairn_storage::now_micros()))
                .unwrap_or(POLL)
                .min(POLL);
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = tokio::time::sleep(nap) => {}
            }
        }
        Ok(())
    }

    /// A run's metadata row, or an error naming the unknown id.
    pub async fn run_meta(&self, id: RunId) -> Result<RunMeta, EngineError> {
        self.inner
            .store
            .run(id)
            .await?
            .ok_or(EngineError::UnknownRun(id))
    }

    /// Stops every executing run now: steps in flight are abandoned (they run again on
    /// resume), and the runs stay `running` so that they resume later (a clean Ctrl-C).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Waits until every run started by this engine has stopped.
    pub async fn wait_idle(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        self.inner.tracker.reopen();
    }

    /// Ids of the runs executing in this process.
    pub fn active_runs(&self) -> Vec<RunId> {
        lock(&self.inner.active).keys().copied().collect()
    }

    /// Executes a claimed run on its own task. `pending`: the run's row says `pending` (it was
    /// queued for a run slot), which the fold of its events cannot know.
    fn spawn(
        &self,
        mut claim: Claim<'_>,
        state: RunState,
        wf: Registered,
        pending: bool,
    ) -> RunHandle {
        let id = claim.id;
        // The task takes over the claim and releases it when the run stops.
        let active = claim.active.take().unwrap_or_default();
        drop(claim);
        let input = state.input.clone();
        // A subscriber that leaves this run out of its spans may say so now (a meter with run
        // hooks): the run then has no span at all; its attempts go to the meter from the first,
        // and so does its end.
        let metered = crate::StepMeter::current()
            .filter(|m| m.leaves_out(id))
            .map(|m| (m, state.workflow.clone(), std::time::Instant::now()));
        // Otherwise the run's span covers its task and the workflow's own task (entered below).
        // It is a root, like the run's trace in `cairn trace`: a run started or woken from
        // within another run's task is not part of that run.
        let span = if metered.is_some() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                parent: None,
                "run",
                cairn.run_id = %id,
                cairn.workflow = %state.workflow,
                cairn.version = i64::from(state.version),
                cairn.run.status = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                exception.message = tracing::field::Empty,
            )
        };
        let run_span = span.clone();
        let queued = pending || (self.inner.slots.is_some() && state.parent.is_none());
        let parent = state.parent.clone();
        let shared = Arc::new(RunShared {
            run_id: id,
            store: Arc::clone(&self.inner.store),
            state: Mutex::new(LiveState::new(state)),
            cancel: active.cancel.clone(),
            shutdown: self.inner.shutdown.child_token(),
            interrupt: Mutex::new(None),
            signal: Arc::clone(&active.signal),
            engine: Arc::downgrade(&self.inner),
            suspend_after: self.inner.options.suspend_after,
            check_only: false,
            step_spans: std::sync::atomic::AtomicU8::new(if metered.is_some() {
                crate::context::STEP_SPANS_METERED
            } else {
                0
            }),
            meter: match &metered {
                Some((m, _, _)) => std::sync::OnceLock::from(m.clone()),
                None => std::sync::OnceLock::new(),
            },
        });
        let inner = Arc::clone(&self.inner);
        let slot = if queued { self.request_slot() } else { None };
        let join = self.inner.tracker.spawn(
            async move {
                let r = async {
                // Wait for a run slot (in creation order), then mark the run running.
                let _permit = match slot {
                    None => None,
                    Some(rx) => {
                        let permit = tokio::select! {
                            p = rx => p.ok(),
                            _ = shared.shutdown.cancelled() => None,
                            _ = shared.cancel.cancelled() => None,
                        };
                        if permit.is_none() {
                            let reason = lock(&active.reason).clone();
                            let root = WorkflowContext::root(Arc::clone(&shared));
                            if shared.cancel.is_cancelled() {
                                shared.set_interrupt(Interrupt::Cancelled(id));
                            } else {
                                shared.set_interrupt(Interrupt::Shutdown(id));
                            }
                            return finish(
                                &shared,
                                &root,
                                Ok(Err(WorkflowError::msg("stopped"))),
                                reason,
                            )
                            .await;
                        }
                        permit
                    }
                };
                if pending {
                    shared
                        .store
                        .write(id, Vec::new(), RunUpdate::status(RunStatus::Running))
                        .await?;
                }
                let ctx = WorkflowContext::root(Arc::clone(&shared));
                let root = ctx.clone();
                // The workflow runs in its own task so that a panic in user code is contained
                // and reported instead of taking the engine down.
                let deadline = lock(&shared.state).run.deadline_us;
                // In the run's span (entered at each poll) unless the run is left out of the
                // subscriber's spans, which the first step finds out (`RunTask`).
                let mut task = tokio::spawn(crate::meter::RunTask::new(
                    (wf.run)(ctx, input),
                    tracing::Span::current(),
                    Arc::clone(&shared),
                ));
                let result = match deadline {
                    None => (&mut task).await,
                    Some(d) => {
                        let left = crate::context::from_micros(d - cairn_storage::now_micros());
                        tokio::select! {
                            r = &mut task => r,
                            _ = tokio::time::sleep(left) => {
                                // Out of time: stop the workflow and everything it runs.
                                task.abort();
                                let _ = (&mut task).await;
                                shared.set_interrupt(Interrupt::TimedOut { run: id });
                                let children: Vec<RunId> = lock(&shared.state)
                                    .run
                                    .children
                                    .values()
                                    .filter(|c| c.ok.is_none())
                                    .map(|c| c.child)
                                    .collect();
                                let engine = Engine::from_inner(Arc::clone(&inner));
                                for c in children {
                                    let _ = engine.cancel(c, "its parent timed out").await;
                                }
                                Ok(Err(WorkflowError::Interrupted(Interrupt::TimedOut { run: id })))
                            }
                        }
                    }
                };
                let reason = lock(&active.reason).clone();
                finish(&shared, &root, result, reason).await
            }
            .await;
                // How this incarnation of the run ended: to the meter for a run left out, or
                // on its span, where a failed run is an error (OpenTelemetry: ERROR status and
                // the exception).
                if let Some((meter, workflow, started)) = &metered {
                    let status = r.as_ref().ok().map(|o| o.status.as_str());
                    let secs = started.elapsed().as_secs_f64();
                    meter.record_run(&crate::RunEnded::new(workflow, status, secs));
                }
                match &r {
                    Ok(o) => {
                        run_span.record("cairn.run.status", o.status.as_str());
                        if o.status == RunStatus::Failed {
                            run_span.record("otel.status_code", "ERROR");
                            if let Some(e) = &o.error {
                                run_span.record("exception.message", e.as_str());
                            }
                        }
                    }
                    Err(e) => {
                        run_span.record("otel.status_code", "ERROR");
                        run_span.record("exception.message", tracing::field::display(e));
                    }
                }
                lock(&inner.active).remove(&id);
                active.stopped.send_replace(true);
                if let Ok(o) = &r
                    && o.status.is_terminal()
                {
                    wake_parent(&inner, parent.as_deref()).await;
                }
                r
            }
            .instrument(span),
        );
        RunHandle { id, join }
    }
}

/// When a child run finishes, its parent may be parked waiting for it: wake it. (The parent
/// comes from the run's state, not from a read of its row: a read through the writing handle
/// costs a checkpoint when changes are outstanding, and most runs have no parent.)
async fn wake_parent(inner: &Arc<EngineInner>, parent: Option<&str>) {
    let Some(parent) = parent.and_then(|p| p.parse::<RunId>().ok()) else {
        return;
    };
    let Ok(Some(pmeta)) = inner.store.run(parent).await else {
        return;
    };
    if pmeta.status != RunStatus::Waiting {
        return;
    }
    let engine = Engine::from_inner(Arc::clone(inner));
    if !engine.inner.shutdown.is_cancelled() {
        // Resuming writes `running`; its handle is not awaited here: the parent runs on its
        // own task, like any other run.
        let _ = engine.resume(parent).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads and folds a run's history page by page.
pub(crate) async fn load_state(store: &dyn EventStore, id: RunId) -> Result<RunState, EngineError> {
    if store.run(id).await?.is_none() {
        return Err(EngineError::UnknownRun(id));
    }
    let mut r = Replayer::new(id);
    let mut from = Seq(0);
    loop {
        let page = store.read(id, from, READ_PAGE_EVENTS).await?;
        let Some(last) = page.last() else { break };
        from = Seq(last.seq.0 + 1);
        r.feed(&page)?;
    }
    Ok(r.finish()?)
}

fn outcome_of(id: RunId, s: &RunState, replayed: u64, executed: u64) -> RunOutcome {
    RunOutcome {
        run_id: id.to_string(),
        status: s.status,
        output: s.output.as_ref().map(Payload::to_json),
        error: s.error.clone(),
        steps_replayed: replayed,
        steps_executed: executed,
    }
}

/// Records how the run ended, given what the workflow task returned.
async fn finish(
    shared: &RunShared,
    root: &WorkflowContext,
    result: Result<Result<Payload, WorkflowError>, tokio::task::JoinError>,
    cancel_reason: Option<String>,
) -> Result<RunOutcome, EngineError> {
    let id = shared.run_id;
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            let detail = if e.is_panic() {
                let p = e.into_panic();
                p.downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into())
            } else {
                "the task was aborted".into()
            };
            return Err(EngineError::Panicked { run: id, detail });
        }
    };
    // Code that finishes before reaching everything the history recorded has diverged too.
    if shared.take_interrupt().is_none()
        && !matches!(result, Err(WorkflowError::Interrupted(_)))
        && let Some((path, recorded)) = root.unreached_recorded()
    {
        shared.set_interrupt(Interrupt::NonDeterminism {
            run: id,
            path,
            recorded,
            found: "the end of the workflow".into(),
        });
    }
    let (event, status) = match (shared.take_interrupt(), result) {
        (Some(Interrupt::Cancelled(_)), _)
        | (None, Err(WorkflowError::Interrupted(Interrupt::Cancelled(_)))) => (
            Event::RunCancelled {
                reason: cancel_reason.unwrap_or_else(|| "cancelled on request".into()),
            },
            RunStatus::Cancelled,
        ),
        (Some(Interrupt::Shutdown(_)), _)
        | (None, Err(WorkflowError::Interrupted(Interrupt::Shutdown(_)))) => {
            let st = lock(&shared.state);
            let mut o = outcome_of(id, &st.run, st.replayed, st.executed);
            o.status = RunStatus::Running;
            return Ok(o);
        }
        (
            Some(Interrupt::Suspend {
                wake_at_us, reason, ..
            }),
            _,
        )
        | (
            None,
            Err(WorkflowError::Interrupted(Interrupt::Suspend {
                wake_at_us, reason, ..
            })),
        ) => {
            // A run with a deadline must also be woken to fail on time.
            let deadline = lock(&shared.state).run.deadline_us;
            let wake_at_us = match (wake_at_us, deadline) {
                (Some(w), Some(d)) => Some(w.min(d)),
                (w, d) => w.or(d),
            };
            let ev = Event::RunSuspended { wake_at_us, reason };
            let ne = NewEvent::now(ev.encode());
            let ts = ne.ts_us;
            let a = shared
                .store
                .write(
                    id,
                    vec![ne],
                    RunUpdate {
                        status: Some(RunStatus::Waiting),
                        guard: Guard::NotFinished,
                        wake_at_us: Some(wake_at_us),
                    },
                )
                .await?;
            let mut st = lock(&shared.state);
            st.run.apply_event(id, a.first.0, ts, ev)?;
            return Ok(outcome_of(id, &st.run, st.replayed, st.executed));
        }
        (Some(i @ Interrupt::TimedOut { .. }), _)
        | (None, Err(WorkflowError::Interrupted(i @ Interrupt::TimedOut { .. }))) => (
            Event::RunFailed {
                error: i.to_string(),
            },
            RunStatus::Failed,
        ),
        (Some(i), _) | (None, Err(WorkflowError::Interrupted(i))) => {
            return Err(EngineError::Interrupted(i));
        }
        (None, Ok(output)) => (Event::RunCompleted { output }, RunStatus::Completed),
        (None, Err(e)) => (
            Event::RunFailed {
                error: e.to_string(),
            },
            RunStatus::Failed,
        ),
    };
    let mut event = event;
    let mut status = status;
    let mut ne = NewEvent::now(event.encode());
    if ne.payload.len() > shared.store.max_payload_bytes() {
        // An output over the store's limit fails the run with a typed reason instead of
        // leaving it running forever.
        event = Event::RunFailed {
            error: format!(
                "the run's output is {} bytes, over the store's payload limit of {} bytes; return a reference to large data instead",
                ne.payload.len(),
                shared.store.max_payload_bytes()
            ),
        };
        status = RunStatus::Failed;
        ne = NewEvent::now(event.encode());
    }
    let ts = ne.ts_us;
    let a = match shared
        .store
        .append_guarded(id, vec![ne], Some(status), Guard::NotFinished)
        .await
    {
        Ok(a) => a,
        // Finished meanwhile (cancelled by another handle): report what the log says.
        Err(StoreError::RunFinished { .. }) => {
            let run = load_state(shared.store.as_ref(), id).await?;
            let st = lock(&shared.state);
            return Ok(outcome_of(id, &run, st.replayed, st.executed));
        }
        Err(e) => return Err(e.into()),
    };
    let mut st = lock(&shared.state);
    st.run.apply_event(id, a.first.0, ts, event)?;
    Ok(outcome_of(id, &st.run, st.replayed, st.executed))
}
