//! End-to-end behaviour of the engine over a real redb file: steps run once, resume answers
//! from the log, divergence is caught, and runs end with the right recorded status.

mod common;
use common::{finish, store};

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use cairn_engine::{
    CancelOutcome, Engine, EngineError, Event, Interrupt, Registry, StepError, WorkflowError,
};
use cairn_storage::{RedbStore, RunFilter, RunStatus, Seq};
use serde_json::json;
use tokio::sync::Notify;

/// A workflow of `n` steps; each step bumps a shared counter; step `gate_at` waits on a Notify
/// when a gate is given (to stop the run mid-way).
fn counting_registry(counter: Arc<AtomicU32>, gate: Option<(u32, Arc<Notify>)>) -> Registry {
    let mut r = Registry::new();
    r.register("count", 1, move |ctx, n: u32| {
        let counter = Arc::clone(&counter);
        let gate = gate.clone();
        async move {
            let mut sum = 0u64;
            for i in 0..n {
                let counter = Arc::clone(&counter);
                let gate = gate.clone();
                let v: u64 = ctx
                    .step(&format!("s{i}"), move || async move {
                        if let Some((at, notify)) = gate
                            && at == i
                        {
                            notify.notified().await;
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                        Ok(u64::from(i) * 10)
                    })
                    .await?;
                sum += v;
            }
            Ok(sum)
        }
    });
    r
}

#[tokio::test]
async fn a_run_records_each_step_once_and_completes() {
    let (_d, store) = store();
    let counter = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(store.clone(), counting_registry(counter.clone(), None));
    let h = engine.start("count", &5u32).await.unwrap();
    let out = h.wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.output, Some(json!(100)));
    assert_eq!(out.steps_executed, 5);
    assert_eq!(counter.load(Ordering::SeqCst), 5);
    let state = engine.load(out.run_id.parse().unwrap()).await.unwrap();
    assert_eq!(state.steps.len(), 5);
    assert_eq!(state.status, RunStatus::Completed);
    // run_started + 5 steps + run_completed
    assert_eq!(state.events, 7);
}

#[tokio::test]
async fn shutdown_then_resume_runs_only_the_missing_steps() {
    let (_d, store) = store();
    let counter = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Notify::new());
    let engine = Engine::with_store(
        store.clone(),
        counting_registry(counter.clone(), Some((3, gate.clone()))),
    );
    let h = engine.start("count", &6u32).await.unwrap();
    let id = h.id;
    // Wait until step 3 is in flight, then shut down: the run stays running.
    while counter.load(Ordering::SeqCst) < 3 {
        tokio::task::yield_now().await;
    }
    engine.shutdown();
    let out = h.wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Running);
    assert_eq!(
        engine.run_meta(id).await.unwrap().status,
        RunStatus::Running
    );

    // A new engine (a restarted process) recovers it; steps 0..3 are answered from the log.
    let counter2 = Arc::new(AtomicU32::new(0));
    let engine2 = Engine::with_store(store.clone(), counting_registry(counter2.clone(), None));
    let recovered = engine2.recover().await.unwrap();
    assert_eq!(recovered.handles.len(), 1);
    assert!(recovered.failed.is_empty());
    let out = recovered
        .handles
        .into_iter()
        .next()
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.output, Some(json!(150)));
    assert_eq!(out.steps_replayed, 3);
    assert_eq!(out.steps_executed, 3);
    assert_eq!(
        counter2.load(Ordering::SeqCst),
        3,
        "only steps 3, 4, 5 ran again"
    );
    let state = engine2.load(id).await.unwrap();
    assert_eq!(state.resumes, 1);
    assert!(store.verify(id).await.unwrap().ok());
}

#[tokio::test]
async fn a_renamed_step_is_a_nondeterminism_error_and_the_run_is_left_as_it_was() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let counter = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(
        store.clone(),
        counting_registry(counter.clone(), Some((2, gate))),
    );
    let h = engine.start("count", &4u32).await.unwrap();
    let id = h.id;
    while counter.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    engine.shutdown();
    h.wait().await.unwrap();
    let events_before = store.run(id).await.unwrap().unwrap().events;

    // Today's code renamed step 1.
    let mut r = Registry::new();
    r.register("count", 1, |ctx, _n: u32| async move {
        ctx.step("s0", || async { Ok(0u64) }).await?;
        ctx.step("renamed", || async { Ok(0u64) }).await?;
        Ok(0u64)
    });
    let engine2 = Engine::with_store(store.clone(), r);
    let err = engine2.resume(id).await.unwrap().wait().await.unwrap_err();
    match &err {
        EngineError::Interrupted(Interrupt::NonDeterminism {
            run,
            path,
            recorded,
            found,
        }) => {
            assert_eq!(*run, id);
            assert_eq!(path.to_string(), "1");
            assert_eq!(recorded, "s1");
            assert_eq!(found, "renamed");
        }
        other => panic!("expected non-determinism, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&id.to_string()) && msg.contains("s1") && msg.contains("renamed"));
    let meta = store.run(id).await.unwrap().unwrap();
    assert_eq!(meta.status, RunStatus::Running, "left as it was");
    // Only the run_resumed marker was added; no step or terminal event.
    assert_eq!(meta.events, events_before + 1);
}

#[tokio::test]
async fn a_failed_step_is_recorded_and_fails_the_run_unless_handled() {
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("fails", 1, |ctx, handle: bool| async move {
        let res: Result<u32, _> = ctx
            .step("flaky", || async {
                Err(StepError::msg("upstream said no"))
            })
            .await;
        match res {
            Err(WorkflowError::Step { .. }) if handle => {
                ctx.step("fallback", || async { Ok(7u32) }).await
            }
            other => other,
        }
    });
    let engine = Engine::with_store(store.clone(), r);
    let out = finish(&engine, "fails", &false).await;
    assert_eq!(out.status, RunStatus::Failed);
    assert!(out.error.unwrap().contains("upstream said no"));
    let out = finish(&engine, "fails", &true).await;
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.output, Some(json!(7)));
    let id = out.run_id.parse().unwrap();
    let evs = store.read(id, Seq(0), 100).await.unwrap();
    let kinds: Vec<&str> = evs
        .iter()
        .map(|e| Event::decode(&e.payload).unwrap().kind())
        .collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "step_failed",
            "step_completed",
            "run_completed"
        ]
    );
}

#[tokio::test]
async fn recorded_now_random_and_uuid_are_stable_across_replay() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let mut r = Registry::new();
    let g = gate.clone();
    r.register("clock", 1, move |ctx, _: ()| {
        let g = g.clone();
        async move {
            let t = ctx.now().await?;
            let x = ctx.random_u64().await?;
            let u = ctx.uuid().await?;
            ctx.step("wait", move || async move {
                g.notified().await;
                Ok(())
            })
            .await?;
            Ok(json!({"t": t.timestamp_micros(), "x": x, "u": u}))
        }
    });
    let engine = Engine::with_store(store.clone(), r.clone());
    let h = engine.start("clock", &()).await.unwrap();
    let id = h.id;
    while store.run(id).await.unwrap().unwrap().events < 4 {
        tokio::task::yield_now().await;
    }
    let first = engine.load(id).await.unwrap();
    engine.shutdown();
    h.wait().await.unwrap();
    let engine2 = Engine::with_store(store.clone(), r);
    gate.notify_one();
    let out = engine2.resume(id).await.unwrap().wait().await.unwrap();
    let o = out.output.unwrap();
    let recorded = |i: u32| {
        first.steps[&cairn_engine::StepPath::root().child(i)]
            .output
            .as_ref()
            .unwrap()
            .to_json()
    };
    assert_eq!(o["t"], recorded(0));
    assert_eq!(o["x"], recorded(1));
    assert_eq!(o["u"], recorded(2));
    assert_eq!(o["u"].as_str().unwrap().len(), 36);
}

#[tokio::test]
async fn bad_input_and_unknown_workflow_write_nothing() {
    let (_d, store) = store();
    let engine = Engine::with_store(store.clone(), counting_registry(Arc::default(), None));
    let err = engine.start("count", &"not a number").await.err().unwrap();
    assert!(matches!(err, EngineError::BadInput { .. }), "{err}");
    let err = engine.start("nope", &1).await.err().unwrap();
    assert!(
        err.to_string().contains("count"),
        "lists known workflows: {err}"
    );
    assert!(
        store
            .list_runs(RunFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    let ghost = cairn_storage::RunId::new();
    assert!(matches!(
        engine.resume(ghost).await.err().unwrap(),
        EngineError::UnknownRun(_)
    ));
}

#[tokio::test]
async fn cancel_stops_an_executing_run_and_records_it() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let counter = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(
        store.clone(),
        counting_registry(counter.clone(), Some((1, gate))),
    );
    let h = engine.start("count", &3u32).await.unwrap();
    while counter.load(Ordering::SeqCst) < 1 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        engine.cancel(h.id, "operator said stop").await.unwrap(),
        CancelOutcome::Requested
    );
    let out = h.wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Cancelled);
    assert_eq!(
        out.error.as_deref(),
        Some("operator said stop"),
        "the reason is recorded"
    );
    // A second cancel leaves the finished run alone.
    assert_eq!(
        engine
            .cancel(out.run_id.parse().unwrap(), "again")
            .await
            .unwrap(),
        CancelOutcome::AlreadyFinished(RunStatus::Cancelled)
    );
}

#[tokio::test]
async fn a_panicking_workflow_is_contained_and_stays_resumable() {
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("panics", 1, |ctx, _: ()| async move {
        ctx.step("ok", || async { Ok(1) }).await?;
        if ctx.steps().len() == 1 {
            panic!("bug in workflow code");
        }
        Ok(1)
    });
    let engine = Engine::with_store(store.clone(), r);
    let h = engine.start("panics", &()).await.unwrap();
    let id = h.id;
    let err = h.wait().await.unwrap_err();
    assert!(err.to_string().contains("bug in workflow code"), "{err}");
    assert_eq!(
        engine.run_meta(id).await.unwrap().status,
        RunStatus::Running
    );
}

#[tokio::test]
async fn context_exposes_steps_metadata_last_result_and_a_bounded_summary() {
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("ctx", 1, |ctx, task: String| async move {
        ctx.step("classify", || async { Ok("billing".to_string()) })
            .await?;
        ctx.set_metadata("category", &"billing").await?;
        ctx.step("answer", || async {
            Ok(json!({"reply": "x".repeat(5000)}))
        })
        .await?;
        let summary = ctx.handoff_summary();
        Ok(json!({
            "task": task,
            "steps": ctx.steps().iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            "meta": ctx.metadata("category"),
            "last_len": ctx.last_result().unwrap()["reply"].as_str().unwrap().len(),
            "summary": summary,
        }))
    });
    let engine = Engine::with_store(store.clone(), r);
    let out = finish(&engine, "ctx", &"refund please").await;
    let o = out.output.unwrap();
    assert_eq!(o["steps"], json!(["classify", "answer"]));
    assert_eq!(o["meta"], json!("billing"));
    assert_eq!(o["last_len"], json!(5000));
    let summary = o["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("Task: \"refund please\"\nCompleted: classify, answer\nLast result: ")
    );
    assert!(
        summary.len() < 1200,
        "summary is bounded: {}",
        summary.len()
    );
}

#[tokio::test]
async fn version_mismatch_is_refused_on_resume() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let counter = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(
        store.clone(),
        counting_registry(counter.clone(), Some((0, gate))),
    );
    let h = engine.start("count", &2u32).await.unwrap();
    let id = h.id;
    engine.shutdown();
    h.wait().await.unwrap();
    let mut r = Registry::new();
    r.register("count", 2, |_ctx, _n: u32| async move { Ok(0) });
    let err = Engine::with_store(store, r).resume(id).await.err().unwrap();
    assert!(matches!(
        err,
        EngineError::VersionMismatch {
            recorded: 1,
            registered: 2,
            ..
        }
    ));
}

#[tokio::test]
async fn two_concurrent_resumes_of_one_run_execute_it_once() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let counter = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(
        store.clone(),
        counting_registry(counter.clone(), Some((1, gate.clone()))),
    );
    let h = engine.start("count", &3u32).await.unwrap();
    let id = h.id;
    while counter.load(Ordering::SeqCst) < 1 {
        tokio::task::yield_now().await;
    }
    engine.shutdown();
    h.wait().await.unwrap();
    let engine2 = Engine::with_store(store.clone(), counting_registry(counter.clone(), None));
    let (a, b) = tokio::join!(engine2.resume(id), engine2.resume(id));
    let (ok, err): (Vec<_>, Vec<_>) = [a, b].into_iter().partition(Result::is_ok);
    assert_eq!((ok.len(), err.len()), (1, 1));
    assert!(matches!(err[0], Err(EngineError::AlreadyActive(_))));
    let out = ok
        .into_iter()
        .next()
        .unwrap()
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed);
}

#[tokio::test]
async fn recover_resumes_the_other_runs_when_one_cannot_be_resumed() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let counter = Arc::new(AtomicU32::new(0));
    let mut r = counting_registry(counter.clone(), Some((0, gate.clone())));
    r.register("gone", 1, |ctx, _: ()| async move {
        ctx.step("wait", || async {
            std::future::pending::<Result<(), StepError>>().await
        })
        .await
    });
    let engine = Engine::with_store(store.clone(), r);
    let h1 = engine.start("gone", &()).await.unwrap();
    let h2 = engine.start("count", &2u32).await.unwrap();
    let gone = h1.id;
    engine.shutdown();
    h1.wait().await.unwrap();
    h2.wait().await.unwrap();
    // Today's program no longer registers `gone`.
    let engine2 = Engine::with_store(store.clone(), counting_registry(counter, None));
    let rec = engine2.recover().await.unwrap();
    assert_eq!(rec.failed.len(), 1);
    assert_eq!(rec.failed[0].0, gone);
    assert!(matches!(
        rec.failed[0].1,
        EngineError::UnknownWorkflow { .. }
    ));
    assert_eq!(rec.handles.len(), 1);
    let out = rec
        .handles
        .into_iter()
        .next()
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed);
}

#[tokio::test]
async fn an_output_over_the_payload_limit_fails_the_step_instead_of_wedging_the_run() {
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
        ctx.step("huge", || async { Ok("x".repeat(10_000)) }).await
    });
    let engine = Engine::new(s, r);
    let out = finish(&engine, "big", &()).await;
    assert_eq!(out.status, RunStatus::Failed);
    let e = out.error.unwrap();
    assert!(e.contains("payload limit of 4096 bytes"), "{e}");
}

#[tokio::test]
async fn reserved_step_names_are_refused() {
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("sneaky", 1, |ctx, _: ()| async move {
        ctx.step("cairn.now", || async { Ok(0i64) }).await
    });
    let out = Engine::with_store(store, r)
        .start("sneaky", &())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Failed);
    assert!(out.error.unwrap().contains("reserved"));
}

#[tokio::test]
async fn code_that_now_ends_before_the_recorded_steps_is_a_nondeterminism_error() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let counter = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(
        store.clone(),
        counting_registry(counter.clone(), Some((3, gate))),
    );
    let h = engine.start("count", &5u32).await.unwrap();
    let id = h.id;
    while counter.load(Ordering::SeqCst) < 3 {
        tokio::task::yield_now().await;
    }
    engine.shutdown();
    h.wait().await.unwrap();
    // Today's code runs one step and returns.
    let mut r = Registry::new();
    r.register("count", 1, |ctx, _n: u32| async move {
        ctx.step("s0", || async { Ok(0u64) }).await
    });
    let err = Engine::with_store(store.clone(), r)
        .resume(id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Interrupted(Interrupt::NonDeterminism { path, recorded, .. })
            if path.to_string() == "1" && recorded == "s1"),
        "{err}"
    );
    assert_eq!(
        store.run(id).await.unwrap().unwrap().status,
        RunStatus::Running
    );
}

#[tokio::test]
async fn check_replays_a_history_without_executing_or_writing_and_reports_divergence() {
    let (_d, store) = store();
    let counter = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(store.clone(), counting_registry(counter.clone(), None));
    let done = finish(&engine, "count", &4u32).await;
    let done_id = done.run_id.parse().unwrap();
    // An unfinished run: stopped while step 2 runs.
    let gate = Arc::new(Notify::new());
    let counter2 = Arc::new(AtomicU32::new(0));
    let engine2 = Engine::with_store(
        store.clone(),
        counting_registry(counter2.clone(), Some((2, gate))),
    );
    let h = engine2.start("count", &4u32).await.unwrap();
    let open_id = h.id;
    while counter2.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    engine2.shutdown();
    h.wait().await.unwrap();
    let events_before = (
        store.run(done_id).await.unwrap().unwrap().events,
        store.run(open_id).await.unwrap().unwrap().events,
    );

    // Today's code, unchanged: both match; nothing runs.
    let today = Arc::new(AtomicU32::new(0));
    let checker = Engine::with_store(store.clone(), counting_registry(today.clone(), None));
    let r = checker.check(done_id).await.unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!((r.steps_replayed, r.history_ends_at.as_deref()), (4, None));
    let r = checker.check(open_id).await.unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.history_ends_at.as_deref(), Some("step 2 `s2`"));
    assert_eq!(today.load(Ordering::SeqCst), 0, "nothing was executed");
    assert_eq!(
        (
            store.run(done_id).await.unwrap().unwrap().events,
            store.run(open_id).await.unwrap().unwrap().events,
        ),
        events_before,
        "nothing was written"
    );

    // Today's code renamed step 1: divergence, named.
    let mut renamed = Registry::new();
    renamed.register("count", 1, |ctx, _n: u32| async move {
        ctx.step("s0", || async { Ok(0u64) }).await?;
        ctx.step("renamed", || async { Ok(0u64) }).await?;
        Ok(0u64)
    });
    let r = Engine::with_store(store.clone(), renamed)
        .check(done_id)
        .await
        .unwrap();
    let d = r.divergence.unwrap();
    assert!(d.contains("s1") && d.contains("renamed"), "{d}");

    // Today's code stops after two steps: divergence at the first unreached step.
    let mut short = Registry::new();
    short.register("count", 1, |ctx, _n: u32| async move {
        ctx.step("s0", || async { Ok(0u64) }).await?;
        ctx.step("s1", || async { Ok(10u64) }).await?;
        Ok(10u64)
    });
    let r = Engine::with_store(store.clone(), short)
        .check(done_id)
        .await
        .unwrap();
    assert!(r.divergence.unwrap().contains("before step 2"));

    // Same steps, different output.
    let mut other = Registry::new();
    other.register("count", 1, |ctx, n: u32| async move {
        let mut sum = 0u64;
        for i in 0..n {
            sum += ctx.step(&format!("s{i}"), || async { Ok(0u64) }).await?;
        }
        Ok(sum + 1)
    });
    let r = Engine::with_store(store.clone(), other)
        .check(done_id)
        .await
        .unwrap();
    assert!(
        r.divergence.unwrap().contains("completes with 61"),
        "the recorded steps' values flow in"
    );
}
