//! The agent registry: heartbeats build a live view, lookup by capability, health by
//! missed heartbeats with events, goodbyes, late joiners.

mod coordination_common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbus::coordination::{
    AgentEvent, AgentLoad, AgentRegistry, Health, Presence, RegistryOptions, AGENTS_EVENTS,
};
use agentbus::{AgentDescriptor, Bus, ChannelPattern, SubscribeOptions};
use coordination_common::{advance, manual_bus, within};

#[tokio::test]
async fn heartbeats_build_a_live_view_with_capabilities_and_load() {
    let bus = Bus::memory();
    let registry = AgentRegistry::start(&bus, RegistryOptions::default())
        .await
        .unwrap();
    let load = Arc::new(AtomicU32::new(2));
    let reported = load.clone();
    let a = Presence::start(
        &bus,
        AgentDescriptor::new("extract-1", "extractor")
            .capability("extract")
            .label("region", "eu"),
        Duration::from_millis(500),
        move || AgentLoad {
            in_flight: reported.load(Ordering::Relaxed),
            queue_depth: 1,
            capacity: 4,
        },
    )
    .await
    .unwrap();
    let b = Presence::start(
        &bus,
        AgentDescriptor::new("transform-1", "transformer")
            .capability("transform")
            .capability("validate"),
        Duration::from_millis(500),
        AgentLoad::default,
    )
    .await
    .unwrap();
    within("two agents", registry.wait_for(|agents| agents.len() == 2)).await;
    assert_eq!(
        registry.capabilities(),
        ["extract", "transform", "validate"]
    );
    let found = registry.find("validate");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id(), "transform-1");
    assert!(registry.find("load").is_empty());
    let record = registry.agent("extract-1").unwrap();
    assert_eq!(record.health, Health::Healthy);
    assert_eq!(record.load.total(), 3);
    assert_eq!(record.descriptor.labels["region"], "eu");
    // A later heartbeat updates the load.
    load.store(7, Ordering::Relaxed);
    within(
        "new load",
        registry.wait_for(|agents| agents.iter().any(|a| a.load.in_flight == 7)),
    )
    .await;
    a.stop().await;
    b.stop().await;
    within("both said goodbye", registry.wait_for(|a| a.is_empty())).await;
}

#[tokio::test]
async fn missed_heartbeats_make_an_agent_unhealthy_then_dead_with_events() {
    let (bus, clock) = manual_bus();
    let options = RegistryOptions {
        unhealthy_after: 3,
        dead_after: 6,
        publish_events: true,
        ..RegistryOptions::default()
    };
    let registry = AgentRegistry::start(&bus, options).await.unwrap();
    let mut events_on_bus = bus
        .subscribe_typed::<AgentEvent>(SubscribeOptions::new(
            ChannelPattern::new(AGENTS_EVENTS).unwrap(),
        ))
        .await
        .unwrap();
    let mut local = registry.events();
    let steady = Presence::start(
        &bus,
        AgentDescriptor::new("steady", "s").capability("work"),
        Duration::from_secs(1),
        AgentLoad::default,
    )
    .await
    .unwrap();
    let silent = Presence::start(
        &bus,
        AgentDescriptor::new("silent", "s").capability("work"),
        Duration::from_secs(1),
        AgentLoad::default,
    )
    .await
    .unwrap();
    within("both", registry.wait_for(|a| a.len() == 2)).await;
    silent.abort();
    // 2.5 s of silence: still healthy (the rule is more than 3 intervals).
    advance(
        &clock,
        Duration::from_millis(2500),
        Duration::from_millis(250),
    )
    .await;
    registry.check_now().await;
    assert_eq!(registry.agent("silent").unwrap().health, Health::Healthy);
    advance(
        &clock,
        Duration::from_millis(1000),
        Duration::from_millis(250),
    )
    .await;
    registry.check_now().await;
    assert_eq!(registry.agent("silent").unwrap().health, Health::Unhealthy);
    assert_eq!(registry.agent("steady").unwrap().health, Health::Healthy);
    assert_eq!(
        registry.find("work").len(),
        1,
        "unhealthy agents take no work"
    );
    advance(
        &clock,
        Duration::from_millis(3000),
        Duration::from_millis(250),
    )
    .await;
    registry.check_now().await;
    assert!(
        registry.agent("silent").is_none(),
        "dead agents leave the view"
    );
    assert_eq!(registry.agent("steady").unwrap().health, Health::Healthy);

    // Local events, in order, for the silent agent.
    let mut seen = Vec::new();
    while let Ok(event) = local.try_recv() {
        if event.agent_id == "silent" {
            seen.push((event.from, event.to));
        }
    }
    assert_eq!(
        seen,
        [
            (None, Health::Healthy),
            (Some(Health::Healthy), Health::Unhealthy),
            (Some(Health::Unhealthy), Health::Dead)
        ]
    );
    // The same transitions on `_sys.agents.events`.
    let mut on_bus = Vec::new();
    while on_bus.len() < 3 {
        let typed = within("event on the bus", events_on_bus.next())
            .await
            .unwrap();
        typed.delivery.ack().await.unwrap();
        if typed.message.agent_id == "silent" {
            on_bus.push(typed.message.to);
        }
    }
    assert_eq!(on_bus, [Health::Healthy, Health::Unhealthy, Health::Dead]);
    assert!(registry
        .agents()
        .iter()
        .all(|a| a.id() != "silent" && a.heartbeats > 1));
    steady.stop().await;
}

#[tokio::test]
async fn a_heartbeat_brings_an_unhealthy_agent_back() {
    let (bus, clock) = manual_bus();
    let registry = AgentRegistry::start(&bus, RegistryOptions::default())
        .await
        .unwrap();
    let descriptor = AgentDescriptor::new("flappy", "f").capability("work");
    let first = Presence::start(
        &bus,
        descriptor.clone(),
        Duration::from_secs(1),
        AgentLoad::default,
    )
    .await
    .unwrap();
    within("seen", registry.wait_for(|a| a.len() == 1)).await;
    first.abort();
    advance(
        &clock,
        Duration::from_millis(3500),
        Duration::from_millis(500),
    )
    .await;
    registry.check_now().await;
    assert_eq!(registry.agent("flappy").unwrap().health, Health::Unhealthy);
    let again = Presence::start(&bus, descriptor, Duration::from_secs(1), AgentLoad::default)
        .await
        .unwrap();
    within(
        "healthy again",
        registry.wait_for(|a| a.iter().any(|r| r.health == Health::Healthy)),
    )
    .await;
    again.stop().await;
}

#[tokio::test]
async fn a_registry_started_later_sees_agents_that_heartbeated_recently() {
    let bus = Bus::memory();
    let presence = Presence::start(
        &bus,
        AgentDescriptor::new("early", "e").capability("work"),
        Duration::from_secs(30),
        AgentLoad::default,
    )
    .await
    .unwrap();
    // No heartbeat will come for 30 s: the new registry must read the announcement.
    let registry = AgentRegistry::start(&bus, RegistryOptions::default())
        .await
        .unwrap();
    within(
        "late joiner sees the agent",
        registry.wait_for(|a| a.len() == 1),
    )
    .await;
    assert_eq!(registry.find("work")[0].id(), "early");
    presence.stop().await;
}

#[tokio::test]
async fn zero_heartbeat_interval_is_refused() {
    let bus = Bus::memory();
    let error = Presence::start(
        &bus,
        AgentDescriptor::new("x", "x"),
        Duration::ZERO,
        AgentLoad::default,
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), agentbus::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn an_agent_reporting_degraded_is_degraded_but_still_available() {
    let bus = Bus::memory();
    let registry = AgentRegistry::start(&bus, RegistryOptions::default())
        .await
        .unwrap();
    let presence = Presence::start_with_health(
        &bus,
        AgentDescriptor::new("tired", "t").capability("work"),
        Duration::from_secs(30),
        AgentLoad::default,
        || agentbus::coordination::ReportedHealth::Degraded,
    )
    .await
    .unwrap();
    within("seen", registry.wait_for(|a| a.len() == 1)).await;
    assert_eq!(registry.agent("tired").unwrap().health, Health::Degraded);
    assert_eq!(registry.find("work").len(), 1);
    presence.stop().await;
}
