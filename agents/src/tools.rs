//! Tools the model may call: a name, a description, the JSON schema of the input (derived from
//! a Rust type with schemars), and an async function. A [`ToolRegistry`] dispatches the
//! model's `tool_use` blocks by name.
//!
//! A tool's input is decoded into its Rust type before it runs; an unknown tool, arguments
//! that do not decode, or a tool's own error go back to the model as a `tool_result` with
//! `is_error`, so it can correct itself.

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use cairn_storage::BoxFuture;
use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::ToolSpec;

/// A failed tool call, reported to the model as an error result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolError(pub String);

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for ToolError {
    fn from(e: E) -> Self {
        ToolError(e.to_string())
    }
}

/// Something the model can call.
pub trait Tool: Send + Sync + 'static {
    /// The name the model calls it by.
    fn name(&self) -> &str;
    /// What it does, for the model.
    fn description(&self) -> &str;
    /// The JSON schema of its input object.
    fn input_schema(&self) -> serde_json::Value;
    /// Whether running it twice has the same effect as once (reads, pure functions). Calls of
    /// a tool are at-least-once: the call in flight at a crash runs again on resume.
    fn idempotent(&self) -> bool {
        true
    }
    /// Runs the tool on the model's arguments.
    fn call(&self, input: serde_json::Value)
    -> BoxFuture<'_, Result<serde_json::Value, ToolError>>;
}

/// A tool made from a typed async function; see [`tool`].
pub struct FnTool<I, O, F> {
    name: String,
    description: String,
    schema: serde_json::Value,
    idempotent: bool,
    f: F,
    _types: PhantomData<fn(I) -> O>,
}

/// Makes a tool from an async function of a typed input: its JSON schema is derived from `I`.
pub fn tool<I, O, F, Fut>(name: &str, description: &str, f: F) -> Arc<dyn Tool>
where
    I: JsonSchema + DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, ToolError>> + Send + 'static,
{
    make_tool(name, description, f, true)
}

/// Like [`tool`], for a tool whose effect must not happen twice (sends an email, charges a
/// card): its calls are at-most-once, and a call interrupted by a crash parks the run for
/// review instead of running again.
pub fn tool_at_most_once<I, O, F, Fut>(name: &str, description: &str, f: F) -> Arc<dyn Tool>
where
    I: JsonSchema + DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, ToolError>> + Send + 'static,
{
    make_tool(name, description, f, false)
}

fn make_tool<I, O, F, Fut>(name: &str, description: &str, f: F, idempotent: bool) -> Arc<dyn Tool>
where
    I: JsonSchema + DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, ToolError>> + Send + 'static,
{
    let mut schema = serde_json::Value::from(schemars::schema_for!(I));
    if let Some(o) = schema.as_object_mut() {
        // Model APIs take the schema object itself; the meta-schema URL only adds tokens.
        o.remove("$schema");
    }
    Arc::new(FnTool {
        name: name.to_string(),
        description: description.to_string(),
        schema,
        idempotent,
        f,
        _types: PhantomData,
    })
}

impl<I, O, F, Fut> Tool for FnTool<I, O, F>
where
    I: JsonSchema + DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, ToolError>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn input_schema(&self) -> serde_json::Value {
        self.schema.clone()
    }

    fn idempotent(&self) -> bool {
        self.idempotent
    }

    fn call(
        &self,
        input: serde_json::Value,
    ) -> BoxFuture<'_, Result<serde_json::Value, ToolError>> {
        let parsed = serde_json::from_value::<I>(input);
        Box::pin(async move {
            let input =
                parsed.map_err(|e| ToolError(format!("bad arguments for `{}`: {e}", self.name)))?;
            let out = (self.f)(input).await?;
            serde_json::to_value(out)
                .map_err(|e| ToolError(format!("the result cannot be encoded: {e}")))
        })
    }
}

/// The tools an agent offers, by name.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tool (replacing one of the same name).
    pub fn with(mut self, tool: Arc<dyn Tool>) -> Self {
        self.tools.insert(tool.name().to_string(), tool);
        self
    }

    /// The tool named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.get(name)
    }

    /// The specs sent to the model, in name order.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools
            .values()
            .map(|t| ToolSpec {
                name: t.name().to_string(),
                description: t.description().to_string(),
                input_schema: t.input_schema(),
            })
            .collect()
    }

    /// Whether there are no tools.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// The names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, JsonSchema)]
    struct Lookup {
        /// The ticket id.
        id: String,
    }

    #[tokio::test]
    async fn a_typed_tool_has_a_schema_and_reports_bad_arguments() {
        let t = tool("lookup", "Find a ticket", |i: Lookup| async move {
            Ok::<_, ToolError>(format!("ticket {}", i.id))
        });
        let schema = t.input_schema();
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["properties"]["id"]["type"], "string");
        assert!(schema.get("$schema").is_none());
        assert_eq!(
            t.call(serde_json::json!({"id": "T-1"})).await.unwrap(),
            serde_json::json!("ticket T-1")
        );
        let err = t.call(serde_json::json!({"nope": 1})).await.unwrap_err();
        assert!(
            err.0.contains("bad arguments for `lookup`") && err.0.contains("id"),
            "{err}"
        );
    }
}
