//! The durable log engine: the memory engine's state machine, journaled.
//!
//! Every call that changes the delivery state (`publish`, `join`, `take`, `settle`,
//! `fire_timers`, `leave`, configuration, group deletion, dead-letter replay and
//! purge) is applied to [`State`] and appended to the log as an [`Op`] *under the
//! same lock*, so the log order is the order of application. Opening replays the log
//! through a fresh `State`: the state machine is deterministic given each call's
//! arguments and `now`, so the replay rebuilds exactly the state the previous
//! process had after its last durable record. An `Open` record then makes every
//! member of the previous process leave, so its unsettled deliveries are redelivered.
//!
//! Callers of `publish`, settlements and the dead-letter operations wait for their
//! record to be as durable as the [`FsyncPolicy`] promises before they return
//! (settlements only when [`FileOptions::sync_settlements`] is on, the default).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use agentbus::engine_core::{take_or_wait, GroupId, MemberId, State, StateImage, Take, Wake};
use agentbus::{
    Capabilities, ChannelConfig, ChannelPattern, Consumer, DeadLetter, DeadLetterFilter, Delivery,
    DurabilityReport, EngineStats, Envelope, Error, ErrorKind, MessageId, PublishLimits,
    PublishReceipt, Result, Settlement, Settler, SharedClock, SubscribeOptions, Transport,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::checkpoint::{
    checkpoint_name, is_unfinished_checkpoint, list_checkpoints, read_checkpoint, retire,
    write_checkpoint,
};
use crate::codec::{encode_publish, write_frame, Op, PUBLISH_EXPECT_AT};
use crate::options::{FileOptions, FsyncPolicy};
use crate::repair::{quarantine, quarantine_checkpoint, RepairReport};
use crate::segment::{
    list_segments, scan, segment_header, segment_name, Damage, ReadAhead, ScanError, TornTail,
    SEGMENT_HEADER,
};
use crate::storage::{StdStorage, Storage};
use crate::wal::{write_failed, Tail, Wal};

/// The durable log engine behind `--backend file:DIR`.
///
/// # Examples
///
/// ```
/// use agentbus::{ChannelName, ChannelPattern, Envelope, SubscribeOptions, Transport};
/// use agentbus_file::{FileEngine, FileOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> agentbus::Result<()> {
/// let dir = tempfile::tempdir().unwrap();
/// let engine = FileEngine::open(dir.path(), FileOptions::default())?;
/// let mut consumer = engine
///     .subscribe(SubscribeOptions::new(ChannelPattern::new("jobs.>")?).group("workers"))
///     .await?;
/// let channel = ChannelName::new("jobs.resize")?;
/// // The receipt comes back once the record is fsynced.
/// engine.publish(Envelope::new(channel, "job", &b"{}"[..])).await?;
/// consumer.next_batch(1).await?.remove(0).ack().await?;
/// engine.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct FileEngine {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    wal: Wal,
    clock: SharedClock,
    limits: PublishLimits,
    policy: FsyncPolicy,
    sync_settlements: bool,
    closed: AtomicBool,
    timer_changed: Arc<Notify>,
    timer_task: OnceLock<()>,
    lock: Mutex<Option<File>>,
    location: String,
    recovery: Recovery,
    storage: Arc<dyn Storage>,
    /// The smallest amount of log between checkpoints (`None`: no checkpoints).
    checkpoint_bytes: Option<u64>,
    /// The size past which the writer starts a new segment.
    segment_roll_bytes: u64,
    checkpoints: Mutex<CheckpointStatus>,
    /// This engine, for the checkpoint thread to hold while it works.
    me: Weak<Shared>,
}

struct Inner {
    state: State,
    wakers: HashMap<GroupId, Arc<Notify>>,
    journal: Vec<u8>,
    scratch: Vec<u8>,
    /// Log bytes appended since the last checkpoint's boundary.
    since_checkpoint: u64,
    /// The log bytes after which the next checkpoint is due.
    checkpoint_due: u64,
    /// A checkpoint is being written (or the engine is closing: none may start).
    checkpoint_running: bool,
    /// The thread writing the last checkpoint; `close` waits for it. Spawned and
    /// stored under the state lock, so `close` cannot miss one that is starting.
    checkpoint_thread: Option<std::thread::JoinHandle<()>>,
}

/// What the checkpoints of this engine did so far (shown by `stats`).
#[derive(Debug, Clone, Default)]
struct CheckpointStatus {
    written: u64,
    /// The newest checkpoint's file and size.
    last: Option<(String, u64)>,
    last_took: std::time::Duration,
    segments_deleted: u64,
    bytes_deleted: u64,
    failures: u64,
    last_error: Option<String>,
}

/// What opening found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The checkpoint the state was loaded from, if any (its file name).
    pub checkpoint: Option<String>,
    /// Records replayed (after the checkpoint, if there was one).
    pub records: u64,
    /// Segments read (after the checkpoint, if there was one).
    pub segments: u64,
    /// A torn tail that was cut off, if any.
    pub torn: Option<TornTail>,
    /// What repair quarantined, when the engine was opened with `repair`.
    pub repaired: Option<RepairReport>,
    /// How long the replay took.
    pub elapsed: std::time::Duration,
}

impl fmt::Debug for FileEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileEngine")
            .field("dir", &self.shared.location)
            .field("fsync", &self.shared.policy)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("dir", &self.location)
            .finish_non_exhaustive()
    }
}

/// The name of the lock file in a data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Takes the directory's lock file, writing our PID into it.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            io_error(
                format!("could not open the lock file {}", path.display()),
                e,
            )
        })?;
    if fs4::FileExt::try_lock(&file).is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let holder = if holder.is_empty() { "unknown" } else { holder };
        return Err(Error::new(
            ErrorKind::DataDirLocked,
            format!(
                "the data directory {} is in use by another process (PID {holder}): two \
                 processes must never write one log. Stop that process, or use another \
                 directory",
                dir.display()
            ),
        )
        .with_context("dir", dir.display())
        .with_context("pid", holder));
    }
    let pid = std::process::id().to_string();
    let written = file
        .set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(pid.as_bytes()))
        .and_then(|_| file.flush());
    written.map_err(|e| io_error(format!("could not write {}", path.display()), e))?;
    Ok(file)
}

fn io_error(what: String, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Backend, format!("{what}: {e}"))
        .with_source(e)
        .set_temporary(false)
}

/// The error for damage found on open.
pub(crate) fn corrupt_error(location: &str, damage: &crate::segment::Damage) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "the log in {location} is damaged: {damage}. Nothing was skipped and nothing \
             was changed. Run `agentbus repair {location}` (or open with repair) to move the \
             damaged part aside; it reports exactly what is lost"
        ),
    )
    .with_context("file", &damage.file)
    .with_context("offset", damage.offset)
}

impl FileEngine {
    /// Opens (or creates) the log in `dir`: takes the lock file, replays the log,
    /// cuts a torn tail and starts the writer.
    ///
    /// # Errors
    /// [`ErrorKind::DataDirLocked`] naming the holder's PID when another process has
    /// the directory open; [`ErrorKind::Corrupt`] naming the file and offset when the
    /// log is damaged anywhere but a torn tail (unless `options.repair`);
    /// [`ErrorKind::Backend`] for I/O errors.
    pub fn open(dir: impl AsRef<Path>, options: FileOptions) -> Result<FileEngine> {
        let dir = dir.as_ref();
        let storage = StdStorage::new(dir).map_err(|e| {
            io_error(
                format!("could not create the data directory {}", dir.display()),
                e,
            )
        })?;
        let lock = lock_dir(dir)?;
        Self::open_inner(Arc::new(storage), options, Some(lock))
    }

    /// Opens the log kept in `storage` (no lock file: the caller guarantees a single
    /// writer). This is how tests run the engine on a fault-injecting file layer.
    ///
    /// # Errors
    /// As [`FileEngine::open`], without `DataDirLocked`.
    pub fn open_with_storage(
        storage: Arc<dyn Storage>,
        options: FileOptions,
    ) -> Result<FileEngine> {
        Self::open_inner(storage, options, None)
    }

    fn open_inner(
        storage: Arc<dyn Storage>,
        options: FileOptions,
        lock: Option<File>,
    ) -> Result<FileEngine> {
        let started = std::time::Instant::now();
        let location = storage.describe();
        let io = |what: String| move |e: std::io::Error| io_error(what, e);
        let scan_error = |e: ScanError| match e {
            ScanError::Damaged(damage) => corrupt_error(&location, &damage),
            ScanError::Rejected(damage) => Error::new(
                ErrorKind::Internal,
                format!(
                    "replaying the log in {location} diverged from what was journaled \
                     ({damage}); this is a bug in agentbus: please report it with the \
                     directory"
                ),
            ),
            ScanError::Io(what, e) => io_error(what, e),
        };
        // A checkpoint cut short by a crash never got its final name: drop it.
        for name in storage
            .list()
            .map_err(io(format!("could not list {location}")))?
        {
            if is_unfinished_checkpoint(&name) {
                storage
                    .remove(&name)
                    .map_err(io(format!("could not remove {name}")))?;
            }
        }
        let mut repaired = None;
        let load = |index: u64, name: &str| {
            read_checkpoint(&*storage, name, index).and_then(|image| {
                State::from_image(image).map_err(|e| {
                    ScanError::Damaged(Damage {
                        file: name.to_string(),
                        offset: 0,
                        what: e.message().to_string(),
                    })
                })
            })
        };
        // The segments after the checkpoint are read on a thread while the checkpoint
        // loads. A read-ahead that cannot start (its listing found damage) is left to
        // the plain scan below, which reports the damage or repairs it.
        let read_ahead = |from: u64| ReadAhead::start(storage.clone(), from).ok();
        let (mut base, from, checkpoint, mut ahead) = loop {
            let newest = list_checkpoints(&*storage).map_err(scan_error)?.pop();
            let Some((index, name)) = newest else {
                break (None, 1, None, read_ahead(1));
            };
            let ahead = read_ahead(index);
            match load(index, &name) {
                Ok(state) => break (Some(state), index, Some(name), ahead),
                Err(ScanError::Damaged(damage)) if options.repair && repaired.is_none() => {
                    repaired = Some(quarantine_checkpoint(&*storage, &damage).map_err(|e| {
                        io_error(format!("could not repair the log in {location}"), e)
                    })?);
                }
                Err(e) => return Err(scan_error(e)),
            }
        };
        let (state, found) = loop {
            // After a repair the scan starts over, from the checkpoint read afresh.
            let mut replay = match (base.take(), &checkpoint) {
                (Some(state), _) => Replay::with_state(state),
                (None, Some(name)) => Replay::with_state(load(from, name).map_err(scan_error)?),
                (None, None) => Replay::new(),
            };
            let scanned = match ahead.take() {
                Some(ahead) => ahead.scan(|op| replay.apply(op)),
                None => scan(&*storage, from, |op| replay.apply(op)),
            };
            match scanned {
                Ok(found) => break (replay.state, found),
                Err(ScanError::Damaged(damage)) if options.repair && repaired.is_none() => {
                    repaired = Some(quarantine(&*storage, &damage).map_err(|e| {
                        io_error(format!("could not repair the log in {location}"), e)
                    })?);
                }
                Err(e) => return Err(scan_error(e)),
            }
        };
        if let Some(name) = &found.empty_last {
            storage
                .remove(name)
                .map_err(io(format!("could not remove the empty segment {name}")))?;
        }
        if let Some(torn) = &found.torn {
            tracing::warn!(
                file = %torn.file,
                offset = torn.offset,
                dropped_bytes = torn.dropped_bytes,
                what = %torn.what,
                "the log ended in a torn tail (a write cut short by a crash); cut it off"
            );
            storage
                .truncate(&torn.file, torn.offset)
                .map_err(io(format!("could not truncate {}", torn.file)))?;
        }
        if from > 1 {
            // A crash between writing the newest checkpoint and deleting what it made
            // redundant leaves old files behind: finish that now.
            retire(&*storage, from).map_err(io(format!(
                "could not delete what {} made redundant",
                checkpoint_name(from)
            )))?;
        }
        let replayed_bytes: u64 = found.segments.iter().map(|s| s.valid_len).sum();
        let file = match found.segments.last() {
            Some(last) => storage
                .open_append(&last.name)
                .map_err(io(format!("could not open {}", last.name)))?,
            None => {
                let name = segment_name(from);
                let mut file = storage
                    .create(&name)
                    .map_err(io(format!("could not create {name}")))?;
                file.write_all(&segment_header(from))
                    .and_then(|_| file.sync())
                    .and_then(|_| storage.sync_dir())
                    .map_err(io(format!("could not write {name}")))?;
                file
            }
        };
        // Every segment file counts in the statistics, the ones a checkpoint covers too.
        let mut segments = 0;
        let mut bytes = 0;
        for (_, name) in list_segments(&*storage).map_err(scan_error)? {
            segments += 1;
            bytes += storage
                .size(&name)
                .map_err(io(format!("could not read the size of {name}")))?;
        }
        let tail = Tail {
            index: found.segments.last().map_or(from, |last| last.index),
            file,
            len: found
                .segments
                .last()
                .map_or(SEGMENT_HEADER as u64, |last| last.valid_len),
            segments,
            bytes,
        };
        let checkpoint_size = match &checkpoint {
            Some(name) => storage
                .size(name)
                .map_err(io(format!("could not read the size of {name}")))?,
            None => 0,
        };
        let wal = Wal::start(storage.clone(), tail, options.fsync, options.segment_bytes)?;
        let recovery = Recovery {
            checkpoint,
            records: found.records,
            segments: found.segments.len() as u64,
            torn: found.torn.clone(),
            repaired,
            elapsed: started.elapsed(),
        };
        let engine = FileEngine {
            shared: Arc::new_cyclic(|me| Shared {
                inner: Mutex::new(Inner {
                    state,
                    wakers: HashMap::new(),
                    journal: Vec::new(),
                    scratch: Vec::new(),
                    // A long replay makes the first checkpoint due at once.
                    since_checkpoint: replayed_bytes,
                    checkpoint_due: options
                        .checkpoint_bytes
                        .map_or(u64::MAX, |min| min.max(checkpoint_size)),
                    checkpoint_running: false,
                    checkpoint_thread: None,
                }),
                wal,
                clock: options.clock.clone(),
                limits: PublishLimits {
                    max_payload_bytes: options.max_payload_bytes,
                },
                policy: options.fsync,
                sync_settlements: options.sync_settlements,
                closed: AtomicBool::new(false),
                timer_changed: Arc::new(Notify::new()),
                timer_task: OnceLock::new(),
                lock: Mutex::new(lock),
                location,
                recovery,
                storage,
                checkpoint_bytes: options.checkpoint_bytes,
                segment_roll_bytes: options.segment_bytes,
                checkpoints: Mutex::new(CheckpointStatus::default()),
                me: me.clone(),
            }),
        };
        // The restart itself is a journaled step: members of the previous process
        // leave, so their unsettled deliveries are redelivered.
        let max_dead_letters = options.max_dead_letters as u64;
        let ((), lsn) = engine.shared.with_state(|state, now, wake, journal| {
            let op = Op::Open {
                now,
                max_dead_letters,
            };
            apply_open(state, max_dead_letters, wake);
            journal.push(&op);
        });
        engine.shared.wait_blocking(lsn)?;
        Ok(engine)
    }

    /// What opening found: records replayed, a torn tail cut off, a repair.
    pub fn recovery(&self) -> &Recovery {
        &self.shared.recovery
    }

    /// The engine's clock.
    pub fn clock(&self) -> SharedClock {
        self.shared.clock.clone()
    }

    fn ensure_timer_task(&self) {
        self.shared.timer_task.get_or_init(|| {
            let weak = Arc::downgrade(&self.shared);
            tokio::spawn(timer_loop(weak));
        });
    }
}

fn apply_open(state: &mut State, max_dead_letters: u64, wake: &mut Wake) {
    state.max_dead_letters = usize::try_from(max_dead_letters).unwrap_or(usize::MAX);
    state.deterministic_dead_ids = true;
    state.leave_all(wake);
}

/// Replays journaled ops through a fresh state machine, checking each outcome.
pub(crate) struct Replay {
    pub(crate) state: State,
    wake: Wake,
}

impl Replay {
    pub(crate) fn new() -> Self {
        let mut state = State::new();
        state.deterministic_dead_ids = true;
        Replay {
            state,
            wake: Wake::new(),
        }
    }

    /// Continues from a checkpoint's state.
    fn with_state(state: State) -> Self {
        Replay {
            state,
            wake: Wake::new(),
        }
    }

    /// Applies one op; `Err` says how the outcome differs from the journal's.
    pub(crate) fn apply(&mut self, op: Op) -> std::result::Result<(), String> {
        let state = &mut self.state;
        let wake = &mut self.wake;
        wake.clear();
        match op {
            Op::Open {
                max_dead_letters, ..
            } => apply_open(state, max_dead_letters, wake),
            Op::Publish {
                now,
                envelope,
                expect,
            } => {
                let got = state.publish(envelope, now, wake).map_or(0, |r| r.sequence);
                if got != expect {
                    return Err(format!(
                        "a publish got sequence {got} on replay, {expect} originally"
                    ));
                }
            }
            Op::Join { now, options } => {
                state
                    .join(&options, now)
                    .map_err(|e| format!("a subscription failed on replay: {e}"))?;
            }
            Op::Leave { group, member } => state.leave(group, member, wake),
            Op::Take {
                now,
                group,
                member,
                max,
                expect,
            } => {
                state.fire_timers(now, wake);
                let got = match state.take(group, member, max as usize, now) {
                    Ok(Take::Some(handouts, _)) => handouts.len() as u64,
                    Ok(_) | Err(_) => 0,
                };
                if got != expect {
                    return Err(format!(
                        "a take handed out {got} deliveries on replay, {expect} originally"
                    ));
                }
            }
            Op::Settle {
                now,
                group,
                key,
                settlement,
            } => {
                let _ = state.settle(group, key, settlement, now, wake);
            }
            Op::FireTimers { now } => state.fire_timers(now, wake),
            Op::Configure { pattern, config } => state.configure(pattern, config),
            Op::DeleteGroup { name } => {
                let _ = state.delete_group(&name);
            }
            Op::ReplayDeadLetter {
                now,
                id,
                new_id,
                expect,
            } => {
                let got =
                    replay_dead_letter(state, id, new_id, now, wake).map_or(0, |r| r.sequence);
                if got != expect {
                    return Err(format!(
                        "replaying dead letter {id} got sequence {got} on replay, {expect} originally"
                    ));
                }
            }
            Op::PurgeDeadLetters { filter } => {
                state.purge_dead_letters(&filter);
            }
        }
        Ok(())
    }
}

/// Takes a dead letter and publishes it again (new id, causation = the original,
/// no deadline or delay), putting it back if the publish fails. One state-machine
/// step, so it is one journal record: a crash never loses the letter half-way.
fn replay_dead_letter(
    state: &mut State,
    id: MessageId,
    new_id: MessageId,
    now: DateTime<Utc>,
    wake: &mut Wake,
) -> Result<PublishReceipt> {
    let letter = state.take_dead_letter(id)?;
    match state.publish(letter.replay_envelope(new_id), now, wake) {
        Ok(receipt) => Ok(receipt),
        Err(e) => {
            state.restore_dead_letter(letter);
            Err(e)
        }
    }
}

/// Framed records collected during one state step.
pub(crate) struct Journal<'a> {
    buf: &'a mut Vec<u8>,
    scratch: &'a mut Vec<u8>,
}

impl Journal<'_> {
    pub(crate) fn push(&mut self, op: &Op) {
        self.scratch.clear();
        op.encode(self.scratch);
        write_frame(self.buf, self.scratch);
    }
}

impl Shared {
    fn check_open(&self) -> Result<()> {
        if let Some(why) = self.wal.failure() {
            if !self.closed.load(Ordering::Acquire) {
                return Err(write_failed(&why));
            }
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!(
                    "the durable log engine on {} is closed: it was shut down; open the \
                     directory again to continue",
                    self.location
                ),
            ));
        }
        Ok(())
    }

    /// Runs `f` on the state under the lock, appends what it journaled to the log
    /// (still under the lock, so log order = apply order), then wakes groups and the
    /// timer task. Returns `f`'s result and the LSN to wait for (0: nothing written).
    fn with_state<T>(
        &self,
        f: impl FnOnce(&mut State, DateTime<Utc>, &mut Wake, &mut Journal<'_>) -> T,
    ) -> (T, u64) {
        let now = self.clock.now();
        let mut wake = Wake::new();
        let (result, lsn, notifies, timer_moved) = {
            let mut guard = self.inner.lock();
            let inner = &mut *guard;
            inner.journal.clear();
            let mut journal = Journal {
                buf: &mut inner.journal,
                scratch: &mut inner.scratch,
            };
            let result = f(&mut inner.state, now, &mut wake, &mut journal);
            let lsn = if inner.journal.is_empty() {
                0
            } else {
                self.wal.append(&inner.journal)
            };
            if lsn != 0 {
                self.checkpoint_if_due(inner);
            }
            let notifies: Vec<Arc<Notify>> = if wake.is_empty() {
                Vec::new()
            } else {
                wake.sort_unstable();
                wake.dedup();
                wake.iter()
                    .filter_map(|g| inner.wakers.get(g).cloned())
                    .collect()
            };
            let timer_moved = inner.state.take_timer_wake();
            (result, lsn, notifies, timer_moved)
        };
        for notify in notifies {
            notify.notify_waiters();
        }
        if timer_moved {
            self.timer_changed.notify_one();
        }
        (result, lsn)
    }

    /// Counts what was just appended and, when a checkpoint is due and none is being
    /// written, pictures the state and asks the writer for a segment boundary right
    /// after the records that state includes (both under the state lock, so the
    /// picture and the boundary match exactly), then starts the thread that writes it:
    /// encoding and syncing a large state takes a while, and the engine goes on.
    fn checkpoint_if_due(&self, inner: &mut Inner) {
        if self.checkpoint_bytes.is_none() {
            return;
        }
        inner.since_checkpoint += inner.journal.len() as u64;
        if inner.checkpoint_running || inner.since_checkpoint < inner.checkpoint_due {
            return;
        }
        let Some(shared) = self.me.upgrade() else {
            return;
        };
        let image = inner.state.image();
        let boundary = self.wal.request_boundary();
        let spawned = std::thread::Builder::new()
            .name("agentbus-checkpoint".into())
            .spawn(move || shared.write_checkpoint(image, boundary));
        match spawned {
            Ok(handle) => {
                inner.checkpoint_running = true;
                inner.since_checkpoint = 0;
                inner.checkpoint_thread = Some(handle);
            }
            // The boundary is still written (a segment ends early); the next append
            // tries again.
            Err(e) => tracing::warn!(error = %e, "could not start the checkpoint thread"),
        }
    }

    fn write_checkpoint(&self, image: StateImage, boundary: std::sync::mpsc::Receiver<u64>) {
        let started = std::time::Instant::now();
        let written = boundary
            .recv()
            .map_err(|_| "the log writer stopped before the checkpoint's boundary".to_string())
            .and_then(|index| {
                let name = checkpoint_name(index);
                let bytes = write_checkpoint(&*self.storage, index, &image)
                    .map_err(|e| format!("writing {name}: {e}"))?;
                Ok((index, name, bytes))
            });
        drop(image);
        let outcome = written.and_then(|(index, name, bytes)| {
            let retired = retire(&*self.storage, index)
                .map_err(|e| format!("deleting what {name} made redundant: {e}"))?;
            Ok((name, bytes, retired))
        });
        let took = started.elapsed();
        let next_due = match &outcome {
            Ok((name, bytes, retired)) => {
                self.wal
                    .forget_segments(retired.segments, retired.segment_bytes);
                let mut status = self.checkpoints.lock();
                status.written += 1;
                status.last = Some((name.clone(), *bytes));
                status.last_took = took;
                status.segments_deleted += retired.segments;
                status.bytes_deleted += retired.segment_bytes;
                tracing::debug!(checkpoint = %name, bytes, ?took, segments_deleted = retired.segments, "checkpoint written");
                *bytes
            }
            Err(_) => 0,
        };
        self.checkpoint_done(outcome.map(|_| ()), next_due);
    }

    /// Records the end of a checkpoint attempt; the next one is due after at least
    /// `checkpoint_bytes` of log, and never sooner than the log has grown by the size
    /// of the checkpoint just written (so checkpoints cost at most as much writing as
    /// the log itself).
    fn checkpoint_done(&self, outcome: std::result::Result<(), String>, size: u64) {
        if let Err(why) = outcome {
            if !self.closed.load(Ordering::Acquire) {
                tracing::warn!(error = %why, dir = %self.location, "a checkpoint failed; the log is complete without it and the next one will be tried later");
            }
            let mut status = self.checkpoints.lock();
            status.failures += 1;
            status.last_error = Some(why);
        }
        let mut inner = self.inner.lock();
        // A closing engine starts no further checkpoint.
        inner.checkpoint_running = self.closed.load(Ordering::Acquire);
        inner.checkpoint_due = self.checkpoint_bytes.map_or(u64::MAX, |min| min.max(size));
    }

    async fn wait(&self, lsn: u64) -> Result<()> {
        if lsn == 0 {
            return Ok(());
        }
        self.wal.wait(lsn).await
    }

    /// `wait` for synchronous callers (open): polls the writer on this thread.
    ///
    /// `unconstrained`: open may be called from inside a tokio task whose
    /// cooperative budget is spent; tokio's channels then answer every poll with
    /// "yield", and a nested executor, which never gives the thread back to the
    /// scheduler to refill the budget, would spin forever.
    fn wait_blocking(&self, lsn: u64) -> Result<()> {
        futures::executor::block_on(tokio::task::coop::unconstrained(self.wait(lsn)))
    }
}

/// `name (bytes), …` for `files` as listed, the middle elided past 16 of them (a log
/// with checkpoints off keeps every segment).
fn file_sizes(storage: &dyn Storage, files: &[(u64, String)]) -> String {
    const SHOWN_AT_EACH_END: usize = 8;
    let describe = |name: &String| match storage.size(name) {
        Ok(bytes) => format!("{name} ({bytes} B)"),
        Err(_) => format!("{name} (size unknown)"),
    };
    let elided = files.len().saturating_sub(2 * SHOWN_AT_EACH_END);
    let mut shown = Vec::with_capacity(files.len().min(2 * SHOWN_AT_EACH_END + 1));
    for (i, (_, name)) in files.iter().enumerate() {
        if i < SHOWN_AT_EACH_END || i >= SHOWN_AT_EACH_END + elided {
            shown.push(describe(name));
        } else if i == SHOWN_AT_EACH_END {
            shown.push(format!("… {elided} more …"));
        }
    }
    shown.join(", ")
}

async fn timer_loop(shared: Weak<Shared>) {
    loop {
        let (sleep, changed) = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if shared.closed.load(Ordering::Acquire) || shared.wal.stopped() {
                return;
            }
            let due = {
                let mut inner = shared.inner.lock();
                let due = inner.state.next_due();
                inner.state.timer_sleeping_until = due;
                inner.state.take_timer_wake();
                due
            };
            let sleep = match due {
                Some(due) => shared.clock.sleep_until(due),
                None => Box::pin(futures::future::pending()),
            };
            (sleep, shared.timer_changed.clone())
        };
        let timer_due = tokio::select! {
            _ = sleep => true,
            _ = changed.notified() => false,
        };
        if timer_due {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            shared.with_state(|state, now, wake, journal| {
                state.fire_timers(now, wake);
                journal.push(&Op::FireTimers { now });
            });
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.timer_changed.notify_one();
        self.wal.close();
    }
}

fn failed_batch(e: &Error, n: usize) -> Vec<Result<PublishReceipt>> {
    let message = e.message().to_string();
    (0..n)
        .map(|_| Err(Error::new(e.kind(), message.clone()).set_temporary(e.is_temporary())))
        .collect()
}

#[async_trait]
impl Transport for FileEngine {
    fn name(&self) -> &str {
        "file"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn publish(&self, envelope: Envelope) -> Result<PublishReceipt> {
        self.shared.check_open()?;
        self.shared
            .limits
            .check(&envelope, || self.shared.clock.now())?;
        let (result, lsn) = self.shared.with_state(|state, now, wake, journal| {
            publish_journaled(state, envelope, now, wake, journal)
        });
        self.shared.wait(lsn).await?;
        result
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Vec<Result<PublishReceipt>> {
        if let Err(e) = self.shared.check_open() {
            return failed_batch(&e, envelopes.len());
        }
        let limits = self.shared.limits;
        let n = envelopes.len();
        let (results, lsn) = self.shared.with_state(|state, now, wake, journal| {
            envelopes
                .into_iter()
                .map(|envelope| {
                    limits.check(&envelope, || now)?;
                    publish_journaled(state, envelope, now, wake, journal)
                })
                .collect::<Vec<_>>()
        });
        if let Err(e) = self.shared.wait(lsn).await {
            return failed_batch(&e, n);
        }
        results
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Consumer>> {
        self.shared.check_open()?;
        options.validate()?;
        self.ensure_timer_task();
        let (joined, lsn) = self.shared.with_state(|state, now, _, journal| {
            let joined = state.join(&options, now);
            if joined.is_ok() {
                journal.push(&Op::Join {
                    now,
                    options: options.clone(),
                });
            }
            joined
        });
        let (group, member, group_name) = joined?;
        self.shared.inner.lock().wakers.entry(group).or_default();
        self.shared.wait(lsn).await?;
        let settler = Arc::new(FileSettler {
            shared: self.shared.clone(),
            group,
        });
        Ok(Box::new(FileConsumer {
            shared: self.shared.clone(),
            group,
            member,
            group_name,
            settler,
        }))
    }

    async fn configure_channels(
        &self,
        pattern: ChannelPattern,
        config: ChannelConfig,
    ) -> Result<()> {
        self.shared.check_open()?;
        let ((), lsn) = self.shared.with_state(|state, _, _, journal| {
            journal.push(&Op::Configure {
                pattern: pattern.clone(),
                config: config.clone(),
            });
            state.configure(pattern, config);
        });
        self.shared.wait(lsn).await
    }

    async fn delete_group(&self, group: &str) -> Result<()> {
        self.shared.check_open()?;
        let (result, lsn) = self.shared.with_state(|state, _, _, journal| {
            let result = state.delete_group(group);
            if result.is_ok() {
                journal.push(&Op::DeleteGroup {
                    name: group.to_string(),
                });
            }
            result
        });
        self.shared.wait(lsn).await?;
        result
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>> {
        Ok(self.shared.inner.lock().state.dead_letters(&filter))
    }

    async fn dead_letter(&self, id: MessageId) -> Result<DeadLetter> {
        self.shared.inner.lock().state.dead_letter_by_id(id)
    }

    async fn replay_dead_letter(&self, id: MessageId) -> Result<PublishReceipt> {
        self.shared.check_open()?;
        let new_id = MessageId::new();
        let (result, lsn) = self.shared.with_state(|state, now, wake, journal| {
            let result = replay_dead_letter(state, id, new_id, now, wake);
            if !matches!(&result, Err(e) if e.kind() == ErrorKind::NotFound) {
                journal.push(&Op::ReplayDeadLetter {
                    now,
                    id,
                    new_id,
                    expect: result.as_ref().map_or(0, |r| r.sequence),
                });
            }
            result
        });
        self.shared.wait(lsn).await?;
        result
    }

    async fn purge_dead_letters(&self, filter: DeadLetterFilter) -> Result<u64> {
        self.shared.check_open()?;
        let (purged, lsn) = self.shared.with_state(|state, _, _, journal| {
            let purged = state.purge_dead_letters(&filter);
            if purged > 0 {
                journal.push(&Op::PurgeDeadLetters {
                    filter: filter.clone(),
                });
            }
            purged
        });
        self.shared.wait(lsn).await?;
        Ok(purged)
    }

    async fn stats(&self) -> Result<EngineStats> {
        let mut stats = self.shared.inner.lock().state.stats("file");
        let (segments, bytes, syncs, batches) = self.shared.wal.counters();
        let recovery = &self.shared.recovery;
        let mut details = BTreeMap::new();
        details.insert("fsync".to_string(), self.shared.policy.to_string());
        details.insert("data_dir".to_string(), self.shared.location.clone());
        details.insert("segments".to_string(), segments.to_string());
        details.insert("log_bytes".to_string(), bytes.to_string());
        details.insert(
            "segment_roll_bytes".to_string(),
            self.shared.segment_roll_bytes.to_string(),
        );
        details.insert("fsyncs".to_string(), syncs.to_string());
        details.insert("write_batches".to_string(), batches.to_string());
        details.insert(
            "recovered_records".to_string(),
            recovery.records.to_string(),
        );
        details.insert(
            "recovery_ms".to_string(),
            recovery.elapsed.as_millis().to_string(),
        );
        if let Some(name) = &recovery.checkpoint {
            details.insert("recovered_from_checkpoint".to_string(), name.clone());
        }
        details.insert(
            "checkpoint_every_bytes".to_string(),
            self.shared
                .checkpoint_bytes
                .map_or("off".to_string(), |b| b.to_string()),
        );
        details.insert(
            "log_bytes_since_checkpoint".to_string(),
            self.shared.inner.lock().since_checkpoint.to_string(),
        );
        {
            let status = self.shared.checkpoints.lock();
            details.insert(
                "checkpoints_written".to_string(),
                status.written.to_string(),
            );
            if let Some((name, bytes)) = &status.last {
                details.insert("last_checkpoint".to_string(), name.clone());
                details.insert("last_checkpoint_bytes".to_string(), bytes.to_string());
                details.insert(
                    "last_checkpoint_ms".to_string(),
                    status.last_took.as_millis().to_string(),
                );
            }
            details.insert(
                "segments_deleted".to_string(),
                status.segments_deleted.to_string(),
            );
            details.insert(
                "segment_bytes_deleted".to_string(),
                status.bytes_deleted.to_string(),
            );
            if let Some(error) = &status.last_error {
                details.insert(
                    "checkpoint_failures".to_string(),
                    status.failures.to_string(),
                );
                details.insert("last_checkpoint_error".to_string(), error.clone());
            }
        }
        let storage = &*self.shared.storage;
        if let Ok(segments) = list_segments(storage) {
            details.insert("segment_files".to_string(), file_sizes(storage, &segments));
        }
        if let Ok(checkpoints) = list_checkpoints(storage) {
            if !checkpoints.is_empty() {
                details.insert(
                    "checkpoint_files".to_string(),
                    file_sizes(storage, &checkpoints),
                );
            }
        }
        if let Some(torn) = &recovery.torn {
            details.insert(
                "torn_tail_cut".to_string(),
                format!(
                    "{} bytes at {} offset {} ({})",
                    torn.dropped_bytes, torn.file, torn.offset, torn.what
                ),
            );
        }
        if let Some(why) = self.shared.wal.failure() {
            if !self.shared.closed.load(Ordering::Acquire) {
                details.insert("failed".to_string(), why.to_string());
            }
        }
        stats.details = details;
        Ok(stats)
    }

    async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        let wakers: Vec<Arc<Notify>> = self.shared.inner.lock().wakers.values().cloned().collect();
        for w in wakers {
            w.notify_waiters();
        }
        self.shared.timer_changed.notify_one();
        self.shared.wal.close();
        // A checkpoint being written finishes first: it writes into the directory.
        // None starts after this.
        let checkpoint = {
            let mut inner = self.shared.inner.lock();
            inner.checkpoint_running = true;
            inner.checkpoint_thread.take()
        };
        if let Some(thread) = checkpoint {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            } else {
                let _ = thread.join();
            }
        }
        // Release the directory for the next process (or the next open in this one).
        self.shared.lock.lock().take();
        Ok(())
    }

    async fn durability(&self) -> Result<DurabilityReport> {
        let mut settings = BTreeMap::new();
        settings.insert("fsync".to_string(), self.shared.policy.to_string());
        settings.insert("data_dir".to_string(), self.shared.location.clone());
        let (guarantee, advice) = match self.shared.policy {
            FsyncPolicy::Always => (
                "A receipt means the message's record was fsynced to the log: it survives a \
                 crash of the process, of the kernel and a power loss (as far as the disk \
                 honours fsync). Acks and other settlements are synced the same way before \
                 they return."
                    .to_string(),
                Vec::new(),
            ),
            FsyncPolicy::Interval(d) => (
                format!(
                    "A receipt means the record was written to the operating system: it \
                     survives a crash of the process, but a kernel crash or power loss can \
                     lose up to {}ms of acknowledged messages and acks.",
                    d.as_millis()
                ),
                vec![
                    "Use fsync = always (the default) so a receipt survives power loss; \
                      group commit keeps its cost low with many concurrent publishers."
                        .to_string(),
                ],
            ),
            FsyncPolicy::Never => (
                "A receipt means the record was written to the operating system, which \
                 writes it back when it likes: it survives a crash of the process only; a \
                 kernel crash or power loss can lose any recent messages and acks."
                    .to_string(),
                vec![
                    "Use fsync = always (the default) or interval(ms) to bound the loss."
                        .to_string(),
                ],
            ),
        };
        Ok(DurabilityReport {
            engine: "file".to_string(),
            settings,
            guarantee,
            advice,
        })
    }
}

fn publish_journaled(
    state: &mut State,
    envelope: Envelope,
    now: DateTime<Utc>,
    wake: &mut Wake,
    journal: &mut Journal<'_>,
) -> Result<PublishReceipt> {
    // Encode first (the state machine takes the envelope), fill in the outcome after.
    journal.scratch.clear();
    encode_publish(journal.scratch, now, 0, &envelope);
    let result = state.publish(envelope, now, wake);
    let expect = result.as_ref().map_or(0, |r| r.sequence);
    journal.scratch[PUBLISH_EXPECT_AT..PUBLISH_EXPECT_AT + 8]
        .copy_from_slice(&expect.to_le_bytes());
    write_frame(journal.buf, journal.scratch);
    result
}

#[derive(Debug)]
struct FileSettler {
    shared: Arc<Shared>,
    group: GroupId,
}

#[async_trait]
impl Settler for FileSettler {
    async fn settle(&self, token: u64, settlement: Settlement) -> Result<()> {
        self.shared.check_open()?;
        let group = self.group;
        let (result, lsn) = self.shared.with_state(|state, now, wake, journal| {
            journal.push(&Op::Settle {
                now,
                group,
                key: token,
                settlement: settlement.clone(),
            });
            state.settle(group, token, settlement, now, wake)
        });
        if self.shared.sync_settlements {
            self.shared.wait(lsn).await?;
        }
        result
    }

    async fn settle_many(&self, batch: Vec<(u64, Settlement)>) -> Vec<Result<()>> {
        if let Err(e) = self.shared.check_open() {
            let message = e.message().to_string();
            return batch
                .iter()
                .map(|_| Err(Error::new(e.kind(), message.clone())))
                .collect();
        }
        let group = self.group;
        let n = batch.len();
        let (results, lsn) = self.shared.with_state(|state, now, wake, journal| {
            batch
                .into_iter()
                .map(|(token, settlement)| {
                    journal.push(&Op::Settle {
                        now,
                        group,
                        key: token,
                        settlement: settlement.clone(),
                    });
                    state.settle(group, token, settlement, now, wake)
                })
                .collect::<Vec<_>>()
        });
        let waited = if self.shared.sync_settlements {
            self.shared.wait(lsn).await
        } else {
            Ok(())
        };
        if let Err(e) = waited {
            let message = e.message().to_string();
            return (0..n)
                .map(|_| Err(Error::new(e.kind(), message.clone()).set_temporary(false)))
                .collect();
        }
        results
    }
}

struct FileConsumer {
    shared: Arc<Shared>,
    group: GroupId,
    member: MemberId,
    group_name: Arc<str>,
    settler: Arc<FileSettler>,
}

impl fmt::Debug for FileConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileConsumer")
            .field("group", &self.group_name)
            .field("member", &self.member)
            .finish()
    }
}

#[async_trait]
impl Consumer for FileConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        let (group, member) = (self.group, self.member);
        let settler: Arc<dyn Settler> = self.settler.clone();
        let shared = &self.shared;
        take_or_wait(
            &self.group_name,
            &settler,
            || {
                shared.check_open()?;
                Ok(shared.inner.lock().wakers.get(&group).cloned())
            },
            || {
                let (taken, _) = shared.with_state(|state, now, wake, journal| {
                    state.fire_timers(now, wake);
                    let taken = state.take(group, member, max, now);
                    let expect = match &taken {
                        Ok(Take::Some(handouts, _)) => handouts.len() as u64,
                        _ => 0,
                    };
                    journal.push(&Op::Take {
                        now,
                        group,
                        member,
                        max: max as u64,
                        expect,
                    });
                    taken
                });
                taken
            },
        )
        .await
    }

    fn group(&self) -> &str {
        &self.group_name
    }
}

impl Drop for FileConsumer {
    fn drop(&mut self) {
        if self.shared.wal.stopped() {
            return;
        }
        let (group, member) = (self.group, self.member);
        let (removed, _) = self.shared.with_state(|state, _, wake, journal| {
            state.leave(group, member, wake);
            journal.push(&Op::Leave { group, member });
            !state.has_group(group)
        });
        if removed {
            self.shared.inner.lock().wakers.remove(&group);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::file_sizes;
    use crate::storage::StdStorage;

    #[test]
    fn file_lists_past_sixteen_keep_eight_at_each_end() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f00"), b"abc").unwrap();
        let storage = StdStorage::new(dir.path()).unwrap();
        let files =
            |n: u64| -> Vec<(u64, String)> { (0..n).map(|i| (i, format!("f{i:02}"))).collect() };
        let all = file_sizes(&storage, &files(16));
        assert!(all.starts_with("f00 (3 B), f01 (size unknown), "), "{all}");
        assert_eq!(all.split(", ").count(), 16, "{all}");
        let elided = file_sizes(&storage, &files(20));
        let shown: Vec<&str> = elided.split(", ").collect();
        assert_eq!(shown.len(), 17, "{elided}");
        assert_eq!(shown[7], "f07 (size unknown)");
        assert_eq!(shown[8], "… 4 more …");
        assert_eq!(shown[9], "f12 (size unknown)");
        assert_eq!(shown[16], "f19 (size unknown)");
    }
}
