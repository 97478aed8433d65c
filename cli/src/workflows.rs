//! The workflows built into the `cairn` binary: the demo batch analysis and the `steps`
//! workload used by benchmarks and crash tests.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_engine::{Registry, StepError, WorkflowError};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Live progress of the demo, shared between the workflow and the progress display.
#[derive(Default)]
pub struct Progress {
    /// Items finished (replayed or executed) in this process.
    pub items_done: AtomicU64,
    /// Items whose steps were all answered from the log.
    pub items_replayed: AtomicU64,
    /// Total items of the run.
    pub items_total: AtomicU64,
}

/// The demo's input.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoInput {
    /// How many tickets to analyse.
    #[serde(default = "default_items")]
    pub items: u32,
    /// How long each step works, in milliseconds (so the run can be interrupted).
    #[serde(default = "default_step_ms")]
    pub step_ms: u64,
}

fn default_items() -> u32 {
    300
}
fn default_step_ms() -> u64 {
    5
}

const SUBJECTS: [&str; 8] = [
    "cannot log in after password reset",
    "charged twice for the annual plan",
    "export to CSV times out on large projects",
    "feature request: dark mode for the dashboard",
    "API returns 500 when the payload has unicode",
    "refund still not received after two weeks",
    "invite link expired before my colleague used it",
    "mobile app crashes when opening notifications",
];
const TONES: [&str; 4] = ["calm", "frustrated", "urgent", "polite"];

/// The synthetic ticket for item `i` (deterministic, so runs are comparable).
fn ticket(i: u32) -> serde_json::Value {
    let subject = SUBJECTS[(i as usize * 7 + 3) % SUBJECTS.len()];
    let tone = TONES[(i as usize * 5 + 1) % TONES.len()];
    json!({ "id": format!("T-{:05}", 1000 + i), "subject": subject, "tone": tone })
}

fn classify(subject: &str) -> &'static str {
    let s = subject.to_lowercase();
    if s.contains("charged") || s.contains("refund") || s.contains("plan") {
        "billing"
    } else if s.contains("log in") || s.contains("invite") || s.contains("password") {
        "account"
    } else if s.contains("request") {
        "feature"
    } else {
        "bug"
    }
}

async fn work(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// The `steps` workload's input.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepsInput {
    /// How many sequential steps.
    pub steps: u32,
    /// Roughly how many bytes each step's JSON output has.
    #[serde(default = "default_payload")]
    pub payload_bytes: usize,
    /// A file each step appends one line (`<index>\n`) to when it executes.
    #[serde(default)]
    pub side_effects: Option<String>,
    /// How long each step works, in milliseconds.
    #[serde(default)]
    pub step_ms: u64,
}

fn default_payload() -> usize {
    100
}

/// Registers the built-in workflows; `progress` receives the demo's progress.
pub fn registry(progress: Arc<Progress>) -> Registry {
    let mut r = Registry::new();
    r.register("demo", 1, move |ctx, input: DemoInput| {
        let progress = Arc::clone(&progress);
        async move {
            progress
                .items_total
                .store(u64::from(input.items), Ordering::Relaxed);
            let mut by_category = std::collections::BTreeMap::<String, u64>::new();
            let mut urgent = 0u64;
            let mut score_sum = 0u64;
            for i in 0..input.items {
                let replaying = ctx.is_replaying();
                let ms = input.step_ms;
                let t = ticket(i);
                let subject = t["subject"].as_str().unwrap_or_default().to_string();
                let tone = t["tone"].as_str().unwrap_or_default().to_string();
                let fetched: serde_json::Value = ctx
                    .step("fetch", || async move {
                        work(ms).await;
                        Ok(t)
                    })
                    .await?;
                let category: String = ctx
                    .step("classify", || async move {
                        work(ms).await;
                        Ok(classify(&subject).to_string())
                    })
                    .await?;
                let score: u64 = ctx
                    .step("score", || async move {
                        work(ms).await;
                        let base = match tone.as_str() {
                            "urgent" => 90,
                            "frustrated" => 70,
                            "calm" => 30,
                            _ => 20,
                        };
                        Ok(base + u64::from(i % 10))
                    })
                    .await?;
                let _ = fetched;
                *by_category.entry(category).or_default() += 1;
                if score >= 80 {
                    urgent += 1;
                }
                score_sum += score;
                progress.items_done.fetch_add(1, Ordering::Relaxed);
                if replaying {
                    progress.items_replayed.fetch_add(1, Ordering::Relaxed);
                }
            }
            let avg = if input.items == 0 {
                0.0
            } else {
                score_sum as f64 / f64::from(input.items)
            };
            Ok::<_, WorkflowError>(json!({
                "items": input.items,
                "by_category": by_category,
                "urgent": urgent,
                "avg_urgency": (avg * 100.0).round() / 100.0,
            }))
        }
    });
    r.register("steps", 1, |ctx, input: StepsInput| async move {
        let filler = "x".repeat(input.payload_bytes.saturating_sub(40));
        let mut checksum = 0u64;
        for i in 0..input.steps {
            let side = input.side_effects.clone();
            let filler = filler.clone();
            let ms = input.step_ms;
            let v: serde_json::Value = ctx
                .step("step", move || async move {
                    work(ms).await;
                    if let Some(path) = side {
                        let mut f = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path)
                            .map_err(|e| StepError::msg(format!("side-effect file {path}: {e}")))?;
                        // One write for the whole line, so a kill cannot leave half of it.
                        f.write_all(format!("{i}\n").as_bytes())?;
                    }
                    Ok(json!({ "i": i, "square": u64::from(i) * u64::from(i), "pad": filler }))
                })
                .await?;
            checksum = checksum.wrapping_add(v["square"].as_u64().unwrap_or(0));
        }
        Ok::<_, WorkflowError>(json!({ "steps": input.steps, "checksum": checksum }))
    });
    register_scheduler_workloads(&mut r);
    r
}

/// The `fanout` workload's input.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanoutInput {
    /// How many branches.
    pub branches: u32,
    /// How many run at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// A file each branch appends `<index>\n` to when its step executes.
    #[serde(default)]
    pub side_effects: Option<String>,
    /// How long each branch's step works, in milliseconds.
    #[serde(default)]
    pub step_ms: u64,
    /// Branches whose index is a multiple of this fail (0: none).
    #[serde(default)]
    pub fail_every: u32,
    /// At least this many branches must succeed (0: all must).
    #[serde(default)]
    pub min_required: u32,
}

fn default_concurrency() -> usize {
    32
}

/// The `flaky` workload's input: one step that fails `failures` times before it succeeds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlakyInput {
    /// A file counting attempts (one line per attempt): the step fails while it has fewer
    /// than `failures` lines.
    pub attempts_file: String,
    /// How many attempts fail.
    pub failures: u32,
    /// The first retry delay, in milliseconds (doubles each retry, no jitter).
    pub backoff_ms: u64,
}

/// The `sleepy` workload's input: a step, a durable sleep, a step.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepyInput {
    /// How long to sleep, in milliseconds.
    pub sleep_ms: u64,
}

/// The `approval` workload's input: a step, then a wait for the `approve` signal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalInput {
    /// How long to wait for the signal, in milliseconds (none: forever).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

fn append_line(path: &str, line: &str) -> Result<(), StepError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| StepError::msg(format!("side-effect file {path}: {e}")))?;
    // One write for the whole line, so a kill cannot leave half of it.
    f.write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}

/// Registers the workloads of the scheduler: fan-out, retries, sleeps and signals.
fn register_scheduler_workloads(r: &mut Registry) {
    use cairn_engine::{FanOutOptions, JoinPolicy, RetryPolicy, StepOptions};
    r.register("fanout", 1, |ctx, input: FanoutInput| async move {
        let join = if input.min_required > 0 {
            JoinPolicy::AtLeast(input.min_required)
        } else {
            JoinPolicy::All
        };
        let side = input.side_effects.clone();
        let (ms, fail_every) = (input.step_ms, input.fail_every);
        let fan = ctx
            .fan_out(
                "branches",
                (0..input.branches).collect(),
                FanOutOptions::new(input.concurrency).join(join),
                move |b, i: u32| {
                    let side = side.clone();
                    async move {
                        b.step("work", move || async move {
                            work(ms).await;
                            if let Some(path) = side {
                                append_line(&path, &i.to_string())?;
                            }
                            if fail_every > 0 && i.is_multiple_of(fail_every) {
                                return Err(StepError::msg(format!("item {i} is malformed")));
                            }
                            Ok(u64::from(i) * u64::from(i))
                        })
                        .await
                    }
                },
            )
            .await?;
        let sum: u64 = fan.successes().map(|(_, v)| *v).sum();
        let failed: Vec<usize> = fan.failures().map(|(i, _)| i).collect();
        Ok::<_, WorkflowError>(json!({
            "branches": input.branches,
            "succeeded": fan.successes().count(),
            "failed": failed.len(),
            "sum": sum,
        }))
    });
    r.register("flaky", 1, |ctx, input: FlakyInput| async move {
        let policy = RetryPolicy::exponential(input.failures + 1)
            .with_initial_delay(Duration::from_millis(input.backoff_ms))
            .with_max_delay(Duration::from_secs(3600))
            .with_jitter(false);
        let file = input.attempts_file.clone();
        let failures = input.failures;
        let attempts: u32 = ctx
            .step_with("call", StepOptions::retry(policy), move || {
                let file = file.clone();
                async move {
                    append_line(&file, "attempt")?;
                    let n = std::fs::read_to_string(&file)
                        .map(|t| t.lines().count() as u32)
                        .unwrap_or(0);
                    if n <= failures {
                        return Err(StepError::retryable(format!(
                            "503 service unavailable (attempt {n})"
                        )));
                    }
                    Ok(n)
                }
            })
            .await?;
        Ok::<_, WorkflowError>(json!({ "attempts": attempts }))
    });
    r.register("sleepy", 1, |ctx, input: SleepyInput| async move {
        let before = ctx.now().await?;
        ctx.step("before", || async { Ok(()) }).await?;
        ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        let after = ctx.now().await?;
        Ok::<_, WorkflowError>(json!({
            "slept_ms": (after - before).num_milliseconds(),
        }))
    });
    r.register("approval", 1, |ctx, input: ApprovalInput| async move {
        let draft: String = ctx
            .step("draft", || async {
                Ok("refund T-1042 for 40 EUR".to_string())
            })
            .await?;
        let decision: Option<serde_json::Value> = ctx
            .wait_signal("approve", input.timeout_ms.map(Duration::from_millis))
            .await?;
        Ok::<_, WorkflowError>(json!({ "draft": draft, "decision": decision }))
    });
}
