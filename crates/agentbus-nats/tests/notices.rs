//! How a subscription wakes up on the real nats-server (`AGENTBUS_NATS_URL`, default
//! nats://127.0.0.1:4222): a busy consumer unsubscribes from new-message notices (it
//! would only drop a copy of every message it also fetches) and subscribes again when
//! it runs out of work, so a message published after it caught up still arrives at
//! once, not one `idle_poll` later, and it keeps the other lanes' notices, so a
//! message of a higher priority is still seen at once.

use std::time::{Duration, Instant};

use agentbus::{
    ack_all, ChannelName, ChannelPattern, Envelope, Priority, SubscribeOptions, Transport,
};
use agentbus_nats::{NatsOptions, NatsStorage, NatsTransport};

fn url() -> String {
    std::env::var("AGENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

#[tokio::test]
async fn a_busy_consumer_still_sees_higher_lanes_and_is_woken_after_catching_up() {
    let prefix = format!("abbell{}", uuid::Uuid::new_v4().simple());
    // With a 30 s idle poll only a notice can deliver the last message within the
    // test's 5 s.
    let options = NatsOptions {
        idle_poll: Duration::from_secs(30),
        ..NatsOptions::default()
    }
    .prefix(prefix.clone())
    .storage(NatsStorage::Memory);
    let transport = NatsTransport::connect(&url(), options)
        .await
        .expect("nats-server with JetStream at AGENTBUS_NATS_URL");
    let channel = ChannelName::new("jobs.bell").unwrap();
    let mut consumer = transport
        .subscribe(
            SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                .group("workers")
                .prefetch(8),
        )
        .await
        .expect("subscribe");
    // A backlog far over the notices a busy pump drops before it unsubscribes.
    let backlog = 600;
    let envelopes = (0..backlog)
        .map(|n: u32| Envelope::new(channel.clone(), "test.n", n.to_string().into_bytes()))
        .collect();
    for receipt in transport.publish_batch(envelopes).await {
        receipt.expect("publish");
    }
    let mut got = 0;
    // The critical message published after the first 80 (by then the busy pump has
    // unsubscribed the normal lane): comes as soon as its own lane's notice rings,
    // not after the whole backlog (no full sweep within the 30 s idle poll).
    let mut critical_after = None;
    let mut critical_sent = false;
    while got < backlog || critical_after.is_none() {
        let batch = tokio::time::timeout(Duration::from_secs(10), consumer.next_batch(64))
            .await
            .expect("the backlog keeps coming while the pump is busy")
            .expect("next_batch");
        for delivery in &batch {
            if delivery.envelope().header.priority == Priority::Critical {
                critical_after = Some(got);
            } else {
                got += 1;
            }
        }
        ack_all(&batch).await.expect("ack");
        if got >= 80 && !critical_sent {
            critical_sent = true;
            transport
                .publish(
                    Envelope::new(channel.clone(), "test.n", b"urgent".to_vec())
                        .with_priority(Priority::Critical),
                )
                .await
                .expect("publish");
        }
    }
    assert_eq!(got, backlog);
    let critical_after = critical_after.expect("the critical message came");
    assert!(
        critical_after < backlog - 100,
        "the critical message came after {critical_after} of {backlog} normal ones"
    );
    // Let the pump run out of work and go to sleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    transport
        .publish(Envelope::new(channel.clone(), "test.n", b"late".to_vec()))
        .await
        .expect("publish");
    let batch = tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(64))
        .await
        .expect("a notice wakes the idle pump: the message came long before idle_poll")
        .expect("next_batch");
    assert_eq!(batch.len(), 1);
    assert_eq!(&batch[0].envelope().payload[..], b"late");
    ack_all(&batch).await.expect("ack");
    eprintln!("the late message took {:?}", started.elapsed());
    drop(consumer);
    transport.close().await.expect("close");
    NatsTransport::delete_prefix(transport.client(), &prefix)
        .await
        .expect("delete the test prefix");
}
