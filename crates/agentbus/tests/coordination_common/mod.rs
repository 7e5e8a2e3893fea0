//! Helpers shared by the coordination tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentbus::{Bus, ManualClock, MemoryEngine};

/// A memory bus on a manual clock.
pub fn manual_bus() -> (Bus, ManualClock) {
    let clock = ManualClock::new();
    let engine = MemoryEngine::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    let bus = Bus::builder(Arc::new(engine))
        .clock(Arc::new(clock.clone()))
        .build();
    (bus, clock)
}

/// Waits (real time, generous bound) until `check` holds.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `future` with a generous bound.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Moves a manual clock forward in small steps, letting background tasks run between
/// them (heartbeats, health checks, timeouts).
pub async fn advance(clock: &ManualClock, total: Duration, step: Duration) {
    let mut done = Duration::ZERO;
    while done < total {
        let by = step.min(total - done);
        clock.advance(by);
        done += by;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}
