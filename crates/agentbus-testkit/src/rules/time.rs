//! Time: deadlines and delayed delivery.

use std::time::{Duration, Instant};

use agentbus::{DeadReason, ErrorKind, SubscribeOptions};
use chrono::Utc;

use crate::fixture::{
    expect_error, expect_quiet, number, recv, recv_numbers, skip, with_fixture, Context, QUIET,
};
use crate::{ensure, ensure_eq, Outcome, RuleResult, TransportFactory};

/// Timer tolerance when checking "not before": clocks of test host and server, and
/// timer granularity, may differ by this much.
const TOLERANCE: Duration = Duration::from_millis(100);

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Rule 9a — **Deadlines**: a message whose deadline passes before anyone consumes
/// it is never delivered; it goes to dead letters with reason `expired`.
pub async fn rule_deadline_expired_dead_letters(factory: &dyn TransportFactory) -> RuleResult {
    const TTL: Duration = Duration::from_millis(300);
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("expiring")?;
        let group = fx.group("expiring");
        let options = SubscribeOptions::new(channel.clone().into()).group(group.clone());
        // Create the group, then leave it: nobody consumes until the deadline passed.
        drop(fx.subscribe(options.clone()).await?);

        let mut doomed = fx.envelope(&channel, 1);
        doomed.header.deadline = Some(Utc::now() + chrono(TTL));
        let published_at = Instant::now();
        let doomed = fx.publish(doomed, "a message with a 300 ms ttl").await?;
        // Waiting for time itself to pass: the point of the rule.
        tokio::time::sleep_until((published_at + TTL + TOLERANCE).into()).await;
        fx.publish_numbers(&channel, [2]).await?;

        let mut consumer = fx.subscribe(options).await?;
        let first = recv(&mut *consumer, "the first delivery after the deadline").await?;
        ensure!(
            first.envelope().header.id != doomed.id,
            "the message whose deadline had passed was delivered (attempt {})",
            first.attempt()
        );
        ensure_eq!(
            number(&first)?,
            2,
            "the first delivery is the unexpiring message"
        );
        first.ack().await.context("acking the unexpiring message")?;
        expect_quiet(&mut *consumer, QUIET, "after the unexpiring message").await?;

        let letter = fx.wait_dead_letter(doomed.id, DeadReason::Expired).await?;
        ensure_eq!(
            letter.envelope.channel,
            channel,
            "channel of the expired dead letter"
        );
        ensure_eq!(letter.group, group, "group of the expired dead letter");
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 9b — **Deadlines**: publishing a message whose deadline has already passed
/// is an `InvalidInput` error, and nothing is stored.
pub async fn rule_deadline_in_past_rejected(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("late")?;
        let mut consumer = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()))
            .await?;

        let mut past = fx.envelope(&channel, 1);
        past.header.deadline = Some(Utc::now() - chrono::Duration::seconds(1));
        let e = expect_error(
            fx.transport().publish(past).await,
            ErrorKind::InvalidInput,
            "publishing with a deadline one second ago",
        )?;
        ensure!(
            e.to_string().contains("deadline"),
            "the error should say the deadline is the problem: {e}"
        );
        let zero_ttl = fx.envelope(&channel, 2).with_ttl(Duration::ZERO);
        expect_error(
            fx.transport().publish(zero_ttl).await,
            ErrorKind::InvalidInput,
            "publishing with a ttl of zero",
        )?;

        fx.publish_numbers(&channel, [3]).await?;
        let got = recv_numbers(
            &mut *consumer,
            1,
            "the valid message after the refused ones",
        )
        .await?;
        ensure_eq!(
            got,
            vec![3],
            "only the valid message is stored and delivered"
        );
        expect_quiet(&mut *consumer, QUIET, "after the valid message").await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 11a — **Delayed delivery**: a message with `not_before` is stored at once and
/// delivered no earlier than that time.
pub async fn rule_delayed_delivery(factory: &dyn TransportFactory) -> RuleResult {
    const DELAY: Duration = Duration::from_millis(1000);
    with_fixture(factory, |fx| async move {
        if !fx.capabilities().delayed_delivery {
            return skip("delayed_delivery");
        }
        let channel = fx.channel("delayed")?;
        let mut consumer = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()).group(fx.group("delayed")))
            .await?;
        let published_at = Instant::now();
        let receipt = fx
            .publish(
                fx.envelope(&channel, 1).with_delay(DELAY),
                "a message delayed by 1 s",
            )
            .await?;
        expect_quiet(
            &mut *consumer,
            DELAY * 6 / 10,
            format!("within 60% of the delivery delay of {DELAY:?}"),
        )
        .await?;
        let delivery = recv(&mut *consumer, "the delayed message").await?;
        let waited = published_at.elapsed();
        ensure_eq!(
            delivery.envelope().header.id,
            receipt.id,
            "id of the delayed message"
        );
        ensure_eq!(
            delivery.attempt(),
            1,
            "attempt of the delayed message's first delivery"
        );
        ensure!(
            waited + TOLERANCE >= DELAY,
            "the delayed message came {waited:?} after publishing, before its delay of {DELAY:?}"
        );
        delivery.ack().await.context("acking the delayed message")?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 11b — **Delayed delivery**: a delayed message does not hold up a later,
/// undelayed message on the same channel and group.
pub async fn rule_delayed_does_not_block(factory: &dyn TransportFactory) -> RuleResult {
    const DELAY: Duration = Duration::from_millis(1500);
    with_fixture(factory, |fx| async move {
        if !fx.capabilities().delayed_delivery {
            return skip("delayed_delivery");
        }
        let channel = fx.channel("mixed")?;
        let mut consumer = fx
            .subscribe(
                SubscribeOptions::new(channel.clone().into())
                    .group(fx.group("mixed"))
                    .prefetch(1),
            )
            .await?;
        let published_at = Instant::now();
        fx.publish(
            fx.envelope(&channel, 1).with_delay(DELAY),
            "the delayed message",
        )
        .await?;
        fx.publish_numbers(&channel, [2]).await?;

        let first = recv(&mut *consumer, "the undelayed message published second").await?;
        ensure!(
            number(&first)? == 2,
            "the delayed message was delivered first, {:?} after publishing (delay {DELAY:?}); \
             the undelayed message published after it must not wait for it",
            published_at.elapsed()
        );
        first.ack().await.context("acking the undelayed message")?;
        let second = recv(&mut *consumer, "the delayed message").await?;
        let waited = published_at.elapsed();
        ensure_eq!(
            number(&second)?,
            1,
            "the second delivery is the delayed message"
        );
        ensure!(
            waited + TOLERANCE >= DELAY,
            "the delayed message came {waited:?} after publishing, before its delay of {DELAY:?}"
        );
        second.ack().await.context("acking the delayed message")?;
        Ok(Outcome::Passed)
    })
    .await
}
