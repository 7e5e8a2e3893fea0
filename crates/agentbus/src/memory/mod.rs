//! The in-memory engine: the default, zero set-up, the whole delivery contract.
//!
//! One mutex guards the [`state::State`] machine; every operation holds it briefly and
//! never across an `.await`. Consumers pull: they take what is ready under the lock, or
//! register on their group's [`Notify`] before releasing it, so no wake-up is lost. A
//! timer task sleeps on the engine's [`Clock`](crate::Clock) until the next ack-wait expiry or
//! scheduled delivery; every operation also fires due timers itself, so with a
//! [`ManualClock`](crate::ManualClock) a test sees the effect of `advance` at once.

#[doc(hidden)]
pub mod state;
pub(crate) mod take_loop;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::channel::ChannelPattern;
use crate::clock::{SharedClock, SystemClock};
use crate::envelope::{Envelope, MessageId};
use crate::error::{Error, Result};
use crate::transport::{
    Capabilities, ChannelConfig, Consumer, DeadLetter, DeadLetterFilter, Delivery, EngineStats,
    PublishLimits, PublishReceipt, Settlement, Settler, SubscribeOptions, Transport,
};

use state::{GroupId, MemberId, State, Wake};
use take_loop::take_or_wait;

/// The in-memory engine.
///
/// # Examples
///
/// ```
/// use agentbus::{ChannelName, ChannelPattern, Envelope, MemoryEngine, SubscribeOptions, Transport};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> agentbus::Result<()> {
/// let engine = MemoryEngine::new();
/// let mut consumer = engine
///     .subscribe(SubscribeOptions::new(ChannelPattern::new("jobs.>")?).group("workers"))
///     .await?;
/// let channel = ChannelName::new("jobs.resize")?;
/// engine.publish(Envelope::new(channel, "job", &b"{}"[..])).await?;
/// let delivery = consumer.next_batch(1).await?.remove(0);
/// assert_eq!(delivery.attempt(), 1);
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryEngine {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    clock: SharedClock,
    limits: PublishLimits,
    closed: AtomicBool,
    timer_changed: Arc<Notify>,
    timer_task: OnceLock<()>,
}

struct Inner {
    state: State,
    wakers: HashMap<GroupId, Arc<Notify>>,
}

impl fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryEngine")
            .field("clock", &self.shared.clock)
            .field("limits", &self.shared.limits)
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for MemoryEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEngine {
    /// An engine on the system clock with default limits.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures an engine.
    pub fn builder() -> MemoryEngineBuilder {
        MemoryEngineBuilder {
            clock: Arc::new(SystemClock),
            limits: PublishLimits::default(),
            max_dead_letters: 100_000,
        }
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

/// Settings for a [`MemoryEngine`].
#[derive(Debug)]
pub struct MemoryEngineBuilder {
    clock: SharedClock,
    limits: PublishLimits,
    max_dead_letters: usize,
}

impl MemoryEngineBuilder {
    /// Runs the engine on `clock` (e.g. a [`ManualClock`](crate::ManualClock)).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the largest accepted payload.
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_payload_bytes = bytes;
        self
    }

    /// Sets how many dead letters are kept (the oldest beyond are dropped).
    pub fn max_dead_letters(mut self, count: usize) -> Self {
        self.max_dead_letters = count;
        self
    }

    /// Builds the engine.
    pub fn build(self) -> MemoryEngine {
        let mut state = State::new();
        state.max_dead_letters = self.max_dead_letters;
        MemoryEngine {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    state,
                    wakers: HashMap::new(),
                }),
                clock: self.clock,
                limits: self.limits,
                closed: AtomicBool::new(false),
                timer_changed: Arc::new(Notify::new()),
                timer_task: OnceLock::new(),
            }),
        }
    }
}

impl Shared {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed("the memory engine"))
        } else {
            Ok(())
        }
    }

    /// Runs `f` on the state under the lock, then wakes the groups it named and the
    /// timer task if an earlier timer appeared.
    fn with_state<T>(&self, f: impl FnOnce(&mut State, DateTime<Utc>, &mut Wake) -> T) -> T {
        let now = self.clock.now();
        let mut wake = Wake::new();
        let (result, notifies, timer_moved) = {
            let mut inner = self.inner.lock();
            let result = f(&mut inner.state, now, &mut wake);
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
            (result, notifies, timer_moved)
        };
        for notify in notifies {
            notify.notify_waiters();
        }
        if timer_moved {
            self.timer_changed.notify_one();
        }
        result
    }
}

async fn timer_loop(shared: Weak<Shared>) {
    loop {
        // Hold only a weak reference while sleeping, so dropping the engine ends the
        // task (`Shared`'s drop wakes it).
        let (sleep, changed) = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            let due = {
                let mut inner = shared.inner.lock();
                let due = inner.state.next_due();
                inner.state.timer_sleeping_until = due;
                inner.state.take_timer_wake();
                due
            };
            let clock = &shared.clock;
            let sleep = match due {
                Some(due) => clock.sleep_until(due),
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
            shared.with_state(|state, now, wake| state.fire_timers(now, wake));
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.timer_changed.notify_one();
    }
}

#[async_trait]
impl Transport for MemoryEngine {
    fn name(&self) -> &str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            durable: false,
            ..Capabilities::ALL
        }
    }

    async fn publish(&self, envelope: Envelope) -> Result<PublishReceipt> {
        self.shared.check_open()?;
        self.shared
            .limits
            .check(&envelope, || self.shared.clock.now())?;
        self.shared
            .with_state(|state, now, wake| state.publish(envelope, now, wake))
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Vec<Result<PublishReceipt>> {
        if let Err(e) = self.shared.check_open() {
            let message = e.to_string();
            return envelopes
                .iter()
                .map(|_| Err(Error::new(e.kind(), message.clone())))
                .collect();
        }
        let limits = self.shared.limits;
        self.shared.with_state(|state, now, wake| {
            envelopes
                .into_iter()
                .map(|envelope| {
                    limits.check(&envelope, || now)?;
                    state.publish(envelope, now, wake)
                })
                .collect()
        })
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Consumer>> {
        self.shared.check_open()?;
        options.validate()?;
        self.ensure_timer_task();
        let (group, member, group_name) = {
            let now = self.shared.clock.now();
            let mut inner = self.shared.inner.lock();
            let joined = inner.state.join(&options, now)?;
            inner.wakers.entry(joined.0).or_default();
            joined
        };
        let settler = Arc::new(MemorySettler {
            shared: self.shared.clone(),
            group,
        });
        Ok(Box::new(MemoryConsumer {
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
        self.shared.inner.lock().state.configure(pattern, config);
        Ok(())
    }

    async fn delete_group(&self, group: &str) -> Result<()> {
        self.shared
            .with_state(|state, _, _| state.delete_group(group))
    }

    async fn dead_letters(&self, filter: DeadLetterFilter) -> Result<Vec<DeadLetter>> {
        Ok(self.shared.inner.lock().state.dead_letters(&filter))
    }

    async fn dead_letter(&self, id: MessageId) -> Result<DeadLetter> {
        self.shared.inner.lock().state.dead_letter_by_id(id)
    }

    async fn replay_dead_letter(&self, id: MessageId) -> Result<PublishReceipt> {
        self.shared.check_open()?;
        let letter = self.shared.inner.lock().state.take_dead_letter(id)?;
        let envelope = letter.replay_envelope(MessageId::new());
        match self.publish(envelope).await {
            Ok(receipt) => Ok(receipt),
            Err(e) => {
                self.shared.inner.lock().state.restore_dead_letter(letter);
                Err(e)
            }
        }
    }

    async fn purge_dead_letters(&self, filter: DeadLetterFilter) -> Result<u64> {
        Ok(self.shared.inner.lock().state.purge_dead_letters(&filter))
    }

    async fn stats(&self) -> Result<EngineStats> {
        Ok(self.shared.inner.lock().state.stats("memory"))
    }

    async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::Release);
        let wakers: Vec<Arc<Notify>> = self.shared.inner.lock().wakers.values().cloned().collect();
        for w in wakers {
            w.notify_waiters();
        }
        self.shared.timer_changed.notify_one();
        Ok(())
    }
}

#[derive(Debug)]
struct MemorySettler {
    shared: Arc<Shared>,
    group: GroupId,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

#[async_trait]
impl Settler for MemorySettler {
    async fn settle(&self, token: u64, settlement: Settlement) -> Result<()> {
        let group = self.group;
        self.shared
            .with_state(|state, now, wake| state.settle(group, token, settlement, now, wake))
    }

    async fn settle_many(&self, batch: Vec<(u64, Settlement)>) -> Vec<Result<()>> {
        let group = self.group;
        self.shared.with_state(|state, now, wake| {
            batch
                .into_iter()
                .map(|(token, settlement)| state.settle(group, token, settlement, now, wake))
                .collect()
        })
    }
}

struct MemoryConsumer {
    shared: Arc<Shared>,
    group: GroupId,
    member: MemberId,
    group_name: Arc<str>,
    settler: Arc<MemorySettler>,
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("group", &self.group_name)
            .field("member", &self.member)
            .finish()
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
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
                shared.with_state(|state, now, wake| {
                    state.fire_timers(now, wake);
                    state.take(group, member, max, now)
                })
            },
        )
        .await
    }

    fn group(&self) -> &str {
        &self.group_name
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let (group, member) = (self.group, self.member);
        let removed = self.shared.with_state(|state, _, wake| {
            state.leave(group, member, wake);
            !state.has_group(group)
        });
        if removed {
            self.shared.inner.lock().wakers.remove(&group);
        }
    }
}
