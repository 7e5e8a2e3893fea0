//! `agentbus doctor`: what a publish receipt guarantees on the backend, read from its
//! settings, and how to make it stronger (DESIGN §5, "durability honesty").

use agentbus::DurabilityReport;

use crate::{backend, output, Global};

/// The report as a person reads it: settings, the guarantee, then advice.
pub(crate) fn render(report: &DurabilityReport) -> String {
    let mut lines = vec![format!("backend: {}", report.engine), String::new()];
    if !report.settings.is_empty() {
        lines.push("settings read:".to_string());
        let width = report.settings.keys().map(String::len).max().unwrap_or(0);
        lines.extend(
            report
                .settings
                .iter()
                .map(|(name, value)| format!("  {name:<width$}  {}", output::safe(value))),
        );
        lines.push(String::new());
    }
    lines.push(format!("guarantee: {}", report.guarantee));
    if !report.advice.is_empty() {
        lines.push(String::new());
        lines.push("to make it stronger:".to_string());
        lines.extend(report.advice.iter().map(|a| format!("  - {a}")));
    }
    lines.join("\n")
}

/// Runs `agentbus doctor`.
pub(crate) async fn run(global: &Global) -> anyhow::Result<()> {
    let transport = backend::open(&global.backend).await?;
    let report = transport.durability().await?;
    if global.json {
        output::json_line(&report)
    } else {
        output::line(render(&report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbus::{MemoryEngine, Transport};

    #[tokio::test]
    async fn memory_says_a_receipt_survives_nothing_and_points_at_the_durable_log() {
        let report = MemoryEngine::new().durability().await.unwrap();
        let text = render(&report);
        assert!(text.contains("backend: memory"), "{text}");
        assert!(text.contains("storage"), "{text}");
        assert!(text.contains("survives nothing"), "{text}");
        assert!(text.contains("--backend file:DIR"), "{text}");
    }
}
