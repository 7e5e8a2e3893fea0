//! The interaction store records what a bus does and answers queries by agent,
//! thread, kind and time window.

use std::sync::Arc;
use std::time::Duration;

use agentbus::{
    Bus, ChannelName, ChannelPattern, DeadReason, Envelope, ManualClock, MemoryEngine,
    SubscribeOptions,
};
use agentbus_observe::store::{InteractionStore, Query};
use chrono::{DateTime, Utc};

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

async fn send(bus: &Bus, channel: &str, kind: &str, sender: &str, correlation: &str) -> Envelope {
    let mut envelope = Envelope::json(
        ChannelName::new(channel).unwrap(),
        kind,
        &serde_json::json!({"from": sender}),
    )
    .unwrap();
    envelope.header.timestamp = bus.clock().now();
    envelope.header.sender = Some(sender.into());
    envelope.header.receiver = Some("worker".into());
    envelope.header.correlation_id = Some(correlation.into());
    bus.publish_envelope(envelope.clone()).await.unwrap();
    envelope
}

#[tokio::test]
async fn records_and_answers_queries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("interactions.db");
    let store = Arc::new(InteractionStore::open(&path).unwrap());
    let clock = Arc::new(ManualClock::starting_at(at("2026-05-01T12:00:00Z")));
    let engine = MemoryEngine::builder().clock(clock.clone()).build();
    let bus = Bus::builder(Arc::new(engine))
        .clock(clock.clone())
        .observer(store.clone())
        .build();
    let mut sub = bus
        .subscribe(
            SubscribeOptions::new(ChannelPattern::new("jobs.>").unwrap())
                .group("agent-worker--jobs"),
        )
        .await
        .unwrap();

    let first = send(&bus, "jobs.a", "job.start", "alice", "c1").await;
    clock.advance(Duration::from_millis(250));
    send(&bus, "jobs.a", "job.step", "alice", "c1").await;
    send(&bus, "jobs.b", "job.step", "alice", "c1").await;
    clock.advance(Duration::from_secs(60));
    send(&bus, "jobs.b", "job.other", "bob", "c2").await;

    let d = sub.next().await.unwrap();
    assert_eq!(d.envelope().header.id, first.header.id);
    clock.advance(Duration::from_millis(100));
    d.ack().await.unwrap();
    sub.next().await.unwrap().ack().await.unwrap();
    sub.next()
        .await
        .unwrap()
        .reject(DeadReason::Rejected, "not today")
        .await
        .unwrap();
    let _unsettled = sub.next().await.unwrap();
    store.flush().unwrap();
    assert_eq!(store.stats().written, 4 + 4 + 3);
    assert_eq!(store.stats().dropped, 0);

    // By agent: alice sent 3 messages.
    let alice = store
        .query(&Query::new().agent("alice").events(["published"]))
        .unwrap();
    assert_eq!(alice.len(), 3);
    assert!(alice.iter().all(|r| r.sender.as_deref() == Some("alice")));
    assert_eq!(alice[0].payload.as_deref(), Some(r#"{"from":"alice"}"#));
    // The worker handled 4 deliveries and settled 3 (receiver is "worker" on all
    // published rows too).
    let worker = store
        .query(
            &Query::new()
                .agent("worker")
                .events(["delivered", "acked", "rejected"]),
        )
        .unwrap();
    assert_eq!(worker.len(), 7);
    assert!(worker.iter().all(|r| r.agent.as_deref() == Some("worker")));
    // By kind and thread.
    assert_eq!(
        store
            .query(&Query::new().kind("job.step").events(["published"]))
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        store.query(&Query::new().correlation("c2")).unwrap().len(),
        2
    );
    // By time window: the first 200 ms hold only the first publish.
    let window = store
        .query(
            &Query::new()
                .since(at("2026-05-01T12:00:00Z"))
                .until(at("2026-05-01T12:00:00.200Z")),
        )
        .unwrap();
    assert_eq!(window.len(), 1);
    assert_eq!(window[0].message_id, first.header.id.to_string());
    // Limit keeps the newest, returned oldest first.
    let last_two = store.query(&Query::new().limit(2)).unwrap();
    assert_eq!(last_two.len(), 2);
    assert!(last_two[0].at <= last_two[1].at);
    // Headers are kept.
    let header = store.header(&first.header.id.to_string()).unwrap().unwrap();
    // As published: the bus stamped a traceparent on the way.
    assert!(header.trace.is_some());
    assert_eq!(
        agentbus::Header {
            trace: None,
            ..header
        },
        first.header
    );

    // The timeline of c1: three messages, who sent them, who handled them, latency.
    let timeline = store.timeline("c1").unwrap();
    assert_eq!(timeline.len(), 3);
    assert_eq!(timeline[0].from, "alice");
    assert_eq!(timeline[0].to, ["worker"]);
    assert_eq!(timeline[0].outcome, "acked");
    assert_eq!(timeline[0].ack_ms, Some(60_350.0));
    assert_eq!(timeline[2].outcome, "rejected");
    assert_eq!(timeline[2].error.as_deref(), Some("rejected: not today"));

    let c1 = store.workflow_status("c1").unwrap();
    assert_eq!(
        (
            c1.status.as_str(),
            c1.messages,
            c1.acked,
            c1.failed,
            c1.pending
        ),
        ("failed", 3, 2, 1, 0)
    );
    assert_eq!(c1.agents, ["alice", "worker"]);
    let c2 = store.workflow_status("c2").unwrap();
    assert_eq!((c2.status.as_str(), c2.pending), ("running", 1));
    assert_eq!(store.workflow_status("nope").unwrap().status, "unknown");

    // Another connection, read-only, sees the same; recording through it is refused.
    let reader = InteractionStore::open_read_only(&path).unwrap();
    assert_eq!(reader.timeline("c1").unwrap(), timeline);
    assert!(!reader.record(alice[0].clone(), None));
    assert_eq!(
        reader
            .delete_before(at("2030-01-01T00:00:00Z"))
            .unwrap_err()
            .kind(),
        agentbus::ErrorKind::Unsupported
    );
    // Retention: the rows of the first minute go, bob's thread (a minute later) stays.
    let before = store.query(&Query::new().limit(100)).unwrap().len() as u64;
    let deleted = store.delete_before(at("2026-05-01T12:01:00Z")).unwrap();
    assert!(deleted > 0);
    let left = store.query(&Query::new().limit(100)).unwrap();
    assert_eq!(left.len() as u64, before - deleted);
    assert!(left.iter().all(|r| r.at >= at("2026-05-01T12:01:00Z")));
    assert_eq!(
        store.query(&Query::new().correlation("c2")).unwrap().len(),
        2
    );
    let missing = InteractionStore::open_read_only(dir.path().join("none.db")).unwrap_err();
    assert_eq!(missing.kind(), agentbus::ErrorKind::NotFound);
}

#[test]
fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.db");
    std::fs::write(&path, vec![b'x'; 4096]).unwrap();
    let error = InteractionStore::open(&path).unwrap_err();
    assert_eq!(error.kind(), agentbus::ErrorKind::Backend);
    assert!(error.to_string().contains("junk.db"), "{error}");
}
