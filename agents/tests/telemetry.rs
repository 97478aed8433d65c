//! Live telemetry: the `tracing` spans of a durable agent run, collected by a small layer of
//! this test: run ⊃ agent ⊃ chat and execute_tool with the GenAI attributes, a failed tool
//! call and a failed step attempt marked, and no `chat` span for a call answered from the log
//! after a resume.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_agents::{
    Agent, Block, ModelError, ModelErrorKind, ModelResponse, Price, ScriptedModel, StopReason,
    ToolError, ToolRegistry, Usage, tool,
};
use cairn_engine::{Engine, Registry, RetryPolicy, StepError, StepOptions, WorkflowError};
use cairn_storage::{EventStore, RedbStore, RunStatus};
use tokio::sync::Notify;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A closed span: its name, fields, and the names of its ancestors (parent first).
#[derive(Clone, Debug, Default)]
struct SpanRec {
    name: String,
    fields: BTreeMap<String, String>,
    ancestors: Vec<String>,
}

impl SpanRec {
    fn field(&self, k: &str) -> Option<&str> {
        self.fields.get(k).map(String::as_str)
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
}

/// Records every span when it closes, and the names of the warning events.
#[derive(Clone, Default)]
struct Collect {
    closed: Arc<Mutex<Vec<SpanRec>>>,
    warnings: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
}

impl Collect {
    fn take(&self) -> Vec<SpanRec> {
        std::mem::take(&mut *self.closed.lock().unwrap())
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Collect {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("a new span");
        let mut rec = SpanRec {
            name: span.name().to_string(),
            ancestors: span.scope().skip(1).map(|s| s.name().to_string()).collect(),
            ..SpanRec::default()
        };
        attrs.record(&mut Fields(&mut rec.fields));
        span.extensions_mut().insert(rec);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("a recorded span");
        if let Some(rec) = span.extensions_mut().get_mut::<SpanRec>() {
            values.record(&mut Fields(&mut rec.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut f = BTreeMap::new();
            event.record(&mut Fields(&mut f));
            self.warnings.lock().unwrap().push(f);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).expect("a closed span");
        if let Some(rec) = span.extensions_mut().remove::<SpanRec>() {
            self.closed.lock().unwrap().push(rec);
        }
    }
}

fn usage(i: u64, o: u64) -> Usage {
    Usage {
        input_tokens: i,
        output_tokens: o,
        ..Usage::default()
    }
}

/// Turn 1 asks for `lookup` and an unknown tool (which fails), turn 2 answers.
fn script() -> Vec<ModelResponse> {
    vec![
        ModelResponse {
            id: "m1".into(),
            model: "scripted-1-resp".into(),
            content: vec![
                Block::ToolUse {
                    id: "t1".into(),
                    name: "lookup".into(),
                    input: serde_json::json!({"id": "T-7"}),
                },
                Block::ToolUse {
                    id: "t2".into(),
                    name: "weather".into(),
                    input: serde_json::json!({}),
                },
            ],
            stop_reason: StopReason::ToolUse,
            usage: usage(100, 20),
        },
        ModelResponse {
            id: "m2".into(),
            model: "scripted-1-resp".into(),
            content: vec![Block::Text {
                text: "A billing question.".into(),
            }],
            stop_reason: StopReason::EndTurn,
            usage: usage(150, 10),
        },
    ]
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Lookup {
    id: String,
}

/// `triage`: the agent, then a step that fails its first attempt, then a step waiting on
/// `gate` (if any), so a run can be stopped after the agent's calls are recorded.
fn registry(model: Arc<ScriptedModel>, gate: Option<Arc<Notify>>) -> Registry {
    let mut r = Registry::new();
    r.register("triage", 3, move |ctx, task: String| {
        let tools = ToolRegistry::new().with(tool(
            "lookup",
            "Find a ticket by id",
            |i: Lookup| async move { Ok::<_, ToolError>(serde_json::json!({"id": i.id})) },
        ));
        let agent = Agent::new("triage", model.clone(), "scripted-1")
            .tools(tools)
            .price(Price {
                input_per_mtok: 1.0,
                output_per_mtok: 5.0,
                ..Price::default()
            });
        let gate = gate.clone();
        async move {
            let run = agent.run(&ctx, &task).await?;
            let tries = AtomicU32::new(0);
            let opts = StepOptions::retry(
                RetryPolicy::exponential(3).with_initial_delay(Duration::from_millis(1)),
            );
            ctx.step_with("flaky", opts, || {
                let n = tries.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(StepError::retryable("first try fails"))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await?;
            ctx.step("after", move || async move {
                if let Some(g) = gate {
                    g.notified().await;
                }
                Ok(())
            })
            .await?;
            Ok::<_, WorkflowError>(run.text)
        }
    });
    r
}

fn named<'a>(spans: &'a [SpanRec], name: &str) -> Vec<&'a SpanRec> {
    spans.iter().filter(|s| s.name == name).collect()
}

// A current-thread runtime: every task of the run polls on this thread, under the default
// subscriber set here.
#[tokio::test]
async fn an_agent_run_has_its_span_tree_and_a_resume_sends_no_chat_span() {
    let collect = Collect::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(collect.clone()));
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(RedbStore::open(dir.path().join("t.redb")).unwrap());

    // A run stopped at its last step, after the agent's calls are recorded.
    let model = Arc::new(ScriptedModel::by_turn(script()));
    let gate = Arc::new(Notify::new());
    let engine = Engine::with_store(store.clone(), registry(model.clone(), Some(gate)));
    let h = engine.start("triage", &"Look at T-7").await.unwrap();
    let id = h.id;
    loop {
        let done = named(&collect.closed.lock().unwrap(), "step")
            .iter()
            .any(|s| {
                s.field("cairn.step_name") == Some("flaky")
                    && s.field("exception.message").is_none()
            });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    engine.shutdown();
    assert_eq!(h.wait().await.unwrap().status, RunStatus::Running);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let spans = collect.take();

    // run ⊃ agent ⊃ chat (×2) and execute_tool (×2).
    let run = named(&spans, "run");
    assert_eq!(run.len(), 1, "{spans:#?}");
    assert_eq!(run[0].field("cairn.run_id"), Some(id.to_string().as_str()));
    assert_eq!(run[0].field("cairn.workflow"), Some("triage"));
    assert_eq!(run[0].field("cairn.version"), Some("3"));
    let agent = named(&spans, "agent");
    assert_eq!(agent.len(), 1);
    assert_eq!(agent[0].ancestors, ["run"]);
    assert_eq!(agent[0].field("gen_ai.agent.name"), Some("triage"));
    assert_eq!(
        agent[0].field("gen_ai.operation.name"),
        Some("invoke_agent")
    );

    let chats = named(&spans, "chat");
    assert_eq!(chats.len(), 2, "{spans:#?}");
    let want = [(100, 20, "tool_use"), (150, 10, "end_turn")];
    for (c, (i, o, finish)) in chats.iter().zip(want) {
        assert_eq!(c.ancestors, ["step", "agent", "run"], "{c:?}");
        assert_eq!(c.field("gen_ai.operation.name"), Some("chat"));
        assert_eq!(c.field("gen_ai.provider.name"), Some("scripted"));
        assert_eq!(c.field("gen_ai.request.model"), Some("scripted-1"));
        assert_eq!(c.field("gen_ai.response.model"), Some("scripted-1-resp"));
        assert_eq!(
            c.field("gen_ai.usage.input_tokens"),
            Some(i.to_string().as_str())
        );
        assert_eq!(
            c.field("gen_ai.usage.output_tokens"),
            Some(o.to_string().as_str())
        );
        assert_eq!(c.field("gen_ai.response.finish_reasons"), Some(finish));
        let cost: f64 = c.field("cairn.cost_usd").unwrap().parse().unwrap();
        assert!(
            (cost - (i as f64 + 5.0 * o as f64) / 1e6).abs() < 1e-12,
            "{c:?}"
        );
        assert_eq!(c.field("exception.message"), None);
    }

    let mut tools = named(&spans, "execute_tool");
    tools.sort_by_key(|t| t.field("gen_ai.tool.name").map(str::to_string));
    assert_eq!(tools.len(), 2, "{spans:#?}");
    for t in &tools {
        assert_eq!(t.ancestors, ["step", "agent", "run"], "{t:?}");
        assert_eq!(t.field("gen_ai.operation.name"), Some("execute_tool"));
    }
    assert_eq!(tools[0].field("gen_ai.tool.name"), Some("lookup"));
    assert_eq!(tools[0].field("exception.message"), None);
    assert_eq!(tools[1].field("gen_ai.tool.name"), Some("weather"));
    assert_eq!(tools[1].field("error.type"), Some("tool_error"));
    assert_eq!(tools[1].field("otel.status_code"), Some("ERROR"));
    assert!(
        tools[1]
            .field("exception.message")
            .unwrap()
            .contains("unknown tool `weather`"),
        "{:?}",
        tools[1]
    );

    // One span per executed attempt; the failed one carries its error and a warning.
    let steps = named(&spans, "step");
    let flaky: Vec<_> = steps
        .iter()
        .filter(|s| s.field("cairn.step_name") == Some("flaky"))
        .collect();
    assert_eq!(flaky.len(), 2, "{steps:#?}");
    assert_eq!(flaky[0].field("cairn.attempt"), Some("1"));
    assert_eq!(flaky[0].field("exception.message"), Some("first try fails"));
    assert_eq!(flaky[0].field("otel.status_code"), Some("ERROR"));
    assert_eq!(flaky[0].field("cairn.step.will_retry"), Some("true"));
    assert_eq!(flaky[1].field("cairn.attempt"), Some("2"));
    assert_eq!(flaky[1].field("exception.message"), None);
    assert_eq!(flaky[0].ancestors, ["run"]);
    assert!(
        collect
            .warnings
            .lock()
            .unwrap()
            .iter()
            .any(|w| w.get("error").map(String::as_str) == Some("first try fails")),
        "a failed attempt emits a warning"
    );
    let models: Vec<_> = steps
        .iter()
        .filter(|s| s.field("cairn.step_name") == Some("model"))
        .collect();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0].field("cairn.step_path"), Some("0.0"));

    // Resumed: everything up to `after` is answered from the log: no chat, no tool call, no
    // span for any replayed step.
    let model2 = Arc::new(ScriptedModel::by_turn(script()));
    let engine2 = Engine::with_store(store.clone(), registry(model2.clone(), None));
    let out = engine2.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(model2.calls(), 0);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let spans = collect.take();
    assert!(named(&spans, "chat").is_empty(), "{spans:#?}");
    assert!(named(&spans, "execute_tool").is_empty(), "{spans:#?}");
    assert_eq!(named(&spans, "run").len(), 1);
    assert_eq!(
        named(&spans, "agent").len(),
        1,
        "the agent code runs again, answered from the log"
    );
    let steps: Vec<_> = named(&spans, "step")
        .iter()
        .map(|s| s.field("cairn.step_name").unwrap_or_default().to_string())
        .collect();
    assert_eq!(steps, ["after"], "only the step the log did not have runs");
}

#[tokio::test]
async fn a_failed_model_call_attempt_records_its_error_type_and_message() {
    let collect = Collect::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(collect.clone()));
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> = Arc::new(RedbStore::open(dir.path().join("t.redb")).unwrap());
    let n = Arc::new(AtomicU32::new(0));
    let model = Arc::new(ScriptedModel::from_fn(move |_| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            Err(ModelError::new(ModelErrorKind::Overloaded, "busy"))
        } else {
            Ok(script()[1].clone())
        }
    }));
    let mut r = Registry::new();
    r.register("retrying", 1, move |ctx, _: ()| {
        let agent = Agent::new("a", model.clone(), "x")
            .retry(RetryPolicy::exponential(3).with_initial_delay(Duration::from_millis(1)));
        async move { agent.run(&ctx, "hi").await.map(|r| r.text) }
    });
    let engine = Engine::with_store(store, r);
    let out = engine
        .start("retrying", &())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let spans = collect.take();
    let chats = named(&spans, "chat");
    assert_eq!(chats.len(), 2, "{spans:#?}");
    assert_eq!(chats[0].field("error.type"), Some("overloaded"));
    assert_eq!(chats[0].field("exception.message"), Some("busy"));
    assert_eq!(chats[0].field("gen_ai.usage.input_tokens"), None);
    assert_eq!(chats[1].field("exception.message"), None);
    assert_eq!(chats[1].field("gen_ai.usage.input_tokens"), Some("150"));
    let steps = named(&spans, "step");
    let model_steps: Vec<_> = steps
        .iter()
        .filter(|s| s.field("cairn.step_name") == Some("model"))
        .collect();
    assert_eq!(model_steps.len(), 2);
    assert!(
        model_steps[0]
            .field("exception.message")
            .unwrap()
            .contains("busy"),
        "{:?}",
        model_steps[0]
    );
}
