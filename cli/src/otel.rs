//! Live OpenTelemetry export: the `tracing` spans of the engine and the agents, turned into
//! OpenTelemetry spans by cairn's own layer ([`SpanLayer`]: `tracing-opentelemetry` cost too
//! much per span, see docs/ARCHITECTURE.md) and sent over OTLP/HTTP (protobuf) while workflows
//! run, with the metrics derived from them (`crate::otel_metrics`).
//!
//! Off unless `--otlp URL` or one of the OTLP endpoint variables is set; then no layer is
//! installed at all, and the spans cost what they cost before (a cached callsite check). On,
//! closed spans are queued (bounded), and an export thread builds, batches and POSTs them with
//! a blocking reqwest client: a workflow never waits for the collector. Spans the collector did not
//! take (queue full, collector down, error status) are dropped and counted; the count is
//! printed in one warning line when the process ends ([`Pipeline::shutdown`]).
//!
//! The trace id of a run's spans is the one `cairn trace` derives from the run id
//! ([`crate::trace::trace_id`]), so a live trace and a later re-export of the same run land in
//! the same trace. See docs/OBSERVABILITY.md for what matches and what does not.

use std::borrow::Cow;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context as LayerContext, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::commands::UsageError;

/// Where exported telemetry goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    /// POST to OTLP/HTTP endpoints.
    Otlp {
        /// The traces endpoint, e.g. `http://localhost:4318/v1/traces`.
        traces: String,
        /// The metrics endpoint, if metrics are sent.
        metrics: Option<String>,
    },
    /// Build the whole pipeline but discard what it exports (for measuring its cost).
    Discard,
}

/// The live-export configuration, read from `--otlp` and the standard variables.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where it goes.
    pub sink: Sink,
    /// The `service.name` resource attribute (`OTEL_SERVICE_NAME`, default `cairn`).
    pub service_name: String,
    /// Headers sent with every request (`OTEL_EXPORTER_OTLP_HEADERS`, `a=b,c=d`).
    pub headers: reqwest::header::HeaderMap,
    /// How long one export request may take (`OTEL_EXPORTER_OTLP_TIMEOUT`, in ms; default 10 s).
    pub timeout: Duration,
    /// Which runs' spans are exported (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
    pub sampler: Sampler,
}

/// Which traces (runs) have their spans exported live. The decision is taken once per trace,
/// when its root span (a run's `run` span) opens, and every span of the trace follows it: a
/// run is exported whole or not at all. Metrics count every run either way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    /// Every run (`always_on`, `parentbased_always_on`).
    AlwaysOn,
    /// No run: metrics only (`always_off`, `parentbased_always_off`).
    AlwaysOff,
    /// The runs whose trace id falls under this ratio, as the SDK's `traceidratio` sampler
    /// decides from the trace id (`traceidratio`, `parentbased_traceidratio`): the trace id
    /// comes from the run id, so a run gets the same decision in every process.
    Ratio(f64),
    /// Every run while at most this many runs per second start, more ones then only at this
    /// rate (a token bucket holding one second's worth): cairn's default, with
    /// [`DEFAULT_RUNS_PER_SEC`] (`cairn_rate_limited`, the argument being the rate).
    RateLimited(f64),
}

/// The default sampler's rate: runs per second whose spans are exported live.
pub const DEFAULT_RUNS_PER_SEC: f64 = 100.0;

impl Sampler {
    /// The sampler of `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (read through `env`);
    /// unset, cairn's default ([`Sampler::RateLimited`] at [`DEFAULT_RUNS_PER_SEC`]). Runs are
    /// root spans (cairn receives no remote parent), so each `parentbased_*` sampler decides as
    /// the sampler it names for the root.
    pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Sampler> {
        let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let arg = set("OTEL_TRACES_SAMPLER_ARG");
        let number = |what: &str, ok: &dyn Fn(f64) -> bool, default: f64| -> Result<f64> {
            match &arg {
                None => Ok(default),
                Some(a) => match a.trim().parse::<f64>() {
                    Ok(x) if x.is_finite() && ok(x) => Ok(x),
                    _ => Err(usage(format!(
                        "OTEL_TRACES_SAMPLER_ARG must be {what}, not `{a}`"
                    ))),
                },
            }
        };
        let Some(name) = set("OTEL_TRACES_SAMPLER") else {
            return Ok(Sampler::RateLimited(DEFAULT_RUNS_PER_SEC));
        };
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "always_on" | "parentbased_always_on" => Sampler::AlwaysOn,
            "always_off" | "parentbased_always_off" => Sampler::AlwaysOff,
            "traceidratio" | "parentbased_traceidratio" => Sampler::Ratio(number(
                "a ratio from 0 to 1 for traceidratio",
                &|x| (0.0..=1.0).contains(&x),
                1.0,
            )?),
            "cairn_rate_limited" => Sampler::RateLimited(number(
                "a positive number of runs per second for cairn_rate_limited",
                &|x| x > 0.0,
                DEFAULT_RUNS_PER_SEC,
            )?),
            _ => {
                return Err(usage(format!(
                    "OTEL_TRACES_SAMPLER must be always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off, parentbased_traceidratio or \
                     cairn_rate_limited, not `{name}`"
                )));
            }
        })
    }

    /// How the exit note names it.
    fn describe(&self) -> String {
        match self {
            Sampler::AlwaysOn => "always_on".into(),
            Sampler::AlwaysOff => "always_off".into(),
            Sampler::Ratio(r) => format!("traceidratio {r}"),
            Sampler::RateLimited(n) => format!("at most {n} runs per second"),
        }
    }
}

/// Whether `trace_id` falls under `ratio`, as the SDK's `TraceIdRatioBased` sampler decides:
/// the low 8 bytes of the id, shifted right once, below `ratio` × 2⁶³.
pub fn ratio_samples(ratio: f64, trace_id: TraceId) -> bool {
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    let bytes = trace_id.to_bytes();
    let low = u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes"));
    (low >> 1) < bound
}

/// A [`Sampler`] and, for the rate-limited one, its token bucket.
struct Sampling {
    sampler: Sampler,
    /// Tokens (runs that may still be sampled) and when they were last topped up.
    bucket: Mutex<(f64, Instant)>,
}

impl Sampling {
    fn new(sampler: Sampler) -> Self {
        let burst = match sampler {
            Sampler::RateLimited(n) => n.max(1.0),
            _ => 0.0,
        };
        Sampling {
            sampler,
            bucket: Mutex::new((burst, Instant::now())),
        }
    }

    /// Whether [`Sampling::sample`] reads the trace id (only the ratio sampler does: the others
    /// decide before the root span's fields are read).
    fn needs_trace_id(&self) -> bool {
        matches!(self.sampler, Sampler::Ratio(_))
    }

    /// Whether the trace that starts now, with this id, is exported.
    fn sample(&self, trace_id: TraceId) -> bool {
        match self.sampler {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(r) => ratio_samples(r, trace_id),
            Sampler::RateLimited(rate) => {
                let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let (tokens, last) = *b;
                let tokens =
                    (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate.max(1.0));
                if tokens >= 1.0 {
                    *b = (tokens - 1.0, now);
                    true
                } else {
                    *b = (tokens, now);
                    false
                }
            }
        }
    }
}

/// Lowers the calling thread's scheduling priority (nice 10): exporting is background work,
/// and when both cores are busy the workflows' threads and the store's writer should run
/// first. Lowering one's own priority needs no privilege; if it fails nothing changes.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread, with no pointers involved.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// How long the exit flush may take at most, so that a dead collector delays the end of the
/// process by at most this much.
const EXIT_FLUSH_MAX: Duration = Duration::from_secs(3);
/// After a failed export, batches are dropped without a request for this long: a collector
/// that is down costs one connection attempt per window, not one per batch.
const DOWN_WINDOW: Duration = Duration::from_secs(2);
/// The default request timeout.
const TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Spans queued for export at most (unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise); more are
/// dropped and counted. About 1 KiB each.
const QUEUE_SPANS_MAX: usize = 16_384;
/// Spans per export request (unless `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says otherwise).
const BATCH_SPANS_MAX: usize = 2_048;
/// The longest an ended span waits before its batch is sent (unless `OTEL_BSP_SCHEDULE_DELAY`).
const BATCH_DELAY: Duration = Duration::from_secs(1);

fn usage(msg: String) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg))
}

/// A base endpoint with a signal's path appended (`/v1/traces`), unless it already ends so.
pub fn signal_url(base: &str, signal_path: &str, what: &str) -> Result<String> {
    let base = base.trim();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(usage(format!(
            "{what} must be an http:// or https:// URL (the collector's OTLP/HTTP endpoint, e.g. http://localhost:4318), not `{base}`"
        )));
    }
    let base = base.trim_end_matches('/');
    Ok(if base.ends_with(signal_path) {
        base.to_string()
    } else {
        format!("{base}{signal_path}")
    })
}

/// A signal-specific endpoint variable (used as it is), checked.
fn exact_url(url: &str, what: &str) -> Result<String> {
    let url = url.trim();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(usage(format!(
            "{what} must be an http:// or https:// URL, not `{url}`"
        )));
    }
    Ok(url.to_string())
}

/// The traces endpoint from `flag` (a base URL, as `--otlp`), else
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is), else `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (a base URL); `None` if none is set.
pub fn traces_endpoint(
    flag: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>> {
    let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(f) = flag {
        return signal_url(f, "/v1/traces", "--otlp").map(Some);
    }
    if let Some(u) = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return exact_url(&u, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").map(Some);
    }
    match set("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Some(u) => signal_url(&u, "/v1/traces", "OTEL_EXPORTER_OTLP_ENDPOINT").map(Some),
        None => Ok(None),
    }
}

/// Reads the live-export settings: on with `--otlp URL` (`flag`), with `discard`, or when an
/// OTLP endpoint variable is set (and `OTEL_SDK_DISABLED` is not `true`); `None` means off.
/// `env` reads a variable (the process environment, or a map in tests).
pub fn settings(
    flag: Option<&str>,
    discard: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Settings>> {
    let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let disabled = set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let sink = if discard {
        Sink::Discard
    } else {
        if flag.is_none() && disabled {
            return Ok(None);
        }
        let Some(traces) = traces_endpoint(flag, env)? else {
            return Ok(None);
        };
        let metrics = match (flag, set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")) {
            (Some(f), _) => Some(signal_url(f, "/v1/metrics", "--otlp")?),
            (None, Some(u)) => Some(exact_url(&u, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")?),
            (None, None) => match set("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(u) => Some(signal_url(
                    &u,
                    "/v1/metrics",
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                )?),
                None => None,
            },
        };
        Sink::Otlp { traces, metrics }
    };
    let timeout = match set("OTEL_EXPORTER_OTLP_TIMEOUT") {
        None => TIMEOUT_DEFAULT,
        Some(ms) => match ms.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                return Err(usage(format!(
                    "OTEL_EXPORTER_OTLP_TIMEOUT must be a positive number of milliseconds, not `{ms}`"
                )));
            }
        },
    };
    let headers = crate::trace::parse_headers(&[], &|k| set(k))?;
    Ok(Some(Settings {
        sink,
        service_name: set("OTEL_SERVICE_NAME").unwrap_or_else(|| "cairn".to_string()),
        headers,
        timeout,
        sampler: Sampler::from_env(env)?,
    }))
}

// ---- the span layer ----

thread_local! {
    /// This thread's id generator state (xorshift64*, seeded once per thread).
    static ID_STATE: Cell<u64> = Cell::new(id_seed());
}

/// A seed for a thread's id generator: the standard library's per-process random hash keys,
/// mixed with the time and a per-thread counter, so that threads and processes differ.
fn id_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static THREADS: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(THREADS.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    h.write_u64(nanos);
    h.finish() | 1
}

/// The next non-zero random u64 of this thread (xorshift64*: ids need to be unique, not
/// unpredictable; the SDK's generator costs a thread-local `rand` RNG per id too).
fn next_id() -> u64 {
    ID_STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D).max(1)
    })
}

/// One live span of cairn's crates, from its creation to its close, in the registry's
/// extensions: what becomes its [`SpanData`].
struct LiveSpan {
    trace_id: TraceId,
    span_id: SpanId,
    parent_span_id: SpanId,
    /// `otel.name` when recorded, else the `tracing` name.
    name: Cow<'static, str>,
    kind: SpanKind,
    start_time: SystemTime,
    attributes: Vec<KeyValue>,
    events: Vec<opentelemetry::trace::Event>,
    status: Status,
}

/// Turns `tracing` fields into span attributes and the special `otel.*` fields into the span's
/// name, kind and status, as `tracing-opentelemetry` does.
///
/// The second field is the run id of the enclosing run span, shared rather than formatted
/// again; the third says whether the span is being opened: its fields are then new (a callsite
/// names each field once), so they are added without looking for one to replace.
struct FieldVisitor<'a>(&'a mut LiveSpan, Option<&'a StringValue>, bool);

impl FieldVisitor<'_> {
    fn put(&mut self, key: &'static str, value: Value) {
        let attrs = &mut self.0.attributes;
        if self.2 {
            attrs.push(KeyValue::new(key, value));
            return;
        }
        match attrs.iter_mut().find(|kv| kv.key.as_str() == key) {
            Some(kv) => kv.value = value,
            None => attrs.push(KeyValue::new(key, value)),
        }
    }

    /// A string field: one allocation (a shared `Arc<str>`, so that the metrics' copies of
    /// it cost a reference count, not another allocation).
    fn put_str(&mut self, key: &'static str, value: &str) {
        match key {
            "otel.name" => self.0.name = Cow::Owned(value.to_string()),
            "otel.kind" => {
                self.0.kind = match value {
                    "client" => SpanKind::Client,
                    "server" => SpanKind::Server,
                    "producer" => SpanKind::Producer,
                    "consumer" => SpanKind::Consumer,
                    _ => SpanKind::Internal,
                }
            }
            "otel.status_code" => {
                self.0.status = match value {
                    "ERROR" | "error" => match &self.0.status {
                        Status::Error { .. } => return,
                        _ => Status::error(""),
                    },
                    "OK" | "ok" => Status::Ok,
                    _ => Status::Unset,
                }
            }
            "otel.status_description" => self.0.status = Status::error(value.to_string()),
            _ => self.put(
                key,
                Value::String(StringValue::from(Arc::<str>::from(value))),
            ),
        }
    }
}

thread_local! {
    /// Where `Debug` and `Display` field values are formatted before they are copied once.
    static FORMAT_BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl Visit for FieldVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field.name(), Value::F64(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field.name(), Value::I64(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match i64::try_from(value) {
            Ok(v) => self.put(field.name(), Value::I64(v)),
            Err(_) => self.put_str(field.name(), &value.to_string()),
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field.name(), Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put_str(field.name(), value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        // A span inside a run's tree carries the run's id: the one the run span formatted
        // (shared), not formatted again.
        if field.name() == "cairn.run_id"
            && let Some(run) = self.1
        {
            self.put("cairn.run_id", Value::String(run.clone()));
            return;
        }
        let done = FORMAT_BUF.with(|b| {
            let Ok(mut buf) = b.try_borrow_mut() else {
                return false;
            };
            buf.clear();
            let _ = write!(buf, "{value:?}");
            self.put_str(field.name(), &buf);
            true
        });
        if !done {
            self.put_str(field.name(), &format!("{value:?}"));
        }
    }
}

/// Turns an event's fields into a span event, as `tracing-opentelemetry` does: the message
/// names it; an `error` field makes it an `exception` event with `exception.message`.
struct EventVisitor<'a> {
    event: &'a mut opentelemetry::trace::Event,
    /// The `error` field's value, which also sets the span's status.
    error: Option<String>,
}

impl EventVisitor<'_> {
    fn put(&mut self, key: &'static str, value: Value) {
        if key == "message" {
            self.event.name = Cow::Owned(value.as_str().into_owned());
        } else if key == "error" && self.event.name.is_empty() {
            let text = value.as_str().into_owned();
            self.event.name = Cow::Borrowed("exception");
            self.event
                .attributes
                .push(KeyValue::new("exception.message", text.clone()));
            self.error = Some(text);
        } else {
            self.event.attributes.push(KeyValue::new(key, value));
        }
    }
}

impl Visit for EventVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field.name(), Value::F64(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field.name(), Value::I64(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match i64::try_from(value) {
            Ok(v) => self.put(field.name(), Value::I64(v)),
            Err(_) => self.put(field.name(), Value::String(value.to_string().into())),
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field.name(), Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field.name(), Value::String(value.to_string().into()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field.name(), Value::String(format!("{value:?}").into()));
    }
}

/// The run's trace id, if the root span being opened carries a valid `cairn.run_id`.
fn run_trace_id(attrs: &[KeyValue]) -> Option<TraceId> {
    let kv = attrs.iter().find(|kv| kv.key.as_str() == "cairn.run_id")?;
    let run: cairn_storage::RunId = kv.value.as_str().parse().ok()?;
    Some(TraceId::from_bytes(crate::trace::trace_id(run)))
}

thread_local! {
    /// Set by the meter's run hook when the sampler keeps a run as it starts: the run's span,
    /// which the engine makes next on this thread, is then exported without a second decision.
    static RUN_SAMPLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The `tracing` layer that turns the spans of cairn's crates into OpenTelemetry spans: it
/// keeps each span's fields in the registry while it is open and, when it closes, hands one
/// record to the export queue, which builds the [`SpanData`] and derives the metrics. The
/// span tree is the registry's, the trace id of a run's root span is the one `cairn trace`
/// derives from the run id, the others are inherited; span ids are random.
///
/// The [`Sampler`] decides once per trace, when its root span opens, whether the trace is
/// exported. A span of a trace that is not only keeps what the metrics read ([`Unsampled`]):
/// no ids, no attribute copies, no formatting of run ids and paths.
struct SpanLayer {
    queue: Arc<Queue>,
    /// The instruments (none when metrics are not exported): the one metric counted when a
    /// span opens (fan-out branches running), and the metrics of spans recorded here when the
    /// queue is full.
    metrics: Option<crate::otel_metrics::SpanMetrics>,
    sampling: Arc<Sampling>,
    /// Whether `enabled` refuses a `step` span of a trace that is not exported (no other
    /// layer wants it, and no meter's run hooks keep such runs from making one): the engine
    /// then measures the attempt without a span (with no meter, not at all).
    skip_unsampled_steps: bool,
    /// What measures the step attempts that had no span (when metrics are on): offered to the
    /// engine through [`Layer::downcast_raw`]; it queues the attempt for the export thread.
    meter: Option<cairn_engine::StepMeter>,
}

/// The span of a trace that is not exported: when it opened and what the metrics read, if it is
/// measured.
struct Unsampled(Option<(Instant, MetricRec)>);

/// What the metrics read of a span of a trace that is not exported.
enum MetricRec {
    /// A step attempt (the hot path), inline.
    Step(crate::otel_metrics::StepRec),
    /// Any other measured span (`run`, `chat`, `execute_tool`, `branch`).
    Other(Box<crate::otel_metrics::SpanRec>),
}

impl MetricRec {
    fn record(&self, m: &crate::otel_metrics::SpanMetrics, kind: &str, secs: f64) {
        match self {
            MetricRec::Step(r) => m.record_step(r, secs),
            MetricRec::Other(r) => m.record(kind, r, secs),
        }
    }
}

impl Visit for MetricRec {
    fn record_f64(&mut self, field: &Field, value: f64) {
        match self {
            MetricRec::Step(r) => r.record_f64(field, value),
            MetricRec::Other(r) => r.record_f64(field, value),
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        match self {
            MetricRec::Step(r) => r.record_i64(field, value),
            MetricRec::Other(r) => r.record_i64(field, value),
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        match self {
            MetricRec::Step(r) => r.record_u64(field, value),
            MetricRec::Other(r) => r.record_u64(field, value),
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        match self {
            MetricRec::Step(r) => r.record_bool(field, value),
            MetricRec::Other(r) => r.record_bool(field, value),
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        match self {
            MetricRec::Step(r) => r.record_str(field, value),
            MetricRec::Other(r) => r.record_str(field, value),
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match self {
            MetricRec::Step(r) => r.record_debug(field, value),
            MetricRec::Other(r) => r.record_debug(field, value),
        }
    }
}

/// What a span being opened learns from its parent.
enum Parent {
    /// An exported span: its trace, its id, the run id it carries.
    Sampled(TraceId, SpanId, Option<StringValue>),
    /// A span of a trace that is not exported.
    Unsampled,
    /// None: the span is the root of a trace.
    Root,
}

impl<S> Layer<S> for SpanLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    // The layer filters by itself (cairn's crates, INFO and up) rather than through a
    // per-layer filter: a per-layer filter costs a registry lookup in every callback of every
    // span (enter, exit, clone, close), which showed in the profile of no-op steps.
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if !is_cairn(meta) {
            Interest::never()
        } else if self.skips(meta) {
            // Decided per span, by `enabled`: made only in an exported trace.
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }

    // Asked only for callsites some layer found `sometimes` interesting. Whatever this layer
    // does not take part in is left to the others (`true`): `false` would veto it for all.
    fn enabled(&self, meta: &Metadata<'_>, ctx: LayerContext<'_, S>) -> bool {
        // A step attempt of a run not exported: no span (the engine hands the attempt to
        // `meter`). Every span of such a run carries `Unsampled`, so the current one tells.
        !(self.skips(meta)
            && is_cairn(meta)
            && ctx
                .lookup_current()
                .is_some_and(|cur| cur.extensions().get::<Unsampled>().is_some()))
    }

    // The engine finds the meter here (as tracing-opentelemetry's `WithContext`).
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else if id == std::any::TypeId::of::<cairn_engine::StepMeter>() {
            self.meter
                .as_ref()
                .map(|m| m as *const cairn_engine::StepMeter as *const ())
        } else {
            None
        }
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let meta = attrs.metadata();
        if !is_cairn(meta) {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        // The nearest enclosing span of this layer (another layer's spans, e.g. of other
        // crates at `RUST_LOG=debug`, may sit in between).
        let mut parent = Parent::Root;
        let mut up = span.parent();
        while let Some(p) = up {
            let ext = p.extensions();
            if let Some(l) = ext.get::<LiveSpan>() {
                let run = l
                    .attributes
                    .iter()
                    .find(|kv| kv.key.as_str() == "cairn.run_id")
                    .and_then(|kv| match &kv.value {
                        Value::String(s) => Some(s.clone()),
                        _ => None,
                    });
                parent = Parent::Sampled(l.trace_id, l.span_id, run);
                break;
            }
            if ext.get::<Unsampled>().is_some() {
                parent = Parent::Unsampled;
                break;
            }
            drop(ext);
            up = p.parent();
        }
        // No parent, made while the workflow of a run left out is polled (the engine does not
        // enter such a run's span): part of that run, so not exported either.
        if matches!(parent, Parent::Root)
            && attrs.is_contextual()
            && cairn_engine::in_left_out_run()
        {
            parent = Parent::Unsampled;
        }
        if let Some(m) = &self.metrics {
            m.opened(meta.name());
        }
        // A run's span whose run the sampler kept as the run started (the meter's run hook, on
        // this thread, just before): exported without asking the sampler again.
        let presampled = matches!(parent, Parent::Root)
            && RUN_SAMPLED.with(|c| c.replace(false))
            && meta.name() == "run";
        // A root is decided here when the sampler needs no trace id (all but the ratio one):
        // a root left out then costs no copy of its fields, no trace id, no span record.
        let stats = &self.queue.stats;
        let early =
            matches!(parent, Parent::Root) && !presampled && !self.sampling.needs_trace_id();
        if early {
            if self.sampling.sample(TraceId::INVALID) {
                stats.traces_sampled.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.traces_unsampled.fetch_add(1, Ordering::Relaxed);
                parent = Parent::Unsampled;
            }
        }
        if matches!(parent, Parent::Unsampled) {
            let rec = self.unsampled_rec(meta.name(), attrs);
            span.extensions_mut().insert(Unsampled(rec));
            return;
        }
        let mut live = LiveSpan {
            trace_id: TraceId::INVALID,
            span_id: SpanId::INVALID,
            parent_span_id: SpanId::INVALID,
            name: Cow::Borrowed(meta.name()),
            kind: SpanKind::Internal,
            start_time: SystemTime::now(),
            attributes: Vec::with_capacity(meta.fields().len()),
            events: Vec::new(),
            status: Status::Unset,
        };
        match parent {
            Parent::Sampled(trace_id, span_id, run) => {
                attrs.record(&mut FieldVisitor(&mut live, run.as_ref(), true));
                live.trace_id = trace_id;
                live.parent_span_id = span_id;
            }
            _ => {
                attrs.record(&mut FieldVisitor(&mut live, None, true));
                live.trace_id = run_trace_id(&live.attributes).unwrap_or_else(|| {
                    TraceId::from(u128::from(next_id()) << 64 | u128::from(next_id()))
                });
                if presampled {
                    stats.traces_sampled.fetch_add(1, Ordering::Relaxed);
                } else if !early {
                    if !self.sampling.sample(live.trace_id) {
                        stats.traces_unsampled.fetch_add(1, Ordering::Relaxed);
                        let rec = self.unsampled_rec(meta.name(), attrs);
                        span.extensions_mut().insert(Unsampled(rec));
                        return;
                    }
                    stats.traces_sampled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        live.span_id = SpanId::from(next_id());
        span.extensions_mut().insert(live);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(live) = ext.get_mut::<LiveSpan>() {
            values.record(&mut FieldVisitor(live, None, false));
        } else if let Some(Unsampled(Some((_, rec)))) = ext.get_mut::<Unsampled>() {
            values.record(rec);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: LayerContext<'_, S>) {
        if !is_cairn(event.metadata()) {
            return;
        }
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        if span.extensions().get::<LiveSpan>().is_none() {
            return;
        }
        let meta = event.metadata();
        let mut otel_event = opentelemetry::trace::Event::new(
            "",
            SystemTime::now(),
            vec![
                KeyValue::new("level", meta.level().as_str()),
                KeyValue::new("target", meta.target()),
            ],
            0,
        );
        let mut visitor = EventVisitor {
            event: &mut otel_event,
            error: None,
        };
        event.record(&mut visitor);
        let error = visitor.error;
        if otel_event.name.is_empty() {
            otel_event.name = Cow::Borrowed(meta.name());
        }
        let mut ext = span.extensions_mut();
        if let Some(live) = ext.get_mut::<LiveSpan>() {
            if let Some(e) = error {
                live.status = Status::error(e);
            } else if *meta.level() == tracing::Level::ERROR && live.status == Status::Unset {
                live.status = Status::error("");
            }
            live.events.push(otel_event);
        }
    }

    fn on_close(&self, id: Id, ctx: LayerContext<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(live) = ext.remove::<LiveSpan>() {
            drop(ext);
            // The rest (the metrics, the `SpanData`) is the export thread's work.
            self.queue.stats.ended.fetch_add(1, Ordering::Relaxed);
            self.queue.push(Ended::Span(Box::new(SpanEnd {
                live,
                end_time: SystemTime::now(),
                kind: span.name(),
            })));
        } else if let Some(Unsampled(Some((started, rec)))) = ext.remove::<Unsampled>() {
            drop(ext);
            let secs = started.elapsed().as_secs_f64();
            self.queue
                .push_metric(self.metrics.as_ref(), rec, span.name(), secs);
        }
    }
}

impl SpanLayer {
    /// Whether spans of this callsite are left out of traces that are not exported.
    fn skips(&self, meta: &Metadata<'_>) -> bool {
        self.skip_unsampled_steps && meta.is_span() && meta.name() == "step"
    }

    /// What a span of a trace that is not exported keeps: the fields its metrics read, if it
    /// is measured and metrics are on.
    fn unsampled_rec(
        &self,
        name: &'static str,
        attrs: &Attributes<'_>,
    ) -> Option<(Instant, MetricRec)> {
        if self.metrics.is_none() || !crate::otel_metrics::measured(name) {
            return None;
        }
        let mut rec = if name == "step" {
            MetricRec::Step(Default::default())
        } else {
            MetricRec::Other(Box::default())
        };
        attrs.record(&mut rec);
        Some((Instant::now(), rec))
    }
}

/// A span that closed, as the export thread receives it (small: the queue is written and read
/// once per span, on two cores busy with the workflows).
enum Ended {
    /// A span to export (and measure).
    Span(Box<SpanEnd>),
    /// A span of a trace that is not exported: its metrics only.
    Metric {
        rec: MetricRec,
        /// The `tracing` name, which the metrics go by.
        kind: &'static str,
        secs: f64,
    },
}

/// A span to export.
struct SpanEnd {
    live: LiveSpan,
    end_time: SystemTime,
    /// The `tracing` name, which the metrics go by.
    kind: &'static str,
}

/// Records the metrics of an exported span and turns it into the SDK's [`SpanData`].
fn into_span_data(
    live: LiveSpan,
    end_time: SystemTime,
    kind: &'static str,
    metrics: Option<&crate::otel_metrics::SpanMetrics>,
    scope: &InstrumentationScope,
) -> SpanData {
    if let Some(m) = metrics {
        let secs = end_time
            .duration_since(live.start_time)
            .map_or(0.0, |d| d.as_secs_f64());
        let failed = matches!(live.status, Status::Error { .. });
        m.closed(kind, &live.attributes, failed, secs);
    }
    SpanData {
        span_context: SpanContext::new(
            live.trace_id,
            live.span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id: live.parent_span_id,
        parent_span_is_remote: false,
        span_kind: live.kind,
        name: live.name,
        start_time: live.start_time,
        end_time,
        attributes: live.attributes,
        dropped_attributes_count: 0,
        events: {
            let mut events = SpanEvents::default();
            events.events = live.events;
            events
        },
        links: SpanLinks::default(),
        status: live.status,
        instrumentation_scope: scope.clone(),
    }
}

// ---- the export queue ----

/// Ended spans waiting for the export thread: a bounded buffer behind a mutex (a push is a
/// lock and a `Vec::push` into a chunk of fixed capacity; the thread takes all the chunks at
/// once and gives the emptied ones back). Chunks, not one vector: a vector grown past its
/// capacity while the export thread waits for a core is copied whole, under the lock.
struct Queue {
    spans: Mutex<Chunks>,
    /// Wakes the export thread: a batch of spans is full, the queue is three quarters full, a
    /// flush is asked for, or the end.
    wake: Condvar,
    /// The most spans waiting at once; more are dropped (and the metrics of spans not
    /// exported are recorded by the thread that ended them).
    max: usize,
    /// Spans per export request.
    batch: usize,
    /// Entries queued that wake the export thread whatever they are (three quarters of
    /// [`Queue::max`]). Metric records of runs not exported (one per step) do not count
    /// toward a batch: they wait for the timer or for this, so that a busy process wakes the
    /// export thread a few times a second, not after every `batch` steps (each wake took a
    /// core from the workflows: `many` lost about 10% to them).
    wake_len: usize,
    /// The longest an ended span waits before its batch is sent.
    delay: Duration,
    /// Set at shutdown: the thread sends what is left and stops.
    closing: AtomicBool,
    stats: Arc<ExportStats>,
    /// Which queue this is, for the threads' [`SHARDS`].
    id: u64,
    /// Each thread's metric records not yet handed over (see [`Shard`]).
    shards: Mutex<Vec<Arc<Shard>>>,
}

/// The metric records one thread queued and has not handed over yet. A step of a run not
/// exported queues one record; taking the queue's one lock for each makes every workflow
/// thread write the same lock and chunk at every step (cache lines passed between cores, and
/// contention as workers grow). A thread fills its own shard instead and hands a full chunk
/// over in one lock; the export thread takes what the shards hold whenever it runs (at least
/// every [`Queue::delay`]), so a record waits no longer than before.
#[derive(Default)]
struct Shard {
    recs: Mutex<Vec<Ended>>,
}

/// Source of [`Queue::id`].
static QUEUE_IDS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's shard of each queue it queued metric records to (one, but for tests).
    static SHARDS: std::cell::RefCell<Vec<(u64, Arc<Shard>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Spans per chunk of the queue.
const CHUNK: usize = 256;
/// Emptied chunks kept for reuse.
const CHUNKS_FREE_MAX: usize = 64;

/// The queue's contents: full chunks and the one being filled (the last), and emptied ones.
#[derive(Default)]
struct Chunks {
    full: Vec<Vec<Ended>>,
    /// Entries queued.
    len: usize,
    /// Of which spans to export.
    spans: usize,
    free: Vec<Vec<Ended>>,
}

impl Chunks {
    /// Whether the export thread has enough to do to be woken.
    fn due(&self, q: &Queue) -> bool {
        self.spans >= q.batch || self.len >= q.wake_len
    }
}

impl Queue {
    /// An empty queue holding `max` entries at most, sending `batch` spans per request or
    /// after `delay`.
    fn new(max: usize, batch: usize, delay: Duration, stats: Arc<ExportStats>) -> Queue {
        Queue {
            spans: Mutex::new(Chunks::default()),
            wake: Condvar::new(),
            max,
            batch,
            wake_len: (max - max / 4).max(1),
            delay,
            closing: AtomicBool::new(false),
            stats,
            id: QUEUE_IDS.fetch_add(1, Ordering::Relaxed),
            shards: Mutex::default(),
        }
    }

    /// Queues `span`; gives it back if the queue is full.
    fn push(&self, span: Ended) -> Option<Ended> {
        let mut q = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        if q.len >= self.max {
            return Some(span);
        }
        if q.full.last().is_none_or(|c| c.len() >= CHUNK) {
            let c = q.free.pop().unwrap_or_else(|| Vec::with_capacity(CHUNK));
            q.full.push(c);
        }
        let (was_due, is_span) = (q.due(self), matches!(span, Ended::Span(_)));
        q.full.last_mut().expect("a chunk").push(span);
        q.len += 1;
        q.spans += usize::from(is_span);
        let wake = !was_due && q.due(self);
        drop(q);
        if wake {
            self.wake.notify_one();
        }
        None
    }

    /// Queues the metrics of a span not exported (or of an attempt or run that had no span);
    /// if the queue is full, records them here, into `metrics`, rather than lose them.
    fn push_metric(
        &self,
        metrics: Option<&crate::otel_metrics::SpanMetrics>,
        rec: MetricRec,
        kind: &'static str,
        secs: f64,
    ) {
        let given_back = match self.push_to_shard(Ended::Metric { rec, kind, secs }) {
            Ok(None) => return,
            Ok(Some(chunk)) => chunk,
            // No shard on this thread (it is being torn down): the shared queue.
            Err(e) => self.push(e).into_iter().collect(),
        };
        // The queue is full: recorded here rather than lost.
        if let Some(m) = metrics {
            for e in given_back {
                if let Ended::Metric { rec, kind, secs } = e {
                    rec.record(m, kind, secs);
                }
            }
        }
    }

    /// Adds `e` to this thread's shard, handing the shard's records over to the queue once they
    /// fill a chunk; gives the chunk back if the queue is full, and `e` if this thread has no
    /// shard to use.
    fn push_to_shard(&self, e: Ended) -> Result<Option<Vec<Ended>>, Ended> {
        let mut e = Some(e);
        let full = SHARDS
            .try_with(|shards| {
                let Ok(mut shards) = shards.try_borrow_mut() else {
                    return None;
                };
                let shard = match shards.iter().find(|(id, _)| *id == self.id) {
                    Some((_, shard)) => shard,
                    None => {
                        // Shards of queues gone (tests make many) are let go.
                        shards.retain(|(_, s)| Arc::strong_count(s) > 1);
                        let shard = Arc::new(Shard::default());
                        self.shards
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Arc::clone(&shard));
                        shards.push((self.id, shard));
                        &shards.last().expect("just pushed").1
                    }
                };
                let mut recs = shard.recs.lock().unwrap_or_else(|p| p.into_inner());
                recs.push(e.take().expect("pushed once"));
                (recs.len() >= CHUNK)
                    .then(|| std::mem::replace(&mut *recs, Vec::with_capacity(CHUNK)))
            })
            .ok()
            .flatten();
        match (e, full) {
            (Some(e), _) => Err(e),
            (None, None) => Ok(None),
            (None, Some(chunk)) => Ok(self.hand_over(chunk)),
        }
    }

    /// Queues a shard's full `chunk` of metric records; gives it back if the queue is full.
    fn hand_over(&self, chunk: Vec<Ended>) -> Option<Vec<Ended>> {
        let mut q = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        if q.len + chunk.len() > self.max {
            return Some(chunk);
        }
        let was_due = q.due(self);
        q.len += chunk.len();
        // Before the chunk being filled with spans, if any: that one stays last.
        let at = q.full.len().saturating_sub(1);
        q.full.insert(at, chunk);
        let wake = !was_due && q.due(self);
        drop(q);
        if wake {
            self.wake.notify_one();
        }
        None
    }

    /// Everything queued, and what the threads' shards hold.
    fn take(&self) -> Vec<Vec<Ended>> {
        let mut partial: Vec<Vec<Ended>> = Vec::new();
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        for shard in shards.iter() {
            let mut recs = shard.recs.lock().unwrap_or_else(|p| p.into_inner());
            if !recs.is_empty() {
                partial.push(std::mem::take(&mut *recs));
            }
        }
        // The shards of threads that have ended (only this list holds them now) are emptied
        // and let go: a process whose blocking threads come and go keeps a shard per live one.
        shards.retain(|s| Arc::strong_count(s) > 1);
        drop(shards);
        let mut q = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        q.len = 0;
        q.spans = 0;
        let mut all = std::mem::take(&mut q.full);
        drop(q);
        all.append(&mut partial);
        all
    }

    /// Emptied chunks, for reuse.
    fn give_back(&self, chunks: impl Iterator<Item = Vec<Ended>>) {
        let mut q = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for mut c in chunks {
            if q.free.len() >= CHUNKS_FREE_MAX {
                break;
            }
            c.clear();
            q.free.push(c);
        }
    }
}

/// The exporting side of the queue, type-erased for [`Pipeline`].
trait Drain: Send + Sync {
    /// Sends everything queued now, on the calling thread.
    fn flush(&self) -> OTelSdkResult;
    /// Stops the exporter.
    fn shutdown(&self, timeout: Duration) -> OTelSdkResult;
}

/// The span exporter, and the lock that keeps one export at a time.
struct Exporting<E> {
    queue: Arc<Queue>,
    exporter: Mutex<CountingExporter<E>>,
    /// The metrics derived from the spans, recorded here, off the workflow threads.
    metrics: Option<crate::otel_metrics::SpanMetrics>,
    scope: InstrumentationScope,
}

impl<E: SpanExporter> Drain for Exporting<E> {
    fn flush(&self) -> OTelSdkResult {
        let exporter = self.exporter.lock().unwrap_or_else(|p| p.into_inner());
        let mut chunks = self.queue.take();
        let mut result = Ok(());
        let mut batch: Vec<SpanData> = Vec::new();
        for chunk in &mut chunks {
            for e in chunk.drain(..) {
                match e {
                    Ended::Span(end) => {
                        let SpanEnd {
                            live,
                            end_time,
                            kind,
                        } = *end;
                        batch.push(into_span_data(
                            live,
                            end_time,
                            kind,
                            self.metrics.as_ref(),
                            &self.scope,
                        ));
                        if batch.len() >= self.queue.batch {
                            let b = std::mem::take(&mut batch);
                            if let Err(e) = futures_executor::block_on(exporter.export(b)) {
                                result = Err(e);
                            }
                        }
                    }
                    Ended::Metric { rec, kind, secs } => {
                        if let Some(m) = &self.metrics {
                            rec.record(m, kind, secs);
                        }
                    }
                }
            }
        }
        self.queue.give_back(chunks.into_iter());
        if !batch.is_empty()
            && let Err(e) = futures_executor::block_on(exporter.export(batch))
        {
            result = Err(e);
        }
        result
    }

    fn shutdown(&self, timeout: Duration) -> OTelSdkResult {
        let exporter = self.exporter.lock().unwrap_or_else(|p| p.into_inner());
        exporter.shutdown_with_timeout(timeout)
    }
}

/// The export thread: sends a batch when one is full or [`Queue::delay`] after the last send,
/// and what is left when the pipeline closes.
fn export_loop(queue: Arc<Queue>, drain: Arc<dyn Drain>, done: std::sync::mpsc::Sender<()>) {
    loop {
        let closing = {
            let q = queue.spans.lock().unwrap_or_else(|p| p.into_inner());
            let (q, _) = queue
                .wake
                .wait_timeout_while(q, queue.delay, |q| {
                    !q.due(&queue) && !queue.closing.load(Ordering::Relaxed)
                })
                .unwrap_or_else(|p| p.into_inner());
            drop(q);
            queue.closing.load(Ordering::Relaxed)
        };
        let _ = drain.flush();
        if closing {
            let _ = done.send(());
            return;
        }
    }
}

// ---- counting ----

/// What the pipeline offered and delivered, for the exit line.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Spans that ended and were offered to the export queue.
    pub ended: AtomicU64,
    /// Traces (runs) whose spans are exported.
    pub traces_sampled: AtomicU64,
    /// Traces (runs) whose spans the sampler left out (their metrics are counted).
    pub traces_unsampled: AtomicU64,
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans whose export request failed (or that were dropped while the collector was down).
    pub failed: AtomicU64,
    /// Metric export requests that failed.
    pub metric_failures: AtomicU64,
    /// The last export error, one line.
    last_error: Mutex<Option<String>>,
    /// Until when batches are dropped without a request (after a failure).
    down_until: Mutex<Option<Instant>>,
}

impl ExportStats {
    /// Spans ended but not delivered: dropped from a full queue, refused, or unsent at exit.
    pub fn dropped(&self) -> u64 {
        self.ended
            .load(Ordering::Relaxed)
            .saturating_sub(self.exported.load(Ordering::Relaxed))
    }

    fn note_error(&self, e: &OTelSdkError) {
        let text = e.to_string().replace('\n', " ");
        let text: String = text.chars().take(300).collect();
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + DOWN_WINDOW);
    }

    fn collector_down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }

    /// The last export error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// An exporter that counts what it delivers, skips requests for a while after a failure, and
/// turns what `tracing` fields cannot express into the conventions' types
/// ([`fix_conventions`]).
#[derive(Debug)]
pub struct CountingExporter<E> {
    inner: E,
    stats: Arc<ExportStats>,
}

impl<E> CountingExporter<E> {
    /// Wraps `inner`, counting into `stats`.
    pub fn new(inner: E, stats: Arc<ExportStats>) -> Self {
        CountingExporter { inner, stats }
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, mut batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        if self.stats.collector_down() {
            self.stats.failed.fetch_add(n, Ordering::Relaxed);
            return Err(OTelSdkError::InternalFailure(
                "the collector failed recently; batch dropped".into(),
            ));
        }
        for s in &mut batch {
            fix_conventions(s);
        }
        let r = self.inner.export(batch).await;
        match &r {
            Ok(()) => {
                self.stats.exported.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.failed.fetch_add(n, Ordering::Relaxed);
                self.stats.note_error(e);
            }
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// `tracing` fields are scalars: `gen_ai.response.finish_reasons`, an array of strings in the
/// GenAI conventions, is recorded as one string and becomes a one-element array here.
pub fn fix_conventions(span: &mut SpanData) {
    for kv in &mut span.attributes {
        if kv.key.as_str() == "gen_ai.response.finish_reasons"
            && let Value::String(s) = &kv.value
        {
            kv.value = Value::Array(Array::String(vec![StringValue::from(s.to_string())]));
        }
    }
}

/// A span exporter that accepts everything and keeps nothing (`--otel-discard`).
#[derive(Debug, Default)]
pub struct DiscardSpans;

impl SpanExporter for DiscardSpans {
    async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
        Ok(())
    }
}

/// A metric exporter that counts failed exports; `None` inside discards.
#[derive(Debug)]
struct CountingMetrics<E> {
    inner: Option<E>,
    stats: Arc<ExportStats>,
}

impl<E: PushMetricExporter> PushMetricExporter for CountingMetrics<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let r = inner.export(metrics).await;
        if let Err(e) = &r {
            self.stats.metric_failures.fetch_add(1, Ordering::Relaxed);
            self.stats.note_error(e);
        }
        r
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.as_ref().map_or(Ok(()), |i| i.force_flush())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner
            .as_ref()
            .map_or(Ok(()), |i| i.shutdown_with_timeout(timeout))
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

// ---- the pipeline ----

/// The live export pipeline: the export queue and its thread, a meter provider with a periodic
/// reader, and the counts for the exit line.
pub struct Pipeline {
    queue: Arc<Queue>,
    drain: Arc<dyn Drain>,
    /// Signalled by the export thread when it has sent what was left at shutdown.
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    meters: Option<SdkMeterProvider>,
    /// The instruments the export thread records into (a copy counts running branches).
    span_metrics: Option<crate::otel_metrics::SpanMetrics>,
    stats: Arc<ExportStats>,
    /// Where spans go, for the exit line.
    target: String,
    /// The sampler, shared by the layers.
    sampling: Arc<Sampling>,
}

impl Pipeline {
    /// Builds the pipeline of `settings`: OTLP/HTTP exporters with a blocking reqwest client,
    /// or discarding ones.
    pub fn start(settings: &Settings) -> Result<Pipeline> {
        let stats = Arc::new(ExportStats::default());
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        match &settings.sink {
            Sink::Discard => {
                let metrics: CountingMetrics<DiscardMetrics> = CountingMetrics {
                    inner: None,
                    stats: Arc::clone(&stats),
                };
                Ok(Pipeline::assemble(
                    DiscardSpans,
                    Some(metrics),
                    resource,
                    stats,
                    "a discarding exporter".into(),
                    settings.sampler,
                ))
            }
            Sink::Otlp { traces, metrics } => {
                let client = http_client(settings)?;
                let spans = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(client.clone())
                    .with_endpoint(traces.clone())
                    .with_timeout(settings.timeout)
                    .with_retry_policy(retry_policy())
                    .build()
                    .context("cannot build the OTLP span exporter")?;
                let metric_exporter = match metrics {
                    None => None,
                    Some(url) => Some(CountingMetrics {
                        inner: Some(
                            opentelemetry_otlp::MetricExporter::builder()
                                .with_http()
                                .with_http_client(client)
                                .with_endpoint(url.clone())
                                .with_timeout(settings.timeout)
                                .with_retry_policy(retry_policy())
                                .build()
                                .context("cannot build the OTLP metric exporter")?,
                        ),
                        stats: Arc::clone(&stats),
                    }),
                };
                Ok(Pipeline::assemble(
                    spans,
                    metric_exporter,
                    resource,
                    stats,
                    traces.clone(),
                    settings.sampler,
                ))
            }
        }
    }

    /// A pipeline around any span and metric exporters (the in-memory ones in tests), exporting
    /// the traces `sampler` picks.
    pub fn assemble<E, M>(
        spans: E,
        metrics: Option<M>,
        resource: Resource,
        stats: Arc<ExportStats>,
        target: String,
        sampler: Sampler,
    ) -> Pipeline
    where
        E: SpanExporter + 'static,
        M: PushMetricExporter,
    {
        let env_usize = |k: &str, default: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or(default)
        };
        let max = env_usize("OTEL_BSP_MAX_QUEUE_SIZE", QUEUE_SPANS_MAX);
        let batch = env_usize("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", BATCH_SPANS_MAX).min(max);
        let delay = std::env::var("OTEL_BSP_SCHEDULE_DELAY")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(BATCH_DELAY, Duration::from_millis);
        let queue = Arc::new(Queue::new(max, batch, delay, Arc::clone(&stats)));
        let meters = metrics.map(|m| {
            SdkMeterProvider::builder()
                .with_resource(resource.clone())
                .with_reader(PeriodicReader::builder(m).build())
                .build()
        });
        let span_metrics = meters.as_ref().map(|m| {
            use opentelemetry::metrics::MeterProvider as _;
            crate::otel_metrics::SpanMetrics::new(&m.meter("cairn"))
        });
        let mut exporter = CountingExporter::new(spans, Arc::clone(&stats));
        exporter.set_resource(&resource);
        let drain: Arc<dyn Drain> = Arc::new(Exporting {
            queue: Arc::clone(&queue),
            exporter: Mutex::new(exporter),
            metrics: span_metrics.clone(),
            scope: InstrumentationScope::builder("cairn").build(),
        });
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        {
            let (queue, drain) = (Arc::clone(&queue), Arc::clone(&drain));
            // If the thread cannot start, nothing is sent and everything is counted dropped.
            let _ = std::thread::Builder::new()
                .name("cairn-otel-export".into())
                .spawn(move || {
                    lower_priority();
                    export_loop(queue, drain, done_tx)
                });
        }
        Pipeline {
            queue,
            drain,
            done: Mutex::new(Some(done_rx)),
            meters,
            span_metrics,
            stats,
            target,
            sampling: Arc::new(Sampling::new(sampler)),
        }
    }

    /// The `tracing` layer: spans (and the events in them) of cairn's crates at INFO and above
    /// to OpenTelemetry, and the metrics derived from them. Nothing else (other crates,
    /// `cairn::metrics` events, DEBUG spans) reaches it. A workflow thread only copies a
    /// span's fields and queues it when it closes; the export thread derives the metrics and
    /// builds and sends the OpenTelemetry span.
    ///
    /// The `step` spans of a run not exported are not made (the engine hands those attempts to
    /// the layer's [`cairn_engine::StepMeter`]); see [`Pipeline::layer_beside`] when another
    /// layer wants them.
    pub fn layer<S>(&self) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        self.layer_beside(false)
    }

    /// [`Pipeline::layer`], beside layers that may want every `step` span
    /// (`steps_wanted_elsewhere`: the stderr log at INFO shows each one), which then keeps
    /// them in runs not exported too.
    pub fn layer_beside<S>(&self, steps_wanted_elsewhere: bool) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let meter = self.span_metrics.clone().map(|metrics| {
            let queue = Arc::clone(&self.queue);
            let run_queue = Arc::clone(&self.queue);
            let run_metrics = metrics.clone();
            let sampling = Arc::clone(&self.sampling);
            let stats = Arc::clone(&self.queue.stats);
            let meter = cairn_engine::StepMeter::new(move |a| {
                let rec = MetricRec::Step(crate::otel_metrics::StepRec {
                    name: Some(crate::otel_metrics::intern_label(a.step_name)),
                    failed: a.failed,
                    will_retry: a.will_retry,
                });
                queue.push_metric(Some(&metrics), rec, "step", a.secs);
            });
            if steps_wanted_elsewhere {
                // The log shows `run` spans too: each run keeps its span.
                return meter;
            }
            // The sampler decides as each run starts, before its span is made: a run left out
            // then has no span at all (its end is metered), and one exported has its decision
            // taken over by `on_new_span` (a rate-limited sampler is asked once per run).
            meter.with_runs(
                move |run| {
                    let trace_id = if sampling.needs_trace_id() {
                        TraceId::from_bytes(crate::trace::trace_id(run))
                    } else {
                        TraceId::INVALID
                    };
                    if sampling.sample(trace_id) {
                        RUN_SAMPLED.with(|c| c.set(true));
                        false
                    } else {
                        stats.traces_unsampled.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                },
                move |r| {
                    let rec = MetricRec::Other(Box::new(crate::otel_metrics::SpanRec::run(
                        r.workflow, r.status,
                    )));
                    run_queue.push_metric(Some(&run_metrics), rec, "run", r.secs);
                },
            )
        });
        Box::new(SpanLayer {
            queue: Arc::clone(&self.queue),
            metrics: self.span_metrics.clone(),
            sampling: Arc::clone(&self.sampling),
            // With the run hooks (metrics on), a run left out never makes a `step` span: the
            // engine meters its attempts from the start. The `step` callsite is then always
            // interesting, and an exported run's attempts skip the per-span `enabled` check
            // (a lookup of the current span per attempt).
            skip_unsampled_steps: !steps_wanted_elsewhere && self.span_metrics.is_none(),
            meter,
        })
    }

    /// The metrics derived from the spans of cairn's crates, as a layer of their own (none if
    /// metrics are not exported; the bench's probe).
    pub fn metrics_layer<S>(&self) -> Option<Box<dyn Layer<S> + Send + Sync>>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        use opentelemetry::metrics::MeterProvider as _;
        self.meters.as_ref().map(|m| {
            Box::new(
                crate::otel_metrics::SpanMetrics::new(&m.meter("cairn")).with_filter(cairn_spans()),
            ) as Box<dyn Layer<S> + Send + Sync>
        })
    }

    /// Sends the spans queued so far and collects the metrics, on this thread (tests).
    #[cfg(test)]
    fn force_flush(&self) {
        self.drain.flush().unwrap();
        if let Some(m) = &self.meters {
            m.force_flush().unwrap();
        }
    }

    /// A pipeline whose exporters discard everything (the bench's probe), exporting the traces
    /// `sampler` picks.
    pub fn discarding(sampler: Sampler) -> Pipeline {
        let stats = Arc::new(ExportStats::default());
        let metrics: CountingMetrics<DiscardMetrics> = CountingMetrics {
            inner: None,
            stats: Arc::clone(&stats),
        };
        Pipeline::assemble(
            DiscardSpans,
            Some(metrics),
            Resource::builder_empty().build(),
            stats,
            "a discarding exporter".into(),
            sampler,
        )
    }

    /// The counts so far.
    #[cfg(test)]
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }

    /// The note to print at exit when the sampler left runs out of the live export: how many,
    /// and how to send them.
    pub fn sampling_note(&self) -> Option<String> {
        let s = &self.stats;
        let out = s.traces_unsampled.load(Ordering::Relaxed);
        if out == 0 {
            return None;
        }
        let all = out + s.traces_sampled.load(Ordering::Relaxed);
        Some(format!(
            "telemetry: the spans of {out} of {all} runs were not exported live (sampler: {}; \
             their metrics were); `cairn trace RUN --otlp URL` sends any run from its history, \
             OTEL_TRACES_SAMPLER=always_on exports every run",
            self.sampling.sampler.describe()
        ))
    }

    /// Sends what is still queued (within [`EXIT_FLUSH_MAX`]) and stops the exporters; returns
    /// the warning line to print when spans or metrics were not delivered.
    pub fn shutdown(&self) -> Option<String> {
        let started = Instant::now();
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(done) = done {
            self.queue.closing.store(true, Ordering::Relaxed);
            // Taking the lock orders the flag before the thread's next check.
            drop(self.queue.spans.lock().unwrap_or_else(|p| p.into_inner()));
            self.queue.wake.notify_one();
            let _ = done.recv_timeout(EXIT_FLUSH_MAX);
            let _ = self
                .drain
                .shutdown(EXIT_FLUSH_MAX.saturating_sub(started.elapsed()));
        }
        if let Some(m) = &self.meters {
            let left = EXIT_FLUSH_MAX.saturating_sub(started.elapsed());
            let _ = m.shutdown_with_timeout(left.max(Duration::from_millis(100)));
        }
        let s = &self.stats;
        let dropped = s.dropped();
        let metric_failures = s.metric_failures.load(Ordering::Relaxed);
        if dropped == 0 && metric_failures == 0 {
            return None;
        }
        let ended = s.ended.load(Ordering::Relaxed);
        let why = s
            .last_error()
            .map(|e| format!(" (last error: {e}{})", port_hint(&self.target)))
            .unwrap_or_default();
        let metrics = if metric_failures > 0 {
            format!("; {metric_failures} metrics export(s) failed")
        } else {
            String::new()
        };
        Some(format!(
            "telemetry: {dropped} of {ended} spans were dropped, not delivered to {}{metrics}{why}",
            self.target
        ))
    }
}

/// Whether the export layer takes this span or event: cairn's crates, INFO and above (the same
/// as [`cairn_spans`]).
fn is_cairn(meta: &Metadata<'_>) -> bool {
    if *meta.level() > tracing::Level::INFO {
        return false;
    }
    let target = meta.target();
    ["cairn_engine", "cairn_agents", "cairn_cli"]
        .iter()
        .any(|c| {
            target
                .strip_prefix(c)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// What the export layers see: the spans and events of cairn's crates at INFO and above.
fn cairn_spans() -> Targets {
    Targets::new()
        .with_target("cairn_engine", tracing::Level::INFO)
        .with_target("cairn_agents", tracing::Level::INFO)
        .with_target("cairn_cli", tracing::Level::INFO)
}

/// A hint when the URL names the OTLP/gRPC port.
fn port_hint(url: &str) -> &'static str {
    if crate::trace::port_of(url) == Some("4317") {
        "; 4317 is the OTLP/gRPC port, cairn speaks OTLP/HTTP, usually on 4318"
    } else {
        ""
    }
}

/// Few, quick retries: spans are telemetry, and a batch waiting on retries holds the queue.
fn retry_policy() -> opentelemetry_otlp::RetryPolicy {
    opentelemetry_otlp::RetryPolicy::recommended()
        .with_max_retries(1)
        .with_initial_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(500))
}

/// The blocking client the exporters POST with, on the batch thread (reqwest 0.13, rustls with
/// ring, as the rest of cairn). Built before any async runtime exists.
fn http_client(settings: &Settings) -> Result<reqwest::blocking::Client> {
    // reqwest is built without a bundled TLS provider: install ring's, so https:// collectors
    // work. Err means one is installed already, which reqwest then uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
        .timeout(settings.timeout)
        .default_headers(settings.headers.clone())
        .build()
        .context("cannot build the OTLP HTTP client")
}

/// The metric exporter type of a discarding pipeline (never constructed: `None` inside
/// [`CountingMetrics`] discards).
#[derive(Debug)]
struct DiscardMetrics;

impl PushMetricExporter for DiscardMetrics {
    async fn export(&self, _metrics: &ResourceMetrics) -> OTelSdkResult {
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use cairn_engine::{Engine, StartOptions};
    use cairn_storage::{RedbStore, RunStatus};
    use opentelemetry::trace::{SpanKind, Status};
    use opentelemetry_sdk::metrics::InMemoryMetricExporter;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    use opentelemetry_sdk::trace::InMemorySpanExporter;
    use serde_json::json;
    use tracing_subscriber::layer::SubscriberExt;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn sink(flag: Option<&str>, vars: &[(&str, &str)]) -> Option<Sink> {
        settings(flag, false, &env_of(vars))
            .unwrap()
            .map(|s| s.sink)
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_given() {
        assert_eq!(sink(None, &[]), None);
        assert_eq!(sink(None, &[("OTEL_SERVICE_NAME", "x")]), None);
        assert_eq!(
            sink(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:4318")]),
            Some(Sink::Otlp {
                traces: "http://h:4318/v1/traces".into(),
                metrics: Some("http://h:4318/v1/metrics".into()),
            })
        );
        // A signal's own variable is used as it is; the other signal stays off.
        assert_eq!(
            sink(
                None,
                &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://h:9/custom")]
            ),
            Some(Sink::Otlp {
                traces: "http://h:9/custom".into(),
                metrics: None,
            })
        );
        // The flag wins over the variables, and over OTEL_SDK_DISABLED.
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert_eq!(sink(None, &vars), None);
        assert_eq!(
            sink(Some("http://flag:4318/"), &vars),
            Some(Sink::Otlp {
                traces: "http://flag:4318/v1/traces".into(),
                metrics: Some("http://flag:4318/v1/metrics".into()),
            })
        );
        assert!(settings(Some("flag:4318"), false, &env_of(&[])).is_err());
        let s = settings(
            Some("http://h:4318"),
            false,
            &env_of(&[
                ("OTEL_SERVICE_NAME", "svc"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s3cret,x=y"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.service_name, "svc");
        assert_eq!(s.headers.get("api-key").unwrap(), "s3cret");
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert!(
            settings(
                Some("http://h:4318"),
                false,
                &env_of(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")])
            )
            .is_err()
        );
    }

    /// What an agent run exported, in memory.
    struct Captured {
        run: String,
        status: RunStatus,
        spans: Vec<SpanData>,
        metrics: Vec<ResourceMetrics>,
    }

    /// Runs the built-in `agent` workflow on a scripted model (a turn with two `word_count`
    /// calls, one with bad arguments, then the answer) under a subscriber with only the export
    /// layers, on this thread (a current-thread runtime), and collects what was exported. The
    /// default sampler: one run is exported.
    async fn agent_run() -> Captured {
        agent_run_sampled(Sampler::from_env(&env_of(&[])).unwrap()).await
    }

    /// [`agent_run`] with `sampler`.
    async fn agent_run_sampled(sampler: Sampler) -> Captured {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script.jsonl");
        let lines = [
            json!({"id": "s1", "model": "scripted-resp", "stop_reason": "tool_use",
                   "content": [
                       {"type": "tool_use", "id": "t1", "name": "word_count",
                        "input": {"text": "one two three"}},
                       {"type": "tool_use", "id": "t2", "name": "word_count",
                        "input": {"txt": "no"}}],
                   "usage": {"input_tokens": 111, "output_tokens": 22}}),
            json!({"id": "s2", "model": "scripted-resp", "stop_reason": "end_turn",
                   "content": [{"type": "text", "text": "three words"}],
                   "usage": {"input_tokens": 133, "output_tokens": 4}}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&script, text).unwrap();

        let (spans, metrics, stats, pipeline) = memory_pipeline(sampler);
        let subscriber = tracing_subscriber::registry().with(pipeline.layer());
        let guard = tracing::subscriber::set_default(subscriber);
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let engine = Engine::new(store, crate::workflows::registry(Arc::default()));
        let input = json!({
            "provider": "scripted", "model": "scripted-1", "task": "count",
            "script": script.to_str().unwrap(), "max_turns": 4,
        });
        let h = engine
            .start_with(StartOptions::new("agent", input))
            .await
            .unwrap();
        let out = h.wait().await.unwrap();
        // The run's task (and its span) ends just after it reports the outcome.
        engine.wait_idle().await;
        drop(engine);
        drop(guard);
        // The in-memory exporters forget everything when shut down: read them after a flush.
        pipeline.force_flush();
        let captured = Captured {
            run: out.run_id,
            status: out.status,
            spans: spans.get_finished_spans().unwrap(),
            metrics: metrics.get_finished_metrics().unwrap(),
        };
        assert_eq!(pipeline.shutdown(), None, "nothing dropped");
        assert_eq!(stats.dropped(), 0);
        let sampled = stats.traces_sampled.load(Ordering::Relaxed);
        let unsampled = stats.traces_unsampled.load(Ordering::Relaxed);
        assert_eq!(sampled + unsampled, 1, "one run, one trace");
        assert_eq!(pipeline.sampling_note().is_some(), unsampled == 1);
        captured
    }

    fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    fn attr_str(s: &SpanData, key: &str) -> Option<String> {
        attr(s, key).map(|v| v.as_str().into_owned())
    }

    fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
        spans.iter().filter(|s| s.name == name).collect()
    }

    fn parent<'a>(spans: &'a [SpanData], s: &SpanData) -> &'a SpanData {
        spans
            .iter()
            .find(|p| p.span_context.span_id() == s.parent_span_id)
            .unwrap_or_else(|| panic!("no parent of {}", s.name))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_agent_run_exports_its_span_tree_with_gen_ai_attributes_and_errors() {
        let c = agent_run().await;
        assert_eq!(c.status, RunStatus::Completed);
        let spans = &c.spans;
        let run: cairn_storage::RunId = c.run.parse().unwrap();
        let tid = TraceId::from_bytes(crate::trace::trace_id(run));
        assert!(
            spans.iter().all(|s| s.span_context.trace_id() == tid),
            "every span is in the run's trace"
        );

        // run → invoke_agent → step (model) → chat, and step (tool:word_count) → execute_tool.
        let root = named(spans, "run");
        assert_eq!(root.len(), 1);
        assert_eq!(
            root[0].parent_span_id,
            opentelemetry::trace::SpanId::INVALID
        );
        let agent = named(spans, "invoke_agent assistant");
        assert_eq!(agent.len(), 1);
        assert_eq!(parent(spans, agent[0]).name, "run");
        let chats = named(spans, "chat scripted-1");
        assert_eq!(chats.len(), 2);
        for c in &chats {
            let step = parent(spans, c);
            assert_eq!(attr_str(step, "cairn.step_name").as_deref(), Some("model"));
            assert_eq!(attr(step, "cairn.attempt"), Some(&Value::I64(1)));
            assert_eq!(attr_str(step, "cairn.run_id"), Some(run.to_string()));
            assert!(attr_str(step, "cairn.step_path").unwrap().starts_with("0."));
            assert_eq!(parent(spans, step).name, "invoke_agent assistant");
            assert_eq!(c.span_kind, SpanKind::Client);
            assert_eq!(c.status, Status::Unset);
        }
        let first = chats
            .iter()
            .find(|c| attr(c, "gen_ai.usage.input_tokens") == Some(&Value::I64(111)))
            .expect("the first call");
        for (k, v) in [
            ("gen_ai.operation.name", "chat"),
            ("gen_ai.provider.name", "scripted"),
            ("gen_ai.system", "scripted"),
            ("gen_ai.request.model", "scripted-1"),
            ("gen_ai.response.model", "scripted-resp"),
            ("gen_ai.response.id", "s1"),
            ("gen_ai.agent.name", "assistant"),
        ] {
            assert_eq!(attr_str(first, k).as_deref(), Some(v), "{k}");
        }
        assert_eq!(
            attr(first, "gen_ai.usage.output_tokens"),
            Some(&Value::I64(22))
        );
        assert_eq!(
            attr(first, "gen_ai.response.finish_reasons"),
            Some(&Value::Array(Array::String(vec!["tool_use".into()])))
        );

        let tools = named(spans, "execute_tool word_count");
        assert_eq!(tools.len(), 2);
        for t in &tools {
            assert_eq!(
                attr_str(parent(spans, t), "cairn.step_name").as_deref(),
                Some("tool:word_count")
            );
            assert_eq!(
                attr_str(t, "gen_ai.operation.name").as_deref(),
                Some("execute_tool")
            );
            assert_eq!(
                attr_str(t, "gen_ai.tool.name").as_deref(),
                Some("word_count")
            );
        }
        let failed = tools
            .iter()
            .find(|t| attr_str(t, "gen_ai.tool.call.id").as_deref() == Some("t2"))
            .unwrap();
        assert!(matches!(failed.status, Status::Error { .. }), "{failed:?}");
        assert_eq!(
            attr_str(failed, "error.type").as_deref(),
            Some("tool_error")
        );
        assert!(
            attr_str(failed, "exception.message")
                .unwrap()
                .contains("bad arguments for `word_count`")
        );
        let ok = tools
            .iter()
            .find(|t| attr_str(t, "gen_ai.tool.call.id").as_deref() == Some("t1"))
            .unwrap();
        assert_eq!(ok.status, Status::Unset);
        // No `tracing` field leaks as an attribute under its special name.
        assert!(spans.iter().all(|s| attr(s, "otel.status_code").is_none()));
    }

    /// The sum of a u64 counter's points whose attributes include all of `with`.
    fn counter(metrics: &[ResourceMetrics], name: &str, with: &[(&str, &str)]) -> u64 {
        let last = metrics.last().expect("a metrics export");
        let mut total = 0;
        for m in last.scope_metrics().flat_map(|s| s.metrics()) {
            if m.name() != name {
                continue;
            }
            let AggregatedMetrics::U64(MetricData::Sum(sum)) = m.data() else {
                panic!("{name} is not a u64 counter");
            };
            for p in sum.data_points() {
                let attrs: Vec<(String, String)> = p
                    .attributes()
                    .map(|kv| (kv.key.to_string(), kv.value.as_str().into_owned()))
                    .collect();
                if with
                    .iter()
                    .all(|(k, v)| attrs.iter().any(|(ak, av)| ak == k && av == v))
                {
                    total += p.value();
                }
            }
        }
        total
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_agent_run_counts_its_steps_calls_and_tokens() {
        let c = agent_run().await;
        assert_agent_run_counted(&c.metrics);
    }

    /// The metrics of one `agent_run`: 1 run, 2 model calls with their tokens, a failed and a
    /// succeeded tool call, and 4 step attempts, none failed (the failed tool call is sent
    /// back to the model: its step succeeds).
    fn assert_agent_run_counted(m: &[ResourceMetrics]) {
        assert_eq!(
            counter(m, "cairn.runs", &[("cairn.run.status", "completed")]),
            1
        );
        assert_eq!(
            counter(
                m,
                "cairn.model.calls",
                &[("gen_ai.agent.name", "assistant")]
            ),
            2
        );
        assert_eq!(
            counter(m, "cairn.model.tokens", &[("gen_ai.token.type", "input")]),
            111 + 133
        );
        assert_eq!(
            counter(m, "cairn.model.tokens", &[("gen_ai.token.type", "output")]),
            22 + 4
        );
        assert_eq!(
            counter(m, "cairn.tool.calls", &[("cairn.outcome", "failed")]),
            1
        );
        assert_eq!(
            counter(m, "cairn.tool.calls", &[("cairn.outcome", "succeeded")]),
            1
        );
        assert_eq!(
            step_attempts(m, &[("cairn.outcome", "failed")]),
            0,
            "no failed attempt"
        );
        assert_eq!(step_attempts(m, &[("cairn.step_name", "model")]), 2);
        assert_eq!(
            step_attempts(m, &[("cairn.step_name", "tool:word_count")]),
            2
        );
    }

    /// The count of `cairn.step.duration` points whose attributes include all of `with`.
    fn step_attempts(metrics: &[ResourceMetrics], with: &[(&str, &str)]) -> u64 {
        observations(metrics, "cairn.step.duration", with)
    }

    /// The count of the f64 histogram `name`'s points whose attributes include all of `with`.
    fn observations(metrics: &[ResourceMetrics], name: &str, with: &[(&str, &str)]) -> u64 {
        let last = metrics.last().expect("a metrics export");
        let mut total = 0;
        for m in last.scope_metrics().flat_map(|s| s.metrics()) {
            if m.name() != name {
                continue;
            }
            let AggregatedMetrics::F64(MetricData::Histogram(h)) = m.data() else {
                panic!("{name} is not an f64 histogram");
            };
            for p in h.data_points() {
                let attrs: Vec<(String, String)> = p
                    .attributes()
                    .map(|kv| (kv.key.to_string(), kv.value.as_str().into_owned()))
                    .collect();
                if with
                    .iter()
                    .all(|(k, v)| attrs.iter().any(|(ak, av)| ak == k && av == v))
                {
                    total += p.count();
                }
            }
        }
        total
    }

    fn sampler_of(vars: &[(&str, &str)]) -> Result<Sampler> {
        Sampler::from_env(&env_of(vars))
    }

    #[test]
    fn the_sampler_comes_from_the_standard_variables() {
        assert_eq!(
            sampler_of(&[]).unwrap(),
            Sampler::RateLimited(DEFAULT_RUNS_PER_SEC)
        );
        for (name, want) in [
            ("always_on", Sampler::AlwaysOn),
            ("parentbased_always_on", Sampler::AlwaysOn),
            ("ALWAYS_OFF", Sampler::AlwaysOff),
            ("parentbased_always_off", Sampler::AlwaysOff),
            ("traceidratio", Sampler::Ratio(1.0)),
            (
                "cairn_rate_limited",
                Sampler::RateLimited(DEFAULT_RUNS_PER_SEC),
            ),
        ] {
            assert_eq!(
                sampler_of(&[("OTEL_TRACES_SAMPLER", name)]).unwrap(),
                want,
                "{name}"
            );
        }
        let with_arg = |name: &str, arg: &str| {
            sampler_of(&[
                ("OTEL_TRACES_SAMPLER", name),
                ("OTEL_TRACES_SAMPLER_ARG", arg),
            ])
        };
        assert_eq!(
            with_arg("traceidratio", "0.25").unwrap(),
            Sampler::Ratio(0.25)
        );
        assert_eq!(
            with_arg("parentbased_traceidratio", " 0 ").unwrap(),
            Sampler::Ratio(0.0)
        );
        assert_eq!(
            with_arg("cairn_rate_limited", "5").unwrap(),
            Sampler::RateLimited(5.0)
        );
        // The argument of a sampler that takes none is ignored, as the SDKs do.
        assert_eq!(with_arg("always_on", "0.5").unwrap(), Sampler::AlwaysOn);
        for (name, arg) in [
            ("traceidratio", "1.5"),
            ("traceidratio", "-0.1"),
            ("traceidratio", "half"),
            ("cairn_rate_limited", "0"),
            ("cairn_rate_limited", "NaN"),
        ] {
            let e = with_arg(name, arg).unwrap_err().to_string();
            assert!(e.contains("OTEL_TRACES_SAMPLER_ARG"), "{e}");
        }
        let e = sampler_of(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("OTEL_TRACES_SAMPLER") && e.contains("jaeger_remote"),
            "{e}"
        );
        // Through the settings, and a bad value is a usage error (exit 2).
        let s = settings(
            Some("http://h:4318"),
            false,
            &env_of(&[("OTEL_TRACES_SAMPLER", "always_off")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.sampler, Sampler::AlwaysOff);
        let e = settings(
            Some("http://h:4318"),
            false,
            &env_of(&[("OTEL_TRACES_SAMPLER", "sometimes")]),
        )
        .unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
    }

    #[test]
    fn the_ratio_decides_as_the_sdks_traceidratio_sampler() {
        use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};
        let mut n = 0;
        for ratio in [0.0, 0.1, 0.5, 0.9, 1.0] {
            let sdk = opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(ratio);
            let mut ours = 0;
            for _ in 0..2_000 {
                let run = cairn_storage::RunId::new();
                let tid = TraceId::from_bytes(crate::trace::trace_id(run));
                let want = sdk
                    .should_sample(None, tid, "run", &SpanKind::Internal, &[], &[])
                    .decision
                    == SamplingDecision::RecordAndSample;
                assert_eq!(ratio_samples(ratio, tid), want, "ratio {ratio}, {tid}");
                ours += usize::from(want);
                n += 1;
            }
            let share = ours as f64 / 2_000.0;
            assert!((share - ratio).abs() < 0.05, "ratio {ratio}: {share}");
        }
        assert_eq!(n, 10_000);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_run_sampled_out_exports_no_span_and_is_still_counted() {
        let c = agent_run_sampled(Sampler::AlwaysOff).await;
        assert_eq!(c.status, RunStatus::Completed);
        assert!(c.spans.is_empty(), "{:#?}", c.spans);
        // The same counts as the exported run of an_agent_run_counts_its_steps_calls_and_tokens.
        assert_agent_run_counted(&c.metrics);
    }

    /// A run the sampler leaves out is not entered while its workflow runs once its first step
    /// has found it left out, so a span made later at the workflow's level (here a fan-out's)
    /// has no parent: it must count as part of the run, left out with it, and not as the root
    /// of a trace of its own, which a sampler keeping 99.9% of traces would keep.
    #[tokio::test(flavor = "current_thread")]
    async fn spans_without_a_parent_in_a_run_left_out_are_left_out_with_it() {
        let ratio = 0.999;
        let id = (0..100_000u128)
            .map(|i| cairn_storage::RunId::from_u128(i << 64 | 0x5eed))
            .find(|id| !ratio_samples(ratio, TraceId::from_bytes(crate::trace::trace_id(*id))))
            .expect("a run id the ratio leaves out");
        let mut r = cairn_engine::Registry::new();
        r.register("step_then_fan", 1, |ctx, (): ()| async move {
            ctx.step("first", || async { Ok(1u32) }).await?;
            let fan = ctx
                .fan_out(
                    "fan",
                    vec![1u32, 2, 3],
                    cairn_engine::FanOutOptions::new(2),
                    |b, i: u32| async move { b.step("square", move || async move { Ok(i * i) }).await },
                )
                .await?;
            Ok::<_, cairn_engine::WorkflowError>(fan.into_successes().iter().sum::<u32>())
        });
        let dir = tempfile::tempdir().unwrap();
        let (spans, metrics, stats, pipeline) = memory_pipeline(Sampler::Ratio(ratio));
        let guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(pipeline.layer()));
        let engine = Engine::new(RedbStore::open(dir.path().join("s.redb")).unwrap(), r);
        let mut start = StartOptions::new("step_then_fan", json!(null));
        start.id = Some(id);
        let out = engine
            .start_with(start)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        engine.wait_idle().await;
        drop(engine);
        drop(guard);
        pipeline.force_flush();
        assert_eq!(out.status, RunStatus::Completed);
        assert_eq!(out.output, Some(json!(14)));
        let spans = spans.get_finished_spans().unwrap();
        assert!(spans.is_empty(), "{spans:#?}");
        assert_eq!(stats.traces_sampled.load(Ordering::Relaxed), 0);
        assert_eq!(
            stats.traces_unsampled.load(Ordering::Relaxed),
            1,
            "one trace: the run's"
        );
        let m = metrics.get_finished_metrics().unwrap();
        assert_eq!(step_attempts(&m, &[("cairn.step_name", "first")]), 1);
        assert_eq!(step_attempts(&m, &[("cairn.step_name", "square")]), 3);
        assert_eq!(
            counter(
                &m,
                "cairn.fan_out.branches",
                &[("cairn.branch.outcome", "succeeded")]
            ),
            3
        );
        assert_eq!(pipeline.shutdown(), None, "nothing dropped");
    }

    /// A pipeline exporting to in-memory span and metric exporters with `sampler`.
    fn memory_pipeline(
        sampler: Sampler,
    ) -> (
        InMemorySpanExporter,
        InMemoryMetricExporter,
        Arc<ExportStats>,
        Pipeline,
    ) {
        let spans = InMemorySpanExporter::default();
        let metrics = InMemoryMetricExporter::default();
        let stats = Arc::new(ExportStats::default());
        let pipeline = Pipeline::assemble(
            spans.clone(),
            Some(CountingMetrics {
                inner: Some(metrics.clone()),
                stats: Arc::clone(&stats),
            }),
            Resource::builder_empty().build(),
            Arc::clone(&stats),
            "memory".into(),
            sampler,
        );
        (spans, metrics, stats, pipeline)
    }

    /// Starts `runs` runs of the built-in `steps` workflow (3 steps each) at once under a
    /// pipeline with `sampler`, on this thread; returns the run ids, the spans, the metrics
    /// and the counts.
    async fn steps_runs(
        runs: usize,
        sampler: Sampler,
    ) -> (
        Vec<String>,
        Vec<SpanData>,
        Vec<ResourceMetrics>,
        Arc<ExportStats>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (spans, metrics, stats, pipeline) = memory_pipeline(sampler);
        let subscriber = tracing_subscriber::registry().with(pipeline.layer());
        let guard = tracing::subscriber::set_default(subscriber);
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let engine = Engine::new(store, crate::workflows::registry(Arc::default()));
        let mut handles = Vec::new();
        for _ in 0..runs {
            handles.push(
                engine
                    .start_with(StartOptions::new("steps", json!({"steps": 3})))
                    .await
                    .unwrap(),
            );
        }
        let mut ids = Vec::new();
        for h in handles {
            let out = h.wait().await.unwrap();
            assert_eq!(out.status, RunStatus::Completed);
            ids.push(out.run_id);
        }
        engine.wait_idle().await;
        drop(engine);
        drop(guard);
        pipeline.force_flush();
        let (s, m) = (
            spans.get_finished_spans().unwrap(),
            metrics.get_finished_metrics().unwrap(),
        );
        assert_eq!(pipeline.shutdown(), None, "nothing dropped");
        (ids, s, m, stats)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_sampled_run_has_its_whole_tree_and_every_run_is_counted() {
        let (ids, spans, m, stats) = steps_runs(40, Sampler::Ratio(0.5)).await;
        let mut exported = 0;
        for id in &ids {
            let run: cairn_storage::RunId = id.parse().unwrap();
            let tid = TraceId::from_bytes(crate::trace::trace_id(run));
            let mine: Vec<&SpanData> = spans
                .iter()
                .filter(|s| s.span_context.trace_id() == tid)
                .collect();
            if !ratio_samples(0.5, tid) {
                assert!(mine.is_empty(), "run {id} was not sampled: no span of it");
                continue;
            }
            exported += 1;
            // The whole tree: the run and its three steps, each step a child of the run.
            assert_eq!(mine.len(), 4, "run {id}: {mine:#?}");
            let root: Vec<_> = mine.iter().filter(|s| s.name == "run").collect();
            assert_eq!(root.len(), 1);
            let root_id = root[0].span_context.span_id();
            let steps: Vec<_> = mine.iter().filter(|s| s.name == "step").collect();
            assert_eq!(steps.len(), 3);
            for st in steps {
                assert_eq!(st.parent_span_id, root_id);
                assert_eq!(attr_str(st, "cairn.run_id").as_deref(), Some(id.as_str()));
            }
        }
        assert_eq!(
            spans.len(),
            exported * 4,
            "no span outside the sampled runs"
        );
        assert!(exported > 0 && exported < 40, "{exported} of 40 sampled");
        assert_eq!(
            stats.traces_sampled.load(Ordering::Relaxed),
            exported as u64
        );
        assert_eq!(
            stats.traces_unsampled.load(Ordering::Relaxed),
            40 - exported as u64
        );
        // Metrics count every run and every step attempt, sampled or not.
        assert_eq!(
            counter(&m, "cairn.runs", &[("cairn.run.status", "completed")]),
            40
        );
        assert_eq!(step_attempts(&m, &[("cairn.step_name", "step")]), 120);
    }

    /// Runs one run of the built-in `workflow`, with the input `input` makes from a temp dir,
    /// on this thread under a pipeline with `sampler`, its layer beside `seen` (and beside a log
    /// that wants every step span when `log_wants_steps`); returns the exported spans and the
    /// metrics.
    async fn one_run(
        sampler: Sampler,
        log_wants_steps: bool,
        seen: &StepSpans,
        workflow: &str,
        input: impl FnOnce(&std::path::Path) -> serde_json::Value,
    ) -> (Vec<SpanData>, Vec<ResourceMetrics>) {
        let dir = tempfile::tempdir().unwrap();
        let (spans, metrics, _stats, pipeline) = memory_pipeline(sampler);
        let subscriber = tracing_subscriber::registry()
            .with(pipeline.layer_beside(log_wants_steps))
            .with(seen.clone());
        let guard = tracing::subscriber::set_default(subscriber);
        let store = RedbStore::open(dir.path().join("s.redb")).unwrap();
        let engine = Engine::new(store, crate::workflows::registry(Arc::default()));
        let h = engine
            .start_with(StartOptions::new(workflow, input(dir.path())))
            .await
            .unwrap();
        assert_eq!(h.wait().await.unwrap().status, RunStatus::Completed);
        engine.wait_idle().await;
        drop(engine);
        drop(guard);
        pipeline.force_flush();
        let out = (
            spans.get_finished_spans().unwrap(),
            metrics.get_finished_metrics().unwrap(),
        );
        assert_eq!(pipeline.shutdown(), None, "nothing dropped");
        out
    }

    /// Counts the `step` and `run` spans a subscriber made (any layer could see them).
    #[derive(Clone, Default)]
    struct StepSpans(
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
    );

    impl StepSpans {
        /// The `run` spans made.
        fn runs(&self) -> usize {
            self.1.load(Ordering::Relaxed)
        }
    }

    impl<S: Subscriber> Layer<S> for StepSpans {
        fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: LayerContext<'_, S>) {
            match attrs.metadata().name() {
                "step" => self.0.fetch_add(1, Ordering::Relaxed),
                "run" => self.1.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
        }
    }

    /// A run left out of the export makes no `step` span at all (the engine measures each
    /// attempt with an event instead): its failed attempts and retries count the same as an
    /// exported run's.
    #[tokio::test(flavor = "current_thread")]
    async fn failed_attempts_and_retries_count_the_same_whether_the_run_is_exported_or_not() {
        for sampler in [Sampler::AlwaysOn, Sampler::AlwaysOff] {
            // The step fails twice, then succeeds.
            let (spans, m) = one_run(sampler, false, &StepSpans::default(), "flaky", |dir| {
                json!({
                    "failures": 2, "backoff_ms": 1,
                    "attempts_file": dir.join("attempts").to_str().unwrap(),
                })
            })
            .await;
            let steps = named(&spans, "step").len();
            match sampler {
                Sampler::AlwaysOn => assert_eq!(steps, 3, "{spans:#?}"),
                _ => assert!(spans.is_empty(), "{spans:#?}"),
            }
            let call = ("cairn.step_name", "call");
            assert_eq!(
                step_attempts(&m, &[call, ("cairn.outcome", "failed")]),
                2,
                "{sampler:?}"
            );
            assert_eq!(
                step_attempts(&m, &[call, ("cairn.outcome", "succeeded")]),
                1,
                "{sampler:?}"
            );
            assert_eq!(counter(&m, "cairn.step.retries", &[call]), 2, "{sampler:?}");
        }
    }

    /// Beside a log that shows INFO spans, the steps of a run left out of the export stay
    /// spans (the log needs them); alone, the export layer has them not made at all.
    #[tokio::test(flavor = "current_thread")]
    async fn steps_of_runs_not_exported_are_spans_only_when_the_log_wants_them() {
        for wanted in [false, true] {
            let seen = StepSpans::default();
            let (spans, m) = one_run(
                Sampler::AlwaysOff,
                wanted,
                &seen,
                "steps",
                |_| json!({"steps": 3}),
            )
            .await;
            assert!(spans.is_empty());
            assert_eq!(step_attempts(&m, &[("cairn.step_name", "step")]), 3);
            let made = seen.0.load(Ordering::Relaxed);
            assert_eq!(made, if wanted { 3 } else { 0 }, "wanted: {wanted}");
            // The run's own span likewise; the run is counted and timed either way.
            assert_eq!(seen.runs(), usize::from(wanted), "wanted: {wanted}");
            let run = [
                ("cairn.workflow", "steps"),
                ("cairn.run.status", "completed"),
            ];
            assert_eq!(counter(&m, "cairn.runs", &run), 1, "wanted: {wanted}");
            assert_eq!(
                observations(&m, "cairn.run.duration", &run),
                1,
                "wanted: {wanted}"
            );
        }
    }

    /// An exported run still has its `run` span (the sampler's decision, taken as the run
    /// starts, carries over to it), and a run left out has none: its end is metered.
    #[tokio::test(flavor = "current_thread")]
    async fn a_run_left_out_makes_no_run_span_and_is_still_counted() {
        for sampler in [Sampler::AlwaysOn, Sampler::AlwaysOff] {
            let seen = StepSpans::default();
            let (spans, m) = one_run(sampler, false, &seen, "steps", |_| json!({"steps": 2})).await;
            let exported = matches!(sampler, Sampler::AlwaysOn);
            assert_eq!(seen.runs(), usize::from(exported), "{sampler:?}");
            assert_eq!(named(&spans, "run").len(), usize::from(exported));
            let run = [
                ("cairn.workflow", "steps"),
                ("cairn.run.status", "completed"),
            ];
            assert_eq!(counter(&m, "cairn.runs", &run), 1, "{sampler:?}");
            assert_eq!(observations(&m, "cairn.run.duration", &run), 1);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_rate_limited_sampler_exports_a_burst_of_runs_then_counts_the_rest() {
        let (_, spans, m, stats) = steps_runs(20, Sampler::RateLimited(2.0)).await;
        let sampled = stats.traces_sampled.load(Ordering::Relaxed);
        // Two at once (the bucket holds a second's worth), a third if the test is slow.
        assert!((2..=3).contains(&sampled), "{sampled}");
        assert_eq!(spans.len() as u64, sampled * 4);
        assert_eq!(stats.traces_unsampled.load(Ordering::Relaxed), 20 - sampled);
        assert_eq!(
            counter(&m, "cairn.runs", &[("cairn.run.status", "completed")]),
            20
        );
        assert_eq!(step_attempts(&m, &[("cairn.step_name", "step")]), 60);
    }

    #[test]
    fn finish_reasons_become_an_array() {
        let mut s = SpanData {
            span_context: opentelemetry::trace::SpanContext::empty_context(),
            parent_span_id: opentelemetry::trace::SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: "chat".into(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            end_time: std::time::SystemTime::UNIX_EPOCH,
            attributes: vec![KeyValue::new("gen_ai.response.finish_reasons", "end_turn")],
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        };
        fix_conventions(&mut s);
        assert_eq!(
            s.attributes[0].value,
            Value::Array(Array::String(vec!["end_turn".into()]))
        );
    }

    #[test]
    fn a_dead_collector_drops_and_counts_without_waiting() {
        // Nothing listens on a port just released.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}");
        let s = settings(Some(&url), false, &env_of(&[])).unwrap().unwrap();
        let p = Pipeline::start(&s).unwrap();
        let subscriber = tracing_subscriber::registry().with(p.layer());
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..10 {
                let _s = tracing::info_span!(target: "cairn_engine::x", "step", i).entered();
            }
            // Not ours: not exported.
            let _s = tracing::info_span!(target: "hyper", "conn").entered();
        });
        let started = Instant::now();
        let warning = p.shutdown().expect("a warning");
        assert!(started.elapsed() < EXIT_FLUSH_MAX + Duration::from_secs(1));
        assert!(
            warning.starts_with(&format!(
                "telemetry: 10 of 10 spans were dropped, not delivered to {url}/v1/traces"
            )),
            "{warning}"
        );
        assert_eq!(p.stats().dropped(), 10);
    }

    #[test]
    fn metric_records_wake_the_export_thread_only_when_the_queue_fills() {
        let queue = Queue::new(8, 2, Duration::from_secs(1), Arc::default());
        let metric = || Ended::Metric {
            rec: MetricRec::Step(Default::default()),
            kind: "step",
            secs: 0.0,
        };
        let due = |q: &Queue| q.spans.lock().unwrap().due(q);
        // Metric records (a step of a run not exported) wait for the timer...
        for _ in 0..5 {
            assert!(queue.push(metric()).is_none());
            assert!(!due(&queue));
        }
        // ...or for the queue three quarters full.
        assert!(queue.push(metric()).is_none());
        assert!(due(&queue));
        assert_eq!(queue.take().iter().map(Vec::len).sum::<usize>(), 6);
        assert!(!due(&queue));
        // A batch of spans to export is due at once, whatever else waits.
        let span = || {
            Ended::Span(Box::new(SpanEnd {
                live: LiveSpan {
                    trace_id: TraceId::INVALID,
                    span_id: SpanId::INVALID,
                    parent_span_id: SpanId::INVALID,
                    name: Cow::Borrowed("step"),
                    kind: SpanKind::Internal,
                    start_time: SystemTime::now(),
                    attributes: Vec::new(),
                    events: Vec::new(),
                    status: Status::Unset,
                },
                end_time: SystemTime::now(),
                kind: "step",
            }))
        };
        assert!(queue.push(metric()).is_none());
        assert!(queue.push(span()).is_none());
        assert!(!due(&queue));
        assert!(queue.push(span()).is_none());
        assert!(due(&queue));
        // Beyond the most it holds, an entry is given back (its metrics are then recorded by
        // the thread that ended it).
        for _ in 0..5 {
            assert!(queue.push(metric()).is_none());
        }
        assert!(queue.push(metric()).is_some());
    }

    #[test]
    fn metric_records_wait_in_each_threads_shard_and_are_all_taken() {
        let queue = Arc::new(Queue::new(600, 2, Duration::from_secs(1), Arc::default()));
        let metric = || MetricRec::Step(Default::default());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let q = Arc::clone(&queue);
                std::thread::spawn(move || {
                    for _ in 0..CHUNK + 44 {
                        q.push_metric(None, metric(), "step", 0.0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Each thread handed one full chunk over; the rest waits in its shard, and is taken
        // too (the threads are gone).
        assert_eq!(queue.spans.lock().unwrap().len, 2 * CHUNK);
        let taken = queue.take();
        assert_eq!(taken.iter().map(Vec::len).sum::<usize>(), 2 * (CHUNK + 44));
        assert_eq!(queue.take().iter().map(Vec::len).sum::<usize>(), 0);
        assert!(
            queue.shards.lock().unwrap().is_empty(),
            "the ended threads' shards are let go"
        );
        // A chunk that does not fit is given back, for its thread to record.
        let chunk = |n| {
            (0..n).map(|_| Ended::Metric {
                rec: metric(),
                kind: "step",
                secs: 0.0,
            })
        };
        assert!(queue.hand_over(chunk(CHUNK).collect()).is_none());
        assert!(queue.hand_over(chunk(CHUNK).collect()).is_none());
        assert_eq!(
            queue.hand_over(chunk(CHUNK).collect()).map(|c| c.len()),
            Some(CHUNK)
        );
    }
}
