//! At least once: ack, nack, reject, ack-wait redelivery, max deliveries.

use std::time::{Duration, Instant};

use agentbus::{DeadReason, ErrorKind, Settlement, SubscribeOptions};

use crate::fixture::{
    expect_error, expect_quiet, number, recv, with_fixture, Context, QUIET, SHORT_ACK_WAIT,
};
use crate::{ensure, ensure_eq, Outcome, RuleResult, TransportFactory};

/// Timer tolerance when checking "not before": clocks of test host and server, and
/// timer granularity, may differ by this much.
const TOLERANCE: Duration = Duration::from_millis(100);

/// Rule 4a — **At least once**: an acked message is done for its group; it is not
/// redelivered, even after the ack wait has passed several times.
pub async fn rule_ack_is_final(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("acks")?;
        let mut consumer = fx
            .subscribe(
                SubscribeOptions::new(channel.clone().into())
                    .group(fx.group("acks"))
                    .ack_wait(SHORT_ACK_WAIT),
            )
            .await?;
        fx.publish_numbers(&channel, [1]).await?;
        let delivery = recv(&mut *consumer, "the message").await?;
        ensure_eq!(delivery.attempt(), 1, "attempt of the first delivery");
        delivery.ack().await.context("acking the message")?;
        expect_quiet(
            &mut *consumer,
            QUIET,
            format!("after the ack (ack wait {SHORT_ACK_WAIT:?}: an ack that was lost would show as a redelivery)"),
        )
        .await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 4b — **At least once**: `nack` without delay redelivers the message with
/// attempt + 1 (well before the ack wait, which is long here).
pub async fn rule_nack_redelivers(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("nacks")?;
        let mut consumer = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()).group(fx.group("nacks")))
            .await?;
        let receipt = fx.publish_numbers(&channel, [7]).await?.remove(0);
        let first = recv(&mut *consumer, "the first delivery").await?;
        ensure_eq!(first.attempt(), 1, "attempt of the first delivery");
        first
            .nack(Duration::ZERO, Some("try again".into()))
            .await
            .context("nacking the first delivery")?;
        let second = recv(
            &mut *consumer,
            "the redelivery after nack(0) (the ack wait is 30 s, so only the nack can cause it within the wait)",
        )
        .await?;
        ensure_eq!(second.envelope().header.id, receipt.id, "id of the redelivered message");
        ensure_eq!(number(&second)?, 7, "payload of the redelivered message");
        ensure_eq!(second.attempt(), 2, "attempt of the redelivery");
        ensure_eq!(second.sequence(), receipt.sequence, "sequence of the redelivery");
        second.ack().await.context("acking the redelivery")?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 4c — **At least once**: `nack(delay)` redelivers no earlier than the delay.
pub async fn rule_nack_delay(factory: &dyn TransportFactory) -> RuleResult {
    const DELAY: Duration = Duration::from_millis(1000);
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("backoff")?;
        let mut consumer = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()).group(fx.group("backoff")))
            .await?;
        let receipt = fx.publish_numbers(&channel, [1]).await?.remove(0);
        let first = recv(&mut *consumer, "the first delivery").await?;
        let nacked_at = Instant::now();
        first
            .nack(DELAY, Some("later".into()))
            .await
            .context("nacking with a delay")?;
        expect_quiet(
            &mut *consumer,
            DELAY * 6 / 10,
            format!("within 60% of the nack delay of {DELAY:?}"),
        )
        .await?;
        let second = recv(&mut *consumer, "the redelivery after the nack delay").await?;
        let waited = nacked_at.elapsed();
        ensure_eq!(second.envelope().header.id, receipt.id, "id of the redelivered message");
        ensure_eq!(second.attempt(), 2, "attempt of the redelivery");
        ensure!(
            waited + TOLERANCE >= DELAY,
            "the redelivery came {waited:?} after nack({DELAY:?}); it must not come before the delay"
        );
        second.ack().await.context("acking the redelivery")?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 4d — **At least once**: `reject` sends the message straight to dead letters
/// with reason `rejected`, the error text and the attempt count; it is not
/// redelivered.
pub async fn rule_reject_dead_letters(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("rejects")?;
        let group = fx.group("rejects");
        let mut consumer = fx
            .subscribe(
                SubscribeOptions::new(channel.clone().into())
                    .group(group.clone())
                    .ack_wait(SHORT_ACK_WAIT),
            )
            .await?;
        let receipt = fx.publish_numbers(&channel, [3]).await?.remove(0);
        let delivery = recv(&mut *consumer, "the message to reject").await?;
        const WHY: &str = "unprocessable: the testkit rejects this on purpose";
        delivery
            .reject(DeadReason::Rejected, WHY)
            .await
            .context("rejecting the delivery")?;
        let letter = fx
            .wait_dead_letter(receipt.id, DeadReason::Rejected)
            .await?;
        ensure_eq!(
            letter.last_error.as_deref(),
            Some(WHY),
            "last_error of the dead letter"
        );
        ensure_eq!(letter.attempts, 1, "attempts of the dead letter");
        ensure_eq!(letter.group, group, "group of the dead letter");
        ensure_eq!(
            letter.envelope.channel,
            channel,
            "channel of the dead letter"
        );
        ensure_eq!(
            crate::fixture::envelope_number(&letter.envelope)?,
            3,
            "payload kept in the dead letter"
        );
        expect_quiet(&mut *consumer, QUIET, "after the reject (no redelivery)").await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 5 — **At least once**: a delivery not settled within `ack_wait` is
/// redelivered, with attempt 2.
pub async fn rule_ack_wait_redelivers(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("ackwait")?;
        let mut consumer = fx
            .subscribe(
                SubscribeOptions::new(channel.clone().into())
                    .group(fx.group("ackwait"))
                    .ack_wait(SHORT_ACK_WAIT),
            )
            .await?;
        let receipt = fx.publish_numbers(&channel, [5]).await?.remove(0);
        let first = recv(&mut *consumer, "the first delivery").await?;
        let delivered_at = Instant::now();
        ensure_eq!(first.attempt(), 1, "attempt of the first delivery");
        // `first` is held, unsettled, until the redelivery arrives.
        let second = recv(
            &mut *consumer,
            format!("the redelivery after the ack wait of {SHORT_ACK_WAIT:?}"),
        )
        .await?;
        let waited = delivered_at.elapsed();
        ensure_eq!(
            second.envelope().header.id,
            receipt.id,
            "id of the redelivered message"
        );
        ensure_eq!(second.attempt(), 2, "attempt of the redelivery");
        ensure!(
            waited + TOLERANCE >= SHORT_ACK_WAIT,
            "the redelivery came {waited:?} after the first delivery, before the ack wait of \
             {SHORT_ACK_WAIT:?}"
        );
        second.ack().await.context("acking the redelivery")?;
        drop(first);
        expect_quiet(&mut *consumer, QUIET, "after acking the redelivery").await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 6 — **At least once**: after `max_deliveries` failed deliveries the message
/// goes to dead letters with reason `max_deliveries`, the attempt count and the last
/// error a consumer reported.
pub async fn rule_max_deliveries_dead_letters(factory: &dyn TransportFactory) -> RuleResult {
    const MAX: u32 = 3;
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("poison")?;
        let group = fx.group("poison");
        let mut consumer = fx
            .subscribe(
                SubscribeOptions::new(channel.clone().into())
                    .group(group.clone())
                    .max_deliveries(MAX),
            )
            .await?;
        let receipt = fx.publish_numbers(&channel, [9]).await?.remove(0);
        for attempt in 1..=MAX {
            let delivery = recv(&mut *consumer, format!("delivery {attempt} of {MAX}")).await?;
            ensure_eq!(delivery.attempt(), attempt, "attempt number");
            ensure_eq!(
                delivery.envelope().header.id,
                receipt.id,
                "id of delivery {attempt}"
            );
            delivery
                .nack(Duration::ZERO, Some(format!("boom {attempt}")))
                .await
                .context(format!("nacking delivery {attempt}"))?;
        }
        let letter = fx
            .wait_dead_letter(receipt.id, DeadReason::MaxDeliveries)
            .await?;
        ensure_eq!(letter.attempts, MAX, "attempts of the dead letter");
        let last = format!("boom {MAX}");
        ensure_eq!(
            letter.last_error.as_deref(),
            Some(last.as_str()),
            "last_error of the dead letter (the last nack's error)"
        );
        ensure_eq!(letter.group, group, "group of the dead letter");
        expect_quiet(
            &mut *consumer,
            QUIET,
            format!(
                "after the {MAX}th failed delivery (no delivery {})",
                MAX + 1
            ),
        )
        .await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 16a — settling a delivery a second time (ack, nack or reject, on the
/// delivery or on its split-off handle) is `AlreadySettled`, and changes nothing.
pub async fn rule_settle_twice(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("twice")?;
        let mut consumer = fx
            .subscribe(
                SubscribeOptions::new(channel.clone().into())
                    .group(fx.group("twice"))
                    .ack_wait(SHORT_ACK_WAIT),
            )
            .await?;
        let receipts = fx.publish_numbers(&channel, [1, 2, 3]).await?;

        let acked = recv(&mut *consumer, "message 1").await?;
        acked.ack().await.context("first ack of message 1")?;
        expect_error(
            acked.ack().await,
            ErrorKind::AlreadySettled,
            "second ack of message 1",
        )?;
        expect_error(
            acked.nack(Duration::ZERO, None).await,
            ErrorKind::AlreadySettled,
            "nack after ack of message 1",
        )?;
        expect_error(
            acked.reject(DeadReason::Rejected, "late").await,
            ErrorKind::AlreadySettled,
            "reject after ack of message 1",
        )?;

        let rejected = recv(&mut *consumer, "message 2").await?;
        rejected
            .reject(DeadReason::Rejected, "once")
            .await
            .context("rejecting message 2")?;
        expect_error(
            rejected.ack().await,
            ErrorKind::AlreadySettled,
            "ack after reject of message 2",
        )?;

        let (envelope, handle) = recv(&mut *consumer, "message 3").await?.into_parts();
        handle
            .settle(Settlement::Ack)
            .await
            .context("acking message 3 through its handle")?;
        expect_error(
            handle.settle(Settlement::Ack).await,
            ErrorKind::AlreadySettled,
            "second ack of message 3 through its handle",
        )?;
        ensure_eq!(envelope.header.id, receipts[2].id, "id of message 3");

        // Nothing changed: no redelivery (the ack wait is short), one dead letter.
        expect_quiet(&mut *consumer, QUIET, "after the double settlements").await?;
        let letters = fx.dead_letters(None).await?;
        ensure_eq!(
            letters
                .iter()
                .map(|l| l.envelope.header.id)
                .collect::<Vec<_>>(),
            vec![receipts[1].id],
            "dead letters (only message 2, once)"
        );
        Ok(Outcome::Passed)
    })
    .await
}
