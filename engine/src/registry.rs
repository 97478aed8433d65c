//! The workflow registry: async Rust functions registered by name and version, with typed
//! serde input and output.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use cairn_storage::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::WorkflowContext;
use crate::error::WorkflowError;
use crate::event::Payload;

type RunFn = dyn Fn(WorkflowContext, Payload) -> BoxFuture<'static, Result<Payload, WorkflowError>>
    + Send
    + Sync;
type CheckFn = dyn Fn(&Payload) -> Result<(), String> + Send + Sync;

/// One registered workflow.
#[derive(Clone)]
pub(crate) struct Registered {
    pub(crate) version: u32,
    pub(crate) run: Arc<RunFn>,
    pub(crate) check_input: Arc<CheckFn>,
}

/// The workflows a program can start and resume, by name.
#[derive(Clone, Default)]
pub struct Registry {
    workflows: BTreeMap<String, Registered>,
    /// Workflows registered for every name that starts with a prefix (e.g. `file:` for
    /// workflow files, whose runs carry their definition in their input).
    families: Vec<(String, Registered)>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `f` as workflow `name` at `version`. The input is decoded from JSON into `I`
    /// (checked before a run is created) and the output encoded from `O`.
    ///
    /// Bump `version` when a change would make recorded histories diverge; runs recorded with
    /// another version are refused instead of replayed against the wrong code.
    pub fn register<I, O, F, Fut>(&mut self, name: &str, version: u32, f: F) -> &mut Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let registered = Self::wrap(version, f);
        self.workflows.insert(name.to_string(), registered);
        self
    }

    /// Registers `f` for every workflow name starting with `prefix` that has no exact
    /// registration: one interpreter serving many named definitions (workflow files carry
    /// their definition in the run's input, so any of them resumes with the same function).
    pub fn register_family<I, O, F, Fut>(&mut self, prefix: &str, version: u32, f: F) -> &mut Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let registered = Self::wrap(version, f);
        self.families.retain(|(p, _)| p != prefix);
        self.families.push((prefix.to_string(), registered));
        self
    }

    fn wrap<I, O, F, Fut>(version: u32, f: F) -> Registered
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let run: Arc<RunFn> = Arc::new(move |ctx: WorkflowContext, input: Payload| {
            let f = Arc::clone(&f);
            Box::pin(async move {
                let input: I = input.to_typed().map_err(|e| {
                    WorkflowError::msg(format!(
                        "the recorded input no longer fits the workflow's input type: {e}"
                    ))
                })?;
                let out = f(ctx, input).await?;
                Payload::from_value(&out).map_err(|e| {
                    WorkflowError::msg(format!(
                        "the workflow's output cannot be encoded as JSON: {e}"
                    ))
                })
            })
        });
        let check_input: Arc<CheckFn> =
            Arc::new(|p: &Payload| p.to_typed::<I>().map(|_| ()).map_err(|e| e.to_string()));
        Registered {
            version,
            run,
            check_input,
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Registered> {
        self.workflows.get(name).or_else(|| {
            self.families
                .iter()
                .find(|(prefix, _)| name.starts_with(prefix.as_str()))
                .map(|(_, r)| r)
        })
    }

    /// The registered workflow names and versions, sorted by name.
    pub fn names(&self) -> Vec<(String, u32)> {
        self.workflows
            .iter()
            .map(|(n, r)| (n.clone(), r.version))
            .collect()
    }

    pub(crate) fn known(&self) -> String {
        let mut v: Vec<String> = self.workflows.keys().cloned().collect();
        v.extend(self.families.iter().map(|(p, _)| format!("{p}<name>")));
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}
