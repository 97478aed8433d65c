//! OpenAI-compatible chat completions (`POST {base}/chat/completions`) as a [`Model`]: OpenAI
//! itself, vLLM, llama.cpp's server, Ollama's `/v1`.
//!
//! Assistant `tool_use` blocks become `tool_calls` (arguments as a JSON string); each
//! `tool_result` block becomes its own `tool` message. Arguments the model wrote that are not
//! JSON are kept as `{"_raw": "<text>"}` so the agent loop can tell the model they were bad.
//! The optional bearer key is never logged, printed by `Debug`, or put in an error.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use cairn_storage::BoxFuture;
use reqwest::header::{AUTHORIZATION, HeaderMap};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::http::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, RawResponse, Transport, env_key, excerpt,
    join_url, redact, secret_header,
};
use crate::model::{
    Block, Model, ModelError, ModelRequest, ModelResponse, Role, StopReason, ToolChoice, Usage,
    classify_status,
};

/// A [`Model`] that calls an OpenAI-compatible chat completions endpoint.
///
/// ```no_run
/// # use cairn_agents::OpenAiModel;
/// // A local vLLM server; no key needed.
/// let model = OpenAiModel::new("http://127.0.0.1:8000/v1").without_api_key();
/// ```
#[derive(Clone)]
pub struct OpenAiModel {
    base_url: String,
    api_key: Option<String>,
    transport: Transport,
}

impl fmt::Debug for OpenAiModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiModel")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("connect_timeout", &self.transport.connect_timeout)
            .field("request_timeout", &self.transport.request_timeout)
            .finish()
    }
}

impl OpenAiModel {
    /// OpenAI's own base URL.
    pub const OPENAI_BASE_URL: &'static str = "https://api.openai.com/v1";
    /// The environment variable the bearer key is read from when none is given.
    pub const API_KEY_ENV: &'static str = "OPENAI_API_KEY";

    /// A client for the server at `base_url` (up to and including `/v1`, e.g.
    /// `http://127.0.0.1:8000/v1`), with the bearer key from `OPENAI_API_KEY` if set, and the
    /// default timeouts (connect 10 s, whole request 300 s).
    pub fn new(base_url: impl Into<String>) -> Self {
        OpenAiModel {
            base_url: base_url.into(),
            api_key: env_key(Self::API_KEY_ENV),
            transport: Transport::new(DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT),
        }
    }

    /// Sends `Authorization: Bearer <api_key>`.
    pub fn with_api_key(mut self, api_key: impl Into<String>) -> Self {
        self.api_key = Some(api_key.into());
        self
    }

    /// Sends no `Authorization` header (local servers), even if `OPENAI_API_KEY` is set.
    pub fn without_api_key(mut self) -> Self {
        self.api_key = None;
        self
    }

    /// Sets the connect timeout and the whole-request timeout (connect to last body byte).
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> Self {
        self.transport = Transport::new(connect, request);
        self
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn send(&self, req: ModelRequest) -> Result<ModelResponse, ModelError> {
        let mut headers = HeaderMap::new();
        if let Some(k) = &self.api_key {
            headers.insert(
                AUTHORIZATION,
                secret_header(&format!("Bearer {k}"), "API key")?,
            );
        }
        let url = join_url(&self.base_url, "/chat/completions");
        let raw = self
            .transport
            .post_json("openai", &url, headers, &wire_request(&req))
            .await?;
        let key = self.api_key.as_deref();
        let out = if raw.is_success() {
            parse_response(&raw, &req.model)
        } else {
            Err(error_from(&raw))
        };
        out.map_err(|mut e| {
            e.message = redact(e.message, key);
            e
        })
    }
}

impl Model for OpenAiModel {
    fn provider(&self) -> &str {
        "openai"
    }

    fn call(&self, req: ModelRequest) -> BoxFuture<'_, Result<ModelResponse, ModelError>> {
        Box::pin(self.send(req))
    }
}

// ---- request ----

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

#[derive(Serialize)]
#[serde(tag = "role", rename_all = "snake_case")]
enum WireMessage<'a> {
    System {
        content: &'a str,
    },
    User {
        content: String,
    },
    Assistant {
        /// `null` when the turn is only tool calls.
        content: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<WireToolCall<'a>>,
    },
    Tool {
        tool_call_id: &'a str,
        content: Cow<'a, str>,
    },
}

#[derive(Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunctionCall<'a>,
}

#[derive(Serialize)]
struct WireFunctionCall<'a> {
    name: &'a str,
    /// The arguments as a JSON string (always valid JSON, even for `{"_raw": ..}` inputs).
    arguments: String,
}

fn wire_request(req: &ModelRequest) -> WireRequest<'_> {
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(s) = req.system.as_deref().filter(|s| !s.is_empty()) {
        messages.push(WireMessage::System { content: s });
    }
    for m in &req.messages {
        let text: Vec<&str> = m
            .content
            .iter()
            .filter_map(|b| match b {
                Block::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        let text = text.join("\n");
        match m.role {
            Role::User => {
                // Tool messages must directly follow the assistant's tool calls: they go
                // first, any text of the same turn after them.
                let mut results = 0;
                for b in &m.content {
                    if let Block::ToolResult {
                        tool_use_id,
                        content,
                        is_error,
                    } = b
                    {
                        results += 1;
                        messages.push(WireMessage::Tool {
                            tool_call_id: tool_use_id,
                            content: if *is_error {
                                Cow::Owned(format!("ERROR: {content}"))
                            } else {
                                Cow::Borrowed(content)
                            },
                        });
                    }
                }
                if results == 0 || !text.is_empty() {
                    messages.push(WireMessage::User { content: text });
                }
            }
            Role::Assistant => {
                let tool_calls: Vec<WireToolCall<'_>> = m
                    .content
                    .iter()
                    .filter_map(|b| match b {
                        Block::ToolUse { id, name, input } => Some(WireToolCall {
                            id,
                            kind: "function",
                            function: WireFunctionCall {
                                name,
                                arguments: input.to_string(),
                            },
                        }),
                        _ => None,
                    })
                    .collect();
                let content = if text.is_empty() && !tool_calls.is_empty() {
                    None
                } else {
                    Some(text)
                };
                messages.push(WireMessage::Assistant {
                    content,
                    tool_calls,
                });
            }
        }
    }
    WireRequest {
        model: &req.model,
        messages,
        tools: req
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.input_schema,
                    }
                })
            })
            .collect(),
        tool_choice: req.tool_choice.as_ref().map(|c| match c {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Any => json!("required"),
            ToolChoice::Tool { name } => json!({"type": "function", "function": {"name": name}}),
        }),
        max_tokens: req.max_tokens,
        temperature: req.temperature,
    }
}

// ---- response ----

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireReply,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireReply {
    /// A string, `null`, or (some servers) an array of `{type: "text", text}` parts.
    #[serde(default)]
    content: Value,
    #[serde(default)]
    tool_calls: Option<Vec<WireReplyCall>>,
}

#[derive(Deserialize)]
struct WireReplyCall {
    #[serde(default)]
    id: Option<String>,
    function: WireReplyFunction,
}

#[derive(Deserialize)]
struct WireReplyFunction {
    name: String,
    /// A JSON string per the spec; some servers send the object itself.
    #[serde(default)]
    arguments: Value,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<WireUsageDetails>,
}

#[derive(Deserialize)]
struct WireUsageDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

fn parse_response(raw: &RawResponse, requested: &str) -> Result<ModelResponse, ModelError> {
    let w: WireResponse =
        serde_json::from_slice(&raw.body).map_err(|e| raw.malformed("a chat completion", e))?;
    let Some(choice) = w.choices.into_iter().next() else {
        return Err(raw.malformed("a chat completion", "no choices"));
    };
    let text = match &choice.message.content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    };
    let mut content = Vec::new();
    if !text.is_empty() {
        content.push(Block::Text { text });
    }
    for (i, call) in choice
        .message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        content.push(Block::ToolUse {
            // Some local servers omit ids; the tool result must still name its call.
            id: call
                .id
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| format!("call_{i}")),
            name: call.function.name,
            input: parse_arguments(call.function.arguments),
        });
    }
    let has_calls = content.iter().any(|b| matches!(b, Block::ToolUse { .. }));
    let stop_reason = match choice.finish_reason.as_deref().unwrap_or("") {
        "tool_calls" => StopReason::ToolUse,
        // Some servers say "stop" after tool calls; the calls are what matters.
        "stop" if has_calls => StopReason::ToolUse,
        "stop" => StopReason::EndTurn,
        "length" => StopReason::MaxTokens,
        other => StopReason::Other(other.to_string()),
    };
    let usage = w
        .usage
        .map(|u| {
            let cached = u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0);
            Usage {
                input_tokens: u.prompt_tokens.unwrap_or(0).saturating_sub(cached),
                output_tokens: u.completion_tokens.unwrap_or(0),
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: cached,
            }
        })
        .unwrap_or_default();
    Ok(ModelResponse {
        id: w.id.unwrap_or_default(),
        model: w
            .model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| requested.to_string()),
        content,
        stop_reason,
        usage,
    })
}

/// Tool-call arguments as JSON: a JSON string is parsed (blank means `{}`); text that is not
/// JSON is kept as `{"_raw": text}`; an object sent as such is taken as is.
fn parse_arguments(args: Value) -> Value {
    match args {
        Value::String(s) if s.trim().is_empty() => json!({}),
        Value::String(s) => serde_json::from_str(&s).unwrap_or_else(|_| json!({ "_raw": s })),
        Value::Null => json!({}),
        other => other,
    }
}

/// A non-2xx answer: `{error: {message, type, code}}` (also `{message, type}` and
/// `{detail}` from some servers) classified; a body that is not JSON is `Malformed`.
fn error_from(raw: &RawResponse) -> ModelError {
    let v: Value = match serde_json::from_slice(&raw.body) {
        Ok(v) => v,
        // An error page that is not JSON (a wrong base URL's 404, a gateway's 502) is
        // classified by its status: retrying a 404 cannot help.
        Err(_) => {
            let text = excerpt(&raw.body);
            return raw.error(classify_status(raw.status, "", &text), text);
        }
    };
    let err = match &v["error"] {
        Value::Object(_) => &v["error"],
        _ => &v,
    };
    let code = err["code"].as_str().unwrap_or("");
    let etype = match err["type"].as_str().unwrap_or("") {
        _ if code == "insufficient_quota" => code,
        "" => code,
        t => t,
    };
    let message = err["message"]
        .as_str()
        .or_else(|| v["error"].as_str())
        .or_else(|| v["detail"].as_str())
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| excerpt(&raw.body));
    raw.error(classify_status(raw.status, etype, &message), message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Message;

    #[test]
    fn arguments_parse_or_are_kept_raw() {
        assert_eq!(parse_arguments(json!("{\"a\":1}")), json!({"a": 1}));
        assert_eq!(parse_arguments(json!("")), json!({}));
        assert_eq!(parse_arguments(json!({"a": 1})), json!({"a": 1}));
        assert_eq!(parse_arguments(json!("{a:")), json!({"_raw": "{a:"}));
    }

    #[test]
    fn tool_results_precede_the_text_of_their_turn() {
        let req = ModelRequest {
            model: "m".into(),
            system: None,
            messages: vec![Message {
                role: Role::User,
                content: vec![
                    Block::Text {
                        text: "and now?".into(),
                    },
                    Block::ToolResult {
                        tool_use_id: "c1".into(),
                        content: "boom".into(),
                        is_error: true,
                    },
                ],
            }],
            tools: vec![],
            tool_choice: None,
            max_tokens: 5,
            temperature: None,
        };
        let v = serde_json::to_value(wire_request(&req)).unwrap();
        assert_eq!(
            v["messages"],
            json!([
                {"role": "tool", "tool_call_id": "c1", "content": "ERROR: boom"},
                {"role": "user", "content": "and now?"}
            ])
        );
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let m = OpenAiModel::new("http://x/v1").with_api_key("sk-very-secret");
        assert!(!format!("{m:?}").contains("very-secret"));
    }
}
