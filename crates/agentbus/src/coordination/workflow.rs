//! Workflows: a DAG of steps run by the supervisor (seed 003), with sagas (seed 002).
//!
//! A step names a target (capability or agent), its dependencies, inputs mapped from
//! the workflow input or earlier outputs, a timeout and retries, and optionally a
//! compensating step. Steps whose dependencies are all completed run in parallel. On
//! a failure the workflow's [`FailurePolicy`] decides: stop (`fail_fast`), go on with
//! what does not depend on the failure (`continue`), or stop and run the compensations
//! of the completed steps in reverse completion order (`compensate`).
//!
//! State is event-sourced on the bus: every transition is a [`WorkflowEvent`] on
//! `_sys.workflows.<id>`, published before it is acted on, and the status anyone sees
//! is the fold of those events. A supervisor that starts on the same bus reads them
//! back and resumes unfinished workflows: completed steps are kept, steps that were
//! running are started again (their tasks may run twice; the workflow records one
//! completion per step), compensations already done are not repeated.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::protocol::{workflow_channel, TaskStatus, WorkflowRef, WORKFLOWS_PREFIX};
use super::supervisor::{Supervisor, Target, TaskOutcome, TaskSpec};
use crate::bus::{Bus, PublishOptions};
use crate::channel::ChannelName;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

/// Where a step input comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum Input {
    /// A constant.
    Value {
        /// The value.
        value: serde_json::Value,
    },
    /// Part of the workflow's input (a JSON pointer, `""` for all of it).
    Workflow {
        /// JSON pointer, e.g. `/date`.
        pointer: String,
    },
    /// Part of an earlier step's output. Referencing a step makes it a dependency.
    Step {
        /// The step id.
        step: String,
        /// JSON pointer into its output, `""` for all of it.
        pointer: String,
    },
}

impl Input {
    /// A constant.
    pub fn value(value: serde_json::Value) -> Self {
        Input::Value { value }
    }

    /// All or part (JSON pointer) of the workflow input.
    pub fn workflow(pointer: impl Into<String>) -> Self {
        Input::Workflow {
            pointer: pointer.into(),
        }
    }

    /// All or part (JSON pointer) of step `step`'s output.
    pub fn step(step: impl Into<String>, pointer: impl Into<String>) -> Self {
        Input::Step {
            step: step.into(),
            pointer: pointer.into(),
        }
    }
}

/// What undoes a completed step when a saga fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompensationSpec {
    /// Who runs it.
    pub target: Target,
    /// Its inputs; they may reference the compensated step's own output.
    #[serde(default)]
    pub inputs: BTreeMap<String, Input>,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
    /// Same-agent retries.
    pub retries: Option<u32>,
}

impl CompensationSpec {
    /// A compensation run by `target`.
    pub fn new(target: Target) -> Self {
        CompensationSpec {
            target,
            inputs: BTreeMap::new(),
            timeout: None,
            retries: None,
        }
    }

    /// Adds an input.
    pub fn input(mut self, name: impl Into<String>, input: Input) -> Self {
        self.inputs.insert(name.into(), input);
        self
    }
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Unique within the workflow.
    pub id: String,
    /// Who runs it.
    pub target: Target,
    /// Steps that must complete first (input references are added implicitly).
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// The task input: an object with one field per entry.
    #[serde(default)]
    pub inputs: BTreeMap<String, Input>,
    /// Per-attempt timeout (the supervisor's default otherwise).
    pub timeout: Option<Duration>,
    /// Same-agent retries (the supervisor's default otherwise).
    pub retries: Option<u32>,
    /// The saga compensation of this step.
    pub compensate: Option<CompensationSpec>,
}

impl StepSpec {
    /// A step `id` run by `target`.
    pub fn new(id: impl Into<String>, target: Target) -> Self {
        StepSpec {
            id: id.into(),
            target,
            depends_on: Vec::new(),
            inputs: BTreeMap::new(),
            timeout: None,
            retries: None,
            compensate: None,
        }
    }

    /// A step run by any agent with `capability`.
    pub fn capability(id: impl Into<String>, capability: impl Into<String>) -> Self {
        Self::new(id, Target::Capability(capability.into()))
    }

    /// Adds dependencies.
    pub fn after<I, S>(mut self, steps: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.depends_on.extend(steps.into_iter().map(Into::into));
        self
    }

    /// Adds an input.
    pub fn input(mut self, name: impl Into<String>, input: Input) -> Self {
        self.inputs.insert(name.into(), input);
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the retries.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }

    /// Sets the compensation.
    pub fn compensate(mut self, compensation: CompensationSpec) -> Self {
        self.compensate = Some(compensation);
        self
    }

    /// Every step this one waits for: `depends_on` plus the steps its inputs read.
    pub fn dependencies(&self) -> Vec<String> {
        let mut deps: Vec<String> = Vec::new();
        let referenced = self.inputs.values().filter_map(|input| match input {
            Input::Step { step, .. } => Some(step.clone()),
            _ => None,
        });
        for dep in self.depends_on.iter().cloned().chain(referenced) {
            if !deps.contains(&dep) {
                deps.push(dep);
            }
        }
        deps
    }
}

/// What a workflow does when a step fails for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Start nothing new; wait for running steps; the workflow fails.
    #[default]
    FailFast,
    /// Skip the steps that depend on the failure, run the rest; the workflow fails.
    Continue,
    /// Start nothing new; wait for running steps; run the compensations of every
    /// completed step in reverse completion order (a saga).
    Compensate,
}

/// A workflow definition.
///
/// # Examples
///
/// ```
/// use agentbus::coordination::{Input, StepSpec, WorkflowSpec};
///
/// let spec = WorkflowSpec::new("etl")
///     .step(StepSpec::capability("extract", "extract"))
///     .step(StepSpec::capability("clean", "transform").input("rows", Input::step("extract", "/rows")))
///     .step(StepSpec::capability("load", "load").after(["clean"]));
/// assert!(spec.validate().is_ok());
///
/// let cyclic = WorkflowSpec::new("loop")
///     .step(StepSpec::capability("a", "x").after(["b"]))
///     .step(StepSpec::capability("b", "x").after(["a"]));
/// let error = cyclic.validate().unwrap_err();
/// assert!(error.to_string().contains("a → b → a"), "{error}");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowSpec {
    /// A name for people.
    pub name: String,
    /// Use this id (a fresh one otherwise); a channel token.
    pub id: Option<String>,
    /// The steps.
    pub steps: Vec<StepSpec>,
    /// What happens on failure.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// At most this many steps running at once (no limit otherwise).
    pub max_parallel: Option<usize>,
}

impl WorkflowSpec {
    /// An empty workflow called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        WorkflowSpec {
            name: name.into(),
            id: None,
            steps: Vec::new(),
            on_failure: FailurePolicy::FailFast,
            max_parallel: None,
        }
    }

    /// Adds a step.
    pub fn step(mut self, step: StepSpec) -> Self {
        self.steps.push(step);
        self
    }

    /// Sets the failure policy.
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        self.on_failure = policy;
        self
    }

    /// Sets the id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Limits parallel steps.
    pub fn max_parallel(mut self, n: usize) -> Self {
        self.max_parallel = Some(n.max(1));
        self
    }

    /// Checks the definition and returns the steps in a dependency order.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for no steps, a duplicate or empty step id, a
    /// dependency on an unknown step or on itself, a compensation reading an unknown
    /// step, or a cycle — the message names the cycle, e.g. `a → b → c → a`.
    pub fn validate(&self) -> Result<Vec<String>> {
        let invalid = |message: String| {
            Error::new(ErrorKind::InvalidInput, message).with_context("workflow", &self.name)
        };
        if self.steps.is_empty() {
            return Err(invalid(format!(
                "workflow '{}' has no steps; add at least one",
                self.name
            )));
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, step) in self.steps.iter().enumerate() {
            if step.id.is_empty() {
                return Err(invalid(format!(
                    "step {} of workflow '{}' has an empty id",
                    i + 1,
                    self.name
                )));
            }
            if index.insert(step.id.as_str(), i).is_some() {
                return Err(invalid(format!(
                    "step id '{}' appears twice in workflow '{}'; step ids must be unique",
                    step.id, self.name
                )));
            }
        }
        let mut deps: Vec<Vec<usize>> = Vec::with_capacity(self.steps.len());
        for step in &self.steps {
            let mut mine = Vec::new();
            for dep in step.dependencies() {
                if dep == step.id {
                    return Err(invalid(format!("step '{}' depends on itself", step.id)));
                }
                let Some(&j) = index.get(dep.as_str()) else {
                    return Err(invalid(format!(
                        "step '{}' depends on unknown step '{dep}' (steps: {})",
                        step.id,
                        self.steps
                            .iter()
                            .map(|s| s.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                };
                mine.push(j);
            }
            if let Some(comp) = &step.compensate {
                for input in comp.inputs.values() {
                    if let Input::Step { step: other, .. } = input {
                        if !index.contains_key(other.as_str()) {
                            return Err(invalid(format!(
                                "the compensation of step '{}' reads unknown step '{other}'",
                                step.id
                            )));
                        }
                    }
                }
            }
            deps.push(mine);
        }
        // Depth-first search with colours; an edge to a grey node closes a cycle,
        // which is read off the path stack.
        #[derive(Clone, Copy, PartialEq)]
        enum Colour {
            White,
            Grey,
            Black,
        }
        let n = self.steps.len();
        let mut colour = vec![Colour::White; n];
        let mut order = Vec::with_capacity(n);
        for root in 0..n {
            if colour[root] != Colour::White {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
            colour[root] = Colour::Grey;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                if *next < deps[node].len() {
                    let dep = deps[node][*next];
                    *next += 1;
                    match colour[dep] {
                        Colour::White => {
                            colour[dep] = Colour::Grey;
                            stack.push((dep, 0));
                        }
                        Colour::Grey => {
                            let start = stack.iter().position(|&(s, _)| s == dep).unwrap_or(0);
                            // The stack runs from a step to what it depends on, so it
                            // reads "x waits for y" from left to right.
                            let mut names: Vec<&str> = stack[start..]
                                .iter()
                                .map(|&(s, _)| self.steps[s].id.as_str())
                                .collect();
                            let first = names[0];
                            names.push(first);
                            return Err(invalid(format!(
                                "workflow '{}' has a dependency cycle: {} (each step waits for the \
                                 next); remove one of these dependencies",
                                self.name,
                                names.join(" → ")
                            )));
                        }
                        Colour::Black => {}
                    }
                } else {
                    colour[node] = Colour::Black;
                    order.push(self.steps[node].id.clone());
                    stack.pop();
                }
            }
        }
        Ok(order)
    }
}

/// The state of a whole workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowState {
    /// Steps are running.
    Running,
    /// A saga is running its compensations.
    Compensating,
    /// Every step completed.
    Completed,
    /// A step failed (fail-fast or continue).
    Failed,
    /// A step failed and every compensation owed ran.
    Compensated,
    /// A step failed and a compensation failed too: needs a person.
    CompensationFailed,
}

impl WorkflowState {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowState::Running => "running",
            WorkflowState::Compensating => "compensating",
            WorkflowState::Completed => "completed",
            WorkflowState::Failed => "failed",
            WorkflowState::Compensated => "compensated",
            WorkflowState::CompensationFailed => "compensation_failed",
        }
    }

    /// Whether the workflow is over.
    pub fn is_final(self) -> bool {
        !matches!(self, WorkflowState::Running | WorkflowState::Compensating)
    }
}

/// The state of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Waiting for its dependencies.
    Waiting,
    /// Its task is out.
    Running,
    /// Done.
    Completed,
    /// Failed for good.
    Failed,
    /// Not run: a dependency failed (policy `continue`) or the workflow stopped.
    Skipped,
    /// Its compensation is running.
    Compensating,
    /// Its compensation completed.
    Compensated,
    /// Its compensation failed.
    CompensationFailed,
}

/// One step's status and timings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStatus {
    /// The step id.
    pub id: String,
    /// Its state.
    pub state: StepState,
    /// The task running it (the latest, after a resume).
    pub task_id: Option<String>,
    /// The agent that completed it.
    pub agent: Option<String>,
    /// Task attempts of the completing run.
    pub attempts: u32,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed or failed.
    pub finished_at: Option<DateTime<Utc>>,
    /// `finished_at - started_at`, milliseconds.
    pub duration_ms: Option<u64>,
    /// Its output.
    pub output: Option<serde_json::Value>,
    /// Its error.
    pub error: Option<String>,
}

/// One compensation run, in the order they ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompensationRecord {
    /// The compensated step.
    pub step: String,
    /// `running`, `completed` or `failed`.
    pub state: String,
    /// Its task.
    pub task_id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its error.
    pub error: Option<String>,
}

/// A workflow's status at a moment: the fold of its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowStatus {
    /// The id.
    pub id: String,
    /// The name.
    pub name: String,
    /// The state.
    pub state: WorkflowState,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Steps, in definition order.
    pub steps: Vec<StepStatus>,
    /// Compensations, in the order they ran.
    pub compensations: Vec<CompensationRecord>,
    /// Why it failed.
    pub error: Option<String>,
    /// The supervisor that last drove it.
    pub supervisor: String,
    /// Events folded.
    pub events: u64,
}

impl WorkflowStatus {
    /// One step.
    pub fn step(&self, id: &str) -> Option<&StepStatus> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// Steps in a state.
    pub fn count(&self, state: StepState) -> usize {
        self.steps.iter().filter(|s| s.state == state).count()
    }
}

/// One transition of a workflow, as stored on `_sys.workflows.<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum WorkflowEvent {
    /// The workflow started (carries everything needed to resume it).
    Started {
        /// The id.
        workflow_id: String,
        /// The definition.
        spec: WorkflowSpec,
        /// The input.
        input: serde_json::Value,
        /// The supervisor.
        supervisor: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A supervisor took over an unfinished workflow.
    Resumed {
        /// The supervisor.
        supervisor: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A step's task was submitted.
    StepStarted {
        /// The step.
        step: String,
        /// Its task.
        task_id: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A step completed.
    StepCompleted {
        /// The step.
        step: String,
        /// Its output.
        output: serde_json::Value,
        /// Who completed it.
        agent: Option<String>,
        /// Task attempts.
        attempts: u32,
        /// When.
        at: DateTime<Utc>,
    },
    /// A step failed for good.
    StepFailed {
        /// The step.
        step: String,
        /// Why.
        error: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A step will not run.
    StepSkipped {
        /// The step.
        step: String,
        /// Why.
        reason: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A compensation started.
    CompensationStarted {
        /// The compensated step.
        step: String,
        /// Its task.
        task_id: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A compensation completed.
    CompensationCompleted {
        /// The compensated step.
        step: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// A compensation failed.
    CompensationFailed {
        /// The compensated step.
        step: String,
        /// Why.
        error: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// The workflow ended.
    Finished {
        /// How.
        state: WorkflowState,
        /// Why, when not completed.
        error: Option<String>,
        /// When.
        at: DateTime<Utc>,
    },
}

/// The bus message carrying a [`WorkflowEvent`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowRecord {
    /// The workflow.
    pub workflow_id: String,
    /// The event.
    #[schemars(with = "serde_json::Value")]
    pub event: WorkflowEvent,
}

impl Message for WorkflowRecord {
    const KIND: &'static str = "agentbus.workflow.event";
}

/// A workflow's definition, input, status and completion order, folded from events.
#[derive(Debug, Clone)]
pub(crate) struct Folded {
    index: HashMap<String, usize>,
    spec: WorkflowSpec,
    input: serde_json::Value,
    status: WorkflowStatus,
    completion_order: Vec<String>,
}

fn millis_between(a: DateTime<Utc>, b: DateTime<Utc>) -> u64 {
    u64::try_from((b - a).num_milliseconds().max(0)).unwrap_or(0)
}

impl Folded {
    fn new(
        workflow_id: &str,
        spec: &WorkflowSpec,
        input: &serde_json::Value,
        supervisor: &str,
        at: DateTime<Utc>,
    ) -> Folded {
        let steps = spec
            .steps
            .iter()
            .map(|s| StepStatus {
                id: s.id.clone(),
                state: StepState::Waiting,
                task_id: None,
                agent: None,
                attempts: 0,
                started_at: None,
                finished_at: None,
                duration_ms: None,
                output: None,
                error: None,
            })
            .collect();
        Folded {
            index: spec
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| (s.id.clone(), i))
                .collect(),
            spec: spec.clone(),
            input: input.clone(),
            status: WorkflowStatus {
                id: workflow_id.to_string(),
                name: spec.name.clone(),
                state: WorkflowState::Running,
                started_at: at,
                finished_at: None,
                steps,
                compensations: Vec::new(),
                error: None,
                supervisor: supervisor.to_string(),
                events: 1,
            },
            completion_order: Vec::new(),
        }
    }

    /// Folds a whole event list; `None` if it does not begin with `Started`.
    pub(crate) fn from_events(events: &[WorkflowEvent]) -> Option<Folded> {
        let (first, rest) = events.split_first()?;
        let WorkflowEvent::Started {
            workflow_id,
            spec,
            input,
            supervisor,
            at,
        } = first
        else {
            return None;
        };
        let mut folded = Folded::new(workflow_id, spec, input, supervisor, *at);
        for event in rest {
            folded.apply(event);
        }
        Some(folded)
    }

    fn step_mut(&mut self, id: &str) -> Option<&mut StepStatus> {
        let i = *self.index.get(id)?;
        self.status.steps.get_mut(i)
    }

    fn step(&self, id: &str) -> Option<&StepStatus> {
        let i = *self.index.get(id)?;
        self.status.steps.get(i)
    }

    fn apply(&mut self, event: &WorkflowEvent) {
        self.status.events += 1;
        match event {
            WorkflowEvent::Started { .. } => {}
            WorkflowEvent::Resumed { supervisor, .. } => {
                self.status.supervisor = supervisor.clone();
            }
            WorkflowEvent::StepStarted { step, task_id, at } => {
                if let Some(s) = self.step_mut(step) {
                    s.state = StepState::Running;
                    s.task_id = Some(task_id.clone());
                    s.started_at = Some(*at);
                }
            }
            WorkflowEvent::StepCompleted {
                step,
                output,
                agent,
                attempts,
                at,
            } => {
                let mut newly = false;
                if let Some(s) = self.step_mut(step) {
                    if s.state != StepState::Completed {
                        newly = true;
                        s.state = StepState::Completed;
                        s.output = Some(output.clone());
                        s.agent = agent.clone();
                        s.attempts = *attempts;
                        s.finished_at = Some(*at);
                        s.duration_ms = s.started_at.map(|t| millis_between(t, *at));
                    }
                }
                if newly {
                    self.completion_order.push(step.clone());
                }
            }
            WorkflowEvent::StepFailed { step, error, at } => {
                if let Some(s) = self.step_mut(step) {
                    s.state = StepState::Failed;
                    s.error = Some(error.clone());
                    s.finished_at = Some(*at);
                    s.duration_ms = s.started_at.map(|t| millis_between(t, *at));
                }
            }
            WorkflowEvent::StepSkipped { step, reason, .. } => {
                if let Some(s) = self.step_mut(step) {
                    s.state = StepState::Skipped;
                    s.error = Some(reason.clone());
                }
            }
            WorkflowEvent::CompensationStarted { step, task_id, at } => {
                self.status.state = WorkflowState::Compensating;
                if let Some(s) = self.step_mut(step) {
                    s.state = StepState::Compensating;
                }
                self.status.compensations.push(CompensationRecord {
                    step: step.clone(),
                    state: "running".into(),
                    task_id: task_id.clone(),
                    started_at: *at,
                    finished_at: None,
                    error: None,
                });
            }
            WorkflowEvent::CompensationCompleted { step, at } => {
                if let Some(s) = self.step_mut(step) {
                    s.state = StepState::Compensated;
                }
                if let Some(c) = self
                    .status
                    .compensations
                    .iter_mut()
                    .rev()
                    .find(|c| &c.step == step)
                {
                    c.state = "completed".into();
                    c.finished_at = Some(*at);
                }
            }
            WorkflowEvent::CompensationFailed { step, error, at } => {
                if let Some(s) = self.step_mut(step) {
                    s.state = StepState::CompensationFailed;
                }
                if let Some(c) = self
                    .status
                    .compensations
                    .iter_mut()
                    .rev()
                    .find(|c| &c.step == step)
                {
                    c.state = "failed".into();
                    c.finished_at = Some(*at);
                    c.error = Some(error.clone());
                }
            }
            WorkflowEvent::Finished { state, error, at } => {
                self.status.state = *state;
                self.status.error = error.clone();
                self.status.finished_at = Some(*at);
            }
        }
    }
}

/// Folds a workflow's events into its status (what `agentbus workflow status` shows).
/// `None` when the list does not begin with the `started` event.
pub fn fold_workflow(events: &[WorkflowEvent]) -> Option<WorkflowStatus> {
    Folded::from_events(events).map(|f| f.status)
}

/// Reads every event of workflow `id` from the bus and folds them, without a
/// supervisor: works from any process on a backend that keeps messages.
///
/// # Errors
/// [`ErrorKind::NotFound`] when the bus has no events for it; transport errors.
pub async fn read_workflow(bus: &Bus, id: &str) -> Result<WorkflowStatus> {
    let channel = workflow_channel(id)?;
    let events = read_events(bus, &channel).await?;
    fold_workflow(&events).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!(
                "no workflow '{id}' on this bus: channel '{channel}' holds no workflow events; \
                 check the id (with --backend memory every command has its own empty bus)"
            ),
        )
        .with_context("workflow", id)
    })
}

/// Reads a workflow channel's events.
async fn read_events(bus: &Bus, channel: &ChannelName) -> Result<Vec<WorkflowEvent>> {
    bus.register::<WorkflowRecord>();
    Ok(super::history::read_channel(bus, channel)
        .await?
        .iter()
        .filter_map(|e| e.decode_json::<WorkflowRecord>().ok())
        .map(|r| r.event)
        .collect())
}

/// A workflow entry in a supervisor.
pub(crate) struct WorkflowEntry {
    status: watch::Receiver<WorkflowStatus>,
    driver: Option<JoinHandle<()>>,
}

impl fmt::Debug for WorkflowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkflowEntry")
            .field("id", &self.status.borrow().id)
            .finish()
    }
}

impl WorkflowEntry {
    pub(crate) fn status(&self) -> WorkflowStatus {
        self.status.borrow().clone()
    }

    pub(crate) fn abort(mut self) {
        if let Some(driver) = self.driver.take() {
            driver.abort();
        }
    }
}

/// A started workflow: its id, its status now, and a way to wait for the end.
#[derive(Debug, Clone)]
pub struct WorkflowHandle {
    id: String,
    status: watch::Receiver<WorkflowStatus>,
}

impl WorkflowHandle {
    /// The workflow id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The status now.
    pub fn status(&self) -> WorkflowStatus {
        self.status.borrow().clone()
    }

    /// Waits until the workflow is over and returns its final status (or the last one
    /// seen, if its supervisor shut down first).
    pub async fn wait(mut self) -> WorkflowStatus {
        let _ = self.status.wait_for(|s| s.state.is_final()).await;
        let status = self.status.borrow().clone();
        status
    }
}

struct Driver {
    supervisor: Supervisor,
    channel: ChannelName,
    folded: Mutex<Folded>,
    status: watch::Sender<WorkflowStatus>,
}

impl Driver {
    /// Publishes `event`, then applies it.
    async fn record(&self, event: WorkflowEvent) {
        let id = self.folded.lock().status.id.clone();
        let record = WorkflowRecord {
            workflow_id: id.clone(),
            event,
        };
        let options = PublishOptions::new()
            .sender(self.supervisor.id().to_string())
            .correlation(id);
        if let Err(e) = self
            .supervisor
            .bus()
            .publish_with(&self.channel, &record, &options)
            .await
        {
            tracing::error!(error = %e, channel = %self.channel, "workflow event not stored; a restart would not see it");
        }
        let status = {
            let mut folded = self.folded.lock();
            folded.apply(&record.event);
            folded.status.clone()
        };
        self.status.send_replace(status);
    }

    fn now(&self) -> DateTime<Utc> {
        self.supervisor.bus().clock().now()
    }

    fn resolve(
        &self,
        inputs: &BTreeMap<String, Input>,
    ) -> std::result::Result<serde_json::Value, String> {
        let folded = self.folded.lock();
        let mut object = serde_json::Map::new();
        for (name, input) in inputs {
            let value = match input {
                Input::Value { value } => value.clone(),
                Input::Workflow { pointer } => {
                    folded.input.pointer(pointer).cloned().ok_or_else(|| {
                        format!(
                            "input '{name}': pointer '{pointer}' not found in the workflow input"
                        )
                    })?
                }
                Input::Step { step, pointer } => {
                    let output = folded
                        .step(step)
                        .and_then(|s| s.output.as_ref())
                        .ok_or_else(|| format!("input '{name}': step '{step}' has no output"))?;
                    output.pointer(pointer).cloned().ok_or_else(|| {
                        format!("input '{name}': pointer '{pointer}' not found in the output of step '{step}'")
                    })?
                }
            };
            object.insert(name.clone(), value);
        }
        Ok(serde_json::Value::Object(object))
    }

    async fn run_task(
        supervisor: Supervisor,
        spec: TaskSpec,
    ) -> std::result::Result<TaskOutcome, String> {
        let handle = supervisor.submit(spec).await.map_err(|e| e.to_string())?;
        Ok(handle.wait().await)
    }

    async fn drive(self: Arc<Self>) {
        let (spec, workflow_id) = {
            let f = self.folded.lock();
            (f.spec.clone(), f.status.id.clone())
        };
        let deps: HashMap<String, Vec<String>> = spec
            .steps
            .iter()
            .map(|s| (s.id.clone(), s.dependencies()))
            .collect();
        let limit = spec.max_parallel.unwrap_or(usize::MAX);
        type Running = FuturesUnordered<
            BoxFuture<'static, (String, std::result::Result<TaskOutcome, String>)>,
        >;
        let mut running: Running = FuturesUnordered::new();
        let in_compensation = self.folded.lock().status.state == WorkflowState::Compensating;
        if !in_compensation {
            // Steps that were running when an earlier supervisor stopped start again.
            let resumed: Vec<String> = self
                .folded
                .lock()
                .status
                .steps
                .iter()
                .filter(|s| s.state == StepState::Running)
                .map(|s| s.id.clone())
                .collect();
            for step in resumed {
                self.start_step(&spec, &workflow_id, &step, &mut running)
                    .await;
            }
            let mut stopping = self
                .folded
                .lock()
                .status
                .steps
                .iter()
                .any(|s| s.state == StepState::Failed)
                && spec.on_failure != FailurePolicy::Continue;
            loop {
                if !stopping {
                    loop {
                        let (ready, skip) = {
                            let folded = self.folded.lock();
                            let state_of = |id: &str| folded.step(id).map(|s| s.state);
                            let mut ready = Vec::new();
                            let mut skip = Vec::new();
                            for step in &folded.status.steps {
                                if step.state != StepState::Waiting {
                                    continue;
                                }
                                let my = deps.get(&step.id).map(Vec::as_slice).unwrap_or(&[]);
                                if my.iter().all(|d| state_of(d) == Some(StepState::Completed)) {
                                    ready.push(step.id.clone());
                                } else if let Some(bad) = my.iter().find(|d| {
                                    matches!(
                                        state_of(d),
                                        Some(StepState::Failed | StepState::Skipped)
                                    )
                                }) {
                                    skip.push((step.id.clone(), bad.clone()));
                                }
                            }
                            (ready, skip)
                        };
                        let skipped = !skip.is_empty();
                        for (step, bad) in skip {
                            let at = self.now();
                            self.record(WorkflowEvent::StepSkipped {
                                step,
                                reason: format!("dependency '{bad}' did not complete"),
                                at,
                            })
                            .await;
                        }
                        let mut started = false;
                        for step in ready {
                            if running.len() >= limit {
                                break;
                            }
                            self.start_step(&spec, &workflow_id, &step, &mut running)
                                .await;
                            started = true;
                        }
                        if !skipped && !started {
                            break;
                        }
                        if running.len() >= limit && !skipped {
                            break;
                        }
                    }
                }
                let Some((step, result)) = running.next().await else {
                    break;
                };
                let at = self.now();
                match result {
                    Ok(outcome) if outcome.status == TaskStatus::Completed => {
                        self.record(WorkflowEvent::StepCompleted {
                            step,
                            output: outcome.output.unwrap_or(serde_json::Value::Null),
                            agent: outcome.agent,
                            attempts: outcome.attempts,
                            at,
                        })
                        .await;
                    }
                    other => {
                        let error = match other {
                            Ok(outcome) => format!(
                                "task {} {}: {}",
                                outcome.task_id,
                                outcome.status.as_str(),
                                outcome.error.unwrap_or_default()
                            ),
                            Err(e) => e,
                        };
                        self.record(WorkflowEvent::StepFailed { step, error, at })
                            .await;
                        if spec.on_failure != FailurePolicy::Continue {
                            stopping = true;
                        }
                    }
                }
            }
        }
        // Decide the end.
        let failed: Vec<String> = self
            .folded
            .lock()
            .status
            .steps
            .iter()
            .filter(|s| s.state == StepState::Failed)
            .map(|s| s.id.clone())
            .collect();
        if failed.is_empty() && !in_compensation {
            let waiting: Vec<String> = self
                .folded
                .lock()
                .status
                .steps
                .iter()
                .filter(|s| s.state != StepState::Completed)
                .map(|s| s.id.clone())
                .collect();
            let at = self.now();
            let (state, error) = if waiting.is_empty() {
                (WorkflowState::Completed, None)
            } else {
                (
                    WorkflowState::Failed,
                    Some(format!("steps never ran: {}", waiting.join(", "))),
                )
            };
            self.record(WorkflowEvent::Finished { state, error, at })
                .await;
            return;
        }
        let error = format!("step(s) failed: {}", failed.join(", "));
        if spec.on_failure != FailurePolicy::Compensate {
            // Steps never started are recorded as skipped, so the status is complete.
            let never: Vec<String> = self
                .folded
                .lock()
                .status
                .steps
                .iter()
                .filter(|s| s.state == StepState::Waiting)
                .map(|s| s.id.clone())
                .collect();
            for step in never {
                let at = self.now();
                self.record(WorkflowEvent::StepSkipped {
                    step,
                    reason: "the workflow failed first".into(),
                    at,
                })
                .await;
            }
            let at = self.now();
            self.record(WorkflowEvent::Finished {
                state: WorkflowState::Failed,
                error: Some(error),
                at,
            })
            .await;
            return;
        }
        self.compensate(&spec, &workflow_id, error).await;
    }

    async fn start_step(
        &self,
        spec: &WorkflowSpec,
        workflow_id: &str,
        step_id: &str,
        running: &mut FuturesUnordered<
            BoxFuture<'static, (String, std::result::Result<TaskOutcome, String>)>,
        >,
    ) {
        let Some(step) = spec.steps.iter().find(|s| s.id == step_id) else {
            return;
        };
        let task_id = format!("{workflow_id}-{step_id}-{}", uuid::Uuid::now_v7().simple());
        let at = self.now();
        self.record(WorkflowEvent::StepStarted {
            step: step_id.to_string(),
            task_id: task_id.clone(),
            at,
        })
        .await;
        let step_name = step_id.to_string();
        match self.resolve(&step.inputs) {
            Ok(input) => {
                let mut task = TaskSpec::to(step.target.clone())
                    .input(input)
                    .id(task_id)
                    .wait_for_agent(true);
                task.timeout = step.timeout;
                task.retries = step.retries;
                task.workflow = Some(WorkflowRef {
                    workflow_id: workflow_id.to_string(),
                    step: step_id.to_string(),
                });
                let supervisor = self.supervisor.clone();
                running.push(Box::pin(async move {
                    (step_name, Self::run_task(supervisor, task).await)
                }));
            }
            Err(error) => {
                running.push(Box::pin(async move { (step_name, Err(error)) }));
            }
        }
    }

    async fn compensate(&self, spec: &WorkflowSpec, workflow_id: &str, error: String) {
        let owed: Vec<String> = {
            let folded = self.folded.lock();
            folded
                .completion_order
                .iter()
                .rev()
                .filter(|id| {
                    spec.steps
                        .iter()
                        .any(|s| &s.id == *id && s.compensate.is_some())
                })
                .filter(|id| {
                    !matches!(
                        folded.step(id).map(|s| s.state),
                        Some(StepState::Compensated | StepState::CompensationFailed)
                    )
                })
                .cloned()
                .collect()
        };
        for step_id in owed {
            let Some(comp) = spec
                .steps
                .iter()
                .find(|s| s.id == step_id)
                .and_then(|s| s.compensate.clone())
            else {
                continue;
            };
            let task_id = format!(
                "{workflow_id}-undo-{step_id}-{}",
                uuid::Uuid::now_v7().simple()
            );
            let at = self.now();
            self.record(WorkflowEvent::CompensationStarted {
                step: step_id.clone(),
                task_id: task_id.clone(),
                at,
            })
            .await;
            let result = match self.resolve(&comp.inputs) {
                Ok(input) => {
                    let mut task = TaskSpec::to(comp.target.clone())
                        .input(input)
                        .id(task_id)
                        .wait_for_agent(true);
                    task.timeout = comp.timeout;
                    task.retries = comp.retries;
                    task.workflow = Some(WorkflowRef {
                        workflow_id: workflow_id.to_string(),
                        step: format!("undo-{step_id}"),
                    });
                    Self::run_task(self.supervisor.clone(), task).await
                }
                Err(e) => Err(e),
            };
            let at = self.now();
            match result {
                Ok(outcome) if outcome.status == TaskStatus::Completed => {
                    self.record(WorkflowEvent::CompensationCompleted { step: step_id, at })
                        .await;
                }
                other => {
                    let error = match other {
                        Ok(o) => format!(
                            "task {} {}: {}",
                            o.task_id,
                            o.status.as_str(),
                            o.error.unwrap_or_default()
                        ),
                        Err(e) => e,
                    };
                    self.record(WorkflowEvent::CompensationFailed {
                        step: step_id,
                        error,
                        at,
                    })
                    .await;
                }
            }
        }
        let any_failed = self
            .folded
            .lock()
            .status
            .compensations
            .iter()
            .any(|c| c.state == "failed");
        let at = self.now();
        let state = if any_failed {
            WorkflowState::CompensationFailed
        } else {
            WorkflowState::Compensated
        };
        self.record(WorkflowEvent::Finished {
            state,
            error: Some(error),
            at,
        })
        .await;
    }
}

fn launch(
    supervisor: &Supervisor,
    folded: Folded,
    channel: ChannelName,
    first: Option<WorkflowEvent>,
) -> WorkflowHandle {
    let id = folded.status.id.clone();
    let (tx, rx) = watch::channel(folded.status.clone());
    let driver = Arc::new(Driver {
        supervisor: supervisor.clone(),
        channel,
        folded: Mutex::new(folded),
        status: tx,
    });
    let task = tokio::spawn(async move {
        if let Some(event) = first {
            driver.record(event).await;
        }
        driver.drive().await;
    });
    supervisor.inner.workflows.lock().insert(
        id.clone(),
        WorkflowEntry {
            status: rx.clone(),
            driver: Some(task),
        },
    );
    WorkflowHandle { id, status: rx }
}

pub(crate) async fn start(
    supervisor: &Supervisor,
    spec: WorkflowSpec,
    input: serde_json::Value,
) -> Result<WorkflowHandle> {
    spec.validate()?;
    let bus = supervisor.bus();
    bus.register::<WorkflowRecord>();
    let id = spec
        .id
        .clone()
        .unwrap_or_else(|| format!("wf-{}", uuid::Uuid::now_v7().simple()));
    let channel = workflow_channel(&id)?;
    if supervisor.inner.workflows.lock().contains_key(&id) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("workflow id '{id}' is already in use; leave the id empty for a fresh one"),
        ));
    }
    let at = bus.clock().now();
    let started = WorkflowEvent::Started {
        workflow_id: id.clone(),
        spec: spec.clone(),
        input: input.clone(),
        supervisor: supervisor.id().to_string(),
        at,
    };
    // The start is stored before anything runs, so a restart always knows of it.
    let record = WorkflowRecord {
        workflow_id: id.clone(),
        event: started,
    };
    bus.publish_with(
        &channel,
        &record,
        &PublishOptions::new()
            .sender(supervisor.id().to_string())
            .correlation(id.clone()),
    )
    .await?;
    let folded = Folded::new(&id, &spec, &input, supervisor.id(), at);
    Ok(launch(supervisor, folded, channel, None))
}

/// Reads every workflow channel and resumes the workflows that did not finish.
pub(crate) async fn resume(supervisor: &Supervisor) -> Result<Vec<String>> {
    let bus = supervisor.bus();
    bus.register::<WorkflowRecord>();
    let prefix = format!("{WORKFLOWS_PREFIX}.");
    let channels: Vec<ChannelName> = bus
        .transport()
        .stats()
        .await?
        .channels
        .into_iter()
        .filter(|c| c.channel.as_str().starts_with(&prefix) && c.last_sequence > 0)
        .map(|c| c.channel)
        .collect();
    let mut resumed = Vec::new();
    let mut seen = HashSet::new();
    for channel in channels {
        let events = read_events(bus, &channel).await?;
        let Some(folded) = Folded::from_events(&events) else {
            continue;
        };
        if folded.status.state.is_final() || !seen.insert(folded.status.id.clone()) {
            continue;
        }
        tracing::info!(workflow = %folded.status.id, "resuming workflow");
        resumed.push(folded.status.id.clone());
        let event = WorkflowEvent::Resumed {
            supervisor: supervisor.id().to_string(),
            at: bus.clock().now(),
        };
        launch(supervisor, folded, channel, Some(event));
    }
    Ok(resumed)
}
