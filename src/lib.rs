//! Cairn: a durable workflow engine for multi-agent LLM workflows.
//!
//! This facade re-exports the crates users need: [`storage`] (the event log), [`engine`]
//! (workflows, steps, replay, the runtime) and [`agents`] (models, tools, the agent loop). Every step of a workflow is appended to a
//! persistent log, so a run that crashed, was killed or was stopped resumes where it was.
//!
//! ```no_run
//! use cairn::{Engine, RedbStore, Registry, WorkflowError};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = Registry::new();
//! registry.register("greet", 1, |ctx, name: String| async move {
//!     let greeting: String = ctx
//!         .step("compose", || async move { Ok(format!("hello, {name}")) })
//!         .await?;
//!     Ok::<_, WorkflowError>(greeting)
//! });
//! let engine = Engine::new(RedbStore::open("cairn.redb")?, registry);
//! let outcome = engine.start("greet", &"ada").await?.wait().await?;
//! println!("{:?}", outcome.output);
//! # Ok(()) }
//! ```

/// The durable event log: stores, run ids, records and the hash chain.
pub mod storage {
    pub use cairn_storage::{
        Appended, BadRunId, BoxFuture, Durability, EventStore, FORMAT_VERSION, Guard, Hash,
        NewEvent, NewRun, RedbStore, RunFilter, RunId, RunMeta, RunStatus, RunUpdate, Seq,
        StoreError, StoreOptions, StoredEvent, VerifyReport, WriterStats, genesis_hash, now_micros,
        record_hash, verify_events,
    };
}

/// Workflows, durable steps, the replayer and the runtime.
pub mod engine {
    pub use cairn_engine::{
        BranchOutcome, BranchRecord, CancelOutcome, ChildRecord, CompletedStep, DecodeError,
        Engine, EngineError, EngineOptions, Event, FAN_OUT_BRANCHES_MAX, FanIn, FanInRecord,
        FanOutOptions, FanOutRecord, FoldError, Interrupt, JoinPolicy, Payload, Recovered,
        Registry, Replayer, RetryPolicy, RunHandle, RunOutcome, RunState, SignalDelivery,
        SignalRecord, StartOptions, StepError, StepOptions, StepPath, StepRecord, StepStatus,
        TimerRecord, WaitOutcome, WaitRecord, WorkflowContext, WorkflowError, fold,
    };
}

/// LLM agents on durable steps: providers, tools, the tool-use loop, routing, handoffs,
/// choreography and budgets.
pub mod agents {
    pub use cairn_agents::{
        Agent, AgentRun, AnthropicModel, Block, Budget, BudgetExhausted, BudgetLimits, ChoreoEvent,
        Choreography, FnTool, HandoffMode, HandoffRecord, MAX_TURNS_DEFAULT, Message, Model,
        ModelCall, ModelError, ModelErrorKind, ModelRequest, ModelResponse, OpenAiModel, Price,
        Role, Routed, Router, ScriptedModel, StopReason, Tool, ToolCall, ToolChoice, ToolError,
        ToolRegistry, ToolSpec, Usage, handoff, tool, tool_at_most_once,
    };

    /// Workflow files: TOML declarations of models, tools, agents and a flow, validated and
    /// run on the engine (docs/WORKFLOW_FILES.md).
    pub mod spec {
        pub use cairn_agents::spec::{
            FLOW_PREFIX, FLOW_VERSION, FlowEnv, FlowFollower, FlowInput, FlowProgress, FlowSpec,
            ItemResult, SPEC_BYTES_MAX, SpecError, SpecIssue, apply_overrides, register_flows,
        };
    }
}

pub use cairn_engine::{
    BranchOutcome, Engine, EngineError, EngineOptions, FanIn, FanOutOptions, JoinPolicy, Registry,
    RetryPolicy, RunOutcome, StartOptions, StepError, StepOptions, WorkflowContext, WorkflowError,
};
pub use cairn_storage::{RedbStore, RunId, RunStatus};

/// The README's Rust examples, compiled as doctests so they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
