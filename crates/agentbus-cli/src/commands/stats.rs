//! `agentbus stats`: channels, groups and dead letters of a backend.

use agentbus::EngineStats;

use crate::{backend, output, Global};

/// The statistics as readable tables: channels, then groups, then the counters.
pub(crate) fn render(stats: &EngineStats) -> String {
    let channels: Vec<Vec<String>> = stats
        .channels
        .iter()
        .map(|c| {
            vec![
                c.channel.to_string(),
                c.messages.to_string(),
                c.bytes.to_string(),
                c.published.to_string(),
                c.dropped.to_string(),
                c.last_sequence.to_string(),
            ]
        })
        .collect();
    let groups: Vec<Vec<String>> = stats
        .groups
        .iter()
        .map(|g| {
            vec![
                output::safe(&g.group).into_owned(),
                g.pattern.to_string(),
                g.members.to_string(),
                g.pending.to_string(),
                g.in_flight.to_string(),
                g.delivered.to_string(),
                g.acked.to_string(),
                g.redelivered.to_string(),
                g.dead_lettered.to_string(),
            ]
        })
        .collect();
    [
        format!("engine: {}", stats.engine),
        String::new(),
        output::table(
            &[
                "CHANNEL",
                "MESSAGES",
                "BYTES",
                "PUBLISHED",
                "DROPPED",
                "LAST SEQ",
            ],
            &channels,
        ),
        String::new(),
        output::table(
            &[
                "GROUP",
                "PATTERN",
                "MEMBERS",
                "PENDING",
                "IN-FLIGHT",
                "DELIVERED",
                "ACKED",
                "REDELIVERED",
                "DEAD",
            ],
            &groups,
        ),
        String::new(),
        format!(
            "dead letters: {}  rejected (full): {}  expired: {}",
            stats.dead_letters, stats.rejected_full, stats.expired
        ),
    ]
    .into_iter()
    .chain(
        stats
            .details
            .iter()
            .map(|(name, value)| format!("{name}: {value}")),
    )
    .collect::<Vec<_>>()
    .join("\n")
}

/// Runs `agentbus stats`.
pub(crate) async fn run(global: &Global) -> anyhow::Result<()> {
    let transport = backend::open(&global.backend).await?;
    let stats = transport.stats().await?;
    if global.json {
        output::json_line(&stats)
    } else {
        output::line(render(&stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::publish_json;
    use agentbus::{Bus, ChannelPattern, PublishOptions, SubscribeOptions};

    #[tokio::test]
    async fn tables_show_channels_and_groups() {
        let bus = Bus::memory();
        let _sub = bus
            .subscribe(
                SubscribeOptions::new(ChannelPattern::new("orders.>").unwrap()).group("billing"),
            )
            .await
            .unwrap();
        let options = PublishOptions::default();
        publish_json(&bus, "orders.a", serde_json::json!({}), &options).await;
        let stats = bus.transport().stats().await.unwrap();
        let text = render(&stats);
        assert!(text.starts_with("engine: memory\n"), "{text}");
        let channel_row = text
            .lines()
            .find(|l| l.starts_with("orders.a"))
            .unwrap_or_else(|| panic!("no channel row in:\n{text}"));
        assert_eq!(
            channel_row.split_whitespace().nth(3),
            Some("1"),
            "{channel_row}"
        );
        let group_row = text
            .lines()
            .find(|l| l.starts_with("billing"))
            .unwrap_or_else(|| panic!("no group row in:\n{text}"));
        assert_eq!(group_row.split_whitespace().nth(1), Some("orders.>"));
        assert_eq!(group_row.split_whitespace().nth(2), Some("1"), "members");
        assert!(text.ends_with("dead letters: 0  rejected (full): 0  expired: 0"));

        let empty = render(&Bus::memory().transport().stats().await.unwrap());
        assert_eq!(empty.matches("(none)").count(), 2, "{empty}");
    }
}
