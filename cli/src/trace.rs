//! `cairn trace RUN --otlp URL`: re-emits a recorded run as an OpenTelemetry trace.
//!
//! The run's history already holds everything a trace needs: when each step started and
//! finished, its attempts and errors, and for agents the whole model call (model, usage, cost,
//! finish reason) and tool call. This module folds the events into a span tree with the
//! original timestamps and sends it over OTLP/HTTP (protobuf), so a run recorded without a
//! collector can be inspected later in any OpenTelemetry backend.
//!
//! Ids are derived from the run id and step paths (blake3), never drawn at random: exporting
//! the same run twice sends the same trace and span ids. See docs/OBSERVABILITY.md.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use cairn_engine::{Event, StepPath};
use cairn_storage::{EventStore, RunId, RunStatus};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event as SpanEvent, Link, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

use crate::audit::hex;
use crate::commands::{UsageError, open_ro};

/// `cairn trace`'s arguments.
#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    /// The run id.
    pub run: String,
    /// The `service.name` resource attribute.
    #[arg(long, default_value = "cairn", env = "OTEL_SERVICE_NAME")]
    pub service_name: String,
    /// An HTTP header to send with each request, as NAME=VALUE (repeatable), e.g. an API key
    /// for a hosted backend. Default: those in OTEL_EXPORTER_OTLP_HEADERS (comma-separated).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub timeout: f64,
}

/// At most this many spans go in one export request (collectors cap request sizes).
const SPANS_PER_REQUEST: usize = 2_000;
/// A request is sent once its encoded spans reach this many bytes.
const BYTES_PER_REQUEST: usize = 2 << 20;
/// Longer attribute values (metadata, errors) are cut to this many characters.
const VALUE_CHARS_MAX: usize = 4_096;

/// The trace id of a run: the first 16 bytes of blake3("cairn.trace" ‖ run id bytes).
pub fn trace_id(run: RunId) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(b"cairn.trace");
    h.update(&run.to_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// The span id of the step at `path` of a run (the root span: the empty path): the first 8
/// bytes of blake3("cairn.span" ‖ run id bytes ‖ path as text).
pub fn span_id(run: RunId, path: &StepPath) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(b"cairn.span");
    h.update(&run.to_bytes());
    h.update(path.to_string().as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// Runs `cairn trace`; `otlp` is the global `--otlp URL` (the collector's OTLP/HTTP endpoint;
/// spans go to URL/v1/traces), else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as it is) or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub async fn run(store_path: &Path, otlp: Option<&str>, args: TraceArgs) -> Result<ExitCode> {
    let id: RunId = args.run.parse().map_err(|e| usage(format!("{e}")))?;
    let url = crate::otel::traces_endpoint(otlp, &|k| std::env::var(k).ok())?.ok_or_else(|| {
        usage(
            "cairn trace needs a collector: --otlp URL (e.g. http://localhost:4318) or OTEL_EXPORTER_OTLP_ENDPOINT"
                .to_string(),
        )
    })?;
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(usage(format!(
            "--timeout must be a positive number of seconds, not {}",
            args.timeout
        )));
    }
    let headers = parse_headers(&args.headers, &|k| std::env::var(k).ok())?;
    let store = open_ro(store_path)?;
    let meta = store.run(id).await?.with_context(|| {
        format!(
            "no run {id} in {}; list runs with `cairn runs`",
            store.path().display()
        )
    })?;
    let mut events = Vec::new();
    crate::commands::for_each_event(&store, id, 0, |e| {
        let ev = Event::decode(&e.payload).map_err(|err| {
            anyhow!(
                "event {} of run {id} cannot be decoded ({err}); it may come from a newer cairn",
                e.seq.0
            )
        })?;
        events.push((e.ts_us, ev));
        Ok(())
    })
    .await?;
    let spans = build_spans(id, meta.status, &events)?;
    let resource = Resource {
        attributes: vec![
            kv_str("service.name", &args.service_name),
            kv_str("cairn.store", &store_path.display().to_string()),
        ],
        ..Default::default()
    };
    let client = client(Duration::from_secs_f64(args.timeout), headers)?;
    let total = spans.len();
    let mut sent = 0;
    for batch in batches(spans) {
        let n = batch.len();
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "cairn".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
        .encode_to_vec();
        send(&client, &url, body).await.map_err(|e| {
            if sent == 0 {
                e
            } else {
                anyhow!(
                    "{e} ({sent} of {total} spans had been sent; sending again is safe, the ids are the same)"
                )
            }
        })?;
        sent += n;
    }
    println!(
        "run {id}: {total} spans sent to {url} (trace {})",
        hex(&trace_id(id))
    );
    Ok(ExitCode::SUCCESS)
}

/// `--header NAME=VALUE` flags, or else OTEL_EXPORTER_OTLP_HEADERS (`a=b,c=d`) as `env` reads
/// it.
pub fn parse_headers(
    flags: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<reqwest::header::HeaderMap> {
    use reqwest::header::{HeaderName, HeaderValue};
    let from_env;
    let items: Vec<&str> = if flags.is_empty() {
        from_env = env("OTEL_EXPORTER_OTLP_HEADERS").unwrap_or_default();
        from_env
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    } else {
        flags.iter().map(String::as_str).collect()
    };
    let mut map = reqwest::header::HeaderMap::new();
    for item in items {
        let Some((name, value)) = item.split_once('=') else {
            return Err(usage(format!(
                "a header must be NAME=VALUE, not `{}`",
                item.split(':').next().unwrap_or("")
            )));
        };
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| usage(format!("`{}` is not an HTTP header name", name.trim())))?;
        // The value is often a secret: never echo it.
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| usage(format!("the value of header `{name}` is not valid")))?;
        map.append(name, value);
    }
    Ok(map)
}

fn client(timeout: Duration, headers: reqwest::header::HeaderMap) -> Result<reqwest::Client> {
    // reqwest is built without a bundled TLS provider (as in cairn-agents): install ring's, so
    // https:// collectors work. Err means one is installed already, which reqwest then uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("cairn/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .timeout(timeout)
        .default_headers(headers)
        .build()
        .context("cannot build the HTTP client")
}

/// POSTs one export request; a refusal by the collector is an error naming its status.
async fn send(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<()> {
    let hint = if port_of(url) == Some("4317") {
        " (4317 is the OTLP/gRPC port; cairn trace speaks OTLP/HTTP, usually on 4318)"
    } else {
        ""
    };
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let e = e.without_url();
            if e.is_timeout() {
                anyhow!("the collector at {url} did not answer in time{hint}")
            } else if e.is_connect() {
                anyhow!("cannot connect to {url}{hint}: {}", root_cause(&e))
            } else {
                anyhow!("cannot send the trace to {url}{hint}: {}", error_chain(&e))
            }
        })?;
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap_or_default();
    if !status.is_success() {
        let text = String::from_utf8_lossy(&bytes);
        let excerpt: String = text.chars().take(200).collect();
        let excerpt = if text.contains('\u{fffd}') || excerpt.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", excerpt.trim().replace('\n', " "))
        };
        bail!("the collector at {url} answered {status}{excerpt}{hint}");
    }
    // A success may still report spans it dropped.
    if let Ok(r) = ExportTraceServiceResponse::decode(bytes.as_ref())
        && let Some(p) = r.partial_success
        && p.rejected_spans > 0
    {
        bail!(
            "the collector at {url} rejected {} spans: {}",
            p.rejected_spans,
            p.error_message
        );
    }
    Ok(())
}

/// The port of a URL, if it names one.
pub fn port_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (_, port) = host_port.rsplit_once(':')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(port)
}

/// The innermost source of an error (e.g. `Connection refused (os error 111)`).
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// An error and its sources on one line, without repeats.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Splits spans into requests of bounded count and size.
fn batches(spans: Vec<Span>) -> Vec<Vec<Span>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for s in spans {
        let len = s.encoded_len();
        if !cur.is_empty() && (cur.len() >= SPANS_PER_REQUEST || bytes + len > BYTES_PER_REQUEST) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += len;
        cur.push(s);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

// ---- attributes ----

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn kv_str(key: &str, v: &str) -> KeyValue {
    let v = match v.char_indices().nth(VALUE_CHARS_MAX) {
        None => v.to_string(),
        Some((i, _)) => format!("{}…", &v[..i]),
    };
    kv(key, any_value::Value::StringValue(v))
}

fn kv_int(key: &str, v: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v))
}

fn kv_u64(key: &str, v: u64) -> KeyValue {
    kv_int(key, i64::try_from(v).unwrap_or(i64::MAX))
}

fn kv_f64(key: &str, v: f64) -> KeyValue {
    kv(key, any_value::Value::DoubleValue(v))
}

fn kv_bool(key: &str, v: bool) -> KeyValue {
    kv(key, any_value::Value::BoolValue(v))
}

fn kv_strs(key: &str, v: &[String]) -> KeyValue {
    kv(
        key,
        any_value::Value::ArrayValue(ArrayValue {
            values: v
                .iter()
                .map(|s| AnyValue {
                    value: Some(any_value::Value::StringValue(s.clone())),
                })
                .collect(),
        }),
    )
}

/// Microseconds since the epoch as OTLP nanoseconds (times before 1970 become 0).
fn nanos(us: i64) -> u64 {
    u64::try_from(us).unwrap_or(0).saturating_mul(1_000)
}

// ---- the span tree ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeKind {
    Step,
    FanOut,
    Branch,
    Timer,
    Wait,
    Child,
}

impl NodeKind {
    fn as_str(self) -> &'static str {
        match self {
            NodeKind::Step => "step",
            NodeKind::FanOut => "fan_out",
            NodeKind::Branch => "branch",
            NodeKind::Timer => "sleep",
            NodeKind::Wait => "wait_signal",
            NodeKind::Child => "child_run",
        }
    }
}

/// What the history says about one span-to-be.
struct Node {
    kind: NodeKind,
    name: String,
    start: Option<i64>,
    end: Option<i64>,
    attempt: u32,
    error: Option<String>,
    attrs: Vec<KeyValue>,
    events: Vec<SpanEvent>,
    links: Vec<Link>,
    span_kind: SpanKind,
}

impl Node {
    fn new(kind: NodeKind, name: &str) -> Self {
        Node {
            kind,
            name: name.to_string(),
            start: None,
            end: None,
            attempt: 0,
            error: None,
            attrs: Vec::new(),
            events: Vec::new(),
            links: Vec::new(),
            span_kind: SpanKind::Internal,
        }
    }

    fn started(&mut self, ts: i64) {
        self.start = Some(self.start.map_or(ts, |s| s.min(ts)));
    }
}

fn span_event(ts: i64, name: &str, attributes: Vec<KeyValue>) -> SpanEvent {
    SpanEvent {
        time_unix_nano: nanos(ts),
        name: name.to_string(),
        attributes,
        dropped_attributes_count: 0,
    }
}

fn link_to(run: RunId, path: &StepPath, relation: &str) -> Link {
    Link {
        trace_id: trace_id(run).to_vec(),
        span_id: span_id(run, path).to_vec(),
        attributes: vec![kv_str("cairn.link", relation)],
        ..Default::default()
    }
}

/// The node at `path`, created with `kind` and `name` if absent; fan-out branches above it
/// (`5.17` below the fan-out `5`) are created too, so every step nests under its branch.
fn node_at<'a>(
    nodes: &'a mut BTreeMap<StepPath, Node>,
    path: &StepPath,
    kind: NodeKind,
    name: &str,
) -> &'a mut Node {
    ensure_branches(nodes, path);
    nodes
        .entry(path.clone())
        .or_insert_with(|| Node::new(kind, name))
}

fn ensure_branches(nodes: &mut BTreeMap<StepPath, Node>, path: &StepPath) {
    let parts = path.parts();
    let mut prefix = StepPath::root();
    for (depth, &p) in parts.iter().enumerate() {
        let parent = prefix.clone();
        prefix = prefix.child(p);
        if depth == 0 || depth + 1 > parts.len() {
            continue;
        }
        let parent_is_fan_out = nodes
            .get(&parent)
            .is_some_and(|n| n.kind == NodeKind::FanOut);
        if parent_is_fan_out && !nodes.contains_key(&prefix) {
            let mut b = Node::new(NodeKind::Branch, &format!("branch {p}"));
            b.attrs.push(kv_int("cairn.branch.index", i64::from(p)));
            nodes.insert(prefix.clone(), b);
        }
    }
}

/// The nearest recorded ancestor of `path` (the root at worst).
fn ancestor_of(nodes: &BTreeMap<StepPath, Node>, path: &StepPath) -> StepPath {
    let parts = path.parts();
    for len in (1..parts.len()).rev() {
        let p: StepPath = parts[..len]
            .iter()
            .fold(StepPath::root(), |acc, &i| acc.child(i));
        if nodes.contains_key(&p) {
            return p;
        }
    }
    StepPath::root()
}

/// Folds a run's events (time in µs, event) into its spans: the run's root span first, then
/// one span per step, fan-out, branch, sleep, signal wait and child run, by path.
pub fn build_spans(run: RunId, status: RunStatus, events: &[(i64, Event)]) -> Result<Vec<Span>> {
    let Some((
        first_ts,
        Event::RunStarted {
            workflow,
            version,
            parent,
            ..
        },
    )) = events.first()
    else {
        bail!("run {run} has no run_started event at its beginning; the history is damaged");
    };
    let mut nodes: BTreeMap<StepPath, Node> = BTreeMap::new();
    let mut root = Node::new(NodeKind::Step, &format!("run {workflow}"));
    root.start = Some(*first_ts);
    root.attrs.push(kv_str("cairn.workflow", workflow));
    root.attrs
        .push(kv_int("cairn.workflow.version", i64::from(*version)));
    root.attrs.push(kv_str("cairn.run.status", status.as_str()));
    root.attrs
        .push(kv_u64("cairn.run.events", events.len() as u64));
    if let Some(p) = parent {
        root.attrs
            .push(kv_str("cairn.parent_run_id", &p.to_string()));
        root.links
            .push(link_to(*p, &StepPath::root(), "parent_run"));
    }
    nodes.insert(StepPath::root(), root);
    // Instant events whose span is known only at the end (metadata: its call's parent).
    let mut loose: Vec<(StepPath, SpanEvent)> = Vec::new();
    let mut last_ts = *first_ts;
    let mut resumes = 0u32;
    for (ts, ev) in &events[1..] {
        let ts = *ts;
        last_ts = last_ts.max(ts);
        match ev {
            Event::RunStarted { .. } => {
                bail!("run {run} has a second run_started event; the history is damaged")
            }
            Event::RunCompleted { .. } => {
                root_mut(&mut nodes).end = Some(ts);
            }
            Event::RunFailed { error } => {
                let r = root_mut(&mut nodes);
                r.end = Some(ts);
                r.error = Some(error.clone());
            }
            Event::RunCancelled { reason } => {
                let r = root_mut(&mut nodes);
                r.end = Some(ts);
                r.attrs.push(kv_str("cairn.run.cancel_reason", reason));
                r.events.push(span_event(
                    ts,
                    "cancelled",
                    vec![kv_str("cairn.reason", reason)],
                ));
            }
            Event::RunResumed { events_before } => {
                resumes += 1;
                root_mut(&mut nodes).events.push(span_event(
                    ts,
                    "resumed",
                    vec![kv_u64("cairn.events_before", *events_before)],
                ));
            }
            Event::RunSuspended { wake_at_us, reason } => {
                let mut a = vec![kv_str("cairn.reason", reason)];
                if let Some(w) = wake_at_us {
                    a.push(kv_int("cairn.wake_at_us", *w));
                }
                root_mut(&mut nodes)
                    .events
                    .push(span_event(ts, "suspended", a));
            }
            Event::RunDeadlineSet { deadline_us } => {
                root_mut(&mut nodes)
                    .attrs
                    .push(kv_int("cairn.run.deadline_us", *deadline_us));
            }
            Event::SignalSent { name, .. } => {
                root_mut(&mut nodes).events.push(span_event(
                    ts,
                    "signal_sent",
                    vec![kv_str("cairn.signal.name", name)],
                ));
            }
            Event::StepStarted {
                path,
                name,
                attempt,
            } => {
                let n = node_at(&mut nodes, path, NodeKind::Step, name);
                n.started(ts);
                n.attempt = n.attempt.max(*attempt);
            }
            Event::StepCompleted {
                path,
                name,
                attempt,
                started_us,
                output,
            } => {
                let n = node_at(&mut nodes, path, NodeKind::Step, name);
                n.started(*started_us);
                n.end = Some(ts);
                n.attempt = n.attempt.max(*attempt);
                describe_output(n, &output.to_json());
            }
            Event::StepFailed {
                path,
                name,
                attempt,
                started_us,
                error,
                retry_at_us,
            } => {
                let n = node_at(&mut nodes, path, NodeKind::Step, name);
                n.started(*started_us);
                n.attempt = n.attempt.max(*attempt);
                let mut a = vec![
                    kv_str("exception.message", error),
                    kv_int("cairn.attempt", i64::from(*attempt)),
                    kv_int("cairn.attempt.started_us", *started_us),
                ];
                if let Some(r) = retry_at_us {
                    a.push(kv_int("cairn.retry_at_us", *r));
                }
                n.events.push(span_event(ts, "exception", a));
                if retry_at_us.is_none() {
                    n.end = Some(ts);
                    n.error = Some(error.clone());
                }
            }
            Event::MetadataSet { path, key, value } => {
                loose.push((
                    path.clone(),
                    span_event(
                        ts,
                        "metadata",
                        vec![
                            kv_str("cairn.metadata.key", key),
                            kv_str("cairn.metadata.value", &value.to_json().to_string()),
                        ],
                    ),
                ));
            }
            Event::FanOutStarted {
                path,
                name,
                branches,
                concurrency,
                join,
            } => {
                let n = node_at(&mut nodes, path, NodeKind::FanOut, name);
                n.kind = NodeKind::FanOut;
                n.started(ts);
                n.attrs
                    .push(kv_int("cairn.fan_out.branches", i64::from(*branches)));
                n.attrs
                    .push(kv_int("cairn.fan_out.concurrency", i64::from(*concurrency)));
                n.attrs.push(kv_str("cairn.fan_out.join", join));
            }
            Event::BranchCompleted { path, index, .. } => {
                let b = node_at(&mut nodes, &path.child(*index), NodeKind::Branch, "");
                b.end = Some(ts);
            }
            Event::BranchFailed { path, index, error }
            | Event::BranchFailedWith {
                path, index, error, ..
            } => {
                let b = node_at(&mut nodes, &path.child(*index), NodeKind::Branch, "");
                b.end = Some(ts);
                b.error = Some(error.clone());
            }
            Event::FanInCompleted {
                path,
                succeeded,
                failed,
                cancelled,
                error,
            } => {
                for i in cancelled {
                    let b = node_at(&mut nodes, &path.child(*i), NodeKind::Branch, "");
                    b.attrs.push(kv_bool("cairn.branch.cancelled", true));
                    b.end.get_or_insert(ts);
                }
                let n = node_at(&mut nodes, path, NodeKind::FanOut, "fan_out");
                n.end = Some(ts);
                n.attrs
                    .push(kv_int("cairn.fan_out.succeeded", i64::from(*succeeded)));
                n.attrs
                    .push(kv_int("cairn.fan_out.failed", i64::from(*failed)));
                n.attrs
                    .push(kv_u64("cairn.fan_out.cancelled", cancelled.len() as u64));
                if let Some(e) = error {
                    n.error = Some(e.clone());
                }
            }
            Event::TimerSet { path, fire_at_us } => {
                let n = node_at(&mut nodes, path, NodeKind::Timer, "sleep");
                n.started(ts);
                n.attrs.push(kv_int("cairn.timer.fire_at_us", *fire_at_us));
            }
            Event::TimerFired { path } => {
                node_at(&mut nodes, path, NodeKind::Timer, "sleep").end = Some(ts);
            }
            Event::SignalWaitStarted {
                path,
                name,
                deadline_us,
            } => {
                let n = node_at(&mut nodes, path, NodeKind::Wait, &format!("wait:{name}"));
                n.started(ts);
                n.attrs.push(kv_str("cairn.signal.name", name));
                if let Some(d) = deadline_us {
                    n.attrs.push(kv_int("cairn.signal.deadline_us", *d));
                }
            }
            Event::SignalReceived {
                path,
                name,
                sent_seq,
            } => {
                let n = node_at(&mut nodes, path, NodeKind::Wait, &format!("wait:{name}"));
                n.end = Some(ts);
                n.attrs.push(kv_u64("cairn.signal.sent_seq", *sent_seq));
            }
            Event::SignalTimedOut { path, name } => {
                let n = node_at(&mut nodes, path, NodeKind::Wait, &format!("wait:{name}"));
                n.end = Some(ts);
                n.attrs.push(kv_bool("cairn.signal.timed_out", true));
            }
            Event::ChildStarted {
                path,
                child,
                workflow,
            } => {
                let n = node_at(
                    &mut nodes,
                    path,
                    NodeKind::Child,
                    &format!("child {workflow}"),
                );
                n.started(ts);
                n.attrs
                    .push(kv_str("cairn.child.run_id", &child.to_string()));
                n.attrs.push(kv_str("cairn.child.workflow", workflow));
                n.links
                    .push(link_to(*child, &StepPath::root(), "child_run"));
            }
            Event::ChildFinished {
                path,
                child,
                ok,
                error,
                ..
            } => {
                let n = node_at(&mut nodes, path, NodeKind::Child, "child");
                n.end = Some(ts);
                if n.links.is_empty() {
                    n.links
                        .push(link_to(*child, &StepPath::root(), "child_run"));
                }
                if !ok {
                    n.error = Some(
                        error
                            .clone()
                            .unwrap_or_else(|| "the child run failed".to_string()),
                    );
                }
            }
            // A kind newer than this code: nothing to draw.
            _ => {}
        }
    }
    {
        let r = root_mut(&mut nodes);
        r.attrs
            .push(kv_int("cairn.run.resumes", i64::from(resumes)));
    }
    for (path, e) in loose {
        let at = ancestor_of(&nodes, &path);
        if let Some(n) = nodes.get_mut(&at) {
            n.events.push(e);
        }
    }
    Ok(assemble(run, nodes, last_ts))
}

fn root_mut(nodes: &mut BTreeMap<StepPath, Node>) -> &mut Node {
    nodes
        .entry(StepPath::root())
        .or_insert_with(|| Node::new(NodeKind::Step, "run"))
}

/// Attributes read from a step's recorded output: GenAI conventions for model and tool calls,
/// and the decisions of agent orchestration (scopes, handoffs, routes).
fn describe_output(n: &mut Node, output: &serde_json::Value) {
    let name = n.name.clone();
    if name == "model" {
        if let Ok(call) = serde_json::from_value::<cairn_agents::ModelCall>(output.clone()) {
            let u = call.response.usage;
            n.span_kind = SpanKind::Client;
            n.attrs.push(kv_str("gen_ai.operation.name", "chat"));
            n.attrs.push(kv_str("gen_ai.provider.name", &call.provider));
            n.attrs
                .push(kv_str("gen_ai.request.model", &call.request.model));
            n.attrs.push(kv_u64(
                "gen_ai.request.max_tokens",
                u64::from(call.request.max_tokens),
            ));
            if let Some(t) = call.request.temperature {
                n.attrs
                    .push(kv_f64("gen_ai.request.temperature", f64::from(t)));
            }
            n.attrs
                .push(kv_str("gen_ai.response.model", &call.response.model));
            if !call.response.id.is_empty() {
                n.attrs
                    .push(kv_str("gen_ai.response.id", &call.response.id));
            }
            // The conventions count cached input in input_tokens; cairn's usage (like the
            // Anthropic API) counts it apart.
            let input = u
                .input_tokens
                .saturating_add(u.cache_creation_input_tokens)
                .saturating_add(u.cache_read_input_tokens);
            n.attrs.push(kv_u64("gen_ai.usage.input_tokens", input));
            n.attrs
                .push(kv_u64("gen_ai.usage.output_tokens", u.output_tokens));
            if u.cache_read_input_tokens > 0 {
                n.attrs.push(kv_u64(
                    "gen_ai.usage.cache_read.input_tokens",
                    u.cache_read_input_tokens,
                ));
            }
            if u.cache_creation_input_tokens > 0 {
                n.attrs.push(kv_u64(
                    "gen_ai.usage.cache_creation.input_tokens",
                    u.cache_creation_input_tokens,
                ));
            }
            let reason = match serde_json::to_value(&call.response.stop_reason) {
                Ok(serde_json::Value::String(s)) => s,
                Ok(serde_json::Value::Object(o)) => o
                    .values()
                    .next()
                    .and_then(|v| v.as_str())
                    .unwrap_or("other")
                    .to_string(),
                _ => "other".to_string(),
            };
            n.attrs
                .push(kv_strs("gen_ai.response.finish_reasons", &[reason]));
            n.attrs.push(kv_str("gen_ai.agent.name", &call.agent));
            if let Some(c) = call.cost_usd {
                n.attrs.push(kv_f64("cairn.cost_usd", c));
            }
            n.attrs
                .push(kv_u64("cairn.model.latency_ms", call.latency_ms));
        }
    } else if let Some(tool) = name.strip_prefix("tool:") {
        n.attrs
            .push(kv_str("gen_ai.operation.name", "execute_tool"));
        n.attrs.push(kv_str("gen_ai.tool.name", tool));
        n.attrs.push(kv_str("gen_ai.tool.type", "function"));
        if let Ok(call) = serde_json::from_value::<cairn_agents::ToolCall>(output.clone()) {
            n.attrs.push(kv_str("gen_ai.tool.call.id", &call.id));
            if let Some(e) = call.error {
                n.attrs.push(kv_str("error.type", "tool_error"));
                n.error = Some(e);
            }
        }
    } else if let Some(scope) = name.strip_prefix("cairn.scope:") {
        n.attrs.push(kv_str("cairn.scope", scope));
        if let Some(agent) = scope.strip_prefix("agent:") {
            n.attrs
                .push(kv_str("gen_ai.operation.name", "invoke_agent"));
            n.attrs.push(kv_str("gen_ai.agent.name", agent));
        }
    } else if name == "handoff" {
        if let Ok(h) = serde_json::from_value::<cairn_agents::HandoffRecord>(output.clone()) {
            n.attrs.push(kv_str("cairn.handoff.from", &h.from));
            n.attrs.push(kv_str("cairn.handoff.to", &h.to));
            n.attrs.push(kv_str("cairn.handoff.mode", &h.mode));
            n.attrs.push(kv_str("cairn.handoff.reason", &h.reason));
            n.attrs
                .push(kv_u64("cairn.handoff.messages", h.context.len() as u64));
        }
    } else if name == "route" {
        for key in ["category", "agent"] {
            if let Some(v) = output.get(key).and_then(|v| v.as_str()) {
                n.attrs.push(kv_str(&format!("cairn.route.{key}"), v));
            }
        }
        if let Some(f) = output.get("fallback").and_then(|v| v.as_bool()) {
            n.attrs.push(kv_bool("cairn.route.fallback", f));
        }
    }
}

/// Settles each span's times (a parent spans its children; an unfinished one ends at the
/// run's last event) and turns the nodes into OTLP spans, root first, then by path.
fn assemble(run: RunId, nodes: BTreeMap<StepPath, Node>, last_ts: i64) -> Vec<Span> {
    let tid = trace_id(run).to_vec();
    let paths: Vec<StepPath> = nodes.keys().cloned().collect();
    let index: HashMap<&StepPath, usize> = paths.iter().enumerate().map(|(i, p)| (p, i)).collect();
    let parent: Vec<Option<usize>> = paths
        .iter()
        .map(|p| {
            (p.depth() > 0).then(|| {
                let a = ancestor_of(&nodes, p);
                index[&a]
            })
        })
        .collect();
    let mut nodes: Vec<Node> = nodes.into_values().collect();
    // Extents of each node's descendants, filled children first: in path order a node's
    // descendants come right after it, so walking backwards meets them before it.
    let mut child_start: Vec<Option<i64>> = vec![None; nodes.len()];
    let mut child_end: Vec<Option<i64>> = vec![None; nodes.len()];
    let mut unfinished = vec![false; nodes.len()];
    for i in (0..nodes.len()).rev() {
        let fallback_start = parent[i].and_then(|p| nodes[p].start);
        let n = &mut nodes[i];
        let start = match (n.start, child_start[i]) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).or(fallback_start).unwrap_or(last_ts),
        };
        let end = match (n.end, child_end[i]) {
            (Some(a), Some(b)) => a.max(b),
            (Some(a), None) => a,
            (None, _) => {
                unfinished[i] = true;
                last_ts
            }
        };
        let end = end.max(start);
        n.start = Some(start);
        n.end = Some(end);
        if let Some(p) = parent[i] {
            child_start[p] = Some(child_start[p].map_or(start, |s| s.min(start)));
            child_end[p] = Some(child_end[p].map_or(end, |e| e.max(end)));
        }
    }
    let ids: Vec<Vec<u8>> = paths.iter().map(|p| span_id(run, p).to_vec()).collect();
    let run_id = run.to_string();
    nodes
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let path = &paths[i];
            let mut attributes = vec![kv_str("cairn.run_id", &run_id)];
            if path.depth() > 0 {
                attributes.push(kv_str("cairn.step_path", &path.to_string()));
                attributes.push(kv_str("cairn.kind", n.kind.as_str()));
                if n.kind == NodeKind::Step {
                    attributes.push(kv_int("cairn.attempt", i64::from(n.attempt.max(1))));
                }
            }
            if unfinished[i] {
                attributes.push(kv_bool("cairn.unfinished", true));
            }
            attributes.extend(n.attrs);
            let status = n.error.map(|message| Status {
                message,
                code: StatusCode::Error as i32,
            });
            let name = if n.name.is_empty() {
                format!("branch {}", path.parts().last().copied().unwrap_or(0))
            } else {
                n.name
            };
            Span {
                trace_id: tid.clone(),
                span_id: ids[i].clone(),
                parent_span_id: parent[i].map(|p| ids[p].clone()).unwrap_or_default(),
                // Sampled (W3C trace flags).
                flags: 1,
                name,
                kind: n.span_kind as i32,
                start_time_unix_nano: nanos(n.start.unwrap_or(last_ts)),
                end_time_unix_nano: nanos(n.end.unwrap_or(last_ts)),
                attributes,
                events: n.events,
                links: n.links,
                status,
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_engine::Payload;

    fn path(s: &str) -> StepPath {
        s.parse().unwrap()
    }

    #[test]
    fn ids_are_derived_from_the_run_and_path() {
        let a = RunId::from_u128(1);
        let b = RunId::from_u128(2);
        assert_eq!(trace_id(a), trace_id(a));
        assert_ne!(trace_id(a), trace_id(b));
        assert_ne!(span_id(a, &StepPath::root()), span_id(a, &path("0")));
        assert_ne!(span_id(a, &path("0")), span_id(b, &path("0")));
        let mut h = blake3::Hasher::new();
        h.update(b"cairn.span");
        h.update(&a.to_bytes());
        h.update(b"5.17");
        assert_eq!(
            &span_id(a, &path("5.17"))[..],
            &h.finalize().as_bytes()[..8]
        );
    }

    #[test]
    fn branches_nest_under_their_fan_out_and_parents_span_their_children() {
        let id = RunId::from_u128(7);
        let out = Payload::from_value(&1).unwrap();
        let events = vec![
            (
                100,
                Event::RunStarted {
                    workflow: "w".into(),
                    version: 1,
                    input: Payload::default(),
                    parent: None,
                },
            ),
            (
                110,
                Event::FanOutStarted {
                    path: path("0"),
                    name: "f".into(),
                    branches: 2,
                    concurrency: 2,
                    join: "all".into(),
                },
            ),
            (
                130,
                Event::StepCompleted {
                    path: path("0.1.0"),
                    name: "work".into(),
                    attempt: 1,
                    started_us: 120,
                    output: out.clone(),
                },
            ),
            (
                131,
                Event::BranchCompleted {
                    path: path("0"),
                    index: 1,
                    output: out,
                },
            ),
            (
                140,
                Event::StepFailed {
                    path: path("0.0.0"),
                    name: "work".into(),
                    attempt: 1,
                    started_us: 112,
                    error: "boom".into(),
                    retry_at_us: None,
                },
            ),
            (
                141,
                Event::BranchFailed {
                    path: path("0"),
                    index: 0,
                    error: "boom".into(),
                },
            ),
            (
                150,
                Event::MetadataSet {
                    path: path("1"),
                    key: "k".into(),
                    value: Payload::from_value(&"v").unwrap(),
                },
            ),
        ];
        let spans = build_spans(id, RunStatus::Running, &events).unwrap();
        let by_name = |n: &str| -> Vec<&Span> { spans.iter().filter(|s| s.name == n).collect() };
        assert_eq!(spans.len(), 6, "{spans:#?}");
        let root = &spans[0];
        assert_eq!(root.name, "run w");
        assert!(root.parent_span_id.is_empty());
        // Unfinished run: the root ends at the last event.
        assert_eq!(root.end_time_unix_nano, 150_000);
        assert_eq!(root.events.len(), 1, "metadata lands on the root");
        let fan = &by_name("f")[0];
        assert_eq!(fan.parent_span_id, root.span_id);
        let b0 = &by_name("branch 0")[0];
        assert_eq!(b0.parent_span_id, fan.span_id);
        assert_eq!(b0.start_time_unix_nano, 112_000);
        assert_eq!(b0.end_time_unix_nano, 141_000);
        assert_eq!(b0.status.as_ref().unwrap().code, StatusCode::Error as i32);
        let work = by_name("work");
        assert_eq!(work.len(), 2);
        let failed = work.iter().find(|s| s.status.is_some()).unwrap();
        assert_eq!(failed.parent_span_id, b0.span_id);
        assert_eq!(failed.events.len(), 1);
        assert_eq!(failed.events[0].name, "exception");
        // The fan-out has no fan-in yet: it ends with the run's last event, marked unfinished.
        assert_eq!(fan.end_time_unix_nano, 150_000);
        assert!(fan.attributes.iter().any(|a| a.key == "cairn.unfinished"));
    }

    #[test]
    fn otlp_urls() {
        assert_eq!(port_of("http://h:4317/v1/traces"), Some("4317"));
        assert_eq!(port_of("http://h:43170"), Some("43170"));
        assert_eq!(port_of("https://h/x"), None);
        assert_eq!(port_of("http://[::1]:4318"), Some("4318"));
        let traces_url = |u: &str| crate::otel::signal_url(u, "/v1/traces", "--otlp");
        assert_eq!(
            traces_url("http://h:4318").unwrap(),
            "http://h:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://h:4318/").unwrap(),
            "http://h:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://h/otlp/v1/traces").unwrap(),
            "https://h/otlp/v1/traces"
        );
        assert!(traces_url("h:4318").is_err());
    }

    #[test]
    fn batches_are_bounded() {
        let spans: Vec<Span> = (0..SPANS_PER_REQUEST * 2 + 1)
            .map(|_| Span::default())
            .collect();
        let b = batches(spans);
        assert_eq!(b.len(), 3);
        assert_eq!(b[2].len(), 1);
    }
}
