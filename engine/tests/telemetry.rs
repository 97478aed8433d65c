//! Live telemetry of the engine: a `run` span around the workflow, a `fan_out` span around a
//! fan-out with a `branch` span per branch, and a `step` span per executed attempt.

mod common;
use common::{finish, store};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cairn_engine::{Engine, FanOutOptions, Registry};
use cairn_storage::RunStatus;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A closed span: name, fields given at creation, ancestors' names (parent first).
#[derive(Debug)]
struct SpanRec {
    name: String,
    fields: BTreeMap<String, String>,
    ancestors: Vec<String>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
}

#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<SpanRec>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Collect {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("a new span");
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        span.extensions_mut().insert(SpanRec {
            name: span.name().to_string(),
            fields,
            ancestors: span.scope().skip(1).map(|s| s.name().to_string()).collect(),
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).expect("a closed span");
        if let Some(rec) = span.extensions_mut().remove::<SpanRec>() {
            self.0.lock().unwrap().push(rec);
        }
    }
}

// Current-thread runtime: the run's tasks poll on this thread, under this default subscriber.
#[tokio::test]
async fn a_fan_out_has_a_span_with_a_branch_span_per_branch() {
    let collect = Collect::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(collect.clone()));
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("fan", 2, |ctx, n: u32| async move {
        let fan = ctx
            .fan_out(
                "squares",
                (0..n).collect(),
                FanOutOptions::new(2),
                |b, i: u32| async move {
                    b.step("square", move || async move { Ok(u64::from(i * i)) })
                        .await
                },
            )
            .await?;
        Ok(fan.into_successes().iter().sum::<u64>())
    });
    let engine = Engine::with_store(store, r);
    let out = finish(&engine, "fan", &3u32).await;
    assert_eq!(out.status, RunStatus::Completed);
    tokio::task::yield_now().await;
    let spans = std::mem::take(&mut *collect.0.lock().unwrap());
    let of = |name: &str| spans.iter().filter(|s| s.name == name).collect::<Vec<_>>();

    let run = of("run");
    assert_eq!(run.len(), 1, "{spans:#?}");
    assert_eq!(run[0].fields["cairn.run_id"], out.run_id);
    assert_eq!(run[0].fields["cairn.workflow"], "fan");
    assert_eq!(run[0].fields["cairn.version"], "2");
    let fan = of("fan_out");
    assert_eq!(fan.len(), 1, "{spans:#?}");
    assert_eq!(fan[0].ancestors, ["run"]);
    assert_eq!(fan[0].fields["cairn.step_path"], "0");
    let mut branches: Vec<_> = of("branch")
        .iter()
        .map(|b| {
            assert_eq!(b.ancestors, ["fan_out", "run"], "{b:?}");
            (
                b.fields["index"].clone(),
                b.fields["cairn.step_path"].clone(),
            )
        })
        .collect();
    branches.sort();
    assert_eq!(
        branches,
        [("0", "0.0"), ("1", "0.1"), ("2", "0.2")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let steps = of("step");
    assert_eq!(steps.len(), 3, "{spans:#?}");
    for s in steps {
        assert_eq!(s.ancestors, ["branch", "fan_out", "run"], "{s:?}");
        assert_eq!(s.fields["cairn.step_name"], "square");
        assert_eq!(s.fields["cairn.attempt"], "1");
        assert!(s.fields["cairn.step_path"].ends_with(".0"), "{s:?}");
    }
}
