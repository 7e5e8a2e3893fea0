//! The agent registry: a live view of every agent built from announcements and
//! heartbeats on `_sys.agents.*`, health by missed heartbeats, lookup by capability
//! and the selection strategies.
//!
//! Any process can hold a registry: it reads the heartbeat channels through a private
//! subscription starting a little in the past (so agents that heartbeated recently are
//! known at once) and keeps its own view. An agent that misses `unhealthy_after`
//! heartbeats becomes unhealthy (no new work, its unfinished tasks are redistributed
//! by the supervisor); after `dead_after` it is dead and leaves the view. A clean
//! goodbye removes it at once. Transitions go to local watchers
//! ([`AgentRegistry::events`]) and, when enabled, to `_sys.agents.events`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;

use super::protocol::{
    AgentEvent, AgentGoodbye, AgentHeartbeat, AgentLoad, Health, ReportedHealth, AGENTS_ANNOUNCE,
    AGENTS_EVENTS, AGENTS_GOODBYE, AGENTS_HEARTBEAT,
};
use crate::agent::AgentDescriptor;
use crate::bus::{Bus, PublishOptions};
use crate::channel::{ChannelName, ChannelPattern};
use crate::envelope::later;
use crate::error::{ErrorKind, Result};
use crate::message::Message;
use crate::transport::{ChannelConfig, Discard, StartPosition, SubscribeOptions};

/// How a registry judges health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryOptions {
    /// Missed heartbeat intervals after which an agent is unhealthy.
    pub unhealthy_after: u32,
    /// Missed heartbeat intervals after which an agent is dead and removed.
    pub dead_after: u32,
    /// Publish health transitions on `_sys.agents.events` (the supervisor's registry
    /// does; a read-only view such as `agentbus agents` does not).
    pub publish_events: bool,
    /// How far back a new registry reads heartbeats.
    pub lookback: Duration,
}

impl Default for RegistryOptions {
    /// Unhealthy after 3 missed heartbeats, dead after 10, no events published, 60 s
    /// look-back.
    fn default() -> Self {
        RegistryOptions {
            unhealthy_after: 3,
            dead_after: 10,
            publish_events: false,
            lookback: Duration::from_secs(60),
        }
    }
}

/// One agent as the registry sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The descriptor from its latest heartbeat.
    pub descriptor: AgentDescriptor,
    /// Its latest reported load.
    pub load: AgentLoad,
    /// Its health.
    pub health: Health,
    /// Its heartbeat interval.
    pub interval_ms: u64,
    /// When its latest heartbeat was sent.
    pub last_seen: DateTime<Utc>,
    /// When this registry first saw it.
    pub first_seen: DateTime<Utc>,
    /// Heartbeats received.
    pub heartbeats: u64,
    reported: ReportedHealth,
}

impl AgentRecord {
    /// The agent id.
    pub fn id(&self) -> &str {
        &self.descriptor.id
    }

    /// Whether it declares `capability`.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.descriptor.capabilities.iter().any(|c| c == capability)
    }

    fn health_at(&self, now: DateTime<Utc>, options: &RegistryOptions) -> Health {
        let interval = Duration::from_millis(self.interval_ms.max(1));
        let silent = (now - self.last_seen).to_std().unwrap_or(Duration::ZERO);
        if silent > interval * options.dead_after.max(1) {
            Health::Dead
        } else if silent > interval * options.unhealthy_after.max(1) {
            Health::Unhealthy
        } else if self.reported == ReportedHealth::Degraded {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    /// When its health changes next if no heartbeat comes.
    fn next_change(&self, options: &RegistryOptions) -> DateTime<Utc> {
        let interval = Duration::from_millis(self.interval_ms.max(1));
        // One millisecond past the threshold: the rule is "more than N intervals".
        let step = Duration::from_millis(1);
        match self.health {
            Health::Healthy | Health::Degraded => later(
                self.last_seen,
                interval * options.unhealthy_after.max(1) + step,
            ),
            _ => later(self.last_seen, interval * options.dead_after.max(1) + step),
        }
    }
}

#[derive(Debug, Default)]
struct RegistryState {
    agents: BTreeMap<String, AgentRecord>,
    /// Goodbye time per agent id, so a late heartbeat does not resurrect it.
    gone: HashMap<String, DateTime<Utc>>,
}

struct RegistryInner {
    bus: Bus,
    options: RegistryOptions,
    state: Mutex<RegistryState>,
    events: broadcast::Sender<AgentEvent>,
    changed: Arc<Notify>,
    version: watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for RegistryInner {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().drain(..) {
            task.abort();
        }
    }
}

/// A live view of the agents on a bus. Cheap to clone; clones share the view, and the
/// background tasks stop when the last clone is dropped.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use agentbus::{AgentDescriptor, Bus};
/// use agentbus::coordination::{AgentRegistry, Presence, RegistryOptions, AgentLoad};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> agentbus::Result<()> {
/// let bus = Bus::memory();
/// let registry = AgentRegistry::start(&bus, RegistryOptions::default()).await?;
/// let presence = Presence::start(
///     &bus,
///     AgentDescriptor::new("etl-1", "etl").capability("transform"),
///     Duration::from_secs(1),
///     || AgentLoad::default(),
/// ).await?;
/// registry.wait_for(|agents| agents.len() == 1).await;
/// assert_eq!(registry.find("transform").len(), 1);
/// presence.stop().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AgentRegistry {
    inner: Arc<RegistryInner>,
}

impl fmt::Debug for AgentRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentRegistry")
            .field("agents", &self.inner.state.lock().agents.len())
            .field("options", &self.inner.options)
            .finish()
    }
}

/// Configures the `_sys.agents.*` channels: heartbeats are only useful for a short
/// while, so keep a bounded tail and drop the oldest.
pub(crate) async fn configure_agent_channels(bus: &Bus) -> Result<()> {
    bus.transport()
        .configure_channels(
            ChannelPattern::new("_sys.agents.>")?,
            ChannelConfig {
                max_age: Some(Duration::from_secs(3600)),
                max_messages: Some(100_000),
                discard: Discard::DropOldest,
                ..ChannelConfig::default()
            },
        )
        .await
}

impl AgentRegistry {
    /// Starts a registry on `bus`: subscribes to `_sys.agents.>` (reading
    /// `options.lookback` into the past) and starts the health checker.
    ///
    /// # Errors
    /// Subscription errors of the transport.
    pub async fn start(bus: &Bus, options: RegistryOptions) -> Result<AgentRegistry> {
        bus.register::<AgentHeartbeat>();
        bus.register::<AgentGoodbye>();
        bus.register::<AgentEvent>();
        configure_agent_channels(bus).await?;
        let now = bus.clock().now();
        let since = now - chrono::Duration::from_std(options.lookback).unwrap_or_default();
        let start = if bus.transport().capabilities().start_positions {
            StartPosition::Time(since)
        } else {
            StartPosition::New
        };
        let mut subscription = bus
            .subscribe(
                SubscribeOptions::new(ChannelPattern::new("_sys.agents.>")?)
                    .start(start)
                    .prefetch(1024)
                    .max_deliveries(1),
            )
            .await?;
        let (events, _) = broadcast::channel(1024);
        let (version, _) = watch::channel(0);
        let inner = Arc::new(RegistryInner {
            bus: bus.clone(),
            options,
            state: Mutex::new(RegistryState::default()),
            events,
            changed: Arc::new(Notify::new()),
            version,
            tasks: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&inner);
        let reader = tokio::spawn(async move {
            loop {
                let batch = match subscription.next_batch(256).await {
                    Ok(batch) => batch,
                    Err(e) if e.kind() == ErrorKind::Closed => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "registry: bad message on _sys.agents");
                        continue;
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                let _ = crate::transport::ack_all(&batch).await;
                for delivery in &batch {
                    inner.ingest(delivery.envelope()).await;
                }
            }
        });
        let weak = Arc::downgrade(&inner);
        let checker = tokio::spawn(async move {
            loop {
                let (next, clock, changed) = {
                    let Some(inner) = weak.upgrade() else { return };
                    let next = inner.check().await;
                    (next, inner.bus.clock().clone(), inner.changed.clone())
                };
                // Wait for the next due transition or a new heartbeat, whichever comes
                // first, holding no strong reference (so dropping the registry ends us).
                match next {
                    Some(due) => {
                        tokio::select! {
                            _ = clock.sleep_until(due) => {}
                            _ = changed.notified() => {}
                        }
                    }
                    None => changed.notified().await,
                }
            }
        });
        inner.tasks.lock().extend([reader, checker]);
        Ok(AgentRegistry { inner })
    }

    /// Every agent not yet dead, by id.
    pub fn agents(&self) -> Vec<AgentRecord> {
        self.inner.state.lock().agents.values().cloned().collect()
    }

    /// One agent.
    pub fn agent(&self, id: &str) -> Option<AgentRecord> {
        self.inner.state.lock().agents.get(id).cloned()
    }

    /// Agents that declare `capability` and can take work (healthy or degraded).
    pub fn find(&self, capability: &str) -> Vec<AgentRecord> {
        self.inner
            .state
            .lock()
            .agents
            .values()
            .filter(|a| a.health.is_available() && a.has_capability(capability))
            .cloned()
            .collect()
    }

    /// Every capability declared by an agent in the view, sorted.
    pub fn capabilities(&self) -> Vec<String> {
        let state = self.inner.state.lock();
        let set: BTreeSet<&String> = state
            .agents
            .values()
            .flat_map(|a| a.descriptor.capabilities.iter())
            .collect();
        set.into_iter().cloned().collect()
    }

    /// Health transitions as they happen (lagging receivers lose the oldest).
    pub fn events(&self) -> broadcast::Receiver<AgentEvent> {
        self.inner.events.subscribe()
    }

    /// Waits until `condition` holds for the current view (checked on every change).
    /// Wrap it in a timeout.
    pub async fn wait_for<F>(&self, condition: F)
    where
        F: Fn(&[AgentRecord]) -> bool,
    {
        let mut version = self.inner.version.subscribe();
        loop {
            if condition(&self.agents()) {
                return;
            }
            if version.changed().await.is_err() {
                return;
            }
        }
    }

    /// Re-evaluates health now (the checker does this on its own; call it after moving
    /// a manual clock to see the result without waiting for the checker task).
    pub async fn check_now(&self) {
        self.inner.check().await;
    }
}

impl RegistryInner {
    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    async fn ingest(&self, envelope: &crate::envelope::Envelope) {
        let now = self.bus.clock().now();
        let mut events = Vec::new();
        match envelope.header.kind.as_str() {
            AgentHeartbeat::KIND => {
                let Ok(hb) = envelope.decode_json::<AgentHeartbeat>() else {
                    return;
                };
                let mut state = self.state.lock();
                let id = hb.descriptor.id.clone();
                if state.gone.get(&id).is_some_and(|at| hb.at <= *at) {
                    return;
                }
                state.gone.remove(&id);
                let seen = hb.at.min(now);
                let existing = state.agents.get(&id).cloned();
                if existing.as_ref().is_some_and(|e| e.last_seen > seen) {
                    return; // an older heartbeat arriving late
                }
                let mut record = AgentRecord {
                    descriptor: hb.descriptor,
                    load: hb.load,
                    health: Health::Healthy,
                    interval_ms: hb.interval_ms.max(1),
                    last_seen: seen,
                    first_seen: existing.as_ref().map_or(now, |e| e.first_seen),
                    heartbeats: existing.as_ref().map_or(0, |e| e.heartbeats) + 1,
                    reported: hb.health,
                };
                let health = record.health_at(now, &self.options);
                if health == Health::Dead {
                    return; // a stale heartbeat read from the past
                }
                record.health = health;
                let from = existing.map(|e| e.health);
                if from != Some(health) {
                    events.push(AgentEvent {
                        agent_id: id.clone(),
                        from,
                        to: health,
                        reason: match from {
                            None => "announced".into(),
                            Some(_) => "heartbeat received".into(),
                        },
                        at: now,
                    });
                }
                state.agents.insert(id, record);
            }
            AgentGoodbye::KIND => {
                let Ok(bye) = envelope.decode_json::<AgentGoodbye>() else {
                    return;
                };
                let mut state = self.state.lock();
                state.gone.insert(bye.agent_id.clone(), bye.at);
                if let Some(record) = state.agents.remove(&bye.agent_id) {
                    events.push(AgentEvent {
                        agent_id: bye.agent_id,
                        from: Some(record.health),
                        to: Health::Dead,
                        reason: "said goodbye".into(),
                        at: now,
                    });
                }
            }
            _ => return,
        }
        self.bump();
        self.changed.notify_one();
        self.emit(events).await;
    }

    /// Applies due health transitions; returns when the next one is due.
    async fn check(&self) -> Option<DateTime<Utc>> {
        let now = self.bus.clock().now();
        let mut events = Vec::new();
        let next = {
            let mut state = self.state.lock();
            let mut dead = Vec::new();
            for record in state.agents.values_mut() {
                let health = record.health_at(now, &self.options);
                if health != record.health {
                    let silent = (now - record.last_seen).to_std().unwrap_or_default();
                    let missed = silent.as_millis() / u128::from(record.interval_ms.max(1));
                    events.push(AgentEvent {
                        agent_id: record.descriptor.id.clone(),
                        from: Some(record.health),
                        to: health,
                        reason: format!("missed {missed} heartbeats"),
                        at: now,
                    });
                    record.health = health;
                    if health == Health::Dead {
                        dead.push(record.descriptor.id.clone());
                    }
                }
            }
            for id in dead {
                state.agents.remove(&id);
            }
            state
                .agents
                .values()
                .map(|r| r.next_change(&self.options))
                .min()
        };
        if !events.is_empty() {
            self.bump();
            self.emit(events).await;
        }
        next
    }

    async fn emit(&self, events: Vec<AgentEvent>) {
        for event in events {
            tracing::debug!(agent = %event.agent_id, to = event.to.as_str(), reason = %event.reason, "agent health");
            let _ = self.events.send(event.clone());
            if self.options.publish_events {
                if let Ok(channel) = ChannelName::new(AGENTS_EVENTS) {
                    if let Err(e) = self.bus.publish(&channel, &event).await {
                        tracing::warn!(error = %e, "registry: could not publish an agent event");
                    }
                }
            }
        }
    }
}

/// How the supervisor picks one agent among those that can take a task.
///
/// Every strategy considers healthy agents first and degraded ones only when no
/// healthy agent qualifies.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "strategy")]
pub enum Strategy {
    /// The smallest load — the larger of the agent's reported load (in flight + queue
    /// depth) and the tasks this supervisor has outstanding there, which covers the
    /// assignments made since its last heartbeat; ties go to the smallest id.
    #[default]
    LeastLoaded,
    /// Each agent in turn (by id), per capability.
    RoundRobin,
    /// The highest success rate (EWMA); among agents within 0.05 of the best, the
    /// lowest latency (EWMA); then least loaded. Agents without history count as
    /// perfect, so they get tried.
    BestHistory,
    /// Agents whose labels match the most of these labels (seed 003's "proximity");
    /// then least loaded. With no label matching, any agent.
    Affinity {
        /// Wanted labels.
        labels: BTreeMap<String, String>,
    },
}

/// What the selector remembers about an agent's results.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AgentHistory {
    /// EWMA of outcomes: 1 success, 0 failure or timeout.
    pub success_rate: f64,
    /// EWMA of successful task latency, milliseconds.
    pub latency_ms: f64,
    /// Outcomes recorded.
    pub samples: u64,
}

/// The weight of the newest sample in the EWMAs.
pub const EWMA_ALPHA: f64 = 0.3;

/// Picks agents by a [`Strategy`], keeping round-robin positions and result history.
#[derive(Debug, Default)]
pub struct Selector {
    round_robin: Mutex<HashMap<String, u64>>,
    history: Mutex<HashMap<String, AgentHistory>>,
    counter: AtomicU64,
}

impl Selector {
    /// An empty selector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a task outcome of `agent`: success with its latency, or failure.
    pub fn record(&self, agent: &str, success: bool, latency: Duration) {
        let mut history = self.history.lock();
        let entry = history.entry(agent.to_string()).or_insert(AgentHistory {
            success_rate: 1.0,
            latency_ms: 0.0,
            samples: 0,
        });
        let outcome = if success { 1.0 } else { 0.0 };
        if entry.samples == 0 {
            entry.success_rate = outcome;
            if success {
                entry.latency_ms = latency.as_secs_f64() * 1000.0;
            }
        } else {
            entry.success_rate = EWMA_ALPHA * outcome + (1.0 - EWMA_ALPHA) * entry.success_rate;
            if success {
                let ms = latency.as_secs_f64() * 1000.0;
                entry.latency_ms = if entry.latency_ms == 0.0 {
                    ms
                } else {
                    EWMA_ALPHA * ms + (1.0 - EWMA_ALPHA) * entry.latency_ms
                };
            }
        }
        entry.samples += 1;
    }

    /// The history of `agent`, if any.
    pub fn history(&self, agent: &str) -> Option<AgentHistory> {
        self.history.lock().get(agent).copied()
    }

    /// Picks one of `candidates` for work keyed by `key` (the capability, for round
    /// robin). `extra_load` is load the registry may not know of yet (tasks assigned
    /// since the last heartbeat); the larger of it and the reported load counts.
    /// Returns the index into `candidates`.
    pub fn pick(
        &self,
        key: &str,
        candidates: &[AgentRecord],
        strategy: &Strategy,
        extra_load: &dyn Fn(&str) -> u32,
    ) -> Option<usize> {
        let healthy: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].health == Health::Healthy)
            .collect();
        let mut pool: Vec<usize> = if healthy.is_empty() {
            (0..candidates.len())
                .filter(|&i| candidates[i].health.is_available())
                .collect()
        } else {
            healthy
        };
        if pool.is_empty() {
            return None;
        }
        pool.sort_by(|&a, &b| candidates[a].id().cmp(candidates[b].id()));
        let load = |i: usize| {
            u64::from(candidates[i].load.total()).max(u64::from(extra_load(candidates[i].id())))
        };
        let least_loaded = |pool: &[usize]| pool.iter().copied().min_by_key(|&i| load(i));
        match strategy {
            Strategy::LeastLoaded => least_loaded(&pool),
            Strategy::RoundRobin => {
                let mut positions = self.round_robin.lock();
                let position = positions.entry(key.to_string()).or_insert(0);
                let index = pool[(*position % pool.len() as u64) as usize];
                *position += 1;
                Some(index)
            }
            Strategy::BestHistory => {
                let history = self.history.lock();
                let of = |i: usize| {
                    history
                        .get(candidates[i].id())
                        .filter(|h| h.samples > 0)
                        .map_or((1.0, 0.0), |h| (h.success_rate, h.latency_ms))
                };
                let best = pool
                    .iter()
                    .map(|&i| of(i).0)
                    .fold(f64::NEG_INFINITY, f64::max);
                let near: Vec<usize> = pool
                    .iter()
                    .copied()
                    .filter(|&i| of(i).0 >= best - 0.05)
                    .collect();
                near.into_iter().min_by(|&a, &b| {
                    of(a)
                        .1
                        .total_cmp(&of(b).1)
                        .then(load(a).cmp(&load(b)))
                        .then(candidates[a].id().cmp(candidates[b].id()))
                })
            }
            Strategy::Affinity { labels } => {
                let score = |i: usize| {
                    labels
                        .iter()
                        .filter(|(k, v)| candidates[i].descriptor.labels.get(*k) == Some(v))
                        .count()
                };
                let best = pool.iter().map(|&i| score(i)).max().unwrap_or(0);
                let matching: Vec<usize> =
                    pool.iter().copied().filter(|&i| score(i) == best).collect();
                least_loaded(&matching)
            }
        }
        .inspect(|_| {
            self.counter.fetch_add(1, Ordering::Relaxed);
        })
    }
}

/// Announces an agent and heartbeats for it until stopped: the registry side of an
/// agent. [`Worker`](super::Worker) runs one; a plain [`Agent`](crate::Agent) can run
/// one too, with a closure reporting its load.
pub struct Presence {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    bus: Bus,
    agent_id: String,
}

impl fmt::Debug for Presence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presence")
            .field("agent", &self.agent_id)
            .finish()
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Presence {
    /// Publishes the announcement now and a heartbeat every `interval` (on the bus's
    /// clock), each carrying `load()`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a zero interval; the announcement's publish
    /// error.
    pub async fn start<F>(
        bus: &Bus,
        descriptor: AgentDescriptor,
        interval: Duration,
        load: F,
    ) -> Result<Presence>
    where
        F: Fn() -> AgentLoad + Send + Sync + 'static,
    {
        Self::start_with_health(bus, descriptor, interval, load, || ReportedHealth::Healthy).await
    }

    /// Like [`Presence::start`], with the agent's own health report.
    ///
    /// # Errors
    /// As [`Presence::start`].
    pub async fn start_with_health<F, H>(
        bus: &Bus,
        descriptor: AgentDescriptor,
        interval: Duration,
        load: F,
        health: H,
    ) -> Result<Presence>
    where
        F: Fn() -> AgentLoad + Send + Sync + 'static,
        H: Fn() -> ReportedHealth + Send + Sync + 'static,
    {
        if interval.is_zero() {
            return Err(crate::error::Error::invalid_input(
                "the heartbeat interval must be longer than zero, e.g. 1s",
            ));
        }
        bus.register::<AgentHeartbeat>();
        bus.register::<AgentGoodbye>();
        configure_agent_channels(bus).await?;
        let agent_id = descriptor.id.clone();
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let beat = move |bus: &Bus, sequence: u64| AgentHeartbeat {
            descriptor: descriptor.clone(),
            load: load(),
            health: health(),
            interval_ms,
            sequence,
            at: bus.clock().now(),
        };
        let announce = ChannelName::new(AGENTS_ANNOUNCE)?;
        let heartbeat = ChannelName::new(AGENTS_HEARTBEAT)?;
        let sender = PublishOptions::new().sender(agent_id.clone());
        bus.publish_with(&announce, &beat(bus, 1), &sender).await?;
        let (stop, mut stopped) = watch::channel(false);
        let task_bus = bus.clone();
        let task = tokio::spawn(async move {
            let mut sequence = 1;
            let mut next = later(task_bus.clock().now(), interval);
            loop {
                tokio::select! {
                    _ = task_bus.clock().sleep_until(next) => {}
                    _ = stopped.changed() => return,
                }
                sequence += 1;
                if let Err(e) = task_bus
                    .publish_with(&heartbeat, &beat(&task_bus, sequence), &sender)
                    .await
                {
                    tracing::warn!(error = %e, "heartbeat not published");
                }
                next = later(next, interval);
                let now = task_bus.clock().now();
                if next <= now {
                    next = later(now, interval);
                }
            }
        });
        Ok(Presence {
            stop,
            task: Some(task),
            bus: bus.clone(),
            agent_id,
        })
    }

    /// The agent id.
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// Stops heartbeating and says goodbye, so registries drop the agent at once.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let bye = AgentGoodbye {
            agent_id: self.agent_id.clone(),
            at: self.bus.clock().now(),
        };
        if let Ok(channel) = ChannelName::new(AGENTS_GOODBYE) {
            if let Err(e) = self.bus.publish(&channel, &bye).await {
                tracing::warn!(error = %e, "goodbye not published");
            }
        }
    }

    /// Stops heartbeating silently, as a crash or a hang would: registries notice by
    /// the missed heartbeats.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, load: u32, health: Health) -> AgentRecord {
        AgentRecord {
            descriptor: AgentDescriptor::new(id, "worker").capability("work"),
            load: AgentLoad {
                in_flight: load,
                queue_depth: 0,
                capacity: 4,
            },
            health,
            interval_ms: 1000,
            last_seen: Utc::now(),
            first_seen: Utc::now(),
            heartbeats: 1,
            reported: ReportedHealth::Healthy,
        }
    }

    fn none(_: &str) -> u32 {
        0
    }

    #[test]
    fn least_loaded_picks_the_smallest_load_then_the_smallest_id() {
        let selector = Selector::new();
        let agents = [
            record("c", 2, Health::Healthy),
            record("b", 1, Health::Healthy),
            record("a", 1, Health::Healthy),
        ];
        let pick = selector.pick("work", &agents, &Strategy::LeastLoaded, &none);
        assert_eq!(agents[pick.unwrap()].id(), "a");
        // Outstanding assignments the registry has not heard of count too.
        let busy_a = |id: &str| if id == "a" { 5 } else { 0 };
        let pick = selector.pick("work", &agents, &Strategy::LeastLoaded, &busy_a);
        assert_eq!(agents[pick.unwrap()].id(), "b");
    }

    #[test]
    fn round_robin_cycles_by_id() {
        let selector = Selector::new();
        let agents = [
            record("b", 0, Health::Healthy),
            record("a", 9, Health::Healthy),
            record("c", 0, Health::Healthy),
        ];
        let picks: Vec<&str> = (0..6)
            .map(|_| {
                let i = selector
                    .pick("work", &agents, &Strategy::RoundRobin, &none)
                    .unwrap();
                agents[i].id()
            })
            .collect();
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
        // Positions are per key.
        let i = selector
            .pick("other", &agents, &Strategy::RoundRobin, &none)
            .unwrap();
        assert_eq!(agents[i].id(), "a");
    }

    #[test]
    fn best_history_prefers_success_then_latency_and_tries_newcomers() {
        let selector = Selector::new();
        let agents = [
            record("fast-flaky", 0, Health::Healthy),
            record("slow-sure", 0, Health::Healthy),
            record("quick-sure", 0, Health::Healthy),
        ];
        for _ in 0..5 {
            selector.record("fast-flaky", true, Duration::from_millis(5));
            selector.record("fast-flaky", false, Duration::ZERO);
            selector.record("slow-sure", true, Duration::from_millis(400));
        }
        // quick-sure has no history yet: it counts as perfect and gets tried.
        let i = selector
            .pick("work", &agents, &Strategy::BestHistory, &none)
            .unwrap();
        assert_eq!(agents[i].id(), "quick-sure");
        for _ in 0..3 {
            selector.record("quick-sure", true, Duration::from_millis(20));
        }
        let i = selector
            .pick("work", &agents, &Strategy::BestHistory, &none)
            .unwrap();
        assert_eq!(
            agents[i].id(),
            "quick-sure",
            "same success rate, lower latency"
        );
        for _ in 0..3 {
            selector.record("quick-sure", false, Duration::ZERO);
        }
        let i = selector
            .pick("work", &agents, &Strategy::BestHistory, &none)
            .unwrap();
        assert_eq!(
            agents[i].id(),
            "slow-sure",
            "higher success rate wins over speed"
        );
        let history = selector.history("slow-sure").unwrap();
        assert_eq!(history.samples, 5);
        assert!((history.success_rate - 1.0).abs() < 1e-9);
    }

    #[test]
    fn affinity_prefers_the_most_matching_labels_and_falls_back() {
        let selector = Selector::new();
        let mut eu = record("eu-1", 3, Health::Healthy);
        eu.descriptor = eu.descriptor.label("region", "eu").label("gpu", "yes");
        let mut eu2 = record("eu-2", 0, Health::Healthy);
        eu2.descriptor = eu2.descriptor.label("region", "eu");
        let us = record("us-1", 0, Health::Healthy);
        let agents = [eu, eu2, us];
        let wanted = |pairs: &[(&str, &str)]| Strategy::Affinity {
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let pick = |s: Strategy| agents[selector.pick("work", &agents, &s, &none).unwrap()].id();
        assert_eq!(pick(wanted(&[("region", "eu"), ("gpu", "yes")])), "eu-1");
        assert_eq!(
            pick(wanted(&[("region", "eu")])),
            "eu-2",
            "least loaded among matches"
        );
        assert_eq!(
            pick(wanted(&[("region", "ap")])),
            "eu-2",
            "no match: any, least loaded"
        );
    }

    #[test]
    fn healthy_agents_come_before_degraded_and_unhealthy_never() {
        let selector = Selector::new();
        let agents = [
            record("a", 0, Health::Degraded),
            record("b", 7, Health::Healthy),
            record("c", 0, Health::Unhealthy),
        ];
        let i = selector
            .pick("work", &agents, &Strategy::LeastLoaded, &none)
            .unwrap();
        assert_eq!(agents[i].id(), "b");
        let only_bad = [
            record("a", 0, Health::Degraded),
            record("c", 0, Health::Unhealthy),
        ];
        let i = selector
            .pick("work", &only_bad, &Strategy::LeastLoaded, &none)
            .unwrap();
        assert_eq!(only_bad[i].id(), "a");
        assert!(selector
            .pick(
                "work",
                &[record("c", 0, Health::Unhealthy)],
                &Strategy::RoundRobin,
                &none
            )
            .is_none());
    }
}
