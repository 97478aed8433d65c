//! The replayer: a pure fold of a run's events into its state.
//!
//! Architecture invariant: the fold never reads the clock, the network, a random source or the
//! store; given the same events it builds the same [`RunState`]. Resume, `cairn replay` and
//! `cairn show` all use it.

use std::collections::BTreeMap;

use cairn_storage::{RunId, RunStatus, StoredEvent};
use serde::Serialize;

use crate::event::{Event, Payload, StepPath};

/// Where a recorded step stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Started (or a failed attempt awaits a retry) but not finished: in flight at a crash.
    Running,
    /// Finished with an output.
    Completed,
    /// Failed for good.
    Failed,
}

/// The kinds of positioned operations, for telling them apart on replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Step,
    Metadata,
    FanOut,
    Timer,
    Wait,
    Child,
}

/// What a run's history says about one step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRecord {
    /// The step's name.
    pub name: String,
    /// Where it stands.
    pub status: StepStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// Its output, once completed.
    #[serde(serialize_with = "ser_payload_opt")]
    pub output: Option<Payload>,
    /// The last error, if an attempt failed.
    pub error: Option<String>,
    /// When the latest attempt began (microseconds since the epoch).
    pub started_us: i64,
    /// When the first attempt began (microseconds since the epoch); step timeouts count from it.
    pub first_started_us: i64,
    /// When it finished (microseconds since the epoch).
    pub finished_us: Option<i64>,
    /// When the next attempt is due, if a retry is pending.
    pub retry_at_us: Option<i64>,
}

impl StepRecord {
    /// Whether an attempt had started (recorded) and not finished: it was in flight when the
    /// process stopped.
    pub fn in_flight(&self) -> bool {
        self.status == StepStatus::Running && self.retry_at_us.is_none()
    }
}

fn ser_payload_opt<S: serde::Serializer>(p: &Option<Payload>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => p.to_json().serialize(s),
        None => s.serialize_none(),
    }
}

fn ser_run_id<S: serde::Serializer>(id: &RunId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

fn ser_payload<S: serde::Serializer>(p: &Payload, s: S) -> Result<S::Ok, S::Error> {
    p.to_json().serialize(s)
}

fn ser_payload_map<S: serde::Serializer>(
    m: &BTreeMap<String, Payload>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let v: BTreeMap<&str, serde_json::Value> =
        m.iter().map(|(k, v)| (k.as_str(), v.to_json())).collect();
    v.serialize(s)
}

/// A branch's recorded outcome.
#[derive(Clone, Debug, PartialEq)]
pub enum BranchRecord {
    /// The branch returned this output.
    Completed(Payload),
    /// The branch failed with this error.
    Failed(String),
    /// The branch failed with this error and left these details.
    FailedWith {
        /// What went wrong.
        error: String,
        /// What the branch left for the workflow.
        details: Payload,
    },
}

/// What a run's history says about one fan-out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FanOutRecord {
    /// The fan-out's name.
    pub name: String,
    /// How many branches it has.
    pub branches: u32,
    /// How many run at once.
    pub concurrency: u32,
    /// The join policy, as text.
    pub join: String,
    /// Each branch's outcome, by index (`None`: no outcome recorded yet).
    #[serde(serialize_with = "ser_outcomes")]
    pub outcomes: Vec<Option<BranchRecord>>,
    /// Branches recorded as succeeded.
    pub succeeded: u32,
    /// Branches recorded as failed.
    pub failed: u32,
    /// Set once the fan-in has decided: branches cancelled by the policy and the error, if any.
    pub fan_in: Option<FanInRecord>,
}

/// The fan-in's recorded decision.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FanInRecord {
    /// Branches stopped mid-flight by the join policy.
    pub cancelled: Vec<u32>,
    /// Why the fan-out failed, if it did.
    pub error: Option<String>,
}

fn ser_outcomes<S: serde::Serializer>(v: &[Option<BranchRecord>], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let n = v.iter().filter(|o| o.is_some()).count();
    let mut map = s.serialize_map(Some(n))?;
    for (i, o) in v.iter().enumerate() {
        match o {
            Some(BranchRecord::Completed(p)) => {
                map.serialize_entry(&i.to_string(), &serde_json::json!({"ok": p.to_json()}))?
            }
            Some(BranchRecord::FailedWith { error, details }) => map.serialize_entry(
                &i.to_string(),
                &serde_json::json!({"error": error, "details": details.to_json()}),
            )?,
            Some(BranchRecord::Failed(e)) => {
                map.serialize_entry(&i.to_string(), &serde_json::json!({"error": e}))?
            }
            None => {}
        }
    }
    map.end()
}

/// What a run's history says about one durable sleep.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimerRecord {
    /// When it fires (microseconds since the epoch).
    pub fire_at_us: i64,
    /// Whether it has fired.
    pub fired: bool,
}

/// How a signal wait ended.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitOutcome {
    /// It consumed the `signal_sent` event with this sequence number.
    Received(u64),
    /// It timed out.
    TimedOut,
}

/// What a run's history says about one wait for a signal.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WaitRecord {
    /// The signal's name.
    pub name: String,
    /// When the wait times out (microseconds since the epoch), if ever.
    pub deadline_us: Option<i64>,
    /// How it ended, if it did.
    pub outcome: Option<WaitOutcome>,
}

/// A signal delivered to the run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SignalRecord {
    /// The signal's name.
    pub name: String,
    /// Its data.
    #[serde(serialize_with = "ser_payload")]
    pub data: Payload,
    /// The wait that consumed it, if any.
    pub consumed_by: Option<String>,
}

/// What a run's history says about one child run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChildRecord {
    /// The child run's id.
    #[serde(serialize_with = "ser_run_id")]
    pub child: RunId,
    /// The child's workflow.
    pub workflow: String,
    /// `Some(ok)` once the child finished.
    pub ok: Option<bool>,
    /// Its output, once completed.
    #[serde(serialize_with = "ser_payload_opt")]
    pub output: Option<Payload>,
    /// Its error, once failed or cancelled.
    pub error: Option<String>,
}

/// The most branches one fan-out may have.
pub const FAN_OUT_BRANCHES_MAX: u32 = 10_000_000;

fn ser_path_map<S: serde::Serializer, V: Serialize>(
    m: &BTreeMap<StepPath, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        map.serialize_entry(&k.to_string(), v)?;
    }
    map.end()
}

/// A run's state rebuilt from its events.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunState {
    /// The run's id.
    pub run_id: String,
    /// The workflow it runs.
    pub workflow: String,
    /// The workflow's version.
    pub version: u32,
    /// The run that started this one.
    pub parent: Option<String>,
    /// The run's input.
    #[serde(serialize_with = "ser_payload")]
    pub input: Payload,
    /// Where the run is, as the events say.
    pub status: RunStatus,
    /// The output, once completed.
    #[serde(serialize_with = "ser_payload_opt")]
    pub output: Option<Payload>,
    /// The error, once failed or cancelled.
    pub error: Option<String>,
    /// Every recorded step by position.
    #[serde(serialize_with = "ser_path_map")]
    pub steps: BTreeMap<StepPath, StepRecord>,
    /// Every recorded fan-out by position.
    #[serde(serialize_with = "ser_path_map")]
    pub fanouts: BTreeMap<StepPath, FanOutRecord>,
    /// Every recorded durable sleep by position.
    #[serde(serialize_with = "ser_path_map")]
    pub timers: BTreeMap<StepPath, TimerRecord>,
    /// Every recorded signal wait by position.
    #[serde(serialize_with = "ser_path_map")]
    pub waits: BTreeMap<StepPath, WaitRecord>,
    /// Signals delivered to the run, by the sequence number of their `signal_sent` event.
    pub signals: BTreeMap<u64, SignalRecord>,
    /// Child runs by the position of the call that started them.
    #[serde(serialize_with = "ser_path_map")]
    pub children: BTreeMap<StepPath, ChildRecord>,
    /// Metadata set by the workflow.
    #[serde(serialize_with = "ser_payload_map")]
    pub metadata: BTreeMap<String, Payload>,
    /// Positions of metadata calls already recorded.
    #[serde(skip)]
    pub metadata_paths: BTreeMap<StepPath, String>,
    /// How many events were folded.
    pub events: u64,
    /// Every event before this sequence number has been looked at for delivered signals.
    #[serde(skip)]
    pub signals_seen_upto: u64,
    /// How many times the run was resumed.
    pub resumes: u32,
    /// When the run times out (microseconds since the epoch), if it has a timeout.
    pub deadline_us: Option<i64>,
    /// Time of the first event (microseconds since the epoch).
    pub started_us: i64,
    /// Time of the last event (microseconds since the epoch).
    pub updated_us: i64,
}

/// A history that cannot be folded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FoldError {
    /// An event's bytes are not an event this binary knows.
    #[error(
        "event {seq} of run {run} cannot be decoded ({detail}); it may come from a newer cairn"
    )]
    Undecodable {
        /// The run.
        run: RunId,
        /// The event's position.
        seq: u64,
        /// The decoder's message.
        detail: String,
    },
    /// The first event is not `run_started`.
    #[error("run {run} has no run_started event at its beginning; the history is damaged")]
    NoStart {
        /// The run.
        run: RunId,
    },
    /// The events contradict each other.
    #[error("event {seq} of run {run} contradicts earlier events: {detail}")]
    Inconsistent {
        /// The run.
        run: RunId,
        /// The event's position.
        seq: u64,
        /// What contradicts what.
        detail: String,
    },
}

impl RunState {
    /// Starts a fold from the run's first event.
    fn from_start(run: RunId, ev: &StoredEvent) -> Result<Self, FoldError> {
        let decoded = decode(run, ev)?;
        let Event::RunStarted {
            workflow,
            version,
            input,
            parent,
        } = decoded
        else {
            return Err(FoldError::NoStart { run });
        };
        Ok(RunState {
            run_id: run.to_string(),
            workflow,
            version,
            parent: parent.map(|p| p.to_string()),
            input,
            status: RunStatus::Running,
            output: None,
            error: None,
            steps: BTreeMap::new(),
            fanouts: BTreeMap::new(),
            timers: BTreeMap::new(),
            waits: BTreeMap::new(),
            signals: BTreeMap::new(),
            children: BTreeMap::new(),
            metadata: BTreeMap::new(),
            metadata_paths: BTreeMap::new(),
            events: 1,
            signals_seen_upto: 1,
            resumes: 0,
            deadline_us: None,
            started_us: ev.ts_us,
            updated_us: ev.ts_us,
        })
    }

    /// Folds one more event into the state.
    pub fn apply(&mut self, run: RunId, ev: &StoredEvent) -> Result<(), FoldError> {
        let decoded = decode(run, ev)?;
        self.apply_event(run, ev.seq.0, ev.ts_us, decoded)
    }

    pub(crate) fn apply_event(
        &mut self,
        run: RunId,
        seq: u64,
        ts: i64,
        e: Event,
    ) -> Result<(), FoldError> {
        if seq.saturating_add(1) > self.signals_seen_upto
            && self.events + 1 == seq.saturating_add(1)
        {
            // Folding the log in order: everything up to here has been seen.
            self.signals_seen_upto = seq + 1;
        }
        self.apply_inner(run, seq, ts, e)
    }

    /// Folds an event whose position in the log is not known yet (written but not yet
    /// acknowledged); it must not be a `signal_sent`, which is keyed by position.
    pub(crate) fn apply_unsequenced(
        &mut self,
        run: RunId,
        ts: i64,
        e: Event,
    ) -> Result<(), FoldError> {
        let seq = self.events;
        self.apply_inner(run, seq, ts, e)
    }

    fn apply_inner(&mut self, run: RunId, seq: u64, ts: i64, e: Event) -> Result<(), FoldError> {
        self.events += 1;
        self.updated_us = ts;
        let inconsistent = |detail: String| FoldError::Inconsistent { run, seq, detail };
        match e {
            Event::RunStarted { .. } => {
                return Err(inconsistent("a second run_started".into()));
            }
            Event::RunCompleted { output } => {
                self.status = RunStatus::Completed;
                self.output = Some(output);
            }
            Event::RunFailed { error } => {
                self.status = RunStatus::Failed;
                self.error = Some(error);
            }
            Event::RunCancelled { reason } => {
                self.status = RunStatus::Cancelled;
                self.error = Some(reason);
            }
            Event::RunResumed { .. } => {
                self.resumes += 1;
                if self.status == RunStatus::Waiting {
                    self.status = RunStatus::Running;
                }
            }
            Event::RunSuspended { .. } => self.status = RunStatus::Waiting,
            Event::RunDeadlineSet { deadline_us } => self.deadline_us = Some(deadline_us),
            Event::TimerSet { path, fire_at_us } => {
                self.timers.insert(
                    path,
                    TimerRecord {
                        fire_at_us,
                        fired: false,
                    },
                );
            }
            Event::TimerFired { path } => match self.timers.get_mut(&path) {
                Some(t) => t.fired = true,
                None => {
                    return Err(inconsistent(format!(
                        "timer {path} fired but was never set"
                    )));
                }
            },
            Event::SignalSent { name, data } => {
                self.signals.insert(
                    seq,
                    SignalRecord {
                        name,
                        data,
                        consumed_by: None,
                    },
                );
            }
            Event::SignalWaitStarted {
                path,
                name,
                deadline_us,
            } => {
                self.waits.insert(
                    path,
                    WaitRecord {
                        name,
                        deadline_us,
                        outcome: None,
                    },
                );
            }
            Event::SignalReceived {
                path,
                name,
                sent_seq,
            } => {
                let sig = self.signals.get_mut(&sent_seq).ok_or_else(|| {
                    inconsistent(format!("wait {path} consumed unknown signal {sent_seq}"))
                })?;
                if sig.consumed_by.is_some() {
                    return Err(inconsistent(format!("signal {sent_seq} consumed twice")));
                }
                sig.consumed_by = Some(path.to_string());
                let w = self.waits.entry(path).or_insert(WaitRecord {
                    name,
                    deadline_us: None,
                    outcome: None,
                });
                w.outcome = Some(WaitOutcome::Received(sent_seq));
            }
            Event::SignalTimedOut { path, name } => {
                let w = self.waits.entry(path).or_insert(WaitRecord {
                    name,
                    deadline_us: None,
                    outcome: None,
                });
                w.outcome = Some(WaitOutcome::TimedOut);
            }
            Event::ChildStarted {
                path,
                child,
                workflow,
            } => {
                self.children.insert(
                    path,
                    ChildRecord {
                        child,
                        workflow,
                        ok: None,
                        output: None,
                        error: None,
                    },
                );
            }
            Event::ChildFinished {
                path,
                child,
                ok,
                output,
                error,
            } => {
                let c = self.children.get_mut(&path).ok_or_else(|| {
                    inconsistent(format!("child at {path} finished but never started"))
                })?;
                if c.child != child {
                    return Err(inconsistent(format!(
                        "child at {path} is {} but {child} finished",
                        c.child
                    )));
                }
                c.ok = Some(ok);
                c.output = ok.then_some(output);
                c.error = error;
            }
            Event::StepStarted {
                path,
                name,
                attempt,
            } => {
                let path_text = path.to_string();
                let rec = self.steps.entry(path).or_insert_with(|| StepRecord {
                    name: name.clone(),
                    status: StepStatus::Running,
                    attempts: 0,
                    output: None,
                    error: None,
                    started_us: ts,
                    first_started_us: ts,
                    finished_us: None,
                    retry_at_us: None,
                });
                if rec.name != name {
                    return Err(inconsistent(format!(
                        "step {path_text} is `{}` but was started as `{name}`",
                        rec.name
                    )));
                }
                rec.status = StepStatus::Running;
                rec.attempts = rec.attempts.max(attempt);
                rec.started_us = ts;
                // The awaited retry is now in progress.
                rec.retry_at_us = None;
            }
            Event::StepCompleted {
                path,
                name,
                attempt,
                started_us,
                output,
            } => match self.steps.get_mut(&path) {
                Some(rec) => {
                    if rec.name != name {
                        return Err(inconsistent(format!(
                            "step {path} is `{}` but completed as `{name}`",
                            rec.name
                        )));
                    }
                    if rec.status == StepStatus::Completed {
                        return Err(inconsistent(format!("step {path} completed twice")));
                    }
                    rec.status = StepStatus::Completed;
                    rec.attempts = rec.attempts.max(attempt);
                    rec.output = Some(output);
                    rec.started_us = started_us;
                    rec.finished_us = Some(ts);
                    rec.retry_at_us = None;
                }
                None => {
                    self.steps.insert(
                        path,
                        StepRecord {
                            name,
                            status: StepStatus::Completed,
                            attempts: attempt,
                            output: Some(output),
                            error: None,
                            started_us,
                            first_started_us: started_us,
                            finished_us: Some(ts),
                            retry_at_us: None,
                        },
                    );
                }
            },
            Event::StepFailed {
                path,
                name,
                attempt,
                started_us,
                error,
                retry_at_us,
            } => {
                let rec = self
                    .steps
                    .entry(path.clone())
                    .or_insert_with(|| StepRecord {
                        name: name.clone(),
                        status: StepStatus::Running,
                        attempts: 0,
                        output: None,
                        error: None,
                        started_us,
                        first_started_us: started_us,
                        finished_us: None,
                        retry_at_us: None,
                    });
                if rec.name != name {
                    return Err(inconsistent(format!(
                        "step {path} is `{}` but failed as `{name}`",
                        rec.name
                    )));
                }
                rec.attempts = rec.attempts.max(attempt);
                rec.error = Some(error);
                rec.started_us = started_us;
                rec.retry_at_us = retry_at_us;
                if retry_at_us.is_none() {
                    rec.status = StepStatus::Failed;
                    rec.finished_us = Some(ts);
                } else {
                    rec.status = StepStatus::Running;
                }
            }
            Event::MetadataSet { path, key, value } => {
                self.metadata_paths.insert(path, key.clone());
                self.metadata.insert(key, value);
            }
            Event::FanOutStarted {
                path,
                name,
                branches,
                concurrency,
                join,
            } => {
                if branches > FAN_OUT_BRANCHES_MAX {
                    return Err(inconsistent(format!(
                        "fan-out {path} has {branches} branches, over the limit of {FAN_OUT_BRANCHES_MAX}"
                    )));
                }
                if self.fanouts.contains_key(&path) {
                    return Err(inconsistent(format!("fan-out {path} started twice")));
                }
                self.fanouts.insert(
                    path,
                    FanOutRecord {
                        name,
                        branches,
                        concurrency,
                        join,
                        outcomes: vec![None; branches as usize],
                        succeeded: 0,
                        failed: 0,
                        fan_in: None,
                    },
                );
            }
            Event::BranchCompleted {
                path,
                index,
                output,
            } => self
                .branch_outcome(&path, index, BranchRecord::Completed(output))
                .map_err(inconsistent)?,
            Event::BranchFailed { path, index, error } => self
                .branch_outcome(&path, index, BranchRecord::Failed(error))
                .map_err(inconsistent)?,
            Event::BranchFailedWith {
                path,
                index,
                error,
                details,
            } => self
                .branch_outcome(&path, index, BranchRecord::FailedWith { error, details })
                .map_err(inconsistent)?,
            Event::FanInCompleted {
                path,
                cancelled,
                error,
                ..
            } => {
                let f = self
                    .fanouts
                    .get_mut(&path)
                    .ok_or_else(|| inconsistent(format!("fan-in for unknown fan-out {path}")))?;
                f.fan_in = Some(FanInRecord { cancelled, error });
            }
        }
        Ok(())
    }

    /// Records a branch's outcome and forgets the branch's inner steps: once a branch has an
    /// outcome it is never run again, so its history is not needed to resume. This keeps a
    /// large fan-out's memory bounded by the branches in flight.
    fn branch_outcome(
        &mut self,
        path: &StepPath,
        index: u32,
        rec: BranchRecord,
    ) -> Result<(), String> {
        let f = self
            .fanouts
            .get_mut(path)
            .ok_or_else(|| format!("branch {index} of unknown fan-out {path}"))?;
        let slot = f
            .outcomes
            .get_mut(index as usize)
            .ok_or_else(|| format!("branch {index} of fan-out {path} is out of range"))?;
        if slot.is_some() {
            return Err(format!("branch {index} of fan-out {path} finished twice"));
        }
        match &rec {
            BranchRecord::Completed(_) => f.succeeded += 1,
            BranchRecord::Failed(_) | BranchRecord::FailedWith { .. } => f.failed += 1,
        }
        *slot = Some(rec);
        self.forget_below(&path.child(index));
        Ok(())
    }

    /// Drops the recorded steps, metadata positions and fan-outs at or below `prefix`.
    fn forget_below(&mut self, prefix: &StepPath) {
        // Called once per finished branch: one range lookup per map and no allocation when a
        // map has nothing below the prefix (most of them, most of the time).
        fn forget<V>(m: &mut BTreeMap<StepPath, V>, prefix: &StepPath) {
            if m.is_empty() {
                return;
            }
            loop {
                let below = m
                    .range::<StepPath, _>(prefix..)
                    .next()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, _)| k.clone());
                match below {
                    Some(k) => {
                        m.remove(&k);
                    }
                    None => return,
                }
            }
        }
        forget(&mut self.steps, prefix);
        forget(&mut self.metadata_paths, prefix);
        forget(&mut self.fanouts, prefix);
        forget(&mut self.timers, prefix);
        forget(&mut self.waits, prefix);
        forget(&mut self.children, prefix);
    }

    /// A description of what the history has at `path` if it is not of kind `want` (a step,
    /// a metadata call, a fan-out), for non-determinism errors.
    pub(crate) fn other_kind_at(&self, path: &StepPath, want: Kind) -> Option<String> {
        if want != Kind::Timer && self.timers.contains_key(path) {
            return Some("sleep".into());
        }
        if want != Kind::Wait
            && let Some(w) = self.waits.get(path)
        {
            return Some(format!("wait for signal `{}`", w.name));
        }
        if want != Kind::Child
            && let Some(c) = self.children.get(path)
        {
            return Some(format!("child run of `{}`", c.workflow));
        }
        if want != Kind::Step
            && let Some(r) = self.steps.get(path)
        {
            return Some(r.name.clone());
        }
        if want != Kind::Metadata
            && let Some(k) = self.metadata_paths.get(path)
        {
            return Some(format!("metadata `{k}`"));
        }
        if want != Kind::FanOut
            && let Some(f) = self.fanouts.get(path)
        {
            return Some(format!("fan-out `{}`", f.name));
        }
        None
    }

    /// Every recorded positioned operation (step, metadata, fan-out, sleep, wait, child) with
    /// a description, in no particular order.
    pub(crate) fn positioned(&self) -> impl Iterator<Item = (&StepPath, String)> {
        self.steps
            .iter()
            .map(|(p, r)| (p, r.name.clone()))
            .chain(
                self.metadata_paths
                    .iter()
                    .map(|(p, k)| (p, format!("metadata `{k}`"))),
            )
            .chain(
                self.fanouts
                    .iter()
                    .map(|(p, f)| (p, format!("fan-out `{}`", f.name))),
            )
            .chain(self.timers.keys().map(|p| (p, "sleep".to_string())))
            .chain(
                self.waits
                    .iter()
                    .map(|(p, w)| (p, format!("wait for signal `{}`", w.name))),
            )
            .chain(
                self.children
                    .iter()
                    .map(|(p, c)| (p, format!("child run of `{}`", c.workflow))),
            )
    }

    /// The oldest delivered signal named `name` that no wait has consumed.
    pub(crate) fn unconsumed_signal(&self, name: &str) -> Option<u64> {
        self.signals
            .iter()
            .find(|(_, s)| s.consumed_by.is_none() && s.name == name)
            .map(|(seq, _)| *seq)
    }

    /// The completed steps in position order.
    pub fn completed_steps(&self) -> impl Iterator<Item = (&StepPath, &StepRecord)> {
        self.steps
            .iter()
            .filter(|(_, r)| r.status == StepStatus::Completed)
    }
}

fn decode(run: RunId, ev: &StoredEvent) -> Result<Event, FoldError> {
    Event::decode(&ev.payload).map_err(|e| FoldError::Undecodable {
        run,
        seq: ev.seq.0,
        detail: e.to_string(),
    })
}

/// Builds a run's state incrementally from pages of events read in order.
#[derive(Debug)]
pub struct Replayer {
    run: RunId,
    state: Option<RunState>,
}

impl Replayer {
    /// A fold for `run`, before its first event.
    pub fn new(run: RunId) -> Self {
        Replayer { run, state: None }
    }

    /// Folds the next events, in order.
    pub fn feed<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a StoredEvent>,
    ) -> Result<(), FoldError> {
        for ev in events {
            match &mut self.state {
                None => self.state = Some(RunState::from_start(self.run, ev)?),
                Some(s) => s.apply(self.run, ev)?,
            }
        }
        Ok(())
    }

    /// The state so far, or an error if no event was fed.
    pub fn finish(self) -> Result<RunState, FoldError> {
        self.state.ok_or(FoldError::NoStart { run: self.run })
    }
}

/// Folds a complete history into a run's state.
pub fn fold<'a>(
    run: RunId,
    events: impl IntoIterator<Item = &'a StoredEvent>,
) -> Result<RunState, FoldError> {
    let mut r = Replayer::new(run);
    r.feed(events)?;
    r.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_storage::Seq;

    fn stored(seq: u64, e: Event) -> StoredEvent {
        StoredEvent {
            seq: Seq(seq),
            ts_us: 1000 + seq as i64,
            payload: e.encode(),
            hash: [0; 32],
        }
    }

    fn p(v: serde_json::Value) -> Payload {
        Payload::from_value(&v).unwrap()
    }

    #[test]
    fn fold_rebuilds_steps_metadata_and_status() {
        let run = RunId::new();
        let evs = vec![
            stored(
                0,
                Event::RunStarted {
                    workflow: "w".into(),
                    version: 1,
                    input: p(serde_json::json!({"n": 2})),
                    parent: None,
                },
            ),
            stored(
                1,
                Event::StepCompleted {
                    path: "0".parse().unwrap(),
                    name: "a".into(),
                    attempt: 1,
                    started_us: 1000,
                    output: p(serde_json::json!(1)),
                },
            ),
            stored(
                2,
                Event::StepFailed {
                    path: "1".parse().unwrap(),
                    name: "b".into(),
                    attempt: 1,
                    started_us: 1001,
                    error: "flaky".into(),
                    retry_at_us: Some(5000),
                },
            ),
            stored(
                3,
                Event::MetadataSet {
                    path: "2".parse().unwrap(),
                    key: "k".into(),
                    value: p(serde_json::json!("v")),
                },
            ),
            stored(4, Event::RunResumed { events_before: 4 }),
            stored(
                5,
                Event::StepCompleted {
                    path: "1".parse().unwrap(),
                    name: "b".into(),
                    attempt: 2,
                    started_us: 1004,
                    output: p(serde_json::json!(2)),
                },
            ),
            stored(
                6,
                Event::RunCompleted {
                    output: p(serde_json::json!(3)),
                },
            ),
        ];
        let s = fold(run, &evs).unwrap();
        assert_eq!(s.status, RunStatus::Completed);
        assert_eq!(s.events, 7);
        assert_eq!(s.resumes, 1);
        assert_eq!(s.steps.len(), 2);
        let b = &s.steps[&"1".parse().unwrap()];
        assert_eq!((b.status, b.attempts), (StepStatus::Completed, 2));
        assert_eq!(b.output.as_ref().unwrap().to_json(), serde_json::json!(2));
        assert_eq!(s.metadata["k"].to_json(), serde_json::json!("v"));
        assert_eq!(s.output.unwrap().to_json(), serde_json::json!(3));
        // The same events fold to the same state (the fold is pure).
        assert_eq!(fold(run, &evs).unwrap().steps, s.steps);
    }

    #[test]
    fn a_step_renamed_inside_the_log_is_reported() {
        let run = RunId::new();
        let evs = vec![
            stored(
                0,
                Event::RunStarted {
                    workflow: "w".into(),
                    version: 1,
                    input: Payload::default(),
                    parent: None,
                },
            ),
            stored(
                1,
                Event::StepStarted {
                    path: "0".parse().unwrap(),
                    name: "a".into(),
                    attempt: 1,
                },
            ),
            stored(
                2,
                Event::StepCompleted {
                    path: "0".parse().unwrap(),
                    name: "b".into(),
                    attempt: 1,
                    started_us: 0,
                    output: Payload::default(),
                },
            ),
        ];
        assert!(matches!(
            fold(run, &evs),
            Err(FoldError::Inconsistent { seq: 2, .. })
        ));
    }

    #[test]
    fn a_history_without_start_is_refused() {
        let run = RunId::new();
        let evs = vec![stored(0, Event::RunResumed { events_before: 0 })];
        assert!(matches!(fold(run, &evs), Err(FoldError::NoStart { .. })));
        assert!(matches!(fold(run, &[]), Err(FoldError::NoStart { .. })));
    }
}
