//! Workflow files: a TOML declaration of models, tools, agents, routers, a budget and a flow
//! (agent steps, routed steps, handoffs, a fan-out over the input items and the steps after
//! it), checked completely before anything runs and then interpreted on the engine.
//!
//! A run of a workflow file is a run of workflow `file:<name>`; its input ([`FlowInput`])
//! carries the file's text, its hash, the items and the parameters, so any process resumes it
//! with the one interpreter [`register_flows`] installs, without the file. docs/WORKFLOW_FILES.md
//! documents the format.
//!
//! Architecture invariant: only a [`FlowSpec`] (a validated file) reaches the interpreter; an
//! invalid file is refused before a run is created, so it writes nothing.

mod builtin;
mod interp;
mod raw;
mod template;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_engine::{Registry, StartOptions};
use cairn_storage::RunId;
use serde::{Deserialize, Serialize};

use crate::model::Model;
use crate::tools::{Tool, ToolRegistry};

pub use interp::{FlowFollower, FlowProgress, ItemResult};
pub(crate) use validate::FlowDef;

/// Runs of workflow files are runs of workflows named `file:<name>`.
pub const FLOW_PREFIX: &str = "file:";
/// The interpreter's version, recorded with each run of a workflow file.
pub const FLOW_VERSION: u32 = 1;
/// Largest workflow file accepted, in bytes.
pub const SPEC_BYTES_MAX: usize = 1024 * 1024;

/// One problem in a workflow file, at a place in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpecIssue {
    /// The file, as given.
    pub file: String,
    /// 1-based line (0: the file as a whole).
    pub line: usize,
    /// 1-based column (0: the whole line).
    pub column: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for SpecIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}: {}", self.file, self.message),
            (l, 0) => write!(f, "{}:{l}: {}", self.file, self.message),
            (l, c) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
        }
    }
}

/// Everything wrong with a workflow file (validation reports every problem it finds, in the
/// order of the file, not just the first).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", render_issues(.issues))]
pub struct SpecError {
    /// The problems, in file order.
    pub issues: Vec<SpecIssue>,
}

fn render_issues(issues: &[SpecIssue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl SpecError {
    fn whole_file(file: &str, message: String) -> Self {
        SpecError {
            issues: vec![SpecIssue {
                file: file.to_string(),
                line: 0,
                column: 0,
                message,
            }],
        }
    }
}

/// What a program adds to workflow files: tools registered from Rust (agents name them in
/// their `tools` list like built-in ones) and models that replace a declared model by name
/// (tests, custom providers).
#[derive(Clone, Default)]
pub struct FlowEnv {
    pub(crate) tools: ToolRegistry,
    pub(crate) models: BTreeMap<String, Arc<dyn Model>>,
    pub(crate) specs: Arc<Mutex<HashMap<RunId, String>>>,
    pub(crate) checking: bool,
}

impl FlowEnv {
    /// An environment with no Rust tools and no model replacements.
    pub fn new() -> Self {
        Self::default()
    }

    /// An environment for checking recorded histories (`cairn replay --check`): models are
    /// built without API keys, since a check never calls them.
    pub fn for_checking() -> Self {
        FlowEnv {
            checking: true,
            ..Self::default()
        }
    }

    /// The same environment with a tool agents of workflow files may use.
    pub fn tool(mut self, tool: Arc<dyn Tool>) -> Self {
        self.tools = self.tools.with(tool);
        self
    }

    /// The same environment answering the calls of declared model `name` with `model`.
    pub fn model(mut self, name: &str, model: Arc<dyn Model>) -> Self {
        self.models.insert(name.to_string(), model);
        self
    }

    /// Makes run `run` execute the workflow file text `spec` instead of the one recorded in its
    /// input (resuming with a changed file, by explicit choice: recorded steps are still
    /// checked against it, so only steps not yet recorded may differ).
    pub fn use_spec(&self, run: RunId, spec: String) {
        self.specs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(run, spec);
    }

    fn spec_for(&self, run: RunId) -> Option<String> {
        self.specs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&run)
            .cloned()
    }
}

/// A run's input when it runs a workflow file: everything needed to run it again, in any
/// process, without the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowInput {
    /// The file's path when the run started (absolute); relative paths in the file (recorded
    /// responses, a file tool's root) are relative to its folder.
    pub file: String,
    /// blake3 of the file's bytes as read (before `--set` changes).
    pub source_hash: String,
    /// The text the run executes: the file with the `--set` changes applied.
    pub spec: String,
    /// The `--set KEY=VALUE` changes applied, in order.
    #[serde(default)]
    pub overrides: Vec<String>,
    /// The parameters (`input.<name>` in templates), defaults filled in.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// The items the fan-out runs over.
    #[serde(default)]
    pub items: Vec<serde_json::Value>,
}

/// A validated workflow file, ready to run.
#[derive(Clone)]
pub struct FlowSpec {
    pub(crate) def: Arc<FlowDef>,
    text: String,
    file: PathBuf,
    source_hash: String,
    overrides: Vec<String>,
}

impl std::fmt::Debug for FlowSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowSpec")
            .field("name", &self.def.name)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl FlowSpec {
    /// Reads and validates the workflow file at `path`, with `overrides` (`KEY=VALUE`, e.g.
    /// `models.fast.provider=anthropic`) applied first.
    pub fn load(path: &Path, overrides: &[String], env: &FlowEnv) -> Result<FlowSpec, SpecError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| {
            SpecError::whole_file(&shown, format!("cannot read the workflow file: {e}"))
        })?;
        if meta.len() > SPEC_BYTES_MAX as u64 {
            return Err(SpecError::whole_file(
                &shown,
                format!(
                    "the file is {} bytes; workflow files are limited to {SPEC_BYTES_MAX}",
                    meta.len()
                ),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| {
            SpecError::whole_file(&shown, format!("cannot read the workflow file: {e}"))
        })?;
        let source_hash = blake3::hash(&bytes).to_hex().to_string();
        let source = String::from_utf8(bytes).map_err(|e| {
            SpecError::whole_file(&shown, format!("the file is not UTF-8 text: {e}"))
        })?;
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Self::from_text(&shown, &file, &source, source_hash, overrides, env)
    }

    /// Validates workflow file text recorded earlier (a run's [`FlowInput`]).
    pub fn from_input(input: &FlowInput, env: &FlowEnv) -> Result<FlowSpec, SpecError> {
        let def = validate::parse(&input.file, &input.spec, env)?;
        Ok(FlowSpec {
            def: Arc::new(def),
            text: input.spec.clone(),
            file: PathBuf::from(&input.file),
            source_hash: input.source_hash.clone(),
            overrides: input.overrides.clone(),
        })
    }

    fn from_text(
        shown: &str,
        file: &Path,
        source: &str,
        source_hash: String,
        overrides: &[String],
        env: &FlowEnv,
    ) -> Result<FlowSpec, SpecError> {
        let text = apply_overrides(source, overrides)
            .map_err(|m| SpecError::whole_file(shown, format!("--set: {m}")))?;
        let def = validate::parse(shown, &text, env)?;
        Ok(FlowSpec {
            def: Arc::new(def),
            text,
            file: file.to_path_buf(),
            source_hash,
            overrides: overrides.to_vec(),
        })
    }

    /// The workflow's name (`[workflow] name`).
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The workflow's description (`[workflow] description`, may be empty).
    pub fn description(&self) -> &str {
        &self.def.description
    }

    /// The engine workflow name of its runs (`file:<name>`).
    pub fn workflow(&self) -> String {
        format!("{FLOW_PREFIX}{}", self.def.name)
    }

    /// blake3 of the file as read.
    pub fn source_hash(&self) -> &str {
        &self.source_hash
    }

    /// The text that runs (the file with `--set` changes applied).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the flow runs a fan-out over input items (then a run needs items).
    pub fn needs_items(&self) -> bool {
        self.def.for_each_ids().next().is_some()
    }

    /// The parameters with their defaults.
    pub fn params(&self) -> &BTreeMap<String, serde_json::Value> {
        &self.def.params
    }

    /// Builds a run's input from items and `NAME=VALUE` parameters, checking both against
    /// the flow: unknown parameters, items without a field a prompt uses, `min_required`
    /// above the item count. `items` are `(line, item)` pairs (line 0 when unknown), so an
    /// error can name the item's line in its file.
    pub fn input(
        &self,
        items: Vec<(usize, serde_json::Value)>,
        params: &[(String, String)],
    ) -> Result<FlowInput, String> {
        let mut values = self.def.params.clone();
        for (k, v) in params {
            let Some(default) = self.def.params.get(k) else {
                let known: Vec<&str> = self.def.params.keys().map(String::as_str).collect();
                return Err(format!(
                    "--param {k}: the workflow declares no parameter `{k}` (declared: {}); add it under [params]",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ));
            };
            let value = match default {
                serde_json::Value::String(_) => serde_json::Value::String(v.clone()),
                _ => serde_json::from_str(v).map_err(|e| {
                    format!("--param {k}={v}: the default is {default}, so the value must be JSON of that kind: {e}")
                })?,
            };
            values.insert(k.clone(), value);
        }
        self.def.check_items(&items)?;
        Ok(FlowInput {
            file: self.file.display().to_string(),
            source_hash: self.source_hash.clone(),
            spec: self.text.clone(),
            overrides: self.overrides.clone(),
            params: values,
            items: items.into_iter().map(|(_, v)| v).collect(),
        })
    }

    /// Checks that this process can run the file: API keys present, recorded responses and
    /// tools readable. Nothing is sent or recorded.
    pub fn check_runnable(&self, env: &FlowEnv) -> Result<(), String> {
        interp::check_runnable(&self.def, env, &self.file)
    }

    /// The engine's start options for a run of this file with `input`.
    pub fn start_options(&self, input: &FlowInput) -> Result<StartOptions, String> {
        let json = serde_json::to_value(input).map_err(|e| e.to_string())?;
        let mut opts = StartOptions::new(&self.workflow(), json);
        opts.labels
            .insert("file".into(), self.file.display().to_string());
        opts.labels
            .insert("file_hash".into(), self.source_hash.clone());
        Ok(opts)
    }
}

/// Applies `KEY=VALUE` changes to workflow file text: `KEY` is a dotted path
/// (`models.fast.provider`, `flow.0.concurrency`), `VALUE` a TOML value (`8`, `true`,
/// `"text"`) or else taken as a string. Comments and layout are kept, so line numbers in later
/// messages still match the file.
pub fn apply_overrides(text: &str, overrides: &[String]) -> Result<String, String> {
    if overrides.is_empty() {
        return Ok(text.to_string());
    }
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        format!("the file is not valid TOML: {}", e.message())
    })?;
    for o in overrides {
        let Some((key, value)) = o.split_once('=') else {
            return Err(format!(
                "`{o}` is not KEY=VALUE (e.g. models.fast.model=claude-haiku-4-5)"
            ));
        };
        let key = key.trim();
        let parts: Vec<&str> = key.split('.').map(str::trim).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "`{key}` is not a dotted key (e.g. agents.writer.model)"
            ));
        }
        let value: toml_edit::Value = value
            .trim()
            .parse()
            .unwrap_or_else(|_| toml_edit::Value::from(value.trim()));
        set_in_table(doc.as_table_mut(), &parts, value, key)?;
    }
    Ok(doc.to_string())
}

fn set_in_table(
    t: &mut dyn toml_edit::TableLike,
    parts: &[&str],
    value: toml_edit::Value,
    key: &str,
) -> Result<(), String> {
    let (first, rest) = (parts[0], &parts[1..]);
    if rest.is_empty() {
        let mut value = value;
        if let Some(old) = t.get(first).and_then(toml_edit::Item::as_value) {
            // The old value's surroundings (spacing, a comment after it) stay.
            *value.decor_mut() = old.decor().clone();
        }
        t.insert(first, toml_edit::Item::Value(value));
        return Ok(());
    }
    let Some(child) = t.get_mut(first) else {
        return Err(format!(
            "`{key}`: `{first}` is not in the file; --set changes settings of tables the file has"
        ));
    };
    match child {
        toml_edit::Item::ArrayOfTables(list) => {
            let len = list.len();
            let entry = rest[0]
                .parse::<usize>()
                .ok()
                .and_then(|n| list.get_mut(n))
                .ok_or_else(|| {
                    format!(
                        "`{key}`: `{first}` is a list of {len}; give an index from 0 to {}",
                        len.saturating_sub(1)
                    )
                })?;
            if rest.len() < 2 {
                return Err(format!("`{key}`: name a setting inside the list entry"));
            }
            set_in_table(entry, &rest[1..], value, key)
        }
        other => match other.as_table_like_mut() {
            Some(inner) => set_in_table(inner, rest, value, key),
            None => Err(format!("`{key}`: `{first}` is a value, not a table")),
        },
    }
}

/// Registers the workflow-file interpreter: every workflow named `file:<name>` runs the file
/// recorded in its input, with `env`'s Rust tools and models.
pub fn register_flows(registry: &mut Registry, env: FlowEnv) {
    registry.register_family(FLOW_PREFIX, FLOW_VERSION, move |ctx, input: FlowInput| {
        let env = env.clone();
        async move { interp::run(ctx, input, env).await }
    });
}
