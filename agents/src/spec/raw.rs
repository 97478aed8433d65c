//! The workflow file as written: serde structures with the spans validation needs for its
//! `file:line` messages. Nothing here is checked beyond TOML syntax and field names.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub(crate) workflow: Spanned<RawWorkflow>,
    #[serde(default)]
    pub(crate) params: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) models: BTreeMap<String, Spanned<RawModel>>,
    #[serde(default)]
    pub(crate) tools: BTreeMap<String, Spanned<RawTool>>,
    #[serde(default)]
    pub(crate) agents: BTreeMap<String, Spanned<RawAgent>>,
    #[serde(default)]
    pub(crate) routers: BTreeMap<String, Spanned<RawRouter>>,
    #[serde(default)]
    pub(crate) budget: Option<Spanned<RawBudget>>,
    #[serde(default)]
    pub(crate) flow: Vec<Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWorkflow {
    pub(crate) name: Spanned<String>,
    #[serde(default)]
    pub(crate) description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub(crate) provider: Spanned<String>,
    pub(crate) model: Spanned<String>,
    pub(crate) base_url: Option<Spanned<String>>,
    pub(crate) api_key_env: Option<Spanned<String>>,
    pub(crate) responses: Option<Spanned<String>>,
    pub(crate) price: Option<Spanned<RawPrice>>,
    pub(crate) timeout_secs: Option<Spanned<u64>>,
    pub(crate) latency_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrice {
    #[serde(default)]
    pub(crate) input_per_mtok: f64,
    #[serde(default)]
    pub(crate) output_per_mtok: f64,
    #[serde(default)]
    pub(crate) cache_write_per_mtok: f64,
    #[serde(default)]
    pub(crate) cache_read_per_mtok: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTool {
    pub(crate) kind: Spanned<String>,
    pub(crate) description: Option<String>,
    pub(crate) base_url: Option<Spanned<String>>,
    pub(crate) methods: Option<Vec<String>>,
    pub(crate) headers: Option<BTreeMap<String, String>>,
    pub(crate) root: Option<Spanned<String>>,
    pub(crate) allow: Option<Spanned<Vec<String>>>,
    pub(crate) timeout_secs: Option<u64>,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) at_most_once: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAgent {
    pub(crate) model: Spanned<String>,
    pub(crate) system: Option<String>,
    #[serde(default)]
    pub(crate) tools: Vec<Spanned<String>>,
    pub(crate) max_turns: Option<Spanned<u32>>,
    pub(crate) max_tokens: Option<Spanned<u32>>,
    pub(crate) temperature: Option<f32>,
    pub(crate) retry: Option<Spanned<RawRetry>>,
}

#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub(crate) attempts: u32,
    pub(crate) initial_delay_ms: Option<u64>,
    pub(crate) max_delay_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouter {
    pub(crate) model: Spanned<String>,
    pub(crate) fallback: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) routes: BTreeMap<String, Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub(crate) agent: Spanned<String>,
    pub(crate) description: String,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBudget {
    pub(crate) max_tokens: Option<u64>,
    pub(crate) max_cost_usd: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    pub(crate) id: Spanned<String>,
    pub(crate) agent: Option<Spanned<String>>,
    pub(crate) router: Option<Spanned<String>>,
    pub(crate) for_each: Option<Spanned<String>>,
    pub(crate) prompt: Option<Spanned<String>>,
    pub(crate) handoff: Option<Spanned<RawHandoff>>,
    pub(crate) fallback: Option<Spanned<String>>,
    pub(crate) concurrency: Option<Spanned<u32>>,
    pub(crate) min_required: Option<Spanned<u32>>,
    pub(crate) key: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) steps: Vec<Spanned<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHandoff {
    pub(crate) from: Spanned<String>,
    pub(crate) mode: Spanned<String>,
    pub(crate) model: Option<Spanned<String>>,
    pub(crate) max_tokens: Option<u32>,
}
