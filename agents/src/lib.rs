//! cairn-agents: durable LLM agents on top of the engine.
//!
//! Model providers ([`Model`]: Anthropic Messages, OpenAI-compatible chat completions, scripted
//! answers), tools with JSON-schema inputs, and the agent loop (call the model; while it asks
//! for tools, run them and send back the results; stop at end of turn). Every model call and
//! tool call is a durable step: a resumed run answers recorded calls from the log, so a
//! completed model call is never sent, nor paid for, again.
//!
//! Architecture invariant: the engine does not know what a model is; agents use its steps.

mod agent;
mod budget;
mod choreography;
mod join;
mod model;
mod orchestration;
mod scripted;
pub mod spec;
mod tools;

pub use agent::{Agent, AgentRun, MAX_TURNS_DEFAULT, ModelCall, Price, Spent, ToolCall};
pub use budget::{Budget, BudgetExhausted, BudgetLimits};
pub use choreography::{ChoreoEvent, Choreography};
pub use model::{
    Block, Message, Model, ModelError, ModelErrorKind, ModelRequest, ModelResponse, Role,
    StopReason, ToolChoice, ToolSpec, Usage, classify_status, parse_retry_after,
};
pub use orchestration::{HandoffMode, HandoffRecord, Routed, Router, handoff, handoff_metered};
pub use scripted::ScriptedModel;
pub use tools::{FnTool, Tool, ToolError, ToolRegistry, tool, tool_at_most_once};

// providers (helper) begin
mod anthropic;
mod http;
mod openai;

pub use anthropic::AnthropicModel;
pub use openai::OpenAiModel;
// providers (helper) end
