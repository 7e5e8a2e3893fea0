//! [`NatsTransport`]: the `Transport` over NATS JetStream.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbus::transport::PublishLimits;
use agentbus::{
    Capabilities, ChannelConfig, ChannelName, ChannelPattern, ChannelStats, Consumer, DeadLetter,
    DeadLetterFilter, Discard, DurabilityReport, EngineStats, Envelope, Error, ErrorKind,
    GroupStats, MessageId, PublishReceipt, Result, StartPosition, SubscribeOptions, Transport,
};
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::consumer::NatsConsumer;
use crate::options::{NatsOptions, NatsStorage};
use crate::wire::{self, LANES};

/// Turns any NATS error into a `Backend` error saying what was being done.
pub(crate) fn backend(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("NATS: {what} failed: {e}; check that nats-server runs with JetStream (-js) and is reachable"),
    )
    .set_temporary(true)
}

/// The agentbus transport over NATS JetStream.
///
/// One stream (named after the prefix) holds every channel under the subjects
/// `<prefix>.<lane>.<channel>`; each group is four durable pull consumers, one per
/// priority lane; dead letters live in the stream `<prefix>_dlq`. See docs/NATS.md.
#[derive(Debug, Clone)]
pub struct NatsTransport {
    pub(crate) inner: Arc<Inner>,
}

/// The shared state of a transport and its consumers.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) options: NatsOptions,
    pub(crate) stream: stream::Stream,
    pub(crate) dlq: stream::Stream,
    /// Group name → pattern, for every group on the stream (kept live from JetStream's
    /// consumer advisories). Changed only through [`Inner::learn_group`] and
    /// [`Inner::forget_group`], which keep [`Inner::group_counts`] true.
    pub(crate) groups: RwLock<HashMap<String, ChannelPattern>>,
    /// Bumped (under the `groups` write lock) by every change of `groups`.
    groups_generation: AtomicU64,
    /// Channel name → (the `groups_generation` it was counted at, how many groups
    /// match it): every publish's receipt names how many groups it reached, and
    /// matching every group's pattern cost about 1,100 instructions per publish
    /// (callgrind, a handful of groups).
    group_counts: Mutex<rustc_hash::FxHashMap<String, (u64, usize)>>,
    configs: Mutex<Configs>,
    /// Per limited channel: (messages the server last reported, publishes since).
    /// This and `sizes` are Fx maps, as `configs`: both are looked up on every publish
    /// (every channel has limits by default), and SipHash cost about 350 instructions
    /// per publish for the two (callgrind).
    estimates: Mutex<rustc_hash::FxHashMap<String, (u64, u64)>>,
    /// Per channel with `max_bytes`: the mean size (`Envelope::size_bytes`) of this
    /// process's publishes, which turns the byte limit into a message count (JetStream
    /// reports no bytes per subject).
    sizes: Mutex<rustc_hash::FxHashMap<String, u64>>,
    /// The stream's `duplicate_window` as last set (raised by `configure_channels`
    /// when a channel asks for a longer one).
    stream_window: Mutex<Duration>,
    pub(crate) dropped: Mutex<HashMap<String, u64>>,
    pub(crate) dead_lettered: Mutex<HashMap<String, u64>>,
    pub(crate) members: Mutex<HashMap<String, usize>>,
    rejected_full: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) closed: watch::Sender<bool>,
    closing: AtomicBool,
    limits: PublishLimits,
    /// The channel of replies to this client's requests: its request inbox,
    /// validated once (the subject of each reply adds a token per request).
    reply_inbox: std::sync::OnceLock<ChannelName>,
}

/// The consumer name of `group`'s lane `priority`.
pub(crate) fn consumer_name(group: &str, lane: agentbus::Priority) -> String {
    format!("{group}-L{}", lane.as_u8())
}

impl NatsTransport {
    /// Connects to `url` (`nats://host:4222`, several separated by commas) and creates
    /// or opens the stream and dead-letter stream of `options.prefix`.
    ///
    /// # Errors
    /// `InvalidInput` for bad options; `Backend` when the server cannot be reached or
    /// has no JetStream.
    pub async fn connect(url: &str, options: NatsOptions) -> Result<NatsTransport> {
        options.validate()?;
        let client = async_nats::ConnectOptions::new()
            .name("agentbus")
            .connection_timeout(Duration::from_secs(5))
            .connect(url);
        let client = tokio::time::timeout(Duration::from_secs(10), client)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Backend,
                    format!(
                        "NATS: could not connect to {url} within 10 s; start nats-server -js or \
                         check the address"
                    ),
                )
            })?
            .map_err(|e| backend(format!("connecting to {url}"), e))?;
        let server_max = client.server_info().max_payload;
        let js = jetstream::new(client.clone());
        let stream = js
            .get_or_create_stream(stream_config(&options))
            .await
            .map_err(|e| backend(format!("creating stream '{}'", options.stream_name()), e))?;
        let dlq = js
            .get_or_create_stream(stream::Config {
                name: options.dead_letter_stream_name(),
                subjects: vec![format!("{}.>", options.dead_letter_prefix())],
                max_messages: options.max_dead_letters as i64,
                discard: stream::DiscardPolicy::Old,
                storage: storage(options.storage),
                num_replicas: options.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                backend(
                    format!("creating stream '{}'", options.dead_letter_stream_name()),
                    e,
                )
            })?;
        let headroom = 16 * 1024;
        let max_payload = if server_max > headroom {
            options.max_payload_bytes.min(server_max - headroom)
        } else {
            options.max_payload_bytes
        };
        let (closed, _) = watch::channel(false);
        let stream_window = stream.cached_info().config.duplicate_window;
        let inner = Arc::new(Inner {
            client,
            js,
            stream,
            dlq,
            groups: RwLock::new(HashMap::new()),
            groups_generation: AtomicU64::new(0),
            group_counts: Mutex::new(rustc_hash::FxHashMap::default()),
            configs: Mutex::new(Configs::default()),
            estimates: Mutex::new(rustc_hash::FxHashMap::default()),
            sizes: Mutex::new(rustc_hash::FxHashMap::default()),
            stream_window: Mutex::new(stream_window),
            dropped: Mutex::new(HashMap::new()),
            dead_lettered: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
            rejected_full: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            closed,
            closing: AtomicBool::new(false),
            limits: PublishLimits {
                max_payload_bytes: max_payload,
            },
            reply_inbox: std::sync::OnceLock::new(),
            options,
        });
        inner.watch_groups().await?;
        Ok(NatsTransport { inner })
    }

    /// Connects with a backend URL whose query sets the options (see
    /// [`NatsOptions::from_url`]): what `--backend nats://…` uses.
    ///
    /// # Errors
    /// As [`NatsOptions::from_url`] and [`NatsTransport::connect`].
    pub async fn connect_url(url: &str) -> Result<NatsTransport> {
        let (server, options) = NatsOptions::from_url(url)?;
        NatsTransport::connect(&server, options).await
    }

    /// The options in force.
    pub fn options(&self) -> &NatsOptions {
        &self.inner.options
    }

    /// The underlying client, for NATS-native work next to agentbus (core request/reply,
    /// KV…).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Deletes the stream, the dead-letter stream and every consumer of a prefix: what
    /// the conformance suite's clean-up and `agentbus` tests use.
    ///
    /// # Errors
    /// `Backend` when a deletion fails (a missing stream is not an error).
    pub async fn delete_prefix(client: &async_nats::Client, prefix: &str) -> Result<()> {
        let js = jetstream::new(client.clone());
        let options = NatsOptions::default().prefix(prefix);
        for name in [options.stream_name(), options.dead_letter_stream_name()] {
            match js.delete_stream(&name).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(backend(format!("deleting stream '{name}'"), e)),
            }
        }
        Ok(())
    }

    /// Connects to `url` and deletes the streams of `prefix` (see
    /// [`NatsTransport::delete_prefix`]).
    ///
    /// # Errors
    /// `Backend` when the server cannot be reached or a deletion fails.
    pub async fn delete_prefix_at(url: &str, prefix: &str) -> Result<()> {
        let client = async_nats::connect(url)
            .await
            .map_err(|e| backend(format!("connecting to {url}"), e))?;
        NatsTransport::delete_prefix(&client, prefix).await
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                "the NATS transport is closed; open a new one",
            ));
        }
        Ok(())
    }

    fn config_for(&self, channel: &ChannelName) -> Option<ChannelConfig> {
        self.inner.config_for(channel)
    }

    /// The dedup window of `channel`: its configured one, else the stream's default.
    fn dedup_window(&self, config: Option<&ChannelConfig>) -> Duration {
        config.map_or(self.inner.options.duplicate_window, |c| c.dedup_window)
    }

    /// Applies the channel's limits to a publish and encodes it: its subject, headers,
    /// frame and the dedup window it is stored under.
    async fn prepare_publish(&self, envelope: &Envelope) -> Result<Prepared> {
        let config = self.config_for(&envelope.channel);
        if let Some(config) = &config {
            self.make_room(&envelope.channel, config, envelope.size_bytes() as u64)
                .await?;
        }
        let window = self.dedup_window(config.as_ref());
        let (headers, payload) = wire::encode(envelope, !window.is_zero());
        let subject = wire::subject(
            &self.inner.options.prefix,
            envelope.header.priority,
            envelope.channel.as_str(),
        );
        Ok(Prepared {
            subject,
            headers,
            payload,
            window,
        })
    }

    /// Stores a message, applying the channel's dedup `window` exactly: JetStream
    /// remembers an id for the stream's `duplicate_window`, which may be longer than
    /// the channel's; a duplicate whose original is older than `window` (or gone) is
    /// stored again under the key `<id>.<n>`, the next key not yet stored within the
    /// channel's window. With a zero window no dedup key is sent at all. `generation`
    /// is the first key to try: 0 for the id itself, 1 when a caller already stored
    /// under the id and found it a duplicate outside the window.
    async fn store(
        &self,
        prepared: Prepared,
        id: MessageId,
        channel: &ChannelName,
        mut generation: u32,
    ) -> Result<jetstream::publish::PublishAck> {
        let Prepared {
            mut subject,
            mut headers,
            payload,
            window,
        } = prepared;
        let rekey = |headers: &mut Option<async_nats::HeaderMap>, generation: u32| {
            headers
                .get_or_insert_with(async_nats::HeaderMap::new)
                .insert(
                    async_nats::header::NATS_MESSAGE_ID,
                    format!("{id}.{generation}").as_str(),
                );
        };
        if generation > 0 {
            rekey(&mut headers, generation);
        }
        // Only a channel window shorter than the stream's can need a second attempt:
        // otherwise the headers and subject are moved, not copied.
        let may_rekey = window < *self.inner.stream_window.lock();
        loop {
            let (to, with) = if may_rekey {
                (subject.clone(), headers.clone())
            } else {
                (std::mem::take(&mut subject), headers.take())
            };
            let ack = self
                .inner
                .js
                .send_publish(to, publication(with, payload.clone()))
                .await
                .map_err(|e| publish_error(channel, e))?
                .await
                .map_err(|e| publish_error(channel, e))?;
            if !self.outside_window(&ack, window).await? || generation >= MAX_DEDUP_GENERATIONS {
                return Ok(ack);
            }
            generation += 1;
            rekey(&mut headers, generation);
        }
    }

    /// Whether `ack` reports a duplicate whose original is older than `window` (or
    /// gone), so that the channel's dedup no longer applies to it.
    async fn outside_window(
        &self,
        ack: &jetstream::publish::PublishAck,
        window: Duration,
    ) -> Result<bool> {
        if !ack.duplicate || window >= *self.inner.stream_window.lock() {
            return Ok(false);
        }
        match self.inner.stream.get_raw_message(ack.sequence).await {
            Ok(original) => {
                let age = time::OffsetDateTime::now_utc() - original.time;
                Ok(age > window)
            }
            Err(e) if is_not_found(&e) => Ok(true),
            Err(e) => Err(backend(
                format!("reading message {} to check its dedup window", ack.sequence),
                e,
            )),
        }
    }

    /// Raises the stream's `duplicate_window` to `window` if it is shorter (JetStream
    /// dedups per stream; shorter per-channel windows are applied by [`Self::store`]).
    async fn ensure_stream_window(&self, window: Duration) -> Result<()> {
        if window <= *self.inner.stream_window.lock() {
            return Ok(());
        }
        let mut stream = self.inner.stream.clone();
        let mut config = stream
            .info()
            .await
            .map_err(|e| backend("reading the stream's configuration", e))?
            .config
            .clone();
        if config.duplicate_window >= window {
            *self.inner.stream_window.lock() = config.duplicate_window;
            return Ok(());
        }
        config.duplicate_window = window;
        let name = config.name.clone();
        let info = self.inner.js.update_stream(config).await.map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "NATS: cannot raise the duplicate_window of stream '{name}' to {} for a \
                     channel's dedup_window: {e}; JetStream needs it no longer than the \
                     stream's max_age; choose a shorter dedup_window",
                    humanize(window)
                ),
            )
        })?;
        *self.inner.stream_window.lock() = info.config.duplicate_window;
        Ok(())
    }

    /// A publish to the stream (see [`Transport::publish`]).
    async fn publish_stored(&self, envelope: Envelope) -> Result<PublishReceipt> {
        self.check_open()?;
        self.inner.limits.check(&envelope, Utc::now)?;
        let prepared = self.prepare_publish(&envelope).await?;
        let channel = envelope.channel;
        let ack = self
            .store(prepared, envelope.header.id, &channel, 0)
            .await?;
        Ok(PublishReceipt {
            id: envelope.header.id,
            groups: self.count_groups(&channel),
            channel,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Sends a core request (see [`Transport::request`]) and waits for the reply.
    async fn send_request(
        &self,
        mut envelope: Envelope,
        timeout: Duration,
    ) -> Result<async_nats::Message> {
        self.check_open()?;
        self.inner.limits.check(&envelope, Utc::now)?;
        let channel = envelope.channel.clone();
        // The reply subject is the client's shared request inbox (one subscription for
        // every request, no SUB/UNSUB per request); it is only known once sent, so the
        // responder takes `reply_to` from the NATS message's reply subject.
        envelope.header.reply_to = None;
        let frame = wire::encode_frame(&envelope);
        let subject = wire::request_subject(&self.inner.options.prefix, channel.as_str());
        let request = async_nats::Request::new()
            .payload(frame)
            .timeout(Some(timeout));
        self.inner
            .client
            .send_request(subject, request)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Error::new(
                    ErrorKind::NoResponders,
                    format!(
                        "no responders for a request on channel '{channel}': nobody is \
                         subscribed to it right now; start a responder or check the channel name"
                    ),
                )
                .with_context("channel", &channel),
                async_nats::RequestErrorKind::TimedOut => Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "request on channel '{channel}' timed out after {}: no reply came in \
                         time; check that a responder is running and healthy, or raise the \
                         timeout",
                        humanize(timeout)
                    ),
                )
                .with_context("channel", &channel),
                _ => backend(format!("a request on channel '{channel}'"), e),
            })
    }

    /// The envelope of a reply to a core request.
    fn decode_reply(&self, reply: async_nats::Message) -> Result<Envelope> {
        // A reply's channel is the requester's inbox, `_INBOX.<id>`, as on the memory
        // engine (the bus's inbox), not the subject with its per-request token: one
        // name, checked once.
        let subject = reply.subject.as_str();
        let inbox = subject.rsplit_once('.').map_or(subject, |(inbox, _)| inbox);
        let mut known = self.inner.reply_inbox.get().cloned();
        let decoded = wire::decode_core(inbox, &mut known, reply.headers.as_ref(), reply.payload);
        if let Some(known) = known {
            let _ = self.inner.reply_inbox.set(known);
        }
        decoded
    }

    /// A reply to a core request: straight to the requester's inbox subject.
    async fn reply_core(&self, envelope: Envelope) -> Result<PublishReceipt> {
        let frame = wire::encode_frame(&envelope);
        self.inner
            .client
            .publish(envelope.channel.as_str().to_string(), frame)
            .await
            .map_err(|e| backend(format!("replying on '{}'", envelope.channel), e))?;
        Ok(PublishReceipt {
            id: envelope.header.id,
            channel: envelope.channel,
            sequence: 0,
            duplicate: false,
            groups: 1,
        })
    }

    /// Messages stored for `channel` (all lanes).
    async fn channel_count(&self, channel: &str) -> Result<u64> {
        let filter = format!("{}.*.{channel}", self.inner.options.prefix);
        subject_counts(&self.inner.stream, &filter)
            .await
            .map(|counts| counts.values().sum())
    }

    /// Applies a channel's configured `max_messages` before a publish: trims what every
    /// group settled, then rejects or drops the oldest.
    async fn make_room(
        &self,
        channel: &ChannelName,
        config: &ChannelConfig,
        size: u64,
    ) -> Result<()> {
        // `max_bytes` as a message count at this channel's mean message size.
        let by_bytes = config.max_bytes.map(|max_bytes| {
            let mut sizes = self.inner.sizes.lock();
            let mean = match sizes.get_mut(channel.as_str()) {
                Some(mean) => {
                    *mean = (*mean * 7 + size) / 8;
                    *mean
                }
                None => *sizes.entry(channel.as_str().to_string()).or_insert(size),
            };
            (max_bytes, (max_bytes / mean.max(1)).max(1), mean)
        });
        let (max, limit) = match (config.max_messages, by_bytes) {
            (None, None) => return Ok(()),
            (Some(m), Some((b, n, mean))) if n < m => (n, Limit::Bytes(b, n, mean)),
            (Some(m), _) => (m, Limit::Messages(m)),
            (None, Some((b, n, mean))) => (n, Limit::Bytes(b, n, mean)),
        };
        // Ask the server only when this process's estimate nears the limit, or after a
        // tenth of the limit in own publishes (others' publishes are seen then).
        {
            let mut estimates = self.inner.estimates.lock();
            if let Some((known, since)) = estimates.get_mut(channel.as_str()) {
                if *known + *since + 1 < max && *since < max / 10 {
                    *since += 1;
                    return Ok(());
                }
            }
        }
        let mut count = self.channel_count(channel.as_str()).await?;
        if count < max {
            self.inner
                .estimates
                .lock()
                .insert(channel.as_str().to_string(), (count, 1));
            return Ok(());
        }
        // Trim what every group matching the channel has acknowledged (lane by lane).
        let groups: Vec<String> = self
            .inner
            .groups
            .read()
            .iter()
            .filter(|(_, p)| p.matches(channel))
            .map(|(g, _)| g.clone())
            .collect();
        if !groups.is_empty() {
            for lane in LANES {
                let mut floor = u64::MAX;
                for group in &groups {
                    let name = consumer_name(group, lane);
                    let info = self
                        .inner
                        .stream
                        .consumer_info(&name)
                        .await
                        .map_err(|e| backend(format!("reading consumer '{name}'"), e))?;
                    floor = floor.min(info.ack_floor.stream_sequence);
                }
                if floor > 0 && floor != u64::MAX {
                    let subject = wire::subject(&self.inner.options.prefix, lane, channel.as_str());
                    self.inner
                        .stream
                        .purge()
                        .filter(subject.clone())
                        .sequence(floor + 1)
                        .await
                        .map_err(|e| {
                            backend(format!("trimming settled messages of '{subject}'"), e)
                        })?;
                }
            }
            count = self.channel_count(channel.as_str()).await?;
        }
        if count < max {
            self.inner
                .estimates
                .lock()
                .insert(channel.as_str().to_string(), (count, 1));
            return Ok(());
        }
        self.inner.estimates.lock().remove(channel.as_str());
        match config.discard {
            Discard::RejectNew => {
                self.inner.rejected_full.fetch_add(1, Ordering::Relaxed);
                Err(Error::new(
                    ErrorKind::Full,
                    format!(
                        "channel '{channel}' holds {count} unconsumed messages, its limit is {limit} \
                         (discard = reject_new); consume and ack, or raise the limit"
                    ),
                )
                .with_context("channel", channel))
            }
            Discard::DropOldest => {
                let mut to_drop = count + 1 - max;
                while to_drop > 0 {
                    let Some(seq) = self.oldest_sequence(channel.as_str()).await? else {
                        break;
                    };
                    self.inner.stream.delete_message(seq).await.map_err(|e| {
                        backend(format!("dropping message {seq} of '{channel}'"), e)
                    })?;
                    *self
                        .inner
                        .dropped
                        .lock()
                        .entry(channel.as_str().to_string())
                        .or_insert(0) += 1;
                    to_drop -= 1;
                }
                Ok(())
            }
        }
    }

    async fn oldest_sequence(&self, channel: &str) -> Result<Option<u64>> {
        let mut oldest: Option<u64> = None;
        for lane in LANES {
            let subject = wire::subject(&self.inner.options.prefix, lane, channel);
            match self
                .inner
                .stream
                .get_first_raw_message_by_subject(&subject, 1)
                .await
            {
                Ok(m) => oldest = Some(oldest.map_or(m.sequence, |o| o.min(m.sequence))),
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(backend(
                        format!("reading the oldest message of '{subject}'"),
                        e,
                    ))
                }
            }
        }
        Ok(oldest)
    }

    fn count_groups(&self, channel: &ChannelName) -> usize {
        let inner = &self.inner;
        let current = inner.groups_generation.load(Ordering::Acquire);
        if let Some(&(generation, count)) = inner.group_counts.lock().get(channel.as_str()) {
            if generation == current {
                return count;
            }
        }
        // Counted and stamped under one read lock: a change after it bumps the
        // generation, so this count is never taken for a later one.
        let (generation, count) = {
            let groups = inner.groups.read();
            let generation = inner.groups_generation.load(Ordering::Acquire);
            (
                generation,
                groups.values().filter(|p| p.matches(channel)).count(),
            )
        };
        let mut counts = inner.group_counts.lock();
        if counts.len() >= MAX_RESOLVED_CONFIGS {
            counts.clear();
        }
        counts.insert(channel.as_str().to_string(), (generation, count));
        count
    }
}

fn storage(s: NatsStorage) -> stream::StorageType {
    match s {
        NatsStorage::File => stream::StorageType::File,
        NatsStorage::Memory => stream::StorageType::Memory,
    }
}

fn stream_config(options: &NatsOptions) -> stream::Config {
    stream::Config {
        name: options.stream_name(),
        subjects: vec![format!("{}.>", options.prefix)],
        max_messages: options.max_messages.map_or(-1, |m| m as i64),
        max_bytes: options.max_bytes.map_or(-1, |m| m as i64),
        max_age: options.max_age.unwrap_or_default(),
        discard: stream::DiscardPolicy::New,
        retention: stream::RetentionPolicy::Limits,
        storage: storage(options.storage),
        num_replicas: options.replicas,
        duplicate_window: options.duplicate_window,
        ..Default::default()
    }
}

/// Subject → message count for the subjects of `stream` matching `filter`.
pub(crate) async fn subject_counts(
    stream: &stream::Stream,
    filter: &str,
) -> Result<BTreeMap<String, u64>> {
    let mut info = stream
        .info_with_subjects(filter)
        .await
        .map_err(|e| backend(format!("reading the subjects '{filter}'"), e))?;
    let mut counts = BTreeMap::new();
    while let Some(item) = info.next().await {
        let (subject, count) =
            item.map_err(|e| backend(format!("reading the subjects '{filter}'"), e))?;
        counts.insert(subject, count as u64);
    }
    Ok(counts)
}

/// Channel configurations: what `configure_channels` set, and which of them applies
/// to each channel seen so far. Every publish and every delivery asks: matching each
/// pattern against the name cost about 850 instructions per message (callgrind), a
/// hash lookup a tenth of that.
#[derive(Debug, Default)]
struct Configs {
    /// In the order set: the last match wins.
    patterns: Vec<(ChannelPattern, ChannelConfig)>,
    /// Channel name → its configuration; emptied by every `configure_channels`.
    resolved: rustc_hash::FxHashMap<String, Option<ChannelConfig>>,
}

/// The most channels [`Configs::resolved`] remembers before it starts over: bounds its
/// memory when a process touches very many channels.
const MAX_RESOLVED_CONFIGS: usize = 4096;

/// How many times a publish is re-keyed (`<id>.<n>`) past duplicates that are only
/// duplicates in the stream's longer dedup window (bounds the loop; reached only by
/// an id republished more than this many times within the stream's window).
const MAX_DEDUP_GENERATIONS: u32 = 64;

impl Inner {
    /// The configuration of `channel`: the last `configure_channels` whose pattern
    /// matches it.
    pub(crate) fn config_for(&self, channel: &ChannelName) -> Option<ChannelConfig> {
        let mut configs = self.configs.lock();
        if let Some(known) = configs.resolved.get(channel.as_str()) {
            return known.clone();
        }
        let config = configs
            .patterns
            .iter()
            .rev()
            .find(|(p, _)| p.matches(channel))
            .map(|(_, c)| c.clone());
        if configs.resolved.len() >= MAX_RESOLVED_CONFIGS {
            configs.resolved.clear();
        }
        configs
            .resolved
            .insert(channel.as_str().to_string(), config.clone());
        config
    }

    /// Makes `config` the configuration of every channel `pattern` matches (see
    /// [`Inner::config_for`]).
    fn configure(&self, pattern: ChannelPattern, config: ChannelConfig) {
        let mut configs = self.configs.lock();
        configs.patterns.push((pattern, config));
        configs.resolved.clear();
    }

    /// Counts a message dropped from `channel` by a retention limit.
    pub(crate) fn count_dropped(&self, channel: &ChannelName) {
        *self
            .dropped
            .lock()
            .entry(channel.as_str().to_string())
            .or_insert(0) += 1;
    }

    /// Loads every group of the stream and keeps the view live from JetStream's
    /// consumer advisories (so receipts count groups other processes create).
    async fn watch_groups(self: &Arc<Self>) -> Result<()> {
        let stream_name = self.options.stream_name();
        let created = format!("$JS.EVENT.ADVISORY.CONSUMER.CREATED.{stream_name}.*");
        let deleted = format!("$JS.EVENT.ADVISORY.CONSUMER.DELETED.{stream_name}.*");
        let mut created = self
            .client
            .subscribe(created)
            .await
            .map_err(|e| backend("subscribing to consumer advisories", e))?;
        let mut deleted = self
            .client
            .subscribe(deleted)
            .await
            .map_err(|e| backend("subscribing to consumer advisories", e))?;
        let mut consumers = self.stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|e| backend("listing consumers", e))?;
            self.learn_group(&info.name, &info.config.filter_subject);
        }
        let weak = Arc::downgrade(self);
        let mut closed = self.closed.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(m) = created.next() => {
                        let Some(inner) = weak.upgrade() else { return };
                        let name = m.subject.rsplit('.').next().unwrap_or_default().to_string();
                        if let Ok(info) = inner.stream.consumer_info(&name).await {
                            inner.learn_group(&info.name, &info.config.filter_subject);
                        }
                    }
                    Some(m) = deleted.next() => {
                        let Some(inner) = weak.upgrade() else { return };
                        let name = m.subject.rsplit('.').next().unwrap_or_default();
                        if let Some((group, _)) = name.rsplit_once("-L") {
                            inner.forget_group(group);
                        }
                    }
                    _ = closed.changed() => return,
                    else => return,
                }
            }
        });
        Ok(())
    }

    /// Records the group of consumer `name` with lane filter `filter`.
    pub(crate) fn learn_group(&self, name: &str, filter: &str) {
        let Some((group, _lane)) = name.rsplit_once("-L") else {
            return;
        };
        let Some(rest) = filter
            .strip_prefix(self.options.prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
        else {
            return;
        };
        let Some((_, pattern)) = rest.split_once('.') else {
            return;
        };
        if let Ok(pattern) = ChannelPattern::new(pattern) {
            let mut groups = self.groups.write();
            groups.insert(group.to_string(), pattern);
            self.groups_generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Forgets `group` (deleted, or a private subscription that ended).
    pub(crate) fn forget_group(&self, group: &str) {
        let mut groups = self.groups.write();
        if groups.remove(group).is_some() {
            self.groups_generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Publishes a dead letter (at least once: before the message is terminated).
    pub(crate) async fn dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let subject = format!(
            "{}.{}",
            self.options.dead_letter_prefix(),
            letter.envelope.channel
        );
        let body = serde_json::to_vec(letter).map_err(|e| {
            Error::new(ErrorKind::Internal, "could not encode a dead letter").with_source(e)
        })?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            letter.id.to_string().as_str(),
        );
        self.js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| backend("storing a dead letter", e))?
            .await
            .map_err(|e| backend("storing a dead letter", e))?;
        *self
            .dead_lettered
            .lock()
            .entry(letter.group.clone())
            .or_insert(0) += 1;
        Ok(())
    }

    /// Every dead letter whose channel matches `pattern`, oldest first, with its
    /// sequence in the dead-letter stream.
    async fn scan_dead_letters(
        &self,
        pattern: Option<&ChannelPattern>,
    ) -> Result<Vec<(u64, DeadLetter)>> {
        let filter = format!(
            "{}.{}",
            self.options.dead_letter_prefix(),
            pattern.map_or(">", |p| p.as_str())
        );
        let mut dlq = self.dlq.clone();
        let state = dlq
            .info()
            .await
            .map_err(|e| backend("reading the dead-letter stream", e))?
            .state
            .clone();
        if state.messages == 0 {
            return Ok(Vec::new());
        }
        let reader = dlq
            .create_consumer(consumer::pull::Config {
                filter_subject: filter.clone(),
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::All,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| backend("reading dead letters", e))?;
        let mut out = Vec::new();
        loop {
            let mut batch = reader
                .fetch()
                .max_messages(1000)
                .messages()
                .await
                .map_err(|e| backend("reading dead letters", e))?;
            let mut got = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| backend("reading dead letters", e))?;
                got += 1;
                let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                match serde_json::from_slice::<DeadLetter>(&message.payload) {
                    Ok(letter) => out.push((seq, letter)),
                    Err(e) => tracing::warn!(seq, "skipping an unreadable dead letter: {e}"),
                }
            }
            if got == 0 {
                break;
            }
        }
        let name = reader.cached_info().name.clone();
        let _ = dlq.delete_consumer(&name).await;
        Ok(out)
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    // Not `async fn`: a reply to a core request (once per request/reply) gets a
    // future of its own, a fraction of the size of a stored publish's, which is
    // built and boxed for every call (about 600 instructions, callgrind).
    fn publish<'life0, 'async_trait>(
        &'life0 self,
        envelope: Envelope,
    ) -> Pin<Box<dyn Future<Output = Result<PublishReceipt>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        if envelope.channel.as_str().starts_with("_INBOX.") {
            Box::pin(async move {
                self.check_open()?;
                self.inner.limits.check(&envelope, Utc::now)?;
                self.reply_core(envelope).await
            })
        } else {
            Box::pin(self.publish_stored(envelope))
        }
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Vec<Result<PublishReceipt>> {
        // Pipelined: every publish is sent before the first ack is awaited.
        let mut pending = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let sent = async {
                self.check_open()?;
                self.inner.limits.check(&envelope, Utc::now)?;
                let prepared = self.prepare_publish(&envelope).await?;
                // Kept for a second store only where one can be needed (a channel
                // window shorter than the stream's, as in `store`): otherwise the
                // subject, headers and frame are moved into the publish, not copied.
                let resend =
                    (prepared.window < *self.inner.stream_window.lock()).then(|| prepared.clone());
                let future = self
                    .inner
                    .js
                    .send_publish(
                        prepared.subject,
                        publication(prepared.headers, prepared.payload),
                    )
                    .await
                    .map_err(|e| publish_error(&envelope.channel, e))?;
                Ok((envelope.header.id, envelope.channel, future, resend))
            }
            .await;
            pending.push(sent);
        }
        let mut receipts = Vec::with_capacity(pending.len());
        for sent in pending {
            receipts.push(match sent {
                Err(e) => Err(e),
                Ok((id, channel, future, resend)) => {
                    let stored = match (future.await, resend) {
                        (Ok(ack), Some(prepared)) => {
                            match self.outside_window(&ack, prepared.window).await {
                                // A duplicate only in the stream's longer window: store it
                                // under the next key (the id itself was just tried).
                                Ok(true) => self.store(prepared, id, &channel, 1).await,
                                Ok(false) => Ok(ack),
                                Err(e) => Err(e),
                            }
                        }
                        (Ok(ack), None) => Ok(ack),
                        (Err(e), _) => Err(publish_error(&channel, e)),
                    };
                    stored.map(|ack| PublishReceipt {
                        id,
                        groups: self.count_groups(&channel),
                        channel,
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    })
                }
            });
        }
        receipts
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Consumer>> {
        self.check_open()?;
        options.validate()?;
        let consumer = NatsConsumer::open(self.inner.clone(), options).await?;
        Ok(Box::new(consumer))
    }

    async fn configure_channels(
        &self,
        pattern: ChannelPattern,
        config: ChannelConfig,
    ) -> Result<()> {
        self.check_open()?;
        self.ensure_stream_window(config.dedup_window).await?;
        self.inner.configure(pattern, config);
        Ok(())
    }

    async fn delete_group(&self, group: &str) -> Result<()> {
        self.check_open()?;
        let mut found = false;
        for lane in LANES {
            let name = consumer_name(group, lane);
            match self.inner.stream.delete_consumer(&name).await {
                Ok(_) => found = true,
                Err(e) if e.to_string().to_lowercase().contains("not found") => {}
                Err(e) => return Err(backend(format!("deleting consumer '{name}'"), e)),
            }
        }
        self.inner.forget_group(group);
        if found {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "no group '{group}' on stream '{}'",
                    self.inner.options.stream_name()
                ),
            ))
        }
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>> {
        let letters = self
            .inner
            .scan_dead_letters(filter.pattern.as_ref())
            .await?;
        let mut out: Vec<DeadLetter> = letters
            .into_iter()
            .map(|(_, l)| l)
            .filter(|l| filter.accepts(l))
            .collect();
        if let Some(limit) = filter.limit {
            out.truncate(limit);
        }
        Ok(out)
    }

    async fn dead_letter(&self, id: MessageId) -> Result<DeadLetter> {
        self.inner
            .scan_dead_letters(None)
            .await?
            .into_iter()
            .map(|(_, l)| l)
            .find(|l| l.id == id)
            .ok_or_else(|| not_found_letter(id))
    }

    async fn replay_dead_letter(&self, id: MessageId) -> Result<PublishReceipt> {
        self.check_open()?;
        let (seq, letter) = self
            .inner
            .scan_dead_letters(None)
            .await?
            .into_iter()
            .find(|(_, l)| l.id == id)
            .ok_or_else(|| not_found_letter(id))?;
        let receipt = self
            .publish(letter.replay_envelope(MessageId::new()))
            .await?;
        self.inner
            .dlq
            .delete_message(seq)
            .await
            .map_err(|e| backend("removing a replayed dead letter", e))?;
        Ok(receipt)
    }

    async fn purge_dead_letters(&self, filter: DeadLetterFilter) -> Result<u64> {
        let letters = self
            .inner
            .scan_dead_letters(filter.pattern.as_ref())
            .await?;
        let mut purged = 0;
        for (seq, letter) in letters {
            if filter.limit.is_some_and(|l| purged as usize >= l) {
                break;
            }
            if filter.accepts(&letter) {
                self.inner
                    .dlq
                    .delete_message(seq)
                    .await
                    .map_err(|e| backend("purging a dead letter", e))?;
                purged += 1;
            }
        }
        Ok(purged)
    }

    async fn stats(&self) -> Result<EngineStats> {
        let prefix = &self.inner.options.prefix;
        let counts = subject_counts(&self.inner.stream, &format!("{prefix}.*.>")).await?;
        let mut stream = self.inner.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| backend("reading the stream", e))?
            .clone();
        let total = info.state.messages.max(1);
        let mut channels: BTreeMap<String, ChannelStats> = BTreeMap::new();
        for (subject, count) in &counts {
            let Some(name) = wire::channel_of(prefix, subject) else {
                continue;
            };
            let Ok(channel) = ChannelName::new(&name) else {
                continue;
            };
            let last = stream
                .get_last_raw_message_by_subject(subject)
                .await
                .map(|m| m.sequence)
                .unwrap_or(0);
            let entry = channels.entry(name).or_insert_with(|| ChannelStats {
                channel,
                messages: 0,
                bytes: 0,
                published: 0,
                dropped: 0,
                last_sequence: 0,
            });
            entry.messages += count;
            entry.bytes += info.state.bytes * count / total;
            entry.last_sequence = entry.last_sequence.max(last);
        }
        {
            let dropped = self.inner.dropped.lock();
            for (name, stats) in channels.iter_mut() {
                stats.dropped = dropped.get(name).copied().unwrap_or(0);
                stats.published = stats.messages + stats.dropped;
            }
        }
        let mut groups: BTreeMap<String, GroupStats> = BTreeMap::new();
        let mut consumers = self.inner.stream.consumers();
        while let Some(c) = consumers.next().await {
            let c = c.map_err(|e| backend("listing consumers", e))?;
            let Some((group, _)) = c.name.rsplit_once("-L") else {
                continue;
            };
            let Some(pattern) = self.inner.groups.read().get(group).cloned() else {
                continue;
            };
            let entry = groups
                .entry(group.to_string())
                .or_insert_with(|| GroupStats {
                    group: group.to_string(),
                    pattern,
                    members: self.inner.members.lock().get(group).copied().unwrap_or(0),
                    pending: 0,
                    in_flight: 0,
                    delivered: 0,
                    acked: 0,
                    redelivered: 0,
                    dead_lettered: self
                        .inner
                        .dead_lettered
                        .lock()
                        .get(group)
                        .copied()
                        .unwrap_or(0),
                });
            entry.pending += c.num_pending;
            entry.in_flight += c.num_ack_pending as u64;
            entry.delivered += c.delivered.consumer_sequence;
            entry.acked += c.ack_floor.consumer_sequence.saturating_sub(0);
            entry.redelivered += c.num_redelivered as u64;
        }
        let dead_letters = {
            let mut dlq = self.inner.dlq.clone();
            dlq.info()
                .await
                .map_err(|e| backend("reading the dead-letter stream", e))?
                .state
                .messages
        };
        let server = self.inner.client.server_info();
        let mut details = BTreeMap::new();
        details.insert("server".into(), format!("nats-server {}", server.version));
        details.insert("server_name".into(), server.server_name.clone());
        details.insert("stream".into(), info.config.name.clone());
        details.insert(
            "storage".into(),
            format!("{:?}", info.config.storage).to_lowercase(),
        );
        details.insert("replicas".into(), info.config.num_replicas.to_string());
        details.insert("stream_messages".into(), info.state.messages.to_string());
        details.insert("stream_bytes".into(), info.state.bytes.to_string());
        details.insert(
            "duplicate_window".into(),
            humanize(info.config.duplicate_window),
        );
        details.insert(
            "dead_letter_stream".into(),
            self.inner.options.dead_letter_stream_name(),
        );
        Ok(EngineStats {
            engine: "nats".into(),
            channels: channels.into_values().collect(),
            groups: groups.into_values().collect(),
            dead_letters,
            rejected_full: self.inner.rejected_full.load(Ordering::Relaxed),
            expired: self.inner.expired.load(Ordering::Relaxed),
            details,
        })
    }

    async fn close(&self) -> Result<()> {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.closed.send_replace(true);
        // Acks are fire-and-forget publishes: make sure they left.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.inner.client.flush()).await;
        Ok(())
    }

    fn native_requests(&self) -> bool {
        self.inner.options.core_requests
    }

    async fn request(&self, envelope: Envelope, timeout: Duration) -> Result<Envelope> {
        let reply = self.send_request(envelope, timeout).await?;
        self.decode_reply(reply)
    }

    async fn request_payload(&self, envelope: Envelope, timeout: Duration) -> Result<Bytes> {
        let reply = self.send_request(envelope, timeout).await?;
        match wire::frame_payload(reply.headers.as_ref(), &reply.payload) {
            Some(payload) => Ok(payload),
            // Not a frame: the whole decode says what is wrong with it.
            None => self.decode_reply(reply).map(|e| e.payload),
        }
    }

    async fn scatter(
        &self,
        mut envelope: Envelope,
    ) -> Result<(usize, futures::stream::BoxStream<'static, Envelope>)> {
        self.check_open()?;
        self.inner.limits.check(&envelope, Utc::now)?;
        let channel = envelope.channel.clone();
        let inbox = self.inner.client.new_inbox();
        envelope.header.reply_to = Some(ChannelName::new(&inbox)?);
        let replies = self
            .inner
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| {
                backend(
                    format!("subscribing to the replies of a gather on '{channel}'"),
                    e,
                )
            })?;
        let frame = wire::encode_frame(&envelope);
        let subject = wire::request_subject(&self.inner.options.prefix, channel.as_str());
        self.inner
            .client
            .publish_with_reply(subject, inbox, frame)
            .await
            .map_err(|e| backend(format!("sending a gather on '{channel}'"), e))?;
        let groups = self.count_groups(&channel);
        let replies = replies
            .filter_map(|m| async move {
                let reply_channel = m.subject.to_string();
                match wire::decode_core(&reply_channel, &mut None, m.headers.as_ref(), m.payload) {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::warn!("ignoring an unreadable gather reply: {e}");
                        None
                    }
                }
            })
            .boxed();
        Ok((groups, replies))
    }

    async fn durability(&self) -> Result<DurabilityReport> {
        crate::doctor::durability(&self.inner).await
    }
}

pub(crate) fn humanize(d: Duration) -> String {
    if d.as_secs() >= 60 && d.as_secs() % 60 == 0 {
        format!("{}m", d.as_secs() / 60)
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Whether a NATS error says "no such thing" (message, consumer, stream).
pub(crate) fn is_not_found(e: &dyn std::fmt::Display) -> bool {
    let text = e.to_string().to_lowercase();
    text.contains("not found") || text.contains("no message found")
}

fn not_found_letter(id: MessageId) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no dead letter with id {id}; list them with `agentbus dlq list`"),
    )
}

/// The limit a publish is checked against, put in words only for an error (formatting
/// it on every publish was a measurable share of the publish path).
enum Limit {
    Messages(u64),
    /// `max_bytes`, about how many messages that is, at about which mean size.
    Bytes(u64, u64, u64),
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Messages(m) => write!(f, "max_messages = {m}"),
            Limit::Bytes(b, n, mean) => {
                write!(f, "max_bytes = {b} (about {n} messages of ~{mean} bytes)")
            }
        }
    }
}

/// A publish ready to send: what [`NatsTransport::prepare_publish`] makes of an
/// envelope.
#[derive(Clone)]
struct Prepared {
    subject: String,
    /// `Nats-Msg-Id` when the channel dedups; `None` sends a message without headers.
    headers: Option<async_nats::HeaderMap>,
    /// The frame: the agentbus header line, then the envelope's payload.
    payload: bytes::Bytes,
    /// The channel's dedup window (zero: no dedup).
    window: Duration,
}

/// A JetStream publish of `payload` with `headers`, if any.
fn publication(
    headers: Option<async_nats::HeaderMap>,
    payload: bytes::Bytes,
) -> jetstream::context::Publish {
    let publish = jetstream::context::Publish::build().payload(payload);
    match headers {
        Some(headers) => publish.headers(headers),
        None => publish,
    }
}

fn publish_error(channel: &ChannelName, e: impl std::fmt::Display) -> Error {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if lower.contains("maximum messages")
        || lower.contains("maximum bytes")
        || lower.contains("resource limits")
    {
        return Error::new(
            ErrorKind::Full,
            format!(
                "NATS stream is full, publish to channel '{channel}' refused ({text}); consume \
                 and ack, or raise the stream limits"
            ),
        )
        .with_context("channel", channel);
    }
    backend(format!("publishing to channel '{channel}'"), text)
}

/// JetStream's deliver policy for a start position.
pub(crate) fn deliver_policy(start: StartPosition) -> consumer::DeliverPolicy {
    match start {
        StartPosition::New => consumer::DeliverPolicy::New,
        StartPosition::Earliest => consumer::DeliverPolicy::All,
        StartPosition::Sequence(n) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: n.max(1),
        },
        StartPosition::Time(t) => {
            let nanos = t.timestamp_nanos_opt().unwrap_or(0) as i128;
            consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            }
        }
    }
}
