//! Orchestration patterns on top of [`Agent`]: a [`Router`] that classifies a task with a cheap
//! model and dispatches it to a registered agent, and handoffs from one agent to another with
//! the full conversation or a model-written summary.
//!
//! Every decision is recorded: the router's classification call and a `route` step with the
//! chosen category and agent; a handoff's `handoff` step holds from, to, mode, reason and the
//! exact messages passed on. On resume they are answered from the log, so a replayed run takes
//! the same route and hands over the same context.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_engine::{StepError, WorkflowContext, WorkflowError};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing::field::Empty;

use crate::agent::{Agent, AgentRun, Spent};
use crate::model::{Block, Message, Model, Role};

/// A task routed to an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Routed {
    /// The category chosen.
    pub category: String,
    /// The agent that handled the task.
    pub agent: String,
    /// Whether the fallback agent handled it (the classifier's answer matched no category).
    pub fallback: bool,
    /// The classifier's raw answer.
    pub classifier_answer: String,
    /// The classification call (its usage and cost count toward the run).
    pub classification: AgentRun,
    /// The chosen agent's run.
    pub run: AgentRun,
}

/// The router's recorded decision (output of its `route` step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RouteDecision {
    category: String,
    agent: String,
    fallback: bool,
    classifier_answer: String,
}

/// Classifies a task with a (cheap) model into one of its categories and runs that category's
/// agent; an answer that names no category goes to the fallback agent, or fails clearly.
#[derive(Clone)]
pub struct Router {
    name: String,
    classifier: Agent,
    routes: BTreeMap<String, (String, Agent)>,
    fallback: Option<Agent>,
}

impl Router {
    /// A router named `name` that classifies with `model_id` through `model` (a small, cheap
    /// model is enough: it answers with one word).
    pub fn new(name: &str, model: Arc<dyn Model>, model_id: &str) -> Self {
        Router {
            name: name.to_string(),
            classifier: Agent::new(&format!("{name}.classifier"), model, model_id).max_tokens(16),
            routes: BTreeMap::new(),
            fallback: None,
        }
    }

    /// The same router with the classifier model's prices, so classifications record their
    /// cost.
    pub fn price(mut self, price: crate::agent::Price) -> Self {
        self.classifier = self.classifier.price(price);
        self
    }

    /// The same router with its classifier drawing on a run budget.
    pub fn budget(mut self, budget: std::sync::Arc<crate::budget::Budget>) -> Self {
        self.classifier = self.classifier.budget(budget);
        self
    }

    /// Adds a category: its name, what it covers (for the classifier), and its agent.
    pub fn route(mut self, category: &str, description: &str, agent: Agent) -> Self {
        self.routes
            .insert(category.to_string(), (description.to_string(), agent));
        self
    }

    /// The agent for answers that match no category.
    pub fn fallback(mut self, agent: Agent) -> Self {
        self.fallback = Some(agent);
        self
    }

    fn system_prompt(&self) -> String {
        let mut s = String::from("Classify the task into exactly one of these categories:\n");
        for (name, (description, _)) in &self.routes {
            s.push_str(&format!("- {name}: {description}\n"));
        }
        s.push_str("Reply with ONLY the category name.");
        s
    }

    /// Classifies `task` and runs the chosen agent on it.
    pub async fn run(&self, ctx: &WorkflowContext, task: &str) -> Result<Routed, WorkflowError> {
        self.run_metered(ctx, task).await.0
    }

    /// [`Router::run`], also telling what its model calls (the classifier's and the chosen
    /// agent's) cost when it fails: they were paid for too.
    pub async fn run_metered(
        &self,
        ctx: &WorkflowContext,
        task: &str,
    ) -> (Result<Routed, WorkflowError>, Spent) {
        // A `route` span around the classification and the chosen agent's run, with the
        // decision recorded once it is known.
        let span = tracing::info_span!(
            "route",
            cairn.run_id = %ctx.run_id(),
            cairn.router = self.name.as_str(),
            cairn.route.category = Empty,
            cairn.route.agent = Empty,
            cairn.route.fallback = Empty,
            otel.status_code = Empty,
            exception.message = Empty,
        );
        let record = span.clone();
        let mut spent = Spent::default();
        let r = self
            .classify_and_run(ctx, task, &record, &mut spent)
            .instrument(span)
            .await;
        mark_error(&record, &r);
        (r, spent)
    }

    async fn classify_and_run(
        &self,
        ctx: &WorkflowContext,
        task: &str,
        span: &tracing::Span,
        spent: &mut Spent,
    ) -> Result<Routed, WorkflowError> {
        let scope = ctx.scope(&format!("router:{}", self.name)).await?;
        let classifier = self.classifier.clone().system(&self.system_prompt());
        let (classification, cost) = classifier.run_metered(&scope, task).await;
        *spent += cost;
        let classification = classification?;
        let answer = classification.text.clone();
        let wanted = normalize(&answer);
        let category = self.routes.keys().find(|k| normalize(k) == wanted).cloned();
        let decision = match (&category, &self.fallback) {
            (Some(c), _) => {
                let agent = self.routes[c].1.name().to_string();
                RouteDecision {
                    category: c.clone(),
                    agent,
                    fallback: false,
                    classifier_answer: answer.clone(),
                }
            }
            (None, Some(f)) => RouteDecision {
                category: wanted.clone(),
                agent: f.name().to_string(),
                fallback: true,
                classifier_answer: answer.clone(),
            },
            (None, None) => {
                return Err(WorkflowError::msg(format!(
                    "router `{}`: the classifier answered `{}`, which is none of {}; add a fallback agent or a category",
                    self.name,
                    answer.trim(),
                    self.routes.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        };
        let d = decision.clone();
        let decision: RouteDecision = scope
            .step("route", move || async move { Ok::<_, StepError>(d) })
            .await?;
        span.record("cairn.route.category", decision.category.as_str());
        span.record("cairn.route.agent", decision.agent.as_str());
        span.record("cairn.route.fallback", decision.fallback);
        let agent = if decision.fallback {
            self.fallback.as_ref()
        } else {
            self.routes.get(&decision.category).map(|(_, a)| a)
        };
        let Some(agent) = agent else {
            return Err(WorkflowError::msg(format!(
                "router `{}`: the recorded route `{}` is no longer registered",
                self.name, decision.category
            )));
        };
        let (run, cost) = agent.run_metered(&scope, task).await;
        *spent += cost;
        let run = run?;
        Ok(Routed {
            category: decision.category,
            agent: decision.agent,
            fallback: decision.fallback,
            classifier_answer: decision.classifier_answer,
            classification,
            run,
        })
    }
}

/// A category name or answer reduced to lowercase letters, digits and dashes.
fn normalize(s: &str) -> String {
    s.trim()
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase()
        .chars()
        .map(|c| if c == '_' || c == ' ' { '-' } else { c })
        .filter(|c| c.is_alphanumeric() || *c == '-')
        .collect()
}

/// How a conversation is passed to the next agent.
#[derive(Clone)]
pub enum HandoffMode {
    /// The whole conversation, as it is.
    Full,
    /// A summary written by a (cheap) model, at most `max_tokens` long.
    Summary {
        /// The summarizing model.
        model: Arc<dyn Model>,
        /// Its model id.
        model_id: String,
        /// The summary's token limit.
        max_tokens: u32,
        /// Its price, if known: the summary's cost is then recorded and budgeted.
        price: Option<crate::agent::Price>,
    },
}

/// What a handoff passed on (output of its `handoff` step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HandoffRecord {
    /// The agent handing over.
    pub from: String,
    /// The agent taking over.
    pub to: String,
    /// `full` or `summary`.
    pub mode: String,
    /// Why.
    pub reason: String,
    /// The exact messages the next agent starts from.
    pub context: Vec<Message>,
    /// Tokens of the summarizer's call (a summary handoff), so a run's spending counts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_usage: Option<crate::model::Usage>,
    /// Dollars of the summarizer's call, when its model is priced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_cost_usd: Option<f64>,
}

/// Marks a span as failed (OpenTelemetry: ERROR status and the exception) when `r` is an error
/// other than a stop (shutdown, suspension, cancellation).
fn mark_error<T>(span: &tracing::Span, r: &Result<T, WorkflowError>) {
    if let Err(e) = r
        && !matches!(e, WorkflowError::Interrupted(_))
    {
        span.record("otel.status_code", "ERROR");
        span.record("exception.message", tracing::field::display(e));
    }
}

/// Hands `from`'s conversation to `to` (in full, or summarized) and runs `to` on it.
pub async fn handoff(
    ctx: &WorkflowContext,
    from: &AgentRun,
    to: &Agent,
    mode: HandoffMode,
    reason: &str,
) -> Result<(HandoffRecord, AgentRun), WorkflowError> {
    handoff_metered(ctx, from, to, mode, reason).await.0
}

/// [`handoff`], also telling what its model calls (the summary's and the next agent's) cost
/// when it fails: they were paid for too.
pub async fn handoff_metered(
    ctx: &WorkflowContext,
    from: &AgentRun,
    to: &Agent,
    mode: HandoffMode,
    reason: &str,
) -> (Result<(HandoffRecord, AgentRun), WorkflowError>, Spent) {
    let span = tracing::info_span!(
        "handoff",
        cairn.run_id = %ctx.run_id(),
        cairn.handoff.from = from.agent.as_str(),
        cairn.handoff.to = to.name(),
        cairn.handoff.mode = match &mode {
            HandoffMode::Full => "full",
            HandoffMode::Summary { .. } => "summary",
        },
        cairn.handoff.reason = reason,
        otel.status_code = Empty,
        exception.message = Empty,
    );
    // A `handoff` span around the summary (if any) and the next agent's run.
    let record = span.clone();
    let mut spent = Spent::default();
    let r = hand_over(ctx, from, to, mode, reason, &mut spent)
        .instrument(span)
        .await;
    mark_error(&record, &r);
    (r, spent)
}

async fn hand_over(
    ctx: &WorkflowContext,
    from: &AgentRun,
    to: &Agent,
    mode: HandoffMode,
    reason: &str,
    spent: &mut Spent,
) -> Result<(HandoffRecord, AgentRun), WorkflowError> {
    let scope = ctx
        .scope(&format!("handoff:{}->{}", from.agent, to.name()))
        .await?;
    let intro = format!(
        "You are taking over from agent `{}` ({reason}). Continue the task.",
        from.agent
    );
    let (mode_name, context, summary) = match &mode {
        HandoffMode::Full => {
            let mut msgs = from.messages.clone();
            msgs.push(Message::user(intro));
            ("full", msgs, None)
        }
        HandoffMode::Summary {
            model,
            model_id,
            max_tokens,
            price,
        } => {
            let mut summarizer = Agent::new(&format!("{}.summarizer", from.agent), model.clone(), model_id)
                .system("Summarize the key findings and decisions of this conversation for the agent taking over. Be concise.")
                .max_tokens(*max_tokens);
            if let Some(p) = price {
                summarizer = summarizer.price(*p);
            }
            // The summary is paid from the same budget as the agent it is for.
            if let Some(b) = to.budget_handle() {
                summarizer = summarizer.budget(Arc::clone(b));
            }
            let (summary, cost) = summarizer
                .run_metered(&scope, &transcript(&from.messages))
                .await;
            *spent += cost;
            let summary = summary?;
            (
                "summary",
                vec![Message::user(format!(
                    "{intro}\nSummary of the work so far:\n{}",
                    summary.text
                ))],
                Some((summary.usage, summary.cost_usd)),
            )
        }
    };
    let record = HandoffRecord {
        from: from.agent.clone(),
        to: to.name().to_string(),
        mode: mode_name.to_string(),
        reason: reason.to_string(),
        context,
        summary_usage: summary.map(|(u, _)| u),
        summary_cost_usd: summary.and_then(|(_, c)| c),
    };
    let r = record.clone();
    let record: HandoffRecord = scope
        .step("handoff", move || async move { Ok::<_, StepError>(r) })
        .await?;
    let (run, cost) = to
        .run_conversation_metered(&scope, record.context.clone())
        .await;
    *spent += cost;
    Ok((record, run?))
}

/// A conversation as plain text, for a summarizer.
fn transcript(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        let who = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        for b in &m.content {
            match b {
                Block::Text { text } => out.push_str(&format!("{who}: {text}\n")),
                Block::ToolUse { name, input, .. } => {
                    out.push_str(&format!("{who} called {name}({input})\n"))
                }
                Block::ToolResult {
                    content, is_error, ..
                } => {
                    let tag = if *is_error {
                        "tool error"
                    } else {
                        "tool result"
                    };
                    out.push_str(&format!("{tag}: {content}\n"))
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_normalized_before_matching() {
        assert_eq!(normalize(" Billing.\n"), "billing");
        assert_eq!(normalize("\"code_review\""), "code-review");
        assert_eq!(normalize("Security Scan"), "security-scan");
    }
}
