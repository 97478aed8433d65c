//! Metrics derived from the live spans, as OpenTelemetry counters and histograms: a `tracing`
//! layer that times the `run`, `step`, `chat`, `execute_tool` and `branch` spans of cairn's
//! crates and, when each closes, records what it did (outcome, tokens, cost, retries).
//!
//! Deriving them from the spans keeps the engine and the agents free of any metrics API: they
//! emit their spans and fields once, and this layer (installed only with live export on) turns
//! them into numbers. The instruments are listed in docs/OBSERVABILITY.md.

use std::time::Instant;

use std::sync::{Arc, Mutex};

use opentelemetry::metrics::{
    BoundCounter, BoundHistogram, Counter, Histogram, Meter, UpDownCounter,
};
use opentelemetry::{KeyValue, StringValue, Value};
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
#[derive(Clone)]
pub struct SpanMetrics {
    runs: Counter<u64>,
    run_duration: Histogram<f64>,
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
    /// `step_duration` (and `step_retries`) bound to each step name and outcome seen, so that
    /// recording a step attempt skips the SDK's lookup of its attribute set (a SipHash of the
    /// attributes: about 1,100 instructions of the export thread per step).
    bound_steps: Arc<Mutex<rustc_hash::FxHashMap<BoundKey, BoundStep>>>,
    /// `runs` and `run_duration` bound to each workflow and status seen (at most
    /// [`BOUND_RUNS_MAX`] pairs; beyond, the SDK looks the attributes up).
    bound_runs: Arc<Mutex<BoundRuns>>,
}

/// Workflow → status → the run instruments bound to them.
type BoundRuns = rustc_hash::FxHashMap<Box<str>, rustc_hash::FxHashMap<Box<str>, BoundRun>>;

/// Workflow and status pairs bound at most.
const BOUND_RUNS_MAX: usize = 4_096;

/// The run instruments bound to one workflow and status.
struct BoundRun {
    count: BoundCounter<u64>,
    duration: BoundHistogram<f64>,
}

/// A step name kept for the life of the process (its address and length) and whether the
/// attempt failed.
type BoundKey = (usize, usize, bool);

/// The step instruments bound to one step name and outcome.
struct BoundStep {
    duration: BoundHistogram<f64>,
    /// Bound at the first retry (a bound counter is a series even before it counts).
    retries: Option<BoundCounter<u64>>,
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
            // Its count is the number of executed attempts: one instrument per step keeps the
            // cost per attempt to one measurement.
            step_duration: secs(
                "cairn.step.duration",
                "Duration of an executed step attempt (not those answered from the log), by step name and outcome; its count is the attempts.",
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
            bound_steps: Arc::default(),
            bound_runs: Arc::default(),
        }
    }

    /// A span of cairn's crates opened (the export layer's call).
    pub fn opened(&self, name: &str) {
        if name == "branch" {
            self.branches_active.add(1, &[]);
        }
    }

    /// A span of cairn's crates closed after `secs`, with these attributes (the export layer's
    /// call: the fields were turned into attributes once, for the span).
    pub fn closed(&self, name: &str, attributes: &[KeyValue], failed: bool, secs: f64) {
        if !measured(name) {
            return;
        }
        let mut rec = SpanRec {
            failed,
            ..SpanRec::default()
        };
        for kv in attributes {
            let key = kv.key.as_str();
            match &kv.value {
                Value::String(s) if wanted_str(key) => rec.set_str(key, s.clone()),
                Value::I64(n) => {
                    if let Ok(n) = u64::try_from(*n) {
                        rec.set_count(key, n);
                    }
                }
                Value::F64(c) if key == "cairn.cost_usd" => rec.cost_usd = Some(*c),
                Value::Bool(b) if key == "cairn.step.will_retry" => rec.will_retry = *b,
                _ => {}
            }
        }
        self.record(name, &rec, secs);
    }

    fn close(&self, name: &str, rec: &SpanRec) {
        let secs = rec.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.record(name, rec, secs);
    }

    /// Records what a span of this `tracing` name did, from the few fields kept in `rec`, after
    /// `secs` (the export thread's call for a span of a run not sampled for export).
    pub(crate) fn record(&self, name: &str, rec: &SpanRec, secs: f64) {
        let outcome = outcome_kv(rec.failed);
        match name {
            "run" => {
                let workflow = rec.label.as_ref().map_or("", |v| v.as_str());
                let status = rec.outcome.as_ref().map_or("stopped", |v| v.as_str());
                if !self.record_run_bound(workflow, status, secs) {
                    let attrs = [
                        rec.kv("cairn.workflow", &rec.label),
                        KeyValue::new(
                            "cairn.run.status",
                            rec.outcome.clone().unwrap_or_else(|| "stopped".into()),
                        ),
                    ];
                    self.runs.add(1, &attrs);
                    self.run_duration.record(secs, &attrs);
                }
            }
            "step" => {
                let step = StepRec {
                    name: rec.label.as_ref().map(|l| intern_label(l.as_str())),
                    failed: rec.failed,
                    will_retry: rec.will_retry,
                };
                self.record_step(&step, secs);
            }
            "chat" => {
                let agent = rec.kv("gen_ai.agent.name", &rec.agent);
                let model = rec.kv("gen_ai.request.model", &rec.label);
                self.model_calls
                    .add(1, &[agent.clone(), model.clone(), outcome]);
                let mut conv = vec![
                    KeyValue::new("gen_ai.operation.name", "chat"),
                    rec.kv("gen_ai.provider.name", &rec.provider),
                    model.clone(),
                ];
                if rec.response_model.is_some() {
                    conv.push(rec.kv("gen_ai.response.model", &rec.response_model));
                }
                if rec.error_type.is_some() {
                    conv.push(rec.kv("error.type", &rec.error_type));
                }
                self.gen_ai_duration.record(secs, &conv);
                for (n, kind) in [(rec.input_tokens, "input"), (rec.output_tokens, "output")] {
                    if let Some(n) = n {
                        let t = KeyValue::new("gen_ai.token.type", kind);
                        self.model_tokens
                            .add(n, &[agent.clone(), model.clone(), t.clone()]);
                        let mut a = conv.clone();
                        a.push(t);
                        self.gen_ai_tokens.record(n, &a);
                    }
                }
                if let Some(c) = rec.cost_usd {
                    self.model_cost.add(c, &[agent, model]);
                }
            }
            "execute_tool" => {
                let tool = rec.kv("gen_ai.tool.name", &rec.label);
                self.tool_calls.add(1, &[tool.clone(), outcome]);
                self.tool_duration.record(secs, &[tool]);
            }
            "branch" => {
                self.branches_active.add(-1, &[]);
                self.branches.add(
                    1,
                    &[KeyValue::new(
                        "cairn.branch.outcome",
                        rec.outcome.clone().unwrap_or_else(|| "stopped".into()),
                    )],
                );
            }
            _ => {}
        }
    }
}

/// What the metrics read of a `step` span of a run that is not exported: its name and how it
/// ended (a step attempt is the hot path: this is all it keeps, in 32 bytes).
#[derive(Default)]
pub(crate) struct StepRec {
    /// `cairn.step_name`.
    pub(crate) name: Option<Label>,
    /// `otel.status_code = "ERROR"` was recorded.
    pub(crate) failed: bool,
    /// `cairn.step.will_retry = true` was recorded.
    pub(crate) will_retry: bool,
}

impl Visit for StepRec {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "cairn.step.will_retry" {
            self.will_retry = value;
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "cairn.step_name" => self.name = Some(intern_label(value)),
            "otel.status_code" => self.failed = value == "ERROR",
            _ => {}
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "cairn.step_name" {
            self.name = Some(intern_debug_label(value));
        }
    }
}

impl SpanMetrics {
    /// Records a step attempt (the export thread's call, once per attempt, for runs exported
    /// or not): through the instruments bound to the step's name and outcome.
    pub(crate) fn record_step(&self, rec: &StepRec, secs: f64) {
        let name = match &rec.name {
            Some(Label::Kept(s)) => *s,
            // A label beyond the kept ones (or none): the SDK looks its attributes up.
            other => {
                let name = match other {
                    Some(Label::Shared(v)) => v.clone(),
                    _ => StringValue::from(""),
                };
                let step = KeyValue::new("cairn.step_name", name);
                if rec.will_retry {
                    self.step_retries.add(1, std::slice::from_ref(&step));
                }
                self.step_duration
                    .record(secs, &[step, outcome_kv(rec.failed)]);
                return;
            }
        };
        let mut bound = self.bound_steps.lock().unwrap_or_else(|p| p.into_inner());
        let b = bound
            .entry((name.as_ptr() as usize, name.len(), rec.failed))
            .or_insert_with(|| BoundStep {
                duration: self.step_duration.bind(&[
                    KeyValue::new("cairn.step_name", name),
                    outcome_kv(rec.failed),
                ]),
                retries: None,
            });
        if rec.will_retry {
            b.retries
                .get_or_insert_with(|| {
                    self.step_retries
                        .bind(&[KeyValue::new("cairn.step_name", name)])
                })
                .add(1);
        }
        b.duration.record(secs);
    }
}

impl SpanMetrics {
    /// Records a run through the instruments bound to its workflow and status (binding them
    /// the first time); false when [`BOUND_RUNS_MAX`] pairs are bound already and this is a
    /// new one.
    fn record_run_bound(&self, workflow: &str, status: &str, secs: f64) -> bool {
        let mut bound = self.bound_runs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = bound.get(workflow).and_then(|by| by.get(status)) {
            b.count.add(1);
            b.duration.record(secs);
            return true;
        }
        if bound.values().map(|by| by.len()).sum::<usize>() >= BOUND_RUNS_MAX {
            return false;
        }
        let attrs = [
            KeyValue::new("cairn.workflow", workflow.to_string()),
            KeyValue::new("cairn.run.status", status.to_string()),
        ];
        let b = BoundRun {
            count: self.runs.bind(&attrs),
            duration: self.run_duration.bind(&attrs),
        };
        b.count.add(1);
        b.duration.record(secs);
        bound
            .entry(workflow.into())
            .or_default()
            .insert(status.into(), b);
        true
    }
}

/// The `cairn.outcome` attribute.
fn outcome_kv(failed: bool) -> KeyValue {
    KeyValue::new("cairn.outcome", if failed { "failed" } else { "succeeded" })
}

/// Whether spans of this name are measured.
pub(crate) fn measured(name: &str) -> bool {
    matches!(name, "run" | "step" | "chat" | "execute_tool" | "branch")
}

/// A measured span: when it started and the few fields [`SpanMetrics::close`] reads (the
/// others, e.g. run ids and step paths, are neither kept nor formatted). Strings are kept as
/// shared values, so an attribute made of one costs no copy.
#[derive(Default)]
pub(crate) struct SpanRec {
    /// When the span opened.
    pub(crate) started: Option<Instant>,
    /// `otel.status_code = "ERROR"` was recorded.
    failed: bool,
    /// `cairn.step.will_retry = true` was recorded.
    will_retry: bool,
    /// The span's subject: the workflow (`run`), the step name (`step`), the request model
    /// (`chat`) or the tool (`execute_tool`).
    label: Option<StringValue>,
    /// `cairn.run.status` (`run`) or `cairn.branch.outcome` (`branch`).
    outcome: Option<StringValue>,
    agent: Option<StringValue>,
    provider: Option<StringValue>,
    response_model: Option<StringValue>,
    error_type: Option<StringValue>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cost_usd: Option<f64>,
}

impl SpanRec {
    /// What the metrics read of a run that had no span: its workflow and status (`None`:
    /// stopped on an engine error, counted as `stopped`, as a span without a status is).
    pub(crate) fn run(workflow: &str, status: Option<&str>) -> SpanRec {
        SpanRec {
            label: Some(intern(workflow)),
            outcome: status.map(intern),
            ..SpanRec::default()
        }
    }

    /// A string field as an attribute (empty if not recorded).
    fn kv(&self, key: &'static str, v: &Option<StringValue>) -> KeyValue {
        KeyValue::new(key, v.clone().unwrap_or_else(|| "".into()))
    }

    fn set_str(&mut self, name: &str, value: StringValue) {
        let slot = match name {
            "cairn.workflow" | "cairn.step_name" | "gen_ai.request.model" | "gen_ai.tool.name" => {
                &mut self.label
            }
            "cairn.run.status" | "cairn.branch.outcome" => &mut self.outcome,
            "gen_ai.agent.name" => &mut self.agent,
            "gen_ai.provider.name" => &mut self.provider,
            "gen_ai.response.model" => &mut self.response_model,
            "error.type" => &mut self.error_type,
            "otel.status_code" => {
                self.failed = value.as_str() == "ERROR";
                return;
            }
            _ => return,
        };
        *slot = Some(value);
    }

    fn set_count(&mut self, name: &str, n: u64) {
        match name {
            "gen_ai.usage.input_tokens" => self.input_tokens = Some(n),
            "gen_ai.usage.output_tokens" => self.output_tokens = Some(n),
            _ => {}
        }
    }
}

/// Whether a string field is read (so that others are never formatted).
fn wanted_str(name: &str) -> bool {
    matches!(
        name,
        "cairn.workflow"
            | "cairn.step_name"
            | "gen_ai.request.model"
            | "gen_ai.tool.name"
            | "cairn.run.status"
            | "cairn.branch.outcome"
            | "gen_ai.agent.name"
            | "gen_ai.provider.name"
            | "gen_ai.response.model"
            | "error.type"
            | "otel.status_code"
    )
}

impl Visit for SpanRec {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "cairn.cost_usd" {
            self.cost_usd = Some(value);
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(n) = u64::try_from(value) {
            self.set_count(field.name(), n);
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.set_count(field.name(), value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "cairn.step.will_retry" {
            self.will_retry = value;
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if wanted_str(field.name()) {
            self.set_str(field.name(), intern(value));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if wanted_str(field.name()) {
            self.set_str(field.name(), intern_debug(value));
        }
    }
}

/// Distinct strings an [`intern`] table of one thread keeps at most (then it starts afresh).
const INTERNED_MAX: usize = 4_096;
/// Distinct label strings kept for the life of the process at most; beyond, labels are
/// shared (`Arc<str>`) copies instead.
const LEAKED_MAX: usize = 16_384;

/// The label strings kept for the life of the process (see [`intern`]).
static LEAKED: std::sync::Mutex<Option<rustc_hash::FxHashSet<&'static str>>> =
    std::sync::Mutex::new(None);

thread_local! {
    /// This thread's cache of interned metric labels (step names, workflows, models,
    /// statuses: few distinct values, seen once per span), and a buffer to format them in.
    static INTERNED: std::cell::RefCell<(rustc_hash::FxHashSet<&'static str>, String)> =
        std::cell::RefCell::new((rustc_hash::FxHashSet::default(), String::new()));
}

/// A metric label: kept for the life of the process (the usual case), or a shared copy.
pub(crate) enum Label {
    /// Kept for the life of the process: the same address each time the same text is seen.
    Kept(&'static str),
    /// Beyond the [`LEAKED_MAX`] kept labels.
    Shared(StringValue),
}

impl From<Label> for StringValue {
    fn from(l: Label) -> StringValue {
        match l {
            Label::Kept(s) => StringValue::from(s),
            Label::Shared(v) => v,
        }
    }
}

/// `value` as a label: a `&'static str` kept for the life of the process, the same each time
/// any thread sees the same text, so that a label costs a hash lookup in this thread's cache,
/// no allocation, and no reference count shared with the export thread (a shared `Arc`'s
/// count moved between the cores at every step). At most [`LEAKED_MAX`] distinct labels are
/// kept (step names are the workflow's own: a bounded set); further ones are `Arc` copies.
pub(crate) fn intern(value: &str) -> StringValue {
    intern_label(value).into()
}

/// [`intern`], saying whether the label is kept.
pub(crate) fn intern_label(value: &str) -> Label {
    INTERNED
        .try_with(|t| {
            let Ok(mut t) = t.try_borrow_mut() else {
                return Label::Shared(StringValue::from(value.to_string()));
            };
            intern_in(&mut t.0, value)
        })
        .unwrap_or_else(|_| Label::Shared(StringValue::from(value.to_string())))
}

/// A `Debug` (or `%` `Display`) field value, formatted into a reused buffer and interned.
pub(crate) fn intern_debug(value: &dyn std::fmt::Debug) -> StringValue {
    intern_debug_label(value).into()
}

/// [`intern_debug`], saying whether the label is kept.
pub(crate) fn intern_debug_label(value: &dyn std::fmt::Debug) -> Label {
    use std::fmt::Write as _;
    INTERNED
        .try_with(|t| {
            let Ok(mut t) = t.try_borrow_mut() else {
                return Label::Shared(StringValue::from(format!("{value:?}")));
            };
            let (set, buf) = &mut *t;
            buf.clear();
            let _ = write!(buf, "{value:?}");
            intern_in(set, buf)
        })
        .unwrap_or_else(|_| Label::Shared(StringValue::from(format!("{value:?}"))))
}

fn intern_in(cache: &mut rustc_hash::FxHashSet<&'static str>, value: &str) -> Label {
    if let Some(s) = cache.get(value) {
        return Label::Kept(s);
    }
    let kept = {
        let mut all = LEAKED.lock().unwrap_or_else(|p| p.into_inner());
        let all = all.get_or_insert_with(Default::default);
        match all.get(value) {
            Some(s) => Some(*s),
            None if all.len() < LEAKED_MAX => {
                let s: &'static str = Box::leak(value.to_owned().into_boxed_str());
                all.insert(s);
                Some(s)
            }
            None => None,
        }
    };
    let Some(s) = kept else {
        return Label::Shared(StringValue::from(std::sync::Arc::<str>::from(value)));
    };
    if cache.len() >= INTERNED_MAX {
        cache.clear();
    }
    cache.insert(s);
    Label::Kept(s)
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
            started: Some(Instant::now()),
            ..SpanRec::default()
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
