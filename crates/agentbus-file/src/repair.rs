//! Repair: move the damaged part of a log aside and say exactly what was lost.
//!
//! The log is a journal of state-machine steps, each depending on every step before
//! it, so nothing after the first damaged record can be replayed. Repair keeps the
//! whole records before the damage, moves the rest of the damaged segment and every
//! later segment into quarantine files in the same directory (named
//! `<segment>.quarantined-<millis>-at-<offset>`, never read by the engine, kept for
//! forensics), and counts what the quarantined bytes held.

use std::io;

use crate::codec::{read_frame, Frame, Op};
use crate::segment::{list_segments, parse_segment_name, Damage, SEGMENT_HEADER};
use crate::storage::Storage;

/// What a repair moved aside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// The damage that was found.
    pub damage: Option<Damage>,
    /// Quarantine files written, with their sizes in bytes.
    pub quarantined: Vec<(String, u64)>,
    /// Bytes moved aside in all.
    pub bytes: u64,
    /// Records with a valid checksum found in the quarantined bytes: lost, because
    /// they come after the damaged record.
    pub records_lost: u64,
    /// Of those, publishes (messages that no longer exist after the repair, unless
    /// a publisher retries them).
    pub publishes_lost: u64,
}

impl std::fmt::Display for RepairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.damage {
            None => f.write_str("the log is intact: nothing to repair"),
            Some(damage) => {
                write!(
                    f,
                    "damage: {damage}; moved {} bytes aside into {} quarantine file(s) ({}); \
                     lost at least {} record(s) after the damage, {} of them publishes, plus \
                     whatever the damaged bytes held",
                    self.bytes,
                    self.quarantined.len(),
                    self.quarantined
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.records_lost,
                    self.publishes_lost
                )
            }
        }
    }
}

/// Counts the records that look intact in `bytes`: read in sequence, and after a bad
/// frame, resynchronise by trying every following offset.
fn count_records(bytes: &[u8], report: &mut RepairReport) {
    let mut offset = 0;
    while offset < bytes.len() {
        match read_frame(&bytes[offset..]) {
            Frame::Ok(payload, len) => {
                report.records_lost += 1;
                if matches!(Op::decode(payload), Ok(Op::Publish { .. })) {
                    report.publishes_lost += 1;
                }
                offset += len;
            }
            Frame::Zeros => return,
            Frame::Incomplete | Frame::Corrupt(_) => offset += 1,
        }
    }
}

fn quarantine_name(name: &str, offset: u64) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{name}.quarantined-{millis}-at-{offset}")
}

/// Moves everything from `damage` on into quarantine files and makes that durable.
///
/// # Errors
/// Any I/O error; the log may then be half repaired, and running repair again
/// continues.
pub(crate) fn quarantine(storage: &dyn Storage, damage: &Damage) -> io::Result<RepairReport> {
    let mut report = RepairReport {
        damage: Some(damage.clone()),
        ..RepairReport::default()
    };
    let damaged_index = parse_segment_name(&damage.file).unwrap_or(0);
    let segments = list_segments(storage).map_err(|e| io::Error::other(e.to_string()))?;
    for (index, name) in segments {
        if index < damaged_index {
            continue;
        }
        let bytes = storage.read(&name)?;
        let keep = if index == damaged_index && damage.offset >= SEGMENT_HEADER as u64 {
            damage.offset.min(bytes.len() as u64)
        } else {
            0
        };
        let tail = &bytes[keep as usize..];
        let target = quarantine_name(&name, keep);
        if keep == 0 {
            storage.rename(&name, &target)?;
        } else {
            let mut file = storage.create(&target)?;
            file.write_all(tail)?;
            file.sync()?;
            storage.truncate(&name, keep)?;
        }
        let skip = if keep == 0 && tail.len() >= SEGMENT_HEADER {
            SEGMENT_HEADER
        } else {
            0
        };
        count_records(&tail[skip..], &mut report);
        report.bytes += tail.len() as u64;
        report.quarantined.push((target, tail.len() as u64));
    }
    storage.sync_dir()?;
    Ok(report)
}

/// Moves a damaged checkpoint aside (opening then falls back to the checkpoint before
/// it, or to the whole log) and makes that durable.
///
/// # Errors
/// Any I/O error.
pub(crate) fn quarantine_checkpoint(
    storage: &dyn Storage,
    damage: &Damage,
) -> io::Result<RepairReport> {
    let size = storage.size(&damage.file)?;
    let target = quarantine_name(&damage.file, damage.offset);
    storage.rename(&damage.file, &target)?;
    storage.sync_dir()?;
    Ok(RepairReport {
        damage: Some(damage.clone()),
        quarantined: vec![(target, size)],
        bytes: size,
        records_lost: 0,
        publishes_lost: 0,
    })
}
