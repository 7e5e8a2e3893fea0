//! Per-channel `ChannelConfig` limits on the real nats-server (`AGENTBUS_NATS_URL`,
//! default nats://127.0.0.1:4222): `max_age`, `max_bytes` and `dedup_window` set
//! with `configure_channels` apply to the configured channel only, on a stream that
//! holds every channel. (`max_messages` is covered by the conformance suite's
//! retention rules.) Each test uses its own prefix and deletes it afterwards.

use std::time::{Duration, Instant};

use agentbus::{
    ChannelConfig, ChannelName, Consumer, Discard, Envelope, ErrorKind, StartPosition,
    SubscribeOptions, Transport,
};
use agentbus_nats::{NatsOptions, NatsStorage, NatsTransport};

fn url() -> String {
    std::env::var("AGENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

/// A transport on a fresh prefix; the prefix's streams are deleted on drop.
struct Fixture {
    transport: NatsTransport,
    prefix: String,
}

impl Fixture {
    async fn new(options: NatsOptions) -> Fixture {
        let prefix = format!("ablim{}", uuid::Uuid::new_v4().simple());
        let transport = NatsTransport::connect(
            &url(),
            options.prefix(prefix.clone()).storage(NatsStorage::Memory),
        )
        .await
        .expect("nats-server with JetStream at AGENTBUS_NATS_URL");
        Fixture { transport, prefix }
    }

    async fn cleanup(self) {
        self.transport.close().await.expect("close");
        NatsTransport::delete_prefix(self.transport.client(), &self.prefix)
            .await
            .expect("delete the test prefix");
    }
}

fn channel(name: &str) -> ChannelName {
    ChannelName::new(name).expect("valid channel name")
}

fn envelope(channel: &ChannelName, n: u32) -> Envelope {
    Envelope::new(channel.clone(), "test.n", n.to_string().into_bytes())
}

/// Every delivery until none comes for `quiet`, acked; returns (channel, payload).
async fn drain(consumer: &mut dyn Consumer, quiet: Duration) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while let Ok(batch) = tokio::time::timeout(quiet, consumer.next_batch(16)).await {
        for delivery in batch.expect("next_batch") {
            let e = delivery.envelope();
            got.push((
                e.channel.to_string(),
                String::from_utf8_lossy(&e.payload).to_string(),
            ));
            delivery.ack().await.expect("ack");
        }
    }
    got
}

async fn dropped(transport: &NatsTransport, channel: &ChannelName) -> u64 {
    let stats = transport.stats().await.expect("stats");
    stats
        .channels
        .iter()
        .find(|c| &c.channel == channel)
        .map_or(0, |c| c.dropped)
}

#[tokio::test]
async fn max_age_applies_to_the_configured_channel_only() {
    let fx = Fixture::new(NatsOptions::default()).await;
    let (aged, kept) = (channel("lim.aged"), channel("lim.kept"));
    fx.transport
        .configure_channels(
            aged.clone().into(),
            ChannelConfig {
                max_age: Some(Duration::from_millis(300)),
                ..ChannelConfig::default()
            },
        )
        .await
        .expect("configure max_age");
    let options = SubscribeOptions::new("lim.*".parse().expect("pattern"))
        .group("g")
        .start(StartPosition::Earliest);
    drop(
        fx.transport
            .subscribe(options.clone())
            .await
            .expect("group"),
    );
    fx.transport
        .publish(envelope(&aged, 1))
        .await
        .expect("publish");
    fx.transport
        .publish(envelope(&kept, 1))
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_millis(600)).await;
    fx.transport
        .publish(envelope(&aged, 2))
        .await
        .expect("publish");

    let mut consumer = fx.transport.subscribe(options).await.expect("subscribe");
    let mut got = drain(&mut *consumer, Duration::from_millis(500)).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("lim.aged".to_string(), "2".to_string()),
            ("lim.kept".to_string(), "1".to_string()),
        ],
        "the message older than the channel's max_age is not delivered; the fresh one and \
         the other channel's old one are"
    );
    assert_eq!(
        dropped(&fx.transport, &aged).await,
        1,
        "the aged-out message is counted as dropped"
    );
    assert_eq!(dropped(&fx.transport, &kept).await, 0);
    drop(consumer);
    fx.cleanup().await;
}

#[tokio::test]
async fn max_bytes_rejects_or_drops_at_the_channel_limit() {
    let fx = Fixture::new(NatsOptions::default()).await;
    let (bounded, ring) = (channel("bytes.bounded"), channel("bytes.ring"));
    for (ch, discard) in [(&bounded, Discard::RejectNew), (&ring, Discard::DropOldest)] {
        let size = envelope(ch, 1).size_bytes() as u64;
        fx.transport
            .configure_channels(
                ch.clone().into(),
                ChannelConfig {
                    // Room for 3 messages of this size, not 4.
                    max_bytes: Some(size * 3 + size / 2),
                    discard,
                    ..ChannelConfig::default()
                },
            )
            .await
            .expect("configure max_bytes");
        // A group that consumes nothing holds the backlog.
        let group =
            SubscribeOptions::new(ch.clone().into()).group(format!("g{}", ch.as_str().len()));
        drop(fx.transport.subscribe(group).await.expect("group"));
    }
    for n in 1..=3 {
        fx.transport
            .publish(envelope(&bounded, n))
            .await
            .expect("publish within max_bytes");
    }
    let e = fx
        .transport
        .publish(envelope(&bounded, 4))
        .await
        .expect_err("a 4th message crosses max_bytes");
    assert_eq!(e.kind(), ErrorKind::Full, "{e}");
    assert!(e.to_string().contains("max_bytes"), "names the limit: {e}");
    assert!(
        e.to_string().contains("bytes.bounded"),
        "names the channel: {e}"
    );

    for n in 1..=5 {
        fx.transport
            .publish(envelope(&ring, n))
            .await
            .expect("drop_oldest never refuses");
    }
    assert_eq!(dropped(&fx.transport, &ring).await, 2, "5 published, 3 fit");
    let mut consumer = fx
        .transport
        .subscribe(
            SubscribeOptions::new(ring.clone().into()).group(format!("g{}", ring.as_str().len())),
        )
        .await
        .expect("subscribe");
    let got: Vec<String> = drain(&mut *consumer, Duration::from_millis(400))
        .await
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(got, vec!["3", "4", "5"], "the newest three are kept");
    drop(consumer);
    fx.cleanup().await;
}

#[tokio::test]
async fn dedup_window_per_channel_shorter_longer_and_off() {
    // The stream's own window is 1 s; one channel asks for less, one for more, one
    // for none.
    let fx = Fixture::new(NatsOptions {
        duplicate_window: Duration::from_secs(1),
        ..NatsOptions::default()
    })
    .await;
    let (short, long, off, plain) = (
        channel("dd.short"),
        channel("dd.long"),
        channel("dd.off"),
        channel("dd.plain"),
    );
    for (ch, window) in [
        (&short, Duration::from_millis(300)),
        (&long, Duration::from_secs(3)),
        (&off, Duration::ZERO),
    ] {
        fx.transport
            .configure_channels(
                ch.clone().into(),
                ChannelConfig {
                    dedup_window: window,
                    ..ChannelConfig::default()
                },
            )
            .await
            .expect("configure dedup_window");
    }
    let js = async_nats::jetstream::new(fx.transport.client().clone());
    let mut stream = js
        .get_stream(&fx.prefix)
        .await
        .expect("the prefix's stream");
    assert_eq!(
        stream
            .info()
            .await
            .expect("stream info")
            .config
            .duplicate_window,
        Duration::from_secs(3),
        "the stream's window was raised to the longest channel window"
    );

    let envelopes: Vec<Envelope> = [&short, &long, &off, &plain]
        .into_iter()
        .map(|c| envelope(c, 1))
        .collect();
    let mut first = Vec::new();
    for e in &envelopes {
        let a = fx.transport.publish(e.clone()).await.expect("publish");
        let b = fx.transport.publish(e.clone()).await.expect("republish");
        first.push(a.sequence);
        if e.channel == off {
            assert!(!b.duplicate, "dedup_window 0: every publish is stored");
            assert_ne!(a.sequence, b.sequence);
        } else {
            assert!(
                b.duplicate,
                "{}: a republish at once is a duplicate",
                e.channel
            );
            assert_eq!(a.sequence, b.sequence, "a duplicate names the original");
        }
    }
    // Past the short window (0.3 s) and the stream's default (1 s), inside the long one.
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (e, first) in envelopes.iter().zip(&first) {
        let again = fx
            .transport
            .publish(e.clone())
            .await
            .expect("publish later");
        let expected_duplicate = e.channel == long;
        assert_eq!(
            again.duplicate,
            expected_duplicate,
            "{} republished after {:?}",
            e.channel,
            start.elapsed()
        );
        if e.channel == short {
            assert!(again.sequence > *first, "stored anew under a new sequence");
            let once_more = fx.transport.publish(e.clone()).await.expect("publish");
            assert!(once_more.duplicate, "the new copy starts a new window");
            assert_eq!(once_more.sequence, again.sequence);
        }
    }
    fx.cleanup().await;
}

#[tokio::test]
async fn a_batch_applies_a_channels_shorter_dedup_window_too() {
    let fx = Fixture::new(NatsOptions {
        duplicate_window: Duration::from_secs(3),
        ..NatsOptions::default()
    })
    .await;
    let (short, plain) = (channel("ddb.short"), channel("ddb.plain"));
    fx.transport
        .configure_channels(
            short.clone().into(),
            ChannelConfig {
                dedup_window: Duration::from_millis(300),
                ..ChannelConfig::default()
            },
        )
        .await
        .expect("configure dedup_window");
    let batch = vec![envelope(&short, 1), envelope(&plain, 1)];
    let first: Vec<_> = fx
        .transport
        .publish_batch(batch.clone())
        .await
        .into_iter()
        .map(|r| r.expect("publish"))
        .collect();
    let at_once: Vec<_> = fx
        .transport
        .publish_batch(batch.clone())
        .await
        .into_iter()
        .map(|r| r.expect("republish"))
        .collect();
    for (a, b) in first.iter().zip(&at_once) {
        assert!(
            b.duplicate,
            "{}: a republish at once is a duplicate",
            a.channel
        );
        assert_eq!(a.sequence, b.sequence, "a duplicate names the original");
    }
    // Past the short channel's window, inside the stream's (and the plain channel's).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later: Vec<_> = fx
        .transport
        .publish_batch(batch)
        .await
        .into_iter()
        .map(|r| r.expect("publish later"))
        .collect();
    assert!(
        !later[0].duplicate,
        "past its own window the short channel stores again"
    );
    assert!(
        later[0].sequence > first[0].sequence,
        "under a new sequence"
    );
    assert!(
        later[1].duplicate,
        "the plain channel keeps the stream's window"
    );
    assert_eq!(later[1].sequence, first[1].sequence);
    fx.cleanup().await;
}
