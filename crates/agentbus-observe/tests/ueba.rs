//! Each UEBA detector fires on its deviation, once, and stays quiet on normal
//! traffic and while learning. Time is a manual clock.

use std::sync::Arc;
use std::time::Duration;

use agentbus::{
    Bus, ChannelName, ChannelPattern, Clock, Envelope, ManualClock, MemoryEngine, SubscribeOptions,
    Subscription,
};
use agentbus_observe::ueba::{Anomaly, UebaConfig, UebaDetector, ANOMALY_CHANNEL};
use chrono::{DateTime, Utc};

struct World {
    bus: Bus,
    clock: Arc<ManualClock>,
    anomalies: Subscription,
    detector: Arc<UebaDetector>,
}

async fn world() -> World {
    let start = DateTime::parse_from_rfc3339("2026-06-01T08:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let clock = Arc::new(ManualClock::starting_at(start));
    let detector = UebaDetector::new(UebaConfig {
        learn_for: Duration::from_secs(60),
        bucket: Duration::from_secs(10),
        sigma: 3.0,
        min_spike: 10,
        min_buckets: 3,
    });
    let engine = MemoryEngine::builder().clock(clock.clone()).build();
    let bus = Bus::builder(Arc::new(engine))
        .clock(clock.clone())
        .observer(detector.clone())
        .build();
    detector.start_publisher(&bus).unwrap();
    assert!(detector.start_publisher(&bus).is_none());
    let anomalies = bus
        .subscribe(SubscribeOptions::new(
            ChannelPattern::new(ANOMALY_CHANNEL).unwrap(),
        ))
        .await
        .unwrap();
    World {
        bus,
        clock,
        anomalies,
        detector,
    }
}

async fn send(w: &World, sender: &str, kind: &str, to: &str) {
    let mut envelope = Envelope::json(ChannelName::new("work.items").unwrap(), kind, &1).unwrap();
    envelope.header.timestamp = w.clock.now();
    envelope.header.sender = Some(sender.into());
    envelope.header.receiver = Some(to.into());
    w.bus.publish_envelope(envelope).await.unwrap();
}

/// Learning: 6 buckets of 10 s with 2 or 3 messages of kind `a` to `bob`.
async fn learn(w: &World) {
    for bucket in 0..6 {
        for _ in 0..(2 + bucket % 2) {
            send(w, "alice", "a", "bob").await;
        }
        w.clock.advance(Duration::from_secs(10));
    }
}

/// The anomalies published so far (waits a little for the publisher task).
async fn drain(w: &mut World, expect: usize) -> Vec<Anomaly> {
    let mut out = Vec::new();
    while out.len() < expect {
        let next = tokio::time::timeout(Duration::from_secs(5), w.anomalies.next())
            .await
            .expect("an anomaly arrives")
            .unwrap();
        out.push(next.envelope().decode_json::<Anomaly>().unwrap());
        next.ack().await.unwrap();
    }
    // Nothing more.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), w.anomalies.next())
            .await
            .is_err(),
        "an unexpected anomaly"
    );
    out
}

#[tokio::test]
async fn normal_traffic_raises_nothing() {
    let mut w = world().await;
    learn(&w).await;
    // After learning: the same kinds, peers and rate.
    for _ in 0..3 {
        for _ in 0..3 {
            send(&w, "alice", "a", "bob").await;
        }
        w.clock.advance(Duration::from_secs(10));
    }
    drain(&mut w, 0).await;
    assert_eq!(w.detector.counts(), (0, 0));
}

#[tokio::test]
async fn a_new_kind_fires_once() {
    let mut w = world().await;
    learn(&w).await;
    send(&w, "alice", "b", "bob").await;
    send(&w, "alice", "b", "bob").await;
    let found = drain(&mut w, 1).await;
    assert_eq!(found[0].detector, "new_kind");
    assert_eq!(found[0].agent, "alice");
    assert!(found[0].detail.contains("'b'"), "{}", found[0].detail);
}

#[tokio::test]
async fn a_new_peer_fires_once() {
    let mut w = world().await;
    learn(&w).await;
    send(&w, "alice", "a", "carol").await;
    send(&w, "alice", "a", "carol").await;
    let found = drain(&mut w, 1).await;
    assert_eq!(found[0].detector, "new_peer");
    assert!(found[0].detail.contains("'carol'"));
}

#[tokio::test]
async fn a_rate_spike_fires_once_per_bucket_and_not_below_k_sigma() {
    let mut w = world().await;
    learn(&w).await;
    // Mean 2.5, σ floored at √2.5 ≈ 1.58: threshold ≈ 7.2, but min_spike is 10.
    for _ in 0..9 {
        send(&w, "alice", "a", "bob").await;
    }
    w.clock.advance(Duration::from_secs(10));
    drain(&mut w, 0).await;
    for _ in 0..30 {
        send(&w, "alice", "a", "bob").await;
    }
    let found = drain(&mut w, 1).await;
    assert_eq!(found[0].detector, "rate_spike");
    assert_eq!(found[0].observed, 10.0);
    assert_eq!(found[0].baseline, 2.5);
}

#[tokio::test]
async fn nothing_fires_while_learning_and_each_agent_has_its_own_baseline() {
    let mut w = world().await;
    // During alice's learning window, anything goes.
    for kind in ["a", "b", "c"] {
        for _ in 0..15 {
            send(&w, "alice", kind, "bob").await;
        }
    }
    w.clock.advance(Duration::from_secs(30));
    // bob starts later: his own window.
    send(&w, "bob", "z", "alice").await;
    w.clock.advance(Duration::from_secs(35));
    // alice is past learning; "c" is known to her, but bob is still learning.
    send(&w, "alice", "c", "bob").await;
    send(&w, "bob", "y", "dave").await;
    drain(&mut w, 0).await;
    w.clock.advance(Duration::from_secs(30));
    send(&w, "bob", "x", "alice").await;
    let found = drain(&mut w, 1).await;
    assert_eq!(
        (found[0].agent.as_str(), found[0].detector.as_str()),
        ("bob", "new_kind")
    );
}
