//! Live telemetry of the engine: a `run` span around the workflow, a `fan_out` span around a
//! fan-out with a `branch` span per branch, and a `step` span per executed attempt.

mod common;
use common::{finish, store};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cairn_engine::{
    Engine, FanOutOptions, Registry, RetryPolicy, RunEnded, StepAttempt, StepError, StepMeter,
    StepOptions,
};
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

impl Collect {
    /// A collector, installed as this thread's default subscriber until the guard drops.
    fn install() -> (Collect, tracing::subscriber::DefaultGuard) {
        let collect = Collect::default();
        let guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(collect.clone()));
        (collect, guard)
    }

    /// The spans closed so far (after one yield, for the run's task to finish closing them).
    async fn take(&self) -> Vec<SpanRec> {
        tokio::task::yield_now().await;
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

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
    let (collect, _guard) = Collect::install();
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
    let spans = collect.take().await;
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

// What a step's closure does before its future's first await, and the future itself, run
// inside the attempt's span (the future is made at its first poll, in the span).
#[tokio::test]
async fn spans_made_by_a_step_closure_and_by_its_future_are_children_of_the_step() {
    let (collect, _guard) = Collect::install();
    let (_d, store) = store();
    let mut r = Registry::new();
    r.register("nested", 1, |ctx, _: ()| async move {
        ctx.step("outer", || {
            drop(tracing::info_span!("made_by_closure").entered());
            async {
                drop(tracing::info_span!("made_by_future").entered());
                Ok(1u32)
            }
        })
        .await
    });
    let engine = Engine::with_store(store, r);
    let out = finish(&engine, "nested", &()).await;
    assert_eq!(out.status, RunStatus::Completed);
    let spans = collect.take().await;
    for name in ["made_by_closure", "made_by_future"] {
        let s = spans.iter().find(|s| s.name == name).expect(name);
        assert_eq!(s.ancestors, ["step", "run"], "{s:?}");
    }
}

/// Refuses `step` spans (as the export layer does in a run it leaves out) and offers a
/// [`StepMeter`] that keeps each attempt it is handed.
struct Metering {
    meter: StepMeter,
    refuse_steps: bool,
}

type Attempts = Arc<Mutex<Vec<(String, bool, bool)>>>;

impl Metering {
    fn new(refuse_steps: bool) -> (Self, Attempts) {
        let seen = Attempts::default();
        let keep = Arc::clone(&seen);
        let meter = StepMeter::new(move |a: &StepAttempt<'_>| {
            assert!(a.secs >= 0.0 && a.secs < 60.0, "{a:?}");
            keep.lock()
                .unwrap()
                .push((a.step_name.to_string(), a.failed, a.will_retry));
        });
        (
            Metering {
                meter,
                refuse_steps,
            },
            seen,
        )
    }
}

impl<S: Subscriber> Layer<S> for Metering {
    fn enabled(&self, meta: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        !(self.refuse_steps && meta.is_span() && meta.name() == "step")
    }

    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else if id == std::any::TypeId::of::<StepMeter>() {
            Some(&self.meter as *const StepMeter as *const ())
        } else {
            None
        }
    }
}

/// Two steps, the second failing twice (retryably) before it succeeds.
fn metered_registry() -> Registry {
    let mut r = Registry::new();
    r.register("metered", 1, |ctx, (): ()| async move {
        ctx.step("first", || async { Ok(1u32) }).await?;
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let opts = StepOptions::retry(
            RetryPolicy::exponential(5)
                .with_initial_delay(std::time::Duration::from_millis(1))
                .with_jitter(false),
        );
        ctx.step_with("second", opts, move || {
            let calls = Arc::clone(&calls);
            async move {
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                    return Err(StepError::retryable("503"));
                }
                Ok(2u32)
            }
        })
        .await
    });
    r
}

/// Runs `workflow` of `registry` to completion on this thread under a subscriber with only a
/// [`Metering`] layer (refusing `step` spans or not); returns the attempts it metered.
async fn run_metered(refuse_steps: bool, registry: Registry, workflow: &str) -> Attempts {
    let (layer, seen) = Metering::new(refuse_steps);
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let (_d, store) = store();
    let engine = Engine::with_store(store, registry);
    let out = finish(&engine, workflow, &()).await;
    assert_eq!(out.status, RunStatus::Completed, "{out:?}");
    seen
}

#[tokio::test]
async fn attempts_without_a_span_go_to_the_subscribers_meter() {
    let seen = run_metered(true, metered_registry(), "metered").await;
    let seen = seen.lock().unwrap().clone();
    let want = [
        ("first", false, false),
        ("second", true, true),
        ("second", true, true),
        ("second", false, false),
    ]
    .map(|(n, f, r)| (n.to_string(), f, r));
    assert_eq!(seen, want);
}

#[tokio::test]
async fn attempts_with_a_span_are_not_metered_twice() {
    let (layer, seen) = Metering::new(false);
    let collect = Collect::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry()
            .with(layer)
            .with(collect.clone()),
    );
    let (_d, store) = store();
    let engine = Engine::with_store(store, metered_registry());
    let out = finish(&engine, "metered", &()).await;
    assert_eq!(out.status, RunStatus::Completed);
    assert!(seen.lock().unwrap().is_empty());
    tokio::task::yield_now().await;
    let steps = collect
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.name == "step")
        .count();
    assert_eq!(steps, 4, "one span per attempt");
}

type Looks = Arc<Mutex<Vec<(bool, Option<&'static str>)>>>;

/// Records, before its first step, after it and inside its second step, whether the thread
/// polls a run left out (`in_left_out_run`) and which span is current.
fn looking_registry(looks: Looks) -> Registry {
    let mut r = Registry::new();
    r.register("looks", 1, move |ctx, (): ()| {
        let looks = Arc::clone(&looks);
        async move {
            let look = || {
                (
                    cairn_engine::in_left_out_run(),
                    tracing::Span::current().metadata().map(|m| m.name()),
                )
            };
            looks.lock().unwrap().push(look());
            ctx.step("first", || async { Ok(1u32) }).await?;
            // The task's poll ends here: how the run is polled is chosen per poll, and the
            // first step's record may be written without the poll ever waiting.
            tokio::task::yield_now().await;
            looks.lock().unwrap().push(look());
            let inside = Arc::clone(&looks);
            ctx.step("second", move || async move {
                inside.lock().unwrap().push(look());
                Ok(2u32)
            })
            .await
        }
    });
    r
}

#[tokio::test]
async fn a_run_left_out_is_polled_outside_its_span_and_says_so() {
    let looks = Looks::default();
    run_metered(true, looking_registry(Arc::clone(&looks)), "looks").await;
    // Until the first step finds the run left out, its workflow runs in its span; from the
    // next poll on not, and spans made meanwhile are told they belong to a run left out.
    assert_eq!(
        *looks.lock().unwrap(),
        [(false, Some("run")), (true, None), (true, None)]
    );
    assert!(!cairn_engine::in_left_out_run(), "reset after each poll");
}

#[tokio::test]
async fn a_run_with_spans_is_polled_inside_its_span() {
    let looks = Looks::default();
    let seen = run_metered(false, looking_registry(Arc::clone(&looks)), "looks").await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "attempts with spans are not metered"
    );
    assert_eq!(
        *looks.lock().unwrap(),
        [
            (false, Some("run")),
            (false, Some("run")),
            (false, Some("step"))
        ]
    );
}

type Ends = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Runs `looking_registry`'s workflow on this thread under a [`Metering`] layer whose meter has
/// run hooks that leave every run out (or none); returns the looks, the runs' ends the meter
/// got, the attempts it got and the names of the spans made.
async fn run_with_run_hooks(leave_out: bool) -> (Looks, Ends, Attempts, Vec<String>) {
    let (mut layer, seen) = Metering::new(true);
    let ends = Ends::default();
    let keep = Arc::clone(&ends);
    layer.meter = layer.meter.with_runs(
        move |_| leave_out,
        move |e: &RunEnded<'_>| {
            assert!(e.secs >= 0.0 && e.secs < 60.0, "{e:?}");
            keep.lock()
                .unwrap()
                .push((e.workflow.to_string(), e.status.map(str::to_string)));
        },
    );
    let collect = Collect::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry()
            .with(layer)
            .with(collect.clone()),
    );
    let looks = Looks::default();
    let (_d, store) = store();
    let engine = Engine::with_store(store, looking_registry(Arc::clone(&looks)));
    let out = finish(&engine, "looks", &()).await;
    assert_eq!(out.status, RunStatus::Completed, "{out:?}");
    tokio::task::yield_now().await;
    let names = collect
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.name.clone())
        .collect();
    (looks, ends, seen, names)
}

#[tokio::test]
async fn a_run_the_meter_leaves_out_at_its_start_has_no_span_and_its_end_is_metered() {
    let (looks, ends, attempts, spans) = run_with_run_hooks(true).await;
    assert!(spans.is_empty(), "no span at all: {spans:?}");
    // Left out from its first poll, not only after its first step.
    assert_eq!(
        *looks.lock().unwrap(),
        [(true, None), (true, None), (true, None)]
    );
    assert_eq!(attempts.lock().unwrap().len(), 2, "both attempts metered");
    assert_eq!(
        *ends.lock().unwrap(),
        [("looks".to_string(), Some("completed".to_string()))]
    );
}

#[tokio::test]
async fn a_run_the_meter_keeps_has_its_span_and_no_metered_end() {
    let (looks, ends, _attempts, spans) = run_with_run_hooks(false).await;
    assert_eq!(spans, ["run"], "the run's span (its steps are refused)");
    assert_eq!(looks.lock().unwrap()[0], (false, Some("run")));
    assert!(ends.lock().unwrap().is_empty());
}
