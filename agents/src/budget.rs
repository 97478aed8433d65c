//! A per-run budget of tokens and cost, shared by the agents of a run.
//!
//! Before each model call an agent checks the budget; once it is crossed, the agent records a
//! `budget_exhausted` step (what was spent, what the limit was) and waits for the `budget`
//! signal, so the run stops cleanly (parked, `waiting`) and continues once the budget is
//! raised: `cairn signal RUN budget --data '{"max_cost_usd": 5}'`. Spending is re-added when
//! recorded calls are replayed, so a resumed run knows what it spent without a counter of its
//! own; and where the run replays its history, the history decides whether a check stopped it.

use std::sync::Mutex;

use cairn_engine::{StepError, WorkflowContext, WorkflowError};
use serde::{Deserialize, Serialize};

use crate::model::Usage;

/// New limits sent with the `budget` signal; a field left out keeps its limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetLimits {
    /// The most tokens (input + output, cache included) the run may use.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// The most the run may cost, in US dollars (needs agent prices).
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
}

/// What the run had spent when it stopped (output of a `budget_exhausted` step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetExhausted {
    /// Tokens used so far.
    pub spent_tokens: u64,
    /// Cost so far.
    pub spent_cost_usd: f64,
    /// The limits in force.
    pub limits: BudgetLimits,
}

#[derive(Default)]
struct Spent {
    tokens: u64,
    cost_usd: f64,
    limits: BudgetLimits,
}

/// A run's budget; share one (in an `Arc`) between the agents of a workflow.
pub struct Budget {
    spent: Mutex<Spent>,
}

impl Budget {
    /// A budget with these limits.
    pub fn new(limits: BudgetLimits) -> Self {
        Budget {
            spent: Mutex::new(Spent {
                limits,
                ..Spent::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Spent> {
        self.spent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one call's usage and cost.
    pub(crate) fn add(&self, usage: &Usage, cost_usd: Option<f64>) {
        let mut s = self.lock();
        s.tokens += usage.total_tokens();
        s.cost_usd += cost_usd.unwrap_or(0.0);
    }

    /// Adds spending recorded elsewhere (e.g. by finished items of a resumed batch, whose
    /// calls are not replayed).
    pub(crate) fn add_spent(&self, tokens: u64, cost_usd: f64) {
        let mut s = self.lock();
        s.tokens += tokens;
        s.cost_usd += cost_usd;
    }

    /// Tokens and cost spent so far in this execution (replayed calls included).
    pub fn spent(&self) -> (u64, f64) {
        let s = self.lock();
        (s.tokens, s.cost_usd)
    }

    fn exhausted(&self) -> Option<BudgetExhausted> {
        let s = self.lock();
        let over_tokens = s.limits.max_tokens.is_some_and(|m| s.tokens >= m);
        let over_cost = s.limits.max_cost_usd.is_some_and(|m| s.cost_usd >= m);
        (over_tokens || over_cost).then_some(BudgetExhausted {
            spent_tokens: s.tokens,
            spent_cost_usd: s.cost_usd,
            limits: s.limits,
        })
    }

    /// What was spent and the limits, now.
    fn snapshot(&self) -> BudgetExhausted {
        let s = self.lock();
        BudgetExhausted {
            spent_tokens: s.tokens,
            spent_cost_usd: s.cost_usd,
            limits: s.limits,
        }
    }

    /// Before a model call: while the budget is crossed, record why and wait for the `budget`
    /// signal with raised limits. While the run replays its history, the history decides: a
    /// recorded stop is replayed and a recorded call means the check passed, whatever the
    /// spending adds up to now (concurrent items may have reached this point in another order,
    /// or a resumed batch may count its finished items differently), so a resumed run never
    /// diverges from its own history here.
    pub(crate) async fn check(&self, ctx: &WorkflowContext) -> Result<(), WorkflowError> {
        loop {
            let ex = match ctx.recorded_next() {
                Some(name) if name == "budget_exhausted" => self.snapshot(),
                Some(_) => return Ok(()),
                None => match self.exhausted() {
                    Some(ex) => ex,
                    None => return Ok(()),
                },
            };
            ctx.step(
                "budget_exhausted",
                move || async move { Ok::<_, StepError>(ex) },
            )
            .await?;
            let raised: Option<BudgetLimits> = ctx.wait_signal("budget", None).await?;
            if let Some(r) = raised {
                let mut s = self.lock();
                if r.max_tokens.is_some() {
                    s.limits.max_tokens = r.max_tokens;
                }
                if r.max_cost_usd.is_some() {
                    s.limits.max_cost_usd = r.max_cost_usd;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use cairn_engine::{Engine, EngineOptions, Registry};
    use cairn_storage::{EventStore, RedbStore, RunId, RunStatus};

    use super::*;

    /// `spend` spends 150 tokens inside a step (so only when the step executes, not when it is
    /// replayed) against a limit of 100, then checks the budget and returns what it counts.
    fn engine(store: &Arc<dyn EventStore>) -> Engine {
        let mut r = Registry::new();
        r.register("spend", 1, |ctx, (): ()| async move {
            let b = Arc::new(Budget::new(BudgetLimits {
                max_tokens: Some(100),
                max_cost_usd: None,
            }));
            let live = Arc::clone(&b);
            ctx.step("work", move || async move {
                live.add_spent(150, 0.0);
                Ok::<_, StepError>(())
            })
            .await?;
            b.check(&ctx).await?;
            Ok::<_, WorkflowError>(b.spent().0)
        });
        Engine::with_options(
            Arc::clone(store),
            r,
            EngineOptions {
                suspend_after: Duration::from_millis(50),
                ..Default::default()
            },
        )
    }

    #[tokio::test]
    async fn a_replayed_check_follows_the_history_not_the_spending_it_counts_now() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn EventStore> =
            Arc::new(RedbStore::open(dir.path().join("b.redb")).unwrap());
        let out = engine(&store)
            .start("spend", &())
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(out.status, RunStatus::Waiting, "stopped by the budget");
        let id: RunId = out.run_id.parse().unwrap();

        // Resumed, the run counts 0 (the step that spent is replayed, not run), under the limit:
        // deciding again would let it through, and past its recorded stop.
        let e = engine(&store);
        let out = e.resume(id).await.unwrap().wait().await.unwrap();
        assert_eq!(out.status, RunStatus::Waiting, "{:?}", out.error);

        // Raised, it goes on.
        e.signal(id, "budget", serde_json::json!({ "max_tokens": 1000 }))
            .await
            .unwrap();
        let out = e.resume(id).await.unwrap().wait().await.unwrap();
        assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    }
}
