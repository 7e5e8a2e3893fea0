//! The write-ahead log writer: one thread doing group commit.
//!
//! Callers append already-framed records to a shared buffer (under the engine's state
//! lock, so the log order is the order the state machine applied them) and get a
//! log sequence number (LSN). The writer thread takes everything buffered, writes it
//! with one `write` and — under [`FsyncPolicy::Always`] — one `fsync`, then publishes
//! the highest LSN now durable. While it syncs, new records pile up for the next
//! batch: many concurrent publishes, one write, one fsync.
//!
//! Any write or sync error is fatal: the writer records it, wakes every waiter with
//! the error and stops. It never retries a failed fsync (after a failed write-back
//! Linux marks the pages clean, so a second fsync would report success for data that
//! is not on disk). The engine refuses further work; reopening recovers from disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use agentbus::{Error, ErrorKind, Result};
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::options::FsyncPolicy;
use crate::segment::{segment_header, segment_name, SEGMENT_HEADER};
use crate::storage::{Storage, StorageFile};

/// What the writer has made durable (or why it stopped).
#[derive(Debug, Clone, Default)]
struct Durable {
    lsn: u64,
    failed: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Buffer {
    data: Vec<u8>,
    /// The LSN of the last append.
    lsn: u64,
    /// A requested segment boundary: the offset in `data` where the next segment must
    /// start, and who wants to know that segment's index.
    roll: Option<(usize, std::sync::mpsc::Sender<u64>)>,
    /// The LSN whose append wakes the writer (`u64::MAX`: it is busy and will look
    /// at the buffer anyway). Waking it on every append would cost a context switch
    /// per publish while it gathers a batch of hundreds.
    wake_at: u64,
    closing: bool,
    stopped: bool,
}

#[derive(Debug)]
struct WalShared {
    buffer: Mutex<Buffer>,
    wake: Condvar,
    durable: watch::Sender<Durable>,
    segments: AtomicU64,
    bytes: AtomicU64,
    syncs: AtomicU64,
    batches: AtomicU64,
}

/// The log writer's handle: append, wait for durability, close.
#[derive(Debug)]
pub(crate) struct Wal {
    shared: Arc<WalShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Where the writer continues: the last segment and its length of whole records.
#[derive(Debug)]
pub(crate) struct Tail {
    pub(crate) index: u64,
    pub(crate) file: Box<dyn StorageFile>,
    pub(crate) len: u64,
    /// Segments already on disk (counted in the statistics).
    pub(crate) segments: u64,
    /// Bytes already on disk.
    pub(crate) bytes: u64,
}

impl Wal {
    /// Starts the writer thread on `tail`.
    pub(crate) fn start(
        storage: Arc<dyn Storage>,
        tail: Tail,
        policy: FsyncPolicy,
        segment_bytes: u64,
    ) -> Result<Wal> {
        let (durable, _) = watch::channel(Durable::default());
        let shared = Arc::new(WalShared {
            buffer: Mutex::new(Buffer::default()),
            wake: Condvar::new(),
            durable,
            segments: AtomicU64::new(tail.segments),
            bytes: AtomicU64::new(tail.bytes),
            syncs: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        });
        let writer = Writer {
            shared: shared.clone(),
            storage,
            file: tail.file,
            index: tail.index,
            len: tail.len,
            policy,
            segment_bytes: segment_bytes.max(SEGMENT_HEADER as u64 + 1),
        };
        let thread = std::thread::Builder::new()
            .name("agentbus-wal".into())
            .spawn(move || writer.run())
            .map_err(|e| {
                Error::new(
                    ErrorKind::Backend,
                    format!("could not start the log writer thread: {e}"),
                )
            })?;
        Ok(Wal {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Appends framed records; returns the LSN to wait for.
    pub(crate) fn append(&self, records: &[u8]) -> u64 {
        let mut buffer = self.shared.buffer.lock();
        buffer.lsn += 1;
        buffer.data.extend_from_slice(records);
        if buffer.lsn >= buffer.wake_at {
            self.shared.wake.notify_one();
        }
        buffer.lsn
    }

    /// Asks for a segment boundary right after everything appended so far: the next
    /// append goes into a new segment (unless the current one holds no record yet).
    /// The receiver gets the index of the segment where the log continues once the
    /// boundary is written, or is dropped if the writer fails first. Call it under
    /// the same lock as `append`, with no other boundary outstanding.
    pub(crate) fn request_boundary(&self) -> std::sync::mpsc::Receiver<u64> {
        let (reply, receiver) = std::sync::mpsc::channel();
        let mut buffer = self.shared.buffer.lock();
        if buffer.stopped || buffer.closing {
            // No boundary will ever be written: the dropped sender says so.
            return receiver;
        }
        let at = buffer.data.len();
        buffer.roll = Some((at, reply));
        self.shared.wake.notify_one();
        receiver
    }

    /// Takes deleted segments out of the statistics.
    pub(crate) fn forget_segments(&self, segments: u64, bytes: u64) {
        self.shared.segments.fetch_sub(segments, Ordering::Relaxed);
        self.shared.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The error that stopped the writer, if any.
    pub(crate) fn failure(&self) -> Option<Arc<str>> {
        self.shared.durable.borrow().failed.clone()
    }

    /// Waits until everything up to `lsn` is as durable as the policy promises.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] (not temporary) when the writer failed first: the
    /// record may or may not be on disk.
    pub(crate) async fn wait(&self, lsn: u64) -> Result<()> {
        let mut rx = self.shared.durable.subscribe();
        let state = rx
            .wait_for(|d| d.lsn >= lsn || d.failed.is_some())
            .await
            .map(|d| d.clone())
            .unwrap_or_else(|_| Durable {
                lsn: 0,
                failed: Some("the log writer is gone".into()),
            });
        if state.lsn >= lsn {
            return Ok(());
        }
        Err(write_failed(state.failed.as_deref().unwrap_or("unknown")))
    }

    /// Flushes and syncs what is buffered, then stops the writer and waits for it.
    pub(crate) fn close(&self) {
        {
            let mut buffer = self.shared.buffer.lock();
            buffer.closing = true;
            self.shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }

    /// Whether the writer has stopped (closed or failed).
    pub(crate) fn stopped(&self) -> bool {
        self.shared.buffer.lock().stopped
    }

    /// Segment count, bytes, fsyncs and write batches so far.
    pub(crate) fn counters(&self) -> (u64, u64, u64, u64) {
        (
            self.shared.segments.load(Ordering::Relaxed),
            self.shared.bytes.load(Ordering::Relaxed),
            self.shared.syncs.load(Ordering::Relaxed),
            self.shared.batches.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

/// The longest a batch waits for more appends before its fsync.
const MAX_GATHER: std::time::Duration = std::time::Duration::from_millis(2);

/// The error every caller gets once the writer failed.
pub(crate) fn write_failed(why: &str) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!(
            "the durable log could not write or sync its data ({why}); the engine stopped \
             accepting work, and this operation may or may not be stored. Fix the disk \
             problem, then reopen the directory: recovery restores every acknowledged record"
        ),
    )
    .set_temporary(false)
}

struct Writer {
    shared: Arc<WalShared>,
    storage: Arc<dyn Storage>,
    file: Box<dyn StorageFile>,
    index: u64,
    len: u64,
    policy: FsyncPolicy,
    segment_bytes: u64,
}

impl Writer {
    fn run(mut self) {
        let mut dirty = false;
        let mut last_sync = Instant::now();
        // Group-commit gathering: the size of the last batch (in appends) and what
        // writing + syncing it cost.
        let mut taken_lsn = 0u64;
        let mut last_batch = 0u64;
        let mut batch_cost = std::time::Duration::ZERO;
        loop {
            let taken = {
                let mut buffer = self.shared.buffer.lock();
                loop {
                    if !buffer.data.is_empty() || buffer.closing || buffer.roll.is_some() {
                        break;
                    }
                    buffer.wake_at = buffer.lsn + 1;
                    match self.policy {
                        FsyncPolicy::Interval(every) if dirty => {
                            let left = every.saturating_sub(last_sync.elapsed());
                            if left.is_zero()
                                || self.shared.wake.wait_for(&mut buffer, left).timed_out()
                            {
                                break;
                            }
                        }
                        _ => self.shared.wake.wait(&mut buffer),
                    }
                }
                // The callers of the last batch are re-publishing right now: wait a
                // little (a quarter of the last batch's cost, at most 2 ms) for as many
                // appends as the last batch had, so one fsync serves them all instead
                // of one fsync for the first to arrive and another for the rest.
                if self.policy == FsyncPolicy::Always && !buffer.data.is_empty() {
                    let deadline = Instant::now() + (batch_cost / 4).min(MAX_GATHER);
                    buffer.wake_at = taken_lsn + last_batch;
                    while buffer.lsn - taken_lsn < last_batch && !buffer.closing {
                        let now = Instant::now();
                        if now >= deadline {
                            break;
                        }
                        self.shared.wake.wait_for(&mut buffer, deadline - now);
                    }
                }
                buffer.wake_at = u64::MAX;
                last_batch = buffer.lsn - taken_lsn;
                taken_lsn = buffer.lsn;
                (
                    std::mem::take(&mut buffer.data),
                    buffer.lsn,
                    buffer.closing,
                    buffer.roll.take(),
                )
            };
            let (data, lsn, closing, roll) = taken;
            let started = Instant::now();
            let (roll_at, reply) = match roll {
                Some((at, reply)) => (Some(at), Some(reply)),
                None => (None, None),
            };
            let written = self.write_batch(&data, roll_at, closing, &mut dirty, &mut last_sync);
            if !data.is_empty() {
                batch_cost = started.elapsed();
            }
            if let (Ok(Some(index)), Some(reply)) = (&written, reply) {
                // The checkpoint writer may have given up waiting; nothing to do then.
                let _ = reply.send(*index);
            }
            if let Err(e) = written {
                let message: Arc<str> = Arc::from(format!("{e}"));
                tracing::error!(error = %message, "durable log write failed; the engine stops");
                {
                    let mut buffer = self.shared.buffer.lock();
                    buffer.stopped = true;
                    buffer.roll = None;
                }
                self.shared
                    .durable
                    .send_modify(|d| d.failed = Some(message));
                return;
            }
            self.shared.durable.send_modify(|d| d.lsn = d.lsn.max(lsn));
            if closing {
                let mut buffer = self.shared.buffer.lock();
                if buffer.data.is_empty() && buffer.roll.is_none() {
                    buffer.stopped = true;
                    self.shared.durable.send_modify(|d| {
                        d.failed
                            .get_or_insert_with(|| "the engine was closed".into());
                    });
                    return;
                }
            }
        }
    }

    /// Writes a batch (with a segment boundary at `roll_at`, if asked for) and syncs
    /// as the policy says. Returns the segment the log continues in after the
    /// boundary, when there was one.
    fn write_batch(
        &mut self,
        data: &[u8],
        roll_at: Option<usize>,
        closing: bool,
        dirty: &mut bool,
        last_sync: &mut Instant,
    ) -> std::io::Result<Option<u64>> {
        let (before, after) = data.split_at(roll_at.unwrap_or(data.len()).min(data.len()));
        self.write_data(before, dirty)?;
        let continued_in = match roll_at {
            Some(_) => {
                if self.len > SEGMENT_HEADER as u64 {
                    self.roll()?;
                    *dirty = false;
                }
                Some(self.index)
            }
            None => None,
        };
        self.write_data(after, dirty)?;
        let sync = *dirty
            && match self.policy {
                FsyncPolicy::Always => true,
                FsyncPolicy::Interval(every) => closing || last_sync.elapsed() >= every,
                FsyncPolicy::Never => closing,
            };
        if sync {
            self.file.sync()?;
            self.shared.syncs.fetch_add(1, Ordering::Relaxed);
            *dirty = false;
            *last_sync = Instant::now();
        }
        Ok(continued_in)
    }

    fn write_data(&mut self, data: &[u8], dirty: &mut bool) -> std::io::Result<()> {
        if !data.is_empty() {
            if self.len + data.len() as u64 > self.segment_bytes && self.len > SEGMENT_HEADER as u64
            {
                self.roll()?;
                *dirty = false;
            }
            self.file.write_all(data)?;
            self.len += data.len() as u64;
            self.shared
                .bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            self.shared.batches.fetch_add(1, Ordering::Relaxed);
            *dirty = true;
        }
        Ok(())
    }

    /// Seals the current segment (synced whole) and starts the next one.
    fn roll(&mut self) -> std::io::Result<()> {
        self.file.sync()?;
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        let index = self.index + 1;
        let mut file = self.storage.create(&segment_name(index))?;
        file.write_all(&segment_header(index))?;
        file.sync()?;
        self.storage.sync_dir()?;
        self.file = file;
        self.index = index;
        self.len = SEGMENT_HEADER as u64;
        self.shared.segments.fetch_add(1, Ordering::Relaxed);
        self.shared
            .bytes
            .fetch_add(SEGMENT_HEADER as u64, Ordering::Relaxed);
        Ok(())
    }
}
