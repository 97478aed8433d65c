//! Router and handoffs over a real redb file with scripted models: the decisions and the
//! exact context passed on are recorded.

use std::sync::{Arc, Mutex};

use cairn_agents::{
    Agent, Block, HandoffMode, ModelRequest, ModelResponse, Role, Routed, Router, ScriptedModel,
    StopReason, Usage, handoff,
};
use cairn_engine::{Engine, Event, Registry, WorkflowError};
use cairn_storage::{EventStore, RedbStore, RunId, RunStatus, Seq};

fn store() -> (tempfile::TempDir, Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path().join("t.redb")).unwrap();
    (dir, Arc::new(s))
}

fn say(text: &str) -> ModelResponse {
    ModelResponse {
        id: String::new(),
        model: "scripted".into(),
        content: vec![Block::Text { text: text.into() }],
        stop_reason: StopReason::EndTurn,
        usage: Usage {
            input_tokens: 10,
            output_tokens: 2,
            ..Usage::default()
        },
    }
}

fn answering(text: &'static str) -> Arc<ScriptedModel> {
    Arc::new(ScriptedModel::from_fn(move |_| Ok(say(text))))
}

fn router(with_fallback: bool) -> Router {
    let classifier = Arc::new(ScriptedModel::from_fn(|req: &ModelRequest| {
        let task = req.messages[0].text();
        Ok(say(if task.contains("refund") {
            " Billing.\n"
        } else if task.contains("crash") {
            "bug"
        } else {
            "poetry"
        }))
    }));
    let r = Router::new("triage", classifier, "cheap-model")
        .route(
            "billing",
            "payments, refunds, invoices",
            Agent::new("billing", answering("refund issued"), "big"),
        )
        .route(
            "bug",
            "crashes and errors",
            Agent::new("bugs", answering("bug filed"), "big"),
        );
    if with_fallback {
        r.fallback(Agent::new("general", answering("general answer"), "big"))
    } else {
        r
    }
}

async fn route_once(
    with_fallback: bool,
    task: &str,
) -> (
    Arc<dyn EventStore>,
    cairn_engine::RunOutcome,
    tempfile::TempDir,
) {
    let (d, store) = store();
    let mut reg = Registry::new();
    reg.register("route", 1, move |ctx, task: String| {
        let r = router(with_fallback);
        async move { r.run(&ctx, &task).await }
    });
    let out = Engine::with_store(store.clone(), reg)
        .start("route", &task)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    (store, out, d)
}

#[tokio::test]
async fn the_router_dispatches_by_the_cheap_models_answer_and_records_the_decision() {
    let (store, out, _d) = route_once(true, "I want a refund").await;
    let routed: Routed = serde_json::from_value(out.output.unwrap()).unwrap();
    assert_eq!(
        (routed.category.as_str(), routed.agent.as_str()),
        ("billing", "billing")
    );
    assert!(!routed.fallback);
    assert_eq!(routed.run.text, "refund issued");
    // The classifier got the categories and a one-word instruction, with a small token limit.
    let id: RunId = out.run_id.parse().unwrap();
    let evs = store.read(id, Seq(0), 100).await.unwrap();
    let mut route = None;
    let mut classifier_request = None;
    for e in &evs {
        if let Event::StepCompleted { name, output, .. } = Event::decode(&e.payload).unwrap() {
            if name == "route" {
                route = Some(output.to_json());
            }
            if name == "model" && classifier_request.is_none() {
                classifier_request = Some(output.to_json()["request"].clone());
            }
        }
    }
    assert_eq!(route.unwrap()["agent"], "billing");
    let req = classifier_request.unwrap();
    assert_eq!(req["max_tokens"], 16);
    let system = req["system"].as_str().unwrap();
    assert!(system.contains("billing: payments") && system.contains("ONLY the category"));

    let (_s, out, _d) = route_once(true, "the app crashes").await;
    let routed: Routed = serde_json::from_value(out.output.unwrap()).unwrap();
    assert_eq!(routed.run.text, "bug filed");
}

#[tokio::test]
async fn an_unknown_category_goes_to_the_fallback_or_fails_clearly() {
    let (_s, out, _d) = route_once(true, "write me a poem").await;
    let routed: Routed = serde_json::from_value(out.output.unwrap()).unwrap();
    assert!(routed.fallback);
    assert_eq!(routed.agent, "general");
    assert_eq!(routed.run.text, "general answer");

    let (_s, out, _d) = route_once(false, "write me a poem").await;
    assert_eq!(out.status, RunStatus::Failed);
    let e = out.error.unwrap();
    assert!(
        e.contains("`poetry`") && e.contains("billing, bug") && e.contains("fallback"),
        "{e}"
    );
}

fn capture(requests: Arc<Mutex<Vec<ModelRequest>>>, text: &'static str) -> Arc<ScriptedModel> {
    Arc::new(ScriptedModel::from_fn(move |req| {
        requests.lock().unwrap().push(req.clone());
        Ok(say(text))
    }))
}

#[tokio::test]
async fn handoffs_pass_the_full_history_or_a_summary_and_record_the_exact_context() {
    for summary in [false, true] {
        let (_d, store) = store();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let summarizer_seen = Arc::new(Mutex::new(Vec::new()));
        let (s2, ss2) = (seen.clone(), summarizer_seen.clone());
        let mut reg = Registry::new();
        reg.register("handoff", 1, move |ctx, _: ()| {
            let researcher = Agent::new("researcher", answering("found 3 duplicates"), "big");
            let writer = Agent::new("writer", capture(s2.clone(), "report written"), "big");
            let mode = if summary {
                HandoffMode::Summary {
                    model: capture(ss2.clone(), "3 duplicate charges found"),
                    model_id: "cheap".into(),
                    max_tokens: 200,
                    price: None,
                }
            } else {
                HandoffMode::Full
            };
            async move {
                let first = researcher.run(&ctx, "check the charges").await?;
                let (record, run) = handoff(&ctx, &first, &writer, mode, "write it up").await?;
                Ok::<_, WorkflowError>((record, run.text))
            }
        });
        let out = Engine::with_store(store.clone(), reg)
            .start("handoff", &())
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
        let (record, text): (cairn_agents::HandoffRecord, String) =
            serde_json::from_value(out.output.unwrap()).unwrap();
        assert_eq!(text, "report written");
        assert_eq!(
            (record.from.as_str(), record.to.as_str()),
            ("researcher", "writer")
        );
        assert_eq!(record.reason, "write it up");
        let got = seen.lock().unwrap()[0].messages.clone();
        assert_eq!(
            got, record.context,
            "the recorded context is exactly what the next agent got"
        );
        if summary {
            assert_eq!(record.mode, "summary");
            assert_eq!(
                record.summary_usage.map(|u| u.total_tokens()),
                Some(12),
                "the summarizer's call is on the record"
            );
            assert_eq!(got.len(), 1);
            assert!(got[0].text().contains("3 duplicate charges found"));
            let s = summarizer_seen.lock().unwrap()[0].clone();
            assert_eq!(s.max_tokens, 200);
            assert!(
                s.messages[0]
                    .text()
                    .contains("assistant: found 3 duplicates")
            );
        } else {
            assert_eq!(record.mode, "full");
            assert_eq!(record.summary_usage, None);
            // user task, researcher's answer, the takeover note.
            assert_eq!(got.len(), 3);
            assert_eq!(got[1].role, Role::Assistant);
            assert_eq!(got[1].text(), "found 3 duplicates");
            assert!(
                got[2]
                    .text()
                    .contains("taking over from agent `researcher`")
            );
        }
    }
}

#[tokio::test]
async fn a_summary_handoff_is_paid_from_the_next_agents_budget() {
    let (_d, store) = store();
    let mut reg = Registry::new();
    reg.register("handoff_budget", 1, move |ctx, _: ()| async move {
        // 12 tokens a call. The researcher is not on the budget; the summary (12) is, so the
        // writer's first call finds 12 of 10 spent and the run parks on the budget.
        let budget = Arc::new(cairn_agents::Budget::new(cairn_agents::BudgetLimits {
            max_tokens: Some(10),
            max_cost_usd: None,
        }));
        let researcher = Agent::new("researcher", answering("found 3 duplicates"), "big");
        let writer = Agent::new("writer", answering("report written"), "big").budget(budget);
        let mode = HandoffMode::Summary {
            model: answering("3 duplicate charges found"),
            model_id: "cheap".into(),
            max_tokens: 200,
            price: None,
        };
        let first = researcher.run(&ctx, "check the charges").await?;
        let (_, run) = handoff(&ctx, &first, &writer, mode, "write it up").await?;
        Ok::<_, WorkflowError>(run.text)
    });
    let engine = Engine::with_options(
        store.clone(),
        reg,
        cairn_engine::EngineOptions {
            suspend_after: std::time::Duration::from_millis(50),
            ..Default::default()
        },
    );
    let out = engine
        .start("handoff_budget", &())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(
        out.status,
        RunStatus::Waiting,
        "parked on the budget before the writer's call: {:?}",
        out.output
    );
}

#[tokio::test]
async fn choreography_starts_each_subscriber_once_and_the_chain_is_in_the_log() {
    use cairn_agents::{ChoreoEvent, Choreography};
    use cairn_storage::RunFilter;
    use std::time::Duration;
    let (_d, store) = store();
    let choreo = Choreography::new()
        .subscribe("ticket.classified", "notify")
        .subscribe("ticket.classified", "escalate")
        .subscribe("ticket.escalated", "page");
    let gate = Arc::new(tokio::sync::Notify::new());
    let mut reg = Registry::new();
    let (c1, g1) = (choreo.clone(), gate.clone());
    reg.register("intake", 1, move |ctx, ticket: String| {
        let (c, g) = (c1.clone(), g1.clone());
        async move {
            let started = c
                .emit(
                    &ctx,
                    "ticket.classified",
                    &serde_json::json!({"ticket": ticket}),
                )
                .await?;
            ctx.step("wait", move || async move {
                g.notified().await;
                Ok(())
            })
            .await?;
            Ok::<_, WorkflowError>(started.len())
        }
    });
    reg.register("notify", 1, |ctx, e: ChoreoEvent| async move {
        ctx.step("send", move || async move {
            Ok(format!("notified about {}", e.payload["ticket"]))
        })
        .await
    });
    let c2 = choreo.clone();
    reg.register("escalate", 1, move |ctx, e: ChoreoEvent| {
        let c = c2.clone();
        async move {
            c.emit(&ctx, "ticket.escalated", &e.payload).await?;
            Ok::<_, WorkflowError>("escalated")
        }
    });
    reg.register("page", 1, |ctx, e: ChoreoEvent| async move {
        ctx.step("page", move || async move {
            Ok(format!("paged for {}", e.payload["ticket"]))
        })
        .await
    });
    let engine = Engine::with_store(store.clone(), reg.clone());
    let h = engine.start("intake", &"T-9").await.unwrap();
    let intake = h.id;
    // Let the subscribers start, then stop and resume the emitter: nobody starts twice.
    let t = std::time::Instant::now();
    while store.list_runs(RunFilter::default()).await.unwrap().len() < 4 {
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.shutdown();
    h.wait().await.unwrap();
    engine.wait_idle().await;
    let engine2 = Engine::with_store(store.clone(), reg);
    gate.notify_one();
    let rec = engine2.recover().await.unwrap();
    for h in rec.handles {
        h.wait().await.unwrap();
    }
    let t = std::time::Instant::now();
    loop {
        let runs = store.list_runs(RunFilter::default()).await.unwrap();
        if runs.iter().all(|m| m.status == RunStatus::Completed) {
            assert_eq!(runs.len(), 4, "intake, notify, escalate, page: each once");
            let by_name = |n: &str| runs.iter().find(|m| m.workflow == n).unwrap().clone();
            assert_eq!(by_name("notify").parent, Some(intake));
            assert_eq!(by_name("escalate").parent, Some(intake));
            assert_eq!(by_name("page").parent, Some(by_name("escalate").id));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{runs:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_fan_out_of_agents_reviews_in_parallel_and_records_each_agents_calls() {
    use cairn_engine::{FanOutOptions, JoinPolicy};
    let (_d, store) = store();
    let reviewer = Arc::new(ScriptedModel::from_fn(|req: &ModelRequest| {
        let file = req.messages[0].text();
        if file.contains("broken") {
            return Err(cairn_agents::ModelError::new(
                cairn_agents::ModelErrorKind::BadRequest,
                "cannot review",
            ));
        }
        Ok(say(&format!("LGTM: {file}")))
    }));
    let mut reg = Registry::new();
    let rv = reviewer.clone();
    reg.register("review", 1, move |ctx, files: Vec<String>| {
        let rv = rv.clone();
        async move {
            let fan = ctx
                .fan_out(
                    "reviews",
                    files,
                    FanOutOptions::new(3).join(JoinPolicy::AtLeast(2)),
                    move |b, file: String| {
                        let agent = Agent::new("reviewer", rv.clone(), "big");
                        async move { Ok(agent.run(&b, &file).await?.text) }
                    },
                )
                .await?;
            Ok::<_, WorkflowError>((
                fan.successes().map(|(_, t)| t.clone()).collect::<Vec<_>>(),
                fan.failures().count(),
            ))
        }
    });
    let out = Engine::with_store(store.clone(), reg)
        .start("review", &vec!["a.rs", "broken.rs", "c.rs"])
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    let (ok, failed): (Vec<String>, usize) = serde_json::from_value(out.output.unwrap()).unwrap();
    assert_eq!(ok, vec!["LGTM: a.rs", "LGTM: c.rs"]);
    assert_eq!(failed, 1, "the failed review is reported, the run goes on");
    assert_eq!(reviewer.calls(), 3);
}
