//! How a subscription wakes up on the real nats-server (`AGENTBUS_NATS_URL`, default
//! nats://127.0.0.1:4222): a busy consumer unsubscribes from new-message notices (it
//! would only drop a copy of every message it also fetches) and subscribes again when
//! it runs out of work, so a message published after it caught up still arrives at
//! once, not one `idle_poll` later.

use std::time::{Duration, Instant};

use agentbus::{ack_all, ChannelName, ChannelPattern, Envelope, SubscribeOptions, Transport};
use agentbus_nats::{NatsOptions, NatsStorage, NatsTransport};

fn url() -> String {
    std::env::var("AGENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

#[tokio::test]
async fn a_consumer_that_caught_up_is_woken_by_the_next_publish() {
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
    while got < backlog {
        let batch = tokio::time::timeout(Duration::from_secs(10), consumer.next_batch(64))
            .await
            .expect("the backlog keeps coming while the pump is busy")
            .expect("next_batch");
        got += batch.len() as u32;
        ack_all(&batch).await.expect("ack");
    }
    assert_eq!(got, backlog);
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
