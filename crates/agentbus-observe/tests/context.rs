//! Seed 004: peers answer a context broadcast from their own stores; a slow peer is
//! reported as timed out.

use std::sync::Arc;
use std::time::Duration;

use agentbus::{AgentDescriptor, Bus, ChannelName, Context, MemoryEngine, Message, PublishOptions};
use agentbus_observe::context::{request_context, AgentHistory, ContextRequest, ContextService};
use agentbus_observe::store::InteractionStore;

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Debug)]
struct Task {
    n: u32,
}
impl Message for Task {
    const KIND: &'static str = "task.assign";
}

#[tokio::test]
async fn peers_answer_from_their_own_history_and_slow_ones_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let peers = ["alpha", "beta", "gamma"];
    let stores: Vec<Arc<InteractionStore>> = peers
        .iter()
        .map(|p| Arc::new(InteractionStore::open(dir.path().join(format!("{p}.db"))).unwrap()))
        .collect();
    let mut builder = Bus::builder(Arc::new(MemoryEngine::new()));
    for (peer, store) in peers.iter().zip(&stores) {
        builder = builder.observer(Arc::new(AgentHistory::new(*peer, store.clone())));
    }
    let bus = builder.build();

    // The planner talked to alpha twice (thread t1 and t2) and to beta once; gamma
    // never heard from it. Nobody consumes these: publishing is the interaction.
    let planner = Context::new(
        bus.clone(),
        AgentDescriptor::new("planner", "planner").sends::<Task>(),
    );
    for (peer, thread, n) in [("alpha", "t1", 1), ("alpha", "t2", 2), ("beta", "t1", 3)] {
        let mut options = PublishOptions::new().correlation(thread);
        options.receiver = Some(peer.into());
        planner
            .send_with(
                &ChannelName::new(format!("work.{peer}")).unwrap(),
                &Task { n },
                options,
            )
            .await
            .unwrap();
    }
    for store in &stores {
        store.flush().unwrap();
    }
    assert_eq!(stores[0].stats().written, 2);
    assert_eq!(stores[1].stats().written, 1);
    assert_eq!(stores[2].stats().written, 0);

    let mut agents = Vec::new();
    for (i, (peer, store)) in peers.iter().zip(&stores).enumerate() {
        // gamma is slow: it answers after the requester stopped waiting.
        let delay = if i == 2 {
            Duration::from_secs(8)
        } else {
            Duration::ZERO
        };
        agents.push(
            ContextService::spawn(&bus, peer, store.clone(), delay)
                .await
                .unwrap(),
        );
    }
    let request = ContextRequest {
        requester: "reconstructor".into(),
        target_agent: "planner".into(),
        thread_id: None,
        window_seconds: Some(3600),
        limit: None,
    };
    let names: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
    let result = request_context(&bus, &request, &names, Duration::from_secs(2))
        .await
        .unwrap();
    let mut responders = result.responders.clone();
    responders.sort();
    assert_eq!(responders, ["alpha", "beta"]);
    assert_eq!(result.timed_out, ["gamma"]);
    assert_eq!(result.items.len(), 3);
    assert!(result.items.windows(2).all(|w| w[0].at <= w[1].at));
    assert!(result
        .items
        .iter()
        .all(|i| i.sender.as_deref() == Some("planner")));
    assert_eq!(result.items[0].payload, Some(serde_json::json!({"n": 1})));

    // A thread filter narrows every peer's answer; all fast peers answering ends the
    // wait early.
    let t2 = ContextRequest {
        thread_id: Some("t2".into()),
        ..request.clone()
    };
    let two: Vec<String> = names[..2].to_vec();
    let started = std::time::Instant::now();
    let result = request_context(&bus, &t2, &two, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(result.timed_out.is_empty());
    assert_eq!(result.items.len(), 1);
    assert_eq!(result.items[0].thread_id.as_deref(), Some("t2"));
    for agent in agents {
        agent.shutdown(Duration::from_millis(100)).await;
    }
}
