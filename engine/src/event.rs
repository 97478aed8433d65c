//! The event kinds that make up a run's history, their binary encoding, and their JSON view.
//!
//! Events are an append-only contract: variants are encoded by position (postcard), so a new
//! kind is only ever added at the end, and no variant is reordered or renamed. User data
//! (inputs, outputs, metadata values) travels as JSON bytes in a [`Payload`].

use std::fmt;
use std::str::FromStr;

use cairn_storage::RunId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// JSON bytes of user data (an input, a step output, a metadata value).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Payload(Vec<u8>);

impl Payload {
    /// Encodes a value as a JSON payload.
    pub fn from_value<T: Serialize + ?Sized>(v: &T) -> Result<Self, serde_json::Error> {
        // serde_json starts with a 128-byte buffer; small outputs (most branch results) would
        // keep it, which a 1,000,000-branch fan-out pays for in memory.
        serde_json::to_vec(v).map(|mut b| {
            b.shrink_to_fit();
            Payload(b)
        })
    }

    /// Wraps bytes that are already JSON.
    pub fn from_json_bytes(bytes: Vec<u8>) -> Self {
        Payload(bytes)
    }

    /// Decodes the payload into a typed value.
    pub fn to_typed<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }

    /// The payload as a JSON value (`null` if it is empty or not JSON).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.0).unwrap_or(serde_json::Value::Null)
    }

    /// The raw JSON bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({})", String::from_utf8_lossy(&self.0))
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Payload;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("JSON bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Payload, E> {
                Ok(Payload(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Payload, E> {
                Ok(Payload(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Payload, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Payload(out))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Where a step sits in a run: `3` for the fourth top-level step, `5.17.2` for the third step of
/// branch 17 of the fan-out at step 5.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct StepPath(Vec<u32>);

impl StepPath {
    /// The empty path (the run itself).
    pub fn root() -> Self {
        StepPath(Vec::new())
    }

    /// This path extended by one position.
    pub fn child(&self, index: u32) -> Self {
        let mut v = Vec::with_capacity(self.0.len() + 1);
        v.extend_from_slice(&self.0);
        v.push(index);
        StepPath(v)
    }

    /// The positions, outermost first.
    pub fn parts(&self) -> &[u32] {
        &self.0
    }

    /// Whether `self` starts with `prefix`.
    pub fn starts_with(&self, prefix: &StepPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// Nesting depth (1 for a top-level step).
    pub fn depth(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for StepPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for StepPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StepPath({self})")
    }
}

impl FromStr for StepPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(StepPath::root());
        }
        s.split('.')
            .map(|p| p.parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
            .map(StepPath)
            .map_err(|_| {
                format!("`{s}` is not a step path (expected numbers joined by dots, e.g. 5.17.2)")
            })
    }
}

/// One thing that happened in a run. Encoded by variant position: append new kinds at the end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// The run was created with this workflow and input.
    RunStarted {
        /// Registered workflow name.
        workflow: String,
        /// Workflow version.
        version: u32,
        /// The run's input.
        input: Payload,
        /// The run that started this one, if any.
        parent: Option<RunId>,
    },
    /// The workflow returned an output.
    RunCompleted {
        /// The run's output.
        output: Payload,
    },
    /// The workflow returned an error.
    RunFailed {
        /// What went wrong.
        error: String,
    },
    /// The run was cancelled on request.
    RunCancelled {
        /// Why, as given by the canceller.
        reason: String,
    },
    /// A process picked the run up again after an interruption.
    RunResumed {
        /// How many events the run had when it was resumed.
        events_before: u64,
    },
    /// A step began executing (recorded for steps whose start must be durable).
    StepStarted {
        /// The step's position.
        path: StepPath,
        /// The step's name.
        name: String,
        /// 1 for the first attempt.
        attempt: u32,
    },
    /// A step finished with an output; on replay it is answered from here.
    StepCompleted {
        /// The step's position.
        path: StepPath,
        /// The step's name.
        name: String,
        /// Which attempt succeeded.
        attempt: u32,
        /// When the successful attempt began (microseconds since the epoch).
        started_us: i64,
        /// The step's output.
        output: Payload,
    },
    /// A step attempt failed.
    StepFailed {
        /// The step's position.
        path: StepPath,
        /// The step's name.
        name: String,
        /// Which attempt failed.
        attempt: u32,
        /// When the attempt began (microseconds since the epoch).
        started_us: i64,
        /// What went wrong.
        error: String,
        /// When the next attempt is due; `None` means the failure is final.
        retry_at_us: Option<i64>,
    },
    /// The workflow set a metadata key.
    MetadataSet {
        /// The position of the call in the workflow.
        path: StepPath,
        /// The key.
        key: String,
        /// The value.
        value: Payload,
    },
    /// A fan-out began: one branch per item, branch `i` at `path.i`.
    FanOutStarted {
        /// The fan-out's position.
        path: StepPath,
        /// The fan-out's name.
        name: String,
        /// How many branches.
        branches: u32,
        /// How many run at once.
        concurrency: u32,
        /// The join policy, as text (e.g. `all`, `at_least(5)`).
        join: String,
    },
    /// A branch finished with an output; on resume it is not run again.
    BranchCompleted {
        /// The fan-out's position.
        path: StepPath,
        /// The branch index.
        index: u32,
        /// The branch's output.
        output: Payload,
    },
    /// A branch failed; on resume it is not run again.
    BranchFailed {
        /// The fan-out's position.
        path: StepPath,
        /// The branch index.
        index: u32,
        /// What went wrong.
        error: String,
    },
    /// The fan-in decided the fan-out's outcome.
    FanInCompleted {
        /// The fan-out's position.
        path: StepPath,
        /// Branches that succeeded.
        succeeded: u32,
        /// Branches that failed.
        failed: u32,
        /// Branches stopped mid-flight by the join policy (fail fast, first success).
        cancelled: Vec<u32>,
        /// Why the fan-out failed, if it did.
        error: Option<String>,
    },
    /// A durable timer was set; the run sleeps until it fires, across restarts.
    TimerSet {
        /// The sleep's position.
        path: StepPath,
        /// When it fires (microseconds since the epoch).
        fire_at_us: i64,
    },
    /// A durable timer fired.
    TimerFired {
        /// The sleep's position.
        path: StepPath,
    },
    /// An external signal was delivered to the run (kept until a wait consumes it).
    SignalSent {
        /// The signal's name.
        name: String,
        /// Its data.
        data: Payload,
    },
    /// The workflow began waiting for a signal.
    SignalWaitStarted {
        /// The wait's position.
        path: StepPath,
        /// The signal's name.
        name: String,
        /// When the wait times out (microseconds since the epoch), if ever.
        deadline_us: Option<i64>,
    },
    /// A wait consumed a delivered signal.
    SignalReceived {
        /// The wait's position.
        path: StepPath,
        /// The signal's name.
        name: String,
        /// The sequence number of the `signal_sent` event consumed.
        sent_seq: u64,
    },
    /// A wait for a signal timed out.
    SignalTimedOut {
        /// The wait's position.
        path: StepPath,
        /// The signal's name.
        name: String,
    },
    /// The workflow started a child run.
    ChildStarted {
        /// The position of the call.
        path: StepPath,
        /// The child run's id.
        child: RunId,
        /// The child's workflow.
        workflow: String,
    },
    /// A child run finished.
    ChildFinished {
        /// The position of the call.
        path: StepPath,
        /// The child run's id.
        child: RunId,
        /// Whether it completed (true) or failed or was cancelled (false).
        ok: bool,
        /// Its output (when ok) or `null`.
        output: Payload,
        /// Its error, when not ok.
        error: Option<String>,
    },
    /// The run was parked (status `waiting`) to free memory while it waits.
    RunSuspended {
        /// When it is due to be woken, if by a timer.
        wake_at_us: Option<i64>,
        /// What it waits for.
        reason: String,
    },
    /// The run must finish by this time or fail as timed out (a per-run timeout).
    RunDeadlineSet {
        /// The deadline (microseconds since the epoch).
        deadline_us: i64,
    },
    /// A branch failed and left details for the workflow (what it spent, say): like
    /// [`Event::BranchFailed`], with the details the fold keeps for a resume.
    BranchFailedWith {
        /// The fan-out's position.
        path: StepPath,
        /// The branch index.
        index: u32,
        /// What went wrong.
        error: String,
        /// What the branch left for the workflow.
        details: Payload,
    },
}

/// The error for bytes that are not an event this binary knows.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode event: {0}")]
pub struct DecodeError(String);

impl Event {
    /// The binary encoding stored in the log.
    pub fn encode(&self) -> Vec<u8> {
        // postcard fails only for types it cannot represent (maps with non-string keys are
        // fine, `serialize_any`-style types are not); every field here is a plain type, which
        // the round-trip tests below pin, so an empty result is unreachable.
        //
        // Encoded into a reused buffer of this thread and copied out at its exact size: an
        // empty `Vec` grown byte by byte reallocated four or five times per event (measured:
        // 1,370 instructions per `step_completed` before, 740 after).
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        /// A buffer grown larger than this by a huge event is not kept.
        const KEPT_MAX: usize = 64 * 1024;
        let reused = BUF.try_with(|cell| {
            let mut kept = cell.try_borrow_mut().ok()?;
            let mut buf = std::mem::take(&mut *kept);
            buf.clear();
            let full = postcard::to_extend(self, buf).ok()?;
            let out = full.clone();
            if full.capacity() <= KEPT_MAX {
                *kept = full;
            }
            Some(out)
        });
        reused
            .ok()
            .flatten()
            .unwrap_or_else(|| postcard::to_stdvec(self).unwrap_or_default())
    }

    /// Decodes an event from the log.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        postcard::from_bytes(bytes).map_err(|e| DecodeError(e.to_string()))
    }

    /// The stable snake_case name of the kind, as used in JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::RunStarted { .. } => "run_started",
            Event::RunCompleted { .. } => "run_completed",
            Event::RunFailed { .. } => "run_failed",
            Event::RunCancelled { .. } => "run_cancelled",
            Event::RunResumed { .. } => "run_resumed",
            Event::StepStarted { .. } => "step_started",
            Event::StepCompleted { .. } => "step_completed",
            Event::StepFailed { .. } => "step_failed",
            Event::MetadataSet { .. } => "metadata_set",
            Event::FanOutStarted { .. } => "fan_out_started",
            Event::BranchCompleted { .. } => "branch_completed",
            Event::BranchFailed { .. } | Event::BranchFailedWith { .. } => "branch_failed",
            Event::FanInCompleted { .. } => "fan_in_completed",
            Event::TimerSet { .. } => "timer_set",
            Event::TimerFired { .. } => "timer_fired",
            Event::SignalSent { .. } => "signal_sent",
            Event::SignalWaitStarted { .. } => "signal_wait_started",
            Event::SignalReceived { .. } => "signal_received",
            Event::SignalTimedOut { .. } => "signal_timed_out",
            Event::ChildStarted { .. } => "child_started",
            Event::ChildFinished { .. } => "child_finished",
            Event::RunSuspended { .. } => "run_suspended",
            Event::RunDeadlineSet { .. } => "run_deadline_set",
        }
    }

    /// The step path the event belongs to, if any.
    pub fn path(&self) -> Option<&StepPath> {
        match self {
            Event::StepStarted { path, .. }
            | Event::StepCompleted { path, .. }
            | Event::StepFailed { path, .. }
            | Event::MetadataSet { path, .. }
            | Event::FanOutStarted { path, .. }
            | Event::BranchCompleted { path, .. }
            | Event::BranchFailed { path, .. }
            | Event::BranchFailedWith { path, .. }
            | Event::FanInCompleted { path, .. }
            | Event::TimerSet { path, .. }
            | Event::TimerFired { path }
            | Event::SignalWaitStarted { path, .. }
            | Event::SignalReceived { path, .. }
            | Event::SignalTimedOut { path, .. }
            | Event::ChildStarted { path, .. }
            | Event::ChildFinished { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The event's fields as a JSON object (without seq/ts), with stable field names.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let mut v = match self {
            Event::RunStarted {
                workflow,
                version,
                input,
                parent,
            } => json!({
                "workflow": workflow, "version": version, "input": input.to_json(),
                "parent": parent.map(|p| p.to_string()),
            }),
            Event::RunCompleted { output } => json!({ "output": output.to_json() }),
            Event::RunFailed { error } => json!({ "error": error }),
            Event::RunCancelled { reason } => json!({ "reason": reason }),
            Event::RunResumed { events_before } => json!({ "events_before": events_before }),
            Event::StepStarted {
                path,
                name,
                attempt,
            } => json!({ "path": path.to_string(), "name": name, "attempt": attempt }),
            Event::StepCompleted {
                path,
                name,
                attempt,
                started_us,
                output,
            } => json!({
                "path": path.to_string(), "name": name, "attempt": attempt,
                "started_us": started_us, "output": output.to_json(),
            }),
            Event::StepFailed {
                path,
                name,
                attempt,
                started_us,
                error,
                retry_at_us,
            } => json!({
                "path": path.to_string(), "name": name, "attempt": attempt,
                "started_us": started_us, "error": error, "retry_at_us": retry_at_us,
            }),
            Event::MetadataSet { path, key, value } => {
                json!({ "path": path.to_string(), "key": key, "value": value.to_json() })
            }
            Event::FanOutStarted {
                path,
                name,
                branches,
                concurrency,
                join,
            } => json!({
                "path": path.to_string(), "name": name, "branches": branches,
                "concurrency": concurrency, "join": join,
            }),
            Event::BranchCompleted {
                path,
                index,
                output,
            } => json!({ "path": path.to_string(), "index": index, "output": output.to_json() }),
            Event::BranchFailed { path, index, error } => {
                json!({ "path": path.to_string(), "index": index, "error": error })
            }
            Event::BranchFailedWith {
                path,
                index,
                error,
                details,
            } => json!({
                "path": path.to_string(), "index": index, "error": error,
                "details": details.to_json(),
            }),
            Event::FanInCompleted {
                path,
                succeeded,
                failed,
                cancelled,
                error,
            } => json!({
                "path": path.to_string(), "succeeded": succeeded, "failed": failed,
                "cancelled": cancelled, "error": error,
            }),
            Event::TimerSet { path, fire_at_us } => {
                json!({ "path": path.to_string(), "fire_at_us": fire_at_us })
            }
            Event::TimerFired { path } => json!({ "path": path.to_string() }),
            Event::SignalSent { name, data } => json!({ "name": name, "data": data.to_json() }),
            Event::SignalWaitStarted {
                path,
                name,
                deadline_us,
            } => json!({ "path": path.to_string(), "name": name, "deadline_us": deadline_us }),
            Event::SignalReceived {
                path,
                name,
                sent_seq,
            } => json!({ "path": path.to_string(), "name": name, "sent_seq": sent_seq }),
            Event::SignalTimedOut { path, name } => {
                json!({ "path": path.to_string(), "name": name })
            }
            Event::ChildStarted {
                path,
                child,
                workflow,
            } => {
                json!({ "path": path.to_string(), "child": child.to_string(), "workflow": workflow })
            }
            Event::ChildFinished {
                path,
                child,
                ok,
                output,
                error,
            } => json!({
                "path": path.to_string(), "child": child.to_string(), "ok": ok,
                "output": output.to_json(), "error": error,
            }),
            Event::RunSuspended { wake_at_us, reason } => {
                json!({ "wake_at_us": wake_at_us, "reason": reason })
            }
            Event::RunDeadlineSet { deadline_us } => json!({ "deadline_us": deadline_us }),
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("kind".into(), self.kind().into());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Event> {
        let p = Payload::from_value(&serde_json::json!({"a": [1, 2, "x"]})).unwrap();
        vec![
            Event::RunStarted {
                workflow: "w".into(),
                version: 3,
                input: p.clone(),
                parent: Some(RunId::new()),
            },
            Event::RunCompleted { output: p.clone() },
            Event::RunFailed { error: "e".into() },
            Event::RunCancelled { reason: "r".into() },
            Event::RunResumed { events_before: 7 },
            Event::StepStarted {
                path: "1.2".parse().unwrap(),
                name: "s".into(),
                attempt: 1,
            },
            Event::StepCompleted {
                path: "5.17.2".parse().unwrap(),
                name: "s".into(),
                attempt: 2,
                started_us: -5,
                output: p.clone(),
            },
            Event::StepFailed {
                path: "0".parse().unwrap(),
                name: "s".into(),
                attempt: 1,
                started_us: 9,
                error: "boom".into(),
                retry_at_us: Some(10),
            },
            Event::MetadataSet {
                path: "4".parse().unwrap(),
                key: "k".into(),
                value: p.clone(),
            },
            Event::FanOutStarted {
                path: "5".parse().unwrap(),
                name: "f".into(),
                branches: 100_000,
                concurrency: 32,
                join: "all".into(),
            },
            Event::BranchCompleted {
                path: "5".parse().unwrap(),
                index: 99_999,
                output: p,
            },
            Event::BranchFailed {
                path: "5".parse().unwrap(),
                index: 3,
                error: "e".into(),
            },
            Event::FanInCompleted {
                path: "5".parse().unwrap(),
                succeeded: 1,
                failed: 1,
                cancelled: vec![7],
                error: None,
            },
            Event::TimerSet {
                path: "6".parse().unwrap(),
                fire_at_us: 123,
            },
            Event::TimerFired {
                path: "6".parse().unwrap(),
            },
            Event::SignalSent {
                name: "approve".into(),
                data: Payload::from_value(&true).unwrap(),
            },
            Event::SignalWaitStarted {
                path: "7".parse().unwrap(),
                name: "approve".into(),
                deadline_us: Some(9),
            },
            Event::SignalReceived {
                path: "7".parse().unwrap(),
                name: "approve".into(),
                sent_seq: 14,
            },
            Event::SignalTimedOut {
                path: "8".parse().unwrap(),
                name: "x".into(),
            },
            Event::ChildStarted {
                path: "9".parse().unwrap(),
                child: RunId::new(),
                workflow: "w".into(),
            },
            Event::ChildFinished {
                path: "9".parse().unwrap(),
                child: RunId::new(),
                ok: true,
                output: Payload::from_value(&1).unwrap(),
                error: None,
            },
            Event::RunSuspended {
                wake_at_us: None,
                reason: "signal".into(),
            },
            Event::RunDeadlineSet { deadline_us: 77 },
            Event::BranchFailedWith {
                path: "5".parse().unwrap(),
                index: 4,
                error: "e".into(),
                details: Payload::from_value(&serde_json::json!({"spent": 1})).unwrap(),
            },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for e in samples() {
            assert_eq!(Event::decode(&e.encode()).unwrap(), e);
        }
    }

    /// Variants are encoded by position: this pins the numbering so a reorder fails loudly.
    #[test]
    fn variant_numbering_is_stable() {
        let tags: Vec<u8> = samples().iter().map(|e| e.encode()[0]).collect();
        assert_eq!(tags, (0..=23).collect::<Vec<u8>>());
    }

    #[test]
    fn unknown_kind_is_an_error() {
        assert!(Event::decode(&[200]).is_err());
        assert!(Event::decode(&[]).is_err());
    }

    #[test]
    fn step_paths_parse_and_print() {
        let p: StepPath = "5.17.2".parse().unwrap();
        assert_eq!(p.parts(), &[5, 17, 2]);
        assert_eq!(p.to_string(), "5.17.2");
        assert!("5.x".parse::<StepPath>().is_err());
        assert_eq!(StepPath::root().child(3).to_string(), "3");
    }
}
