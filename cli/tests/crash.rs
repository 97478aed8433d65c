//! Durability under real crashes: `cairn` child processes SIGKILLed mid-run and restarted.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{CMD_TIMEOUT, Env, Proc, assert_dense_seq, kill_at_lines, line_count, sum_counts};

const STEPS: u32 = 1000;
const KILLS: usize = 6;

/// splitmix64: a small deterministic generator, so a seed reproduces the kill points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    match std::env::var("CAIRN_TEST_SEED") {
        Ok(s) => s.trim().parse().expect("CAIRN_TEST_SEED must be a u64"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64,
    }
}

/// Increasing kill thresholds (side-effect line counts), one in each of `KILLS` equal slices of
/// [40, 880], leaving room at the end so the last kill lands before the run finishes.
fn thresholds(rng: &mut Rng) -> Vec<u64> {
    let (lo, hi) = (40u64, 880u64);
    let width = (hi - lo) / KILLS as u64;
    (0..KILLS as u64)
        .map(|k| lo + k * width + rng.below(width))
        .collect()
}

/// Every step index in the side-effect file, one per execution. Each execution appends its
/// whole line with one `write`, so a kill never leaves half a line behind.
fn executions(file: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string(file).expect("read the side-effect file");
    text.lines()
        .map(|line| {
            line.parse::<u32>()
                .unwrap_or_else(|_| panic!("unexpected line {line:?} in the side-effect file"))
        })
        .collect()
}

/// A 1,000-step run SIGKILLed at 6 random points and restarted each time (alternating `resume`
/// and `recover`) ends with the uninterrupted output, each step recorded exactly once, each
/// side effect executed at least once and at most once more per kill, and a valid log.
#[test]
fn sigkilled_steps_run_resumes_to_the_uninterrupted_result() {
    let seed = seed();
    println!("CAIRN_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let thresholds = thresholds(&mut rng);
    println!("kill thresholds (side-effect lines): {thresholds:?}");

    // The reference: the same workflow, uninterrupted, in a separate store.
    let reference = Env::new();
    let ref_effects = reference.path("effects.txt");
    let input = |f: &Path| format!(r#"{{"steps":{STEPS},"side_effects":"{}"}}"#, f.display());
    let uninterrupted = reference.run(&["start", "steps", "--input", &input(&ref_effects)]);
    uninterrupted.assert_ok();
    let expected = uninterrupted.output_json();
    let checksum: u64 = (0..u64::from(STEPS)).map(|i| i * i).sum();
    assert_eq!(
        expected,
        serde_json::json!({ "steps": STEPS, "checksum": checksum })
    );
    assert_eq!(executions(&ref_effects), (0..STEPS).collect::<Vec<_>>());

    let env = Env::new();
    let effects = env.path("effects.txt");
    let mut child = env.spawn(&["start", "steps", "--input", &input(&effects)]);
    let id = child.wait_run_id();
    let restart = |n: usize| -> Proc {
        if n.is_multiple_of(2) {
            env.spawn(&["resume", &id])
        } else {
            env.spawn(&["recover"])
        }
    };

    let mut kills = 0usize;
    let mut finished_early = None;
    for (k, &threshold) in thresholds.iter().enumerate() {
        // Kill only after this child has executed at least one step of its own.
        let target = threshold.max(line_count(&effects) + 1);
        let delay = Duration::from_micros(rng.below(2000));
        if !kill_at_lines(&mut child, &effects, target, delay) {
            finished_early = Some(k);
            break;
        }
        kills += 1;
        println!("kill {kills} at {} side-effect lines", line_count(&effects));
        child = restart(k);
    }
    let out = child.finish(CMD_TIMEOUT);
    assert!(
        out.success(),
        "the last restart failed (seed {seed}): {out:#?}"
    );
    assert!(
        kills >= 5,
        "only {kills} kills landed before the run finished (finished early at kill {finished_early:?}, seed {seed}); \
         the machine may be too slow for the thresholds"
    );

    // (a) The same output as the uninterrupted run.
    assert_eq!(out.output_json(), expected, "seed {seed}");
    assert!(
        out.stdout.contains(&format!("run {id} completed")),
        "{}",
        out.stdout
    );

    // (b) Every side effect ran, in order; only a step in flight at a kill ran again.
    let ran = executions(&effects);
    let mut counts = BTreeMap::<u32, usize>::new();
    for &i in &ran {
        *counts.entry(i).or_default() += 1;
    }
    for i in 0..STEPS {
        assert!(counts.contains_key(&i), "step {i} never ran (seed {seed})");
    }
    assert_eq!(
        counts.len(),
        STEPS as usize,
        "unexpected indices (seed {seed})"
    );
    let extra = ran.len() - STEPS as usize;
    println!("{extra} steps executed twice for {kills} kills");
    assert!(
        extra <= kills,
        "{extra} extra executions for {kills} kills (seed {seed}); duplicated: {:?}",
        counts.iter().filter(|(_, c)| **c > 1).collect::<Vec<_>>()
    );
    assert_eq!(ran[0], 0);
    for w in ran.windows(2) {
        assert!(
            w[1] == w[0] || w[1] == w[0] + 1,
            "step {} ran right after step {} (seed {seed}): a step was skipped or reordered",
            w[1],
            w[0]
        );
    }

    // (c) A dense log, each step recorded exactly once, one resume per kill, one completion.
    let events = env.events_json(&id);
    assert_dense_seq(&events);
    let mut completed = BTreeMap::<String, usize>::new();
    for e in events.iter().filter(|e| e["kind"] == "step_completed") {
        let path = e["path"].as_str().expect("a step path").to_string();
        *completed.entry(path).or_default() += 1;
    }
    assert_eq!(completed.len(), STEPS as usize, "seed {seed}");
    for i in 0..STEPS {
        assert_eq!(
            completed.get(&i.to_string()),
            Some(&1),
            "step {i} must be recorded exactly once (seed {seed})"
        );
    }
    let kinds = |k: &str| events.iter().filter(|e| e["kind"] == k).count();
    assert_eq!(kinds("run_resumed"), kills, "seed {seed}");
    assert_eq!(kinds("run_completed"), 1, "seed {seed}");
    assert_eq!(events.last().unwrap()["kind"], "run_completed");
    assert_eq!(events.last().unwrap()["output"], expected);

    // (d) The hash chain verifies.
    let verify = env.run(&["verify", &id]);
    verify.assert_ok();
    assert!(verify.stdout.starts_with(&format!("ok {id}")), "{verify:?}");

    // (e) The run is listed as completed, with every event counted.
    let meta = env.run_meta(&id);
    assert_eq!(meta["status"], "completed");
    assert_eq!(meta["events"].as_u64(), Some(events.len() as u64));
}

/// A demo SIGKILLed with a step in flight leaves a store that read-only commands open right
/// away (crash repair), shows the run as running, and `recover` finishes it from the log with
/// the same output as an uninterrupted demo.
#[test]
fn sigkilled_demo_is_readable_at_once_and_recover_finishes_it() {
    let env = Env::new();
    let mut child = env.spawn(&["demo", "--items", "60", "--step-ms", "20"]);
    let id = child.wait_run_id();
    env.wait_events_over(&id, 30);
    assert!(child.kill9(), "the demo finished before it could be killed");

    // Readable right after the kill, and still running.
    let meta = env.run_meta(&id);
    assert_eq!(meta["status"], "running", "{meta}");
    let before = meta["events"].as_u64().unwrap();
    assert!(before > 30 && before < 182, "{meta}");

    // Today's code matches the interrupted history, which ends where the kill landed; the
    // check executes and writes nothing.
    let check = env.run(&["replay", &id, "--check"]);
    check.assert_ok();
    assert!(
        check.stdout.contains(&format!("ok {id}"))
            && check.stdout.contains("the history ends before step"),
        "{check:?}"
    );
    assert_eq!(env.run_meta(&id)["events"].as_u64().unwrap(), before);

    let out = env.run(&["recover"]);
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("run {id} recovered")),
        "{out:?}"
    );
    assert!(
        out.stdout.contains(&format!("run {id} completed")),
        "{out:?}"
    );
    assert!(out.stdout.contains("answered from the log"), "{out:?}");
    let output = out.output_json();
    assert_eq!(output["items"], 60);
    assert_eq!(sum_counts(&output["by_category"]), 60, "{output}");

    // The same result as a demo that was never interrupted.
    let reference = Env::new();
    let clean = reference.run(&["demo", "--items", "60", "--step-ms", "0"]);
    clean.assert_ok();
    assert_eq!(output, clean.output_json());

    let events = env.events_json(&id);
    assert_dense_seq(&events);
    let steps = events
        .iter()
        .filter(|e| e["kind"] == "step_completed")
        .count();
    assert_eq!(steps, 180);
    env.run(&["verify", &id]).assert_ok();
    assert_eq!(env.run_meta(&id)["status"], "completed");
}
