//! Circuit breakers: one per target agent, closed → open → half-open → closed.
//!
//! A breaker counts consecutive failures (errors and timeouts) of one target. At
//! `failure_threshold` it opens: the supervisor sends that target nothing for
//! `open_for`. Then it is half-open: up to `half_open_trials` tasks may go through as
//! probes; `success_threshold` successes close it, a single failure opens it again.
//! The breaker is a plain state machine that is given `now`, so the supervisor's
//! clock (system or manual) drives it and tests are deterministic.

use std::time::Duration;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::later;

/// When a breaker opens and how it recovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker.
    pub failure_threshold: u32,
    /// How long an open breaker refuses work before it half-opens.
    pub open_for: Duration,
    /// Probes allowed at once while half-open.
    pub half_open_trials: u32,
    /// Successful probes that close a half-open breaker.
    pub success_threshold: u32,
}

impl Default for BreakerConfig {
    /// 5 consecutive failures open it for 30 s; one probe at a time; one success
    /// closes it.
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
            half_open_trials: 1,
            success_threshold: 1,
        }
    }
}

/// The state of one breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Work flows; failures are counted.
    Closed,
    /// No work goes to the target until the open period ends.
    Open,
    /// A few probes may go through to test the target.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// One target's breaker.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use agentbus::coordination::{BreakerConfig, BreakerState, CircuitBreaker};
///
/// let config = BreakerConfig { failure_threshold: 2, open_for: Duration::from_secs(10), ..BreakerConfig::default() };
/// let mut breaker = CircuitBreaker::new(config);
/// let t0 = chrono::Utc::now();
/// breaker.on_failure(t0);
/// breaker.on_failure(t0);
/// assert_eq!(breaker.state(t0), BreakerState::Open);
/// assert!(!breaker.try_acquire(t0));
/// let later = t0 + chrono::Duration::seconds(10);
/// assert_eq!(breaker.state(later), BreakerState::HalfOpen);
/// assert!(breaker.try_acquire(later));
/// breaker.on_success(later);
/// assert_eq!(breaker.state(later), BreakerState::Closed);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Option<DateTime<Utc>>,
    trials_in_flight: u32,
    trial_successes: u32,
    times_opened: u64,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        CircuitBreaker {
            config,
            state: BreakerState::Closed,
            consecutive_failures: 0,
            opened_at: None,
            trials_in_flight: 0,
            trial_successes: 0,
            times_opened: 0,
        }
    }

    /// Moves an open breaker whose period is over to half-open.
    fn refresh(&mut self, now: DateTime<Utc>) {
        if self.state == BreakerState::Open {
            let reopen = self
                .opened_at
                .map_or(now, |at| later(at, self.config.open_for));
            if now >= reopen {
                self.state = BreakerState::HalfOpen;
                self.trials_in_flight = 0;
                self.trial_successes = 0;
            }
        }
    }

    /// The state at `now`.
    pub fn state(&mut self, now: DateTime<Utc>) -> BreakerState {
        self.refresh(now);
        self.state
    }

    /// Whether work may go to the target now, without taking a probe slot.
    pub fn allows(&mut self, now: DateTime<Utc>) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => self.trials_in_flight < self.config.half_open_trials.max(1),
        }
    }

    /// Takes permission to send one task: always while closed, one probe slot while
    /// half-open, never while open.
    pub fn try_acquire(&mut self, now: DateTime<Utc>) -> bool {
        if !self.allows(now) {
            return false;
        }
        if self.state == BreakerState::HalfOpen {
            self.trials_in_flight += 1;
        }
        true
    }

    /// Records a success of the target.
    pub fn on_success(&mut self, now: DateTime<Utc>) {
        self.refresh(now);
        self.consecutive_failures = 0;
        if self.state == BreakerState::HalfOpen {
            self.trials_in_flight = self.trials_in_flight.saturating_sub(1);
            self.trial_successes += 1;
            if self.trial_successes >= self.config.success_threshold.max(1) {
                self.state = BreakerState::Closed;
                self.opened_at = None;
            }
        }
    }

    /// Records a failure (an error or a timeout) of the target.
    pub fn on_failure(&mut self, now: DateTime<Utc>) {
        self.refresh(now);
        self.consecutive_failures += 1;
        let open = match self.state {
            BreakerState::Closed => {
                self.consecutive_failures >= self.config.failure_threshold.max(1)
            }
            BreakerState::HalfOpen => true,
            BreakerState::Open => false,
        };
        if open {
            self.state = BreakerState::Open;
            self.opened_at = Some(now);
            self.trials_in_flight = 0;
            self.trial_successes = 0;
            self.times_opened += 1;
        }
    }

    /// When an open breaker half-opens (`None` unless open).
    pub fn reopens_at(&self) -> Option<DateTime<Utc>> {
        match self.state {
            BreakerState::Open => self.opened_at.map(|at| later(at, self.config.open_for)),
            _ => None,
        }
    }

    /// Consecutive failures counted so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// How many times the breaker has opened.
    pub fn times_opened(&self) -> u64 {
        self.times_opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            half_open_trials: 1,
            success_threshold: 2,
        }
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let t = Utc::now();
        let mut b = CircuitBreaker::new(config());
        b.on_failure(t);
        b.on_failure(t);
        b.on_success(t);
        b.on_failure(t);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Closed);
        b.on_failure(t);
        assert_eq!(b.state(t), BreakerState::Open);
        assert!(!b.try_acquire(t));
        assert_eq!(b.reopens_at(), Some(later(t, Duration::from_secs(5))));
    }

    #[test]
    fn half_open_limits_probes_and_needs_successes_to_close() {
        let t = Utc::now();
        let mut b = CircuitBreaker::new(config());
        for _ in 0..3 {
            b.on_failure(t);
        }
        let t1 = later(t, Duration::from_secs(5));
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(b.try_acquire(t1));
        assert!(!b.try_acquire(t1), "only one probe at a time");
        b.on_success(t1);
        assert_eq!(b.state(t1), BreakerState::HalfOpen, "needs two successes");
        assert!(b.try_acquire(t1));
        b.on_success(t1);
        assert_eq!(b.state(t1), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let t = Utc::now();
        let mut b = CircuitBreaker::new(config());
        for _ in 0..3 {
            b.on_failure(t);
        }
        let t1 = later(t, Duration::from_secs(6));
        assert!(b.try_acquire(t1));
        b.on_failure(t1);
        assert_eq!(b.state(t1), BreakerState::Open);
        assert_eq!(b.times_opened(), 2);
        assert_eq!(
            b.state(later(t1, Duration::from_secs(5))),
            BreakerState::HalfOpen
        );
    }
}
