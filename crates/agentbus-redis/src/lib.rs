//! The Redis Streams backend of agentbus.
//!
//! [`RedisTransport`] implements [`agentbus::Transport`] on a Redis server (7.0 or
//! later): every channel is four streams (one per priority lane), every agentbus group
//! is a Redis consumer group on each stream its pattern matches, deliveries are
//! `XREADGROUP` entries held in the group's pending list until `XACK`, and what Redis
//! Streams lack — priority order across lanes, deadlines, delayed delivery, nack with a
//! delay, max deliveries, dead letters, retention with a discard policy, start
//! positions, wildcard groups that pick up new channels — is done by a few Lua scripts
//! that run atomically on the server, so any number of processes can share a group.
//! `docs/REDIS.md` maps every rule of the delivery contract to the commands used.
//!
//! ```no_run
//! use agentbus::{ChannelName, ChannelPattern, Envelope, SubscribeOptions, Transport};
//! use agentbus_redis::{RedisOptions, RedisTransport};
//!
//! # async fn demo() -> agentbus::Result<()> {
//! let redis = RedisTransport::connect("redis://127.0.0.1:6379", RedisOptions::default()).await?;
//! let mut workers = redis
//!     .subscribe(SubscribeOptions::new(ChannelPattern::new("jobs.>")?).group("workers"))
//!     .await?;
//! redis.publish(Envelope::new(ChannelName::new("jobs.resize")?, "job", &b"{}"[..])).await?;
//! let delivery = workers.next_batch(1).await?.remove(0);
//! delivery.ack().await?;
//! # Ok(()) }
//! ```

mod consumer;
mod fast;
mod scripts;
mod util;
mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    Capabilities, ChannelConfig, ChannelName, ChannelPattern, ChannelStats, Consumer, DeadLetter,
    DeadLetterFilter, Discard, DurabilityReport, EngineStats, Envelope, Error, ErrorKind,
    GroupStats, MessageId, PublishLimits, PublishReceipt, StartPosition, SubscribeOptions,
    Transport,
};
use async_trait::async_trait;
use chrono::Utc;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use rustc_hash::FxHashSet;
use tokio::sync::Notify;

use crate::consumer::RedisConsumer;
use crate::util::{arr, backend_error, bytes, int, lua_ms, millis, str_of, text, value_map};

pub use crate::consumer::BLOCK_SLICE;

/// Settings of a [`RedisTransport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Every key this transport uses starts with `<prefix>:`. Two transports with the
    /// same prefix on one server are one bus; different prefixes never see each other.
    pub prefix: String,
    /// The largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// How long one command may take before it fails with a `Backend` error.
    pub response_timeout: Duration,
    /// How long connecting may take.
    pub connection_timeout: Duration,
    /// How many times a lost connection is re-established (with exponential backoff
    /// from `reconnect_min_delay` up to `reconnect_max_delay`) before a command fails.
    pub reconnect_retries: usize,
    /// The first reconnect delay.
    pub reconnect_min_delay: Duration,
    /// The longest reconnect delay.
    pub reconnect_max_delay: Duration,
    /// For `rediss://`: trust this CA certificate (PEM) instead of the system's and the
    /// webpki roots, e.g. a private CA or a self-signed test server.
    pub tls_root_cert: Option<Vec<u8>>,
}

impl Default for RedisOptions {
    /// Prefix `agentbus`, 1 MiB payloads, 5 s response timeout, 2 s connect timeout,
    /// 6 reconnect attempts from 50 ms to 2 s apart.
    fn default() -> Self {
        RedisOptions {
            prefix: "agentbus".to_string(),
            max_payload_bytes: agentbus::transport::DEFAULT_MAX_PAYLOAD_BYTES,
            response_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(2),
            reconnect_retries: 6,
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(2),
            tls_root_cert: None,
        }
    }
}

impl RedisOptions {
    /// Sets the key prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the largest accepted payload.
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes;
        self
    }

    /// Sets the response timeout of one command.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Trusts `pem` (a CA certificate) for `rediss://` instead of the usual roots.
    pub fn tls_root_cert(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_cert = Some(pem.into());
        self
    }

    /// Sets how many reconnect attempts are made before a command fails.
    pub fn reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }
}

/// The outcome of [`RedisTransport::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether the server answered a `PING`.
    pub up: bool,
    /// The round trip of the `PING` (or how long it took to fail).
    pub latency: Duration,
    /// What went wrong, when it is down.
    pub error: Option<String>,
}

pub(crate) struct Shared {
    pub(crate) client: redis::Client,
    pub(crate) conn: ConnectionManager,
    pub(crate) options: RedisOptions,
    pub(crate) url: String,
    pub(crate) closed: AtomicBool,
    pub(crate) closed_notify: Notify,
    limits: PublishLimits,
    /// Channels the publish script last said have dedup off: their messages without
    /// deadline and not-before go without their ids (see `publish.lua`). Only a hint:
    /// a channel whose dedup was turned on since is caught by the script, which then
    /// stores nothing and asks for the ids.
    dedup_off: DedupOff,
}

/// The channels known to have dedup off, at most [`DedupOff::CAPACITY`] of them.
#[derive(Default)]
struct DedupOff(Mutex<FxHashSet<String>>);

impl DedupOff {
    /// Beyond this many channels the set starts over, so that publishing to ever new
    /// channels (e.g. reply inboxes) cannot grow it without bound. Forgetting a channel
    /// only costs its next publish the ids.
    const CAPACITY: usize = 4096;

    fn contains(&self, channel: &str) -> bool {
        self.0.lock().contains(channel)
    }

    /// Records what a publish reply said of `channel`'s dedup window.
    fn learn(&self, channel: &str, window_ms: i64) {
        let mut set = self.0.lock();
        if window_ms != 0 {
            set.remove(channel);
        } else if !set.contains(channel) {
            if set.len() >= Self::CAPACITY {
                set.clear();
            }
            set.insert(channel.to_owned());
        }
    }

    fn forget(&self, channel: &str) {
        self.0.lock().remove(channel);
    }

    fn clear(&self) {
        self.0.lock().clear();
    }
}

impl Shared {
    pub(crate) fn check_open(&self) -> agentbus::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::new(
                ErrorKind::Closed,
                format!(
                    "the redis transport for {} is closed: it was shut down; connect again to continue",
                    self.url
                ),
            ))
        } else {
            Ok(())
        }
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.options.prefix
    }

    pub(crate) fn err(&self, op: &str, e: redis::RedisError) -> Error {
        backend_error(&self.url, op, e)
    }
}

/// A [`Transport`] on Redis Streams. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisTransport {
    shared: Arc<Shared>,
}

impl fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTransport")
            .field("url", &self.shared.url)
            .field("prefix", &self.shared.options.prefix)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// Takes a `prefix=NAME` query parameter out of a URL.
fn split_prefix(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut prefix = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("prefix=") {
            Some(p) => {
                prefix = Some(p.to_string());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    if rest.is_empty() {
        (base.to_string(), prefix)
    } else {
        (format!("{base}?{}", rest.join("&")), prefix)
    }
}

/// Hides a password in a URL for messages.
fn display_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

impl RedisTransport {
    /// Connects to the server at `url` (`redis://host:port/db`; `rediss://…` for TLS,
    /// verified against the system's roots or [`RedisOptions::tls_root_cert`]; a
    /// `prefix=NAME` query parameter, as in
    /// `redis://host:6379/0?prefix=bus1`, overrides the key prefix), checks that it speaks Redis 7 or later and loads
    /// the scripts.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a malformed URL or prefix; [`ErrorKind::Backend`]
    /// when the server cannot be reached or is older than 7.0.
    pub async fn connect(url: &str, mut options: RedisOptions) -> agentbus::Result<Self> {
        let (url, prefix) = split_prefix(url);
        if let Some(prefix) = prefix {
            options.prefix = prefix;
        }
        let url = url.as_str();
        let shown = display_url(url);
        if options.prefix.is_empty()
            || options
                .prefix
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b == b'*' || b == b'?' || b == b'[')
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "invalid redis key prefix '{}': use a non-empty name without spaces or glob \
                     characters, e.g. 'agentbus'",
                    options.prefix
                ),
            ));
        }
        if url.starts_with("rediss://") {
            // One crypto provider is compiled in (ring); make it the process default
            // (a no-op when one is installed already).
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = match &options.tls_root_cert {
            Some(pem) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => redis::Client::open(url),
        }
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "'{shown}' is not a usable redis URL ({e}); write redis://HOST:PORT[/DB] or \
                     rediss://HOST:PORT for TLS"
                ),
            )
            .with_source(e)
        })?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(options.reconnect_retries)
            .set_min_delay(options.reconnect_min_delay)
            .set_max_delay(options.reconnect_max_delay)
            .set_response_timeout(Some(options.response_timeout))
            .set_connection_timeout(Some(options.connection_timeout));
        let mut conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| backend_error(&shown, "connect", e))?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(|e| backend_error(&shown, "INFO server", e))?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("0")
            .trim()
            .to_string();
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 7 {
            return Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "the redis server at {shown} is version {version}; agentbus needs 7.0 or later \
                     (XAUTOCLAIM, XINFO lag, exclusive ranges); upgrade the server"
                ),
            ));
        }
        scripts::load_all(&mut conn)
            .await
            .map_err(|e| backend_error(&shown, "SCRIPT LOAD", e))?;
        Ok(RedisTransport {
            shared: Arc::new(Shared {
                client,
                conn,
                limits: PublishLimits {
                    max_payload_bytes: options.max_payload_bytes,
                },
                options,
                url: shown,
                closed: AtomicBool::new(false),
                closed_notify: Notify::new(),
                dedup_off: DedupOff::default(),
            }),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        self.shared.prefix()
    }

    /// Pings the server: up or down, with the round trip or the error. Never fails
    /// itself, so it can feed a health endpoint.
    pub async fn health(&self) -> Health {
        let start = Instant::now();
        let mut conn = self.shared.conn();
        let result: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
        Health {
            up: result.is_ok(),
            latency: start.elapsed(),
            error: result.err().map(|e| {
                format!(
                    "redis at {} does not answer: {e}; the client reconnects with backoff",
                    self.shared.url
                )
            }),
        }
    }

    /// Deletes every key under this transport's prefix (`SCAN` + `UNLINK`) and returns
    /// how many. Everything the bus stored under the prefix is gone afterwards.
    ///
    /// # Errors
    /// [`ErrorKind::Backend`] when the server fails.
    pub async fn delete_everything(&self) -> agentbus::Result<u64> {
        delete_prefix(&mut self.shared.conn(), self.prefix())
            .await
            .map_err(|e| self.shared.err("SCAN/UNLINK", e))
    }

    /// Stores envelopes with one script call; one result per envelope, in order.
    async fn publish_many(
        &self,
        envelopes: Vec<Envelope>,
    ) -> Vec<agentbus::Result<PublishReceipt>> {
        if let Err(e) = self.shared.check_open() {
            let (kind, message) = (e.kind(), e.message().to_string());
            return envelopes
                .iter()
                .map(|_| Err(Error::new(kind, message.clone())))
                .collect();
        }
        let now = Utc::now();
        let mut results: Vec<Option<agentbus::Result<PublishReceipt>>> =
            Vec::with_capacity(envelopes.len());
        // The checked envelopes, and the slot of `results` each one's receipt goes in.
        let mut accepted: Vec<Envelope> = Vec::with_capacity(envelopes.len());
        let mut slots: Vec<usize> = Vec::with_capacity(envelopes.len());
        for mut envelope in envelopes {
            if let Err(e) = self.shared.limits.check(&envelope, || now) {
                results.push(Some(Err(e)));
                continue;
            }
            envelope.header.attempt = 1;
            slots.push(results.len());
            results.push(None);
            accepted.push(envelope);
        }
        if !accepted.is_empty() {
            let mut reply = self.publish_call(&accepted, false).await;
            if let Ok(Some(channel)) = reply.as_ref().map(needs_ids) {
                // The channel's dedup was turned on since this client learned it was
                // off: the script stored nothing; the same call again, with every id.
                self.shared.dedup_off.forget(&channel);
                reply = self.publish_call(&accepted, true).await;
            }
            match reply {
                Ok(reply) => {
                    let replies = arr(&reply);
                    // Per channel touched: {channel, group count, dedup window ms, ...}.
                    let channels = replies.first().map(arr).unwrap_or(&[]);
                    for triple in channels.chunks(3) {
                        if let [name, _, window] = triple {
                            if let Some(name) =
                                bytes(name).and_then(|b| std::str::from_utf8(b).ok())
                            {
                                self.shared.dedup_off.learn(name, int(window));
                            }
                        }
                    }
                    let groups_of = |channel: &ChannelName| {
                        channels
                            .chunks(3)
                            .find(|triple| {
                                triple.first().and_then(bytes) == Some(channel.as_str().as_bytes())
                            })
                            .and_then(|triple| triple.get(1))
                            .map_or(0, int)
                    };
                    for (i, (slot, envelope)) in slots.into_iter().zip(accepted).enumerate() {
                        let groups = groups_of(&envelope.channel);
                        results[slot] = Some(receipt(
                            replies.get(i + 1),
                            envelope.header.id,
                            envelope.channel,
                            groups,
                        ));
                    }
                }
                Err(e) => {
                    let error = self.shared.err("publish", e);
                    for (slot, envelope) in slots.into_iter().zip(accepted) {
                        results[slot] = Some(Err(Error::new(error.kind(), error.message())
                            .with_context("channel", envelope.channel)
                            .set_temporary(error.is_temporary())));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, "a publish got no result")))
            })
            .collect()
    }

    /// One call of the publish script with `envelopes` (checked, in order): runs of
    /// messages of one channel and lane, each message written straight into the
    /// command. A run goes without ids (one argument per message instead of two) when
    /// its channel is known to have dedup off and none of its messages has a deadline
    /// or not-before, unless `with_ids`.
    async fn publish_call(
        &self,
        envelopes: &[Envelope],
        with_ids: bool,
    ) -> redis::RedisResult<Value> {
        let mut cmd = scripts::evalsha(&scripts::PUBLISH, 0);
        cmd.arg(self.prefix());
        let lane = |e: &Envelope| e.header.priority.as_u8().saturating_sub(1);
        let mut start = 0;
        while let Some(first) = envelopes.get(start) {
            let end = envelopes[start..]
                .iter()
                .position(|e| e.channel != first.channel || lane(e) != lane(first))
                .map_or(envelopes.len(), |n| start + n);
            let run = &envelopes[start..end];
            let ids = with_ids
                || !self.shared.dedup_off.contains(first.channel.as_str())
                || run
                    .iter()
                    .any(|e| e.header.deadline.is_some() || e.header.not_before.is_some());
            cmd.arg(first.channel.as_str())
                .arg(lane(first))
                .arg(run.len())
                .arg(if ids { "1" } else { "0" });
            for envelope in run {
                if ids {
                    cmd.arg(IdArg(&envelope.header));
                }
                cmd.arg(wire::Stored {
                    header: &envelope.header,
                    payload: &envelope.payload,
                });
            }
            start = end;
        }
        scripts::run(&scripts::PUBLISH, &cmd, &mut self.shared.conn()).await
    }

    async fn admin(&self, op: &str, args: &[&str]) -> agentbus::Result<Value> {
        let mut inv = scripts::ADMIN.prepare_invoke();
        inv.arg(self.prefix()).arg(op);
        for a in args {
            inv.arg(*a);
        }
        inv.invoke_async(&mut self.shared.conn())
            .await
            .map_err(|e| self.shared.err(op, e))
    }

    async fn dead_entries(&self) -> agentbus::Result<Vec<(String, DeadLetter)>> {
        let mut conn = self.shared.conn();
        let key = format!("{}:dlq", self.prefix());
        let raw: Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.shared.err("XRANGE dead letters", e))?;
        let mut out = Vec::new();
        for entry in arr(&raw) {
            let parts = arr(entry);
            let (Some(id), Some(fields)) = (parts.first(), parts.get(1)) else {
                continue;
            };
            let fields = value_map(fields);
            let Some(json) = fields.get("j") else {
                continue;
            };
            match serde_json::from_slice::<DeadLetter>(json) {
                Ok(letter) => out.push((text(id), letter)),
                Err(e) => tracing::warn!(
                    entry = %text(id),
                    "skipping a dead letter that does not decode: {e}"
                ),
            }
        }
        Ok(out)
    }

    /// Finds one dead letter by id without decoding the others: first in the two
    /// minutes of the dead-letter stream around the time in the id (a UUIDv7 starts
    /// with its creation time in ms, and the letter is written right after), then, for
    /// a letter written by a process whose clock was off, through the whole stream in
    /// pages. Only the entry whose `i` field matches is decoded.
    async fn find_dead(&self, id: MessageId) -> agentbus::Result<(String, DeadLetter)> {
        let wanted = id.to_string();
        let key = format!("{}:dlq", self.prefix());
        let mut conn = self.shared.conn();
        let mut ranges: Vec<(String, String)> = Vec::new();
        if let Some(ms) = uuid_v7_millis(&wanted) {
            const AROUND: u64 = 60_000;
            ranges.push((
                ms.saturating_sub(AROUND).to_string(),
                ms.saturating_add(AROUND).to_string(),
            ));
        }
        ranges.push(("-".into(), "+".into()));
        const PAGE: usize = 1000;
        for (start, end) in ranges {
            let mut from = start;
            loop {
                let raw: Value = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(&from)
                    .arg(&end)
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.shared.err("XRANGE dead letters", e))?;
                let entries = arr(&raw);
                for entry in entries {
                    let parts = arr(entry);
                    let (Some(entry_id), Some(fields)) = (parts.first(), parts.get(1)) else {
                        continue;
                    };
                    let fields = value_map(fields);
                    if fields.get("i").map(Vec::as_slice) != Some(wanted.as_bytes()) {
                        continue;
                    }
                    if let Some(letter) = fields
                        .get("j")
                        .and_then(|j| serde_json::from_slice::<DeadLetter>(j).ok())
                    {
                        return Ok((text(entry_id), letter));
                    }
                }
                match entries.last().map(|e| arr(e).first().map(text)) {
                    Some(Some(last)) if entries.len() == PAGE => from = format!("({last}"),
                    _ => break,
                }
            }
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!("there is no dead letter with id {id}; `agentbus dlq list` shows the ids"),
        )
        .with_context("dead_letter", id))
    }

    async fn server_facts(&self) -> BTreeMap<String, String> {
        let mut facts = BTreeMap::new();
        let mut conn = self.shared.conn();
        if let Ok(info) = redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut conn)
            .await
        {
            for line in info.lines() {
                if let Some(v) = line.strip_prefix("redis_version:") {
                    facts.insert("redis_version".into(), v.trim().into());
                }
                if let Some(v) = line.strip_prefix("redis_mode:") {
                    facts.insert("redis_mode".into(), v.trim().into());
                }
            }
        }
        if let Ok(info) = redis::cmd("INFO")
            .arg("persistence")
            .query_async::<String>(&mut conn)
            .await
        {
            for line in info.lines() {
                for key in ["aof_enabled", "rdb_last_save_time", "aof_last_write_status"] {
                    if let Some(v) = line.strip_prefix(&format!("{key}:")) {
                        facts.insert(key.into(), v.trim().into());
                    }
                }
            }
        }
        for key in [
            "appendonly",
            "appendfsync",
            "maxmemory-policy",
            "save",
            "maxmemory",
        ] {
            if let Ok(v) = redis::cmd("CONFIG")
                .arg("GET")
                .arg(key)
                .query_async::<Vec<String>>(&mut conn)
                .await
            {
                if let Some(value) = v.get(1) {
                    facts.insert(key.into(), value.clone());
                }
            }
        }
        facts.insert("url".into(), self.shared.url.clone());
        facts.insert("prefix".into(), self.prefix().to_string());
        facts
    }
}

/// Deletes every key starting with `<prefix>:` on the connection; returns how many.
///
/// # Errors
/// Whatever the server returns.
pub async fn delete_prefix(
    conn: &mut impl redis::aio::ConnectionLike,
    prefix: &str,
) -> redis::RedisResult<u64> {
    let pattern = format!("{}:*", glob_escape(prefix));
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// The id argument of a message for the publish script: the id, followed by
/// `|<deadline ms>|<not-before ms>` when either is set; written without a string of
/// its own in the common case.
struct IdArg<'a>(&'a agentbus::Header);

impl redis::ToRedisArgs for IdArg<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        let mut buf = uuid::Uuid::encode_buffer();
        let id = self.0.id.0.hyphenated().encode_lower(&mut buf);
        if self.0.deadline.is_none() && self.0.not_before.is_none() {
            out.write_arg(id.as_bytes());
        } else {
            let stamp = |t: Option<chrono::DateTime<Utc>>| {
                t.map_or(String::new(), |t| millis(t).to_string())
            };
            out.write_arg_fmt(format_args!(
                "{id}|{}|{}",
                stamp(self.0.deadline),
                stamp(self.0.not_before)
            ));
        }
    }
}

/// How many envelopes one publish script call stores.
const PUBLISH_CHUNK: usize = 256;

/// Turns one reply of the publish script into a receipt or an error: a number is the
/// sequence of a stored message (whose channel has `groups` groups), an array a
/// duplicate or a refusal.
fn receipt(
    reply: Option<&Value>,
    id: MessageId,
    channel: ChannelName,
    groups: i64,
) -> agentbus::Result<PublishReceipt> {
    if let Some(Value::Int(sequence)) = reply {
        return Ok(PublishReceipt {
            id,
            channel,
            sequence: (*sequence).max(0) as u64,
            duplicate: false,
            groups: groups.max(0) as usize,
        });
    }
    let parts = reply.map(arr).unwrap_or(&[]);
    let status = parts.first().map_or(-2, int);
    match status {
        1 => Ok(PublishReceipt {
            id,
            channel,
            sequence: parts.get(1).map_or(0, int) as u64,
            duplicate: true,
            groups: parts.get(2).map_or(0, int) as usize,
        }),
        -1 => Err(Error::new(
            ErrorKind::Full,
            format!(
                "channel '{channel}' is full ({} messages, {} bytes unconsumed; limits: {} \
                 messages, {} bytes): consumers are behind; retry later, add consumers, or \
                 configure larger limits or discard = drop_oldest",
                parts.get(1).map_or(0, int),
                parts.get(2).map_or(0, int),
                parts.get(3).map_or_else(|| "none".into(), str_of),
                parts.get(4).map_or_else(|| "none".into(), str_of),
            ),
        )
        .with_context("channel", &channel)
        .set_temporary(true)),
        _ => Err(Error::new(
            ErrorKind::Internal,
            format!("the publish script answered {reply:?}; this is a bug in agentbus-redis"),
        )),
    }
}

/// The channel named by a publish reply `{'ids', channel}`: a run without ids met a
/// channel whose dedup is on, and nothing of the call was stored.
fn needs_ids(reply: &Value) -> Option<String> {
    match arr(reply) {
        [tag, channel] if bytes(tag) == Some(b"ids") => {
            Some(String::from_utf8_lossy(bytes(channel)?).into_owned())
        }
        _ => None,
    }
}

/// The creation time (ms since the epoch) in the first 48 bits of a UUIDv7 written
/// as text; `None` for anything else.
fn uuid_v7_millis(id: &str) -> Option<u64> {
    let hex: String = id.chars().filter(|c| *c != '-').take(12).collect();
    let version = id.chars().filter(|c| *c != '-').nth(12)?;
    if hex.len() != 12 || version != '7' {
        return None;
    }
    u64::from_str_radix(&hex, 16).ok()
}

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or(String::new(), |d| lua_ms(d).to_string())
}

fn opt_u64(n: Option<u64>) -> String {
    n.map_or(String::new(), |n| n.to_string())
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn publish(&self, envelope: Envelope) -> agentbus::Result<PublishReceipt> {
        self.publish_many(vec![envelope])
            .await
            .pop()
            .unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::Internal,
                    "the publish script gave no receipt; this is a bug in agentbus-redis",
                ))
            })
    }

    async fn publish_batch(
        &self,
        envelopes: Vec<Envelope>,
    ) -> Vec<agentbus::Result<PublishReceipt>> {
        // One script call per chunk: the server stores the chunk atomically, in order.
        let mut results = Vec::with_capacity(envelopes.len());
        let mut envelopes = envelopes.into_iter().peekable();
        while envelopes.peek().is_some() {
            let chunk: Vec<Envelope> = envelopes.by_ref().take(PUBLISH_CHUNK).collect();
            results.extend(self.publish_many(chunk).await);
        }
        results
    }

    async fn subscribe(&self, options: SubscribeOptions) -> agentbus::Result<Box<dyn Consumer>> {
        self.shared.check_open()?;
        options.validate()?;
        let consumer = RedisConsumer::join(self.shared.clone(), options).await?;
        Ok(Box::new(consumer))
    }

    async fn configure_channels(
        &self,
        pattern: ChannelPattern,
        config: ChannelConfig,
    ) -> agentbus::Result<()> {
        self.shared.check_open()?;
        let json = serde_json::json!({
            "pattern": pattern.as_str(),
            "max_age": opt_ms(config.max_age),
            "max_bytes": opt_u64(config.max_bytes),
            "max_messages": opt_u64(config.max_messages),
            "discard": match config.discard {
                Discard::RejectNew => "reject_new",
                Discard::DropOldest => "drop_oldest",
            },
            "dedup": lua_ms(config.dedup_window).to_string(),
        })
        .to_string();
        self.admin("configure", &[pattern.as_str(), &json]).await?;
        // Channels of this pattern may have another dedup window now; the next publish
        // of each learns it again.
        self.shared.dedup_off.clear();
        Ok(())
    }

    async fn delete_group(&self, group: &str) -> agentbus::Result<()> {
        self.shared.check_open()?;
        let deleted = int(&self.admin("delete", &[group]).await?);
        if deleted == 0 {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("there is no group '{group}'; `agentbus stats` lists the groups"),
            )
            .with_context("group", group));
        }
        Ok(())
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> agentbus::Result<Vec<DeadLetter>> {
        Ok(self
            .dead_entries()
            .await?
            .into_iter()
            .map(|(_, l)| l)
            .filter(|l| filter.accepts(l))
            .take(filter.limit.unwrap_or(usize::MAX))
            .collect())
    }

    async fn dead_letter(&self, id: MessageId) -> agentbus::Result<DeadLetter> {
        Ok(self.find_dead(id).await?.1)
    }

    async fn replay_dead_letter(&self, id: MessageId) -> agentbus::Result<PublishReceipt> {
        self.shared.check_open()?;
        let (entry, letter) = self.find_dead(id).await?;
        let receipt = self
            .publish(letter.replay_envelope(MessageId::new()))
            .await?;
        let mut conn = self.shared.conn();
        let _: i64 = redis::cmd("XDEL")
            .arg(format!("{}:dlq", self.prefix()))
            .arg(&entry)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.shared.err("XDEL dead letter", e))?;
        Ok(receipt)
    }

    async fn purge_dead_letters(&self, filter: DeadLetterFilter) -> agentbus::Result<u64> {
        let ids: Vec<String> = self
            .dead_entries()
            .await?
            .into_iter()
            .filter(|(_, l)| filter.accepts(l))
            .take(filter.limit.unwrap_or(usize::MAX))
            .map(|(entry, _)| entry)
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.shared.conn();
        let n: u64 = redis::cmd("XDEL")
            .arg(format!("{}:dlq", self.prefix()))
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.shared.err("XDEL dead letters", e))?;
        Ok(n)
    }

    async fn stats(&self) -> agentbus::Result<EngineStats> {
        let p = self.prefix().to_string();
        let mut conn = self.shared.conn();
        let map_err = |op: &'static str| {
            let shared = self.shared.clone();
            move |e| shared.err(op, e)
        };
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{p}:channels"))
            .query_async(&mut conn)
            .await
            .map_err(map_err("SMEMBERS channels"))?;
        names.sort();
        let mut channels = Vec::with_capacity(names.len());
        for name in &names {
            let Ok(channel) = ChannelName::new(name) else {
                continue;
            };
            let mut pipe = redis::pipe();
            pipe.cmd("HMGET").arg(format!("{p}:c:{name}")).arg(&[
                "seq", "seq", // published = seq: duplicates and refusals take none
                "dropped", "bytes",
            ]);
            for lane in 0..4 {
                pipe.cmd("XLEN").arg(format!("{p}:s:{name}:{lane}"));
            }
            let (counters, l0, l1, l2, l3): (Vec<Option<u64>>, u64, u64, u64, u64) = pipe
                .query_async(&mut conn)
                .await
                .map_err(map_err("channel stats"))?;
            let c = |i: usize| counters.get(i).copied().flatten().unwrap_or(0);
            channels.push(ChannelStats {
                channel,
                messages: l0 + l1 + l2 + l3,
                bytes: c(3),
                published: c(1),
                dropped: c(2),
                last_sequence: c(0),
            });
        }
        let group_patterns: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{p}:groups"))
            .query_async(&mut conn)
            .await
            .map_err(map_err("HGETALL groups"))?;
        let mut groups = Vec::with_capacity(group_patterns.len());
        for (group, pattern) in &group_patterns {
            let Ok(pattern) = ChannelPattern::new(pattern) else {
                continue;
            };
            let (counters, members, parked): (Vec<Option<u64>>, u64, u64) = redis::pipe()
                .cmd("HMGET")
                .arg(format!("{p}:g:{group}"))
                .arg(&["delivered", "acked", "redelivered", "dead_lettered"])
                .cmd("SCARD")
                .arg(format!("{p}:gm:{group}"))
                .cmd("ZCARD")
                .arg(format!("{p}:gs:{group}"))
                .query_async(&mut conn)
                .await
                .map_err(map_err("group stats"))?;
            let (mut unread, mut pel) = (0u64, 0u64);
            for name in names
                .iter()
                .filter(|n| ChannelName::new(n.as_str()).is_ok_and(|c| pattern.matches(&c)))
            {
                for lane in 0..4 {
                    let info: redis::RedisResult<Value> = redis::cmd("XINFO")
                        .arg("GROUPS")
                        .arg(format!("{p}:s:{name}:{lane}"))
                        .query_async(&mut conn)
                        .await;
                    let Ok(info) = info else { continue };
                    for g in arr(&info) {
                        let m = value_map(g);
                        if m.get("name").map(|n| n.as_slice()) == Some(group.as_bytes()) {
                            let get = |k: &str| {
                                m.get(k)
                                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                                    .unwrap_or(0)
                            };
                            unread += get("lag");
                            pel += get("pending");
                        }
                    }
                }
            }
            let c = |i: usize| counters.get(i).copied().flatten().unwrap_or(0);
            groups.push(GroupStats {
                group: group.clone(),
                pattern,
                members: members as usize,
                pending: unread + parked,
                in_flight: pel.saturating_sub(parked),
                delivered: c(0),
                acked: c(1),
                redelivered: c(2),
                dead_lettered: c(3),
            });
        }
        let (dead_letters, counters): (u64, Vec<Option<u64>>) = redis::pipe()
            .cmd("XLEN")
            .arg(format!("{p}:dlq"))
            .cmd("HMGET")
            .arg(format!("{p}:n"))
            .arg(&["rejected_full", "expired"])
            .query_async(&mut conn)
            .await
            .map_err(map_err("engine stats"))?;
        let c = |i: usize| counters.get(i).copied().flatten().unwrap_or(0);
        Ok(EngineStats {
            engine: "redis".into(),
            channels,
            groups,
            dead_letters,
            rejected_full: c(0),
            expired: c(1),
            details: self.server_facts().await,
        })
    }

    async fn close(&self) -> agentbus::Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.closed_notify.notify_waiters();
        Ok(())
    }

    async fn durability(&self) -> agentbus::Result<DurabilityReport> {
        let facts = self.server_facts().await;
        Ok(durability_report(facts))
    }
}

/// Turns the server's persistence settings into what a receipt guarantees.
pub(crate) fn durability_report(facts: BTreeMap<String, String>) -> DurabilityReport {
    let get = |k: &str| facts.get(k).map(String::as_str);
    let aof = get("appendonly") == Some("yes") || get("aof_enabled") == Some("1");
    let fsync = get("appendfsync").unwrap_or("unknown");
    let save = get("save").unwrap_or("");
    let policy = get("maxmemory-policy").unwrap_or("unknown");
    let config_readable = facts.contains_key("appendonly");
    let mut advice = Vec::new();
    let mut guarantee = if !config_readable {
        "CONFIG GET is not allowed on this server, so its persistence settings are unknown: \
         assume a receipt means the message is in the server's memory only and is lost if \
         the server process stops."
            .to_string()
    } else if aof && fsync == "always" {
        "A receipt means the message was written to the append-only file and fsynced \
         (appendfsync always): it survives a crash of Redis, of the machine and a power loss."
            .to_string()
    } else if aof && fsync == "everysec" {
        "A receipt means the message is in Redis's memory and its append-only file, fsynced \
         about once a second: it survives a crash of the Redis process, but a machine crash \
         or power loss can lose the last second of receipts."
            .to_string()
    } else if aof {
        format!(
            "A receipt means the message is in the append-only file, but appendfsync is \
             '{fsync}': the operating system decides when it reaches the disk, so a machine \
             crash or power loss can lose up to ~30 s of receipts."
        )
    } else if !save.trim().is_empty() {
        format!(
            "The append-only file is off; only RDB snapshots are taken (save '{save}'). A \
             receipt means the message is in Redis's memory: a crash or restart of Redis loses \
             everything since the last snapshot — minutes of receipts."
        )
    } else {
        "Persistence is off (no append-only file, no snapshots): a receipt means the message \
         is in Redis's memory only; any restart of the Redis server loses every message, \
         group position and dead letter."
            .to_string()
    };
    if config_readable && !(aof && fsync == "always") {
        if !aof {
            advice.push(
                "Turn on the append-only file: CONFIG SET appendonly yes (and appendonly yes in \
                 redis.conf)."
                    .to_string(),
            );
        }
        advice.push(
            "For receipts that survive a power loss: CONFIG SET appendfsync always (slower \
             writes); everysec bounds the loss to about one second."
                .to_string(),
        );
    }
    if config_readable && policy != "noeviction" {
        guarantee.push_str(&format!(
            " maxmemory-policy is '{policy}': under memory pressure Redis may evict streams \
             and lose messages that were acknowledged."
        ));
        advice.push(
            "CONFIG SET maxmemory-policy noeviction, so a full server refuses writes (agentbus \
             returns an error) instead of evicting messages."
                .to_string(),
        );
    }
    advice.push(
        "A replica does not make a receipt stronger by itself: writes are replicated \
         asynchronously (WAIT is not used)."
            .to_string(),
    );
    DurabilityReport {
        engine: "redis".into(),
        settings: facts,
        guarantee,
        advice,
    }
}

pub(crate) fn start_args(start: StartPosition) -> (String, String) {
    match start {
        StartPosition::New => ("new".into(), String::new()),
        StartPosition::Earliest => ("earliest".into(), String::new()),
        StartPosition::Time(t) => ("time".into(), millis(t).to_string()),
        StartPosition::Sequence(s) => ("seq".into(), s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair_of_transports() -> (RedisTransport, RedisTransport) {
        let url =
            std::env::var("AGENTBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("abunit-{:012x}", fastrand::u64(..1 << 48));
        let connect = || RedisTransport::connect(&url, RedisOptions::default().prefix(&prefix));
        (connect().await.unwrap(), connect().await.unwrap())
    }

    /// Publishes `envelopes` in one batch; every receipt, or the test fails.
    async fn publish_all(t: &RedisTransport, envelopes: Vec<Envelope>) -> Vec<PublishReceipt> {
        t.publish_batch(envelopes)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    fn dedup(window: Duration) -> ChannelConfig {
        ChannelConfig {
            dedup_window: window,
            ..ChannelConfig::default()
        }
    }

    /// Another process turns dedup on for a channel after this client learned it was
    /// off: the next publish, sent without ids, is refused by the script as a whole
    /// (nothing of the call is stored, also not of the other channel in it) and sent
    /// again with ids, so dedup holds from then on and no sequence is skipped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dedup_turned_on_elsewhere_after_this_client_learned_it_was_off_still_dedups() {
        let (ours, theirs) = pair_of_transports().await;
        let flip = ChannelName::new("unit.dedup.flip").unwrap();
        let steady = ChannelName::new("unit.dedup.steady").unwrap();
        theirs
            .configure_channels(
                ChannelPattern::new("unit.dedup.*").unwrap(),
                dedup(Duration::ZERO),
            )
            .await
            .unwrap();
        let known = |t: &RedisTransport, c: &ChannelName| t.shared.dedup_off.contains(c.as_str());
        assert!(
            !known(&ours, &flip),
            "nothing learned before the first publish"
        );
        let first = publish_all(
            &ours,
            vec![
                Envelope::new(flip.clone(), "n", &b"1"[..]),
                Envelope::new(steady.clone(), "n", &b"1"[..]),
            ],
        )
        .await;
        let (flip_first, steady_first) = (first[0].clone(), first[1].clone());
        assert!(
            known(&ours, &flip) && known(&ours, &steady),
            "learned from the reply"
        );

        // Dedup off, sent without ids: the same message twice is stored twice.
        let twice = Envelope::new(flip.clone(), "n", &b"2"[..]);
        let a = ours.publish(twice.clone()).await.unwrap();
        let b = ours.publish(twice).await.unwrap();
        assert!(!a.duplicate && !b.duplicate, "{a:?} {b:?}");
        assert_eq!(
            (a.sequence, b.sequence),
            (flip_first.sequence + 1, flip_first.sequence + 2)
        );

        theirs
            .configure_channels(
                ChannelPattern::from(flip.clone()),
                dedup(Duration::from_secs(60)),
            )
            .await
            .unwrap();
        assert!(known(&ours, &flip), "ours has not heard of it yet");
        let once = Envelope::new(flip.clone(), "n", &b"3"[..]);
        let results = publish_all(
            &ours,
            vec![Envelope::new(steady.clone(), "n", &b"2"[..]), once.clone()],
        )
        .await;
        let (steady_next, stored) = (results[0].clone(), results[1].clone());
        assert_eq!(
            steady_next.sequence,
            steady_first.sequence + 1,
            "the refused call stored nothing, the call sent again stored it once"
        );
        assert!(!stored.duplicate, "{stored:?}");
        assert_eq!(stored.sequence, b.sequence + 1);
        assert!(!known(&ours, &flip), "learned that dedup is on");
        assert!(known(&ours, &steady), "the other channel still has it off");

        let again = ours.publish(once).await.unwrap();
        assert!(again.duplicate, "{again:?}");
        assert_eq!(again.sequence, stored.sequence);
        let stats = ours.stats().await.unwrap();
        let of = |c: &ChannelName| {
            stats
                .channels
                .iter()
                .find(|s| &s.channel == c)
                .map(|s| (s.messages, s.last_sequence))
        };
        assert_eq!(of(&flip), Some((4, stored.sequence)), "{stats:?}");
        assert_eq!(of(&steady), Some((2, steady_next.sequence)), "{stats:?}");
        ours.delete_everything().await.unwrap();
    }

    /// A message with a deadline or a not-before goes with its id argument (which
    /// carries them) also on a channel known to have dedup off, and keeps them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deadline_goes_with_the_id_on_a_channel_without_dedup() {
        let (ours, _) = pair_of_transports().await;
        let channel = ChannelName::new("unit.dedup.deadline").unwrap();
        ours.configure_channels(ChannelPattern::from(channel.clone()), dedup(Duration::ZERO))
            .await
            .unwrap();
        ours.publish(Envelope::new(channel.clone(), "n", &b"1"[..]))
            .await
            .unwrap();
        assert!(ours.shared.dedup_off.contains(channel.as_str()));
        let deadline = Utc::now() + chrono::Duration::minutes(5);
        let mut timed = Envelope::new(channel.clone(), "n", &b"2"[..]);
        timed.header.deadline = Some(deadline);
        let receipt = ours.publish(timed).await.unwrap();
        let stream = format!("{}:s:{channel}:1", ours.prefix());
        let last: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut ours.shared.conn())
            .await
            .unwrap();
        let entry = last.ids.first().expect("the entry");
        assert!(
            entry.id.ends_with(&format!("-{}", receipt.sequence)),
            "{} {receipt:?}",
            entry.id
        );
        assert_eq!(
            entry.get::<i64>("d"),
            Some(millis(deadline)),
            "{:?}",
            entry.map
        );
        ours.delete_everything().await.unwrap();
    }

    #[test]
    fn urls_hide_passwords() {
        assert_eq!(
            display_url("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(display_url("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn durability_without_aof_says_memory_only() {
        let facts: BTreeMap<String, String> = [
            ("appendonly", "no"),
            ("appendfsync", "everysec"),
            ("save", ""),
            ("maxmemory-policy", "noeviction"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let report = durability_report(facts);
        assert!(report.guarantee.contains("memory only"), "{report:?}");
        assert!(report.advice.iter().any(|a| a.contains("appendonly yes")));
    }

    #[test]
    fn durability_with_fsync_always_is_strong() {
        let facts: BTreeMap<String, String> = [
            ("appendonly", "yes"),
            ("appendfsync", "always"),
            ("maxmemory-policy", "allkeys-lru"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let report = durability_report(facts);
        assert!(report.guarantee.contains("power loss"), "{report:?}");
        assert!(report.guarantee.contains("evict"), "{report:?}");
    }

    #[test]
    fn prefix_comes_out_of_the_url() {
        assert_eq!(
            split_prefix("redis://h:1/0?prefix=bus1"),
            ("redis://h:1/0".to_string(), Some("bus1".to_string()))
        );
        assert_eq!(
            split_prefix("redis://h:1/0?protocol=resp3&prefix=x"),
            (
                "redis://h:1/0?protocol=resp3".to_string(),
                Some("x".to_string())
            )
        );
        assert_eq!(split_prefix("redis://h"), ("redis://h".to_string(), None));
    }

    #[test]
    fn uuid_v7_ids_carry_their_time() {
        let before = Utc::now().timestamp_millis() as u64;
        let id = MessageId::new().to_string();
        let after = Utc::now().timestamp_millis() as u64;
        let ms = uuid_v7_millis(&id).expect("a v7 id");
        assert!(
            (before..=after).contains(&ms),
            "{ms} not in {before}..={after}"
        );
        assert_eq!(uuid_v7_millis("not-an-id"), None);
        assert_eq!(uuid_v7_millis("67e55044-10b1-426f-9247-bb680e5fe0c8"), None);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a*b?"), "a\\*b\\?");
    }
}
