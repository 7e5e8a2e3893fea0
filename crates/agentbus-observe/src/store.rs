//! The interaction store: every message event in SQLite, with its header, queryable by
//! agent, correlation (thread), kind and time window (DESIGN §6 shared context; seed
//! 000's message log and workflow status; seed 004's event store).
//!
//! One row per event (`published`, `delivered`, `acked`, `nacked`, `rejected`,
//! `publish_failed`) in table `interactions`; the `published` row carries the header
//! as JSON and the payload when it is UTF-8 text. Writes go through a bounded channel
//! to a writer thread that commits each batch in one transaction, so the bus never
//! waits for the disk; if the writer falls behind, rows are dropped and counted
//! ([`StoreStats::dropped`], `agentbus_store_dropped_total`). Queries use a second
//! connection (WAL mode lets them run while the writer writes).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use agentbus::{BusEvent, BusObserver, Envelope, Error, ErrorKind, Header, Result, Settlement};
use chrono::{DateTime, TimeZone, Utc};
use parking_lot::Mutex;
use rusqlite::{params_from_iter, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS interactions (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms          INTEGER NOT NULL,
    event          TEXT    NOT NULL,
    message_id     TEXT    NOT NULL,
    channel        TEXT    NOT NULL,
    kind           TEXT    NOT NULL,
    sender         TEXT,
    receiver       TEXT,
    agent          TEXT,
    grp            TEXT,
    correlation_id TEXT,
    causation_id   TEXT,
    attempt        INTEGER NOT NULL DEFAULT 0,
    sent_ms        INTEGER NOT NULL,
    latency_ms     REAL,
    error          TEXT,
    header         TEXT,
    payload        TEXT
);
CREATE INDEX IF NOT EXISTS interactions_correlation ON interactions (correlation_id, at_ms);
CREATE INDEX IF NOT EXISTS interactions_sender      ON interactions (sender, at_ms);
CREATE INDEX IF NOT EXISTS interactions_receiver    ON interactions (receiver, at_ms);
CREATE INDEX IF NOT EXISTS interactions_agent       ON interactions (agent, at_ms);
CREATE INDEX IF NOT EXISTS interactions_kind        ON interactions (kind, at_ms);
CREATE INDEX IF NOT EXISTS interactions_at          ON interactions (at_ms);
CREATE INDEX IF NOT EXISTS interactions_message     ON interactions (message_id);
";

const COLUMNS: &str = "at_ms, event, message_id, channel, kind, sender, receiver, agent, grp, \
                       correlation_id, causation_id, attempt, sent_ms, latency_ms, error, payload";

/// One recorded event of one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// When the event happened.
    pub at: DateTime<Utc>,
    /// `published`, `publish_failed`, `delivered`, `acked`, `nacked` or `rejected`.
    pub event: String,
    /// The message id.
    pub message_id: String,
    /// The channel.
    pub channel: String,
    /// The message kind.
    pub kind: String,
    /// The sending agent, if the header names one.
    pub sender: Option<String>,
    /// The intended receiver, if the header names one.
    pub receiver: Option<String>,
    /// The handling agent, for deliveries and settlements in an agent's group.
    pub agent: Option<String>,
    /// The group, for deliveries and settlements.
    pub group: Option<String>,
    /// The thread.
    pub correlation_id: Option<String>,
    /// The message this one answers or was caused by.
    pub causation_id: Option<String>,
    /// The delivery attempt (0 for publish events).
    pub attempt: u32,
    /// When the message was created (header timestamp).
    pub sent_at: DateTime<Utc>,
    /// For settlements: time from creation to this settlement, in milliseconds.
    pub latency_ms: Option<f64>,
    /// For failures: the error.
    pub error: Option<String>,
    /// For `published`: the payload when it is UTF-8 text.
    pub payload: Option<String>,
}

impl Interaction {
    /// The row of a bus event.
    /// The header comes back for `published` events, to be stored as JSON.
    pub fn from_event(event: &BusEvent<'_>) -> (Interaction, Option<Header>) {
        let envelope = event.envelope();
        let mut row = Interaction::base(envelope, event.name(), event.at());
        let mut header = None;
        match event {
            BusEvent::Published { .. } => {
                header = Some(envelope.header.clone());
                row.payload = std::str::from_utf8(&envelope.payload)
                    .ok()
                    .map(str::to_owned);
            }
            BusEvent::PublishFailed { error, .. } => row.error = Some(error.to_string()),
            BusEvent::Delivered { group, agent, .. } => {
                row.group = Some(group.to_string());
                row.agent = crate::handler_of(*agent, group);
                row.attempt = envelope.header.attempt;
            }
            BusEvent::Settled {
                group,
                settlement,
                agent,
                ..
            } => {
                row.group = Some(group.to_string());
                row.agent = crate::handler_of(*agent, group);
                row.attempt = envelope.header.attempt;
                row.latency_ms = (event.at() - envelope.header.timestamp)
                    .to_std()
                    .ok()
                    .map(|d| d.as_secs_f64() * 1e3);
                row.error = match settlement {
                    Settlement::Ack => None,
                    Settlement::Nack { error, .. } => error.clone(),
                    Settlement::Reject { reason, error } => Some(format!("{reason}: {error}")),
                };
            }
            _ => {}
        }
        (row, header)
    }

    /// A `published`-style row of `envelope` at `at`, for callers that record
    /// messages themselves (an agent keeping its own history).
    pub fn base(envelope: &Envelope, event: &str, at: DateTime<Utc>) -> Interaction {
        let h = &envelope.header;
        Interaction {
            at,
            event: event.to_string(),
            message_id: h.id.to_string(),
            channel: envelope.channel.as_str().to_owned(),
            kind: h.kind.clone(),
            sender: h.sender.clone(),
            receiver: h.receiver.clone(),
            agent: None,
            group: None,
            correlation_id: h.correlation_id.clone(),
            causation_id: h.causation_id.map(|c| c.to_string()),
            attempt: 0,
            sent_at: h.timestamp,
            latency_ms: None,
            error: None,
            payload: None,
        }
    }
}

/// Which interactions to return. Every field set narrows the result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Query {
    /// Rows where this agent sent, was the receiver, or handled the message.
    pub agent: Option<String>,
    /// Rows of this thread.
    pub correlation_id: Option<String>,
    /// Rows of this kind.
    pub kind: Option<String>,
    /// Rows of these events only (e.g. `["published"]` for one row per message).
    pub events: Vec<String>,
    /// At or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Before this time.
    pub until: Option<DateTime<Utc>>,
    /// At most this many rows, the newest (0 means 1000).
    pub limit: usize,
}

impl Query {
    /// Everything (up to the limit).
    pub fn new() -> Self {
        Query::default()
    }
    /// Only rows involving `agent`.
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }
    /// Only rows of thread `correlation`.
    pub fn correlation(mut self, correlation: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation.into());
        self
    }
    /// Only rows of `kind`.
    pub fn kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }
    /// Only these events.
    pub fn events<I: IntoIterator<Item = S>, S: Into<String>>(mut self, events: I) -> Self {
        self.events = events.into_iter().map(Into::into).collect();
        self
    }
    /// Only rows at or after `since`.
    pub fn since(mut self, since: DateTime<Utc>) -> Self {
        self.since = Some(since);
        self
    }
    /// Only rows before `until`.
    pub fn until(mut self, until: DateTime<Utc>) -> Self {
        self.until = Some(until);
        self
    }
    /// At most `n` rows.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = n;
        self
    }
}

/// Counters of an [`InteractionStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Rows written.
    pub written: u64,
    /// Rows dropped because the writer was behind.
    pub dropped: u64,
    /// Rows lost to database errors.
    pub write_errors: u64,
}

/// One message of a thread's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineStep {
    /// The message id.
    pub message_id: String,
    /// Its kind.
    pub kind: String,
    /// Its channel.
    pub channel: String,
    /// Who sent it (`?` when the header names nobody).
    pub from: String,
    /// Who handled it: the handling agents, else the groups, else the named receiver.
    pub to: Vec<String>,
    /// When it was created.
    pub sent_at: DateTime<Utc>,
    /// Milliseconds from creation to the first ack, if acked.
    pub ack_ms: Option<f64>,
    /// The final outcome seen: `acked`, `nacked`, `rejected`, `delivered`, `published`
    /// or `publish_failed`.
    pub outcome: String,
    /// Deliveries made.
    pub deliveries: u32,
    /// The last error reported, if any.
    pub error: Option<String>,
    /// The message this one answers or was caused by.
    pub causation_id: Option<String>,
}

/// Seed 000's workflow status of one correlation id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowStatus {
    /// The correlation id.
    pub correlation_id: String,
    /// `unknown` (nothing recorded), `running` (messages not yet settled), `failed`
    /// (something was rejected or failed to publish, nothing pending) or `completed`.
    pub status: String,
    /// Messages in the thread.
    pub messages: usize,
    /// Messages acked.
    pub acked: usize,
    /// Messages not settled yet.
    pub pending: usize,
    /// Messages rejected or that failed to publish.
    pub failed: usize,
    /// Agents that took part.
    pub agents: Vec<String>,
    /// First event.
    pub first_at: Option<DateTime<Utc>>,
    /// Last event.
    pub last_at: Option<DateTime<Utc>>,
}

enum Command {
    Row(Box<(Interaction, Option<Header>)>),
    Flush(SyncSender<()>),
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

/// The SQLite interaction store; register it on a bus as an observer, query it any
/// time (also from another process, on the same file).
///
/// # Examples
///
/// ```no_run
/// use std::sync::Arc;
/// use agentbus_observe::store::{InteractionStore, Query};
///
/// # fn main() -> agentbus::Result<()> {
/// let store = Arc::new(InteractionStore::open("interactions.db")?);
/// let bus = agentbus::Bus::builder(Arc::new(agentbus::MemoryEngine::new()))
///     .observer(store.clone())
///     .build();
/// let thread = store.query(&Query::new().correlation("order-17"))?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct InteractionStore {
    path: PathBuf,
    reader: Mutex<Connection>,
    tx: Mutex<Option<SyncSender<Command>>>,
    counters: Arc<Counters>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn db_error(path: &Path, what: &str, e: rusqlite::Error) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!(
            "interaction store '{}': {what} failed: {e}; check the file and its permissions",
            path.display()
        ),
    )
    .with_source(e)
}

impl InteractionStore {
    /// Opens (creating if needed) the database at `path` with a 65,536-row buffer.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] when the file cannot be opened or is not a database.
    pub fn open(path: impl AsRef<Path>) -> Result<InteractionStore> {
        InteractionStore::open_with_capacity(path, 65_536)
    }

    /// Opens the database at `path` for reading only: queries work, and recording
    /// is refused (rows count as dropped). For `agentbus trace` and `agentbus log`.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when there is no such file; [`ErrorKind::Backend`] when
    /// it is not a database.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<InteractionStore> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "no interaction store at '{}'; run the bus with a store (e.g. `agentbus demo \
                     context --store {}`) or pass the right --store path",
                    path.display(),
                    path.display()
                ),
            ));
        }
        let reader = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| db_error(&path, "opening", e))?;
        reader
            .query_row("SELECT count(*) FROM interactions", [], |_| Ok(()))
            .map_err(|e| db_error(&path, "reading the interactions table", e))?;
        Ok(InteractionStore {
            path,
            reader: Mutex::new(reader),
            tx: Mutex::new(None),
            counters: Arc::default(),
            thread: Mutex::new(None),
        })
    }

    /// Opens the database at `path`, buffering at most `capacity` rows.
    ///
    /// # Errors
    /// As [`InteractionStore::open`].
    pub fn open_with_capacity(path: impl AsRef<Path>, capacity: usize) -> Result<InteractionStore> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::new(
                    ErrorKind::Backend,
                    format!("cannot create the directory of '{}': {e}", path.display()),
                )
            })?;
        }
        let writer = Connection::open(&path).map_err(|e| db_error(&path, "opening", e))?;
        writer
            .busy_timeout(Duration::from_secs(5))
            .map_err(|e| db_error(&path, "setting the busy timeout", e))?;
        writer
            .execute_batch(SCHEMA)
            .map_err(|e| db_error(&path, "creating the schema", e))?;
        let reader = Connection::open(&path).map_err(|e| db_error(&path, "opening", e))?;
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(|e| db_error(&path, "setting the busy timeout", e))?;
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        let thread_counters = counters.clone();
        let thread_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("agentbus-store".into())
            .spawn(move || write_loop(writer, rx, &thread_counters, &thread_path))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!("cannot start the store writer: {e}"),
                )
            })?;
        Ok(InteractionStore {
            path,
            reader: Mutex::new(reader),
            tx: Mutex::new(Some(tx)),
            counters,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one row (with the header, stored as JSON, for `published` rows); the
    /// header is serialized by the writer thread, off the caller's path. Returns false when
    /// it was dropped because the writer is behind or the store is read-only.
    pub fn record(&self, row: Interaction, header: Option<Header>) -> bool {
        let guard = self.tx.lock();
        let sent = guard.as_ref().is_some_and(|tx| {
            match tx.try_send(Command::Row(Box::new((row, header)))) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
            }
        });
        if !sent {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("agentbus_store_dropped_total").increment(1);
        }
        sent
    }

    /// Waits until every row queued so far is committed (at most 10 s). Blocks the
    /// calling thread.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] when the writer does not answer in time;
    /// [`ErrorKind::Closed`] for a read-only or closed store.
    pub fn flush(&self) -> Result<()> {
        let tx = self.tx.lock().clone().ok_or_else(|| {
            Error::new(
                ErrorKind::Closed,
                "the interaction store is read-only or closed",
            )
        })?;
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        tx.send(Command::Flush(done_tx))
            .map_err(|_| Error::new(ErrorKind::Closed, "the store writer has stopped"))?;
        done_rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                "the interaction store did not commit within 10 s; the disk may be slow or full",
            )
        })
    }

    /// Commits what is queued and stops the writer.
    pub fn close(&self) {
        let _ = self.flush();
        drop(self.tx.lock().take());
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            written: self.counters.written.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            write_errors: self.counters.write_errors.load(Ordering::Relaxed),
        }
    }

    /// The rows `query` selects, oldest first (the newest `limit` of them).
    ///
    /// Seed 000's `get_message_log` is this with `events = ["published"]`.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] for database errors.
    pub fn query(&self, query: &Query) -> Result<Vec<Interaction>> {
        let mut sql = format!("SELECT {COLUMNS} FROM interactions WHERE 1=1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(agent) = &query.agent {
            sql.push_str(" AND (sender = ? OR receiver = ? OR agent = ?)");
            for _ in 0..3 {
                args.push(agent.clone().into());
            }
        }
        if let Some(correlation) = &query.correlation_id {
            sql.push_str(" AND correlation_id = ?");
            args.push(correlation.clone().into());
        }
        if let Some(kind) = &query.kind {
            sql.push_str(" AND kind = ?");
            args.push(kind.clone().into());
        }
        if !query.events.is_empty() {
            let marks = vec!["?"; query.events.len()].join(",");
            sql.push_str(&format!(" AND event IN ({marks})"));
            for event in &query.events {
                args.push(event.clone().into());
            }
        }
        if let Some(since) = query.since {
            sql.push_str(" AND at_ms >= ?");
            args.push(since.timestamp_millis().into());
        }
        if let Some(until) = query.until {
            sql.push_str(" AND at_ms < ?");
            args.push(until.timestamp_millis().into());
        }
        let limit = if query.limit == 0 { 1000 } else { query.limit };
        sql.push_str(&format!(" ORDER BY at_ms DESC, seq DESC LIMIT {limit}"));
        let reader = self.reader.lock();
        let mut statement = reader
            .prepare_cached(&sql)
            .map_err(|e| db_error(&self.path, "preparing a query", e))?;
        let rows = statement
            .query_map(params_from_iter(args), row_to_interaction)
            .map_err(|e| db_error(&self.path, "querying", e))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(|e| db_error(&self.path, "reading a row", e))?);
        }
        out.reverse();
        Ok(out)
    }

    /// Deletes every row older than `before` (retention); returns how many. Run it
    /// from a periodic task; it takes the database's write lock briefly, waiting up to
    /// 5 s for the writer thread.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] on a read-only store; [`ErrorKind::Backend`] for
    /// database errors.
    pub fn delete_before(&self, before: DateTime<Utc>) -> Result<u64> {
        if self.tx.lock().is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "this interaction store was opened read-only; open it with InteractionStore::open to delete rows",
            ));
        }
        let reader = self.reader.lock();
        let deleted = reader
            .execute(
                "DELETE FROM interactions WHERE at_ms < ?",
                [before.timestamp_millis()],
            )
            .map_err(|e| db_error(&self.path, "deleting old rows", e))?;
        Ok(deleted as u64)
    }

    /// The header of message `id` as recorded when it was published.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] for database errors.
    pub fn header(&self, message_id: &str) -> Result<Option<agentbus::Header>> {
        let reader = self.reader.lock();
        let text: Option<Option<String>> = reader
            .query_row(
                "SELECT header FROM interactions WHERE message_id = ? AND event = 'published' LIMIT 1",
                [message_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db_error(&self.path, "reading a header", e))?;
        Ok(text.flatten().and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// The timeline of thread `correlation`: one step per message, in order of
    /// creation, with who sent it, who handled it and how long until its ack.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] for database errors.
    pub fn timeline(&self, correlation: &str) -> Result<Vec<TimelineStep>> {
        let rows = self.query(&Query::new().correlation(correlation).limit(100_000))?;
        let mut steps: Vec<TimelineStep> = Vec::new();
        let mut index = std::collections::HashMap::<String, usize>::new();
        let mut receivers = std::collections::HashMap::<String, String>::new();
        for row in rows {
            if let (Some(receiver), "published") = (&row.receiver, row.event.as_str()) {
                receivers.insert(row.message_id.clone(), receiver.clone());
            }
            let i = *index.entry(row.message_id.clone()).or_insert_with(|| {
                steps.push(TimelineStep {
                    message_id: row.message_id.clone(),
                    kind: row.kind.clone(),
                    channel: row.channel.clone(),
                    from: row.sender.clone().unwrap_or_else(|| "?".into()),
                    to: Vec::new(),
                    sent_at: row.sent_at,
                    ack_ms: None,
                    outcome: row.event.clone(),
                    deliveries: 0,
                    error: None,
                    causation_id: row.causation_id.clone(),
                });
                steps.len() - 1
            });
            let step = &mut steps[i];
            match row.event.as_str() {
                "published" | "publish_failed" => {
                    if step.outcome == "published" || row.event == "publish_failed" {
                        step.outcome = row.event.clone();
                    }
                }
                other => {
                    if other == "delivered" {
                        step.deliveries += 1;
                    }
                    if other == "acked" && step.ack_ms.is_none() {
                        step.ack_ms = row.latency_ms;
                    }
                    let who = row.agent.clone().or(row.group.clone());
                    if let Some(who) = who {
                        if !step.to.contains(&who) {
                            step.to.push(who);
                        }
                    }
                    // Settlements win over deliveries; an ack wins over everything.
                    if step.outcome != "acked"
                        && (other != "delivered" || step.outcome == "published")
                    {
                        step.outcome = other.to_string();
                    }
                }
            }
            if row.error.is_some() {
                step.error = row.error.clone();
            }
        }
        for step in &mut steps {
            if step.to.is_empty() {
                if let Some(receiver) = receivers.remove(&step.message_id) {
                    step.to.push(receiver);
                }
            }
        }
        steps.sort_by_key(|a| a.sent_at);
        Ok(steps)
    }

    /// Seed 000's workflow status of thread `correlation`.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] for database errors.
    pub fn workflow_status(&self, correlation: &str) -> Result<WorkflowStatus> {
        let steps = self.timeline(correlation)?;
        let rows = self.query(&Query::new().correlation(correlation).limit(100_000))?;
        let mut agents: Vec<String> = Vec::new();
        for row in &rows {
            for who in [&row.sender, &row.agent].into_iter().flatten() {
                if !agents.contains(who) {
                    agents.push(who.clone());
                }
            }
        }
        let acked = steps.iter().filter(|s| s.outcome == "acked").count();
        let failed = steps
            .iter()
            .filter(|s| s.outcome == "rejected" || s.outcome == "publish_failed")
            .count();
        let pending = steps.len() - acked - failed;
        let status = if steps.is_empty() {
            "unknown"
        } else if pending > 0 {
            "running"
        } else if failed > 0 {
            "failed"
        } else {
            "completed"
        };
        Ok(WorkflowStatus {
            correlation_id: correlation.to_string(),
            status: status.into(),
            messages: steps.len(),
            acked,
            pending,
            failed,
            agents,
            first_at: rows.first().map(|r| r.at),
            last_at: rows.last().map(|r| r.at),
        })
    }
}

impl Drop for InteractionStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl BusObserver for InteractionStore {
    fn on_event(&self, event: &BusEvent<'_>) {
        let (row, header) = Interaction::from_event(event);
        self.record(row, header);
    }
}

fn millis_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn row_to_interaction(r: &rusqlite::Row<'_>) -> rusqlite::Result<Interaction> {
    Ok(Interaction {
        at: millis_to_time(r.get(0)?),
        event: r.get(1)?,
        message_id: r.get(2)?,
        channel: r.get(3)?,
        kind: r.get(4)?,
        sender: r.get(5)?,
        receiver: r.get(6)?,
        agent: r.get(7)?,
        group: r.get(8)?,
        correlation_id: r.get(9)?,
        causation_id: r.get(10)?,
        attempt: r.get(11)?,
        sent_at: millis_to_time(r.get(12)?),
        latency_ms: r.get(13)?,
        error: r.get(14)?,
        payload: r.get(15)?,
    })
}

fn write_loop(mut conn: Connection, rx: Receiver<Command>, counters: &Counters, path: &Path) {
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                Command::Row(row) => batch.push(row),
                Command::Flush(done) => flushes.push(done),
            }
            if batch.len() >= 4096 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match insert_batch(&mut conn, &batch) {
                Ok(()) => {
                    counters.written.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    counters.write_errors.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(error = %e, path = %path.display(), rows = n, "interaction rows not written");
                }
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn insert_batch(
    conn: &mut Connection,
    batch: &[Box<(Interaction, Option<Header>)>],
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut statement = tx.prepare_cached(&format!(
            "INSERT INTO interactions ({COLUMNS}, header) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        ))?;
        for row in batch {
            let (i, header) = &**row;
            let header = header.as_ref().and_then(|h| serde_json::to_string(h).ok());
            statement.execute(rusqlite::params![
                i.at.timestamp_millis(),
                i.event,
                i.message_id,
                i.channel,
                i.kind,
                i.sender,
                i.receiver,
                i.agent,
                i.group,
                i.correlation_id,
                i.causation_id,
                i.attempt,
                i.sent_at.timestamp_millis(),
                i.latency_ms,
                i.error,
                i.payload,
                header,
            ])?;
        }
    }
    tx.commit()
}
