//! The agent: a model, a system prompt and tools, run as the tool-use loop, durably.
//!
//! Call the model; while it stops for `tool_use`, run the requested tools (concurrently, each
//! its own durable step) and send the results back; stop at the end of its turn. Each model
//! call is a durable step (`model`) whose recorded output is the whole exchange (request hash,
//! request, response, usage, latency, cost), so a resumed run answers it from the log and
//! never sends it, nor pays for it, again. Each tool call is a step (`tool:<name>`). Both sit
//! in a scope named `agent:<name>`, so a run's log shows which agent made which call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_engine::{
    Interrupt, RetryPolicy, StepError, StepOptions, StepPath, WorkflowContext, WorkflowError,
};
use cairn_storage::RunId;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing::field::Empty;

use crate::budget::Budget;
use crate::join::join_all;
use crate::model::{
    Block, Message, Model, ModelErrorKind, ModelRequest, ModelResponse, Role, StopReason,
    ToolChoice, Usage,
};
use crate::tools::ToolRegistry;

/// Prices of a model in US dollars per million tokens, for cost accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Price {
    /// Input tokens.
    pub input_per_mtok: f64,
    /// Output tokens.
    pub output_per_mtok: f64,
    /// Input tokens written to the prompt cache.
    pub cache_write_per_mtok: f64,
    /// Input tokens read from the prompt cache.
    pub cache_read_per_mtok: f64,
}

impl Price {
    /// The cost of `usage` at these prices.
    pub fn cost(&self, u: &Usage) -> f64 {
        (u.input_tokens as f64 * self.input_per_mtok
            + u.output_tokens as f64 * self.output_per_mtok
            + u.cache_creation_input_tokens as f64 * self.cache_write_per_mtok
            + u.cache_read_input_tokens as f64 * self.cache_read_per_mtok)
            / 1_000_000.0
    }
}

/// One model call as recorded in the log (the output of a `model` step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCall {
    /// The agent that made it.
    pub agent: String,
    /// The provider (`anthropic`, `openai`, `scripted`).
    pub provider: String,
    /// blake3 of the request's JSON.
    pub request_hash: String,
    /// The request sent.
    pub request: ModelRequest,
    /// The answer.
    pub response: ModelResponse,
    /// Wall time of the successful attempt.
    pub latency_ms: u64,
    /// The call's cost, if the agent has a price.
    pub cost_usd: Option<f64>,
}

/// One tool call as recorded in the log (the output of a `tool:<name>` step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The `tool_use` id.
    pub id: String,
    /// The tool's name.
    pub tool: String,
    /// The arguments.
    pub input: serde_json::Value,
    /// The result, when it succeeded.
    pub output: Option<serde_json::Value>,
    /// The error sent back to the model, when it did not.
    pub error: Option<String>,
    /// Wall time of the call.
    pub latency_ms: u64,
}

/// What an agent's run produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRun {
    /// The agent.
    pub agent: String,
    /// The final answer's text.
    pub text: String,
    /// The whole conversation, ending with the final answer.
    pub messages: Vec<Message>,
    /// Why the model stopped the last time.
    pub stop_reason: StopReason,
    /// Model calls made.
    pub turns: u32,
    /// Tool calls made.
    pub tool_calls: u32,
    /// Tool calls that failed (reported to the model).
    pub tool_errors: u32,
    /// Tokens used by all calls.
    pub usage: Usage,
    /// Cost of all calls, if the agent has a price.
    pub cost_usd: Option<f64>,
}

/// What an agent run's model calls cost, also when the run failed ([`Agent::run_metered`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spent {
    /// Tokens used by the calls made.
    pub usage: Usage,
    /// Their cost, if the agent has a price.
    pub cost_usd: Option<f64>,
}

impl std::ops::AddAssign for Spent {
    fn add_assign(&mut self, other: Spent) {
        self.usage = self.usage + other.usage;
        self.cost_usd = match (self.cost_usd, other.cost_usd) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
    }
}

/// The most turns an agent runs by default before it gives up.
pub const MAX_TURNS_DEFAULT: u32 = 16;

/// A named agent: a model, its id, a system prompt, tools, and limits.
#[derive(Clone)]
pub struct Agent {
    name: String,
    model: Arc<dyn Model>,
    model_id: String,
    system: Option<String>,
    tools: ToolRegistry,
    max_turns: u32,
    max_tokens: u32,
    temperature: Option<f32>,
    retry: RetryPolicy,
    price: Option<Price>,
    budget: Option<Arc<Budget>>,
}

impl Agent {
    /// An agent named `name` calling `model_id` through `model`.
    pub fn new(name: &str, model: Arc<dyn Model>, model_id: &str) -> Self {
        Agent {
            name: name.to_string(),
            model,
            model_id: model_id.to_string(),
            system: None,
            tools: ToolRegistry::new(),
            max_turns: MAX_TURNS_DEFAULT,
            max_tokens: 1024,
            temperature: None,
            retry: RetryPolicy::exponential(5)
                .with_initial_delay(Duration::from_secs(1))
                .with_max_delay(Duration::from_secs(60)),
            price: None,
            budget: None,
        }
    }

    /// The same agent with a system prompt.
    pub fn system(mut self, prompt: &str) -> Self {
        self.system = Some(prompt.to_string());
        self
    }

    /// The same agent with these tools.
    pub fn tools(mut self, tools: ToolRegistry) -> Self {
        self.tools = tools;
        self
    }

    /// The same agent with another turn limit (model calls per run).
    pub fn max_turns(mut self, n: u32) -> Self {
        self.max_turns = n.max(1);
        self
    }

    /// The same agent with another output token limit per call.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = n;
        self
    }

    /// The same agent with a sampling temperature.
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = Some(t);
        self
    }

    /// The same agent with another retry policy for model calls (429, 529, 5xx, timeouts).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The same agent with a price table, so calls record their cost.
    pub fn price(mut self, price: Price) -> Self {
        self.price = Some(price);
        self
    }

    /// The run budget this agent draws on, if any.
    pub(crate) fn budget_handle(&self) -> Option<&Arc<Budget>> {
        self.budget.as_ref()
    }

    /// The same agent drawing on a run budget (share one budget between a run's agents).
    pub fn budget(mut self, budget: Arc<Budget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the agent on `task` (one user message) until it answers.
    pub async fn run(&self, ctx: &WorkflowContext, task: &str) -> Result<AgentRun, WorkflowError> {
        self.run_conversation(ctx, vec![Message::user(task)]).await
    }

    /// [`Agent::run`], also telling what its model calls cost when it fails: a failed run's
    /// calls were paid for too (a workflow that counts its spending, like a workflow file's
    /// `for_each` item, adds them). On success the same as the run's `usage` and `cost_usd`.
    pub async fn run_metered(
        &self,
        ctx: &WorkflowContext,
        task: &str,
    ) -> (Result<AgentRun, WorkflowError>, Spent) {
        let mut spent = Spent::default();
        let r = self
            .conversation_in_span(ctx, vec![Message::user(task)], &mut spent)
            .await;
        (r, spent)
    }

    /// [`Agent::run_conversation`], also telling what its model calls cost when it fails (see
    /// [`Agent::run_metered`]).
    pub async fn run_conversation_metered(
        &self,
        ctx: &WorkflowContext,
        messages: Vec<Message>,
    ) -> (Result<AgentRun, WorkflowError>, Spent) {
        let mut spent = Spent::default();
        let r = self.conversation_in_span(ctx, messages, &mut spent).await;
        (r, spent)
    }

    /// Runs the agent on a conversation (e.g. one handed over by another agent) until it
    /// answers.
    pub async fn run_conversation(
        &self,
        ctx: &WorkflowContext,
        messages: Vec<Message>,
    ) -> Result<AgentRun, WorkflowError> {
        self.conversation_in_span(ctx, messages, &mut Spent::default())
            .await
    }

    /// The conversation in its `agent` span, adding what each model call cost to `spent` as
    /// it is made (or replayed).
    async fn conversation_in_span(
        &self,
        ctx: &WorkflowContext,
        messages: Vec<Message>,
        spent: &mut Spent,
    ) -> Result<AgentRun, WorkflowError> {
        let span = tracing::info_span!(
            "agent",
            otel.name = format!("invoke_agent {}", self.name),
            gen_ai.operation.name = "invoke_agent",
            gen_ai.agent.name = self.name.as_str(),
            cairn.run_id = %ctx.run_id(),
            otel.status_code = Empty,
            exception.message = Empty,
        );
        let record = span.clone();
        let r = self
            .conversation(ctx, messages, spent)
            .instrument(span)
            .await;
        // A stop (shutdown, suspension) is not the agent's error.
        if let Err(e) = &r
            && !matches!(e, WorkflowError::Interrupted(_))
        {
            record.record("otel.status_code", "ERROR");
            record.record("exception.message", tracing::field::display(e));
        }
        r
    }

    async fn conversation(
        &self,
        ctx: &WorkflowContext,
        mut messages: Vec<Message>,
        spent: &mut Spent,
    ) -> Result<AgentRun, WorkflowError> {
        let scope = ctx.scope(&format!("agent:{}", self.name)).await?;
        let mut usage = Usage::default();
        let mut cost: Option<f64> = None;
        let (mut tool_calls, mut tool_errors) = (0u32, 0u32);
        let opts = StepOptions::retry(self.retry.clone());
        for turn in 1..=self.max_turns {
            let request = ModelRequest {
                model: self.model_id.clone(),
                system: self.system.clone(),
                messages: messages.clone(),
                tools: self.tools.specs(),
                tool_choice: (!self.tools.is_empty()).then_some(ToolChoice::Auto),
                max_tokens: self.max_tokens,
                temperature: self.temperature,
            };
            if let Some(b) = &self.budget {
                b.check(&scope).await?;
            }
            let call: ModelCall = scope
                .step_with("model", opts.clone(), || {
                    self.call_model(ctx.run_id(), request.clone())
                })
                .await?;
            // A recorded answer belongs to the request it answered: if today's code builds a
            // different request at this turn (prompt, tools or conversation changed), reusing
            // it would be silent divergence.
            let rebuilt = request.hash();
            if call.request_hash != rebuilt {
                return Err(WorkflowError::Interrupted(Interrupt::NonDeterminism {
                    run: ctx.run_id(),
                    path: StepPath::root(),
                    recorded: format!(
                        "agent `{}` turn {turn}: a model call for request {}",
                        self.name, call.request_hash
                    ),
                    found: format!(
                        "request {rebuilt} (the system prompt, tools, model or conversation changed)"
                    ),
                }));
            }
            if let Some(b) = &self.budget {
                b.add(&call.response.usage, call.cost_usd);
            }
            usage = usage + call.response.usage;
            if let Some(c) = call.cost_usd {
                cost = Some(cost.unwrap_or(0.0) + c);
            }
            *spent = Spent {
                usage,
                cost_usd: cost,
            };
            let response = call.response;
            messages.push(Message {
                role: Role::Assistant,
                content: response.content.clone(),
            });
            let uses: Vec<(String, String, serde_json::Value)> = response
                .tool_uses()
                .map(|(id, name, input)| (id.to_string(), name.to_string(), input.clone()))
                .collect();
            if response.stop_reason != StopReason::ToolUse || uses.is_empty() {
                return Ok(AgentRun {
                    agent: self.name.clone(),
                    text: response.text(),
                    messages,
                    stop_reason: response.stop_reason,
                    turns: turn,
                    tool_calls,
                    tool_errors,
                    usage,
                    cost_usd: cost,
                });
            }
            // Positions are taken in the order of the model's blocks, then the calls run
            // concurrently: replay stays deterministic.
            let asked = uses.clone();
            let calls: Vec<_> = uses
                .into_iter()
                .map(|(id, name, input)| {
                    let tools = self.tools.clone();
                    // A tool that must not run twice gets an at-most-once step: a call
                    // interrupted by a crash parks the run for review.
                    let opts = match self.tools.get(&name) {
                        Some(t) if !t.idempotent() => StepOptions::default().at_most_once(),
                        _ => StepOptions::default(),
                    };
                    let mut call = Some((tools, id, name.clone(), input));
                    scope.step_with(&format!("tool:{name}"), opts, move || {
                        let call = call.take();
                        async move {
                            match call {
                                Some((t, i, n, input)) => run_tool(t, i, n, input)
                                    .await
                                    .and_then(|c| serde_json::to_value(c).map_err(StepError::from)),
                                None => Err(StepError::msg("a tool call runs once per execution")),
                            }
                        }
                    })
                })
                .collect();
            let mut results = Vec::new();
            for (r, (id, name, input)) in join_all(calls).await.into_iter().zip(asked) {
                let recorded: serde_json::Value = r?;
                // A call resolved by a person (`cairn review … --done --output JSON`) records
                // the tool's output itself rather than a whole call record.
                let call =
                    serde_json::from_value::<ToolCall>(recorded.clone()).unwrap_or(ToolCall {
                        id,
                        tool: name,
                        input,
                        output: Some(recorded),
                        error: None,
                        latency_ms: 0,
                    });
                tool_calls += 1;
                let (content, is_error) = match (&call.output, &call.error) {
                    (_, Some(e)) => {
                        tool_errors += 1;
                        (e.clone(), true)
                    }
                    (Some(v), None) => (
                        match v {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        },
                        false,
                    ),
                    (None, None) => ("null".to_string(), false),
                };
                results.push(Block::ToolResult {
                    tool_use_id: call.id,
                    content,
                    is_error,
                });
            }
            messages.push(Message {
                role: Role::User,
                content: results,
            });
        }
        Err(WorkflowError::msg(format!(
            "agent `{}` used all {} turns without finishing; raise max_turns or check its tools",
            self.name, self.max_turns
        )))
    }

    /// One live model call (a `model` step's attempt), in a `chat` span with the GenAI
    /// attributes; ends with a `cairn::metrics` event (`agent_call`) for the CLI's metrics log.
    async fn call_model(
        &self,
        run_id: RunId,
        request: ModelRequest,
    ) -> Result<ModelCall, StepError> {
        let span = tracing::info_span!(
            "chat",
            otel.name = format!("chat {}", request.model),
            otel.kind = "client",
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = self.model.provider(),
            // The older name of `gen_ai.provider.name`, still read by some backends.
            gen_ai.system = self.model.provider(),
            gen_ai.request.model = request.model.as_str(),
            gen_ai.request.max_tokens = i64::from(request.max_tokens),
            gen_ai.request.temperature = request.temperature.map(f64::from),
            gen_ai.agent.name = self.name.as_str(),
            cairn.run_id = %run_id,
            gen_ai.response.model = Empty,
            gen_ai.response.id = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            cairn.cost_usd = Empty,
            error.type = Empty,
            otel.status_code = Empty,
            exception.message = Empty,
        );
        let started = Instant::now();
        let request_hash = request.hash();
        let answer = self
            .model
            .call(request.clone())
            .instrument(span.clone())
            .await;
        let latency_ms = started.elapsed().as_millis() as u64;
        match answer {
            Ok(response) => {
                let cost_usd = self.price.map(|p| p.cost(&response.usage));
                let u = &response.usage;
                // As the GenAI conventions count it (and `cairn trace`): cached input included.
                let input_tokens =
                    u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens;
                span.record("gen_ai.response.model", response.model.as_str());
                if !response.id.is_empty() {
                    span.record("gen_ai.response.id", response.id.as_str());
                }
                // Signed: tracing-opentelemetry records unsigned fields as strings.
                span.record("gen_ai.usage.input_tokens", signed(input_tokens));
                span.record("gen_ai.usage.output_tokens", signed(u.output_tokens));
                span.record(
                    "gen_ai.response.finish_reasons",
                    stop_reason_name(&response.stop_reason),
                );
                if let Some(c) = cost_usd {
                    span.record("cairn.cost_usd", c);
                }
                tracing::info!(
                    target: "cairn::metrics",
                    parent: &span,
                    run_id = %run_id,
                    agent = self.name.as_str(),
                    model = response.model.as_str(),
                    input_tokens,
                    output_tokens = u.output_tokens,
                    latency_ms,
                    tool_calls = response.tool_uses().count() as u64,
                    success = true,
                    cost_usd,
                    "agent_call"
                );
                Ok(ModelCall {
                    agent: self.name.clone(),
                    provider: self.model.provider().to_string(),
                    request_hash,
                    cost_usd,
                    request,
                    response,
                    latency_ms,
                })
            }
            Err(e) => {
                span.record("error.type", error_kind_name(&e.kind));
                span.record("otel.status_code", "ERROR");
                span.record("exception.message", e.message.as_str());
                tracing::info!(
                    target: "cairn::metrics",
                    parent: &span,
                    run_id = %run_id,
                    agent = self.name.as_str(),
                    model = request.model.as_str(),
                    input_tokens = 0u64,
                    output_tokens = 0u64,
                    latency_ms,
                    tool_calls = 0u64,
                    success = false,
                    error = e.message.as_str(),
                    "agent_call"
                );
                Err(if e.is_retryable() {
                    match e.retry_after() {
                        Some(d) => StepError::retryable_after(e.to_string(), d),
                        None => StepError::retryable(e.to_string()),
                    }
                } else {
                    StepError::msg(e.to_string())
                })
            }
        }
    }
}

/// A count as a signed span field (OpenTelemetry integers are i64).
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `finish_reasons` as the provider-neutral names cairn records.
fn stop_reason_name(r: &StopReason) -> &str {
    match r {
        StopReason::EndTurn => "end_turn",
        StopReason::ToolUse => "tool_use",
        StopReason::MaxTokens => "max_tokens",
        StopReason::StopSequence => "stop_sequence",
        StopReason::Refusal => "refusal",
        StopReason::Other(s) => s,
    }
}

/// `error.type` of a failed model call.
fn error_kind_name(k: &ModelErrorKind) -> &'static str {
    match k {
        ModelErrorKind::RateLimited => "rate_limited",
        ModelErrorKind::Overloaded => "overloaded",
        ModelErrorKind::Server => "server",
        ModelErrorKind::Network => "network",
        ModelErrorKind::Malformed => "malformed",
        ModelErrorKind::Auth => "auth",
        ModelErrorKind::BadRequest => "bad_request",
        ModelErrorKind::SpendLimit => "spend_limit",
    }
}

/// Runs one tool call; any failure becomes an error result for the model, not a failed step.
async fn run_tool(
    tools: ToolRegistry,
    id: String,
    name: String,
    input: serde_json::Value,
) -> Result<ToolCall, StepError> {
    let span = tracing::info_span!(
        "execute_tool",
        otel.name = format!("execute_tool {name}"),
        gen_ai.operation.name = "execute_tool",
        gen_ai.tool.name = name.as_str(),
        gen_ai.tool.type = "function",
        gen_ai.tool.call.id = id.as_str(),
        error.type = Empty,
        otel.status_code = Empty,
        exception.message = Empty,
    );
    let started = Instant::now();
    let result = match tools.get(&name) {
        None => Err(format!(
            "unknown tool `{name}`; the available tools are: {}",
            tools.names().join(", ")
        )),
        Some(t) => t
            .call(input.clone())
            .instrument(span.clone())
            .await
            .map_err(|e| e.0),
    };
    let latency_ms = started.elapsed().as_millis() as u64;
    if let Err(e) = &result {
        // Sent back to the model (the step succeeds), but the call failed.
        span.record("error.type", "tool_error");
        span.record("otel.status_code", "ERROR");
        span.record("exception.message", e.as_str());
    }
    let (output, error) = match result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    Ok(ToolCall {
        id,
        tool: name,
        input,
        output,
        error,
        latency_ms,
    })
}
