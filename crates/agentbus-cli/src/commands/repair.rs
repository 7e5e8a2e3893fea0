//! `agentbus repair DIR`: make a damaged durable log openable again.
//!
//! A log damaged anywhere but its tail refuses to open (error naming the file and
//! offset). Repair keeps every whole record before the damage, moves the damaged rest
//! of that segment and all later segments into `*.quarantined-*` files in the same
//! directory, and reports exactly what they held. A clean log is left untouched
//! (apart from cutting a torn tail, which opening does anyway).

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::{output, CliError, Global};

/// Arguments of `agentbus repair`.
#[derive(Debug, Args)]
#[command(after_help = "\
Exit codes: 0 when the log opens after the command (repaired or already intact), 1 when
it could not be repaired (locked by a running process, I/O errors).

Example:
  agentbus repair ./data")]
pub(crate) struct RepairArgs {
    /// The durable log's directory (what --backend file:DIR names).
    #[arg(value_name = "DIR")]
    pub(crate) dir: PathBuf,
}

/// Runs `agentbus repair`.
pub(crate) async fn run(global: &Global, args: RepairArgs) -> anyhow::Result<()> {
    if !args.dir.is_dir() {
        return Err(CliError::usage(format!(
            "{} is not a directory: pass the directory of a durable log (file:DIR)",
            args.dir.display()
        ))
        .into());
    }
    let dir = args.dir.clone();
    let recovery = tokio::task::spawn_blocking(move || agentbus_file::repair(dir))
        .await
        .map_err(|e| CliError::failed(format!("the repair failed: {e}")))??;
    let torn = recovery.torn.as_ref().map(|t| {
        format!(
            "cut a torn tail of {} bytes at {} offset {} ({})",
            t.dropped_bytes, t.file, t.offset, t.what
        )
    });
    if global.json {
        let repaired = recovery.repaired.as_ref().map(|r| {
            json!({
                "damage": r.damage.as_ref().map(|d| json!({
                    "file": d.file, "offset": d.offset, "what": d.what,
                })),
                "quarantined": r.quarantined.iter().map(|(name, bytes)| json!({
                    "file": name, "bytes": bytes,
                })).collect::<Vec<_>>(),
                "bytes": r.bytes,
                "records_lost": r.records_lost,
                "publishes_lost": r.publishes_lost,
            })
        });
        return output::json_line(&json!({
            "dir": args.dir.display().to_string(),
            "records_kept": recovery.records,
            "segments": recovery.segments,
            "torn_tail": torn,
            "repaired": repaired,
        }));
    }
    let mut lines = vec![format!(
        "{}: {} records in {} segment(s) kept",
        args.dir.display(),
        recovery.records,
        recovery.segments
    )];
    lines.extend(torn);
    match &recovery.repaired {
        Some(report) => lines.push(format!("repaired: {report}")),
        None => lines.push("no damage found: nothing was quarantined".to_string()),
    }
    output::line(lines.join("\n"))
}
