//! The context service of seed 004: peers answer `context.request` broadcasts from
//! their own interaction history, and a requester merges what came back within a
//! timeout.
//!
//! - Each agent keeps its history in an [`InteractionStore`], fed by an
//!   [`AgentHistory`] observer that records only the events that involve it.
//! - [`ContextService::spawn`] runs an agent that handles [`ContextRequest`]s on
//!   [`CONTEXT_REQUEST_CHANNEL`] and replies with a [`ContextReply`] of the
//!   interactions it had with the target agent (and thread, and time window).
//! - [`request_context`] broadcasts one request through the bus's scatter-gather (the
//!   replies come back on the requester's private inbox, as seed 004's per-requester
//!   response topics) and returns a [`ContextResult`]: who answered, who timed out,
//!   and the merged items, deduplicated by message id and in time order.

use std::sync::Arc;
use std::time::Duration;

use agentbus::{
    Agent, AgentDescriptor, Bus, BusEvent, BusObserver, ChannelName, Context, GatherSpec,
    HandlerOptions, Message, Result,
};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::store::{Interaction, InteractionStore, Query};

/// Where context requests are broadcast.
pub const CONTEXT_REQUEST_CHANNEL: &str = "agent.context.request";

/// Seed 004's `REQUEST_CONTEXT`: what a requester wants to know about `target_agent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ContextRequest {
    /// Who asks (e.g. a reconstruction module).
    pub requester: String,
    /// The agent whose interactions are wanted (e.g. one that failed).
    pub target_agent: String,
    /// Only this thread (correlation id).
    #[serde(default)]
    pub thread_id: Option<String>,
    /// Only the last this many seconds.
    #[serde(default)]
    pub window_seconds: Option<u64>,
    /// At most this many items per peer (default 100).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl Message for ContextRequest {
    const KIND: &'static str = "context.request";
}

/// One remembered interaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ContextItem {
    /// When the message was created (RFC 3339).
    #[schemars(with = "String")]
    pub at: DateTime<Utc>,
    /// Its id.
    pub message_id: String,
    /// Its kind.
    pub kind: String,
    /// Its channel.
    pub channel: String,
    /// Who sent it.
    pub sender: Option<String>,
    /// Who it was for.
    pub receiver: Option<String>,
    /// Its thread.
    pub thread_id: Option<String>,
    /// The payload as JSON, when it was JSON.
    pub payload: Option<serde_json::Value>,
}

impl ContextItem {
    fn from_interaction(row: Interaction) -> ContextItem {
        ContextItem {
            at: row.sent_at,
            message_id: row.message_id,
            kind: row.kind,
            channel: row.channel,
            sender: row.sender,
            receiver: row.receiver.or(row.agent),
            thread_id: row.correlation_id,
            payload: row.payload.and_then(|p| serde_json::from_str(&p).ok()),
        }
    }
}

/// Seed 004's `PROVIDE_CONTEXT`: one peer's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ContextReply {
    /// The answering agent.
    pub agent: String,
    /// What it remembers, oldest first.
    pub items: Vec<ContextItem>,
}

impl Message for ContextReply {
    const KIND: &'static str = "context.reply";
}

/// What [`request_context`] collected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextResult {
    /// Peers that answered in time, in arrival order.
    pub responders: Vec<String>,
    /// Expected peers that did not answer in time.
    pub timed_out: Vec<String>,
    /// Every item of every reply, deduplicated by message id, oldest first.
    pub items: Vec<ContextItem>,
    /// How many items each responder sent (before deduplication), in responder order.
    pub items_per_responder: Vec<usize>,
}

/// Records the events that involve one agent (it sent the message, was its receiver,
/// or handled it) into that agent's own store.
#[derive(Debug)]
pub struct AgentHistory {
    agent: String,
    store: Arc<InteractionStore>,
}

impl AgentHistory {
    /// `agent`'s history in `store`.
    pub fn new(agent: impl Into<String>, store: Arc<InteractionStore>) -> Self {
        AgentHistory {
            agent: agent.into(),
            store,
        }
    }
}

impl BusObserver for AgentHistory {
    fn on_event(&self, event: &BusEvent<'_>) {
        let (row, header) = Interaction::from_event(event);
        let involved = [&row.sender, &row.receiver, &row.agent]
            .into_iter()
            .any(|who| who.as_deref() == Some(self.agent.as_str()));
        // Context traffic itself is not history worth answering with.
        if involved && !row.kind.starts_with("context.") {
            self.store.record(row, header);
        }
    }
}

/// Answers context requests from an agent's store.
#[derive(Debug)]
pub struct ContextService;

impl ContextService {
    /// The items `store` holds for `request`, as `agent` would answer it: published
    /// messages that involve the target agent, in the thread and window asked for.
    ///
    /// # Errors
    /// The store's errors.
    pub fn answer(
        store: &InteractionStore,
        agent: &str,
        request: &ContextRequest,
        now: DateTime<Utc>,
    ) -> Result<ContextReply> {
        let mut query = Query::new()
            .agent(request.target_agent.clone())
            .events(["published"])
            .limit(request.limit.unwrap_or(100).clamp(1, 10_000));
        query.correlation_id = request.thread_id.clone();
        if let Some(window) = request.window_seconds {
            query.since = now.checked_sub_signed(chrono::Duration::seconds(
                i64::try_from(window).unwrap_or(i64::MAX / 1000),
            ));
        }
        let items = store
            .query(&query)?
            .into_iter()
            .filter(|row| !row.kind.starts_with("context."))
            .map(ContextItem::from_interaction)
            .collect();
        Ok(ContextReply {
            agent: agent.to_string(),
            items,
        })
    }

    /// Spawns agent `agent_id` answering [`ContextRequest`]s on
    /// [`CONTEXT_REQUEST_CHANNEL`] from `store`. `delay` holds each answer back (to
    /// show a slow peer in demos and tests; `Duration::ZERO` otherwise).
    ///
    /// # Errors
    /// Subscription errors.
    pub async fn spawn(
        bus: &Bus,
        agent_id: &str,
        store: Arc<InteractionStore>,
        delay: Duration,
    ) -> Result<Agent> {
        let descriptor = AgentDescriptor::new(agent_id, agent_id)
            .capability("context")
            .sends::<ContextReply>();
        let id = agent_id.to_string();
        Agent::builder(descriptor)
            .handle_with(
                CONTEXT_REQUEST_CHANNEL,
                // Every peer answers every request: a group of its own per agent.
                HandlerOptions::default().max_deliveries(1),
                move |ctx: Context, request: ContextRequest| {
                    let store = store.clone();
                    let id = id.clone();
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let now = ctx.bus().clock().now();
                        let reply = ContextService::answer(&store, &id, &request, now)?;
                        tracing::debug!(agent = %id, items = reply.items.len(), "context reply");
                        ctx.reply(&reply).await?;
                        Ok(())
                    }
                },
            )
            .spawn(bus)
            .await
    }
}

/// Broadcasts `request` and collects the replies of `peers` for at most `timeout`.
///
/// # Errors
/// Publish errors. No answer at all is a result with every peer in `timed_out`.
pub async fn request_context(
    bus: &Bus,
    request: &ContextRequest,
    peers: &[String],
    timeout: Duration,
) -> Result<ContextResult> {
    let channel = ChannelName::new(CONTEXT_REQUEST_CHANNEL)?;
    let mut envelope = bus.envelope(&channel, request, &agentbus::PublishOptions::new())?;
    envelope.header.sender = Some(request.requester.clone());
    let spec = GatherSpec::new(timeout).expect(peers.iter().cloned());
    let raw = bus.gather_envelope(envelope, &spec).await?;
    let mut result = ContextResult {
        responders: Vec::new(),
        timed_out: raw.missing,
        items: Vec::new(),
        items_per_responder: Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    for reply in raw.replies {
        let reply: ContextReply = match reply.decode_json() {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(error = %e, "context reply skipped");
                continue;
            }
        };
        result.responders.push(reply.agent.clone());
        result.items_per_responder.push(reply.items.len());
        for item in reply.items {
            if seen.insert(item.message_id.clone()) {
                result.items.push(item);
            }
        }
    }
    result.items.sort_by(|a, b| {
        a.at.cmp(&b.at)
            .then_with(|| a.message_id.cmp(&b.message_id))
    });
    Ok(result)
}
