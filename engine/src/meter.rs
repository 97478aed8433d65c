//! Step attempts measured without a span.
//!
//! Every executed step attempt gets a `step` span when the `tracing` subscriber wants one. When
//! it does not (a run the live export leaves out), a subscriber that still counts attempts
//! (live metrics) offers a [`StepMeter`] through `downcast_raw`, the way tracing-opentelemetry
//! offers its `WithContext`: the engine finds it on the current dispatcher and hands it each
//! attempt directly. No event is built, dispatched through every layer and parsed back: that
//! cost about 1,100 instructions per step, a span in the registry about twice as much.
//!
//! A layer exposes its meter like this:
//!
//! ```
//! use std::any::TypeId;
//! use cairn_engine::{StepAttempt, StepMeter};
//!
//! struct Counting {
//!     meter: StepMeter,
//! }
//!
//! impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Counting {
//!     unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
//!         if id == TypeId::of::<Self>() {
//!             Some(self as *const Self as *const ())
//!         } else if id == TypeId::of::<StepMeter>() {
//!             Some(&self.meter as *const StepMeter as *const ())
//!         } else {
//!             None
//!         }
//!     }
//! }
//!
//! let layer = Counting {
//!     meter: StepMeter::new(|a: &StepAttempt<'_>| println!("{} took {} s", a.step_name, a.secs)),
//! };
//! # let _ = layer;
//! ```

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use cairn_storage::RunId;

use crate::context::{RunShared, STEP_SPANS_METERED};

/// One executed step attempt that had no `step` span, as a [`StepMeter`] receives it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct StepAttempt<'a> {
    /// The step's name (`cairn.step_name`).
    pub step_name: &'a str,
    /// How long the attempt took, recording its outcome included, in seconds.
    pub secs: f64,
    /// Whether the attempt failed.
    pub failed: bool,
    /// Whether another attempt follows a failed one.
    pub will_retry: bool,
}

impl<'a> StepAttempt<'a> {
    /// An attempt of step `step_name` that took `secs`, failed or not, with another to follow
    /// or not.
    pub fn new(step_name: &'a str, secs: f64, failed: bool, will_retry: bool) -> Self {
        StepAttempt {
            step_name,
            secs,
            failed,
            will_retry,
        }
    }
}

/// How one incarnation of a run that had no `run` span ended, as a [`StepMeter`] with run
/// hooks ([`StepMeter::with_runs`]) receives it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RunEnded<'a> {
    /// The run's workflow (`cairn.workflow`).
    pub workflow: &'a str,
    /// The run's status when this incarnation stopped (`cairn.run.status`), or `None` when it
    /// stopped on an engine error (a store failure, say) before a status was known.
    pub status: Option<&'a str>,
    /// How long the incarnation took, in seconds.
    pub secs: f64,
}

impl<'a> RunEnded<'a> {
    /// A run of `workflow` that stopped with `status` (`None`: an engine error) after `secs`.
    pub fn new(workflow: &'a str, status: Option<&'a str>, secs: f64) -> Self {
        RunEnded {
            workflow,
            status,
            secs,
        }
    }
}

/// The run hooks of a [`StepMeter`] (see [`StepMeter::with_runs`]).
struct RunHooks {
    leaves_out: Box<dyn Fn(RunId) -> bool + Send + Sync>,
    ended: Box<dyn Fn(&RunEnded<'_>) + Send + Sync>,
}

/// What a subscriber does with the step attempts it made no span for: found by the engine on
/// the current dispatcher (`Dispatch::downcast_ref::<StepMeter>()`), so that a subscriber
/// installed for one thread (a test's) meters only the runs polled there.
///
/// A run keeps the meter it found at its first attempt (a clone: one shared closure) and hands
/// it the later ones directly. From then on the run's workflow is polled outside the run's span,
/// with [`in_left_out_run`] set: a subscriber that refuses `step` spans and offers a meter should
/// count a span made without a parent while that is set as part of the run it left out.
///
/// A meter with run hooks ([`StepMeter::with_runs`]) is also asked, as each run starts, whether
/// the subscriber leaves the run out; if so the engine makes no `run` span at all, meters every
/// attempt from the first, and reports the run's end to the meter.
#[derive(Clone)]
pub struct StepMeter {
    record: Arc<dyn Fn(&StepAttempt<'_>) + Send + Sync>,
    runs: Option<Arc<RunHooks>>,
}

impl StepMeter {
    /// A meter calling `record` for each attempt (on the workflow's thread: keep it short).
    pub fn new(record: impl Fn(&StepAttempt<'_>) + Send + Sync + 'static) -> Self {
        StepMeter {
            record: Arc::new(record),
            runs: None,
        }
    }

    /// This meter, also deciding which runs get no `run` span: `leaves_out` is asked once per
    /// run, on the thread that starts it, just before the engine would make the run's span
    /// (when it answers `false` the span follows at once, on that thread); `ended` receives how
    /// each run left out ended. A subscriber should offer this only when no layer wants the
    /// `run` spans of the runs it leaves out.
    pub fn with_runs(
        mut self,
        leaves_out: impl Fn(RunId) -> bool + Send + Sync + 'static,
        ended: impl Fn(&RunEnded<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.runs = Some(Arc::new(RunHooks {
            leaves_out: Box::new(leaves_out),
            ended: Box::new(ended),
        }));
        self
    }

    /// Hands `attempt` to this meter.
    pub fn record(&self, attempt: &StepAttempt<'_>) {
        (self.record)(attempt)
    }

    /// Whether the subscriber leaves run `run` out (no `run` span); `false` for a meter without
    /// run hooks.
    pub fn leaves_out(&self, run: RunId) -> bool {
        self.runs.as_ref().is_some_and(|h| (h.leaves_out)(run))
    }

    /// Hands how a run left out ended to this meter (nothing without run hooks).
    pub fn record_run(&self, ended: &RunEnded<'_>) {
        if let Some(h) = &self.runs {
            (h.ended)(ended)
        }
    }

    /// The current dispatcher's meter, if it offers one.
    pub fn current() -> Option<StepMeter> {
        tracing::dispatcher::get_default(|d| d.downcast_ref::<StepMeter>().cloned())
    }

    /// Hands `attempt` to the current dispatcher's meter, if it offers one.
    pub fn record_current(attempt: &StepAttempt<'_>) {
        tracing::dispatcher::get_default(|d| {
            if let Some(m) = d.downcast_ref::<StepMeter>() {
                m.record(attempt)
            }
        })
    }
}

impl fmt::Debug for StepMeter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepMeter")
            .field("run_hooks", &self.runs.is_some())
            .finish()
    }
}

thread_local! {
    /// Set while this thread polls the workflow task of a run the subscriber left out.
    static LEFT_OUT: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is polling the workflow of a run whose spans the subscriber leaves out
/// (its step attempts go to the [`StepMeter`]). The run's own span is not entered while its
/// workflow is polled (a registry enter and exit per poll saved), so a span made now without
/// an explicit parent belongs to that run: a layer should treat it as part of the run's trace,
/// which is not exported, rather than as the root of a trace of its own.
pub fn in_left_out_run() -> bool {
    LEFT_OUT.with(Cell::get)
}

/// A run's workflow task: polled inside the run's span, or, once the run is known to be left
/// out by the subscriber (its attempts metered, not spanned), with [`in_left_out_run`] set
/// instead.
pub(crate) struct RunTask<F> {
    fut: F,
    span: tracing::Span,
    shared: Arc<RunShared>,
}

impl<F> RunTask<F> {
    /// `fut` polled in `span` (the run's) unless `shared`'s run is left out.
    pub(crate) fn new(fut: F, span: tracing::Span, shared: Arc<RunShared>) -> Self {
        RunTask { fut, span, shared }
    }
}

/// Restores [`LEFT_OUT`] when a poll ends, also by a panic.
struct LeftOut(bool);

impl Drop for LeftOut {
    fn drop(&mut self) {
        LEFT_OUT.with(|c| c.set(self.0));
    }
}

impl<F: Future + Unpin> Future for RunTask<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if self.shared.step_spans.load(Ordering::Relaxed) == STEP_SPANS_METERED {
            let _restore = LeftOut(LEFT_OUT.with(|c| c.replace(true)));
            Pin::new(&mut self.fut).poll(cx)
        } else {
            let this = &mut *self;
            let _entered = this.span.enter();
            Pin::new(&mut this.fut).poll(cx)
        }
    }
}
