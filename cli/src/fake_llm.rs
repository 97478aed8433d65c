//! A fake Anthropic Messages server for `cairn bench agents`: started in this process on
//! `127.0.0.1:0`, it speaks the real wire format (`POST /v1/messages`, JSON requests with
//! `tool_use`/`tool_result` blocks, `message` answers with usage, `error` bodies otherwise) over
//! HTTP/1.1 with keep-alive, answers at once and counts the requests it receives.
//!
//! Its answers follow a fixed three-turn script chosen from the request (the number of
//! assistant messages already in the conversation), never from a counter, so a resumed run
//! gets the same answers:
//!
//! 1. no assistant message yet: `tool_use` `lookup_ticket {id}`, with the first `T-…` word of
//!    the task as the id;
//! 2. one: `tool_use` `word_count {text}`, with the subject from the `lookup_ticket` result;
//! 3. two: `end_turn` with [`final_text`] of the ticket's id, category and the count.
//!
//! A request offering no tools (`cairn bench batch`: a router's classifier and the agents it
//! routes to) gets one `end_turn` answer: [`batch_category`] of the task for a classifier,
//! `Handled: <first line of the task>` otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The largest request head the server reads.
const MAX_HEAD: usize = 64 * 1024;
/// The largest request body the server reads.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// The final answer of a scripted conversation about ticket `id`.
pub fn final_text(id: &str, category: &str, words: u64) -> String {
    format!("Ticket {id} is a {category} ticket; its subject has {words} words.")
}

/// A running fake server; it stops when dropped.
pub struct FakeLlm {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeLlm {
    /// Starts the server on a free loopback port, on the current tokio runtime.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the fake LLM server to 127.0.0.1:0")?;
        let addr = listener
            .local_addr()
            .context("cannot read the fake LLM server's address")?;
        let requests = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let _ = sock.set_nodelay(true);
                tokio::spawn(serve(sock, Arc::clone(&count)));
            }
        });
        Ok(FakeLlm {
            addr,
            requests,
            task,
        })
    }

    /// The base URL (`http://127.0.0.1:<port>`), for `AnthropicModel::with_base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests it has received (answered or not).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection: requests one after another (keep-alive) until the client closes it.
async fn serve(mut sock: TcpStream, count: Arc<AtomicU64>) {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let mut scanned = 0;
        let head_end = loop {
            if let Some(p) = buf[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
                break scanned + p;
            }
            scanned = buf.len().saturating_sub(3);
            if buf.len() > MAX_HEAD {
                return;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let path = first.next().unwrap_or("").to_string();
        let mut len = 0usize;
        let mut chunked = false;
        let mut close = false;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                len = v.parse().unwrap_or(0);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                close = v.eq_ignore_ascii_case("close");
            }
        }
        if chunked || len > MAX_BODY {
            let _ = respond(
                &mut sock,
                411,
                &error_body(
                    "invalid_request_error",
                    "the fake server needs a content-length",
                ),
            )
            .await;
            return;
        }
        while buf.len() < len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        count.fetch_add(1, Ordering::SeqCst);
        let (status, reply) = answer(&method, &path, &body);
        if respond(&mut sock, status, &reply).await.is_err() || close {
            return;
        }
    }
}

/// Writes one JSON response.
async fn respond(sock: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    sock.write_all(&out).await
}

/// An Anthropic error body.
fn error_body(etype: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "error",
        "error": { "type": etype, "message": message },
    }))
    .unwrap_or_default()
}

/// The status and body answering one request.
fn answer(method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    if method != "POST" || path != "/v1/messages" {
        return (
            404,
            error_body("not_found_error", &format!("no route {method} {path}")),
        );
    }
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                400,
                error_body(
                    "invalid_request_error",
                    &format!("the body is not JSON: {e}"),
                ),
            );
        }
    };
    match reply(&req) {
        Ok(v) => (200, serde_json::to_vec(&v).unwrap_or_default()),
        Err(m) => (400, error_body("invalid_request_error", &m)),
    }
}

/// The category the fake classifier gives a task: `billing` if it mentions money, else
/// `technical`.
pub fn batch_category(task: &str) -> &'static str {
    let t = task.to_lowercase();
    if t.contains("charge") || t.contains("refund") || t.contains("invoice") {
        "billing"
    } else {
        "technical"
    }
}

/// The `message` answering a Messages request, by turn (see the module documentation).
fn reply(req: &Value) -> Result<Value, String> {
    let model = req["model"].as_str().ok_or("`model` is missing")?;
    let messages = req["messages"]
        .as_array()
        .ok_or("`messages` is missing or not an array")?;
    let turn = messages.iter().filter(|m| m["role"] == "assistant").count();
    let blocks = || {
        messages
            .iter()
            .filter_map(|m| m["content"].as_array())
            .flatten()
    };
    // The content of the result of the first call of `tool` in the conversation.
    let result_of = |tool: &str| -> Option<String> {
        let id = blocks()
            .filter(|b| b["type"] == "tool_use" && b["name"] == tool)
            .find_map(|b| b["id"].as_str())?;
        blocks()
            .find(|b| b["type"] == "tool_result" && b["tool_use_id"] == id)
            .and_then(|b| b["content"].as_str())
            .map(str::to_string)
    };
    let ticket = || -> Result<Value, String> {
        let text = result_of("lookup_ticket").ok_or("no lookup_ticket result")?;
        serde_json::from_str(&text).map_err(|e| format!("the ticket is not JSON ({e}): {text}"))
    };
    // A request without tools gets a one-turn answer: a category word for a router's
    // classifier, else a short reply naming the task (`cairn bench batch`).
    if req["tools"].as_array().is_none_or(|t| t.is_empty()) {
        let system = req["system"].as_str().unwrap_or("");
        let task = blocks().find_map(|b| b["text"].as_str()).unwrap_or("");
        let text = if system.starts_with("Classify") {
            batch_category(task).to_string()
        } else {
            format!("Handled: {}", task.lines().next().unwrap_or(""))
        };
        return Ok(json!({
            "id": format!("msg_fake_{turn}"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{ "type": "text", "text": text }],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": { "input_tokens": 20 + task.len() as u64 / 4, "output_tokens": 8 },
        }));
    }
    let (content, stop) = match turn {
        0 => {
            let task = blocks()
                .find_map(|b| b["text"].as_str())
                .ok_or("no task text")?;
            let id = task
                .split(|c: char| c.is_whitespace() || c == ',' || c == '.' || c == ':')
                .find(|w| w.starts_with("T-"))
                .unwrap_or("T-00000");
            (
                json!([
                    { "type": "text", "text": "Let me look the ticket up." },
                    { "type": "tool_use", "id": "toolu_lookup", "name": "lookup_ticket",
                      "input": { "id": id } },
                ]),
                "tool_use",
            )
        }
        1 => {
            let t = ticket()?;
            let subject = t["subject"].as_str().ok_or("the ticket has no subject")?;
            (
                json!([
                    { "type": "tool_use", "id": "toolu_count", "name": "word_count",
                      "input": { "text": subject } },
                ]),
                "tool_use",
            )
        }
        _ => {
            let t = ticket()?;
            let words: u64 = result_of("word_count")
                .ok_or("no word_count result")?
                .trim()
                .parse()
                .map_err(|e| format!("the word count is not a number: {e}"))?;
            let text = final_text(
                t["id"].as_str().unwrap_or(""),
                t["category"].as_str().unwrap_or(""),
                words,
            );
            (json!([{ "type": "text", "text": text }]), "end_turn")
        }
    };
    let input_tokens = 20 + 10 * messages.len() as u64;
    Ok(json!({
        "id": format!("msg_fake_{turn}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": { "input_tokens": input_tokens, "output_tokens": 12 },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three turns of the script, fed back their tool results.
    #[test]
    fn a_request_without_tools_gets_one_answer_a_category_for_a_classifier() {
        let req = |system: &str, text: &str| {
            json!({"model": "m", "max_tokens": 10, "system": system,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]})
        };
        let r = reply(&req(
            "Classify the task into one of",
            "Refund for unused seats",
        ))
        .unwrap();
        assert_eq!(r["content"][0]["text"], "billing");
        assert_eq!(r["stop_reason"], "end_turn");
        let r = reply(&req("You handle tickets.", "Ticket T-1: Sync stalls\nmore")).unwrap();
        assert_eq!(r["content"][0]["text"], "Handled: Ticket T-1: Sync stalls");
    }

    #[test]
    fn the_script_asks_for_two_tools_then_answers() {
        let mut messages = vec![json!({"role": "user", "content": [
            {"type": "text", "text": "Triage ticket T-01042, please."}]})];
        let tools = json!([{"name": "lookup_ticket", "input_schema": {"type": "object"}}]);
        let req = |m: &Vec<Value>| json!({"model": "claude-x", "max_tokens": 10, "messages": m, "tools": tools});
        let r0 = reply(&req(&messages)).unwrap();
        assert_eq!(r0["stop_reason"], "tool_use");
        assert_eq!(r0["content"][1]["input"]["id"], "T-01042");
        let ticket = crate::workflows::lookup_ticket("T-01042");
        messages.push(json!({"role": "assistant", "content": r0["content"]}));
        messages.push(json!({"role": "user", "content": [{"type": "tool_result",
            "tool_use_id": "toolu_lookup", "content": ticket.to_string(), "is_error": false}]}));
        let r1 = reply(&req(&messages)).unwrap();
        assert_eq!(r1["content"][0]["name"], "word_count");
        let subject = ticket["subject"].as_str().unwrap();
        assert_eq!(r1["content"][0]["input"]["text"], subject);
        messages.push(json!({"role": "assistant", "content": r1["content"]}));
        let n = crate::workflows::word_count(subject);
        messages.push(json!({"role": "user", "content": [{"type": "tool_result",
            "tool_use_id": "toolu_count", "content": n.to_string(), "is_error": false}]}));
        let r2 = reply(&req(&messages)).unwrap();
        assert_eq!(r2["stop_reason"], "end_turn");
        assert_eq!(
            r2["content"][0]["text"],
            final_text("T-01042", ticket["category"].as_str().unwrap(), n)
        );
        let (status, _) = answer("GET", "/v1/messages", b"");
        assert_eq!(status, 404);
    }
}
