//! A subscription: the take loop, the blocking wait and settling.
//!
//! `next_batch` runs a take — the native `XREADGROUP` of `crate::fast` while the
//! consumer is busy, the `take` script (which hands out deliveries atomically, in
//! priority order, within the prefetch, with redeliveries) otherwise — in a spawned
//! task kept in the consumer, so a `next_batch` dropped halfway never loses what the
//! take handed out: the next call picks the finished task up. When nothing is ready it waits with a non-consuming
//! `XREAD BLOCK` on the group's streams, on a connection of its own, for at most
//! [`BLOCK_SLICE`] or until the next scheduled redelivery, then takes again.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    ChannelName, ChannelPattern, Consumer, DeadLetter, DeadReason, Delivery, Envelope, Error,
    ErrorKind, MessageId, Settlement, Settler, SubscribeOptions,
};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use rustc_hash::FxHashMap;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::fast::{run_native_take, NATIVE_MAX_CHANNELS};
use crate::util::{arr, bytes, int, lua_ms, millis, text};
use crate::{scripts, start_args, wire, Shared};

/// The longest a waiting consumer blocks before it looks again for new channels,
/// ack-wait expiries and due redeliveries.
pub const BLOCK_SLICE: Duration = Duration::from_millis(100);

/// Bounds of how often a busy consumer looks for deliveries whose ack wait expired
/// (a quarter of the group's ack wait, within these).
const SCAN_MIN: Duration = Duration::from_millis(10);
const SCAN_MAX: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct InFlight {
    stream: Arc<str>,
    id: String,
    envelope: Arc<Envelope>,
    /// The group's `claims` counter when it was taken (see `Sub::ack_held`); `None`
    /// when unknown, which makes its ack go entry by entry.
    claims: Option<u64>,
}

/// What one subscription shares with its deliveries: settles go through here.
pub(crate) struct Sub {
    pub(crate) shared: Arc<Shared>,
    pub(crate) group: Arc<str>,
    pub(crate) consumer: String,
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliveries: u32,
    prefetch: usize,
    /// Deliveries handed out and not settled, by token (tokens are a counter, so a
    /// fast non-cryptographic hash will do).
    in_flight: Mutex<FxHashMap<u64, InFlight>>,
    next_token: AtomicU64,
    settled: Notify,
    /// Deliveries of native takes not yet added to the group's `delivered` counter:
    /// the next take or ack of this subscription adds them in its own round trip
    /// (`crate::fast`).
    pub(crate) unreported: AtomicU64,
    /// The consumer's own connection for native takes and acks, once opened: acks
    /// then never queue behind publishes on the shared connection (as a raw client's
    /// consumer acks on its own connection). Never used for blocking waits.
    pub(crate) reader: Mutex<Option<MultiplexedConnection>>,
}

impl fmt::Debug for Sub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettler")
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .finish()
    }
}

fn already_settled(why: &str) -> Error {
    Error::new(
        ErrorKind::AlreadySettled,
        format!("this delivery can no longer be settled: {why}"),
    )
}

impl Sub {
    pub(crate) fn prefix(&self) -> &str {
        self.shared.prefix()
    }

    /// Dead-letters an entry this consumer holds; false when it was no longer pending.
    async fn dead_letter(
        &self,
        stream: &str,
        id: &str,
        envelope: &Envelope,
        reason: DeadReason,
        attempts: u32,
        last_error: Option<String>,
    ) -> agentbus::Result<bool> {
        let mut envelope = envelope.clone();
        envelope.header.attempt = attempts;
        let letter = DeadLetter {
            id: MessageId::new(),
            envelope,
            group: self.group.to_string(),
            reason: reason.clone(),
            attempts,
            last_error,
            dead_at: Utc::now(),
        };
        let json = serde_json::to_vec(&letter).map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("could not encode a dead letter: {e}"),
            )
        })?;
        let mut inv = scripts::SETTLE.prepare_invoke();
        inv.arg(self.prefix())
            .arg(&*self.group)
            .arg("dead")
            .arg(stream)
            .arg(id)
            .arg(letter.id.to_string())
            .arg(letter.envelope.channel.as_str())
            .arg(reason.as_str())
            .arg(json)
            .arg(if reason == DeadReason::Expired {
                "1"
            } else {
                "0"
            });
        let done: i64 = inv
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(|e| self.shared.err("dead-letter", e))?;
        Ok(done == 1)
    }

    async fn recorded_error(&self, stream: &str, id: &str) -> Option<String> {
        let mut inv = scripts::ADMIN.prepare_invoke();
        inv.arg(self.prefix())
            .arg("error")
            .arg(&*self.group)
            .arg(stream)
            .arg(id);
        let v: Value = inv.invoke_async(&mut self.shared.conn()).await.ok()?;
        bytes(&v).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    fn take_in_flight(&self, token: u64) -> agentbus::Result<InFlight> {
        let entry = self.in_flight.lock().remove(&token);
        self.settled.notify_waiters();
        entry.ok_or_else(|| already_settled("this subscription does not hold it"))
    }
}

#[async_trait]
impl Settler for Sub {
    async fn settle(&self, token: u64, settlement: Settlement) -> agentbus::Result<()> {
        let entry = self.take_in_flight(token)?;
        let attempt = entry.envelope.header.attempt;
        match settlement {
            Settlement::Ack => {
                let done = self
                    .ack_held(&[(&*entry.stream, entry.id.as_str(), entry.claims, attempt)])
                    .await
                    .map_err(|e| self.shared.err("XACK", e))?;
                if done.first() != Some(&true) {
                    return Err(already_settled(
                        "the group no longer holds it unsettled (acked elsewhere or dead-lettered)",
                    ));
                }
                Ok(())
            }
            Settlement::Nack { delay, error } => {
                if attempt >= self.max_deliveries {
                    let last = match error {
                        Some(e) => Some(e),
                        None => self.recorded_error(&entry.stream, &entry.id).await,
                    }
                    .or_else(|| Some(format!("not acked after {attempt} deliveries")));
                    let done = self
                        .dead_letter(
                            &entry.stream,
                            &entry.id,
                            &entry.envelope,
                            DeadReason::MaxDeliveries,
                            attempt,
                            last,
                        )
                        .await?;
                    return if done {
                        Ok(())
                    } else {
                        Err(already_settled("the group no longer holds it unsettled"))
                    };
                }
                let due = millis(Utc::now()) + lua_ms(delay) as i64;
                let mut inv = scripts::SETTLE.prepare_invoke();
                inv.arg(self.prefix())
                    .arg(&*self.group)
                    .arg("nack")
                    .arg(&*entry.stream)
                    .arg(&entry.id)
                    .arg(due)
                    .arg(error.unwrap_or_default());
                let done: i64 = inv
                    .invoke_async(&mut self.shared.conn())
                    .await
                    .map_err(|e| self.shared.err("nack", e))?;
                if done != 1 {
                    return Err(already_settled("the group no longer holds it unsettled"));
                }
                Ok(())
            }
            Settlement::Reject { reason, error } => {
                let done = self
                    .dead_letter(
                        &entry.stream,
                        &entry.id,
                        &entry.envelope,
                        reason,
                        attempt,
                        Some(error),
                    )
                    .await?;
                if done {
                    Ok(())
                } else {
                    Err(already_settled("the group no longer holds it unsettled"))
                }
            }
        }
    }

    async fn settle_many(&self, batch: Vec<(u64, Settlement)>) -> Vec<agentbus::Result<()>> {
        if !batch.iter().all(|(_, s)| *s == Settlement::Ack) {
            let mut results = Vec::with_capacity(batch.len());
            for (token, settlement) in batch {
                results.push(self.settle(token, settlement).await);
            }
            return results;
        }
        // All acks: one lock and one wake-up for the whole batch, one ack call.
        let entries: Vec<agentbus::Result<InFlight>> = {
            let mut held = self.in_flight.lock();
            batch
                .iter()
                .map(|(token, _)| {
                    held.remove(token)
                        .ok_or_else(|| already_settled("this subscription does not hold it"))
                })
                .collect()
        };
        self.settled.notify_waiters();
        let held: Vec<(&str, &str, Option<u64>, u32)> = entries
            .iter()
            .flatten()
            .map(|e| {
                (
                    &*e.stream,
                    e.id.as_str(),
                    e.claims,
                    e.envelope.header.attempt,
                )
            })
            .collect();
        let done = self.ack_held(&held).await;
        let mut done = match done {
            Ok(done) => done.into_iter(),
            Err(e) => {
                let error = self.shared.err("XACK", e);
                let (kind, message) = (error.kind(), error.message().to_string());
                return entries
                    .iter()
                    .map(|_| Err(Error::new(kind, message.clone()).set_temporary(true)))
                    .collect();
            }
        };
        entries
            .into_iter()
            .map(|entry| {
                entry?;
                if done.next() == Some(true) {
                    Ok(())
                } else {
                    Err(already_settled(
                        "the group no longer holds it unsettled (acked elsewhere or dead-lettered)",
                    ))
                }
            })
            .collect()
    }
}

/// One item handed out by the take script.
pub(crate) struct Taken {
    pub(crate) stream: Arc<str>,
    pub(crate) id: String,
    pub(crate) count: u32,
    pub(crate) sequence: u64,
    pub(crate) envelope: Envelope,
}

/// What one run of the take script produced, dead letters already written.
pub(crate) struct TakeResult {
    pub(crate) gone: bool,
    pub(crate) chver: String,
    pub(crate) next_due: Option<i64>,
    pub(crate) deliver: Vec<Taken>,
    /// The last entry id of every stream (script takes that found nothing): where a
    /// non-consuming `XREAD BLOCK` waits from.
    pub(crate) last_ids: Vec<(String, String)>,
    /// A native take found work only the script does (due redeliveries, a group it
    /// cannot read): take with the script next, without waiting.
    pub(crate) script_needed: bool,
    /// The group's `claims` counter read with the take (see `Sub::ack_held`).
    pub(crate) claims: Option<u64>,
}

/// What the take script (or a native read) says to do with an entry now held by
/// this consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ItemKind {
    /// Hand it out.
    Deliver,
    /// Its deadline passed: dead-letter it `expired`.
    Expired,
    /// Its deliveries are used up: dead-letter it `max_deliveries`.
    Maxed,
}

/// One stream entry as read from the server, before it becomes an envelope.
pub(crate) struct Item {
    pub(crate) stream: Arc<str>,
    pub(crate) id: String,
    pub(crate) count: u32,
    /// The `m` field: binary header and payload (`crate::wire`).
    pub(crate) message: Option<Bytes>,
    /// The channel of the stream; `None` when its name is not a valid channel.
    pub(crate) channel: Option<ChannelName>,
}

/// The channel sequence of an entry: the second part of its id `<ms>-<seq>`, which
/// the publish script sets (`publish.lua`).
fn sequence_of(id: &str) -> u64 {
    id.split_once('-')
        .and_then(|(_, seq)| seq.parse().ok())
        .unwrap_or(0)
}

/// Turns an entry into a delivery (pushed on `deliver`) or writes its dead letter.
pub(crate) async fn sort_item(
    sub: &Sub,
    kind: ItemKind,
    item: Item,
    deliver: &mut Vec<Taken>,
) -> agentbus::Result<()> {
    let Item {
        stream,
        id,
        count,
        message,
        channel,
    } = item;
    let decoded = message
        .as_ref()
        .ok_or(wire::WireError::Empty)
        .and_then(wire::decode);
    let envelope = match (decoded, channel) {
        (Ok((header, payload)), Some(channel)) => Envelope {
            channel,
            header,
            payload,
        },
        (decoded, _) => {
            // Not written by this version of agentbus (or damaged): it cannot be
            // delivered or dead-lettered as an envelope. Ack it away loudly.
            tracing::error!(
                stream = %stream, entry = %id,
                "dropping a stream entry that is not an agentbus message: {}",
                decoded.err().map_or_else(|| "its stream is not a channel".to_string(), |e| e.to_string())
            );
            let _ = sub.ack_entries(&[(&*stream, id.as_str())]).await;
            return Ok(());
        }
    };
    let sequence = sequence_of(&id);
    match kind {
        ItemKind::Deliver => deliver.push(Taken {
            stream,
            id,
            count,
            sequence,
            envelope,
        }),
        ItemKind::Expired => {
            let attempts = count.saturating_sub(1);
            let deadline = envelope
                .header
                .deadline
                .map_or_else(String::new, |d| d.to_string());
            let last = if attempts > 0 {
                sub.recorded_error(&stream, &id).await
            } else {
                None
            }
            .or_else(|| Some(format!("deadline {deadline} passed before delivery")));
            sub.dead_letter(&stream, &id, &envelope, DeadReason::Expired, attempts, last)
                .await?;
        }
        ItemKind::Maxed => {
            let attempts = count.saturating_sub(1);
            let last = sub.recorded_error(&stream, &id).await.or_else(|| {
                Some(format!(
                    "ack_wait of {:?} expired without a settlement",
                    sub.ack_wait
                ))
            });
            sub.dead_letter(
                &stream,
                &id,
                &envelope,
                DeadReason::MaxDeliveries,
                attempts,
                last,
            )
            .await?;
        }
    }
    Ok(())
}

/// Runs the take script and dead-letters what it reports as expired or used up.
async fn run_take(
    sub: Arc<Sub>,
    channels: Arc<Vec<String>>,
    room: usize,
    mode: ScriptMode,
) -> agentbus::Result<TakeResult> {
    let now = millis(Utc::now());
    let mut inv = scripts::TAKE.prepare_invoke();
    inv.arg(sub.prefix())
        .arg(&*sub.group)
        .arg(&sub.consumer)
        .arg(room)
        .arg(now)
        .arg(lua_ms(sub.ack_wait))
        .arg(sub.max_deliveries)
        .arg(match mode {
            ScriptMode::Take => "0",
            ScriptMode::TakeAndScan => "1",
            ScriptMode::ScanOnly => "2",
        });
    for channel in channels.iter() {
        inv.arg(channel);
    }
    let reply: Value = inv
        .invoke_async(&mut sub.shared.conn())
        .await
        .map_err(|e| sub.shared.err("take (XREADGROUP/XCLAIM)", e))?;
    let parts = arr(&reply);
    if parts.first().map(text).as_deref() == Some("gone") {
        return Ok(TakeResult {
            gone: true,
            chver: String::new(),
            next_due: None,
            deliver: Vec::new(),
            last_ids: Vec::new(),
            script_needed: false,
            claims: None,
        });
    }
    let chver = parts.get(1).map(text).unwrap_or_default();
    let next_due = parts
        .get(2)
        .map(text)
        .and_then(|t| t.parse::<f64>().ok())
        .map(|f| f as i64);
    let mut deliver = Vec::new();
    // Stream name → channel, resolved once per stream.
    let mut names: Vec<(Arc<str>, Option<ChannelName>)> = Vec::new();
    let prefix_len = sub.prefix().len() + 3;
    for item in parts.get(3).map(arr).unwrap_or(&[]) {
        let fields = arr(item);
        if fields.len() < 5 {
            continue;
        }
        let stream_bytes = bytes(&fields[1]).unwrap_or_default();
        let (stream, channel) = match names.iter().find(|(s, _)| s.as_bytes() == stream_bytes) {
            Some((s, c)) => (s.clone(), c.clone()),
            None => {
                let stream: Arc<str> = Arc::from(text(&fields[1]));
                let channel = stream
                    .get(prefix_len..stream.len().saturating_sub(2))
                    .and_then(|c| ChannelName::new(c).ok());
                names.push((stream.clone(), channel.clone()));
                (stream, channel)
            }
        };
        let item = Item {
            stream,
            id: text(&fields[2]),
            count: int(&fields[3]).max(0) as u32,
            message: bytes(&fields[4]).map(Bytes::copy_from_slice),
            channel,
        };
        let kind = match text(&fields[0]).as_str() {
            "deliver" => ItemKind::Deliver,
            "expired" => ItemKind::Expired,
            _ => ItemKind::Maxed,
        };
        sort_item(&sub, kind, item, &mut deliver).await?;
    }
    let last = parts.get(4).map(arr).unwrap_or(&[]);
    let last_ids = last
        .chunks(2)
        .filter_map(|pair| match pair {
            [k, v] => Some((text(k), text(v))),
            _ => None,
        })
        .collect();
    Ok(TakeResult {
        gone: false,
        chver,
        next_due,
        deliver,
        last_ids,
        script_needed: false,
        claims: parts.get(5).and_then(|c| text(c).parse().ok()),
    })
}

/// How long a private group outlives its last sign of life: a process that dies
/// without unsubscribing leaves a private group behind, which any live consumer
/// deletes once this lease ran out (so it stops counting as a responder and stops
/// holding back retention).
pub(crate) const PRIVATE_LEASE: Duration = Duration::from_secs(30);
const LEASE_RENEWAL: Duration = Duration::from_secs(10);

/// Renews a private group's lease and sweeps away private groups of dead processes,
/// until the subscription is dropped.
async fn keep_alive(
    sub: Arc<Sub>,
    ephemeral: bool,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let mut inv = scripts::ADMIN.prepare_invoke();
        inv.arg(sub.prefix()).arg("sweep");
        let swept: redis::RedisResult<i64> = inv.invoke_async(&mut sub.shared.conn()).await;
        if let Ok(n) = swept.as_ref() {
            if *n > 0 {
                tracing::info!("deleted {n} private groups whose processes stopped renewing them");
            }
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(LEASE_RENEWAL) => {}
        }
        if ephemeral {
            let mut inv = scripts::ADMIN.prepare_invoke();
            inv.arg(sub.prefix())
                .arg("lease")
                .arg(&*sub.group)
                .arg(PRIVATE_LEASE.as_millis() as u64);
            let renewed: redis::RedisResult<i64> = inv.invoke_async(&mut sub.shared.conn()).await;
            if let Err(e) = renewed {
                tracing::warn!(group = %sub.group, "could not renew a private group's lease: {e}");
            }
        }
    }
}

/// A live subscription on Redis.
pub(crate) struct RedisConsumer {
    sub: Arc<Sub>,
    /// Dropping it ends the keep-alive task.
    _keeper: tokio::sync::oneshot::Sender<()>,
    pattern: ChannelPattern,
    channels: Arc<Vec<String>>,
    chver: Option<String>,
    take: Option<JoinHandle<agentbus::Result<TakeResult>>>,
    waiter: Option<MultiplexedConnection>,
    /// The own connection of native takes (and, through `Sub::reader`, of acks).
    reader: Option<MultiplexedConnection>,
    last_ids: Vec<(String, String)>,
    next_due: Option<i64>,
    /// When the take script last looked for deliveries whose ack wait expired.
    last_scan: Option<Instant>,
    /// How the running (or last) take was made.
    take_kind: TakeKind,
    /// A native take found work for the script (due redeliveries, entries handed
    /// back): the next take runs the script.
    script_next: bool,
    /// A native take found nothing: the next take is a [`ScriptMode::ScanOnly`] one.
    scan_only_next: bool,
}

/// What a script take does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScriptMode {
    /// Due parked entries and new entries.
    Take,
    /// That, and deliveries whose ack wait expired.
    TakeAndScan,
    /// Due parked entries and expired deliveries, but no new entries: a native take
    /// just found none, and the next native take reads them (a script take copies
    /// every entry through Lua, several times the cost of a native read).
    ScanOnly,
}

/// How a take is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TakeKind {
    /// The `take` script: redeliveries, expiries, due parked entries, new entries.
    Script,
    /// A plain `XREADGROUP` of new entries (`crate::fast`). Never blocking: a read
    /// that consumed entries while its `next_batch` was dropped would hold them,
    /// unseen, until the next call (their ack wait and deadlines running); the idle
    /// wait is a non-consuming `XREAD BLOCK` instead.
    Native,
}

impl fmt::Debug for RedisConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConsumer")
            .field("group", &self.sub.group)
            .field("consumer", &self.sub.consumer)
            .field("pattern", &self.pattern)
            .field("channels", &self.channels.len())
            .finish()
    }
}

impl RedisConsumer {
    pub(crate) async fn join(
        shared: Arc<Shared>,
        options: SubscribeOptions,
    ) -> agentbus::Result<Self> {
        let (group, ephemeral) = match &options.group {
            Some(g) => (g.clone(), false),
            None => (format!("_private-{}", uuid::Uuid::new_v4().simple()), true),
        };
        let consumer = format!("c-{}", uuid::Uuid::new_v4().simple());
        let (kind, value) = start_args(options.start);
        let mut inv = scripts::JOIN.prepare_invoke();
        inv.arg(shared.prefix())
            .arg(&group)
            .arg(options.pattern.as_str())
            .arg(if ephemeral { "1" } else { "0" })
            .arg(lua_ms(options.ack_wait))
            .arg(options.max_deliveries)
            .arg(kind)
            .arg(value)
            .arg(&consumer)
            .arg(PRIVATE_LEASE.as_millis() as u64);
        let reply: Value = inv
            .invoke_async(&mut shared.conn())
            .await
            .map_err(|e| shared.err("join group", e))?;
        let parts = arr(&reply);
        if parts.first().map(text).as_deref() == Some("pattern") {
            let existing = parts.get(1).map(text).unwrap_or_default();
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "group '{group}' already exists with pattern '{existing}', not '{}': use \
                     another group name, or the same pattern",
                    options.pattern
                ),
            ));
        }
        let ack_wait = parts
            .get(1)
            .map(int)
            .filter(|n| *n > 0)
            .map_or(options.ack_wait, |n| Duration::from_millis(n as u64));
        let max_deliveries = parts
            .get(2)
            .map(int)
            .filter(|n| *n > 0)
            .map_or(options.max_deliveries, |n| n as u32);
        let sub = Arc::new(Sub {
            shared,
            group: Arc::from(group),
            consumer,
            ack_wait,
            max_deliveries,
            prefetch: options.prefetch,
            in_flight: Mutex::new(FxHashMap::default()),
            next_token: AtomicU64::new(1),
            settled: Notify::new(),
            unreported: AtomicU64::new(0),
            reader: Mutex::new(None),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(keep_alive(sub.clone(), ephemeral, stopped));
        Ok(RedisConsumer {
            sub,
            _keeper: stop,
            pattern: options.pattern,
            channels: Arc::new(Vec::new()),
            chver: None,
            take: None,
            waiter: None,
            reader: None,
            last_ids: Vec::new(),
            next_due: None,
            last_scan: None,
            take_kind: TakeKind::Script,
            script_next: false,
            scan_only_next: false,
        })
    }

    async fn refresh_channels(&mut self) -> agentbus::Result<()> {
        let shared = &self.sub.shared;
        let mut conn = shared.conn();
        let (version, names): (Option<String>, Vec<String>) = redis::pipe()
            .cmd("GET")
            .arg(format!("{}:chver", shared.prefix()))
            .cmd("SMEMBERS")
            .arg(format!("{}:channels", shared.prefix()))
            .query_async(&mut conn)
            .await
            .map_err(|e| shared.err("SMEMBERS channels", e))?;
        let mut channels: Vec<String> = names
            .into_iter()
            .filter(|n| ChannelName::new(n.as_str()).is_ok_and(|c| self.pattern.matches(&c)))
            .collect();
        channels.sort();
        self.channels = Arc::new(channels);
        self.chver = Some(version.unwrap_or_else(|| "0".into()));
        Ok(())
    }

    /// Blocks until a stream of the group may have something, the next scheduled
    /// redelivery is due, or [`BLOCK_SLICE`] passed.
    async fn wait(&mut self) -> agentbus::Result<()> {
        let slice = self.slice();
        if self.last_ids.is_empty() {
            tokio::time::sleep(slice).await;
            return Ok(());
        }
        let Some(mut conn) = self.waiter().await else {
            tokio::time::sleep(slice).await;
            return Ok(());
        };
        let conn = &mut conn;
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(slice.as_millis().max(1) as u64)
            .arg("STREAMS");
        for (stream, _) in &self.last_ids {
            cmd.arg(stream);
        }
        for (_, id) in &self.last_ids {
            cmd.arg(id);
        }
        let result: redis::RedisResult<Value> = cmd.query_async(conn).await;
        if let Err(e) = result {
            tracing::debug!("redis consumer wait failed, reconnecting: {e}");
            self.waiter = None;
            tokio::time::sleep(slice).await;
        }
        Ok(())
    }

    /// How long one wait may block: [`BLOCK_SLICE`], or less when a parked entry is
    /// due sooner.
    fn slice(&self) -> Duration {
        let mut slice = BLOCK_SLICE;
        if let Some(due) = self.next_due {
            let until = due - millis(Utc::now());
            slice = slice.min(Duration::from_millis(until.max(1) as u64));
        }
        slice
    }

    /// The consumer's own connection for the blocking wait (opened on first use);
    /// `None` when it cannot be opened now.
    async fn waiter(&mut self) -> Option<MultiplexedConnection> {
        if self.waiter.is_none() {
            self.waiter = self.open(BLOCK_SLICE, "wait").await;
        }
        self.waiter.clone()
    }

    /// The consumer's own connection for native takes and acks (opened on first use);
    /// `None` when it cannot be opened now (the shared connection serves then).
    async fn reader(&mut self) -> Option<MultiplexedConnection> {
        if self.reader.is_some() && self.sub.reader.lock().is_none() {
            // An ack lost it (`Sub::ack_failed`): start afresh.
            self.reader = None;
        }
        if self.reader.is_none() {
            self.reader = self.open(Duration::ZERO, "read").await;
            self.sub.reader.lock().clone_from(&self.reader);
        }
        self.reader.clone()
    }

    /// Forgets the own read connection (it failed): the next take opens a new one,
    /// and acks use the shared connection meanwhile.
    fn drop_reader(&mut self) {
        self.reader = None;
        *self.sub.reader.lock() = None;
    }

    async fn open(&self, block: Duration, what: &str) -> Option<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(block + self.sub.shared.options.response_timeout))
            .set_connection_timeout(Some(self.sub.shared.options.connection_timeout));
        match self
            .sub
            .shared
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::warn!("redis consumer cannot open its {what} connection: {e}");
                None
            }
        }
    }

    fn room(&self, max: usize) -> usize {
        let held = self.sub.in_flight.lock().len();
        self.sub.prefetch.saturating_sub(held).min(max.max(1))
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn next_batch(&mut self, max: usize) -> agentbus::Result<Vec<Delivery>> {
        loop {
            self.sub.shared.check_open()?;
            if self.take.is_none() {
                if self.chver.is_none() {
                    self.refresh_channels().await?;
                }
                let room = self.room(max);
                if room == 0 {
                    let settled = self.sub.settled.notified();
                    tokio::pin!(settled);
                    settled.as_mut().enable();
                    if self.room(max) == 0 {
                        tokio::select! {
                            _ = settled => {}
                            _ = self.sub.shared.closed_notify.notified() => {}
                            _ = tokio::time::sleep(BLOCK_SLICE) => {}
                        }
                    }
                    continue;
                }
                // Looking for expired deliveries walks the pending list: do it a few
                // times per ack wait, not on every take of a busy consumer.
                let interval = (self.sub.ack_wait / 4).clamp(SCAN_MIN, SCAN_MAX);
                let scan = self.last_scan.is_none_or(|at| at.elapsed() >= interval);
                let sub = self.sub.clone();
                let channels = self.channels.clone();
                let native = !scan
                    && !self.script_next
                    && !channels.is_empty()
                    && channels.len() <= NATIVE_MAX_CHANNELS;
                if native {
                    // Reads go over the consumer's own connection (as a raw client's
                    // consumer would), so they never queue behind other traffic.
                    let own = self.reader().await;
                    self.take_kind = TakeKind::Native;
                    self.take = Some(tokio::spawn(async move {
                        match own {
                            Some(mut conn) => {
                                run_native_take(&sub, &mut conn, &channels, room).await
                            }
                            None => {
                                let mut conn = sub.shared.conn();
                                run_native_take(&sub, &mut conn, &channels, room).await
                            }
                        }
                    }));
                } else {
                    if scan {
                        self.last_scan = Some(Instant::now());
                    }
                    let mode = if std::mem::take(&mut self.scan_only_next)
                        && !self.script_next
                        && !channels.is_empty()
                        && channels.len() <= NATIVE_MAX_CHANNELS
                    {
                        ScriptMode::ScanOnly
                    } else if scan {
                        ScriptMode::TakeAndScan
                    } else {
                        ScriptMode::Take
                    };
                    self.script_next = false;
                    self.take_kind = TakeKind::Script;
                    self.take = Some(tokio::spawn(run_take(sub, channels, room, mode)));
                }
            }
            let Some(handle) = self.take.as_mut() else {
                continue;
            };
            let joined = handle.await;
            self.take = None;
            let kind = self.take_kind;
            let result = joined.map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!("the redis take task failed: {e}"),
                )
            })?;
            let result = match result {
                Ok(r) => r,
                Err(e) => {
                    if kind != TakeKind::Script {
                        // The own connection may be broken: open a new one next time.
                        self.drop_reader();
                    }
                    return Err(e);
                }
            };
            if result.gone {
                return Err(Error::new(
                    ErrorKind::Closed,
                    format!(
                        "group '{}' was deleted: this subscription is closed; subscribe again to \
                         recreate it",
                        self.sub.group
                    ),
                ));
            }
            let channels_changed = self.chver.as_deref() != Some(result.chver.as_str());
            let claims = result.claims;
            self.next_due = result.next_due;
            self.script_next |= result.script_needed;
            if !result.deliver.is_empty() {
                let settler: Arc<dyn Settler> = self.sub.clone();
                let mut out = Vec::with_capacity(result.deliver.len());
                let mut held = self.sub.in_flight.lock();
                for taken in result.deliver {
                    let token = self.sub.next_token.fetch_add(1, Ordering::Relaxed);
                    let mut envelope = taken.envelope;
                    envelope.header.attempt = taken.count.max(1);
                    let envelope = Arc::new(envelope);
                    held.insert(
                        token,
                        InFlight {
                            stream: taken.stream,
                            id: taken.id,
                            envelope: envelope.clone(),
                            claims,
                        },
                    );
                    out.push(Delivery::new(
                        envelope,
                        taken.sequence,
                        self.sub.group.clone(),
                        token,
                        settler.clone(),
                    ));
                }
                drop(held);
                if channels_changed {
                    self.chver = None;
                }
                return Ok(out);
            }
            if channels_changed {
                self.refresh_channels().await?;
                continue;
            }
            if result.script_needed {
                continue;
            }
            if kind == TakeKind::Native {
                // Nothing new: before waiting, a script take looks for expired
                // deliveries and due redeliveries (but leaves new entries to the next
                // native take), and returns where to wait from.
                self.last_scan = None;
                self.scan_only_next = true;
                continue;
            }
            self.last_ids = result.last_ids;
            if self.channels.is_empty() || self.channels.len() > NATIVE_MAX_CHANNELS {
                // Idle: the next (script) take looks for expired deliveries whatever
                // the interval. (A consumer on the fast path has just done so.)
                self.last_scan = None;
            }
            let shared = self.sub.shared.clone();
            tokio::select! {
                r = self.wait() => r?,
                _ = shared.closed_notify.notified() => {}
            }
        }
    }

    fn group(&self) -> &str {
        &self.sub.group
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let sub = self.sub.clone();
        let take = self.take.take();
        runtime.spawn(async move {
            if let Some(take) = take {
                let _ = take.await;
            }
            let unreported = sub.take_unreported();
            if unreported > 0 {
                let mut pipe = redis::pipe();
                crate::fast::count_cmd(&mut pipe, &sub, "delivered", unreported as i64);
                let _: redis::RedisResult<Value> = pipe.query_async(&mut sub.shared.conn()).await;
            }
            let mut inv = scripts::ADMIN.prepare_invoke();
            inv.arg(sub.prefix())
                .arg("leave")
                .arg(&*sub.group)
                .arg(&sub.consumer)
                .arg(millis(Utc::now()));
            let result: redis::RedisResult<Value> = inv.invoke_async(&mut sub.shared.conn()).await;
            if let Err(e) = result {
                tracing::warn!(
                    group = %sub.group,
                    "could not hand a closed subscription's deliveries back (they return after \
                     the ack wait): {e}"
                );
            }
        });
    }
}
