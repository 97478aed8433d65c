//! Live telemetry of the `cairn` process: `tracing` logs on stderr (filtered by `RUST_LOG`,
//! default [`DEFAULT_FILTER`]; human or JSON lines with `--log-format json`), and the metrics log
//! (`--metrics-log FILE`, `-` for stderr): one JSON line per live model call.
//!
//! With live export on (`--otlp URL` or the OTLP endpoint variables; `crate::otel`), a third
//! and fourth layer send the spans and the metrics derived from them to an OpenTelemetry
//! collector. Off, they are not installed at all: the subscriber is the same as without them.
//!
//! The metrics log is a `tracing` layer that takes only the events of target `cairn::metrics`,
//! which the agent loop emits at the end of each live model call (never for a call answered
//! from the log), and writes each as one `agent_call` JSON line. The stderr log never shows
//! those events.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Registry;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, filter_fn};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// The target of the events the metrics log writes.
pub const METRICS_TARGET: &str = "cairn::metrics";

/// The stderr log's filter when `RUST_LOG` is not set: warnings, except the engine's warning
/// per failed step attempt, which the CLI already reports in its own output (a failed run's
/// line, `cairn show`); `RUST_LOG=warn` shows them too.
pub const DEFAULT_FILTER: &str = "warn,cairn_engine::context=error";

/// How the stderr log is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line, with the current span and its parents.
    Json,
}

/// Installs the process's subscriber: the stderr log, with `metrics` the metrics log, and with
/// `live` the OpenTelemetry export, whose pipeline is returned (to be shut down at exit).
pub fn init(
    format: LogFormat,
    metrics: Option<&Path>,
    live: Option<&crate::otel::Settings>,
) -> Result<Option<crate::otel::Pipeline>> {
    let env = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::builder()
            .with_default_directive(LevelFilter::WARN.into())
            .parse_lossy(v),
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    let ansi = std::io::stderr().is_terminal();
    let (fmt, log_wants_steps) = log_layer(format, env, ansi, std::io::stderr);
    // The layers as a list, with only those asked for: an absent layer (an `Option` that is
    // `None`) still counts as interested in every callsite, which would make every INFO span
    // of the engine a real span in the registry even with nothing listening.
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![fmt];
    if let Some(p) = metrics {
        layers.push(
            MetricsLayer::open(p)?
                .with_filter(filter_fn(|m| m.target() == METRICS_TARGET))
                .boxed(),
        );
    }
    let pipeline = match live {
        None => None,
        Some(settings) => {
            let pipeline = crate::otel::Pipeline::start(settings)?;
            layers.push(pipeline.layer_beside(log_wants_steps));
            Some(pipeline)
        }
    };
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .context("cannot install the log subscriber")?;
    Ok(pipeline)
}

/// The log layer: lines for what `env` lets through, written to `writer`, and whether it shows
/// INFO spans of cairn's crates (`RUST_LOG=info`, say: then every step attempt stays a span,
/// also in runs the live export leaves out).
fn log_layer<W>(
    format: LogFormat,
    env: EnvFilter,
    ansi: bool,
    writer: W,
) -> (Box<dyn Layer<Registry> + Send + Sync>, bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let log_wants_steps = env
        .max_level_hint()
        .is_none_or(|max| max >= LevelFilter::INFO);
    // The metrics events are not log lines.
    let not_metrics = filter_fn(|m| m.target() != METRICS_TARGET);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        // A line when a span closes, with its fields and timing: a live view of runs, steps,
        // model and tool calls at `RUST_LOG=cairn=info`.
        .with_span_events(if log_wants_steps {
            FmtSpan::CLOSE
        } else {
            FmtSpan::NONE
        });
    let fmt = match format {
        LogFormat::Human => fmt
            .with_ansi(ansi)
            .with_filter(env.and(not_metrics))
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_filter(env.and(not_metrics))
            .boxed(),
    };
    // A log that shows no span closing times no span: it skips every enter and exit, which
    // its filter would otherwise check with a registry lookup at each poll of each run while
    // live export keeps the spans (see `SkipEnterExit`).
    let fmt = if log_wants_steps {
        fmt
    } else {
        Box::new(SkipEnterExit(fmt))
    };
    (fmt, log_wants_steps)
}

/// Writes each `cairn::metrics` event as one JSON line.
struct MetricsLayer {
    out: Mutex<Box<dyn Write + Send>>,
}

impl MetricsLayer {
    /// Appends to `path` (created if needed); `-` is stderr.
    fn open(path: &Path) -> Result<Self> {
        let out: Box<dyn Write + Send> = if path.as_os_str() == "-" {
            Box::new(std::io::stderr())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open the metrics log {}", path.display()))?,
            )
        };
        Ok(MetricsLayer {
            out: Mutex::new(out),
        })
    }
}

impl<S: Subscriber> Layer<S> for MetricsLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        let mut line = fields.0;
        // The event's message names the record type (`agent_call`).
        let kind = match line.remove("message") {
            Some(serde_json::Value::String(m)) => m,
            _ => "agent_call".to_string(),
        };
        line.insert("type".into(), kind.into());
        line.entry("cost_usd").or_insert(serde_json::Value::Null);
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into(),
        );
        let mut text = serde_json::Value::Object(line).to_string();
        text.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A metrics log that cannot be written must not stop the run.
        let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    }
}

/// An event's fields as JSON values.
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

/// A layer that passes everything to the one it wraps except span enters and exits: for the
/// stderr log when it times no span (no `FmtSpan` events), where they do nothing but cost a
/// registry lookup each in the log's per-layer filter.
struct SkipEnterExit<L>(L);

impl<S, L> Layer<S> for SkipEnterExit<L>
where
    S: Subscriber,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber);
    }
    fn on_layer(&mut self, subscriber: &mut S) {
        self.0.on_layer(subscriber);
    }
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.0.register_callsite(metadata)
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.0.enabled(metadata, ctx)
    }
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.0.on_new_span(attrs, id, ctx);
    }
    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.0.max_level_hint()
    }
    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        self.0.on_record(span, values, ctx);
    }
    fn on_follows_from(
        &self,
        span: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        self.0.on_follows_from(span, follows, ctx);
    }
    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        self.0.event_enabled(event, ctx)
    }
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        self.0.on_event(event, ctx);
    }
    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx);
    }
    fn on_id_change(&self, old: &tracing::span::Id, new: &tracing::span::Id, ctx: Context<'_, S>) {
        self.0.on_id_change(old, new, ctx);
    }
    // The wrapped layer's per-layer filter is found through this (`Filtered` registers its
    // filter id and the registry checks for per-layer filters by downcasting).
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded to the wrapped layer, whose own contract holds.
        unsafe { self.0.downcast_raw(id) }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// The interest a subscriber of the log layer alone, filtered by `filter`, takes in an INFO
    /// and in a WARN span of the engine: whether each is never made. Asked of the subscriber
    /// directly (`Dispatch::register_callsite`): the interest tracing caches per callsite is
    /// shared with the subscribers of the other tests of this binary.
    fn never_made(filter: &str) -> (bool, bool) {
        let made = |span: tracing::Span| span.metadata().expect("a span of the registry alone");
        let info = tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            made(tracing::info_span!(target: "cairn_engine::context", "step"))
        });
        let warn = tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            made(tracing::warn_span!(target: "cairn_engine::context", "shown"))
        });
        let (log, _) = log_layer(
            LogFormat::Human,
            EnvFilter::new(filter),
            false,
            std::io::sink,
        );
        let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![log];
        let alone = tracing::Dispatch::new(tracing_subscriber::registry().with(layers));
        (
            alone.register_callsite(info).is_never(),
            alone.register_callsite(warn).is_never(),
        )
    }

    /// Regression for the log layer that skips span enters and exits (`SkipEnterExit` must
    /// forward the per-layer filter's plumbing, or the registry makes every INFO span of the
    /// engine although nothing shows it): alone at `warn`, INFO spans are never made and WARN
    /// ones are; at `info` both are made (the log prints them).
    #[test]
    fn alone_the_log_makes_only_the_spans_it_shows() {
        assert_eq!(never_made("warn"), (true, false));
        // The default also hides `cairn_engine::context` below ERROR.
        assert_eq!(never_made(DEFAULT_FILTER), (true, true));
        assert_eq!(never_made("info"), (false, false));
    }
}
