//! What is stored and for whom: dedup, start positions, retention, backpressure.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use agentbus::{ChannelConfig, Discard, ErrorKind, StartPosition, SubscribeOptions};
use chrono::Utc;

use crate::fixture::{
    expect_error, expect_quiet, expect_quiet_all, number, recv_batch, recv_numbers, skip,
    with_fixture, Context, QUIET, WAIT,
};
use crate::{ensure, ensure_eq, Failure, Outcome, RuleResult, TransportFactory};

/// Rule 10 — **Dedup**: a second publish with the same id inside the dedup window is
/// accepted but not stored again: the receipt says `duplicate` with the original's
/// sequence, and the message is delivered once (with the first payload).
pub async fn rule_dedup(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        if !fx.capabilities().dedup {
            return skip("dedup");
        }
        let channel = fx.channel("dedup")?;
        let mut consumer = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()).group(fx.group("dedup")))
            .await?;
        let original = fx.envelope(&channel, 1);
        let mut again = fx.envelope(&channel, 2);
        again.header.id = original.header.id;

        let first = fx.publish(original, "the original").await?;
        let second = fx.publish(again, "the same id again").await?;
        ensure!(
            !first.duplicate,
            "the first publish is not a duplicate: {first:?}"
        );
        ensure!(
            second.duplicate,
            "the second publish of id {} must say duplicate: {second:?}",
            first.id
        );
        ensure_eq!(second.id, first.id, "id in the duplicate's receipt");
        ensure_eq!(
            second.sequence,
            first.sequence,
            "sequence in the duplicate's receipt"
        );
        ensure_eq!(
            second.channel,
            first.channel,
            "channel in the duplicate's receipt"
        );

        let got = recv_numbers(&mut *consumer, 1, "the deduplicated message").await?;
        ensure_eq!(
            got,
            vec![1],
            "payload delivered (the original's, stored once)"
        );
        expect_quiet(
            &mut *consumer,
            QUIET,
            "after the one delivery of a deduplicated id",
        )
        .await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 12 — **Start position** of a new group: `Earliest` sees everything retained,
/// `New` only what comes after it, `Sequence(n)` starts at sequence `n`, `Time(t)` at
/// the first message stored at or after `t`.
pub async fn rule_start_positions(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        if !fx.capabilities().start_positions {
            return skip("start_positions");
        }
        let channel = fx.channel("history")?;
        let early = fx.publish_numbers(&channel, [1, 2]).await?;
        // Separate the two halves in time clearly (servers store milliseconds).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let between = Utc::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        fx.publish_numbers(&channel, [3, 4]).await?;

        let subscribe = |name: &'static str, start: StartPosition| {
            let fx = fx.clone();
            let channel = channel.clone();
            async move {
                fx.subscribe(
                    SubscribeOptions::new(channel.into())
                        .group(fx.group(name))
                        .start(start),
                )
                .await
            }
        };
        let mut earliest = subscribe("earliest", StartPosition::Earliest).await?;
        let mut new = subscribe("new", StartPosition::New).await?;
        let mut from_seq =
            subscribe("sequence", StartPosition::Sequence(early[1].sequence)).await?;
        let mut from_time = subscribe("time", StartPosition::Time(between)).await?;

        let got = recv_numbers(&mut *earliest, 4, "the group starting at Earliest").await?;
        ensure_eq!(got, vec![1, 2, 3, 4], "what the Earliest group received");
        let got = recv_numbers(
            &mut *from_seq,
            3,
            format!("the group starting at Sequence({})", early[1].sequence),
        )
        .await?;
        ensure_eq!(
            got,
            vec![2, 3, 4],
            "what the Sequence group received (from message 2's sequence)"
        );
        let got = recv_numbers(&mut *from_time, 2, "the group starting at Time(between)").await?;
        ensure_eq!(
            got,
            vec![3, 4],
            "what the Time group received (published after the time)"
        );

        fx.publish_numbers(&channel, [5]).await?;
        let got = recv_numbers(&mut *new, 1, "the group starting at New").await?;
        ensure_eq!(
            got,
            vec![5],
            "the New group's first message is the first published after it"
        );
        for (consumer, name) in [
            (&mut earliest, "Earliest"),
            (&mut from_seq, "Sequence"),
            (&mut from_time, "Time"),
        ] {
            let got =
                recv_numbers(&mut **consumer, 1, format!("message 5 in the {name} group")).await?;
            ensure_eq!(got, vec![5], "the {name} group's next message");
        }
        expect_quiet_all(
            vec![
                (&mut *earliest, "the Earliest group after message 5".into()),
                (&mut *new, "the New group after message 5".into()),
                (&mut *from_seq, "the Sequence group after message 5".into()),
                (&mut *from_time, "the Time group after message 5".into()),
            ],
            QUIET,
        )
        .await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 13a — **Retention**: with `max_messages` and `Discard::RejectNew`, a publish
/// that would exceed the limit of unconsumed messages fails with `Full` (never a
/// silent loss), and succeeds again once a consumer has caught up.
pub async fn rule_retention_reject_new(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        if !fx.capabilities().retention {
            return skip("retention");
        }
        let channel = fx.channel("bounded")?;
        fx.transport()
            .configure_channels(
                channel.clone().into(),
                ChannelConfig {
                    max_messages: Some(3),
                    discard: Discard::RejectNew,
                    ..ChannelConfig::default()
                },
            )
            .await
            .context("configuring max_messages = 3, discard = reject_new")?;
        let options = SubscribeOptions::new(channel.clone().into())
            .group(fx.group("bounded"))
            .prefetch(1);
        // A group that has not consumed anything holds the backlog.
        drop(fx.subscribe(options.clone()).await?);
        fx.publish_numbers(&channel, [1, 2, 3]).await?;
        let e = expect_error(
            fx.transport().publish(fx.envelope(&channel, 4)).await,
            ErrorKind::Full,
            "publishing a 4th message into a channel limited to 3 unconsumed messages",
        )?;
        ensure!(
            e.to_string().contains(channel.as_str()),
            "the Full error should name the channel '{channel}': {e}"
        );

        let mut consumer = fx.subscribe(options).await?;
        let got = recv_numbers(&mut *consumer, 1, "the oldest message").await?;
        ensure_eq!(got, vec![1], "the first message consumed");
        // Room again. A backend may free it asynchronously, so retry within the wait.
        let start = Instant::now();
        loop {
            match fx.transport().publish(fx.envelope(&channel, 4)).await {
                Ok(_) => break,
                Err(e) if e.kind() == ErrorKind::Full && start.elapsed() < WAIT => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(Failure::new(format!(
                        "publishing after one message was consumed and acked should succeed \
                         within {WAIT:?}; got ({}): {e}",
                        e.kind()
                    )))
                }
            }
        }
        let got = recv_numbers(&mut *consumer, 3, "the rest of the backlog").await?;
        ensure_eq!(got, vec![2, 3, 4], "the rest of the backlog, nothing lost");
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 13b — **Retention**: with `max_messages` and `Discard::DropOldest`, publishes
/// succeed, the oldest unconsumed messages are dropped and counted in
/// `ChannelStats::dropped`, the newest are kept.
pub async fn rule_retention_drop_oldest(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        if !fx.capabilities().retention {
            return skip("retention");
        }
        let channel = fx.channel("ring")?;
        fx.transport()
            .configure_channels(
                channel.clone().into(),
                ChannelConfig {
                    max_messages: Some(3),
                    discard: Discard::DropOldest,
                    ..ChannelConfig::default()
                },
            )
            .await
            .context("configuring max_messages = 3, discard = drop_oldest")?;
        let options = SubscribeOptions::new(channel.clone().into()).group(fx.group("ring"));
        drop(fx.subscribe(options.clone()).await?);
        fx.publish_numbers(&channel, 1..=5).await?;

        let stats = fx.transport().stats().await.context("reading stats")?;
        let channel_stats = stats
            .channels
            .iter()
            .find(|c| c.channel == channel)
            .context(format!("stats of channel '{channel}'"))?;
        ensure_eq!(
            channel_stats.dropped,
            2,
            "dropped count of the channel (5 published, 3 kept)"
        );
        ensure!(
            channel_stats.messages <= 3,
            "the channel keeps at most 3 messages, stats say {}",
            channel_stats.messages
        );

        let mut consumer = fx.subscribe(options).await?;
        let got = recv_numbers(&mut *consumer, 3, "the newest messages").await?;
        ensure_eq!(got, vec![3, 4, 5], "the messages kept are the newest");
        expect_quiet(
            &mut *consumer,
            QUIET,
            "after the newest three (the oldest were dropped)",
        )
        .await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 14 — **Backpressure**: a consumer with prefetch N never holds more than N
/// unsettled deliveries; `next_batch` returns at most what is left of N and waits
/// while N are held, until one is settled.
pub async fn rule_prefetch_backpressure(factory: &dyn TransportFactory) -> RuleResult {
    const PREFETCH: usize = 3;
    const TOTAL: u64 = 10;
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("pressure")?;
        let mut consumer = fx
            .subscribe(
                SubscribeOptions::new(channel.clone().into())
                    .group(fx.group("pressure"))
                    .prefetch(PREFETCH),
            )
            .await?;
        fx.publish_numbers(&channel, 0..TOTAL).await?;

        let mut held = Vec::new();
        while held.len() < PREFETCH {
            let batch = recv_batch(&mut *consumer, 100, "deliveries up to the prefetch").await?;
            ensure!(
                held.len() + batch.len() <= PREFETCH,
                "holding {} unsettled deliveries, next_batch(100) returned {} more; prefetch is {PREFETCH}",
                held.len(),
                batch.len()
            );
            held.extend(batch);
        }
        expect_quiet(
            &mut *consumer,
            QUIET,
            format!("while holding {PREFETCH} unsettled deliveries (prefetch {PREFETCH})"),
        )
        .await?;

        let mut seen = BTreeSet::new();
        let first = held.remove(0);
        seen.insert(number(&first)?);
        first.ack().await.context("acking one held delivery")?;
        let batch = recv_batch(&mut *consumer, 100, "a delivery after settling one").await?;
        ensure_eq!(batch.len(), 1, "deliveries returned after settling one of {PREFETCH} held");
        held.extend(batch);

        for delivery in held.drain(..) {
            seen.insert(number(&delivery)?);
            delivery.ack().await.context("acking a held delivery")?;
        }
        while seen.len() < TOTAL as usize {
            let batch = recv_batch(&mut *consumer, 100, format!("the rest ({} of {TOTAL} so far)", seen.len())).await?;
            ensure!(
                batch.len() <= PREFETCH,
                "next_batch(100) returned {} deliveries; prefetch is {PREFETCH}",
                batch.len()
            );
            for delivery in batch {
                let n = number(&delivery)?;
                ensure!(seen.insert(n), "message {n} delivered twice");
                delivery.ack().await.context("acking")?;
            }
        }
        ensure_eq!(seen, (0..TOTAL).collect::<BTreeSet<u64>>(), "messages consumed");
        Ok(Outcome::Passed)
    })
    .await
}
