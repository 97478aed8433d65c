//! Forks: a new run that reuses a recorded run's history before one step and executes from
//! there, to ask "what if this step (or the input) had been different" without paying again
//! for the work before it.
//!
//! A prefix of a log is always a state a crash could have left, so a fork is a new run whose
//! history is a copy of the source's events strictly before the first event of the fork point
//! (or of anything below it), resumed like any interrupted run: replay answers the copied
//! operations and execution continues at the fork point. The copy drops what describes the
//! source's processes rather than its work (`run_resumed`, `run_suspended`) and its end
//! (`run_completed`, `run_failed`, `run_cancelled`). Before anything is written, today's code is
//! replayed against the copy in check mode, so a fork whose new input or code departs from the
//! history before the fork point is refused and leaves nothing behind.
//!
//! Architecture invariant: forking only reads the source run; its events, row and children are
//! left as they are.

use std::collections::{BTreeMap, HashMap};

use cairn_storage::{NewEvent, NewRun, RunId, RunStatus, Seq, StoredEvent};

use crate::error::{EngineError, Interrupt};
use crate::event::{Event, Payload, StepPath};
use crate::runtime::{Engine, RunHandle};
use crate::state::{FoldError, RunState, fold};

/// The label of a forked run naming the run it was forked from.
pub const FORKED_FROM_LABEL: &str = "forked_from";
/// The label of a forked run naming the step it was forked from.
pub const FORK_POINT_LABEL: &str = "fork_point";
/// The label of a forked run saying how many of its first events were copied from the source.
pub const FORK_EVENTS_LABEL: &str = "fork_events";

/// How many events one read of the source's history takes.
const READ_PAGE_EVENTS: usize = 8192;
/// How many recorded top-level steps an "unknown step" error lists.
const NEARBY_STEPS_MAX: usize = 6;

/// What to fork: the step to execute from, and optionally another input.
#[derive(Clone, Debug)]
pub struct ForkOptions {
    /// The step to execute from: its events and everything after them are not copied.
    pub from: StepPath,
    /// The fork's input; `None` keeps the source's.
    pub input: Option<serde_json::Value>,
    /// Labels stored with the fork (besides the fork labels the engine adds).
    pub labels: BTreeMap<String, String>,
}

impl ForkOptions {
    /// A fork from step `from` with the source's input and no extra labels.
    pub fn new(from: StepPath) -> Self {
        ForkOptions {
            from,
            input: None,
            labels: BTreeMap::new(),
        }
    }
}

/// A fork created by [`Engine::fork_prefix`]: durable, `running`, not executing yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForkedRun {
    /// The new run.
    pub id: RunId,
    /// The run it was forked from.
    pub source: RunId,
    /// The step it executes from.
    pub from: StepPath,
    /// How many events were copied from the source's history.
    pub events_copied: u64,
}

/// Why a fork was refused; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForkError {
    /// The fork point is the run itself, not a step.
    #[error(
        "give a step to fork run {run} from (e.g. `--from 2` or `--from 2.3.1`, positions as `cairn show {run}` prints them); to run the workflow again from its start, use `cairn start`"
    )]
    NoStep {
        /// The source run.
        run: RunId,
    },
    /// The source's history has no event at or below the fork point.
    #[error(
        "run {run} has no step {path} in its history{note}; recorded top-level steps near it: {nearby} (see `cairn show {run}`)"
    )]
    UnknownStep {
        /// The source run.
        run: RunId,
        /// The fork point asked for.
        path: StepPath,
        /// Why it may be missing (e.g. the run has not reached it yet), or empty.
        note: String,
        /// Recorded top-level positions near the one asked for.
        nearby: String,
    },
    /// The fork point is inside a child run, whose steps are in the child's own history.
    #[error(
        "step {path} is inside child run {child} (`{workflow}`, started by run {run} at step {at}); a child run keeps its own history: fork run {child} instead"
    )]
    InsideChild {
        /// The source run.
        run: RunId,
        /// The fork point asked for.
        path: StepPath,
        /// The position of the child call.
        at: StepPath,
        /// The child run.
        child: RunId,
        /// The child's workflow.
        workflow: String,
    },
    /// A child run started before the fork point had not finished there and is not finished
    /// now, so the fork would have to drive a run that belongs to the source.
    #[error(
        "cannot fork run {run} from step {path}: its child run {child} (started at step {at}) had not finished before that step and is {status}; wait until it finishes, or fork from step {at} or earlier"
    )]
    ChildUnfinished {
        /// The source run.
        run: RunId,
        /// The fork point.
        path: StepPath,
        /// The position of the child call.
        at: StepPath,
        /// The child run.
        child: RunId,
        /// The child's status now (`not created`, `running`, …).
        status: String,
    },
    /// Today's code, with the fork's input, departs from the copied history before the fork
    /// point.
    #[error("cannot fork run {run} from step {path}: {detail}")]
    Diverges {
        /// The source run.
        run: RunId,
        /// The fork point.
        path: StepPath,
        /// Where and how the code departs, and what to do.
        detail: String,
    },
}

/// The source's history before the fork point, rewritten for the fork.
struct Prefix {
    /// The events to write, with their original timestamps.
    events: Vec<(i64, Event)>,
    /// Whether an event of the fork point was found (else the step is unknown).
    found: bool,
    /// A child call whose position is above the fork point (the point is inside the child).
    enclosing_child: Option<(StepPath, RunId, String)>,
    /// The source's input, as recorded.
    recorded_input: serde_json::Value,
}

impl Engine {
    /// Forks run `source` at `opts.from` and executes the fork: the copied history is answered
    /// from the log, execution starts at the fork point. Returns the new run's handle.
    pub async fn fork(&self, source: RunId, opts: ForkOptions) -> Result<RunHandle, EngineError> {
        let forked = self.fork_prefix(source, opts).await?;
        self.resume(forked.id).await
    }

    /// Creates the fork of run `source` at `opts.from` without executing it: a new `running`
    /// run holding the copied history, which `resume` (or `recover`, or a worker) continues.
    /// Refuses, writing nothing, an unknown run or step, an unfinished child before the fork
    /// point, an input the workflow rejects, and a history today's code departs from.
    pub async fn fork_prefix(
        &self,
        source: RunId,
        opts: ForkOptions,
    ) -> Result<ForkedRun, EngineError> {
        let from = opts.from;
        if from.depth() == 0 {
            return Err(ForkError::NoStep { run: source }.into());
        }
        let meta = self.run_meta(source).await?;
        let prefix = self.read_prefix(source, &from, opts.input.as_ref()).await?;
        if !prefix.found {
            if let Some((at, child, workflow)) = prefix.enclosing_child {
                return Err(ForkError::InsideChild {
                    run: source,
                    path: from,
                    at,
                    child,
                    workflow,
                }
                .into());
            }
            let full = self.load(source).await?;
            let note = if meta.status.is_terminal() {
                String::new()
            } else {
                format!(" yet (the run is {})", meta.status)
            };
            return Err(ForkError::UnknownStep {
                run: source,
                nearby: nearby_steps(&full, &from),
                path: from,
                note,
            }
            .into());
        }

        let id = RunId::new();
        let stored: Vec<StoredEvent> = prefix
            .events
            .iter()
            .enumerate()
            .map(|(i, (ts, e))| StoredEvent {
                seq: Seq(i as u64),
                ts_us: *ts,
                payload: e.encode(),
                hash: [0; 32],
            })
            .collect();
        let state = fold(id, &stored)?;
        let wf = self.lookup_recorded(source, &state)?;
        (wf.check_input)(&state.input).map_err(|detail| EngineError::BadInput {
            workflow: state.workflow.clone(),
            detail: format!("{detail}; nothing was written"),
        })?;

        // A child without a recorded result is awaited again on replay. That only reads a
        // finished child; an unfinished one (or one never created) would be driven by the
        // fork although it belongs to the source.
        for (at, c) in state.children.iter().filter(|(_, c)| c.ok.is_none()) {
            let status = self.store().run(c.child).await?.map(|m| m.status);
            if !status.is_some_and(RunStatus::is_terminal) {
                return Err(ForkError::ChildUnfinished {
                    run: source,
                    path: from,
                    at: at.clone(),
                    child: c.child,
                    status: status.map_or_else(|| "not created".to_string(), |s| s.to_string()),
                }
                .into());
            }
        }

        let input_changed = opts
            .input
            .as_ref()
            .is_some_and(|v| *v != prefix.recorded_input);
        let (report, interrupt) = self.check_state(id, state.clone(), wf).await?;
        if let Some(divergence) = report.divergence {
            let detail = match interrupt {
                Some(Interrupt::NonDeterminism {
                    path,
                    recorded,
                    found,
                    ..
                }) => {
                    let who = if input_changed {
                        "the workflow with the fork's input"
                    } else {
                        "today's workflow code"
                    };
                    let does = if found == "the end of the workflow" {
                        "ends there".to_string()
                    } else {
                        format!("runs `{found}`")
                    };
                    let fix = if input_changed {
                        "keep the run's input"
                    } else {
                        "run the code that recorded the run"
                    };
                    format!(
                        "at step {path}, before the fork point, the history has `{recorded}` but {who} {does}; fork from step {path} or earlier, or {fix}"
                    )
                }
                _ => format!(
                    "today's code departs from the history before that step ({divergence}); fork from an earlier step"
                ),
            };
            return Err(ForkError::Diverges {
                run: source,
                path: from,
                detail,
            }
            .into());
        }

        let events_copied = stored.len() as u64;
        let mut labels = opts.labels;
        labels.insert(FORKED_FROM_LABEL.into(), source.to_string());
        labels.insert(FORK_POINT_LABEL.into(), from.to_string());
        labels.insert(FORK_EVENTS_LABEL.into(), events_copied.to_string());
        let events = stored
            .into_iter()
            .map(|e| NewEvent {
                ts_us: e.ts_us,
                payload: e.payload,
            })
            .collect();
        self.store()
            .create_run(
                NewRun {
                    id,
                    workflow: state.workflow,
                    version: state.version,
                    // A fork is a run of its own: the source's parent does not await it.
                    parent: None,
                    labels,
                    status: RunStatus::Running,
                },
                events,
            )
            .await?;
        Ok(ForkedRun {
            id,
            source,
            from,
            events_copied,
        })
    }

    /// Reads the source's events up to the first one of `from` (or below it) and rewrites them
    /// for the fork: process markers and the end dropped, signal references renumbered, the
    /// input replaced and a deadline moved so that the fork gets the same time from now.
    async fn read_prefix(
        &self,
        source: RunId,
        from: &StepPath,
        input: Option<&serde_json::Value>,
    ) -> Result<Prefix, EngineError> {
        let mut out = Prefix {
            events: Vec::new(),
            found: false,
            enclosing_child: None,
            recorded_input: serde_json::Value::Null,
        };
        // A copied `signal_sent` keeps its data but may move: old seq → new seq.
        let mut signal_seqs: HashMap<u64, u64> = HashMap::new();
        let mut started_us = 0;
        let mut next = Seq(0);
        'pages: loop {
            let page = self.store().read(source, next, READ_PAGE_EVENTS).await?;
            let Some(last) = page.last() else { break };
            next = Seq(last.seq.0 + 1);
            for ev in &page {
                let e = Event::decode(&ev.payload).map_err(|e| FoldError::Undecodable {
                    run: source,
                    seq: ev.seq.0,
                    detail: e.to_string(),
                })?;
                if belongs_to(&e, from) {
                    out.found = true;
                    break 'pages;
                }
                let new_seq = out.events.len() as u64;
                let e = match e {
                    Event::RunResumed { .. }
                    | Event::RunSuspended { .. }
                    | Event::RunCompleted { .. }
                    | Event::RunFailed { .. }
                    | Event::RunCancelled { .. } => continue,
                    Event::RunStarted {
                        workflow,
                        version,
                        input: recorded,
                        parent: _,
                    } => {
                        started_us = ev.ts_us;
                        out.recorded_input = recorded.to_json();
                        let input = match input {
                            None => recorded,
                            Some(v) => {
                                Payload::from_value(v).map_err(|e| EngineError::BadInput {
                                    workflow: workflow.clone(),
                                    detail: e.to_string(),
                                })?
                            }
                        };
                        Event::RunStarted {
                            workflow,
                            version,
                            input,
                            parent: None,
                        }
                    }
                    Event::RunDeadlineSet { deadline_us } => Event::RunDeadlineSet {
                        deadline_us: cairn_storage::now_micros()
                            .saturating_add(deadline_us.saturating_sub(started_us)),
                    },
                    Event::SignalSent { name, data } => {
                        signal_seqs.insert(ev.seq.0, new_seq);
                        Event::SignalSent { name, data }
                    }
                    Event::SignalReceived {
                        path,
                        name,
                        sent_seq,
                    } => {
                        let sent_seq = signal_seqs.get(&sent_seq).copied().ok_or_else(|| {
                            FoldError::Inconsistent {
                                run: source,
                                seq: ev.seq.0,
                                detail: format!("wait {path} consumed unknown signal {sent_seq}"),
                            }
                        })?;
                        Event::SignalReceived {
                            path,
                            name,
                            sent_seq,
                        }
                    }
                    Event::ChildStarted {
                        path,
                        child,
                        workflow,
                    } => {
                        if from.depth() > path.depth() && from.starts_with(&path) {
                            out.enclosing_child = Some((path.clone(), child, workflow.clone()));
                        }
                        Event::ChildStarted {
                            path,
                            child,
                            workflow,
                        }
                    }
                    other => other,
                };
                out.events.push((ev.ts_us, e));
            }
        }
        if out.events.is_empty() {
            // Not even a `run_started`: the history is damaged.
            return Err(FoldError::NoStart { run: source }.into());
        }
        Ok(out)
    }
}

/// Whether `e` is an event of step `from` or of anything below it. A branch outcome belongs to
/// its branch (`path.index`), not to the fan-out's own position.
fn belongs_to(e: &Event, from: &StepPath) -> bool {
    match e {
        Event::BranchCompleted { path, index, .. }
        | Event::BranchFailed { path, index, .. }
        | Event::BranchFailedWith { path, index, .. } => path.child(*index).starts_with(from),
        _ => e.path().is_some_and(|p| p.starts_with(from)),
    }
}

/// The recorded top-level positions nearest to `path`'s, for an "unknown step" error.
fn nearby_steps(state: &RunState, path: &StepPath) -> String {
    let want = path.parts().first().copied().unwrap_or(0);
    let mut top: Vec<(u32, String)> = state
        .positioned()
        .filter(|(p, _)| p.depth() == 1)
        .filter_map(|(p, d)| Some((*p.parts().first()?, d)))
        .collect();
    if top.is_empty() {
        return "none (the run has recorded no steps)".into();
    }
    top.sort_by_key(|(i, _)| (i.abs_diff(want), *i));
    top.truncate(NEARBY_STEPS_MAX);
    top.sort_by_key(|(i, _)| *i);
    top.iter()
        .map(|(i, d)| {
            if d.contains('`') {
                format!("{i} {d}")
            } else {
                format!("{i} `{d}`")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
