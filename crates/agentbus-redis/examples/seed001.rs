//! Seed 001 (a Redis-backed agent communication system) on agentbus's own API:
//! send / get messages / mark processed, task assignment by capability with workers
//! sharing the work, broadcast, queue and coordination stats, and health.
//!
//! ```text
//! cargo run -p agentbus-redis --example seed001 -- [redis://127.0.0.1:6379]
//! ```
//!
//! Everything lives under a fresh key prefix, deleted at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    Bus, ChannelName, ChannelPattern, Message, Priority, PublishOptions, StartPosition,
    SubscribeOptions, Transport,
};
use agentbus_redis::{RedisOptions, RedisTransport};
use serde::{Deserialize, Serialize};

/// A direct message between agents (the seed's `AgentMessage` content).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Note {
    text: String,
}

impl Message for Note {
    const KIND: &'static str = "seed001.note";
}

/// A task for whichever agent has the capability (the seed's `assign_task`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct TaskAssignment {
    task_id: String,
    task_type: String,
    description: String,
    parameters: BTreeMap<String, String>,
}

impl Message for TaskAssignment {
    const KIND: &'static str = "seed001.task_assignment";
}

/// A worker's answer.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct TaskResult {
    task_id: String,
    agent_id: String,
    success: bool,
    output: String,
}

impl Message for TaskResult {
    const KIND: &'static str = "seed001.task_result";
}

/// A coordination broadcast every agent sees.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct Coordination {
    instruction: String,
}

impl Message for Coordination {
    const KIND: &'static str = "seed001.coordination";
}

fn inbox(agent: &str) -> agentbus::Result<ChannelName> {
    ChannelName::new(format!("agents.{agent}.inbox"))
}

/// A worker with a capability: takes tasks from its capability's shared group,
/// answers on the supervisor's result channel, marks the task processed.
async fn worker(bus: Bus, agent_id: String, capability: &'static str) -> agentbus::Result<()> {
    let tasks = ChannelName::new(format!("tasks.{capability}"))?;
    let mut subscription = bus
        .subscribe_typed::<TaskAssignment>(
            SubscribeOptions::new(ChannelPattern::from(tasks))
                .group(format!("workers-{capability}"))
                .start(StartPosition::Earliest),
        )
        .await?;
    let results = ChannelName::new("supervisor.results")?;
    loop {
        let task = subscription.next().await?;
        let success = !task.message.description.contains("impossible");
        let result = TaskResult {
            task_id: task.message.task_id.clone(),
            agent_id: agent_id.clone(),
            success,
            output: format!("{} done by {agent_id}", task.message.task_type),
        };
        bus.publish_with(
            &results,
            &result,
            &PublishOptions::new().sender(agent_id.clone()),
        )
        .await?;
        task.delivery.ack().await?; // mark processed
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let prefix = format!("seed001-{:08x}", fastrand::u32(..));
    let redis = RedisTransport::connect(&url, RedisOptions::default().prefix(&prefix)).await?;
    let transport: Arc<dyn Transport> = Arc::new(redis.clone());
    let bus = Bus::new(transport.clone());
    let started = Instant::now();

    // Health: the seed's health_check, plus what a receipt is worth on this server.
    let health = redis.health().await;
    println!(
        "health: redis up = {}, round trip {:?}",
        health.up, health.latency
    );
    println!("durability: {}", transport.durability().await?.guarantee);

    // send_message / get_messages / mark_processed
    for (n, priority) in [
        (1, Priority::Low),
        (2, Priority::Critical),
        (3, Priority::Normal),
    ] {
        bus.publish_with(
            &inbox("analyst")?,
            &Note {
                text: format!("note {n}"),
            },
            &PublishOptions::new()
                .sender("coordinator")
                .priority(priority),
        )
        .await?;
    }
    let mut analyst = bus
        .subscribe(
            SubscribeOptions::new(ChannelPattern::from(inbox("analyst")?))
                .group("inbox-analyst")
                .start(StartPosition::Earliest),
        )
        .await?;
    let messages = analyst.next_batch(10).await?; // get_messages(agent_id, limit = 10)
    for delivery in &messages {
        let note: Note = delivery.envelope().decode_json()?;
        println!(
            "analyst got '{}' (priority {}) from {}",
            note.text,
            delivery.envelope().header.priority,
            delivery.envelope().header.sender.as_deref().unwrap_or("?")
        );
        delivery.ack().await?; // mark_processed
    }

    // Workers by capability; the supervisor assigns tasks and collects results.
    let mut workers = Vec::new();
    for (agent, capability) in [
        ("python-1", "python"),
        ("python-2", "python"),
        ("docs-1", "docs"),
    ] {
        workers.push(tokio::spawn(worker(bus.clone(), agent.into(), capability)));
    }
    let mut results = bus
        .subscribe_typed::<TaskResult>(
            SubscribeOptions::new(ChannelPattern::new("supervisor.results")?)
                .group("supervisor")
                .start(StartPosition::Earliest),
        )
        .await?;
    let tasks = [
        ("python", "write the parser"),
        ("python", "write the tests"),
        ("docs", "write the README"),
        ("python", "an impossible task"),
        ("python", "profile the hot path"),
    ];
    for (i, (capability, description)) in tasks.iter().enumerate() {
        let task = TaskAssignment {
            task_id: format!("task-{i}"),
            task_type: format!("{capability}_work"),
            description: description.to_string(),
            parameters: BTreeMap::new(),
        };
        bus.publish_with(
            &ChannelName::new(format!("tasks.{capability}"))?,
            &task,
            &PublishOptions::new()
                .sender("supervisor")
                .priority(Priority::High),
        )
        .await?;
    }
    let mut per_agent: BTreeMap<String, u32> = BTreeMap::new();
    let (mut completed, mut failed) = (0, 0);
    while completed + failed < tasks.len() {
        let result = tokio::time::timeout(Duration::from_secs(10), results.next()).await??;
        *per_agent
            .entry(result.message.agent_id.clone())
            .or_default() += 1;
        if result.message.success {
            completed += 1;
        } else {
            failed += 1;
        }
        result.delivery.ack().await?;
    }

    // broadcast_message: every agent has its own (private) group, so all get it.
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(
            bus.subscribe(SubscribeOptions::new(ChannelPattern::new(
                "broadcast.coordination",
            )?))
            .await?,
        );
    }
    let receipt = bus
        .publish(
            &ChannelName::new("broadcast.coordination")?,
            &Coordination {
                instruction: "pause new work".into(),
            },
        )
        .await?;
    for listener in &mut listeners {
        listener.next().await?.ack().await?;
    }
    println!(
        "broadcast reached {} subscribers (receipt: {} groups)",
        listeners.len(),
        receipt.groups
    );

    // get_queue_stats / get_coordination_stats
    let stats = transport.stats().await?;
    let published: u64 = stats.channels.iter().map(|c| c.published).sum();
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    println!("queue stats:");
    for channel in &stats.channels {
        println!(
            "  {:<28} {:>3} stored  {:>3} published",
            channel.channel.as_str(),
            channel.messages,
            channel.published
        );
    }
    for group in &stats.groups {
        println!(
            "  group {:<34} pending {:>2}  in flight {:>2}  acked {:>2}",
            group.group, group.pending, group.in_flight, group.acked
        );
    }
    println!(
        "  messages per minute: {:.0}; dead letters: {}",
        published as f64 / minutes.max(1e-9),
        stats.dead_letters
    );
    println!(
        "coordination stats: assigned {}, completed {completed}, failed {failed}, completion rate \
         {:.0} %, per agent {per_agent:?}",
        tasks.len(),
        100.0 * completed as f64 / tasks.len() as f64
    );

    for w in workers {
        w.abort();
    }
    drop(listeners);
    drop(analyst);
    drop(results);
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.delete_everything().await?;
    Ok(())
}
