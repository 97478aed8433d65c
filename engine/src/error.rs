//! Error types: what a step returns ([`StepError`]), what workflow code sees
//! ([`WorkflowError`]), and what the runtime API returns ([`EngineError`]).

use std::fmt;

use cairn_storage::{RunId, RunStatus, StoreError};

use crate::event::StepPath;
use crate::state::FoldError;

/// The error a step's closure returns. Any `std::error::Error` converts into it with `?`.
#[derive(Debug, Clone)]
pub struct StepError {
    message: String,
    retryable: bool,
    retry_after: Option<std::time::Duration>,
}

impl StepError {
    /// A failure described by `message`, not worth retrying.
    pub fn msg(message: impl fmt::Display) -> Self {
        StepError {
            message: message.to_string(),
            retryable: false,
            retry_after: None,
        }
    }

    /// A transient failure that a retry policy may retry.
    pub fn retryable(message: impl fmt::Display) -> Self {
        StepError {
            message: message.to_string(),
            retryable: true,
            retry_after: None,
        }
    }

    /// A transient failure whose source asked to be retried no sooner than `after` (an HTTP
    /// `retry-after`); the retry waits at least that long, and longer if the policy says so.
    pub fn retryable_after(message: impl fmt::Display, after: std::time::Duration) -> Self {
        StepError {
            message: message.to_string(),
            retryable: true,
            retry_after: Some(after),
        }
    }

    /// The wait the failure's source asked for, if any.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    /// The failure's description.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether a retry may help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

// Like anyhow: StepError itself is not a std Error, so this blanket conversion is coherent.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for StepError {
    fn from(e: E) -> Self {
        StepError::msg(e)
    }
}

/// Why the engine stopped executing a run's code without recording an outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Interrupt {
    /// Today's code asked for a different step than the history recorded at this position.
    #[error(
        "non-determinism in run {run} at step {path}: the history recorded `{recorded}` but the code now runs `{found}`; \
         restore the previous workflow code, or register the change as a new workflow version"
    )]
    NonDeterminism {
        /// The run.
        run: RunId,
        /// The step position.
        path: StepPath,
        /// What the history has there.
        recorded: String,
        /// What the code asked for.
        found: String,
    },
    /// A recorded output no longer decodes into the type the code expects.
    #[error(
        "run {run}, step {path} `{name}`: the recorded output does not fit today's type ({detail}); \
         keep output types backward compatible or register a new workflow version"
    )]
    RecordedTypeChanged {
        /// The run.
        run: RunId,
        /// The step position.
        path: StepPath,
        /// The step name.
        name: String,
        /// The decoder's message.
        detail: String,
    },
    /// The run was cancelled.
    #[error("run {0} was cancelled")]
    Cancelled(RunId),
    /// The engine is shutting down; the run stays `running` and resumes later.
    #[error("run {0} was interrupted by shutdown; resume it with `cairn resume {0}`")]
    Shutdown(RunId),
    /// The run is parked (status `waiting`) until a timer fires or a signal arrives; it is not
    /// an error.
    #[error("run {run} is waiting ({reason})")]
    Suspend {
        /// The run.
        run: RunId,
        /// When to wake it, if by a timer (microseconds since the epoch).
        wake_at_us: Option<i64>,
        /// What it waits for.
        reason: String,
    },
    /// Checking a history (`Engine::check`): today's code reached an operation the history does
    /// not have, so everything before it matched. Not an error.
    #[error("run {run}: the history ends before step {path} `{name}`; everything recorded matched")]
    EndOfHistory {
        /// The run.
        run: RunId,
        /// The position the code reached.
        path: StepPath,
        /// What the code asked for there.
        name: String,
    },
    /// The run passed its deadline (a per-run timeout); it fails.
    #[error("run {run} timed out: its deadline passed")]
    TimedOut {
        /// The run.
        run: RunId,
    },
    /// The store failed; the run stays as it was and can be resumed.
    #[error("run {run}: the store failed ({detail}); the run can be resumed once the store works")]
    Store {
        /// The run.
        run: RunId,
        /// What the store said.
        detail: String,
    },
    /// This process cannot run the workflow's code now (a missing API key, an unreadable
    /// file); nothing but the resume marker is recorded, the run stays as it was and can be
    /// resumed once that is fixed.
    #[error(
        "run {run} cannot run in this process: {detail}; the run is unchanged, fix this and resume it"
    )]
    Unavailable {
        /// The run.
        run: RunId,
        /// What is missing.
        detail: String,
    },
}

/// What a workflow function and the context's operations return on failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowError {
    /// A step failed (its failure is recorded); a workflow may handle it or return it.
    #[error("step {path} `{name}` failed: {message}")]
    Step {
        /// The step's position.
        path: StepPath,
        /// The step's name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// The workflow's own failure, recorded as the run's error.
    #[error("{0}")]
    Failed(String),
    /// A failure that leaves details for the workflow: a fan-out branch that fails this way
    /// has them recorded with its failure, and a resumed run reads them back
    /// ([`crate::WorkflowContext::recorded_branch_failures`]), e.g. what the branch spent.
    #[error("{message}")]
    FailedWith {
        /// What went wrong.
        message: String,
        /// What the branch leaves behind (JSON).
        details: serde_json::Value,
    },
    /// The engine must stop running this code (see [`Interrupt`]); returning any other error
    /// after this does not change that.
    #[error(transparent)]
    Interrupted(Interrupt),
}

impl WorkflowError {
    /// A workflow failure with this message.
    pub fn msg(message: impl fmt::Display) -> Self {
        WorkflowError::Failed(message.to_string())
    }
}

/// Errors of the runtime API (start, resume, recover, cancel, load).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The run's history cannot be folded.
    #[error(transparent)]
    Fold(#[from] FoldError),
    /// No run with this id exists.
    #[error("no run {0} in this store; list runs with `cairn runs`")]
    UnknownRun(RunId),
    /// No workflow with this name is registered.
    #[error("no workflow named `{name}` is registered (known: {known})")]
    UnknownWorkflow {
        /// The requested name.
        name: String,
        /// The registered names, comma-separated.
        known: String,
    },
    /// The run was recorded with another version of the workflow.
    #[error(
        "run {run} was recorded with workflow `{workflow}` version {recorded}, but this program registers version {registered}; \
         run it with the program version that started it"
    )]
    VersionMismatch {
        /// The run.
        run: RunId,
        /// The workflow name.
        workflow: String,
        /// The version in the history.
        recorded: u32,
        /// The version registered now.
        registered: u32,
    },
    /// The input does not match the workflow's input type; nothing was written.
    #[error("the input for workflow `{workflow}` is invalid: {detail}")]
    BadInput {
        /// The workflow.
        workflow: String,
        /// What does not match.
        detail: String,
    },
    /// The run is already executing in this process.
    #[error("run {0} is already executing in this process")]
    AlreadyActive(RunId),
    /// The run was stopped by an interrupt (non-determinism, store failure); it was left as it was.
    #[error(transparent)]
    Interrupted(Interrupt),
    /// A signal, review or other change was asked of a run that has finished; nothing was
    /// recorded.
    #[error("run {run} has already {status}; nothing was recorded")]
    RunFinished {
        /// The run.
        run: RunId,
        /// Its final status.
        status: RunStatus,
    },
    /// A review was asked for a step that does not need one.
    #[error(
        "run {run}, step {path}: {detail}; only a step that was running when its process stopped can be reviewed"
    )]
    NotInReview {
        /// The run.
        run: RunId,
        /// The step's position.
        path: String,
        /// What the step's state is.
        detail: String,
    },
    /// A fork was refused (unknown step, unfinished child, a history the code departs from);
    /// nothing was written.
    #[error(transparent)]
    Fork(#[from] crate::fork::ForkError),
    /// The run's task panicked; it stays `running` and can be resumed.
    #[error("run {run} panicked: {detail}; it stays `running` and can be resumed after a fix")]
    Panicked {
        /// The run.
        run: RunId,
        /// The panic message.
        detail: String,
    },
}
