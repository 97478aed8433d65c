//! A per-run budget of tokens and cost, shared by the agents of a run.
//!
//! Before each model call an agent checks the budget; once it is crossed, the agent records a
//! `budget_exhausted` step (what was spent, what the limit was) and waits for the `budget`
//! signal, so the run stops cleanly (parked, `waiting`) and continues once the budget is
//! raised: `cairn signal RUN budget --data '{"max_cost_usd": 5}'`. Spending is re-added when
//! recorded calls are replayed, so a resumed run knows what it spent without a counter of its
//! own.

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

    /// Before a model call: while the budget is crossed, record why and wait for the `budget`
    /// signal with raised limits.
    pub(crate) async fn check(&self, ctx: &WorkflowContext) -> Result<(), WorkflowError> {
        while let Some(ex) = self.exhausted() {
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
        Ok(())
    }
}
