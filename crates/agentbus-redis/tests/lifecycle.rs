//! Redis-specific lifecycle: private groups of processes that died are swept away.

use std::time::{Duration, Instant};

use agentbus::{ChannelName, ChannelPattern, Envelope, SubscribeOptions, Transport};
use agentbus_redis::{RedisOptions, RedisTransport};

fn url() -> String {
    std::env::var("AGENTBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_group_whose_lease_ran_out_is_swept() {
    let prefix = format!("ablife-{:012x}", fastrand::u64(..1 << 48));
    let transport = RedisTransport::connect(&url(), RedisOptions::default().prefix(&prefix))
        .await
        .unwrap();
    let channel = ChannelName::new("life.private").unwrap();
    let publish = || transport.publish(Envelope::new(channel.clone(), "k", &b"{}"[..]));
    let private = transport
        .subscribe(SubscribeOptions::new(ChannelPattern::from(channel.clone())))
        .await
        .unwrap();
    assert_eq!(publish().await.unwrap().groups, 1);

    // The process "dies": its lease key disappears as if it had expired.
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{prefix}:gl:{}", private.group()))
        .query_async(&mut conn)
        .await
        .unwrap();
    // Any live subscription sweeps it (at start, then every few seconds).
    let _other = transport
        .subscribe(
            SubscribeOptions::new(ChannelPattern::new("life.other").unwrap()).group("life-other"),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let groups = publish().await.unwrap().groups;
        if groups == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead private group still counts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::mem::forget(private); // the "dead" subscription must not hand anything back
    transport.delete_everything().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_are_accepted_and_mean_never() {
    use agentbus::ChannelConfig;
    let prefix = format!("ablife-{:012x}", fastrand::u64(..1 << 48));
    let transport = RedisTransport::connect(&url(), RedisOptions::default().prefix(&prefix))
        .await
        .unwrap();
    let channel = ChannelName::new("life.huge").unwrap();
    transport
        .configure_channels(
            ChannelPattern::from(channel.clone()),
            ChannelConfig {
                max_age: Some(Duration::MAX),
                dedup_window: Duration::MAX,
                ..ChannelConfig::default()
            },
        )
        .await
        .unwrap();
    let mut consumer = transport
        .subscribe(
            SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                .group("huge")
                .ack_wait(Duration::MAX),
        )
        .await
        .unwrap();
    let receipt = transport
        .publish(Envelope::new(channel.clone(), "k", &b"{}"[..]))
        .await
        .unwrap();
    assert!(!receipt.duplicate);
    let got = tokio::time::timeout(Duration::from_secs(10), consumer.next_batch(1))
        .await
        .unwrap()
        .unwrap();
    got[0]
        .nack(Duration::MAX, Some("later".into()))
        .await
        .unwrap();
    drop(consumer);
    transport.delete_everything().await.unwrap();
}
