//! Through the bus: request/reply, scatter-gather and schema checks.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentbus::trace_context::{TraceParent, PARENT_SPAN_HEADER};
use agentbus::{
    Bus, ChannelName, DeadReason, Envelope, ErrorKind, GatherSpec, Message, PublishOptions,
    SubscribeOptions,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::fixture::{
    expect_error, expect_quiet, number, skip, wait_until, with_fixture, Context, Num, QUIET, WAIT,
};
use crate::{ensure, ensure_eq, Failure, Outcome, RuleResult, TransportFactory};

/// Responders answer `Num { n }` with `Num { n + REPLY_OFFSET }`, so every reply
/// shows which request it answers.
const REPLY_OFFSET: u64 = 1_000_000;

/// Subscribes a responder (a private group) on `channel` and spawns its loop into
/// `tasks`. It answers every request with `n + REPLY_OFFSET`, as sender `name`,
/// after `hold` says go for that `n` (so a rule can keep replies back).
async fn spawn_responder(
    bus: &Bus,
    channel: &ChannelName,
    name: &'static str,
    tasks: &mut JoinSet<()>,
    hold: Option<Hold>,
) -> Result<(), Failure> {
    // Subscribed before returning, so a request published next finds it.
    let mut subscription = bus
        .subscribe(SubscribeOptions::new(channel.clone().into()))
        .await
        .context(format!("subscribing responder '{name}' on '{channel}'"))?;
    let bus = bus.clone();
    tasks.spawn(async move {
        let mut replies = JoinSet::new();
        loop {
            let delivery = match subscription.next().await {
                Ok(delivery) => delivery,
                Err(e) if e.kind() == ErrorKind::Closed => return,
                Err(e) => {
                    eprintln!("responder '{name}': receiving failed ({}): {e}", e.kind());
                    return;
                }
            };
            let request = delivery.envelope().clone();
            if let Err(e) = delivery.ack().await {
                eprintln!("responder '{name}': ack failed: {e}");
            }
            let Ok(Num { n }) = request.decode_json::<Num>() else {
                eprintln!(
                    "responder '{name}': request {} is not a Num",
                    request.header.id
                );
                continue;
            };
            let bus = bus.clone();
            let hold = hold.clone();
            // Each reply on its own task, so a held reply never holds up the others.
            replies.spawn(async move {
                if let Some(hold) = hold {
                    hold.wait(n).await;
                }
                let sent = match bus.reply_envelope(
                    &request,
                    &Num {
                        n: n + REPLY_OFFSET,
                    },
                    Some(name),
                ) {
                    Ok(reply) => bus.publish_envelope(reply).await.map(drop),
                    Err(e) => Err(e),
                };
                if let Err(e) = sent {
                    eprintln!(
                        "responder '{name}': replying to {n} failed ({}): {e}",
                        e.kind()
                    );
                }
            });
        }
    });
    Ok(())
}

/// Records which requests a responder saw and holds back the replies to some of them
/// until released.
#[derive(Clone)]
struct Hold {
    seen: Arc<Mutex<BTreeSet<u64>>>,
    held: Arc<BTreeSet<u64>>,
    release: watch::Receiver<bool>,
}

impl Hold {
    async fn wait(mut self, n: u64) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(n);
        }
        if self.held.contains(&n) {
            // Bounded, so a failed rule never leaves this task behind for long.
            let _ = tokio::time::timeout(WAIT * 3, self.release.wait_for(|go| *go)).await;
        }
    }

    fn saw(&self, n: u64) -> bool {
        self.seen.lock().map(|s| s.contains(&n)).unwrap_or(false)
    }
}

fn bus_for(fx: &crate::Fixture) -> Bus {
    let bus = Bus::new(fx.transport().clone());
    bus.register::<Num>();
    bus
}

/// Rule 17a — **Request/reply**: a request gets the reply to it, and the reply is a
/// span under the request's in the request's trace (the request is stamped on the
/// way out, as every publish is).
pub async fn rule_request_reply(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("svc.echo")?;
        let bus = bus_for(&fx);
        let mut tasks = JoinSet::new();
        spawn_responder(&bus, &channel, "echo", &mut tasks, None).await?;
        for n in [1, 2, 3] {
            let reply: Num = bus
                .request(&channel, &Num { n }, WAIT)
                .await
                .context(format!("request {n}"))?;
            ensure_eq!(reply.n, n + REPLY_OFFSET, "the reply to request {n}");
        }
        // The trace follows: the request is a span of the caller's trace, and the
        // reply a span under the request's (not under the caller's, which would
        // mean the request went out unstamped).
        let upstream = TraceParent::new_root();
        let options = PublishOptions {
            trace: Some(upstream.to_string()),
            ..PublishOptions::default()
        };
        let request = bus
            .envelope(&channel, &Num { n: 4 }, &options)
            .context("building request 4")?;
        let reply = bus
            .request_envelope(request, WAIT)
            .await
            .context("request 4")?;
        let traced = reply.header.trace.as_deref().and_then(TraceParent::parse);
        ensure!(
            traced.is_some_and(|t| t.trace_id == upstream.trace_id),
            "the reply to a traced request carries the request's trace id {}, not {:?}",
            upstream.trace_id_hex(),
            reply.header.trace
        );
        let parent = reply.header.headers.get(PARENT_SPAN_HEADER);
        ensure!(
            parent.is_some_and(|p| *p != upstream.span_id_hex()),
            "the reply's parent span is the request's own span, not the caller's {} \
             (got {parent:?}): the request must be stamped on the way out",
            upstream.span_id_hex()
        );
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 17b — **Request/reply**: `NoResponders` comes back at once (long before the
/// request's timeout) when no group is subscribed to the channel, where the
/// transport can tell.
pub async fn rule_request_no_responders(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        if !fx.capabilities().no_responders {
            return skip("no_responders");
        }
        let channel = fx.channel("svc.nobody")?;
        let bus = bus_for(&fx);
        // Someone listening elsewhere must not count.
        let _elsewhere = fx
            .subscribe(SubscribeOptions::new(fx.pattern("svc.other")?))
            .await?;
        let timeout = Duration::from_secs(60);
        let result = tokio::time::timeout(
            WAIT,
            bus.request::<Num, Num>(&channel, &Num { n: 1 }, timeout),
        )
        .await
        .map_err(|_| {
            Failure::new(format!(
                "a request nobody subscribes to was still waiting after {WAIT:?}; NoResponders \
                     must come back at once, not after the {timeout:?} timeout"
            ))
        })?;
        let e = expect_error(
            result,
            ErrorKind::NoResponders,
            "a request nobody subscribes to",
        )?;
        ensure!(
            e.to_string().contains(channel.as_str()),
            "the NoResponders error should name the channel '{channel}': {e}"
        );
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 17c — **Request/reply**: a request nobody answers fails with `Timeout` after
/// its timeout, and the error names the channel.
pub async fn rule_request_timeout(factory: &dyn TransportFactory) -> RuleResult {
    const TIMEOUT: Duration = Duration::from_millis(500);
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("svc.silent")?;
        let bus = bus_for(&fx);
        // Subscribed (so not NoResponders), never answering.
        let _silent = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()))
            .await?;
        let start = Instant::now();
        let result = tokio::time::timeout(
            WAIT,
            bus.request::<Num, Num>(&channel, &Num { n: 1 }, TIMEOUT),
        )
        .await
        .map_err(|_| {
            Failure::new(format!(
                "a request with a {TIMEOUT:?} timeout was still waiting after {WAIT:?}"
            ))
        })?;
        let waited = start.elapsed();
        let e = expect_error(result, ErrorKind::Timeout, "a request nobody answers")?;
        ensure!(
            e.to_string().contains(channel.as_str()),
            "the Timeout error should name the channel '{channel}': {e}"
        );
        ensure!(
            waited + Duration::from_millis(50) >= TIMEOUT,
            "the request timed out after {waited:?}, before its timeout of {TIMEOUT:?}"
        );
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 17d — **Request/reply**: one slow requester (its reply arrives while it is
/// not polling) and one vanished requester (dropped before its reply arrives) never
/// make other requests lose their replies; the slow one still gets its own.
pub async fn rule_slow_requester_isolated(factory: &dyn TransportFactory) -> RuleResult {
    const OTHERS: u64 = 48;
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("svc.shared")?;
        let bus = bus_for(&fx);
        let (release, release_rx) = watch::channel(false);
        let hold = Hold {
            seen: Arc::default(),
            held: Arc::new([0, 1].into_iter().collect()),
            release: release_rx,
        };
        let mut tasks = JoinSet::new();
        spawn_responder(&bus, &channel, "shared", &mut tasks, Some(hold.clone())).await?;

        // Request 0: polled until the responder has it, then left unpolled.
        let slow = bus.request::<Num, Num>(&channel, &Num { n: 0 }, Duration::from_secs(60));
        tokio::pin!(slow);
        tokio::select! {
            early = &mut slow => return Err(Failure::new(format!(
                "request 0 finished while its reply was held back: {early:?}"
            ))),
            seen = wait_until(|| hold.saw(0), "the responder to receive request 0") => seen?,
        }
        // Request 1: sent, then dropped before its reply is released.
        {
            let vanished =
                bus.request::<Num, Num>(&channel, &Num { n: 1 }, Duration::from_secs(60));
            tokio::pin!(vanished);
            tokio::select! {
                early = &mut vanished => return Err(Failure::new(format!(
                    "request 1 finished while its reply was held back: {early:?}"
                ))),
                seen = wait_until(|| hold.saw(1), "the responder to receive request 1") => seen?,
            }
        }
        // Both replies go out now: one to a requester that is not polling, one to
        // nobody. Then many concurrent requests on the same bus.
        release
            .send(true)
            .map_err(|_| Failure::new("the responder is gone before the replies were released"))?;
        let others = futures::future::join_all((2..2 + OTHERS).map(|n| {
            let bus = bus.clone();
            let channel = channel.clone();
            async move { (n, bus.request::<Num, Num>(&channel, &Num { n }, WAIT).await) }
        }))
        .await;
        let mut wrong = Vec::new();
        for (n, result) in others {
            match result {
                Ok(reply) if reply.n == n + REPLY_OFFSET => {}
                Ok(reply) => wrong.push(format!("request {n} got the reply {}", reply.n)),
                Err(e) => wrong.push(format!("request {n} failed ({}): {e}", e.kind())),
            }
        }
        ensure!(
            wrong.is_empty(),
            "with one slow and one vanished requester, {} of {OTHERS} other requests went \
             wrong: {}",
            wrong.len(),
            wrong.join("; ")
        );
        let reply = tokio::time::timeout(WAIT, &mut slow)
            .await
            .map_err(|_| {
                Failure::new(format!(
                    "the slow requester's reply did not come within {WAIT:?} of polling again"
                ))
            })?
            .context("the slow request 0")?;
        ensure_eq!(reply.n, REPLY_OFFSET, "the slow requester's reply");
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 18a — **Scatter-gather**: with `max_replies = 2` and three responders, the
/// gather returns two replies as soon as they are in, well before its timeout.
pub async fn rule_gather_first_n(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("svc.quote")?;
        let bus = bus_for(&fx);
        let mut tasks = JoinSet::new();
        for name in ["a", "b", "c"] {
            spawn_responder(&bus, &channel, name, &mut tasks, None).await?;
        }
        let timeout = Duration::from_secs(60);
        let spec = GatherSpec::new(timeout).max_replies(2);
        let result =
            tokio::time::timeout(WAIT, bus.gather::<Num, Num>(&channel, &Num { n: 5 }, &spec))
                .await
                .map_err(|_| {
                    Failure::new(format!(
                        "a gather for the first 2 of 3 replies was still waiting after {WAIT:?}"
                    ))
                })?
                .context("gathering the first 2 replies")?;
        ensure_eq!(
            result.replies.len(),
            2,
            "replies gathered with max_replies 2"
        );
        ensure!(
            !result.timed_out,
            "the gather ended by max_replies, not its timeout: {result:?}"
        );
        for reply in &result.replies {
            ensure_eq!(reply.n, 5 + REPLY_OFFSET, "a gathered reply");
        }
        let responders: BTreeSet<&str> = result.responders.iter().map(String::as_str).collect();
        ensure!(
            responders.len() == 2 && responders.is_subset(&["a", "b", "c"].into_iter().collect()),
            "responders should be 2 distinct names of a, b, c: {:?}",
            result.responders
        );
        if fx.capabilities().no_responders {
            ensure_eq!(result.groups, 3, "groups the gather reached");
        }
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 18b — **Scatter-gather**: with expected responders a, b, c, d and only a, b,
/// c answering, the gather ends at its timeout, reports who answered and names d as
/// missing.
pub async fn rule_gather_reports_missing(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("svc.poll")?;
        let bus = bus_for(&fx);
        let mut tasks = JoinSet::new();
        for name in ["a", "b", "c"] {
            spawn_responder(&bus, &channel, name, &mut tasks, None).await?;
        }
        let spec = GatherSpec::new(Duration::from_millis(1000)).expect(["a", "b", "c", "d"]);
        let result =
            tokio::time::timeout(WAIT, bus.gather::<Num, Num>(&channel, &Num { n: 8 }, &spec))
                .await
                .map_err(|_| {
                    Failure::new(format!("a 1 s gather was still waiting after {WAIT:?}"))
                })?
                .context("gathering from a, b, c with d expected too")?;
        let mut responders = result.responders.clone();
        responders.sort();
        ensure_eq!(responders, vec!["a", "b", "c"], "who answered");
        ensure_eq!(result.replies.len(), 3, "replies gathered");
        ensure_eq!(
            result.missing,
            vec!["d".to_string()],
            "expected responders missing"
        );
        ensure!(
            result.timed_out,
            "the gather waited for d until its timeout: {result:?}"
        );
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 19a — **Schema**: a payload that does not decode for its registered kind
/// (published around the sender-side check) is dead-lettered with reason `schema`,
/// and the receiving `Subscription::next` reports it as a `Schema` error; the next
/// valid message is delivered normally.
pub async fn rule_schema_dead_letters(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("typed")?;
        let bus = bus_for(&fx);
        let mut subscription = bus
            .subscribe(SubscribeOptions::new(channel.clone().into()).group(fx.group("typed")))
            .await
            .context("subscribing through the bus")?;
        let bad = Envelope::new(
            channel.clone(),
            Num::KIND,
            br#"{"n":"not a number"}"#.to_vec(),
        );
        expect_error(
            bus.publish_envelope(bad.clone()).await,
            ErrorKind::Schema,
            "publishing a bad payload through the bus (sender-side check)",
        )?;
        let bad_id = bad.header.id;
        fx.publish(bad, "a bad payload, bypassing the bus").await?;
        bus.publish(&channel, &Num { n: 2 })
            .await
            .context("publishing a valid message through the bus")?;

        let received = tokio::time::timeout(WAIT, subscription.next())
            .await
            .map_err(|_| Failure::new(format!("nothing was received within {WAIT:?}")))?;
        let e = expect_error(
            received.map(|d| d.envelope().header.id),
            ErrorKind::Schema,
            "receiving the bad payload",
        )?;
        ensure!(
            e.to_string().contains(Num::KIND),
            "the Schema error should name the kind '{}': {e}",
            Num::KIND
        );
        let letter = fx.wait_dead_letter(bad_id, DeadReason::Schema).await?;
        ensure!(
            letter.last_error.is_some(),
            "the schema dead letter should keep the decode error: {letter:?}"
        );
        let next = tokio::time::timeout(WAIT, subscription.next())
            .await
            .map_err(|_| {
                Failure::new(format!(
                    "the valid message was not received within {WAIT:?}"
                ))
            })?
            .context("receiving the valid message after the bad one")?;
        ensure_eq!(number(&next)?, 2, "the valid message after the bad one");
        next.ack().await.context("acking the valid message")?;
        Ok(Outcome::Passed)
    })
    .await
}

/// Rule 19b — **Schema**: a strict bus refuses to publish a kind that is not
/// registered (`MessageKindNotRegistered`, listing the registered kinds), stores
/// nothing, and dead-letters unregistered kinds it receives.
pub async fn rule_strict_kinds(factory: &dyn TransportFactory) -> RuleResult {
    with_fixture(factory, |fx| async move {
        let channel = fx.channel("strict")?;
        let bus = Bus::builder(fx.transport().clone())
            .strict_kinds(true)
            .build();
        bus.register::<Num>();
        let mut raw = fx
            .subscribe(SubscribeOptions::new(channel.clone().into()))
            .await?;
        let mut subscription = bus
            .subscribe(SubscribeOptions::new(channel.clone().into()).group(fx.group("strict")))
            .await
            .context("subscribing through the strict bus")?;

        const STRANGER: &str = "testkit.unregistered";
        let stranger = Envelope::new(channel.clone(), STRANGER, b"{}".to_vec());
        let e = expect_error(
            bus.publish_envelope(stranger.clone()).await,
            ErrorKind::MessageKindNotRegistered,
            "publishing an unregistered kind on a strict bus",
        )?;
        let text = e.to_string();
        ensure!(
            text.contains(STRANGER) && text.contains(Num::KIND),
            "the error should name the unregistered kind '{STRANGER}' and list the registered \
             kind '{}': {text}",
            Num::KIND
        );
        expect_quiet(
            &mut *raw,
            QUIET,
            "after the refused publish (nothing stored)",
        )
        .await?;

        // Received around the check: dead-lettered, reported.
        fx.publish(stranger.clone(), "an unregistered kind, bypassing the bus")
            .await?;
        let received = tokio::time::timeout(WAIT, subscription.next())
            .await
            .map_err(|_| Failure::new(format!("nothing was received within {WAIT:?}")))?;
        expect_error(
            received.map(|d| d.envelope().header.id),
            ErrorKind::MessageKindNotRegistered,
            "receiving an unregistered kind on a strict bus",
        )?;
        fx.wait_dead_letter(stranger.header.id, DeadReason::Schema)
            .await?;
        Ok(Outcome::Passed)
    })
    .await
}
