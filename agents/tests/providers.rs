//! The Anthropic and OpenAI-compatible providers over real HTTP against loopback fakes that
//! speak the wire formats, count requests and record them.

mod fake;

use std::time::{Duration, Instant};

use cairn_agents::{
    AnthropicModel, Block, Message, Model, ModelErrorKind, ModelRequest, OpenAiModel, Role,
    StopReason, ToolChoice, ToolSpec, Usage,
};
use fake::{FakeServer, Reply, closed_port_url};
use serde_json::json;

const KEY: &str = "sk-ant-test-SECRET-0123456789";

fn lookup_tool() -> ToolSpec {
    ToolSpec {
        name: "lookup".into(),
        description: "Looks a word up.".into(),
        input_schema: json!({
            "type": "object",
            "properties": {"q": {"type": "string"}},
            "required": ["q"]
        }),
    }
}

fn request(messages: Vec<Message>) -> ModelRequest {
    ModelRequest {
        model: "claude-test".into(),
        system: None,
        messages,
        tools: vec![],
        tool_choice: None,
        max_tokens: 256,
        temperature: None,
    }
}

fn anthropic(server: &FakeServer) -> AnthropicModel {
    AnthropicModel::new(KEY)
        .with_base_url(server.url())
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(10))
}

fn anthropic_message(content: serde_json::Value, stop: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-test-20250101",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 7}
        }),
    )
}

fn anthropic_error(status: u16, etype: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"type": "error", "error": {"type": etype, "message": message}}),
    )
}

// ---------------------------------------------------------------- Anthropic

#[tokio::test]
async fn anthropic_multi_turn_tool_use_then_end_turn() {
    let server = FakeServer::script(vec![
        anthropic_message(
            json!([
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "cairn"}}
            ]),
            "tool_use",
        ),
        anthropic_message(
            json!([{"type": "text", "text": "A cairn is a pile of stones."}]),
            "end_turn",
        ),
    ])
    .await;
    // A trailing slash on the base URL is fine.
    let model = AnthropicModel::new(KEY).with_base_url(format!("{}/", server.url()));
    assert_eq!(model.provider(), "anthropic");

    let mut req = request(vec![Message::user("What is a cairn?")]);
    req.system = Some("Be brief.".into());
    req.tools = vec![lookup_tool()];
    req.tool_choice = Some(ToolChoice::Auto);
    req.temperature = Some(0.5);

    let first = model.call(req.clone()).await.unwrap();
    assert_eq!(first.id, "msg_01");
    assert_eq!(first.model, "claude-test-20250101");
    assert_eq!(first.stop_reason, StopReason::ToolUse);
    assert_eq!(first.text(), "Let me look.");
    let calls: Vec<_> = first.tool_uses().collect();
    assert_eq!(calls, vec![("toolu_1", "lookup", &json!({"q": "cairn"}))]);
    assert_eq!(
        first.usage,
        Usage {
            input_tokens: 12,
            output_tokens: 7,
            ..Usage::default()
        }
    );

    let r1 = server.last();
    assert_eq!(r1.method, "POST");
    assert_eq!(r1.path, "/v1/messages");
    assert_eq!(r1.header("x-api-key"), Some(KEY));
    assert_eq!(r1.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(r1.header("content-type"), Some("application/json"));
    assert_eq!(
        r1.json(),
        json!({
            "model": "claude-test",
            "max_tokens": 256,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What is a cairn?"}]}
            ],
            "tools": [{
                "name": "lookup",
                "description": "Looks a word up.",
                "input_schema": {
                    "type": "object",
                    "properties": {"q": {"type": "string"}},
                    "required": ["q"]
                }
            }],
            "tool_choice": {"type": "auto"},
            "temperature": 0.5
        })
    );

    // Second turn: the assistant's blocks and the tool result go back.
    req.messages.push(Message {
        role: Role::Assistant,
        content: first.content.clone(),
    });
    req.messages.push(Message {
        role: Role::User,
        content: vec![Block::ToolResult {
            tool_use_id: "toolu_1".into(),
            content: "a pile of stones".into(),
            is_error: false,
        }],
    });
    req.tool_choice = Some(ToolChoice::Tool {
        name: "lookup".into(),
    });
    let second = model.call(req).await.unwrap();
    assert_eq!(second.stop_reason, StopReason::EndTurn);
    assert_eq!(second.text(), "A cairn is a pile of stones.");
    assert_eq!(second.tool_uses().count(), 0);

    let r2 = server.last().json();
    assert_eq!(
        r2["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "What is a cairn?"}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "cairn"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": "a pile of stones", "is_error": false}
            ]}
        ])
    );
    assert_eq!(r2["tool_choice"], json!({"type": "tool", "name": "lookup"}));
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn anthropic_parallel_tool_use_blocks() {
    let server = FakeServer::script(vec![anthropic_message(
        json!([
            {"type": "tool_use", "id": "toolu_a", "name": "lookup", "input": {"q": "one"}},
            {"type": "tool_use", "id": "toolu_b", "name": "lookup", "input": {"q": "two"}},
            {"type": "tool_use", "id": "toolu_c", "name": "clock", "input": {}}
        ]),
        "tool_use",
    )])
    .await;
    let mut req = request(vec![Message::user("all at once")]);
    req.tools = vec![lookup_tool()];
    req.tool_choice = Some(ToolChoice::Any);
    let resp = anthropic(&server).call(req).await.unwrap();
    assert_eq!(resp.stop_reason, StopReason::ToolUse);
    assert_eq!(resp.text(), "");
    let calls: Vec<_> = resp.tool_uses().collect();
    assert_eq!(
        calls,
        vec![
            ("toolu_a", "lookup", &json!({"q": "one"})),
            ("toolu_b", "lookup", &json!({"q": "two"})),
            ("toolu_c", "clock", &json!({})),
        ]
    );
    assert_eq!(server.last().json()["tool_choice"], json!({"type": "any"}));

    // The results go back in one user message, in order, errors flagged.
    let server2 = FakeServer::script(vec![anthropic_message(
        json!([{"type": "text", "text": "ok"}]),
        "end_turn",
    )])
    .await;
    let mut req = request(vec![
        Message::user("all at once"),
        Message {
            role: Role::Assistant,
            content: resp.content.clone(),
        },
        Message {
            role: Role::User,
            content: vec![
                Block::ToolResult {
                    tool_use_id: "toolu_a".into(),
                    content: "1".into(),
                    is_error: false,
                },
                Block::ToolResult {
                    tool_use_id: "toolu_b".into(),
                    content: "no such word".into(),
                    is_error: true,
                },
                Block::ToolResult {
                    tool_use_id: "toolu_c".into(),
                    content: "{\"now\":\"noon\"}".into(),
                    is_error: false,
                },
            ],
        },
    ]);
    req.tool_choice = Some(ToolChoice::None);
    anthropic(&server2).call(req).await.unwrap();
    let body = server2.last().json();
    assert_eq!(body["messages"][2]["content"][1]["is_error"], json!(true));
    assert_eq!(body["messages"][2]["content"][2]["tool_use_id"], "toolu_c");
    assert_eq!(body["messages"][1]["content"].as_array().unwrap().len(), 3);
    assert_eq!(body["tool_choice"], json!({"type": "none"}));
    assert!(body.get("tools").is_none(), "no tools, no tools field");
}

#[tokio::test]
async fn anthropic_usage_with_cache_tokens_and_stop_reasons() {
    let usage_reply = Reply::json(
        200,
        json!({
            "id": "msg_02", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "cached"}
            ],
            "stop_reason": "end_turn",
            "usage": {
                "input_tokens": 5, "output_tokens": 3,
                "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 2000
            }
        }),
    );
    let mut replies = vec![usage_reply];
    for stop in ["max_tokens", "stop_sequence", "refusal", "pause_turn"] {
        replies.push(anthropic_message(
            json!([{"type": "text", "text": "x"}]),
            stop,
        ));
    }
    let server = FakeServer::script(replies).await;
    let model = anthropic(&server);
    let r = model
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap();
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 5,
            output_tokens: 3,
            cache_creation_input_tokens: 1000,
            cache_read_input_tokens: 2000,
        }
    );
    // Block types we do not ask for (thinking) are skipped.
    assert_eq!(
        r.content,
        vec![Block::Text {
            text: "cached".into()
        }]
    );
    let mut stops = Vec::new();
    for _ in 0..4 {
        let r = model
            .call(request(vec![Message::user("hi")]))
            .await
            .unwrap();
        stops.push(r.stop_reason);
    }
    assert_eq!(
        stops,
        vec![
            StopReason::MaxTokens,
            StopReason::StopSequence,
            StopReason::Refusal,
            StopReason::Other("pause_turn".into()),
        ]
    );
    assert_eq!(server.count(), 5);
}

#[tokio::test]
async fn anthropic_429_with_retry_after_is_rate_limited() {
    let server = FakeServer::script(vec![
        anthropic_error(
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        )
        .header("retry-after", "2"),
    ])
    .await;
    let e = anthropic(&server)
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::RateLimited);
    assert_eq!(e.status, Some(429));
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
    assert!(e.message.contains("rate limit"), "{}", e.message);
    assert_eq!(server.count(), 1, "providers do not retry by themselves");
}

#[tokio::test]
async fn anthropic_529_is_overloaded_and_500_is_server() {
    let server = FakeServer::script(vec![
        anthropic_error(529, "overloaded_error", "Overloaded"),
        anthropic_error(500, "api_error", "Internal server error"),
    ])
    .await;
    let model = anthropic(&server);
    let e = model
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Overloaded);
    assert_eq!(e.status, Some(529));
    assert_eq!(e.message, "Overloaded");
    assert!(e.is_retryable());
    assert_eq!(e.retry_after(), None);

    let e = model
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Server);
    assert_eq!(e.status, Some(500));
    assert!(e.is_retryable());
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn anthropic_401_is_auth_without_the_key() {
    // The server even echoes the key: it must not reach the error.
    let server = FakeServer::script(vec![anthropic_error(
        401,
        "authentication_error",
        &format!("invalid x-api-key {KEY}"),
    )])
    .await;
    let e = anthropic(&server)
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Auth);
    assert_eq!(e.status, Some(401));
    assert!(!e.is_retryable());
    let shown = e.to_string();
    assert!(shown.contains("check the API key"), "{shown}");
    assert!(shown.contains("invalid x-api-key"), "{shown}");
    assert!(!shown.contains(KEY), "{shown}");
    assert!(!format!("{e:?}").contains(KEY));
    assert!(!format!("{:?}", anthropic(&server)).contains(KEY));
}

#[tokio::test]
async fn anthropic_400_low_credit_is_spend_limit() {
    let server = FakeServer::script(vec![anthropic_error(
        400,
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
    )])
    .await;
    let e = anthropic(&server)
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::SpendLimit);
    assert_eq!(e.status, Some(400));
    assert!(!e.is_retryable());
    assert!(e.message.contains("credit balance is too low"));
}

#[tokio::test]
async fn anthropic_malformed_bodies() {
    let garbage = format!("{{\"id\": \"msg\", \"content\": [tr{}", "x".repeat(5000));
    let server = FakeServer::script(vec![
        Reply::text(200, &garbage).header("content-type", "application/json"),
        // Valid JSON, wrong shape.
        Reply::json(200, json!({"id": "msg", "content": "not a list"})),
        // A proxy's HTML error page.
        Reply::text(502, "<html><body>Bad Gateway</body></html>").header("retry-after", "1"),
    ])
    .await;
    let model = anthropic(&server);
    let e = model
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Malformed);
    assert_eq!(e.status, Some(200));
    assert!(e.is_retryable());
    assert!(e.message.contains("HTTP 200"), "{}", e.message);
    assert!(e.message.contains("{\"id\": \"msg\""), "{}", e.message);
    assert!(
        e.message.len() < 600,
        "excerpt is truncated: {}",
        e.message.len()
    );

    let e = model
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Malformed);

    let e = model
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    // A non-JSON error page is classified by its status: a 502 is a (retryable) server error.
    assert_eq!(e.kind, ModelErrorKind::Server);
    assert!(e.is_retryable());
    assert_eq!(e.status, Some(502));
    assert!(e.message.contains("Bad Gateway"), "{}", e.message);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
}

#[tokio::test]
async fn anthropic_slow_server_times_out_as_network() {
    let server = FakeServer::script(vec![
        anthropic_message(json!([{"type": "text", "text": "late"}]), "end_turn")
            .delay(Duration::from_secs(10)),
    ])
    .await;
    let model = AnthropicModel::new(KEY)
        .with_base_url(server.url())
        .with_timeouts(Duration::from_secs(1), Duration::from_millis(300));
    let started = Instant::now();
    let e = model
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.kind, ModelErrorKind::Network, "{e}");
    assert!(e.is_retryable());
    assert_eq!(e.status, None);
    assert!(e.message.contains("timed out"), "{}", e.message);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "returned after {took:?}"
    );
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn anthropic_closed_port_is_network() {
    let model = AnthropicModel::new(KEY)
        .with_base_url(closed_port_url().await)
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(5));
    let started = Instant::now();
    let e = model
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Network, "{e}");
    assert!(e.is_retryable());
    assert!(!e.to_string().contains(KEY));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn live_anthropic_round_trip() {
    if std::env::var("ANTHROPIC_API_KEY").map_or(true, |k| k.trim().is_empty()) {
        println!("skipped: ANTHROPIC_API_KEY not set");
        return;
    }
    let model = AnthropicModel::from_env().unwrap();
    let mut req = request(vec![Message::user("Reply with the single word: pong")]);
    req.model = "claude-haiku-4-5".into();
    req.max_tokens = 16;
    let r = model.call(req).await.expect("live call succeeds");
    assert!(!r.id.is_empty());
    assert!(r.model.starts_with("claude-haiku-4-5"), "{}", r.model);
    assert!(matches!(
        r.stop_reason,
        StopReason::EndTurn | StopReason::MaxTokens
    ));
    assert!(!r.text().is_empty());
    assert!(r.usage.input_tokens > 0 && r.usage.output_tokens > 0);
    println!("live: {:?} {:?}", r.text(), r.usage);
}

// ---------------------------------------------------------------- OpenAI-compatible

fn openai(server: &FakeServer) -> OpenAiModel {
    OpenAiModel::new(format!("{}/v1", server.url()))
        .with_api_key("sk-oai-test-SECRET")
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(10))
}

fn completion(message: serde_json::Value, finish: &str, usage: serde_json::Value) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "qwen-test",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage
        }),
    )
}

fn small_usage() -> serde_json::Value {
    json!({"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})
}

#[tokio::test]
async fn openai_tool_calls_round_trip() {
    let server = FakeServer::script(vec![
        completion(
            json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "lookup", "arguments": "{\"q\":\"cairn\"}"}},
                    {"id": "call_2", "type": "function",
                     "function": {"name": "lookup", "arguments": "{\"q\":\"stone\"}"}}
                ]
            }),
            "tool_calls",
            small_usage(),
        ),
        completion(
            json!({"role": "assistant", "content": "Both found."}),
            "stop",
            small_usage(),
        ),
    ])
    .await;
    let model = openai(&server);
    assert_eq!(model.provider(), "openai");
    let mut req = request(vec![Message::user("Look up cairn and stone.")]);
    req.model = "qwen-test".into();
    req.system = Some("You are terse.".into());
    req.tools = vec![lookup_tool()];
    req.tool_choice = Some(ToolChoice::Tool {
        name: "lookup".into(),
    });
    req.max_tokens = 64;

    let first = model.call(req.clone()).await.unwrap();
    assert_eq!(first.id, "chatcmpl-1");
    assert_eq!(first.model, "qwen-test");
    assert_eq!(first.stop_reason, StopReason::ToolUse);
    assert_eq!(
        first.content,
        vec![
            Block::ToolUse {
                id: "call_1".into(),
                name: "lookup".into(),
                input: json!({"q": "cairn"})
            },
            Block::ToolUse {
                id: "call_2".into(),
                name: "lookup".into(),
                input: json!({"q": "stone"})
            },
        ]
    );
    assert_eq!(first.usage.input_tokens, 10);
    assert_eq!(first.usage.output_tokens, 4);

    let r1 = server.last();
    assert_eq!(r1.method, "POST");
    assert_eq!(r1.path, "/v1/chat/completions");
    assert_eq!(
        r1.header("authorization"),
        Some("Bearer sk-oai-test-SECRET")
    );
    assert_eq!(r1.header("content-type"), Some("application/json"));
    assert_eq!(
        r1.json(),
        json!({
            "model": "qwen-test",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Look up cairn and stone."}
            ],
            "tools": [{"type": "function", "function": {
                "name": "lookup",
                "description": "Looks a word up.",
                "parameters": {
                    "type": "object",
                    "properties": {"q": {"type": "string"}},
                    "required": ["q"]
                }
            }}],
            "tool_choice": {"type": "function", "function": {"name": "lookup"}},
            "max_tokens": 64
        })
    );

    req.messages.push(Message {
        role: Role::Assistant,
        content: first.content.clone(),
    });
    req.messages.push(Message {
        role: Role::User,
        content: vec![
            Block::ToolResult {
                tool_use_id: "call_1".into(),
                content: "a pile of stones".into(),
                is_error: false,
            },
            Block::ToolResult {
                tool_use_id: "call_2".into(),
                content: "lookup failed".into(),
                is_error: true,
            },
        ],
    });
    req.tool_choice = Some(ToolChoice::Any);
    let second = model.call(req).await.unwrap();
    assert_eq!(second.stop_reason, StopReason::EndTurn);
    assert_eq!(
        second.content,
        vec![Block::Text {
            text: "Both found.".into()
        }]
    );

    let r2 = server.last().json();
    assert_eq!(
        r2["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Look up cairn and stone."},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "lookup", "arguments": "{\"q\":\"cairn\"}"}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "lookup", "arguments": "{\"q\":\"stone\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a pile of stones"},
            {"role": "tool", "tool_call_id": "call_2", "content": "ERROR: lookup failed"}
        ])
    );
    assert_eq!(r2["tool_choice"], "required");
    assert_eq!(server.count(), 2);
}

#[tokio::test]
async fn openai_finish_reason_mapping() {
    let text = |t: &str| json!({"role": "assistant", "content": t});
    let server = FakeServer::script(vec![
        completion(text("done"), "stop", small_usage()),
        completion(text("trunc"), "length", small_usage()),
        completion(text("filtered"), "content_filter", small_usage()),
        // Some servers say "stop" after tool calls.
        completion(
            json!({"role": "assistant", "content": "calling", "tool_calls": [
                {"id": "c9", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
            ]}),
            "stop",
            small_usage(),
        ),
    ])
    .await;
    let model = OpenAiModel::new(format!("{}/v1", server.url())).without_api_key();
    let mut got = Vec::new();
    for _ in 0..4 {
        let r = model
            .call(request(vec![Message::user("hi")]))
            .await
            .unwrap();
        got.push((r.stop_reason.clone(), r.text()));
    }
    assert_eq!(
        got,
        vec![
            (StopReason::EndTurn, "done".to_string()),
            (StopReason::MaxTokens, "trunc".to_string()),
            (
                StopReason::Other("content_filter".into()),
                "filtered".to_string()
            ),
            (StopReason::ToolUse, "calling".to_string()),
        ]
    );
    assert_eq!(server.last().header("authorization"), None);
    // Plain assistant text goes back as a string, with no tool_calls field.
    let server2 = FakeServer::script(vec![completion(text("ok"), "stop", small_usage())]).await;
    OpenAiModel::new(format!("{}/v1", server2.url()))
        .without_api_key()
        .call(request(vec![
            Message::user("a"),
            Message::assistant("b"),
            Message::user("c"),
        ]))
        .await
        .unwrap();
    assert_eq!(
        server2.last().json()["messages"],
        json!([
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}
        ])
    );
}

#[tokio::test]
async fn openai_cached_tokens_are_cache_reads() {
    let server = FakeServer::script(vec![completion(
        json!({"role": "assistant", "content": "hi"}),
        "stop",
        json!({
            "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0}
        }),
    )])
    .await;
    let r = openai(&server)
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap();
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 86,
            output_tokens: 300,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 1920,
        }
    );
}

#[tokio::test]
async fn openai_bad_arguments_are_kept_raw() {
    let server = FakeServer::script(vec![completion(
        json!({"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_x", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"q\": \"cairn\""}}
        ]}),
        "tool_calls",
        small_usage(),
    )])
    .await;
    let r = openai(&server)
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap();
    assert_eq!(
        r.content,
        vec![Block::ToolUse {
            id: "call_x".into(),
            name: "lookup".into(),
            input: json!({"_raw": "{\"q\": \"cairn\""}),
        }]
    );
    assert_eq!(r.stop_reason, StopReason::ToolUse);
}

#[tokio::test]
async fn openai_errors_are_classified() {
    let server = FakeServer::script(vec![
        Reply::json(
            429,
            json!({"error": {
                "message": "You exceeded your current quota, please check your plan and billing details.",
                "type": "insufficient_quota", "param": null, "code": "insufficient_quota"
            }}),
        ),
        Reply::json(
            429,
            json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
        )
        .header("retry-after", "3"),
        Reply::json(
            503,
            json!({"error": {"message": "The server is overloaded or not ready yet.", "type": "server_error", "code": null}}),
        ),
        Reply::json(
            401,
            json!({"error": {"message": "Incorrect API key provided: sk-oai-test-SECRET", "type": "invalid_request_error", "code": "invalid_api_key"}}),
        ),
        // vLLM's flat error shape.
        Reply::json(
            404,
            json!({"object": "error", "message": "The model `nope` does not exist.", "type": "NotFoundError", "param": null, "code": 404}),
        ),
    ])
    .await;
    let model = openai(&server);
    let mut errs = Vec::new();
    for _ in 0..5 {
        errs.push(
            model
                .call(request(vec![Message::user("hi")]))
                .await
                .unwrap_err(),
        );
    }
    assert_eq!(errs[0].kind, ModelErrorKind::SpendLimit);
    assert_eq!(errs[0].status, Some(429));
    assert!(!errs[0].is_retryable());

    assert_eq!(errs[1].kind, ModelErrorKind::RateLimited);
    assert_eq!(errs[1].retry_after(), Some(Duration::from_secs(3)));

    assert_eq!(errs[2].kind, ModelErrorKind::Server);
    assert_eq!(errs[2].status, Some(503));
    assert!(errs[2].is_retryable());
    assert!(errs[2].message.contains("overloaded or not ready"));

    assert_eq!(errs[3].kind, ModelErrorKind::Auth);
    assert!(!errs[3].to_string().contains("sk-oai-test-SECRET"));

    assert_eq!(errs[4].kind, ModelErrorKind::BadRequest);
    assert_eq!(errs[4].message, "The model `nope` does not exist.");
    assert_eq!(server.count(), 5);
}

#[tokio::test]
async fn openai_closed_port_is_network() {
    let e = OpenAiModel::new(format!("{}/v1", closed_port_url().await))
        .without_api_key()
        .call(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ModelErrorKind::Network, "{e}");
}
