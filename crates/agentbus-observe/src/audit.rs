//! The JSON Lines audit sink (seed 001): one file per category and per UTC day,
//! written by a thread of its own, with retention clean-up.
//!
//! Files are `DIR/<category>-<YYYY-MM-DD>.jsonl`, one JSON object per line, each with
//! `ts` (RFC 3339, UTC) and `category`. The day of a record is the UTC date of its
//! timestamp, so the sink rotates at midnight UTC by construction. Retention keeps the
//! files of the last `retention_days` days (today included) and deletes older ones when
//! the sink starts and whenever the day changes; files that do not look like the
//! sink's own are never touched.
//!
//! The bus never waits for the sink: each bus event goes, as an owned snapshot of its
//! header (the payload is not copied), through a bounded channel with `try_send`, and
//! the writer thread turns it into records. When the writer falls behind, events are
//! dropped and counted; the
//! writer then writes an `errors` record saying how many were lost, logs a warning and
//! increments `agentbus_audit_dropped_total`. An I/O error is logged and counted, and
//! the writer goes on with the next record.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use agentbus::{BusEvent, BusObserver, Error, ErrorKind, Result, Settlement, SharedClock};
use chrono::{DateTime, NaiveDate, Utc};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};

/// What an audit record is about; each category has its own files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// What agents did: sent a kind, handled a message (and how it ended).
    AgentActivity,
    /// Every message event: published, delivered, acked, nacked, rejected.
    MessageAudit,
    /// Every settled delivery: the outcome of a unit of work, with its duration.
    TaskHistory,
    /// Latencies: publish→ack and handling time of each acked message.
    Performance,
    /// Failed publishes, nacks with an error, rejects, dead letters, audit drops.
    Errors,
}

impl Category {
    /// Every category.
    pub const ALL: [Category; 5] = [
        Category::AgentActivity,
        Category::MessageAudit,
        Category::TaskHistory,
        Category::Performance,
        Category::Errors,
    ];

    /// The stable name, used in file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::AgentActivity => "agent_activity",
            Category::MessageAudit => "message_audit",
            Category::TaskHistory => "task_history",
            Category::Performance => "performance",
            Category::Errors => "errors",
        }
    }

    fn from_name(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// Settings of an [`AuditSink`].
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Where the files go (created if missing).
    pub dir: PathBuf,
    /// Days of files kept, today included (at least 1).
    pub retention_days: u32,
    /// Records the channel holds before new ones are dropped.
    pub capacity: usize,
    /// The clock that timestamps records (inject a manual clock in tests).
    pub clock: SharedClock,
}

impl AuditConfig {
    /// Files in `dir`, 14 days kept, 65,536 records of buffer, system clock.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        AuditConfig {
            dir: dir.into(),
            retention_days: 14,
            capacity: 65_536,
            clock: Arc::new(agentbus::SystemClock),
        }
    }

    /// Sets the retention in days.
    pub fn retention_days(mut self, days: u32) -> Self {
        self.retention_days = days;
        self
    }

    /// Sets the channel capacity.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets the clock.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
}

/// Counters of an [`AuditSink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct AuditStats {
    /// Records written to files.
    pub written: u64,
    /// Bus events (each one to four records) and records dropped because the writer
    /// was behind.
    pub dropped: u64,
    /// Records lost to I/O errors.
    pub write_errors: u64,
    /// Old files deleted by retention.
    pub files_deleted: u64,
}

struct Record {
    at: DateTime<Utc>,
    category: Category,
    fields: Value,
}

enum Command {
    Record(Record),
    Event(Box<Snapshot>),
    Flush(SyncSender<()>),
    #[cfg(test)]
    Block(Receiver<()>),
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
    files_deleted: AtomicU64,
}

/// The audit sink: a [`BusObserver`] that writes JSON Lines files off the hot path.
///
/// # Examples
///
/// ```no_run
/// use std::sync::Arc;
/// use agentbus::Bus;
/// use agentbus_observe::audit::{AuditConfig, AuditSink};
///
/// # fn main() -> agentbus::Result<()> {
/// let audit = Arc::new(AuditSink::start(AuditConfig::new("logs").retention_days(7))?);
/// let bus = Bus::builder(Arc::new(agentbus::MemoryEngine::new()))
///     .observer(audit.clone())
///     .build();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AuditSink {
    tx: Mutex<Option<SyncSender<Command>>>,
    counters: Arc<Counters>,
    clock: SharedClock,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AuditSink {
    /// Creates the directory, applies retention once and starts the writer thread.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a zero retention or capacity;
    /// [`ErrorKind::Backend`] when the directory cannot be created, naming it.
    pub fn start(config: AuditConfig) -> Result<AuditSink> {
        if config.retention_days == 0 || config.capacity == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "audit retention_days and capacity must be at least 1",
            ));
        }
        fs::create_dir_all(&config.dir).map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                format!(
                    "cannot create the audit directory '{}': {e}; check the path and its permissions",
                    config.dir.display()
                ),
            )
            .with_source(e)
        })?;
        let counters = Arc::new(Counters::default());
        let today = config.clock.now().date_naive();
        let deleted = apply_retention(&config.dir, today, config.retention_days);
        counters.files_deleted.fetch_add(deleted, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(config.capacity);
        let mut writer = Writer {
            dir: config.dir.clone(),
            retention_days: config.retention_days,
            files: HashMap::new(),
            newest_day: today,
            clock: config.clock.clone(),
            counters: counters.clone(),
            dropped_reported: 0,
        };
        let thread = std::thread::Builder::new()
            .name("agentbus-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!("cannot start the audit writer: {e}"),
                )
            })?;
        Ok(AuditSink {
            tx: Mutex::new(Some(tx)),
            counters,
            clock: config.clock,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a record of `category` with `fields` (an object; `ts` and `category`
    /// are added). Returns false when it was dropped because the writer is behind.
    pub fn record(&self, category: Category, fields: Value) -> bool {
        self.record_at(self.clock.now(), category, fields)
    }

    fn record_at(&self, at: DateTime<Utc>, category: Category, fields: Value) -> bool {
        self.send(Command::Record(Record {
            at,
            category,
            fields,
        }))
    }

    /// Queues a command without waiting; a full queue drops it and counts it.
    fn send(&self, command: Command) -> bool {
        let guard = self.tx.lock();
        let sent = guard.as_ref().is_some_and(|tx| match tx.try_send(command) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        });
        if !sent {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("agentbus_audit_dropped_total").increment(1);
        }
        sent
    }

    /// Waits until every record queued so far is written and flushed (at most 10 s).
    /// Blocks the calling thread: for shutdown and tests, not for the hot path.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] when the writer does not answer in time;
    /// [`ErrorKind::Closed`] after [`AuditSink::close`].
    pub fn flush(&self) -> Result<()> {
        let tx = self
            .tx
            .lock()
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Closed, "the audit sink is closed"))?;
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        tx.send(Command::Flush(done_tx))
            .map_err(|_| Error::new(ErrorKind::Closed, "the audit writer has stopped"))?;
        done_rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                "the audit writer did not flush within 10 s; the disk may be slow or full",
            )
        })
    }

    /// Flushes, stops the writer and waits for it. Records after this are dropped.
    pub fn close(&self) {
        let _ = self.flush();
        drop(self.tx.lock().take());
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> AuditStats {
        AuditStats {
            written: self.counters.written.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            write_errors: self.counters.write_errors.load(Ordering::Relaxed),
            files_deleted: self.counters.files_deleted.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    fn block_writer(&self) -> SyncSender<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        if let Some(sender) = self.tx.lock().as_ref() {
            let _ = sender.send(Command::Block(rx));
        }
        tx
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        self.close();
    }
}

/// What the sink keeps of a bus event: owned, cheap to take on the hot path (the
/// payload is not copied); the writer thread turns it into records.
struct Snapshot {
    at: DateTime<Utc>,
    name: &'static str,
    channel: String,
    header: agentbus::Header,
    detail: Detail,
}

enum Detail {
    Published {
        sequence: u64,
        duplicate: bool,
        took: Duration,
    },
    Failed(String),
    Delivered(String),
    Settled {
        group: String,
        agent: Option<String>,
        settlement: Settlement,
        dead_lettered: bool,
        held: Duration,
    },
}

impl BusObserver for AuditSink {
    fn on_event(&self, event: &BusEvent<'_>) {
        let envelope = event.envelope();
        let detail = match event {
            BusEvent::Published { receipt, took, .. } => Detail::Published {
                sequence: receipt.sequence,
                duplicate: receipt.duplicate,
                took: *took,
            },
            BusEvent::PublishFailed { error, .. } => Detail::Failed(error.to_string()),
            BusEvent::Delivered { group, .. } => Detail::Delivered(group.to_string()),
            BusEvent::Settled {
                group,
                settlement,
                dead_lettered,
                held,
                agent,
                ..
            } => Detail::Settled {
                agent: crate::handler_of(*agent, group),
                group: group.to_string(),
                settlement: (*settlement).clone(),
                dead_lettered: *dead_lettered,
                held: *held,
            },
            _ => return,
        };
        self.send(Command::Event(Box::new(Snapshot {
            at: event.at(),
            name: event.name(),
            channel: envelope.channel.as_str().to_owned(),
            header: envelope.header.clone(),
            detail,
        })));
    }
}

/// The records of one bus event, by category.
fn records_of(snapshot: Snapshot) -> Vec<(Category, Value)> {
    let Snapshot {
        name,
        channel,
        header: h,
        detail,
        at,
    } = snapshot;
    let mut out = Vec::with_capacity(4);
    let mut base = json!({
        "event": name,
        "message_id": h.id.to_string(),
        "channel": channel,
        "kind": h.kind,
        "sender": h.sender,
        "receiver": h.receiver,
        "correlation_id": h.correlation_id,
        "causation_id": h.causation_id.map(|c| c.to_string()),
        "attempt": h.attempt,
    });
    match detail {
        Detail::Published {
            sequence,
            duplicate,
            took,
        } => {
            base["sequence"] = json!(sequence);
            base["duplicate"] = json!(duplicate);
            base["publish_us"] = json!(took.as_micros() as u64);
            if let Some(sender) = &h.sender {
                out.push((
                    Category::AgentActivity,
                    json!({"agent": sender, "action": "sent", "kind": h.kind,
                           "channel": channel, "message_id": h.id.to_string(),
                           "correlation_id": h.correlation_id}),
                ));
            }
        }
        Detail::Failed(error) => {
            base["error"] = json!(error);
            out.push((Category::Errors, base.clone()));
        }
        Detail::Delivered(group) => {
            base["group"] = json!(group);
        }
        Detail::Settled {
            group,
            agent,
            settlement,
            dead_lettered,
            held,
        } => {
            base["group"] = json!(group);
            base["dead_lettered"] = json!(dead_lettered);
            base["held_ms"] = json!(held.as_secs_f64() * 1e3);
            let error = match &settlement {
                Settlement::Ack => None,
                Settlement::Nack { error, .. } => error.clone(),
                Settlement::Reject { reason, error } => Some(format!("{reason}: {error}")),
            };
            base["error"] = json!(error);
            out.push((Category::TaskHistory, base.clone()));
            if let Some(agent) = agent {
                out.push((
                    Category::AgentActivity,
                    json!({"agent": agent, "action": "handled", "outcome": name,
                           "kind": h.kind, "channel": channel,
                           "message_id": h.id.to_string(), "correlation_id": h.correlation_id}),
                ));
            }
            if matches!(settlement, Settlement::Ack) {
                let latency = (at - h.timestamp).to_std().unwrap_or_default();
                out.push((
                    Category::Performance,
                    json!({"channel": channel, "kind": h.kind,
                           "group": group, "message_id": h.id.to_string(),
                           "publish_to_ack_ms": latency.as_secs_f64() * 1e3,
                           "held_ms": held.as_secs_f64() * 1e3}),
                ));
            } else if error.is_some() || dead_lettered {
                out.push((Category::Errors, base.clone()));
            }
        }
    }
    out.push((Category::MessageAudit, base));
    out
}

struct Writer {
    dir: PathBuf,
    retention_days: u32,
    files: HashMap<Category, (NaiveDate, BufWriter<File>)>,
    newest_day: NaiveDate,
    clock: SharedClock,
    counters: Arc<Counters>,
    dropped_reported: u64,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Command>) {
        while let Ok(command) = rx.recv() {
            self.handle(command);
            // Drain what is queued, then flush once: few syscalls under load, nothing
            // left in buffers when idle.
            while let Ok(command) = rx.try_recv() {
                self.handle(command);
            }
            self.report_drops();
            self.flush_all();
        }
        self.flush_all();
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Record(record) => self.write(record),
            Command::Event(snapshot) => {
                let at = snapshot.at;
                for (category, fields) in records_of(*snapshot) {
                    self.write(Record {
                        at,
                        category,
                        fields,
                    });
                }
            }
            Command::Flush(done) => {
                self.report_drops();
                self.flush_all();
                let _ = done.send(());
            }
            #[cfg(test)]
            Command::Block(gate) => {
                let _ = gate.recv();
            }
        }
    }

    fn report_drops(&mut self) {
        let dropped = self.counters.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_reported {
            let lost = dropped - self.dropped_reported;
            self.dropped_reported = dropped;
            tracing::warn!(
                lost,
                total = dropped,
                "audit sink fell behind and dropped records"
            );
            self.write(Record {
                at: self.clock.now(),
                category: Category::Errors,
                fields: json!({"event": "audit_dropped", "dropped": lost, "dropped_total": dropped,
                               "hint": "the audit writer could not keep up; raise the capacity or write to a faster disk"}),
            });
        }
    }

    fn write(&mut self, record: Record) {
        let day = record.at.date_naive();
        if day > self.newest_day {
            self.newest_day = day;
            let deleted = apply_retention(&self.dir, day, self.retention_days);
            self.counters
                .files_deleted
                .fetch_add(deleted, Ordering::Relaxed);
        }
        let mut line = match record.fields {
            Value::Object(map) => map,
            other => {
                let mut map = serde_json::Map::new();
                map.insert("value".into(), other);
                map
            }
        };
        line.insert(
            "ts".into(),
            json!(record
                .at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("category".into(), json!(record.category.as_str()));
        let result = self.file(record.category, day).and_then(|file| {
            serde_json::to_writer(&mut *file, &line).map_err(std::io::Error::other)?;
            file.write_all(b"\n")
        });
        match result {
            Ok(()) => {
                self.counters.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, dir = %self.dir.display(), "audit record not written");
            }
        }
    }

    fn file(
        &mut self,
        category: Category,
        day: NaiveDate,
    ) -> std::io::Result<&mut BufWriter<File>> {
        let stale = self.files.get(&category).is_some_and(|(d, _)| *d != day);
        if stale {
            if let Some((_, mut old)) = self.files.remove(&category) {
                let _ = old.flush();
            }
        }
        if !self.files.contains_key(&category) {
            // A directory removed under us is recreated rather than failing forever.
            fs::create_dir_all(&self.dir)?;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(file_path(&self.dir, category, day))?;
            self.files.insert(category, (day, BufWriter::new(file)));
        }
        match self.files.get_mut(&category) {
            Some((_, file)) => Ok(file),
            None => Err(std::io::Error::other("audit file vanished")),
        }
    }

    fn flush_all(&mut self) {
        for (_, file) in self.files.values_mut() {
            if let Err(e) = file.flush() {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "audit flush failed");
            }
        }
    }
}

/// The file of `category` on `day`.
pub fn file_path(dir: &Path, category: Category, day: NaiveDate) -> PathBuf {
    dir.join(format!(
        "{}-{}.jsonl",
        category.as_str(),
        day.format("%Y-%m-%d")
    ))
}

/// Parses a file name of the sink (`<category>-<YYYY-MM-DD>.jsonl`).
fn parse_file_name(name: &str) -> Option<(Category, NaiveDate)> {
    let stem = name.strip_suffix(".jsonl")?;
    let cut = stem.len().checked_sub(11)?;
    let (category, date) = (stem.get(..cut)?, stem.get(cut..)?.strip_prefix('-')?);
    Some((
        Category::from_name(category)?,
        NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?,
    ))
}

/// Deletes the sink's files older than `days` days before `today` (today counts as
/// one); returns how many were deleted.
fn apply_retention(dir: &Path, today: NaiveDate, days: u32) -> u64 {
    let Some(oldest_kept) = today.checked_sub_days(chrono::Days::new(u64::from(days) - 1)) else {
        return 0;
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut deleted = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((_, day)) = name.to_str().and_then(parse_file_name) else {
            continue;
        };
        if day < oldest_kept {
            match fs::remove_file(entry.path()) {
                Ok(()) => deleted += 1,
                Err(e) => {
                    tracing::warn!(error = %e, file = %entry.path().display(), "old audit file not deleted")
                }
            }
        }
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbus::{
        Bus, ChannelName, ChannelPattern, Clock, ManualClock, MemoryEngine, SubscribeOptions,
    };

    fn lines(path: &Path) -> Vec<Value> {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn file_names_round_trip() {
        let day = NaiveDate::from_ymd_opt(2026, 1, 2).unwrap();
        for category in Category::ALL {
            let path = file_path(Path::new("/x"), category, day);
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(parse_file_name(name), Some((category, day)), "{name}");
        }
        for bad in [
            "notes.txt",
            "errors.jsonl",
            "errors-2026-13-01.jsonl",
            "other-2026-01-01.jsonl",
            "errors2026-01-01.jsonl",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn rotates_at_midnight_utc_and_keeps_the_retention() {
        let dir = tempfile::tempdir().unwrap();
        // Old files of the sink and a file of someone else.
        fs::write(dir.path().join("errors-2025-12-01.jsonl"), "{}\n").unwrap();
        fs::write(dir.path().join("message_audit-2025-12-30.jsonl"), "{}\n").unwrap();
        fs::write(dir.path().join("notes-2020-01-01.txt"), "keep").unwrap();
        let clock = Arc::new(ManualClock::starting_at(at("2026-01-01T23:59:59Z")));
        let sink = Arc::new(
            AuditSink::start(
                AuditConfig::new(dir.path())
                    .retention_days(2)
                    .clock(clock.clone()),
            )
            .unwrap(),
        );
        // Retention at start: today 01-01 and 12-31 are kept, older go.
        assert!(!dir.path().join("errors-2025-12-01.jsonl").exists());
        assert!(!dir.path().join("message_audit-2025-12-30.jsonl").exists());
        assert!(dir.path().join("notes-2020-01-01.txt").exists());
        assert_eq!(sink.stats().files_deleted, 2);

        let engine = MemoryEngine::builder().clock(clock.clone()).build();
        let bus = Bus::builder(Arc::new(engine))
            .clock(clock.clone())
            .observer(sink.clone())
            .build();
        let channel = ChannelName::new("audit.test").unwrap();
        let mut sub = bus
            .subscribe(
                SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                    .group("agent-auditor--audit_test"),
            )
            .await
            .unwrap();
        let mut envelope = agentbus::Envelope::json(channel.clone(), "t.one", &1).unwrap();
        envelope.header.timestamp = clock.now();
        envelope.header.sender = Some("alice".into());
        bus.publish_envelope(envelope).await.unwrap();
        let delivery = sub.next().await.unwrap();
        clock.advance(Duration::from_secs(2)); // 2026-01-02T00:00:01
        delivery.ack().await.unwrap();
        sink.flush().unwrap();

        let day1 = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        let day2 = NaiveDate::from_ymd_opt(2026, 1, 2).unwrap();
        let audit1 = lines(&file_path(dir.path(), Category::MessageAudit, day1));
        let events: Vec<&str> = audit1
            .iter()
            .map(|l| l["event"].as_str().unwrap())
            .collect();
        assert_eq!(events, ["published", "delivered"]);
        assert_eq!(audit1[0]["sender"], "alice");
        assert_eq!(audit1[0]["ts"], "2026-01-01T23:59:59.000000Z");
        let audit2 = lines(&file_path(dir.path(), Category::MessageAudit, day2));
        assert_eq!(audit2.len(), 1);
        assert_eq!(audit2[0]["event"], "acked");
        let activity1 = lines(&file_path(dir.path(), Category::AgentActivity, day1));
        assert_eq!(activity1[0]["agent"], "alice");
        assert_eq!(activity1[0]["action"], "sent");
        let activity2 = lines(&file_path(dir.path(), Category::AgentActivity, day2));
        assert_eq!(activity2[0]["agent"], "auditor");
        assert_eq!(activity2[0]["outcome"], "acked");
        let perf = lines(&file_path(dir.path(), Category::Performance, day2));
        assert_eq!(perf[0]["publish_to_ack_ms"], 2000.0);
        assert_eq!(
            lines(&file_path(dir.path(), Category::TaskHistory, day2)).len(),
            1
        );

        // Three days on, with retention 2: the 01-01 and 01-02 files go on the first
        // record of the new day.
        clock.advance(Duration::from_secs(3 * 86_400));
        assert!(sink.record(Category::Errors, json!({"event": "test"})));
        sink.flush().unwrap();
        assert!(!file_path(dir.path(), Category::MessageAudit, day1).exists());
        assert!(!file_path(dir.path(), Category::MessageAudit, day2).exists());
        let day5 = NaiveDate::from_ymd_opt(2026, 1, 5).unwrap();
        assert_eq!(
            lines(&file_path(dir.path(), Category::Errors, day5)).len(),
            1
        );
        assert!(dir.path().join("notes-2020-01-01.txt").exists());
        assert_eq!(sink.stats().dropped, 0);
    }

    #[test]
    fn a_full_channel_drops_counts_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::starting_at(at("2026-03-01T10:00:00Z")));
        let sink = AuditSink::start(
            AuditConfig::new(dir.path())
                .capacity(3)
                .clock(clock.clone()),
        )
        .unwrap();
        // Hold the writer: the channel fills and the rest is dropped, never waited on.
        let gate = sink.block_writer();
        let mut accepted = 0;
        for n in 0..10 {
            if sink.record(Category::TaskHistory, json!({"n": n})) {
                accepted += 1;
            }
        }
        // The gate command itself may or may not still occupy a slot.
        assert!((2..=3).contains(&accepted), "{accepted}");
        assert_eq!(sink.stats().dropped, 10 - accepted);
        gate.send(()).unwrap();
        sink.flush().unwrap();
        let day = clock.now().date_naive();
        assert_eq!(
            lines(&file_path(dir.path(), Category::TaskHistory, day)).len() as u64,
            accepted
        );
        let errors = lines(&file_path(dir.path(), Category::Errors, day));
        assert_eq!(errors[0]["event"], "audit_dropped");
        assert_eq!(errors[0]["dropped"], 10 - accepted);
        assert_eq!(sink.stats().written, accepted + 1);
    }

    #[test]
    fn bad_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = AuditSink::start(AuditConfig::new(dir.path()).retention_days(0)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        let error = AuditSink::start(AuditConfig::new(file.join("sub"))).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Backend);
        assert!(error.to_string().contains("audit directory"), "{error}");
    }
}
