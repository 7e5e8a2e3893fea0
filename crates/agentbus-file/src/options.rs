//! Engine settings: the fsync policy and the rest of [`FileOptions`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use agentbus::{Error, ErrorKind, SharedClock, SystemClock};

/// When the log syncs to disk, and so what a publish receipt means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Every receipt (and every settlement) waits for the `fsync` of its record: an
    /// acknowledged publish survives a power loss. Group commit shares one `fsync`
    /// among everything that arrived while the previous one ran. The default.
    #[default]
    Always,
    /// Records are written to the OS at once and synced at most this long apart: a
    /// receipt survives a crash of the process, but a power loss or kernel crash may
    /// lose up to one interval of acknowledged records.
    Interval(Duration),
    /// Written to the OS, never synced by the engine (the OS writes back when it
    /// likes, typically within 30 s): survives a process crash only.
    Never,
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval(d) => write!(f, "interval({}ms)", d.as_millis()),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = Error;

    /// `always`, `never`, `interval(100ms)`, `interval(100)` (milliseconds) or
    /// `interval:100ms`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let text = s.trim().to_ascii_lowercase();
        match text.as_str() {
            "always" => return Ok(FsyncPolicy::Always),
            "never" => return Ok(FsyncPolicy::Never),
            _ => {}
        }
        let inner = text
            .strip_prefix("interval(")
            .and_then(|r| r.strip_suffix(')'))
            .or_else(|| text.strip_prefix("interval:"))
            .or_else(|| text.strip_prefix("interval="));
        let parsed = inner.and_then(|v| {
            let v = v.trim();
            let number = v.strip_suffix("ms").unwrap_or(v);
            number.trim().parse::<u64>().ok()
        });
        match parsed {
            Some(ms) if ms > 0 => Ok(FsyncPolicy::Interval(Duration::from_millis(ms))),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "unknown fsync policy '{s}': use always, never or interval(MILLISECONDS), \
                     e.g. interval(100ms)"
                ),
            )),
        }
    }
}

/// Settings of a [`FileEngine`](crate::FileEngine).
#[derive(Clone)]
pub struct FileOptions {
    /// When to fsync. Default: [`FsyncPolicy::Always`].
    pub fsync: FsyncPolicy,
    /// A segment is sealed and a new one started past this many bytes. Default 64 MiB.
    pub segment_bytes: u64,
    /// The largest accepted payload. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// How many dead letters are kept (the oldest beyond are dropped, counted).
    pub max_dead_letters: usize,
    /// Whether ack / nack / reject wait for their record to be as durable as `fsync`
    /// promises before returning. Default true. With false they return once the
    /// record is queued for the writer: a crash may lose an ack that already
    /// returned, and the message is delivered again (at-least-once allows it); a
    /// consumer acking one message at a time then no longer waits for an fsync each.
    pub sync_settlements: bool,
    /// Write a checkpoint once this many bytes of log were written since the last one
    /// (or as many as the last checkpoint's own size, if larger: a checkpoint is
    /// never written more often than its cost is paid back). After a checkpoint,
    /// opening replays only the log written after it, and the segments before the
    /// previous checkpoint are deleted. `None`: never; opening then replays the whole
    /// log and no segment is ever deleted. Default 64 MiB.
    pub checkpoint_bytes: Option<u64>,
    /// Open a log with damage before its tail by quarantining the damaged part
    /// instead of refusing (what `agentbus repair` does). Default false.
    pub repair: bool,
    /// The clock the state machine runs on. Default: the system clock.
    pub clock: SharedClock,
}

impl fmt::Debug for FileOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileOptions")
            .field("fsync", &self.fsync)
            .field("segment_bytes", &self.segment_bytes)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("max_dead_letters", &self.max_dead_letters)
            .field("sync_settlements", &self.sync_settlements)
            .field("checkpoint_bytes", &self.checkpoint_bytes)
            .field("repair", &self.repair)
            .finish_non_exhaustive()
    }
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 * 1024 * 1024,
            max_payload_bytes: agentbus::transport::DEFAULT_MAX_PAYLOAD_BYTES,
            max_dead_letters: 100_000,
            sync_settlements: true,
            checkpoint_bytes: Some(64 * 1024 * 1024),
            repair: false,
            clock: std::sync::Arc::new(SystemClock),
        }
    }
}

impl FileOptions {
    /// Sets the fsync policy.
    pub fn fsync(mut self, policy: FsyncPolicy) -> Self {
        self.fsync = policy;
        self
    }

    /// Sets the segment size.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }

    /// Sets whether settlements wait for durability (see
    /// [`FileOptions::sync_settlements`]).
    pub fn sync_settlements(mut self, sync: bool) -> Self {
        self.sync_settlements = sync;
        self
    }

    /// Sets [`FileOptions::checkpoint_bytes`]: how much log is written between
    /// checkpoints (`None` turns checkpoints, and with them segment deletion, off).
    ///
    /// ```
    /// use agentbus_file::FileOptions;
    /// // Start-up replays at most ~16 MiB of log after the newest checkpoint.
    /// let options = FileOptions::default().checkpoint_bytes(Some(16 << 20));
    /// assert_eq!(options.checkpoint_bytes, Some(16 << 20));
    /// ```
    pub fn checkpoint_bytes(mut self, bytes: Option<u64>) -> Self {
        self.checkpoint_bytes = bytes;
        self
    }

    /// Sets whether damage is quarantined on open instead of refused.
    pub fn repair(mut self, repair: bool) -> Self {
        self.repair = repair;
        self
    }

    /// Runs the engine on `clock`.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        assert_eq!(
            "always".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Always
        );
        assert_eq!("Never".parse::<FsyncPolicy>().unwrap(), FsyncPolicy::Never);
        let p: FsyncPolicy = "interval(100ms)".parse().unwrap();
        assert_eq!(p, FsyncPolicy::Interval(Duration::from_millis(100)));
        assert_eq!(p.to_string(), "interval(100ms)");
        assert_eq!(p.to_string().parse::<FsyncPolicy>().unwrap(), p);
        assert_eq!(
            "interval:5".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Interval(Duration::from_millis(5))
        );
        let e = "sometimes".parse::<FsyncPolicy>().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("interval(MILLISECONDS)"));
        assert!("interval(0)".parse::<FsyncPolicy>().is_err());
    }
}
