//! The scheduler end to end: fan-out, retry backoff, durable sleeps and signal waits in real
//! `cairn` child processes SIGKILLed mid-run and restarted, the worker and its control socket,
//! parking without a worker, and join policies from the command line.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use common::{
    CMD_TIMEOUT, Env, Rng, WAIT_TIMEOUT, assert_dense_seq, control_socket, events_of, file_lines,
    kill_at_lines, line_count, now_us, run_id_of, sleep_until_us, test_seed, the_event, wait_for,
};
use serde_json::{Value, json};

/// The draft the `approval` workflow writes before it waits.
const DRAFT: &str = "refund T-1042 for 40 EUR";

/// A field of an event as an integer.
fn int(e: &Value, field: &str) -> i64 {
    e[field]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer `{field}` in {e}"))
}

fn ms(us: i64) -> f64 {
    us as f64 / 1000.0
}

// ---------------------------------------------------------------------------------------------
// 1. Fan-out under SIGKILL
// ---------------------------------------------------------------------------------------------

const BRANCHES: u32 = 2000;
const CONCURRENCY: usize = 32;

fn fanout_input(effects: &Path) -> String {
    format!(
        r#"{{"branches":{BRANCHES},"concurrency":{CONCURRENCY},"side_effects":"{}"}}"#,
        effects.display()
    )
}

/// The branch indices in the side-effect file, one per execution (each execution appends its
/// whole line with one `write`, so a kill never leaves half a line).
fn executions(file: &Path) -> Vec<u32> {
    file_lines(file)
        .iter()
        .map(|l| {
            l.parse::<u32>()
                .unwrap_or_else(|_| panic!("unexpected line {l:?} in the side-effect file"))
        })
        .collect()
}

/// A 2,000-branch fan-out (32 at a time) SIGKILLed at two random points while its side
/// effects happen, restarted with `resume` and then `recover`, ends with the uninterrupted
/// output; every branch ran, each restart re-ran at most the 32 branches in flight, each
/// branch outcome is recorded once, there is one fan-in, and the log verifies.
#[test]
fn sigkilled_fanout_resumes_to_the_uninterrupted_result() {
    let seed = test_seed();
    println!("CAIRN_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    // One kill in each half of the run, leaving room at the end so the last lands in time.
    let thresholds = [rng.range(100, 700), rng.range(900, 1500)];
    println!("kill thresholds (side-effect lines): {thresholds:?}");

    // The reference: the same fan-out, uninterrupted.
    let reference = Env::new();
    let ref_effects = reference.path("effects.txt");
    let clean = reference.run(&["start", "fanout", "--input", &fanout_input(&ref_effects)]);
    clean.assert_ok();
    let expected = clean.output_json();
    let sum: u64 = (0..u64::from(BRANCHES)).map(|i| i * i).sum();
    assert_eq!(
        expected,
        json!({"branches": BRANCHES, "succeeded": BRANCHES, "failed": 0, "sum": sum})
    );
    let mut ref_ran = executions(&ref_effects);
    ref_ran.sort_unstable();
    assert_eq!(ref_ran, (0..BRANCHES).collect::<Vec<_>>());

    let env = Env::new();
    let effects = env.path("effects.txt");
    let mut child = env.spawn(&["start", "fanout", "--input", &fanout_input(&effects)]);
    let id = child.wait_run_id();
    // Side-effect lines when each kill landed.
    let mut killed_at: Vec<usize> = Vec::new();
    for (k, &threshold) in thresholds.iter().enumerate() {
        // Kill only after this child has executed at least one branch of its own.
        let target = threshold.max(line_count(&effects) + 1);
        let delay = Duration::from_micros(rng.range(0, 2000));
        assert!(
            kill_at_lines(&mut child, &effects, target, delay),
            "the run finished before kill {} at {target} side effects (seed {seed}): {:#?}",
            k + 1,
            child.stdout()
        );
        killed_at.push(line_count(&effects) as usize);
        println!("kill {} at {} side-effect lines", k + 1, killed_at[k]);
        child = if k == 0 {
            env.spawn(&["resume", &id])
        } else {
            env.spawn(&["recover"])
        };
    }
    let out = child.finish(CMD_TIMEOUT);
    assert!(
        out.success(),
        "the last restart failed (seed {seed}): {out:#?}"
    );
    assert!(
        out.stdout.contains(&format!("run {id} recovered"))
            && out.stdout.contains(&format!("run {id} completed")),
        "{}",
        out.stdout
    );

    // The uninterrupted output.
    assert_eq!(out.output_json(), expected, "seed {seed}");

    // Every branch ran; each restart re-ran only branches that were in flight at the kill.
    let ran = executions(&effects);
    let mut counts = BTreeMap::<u32, usize>::new();
    for &i in &ran {
        assert!(i < BRANCHES, "unexpected index {i} (seed {seed})");
        *counts.entry(i).or_default() += 1;
    }
    let missing: Vec<u32> = (0..BRANCHES).filter(|i| !counts.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "branches never ran: {missing:?} (seed {seed})"
    );
    for (k, &at) in killed_at.iter().enumerate() {
        let before: BTreeSet<u32> = ran[..at].iter().copied().collect();
        let end = killed_at.get(k + 1).copied().unwrap_or(ran.len());
        let again: Vec<u32> = ran[at..end]
            .iter()
            .copied()
            .filter(|i| before.contains(i))
            .collect();
        println!("restart {} re-ran {} branches", k + 1, again.len());
        assert!(
            again.len() <= CONCURRENCY,
            "restart {} re-ran {} branches that had run before (at most {CONCURRENCY} were in flight; seed {seed}): {again:?}",
            k + 1,
            again.len()
        );
    }
    let extra = ran.len() - BRANCHES as usize;
    assert!(
        extra <= CONCURRENCY * killed_at.len(),
        "{extra} re-executions for {} kills (seed {seed})",
        killed_at.len()
    );

    // Each branch's outcome recorded once, one fan-in, one resume per kill, a dense log.
    let events = env.events_json(&id);
    assert_dense_seq(&events);
    let mut completed = BTreeMap::<u64, usize>::new();
    for e in events_of(&events, "branch_completed") {
        *completed.entry(e["index"].as_u64().unwrap()).or_default() += 1;
    }
    for i in 0..u64::from(BRANCHES) {
        assert_eq!(
            completed.get(&i),
            Some(&1),
            "branch {i} must have exactly one branch_completed (seed {seed})"
        );
    }
    assert_eq!(completed.len(), BRANCHES as usize);
    assert!(events_of(&events, "branch_failed").is_empty());
    let mut steps = BTreeMap::<String, usize>::new();
    for e in events_of(&events, "step_completed") {
        *steps
            .entry(e["path"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(steps.len(), BRANCHES as usize, "seed {seed}");
    assert!(
        steps.values().all(|&c| c == 1),
        "a branch step was recorded twice (seed {seed})"
    );
    let fan_in = the_event(&events, "fan_in_completed");
    assert_eq!(fan_in["succeeded"], BRANCHES);
    assert_eq!(fan_in["failed"], 0);
    the_event(&events, "fan_out_started");
    assert_eq!(events_of(&events, "run_resumed").len(), killed_at.len());
    let last = events.last().unwrap();
    assert_eq!(last["kind"], "run_completed");
    assert_eq!(last["output"], expected);

    let verify = env.run(&["verify", &id]);
    verify.assert_ok();
    assert!(verify.stdout.starts_with(&format!("ok {id}")), "{verify:?}");
    assert_eq!(env.run_meta(&id)["status"], "completed");
}

// ---------------------------------------------------------------------------------------------
// 2. Retry backoff under SIGKILL
// ---------------------------------------------------------------------------------------------

/// A step failing once with a 3 s backoff, SIGKILLed 1 s into the backoff and resumed, makes
/// its second attempt when the recorded retry time comes (the remaining ~2 s), not a fresh
/// 3 s after the resume; it ran exactly twice.
#[test]
fn sigkill_during_retry_backoff_resumes_the_remaining_wait() {
    const BACKOFF_US: i64 = 3_000_000;
    let env = Env::new();
    let attempts = env.path("attempts.txt");
    let input = format!(
        r#"{{"attempts_file":"{}","failures":1,"backoff_ms":3000}}"#,
        attempts.display()
    );
    let mut child = env.spawn(&["start", "flaky", "--input", &input]);
    let id = child.wait_run_id();
    let (_, failed) = env.wait_event(&id, "step_failed");
    assert_eq!(failed["attempt"], 1, "{failed}");
    let retry_at = int(&failed, "retry_at_us");
    let failed_at = int(&failed, "ts_us");
    let backoff = retry_at - int(&failed, "started_us");
    assert!(
        (BACKOFF_US..BACKOFF_US + 1_000_000).contains(&backoff),
        "retry_at_us should be about 3 s after the attempt started: {failed}"
    );

    // SIGKILL about 1 s into the backoff.
    sleep_until_us(failed_at + 1_000_000);
    assert!(child.kill9(), "the run ended during its backoff");
    let events = env.events_json(&id);
    assert!(
        events_of(&events, "step_completed").is_empty(),
        "the kill came after the retry (the machine is very slow): {events:?}"
    );
    assert_eq!(file_lines(&attempts).len(), 1);
    assert_eq!(env.run_meta(&id)["status"], "running");

    let out = env.run(&["resume", &id]);
    out.assert_ok();
    assert_eq!(out.output_json(), json!({"attempts": 2}));

    let events = env.events_json(&id);
    assert_dense_seq(&events);
    let resumed_at = int(the_event(&events, "run_resumed"), "ts_us");
    let done = the_event(&events, "step_completed");
    assert_eq!(done["attempt"], 2, "{done}");
    let started = int(done, "started_us");
    println!(
        "retry due {:.0} ms after the failure; resumed {:.0} ms after it; attempt 2 started {:.0} ms after the retry time",
        ms(retry_at - failed_at),
        ms(resumed_at - failed_at),
        ms(started - retry_at)
    );
    assert!(
        started >= retry_at,
        "attempt 2 started {:.1} ms before its recorded retry time",
        ms(retry_at - started)
    );
    assert!(
        started < retry_at.max(resumed_at) + 1_500_000,
        "attempt 2 started {:.0} ms after its retry time (resumed {:.0} ms after the failure)",
        ms(started - retry_at),
        ms(resumed_at - failed_at)
    );
    if resumed_at < retry_at {
        // What was left of the backoff, not a fresh one from the resume.
        assert!(
            started - resumed_at < BACKOFF_US - 500_000,
            "attempt 2 started {:.0} ms after the resume: a fresh backoff instead of the remaining {:.0} ms",
            ms(started - resumed_at),
            ms(retry_at - resumed_at)
        );
    }
    assert_eq!(file_lines(&attempts), vec!["attempt", "attempt"]);
    assert_eq!(events_of(&events, "step_failed").len(), 1);
    env.run(&["verify", &id]).assert_ok();
}

// ---------------------------------------------------------------------------------------------
// 3. Durable sleep under SIGKILL
// ---------------------------------------------------------------------------------------------

/// A 3 s durable sleep held in memory, SIGKILLed 1 s in and resumed, fires at its recorded
/// time (one timer, not a fresh one), so the run slept about 3 s in all.
#[test]
fn sigkill_during_a_sleep_resumes_the_remaining_time() {
    const SLEEP_US: i64 = 3_000_000;
    let env = Env::new();
    let mut child = env.spawn(&["start", "sleepy", "--input", r#"{"sleep_ms":3000}"#]);
    let id = child.wait_run_id();
    let (_, set) = env.wait_event(&id, "timer_set");
    let fire_at = int(&set, "fire_at_us");
    let set_at = int(&set, "ts_us");
    assert!(
        (fire_at - set_at - SLEEP_US).abs() < 500_000,
        "fire_at_us should be about 3 s after the timer was set: {set}"
    );

    sleep_until_us(set_at + 1_000_000);
    assert!(child.kill9(), "the run ended during its sleep");
    let events = env.events_json(&id);
    assert!(
        events_of(&events, "timer_fired").is_empty(),
        "the kill came after the timer fired (the machine is very slow): {events:?}"
    );
    // Held in memory (the default --park-after is 60 s), so it was not parked.
    assert!(events_of(&events, "run_suspended").is_empty());
    assert_eq!(env.run_meta(&id)["status"], "running");

    let out = env.run(&["resume", &id]);
    out.assert_ok();
    let slept = out.output_json()["slept_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("no slept_ms in {}", out.stdout));

    let events = env.events_json(&id);
    assert_dense_seq(&events);
    assert_eq!(
        the_event(&events, "timer_set")["fire_at_us"],
        fire_at,
        "the resume must keep the recorded timer"
    );
    let fired = int(the_event(&events, "timer_fired"), "ts_us");
    let resumed_at = int(the_event(&events, "run_resumed"), "ts_us");
    println!(
        "resumed {:.0} ms before the fire time; fired {:.0} ms after it; slept {slept} ms",
        ms(fire_at - resumed_at),
        ms(fired - fire_at)
    );
    assert!(
        fired >= fire_at,
        "the timer fired {:.1} ms early",
        ms(fire_at - fired)
    );
    assert!(
        fired < fire_at.max(resumed_at) + 1_500_000,
        "the timer fired {:.0} ms after its time",
        ms(fired - fire_at)
    );
    if resumed_at < fire_at {
        assert!(
            fired - resumed_at < SLEEP_US - 500_000,
            "the timer fired {:.0} ms after the resume: a fresh sleep instead of the remaining {:.0} ms",
            ms(fired - resumed_at),
            ms(fire_at - resumed_at)
        );
    }
    assert!(
        (3000..4500).contains(&slept),
        "slept_ms {slept}: the remaining time, not the time dead plus a fresh sleep"
    );
    env.run(&["verify", &id]).assert_ok();
}

// ---------------------------------------------------------------------------------------------
// 4. Signal waits under SIGKILL
// ---------------------------------------------------------------------------------------------

/// A run SIGKILLed while it waits in memory for a signal: `signal` (no process holds the store)
/// records the signal, and `resume` consumes it; afterwards signalling the finished run is a
/// one-line error, and bad `--data` is a usage error.
#[test]
fn signal_to_a_sigkilled_waiting_run_is_kept_for_the_resume() {
    let env = Env::new();
    let mut child = env.spawn(&["start", "approval", "--input", "{}"]);
    let id = child.wait_run_id();
    env.wait_event(&id, "signal_wait_started");
    assert!(child.kill9(), "the approval run ended without a signal");
    assert_eq!(env.run_meta(&id)["status"], "running");

    let sig = env.run(&["signal", &id, "approve", "--data", r#"{"by":"ada"}"#]);
    sig.assert_ok();
    assert!(
        sig.stdout.contains("recorded") && sig.stdout.contains(&id),
        "{}",
        sig.stdout
    );
    // Recorded, not executed: nobody runs it until it is resumed.
    assert_eq!(env.run_meta(&id)["status"], "running");
    let events = env.events_json(&id);
    let sent = the_event(&events, "signal_sent");
    assert_eq!(sent["name"], "approve");
    assert_eq!(sent["data"], json!({"by": "ada"}));
    let sent_seq = sent["seq"].clone();

    let out = env.run(&["resume", &id]);
    out.assert_ok();
    assert_eq!(
        out.output_json(),
        json!({"draft": DRAFT, "decision": {"by": "ada"}})
    );
    let events = env.events_json(&id);
    assert_dense_seq(&events);
    assert_eq!(the_event(&events, "signal_received")["sent_seq"], sent_seq);
    the_event(&events, "signal_wait_started");
    env.run(&["verify", &id]).assert_ok();

    // Errors: a finished run, and data that is not JSON.
    let late = env.run(&["signal", &id, "approve", "--data", "true"]);
    let line = late.assert_one_line_error();
    assert_eq!(late.code(), Some(1), "{late:?}");
    assert!(line.contains(&id) && line.contains("completed"), "{line}");
    let bad = env.run(&["signal", &id, "approve", "--data", "{by: ada"]);
    let line = bad.assert_one_line_error();
    assert_eq!(bad.code(), Some(2), "a usage error: {bad:?}");
    assert!(line.contains("--data"), "{line}");
    // Neither wrote anything.
    assert_eq!(env.events_json(&id).len(), events.len());
}

/// A signal sent before the run began to wait is not lost: the run is SIGKILLed right after it
/// starts (before it waits, if the race is won), signalled, and resumed; the wait takes the
/// signal's data.
#[test]
fn signal_sent_before_the_wait_begins_is_not_lost() {
    const TRIES: usize = 8;
    let mut before_wait = None;
    for attempt in 1..=TRIES {
        let env = Env::new();
        let mut child = env.spawn(&["start", "approval", "--input", "{}"]);
        let line = child.wait_stdout_line(" started", Duration::from_micros(50));
        assert!(child.kill9(), "the approval run ended without a signal");
        let id = run_id_of(&line);
        let events = env.events_json(&id);
        let waited = !events_of(&events, "signal_wait_started").is_empty();
        println!(
            "try {attempt}: killed after {} events ({})",
            events.len(),
            if waited {
                "already waiting"
            } else {
                "before the wait"
            }
        );
        if !waited || attempt == TRIES {
            before_wait = Some((env, id, !waited));
            break;
        }
    }
    let (env, id, won) = before_wait.unwrap();
    if !won {
        println!(
            "note: the kill never landed before the wait in {TRIES} tries; the signal is still sent before the wait resumes"
        );
    }

    let sig = env.run(&["signal", &id, "approve", "--data", r#"{"by":"grace"}"#]);
    sig.assert_ok();
    assert!(sig.stdout.contains("recorded"), "{}", sig.stdout);

    let out = env.run(&["resume", &id]);
    out.assert_ok();
    assert_eq!(
        out.output_json(),
        json!({"draft": DRAFT, "decision": {"by": "grace"}})
    );
    let events = env.events_json(&id);
    assert_dense_seq(&events);
    let sent = the_event(&events, "signal_sent");
    let wait = the_event(&events, "signal_wait_started");
    if won {
        assert!(
            int(sent, "seq") < int(wait, "seq"),
            "the signal was sent before the wait began: {events:?}"
        );
    }
    assert_eq!(
        the_event(&events, "signal_received")["sent_seq"],
        sent["seq"]
    );
    the_event(&events, "step_completed");
    env.run(&["verify", &id]).assert_ok();
}

// ---------------------------------------------------------------------------------------------
// 5. The worker and its control socket
// ---------------------------------------------------------------------------------------------

/// Starts a run through the worker (`start` while the worker holds the store) and returns its
/// id.
fn start_remote(env: &Env, workflow: &str, input: &str) -> String {
    let out = env.run(&["start", workflow, "--input", input]);
    out.assert_ok();
    let line = out.stdout.lines().next().unwrap_or_default();
    assert!(
        line.contains(&format!(" started: {workflow}"))
            && line.contains("(in the process holding the store)"),
        "{out:?}"
    );
    run_id_of(line)
}

/// A worker with `--park-after 0.3` takes starts, signals and cancels from other `cairn`
/// processes through its socket, wakes a parked sleep on time, and on SIGINT exits 0 and
/// removes its socket.
#[test]
fn worker_serves_starts_signals_timers_and_cancels_through_its_socket() {
    let env = Env::new();
    let socket = control_socket(&env.store);
    let mut worker = env.spawn(&["--park-after", "0.3", "worker"]);
    worker.wait_stdout_line("worker serving", Duration::from_millis(10));
    assert!(socket.exists(), "no socket at {}", socket.display());

    // A signal wait parks after 0.3 s; a signal through the socket wakes and completes it.
    let approval = start_remote(&env, "approval", "{}");
    env.wait_status(&approval, "waiting");
    let sig = env.run(&["signal", &approval, "approve", "--data", r#""yes""#]);
    sig.assert_ok();
    assert!(
        sig.stdout.contains("delivered") && sig.stdout.contains(&approval),
        "{}",
        sig.stdout
    );
    env.wait_status(&approval, "completed");
    let events = env.events_json(&approval);
    assert_dense_seq(&events);
    the_event(&events, "run_suspended");
    let last = events.last().unwrap();
    assert_eq!(last["kind"], "run_completed");
    assert_eq!(last["output"], json!({"draft": DRAFT, "decision": "yes"}));

    // A 1.5 s sleep parks, and the worker's timer service wakes it when it is due.
    let sleepy = start_remote(&env, "sleepy", r#"{"sleep_ms":1500}"#);
    let mut seen_waiting = false;
    wait_for(WAIT_TIMEOUT, "the sleepy run to complete", || {
        let status = env.try_run_meta(&sleepy)?["status"].clone();
        seen_waiting |= status == "waiting";
        (status == "completed").then_some(())
    });
    assert!(
        seen_waiting,
        "the sleepy run was never seen parked (waiting)"
    );
    let events = env.events_json(&sleepy);
    assert_dense_seq(&events);
    let fire_at = int(the_event(&events, "timer_set"), "fire_at_us");
    let suspended = the_event(&events, "run_suspended");
    assert_eq!(suspended["wake_at_us"], fire_at, "{suspended}");
    let fired = int(the_event(&events, "timer_fired"), "ts_us");
    assert!(
        fired >= fire_at && fired < fire_at + 2_000_000,
        "the parked timer fired {:.0} ms after its time",
        ms(fired - fire_at)
    );
    let output = &events.last().unwrap()["output"];
    let slept = output["slept_ms"].as_i64().unwrap();
    assert!((1500..3500).contains(&slept), "{output}");
    worker.wait_stdout_line(
        &format!("run {sleepy} completed"),
        Duration::from_millis(10),
    );

    // Cancel a parked run through the socket.
    let doomed = start_remote(&env, "approval", "{}");
    env.wait_status(&doomed, "waiting");
    let cancel = env.run(&["cancel", &doomed, "--reason", "not needed"]);
    cancel.assert_ok();
    assert!(
        cancel.stdout.contains(&format!("run {doomed} cancelled")),
        "{}",
        cancel.stdout
    );
    assert_eq!(env.run_meta(&doomed)["status"], "cancelled");
    let events = env.events_json(&doomed);
    assert_eq!(events.last().unwrap()["kind"], "run_cancelled");
    assert_eq!(events.last().unwrap()["reason"], "not needed");

    // A signal to a finished run, through the socket: a one-line error.
    let late = env.run(&["signal", &doomed, "approve"]);
    let line = late.assert_one_line_error();
    assert!(
        line.contains(&doomed) && line.contains("cancelled"),
        "{line}"
    );

    // Ctrl-C: a clean exit that removes the socket.
    worker.signal(libc::SIGINT);
    let out = worker.finish(CMD_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert!(
        !socket.exists(),
        "the socket {} is left behind",
        socket.display()
    );
    let verify = env.run(&["verify", "--all"]);
    verify.assert_ok();
    assert_eq!(verify.stdout.lines().count(), 3, "{}", verify.stdout);
}

// ---------------------------------------------------------------------------------------------
// 6. Parking without a worker
// ---------------------------------------------------------------------------------------------

/// With `--park-after 0.2` and no worker, `start approval` parks the run and exits 0; `signal`
/// then wakes it and completes it in its own process.
#[test]
fn parked_run_is_completed_by_a_signal_without_a_worker() {
    let env = Env::new();
    let out = env.run(&["--park-after", "0.2", "start", "approval", "--input", "{}"]);
    out.assert_ok();
    let id = run_id_of(out.stdout.lines().next().unwrap());
    assert!(
        out.stdout.contains(&format!("run {id} is parked waiting")),
        "{}",
        out.stdout
    );
    assert_eq!(env.run_meta(&id)["status"], "waiting");
    let socket = control_socket(&env.store);
    assert!(
        !socket.exists(),
        "the socket {} is left behind",
        socket.display()
    );

    let sig = env.run(&["signal", &id, "approve", "--data", "1"]);
    sig.assert_ok();
    assert!(
        sig.stdout.contains(&format!("delivered; run {id} resumed")),
        "{}",
        sig.stdout
    );
    assert!(
        sig.stdout.contains(&format!("run {id} completed")),
        "{}",
        sig.stdout
    );
    assert_eq!(sig.output_json(), json!({"draft": DRAFT, "decision": 1}));
    assert_eq!(env.run_meta(&id)["status"], "completed");

    let events = env.events_json(&id);
    assert_dense_seq(&events);
    the_event(&events, "run_suspended");
    the_event(&events, "signal_received");
    let verify = env.run(&["verify", &id]);
    verify.assert_ok();
    assert!(verify.stdout.starts_with(&format!("ok {id}")), "{verify:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. Join policies from the command line
// ---------------------------------------------------------------------------------------------

/// 50 branches of which every tenth fails: with `min_required` 45 the fan-out succeeds with 45
/// and 5 failed; with 46 the run fails (exit 1) and `show` names the counts.
#[test]
fn fanout_join_policy_at_least() {
    let env = Env::new();
    let input =
        |k: u32| format!(r#"{{"branches":50,"concurrency":8,"fail_every":10,"min_required":{k}}}"#);
    let ok = env.run(&["start", "fanout", "--input", &input(45)]);
    ok.assert_ok();
    let sum: u64 = (0..50u64).filter(|i| i % 10 != 0).map(|i| i * i).sum();
    assert_eq!(
        ok.output_json(),
        json!({"branches": 50, "succeeded": 45, "failed": 5, "sum": sum})
    );
    let ok_id = run_id_of(ok.stdout.lines().next().unwrap());
    let events = env.events_json(&ok_id);
    assert_eq!(events_of(&events, "branch_failed").len(), 5);
    let fan_in = the_event(&events, "fan_in_completed");
    assert_eq!(
        (fan_in["succeeded"].clone(), fan_in["failed"].clone()),
        (json!(45), json!(5))
    );

    let bad = env.run(&["start", "fanout", "--input", &input(46)]);
    assert_eq!(bad.code(), Some(1), "{bad:#?}");
    let id = run_id_of(bad.stdout.lines().next().unwrap());
    assert!(
        bad.stdout.contains(&format!("run {id} failed")) && bad.stdout.contains("at least 46"),
        "{}",
        bad.stdout
    );
    assert_eq!(env.run_meta(&id)["status"], "failed");
    let events = env.events_json(&id);
    let fan_in = the_event(&events, "fan_in_completed");
    assert_eq!(fan_in["failed"], 5, "{fan_in}");
    let succeeded = fan_in["succeeded"].as_u64().unwrap();
    assert!(succeeded < 46, "{fan_in}");
    assert_eq!(events.last().unwrap()["kind"], "run_failed");

    let show = env.run(&["show", &id]);
    show.assert_ok();
    assert!(show.stdout.contains("status failed"), "{}", show.stdout);
    let counts = format!("{succeeded} succeeded, 5 failed");
    let fan_in_line = show
        .stdout
        .lines()
        .find(|l| l.contains("fan_in_completed"))
        .unwrap_or_else(|| panic!("no fan_in_completed line in\n{}", show.stdout));
    assert!(fan_in_line.contains(&counts), "{fan_in_line}");
    let error_line = show
        .stdout
        .lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or_else(|| panic!("no error line in\n{}", show.stdout));
    assert!(
        error_line.contains(&format!(
            "only {succeeded} of 50 branches succeeded and 5 failed"
        )) && error_line.contains("at least 46 are required"),
        "{error_line}"
    );
    env.run(&["verify", "--all"]).assert_ok();
}

/// A run waiting for a signal in memory in a `start` process is woken through that process's
/// socket: `signal` from another process reports it delivered, and `start` completes with it.
#[test]
fn signal_through_the_socket_wakes_a_run_waiting_in_memory() {
    let env = Env::new();
    let mut child = env.spawn(&["start", "approval", "--input", "{}"]);
    let id = child.wait_run_id();
    env.wait_event(&id, "signal_wait_started");
    let sig = env.run(&["signal", &id, "approve", "--data", "7"]);
    sig.assert_ok();
    assert!(
        sig.stdout
            .contains(&format!("signal `approve` delivered to run {id}")),
        "{}",
        sig.stdout
    );
    let out = child.finish(CMD_TIMEOUT);
    out.assert_ok();
    assert_eq!(out.output_json(), json!({"draft": DRAFT, "decision": 7}));
    let events = env.events_json(&id);
    assert_dense_seq(&events);
    assert!(events_of(&events, "run_suspended").is_empty(), "{events:?}");
    assert!(events_of(&events, "run_resumed").is_empty(), "{events:?}");
    assert!(!control_socket(&env.store).exists());
}

/// A worker SIGKILLed while a run sleeps parked leaves the run `waiting`; a new worker (taking
/// over the stale socket) wakes it when its recorded time comes.
#[test]
fn restarted_worker_wakes_a_run_parked_by_a_sigkilled_worker() {
    let env = Env::new();
    let socket = control_socket(&env.store);
    let mut worker = env.spawn(&["--park-after", "0.2", "worker"]);
    worker.wait_stdout_line("worker serving", Duration::from_millis(10));
    let id = start_remote(&env, "sleepy", r#"{"sleep_ms":2500}"#);
    env.wait_status(&id, "waiting");
    assert!(worker.kill9(), "the worker exited on its own");
    assert!(
        socket.exists(),
        "a SIGKILLed worker cannot remove its socket"
    );
    let (events, set) = env.wait_event(&id, "timer_set");
    let fire_at = int(&set, "fire_at_us");
    assert!(events_of(&events, "timer_fired").is_empty(), "{events:?}");
    assert_eq!(env.run_meta(&id)["status"], "waiting");

    // Due at the fire time, or at once if a slow machine restarts the worker after it.
    let due = fire_at.max(now_us());
    let mut worker = env.spawn(&["--park-after", "0.2", "worker"]);
    worker.wait_stdout_line("worker serving", Duration::from_millis(10));
    worker.wait_stdout_line(&format!("run {id} completed"), Duration::from_millis(10));
    assert_eq!(env.run_meta(&id)["status"], "completed");
    let events = env.events_json(&id);
    assert_dense_seq(&events);
    the_event(&events, "timer_set");
    let fired = int(the_event(&events, "timer_fired"), "ts_us");
    assert!(
        fired >= fire_at && fired < due + 2_000_000,
        "the parked timer fired {:.0} ms after its time (the worker restarted {:.0} ms after it)",
        ms(fired - fire_at),
        ms(due - fire_at)
    );
    let slept = events.last().unwrap()["output"]["slept_ms"]
        .as_i64()
        .unwrap();
    assert!(
        slept >= 2500 && slept < 4500 + (due - fire_at) / 1000,
        "slept_ms {slept}"
    );

    worker.signal(libc::SIGINT);
    let out = worker.finish(CMD_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert!(
        !socket.exists(),
        "the socket {} is left behind",
        socket.display()
    );
    env.run(&["verify", &id]).assert_ok();
}
