//! The agentbus conformance suite: one test per rule of the delivery contract
//! (DESIGN §4), written once, run against every engine and backend.
//!
//! A backend crate runs the whole suite from its own tests with one macro call and a
//! [`TransportFactory`] that creates a fresh transport:
//!
//! ```no_run
//! // crates/agentbus-redis/tests/conformance.rs (a sketch)
//! use std::sync::Arc;
//!
//! use agentbus::{MemoryEngine, Transport};
//! use agentbus_testkit::TransportFactory;
//! use futures::future::BoxFuture;
//!
//! struct Factory;
//!
//! impl TransportFactory for Factory {
//!     fn name(&self) -> &str {
//!         "memory"
//!     }
//!     fn create(&self) -> BoxFuture<'static, agentbus::Result<Arc<dyn Transport>>> {
//!         Box::pin(async { Ok(Arc::new(MemoryEngine::new()) as Arc<dyn Transport>) })
//!     }
//! }
//!
//! agentbus_testkit::conformance_tests!(Factory);
//! # fn main() {}
//! ```
//!
//! The macro expands into one `#[tokio::test]` per rule (so the calling crate needs
//! `tokio` with the `macros` and `rt-multi-thread` features as a dev-dependency);
//! nextest lists and runs them individually. [`run_all`] runs every rule in one call
//! and prints a [`Summary`] — what `agentbus conformance` uses.
//!
//! # How the rules are written
//!
//! Modelled on opendal's behavior suite:
//!
//! - **Isolation.** Every rule gets a fresh transport from the factory and a random
//!   namespace: channels are `<namespace>.…`, named groups `<namespace>-…`, so runs
//!   against a shared Redis or NATS server never collide. After the rule, the transport
//!   is closed and [`TransportFactory::cleanup`] is called with the namespace, whether
//!   the rule passed or not.
//! - **Capabilities.** A rule that needs something the transport declares `false` in
//!   [`Capabilities`](agentbus::Capabilities) returns [`Outcome::Skipped`] with the
//!   reason; it never disappears from the list.
//! - **Real time.** The same rules must hold on servers, so they run on real time with
//!   short ack waits and delays, generous upper bounds on every wait
//!   ([`fixture::WAIT`]), no exact-time assertions, and bounded quiet periods
//!   ([`fixture::QUIET`]) only where "nothing arrives" is the point. Deterministic
//!   time-travel tests belong to the memory engine's own tests (on `ManualClock`).
//! - **Cancel safety.** Waits are `tokio::time::timeout` around
//!   [`Consumer::next_batch`](agentbus::Consumer::next_batch), so a transport's
//!   `next_batch` must be cancel-safe: dropped before it returns, it must not lose a
//!   delivery (the agent runtime relies on the same in its `select!` loops).

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::Transport;
use futures::future::BoxFuture;
use futures::FutureExt;

pub mod fixture;
pub mod rules;

pub use fixture::{Failure, Fixture};

/// Creates the transports the suite runs against.
///
/// `create` is called once per rule; each call should return a fresh, independent
/// transport (a new memory engine, a new connection to the server…).
pub trait TransportFactory: Send + Sync + 'static {
    /// The engine or backend name printed in reports (`memory`, `redis`…).
    fn name(&self) -> &str;

    /// A fresh transport.
    ///
    /// # Errors
    /// Whatever prevents creating it; a configured backend that cannot be reached
    /// fails the rule (it is never skipped).
    fn create(&self) -> BoxFuture<'static, agentbus::Result<Arc<dyn Transport>>>;

    /// Removes what a rule left on a shared server: every channel named
    /// `<namespace>.…` and every group named `<namespace>-…`. Called after each rule,
    /// passed or failed, once its transport is closed. The default does nothing.
    ///
    /// # Errors
    /// A failed clean-up fails an otherwise passing rule.
    fn cleanup<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, agentbus::Result<()>> {
        let _ = namespace;
        Box::pin(async { Ok(()) })
    }

    /// The largest payload the created transports accept; the suite publishes one
    /// byte more and expects `InvalidInput`. Defaults to
    /// [`agentbus::transport::DEFAULT_MAX_PAYLOAD_BYTES`].
    fn max_payload_bytes(&self) -> usize {
        agentbus::transport::DEFAULT_MAX_PAYLOAD_BYTES
    }
}

impl<T: TransportFactory + ?Sized> TransportFactory for Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn create(&self) -> BoxFuture<'static, agentbus::Result<Arc<dyn Transport>>> {
        (**self).create()
    }
    fn cleanup<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, agentbus::Result<()>> {
        (**self).cleanup(namespace)
    }
    fn max_payload_bytes(&self) -> usize {
        (**self).max_payload_bytes()
    }
}

/// Creates a fresh [`agentbus::MemoryEngine`] on the system clock per rule.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFactory;

impl TransportFactory for MemoryFactory {
    fn name(&self) -> &str {
        "memory"
    }

    fn create(&self) -> BoxFuture<'static, agentbus::Result<Arc<dyn Transport>>> {
        Box::pin(async { Ok(Arc::new(agentbus::MemoryEngine::new()) as Arc<dyn Transport>) })
    }
}

/// How a rule ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every check held.
    Passed,
    /// The transport declares a capability the rule needs as unsupported; the reason
    /// says which.
    Skipped(String),
}

/// What a rule returns: an [`Outcome`], or the [`Failure`] saying what was expected
/// and what happened.
pub type RuleResult = Result<Outcome, Failure>;

/// A rule's entry point.
pub type RuleFn = for<'a> fn(&'a dyn TransportFactory) -> BoxFuture<'a, RuleResult>;

/// One rule of the delivery contract.
#[derive(Clone, Copy)]
pub struct Rule {
    /// The rule's function name in [`rules`], e.g. `rule_ack_wait_redelivers`.
    pub name: &'static str,
    /// What it checks, in a sentence.
    pub title: &'static str,
    /// Runs it.
    pub run: RuleFn,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("title", &self.title)
            .finish_non_exhaustive()
    }
}

/// The list of rules, kept once: `all_rules` and `conformance_tests!` both expand it.
/// Each entry is `function: "title"`; the function lives in [`rules`].
#[doc(hidden)]
#[macro_export]
macro_rules! __agentbus_testkit_rules {
    ($callback:ident ! ($($args:tt)*)) => {
        $crate::$callback! {
            [$($args)*]
            rule_publish_receipt: "publish returns a receipt: id, channel, increasing sequence, duplicate = false, matching group count (which drops when a private subscription ends)",
            rule_fan_out_private_groups: "subscriptions without a group each get every message",
            rule_named_group_load_balances: "members of one named group share the messages, each message to exactly one member",
            rule_every_matching_group_gets_every_message: "every group whose pattern matches gets every message; `*` is one token, `>` one or more",
            rule_wildcard_sees_new_channels: "a wildcard subscription picks up channels created after it started",
            rule_ack_is_final: "an acked message is never redelivered",
            rule_nack_redelivers: "nack without delay redelivers at once with attempt + 1",
            rule_nack_delay: "nack with a delay redelivers no earlier than the delay",
            rule_reject_dead_letters: "reject sends the message to dead letters with reason `rejected` and the error",
            rule_ack_wait_redelivers: "an unsettled delivery is redelivered after ack_wait with attempt 2",
            rule_max_deliveries_dead_letters: "after max_deliveries the message is dead-lettered with reason `max_deliveries` and the last error",
            rule_order_within_channel: "one publisher, one channel, one group, prefetch 1: delivered in publish order",
            rule_priority_order: "among ready messages, higher priority is delivered first",
            rule_deadline_expired_dead_letters: "a message past its deadline is never delivered and is dead-lettered `expired`",
            rule_deadline_in_past_rejected: "publishing with a deadline already passed is InvalidInput",
            rule_dedup: "a second publish with the same id is a duplicate: same sequence, delivered once",
            rule_delayed_delivery: "a delayed message is not delivered before its time, then is",
            rule_delayed_does_not_block: "a delayed message does not hold up later messages on its channel",
            rule_start_positions: "a new group starts at earliest, new, a sequence or a time",
            rule_retention_reject_new: "a full channel with discard = reject_new refuses publishes with Full until consumers catch up",
            rule_retention_drop_oldest: "a full channel with discard = drop_oldest drops the oldest, keeps the newest and counts the drops",
            rule_prefetch_backpressure: "a consumer never holds more than prefetch unsettled deliveries",
            rule_dead_letter_admin: "dead letters can be listed, filtered, shown, replayed and purged; unknown ids are NotFound",
            rule_settle_twice: "settling a delivery twice is AlreadySettled",
            rule_bad_input: "bad channel names, oversized payloads and bad options are typed errors that disturb nothing",
            rule_request_reply: "a request gets its reply, in the request's trace",
            rule_request_no_responders: "a request nobody subscribes to fails at once with NoResponders",
            rule_request_timeout: "an unanswered request fails with Timeout naming the channel",
            rule_slow_requester_isolated: "one slow or vanished requester never makes other requests lose their replies",
            rule_gather_first_n: "gather stops at max_replies",
            rule_gather_reports_missing: "gather names the expected responders that did not answer and reports the timeout",
            rule_schema_dead_letters: "a payload that does not decode for its registered kind is dead-lettered `schema` and reported",
            rule_strict_kinds: "a strict bus refuses unregistered kinds, naming the registered ones",
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __agentbus_testkit_rule_list {
    ([] $($rule:ident : $title:literal,)*) => {
        vec![$(
            $crate::Rule {
                name: stringify!($rule),
                title: $title,
                run: |factory| ::std::boxed::Box::pin($crate::rules::$rule(factory)),
            },
        )*]
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __agentbus_testkit_tests {
    ([$factory:expr] $($rule:ident : $title:literal,)*) => {
        $(
            #[doc = $title]
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $rule() {
                let factory = $factory;
                let rule = $crate::Rule {
                    name: stringify!($rule),
                    title: $title,
                    run: |factory| ::std::boxed::Box::pin($crate::rules::$rule(factory)),
                };
                $crate::assert_rule(&factory, &rule).await;
            }
        )*
    };
}

/// Expands into one `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` per
/// rule of the suite, each running it against transports from `$factory` (an
/// expression of a type implementing [`TransportFactory`], evaluated in every test).
///
/// A failed rule panics with what was expected; a skipped one passes and prints
/// `SKIPPED: <reason>` (shown with `cargo nextest run --success-output immediate` or
/// `cargo test -- --nocapture`).
///
/// ```ignore
/// agentbus_testkit::conformance_tests!(agentbus_testkit::MemoryFactory);
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::__agentbus_testkit_rules!(__agentbus_testkit_tests!($factory));
    };
}

/// Every rule of the suite, in the order of DESIGN §4.
pub fn all_rules() -> Vec<Rule> {
    __agentbus_testkit_rules!(__agentbus_testkit_rule_list!())
}

/// How one rule ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Every check held.
    Passed,
    /// Not run to the end because the transport lacks a capability.
    Skipped(String),
    /// A check failed, the rule panicked or it ran past [`RULE_TIMEOUT`].
    Failed(String),
}

/// The result of one rule against one transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleReport {
    /// The rule's name.
    pub rule: &'static str,
    /// What it checks.
    pub title: &'static str,
    /// How it ended.
    pub status: Status,
    /// How long it took.
    pub elapsed: Duration,
}

/// The most one rule may take, however slow the backend; a rule past it fails.
pub const RULE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one rule against `factory`, turning panics and overruns into failures.
pub async fn run_rule(factory: &dyn TransportFactory, rule: &Rule) -> RuleReport {
    let start = Instant::now();
    let run = AssertUnwindSafe((rule.run)(factory)).catch_unwind();
    let status = match tokio::time::timeout(RULE_TIMEOUT, run).await {
        Ok(Ok(Ok(Outcome::Passed))) => Status::Passed,
        Ok(Ok(Ok(Outcome::Skipped(reason)))) => Status::Skipped(reason),
        Ok(Ok(Err(failure))) => Status::Failed(failure.to_string()),
        Ok(Err(panic)) => Status::Failed(format!("panicked: {}", fixture::panic_text(&*panic))),
        Err(_) => Status::Failed(format!("did not finish within {RULE_TIMEOUT:?}")),
    };
    RuleReport {
        rule: rule.name,
        title: rule.title,
        status,
        elapsed: start.elapsed(),
    }
}

/// Runs one rule and panics if it failed; prints `SKIPPED: <reason>` if skipped.
/// This is the body of every test [`conformance_tests!`] generates.
///
/// # Panics
/// When the rule fails, with the rule, the engine and what went wrong.
pub async fn assert_rule(factory: &dyn TransportFactory, rule: &Rule) {
    let report = run_rule(factory, rule).await;
    match report.status {
        Status::Passed => println!(
            "PASSED: {} on {} ({:.2?})",
            rule.name,
            factory.name(),
            report.elapsed
        ),
        Status::Skipped(reason) => println!("SKIPPED: {reason}"),
        Status::Failed(why) => panic!(
            "conformance rule `{}` ({}) failed on {}: {why}",
            rule.name,
            rule.title,
            factory.name()
        ),
    }
}

/// The results of a whole suite run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The factory's name.
    pub engine: String,
    /// One report per rule, in rule order.
    pub reports: Vec<RuleReport>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Summary {
    /// How many rules passed.
    pub fn passed(&self) -> usize {
        self.count(|s| matches!(s, Status::Passed))
    }

    /// How many were skipped.
    pub fn skipped(&self) -> usize {
        self.count(|s| matches!(s, Status::Skipped(_)))
    }

    /// How many failed.
    pub fn failed(&self) -> usize {
        self.count(|s| matches!(s, Status::Failed(_)))
    }

    /// True when nothing failed (skips are not failures).
    pub fn is_success(&self) -> bool {
        self.failed() == 0
    }

    fn count(&self, f: impl Fn(&Status) -> bool) -> usize {
        self.reports.iter().filter(|r| f(&r.status)).count()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "conformance suite on {}:", self.engine)?;
        for report in &self.reports {
            let (label, detail) = match &report.status {
                Status::Passed => ("ok     ", String::new()),
                Status::Skipped(reason) => ("SKIPPED", format!(" — {reason}")),
                Status::Failed(why) => ("FAILED ", format!(" — {why}")),
            };
            writeln!(
                f,
                "  {label} {:<46} {:>8.2?}{detail}",
                report.rule, report.elapsed
            )?;
        }
        write!(
            f,
            "{} passed, {} failed, {} skipped in {:.2?}",
            self.passed(),
            self.failed(),
            self.skipped(),
            self.elapsed
        )
    }
}

/// How many rules [`run_all`] runs at once. Rules mostly wait on timers, so running
/// several together keeps a suite run short without loading the machine.
pub const CONCURRENCY: usize = 8;

/// Runs `rules` against `factory`, up to `concurrency` at a time, each on its own
/// tokio task; reports come back in the order of `rules`.
pub async fn run_rules(
    factory: Arc<dyn TransportFactory>,
    rules: Vec<Rule>,
    concurrency: usize,
) -> Summary {
    use futures::StreamExt;

    let start = Instant::now();
    let engine = factory.name().to_string();
    let reports = futures::stream::iter(rules)
        .map(|rule| {
            let factory = factory.clone();
            async move {
                let task = tokio::spawn(async move { run_rule(&*factory, &rule).await });
                task.await.unwrap_or_else(|e| RuleReport {
                    rule: rule.name,
                    title: rule.title,
                    status: Status::Failed(format!("the rule's task failed: {e}")),
                    elapsed: Duration::ZERO,
                })
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    Summary {
        engine,
        reports,
        elapsed: start.elapsed(),
    }
}

/// Runs every rule against `factory` and prints the summary: passed, failed with
/// why, skipped with the reason.
pub async fn run_all(factory: Arc<dyn TransportFactory>) -> Summary {
    let summary = run_rules(factory, all_rules(), CONCURRENCY).await;
    println!("{summary}");
    summary
}
