//! Publish receipts and who gets what: private groups, named groups, patterns.

use std::collections::BTreeSet;

use agentbus::{Consumer, SubscribeOptions};

use crate::fixture::{
    expect_quiet, expect_quiet_all, number, recv, recv_batch, recv_numbers, with_fixture, Context,
    QUIET, WAIT,
};
use crate::{ensure, ensure_eq, Outcome, RuleResult, TransportFactory};

/// Rule 1 — **Publish** returns a receipt once the engine accepted the message: the
/// message's id and channel, a sequence that increases within the channel,
/// `duplicate = false`, and (where the transport can tell, see
/// `Capabilities::no_responders`) how many groups matched, a private group no longer
/// once its subscription ended.
pub async fn rule_publish_receipt(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("receipts")?;
        let counts_groups = fx.capabilities().no_responders;

        let envelope = fx.envelope(&channel, 0);
        let id = envelope.header.id;
        let first = fx.publish(envelope, "with no subscriber").await?;
        ensure_eq!(first.id, id, "receipt id");
        ensure_eq!(first.channel, channel, "receipt channel");
        ensure!(
            !first.duplicate,
            "a first publish must not be a duplicate: {first:?}"
        );
        if counts_groups {
            ensure_eq!(first.groups, 0, "receipt groups with nobody subscribed");
        }

        let _named = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()).group(fx.group("receipts")))
            .await?;
        let _private = fx
            .subscribe(SubscribeOptions::new(fx.everything()?))
            .await?;
        let _elsewhere = fx
            .subscribe(SubscribeOptions::new(fx.pattern("other.>")?))
            .await?;

        let mut last = first.sequence;
        for n in 1..=5 {
            let envelope = fx.envelope(&channel, n);
            let id = envelope.header.id;
            let receipt = fx.publish(envelope, format!("number {n}")).await?;
            ensure_eq!(receipt.id, id, "receipt id of message {n}");
            ensure_eq!(receipt.channel, channel, "receipt channel of message {n}");
            ensure!(
                !receipt.duplicate,
                "message {n} is new, yet the receipt says duplicate"
            );
            ensure!(
                receipt.sequence > last,
                "sequences must increase within a channel: message {n} got {} after {last}",
                receipt.sequence
            );
            last = receipt.sequence;
            if counts_groups {
                ensure_eq!(
                    receipt.groups,
                    2,
                    "receipt groups of message {n} (one named group and one private \
                     subscription match, a third subscription on another pattern does not)"
                );
            }
        }
        // A private group ends with its subscription (an engine may end it in the
        // background, so within WAIT); the named one stays.
        drop(_private);
        let start = std::time::Instant::now();
        for n in 6.. {
            let receipt = fx
                .publish(
                    fx.envelope(&channel, n),
                    "after the private subscription ended",
                )
                .await?;
            if !counts_groups || receipt.groups == 1 {
                break;
            }
            ensure!(
                start.elapsed() < WAIT,
                "receipt groups once the private subscription ended: still {} after \
                 {WAIT:?}, expected 1 (the named group stays, the private one ends)",
                receipt.groups
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 2a — **Groups**: subscriptions without a group name are private groups; each
/// gets every message (fan-out).
pub async fn rule_fan_out_private_groups(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("fanout")?;
        let mut a = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()))
            .await?;
        let mut b = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()))
            .await?;
        fx.publish_numbers(&channel, 0..10).await?;
        let expected: Vec<u64> = (0..10).collect();
        let got_a = recv_numbers(&mut *a, 10, "private subscriber A").await?;
        let got_b = recv_numbers(&mut *b, 10, "private subscriber B").await?;
        ensure_eq!(got_a, expected, "what private subscriber A received");
        ensure_eq!(got_b, expected, "what private subscriber B received");
        expect_quiet_all(
            vec![
                (&mut *a, "private subscriber A after all 10".into()),
                (&mut *b, "private subscriber B after all 10".into()),
            ],
            QUIET,
        )
        .await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 2b — **Groups**: within one named group each message goes to exactly one
/// member, and a member that is busy (prefetch full) leaves the next message to the
/// others (load balancing).
pub async fn rule_named_group_load_balances(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("work")?;
        let group = fx.group("workers");
        let options = SubscribeOptions::new(channel.clone().into())
            .group(group.clone())
            .prefetch(1);
        let mut a = fx.subscribe(options.clone()).await?;
        let mut b = fx.subscribe(options).await?;
        const TOTAL: u64 = 40;
        fx.publish_numbers(&channel, 0..TOTAL).await?;

        // A holds one unsettled delivery (prefetch 1), so the next one must go to B.
        let held_a = recv(&mut *a, "member A's first delivery").await?;
        let held_b = recv(
            &mut *b,
            "member B's first delivery while member A holds one (prefetch 1)",
        )
        .await?;
        let mut seen_a = vec![number(&held_a)?];
        let mut seen_b = vec![number(&held_b)?];
        held_a.ack().await.context("acking A's first delivery")?;
        held_b.ack().await.context("acking B's first delivery")?;

        // The rest, taken by whichever member is ready.
        while (seen_a.len() + seen_b.len()) < TOTAL as usize {
            let got = seen_a.len() + seen_b.len();
            let (delivery, to_a) = tokio::select! {
                batch = recv_batch(&mut *a, 1, format!("member A ({got} of {TOTAL} so far)")) => (batch?.remove(0), true),
                batch = recv_batch(&mut *b, 1, format!("member B ({got} of {TOTAL} so far)")) => (batch?.remove(0), false),
            };
            let n = number(&delivery)?;
            delivery.ack().await.context(format!("acking message {n}"))?;
            if to_a {
                seen_a.push(n);
            } else {
                seen_b.push(n);
            }
        }
        let set_a: BTreeSet<u64> = seen_a.iter().copied().collect();
        let set_b: BTreeSet<u64> = seen_b.iter().copied().collect();
        ensure!(
            set_a.len() == seen_a.len() && set_b.len() == seen_b.len(),
            "a member received a message twice: A got {seen_a:?}, B got {seen_b:?}"
        );
        let both: Vec<u64> = set_a.intersection(&set_b).copied().collect();
        ensure!(
            both.is_empty(),
            "messages {both:?} went to both members of group '{group}'; each must go to \
             exactly one"
        );
        let all: BTreeSet<u64> = set_a.union(&set_b).copied().collect();
        ensure_eq!(
            all,
            (0..TOTAL).collect::<BTreeSet<u64>>(),
            "messages received by the group as a whole"
        );
        expect_quiet_all(
            vec![
                (&mut *a, "member A after the group got everything".into()),
                (&mut *b, "member B after the group got everything".into()),
            ],
            QUIET,
        )
        .await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 3a — **Groups**: every group whose pattern matches the channel gets every
/// message; `*` matches exactly one token and `>` one or more trailing tokens.
pub async fn rule_every_matching_group_gets_every_message(
    factory: &dyn TransportFactory,
) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let eu = fx.channel("orders.eu")?;
        let eu_north = fx.channel("orders.eu.north")?;
        let orders = fx.channel("orders")?;
        let mut exact = fx
            .subscribe(SubscribeOptions::new(eu.clone().into()).group(fx.group("exact")))
            .await?;
        let mut star = fx
            .subscribe(SubscribeOptions::new(fx.pattern("orders.*")?).group(fx.group("star")))
            .await?;
        let mut tail = fx
            .subscribe(SubscribeOptions::new(fx.pattern("orders.>")?).group(fx.group("tail")))
            .await?;
        let mut private_star = fx
            .subscribe(SubscribeOptions::new(fx.pattern("*.eu")?))
            .await?;
        let mut private_below = fx
            .subscribe(SubscribeOptions::new(fx.pattern("orders.eu.*")?))
            .await?;
        let mut private_all = fx
            .subscribe(SubscribeOptions::new(fx.everything()?))
            .await?;

        fx.publish_numbers(&eu, 1..=5).await?;
        fx.publish_numbers(&eu_north, [6]).await?;
        fx.publish_numbers(&orders, [7]).await?;

        let checks: Vec<(&str, &mut Box<dyn Consumer>, Vec<u64>)> = vec![
            ("group on 'orders.eu'", &mut exact, vec![1, 2, 3, 4, 5]),
            ("group on 'orders.*'", &mut star, vec![1, 2, 3, 4, 5]),
            ("group on 'orders.>'", &mut tail, vec![1, 2, 3, 4, 5, 6]),
            (
                "private subscription on '*.eu'",
                &mut private_star,
                vec![1, 2, 3, 4, 5],
            ),
            (
                "private subscription on 'orders.eu.*'",
                &mut private_below,
                vec![6],
            ),
            (
                "private subscription on '>'",
                &mut private_all,
                vec![1, 2, 3, 4, 5, 6, 7],
            ),
        ];
        let mut quiet = Vec::new();
        for (name, consumer, expected) in checks {
            let mut got = recv_numbers(&mut **consumer, expected.len(), name).await?;
            got.sort_unstable();
            ensure_eq!(got, expected, "messages the {name} received");
            quiet.push((
                &mut **consumer,
                format!(
                    "the {name} after its messages ('orders', 'orders.eu' and \
                     'orders.eu.north' each match only where the pattern says)"
                ),
            ));
        }
        expect_quiet_all(quiet, QUIET).await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 3b — **Groups**: a wildcard subscription picks up channels that were created
/// after it started.
pub async fn rule_wildcard_sees_new_channels(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let mut star = fx
            .subscribe(SubscribeOptions::new(fx.pattern("late.*")?))
            .await?;
        let mut tail = fx
            .subscribe(SubscribeOptions::new(fx.pattern("late.>")?).group(fx.group("late")))
            .await?;
        fx.publish_numbers(&fx.channel("late.fresh")?, [1]).await?;
        fx.publish_numbers(&fx.channel("late.fresh.deeper")?, [2])
            .await?;
        let got_star =
            recv_numbers(&mut *star, 1, "'late.*' on a channel created after it").await?;
        ensure_eq!(got_star, vec![1], "what 'late.*' received");
        let mut got_tail =
            recv_numbers(&mut *tail, 2, "'late.>' on channels created after it").await?;
        got_tail.sort_unstable();
        ensure_eq!(got_tail, vec![1, 2], "what 'late.>' received");
        expect_quiet(
            &mut *star,
            QUIET,
            "'late.*' (must not match 'late.fresh.deeper')",
        )
        .await?;
        Ok(Outcome::Passed)
    })
    .await
}
