//! Time-travel tests on the memory engine's manual clock (DESIGN §9): ack-wait
//! redelivery, nack delays, agent backoff, deadlines, delayed delivery, request
//! timeouts, dedup windows and age retention, each checked on both sides of its
//! moment — nothing before, exactly the expected effect after — with no real waiting.
//!
//! "Nothing arrives yet" is checked with a short real wait ([`NOTHING_YET`]): on a
//! manual clock no amount of real time makes a timer fire, so the wait only bounds how
//! long the test looks, it cannot make the test flaky.

use std::sync::Arc;
use std::time::Duration;

use agentbus::{
    Agent, AgentDescriptor, Backoff, Bus, ChannelConfig, ChannelName, ChannelPattern, Context,
    DeadLetterFilter, DeadReason, Delivery, ErrorKind, HandlerOptions, ManualClock, MemoryEngine,
    Message, MessageId, PublishOptions, StartPosition, SubscribeOptions, Subscription,
};
use serde::{Deserialize, Serialize};

/// How long a test looks for a delivery that must not happen yet.
const NOTHING_YET: Duration = Duration::from_millis(50);
/// The most a test waits for a delivery that must happen (real time; normally instant).
const ARRIVES: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
struct Job {
    n: u32,
}

impl Message for Job {
    const KIND: &'static str = "test.job";
}

/// A bus on a memory engine driven by a fresh manual clock.
fn manual_bus() -> (Bus, ManualClock) {
    let clock = ManualClock::new();
    let engine = MemoryEngine::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    let shared = engine.clock();
    (Bus::builder(Arc::new(engine)).clock(shared).build(), clock)
}

fn channel(name: &str) -> ChannelName {
    ChannelName::new(name).unwrap()
}

async fn subscribe(bus: &Bus, options: SubscribeOptions) -> Subscription {
    bus.subscribe(options).await.unwrap()
}

fn options(pattern: &str) -> SubscribeOptions {
    SubscribeOptions::new(ChannelPattern::new(pattern).unwrap())
        .group("workers")
        .start(StartPosition::Earliest)
}

async fn next(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(ARRIVES, sub.next())
        .await
        .expect("a delivery arrives once its time has come")
        .unwrap()
}

async fn assert_nothing_yet(sub: &mut Subscription, why: &str) {
    if let Ok(delivery) = tokio::time::timeout(NOTHING_YET, sub.next()).await {
        panic!("{why}, but got {:?}", delivery.map(|d| d.attempt()));
    }
}

#[tokio::test]
async fn ack_wait_redelivers_exactly_when_it_runs_out() {
    let (bus, clock) = manual_bus();
    let mut sub = subscribe(&bus, options("jobs").ack_wait(Duration::from_secs(30))).await;
    bus.publish(&channel("jobs"), &Job { n: 1 }).await.unwrap();

    let first = next(&mut sub).await;
    assert_eq!(first.attempt(), 1);
    clock.advance(Duration::from_secs(29));
    assert_nothing_yet(&mut sub, "29 s into a 30 s ack wait nothing is redelivered").await;

    clock.advance(Duration::from_secs(2));
    let second = next(&mut sub).await;
    assert_eq!(second.attempt(), 2);
    assert_eq!(second.envelope().header.id, first.envelope().header.id);
    // A late ack from the first delivery still acks the message (docs/DELIVERY.md),
    // so the redelivery has nothing left to settle.
    first.ack().await.unwrap();
    assert_eq!(
        second.ack().await.unwrap_err().kind(),
        ErrorKind::AlreadySettled
    );
    clock.advance(Duration::from_secs(3600));
    assert_nothing_yet(&mut sub, "an acked message never comes back").await;
}

#[tokio::test]
async fn nack_delay_holds_the_message_back_until_the_clock_passes_it() {
    let (bus, clock) = manual_bus();
    let mut sub = subscribe(&bus, options("jobs")).await;
    bus.publish(&channel("jobs"), &Job { n: 1 }).await.unwrap();

    next(&mut sub)
        .await
        .nack(
            Duration::from_secs(600),
            Some("try again in ten minutes".into()),
        )
        .await
        .unwrap();
    clock.advance(Duration::from_secs(599));
    assert_nothing_yet(&mut sub, "a 10 min nack delay is not over after 9:59").await;
    clock.advance(Duration::from_secs(1));
    let again = next(&mut sub).await;
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn max_deliveries_ends_in_dead_letters_after_the_last_ack_wait() {
    let (bus, clock) = manual_bus();
    let mut sub = subscribe(
        &bus,
        options("jobs")
            .ack_wait(Duration::from_secs(10))
            .max_deliveries(3),
    )
    .await;
    bus.publish(&channel("jobs"), &Job { n: 1 }).await.unwrap();

    for attempt in 1..=3 {
        let delivery = next(&mut sub).await;
        assert_eq!(delivery.attempt(), attempt);
        clock.advance(Duration::from_secs(11));
    }
    assert_nothing_yet(&mut sub, "after 3 of 3 deliveries the message is dead").await;
    let letters = bus
        .transport()
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, DeadReason::MaxDeliveries);
    assert_eq!(letters[0].attempts, 3);
}

#[tokio::test]
async fn a_deadline_that_passes_while_queued_dead_letters_the_message_unseen() {
    let (bus, clock) = manual_bus();
    bus.publish_with(
        &channel("jobs"),
        &Job { n: 1 },
        &PublishOptions::new().ttl(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    bus.publish(&channel("jobs"), &Job { n: 2 }).await.unwrap();
    clock.advance(Duration::from_secs(6));

    let mut sub = subscribe(&bus, options("jobs")).await;
    let delivery = next(&mut sub).await;
    let job: Job = delivery.envelope().decode_json().unwrap();
    assert_eq!(job, Job { n: 2 }, "the expired message is never delivered");
    delivery.ack().await.unwrap();
    assert_nothing_yet(&mut sub, "only the live message is delivered").await;

    let letters = bus
        .transport()
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, DeadReason::Expired);
}

#[tokio::test]
async fn delayed_delivery_waits_for_the_clock_not_for_real_time() {
    let (bus, clock) = manual_bus();
    let mut sub = subscribe(&bus, options("reminders")).await;
    bus.publish_with(
        &channel("reminders"),
        &Job { n: 1 },
        &PublishOptions::new().delay(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    bus.publish(&channel("reminders"), &Job { n: 2 })
        .await
        .unwrap();

    let now = next(&mut sub).await;
    assert_eq!(now.envelope().decode_json::<Job>().unwrap(), Job { n: 2 });
    now.ack().await.unwrap();
    clock.advance(Duration::from_secs(3599));
    assert_nothing_yet(
        &mut sub,
        "a message delayed 1 h is not delivered after 59:59",
    )
    .await;
    clock.advance(Duration::from_secs(1));
    let later = next(&mut sub).await;
    assert_eq!(later.envelope().decode_json::<Job>().unwrap(), Job { n: 1 });
    assert_eq!(later.attempt(), 1);
}

#[tokio::test]
async fn agent_backoff_retries_follow_the_clock() {
    let (bus, clock) = manual_bus();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let retries = HandlerOptions::default().backoff(Backoff {
        initial: Duration::from_secs(60),
        multiplier: 2.0,
        max: Duration::from_secs(600),
        jitter: 0.0,
    });
    let agent = Agent::builder(AgentDescriptor::new("w-1", "worker"))
        .handle_with("jobs", retries, move |ctx: Context, _job: Job| {
            let done_tx = done_tx.clone();
            async move {
                let attempt = ctx.envelope().map_or(0, |e| e.header.attempt);
                done_tx.send(attempt).ok();
                if attempt < 3 {
                    return Err(format!("attempt {attempt} fails").into());
                }
                Ok(())
            }
        })
        .spawn(&bus)
        .await
        .unwrap();
    bus.publish(&channel("jobs"), &Job { n: 1 }).await.unwrap();

    assert_eq!(recv(&mut done_rx).await, Some(1));
    // First retry after 60 s (no jitter), the second after 120 s more.
    clock.advance(Duration::from_secs(59));
    assert!(tokio::time::timeout(NOTHING_YET, done_rx.recv())
        .await
        .is_err());
    clock.advance(Duration::from_secs(1));
    assert_eq!(recv(&mut done_rx).await, Some(2));
    clock.advance(Duration::from_secs(119));
    assert!(tokio::time::timeout(NOTHING_YET, done_rx.recv())
        .await
        .is_err());
    clock.advance(Duration::from_secs(1));
    assert_eq!(recv(&mut done_rx).await, Some(3));
    agent.shutdown(Duration::from_secs(1)).await;
}

async fn recv(rx: &mut tokio::sync::mpsc::UnboundedReceiver<u32>) -> Option<u32> {
    tokio::time::timeout(ARRIVES, rx.recv())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn a_request_times_out_on_the_bus_clock() {
    let (bus, clock) = manual_bus();
    // A responder group that never answers, so the request is not NoResponders.
    let _silent = subscribe(&bus, options("svc")).await;
    let requester = bus.clone();
    let request = tokio::spawn(async move {
        requester
            .request::<Job, Job>(&channel("svc"), &Job { n: 1 }, Duration::from_secs(30))
            .await
    });
    tokio::time::sleep(NOTHING_YET).await;
    assert!(
        !request.is_finished(),
        "no reply and no time passed: still waiting"
    );
    clock.advance(Duration::from_secs(31));
    let error = tokio::time::timeout(ARRIVES, request)
        .await
        .expect("the request ends once the clock passes its timeout")
        .unwrap()
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert!(error.to_string().contains("svc"), "{error}");
}

#[tokio::test]
async fn the_dedup_window_closes_on_the_clock() {
    let (bus, clock) = manual_bus();
    bus.transport()
        .configure_channels(
            ChannelPattern::new("orders").unwrap(),
            ChannelConfig {
                dedup_window: Duration::from_secs(60),
                ..ChannelConfig::default()
            },
        )
        .await
        .unwrap();
    let orders = channel("orders");
    let same_id = PublishOptions::new().id(MessageId::new());
    let publish = || bus.publish_with(&orders, &Job { n: 1 }, &same_id);
    let first = publish().await.unwrap();
    clock.advance(Duration::from_secs(59));
    let second = publish().await.unwrap();
    assert!(
        second.duplicate,
        "inside the window the same id is a duplicate"
    );
    assert_eq!(second.sequence, first.sequence);
    clock.advance(Duration::from_secs(2));
    let third = publish().await.unwrap();
    assert!(!third.duplicate, "after the window the id is new again");
    assert!(third.sequence > first.sequence);
}

#[tokio::test]
async fn age_retention_drops_messages_older_than_max_age() {
    let (bus, clock) = manual_bus();
    bus.transport()
        .configure_channels(
            ChannelPattern::new("metrics").unwrap(),
            ChannelConfig {
                max_age: Some(Duration::from_secs(300)),
                ..ChannelConfig::default()
            },
        )
        .await
        .unwrap();
    bus.publish(&channel("metrics"), &Job { n: 1 })
        .await
        .unwrap();
    clock.advance(Duration::from_secs(301));
    bus.publish(&channel("metrics"), &Job { n: 2 })
        .await
        .unwrap();

    let mut sub = subscribe(&bus, options("metrics")).await;
    let delivery = next(&mut sub).await;
    assert_eq!(
        delivery.envelope().decode_json::<Job>().unwrap(),
        Job { n: 2 }
    );
    delivery.ack().await.unwrap();
    assert_nothing_yet(&mut sub, "the message older than max_age is gone").await;
}
