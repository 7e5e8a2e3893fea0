//! The agent runtime: a descriptor, typed handlers and a [`Context`] to talk back.
//!
//! An agent declares what it is (id, name, capabilities, version, labels) and which
//! message kinds it receives and sends. Each handler takes one message type on one
//! channel pattern; handlers on the same pattern share one subscription and are picked
//! by the message's kind. Agents with the same name share a group, so running several
//! instances of an agent balances the load between them.
//!
//! Failure handling: a handler that returns an error, panics or overruns its timeout
//! has its message nacked with exponential backoff and jitter (dead-lettered once the
//! group's `max_deliveries` is used up); the agent keeps running. Shutdown stops
//! pulling, waits for in-flight handlers up to a timeout and returns what it abandoned.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::bus::{Bus, GatherResult, GatherSpec, PublishOptions};
use crate::channel::{ChannelName, ChannelPattern};
use crate::envelope::{DeadReason, Envelope};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::transport::{
    Delivery, PublishReceipt, StartPosition, SubscribeOptions, DEFAULT_ACK_WAIT,
    DEFAULT_MAX_DELIVERIES,
};

/// What an agent is and what it may say.
///
/// # Examples
///
/// ```
/// use agentbus::{AgentDescriptor, Message};
/// # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # struct Request { id: u32 }
/// # impl Message for Request { const KIND: &'static str = "scheduling.request"; }
/// # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// # struct Result_ { ok: bool }
/// # impl Message for Result_ { const KIND: &'static str = "scheduling.result"; }
///
/// let descriptor = AgentDescriptor::new("scheduler-1", "scheduler")
///     .capability("scheduling")
///     .label("region", "eu")
///     .sends::<Result_>();
/// assert!(descriptor.declares_send("scheduling.result"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentDescriptor {
    /// Unique id of this instance.
    pub id: String,
    /// The agent's name; instances with the same name share work.
    pub name: String,
    /// Version of the agent's code.
    pub version: String,
    /// What it can do, for lookup by capability.
    pub capabilities: Vec<String>,
    /// Kinds it handles (filled from its handlers).
    pub receives: Vec<String>,
    /// Kinds it may send; sending anything else is `UndeclaredMessage`.
    pub sends: Vec<String>,
    /// Free labels (region, model, affinity).
    pub labels: BTreeMap<String, String>,
}

impl AgentDescriptor {
    /// A descriptor with `id` and `name`, version `0.0.0`, nothing declared.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        AgentDescriptor {
            id: id.into(),
            name: name.into(),
            version: "0.0.0".into(),
            capabilities: Vec::new(),
            receives: Vec::new(),
            sends: Vec::new(),
            labels: BTreeMap::new(),
        }
    }

    /// Adds a capability.
    pub fn capability(mut self, capability: impl Into<String>) -> Self {
        self.capabilities.push(capability.into());
        self
    }

    /// Sets the version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Declares that the agent sends `M`.
    pub fn sends<M: Message>(self) -> Self {
        self.sends_kind(M::KIND)
    }

    /// Declares that the agent sends `kind`.
    pub fn sends_kind(mut self, kind: impl Into<String>) -> Self {
        let kind = kind.into();
        if !self.sends.contains(&kind) {
            self.sends.push(kind);
        }
        self
    }

    /// Whether `kind` is declared as sent.
    pub fn declares_send(&self, kind: &str) -> bool {
        self.sends.iter().any(|k| k == kind)
    }

    /// The default group of this agent's subscription to `pattern`: shared by every
    /// instance of the agent (same name), distinct per pattern, since a group follows
    /// exactly one pattern.
    fn group_for(&self, pattern: &ChannelPattern) -> String {
        fn clean(text: &str) -> String {
            text.chars()
                .map(|c| match c {
                    '*' => 'S',
                    '>' => 'G',
                    c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => c,
                    _ => '_',
                })
                .collect()
        }
        let full = format!("agent-{}--{}", clean(&self.name), clean(pattern.as_str()));
        if full.len() <= 128 {
            return full;
        }
        // Too long for a group name: keep a readable prefix and a stable hash.
        let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        format!("{}-{hash:016x}", &full[..110])
    }
}

/// The error type handlers return: any error, boxed.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a handler returns.
pub type HandlerResult = std::result::Result<(), HandlerError>;

/// A handler error that sends the message straight to dead letters (reason
/// `rejected`) instead of retrying it: for messages that can never succeed, or that
/// must wait for a person.
///
/// # Examples
///
/// ```
/// use agentbus::{HandlerResult, Reject};
///
/// fn check(amount: i64) -> HandlerResult {
///     if amount < 0 {
///         return Err(Reject::new(format!("negative amount {amount}")).into());
///     }
///     Ok(())
/// }
/// assert!(check(-1).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    reason: String,
}

impl Reject {
    /// A rejection with a reason kept as the dead letter's `last_error`.
    pub fn new(reason: impl Into<String>) -> Self {
        Reject {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Reject {}

/// Retry delays after handler failures: exponential with jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Growth per further failure.
    pub multiplier: f64,
    /// The longest delay.
    pub max: Duration,
    /// Fraction (0–1) of the delay that is randomized, so retries of many messages do
    /// not arrive in lockstep.
    pub jitter: f64,
}

impl Default for Backoff {
    /// 100 ms doubling up to 30 s, 20 % jitter.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_secs(30),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before redelivery after failed delivery number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        let capped = base.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter * fastrand::f64();
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

/// Per-handler settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerOptions {
    /// How many messages this handler works on at once.
    pub concurrency: usize,
    /// How many unsettled deliveries the subscription may hold.
    pub prefetch: usize,
    /// The group; by default `agent-<name>--<pattern>`, shared by all instances of the
    /// agent.
    pub group: Option<String>,
    /// Where a new group starts.
    pub start: StartPosition,
    /// Redelivery after this long without a settlement.
    pub ack_wait: Duration,
    /// Deliveries before dead-lettering.
    pub max_deliveries: u32,
    /// A handler running longer is cancelled and its message nacked.
    pub timeout: Option<Duration>,
    /// Delays between retries.
    pub backoff: Backoff,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        HandlerOptions {
            concurrency: 1,
            prefetch: 16,
            group: None,
            start: StartPosition::New,
            ack_wait: DEFAULT_ACK_WAIT,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            timeout: None,
            backoff: Backoff::default(),
        }
    }
}

impl HandlerOptions {
    /// Sets the concurrency limit.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }
    /// Sets the prefetch.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }
    /// Sets the group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
    /// Sets the handler timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Sets the max deliveries.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n;
        self
    }
    /// Sets the ack wait.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }
    /// Sets the backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
}

/// What a handler gets besides its message: who it is, the message's envelope, and
/// ways to send, request, gather and reply as this agent.
#[derive(Clone)]
pub struct Context {
    bus: Bus,
    descriptor: Arc<AgentDescriptor>,
    envelope: Option<Arc<Envelope>>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("agent", &self.descriptor.id)
            .field("message", &self.envelope.as_ref().map(|e| e.header.id))
            .finish()
    }
}

impl Context {
    /// A context for `descriptor` outside any handler (e.g. to start a workflow).
    pub fn new(bus: Bus, descriptor: AgentDescriptor) -> Self {
        Context {
            bus,
            descriptor: Arc::new(descriptor),
            envelope: None,
        }
    }

    /// This agent's descriptor.
    pub fn agent(&self) -> &AgentDescriptor {
        &self.descriptor
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The envelope of the message being handled, if any.
    pub fn envelope(&self) -> Option<&Envelope> {
        self.envelope.as_deref()
    }

    fn check_declared(&self, kind: &str) -> Result<()> {
        if self.descriptor.declares_send(kind) {
            return Ok(());
        }
        let declared = if self.descriptor.sends.is_empty() {
            "it declares none".to_string()
        } else {
            format!("it declares: {}", self.descriptor.sends.join(", "))
        };
        Err(Error::new(
            ErrorKind::UndeclaredMessage,
            format!(
                "agent '{}' tried to send kind '{kind}', which it did not declare ({declared}); \
                 add `.sends::<T>()` to its descriptor",
                self.descriptor.id
            ),
        )
        .with_context("agent", &self.descriptor.id)
        .with_context("kind", kind))
    }

    /// Options carrying this agent as sender and the current message's thread.
    fn options(&self, mut options: PublishOptions) -> PublishOptions {
        options.sender = Some(self.descriptor.id.clone());
        if let Some(current) = &self.envelope {
            if options.correlation_id.is_none() {
                options.correlation_id = current
                    .header
                    .correlation_id
                    .clone()
                    .or_else(|| Some(current.header.id.to_string()));
            }
            if options.causation_id.is_none() {
                options.causation_id = Some(current.header.id);
            }
            if options.tenant.is_none() {
                options.tenant = current.header.tenant.clone();
            }
            if options.trace.is_none() {
                options.trace = current.header.trace.clone();
            }
        }
        options
    }

    /// Sends `message` on `channel` as this agent, in the current message's thread.
    ///
    /// # Errors
    /// [`ErrorKind::UndeclaredMessage`] if `M` is not declared in `sends`; publish
    /// errors.
    pub async fn send<M: Message>(
        &self,
        channel: &ChannelName,
        message: &M,
    ) -> Result<PublishReceipt> {
        self.send_with(channel, message, PublishOptions::default())
            .await
    }

    /// Like [`Context::send`] with options (priority, ttl, delay…).
    ///
    /// # Errors
    /// As [`Context::send`].
    pub async fn send_with<M: Message>(
        &self,
        channel: &ChannelName,
        message: &M,
        options: PublishOptions,
    ) -> Result<PublishReceipt> {
        self.check_declared(M::KIND)?;
        self.bus
            .publish_with(channel, message, &self.options(options))
            .await
    }

    /// Sends a request as this agent and waits for the typed reply.
    ///
    /// # Errors
    /// `UndeclaredMessage`, `NoResponders`, `Timeout`, `Schema`, publish errors.
    pub async fn request<Q: Message, R: Message>(
        &self,
        channel: &ChannelName,
        request: &Q,
        timeout: Duration,
    ) -> Result<R> {
        self.request_with(channel, request, PublishOptions::default(), timeout)
            .await
    }

    /// Like [`Context::request`] with options.
    ///
    /// # Errors
    /// As [`Context::request`].
    pub async fn request_with<Q: Message, R: Message>(
        &self,
        channel: &ChannelName,
        request: &Q,
        options: PublishOptions,
        timeout: Duration,
    ) -> Result<R> {
        self.check_declared(Q::KIND)?;
        let envelope = self
            .bus
            .envelope(channel, request, &self.options(options))?;
        self.bus
            .request_envelope(envelope, timeout)
            .await?
            .decode_json()
    }

    /// Scatter-gather as this agent.
    ///
    /// # Errors
    /// `UndeclaredMessage`, publish errors.
    pub async fn gather<Q: Message, R: Message>(
        &self,
        channel: &ChannelName,
        request: &Q,
        spec: &GatherSpec,
    ) -> Result<GatherResult<R>> {
        self.check_declared(Q::KIND)?;
        let envelope =
            self.bus
                .envelope(channel, request, &self.options(PublishOptions::default()))?;
        let raw = self.bus.gather_envelope(envelope, spec).await?;
        let mut replies = Vec::new();
        let mut responders = Vec::new();
        for (reply, who) in raw.replies.into_iter().zip(raw.responders) {
            if let Ok(value) = reply.decode_json::<R>() {
                replies.push(value);
                responders.push(who);
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

    /// Replies to the message being handled.
    ///
    /// # Errors
    /// `UndeclaredMessage`; `InvalidInput` outside a handler or when the message has
    /// no `reply_to`; publish errors.
    pub async fn reply<M: Message>(&self, reply: &M) -> Result<PublishReceipt> {
        self.check_declared(M::KIND)?;
        let request = self.envelope.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "reply called outside a handler: there is no message to reply to",
            )
        })?;
        let envelope = self
            .bus
            .reply_envelope(request, reply, Some(&self.descriptor.id))?;
        self.bus.publish_envelope(envelope).await
    }
}

type ErasedHandler =
    Arc<dyn Fn(Context, &Envelope) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

struct Route {
    kind: &'static str,
    /// Registers the handler's message type in the bus's kind registry.
    register: fn(&crate::message::KindRegistry),
    handler: ErasedHandler,
    options: HandlerOptions,
    permits: Arc<Semaphore>,
}

/// Builds an agent: a descriptor plus handlers. See [`Agent::builder`].
pub struct AgentBuilder {
    descriptor: AgentDescriptor,
    routes: Vec<(ChannelPattern, Route)>,
    errors: Vec<Error>,
}

impl fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("descriptor", &self.descriptor)
            .field("handlers", &self.routes.len())
            .finish()
    }
}

impl AgentBuilder {
    /// Handles messages of type `M` on `pattern` with default options.
    pub fn handle<M, F, Fut>(self, pattern: &str, handler: F) -> Self
    where
        M: Message,
        F: Fn(Context, M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.handle_with(pattern, HandlerOptions::default(), handler)
    }

    /// Handles messages of type `M` on `pattern` with `options`.
    pub fn handle_with<M, F, Fut>(
        mut self,
        pattern: &str,
        options: HandlerOptions,
        handler: F,
    ) -> Self
    where
        M: Message,
        F: Fn(Context, M) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let pattern = match ChannelPattern::new(pattern) {
            Ok(p) => p,
            Err(e) => {
                self.errors.push(e);
                return self;
            }
        };
        let handler = Arc::new(handler);
        let erased: ErasedHandler = Arc::new(move |ctx: Context, envelope: &Envelope| {
            let decoded = envelope.decode_json::<M>();
            let handler = handler.clone();
            Box::pin(async move {
                let message = decoded?;
                handler(ctx, message).await
            })
        });
        if !self.descriptor.receives.iter().any(|k| k == M::KIND) {
            self.descriptor.receives.push(M::KIND.to_string());
        }
        self.routes.push((
            pattern,
            Route {
                kind: M::KIND,
                register: |registry| registry.register::<M>(),
                handler: erased,
                permits: Arc::new(Semaphore::new(options.concurrency.max(1))),
                options,
            },
        ));
        self
    }

    /// Subscribes every handler and starts the agent.
    ///
    /// # Errors
    /// The first invalid pattern given to a handler; subscription errors.
    pub async fn spawn(mut self, bus: &Bus) -> Result<Agent> {
        if let Some(error) = self.errors.drain(..).next() {
            return Err(error);
        }
        let descriptor = Arc::new(self.descriptor);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut by_pattern: Vec<(ChannelPattern, Vec<Route>)> = Vec::new();
        for (pattern, route) in self.routes {
            (route.register)(bus.registry());
            match by_pattern.iter_mut().find(|(p, _)| *p == pattern) {
                Some((_, routes)) => routes.push(route),
                None => by_pattern.push((pattern, vec![route])),
            }
        }
        let mut loops = JoinSet::new();
        let in_flight = Arc::new(AtomicUsize::new(0));
        for (pattern, routes) in by_pattern {
            let first = &routes[0].options;
            let options = SubscribeOptions::new(pattern.clone())
                .group(
                    first
                        .group
                        .clone()
                        .unwrap_or_else(|| descriptor.group_for(&pattern)),
                )
                .start(first.start)
                .ack_wait(first.ack_wait)
                .max_deliveries(first.max_deliveries)
                .prefetch(
                    routes
                        .iter()
                        .map(|r| r.options.prefetch)
                        .max()
                        .unwrap_or(16),
                );
            let subscription = bus.subscribe(options).await?;
            let routes: HashMap<&'static str, Arc<Route>> =
                routes.into_iter().map(|r| (r.kind, Arc::new(r))).collect();
            // Observers learn which agent instance took a delivery from this scope.
            loops.spawn(crate::observe::HANDLING_AGENT.scope(
                Arc::from(descriptor.id.as_str()),
                receive_loop(
                    bus.clone(),
                    descriptor.clone(),
                    pattern,
                    subscription,
                    routes,
                    stop_rx.clone(),
                    in_flight.clone(),
                ),
            ));
        }
        metrics::gauge!("agentbus_agent_up", "agent" => descriptor.id.clone()).set(1.0);
        Ok(Agent {
            descriptor,
            stop: stop_tx,
            loops,
            in_flight,
        })
    }
}

/// A running agent. Dropping it aborts its handlers; call [`Agent::shutdown`] to drain.
pub struct Agent {
    descriptor: Arc<AgentDescriptor>,
    stop: watch::Sender<bool>,
    loops: JoinSet<()>,
    in_flight: Arc<AtomicUsize>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.descriptor.id)
            .finish()
    }
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownReport {
    /// Handlers that finished during the drain.
    pub drained: usize,
    /// Handlers still running at the timeout, cancelled; their messages are
    /// redelivered.
    pub abandoned: usize,
}

impl Agent {
    /// Starts building an agent described by `descriptor`.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use agentbus::{Agent, AgentDescriptor, Bus, ChannelName, Message, HandlerResult};
    ///
    /// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    /// struct Question { text: String }
    /// impl Message for Question { const KIND: &'static str = "question"; }
    /// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    /// struct Answer { text: String }
    /// impl Message for Answer { const KIND: &'static str = "answer"; }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> agentbus::Result<()> {
    /// let bus = Bus::memory();
    /// let oracle = Agent::builder(AgentDescriptor::new("oracle-1", "oracle").sends::<Answer>())
    ///     .handle("questions", |ctx, q: Question| async move {
    ///         ctx.reply(&Answer { text: format!("you asked: {}", q.text) }).await?;
    ///         Ok(())
    ///     })
    ///     .spawn(&bus)
    ///     .await?;
    /// let answer: Answer = bus
    ///     .request(&ChannelName::new("questions")?, &Question { text: "why".into() }, Duration::from_secs(2))
    ///     .await?;
    /// assert_eq!(answer.text, "you asked: why");
    /// oracle.shutdown(Duration::from_secs(1)).await;
    /// # Ok(()) }
    /// ```
    pub fn builder(descriptor: AgentDescriptor) -> AgentBuilder {
        AgentBuilder {
            descriptor,
            routes: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The descriptor (with `receives` filled from the handlers).
    pub fn descriptor(&self) -> &AgentDescriptor {
        &self.descriptor
    }

    /// Stops taking messages, lets in-flight handlers finish for up to `timeout`, then
    /// cancels the rest (their messages are redelivered to the group).
    pub async fn shutdown(mut self, timeout: Duration) -> ShutdownReport {
        let _ = self.stop.send(true);
        metrics::gauge!("agentbus_agent_up", "agent" => self.descriptor.id.clone()).set(0.0);
        let at_stop = self.in_flight.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.loops.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    self.loops.abort_all();
                    while self.loops.join_next().await.is_some() {}
                    break;
                }
            }
        }
        // Handlers cancelled by the abort never decremented the counter.
        let abandoned = self.in_flight.load(Ordering::Acquire);
        ShutdownReport {
            drained: at_stop.saturating_sub(abandoned),
            abandoned,
        }
    }
}

async fn receive_loop(
    bus: Bus,
    descriptor: Arc<AgentDescriptor>,
    pattern: ChannelPattern,
    mut subscription: crate::bus::Subscription,
    routes: HashMap<&'static str, Arc<Route>>,
    mut stop: watch::Receiver<bool>,
    in_flight: Arc<AtomicUsize>,
) {
    let mut running: JoinSet<()> = JoinSet::new();
    loop {
        // Reap finished handlers so the set does not grow.
        while running.try_join_next().is_some() {}
        let delivery = tokio::select! {
            _ = stop.changed() => break,
            next = subscription.next() => next,
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(e) if e.kind() == ErrorKind::Closed => break,
            // Schema errors: the message is already dead-lettered by the subscription.
            Err(e) => {
                tracing::warn!(agent = %descriptor.id, error = %e, "message dead-lettered");
                continue;
            }
        };
        let kind = delivery.envelope().header.kind.clone();
        let Some(route) = routes.get(kind.as_str()).cloned() else {
            let mut known: Vec<&str> = routes.keys().copied().collect();
            known.sort_unstable();
            let error = format!(
                "agent '{}' has no handler for kind '{kind}' on '{pattern}' (it handles: {})",
                descriptor.id,
                known.join(", ")
            );
            tracing::warn!(%error, "message dead-lettered");
            let _ = delivery.reject(DeadReason::Schema, error).await;
            continue;
        };
        let permit = tokio::select! {
            _ = stop.changed() => {
                // Not started: hand it back for someone else at once.
                let _ = delivery.nack(Duration::ZERO, None).await;
                break;
            }
            permit = route.permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let ctx = Context {
            bus: bus.clone(),
            descriptor: descriptor.clone(),
            envelope: Some(Arc::new(delivery.envelope().clone())),
        };
        in_flight.fetch_add(1, Ordering::AcqRel);
        let counter = in_flight.clone();
        let agent: Arc<str> = Arc::from(descriptor.id.as_str());
        running.spawn(crate::observe::HANDLING_AGENT.scope(agent, async move {
            run_handler(&route, ctx, delivery).await;
            counter.fetch_sub(1, Ordering::AcqRel);
            drop(permit);
        }));
    }
    // Drain: in-flight handlers finish; the caller's timeout aborts this task, and
    // with it the JoinSet, cancelling whatever is left.
    while running.join_next().await.is_some() {}
    drop(subscription);
}

async fn run_handler(route: &Route, ctx: Context, delivery: Delivery) {
    let envelope = delivery.envelope();
    let agent = ctx.agent().id.clone();
    // The handling continues the message's trace: its span carries the traceparent,
    // whose span id is the publish span of the message (see `trace_context`).
    let span = tracing::info_span!(
        "agentbus.handle",
        agent = %agent,
        channel = %envelope.channel,
        kind = %envelope.header.kind,
        correlation_id = envelope.header.correlation_id.as_deref(),
        message_id = %envelope.header.id,
        attempt = envelope.header.attempt,
        traceparent = envelope.header.trace.as_deref(),
    );
    let work = tracing::Instrument::instrument(
        AssertUnwindSafe((route.handler)(ctx, envelope)).catch_unwind(),
        span,
    );
    let outcome = match route.options.timeout {
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Ok(Err(format!("handler timed out after {limit:?}").into())),
        },
        None => work.await,
    };
    let failure = match outcome {
        Ok(Ok(())) => {
            if let Err(e) = delivery.ack().await {
                tracing::warn!(error = %e, "ack failed");
            }
            return;
        }
        Ok(Err(error)) => {
            if let Some(reject) = error.downcast_ref::<Reject>() {
                let _ = delivery
                    .reject(DeadReason::Rejected, reject.reason.clone())
                    .await;
                return;
            }
            if let Some(e) = error.downcast_ref::<Error>() {
                if e.kind() == ErrorKind::Schema {
                    let _ = delivery.reject(DeadReason::Schema, e.to_string()).await;
                    return;
                }
            }
            error.to_string()
        }
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            format!("handler panicked: {text}")
        }
    };
    metrics::counter!("agentbus_handler_failures_total", "agent" => agent).increment(1);
    let delay = route.options.backoff.delay(delivery.attempt());
    tracing::debug!(attempt = delivery.attempt(), ?delay, error = %failure, "handler failed; nacking");
    if let Err(e) = delivery.nack(delay, Some(failure)).await {
        tracing::warn!(error = %e, "nack failed");
    }
}
