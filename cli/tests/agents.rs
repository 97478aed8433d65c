//! The built-in `agent` workflow end to end: a `cairn` child process running a durable agent
//! against a fake Anthropic server in this test process (the real Messages wire format over
//! loopback HTTP), SIGKILLed mid-conversation and resumed; retries of 429/529 answers; a 401
//! that fails at once; the key rules; the scripted provider.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    Env, FakeReply, FakeRequest, FakeServer, WAIT_TIMEOUT, anthropic_error, anthropic_message,
    assert_dense_seq, events_of, wait_for,
};
use serde_json::{Value, json};

/// The final answer of the scripted conversation.
const FINAL: &str = "T-01042 is a billing ticket; the note has 4 words.";
/// How long the fake server takes to answer each model call, so a kill lands mid-call.
const REPLY_DELAY: Duration = Duration::from_millis(300);

/// The input of an `agent` run against the fake server at `url`.
fn agent_input(url: &str) -> String {
    json!({
        "provider": "anthropic",
        "base_url": url,
        "model": "claude-haiku-4-5",
        "task": "Triage ticket T-01042 and count the words of its note.",
    })
    .to_string()
}

/// The answer to turn `k` (the number of assistant messages in the request): two parallel
/// tool calls, then one more, then the final text.
fn turn_reply(k: usize) -> FakeReply {
    match k {
        0 => anthropic_message(
            json!([
                {"type": "text", "text": "Looking it up."},
                {"type": "tool_use", "id": "toolu_lookup", "name": "lookup_ticket",
                 "input": {"id": "T-01042"}},
                {"type": "tool_use", "id": "toolu_count", "name": "word_count",
                 "input": {"text": "refund still not received"}},
            ]),
            "tool_use",
        ),
        1 => anthropic_message(
            json!([
                {"type": "tool_use", "id": "toolu_lookup2", "name": "lookup_ticket",
                 "input": {"id": "T-01043"}},
            ]),
            "tool_use",
        ),
        _ => anthropic_message(json!([{"type": "text", "text": FINAL}]), "end_turn"),
    }
}

/// The `step_completed` events of steps named `name`.
fn completed_steps<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events_of(events, "step_completed")
        .into_iter()
        .filter(|e| e["name"] == name)
        .collect()
}

/// The `step_failed` events of steps named `name`.
fn failed_steps<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events_of(events, "step_failed")
        .into_iter()
        .filter(|e| e["name"] == name)
        .collect()
}

/// The tool results (`tool_use_id` → block) of a Messages request body.
fn tool_results(req: &FakeRequest) -> BTreeMap<String, Value> {
    req.json()["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|b| b["type"] == "tool_result")
        .map(|b| {
            (
                b["tool_use_id"].as_str().unwrap_or("").to_string(),
                b.clone(),
            )
        })
        .collect()
}

/// A run SIGKILLed while its second model call is in flight resumes from the log: the first
/// call (and its two tool calls) is answered from the log, only the call in flight is sent
/// again (with the very same body), every turn is recorded once, and the log verifies.
#[test]
fn sigkilled_agent_resumes_without_resending_recorded_model_calls() {
    let server = FakeServer::start(|_, req| turn_reply(req.assistant_turns()).delay(REPLY_DELAY));
    let env = Env::new();
    let input = agent_input(&server.url());
    let mut child = env.spawn_keyless(&["start", "agent", "--input", &input]);
    let id = child.wait_run_id();
    wait_for(WAIT_TIMEOUT, "the fake server's 2nd request", || {
        if let Some(s) = child.try_status() {
            panic!(
                "the agent run exited ({s}) before its second model call\nstdout: {}\nstderr: {}",
                child.stdout(),
                child.stderr()
            );
        }
        (server.count() >= 2).then_some(())
    });
    assert!(child.kill9(), "the agent run finished before the kill");
    let sent_at_kill = server.count();

    // What the log holds at the kill: the run is still running; the first turn is recorded.
    let meta = env.run_meta(&id);
    assert_eq!(meta["status"], "running", "{meta}");
    let before = env.events_json(&id);
    let recorded = completed_steps(&before, "model").len();
    println!("{recorded} model call(s) recorded, {sent_at_kill} sent at the kill");
    assert!(
        (1..3).contains(&recorded),
        "{recorded} model calls recorded at the kill"
    );

    let out = env.run_keyless(&["resume", &id]);
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("run {id} completed")),
        "{out:?}"
    );
    let run = out.output_json();
    assert_eq!(run["text"], FINAL, "{run}");
    assert_eq!(run["stop_reason"], "end_turn");
    assert_eq!(run["turns"], 3);
    assert_eq!(run["tool_calls"], 3);
    assert_eq!(run["tool_errors"], 0);
    assert_eq!(run["agent"], "assistant");

    // The server: one request per turn, plus one repeat of the call in flight at the kill.
    let reqs = server.requests();
    let mut by_turn = BTreeMap::<usize, Vec<&FakeRequest>>::new();
    for r in &reqs {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/messages")
        );
        assert_eq!(r.header("x-api-key"), Some("test-key"), "placeholder key");
        assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
        by_turn.entry(r.assistant_turns()).or_default().push(r);
    }
    let counts: BTreeMap<usize, usize> = by_turn.iter().map(|(k, v)| (*k, v.len())).collect();
    println!("requests by turn: {counts:?}");
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2],
        "{counts:?}"
    );
    for k in 0..recorded {
        assert_eq!(
            counts[&k], 1,
            "turn {k} was recorded before the kill and must not be sent again: {counts:?}"
        );
    }
    let repeats: usize = counts.values().map(|c| c - 1).sum();
    assert!(repeats <= 1, "{repeats} repeated calls: {counts:?}");
    assert!(reqs.len() <= 4, "{} requests", reqs.len());
    if sent_at_kill > recorded {
        // The call in flight at the kill was sent again, identically (the conversation was
        // rebuilt from the log, tool results included).
        let again = &by_turn[&recorded];
        assert_eq!(again.len(), 2, "{counts:?}");
        assert_eq!(again[0].json(), again[1].json());
    }

    // The tool results the model saw: both parallel calls of turn 1, then the third.
    let turn1 = by_turn[&1][0];
    let results = tool_results(turn1);
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results["toolu_count"]["content"], "4");
    assert_eq!(results["toolu_count"]["is_error"], false);
    let ticket: Value =
        serde_json::from_str(results["toolu_lookup"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(ticket["id"], "T-01042", "{ticket}");
    let results = tool_results(by_turn[&2][0]);
    assert_eq!(results.len(), 3, "{results:?}");

    // The log: exactly 3 model steps and 3 tool steps, dense, one resume, one completion.
    let events = env.events_json(&id);
    assert_dense_seq(&events);
    let model_steps = completed_steps(&events, "model");
    assert_eq!(model_steps.len(), 3, "{model_steps:?}");
    for (k, e) in model_steps.iter().enumerate() {
        let msgs = e["output"]["request"]["messages"].as_array().unwrap();
        let asked = msgs.iter().filter(|m| m["role"] == "assistant").count();
        assert_eq!(asked, k, "model step {k} records the request of turn {k}");
        assert_eq!(e["output"]["provider"], "anthropic");
    }
    assert_eq!(completed_steps(&events, "tool:lookup_ticket").len(), 2);
    assert_eq!(completed_steps(&events, "tool:word_count").len(), 1);
    assert_eq!(
        completed_steps(&events, "cairn.scope:agent:assistant").len(),
        1
    );
    assert_eq!(events_of(&events, "run_resumed").len(), 1);
    assert_eq!(events_of(&events, "run_completed").len(), 1);
    assert_eq!(events.last().unwrap()["output"]["text"], FINAL);

    let verify = env.run(&["verify", &id]);
    verify.assert_ok();
    assert!(verify.stdout.starts_with(&format!("ok {id}")), "{verify:?}");
}

/// 429 (retry-after: 1) then 529 then success: the run completes; the log has both failed
/// attempts of the model step, the first naming HTTP 429; the retry waited ≥ 1 s.
#[test]
fn rate_limited_and_overloaded_model_calls_are_retried_durably() {
    let server = FakeServer::start(|i, _| match i {
        0 => anthropic_error(429, "rate_limit_error", "slow down").header("retry-after", "1"),
        1 => anthropic_error(529, "overloaded_error", "Overloaded"),
        _ => anthropic_message(json!([{"type": "text", "text": FINAL}]), "end_turn"),
    });
    let env = Env::new();
    let out = env.run_keyless(&["start", "agent", "--input", &agent_input(&server.url())]);
    out.assert_ok();
    assert_eq!(out.output_json()["text"], FINAL);
    assert_eq!(out.output_json()["turns"], 1);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    let waited = reqs[1].at - reqs[0].at;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");

    let id = common::run_id_of(out.stdout.lines().next().unwrap());
    let events = env.events_json(&id);
    assert_dense_seq(&events);
    let failed = failed_steps(&events, "model");
    assert_eq!(failed.len(), 2, "{failed:?}");
    let e0 = failed[0]["error"].as_str().unwrap();
    assert!(e0.contains("HTTP 429"), "{e0}");
    assert!(failed[1]["error"].as_str().unwrap().contains("HTTP 529"));
    assert_eq!(failed[0]["attempt"], 1);
    assert_eq!(failed[1]["attempt"], 2);
    let fail_ts = failed[0]["ts_us"].as_i64().unwrap();
    assert!(failed[0]["retry_at_us"].as_i64().unwrap() >= fail_ts + 1_000_000 - 1_000);
    let done = completed_steps(&events, "model");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["attempt"], 3);
    let gap = done[0]["ts_us"].as_i64().unwrap() - fail_ts;
    assert!(gap >= 1_000_000, "{gap} µs from the 429 to the success");
    env.run(&["verify", &id]).assert_ok();
}

/// A 401 is not retried: the run fails after one request, with one line naming the API key.
#[test]
fn unauthorized_model_call_fails_at_once_with_a_clear_message() {
    let server =
        FakeServer::start(|_, _| anthropic_error(401, "authentication_error", "invalid x-api-key"));
    let env = Env::new();
    let out = env.run_keyless(&["start", "agent", "--input", &agent_input(&server.url())]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(server.count(), 1);
    let printed = format!("{}{}", out.stdout, out.stderr);
    let lines: Vec<&str> = printed
        .lines()
        .filter(|l| l.contains("check the API key"))
        .collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    println!("{}", lines[0]);
    let id = common::run_id_of(out.stdout.lines().next().unwrap());
    assert!(
        lines[0].starts_with(&format!("run {id} failed: ")),
        "{lines:?}"
    );
    assert!(lines[0].contains("HTTP 401"), "{lines:?}");
    assert!(!lines[0].contains("test-key"), "{lines:?}");

    let events = env.events_json(&id);
    let failed = failed_steps(&events, "model");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0]["retry_at_us"].is_null());
    let err = common::the_event(&events, "run_failed")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        err.contains("check the API key") && !err.contains('\n'),
        "{err}"
    );
    assert_eq!(env.run_meta(&id)["status"], "failed");
}

/// Without ANTHROPIC_API_KEY, a non-loopback base URL is refused before any call is made.
#[test]
fn a_missing_key_is_refused_for_a_remote_endpoint() {
    let env = Env::new();
    let input = json!({
        "provider": "anthropic",
        "base_url": "https://api.anthropic.example",
        "model": "claude-haiku-4-5",
        "task": "hello",
    })
    .to_string();
    let out = env.run_keyless(&["start", "agent", "--input", &input]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stdout.contains("ANTHROPIC_API_KEY is not set"),
        "{out:?}"
    );
    let id = common::run_id_of(out.stdout.lines().next().unwrap());
    let events = env.events_json(&id);
    assert!(
        failed_steps(&events, "model").is_empty(),
        "no call was made"
    );
}

/// The scripted provider runs offline from a JSON-lines script, tools included.
#[test]
fn the_scripted_provider_runs_the_tool_loop_offline() {
    let env = Env::new();
    let script = env.path("script.jsonl");
    let lines = [
        json!({"id": "s1", "model": "scripted", "stop_reason": "tool_use",
               "content": [{"type": "tool_use", "id": "t1", "name": "word_count",
                            "input": {"text": "one two three"}}]}),
        json!({"id": "s2", "model": "scripted", "stop_reason": "end_turn",
               "content": [{"type": "text", "text": "three words"}]}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&script, text).unwrap();
    let input = json!({
        "provider": "scripted",
        "model": "scripted-1",
        "task": "count",
        "script": script.to_str().unwrap(),
        "max_turns": 4,
        "system": "Be brief.",
    })
    .to_string();
    let out = env.run_keyless(&["start", "agent", "--input", &input]);
    out.assert_ok();
    let run = out.output_json();
    assert_eq!(run["text"], "three words");
    assert_eq!(run["turns"], 2);
    assert_eq!(run["tool_calls"], 1);
    let msgs = run["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 4, "{run}");
    assert_eq!(msgs[2]["content"][0]["content"], "3");
    let id = common::run_id_of(out.stdout.lines().next().unwrap());
    let events = env.events_json(&id);
    let model = completed_steps(&events, "model");
    assert_eq!(model.len(), 2);
    assert_eq!(model[0]["output"]["request"]["system"], "Be brief.");
}
