//! The agent runtime on the memory engine: declared sends, failure handling,
//! concurrency limits and graceful shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbus::{
    Agent, AgentDescriptor, Backoff, Bus, ChannelName, Context, DeadLetterFilter, DeadReason,
    ErrorKind, HandlerOptions, Message,
};
use tokio::sync::mpsc;

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug, Clone, PartialEq)]
struct Job {
    n: u32,
}
impl Message for Job {
    const KIND: &'static str = "test.job";
}

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug, Clone, PartialEq)]
struct Done {
    n: u32,
}
impl Message for Done {
    const KIND: &'static str = "test.done";
}

fn fast_retries() -> HandlerOptions {
    HandlerOptions::default().backoff(Backoff {
        initial: Duration::from_millis(10),
        multiplier: 2.0,
        max: Duration::from_millis(50),
        jitter: 0.5,
    })
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn sending_an_undeclared_kind_is_an_error_naming_what_is_declared() {
    let bus = Bus::memory();
    let ctx = Context::new(bus, AgentDescriptor::new("a-1", "a").sends::<Done>());
    let channel = ChannelName::new("jobs").unwrap();
    let err = ctx.send(&channel, &Job { n: 1 }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UndeclaredMessage);
    assert!(err.to_string().contains("'test.job'"), "{err}");
    assert!(err.to_string().contains("it declares: test.done"), "{err}");
    ctx.send(&channel, &Done { n: 1 }).await.unwrap();
}

#[tokio::test]
async fn errors_and_panics_are_retried_and_the_agent_keeps_running() {
    let bus = Bus::memory();
    let calls = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let counter = calls.clone();
    let agent = Agent::builder(AgentDescriptor::new("w-1", "worker"))
        .handle_with("jobs", fast_retries(), move |ctx: Context, job: Job| {
            let counter = counter.clone();
            let done_tx = done_tx.clone();
            async move {
                let attempt = ctx.envelope().unwrap().header.attempt;
                counter.fetch_add(1, Ordering::SeqCst);
                match (job.n, attempt) {
                    (1, 1) => return Err("first try fails".into()),
                    (2, 1) => panic!("boom on the first try"),
                    _ => {}
                }
                done_tx.send((job.n, attempt)).unwrap();
                Ok(())
            }
        })
        .spawn(&bus)
        .await
        .unwrap();
    let channel = ChannelName::new("jobs").unwrap();
    for n in 1..=3 {
        bus.publish(&channel, &Job { n }).await.unwrap();
    }
    let mut finished = Vec::new();
    for _ in 0..3 {
        let item = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .expect("every job finishes")
            .unwrap();
        finished.push(item);
    }
    finished.sort();
    assert_eq!(finished, vec![(1, 2), (2, 2), (3, 1)]);
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_handler_that_always_fails_ends_in_dead_letters_with_its_error() {
    let bus = Bus::memory();
    let _agent = Agent::builder(AgentDescriptor::new("w-1", "failing"))
        .handle_with(
            "jobs",
            fast_retries().max_deliveries(3),
            |_ctx, _job: Job| async { Err("database unreachable".into()) },
        )
        .spawn(&bus)
        .await
        .unwrap();
    bus.publish(&ChannelName::new("jobs").unwrap(), &Job { n: 7 })
        .await
        .unwrap();
    let transport = bus.transport().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let letter = loop {
        let letters = transport
            .dead_letters(DeadLetterFilter::default())
            .await
            .unwrap();
        if let Some(letter) = letters.into_iter().next() {
            break letter;
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(letter.reason, DeadReason::MaxDeliveries);
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.last_error.as_deref(), Some("database unreachable"));
}

#[tokio::test]
async fn concurrency_limit_is_respected() {
    let bus = Bus::memory();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (r, p, f) = (running.clone(), peak.clone(), finished.clone());
    let agent = Agent::builder(AgentDescriptor::new("w-1", "limited"))
        .handle_with(
            "jobs",
            HandlerOptions::default().concurrency(3).prefetch(10),
            move |_ctx, _job: Job| {
                let (r, p, f) = (r.clone(), p.clone(), f.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    f.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .spawn(&bus)
        .await
        .unwrap();
    let channel = ChannelName::new("jobs").unwrap();
    for n in 0..30 {
        bus.publish(&channel, &Job { n }).await.unwrap();
    }
    wait_for("all jobs", || finished.load(Ordering::SeqCst) == 30).await;
    assert!(
        peak.load(Ordering::SeqCst) <= 3,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert!(peak.load(Ordering::SeqCst) >= 2, "handlers should overlap");
    agent.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_handlers_and_abandons_slow_ones() {
    let bus = Bus::memory();
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (s, f) = (started.clone(), finished.clone());
    let agent = Agent::builder(AgentDescriptor::new("w-1", "drainer"))
        .handle_with(
            "jobs",
            HandlerOptions::default().concurrency(2),
            move |_ctx, job: Job| {
                let (s, f) = (s.clone(), f.clone());
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    let pause = if job.n == 0 { 50 } else { 10_000 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    f.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .spawn(&bus)
        .await
        .unwrap();
    let channel = ChannelName::new("jobs").unwrap();
    bus.publish(&channel, &Job { n: 0 }).await.unwrap();
    bus.publish(&channel, &Job { n: 1 }).await.unwrap();
    wait_for("both handlers to start", || {
        started.load(Ordering::SeqCst) == 2
    })
    .await;
    let report = agent.shutdown(Duration::from_millis(500)).await;
    assert_eq!(report.drained, 1, "{report:?}");
    assert_eq!(report.abandoned, 1, "{report:?}");
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    // The abandoned job went back to the group and is still there for the next agent.
    let stats = bus.transport().stats().await.unwrap();
    let group = stats
        .groups
        .iter()
        .find(|g| g.group == "agent-drainer--jobs")
        .unwrap();
    assert_eq!(group.pending + group.in_flight, 1, "{group:?}");
}
