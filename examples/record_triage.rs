//! Writes the offline data of `examples/triage`: 300 support tickets (`tickets.jsonl`) and the
//! recorded model answers the workflow file replays (`responses.jsonl`, keyed by request hash).
//!
//! The answers come from a small rule-based stand-in for the two models (it classifies by
//! keywords, asks the knowledge-base tool for the matching article, and counts categories for
//! the report), run through the real workflow file so that every request hash is the one the
//! file produces. Re-run it after changing a prompt, an agent or the tickets:
//!
//! ```text
//! cargo run --example record_triage
//! ```
//!
//! To record real answers instead, run the file against a provider and keep the run's calls:
//! `cairn run … --set models.fast.provider=anthropic …`, then
//! `cairn export RUN` holds every request and response.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use cairn::agents::spec::{FlowEnv, FlowSpec, register_flows};
use cairn::agents::{
    Block, ModelCall, ModelError, ModelRequest, ModelResponse, Role, ScriptedModel, StopReason,
    Usage,
};
use cairn::engine::{Engine, Event, Registry};
use cairn::storage::{EventStore, RedbStore, Seq};
use serde_json::{Value, json};

const SUBJECTS: &[(&str, &str, &str)] = &[
    (
        "billing",
        "Charged twice this month",
        "My card shows two charges for the same invoice. Please refund one.",
    ),
    (
        "billing",
        "Refund for unused seats",
        "We removed five seats last week; can we get a refund for them?",
    ),
    (
        "billing",
        "Plan upgrade invoice is wrong",
        "After upgrading our plan the invoice still shows the old price.",
    ),
    (
        "technical",
        "Sync stalls at 80%",
        "The desktop app stops syncing at 80% and never finishes.",
    ),
    (
        "technical",
        "Export fails for large tables",
        "Exporting a table with 50,000 rows gives an error and no file.",
    ),
    (
        "technical",
        "Dashboard shows error 500",
        "Since this morning the dashboard answers with an error 500.",
    ),
    (
        "account",
        "Cannot log in after password change",
        "I changed my password and now I cannot log in at all.",
    ),
    (
        "account",
        "Invite link did not arrive",
        "I invited a colleague but the invitation email never arrived.",
    ),
    (
        "account",
        "Locked out of SSO",
        "Our single sign-on stopped letting me in this morning.",
    ),
    (
        "general",
        "Feature request: dark mode",
        "Would love a dark mode for late-night work.",
    ),
    (
        "general",
        "Question about API limits",
        "How many requests per minute does the API allow?",
    ),
];

const NAMES: &[&str] = &[
    "Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Goran", "Hana", "Ines", "Jun",
];

fn ticket(i: usize) -> Value {
    let (_, subject, body) = SUBJECTS[(i * 7 + 3) % SUBJECTS.len()];
    let name = NAMES[(i * 3 + 1) % NAMES.len()];
    json!({
        "id": format!("T-{:05}", 1000 + i),
        "customer": name,
        "subject": subject,
        "body": format!("{body} ({name}, account #{})", 4000 + i * 13 % 997),
    })
}

/// The category a ticket's text belongs to, by keyword.
fn category(text: &str) -> &'static str {
    let t = text.to_lowercase();
    for (cat, subject, _) in SUBJECTS {
        if t.contains(&subject.to_lowercase()) {
            return cat;
        }
    }
    "general"
}

fn article(text: &str) -> &'static str {
    let t = text.to_lowercase();
    if t.contains("sync") {
        "sync.md"
    } else if t.contains("export") {
        "export.md"
    } else {
        "login.md"
    }
}

fn text_of(req: &ModelRequest) -> String {
    req.messages
        .iter()
        .map(|m| m.text())
        .collect::<Vec<_>>()
        .join("\n")
}

fn ticket_id(text: &str) -> String {
    text.split_whitespace()
        .find(|w| w.starts_with("T-"))
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric() && c != '-')
                .to_string()
        })
        .unwrap_or_else(|| "the ticket".into())
}

/// The stand-in model: deterministic answers shaped like a real model's.
fn answer(req: &ModelRequest) -> Result<ModelResponse, ModelError> {
    let system = req.system.clone().unwrap_or_default();
    let conversation = text_of(req);
    let id = ticket_id(&conversation);
    let text = |t: String| (vec![Block::Text { text: t }], StopReason::EndTurn);
    let (content, stop) = if system.starts_with("Classify") {
        let c = category(&conversation);
        text(if c == "general" {
            "other".into()
        } else {
            c.into()
        })
    } else if system.contains("technical support") {
        let result = req
            .messages
            .iter()
            .flat_map(|m| &m.content)
            .find_map(|b| match b {
                Block::ToolResult { content, .. } => Some(content.clone()),
                _ => None,
            });
        match result {
            None => (
                vec![
                    Block::Text {
                        text: "Let me check the knowledge base.".into(),
                    },
                    Block::ToolUse {
                        id: format!("toolu_{}", id.replace('-', "")),
                        name: "kb".into(),
                        input: json!({ "path": article(&conversation) }),
                    },
                ],
                StopReason::ToolUse,
            ),
            Some(r) => {
                let content: Value = serde_json::from_str(&r).unwrap_or(Value::Null);
                let fix = content["content"]
                    .as_str()
                    .unwrap_or("")
                    .lines()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                text(format!(
                    "technical: {id}: {fix} I have sent these steps to the customer."
                ))
            }
        }
    } else if system.contains("billing specialist") {
        text(format!(
            "billing: {id}: I checked the invoices and issued the correction; the customer sees it within 5 business days."
        ))
    } else if system.contains("account access") {
        text(format!(
            "account: {id}: I reset the sign-in state and re-sent the invitation; the customer can log in again."
        ))
    } else if system.contains("general questions") {
        text(format!(
            "general: {id}: Thanks for the suggestion; I logged it for the product team."
        ))
    } else if system.contains("report") {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for line in conversation.lines().filter(|l| l.starts_with("- ")) {
            let cat = ["billing", "technical", "account", "general"]
                .into_iter()
                .find(|c| line.contains(&format!(": {c}:")))
                .unwrap_or("other");
            *counts.entry(cat).or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(c, n)| format!("{c} {n}")).collect();
        text(format!(
            "Support report. Tickets by category: {}. Main themes: duplicate charges and refunds, sync and export problems, sign-in and invitations. No ticket needs escalation.",
            parts.join(", ")
        ))
    } else {
        return Err(ModelError::new(
            cairn::agents::ModelErrorKind::BadRequest,
            format!("the stand-in has no answer for system prompt `{system}`"),
        ));
    };
    let out_chars: usize = content
        .iter()
        .map(|b| match b {
            Block::Text { text } => text.len(),
            Block::ToolUse { input, .. } => input.to_string().len() + 20,
            Block::ToolResult { content, .. } => content.len(),
        })
        .sum();
    let in_chars = conversation.len() + system.len();
    Ok(ModelResponse {
        id: format!("msg_{}", &req.hash()[..16]),
        model: req.model.clone(),
        content,
        stop_reason: stop,
        usage: Usage {
            input_tokens: (in_chars / 4 + 12) as u64,
            output_tokens: (out_chars / 4 + 3) as u64,
            ..Usage::default()
        },
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/triage");
    let tickets = dir.join("tickets.jsonl");
    let mut f = std::fs::File::create(&tickets)?;
    let items: Vec<(usize, Value)> = (0..300).map(|i| (i + 1, ticket(i))).collect();
    for (_, t) in &items {
        writeln!(f, "{t}")?;
    }
    let _ = Role::User;

    let standin = Arc::new(ScriptedModel::from_fn(answer));
    let env = FlowEnv::new()
        .model("fast", standin.clone())
        .model("smart", standin.clone());
    let spec = FlowSpec::load(&dir.join("triage.toml"), &[], &env)?;
    let input = spec.input(items, &[])?;
    let tmp = tempfile::tempdir()?;
    let store = RedbStore::open(tmp.path().join("record.redb"))?;
    let mut registry = Registry::new();
    register_flows(&mut registry, env);
    let engine = Engine::new(store.clone(), registry);
    let opts = spec.start_options(&input)?;
    let out = engine.start_with(opts).await?.wait().await?;
    if out.error.is_some() {
        return Err(format!("the recording run failed: {:?}", out.error).into());
    }
    let mut responses = std::fs::File::create(dir.join("responses.jsonl"))?;
    let (mut seq, mut n) = (0u64, 0usize);
    loop {
        let page = store.read(out.run_id.parse()?, Seq(seq), 1000).await?;
        if page.is_empty() {
            break;
        }
        for e in page {
            seq = e.seq.0 + 1;
            if let Ok(Event::StepCompleted { name, output, .. }) = Event::decode(&e.payload)
                && name == "model"
            {
                let call: ModelCall = output.to_typed()?;
                writeln!(
                    responses,
                    "{}",
                    json!({ "request_hash": call.request_hash, "response": call.response })
                )?;
                n += 1;
            }
        }
    }
    println!(
        "wrote {} tickets to {} and {n} recorded answers to {}",
        input.items.len(),
        tickets.display(),
        dir.join("responses.jsonl").display()
    );
    Ok(())
}
