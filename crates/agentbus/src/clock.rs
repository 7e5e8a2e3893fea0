//! Time, as the engines see it: the system clock, or a manual clock for tests.
//!
//! Everything in the memory engine that waits (ack-wait redelivery, nack delays,
//! delayed delivery, deadlines) reads time through [`Clock`]. With a [`ManualClock`] a
//! test advances time by hand, so ack-wait, redelivery, backoff and deadline tests run
//! instantly and deterministically.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::envelope::later;

/// A source of time that can also wait.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;

    /// Completes once [`Clock::now`] has reached `instant`.
    fn sleep_until(&self, instant: DateTime<Utc>) -> BoxFuture<'static, ()>;
}

/// A shared clock.
pub type SharedClock = Arc<dyn Clock>;

/// The wall clock, sleeping with tokio timers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, instant: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let wait = (instant - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that only moves when told to.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use agentbus::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// let start = clock.now();
/// clock.advance(Duration::from_secs(30));
/// assert_eq!((clock.now() - start).num_seconds(), 30);
/// ```
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<DateTime<Utc>>>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("now", &*self.now.borrow())
            .finish()
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A manual clock starting at the current wall-clock time.
    pub fn new() -> Self {
        Self::starting_at(Utc::now())
    }

    /// A manual clock starting at `start`.
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        let (tx, _) = watch::channel(start);
        ManualClock { now: Arc::new(tx) }
    }

    /// Moves time forward by `by`, waking everything whose wait is now over.
    pub fn advance(&self, by: Duration) {
        self.now.send_modify(|now| *now = later(*now, by));
    }

    /// Sets the time; going backwards is ignored, as clocks used for deadlines must be
    /// monotonic.
    pub fn set(&self, to: DateTime<Utc>) {
        self.now.send_if_modified(|now| {
            if to > *now {
                *now = to;
                true
            } else {
                false
            }
        });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.borrow()
    }

    fn sleep_until(&self, instant: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            // The sender lives as long as any clone of the clock; if every clone is
            // gone, time can never reach `instant`, so wait forever.
            if rx.wait_for(|now| *now >= instant).await.is_err() {
                futures::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_sleep_wakes_on_advance() {
        let clock = ManualClock::new();
        let due = clock.now() + chrono::Duration::seconds(10);
        let sleeper = tokio::spawn(clock.sleep_until(due));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(5));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .unwrap()
            .unwrap();
    }
}
