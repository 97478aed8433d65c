//! The workflows built into the `cairn` binary: the demo batch analysis, the `steps`
//! workload used by benchmarks and crash tests, the scheduler workloads, and `agent` (one
//! durable LLM agent with two built-in tools).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_engine::{Registry, StepError, WorkflowError};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Live progress of the demo, shared between the workflow and the progress display.
#[derive(Default)]
pub struct Progress {
    /// Items finished (replayed or executed) in this process.
    pub items_done: AtomicU64,
    /// Items whose steps were all answered from the log.
    pub items_replayed: AtomicU64,
    /// Total items of the run.
    pub items_total: AtomicU64,
}

/// The demo's input.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoInput {
    /// How many tickets to analyse.
    #[serde(default = "default_items")]
    pub items: u32,
    /// How long each step works, in milliseconds (so the run can be interrupted).
    #[serde(default = "default_step_ms")]
    pub step_ms: u64,
}

fn default_items() -> u32 {
    300
}
fn default_step_ms() -> u64 {
    5
}

const SUBJECTS: [&str; 8] = [
    "cannot log in after password reset",
    "charged twice for the annual plan",
    "export to CSV times out on large projects",
    "feature request: dark mode for the dashboard",
    "API returns 500 when the payload has unicode",
    "refund still not received after two weeks",
    "invite link expired before my colleague used it",
    "mobile app crashes when opening notifications",
];
const TONES: [&str; 4] = ["calm", "frustrated", "urgent", "polite"];

/// The synthetic ticket for item `i` (deterministic, so runs are comparable).
fn ticket(i: u32) -> serde_json::Value {
    let subject = SUBJECTS[(i as usize * 7 + 3) % SUBJECTS.len()];
    let tone = TONES[(i as usize * 5 + 1) % TONES.len()];
    json!({ "id": format!("T-{:05}", 1000 + i), "subject": subject, "tone": tone })
}

fn classify(subject: &str) -> &'static str {
    let s = subject.to_lowercase();
    if s.contains("charged") || s.contains("refund") || s.contains("plan") {
        "billing"
    } else if s.contains("log in") || s.contains("invite") || s.contains("password") {
        "account"
    } else if s.contains("request") {
        "feature"
    } else {
        "bug"
    }
}

async fn work(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// The `steps` workload's input.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepsInput {
    /// How many sequential steps.
    pub steps: u32,
    /// Roughly how many bytes each step's JSON output has.
    #[serde(default = "default_payload")]
    pub payload_bytes: usize,
    /// A file each step appends one line (`<index>\n`) to when it executes.
    #[serde(default)]
    pub side_effects: Option<String>,
    /// How long each step works, in milliseconds.
    #[serde(default)]
    pub step_ms: u64,
}

fn default_payload() -> usize {
    100
}

/// Registers the built-in workflows; `progress` receives the demo's progress.
pub fn registry(progress: Arc<Progress>) -> Registry {
    let mut r = Registry::new();
    // Runs of workflow files (`cairn run FILE`) resume, recover and fork like any other run.
    cairn_agents::spec::register_flows(&mut r, cairn_agents::spec::FlowEnv::new());
    r.register("demo", 1, move |ctx, input: DemoInput| {
        let progress = Arc::clone(&progress);
        async move {
            progress
                .items_total
                .store(u64::from(input.items), Ordering::Relaxed);
            let mut by_category = std::collections::BTreeMap::<String, u64>::new();
            let mut urgent = 0u64;
            let mut score_sum = 0u64;
            for i in 0..input.items {
                let replaying = ctx.is_replaying();
                let ms = input.step_ms;
                let t = ticket(i);
                let subject = t["subject"].as_str().unwrap_or_default().to_string();
                let tone = t["tone"].as_str().unwrap_or_default().to_string();
                let fetched: serde_json::Value = ctx
                    .step("fetch", || async move {
                        work(ms).await;
                        Ok(t)
                    })
                    .await?;
                let category: String = ctx
                    .step("classify", || async move {
                        work(ms).await;
                        Ok(classify(&subject).to_string())
                    })
                    .await?;
                let score: u64 = ctx
                    .step("score", || async move {
                        work(ms).await;
                        let base = match tone.as_str() {
                            "urgent" => 90,
                            "frustrated" => 70,
                            "calm" => 30,
                            _ => 20,
                        };
                        Ok(base + u64::from(i % 10))
                    })
                    .await?;
                let _ = fetched;
                *by_category.entry(category).or_default() += 1;
                if score >= 80 {
                    urgent += 1;
                }
                score_sum += score;
                progress.items_done.fetch_add(1, Ordering::Relaxed);
                if replaying {
                    progress.items_replayed.fetch_add(1, Ordering::Relaxed);
                }
            }
            let avg = if input.items == 0 {
                0.0
            } else {
                score_sum as f64 / f64::from(input.items)
            };
            Ok::<_, WorkflowError>(json!({
                "items": input.items,
                "by_category": by_category,
                "urgent": urgent,
                "avg_urgency": (avg * 100.0).round() / 100.0,
            }))
        }
    });
    r.register("steps", 1, |ctx, input: StepsInput| async move {
        let filler = "x".repeat(input.payload_bytes.saturating_sub(40));
        let mut checksum = 0u64;
        for i in 0..input.steps {
            let side = input.side_effects.clone();
            let filler = filler.clone();
            let ms = input.step_ms;
            let v: serde_json::Value = ctx
                .step("step", move || async move {
                    work(ms).await;
                    if let Some(path) = side {
                        let mut f = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path)
                            .map_err(|e| StepError::msg(format!("side-effect file {path}: {e}")))?;
                        // One write for the whole line, so a kill cannot leave half of it.
                        f.write_all(format!("{i}\n").as_bytes())?;
                    }
                    Ok(json!({ "i": i, "square": u64::from(i) * u64::from(i), "pad": filler }))
                })
                .await?;
            checksum = checksum.wrapping_add(v["square"].as_u64().unwrap_or(0));
        }
        Ok::<_, WorkflowError>(json!({ "steps": input.steps, "checksum": checksum }))
    });
    register_scheduler_workloads(&mut r);
    register_agent_workflow(&mut r);
    r
}

/// The `fanout` workload's input.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanoutInput {
    /// How many branches.
    pub branches: u32,
    /// How many run at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// A file each branch appends `<index>\n` to when its step executes.
    #[serde(default)]
    pub side_effects: Option<String>,
    /// How long each branch's step works, in milliseconds.
    #[serde(default)]
    pub step_ms: u64,
    /// Branches whose index is a multiple of this fail (0: none).
    #[serde(default)]
    pub fail_every: u32,
    /// At least this many branches must succeed (0: all must).
    #[serde(default)]
    pub min_required: u32,
}

fn default_concurrency() -> usize {
    32
}

/// The `flaky` workload's input: one step that fails `failures` times before it succeeds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlakyInput {
    /// A file counting attempts (one line per attempt): the step fails while it has fewer
    /// than `failures` lines.
    pub attempts_file: String,
    /// How many attempts fail.
    pub failures: u32,
    /// The first retry delay, in milliseconds (doubles each retry, no jitter).
    pub backoff_ms: u64,
}

/// The `sleepy` workload's input: a step, a durable sleep, a step.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepyInput {
    /// How long to sleep, in milliseconds.
    pub sleep_ms: u64,
}

/// The `approval` workload's input: a step, then a wait for the `approve` signal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalInput {
    /// How long to wait for the signal, in milliseconds (none: forever).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

fn append_line(path: &str, line: &str) -> Result<(), StepError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| StepError::msg(format!("side-effect file {path}: {e}")))?;
    // One write for the whole line, so a kill cannot leave half of it.
    f.write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}

/// Registers the workloads of the scheduler: fan-out, retries, sleeps and signals.
fn register_scheduler_workloads(r: &mut Registry) {
    use cairn_engine::{FanOutOptions, JoinPolicy, RetryPolicy, StepOptions};
    r.register("fanout", 1, |ctx, input: FanoutInput| async move {
        let join = if input.min_required > 0 {
            JoinPolicy::AtLeast(input.min_required)
        } else {
            JoinPolicy::All
        };
        let side = input.side_effects.clone();
        let (ms, fail_every) = (input.step_ms, input.fail_every);
        let fan = ctx
            .fan_out(
                "branches",
                (0..input.branches).collect(),
                FanOutOptions::new(input.concurrency).join(join),
                move |b, i: u32| {
                    let side = side.clone();
                    async move {
                        b.step("work", move || async move {
                            work(ms).await;
                            if let Some(path) = side {
                                append_line(&path, &i.to_string())?;
                            }
                            if fail_every > 0 && i.is_multiple_of(fail_every) {
                                return Err(StepError::msg(format!("item {i} is malformed")));
                            }
                            Ok(u64::from(i) * u64::from(i))
                        })
                        .await
                    }
                },
            )
            .await?;
        let sum: u64 = fan.successes().map(|(_, v)| *v).sum();
        let failed: Vec<usize> = fan.failures().map(|(i, _)| i).collect();
        Ok::<_, WorkflowError>(json!({
            "branches": input.branches,
            "succeeded": fan.successes().count(),
            "failed": failed.len(),
            "sum": sum,
        }))
    });
    r.register("flaky", 1, |ctx, input: FlakyInput| async move {
        let policy = RetryPolicy::exponential(input.failures + 1)
            .with_initial_delay(Duration::from_millis(input.backoff_ms))
            .with_max_delay(Duration::from_secs(3600))
            .with_jitter(false);
        let file = input.attempts_file.clone();
        let failures = input.failures;
        let attempts: u32 = ctx
            .step_with("call", StepOptions::retry(policy), move || {
                let file = file.clone();
                async move {
                    append_line(&file, "attempt")?;
                    let n = std::fs::read_to_string(&file)
                        .map(|t| t.lines().count() as u32)
                        .unwrap_or(0);
                    if n <= failures {
                        return Err(StepError::retryable(format!(
                            "503 service unavailable (attempt {n})"
                        )));
                    }
                    Ok(n)
                }
            })
            .await?;
        Ok::<_, WorkflowError>(json!({ "attempts": attempts }))
    });
    r.register("sleepy", 1, |ctx, input: SleepyInput| async move {
        let before = ctx.now().await?;
        ctx.step("before", || async { Ok(()) }).await?;
        ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        let after = ctx.now().await?;
        Ok::<_, WorkflowError>(json!({
            "slept_ms": (after - before).num_milliseconds(),
        }))
    });
    r.register("approval", 1, |ctx, input: ApprovalInput| async move {
        let draft: String = ctx
            .step("draft", || async {
                Ok("refund T-1042 for 40 EUR".to_string())
            })
            .await?;
        let decision: Option<serde_json::Value> = ctx
            .wait_signal("approve", input.timeout_ms.map(Duration::from_millis))
            .await?;
        Ok::<_, WorkflowError>(json!({ "draft": draft, "decision": decision }))
    });
}

// ---- the `agent` workflow ----

/// The model provider of an `agent` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// The Anthropic Messages API (or anything speaking it at `base_url`).
    Anthropic,
    /// An OpenAI-compatible chat completions endpoint (OpenAI, vLLM, llama.cpp, Ollama).
    Openai,
    /// Answers from a JSON-lines script (`script`), offline.
    Scripted,
}

/// The `agent` workflow's input.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentInput {
    /// Which provider answers.
    pub provider: Provider,
    /// Where the provider listens (default: the provider's public API).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The provider's model id, e.g. `claude-haiku-4-5`.
    pub model: String,
    /// The task: the first user message.
    pub task: String,
    /// A system prompt (default: none).
    #[serde(default)]
    pub system: Option<String>,
    /// The most model calls the agent makes (default: the agent layer's default).
    #[serde(default)]
    pub max_turns: Option<u32>,
    /// For `scripted`: the JSON-lines script (see `ScriptedModel::from_jsonl`).
    #[serde(default)]
    pub script: Option<String>,
}

/// The name of the agent the `agent` workflow runs (its steps sit in the scope `agent:<name>`).
pub const AGENT_NAME: &str = "assistant";

/// The key sent to a loopback Anthropic endpoint when `ANTHROPIC_API_KEY` is not set.
pub const LOOPBACK_PLACEHOLDER_KEY: &str = "test-key";

/// The retry policy of the `agent` workflow's model calls: 5 attempts, exponential backoff from
/// 200 ms (jittered, at most 10 s); a server's `retry-after` is honoured when it is longer.
pub fn agent_retry() -> cairn_engine::RetryPolicy {
    cairn_engine::RetryPolicy::exponential(5)
        .with_initial_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
}

/// Whether `url`'s host is a loopback address (`localhost`, `127.0.0.0/8`, `[::1]`).
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(r) => r.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The synthetic support ticket `lookup_ticket` returns for `id` (deterministic).
pub fn lookup_ticket(id: &str) -> serde_json::Value {
    let h = id.bytes().fold(0usize, |h, b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    let subject = SUBJECTS[h % SUBJECTS.len()];
    let tone = TONES[(h / SUBJECTS.len()) % TONES.len()];
    json!({
        "id": id,
        "subject": subject,
        "tone": tone,
        "category": classify(subject),
        "customer": format!("customer-{:04}", h % 10_000),
    })
}

/// The number of whitespace-separated words in `text`, as `word_count` counts them.
pub fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// A built-in tool: a synchronous function of the JSON arguments.
struct BuiltinTool {
    name: &'static str,
    description: &'static str,
    schema: serde_json::Value,
    f: fn(&serde_json::Value) -> Result<serde_json::Value, String>,
}

impl cairn_agents::Tool for BuiltinTool {
    fn name(&self) -> &str {
        self.name
    }

    fn description(&self) -> &str {
        self.description
    }

    fn input_schema(&self) -> serde_json::Value {
        self.schema.clone()
    }

    fn call(
        &self,
        input: serde_json::Value,
    ) -> cairn_storage::BoxFuture<'_, Result<serde_json::Value, cairn_agents::ToolError>> {
        let r = (self.f)(&input).map_err(cairn_agents::ToolError);
        Box::pin(async move { r })
    }
}

/// The schema of an object with one required string property.
fn one_string_schema(prop: &str, description: &str) -> serde_json::Value {
    json!({
        "type": "object",
        "properties": { prop: { "type": "string", "description": description } },
        "required": [prop],
    })
}

/// The `agent` workflow's tools: `lookup_ticket {id}` (a synthetic ticket) and
/// `word_count {text}` (a count), both deterministic.
pub fn agent_tools() -> cairn_agents::ToolRegistry {
    let lookup = BuiltinTool {
        name: "lookup_ticket",
        description: "Looks up a support ticket by id (e.g. T-01042): subject, tone, category, \
                      customer.",
        schema: one_string_schema("id", "The ticket id."),
        f: |v| match v.get("id").and_then(serde_json::Value::as_str) {
            Some(id) => Ok(lookup_ticket(id)),
            None => Err(format!(
                "bad arguments for `lookup_ticket`: expected {{\"id\": string}}, got {v}"
            )),
        },
    };
    let count = BuiltinTool {
        name: "word_count",
        description: "Counts the words (whitespace-separated) of a text.",
        schema: one_string_schema("text", "The text to count."),
        f: |v| match v.get("text").and_then(serde_json::Value::as_str) {
            Some(t) => Ok(json!(word_count(t))),
            None => Err(format!(
                "bad arguments for `word_count`: expected {{\"text\": string}}, got {v}"
            )),
        },
    };
    cairn_agents::ToolRegistry::new()
        .with(Arc::new(lookup))
        .with(Arc::new(count))
}

/// Model clients of the `agent` workflow, one per provider and base URL, so the runs of one
/// process share an HTTP connection pool.
#[derive(Default)]
pub struct AgentModels {
    by_endpoint: std::sync::Mutex<std::collections::HashMap<String, Arc<dyn cairn_agents::Model>>>,
}

impl AgentModels {
    /// Makes `model` the client of `provider` at `base_url` (e.g. a bench's own client with a
    /// placeholder key), instead of one built from the environment.
    pub fn set(
        &self,
        provider: Provider,
        base_url: Option<&str>,
        model: Arc<dyn cairn_agents::Model>,
    ) {
        self.by_endpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(endpoint_key(provider, base_url), model);
    }

    /// The model client for `input` (a scripted model is read afresh each time).
    fn get(&self, input: &AgentInput) -> Result<Arc<dyn cairn_agents::Model>, String> {
        use cairn_agents::{AnthropicModel, OpenAiModel, ScriptedModel};
        let env = |var: &str| {
            std::env::var(var)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if input.provider == Provider::Scripted {
            let Some(path) = &input.script else {
                return Err(
                    "the scripted provider needs `script`: the path of a JSON-lines \
                            script of responses"
                        .into(),
                );
            };
            let m = ScriptedModel::from_jsonl(path).map_err(|e| e.to_string())?;
            return Ok(Arc::new(m));
        }
        let key = endpoint_key(input.provider, input.base_url.as_deref());
        let mut map = self
            .by_endpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = map.get(&key) {
            return Ok(Arc::clone(m));
        }
        let model: Arc<dyn cairn_agents::Model> = match input.provider {
            Provider::Anthropic => {
                let loopback = input.base_url.as_deref().is_some_and(is_loopback_url);
                let api_key = match env(AnthropicModel::API_KEY_ENV) {
                    Some(k) => k,
                    None if loopback => LOOPBACK_PLACEHOLDER_KEY.to_string(),
                    None => {
                        return Err(format!(
                            "{} is not set: export your Anthropic API key as {} (a loopback \
                             base_url gets the placeholder key `{LOOPBACK_PLACEHOLDER_KEY}`)",
                            AnthropicModel::API_KEY_ENV,
                            AnthropicModel::API_KEY_ENV
                        ));
                    }
                };
                let mut m = AnthropicModel::new(api_key);
                if let Some(url) = &input.base_url {
                    m = m.with_base_url(url);
                }
                Arc::new(m)
            }
            Provider::Openai => {
                let url = input
                    .base_url
                    .clone()
                    .unwrap_or_else(|| OpenAiModel::OPENAI_BASE_URL.to_string());
                if url == OpenAiModel::OPENAI_BASE_URL && env(OpenAiModel::API_KEY_ENV).is_none() {
                    return Err(format!(
                        "{} is not set: export your OpenAI API key as {}, or set base_url to \
                         a server that needs none",
                        OpenAiModel::API_KEY_ENV,
                        OpenAiModel::API_KEY_ENV
                    ));
                }
                Arc::new(OpenAiModel::new(url))
            }
            Provider::Scripted => unreachable!("handled above"),
        };
        map.insert(key, Arc::clone(&model));
        Ok(model)
    }
}

/// The key of a provider's client in [`AgentModels`].
fn endpoint_key(provider: Provider, base_url: Option<&str>) -> String {
    format!("{provider:?} {}", base_url.unwrap_or(""))
}

/// Registers `agent` with model clients from the environment.
fn register_agent_workflow(r: &mut Registry) {
    register_agent(r, Arc::default());
}

/// Registers `agent`: one agent with the built-in tools runs the task; the output is the
/// agent's run (final text, conversation, turns, tool calls, usage). Its model clients come
/// from `models`.
pub fn register_agent(r: &mut Registry, models: Arc<AgentModels>) {
    r.register("agent", 1, move |ctx, input: AgentInput| {
        let models = Arc::clone(&models);
        async move {
            let model = models.get(&input).map_err(WorkflowError::msg)?;
            let mut agent = cairn_agents::Agent::new(AGENT_NAME, model, &input.model)
                .tools(agent_tools())
                .retry(agent_retry());
            if let Some(s) = &input.system {
                agent = agent.system(s);
            }
            if let Some(n) = input.max_turns {
                agent = agent.max_turns(n);
            }
            let run: cairn_agents::AgentRun = agent.run(&ctx, &input.task).await?;
            Ok::<_, WorkflowError>(run)
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_recognised() {
        for u in [
            "http://127.0.0.1:8080",
            "http://localhost/v1",
            "http://[::1]:9/",
            "http://127.1.2.3",
            "https://user@LOCALHOST:1",
        ] {
            assert!(is_loopback_url(u), "{u}");
        }
        for u in [
            "https://api.anthropic.com",
            "http://10.0.0.1:80",
            "http://localhost.example.com",
            "http://[2001:db8::1]:80",
        ] {
            assert!(!is_loopback_url(u), "{u}");
        }
    }

    #[tokio::test]
    async fn builtin_tools_are_deterministic_and_report_bad_arguments() {
        let tools = agent_tools();
        assert_eq!(tools.names(), vec!["lookup_ticket", "word_count"]);
        let t = tools.get("lookup_ticket").unwrap();
        let a = t.call(json!({"id": "T-01042"})).await.unwrap();
        assert_eq!(a, t.call(json!({"id": "T-01042"})).await.unwrap());
        assert_eq!(a["id"], "T-01042");
        let subject = a["subject"].as_str().unwrap();
        assert_eq!(a["category"], classify(subject));
        let w = tools.get("word_count").unwrap();
        assert_eq!(w.call(json!({"text": " a b  c "})).await.unwrap(), json!(3));
        let e = w.call(json!({"txt": 1})).await.unwrap_err();
        assert!(e.0.contains("bad arguments for `word_count`"), "{e}");
    }
}
