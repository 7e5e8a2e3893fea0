//! Bad input is a typed error and disturbs nothing.

use std::time::Duration;

use agentbus::{ChannelName, ChannelPattern, Envelope, ErrorKind, SubscribeOptions};

use crate::fixture::{expect_error, expect_quiet, recv_numbers, with_fixture, QUIET};
use crate::{ensure, ensure_eq, Outcome, RuleResult, TransportFactory};

/// Rule 16b — bad input is a typed error that disturbs nothing: invalid channel names
/// and patterns are `InvalidChannel`; a payload over the limit, an empty kind, a zero
/// prefetch, ack wait or max deliveries and a bad group name are `InvalidInput`; a
/// normal publish and consume work afterwards, and nothing of the refused input was
/// stored.
pub async fn rule_bad_input(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let long = "x".repeat(256);
        let deep = vec!["t"; 17].join(".");
        for name in [
            "",
            "a..b",
            ".a",
            "a.",
            "a.*",
            "a.>",
            "has space",
            "a/b",
            &long,
            &deep,
        ] {
            let e = expect_error(
                ChannelName::new(name),
                ErrorKind::InvalidChannel,
                format!("ChannelName::new({name:?})"),
            )?;
            ensure!(
                !e.message().is_empty(),
                "the InvalidChannel error for {name:?} says nothing"
            );
        }
        for pattern in ["a.>.b", "a.b*", "", "a..*"] {
            expect_error(
                ChannelPattern::new(pattern),
                ErrorKind::InvalidChannel,
                format!("ChannelPattern::new({pattern:?})"),
            )?;
        }

        let channel = fx.channel("input")?;
        let mut consumer = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()))
            .await?;

        let limit = fx.max_payload_bytes();
        let oversized = Envelope::new(channel.clone(), "testkit.blob", vec![b'x'; limit + 1]);
        let e = expect_error(
            fx.transport().publish(oversized).await,
            ErrorKind::InvalidInput,
            format!(
                "publishing a payload of {} bytes (limit {limit})",
                limit + 1
            ),
        )?;
        ensure!(
            e.to_string().contains(&limit.to_string()),
            "the oversized-payload error should state the limit of {limit} bytes: {e}"
        );
        expect_error(
            fx.transport()
                .publish(Envelope::new(channel.clone(), "", b"{}".to_vec()))
                .await,
            ErrorKind::InvalidInput,
            "publishing with an empty kind",
        )?;

        let base = SubscribeOptions::new(channel.clone().into()).group(fx.group("input"));
        let bad_options = [
            ("prefetch 0", base.clone().prefetch(0)),
            ("ack_wait 0", base.clone().ack_wait(Duration::ZERO)),
            ("max_deliveries 0", base.clone().max_deliveries(0)),
            ("group name 'not ok!'", base.clone().group("not ok!")),
        ];
        for (what, options) in bad_options {
            expect_error(
                fx.transport().subscribe(options).await.map(|_| ()),
                ErrorKind::InvalidInput,
                format!("subscribing with {what}"),
            )?;
        }

        // Undisturbed: a normal publish and consume work; only that message is there.
        fx.publish_numbers(&channel, [1]).await?;
        let got = recv_numbers(&mut *consumer, 1, "the valid message after the bad input").await?;
        ensure_eq!(got, vec![1], "what was delivered after the refused input");
        let mut group = fx.subscribe(base.prefetch(1)).await?;
        fx.publish_numbers(&channel, [2]).await?;
        let got = recv_numbers(&mut *group, 1, "a group created after the refused options").await?;
        ensure_eq!(got, vec![2], "what the group with valid options received");
        let got = recv_numbers(&mut *consumer, 1, "message 2 at the private subscriber").await?;
        ensure_eq!(got, vec![2], "the private subscriber's second message");
        expect_quiet(
            &mut *consumer,
            QUIET,
            "after the valid messages (nothing refused was stored)",
        )
        .await?;
        Ok(Outcome::Passed)
    })
    .await
}
