//! The coordination layer (DESIGN §6): agent registry, supervisor, escalation,
//! circuit breakers and DAG workflows, on any [`Transport`](crate::Transport).
//!
//! Everything goes through the bus, on reserved `_sys.*` channels:
//!
//! | channel                       | what                                              |
//! |-------------------------------|---------------------------------------------------|
//! | `_sys.agents.announce`        | an agent's first heartbeat                        |
//! | `_sys.agents.heartbeat`       | heartbeats: descriptor, load, health              |
//! | `_sys.agents.goodbye`         | an agent leaving cleanly                          |
//! | `_sys.agents.events`          | health transitions seen by a supervisor's registry|
//! | `_sys.tasks.agent.<id>`       | tasks assigned to agent `<id>`                    |
//! | `_sys.tasks.reports.<sup>`    | workers' reports to supervisor `<sup>`            |
//! | `_sys.tasks.events`           | every task status change                          |
//! | `_sys.tasks.escalated`        | escalated tasks, dead-lettered from here          |
//! | `channel.system.timeout`      | timeout notices for manual handling (seed 000)    |
//! | `_sys.coord.broadcast`        | coordination broadcasts                           |
//! | `_sys.workflows.<id>`         | a workflow's events (its event-sourced state)     |
//!
//! - [`AgentRegistry`]: the live view; [`Presence`] heartbeats for an agent.
//! - [`Worker`]: an agent that takes supervised tasks.
//! - [`Supervisor`]: assignment, tracking, escalation, breakers, redistribution,
//!   workflows.
//! - [`WorkflowSpec`]: the DAG definition; [`read_workflow`] folds a workflow's
//!   events from any process.
//!
//! The design decisions are written down in `docs/COORDINATION.md`.

mod breaker;
mod history;
mod protocol;
mod registry;
mod supervisor;
mod worker;
mod workflow;

pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker};
pub use history::{fold_tasks, read_tasks, TaskSummary};
pub use protocol::{
    agent_task_channel, supervisor_report_channel, workflow_channel, AgentEvent, AgentGoodbye,
    AgentHeartbeat, AgentLoad, CoordinationMessage, Health, ReportOutcome, ReportedHealth,
    TaskAssignment, TaskEvent, TaskReport, TaskStatus, TimeoutNotice, WorkflowRef, AGENTS_ANNOUNCE,
    AGENTS_EVENTS, AGENTS_GOODBYE, AGENTS_HEARTBEAT, COORDINATION_BROADCAST, SYSTEM_TIMEOUT,
    TASKS_ESCALATED, TASK_EVENTS, WORKFLOWS_PREFIX,
};
pub use registry::{
    AgentHistory, AgentRecord, AgentRegistry, Presence, RegistryOptions, Selector, Strategy,
    EWMA_ALPHA,
};
pub use supervisor::{
    AgentStats, Supervisor, SupervisorOptions, SupervisorStats, Target, TaskHandle, TaskOutcome,
    TaskRecord, TaskSpec,
};
pub use worker::{TaskError, TaskRequest, Worker, WorkerBuilder};
pub use workflow::{
    fold_workflow, read_workflow, CompensationRecord, CompensationSpec, FailurePolicy, Input,
    StepSpec, StepState, StepStatus, WorkflowEvent, WorkflowHandle, WorkflowRecord, WorkflowSpec,
    WorkflowState, WorkflowStatus,
};
