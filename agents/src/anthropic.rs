//! The Anthropic Messages API (`POST {base}/v1/messages`) as a [`Model`].
//!
//! Translates [`ModelRequest`] into the Messages wire format (text, `tool_use` and
//! `tool_result` blocks, tools with input schemas, tool choice) and the answer back; non-2xx
//! answers become [`ModelError`]s classified by [`classify_status`]. The API key is sent only
//! in the `x-api-key` header: it is never logged, printed by `Debug`, or put in an error.

use std::fmt;
use std::time::Duration;

use cairn_storage::BoxFuture;
use reqwest::header::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::http::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, RawResponse, Transport, env_key, excerpt,
    join_url, redact, secret_header,
};
use crate::model::{
    Block, Message, Model, ModelError, ModelErrorKind, ModelRequest, ModelResponse, Role,
    StopReason, ToolChoice, Usage, classify_status,
};

/// A [`Model`] that calls the Anthropic Messages API.
///
/// ```no_run
/// # use std::time::Duration;
/// # use cairn_agents::AnthropicModel;
/// let model = AnthropicModel::from_env()?
///     .with_timeouts(Duration::from_secs(5), Duration::from_secs(120));
/// # Ok::<(), cairn_agents::ModelError>(())
/// ```
#[derive(Clone)]
pub struct AnthropicModel {
    api_key: String,
    base_url: String,
    version: String,
    transport: Transport,
}

impl fmt::Debug for AnthropicModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicModel")
            .field("api_key", &"[redacted]")
            .field("base_url", &self.base_url)
            .field("version", &self.version)
            .field("connect_timeout", &self.transport.connect_timeout)
            .field("request_timeout", &self.transport.request_timeout)
            .finish()
    }
}

impl AnthropicModel {
    /// The public API's base URL, used unless [`with_base_url`](Self::with_base_url) says else.
    pub const DEFAULT_BASE_URL: &'static str = "https://api.anthropic.com";
    /// The `anthropic-version` header sent by default.
    pub const API_VERSION: &'static str = "2023-06-01";
    /// The environment variable [`from_env`](Self::from_env) reads the key from.
    pub const API_KEY_ENV: &'static str = "ANTHROPIC_API_KEY";

    /// A model client with this API key, the public base URL and the default timeouts
    /// (connect 10 s, whole request 300 s).
    pub fn new(api_key: impl Into<String>) -> Self {
        AnthropicModel {
            api_key: api_key.into(),
            base_url: Self::DEFAULT_BASE_URL.to_string(),
            version: Self::API_VERSION.to_string(),
            transport: Transport::new(DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT),
        }
    }

    /// A model client with the key from `ANTHROPIC_API_KEY`; an `Auth` error if it is unset
    /// or blank.
    pub fn from_env() -> Result<Self, ModelError> {
        key_from(Self::API_KEY_ENV).map(Self::new)
    }

    /// Sends requests to `base_url` (e.g. a proxy or a loopback fake) instead of the public
    /// API; `/v1/messages` is appended.
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        self.base_url = base_url.into();
        self
    }

    /// Sets the connect timeout and the whole-request timeout (connect to last body byte).
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> Self {
        self.transport = Transport::new(connect, request);
        self
    }

    /// Sends this `anthropic-version` header instead of [`API_VERSION`](Self::API_VERSION).
    pub fn with_api_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn send(&self, req: ModelRequest) -> Result<ModelResponse, ModelError> {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", secret_header(&self.api_key, "API key")?);
        headers.insert(
            "anthropic-version",
            HeaderValue::from_str(&self.version).map_err(|_| {
                ModelError::new(
                    ModelErrorKind::BadRequest,
                    "the anthropic-version is not a valid header value",
                )
            })?,
        );
        let url = join_url(&self.base_url, "/v1/messages");
        let raw = self
            .transport
            .post_json("anthropic", &url, headers, &wire_request(&req))
            .await?;
        let key = Some(self.api_key.as_str());
        if !raw.is_success() {
            let mut e = error_from(&raw);
            e.message = redact(e.message, key);
            return Err(e);
        }
        parse_response(&raw, &req.model).map_err(|mut e| {
            e.message = redact(e.message, key);
            e
        })
    }
}

impl Model for AnthropicModel {
    fn provider(&self) -> &str {
        "anthropic"
    }

    fn call(&self, req: ModelRequest) -> BoxFuture<'_, Result<ModelResponse, ModelError>> {
        Box::pin(self.send(req))
    }
}

fn key_from(var: &str) -> Result<String, ModelError> {
    env_key(var).ok_or_else(|| {
        ModelError::new(
            ModelErrorKind::Auth,
            format!("{var} is not set: export your Anthropic API key as {var}"),
        )
    })
}

// ---- request ----

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: Vec<WireBlock<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: &'a serde_json::Value,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: &'a str,
        is_error: bool,
    },
}

#[derive(Serialize)]
struct WireTool<'a> {
    name: &'a str,
    description: &'a str,
    input_schema: &'a serde_json::Value,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireToolChoice<'a> {
    Auto,
    Any,
    Tool { name: &'a str },
    None,
}

fn wire_request(req: &ModelRequest) -> WireRequest<'_> {
    WireRequest {
        model: &req.model,
        max_tokens: req.max_tokens,
        system: req.system.as_deref().filter(|s| !s.is_empty()),
        messages: req.messages.iter().map(wire_message).collect(),
        tools: req
            .tools
            .iter()
            .map(|t| WireTool {
                name: &t.name,
                description: &t.description,
                input_schema: &t.input_schema,
            })
            .collect(),
        tool_choice: req.tool_choice.as_ref().map(|c| match c {
            ToolChoice::Auto => WireToolChoice::Auto,
            ToolChoice::Any => WireToolChoice::Any,
            ToolChoice::Tool { name } => WireToolChoice::Tool { name },
            ToolChoice::None => WireToolChoice::None,
        }),
        temperature: req.temperature,
    }
}

fn wire_message(m: &Message) -> WireMessage<'_> {
    let blank = |b: &Block| matches!(b, Block::Text { text } if text.trim().is_empty());
    // The API rejects blank text blocks; drop them when the message has other content.
    let drop_blank = m.content.iter().any(|b| !blank(b));
    WireMessage {
        role: match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        },
        content: m
            .content
            .iter()
            .filter(|b| !(drop_blank && blank(b)))
            .map(|b| match b {
                Block::Text { text } => WireBlock::Text { text },
                Block::ToolUse { id, name, input } => WireBlock::ToolUse { id, name, input },
                Block::ToolResult {
                    tool_use_id,
                    content,
                    is_error,
                } => WireBlock::ToolResult {
                    tool_use_id,
                    content,
                    is_error: *is_error,
                },
            })
            .collect(),
    }
}

// ---- response ----

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: Option<String>,
    content: Vec<WireContent>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireContent {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: serde_json::Value,
    },
    /// Block types this client does not ask for (thinking, server tools): skipped.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

fn parse_response(raw: &RawResponse, requested: &str) -> Result<ModelResponse, ModelError> {
    let w: WireResponse =
        serde_json::from_slice(&raw.body).map_err(|e| raw.malformed("an Anthropic message", e))?;
    let content = w
        .content
        .into_iter()
        .filter_map(|c| match c {
            WireContent::Text { text } => Some(Block::Text { text }),
            WireContent::ToolUse { id, name, input } => Some(Block::ToolUse {
                id,
                name,
                input: if input.is_null() {
                    serde_json::json!({})
                } else {
                    input
                },
            }),
            WireContent::Other => None,
        })
        .collect();
    let usage = w
        .usage
        .map(|u| Usage {
            input_tokens: u.input_tokens.unwrap_or(0),
            output_tokens: u.output_tokens.unwrap_or(0),
            cache_creation_input_tokens: u.cache_creation_input_tokens.unwrap_or(0),
            cache_read_input_tokens: u.cache_read_input_tokens.unwrap_or(0),
        })
        .unwrap_or_default();
    Ok(ModelResponse {
        id: w.id,
        model: w
            .model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| requested.to_string()),
        content,
        stop_reason: stop_reason(w.stop_reason.as_deref().unwrap_or("")),
        usage,
    })
}

fn stop_reason(s: &str) -> StopReason {
    match s {
        "end_turn" => StopReason::EndTurn,
        "tool_use" => StopReason::ToolUse,
        "max_tokens" => StopReason::MaxTokens,
        "stop_sequence" => StopReason::StopSequence,
        "refusal" => StopReason::Refusal,
        other => StopReason::Other(other.to_string()),
    }
}

/// A non-2xx answer: `{type: "error", error: {type, message}}` classified; a body that is not
/// JSON is `Malformed`.
fn error_from(raw: &RawResponse) -> ModelError {
    let v: serde_json::Value = match serde_json::from_slice(&raw.body) {
        Ok(v) => v,
        // An error page that is not JSON (a wrong base URL's 404, a gateway's 502) is
        // classified by its status: retrying a 404 cannot help.
        Err(_) => {
            let text = excerpt(&raw.body);
            return raw.error(classify_status(raw.status, "", &text), text);
        }
    };
    let err = &v["error"];
    let etype = err["type"].as_str().unwrap_or("");
    let message = match err["message"].as_str().filter(|m| !m.is_empty()) {
        Some(m) => m.to_string(),
        None if !etype.is_empty() => etype.to_string(),
        None => excerpt(&raw.body),
    };
    raw.error(classify_status(raw.status, etype, &message), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_key_is_a_clear_auth_error() {
        let e = key_from("CAIRN_TEST_SURELY_UNSET_ANTHROPIC_KEY").unwrap_err();
        assert_eq!(e.kind, ModelErrorKind::Auth);
        assert!(
            e.message
                .contains("CAIRN_TEST_SURELY_UNSET_ANTHROPIC_KEY is not set")
        );
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let m = AnthropicModel::new("sk-ant-very-secret");
        assert!(!format!("{m:?}").contains("very-secret"));
    }

    #[test]
    fn blank_text_blocks_are_dropped_next_to_other_content() {
        let m = Message {
            role: Role::Assistant,
            content: vec![
                Block::Text { text: " ".into() },
                Block::ToolUse {
                    id: "t".into(),
                    name: "n".into(),
                    input: serde_json::json!({}),
                },
            ],
        };
        let v = serde_json::to_value(wire_message(&m)).unwrap();
        assert_eq!(v["content"].as_array().unwrap().len(), 1);
        assert_eq!(v["content"][0]["type"], "tool_use");
    }
}
