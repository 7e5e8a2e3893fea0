//! The native fast path (`src/fast.rs`) on the real Redis: what the conformance suite
//! reaches mostly through script takes (its consumers usually subscribe after
//! publishing, and a consumer's first take is a script take). Here each consumer first
//! idles once, so the takes after it are native `XREADGROUP`s.

use std::time::Duration;

use agentbus::{
    ack_all, ChannelName, ChannelPattern, Consumer, DeadLetterFilter, DeadReason, Delivery,
    Envelope, Priority, SubscribeOptions, Transport,
};
use agentbus_redis::{RedisOptions, RedisTransport};

fn url() -> String {
    std::env::var("AGENTBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn transport() -> RedisTransport {
    let prefix = format!("abfast-{:012x}", fastrand::u64(..1 << 48));
    RedisTransport::connect(&url(), RedisOptions::default().prefix(prefix))
        .await
        .unwrap()
}

/// One `next_batch` that finds nothing: the consumer has then run its first (script)
/// take, and the following takes within the scan interval are native.
async fn idle_once(consumer: &mut dyn Consumer) {
    let got = tokio::time::timeout(Duration::from_millis(300), consumer.next_batch(8)).await;
    assert!(
        got.is_err(),
        "nothing was published yet, but got {:?}",
        got.map(|r| r.map(|b| b.len()))
    );
}

fn number(d: &Delivery) -> u64 {
    String::from_utf8_lossy(&d.envelope().payload)
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_lane_surplus_is_handed_back_and_served_in_priority_order_as_first_deliveries() {
    let transport = transport().await;
    let channel = ChannelName::new("fast.lanes").unwrap();
    let mut consumer = transport
        .subscribe(
            SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                .group("lanes")
                .prefetch(2),
        )
        .await
        .unwrap();
    idle_once(&mut *consumer).await;

    // Three rounds over the four priorities, in one batch: the native read with room
    // 2 sees entries in all four lanes and must hand back what it cannot deliver.
    const PRIORITIES: [Priority; 4] = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];
    let mut batch = Vec::new();
    for n in 0..12u64 {
        batch.push(
            Envelope::new(channel.clone(), "n", n.to_string().into_bytes())
                .with_priority(PRIORITIES[(n % 4) as usize]),
        );
    }
    for r in transport.publish_batch(batch).await {
        r.unwrap();
    }

    let mut got = Vec::new();
    while got.len() < 12 {
        let batch = tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(2))
            .await
            .expect("the remaining messages within 5 s")
            .unwrap();
        assert!(batch.len() <= 2, "prefetch 2, got {}", batch.len());
        for d in &batch {
            assert_eq!(
                d.envelope().header.attempt,
                1,
                "message {} was never delivered before",
                number(d)
            );
            got.push(number(d));
        }
        ack_all(&batch).await.unwrap();
    }
    // Critical (n % 4 == 3) first, low last; publish order within a priority.
    assert_eq!(got, vec![3, 7, 11, 2, 6, 10, 1, 5, 9, 0, 4, 8]);

    let stats = transport.stats().await.unwrap();
    let group = stats.groups.iter().find(|g| g.group == "lanes").unwrap();
    assert_eq!(
        (group.delivered, group.redelivered, group.acked),
        (12, 0, 12),
        "delivered / redelivered / acked counters"
    );
    assert_eq!((group.pending, group.in_flight), (0, 0), "{group:?}");
    drop(consumer);
    transport.delete_everything().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_read_dead_letters_expired_entries_and_parks_delayed_ones() {
    let transport = transport().await;
    let channel = ChannelName::new("fast.time").unwrap();
    let mut consumer = transport
        .subscribe(SubscribeOptions::new(ChannelPattern::from(channel.clone())).group("time"))
        .await
        .unwrap();
    idle_once(&mut *consumer).await;

    let expiring =
        Envelope::new(channel.clone(), "n", &b"1"[..]).with_ttl(Duration::from_millis(100));
    let expiring_id = expiring.header.id;
    let delayed =
        Envelope::new(channel.clone(), "n", &b"2"[..]).with_delay(Duration::from_millis(600));
    let plain = Envelope::new(channel.clone(), "n", &b"3"[..]);
    for r in transport
        .publish_batch(vec![expiring, delayed, plain])
        .await
    {
        r.unwrap();
    }
    // Nobody takes while the first one's deadline passes.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let first = consumer.next_batch(8).await.unwrap();
    let numbers: Vec<u64> = first.iter().map(number).collect();
    assert_eq!(numbers, vec![3], "only the plain message is ready");
    ack_all(&first).await.unwrap();

    let letters = transport
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].envelope.header.id, expiring_id);
    assert_eq!(letters[0].reason, DeadReason::Expired);
    assert_eq!(letters[0].attempts, 0, "it was never delivered");

    let later = tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(8))
        .await
        .expect("the delayed message within 5 s")
        .unwrap();
    let numbers: Vec<u64> = later.iter().map(number).collect();
    assert_eq!(numbers, vec![2], "the delayed message, once due");
    assert_eq!(later[0].envelope().header.attempt, 1);
    ack_all(&later).await.unwrap();
    drop(consumer);
    transport.delete_everything().await.unwrap();
}
