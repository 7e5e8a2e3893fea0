//! The supervisor: assigns tasks to agents or capabilities, tracks each task by its
//! id through pending → assigned → running → completed / failed / timed out /
//! escalated, applies the escalation ladder and the circuit breakers, redistributes
//! the unfinished tasks of agents that stop heartbeating, keeps per-agent statistics,
//! and runs workflows (see [`super::workflow`]).
//!
//! Escalation ladder of a task (seed 000's TimeoutHandler): an attempt that fails or
//! times out is retried on the same agent up to `retries` times; then it goes once to
//! the backup target (by default another agent with the same capability); when that is
//! used up too, a task that timed out is *escalated* — dead-lettered from
//! `_sys.tasks.escalated` and announced on `channel.system.timeout` for manual
//! handling — and a task that failed is *failed*. A non-retryable failure fails at once.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;

use super::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
use super::protocol::{
    agent_task_channel, supervisor_report_channel, AgentEvent, CoordinationMessage, Health,
    ReportOutcome, TaskAssignment, TaskEvent, TaskReport, TaskStatus, TimeoutNotice, WorkflowRef,
    COORDINATION_BROADCAST, SYSTEM_TIMEOUT, TASKS_ESCALATED, TASK_EVENTS,
};
use super::registry::{AgentRecord, AgentRegistry, RegistryOptions, Selector, Strategy};
use super::workflow::{WorkflowEntry, WorkflowHandle, WorkflowSpec, WorkflowStatus};
use crate::bus::{Bus, PublishOptions, Subscription};
use crate::channel::{ChannelName, ChannelPattern};
use crate::envelope::{later, DeadReason, Envelope};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::transport::{ChannelConfig, Discard, PublishReceipt, SubscribeOptions};

/// Who should do a task.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// This agent.
    Agent(String),
    /// Any agent with this capability, picked by the strategy.
    Capability(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Agent(id) => write!(f, "agent '{id}'"),
            Target::Capability(c) => write!(f, "capability '{c}'"),
        }
    }
}

/// A task to assign.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use agentbus::coordination::{Target, TaskSpec};
///
/// let spec = TaskSpec::capability("transform")
///     .input(serde_json::json!({ "rows": 10 }))
///     .timeout(Duration::from_secs(5))
///     .retries(1)
///     .backup(Target::Capability("transform-slow".into()));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Use this id (a fresh one otherwise).
    pub id: Option<String>,
    /// Who.
    pub target: Target,
    /// The input.
    pub input: serde_json::Value,
    /// Per-attempt timeout (the supervisor's default otherwise).
    pub timeout: Option<Duration>,
    /// Retries on the same agent after a failure or timeout (the default otherwise).
    pub retries: Option<u32>,
    /// Where to go when the retries are used up; for a capability target, another
    /// agent with the same capability by default.
    pub backup: Option<Target>,
    /// How to pick an agent (the supervisor's default otherwise).
    pub strategy: Option<Strategy>,
    /// The workflow step this task runs.
    pub workflow: Option<WorkflowRef>,
    /// When no agent can take it now, wait (as `pending`) up to the timeout for one
    /// to become available instead of failing with `NoAgentFound`. Workflow steps do.
    #[serde(default)]
    pub wait_for_agent: bool,
}

impl TaskSpec {
    /// A task for any agent with `capability`.
    pub fn capability(capability: impl Into<String>) -> Self {
        Self::to(Target::Capability(capability.into()))
    }

    /// A task for agent `id`.
    pub fn agent(id: impl Into<String>) -> Self {
        Self::to(Target::Agent(id.into()))
    }

    /// A task for `target`.
    pub fn to(target: Target) -> Self {
        TaskSpec {
            id: None,
            target,
            input: serde_json::Value::Null,
            timeout: None,
            retries: None,
            backup: None,
            strategy: None,
            workflow: None,
            wait_for_agent: false,
        }
    }

    /// Waits up to the timeout for an agent instead of failing at once when none is
    /// available.
    pub fn wait_for_agent(mut self, wait: bool) -> Self {
        self.wait_for_agent = wait;
        self
    }

    /// Sets the input.
    pub fn input(mut self, input: serde_json::Value) -> Self {
        self.input = input;
        self
    }

    /// Sets the per-attempt timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the same-agent retries.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }

    /// Sets the backup target.
    pub fn backup(mut self, backup: Target) -> Self {
        self.backup = Some(backup);
        self
    }

    /// Sets the selection strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = Some(strategy);
        self
    }

    /// Sets the task id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
}

/// Supervisor settings.
#[derive(Debug, Clone)]
pub struct SupervisorOptions {
    /// The supervisor id (a fresh one otherwise); names its report channel.
    pub id: Option<String>,
    /// The default selection strategy.
    pub strategy: Strategy,
    /// The default per-attempt timeout.
    pub timeout: Duration,
    /// The default same-agent retries.
    pub retries: u32,
    /// Circuit breaker settings, one breaker per agent.
    pub breaker: BreakerConfig,
    /// The registry's settings (`publish_events` is forced on).
    pub registry: RegistryOptions,
    /// Read workflow events at start and resume the workflows that did not finish.
    pub resume_workflows: bool,
    /// Finished tasks kept for queries (the oldest are forgotten first).
    pub keep_finished: usize,
}

impl Default for SupervisorOptions {
    /// Least loaded, 30 s per attempt, 1 retry, default breaker and registry, resume
    /// on, 10,000 finished tasks kept.
    fn default() -> Self {
        SupervisorOptions {
            id: None,
            strategy: Strategy::LeastLoaded,
            timeout: Duration::from_secs(30),
            retries: 1,
            breaker: BreakerConfig::default(),
            registry: RegistryOptions::default(),
            resume_workflows: true,
            keep_finished: 10_000,
        }
    }
}

/// How a task ended (or where it is, while it runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOutcome {
    /// The task id.
    pub task_id: String,
    /// Its status.
    pub status: TaskStatus,
    /// The output, when completed.
    pub output: Option<serde_json::Value>,
    /// The last error, when it failed or was escalated.
    pub error: Option<String>,
    /// The agent that completed it (or the last one tried).
    pub agent: Option<String>,
    /// Attempts made.
    pub attempts: u32,
}

/// Everything the supervisor knows about one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task id.
    pub id: String,
    /// Who it was for.
    pub target: Target,
    /// Its status now.
    pub status: TaskStatus,
    /// The agent it is (or was last) assigned to.
    pub agent: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// Agents tried, one entry per attempt.
    pub agents_tried: Vec<String>,
    /// How often it was moved off an unhealthy agent.
    pub redistributed: u32,
    /// The output, once completed.
    pub output: Option<serde_json::Value>,
    /// The last error.
    pub error: Option<String>,
    /// The workflow step it runs, if any.
    pub workflow: Option<WorkflowRef>,
    /// When it was submitted.
    pub created_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Every status change, oldest first.
    pub history: Vec<TaskEvent>,
}

/// Per-agent statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStats {
    /// The agent.
    pub agent_id: String,
    /// Attempts assigned to it.
    pub assigned: u64,
    /// Completed.
    pub completed: u64,
    /// Failed attempts.
    pub failed: u64,
    /// Timed-out attempts.
    pub timed_out: u64,
    /// Tasks moved off it while it was unhealthy.
    pub redistributed_away: u64,
    /// completed / (completed + failed + timed out); 1 with no outcome yet.
    pub success_rate: f64,
    /// Median latency of completed tasks (ms, handler time reported by the agent).
    pub latency_p50_ms: Option<u64>,
    /// 99th percentile latency.
    pub latency_p99_ms: Option<u64>,
    /// Its circuit breaker.
    pub breaker: BreakerState,
}

/// Supervisor-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorStats {
    /// Tasks submitted.
    pub submitted: u64,
    /// Tasks completed.
    pub completed: u64,
    /// Tasks failed.
    pub failed: u64,
    /// Tasks escalated (dead-lettered + `channel.system.timeout`).
    pub escalated: u64,
    /// Attempts that timed out.
    pub timeouts: u64,
    /// Retries (same agent or backup).
    pub retries: u64,
    /// Tasks moved off unhealthy agents.
    pub redistributed: u64,
}

#[derive(Debug, Clone)]
struct Attempt {
    agent: String,
    number: u32,
    deadline: DateTime<Utc>,
}

#[derive(Debug)]
struct TaskState {
    record: TaskRecord,
    timeout: Duration,
    retries_left: u32,
    backup_used: bool,
    backup: Option<Target>,
    strategy: Strategy,
    input: serde_json::Value,
    current: Option<Attempt>,
    /// While pending (no agent available): give up at this time.
    pending_until: Option<DateTime<Utc>>,
    last_was_timeout: bool,
    done: watch::Sender<Option<TaskOutcome>>,
}

#[derive(Debug, Default)]
struct StatsAcc {
    assigned: u64,
    completed: u64,
    failed: u64,
    timed_out: u64,
    redistributed_away: u64,
    latencies: VecDeque<u64>,
}

#[derive(Debug, Default)]
struct SupState {
    /// Unfinished tasks: the only ones the timers and events scan.
    tasks: HashMap<String, TaskState>,
    /// Finished tasks kept for queries, and their order for forgetting.
    done: HashMap<String, TaskRecord>,
    finished: VecDeque<String>,
    breakers: HashMap<String, CircuitBreaker>,
    stats: HashMap<String, StatsAcc>,
    outstanding: HashMap<String, u32>,
    counters: SupervisorStats,
}

pub(crate) struct SupInner {
    pub(crate) id: String,
    pub(crate) bus: Bus,
    registry: AgentRegistry,
    selector: Selector,
    options: SupervisorOptions,
    report_channel: ChannelName,
    state: Mutex<SupState>,
    wake: Arc<Notify>,
    background: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) workflows: Mutex<HashMap<String, WorkflowEntry>>,
}

impl Drop for SupInner {
    fn drop(&mut self) {
        for task in self.background.get_mut().drain(..) {
            task.abort();
        }
    }
}

/// The supervisor. Cheap to clone; clones share everything.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use agentbus::{AgentDescriptor, Bus};
/// use agentbus::coordination::{Supervisor, SupervisorOptions, TaskSpec, TaskStatus, Worker};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> agentbus::Result<()> {
/// let bus = Bus::memory();
/// let supervisor = Supervisor::start(&bus, SupervisorOptions::default()).await?;
/// let worker = Worker::builder(AgentDescriptor::new("double-1", "doubler").capability("double"))
///     .handle(|task| async move { Ok(serde_json::json!(task.input.as_i64().unwrap_or(0) * 2)) })
///     .spawn(&bus)
///     .await?;
/// supervisor.registry().wait_for(|agents| !agents.is_empty()).await;
/// let task = supervisor.submit(TaskSpec::capability("double").input(serde_json::json!(21))).await?;
/// let outcome = task.wait().await;
/// assert_eq!(outcome.status, TaskStatus::Completed);
/// assert_eq!(outcome.output, Some(serde_json::json!(42)));
/// worker.stop(Duration::from_secs(1)).await;
/// supervisor.shutdown();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Supervisor {
    pub(crate) inner: Arc<SupInner>,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("id", &self.inner.id)
            .field("tasks", &self.inner.state.lock().tasks.len())
            .finish()
    }
}

/// A submitted task: its id and a way to wait for the end.
#[derive(Debug, Clone)]
pub struct TaskHandle {
    id: String,
    done: watch::Receiver<Option<TaskOutcome>>,
}

impl TaskHandle {
    /// The task id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits until the task is completed, failed or escalated. If the supervisor shuts
    /// down first, the outcome says `pending` with an error saying so.
    pub async fn wait(mut self) -> TaskOutcome {
        let result = self.done.wait_for(Option::is_some).await.map(|v| v.clone());
        match result {
            Ok(Some(outcome)) => outcome,
            _ => TaskOutcome {
                task_id: self.id.clone(),
                status: TaskStatus::Pending,
                output: None,
                error: Some("the supervisor shut down before the task ended".into()),
                agent: None,
                attempts: 0,
            },
        }
    }
}

/// Publishes to do after the state lock is released.
type Outbox = Vec<Envelope>;

/// Header of an assignment envelope: its attempt number.
const HEADER_ATTEMPT: &str = "agentbus-task-attempt";
/// Header of an assignment envelope: the agent it goes to.
const HEADER_AGENT: &str = "agentbus-task-agent";

fn channel(name: &str) -> ChannelName {
    // The constants are valid names; a failure here is a bug caught by the tests.
    ChannelName::new(name).unwrap_or_else(|_| unreachable_channel(name))
}

#[allow(clippy::panic)] // only reachable if a constant channel name is invalid: a bug.
fn unreachable_channel(name: &str) -> ChannelName {
    panic!("invalid built-in channel name '{name}'")
}

impl Supervisor {
    /// Starts a supervisor on `bus`: its registry (publishing health events), its
    /// report channel, the escalation dead-letter path, and — when
    /// `resume_workflows` — the workflows left unfinished by an earlier supervisor.
    ///
    /// # Errors
    /// Subscription errors; an invalid `id`.
    pub async fn start(bus: &Bus, options: SupervisorOptions) -> Result<Supervisor> {
        bus.register::<TaskAssignment>();
        bus.register::<TaskReport>();
        bus.register::<TaskEvent>();
        bus.register::<TimeoutNotice>();
        bus.register::<CoordinationMessage>();
        let id = options
            .id
            .clone()
            .unwrap_or_else(|| format!("sup-{}", uuid::Uuid::now_v7().simple()));
        let report_channel = supervisor_report_channel(&id)?;
        let registry = AgentRegistry::start(
            bus,
            RegistryOptions {
                publish_events: true,
                ..options.registry.clone()
            },
        )
        .await?;
        // Reports to a supervisor that is gone have no reader: keep a bounded tail.
        bus.transport()
            .configure_channels(
                ChannelPattern::new("_sys.tasks.reports.>")?,
                ChannelConfig {
                    max_age: Some(Duration::from_secs(3600)),
                    max_messages: Some(100_000),
                    discard: Discard::DropOldest,
                    ..ChannelConfig::default()
                },
            )
            .await?;
        bus.transport()
            .configure_channels(
                ChannelPattern::new(TASK_EVENTS)?,
                ChannelConfig {
                    max_messages: Some(100_000),
                    discard: Discard::DropOldest,
                    ..ChannelConfig::default()
                },
            )
            .await?;
        let reports = bus
            .subscribe(
                SubscribeOptions::new(ChannelPattern::from(report_channel.clone()))
                    .prefetch(1024)
                    .max_deliveries(1),
            )
            .await?;
        let escalated = bus
            .subscribe(
                SubscribeOptions::new(ChannelPattern::new(TASKS_ESCALATED)?)
                    .group("agentbus-escalated")
                    .max_deliveries(1),
            )
            .await?;
        let agent_events = registry.events();
        let inner = Arc::new(SupInner {
            id,
            bus: bus.clone(),
            registry,
            selector: Selector::new(),
            options,
            report_channel,
            state: Mutex::new(SupState::default()),
            wake: Arc::new(Notify::new()),
            background: Mutex::new(Vec::new()),
            workflows: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(run(
            Arc::downgrade(&inner),
            reports,
            escalated,
            agent_events,
            inner.wake.clone(),
        ));
        inner.background.lock().push(task);
        let supervisor = Supervisor { inner };
        if supervisor.inner.options.resume_workflows {
            super::workflow::resume(&supervisor).await?;
        }
        Ok(supervisor)
    }

    /// The supervisor id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// Its live registry.
    pub fn registry(&self) -> &AgentRegistry {
        &self.inner.registry
    }

    /// Stops everything at once (background loops and workflow drivers), as a crash
    /// would; workflow state stays on the bus for the next supervisor to resume.
    pub fn shutdown(&self) {
        for task in self.inner.background.lock().drain(..) {
            task.abort();
        }
        for (_, entry) in self.inner.workflows.lock().drain() {
            entry.abort();
        }
    }

    /// Assigns a task: picks an agent and sends it the task.
    ///
    /// # Errors
    /// [`ErrorKind::NoAgentFound`] when no agent can take it now — the message lists
    /// the capabilities (or agents) that exist; [`ErrorKind::InvalidInput`] for a
    /// duplicate task id or a zero timeout; publish errors.
    pub async fn submit(&self, spec: TaskSpec) -> Result<TaskHandle> {
        let inner = &self.inner;
        let now = inner.bus.clock().now();
        let timeout = spec.timeout.unwrap_or(inner.options.timeout);
        if timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "a task timeout must be longer than zero, e.g. 30s",
            ));
        }
        let id = spec
            .id
            .clone()
            .unwrap_or_else(|| format!("task-{}", uuid::Uuid::now_v7().simple()));
        let strategy = spec
            .strategy
            .clone()
            .unwrap_or_else(|| inner.options.strategy.clone());
        let mut outbox = Outbox::new();
        let handle = {
            let mut state = inner.state.lock();
            if state.tasks.contains_key(&id) || state.done.contains_key(&id) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!("task id '{id}' is already in use; leave the id empty for a fresh one"),
                )
                .with_context("task", &id));
            }
            let agent = match inner.choose(&mut state, &spec.target, &[], &strategy, now) {
                Ok(agent) => Ok(agent),
                Err(e) if spec.wait_for_agent && e.kind() == ErrorKind::NoAgentFound => Err(e),
                Err(e) => return Err(e),
            };
            let (done, rx) = watch::channel(None);
            let backup = spec.backup.clone().or(match &spec.target {
                Target::Capability(c) => Some(Target::Capability(c.clone())),
                Target::Agent(_) => None,
            });
            let task = TaskState {
                record: TaskRecord {
                    id: id.clone(),
                    target: spec.target.clone(),
                    status: TaskStatus::Pending,
                    agent: None,
                    attempts: 0,
                    agents_tried: Vec::new(),
                    redistributed: 0,
                    output: None,
                    error: None,
                    workflow: spec.workflow.clone(),
                    created_at: now,
                    finished_at: None,
                    history: Vec::new(),
                },
                timeout,
                retries_left: spec.retries.unwrap_or(inner.options.retries),
                backup_used: false,
                backup,
                strategy,
                input: spec.input,
                current: None,
                pending_until: None,
                last_was_timeout: false,
                done,
            };
            state.tasks.insert(id.clone(), task);
            state.counters.submitted += 1;
            inner.event(
                &mut state,
                &id,
                TaskStatus::Pending,
                None,
                "submitted".into(),
                now,
                &mut outbox,
            );
            match agent {
                Ok(agent) => {
                    inner.assign(&mut state, &id, agent, "assigned".into(), now, &mut outbox)
                }
                Err(e) => {
                    if let Some(task) = state.tasks.get_mut(&id) {
                        task.pending_until = Some(later(now, timeout));
                    }
                    let detail = format!("waiting up to {timeout:?} for an agent: {}", e.message());
                    inner.event(
                        &mut state,
                        &id,
                        TaskStatus::Pending,
                        None,
                        detail,
                        now,
                        &mut outbox,
                    );
                }
            }
            TaskHandle { id, done: rx }
        };
        inner.flush(outbox).await;
        inner.wake.notify_one();
        Ok(handle)
    }

    /// Broadcasts a coordination message to every agent on `_sys.coord.broadcast`.
    ///
    /// # Errors
    /// Publish errors.
    pub async fn broadcast(&self, message: &CoordinationMessage) -> Result<PublishReceipt> {
        self.inner
            .bus
            .publish_with(
                &channel(COORDINATION_BROADCAST),
                message,
                &PublishOptions::new().sender(self.inner.id.clone()),
            )
            .await
    }

    /// One task.
    pub fn task(&self, id: &str) -> Option<TaskRecord> {
        let state = self.inner.state.lock();
        state
            .tasks
            .get(id)
            .map(|t| t.record.clone())
            .or_else(|| state.done.get(id).cloned())
    }

    /// Every task kept (running and recently finished), oldest first.
    pub fn tasks(&self) -> Vec<TaskRecord> {
        let state = self.inner.state.lock();
        let mut tasks: Vec<TaskRecord> = state
            .tasks
            .values()
            .map(|t| t.record.clone())
            .chain(state.done.values().cloned())
            .collect();
        drop(state);
        tasks.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        tasks
    }

    /// Statistics per agent that was ever assigned a task, by id.
    pub fn agent_stats(&self) -> Vec<AgentStats> {
        let now = self.inner.bus.clock().now();
        let mut state = self.inner.state.lock();
        let state = &mut *state;
        let mut out: Vec<AgentStats> = state
            .stats
            .iter()
            .map(|(id, acc)| {
                let mut sorted: Vec<u64> = acc.latencies.iter().copied().collect();
                sorted.sort_unstable();
                let pct = |p: f64| {
                    (!sorted.is_empty()).then(|| {
                        let rank =
                            ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
                        sorted[rank - 1]
                    })
                };
                let outcomes = acc.completed + acc.failed + acc.timed_out;
                AgentStats {
                    agent_id: id.clone(),
                    assigned: acc.assigned,
                    completed: acc.completed,
                    failed: acc.failed,
                    timed_out: acc.timed_out,
                    redistributed_away: acc.redistributed_away,
                    success_rate: if outcomes == 0 {
                        1.0
                    } else {
                        acc.completed as f64 / outcomes as f64
                    },
                    latency_p50_ms: pct(0.5),
                    latency_p99_ms: pct(0.99),
                    breaker: state
                        .breakers
                        .get_mut(id)
                        .map_or(BreakerState::Closed, |b| b.state(now)),
                }
            })
            .collect();
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        out
    }

    /// Supervisor-wide counters.
    pub fn stats(&self) -> SupervisorStats {
        self.inner.state.lock().counters.clone()
    }

    /// The breaker state of `agent` now.
    pub fn breaker(&self, agent: &str) -> BreakerState {
        let now = self.inner.bus.clock().now();
        self.inner
            .state
            .lock()
            .breakers
            .get_mut(agent)
            .map_or(BreakerState::Closed, |b| b.state(now))
    }

    /// Re-checks timeouts now (the background loop does it on its own; call it after
    /// moving a manual clock to act without waiting for the loop).
    pub async fn check_timeouts(&self) {
        self.inner.process_timeouts().await;
    }

    /// Starts a workflow; see [`WorkflowSpec`].
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an invalid spec (a cycle is named), publish
    /// errors.
    pub async fn start_workflow(
        &self,
        spec: WorkflowSpec,
        input: serde_json::Value,
    ) -> Result<WorkflowHandle> {
        super::workflow::start(self, spec, input).await
    }

    /// A workflow's status, with per-step timings.
    pub fn workflow(&self, id: &str) -> Option<WorkflowStatus> {
        self.inner
            .workflows
            .lock()
            .get(id)
            .map(WorkflowEntry::status)
    }

    /// Every workflow this supervisor runs or ran.
    pub fn workflows(&self) -> Vec<WorkflowStatus> {
        let mut all: Vec<WorkflowStatus> = self
            .inner
            .workflows
            .lock()
            .values()
            .map(WorkflowEntry::status)
            .collect();
        all.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        all
    }
}

impl SupInner {
    /// Picks an agent for `target`, taking a breaker permit.
    fn choose(
        &self,
        state: &mut SupState,
        target: &Target,
        exclude: &[String],
        strategy: &Strategy,
        now: DateTime<Utc>,
    ) -> Result<String> {
        match target {
            Target::Agent(id) => {
                let Some(record) = self.registry.agent(id) else {
                    let known: Vec<String> = self
                        .registry
                        .agents()
                        .iter()
                        .map(|a| a.id().to_string())
                        .collect();
                    return Err(no_agent(
                        format!(
                            "agent '{id}' is not in the registry (known agents: {})",
                            list(&known)
                        ),
                        None,
                    ));
                };
                if !record.health.is_available() {
                    return Err(no_agent(
                        format!(
                            "agent '{id}' is {} and takes no new work",
                            record.health.as_str()
                        ),
                        None,
                    ));
                }
                let breaker = state
                    .breakers
                    .entry(id.clone())
                    .or_insert_with(|| CircuitBreaker::new(self.options.breaker));
                if !breaker.try_acquire(now) {
                    return Err(no_agent(
                        format!(
                            "the circuit breaker of agent '{id}' is open until {}",
                            breaker.reopens_at().map_or("-".into(), |t| t.to_rfc3339())
                        ),
                        None,
                    ));
                }
                Ok(id.clone())
            }
            Target::Capability(capability) => {
                let all = self.registry.find(capability);
                let candidates: Vec<AgentRecord> = all
                    .iter()
                    .filter(|a| !exclude.iter().any(|e| e == a.id()))
                    .filter(|a| {
                        state
                            .breakers
                            .entry(a.id().to_string())
                            .or_insert_with(|| CircuitBreaker::new(self.options.breaker))
                            .allows(now)
                    })
                    .cloned()
                    .collect();
                let outstanding = &state.outstanding;
                let pick = self
                    .selector
                    .pick(capability, &candidates, strategy, &|id| {
                        outstanding.get(id).copied().unwrap_or(0)
                    });
                let Some(index) = pick else {
                    let why = if all.is_empty() {
                        format!(
                            "no healthy agent has capability '{capability}' (capabilities available: {})",
                            list(&self.registry.capabilities())
                        )
                    } else {
                        let open: Vec<String> = all
                            .iter()
                            .filter(|a| !exclude.iter().any(|e| e == a.id()))
                            .map(|a| a.id().to_string())
                            .collect();
                        format!(
                            "every agent with capability '{capability}' is ruled out: already tried {}; \
                             circuit breaker open for {}",
                            list(exclude),
                            list(&open)
                        )
                    };
                    return Err(no_agent(why, Some(capability)));
                };
                let id = candidates[index].id().to_string();
                if let Some(b) = state.breakers.get_mut(&id) {
                    b.try_acquire(now);
                }
                Ok(id)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        state: &mut SupState,
        task_id: &str,
        status: TaskStatus,
        agent: Option<String>,
        detail: String,
        now: DateTime<Utc>,
        outbox: &mut Outbox,
    ) {
        let Some(task) = state.tasks.get_mut(task_id) else {
            return;
        };
        let event = TaskEvent {
            task_id: task_id.to_string(),
            status,
            agent_id: agent,
            attempt: task.record.attempts,
            detail,
            supervisor: self.id.clone(),
            at: now,
        };
        task.record.status = status;
        task.record.history.push(event.clone());
        let options = PublishOptions::new()
            .sender(self.id.clone())
            .correlation(task_id.to_string());
        if let Ok(envelope) = self.bus.envelope(&channel(TASK_EVENTS), &event, &options) {
            outbox.push(envelope);
        }
    }

    /// Sends a new attempt of `task_id` to `agent`.
    fn assign(
        &self,
        state: &mut SupState,
        task_id: &str,
        agent: String,
        detail: String,
        now: DateTime<Utc>,
        outbox: &mut Outbox,
    ) {
        let Some(task) = state.tasks.get_mut(task_id) else {
            return;
        };
        task.record.attempts += 1;
        task.record.agent = Some(agent.clone());
        task.record.agents_tried.push(agent.clone());
        task.pending_until = None;
        let number = task.record.attempts;
        task.current = Some(Attempt {
            agent: agent.clone(),
            number,
            deadline: later(now, task.timeout),
        });
        let assignment = TaskAssignment {
            task_id: task_id.to_string(),
            attempt: number,
            capability: match &task.record.target {
                Target::Capability(c) => Some(c.clone()),
                Target::Agent(_) => None,
            },
            input: task.input.clone(),
            timeout_ms: u64::try_from(task.timeout.as_millis()).unwrap_or(u64::MAX),
            report_to: self.report_channel.to_string(),
            workflow: task.record.workflow.clone(),
        };
        *state.outstanding.entry(agent.clone()).or_insert(0) += 1;
        state.stats.entry(agent.clone()).or_default().assigned += 1;
        match agent_task_channel(&agent).and_then(|ch| {
            self.bus.envelope(
                &ch,
                &assignment,
                &PublishOptions::new()
                    .sender(self.id.clone())
                    .correlation(task_id.to_string())
                    .header(HEADER_ATTEMPT, number.to_string())
                    .header(HEADER_AGENT, agent.clone()),
            )
        }) {
            Ok(envelope) => outbox.push(envelope),
            Err(e) => tracing::warn!(error = %e, agent = %agent, "assignment not built"),
        }
        self.event(
            state,
            task_id,
            TaskStatus::Assigned,
            Some(agent),
            detail,
            now,
            outbox,
        );
    }

    fn release(state: &mut SupState, agent: &str) {
        if let Some(n) = state.outstanding.get_mut(agent) {
            *n = n.saturating_sub(1);
        }
    }

    /// Ends a task.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        state: &mut SupState,
        task_id: &str,
        status: TaskStatus,
        output: Option<serde_json::Value>,
        error: Option<String>,
        detail: String,
        now: DateTime<Utc>,
        outbox: &mut Outbox,
    ) {
        let agent = {
            let Some(task) = state.tasks.get_mut(task_id) else {
                return;
            };
            let agent = task
                .current
                .take()
                .map(|a| a.agent)
                .or(task.record.agent.clone());
            task.record.output = output;
            task.record.error = error;
            task.record.finished_at = Some(now);
            task.pending_until = None;
            agent
        };
        self.event(state, task_id, status, agent.clone(), detail, now, outbox);
        match status {
            TaskStatus::Completed => state.counters.completed += 1,
            TaskStatus::Failed => state.counters.failed += 1,
            TaskStatus::Escalated => state.counters.escalated += 1,
            _ => {}
        }
        if let Some(task) = state.tasks.get(task_id) {
            let outcome = TaskOutcome {
                task_id: task_id.to_string(),
                status,
                output: task.record.output.clone(),
                error: task.record.error.clone(),
                agent,
                attempts: task.record.attempts,
            };
            task.done.send_replace(Some(outcome));
        }
        if let Some(task) = state.tasks.remove(task_id) {
            state.done.insert(task_id.to_string(), task.record);
        }
        state.finished.push_back(task_id.to_string());
        while state.finished.len() > self.options.keep_finished {
            if let Some(old) = state.finished.pop_front() {
                state.done.remove(&old);
            }
        }
    }

    /// The escalation ladder after a failed or timed-out attempt.
    fn next_step(
        &self,
        state: &mut SupState,
        task_id: &str,
        previous: &str,
        error: String,
        now: DateTime<Utc>,
        outbox: &mut Outbox,
    ) {
        let Some(task) = state.tasks.get_mut(task_id) else {
            return;
        };
        let strategy = task.strategy.clone();
        // 1. The same agent again.
        if task.retries_left > 0 {
            task.retries_left -= 1;
            let target = Target::Agent(previous.to_string());
            if let Ok(agent) = self.choose(state, &target, &[], &strategy, now) {
                state.counters.retries += 1;
                self.assign(
                    state,
                    task_id,
                    agent,
                    format!("retry on the same agent after: {error}"),
                    now,
                    outbox,
                );
                return;
            }
        }
        // 2. The backup, once.
        let Some(task) = state.tasks.get_mut(task_id) else {
            return;
        };
        if !task.backup_used {
            task.backup_used = true;
            if let Some(backup) = task.backup.clone() {
                let tried = task.record.agents_tried.clone();
                match self.choose(state, &backup, &tried, &strategy, now) {
                    Ok(agent) => {
                        state.counters.retries += 1;
                        self.assign(
                            state,
                            task_id,
                            agent,
                            format!("escalated to backup {backup} after: {error}"),
                            now,
                            outbox,
                        );
                        return;
                    }
                    Err(e) => tracing::debug!(task = task_id, error = %e, "no backup agent"),
                }
            }
        }
        // 3. Out of options.
        let Some(task) = state.tasks.get(task_id) else {
            return;
        };
        if task.last_was_timeout {
            self.escalate(state, task_id, error, now, outbox);
        } else {
            let detail = format!(
                "failed after {} attempt(s) on {}: {error}",
                task.record.attempts,
                list(&task.record.agents_tried)
            );
            self.finish(
                state,
                task_id,
                TaskStatus::Failed,
                None,
                Some(error),
                detail,
                now,
                outbox,
            );
        }
    }

    fn escalate(
        &self,
        state: &mut SupState,
        task_id: &str,
        error: String,
        now: DateTime<Utc>,
        outbox: &mut Outbox,
    ) {
        let Some(task) = state.tasks.get(task_id) else {
            return;
        };
        let reason = format!(
            "every attempt timed out ({} attempt(s) on {}): {error}; handle it by hand",
            task.record.attempts,
            list(&task.record.agents_tried)
        );
        let notice = TimeoutNotice {
            task_id: task_id.to_string(),
            agents_tried: task.record.agents_tried.clone(),
            attempts: task.record.attempts,
            capability: match &task.record.target {
                Target::Capability(c) => Some(c.clone()),
                Target::Agent(_) => None,
            },
            input: task.input.clone(),
            reason: reason.clone(),
            at: now,
        };
        let options = PublishOptions::new()
            .sender(self.id.clone())
            .correlation(task_id.to_string())
            .header("agentbus-escalation-reason", reason.clone());
        for name in [TASKS_ESCALATED, SYSTEM_TIMEOUT] {
            if let Ok(envelope) = self.bus.envelope(&channel(name), &notice, &options) {
                outbox.push(envelope);
            }
        }
        self.finish(
            state,
            task_id,
            TaskStatus::Escalated,
            None,
            Some(error),
            reason,
            now,
            outbox,
        );
    }

    async fn flush(&self, mut outbox: Outbox) {
        loop {
            let mut undeliverable = Vec::new();
            for envelope in outbox.drain(..) {
                let channel = envelope.channel.clone();
                let assignment = (envelope.header.kind == TaskAssignment::KIND)
                    .then(|| {
                        let headers = &envelope.header.headers;
                        Some((
                            envelope.header.correlation_id.clone()?,
                            headers.get(HEADER_ATTEMPT)?.parse::<u32>().ok()?,
                            headers.get(HEADER_AGENT)?.clone(),
                        ))
                    })
                    .flatten();
                if let Err(e) = self.bus.publish_envelope(envelope).await {
                    tracing::warn!(error = %e, %channel, "supervisor publish failed");
                    if let Some((task_id, attempt, agent_id)) = assignment {
                        // The attempt cannot start: count it as failed at once rather
                        // than waiting for its timeout. An error that a retry cannot fix
                        // (an oversized or undecodable input) fails the task.
                        undeliverable.push(TaskReport {
                            task_id,
                            attempt,
                            agent_id,
                            outcome: ReportOutcome::Failed {
                                retryable: e.is_temporary(),
                                error: format!("the assignment could not be sent: {e}"),
                            },
                            duration_ms: 0,
                            at: self.bus.clock().now(),
                        });
                    }
                }
            }
            if !undeliverable.is_empty() {
                let now = self.bus.clock().now();
                let mut next = Outbox::new();
                for report in undeliverable {
                    self.apply_report(report, now, &mut next);
                }
                outbox = next;
                continue;
            }
            return;
        }
    }

    async fn on_report(&self, report: TaskReport) {
        let now = self.bus.clock().now();
        let mut outbox = Outbox::new();
        self.apply_report(report, now, &mut outbox);
        self.flush(outbox).await;
    }

    fn apply_report(&self, report: TaskReport, now: DateTime<Utc>, outbox: &mut Outbox) {
        let mut state = self.state.lock();
        let state = &mut *state;
        let Some(task) = state.tasks.get_mut(&report.task_id) else {
            return;
        };
        if task.record.status.is_final() {
            return;
        }
        let current = task
            .current
            .as_ref()
            .is_some_and(|a| a.number == report.attempt && a.agent == report.agent_id);
        match report.outcome {
            ReportOutcome::Started => {
                if current {
                    self.event(
                        state,
                        &report.task_id,
                        TaskStatus::Running,
                        Some(report.agent_id),
                        format!("attempt {} started", report.attempt),
                        now,
                        outbox,
                    );
                }
            }
            ReportOutcome::Completed { output } => {
                // The first completion wins, from whichever attempt: the work is
                // done, and a later report of the same task is ignored.
                if let Some(attempt) = task.current.as_ref() {
                    let agent = attempt.agent.clone();
                    Self::release(state, &agent);
                }
                let stats = state.stats.entry(report.agent_id.clone()).or_default();
                stats.completed += 1;
                stats.latencies.push_back(report.duration_ms);
                if stats.latencies.len() > 4096 {
                    stats.latencies.pop_front();
                }
                state
                    .breakers
                    .entry(report.agent_id.clone())
                    .or_insert_with(|| CircuitBreaker::new(self.options.breaker))
                    .on_success(now);
                self.selector.record(
                    &report.agent_id,
                    true,
                    Duration::from_millis(report.duration_ms),
                );
                let detail = format!(
                    "completed by {} on attempt {}",
                    report.agent_id, report.attempt
                );
                if let Some(task) = state.tasks.get_mut(&report.task_id) {
                    task.current = Some(Attempt {
                        agent: report.agent_id.clone(),
                        number: report.attempt,
                        deadline: now,
                    });
                    task.record.agent = Some(report.agent_id.clone());
                }
                self.finish(
                    state,
                    &report.task_id,
                    TaskStatus::Completed,
                    Some(output),
                    None,
                    detail,
                    now,
                    outbox,
                );
            }
            ReportOutcome::Failed { error, retryable } => {
                if !current {
                    return;
                }
                task.current = None;
                task.last_was_timeout = false;
                Self::release(state, &report.agent_id);
                state
                    .stats
                    .entry(report.agent_id.clone())
                    .or_default()
                    .failed += 1;
                state
                    .breakers
                    .entry(report.agent_id.clone())
                    .or_insert_with(|| CircuitBreaker::new(self.options.breaker))
                    .on_failure(now);
                self.selector
                    .record(&report.agent_id, false, Duration::ZERO);
                if retryable {
                    self.event(
                        state,
                        &report.task_id,
                        TaskStatus::Failed,
                        Some(report.agent_id.clone()),
                        format!("attempt {} failed: {error}", report.attempt),
                        now,
                        outbox,
                    );
                    self.next_step(state, &report.task_id, &report.agent_id, error, now, outbox);
                } else {
                    let detail = format!("failed on {} (not retryable): {error}", report.agent_id);
                    self.finish(
                        state,
                        &report.task_id,
                        TaskStatus::Failed,
                        None,
                        Some(error),
                        detail,
                        now,
                        outbox,
                    );
                }
            }
        }
    }

    /// Times out due attempts, gives up on pending tasks past their wait; returns the
    /// next deadline.
    async fn process_timeouts(&self) -> Option<DateTime<Utc>> {
        let now = self.bus.clock().now();
        let mut outbox = Outbox::new();
        let next = {
            let mut state = self.state.lock();
            let state = &mut *state;
            let due: Vec<(String, Option<Attempt>)> = state
                .tasks
                .iter()
                .filter(|(_, t)| !t.record.status.is_final())
                .filter(|(_, t)| {
                    t.current.as_ref().is_some_and(|a| a.deadline <= now)
                        || t.pending_until.is_some_and(|p| p <= now)
                })
                .map(|(id, t)| (id.clone(), t.current.clone()))
                .collect();
            for (id, attempt) in due {
                match attempt {
                    Some(attempt) => {
                        if let Some(task) = state.tasks.get_mut(&id) {
                            task.current = None;
                            task.last_was_timeout = true;
                        }
                        Self::release(state, &attempt.agent);
                        state.counters.timeouts += 1;
                        state
                            .stats
                            .entry(attempt.agent.clone())
                            .or_default()
                            .timed_out += 1;
                        state
                            .breakers
                            .entry(attempt.agent.clone())
                            .or_insert_with(|| CircuitBreaker::new(self.options.breaker))
                            .on_failure(now);
                        self.selector.record(&attempt.agent, false, Duration::ZERO);
                        let timeout = state.tasks.get(&id).map_or(Duration::ZERO, |t| t.timeout);
                        let error = format!(
                            "attempt {} on agent '{}' timed out after {timeout:?}",
                            attempt.number, attempt.agent
                        );
                        self.event(
                            state,
                            &id,
                            TaskStatus::TimedOut,
                            Some(attempt.agent.clone()),
                            error.clone(),
                            now,
                            &mut outbox,
                        );
                        self.next_step(state, &id, &attempt.agent, error, now, &mut outbox);
                    }
                    None => {
                        if let Some(task) = state.tasks.get_mut(&id) {
                            task.last_was_timeout = true;
                        }
                        let error = "no agent became available to take it".to_string();
                        self.escalate(state, &id, error, now, &mut outbox);
                    }
                }
            }
            state
                .tasks
                .values()
                .filter(|t| !t.record.status.is_final())
                .filter_map(|t| t.current.as_ref().map(|a| a.deadline).or(t.pending_until))
                .min()
        };
        self.flush(outbox).await;
        next
    }

    /// Moves the unfinished tasks of an agent that became unhealthy or died to
    /// healthy agents; retries pending tasks when an agent becomes available.
    async fn on_agent_event(&self, event: AgentEvent) {
        let now = self.bus.clock().now();
        let mut outbox = Outbox::new();
        {
            let mut state = self.state.lock();
            let state = &mut *state;
            if matches!(event.to, Health::Unhealthy | Health::Dead) {
                let stranded: Vec<String> = state
                    .tasks
                    .iter()
                    .filter(|(_, t)| !t.record.status.is_final())
                    .filter(|(_, t)| {
                        t.current
                            .as_ref()
                            .is_some_and(|a| a.agent == event.agent_id)
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in stranded {
                    Self::release(state, &event.agent_id);
                    state
                        .stats
                        .entry(event.agent_id.clone())
                        .or_default()
                        .redistributed_away += 1;
                    let Some(task) = state.tasks.get_mut(&id) else {
                        continue;
                    };
                    task.current = None;
                    task.record.redistributed += 1;
                    let target = match &task.record.target {
                        Target::Capability(c) => Some(Target::Capability(c.clone())),
                        Target::Agent(_) => task.backup.clone(),
                    };
                    let strategy = task.strategy.clone();
                    let timeout = task.timeout;
                    let exclude = vec![event.agent_id.clone()];
                    state.counters.redistributed += 1;
                    let detail = format!(
                        "redistributed from '{}' ({}: {})",
                        event.agent_id,
                        event.to.as_str(),
                        event.reason
                    );
                    let choice = target
                        .as_ref()
                        .map(|t| self.choose(state, t, &exclude, &strategy, now));
                    match choice {
                        Some(Ok(agent)) => self.assign(state, &id, agent, detail, now, &mut outbox),
                        _ => {
                            if let Some(task) = state.tasks.get_mut(&id) {
                                task.pending_until = Some(later(now, timeout));
                            }
                            self.event(
                                state,
                                &id,
                                TaskStatus::Pending,
                                None,
                                format!("{detail}; waiting for an agent"),
                                now,
                                &mut outbox,
                            );
                        }
                    }
                }
            } else {
                // An agent is available: place pending tasks that can go to it.
                let pending: Vec<String> = state
                    .tasks
                    .iter()
                    .filter(|(_, t)| {
                        t.record.status == TaskStatus::Pending && t.pending_until.is_some()
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in pending {
                    let Some(task) = state.tasks.get(&id) else {
                        continue;
                    };
                    let target = match &task.record.target {
                        Target::Capability(c) => Target::Capability(c.clone()),
                        Target::Agent(a) => Target::Agent(a.clone()),
                    };
                    let strategy = task.strategy.clone();
                    if let Ok(agent) = self.choose(state, &target, &[], &strategy, now) {
                        self.assign(
                            state,
                            &id,
                            agent,
                            "assigned once an agent became available".into(),
                            now,
                            &mut outbox,
                        );
                    }
                }
            }
        }
        self.flush(outbox).await;
    }

    /// After a lagging event stream: treat every unavailable agent's tasks as stranded.
    async fn sweep(&self) {
        let stranded: Vec<String> = {
            let state = self.state.lock();
            state
                .tasks
                .values()
                .filter(|t| !t.record.status.is_final())
                .filter_map(|t| t.current.as_ref().map(|a| a.agent.clone()))
                .collect()
        };
        for agent in stranded {
            let health = self
                .registry
                .agent(&agent)
                .map_or(Health::Dead, |a| a.health);
            if !health.is_available() {
                self.on_agent_event(AgentEvent {
                    agent_id: agent,
                    from: None,
                    to: health,
                    reason: "found unavailable after missed events".into(),
                    at: self.bus.clock().now(),
                })
                .await;
            }
        }
    }
}

async fn run(
    weak: Weak<SupInner>,
    mut reports: Subscription,
    mut escalated: Subscription,
    mut agent_events: broadcast::Receiver<AgentEvent>,
    wake: Arc<Notify>,
) {
    loop {
        let (next, clock) = {
            let Some(inner) = weak.upgrade() else { return };
            (inner.process_timeouts().await, inner.bus.clock().clone())
        };
        let sleep = async move {
            match next {
                Some(due) => clock.sleep_until(due).await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            batch = reports.next_batch(256) => {
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::error!(error = %e, "supervisor: report subscription ended; the supervisor stops tracking");
                        return;
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                let _ = crate::transport::ack_all(&batch).await;
                for delivery in batch {
                    match delivery.envelope().decode_json::<TaskReport>() {
                        Ok(report) => inner.on_report(report).await,
                        Err(e) => tracing::warn!(error = %e, "supervisor: bad task report"),
                    }
                }
            }
            delivery = escalated.next() => {
                match delivery {
                    Ok(delivery) => {
                        let reason = delivery
                            .envelope()
                            .header
                            .headers
                            .get("agentbus-escalation-reason")
                            .cloned()
                            .unwrap_or_else(|| "escalated: every attempt timed out".into());
                        if let Err(e) = delivery.reject(DeadReason::Rejected, reason).await {
                            tracing::warn!(error = %e, "escalated task not dead-lettered");
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Closed => return,
                    Err(_) => {}
                }
            }
            event = agent_events.recv() => {
                let Some(inner) = weak.upgrade() else { return };
                match event {
                    Ok(event) => inner.on_agent_event(event).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => inner.sweep().await,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
            _ = sleep => {}
            _ = wake.notified() => {}
        }
    }
}

fn no_agent(why: String, capability: Option<&str>) -> Error {
    let mut error = Error::new(
        ErrorKind::NoAgentFound,
        format!("no agent can take the task: {why}; start an agent that can, or check the name"),
    );
    if let Some(capability) = capability {
        error = error.with_context("capability", capability);
    }
    error
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}
