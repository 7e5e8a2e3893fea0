//! `agentbus pub`: publish one message and print its receipt.

use std::time::Duration;

use agentbus::{Bus, ChannelName, Envelope, MessageId, Priority, PublishOptions};
use clap::Args;

use crate::commands::{parse_duration, parse_header, parse_positive_duration, read_payload};
use crate::{backend, output, Global};

/// Arguments of `agentbus pub`.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  agentbus pub orders.created '{\"order\":17}'
  agentbus pub orders.created @order.json --priority high --ttl 5m
  echo '{\"order\":17}' | agentbus pub orders.created - --json")]
pub(crate) struct PubArgs {
    /// The channel to publish on: dot-separated tokens of [A-Za-z0-9_-], e.g.
    /// channel.vehicle.data.input.
    #[arg(value_name = "CHANNEL")]
    pub(crate) channel: ChannelName,

    /// The payload: JSON text, @FILE to read a file, or - to read stdin. Must be valid
    /// JSON (a plain string needs its quotes: '"hello"').
    #[arg(value_name = "PAYLOAD", allow_negative_numbers = true)]
    pub(crate) payload: String,

    /// The message kind (its type name), e.g. vehicle.data.
    #[arg(long, value_name = "K", default_value = crate::DEFAULT_KIND)]
    pub(crate) kind: String,

    /// Delivery priority: low, normal, high or critical (or 1-4).
    #[arg(long, value_name = "P", default_value = "normal")]
    pub(crate) priority: Priority,

    /// Time to live, e.g. 30s or 5m: not delivered after that; dead-lettered as expired.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub(crate) ttl: Option<Duration>,

    /// Deliver no earlier than this from now, e.g. 2s or 10m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) delay: Option<Duration>,

    /// Use this message id (a UUID) instead of a fresh one; publishing the same id again
    /// within the dedup window is accepted but not stored twice.
    #[arg(long, value_name = "UUID")]
    pub(crate) id: Option<MessageId>,

    /// Correlation id: the thread or workflow the message belongs to.
    #[arg(long, value_name = "ID")]
    pub(crate) correlation: Option<String>,

    /// The channel replies should go to.
    #[arg(long, value_name = "CH")]
    pub(crate) reply_to: Option<ChannelName>,

    /// A free header, key=value; repeat for more.
    #[arg(long = "header", value_name = "K=V", value_parser = parse_header)]
    pub(crate) headers: Vec<(String, String)>,
}

impl PubArgs {
    /// The publish options the flags describe.
    fn options(&self) -> PublishOptions {
        PublishOptions {
            id: self.id,
            priority: Some(self.priority),
            ttl: self.ttl,
            delay: self.delay,
            correlation_id: self.correlation.clone(),
            reply_to: self.reply_to.clone(),
            headers: self.headers.iter().cloned().collect(),
            ..PublishOptions::default()
        }
    }
}

/// Runs `agentbus pub`.
pub(crate) async fn run(global: &Global, args: PubArgs) -> anyhow::Result<()> {
    let payload = read_payload(&args.payload).await?;
    let bus = Bus::new(backend::open(&global.backend).await?);
    let mut envelope = Envelope::new(args.channel.clone(), args.kind.clone(), payload);
    envelope.header = args.options().to_header(&args.kind, bus.clock().now());
    let receipt = bus.publish_envelope(envelope).await?;
    if global.json {
        output::json_line(&receipt)
    } else {
        output::line(output::receipt_line("published", &receipt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: PubArgs,
    }

    #[test]
    fn flags_become_options() {
        let id = MessageId::new();
        let parsed = Wrapper::try_parse_from([
            "pub",
            "a.b",
            "{}",
            "--priority",
            "critical",
            "--ttl",
            "5s",
            "--delay",
            "250ms",
            "--id",
            &id.to_string(),
            "--correlation",
            "wf-1",
            "--reply-to",
            "replies.x",
            "--header",
            "k=v",
            "--header",
            "x=y=z",
        ])
        .unwrap()
        .args;
        assert_eq!(parsed.kind, "cli.message");
        let options = parsed.options();
        assert_eq!(options.id, Some(id));
        assert_eq!(options.priority, Some(Priority::Critical));
        assert_eq!(options.ttl, Some(Duration::from_secs(5)));
        assert_eq!(options.delay, Some(Duration::from_millis(250)));
        assert_eq!(options.correlation_id.as_deref(), Some("wf-1"));
        assert_eq!(options.reply_to.unwrap().as_str(), "replies.x");
        assert_eq!(options.headers["k"], "v");
        assert_eq!(options.headers["x"], "y=z");
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for argv in [
            &["pub", "a..b", "{}"][..],
            &["pub", "a.b", "{}", "--priority", "urgent"],
            &["pub", "a.b", "{}", "--ttl", "soon"],
            &["pub", "a.b", "{}", "--ttl", "0s"],
            &["pub", "a.b", "{}", "--id", "nope"],
            &["pub", "a.b", "{}", "--header", "novalue"],
            &["pub", "a.b", "{}", "--reply-to", "x.*"],
        ] {
            let error = Wrapper::try_parse_from(argv).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{argv:?}");
        }
    }
}
