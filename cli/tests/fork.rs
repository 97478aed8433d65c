//! `cairn fork` as a user meets it: a fork re-executes only the steps from its fork point and
//! `cairn show` marks it as a fork; mistakes are one-line errors that write nothing.

mod common;

use common::{Env, file_lines, run_id_of};

/// Runs the `steps` workflow (`n` steps, each appending its index to `side`) to its end and
/// returns its run id and output.
fn steps_run(env: &Env, n: u32, side: &str) -> (String, serde_json::Value) {
    let input = serde_json::json!({ "steps": n, "side_effects": side }).to_string();
    let out = env.run(&["start", "steps", "--input", &input]);
    out.assert_ok();
    (
        run_id_of(out.stdout.lines().next().unwrap()),
        out.output_json(),
    )
}

#[test]
fn a_fork_reruns_the_steps_from_its_fork_point_and_show_marks_it() {
    let env = Env::new();
    let side = env.path("side.txt");
    let side = side.to_str().unwrap();
    let (src, src_output) = steps_run(&env, 5, side);
    assert_eq!(
        file_lines(env.path("side.txt").as_path()),
        ["0", "1", "2", "3", "4"]
    );

    let out = env.run(&["fork", &src, "--from", "3"]);
    out.assert_ok();
    let first = out.stdout.lines().next().unwrap();
    assert!(
        first.contains(&format!("forked from {src} at step 3")),
        "{first}"
    );
    let fork = run_id_of(first);
    assert_ne!(fork, src);
    assert!(
        out.stdout.contains(&format!(
            "run {fork} completed (2 steps executed, 3 answered from the log)"
        )),
        "{}",
        out.stdout
    );
    assert_eq!(out.output_json(), src_output);
    // Only steps 3 and 4 ran again.
    assert_eq!(
        file_lines(env.path("side.txt").as_path()),
        ["0", "1", "2", "3", "4", "3", "4"]
    );

    let show = env.run(&["show", &fork]);
    show.assert_ok();
    assert!(
        show.stdout
            .contains(&format!("forked from {src} at step 3: its first 4 events")),
        "{}",
        show.stdout
    );
    let meta = env.run_meta(&fork);
    assert_eq!(meta["labels"]["forked_from"], src.as_str());
    assert_eq!(meta["labels"]["fork_point"], "3");
    // The source is not marked, and both chains verify.
    let show_src = env.run(&["show", &src]);
    assert!(
        !show_src.stdout.contains("forked from"),
        "{}",
        show_src.stdout
    );
    env.run(&["verify", "--all"]).assert_ok();
}

#[test]
fn a_detached_fork_waits_for_resume() {
    let env = Env::new();
    let side = env.path("side.txt");
    let (src, src_output) = steps_run(&env, 3, side.to_str().unwrap());
    let out = env.run(&["fork", &src, "--from", "2", "--detach"]);
    out.assert_ok();
    let fork = run_id_of(out.stdout.lines().next().unwrap());
    assert!(
        out.stdout.contains(&format!("resume {fork}")),
        "{}",
        out.stdout
    );
    assert_eq!(env.run_meta(&fork)["status"], "running");
    assert_eq!(file_lines(&side).len(), 3, "nothing executed yet");
    let out = env.run(&["resume", &fork]);
    out.assert_ok();
    assert_eq!(out.output_json(), src_output);
    assert_eq!(file_lines(&side), ["0", "1", "2", "2"]);
}

#[test]
fn fork_mistakes_are_one_line_errors_that_write_nothing() {
    let env = Env::new();
    let side = env.path("side.txt");
    let (src, _) = steps_run(&env, 3, side.to_str().unwrap());
    let runs = env.runs_json().len();

    let out = env.run(&["fork", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "--from", "0"]);
    let line = out.assert_one_line_error();
    assert!(line.contains("no run 01ARZ3NDEKTSV4RRFFQ69G5FAV"), "{line}");

    let out = env.run(&["fork", &src, "--from", "9"]);
    let line = out.assert_one_line_error();
    assert!(
        line.contains("has no step 9") && line.contains("0 `step`, 1 `step`, 2 `step`"),
        "{line}"
    );

    let out = env.run(&["fork", &src, "--from", "1.x"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.assert_one_line_error().contains("not a step path"));

    let out = env.run(&[
        "fork",
        &src,
        "--from",
        "1",
        "--input",
        "{\"steps\": \"many\"}",
    ]);
    let line = out.assert_one_line_error();
    assert!(
        line.contains("input for workflow `steps` is invalid"),
        "{line}"
    );

    let out = env.run(&["fork", &src, "--from", "1", "--set", "steps=4"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    let line = out.assert_one_line_error();
    assert!(
        line.contains(
            "--set applies to runs of workflow files; `steps` is a Rust workflow: use --input"
        ),
        "{line}"
    );

    assert_eq!(env.runs_json().len(), runs, "no run was created");
    assert_eq!(file_lines(&side).len(), 3, "nothing executed");
}
