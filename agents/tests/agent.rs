//! The durable agent loop over a real redb file with a scripted model: tool use, error
//! results, retries of model calls, limits, and resume without repeating recorded calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cairn_agents::{
    Agent, AgentRun, Block, ModelError, ModelErrorKind, ModelResponse, Price, ScriptedModel,
    StopReason, ToolError, ToolRegistry, Usage, tool,
};
use cairn_engine::{Engine, Event, Registry, RetryPolicy, WorkflowError};
use cairn_storage::{EventStore, RedbStore, RunId, RunStatus, Seq};
use tokio::sync::Notify;

fn store() -> (tempfile::TempDir, Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path().join("t.redb")).unwrap();
    (dir, Arc::new(s))
}

fn usage(i: u64, o: u64) -> Usage {
    Usage {
        input_tokens: i,
        output_tokens: o,
        ..Usage::default()
    }
}

/// Turn 1 asks for two tools (one unknown), turn 2 answers.
fn script() -> Vec<ModelResponse> {
    vec![
        ModelResponse {
            id: "m1".into(),
            model: "scripted-1".into(),
            content: vec![
                Block::Text {
                    text: "Let me look.".into(),
                },
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
            model: "scripted-1".into(),
            content: vec![Block::Text {
                text: "T-7 is a billing question.".into(),
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

fn tools(calls: Arc<AtomicU32>) -> ToolRegistry {
    ToolRegistry::new().with(tool("lookup", "Find a ticket by id", move |i: Lookup| {
        let calls = Arc::clone(&calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ToolError>(serde_json::json!({"id": i.id, "subject": "charged twice"}))
        }
    }))
}

fn registry(
    model: Arc<ScriptedModel>,
    tool_calls: Arc<AtomicU32>,
    gate: Option<Arc<Notify>>,
) -> Registry {
    let mut r = Registry::new();
    r.register("triage", 1, move |ctx, task: String| {
        let agent = Agent::new("triage", model.clone(), "scripted-1")
            .system("You triage support tickets.")
            .tools(tools(tool_calls.clone()))
            .price(Price {
                input_per_mtok: 1.0,
                output_per_mtok: 5.0,
                ..Price::default()
            });
        let gate = gate.clone();
        async move {
            let run = agent.run(&ctx, &task).await?;
            ctx.step("after", move || async move {
                if let Some(g) = gate {
                    g.notified().await;
                }
                Ok(())
            })
            .await?;
            Ok::<_, WorkflowError>(run)
        }
    });
    r
}

#[tokio::test]
async fn the_tool_loop_runs_tools_reports_errors_and_records_every_call() {
    let (_d, store) = store();
    let model = Arc::new(ScriptedModel::by_turn(script()));
    let tool_calls = Arc::new(AtomicU32::new(0));
    let engine = Engine::with_store(
        store.clone(),
        registry(model.clone(), tool_calls.clone(), None),
    );
    let out = engine
        .start("triage", &"Look at T-7")
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    let run: AgentRun = serde_json::from_value(out.output.unwrap()).unwrap();
    assert_eq!(run.text, "T-7 is a billing question.");
    assert_eq!((run.turns, run.tool_calls, run.tool_errors), (2, 2, 1));
    assert_eq!(run.usage, usage(250, 30));
    assert!((run.cost_usd.unwrap() - (250.0 * 1.0 + 30.0 * 5.0) / 1e6).abs() < 1e-12);
    // The conversation: user, assistant (tool uses), user (tool results), assistant.
    assert_eq!(run.messages.len(), 4);
    let Block::ToolResult {
        content, is_error, ..
    } = &run.messages[2].content[1]
    else {
        panic!("{:?}", run.messages[2])
    };
    assert!(*is_error && content.contains("unknown tool `weather`") && content.contains("lookup"));
    assert_eq!(model.calls(), 2);
    assert_eq!(tool_calls.load(Ordering::SeqCst), 1);
    // The log: a scope, model, two tool calls, model, in order of position.
    let id: RunId = out.run_id.parse().unwrap();
    let steps: Vec<(String, String)> = store
        .read(id, Seq(0), 100)
        .await
        .unwrap()
        .iter()
        .filter_map(|e| match Event::decode(&e.payload).unwrap() {
            Event::StepCompleted { path, name, .. } => Some((path.to_string(), name)),
            _ => None,
        })
        .collect();
    let mut sorted = steps.clone();
    sorted.sort();
    let names: Vec<&str> = sorted.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "cairn.scope:agent:triage",
            "model",
            "tool:lookup",
            "tool:weather",
            "model",
            "after"
        ]
    );
}

#[tokio::test]
async fn a_resumed_agent_sends_no_recorded_model_or_tool_call_again() {
    let (_d, store) = store();
    let model = Arc::new(ScriptedModel::by_turn(script()));
    let tool_calls = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Notify::new());
    let engine = Engine::with_store(
        store.clone(),
        registry(model.clone(), tool_calls.clone(), Some(gate.clone())),
    );
    let h = engine.start("triage", &"Look at T-7").await.unwrap();
    let id = h.id;
    while model.calls() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    engine.shutdown();
    assert_eq!(h.wait().await.unwrap().status, RunStatus::Running);

    let model2 = Arc::new(ScriptedModel::by_turn(script()));
    let tool_calls2 = Arc::new(AtomicU32::new(0));
    let engine2 = Engine::with_store(
        store.clone(),
        registry(model2.clone(), tool_calls2.clone(), None),
    );
    let out = engine2.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(
        model2.calls(),
        0,
        "recorded model calls are answered from the log"
    );
    assert_eq!(
        tool_calls2.load(Ordering::SeqCst),
        0,
        "recorded tool calls too"
    );
}

#[tokio::test]
async fn retryable_model_errors_are_retried_with_the_servers_wait_and_terminal_ones_fail() {
    let (_d, store) = store();
    let attempts = Arc::new(AtomicU32::new(0));
    let a = attempts.clone();
    let model = Arc::new(ScriptedModel::from_fn(move |_req| {
        match a.fetch_add(1, Ordering::SeqCst) {
            0 => Err(ModelError {
                kind: ModelErrorKind::RateLimited,
                status: Some(429),
                message: "slow down".into(),
                retry_after_ms: Some(300),
            }),
            1 => Err(ModelError::new(ModelErrorKind::Overloaded, "overloaded")),
            _ => Ok(script()[1].clone()),
        }
    }));
    let m = model.clone();
    let mut r = Registry::new();
    r.register("retrying", 1, move |ctx, _: ()| {
        let agent = Agent::new("a", m.clone(), "x").retry(
            RetryPolicy::exponential(4)
                .with_initial_delay(Duration::from_millis(10))
                .with_jitter(false),
        );
        async move { agent.run(&ctx, "hi").await.map(|r| r.text) }
    });
    let engine = Engine::with_store(store.clone(), r);
    let t = std::time::Instant::now();
    let out = engine
        .start("retrying", &())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(
        out.output,
        Some(serde_json::json!("T-7 is a billing question."))
    );
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "the 429's retry-after was honoured"
    );
    let id: RunId = out.run_id.parse().unwrap();
    let failed: Vec<String> = store
        .read(id, Seq(0), 100)
        .await
        .unwrap()
        .iter()
        .filter_map(|e| match Event::decode(&e.payload).unwrap() {
            Event::StepFailed { error, .. } => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 2, "every failed attempt is recorded");
    assert!(failed[0].contains("HTTP 429"));

    let m2 = Arc::new(ScriptedModel::from_fn(|_| {
        Err(ModelError::new(ModelErrorKind::Auth, "invalid x-api-key"))
    }));
    let mut r = Registry::new();
    let mm = m2.clone();
    r.register("denied", 1, move |ctx, _: ()| {
        let agent = Agent::new("a", mm.clone(), "x");
        async move { agent.run(&ctx, "hi").await.map(|r| r.text) }
    });
    let out = Engine::with_store(store, r)
        .start("denied", &())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Failed);
    assert!(out.error.unwrap().contains("check the API key"));
    assert_eq!(m2.calls(), 1, "an auth error is not retried");
}

#[tokio::test]
async fn an_agent_that_never_finishes_stops_at_its_turn_limit() {
    let (_d, store) = store();
    let looping = ModelResponse {
        id: "x".into(),
        model: "x".into(),
        content: vec![Block::ToolUse {
            id: "t".into(),
            name: "lookup".into(),
            input: serde_json::json!({"id": "again"}),
        }],
        stop_reason: StopReason::ToolUse,
        usage: Usage::default(),
    };
    let model = Arc::new(ScriptedModel::from_fn(move |_| Ok(looping.clone())));
    let m = model.clone();
    let mut r = Registry::new();
    r.register("loop", 1, move |ctx, _: ()| {
        let agent = Agent::new("looper", m.clone(), "x")
            .tools(tools(Arc::default()))
            .max_turns(3);
        async move { agent.run(&ctx, "go").await.map(|r| r.text) }
    });
    let out = Engine::with_store(store, r)
        .start("loop", &())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Failed);
    assert!(out.error.unwrap().contains("all 3 turns"));
    assert_eq!(model.calls(), 3);
}

#[tokio::test]
async fn crossing_the_run_budget_parks_the_run_until_the_budget_is_raised() {
    use cairn_agents::{Budget, BudgetLimits};
    let (_d, store) = store();
    let model = Arc::new(ScriptedModel::by_turn(script()));
    let m = model.clone();
    let mut r = Registry::new();
    r.register("budgeted", 1, move |ctx, _: ()| {
        // 100 + 20 tokens after the first call: the second call would start over 100.
        let budget = Arc::new(Budget::new(BudgetLimits {
            max_tokens: Some(100),
            max_cost_usd: None,
        }));
        let agent = Agent::new("triage", m.clone(), "x")
            .tools(tools(Arc::default()))
            .budget(budget);
        async move { agent.run(&ctx, "T-7").await.map(|r| r.text) }
    });
    let engine = cairn_engine::Engine::with_options(
        store.clone(),
        r,
        cairn_engine::EngineOptions {
            suspend_after: Duration::from_millis(50),
            ..Default::default()
        },
    );
    let out = engine
        .start("budgeted", &())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(
        out.status,
        RunStatus::Waiting,
        "stopped cleanly, not failed"
    );
    assert_eq!(model.calls(), 1);
    let id: RunId = out.run_id.parse().unwrap();
    let exhausted = store
        .read(id, Seq(0), 100)
        .await
        .unwrap()
        .iter()
        .find_map(|e| match Event::decode(&e.payload).unwrap() {
            Event::StepCompleted { name, output, .. } if name == "budget_exhausted" => {
                Some(output.to_json())
            }
            _ => None,
        })
        .expect("the reason is recorded");
    assert_eq!(exhausted["spent_tokens"], 120);
    assert_eq!(exhausted["limits"]["max_tokens"], 100);
    // Raise it: the run continues where it stopped and finishes.
    engine
        .signal(id, "budget", serde_json::json!({"max_tokens": 1000}))
        .await
        .unwrap();
    let out = engine.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(
        out.output,
        Some(serde_json::json!("T-7 is a billing question."))
    );
    assert_eq!(model.calls(), 2, "the first call was not made again");
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Email {
    to: String,
}

#[tokio::test]
async fn an_interrupted_non_idempotent_tool_parks_the_run_for_review_and_the_answer_reaches_the_model()
 {
    use cairn_agents::tool_at_most_once;
    let (_d, store) = store();
    let email_turns = vec![
        ModelResponse {
            id: "m1".into(),
            model: "x".into(),
            content: vec![Block::ToolUse {
                id: "e1".into(),
                name: "send_email".into(),
                input: serde_json::json!({"to": "ada@example.com"}),
            }],
            stop_reason: StopReason::ToolUse,
            usage: Usage::default(),
        },
        script()[1].clone(),
    ];
    let sent = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Notify::new());
    let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
    let make = |sent: Arc<AtomicU32>, gate: Arc<Notify>| {
        let turns = email_turns.clone();
        let requests = requests.clone();
        let model = Arc::new(ScriptedModel::from_fn(move |req| {
            requests.lock().unwrap().push(req.clone());
            let turn = req
                .messages
                .iter()
                .filter(|m| m.role == cairn_agents::Role::Assistant)
                .count();
            Ok(turns[turn].clone())
        }));
        let mut r = Registry::new();
        r.register("mailer", 1, move |ctx, _: ()| {
            let (sent, gate) = (sent.clone(), gate.clone());
            let tools = ToolRegistry::new().with(tool_at_most_once(
                "send_email",
                "Send an email",
                move |e: Email| {
                    let (sent, gate) = (sent.clone(), gate.clone());
                    async move {
                        if sent.fetch_add(1, Ordering::SeqCst) == 0 {
                            gate.notified().await;
                        }
                        Ok::<_, ToolError>(format!("sent to {}", e.to))
                    }
                },
            ));
            let agent = Agent::new("mailer", model.clone(), "x").tools(tools);
            async move { agent.run(&ctx, "email ada").await.map(|r| r.text) }
        });
        r
    };
    let engine = cairn_engine::Engine::with_store(store.clone(), make(sent.clone(), gate.clone()));
    let h = engine.start("mailer", &()).await.unwrap();
    let id = h.id;
    while sent.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown();
    h.wait().await.unwrap();
    let engine2 = cairn_engine::Engine::with_store(store.clone(), make(sent.clone(), gate.clone()));
    let out = engine2.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Waiting, "needs review");
    assert_eq!(
        sent.load(Ordering::SeqCst),
        1,
        "the email was not sent twice"
    );
    // The tool call is step 0.1 (0 is the agent's scope, 0.0 its first model call).
    let path: cairn_engine::StepPath = "0.1".parse().unwrap();
    engine2
        .resolve_step(
            id,
            &path,
            cairn_engine::StepResolution::Done(serde_json::json!(
                "sent to ada@example.com (checked by hand)"
            )),
        )
        .await
        .unwrap();
    let out = engine2.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Completed);
    assert_eq!(sent.load(Ordering::SeqCst), 1);
    let last = requests.lock().unwrap().last().unwrap().clone();
    let Block::ToolResult {
        content, is_error, ..
    } = &last.messages[2].content[0]
    else {
        panic!("{:?}", last.messages)
    };
    assert_eq!(content, "sent to ada@example.com (checked by hand)");
    assert!(!is_error);
}

#[tokio::test]
async fn a_recorded_model_answer_is_not_reused_for_a_changed_request() {
    let (_d, store) = store();
    let gate = Arc::new(Notify::new());
    let make = |system: &'static str, gate: Arc<Notify>| {
        let model = Arc::new(ScriptedModel::by_turn(script()));
        let mut r = Registry::new();
        r.register("triage", 1, move |ctx, task: String| {
            let gate = gate.clone();
            let tools =
                ToolRegistry::new().with(tool("lookup", "Find a ticket", move |_i: Lookup| {
                    let gate = gate.clone();
                    async move {
                        gate.notified().await;
                        Ok::<_, ToolError>("ok")
                    }
                }));
            let agent = Agent::new("triage", model.clone(), "x")
                .system(system)
                .tools(tools);
            async move { agent.run(&ctx, &task).await.map(|r| r.text) }
        });
        r
    };
    let engine = cairn_engine::Engine::with_store(store.clone(), make("v1 prompt", gate.clone()));
    let h = engine.start("triage", &"T-7").await.unwrap();
    let id = h.id;
    // Wait until the first model call is recorded and the tool blocks.
    loop {
        let s = engine.load(id).await.unwrap();
        if s.steps.values().any(|r| r.name == "model") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown();
    h.wait().await.unwrap();
    // Today's code changed the system prompt.
    let engine2 = cairn_engine::Engine::with_store(store.clone(), make("v2 prompt", gate));
    let err = engine2.resume(id).await.unwrap().wait().await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("non-determinism") && msg.contains("system prompt"),
        "{msg}"
    );
    assert_eq!(
        store.run(id).await.unwrap().unwrap().status,
        RunStatus::Running
    );
}

#[tokio::test]
async fn a_recorded_run_answers_a_new_run_of_the_same_workflow_offline() {
    let (_d, store) = store();
    let model = Arc::new(ScriptedModel::by_turn(script()));
    let engine =
        cairn_engine::Engine::with_store(store.clone(), registry(model, Arc::default(), None));
    let first = engine
        .start("triage", &"Look at T-7")
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    let recorded: RunId = first.run_id.parse().unwrap();
    // A new run answered from the first run's history: same answers, no live model.
    let replayer = Arc::new(
        ScriptedModel::from_run(store.as_ref(), recorded)
            .await
            .unwrap(),
    );
    let engine2 = cairn_engine::Engine::with_store(
        store.clone(),
        registry(replayer.clone(), Arc::default(), None),
    );
    let second = engine2
        .start("triage", &"Look at T-7")
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(second.output, first.output);
    assert_eq!(replayer.calls(), 2);
    // A different task is a different request: no recorded answer.
    let third = engine2
        .start("triage", &"Look at T-8")
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(third.status, RunStatus::Failed);
    assert!(third.error.unwrap().contains("no recorded answer"));
}

#[tokio::test]
async fn a_failed_run_reports_what_its_calls_cost() {
    let (_d, store) = store();
    // Turn 1 asks for a tool (100 + 20 tokens); turn 2's request is rejected for good.
    let first = script().remove(0);
    let model = Arc::new(ScriptedModel::from_fn(move |req| {
        if req.messages.len() == 1 {
            Ok(first.clone())
        } else {
            Err(ModelError::new(ModelErrorKind::BadRequest, "rejected"))
        }
    }));
    let mut r = Registry::new();
    let m = model.clone();
    r.register("metered", 1, move |ctx, task: String| {
        let agent = Agent::new("triage", m.clone(), "scripted-1")
            .tools(tools(Arc::new(AtomicU32::new(0))))
            .price(Price {
                input_per_mtok: 1.0,
                output_per_mtok: 5.0,
                ..Price::default()
            });
        async move {
            let (run, spent) = agent.run_metered(&ctx, &task).await;
            let error = run.err().map(|e| e.to_string());
            Ok::<_, WorkflowError>(serde_json::json!({
                "error": error,
                "input_tokens": spent.usage.input_tokens,
                "output_tokens": spent.usage.output_tokens,
                "cost_usd": spent.cost_usd,
            }))
        }
    });
    let engine = Engine::with_store(store.clone(), r);
    let out = engine
        .start("metered", &"Look at T-7")
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    let v = out.output.unwrap();
    assert!(v["error"].as_str().unwrap().contains("rejected"), "{v}");
    assert_eq!(
        (v["input_tokens"].clone(), v["output_tokens"].clone()),
        (100.into(), 20.into())
    );
    let cost = v["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - (100.0 * 1.0 + 20.0 * 5.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    assert_eq!(model.calls(), 2);
}
