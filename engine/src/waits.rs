//! Durable waits: `ctx.sleep`, `ctx.sleep_until` and `ctx.wait_signal`.
//!
//! A sleep records its absolute fire time before waiting, so a run that restarts sleeps only
//! what is left. A wait for a signal records its deadline likewise; delivered signals are
//! events in the run's own log (`signal_sent`), so a signal sent before the wait starts is not
//! lost: the wait consumes the oldest unconsumed one. A sleep longer than the engine's
//! `suspend_after`, or a signal wait still unanswered after it, parks the run (status
//! `waiting`, listed in the wake-up index when it has a deadline) instead of holding it in
//! memory; the timer service or the signal wakes it.

use std::future::Future;
use std::time::Duration;

use cairn_storage::{Seq, now_micros};
use serde::de::DeserializeOwned;

use crate::context::{WorkflowContext, from_micros, lock, micros};
use crate::error::{Interrupt, WorkflowError};
use crate::event::{Event, StepPath};
use crate::state::{Kind, WaitOutcome};

/// How often a wait re-reads the log for signals delivered by another handle on the store.
const SIGNAL_POLL: Duration = Duration::from_millis(250);

impl WorkflowContext {
    /// Sleeps durably for `d`: the fire time is recorded, so after a restart the run sleeps
    /// only the remaining time.
    pub fn sleep(
        &self,
        d: Duration,
    ) -> impl Future<Output = Result<(), WorkflowError>> + Send + '_ {
        let path = self.next_path();
        async move {
            let fire_at = now_micros().saturating_add(micros(d));
            self.run_sleep(path, fire_at).await
        }
    }

    /// Sleeps durably until `t` (wall-clock time).
    pub fn sleep_until(
        &self,
        t: chrono::DateTime<chrono::Utc>,
    ) -> impl Future<Output = Result<(), WorkflowError>> + Send + '_ {
        let path = self.next_path();
        async move { self.run_sleep(path, t.timestamp_micros()).await }
    }

    async fn run_sleep(&self, path: StepPath, fire_at_new: i64) -> Result<(), WorkflowError> {
        let shared = &self.shared;
        shared.check()?;
        let recorded = {
            let st = lock(&shared.state);
            if let Some(other) = st.run.other_kind_at(&path, Kind::Timer) {
                drop(st);
                return Err(self.nondeterminism(path, other, "sleep".into()));
            }
            st.run.timers.get(&path).cloned()
        };
        let fire_at = match recorded {
            Some(t) if t.fired => return Ok(()),
            Some(t) => t.fire_at_us,
            None => {
                shared
                    .record(Event::TimerSet {
                        path: path.clone(),
                        fire_at_us: fire_at_new,
                    })
                    .await?;
                fire_at_new
            }
        };
        if shared.check_only {
            // Recorded as set but not fired: the code would wait here.
            return Err(shared.end_of_history(&path, "sleep"));
        }
        if fire_at - now_micros() > micros(shared.suspend_after) {
            return Err(shared.set_interrupt(Interrupt::Suspend {
                run: shared.run_id,
                wake_at_us: Some(fire_at),
                reason: format!("sleeping until {}", fmt_us(fire_at)),
            }));
        }
        self.wait_until_us(fire_at).await?;
        shared.record(Event::TimerFired { path }).await
    }

    /// Waits durably for the signal `name` (sent with `cairn signal RUN NAME --data JSON` or
    /// `Engine::signal`) and returns its data, or `None` if `timeout` passes first. A signal
    /// sent before the wait began is not lost.
    pub fn wait_signal<T: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Option<T>, WorkflowError>> + Send + use<'_, T> {
        let path = self.next_path();
        let name = name.to_string();
        async move {
            let deadline = timeout.map(|t| now_micros().saturating_add(micros(t)));
            self.run_wait(path, name, deadline).await
        }
    }

    async fn run_wait<T: DeserializeOwned>(
        &self,
        path: StepPath,
        name: String,
        deadline_new: Option<i64>,
    ) -> Result<Option<T>, WorkflowError> {
        let shared = &self.shared;
        shared.check()?;
        let recorded = {
            let st = lock(&shared.state);
            if let Some(other) = st.run.other_kind_at(&path, Kind::Wait) {
                drop(st);
                return Err(self.nondeterminism(path, other, format!("wait for signal `{name}`")));
            }
            match st.run.waits.get(&path) {
                Some(w) if w.name != name => {
                    let recorded = format!("wait for signal `{}`", w.name);
                    drop(st);
                    return Err(self.nondeterminism(
                        path,
                        recorded,
                        format!("wait for signal `{name}`"),
                    ));
                }
                Some(w) => Some((w.deadline_us, w.outcome.clone())),
                None => None,
            }
        };
        let deadline = match recorded {
            Some((_, Some(WaitOutcome::TimedOut))) => return Ok(None),
            Some((_, Some(WaitOutcome::Received(seq)))) => {
                return self.signal_data(&path, &name, seq);
            }
            Some((deadline, None)) => deadline,
            None => {
                shared
                    .record(Event::SignalWaitStarted {
                        path: path.clone(),
                        name: name.clone(),
                        deadline_us: deadline_new,
                    })
                    .await?;
                deadline_new
            }
        };
        if shared.check_only {
            // A consumed signal is answered above; anything else is beyond the history.
            return Err(shared.end_of_history(&path, &format!("wait for signal `{name}`")));
        }
        let waiting_since = std::time::Instant::now();
        loop {
            // Register for a wake-up before looking, so a delivery in between is not missed.
            let notified = shared.signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.refresh_signals().await?;
            let pending = lock(&shared.state).run.unconsumed_signal(&name);
            if let Some(seq) = pending {
                shared
                    .record(Event::SignalReceived {
                        path: path.clone(),
                        name: name.clone(),
                        sent_seq: seq,
                    })
                    .await?;
                return self.signal_data(&path, &name, seq);
            }
            let now = now_micros();
            if deadline.is_some_and(|d| d <= now) {
                shared
                    .record(Event::SignalTimedOut {
                        path,
                        name: name.clone(),
                    })
                    .await?;
                return Ok(None);
            }
            let left = deadline.map(|d| d - now);
            // Wait in memory for a while (a quick answer is cheap), then park the run.
            if waiting_since.elapsed() >= shared.suspend_after {
                return Err(shared.set_interrupt(Interrupt::Suspend {
                    run: shared.run_id,
                    wake_at_us: deadline,
                    reason: format!("waiting for signal `{name}`"),
                }));
            }
            let nap = left
                .map(from_micros)
                .unwrap_or(SIGNAL_POLL)
                .min(SIGNAL_POLL);
            tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => {
                    return Err(shared.set_interrupt(Interrupt::Cancelled(shared.run_id)));
                }
                _ = shared.shutdown.cancelled() => {
                    return Err(shared.set_interrupt(Interrupt::Shutdown(shared.run_id)));
                }
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Folds `signal_sent` events appended by someone else (another handle on this store)
    /// since the run's state was loaded.
    async fn refresh_signals(&self) -> Result<(), WorkflowError> {
        let shared = &self.shared;
        let from = {
            let st = lock(&shared.state);
            st.run.signals_seen_upto
        };
        let page = shared
            .store
            .read(shared.run_id, Seq(from), 4096)
            .await
            .map_err(|e| {
                shared.set_interrupt(Interrupt::Store {
                    run: shared.run_id,
                    detail: e.to_string(),
                })
            })?;
        let mut st = lock(&shared.state);
        for ev in &page {
            st.run.signals_seen_upto = ev.seq.0 + 1;
            if let Ok(e @ Event::SignalSent { .. }) = Event::decode(&ev.payload)
                && !st.run.signals.contains_key(&ev.seq.0)
            {
                let _ = st.run.apply_event(shared.run_id, ev.seq.0, ev.ts_us, e);
            }
        }
        Ok(())
    }

    fn signal_data<T: DeserializeOwned>(
        &self,
        path: &StepPath,
        name: &str,
        seq: u64,
    ) -> Result<Option<T>, WorkflowError> {
        let shared = &self.shared;
        let st = lock(&shared.state);
        let data = st.run.signals.get(&seq).map(|s| s.data.clone());
        drop(st);
        let Some(data) = data else {
            return Err(shared.set_interrupt(Interrupt::Store {
                run: shared.run_id,
                detail: format!("signal {seq} consumed at {path} is missing from the history"),
            }));
        };
        data.to_typed::<T>().map(Some).map_err(|e| {
            shared.set_interrupt(Interrupt::RecordedTypeChanged {
                run: shared.run_id,
                path: path.clone(),
                name: format!("signal `{name}`"),
                detail: e.to_string(),
            })
        })
    }
}

fn fmt_us(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| us.to_string())
}
