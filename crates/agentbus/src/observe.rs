//! The observer hook: one place where sinks (metrics, audit files, the interaction
//! store, anomaly detectors) see every message the bus publishes, delivers and settles.
//!
//! Register observers with [`BusBuilder::observer`](crate::BusBuilder::observer). The
//! bus then wraps its transport in an [`ObservedTransport`], which reports:
//!
//! - [`BusEvent::Published`] / [`BusEvent::PublishFailed`] after every publish,
//! - [`BusEvent::Delivered`] for every delivery handed to a consumer (redeliveries
//!   carry `attempt > 1`),
//! - [`BusEvent::Settled`] after every successful ack, nack or reject, with whether
//!   the settlement sent the message to dead letters.
//!
//! Observers run inline on the publishing or consuming task, so they must be quick and
//! must never block: a sink that does I/O hands the event to its own task through a
//! bounded channel and counts what it drops (as `agentbus-observe`'s audit sink does).
//!
//! Without observers nothing is wrapped and the hook costs nothing. With them, each
//! delivery costs one map insert and remove under a per-consumer lock: the wrapper keeps
//! the envelope of each unsettled delivery so the settlement can be reported with it.
//!
//! What the hook cannot see: messages an engine expires or dead-letters on its own
//! (deadline passed, ack wait run out on the last attempt). Those are in
//! [`Transport::stats`] and the dead letters, which `agentbus-observe` polls.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use crate::channel::ChannelPattern;
use crate::clock::SharedClock;
use crate::envelope::{Envelope, MessageId};
use crate::error::{Error, Result};
use crate::transport::{
    ChannelConfig, Consumer, DeadLetter, DeadLetterFilter, Delivery, EngineStats, PublishReceipt,
    Settlement, Settler, SubscribeOptions, Transport,
};

tokio::task_local! {
    /// The id of the agent instance whose runtime task is receiving or handling: set
    /// by the agent runtime, read when deliveries and settlements are reported.
    pub(crate) static HANDLING_AGENT: Arc<str>;
}

fn handling_agent() -> Option<Arc<str>> {
    HANDLING_AGENT.try_with(Arc::clone).ok()
}

/// One thing that happened to a message, as an observer sees it.
#[derive(Debug)]
#[non_exhaustive]
pub enum BusEvent<'a> {
    /// The engine accepted a message.
    Published {
        /// The message as stored.
        envelope: &'a Envelope,
        /// The engine's receipt (`duplicate` set for a deduplicated publish).
        receipt: &'a PublishReceipt,
        /// When, by the bus clock.
        at: DateTime<Utc>,
        /// How long the engine took to accept it.
        took: Duration,
    },
    /// A publish failed; the message may or may not be stored.
    PublishFailed {
        /// The message that was offered.
        envelope: &'a Envelope,
        /// Why.
        error: &'a Error,
        /// When, by the bus clock.
        at: DateTime<Utc>,
    },
    /// A delivery was handed to a consumer of `group`.
    Delivered {
        /// The message; `header.attempt` is this delivery's number (1 = first).
        envelope: &'a Envelope,
        /// The group it was delivered in.
        group: &'a str,
        /// The agent instance (id) that took it, when an agent runtime did.
        agent: Option<&'a str>,
        /// When, by the bus clock.
        at: DateTime<Utc>,
    },
    /// A delivery was settled.
    Settled {
        /// The message.
        envelope: &'a Envelope,
        /// The group it was delivered in.
        group: &'a str,
        /// Ack, nack or reject.
        settlement: &'a Settlement,
        /// Whether this settlement sent the message to dead letters: every reject, and
        /// a nack of the last allowed delivery (judged by the `max_deliveries` this
        /// consumer subscribed with; the group's own setting, fixed by the member that
        /// created it, wins in the engine if they differ).
        dead_lettered: bool,
        /// How long the consumer held the delivery before settling it.
        held: Duration,
        /// The agent instance (id) that settled it, when an agent runtime did.
        agent: Option<&'a str>,
        /// When, by the bus clock.
        at: DateTime<Utc>,
    },
}

impl BusEvent<'_> {
    /// The message the event is about.
    pub fn envelope(&self) -> &Envelope {
        match self {
            BusEvent::Published { envelope, .. }
            | BusEvent::PublishFailed { envelope, .. }
            | BusEvent::Delivered { envelope, .. }
            | BusEvent::Settled { envelope, .. } => envelope,
        }
    }

    /// When it happened, by the bus clock.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            BusEvent::Published { at, .. }
            | BusEvent::PublishFailed { at, .. }
            | BusEvent::Delivered { at, .. }
            | BusEvent::Settled { at, .. } => *at,
        }
    }

    /// A short stable name: `published`, `publish_failed`, `delivered`, `acked`,
    /// `nacked`, `rejected`.
    pub fn name(&self) -> &'static str {
        match self {
            BusEvent::Published { .. } => "published",
            BusEvent::PublishFailed { .. } => "publish_failed",
            BusEvent::Delivered { .. } => "delivered",
            BusEvent::Settled { settlement, .. } => match settlement {
                Settlement::Ack => "acked",
                Settlement::Nack { .. } => "nacked",
                Settlement::Reject { .. } => "rejected",
            },
        }
    }
}

/// Something that wants to see every message the bus moves.
///
/// Called inline on the hot path: return quickly, never block, never panic. Hand
/// slow work to a task of your own through a bounded channel.
pub trait BusObserver: Send + Sync + fmt::Debug + 'static {
    /// Called once per event.
    fn on_event(&self, event: &BusEvent<'_>);
}

/// The observers of one bus and its clock.
#[derive(Debug, Clone)]
struct Observers {
    list: Arc<[Arc<dyn BusObserver>]>,
    clock: SharedClock,
}

impl Observers {
    fn emit(&self, event: &BusEvent<'_>) {
        for observer in self.list.iter() {
            observer.on_event(event);
        }
    }
}

/// A [`Transport`] that reports to [`BusObserver`]s what passes through it. Built by
/// the bus when observers are registered; usable on its own around any transport.
#[derive(Debug)]
pub struct ObservedTransport {
    inner: Arc<dyn Transport>,
    observers: Observers,
}

impl ObservedTransport {
    /// Wraps `inner`, timestamping events with `clock`.
    pub fn new(
        inner: Arc<dyn Transport>,
        observers: Vec<Arc<dyn BusObserver>>,
        clock: SharedClock,
    ) -> Self {
        ObservedTransport {
            inner,
            observers: Observers {
                list: observers.into(),
                clock,
            },
        }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &Arc<dyn Transport> {
        &self.inner
    }

    fn report_publish(&self, envelope: &Envelope, result: &Result<PublishReceipt>, took: Duration) {
        let at = self.observers.clock.now();
        match result {
            Ok(receipt) => self.observers.emit(&BusEvent::Published {
                envelope,
                receipt,
                at,
                took,
            }),
            Err(error) => self.observers.emit(&BusEvent::PublishFailed {
                envelope,
                error,
                at,
            }),
        }
    }
}

#[async_trait]
impl Transport for ObservedTransport {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> crate::transport::Capabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, envelope: Envelope) -> Result<PublishReceipt> {
        // The envelope is moved into the engine; keep a cheap copy for the report
        // (the payload is reference-counted `Bytes`).
        let copy = envelope.clone();
        let started = Instant::now();
        let result = self.inner.publish(envelope).await;
        self.report_publish(&copy, &result, started.elapsed());
        result
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Vec<Result<PublishReceipt>> {
        let copies = envelopes.clone();
        let started = Instant::now();
        let results = self.inner.publish_batch(envelopes).await;
        let took = started.elapsed();
        for (envelope, result) in copies.iter().zip(&results) {
            self.report_publish(envelope, result, took);
        }
        results
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Consumer>> {
        let max_deliveries = options.max_deliveries;
        let inner = self.inner.subscribe(options).await?;
        Ok(Box::new(ObservedConsumer {
            inner,
            observers: self.observers.clone(),
            max_deliveries,
            settler: None,
        }))
    }

    async fn configure_channels(
        &self,
        pattern: ChannelPattern,
        config: ChannelConfig,
    ) -> Result<()> {
        self.inner.configure_channels(pattern, config).await
    }

    async fn delete_group(&self, group: &str) -> Result<()> {
        self.inner.delete_group(group).await
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>> {
        self.inner.dead_letters(filter).await
    }

    async fn dead_letter(&self, id: MessageId) -> Result<DeadLetter> {
        self.inner.dead_letter(id).await
    }

    async fn replay_dead_letter(&self, id: MessageId) -> Result<PublishReceipt> {
        self.inner.replay_dead_letter(id).await
    }

    async fn purge_dead_letters(&self, filter: DeadLetterFilter) -> Result<u64> {
        self.inner.purge_dead_letters(filter).await
    }

    async fn stats(&self) -> Result<EngineStats> {
        self.inner.stats().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    // Everything below is forwarded as is: an observed transport must keep every
    // ability of the one it wraps (native request/reply on NATS, what `doctor` reads).
    // Native requests travel outside publish/subscribe, so they are not reported as
    // published or delivered messages.

    fn native_requests(&self) -> bool {
        self.inner.native_requests()
    }

    async fn request(&self, request: Envelope, timeout: Duration) -> Result<Envelope> {
        self.inner.request(request, timeout).await
    }

    async fn request_payload(&self, request: Envelope, timeout: Duration) -> Result<Bytes> {
        self.inner.request_payload(request, timeout).await
    }

    async fn scatter(
        &self,
        request: Envelope,
    ) -> Result<(usize, futures::stream::BoxStream<'static, Envelope>)> {
        self.inner.scatter(request).await
    }

    async fn durability(&self) -> Result<crate::transport::DurabilityReport> {
        self.inner.durability().await
    }
}

/// Wraps a consumer: reports deliveries and swaps each delivery's settler for an
/// [`ObservedSettler`] (one per engine settler, so `ack_all` still batches).
struct ObservedConsumer {
    inner: Box<dyn Consumer>,
    observers: Observers,
    max_deliveries: u32,
    /// The engine settler last seen and its wrapper.
    settler: Option<(Arc<dyn Settler>, Arc<ObservedSettler>)>,
}

impl fmt::Debug for ObservedConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedConsumer")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl ObservedConsumer {
    fn wrapper_for(&mut self, engine: &Arc<dyn Settler>) -> Arc<ObservedSettler> {
        if let Some((seen, wrapper)) = &self.settler {
            if std::ptr::addr_eq(Arc::as_ptr(seen), Arc::as_ptr(engine)) {
                return wrapper.clone();
            }
        }
        let wrapper = Arc::new(ObservedSettler {
            inner: engine.clone(),
            observers: self.observers.clone(),
            max_deliveries: self.max_deliveries,
            unsettled: Mutex::new(HashMap::new()),
        });
        self.settler = Some((engine.clone(), wrapper.clone()));
        wrapper
    }
}

#[async_trait]
impl Consumer for ObservedConsumer {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let batch = self.inner.next_batch(max).await?;
        let at = self.observers.clock.now();
        let agent = handling_agent();
        let mut out = Vec::with_capacity(batch.len());
        for delivery in batch {
            let wrapper = self.wrapper_for(delivery.engine_settler());
            self.observers.emit(&BusEvent::Delivered {
                envelope: delivery.envelope(),
                group: delivery.group(),
                agent: agent.as_deref(),
                at,
            });
            let delivery = delivery.with_settler(wrapper.clone());
            wrapper.track(&delivery);
            out.push(delivery);
        }
        Ok(out)
    }

    fn group(&self) -> &str {
        self.inner.group()
    }
}

/// What the wrapper remembers of an unsettled delivery.
struct Unsettled {
    envelope: Arc<Envelope>,
    group: Arc<str>,
    since: Instant,
}

/// Entries kept at most before forgotten deliveries (dropped unsettled, so redelivered
/// under a new token) are pruned.
const MAX_TRACKED: usize = 65_536;
/// Deliveries held longer than this are pruned once the map is over [`MAX_TRACKED`].
const PRUNE_AFTER: Duration = Duration::from_secs(600);

/// Settles through the engine's settler, then reports the settlement.
struct ObservedSettler {
    inner: Arc<dyn Settler>,
    observers: Observers,
    max_deliveries: u32,
    unsettled: Mutex<HashMap<u64, Unsettled>>,
}

impl fmt::Debug for ObservedSettler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedSettler")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl ObservedSettler {
    fn track(&self, delivery: &Delivery) {
        let mut unsettled = self.unsettled.lock();
        if unsettled.len() >= MAX_TRACKED {
            unsettled.retain(|_, u| u.since.elapsed() < PRUNE_AFTER);
        }
        unsettled.insert(
            delivery.token(),
            Unsettled {
                envelope: delivery.shared_envelope().clone(),
                group: delivery.shared_group().clone(),
                since: Instant::now(),
            },
        );
    }

    fn report(&self, entry: &Unsettled, settlement: &Settlement) {
        let dead_lettered = match settlement {
            Settlement::Ack => false,
            Settlement::Nack { .. } => entry.envelope.header.attempt >= self.max_deliveries,
            Settlement::Reject { .. } => true,
        };
        let agent = handling_agent();
        self.observers.emit(&BusEvent::Settled {
            envelope: &entry.envelope,
            group: &entry.group,
            settlement,
            dead_lettered,
            held: entry.since.elapsed(),
            agent: agent.as_deref(),
            at: self.observers.clock.now(),
        });
    }
}

#[async_trait]
impl Settler for ObservedSettler {
    async fn settle(&self, token: u64, settlement: Settlement) -> Result<()> {
        let entry = self.unsettled.lock().remove(&token);
        let report = entry.is_some().then(|| settlement.clone());
        self.inner.settle(token, settlement).await?;
        if let (Some(entry), Some(settlement)) = (entry, report) {
            self.report(&entry, &settlement);
        }
        Ok(())
    }

    async fn settle_many(&self, batch: Vec<(u64, Settlement)>) -> Vec<Result<()>> {
        let entries: Vec<(Option<Unsettled>, Settlement)> = {
            let mut unsettled = self.unsettled.lock();
            batch
                .iter()
                .map(|(token, s)| (unsettled.remove(token), s.clone()))
                .collect()
        };
        let results = self.inner.settle_many(batch).await;
        for ((entry, settlement), result) in entries.iter().zip(&results) {
            if let (Some(entry), Ok(())) = (entry, result) {
                self.report(entry, settlement);
            }
        }
        results
    }
}

/// Records the bus's traffic with the [`metrics`] facade: a no-op until the process
/// installs a recorder (e.g. `agentbus-observe`'s Prometheus endpoint).
///
/// | metric | type | labels |
/// |---|---|---|
/// | `agentbus_published_total` | counter | channel, kind |
/// | `agentbus_publish_duplicates_total` | counter | channel |
/// | `agentbus_publish_errors_total` | counter | channel, error |
/// | `agentbus_publish_seconds` | histogram | channel |
/// | `agentbus_delivered_total` | counter | channel, group |
/// | `agentbus_redelivered_total` | counter | channel, group |
/// | `agentbus_acked_total` | counter | channel, group |
/// | `agentbus_nacked_total` | counter | channel, group |
/// | `agentbus_rejected_total` | counter | channel, group |
/// | `agentbus_dead_lettered_total` | counter | channel, reason |
/// | `agentbus_publish_to_ack_seconds` | histogram | channel |
/// | `agentbus_handling_seconds` | histogram | channel, group |
///
/// Labels carry channel names: a system that puts unbounded ids in channel names
/// (one channel per session) makes as many series; aggregate with a pattern then.
#[derive(Debug, Default, Clone, Copy)]
pub struct MetricsObserver;

impl BusObserver for MetricsObserver {
    fn on_event(&self, event: &BusEvent<'_>) {
        let channel = event.envelope().channel.as_str().to_owned();
        match event {
            BusEvent::Published {
                envelope,
                receipt,
                took,
                ..
            } => {
                if receipt.duplicate {
                    metrics::counter!("agentbus_publish_duplicates_total", "channel" => channel)
                        .increment(1);
                } else {
                    metrics::counter!(
                        "agentbus_published_total",
                        "channel" => channel.clone(),
                        "kind" => envelope.header.kind.clone()
                    )
                    .increment(1);
                    metrics::histogram!("agentbus_publish_seconds", "channel" => channel)
                        .record(took.as_secs_f64());
                }
            }
            BusEvent::PublishFailed { error, .. } => {
                metrics::counter!(
                    "agentbus_publish_errors_total",
                    "channel" => channel,
                    "error" => error.kind().as_str()
                )
                .increment(1);
            }
            BusEvent::Delivered {
                envelope, group, ..
            } => {
                let group = group.to_string();
                if envelope.header.attempt > 1 {
                    metrics::counter!(
                        "agentbus_redelivered_total",
                        "channel" => channel.clone(),
                        "group" => group.clone()
                    )
                    .increment(1);
                }
                metrics::counter!("agentbus_delivered_total", "channel" => channel, "group" => group)
                    .increment(1);
            }
            BusEvent::Settled {
                envelope,
                group,
                settlement,
                dead_lettered,
                held,
                at,
                ..
            } => {
                let group = group.to_string();
                let name = match settlement {
                    Settlement::Ack => "agentbus_acked_total",
                    Settlement::Nack { .. } => "agentbus_nacked_total",
                    Settlement::Reject { .. } => "agentbus_rejected_total",
                };
                metrics::counter!(name, "channel" => channel.clone(), "group" => group.clone())
                    .increment(1);
                metrics::histogram!(
                    "agentbus_handling_seconds",
                    "channel" => channel.clone(),
                    "group" => group
                )
                .record(held.as_secs_f64());
                if matches!(settlement, Settlement::Ack) {
                    let latency = (*at - envelope.header.timestamp)
                        .to_std()
                        .unwrap_or(Duration::ZERO);
                    metrics::histogram!("agentbus_publish_to_ack_seconds", "channel" => channel.clone())
                        .record(latency.as_secs_f64());
                }
                if *dead_lettered {
                    let reason = dead_reason(settlement);
                    metrics::counter!(
                        "agentbus_dead_lettered_total",
                        "channel" => channel,
                        "reason" => reason
                    )
                    .increment(1);
                }
            }
        }
    }
}

/// The dead-letter reason a settlement that dead-letters stands for.
fn dead_reason(settlement: &Settlement) -> &'static str {
    match settlement {
        Settlement::Reject { reason, .. } => reason.as_str(),
        Settlement::Nack { .. } => "max_deliveries",
        Settlement::Ack => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::channel::ChannelName;
    use crate::envelope::DeadReason;
    use crate::memory::MemoryEngine;
    use crate::transport::ack_all;

    #[derive(Debug, Default)]
    struct Names(Mutex<Vec<String>>);

    impl BusObserver for Names {
        fn on_event(&self, event: &BusEvent<'_>) {
            let extra = match event {
                BusEvent::Settled { dead_lettered, .. } if *dead_lettered => "+dead",
                _ => "",
            };
            self.0.lock().push(format!("{}{extra}", event.name()));
        }
    }

    /// A memory engine that claims native request/reply and answers every request
    /// itself, to show the observing wrapper keeps those abilities.
    #[derive(Debug)]
    struct EchoingEngine(MemoryEngine);

    #[async_trait]
    impl Transport for EchoingEngine {
        fn name(&self) -> &str {
            "echoing"
        }
        fn capabilities(&self) -> crate::transport::Capabilities {
            self.0.capabilities()
        }
        async fn publish(&self, envelope: Envelope) -> Result<PublishReceipt> {
            self.0.publish(envelope).await
        }
        async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Consumer>> {
            self.0.subscribe(options).await
        }
        async fn configure_channels(
            &self,
            pattern: ChannelPattern,
            config: ChannelConfig,
        ) -> Result<()> {
            self.0.configure_channels(pattern, config).await
        }
        async fn delete_group(&self, group: &str) -> Result<()> {
            self.0.delete_group(group).await
        }
        async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>> {
            self.0.dead_letters(filter).await
        }
        async fn dead_letter(&self, id: MessageId) -> Result<DeadLetter> {
            self.0.dead_letter(id).await
        }
        async fn replay_dead_letter(&self, id: MessageId) -> Result<PublishReceipt> {
            self.0.replay_dead_letter(id).await
        }
        async fn purge_dead_letters(&self, filter: DeadLetterFilter) -> Result<u64> {
            self.0.purge_dead_letters(filter).await
        }
        async fn stats(&self) -> Result<EngineStats> {
            self.0.stats().await
        }
        async fn close(&self) -> Result<()> {
            self.0.close().await
        }
        fn native_requests(&self) -> bool {
            true
        }
        async fn request(&self, request: Envelope, _timeout: Duration) -> Result<Envelope> {
            Ok(request)
        }
    }

    #[tokio::test]
    async fn the_wrapper_keeps_native_requests_and_the_durability_report() {
        let inner: Arc<dyn Transport> = Arc::new(EchoingEngine(MemoryEngine::new()));
        let observed = ObservedTransport::new(
            inner.clone(),
            vec![Arc::new(Names::default())],
            Arc::new(crate::clock::SystemClock),
        );
        assert!(observed.native_requests());
        let request = Envelope::json(ChannelName::new("svc").unwrap(), "t", &1).unwrap();
        let id = request.header.id;
        let echoed = observed
            .request(request, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            echoed.header.id, id,
            "the request went to the wrapped transport"
        );
        assert_eq!(
            observed.durability().await.unwrap(),
            inner.durability().await.unwrap()
        );
    }

    #[tokio::test]
    async fn every_path_is_reported() {
        let names = Arc::new(Names::default());
        let engine = MemoryEngine::builder().max_payload_bytes(64).build();
        let bus = Bus::builder(Arc::new(engine))
            .observer(names.clone())
            .build();
        let channel = ChannelName::new("observe.test").unwrap();
        let mut sub = bus
            .subscribe(
                SubscribeOptions::new(ChannelPattern::from(channel.clone())).max_deliveries(1),
            )
            .await
            .unwrap();
        for n in 0..3 {
            bus.publish_envelope(Envelope::json(channel.clone(), "t", &n).unwrap())
                .await
                .unwrap();
        }
        // Batch ack goes through settle_many.
        let batch = sub.next_batch(2).await.unwrap();
        ack_all(&batch).await.unwrap();
        // A second settlement is an error and is not reported again.
        assert!(batch[0].ack().await.is_err());
        // Nack of the last allowed delivery dead-letters.
        sub.next()
            .await
            .unwrap()
            .nack(Duration::ZERO, None)
            .await
            .unwrap();
        // A publish the engine refuses (payload over 64 bytes).
        let big = Envelope::new(channel.clone(), "t", vec![b'x'; 100]);
        assert!(bus.publish_envelope(big).await.is_err());
        bus.publish_envelope(Envelope::json(channel.clone(), "t", &9).unwrap())
            .await
            .unwrap();
        sub.next()
            .await
            .unwrap()
            .reject(DeadReason::Rejected, "no")
            .await
            .unwrap();
        let names = names.0.lock().clone();
        assert_eq!(
            names,
            [
                "published",
                "published",
                "published",
                "delivered",
                "delivered",
                "acked",
                "acked",
                "delivered",
                "nacked+dead",
                "publish_failed",
                "published",
                "delivered",
                "rejected+dead",
            ]
        );
    }
}
