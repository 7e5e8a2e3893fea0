//! The agentbus durable log engine (`--backend file:DIR`).
//!
//! [`FileEngine`] is the memory engine's delivery state machine with every state
//! change journaled to an append-only log of CRC32C-framed records, written by one
//! thread doing group commit, and replayed on open. A publish receipt comes back
//! once its record is as durable as the [`FsyncPolicy`] promises (by default: fsynced).
//!
//! - [`codec`]: the record framing and record types (the on-disk format).
//! - [`segment`]: segment files and the recovery rules.
//! - [`checkpoint`]: checkpoints of the whole state, so opening replays only the log
//!   after the newest one, and segments before the one before it are deleted.
//! - [`storage`]: the small file layer the engine writes through; [`fault`] is a
//!   seeded fault-injecting implementation for tests (power loss, bit flips, EIO).
//! - [`repair()`]: move damage aside and report what was lost.
//!
//! `docs/DURABLE_LOG.md` describes the format, the recovery rules and what each fsync
//! policy guarantees.

pub mod checkpoint;
pub mod codec;
mod engine;
pub mod fault;
mod options;
mod repair;
pub mod segment;
pub mod storage;
mod wal;

use std::path::Path;

pub use engine::{FileEngine, Recovery, LOCK_FILE};
pub use options::{FileOptions, FsyncPolicy};
pub use repair::RepairReport;
pub use storage::{StdStorage, Storage, StorageFile};

/// Opens the log in `dir` with repair on: damage before the tail is moved into
/// quarantine files (see [`RepairReport`]), a torn tail is cut, and the directory is
/// left ready to open normally. Returns what recovery found and did.
///
/// # Errors
/// [`agentbus::ErrorKind::DataDirLocked`] when another process has the directory
/// open; I/O errors.
pub fn repair(dir: impl AsRef<Path>) -> agentbus::Result<Recovery> {
    let engine = FileEngine::open(dir, FileOptions::default().repair(true))?;
    let recovery = engine.recovery().clone();
    drop(engine);
    Ok(recovery)
}
