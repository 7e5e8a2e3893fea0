//! The bus: typed publishing and subscribing, request/reply and scatter-gather on top
//! of any [`Transport`].
//!
//! Replies travel on one inbox channel per bus (`_inbox.<bus-id>`), read by one router
//! task that only ever hands each reply to the waiting request's own slot (a oneshot,
//! or a bounded queue for a gather) and never waits on it. A slow or vanished requester
//! therefore never holds up the replies of any other request.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio::task::JoinHandle;

use crate::channel::{ChannelName, ChannelPattern};
use crate::clock::SharedClock;
use crate::envelope::{later, DeadReason, Envelope, Header, MessageId, Priority};
use crate::error::{Error, ErrorKind, Result};
use crate::memory::MemoryEngine;
use crate::message::{KindRegistry, Message};
use crate::transport::{
    ChannelConfig, Consumer, Delivery, Discard, PublishReceipt, SubscribeOptions, Transport,
};

/// Per-publish settings on top of the payload.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use agentbus::{Priority, PublishOptions};
///
/// let options = PublishOptions::new()
///     .priority(Priority::High)
///     .ttl(Duration::from_secs(60))
///     .correlation("workflow-17");
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishOptions {
    /// Use this id instead of a fresh one (for idempotent retries: the dedup key).
    pub id: Option<MessageId>,
    /// Priority; normal by default.
    pub priority: Option<Priority>,
    /// Deadline = now + ttl.
    pub ttl: Option<Duration>,
    /// Absolute deadline (wins over `ttl`).
    pub deadline: Option<DateTime<Utc>>,
    /// Deliver no earlier than now + delay.
    pub delay: Option<Duration>,
    /// Deliver no earlier than this (wins over `delay`).
    pub not_before: Option<DateTime<Utc>>,
    /// Thread / workflow id.
    pub correlation_id: Option<String>,
    /// The message this one answers or was caused by.
    pub causation_id: Option<MessageId>,
    /// Sending agent id.
    pub sender: Option<String>,
    /// Intended receiver.
    pub receiver: Option<String>,
    /// Where replies go.
    pub reply_to: Option<ChannelName>,
    /// Tenant.
    pub tenant: Option<String>,
    /// W3C traceparent.
    pub trace: Option<String>,
    /// Free headers.
    pub headers: BTreeMap<String, String>,
}

impl PublishOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = Some(priority);
        self
    }
    /// Sets a time to live.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
    /// Delays delivery.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
    /// Sets the correlation id.
    pub fn correlation(mut self, correlation: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation.into());
        self
    }
    /// Sets the sender.
    pub fn sender(mut self, sender: impl Into<String>) -> Self {
        self.sender = Some(sender.into());
        self
    }
    /// Sets the message id.
    pub fn id(mut self, id: MessageId) -> Self {
        self.id = Some(id);
        self
    }
    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Builds a header for `kind` at `now`.
    pub fn to_header(&self, kind: &str, now: DateTime<Utc>) -> Header {
        let mut header = Header::new_at(kind, now);
        if let Some(id) = self.id {
            header.id = id;
        }
        header.priority = self.priority.unwrap_or_default();
        header.deadline = self
            .deadline
            .or_else(|| self.ttl.map(|ttl| later(now, ttl)));
        header.not_before = self
            .not_before
            .or_else(|| self.delay.map(|d| later(now, d)));
        header.correlation_id = self.correlation_id.clone();
        header.causation_id = self.causation_id;
        header.sender = self.sender.clone();
        header.receiver = self.receiver.clone();
        header.reply_to = self.reply_to.clone();
        header.tenant = self.tenant.clone();
        header.trace = self.trace.clone();
        header.headers = self.headers.clone();
        header
    }
}

/// What a scatter-gather waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatherSpec {
    /// Stop waiting after this long.
    pub timeout: Duration,
    /// Stop as soon as this many replies came (first-N).
    pub max_replies: Option<usize>,
    /// The gather counts as successful (`quorum_met`) with at least this many replies.
    pub quorum: Option<usize>,
    /// Agent ids expected to answer: the result names those that did not, and the
    /// gather ends early once all of them have answered.
    pub expected: Vec<String>,
}

impl GatherSpec {
    /// Wait `timeout` for every reply.
    pub fn new(timeout: Duration) -> Self {
        GatherSpec {
            timeout,
            max_replies: None,
            quorum: None,
            expected: Vec::new(),
        }
    }
    /// Stop after `n` replies.
    pub fn max_replies(mut self, n: usize) -> Self {
        self.max_replies = Some(n);
        self
    }
    /// Require `n` replies for `quorum_met`.
    pub fn quorum(mut self, n: usize) -> Self {
        self.quorum = Some(n);
        self
    }
    /// Expect these agents to answer.
    pub fn expect<I, S>(mut self, agents: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.expected = agents.into_iter().map(Into::into).collect();
        self
    }
}

/// What a scatter-gather collected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatherResult<T> {
    /// The replies, in arrival order.
    pub replies: Vec<T>,
    /// The sender of each reply, in the same order (`?` when a reply had no sender).
    pub responders: Vec<String>,
    /// Expected agents that did not answer.
    pub missing: Vec<String>,
    /// Whether the gather ended at its timeout rather than by `max_replies` or by every
    /// expected agent answering.
    pub timed_out: bool,
    /// Whether the quorum (if any) was reached.
    pub quorum_met: bool,
    /// How many groups the request reached.
    pub groups: usize,
}

enum Waiter {
    One(oneshot::Sender<Envelope>),
    Many(mpsc::Sender<Envelope>),
}

struct Inbox {
    channel: ChannelName,
    router: JoinHandle<()>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.router.abort();
    }
}

type Waiters = Arc<Mutex<HashMap<MessageId, Waiter>>>;

struct BusInner {
    transport: Arc<dyn Transport>,
    registry: KindRegistry,
    clock: SharedClock,
    id: String,
    strict_kinds: bool,
    waiters: Waiters,
    inbox: OnceCell<Inbox>,
}

/// The entry point: a transport plus the kind registry, request/reply and gather.
///
/// Cheap to clone; clones share everything.
///
/// # Examples
///
/// ```
/// use agentbus::{Bus, ChannelName, ChannelPattern, Message, SubscribeOptions};
///
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug, PartialEq)]
/// struct Ping { n: u32 }
/// impl Message for Ping { const KIND: &'static str = "ping"; }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> agentbus::Result<()> {
/// let bus = Bus::memory();
/// bus.register::<Ping>();
/// let mut sub = bus.subscribe(SubscribeOptions::new(ChannelPattern::new("pings")?)).await?;
/// bus.publish(&ChannelName::new("pings")?, &Ping { n: 1 }).await?;
/// let delivery = sub.next().await?;
/// assert_eq!(delivery.envelope().decode_json::<Ping>()?, Ping { n: 1 });
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("id", &self.inner.id)
            .field("transport", &self.inner.transport.name())
            .field("strict_kinds", &self.inner.strict_kinds)
            .finish()
    }
}

/// Settings for a [`Bus`].
#[derive(Debug)]
pub struct BusBuilder {
    transport: Arc<dyn Transport>,
    clock: Option<SharedClock>,
    strict_kinds: bool,
    registry: KindRegistry,
    observers: Vec<Arc<dyn crate::observe::BusObserver>>,
}

impl BusBuilder {
    /// Adds an observer that sees every message published, delivered and settled
    /// through this bus (see [`crate::observe`]).
    pub fn observer(mut self, observer: Arc<dyn crate::observe::BusObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    /// Reads time (timestamps, ttl, request timeouts) from `clock`; pass the engine's
    /// clock when it is manual.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Refuse to publish kinds that are not registered, and dead-letter received ones.
    pub fn strict_kinds(mut self, strict: bool) -> Self {
        self.strict_kinds = strict;
        self
    }

    /// Shares an existing registry.
    pub fn registry(mut self, registry: KindRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// Builds the bus.
    pub fn build(self) -> Bus {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let clock = self
            .clock
            .unwrap_or_else(|| Arc::new(crate::clock::SystemClock));
        let transport: Arc<dyn Transport> = if self.observers.is_empty() {
            self.transport
        } else {
            Arc::new(crate::observe::ObservedTransport::new(
                self.transport,
                self.observers,
                clock.clone(),
            ))
        };
        Bus {
            inner: Arc::new(BusInner {
                transport,
                registry: self.registry,
                clock,
                id,
                strict_kinds: self.strict_kinds,
                waiters: Arc::default(),
                inbox: OnceCell::new(),
            }),
        }
    }
}

impl Bus {
    /// A bus on a fresh in-memory engine.
    pub fn memory() -> Bus {
        let engine = MemoryEngine::new();
        let clock = engine.clock();
        Bus::builder(Arc::new(engine)).clock(clock).build()
    }

    /// A bus on `transport` with defaults.
    pub fn new(transport: Arc<dyn Transport>) -> Bus {
        Bus::builder(transport).build()
    }

    /// Configures a bus on `transport`.
    pub fn builder(transport: Arc<dyn Transport>) -> BusBuilder {
        BusBuilder {
            transport,
            clock: None,
            strict_kinds: false,
            registry: KindRegistry::new(),
            observers: Vec::new(),
        }
    }

    /// The transport underneath (for dead letters, stats, channel configuration).
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// The kind registry.
    pub fn registry(&self) -> &KindRegistry {
        &self.inner.registry
    }

    /// The bus's clock.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// Registers message type `M`.
    pub fn register<M: Message>(&self) {
        self.inner.registry.register::<M>();
    }

    /// Builds the envelope for `message` on `channel`, timestamped by the bus clock.
    ///
    /// # Errors
    /// [`ErrorKind::Schema`] if the message cannot be encoded.
    pub fn envelope<M: Message>(
        &self,
        channel: &ChannelName,
        message: &M,
        options: &PublishOptions,
    ) -> Result<Envelope> {
        // Not `Envelope::json`: it would build a header (a fresh id, a clock read, two
        // strings) only for it to be replaced by this one, twice per request/reply.
        Ok(Envelope {
            channel: channel.clone(),
            header: options.to_header(M::KIND, self.inner.clock.now()),
            payload: crate::envelope::json_payload(M::KIND, message)?,
        })
    }

    /// Publishes `message` on `channel` with default options.
    ///
    /// # Errors
    /// See [`Bus::publish_envelope`].
    pub async fn publish<M: Message>(
        &self,
        channel: &ChannelName,
        message: &M,
    ) -> Result<PublishReceipt> {
        self.publish_with(channel, message, &PublishOptions::default())
            .await
    }

    /// Publishes `message` on `channel` with `options`.
    ///
    /// # Errors
    /// See [`Bus::publish_envelope`].
    pub async fn publish_with<M: Message>(
        &self,
        channel: &ChannelName,
        message: &M,
        options: &PublishOptions,
    ) -> Result<PublishReceipt> {
        let envelope = self.envelope(channel, message, options)?;
        self.publish_envelope(envelope).await
    }

    /// Validates and publishes a ready envelope.
    ///
    /// # Errors
    /// [`ErrorKind::Schema`] if the payload does not decode for its registered kind;
    /// [`ErrorKind::MessageKindNotRegistered`] for an unknown kind on a strict bus; any
    /// transport error (`InvalidInput`, `Full`, `Backend`…).
    ///
    /// The header's W3C `traceparent` is stamped on the way: a new trace, or a new span
    /// of the trace it carries (see [`crate::trace_context`]).
    pub async fn publish_envelope(&self, mut envelope: Envelope) -> Result<PublishReceipt> {
        self.inner
            .registry
            .validate(&envelope, self.inner.strict_kinds)?;
        crate::trace_context::stamp(&mut envelope.header);
        let span = tracing::debug_span!(
            "agentbus.publish",
            channel = %envelope.channel,
            kind = %envelope.header.kind,
            correlation_id = envelope.header.correlation_id.as_deref(),
            message_id = %envelope.header.id,
            traceparent = envelope.header.trace.as_deref(),
        );
        tracing::Instrument::instrument(self.inner.transport.publish(envelope), span).await
    }

    /// Subscribes; see [`SubscribeOptions`].
    ///
    /// # Errors
    /// Bad options, or the transport's errors.
    pub async fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription> {
        let prefetch = options.prefetch;
        let consumer = self.inner.transport.subscribe(options).await?;
        Ok(Subscription {
            consumer,
            buffer: std::collections::VecDeque::new(),
            batch: prefetch.min(256),
            registry: self.inner.registry.clone(),
            strict_kinds: self.inner.strict_kinds,
        })
    }

    /// Subscribes to messages of type `M`, decoded.
    ///
    /// # Errors
    /// Bad options, or the transport's errors.
    pub async fn subscribe_typed<M: Message>(
        &self,
        options: SubscribeOptions,
    ) -> Result<TypedSubscription<M>> {
        self.register::<M>();
        Ok(TypedSubscription {
            inner: self.subscribe(options).await?,
            _type: PhantomData,
        })
    }

    async fn inbox(&self) -> Result<&ChannelName> {
        let inbox = self
            .inner
            .inbox
            .get_or_try_init(|| async {
                let channel = ChannelName::new(format!("_inbox.{}", self.inner.id))?;
                // Replies are read at once by the router; keep only a small tail.
                self.inner
                    .transport
                    .configure_channels(
                        ChannelPattern::from(channel.clone()),
                        ChannelConfig {
                            max_messages: Some(100_000),
                            max_bytes: Some(64 * 1024 * 1024),
                            discard: Discard::DropOldest,
                            ..ChannelConfig::default()
                        },
                    )
                    .await?;
                let consumer = self
                    .inner
                    .transport
                    .subscribe(
                        SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                            .prefetch(1024)
                            .max_deliveries(1),
                    )
                    .await?;
                let router = tokio::spawn(route_replies(consumer, self.inner.waiters.clone()));
                Ok::<_, Error>(Inbox { channel, router })
            })
            .await?;
        Ok(&inbox.channel)
    }

    /// Sends a request and waits for one reply.
    ///
    /// The request carries `reply_to` = this bus's inbox and a deadline of now +
    /// `timeout`, so a responder never works on a request nobody waits for.
    ///
    /// # Errors
    /// [`ErrorKind::NoResponders`] at once when no group is subscribed to the channel
    /// (where the transport can tell); [`ErrorKind::Timeout`] naming the channel and the
    /// wait; publish errors.
    pub async fn request_envelope(
        &self,
        mut request: Envelope,
        timeout: Duration,
    ) -> Result<Envelope> {
        if self.inner.transport.native_requests() {
            self.prepare_native_request(&mut request, timeout)?;
            return self.inner.transport.request(request, timeout).await;
        }
        let inbox = self.inbox().await?.clone();
        let now = self.inner.clock.now();
        request.header.reply_to = Some(inbox);
        request.header.deadline = Some(later(now, timeout));
        let id = request.header.id;
        let channel = request.channel.clone();
        let (tx, rx) = oneshot::channel();
        self.inner.waiters.lock().insert(id, Waiter::One(tx));
        let _guard = WaiterGuard {
            waiters: &self.inner.waiters,
            id,
        };
        let receipt = self.publish_envelope(request).await?;
        if receipt.groups == 0 && self.inner.transport.capabilities().no_responders {
            return Err(no_responders(&channel));
        }
        let sleep = self.inner.clock.sleep_until(later(now, timeout));
        tokio::select! {
            reply = rx => reply.map_err(|_| Error::closed("the bus inbox")),
            _ = sleep => Err(Error::timeout("request", channel.as_str(), timeout)),
        }
    }

    /// Sends a typed request and decodes the typed reply.
    ///
    /// # Errors
    /// As [`Bus::request_envelope`], plus [`ErrorKind::Schema`] if the reply does not
    /// decode as `R`.
    pub async fn request<Q: Message, R: Message>(
        &self,
        channel: &ChannelName,
        request: &Q,
        timeout: Duration,
    ) -> Result<R> {
        let mut envelope = self.envelope(channel, request, &PublishOptions::default())?;
        if self.inner.transport.native_requests() {
            // Only the payload is used: the transport need not read the reply's header.
            self.prepare_native_request(&mut envelope, timeout)?;
            let payload = self
                .inner
                .transport
                .request_payload(envelope, timeout)
                .await?;
            return serde_json::from_slice(&payload).map_err(|e| {
                Error::new(
                    ErrorKind::Schema,
                    format!(
                        "the reply to a request of kind '{}' on channel '{channel}' does not \
                         decode as '{}': {e}",
                        Q::KIND,
                        R::KIND
                    ),
                )
            });
        }
        self.request_envelope(envelope, timeout)
            .await?
            .decode_json()
    }

    /// Readies a request for the transport's own request/reply (NATS core), which
    /// fills `reply_to`: its deadline, the schema check, and the trace context,
    /// stamped as for every publish so that the reply continues the request's trace.
    fn prepare_native_request(&self, request: &mut Envelope, timeout: Duration) -> Result<()> {
        request.header.deadline = Some(later(self.inner.clock.now(), timeout));
        self.inner
            .registry
            .validate(request, self.inner.strict_kinds)?;
        crate::trace_context::stamp(&mut request.header);
        Ok(())
    }

    /// Publishes `reply` to the `reply_to` of `request`, linking the two.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] if the request has no `reply_to`; publish errors.
    pub async fn reply<M: Message>(&self, request: &Envelope, reply: &M) -> Result<PublishReceipt> {
        let envelope = self.reply_envelope(request, reply, None)?;
        self.publish_envelope(envelope).await
    }

    /// Builds the reply envelope to `request` (used by agents to set their sender).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] if the request has no `reply_to`.
    pub fn reply_envelope<M: Message>(
        &self,
        request: &Envelope,
        reply: &M,
        sender: Option<&str>,
    ) -> Result<Envelope> {
        let reply_to = request.header.reply_to.clone().ok_or_else(|| {
            Error::invalid_input(format!(
                "message {} of kind '{}' has no reply_to, so it cannot be replied to; \
                 send it with `request` or `gather`",
                request.header.id, request.header.kind
            ))
        })?;
        let options = PublishOptions {
            causation_id: Some(request.header.id),
            correlation_id: request.header.correlation_id.clone(),
            receiver: request.header.sender.clone(),
            sender: sender.map(str::to_string),
            priority: Some(request.header.priority),
            tenant: request.header.tenant.clone(),
            trace: request.header.trace.clone(),
            ..PublishOptions::default()
        };
        self.envelope(&reply_to, reply, &options)
    }

    /// Scatter-gather over the transport's own request/reply (NATS core): the same
    /// limits as [`Bus::gather_envelope`], the replies from the transport's stream.
    async fn gather_native(
        &self,
        mut request: Envelope,
        spec: &GatherSpec,
    ) -> Result<GatherResult<Envelope>> {
        let now = self.inner.clock.now();
        let end = later(now, spec.timeout);
        request.header.deadline = Some(end);
        self.inner
            .registry
            .validate(&request, self.inner.strict_kinds)?;
        crate::trace_context::stamp(&mut request.header);
        let (groups, replies) = self.inner.transport.scatter(request).await?;
        Ok(self
            .collect_replies(spec, groups, groups > 0, replies, end)
            .await)
    }

    /// Scatter-gather: publishes `request` and collects replies as `spec` says.
    ///
    /// # Errors
    /// Publish errors only; no replies at all is a result with `timed_out` set.
    pub async fn gather_envelope(
        &self,
        mut request: Envelope,
        spec: &GatherSpec,
    ) -> Result<GatherResult<Envelope>> {
        if self.inner.transport.native_requests() {
            return self.gather_native(request, spec).await;
        }
        let inbox = self.inbox().await?.clone();
        let now = self.inner.clock.now();
        let end = later(now, spec.timeout);
        request.header.reply_to = Some(inbox);
        request.header.deadline = Some(end);
        let id = request.header.id;
        let capacity = spec.max_replies.unwrap_or(1024).clamp(1, 65_536);
        let (tx, mut rx) = mpsc::channel(capacity);
        self.inner.waiters.lock().insert(id, Waiter::Many(tx));
        let _guard = WaiterGuard {
            waiters: &self.inner.waiters,
            id,
        };
        let receipt = self.publish_envelope(request).await?;
        let no_one = receipt.groups == 0 && self.inner.transport.capabilities().no_responders;
        let replies = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(self
            .collect_replies(spec, receipt.groups, !no_one, replies, end)
            .await)
    }

    /// Collects `replies` until `spec`'s limits or `end` (only when `wait`), and says
    /// who answered, who did not and whether the quorum was met. Shared by the inbox
    /// and the native gather paths.
    async fn collect_replies(
        &self,
        spec: &GatherSpec,
        groups: usize,
        wait: bool,
        replies: impl futures::Stream<Item = Envelope>,
        end: DateTime<Utc>,
    ) -> GatherResult<Envelope> {
        use futures::StreamExt;

        let mut result = GatherResult {
            replies: Vec::new(),
            responders: Vec::new(),
            missing: Vec::new(),
            timed_out: false,
            quorum_met: false,
            groups,
        };
        if wait {
            let sleep = self.inner.clock.sleep_until(end);
            tokio::pin!(sleep);
            tokio::pin!(replies);
            loop {
                if spec.max_replies.is_some_and(|n| result.replies.len() >= n) {
                    break;
                }
                if !spec.expected.is_empty()
                    && spec.expected.iter().all(|a| result.responders.contains(a))
                {
                    break;
                }
                tokio::select! {
                    reply = replies.next() => match reply {
                        Some(reply) => {
                            result.responders.push(reply.header.sender.clone().unwrap_or_else(|| "?".into()));
                            result.replies.push(reply);
                        }
                        None => break,
                    },
                    _ = &mut sleep => {
                        result.timed_out = true;
                        break;
                    }
                }
            }
        }
        result.missing = spec
            .expected
            .iter()
            .filter(|a| !result.responders.contains(a))
            .cloned()
            .collect();
        result.quorum_met = spec.quorum.is_none_or(|q| result.replies.len() >= q);
        result
    }

    /// Typed scatter-gather: replies that do not decode as `R` are skipped and counted
    /// as missing answers.
    ///
    /// # Errors
    /// Publish errors.
    pub async fn gather<Q: Message, R: Message>(
        &self,
        channel: &ChannelName,
        request: &Q,
        spec: &GatherSpec,
    ) -> Result<GatherResult<R>> {
        let envelope = self.envelope(channel, request, &PublishOptions::default())?;
        let raw = self.gather_envelope(envelope, spec).await?;
        let mut replies = Vec::new();
        let mut responders = Vec::new();
        for (reply, responder) in raw.replies.into_iter().zip(raw.responders) {
            match reply.decode_json::<R>() {
                Ok(value) => {
                    replies.push(value);
                    responders.push(responder);
                }
                Err(e) => tracing::warn!(error = %e, "gather reply skipped"),
            }
        }
        Ok(GatherResult {
            quorum_met: spec.quorum.is_none_or(|q| replies.len() >= q),
            replies,
            responders,
            missing: raw.missing,
            timed_out: raw.timed_out,
            groups: raw.groups,
        })
    }
}

fn no_responders(channel: &ChannelName) -> Error {
    Error::new(
        ErrorKind::NoResponders,
        format!(
            "no responders for a request on channel '{channel}': no group is subscribed to it; \
             start a responder or check the channel name"
        ),
    )
    .with_context("channel", channel)
}

struct WaiterGuard<'a> {
    waiters: &'a Waiters,
    id: MessageId,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.waiters.lock().remove(&self.id);
    }
}

async fn route_replies(mut consumer: Box<dyn Consumer>, waiters: Waiters) {
    loop {
        let Ok(batch) = consumer.next_batch(256).await else {
            return;
        };
        for delivery in batch {
            // Acked first: a reply is routed at most once, and a reply nobody waits for
            // any more is simply dropped.
            let _ = delivery.ack().await;
            let (envelope, _) = delivery.into_parts();
            let Some(request_id) = envelope.header.causation_id else {
                continue;
            };
            let mut waiters = waiters.lock();
            match waiters.remove(&request_id) {
                Some(Waiter::One(tx)) => {
                    let _ = tx.send(envelope);
                }
                Some(Waiter::Many(tx)) => {
                    // try_send: a full queue means the gather already has max_replies.
                    let _ = tx.try_send(envelope);
                    waiters.insert(request_id, Waiter::Many(tx));
                }
                None => {}
            }
        }
    }
}

/// A subscription through the bus: checks each message against the kind registry.
#[derive(Debug)]
pub struct Subscription {
    consumer: Box<dyn Consumer>,
    buffer: std::collections::VecDeque<Delivery>,
    batch: usize,
    registry: KindRegistry,
    strict_kinds: bool,
}

impl Subscription {
    /// The next valid delivery.
    ///
    /// A message whose payload does not decode for its registered kind — or, on a
    /// strict bus, whose kind is not registered — is rejected to dead letters with
    /// reason `schema`, and this returns that error ([`ErrorKind::Schema`] or
    /// [`ErrorKind::MessageKindNotRegistered`]) so the receiver learns of it; keep
    /// calling `next` to go on.
    ///
    /// # Errors
    /// [`ErrorKind::Closed`] when the transport shuts down; the per-message errors
    /// above.
    pub async fn next(&mut self) -> Result<Delivery> {
        if self.buffer.is_empty() {
            let batch = self.consumer.next_batch(self.batch).await?;
            self.buffer.extend(batch);
        }
        let delivery = self
            .buffer
            .pop_front()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "the engine returned an empty batch"))?;
        let checked = deliver_span(&delivery, self.consumer.group()).in_scope(|| {
            self.registry
                .validate(delivery.envelope(), self.strict_kinds)
        });
        if let Err(error) = checked {
            delivery
                .reject(DeadReason::Schema, error.to_string())
                .await?;
            return Err(error);
        }
        Ok(delivery)
    }

    /// Up to `max` deliveries already available, waiting for at least one. Invalid
    /// messages are dead-lettered and left out.
    ///
    /// # Errors
    /// [`ErrorKind::Closed`] when the transport shuts down.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        loop {
            let mut out: Vec<Delivery> = self.buffer.drain(..self.buffer.len().min(max)).collect();
            if out.is_empty() {
                out = self.consumer.next_batch(max).await?;
            }
            let mut valid = Vec::with_capacity(out.len());
            for delivery in out {
                match self
                    .registry
                    .validate(delivery.envelope(), self.strict_kinds)
                {
                    Ok(()) => valid.push(delivery),
                    Err(error) => {
                        tracing::warn!(%error, "message dead-lettered: schema");
                        delivery
                            .reject(DeadReason::Schema, error.to_string())
                            .await?;
                    }
                }
            }
            if !valid.is_empty() {
                return Ok(valid);
            }
        }
    }

    /// The group.
    pub fn group(&self) -> &str {
        self.consumer.group()
    }
}

/// The span of one delivery (covering its schema check).
fn deliver_span(delivery: &Delivery, group: &str) -> tracing::Span {
    let envelope = delivery.envelope();
    tracing::debug_span!(
        "agentbus.deliver",
        channel = %envelope.channel,
        kind = %envelope.header.kind,
        correlation_id = envelope.header.correlation_id.as_deref(),
        message_id = %envelope.header.id,
        attempt = envelope.header.attempt,
        group,
        traceparent = envelope.header.trace.as_deref(),
    )
}

/// A delivery with its decoded payload.
#[derive(Debug)]
pub struct Typed<M> {
    /// The decoded message.
    pub message: M,
    /// The delivery, to settle and to read the header from.
    pub delivery: Delivery,
}

/// A subscription that decodes every message as `M`.
#[derive(Debug)]
pub struct TypedSubscription<M> {
    inner: Subscription,
    _type: PhantomData<fn() -> M>,
}

impl<M: Message> TypedSubscription<M> {
    /// The next message of kind `M`, decoded. A message of another kind, or that does
    /// not decode, is dead-lettered with reason `schema` and returned as the error.
    ///
    /// # Errors
    /// As [`Subscription::next`].
    pub async fn next(&mut self) -> Result<Typed<M>> {
        let delivery = self.inner.next().await?;
        if delivery.envelope().header.kind != M::KIND {
            let error = Error::new(
                ErrorKind::Schema,
                format!(
                    "expected kind '{}' on channel '{}', got '{}'",
                    M::KIND,
                    delivery.envelope().channel,
                    delivery.envelope().header.kind
                ),
            );
            delivery
                .reject(DeadReason::Schema, error.to_string())
                .await?;
            return Err(error);
        }
        match delivery.envelope().decode_json::<M>() {
            Ok(message) => Ok(Typed { message, delivery }),
            Err(error) => {
                delivery
                    .reject(DeadReason::Schema, error.to_string())
                    .await?;
                Err(error)
            }
        }
    }
}
