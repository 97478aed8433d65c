//! Forks (`Engine::fork`): a new run reusing a recorded run's history before a step, over a
//! real redb file. Executions are counted in the step closures, so a test fails if a fork
//! executes a copied step again or skips one at or after the fork point.

mod common;
use common::{finish, store};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cairn_engine::{
    Engine, EngineError, EngineOptions, Event, FORK_EVENTS_LABEL, FORK_POINT_LABEL,
    FORKED_FROM_LABEL, FanOutOptions, ForkError, ForkOptions, Registry, StepPath,
};
use cairn_storage::{EventStore, RunFilter, RunId, RunStatus, Seq, StoredEvent};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;

/// Executions per step name.
#[derive(Default)]
struct Counts(std::sync::Mutex<BTreeMap<String, Arc<AtomicUsize>>>);

impl Counts {
    fn counter(&self, name: &str) -> Arc<AtomicUsize> {
        Arc::clone(self.0.lock().unwrap().entry(name.to_string()).or_default())
    }
    fn get(&self, name: &str) -> usize {
        self.counter(name).load(Ordering::SeqCst)
    }
}

#[derive(Serialize, Deserialize, Clone)]
struct PipelineInput {
    base: u64,
    n: u64,
    #[serde(default)]
    skip_a: bool,
}

/// `pipeline`: steps `a` (base+1), `b` (a*2), `c` (b+n); `skip_a` leaves `a` out, so a fork
/// that sets it departs from a history that has `a`.
fn registry(counts: Arc<Counts>) -> Registry {
    let mut r = Registry::new();
    let c = Arc::clone(&counts);
    r.register("pipeline", 1, move |ctx, input: PipelineInput| {
        let c = Arc::clone(&c);
        async move {
            let a = if input.skip_a {
                input.base
            } else {
                let k = c.counter("a");
                ctx.step("a", move || async move {
                    k.fetch_add(1, Ordering::SeqCst);
                    Ok(input.base + 1)
                })
                .await?
            };
            let k = c.counter("b");
            let b: u64 = ctx
                .step("b", move || async move {
                    k.fetch_add(1, Ordering::SeqCst);
                    Ok(a * 2)
                })
                .await?;
            let k = c.counter("c");
            let c: u64 = ctx
                .step("c", move || async move {
                    k.fetch_add(1, Ordering::SeqCst);
                    Ok(b + input.n)
                })
                .await?;
            Ok(json!({ "a": a, "b": b, "c": c }))
        }
    });
    let c = Arc::clone(&counts);
    // `squares`: a step, then a fan-out (at position 1) of six branches, one at a time, each
    // running `load` then `square`.
    r.register("squares", 1, move |ctx, n: u64| {
        let c = Arc::clone(&c);
        async move {
            let k = c.counter("prep");
            let offset: u64 = ctx
                .step("prep", move || async move {
                    k.fetch_add(1, Ordering::SeqCst);
                    Ok(n)
                })
                .await?;
            let fan = ctx
                .fan_out(
                    "squares",
                    (0..6u64).collect(),
                    FanOutOptions::new(1),
                    move |b, i| {
                        let c = Arc::clone(&c);
                        async move {
                            let k = c.counter(&format!("load{i}"));
                            let x: u64 = b
                                .step("load", move || async move {
                                    k.fetch_add(1, Ordering::SeqCst);
                                    Ok(i + offset)
                                })
                                .await?;
                            let k = c.counter(&format!("square{i}"));
                            b.step("square", move || async move {
                                k.fetch_add(1, Ordering::SeqCst);
                                Ok(x * x)
                            })
                            .await
                        }
                    },
                )
                .await?;
            Ok(fan.into_successes().iter().sum::<u64>())
        }
    });
    r
}

fn path(s: &str) -> StepPath {
    s.parse().unwrap()
}

async fn events(store: &Arc<dyn EventStore>, id: RunId) -> Vec<StoredEvent> {
    store.read(id, Seq(0), 100_000).await.unwrap()
}

async fn run_count(store: &Arc<dyn EventStore>) -> usize {
    store.list_runs(RunFilter::default()).await.unwrap().len()
}

fn input(base: u64, n: u64) -> PipelineInput {
    PipelineInput {
        base,
        n,
        skip_a: false,
    }
}

#[tokio::test]
async fn a_fork_executes_only_the_steps_from_its_fork_point_and_leaves_the_source_alone() {
    let (_d, store) = store();
    let counts = Arc::new(Counts::default());
    let engine = Engine::with_store(store.clone(), registry(Arc::clone(&counts)));
    let src = finish(&engine, "pipeline", &input(10, 5)).await;
    assert_eq!(src.status, RunStatus::Completed);
    let src_id: RunId = src.run_id.parse().unwrap();
    let src_events = events(&store, src_id).await;
    let src_meta = store.run(src_id).await.unwrap().unwrap();

    let h = engine
        .fork(src_id, ForkOptions::new(path("1")))
        .await
        .unwrap();
    let fork_id = h.id;
    let out = h.wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(
        (counts.get("a"), counts.get("b"), counts.get("c")),
        (1, 2, 2)
    );
    assert_eq!((out.steps_replayed, out.steps_executed), (1, 2));
    assert_eq!(out.output, src.output, "same input and code: same output");

    // The copied event keeps its bytes and its time; the fork has its own chain.
    let fork_events = events(&store, fork_id).await;
    for i in 0..2 {
        assert_eq!(fork_events[i].payload, src_events[i].payload);
        assert_eq!(fork_events[i].ts_us, src_events[i].ts_us);
    }
    assert_ne!(fork_events[1].hash, src_events[1].hash);
    assert!(matches!(
        Event::decode(&fork_events[2].payload).unwrap(),
        Event::RunResumed { events_before: 2 }
    ));
    let meta = store.run(fork_id).await.unwrap().unwrap();
    assert_eq!(meta.labels[FORKED_FROM_LABEL], src_id.to_string());
    assert_eq!(meta.labels[FORK_POINT_LABEL], "1");
    assert_eq!(meta.labels[FORK_EVENTS_LABEL], "2");
    assert_eq!(meta.parent, None);

    // The source is untouched, and both chains verify.
    assert_eq!(events(&store, src_id).await, src_events);
    assert_eq!(store.run(src_id).await.unwrap().unwrap(), src_meta);
    assert!(store.verify(src_id).await.unwrap().ok());
    assert!(store.verify(fork_id).await.unwrap().ok());
}

#[tokio::test]
async fn a_fork_with_a_new_input_used_after_its_fork_point_equals_a_fresh_run() {
    let (_d, store) = store();
    let counts = Arc::new(Counts::default());
    let engine = Engine::with_store(store.clone(), registry(Arc::clone(&counts)));
    let src = finish(&engine, "pipeline", &input(10, 5)).await;
    let mut opts = ForkOptions::new(path("2"));
    opts.input = Some(serde_json::to_value(input(10, 100)).unwrap());
    opts.labels.insert("why".into(), "bigger n".into());
    let fork = engine
        .fork(src.run_id.parse().unwrap(), opts)
        .await
        .unwrap();
    let fork_id = fork.id;
    let out = fork.wait().await.unwrap();
    assert_eq!(
        (counts.get("a"), counts.get("b"), counts.get("c")),
        (1, 1, 2)
    );
    assert_eq!(out.output, Some(json!({"a": 11, "b": 22, "c": 122})));
    let meta = store.run(fork_id).await.unwrap().unwrap();
    assert_eq!(meta.labels["why"], "bigger n");
    let state = engine.load(fork_id).await.unwrap();
    assert_eq!(state.input.to_json()["n"], json!(100));

    let fresh = finish(&engine, "pipeline", &input(10, 100)).await;
    assert_eq!(out.output, fresh.output);
}

#[tokio::test]
async fn a_fork_inside_a_fan_out_branch_reuses_the_branches_finished_before_it() {
    let (_d, store) = store();
    let counts = Arc::new(Counts::default());
    let engine = Engine::with_store(store.clone(), registry(Arc::clone(&counts)));
    let src = finish(&engine, "squares", &3u64).await;
    assert_eq!(src.status, RunStatus::Completed);
    let src_id: RunId = src.run_id.parse().unwrap();

    // Step 1 (`square`) of branch 3 of the fan-out at position 1.
    let out = engine
        .fork(src_id, ForkOptions::new(path("1.3.1")))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.output, src.output);
    assert_eq!(counts.get("prep"), 1);
    for i in 0..6 {
        let (load, square) = (
            counts.get(&format!("load{i}")),
            counts.get(&format!("square{i}")),
        );
        match i {
            // Finished before the cut: answered from the copied outcomes.
            0..=2 => assert_eq!((load, square), (1, 1), "branch {i}"),
            // In flight at the cut: its `load` is copied, its `square` runs again.
            3 => assert_eq!((load, square), (1, 2), "branch {i}"),
            // Not started at the cut: runs again.
            _ => assert_eq!((load, square), (2, 2), "branch {i}"),
        }
    }

    // Forking from a whole branch runs that branch again from its start.
    let out = engine
        .fork(src_id, ForkOptions::new(path("1.4")))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.output, src.output);
    assert_eq!((counts.get("load3"), counts.get("square3")), (1, 2));
    assert_eq!((counts.get("load4"), counts.get("square4")), (3, 3));
}

#[tokio::test]
async fn a_new_input_that_changes_a_step_before_the_fork_point_is_refused_and_writes_nothing() {
    let (_d, store) = store();
    let counts = Arc::new(Counts::default());
    let engine = Engine::with_store(store.clone(), registry(Arc::clone(&counts)));
    let src = finish(&engine, "pipeline", &input(10, 5)).await;
    let runs = run_count(&store).await;
    let mut opts = ForkOptions::new(path("2"));
    opts.input = Some(json!({"base": 10, "n": 5, "skip_a": true}));
    let err = engine
        .fork(src.run_id.parse().unwrap(), opts)
        .await
        .err()
        .expect("the fork must be refused");
    assert!(
        matches!(err, EngineError::Fork(ForkError::Diverges { .. })),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("at step 0") && msg.contains("`a`") && msg.contains("`b`"),
        "{msg}"
    );
    assert!(msg.contains("fork from step 0 or earlier"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert_eq!(run_count(&store).await, runs, "no run was created");
    assert_eq!(
        (counts.get("a"), counts.get("b"), counts.get("c")),
        (1, 1, 1)
    );

    // The same input forked from step 0 is fine: nothing before it to contradict.
    let mut opts = ForkOptions::new(path("0"));
    opts.input = Some(json!({"base": 10, "n": 5, "skip_a": true}));
    let out = engine
        .fork(src.run_id.parse().unwrap(), opts)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.output, Some(json!({"a": 10, "b": 20, "c": 25})));
}

#[tokio::test]
async fn unknown_runs_steps_and_inputs_are_refused_with_one_line_and_nothing_written() {
    let (_d, store) = store();
    let counts = Arc::new(Counts::default());
    let engine = Engine::with_store(store.clone(), registry(Arc::clone(&counts)));
    let src = finish(&engine, "pipeline", &input(1, 1)).await;
    let src_id: RunId = src.run_id.parse().unwrap();
    let runs = run_count(&store).await;

    let err = engine
        .fork(RunId::new(), ForkOptions::new(path("0")))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::UnknownRun(_)), "{err:?}");

    let err = engine
        .fork(src_id, ForkOptions::new(path("7")))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::Fork(ForkError::UnknownStep { .. })),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("no step 7"), "{msg}");
    assert!(msg.contains("0 `a`, 1 `b`, 2 `c`"), "{msg}");

    let err = engine
        .fork(src_id, ForkOptions::new(path("1.0")))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::Fork(ForkError::UnknownStep { .. })),
        "{err:?}"
    );

    let err = engine
        .fork(src_id, ForkOptions::new(StepPath::root()))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::Fork(ForkError::NoStep { .. })),
        "{err:?}"
    );

    let mut opts = ForkOptions::new(path("1"));
    opts.input = Some(json!("not a pipeline input"));
    let err = engine.fork(src_id, opts).await.err().unwrap();
    assert!(matches!(err, EngineError::BadInput { .. }), "{err:?}");

    assert_eq!(run_count(&store).await, runs, "nothing was created");
    assert_eq!(
        (counts.get("a"), counts.get("b"), counts.get("c")),
        (1, 1, 1)
    );
}

/// `parent`: a child run of `kid` and a step `side`, concurrently (child at 0, step at 1), then
/// a step `after`. `kid` waits for `gate` when it is set.
fn family(counts: Arc<Counts>, gate: Arc<Notify>, gated: bool) -> Registry {
    let mut r = registry(Arc::clone(&counts));
    let c = Arc::clone(&counts);
    r.register("kid", 1, move |ctx, x: u64| {
        let c = Arc::clone(&c);
        let gate = Arc::clone(&gate);
        async move {
            let k = c.counter("kid");
            let y: u64 = ctx
                .step("double", move || async move {
                    k.fetch_add(1, Ordering::SeqCst);
                    Ok(x * 2)
                })
                .await?;
            if gated {
                gate.notified().await;
            }
            Ok(y)
        }
    });
    let c = Arc::clone(&counts);
    r.register("parent", 1, move |ctx, x: u64| {
        let c = Arc::clone(&c);
        async move {
            let k = c.counter("side");
            let (kid, side) = tokio::join!(
                ctx.child::<_, u64>("kid", &x),
                ctx.step("side", move || async move {
                    k.fetch_add(1, Ordering::SeqCst);
                    Ok(x + 1)
                })
            );
            let (kid, side): (u64, u64) = (kid?, side?);
            let k = c.counter("after");
            let after: u64 = ctx
                .step("after", move || async move {
                    k.fetch_add(1, Ordering::SeqCst);
                    Ok(kid + side)
                })
                .await?;
            Ok(after)
        }
    });
    r
}

#[tokio::test]
async fn a_fork_reuses_finished_children_and_refuses_one_still_running_at_the_cut() {
    let (_d, store) = store();
    let counts = Arc::new(Counts::default());
    let gate = Arc::new(Notify::new());
    let engine = Engine::with_store(
        store.clone(),
        family(Arc::clone(&counts), Arc::clone(&gate), true),
    );
    let h = engine.start("parent", &4u64).await.unwrap();
    let src_id = h.id;
    // Wait until `side` (step 1) is recorded while the child still waits at its gate.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counts.get("side") == 0 || counts.get("kid") == 0 {
        assert!(std::time::Instant::now() < deadline, "the parent never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let child = engine.load(src_id).await.unwrap().children[&path("0")].child;

    // The child is still running: forking from after its start is refused, read-only.
    let runs = run_count(&store).await;
    let err = engine
        .fork(src_id, ForkOptions::new(path("1")))
        .await
        .err()
        .expect("refused while the child runs");
    assert!(
        matches!(err, EngineError::Fork(ForkError::ChildUnfinished { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("fork from step 0 or earlier"),
        "{err}"
    );
    assert_eq!(run_count(&store).await, runs);

    // A step inside the child is in the child's own history.
    let err = engine
        .fork(src_id, ForkOptions::new(path("0.0")))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::Fork(ForkError::InsideChild { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains(&child.to_string()), "{err}");

    gate.notify_one();
    let src = h.wait().await.unwrap();
    assert_eq!(src.output, Some(json!(13)));

    // Now the child has finished: the fork from step 1 (`side`, whose event came before the
    // child's result) waits for the finished child instead of running a new one.
    let runs = run_count(&store).await;
    let out = engine
        .fork(src_id, ForkOptions::new(path("1")))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.output, Some(json!(13)));
    assert_eq!(counts.get("kid"), 1, "the child did not run again");
    assert_eq!((counts.get("side"), counts.get("after")), (2, 2));
    assert_eq!(
        run_count(&store).await,
        runs + 1,
        "only the fork was created"
    );

    // Forking from the child call runs a new child, linked to the fork.
    let gate2 = Arc::new(Notify::new());
    let engine2 = Engine::with_store(store.clone(), family(Arc::clone(&counts), gate2, false));
    let h = engine2
        .fork(src_id, ForkOptions::new(path("0")))
        .await
        .unwrap();
    let fork_id = h.id;
    let out = h.wait().await.unwrap();
    assert_eq!(out.output, Some(json!(13)));
    assert_eq!(counts.get("kid"), 2);
    let new_child = engine2.load(fork_id).await.unwrap().children[&path("0")].child;
    assert_ne!(new_child, child);
    assert_eq!(
        store.run(new_child).await.unwrap().unwrap().parent,
        Some(fork_id)
    );
    assert!(store.verify(src_id).await.unwrap().ok());
    assert!(store.verify(fork_id).await.unwrap().ok());
}

#[tokio::test]
async fn a_fork_drops_the_sources_park_and_resume_markers_and_keeps_its_consumed_signal() {
    let (_d, store) = store();
    let counts = Arc::new(Counts::default());
    let mut r = Registry::new();
    let c = Arc::clone(&counts);
    r.register("approve", 1, move |ctx, _: ()| {
        let c = Arc::clone(&c);
        async move {
            let k = c.counter("draft");
            let d: String = ctx
                .step("draft", move || async move {
                    k.fetch_add(1, Ordering::SeqCst);
                    Ok("draft".to_string())
                })
                .await?;
            let ok: Option<String> = ctx.wait_signal("go", None).await?;
            let k = c.counter("send");
            let sent: String = ctx
                .step("send", move || async move {
                    k.fetch_add(1, Ordering::SeqCst);
                    Ok(format!("{d}:{}", ok.unwrap_or_default()))
                })
                .await?;
            Ok(sent)
        }
    });
    let engine = Engine::with_options(
        store.clone(),
        r,
        EngineOptions {
            suspend_after: Duration::from_millis(30),
            ..EngineOptions::default()
        },
    );
    let out = finish(&engine, "approve", &()).await;
    assert_eq!(out.status, RunStatus::Waiting, "parked");
    let src_id: RunId = out.run_id.parse().unwrap();
    engine.signal(src_id, "go", json!("yes")).await.unwrap();
    let src = engine.resume(src_id).await.unwrap().wait().await.unwrap();
    assert_eq!(src.output, Some(json!("draft:yes")));

    let fork = engine
        .fork(src_id, ForkOptions::new(path("2")))
        .await
        .unwrap();
    let fork_id = fork.id;
    let out = tokio::time::timeout(Duration::from_secs(10), fork.wait())
        .await
        .expect("the fork does not wait for a signal again")
        .unwrap();
    assert_eq!(out.output, Some(json!("draft:yes")));
    assert_eq!((counts.get("draft"), counts.get("send")), (1, 2));

    let kinds: Vec<Event> = events(&store, fork_id)
        .await
        .iter()
        .map(|e| Event::decode(&e.payload).unwrap())
        .collect();
    let names: Vec<&str> = kinds.iter().map(Event::kind).collect();
    assert_eq!(
        names,
        [
            "run_started",
            "step_completed",
            "signal_wait_started",
            "signal_sent",
            "signal_received",
            "run_resumed",
            "step_completed",
            "run_completed"
        ]
    );
    assert!(
        matches!(kinds[4], Event::SignalReceived { sent_seq: 3, .. }),
        "renumbered to the copied signal: {:?}",
        kinds[4]
    );
    assert!(store.verify(fork_id).await.unwrap().ok());
}

#[tokio::test]
async fn a_fork_from_a_branch_without_steps_cuts_at_that_branchs_outcome() {
    // A branch that runs no operation records only its outcome, at the fan-out's position plus
    // its index: the fork must treat that outcome as the branch's, not the fan-out's.
    let (_d, store) = store();
    let runs_of = Arc::new(Counts::default());
    let mut r = Registry::new();
    let c = Arc::clone(&runs_of);
    r.register("pure", 1, move |ctx, _: ()| {
        let c = Arc::clone(&c);
        async move {
            let fan = ctx
                .fan_out(
                    "double",
                    (0..5u64).collect(),
                    FanOutOptions::new(1),
                    move |_b, i| {
                        let k = c.counter(&format!("branch{i}"));
                        async move {
                            k.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, cairn_engine::WorkflowError>(i * 2)
                        }
                    },
                )
                .await?;
            Ok(fan.into_successes().iter().sum::<u64>())
        }
    });
    let engine = Engine::with_store(store.clone(), r);
    let src = finish(&engine, "pure", &()).await;
    assert_eq!(src.output, Some(json!(20)));
    let out = engine
        .fork(src.run_id.parse().unwrap(), ForkOptions::new(path("0.3")))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.output, src.output);
    // Branch code outside steps also runs when the fork's copy is checked, so count branch
    // calls only for the reused branches (never called again) and read the rest from the log.
    let counts: Vec<usize> = (0..5).map(|i| runs_of.get(&format!("branch{i}"))).collect();
    assert_eq!(
        counts[..3],
        [1, 1, 1],
        "reused branches are not called: {counts:?}"
    );
    assert!(counts[3] > 1 && counts[4] > 1, "{counts:?}");
    let fork_id: RunId = out.run_id.parse().unwrap();
    let (mut copied, mut executed) = (Vec::new(), Vec::new());
    let mut resumed = false;
    for e in events(&store, fork_id).await {
        match Event::decode(&e.payload).unwrap() {
            Event::RunResumed { .. } => resumed = true,
            Event::BranchCompleted { index, .. } if resumed => executed.push(index),
            Event::BranchCompleted { index, .. } => copied.push(index),
            _ => {}
        }
    }
    assert_eq!((copied, executed), (vec![0, 1, 2], vec![3, 4]));
}

#[tokio::test]
async fn a_forks_deadline_is_the_sources_timeout_counted_from_the_fork() {
    let (_d, store) = store();
    let counts = Arc::new(Counts::default());
    let engine = Engine::with_store(store.clone(), registry(Arc::clone(&counts)));
    let mut opts = cairn_engine::StartOptions::new("pipeline", json!({"base": 1, "n": 1}));
    opts.timeout = Some(Duration::from_secs(3600));
    let src = engine.start_with(opts).await.unwrap();
    let src_id = src.id;
    src.wait().await.unwrap();
    let src_deadline = engine.load(src_id).await.unwrap().deadline_us.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forked = engine
        .fork_prefix(src_id, ForkOptions::new(path("1")))
        .await
        .unwrap();
    let fork_deadline = engine.load(forked.id).await.unwrap().deadline_us.unwrap();
    let moved = fork_deadline - src_deadline;
    assert!(
        (250_000..60_000_000).contains(&moved),
        "the deadline moved by {moved} µs"
    );
    let out = engine
        .resume(forked.id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed);
}
