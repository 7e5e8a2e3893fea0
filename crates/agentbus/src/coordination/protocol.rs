//! The messages the coordination layer sends on the bus, and its channel names.
//!
//! Everything here is a wire format: fields are only added (with serde defaults),
//! never renamed. Times are RFC 3339 strings, durations are milliseconds.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::AgentDescriptor;
use crate::channel::ChannelName;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

/// Heartbeats (and announcements) of every agent.
pub const AGENTS_HEARTBEAT: &str = "_sys.agents.heartbeat";
/// The first heartbeat of an agent instance.
pub const AGENTS_ANNOUNCE: &str = "_sys.agents.announce";
/// An agent leaving cleanly.
pub const AGENTS_GOODBYE: &str = "_sys.agents.goodbye";
/// Health transitions the registry observed (healthy → unhealthy → dead…).
pub const AGENTS_EVENTS: &str = "_sys.agents.events";
/// Every task status change, for `agentbus tasks` and audit.
pub const TASK_EVENTS: &str = "_sys.tasks.events";
/// Tasks whose escalation ran out are dead-lettered from this channel.
pub const TASKS_ESCALATED: &str = "_sys.tasks.escalated";
/// Timeout notices for manual handling (seed 000's `channel.system.timeout`).
pub const SYSTEM_TIMEOUT: &str = "channel.system.timeout";
/// Coordination broadcasts from supervisors to every agent.
pub const COORDINATION_BROADCAST: &str = "_sys.coord.broadcast";
/// Prefix of the per-workflow event channels, `_sys.workflows.<id>`.
pub const WORKFLOWS_PREFIX: &str = "_sys.workflows";

/// The channel on which agent `agent_id` receives its tasks.
///
/// # Errors
/// [`ErrorKind::InvalidChannel`] when the id is not a single channel token.
pub fn agent_task_channel(agent_id: &str) -> Result<ChannelName> {
    token_channel("_sys.tasks.agent", agent_id, "agent id")
}

/// The channel on which supervisor `supervisor_id` receives task reports.
///
/// # Errors
/// [`ErrorKind::InvalidChannel`] when the id is not a single channel token.
pub fn supervisor_report_channel(supervisor_id: &str) -> Result<ChannelName> {
    token_channel("_sys.tasks.reports", supervisor_id, "supervisor id")
}

/// The event channel of workflow `workflow_id`.
///
/// # Errors
/// [`ErrorKind::InvalidChannel`] when the id is not a single channel token.
pub fn workflow_channel(workflow_id: &str) -> Result<ChannelName> {
    token_channel(WORKFLOWS_PREFIX, workflow_id, "workflow id")
}

fn token_channel(prefix: &str, token: &str, what: &str) -> Result<ChannelName> {
    let valid = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(Error::new(
            ErrorKind::InvalidChannel,
            format!(
                "{what} '{token}' cannot be used in a channel name: use only [A-Za-z0-9_-], \
                 e.g. 'etl-7'"
            ),
        )
        .with_context(what_key(what), token));
    }
    ChannelName::new(format!("{prefix}.{token}"))
}

fn what_key(what: &str) -> &'static str {
    match what {
        "agent id" => "agent",
        "supervisor id" => "supervisor",
        _ => "workflow",
    }
}

/// How busy an agent says it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentLoad {
    /// Tasks it is working on now.
    pub in_flight: u32,
    /// Tasks received and waiting for a free slot.
    pub queue_depth: u32,
    /// Tasks it works on at once at most.
    pub capacity: u32,
}

impl AgentLoad {
    /// `in_flight + queue_depth`.
    pub fn total(&self) -> u32 {
        self.in_flight.saturating_add(self.queue_depth)
    }
}

/// What an agent says about itself in a heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportedHealth {
    /// Working normally.
    #[default]
    Healthy,
    /// Working, but struggling (the agent decides: errors, a slow dependency…);
    /// selection prefers healthy agents.
    Degraded,
}

/// An agent's heartbeat: who it is, how busy and how well. Sent on
/// [`AGENTS_ANNOUNCE`] once at start and on [`AGENTS_HEARTBEAT`] every interval;
/// each carries the whole descriptor, so one heartbeat is enough for a new registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentHeartbeat {
    /// The agent's descriptor.
    #[schemars(with = "serde_json::Value")]
    pub descriptor: AgentDescriptor,
    /// Its load.
    pub load: AgentLoad,
    /// Its own view of its health.
    pub health: ReportedHealth,
    /// How often it heartbeats, in milliseconds: the registry's clock for it.
    pub interval_ms: u64,
    /// Heartbeat number of this instance (1 = the announcement).
    pub sequence: u64,
    /// When it was sent.
    #[schemars(with = "String")]
    pub at: DateTime<Utc>,
}

impl Message for AgentHeartbeat {
    const KIND: &'static str = "agentbus.agent.heartbeat";
}

/// An agent leaving cleanly: the registry removes it at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentGoodbye {
    /// The agent id.
    pub agent_id: String,
    /// When.
    #[schemars(with = "String")]
    pub at: DateTime<Utc>,
}

impl Message for AgentGoodbye {
    const KIND: &'static str = "agentbus.agent.goodbye";
}

/// An agent's health as the registry sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Heartbeating, and says it is healthy.
    Healthy,
    /// Heartbeating, but says it is degraded.
    Degraded,
    /// Missed heartbeats: no new work; its unfinished tasks are redistributed.
    Unhealthy,
    /// Missed heartbeats for long enough, or said goodbye: gone from the view.
    Dead,
}

impl Health {
    /// `healthy`, `degraded`, `unhealthy` or `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unhealthy => "unhealthy",
            Health::Dead => "dead",
        }
    }

    /// Whether new work may go to an agent in this state.
    pub fn is_available(self) -> bool {
        matches!(self, Health::Healthy | Health::Degraded)
    }
}

/// A health transition, published on [`AGENTS_EVENTS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentEvent {
    /// The agent.
    pub agent_id: String,
    /// The state before (`None` for a newly seen agent).
    pub from: Option<Health>,
    /// The state now.
    pub to: Health,
    /// Why: "announced", "missed 3 heartbeats", "said goodbye"…
    pub reason: String,
    /// When the registry saw it.
    #[schemars(with = "String")]
    pub at: DateTime<Utc>,
}

impl Message for AgentEvent {
    const KIND: &'static str = "agentbus.agent.event";
}

/// A task sent to one agent, on [`agent_task_channel`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskAssignment {
    /// The task id (also the envelope's correlation id).
    pub task_id: String,
    /// Attempt number of this assignment (1-based, over every agent tried).
    pub attempt: u32,
    /// The capability asked for, if the task targets one.
    pub capability: Option<String>,
    /// The task's input.
    pub input: serde_json::Value,
    /// How long the supervisor waits before it counts the attempt as timed out.
    pub timeout_ms: u64,
    /// Where to send reports (the supervisor's report channel).
    pub report_to: String,
    /// The workflow and step this task runs, if any.
    pub workflow: Option<WorkflowRef>,
}

impl Message for TaskAssignment {
    const KIND: &'static str = "agentbus.task.assignment";
}

/// Which workflow step a task belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowRef {
    /// The workflow id.
    pub workflow_id: String,
    /// The step id.
    pub step: String,
}

/// What a worker says about a task attempt, sent to the supervisor's report channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskReport {
    /// The task id.
    pub task_id: String,
    /// The attempt reported on.
    pub attempt: u32,
    /// The reporting agent.
    pub agent_id: String,
    /// What happened.
    pub outcome: ReportOutcome,
    /// How long the handler ran, in milliseconds (0 for `started`).
    pub duration_ms: u64,
    /// When.
    #[schemars(with = "String")]
    pub at: DateTime<Utc>,
}

impl Message for TaskReport {
    const KIND: &'static str = "agentbus.task.report";
}

/// The outcome in a [`TaskReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum ReportOutcome {
    /// The agent started working on it.
    Started,
    /// Done, with the output.
    Completed {
        /// The output.
        output: serde_json::Value,
    },
    /// Failed.
    Failed {
        /// What went wrong.
        error: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

/// The status of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Accepted, not yet assigned (waiting for an agent).
    Pending,
    /// Sent to an agent.
    Assigned,
    /// The agent reported it started.
    Running,
    /// Finished with an output.
    Completed,
    /// Finished with an error after every allowed attempt.
    Failed,
    /// An attempt timed out (the task goes on: retried or escalated).
    TimedOut,
    /// Every attempt timed out: dead-lettered and announced on `channel.system.timeout`.
    Escalated,
}

impl TaskStatus {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Assigned => "assigned",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Escalated => "escalated",
        }
    }

    /// Whether the task is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Escalated
        )
    }
}

/// A task status change, published on [`TASK_EVENTS`] (and kept in the task's history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskEvent {
    /// The task id.
    pub task_id: String,
    /// The new status.
    pub status: TaskStatus,
    /// The agent involved, if any.
    pub agent_id: Option<String>,
    /// The attempt number.
    pub attempt: u32,
    /// Details: the error, why it was redistributed…
    pub detail: String,
    /// The supervisor that recorded it.
    pub supervisor: String,
    /// When.
    #[schemars(with = "String")]
    pub at: DateTime<Utc>,
}

impl Message for TaskEvent {
    const KIND: &'static str = "agentbus.task.event";
}

/// A task that timed out on every agent tried, for manual handling; published on
/// [`SYSTEM_TIMEOUT`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TimeoutNotice {
    /// The task id.
    pub task_id: String,
    /// The agents tried, in order (one entry per attempt).
    pub agents_tried: Vec<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The capability asked for, if any.
    pub capability: Option<String>,
    /// The task's input, so an operator can act on it.
    pub input: serde_json::Value,
    /// Why it was escalated.
    pub reason: String,
    /// When.
    #[schemars(with = "String")]
    pub at: DateTime<Utc>,
}

impl Message for TimeoutNotice {
    const KIND: &'static str = "agentbus.task.timeout";
}

/// A coordination message broadcast to every agent (seed 003's communication hub).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CoordinationMessage {
    /// What it is about: `pause`, `resume`, `config`, `drain`… (free text).
    pub topic: String,
    /// Details.
    pub body: serde_json::Value,
    /// Free labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Message for CoordinationMessage {
    const KIND: &'static str = "agentbus.coordination";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_builders_validate_the_token() {
        assert_eq!(
            agent_task_channel("transform-1").unwrap().as_str(),
            "_sys.tasks.agent.transform-1"
        );
        let error = agent_task_channel("a.b").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidChannel);
        assert!(error.to_string().contains("agent id 'a.b'"), "{error}");
        assert!(workflow_channel("").is_err());
        assert_eq!(
            workflow_channel("wf-1").unwrap().as_str(),
            "_sys.workflows.wf-1"
        );
    }
}
