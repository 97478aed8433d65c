//! `cairn bench batch`: a workflow file over N items (default 10,000), each item routed by a
//! router's classifier to one of two agents, C items at a time (default 64), against the
//! in-process zero-latency fake Anthropic server over loopback HTTP: items/s, the engine's
//! overhead per item (against the same two calls per item without the engine) and the store's
//! bytes per item.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use cairn_agents::spec::{FlowEnv, FlowFollower, FlowSpec, register_flows};
use cairn_agents::{AnthropicModel, Message, Model, ModelRequest};
use cairn_engine::{Engine, Registry};
use cairn_storage::{Durability, RedbStore, StoreOptions};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{fake_llm, workflows};

/// The workflow file the workload runs (the models are replaced by the fake server's client).
const BATCH_FLOW: &str = r#"[workflow]
name = "bench-batch"

[models.fast]
provider = "anthropic"
model = "claude-haiku-4-5"
price = { input_per_mtok = 1.0, output_per_mtok = 5.0 }

[agents.billing]
model = "fast"
system = "You handle billing tickets. Answer in one sentence."
max_tokens = 200

[agents.technical]
model = "fast"
system = "You handle technical tickets. Answer in one sentence."
max_tokens = 200

[routers.triage]
model = "fast"

[routers.triage.routes.billing]
agent = "billing"
description = "charges, refunds, invoices"

[routers.triage.routes.technical]
agent = "technical"
description = "everything else"

[[flow]]
id = "items"
for_each = "items"
key = "id"
concurrency = 64

[[flow.steps]]
id = "triage"
router = "triage"
prompt = "Ticket {{ item.id }}: {{ item.subject }}"
"#;

/// Model calls per item: the classifier and the agent it routes to.
pub const BATCH_CALLS_PER_ITEM: u64 = 2;

/// What `bench batch` measured.
#[derive(Debug, Serialize)]
pub struct BatchResult {
    /// Items in the batch.
    pub items: u32,
    /// Items at once.
    pub concurrency: u32,
    /// Wall time of the durable batch.
    pub secs: f64,
    /// Items per second, durable.
    pub items_per_sec: f64,
    /// Wall time of the same calls without the engine.
    pub plain_secs: f64,
    /// Items per second without the engine.
    pub plain_items_per_sec: f64,
    /// Process CPU per item with the engine minus without it, in microseconds.
    pub overhead_cpu_us_per_item: f64,
    /// Wall time per item with the engine minus without it, in microseconds (at the
    /// concurrency, so a share of the batch's time, not a latency).
    pub overhead_wall_us_per_item: f64,
    /// The store file's size after the batch, per item.
    pub store_bytes_per_item: f64,
    /// Model calls the fake server received during the durable batch.
    pub model_calls: u64,
}

fn subject(i: u32) -> &'static str {
    const S: &[&str] = &[
        "Charged twice this month",
        "Sync stalls at 80%",
        "Refund for unused seats",
        "Export fails for large tables",
        "Invoice shows the old price",
        "Dashboard error 500",
    ];
    S[(i as usize * 7 + 3) % S.len()]
}

fn item(i: u32) -> Value {
    json!({ "id": format!("T-{:06}", i), "subject": subject(i) })
}

/// The two calls of one item without the engine (the classifier, then the routed agent).
async fn plain_item(model: &dyn Model, i: u32) -> Result<()> {
    let task = format!("Ticket T-{i:06}: {}", subject(i));
    let classify = ModelRequest {
        model: "claude-haiku-4-5".into(),
        system: Some("Classify the task into exactly one of these categories.".into()),
        messages: vec![Message::user(task.clone())],
        tools: vec![],
        tool_choice: None,
        max_tokens: 16,
        temperature: None,
    };
    let category = model.call(classify).await?.text();
    let answer = ModelRequest {
        model: "claude-haiku-4-5".into(),
        system: Some(format!(
            "You handle {category} tickets. Answer in one sentence."
        )),
        messages: vec![Message::user(task)],
        tools: vec![],
        tool_choice: None,
        max_tokens: 200,
        temperature: None,
    };
    model.call(answer).await?;
    Ok(())
}

/// `batch`: see the module documentation.
pub async fn bench_batch(dir: &Path, items: u32, concurrency: u32) -> Result<BatchResult> {
    let fake = fake_llm::FakeLlm::start().await?;
    let url = fake.url();
    let client = || -> Arc<dyn Model> {
        Arc::new(
            AnthropicModel::new(workflows::LOOPBACK_PLACEHOLDER_KEY).with_base_url(url.clone()),
        )
    };

    // Without the engine.
    let plain = client();
    let cpu = crate::bench::process_cpu_secs();
    let started = Instant::now();
    crate::bench::run_bounded(items, concurrency, move |i| {
        let m = Arc::clone(&plain);
        async move { plain_item(m.as_ref(), i).await }
    })
    .await?;
    let plain_secs = started.elapsed().as_secs_f64();
    let plain_cpu = crate::bench::process_cpu_secs() - cpu;

    // With the engine: the workflow file through `cairn run`'s code path.
    let file = dir.join("batch.toml");
    std::fs::write(
        &file,
        BATCH_FLOW.replace("concurrency = 64", &format!("concurrency = {concurrency}")),
    )?;
    let env = FlowEnv::new().model("fast", client());
    let spec = FlowSpec::load(&file, &[], &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    let input = spec
        .input((0..items).map(|i| (0, item(i))).collect(), &[])
        .map_err(|e| anyhow::anyhow!(e))?;
    let path = dir.join("batch.redb");
    let store = RedbStore::open_with(
        &path,
        StoreOptions {
            durability: Durability::Immediate,
            ..Default::default()
        },
    )?;
    let mut registry = Registry::new();
    register_flows(&mut registry, env);
    let engine = Engine::new(store.clone(), registry);
    let calls_before = fake.requests();
    let cpu = crate::bench::process_cpu_secs();
    let started = Instant::now();
    let h = engine
        .start_with(spec.start_options(&input).map_err(|e| anyhow::anyhow!(e))?)
        .await?;
    let out = h.wait().await?;
    let secs = started.elapsed().as_secs_f64();
    let cpu_engine = crate::bench::process_cpu_secs() - cpu;
    let model_calls = fake.requests() - calls_before;
    if out.error.is_some() {
        bail!("the batch run failed: {}", out.error.unwrap_or_default());
    }
    let mut follower = FlowFollower::new(out.run_id.parse()?);
    let results = follower.poll(&store).await?;
    let wrong = results
        .iter()
        .filter(|r| {
            let want = fake_llm::batch_category(subject(r.index));
            !r.ok
                || r.output
                    .as_ref()
                    .is_none_or(|o| o["triage"]["category"] != want)
        })
        .count();
    if results.len() != items as usize
        || wrong > 0
        || model_calls != u64::from(items) * BATCH_CALLS_PER_ITEM
    {
        bail!(
            "the batch recorded {} results ({wrong} wrong) and sent {model_calls} model calls; expected {items} right results and {} calls",
            results.len(),
            u64::from(items) * BATCH_CALLS_PER_ITEM
        );
    }
    drop(engine);
    drop(store);
    let bytes = std::fs::metadata(&path)?.len() as f64;
    let n = f64::from(items);
    Ok(BatchResult {
        items,
        concurrency,
        secs,
        items_per_sec: n / secs,
        plain_secs,
        plain_items_per_sec: n / plain_secs,
        overhead_cpu_us_per_item: (cpu_engine - plain_cpu) / n * 1e6,
        overhead_wall_us_per_item: (secs - plain_secs) / n * 1e6,
        store_bytes_per_item: bytes / n,
        model_calls,
    })
}

/// The target: at least this many items per second on the 2-core machine.
pub const BATCH_TARGET_ITEMS_PER_SEC: f64 = 1000.0;

/// The table row of `batch`.
pub fn row(b: &BatchResult) -> [String; 3] {
    [
        "batch".to_string(),
        format!(
            "{:.0} items/s\n{:.0} µs CPU overhead/item",
            b.items_per_sec, b.overhead_cpu_us_per_item
        ),
        format!(
            "{} items × (classifier + agent), {} at a time, workflow file, fake Anthropic server \
             on loopback · categories checked\nengine {:.2} s · without the engine {:.2} s \
             ({:.0} items/s) · {:.0} µs wall overhead/item\n{:.0} bytes on disk per item · {} \
             model calls",
            b.items,
            b.concurrency,
            b.secs,
            b.plain_secs,
            b.plain_items_per_sec,
            b.overhead_wall_us_per_item,
            b.store_bytes_per_item,
            b.model_calls
        ),
    ]
}

/// The verdicts of `batch`.
pub fn targets(b: &BatchResult) -> Vec<(&'static str, String, bool, String)> {
    vec![(
        "batch_items_per_sec",
        format!(
            "batch: ≥ {BATCH_TARGET_ITEMS_PER_SEC:.0} items/s (router + one agent per item, durable)"
        ),
        b.items_per_sec >= BATCH_TARGET_ITEMS_PER_SEC,
        format!(
            "{} items in {:.2} s = {:.0} items/s",
            b.items, b.secs, b.items_per_sec
        ),
    )]
}
