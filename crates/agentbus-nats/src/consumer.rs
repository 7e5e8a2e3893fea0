//! A subscription: four lane consumers, a pump task, and the settler.
//!
//! The pump fetches (no-wait pull requests) from the lanes highest first, only as many
//! messages as the prefetch has room for, and hands them over an unbounded channel
//! (bounded in practice by the prefetch permits), so `next_batch` is cancel-safe.
//! It hands over each fetch's messages as one `Vec`, so a consumer wakes once per
//! fetch rather than once per message and gets batches as large as the fetch:
//! per-message wake-ups halved consume + ack throughput (docs/PERFORMANCE.md). Core requests are read by `next_batch` itself
//! from their subscription, without a task in between.
//! Deadlines, delays and max deliveries are applied here, before a message is handed
//! out. When there is nothing to fetch it sleeps until a new message on its pattern
//! rings the doorbell (a core NATS subscription, see [`Bell`]), a settle of its own
//! frees room, or `idle_poll` passes (for ack-wait redeliveries no publish announces).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    ChannelName, Consumer, DeadLetter, DeadReason, Delivery, Envelope, Error, ErrorKind, MessageId,
    Result, Settlement, Settler, SubscribeOptions,
};
use async_nats::jetstream::consumer::{self, pull, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::Subject;

/// Where a delivery is settled: its JetStream reply subject.
type Acker = Subject;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use crate::options::invalid_input;
use crate::transport::{backend, consumer_name, deliver_policy, Inner};
use crate::wire::{self, LANES};

/// What the pump reads from a fetched message's reply subject (parsed once).
#[derive(Debug, Clone, Copy)]
struct Meta {
    sequence: u64,
    delivered: u32,
    /// Messages left for the lane consumer after this one.
    pending: u64,
    /// When the stream stored it, in Unix nanoseconds (for a channel's `max_age`;
    /// turned into a time only when a channel has one).
    stored_nanos: i128,
}

impl Meta {
    fn of(message: &async_nats::jetstream::Message) -> Option<Meta> {
        if let Some(meta) = message.reply.as_deref().and_then(Meta::parse) {
            return Some(meta);
        }
        match message.info() {
            Ok(info) => Some(Meta {
                sequence: info.stream_sequence,
                delivered: info.delivered.max(1) as u32,
                pending: info.pending,
                stored_nanos: info.published.unix_timestamp_nanos(),
            }),
            Err(e) => {
                tracing::warn!("a JetStream message without metadata: {e}");
                None
            }
        }
    }

    /// The numbers of a reply subject in JetStream's short form,
    /// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
    /// read without building async-nats's `Info` (which also turns the time into a
    /// calendar date: about two thirds of the work, per message). `None` for any other
    /// form (the domain form of a leaf node), which [`Meta::of`] leaves to async-nats.
    fn parse(reply: &str) -> Option<Meta> {
        let rest = reply.strip_prefix("$JS.ACK.")?.as_bytes();
        // `<stream>.<consumer>.` (names hold no dots), then five numbers, read in one
        // pass: searching back for each dot and counting the names' dots cost about
        // 900 instructions per consumed message (callgrind).
        let stream_end = memchr::memchr(b'.', rest)?;
        let names_end = stream_end + 1 + memchr::memchr(b'.', &rest[stream_end + 1..])?;
        let mut at = names_end + 1;
        let mut numbers = [0u64; 5];
        for (index, number) in numbers.iter_mut().enumerate() {
            let start = at;
            while let Some(&b) = rest.get(at).filter(|b| b.is_ascii_digit()) {
                if at - start == 19 {
                    return None;
                }
                *number = *number * 10 + u64::from(b - b'0');
                at += 1;
            }
            if at == start {
                return None;
            }
            // A dot between numbers; nothing after the last.
            match rest.get(at) {
                Some(b'.') if index < 4 => at += 1,
                None if index == 4 => {}
                _ => return None,
            }
        }
        let [delivered, sequence, _consumer_sequence, stored, pending] = numbers;
        Some(Meta {
            sequence,
            delivered: delivered.clamp(1, u64::from(u32::MAX)) as u32,
            pending,
            stored_nanos: i128::from(stored),
        })
    }

    /// When the stream stored the message.
    fn stored(&self) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp_nanos(self.stored_nanos)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    }
}

/// A fetched message that is not handed out, and how it is settled.
enum TurnedAway {
    /// Unreadable, or older than its channel's `max_age` (then counted in the
    /// channel's `dropped`): terminated.
    Terminate {
        acker: Acker,
        dropped: Option<ChannelName>,
    },
    /// Past its deadline, or out of deliveries: dead-lettered, then terminated.
    DeadLetter {
        acker: Acker,
        envelope: Box<Envelope>,
        reason: DeadReason,
        attempts: u32,
        error: String,
    },
}

/// One delivery handed out and not settled yet.
#[derive(Debug)]
struct Flight {
    acker: Acker,
    attempt: u32,
    envelope: Arc<Envelope>,
    /// Held while the delivery counts against the prefetch; released when settled or
    /// when its ack wait passed (the server redelivers it then).
    permit: Option<OwnedSemaphorePermit>,
    at: Instant,
}

/// A message fetched before its `not_before`: held in flight (its ack wait extended)
/// until due, so the attempt count stays right.
#[derive(Debug)]
struct Deferred {
    acker: Acker,
    attempt: u32,
    envelope: Envelope,
    sequence: u64,
    due: Instant,
    progressed: Instant,
}

/// State shared by the consumer, its pump and its deliveries.
#[derive(Debug)]
pub(crate) struct Shared {
    inner: Arc<Inner>,
    group: Arc<str>,
    private: bool,
    max_deliveries: u32,
    ack_wait: Duration,
    /// Token → delivery; tokens are handed out in sequence, so Fx hashing suffices.
    flights: Mutex<FxHashMap<u64, Flight>>,
    deferred: Mutex<Vec<Deferred>>,
    next_token: AtomicU64,
    wake: Notify,
    /// Lanes (bits in the order of [`LANES`]) a nack just refilled.
    nacked: AtomicU8,
    permits: Arc<Semaphore>,
    /// `<prefix>_rq.`: what a core request's subject starts with.
    request_prefix: String,
}

/// The `Consumer` of a NATS subscription.
#[derive(Debug)]
pub(crate) struct NatsConsumer {
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Vec<Delivery>>,
    /// Deliveries received from the pump and not returned by `next_batch` yet (a run
    /// can be longer than the `max` asked for).
    buffer: VecDeque<Delivery>,
    /// Core requests on the pattern; `None` once the subscription ended.
    requests: Option<async_nats::Subscriber>,
    /// A core request that arrived while the prefetch was full: handed out as soon as
    /// a delivery is settled.
    waiting: Option<async_nats::Message>,
    /// The channel of the last core request (see `wire::decode_core`).
    request_channel: Option<ChannelName>,
    pump: tokio::task::JoinHandle<()>,
}

/// What `next_batch` woke up for.
enum Woke {
    Run(Option<Vec<Delivery>>),
    Request(Option<async_nats::Message>),
    Room(OwnedSemaphorePermit),
}

/// The next core request, or never when the subscription is gone.
async fn next_request(
    requests: &mut Option<async_nats::Subscriber>,
) -> Option<async_nats::Message> {
    match requests {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

impl NatsConsumer {
    /// Creates or joins the group's lane consumers and starts the pump.
    pub(crate) async fn open(inner: Arc<Inner>, options: SubscribeOptions) -> Result<Self> {
        let private = options.group.is_none();
        let group = options
            .group
            .clone()
            .unwrap_or_else(|| format!("_private-{}", uuid::Uuid::new_v4().simple()));
        let prefix = inner.options.prefix.clone();
        let pattern = options.pattern.as_str().to_string();
        let mut lanes = Vec::with_capacity(LANES.len());
        for lane in LANES {
            let name = consumer_name(&group, lane);
            let filter = wire::lane_filter(&prefix, lane, &pattern);
            let existing = inner.stream.get_consumer::<pull::Config>(&name).await;
            let consumer: PullConsumer = match existing {
                Ok(mut c) => {
                    let info = c
                        .info()
                        .await
                        .map_err(|e| backend(format!("reading consumer '{name}'"), e))?;
                    if info.config.filter_subject != filter {
                        let had = info
                            .config
                            .filter_subject
                            .split_once('.')
                            .and_then(|(_, r)| r.split_once('.'))
                            .map_or(info.config.filter_subject.as_str(), |(_, p)| p)
                            .to_string();
                        return Err(invalid_input(format!(
                            "group '{group}' follows pattern '{had}', not '{pattern}': a group \
                             has one pattern; pick another group name"
                        )));
                    }
                    c
                }
                Err(e) if e.to_string().to_lowercase().contains("not found") => {
                    let config = pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: filter.clone(),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: options.ack_wait,
                        max_deliver: -1,
                        max_ack_pending: inner.options.max_ack_pending,
                        deliver_policy: deliver_policy(options.start),
                        inactive_threshold: if private {
                            inner.options.private_inactive_threshold
                        } else {
                            Duration::ZERO
                        },
                        ..Default::default()
                    };
                    match inner.stream.create_consumer(config).await {
                        Ok(c) => c,
                        // Another member created it meanwhile: join it.
                        Err(_) => inner
                            .stream
                            .get_consumer::<pull::Config>(&name)
                            .await
                            .map_err(|e| backend(format!("creating consumer '{name}'"), e))?,
                    }
                }
                Err(e) => return Err(backend(format!("reading consumer '{name}'"), e)),
            };
            inner.learn_group(&name, &filter);
            lanes.push(consumer);
        }
        // The group's settings are the creator's (as in the memory engine).
        let info = lanes[0].cached_info().config.clone();
        let mut bell = Bell::new(inner.client.clone(), &prefix, &pattern);
        bell.arm()
            .await
            .map_err(|e| backend("subscribing to new-message notices", e))?;
        // Core requests (Bus::request) on this pattern: one member of the group each.
        let request_subject = wire::request_subject(&prefix, &pattern);
        let requests = if private {
            inner.client.subscribe(request_subject).await
        } else {
            inner
                .client
                .queue_subscribe(request_subject, group.clone())
                .await
        }
        .map_err(|e| backend("subscribing to core requests", e))?;
        *inner.members.lock().entry(group.clone()).or_insert(0) += 1;
        let shared = Arc::new(Shared {
            inner: inner.clone(),
            group: group.into(),
            private,
            max_deliveries: options.max_deliveries,
            ack_wait: info.ack_wait,
            flights: Mutex::new(FxHashMap::default()),
            deferred: Mutex::new(Vec::new()),
            next_token: AtomicU64::new(1),
            wake: Notify::new(),
            nacked: AtomicU8::new(0),
            permits: Arc::new(Semaphore::new(options.prefetch)),
            request_prefix: wire::request_subject(&prefix, ""),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(shared.clone(), lanes, bell, tx));
        Ok(NatsConsumer {
            shared,
            rx,
            buffer: VecDeque::new(),
            requests: Some(requests),
            waiting: None,
            request_channel: None,
            pump,
        })
    }
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        let closed = || {
            Error::new(
                ErrorKind::Closed,
                "the NATS transport was closed; this subscription delivers nothing more",
            )
        };
        if *self.shared.inner.closed.borrow() {
            return Err(closed());
        }
        // Cancel-safe: every await below is; what arrived is stored in `self` before
        // the next await.
        while self.buffer.is_empty() {
            if let Some(request) = self.waiting.take() {
                match self.shared.permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        self.buffer.extend(self.shared.admit_core(
                            request,
                            permit,
                            &mut self.request_channel,
                        ));
                        continue;
                    }
                    Err(_) => self.waiting = Some(request),
                }
            }
            let waiting = self.waiting.is_some();
            let permits = self.shared.permits.clone();
            let woke = tokio::select! {
                run = self.rx.recv() => Woke::Run(run),
                request = next_request(&mut self.requests), if !waiting => Woke::Request(request),
                Ok(permit) = permits.acquire_owned(), if waiting => Woke::Room(permit),
            };
            match woke {
                Woke::Run(run) => self.buffer.extend(run.ok_or_else(closed)?),
                Woke::Request(Some(request)) => self.waiting = Some(request),
                Woke::Request(None) => self.requests = None,
                Woke::Room(permit) => {
                    if let Some(request) = self.waiting.take() {
                        self.buffer.extend(self.shared.admit_core(
                            request,
                            permit,
                            &mut self.request_channel,
                        ));
                    }
                }
            }
        }
        while self.buffer.len() < max {
            match self.rx.try_recv() {
                Ok(run) => self.buffer.extend(run),
                Err(_) => break,
            }
        }
        let n = max.min(self.buffer.len());
        Ok(self.buffer.drain(..n).collect())
    }

    fn group(&self) -> &str {
        &self.shared.group
    }
}

impl Drop for NatsConsumer {
    fn drop(&mut self) {
        self.pump.abort();
        let shared = self.shared.clone();
        if let Some(n) = shared.inner.members.lock().get_mut(&*shared.group) {
            *n = n.saturating_sub(1);
        }
        // Unsettled deliveries go back to the group at once.
        let flights: Vec<Flight> = shared.flights.lock().drain().map(|(_, f)| f).collect();
        let deferred: Vec<Deferred> = shared.deferred.lock().drain(..).collect();
        if shared.private {
            shared.inner.forget_group(&shared.group);
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            for flight in flights.into_iter().filter(|f| f.permit.is_some()) {
                let _ = shared.send_ack(&flight.acker, AckKind::Nak(None)).await;
            }
            let now = Instant::now();
            for d in deferred {
                let delay = d.due.saturating_duration_since(now);
                let _ = shared.send_ack(&d.acker, AckKind::Nak(Some(delay))).await;
            }
            if shared.private {
                for lane in LANES {
                    let name = consumer_name(&shared.group, lane);
                    let _ = shared.inner.stream.delete_consumer(&name).await;
                }
            }
        });
    }
}

/// The error for a token no longer in flight.
fn already_settled() -> Error {
    Error::new(
        ErrorKind::AlreadySettled,
        "this delivery was already settled, handed back or dead-lettered",
    )
}

#[async_trait]
impl Settler for Shared {
    // Not `async fn`: acking a core request, once per request/reply, is settled here
    // without building (and boxing) the future of the general path, which holds a
    // dead-letter write and a flush (about 500 instructions, callgrind).
    fn settle<'life0, 'async_trait>(
        &'life0 self,
        token: u64,
        settlement: Settlement,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let Some(flight) = self.flights.lock().remove(&token) else {
            return Box::pin(std::future::ready(Err(already_settled())));
        };
        // The pump needs waking only when it may be waiting for room (the prefetch was
        // full) or a nack refilled a lane; other wake-ups cost a loop for nothing.
        let wake = matches!(settlement, Settlement::Nack { .. })
            || (flight.permit.is_some() && self.permits.available_permits() == 0);
        // A core request has nothing to settle on the server, so nothing to flush.
        let core = flight.acker.is_empty();
        if core && matches!(settlement, Settlement::Ack) {
            drop(flight);
            if wake {
                self.wake.notify_one();
            }
            return Box::pin(std::future::ready(Ok(())));
        }
        Box::pin(async move {
            let result = self.apply(&flight, settlement).await;
            drop(flight);
            if wake {
                self.wake.notify_one();
            }
            result?;
            if core {
                return Ok(());
            }
            self.flush().await
        })
    }

    async fn settle_many(&self, batch: Vec<(u64, Settlement)>) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(batch.len());
        // One lock for the whole batch, not one per delivery.
        let taken: Vec<(Option<Flight>, Settlement)> = {
            let mut flights = self.flights.lock();
            batch
                .into_iter()
                .map(|(token, settlement)| (flights.remove(&token), settlement))
                .collect()
        };
        for (flight, settlement) in taken {
            results.push(match flight {
                Some(flight) => self.apply(&flight, settlement).await,
                None => Err(already_settled()),
            });
        }
        self.wake.notify_one();
        // One round trip for the whole batch.
        if let Err(e) = self.flush().await {
            for result in results.iter_mut().filter(|r| r.is_ok()) {
                *result = Err(Error::new(e.kind(), e.message().to_string()));
            }
        }
        results
    }
}

impl Shared {
    /// Waits until every settlement sent so far was written to the connection's
    /// socket (async-nats's flush: no server round trip), so a settle that returned
    /// `Ok` is not lost in the client's buffer when the process exits right after.
    async fn flush(&self) -> Result<()> {
        self.inner
            .client
            .flush()
            .await
            .map_err(|e| backend("sending settlements", e))
    }

    /// Settles on the server: a publish to the reply subject, as JetStream clients
    /// do; [`Shared::flush`] makes sure it left (a lost ack means a redelivery, never
    /// a loss).
    async fn send_ack(
        &self,
        reply: &Subject,
        kind: AckKind,
    ) -> std::result::Result<(), async_nats::PublishError> {
        if reply.is_empty() {
            // A core request: nothing to settle on the server.
            return Ok(());
        }
        self.inner
            .client
            .publish(reply.clone(), bytes::Bytes::from(kind))
            .await
    }

    async fn apply(&self, flight: &Flight, settlement: Settlement) -> Result<()> {
        match settlement {
            Settlement::Ack => self
                .send_ack(&flight.acker, AckKind::Ack)
                .await
                .map_err(|e| backend("acking", e)),
            Settlement::Nack { delay, error } => {
                if flight.attempt >= self.max_deliveries {
                    let error = error.unwrap_or_else(|| {
                        format!(
                            "nacked on delivery {} of {}",
                            flight.attempt, self.max_deliveries
                        )
                    });
                    self.dead_letter(
                        &flight.envelope,
                        DeadReason::MaxDeliveries,
                        flight.attempt,
                        Some(error),
                    )
                    .await?;
                    return self
                        .send_ack(&flight.acker, AckKind::Term)
                        .await
                        .map_err(|e| backend("terminating a dead-lettered message", e));
                }
                let kind = if delay.is_zero() {
                    AckKind::Nak(None)
                } else {
                    AckKind::Nak(Some(delay))
                };
                self.send_ack(&flight.acker, kind)
                    .await
                    .map_err(|e| backend("nacking", e))?;
                if delay.is_zero() {
                    // Sent before the pump's next pull on this connection: look there.
                    let lane = flight.envelope.header.priority.as_u8().clamp(1, 4);
                    self.nacked.fetch_or(1 << (4 - lane), Ordering::AcqRel);
                }
                Ok(())
            }
            Settlement::Reject { reason, error } => {
                self.dead_letter(&flight.envelope, reason, flight.attempt, Some(error))
                    .await?;
                self.send_ack(&flight.acker, AckKind::Term)
                    .await
                    .map_err(|e| backend("terminating a rejected message", e))
            }
        }
    }

    async fn dead_letter(
        &self,
        envelope: &Envelope,
        reason: DeadReason,
        attempts: u32,
        last_error: Option<String>,
    ) -> Result<()> {
        if reason == DeadReason::Expired {
            self.inner.expired.fetch_add(1, Ordering::Relaxed);
        }
        let mut envelope = envelope.clone();
        envelope.header.attempt = attempts;
        self.inner
            .dead_letter(&DeadLetter {
                id: MessageId::new(),
                envelope,
                group: self.group.to_string(),
                reason,
                attempts,
                last_error,
                dead_at: Utc::now(),
            })
            .await
    }

    /// A core request: handed out at once (it cannot wait on the server), or
    /// dead-lettered `expired` past its deadline. Settling it does nothing on the
    /// server: core requests are at most once; the requester times out if no reply.
    fn admit_core(
        self: &Arc<Self>,
        message: async_nats::Message,
        permit: OwnedSemaphorePermit,
        last_channel: &mut Option<ChannelName>,
    ) -> Option<Delivery> {
        let channel = message
            .subject
            .as_str()
            .strip_prefix(self.request_prefix.as_str())?;
        let mut envelope = match wire::decode_core(
            channel,
            last_channel,
            message.headers.as_ref(),
            message.payload,
        ) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("dropping a core request agentbus cannot read: {e}");
                return None;
            }
        };
        envelope.header.attempt = 1;
        // A request's reply goes to the NATS reply subject (the requester's inbox).
        if let Some(reply) = message.reply.as_ref() {
            match ChannelName::new(reply.as_str()) {
                Ok(reply) => envelope.header.reply_to = Some(reply),
                Err(e) => tracing::warn!("a core request's reply subject is no channel name: {e}"),
            }
        }
        if envelope.header.deadline.is_some_and(|d| d <= Utc::now()) {
            // Written by a task so that `next_batch` stays cancel-safe.
            let shared = self.clone();
            tokio::spawn(async move {
                let _ = shared
                    .dead_letter(
                        &envelope,
                        DeadReason::Expired,
                        0,
                        Some("deadline passed before delivery".into()),
                    )
                    .await;
            });
            return None;
        }
        Some(self.hand_out_with(Some(permit), Subject::from_static(""), 1, envelope, 0))
    }

    /// Decides what to do with a message fetched from a lane: the delivery to hand
    /// out, `None` when it is deferred (or has no reply subject), or how it is turned
    /// away ([`Shared::turn_away`] settles that).
    ///
    /// Not `async`: the pump calls this for every message, and a future holding the
    /// rare paths (a dead-letter write) was built and copied each time (about 600
    /// instructions per consumed message, callgrind).
    fn admit(
        self: &Arc<Self>,
        message: async_nats::jetstream::Message,
        meta: Meta,
        last_channel: &mut Option<ChannelName>,
    ) -> std::result::Result<Option<Delivery>, TurnedAway> {
        let Meta {
            sequence,
            delivered,
            ..
        } = meta;
        let raw = message.message;
        let Some(acker) = raw.reply.clone() else {
            tracing::warn!(sequence, "a JetStream message without a reply subject");
            return Ok(None);
        };
        let mut envelope = match wire::decode(
            &self.inner.options.prefix,
            raw.subject.as_str(),
            last_channel,
            raw.headers.as_ref(),
            raw.payload,
        ) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(sequence, "dropping a message agentbus cannot read: {e}");
                return Err(TurnedAway::Terminate {
                    acker,
                    dropped: None,
                });
            }
        };
        envelope.header.attempt = delivered;
        // A channel's `max_age`: JetStream ages messages out per stream only, so an
        // older message is dropped here, for this group, as the memory engine trims
        // it: never handed out, terminated, counted in the channel's `dropped`.
        let max_age = self
            .inner
            .config_for(&envelope.channel)
            .and_then(|c| c.max_age);
        if max_age.is_some_and(|max_age| time::OffsetDateTime::now_utc() - meta.stored() > max_age)
        {
            return Err(TurnedAway::Terminate {
                acker,
                dropped: Some(envelope.channel),
            });
        }
        // The clock only for a message with a deadline or a delay.
        let timed = envelope.header.deadline.is_some() || envelope.header.not_before.is_some();
        let now = if timed {
            Utc::now()
        } else {
            DateTime::<Utc>::UNIX_EPOCH
        };
        if envelope.header.deadline.is_some_and(|d| d <= now) {
            return Err(TurnedAway::DeadLetter {
                acker,
                envelope: Box::new(envelope),
                reason: DeadReason::Expired,
                attempts: delivered.saturating_sub(1),
                error: "deadline passed before delivery".into(),
            });
        }
        if delivered > self.max_deliveries {
            let error = format!(
                "ack_wait of {:?} expired on delivery {} of {}",
                self.ack_wait, self.max_deliveries, self.max_deliveries
            );
            envelope.header.attempt = self.max_deliveries;
            return Err(TurnedAway::DeadLetter {
                acker,
                envelope: Box::new(envelope),
                reason: DeadReason::MaxDeliveries,
                attempts: self.max_deliveries,
                error,
            });
        }
        if let Some(not_before) = envelope.header.not_before {
            if not_before > now {
                let wait = (not_before - now).to_std().unwrap_or_default();
                let at = Instant::now();
                self.deferred.lock().push(Deferred {
                    acker,
                    attempt: delivered,
                    envelope,
                    sequence,
                    due: at + wait,
                    progressed: at,
                });
                return Ok(None);
            }
        }
        Ok(Some(self.hand_out(acker, delivered, envelope, sequence)))
    }

    /// Settles a fetched message that [`Shared::admit`] turned away.
    async fn turn_away(&self, turned: TurnedAway) {
        match turned {
            TurnedAway::Terminate { acker, dropped } => {
                let _ = self.send_ack(&acker, AckKind::Term).await;
                if let Some(channel) = dropped {
                    self.inner.count_dropped(&channel);
                }
            }
            TurnedAway::DeadLetter {
                acker,
                envelope,
                reason,
                attempts,
                error,
            } => {
                if self
                    .dead_letter(&envelope, reason, attempts, Some(error))
                    .await
                    .is_ok()
                {
                    let _ = self.send_ack(&acker, AckKind::Term).await;
                }
            }
        }
    }

    fn hand_out(
        self: &Arc<Self>,
        acker: Acker,
        attempt: u32,
        envelope: Envelope,
        sequence: u64,
    ) -> Delivery {
        let permit = self.permits.clone().try_acquire_owned().ok();
        self.hand_out_with(permit, acker, attempt, envelope, sequence)
    }

    fn hand_out_with(
        self: &Arc<Self>,
        permit: Option<OwnedSemaphorePermit>,
        acker: Acker,
        attempt: u32,
        envelope: Envelope,
        sequence: u64,
    ) -> Delivery {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let envelope = Arc::new(envelope);
        self.flights.lock().insert(
            token,
            Flight {
                acker,
                attempt,
                envelope: envelope.clone(),
                permit,
                at: Instant::now(),
            },
        );
        let settler: Arc<dyn Settler> = self.clone();
        Delivery::new(envelope, sequence, self.group.clone(), token, settler)
    }

    /// Releases the prefetch room of deliveries whose ack wait passed (the server
    /// redelivers them), forgets long-abandoned ones, and keeps deferred messages alive.
    async fn housekeeping(&self) {
        let now = Instant::now();
        {
            let mut flights = self.flights.lock();
            let forget = self.ack_wait * 10 + Duration::from_secs(60);
            flights.retain(|_, f| now.duration_since(f.at) < forget);
            for f in flights.values_mut() {
                if f.permit.is_some() && now.duration_since(f.at) >= self.ack_wait {
                    f.permit = None;
                }
            }
        }
        let progress_every = self.ack_wait / 3;
        let mut touch = Vec::new();
        {
            let mut deferred = self.deferred.lock();
            for d in deferred.iter_mut() {
                if now.duration_since(d.progressed) >= progress_every {
                    d.progressed = now;
                    touch.push(d.acker.clone());
                }
            }
        }
        for acker in touch {
            let _ = self.send_ack(&acker, AckKind::Progress).await;
        }
    }

    /// Deferred messages that are due, oldest due first, at most `room`.
    fn take_due(&self, room: usize) -> Vec<Deferred> {
        let now = Instant::now();
        let mut deferred = self.deferred.lock();
        deferred.sort_by_key(|d| d.due);
        let n = deferred
            .iter()
            .take(room)
            .take_while(|d| d.due <= now)
            .count();
        deferred.drain(..n).collect()
    }

    fn next_due(&self) -> Option<Instant> {
        self.deferred.lock().iter().map(|d| d.due).min()
    }
}

/// The longest one pull request may stay unanswered.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The doorbell: one core NATS subscription per lane on `<prefix>.<lane>.<pattern>`,
/// the subjects the stream stores, so every publish on a matching channel rings its
/// lane's bell with a copy of the message. An idle pump sleeps until one rings. A
/// notice of a lane the pump already knows has more pending is of no use: the pump
/// asks that lane again anyway and fetches the message, so the copy is received only
/// to be dropped. After [`Bell::DISARM_AFTER`] such notices of a lane without an
/// idle sleep in between the pump unsubscribes that lane (the other lanes keep
/// ringing, so a message of a higher priority is still seen at once), and it
/// subscribes again, followed by a sweep of every lane, when it next runs out of work
/// with room to spare.
struct Bell {
    client: async_nats::Client,
    /// Per lane, in the order of [`LANES`].
    subjects: Vec<String>,
    subscribers: Vec<Option<async_nats::Subscriber>>,
    /// Per lane: notices dropped while the lane was known to have more pending, since
    /// the pump last slept idle.
    redundant: [u32; 4],
}

impl Bell {
    /// Redundant notices of a lane before it is unsubscribed: enough that a consumer
    /// keeping up with a moderate stream (a notice, a fetch, a sleep) never is.
    const DISARM_AFTER: u32 = 256;

    fn new(client: async_nats::Client, prefix: &str, pattern: &str) -> Self {
        Bell {
            client,
            subjects: LANES
                .iter()
                .map(|&lane| wire::lane_filter(prefix, lane, pattern))
                .collect(),
            subscribers: LANES.iter().map(|_| None).collect(),
            redundant: [0; 4],
        }
    }

    /// Subscribes every lane that is not; true when one was just now (the caller
    /// then sweeps every lane: what was published while unsubscribed rang nothing).
    async fn arm(&mut self) -> Result<bool, async_nats::SubscribeError> {
        let mut armed = false;
        for (subject, subscriber) in self.subjects.iter().zip(self.subscribers.iter_mut()) {
            if subscriber.is_none() {
                *subscriber = Some(self.client.subscribe(subject.clone()).await?);
                armed = true;
            }
        }
        Ok(armed)
    }

    /// The lanes (bits in the order of [`LANES`]) whose notices were waiting, which
    /// are dropped; `known` are the lanes known to have more pending, whose notices
    /// are redundant. Unsubscribes a lane with too many of those.
    fn drain(&mut self, known: u8) -> u8 {
        let mut rang = 0;
        for (i, slot) in self.subscribers.iter_mut().enumerate() {
            let Some(subscriber) = slot.as_mut() else {
                continue;
            };
            let bit = 1 << i;
            while let Some(Some(_)) = subscriber.next().now_or_never() {
                rang |= bit;
                if known & bit != 0 {
                    self.redundant[i] += 1;
                }
            }
            if self.redundant[i] >= Self::DISARM_AFTER {
                // Dropping the subscriber unsubscribes.
                *slot = None;
                self.redundant[i] = 0;
            }
        }
        rang
    }

    /// The pump sleeps idle: notices are what wakes it now.
    fn idle(&mut self) {
        self.redundant = [0; 4];
    }

    /// The lane bit of the next notice; never while no lane is subscribed.
    async fn next(&mut self) -> u8 {
        std::future::poll_fn(|cx| {
            for (i, slot) in self.subscribers.iter_mut().enumerate() {
                if let Some(subscriber) = slot.as_mut() {
                    match subscriber.poll_next_unpin(cx) {
                        std::task::Poll::Ready(Some(_)) => return std::task::Poll::Ready(1 << i),
                        // The subscription ended (the connection is closing): subscribe
                        // again at the next idle sleep.
                        std::task::Poll::Ready(None) => *slot = None,
                        std::task::Poll::Pending => {}
                    }
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

async fn pump(
    shared: Arc<Shared>,
    lanes: Vec<PullConsumer>,
    mut bell: Bell,
    tx: mpsc::UnboundedSender<Vec<Delivery>>,
) {
    let mut closed = shared.inner.closed.subscribe();
    let idle_poll = shared.inner.options.idle_poll;
    let mut failures = 0u32;
    // Lanes to ask: those whose notice rang or that a nack refilled, and those whose
    // last fetched message said more were pending; every lane on a full sweep (at
    // start, after an idle timer, and at least every `idle_poll` while busy).
    let mut rang = 0u8;
    let mut known = 0u8;
    let mut force_full = true;
    // Set by re-subscribing to notices: the next idle sleep is short.
    let mut recheck = false;
    let mut last_full = Instant::now();
    // The channel of the last message decoded (see `wire::decode`).
    let mut last_channel = None;
    loop {
        if *closed.borrow() || tx.is_closed() {
            return;
        }
        // Notices are only wake-up calls: note which lanes rang, drop the rest.
        rang |= bell.drain(known);
        rang |= shared.nacked.swap(0, Ordering::AcqRel);
        shared.housekeeping().await;
        let room = shared.permits.available_permits();
        let mut asked = 0u8;
        let mut full = false;
        let mut handed = 0usize;
        // Deliveries not handed over yet: sent as one run when no more messages are
        // ready right now (see the module comment).
        let mut run: Vec<Delivery> = Vec::new();
        if room > 0 {
            for d in shared.take_due(room) {
                let now = Utc::now();
                if d.envelope.header.deadline.is_some_and(|t| t <= now) {
                    if shared
                        .dead_letter(
                            &d.envelope,
                            DeadReason::Expired,
                            d.attempt.saturating_sub(1),
                            Some("deadline passed before delivery".into()),
                        )
                        .await
                        .is_ok()
                    {
                        let _ = shared.send_ack(&d.acker, AckKind::Term).await;
                    }
                    continue;
                }
                run.push(shared.hand_out(d.acker, d.attempt, d.envelope, d.sequence));
                handed += 1;
            }
            full = force_full || last_full.elapsed() >= idle_poll;
            if full {
                force_full = false;
                last_full = Instant::now();
            }
            let only = if full { 0b1111 } else { rang | known };
            'lanes: for (i, lane) in lanes.iter().enumerate() {
                let want = room.saturating_sub(handed);
                if want == 0 {
                    break;
                }
                if only & (1 << i) == 0 {
                    continue;
                }
                asked |= 1 << i;
                known &= !(1 << i);
                // Bounded: while the connection is down a request may never be answered.
                let fetched =
                    tokio::time::timeout(FETCH_TIMEOUT, lane.fetch().max_messages(want).messages())
                        .await;
                let mut batch = match fetched {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        failures += 1;
                        if failures == 1 || failures % 50 == 0 {
                            tracing::warn!(group = &*shared.group, "fetching failed: {e}");
                        }
                        break 'lanes;
                    }
                    Err(_) => {
                        failures += 1;
                        if failures == 1 || failures % 50 == 0 {
                            tracing::warn!(
                                group = &*shared.group,
                                "a fetch got no answer within {FETCH_TIMEOUT:?}"
                            );
                        }
                        break 'lanes;
                    }
                };
                // Each wait for the next message may last FETCH_TIMEOUT. One timer for
                // the whole fetch, moved on only when it fires early: a timeout around
                // each wait registered a timer per message, about 500 instructions.
                let mut last_seen = Instant::now();
                let silence = tokio::time::sleep(FETCH_TIMEOUT);
                tokio::pin!(silence);
                loop {
                    let next = tokio::select! {
                        biased;
                        next = batch.next() => next,
                        () = &mut silence => {
                            if last_seen.elapsed() < FETCH_TIMEOUT {
                                silence.as_mut().reset((last_seen + FETCH_TIMEOUT).into());
                                continue;
                            }
                            tracing::debug!(
                                group = &*shared.group,
                                "a fetch got no answer in time"
                            );
                            break;
                        }
                    };
                    let Some(message) = next else {
                        break;
                    };
                    last_seen = Instant::now();
                    let message = match message {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::debug!(group = &*shared.group, "fetch ended: {e}");
                            break;
                        }
                    };
                    failures = 0;
                    let Some(meta) = Meta::of(&message) else {
                        continue;
                    };
                    if meta.pending > 0 {
                        known |= 1 << i;
                    } else {
                        known &= !(1 << i);
                    }
                    match shared.admit(message, meta, &mut last_channel) {
                        Ok(Some(delivery)) => {
                            handed += 1;
                            run.push(delivery);
                        }
                        Ok(None) => {}
                        Err(turned) => shared.turn_away(turned).await,
                    }
                }
                // The whole fetch as one run (a no-wait pull ends as soon as the lane
                // has nothing more): handing over part of it made the consumer settle
                // part, and every later fetch was sized to that part.
                if !run.is_empty() && tx.send(std::mem::take(&mut run)).is_err() {
                    return;
                }
            }
        }
        if !run.is_empty() && tx.send(run).is_err() {
            return;
        }
        rang &= !asked;
        if handed > 0 || (room > 0 && (rang | known) != 0) {
            continue;
        }
        let mut sleep_for = idle_poll;
        if failures > 0 {
            sleep_for = sleep_for.max(Duration::from_millis(250));
        }
        if !full && asked != 0 {
            // A notice can overtake the stream's store of its message: look again soon.
            sleep_for = sleep_for.min(Duration::from_millis(2));
        }
        if let Some(due) = shared.next_due() {
            sleep_for = sleep_for.min(due.saturating_duration_since(Instant::now()));
        }
        if room > 0 {
            // Idle with room: the bell is what wakes the pump for the next message.
            match bell.arm().await {
                Ok(true) => {
                    // Subscribed again: sweep for what rang nothing meanwhile, and
                    // look once more soon (a message published just before the
                    // subscription took effect may not be stored yet).
                    force_full = true;
                    recheck = true;
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    failures += 1;
                    tracing::debug!(group = &*shared.group, "resubscribing to notices: {e}");
                }
            }
            bell.idle();
            if std::mem::take(&mut recheck) {
                sleep_for = sleep_for.min(Duration::from_millis(2));
            }
        }
        tokio::select! {
            lane = bell.next(), if room > 0 => rang |= lane,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(sleep_for) => force_full = true,
            _ = closed.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_subjects_are_read_without_async_nats_info() {
        let meta = Meta::parse("$JS.ACK.jobs.g-L2.3.1207.1199.1764117773560487515.42").unwrap();
        assert_eq!(
            (
                meta.sequence,
                meta.delivered,
                meta.pending,
                meta.stored_nanos
            ),
            (1207, 3, 42, 1_764_117_773_560_487_515)
        );
        assert_eq!(meta.stored().unix_timestamp(), 1_764_117_773);
        // The domain form (and anything else) is left to async-nats.
        for other in [
            "$JS.ACK.hub.acc.jobs.g-L2.3.1207.1199.1764117773560487515.42.7",
            "$JS.ACK.jobs.g-L2.x.1207.1199.1764117773560487515.42",
            "$JS.ACK.g-L2.3.1207.1199.1764117773560487515.42",
            "$JS.ACK.jobs.g-L2.3.1207.1199.17641177735604875150.42",
            "$JS.ACK.jobs.g-L2.3.1207.1199.1764117773560487515.42.",
            "$JS.ACK.jobs.g-L2.3.1207..1764117773560487515.42",
            "_INBOX.abc.1",
            "",
        ] {
            assert!(Meta::parse(other).is_none(), "{other}");
        }
    }

    proptest::proptest! {
        #[test]
        fn reply_subjects_round_trip(
            numbers in proptest::array::uniform5(0u64..=9_999_999_999_999_999_999),
            stream in "[a-zA-Z0-9_-]{1,12}",
            consumer in "[a-zA-Z0-9_-]{1,12}",
        ) {
            let [delivered, sequence, consumer_sequence, stored, pending] = numbers;
            let reply = format!(
                "$JS.ACK.{stream}.{consumer}.{delivered}.{sequence}.{consumer_sequence}.{stored}.{pending}"
            );
            let meta = Meta::parse(&reply).expect("a short-form reply subject");
            proptest::prop_assert_eq!(
                (meta.sequence, u64::from(meta.delivered), meta.pending, meta.stored_nanos),
                (sequence, delivered.clamp(1, u64::from(u32::MAX)), pending, i128::from(stored))
            );
        }

        #[test]
        fn reply_subject_garbage_never_panics(tail in "[0-9.a-z$]{0,80}") {
            let _ = Meta::parse(&format!("$JS.ACK.{tail}"));
        }
    }
}
