//! `cairn audit`, `cairn show RUN --step PATH`, `cairn export` and `cairn import`, end to end:
//! the built-in `agent` workflow runs offline with the scripted provider (a JSON-lines script
//! in the test's directory), then the binary reads its log.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::{Env, Out, json_lines};
use serde_json::{Value, json};

/// The final answer of the scripted conversation.
const FINAL: &str = "T-01042 is a billing ticket; its note has 4 words.";
const TASK: &str = "Triage ticket T-01042 and count the words of its note.";
const SYSTEM: &str = "You triage support tickets. Be brief.";

/// (input, output, cache read, cache write) tokens of the three scripted turns.
const USAGE: [(u64, u64, u64, u64); 3] = [(120, 25, 0, 64), (180, 14, 64, 0), (230, 31, 64, 0)];

/// Three turns: `lookup_ticket`, then `word_count`, then the final text.
fn script() -> Vec<Value> {
    let usage = |k: usize| {
        let (i, o, r, w) = USAGE[k];
        json!({"input_tokens": i, "output_tokens": o, "cache_read_input_tokens": r,
               "cache_creation_input_tokens": w})
    };
    vec![
        json!({"id": "s1", "model": "scripted", "stop_reason": "tool_use", "usage": usage(0),
               "content": [{"type": "text", "text": "Let me look it up."},
                           {"type": "tool_use", "id": "toolu_lookup", "name": "lookup_ticket",
                            "input": {"id": "T-01042"}}]}),
        json!({"id": "s2", "model": "scripted", "stop_reason": "tool_use", "usage": usage(1),
               "content": [{"type": "tool_use", "id": "toolu_count", "name": "word_count",
                            "input": {"text": "refund still not received"}}]}),
        json!({"id": "s3", "model": "scripted", "stop_reason": "end_turn", "usage": usage(2),
               "content": [{"type": "text", "text": FINAL}]}),
    ]
}

/// Runs the `agent` workflow on `script`; returns the run id and what `start` printed.
fn run_agent(env: &Env, script: &[Value]) -> (String, Out) {
    let path = env.write_jsonl("script.jsonl", script);
    let input = json!({
        "provider": "scripted",
        "model": "scripted-1",
        "task": TASK,
        "system": SYSTEM,
        "script": path.to_str().unwrap(),
    })
    .to_string();
    let out = env.run(&["start", "agent", "--input", &input]);
    let id = common::run_id_of(out.stdout.lines().next().expect("a first line"));
    (id, out)
}

/// A completed scripted agent run.
fn agent_run(env: &Env) -> String {
    let (id, out) = run_agent(env, &script());
    out.assert_ok();
    assert_eq!(out.output_json()["text"], FINAL, "{out:?}");
    id
}

fn audit_json(env: &Env, id: &str) -> Value {
    let out = env.run(&["audit", id, "--json"]);
    out.assert_ok();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("audit --json: {e}: {out:?}"))
}

#[test]
fn audit_reports_the_agents_calls_tokens_and_tools() {
    let env = Env::new();
    let id = agent_run(&env);
    let v = audit_json(&env, &id);
    println!("{v:#}");
    assert_eq!(v["run"], id.as_str());
    assert_eq!(v["workflow"], "agent");
    assert_eq!(v["status"], "completed");

    let sum = |f: fn(&(u64, u64, u64, u64)) -> u64| USAGE.iter().map(f).sum::<u64>();
    let (input, output) = (sum(|u| u.0), sum(|u| u.1));
    let (cache_read, cache_write) = (sum(|u| u.2), sum(|u| u.3));
    let agents = v["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 1, "{v:#}");
    let a = &agents[0];
    assert_eq!(a["agent"], "assistant");
    assert_eq!(a["scopes"], 1);
    assert_eq!(a["calls"], 3);
    assert_eq!(a["input_tokens"], input);
    assert_eq!(a["output_tokens"], output);
    assert_eq!(a["cache_read_tokens"], cache_read);
    assert_eq!(a["cache_write_tokens"], cache_write);
    assert_eq!(a["total_tokens"], input + output + cache_read + cache_write);
    assert_eq!(a["tool_calls"], 2);
    assert_eq!(a["tool_errors"], 0);
    assert_eq!(a["failed_attempts"], 0);
    assert_eq!(a["retries"], 0);
    assert_eq!(a["failures"], 0);
    assert_eq!(a["budget_stops"], 0);
    // The workflow's agent has no price: no cost, rather than a made-up zero.
    assert_eq!(a["cost_usd"], Value::Null);
    for k in ["latency_p50_ms", "latency_p95_ms"] {
        assert!(a[k].is_u64(), "{k} missing: {a}");
        assert!(v["totals"][k].is_u64(), "totals.{k} missing: {v:#}");
    }
    assert!(a["latency_p50_ms"].as_u64() <= a["latency_p95_ms"].as_u64());

    let tools: Vec<(&str, u64, u64)> = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["agent"], "assistant");
            (
                t["tool"].as_str().unwrap(),
                t["calls"].as_u64().unwrap(),
                t["errors"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(tools, vec![("lookup_ticket", 1, 0), ("word_count", 1, 0)]);
    assert_eq!(v["handoffs"], json!([]));
    assert_eq!(v["routes"], json!([]));
    assert_eq!(v["budget_stops"], json!([]));

    let t = &v["totals"];
    assert_eq!(t["agents"], 1);
    assert_eq!(t["calls"], 3);
    assert_eq!(t["input_tokens"], input);
    assert_eq!(t["output_tokens"], output);
    assert_eq!(t["tool_calls"], 2);
    assert_eq!(t["tool_errors"], 0);
    assert_eq!(t["handoffs"], 0);
    assert_eq!(t["events"], env.run_meta(&id)["events"]);

    // The tables name the agent and its tools.
    let out = env.run(&["audit", &id]);
    out.assert_ok();
    println!("{}", out.stdout);
    for needle in [
        "agents",
        "assistant",
        "lookup_ticket",
        "word_count",
        "totals",
        &input.to_string(),
    ] {
        assert!(out.stdout.contains(needle), "no {needle:?} in {out:?}");
    }
}

/// A model call that fails for good (the script has no answer for the second turn) counts as
/// a failure of its agent; the run failed, the audit still reads it.
#[test]
fn audit_counts_a_model_call_that_failed_for_good() {
    let env = Env::new();
    let (id, out) = run_agent(&env, &script()[..1]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let v = audit_json(&env, &id);
    assert_eq!(v["status"], "failed");
    let a = &v["agents"][0];
    assert_eq!(a["calls"], 1, "{v:#}");
    assert_eq!(a["tool_calls"], 1);
    assert_eq!(a["failed_attempts"], 1);
    assert_eq!(a["failures"], 1);
    assert_eq!(a["retries"], 0);
    assert_eq!(v["totals"]["failures"], 1);
}

#[test]
fn audit_of_a_run_without_agents_reports_zero_agents() {
    let env = Env::new();
    let out = env.run(&["demo", "--items", "2", "--step-ms", "0"]);
    out.assert_ok();
    let id = common::run_id_of(out.stdout.lines().next().unwrap());
    let v = audit_json(&env, &id);
    assert_eq!(v["agents"], json!([]), "{v:#}");
    assert_eq!(v["totals"]["agents"], 0);
    assert_eq!(v["totals"]["calls"], 0);
    assert_eq!(v["totals"]["total_tokens"], 0);
    assert_eq!(v["totals"]["latency_p50_ms"], Value::Null);
    let out = env.run(&["audit", &id]);
    out.assert_ok();
    assert!(out.stdout.contains("none"), "{out:?}");
    assert!(out.stdout.contains("totals"), "{out:?}");
}

#[test]
fn audit_of_an_unknown_run_is_a_one_line_error() {
    let env = Env::new();
    agent_run(&env);
    let other = "01JD3Q5W8ZK2X4M7N9P0R1S2T3";
    let out = env.run(&["audit", other]);
    let line = out.assert_one_line_error();
    assert!(
        line.contains(other) && line.contains("cairn runs"),
        "{line}"
    );
}

#[test]
fn show_step_prints_an_agents_conversation() {
    let env = Env::new();
    let id = agent_run(&env);

    let out = env.run(&["show", &id, "--step", "0"]);
    out.assert_ok();
    let s = &out.stdout;
    println!("{s}");
    assert!(s.starts_with("agent assistant"), "{s}");
    assert!(s.contains("3 model call(s), 2 tool call(s)"), "{s}");
    assert_eq!(s.matches(SYSTEM).count(), 1, "the system prompt once: {s}");
    for needle in [
        TASK,
        "Let me look it up.",
        "tool_use lookup_ticket (id toolu_lookup)",
        "tool_use word_count (id toolu_count)",
        "tool call lookup_ticket",
        "tool call word_count",
        "tool_result for toolu_count",
        "\"T-01042\"",
        "refund still not received",
        "stop tool_use",
        "stop end_turn",
        FINAL,
    ] {
        assert!(s.contains(needle), "no {needle:?} in:\n{s}");
    }
    // In order: first call, its tool, second call, its tool, the answer.
    let pos = |n: &str| s.find(n).unwrap_or_else(|| panic!("no {n:?}"));
    assert!(pos("── 0.0 model call") < pos("── 0.1 tool call lookup_ticket"));
    assert!(pos("── 0.1 tool call") < pos("── 0.2 model call"));
    assert!(pos("── 0.3 tool call word_count") < pos(FINAL));
    // The usage of each call.
    let (i, o, r, w) = USAGE[2];
    assert!(
        s.contains(&format!(
            "tokens in {i} out {o} cache read {r} cache write {w}"
        )),
        "{s}"
    );

    // One tool call: its input and output only.
    let out = env.run(&["show", &id, "--step", "0.3"]);
    out.assert_ok();
    assert!(out.stdout.contains("tool call word_count"), "{out:?}");
    assert!(out.stdout.contains("refund still not received"), "{out:?}");
    assert!(out.stdout.contains("output:\n    4\n"), "{out:?}");
    assert!(!out.stdout.contains("lookup_ticket"), "{out:?}");

    // One model call: the exchange, with the system prompt.
    let out = env.run(&["show", &id, "--step", "0.4"]);
    out.assert_ok();
    assert!(out.stdout.contains(SYSTEM), "{out:?}");
    assert!(
        out.stdout.contains("tool_result for toolu_count"),
        "{out:?}"
    );
    assert!(out.stdout.contains(FINAL), "{out:?}");
    assert!(!out.stdout.contains("tool_use lookup_ticket"), "{out:?}");

    // The timeline without --step is unchanged.
    let out = env.run(&["show", &id]);
    out.assert_ok();
    assert!(
        out.stdout.contains("cairn.scope:agent:assistant"),
        "{out:?}"
    );
}

#[test]
fn show_step_with_an_unknown_path_is_a_one_line_error() {
    let env = Env::new();
    let id = agent_run(&env);
    for path in ["0.9", "7", "0.1.2"] {
        let out = env.run(&["show", &id, "--step", path]);
        assert_eq!(out.code(), Some(1), "{out:?}");
        let line = out.assert_one_line_error();
        assert!(
            line.contains(&format!("step {path}")) && line.contains(&format!("cairn show {id}")),
            "{line}"
        );
    }
    let out = env.run(&["show", &id, "--step", "zero"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    out.assert_one_line_error();
}

/// An export: the header, then one line per event.
fn export(env: &Env, id: &str) -> (Value, Vec<Value>, std::path::PathBuf) {
    let file = env.path("run.jsonl");
    let out = env.run(&["export", id, "--output", file.to_str().unwrap()]);
    out.assert_ok();
    assert!(
        out.stdout.starts_with(&format!("exported run {id}")),
        "{out:?}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines = json_lines(&text);
    let header = lines.remove(0);
    (header, lines, file)
}

/// `ok RUN: N events, head HEX` from `verify`.
fn verify_line(out: &Out) -> String {
    out.assert_ok();
    let line = out.stdout.lines().next().unwrap_or_default().to_string();
    assert!(line.starts_with("ok "), "{out:?}");
    line
}

#[test]
fn export_then_import_reproduces_the_run_in_another_store() {
    let env = Env::new();
    let id = agent_run(&env);
    let verified = verify_line(&env.run(&["verify", &id]));
    let meta = env.run_meta(&id);
    let (header, lines, file) = export(&env, &id);

    // The header.
    assert_eq!(header["format"], "cairn-export");
    assert_eq!(header["version"], 1);
    assert_eq!(header["run"], id.as_str());
    assert_eq!(header["workflow"], "agent");
    assert_eq!(header["version_of_workflow"], 1);
    assert_eq!(header["status"], "completed");
    assert_eq!(header["parent"], Value::Null);
    assert_eq!(header["labels"], json!({}));
    assert_eq!(header["events"], meta["events"]);
    assert_eq!(header["events"].as_u64(), Some(lines.len() as u64));
    let head = header["head"].as_str().unwrap();
    assert!(verified.ends_with(&format!("head {head}")), "{verified}");

    // The events: dense, with their hashes, raw payloads and decoded views.
    let events = env.events_json(&id);
    for (k, (l, e)) in lines.iter().zip(&events).enumerate() {
        assert_eq!(l["seq"], k as u64);
        assert_eq!(l["ts_us"], e["ts_us"]);
        assert_eq!(l["hash"], e["hash"]);
        assert_eq!(l["event"]["kind"], e["kind"]);
        assert!(
            !B64.decode(l["payload"].as_str().unwrap())
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(lines.last().unwrap()["hash"], head);

    // To stdout: the same bytes.
    let out = env.run(&["export", &id]);
    out.assert_ok();
    assert_eq!(out.stdout, std::fs::read_to_string(&file).unwrap());

    // Into another store.
    let out = env.run_on("other.redb", &["import", file.to_str().unwrap()]);
    out.assert_ok();
    assert!(
        out.stdout.starts_with(&format!("imported run {id}")),
        "{out:?}"
    );
    assert!(out.stdout.contains(head), "{out:?}");
    assert_eq!(
        verify_line(&env.run_on("other.redb", &["verify", &id])),
        verified,
        "the same chain, the same head"
    );
    let a = env.run(&["events", &id]);
    let b = env.run_on("other.redb", &["events", &id]);
    b.assert_ok();
    assert_eq!(a.stdout, b.stdout, "identical events");
    let runs = env.run_on("other.redb", &["runs", "--json"]);
    runs.assert_ok();
    let runs: Vec<Value> = serde_json::from_str(&runs.stdout).unwrap();
    assert_eq!(runs.len(), 1);
    for k in [
        "run", "workflow", "version", "status", "events", "parent", "labels",
    ] {
        assert_eq!(runs[0][k], meta[k], "{k}");
    }
    // What is read from the log reads the same.
    let audit = env.run_on("other.redb", &["audit", &id, "--json"]);
    audit.assert_ok();
    assert_eq!(
        serde_json::from_str::<Value>(&audit.stdout).unwrap(),
        audit_json(&env, &id)
    );
}

#[test]
fn importing_a_run_that_exists_is_refused() {
    let env = Env::new();
    let id = agent_run(&env);
    let (_, lines, file) = export(&env, &id);
    let file = file.to_str().unwrap();
    env.run_on("other.redb", &["import", file]).assert_ok();
    let before = verify_line(&env.run_on("other.redb", &["verify", &id]));

    let out = env.run_on("other.redb", &["import", file]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let line = out.assert_one_line_error();
    assert!(
        line.contains(&id) && line.contains("already exists"),
        "{line}"
    );
    // Nor into the store it came from.
    let line = env
        .run(&["import", file])
        .assert_one_line_error()
        .to_string();
    assert!(line.contains("already exists"), "{line}");

    assert_eq!(
        verify_line(&env.run_on("other.redb", &["verify", &id])),
        before
    );
    assert!(
        before.contains(&format!("{} events", lines.len())),
        "{before}"
    );
}

#[test]
fn a_tampered_export_is_refused_naming_the_event() {
    let env = Env::new();
    let id = agent_run(&env);
    let (header, lines, _) = export(&env, &id);
    let write = |name: &str, header: &Value, lines: &[Value]| {
        let mut all = vec![header.clone()];
        all.extend_from_slice(lines);
        env.write_jsonl(name, &all)
    };

    // One byte of one payload changed (the output of the first tool call).
    let k = lines
        .iter()
        .position(|l| l["event"]["name"] == "tool:lookup_ticket")
        .expect("a tool step");
    let mut bad = lines.clone();
    let mut payload = B64.decode(bad[k]["payload"].as_str().unwrap()).unwrap();
    let at = payload
        .windows(7)
        .position(|w| w == b"T-01042")
        .expect("the ticket id in the payload");
    payload[at + 6] = b'3';
    bad[k]["payload"] = B64.encode(&payload).into();
    let file = write("tampered.jsonl", &header, &bad);
    let out = env.run_on("other.redb", &["import", file.to_str().unwrap()]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let line = out.assert_one_line_error();
    assert!(
        line.contains(&format!("event {k} does not match its hash")),
        "{line}"
    );
    assert!(
        !env.path("other.redb").exists(),
        "nothing is written (not even a store) for a refused import"
    );

    // A missing event.
    let mut short = lines.clone();
    short.remove(2);
    let file = write("gap.jsonl", &header, &short);
    let line = env
        .run_on("other.redb", &["import", file.to_str().unwrap()])
        .assert_one_line_error()
        .to_string();
    assert!(line.contains("expected event 2"), "{line}");

    // A header whose head is not the chain's.
    let mut h = header.clone();
    h["head"] = "00".repeat(32).into();
    let file = write("head.jsonl", &h, &lines);
    let line = env
        .run_on("other.redb", &["import", file.to_str().unwrap()])
        .assert_one_line_error()
        .to_string();
    assert!(line.contains("head"), "{line}");

    // A run moved to another id: the chain starts from the run's own genesis hash.
    let mut h = header.clone();
    h["run"] = "01JD3Q5W8ZK2X4M7N9P0R1S2T3".into();
    let file = write("moved.jsonl", &h, &lines);
    let line = env
        .run_on("other.redb", &["import", file.to_str().unwrap()])
        .assert_one_line_error()
        .to_string();
    assert!(line.contains("event 0 does not match its hash"), "{line}");

    // Not an export at all.
    let file = env.write_jsonl("junk.jsonl", &[json!({"hello": 1})]);
    let line = env
        .run_on("other.redb", &["import", file.to_str().unwrap()])
        .assert_one_line_error()
        .to_string();
    assert!(line.contains("not a cairn export"), "{line}");
    assert!(!env.path("other.redb").exists());
}

/// A parked run keeps its status and its wake-up time across export and import, so a worker
/// of the other store wakes it (an hour-long sleep: no timing assumption).
#[test]
fn a_parked_run_is_imported_with_its_wake_up_time() {
    let env = Env::new();
    let out = env.run(&[
        "--park-after",
        "0",
        "start",
        "sleepy",
        "--input",
        r#"{"sleep_ms": 3600000}"#,
    ]);
    out.assert_ok();
    let id = common::run_id_of(out.stdout.lines().next().unwrap());
    assert_eq!(env.run_meta(&id)["status"], "waiting");
    let (header, _, file) = export(&env, &id);
    assert_eq!(header["status"], "waiting");
    assert!(header["wake_at_us"].is_i64(), "{header}");
    env.run_on("other.redb", &["import", file.to_str().unwrap()])
        .assert_ok();
    let wakes = |out: Out| {
        out.assert_ok();
        out.stdout
            .lines()
            .find(|l| l.starts_with("wakes "))
            .unwrap_or_else(|| panic!("no `wakes` line: {out:?}"))
            .to_string()
    };
    assert_eq!(
        wakes(env.run_on("other.redb", &["show", &id])),
        wakes(env.run(&["show", &id]))
    );
    let runs = env.run_on("other.redb", &["runs", "--json", "--status", "waiting"]);
    runs.assert_ok();
    assert!(runs.stdout.contains(&id), "{runs:?}");
}
