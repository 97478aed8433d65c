//! End-to-end tests of `cairn run FILE` (workflow files over a batch of items): a batch killed
//! with SIGKILL or stopped with Ctrl-C and resumed writes each item's result exactly once and
//! ends with the same report as an uninterrupted run; invalid files are refused with file:line
//! and write nothing; `replay --check` catches a changed file; `fork --set` re-executes only
//! what follows the fork point (the fake model server counts the requests).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{CMD_TIMEOUT, Env, FakeReply, FakeServer, command, wait_for};
use serde_json::{Value, json};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/triage")
        .join(name)
}

/// A copy of the triage example in `env`'s directory (so tests can change it freely), with
/// the recorded models answering after `latency_ms`.
fn triage_copy(env: &Env, latency_ms: u64) -> PathBuf {
    let dir = env.path("triage");
    std::fs::create_dir_all(dir.join("kb")).unwrap();
    for f in ["responses.jsonl", "tickets.jsonl"] {
        std::fs::copy(example(f), dir.join(f)).unwrap();
    }
    for f in std::fs::read_dir(example("kb")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join("kb").join(f.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(example("triage.toml")).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("latency_ms") {
                format!("latency_ms = {latency_ms}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("triage.toml"), text).unwrap();
    dir.join("triage.toml")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Starts `cairn run` of the triage copy `file` writing to `out_path`; returns the process and
/// the run id.
fn start_triage(env: &Env, file: &Path, out_path: &Path) -> (common::Proc, String) {
    let tickets = env.path("triage/tickets.jsonl");
    let mut p = env.spawn(&triage_args(file, &tickets, out_path));
    let id = p.wait_run_id();
    (p, id)
}

/// Starts `cairn run` of the triage copy `file` and sends it Ctrl-C (SIGINT) once `out_path`
/// has `lines_at_stop` results; returns the run id and the process's output (exit 130).
fn interrupt_after(
    env: &Env,
    file: &Path,
    out_path: &Path,
    lines_at_stop: usize,
) -> (String, common::Out) {
    let (p, id) = start_triage(env, file, out_path);
    wait_for(Duration::from_secs(60), "some results", || {
        (lines(out_path) >= lines_at_stop).then_some(())
    });
    p.signal(libc::SIGINT);
    let out = p.finish(CMD_TIMEOUT);
    assert_eq!(out.code(), Some(130), "{out:#?}");
    (id, out)
}

/// Starts `cairn run` of the triage copy `file` and SIGKILLs it once `out_path` has `lines`
/// results; returns the run id.
fn start_and_kill_after(env: &Env, file: &Path, out_path: &Path, lines_at_kill: usize) -> String {
    let (mut p, id) = start_triage(env, file, out_path);
    wait_for(Duration::from_secs(60), "some results", || {
        (lines(out_path) >= lines_at_kill).then_some(())
    });
    assert!(p.kill9());
    id
}

/// A stopped triage run's results file is partial (30 to 299 lines), and `cairn resume`
/// completes it to exactly 300.
fn resume_completes(env: &Env, id: &str, out_path: &Path) {
    let stopped_at = lines(out_path);
    assert!((30..300).contains(&stopped_at), "{stopped_at}");
    let out = env.run(&["resume", id]);
    out.assert_ok();
    assert_eq!(results(out_path).len(), 300);
}

/// The results file's lines, by item index; panics on a duplicate or a malformed line.
fn results(path: &Path) -> BTreeMap<u64, Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut by_index = BTreeMap::new();
    for line in text.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"));
        let i = v["index"].as_u64().unwrap();
        assert!(
            by_index.insert(i, v).is_none(),
            "item {i} appears twice in {}",
            path.display()
        );
    }
    by_index
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// The run's output (`output: {...}` on stdout).
fn report_text(out: &common::Out) -> String {
    out.output_json()["steps"]["report"]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no report in {out:#?}"))
        .to_string()
}

/// `cairn run` of the triage copy `file` over its tickets, writing to `out_path`, to the end.
fn run_triage(env: &Env, file: &Path, out_path: &Path) -> common::Out {
    let tickets = env.path("triage/tickets.jsonl");
    env.run(&triage_args(file, &tickets, out_path))
}

/// The arguments of `cairn run FILE --input TICKETS --output OUT`.
fn triage_args<'a>(file: &'a Path, tickets: &'a Path, out_path: &'a Path) -> [&'a str; 6] {
    [
        "run",
        s(file),
        "--input",
        s(tickets),
        "--output",
        s(out_path),
    ]
}

/// The same run, uninterrupted: the reference the interrupted runs must match.
fn reference() -> (BTreeMap<u64, Value>, String) {
    let env = Env::new();
    let file = triage_copy(&env, 0);
    let out_path = env.path("ref.jsonl");
    let out = run_triage(&env, &file, &out_path);
    out.assert_ok();
    (results(&out_path), report_text(&out))
}

fn strip_run(mut m: BTreeMap<u64, Value>) -> BTreeMap<u64, Value> {
    for v in m.values_mut() {
        v.as_object_mut().unwrap().remove("run");
    }
    m
}

#[test]
fn a_300_item_batch_killed_midway_resumes_to_exactly_300_results_and_the_same_report() {
    let (want, want_report) = reference();
    assert_eq!(want.len(), 300);
    assert!(
        want.values()
            .all(|v| v["ok"] == true && v["key"].is_string())
    );

    let env = Env::new();
    let file = triage_copy(&env, 15);
    let out_path = env.path("results.jsonl");
    let (mut p, id) = start_triage(&env, &file, &out_path);
    wait_for(Duration::from_secs(60), "a third of the results", || {
        (lines(&out_path) >= 100).then_some(())
    });
    assert!(p.kill9(), "the batch finished before it could be killed");
    let before = lines(&out_path);
    assert!(before < 300, "killed after {before} results");

    let out = env.run(&["resume", &id]);
    out.assert_ok();
    let got = results(&out_path);
    assert_eq!(got.len(), 300, "{}", out.stdout);
    assert!(got.values().all(|v| v["run"] == id.as_str()));
    assert_eq!(strip_run(got), strip_run(want));
    assert_eq!(report_text(&out), want_report);
    assert!(
        out.stdout.contains("300 of 300 done (300 ok, 0 failed)"),
        "{}",
        out.stdout
    );
    env.run(&["verify", &id]).assert_ok();
}

#[test]
fn ctrl_c_stops_the_batch_cleanly_and_resume_finishes_it() {
    let env = Env::new();
    let file = triage_copy(&env, 15);
    let out_path = env.path("results.jsonl");
    let (id, out) = interrupt_after(&env, &file, &out_path, 30);
    assert!(out.stderr.contains("interrupt: stopping"), "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!("resume {id}")),
        "{}",
        out.stdout
    );
    assert_eq!(env.run_meta(&id)["status"], "running");
    resume_completes(&env, &id, &out_path);
}

#[test]
fn an_existing_results_file_is_refused_before_anything_is_written() {
    let env = Env::new();
    let file = triage_copy(&env, 0);
    let out_path = env.path("results.jsonl");
    std::fs::write(&out_path, "{\"run\":\"x\"}\n").unwrap();
    let out = env.run(&[
        "run",
        s(&file),
        "--input",
        s(&env.path("triage/tickets.jsonl")),
        "--output",
        s(&out_path),
    ]);
    assert_eq!(out.code(), Some(2));
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    assert!(
        !env.store.exists(),
        "nothing may be written for a refused run"
    );
}

/// Writes `text` as a workflow file and returns `cairn run`'s output for it.
fn run_file(env: &Env, name: &str, text: &str, extra: &[&str]) -> common::Out {
    let f = env.path(name);
    std::fs::write(&f, text).unwrap();
    let mut args = vec!["run", s(&f)];
    args.extend_from_slice(extra);
    env.run(&args)
}

const HEADER: &str = r#"[workflow]
name = "t"

[models.m]
provider = "openai"
model = "gpt-test"
base_url = "http://127.0.0.1:9/v1"

[agents.a]
model = "m"
"#;

#[test]
fn invalid_workflow_files_name_file_line_and_fix_and_write_nothing() {
    let env = Env::new();
    let cases: &[(&str, &str, &str)] = &[
        ("syntax", "[workflow\nname = 1\n", ":1:"),
        (
            "unknown-agent",
            &format!("{HEADER}\n[[flow]]\nid = \"s\"\nagent = \"nobody\"\nprompt = \"hi\"\n"),
            ":14:9: step `s`: unknown agent `nobody` (declared: a)",
        ),
        (
            "missing-model",
            "[workflow]\nname = \"t\"\n\n[agents.a]\nmodel = \"gone\"\n\n[[flow]]\nid = \"s\"\nagent = \"a\"\nprompt = \"x\"\n",
            ":5:9: agent `a`: unknown model `gone`",
        ),
        (
            "bad-template",
            &format!(
                "{HEADER}\n[[flow]]\nid = \"s\"\nagent = \"a\"\nprompt = \"hi {{{{ input.who }}}}\"\n"
            ),
            "no parameter `who`",
        ),
        (
            "cycle",
            &format!(
                "{HEADER}\n[[flow]]\nid = \"s\"\nagent = \"a\"\nhandoff = {{ from = \"s\", mode = \"full\" }}\n"
            ),
            "cycle",
        ),
        (
            "unknown-tool",
            &format!(
                "{HEADER}tools = [\"nope\"]\n\n[[flow]]\nid = \"s\"\nagent = \"a\"\nprompt = \"x\"\n"
            ),
            ":11:10: agent `a`: unknown tool `nope`",
        ),
    ];
    for (name, text, want) in cases {
        let out = run_file(&env, &format!("{name}.toml"), text, &[]);
        assert_eq!(out.code(), Some(2), "{name}: {out:#?}");
        assert!(
            out.stderr.contains(&format!("{name}.toml")) && out.stderr.contains(want),
            "{name}: expected {want:?} in {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("nothing was run or recorded"),
            "{name}: {}",
            out.stderr
        );
    }
    assert!(
        !env.store.exists(),
        "an invalid file must not create the store"
    );
}

#[test]
fn items_missing_a_field_a_prompt_uses_are_refused_with_their_line() {
    let env = Env::new();
    let items = env.path("items.jsonl");
    std::fs::write(&items, "{\"id\": 1, \"text\": \"a\"}\n\n{\"id\": 2}\n").unwrap();
    let text = format!(
        "{HEADER}\n[[flow]]\nid = \"each\"\nfor_each = \"items\"\n\n[[flow.steps]]\nid = \"s\"\nagent = \"a\"\nprompt = \"{{{{ item.text }}}}\"\n"
    );
    let out = run_file(&env, "f.toml", &text, &["--input", s(&items)]);
    assert_eq!(out.code(), Some(2), "{out:#?}");
    let line = out.assert_one_line_error();
    assert!(
        line.contains("items.jsonl: line 3") && line.contains("no field `text`"),
        "{line}"
    );
    assert!(!env.store.exists());
}

/// A fake Anthropic server answering every request with its model id, counting requests.
fn anthropic_fake() -> FakeServer {
    FakeServer::start(|i, req| {
        let model = req.json()["model"].as_str().unwrap_or("").to_string();
        FakeReply::json(
            200,
            json!({
                "id": format!("msg_{i}"),
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": format!("answer from {model}")}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 10, "output_tokens": 5}
            }),
        )
    })
}

fn fork_flow(url: &str) -> String {
    format!(
        r#"[workflow]
name = "drafts"

[models.small]
provider = "anthropic"
model = "model-small"
base_url = "{url}"
api_key_env = "CAIRN_TEST_KEY"

[models.big]
provider = "anthropic"
model = "model-big"
base_url = "{url}"
api_key_env = "CAIRN_TEST_KEY"

[agents.drafter]
model = "small"

[agents.editor]
model = "small"

[[flow]]
id = "drafts"
for_each = "items"
key = "topic"
concurrency = 2

[[flow.steps]]
id = "draft"
agent = "drafter"
prompt = "Draft a note about {{{{ item.topic }}}}."

[[flow]]
id = "edit"
agent = "editor"
prompt = "Edit these drafts:\n{{{{ steps.drafts.results }}}}"
"#
    )
}

fn run_keyed(env: &Env, args: &[&str]) -> common::Out {
    let o = command(&env.store, args)
        .env("CAIRN_TEST_KEY", "test-key")
        .output()
        .expect("run cairn");
    common::Out {
        status: o.status,
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn fork_with_another_model_reexecutes_only_the_steps_after_the_fork_point() {
    let fake = anthropic_fake();
    let env = Env::new();
    let file = env.path("drafts.toml");
    std::fs::write(&file, fork_flow(&fake.url())).unwrap();
    let items = env.path("topics.jsonl");
    std::fs::write(
        &items,
        "{\"topic\": \"redb\"}\n{\"topic\": \"wal\"}\n{\"topic\": \"fsync\"}\n",
    )
    .unwrap();
    let out = run_keyed(&env, &["run", s(&file), "--input", s(&items)]);
    out.assert_ok();
    assert_eq!(fake.count(), 4, "three drafts and one edit");
    let id = out.stdout.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(
        out.output_json()["steps"]["edit"]["text"],
        "answer from model-small"
    );

    // The edit step is the flow's second top-level operation: path 1.
    let fork = run_keyed(
        &env,
        &[
            "fork",
            &id,
            "--from",
            "1",
            "--set",
            "agents.editor.model=big",
        ],
    );
    fork.assert_ok();
    assert_eq!(fake.count(), 5, "only the edit runs again: {fork:#?}");
    let last = fake.requests().pop().unwrap();
    assert_eq!(last.json()["model"], "model-big");
    assert_eq!(
        fork.output_json()["steps"]["edit"]["text"],
        "answer from model-big"
    );
    assert_eq!(fork.output_json()["steps"]["drafts"]["succeeded"], 3);

    // Forking from the fan-out itself with another drafter model runs every branch again.
    let all = run_keyed(
        &env,
        &[
            "fork",
            &id,
            "--from",
            "0",
            "--set",
            "agents.drafter.model=big",
        ],
    );
    all.assert_ok();
    assert_eq!(fake.count(), 9, "three drafts and the edit again: {all:#?}");
    let models: Vec<Value> = fake.requests()[5..]
        .iter()
        .map(|r| r.json()["model"].clone())
        .collect();
    assert_eq!(
        models.iter().filter(|m| *m == "model-big").count(),
        3,
        "{models:?}"
    );
    env.run(&["verify", "--all"]).assert_ok();
}

#[test]
fn replay_check_catches_a_changed_workflow_file_and_resume_refuses_it() {
    let fake = anthropic_fake();
    let env = Env::new();
    let file = env.path("drafts.toml");
    std::fs::write(&file, fork_flow(&fake.url())).unwrap();
    let items = env.path("topics.jsonl");
    std::fs::write(&items, "{\"topic\": \"redb\"}\n{\"topic\": \"wal\"}\n").unwrap();
    let out = run_keyed(&env, &["run", s(&file), "--input", s(&items)]);
    out.assert_ok();
    let id = out.stdout.split_whitespace().nth(1).unwrap().to_string();
    // Checking needs no API key: nothing is sent.
    env.run(&["replay", &id, "--check"]).assert_ok();

    // Rename the fan-out step: the history has `drafts` where the file now has `notes`.
    let changed = fork_flow(&fake.url())
        .replace("id = \"drafts\"", "id = \"notes\"")
        .replace("steps.drafts.results", "steps.notes.results");
    std::fs::write(&file, changed).unwrap();
    let check = env.run(&["replay", &id, "--check"]);
    assert_eq!(check.code(), Some(1), "{check:#?}");
    assert!(
        check.stdout.contains("DIVERGED") && check.stdout.contains("drafts"),
        "{}",
        check.stdout
    );
    assert_eq!(fake.count(), 3);
}

#[test]
fn resuming_a_run_whose_file_changed_is_refused_unless_allowed() {
    let env = Env::new();
    let file = triage_copy(&env, 15);
    let out_path = env.path("results.jsonl");
    let id = start_and_kill_after(&env, &file, &out_path, 20);
    // A change that does not touch recorded steps: the report's prompt.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("Write the report.", "Write the report for the lead."),
    )
    .unwrap();
    let out = env.run(&["resume", &id]);
    assert_eq!(out.code(), Some(2), "{out:#?}");
    assert!(
        out.stderr.contains("changed since run") && out.stderr.contains("--allow-changed"),
        "{}",
        out.stderr
    );
    assert_eq!(env.run_meta(&id)["status"], "running");
    // The recorded answers do not cover the new report prompt, so the report step fails
    // clearly, after every item finished from the log or the recorded answers.
    let out = env.run(&["resume", &id, "--allow-changed"]);
    assert!(
        out.stderr.contains("changed workflow file"),
        "{}",
        out.stderr
    );
    assert_eq!(results(&out_path).len(), 300);
    assert!(out.stdout.contains("no recorded answer"), "{out:#?}");
}

#[test]
fn bench_core_workloads_run_in_rounds_and_report_the_median() {
    let env = Env::new();
    let out = env.run(&[
        "bench",
        "fsync",
        "seq",
        "many",
        "fanout",
        "--steps",
        "20",
        "--workflows",
        "10",
        "--steps-per-workflow",
        "3",
        "--branches",
        "50",
        "--rounds",
        "3",
        "--warmup",
        "1",
        "--json",
        "--dir",
        env.dir.path().to_str().unwrap(),
    ]);
    out.assert_ok();
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:#?}"));
    for (w, rate) in [
        ("fsync", "commits_per_sec"),
        ("seq", "steps_per_sec"),
        ("many", "steps_per_sec"),
        ("fanout", "branches_per_sec"),
    ] {
        let rates: Vec<f64> = v[w]["round_rates"]
            .as_array()
            .unwrap_or_else(|| panic!("{w}: {}", out.stdout))
            .iter()
            .map(|r| r.as_f64().unwrap())
            .collect();
        assert_eq!(
            rates.len(),
            3,
            "{w}: three recorded rounds, the warm-up not among them"
        );
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(
            v[w][rate].as_f64().unwrap(),
            sorted[1],
            "{w}: the median round"
        );
    }
    assert_eq!(v["seq"]["steps"], 20);
    assert_eq!(v["fanout"]["branches"], 50);
}

#[test]
fn bench_batch_runs_a_workflow_file_batch_and_checks_every_answer() {
    let env = Env::new();
    let out = env.run(&[
        "bench",
        "batch",
        "--batch-items",
        "300",
        "--batch-concurrency",
        "16",
        "--json",
        "--dir",
        env.dir.path().to_str().unwrap(),
    ]);
    out.assert_ok();
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:#?}"));
    let b = &v["batch"];
    assert_eq!(b["items"], 300);
    assert_eq!(
        b["model_calls"], 600,
        "a classifier and an agent call per item"
    );
    assert!(b["items_per_sec"].as_f64().unwrap() > 0.0);
    assert!(b["store_bytes_per_item"].as_f64().unwrap() > 100.0);
    let t = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "batch_items_per_sec")
        .expect("the batch target is judged");
    assert!(t["met"].is_boolean());
}

#[test]
fn a_batch_finished_by_recover_gets_its_results_file_completed_by_resume() {
    let env = Env::new();
    let file = triage_copy(&env, 15);
    let out_path = env.path("results.jsonl");
    let (mut p, id) = start_triage(&env, &file, &out_path);
    wait_for(Duration::from_secs(60), "some results", || {
        (lines(&out_path) >= 20).then_some(())
    });
    assert!(p.kill9());
    // `recover` finishes the run but does not write results files.
    env.run(&["recover"]).assert_ok();
    assert_eq!(env.run_meta(&id)["status"], "completed");
    // Complete lines only: the SIGKILL may have cut the last one short, and `resume` trims it
    // and writes that item again.
    let before = std::fs::read_to_string(&out_path)
        .unwrap()
        .matches('\n')
        .count();
    assert!(before < 300);
    let out = env.run(&["resume", &id]);
    out.assert_ok();
    assert!(
        out.stdout
            .contains(&format!("{} missing result lines", 300 - before)),
        "{}",
        out.stdout
    );
    assert_eq!(results(&out_path).len(), 300);
    // Again: nothing is missing any more.
    let out = env.run(&["resume", &id]);
    assert!(
        out.stdout.contains(" 0 missing result lines"),
        "{}",
        out.stdout
    );
    assert_eq!(results(&out_path).len(), 300);
}

#[test]
fn items_over_the_payload_limit_are_refused_before_the_store_is_created() {
    let env = Env::new();
    let items = env.path("items.jsonl");
    let big = "x".repeat(1000);
    let text: String = (0..20_000)
        .map(|i| format!("{{\"id\": {i}, \"text\": \"{big}\"}}\n"))
        .collect();
    std::fs::write(&items, text).unwrap();
    let flow = format!(
        "{HEADER}\n[[flow]]\nid = \"each\"\nfor_each = \"items\"\n\n[[flow.steps]]\nid = \"s\"\nagent = \"a\"\nprompt = \"{{{{ item.text }}}}\"\n"
    );
    let out = run_file(&env, "f.toml", &flow, &["--input", s(&items)]);
    assert_eq!(out.code(), Some(2), "{out:#?}");
    let line = out.assert_one_line_error();
    assert!(line.contains("split the items"), "{line}");
    assert!(!env.store.exists());
}

#[test]
fn check_validates_the_file_items_and_params_and_runs_nothing() {
    let env = Env::new();
    let file = triage_copy(&env, 0);
    let items = env.path("triage/tickets.jsonl");
    let out = env.run(&["run", s(&file), "--input", s(&items), "--check"]);
    out.assert_ok();
    assert!(
        out.stdout
            .contains("workflow `ticket-triage` is valid (300 items, 1 parameters)")
            && out.stdout.contains("Route each support ticket"),
        "{}",
        out.stdout
    );
    assert!(!env.store.exists(), "--check must not create the store");
    let out = env.run(&[
        "run",
        s(&file),
        "--input",
        s(&items),
        "--check",
        "--param",
        "nope=1",
    ]);
    assert_eq!(out.code(), Some(2));
    assert!(out.assert_one_line_error().contains("no parameter `nope`"));
}

/// With a worker holding the store, `cairn run` starts the run in the worker (through its
/// socket) and follows it from the store: the same 300 results and report as a run of its own.
#[test]
fn run_against_a_store_a_worker_holds_runs_there_and_writes_the_results_here() {
    let (want, want_report) = reference();
    let env = Env::new();
    let file = triage_copy(&env, 0);
    let mut worker = env.spawn(&["worker"]);
    worker.wait_stdout_line("worker serving", Duration::from_millis(10));
    let out_path = env.path("forwarded.jsonl");
    let out = run_triage(&env, &file, &out_path);
    out.assert_ok();
    assert!(
        out.stdout
            .contains("started in the process holding the store"),
        "{}",
        out.stdout
    );
    assert_eq!(strip_run(results(&out_path)), strip_run(want));
    assert_eq!(report_text(&out), want_report);
    // The worker ran it (and says so), and the run is recorded with its results file.
    let id = out
        .stdout
        .split_whitespace()
        .nth(1)
        .expect("a run id on the first line")
        .to_string();
    worker.wait_stdout_line(&format!("run {id} completed"), Duration::from_millis(10));
    let meta = env.run_meta(&id);
    assert_eq!(meta["status"], "completed");
    assert_eq!(meta["labels"]["output"], json!(s(&out_path)));
}

/// Ctrl-C on a forwarded `cairn run` stops the following, not the run: the worker finishes it,
/// `cairn follow` picks the results up again while the worker holds the store, and once the
/// worker is gone `cairn resume` finds nothing missing.
#[test]
fn ctrl_c_on_a_forwarded_run_leaves_it_to_the_worker_and_follow_picks_it_up() {
    let env = Env::new();
    let file = triage_copy(&env, 15);
    let mut worker = env.spawn(&["worker"]);
    worker.wait_stdout_line("worker serving", Duration::from_millis(10));
    let out_path = env.path("results.jsonl");
    let (id, out) = interrupt_after(&env, &file, &out_path, 30);
    assert!(
        out.stderr.contains("stopped following") && out.stderr.contains(&format!("follow {id}")),
        "{}",
        out.stderr
    );
    let stopped_at = lines(&out_path);
    assert!((30..300).contains(&stopped_at), "{stopped_at}");

    // Following again (to the file the run was started with) writes the rest, once each.
    let followed = env.run(&["follow", &id]);
    followed.assert_ok();
    assert!(
        followed.stdout.contains(&format!("run {id} completed")),
        "{}",
        followed.stdout
    );
    assert_eq!(results(&out_path).len(), 300);
    worker.wait_stdout_line(&format!("run {id} completed"), Duration::from_millis(10));

    // Not a workflow file's run, an unknown run: one-line errors.
    let demo = start_remote_demo(&env);
    env.run(&["follow", &demo]).assert_one_line_error();
    env.run(&["follow", "01ARZ3NDEKTSV4RRFFQ69G5FAV"])
        .assert_one_line_error();

    worker.signal(libc::SIGINT);
    let w = worker.finish(CMD_TIMEOUT);
    assert_eq!(w.code(), Some(0), "{w:#?}");
    let out = env.run(&["resume", &id]);
    out.assert_ok();
    assert!(
        out.stdout.contains("0 missing result lines"),
        "{}",
        out.stdout
    );
    assert_eq!(results(&out_path).len(), 300);
}

/// Starts a short `demo` run through the worker's socket; returns its id.
fn start_remote_demo(env: &Env) -> String {
    let out = env.run(&["start", "demo", "--input", r#"{"items":2,"step_ms":0}"#]);
    out.assert_ok();
    out.stdout
        .split_whitespace()
        .nth(1)
        .expect("run RUN started")
        .to_string()
}

/// A run left `running` with no process serving the store: `follow` says to resume it.
#[test]
fn follow_refuses_a_running_run_nobody_executes() {
    let env = Env::new();
    let file = triage_copy(&env, 15);
    let out_path = env.path("results.jsonl");
    let id = start_and_kill_after(&env, &file, &out_path, 10);
    let out = env.run(&["follow", &id]);
    let line = out.assert_one_line_error();
    assert!(line.contains(&format!("resume {id}")), "{line}");
}

/// A forwarded run whose worker is SIGKILLed: the follower notices (within 5 s) that no
/// process serves the store, says how to continue, and `cairn resume` finishes the run.
#[test]
fn a_forwarded_run_whose_worker_dies_stops_the_follower_and_resumes() {
    let env = Env::new();
    let file = triage_copy(&env, 60);
    let mut worker = env.spawn(&["worker"]);
    worker.wait_stdout_line("worker serving", Duration::from_millis(10));
    let out_path = env.path("results.jsonl");
    let (p, id) = start_triage(&env, &file, &out_path);
    wait_for(Duration::from_secs(60), "some results", || {
        (lines(&out_path) >= 30).then_some(())
    });
    assert!(worker.kill9());
    let out = p.finish(Duration::from_secs(30));
    assert_eq!(out.code(), Some(130), "{out:#?}");
    assert!(out.stderr.contains("no process serves"), "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!("resume {id}")),
        "{}",
        out.stdout
    );
    resume_completes(&env, &id, &out_path);
}

/// A forwarded run the worker cannot execute (its API key is missing there) is refused before
/// it is created, with the reason; the store has no run.
#[test]
fn a_forwarded_run_the_worker_cannot_execute_is_refused_before_it_is_created() {
    let env = Env::new();
    let fake = anthropic_fake();
    let file = env.path("keyed.toml");
    std::fs::write(&file, fork_flow(&fake.url())).unwrap();
    let items = env.path("topics.jsonl");
    std::fs::write(&items, "{\"topic\":\"a\"}\n").unwrap();
    // The worker runs without CAIRN_TEST_KEY; the forwarding process has it.
    let mut worker = env.spawn(&["worker"]);
    worker.wait_stdout_line("worker serving", Duration::from_millis(10));
    let out = run_keyed(&env, &["run", s(&file), "--input", s(&items)]);
    let line = out.assert_one_line_error();
    assert!(
        line.contains("cannot run this workflow file") && line.contains("CAIRN_TEST_KEY"),
        "{line}"
    );
    assert_eq!(env.runs_json().len(), 0, "no run was created");
    assert_eq!(fake.count(), 0);
}

/// A client without the API key submits to a worker that has it: the worker checks and runs
/// the file, and the client writes the results.
#[test]
fn a_client_without_the_api_key_runs_a_file_through_a_worker_that_has_it() {
    let env = Env::new();
    let fake = anthropic_fake();
    let file = env.path("keyed.toml");
    std::fs::write(&file, fork_flow(&fake.url())).unwrap();
    let items = env.path("topics.jsonl");
    std::fs::write(&items, "{\"topic\":\"a\"}\n{\"topic\":\"b\"}\n").unwrap();
    let mut worker =
        common::Proc::spawn_with_env(&env.store, &["worker"], &[("CAIRN_TEST_KEY", "test-key")]);
    worker.wait_stdout_line("worker serving", Duration::from_millis(10));
    let out_path = env.path("out.jsonl");
    let out = env.run(&[
        "run",
        s(&file),
        "--input",
        s(&items),
        "--output",
        s(&out_path),
    ]);
    out.assert_ok();
    assert_eq!(results(&out_path).len(), 2);
    // Two drafts and the edit, sent by the worker with its key.
    assert_eq!(fake.count(), 3);
    // Without a worker, the same client is refused before anything runs.
    worker.signal(libc::SIGINT);
    assert_eq!(worker.finish(CMD_TIMEOUT).code(), Some(0));
    let out = env.run(&["run", s(&file), "--input", s(&items)]);
    let line = out.assert_one_line_error();
    assert!(line.contains("CAIRN_TEST_KEY"), "{line}");
}
