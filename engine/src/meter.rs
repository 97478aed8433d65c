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

use std::fmt;

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

/// What a subscriber does with the step attempts it made no span for: found by the engine on
/// the current dispatcher (`Dispatch::downcast_ref::<StepMeter>()`), so that a subscriber
/// installed for one thread (a test's) meters only the runs polled there.
///
/// A run keeps the meter it found at its first attempt (a clone: one shared closure) and hands
/// it the later ones directly.
#[derive(Clone)]
pub struct StepMeter {
    record: std::sync::Arc<dyn Fn(&StepAttempt<'_>) + Send + Sync>,
}

impl StepMeter {
    /// A meter calling `record` for each attempt (on the workflow's thread: keep it short).
    pub fn new(record: impl Fn(&StepAttempt<'_>) + Send + Sync + 'static) -> Self {
        StepMeter {
            record: std::sync::Arc::new(record),
        }
    }

    /// Hands `attempt` to this meter.
    pub fn record(&self, attempt: &StepAttempt<'_>) {
        (self.record)(attempt)
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
        f.write_str("StepMeter")
    }
}
