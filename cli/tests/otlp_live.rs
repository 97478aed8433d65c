//! Live OpenTelemetry export (`--otlp URL`, `OTEL_EXPORTER_OTLP_ENDPOINT`): a real `cairn start`
//! sends its spans and metrics to a small OTLP/HTTP receiver on loopback, in the trace that
//! `cairn trace` later re-exports the run into; and a run whose collector is down completes
//! normally and says how many spans it dropped.

mod common;

use std::time::{Duration, Instant};

use cairn_storage::RunId;
use common::Env;
use common::otlp::{Receiver, attr_int, attr_str, attr_strs};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use serde_json::json;

/// The OTEL_* and proxy variables a developer's shell may have, removed for every run.
const UNSET: [&str; 14] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// `cairn --store <store> <args>` with `vars` set and no OTEL_* variables from the caller.
fn cairn(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> common::Out {
    let mut c = common::command(&env.store, args);
    for v in UNSET {
        c.env_remove(v);
    }
    c.env_remove("RUST_LOG");
    for (k, v) in vars {
        c.env(k, v);
    }
    let out = c.output().expect("run cairn");
    common::Out {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A two-turn script: a turn asking for two tool calls (one with bad arguments, so the tool
/// fails), then the answer.
fn write_script(env: &Env) -> String {
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
    let path = env.write_jsonl("script.jsonl", &lines);
    json!({
        "provider": "scripted",
        "model": "scripted-1",
        "task": "count",
        "script": path.to_str().unwrap(),
        "max_turns": 4,
    })
    .to_string()
}

fn trace_id_of(run: &str) -> Vec<u8> {
    let id: RunId = run.parse().unwrap();
    let mut h = blake3::Hasher::new();
    h.update(b"cairn.trace");
    h.update(&id.to_bytes());
    h.finalize().as_bytes()[..16].to_vec()
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn parent_of<'a>(spans: &'a [Span], s: &Span) -> &'a Span {
    spans
        .iter()
        .find(|p| p.span_id == s.parent_span_id)
        .unwrap_or_else(|| panic!("the parent of {} was not received: {spans:#?}", s.name))
}

/// (a) An agent run with `OTEL_EXPORTER_OTLP_ENDPOINT` set: the spans arrive in one trace whose
/// id is the run's `cairn trace` id, nested run → agent → step → chat / execute_tool, with the
/// GenAI attributes; the failed tool call is an error; the metrics arrive too.
#[test]
fn a_live_run_sends_its_spans_in_the_trace_cairn_trace_uses() {
    let env = Env::new();
    let rx = Receiver::start();
    let input = write_script(&env);
    let out = cairn(
        &env,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &rx.url()),
            ("OTEL_SERVICE_NAME", "cairn-live-test"),
        ],
        &["start", "agent", "--input", &input],
    );
    out.assert_ok();
    assert!(
        !out.stderr.contains("dropped"),
        "nothing is dropped: {}",
        out.stderr
    );
    let run = common::run_id_of(out.stdout.lines().next().unwrap());
    // The exit flush sent everything before the process ended.
    let spans = rx.spans();
    let tid = trace_id_of(&run);
    assert!(spans.iter().all(|s| s.trace_id == tid), "{spans:#?}");

    let roots = named(&spans, "run");
    assert_eq!(roots.len(), 1, "{spans:#?}");
    let root = roots[0];
    assert!(root.parent_span_id.is_empty());
    assert_eq!(
        attr_str(root, "cairn.run_id").as_deref(),
        Some(run.as_str())
    );
    assert_eq!(attr_str(root, "cairn.workflow").as_deref(), Some("agent"));
    assert_eq!(
        attr_str(root, "cairn.run.status").as_deref(),
        Some("completed")
    );

    let agents = named(&spans, "invoke_agent assistant");
    assert_eq!(agents.len(), 1, "{spans:#?}");
    assert_eq!(parent_of(&spans, agents[0]).name, "run");
    assert_eq!(
        attr_str(agents[0], "gen_ai.agent.name").as_deref(),
        Some("assistant")
    );

    let chats = named(&spans, "chat scripted-1");
    assert_eq!(chats.len(), 2, "{spans:#?}");
    for c in &chats {
        let step = parent_of(&spans, c);
        assert_eq!(step.name, "step");
        assert_eq!(attr_str(step, "cairn.step_name").as_deref(), Some("model"));
        assert_eq!(attr_int(step, "cairn.attempt"), Some(1));
        assert!(attr_str(step, "cairn.step_path").is_some());
        assert_eq!(parent_of(&spans, step).name, "invoke_agent assistant");
        assert_eq!(c.kind, SpanKind::Client as i32);
        assert_eq!(
            attr_str(c, "gen_ai.operation.name").as_deref(),
            Some("chat")
        );
        assert_eq!(
            attr_str(c, "gen_ai.provider.name").as_deref(),
            Some("scripted")
        );
        assert_eq!(
            attr_str(c, "gen_ai.request.model").as_deref(),
            Some("scripted-1")
        );
        assert_eq!(
            attr_str(c, "gen_ai.response.model").as_deref(),
            Some("scripted-resp")
        );
        assert_eq!(
            attr_str(c, "gen_ai.agent.name").as_deref(),
            Some("assistant")
        );
    }
    let first = chats
        .iter()
        .find(|c| attr_int(c, "gen_ai.usage.input_tokens") == Some(111))
        .expect("the first call's span");
    assert_eq!(attr_int(first, "gen_ai.usage.output_tokens"), Some(22));
    assert_eq!(
        attr_strs(first, "gen_ai.response.finish_reasons"),
        Some(vec!["tool_use".to_string()])
    );

    let tools = named(&spans, "execute_tool word_count");
    assert_eq!(tools.len(), 2, "{spans:#?}");
    let failed: Vec<_> = tools
        .iter()
        .filter(|t| t.status.as_ref().map(|s| s.code) == Some(StatusCode::Error as i32))
        .collect();
    assert_eq!(failed.len(), 1, "one tool call fails: {tools:#?}");
    assert_eq!(
        attr_str(failed[0], "gen_ai.tool.call.id").as_deref(),
        Some("t2")
    );
    assert_eq!(
        attr_str(failed[0], "error.type").as_deref(),
        Some("tool_error")
    );
    assert!(
        attr_str(failed[0], "exception.message")
            .unwrap()
            .contains("bad arguments"),
        "{failed:#?}"
    );
    for t in &tools {
        let step = parent_of(&spans, t);
        assert_eq!(
            attr_str(step, "cairn.step_name").as_deref(),
            Some("tool:word_count")
        );
    }

    // Resource and metrics.
    let metrics = rx.metrics();
    assert!(!metrics.is_empty(), "no metrics request");
    let names: Vec<String> = metrics
        .iter()
        .flat_map(|m| &m.resource_metrics)
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(|m| m.name.clone())
        .collect();
    for want in [
        "cairn.runs",
        "cairn.step.duration",
        "cairn.model.calls",
        "cairn.model.tokens",
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "cairn.tool.calls",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    let service = metrics[0].resource_metrics[0]
        .resource
        .as_ref()
        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.clone());
    assert_eq!(
        service,
        Some(any_value::Value::StringValue("cairn-live-test".into()))
    );

    // `cairn trace` re-exports the run into the same trace.
    let rx2 = Receiver::start();
    let out = cairn(&env, &[], &["trace", &run, "--otlp", &rx2.url()]);
    out.assert_ok();
    let again = rx2.spans();
    assert!(!again.is_empty());
    assert!(again.iter().all(|s| s.trace_id == tid));
}

/// (b) The collector is down (a closed port): the run completes as it would without telemetry,
/// the process ends promptly, and one warning line says how many spans were dropped.
#[test]
fn a_run_with_the_collector_down_completes_and_reports_dropped_spans() {
    let env = Env::new();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let out = cairn(
        &env,
        &[],
        &[
            "--otlp",
            &url,
            "start",
            "steps",
            "--input",
            r#"{"steps": 3}"#,
        ],
    );
    let took = started.elapsed();
    out.assert_ok();
    assert!(out.stdout.contains("completed"), "{}", out.stdout);
    assert!(out.stdout.contains(r#""checksum":5"#), "{}", out.stdout);
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: telemetry:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", out.stderr);
    // A run span and three step spans.
    assert!(
        warnings[0].contains("4 of 4 spans were dropped"),
        "{}",
        warnings[0]
    );
    assert!(warnings[0].contains(&url), "{}", warnings[0]);
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// (d) A run the sampler leaves out (`OTEL_TRACES_SAMPLER=always_off`): no span is sent, the
/// metrics count it, a note at exit says so and how to send it, and `cairn trace` then sends
/// the whole run into the trace it would have had.
#[test]
fn a_run_sampled_out_is_counted_in_the_metrics_and_can_be_sent_later() {
    let env = Env::new();
    let rx = Receiver::start();
    let out = start_sampled_out(&env, &rx, "steps", r#"{"steps": 3}"#);
    assert!(!out.stderr.contains("warning"), "{}", out.stderr);
    let notes: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("note: telemetry:"))
        .collect();
    assert_eq!(notes.len(), 1, "{}", out.stderr);
    assert!(
        notes[0].contains("the spans of 1 of 1 runs were not exported live")
            && notes[0].contains("cairn trace RUN --otlp URL"),
        "{}",
        notes[0]
    );
    assert!(rx.spans().is_empty(), "no span of a run sampled out");
    // The metrics count the run and its three steps.
    let counted = Counted::of(&rx);
    assert_eq!((counted.runs, counted.steps), (1, 3));
    // The history has it all: `cairn trace` sends the run and its steps into the run's trace.
    let run = common::run_id_of(out.stdout.lines().next().unwrap());
    let rx2 = Receiver::start();
    cairn(&env, &[], &["trace", &run, "--otlp", &rx2.url()]).assert_ok();
    let again = rx2.spans();
    assert_eq!(again.len(), 4, "{again:#?}");
    assert!(again.iter().all(|s| s.trace_id == trace_id_of(&run)));
}

/// A run the sampler leaves out that fans out: no span of it is sent (not the fan-out's, not a
/// branch's), and the metrics count its branches and their steps.
#[test]
fn a_fan_out_in_a_run_sampled_out_sends_no_span_and_counts_its_branches() {
    let env = Env::new();
    let rx = Receiver::start();
    start_sampled_out(&env, &rx, "fanout", r#"{"branches": 5, "concurrency": 2}"#);
    assert!(rx.spans().is_empty(), "{:#?}", rx.spans());
    let counted = Counted::of(&rx);
    assert_eq!((counted.runs, counted.steps, counted.branches), (1, 5, 5));
}

/// Starts `workflow` with `input`, exporting to `rx` with every run left out by the sampler
/// (`OTEL_TRACES_SAMPLER=always_off`); the command succeeded.
fn start_sampled_out(env: &Env, rx: &Receiver, workflow: &str, input: &str) -> common::Out {
    let out = cairn(
        env,
        &[("OTEL_TRACES_SAMPLER", "always_off")],
        &["--otlp", &rx.url(), "start", workflow, "--input", input],
    );
    out.assert_ok();
    out
}

/// What the receiver's metrics counted: runs, step attempts and fan-out branches finished.
struct Counted {
    runs: i64,
    steps: u64,
    branches: i64,
}

impl Counted {
    fn of(rx: &Receiver) -> Counted {
        use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
        let sum = |data: &Option<metric::Data>| -> i64 {
            match data {
                Some(metric::Data::Sum(sum)) => sum
                    .data_points
                    .iter()
                    .filter_map(|p| match p.value {
                        Some(number_data_point::Value::AsInt(n)) => Some(n),
                        _ => None,
                    })
                    .sum(),
                _ => 0,
            }
        };
        let mut c = Counted {
            runs: 0,
            steps: 0,
            branches: 0,
        };
        for m in rx
            .metrics()
            .iter()
            .flat_map(|m| &m.resource_metrics)
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
        {
            match (m.name.as_str(), &m.data) {
                ("cairn.runs", data) => c.runs += sum(data),
                ("cairn.fan_out.branches", data) => c.branches += sum(data),
                ("cairn.step.duration", Some(metric::Data::Histogram(h))) => {
                    c.steps += h.data_points.iter().map(|p| p.count).sum::<u64>();
                }
                _ => {}
            }
        }
        c
    }
}

/// (c) A malformed `--otlp` is a usage error before anything runs.
#[test]
fn a_malformed_endpoint_is_a_usage_error() {
    let env = Env::new();
    let out = cairn(
        &env,
        &[],
        &[
            "--otlp",
            "localhost:4318",
            "start",
            "steps",
            "--input",
            "{}",
        ],
    );
    assert_eq!(out.code(), Some(2), "{out:?}");
    let line = out.assert_one_line_error();
    assert!(line.contains("--otlp must be an http://"), "{line}");
    assert!(!env.store.exists(), "nothing was written");
}
