//! One W3C trace follows a request through several agents: every message of the
//! chain carries the same trace id, and each hop names the span it continues.

use std::sync::Arc;
use std::time::Duration;

use agentbus::trace_context::{TraceParent, PARENT_SPAN_HEADER};
use agentbus::{
    Agent, AgentDescriptor, Bus, BusEvent, BusObserver, ChannelName, Context, Envelope,
    MemoryEngine, Message, PublishOptions,
};
use parking_lot::Mutex;

macro_rules! message {
    ($name:ident, $kind:literal) => {
        #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug, Clone)]
        struct $name {
            n: u32,
        }
        impl Message for $name {
            const KIND: &'static str = $kind;
        }
    };
}
message!(Start, "chain.start");
message!(Ask, "chain.ask");
message!(Answer, "chain.answer");
message!(Done, "chain.done");

#[derive(Debug, Default)]
struct Published(Mutex<Vec<Envelope>>, Mutex<Vec<(String, Option<String>)>>);

impl BusObserver for Published {
    fn on_event(&self, event: &BusEvent<'_>) {
        match event {
            BusEvent::Published { envelope, .. }
                if !envelope.channel.as_str().starts_with("_sys.") =>
            {
                self.0.lock().push((*envelope).clone());
            }
            BusEvent::Settled {
                envelope, agent, ..
            } => self
                .1
                .lock()
                .push((envelope.header.kind.clone(), agent.map(str::to_owned))),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_trace_follows_a_request_through_three_agents() {
    let published = Arc::new(Published::default());
    let bus = Bus::builder(Arc::new(MemoryEngine::new()))
        .observer(published.clone())
        .build();
    // front: on start, asks back (request/reply), then reports done.
    let front = Agent::builder(
        AgentDescriptor::new("front", "front")
            .sends::<Ask>()
            .sends::<Done>(),
    )
    .handle("chain.in", |ctx: Context, start: Start| async move {
        let answer: Answer = ctx
            .request(
                &ChannelName::new("chain.back")?,
                &Ask { n: start.n },
                Duration::from_secs(10),
            )
            .await?;
        ctx.send(&ChannelName::new("chain.out")?, &Done { n: answer.n })
            .await?;
        Ok(())
    })
    .spawn(&bus)
    .await
    .unwrap();
    let back = Agent::builder(AgentDescriptor::new("back", "back").sends::<Answer>())
        .handle("chain.back", |ctx: Context, ask: Ask| async move {
            ctx.reply(&Answer { n: ask.n + 1 }).await?;
            Ok(())
        })
        .spawn(&bus)
        .await
        .unwrap();
    let mut out = bus
        .subscribe_typed::<Done>(agentbus::SubscribeOptions::new(
            agentbus::ChannelPattern::new("chain.out").unwrap(),
        ))
        .await
        .unwrap();

    // The caller starts the trace itself, as an upstream service would.
    let upstream =
        TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let mut options = PublishOptions::new().correlation("order-1");
    options.trace = Some(upstream.to_string());
    bus.publish_with(
        &ChannelName::new("chain.in").unwrap(),
        &Start { n: 1 },
        &options,
    )
    .await
    .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(10), out.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.message.n, 2);
    done.delivery.ack().await.unwrap();

    let chain = published.0.lock().clone();
    let kinds: Vec<&str> = chain.iter().map(|e| e.header.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["chain.start", "chain.ask", "chain.answer", "chain.done"]
    );
    let parents: Vec<TraceParent> = chain
        .iter()
        .map(|e| TraceParent::parse(e.header.trace.as_deref().unwrap()).unwrap())
        .collect();
    for (envelope, tp) in chain.iter().zip(&parents) {
        assert_eq!(tp.trace_id, upstream.trace_id, "{}", envelope.header.kind);
    }
    let parent_of = |i: usize| chain[i].header.headers[PARENT_SPAN_HEADER].clone();
    // start continues the upstream span; ask and done are sent while handling start;
    // the answer while handling ask.
    assert_eq!(parent_of(0), upstream.span_id_hex());
    assert_eq!(parent_of(1), parents[0].span_id_hex());
    assert_eq!(parent_of(2), parents[1].span_id_hex());
    assert_eq!(parent_of(3), parents[0].span_id_hex());
    let mut spans: Vec<[u8; 8]> = parents.iter().map(|p| p.span_id).collect();
    spans.sort_unstable();
    spans.dedup();
    assert_eq!(spans.len(), 4, "each hop has a span of its own");

    // A message published without a trace starts one.
    bus.publish(&ChannelName::new("chain.solo").unwrap(), &Start { n: 9 })
        .await
        .unwrap();
    let solo = published.0.lock().last().cloned().unwrap();
    let tp = TraceParent::parse(solo.header.trace.as_deref().unwrap()).unwrap();
    assert_ne!(tp.trace_id, upstream.trace_id);
    assert!(!solo.header.headers.contains_key(PARENT_SPAN_HEADER));
    // Settlements name the agent instance that handled them; the inbox router and
    // the test's own subscription are no agents.
    let settled = published.1.lock().clone();
    let by = |kind: &str| {
        settled
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, a)| a.clone())
    };
    assert_eq!(by("chain.start"), Some(Some("front".to_string())));
    assert_eq!(by("chain.ask"), Some(Some("back".to_string())));
    assert_eq!(by("chain.answer"), Some(None));
    assert_eq!(by("chain.done"), Some(None));
    front.shutdown(Duration::from_secs(1)).await;
    back.shutdown(Duration::from_secs(1)).await;
}
