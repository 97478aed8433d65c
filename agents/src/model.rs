//! The provider-neutral model interface: messages with content blocks, tool specs, usage,
//! stop reasons, and the errors a provider returns, classified for retries.
//!
//! Providers (Anthropic Messages, OpenAI-compatible chat completions, scripted) translate
//! between these types and their wire formats; the agent loop only sees these.

use std::fmt;
use std::time::Duration;

use cairn_storage::BoxFuture;
use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user (or the workflow speaking for it, including tool results).
    User,
    /// The model.
    Assistant,
}

/// One piece of a message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    /// Plain text.
    Text {
        /// The text.
        text: String,
    },
    /// The model asks for a tool call.
    ToolUse {
        /// The call's id, echoed by its result.
        id: String,
        /// The tool's name.
        name: String,
        /// The arguments, as JSON.
        input: serde_json::Value,
    },
    /// The result of a tool call, sent back to the model.
    ToolResult {
        /// The id of the `tool_use` block this answers.
        tool_use_id: String,
        /// The result as text (JSON results are serialized).
        content: String,
        /// Whether the call failed (unknown tool, bad arguments, tool error).
        #[serde(default)]
        is_error: bool,
    },
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its content blocks, in order.
    pub content: Vec<Block>,
}

impl Message {
    /// A user message with one text block.
    pub fn user(text: impl Into<String>) -> Self {
        Message {
            role: Role::User,
            content: vec![Block::Text { text: text.into() }],
        }
    }

    /// An assistant message with one text block.
    pub fn assistant(text: impl Into<String>) -> Self {
        Message {
            role: Role::Assistant,
            content: vec![Block::Text { text: text.into() }],
        }
    }

    /// The message's text blocks joined.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for b in &self.content {
            if let Block::Text { text } = b {
                out.push_str(text);
            }
        }
        out
    }
}

/// A tool the model may call: name, description and the JSON schema of its input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The tool's name.
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// The JSON schema of its input object.
    pub input_schema: serde_json::Value,
}

/// How the model must use tools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides.
    Auto,
    /// The model must call some tool.
    Any,
    /// The model must call this tool.
    Tool {
        /// The tool's name.
        name: String,
    },
    /// The model must not call tools.
    None,
}

/// One request to a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRequest {
    /// The provider's model id (e.g. `claude-haiku-4-5`).
    pub model: String,
    /// The system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// The tools offered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// How tools must be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// The most tokens to generate.
    pub max_tokens: u32,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
}

impl ModelRequest {
    /// A content hash of the request (blake3 of its canonical JSON), recorded with each call.
    pub fn hash(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// Why the model stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It finished its answer.
    EndTurn,
    /// It asks for tool calls.
    ToolUse,
    /// It hit `max_tokens`.
    MaxTokens,
    /// It hit a stop sequence.
    StopSequence,
    /// It refused.
    Refusal,
    /// Something else, as the provider named it.
    Other(String),
}

/// Tokens used by one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens billed at the normal rate.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens written to the prompt cache.
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the prompt cache.
    #[serde(default)]
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// Every token of the call, cached ones included: what `[budget]` limits.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens
            + self.output_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;

    /// The sum of two usages (per agent, per run).
    fn add(self, o: Usage) -> Usage {
        Usage {
            input_tokens: self.input_tokens + o.input_tokens,
            output_tokens: self.output_tokens + o.output_tokens,
            cache_creation_input_tokens: self.cache_creation_input_tokens
                + o.cache_creation_input_tokens,
            cache_read_input_tokens: self.cache_read_input_tokens + o.cache_read_input_tokens,
        }
    }
}

/// A model's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelResponse {
    /// The provider's response id.
    #[serde(default)]
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// The content blocks.
    pub content: Vec<Block>,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Tokens used.
    #[serde(default)]
    pub usage: Usage,
}

impl ModelResponse {
    /// The text blocks joined.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for b in &self.content {
            if let Block::Text { text } = b {
                out.push_str(text);
            }
        }
        out
    }

    /// The tool calls asked for, in order.
    pub fn tool_uses(&self) -> impl Iterator<Item = (&str, &str, &serde_json::Value)> {
        self.content.iter().filter_map(|b| match b {
            Block::ToolUse { id, name, input } => Some((id.as_str(), name.as_str(), input)),
            _ => None,
        })
    }
}

/// What kind of failure a model call had; decides whether it is retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ModelErrorKind {
    /// 429: too many requests; retried after the server's `retry-after` when given.
    RateLimited,
    /// 529 or an `overloaded_error`: retried with backoff.
    Overloaded,
    /// 5xx: retried with backoff.
    Server,
    /// Connect or read timeout, connection reset: retried with backoff.
    Network,
    /// A body that is not the expected JSON: retried with backoff (proxies garble answers).
    Malformed,
    /// 401/403: the key is missing, wrong or not allowed; not retried.
    Auth,
    /// 400/404/413/422: the request is wrong (or the model unknown); not retried.
    BadRequest,
    /// The account's credit or spend limit is exhausted; not retried.
    SpendLimit,
}

/// A failed model call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelError {
    /// The failure's class.
    pub kind: ModelErrorKind,
    /// The HTTP status, if there was a response.
    pub status: Option<u16>,
    /// What the provider said, or what went wrong.
    pub message: String,
    /// How long the server asked us to wait (`retry-after`).
    pub retry_after_ms: Option<u64>,
}

impl ModelError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ModelErrorKind, message: impl Into<String>) -> Self {
        ModelError {
            kind,
            status: None,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ModelErrorKind::RateLimited
                | ModelErrorKind::Overloaded
                | ModelErrorKind::Server
                | ModelErrorKind::Network
                | ModelErrorKind::Malformed
        )
    }

    /// The server's requested wait, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after_ms.map(Duration::from_millis)
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ModelErrorKind::RateLimited => "rate limited",
            ModelErrorKind::Overloaded => "overloaded",
            ModelErrorKind::Server => "server error",
            ModelErrorKind::Network => "network error",
            ModelErrorKind::Malformed => "malformed response",
            ModelErrorKind::Auth => "not authorized (check the API key)",
            ModelErrorKind::BadRequest => "bad request",
            ModelErrorKind::SpendLimit => "spend limit reached (raise it with the provider)",
        };
        match self.status {
            Some(s) => write!(f, "{what} (HTTP {s}): {}", self.message),
            None => write!(f, "{what}: {}", self.message),
        }
    }
}

impl std::error::Error for ModelError {}

/// A language model the agent loop can call.
pub trait Model: Send + Sync + 'static {
    /// The provider's name, for logs and audit (`anthropic`, `openai`, `scripted`).
    fn provider(&self) -> &str;

    /// Sends one request and returns the answer. Implementations do not retry: the durable
    /// step around the call does, recording every attempt.
    fn call(&self, req: ModelRequest) -> BoxFuture<'_, Result<ModelResponse, ModelError>>;
}

/// Parses a `retry-after` header value: seconds (possibly fractional) or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let t = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = (t.timestamp_millis() - chrono::Utc::now().timestamp_millis()).max(0);
    Some(Duration::from_millis(ms as u64))
}

/// Classifies an HTTP error status (with the provider's error type string, if any).
pub fn classify_status(status: u16, error_type: &str, message: &str) -> ModelErrorKind {
    let m = message.to_lowercase();
    if m.contains("credit balance")
        || m.contains("spend limit")
        || m.contains("insufficient_quota")
        || error_type == "insufficient_quota"
    {
        return ModelErrorKind::SpendLimit;
    }
    match status {
        429 => ModelErrorKind::RateLimited,
        529 => ModelErrorKind::Overloaded,
        401 | 403 => ModelErrorKind::Auth,
        500..=599 if error_type == "overloaded_error" => ModelErrorKind::Overloaded,
        500..=599 => ModelErrorKind::Server,
        408 => ModelErrorKind::Network,
        _ => ModelErrorKind::BadRequest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("soon"), None);
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let d = parse_retry_after(&later).unwrap();
        assert!(d > Duration::from_secs(25) && d <= Duration::from_secs(30));
    }

    #[test]
    fn statuses_are_classified_for_retries() {
        assert_eq!(
            classify_status(429, "rate_limit_error", ""),
            ModelErrorKind::RateLimited
        );
        assert_eq!(
            classify_status(529, "overloaded_error", ""),
            ModelErrorKind::Overloaded
        );
        assert_eq!(
            classify_status(500, "api_error", ""),
            ModelErrorKind::Server
        );
        assert_eq!(
            classify_status(401, "authentication_error", ""),
            ModelErrorKind::Auth
        );
        assert_eq!(
            classify_status(400, "invalid_request_error", "bad"),
            ModelErrorKind::BadRequest
        );
        assert_eq!(
            classify_status(
                400,
                "invalid_request_error",
                "Your credit balance is too low"
            ),
            ModelErrorKind::SpendLimit
        );
        assert!(ModelError::new(ModelErrorKind::Server, "x").is_retryable());
        assert!(!ModelError::new(ModelErrorKind::Auth, "x").is_retryable());
    }

    #[test]
    fn blocks_use_the_wire_tags() {
        let b = Block::ToolUse {
            id: "t1".into(),
            name: "lookup".into(),
            input: serde_json::json!({"q": 1}),
        };
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["type"], "tool_use");
        let back: Block = serde_json::from_value(v).unwrap();
        assert_eq!(back, b);
    }
}
