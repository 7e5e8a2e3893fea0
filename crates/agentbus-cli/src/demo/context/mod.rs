//! `agentbus demo context`: seed 004's peer context retrieval, end to end.
//!
//! A planner agent works with several peers (it assigns them tasks; they handle them
//! and report back), and every peer keeps its own interaction history in a SQLite
//! store of its own. Then the planner is taken to have failed: a reconstructor
//! broadcasts a `context.request` about it, the peers answer from their stores, one
//! of them too slowly, and the reconstructor merges what came back within the timeout
//! and shows who answered and who timed out. `--json` prints one object with
//! `responders`, `timed_out` and `items`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{Agent, AgentDescriptor, ChannelName, Context, Message, PublishOptions};
use agentbus_observe::context::{request_context, AgentHistory, ContextRequest, ContextService};
use agentbus_observe::store::InteractionStore;
use serde::{Deserialize, Serialize};

use crate::{output, CliError};

/// Peer names, in order; `--peers N` takes the first N.
const PEERS: &[&str] = &[
    "product-agent-1",
    "marketing-agent-1",
    "sales-agent-1",
    "support-agent-1",
    "pricing-agent-1",
    "logistics-agent-1",
    "finance-agent-1",
    "legal-agent-1",
];

/// The agent whose state is reconstructed.
const PLANNER: &str = "planner-1";
/// Who asks.
const RECONSTRUCTOR: &str = "reconstructor-1";

/// `agentbus demo context [--peers N] [--slow N] [--tasks N] [--timeout D] [--thread T]`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "agentbus demo context",
    about = "Seed 004's peer context retrieval: peers keep their interaction history, a \
             reconstructor broadcasts a context request about a failed agent, peers reply \
             from their stores within a timeout, and the replies are merged"
)]
struct ContextArgs {
    /// How many peers (1-8).
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// How many of them answer too late (the last ones).
    #[arg(long, default_value_t = 1)]
    slow: usize,
    /// Tasks the planner gives each peer before it fails.
    #[arg(long, default_value_t = 3)]
    tasks: usize,
    /// How long the reconstructor waits for replies.
    #[arg(long, default_value = "500ms", value_parser = crate::commands::parse_positive_duration)]
    timeout: Duration,
    /// Ask only about this thread (`thread-1`, `thread-2`, …).
    #[arg(long, value_name = "T")]
    thread: Option<String>,
    /// Keep the peers' stores in DIR (one `<peer>.db` each) instead of a temporary
    /// directory; read them with `agentbus log --store DIR/<peer>.db`.
    #[arg(long, value_name = "DIR")]
    store_dir: Option<PathBuf>,
    /// Metrics endpoint, interaction store, audit files, OTLP export, UEBA.
    #[command(flatten)]
    observe: crate::commands::observe::ObserveArgs,
}

/// A task the planner gives a peer.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct TaskAssign {
    task: String,
    detail: String,
}
impl Message for TaskAssign {
    const KIND: &'static str = "task.assign";
}

/// A peer's report back to the planner.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
struct TaskDone {
    task: String,
    result: String,
}
impl Message for TaskDone {
    const KIND: &'static str = "task.done";
}

/// The demo's result; `--json` prints it as one object.
#[derive(Debug, Serialize)]
pub(crate) struct ContextDemoReport {
    target_agent: String,
    requester: String,
    timeout_ms: u128,
    waited_ms: u128,
    responders: Vec<String>,
    timed_out: Vec<String>,
    items_per_responder: Vec<(String, usize)>,
    items: Vec<agentbus_observe::context::ContextItem>,
    history_rows: Vec<(String, u64)>,
}

/// Parses the demo's arguments, runs it and prints the report.
///
/// # Errors
/// Usage errors (exit 2); store or bus errors.
pub(crate) async fn run_cli(args: &[String], global: &crate::Global) -> anyhow::Result<()> {
    use clap::Parser as _;
    let parsed = match ContextArgs::try_parse_from(
        std::iter::once("context".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(parsed) => parsed,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            return output::line(e.to_string().trim_end());
        }
        Err(e) => {
            let first = e.to_string();
            let first = first
                .lines()
                .next()
                .unwrap_or("bad arguments")
                .trim_start_matches("error: ");
            return Err(CliError::usage(first.to_string()).into());
        }
    };
    if !(1..=PEERS.len()).contains(&parsed.peers) {
        return Err(CliError::usage(format!("--peers must be 1 to {}", PEERS.len())).into());
    }
    if parsed.slow > parsed.peers {
        return Err(CliError::usage("--slow cannot be more than --peers").into());
    }
    let (report, observing) = run(&parsed, global).await?;
    let printed = if global.json {
        output::json_line(&report)
    } else {
        output::line(render(&report))
    };
    observing.finish().await;
    printed
}

async fn run(
    args: &ContextArgs,
    global: &crate::Global,
) -> anyhow::Result<(ContextDemoReport, crate::commands::observe::Observing)> {
    let temp;
    let dir = match &args.store_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let peers: Vec<String> = PEERS[..args.peers].iter().map(|p| p.to_string()).collect();
    let mut stores = Vec::new();
    for peer in &peers {
        let path = dir.join(format!("{peer}.db"));
        // A fresh history per run.
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        stores.push(Arc::new(InteractionStore::open(&path)?));
    }
    let transport = crate::backend::open(&global.backend).await?;
    let histories: Vec<Arc<dyn agentbus::BusObserver>> = peers
        .iter()
        .zip(&stores)
        .map(|(peer, store)| {
            Arc::new(AgentHistory::new(peer.clone(), store.clone()))
                as Arc<dyn agentbus::BusObserver>
        })
        .collect();
    let (bus, observing) = args.observe.bus_with(transport, histories).await?;

    // Phase 1: the planner works with its peers; each peer's store records it.
    let mut workers = Vec::new();
    for peer in &peers {
        workers.push(worker(&bus, peer).await?);
    }
    let planner = Context::new(
        bus.clone(),
        AgentDescriptor::new(PLANNER, PLANNER).sends::<TaskAssign>(),
    );
    for round in 0..args.tasks {
        for peer in &peers {
            let mut options = PublishOptions::new().correlation(format!("thread-{}", round + 1));
            options.receiver = Some(peer.clone());
            let task = TaskAssign {
                task: format!("task-{}-{peer}", round + 1),
                detail: format!("round {} of the launch plan", round + 1),
            };
            planner
                .send_with(&ChannelName::new(format!("work.{peer}"))?, &task, options)
                .await?;
        }
    }
    // Every task handled (each peer acks the task and sends one report back).
    let expected = (args.tasks * peers.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for store in &stores {
            store.flush()?;
        }
        let done: u64 = stores
            .iter()
            .map(|s| {
                s.query(
                    &agentbus_observe::store::Query::new()
                        .kind("task.done")
                        .events(["published"]),
                )
                .map_or(0, |r| r.len() as u64)
            })
            .sum();
        if done >= expected {
            break;
        }
        if Instant::now() > deadline {
            return Err(CliError::failed(format!(
                "the peers handled {done} of {expected} tasks within 10 s; the bus may be overloaded"
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for worker in workers {
        worker.shutdown(Duration::from_secs(1)).await;
    }

    // Phase 2: the planner "fails"; its peers run context services.
    let mut services = Vec::new();
    for (i, (peer, store)) in peers.iter().zip(&stores).enumerate() {
        let slow = i >= peers.len() - args.slow;
        let delay = if slow {
            args.timeout * 3
        } else {
            Duration::ZERO
        };
        services.push(ContextService::spawn(&bus, peer, store.clone(), delay).await?);
    }
    let request = ContextRequest {
        requester: RECONSTRUCTOR.into(),
        target_agent: PLANNER.into(),
        thread_id: args.thread.clone(),
        window_seconds: Some(3600),
        limit: Some(100),
    };
    let started = Instant::now();
    let result = request_context(&bus, &request, &peers, args.timeout).await?;
    let waited = started.elapsed();
    for service in services {
        service.shutdown(Duration::from_millis(50)).await;
    }
    let history_rows = peers
        .iter()
        .zip(&stores)
        .map(|(p, s)| (p.clone(), s.stats().written))
        .collect();
    let report = ContextDemoReport {
        target_agent: PLANNER.into(),
        requester: RECONSTRUCTOR.into(),
        timeout_ms: args.timeout.as_millis(),
        waited_ms: waited.as_millis(),
        items_per_responder: result
            .responders
            .iter()
            .cloned()
            .zip(result.items_per_responder.iter().copied())
            .collect(),
        responders: result.responders,
        timed_out: result.timed_out,
        items: result.items,
        history_rows,
    };
    Ok((report, observing))
}

/// A peer doing the planner's tasks: acks each and reports back to the planner.
async fn worker(bus: &agentbus::Bus, peer: &str) -> anyhow::Result<Agent> {
    let descriptor = AgentDescriptor::new(peer, peer).sends::<TaskDone>();
    let pattern = format!("work.{peer}");
    Ok(Agent::builder(descriptor)
        .handle(&pattern, move |ctx: Context, task: TaskAssign| async move {
            let done = TaskDone {
                result: format!("{} done by {}", task.task, ctx.agent().id),
                task: task.task,
            };
            let mut options = PublishOptions::new();
            options.receiver = Some(PLANNER.into());
            ctx.send_with(
                &ChannelName::new(format!("work.{PLANNER}.results"))?,
                &done,
                options,
            )
            .await?;
            Ok(())
        })
        .spawn(bus)
        .await?)
}

/// The report for humans.
pub(crate) fn render(report: &ContextDemoReport) -> String {
    let mut lines = vec![
        "agentbus demo context — seed 004's peer context retrieval".to_string(),
        String::new(),
        format!(
            "{} asked {} peers about {} and waited {} ms (timeout {} ms)",
            report.requester,
            report.responders.len() + report.timed_out.len(),
            report.target_agent,
            report.waited_ms,
            report.timeout_ms
        ),
        format!(
            "answered:  {}",
            report
                .items_per_responder
                .iter()
                .map(|(p, n)| format!("{p} ({n} items)"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "timed out: {}",
            if report.timed_out.is_empty() {
                "none".to_string()
            } else {
                report.timed_out.join(", ")
            }
        ),
        String::new(),
        format!("merged context: {} interactions", report.items.len()),
    ];
    let rows: Vec<Vec<String>> = report
        .items
        .iter()
        .map(|i| {
            vec![
                i.at.format("%H:%M:%S%.3f").to_string(),
                i.thread_id.clone().unwrap_or_default(),
                output::safe(i.sender.as_deref().unwrap_or("-")).into_owned(),
                output::safe(i.receiver.as_deref().unwrap_or("-")).into_owned(),
                output::safe(&i.kind).into_owned(),
                i.payload
                    .as_ref()
                    .and_then(|p| p.get("task"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("")
                    .to_string(),
            ]
        })
        .collect();
    lines.push(output::table(
        &["AT", "THREAD", "FROM", "TO", "KIND", "TASK"],
        &rows,
    ));
    lines.join("\n")
}
