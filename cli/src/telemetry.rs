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
    let not_metrics =
        filter_fn(|m| m.target() != METRICS_TARGET && m.target() != cairn_engine::ATTEMPT_TARGET);
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tracing::span::{Attributes, Id};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// What the log wrote.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Buf {
        type Writer = Buf;
        fn make_writer(&'w self) -> Buf {
            self.clone()
        }
    }

    /// Counts the spans made and the events seen, for any layer beside the log.
    #[derive(Clone, Default)]
    struct Seen(Arc<AtomicUsize>, Arc<AtomicUsize>);

    impl<S: Subscriber> Layer<S> for Seen {
        fn on_new_span(&self, _: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn on_event(&self, _: &Event<'_>, _: Context<'_, S>) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Logs a step span with an INFO and a WARN event inside, a metrics event and an attempt
    /// event under a log filtered by `filter`, beside another layer; returns the log's text and
    /// what the other layer saw (spans, events).
    fn logged(filter: &str) -> (String, usize, usize) {
        let buf = Buf::default();
        let (log, _) = log_layer(LogFormat::Human, EnvFilter::new(filter), false, buf.clone());
        let seen = Seen::default();
        let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![log, Box::new(seen.clone())];
        let subscriber = tracing_subscriber::registry().with(layers);
        tracing::subscriber::with_default(subscriber, || {
            let span =
                tracing::info_span!(target: "cairn_engine::context", "step", cairn.step_name = "s");
            {
                let _e = span.enter();
                tracing::info!(target: "cairn_engine::context", "an info line");
                tracing::warn!(target: "cairn_engine::context", "a warning line");
            }
            drop(span);
            tracing::info!(target: METRICS_TARGET, "agent_call");
            tracing::info!(target: cairn_engine::ATTEMPT_TARGET, "attempt");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (
            text,
            seen.0.load(Ordering::Relaxed),
            seen.1.load(Ordering::Relaxed),
        )
    }

    /// Regression for the log that skips span enters and exits (`SkipEnterExit` forwards the
    /// per-layer filter's plumbing): at `warn` the log shows the warning and nothing else, while
    /// another layer still gets every span and event; at INFO it
    /// shows the span's closing line too. Metrics and attempt events never reach the log.
    #[test]
    fn the_log_filters_by_itself_and_leaves_spans_to_the_other_layers() {
        let (text, spans, events) = logged("warn");
        assert!(text.contains("a warning line"), "{text}");
        assert!(!text.contains("an info line"), "{text}");
        assert!(!text.contains("close"), "{text}");
        assert!(
            !text.contains("agent_call") && !text.contains("attempt"),
            "{text}"
        );
        assert_eq!((spans, events), (1, 4));

        // Alone, the log makes no span it does not show: with telemetry off, the engine's INFO
        // spans cost a cached check, not a registry span.
        let (log, _) = log_layer(
            LogFormat::Human,
            EnvFilter::new("warn"),
            false,
            Buf::default(),
        );
        let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![log];
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layers), || {
            let span = tracing::info_span!(target: "cairn_engine::context", "step");
            assert!(span.is_disabled());
            let warn = tracing::warn_span!(target: "cairn_engine::context", "shown");
            assert!(!warn.is_disabled());
        });

        let (text, spans, events) = logged("info");
        assert!(
            text.contains("an info line") && text.contains("a warning line"),
            "{text}"
        );
        assert!(text.contains("close"), "the span's closing line: {text}");
        assert!(
            !text.contains("agent_call") && !text.contains("attempt"),
            "{text}"
        );
        assert_eq!((spans, events), (1, 4));
    }
}
