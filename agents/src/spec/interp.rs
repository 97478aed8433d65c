//! The interpreter of workflow files: builds the declared models, tools, agents and routers
//! for a run, then runs the flow's steps on the engine (agent and router steps through the
//! agent layer, `for_each` as a durable fan-out), and [`FlowFollower`], which reads a run's
//! item results and spending back from its log.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_engine::{
    Event, FanOutOptions, Interrupt, JoinPolicy, RetryPolicy, StepPath, WorkflowContext,
    WorkflowError,
};
use cairn_storage::{EventStore, RunId, Seq, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::builtin;
use super::validate::{FlowDef, Provider, StepDef, StepKind};
use super::{FlowEnv, FlowInput, FlowSpec};
use crate::agent::{Agent, AgentRun};
use crate::anthropic::AnthropicModel;
use crate::budget::Budget;
use crate::model::{Model, Usage};
use crate::openai::OpenAiModel;
use crate::orchestration::{HandoffMode, Router, handoff_metered};
use crate::scripted::ScriptedModel;
use crate::tools::ToolRegistry;

/// What a run of a workflow file has built: its models, agents and routers.
struct Built {
    models: HashMap<String, (Arc<dyn Model>, String)>,
    /// The models' prices, where the file gives one.
    prices: HashMap<String, crate::agent::Price>,
    agents: HashMap<String, Agent>,
    routers: HashMap<String, Router>,
    /// The run's `[budget]`, shared by its agents and routers.
    budget: Option<Arc<Budget>>,
}

impl Built {
    fn new(def: &FlowDef, env: &FlowEnv, base_dir: &Path) -> Result<Built, String> {
        let mut models = HashMap::new();
        for (name, m) in &def.models {
            let model: Arc<dyn Model> = match env.models.get(name) {
                Some(replacement) => Arc::clone(replacement),
                None => build_model(name, m, base_dir, env.checking)?,
            };
            models.insert(name.clone(), (model, m.model.clone()));
        }
        let mut tools = HashMap::new();
        for (name, t) in &def.tools {
            tools.insert(name.clone(), builtin::build(name, t, base_dir)?);
        }
        let budget = def.budget.map(|b| Arc::new(Budget::new(b)));
        let mut agents = HashMap::new();
        for (name, a) in &def.agents {
            let (model, model_id) = models
                .get(&a.model)
                .ok_or_else(|| format!("agent `{name}`: model `{}` is not built", a.model))?;
            let mut registry = ToolRegistry::new();
            for t in &a.tools {
                let tool = tools
                    .get(t)
                    .cloned()
                    .or_else(|| env.tools.get(t).cloned())
                    .ok_or_else(|| format!("agent `{name}`: tool `{t}` is not registered"))?;
                registry = registry.with(tool);
            }
            let mut agent = Agent::new(name, Arc::clone(model), model_id).tools(registry);
            if let Some(s) = &a.system {
                agent = agent.system(s);
            }
            if let Some(n) = a.max_turns {
                agent = agent.max_turns(n);
            }
            if let Some(n) = a.max_tokens {
                agent = agent.max_tokens(n);
            }
            if let Some(t) = a.temperature {
                agent = agent.temperature(t);
            }
            if let Some(r) = a.retry {
                agent = agent.retry(
                    RetryPolicy::exponential(r.attempts)
                        .with_initial_delay(Duration::from_millis(
                            r.initial_delay_ms.unwrap_or(1000),
                        ))
                        .with_max_delay(Duration::from_millis(r.max_delay_ms.unwrap_or(60_000))),
                );
            }
            if let Some(p) = def.models.get(&a.model).and_then(|m| m.price) {
                agent = agent.price(p);
            }
            if let Some(b) = &budget {
                agent = agent.budget(Arc::clone(b));
            }
            agents.insert(name.clone(), agent);
        }
        let mut routers = HashMap::new();
        for (name, r) in &def.routers {
            let (model, model_id) = models
                .get(&r.model)
                .ok_or_else(|| format!("router `{name}`: model `{}` is not built", r.model))?;
            let mut router = Router::new(name, Arc::clone(model), model_id);
            if let Some(p) = def.models.get(&r.model).and_then(|m| m.price) {
                router = router.price(p);
            }
            if let Some(b) = &budget {
                router = router.budget(Arc::clone(b));
            }
            for (cat, (agent, description)) in &r.routes {
                let a = agents
                    .get(agent)
                    .ok_or_else(|| format!("router `{name}`: agent `{agent}` is not built"))?;
                router = router.route(cat, description, a.clone());
            }
            if let Some(f) = &r.fallback {
                let a = agents
                    .get(f)
                    .ok_or_else(|| format!("router `{name}`: agent `{f}` is not built"))?;
                router = router.fallback(a.clone());
            }
            routers.insert(name.clone(), router);
        }
        let prices = def
            .models
            .iter()
            .filter_map(|(name, m)| Some((name.clone(), m.price?)))
            .collect();
        Ok(Built {
            models,
            prices,
            agents,
            routers,
            budget,
        })
    }

    fn agent(&self, name: &str) -> Result<&Agent, WorkflowError> {
        self.agents
            .get(name)
            .ok_or_else(|| WorkflowError::msg(format!("agent `{name}` is not declared")))
    }
}

fn build_model(
    name: &str,
    m: &super::validate::ModelDef,
    base_dir: &Path,
    checking: bool,
) -> Result<Arc<dyn Model>, String> {
    let timeout = Duration::from_secs(m.timeout_secs.unwrap_or(300));
    let key = |default: &str| -> Result<Option<String>, String> {
        let var = m.api_key_env.as_deref().unwrap_or(default);
        match std::env::var(var) {
            Ok(k) if !k.trim().is_empty() => Ok(Some(k)),
            _ if checking => Ok(None),
            _ if m.api_key_env.is_some() || default == AnthropicModel::API_KEY_ENV => Err(format!(
                "model `{name}` (provider {}) needs an API key in ${var}",
                match m.provider {
                    Provider::Anthropic => "anthropic",
                    _ => "openai",
                }
            )),
            _ => Ok(None),
        }
    };
    Ok(match m.provider {
        Provider::Anthropic => {
            let k = key(AnthropicModel::API_KEY_ENV)?.unwrap_or_default();
            let mut model = AnthropicModel::new(k).with_timeouts(Duration::from_secs(10), timeout);
            if let Some(u) = &m.base_url {
                model = model.with_base_url(u);
            }
            Arc::new(model)
        }
        Provider::OpenAi => {
            let url = m
                .base_url
                .as_deref()
                .unwrap_or(OpenAiModel::OPENAI_BASE_URL);
            let mut model = OpenAiModel::new(url).with_timeouts(Duration::from_secs(10), timeout);
            if let Some(k) = key(OpenAiModel::API_KEY_ENV)? {
                model = model.with_api_key(k);
            }
            Arc::new(model)
        }
        Provider::Recorded => {
            let file = base_dir.join(m.responses.as_deref().unwrap_or_default());
            let model = ScriptedModel::from_jsonl(&file)
                .map_err(|e| format!("model `{name}`: {}", e.message))?;
            Arc::new(Paced {
                inner: model,
                delay: Duration::from_millis(m.latency_ms),
            })
        }
    })
}

/// Builds everything a run of `def` needs, to report what is missing before a run starts.
pub(crate) fn check_runnable(def: &FlowDef, env: &FlowEnv, file: &Path) -> Result<(), String> {
    let base_dir = file.parent().unwrap_or(Path::new("."));
    Built::new(def, env, base_dir).map(|_| ())
}

/// Recorded answers given after a pause, as a live model would (to rehearse a batch's pacing,
/// or interrupt it, offline).
struct Paced {
    inner: ScriptedModel,
    delay: Duration,
}

impl Model for Paced {
    fn provider(&self) -> &str {
        "recorded"
    }

    fn call(
        &self,
        req: crate::model::ModelRequest,
    ) -> cairn_storage::BoxFuture<'_, Result<crate::model::ModelResponse, crate::model::ModelError>>
    {
        let answer = self.inner.call(req);
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            answer.await
        })
    }
}

/// Template variables and handoff sources visible to the next step. Cloned into every branch of
/// a `for_each`, so the conversations are shared, not copied.
#[derive(Clone)]
struct Scope {
    vars: Value,
    runs: HashMap<String, Arc<AgentRun>>,
    /// Tokens and dollars the agent and router steps of this scope spent (what `[budget]`
    /// counts), recorded with a `for_each` item's outcome.
    spent: (u64, f64),
}

impl Scope {
    fn spend(&mut self, run: &AgentRun) {
        self.spent.0 += run.usage.total_tokens();
        self.spent.1 += run.cost_usd.unwrap_or(0.0);
    }

    fn record(&mut self, id: &str, value: Value, run: Option<AgentRun>) {
        if let Some(steps) = self.vars.get_mut("steps").and_then(Value::as_object_mut) {
            steps.insert(id.to_string(), value);
        }
        if let Some(r) = run {
            self.runs.insert(id.to_string(), Arc::new(r));
        }
    }
}

/// Runs a workflow file's flow: the function behind every `file:<name>` workflow.
pub(crate) async fn run(
    ctx: WorkflowContext,
    input: FlowInput,
    env: FlowEnv,
) -> Result<Value, WorkflowError> {
    let run_id = ctx.run_id();
    let unavailable = |detail: String| {
        WorkflowError::Interrupted(Interrupt::Unavailable {
            run: run_id,
            detail,
        })
    };
    let input = match env.spec_for(run_id) {
        Some(spec) => FlowInput { spec, ..input },
        None => input,
    };
    let spec = FlowSpec::from_input(&input, &env)
        .map_err(|e| unavailable(format!("its workflow file does not validate here:\n{e}")))?;
    let base_dir = Path::new(&input.file)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let built = Arc::new(Built::new(&spec.def, &env, &base_dir).map_err(unavailable)?);
    let mut scope = Scope {
        vars: json!({ "input": input.params, "steps": {} }),
        runs: HashMap::new(),
        spent: (0, 0.0),
    };
    let items = Arc::new(input.items);
    let mut summary = serde_json::Map::new();
    for step in &spec.def.steps {
        let value = match &step.kind {
            StepKind::ForEach {
                concurrency,
                min_required,
                key,
                steps,
                ..
            } => {
                let (v, _) = for_each(
                    &ctx,
                    step,
                    (*concurrency, *min_required, key.clone()),
                    Arc::new(steps.clone()),
                    &built,
                    &scope,
                    &items,
                )
                .await?;
                scope.record(&step.id, v.clone(), None);
                let mut shown = v;
                if let Some(o) = shown.as_object_mut() {
                    // The per-item results are in the output file and the log; the run's
                    // output keeps the counts.
                    o.remove("results");
                }
                shown
            }
            _ => simple_step(&ctx, step, &built, &mut scope).await?,
        };
        summary.insert(step.id.clone(), value);
    }
    Ok(json!({ "workflow": spec.def.name, "steps": summary }))
}

fn agent_value(run: &AgentRun) -> Value {
    json!({
        "text": run.text,
        "agent": run.agent,
        "turns": run.turns,
        "tool_calls": run.tool_calls,
        "input_tokens": run.usage.input_tokens,
        "output_tokens": run.usage.output_tokens,
        "cost_usd": run.cost_usd,
        "fallback": Value::Null,
    })
}

fn step_failed(step: &StepDef, e: String) -> WorkflowError {
    WorkflowError::msg(format!("flow step `{}`: {e}", step.id))
}

/// Runs an agent or router step, recording its value in `scope`.
async fn simple_step(
    ctx: &WorkflowContext,
    step: &StepDef,
    built: &Arc<Built>,
    scope: &mut Scope,
) -> Result<Value, WorkflowError> {
    match &step.kind {
        StepKind::Agent {
            agent,
            prompt,
            handoff: h,
            fallback,
        } => {
            let a = built.agent(agent)?;
            let task = prompt
                .as_ref()
                .map(|t| t.render(&scope.vars))
                .transpose()
                .map_err(|e| step_failed(step, e))?;
            // What a summary handoff's summarizer spent, counted with the step's agent; and
            // what the agent's calls cost if it failed (before a fallback, or failing the item).
            let mut summary_spent = (0u64, 0.0f64);
            let (result, failed_spent) = match h {
                Some(h) => {
                    let from = scope.runs.get(&h.from).ok_or_else(|| {
                        step_failed(
                            step,
                            format!("step `{}` has no conversation to hand off", h.from),
                        )
                    })?;
                    let mode = match &h.summary {
                        None => HandoffMode::Full,
                        Some((m, max_tokens)) => {
                            let (model, model_id) = built.models.get(m).ok_or_else(|| {
                                step_failed(step, format!("model `{m}` is not built"))
                            })?;
                            HandoffMode::Summary {
                                model: Arc::clone(model),
                                model_id: model_id.clone(),
                                max_tokens: *max_tokens,
                                price: built.prices.get(m).copied(),
                            }
                        }
                    };
                    let reason = task
                        .clone()
                        .unwrap_or_else(|| format!("flow step `{}`", step.id));
                    let (r, spent) = handoff_metered(ctx, from, a, mode, &reason).await;
                    let r = r.map(|(record, r)| {
                        summary_spent = (
                            record.summary_usage.map_or(0, |u| u.total_tokens()),
                            record.summary_cost_usd.unwrap_or(0.0),
                        );
                        r
                    });
                    (r, spent)
                }
                None => {
                    a.run_metered(ctx, task.as_deref().unwrap_or_default())
                        .await
                }
            };
            if result.is_err() {
                scope.spent.0 += failed_spent.usage.total_tokens();
                scope.spent.1 += failed_spent.cost_usd.unwrap_or(0.0);
            }
            let (run, used) = match (result, fallback) {
                (Ok(r), _) => (r, None),
                (Err(e @ WorkflowError::Interrupted(_)), _) | (Err(e), None) => return Err(e),
                (Err(e), Some(fb)) => {
                    tracing::warn!(step = %step.id, error = %e, fallback = %fb, "agent step failed; running its fallback agent");
                    let fb_task = task
                        .clone()
                        .or_else(|| {
                            h.as_ref()
                                .and_then(|h| scope.runs.get(&h.from))
                                .map(|r| r.text.clone())
                        })
                        .unwrap_or_default();
                    let s = ctx.scope(&format!("fallback:{fb}")).await?;
                    (built.agent(fb)?.run(&s, &fb_task).await?, Some(fb.clone()))
                }
            };
            let mut v = agent_value(&run);
            if let Some(fb) = used {
                v["fallback"] = Value::String(fb);
            }
            scope.spend(&run);
            scope.spent.0 += summary_spent.0;
            scope.spent.1 += summary_spent.1;
            scope.record(&step.id, v.clone(), Some(run));
            Ok(v)
        }
        StepKind::Router { router, prompt } => {
            let r = built
                .routers
                .get(router)
                .ok_or_else(|| step_failed(step, format!("router `{router}` is not built")))?;
            let task = prompt
                .render(&scope.vars)
                .map_err(|e| step_failed(step, e))?;
            let (routed, spent) = r.run_metered(ctx, &task).await;
            let routed = match routed {
                Ok(r) => r,
                Err(e) => {
                    // The classifier's and the chosen agent's calls were paid for.
                    scope.spent.0 += spent.usage.total_tokens();
                    scope.spent.1 += spent.cost_usd.unwrap_or(0.0);
                    return Err(e);
                }
            };
            scope.spend(&routed.classification);
            scope.spend(&routed.run);
            let mut v = agent_value(&routed.run);
            v["category"] = Value::String(routed.category.clone());
            v["fallback"] = Value::Bool(routed.fallback);
            scope.record(&step.id, v.clone(), Some(routed.run));
            Ok(v)
        }
        StepKind::ForEach {
            over,
            concurrency,
            min_required,
            key,
            steps,
            ..
        } => {
            // Inside an item: over an array in it (validated: nothing else gets here).
            let path = over.as_deref().unwrap_or_default();
            let mut v = &scope.vars["item"];
            for f in path {
                v = match v {
                    Value::Object(m) => m.get(f).unwrap_or(&Value::Null),
                    Value::Array(a) => f
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| a.get(i))
                        .unwrap_or(&Value::Null),
                    _ => &Value::Null,
                };
            }
            let Value::Array(list) = v else {
                return Err(step_failed(
                    step,
                    format!(
                        "`item.{}` is not an array (it is {}); a for_each inside a for_each runs over an array in the item",
                        path.join("."),
                        match v {
                            Value::Null => "missing",
                            Value::Object(_) => "an object",
                            Value::String(_) => "a string",
                            _ => "a number or a boolean",
                        }
                    ),
                ));
            };
            let items = Arc::new(list.clone());
            let (v, spent) = for_each(
                ctx,
                step,
                (*concurrency, *min_required, key.clone()),
                Arc::new(steps.clone()),
                built,
                scope,
                &items,
            )
            .await?;
            // The item's spending includes its inner items' (what a resumed batch counts).
            scope.spent.0 += spent.0;
            scope.spent.1 += spent.1;
            scope.record(&step.id, v.clone(), None);
            Ok(v)
        }
    }
}

/// Tokens and dollars.
type Spending = (u64, f64);

/// Runs a `for_each` step: one durable branch per item. Returns its value and what its items
/// spent (recorded ones included).
///
/// Boxed (and `Send` by its type): a for_each inside a for_each makes this future contain
/// itself, through the branch's steps.
fn for_each<'a>(
    ctx: &'a WorkflowContext,
    step: &'a StepDef,
    (concurrency, min_required, key): (u32, Option<u32>, Option<String>),
    steps: Arc<Vec<StepDef>>,
    built: &'a Arc<Built>,
    scope: &'a Scope,
    items: &'a Arc<Vec<Value>>,
) -> cairn_storage::BoxFuture<'a, Result<(Value, Spending), WorkflowError>> {
    Box::pin(async move {
        let join = match min_required {
            Some(k) => JoinPolicy::AtLeast(k),
            None => JoinPolicy::All,
        };
        let opts = FanOutOptions::new(concurrency as usize).join(join);
        // Items that finished (or failed) before a resume are answered from the log without
        // replaying their calls: their recorded spending counts toward the budget before the
        // others run.
        let total = Arc::new(std::sync::Mutex::new((0u64, 0.0f64)));
        {
            let done = ctx.recorded_branch_outputs(&step.id);
            let failed = ctx.recorded_branch_failures(&step.id);
            let mut t = total.lock().unwrap_or_else(|p| p.into_inner());
            for (_, v) in done.iter().chain(failed.iter()) {
                let tokens = v["spent"]["tokens"].as_u64().unwrap_or(0);
                let cost = v["spent"]["cost_usd"].as_f64().unwrap_or(0.0);
                if let Some(b) = &built.budget {
                    b.add_spent(tokens, cost);
                }
                t.0 += tokens;
                t.1 += cost;
            }
        }
        let mut base = scope.clone();
        base.spent = (0, 0.0);
        let base = Arc::new(base);
        let built = Arc::clone(built);
        let list: Vec<Value> = items.as_ref().clone();
        let live_total = Arc::clone(&total);
        let fan_in = ctx
        .fan_out(&step.id, list, opts, move |bctx, item| {
            let steps = Arc::clone(&steps);
            let built = Arc::clone(&built);
            let total = Arc::clone(&live_total);
            let mut scope = base.as_ref().clone();
            let add = move |(tokens, cost): (u64, f64)| {
                let mut t = total.lock().unwrap_or_else(|p| p.into_inner());
                t.0 += tokens;
                t.1 += cost;
            };
            async move {
                if let Some(v) = scope.vars.as_object_mut() {
                    // Inside a for_each inside a for_each, the enclosing item is `parent`.
                    if let Some(outer) = v.remove("item") {
                        v.insert("parent".into(), outer);
                    }
                    v.insert("item".into(), item);
                }
                let mut out = serde_json::Map::new();
                for s in steps.iter() {
                    match simple_step(&bctx, s, &built, &mut scope).await {
                        Ok(v) => {
                            out.insert(s.id.clone(), v);
                        }
                        // Stopping (shutdown, cancel, a park) is not the item's failure.
                        Err(e @ WorkflowError::Interrupted(_)) => return Err(e),
                        // A failed item's spending is recorded with its failure, so that a
                        // resumed batch counts it against the budget too.
                        Err(e) => {
                            let (tokens, cost_usd) = scope.spent;
                            add(scope.spent);
                            return Err(WorkflowError::FailedWith {
                                message: e.to_string(),
                                details: json!({ "spent": { "tokens": tokens, "cost_usd": cost_usd } }),
                            });
                        }
                    }
                }
                let (tokens, cost_usd) = scope.spent;
                add(scope.spent);
                Ok(json!({ "steps": out, "spent": { "tokens": tokens, "cost_usd": cost_usd } }))
            }
        })
        .await?;
        let mut lines = String::new();
        let (mut ok, mut failed) = (0u64, 0u64);
        let last = steps_last_id(step);
        for (i, o) in fan_in.outcomes.iter().enumerate() {
            match o {
                cairn_engine::BranchOutcome::Ok(v) => {
                    ok += 1;
                    let label = item_key(items.get(i), key.as_deref())
                        .map_or_else(|| format!("#{i}"), |k| plain(&k));
                    let last_value = last.as_deref().map(|l| &v["steps"][l]);
                    // The last step's text; for a nested for_each, its counts.
                    let text = match last_value {
                        Some(l) if l["text"].is_string() => {
                            l["text"].as_str().unwrap_or_default().to_string()
                        }
                        Some(l) if l["count"].is_u64() => format!(
                            "{} of {} ok, {} failed",
                            l["succeeded"], l["count"], l["failed"]
                        ),
                        _ => String::new(),
                    };
                    lines.push_str(&format!(
                        "- {label}: {}\n",
                        text.split_whitespace().collect::<Vec<_>>().join(" ")
                    ));
                }
                cairn_engine::BranchOutcome::Failed(_) => failed += 1,
                _ => {}
            }
        }
        let spent = *total.lock().unwrap_or_else(|p| p.into_inner());
        Ok((
            json!({
                "count": items.len(),
                "succeeded": ok,
                "failed": failed,
                "results": lines,
            }),
            spent,
        ))
    })
}

fn steps_last_id(step: &StepDef) -> Option<String> {
    match &step.kind {
        StepKind::ForEach { steps, .. } => steps.last().map(|s| s.id.clone()),
        _ => None,
    }
}

fn item_key(item: Option<&Value>, key: Option<&str>) -> Option<Value> {
    key.and_then(|k| item?.get(k).cloned())
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One item's outcome in a run of a workflow file: a line of `cairn run --output`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    /// The `for_each` step.
    pub step: String,
    /// The item's position in the input (from 0).
    pub index: u32,
    /// The item's `key` field, if the step names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Value>,
    /// Whether the item's steps all succeeded.
    pub ok: bool,
    /// The item's step values (`steps.<id>.text`, …) when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A run's progress as its log tells it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FlowProgress {
    /// Items in the run's input.
    pub items_total: u64,
    /// Items finished successfully.
    pub succeeded: u64,
    /// Items that failed.
    pub failed: u64,
    /// Model calls recorded.
    pub model_calls: u64,
    /// Input tokens of the recorded calls (cache included).
    pub input_tokens: u64,
    /// Output tokens of the recorded calls.
    pub output_tokens: u64,
    /// Cost of the recorded calls, for models with a price.
    pub cost_usd: f64,
}

#[derive(Deserialize)]
struct CallCost {
    response: CallUsage,
    cost_usd: Option<f64>,
}

#[derive(Deserialize)]
struct CallUsage {
    usage: Usage,
}

/// Reads a run of a workflow file from its log as it grows: the results of finished items
/// (exactly once each, in log order) and the spending so far. `cairn run` uses it to write the
/// output file and the progress line; after a resume it starts from the first event again, so
/// an output file can be completed from the log whatever happened to the process writing it.
pub struct FlowFollower {
    run: RunId,
    next: u64,
    keys: BTreeMap<String, Option<String>>,
    fan_outs: HashMap<StepPath, String>,
    items: Vec<Value>,
    progress: FlowProgress,
}

/// Events read per store call.
const FOLLOW_PAGE: usize = 2048;

impl FlowFollower {
    /// A follower of run `run`, starting at its first event.
    pub fn new(run: RunId) -> Self {
        FlowFollower {
            run,
            next: 0,
            keys: BTreeMap::new(),
            fan_outs: HashMap::new(),
            items: Vec::new(),
            progress: FlowProgress::default(),
        }
    }

    /// The progress as of the events read so far.
    pub fn progress(&self) -> &FlowProgress {
        &self.progress
    }

    /// Reads the events recorded since the last call; returns the items finished in them.
    pub async fn poll(&mut self, store: &dyn EventStore) -> Result<Vec<ItemResult>, StoreError> {
        let mut out = Vec::new();
        loop {
            let page = store.read(self.run, Seq(self.next), FOLLOW_PAGE).await?;
            let n = page.len();
            for ev in page {
                self.next = ev.seq.0 + 1;
                if let Ok(e) = Event::decode(&ev.payload) {
                    self.apply(e, &mut out);
                }
            }
            if n < FOLLOW_PAGE {
                return Ok(out);
            }
        }
    }

    fn apply(&mut self, e: Event, out: &mut Vec<ItemResult>) {
        match e {
            Event::RunStarted { input, .. } => {
                if let Ok(fi) = input.to_typed::<FlowInput>() {
                    if let Ok(raw) = toml::from_str::<super::raw::RawFile>(&fi.spec) {
                        for s in raw.flow {
                            let s = s.into_inner();
                            if s.for_each.is_some() {
                                self.keys.insert(
                                    s.id.into_inner(),
                                    s.key.map(toml::Spanned::into_inner),
                                );
                            }
                        }
                    }
                    self.progress.items_total = fi.items.len() as u64;
                    self.items = fi.items;
                }
            }
            Event::FanOutStarted { path, name, .. }
                if path.depth() == 1 && self.keys.contains_key(&name) =>
            {
                self.fan_outs.insert(path, name);
            }
            Event::BranchCompleted {
                path,
                index,
                output,
            } => {
                if let Some(step) = self.fan_outs.get(&path) {
                    self.progress.succeeded += 1;
                    let key = self.key(step, index);
                    out.push(ItemResult {
                        step: step.clone(),
                        index,
                        key,
                        ok: true,
                        output: Some(output.to_json()["steps"].clone()),
                        error: None,
                    });
                }
            }
            Event::BranchFailed { path, index, error }
            | Event::BranchFailedWith {
                path, index, error, ..
            } => {
                if let Some(step) = self.fan_outs.get(&path) {
                    self.progress.failed += 1;
                    let key = self.key(step, index);
                    out.push(ItemResult {
                        step: step.clone(),
                        index,
                        key,
                        ok: false,
                        output: None,
                        error: Some(error),
                    });
                }
            }
            Event::StepCompleted { name, output, .. } if name == "model" => {
                if let Ok(c) = output.to_typed::<CallCost>() {
                    let u = c.response.usage;
                    self.progress.model_calls += 1;
                    self.progress.input_tokens +=
                        u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens;
                    self.progress.output_tokens += u.output_tokens;
                    self.progress.cost_usd += c.cost_usd.unwrap_or(0.0);
                }
            }
            _ => {}
        }
    }

    fn key(&self, step: &str, index: u32) -> Option<Value> {
        let field = self.keys.get(step)?.as_deref();
        item_key(self.items.get(index as usize), field)
    }
}
