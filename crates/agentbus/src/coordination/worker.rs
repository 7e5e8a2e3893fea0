//! The agent side of supervised tasks: a [`Worker`] announces itself, heartbeats
//! with its load, takes the tasks a supervisor assigns to it and reports back.
//!
//! Tasks arrive on `_sys.tasks.agent.<id>` (a named group per agent id, so a restarted
//! instance with the same id picks up what was queued), the handler runs under a
//! concurrency limit, and the worker reports `started`, then `completed` with the
//! output or `failed` with the error, to the supervisor that assigned it. A handler
//! panic is a retryable failure; the worker keeps running.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::protocol::{
    agent_task_channel, AgentLoad, CoordinationMessage, ReportOutcome, TaskAssignment, TaskReport,
    WorkflowRef, COORDINATION_BROADCAST,
};
use super::registry::Presence;
use crate::agent::AgentDescriptor;
use crate::bus::{Bus, PublishOptions};
use crate::channel::{ChannelName, ChannelPattern};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{Delivery, SubscribeOptions};

/// A task as the worker's handler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRequest {
    /// The task id.
    pub task_id: String,
    /// The attempt (1-based, over every agent tried).
    pub attempt: u32,
    /// The capability asked for, if any.
    pub capability: Option<String>,
    /// The input.
    pub input: serde_json::Value,
    /// The workflow step this task runs, if any.
    pub workflow: Option<WorkflowRef>,
}

/// A task failure returned by a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    retryable: bool,
}

impl TaskError {
    /// A failure another attempt may fix (the supervisor retries or escalates).
    pub fn retryable(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry can fix: the task fails at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            retryable: false,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

impl From<Error> for TaskError {
    fn from(error: Error) -> Self {
        TaskError {
            retryable: error.is_temporary(),
            message: error.to_string(),
        }
    }
}

impl From<String> for TaskError {
    fn from(message: String) -> Self {
        TaskError::retryable(message)
    }
}

impl From<&str> for TaskError {
    fn from(message: &str) -> Self {
        TaskError::retryable(message)
    }
}

type TaskHandler = Arc<
    dyn Fn(TaskRequest) -> BoxFuture<'static, std::result::Result<serde_json::Value, TaskError>>
        + Send
        + Sync,
>;

type CoordinationHandler = Arc<dyn Fn(CoordinationMessage) + Send + Sync>;

/// Builds a [`Worker`].
pub struct WorkerBuilder {
    descriptor: AgentDescriptor,
    heartbeat: Duration,
    concurrency: usize,
    handler: Option<TaskHandler>,
    on_coordination: Option<CoordinationHandler>,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("descriptor", &self.descriptor)
            .field("heartbeat", &self.heartbeat)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl WorkerBuilder {
    /// Heartbeat every `interval` (default 1 s).
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Work on up to `n` tasks at once (default 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The task handler: input in, output or [`TaskError`] out.
    pub fn handle<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(TaskRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<serde_json::Value, TaskError>> + Send + 'static,
    {
        self.handler = Some(Arc::new(move |request| Box::pin(handler(request))));
        self
    }

    /// Calls `f` with every coordination message a supervisor broadcasts on
    /// `_sys.coord.broadcast` (pause, resume, configuration…), in order, while the
    /// worker runs. `f` should return quickly; hand long work to a task.
    pub fn on_coordination<F>(mut self, f: F) -> Self
    where
        F: Fn(CoordinationMessage) + Send + Sync + 'static,
    {
        self.on_coordination = Some(Arc::new(f));
        self
    }

    /// Subscribes to the agent's task channel, announces it and starts heartbeating.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] without a handler; [`ErrorKind::InvalidChannel`]
    /// for an id that is not a channel token; subscription and publish errors.
    pub async fn spawn(self, bus: &Bus) -> Result<Worker> {
        let handler = self.handler.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "worker '{}' has no task handler; add one with `.handle(|task| async {{ .. }})`",
                    self.descriptor.id
                ),
            )
        })?;
        bus.register::<TaskAssignment>();
        bus.register::<TaskReport>();
        let channel = agent_task_channel(&self.descriptor.id)?;
        let subscription = bus
            .subscribe(
                SubscribeOptions::new(ChannelPattern::from(channel))
                    .group(format!("worker-{}", self.descriptor.id))
                    // The supervisor times tasks out; the bus only redelivers what a
                    // crashed instance held, long after.
                    .ack_wait(Duration::from_secs(600))
                    .max_deliveries(3)
                    .prefetch(self.concurrency * 2),
            )
            .await?;
        let in_flight = Arc::new(AtomicU32::new(0));
        let queued = Arc::new(AtomicU32::new(0));
        let capacity = u32::try_from(self.concurrency).unwrap_or(u32::MAX);
        let load = {
            let in_flight = in_flight.clone();
            let queued = queued.clone();
            move || AgentLoad {
                in_flight: in_flight.load(Ordering::Acquire),
                queue_depth: queued.load(Ordering::Acquire),
                capacity,
            }
        };
        let (stop, stopped) = watch::channel(false);
        let listener = match self.on_coordination {
            Some(f) => {
                bus.register::<CoordinationMessage>();
                let mut broadcasts = bus
                    .subscribe_typed::<CoordinationMessage>(SubscribeOptions::new(
                        ChannelPattern::new(COORDINATION_BROADCAST)?,
                    ))
                    .await?;
                let mut stop_listening = stopped.clone();
                Some(tokio::spawn(async move {
                    loop {
                        let next = tokio::select! {
                            _ = stop_listening.changed() => return,
                            next = broadcasts.next() => next,
                        };
                        match next {
                            Ok(typed) => {
                                let _ = typed.delivery.ack().await;
                                f(typed.message);
                            }
                            Err(e) if e.kind() == ErrorKind::Closed => return,
                            Err(e) => tracing::warn!(error = %e, "bad coordination message"),
                        }
                    }
                }))
            }
            None => None,
        };
        let state = LoopState {
            bus: bus.clone(),
            agent_id: self.descriptor.id.clone(),
            handler,
            permits: Arc::new(Semaphore::new(self.concurrency)),
            in_flight: in_flight.clone(),
            queued: queued.clone(),
        };
        let task = tokio::spawn(task_loop(state, subscription, stopped));
        let presence = Presence::start(bus, self.descriptor.clone(), self.heartbeat, load).await?;
        Ok(Worker {
            descriptor: self.descriptor,
            presence: Some(presence),
            stop,
            task: Some(task),
            listener,
            in_flight,
        })
    }
}

/// A running worker. Dropping it stops it as a crash would (no goodbye).
pub struct Worker {
    descriptor: AgentDescriptor,
    presence: Option<Presence>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    listener: Option<JoinHandle<()>>,
    in_flight: Arc<AtomicU32>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.descriptor.id)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}

impl Worker {
    /// Starts building a worker for the agent `descriptor` describes.
    ///
    /// # Examples
    ///
    /// ```
    /// use agentbus::{AgentDescriptor, Bus};
    /// use agentbus::coordination::Worker;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> agentbus::Result<()> {
    /// let bus = Bus::memory();
    /// let worker = Worker::builder(AgentDescriptor::new("upper-1", "upper").capability("upper"))
    ///     .handle(|task| async move {
    ///         let text = task.input["text"].as_str().unwrap_or_default().to_uppercase();
    ///         Ok(serde_json::json!({ "text": text }))
    ///     })
    ///     .spawn(&bus)
    ///     .await?;
    /// worker.stop(std::time::Duration::from_secs(1)).await;
    /// # Ok(()) }
    /// ```
    pub fn builder(descriptor: AgentDescriptor) -> WorkerBuilder {
        WorkerBuilder {
            descriptor,
            heartbeat: Duration::from_secs(1),
            concurrency: 1,
            handler: None,
            on_coordination: None,
        }
    }

    /// The descriptor.
    pub fn descriptor(&self) -> &AgentDescriptor {
        &self.descriptor
    }

    /// Tasks being worked on now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Stops taking tasks, lets running ones finish for up to `timeout`, then says
    /// goodbye. Tasks still running at the timeout are abandoned (the supervisor times
    /// them out and escalates).
    pub async fn stop(mut self, timeout: Duration) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(timeout, &mut task).await.is_err() {
                task.abort();
            }
        }
        if let Some(presence) = self.presence.take() {
            presence.stop().await;
        }
    }

    /// Stops at once as a crash would: no more heartbeats, no goodbye, running tasks
    /// dropped without a report. Registries notice by the missed heartbeats.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(presence) = self.presence.take() {
            presence.abort();
        }
    }
}

struct LoopState {
    bus: Bus,
    agent_id: String,
    handler: TaskHandler,
    permits: Arc<Semaphore>,
    in_flight: Arc<AtomicU32>,
    queued: Arc<AtomicU32>,
}

async fn task_loop(
    state: LoopState,
    mut subscription: crate::bus::Subscription,
    mut stopped: watch::Receiver<bool>,
) {
    let state = Arc::new(state);
    let mut running = JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        let delivery = tokio::select! {
            _ = stopped.changed() => break,
            next = subscription.next() => next,
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(e) if e.kind() == ErrorKind::Closed => break,
            Err(e) => {
                tracing::warn!(agent = %state.agent_id, error = %e, "task message dead-lettered");
                continue;
            }
        };
        state.queued.fetch_add(1, Ordering::AcqRel);
        let state = state.clone();
        running.spawn(async move {
            let Ok(permit) = state.permits.clone().acquire_owned().await else {
                return;
            };
            state.queued.fetch_sub(1, Ordering::AcqRel);
            state.in_flight.fetch_add(1, Ordering::AcqRel);
            run_task(&state, delivery).await;
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
            drop(permit);
        });
    }
    while running.join_next().await.is_some() {}
}

async fn run_task(state: &LoopState, delivery: Delivery) {
    let assignment = match delivery.envelope().decode_json::<TaskAssignment>() {
        Ok(a) => a,
        Err(e) => {
            let _ = delivery
                .reject(crate::envelope::DeadReason::Schema, e.to_string())
                .await;
            return;
        }
    };
    let Ok(report_to) = ChannelName::new(&assignment.report_to) else {
        let _ = delivery
            .reject(
                crate::envelope::DeadReason::Rejected,
                format!("invalid report channel '{}'", assignment.report_to),
            )
            .await;
        return;
    };
    let options = PublishOptions::new()
        .sender(state.agent_id.clone())
        .correlation(assignment.task_id.clone());
    let report = |outcome: ReportOutcome, duration: Duration| TaskReport {
        task_id: assignment.task_id.clone(),
        attempt: assignment.attempt,
        agent_id: state.agent_id.clone(),
        outcome,
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        at: state.bus.clock().now(),
    };
    let _ = state
        .bus
        .publish_with(
            &report_to,
            &report(ReportOutcome::Started, Duration::ZERO),
            &options,
        )
        .await;
    let request = TaskRequest {
        task_id: assignment.task_id.clone(),
        attempt: assignment.attempt,
        capability: assignment.capability.clone(),
        input: assignment.input.clone(),
        workflow: assignment.workflow.clone(),
    };
    let started = Instant::now();
    let outcome = AssertUnwindSafe((state.handler)(request))
        .catch_unwind()
        .await;
    let outcome = match outcome {
        Ok(Ok(output)) => ReportOutcome::Completed { output },
        Ok(Err(error)) => ReportOutcome::Failed {
            error: error.message,
            retryable: error.retryable,
        },
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            ReportOutcome::Failed {
                error: format!("task handler panicked: {text}"),
                retryable: true,
            }
        }
    };
    let sent = state
        .bus
        .publish_with(&report_to, &report(outcome, started.elapsed()), &options)
        .await;
    match sent {
        Ok(_) => {
            let _ = delivery.ack().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, task = %assignment.task_id, "task report not published; will be redelivered");
            let _ = delivery
                .nack(Duration::from_millis(500), Some(e.to_string()))
                .await;
        }
    }
}
