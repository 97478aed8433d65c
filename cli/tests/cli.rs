//! The `cairn` command as a user meets it: output of each command, one-line errors, several
//! processes on one store, cancel, resume, verify and Ctrl-C.

mod common;

use common::{CMD_TIMEOUT, Env, assert_dense_seq, run_id_of, sum_counts};
use serde_json::Value;
use std::time::Duration;

/// Runs a demo to completion and returns its run id.
fn completed_demo(env: &Env, items: u32) -> String {
    let out = env.run(&["demo", "--items", &items.to_string(), "--step-ms", "0"]);
    out.assert_ok();
    run_id_of(out.stdout.lines().next().unwrap())
}

/// Starts a slow demo in the background, waits until it has recorded more than `events`
/// events, and returns the child and the run id.
fn running_demo(env: &Env, items: u32, events: u64) -> (common::Proc, String) {
    let mut child = env.spawn(&["demo", "--items", &items.to_string(), "--step-ms", "20"]);
    let id = child.wait_run_id();
    env.wait_events_over(&id, events);
    (child, id)
}

/// `demo` prints its run id, completion and output, and `runs` (table, JSON, status filter)
/// lists the run as completed; an unknown status is a one-line error naming the valid ones.
#[test]
fn demo_completes_and_runs_lists_it() {
    let env = Env::new();
    let out = env.run(&["demo", "--items", "20", "--step-ms", "0"]);
    out.assert_ok();
    let first = out.stdout.lines().next().unwrap();
    assert!(first.contains(" started"), "{first}");
    let id = run_id_of(first);
    assert!(
        out.stdout.contains(&format!("run {id} completed")),
        "{}",
        out.stdout
    );
    let output = out.output_json();
    assert_eq!(output["items"], 20);
    assert_eq!(sum_counts(&output["by_category"]), 20);

    let table = env.run(&["runs"]);
    table.assert_ok();
    let row = table
        .stdout
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("{id} not in the table:\n{}", table.stdout));
    assert!(row.contains("completed") && row.contains("demo"), "{row}");

    let runs = env.runs_json();
    assert_eq!(runs.len(), 1);
    let r = &runs[0];
    assert_eq!(r["run"], id.as_str());
    assert_eq!(r["workflow"], "demo");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["events"], 62, "run_started + 60 steps + run_completed");

    let completed = env.run(&["runs", "--status", "completed", "--json"]);
    completed.assert_ok();
    let completed = common::parse_json_array(&completed.stdout);
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0]["run"], id.as_str());

    let running = env.run(&["runs", "--status", "running", "--json"]);
    running.assert_ok();
    assert!(common::parse_json_array(&running.stdout).is_empty());

    let bogus = env.run(&["runs", "--status", "bogus"]);
    let line = bogus.assert_one_line_error();
    assert_eq!(bogus.code(), Some(2), "a usage error");
    assert!(line.contains("bogus"), "{line}");
    for s in ["pending", "running", "completed", "failed", "cancelled"] {
        assert!(line.contains(s), "{line} should name {s}");
    }
}

/// `show` prints a header and one line per event, `events` one JSON object per event with
/// stable fields (and `--from`), and `replay` the rebuilt state with its steps keyed by path.
#[test]
fn show_events_and_replay_describe_a_run() {
    let env = Env::new();
    let id = completed_demo(&env, 20);

    let show = env.run(&["show", &id]);
    show.assert_ok();
    let header = show.stdout.lines().next().unwrap();
    assert!(
        header.contains(&id)
            && header.contains("workflow demo")
            && header.contains("status completed"),
        "{header}"
    );
    // Event lines start with their seq number; the header lines do not.
    let seqs: Vec<u64> = show
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(seqs, (0..62).collect::<Vec<u64>>(), "{}", show.stdout);
    assert!(show.stdout.contains("run_started") && show.stdout.contains("run_completed"));

    let events = env.events_json(&id);
    assert_eq!(events.len(), 62);
    assert_dense_seq(&events);
    for e in &events {
        assert!(e["ts"].is_string(), "{e}");
        assert!(e["kind"].is_string(), "{e}");
        let hash = e["hash"].as_str().expect("hash");
        assert!(
            hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{e}"
        );
    }
    assert_eq!(events[0]["kind"], "run_started");
    assert_eq!(events[61]["kind"], "run_completed");
    let steps: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "step_completed")
        .collect();
    assert_eq!(steps.len(), 60);
    for (i, e) in steps.iter().enumerate() {
        assert_eq!(e["path"], i.to_string().as_str(), "{e}");
        let name = ["fetch", "classify", "score"][i % 3];
        assert_eq!(e["name"], name, "{e}");
        assert!(!e["output"].is_null(), "{e}");
    }

    let from = env.run(&["events", &id, "--from", "5"]);
    from.assert_ok();
    let from = common::json_lines(&from.stdout);
    assert_eq!(from.len(), 57);
    assert_eq!(from[0]["seq"], 5);
    assert_eq!(from[0], events[5]);

    let replay = env.run(&["replay", &id]);
    replay.assert_ok();
    let state: Value = serde_json::from_str(&replay.stdout).expect("replay prints JSON");
    assert_eq!(state["status"], "completed");
    assert_eq!(state["run_id"], id.as_str());
    let steps = state["steps"].as_object().expect("a steps map");
    assert_eq!(steps.len(), 60);
    for i in 0..60 {
        assert!(
            steps.contains_key(&i.to_string()),
            "no step {i} in {steps:?}"
        );
    }
    assert_eq!(state["output"], events[61]["output"]);
}

/// A well-formed run id that is not in the store is a one-line error naming the id and
/// `cairn runs` for every command that takes an id, and writes nothing.
#[test]
fn unknown_run_id_is_a_one_line_error() {
    let other = Env::new();
    let foreign = completed_demo(&other, 1);
    let env = Env::new();
    let id = completed_demo(&env, 1);
    let before = env.runs_json();
    for cmd in ["show", "events", "replay", "verify", "resume", "cancel"] {
        let out = env.run(&[cmd, &foreign]);
        let line = out.assert_one_line_error();
        assert!(line.contains(&foreign), "{cmd}: {line}");
        assert!(line.contains("cairn runs"), "{cmd}: {line}");
    }
    assert_eq!(env.runs_json(), before);
    assert_eq!(env.events_json(&id).len(), 5);
}

/// A string that is not a run id is rejected as such (a usage error, exit code 2) by every
/// command that takes an id.
#[test]
fn malformed_run_id_is_a_one_line_error() {
    let env = Env::new();
    completed_demo(&env, 1);
    for cmd in ["show", "events", "replay", "verify", "resume", "cancel"] {
        let out = env.run(&[cmd, "xyz"]);
        let line = out.assert_one_line_error();
        assert!(line.contains("`xyz` is not a run id"), "{cmd}: {line}");
        assert_eq!(out.code(), Some(2), "{cmd}");
    }
}

/// An unknown flag exits with code 2 and one line naming it.
#[test]
fn bad_flag_exits_2_with_one_line() {
    let env = Env::new();
    let out = env.run(&["runs", "--bogus"]);
    let line = out.assert_one_line_error().to_string();
    assert_eq!(out.code(), Some(2));
    assert!(line.contains("--bogus"), "{line}");
}

/// Commands that need an existing store (readers, and resume/recover/cancel) say where they
/// looked and how to fix it, and do not create the file.
#[test]
fn missing_store_is_a_one_line_error() {
    let env = Env::new();
    let id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let path = env.store.display().to_string();
    let cases: [&[&str]; 9] = [
        &["runs"],
        &["show", id],
        &["events", id],
        &["replay", id],
        &["verify", id],
        &["verify", "--all"],
        &["resume", id],
        &["recover"],
        &["cancel", id],
    ];
    for args in cases {
        let out = env.run(args);
        let line = out.assert_one_line_error();
        assert!(line.contains(&path), "{args:?}: {line}");
        assert!(line.contains("--store"), "{args:?}: {line}");
        assert!(!env.store.exists(), "{args:?} created the store");
    }
}

/// A file that is not a store is reported as corrupt, by readers and writers, and left as it was.
#[test]
fn garbage_store_is_reported_corrupt() {
    let env = Env::new();
    let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&env.store, &garbage).unwrap();
    for args in [
        &["runs"][..],
        &["demo", "--items", "1"][..],
        &["recover"][..],
    ] {
        let out = env.run(args);
        let line = out.assert_one_line_error();
        assert!(line.contains("corrupt"), "{args:?}: {line}");
    }
    assert_eq!(std::fs::read(&env.store).unwrap(), garbage);
}

/// `start` of an unknown workflow names it and the known ones, and records no run.
#[test]
fn start_unknown_workflow_lists_known_ones_and_writes_no_run() {
    let env = Env::new();
    let out = env.run(&["start", "nope"]);
    let line = out.assert_one_line_error();
    assert!(line.contains("`nope`"), "{line}");
    assert!(line.contains("demo") && line.contains("steps"), "{line}");
    if env.store.exists() {
        assert!(env.runs_json().is_empty());
    }
}

/// `start` with input that does not fit the workflow, or is not JSON (a usage error, exit code
/// 2), fails in one line and records no run.
#[test]
fn start_with_bad_input_writes_no_run() {
    let env = Env::new();
    let out = env.run(&["start", "steps", "--input", r#"{"bad":1}"#]);
    let line = out.assert_one_line_error();
    assert!(line.contains("invalid") && line.contains("steps"), "{line}");
    if env.store.exists() {
        assert!(env.runs_json().is_empty());
    }

    let out = env.run(&["start", "steps", "--input", "not json"]);
    let line = out.assert_one_line_error();
    assert!(line.contains("not valid JSON"), "{line}");
    assert_eq!(out.code(), Some(2), "a usage error");
    if env.store.exists() {
        assert!(env.runs_json().is_empty());
    }
}

/// While one process writes, a second writer is refused in one line naming "another cairn
/// process", readers work at the same time, and `cancel` reaches the writing process through
/// its control socket.

#[test]
fn second_writer_is_refused_while_readers_work() {
    let env = Env::new();
    let (mut child, id) = running_demo(&env, 200, 3);

    for args in [&["demo"][..], &["recover"][..]] {
        let out = env.run(args);
        let line = out.assert_one_line_error();
        assert!(line.contains("another cairn process"), "{args:?}: {line}");
    }

    let runs = env.run(&["runs"]);
    runs.assert_ok();
    assert!(
        runs.stdout.contains(&id) && runs.stdout.contains("running"),
        "{runs:?}"
    );
    let show = env.run(&["show", &id]);
    show.assert_ok();
    assert!(show.stdout.contains("status running"), "{show:?}");
    let events = env.events_json(&id);
    assert!(events.len() > 3);
    assert_dense_seq(&events);
    assert_eq!(env.run_meta(&id)["status"], "running");

    // Cancel reaches the process holding the store through its control socket.
    let out = env.run(&["cancel", &id, "--reason", "operator"]);
    out.assert_ok();
    assert!(out.stdout.contains("cancelled"), "{out:?}");
    let status = child.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "a cancelled run exits 1");
    assert_eq!(env.run_meta(&id)["status"], "cancelled");
    let show = env.run(&["show", &id]);
    assert!(
        show.stdout
            .lines()
            .any(|l| l.contains("run_cancelled") && l.contains("operator")),
        "{}",
        show.stdout
    );
}

/// `cancel` marks an interrupted run cancelled and records the reason; resuming it then has
/// nothing to do, and a second cancel is a no-op; neither writes anything.
#[test]
fn cancel_an_interrupted_run() {
    let env = Env::new();
    let (mut child, id) = running_demo(&env, 200, 3);
    assert!(child.kill9());

    let out = env.run(&["cancel", &id, "--reason", "no longer needed"]);
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("run {id} cancelled")),
        "{out:?}"
    );
    let meta = env.run_meta(&id);
    assert_eq!(meta["status"], "cancelled");
    let show = env.run(&["show", &id]);
    show.assert_ok();
    assert!(show.stdout.contains("status cancelled"), "{show:?}");
    assert!(
        show.stdout
            .lines()
            .any(|l| l.contains("run_cancelled") && l.contains("no longer needed")),
        "{}",
        show.stdout
    );

    let resume = env.run(&["resume", &id]);
    resume.assert_ok();
    assert!(resume.stdout.contains("nothing to resume"), "{resume:?}");
    let again = env.run(&["cancel", &id]);
    again.assert_ok();
    assert!(again.stdout.contains("nothing to cancel"), "{again:?}");
    let after = env.run_meta(&id);
    assert_eq!(after["status"], "cancelled");
    assert_eq!(after["events"], meta["events"], "a no-op wrote events");
    env.run(&["verify", &id]).assert_ok();
}

/// `resume` of a completed run says so and writes nothing; `recover` with nothing interrupted
/// says so; both exit 0.
#[test]
fn resume_completed_and_recover_with_nothing_to_do() {
    let env = Env::new();
    let id = completed_demo(&env, 2);
    let events = env.run_meta(&id)["events"].clone();

    let out = env.run(&["resume", &id]);
    out.assert_ok();
    assert!(out.stdout.contains("already completed"), "{out:?}");
    assert_eq!(env.run_meta(&id)["events"], events);

    let out = env.run(&["recover"]);
    out.assert_ok();
    assert!(out.stdout.contains("no interrupted runs"), "{out:?}");
    assert_eq!(env.run_meta(&id)["events"], events);
}

/// `verify --all` prints one ok line per run; `verify` with neither a run nor `--all` is a
/// usage error (exit code 2) in one line saying what to pass.
#[test]
fn verify_all_and_verify_without_a_target() {
    let env = Env::new();
    let a = completed_demo(&env, 2);
    let out = env.run(&["start", "steps", "--input", r#"{"steps":5}"#]);
    out.assert_ok();
    let b = run_id_of(out.stdout.lines().next().unwrap());

    let out = env.run(&["verify", "--all"]);
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    for id in [&a, &b] {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("ok {id}"))),
            "{}",
            out.stdout
        );
    }

    let out = env.run(&["verify"]);
    let line = out.assert_one_line_error();
    assert_eq!(out.code(), Some(2));
    assert!(line.contains("--all") && line.contains("run"), "{line}");
}

/// Ctrl-C (SIGINT) stops a run at a step boundary: exit code 130, a message saying how to
/// resume, the run left running; `resume` then completes it from the log.
#[test]
fn ctrl_c_stops_cleanly_and_resume_completes() {
    let env = Env::new();
    let (mut child, id) = running_demo(&env, 80, 10);
    assert!(
        child.try_status().is_none(),
        "the demo finished before Ctrl-C"
    );
    child.signal(libc::SIGINT);
    child.wait_exit(Duration::from_secs(10));
    let out = child.finish(CMD_TIMEOUT);
    assert_eq!(out.code(), Some(130), "{out:#?}");
    assert!(out.stdout.contains("interrupted"), "{out:#?}");
    assert!(
        out.stdout.contains(&format!(
            "resume with: cairn --store {} resume {id}",
            env.store.display()
        )),
        "{out:#?}"
    );
    assert_eq!(env.run_meta(&id)["status"], "running");
    let recorded = env.events_json(&id);
    assert_dense_seq(&recorded);

    let out = env.run(&["resume", &id]);
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("run {id} completed")),
        "{out:?}"
    );
    // Steps recorded before the interrupt are answered from the log, the rest executed.
    let replayed = recorded
        .iter()
        .filter(|e| e["kind"] == "step_completed")
        .count();
    assert!(replayed >= 10, "{replayed}");
    assert!(
        out.stdout.contains(&format!(
            "({} steps executed, {replayed} answered from the log)",
            240 - replayed
        )),
        "{out:?}"
    );
    let output = out.output_json();
    assert_eq!(output["items"], 80);
    assert_eq!(sum_counts(&output["by_category"]), 80);
    let events = env.events_json(&id);
    assert_dense_seq(&events);
    assert_eq!(
        events
            .iter()
            .filter(|e| e["kind"] == "step_completed")
            .count(),
        240
    );
    // The events before the interrupt are unchanged.
    assert_eq!(events[..recorded.len()], recorded[..]);
    env.run(&["verify", &id]).assert_ok();
}

/// `events --follow` prints a run's events as another process records them, and stops once
/// the run has finished, having printed every event once, in order.
#[test]
fn events_follow_streams_a_running_run_until_it_finishes() {
    let env = Env::new();
    let mut p = env.spawn(&["start", "steps", "--input", r#"{"steps":40,"step_ms":20}"#]);
    let id = p.wait_run_id();
    // Other processes see a run once its writer has checkpointed it (within 250 ms).
    env.wait_events_over(&id, 0);
    let out = env.run(&["events", &id, "--follow"]);
    out.assert_ok();
    let events: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_dense_seq(&events);
    let steps = events
        .iter()
        .filter(|e| e["kind"] == "step_completed")
        .count();
    assert_eq!(steps, 40, "{}", out.stdout);
    assert_eq!(events.last().unwrap()["kind"], "run_completed");
    assert!(p.finish(CMD_TIMEOUT).success());
    // Not following: what is there now, at once.
    let again = env.run(&["events", &id, "--from", "5"]);
    again.assert_ok();
    assert_eq!(again.stdout.lines().count(), events.len() - 5);
}
