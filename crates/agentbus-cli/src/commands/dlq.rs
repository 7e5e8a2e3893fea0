//! `agentbus dlq list|show|replay|purge`: the dead letters of a backend.

use std::sync::Arc;

use agentbus::{ChannelPattern, DeadLetterFilter, DeadReason, MessageId, Transport};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::{backend, output, Global};

/// The `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters, oldest first (--json: an array of dead letters with their
    /// whole envelopes).
    List(ListArgs),
    /// Show one dead letter in full: why it died, its header and payload.
    Show {
        /// The dead letter's id, as `dlq list` prints it.
        #[arg(value_name = "ID")]
        id: MessageId,
    },
    /// Publish a dead letter again on its channel (new id, attempt reset, causation =
    /// the original) and remove it from the dead letters.
    Replay {
        /// The dead letter's id, as `dlq list` prints it.
        #[arg(value_name = "ID")]
        id: MessageId,
    },
    /// Delete dead letters: all of them, or those matching --channel and --reason.
    Purge(FilterArgs),
}

/// Which dead letters a command applies to.
#[derive(Debug, Clone, Args)]
pub(crate) struct FilterArgs {
    /// Only dead letters whose channel matches this pattern, e.g. orders.>.
    #[arg(long, value_name = "PATTERN")]
    pub(crate) channel: Option<ChannelPattern>,

    /// Only dead letters that died for this reason.
    #[arg(long, value_enum, value_name = "REASON")]
    pub(crate) reason: Option<Reason>,
}

/// Arguments of `dlq list`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    pub(crate) filter: FilterArgs,

    /// List at most this many (the oldest).
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<usize>,
}

/// Why a message died, as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Reason {
    /// Delivered the group's maximum number of times without an ack.
    #[value(name = "max_deliveries", alias = "max-deliveries")]
    MaxDeliveries,
    /// Its deadline passed before delivery.
    Expired,
    /// Its payload did not decode for its kind.
    Schema,
    /// A consumer rejected it.
    Rejected,
}

impl From<Reason> for DeadReason {
    fn from(reason: Reason) -> Self {
        match reason {
            Reason::MaxDeliveries => DeadReason::MaxDeliveries,
            Reason::Expired => DeadReason::Expired,
            Reason::Schema => DeadReason::Schema,
            Reason::Rejected => DeadReason::Rejected,
        }
    }
}

impl FilterArgs {
    fn filter(&self, limit: Option<usize>) -> DeadLetterFilter {
        DeadLetterFilter {
            pattern: self.channel.clone(),
            reason: self.reason.map(DeadReason::from),
            limit,
        }
    }
}

/// Runs `command` against `transport` and returns what to print.
///
/// # Errors
/// `NotFound` for an unknown id (exit 1); the backend's errors.
pub(crate) async fn execute(
    transport: &Arc<dyn Transport>,
    command: &DlqCommand,
    json: bool,
) -> anyhow::Result<String> {
    Ok(match command {
        DlqCommand::List(args) => {
            let letters = transport
                .dead_letters(args.filter.filter(args.limit))
                .await?;
            if json {
                serde_json::to_string(&letters)?
            } else if letters.is_empty() {
                "no dead letters".to_string()
            } else {
                output::dead_letter_table(&letters)
            }
        }
        DlqCommand::Show { id } => {
            let letter = transport.dead_letter(*id).await?;
            if json {
                serde_json::to_string(&letter)?
            } else {
                output::dead_letter_detail(&letter)
            }
        }
        DlqCommand::Replay { id } => {
            let receipt = transport.replay_dead_letter(*id).await?;
            if json {
                serde_json::to_string(&receipt)?
            } else {
                output::receipt_line("replayed as", &receipt)
            }
        }
        DlqCommand::Purge(filter) => {
            let purged = transport.purge_dead_letters(filter.filter(None)).await?;
            if json {
                json!({ "purged": purged }).to_string()
            } else {
                format!(
                    "purged {purged} dead letter{}",
                    if purged == 1 { "" } else { "s" }
                )
            }
        }
    })
}

/// Runs `agentbus dlq …`.
pub(crate) async fn run(global: &Global, command: DlqCommand) -> anyhow::Result<()> {
    let transport = backend::open(&global.backend).await?;
    output::line(execute(&transport, &command, global.json).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::publish_json;
    use agentbus::{Bus, ErrorKind, MemoryEngine, PublishOptions, SubscribeOptions};
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(subcommand)]
        command: DlqCommand,
    }

    fn command(argv: &[&str]) -> DlqCommand {
        let mut full = vec!["dlq"];
        full.extend_from_slice(argv);
        Wrapper::try_parse_from(full).unwrap().command
    }

    /// A memory engine holding one rejected dead letter on `orders.a` and one on
    /// `jobs.b`.
    async fn with_dead_letters() -> (Bus, Arc<dyn Transport>) {
        let transport: Arc<dyn Transport> = Arc::new(MemoryEngine::new());
        let bus = Bus::new(transport.clone());
        let mut sub = bus
            .subscribe(SubscribeOptions::new(ChannelPattern::new(">").unwrap()))
            .await
            .unwrap();
        for channel in ["orders.a", "jobs.b"] {
            let options = PublishOptions::default();
            publish_json(&bus, channel, json!({ "on": channel }), &options).await;
            let delivery = sub.next().await.unwrap();
            delivery
                .reject(DeadReason::Rejected, "bad order")
                .await
                .unwrap();
        }
        (bus, transport)
    }

    #[tokio::test]
    async fn list_show_replay_purge() {
        let (_bus, transport) = with_dead_letters().await;

        let listed = execute(&transport, &command(&["list"]), true)
            .await
            .unwrap();
        let letters: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(letters[0]["reason"], "rejected");
        assert_eq!(letters[0]["envelope"]["channel"], "orders.a");
        let first = letters[0]["id"].as_str().unwrap().to_string();

        let filtered = execute(&transport, &command(&["list", "--channel", "jobs.>"]), true)
            .await
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<serde_json::Value>>(&filtered)
                .unwrap()
                .len(),
            1
        );
        let none = execute(
            &transport,
            &command(&["list", "--reason", "expired"]),
            false,
        )
        .await
        .unwrap();
        assert_eq!(none, "no dead letters");
        let table = execute(&transport, &command(&["list", "--limit", "1"]), false)
            .await
            .unwrap();
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(
            table.contains(&first) && table.contains("bad order"),
            "{table}"
        );

        let shown = execute(&transport, &command(&["show", &first]), false)
            .await
            .unwrap();
        assert!(
            shown.contains("orders.a") && shown.contains("rejected"),
            "{shown}"
        );

        let replayed = execute(&transport, &command(&["replay", &first]), true)
            .await
            .unwrap();
        let receipt: serde_json::Value = serde_json::from_str(&replayed).unwrap();
        assert_eq!(receipt["channel"], "orders.a");
        let error = execute(&transport, &command(&["show", &first]), false)
            .await
            .unwrap_err();
        let kind = error.downcast_ref::<agentbus::Error>().unwrap().kind();
        assert_eq!(kind, ErrorKind::NotFound);

        let purged = execute(&transport, &command(&["purge"]), false)
            .await
            .unwrap();
        assert_eq!(purged, "purged 1 dead letter");
        let listed = execute(&transport, &command(&["list"]), true)
            .await
            .unwrap();
        assert_eq!(listed, "[]");
    }

    #[test]
    fn reasons_parse_in_both_spellings() {
        for spelling in ["max_deliveries", "max-deliveries"] {
            let DlqCommand::Purge(filter) = command(&["purge", "--reason", spelling]) else {
                panic!("not purge");
            };
            assert_eq!(filter.reason, Some(Reason::MaxDeliveries));
        }
        assert!(Wrapper::try_parse_from(["dlq", "show", "not-a-uuid"]).is_err());
    }
}
