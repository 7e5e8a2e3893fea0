//! The `Transport` trait every engine and backend implements, and its vocabulary.
//!
//! A transport stores and delivers envelopes under the delivery contract of
//! DESIGN §4: groups, at-least-once with ack / nack / reject, ack-wait redelivery,
//! max deliveries, priority order, deadlines, dedup, delayed delivery, start positions,
//! retention and backpressure, dead letters. What a backend lacks natively it declares
//! in [`Capabilities`]; the bus layer fills what it can, and the conformance suite
//! (`agentbus-testkit`) reports the rest as skipped with the reason.
//!
//! Failure semantics: `publish` returns a receipt only after the engine accepted the
//! message (for durable engines, after the sync its policy requires); any error means
//! the message may or may not be stored, never that it was silently dropped.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::channel::{ChannelName, ChannelPattern};
use crate::envelope::{DeadReason, Envelope, MessageId};
use crate::error::{Error, ErrorKind, Result};

/// What an engine or backend supports natively. A `false` here means the matching
/// conformance test is skipped for it, with the reason printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Higher priority is delivered first among ready messages.
    pub priority: bool,
    /// `not_before` / delay is honoured.
    pub delayed_delivery: bool,
    /// Same-id publishes inside the dedup window are detected.
    pub dedup: bool,
    /// New groups can start from earliest, a time or a sequence.
    pub start_positions: bool,
    /// Retention limits (age, bytes, count) with drop-oldest / reject-new.
    pub retention: bool,
    /// Messages and group positions survive a restart of the process.
    pub durable: bool,
    /// `publish` reports how many groups matched, so requests can fail fast with
    /// `NoResponders`.
    pub no_responders: bool,
}

impl Capabilities {
    /// Everything supported.
    pub const ALL: Capabilities = Capabilities {
        priority: true,
        delayed_delivery: true,
        dedup: true,
        start_positions: true,
        retention: true,
        durable: true,
        no_responders: true,
    };
}

/// What `publish` returns once the engine has accepted a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishReceipt {
    /// The message id (the dedup key).
    pub id: MessageId,
    /// The channel it was stored on.
    pub channel: ChannelName,
    /// Its sequence number in the channel (the original's, for a duplicate).
    pub sequence: u64,
    /// True when the id was seen inside the dedup window: accepted, not stored again.
    pub duplicate: bool,
    /// How many subscribed groups matched the channel at publish time.
    pub groups: usize,
}

/// Where a new durable group starts reading. Ignored when the group already exists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// Only messages published after the group is created.
    #[default]
    New,
    /// Everything still retained.
    Earliest,
    /// Messages published at or after this time.
    Time(DateTime<Utc>),
    /// Messages with this channel sequence or later.
    Sequence(u64),
}

/// Default time a delivery may stay unsettled before it is redelivered.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Default number of deliveries before a message is dead-lettered.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;
/// Default number of unsettled deliveries one consumer may hold.
pub const DEFAULT_PREFETCH: usize = 64;

/// A subscription request: `(pattern, group)` plus delivery settings.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use agentbus::{ChannelPattern, StartPosition, SubscribeOptions};
///
/// let options = SubscribeOptions::new(ChannelPattern::new("channel.scheduling.request")?)
///     .group("schedulers")
///     .ack_wait(Duration::from_secs(10))
///     .max_deliveries(3)
///     .prefetch(8)
///     .start(StartPosition::Earliest);
/// # Ok::<(), agentbus::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Which channels.
    pub pattern: ChannelPattern,
    /// The group; `None` makes a private group (every such subscriber gets every
    /// message) that disappears with the subscription.
    pub group: Option<String>,
    /// Where a newly created group starts.
    pub start: StartPosition,
    /// How long a delivery may stay unsettled before redelivery (group setting, fixed
    /// by the member that creates the group).
    pub ack_wait: Duration,
    /// Deliveries before dead-lettering with reason `max_deliveries` (group setting).
    pub max_deliveries: u32,
    /// Unsettled deliveries this consumer may hold at once (backpressure).
    pub prefetch: usize,
}

impl SubscribeOptions {
    /// Defaults: private group, new messages only, 30 s ack wait, 5 deliveries,
    /// prefetch 64.
    pub fn new(pattern: ChannelPattern) -> Self {
        SubscribeOptions {
            pattern,
            group: None,
            start: StartPosition::New,
            ack_wait: DEFAULT_ACK_WAIT,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            prefetch: DEFAULT_PREFETCH,
        }
    }

    /// Joins (or creates) the named group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets where a new group starts.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Sets the ack wait.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Sets the maximum number of deliveries.
    pub fn max_deliveries(mut self, max_deliveries: u32) -> Self {
        self.max_deliveries = max_deliveries;
        self
    }

    /// Sets the prefetch.
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Checks the options for values no engine can honour.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a zero prefetch, ack wait or max deliveries, or
    /// a group name that is not a single channel token.
    pub fn validate(&self) -> Result<()> {
        if self.prefetch == 0 {
            return Err(Error::invalid_input(
                "prefetch must be at least 1: it is how many unsettled deliveries a consumer may hold",
            ));
        }
        if self.ack_wait.is_zero() {
            return Err(Error::invalid_input("ack_wait must be longer than zero"));
        }
        if self.max_deliveries == 0 {
            return Err(Error::invalid_input(
                "max_deliveries must be at least 1 (1 means: never redeliver)",
            ));
        }
        if let Some(group) = &self.group {
            let ok = !group.is_empty()
                && group.len() <= 128
                && group
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(Error::invalid_input(format!(
                    "invalid group name '{group}': use 1-128 characters of [A-Za-z0-9_-]"
                )));
            }
        }
        Ok(())
    }
}

/// What to do when a channel reaches a retention limit with unconsumed messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// Refuse the publish with [`ErrorKind::Full`]: producers feel the backpressure.
    #[default]
    RejectNew,
    /// Drop the oldest messages (counted in the channel's `dropped` statistic).
    DropOldest,
}

/// Per-channel storage settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelConfig {
    /// Messages older than this are removed.
    pub max_age: Option<Duration>,
    /// The most payload bytes kept (approximate, header included).
    pub max_bytes: Option<u64>,
    /// The most messages kept.
    pub max_messages: Option<u64>,
    /// What to do at a limit when the oldest messages are still unconsumed.
    pub discard: Discard,
    /// How long a message id is remembered for dedup.
    pub dedup_window: Duration,
}

/// The default dedup window (as NATS JetStream's).
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(120);

impl Default for ChannelConfig {
    /// No age limit, 64 MiB, 1,000,000 messages, reject new at the limit, 2-minute
    /// dedup window. Messages every group has settled are trimmed first, so the limits
    /// only bite on unconsumed backlog.
    fn default() -> Self {
        ChannelConfig {
            max_age: None,
            max_bytes: Some(64 * 1024 * 1024),
            max_messages: Some(1_000_000),
            discard: Discard::RejectNew,
            dedup_window: DEFAULT_DEDUP_WINDOW,
        }
    }
}

/// How a delivery was settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Done; never deliver again.
    Ack,
    /// Failed; deliver again after `delay` (attempt + 1), or dead-letter if that was
    /// the last allowed delivery.
    Nack {
        /// How long to wait before redelivery.
        delay: Duration,
        /// What went wrong, kept as the dead letter's `last_error`.
        error: Option<String>,
    },
    /// Straight to dead letters.
    Reject {
        /// Why.
        reason: DeadReason,
        /// Details.
        error: String,
    },
}

/// Settles deliveries on behalf of one subscription. Implemented by engines.
#[async_trait]
pub trait Settler: Send + Sync + fmt::Debug {
    /// Applies `settlement` to the delivery identified by `token`.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadySettled`] when the engine no longer holds the message
    /// unsettled (it was settled through another delivery or dead-lettered).
    async fn settle(&self, token: u64, settlement: Settlement) -> Result<()>;

    /// Settles many deliveries at once, one result each; engines override this to
    /// take their lock (or make their round trip) once per batch.
    async fn settle_many(&self, batch: Vec<(u64, Settlement)>) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(batch.len());
        for (token, settlement) in batch {
            results.push(self.settle(token, settlement).await);
        }
        results
    }
}

/// Acks every delivery, with one engine call per run of deliveries from the same
/// subscription: the fast path for batch consumers.
///
/// # Errors
/// The first error met ([`ErrorKind::AlreadySettled`] for a delivery settled before);
/// the other deliveries are still acked.
pub async fn ack_all(deliveries: &[Delivery]) -> Result<()> {
    let mut first_error = None;
    let mut start = 0;
    while start < deliveries.len() {
        let settler = &deliveries[start].settler;
        let end = deliveries[start..]
            .iter()
            .position(|d| !Arc::ptr_eq(&d.settler, settler))
            .map_or(deliveries.len(), |n| start + n);
        let mut batch = Vec::with_capacity(end - start);
        for delivery in &deliveries[start..end] {
            if delivery.settled.swap(true, Ordering::AcqRel) {
                first_error.get_or_insert_with(|| {
                    Error::new(
                        ErrorKind::AlreadySettled,
                        format!(
                            "a delivery from channel '{}' was already settled; ack, nack or reject each \
                             delivery exactly once",
                            delivery.envelope.channel
                        ),
                    )
                });
            } else {
                batch.push((delivery.token, Settlement::Ack));
            }
        }
        for result in settler.settle_many(batch).await {
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        start = end;
    }
    first_error.map_or(Ok(()), Err)
}

/// One delivery of one message to one consumer. Settle it exactly once with
/// [`Delivery::ack`], [`Delivery::nack`] or [`Delivery::reject`]; unsettled, it is
/// redelivered after the group's ack wait.
#[derive(Debug)]
pub struct Delivery {
    /// Shared with the engine's stored copy on first delivery: no copy per delivery.
    envelope: Arc<Envelope>,
    sequence: u64,
    group: Arc<str>,
    token: u64,
    settler: Arc<dyn Settler>,
    settled: AtomicBool,
}

impl Delivery {
    /// Built by engines. `envelope.header.attempt` must already be this delivery's
    /// attempt number.
    pub fn new(
        envelope: impl Into<Arc<Envelope>>,
        sequence: u64,
        group: Arc<str>,
        token: u64,
        settler: Arc<dyn Settler>,
    ) -> Self {
        Delivery {
            envelope: envelope.into(),
            sequence,
            group,
            token,
            settler,
            settled: AtomicBool::new(false),
        }
    }

    /// The message.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The engine's settler (for the observing layer in `observe.rs`).
    pub(crate) fn engine_settler(&self) -> &Arc<dyn Settler> {
        &self.settler
    }

    /// The settlement token (for the observing layer).
    pub(crate) fn token(&self) -> u64 {
        self.token
    }

    /// The shared envelope (for the observing layer).
    pub(crate) fn shared_envelope(&self) -> &Arc<Envelope> {
        &self.envelope
    }

    /// The shared group name (for the observing layer).
    pub(crate) fn shared_group(&self) -> &Arc<str> {
        &self.group
    }

    /// The same unsettled delivery, settled through `settler` instead (the observing
    /// layer wraps the engine's settler this way).
    pub(crate) fn with_settler(self, settler: Arc<dyn Settler>) -> Delivery {
        Delivery { settler, ..self }
    }

    /// Takes the message out (the delivery can still be settled).
    pub fn into_parts(self) -> (Envelope, DeliveryHandle) {
        let handle = DeliveryHandle {
            token: self.token,
            settler: self.settler,
            settled: self.settled,
            channel: self.envelope.channel.clone(),
        };
        (
            Arc::try_unwrap(self.envelope).unwrap_or_else(|shared| (*shared).clone()),
            handle,
        )
    }

    /// The channel sequence of the message.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The group it was delivered in.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Which delivery this is: 1 for the first.
    pub fn attempt(&self) -> u32 {
        self.envelope.header.attempt
    }

    /// Acknowledges: the message is done for this group.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadySettled`] if this delivery was settled before.
    pub async fn ack(&self) -> Result<()> {
        settle_once(&self.settled, &self.envelope.channel, || {
            self.settler.settle(self.token, Settlement::Ack)
        })
        .await
    }

    /// Negative acknowledgement: redeliver after `delay` (or dead-letter when
    /// `max_deliveries` is used up).
    ///
    /// # Errors
    /// [`ErrorKind::AlreadySettled`] if this delivery was settled before.
    pub async fn nack(&self, delay: Duration, error: Option<String>) -> Result<()> {
        settle_once(&self.settled, &self.envelope.channel, || {
            self.settler
                .settle(self.token, Settlement::Nack { delay, error })
        })
        .await
    }

    /// Rejects: straight to dead letters with `reason`.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadySettled`] if this delivery was settled before.
    pub async fn reject(&self, reason: DeadReason, error: impl Into<String>) -> Result<()> {
        let error = error.into();
        settle_once(&self.settled, &self.envelope.channel, || {
            self.settler
                .settle(self.token, Settlement::Reject { reason, error })
        })
        .await
    }
}

/// The settling half of a [`Delivery`] split by [`Delivery::into_parts`].
#[derive(Debug)]
pub struct DeliveryHandle {
    token: u64,
    settler: Arc<dyn Settler>,
    settled: AtomicBool,
    channel: ChannelName,
}

impl DeliveryHandle {
    /// Applies `settlement` once.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadySettled`] on a second call.
    pub async fn settle(&self, settlement: Settlement) -> Result<()> {
        settle_once(&self.settled, &self.channel, || {
            self.settler.settle(self.token, settlement)
        })
        .await
    }
}

async fn settle_once<F, Fut>(settled: &AtomicBool, channel: &ChannelName, f: F) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    if settled.swap(true, Ordering::AcqRel) {
        return Err(Error::new(
            ErrorKind::AlreadySettled,
            format!(
                "this delivery from channel '{channel}' was already settled; ack, nack or \
                 reject each delivery exactly once"
            ),
        ));
    }
    f().await
}

/// A live subscription: pulls deliveries from the engine. Dropping it returns its
/// unsettled deliveries to the group at once.
#[async_trait]
pub trait Consumer: Send + fmt::Debug {
    /// Waits for at least one delivery and returns up to `max` (never more than the
    /// prefetch allows).
    ///
    /// # Errors
    /// [`ErrorKind::Closed`] when the engine shuts down.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>>;

    /// The group this consumer belongs to.
    fn group(&self) -> &str;
}

/// A message that went to dead letters, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The dead letter's own id (time-ordered).
    pub id: MessageId,
    /// The whole message as last delivered.
    pub envelope: Envelope,
    /// The group it died in (empty when no group was involved).
    pub group: String,
    /// Why.
    pub reason: DeadReason,
    /// How many deliveries were made.
    pub attempts: u32,
    /// The last error a consumer reported, if any.
    pub last_error: Option<String>,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

impl DeadLetter {
    /// The message a replay of this letter publishes, under `new_id`: the original
    /// with its deadline and delay cleared (it already missed them), not yet
    /// delivered, caused by the original (`causation_id`) and marked with the header
    /// `agentbus-replay-of`. Every engine's `replay_dead_letter` publishes this.
    ///
    /// ```
    /// # use agentbus::{ChannelName, DeadLetter, DeadReason, Envelope, MessageId};
    /// let original = Envelope::new(ChannelName::new("jobs").unwrap(), "job", &b"{}"[..]);
    /// let letter = DeadLetter {
    ///     id: MessageId::new(),
    ///     envelope: original.clone(),
    ///     group: "workers".into(),
    ///     reason: DeadReason::Rejected,
    ///     attempts: 3,
    ///     last_error: None,
    ///     dead_at: chrono::Utc::now(),
    /// };
    /// let again = letter.replay_envelope(MessageId::new());
    /// assert_eq!(again.header.causation_id, Some(original.header.id));
    /// assert_eq!(again.header.headers["agentbus-replay-of"], original.header.id.to_string());
    /// ```
    pub fn replay_envelope(&self, new_id: MessageId) -> Envelope {
        let original = self.envelope.header.id;
        let mut envelope = self.envelope.clone();
        envelope.header.id = new_id;
        envelope.header.causation_id = Some(original);
        envelope.header.attempt = 0;
        envelope.header.deadline = None;
        envelope.header.not_before = None;
        envelope
            .header
            .headers
            .insert("agentbus-replay-of".into(), original.to_string());
        envelope
    }
}

/// Which dead letters to list or purge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Only those whose channel matches.
    pub pattern: Option<ChannelPattern>,
    /// Only this reason.
    pub reason: Option<DeadReason>,
    /// At most this many (oldest first).
    pub limit: Option<usize>,
}

impl DeadLetterFilter {
    /// Whether `letter` passes the filter (ignoring `limit`).
    pub fn accepts(&self, letter: &DeadLetter) -> bool {
        self.pattern
            .as_ref()
            .is_none_or(|p| p.matches(&letter.envelope.channel))
            && self.reason.as_ref().is_none_or(|r| *r == letter.reason)
    }
}

/// Statistics of one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// The channel.
    pub channel: ChannelName,
    /// Messages currently stored.
    pub messages: u64,
    /// Bytes currently stored (approximate).
    pub bytes: u64,
    /// Messages ever accepted (duplicates excluded).
    pub published: u64,
    /// Messages removed by `DropOldest` before every group consumed them.
    pub dropped: u64,
    /// The last sequence assigned.
    pub last_sequence: u64,
}

/// Statistics of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStats {
    /// The group name.
    pub group: String,
    /// Its pattern.
    pub pattern: ChannelPattern,
    /// Connected consumers.
    pub members: usize,
    /// Messages waiting to be delivered (never delivered, redeliveries and delayed).
    pub pending: u64,
    /// Delivered and not yet settled.
    pub in_flight: u64,
    /// Deliveries made (redeliveries included).
    pub delivered: u64,
    /// Acks.
    pub acked: u64,
    /// Redeliveries (after nack or ack-wait).
    pub redelivered: u64,
    /// Messages this group sent to dead letters.
    pub dead_lettered: u64,
}

/// A snapshot of an engine's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    /// The engine's name (`memory`, `file`, `redis`…).
    pub engine: String,
    /// Per channel.
    pub channels: Vec<ChannelStats>,
    /// Per group.
    pub groups: Vec<GroupStats>,
    /// Dead letters currently kept.
    pub dead_letters: u64,
    /// Publishes refused with `Full`.
    pub rejected_full: u64,
    /// Messages dead-lettered as expired.
    pub expired: u64,
    /// Engine-specific facts worth showing next to the counters, as name → value
    /// (the durable engine's fsync policy and segment sizes, a server's version…).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub details: std::collections::BTreeMap<String, String>,
}

/// What a publish receipt guarantees on a transport, read from its settings by
/// [`Transport::durability`] and printed by `agentbus doctor` (DESIGN §5, "durability
/// honesty").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurabilityReport {
    /// The transport's name.
    pub engine: String,
    /// The settings read, as name → value (`appendfsync = everysec`…).
    pub settings: std::collections::BTreeMap<String, String>,
    /// In one or two plain sentences: what survives a process crash, a machine crash
    /// or a power loss once a receipt was returned.
    pub guarantee: String,
    /// What the user can change to make a receipt stronger; empty when nothing can.
    pub advice: Vec<String>,
}

/// An engine or backend: stores envelopes and delivers them under the contract.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// A short name: `memory`, `file`, `redis`, `nats`…
    fn name(&self) -> &str;

    /// What it supports natively.
    fn capabilities(&self) -> Capabilities;

    /// Stores `envelope` and returns its receipt.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a payload over the size limit or a deadline in
    /// the past; [`ErrorKind::Full`] when retention rejects new messages;
    /// [`ErrorKind::Backend`] / [`ErrorKind::Closed`] otherwise. An error means the
    /// message may or may not be stored; it is never silently dropped.
    async fn publish(&self, envelope: Envelope) -> Result<PublishReceipt>;

    /// Publishes many envelopes; one result each, in order. Engines override this to
    /// amortize locking and syncing.
    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Vec<Result<PublishReceipt>> {
        let mut receipts = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            receipts.push(self.publish(envelope).await);
        }
        receipts
    }

    /// Joins or creates the group of `options`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for bad options or a group that exists with a
    /// different pattern.
    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Consumer>>;

    /// Sets the storage settings of every channel matching `pattern`, existing and
    /// future. Later calls take precedence over earlier ones.
    async fn configure_channels(
        &self,
        pattern: ChannelPattern,
        config: ChannelConfig,
    ) -> Result<()>;

    /// Removes a named group and its position.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] if there is no such group.
    async fn delete_group(&self, group: &str) -> Result<()>;

    /// Lists dead letters, oldest first.
    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>>;

    /// One dead letter.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] naming the id.
    async fn dead_letter(&self, id: MessageId) -> Result<DeadLetter>;

    /// Publishes a dead letter again on its channel (with a new id, `causation_id` set
    /// to the original, attempt reset) and removes it from dead letters.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] naming the id, or any publish error.
    async fn replay_dead_letter(&self, id: MessageId) -> Result<PublishReceipt>;

    /// Deletes the dead letters the filter accepts; returns how many.
    async fn purge_dead_letters(&self, filter: DeadLetterFilter) -> Result<u64>;

    /// A snapshot of channels, groups and counters.
    async fn stats(&self) -> Result<EngineStats>;

    /// Stops delivering; waiting consumers get [`ErrorKind::Closed`].
    async fn close(&self) -> Result<()>;

    /// Whether the transport carries requests over its own request/reply mechanism
    /// (NATS core request/reply) instead of publish + a reply inbox: when true,
    /// [`Bus::request`](crate::Bus::request) calls [`Transport::request`]. Defaults to
    /// false.
    fn native_requests(&self) -> bool {
        false
    }

    /// Sends `request` (its deadline set, its `reply_to` filled by the transport) over
    /// the transport's own request/reply and waits up to `timeout` for one reply. Only
    /// called when [`Transport::native_requests`] is true.
    ///
    /// # Errors
    /// [`ErrorKind::NoResponders`] when nobody listens on the channel;
    /// [`ErrorKind::Timeout`] naming the channel and the wait; [`ErrorKind::Unsupported`]
    /// from the default implementation.
    async fn request(&self, request: Envelope, timeout: Duration) -> Result<Envelope> {
        let _ = timeout;
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the '{}' transport has no native request/reply; a request on '{}' goes \
                 through the bus's inbox instead",
                self.name(),
                request.channel
            ),
        ))
    }

    /// As [`Transport::request`], for a caller that needs only the reply's payload,
    /// as the typed [`Bus::request`](crate::Bus::request) does: a transport may then
    /// skip reading the reply's header (on NATS, about 3,000 instructions of a round
    /// trip, callgrind). The default takes the payload of [`Transport::request`]'s
    /// reply.
    ///
    /// # Errors
    /// As [`Transport::request`].
    async fn request_payload(&self, request: Envelope, timeout: Duration) -> Result<Bytes> {
        Ok(self.request(request, timeout).await?.payload)
    }

    /// Scatter-gather over the transport's own request/reply: sends `request` (its
    /// deadline set, `reply_to` filled by the transport) to every group matching its
    /// channel and returns how many groups matched and the replies as they come. Only
    /// called when [`Transport::native_requests`] is true; the bus applies the
    /// gather's limits and timeout.
    ///
    /// # Errors
    /// [`ErrorKind::Unsupported`] from the default implementation; send errors.
    async fn scatter(
        &self,
        request: Envelope,
    ) -> Result<(usize, futures::stream::BoxStream<'static, Envelope>)> {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the '{}' transport has no native scatter-gather; a gather on '{}' goes \
                 through the bus's inbox instead",
                self.name(),
                request.channel
            ),
        ))
    }

    /// Reads the settings that decide what a receipt guarantees and says it plainly.
    ///
    /// The default describes a transport that keeps messages only in this process's
    /// memory; every engine that stores elsewhere overrides it.
    async fn durability(&self) -> Result<DurabilityReport> {
        Ok(DurabilityReport {
            engine: self.name().to_string(),
            settings: [("storage".to_string(), "process memory".to_string())].into(),
            guarantee: "A receipt means the message is held in this process's memory: \
                        it survives nothing — a crash or exit of the process loses every \
                        message and position."
                .to_string(),
            advice: vec![
                "Use --backend file:DIR for the embedded durable log (fsync on every \
                 receipt by default), or a server backend configured for durability."
                    .to_string(),
            ],
        })
    }
}

/// Limits every engine enforces at publish time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishLimits {
    /// The largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
}

/// The default payload limit: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

impl Default for PublishLimits {
    fn default() -> Self {
        PublishLimits {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}

impl PublishLimits {
    /// Checks an envelope before it is stored.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an oversized payload, an empty kind, or a
    /// deadline that has already passed.
    ///
    /// `now` is called only for an envelope with a deadline: most have none, and a
    /// clock read is a noticeable part of a core reply's cost.
    pub fn check(&self, envelope: &Envelope, now: impl FnOnce() -> DateTime<Utc>) -> Result<()> {
        if envelope.payload.len() > self.max_payload_bytes {
            return Err(Error::invalid_input(format!(
                "payload of {} bytes on channel '{}' is over the limit of {} bytes; send a \
                 reference (a URL or key) instead, or raise max_payload_bytes",
                envelope.payload.len(),
                envelope.channel,
                self.max_payload_bytes
            )));
        }
        if envelope.header.kind.is_empty() || envelope.header.kind.len() > 255 {
            return Err(Error::invalid_input(
                "the message kind must be 1-255 characters, e.g. 'vehicle.data'",
            ));
        }
        if let Some(deadline) = envelope.header.deadline {
            let now = now();
            if deadline <= now {
                return Err(Error::invalid_input(format!(
                    "the deadline {deadline} of a message for channel '{}' has already passed \
                     (now {now}); use a ttl that is longer than zero",
                    envelope.channel
                )));
            }
        }
        Ok(())
    }
}
