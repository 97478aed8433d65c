//! Step options: retry policy (exponential backoff with jitter), per-attempt and per-step
//! timeouts. The retry schedule comes from `backon`; the engine makes it durable by recording
//! every failed attempt with the time of the next one, so a crash during a backoff resumes the
//! remaining wait instead of starting a fresh one.

use std::time::Duration;

use backon::BackoffBuilder;

/// How a step retries failed attempts.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, including the first (1 = no retries).
    pub max_attempts: u32,
    /// The delay before the first retry.
    pub initial_delay: Duration,
    /// Each further delay is the previous one times this.
    pub multiplier: f32,
    /// No delay is longer than this (after jitter).
    pub max_delay: Duration,
    /// Add a random part (up to the delay itself) so that many failing steps do not retry in
    /// lockstep.
    pub jitter: bool,
    /// Retry every error, not only those marked retryable ([`crate::StepError::retryable`]).
    pub retry_all_errors: bool,
}

impl RetryPolicy {
    /// No retries: the first failure is final.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: true,
            retry_all_errors: false,
        }
    }

    /// Up to `max_attempts` attempts with exponential backoff from 1 s (×2, at most 60 s),
    /// with jitter, retrying errors marked retryable.
    pub fn exponential(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..Self::none()
        }
    }

    /// The same policy with another first delay.
    pub fn with_initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = d;
        self
    }

    /// The same policy with another cap on delays.
    pub fn with_max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// The same policy with jitter switched on or off.
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The same policy retrying every error.
    pub fn retrying_all_errors(mut self) -> Self {
        self.retry_all_errors = true;
        self
    }

    /// The delay after attempt `attempt` (1-based) failed, or `None` if it was the last.
    pub(crate) fn delay_after(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let mut b = backon::ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.multiplier)
            .with_max_times(self.max_attempts as usize);
        if self.jitter {
            b = b.with_jitter();
        }
        let d = b.build().nth(attempt.saturating_sub(1) as usize)?;
        // Whole microseconds: the log stores times in µs, and f32 factors leave nanosecond dust.
        let d = Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        Some(d.min(self.max_delay))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::none()
    }
}

/// Options of one durable step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOptions {
    /// How failed attempts are retried.
    pub retry: RetryPolicy,
    /// An attempt running longer than this fails (retryably) with a timeout.
    pub attempt_timeout: Option<Duration>,
    /// The whole step (attempts and backoff, across restarts) fails for good after this.
    pub step_timeout: Option<Duration>,
    /// The step's side effect must not happen twice (a payment, an email): each attempt's
    /// start is recorded durably before it runs, and if the process dies during an attempt,
    /// the run parks as needing review instead of running it again (see
    /// [`crate::Engine::resolve_step`]).
    pub at_most_once: bool,
}

impl StepOptions {
    /// Options with this retry policy.
    pub fn retry(policy: RetryPolicy) -> Self {
        StepOptions {
            retry: policy,
            ..Self::default()
        }
    }

    /// The same options with a per-attempt timeout.
    pub fn with_attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = Some(d);
        self
    }

    /// The same options for a step that must not run twice; see [`StepOptions::at_most_once`].
    pub fn at_most_once(mut self) -> Self {
        self.at_most_once = true;
        self
    }

    /// The same options with a timeout for the whole step.
    pub fn with_step_timeout(mut self, d: Duration) -> Self {
        self.step_timeout = Some(d);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stop_after_the_last_attempt() {
        let p = RetryPolicy::exponential(4)
            .with_initial_delay(Duration::from_millis(100))
            .with_jitter(false);
        assert_eq!(p.delay_after(1), Some(Duration::from_millis(100)));
        assert_eq!(p.delay_after(2), Some(Duration::from_millis(200)));
        assert_eq!(p.delay_after(3), Some(Duration::from_millis(400)));
        assert_eq!(p.delay_after(4), None);
        assert_eq!(RetryPolicy::none().delay_after(1), None);
    }

    #[test]
    fn jitter_stays_within_twice_the_delay_and_the_cap() {
        let p = RetryPolicy::exponential(10)
            .with_initial_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_millis(500));
        for _ in 0..50 {
            let d = p.delay_after(1).unwrap();
            assert!(d >= Duration::from_millis(100) && d < Duration::from_millis(200));
            assert!(p.delay_after(9).unwrap() <= Duration::from_millis(500));
        }
    }
}
