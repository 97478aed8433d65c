//! Live telemetry of the `cairn` process: the metrics log (`--metrics-log`, one `agent_call`
//! JSON line per live model call) and JSON logs on stderr (`--log-format json`) carrying the
//! run's span.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

/// A two-turn script: a `word_count` tool call, then the answer, with token counts.
fn write_script(path: &Path) {
    let lines = [
        json!({"id": "s1", "model": "scripted-resp", "stop_reason": "tool_use",
               "content": [{"type": "tool_use", "id": "t1", "name": "word_count",
                            "input": {"text": "one two three"}}],
               "usage": {"input_tokens": 111, "output_tokens": 22}}),
        json!({"id": "s2", "model": "scripted-resp", "stop_reason": "end_turn",
               "content": [{"type": "text", "text": "three words"}],
               "usage": {"input_tokens": 133, "output_tokens": 4}}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn agent_input(script: &Path) -> String {
    json!({
        "provider": "scripted",
        "model": "scripted-1",
        "task": "count",
        "script": script.to_str().unwrap(),
        "max_turns": 4,
    })
    .to_string()
}

/// Runs `cairn --store <dir>/s.redb <args>` with `RUST_LOG` set to `rust_log` (or unset).
fn cairn(dir: &Path, rust_log: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.arg("--store").arg(dir.join("s.redb")).args(args);
    c.env_remove("RUST_LOG").env_remove("CAIRN_STORE");
    if let Some(f) = rust_log {
        c.env("RUST_LOG", f);
    }
    let out = c.output().expect("run cairn");
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_metrics_log_has_one_agent_call_line_per_model_call() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.jsonl");
    write_script(&script);
    let metrics = dir.path().join("metrics.jsonl");
    let out = cairn(
        dir.path(),
        None,
        &[
            "--metrics-log",
            metrics.to_str().unwrap(),
            "start",
            "agent",
            "--input",
            &agent_input(&script),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run_id = stdout
        .split_whitespace()
        .find(|w| w.len() == 26 && w.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| panic!("no run id in {stdout}"))
        .to_string();
    // The default filter (`warn`) keeps stderr free of the metrics and of info spans.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("agent_call"), "{stderr}");

    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (l, (i, o, tools)) in lines.iter().zip([(111, 22, 1), (133, 4, 0)]) {
        assert_eq!(l["type"], "agent_call", "{l}");
        assert_eq!(l["agent"], "assistant");
        assert_eq!(l["model"], "scripted-resp");
        assert_eq!(l["input_tokens"], i);
        assert_eq!(l["output_tokens"], o);
        assert_eq!(l["tool_calls"], tools);
        assert_eq!(l["success"], true);
        assert_eq!(l["run_id"], run_id.as_str(), "{l}");
        assert!(l["latency_ms"].is_u64(), "{l}");
        assert!(l.get("cost_usd").is_some(), "{l}");
        let ts = l["timestamp"].as_str().unwrap();
        chrono::DateTime::parse_from_rfc3339(ts).unwrap_or_else(|e| panic!("{e}: {ts}"));
    }

    // Resuming the finished run sends no model call again, so adds no line.
    let again = cairn(
        dir.path(),
        None,
        &[
            "--metrics-log",
            metrics.to_str().unwrap(),
            "resume",
            &run_id,
        ],
    );
    drop(again);
    let after = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(after.lines().count(), 2, "{after}");
}

#[test]
fn json_logs_on_stderr_carry_the_run_span() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.jsonl");
    write_script(&script);
    let out = cairn(
        dir.path(),
        Some("cairn=info"),
        &[
            "--log-format",
            "json",
            "start",
            "agent",
            "--input",
            &agent_input(&script),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!lines.is_empty(), "{stderr}");
    let names = |l: &Value| -> Vec<String> {
        let mut n: Vec<String> = l["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(l.get("span"))
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect();
        n.dedup();
        n
    };
    assert!(
        lines.iter().any(|l| names(l).contains(&"run".to_string())),
        "no JSON line with the `run` span: {stderr}"
    );
    let chats: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["name"] == "chat")
        .collect();
    assert_eq!(chats.len(), 2, "{stderr}");
    assert_eq!(chats[0]["span"]["gen_ai.usage.input_tokens"], 111);
    assert!(names(chats[0]).starts_with(&["run".to_string(), "agent".to_string()]));
    // The metrics events stay out of the log.
    assert!(!stderr.contains("agent_call"), "{stderr}");
}

/// A failed step attempt's warning names its run, its position and its step, whether the
/// attempt had a span (the log shows INFO spans, or the run is exported) or not (the default
/// log, or a run the live export leaves out, where no `step` span is made at all).
#[test]
fn a_failed_attempts_warning_names_the_run_and_the_step_in_every_setup() {
    // RUST_LOG, flags, environment.
    type Setup = (
        &'static str,
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
    );
    let setups: [Setup; 4] = [
        ("warn", &[], &[]),
        (
            "warn",
            &["--otel-discard"],
            &[("OTEL_TRACES_SAMPLER", "always_off")],
        ),
        (
            "warn",
            &["--otel-discard"],
            &[("OTEL_TRACES_SAMPLER", "always_on")],
        ),
        ("info", &[], &[]),
    ];
    for (rust_log, flags, vars) in setups {
        let dir = tempfile::tempdir().unwrap();
        let input = json!({
            "failures": 1, "backoff_ms": 1,
            "attempts_file": dir.path().join("attempts").to_str().unwrap(),
        })
        .to_string();
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.arg("--store").arg(dir.path().join("s.redb")).args(flags);
        c.args(["start", "flaky", "--input", &input]);
        c.env_remove("CAIRN_STORE")
            .env("RUST_LOG", rust_log)
            .envs(vars.iter().copied());
        let out = c.output().expect("run cairn");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let setup = format!("RUST_LOG={rust_log} {flags:?} {vars:?}");
        assert!(out.status.success(), "{setup}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let run = stdout
            .split_whitespace()
            .find(|w| w.len() == 26 && w.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or_else(|| panic!("no run id in {stdout}"));
        let warning = stderr
            .lines()
            .find(|l| l.contains("step attempt failed"))
            .unwrap_or_else(|| panic!("{setup}: no warning in {stderr}"));
        for part in [run, "cairn.step_path=0", "cairn.step_name=call", "503"] {
            assert!(warning.contains(part), "{setup}: {part} not in {warning}");
        }
        // At INFO the log shows each span closing; at WARN it shows none.
        assert_eq!(
            stderr.contains("close"),
            rust_log == "info",
            "{setup}: {stderr}"
        );
    }
}
