//! Quickstart: a durable workflow written in Rust.
//!
//! Run it, kill it while it works (Ctrl-C or `kill -9`), and run it again: the second run
//! recovers the interrupted one and finishes it without executing completed steps again.
//!
//! ```text
//! cargo run --example quickstart            # starts a run, ~4 s of work
//! cargo run --example quickstart            # after a kill: resumes it where it was
//! cargo run -- --store quickstart.redb show <RUN>
//! ```

use std::time::Duration;

use cairn::{Engine, RedbStore, Registry, StepError, WorkflowContext, WorkflowError};
use serde_json::{Value, json};

/// Pretends to do slow work (a model call, an HTTP request) and returns `what`.
async fn slow(what: String) -> Result<String, StepError> {
    tokio::time::sleep(Duration::from_millis(400)).await;
    Ok(what)
}

/// The workflow: find sources for a topic, read each, then write a report.
async fn report(ctx: WorkflowContext, topic: String) -> Result<Value, WorkflowError> {
    let t = topic.clone();
    let sources: Vec<String> = ctx
        .step("search", || async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok((1..=6).map(|i| format!("{t} source #{i}")).collect())
        })
        .await?;
    let mut notes = Vec::new();
    for s in sources {
        let note: String = ctx.step("read", || slow(format!("notes on {s}"))).await?;
        eprintln!("  {note}");
        notes.push(note);
    }
    // Non-determinism only through the context: the id is recorded, so a resume sees the same.
    let report_id = ctx.uuid().await?;
    let summary = ctx.handoff_summary();
    let words: usize = ctx
        .step("write", || async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok(summary.split_whitespace().count())
        })
        .await?;
    Ok(json!({ "report_id": report_id, "topic": topic, "notes": notes.len(), "words": words }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut registry = Registry::new();
    registry.register("report", 1, report);
    let engine = Engine::new(RedbStore::open("quickstart.redb")?, registry);

    // Anything a killed process left running is picked up first.
    let recovered = engine.recover().await?;
    for (id, e) in &recovered.failed {
        eprintln!("run {id} cannot be resumed: {e}");
    }
    let recovered = recovered.handles;
    let handles = if recovered.is_empty() {
        let h = engine.start("report", &"durable execution").await?;
        println!(
            "run {} started: kill me now (Ctrl-C), then run me again",
            h.id
        );
        vec![h]
    } else {
        for h in &recovered {
            println!("run {} recovered from the log", h.id);
        }
        recovered
    };
    for h in handles {
        let out = h.wait().await?;
        println!(
            "run {} {}: {} steps executed, {} answered from the log",
            out.run_id, out.status, out.steps_executed, out.steps_replayed
        );
        println!("output: {}", out.output.unwrap_or_default());
        println!(
            "inspect: cargo run -- --store quickstart.redb show {}",
            out.run_id
        );
    }
    Ok(())
}
