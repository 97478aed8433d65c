//! `cairn trace`: a recorded run re-emitted as an OpenTelemetry trace over OTLP/HTTP, checked
//! by a small OTLP receiver in the test that decodes what it is sent with the same protobuf
//! types: the span tree, the recorded timestamps, deterministic ids, GenAI attributes on model
//! and tool calls, error status on failures, and a one-line error when no collector listens.

mod common;

use cairn_storage::RunId;
use common::otlp::{Receiver, attr_int, attr_str, attr_strs, spans_of, value_of};
use common::{Env, Out};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use serde_json::{Value, json};

/// `cairn --store <store> <args>` with no OTEL_* variables from the caller's environment.
fn cairn(env: &Env, args: &[&str]) -> Out {
    let mut c = common::command(&env.store, args);
    for v in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_SERVICE_NAME",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        c.env_remove(v);
    }
    let out = c.output().expect("run cairn");
    Out {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Exports `run` to `rx` and returns the requests it received, decoded.
fn export(
    env: &Env,
    rx: &Receiver,
    run: &str,
    extra: &[&str],
) -> (Out, Vec<ExportTraceServiceRequest>) {
    let url = rx.url();
    let mut args = vec!["trace", run, "--otlp", &url, "--timeout", "20"];
    args.extend_from_slice(extra);
    let out = cairn(env, &args);
    out.assert_ok();
    let reqs = rx.take();
    assert!(!reqs.is_empty(), "the receiver got nothing: {out:?}");
    let decoded = reqs
        .iter()
        .map(|r| {
            assert_eq!(r.method, "POST");
            assert_eq!(r.path, "/v1/traces");
            assert_eq!(r.content_type, "application/x-protobuf");
            ExportTraceServiceRequest::decode(r.body.as_slice())
                .expect("the body is an ExportTraceServiceRequest")
        })
        .collect();
    (out, decoded)
}

fn blake3_prefix(parts: &[&[u8]], n: usize) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().as_bytes()[..n].to_vec()
}

fn expected_trace_id(run: &str) -> Vec<u8> {
    let id: RunId = run.parse().unwrap();
    blake3_prefix(&[b"cairn.trace", &id.to_bytes()], 16)
}

fn expected_span_id(run: &str, path: &str) -> Vec<u8> {
    let id: RunId = run.parse().unwrap();
    blake3_prefix(&[b"cairn.span", &id.to_bytes(), path.as_bytes()], 8)
}

/// The span at `path` (the root: "").
fn at<'a>(spans: &'a [Span], run: &str, path: &str) -> &'a Span {
    let id = expected_span_id(run, path);
    spans
        .iter()
        .find(|s| s.span_id == id)
        .unwrap_or_else(|| panic!("no span for path {path:?} in {spans:#?}"))
}

fn ns(us: &Value) -> u64 {
    us.as_u64().expect("a microsecond time") * 1_000
}

fn event_of<'a>(events: &'a [Value], kind: &str, path: Option<&str>) -> &'a Value {
    events
        .iter()
        .find(|e| e["kind"] == kind && path.is_none_or(|p| e["path"] == p))
        .unwrap_or_else(|| panic!("no {kind} event at {path:?}"))
}

fn start(env: &Env, workflow: &str, input: &Value) -> (Out, String) {
    let out = cairn(env, &["start", workflow, "--input", &input.to_string()]);
    let first = out
        .stdout
        .lines()
        .next()
        .unwrap_or_else(|| panic!("no output: {out:?}"));
    let id = common::run_id_of(first);
    (out, id)
}

/// (a) A three-step run: a root span and three step spans under it, with the recorded times
/// and ids derived from the run id and step paths, identical on a second export.
#[test]
fn a_steps_run_becomes_a_root_span_with_one_span_per_step() {
    let env = Env::new();
    let (out, id) = start(&env, "steps", &json!({ "steps": 3 }));
    out.assert_ok();
    let events = env.events_json(&id);
    let rx = Receiver::start();

    let (out1, reqs1) = export(&env, &rx, &id, &[]);
    assert!(out1.stdout.contains("4 spans"), "{out1:?}");
    assert!(
        out1.stdout.contains(&hex(&expected_trace_id(&id))),
        "the trace id is printed: {out1:?}"
    );
    let spans = spans_of(&reqs1);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    // The resource: service.name (default) and the store.
    let resource = reqs1[0].resource_spans[0].resource.clone().unwrap();
    assert_eq!(
        value_of(&resource.attributes, "service.name"),
        Some(any_value::Value::StringValue("cairn".into()))
    );
    assert_eq!(
        value_of(&resource.attributes, "cairn.store"),
        Some(any_value::Value::StringValue(
            env.store.display().to_string()
        ))
    );

    let trace = expected_trace_id(&id);
    assert!(spans.iter().all(|s| s.trace_id == trace), "one trace");
    let root = at(&spans, &id, "");
    assert_eq!(root.name, "run steps");
    assert!(root.parent_span_id.is_empty(), "the root has no parent");
    assert_eq!(
        root.start_time_unix_nano,
        ns(&event_of(&events, "run_started", None)["ts_us"])
    );
    assert_eq!(
        root.end_time_unix_nano,
        ns(&event_of(&events, "run_completed", None)["ts_us"])
    );
    assert!(root.status.is_none(), "a completed run is not an error");
    assert_eq!(attr_str(root, "cairn.run_id").as_deref(), Some(id.as_str()));
    assert_eq!(
        attr_str(root, "cairn.run.status").as_deref(),
        Some("completed")
    );
    for i in 0..3 {
        let path = i.to_string();
        let s = at(&spans, &id, &path);
        let done = event_of(&events, "step_completed", Some(&path));
        assert_eq!(s.name, "step");
        assert_eq!(s.parent_span_id, root.span_id, "step {path} under the root");
        assert_eq!(s.start_time_unix_nano, ns(&done["started_us"]), "{path}");
        assert_eq!(s.end_time_unix_nano, ns(&done["ts_us"]), "{path}");
        assert!(s.start_time_unix_nano <= s.end_time_unix_nano);
        assert!(
            root.start_time_unix_nano <= s.start_time_unix_nano
                && s.end_time_unix_nano <= root.end_time_unix_nano
        );
        assert_eq!(attr_str(s, "cairn.run_id").as_deref(), Some(id.as_str()));
        assert_eq!(attr_str(s, "cairn.step_path"), Some(path.clone()));
        assert_eq!(attr_int(s, "cairn.attempt"), Some(1));
        assert!(s.status.is_none());
    }

    // Exported again (under another service name): the very same spans, ids included.
    let (_, reqs2) = export(&env, &rx, &id, &["--service-name", "billing"]);
    let again = spans_of(&reqs2);
    assert_eq!(again, spans, "a second export sends identical spans");
    let resource = reqs2[0].resource_spans[0].resource.clone().unwrap();
    assert_eq!(
        value_of(&resource.attributes, "service.name"),
        Some(any_value::Value::StringValue("billing".into()))
    );
    // Exporting is read-only: the run's history is untouched.
    assert_eq!(env.events_json(&id).len(), events.len());
    cairn(&env, &["verify", &id]).assert_ok();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// (b) An agent run (scripted provider, two turns): model spans carry the GenAI attributes
/// with the scripted usage, tool spans name their tool, a failed tool call is an error, and
/// all of them sit under the agent's scope span.
#[test]
fn an_agent_run_carries_gen_ai_attributes() {
    let env = Env::new();
    let script = env.path("script.jsonl");
    let lines = [
        json!({"id": "msg-1", "model": "scripted-large", "stop_reason": "tool_use",
               "usage": {"input_tokens": 120, "output_tokens": 30,
                         "cache_read_input_tokens": 5},
               "content": [
                   {"type": "tool_use", "id": "tu-1", "name": "lookup_ticket",
                    "input": {"id": "T-01042"}},
                   {"type": "tool_use", "id": "tu-2", "name": "word_count",
                    "input": {"words": "no text field"}}]}),
        json!({"id": "msg-2", "model": "scripted-large", "stop_reason": "end_turn",
               "usage": {"input_tokens": 260, "output_tokens": 12},
               "content": [{"type": "text", "text": "T-01042 is a billing question."}]}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&script, text).unwrap();
    let input = json!({
        "provider": "scripted",
        "model": "scripted-1",
        "task": "What is T-01042 about?",
        "script": script.to_str().unwrap(),
    });
    let (out, id) = start(&env, "agent", &input);
    out.assert_ok();
    let rx = Receiver::start();
    let (_, reqs) = export(&env, &rx, &id, &[]);
    let spans = spans_of(&reqs);
    // root, scope, 2 model calls, 2 tool calls.
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let root = at(&spans, &id, "");
    assert_eq!(root.name, "run agent");

    let scope = at(&spans, &id, "0");
    assert_eq!(scope.name, "cairn.scope:agent:assistant");
    assert_eq!(scope.parent_span_id, root.span_id);
    assert_eq!(
        attr_str(scope, "gen_ai.operation.name").as_deref(),
        Some("invoke_agent")
    );
    assert_eq!(
        attr_str(scope, "gen_ai.agent.name").as_deref(),
        Some("assistant")
    );

    let models: Vec<&Span> = spans.iter().filter(|s| s.name == "model").collect();
    assert_eq!(models.len(), 2);
    let expected = [
        (120 + 5, 30, "tool_use", "msg-1"),
        (260, 12, "end_turn", "msg-2"),
    ];
    let mut models = models;
    models.sort_by_key(|s| s.start_time_unix_nano);
    for (m, (input_tokens, output_tokens, finish, response_id)) in models.iter().zip(expected) {
        assert_eq!(
            m.parent_span_id, scope.span_id,
            "model calls under the scope"
        );
        assert_eq!(m.kind, SpanKind::Client as i32);
        assert_eq!(
            attr_str(m, "gen_ai.operation.name").as_deref(),
            Some("chat")
        );
        assert_eq!(
            attr_str(m, "gen_ai.provider.name").as_deref(),
            Some("scripted")
        );
        assert_eq!(
            attr_str(m, "gen_ai.request.model").as_deref(),
            Some("scripted-1")
        );
        assert_eq!(
            attr_str(m, "gen_ai.response.model").as_deref(),
            Some("scripted-large")
        );
        assert_eq!(
            attr_str(m, "gen_ai.response.id").as_deref(),
            Some(response_id)
        );
        assert_eq!(
            attr_int(m, "gen_ai.usage.input_tokens"),
            Some(input_tokens),
            "input tokens include cache reads, as the conventions say"
        );
        assert_eq!(
            attr_int(m, "gen_ai.usage.output_tokens"),
            Some(output_tokens)
        );
        assert_eq!(
            attr_strs(m, "gen_ai.response.finish_reasons"),
            Some(vec![finish.to_string()])
        );
        assert_eq!(
            attr_str(m, "gen_ai.agent.name").as_deref(),
            Some("assistant")
        );
        // The agent workflow sets no price: no cost is claimed.
        assert!(value_of(&m.attributes, "cairn.cost_usd").is_none());
        assert!(m.status.is_none());
        assert!(
            scope.start_time_unix_nano <= m.start_time_unix_nano
                && m.end_time_unix_nano <= scope.end_time_unix_nano,
            "the scope spans its calls"
        );
    }
    assert_eq!(
        attr_int(models[0], "gen_ai.usage.cache_read.input_tokens"),
        Some(5)
    );

    let lookup = spans
        .iter()
        .find(|s| s.name == "tool:lookup_ticket")
        .expect("a lookup_ticket span");
    assert_eq!(lookup.parent_span_id, scope.span_id);
    assert_eq!(
        attr_str(lookup, "gen_ai.operation.name").as_deref(),
        Some("execute_tool")
    );
    assert_eq!(
        attr_str(lookup, "gen_ai.tool.name").as_deref(),
        Some("lookup_ticket")
    );
    assert_eq!(
        attr_str(lookup, "gen_ai.tool.call.id").as_deref(),
        Some("tu-1")
    );
    assert!(lookup.status.is_none(), "{lookup:#?}");
    // Tool calls run after the first model call and before the second.
    assert!(lookup.start_time_unix_nano >= models[0].end_time_unix_nano);
    assert!(lookup.end_time_unix_nano <= models[1].start_time_unix_nano);

    let bad = spans
        .iter()
        .find(|s| s.name == "tool:word_count")
        .expect("a word_count span");
    assert_eq!(
        attr_str(bad, "gen_ai.tool.name").as_deref(),
        Some("word_count")
    );
    let status = bad
        .status
        .as_ref()
        .expect("a failed tool call has a status");
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(
        status.message.contains("bad arguments for `word_count`"),
        "{status:?}"
    );
}

/// (c) A fan-out whose branches fail: the failed steps, their branches, the fan-out and the
/// run are errors with their messages; the branches nest under the fan-out and their steps
/// under them.
#[test]
fn failed_steps_are_errors_and_branches_nest_under_their_fan_out() {
    let env = Env::new();
    let (out, id) = start(
        &env,
        "fanout",
        &json!({ "branches": 4, "fail_every": 3, "concurrency": 2 }),
    );
    assert_eq!(
        out.code(),
        Some(1),
        "branches 0 and 3 fail the run: {out:?}"
    );
    let events = env.events_json(&id);
    let rx = Receiver::start();
    let (_, reqs) = export(&env, &rx, &id, &[]);
    let spans = spans_of(&reqs);
    // root, fan-out, 4 branches, 4 steps.
    assert_eq!(spans.len(), 10, "{spans:#?}");
    let root = at(&spans, &id, "");
    let err = |s: &Span| -> String {
        let st = s
            .status
            .as_ref()
            .unwrap_or_else(|| panic!("span {} has no status", s.name));
        assert_eq!(st.code, StatusCode::Error as i32, "{}", s.name);
        st.message.clone()
    };
    assert!(err(root).contains("2 of 4 branches failed"));
    assert_eq!(
        root.end_time_unix_nano,
        ns(&event_of(&events, "run_failed", None)["ts_us"])
    );
    let fan = at(&spans, &id, "0");
    assert_eq!(fan.name, "branches");
    assert_eq!(fan.parent_span_id, root.span_id);
    assert_eq!(err(fan), "2 of 4 branches failed");
    assert_eq!(
        fan.start_time_unix_nano,
        ns(&event_of(&events, "fan_out_started", None)["ts_us"])
    );
    assert_eq!(
        fan.end_time_unix_nano,
        ns(&event_of(&events, "fan_in_completed", None)["ts_us"])
    );
    for i in 0..4u32 {
        let branch = at(&spans, &id, &format!("0.{i}"));
        assert_eq!(branch.name, format!("branch {i}"));
        assert_eq!(branch.parent_span_id, fan.span_id, "branch {i}");
        let step_path = format!("0.{i}.0");
        let step = at(&spans, &id, &step_path);
        assert_eq!(step.name, "work");
        assert_eq!(step.parent_span_id, branch.span_id, "{step_path}");
        assert!(
            branch.start_time_unix_nano <= step.start_time_unix_nano
                && step.end_time_unix_nano <= branch.end_time_unix_nano,
            "branch {i} spans its step"
        );
        if i % 3 == 0 {
            let failed = event_of(&events, "step_failed", Some(&step_path));
            assert_eq!(err(step), format!("item {i} is malformed"));
            assert_eq!(step.start_time_unix_nano, ns(&failed["started_us"]));
            assert_eq!(step.end_time_unix_nano, ns(&failed["ts_us"]));
            // One span event per failed attempt.
            assert_eq!(step.events.len(), 1, "{step:#?}");
            let ev = &step.events[0];
            assert_eq!(ev.name, "exception");
            assert_eq!(ev.time_unix_nano, ns(&failed["ts_us"]));
            assert_eq!(
                value_of(&ev.attributes, "exception.message"),
                Some(any_value::Value::StringValue(format!(
                    "item {i} is malformed"
                )))
            );
            assert!(err(branch).contains(&format!("item {i} is malformed")));
        } else {
            assert!(step.status.is_none(), "{step:#?}");
            assert!(branch.status.is_none(), "{branch:#?}");
        }
    }
}

/// (d) No collector listening: one line on stderr, exit 1, and the store is as it was (a
/// later export to a live receiver works). Bad arguments are usage errors (exit 2).
#[test]
fn an_unreachable_collector_is_a_one_line_error() {
    let env = Env::new();
    let (out, id) = start(&env, "steps", &json!({ "steps": 2 }));
    out.assert_ok();
    let before = env.events_json(&id);
    // A port nobody listens on: bound, then closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{closed}");
    let out = cairn(&env, &["trace", &id, "--otlp", &url, "--timeout", "10"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let line = out.assert_one_line_error();
    assert!(line.starts_with("error: "), "{line}");
    assert!(
        line.contains(&format!("{url}/v1/traces")),
        "names the endpoint: {line}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");

    // Nothing else broke: the run reads and verifies as before, and exports once a collector
    // listens.
    assert_eq!(env.events_json(&id), before);
    cairn(&env, &["verify", &id]).assert_ok();
    let rx = Receiver::start();
    let (_, reqs) = export(&env, &rx, &id, &[]);
    assert_eq!(spans_of(&reqs).len(), 3);

    // A collector that refuses: exit 1, one line naming its answer.
    let refusing = Receiver::answering("404 Not Found");
    let out = cairn(&env, &["trace", &id, "--otlp", &refusing.url()]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let line = out.assert_one_line_error();
    assert!(
        line.contains("404 Not Found") && line.contains("no such route"),
        "{line}"
    );
    assert_eq!(refusing.take().len(), 1);

    // Mistakes in the call: exit 2, one line.
    let out = cairn(&env, &["trace", &id, "--otlp", "localhost:4318"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.assert_one_line_error().contains("http://"));
    let out = cairn(&env, &["trace", "not-a-run", "--otlp", &rx.url()]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    out.assert_one_line_error();
    // An unknown run: exit 1, one line, nothing sent.
    let other = RunId::from_u128(42).to_string();
    let out = cairn(&env, &["trace", &other, "--otlp", &rx.url()]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.assert_one_line_error().contains("no run"));
    assert!(rx.take().is_empty());
}

/// A run with thousands of spans goes out in several bounded requests, and every span still
/// finds its parent.
#[test]
fn a_large_run_is_sent_in_several_requests() {
    let env = Env::new();
    let (out, id) = start(
        &env,
        "fanout",
        &json!({ "branches": 2500, "concurrency": 64 }),
    );
    out.assert_ok();
    let rx = Receiver::start();
    let (out, reqs) = export(&env, &rx, &id, &[]);
    let spans = spans_of(&reqs);
    // root, fan-out, and a branch and a step per item.
    assert_eq!(spans.len(), 2 + 2 * 2500);
    assert!(
        out.stdout.contains(&format!("{} spans", spans.len())),
        "{out:?}"
    );
    assert!(reqs.len() >= 3, "{} requests", reqs.len());
    for r in &reqs {
        let n: usize = r.resource_spans[0].scope_spans[0].spans.len();
        assert!(n <= 2_000, "a request of {n} spans");
    }
    let ids: std::collections::HashSet<&Vec<u8>> = spans.iter().map(|s| &s.span_id).collect();
    assert_eq!(ids.len(), spans.len(), "span ids are unique");
    for s in &spans {
        assert!(
            s.parent_span_id.is_empty() || ids.contains(&s.parent_span_id),
            "span {} has no parent in the trace",
            s.name
        );
    }
    assert_eq!(
        spans.iter().filter(|s| s.parent_span_id.is_empty()).count(),
        1
    );
}

/// A step that succeeded on its third attempt: one span from the first attempt's start to
/// the success, a span event per failed attempt, and no error status.
#[test]
fn retried_attempts_are_span_events_of_one_span() {
    let env = Env::new();
    let attempts = env.path("attempts.txt");
    let input = json!({
        "attempts_file": attempts.to_str().unwrap(),
        "failures": 2,
        "backoff_ms": 1,
    });
    let (out, id) = start(&env, "flaky", &input);
    out.assert_ok();
    let events = env.events_json(&id);
    let rx = Receiver::start();
    let (_, reqs) = export(&env, &rx, &id, &[]);
    let spans = spans_of(&reqs);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let step = at(&spans, &id, "0");
    assert_eq!(step.name, "call");
    assert!(step.status.is_none(), "it succeeded in the end: {step:#?}");
    assert_eq!(attr_int(step, "cairn.attempt"), Some(3));
    let failures: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "step_failed")
        .collect();
    assert_eq!(failures.len(), 2);
    assert_eq!(step.start_time_unix_nano, ns(&failures[0]["started_us"]));
    assert_eq!(
        step.end_time_unix_nano,
        ns(&event_of(&events, "step_completed", Some("0"))["ts_us"])
    );
    assert_eq!(step.events.len(), 2);
    for (ev, f) in step.events.iter().zip(&failures) {
        assert_eq!(ev.name, "exception");
        assert_eq!(ev.time_unix_nano, ns(&f["ts_us"]));
        assert_eq!(
            value_of(&ev.attributes, "exception.message"),
            Some(any_value::Value::StringValue(
                f["error"].as_str().unwrap().to_string()
            ))
        );
        assert_eq!(
            value_of(&ev.attributes, "cairn.attempt"),
            Some(any_value::Value::IntValue(f["attempt"].as_i64().unwrap()))
        );
    }
}
