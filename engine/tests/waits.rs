//! Durable timers, signals, child runs and the running-runs limit, over a real redb file.

mod common;
use common::{finish, store};

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_engine::{
    CancelOutcome, Engine, EngineError, EngineOptions, Event, Registry, SignalDelivery, StepError,
    WorkflowError,
};
use cairn_storage::{EventStore, RunFilter, RunId, RunStatus, Seq};
use serde_json::json;

fn opts(suspend_after_ms: u64) -> EngineOptions {
    EngineOptions {
        suspend_after: Duration::from_millis(suspend_after_ms),
        ..EngineOptions::default()
    }
}

async fn kinds(store: &Arc<dyn EventStore>, id: RunId) -> Vec<&'static str> {
    store
        .read(id, Seq(0), 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| Event::decode(&e.payload).unwrap().kind())
        .collect()
}

fn sleeper() -> Registry {
    let mut r = Registry::new();
    r.register("sleeper", 1, |ctx, ms: u64| async move {
        ctx.step("before", || async { Ok(1) }).await?;
        ctx.sleep(Duration::from_millis(ms)).await?;
        let t = ctx.now().await?;
        Ok(t.timestamp_micros())
    });
    r
}

#[tokio::test]
async fn a_sleep_is_recorded_and_takes_its_time() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), sleeper(), opts(60_000));
    let t = Instant::now();
    let out = finish(&engine, "sleeper", &300u64).await;
    assert_eq!(out.status, RunStatus::Completed);
    assert!(t.elapsed() >= Duration::from_millis(300));
    let k = kinds(&store, out.run_id.parse().unwrap()).await;
    assert!(
        k.contains(&"timer_set") && k.contains(&"timer_fired"),
        "{k:?}"
    );
}

#[tokio::test]
async fn a_restart_during_a_sleep_sleeps_only_the_remaining_time() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), sleeper(), opts(60_000));
    let h = engine.start("sleeper", &1500u64).await.unwrap();
    let id = h.id;
    tokio::time::sleep(Duration::from_millis(600)).await;
    engine.shutdown();
    assert_eq!(h.wait().await.unwrap().status, RunStatus::Running);
    let state = engine.load(id).await.unwrap();
    let fire_at = state.timers.values().next().unwrap().fire_at_us;
    let engine2 = Engine::with_options(store.clone(), sleeper(), opts(60_000));
    let out = engine2.resume(id).await.unwrap().wait().await.unwrap();
    let woke_at = out.output.unwrap().as_i64().unwrap();
    assert!(woke_at >= fire_at, "not before the recorded fire time");
    assert!(
        woke_at < fire_at + 400_000,
        "not a fresh 1.5 s: {} µs late",
        woke_at - fire_at
    );
}

#[tokio::test]
async fn a_long_sleep_parks_the_run_in_the_wakeup_index_until_due() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), sleeper(), opts(100));
    let out = finish(&engine, "sleeper", &700u64).await;
    assert_eq!(out.status, RunStatus::Waiting, "parked, not held in memory");
    let id: RunId = out.run_id.parse().unwrap();
    let meta = store.run(id).await.unwrap().unwrap();
    assert!(meta.wake_at_us.is_some());
    assert_eq!(store.next_wakeup().await.unwrap(), meta.wake_at_us);
    let waiting = store
        .list_runs(RunFilter {
            status: Some(RunStatus::Waiting),
            limit: None,
        })
        .await
        .unwrap();
    assert_eq!(waiting.len(), 1);
    // Not due yet: nothing is woken.
    assert!(engine.wake_due().await.unwrap().handles.is_empty());
    tokio::time::sleep(Duration::from_millis(750)).await;
    let woken = engine.wake_due().await.unwrap();
    assert_eq!(woken.handles.len(), 1);
    let out = woken
        .handles
        .into_iter()
        .next()
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(
        store.next_wakeup().await.unwrap(),
        None,
        "the index entry is gone"
    );
    let k = kinds(&store, id).await;
    assert!(k.contains(&"run_suspended"), "{k:?}");
}

fn approver() -> Registry {
    let mut r = Registry::new();
    r.register("approve", 1, |ctx, timeout_ms: Option<u64>| async move {
        ctx.step("draft", || async { Ok("draft v1".to_string()) })
            .await?;
        let answer: Option<serde_json::Value> = ctx
            .wait_signal("review", timeout_ms.map(Duration::from_millis))
            .await?;
        Ok(json!({ "answer": answer }))
    });
    r
}

#[tokio::test]
async fn a_signal_sent_before_the_wait_is_not_lost() {
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("late", 1, |ctx, _: ()| async move {
        ctx.step("slow", || async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(())
        })
        .await?;
        let v: Option<u32> = ctx.wait_signal("go", Some(Duration::from_secs(5))).await?;
        Ok(v)
    });
    let engine = Engine::with_options(store.clone(), r, opts(60_000));
    let h = engine.start("late", &()).await.unwrap();
    // Sent while the first step still runs, before the wait exists.
    engine.signal(h.id, "go", json!(42)).await.unwrap();
    let out = h.wait().await.unwrap();
    assert_eq!(out.output, Some(json!(42)));
}

#[tokio::test]
async fn a_waiting_run_is_woken_by_a_signal_and_a_wait_times_out() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), approver(), opts(60_000));
    let h = engine.start("approve", &Some(10_000u64)).await.unwrap();
    let id = h.id;
    while !kinds(&store, id).await.contains(&"signal_wait_started") {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        engine
            .signal(id, "review", json!({"ok": true}))
            .await
            .unwrap(),
        SignalDelivery::Notified
    );
    let out = h.wait().await.unwrap();
    assert_eq!(out.output, Some(json!({"answer": {"ok": true}})));
    // Signals to a finished run are refused.
    assert!(matches!(
        engine.signal(id, "review", json!(1)).await,
        Err(EngineError::RunFinished { .. })
    ));
    // A short timeout gives None, recorded.
    let out = finish(&engine, "approve", &Some(100u64)).await;
    assert_eq!(out.output, Some(json!({"answer": null})));
    assert!(
        kinds(&store, out.run_id.parse().unwrap())
            .await
            .contains(&"signal_timed_out")
    );
}

#[tokio::test]
async fn a_parked_run_waiting_for_a_signal_is_resumed_with_its_data() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), approver(), opts(50));
    let out = finish(&engine, "approve", &None::<u64>).await;
    assert_eq!(out.status, RunStatus::Waiting);
    let id: RunId = out.run_id.parse().unwrap();
    assert_eq!(
        store.run(id).await.unwrap().unwrap().wake_at_us,
        None,
        "no timer: only a signal wakes it"
    );
    assert_eq!(
        engine.signal(id, "review", json!("lgtm")).await.unwrap(),
        SignalDelivery::Woken
    );
    assert_eq!(
        store.run(id).await.unwrap().unwrap().status,
        RunStatus::Running
    );
    let rec = engine.recover().await.unwrap();
    let out = rec
        .handles
        .into_iter()
        .next()
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.output, Some(json!({"answer": "lgtm"})));
}

fn family(child_runs: Arc<AtomicU32>) -> Registry {
    let mut r = Registry::new();
    r.register("parent", 1, |ctx, n: u32| async move {
        let a: u32 = ctx.step("prep", move || async move { Ok(n) }).await?;
        let doubled: u32 = ctx.child("child", &a).await?;
        let failed = ctx.child::<_, u32>("child", &999u32).await;
        Ok(json!({ "doubled": doubled, "failed": failed.is_err() }))
    });
    r.register("child", 1, move |ctx, x: u32| {
        let child_runs = Arc::clone(&child_runs);
        async move {
            child_runs.fetch_add(1, Ordering::SeqCst);
            ctx.step("double", move || async move {
                if x == 999 {
                    return Err(StepError::msg("999 is not allowed"));
                }
                Ok(x * 2)
            })
            .await
        }
    });
    r.register("forever", 1, |ctx, _: ()| async move {
        let _: u32 = ctx.child("waits", &()).await?;
        Ok(())
    });
    r.register("waits", 1, |ctx, _: ()| async move {
        let v: Option<u32> = ctx.wait_signal("never", None).await?;
        Ok(v.unwrap_or(0))
    });
    r.register("naps", 1, |ctx, ms: u64| async move {
        ctx.sleep(Duration::from_millis(ms)).await?;
        Ok(7u32)
    });
    r.register("awaits_nap", 1, |ctx, ms: u64| async move {
        let v: u32 = ctx.child("naps", &ms).await?;
        Ok(v + 1)
    });
    r
}

#[tokio::test]
async fn a_child_run_is_linked_awaited_and_its_failure_reported() {
    let (_d, store) = store();
    let counter = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_options(store.clone(), family(counter.clone()), opts(60_000));
    let out = finish(&engine, "parent", &21u32).await;
    assert_eq!(out.output, Some(json!({"doubled": 42, "failed": true})));
    let parent: RunId = out.run_id.parse().unwrap();
    let state = engine.load(parent).await.unwrap();
    assert_eq!(state.children.len(), 2);
    for c in state.children.values() {
        let meta = store.run(c.child).await.unwrap().unwrap();
        assert_eq!(meta.parent, Some(parent), "the child records its parent");
    }
    assert_eq!(counter.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn cancelling_a_parent_cancels_its_child() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), family(Arc::default()), opts(60_000));
    let h = engine.start("forever", &()).await.unwrap();
    let parent = h.id;
    let child = loop {
        let s = engine.load(parent).await.unwrap();
        if let Some(c) = s.children.values().next()
            && store.run(c.child).await.unwrap().is_some()
        {
            break c.child;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        engine.cancel(parent, "stop all").await.unwrap(),
        CancelOutcome::Requested
    );
    assert_eq!(h.wait().await.unwrap().status, RunStatus::Cancelled);
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.run(child).await.unwrap().unwrap().status != RunStatus::Cancelled {
        assert!(Instant::now() < deadline, "the child was not cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cancelling_a_parked_parent_cancels_its_parked_child() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), family(Arc::default()), opts(50));
    let out = finish(&engine, "forever", &()).await;
    assert_eq!(out.status, RunStatus::Waiting);
    let parent: RunId = out.run_id.parse().unwrap();
    let child = engine
        .load(parent)
        .await
        .unwrap()
        .children
        .values()
        .next()
        .unwrap()
        .child;
    assert_eq!(
        store.run(child).await.unwrap().unwrap().status,
        RunStatus::Waiting
    );
    assert_eq!(
        engine.cancel(parent, "stop").await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        store.run(child).await.unwrap().unwrap().status,
        RunStatus::Cancelled
    );
}

#[tokio::test]
async fn a_resumed_parent_does_not_create_its_child_twice() {
    let (_d, store) = store();
    let counter = Arc::new(AtomicU32::new(0));
    let mut r = family(counter.clone());
    r.register("slowparent", 1, |ctx, _: ()| async move {
        let v: u32 = ctx.child("slowchild", &()).await?;
        Ok(v)
    });
    r.register("slowchild", 1, |ctx, _: ()| async move {
        ctx.step("work", || async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(7u32)
        })
        .await
    });
    let engine = Engine::with_options(store.clone(), r.clone(), opts(60_000));
    let h = engine.start("slowparent", &()).await.unwrap();
    let parent = h.id;
    tokio::time::sleep(Duration::from_millis(100)).await;
    engine.shutdown();
    h.wait().await.unwrap();
    let engine2 = Engine::with_options(store.clone(), r, opts(60_000));
    let rec = engine2.recover().await.unwrap();
    assert!(rec.failed.is_empty());
    let mut outs = Vec::new();
    for h in rec.handles {
        outs.push(h.wait().await.unwrap());
    }
    // The parent gets its child's answer (recover may or may not have resumed the child
    // itself first: the parent resumes it when it is not).
    let parent_out = outs
        .iter()
        .find(|o| o.run_id == parent.to_string())
        .expect("the parent was recovered");
    assert_eq!(parent_out.output, Some(json!(7)));
    let all = store.list_runs(RunFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2, "one parent, one child");
    assert!(
        all.iter().all(|m| m.status == RunStatus::Completed),
        "{all:?}"
    );
}

#[tokio::test]
async fn the_running_limit_queues_runs_durably_and_starts_them_in_order() {
    let (_d, store) = store();
    let running = Arc::new(AtomicU32::new(0));
    let max = Arc::new(AtomicU32::new(0));
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut r = Registry::new();
    let (r2, m2, o2) = (running.clone(), max.clone(), order.clone());
    r.register("job", 1, move |ctx, i: u32| {
        let (r2, m2, o2) = (r2.clone(), m2.clone(), o2.clone());
        async move {
            ctx.step("work", move || async move {
                let now = r2.fetch_add(1, Ordering::SeqCst) + 1;
                m2.fetch_max(now, Ordering::SeqCst);
                o2.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(60)).await;
                r2.fetch_sub(1, Ordering::SeqCst);
                Ok(i)
            })
            .await
        }
    });
    let engine = Engine::with_options(
        store.clone(),
        r,
        EngineOptions {
            max_running: Some(2),
            ..EngineOptions::default()
        },
    );
    let mut handles = Vec::new();
    for i in 0..6u32 {
        handles.push(engine.start("job", &i).await.unwrap());
    }
    let pending = store
        .list_runs(RunFilter {
            status: Some(RunStatus::Pending),
            limit: None,
        })
        .await
        .unwrap();
    assert!(
        pending.len() >= 3,
        "queued runs are recorded as pending: {}",
        pending.len()
    );
    // A run that got its slot is recorded as running (regression: its row stayed `pending`).
    let t = Instant::now();
    loop {
        let running = store
            .list_runs(RunFilter {
                status: Some(RunStatus::Running),
                limit: None,
            })
            .await
            .unwrap();
        if !running.is_empty() {
            assert!(running.len() <= 2);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no run was ever recorded as running"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for h in handles {
        assert_eq!(h.wait().await.unwrap().status, RunStatus::Completed);
    }
    assert!(max.load(Ordering::SeqCst) <= 2);
    // Slots go to queued runs in creation order. Two runs admitted by slots that free up at
    // the same moment (runs 0 and 1 finish together) may begin their first step in either
    // order, so a run may be one place off, never more.
    let order = order.lock().unwrap().clone();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..6).collect::<Vec<u32>>());
    for (k, v) in order.iter().enumerate() {
        assert!(
            (i64::from(*v) - k as i64).abs() <= 1,
            "started out of order: {order:?}"
        );
    }
}

#[tokio::test]
async fn the_step_names_of_waits_cannot_collide_with_steps() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), sleeper(), opts(60_000));
    let h = engine.start("sleeper", &2000u64).await.unwrap();
    let id = h.id;
    tokio::time::sleep(Duration::from_millis(200)).await;
    engine.shutdown();
    h.wait().await.unwrap();
    // Today's code has a step where the history has a sleep.
    let mut r = Registry::new();
    r.register("sleeper", 1, |ctx, _ms: u64| async move {
        ctx.step("before", || async { Ok(1) }).await?;
        ctx.step("instead", || async { Ok(2) }).await?;
        Ok::<_, WorkflowError>(0i64)
    });
    let err = Engine::with_options(store, r, opts(60_000))
        .resume(id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("sleep") && err.to_string().contains("instead"),
        "{err}"
    );
}

#[tokio::test]
async fn a_run_timeout_fails_the_run_on_time_and_cancels_its_children() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), family(Arc::default()), opts(60_000));
    let mut o = cairn_engine::StartOptions::new("forever", json!(null));
    o.timeout = Some(Duration::from_millis(300));
    let t = Instant::now();
    let out = engine.start_with(o).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Failed);
    assert!(out.error.unwrap().contains("timed out"));
    assert!(t.elapsed() < Duration::from_secs(3));
    let parent: RunId = out.run_id.parse().unwrap();
    let state = engine.load(parent).await.unwrap();
    assert!(state.deadline_us.is_some(), "the deadline is recorded");
    let child = state.children.values().next().unwrap().child;
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.run(child).await.unwrap().unwrap().status != RunStatus::Cancelled {
        assert!(Instant::now() < deadline, "the child was not cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_parked_run_is_woken_at_its_deadline_and_fails() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), approver(), opts(50));
    let mut o = cairn_engine::StartOptions::new("approve", json!(null));
    o.timeout = Some(Duration::from_millis(400));
    let out = engine.start_with(o).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Waiting);
    let id: RunId = out.run_id.parse().unwrap();
    let meta = store.run(id).await.unwrap().unwrap();
    assert!(
        meta.wake_at_us.is_some(),
        "parked with its deadline as the wake-up time"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let woken = engine.wake_due().await.unwrap();
    let out = woken
        .handles
        .into_iter()
        .next()
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Failed);
    assert!(out.error.unwrap().contains("timed out"));
}

#[tokio::test]
async fn cancelling_a_parked_run_removes_it_from_the_wakeup_index() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), sleeper(), opts(50));
    let out = finish(&engine, "sleeper", &300u64).await;
    assert_eq!(out.status, RunStatus::Waiting);
    let id: RunId = out.run_id.parse().unwrap();
    assert!(store.next_wakeup().await.unwrap().is_some());
    assert_eq!(
        engine.cancel(id, "no").await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        store.next_wakeup().await.unwrap(),
        None,
        "regression: a cancelled run stayed in the index"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(engine.wake_due().await.unwrap().handles.is_empty());
}

#[tokio::test]
async fn a_child_does_not_wait_for_a_run_slot_its_parent_holds() {
    let (_d, store) = store();
    let engine = Engine::with_options(
        store.clone(),
        family(Arc::default()),
        EngineOptions {
            max_running: Some(1),
            ..opts(60_000)
        },
    );
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        engine.start("parent", &5u32).await.unwrap().wait(),
    )
    .await
    .expect("regression: the child queued behind its own parent's slot")
    .unwrap();
    assert_eq!(out.output, Some(json!({"doubled": 10, "failed": true})));
}

#[tokio::test]
async fn cancelling_a_parked_child_wakes_its_parked_parent() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), family(Arc::default()), opts(50));
    let out = finish(&engine, "forever", &()).await;
    assert_eq!(out.status, RunStatus::Waiting);
    let parent: RunId = out.run_id.parse().unwrap();
    let child = engine
        .load(parent)
        .await
        .unwrap()
        .children
        .values()
        .next()
        .unwrap()
        .child;
    assert_eq!(
        engine.cancel(child, "not needed").await.unwrap(),
        CancelOutcome::Cancelled
    );
    let t = Instant::now();
    while store.run(parent).await.unwrap().unwrap().status != RunStatus::Failed {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the parent was not woken"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = engine.load(parent).await.unwrap();
    assert!(state.error.unwrap().contains("cancelled"));
}

#[tokio::test]
async fn a_child_that_completes_wakes_its_parked_parent() {
    let (_d, store) = store();
    let engine = Engine::with_options(store.clone(), family(Arc::default()), opts(50));
    // Both park (the child's sleep and the parent's wait outlast 50 ms); the timer service
    // wakes the child, and the child's completion must wake the parent.
    let out = finish(&engine, "awaits_nap", &400u64).await;
    assert_eq!(out.status, RunStatus::Waiting);
    let parent: RunId = out.run_id.parse().unwrap();
    let timers = engine.clone();
    tokio::spawn(async move { timers.serve_timers(|_| {}, |_, _| {}).await });
    let t = Instant::now();
    while store.run(parent).await.unwrap().unwrap().status != RunStatus::Completed {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the parent was not woken"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = engine.load(parent).await.unwrap();
    assert_eq!(state.output.unwrap().to_typed::<u32>().unwrap(), 8);
}

#[tokio::test]
async fn a_child_of_an_unknown_workflow_fails_the_call_and_the_outcome_is_recorded() {
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("orphan", 1, |ctx, _: ()| async move {
        let res = ctx.child::<_, u32>("nope", &()).await;
        Ok(res.map_err(|e| e.to_string()).err().unwrap_or_default())
    });
    let engine = Engine::with_options(store.clone(), r, opts(60_000));
    let out = finish(&engine, "orphan", &()).await;
    let msg = out.output.unwrap().as_str().unwrap().to_string();
    assert!(msg.contains("no workflow named `nope`"), "{msg}");
    let state = engine.load(out.run_id.parse().unwrap()).await.unwrap();
    let c = state.children.values().next().unwrap();
    assert_eq!(
        c.ok,
        Some(false),
        "recorded, so a resume does not try again"
    );
}
