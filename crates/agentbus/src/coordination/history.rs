//! Reading the coordination layer's history back from the bus, without a supervisor:
//! what `agentbus tasks` and `agentbus workflow status` show from any process.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::protocol::{TaskEvent, TaskStatus, TASK_EVENTS};
use crate::bus::Bus;
use crate::channel::{ChannelName, ChannelPattern};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{StartPosition, SubscribeOptions};

/// Reads `channel` from the earliest retained message up to the last one published
/// when the read began (its sequence from the engine's statistics). Empty when the
/// channel does not exist.
///
/// # Errors
/// Transport errors; [`ErrorKind::Timeout`] if the engine stops delivering for 10 s
/// before the last sequence.
pub(crate) async fn read_channel(bus: &Bus, channel: &ChannelName) -> Result<Vec<Envelope>> {
    let stats = bus.transport().stats().await?;
    let Some(last) = stats
        .channels
        .iter()
        .find(|c| &c.channel == channel)
        .map(|c| c.last_sequence)
    else {
        return Ok(Vec::new());
    };
    if last == 0 {
        return Ok(Vec::new());
    }
    let mut subscription = bus
        .subscribe(
            SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                .start(StartPosition::Earliest)
                .prefetch(1024)
                .max_deliveries(1),
        )
        .await?;
    let mut envelopes = Vec::new();
    loop {
        let batch = tokio::time::timeout(Duration::from_secs(10), subscription.next_batch(1024))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "reading '{channel}' stalled for 10 s before sequence {last}; the \
                         backend may be overloaded or the messages trimmed meanwhile"
                    ),
                )
                .with_context("channel", channel)
            })??;
        let _ = crate::transport::ack_all(&batch).await;
        let mut done = false;
        for delivery in batch {
            done |= delivery.sequence() >= last;
            envelopes.push(delivery.envelope().clone());
        }
        if done {
            return Ok(envelopes);
        }
    }
}

/// One task as its events on `_sys.tasks.events` describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    /// The task id.
    pub task_id: String,
    /// Its latest status.
    pub status: TaskStatus,
    /// The agent of the latest event that named one.
    pub agent: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The supervisor that tracks it.
    pub supervisor: String,
    /// The latest event's details.
    pub detail: String,
    /// When it was first seen.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Events recorded.
    pub events: usize,
}

/// Folds task events into one summary per task, oldest task first.
pub fn fold_tasks(events: &[TaskEvent]) -> Vec<TaskSummary> {
    let mut tasks: BTreeMap<String, TaskSummary> = BTreeMap::new();
    for event in events {
        let entry = tasks
            .entry(event.task_id.clone())
            .or_insert_with(|| TaskSummary {
                task_id: event.task_id.clone(),
                status: event.status,
                agent: None,
                attempts: 0,
                supervisor: event.supervisor.clone(),
                detail: String::new(),
                created_at: event.at,
                updated_at: event.at,
                events: 0,
            });
        entry.status = event.status;
        if event.agent_id.is_some() {
            entry.agent = event.agent_id.clone();
        }
        entry.attempts = entry.attempts.max(event.attempt);
        entry.supervisor = event.supervisor.clone();
        entry.detail = event.detail.clone();
        entry.updated_at = event.at;
        entry.events += 1;
    }
    let mut out: Vec<TaskSummary> = tasks.into_values().collect();
    out.sort_by(|a, b| {
        a.created_at
            .cmp(&b.created_at)
            .then(a.task_id.cmp(&b.task_id))
    });
    out
}

/// Reads `_sys.tasks.events` from the bus and folds it: every task the retained
/// events know of.
///
/// # Errors
/// Transport errors.
pub async fn read_tasks(bus: &Bus) -> Result<Vec<TaskSummary>> {
    bus.register::<TaskEvent>();
    let channel = ChannelName::new(TASK_EVENTS)?;
    let events: Vec<TaskEvent> = read_channel(bus, &channel)
        .await?
        .iter()
        .filter_map(|e| e.decode_json::<TaskEvent>().ok())
        .collect();
    Ok(fold_tasks(&events))
}
