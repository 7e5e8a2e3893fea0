//! `agentbus agents`, `agentbus tasks` and `agentbus workflow status <id>`: the
//! coordination layer as seen from any process on the same backend.
//!
//! `agents` holds a live registry for `--wait` (heartbeats of the last minute are read
//! back where the backend keeps them); `tasks` folds `_sys.tasks.events`; `workflow
//! status` folds `_sys.workflows.<id>`. With `--backend memory` each command runs on
//! its own empty in-process bus, so they show nothing there; they are meant for
//! shared backends.

use std::time::Duration;

use agentbus::coordination::{
    read_tasks, read_workflow, AgentRecord, AgentRegistry, RegistryOptions, TaskSummary,
    WorkflowStatus,
};
use agentbus::Bus;
use serde_json::json;

use crate::commands::parse_duration;
use crate::{backend, output, Global};

/// `agentbus agents`.
#[derive(Debug, clap::Args)]
pub(crate) struct AgentsArgs {
    /// How long to listen for heartbeats before printing.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub(crate) wait: Duration,
    /// Only agents with this capability.
    #[arg(long)]
    pub(crate) capability: Option<String>,
}

/// `agentbus tasks`.
#[derive(Debug, clap::Args)]
pub(crate) struct TasksArgs {
    /// Only tasks in this status (pending, assigned, running, completed, failed,
    /// timed_out, escalated).
    #[arg(long, value_parser = parse_status)]
    pub(crate) status: Option<agentbus::coordination::TaskStatus>,
    /// At most this many, the most recent.
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: usize,
}

/// `agentbus workflow …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum WorkflowCommand {
    /// A workflow's state and per-step status and timings.
    Status {
        /// The workflow id (`wf-…`).
        id: String,
    },
}

fn parse_status(text: &str) -> Result<agentbus::coordination::TaskStatus, String> {
    serde_json::from_value(json!(text.trim().to_ascii_lowercase())).map_err(|_| {
        format!(
            "invalid status '{text}': use pending, assigned, running, completed, failed, \
             timed_out or escalated"
        )
    })
}

/// The registry view as a table.
pub(crate) fn render_agents(agents: &[AgentRecord], now: chrono::DateTime<chrono::Utc>) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                output::safe(a.id()).into_owned(),
                output::safe(&a.descriptor.name).into_owned(),
                output::safe(&a.descriptor.capabilities.join(",")).into_owned(),
                a.health.as_str().to_string(),
                format!("{}/{}", a.load.in_flight, a.load.capacity),
                a.load.queue_depth.to_string(),
                format!("{}ms", (now - a.last_seen).num_milliseconds().max(0)),
            ]
        })
        .collect();
    output::table(
        &[
            "AGENT",
            "NAME",
            "CAPABILITIES",
            "HEALTH",
            "IN-FLIGHT",
            "QUEUED",
            "LAST SEEN",
        ],
        &rows,
    )
}

/// Runs `agentbus agents`.
pub(crate) async fn agents(global: &Global, args: AgentsArgs) -> anyhow::Result<()> {
    let transport = backend::open(&global.backend).await?;
    let bus = Bus::new(transport);
    let registry = AgentRegistry::start(&bus, RegistryOptions::default()).await?;
    tokio::time::sleep(args.wait).await;
    registry.check_now().await;
    let mut agents = registry.agents();
    if let Some(capability) = &args.capability {
        agents.retain(|a| a.has_capability(capability));
    }
    if global.json {
        let list: Vec<serde_json::Value> = agents
            .iter()
            .map(|a| {
                json!({
                    "id": a.id(),
                    "name": a.descriptor.name,
                    "version": a.descriptor.version,
                    "capabilities": a.descriptor.capabilities,
                    "labels": a.descriptor.labels,
                    "health": a.health,
                    "load": a.load,
                    "last_seen": a.last_seen,
                    "heartbeat_ms": a.interval_ms,
                })
            })
            .collect();
        output::json_line(&json!({ "backend": bus.transport().name(), "agents": list }))
    } else {
        output::line(render_agents(&agents, bus.clock().now()))
    }
}

/// Task summaries as a table.
pub(crate) fn render_tasks(tasks: &[TaskSummary]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                output::safe(&t.task_id).into_owned(),
                t.status.as_str().to_string(),
                output::safe(t.agent.as_deref().unwrap_or("-")).into_owned(),
                t.attempts.to_string(),
                t.updated_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                output::safe(&t.detail).into_owned(),
            ]
        })
        .collect();
    output::table(
        &["TASK", "STATUS", "AGENT", "ATTEMPTS", "UPDATED", "DETAIL"],
        &rows,
    )
}

/// Runs `agentbus tasks`.
pub(crate) async fn tasks(global: &Global, args: TasksArgs) -> anyhow::Result<()> {
    let transport = backend::open(&global.backend).await?;
    let bus = Bus::new(transport);
    let mut tasks = read_tasks(&bus).await?;
    if let Some(status) = args.status {
        tasks.retain(|t| t.status == status);
    }
    let skip = tasks.len().saturating_sub(args.limit);
    let tasks = &tasks[skip..];
    if global.json {
        output::json_line(&json!({ "backend": bus.transport().name(), "tasks": tasks }))
    } else {
        output::line(render_tasks(tasks))
    }
}

/// A workflow's status as text.
pub(crate) fn render_workflow(status: &WorkflowStatus) -> String {
    let mut lines = vec![
        format!(
            "workflow {} ({}): {}",
            output::safe(&status.id),
            output::safe(&status.name),
            status.state.as_str()
        ),
        format!(
            "started {}{}",
            status
                .started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            status.finished_at.map_or(String::new(), |end| format!(
                ", finished after {} ms",
                (end - status.started_at).num_milliseconds().max(0)
            ))
        ),
    ];
    if let Some(error) = &status.error {
        lines.push(format!("error: {}", output::safe(error)));
    }
    lines.push(String::new());
    let rows: Vec<Vec<String>> = status
        .steps
        .iter()
        .map(|s| {
            vec![
                output::safe(&s.id).into_owned(),
                serde_json::to_value(s.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                output::safe(s.agent.as_deref().unwrap_or("-")).into_owned(),
                s.attempts.to_string(),
                s.duration_ms.map_or("-".into(), |d| d.to_string()),
                output::safe(s.error.as_deref().unwrap_or("")).into_owned(),
            ]
        })
        .collect();
    lines.push(output::table(
        &["STEP", "STATE", "AGENT", "ATTEMPTS", "MS", "ERROR"],
        &rows,
    ));
    if !status.compensations.is_empty() {
        lines.push(String::new());
        let rows: Vec<Vec<String>> = status
            .compensations
            .iter()
            .map(|c| {
                vec![
                    output::safe(&c.step).into_owned(),
                    c.state.clone(),
                    output::safe(c.error.as_deref().unwrap_or("")).into_owned(),
                ]
            })
            .collect();
        lines.push(output::table(&["COMPENSATED", "STATE", "ERROR"], &rows));
    }
    lines.join("\n")
}

/// Runs `agentbus workflow …`.
pub(crate) async fn workflow(global: &Global, command: WorkflowCommand) -> anyhow::Result<()> {
    match command {
        WorkflowCommand::Status { id } => {
            let transport = backend::open(&global.backend).await?;
            let bus = Bus::new(transport);
            let status = read_workflow(&bus, &id).await?;
            if global.json {
                output::json_line(&status)
            } else {
                output::line(render_workflow(&status))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbus::coordination::{
        Input, StepSpec, Supervisor, SupervisorOptions, TaskSpec, Worker, WorkflowSpec,
    };
    use agentbus::AgentDescriptor;

    #[test]
    fn statuses_parse_with_a_helpful_error() {
        assert_eq!(
            parse_status("Timed_Out").unwrap(),
            agentbus::coordination::TaskStatus::TimedOut
        );
        assert!(parse_status("done").unwrap_err().contains("escalated"));
    }

    /// The renderers on a real supervisor's data (one process, one bus).
    #[tokio::test]
    async fn views_of_a_live_bus() {
        let bus = Bus::memory();
        let sup = Supervisor::start(&bus, SupervisorOptions::default())
            .await
            .unwrap();
        let worker = Worker::builder(AgentDescriptor::new("upper-1", "upper").capability("upper"))
            .concurrency(2)
            .handle(|task| async move {
                Ok(json!(task.input["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_uppercase()))
            })
            .spawn(&bus)
            .await
            .unwrap();
        sup.registry().wait_for(|a| a.len() == 1).await;
        let text = render_agents(&sup.registry().agents(), bus.clock().now());
        assert!(text.contains("upper-1"), "{text}");
        assert!(text.contains("healthy"), "{text}");
        assert!(text.contains("0/2"), "{text}");

        let outcome = sup
            .submit(
                TaskSpec::capability("upper")
                    .input(json!({"text": "hi"}))
                    .id("t-upper"),
            )
            .await
            .unwrap()
            .wait()
            .await;
        assert_eq!(outcome.output, Some(json!("HI")));
        let tasks = read_tasks(&bus).await.unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].task_id, "t-upper");
        assert_eq!(tasks[0].agent.as_deref(), Some("upper-1"));
        let text = render_tasks(&tasks);
        assert!(
            text.contains("t-upper") && text.contains("completed"),
            "{text}"
        );

        let spec = WorkflowSpec::new("shout")
            .id("wf-shout")
            .step(StepSpec::capability("a", "upper").input("text", Input::workflow("/text")))
            .step(StepSpec::capability("b", "upper").input("text", Input::step("a", "")));
        sup.start_workflow(spec, json!({"text": "x"}))
            .await
            .unwrap()
            .wait()
            .await;
        let status = read_workflow(&bus, "wf-shout").await.unwrap();
        let text = render_workflow(&status);
        assert!(
            text.starts_with("workflow wf-shout (shout): completed"),
            "{text}"
        );
        assert!(text.contains("upper-1"), "{text}");
        worker.stop(Duration::from_secs(1)).await;
        sup.shutdown();
    }
}
