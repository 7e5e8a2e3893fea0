//! Dead letters: list, filter, show, replay, purge.

use std::time::Duration;

use agentbus::{DeadLetterFilter, DeadReason, ErrorKind, MessageId, SubscribeOptions};

use crate::fixture::{envelope_number, expect_error, recv, with_fixture, Context};
use crate::{ensure, ensure_eq, Outcome, RuleResult, TransportFactory};

/// Rule 15 — **Dead letters** keep the whole envelope with reason, attempts and last
/// error; they can be listed (oldest first, filtered by pattern, reason and limit),
/// shown by id, replayed to their channel (a new message whose `causation_id` is the
/// original id; the dead letter is gone) and purged (the count is returned). Unknown
/// ids are `NotFound`.
pub async fn rule_dead_letter_admin(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let a = fx.channel("dl.a")?;
        let b = fx.channel("dl.b")?;
        let mut consumer_a = fx
            .subscribe(SubscribeOptions::new(a.clone().into()).group(fx.group("dla")))
            .await?;
        let mut consumer_b = fx
            .subscribe(
                SubscribeOptions::new(b.clone().into())
                    .group(fx.group("dlb"))
                    .max_deliveries(1),
            )
            .await?;

        // Two dead letters with different channels and reasons.
        let sent_a = fx.publish_numbers(&a, [1]).await?.remove(0);
        recv(&mut *consumer_a, "message 1 on dl.a")
            .await?
            .reject(DeadReason::Rejected, "bad a")
            .await
            .context("rejecting message 1")?;
        let letter_a = fx.wait_dead_letter(sent_a.id, DeadReason::Rejected).await?;
        let sent_b = fx.publish_numbers(&b, [2]).await?.remove(0);
        recv(&mut *consumer_b, "message 2 on dl.b")
            .await?
            .nack(Duration::ZERO, Some("bad b".into()))
            .await
            .context("nacking message 2 (max_deliveries 1)")?;
        let letter_b = fx
            .wait_dead_letter(sent_b.id, DeadReason::MaxDeliveries)
            .await?;

        // List and filter.
        let ids =
            |letters: &[agentbus::DeadLetter]| letters.iter().map(|l| l.id).collect::<Vec<_>>();
        let all = fx.dead_letters(None).await?;
        ensure_eq!(
            ids(&all),
            vec![letter_a.id, letter_b.id],
            "all dead letters, oldest first"
        );
        let list = |filter: DeadLetterFilter| {
            let transport = fx.transport().clone();
            async move {
                transport
                    .dead_letters(filter)
                    .await
                    .context("listing dead letters")
            }
        };
        let only_a = list(DeadLetterFilter {
            pattern: Some(a.clone().into()),
            ..DeadLetterFilter::default()
        })
        .await?;
        ensure_eq!(
            ids(&only_a),
            vec![letter_a.id],
            "dead letters filtered by channel dl.a"
        );
        let by_reason = list(DeadLetterFilter {
            pattern: Some(fx.everything()?),
            reason: Some(DeadReason::MaxDeliveries),
            limit: None,
        })
        .await?;
        ensure_eq!(
            ids(&by_reason),
            vec![letter_b.id],
            "dead letters filtered by reason max_deliveries"
        );
        let limited = list(DeadLetterFilter {
            pattern: Some(fx.everything()?),
            reason: None,
            limit: Some(1),
        })
        .await?;
        ensure_eq!(
            ids(&limited),
            vec![letter_a.id],
            "dead letters with limit 1 (the oldest)"
        );

        // Show.
        let shown = fx
            .transport()
            .dead_letter(letter_b.id)
            .await
            .context("showing the max_deliveries dead letter")?;
        ensure_eq!(
            shown.envelope.header.id,
            sent_b.id,
            "envelope id of the shown dead letter"
        );
        ensure_eq!(
            envelope_number(&shown.envelope)?,
            2,
            "payload of the shown dead letter"
        );
        ensure_eq!(
            shown.reason,
            DeadReason::MaxDeliveries,
            "reason of the shown dead letter"
        );
        ensure_eq!(shown.attempts, 1, "attempts of the shown dead letter");
        ensure_eq!(
            shown.last_error.as_deref(),
            Some("bad b"),
            "last_error of the shown dead letter"
        );
        let unknown = MessageId::new();
        expect_error(
            fx.transport().dead_letter(unknown).await,
            ErrorKind::NotFound,
            "showing an unknown dead letter id",
        )?;
        expect_error(
            fx.transport().replay_dead_letter(unknown).await,
            ErrorKind::NotFound,
            "replaying an unknown dead letter id",
        )?;

        // Replay.
        let mut watcher = fx
            .subscribe(SubscribeOptions::new(a.clone().into()))
            .await?;
        let replayed = fx
            .transport()
            .replay_dead_letter(letter_a.id)
            .await
            .context("replaying the rejected dead letter")?;
        ensure_eq!(
            replayed.channel,
            a,
            "channel the dead letter was replayed to"
        );
        ensure!(
            !replayed.duplicate,
            "a replay is a new message, not a duplicate: {replayed:?}"
        );
        for (consumer, who) in [
            (&mut watcher, "a new subscriber"),
            (&mut consumer_a, "the original group"),
        ] {
            let delivery = recv(&mut **consumer, format!("the replayed message at {who}")).await?;
            let header = &delivery.envelope().header;
            ensure_eq!(
                header.id,
                replayed.id,
                "id of the replayed message at {who} (the replay receipt's)"
            );
            ensure_eq!(
                header.causation_id,
                Some(sent_a.id),
                "causation_id of the replayed message at {who}"
            );
            ensure_eq!(
                delivery.attempt(),
                1,
                "attempt of the replayed message at {who}"
            );
            ensure_eq!(
                envelope_number(delivery.envelope())?,
                1,
                "payload of the replayed message at {who}"
            );
            delivery
                .ack()
                .await
                .context("acking the replayed message")?;
        }
        expect_error(
            fx.transport().dead_letter(letter_a.id).await,
            ErrorKind::NotFound,
            "showing the dead letter after it was replayed",
        )?;

        // Purge.
        let sent_c = fx.publish_numbers(&a, [3]).await?.remove(0);
        recv(&mut *consumer_a, "message 3 on dl.a")
            .await?
            .reject(DeadReason::Rejected, "bad again")
            .await
            .context("rejecting message 3")?;
        fx.wait_dead_letter(sent_c.id, DeadReason::Rejected).await?;
        let purged = fx
            .transport()
            .purge_dead_letters(DeadLetterFilter {
                pattern: Some(fx.everything()?),
                ..DeadLetterFilter::default()
            })
            .await
            .context("purging the rule's dead letters")?;
        ensure_eq!(purged, 2, "dead letters purged (message 2 and message 3)");
        let left = fx.dead_letters(None).await?;
        ensure!(
            left.is_empty(),
            "dead letters left after the purge: {:?}",
            ids(&left)
        );
        Ok(Outcome::Passed)
    })
    .await
}
