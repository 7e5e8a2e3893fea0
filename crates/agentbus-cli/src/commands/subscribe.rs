//! `agentbus sub`: subscribe to a pattern and print what arrives.
//!
//! Each message is printed first and settled after, so a message whose line could not
//! be written (the reader went away) is not acked and goes back to its group.
//!
//! When it stops: after `--count` messages, or when no message arrived for `--timeout`
//! (an idle timeout, restarted by every message), or on Ctrl-C; all three exit 0.
//! Without either flag it runs until interrupted.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use agentbus::{
    Bus, ChannelPattern, DeadReason, Delivery, Envelope, ErrorKind, StartPosition, SubscribeOptions,
};
use clap::{Args, ValueEnum};

use crate::commands::parse_duration;
use crate::{backend, output, Global};

/// How `sub` settles each message after printing it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Settle {
    /// Acknowledge: done for this group.
    #[default]
    Ack,
    /// Negative-acknowledge: redelivered at once with attempt + 1, dead-lettered with
    /// reason max_deliveries after the group's limit (5 by default).
    Nack,
    /// Reject: straight to dead letters with reason rejected.
    Reject,
}

/// Arguments of `agentbus sub`.
#[derive(Debug, Args)]
#[command(after_help = "\
Stops after --count messages, or once no message arrived for --timeout (an idle timeout,
restarted by every message), or on Ctrl-C; each exits 0. With neither flag it runs until
interrupted.

With --json, each message is one JSON object per line with the keys id, channel, kind,
priority, correlation_id, sender, attempt, headers and payload (the payload as JSON).

Examples:
  agentbus sub 'orders.>' --group billing
  agentbus sub 'sensors.*.temperature' --count 10 --timeout 5s --json")]
pub(crate) struct SubArgs {
    /// The channels to read: a channel name, or a pattern with * (exactly one token)
    /// and > (one or more trailing tokens), e.g. orders.> or sensors.*.temperature.
    #[arg(value_name = "PATTERN")]
    pub(crate) pattern: ChannelPattern,

    /// Join this consumer group (members share the messages). Without it, a private
    /// group that sees every message and disappears on exit.
    #[arg(long, value_name = "G")]
    pub(crate) group: Option<String>,

    /// Stop after this many messages.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) count: Option<u64>,

    /// Stop when no message arrived for this long, e.g. 2s or 250ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,

    /// How to settle each message once printed.
    #[arg(long, value_enum, value_name = "HOW", default_value_t = Settle::Ack)]
    pub(crate) settle: Settle,

    /// Where a new group starts: new (only messages published from now on), earliest
    /// (everything retained) or an RFC 3339 time such as 2025-01-31T12:00:00Z. An
    /// existing group keeps its position.
    #[arg(long, value_name = "FROM", default_value = "new", value_parser = parse_start)]
    pub(crate) from: StartPosition,

    /// Metrics endpoint, interaction store, audit files and OTLP export.
    #[command(flatten)]
    pub(crate) observe: super::observe::ObserveArgs,
}

/// Parses `--from`.
pub(crate) fn parse_start(text: &str) -> Result<StartPosition, String> {
    match text.trim() {
        "new" => Ok(StartPosition::New),
        "earliest" => Ok(StartPosition::Earliest),
        other => chrono::DateTime::parse_from_rfc3339(other)
            .map(|t| StartPosition::Time(t.with_timezone(&chrono::Utc)))
            .map_err(|e| {
                format!(
                    "invalid start '{text}' ({e}): use new, earliest or an RFC 3339 time \
                     such as 2025-01-31T12:00:00Z"
                )
            }),
    }
}

impl SubArgs {
    /// The subscription the flags describe. Prefetch never exceeds `--count`, so a
    /// short-lived member does not hold messages its group's other members could take.
    fn options(&self) -> SubscribeOptions {
        let mut options = SubscribeOptions::new(self.pattern.clone()).start(self.from);
        if let Some(group) = &self.group {
            options = options.group(group.clone());
        }
        if let Some(count) = self.count {
            let prefetch = usize::try_from(count).unwrap_or(usize::MAX);
            let prefetch = prefetch.min(options.prefetch);
            options = options.prefetch(prefetch);
        }
        options
    }
}

/// Subscribes as `args` say and hands each message to `emit`, then settles it.
/// Returns how many messages were received.
///
/// # Errors
/// Subscription errors (bad group name → exit 2), `emit`'s errors, settle errors, and
/// the engine closing. A message that fails kind validation is dead-lettered by the
/// bus and skipped with a warning.
pub(crate) async fn consume<F>(bus: &Bus, args: &SubArgs, mut emit: F) -> anyhow::Result<u64>
where
    F: FnMut(&Envelope) -> anyhow::Result<()>,
{
    let mut subscription = bus.subscribe(args.options()).await?;
    let mut received = 0u64;
    while args.count.is_none_or(|n| received < n) {
        let next = subscription.next();
        let result = match args.timeout {
            Some(idle) => match tokio::time::timeout(idle, next).await {
                Ok(result) => result,
                Err(_elapsed) => break,
            },
            None => next.await,
        };
        let delivery = match result {
            Ok(delivery) => delivery,
            Err(error)
                if matches!(
                    error.kind(),
                    ErrorKind::Schema | ErrorKind::MessageKindNotRegistered
                ) =>
            {
                tracing::warn!(%error, "message dead-lettered and skipped");
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        emit(delivery.envelope())?;
        settle(&delivery, args.settle).await?;
        received += 1;
    }
    Ok(received)
}

async fn settle(delivery: &Delivery, how: Settle) -> agentbus::Result<()> {
    match how {
        Settle::Ack => delivery.ack().await,
        Settle::Nack => {
            delivery
                .nack(Duration::ZERO, Some("nacked by agentbus sub".into()))
                .await
        }
        Settle::Reject => {
            delivery
                .reject(DeadReason::Rejected, "rejected by agentbus sub")
                .await
        }
    }
}

/// Runs `agentbus sub`.
pub(crate) async fn run(global: &Global, args: SubArgs) -> anyhow::Result<()> {
    let (bus, observing) = args
        .observe
        .bus(backend::open(&global.backend).await?)
        .await?;
    let json = global.json;
    if !json && std::io::stderr().is_terminal() {
        // A hint for people only; a failed write to stderr is not worth an error.
        let _ = writeln!(
            std::io::stderr(),
            "listening on '{}'{}; Ctrl-C to stop",
            args.pattern,
            args.group
                .as_deref()
                .map(|g| format!(" in group '{g}'"))
                .unwrap_or_default()
        );
    }
    let emit = |envelope: &Envelope| {
        if json {
            output::json_line(&output::envelope_json(envelope))
        } else {
            output::line(output::envelope_line(envelope))
        }
    };
    let result = tokio::select! {
        result = consume(&bus, &args, emit) => result.map(drop),
        // Dropping the subscription hands unsettled messages back to the group.
        () = interrupted() => Ok(()),
    };
    observing.finish().await;
    result
}

/// Resolves on Ctrl-C; never, if the signal handler cannot be installed.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::publish_json;
    use agentbus::{DeadLetterFilter, MemoryEngine, PublishOptions};
    use clap::Parser;
    use std::sync::Arc;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SubArgs,
    }

    fn args(argv: &[&str]) -> SubArgs {
        let mut full = vec!["sub"];
        full.extend_from_slice(argv);
        Wrapper::try_parse_from(full).unwrap().args
    }

    async fn publish(bus: &Bus, channel: &str, n: u32) {
        let options = PublishOptions::new().correlation("c");
        publish_json(bus, channel, serde_json::json!({ "n": n }), &options).await;
    }

    /// Publishing and subscribing cannot meet across two CLI processes on the memory
    /// engine, so the loop is exercised here, in one process.
    #[tokio::test]
    async fn prints_count_messages_in_order_and_acks_them() {
        let bus = Bus::new(Arc::new(MemoryEngine::new()));
        for n in 1..=3 {
            publish(&bus, "jobs.a", n).await;
        }
        let args = args(&["jobs.>", "--from", "earliest", "--count", "2"]);
        let mut lines = Vec::new();
        let received = consume(&bus, &args, |e| {
            lines.push(serde_json::to_string(&output::envelope_json(e))?);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(received, 2);
        let values: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(values[0]["payload"], serde_json::json!({"n": 1}));
        assert_eq!(values[1]["payload"], serde_json::json!({"n": 2}));
        assert_eq!(values[0]["channel"], "jobs.a");
        assert_eq!(values[0]["correlation_id"], "c");
        assert_eq!(values[0]["attempt"], 1);
    }

    #[tokio::test]
    async fn stops_after_the_idle_timeout() {
        let bus = Bus::new(Arc::new(MemoryEngine::new()));
        publish(&bus, "jobs.a", 1).await;
        let args = args(&["jobs.a", "--from", "earliest", "--timeout", "100ms"]);
        let mut seen = 0;
        let received = consume(&bus, &args, |_| {
            seen += 1;
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!((received, seen), (1, 1));
    }

    #[tokio::test]
    async fn new_start_skips_what_was_published_before() {
        let bus = Bus::new(Arc::new(MemoryEngine::new()));
        publish(&bus, "jobs.a", 1).await;
        let args = args(&["jobs.a", "--timeout", "50ms"]);
        assert_eq!(consume(&bus, &args, |_| Ok(())).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn reject_and_nack_lead_to_dead_letters() {
        let bus = Bus::new(Arc::new(MemoryEngine::new()));
        publish(&bus, "jobs.a", 1).await;
        let reject = args(&[
            "jobs.a", "--from", "earliest", "--count", "1", "--settle", "reject",
        ]);
        consume(&bus, &reject, |_| Ok(())).await.unwrap();
        let letters = bus
            .transport()
            .dead_letters(DeadLetterFilter::default())
            .await
            .unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason, DeadReason::Rejected);

        publish(&bus, "jobs.b", 2).await;
        // Default max deliveries is 5: the fifth nack dead-letters the message.
        let nack = args(&[
            "jobs.b", "--group", "g", "--from", "earliest", "--count", "5", "--settle", "nack",
        ]);
        let mut attempts = Vec::new();
        consume(&bus, &nack, |e| {
            attempts.push(e.header.attempt);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(attempts, [1, 2, 3, 4, 5]);
        let letters = bus
            .transport()
            .dead_letters(DeadLetterFilter::default())
            .await
            .unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(letters[1].reason, DeadReason::MaxDeliveries);
    }

    #[tokio::test]
    async fn an_emit_error_leaves_the_message_unacked() {
        let bus = Bus::new(Arc::new(MemoryEngine::new()));
        publish(&bus, "jobs.a", 1).await;
        let args = args(&[
            "jobs.a", "--group", "g", "--from", "earliest", "--count", "1",
        ]);
        let error = consume(&bus, &args, |_| Err(anyhow::anyhow!("pipe closed")))
            .await
            .unwrap_err();
        assert_eq!(error.to_string(), "pipe closed");
        // The next member of the group gets it again.
        let mut attempts = Vec::new();
        consume(&bus, &args, |e| {
            attempts.push(e.header.attempt);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(attempts, [2]);
    }

    #[test]
    fn start_positions() {
        assert_eq!(parse_start("new"), Ok(StartPosition::New));
        assert_eq!(parse_start("earliest"), Ok(StartPosition::Earliest));
        assert!(matches!(
            parse_start("2025-01-31T12:00:00+01:00"),
            Ok(StartPosition::Time(t)) if t.to_rfc3339() == "2025-01-31T11:00:00+00:00"
        ));
        assert!(parse_start("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn prefetch_is_capped_by_count() {
        assert_eq!(args(&["a", "--count", "3"]).options().prefetch, 3);
        assert_eq!(args(&["a"]).options().prefetch, 64);
        assert_eq!(args(&["a", "--count", "1000"]).options().prefetch, 64);
        assert!(Wrapper::try_parse_from(["sub", "a", "--count", "0"]).is_err());
    }
}
