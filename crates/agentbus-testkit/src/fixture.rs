//! What every rule stands on: a fresh transport in a random namespace, failures that
//! say what was expected, and bounded waits.
//!
//! Backend crates can use these helpers for their own backend-specific tests.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    Capabilities, ChannelName, ChannelPattern, Consumer, DeadLetter, DeadLetterFilter, DeadReason,
    Delivery, Envelope, ErrorKind, Message, MessageId, PublishReceipt, SubscribeOptions, Transport,
};
use futures::FutureExt;

use crate::{Outcome, RuleResult, TransportFactory};

/// The longest any single wait for something that should happen may take. Generous on
/// purpose: a slow CI machine or a remote server must not fail a correct backend.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long "nothing arrives" is watched. Long enough for a wrong redelivery under a
/// [`SHORT_ACK_WAIT`] to show, short enough to keep the suite fast.
pub const QUIET: Duration = Duration::from_millis(400);

/// The ack wait of rules that want unsettled deliveries to come back soon.
pub const SHORT_ACK_WAIT: Duration = Duration::from_millis(250);

/// A failed check: what was expected and what happened instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(String);

impl Failure {
    /// A failure with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Failure(message.into())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

/// Fails the rule with a formatted message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return ::std::result::Result::Err($crate::Failure::new(format!($($arg)+)));
        }
    };
}

/// Fails the rule unless `left == right`, printing both and what was being checked.
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($arg:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if left != right {
                    return ::std::result::Result::Err($crate::Failure::new(format!(
                        "{}: expected {:?}, got {:?}",
                        format!($($arg)+),
                        right,
                        left
                    )));
                }
            }
        }
    };
}

/// Attaches "what was being done" to an error or a missing value, turning it into a
/// [`Failure`].
pub trait Context<T> {
    /// Fails with `what` and the underlying error.
    ///
    /// # Errors
    /// When `self` is an error or `None`.
    fn context(self, what: impl fmt::Display) -> Result<T, Failure>;
}

impl<T> Context<T> for agentbus::Result<T> {
    fn context(self, what: impl fmt::Display) -> Result<T, Failure> {
        self.map_err(|e| Failure(format!("{what}: unexpected error ({}): {e}", e.kind())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl fmt::Display) -> Result<T, Failure> {
        self.ok_or_else(|| Failure(format!("{what}: nothing there")))
    }
}

/// Expects `result` to be an error of `kind`; returns the error to inspect further.
///
/// # Errors
/// A [`Failure`] when `result` is `Ok` or an error of another kind.
pub fn expect_error<T: fmt::Debug>(
    result: agentbus::Result<T>,
    kind: ErrorKind,
    what: impl fmt::Display,
) -> Result<agentbus::Error, Failure> {
    match result {
        Ok(value) => Err(Failure(format!(
            "{what}: expected a {kind} error, got success: {value:?}"
        ))),
        Err(e) if e.kind() == kind => Ok(e),
        Err(e) => Err(Failure(format!(
            "{what}: expected a {kind} error, got a {} error: {e}",
            e.kind()
        ))),
    }
}

/// The payload every rule publishes: a number that identifies the message.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Num {
    /// The number.
    pub n: u64,
}

impl Message for Num {
    const KIND: &'static str = "testkit.num";
}

/// The number carried by a delivery published with [`Fixture::envelope`].
///
/// # Errors
/// When the payload is not a [`Num`].
pub fn number(delivery: &Delivery) -> Result<u64, Failure> {
    envelope_number(delivery.envelope())
}

/// The number carried by an envelope published with [`Fixture::envelope`].
///
/// # Errors
/// When the payload is not a [`Num`].
pub fn envelope_number(envelope: &Envelope) -> Result<u64, Failure> {
    envelope
        .decode_json::<Num>()
        .map(|num| num.n)
        .context(format!(
            "decoding the payload of message {} on '{}'",
            envelope.header.id, envelope.channel
        ))
}

/// One rule's world: a fresh transport and a random namespace for its names.
#[derive(Debug, Clone)]
pub struct Fixture {
    transport: Arc<dyn Transport>,
    namespace: String,
    engine: String,
    max_payload_bytes: usize,
}

impl Fixture {
    /// Creates the transport and picks a namespace `t<32 hex digits>`.
    ///
    /// # Errors
    /// When the factory cannot create a transport.
    pub async fn new(factory: &dyn TransportFactory) -> Result<Fixture, Failure> {
        let transport = factory.create().await.context(format!(
            "creating a '{}' transport from the factory",
            factory.name()
        ))?;
        Ok(Fixture {
            transport,
            namespace: format!("t{}", uuid::Uuid::new_v4().simple()),
            engine: factory.name().to_string(),
            max_payload_bytes: factory.max_payload_bytes(),
        })
    }

    /// The transport under test.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// The namespace: channels are `<namespace>.…`, groups `<namespace>-…`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The factory's name.
    pub fn engine(&self) -> &str {
        &self.engine
    }

    /// The payload limit the factory declared.
    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// What the transport declares.
    pub fn capabilities(&self) -> Capabilities {
        self.transport.capabilities()
    }

    /// The channel `<namespace>.<name>`.
    ///
    /// # Errors
    /// When `name` is not a valid channel name suffix.
    pub fn channel(&self, name: &str) -> Result<ChannelName, Failure> {
        let full = format!("{}.{name}", self.namespace);
        ChannelName::new(&full).context(format!("building channel name '{full}'"))
    }

    /// The pattern `<namespace>.<pattern>`.
    ///
    /// # Errors
    /// When `pattern` is not a valid pattern suffix.
    pub fn pattern(&self, pattern: &str) -> Result<ChannelPattern, Failure> {
        let full = format!("{}.{pattern}", self.namespace);
        ChannelPattern::new(&full).context(format!("building channel pattern '{full}'"))
    }

    /// `<namespace>.>`: every channel of this rule.
    ///
    /// # Errors
    /// Never for a valid namespace.
    pub fn everything(&self) -> Result<ChannelPattern, Failure> {
        self.pattern(">")
    }

    /// The group name `<namespace>-<name>`.
    pub fn group(&self, name: &str) -> String {
        format!("{}-{name}", self.namespace)
    }

    /// An envelope of kind [`Num::KIND`] carrying `n` on `channel`.
    pub fn envelope(&self, channel: &ChannelName, n: u64) -> Envelope {
        Envelope::new(
            channel.clone(),
            Num::KIND,
            format!("{{\"n\":{n}}}").into_bytes(),
        )
    }

    /// Publishes `envelope`, failing the rule on any error.
    ///
    /// # Errors
    /// Any publish error, with `what`.
    pub async fn publish(
        &self,
        envelope: Envelope,
        what: impl fmt::Display,
    ) -> Result<PublishReceipt, Failure> {
        let id = envelope.header.id;
        let channel = envelope.channel.clone();
        self.transport
            .publish(envelope)
            .await
            .context(format!("publishing message {id} on '{channel}' ({what})"))
    }

    /// Publishes `numbers` on `channel` one after the other; returns the receipts.
    ///
    /// # Errors
    /// The first publish error.
    pub async fn publish_numbers(
        &self,
        channel: &ChannelName,
        numbers: impl IntoIterator<Item = u64>,
    ) -> Result<Vec<PublishReceipt>, Failure> {
        let mut receipts = Vec::new();
        for n in numbers {
            receipts.push(
                self.publish(self.envelope(channel, n), format!("number {n}"))
                    .await?,
            );
        }
        Ok(receipts)
    }

    /// Subscribes, failing the rule on any error.
    ///
    /// # Errors
    /// Any subscribe error, with the options.
    pub async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Consumer>, Failure> {
        let shown = format!("{options:?}");
        self.transport
            .subscribe(options)
            .await
            .context(format!("subscribing with {shown}"))
    }

    /// The dead letters of this rule's channels, optionally of one reason.
    ///
    /// # Errors
    /// Any transport error.
    pub async fn dead_letters(
        &self,
        reason: Option<DeadReason>,
    ) -> Result<Vec<DeadLetter>, Failure> {
        let filter = DeadLetterFilter {
            pattern: Some(self.everything()?),
            reason,
            limit: None,
        };
        self.transport
            .dead_letters(filter)
            .await
            .context("listing dead letters")
    }

    /// Waits (bounded by [`WAIT`]) until the message `id` is in dead letters with
    /// `reason`; returns the dead letter.
    ///
    /// # Errors
    /// When it does not show up in time, or shows up with another reason.
    pub async fn wait_dead_letter(
        &self,
        id: MessageId,
        reason: DeadReason,
    ) -> Result<DeadLetter, Failure> {
        let start = Instant::now();
        loop {
            let letters = self.dead_letters(None).await?;
            if let Some(letter) = letters.iter().find(|l| l.envelope.header.id == id) {
                ensure_eq!(letter.reason, reason, "dead letter of message {id}: reason");
                return Ok(letter.clone());
            }
            ensure!(
                start.elapsed() < WAIT,
                "message {id} did not show up in dead letters with reason '{reason}' within \
                 {WAIT:?}; dead letters of this rule: {:?}",
                letters
                    .iter()
                    .map(|l| (l.envelope.header.id, l.reason.as_str()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits (bounded by [`WAIT`]) for the next batch of at most `max` deliveries.
///
/// # Errors
/// When nothing arrives in time, or the consumer fails.
pub async fn recv_batch(
    consumer: &mut dyn Consumer,
    max: usize,
    what: impl fmt::Display,
) -> Result<Vec<Delivery>, Failure> {
    match tokio::time::timeout(WAIT, consumer.next_batch(max)).await {
        Ok(batch) => {
            let batch = batch.context(format!("waiting for {what}"))?;
            ensure!(
                !batch.is_empty(),
                "waiting for {what}: next_batch returned an empty batch; it must wait for at \
                 least one delivery"
            );
            ensure!(
                batch.len() <= max,
                "waiting for {what}: next_batch({max}) returned {} deliveries",
                batch.len()
            );
            Ok(batch)
        }
        Err(_) => Err(Failure(format!(
            "waiting for {what}: nothing was delivered within {WAIT:?}"
        ))),
    }
}

/// Waits (bounded by [`WAIT`]) for exactly one delivery.
///
/// # Errors
/// When nothing arrives in time, or the consumer fails.
pub async fn recv(
    consumer: &mut dyn Consumer,
    what: impl fmt::Display,
) -> Result<Delivery, Failure> {
    let mut batch = recv_batch(consumer, 1, what).await?;
    Ok(batch.remove(0))
}

/// Receives `count` deliveries, acking each as it comes; returns their envelopes in
/// arrival order.
///
/// # Errors
/// When they do not all arrive within [`WAIT`] each, or an ack fails.
pub async fn recv_acked(
    consumer: &mut dyn Consumer,
    count: usize,
    what: impl fmt::Display,
) -> Result<Vec<Envelope>, Failure> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let batch = recv_batch(
            consumer,
            count - out.len(),
            format!("{what} ({} of {count} received so far)", out.len()),
        )
        .await?;
        for delivery in batch {
            delivery.ack().await.context(format!(
                "acking message {} ({what})",
                delivery.envelope().header.id
            ))?;
            out.push(delivery.envelope().clone());
        }
    }
    Ok(out)
}

/// Receives `count` deliveries (acking them) and returns the numbers they carry.
///
/// # Errors
/// As [`recv_acked`], or a payload that is not a [`Num`].
pub async fn recv_numbers(
    consumer: &mut dyn Consumer,
    count: usize,
    what: impl fmt::Display,
) -> Result<Vec<u64>, Failure> {
    recv_acked(consumer, count, what)
        .await?
        .iter()
        .map(envelope_number)
        .collect()
}

/// Checks that nothing is delivered to `consumer` for `period`.
///
/// # Errors
/// When something is, naming it.
pub async fn expect_quiet(
    consumer: &mut dyn Consumer,
    period: Duration,
    what: impl fmt::Display,
) -> Result<(), Failure> {
    match tokio::time::timeout(period, consumer.next_batch(16)).await {
        Err(_) => Ok(()),
        Ok(Err(e)) => Err(Failure(format!(
            "{what}: expected no delivery for {period:?}, but the consumer failed ({}): {e}",
            e.kind()
        ))),
        Ok(Ok(batch)) => Err(Failure(format!(
            "{what}: expected no delivery for {period:?}, got {}",
            describe(&batch)
        ))),
    }
}

/// Checks that nothing is delivered to any of `consumers` for `period`, watching
/// them all at once.
///
/// # Errors
/// The first consumer that got something, naming it.
pub async fn expect_quiet_all(
    consumers: Vec<(&mut (dyn Consumer + 'static), String)>,
    period: Duration,
) -> Result<(), Failure> {
    futures::future::try_join_all(
        consumers
            .into_iter()
            .map(|(consumer, what)| expect_quiet(consumer, period, what)),
    )
    .await
    .map(drop)
}

/// A short description of deliveries for failure messages.
pub fn describe(batch: &[Delivery]) -> String {
    let items: Vec<String> = batch
        .iter()
        .map(|d| {
            let n = envelope_number(d.envelope())
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into());
            format!(
                "[n={n} id={} attempt={} on '{}']",
                d.envelope().header.id,
                d.attempt(),
                d.envelope().channel
            )
        })
        .collect();
    format!("{} deliveries {}", batch.len(), items.join(" "))
}

/// Polls `condition` every few milliseconds until it holds, bounded by [`WAIT`].
///
/// # Errors
/// When it does not hold in time.
pub async fn wait_until(
    mut condition: impl FnMut() -> bool,
    what: impl fmt::Display,
) -> Result<(), Failure> {
    let start = Instant::now();
    while !condition() {
        ensure!(
            start.elapsed() < WAIT,
            "waited {WAIT:?} for {what}, it did not happen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The skip outcome for a transport that declares `capability = false`.
pub fn skip(capability: &str) -> RuleResult {
    Ok(Outcome::Skipped(format!(
        "transport declares {capability} = false"
    )))
}

/// Runs a rule body on a fresh [`Fixture`], then closes the transport and runs the
/// factory's clean-up for the namespace, whatever the body did (a panic in the body
/// becomes a failure after the clean-up).
///
/// # Errors
/// The body's failure; otherwise a failed clean-up.
pub async fn with_fixture<F, Fut>(factory: &dyn TransportFactory, body: F) -> RuleResult
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = RuleResult>,
{
    let fixture = Fixture::new(factory).await?;
    let namespace = fixture.namespace.clone();
    let transport = fixture.transport.clone();
    let result = match AssertUnwindSafe(body(fixture)).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(Failure(format!("panicked: {}", panic_text(&*panic)))),
    };
    let closed = transport.close().await;
    let cleaned = factory.cleanup(&namespace).await;
    let result = result.map_err(|f| Failure(format!("{f} [namespace {namespace}]")))?;
    closed.context("closing the transport after the rule")?;
    cleaned.context(format!("cleaning up namespace {namespace}"))?;
    Ok(result)
}

/// The message of a caught panic.
pub(crate) fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-text payload".into())
}
