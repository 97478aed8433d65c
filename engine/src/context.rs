//! [`WorkflowContext`]: what workflow code uses to run durable steps and read its run's state.
//!
//! Every operation takes the next position in its scope (`0`, `1`, … at the top level). If the
//! history already has that position, the recorded answer is returned without executing
//! anything; otherwise the operation runs and its result is appended before it returns. So a
//! resumed run replays its completed steps from the log and executes from the first step the
//! log does not have.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use cairn_storage::{EventStore, NewEvent, RunId, now_micros};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use std::time::Duration;

use cairn_storage::BoxFuture;

use crate::error::{Interrupt, StepError, WorkflowError};
use crate::event::{Event, Payload, StepPath};
use crate::retry::StepOptions;
use crate::state::{Kind, RunState, StepStatus};

/// Limits that keep one run's summaries bounded.
const SUMMARY_INPUT_CHARS_MAX: usize = 500;
const SUMMARY_RESULT_CHARS_MAX: usize = 1000;

/// State shared by every context of one executing run.
pub(crate) struct RunShared {
    pub(crate) run_id: RunId,
    pub(crate) store: Arc<dyn EventStore>,
    /// The fold of the log so far, kept current as the run appends.
    pub(crate) state: Mutex<LiveState>,
    /// Cancelled when the run is cancelled.
    pub(crate) cancel: CancellationToken,
    /// Cancelled when the engine shuts down.
    pub(crate) shutdown: CancellationToken,
    pub(crate) interrupt: Mutex<Option<Interrupt>>,
    /// Woken when a signal is delivered to this run.
    pub(crate) signal: Arc<tokio::sync::Notify>,
    /// The engine executing the run (for child runs).
    pub(crate) engine: std::sync::Weak<crate::runtime::EngineInner>,
    /// Waits longer than this park the run (status `waiting`) instead of holding it in memory.
    pub(crate) suspend_after: Duration,
    /// Checking a history: nothing may execute or be recorded; reaching an operation the
    /// history does not have ends the check (`Interrupt::EndOfHistory`).
    pub(crate) check_only: bool,
    /// Whether this run's step attempts get a `step` span, or else are handed to the
    /// subscriber's [`crate::StepMeter`]: unknown until the first attempt, then the
    /// subscriber's answer for it, which holds for the run's later attempts (the sampler decides
    /// once per run). Asking the subscriber again at every step cost about 750 instructions.
    pub(crate) step_spans: std::sync::atomic::AtomicU8,
    /// The subscriber's meter, found at the first attempt that had no span.
    pub(crate) meter: std::sync::OnceLock<crate::StepMeter>,
}

/// [`RunShared::step_spans`]: the subscriber wanted the first step span.
const STEP_SPANS_YES: u8 = 1;
/// [`RunShared::step_spans`]: no span; attempts go to the subscriber's meter.
pub(crate) const STEP_SPANS_METERED: u8 = 2;
/// [`RunShared::step_spans`]: no span and no meter (telemetry off).
const STEP_SPANS_NONE: u8 = 3;

pub(crate) struct LiveState {
    pub(crate) run: RunState,
    /// The step answered or executed most recently, for `last_result`.
    last: Option<StepPath>,
    /// Steps answered from the log in this execution.
    pub(crate) replayed: u64,
    /// Steps executed in this execution.
    pub(crate) executed: u64,
}

impl LiveState {
    pub(crate) fn new(run: RunState) -> Self {
        LiveState {
            run,
            last: None,
            replayed: 0,
            executed: 0,
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the fold half-applied in a way later code
    // trusts (each apply is one map update), so recover the guard.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RunShared {
    pub(crate) fn take_interrupt(&self) -> Option<Interrupt> {
        lock(&self.interrupt).clone()
    }

    pub(crate) fn set_interrupt(&self, i: Interrupt) -> WorkflowError {
        let mut slot = lock(&self.interrupt);
        // The first interrupt wins: it is the cause, later ones are consequences.
        let i = slot.get_or_insert(i).clone();
        WorkflowError::Interrupted(i)
    }

    pub(crate) fn check(&self) -> Result<(), WorkflowError> {
        if let Some(i) = lock(&self.interrupt).clone() {
            return Err(WorkflowError::Interrupted(i));
        }
        if self.cancel.is_cancelled() {
            return Err(self.set_interrupt(Interrupt::Cancelled(self.run_id)));
        }
        if self.shutdown.is_cancelled() {
            return Err(self.set_interrupt(Interrupt::Shutdown(self.run_id)));
        }
        Ok(())
    }

    /// Appends one event and folds it into the live state at once, returning a future that
    /// resolves when the event is durable. Writes are ordered when issued, so anything appended
    /// later and awaited implies this one is durable too.
    /// In check mode: stop at `path` (the code would do something the history lacks).
    pub(crate) fn end_of_history(&self, path: &StepPath, name: &str) -> WorkflowError {
        self.set_interrupt(Interrupt::EndOfHistory {
            run: self.run_id,
            path: path.clone(),
            name: name.to_string(),
        })
    }

    pub(crate) fn record_pipelined(
        &self,
        event: Event,
    ) -> Result<
        BoxFuture<'static, Result<cairn_storage::Appended, cairn_storage::StoreError>>,
        WorkflowError,
    > {
        if self.check_only {
            let path = event.path().cloned().unwrap_or_default();
            return Err(self.end_of_history(&path, event.kind()));
        }
        let ne = NewEvent::now(event.encode());
        let ts = ne.ts_us;
        let durable = self.store.append(self.run_id, vec![ne], None);
        let run = self.run_id;
        lock(&self.state)
            .run
            .apply_unsequenced(run, ts, event)
            .map_err(|e| {
                self.set_interrupt(Interrupt::Store {
                    run,
                    detail: e.to_string(),
                })
            })?;
        Ok(durable)
    }

    /// Appends one event, waits until it is durable, and folds it into the live state.
    pub(crate) async fn record(&self, event: Event) -> Result<(), WorkflowError> {
        if self.check_only {
            // The one place every new record passes: in check mode nothing is written.
            let path = event.path().cloned().unwrap_or_default();
            return Err(self.end_of_history(&path, event.kind()));
        }
        let ne = NewEvent::now(event.encode());
        let ts = ne.ts_us;
        match self.store.append(self.run_id, vec![ne], None).await {
            Ok(a) => {
                let mut st = lock(&self.state);
                let run = self.run_id;
                st.run.apply_event(run, a.first.0, ts, event).map_err(|e| {
                    self.set_interrupt(Interrupt::Store {
                        run,
                        detail: e.to_string(),
                    })
                })
            }
            Err(e) => Err(self.set_interrupt(Interrupt::Store {
                run: self.run_id,
                detail: e.to_string(),
            })),
        }
    }
}

/// A step recorded in the run, as seen by workflow code.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompletedStep {
    /// The step's position.
    pub path: String,
    /// The step's name.
    pub name: String,
    /// Its output.
    pub result: serde_json::Value,
    /// When its successful attempt began (microseconds since the epoch).
    pub started_us: i64,
    /// When it completed (microseconds since the epoch).
    pub finished_us: i64,
}

/// The handle workflow code uses for durable steps, recorded non-determinism and run state.
///
/// Cloning a context shares its position counter; use one context per logical sequence of
/// steps so that positions are assigned in program order.
#[derive(Clone)]
pub struct WorkflowContext {
    pub(crate) shared: Arc<RunShared>,
    scope: Arc<Scope>,
}

struct Scope {
    prefix: StepPath,
    next: AtomicU32,
}

impl WorkflowContext {
    pub(crate) fn root(shared: Arc<RunShared>) -> Self {
        WorkflowContext {
            shared,
            scope: Arc::new(Scope {
                prefix: StepPath::root(),
                next: AtomicU32::new(0),
            }),
        }
    }

    /// The first recorded operation in this scope at a position the code has not reached, with
    /// its description: after the workflow returned, that means today's code stops earlier
    /// than the recorded run did.
    pub(crate) fn unreached_recorded(&self) -> Option<(StepPath, String)> {
        let next = self.scope.next.load(Ordering::Relaxed);
        let depth = self.scope.prefix.depth();
        let st = lock(&self.shared.state);
        let beyond = |p: &StepPath| {
            p.starts_with(&self.scope.prefix) && p.parts().get(depth).is_some_and(|i| *i >= next)
        };
        st.run
            .positioned()
            .filter(|(p, _)| beyond(p))
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(p, d)| (p.clone(), d))
    }

    /// Reserves the next position in this scope. Positions are taken when an operation is
    /// called, not when its future is first polled, so `join!` of steps stays deterministic.
    pub(crate) fn next_path(&self) -> StepPath {
        let i = self.scope.next.fetch_add(1, Ordering::Relaxed);
        self.scope.prefix.child(i)
    }

    /// What the history has at this context's next position (the step's name, or a
    /// description of another operation), without taking the position; `None` where the
    /// history ends (the next operation will execute). Code that decides from live state (a
    /// budget shared by concurrent branches, say) follows what the history decided while it
    /// replays, instead of deciding again on state that may have come out differently.
    pub fn recorded_next(&self) -> Option<String> {
        let path = self
            .scope
            .prefix
            .child(self.scope.next.load(Ordering::Relaxed));
        let st = lock(&self.shared.state);
        match st.run.steps.get(&path) {
            Some(r) => Some(r.name.clone()),
            None => st.run.other_kind_at(&path, Kind::Step),
        }
    }

    /// The run's id.
    pub fn run_id(&self) -> RunId {
        self.shared.run_id
    }

    /// The workflow's registered name.
    pub fn workflow(&self) -> String {
        lock(&self.shared.state).run.workflow.clone()
    }

    /// The run's input as JSON.
    pub fn input_json(&self) -> serde_json::Value {
        lock(&self.shared.state).run.input.to_json()
    }

    /// Whether the next operation in this scope will be answered from the log.
    pub fn is_replaying(&self) -> bool {
        let path = self
            .scope
            .prefix
            .child(self.scope.next.load(Ordering::Relaxed));
        lock(&self.shared.state).run.steps.contains_key(&path)
    }

    /// Whether the run has been asked to stop (cancelled or shutting down).
    pub fn is_stopping(&self) -> bool {
        self.shared.cancel.is_cancelled() || self.shared.shutdown.is_cancelled()
    }

    /// Runs `f` as a durable step named `name`: executed once, its result recorded; on resume
    /// the recorded result is returned without running `f`.
    ///
    /// Side effects inside `f` are at-least-once: if the process dies while `f` runs, it runs
    /// again on resume. A failure is recorded and returned as [`WorkflowError::Step`].
    pub fn step<'a, T, F, Fut>(
        &'a self,
        name: &str,
        f: F,
    ) -> impl Future<Output = Result<T, WorkflowError>> + Send + use<'a, T, F, Fut>
    where
        T: Serialize + DeserializeOwned + Send + 'a,
        F: FnOnce() -> Fut + Send + 'a,
        Fut: Future<Output = Result<T, StepError>> + Send + 'a,
    {
        let reserved = reserved_name(name);
        let inner = self.step_unchecked(name, f);
        async move {
            reserved?;
            inner.await
        }
    }

    /// `step` without the reserved-name check, for the context's own recorded operations.
    fn step_unchecked<'a, T, F, Fut>(
        &'a self,
        name: &str,
        f: F,
    ) -> impl Future<Output = Result<T, WorkflowError>> + Send + use<'a, T, F, Fut>
    where
        T: Serialize + DeserializeOwned + Send + 'a,
        F: FnOnce() -> Fut + Send + 'a,
        Fut: Future<Output = Result<T, StepError>> + Send + 'a,
    {
        let path = self.next_path();
        let name = name.to_string();
        async move {
            let mut f = Some(f);
            let once = move || -> BoxFuture<'a, Result<T, StepError>> {
                match f.take() {
                    Some(f) => Box::pin(f()),
                    // Unreachable with the default options (one attempt), which `step` uses.
                    None => Box::pin(async { Err(StepError::msg("this step cannot be retried")) }),
                }
            };
            // Boxed: the attempt loop's state is about 1 KiB, and every caller's future would
            // otherwise hold (and move, several times per step) a copy of it: a step cost
            // more in `memcpy` than in its durable append.
            Box::pin(self.run_step(path, name, &StepOptions::default(), once)).await
        }
    }

    /// Runs `f` as a durable step with options: retries with backoff (each failed attempt is
    /// recorded with the time of the next one), per-attempt and whole-step timeouts. `f` is
    /// called once per attempt.
    pub fn step_with<'a, T, F, Fut>(
        &'a self,
        name: &str,
        opts: StepOptions,
        f: F,
    ) -> impl Future<Output = Result<T, WorkflowError>> + Send + use<'a, T, F, Fut>
    where
        T: Serialize + DeserializeOwned + Send + 'a,
        F: FnMut() -> Fut + Send + 'a,
        Fut: Future<Output = Result<T, StepError>> + Send + 'a,
    {
        let reserved = reserved_name(name);
        let path = self.next_path();
        let name = name.to_string();
        async move {
            reserved?;
            Box::pin(self.run_step(path, name, &opts, f)).await
        }
    }

    /// Like [`step_with`](Self::step_with), but when the step fails for good (retries
    /// exhausted, or a non-retryable error), `fallback` runs as a step of its own at the
    /// position below (`<path>.0`, named `<name>.fallback`), so the log says which one
    /// produced the result.
    pub fn step_with_fallback<'a, T, F, Fut, G, GFut>(
        &'a self,
        name: &str,
        opts: StepOptions,
        primary: F,
        fallback: G,
    ) -> impl Future<Output = Result<T, WorkflowError>> + Send + use<'a, T, F, Fut, G, GFut>
    where
        T: Serialize + DeserializeOwned + Send + 'a,
        F: FnMut() -> Fut + Send + 'a,
        Fut: Future<Output = Result<T, StepError>> + Send + 'a,
        G: FnOnce() -> GFut + Send + 'a,
        GFut: Future<Output = Result<T, StepError>> + Send + 'a,
    {
        let reserved = reserved_name(name);
        let path = self.next_path();
        let name = name.to_string();
        async move {
            reserved?;
            match Box::pin(self.run_step(path.clone(), name.clone(), &opts, primary)).await {
                Err(WorkflowError::Step { .. }) => {
                    let below = self.scope_at(path);
                    below.step(&format!("{name}.fallback"), fallback).await
                }
                other => other,
            }
        }
    }

    /// Takes the next position for a named group of operations (an agent's model and tool
    /// calls, say) and returns a context whose operations sit below it (`<path>.0`, …). The
    /// group is recorded, so replay checks that the same group is at the same position.
    pub fn scope(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<WorkflowContext, WorkflowError>> + Send + use<'_> {
        let reserved = reserved_name(name);
        let path = self.next_path();
        let marker = format!("cairn.scope:{name}");
        async move {
            reserved?;
            let once =
                || -> BoxFuture<'static, Result<(), StepError>> { Box::pin(async { Ok(()) }) };
            self.run_step(path.clone(), marker, &StepOptions::default(), once)
                .await?;
            Ok(self.scope_at(path))
        }
    }

    /// A context whose steps sit below `path` (`path.0`, `path.1`, …).
    pub(crate) fn scope_at(&self, path: StepPath) -> WorkflowContext {
        WorkflowContext {
            shared: Arc::clone(&self.shared),
            scope: Arc::new(Scope {
                prefix: path,
                next: AtomicU32::new(0),
            }),
        }
    }

    async fn run_step<T, F, Fut>(
        &self,
        path: StepPath,
        name: String,
        opts: &StepOptions,
        mut f: F,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        let shared = &self.shared;
        shared.check()?;
        let (mut attempt, first_started_us, mut wait_until) = {
            let mut st = lock(&shared.state);
            if let Some(recorded) = st.run.other_kind_at(&path, Kind::Step) {
                drop(st);
                return Err(self.nondeterminism(path, recorded, name));
            }
            match st.run.steps.get(&path) {
                Some(rec) if rec.name != name => {
                    let recorded = rec.name.clone();
                    drop(st);
                    return Err(self.nondeterminism(path, recorded, name));
                }
                Some(rec) if rec.status == StepStatus::Completed => {
                    let decoded = rec
                        .output
                        .as_ref()
                        .map(|o| o.to_typed::<T>())
                        .unwrap_or_else(|| serde_json::from_str("null"));
                    st.last = Some(path.clone());
                    st.replayed += 1;
                    drop(st);
                    return decoded.map_err(|e| {
                        shared.set_interrupt(Interrupt::RecordedTypeChanged {
                            run: shared.run_id,
                            path,
                            name,
                            detail: e.to_string(),
                        })
                    });
                }
                Some(rec) if rec.status == StepStatus::Failed => {
                    let message = rec.error.clone().unwrap_or_default();
                    st.replayed += 1;
                    return Err(WorkflowError::Step {
                        path,
                        name,
                        message,
                    });
                }
                // An at-most-once step that was running when the process stopped may or may
                // not have had its effect: a person decides (Engine::resolve_step).
                Some(rec) if opts.at_most_once && rec.in_flight() => {
                    let reason = format!(
                        "needs review: step {path} `{name}` (attempt {}) was running when the process stopped and must not run twice; \
                         mark it done with `cairn review {run} {path} --done --output JSON` or run it again with `cairn review {run} {path} --retry`",
                        rec.attempts,
                        run = shared.run_id,
                    );
                    drop(st);
                    return Err(shared.set_interrupt(Interrupt::Suspend {
                        run: shared.run_id,
                        wake_at_us: None,
                        reason,
                    }));
                }
                // In flight, or waiting for a retry, when the process stopped: continue it
                // with the next attempt, after what is left of the recorded backoff.
                Some(rec) => (rec.attempts + 1, rec.first_started_us, rec.retry_at_us),
                None => (1, now_micros(), None),
            }
        };
        if shared.check_only {
            // The history has no outcome here: the code would execute the step.
            return Err(shared.end_of_history(&path, &name));
        }
        let deadline_us = opts
            .step_timeout
            .map(|d| first_started_us.saturating_add(micros(d)));
        loop {
            if let Some(t) = wait_until.take() {
                self.wait_until_us(t).await?;
            }
            if opts.at_most_once {
                // Durable before the effect: a crash from here on is seen on resume.
                shared
                    .record(Event::StepStarted {
                        path: path.clone(),
                        name: name.clone(),
                        attempt,
                    })
                    .await?;
            }
            let started_us = now_micros();
            // The attempt may run until the sooner of its own timeout and the step's deadline.
            let step_left = deadline_us.map(|dl| dl - started_us);
            let (limit, limit_is_step) = match (opts.attempt_timeout, step_left) {
                (_, Some(left)) if left <= 0 => (Some(Duration::ZERO), true),
                (Some(a), Some(left)) if micros(a) >= left => (Some(from_micros(left)), true),
                (Some(a), _) => (Some(a), false),
                (None, Some(left)) => (Some(from_micros(left)), true),
                (None, None) => (None, false),
            };
            // One span per executed attempt (replayed steps return above and cost nothing),
            // unless the subscriber wanted none for this run's first attempt.
            let spans = shared.step_spans.load(Ordering::Relaxed);
            let span = if spans >= STEP_SPANS_METERED {
                tracing::Span::none()
            } else {
                let span = tracing::info_span!(
                    "step",
                    cairn.run_id = %shared.run_id,
                    cairn.step_path = %path,
                    cairn.step_name = %name,
                    cairn.attempt = i64::from(attempt),
                    otel.status_code = tracing::field::Empty,
                    exception.message = tracing::field::Empty,
                    cairn.step.will_retry = tracing::field::Empty,
                );
                if spans == 0 {
                    let seen = if !span.is_disabled() {
                        STEP_SPANS_YES
                    } else if let Some(m) = crate::StepMeter::current() {
                        let _ = shared.meter.set(m);
                        STEP_SPANS_METERED
                    } else {
                        STEP_SPANS_NONE
                    };
                    shared.step_spans.store(seen, Ordering::Relaxed);
                }
                span
            };
            // The attempt's future is made at its first poll, inside its span (entered once per
            // poll by `instrument` below, not once more to make the future): what `f` does before
            // its first await runs in the span as before, and an attempt stopped before its
            // first poll never calls `f`.
            let attempt_fut = async { f().await };
            let run = async {
                match limit {
                    None => attempt_fut.await,
                    Some(l) => match tokio::time::timeout(l, attempt_fut).await {
                        Ok(r) => r,
                        Err(_) if limit_is_step => Err(StepError::msg(format!(
                            "step timed out after {:?}",
                            opts.step_timeout.unwrap_or_default()
                        ))),
                        Err(_) => Err(StepError::retryable(format!(
                            "attempt timed out after {l:?}"
                        ))),
                    },
                }
            };
            // The attempt runs inside its span; the span is read back from the pinned future
            // afterwards (no clone: each clone and drop is a registry operation per step).
            let in_span = run.instrument(span);
            tokio::pin!(in_span);
            // A stop requested before the attempt wins, as in the select below.
            if shared.cancel.is_cancelled() {
                return Err(shared.set_interrupt(Interrupt::Cancelled(shared.run_id)));
            }
            if shared.shutdown.is_cancelled() {
                return Err(shared.set_interrupt(Interrupt::Shutdown(shared.run_id)));
            }
            // One poll first, without waiting on the cancellation tokens: an attempt that is
            // done at once (a pure computation, an answer from a cache) then never registers
            // with them (a lock, a list insert and removal per token).
            let first = std::future::poll_fn(|cx| Poll::Ready(in_span.as_mut().poll(cx))).await;
            let outcome = match first {
                Poll::Ready(r) => r,
                Poll::Pending => tokio::select! {
                    biased;
                    _ = shared.cancel.cancelled() => {
                        return Err(shared.set_interrupt(Interrupt::Cancelled(shared.run_id)));
                    }
                    _ = shared.shutdown.cancelled() => {
                        return Err(shared.set_interrupt(Interrupt::Shutdown(shared.run_id)));
                    }
                    r = &mut in_span => r,
                },
            };
            let span = in_span.span();
            // No subscriber wanted the span (a run the live export leaves out): the attempt is
            // still measured, by the subscriber's meter.
            let meter = span.is_disabled().then(|| shared.meter.get()).flatten();
            let metric_name = meter.map(|m| (m, name.clone()));
            let max_bytes = shared.store.max_payload_bytes();
            let outcome = outcome.and_then(|v| {
                let p = Payload::from_value(&v).map_err(|e| {
                    StepError::msg(format!("the step's output cannot be encoded as JSON: {e}"))
                })?;
                // The event adds its path, name and a few numbers around the output.
                if p.len() + name.len() + 64 > max_bytes {
                    return Err(StepError::msg(format!(
                        "the step's output is {} bytes, over the store's payload limit of {max_bytes} bytes; \
                         store large data elsewhere and return a reference",
                        p.len()
                    )));
                }
                Ok((v, p))
            });
            match outcome {
                Ok((value, output)) => {
                    shared
                        .record(Event::StepCompleted {
                            path: path.clone(),
                            name,
                            attempt,
                            started_us,
                            output,
                        })
                        .await?;
                    if let Some((m, n)) = &metric_name {
                        meter_attempt(m, n, started_us, false, false);
                    }
                    let mut st = lock(&shared.state);
                    st.last = Some(path);
                    st.executed += 1;
                    return Ok(value);
                }
                Err(e) => {
                    let retryable = opts.retry.retry_all_errors || e.is_retryable();
                    let now = now_micros();
                    let retry_at_us = retryable
                        .then(|| opts.retry.delay_after(attempt))
                        .flatten()
                        // Honour a server's `retry-after` when it asks for longer.
                        .map(|d| d.max(e.retry_after().unwrap_or_default()))
                        .map(|d| now.saturating_add(micros(d)))
                        .filter(|t| deadline_us.is_none_or(|dl| *t < dl));
                    // The attempt's span ends in error (OpenTelemetry: ERROR status and the
                    // exception), saying whether another attempt follows.
                    span.record("otel.status_code", "ERROR");
                    span.record("exception.message", e.message());
                    span.record("cairn.step.will_retry", retry_at_us.is_some());
                    // The line says which step itself: a log that shows no INFO spans (the
                    // default) gives it no span context, and a run the export leaves out has no
                    // step span at all.
                    tracing::warn!(parent: span, cairn.run_id = %shared.run_id, cairn.step_path = %path, cairn.step_name = %name, error = e.message(), retryable = e.is_retryable(), will_retry = retry_at_us.is_some(), "step attempt failed");
                    shared
                        .record(Event::StepFailed {
                            path: path.clone(),
                            name: name.clone(),
                            attempt,
                            started_us,
                            error: e.message().to_string(),
                            retry_at_us,
                        })
                        .await?;
                    if let Some((m, n)) = &metric_name {
                        meter_attempt(m, n, started_us, true, retry_at_us.is_some());
                    }
                    match retry_at_us {
                        Some(t) => {
                            wait_until = Some(t);
                            attempt += 1;
                        }
                        None => {
                            lock(&shared.state).executed += 1;
                            return Err(WorkflowError::Step {
                                path,
                                name,
                                message: e.message().to_string(),
                            });
                        }
                    }
                }
            }
        }
    }

    /// Waits until the wall-clock time `t_us`, stopping early on cancel or shutdown.
    pub(crate) async fn wait_until_us(&self, t_us: i64) -> Result<(), WorkflowError> {
        let left = t_us - now_micros();
        if left <= 0 {
            return Ok(());
        }
        let shared = &self.shared;
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => {
                Err(shared.set_interrupt(Interrupt::Cancelled(shared.run_id)))
            }
            _ = shared.shutdown.cancelled() => {
                Err(shared.set_interrupt(Interrupt::Shutdown(shared.run_id)))
            }
            _ = tokio::time::sleep(from_micros(left)) => Ok(()),
        }
    }

    pub(crate) fn nondeterminism(
        &self,
        path: StepPath,
        recorded: String,
        found: String,
    ) -> WorkflowError {
        self.shared.set_interrupt(Interrupt::NonDeterminism {
            run: self.shared.run_id,
            path,
            recorded,
            found,
        })
    }

    /// The current time, recorded: on replay the same instant is returned.
    pub fn now(
        &self,
    ) -> impl Future<Output = Result<chrono::DateTime<chrono::Utc>, WorkflowError>> + Send + '_
    {
        let step = self.step_unchecked("cairn.now", || async { Ok(now_micros()) });
        async move {
            let us: i64 = step.await?;
            Ok(chrono::DateTime::from_timestamp_micros(us).unwrap_or_default())
        }
    }

    /// A random number, recorded: on replay the same number is returned.
    pub fn random_u64(&self) -> impl Future<Output = Result<u64, WorkflowError>> + Send + '_ {
        self.step_unchecked("cairn.random", || async { Ok(rand::random::<u64>()) })
    }

    /// A random (version 4) UUID string, recorded: on replay the same id is returned.
    pub fn uuid(&self) -> impl Future<Output = Result<String, WorkflowError>> + Send + '_ {
        self.step_unchecked("cairn.uuid", || async {
            let mut b: [u8; 16] = rand::random();
            b[6] = (b[6] & 0x0f) | 0x40;
            b[8] = (b[8] & 0x3f) | 0x80;
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            Ok(format!(
                "{}-{}-{}-{}-{}",
                &h[0..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32]
            ))
        })
    }

    /// Records a metadata key for the run (e.g. a label found while running); takes a position
    /// like a step, so replay does not record it twice.
    pub fn set_metadata<V: Serialize>(
        &self,
        key: &str,
        value: &V,
    ) -> impl Future<Output = Result<(), WorkflowError>> + Send + use<'_, V> {
        let path = self.next_path();
        let key = key.to_string();
        let max_bytes = self.shared.store.max_payload_bytes();
        let value = Payload::from_value(value)
            .map_err(|e| WorkflowError::msg(format!("metadata `{key}` cannot be encoded: {e}")))
            .and_then(|v| {
                if v.len() + key.len() + 64 > max_bytes {
                    return Err(WorkflowError::msg(format!(
                        "metadata `{key}` is {} bytes, over the store's payload limit of {max_bytes} bytes",
                        v.len()
                    )));
                }
                Ok(v)
            });
        async move { self.record_metadata(path, key, value?).await }
    }

    async fn record_metadata(
        &self,
        path: StepPath,
        key: String,
        value: Payload,
    ) -> Result<(), WorkflowError> {
        self.shared.check()?;
        {
            let st = lock(&self.shared.state);
            if let Some(recorded) = st.run.other_kind_at(&path, Kind::Metadata) {
                drop(st);
                return Err(self.nondeterminism(path, recorded, format!("metadata `{key}`")));
            }
            match st.run.metadata_paths.get(&path) {
                Some(k) if *k == key => return Ok(()),
                Some(k) => {
                    let recorded = format!("metadata `{k}`");
                    drop(st);
                    return Err(self.nondeterminism(path, recorded, format!("metadata `{key}`")));
                }
                None => {}
            }
        }
        self.shared
            .record(Event::MetadataSet { path, key, value })
            .await
    }

    /// A metadata value set earlier in the run.
    pub fn metadata(&self, key: &str) -> Option<serde_json::Value> {
        lock(&self.shared.state)
            .run
            .metadata
            .get(key)
            .map(Payload::to_json)
    }

    /// The completed steps of the run so far (recorded and new), in position order.
    pub fn steps(&self) -> Vec<CompletedStep> {
        lock(&self.shared.state)
            .run
            .completed_steps()
            .map(|(p, r)| CompletedStep {
                path: p.to_string(),
                name: r.name.clone(),
                result: r.output.as_ref().map(Payload::to_json).unwrap_or_default(),
                started_us: r.started_us,
                finished_us: r.finished_us.unwrap_or(r.started_us),
            })
            .collect()
    }

    /// The outputs already recorded for the branches of the fan-out this scope's next
    /// operation would be, if that is a fan-out named `name` (a resumed run; empty otherwise),
    /// by branch index. Lets a workflow account for finished branches (their spending, say)
    /// before the remaining ones run: finished branches are answered from the log, not re-run.
    pub fn recorded_branch_outputs(&self, name: &str) -> Vec<(u32, serde_json::Value)> {
        self.recorded_branches(name, |o| match o {
            crate::state::BranchRecord::Completed(p) => Some(p.to_json()),
            _ => None,
        })
    }

    /// The details the failed branches of the fan-out `name` left
    /// ([`WorkflowError::FailedWith`]), by item index, as recorded before this execution
    /// (like [`WorkflowContext::recorded_branch_outputs`], for the failures).
    pub fn recorded_branch_failures(&self, name: &str) -> Vec<(u32, serde_json::Value)> {
        self.recorded_branches(name, |o| match o {
            crate::state::BranchRecord::FailedWith { details, .. } => Some(details.to_json()),
            _ => None,
        })
    }

    /// What `pick` takes of each recorded branch outcome of the fan-out `name` at this scope's
    /// next position, by branch index.
    fn recorded_branches(
        &self,
        name: &str,
        pick: impl Fn(&crate::state::BranchRecord) -> Option<serde_json::Value>,
    ) -> Vec<(u32, serde_json::Value)> {
        let path = self
            .scope
            .prefix
            .child(self.scope.next.load(Ordering::Relaxed));
        let st = lock(&self.shared.state);
        match st.run.fanouts.get(&path) {
            Some(fo) if fo.name == name => fo
                .outcomes
                .iter()
                .enumerate()
                .filter_map(|(i, o)| Some((u32::try_from(i).ok()?, pick(o.as_ref()?)?)))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The output of the step answered or executed most recently in this execution.
    pub fn last_result(&self) -> Option<serde_json::Value> {
        let st = lock(&self.shared.state);
        let p = st.last.as_ref()?;
        st.run.steps.get(p)?.output.as_ref().map(Payload::to_json)
    }

    /// A compact text summary for handing the run's progress to another agent: the task, the
    /// completed step names and the last result, each bounded in length.
    pub fn handoff_summary(&self) -> String {
        let st = lock(&self.shared.state);
        let input = truncate(&st.run.input.to_json().to_string(), SUMMARY_INPUT_CHARS_MAX);
        let names: Vec<&str> = st
            .run
            .completed_steps()
            .filter(|(_, r)| !r.name.starts_with("cairn."))
            .map(|(_, r)| r.name.as_str())
            .collect();
        let last = st
            .last
            .as_ref()
            .and_then(|p| st.run.steps.get(p))
            .and_then(|r| r.output.as_ref())
            .map(|o| truncate(&o.to_json().to_string(), SUMMARY_RESULT_CHARS_MAX))
            .unwrap_or_else(|| "none".into());
        format!(
            "Task: {input}\nCompleted: {}\nLast result: {last}",
            names.join(", ")
        )
    }
}

/// Names starting with `cairn.` belong to the context's own recorded operations.
fn reserved_name(name: &str) -> Result<(), WorkflowError> {
    if name.starts_with("cairn.") {
        return Err(WorkflowError::msg(format!(
            "step name `{name}` is reserved (names starting with `cairn.` are the engine's); rename the step"
        )));
    }
    Ok(())
}

pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

pub(crate) fn from_micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        None => s.to_string(),
        Some((i, _)) => format!("{}… ({} more bytes)", &s[..i], s.len() - i),
    }
}

/// Hands a step attempt that started at `started_us` and ended now to the subscriber's meter.
fn meter_attempt(
    meter: &crate::StepMeter,
    name: &str,
    started_us: i64,
    failed: bool,
    will_retry: bool,
) {
    let secs = (now_micros() - started_us).max(0) as f64 / 1e6;
    meter.record(&crate::StepAttempt::new(name, secs, failed, will_retry));
}
