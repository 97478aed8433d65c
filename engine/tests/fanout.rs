//! Fan-out / fan-in: sliding-window concurrency, checkpointed branches, join policies,
//! nesting, and bounded memory, over a real redb file.

mod common;
use common::{finish, store};

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_engine::{
    BranchOutcome, Engine, EngineError, FanOutOptions, Interrupt, JoinPolicy, Registry, StepError,
    WorkflowError,
};
use cairn_storage::{RedbStore, RunStatus};
use serde_json::json;
use tokio::sync::Notify;

#[derive(Default)]
struct Probe {
    running: AtomicU32,
    max_running: AtomicU32,
    executed: Mutex<Vec<u32>>,
}

/// `sum` fans out over 0..n: each branch runs two steps and returns i*i.
fn sum_registry(
    probe: Arc<Probe>,
    concurrency: usize,
    gate: Option<(u32, Arc<Notify>)>,
) -> Registry {
    let mut r = Registry::new();
    r.register("sum", 1, move |ctx, n: u32| {
        let probe = Arc::clone(&probe);
        let gate = gate.clone();
        async move {
            let fan = ctx
                .fan_out(
                    "squares",
                    (0..n).collect(),
                    FanOutOptions::new(concurrency),
                    move |b, i: u32| {
                        let probe = Arc::clone(&probe);
                        let gate = gate.clone();
                        async move {
                            let now = probe.running.fetch_add(1, Ordering::SeqCst) + 1;
                            probe.max_running.fetch_max(now, Ordering::SeqCst);
                            probe.executed.lock().unwrap().push(i);
                            let x: u64 = b
                                .step("load", move || async move { Ok(u64::from(i)) })
                                .await?;
                            if let Some((from, notify)) = gate
                                && i >= from
                            {
                                notify.notified().await;
                            }
                            let sq: u64 =
                                b.step("square", move || async move { Ok(x * x) }).await?;
                            probe.running.fetch_sub(1, Ordering::SeqCst);
                            Ok(sq)
                        }
                    },
                )
                .await?;
            Ok(fan.into_successes().iter().sum::<u64>())
        }
    });
    r
}

fn expected_sum(n: u64) -> u64 {
    (0..n).map(|i| i * i).sum()
}

#[tokio::test]
async fn all_branches_run_within_the_concurrency_limit_and_join_in_order() {
    let (_d, store) = store();
    let probe = Arc::new(Probe::default());
    let engine = Engine::with_store(store.clone(), sum_registry(probe.clone(), 4, None));
    let out = finish(&engine, "sum", &50u32).await;
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.output, Some(json!(expected_sum(50))));
    assert!(probe.max_running.load(Ordering::SeqCst) <= 4);
    assert_eq!(probe.executed.lock().unwrap().len(), 50);
    // The fold keeps branch outcomes and forgets finished branches' inner steps.
    let state = engine.load(out.run_id.parse().unwrap()).await.unwrap();
    assert!(
        state.steps.is_empty(),
        "{} inner steps kept",
        state.steps.len()
    );
    let fo = state.fanouts.values().next().unwrap();
    assert_eq!((fo.branches, fo.succeeded, fo.failed), (50, 50, 0));
    assert!(fo.fan_in.is_some());
}

#[tokio::test]
async fn the_window_slides_a_slow_branch_does_not_hold_back_the_others() {
    let (_d, store) = store();
    let done_before_slow = Arc::new(AtomicU32::new(u32::MAX));
    let finished = Arc::new(AtomicU32::new(0));
    let mut r = Registry::new();
    let (d2, f2) = (done_before_slow.clone(), finished.clone());
    r.register("window", 1, move |ctx, _: ()| {
        let (d2, f2) = (d2.clone(), f2.clone());
        async move {
            ctx.fan_out(
                "w",
                (0..40u32).collect(),
                FanOutOptions::new(4),
                move |_b, i| {
                    let (d2, f2) = (d2.clone(), f2.clone());
                    async move {
                        if i == 0 {
                            tokio::time::sleep(Duration::from_millis(600)).await;
                            d2.store(f2.load(Ordering::SeqCst), Ordering::SeqCst);
                        } else {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        f2.fetch_add(1, Ordering::SeqCst);
                        Ok(i)
                    }
                },
            )
            .await?;
            Ok(())
        }
    });
    let engine = Engine::with_store(store, r);
    finish(&engine, "window", &()).await;
    // With chunks of 4, only 3 others could finish while branch 0 sleeps; a sliding window
    // lets the other 39 through the 3 free slots.
    assert!(
        done_before_slow.load(Ordering::SeqCst) >= 30,
        "{}",
        done_before_slow.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn a_resumed_fan_out_runs_only_the_branches_without_an_outcome() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let probe = Arc::new(Probe::default());
    let engine = Engine::with_store(
        store.clone(),
        sum_registry(probe.clone(), 8, Some((30, gate))),
    );
    let h = engine.start("sum", &100u32).await.unwrap();
    let id = h.id;
    // Wait until branches 0..30 have recorded outcomes and the window is stuck on 30..38.
    loop {
        let s = engine.load(id).await.unwrap();
        if s.fanouts.values().next().is_some_and(|f| f.succeeded == 30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown();
    assert_eq!(h.wait().await.unwrap().status, RunStatus::Running);

    let probe2 = Arc::new(Probe::default());
    let engine2 = Engine::with_store(store.clone(), sum_registry(probe2.clone(), 8, None));
    let out = engine2.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(
        out.output,
        Some(json!(expected_sum(100))),
        "same fan-in as an uninterrupted run"
    );
    let rerun: BTreeSet<u32> = probe2.executed.lock().unwrap().iter().copied().collect();
    assert_eq!(
        rerun,
        (30..100).collect::<BTreeSet<u32>>(),
        "completed branches never run again"
    );
    assert!(store.verify(id).await.unwrap().ok());
}

/// `policy` fans out over 10 branches; branch i fails when `i % fail_mod == 0`.
fn policy_registry(join: JoinPolicy, fail_every: u32, slow_others: bool) -> Registry {
    let mut r = Registry::new();
    r.register("policy", 1, move |ctx, _: ()| async move {
        let fan = ctx
            .fan_out(
                "p",
                (0..10u32).collect(),
                FanOutOptions::new(3).join(join),
                move |b, i| async move {
                    b.step("work", move || async move {
                        if slow_others && i != 1 {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        if fail_every > 0 && i % fail_every == 0 {
                            return Err(StepError::msg(format!("item {i} is broken")));
                        }
                        Ok(i)
                    })
                    .await
                },
            )
            .await?;
        let outcomes: Vec<String> = fan
            .outcomes
            .iter()
            .map(|o| match o {
                BranchOutcome::Ok(v) => format!("ok{v}"),
                BranchOutcome::Failed(_) => "failed".into(),
                BranchOutcome::Cancelled => "cancelled".into(),
                BranchOutcome::NotRun => "not_run".into(),
            })
            .collect();
        Ok::<_, WorkflowError>(outcomes)
    });
    r
}

async fn run_policy(join: JoinPolicy, fail_every: u32, slow: bool) -> cairn_engine::RunOutcome {
    let (_d, store) = store();
    let engine = Engine::with_store(store, policy_registry(join, fail_every, slow));
    finish(&engine, "policy", &()).await
}

#[tokio::test]
async fn join_policies_decide_as_documented() {
    // All settled: every slot reported, failures included, never fails.
    let o = run_policy(JoinPolicy::AllSettled, 3, false).await;
    assert_eq!(o.status, RunStatus::Completed);
    let v: Vec<String> = serde_json::from_value(o.output.unwrap()).unwrap();
    assert_eq!(v.iter().filter(|s| *s == "failed").count(), 4); // 0, 3, 6, 9
    assert_eq!(v[1], "ok1");

    // At least 6 of 10 with 4 failures: succeeds, failures reported.
    let o = run_policy(JoinPolicy::AtLeast(6), 3, false).await;
    assert_eq!(o.status, RunStatus::Completed);
    // At least 7 of 10 with 4 failures: the run fails naming the counts.
    let o = run_policy(JoinPolicy::AtLeast(7), 3, false).await;
    assert_eq!(o.status, RunStatus::Failed);
    let e = o.error.unwrap();
    assert!(e.contains("at least 7"), "{e}");
    assert!(e.contains("4 failed"), "{e}");

    // All: one failure fails the fan-out, after all ran.
    let o = run_policy(JoinPolicy::All, 5, false).await;
    assert_eq!(o.status, RunStatus::Failed);
    assert!(o.error.unwrap().contains("2 of 10 branches failed"));

    // First success: branch 1 is fast, the rest slow; it wins and the others are stopped.
    let o = run_policy(JoinPolicy::FirstSuccess, 0, true).await;
    assert_eq!(o.status, RunStatus::Completed);
    let v: Vec<String> = serde_json::from_value(o.output.unwrap()).unwrap();
    assert_eq!(v.iter().filter(|s| s.starts_with("ok")).count(), 1, "{v:?}");
    assert_eq!(v[1], "ok1");
    assert!(
        v.iter().any(|s| s == "cancelled") && v.iter().any(|s| s == "not_run"),
        "{v:?}"
    );

    // All, fail fast: the first failure (branch 0) cancels the rest.
    let o = run_policy(JoinPolicy::AllFailFast, 10, true).await;
    assert_eq!(o.status, RunStatus::Failed);
    assert!(o.error.unwrap().contains("cancelled"));
}

#[tokio::test]
async fn nested_fan_outs_record_nested_paths_and_join() {
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("nested", 1, |ctx, _: ()| async move {
        let outer = ctx
            .fan_out(
                "outer",
                vec![1u64, 2, 3],
                FanOutOptions::new(2),
                |b, x| async move {
                    let inner = b
                        .fan_out(
                            "inner",
                            vec![10u64, 20],
                            FanOutOptions::new(2),
                            move |c, y| async move {
                                c.step("mul", move || async move { Ok(x * y) }).await
                            },
                        )
                        .await?;
                    Ok(inner.into_successes().iter().sum::<u64>())
                },
            )
            .await?;
        Ok(outer.into_successes().iter().sum::<u64>())
    });
    let engine = Engine::with_store(store.clone(), r);
    let out = finish(&engine, "nested", &()).await;
    let id = out.run_id.parse().unwrap();
    if out.output != Some(json!(180)) {
        for e in store.read(id, cairn_storage::Seq(0), 1000).await.unwrap() {
            eprintln!(
                "{} {}",
                e.seq,
                cairn_engine::Event::decode(&e.payload).unwrap().to_json()
            );
        }
    }
    assert_eq!(out.output, Some(json!(180)));
    let evs = store.read(id, cairn_storage::Seq(0), 1000).await.unwrap();
    let paths: BTreeSet<String> = evs
        .iter()
        .filter_map(|e| match cairn_engine::Event::decode(&e.payload).unwrap() {
            cairn_engine::Event::StepCompleted { path, .. } => Some(path.to_string()),
            _ => None,
        })
        .collect();
    assert!(paths.contains("0.2.0.1.0"), "{paths:?}");
}

#[tokio::test]
async fn a_fan_out_of_another_size_is_a_nondeterminism_error() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let probe = Arc::new(Probe::default());
    let engine = Engine::with_store(store.clone(), sum_registry(probe, 2, Some((3, gate))));
    let h = engine.start("sum", &10u32).await.unwrap();
    let id = h.id;
    while engine.load(id).await.unwrap().fanouts.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown();
    h.wait().await.unwrap();
    let mut r = Registry::new();
    r.register("sum", 1, |ctx, _n: u32| async move {
        let f = ctx
            .fan_out(
                "squares",
                (0..11u32).collect(),
                FanOutOptions::new(2),
                |_b, i| async move { Ok(i) },
            )
            .await?;
        Ok(f.outcomes.len() as u64)
    });
    let err = Engine::with_store(store, r)
        .resume(id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Interrupted(Interrupt::NonDeterminism { recorded, found, .. })
            if recorded.contains("10 branches") && found.contains("11 branches")),
        "{err}"
    );
}

#[tokio::test]
async fn cancelling_a_run_stops_its_running_branches() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let probe = Arc::new(Probe::default());
    let engine = Engine::with_store(
        store.clone(),
        sum_registry(probe.clone(), 4, Some((0, gate))),
    );
    let h = engine.start("sum", &20u32).await.unwrap();
    while probe.executed.lock().unwrap().len() < 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.cancel(h.id, "test").await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(5), h.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status, RunStatus::Cancelled);
    assert_eq!(
        probe.executed.lock().unwrap().len(),
        4,
        "no new branch started after cancel"
    );
}

#[tokio::test]
async fn a_branch_output_over_the_payload_limit_fails_the_branch_not_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open_with(
        dir.path().join("t.redb"),
        cairn_storage::StoreOptions {
            max_payload_bytes: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let mut r = Registry::new();
    r.register("big", 1, |ctx, _: ()| async move {
        let fan = ctx
            .fan_out(
                "b",
                vec![10usize, 10_000],
                FanOutOptions::new(2).join(JoinPolicy::AllSettled),
                |_b, n| async move { Ok("x".repeat(n)) },
            )
            .await?;
        Ok((
            fan.successes().count(),
            fan.failures()
                .map(|(_, e)| e.to_string())
                .collect::<Vec<_>>(),
        ))
    });
    let out = Engine::new(s, r)
        .start("big", &())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    let (ok, errs): (usize, Vec<String>) = serde_json::from_value(out.output.unwrap()).unwrap();
    assert_eq!(ok, 1);
    assert!(errs[0].contains("payload limit"), "{errs:?}");
}

/// `detailed` fans out over 0..6 (all settled): branches 0–3 fail leaving details, the others
/// wait for `gate` (when given) and return their index. It returns what the failed branches
/// had left before this execution, and the fan-in.
fn detailed_registry(gate: Option<Arc<Notify>>) -> Registry {
    let mut r = Registry::new();
    r.register("detailed", 1, move |ctx, (): ()| {
        let gate = gate.clone();
        async move {
            let before = ctx.recorded_branch_failures("b");
            let fan = ctx
                .fan_out(
                    "b",
                    (0..6u32).collect(),
                    FanOutOptions::new(6).join(JoinPolicy::AllSettled),
                    move |_b, i: u32| {
                        let gate = gate.clone();
                        async move {
                            if i < 4 {
                                return Err(WorkflowError::FailedWith {
                                    message: format!("branch {i} gave up"),
                                    details: json!({ "spent": i * 10 }),
                                });
                            }
                            if let Some(g) = gate {
                                g.notified().await;
                            }
                            Ok(i)
                        }
                    },
                )
                .await?;
            let failed: Vec<String> = fan.failures().map(|(_, e)| e.to_string()).collect();
            Ok(json!({ "before": before, "failed": failed, "ok": fan.into_successes() }))
        }
    });
    r
}

#[tokio::test]
async fn a_failed_branch_leaves_details_that_a_resumed_run_reads_back() {
    let (_d, store) = store();
    let engine = Engine::with_store(
        store.clone(),
        detailed_registry(Some(Arc::new(Notify::new()))),
    );
    let h = engine.start("detailed", &()).await.unwrap();
    let id = h.id;
    loop {
        let s = engine.load(id).await.unwrap();
        if s.fanouts.values().next().is_some_and(|f| f.failed == 4) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown();
    assert_eq!(h.wait().await.unwrap().status, RunStatus::Running);

    let engine2 = Engine::with_store(store.clone(), detailed_registry(None));
    let out = engine2.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    assert_eq!(
        out.output.unwrap(),
        json!({
            "before": [[0, {"spent": 0}], [1, {"spent": 10}], [2, {"spent": 20}], [3, {"spent": 30}]],
            "failed": ["branch 0 gave up", "branch 1 gave up", "branch 2 gave up", "branch 3 gave up"],
            "ok": [4, 5],
        })
    );
    assert!(store.verify(id).await.unwrap().ok());
}

/// A branch that panics (a bug in its code) stops the fan-out and is reported like a panic in
/// the workflow itself: the run stays `running` (resumable), the other lanes are stopped, and
/// a resume after the fix runs only the branches without a recorded outcome.
#[tokio::test]
async fn a_panicking_branch_is_contained_and_a_resume_runs_only_what_is_missing() {
    let (_d, store) = store();
    let buggy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let executed = Arc::new(Mutex::new(Vec::<u32>::new()));
    let registry = |buggy: Arc<std::sync::atomic::AtomicBool>, executed: Arc<Mutex<Vec<u32>>>| {
        let mut r = Registry::new();
        r.register("fragile", 1, move |ctx, n: u32| {
            let buggy = Arc::clone(&buggy);
            let executed = Arc::clone(&executed);
            async move {
                let fan = ctx
                    .fan_out(
                        "items",
                        (0..n).collect(),
                        FanOutOptions::new(1),
                        move |b, i: u32| {
                            let buggy = Arc::clone(&buggy);
                            let executed = Arc::clone(&executed);
                            async move {
                                let v: u32 = b
                                    .step("work", move || async move {
                                        executed.lock().unwrap().push(i);
                                        Ok(i)
                                    })
                                    .await?;
                                if i == 3 && buggy.load(Ordering::SeqCst) {
                                    panic!("bug in branch code");
                                }
                                Ok(v)
                            }
                        },
                    )
                    .await?;
                Ok(fan.into_successes().iter().sum::<u32>())
            }
        });
        r
    };
    let engine = Engine::with_store(
        store.clone(),
        registry(Arc::clone(&buggy), Arc::clone(&executed)),
    );
    let h = engine.start("fragile", &6u32).await.unwrap();
    let id = h.id;
    let err = h.wait().await.unwrap_err();
    assert!(err.to_string().contains("bug in branch code"), "{err}");
    assert_eq!(
        engine.run_meta(id).await.unwrap().status,
        RunStatus::Running
    );
    // One at a time: branches 0-3 ran their step, none after the panic.
    assert_eq!(*executed.lock().unwrap(), [0, 1, 2, 3]);
    drop(engine);

    // The bug fixed: the resumed fan-out answers branches 0-2 from the log, replays branch 3's
    // recorded step, and runs 4 and 5.
    buggy.store(false, Ordering::SeqCst);
    executed.lock().unwrap().clear();
    let engine = Engine::with_store(store, registry(buggy, Arc::clone(&executed)));
    let out = engine.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{out:?}");
    assert_eq!(out.output, Some(json!(15)));
    assert_eq!(*executed.lock().unwrap(), [4, 5]);
}
