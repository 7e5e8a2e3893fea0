//! Order: publish order within a channel, priority among ready messages.

use agentbus::{Priority, SubscribeOptions};

use crate::fixture::{expect_quiet, recv_numbers, skip, with_fixture, QUIET};
use crate::{ensure_eq, Outcome, RuleResult, TransportFactory};

/// Rule 7 — **Order**: one publisher, one channel, one group, prefetch 1, no
/// redelivery: messages arrive in publish order.
pub async fn rule_order_within_channel(factory: &dyn TransportFactory) -> RuleResult {
    const COUNT: u64 = 200;
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("ordered")?;
        let mut consumer = fx
            .subscribe(
                SubscribeOptions::new(channel.clone().into())
                    .group(fx.group("ordered"))
                    .prefetch(1),
            )
            .await?;
        // Publishing while the consumer is already taking: order must hold either way.
        let publisher = fx.clone();
        let publish_channel = channel.clone();
        let publishing =
            tokio::spawn(
                async move { publisher.publish_numbers(&publish_channel, 0..COUNT).await },
            );
        let got = recv_numbers(&mut *consumer, COUNT as usize, "the ordered messages").await?;
        publishing
            .await
            .map_err(|e| crate::Failure::new(format!("the publishing task failed: {e}")))??;
        let expected: Vec<u64> = (0..COUNT).collect();
        if got != expected {
            let first_bad = got
                .iter()
                .zip(&expected)
                .position(|(g, e)| g != e)
                .unwrap_or(0);
            return Err(crate::Failure::new(format!(
                "messages out of publish order: position {first_bad} holds {} instead of {}; \
                 received around there: {:?}",
                got[first_bad],
                expected[first_bad],
                &got[first_bad.saturating_sub(3)..(first_bad + 4).min(got.len())]
            )));
        }
        expect_quiet(&mut *consumer, QUIET, "after all ordered messages").await?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 8 — **Order**: among ready messages, higher priority goes first: published
/// interleaved while no consumer is connected, they are consumed critical first, low
/// last, and in publish order within one priority.
pub async fn rule_priority_order(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        if !fx.capabilities().priority {
            return skip("priority");
        }
        let channel = fx.channel("prio")?;
        let options = SubscribeOptions::new(channel.clone().into())
            .group(fx.group("prio"))
            .prefetch(1);
        // Create the group, then leave it so nothing is taken while publishing.
        drop(fx.subscribe(options.clone()).await?);

        const PRIORITIES: [Priority; 4] = [
            Priority::Low,
            Priority::Normal,
            Priority::High,
            Priority::Critical,
        ];
        let mut expected: Vec<(Priority, u64)> = Vec::new();
        for round in 0..3u64 {
            for (i, priority) in PRIORITIES.iter().enumerate() {
                let n = round * 4 + i as u64;
                let envelope = fx.envelope(&channel, n).with_priority(*priority);
                fx.publish(envelope, format!("number {n} at priority {priority}"))
                    .await?;
                expected.push((*priority, n));
            }
        }
        // Highest priority first; stable, so publish order within a priority.
        expected.sort_by_key(|(priority, _)| std::cmp::Reverse(*priority));

        let mut consumer = fx.subscribe(options).await?;
        let got = recv_numbers(&mut *consumer, expected.len(), "the prioritized messages").await?;
        let show = |numbers: &[u64]| -> Vec<String> {
            numbers
                .iter()
                .map(|n| format!("{n}:{}", PRIORITIES[(n % 4) as usize]))
                .collect()
        };
        let expected_numbers: Vec<u64> = expected.iter().map(|(_, n)| *n).collect();
        ensure_eq!(
            show(&got),
            show(&expected_numbers),
            "delivery order (number:priority)"
        );
        Ok(Outcome::Passed)
    })
    .await
}
