//! Fan-out / fan-in with checkpointed partial results.
//!
//! `ctx.fan_out(name, items, options, f)` runs one branch per item, each in its own scope
//! (`<path>.<index>.<step>`), at most `concurrency` at a time in a sliding window: a finished
//! branch immediately admits the next one. Each branch's outcome is appended the moment it
//! finishes, so a resumed fan-out runs only the branches without a recorded outcome, and the
//! fan-in result is the same as an uninterrupted run's. Once a branch has an outcome, the fold
//! forgets its inner steps, so memory is bounded by the branches in flight, not the total.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::context::{WorkflowContext, lock};
use crate::error::{Interrupt, WorkflowError};
use crate::event::{Event, Payload, StepPath};
use crate::state::{BranchRecord, FAN_OUT_BRANCHES_MAX, Kind};

/// When a fan-out counts as succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JoinPolicy {
    /// Every branch must succeed; all branches run even after a failure.
    All,
    /// Every branch must succeed; the first failure cancels the branches in flight.
    AllFailFast,
    /// Wait for every branch and report each outcome; never fails.
    AllSettled,
    /// At least this many branches must succeed; the failures are reported with the result.
    AtLeast(u32),
    /// The first success wins and cancels the branches in flight; fails if every branch fails.
    FirstSuccess,
}

impl JoinPolicy {
    /// The policy as recorded in the log.
    pub fn label(&self) -> String {
        match self {
            JoinPolicy::All => "all".into(),
            JoinPolicy::AllFailFast => "all_fail_fast".into(),
            JoinPolicy::AllSettled => "all_settled".into(),
            JoinPolicy::AtLeast(n) => format!("at_least({n})"),
            JoinPolicy::FirstSuccess => "first_success".into(),
        }
    }

    /// Whether the outcome is decided given the counts so far: `Some(Ok)` succeeded,
    /// `Some(Err(why))` failed, `None` keep going.
    fn decide(&self, total: u32, succeeded: u32, failed: u32) -> Option<Result<(), String>> {
        let finished = succeeded + failed;
        let all_done = finished >= total;
        match *self {
            JoinPolicy::All => all_done.then(|| {
                if failed == 0 {
                    Ok(())
                } else {
                    Err(format!("{failed} of {total} branches failed"))
                }
            }),
            JoinPolicy::AllFailFast => {
                if failed > 0 {
                    Some(Err(format!(
                        "a branch failed ({failed} of {total} so far); the rest were cancelled"
                    )))
                } else {
                    all_done.then_some(Ok(()))
                }
            }
            JoinPolicy::AllSettled => all_done.then_some(Ok(())),
            JoinPolicy::AtLeast(k) => {
                if total - failed < k {
                    Some(Err(format!(
                        "only {succeeded} of {total} branches succeeded and {failed} failed; at least {k} are required"
                    )))
                } else {
                    all_done.then_some(Ok(()))
                }
            }
            JoinPolicy::FirstSuccess => {
                if succeeded > 0 {
                    Some(Ok(()))
                } else {
                    all_done.then(|| Err(format!("all {total} branches failed")))
                }
            }
        }
    }
}

/// How a fan-out runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FanOutOptions {
    /// How many branches run at once (at least 1).
    pub concurrency: usize,
    /// When the fan-out counts as succeeded.
    pub join: JoinPolicy,
}

impl FanOutOptions {
    /// `concurrency` branches at once, every branch must succeed.
    pub fn new(concurrency: usize) -> Self {
        FanOutOptions {
            concurrency: concurrency.max(1),
            join: JoinPolicy::All,
        }
    }

    /// The same options with another join policy.
    pub fn join(mut self, join: JoinPolicy) -> Self {
        self.join = join;
        self
    }
}

impl Default for FanOutOptions {
    fn default() -> Self {
        Self::new(8)
    }
}

/// One branch's outcome in a fan-in.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BranchOutcome<O> {
    /// The branch returned this output.
    Ok(O),
    /// The branch failed.
    Failed(String),
    /// The branch was stopped mid-flight by the join policy.
    Cancelled,
    /// The branch never started (the join policy decided first).
    NotRun,
}

/// The result of a fan-out: each branch's outcome, by item index.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FanIn<O> {
    /// Outcomes in item order.
    pub outcomes: Vec<BranchOutcome<O>>,
}

impl<O> FanIn<O> {
    /// The successful outputs with their item index.
    pub fn successes(&self) -> impl Iterator<Item = (usize, &O)> {
        self.outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                BranchOutcome::Ok(v) => Some((i, v)),
                _ => None,
            })
    }

    /// The failures with their item index.
    pub fn failures(&self) -> impl Iterator<Item = (usize, &str)> {
        self.outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                BranchOutcome::Failed(e) => Some((i, e.as_str())),
                _ => None,
            })
    }

    /// The successful outputs, in item order.
    pub fn into_successes(self) -> Vec<O> {
        self.outcomes
            .into_iter()
            .filter_map(|o| match o {
                BranchOutcome::Ok(v) => Some(v),
                _ => None,
            })
            .collect()
    }
}

/// The durability of a branch outcome, awaited before the fan-in is recorded.
type Durable =
    cairn_storage::BoxFuture<'static, Result<cairn_storage::Appended, cairn_storage::StoreError>>;

/// What a branch task reports to the coordinator.
type BranchResult = Result<Durable, WorkflowError>;

impl WorkflowContext {
    /// Runs `f` once per item as durable branches, at most `opts.concurrency` at a time, and
    /// joins them by `opts.join`. Each branch gets its own context; its steps are durable and
    /// its outcome is recorded when it finishes. On resume, branches with a recorded outcome
    /// are not run again.
    pub fn fan_out<'a, I, O, F, Fut>(
        &'a self,
        name: &str,
        items: Vec<I>,
        opts: FanOutOptions,
        f: F,
    ) -> impl Future<Output = Result<FanIn<O>, WorkflowError>> + Send + use<'a, I, O, F, Fut>
    where
        I: Send + 'static,
        O: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let path = self.next_path();
        let name = name.to_string();
        async move {
            let span = tracing::info_span!(
                "fan_out",
                cairn.run_id = %self.shared.run_id,
                cairn.step_path = %path,
                cairn.fan_out.name = %name,
                cairn.fan_out.branches = items.len() as i64,
                cairn.fan_out.succeeded = tracing::field::Empty,
                cairn.fan_out.failed = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                exception.message = tracing::field::Empty,
            );
            let record = span.clone();
            let r = self
                .run_fan_out(path, name, items, opts, Arc::new(f))
                .instrument(span)
                .await;
            if let Err(e) = &r
                && !matches!(e, WorkflowError::Interrupted(_))
            {
                record.record("otel.status_code", "ERROR");
                record.record("exception.message", tracing::field::display(e));
            }
            r
        }
    }

    async fn run_fan_out<I, O, F, Fut>(
        &self,
        path: StepPath,
        name: String,
        items: Vec<I>,
        opts: FanOutOptions,
        f: Arc<F>,
    ) -> Result<FanIn<O>, WorkflowError>
    where
        I: Send + 'static,
        O: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        shared.check()?;
        let total = u32::try_from(items.len())
            .ok()
            .filter(|n| *n <= FAN_OUT_BRANCHES_MAX)
            .ok_or_else(|| {
                WorkflowError::msg(format!(
                    "fan-out `{name}` has {} items, over the limit of {FAN_OUT_BRANCHES_MAX}; split it into several fan-outs",
                    items.len()
                ))
            })?;
        let concurrency = opts.concurrency.max(1);
        let recorded = {
            let st = lock(&shared.state);
            if let Some(other) = st.run.other_kind_at(&path, Kind::FanOut) {
                drop(st);
                return Err(self.nondeterminism(path, other, format!("fan-out `{name}`")));
            }
            match st.run.fanouts.get(&path) {
                Some(fo) if fo.name != name || fo.branches != total => {
                    let recorded = format!("fan-out `{}` of {} branches", fo.name, fo.branches);
                    drop(st);
                    return Err(self.nondeterminism(
                        path,
                        recorded,
                        format!("fan-out `{name}` of {total} branches"),
                    ));
                }
                Some(fo) => Some(fo.fan_in.clone()),
                None => None,
            }
        };
        // Appended records not yet known durable, awaited before the fan-in is recorded (the
        // fan-in's own record implies them, the log being ordered; waiting surfaces a failed
        // write as the store failure it is).
        let mut outcomes_written: Vec<Durable> = Vec::new();
        match recorded {
            // The fan-in was decided before: answer entirely from the log.
            Some(Some(fan_in)) => {
                lock(&shared.state).replayed += 1;
                return self.fan_in_result(&path, &name, &fan_in.cancelled, fan_in.error);
            }
            Some(None) => {}
            None => {
                // Not awaited: the log is ordered, so any branch record a caller waits for
                // implies this one is durable; a crash before it only re-runs the branches,
                // whose steps then have no record either. A fan-out saves one disk write of
                // latency.
                outcomes_written.push(shared.record_pipelined(Event::FanOutStarted {
                    path: path.clone(),
                    name: name.clone(),
                    branches: total,
                    concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
                    join: opts.join.label(),
                })?);
            }
        }
        let counts = |shared: &crate::context::RunShared| {
            let st = lock(&shared.state);
            st.run
                .fanouts
                .get(&path)
                .map(|fo| (fo.succeeded, fo.failed))
                .unwrap_or_default()
        };
        let todo: Vec<u32> = {
            let st = lock(&shared.state);
            st.run
                .fanouts
                .get(&path)
                .map(|fo| {
                    fo.outcomes
                        .iter()
                        .enumerate()
                        .filter(|(_, o)| o.is_none())
                        .map(|(i, _)| i as u32)
                        .collect()
                })
                .unwrap_or_default()
        };
        let lanes = concurrency.min(todo.len());
        let slots = Arc::new(Slots {
            todo,
            next: AtomicUsize::new(0),
            items: Mutex::new(items.into_iter().map(Some).collect()),
            in_flight: Mutex::new(BTreeSet::new()),
            stop: AtomicBool::new(false),
            decided: Notify::new(),
            path: path.clone(),
            span: tracing::Span::current(),
            join: opts.join,
            total,
            keep: (4096 / lanes.max(1)).max(16),
        });
        // Each of `concurrency` tasks runs branch after branch, taking the next item the moment
        // its branch has finished: the window slides without a round trip through this task,
        // and no task is spawned per branch.
        let mut set: JoinSet<Result<Vec<Durable>, WorkflowError>> = JoinSet::new();
        let mut decision = {
            let (ok, failed) = counts(&shared);
            opts.join.decide(total, ok, failed)
        };
        if decision.is_none() {
            for _ in 0..lanes {
                set.spawn(Box::pin(lane(
                    Arc::clone(&slots),
                    self.clone(),
                    Arc::clone(&f),
                )));
            }
        }
        // Made once: a cancellation future registers with its token when first polled, and
        // stays registered across the loop's turns.
        let cancelled = shared.cancel.cancelled();
        let shutdown = shared.shutdown.cancelled();
        tokio::pin!(cancelled, shutdown);
        let decision = loop {
            if let Some(d) = decision.take() {
                break d;
            }
            if set.is_empty() {
                // Every lane ran out of items: decide on what is recorded.
                let (ok, failed) = counts(&shared);
                break opts
                    .join
                    .decide(total, ok, failed)
                    .or_else(|| opts.join.decide(ok + failed, ok, failed))
                    .unwrap_or(Ok(()));
            }
            let joined = tokio::select! {
                biased;
                _ = &mut cancelled => None,
                _ = &mut shutdown => None,
                _ = slots.decided.notified() => {
                    let (ok, failed) = counts(&shared);
                    decision = opts.join.decide(total, ok, failed);
                    continue;
                }
                j = set.join_next() => j,
            };
            match joined {
                None => {
                    slots.stop.store(true, Ordering::Release);
                    stop_all(&mut set).await;
                    return Err(match shared.check() {
                        Err(e) => e,
                        Ok(()) => shared.set_interrupt(Interrupt::Shutdown(shared.run_id)),
                    });
                }
                Some(Ok(Ok(durables))) => outcomes_written.extend(durables),
                Some(Ok(Err(e))) => {
                    slots.stop.store(true, Ordering::Release);
                    stop_all(&mut set).await;
                    return Err(match e {
                        WorkflowError::Interrupted(x) => shared.set_interrupt(x),
                        other => other,
                    });
                }
                Some(Err(join_err)) => {
                    slots.stop.store(true, Ordering::Release);
                    stop_all(&mut set).await;
                    if join_err.is_panic() {
                        std::panic::resume_unwind(join_err.into_panic());
                    }
                    return Err(shared.set_interrupt(Interrupt::Shutdown(shared.run_id)));
                }
            }
        };
        slots.stop.store(true, Ordering::Release);
        // The policy decided: stop what is still running. A branch counts as cancelled only if
        // it has no recorded outcome once stopped: a branch may have recorded its outcome (and
        // been counted) just before its lane was stopped.
        stop_all(&mut set).await;
        let in_flight = std::mem::take(&mut *lock(&slots.in_flight));
        let cancelled: Vec<u32> = {
            let st = lock(&shared.state);
            let outcomes = st.run.fanouts.get(&path).map(|fo| &fo.outcomes);
            in_flight
                .into_iter()
                .filter(|i| {
                    outcomes
                        .and_then(|o| o.get(*i as usize))
                        .is_none_or(|o| o.is_none())
                })
                .collect()
        };
        let (succeeded, failed) = counts(&shared);
        // Branches may have recorded outcomes between the decision and the stop: word the
        // failure with the final counts, the ones `fan_in_completed` records.
        let error = decision.err().map(|first| {
            opts.join
                .decide(total, succeeded, failed)
                .and_then(Result::err)
                .unwrap_or(first)
        });
        // Every recorded outcome must be durable before the fan-in that counts it.
        await_durable(&shared, &mut outcomes_written).await?;
        // On the `fan_out` span (the current one): the final counts.
        let current = tracing::Span::current();
        current.record("cairn.fan_out.succeeded", i64::from(succeeded));
        current.record("cairn.fan_out.failed", i64::from(failed));
        shared
            .record(Event::FanInCompleted {
                path: path.clone(),
                succeeded,
                failed,
                cancelled: cancelled.clone(),
                error: error.clone(),
            })
            .await?;
        self.fan_in_result(&path, &name, &cancelled, error)
    }

    /// Builds the fan-in result from the recorded outcomes (the same for a fresh and a
    /// resumed run): a cancelled branch counts as cancelled even if its outcome was recorded
    /// while it was being stopped.
    fn fan_in_result<O: DeserializeOwned>(
        &self,
        path: &StepPath,
        name: &str,
        cancelled: &[u32],
        error: Option<String>,
    ) -> Result<FanIn<O>, WorkflowError> {
        if let Some(message) = error {
            return Err(WorkflowError::Step {
                path: path.clone(),
                name: name.to_string(),
                message,
            });
        }
        let shared = &self.shared;
        let st = lock(&shared.state);
        let Some(fo) = st.run.fanouts.get(path) else {
            return Ok(FanIn {
                outcomes: Vec::new(),
            });
        };
        let cancelled: BTreeSet<u32> = cancelled.iter().copied().collect();
        let mut outcomes = Vec::with_capacity(fo.outcomes.len());
        for (i, o) in fo.outcomes.iter().enumerate() {
            let out = if cancelled.contains(&(i as u32)) {
                BranchOutcome::Cancelled
            } else {
                match o {
                    Some(BranchRecord::Completed(p)) => match p.to_typed::<O>() {
                        Ok(v) => BranchOutcome::Ok(v),
                        Err(e) => {
                            let detail = e.to_string();
                            drop(st);
                            return Err(shared.set_interrupt(Interrupt::RecordedTypeChanged {
                                run: shared.run_id,
                                path: path.child(i as u32),
                                name: name.to_string(),
                                detail,
                            }));
                        }
                    },
                    Some(BranchRecord::Failed(e))
                    | Some(BranchRecord::FailedWith { error: e, .. }) => {
                        BranchOutcome::Failed(e.clone())
                    }
                    None => BranchOutcome::NotRun,
                }
            };
            outcomes.push(out);
        }
        Ok(FanIn { outcomes })
    }
}

/// What a fan-out's lanes share: the items still to run and the branches running.
struct Slots<I> {
    /// Indexes of the branches without a recorded outcome, in order.
    todo: Vec<u32>,
    /// The next position in `todo` to take.
    next: AtomicUsize,
    /// The items, each taken by the lane that runs it.
    items: Mutex<Vec<Option<I>>>,
    /// Branches started and not finished: the ones a decision stops count as cancelled.
    in_flight: Mutex<BTreeSet<u32>>,
    /// Set once the join policy has decided (or the fan-out stops): no lane starts another.
    stop: AtomicBool,
    /// A lane saw the policy decide.
    decided: Notify,
    /// The fan-out's path, span, policy and size.
    path: StepPath,
    span: tracing::Span,
    join: JoinPolicy,
    total: u32,
    /// Outcome futures a lane keeps before waiting for them (about 4,096 in all).
    keep: usize,
}

/// One lane of a fan-out: runs branches one after another (each in a `branch` span under the
/// `fan_out` span) until the items run out or the join policy decides, and returns the
/// futures of the outcomes it recorded and has not waited for.
async fn lane<I, O, F, Fut>(
    slots: Arc<Slots<I>>,
    ctx: WorkflowContext,
    f: Arc<F>,
) -> Result<Vec<Durable>, WorkflowError>
where
    I: Send + 'static,
    O: Serialize + DeserializeOwned + Send + 'static,
    F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
{
    let shared = Arc::clone(&ctx.shared);
    let path = &slots.path;
    let mut written: Vec<Durable> = Vec::new();
    while !slots.stop.load(Ordering::Acquire) {
        let k = slots.next.fetch_add(1, Ordering::Relaxed);
        let Some(&i) = slots.todo.get(k) else { break };
        let Some(item) = lock(&slots.items)
            .get_mut(i as usize)
            .and_then(Option::take)
        else {
            continue;
        };
        lock(&slots.in_flight).insert(i);
        // A child of the `fan_out` span (a lane is a task of its own, outside it).
        let span = tracing::info_span!(
            parent: &slots.span,
            "branch",
            cairn.run_id = %shared.run_id,
            cairn.step_path = %path.child(i),
            index = i64::from(i),
            cairn.branch.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            exception.message = tracing::field::Empty,
        );
        let record = span.clone();
        let r = branch(&ctx, path, i, item, &*f, &record)
            .instrument(span)
            .await;
        lock(&slots.in_flight).remove(&i);
        written.push(r?);
        if written.len() >= slots.keep {
            await_durable(&shared, &mut written).await?;
        }
        let (ok, failed) = lock(&shared.state)
            .run
            .fanouts
            .get(path)
            .map(|fo| (fo.succeeded, fo.failed))
            .unwrap_or_default();
        if slots.join.decide(slots.total, ok, failed).is_some() {
            slots.stop.store(true, Ordering::Release);
            slots.decided.notify_one();
            break;
        }
    }
    Ok(written)
}

/// Runs branch `i` and records its outcome (not awaited: the branch's steps are durable
/// already, and a crash only re-runs the branch's closure, whose steps are answered from the
/// log; the fan-in waits for it).
async fn branch<I, O, F, Fut>(
    ctx: &WorkflowContext,
    fan_path: &StepPath,
    i: u32,
    item: I,
    f: &F,
    span: &tracing::Span,
) -> BranchResult
where
    O: Serialize,
    F: Fn(WorkflowContext, I) -> Fut,
    Fut: Future<Output = Result<O, WorkflowError>>,
{
    let sh = &ctx.shared;
    let r = f(ctx.scope_at(fan_path.child(i)), item).await;
    let max_bytes = sh.store.max_payload_bytes();
    let fan_path = fan_path.clone();
    let ev = match r {
        Ok(o) => match Payload::from_value(&o) {
            // An output over the store's limit fails the branch, not the run.
            Ok(output) if output.len() + 64 > max_bytes => Event::BranchFailed {
                path: fan_path,
                index: i,
                error: format!(
                    "the branch's output is {} bytes, over the store's payload limit of {max_bytes} bytes; return a reference to large data instead",
                    output.len()
                ),
            },
            Ok(output) => Event::BranchCompleted {
                path: fan_path,
                index: i,
                output,
            },
            Err(e) => Event::BranchFailed {
                path: fan_path,
                index: i,
                error: format!("the branch's output cannot be encoded as JSON: {e}"),
            },
        },
        Err(WorkflowError::Interrupted(x)) => return Err(WorkflowError::Interrupted(x)),
        Err(WorkflowError::FailedWith { message, details }) => {
            match Payload::from_value(&details) {
                // Details over the store's limit are dropped, not the failure.
                Ok(d) if d.len() + message.len() + 64 <= max_bytes => Event::BranchFailedWith {
                    path: fan_path,
                    index: i,
                    error: message,
                    details: d,
                },
                _ => Event::BranchFailed {
                    path: fan_path,
                    index: i,
                    error: message,
                },
            }
        }
        Err(e) => Event::BranchFailed {
            path: fan_path,
            index: i,
            error: e.to_string(),
        },
    };
    match &ev {
        Event::BranchFailed { error, .. } | Event::BranchFailedWith { error, .. } => {
            span.record("cairn.branch.outcome", "failed");
            span.record("otel.status_code", "ERROR");
            span.record("exception.message", error.as_str());
        }
        _ => {
            span.record("cairn.branch.outcome", "succeeded");
        }
    }
    sh.record_pipelined(ev)
}

/// Waits until the branch outcomes written so far are durable; a failure stops the run as a
/// store failure (the outcomes are in the live state but may not be in the log).
async fn await_durable(
    shared: &crate::context::RunShared,
    pending: &mut Vec<Durable>,
) -> Result<(), WorkflowError> {
    for d in pending.drain(..) {
        d.await.map_err(|e| {
            shared.set_interrupt(Interrupt::Store {
                run: shared.run_id,
                detail: e.to_string(),
            })
        })?;
    }
    Ok(())
}

/// Aborts every branch task and waits until they have all stopped.
async fn stop_all<T: 'static>(set: &mut JoinSet<T>) {
    set.abort_all();
    while set.join_next().await.is_some() {}
}
