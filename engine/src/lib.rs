//! cairn-engine: durable workflow execution over a Cairn event log.
//!
//! Workflow code calls [`WorkflowContext::step`]; each step's result is appended to the run's
//! log before the call returns. A run's state is a pure fold over its events ([`fold`],
//! [`Replayer`]), so a run that crashed or was stopped resumes where it was: completed steps
//! are answered from the log and execution continues at the first step the log does not have.
//! The [`Engine`] starts, resumes, recovers and cancels runs.
//!
//! Architecture invariant: the engine never learns what an LLM is; agents build on steps.

mod child;
mod context;
mod error;
mod event;
mod fanout;
mod fork;
mod meter;
mod registry;
mod retry;
mod runtime;
mod state;
mod waits;

pub use context::{CompletedStep, WorkflowContext};
pub use error::{EngineError, Interrupt, StepError, WorkflowError};
pub use event::{DecodeError, Event, Payload, StepPath};
pub use fanout::{BranchOutcome, FanIn, FanOutOptions, JoinPolicy};
pub use fork::{
    FORK_EVENTS_LABEL, FORK_POINT_LABEL, FORKED_FROM_LABEL, ForkError, ForkOptions, ForkedRun,
};
pub use meter::{RunEnded, StepAttempt, StepMeter, in_left_out_run};
pub use registry::Registry;
pub use retry::{RetryPolicy, StepOptions};
pub use runtime::{
    CancelOutcome, CheckReport, Engine, EngineOptions, Recovered, RunHandle, RunOutcome,
    SignalDelivery, StartOptions, StepResolution,
};
pub use state::{
    BranchRecord, ChildRecord, FAN_OUT_BRANCHES_MAX, FanInRecord, FanOutRecord, FoldError,
    Replayer, RunState, SignalRecord, StepRecord, StepStatus, TimerRecord, WaitOutcome, WaitRecord,
    fold,
};
