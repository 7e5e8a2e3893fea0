//! The native fast path (`src/fast.rs`) on the real Redis: what the conformance suite
//! reaches mostly through script takes (its consumers usually subscribe after
//! publishing, and a consumer's first take is a script take). Here each consumer first
//! idles once, so the takes after it are native `XREADGROUP`s.

use std::time::Duration;

use agentbus::{
    ack_all, ChannelName, ChannelPattern, ChannelStats, Consumer, DeadLetterFilter, DeadReason,
    Delivery, Envelope, GroupStats, Priority, SubscribeOptions, Transport,
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

/// A consumer subscribed with `options` that has idled once (see [`idle_once`]), so
/// its next takes are native.
async fn native_consumer(
    transport: &RedisTransport,
    options: SubscribeOptions,
) -> Box<dyn Consumer> {
    let mut consumer = transport.subscribe(options).await.unwrap();
    idle_once(&mut *consumer).await;
    consumer
}

/// The statistics of group `name`.
async fn group_stats(transport: &RedisTransport, name: &str) -> GroupStats {
    let stats = transport.stats().await.unwrap();
    stats
        .groups
        .into_iter()
        .find(|g| g.group == name)
        .unwrap_or_else(|| panic!("no group {name} in the statistics"))
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
    let mut consumer = native_consumer(
        &transport,
        SubscribeOptions::new(ChannelPattern::from(channel.clone()))
            .group("lanes")
            .prefetch(2),
    )
    .await;

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

    let group = group_stats(&transport, "lanes").await;
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
    let mut consumer = native_consumer(
        &transport,
        SubscribeOptions::new(ChannelPattern::from(channel.clone())).group("time"),
    )
    .await;

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

/// The bulk ack (`ack.lua`) says only how many entries it acked, so it must not be
/// used for a batch of which another consumer may have claimed a part: then each
/// entry gets its own `XACK`. The batch's ack fails with `AlreadySettled` (for the
/// entry acked elsewhere) and the rest of the batch is still acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_ack_after_a_claim_elsewhere_reports_exactly_the_entry_lost() {
    let transport = transport().await;
    let channel = ChannelName::new("fast.claims").unwrap();
    let options = || {
        SubscribeOptions::new(ChannelPattern::from(channel.clone()))
            .group("claims")
            .ack_wait(Duration::from_millis(200))
    };
    let mut slow = transport.subscribe(options().prefetch(8)).await.unwrap();
    idle_once(&mut *slow).await;
    for n in 1..=2u64 {
        transport
            .publish(Envelope::new(
                channel.clone(),
                "n",
                n.to_string().into_bytes(),
            ))
            .await
            .unwrap();
    }
    let mut held = Vec::new();
    while held.len() < 2 {
        let batch = tokio::time::timeout(Duration::from_secs(5), slow.next_batch(8))
            .await
            .expect("both messages within 5 s")
            .unwrap();
        held.extend(batch);
    }
    // The slow consumer's ack wait runs out; another member claims one of the two.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut fast = transport.subscribe(options().prefetch(1)).await.unwrap();
    let taken = tokio::time::timeout(Duration::from_secs(5), fast.next_batch(1))
        .await
        .expect("a redelivery within 5 s")
        .unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].envelope().header.attempt, 2, "a redelivery");
    let lost = number(&taken[0]);
    taken[0].ack().await.unwrap();

    let error = ack_all(&held)
        .await
        .expect_err("one of the two was acked elsewhere");
    assert_eq!(error.kind(), agentbus::ErrorKind::AlreadySettled, "{error}");
    // The other one was acked by the slow consumer's batch: nothing is left.
    let group = group_stats(&transport, "claims").await;
    assert_eq!((group.pending, group.in_flight), (0, 0), "{group:?}");
    assert_eq!(group.acked, 2, "{group:?}");
    assert!(held.iter().any(|d| number(d) == lost));
    drop((slow, fast));
    transport.delete_everything().await.unwrap();
}

/// Deliveries taken while no claim happened are acked in bulk: every ack lands, and a
/// second ack of the same entries through a new batch is refused by the library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_ack_acks_every_entry_of_the_batch() {
    let transport = transport().await;
    let channel = ChannelName::new("fast.bulk").unwrap();
    let mut consumer = native_consumer(
        &transport,
        SubscribeOptions::new(ChannelPattern::from(channel.clone()))
            .group("bulk")
            .prefetch(64),
    )
    .await;
    let batch: Vec<Envelope> = (0..40u64)
        .map(|n| {
            Envelope::new(channel.clone(), "n", n.to_string().into_bytes()).with_priority(
                if n % 2 == 0 {
                    Priority::High
                } else {
                    Priority::Low
                },
            )
        })
        .collect();
    for r in transport.publish_batch(batch).await {
        r.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 40 {
        let batch = tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(64))
            .await
            .expect("all messages within 5 s")
            .unwrap();
        ack_all(&batch).await.unwrap();
        got.extend(batch.iter().map(number));
    }
    got.sort_unstable();
    assert_eq!(got, (0..40).collect::<Vec<_>>());
    let group = group_stats(&transport, "bulk").await;
    assert_eq!(
        (group.acked, group.pending, group.in_flight),
        (40, 0, 0),
        "{group:?}"
    );
    drop(consumer);
    transport.delete_everything().await.unwrap();
}

/// A native take's deliveries are counted by the subscription's next round trip (its
/// next take or ack), not by one of their own: a batch held unacked shows in `stats`
/// once the consumer takes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_is_counted_by_the_next_take_when_nothing_is_acked() {
    let transport = transport().await;
    let channel = ChannelName::new("fast.count").unwrap();
    let mut consumer = native_consumer(
        &transport,
        SubscribeOptions::new(ChannelPattern::from(channel.clone())).group("count"),
    )
    .await;
    for n in 0..3u64 {
        transport
            .publish(Envelope::new(
                channel.clone(),
                "n",
                n.to_string().into_bytes(),
            ))
            .await
            .unwrap();
    }
    let mut held = Vec::new();
    while held.len() < 3 {
        held.extend(
            tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(8))
                .await
                .expect("three messages within 5 s")
                .unwrap(),
        );
    }
    // Nothing more to take: the next take finds nothing, and counts the three.
    idle_once(&mut *consumer).await;
    let group = group_stats(&transport, "count").await;
    assert_eq!((group.delivered, group.acked), (3, 0), "{group:?}");
    assert_eq!(group.in_flight, 3, "{group:?}");
    drop((held, consumer));
    transport.delete_everything().await.unwrap();
}

/// A channel whose lane streams already hold entries with larger ids than the
/// server's clock gives (written before the format change, or after the clock went
/// back) gets ids after them: publishing never fails on "ID equal or smaller".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_with_later_ids_than_the_clock_publishes_after_them() {
    let transport = transport().await;
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // An entry of an older writer, far in the future, on the normal lane.
    let stream = format!("{}:s:fast.future:1", transport.prefix());
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("99999999999999-7")
        .arg("p")
        .arg("old")
        .query_async(&mut conn)
        .await
        .unwrap();
    let channel = ChannelName::new("fast.future").unwrap();
    let first = transport
        .publish(Envelope::new(channel.clone(), "n", &b"1"[..]))
        .await
        .unwrap();
    let second = transport
        .publish(Envelope::new(channel.clone(), "n", &b"2"[..]).with_priority(Priority::High))
        .await
        .unwrap();
    assert!(second.sequence > first.sequence, "{first:?} {second:?}");
    let range = every_entry(&mut conn, &stream).await;
    let ids: Vec<&str> = range.ids.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(
        ids[1],
        format!("100000000000000-{}", first.sequence),
        "the new entry comes right after the old one's millisecond"
    );
    transport.delete_everything().await.unwrap();
}

/// A publish whose `XADD` fails fails as a whole and gives back the sequence it took
/// (the counters are written back before the script fails): publishing the same
/// message again stores it — it is no duplicate of a message never stored — with the
/// next sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_gives_back_its_sequence() {
    failed_store_gives_back_its_sequence(agentbus::ChannelConfig::default().dedup_window).await;
}

/// The same on a channel with dedup off, whose messages go without ids after the
/// first publish (the script's loop over such runs keeps the counters in locals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_without_ids_gives_back_its_sequence() {
    failed_store_gives_back_its_sequence(Duration::ZERO).await;
}

async fn failed_store_gives_back_its_sequence(dedup_window: Duration) {
    let transport = transport().await;
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = ChannelName::new("fast.broken").unwrap();
    transport
        .configure_channels(
            ChannelPattern::from(channel.clone()),
            agentbus::ChannelConfig {
                dedup_window,
                ..agentbus::ChannelConfig::default()
            },
        )
        .await
        .unwrap();
    let first = transport
        .publish(Envelope::new(channel.clone(), "n", &b"1"[..]))
        .await
        .unwrap();
    // The normal lane's stream is replaced by a string: every XADD to it fails.
    let stream = format!("{}:s:fast.broken:1", transport.prefix());
    let _: () = redis::cmd("SET")
        .arg(&stream)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The first of the batch goes to another lane and is stored; the second fails.
    let stored = Envelope::new(channel.clone(), "n", &b"2"[..]).with_priority(Priority::High);
    let again = Envelope::new(channel.clone(), "n", &b"3"[..]);
    let id = again.header.id;
    let results = transport.publish_batch(vec![stored, again.clone()]).await;
    assert!(results.iter().all(Result::is_err), "{results:?}");

    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    let receipt = transport.publish(again).await.unwrap();
    assert_eq!(receipt.id, id);
    assert!(!receipt.duplicate, "it was never stored: {receipt:?}");
    assert_eq!(
        receipt.sequence,
        first.sequence + 2,
        "after the one stored before the failure: {first:?} {receipt:?}"
    );
    // Three stored (the first was lost with the stream the test replaced, which the
    // counter cannot know): the failed store's count and bytes were given back too.
    let (count, bytes): (u64, u64) = redis::cmd("HMGET")
        .arg(format!("{}:c:fast.broken", transport.prefix()))
        .arg("count")
        .arg("bytes")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Every stored message has the same size: the one stored last.
    let entries = every_entry(&mut conn, &stream).await;
    let size = entries.ids[0]
        .get::<Vec<u8>>("m")
        .map_or(0, |m| m.len() as u64);
    assert_eq!((count, bytes), (3, 3 * size));
    transport.delete_everything().await.unwrap();
}

/// The statistics of `channel`.
/// Every entry of `stream`, oldest first.
async fn every_entry(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> redis::streams::StreamRangeReply {
    redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE")
}

async fn channel_stats(transport: &RedisTransport, channel: &ChannelName) -> ChannelStats {
    let stats = transport.stats().await.unwrap();
    stats
        .channels
        .into_iter()
        .find(|c| &c.channel == channel)
        .unwrap_or_else(|| panic!("no channel {channel} in the statistics"))
}

/// On a channel with dedup off (messages sent without ids), the limits hold message
/// by message inside one batch: with `reject_new` the messages beyond the limit are
/// `Full` and take no sequence; with `drop_oldest` every message is stored and the
/// oldest go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_inside_a_batch_without_ids() {
    let transport = transport().await;
    for (name, discard) in [
        ("fast.plain.reject", agentbus::Discard::RejectNew),
        ("fast.plain.drop", agentbus::Discard::DropOldest),
    ] {
        let channel = ChannelName::new(name).unwrap();
        transport
            .configure_channels(
                ChannelPattern::from(channel.clone()),
                agentbus::ChannelConfig {
                    max_messages: Some(4),
                    discard,
                    dedup_window: Duration::ZERO,
                    ..agentbus::ChannelConfig::default()
                },
            )
            .await
            .unwrap();
        // The first publish teaches the client that the channel has dedup off.
        transport
            .publish(Envelope::new(channel.clone(), "n", &b"0"[..]))
            .await
            .unwrap();
        let batch = (1..=5)
            .map(|i| Envelope::new(channel.clone(), "n", i.to_string().into_bytes()))
            .collect();
        let results = transport.publish_batch(batch).await;
        let stats = channel_stats(&transport, &channel).await;
        match discard {
            agentbus::Discard::RejectNew => {
                let sequences: Vec<u64> = results[..3]
                    .iter()
                    .map(|r| r.as_ref().unwrap().sequence)
                    .collect();
                assert_eq!(sequences, [2, 3, 4], "{results:?}");
                for r in &results[3..] {
                    let e = r.as_ref().unwrap_err();
                    assert_eq!(e.kind(), agentbus::ErrorKind::Full, "{e}");
                }
                assert_eq!((stats.messages, stats.published), (4, 4), "{stats:?}");
            }
            agentbus::Discard::DropOldest => {
                let sequences: Vec<u64> = results
                    .iter()
                    .map(|r| r.as_ref().unwrap().sequence)
                    .collect();
                assert_eq!(sequences, [2, 3, 4, 5, 6], "{results:?}");
                assert_eq!(
                    (stats.messages, stats.published, stats.dropped),
                    (4, 6, 2),
                    "{stats:?}"
                );
            }
        }
    }
    transport.delete_everything().await.unwrap();
}

/// Dedup inside one publish call: the second message with an id already stored in the
/// same batch gets the first one's receipt, takes no sequence, and the id is remembered
/// for later calls too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_inside_one_batch_gets_the_first_ones_receipt() {
    let transport = transport().await;
    let channel = ChannelName::new("fast.dedup.batch").unwrap();
    let first = Envelope::new(channel.clone(), "n", &b"1"[..]);
    let mut again = Envelope::new(channel.clone(), "n", &b"2"[..]);
    again.header.id = first.header.id;
    let other = Envelope::new(channel.clone(), "n", &b"3"[..]);
    let results: Vec<_> = transport
        .publish_batch(vec![first.clone(), again, other])
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(!results[0].duplicate, "{results:?}");
    assert!(results[1].duplicate, "{results:?}");
    assert_eq!(results[1].sequence, results[0].sequence, "{results:?}");
    assert!(!results[2].duplicate, "{results:?}");
    assert_eq!(results[2].sequence, results[0].sequence + 1, "{results:?}");

    let later = transport.publish(first).await.unwrap();
    assert!(later.duplicate, "{later:?}");
    assert_eq!(later.sequence, results[0].sequence);
    transport.delete_everything().await.unwrap();
}

/// The server's clock in ms.
async fn server_ms(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    s * 1000 + us / 1000
}

/// Dedup memory lives in one hash per window-wide time bucket (`P:dd:<window>:<n>`): a
/// lookup reads the previous bucket too, and an id stored longer ago than the window
/// is no duplicate any more, wherever it still lies. The remembered entries are
/// written straight into the previous bucket, as a publish one bucket earlier left them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_reads_the_previous_bucket_and_forgets_ids_older_than_the_window() {
    let transport = transport().await;
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = ChannelName::new("fast.dedup.buckets").unwrap();
    const WINDOW_MS: u64 = 60_000;
    transport
        .configure_channels(
            ChannelPattern::from(channel.clone()),
            agentbus::ChannelConfig {
                dedup_window: Duration::from_millis(WINDOW_MS),
                ..agentbus::ChannelConfig::default()
            },
        )
        .await
        .unwrap();
    // A bucket boundary between reading the clock and publishing moves "previous"
    // along: then the attempt proves nothing and runs again with fresh ids.
    for _ in 0..3 {
        let recent = Envelope::new(channel.clone(), "n", &b"recent"[..]);
        let stale = Envelope::new(channel.clone(), "n", &b"stale"[..]);
        let now = server_ms(&mut conn).await;
        let bucket = format!(
            "{}:dd:{WINDOW_MS}:{}",
            transport.prefix(),
            now / WINDOW_MS - 1
        );
        let _: () = redis::cmd("HSET")
            .arg(&bucket)
            .arg(recent.header.id.to_string())
            .arg(format!("41:2:{now}"))
            .arg(stale.header.id.to_string())
            .arg(format!("42:2:{}", now - WINDOW_MS - 1))
            .query_async(&mut conn)
            .await
            .unwrap();
        let recent_receipt = transport.publish(recent).await.unwrap();
        let stale_receipt = transport.publish(stale).await.unwrap();
        if server_ms(&mut conn).await / WINDOW_MS != now / WINDOW_MS {
            continue;
        }
        assert!(recent_receipt.duplicate, "{recent_receipt:?}");
        assert_eq!(recent_receipt.sequence, 41, "the remembered receipt");
        assert!(
            !stale_receipt.duplicate,
            "older than the window: {stale_receipt:?}"
        );
        transport.delete_everything().await.unwrap();
        return;
    }
    panic!("three bucket boundaries in three attempts");
}
