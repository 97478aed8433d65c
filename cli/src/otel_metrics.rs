//! Metrics derived from the live spans, as OpenTelemetry counters and histograms: a `tracing`
//! layer that times the `run`, `step`, `chat`, `execute_tool` and `branch` spans of cairn's
//! crates and, when each closes, records what it did (outcome, tokens, cost, retries).
//!
//! Deriving them from the spans keeps the engine and the agents free of any metrics API: they
//! emit their spans and fields once, and this layer (installed only with live export on) turns
//! them into numbers. The instruments are listed in docs/OBSERVABILITY.md.

use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Bucket boundaries of durations, in seconds: from 100 µs (a durable step on a fast disk) to
/// five minutes (a long model call or run).
const SECONDS_BUCKETS: [f64; 19] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Bucket boundaries of `gen_ai.client.operation.duration`, as the GenAI conventions advise.
const GEN_AI_SECONDS_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// Bucket boundaries of `gen_ai.client.token.usage`, as the GenAI conventions advise.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1_024.0,
    4_096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// The instruments, and the layer that feeds them.
pub struct SpanMetrics {
    runs: Counter<u64>,
    run_duration: Histogram<f64>,
    step_attempts: Counter<u64>,
    step_duration: Histogram<f64>,
    step_retries: Counter<u64>,
    model_calls: Counter<u64>,
    model_tokens: Counter<u64>,
    model_cost: Counter<f64>,
    gen_ai_duration: Histogram<f64>,
    gen_ai_tokens: Histogram<u64>,
    tool_calls: Counter<u64>,
    tool_duration: Histogram<f64>,
    branches: Counter<u64>,
    branches_active: UpDownCounter<i64>,
}

impl SpanMetrics {
    /// Creates the instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let secs = |name: &'static str, desc: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(desc)
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build()
        };
        let count = |name: &'static str, unit: &'static str, desc: &'static str| {
            meter
                .u64_counter(name)
                .with_unit(unit)
                .with_description(desc)
                .build()
        };
        SpanMetrics {
            runs: count(
                "cairn.runs",
                "{run}",
                "Runs that stopped in this process (an incarnation each: a resumed run counts again), by workflow and status.",
            ),
            run_duration: secs(
                "cairn.run.duration",
                "How long a run executed in this process, by workflow and status.",
            ),
            step_attempts: count(
                "cairn.step.attempts",
                "{attempt}",
                "Executed step attempts (not those answered from the log), by step name and outcome.",
            ),
            step_duration: secs(
                "cairn.step.duration",
                "Duration of an executed step attempt, by step name and outcome.",
            ),
            step_retries: count(
                "cairn.step.retries",
                "{retry}",
                "Failed step attempts followed by another attempt, by step name.",
            ),
            model_calls: count(
                "cairn.model.calls",
                "{call}",
                "Live model calls (attempts), by agent, model and outcome.",
            ),
            model_tokens: count(
                "cairn.model.tokens",
                "{token}",
                "Tokens of live model calls, by agent, model and gen_ai.token.type (input includes cached input).",
            ),
            model_cost: meter
                .f64_counter("cairn.model.cost")
                .with_unit("USD")
                .with_description(
                    "Cost of live model calls of agents with a price, by agent and model.",
                )
                .build(),
            gen_ai_duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description("GenAI operation duration (GenAI semantic conventions).")
                .with_boundaries(GEN_AI_SECONDS_BUCKETS.to_vec())
                .build(),
            gen_ai_tokens: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Tokens used per model call (GenAI semantic conventions).")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            tool_calls: count(
                "cairn.tool.calls",
                "{call}",
                "Live tool calls, by tool and outcome.",
            ),
            tool_duration: secs(
                "cairn.tool.duration",
                "Duration of a live tool call, by tool.",
            ),
            branches: count(
                "cairn.fan_out.branches",
                "{branch}",
                "Fan-out branches that finished in this process, by outcome (succeeded, failed, stopped).",
            ),
            branches_active: meter
                .i64_up_down_counter("cairn.fan_out.branches.active")
                .with_unit("{branch}")
                .with_description("Fan-out branches running now.")
                .build(),
        }
    }

    fn close(&self, name: &str, rec: &SpanRec) {
        let secs = rec.started.elapsed().as_secs_f64();
        let failed = rec.str("otel.status_code") == Some("ERROR");
        let outcome = if failed { "failed" } else { "succeeded" };
        match name {
            "run" => {
                let attrs = [
                    rec.kv("cairn.workflow"),
                    KeyValue::new(
                        "cairn.run.status",
                        rec.str("cairn.run.status").unwrap_or("stopped").to_string(),
                    ),
                ];
                self.runs.add(1, &attrs);
                self.run_duration.record(secs, &attrs);
            }
            "step" => {
                let step = rec.kv("cairn.step_name");
                let attrs = [step.clone(), KeyValue::new("cairn.outcome", outcome)];
                self.step_attempts.add(1, &attrs);
                self.step_duration.record(secs, &attrs);
                if rec.bool("cairn.step.will_retry") == Some(true) {
                    self.step_retries.add(1, &[step]);
                }
            }
            "chat" => {
                let agent = rec.kv("gen_ai.agent.name");
                let model = rec.kv("gen_ai.request.model");
                self.model_calls.add(
                    1,
                    &[
                        agent.clone(),
                        model.clone(),
                        KeyValue::new("cairn.outcome", outcome),
                    ],
                );
                let mut conv = vec![
                    KeyValue::new("gen_ai.operation.name", "chat"),
                    rec.kv("gen_ai.provider.name"),
                    model.clone(),
                ];
                if rec.str("gen_ai.response.model").is_some() {
                    conv.push(rec.kv("gen_ai.response.model"));
                }
                if rec.str("error.type").is_some() {
                    conv.push(rec.kv("error.type"));
                }
                self.gen_ai_duration.record(secs, &conv);
                for (field, kind) in [
                    ("gen_ai.usage.input_tokens", "input"),
                    ("gen_ai.usage.output_tokens", "output"),
                ] {
                    if let Some(n) = rec.u64(field) {
                        let t = KeyValue::new("gen_ai.token.type", kind);
                        self.model_tokens
                            .add(n, &[agent.clone(), model.clone(), t.clone()]);
                        let mut a = conv.clone();
                        a.push(t);
                        self.gen_ai_tokens.record(n, &a);
                    }
                }
                if let Some(c) = rec.f64("cairn.cost_usd") {
                    self.model_cost.add(c, &[agent, model]);
                }
            }
            "execute_tool" => {
                let tool = rec.kv("gen_ai.tool.name");
                self.tool_calls
                    .add(1, &[tool.clone(), KeyValue::new("cairn.outcome", outcome)]);
                self.tool_duration.record(secs, &[tool]);
            }
            "branch" => {
                self.branches_active.add(-1, &[]);
                let outcome = rec.str("cairn.branch.outcome").unwrap_or("stopped");
                self.branches.add(
                    1,
                    &[KeyValue::new("cairn.branch.outcome", outcome.to_string())],
                );
            }
            _ => {}
        }
    }
}

/// Whether spans of this name are measured.
fn measured(name: &str) -> bool {
    matches!(name, "run" | "step" | "chat" | "execute_tool" | "branch")
}

/// A field value as recorded.
#[derive(Clone, Debug)]
enum Val {
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
}

/// A measured span: when it started and the fields it has recorded.
struct SpanRec {
    started: Instant,
    fields: Vec<(&'static str, Val)>,
}

impl SpanRec {
    fn get(&self, k: &str) -> Option<&Val> {
        self.fields
            .iter()
            .rev()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v)
    }

    fn str(&self, k: &str) -> Option<&str> {
        match self.get(k) {
            Some(Val::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn u64(&self, k: &str) -> Option<u64> {
        match self.get(k) {
            Some(Val::U64(n)) => Some(*n),
            Some(Val::I64(n)) => u64::try_from(*n).ok(),
            _ => None,
        }
    }

    fn f64(&self, k: &str) -> Option<f64> {
        match self.get(k) {
            Some(Val::F64(x)) => Some(*x),
            _ => None,
        }
    }

    fn bool(&self, k: &str) -> Option<bool> {
        match self.get(k) {
            Some(Val::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// The field as a string attribute (empty if not recorded).
    fn kv(&self, k: &'static str) -> KeyValue {
        let v = match self.get(k) {
            Some(Val::Str(s)) => s.clone(),
            Some(Val::U64(n)) => n.to_string(),
            Some(Val::I64(n)) => n.to_string(),
            Some(Val::F64(x)) => x.to_string(),
            Some(Val::Bool(b)) => b.to_string(),
            None => String::new(),
        };
        KeyValue::new(k, v)
    }
}

impl Visit for SpanRec {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.fields.push((field.name(), Val::F64(value)));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields.push((field.name(), Val::I64(value)));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields.push((field.name(), Val::U64(value)));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.push((field.name(), Val::Bool(value)));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.fields
            .push((field.name(), Val::Str(value.to_string())));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.fields
            .push((field.name(), Val::Str(format!("{value:?}"))));
    }
}

impl<S> Layer<S> for SpanMetrics
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let name = attrs.metadata().name();
        if !measured(name) {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let mut rec = SpanRec {
            started: Instant::now(),
            fields: Vec::with_capacity(8),
        };
        attrs.record(&mut rec);
        if name == "branch" {
            self.branches_active.add(1, &[]);
        }
        span.extensions_mut().insert(rec);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if let Some(rec) = span.extensions_mut().get_mut::<SpanRec>() {
            values.record(rec);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let rec = span.extensions_mut().remove::<SpanRec>();
        if let Some(rec) = rec {
            self.close(span.name(), &rec);
        }
    }
}
