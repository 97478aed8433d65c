//! Validation: the file as written ([`raw`](super::raw)) becomes a [`FlowDef`] only if every
//! name it uses is declared, every reference points backwards, every template names something
//! that will exist, and every limit holds. Each problem is reported with its `file:line`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use toml::Spanned;

use super::raw::{RawFile, RawRetry, RawStep};
use super::template::Template;
use super::{FlowEnv, SpecError, SpecIssue};
use crate::agent::Price;
use crate::budget::BudgetLimits;

/// Most steps in a flow (all levels).
const STEPS_MAX: usize = 256;
/// Most branches of a fan-out running at once.
const CONCURRENCY_MAX: u32 = 1024;
/// Most model calls an agent may make in one step.
const TURNS_MAX: u32 = 100;

/// A model provider a workflow file can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Provider {
    Anthropic,
    OpenAi,
    Recorded,
}

#[derive(Clone, Debug)]
pub(crate) struct ModelDef {
    pub(crate) provider: Provider,
    pub(crate) model: String,
    pub(crate) base_url: Option<String>,
    pub(crate) api_key_env: Option<String>,
    pub(crate) responses: Option<String>,
    pub(crate) price: Option<Price>,
    pub(crate) timeout_secs: Option<u64>,
    pub(crate) latency_ms: u64,
}

/// A built-in tool kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ToolKind {
    Http,
    ReadFile,
    Command,
    ExtractJson,
}

#[derive(Clone, Debug)]
pub(crate) struct ToolDef {
    pub(crate) kind: ToolKind,
    pub(crate) description: Option<String>,
    pub(crate) base_url: Option<String>,
    pub(crate) methods: Vec<String>,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) root: Option<String>,
    pub(crate) allow: Vec<String>,
    pub(crate) timeout_secs: u64,
    pub(crate) max_bytes: u64,
    pub(crate) at_most_once: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct AgentDef {
    pub(crate) model: String,
    pub(crate) system: Option<String>,
    pub(crate) tools: Vec<String>,
    pub(crate) max_turns: Option<u32>,
    pub(crate) max_tokens: Option<u32>,
    pub(crate) temperature: Option<f32>,
    pub(crate) retry: Option<RawRetry>,
}

#[derive(Clone, Debug)]
pub(crate) struct RouterDef {
    pub(crate) model: String,
    pub(crate) fallback: Option<String>,
    /// category → (agent, description)
    pub(crate) routes: BTreeMap<String, (String, String)>,
}

#[derive(Clone, Debug)]
pub(crate) struct HandoffDef {
    pub(crate) from: String,
    /// `Some((model, max_tokens))` for a summary handoff, `None` for the full conversation.
    pub(crate) summary: Option<(String, u32)>,
}

#[derive(Clone, Debug)]
pub(crate) enum StepKind {
    Agent {
        agent: String,
        prompt: Option<Template>,
        handoff: Option<HandoffDef>,
        fallback: Option<String>,
    },
    Router {
        router: String,
        prompt: Template,
    },
    ForEach {
        /// What it runs over: `None` for the input items; inside a `for_each`, the path of an
        /// array in the current item (`item.chunks` is `["chunks"]`).
        over: Option<Vec<String>>,
        concurrency: u32,
        min_required: Option<u32>,
        key: Option<String>,
        steps: Vec<StepDef>,
        /// Item fields the branch steps use, with the line using each first.
        item_fields: BTreeMap<String, usize>,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct StepDef {
    pub(crate) id: String,
    pub(crate) kind: StepKind,
}

/// A validated workflow file.
#[derive(Clone, Debug)]
pub(crate) struct FlowDef {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) params: BTreeMap<String, Value>,
    pub(crate) models: BTreeMap<String, ModelDef>,
    pub(crate) tools: BTreeMap<String, ToolDef>,
    pub(crate) agents: BTreeMap<String, AgentDef>,
    pub(crate) routers: BTreeMap<String, RouterDef>,
    pub(crate) budget: Option<BudgetLimits>,
    pub(crate) steps: Vec<StepDef>,
}

impl FlowDef {
    pub(crate) fn for_each_ids(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().filter_map(|s| match s.kind {
            StepKind::ForEach { .. } => Some(s.id.as_str()),
            _ => None,
        })
    }

    /// Checks the items against what the flow needs of them.
    pub(crate) fn check_items(&self, items: &[(usize, Value)]) -> Result<(), String> {
        for s in &self.steps {
            let StepKind::ForEach {
                min_required,
                item_fields,
                key,
                ..
            } = &s.kind
            else {
                continue;
            };
            if items.is_empty() {
                return Err(format!(
                    "step `{}` runs over the input items, and there are none: pass --input FILE (JSON lines or CSV)",
                    s.id
                ));
            }
            if let Some(m) = min_required
                && (*m as usize) > items.len()
            {
                return Err(format!(
                    "step `{}` requires at least {m} successful items (min_required) but there are only {} items",
                    s.id,
                    items.len()
                ));
            }
            let mut fields: Vec<&str> = item_fields.keys().map(String::as_str).collect();
            if let Some(k) = key {
                fields.push(k);
            }
            for (n, (line, item)) in items.iter().enumerate() {
                let at = if *line > 0 {
                    format!("line {line}")
                } else {
                    format!("item {n}")
                };
                for f in &fields {
                    let has = item.as_object().is_some_and(|o| o.contains_key(*f));
                    if !has {
                        let used = item_fields
                            .get(*f)
                            .map(|l| format!("used by a prompt on line {l} of the workflow file"))
                            .unwrap_or_else(|| format!("the `key` of step `{}`", s.id));
                        return Err(format!(
                            "input {at}: the item has no field `{f}` ({used}); every item needs it"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where problems are collected.
struct Issues<'a> {
    file: &'a str,
    text: &'a str,
    list: Vec<SpecIssue>,
}

impl Issues<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
        (line, col)
    }

    fn line(&self, offset: usize) -> usize {
        self.line_col(offset).0
    }

    fn at(&mut self, offset: usize, message: String) {
        let (line, column) = self.line_col(offset);
        self.list.push(SpecIssue {
            file: self.file.to_string(),
            line,
            column,
            message,
        });
    }
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "none are declared".into()
    } else {
        format!("declared: {}", v.join(", "))
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// What a step id refers to, for templates and handoffs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seen {
    Agent,
    Router,
    ForEach,
}

const AGENT_FIELDS: &[&str] = &[
    "text",
    "fallback",
    "agent",
    "turns",
    "tool_calls",
    "input_tokens",
    "output_tokens",
    "cost_usd",
];
const ROUTER_FIELDS: &[&str] = &[
    "text",
    "fallback",
    "agent",
    "category",
    "turns",
    "tool_calls",
    "input_tokens",
    "output_tokens",
    "cost_usd",
];
const FOR_EACH_FIELDS: &[&str] = &["count", "succeeded", "failed", "results"];

/// Parses and validates `text` (shown as `file` in messages).
pub(crate) fn parse(file: &str, text: &str, env: &FlowEnv) -> Result<super::FlowDef, SpecError> {
    let mut issues = Issues {
        file,
        text,
        list: Vec::new(),
    };
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let message = e.message().trim().to_string();
            let message = if message.contains("missing field `workflow`") {
                "missing the [workflow] table: add `[workflow]` with `name = \"...\"`".to_string()
            } else {
                message
            };
            issues.at(offset, message);
            return Err(SpecError {
                issues: issues.list,
            });
        }
    };
    let def = check(&mut issues, raw, env);
    if issues.list.is_empty() {
        Ok(def)
    } else {
        issues.list.sort_by_key(|i| (i.line, i.column));
        Err(SpecError {
            issues: issues.list,
        })
    }
}

fn check(is: &mut Issues<'_>, raw: RawFile, env: &FlowEnv) -> FlowDef {
    let wf = raw.workflow.into_inner();
    if !valid_name(wf.name.get_ref()) {
        is.at(
            wf.name.span().start,
            format!(
                "workflow name `{}` must be 1 to 64 letters, digits, `-` or `_`",
                wf.name.get_ref()
            ),
        );
    }

    let mut params = BTreeMap::new();
    for (name, v) in raw.params {
        if !valid_name(&name) {
            is.at(
                v.span().start,
                format!("parameter name `{name}` must be letters, digits, `-` or `_`"),
            );
        }
        match serde_json::to_value(v.get_ref()) {
            Ok(j) => {
                params.insert(name, j);
            }
            Err(e) => is.at(v.span().start, format!("parameter `{name}`: {e}")),
        }
    }

    let mut models = BTreeMap::new();
    for (name, m) in raw.models {
        let at = m.span().start;
        let m = m.into_inner();
        let provider = match m.provider.get_ref().as_str() {
            "anthropic" => Some(Provider::Anthropic),
            "openai" => Some(Provider::OpenAi),
            "recorded" => Some(Provider::Recorded),
            other => {
                is.at(
                    m.provider.span().start,
                    format!("model `{name}`: unknown provider `{other}`; use anthropic, openai or recorded"),
                );
                None
            }
        };
        if m.model.get_ref().trim().is_empty() {
            is.at(
                m.model.span().start,
                format!("model `{name}`: `model` (the provider's model id) is empty"),
            );
        }
        if provider == Some(Provider::Recorded)
            && m.responses.is_none()
            && !env.models.contains_key(&name)
        {
            is.at(at, format!("model `{name}`: provider `recorded` needs `responses = \"FILE.jsonl\"` (recorded answers by request hash)"));
        }
        if let Some(u) = &m.base_url
            && !(u.get_ref().starts_with("http://") || u.get_ref().starts_with("https://"))
        {
            is.at(
                u.span().start,
                format!(
                    "model `{name}`: base_url `{}` must start with http:// or https://",
                    u.get_ref()
                ),
            );
        }
        if let Some(t) = &m.timeout_secs
            && (*t.get_ref() == 0 || *t.get_ref() > 3600)
        {
            is.at(
                t.span().start,
                format!("model `{name}`: timeout_secs must be 1 to 3600"),
            );
        }
        if let Some(l) = &m.latency_ms
            && (provider != Some(Provider::Recorded) || *l.get_ref() > 600_000)
        {
            is.at(l.span().start, format!("model `{name}`: latency_ms (a pause before each recorded answer) applies to provider `recorded` only, up to 600000"));
        }
        let price = m.price.map(|p| {
            let at = p.span().start;
            let p = p.into_inner();
            if [
                p.input_per_mtok,
                p.output_per_mtok,
                p.cache_read_per_mtok,
                p.cache_write_per_mtok,
            ]
            .iter()
            .any(|v| !v.is_finite() || *v < 0.0)
            {
                is.at(
                    at,
                    format!("model `{name}`: prices must be finite and not negative"),
                );
            }
            Price {
                input_per_mtok: p.input_per_mtok,
                output_per_mtok: p.output_per_mtok,
                cache_write_per_mtok: p.cache_write_per_mtok,
                cache_read_per_mtok: p.cache_read_per_mtok,
            }
        });
        if let Some(provider) = provider {
            models.insert(
                name,
                ModelDef {
                    provider,
                    model: m.model.into_inner(),
                    base_url: m.base_url.map(Spanned::into_inner),
                    api_key_env: m.api_key_env.map(Spanned::into_inner),
                    responses: m.responses.map(Spanned::into_inner),
                    price,
                    timeout_secs: m.timeout_secs.map(Spanned::into_inner),
                    latency_ms: m.latency_ms.map_or(0, Spanned::into_inner),
                },
            );
        }
    }
    let mut tools = BTreeMap::new();
    for (name, t) in raw.tools {
        let at = t.span().start;
        let t = t.into_inner();
        if env.tools.get(&name).is_some() {
            is.at(
                at,
                format!("tool `{name}` is declared here and also registered from Rust; rename one"),
            );
        }
        if !valid_name(&name) {
            is.at(
                at,
                format!("tool name `{name}` must be letters, digits, `-` or `_`"),
            );
        }
        let kind = match t.kind.get_ref().as_str() {
            "http" => ToolKind::Http,
            "read_file" => ToolKind::ReadFile,
            "command" => ToolKind::Command,
            "extract_json" => ToolKind::ExtractJson,
            other => {
                is.at(
                    t.kind.span().start,
                    format!("tool `{name}`: unknown kind `{other}`; use http, read_file, command or extract_json (or register a Rust tool)"),
                );
                continue;
            }
        };
        let mut only = |field: &str, set: bool, allowed: &[ToolKind]| {
            if set && !allowed.contains(&kind) {
                is.at(
                    at,
                    format!(
                        "tool `{name}`: `{field}` does not apply to kind `{}`",
                        t.kind.get_ref()
                    ),
                );
            }
        };
        only("base_url", t.base_url.is_some(), &[ToolKind::Http]);
        only("methods", t.methods.is_some(), &[ToolKind::Http]);
        only("headers", t.headers.is_some(), &[ToolKind::Http]);
        only("root", t.root.is_some(), &[ToolKind::ReadFile]);
        only("allow", t.allow.is_some(), &[ToolKind::Command]);
        match kind {
            ToolKind::Http => match &t.base_url {
                None => is.at(at, format!("tool `{name}`: kind http needs `base_url` (requests are limited to URLs under it)")),
                Some(u) if !(u.get_ref().starts_with("http://") || u.get_ref().starts_with("https://")) => {
                    is.at(u.span().start, format!("tool `{name}`: base_url must start with http:// or https://"))
                }
                _ => {}
            },
            ToolKind::ReadFile if t.root.is_none() => is.at(
                at,
                format!("tool `{name}`: kind read_file needs `root` (the folder files may be read from)"),
            ),
            ToolKind::Command => match &t.allow {
                Some(a) if !a.get_ref().is_empty() => {}
                _ => is.at(at, format!("tool `{name}`: kind command needs `allow = [\"prog\", ...]`, the programs it may run")),
            },
            _ => {}
        }
        let methods: Vec<String> = t
            .methods
            .unwrap_or_else(|| vec!["GET".into()])
            .into_iter()
            .map(|m| m.to_ascii_uppercase())
            .collect();
        for m in &methods {
            if !["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"].contains(&m.as_str()) {
                is.at(at, format!("tool `{name}`: unknown HTTP method `{m}`"));
            }
        }
        let timeout_secs = t.timeout_secs.unwrap_or(30);
        if timeout_secs == 0 || timeout_secs > 3600 {
            is.at(at, format!("tool `{name}`: timeout_secs must be 1 to 3600"));
        }
        let max_bytes = t.max_bytes.unwrap_or(1024 * 1024);
        if max_bytes == 0 || max_bytes > 16 * 1024 * 1024 {
            is.at(
                at,
                format!("tool `{name}`: max_bytes must be 1 to 16777216"),
            );
        }
        let default_once =
            kind == ToolKind::Command || methods.iter().any(|m| m != "GET" && m != "HEAD");
        tools.insert(
            name,
            ToolDef {
                kind,
                description: t.description,
                base_url: t.base_url.map(Spanned::into_inner),
                methods,
                headers: t.headers.unwrap_or_default(),
                root: t.root.map(Spanned::into_inner),
                allow: t.allow.map(Spanned::into_inner).unwrap_or_default(),
                timeout_secs,
                max_bytes,
                at_most_once: t.at_most_once.unwrap_or(default_once),
            },
        );
    }

    let mut agents = BTreeMap::new();
    let agent_names: BTreeSet<String> = raw.agents.keys().cloned().collect();
    for (name, a) in raw.agents {
        let at = a.span().start;
        let a = a.into_inner();
        if !valid_name(&name) {
            is.at(
                at,
                format!("agent name `{name}` must be letters, digits, `-` or `_`"),
            );
        }
        if !models.contains_key(a.model.get_ref()) {
            is.at(
                a.model.span().start,
                format!(
                    "agent `{name}`: unknown model `{}` ({}); add [models.{}]",
                    a.model.get_ref(),
                    known(models.keys()),
                    a.model.get_ref()
                ),
            );
        }
        for t in &a.tools {
            if !tools.contains_key(t.get_ref()) && env.tools.get(t.get_ref()).is_none() {
                let mut all: Vec<String> = tools.keys().cloned().collect();
                all.extend(env.tools.names());
                is.at(
                    t.span().start,
                    format!("agent `{name}`: unknown tool `{}` ({}); declare it under [tools.{}] or register it from Rust", t.get_ref(), known(all.iter()), t.get_ref()),
                );
            }
        }
        if let Some(n) = &a.max_turns
            && !(1..=TURNS_MAX).contains(n.get_ref())
        {
            is.at(
                n.span().start,
                format!("agent `{name}`: max_turns must be 1 to {TURNS_MAX}"),
            );
        }
        if let Some(n) = &a.max_tokens
            && !(1..=200_000).contains(n.get_ref())
        {
            is.at(
                n.span().start,
                format!("agent `{name}`: max_tokens must be 1 to 200000"),
            );
        }
        if let Some(r) = &a.retry
            && !(1..=20).contains(&r.get_ref().attempts)
        {
            is.at(
                r.span().start,
                format!("agent `{name}`: retry.attempts must be 1 to 20"),
            );
        }
        agents.insert(
            name,
            AgentDef {
                model: a.model.into_inner(),
                system: a.system,
                tools: a.tools.into_iter().map(Spanned::into_inner).collect(),
                max_turns: a.max_turns.map(Spanned::into_inner),
                max_tokens: a.max_tokens.map(Spanned::into_inner),
                temperature: a.temperature,
                retry: a.retry.map(Spanned::into_inner),
            },
        );
    }

    let mut routers = BTreeMap::new();
    for (name, r) in raw.routers {
        let at = r.span().start;
        let r = r.into_inner();
        if !models.contains_key(r.model.get_ref()) {
            is.at(
                r.model.span().start,
                format!(
                    "router `{name}`: unknown model `{}` ({})",
                    r.model.get_ref(),
                    known(models.keys())
                ),
            );
        }
        if r.routes.is_empty() {
            is.at(at, format!("router `{name}` has no routes: add [routers.{name}.routes.<category>] with `agent` and `description`"));
        }
        let mut routes = BTreeMap::new();
        for (cat, route) in r.routes {
            let route = route.into_inner();
            if !agent_names.contains(route.agent.get_ref()) {
                is.at(
                    route.agent.span().start,
                    format!(
                        "router `{name}`, route `{cat}`: unknown agent `{}` ({})",
                        route.agent.get_ref(),
                        known(agent_names.iter())
                    ),
                );
            }
            routes.insert(cat, (route.agent.into_inner(), route.description));
        }
        if let Some(f) = &r.fallback
            && !agent_names.contains(f.get_ref())
        {
            is.at(
                f.span().start,
                format!(
                    "router `{name}`: unknown fallback agent `{}` ({})",
                    f.get_ref(),
                    known(agent_names.iter())
                ),
            );
        }
        routers.insert(
            name,
            RouterDef {
                model: r.model.into_inner(),
                fallback: r.fallback.map(Spanned::into_inner),
                routes,
            },
        );
    }

    let budget = raw.budget.map(|b| {
        let at = b.span().start;
        let b = b.into_inner();
        if b.max_cost_usd.is_some_and(|c| !c.is_finite() || c <= 0.0) {
            is.at(at, "budget: max_cost_usd must be a positive number".into());
        }
        if b.max_tokens == Some(0) {
            is.at(at, "budget: max_tokens must be positive".into());
        }
        BudgetLimits {
            max_tokens: b.max_tokens,
            max_cost_usd: b.max_cost_usd,
        }
    });

    if raw.flow.is_empty() {
        is.at(0, "the file has no [[flow]] steps: add at least one, e.g. `[[flow]]` with `id` and `agent`".into());
    }
    let ctx = Names {
        agents: &agent_names,
        routers: &routers,
        models: &models,
        params: &params,
    };
    let mut walk = Walk::default();
    let steps = check_steps(is, &ctx, raw.flow, &[], 0, &mut walk, &mut BTreeMap::new());
    if walk.count > STEPS_MAX {
        is.at(
            0,
            format!(
                "the flow has {} steps; the limit is {STEPS_MAX}",
                walk.count
            ),
        );
    }

    FlowDef {
        name: wf.name.into_inner(),
        description: wf.description,
        params,
        models,
        tools,
        agents,
        routers,
        budget,
        steps,
    }
}

/// Step ids seen so far in the whole file, and how many steps.
#[derive(Default)]
struct Walk {
    ids: BTreeSet<String>,
    count: usize,
}

struct Names<'a> {
    agents: &'a BTreeSet<String>,
    routers: &'a BTreeMap<String, RouterDef>,
    models: &'a BTreeMap<String, ModelDef>,
    params: &'a BTreeMap<String, Value>,
}

/// Checks one level of steps. `outer` are the steps visible from enclosing levels (already
/// run when this level starts); `depth` how many `for_each` levels enclose it (`item` exists
/// from 1, `parent` from 2).
fn check_steps(
    is: &mut Issues<'_>,
    names: &Names<'_>,
    raw: Vec<Spanned<RawStep>>,
    outer: &[(String, Seen)],
    depth: u32,
    walk: &mut Walk,
    item_fields: &mut BTreeMap<String, usize>,
) -> Vec<StepDef> {
    let mut visible: Vec<(String, Seen)> = outer.to_vec();
    let all_ids: Vec<String> = raw
        .iter()
        .map(|s| s.get_ref().id.get_ref().clone())
        .collect();
    let mut out = Vec::new();
    for (index, s) in raw.into_iter().enumerate() {
        walk.count += 1;
        let at = s.span().start;
        let s = s.into_inner();
        let id = s.id.get_ref().clone();
        if !valid_name(&id) {
            is.at(
                s.id.span().start,
                format!("step id `{id}` must be 1 to 64 letters, digits, `-` or `_`"),
            );
        }
        if !walk.ids.insert(id.clone()) {
            is.at(
                s.id.span().start,
                format!("step id `{id}` is used twice; step ids must be unique in the file"),
            );
        }
        let kinds = [s.agent.is_some(), s.router.is_some(), s.for_each.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if kinds != 1 {
            is.at(
                at,
                format!("step `{id}` must have exactly one of `agent`, `router` or `for_each`"),
            );
            continue;
        }
        let not_for = |is: &mut Issues<'_>, field: &str, set: bool, what: &str| {
            if set {
                is.at(
                    at,
                    format!("step `{id}`: `{field}` does not apply to {what} steps"),
                );
            }
        };
        let kind = if let Some(agent) = s.agent {
            not_for(is, "concurrency", s.concurrency.is_some(), "agent");
            not_for(is, "min_required", s.min_required.is_some(), "agent");
            not_for(is, "key", s.key.is_some(), "agent");
            not_for(is, "steps", !s.steps.is_empty(), "agent");
            if !names.agents.contains(agent.get_ref()) {
                is.at(
                    agent.span().start,
                    format!(
                        "step `{id}`: unknown agent `{}` ({})",
                        agent.get_ref(),
                        known(names.agents.iter())
                    ),
                );
            }
            if let Some(f) = &s.fallback
                && !names.agents.contains(f.get_ref())
            {
                is.at(
                    f.span().start,
                    format!(
                        "step `{id}`: unknown fallback agent `{}` ({})",
                        f.get_ref(),
                        known(names.agents.iter())
                    ),
                );
            }
            let handoff = s.handoff.map(|h| {
                let hat = h.span().start;
                let h = h.into_inner();
                let from = h.from.get_ref().clone();
                match visible.iter().find(|(v, _)| *v == from) {
                    Some((_, Seen::Agent | Seen::Router)) => {}
                    Some((_, Seen::ForEach)) => is.at(h.from.span().start, format!("step `{id}`: hands off from `{from}`, a for_each step; hand off from an agent or router step")),
                    None if from == id || all_ids[index..].contains(&from) => is.at(
                        h.from.span().start,
                        format!("step `{id}`: cycle: it hands off from `{from}`, which does not run before it; a handoff takes the conversation of an earlier step"),
                    ),
                    None => is.at(h.from.span().start, format!("step `{id}`: hands off from unknown step `{from}`")),
                }
                let summary = match h.mode.get_ref().as_str() {
                    "full" => None,
                    "summary" => match &h.model {
                        Some(m) if names.models.contains_key(m.get_ref()) => Some((m.get_ref().clone(), h.max_tokens.unwrap_or(512))),
                        Some(m) => {
                            is.at(m.span().start, format!("step `{id}`: unknown handoff model `{}` ({})", m.get_ref(), known(names.models.keys())));
                            None
                        }
                        None => {
                            is.at(hat, format!("step `{id}`: a summary handoff needs `model` (the model that writes the summary)"));
                            None
                        }
                    },
                    other => {
                        is.at(h.mode.span().start, format!("step `{id}`: handoff mode `{other}` is neither `full` nor `summary`"));
                        None
                    }
                };
                HandoffDef { from, summary }
            });
            let prompt = match &s.prompt {
                Some(p) => template(is, names, p, &visible, depth, item_fields, &id),
                None if handoff.is_some() => None,
                None => {
                    is.at(
                        at,
                        format!("step `{id}`: an agent step needs a `prompt` (or a `handoff`)"),
                    );
                    None
                }
            };
            visible.push((id.clone(), Seen::Agent));
            StepKind::Agent {
                agent: agent.into_inner(),
                prompt,
                handoff,
                fallback: s.fallback.map(Spanned::into_inner),
            }
        } else if let Some(router) = s.router {
            for (f, set) in [
                ("concurrency", s.concurrency.is_some()),
                ("min_required", s.min_required.is_some()),
                ("key", s.key.is_some()),
                ("steps", !s.steps.is_empty()),
                ("handoff", s.handoff.is_some()),
                ("fallback", s.fallback.is_some()),
            ] {
                not_for(is, f, set, "router");
            }
            if !names.routers.contains_key(router.get_ref()) {
                is.at(
                    router.span().start,
                    format!(
                        "step `{id}`: unknown router `{}` ({})",
                        router.get_ref(),
                        known(names.routers.keys())
                    ),
                );
            }
            let prompt = match &s.prompt {
                Some(p) => template(is, names, p, &visible, depth, item_fields, &id),
                None => {
                    is.at(
                        at,
                        format!(
                            "step `{id}`: a router step needs a `prompt` (the task to classify)"
                        ),
                    );
                    None
                }
            };
            visible.push((id.clone(), Seen::Router));
            StepKind::Router {
                router: router.into_inner(),
                prompt: prompt.unwrap_or_else(Template::empty),
            }
        } else {
            let Some(source) = s.for_each else { continue };
            for (f, set) in [
                ("prompt", s.prompt.is_some()),
                ("handoff", s.handoff.is_some()),
                ("fallback", s.fallback.is_some()),
            ] {
                not_for(is, f, set, "for_each");
            }
            // At the top level it runs over the input items; inside a for_each, over an array
            // in the current item.
            let over = if depth > 0 {
                let path: Vec<String> = source
                    .get_ref()
                    .strip_prefix("item.")
                    .map(|p| p.split('.').map(str::to_string).collect())
                    .unwrap_or_default();
                if path.is_empty() || path.iter().any(|f| f.is_empty()) {
                    is.at(
                        source.span().start,
                        format!(
                            "step `{id}`: a for_each inside a for_each runs over an array in the item: write for_each = \"item.<field>\" (e.g. \"item.chunks\")"
                        ),
                    );
                } else {
                    item_fields
                        .entry(path[0].clone())
                        .or_insert_with(|| is.line(source.span().start));
                }
                Some(path)
            } else {
                if source.get_ref() != "items" {
                    is.at(
                        source.span().start,
                        format!(
                            "step `{id}`: for_each must be \"items\" (the items given with --input)"
                        ),
                    );
                }
                None
            };
            let concurrency = s.concurrency.as_ref().map_or(8, |c| *c.get_ref());
            if let Some(c) = &s.concurrency
                && !(1..=CONCURRENCY_MAX).contains(c.get_ref())
            {
                is.at(
                    c.span().start,
                    format!("step `{id}`: concurrency must be 1 to {CONCURRENCY_MAX}"),
                );
            }
            if let Some(m) = &s.min_required
                && *m.get_ref() == 0
            {
                is.at(m.span().start, format!("step `{id}`: min_required must be at least 1 (leave it out to require every item)"));
            }
            if s.steps.is_empty() {
                is.at(
                    at,
                    format!(
                        "step `{id}`: a for_each needs steps: add [[flow.steps]] tables after it"
                    ),
                );
            }
            let mut branch_fields = BTreeMap::new();
            let inner = check_steps(
                is,
                names,
                s.steps,
                &visible,
                depth + 1,
                walk,
                &mut branch_fields,
            );
            visible.push((id.clone(), Seen::ForEach));
            StepKind::ForEach {
                over,
                concurrency,
                min_required: s.min_required.map(Spanned::into_inner),
                key: s.key.map(Spanned::into_inner),
                steps: inner,
                item_fields: branch_fields,
            }
        };
        out.push(StepDef { id, kind });
    }
    out
}

/// Where the text of the string value starting at `start` begins in the file: after its
/// opening quote(s) and, for a multi-line string, after the newline that follows them (TOML
/// drops it). Offsets in the value then map to the file (exactly, unless the string has
/// escapes), so a reference at the start of a line of a `"""` prompt is reported on its line,
/// not the one before.
fn content_start(text: &str, start: usize) -> usize {
    let raw = text.get(start..).unwrap_or_default();
    if raw.starts_with("\"\"\"") || raw.starts_with("'''") {
        let rest = &raw[3..];
        start
            + 3
            + if rest.starts_with("\r\n") {
                2
            } else {
                usize::from(rest.starts_with('\n'))
            }
    } else if raw.starts_with('"') || raw.starts_with('\'') {
        start + 1
    } else {
        start
    }
}

/// Parses and checks a prompt template against the names visible at its step.
fn template(
    is: &mut Issues<'_>,
    names: &Names<'_>,
    p: &Spanned<String>,
    visible: &[(String, Seen)],
    depth: u32,
    item_fields: &mut BTreeMap<String, usize>,
    id: &str,
) -> Option<Template> {
    let base = content_start(is.text, p.span().start);
    let t = match Template::parse(p.get_ref()) {
        Ok(t) => t,
        Err((off, m)) => {
            is.at(base + off, format!("step `{id}`: prompt: {m}"));
            return None;
        }
    };
    for (path, off) in t.vars() {
        let at = base + off;
        let shown = path.join(".");
        match path[0].as_str() {
            "item" if depth == 0 => is.at(at, format!("step `{id}`: `{{{{ {shown} }}}}`: `item` exists only in the steps of a for_each")),
            "parent" if depth < 2 => is.at(at, format!("step `{id}`: `{{{{ {shown} }}}}`: `parent` (the enclosing item) exists only in the steps of a for_each inside a for_each")),
            "parent" => {}
            "item" => {
                if let Some(f) = path.get(1) {
                    let line = is.line(at);
                    item_fields.entry(f.clone()).or_insert(line);
                }
            }
            "input" => match path.get(1) {
                Some(k) if names.params.contains_key(k) => {}
                Some(k) => is.at(at, format!("step `{id}`: `{{{{ {shown} }}}}`: no parameter `{k}` ({}); declare it under [params]", known(names.params.keys()))),
                None => is.at(at, format!("step `{id}`: `{{{{ input }}}}` needs a parameter name, e.g. `{{{{ input.audience }}}}`")),
            },
            "steps" => {
                let Some(target) = path.get(1) else {
                    is.at(at, format!("step `{id}`: `{{{{ steps }}}}` needs a step id, e.g. `{{{{ steps.triage.text }}}}`"));
                    continue;
                };
                let Some((_, seen)) = visible.iter().find(|(v, _)| v == target) else {
                    is.at(at, format!("step `{id}`: `{{{{ {shown} }}}}`: no step `{target}` runs before this one"));
                    continue;
                };
                let fields = match seen {
                    Seen::Agent => AGENT_FIELDS,
                    Seen::Router => ROUTER_FIELDS,
                    Seen::ForEach => FOR_EACH_FIELDS,
                };
                match path.get(2) {
                    Some(f) if fields.contains(&f.as_str()) && path.len() == 3 => {}
                    _ => is.at(at, format!("step `{id}`: `{{{{ {shown} }}}}`: use one of {}", fields.iter().map(|f| format!("steps.{target}.{f}")).collect::<Vec<_>>().join(", "))),
                }
            }
            other => is.at(at, format!("step `{id}`: unknown template variable `{other}` in `{{{{ {shown} }}}}`; use item.<field>, input.<param> or steps.<id>.<field>")),
        }
    }
    Some(t)
}
