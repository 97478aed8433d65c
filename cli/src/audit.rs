//! `cairn audit RUN`: what a run's agents did and cost (model calls, tokens, cost, latency,
//! tool calls, failures and retries, handoffs, routes, budget stops), and `cairn show RUN
//! --step PATH`: the full conversation of one agent, or one model or tool call.
//!
//! Both read the log only (the store opened read-only): model calls are the outputs of `model`
//! steps ([`ModelCall`]), tool calls those of `tool:<name>` steps ([`ToolCall`]), both inside a
//! scope step named `cairn.scope:agent:<name>`; handoffs are `handoff` steps
//! ([`HandoffRecord`]), routing decisions `route` steps, budget stops `budget_exhausted` steps
//! ([`BudgetExhausted`]).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_agents::{Block, BudgetExhausted, HandoffRecord, Message, ModelCall, Role, ToolCall};
use cairn_engine::{Event, StepPath};
use cairn_storage::{EventStore, RedbStore, RunId, RunMeta, StoredEvent};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};

use crate::commands::{UsageError, fmt_ts, open_ro};

/// The prefix of a scope step's name (`WorkflowContext::scope`).
const SCOPE_PREFIX: &str = "cairn.scope:";
/// The prefix of an agent's scope name (`Agent::run_conversation`).
const AGENT_SCOPE: &str = "cairn.scope:agent:";

// ---- helpers shared with `transfer` ----

/// Parses a run id; a malformed one is a usage error (exit 2).
pub(crate) fn parse_run_id(s: &str) -> Result<RunId> {
    s.parse::<RunId>()
        .map_err(|e| anyhow::Error::new(UsageError(e.to_string())))
}

/// The run's row, or an error naming the store and pointing at `cairn runs`.
pub(crate) async fn run_meta(store: &RedbStore, id: RunId) -> Result<RunMeta> {
    store.run(id).await?.with_context(|| {
        format!(
            "no run {id} in {}; list runs with `cairn runs`",
            store.path().display()
        )
    })
}

/// Reads a run's events from `from` page by page, up to (not including) `until` if given, and
/// calls `f` on each.
pub(crate) async fn each_event(
    store: &RedbStore,
    id: RunId,
    until: Option<u64>,
    mut f: impl FnMut(&StoredEvent) -> Result<()>,
) -> Result<()> {
    crate::commands::for_each_event(store, id, 0, |e| {
        if until.is_some_and(|u| e.seq.0 >= u) {
            return Ok(());
        }
        f(e)
    })
    .await
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The path one level up (`3.1` for `3.1.4`), or `None` for a top-level step.
fn parent(path: &StepPath) -> Option<StepPath> {
    let parts = path.parts();
    let (_, up) = parts.split_last()?;
    let mut p = StepPath::root();
    for &i in up {
        p = p.child(i);
    }
    Some(p)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A cost rounded to 1e-9 dollars, so sums print without float noise.
fn round_cost(c: f64) -> f64 {
    (c * 1e9).round() / 1e9
}

fn fmt_opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

// ---- cairn audit ----

/// Tokens of some calls.
#[derive(Default, Clone, Copy)]
struct Tokens {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
}

impl Tokens {
    fn add(&mut self, u: &cairn_agents::Usage) {
        self.input += u.input_tokens;
        self.output += u.output_tokens;
        self.cache_read += u.cache_read_input_tokens;
        self.cache_write += u.cache_creation_input_tokens;
    }

    fn total(&self) -> u64 {
        self.input + self.output + self.cache_read + self.cache_write
    }
}

/// What one agent (all its scopes in the run) did.
#[derive(Default)]
struct AgentStats {
    name: String,
    scopes: u64,
    calls: u64,
    tokens: Tokens,
    cost: Option<f64>,
    latencies: Vec<u64>,
    tool_calls: u64,
    tool_errors: u64,
    failed_attempts: u64,
    retries: u64,
    failures: u64,
    budget_stops: u64,
}

impl AgentStats {
    fn add_cost(&mut self, c: Option<f64>) {
        if let Some(c) = c {
            self.cost = Some(self.cost.unwrap_or(0.0) + c);
        }
    }
}

/// One tool of one agent.
struct ToolStats {
    agent: String,
    tool: String,
    calls: u64,
    errors: u64,
    latencies: Vec<u64>,
}

/// Everything `audit` gathers from a run's log.
#[derive(Default)]
struct Audit {
    /// Scope paths → scope names (without the `cairn.scope:` prefix).
    scopes: HashMap<StepPath, String>,
    agents: Vec<AgentStats>,
    agent_index: HashMap<String, usize>,
    tools: Vec<ToolStats>,
    tool_index: HashMap<(String, String), usize>,
    handoffs: Vec<Value>,
    routes: Vec<Value>,
    budget_stops: Vec<Value>,
    first_ts: Option<i64>,
    last_ts: Option<i64>,
}

impl Audit {
    fn agent(&mut self, name: &str) -> &mut AgentStats {
        let i = match self.agent_index.get(name) {
            Some(&i) => i,
            None => {
                self.agents.push(AgentStats {
                    name: name.to_string(),
                    ..AgentStats::default()
                });
                self.agent_index
                    .insert(name.to_string(), self.agents.len() - 1);
                self.agents.len() - 1
            }
        };
        &mut self.agents[i]
    }

    fn tool(&mut self, agent: &str, tool: &str) -> &mut ToolStats {
        let key = (agent.to_string(), tool.to_string());
        let i = match self.tool_index.get(&key) {
            Some(&i) => i,
            None => {
                self.tools.push(ToolStats {
                    agent: agent.to_string(),
                    tool: tool.to_string(),
                    calls: 0,
                    errors: 0,
                    latencies: Vec::new(),
                });
                self.tool_index.insert(key, self.tools.len() - 1);
                self.tools.len() - 1
            }
        };
        &mut self.tools[i]
    }

    /// The agent whose scope directly holds the step at `path`.
    fn agent_of(&self, path: &StepPath) -> Option<String> {
        let up = parent(path)?;
        self.scopes
            .get(&up)
            .and_then(|s| s.strip_prefix("agent:"))
            .map(str::to_string)
    }

    /// The router whose scope directly holds the step at `path`.
    fn router_of(&self, path: &StepPath) -> Option<String> {
        let up = parent(path)?;
        self.scopes
            .get(&up)
            .and_then(|s| s.strip_prefix("router:"))
            .map(str::to_string)
    }

    fn add(&mut self, e: &StoredEvent) {
        self.first_ts.get_or_insert(e.ts_us);
        self.last_ts = Some(e.ts_us);
        let Ok(ev) = Event::decode(&e.payload) else {
            return;
        };
        match ev {
            Event::StepCompleted {
                path, name, output, ..
            } => {
                if let Some(scope) = name.strip_prefix(SCOPE_PREFIX) {
                    if let Some(agent) = scope.strip_prefix("agent:") {
                        self.agent(agent).scopes += 1;
                    }
                    self.scopes.insert(path, scope.to_string());
                } else if name == "model" {
                    let Ok(call) = output.to_typed::<ModelCall>() else {
                        return;
                    };
                    let a = self.agent(&call.agent);
                    a.calls += 1;
                    a.tokens.add(&call.response.usage);
                    a.add_cost(call.cost_usd);
                    a.latencies.push(call.latency_ms);
                } else if let Some(tool) = name.strip_prefix("tool:") {
                    let Some(agent) = self.agent_of(&path) else {
                        return;
                    };
                    // A call resolved by a person (`cairn review --done`) records the tool's
                    // output itself, not a call record: a call without an error.
                    let call = output.to_typed::<ToolCall>().ok();
                    let failed = call.as_ref().is_some_and(|c| c.error.is_some());
                    let a = self.agent(&agent);
                    a.tool_calls += 1;
                    a.tool_errors += u64::from(failed);
                    let t = self.tool(&agent, tool);
                    t.calls += 1;
                    t.errors += u64::from(failed);
                    if let Some(c) = call {
                        t.latencies.push(c.latency_ms);
                    }
                } else if name == "handoff" {
                    let Ok(h) = output.to_typed::<HandoffRecord>() else {
                        return;
                    };
                    let bytes = serde_json::to_vec(&h.context).map_or(0, |b| b.len());
                    self.handoffs.push(json!({
                        "path": path.to_string(),
                        "from": h.from,
                        "to": h.to,
                        "mode": h.mode,
                        "reason": h.reason,
                        "context_messages": h.context.len(),
                        "context_bytes": bytes,
                    }));
                } else if name == "route" {
                    let v = output.to_json();
                    self.routes.push(json!({
                        "path": path.to_string(),
                        "router": self.router_of(&path),
                        "category": v["category"],
                        "agent": v["agent"],
                        "fallback": v["fallback"].as_bool().unwrap_or(false),
                        "classifier_answer": v["classifier_answer"],
                    }));
                } else if name == "budget_exhausted" {
                    let Ok(b) = output.to_typed::<BudgetExhausted>() else {
                        return;
                    };
                    let agent = self.agent_of(&path);
                    if let Some(a) = &agent {
                        self.agent(a).budget_stops += 1;
                    }
                    self.budget_stops.push(json!({
                        "path": path.to_string(),
                        "agent": agent,
                        "ts": fmt_ts(e.ts_us),
                        "spent_tokens": b.spent_tokens,
                        "spent_cost_usd": round_cost(b.spent_cost_usd),
                        "max_tokens": b.limits.max_tokens,
                        "max_cost_usd": b.limits.max_cost_usd,
                    }));
                }
            }
            Event::StepFailed {
                path,
                name,
                retry_at_us,
                ..
            } if name == "model" || name.starts_with("tool:") => {
                let Some(agent) = self.agent_of(&path) else {
                    return;
                };
                let a = self.agent(&agent);
                a.failed_attempts += 1;
                if retry_at_us.is_some() {
                    a.retries += 1;
                } else {
                    a.failures += 1;
                }
            }
            _ => {}
        }
    }

    fn to_json(&self, meta: &RunMeta) -> Value {
        let mut agents = Vec::new();
        let mut all_latencies = Vec::new();
        let mut total = AgentStats::default();
        for a in &self.agents {
            let mut lat = a.latencies.clone();
            lat.sort_unstable();
            all_latencies.extend_from_slice(&lat);
            agents.push(json!({
                "agent": a.name,
                "scopes": a.scopes,
                "calls": a.calls,
                "input_tokens": a.tokens.input,
                "output_tokens": a.tokens.output,
                "cache_read_tokens": a.tokens.cache_read,
                "cache_write_tokens": a.tokens.cache_write,
                "total_tokens": a.tokens.total(),
                "cost_usd": a.cost.map(round_cost),
                "latency_p50_ms": percentile(&lat, 50.0),
                "latency_p95_ms": percentile(&lat, 95.0),
                "tool_calls": a.tool_calls,
                "tool_errors": a.tool_errors,
                "failed_attempts": a.failed_attempts,
                "retries": a.retries,
                "failures": a.failures,
                "budget_stops": a.budget_stops,
            }));
            total.calls += a.calls;
            total.tokens.input += a.tokens.input;
            total.tokens.output += a.tokens.output;
            total.tokens.cache_read += a.tokens.cache_read;
            total.tokens.cache_write += a.tokens.cache_write;
            total.add_cost(a.cost);
            total.tool_calls += a.tool_calls;
            total.tool_errors += a.tool_errors;
            total.failed_attempts += a.failed_attempts;
            total.retries += a.retries;
            total.failures += a.failures;
        }
        all_latencies.sort_unstable();
        let tools: Vec<Value> = self
            .tools
            .iter()
            .map(|t| {
                let mut lat = t.latencies.clone();
                lat.sort_unstable();
                json!({
                    "agent": t.agent,
                    "tool": t.tool,
                    "calls": t.calls,
                    "errors": t.errors,
                    "latency_p50_ms": percentile(&lat, 50.0),
                })
            })
            .collect();
        json!({
            "run": meta.id.to_string(),
            "workflow": meta.workflow,
            "version": meta.version,
            "status": meta.status.as_str(),
            "agents": agents,
            "tools": tools,
            "handoffs": self.handoffs,
            "routes": self.routes,
            "budget_stops": self.budget_stops,
            "totals": {
                "agents": self.agents.len(),
                "calls": total.calls,
                "input_tokens": total.tokens.input,
                "output_tokens": total.tokens.output,
                "cache_read_tokens": total.tokens.cache_read,
                "cache_write_tokens": total.tokens.cache_write,
                "total_tokens": total.tokens.total(),
                "cost_usd": total.cost.map(round_cost),
                "latency_p50_ms": percentile(&all_latencies, 50.0),
                "latency_p95_ms": percentile(&all_latencies, 95.0),
                "latency_sum_ms": all_latencies.iter().sum::<u64>(),
                "tool_calls": total.tool_calls,
                "tool_errors": total.tool_errors,
                "failed_attempts": total.failed_attempts,
                "retries": total.retries,
                "failures": total.failures,
                "handoffs": self.handoffs.len(),
                "routes": self.routes.len(),
                "budget_stops": self.budget_stops.len(),
                "events": meta.events,
                "wall_ms": match (self.first_ts, self.last_ts) {
                    (Some(a), Some(b)) => (b - a).max(0) / 1000,
                    _ => 0,
                },
            },
        })
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    // On a terminal, fit its width; piped, print whole lines.
    t.set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
    t.set_header(header.to_vec());
    t
}

/// A JSON value as a table cell: strings bare, `null` as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.6}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn print_human(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "run {}  workflow {} v{}  status {}",
        cell(&v["run"]),
        cell(&v["workflow"]),
        cell(&v["version"]),
        cell(&v["status"])
    )?;
    let list = |k: &str| v[k].as_array().cloned().unwrap_or_default();

    let agents = list("agents");
    writeln!(out, "\nagents")?;
    if agents.is_empty() {
        writeln!(out, "  none (no agent model calls in this run)")?;
    } else {
        let mut t = table(&[
            "agent", "calls", "in tok", "out tok", "cache rd", "cache wr", "cost $", "p50 ms",
            "p95 ms", "tools", "tool err", "retries", "failures",
        ]);
        for a in &agents {
            t.add_row(
                [
                    "agent",
                    "calls",
                    "input_tokens",
                    "output_tokens",
                    "cache_read_tokens",
                    "cache_write_tokens",
                    "cost_usd",
                    "latency_p50_ms",
                    "latency_p95_ms",
                    "tool_calls",
                    "tool_errors",
                    "retries",
                    "failures",
                ]
                .map(|k| cell(&a[k])),
            );
        }
        writeln!(out, "{t}")?;
    }

    let tools = list("tools");
    if !tools.is_empty() {
        writeln!(out, "\ntools")?;
        let mut t = table(&["agent", "tool", "calls", "errors", "p50 ms"]);
        for x in &tools {
            t.add_row(["agent", "tool", "calls", "errors", "latency_p50_ms"].map(|k| cell(&x[k])));
        }
        writeln!(out, "{t}")?;
    }

    let handoffs = list("handoffs");
    writeln!(out, "\nhandoffs")?;
    if handoffs.is_empty() {
        writeln!(out, "  none")?;
    } else {
        let mut t = table(&["step", "from", "to", "mode", "messages", "bytes", "reason"]);
        for h in &handoffs {
            t.add_row(
                [
                    "path",
                    "from",
                    "to",
                    "mode",
                    "context_messages",
                    "context_bytes",
                    "reason",
                ]
                .map(|k| cell(&h[k])),
            );
        }
        writeln!(out, "{t}")?;
    }

    let routes = list("routes");
    writeln!(out, "\nroutes")?;
    if routes.is_empty() {
        writeln!(out, "  none")?;
    } else {
        let mut t = table(&["step", "router", "category", "agent", "fallback"]);
        for r in &routes {
            t.add_row(["path", "router", "category", "agent", "fallback"].map(|k| cell(&r[k])));
        }
        writeln!(out, "{t}")?;
    }

    let stops = list("budget_stops");
    writeln!(out, "\nbudget stops")?;
    if stops.is_empty() {
        writeln!(out, "  none")?;
    } else {
        let mut t = table(&[
            "step",
            "agent",
            "time",
            "spent tokens",
            "spent $",
            "max tokens",
            "max $",
        ]);
        for s in &stops {
            t.add_row(
                [
                    "path",
                    "agent",
                    "ts",
                    "spent_tokens",
                    "spent_cost_usd",
                    "max_tokens",
                    "max_cost_usd",
                ]
                .map(|k| cell(&s[k])),
            );
        }
        writeln!(out, "{t}")?;
    }

    writeln!(out, "\ntotals")?;
    let totals = &v["totals"];
    let mut t = table(&["figure", "value"]);
    for (k, label) in [
        ("agents", "agents"),
        ("calls", "model calls"),
        ("input_tokens", "input tokens"),
        ("output_tokens", "output tokens"),
        ("cache_read_tokens", "cache read tokens"),
        ("cache_write_tokens", "cache write tokens"),
        ("total_tokens", "total tokens"),
        ("cost_usd", "cost $"),
        ("latency_p50_ms", "latency p50 ms"),
        ("latency_p95_ms", "latency p95 ms"),
        ("tool_calls", "tool calls"),
        ("tool_errors", "tool errors"),
        ("failed_attempts", "failed attempts"),
        ("retries", "retries"),
        ("failures", "failures"),
        ("handoffs", "handoffs"),
        ("routes", "routes"),
        ("budget_stops", "budget stops"),
        ("events", "events"),
        ("wall_ms", "wall time ms"),
    ] {
        t.add_row([label.to_string(), cell(&totals[k])]);
    }
    writeln!(out, "{t}")?;
    Ok(())
}

/// `cairn audit RUN [--json]`.
pub async fn audit(path: &Path, run: &str, as_json: bool) -> Result<ExitCode> {
    let id = parse_run_id(run)?;
    let store = open_ro(path)?;
    let meta = run_meta(&store, id).await?;
    let mut a = Audit::default();
    each_event(&store, id, Some(meta.events), |e| {
        a.add(e);
        Ok(())
    })
    .await?;
    let v = a.to_json(&meta);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let r = if as_json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)
    } else {
        print_human(&mut out, &v)
    };
    match r.and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

// ---- cairn show RUN --step PATH ----

/// The longest line of a JSON value or tool result printed by `show --step`.
const MAX_WIDTH: usize = 100;
/// The most lines of one JSON value or tool result printed by `show --step`.
const MAX_LINES: usize = 40;

/// What the log says about one step below the path asked for.
#[derive(Default)]
struct StepView {
    name: String,
    output: Option<cairn_engine::Payload>,
    attempt: u32,
    /// Failed attempts: attempt, error, retry time.
    failures: Vec<(u32, String, Option<i64>)>,
    ts_us: i64,
}

/// Cuts a line to `MAX_WIDTH` characters.
fn clip(line: &str) -> String {
    match line.char_indices().nth(MAX_WIDTH) {
        None => line.to_string(),
        Some((i, _)) => format!("{}…", &line[..i]),
    }
}

/// Writes `text` indented, each line cut to the width, at most `MAX_LINES` lines when
/// `bounded`.
fn write_lines(out: &mut impl Write, indent: &str, text: &str, bounded: bool) -> Result<()> {
    let lines: Vec<&str> = text.lines().collect();
    let shown = if bounded {
        lines.len().min(MAX_LINES)
    } else {
        lines.len()
    };
    for l in &lines[..shown] {
        if bounded {
            writeln!(out, "{indent}{}", clip(l))?;
        } else {
            writeln!(out, "{indent}{l}")?;
        }
    }
    if shown < lines.len() {
        writeln!(out, "{indent}… ({} more lines)", lines.len() - shown)?;
    }
    if lines.is_empty() {
        writeln!(out, "{indent}(empty)")?;
    }
    Ok(())
}

/// Writes a JSON value pretty-printed, bounded in width and length.
fn write_json(out: &mut impl Write, indent: &str, v: &Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    write_lines(out, indent, &s, true)
}

/// Writes a tool result's text: pretty JSON when it is a JSON object or array, else the text.
fn write_result_text(out: &mut impl Write, indent: &str, s: &str) -> Result<()> {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => write_json(out, indent, &v),
        _ => write_lines(out, indent, s, true),
    }
}

fn write_blocks(out: &mut impl Write, indent: &str, blocks: &[Block]) -> Result<()> {
    let deeper = format!("{indent}  ");
    for b in blocks {
        match b {
            Block::Text { text } => write_lines(out, indent, text, false)?,
            Block::ToolUse { id, name, input } => {
                writeln!(out, "{indent}tool_use {name} (id {id}):")?;
                write_json(out, &deeper, input)?;
            }
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                let tag = if *is_error { " (is_error)" } else { "" };
                writeln!(out, "{indent}tool_result for {tool_use_id}{tag}:")?;
                write_result_text(out, &deeper, content)?;
            }
        }
    }
    Ok(())
}

fn role(r: Role) -> &'static str {
    match r {
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

fn write_failures(out: &mut impl Write, s: &StepView) -> Result<()> {
    for (attempt, error, retry) in &s.failures {
        match retry {
            Some(t) => writeln!(
                out,
                "  attempt {attempt} failed: {error} (retried at {})",
                fmt_ts(*t)
            )?,
            None => writeln!(out, "  attempt {attempt} failed for good: {error}")?,
        }
    }
    Ok(())
}

/// Prints one model call. `system`: the system prompt printed so far (printed again only if
/// it changed); `None` prints it unconditionally.
fn write_model(
    out: &mut impl Write,
    path: &StepPath,
    s: &StepView,
    system: Option<&mut Option<String>>,
    first_in_scope: bool,
) -> Result<()> {
    let call = s
        .output
        .as_ref()
        .and_then(|o| o.to_typed::<ModelCall>().ok());
    match &call {
        Some(c) => {
            let attempt = if s.attempt > 1 {
                format!(" · attempt {}", s.attempt)
            } else {
                String::new()
            };
            writeln!(
                out,
                "── {path} model call · {} · {}{attempt} ──",
                c.provider, c.request.model
            )?
        }
        None => writeln!(out, "── {path} model call ──")?,
    }
    write_failures(out, s)?;
    let Some(call) = call else {
        match &s.output {
            Some(o) => {
                writeln!(out, "  output (not a model call record):")?;
                write_json(out, "    ", &o.to_json())?;
            }
            None => writeln!(out, "  not completed")?,
        }
        return Ok(());
    };
    let req = &call.request;
    match system {
        Some(seen) => {
            if req.system.is_some() && req.system != *seen {
                let label = if seen.is_some() {
                    "system (changed)"
                } else {
                    "system"
                };
                writeln!(out, "  {label}:")?;
                write_lines(out, "    ", req.system.as_deref().unwrap_or(""), false)?;
                *seen = req.system.clone();
            }
        }
        None => {
            if let Some(sys) = &req.system {
                writeln!(out, "  system:")?;
                write_lines(out, "    ", sys, false)?;
            }
        }
    }
    // The request's last user message(s): everything after its last assistant message.
    let start = req
        .messages
        .iter()
        .rposition(|m| m.role == Role::Assistant)
        .map_or(0, |i| i + 1);
    if start > 0 && first_in_scope {
        writeln!(
            out,
            "  ({start} earlier message(s) of the conversation came with the request)"
        )?;
    }
    for m in &req.messages[start..] {
        write_message(out, m)?;
    }
    writeln!(out, "  assistant:")?;
    write_blocks(out, "    ", &call.response.content)?;
    let u = &call.response.usage;
    let stop = serde_json::to_value(&call.response.stop_reason)
        .map(|v| cell(&v))
        .unwrap_or_default();
    writeln!(
        out,
        "  stop {stop} · tokens in {} out {} cache read {} cache write {} · latency {} ms · cost {}",
        u.input_tokens,
        u.output_tokens,
        u.cache_read_input_tokens,
        u.cache_creation_input_tokens,
        call.latency_ms,
        call.cost_usd
            .map(|c| format!("${c:.6}"))
            .unwrap_or_else(|| "-".into())
    )?;
    Ok(())
}

fn write_message(out: &mut impl Write, m: &Message) -> Result<()> {
    writeln!(out, "  {}:", role(m.role))?;
    write_blocks(out, "    ", &m.content)
}

fn write_tool(out: &mut impl Write, path: &StepPath, s: &StepView) -> Result<()> {
    let tool = s.name.strip_prefix("tool:").unwrap_or(&s.name);
    let call = s
        .output
        .as_ref()
        .and_then(|o| o.to_typed::<ToolCall>().ok());
    match &call {
        Some(c) => writeln!(
            out,
            "── {path} tool call {tool} (id {}) · {} ms ──",
            c.id, c.latency_ms
        )?,
        None => writeln!(out, "── {path} tool call {tool} ──")?,
    }
    write_failures(out, s)?;
    match (call, &s.output) {
        (Some(c), _) => {
            writeln!(out, "  input:")?;
            write_json(out, "    ", &c.input)?;
            match (&c.output, &c.error) {
                (_, Some(e)) => {
                    writeln!(out, "  error:")?;
                    write_lines(out, "    ", e, true)?;
                }
                (Some(v), None) => {
                    writeln!(out, "  output:")?;
                    write_json(out, "    ", v)?;
                }
                (None, None) => writeln!(out, "  output: null")?,
            }
        }
        (None, Some(o)) => {
            writeln!(out, "  output (recorded by a review):")?;
            write_json(out, "    ", &o.to_json())?;
        }
        (None, None) => writeln!(out, "  not completed")?,
    }
    Ok(())
}

fn write_handoff(out: &mut impl Write, path: &StepPath, s: &StepView) -> Result<()> {
    let Some(h) = s
        .output
        .as_ref()
        .and_then(|o| o.to_typed::<HandoffRecord>().ok())
    else {
        writeln!(out, "── {path} handoff (not completed) ──")?;
        return Ok(());
    };
    writeln!(
        out,
        "── {path} handoff {} → {} ({}, {} message(s)): {} ──",
        h.from,
        h.to,
        h.mode,
        h.context.len(),
        h.reason
    )?;
    Ok(())
}

fn write_other(out: &mut impl Write, path: &StepPath, s: &StepView) -> Result<()> {
    let summary = match (&s.name[..], &s.output) {
        ("route", Some(o)) => {
            let v = o.to_json();
            format!(
                "route → {} (category {}{})",
                cell(&v["agent"]),
                cell(&v["category"]),
                if v["fallback"] == true {
                    ", fallback"
                } else {
                    ""
                }
            )
        }
        ("budget_exhausted", Some(o)) => match o.to_typed::<BudgetExhausted>() {
            Ok(b) => format!(
                "budget exhausted: spent {} tokens, ${:.6} (limits: {} tokens, ${})",
                b.spent_tokens,
                b.spent_cost_usd,
                fmt_opt(b.limits.max_tokens),
                b.limits
                    .max_cost_usd
                    .map_or_else(|| "-".into(), |c| c.to_string())
            ),
            Err(_) => "budget exhausted".into(),
        },
        (name, Some(o)) => format!("{name} → {}", clip(&o.to_json().to_string())),
        (name, None) => format!("{name} (not completed)"),
    };
    writeln!(out, "── {path} {summary} ──")?;
    Ok(())
}

/// Prints an agent scope's conversation.
fn write_agent(
    out: &mut impl Write,
    scope: &StepPath,
    steps: &BTreeMap<StepPath, StepView>,
) -> Result<()> {
    let name = steps[scope]
        .name
        .strip_prefix(AGENT_SCOPE)
        .unwrap_or_default();
    let children: Vec<(&StepPath, &StepView)> = steps
        .iter()
        .filter(|(p, _)| parent(p).as_ref() == Some(scope))
        .collect();
    let models = children.iter().filter(|(_, s)| s.name == "model").count();
    let tools = children
        .iter()
        .filter(|(_, s)| s.name.starts_with("tool:"))
        .count();
    writeln!(
        out,
        "agent {name} (step {scope}): {models} model call(s), {tools} tool call(s)"
    )?;
    let mut system: Option<String> = None;
    let mut first = true;
    for (p, s) in children {
        if s.name == "model" {
            write_model(out, p, s, Some(&mut system), first)?;
            first = false;
        } else if s.name.starts_with("tool:") {
            write_tool(out, p, s)?;
        } else {
            write_other(out, p, s)?;
        }
    }
    Ok(())
}

/// `cairn show RUN --step PATH`.
pub async fn show_step(path: &Path, run: &str, step: &str) -> Result<ExitCode> {
    let id = parse_run_id(run)?;
    let target: StepPath = step
        .parse()
        .map_err(|e: String| anyhow::Error::new(UsageError(e)))?;
    let store = open_ro(path)?;
    let meta = run_meta(&store, id).await?;
    let mut steps: BTreeMap<StepPath, StepView> = BTreeMap::new();
    // What is at the path when it is not a step (a fan-out, a sleep, …).
    let mut other: Option<&'static str> = None;
    each_event(&store, id, Some(meta.events), |e| {
        let Ok(ev) = Event::decode(&e.payload) else {
            return Ok(());
        };
        let Some(p) = ev.path() else { return Ok(()) };
        if !p.starts_with(&target) {
            return Ok(());
        }
        let p = p.clone();
        match ev {
            Event::StepStarted { name, attempt, .. } => {
                let s = steps.entry(p).or_default();
                s.name = name;
                s.attempt = attempt;
                s.ts_us = e.ts_us;
            }
            Event::StepCompleted {
                name,
                attempt,
                output,
                ..
            } => {
                let s = steps.entry(p).or_default();
                s.name = name;
                s.attempt = attempt;
                s.output = Some(output);
                s.ts_us = e.ts_us;
            }
            Event::StepFailed {
                name,
                attempt,
                error,
                retry_at_us,
                ..
            } => {
                let s = steps.entry(p).or_default();
                s.name = name;
                s.attempt = attempt;
                s.failures.push((attempt, error, retry_at_us));
                s.ts_us = e.ts_us;
            }
            other_ev => {
                if p == target && other.is_none() {
                    other = Some(other_ev.kind());
                }
            }
        }
        Ok(())
    })
    .await?;

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let r = write_step(&mut out, id, &target, &steps, other);
    match r {
        Ok(()) => {}
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e),
    }
    let _ = out.flush();
    Ok(ExitCode::SUCCESS)
}

fn write_step(
    out: &mut impl Write,
    id: RunId,
    target: &StepPath,
    steps: &BTreeMap<StepPath, StepView>,
    other: Option<&'static str>,
) -> Result<()> {
    if let Some(s) = steps.get(target) {
        if s.name.starts_with(AGENT_SCOPE) {
            return write_agent(out, target, steps);
        }
        if s.name == "model" {
            return write_model(out, target, s, None, true);
        }
        if s.name.starts_with("tool:") {
            return write_tool(out, target, s);
        }
        if s.name == "handoff" {
            write_handoff(out, target, s)?;
            if let Some(h) = s
                .output
                .as_ref()
                .and_then(|o| o.to_typed::<HandoffRecord>().ok())
            {
                for m in &h.context {
                    write_message(out, m)?;
                }
            }
            return Ok(());
        }
    }
    // A group (another kind of scope, a fan-out, a branch): every agent, handoff and route
    // below it, in order.
    let mut shown = 0;
    let mut inside: Option<&StepPath> = None;
    for (p, s) in steps.range(target.clone()..) {
        if !p.starts_with(target) {
            break;
        }
        if inside.is_some_and(|a| p.starts_with(a)) {
            continue;
        }
        if s.name.starts_with(AGENT_SCOPE) {
            if shown > 0 {
                writeln!(out)?;
            }
            write_agent(out, p, steps)?;
            inside = Some(p);
            shown += 1;
        } else if s.name == "handoff" {
            write_handoff(out, p, s)?;
            shown += 1;
        } else if s.name == "route" {
            write_other(out, p, s)?;
            shown += 1;
        }
    }
    if shown > 0 {
        return Ok(());
    }
    let what = match (steps.get(target), other) {
        (Some(s), _) => format!("step {target} of run {id} is `{}`", s.name),
        (None, Some(kind)) => format!("step {target} of run {id} is a `{kind}`"),
        (None, None) if target.depth() == 0 => {
            return Err(anyhow::anyhow!(
                "run {id} has no agent steps; see `cairn show {id}` for its steps"
            ));
        }
        (None, None) => {
            return Err(anyhow::anyhow!(
                "run {id} has no step {target}; see `cairn show {id}` for its steps"
            ));
        }
    };
    Err(anyhow::anyhow!(
        "{what}: not an agent, a model call or a tool call, and no agent ran inside it; see `cairn show {id}` for its steps"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_agents::{BudgetLimits, ModelRequest, ModelResponse, StopReason, Usage};
    use cairn_engine::Payload;
    use cairn_storage::{RunStatus, Seq, genesis_hash};

    fn stored(seq: u64, ev: Event) -> StoredEvent {
        StoredEvent {
            seq: Seq(seq),
            ts_us: 1_000_000 + seq as i64 * 1000,
            payload: ev.encode(),
            hash: [0; 32],
        }
    }

    fn done(path: &str, name: &str, output: Value) -> Event {
        Event::StepCompleted {
            path: path.parse().unwrap(),
            name: name.into(),
            attempt: 1,
            started_us: 0,
            output: Payload::from_value(&output).unwrap(),
        }
    }

    fn failed(path: &str, name: &str, retry: bool) -> Event {
        Event::StepFailed {
            path: path.parse().unwrap(),
            name: name.into(),
            attempt: 1,
            started_us: 0,
            error: "HTTP 529".into(),
            retry_at_us: retry.then_some(5),
        }
    }

    fn model(agent: &str, input: u64, output: u64, latency_ms: u64, cost: Option<f64>) -> Value {
        serde_json::to_value(ModelCall {
            agent: agent.into(),
            provider: "scripted".into(),
            request_hash: "h".into(),
            request: ModelRequest {
                model: "m".into(),
                system: Some("sys".into()),
                messages: vec![Message::user("task")],
                tools: vec![],
                tool_choice: None,
                max_tokens: 16,
                temperature: None,
            },
            response: ModelResponse {
                id: "r".into(),
                model: "m".into(),
                content: vec![Block::Text { text: "ok".into() }],
                stop_reason: StopReason::EndTurn,
                usage: Usage {
                    input_tokens: input,
                    output_tokens: output,
                    cache_creation_input_tokens: 1,
                    cache_read_input_tokens: 2,
                },
            },
            latency_ms,
            cost_usd: cost,
        })
        .unwrap()
    }

    fn meta() -> RunMeta {
        let id = RunId::from_u128(7);
        RunMeta {
            id,
            workflow: "w".into(),
            version: 1,
            status: RunStatus::Completed,
            created_us: 0,
            updated_us: 0,
            parent: None,
            labels: BTreeMap::new(),
            events: 0,
            head: genesis_hash(id),
            wake_at_us: None,
        }
    }

    #[test]
    fn agents_handoffs_routes_budget_stops_and_failures_are_counted() {
        let tool_err = serde_json::to_value(ToolCall {
            id: "t1".into(),
            tool: "x".into(),
            input: json!({}),
            output: None,
            error: Some("bad".into()),
            latency_ms: 4,
        })
        .unwrap();
        let handoff = serde_json::to_value(HandoffRecord {
            from: "a".into(),
            to: "b".into(),
            mode: "full".into(),
            reason: "escalate".into(),
            context: vec![Message::user("hi"), Message::assistant("hello")],
            summary_usage: None,
            summary_cost_usd: None,
        })
        .unwrap();
        let context_bytes = serde_json::to_vec(&handoff["context"]).unwrap().len();
        let budget = serde_json::to_value(BudgetExhausted {
            spent_tokens: 900,
            spent_cost_usd: 0.5,
            limits: BudgetLimits {
                max_tokens: Some(800),
                max_cost_usd: None,
            },
        })
        .unwrap();
        let events = vec![
            done("0", "cairn.scope:agent:a", Value::Null),
            failed("0.0", "model", true),
            done("0.0", "model", model("a", 10, 5, 100, Some(0.25))),
            done("0.1", "tool:x", tool_err),
            done("0.2", "model", model("a", 20, 6, 300, Some(0.5))),
            done("1", "cairn.scope:handoff:a->b", Value::Null),
            done("1.0", "handoff", handoff),
            done("1.1", "cairn.scope:agent:b", Value::Null),
            done("1.1.0", "budget_exhausted", budget),
            done("1.1.1", "model", model("b", 1, 1, 50, None)),
            failed("1.1.2", "model", false),
            done("2", "cairn.scope:router:r", Value::Null),
            done(
                "2.0",
                "route",
                json!({"category": "billing", "agent": "b", "fallback": false, "classifier_answer": "billing"}),
            ),
            // Not an agent's: ignored.
            done("3", "model", json!({"not": "a model call"})),
            failed("4", "tool:y", true),
        ];
        let mut a = Audit::default();
        for (i, e) in events.into_iter().enumerate() {
            a.add(&stored(i as u64, e));
        }
        let v = a.to_json(&meta());
        let ag = &v["agents"];
        assert_eq!(ag.as_array().unwrap().len(), 2, "{v:#}");
        assert_eq!(ag[0]["agent"], "a");
        assert_eq!(ag[0]["calls"], 2);
        assert_eq!(ag[0]["input_tokens"], 30);
        assert_eq!(ag[0]["output_tokens"], 11);
        assert_eq!(ag[0]["cache_read_tokens"], 4);
        assert_eq!(ag[0]["cache_write_tokens"], 2);
        assert_eq!(ag[0]["cost_usd"], 0.75);
        assert_eq!(ag[0]["latency_p50_ms"], 100);
        assert_eq!(ag[0]["latency_p95_ms"], 300);
        assert_eq!(ag[0]["tool_calls"], 1);
        assert_eq!(ag[0]["tool_errors"], 1);
        assert_eq!(ag[0]["failed_attempts"], 1);
        assert_eq!(ag[0]["retries"], 1);
        assert_eq!(ag[0]["failures"], 0);
        assert_eq!(ag[1]["agent"], "b");
        assert_eq!(ag[1]["cost_usd"], Value::Null);
        assert_eq!(ag[1]["failures"], 1);
        assert_eq!(ag[1]["budget_stops"], 1);
        let h = &v["handoffs"][0];
        assert_eq!(
            (&h["from"], &h["to"], &h["mode"]),
            (&json!("a"), &json!("b"), &json!("full"))
        );
        assert_eq!(h["context_messages"], 2);
        assert_eq!(h["context_bytes"], context_bytes);
        assert_eq!(v["routes"][0]["router"], "r");
        assert_eq!(v["routes"][0]["agent"], "b");
        assert_eq!(v["budget_stops"][0]["agent"], "b");
        assert_eq!(v["budget_stops"][0]["max_tokens"], 800);
        let t = &v["totals"];
        assert_eq!(t["agents"], 2);
        assert_eq!(t["calls"], 3);
        assert_eq!(t["total_tokens"], (30 + 11 + 4 + 2) + (1 + 1 + 2 + 1));
        assert_eq!(t["cost_usd"], 0.75);
        assert_eq!(t["latency_p50_ms"], 100);
        assert_eq!(t["failed_attempts"], 2);
        assert_eq!(t["handoffs"], 1);
        assert_eq!(t["routes"], 1);
        assert_eq!(t["budget_stops"], 1);
        let mut human = Vec::new();
        print_human(&mut human, &v).unwrap();
        let human = String::from_utf8(human).unwrap();
        assert!(
            human.contains("escalate") && human.contains("billing"),
            "{human}"
        );
    }

    fn view(name: &str, output: Value) -> StepView {
        StepView {
            name: name.into(),
            output: Some(Payload::from_value(&output).unwrap()),
            attempt: 1,
            ..StepView::default()
        }
    }

    #[test]
    fn a_group_shows_each_agent_and_the_handoff_between_them() {
        let handoff = serde_json::to_value(HandoffRecord {
            from: "a".into(),
            to: "b".into(),
            mode: "summary".into(),
            reason: "needs billing".into(),
            context: vec![Message::user("summary of the work")],
            summary_usage: None,
            summary_cost_usd: None,
        })
        .unwrap();
        let mut steps = BTreeMap::new();
        for (path, v) in [
            ("1", view("cairn.scope:handoff:a->b", Value::Null)),
            ("1.0", view("cairn.scope:agent:a.summarizer", Value::Null)),
            ("1.0.0", view("model", model("a.summarizer", 1, 1, 1, None))),
            ("1.1", view("handoff", handoff)),
            ("1.2", view("cairn.scope:agent:b", Value::Null)),
            ("1.2.0", view("model", model("b", 1, 1, 1, Some(0.5)))),
        ] {
            steps.insert(path.parse::<StepPath>().unwrap(), v);
        }
        let id = RunId::from_u128(7);
        let render = |p: &str| {
            let mut out = Vec::new();
            write_step(&mut out, id, &p.parse().unwrap(), &steps, None)
                .map(|()| String::from_utf8(out).unwrap())
        };
        let s = render("1").unwrap();
        let pos = |n: &str| s.find(n).unwrap_or_else(|| panic!("no {n:?} in {s}"));
        assert!(
            pos("agent a.summarizer (step 1.0)") < pos("handoff a → b (summary, 1 message(s))")
        );
        assert!(pos("handoff a → b") < pos("agent b (step 1.2)"));
        assert!(s.contains("cost $0.500000"), "{s}");
        let s = render("1.1").unwrap();
        assert!(s.contains("summary of the work"), "{s}");
        let e = render("1.5").unwrap_err().to_string();
        assert!(e.contains("no step 1.5") && e.contains("cairn show"), "{e}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&v, 50.0), Some(10));
        assert_eq!(percentile(&v, 95.0), Some(19));
        assert_eq!(percentile(&[7], 95.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn long_json_is_bounded() {
        let v = json!({ "k": "x".repeat(500), "list": (0..200).collect::<Vec<_>>() });
        let mut out = Vec::new();
        write_json(&mut out, "  ", &v).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.lines().count() <= MAX_LINES + 1, "{s}");
        assert!(s.lines().all(|l| l.chars().count() <= MAX_WIDTH + 3), "{s}");
        assert!(s.contains("more lines"));
    }
}
