//! Retries, backoff, timeouts and fallbacks of durable steps, over a real redb file.

mod common;
use common::{finish, store};

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cairn_engine::{Engine, Event, Registry, RetryPolicy, StepError, StepOptions};
use cairn_storage::{EventStore, RunId, RunStatus, Seq};
use serde_json::json;

fn fast(attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(attempts)
        .with_initial_delay(Duration::from_millis(10))
        .with_jitter(false)
}

async fn events(store: &Arc<dyn EventStore>, id: &str) -> Vec<Event> {
    let id: RunId = id.parse().unwrap();
    store
        .read(id, Seq(0), 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| Event::decode(&e.payload).unwrap())
        .collect()
}

/// A workflow whose one step fails `fail_times` times (retryably unless `permanent`).
fn flaky_registry(calls: Arc<AtomicU32>, opts: StepOptions) -> Registry {
    let mut r = Registry::new();
    r.register(
        "flaky",
        1,
        move |ctx, (fail_times, permanent): (u32, bool)| {
            let calls = Arc::clone(&calls);
            let opts = opts.clone();
            async move {
                ctx.step_with("call", opts, || {
                    let calls = Arc::clone(&calls);
                    async move {
                        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                        if n <= fail_times {
                            if permanent {
                                return Err(StepError::msg("400 bad request"));
                            }
                            return Err(StepError::retryable(format!("503 unavailable #{n}")));
                        }
                        Ok(n)
                    }
                })
                .await
            }
        },
    );
    r
}

#[tokio::test]
async fn retryable_failures_are_retried_and_every_attempt_is_recorded() {
    let (_d, store) = store();
    let calls = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(
        store.clone(),
        flaky_registry(calls.clone(), StepOptions::retry(fast(5))),
    );
    let out = finish(&engine, "flaky", &(2, false)).await;
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(out.output, Some(json!(3)));
    let evs = events(&store, &out.run_id).await;
    let failed: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            Event::StepFailed {
                attempt,
                error,
                retry_at_us,
                started_us,
                ..
            } => Some((*attempt, error.clone(), *retry_at_us, *started_us)),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0].0, 1);
    assert!(failed[0].1.contains("503"));
    assert!(failed[0].2.is_some(), "a retry time is recorded");
    // The second delay is longer (exponential).
    let d1 = failed[0].2.unwrap() - failed[0].3;
    let d2 = failed[1].2.unwrap() - failed[1].3;
    assert!(d2 > d1, "{d1} then {d2}");
    assert!(matches!(evs[3], Event::StepCompleted { attempt: 3, .. }));
}

#[tokio::test]
async fn a_non_retryable_error_stops_at_once() {
    let (_d, store) = store();
    let calls = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(
        store.clone(),
        flaky_registry(calls.clone(), StepOptions::retry(fast(5))),
    );
    let out = finish(&engine, "flaky", &(10, true)).await;
    assert_eq!(out.status, RunStatus::Failed);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let evs = events(&store, &out.run_id).await;
    assert!(matches!(
        &evs[1],
        Event::StepFailed {
            retry_at_us: None,
            ..
        }
    ));
}

#[tokio::test]
async fn exhausted_retries_fail_the_step_for_good() {
    let (_d, store) = store();
    let calls = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(
        store.clone(),
        flaky_registry(calls.clone(), StepOptions::retry(fast(3))),
    );
    let out = finish(&engine, "flaky", &(10, false)).await;
    assert_eq!(out.status, RunStatus::Failed);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(out.error.unwrap().contains("503 unavailable #3"));
}

#[tokio::test]
async fn a_fallback_produces_the_result_and_the_log_says_so() {
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("fb", 1, |ctx, _: ()| async move {
        ctx.step_with_fallback(
            "summarize",
            StepOptions::retry(fast(2)),
            || async { Err::<String, _>(StepError::retryable("529 overloaded")) },
            || async { Ok("cheap model summary".to_string()) },
        )
        .await
    });
    let engine = Engine::with_store(store.clone(), r);
    let out = finish(&engine, "fb", &()).await;
    assert_eq!(out.output, Some(json!("cheap model summary")));
    let evs = events(&store, &out.run_id).await;
    let last_step = evs
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::StepCompleted { path, name, .. } => Some((path.to_string(), name.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        last_step,
        ("0.0".to_string(), "summarize.fallback".to_string())
    );
}

#[tokio::test]
async fn a_slow_attempt_times_out_and_the_retry_succeeds() {
    let (_d, store) = store();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut r = Registry::new();
    r.register("slow", 1, move |ctx, _: ()| {
        let c = c.clone();
        async move {
            ctx.step_with(
                "call",
                StepOptions::retry(fast(3)).with_attempt_timeout(Duration::from_millis(50)),
                || {
                    let c = c.clone();
                    async move {
                        if c.fetch_add(1, Ordering::SeqCst) == 0 {
                            tokio::time::sleep(Duration::from_secs(10)).await;
                        }
                        Ok("fast".to_string())
                    }
                },
            )
            .await
        }
    });
    let engine = Engine::with_store(store.clone(), r);
    let out = finish(&engine, "slow", &()).await;
    assert_eq!(out.output, Some(json!("fast")));
    let evs = events(&store, &out.run_id).await;
    assert!(
        matches!(&evs[1], Event::StepFailed { error, retry_at_us: Some(_), .. } if error.contains("attempt timed out"))
    );
}

#[tokio::test]
async fn a_step_timeout_bounds_all_attempts_and_backoff() {
    let (_d, store) = store();
    let calls = Arc::new(AtomicU32::new(0));
    let opts = StepOptions::retry(
        RetryPolicy::exponential(1000)
            .with_initial_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_millis(20)),
    )
    .with_step_timeout(Duration::from_millis(300));
    let engine = Engine::with_store(store.clone(), flaky_registry(calls.clone(), opts));
    let t = std::time::Instant::now();
    let out = finish(&engine, "flaky", &(100_000, false)).await;
    assert_eq!(out.status, RunStatus::Failed);
    assert!(t.elapsed() < Duration::from_secs(3));
    let n = calls.load(Ordering::SeqCst);
    assert!(
        n > 2 && n < 100,
        "{n} attempts in 300 ms with 20-40 ms delays"
    );
}

#[tokio::test]
async fn a_restart_during_backoff_waits_only_the_remaining_time() {
    let (_d, store) = store();
    let calls = Arc::new(AtomicU32::new(0));
    let opts = StepOptions::retry(
        RetryPolicy::exponential(3)
            .with_initial_delay(Duration::from_millis(1500))
            .with_jitter(false),
    );
    let engine = Engine::with_store(store.clone(), flaky_registry(calls.clone(), opts.clone()));
    let h = engine.start("flaky", &(1, false)).await.unwrap();
    let id = h.id;
    // Wait for the failed attempt to be recorded, then stop the process mid-backoff.
    while store.run(id).await.unwrap().unwrap().events < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    engine.shutdown();
    h.wait().await.unwrap();
    let evs = events(&store, &id.to_string()).await;
    let Event::StepFailed {
        retry_at_us: Some(retry_at),
        ..
    } = evs[1]
    else {
        panic!("{evs:?}")
    };
    let engine2 = Engine::with_store(store.clone(), flaky_registry(calls.clone(), opts));
    let out = engine2.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    let evs = events(&store, &id.to_string()).await;
    let started = evs
        .iter()
        .find_map(|e| match e {
            Event::StepCompleted {
                attempt: 2,
                started_us,
                ..
            } => Some(*started_us),
            _ => None,
        })
        .unwrap();
    assert!(started >= retry_at, "not before the recorded retry time");
    assert!(
        started < retry_at + 400_000,
        "the remaining wait, not a fresh 1.5 s: started {} µs after retry_at",
        started - retry_at
    );
}

#[tokio::test]
async fn a_retry_after_from_the_source_lengthens_the_backoff() {
    let (_d, store) = store();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut r = Registry::new();
    r.register("polite", 1, move |ctx, _: ()| {
        let c = c.clone();
        async move {
            ctx.step_with("call", StepOptions::retry(fast(2)), || {
                let c = c.clone();
                async move {
                    if c.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(StepError::retryable_after(
                            "429 rate limited",
                            Duration::from_millis(700),
                        ));
                    }
                    Ok(1u32)
                }
            })
            .await
        }
    });
    let engine = Engine::with_store(store.clone(), r);
    let out = finish(&engine, "polite", &()).await;
    assert_eq!(out.status, RunStatus::Completed);
    let evs = events(&store, &out.run_id).await;
    let Event::StepFailed {
        started_us,
        retry_at_us: Some(retry_at),
        ..
    } = &evs[1]
    else {
        panic!("{evs:?}")
    };
    assert!(
        retry_at - started_us >= 700_000,
        "the server's 700 ms wins over the policy's 10 ms"
    );
}

#[tokio::test]
async fn scopes_group_steps_below_a_recorded_position() {
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("scoped", 1, |ctx, _: ()| async move {
        let a = ctx.scope("agent:a").await?;
        a.step("model", || async { Ok(1u32) }).await?;
        a.step("tool", || async { Ok(2u32) }).await?;
        let b = ctx.scope("agent:b").await?;
        b.step("model", || async { Ok(3u32) }).await
    });
    let engine = Engine::with_store(store.clone(), r);
    let out = finish(&engine, "scoped", &()).await;
    assert_eq!(out.output, Some(serde_json::json!(3)));
    let paths: Vec<(String, String)> = events(&store, &out.run_id)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::StepCompleted { path, name, .. } => Some((path.to_string(), name)),
            _ => None,
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("0", "cairn.scope:agent:a"),
        ("0.0", "model"),
        ("0.1", "tool"),
        ("1", "cairn.scope:agent:b"),
        ("1.0", "model"),
    ]
    .iter()
    .map(|(p, n)| (p.to_string(), n.to_string()))
    .collect();
    assert_eq!(paths, want);
}

/// `charge` is at-most-once; its first attempt blocks until the gate opens (so a shutdown can
/// land while it runs).
fn payments(calls: Arc<AtomicU32>, gate: Arc<tokio::sync::Notify>) -> Registry {
    let mut r = Registry::new();
    r.register("pay", 1, move |ctx, _: ()| {
        let (calls, gate) = (calls.clone(), gate.clone());
        async move {
            let receipt: String = ctx
                .step_with("charge", StepOptions::default().at_most_once(), || {
                    let (calls, gate) = (calls.clone(), gate.clone());
                    async move {
                        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                            gate.notified().await;
                        }
                        Ok("receipt-live".to_string())
                    }
                })
                .await?;
            Ok(receipt)
        }
    });
    r
}

async fn interrupted_payment() -> (
    tempfile::TempDir,
    Arc<dyn EventStore>,
    RunId,
    Arc<AtomicU32>,
) {
    let (d, store) = store();
    let calls = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let engine = Engine::with_store(store.clone(), payments(calls.clone(), gate));
    let h = engine.start("pay", &()).await.unwrap();
    let id = h.id;
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown();
    h.wait().await.unwrap();
    (d, store, id, calls)
}

#[tokio::test]
async fn an_interrupted_at_most_once_step_parks_for_review_and_is_not_run_again() {
    let (_d, store, id, calls) = interrupted_payment().await;
    let evs = events(&store, &id.to_string()).await;
    assert!(
        evs.iter().any(|e| matches!(e, Event::StepStarted { .. })),
        "the start is durable"
    );
    let gate = Arc::new(tokio::sync::Notify::new());
    let engine = Engine::with_store(store.clone(), payments(calls.clone(), gate));
    let out = engine.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Waiting, "parked, needing review");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not run a second time");
    let reason = evs_reason(&store, id).await;
    assert!(
        reason.contains("needs review") && reason.contains("cairn review"),
        "{reason}"
    );
    // A person checked: the charge went through.
    let path: cairn_engine::StepPath = "0".parse().unwrap();
    engine
        .resolve_step(
            id,
            &path,
            cairn_engine::StepResolution::Done(serde_json::json!("receipt-42")),
        )
        .await
        .unwrap();
    let out = engine.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.output, Some(serde_json::json!("receipt-42")));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Resolving a step that does not need review is refused.
    assert!(
        engine
            .resolve_step(id, &path, cairn_engine::StepResolution::Retry)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_reviewed_step_marked_for_retry_runs_again() {
    let (_d, store, id, calls) = interrupted_payment().await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let engine = Engine::with_store(store.clone(), payments(calls.clone(), gate));
    assert_eq!(
        engine
            .resume(id)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap()
            .status,
        RunStatus::Waiting
    );
    let path: cairn_engine::StepPath = "0".parse().unwrap();
    engine
        .resolve_step(id, &path, cairn_engine::StepResolution::Retry)
        .await
        .unwrap();
    let out = engine.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.output, Some(serde_json::json!("receipt-live")));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "run again on request");
}

async fn evs_reason(store: &Arc<dyn EventStore>, id: RunId) -> String {
    events(store, &id.to_string())
        .await
        .into_iter()
        .rev()
        .find_map(|e| match e {
            Event::RunSuspended { reason, .. } => Some(reason),
            _ => None,
        })
        .unwrap_or_default()
}
