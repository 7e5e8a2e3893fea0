//! The delivery state machine of the memory engine, free of locks and tasks.
//!
//! Every channel is a log: four priority lanes, each a deque of messages in sequence
//! order. A group reads the logs of the channels its pattern matches through a cursor
//! per (channel, lane); a message the cursor has passed but the group has not settled
//! lives in the group's `pending` map as in flight, scheduled (delayed or nacked with a
//! delay) or ready (due for redelivery). Deliveries pick, among everything ready, the
//! highest priority and then the oldest message.
//!
//! The durable log engine (`agentbus-file`) drives this same machine through
//! [`crate::engine_core`]: every call is deterministic given its inputs (`now` and
//! the arguments; dead-letter ids too once [`State::deterministic_dead_ids`] is set), so
//! replaying a journal of calls rebuilds the state exactly.
//!
//! Retention trims a channel's log from the front. Messages every group has settled go
//! first; only then does the channel's discard policy decide between dropping unread
//! messages (counted) and refusing the publish with `Full`.

mod image;

pub use image::{
    ChannelImage, DedupImage, GroupImage, MemberImage, MessageImage, PendingImage,
    PendingImageState, StateImage, TimerImage,
};

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::channel::{ChannelName, ChannelPattern};
use crate::envelope::{earlier, later, DeadReason, Envelope, MessageId, Priority};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{
    ChannelConfig, ChannelStats, DeadLetter, DeadLetterFilter, Discard, EngineStats, GroupStats,
    PublishReceipt, Settlement, StartPosition, SubscribeOptions,
};

/// A stored message. `key` is unique across the engine and is the delivery token.
#[derive(Debug)]
pub struct Stored {
    pub key: u64,
    pub sequence: u64,
    /// Position in its priority lane; contiguous per lane, so a cursor finds its next
    /// message by subtraction.
    pub lane_index: u64,
    pub channel: usize,
    /// Stored with `attempt = 1`, so a first delivery shares it without copying.
    pub envelope: Arc<Envelope>,
    pub stored_at: DateTime<Utc>,
    pub size: u64,
}

type Msg = Arc<Stored>;

#[derive(Debug)]
struct ChannelState {
    name: ChannelName,
    config: ChannelConfig,
    lanes: [VecDeque<Msg>; 4],
    /// The lane index the next message of each lane gets.
    lane_next: [u64; 4],
    next_sequence: u64,
    messages: u64,
    bytes: u64,
    published: u64,
    dropped: u64,
    /// Groups whose pattern matches this channel.
    groups: Vec<GroupId>,
}

impl ChannelState {
    /// The message a cursor at lane index `cursor` reads next, if any.
    fn at_cursor(&self, lane: usize, cursor: u64) -> Option<&Msg> {
        let messages = &self.lanes[lane];
        let front = messages
            .front()
            .map_or(self.lane_next[lane], |m| m.lane_index);
        messages.get(cursor.saturating_sub(front) as usize)
    }

    /// How many messages a cursor at `cursor` has not read yet.
    fn unread(&self, lane: usize, cursor: u64) -> u64 {
        let front = self.lanes[lane]
            .front()
            .map_or(self.lane_next[lane], |m| m.lane_index);
        self.lane_next[lane].saturating_sub(cursor.max(front))
    }

    fn oldest_lane(&self) -> Option<usize> {
        (0..4)
            .filter_map(|lane| self.lanes[lane].front().map(|m| (m.sequence, lane)))
            .min()
            .map(|(_, lane)| lane)
    }
}

pub type GroupId = u64;
pub type MemberId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingState {
    InFlight { member: MemberId },
    Scheduled,
    Ready,
}

#[derive(Debug)]
struct Pending {
    msg: Msg,
    attempts: u32,
    state: PendingState,
    /// Bumped on every state change, so stale timers are ignored.
    generation: u64,
    last_error: Option<String>,
}

/// Orders ready messages: higher priority first, then older (smaller key).
#[derive(Debug, PartialEq, Eq)]
struct ReadyEntry {
    priority: Priority,
    key: u64,
}

impl Ord for ReadyEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.key.cmp(&self.key))
    }
}

impl PartialOrd for ReadyEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl GroupState {
    /// Pops ack-wait entries at the front whose delivery was settled since, so the
    /// queue holds roughly the unsettled deliveries only.
    fn drop_settled_deadlines(&mut self) {
        while let Some(&(_, key, generation)) = self.ack_deadlines.front() {
            let live = self.pending.get(&key).is_some_and(|p| {
                p.generation == generation && matches!(p.state, PendingState::InFlight { .. })
            });
            if live {
                break;
            }
            self.ack_deadlines.pop_front();
        }
    }
}

#[derive(Debug)]
struct Member {
    prefetch: usize,
    in_flight: usize,
}

#[derive(Debug)]
struct GroupState {
    name: Arc<str>,
    pattern: ChannelPattern,
    ephemeral: bool,
    ack_wait: Duration,
    max_deliveries: u32,
    /// Next sequence to look at, per channel index and lane.
    cursors: HashMap<usize, [u64; 4]>,
    pending: HashMap<u64, Pending>,
    ready: BinaryHeap<ReadyEntry>,
    /// Ack-wait expiries in delivery order. The ack wait is fixed per group, so this is
    /// sorted by due time without a heap; settled entries are skipped by generation.
    ack_deadlines: VecDeque<(DateTime<Utc>, u64, u64)>,
    members: HashMap<MemberId, Member>,
    delivered: u64,
    acked: u64,
    redelivered: u64,
    dead_lettered: u64,
}

/// A timer: at `due`, look at `key` in `group`; act if `generation` still matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    due: DateTime<Utc>,
    group: GroupId,
    key: u64,
    generation: u64,
}

/// One delivery handed out by [`State::take`].
#[derive(Debug)]
pub struct Handout {
    pub envelope: Arc<Envelope>,
    pub sequence: u64,
    pub key: u64,
}

impl Handout {
    /// Turns a batch of handouts into deliveries of `group`, each settled through
    /// `settler` with its key as the token (what every engine on this state machine
    /// hands its consumers).
    pub fn into_deliveries(
        handouts: Vec<Handout>,
        group: &Arc<str>,
        settler: &Arc<dyn crate::transport::Settler>,
    ) -> Vec<crate::transport::Delivery> {
        handouts
            .into_iter()
            .map(|h| {
                crate::transport::Delivery::new(
                    h.envelope,
                    h.sequence,
                    group.clone(),
                    h.key,
                    settler.clone(),
                )
            })
            .collect()
    }
}

/// What [`State::take`] found.
#[derive(Debug)]
pub enum Take {
    /// Deliveries (maybe with more ready behind them).
    Some(Vec<Handout>, bool),
    /// Nothing ready now.
    Empty,
    /// The member holds `prefetch` unsettled deliveries.
    PrefetchFull,
}

/// Every group to wake after a state change.
pub type Wake = Vec<GroupId>;

#[derive(Debug, Default)]
pub struct State {
    channels: Vec<ChannelState>,
    channel_index: HashMap<ChannelName, usize>,
    channel_configs: Vec<(ChannelPattern, ChannelConfig)>,
    groups: HashMap<GroupId, GroupState>,
    group_names: HashMap<Arc<str>, GroupId>,
    timers: BinaryHeap<Reverse<Timer>>,
    dedup: HashMap<MessageId, (DateTime<Utc>, PublishReceipt)>,
    dedup_order: VecDeque<(DateTime<Utc>, MessageId)>,
    dead: std::collections::BTreeMap<MessageId, DeadLetter>,
    next_key: u64,
    next_group: GroupId,
    next_member: MemberId,
    rejected_full: u64,
    expired: u64,
    /// Channels with an age limit, trimmed when timers fire.
    aged_channels: Vec<usize>,
    /// What the timer task sleeps until (`None`: until told).
    pub timer_sleeping_until: Option<DateTime<Utc>>,
    /// Set when a timer earlier than the timer task's sleep was added.
    timer_wake: bool,
    /// The most dead letters kept; the oldest beyond it are dropped (counted).
    pub max_dead_letters: usize,
    dead_dropped: u64,
    /// When set, dead-letter ids are derived from `now` and a counter instead of
    /// drawn at random, so a replayed journal recreates the same ids.
    pub deterministic_dead_ids: bool,
    dead_id_counter: u64,
}

impl State {
    pub fn new() -> Self {
        State {
            max_dead_letters: 100_000,
            ..State::default()
        }
    }

    fn config_for(&self, channel: &ChannelName) -> ChannelConfig {
        self.channel_configs
            .iter()
            .rev()
            .find(|(p, _)| p.matches(channel))
            .map(|(_, c)| c.clone())
            .unwrap_or_default()
    }

    fn channel_for(&mut self, name: &ChannelName) -> usize {
        if let Some(&index) = self.channel_index.get(name) {
            return index;
        }
        let index = self.channels.len();
        let mut groups: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, g)| g.pattern.matches(name))
            .map(|(&id, _)| id)
            .collect();
        // In id order, not the map's: a state restored from a checkpoint must list
        // them the same way.
        groups.sort_unstable();
        for id in &groups {
            // A channel created after the group: the group reads it from the start.
            if let Some(group) = self.groups.get_mut(id) {
                group.cursors.insert(index, [0; 4]);
            }
        }
        self.channels.push(ChannelState {
            name: name.clone(),
            config: self.config_for(name),
            lanes: Default::default(),
            lane_next: [0; 4],
            next_sequence: 1,
            messages: 0,
            bytes: 0,
            published: 0,
            dropped: 0,
            groups,
        });
        self.channel_index.insert(name.clone(), index);
        if self.channels[index].config.max_age.is_some() {
            self.aged_channels.push(index);
        }
        index
    }

    fn note_timer(&mut self, due: DateTime<Utc>) {
        if self
            .timer_sleeping_until
            .is_none_or(|sleeping| due < sleeping)
        {
            self.timer_wake = true;
        }
    }

    /// Whether the timer task must wake because an earlier timer appeared; resets.
    pub fn take_timer_wake(&mut self) -> bool {
        std::mem::take(&mut self.timer_wake)
    }

    /// The next time a timer is due.
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        let scheduled = self.timers.peek().map(|Reverse(t)| t.due);
        let ack = self
            .groups
            .values()
            .filter_map(|g| g.ack_deadlines.front().map(|(due, ..)| *due))
            .min();
        let aged = self
            .aged_channels
            .iter()
            .filter_map(|&index| {
                let channel = &self.channels[index];
                let lane = channel.oldest_lane()?;
                let front = channel.lanes[lane].front()?;
                Some(later(front.stored_at, channel.config.max_age?))
            })
            .min();
        [scheduled, ack, aged].into_iter().flatten().min()
    }

    pub fn configure(&mut self, pattern: ChannelPattern, config: ChannelConfig) {
        for (index, channel) in self.channels.iter_mut().enumerate() {
            if pattern.matches(&channel.name) {
                channel.config = config.clone();
                if config.max_age.is_some() && !self.aged_channels.contains(&index) {
                    self.aged_channels.push(index);
                }
            }
        }
        self.channel_configs.push((pattern, config));
    }

    pub fn publish(
        &mut self,
        mut envelope: Envelope,
        now: DateTime<Utc>,
        wake: &mut Wake,
    ) -> Result<PublishReceipt> {
        self.expire_dedup(now);
        let id = envelope.header.id;
        if let Some((_, receipt)) = self.dedup.get(&id) {
            let mut receipt = receipt.clone();
            receipt.duplicate = true;
            return Ok(receipt);
        }
        // Stored as its first delivery will carry it, so that delivery shares it.
        envelope.header.attempt = 1;
        let index = self.channel_for(&envelope.channel);
        let size = envelope.size_bytes() as u64;
        self.trim_age(index, now);
        self.make_room(index, size)?;

        let key = self.next_key;
        self.next_key += 1;
        let channel = &mut self.channels[index];
        let sequence = channel.next_sequence;
        channel.next_sequence += 1;
        channel.messages += 1;
        channel.bytes += size;
        channel.published += 1;
        let lane = envelope.header.priority.lane();
        let lane_index = channel.lane_next[lane];
        channel.lane_next[lane] += 1;
        let dedup_window = channel.config.dedup_window;
        let receipt = PublishReceipt {
            id,
            channel: envelope.channel.clone(),
            sequence,
            duplicate: false,
            groups: channel.groups.len(),
        };
        channel.lanes[lane].push_back(Arc::new(Stored {
            key,
            sequence,
            lane_index,
            channel: index,
            envelope: Arc::new(envelope),
            stored_at: now,
            size,
        }));
        wake.extend_from_slice(&channel.groups);
        if !dedup_window.is_zero() {
            let expires = later(now, dedup_window);
            self.dedup.insert(id, (expires, receipt.clone()));
            self.dedup_order.push_back((expires, id));
        }
        Ok(receipt)
    }

    fn expire_dedup(&mut self, now: DateTime<Utc>) {
        while let Some(&(expires, id)) = self.dedup_order.front() {
            if expires > now {
                break;
            }
            self.dedup_order.pop_front();
            if self.dedup.get(&id).is_some_and(|(e, _)| *e == expires) {
                self.dedup.remove(&id);
            }
        }
    }

    fn trim_age(&mut self, index: usize, now: DateTime<Utc>) {
        let Some(max_age) = self.channels[index].config.max_age else {
            return;
        };
        let cutoff = earlier(now, max_age);
        loop {
            let channel = &mut self.channels[index];
            let Some(lane) = channel.oldest_lane() else {
                return;
            };
            let front = channel.lanes[lane]
                .front()
                .expect("oldest lane has a front");
            if front.stored_at > cutoff {
                return;
            }
            self.remove_front(index, lane);
        }
    }

    /// Removes the front message of a lane, counting it as dropped if some group had
    /// not read it yet.
    fn remove_front(&mut self, index: usize, lane: usize) {
        let channel = &mut self.channels[index];
        let Some(msg) = channel.lanes[lane].pop_front() else {
            return;
        };
        channel.messages -= 1;
        channel.bytes -= msg.size;
        let unread = channel.groups.iter().any(|g| {
            self.groups
                .get(g)
                .and_then(|g| g.cursors.get(&index))
                .is_some_and(|c| c[lane] <= msg.lane_index)
        });
        if unread {
            self.channels[index].dropped += 1;
        }
    }

    /// The lowest lane index of `lane` in channel `index` some group still needs.
    fn settle_floor(&self, index: usize, lane: usize) -> u64 {
        let channel = &self.channels[index];
        let mut floor = channel.lane_next[lane];
        for group_id in &channel.groups {
            let Some(group) = self.groups.get(group_id) else {
                continue;
            };
            if let Some(cursor) = group.cursors.get(&index) {
                floor = floor.min(cursor[lane]);
            }
            for pending in group.pending.values() {
                if pending.msg.channel == index
                    && pending.msg.envelope.header.priority.lane() == lane
                {
                    floor = floor.min(pending.msg.lane_index);
                }
            }
        }
        floor
    }

    fn over_limit(channel: &ChannelState, extra: u64) -> bool {
        channel
            .config
            .max_messages
            .is_some_and(|max| channel.messages + 1 > max)
            || channel
                .config
                .max_bytes
                .is_some_and(|max| channel.bytes + extra > max)
    }

    fn make_room(&mut self, index: usize, size: u64) -> Result<()> {
        if !Self::over_limit(&self.channels[index], size) {
            return Ok(());
        }
        // First: messages that no group needs any more. With no groups at all the log
        // is kept for groups that will start from earliest, so nothing is settled.
        if !self.channels[index].groups.is_empty() {
            for lane in 0..4 {
                let floor = self.settle_floor(index, lane);
                while self.channels[index].lanes[lane]
                    .front()
                    .is_some_and(|m| m.lane_index < floor)
                {
                    self.remove_front(index, lane);
                }
            }
        }
        while Self::over_limit(&self.channels[index], size) {
            let channel = &self.channels[index];
            match (channel.config.discard, channel.oldest_lane()) {
                (Discard::DropOldest, Some(lane)) => self.remove_front(index, lane),
                (Discard::DropOldest, None) => break,
                (Discard::RejectNew, _) => {
                    self.rejected_full += 1;
                    let c = &self.channels[index];
                    return Err(Error::new(
                        ErrorKind::Full,
                        format!(
                            "channel '{}' is full ({} messages, {} bytes unconsumed; limits: \
                             {} messages, {} bytes): consumers are behind; retry later, add \
                             consumers, or configure larger limits or discard = drop_oldest",
                            c.name,
                            c.messages,
                            c.bytes,
                            c.config
                                .max_messages
                                .map_or("none".into(), |m| m.to_string()),
                            c.config.max_bytes.map_or("none".into(), |m| m.to_string()),
                        ),
                    )
                    .with_context("channel", &c.name)
                    .set_temporary(true));
                }
            }
        }
        Ok(())
    }

    pub fn join(
        &mut self,
        options: &SubscribeOptions,
        now: DateTime<Utc>,
    ) -> Result<(GroupId, MemberId, Arc<str>)> {
        let member = self.next_member;
        self.next_member += 1;
        let existing = options
            .group
            .as_deref()
            .and_then(|name| self.group_names.get(name).copied());
        let group_id = match existing {
            Some(id) => {
                let group = self.groups.get_mut(&id).expect("named group exists");
                if group.pattern != options.pattern {
                    return Err(Error::invalid_input(format!(
                        "group '{}' already exists with pattern '{}', not '{}': use another \
                         group name, or the same pattern",
                        group.name, group.pattern, options.pattern
                    )));
                }
                id
            }
            None => self.create_group(options, now),
        };
        let group = self.groups.get_mut(&group_id).expect("group exists");
        group.members.insert(
            member,
            Member {
                prefetch: options.prefetch,
                in_flight: 0,
            },
        );
        Ok((group_id, member, group.name.clone()))
    }

    fn create_group(&mut self, options: &SubscribeOptions, now: DateTime<Utc>) -> GroupId {
        let id = self.next_group;
        self.next_group += 1;
        let (name, ephemeral): (Arc<str>, bool) = match &options.group {
            Some(name) => (Arc::from(name.as_str()), false),
            None => (Arc::from(format!("_private-{id}")), true),
        };
        let mut cursors = HashMap::default();
        for (index, channel) in self.channels.iter_mut().enumerate() {
            if !options.pattern.matches(&channel.name) {
                continue;
            }
            channel.groups.push(id);
            let mut cursor = channel.lane_next;
            for (lane, messages) in channel.lanes.iter().enumerate() {
                let first_at = |i: usize| {
                    messages
                        .get(i)
                        .map_or(channel.lane_next[lane], |m| m.lane_index)
                };
                cursor[lane] = match options.start {
                    StartPosition::New => channel.lane_next[lane],
                    StartPosition::Earliest => 0,
                    StartPosition::Sequence(s) => {
                        first_at(messages.partition_point(|m| m.sequence < s))
                    }
                    StartPosition::Time(t) => {
                        first_at(messages.partition_point(|m| m.stored_at < t))
                    }
                };
            }
            cursors.insert(index, cursor);
        }
        let _ = now;
        self.groups.insert(
            id,
            GroupState {
                name: name.clone(),
                pattern: options.pattern.clone(),
                ephemeral,
                ack_wait: options.ack_wait,
                max_deliveries: options.max_deliveries,
                cursors,
                pending: HashMap::default(),
                ready: BinaryHeap::new(),
                ack_deadlines: VecDeque::new(),
                members: HashMap::default(),
                delivered: 0,
                acked: 0,
                redelivered: 0,
                dead_lettered: 0,
            },
        );
        if !ephemeral {
            self.group_names.insert(name, id);
        }
        id
    }

    /// A member leaves: its unsettled deliveries become ready again at once; a private
    /// group with no members left is deleted.
    pub fn leave(&mut self, group_id: GroupId, member: MemberId, wake: &mut Wake) {
        let Some(group) = self.groups.get_mut(&group_id) else {
            return;
        };
        group.members.remove(&member);
        for pending in group.pending.values_mut() {
            if pending.state == (PendingState::InFlight { member }) {
                pending.state = PendingState::Ready;
                pending.generation += 1;
                group.redelivered += 1;
                group.ready.push(ReadyEntry {
                    priority: pending.msg.envelope.header.priority,
                    key: pending.msg.key,
                });
            }
        }
        if group.ephemeral && group.members.is_empty() {
            self.remove_group(group_id);
        } else {
            wake.push(group_id);
        }
    }

    /// Every member of every group leaves, in a fixed order: what a restart of the
    /// process means for its consumers (their unsettled deliveries become ready).
    pub fn leave_all(&mut self, wake: &mut Wake) {
        let mut members: Vec<(GroupId, MemberId)> = self
            .groups
            .iter()
            .flat_map(|(&g, group)| group.members.keys().map(move |&m| (g, m)))
            .collect();
        members.sort_unstable();
        for (group, member) in members {
            self.leave(group, member, wake);
        }
    }

    fn remove_group(&mut self, group_id: GroupId) {
        if let Some(group) = self.groups.remove(&group_id) {
            self.group_names.remove(&group.name);
            for index in group.cursors.keys() {
                self.channels[*index].groups.retain(|g| *g != group_id);
            }
        }
    }

    pub fn has_group(&self, group_id: GroupId) -> bool {
        self.groups.contains_key(&group_id)
    }

    pub fn delete_group(&mut self, name: &str) -> Result<()> {
        let id = self.group_names.get(name).copied().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("there is no group '{name}'; `agentbus stats` lists the groups"),
            )
        })?;
        self.remove_group(id);
        Ok(())
    }

    /// Hands member `member` of `group_id` up to `max` deliveries.
    pub fn take(
        &mut self,
        group_id: GroupId,
        member: MemberId,
        max: usize,
        now: DateTime<Utc>,
    ) -> Result<Take> {
        let Some(group) = self.groups.get(&group_id) else {
            return Err(Error::closed("this subscription's group"));
        };
        let Some(m) = group.members.get(&member) else {
            return Err(Error::closed("this subscription"));
        };
        let room = m.prefetch.saturating_sub(m.in_flight).min(max);
        if room == 0 {
            return Ok(Take::PrefetchFull);
        }
        let mut out = Vec::new();
        while out.len() < room {
            let Some((msg, from_ready)) = self.next_candidate(group_id) else {
                break;
            };
            if let Some(handout) = self.hand_out(group_id, member, msg, from_ready, now) {
                out.push(handout);
            }
        }
        if out.is_empty() {
            return Ok(Take::Empty);
        }
        let more = self.next_candidate_exists(group_id);
        Ok(Take::Some(out, more))
    }

    fn next_candidate_exists(&self, group_id: GroupId) -> bool {
        let Some(group) = self.groups.get(&group_id) else {
            return false;
        };
        if !group.ready.is_empty() {
            return true;
        }
        group.cursors.iter().any(|(index, cursor)| {
            let channel = &self.channels[*index];
            (0..4).any(|lane| channel.unread(lane, cursor[lane]) > 0)
        })
    }

    /// Picks the best next message for a group and advances past it: the ready heap's
    /// top or the highest-priority, oldest unread message in the channel logs.
    fn next_candidate(&mut self, group_id: GroupId) -> Option<(Msg, bool)> {
        let group = self.groups.get_mut(&group_id)?;
        // Drop ready entries that were settled meanwhile.
        while let Some(top) = group.ready.peek() {
            if group
                .pending
                .get(&top.key)
                .is_some_and(|p| p.state == PendingState::Ready)
            {
                break;
            }
            group.ready.pop();
        }
        let mut best: Option<(Priority, u64, usize, usize, Msg)> = None;
        for (&index, cursor) in &group.cursors {
            let channel = &self.channels[index];
            for lane in (0..4).rev() {
                if let Some(msg) = channel.at_cursor(lane, cursor[lane]) {
                    let priority = msg.envelope.header.priority;
                    let better = best.as_ref().is_none_or(|(p, k, ..)| {
                        (priority, std::cmp::Reverse(msg.key)) > (*p, std::cmp::Reverse(*k))
                    });
                    if better {
                        best = Some((priority, msg.key, index, lane, msg.clone()));
                    }
                    break;
                }
            }
        }
        let ready_top = group.ready.peek().map(|e| (e.priority, e.key));
        let take_ready = match (&best, ready_top) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some((p, k, ..)), Some((rp, rk))) => (rp, Reverse(rk)) > (*p, Reverse(*k)),
        };
        if take_ready {
            let entry = group.ready.pop().expect("peeked");
            let msg = group
                .pending
                .get(&entry.key)
                .expect("validated")
                .msg
                .clone();
            return Some((msg, true));
        }
        let (_, _, index, lane, msg) = best?;
        if let Some(cursor) = group.cursors.get_mut(&index) {
            cursor[lane] = msg.lane_index + 1;
        }
        Some((msg, false))
    }

    /// Turns a candidate into a delivery, or schedules / expires it instead.
    fn hand_out(
        &mut self,
        group_id: GroupId,
        member: MemberId,
        msg: Msg,
        from_ready: bool,
        now: DateTime<Utc>,
    ) -> Option<Handout> {
        let header = &msg.envelope.header;
        if header.deadline.is_some_and(|d| d <= now) {
            let attempts = if from_ready {
                self.groups[&group_id].pending[&msg.key].attempts
            } else {
                0
            };
            let last_error = self
                .groups
                .get_mut(&group_id)
                .and_then(|g| g.pending.remove(&msg.key))
                .and_then(|p| p.last_error);
            self.expired += 1;
            let deadline = header.deadline.expect("checked");
            self.dead_letter(
                group_id,
                &msg,
                DeadReason::Expired,
                attempts,
                last_error.or_else(|| Some(format!("deadline {deadline} passed before delivery"))),
                now,
            );
            return None;
        }
        let group = self.groups.get_mut(&group_id)?;
        if !from_ready {
            if let Some(not_before) = header.not_before.filter(|nb| *nb > now) {
                group.pending.insert(
                    msg.key,
                    Pending {
                        msg: msg.clone(),
                        attempts: 0,
                        state: PendingState::Scheduled,
                        generation: 0,
                        last_error: None,
                    },
                );
                self.timers.push(Reverse(Timer {
                    due: not_before,
                    group: group_id,
                    key: msg.key,
                    generation: 0,
                }));
                self.note_timer(not_before);
                return None;
            }
        }
        let pending = group.pending.entry(msg.key).or_insert_with(|| Pending {
            msg: msg.clone(),
            attempts: 0,
            state: PendingState::Ready,
            generation: 0,
            last_error: None,
        });
        pending.attempts += 1;
        pending.generation += 1;
        pending.state = PendingState::InFlight { member };
        if pending.attempts > 1 {
            group.redelivered += 1;
        }
        group.delivered += 1;
        let attempt = pending.attempts;
        let generation = pending.generation;
        if let Some(m) = group.members.get_mut(&member) {
            m.in_flight += 1;
        }
        let due = later(now, group.ack_wait);
        group.ack_deadlines.push_back((due, msg.key, generation));
        if group.ack_deadlines.len() == 1 {
            self.note_timer(due);
        }
        let envelope = if attempt == 1 {
            msg.envelope.clone()
        } else {
            let mut envelope = (*msg.envelope).clone();
            envelope.header.attempt = attempt;
            Arc::new(envelope)
        };
        Some(Handout {
            envelope,
            sequence: msg.sequence,
            key: msg.key,
        })
    }

    fn dead_letter(
        &mut self,
        group_id: GroupId,
        msg: &Stored,
        reason: DeadReason,
        attempts: u32,
        last_error: Option<String>,
        now: DateTime<Utc>,
    ) {
        let group = match self.groups.get_mut(&group_id) {
            Some(g) => {
                g.dead_lettered += 1;
                g.name.to_string()
            }
            None => String::new(),
        };
        let mut envelope = (*msg.envelope).clone();
        envelope.header.attempt = attempts;
        let id = if self.deterministic_dead_ids {
            self.dead_id_counter += 1;
            deterministic_id(now, self.dead_id_counter)
        } else {
            MessageId::new()
        };
        let letter = DeadLetter {
            id,
            envelope,
            group,
            reason,
            attempts,
            last_error,
            dead_at: now,
        };
        self.dead.insert(letter.id, letter);
        while self.dead.len() > self.max_dead_letters {
            self.dead.pop_first();
            self.dead_dropped += 1;
        }
    }

    pub fn settle(
        &mut self,
        group_id: GroupId,
        key: u64,
        settlement: Settlement,
        now: DateTime<Utc>,
        wake: &mut Wake,
    ) -> Result<()> {
        let Some(group) = self.groups.get_mut(&group_id) else {
            return Err(already_settled("its group no longer exists"));
        };
        let Some(pending) = group.pending.get(&key) else {
            return Err(already_settled(
                "the group no longer holds it unsettled (acked elsewhere or dead-lettered)",
            ));
        };
        if let PendingState::InFlight { member } = pending.state {
            if let Some(m) = group.members.get_mut(&member) {
                m.in_flight = m.in_flight.saturating_sub(1);
            }
            wake.push(group_id);
        }
        match settlement {
            Settlement::Ack => {
                group.pending.remove(&key);
                group.acked += 1;
            }
            Settlement::Nack { delay, error } => {
                let pending = group.pending.get_mut(&key).expect("checked");
                if error.is_some() {
                    pending.last_error = error;
                }
                self.retry_or_dead(group_id, key, delay, now, wake);
            }
            Settlement::Reject { reason, error } => {
                let pending = group.pending.remove(&key).expect("checked");
                self.dead_letter(
                    group_id,
                    &pending.msg,
                    reason,
                    pending.attempts,
                    Some(error),
                    now,
                );
            }
        }
        if let Some(group) = self.groups.get_mut(&group_id) {
            group.drop_settled_deadlines();
        }
        Ok(())
    }

    /// A delivery failed (nack or ack-wait): schedule a redelivery, or dead-letter if
    /// it was the last allowed delivery.
    fn retry_or_dead(
        &mut self,
        group_id: GroupId,
        key: u64,
        delay: Duration,
        now: DateTime<Utc>,
        wake: &mut Wake,
    ) {
        let Some(group) = self.groups.get_mut(&group_id) else {
            return;
        };
        let Some(pending) = group.pending.get_mut(&key) else {
            return;
        };
        if pending.attempts >= group.max_deliveries {
            let pending = group.pending.remove(&key).expect("present");
            let error = pending
                .last_error
                .clone()
                .or_else(|| Some(format!("not acked after {} deliveries", pending.attempts)));
            self.dead_letter(
                group_id,
                &pending.msg,
                DeadReason::MaxDeliveries,
                pending.attempts,
                error,
                now,
            );
            return;
        }
        pending.generation += 1;
        if delay.is_zero() {
            pending.state = PendingState::Ready;
            group.ready.push(ReadyEntry {
                priority: pending.msg.envelope.header.priority,
                key,
            });
            wake.push(group_id);
        } else {
            pending.state = PendingState::Scheduled;
            let due = later(now, delay);
            self.timers.push(Reverse(Timer {
                due,
                group: group_id,
                key,
                generation: pending.generation,
            }));
            self.note_timer(due);
        }
    }

    /// Fires every timer due at `now`: ack-wait expiries and scheduled deliveries.
    pub fn fire_timers(&mut self, now: DateTime<Utc>, wake: &mut Wake) {
        let mut expired_acks = Vec::new();
        for (&group_id, group) in &mut self.groups {
            while let Some(&(due, key, generation)) = group.ack_deadlines.front() {
                if due > now {
                    break;
                }
                group.ack_deadlines.pop_front();
                expired_acks.push(Timer {
                    due,
                    group: group_id,
                    key,
                    generation,
                });
            }
        }
        // Fired in a fixed order, not the group map's: firing can dead-letter, and
        // dead-letter ids count up, so the order must be the same in a state restored
        // from a checkpoint (whose map iterates differently) as in the original.
        expired_acks.sort_unstable();
        for timer in expired_acks {
            self.fire(timer, now, wake);
        }
        while let Some(Reverse(timer)) = self.timers.peek().copied() {
            if timer.due > now {
                break;
            }
            self.timers.pop();
            self.fire(timer, now, wake);
        }
        for i in 0..self.aged_channels.len() {
            let index = self.aged_channels[i];
            self.trim_age(index, now);
        }
    }

    fn fire(&mut self, timer: Timer, now: DateTime<Utc>, wake: &mut Wake) {
        let Some(group) = self.groups.get_mut(&timer.group) else {
            return;
        };
        let Some(pending) = group.pending.get_mut(&timer.key) else {
            return;
        };
        if pending.generation != timer.generation {
            return;
        }
        {
            match pending.state {
                PendingState::InFlight { member } => {
                    if let Some(m) = group.members.get_mut(&member) {
                        m.in_flight = m.in_flight.saturating_sub(1);
                    }
                    if pending.last_error.is_none() {
                        pending.last_error = Some(format!(
                            "ack_wait of {:?} expired without a settlement",
                            group.ack_wait
                        ));
                    }
                    self.retry_or_dead(timer.group, timer.key, Duration::ZERO, now, wake);
                    wake.push(timer.group);
                }
                PendingState::Scheduled => {
                    pending.state = PendingState::Ready;
                    pending.generation += 1;
                    group.ready.push(ReadyEntry {
                        priority: pending.msg.envelope.header.priority,
                        key: timer.key,
                    });
                    wake.push(timer.group);
                }
                PendingState::Ready => {}
            }
        }
    }

    pub fn dead_letters(&self, filter: &DeadLetterFilter) -> Vec<DeadLetter> {
        self.dead
            .values()
            .filter(|l| filter.accepts(l))
            .take(filter.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    pub fn dead_letter_by_id(&self, id: MessageId) -> Result<DeadLetter> {
        self.dead
            .get(&id)
            .cloned()
            .ok_or_else(|| dead_not_found(id))
    }

    pub fn take_dead_letter(&mut self, id: MessageId) -> Result<DeadLetter> {
        self.dead.remove(&id).ok_or_else(|| dead_not_found(id))
    }

    pub fn restore_dead_letter(&mut self, letter: DeadLetter) {
        self.dead.insert(letter.id, letter);
    }

    pub fn purge_dead_letters(&mut self, filter: &DeadLetterFilter) -> u64 {
        let ids: Vec<MessageId> = self
            .dead
            .values()
            .filter(|l| filter.accepts(l))
            .take(filter.limit.unwrap_or(usize::MAX))
            .map(|l| l.id)
            .collect();
        for id in &ids {
            self.dead.remove(id);
        }
        ids.len() as u64
    }

    pub fn stats(&self, engine: &str) -> EngineStats {
        let channels = self
            .channels
            .iter()
            .map(|c| ChannelStats {
                channel: c.name.clone(),
                messages: c.messages,
                bytes: c.bytes,
                published: c.published,
                dropped: c.dropped,
                last_sequence: c.next_sequence - 1,
            })
            .collect();
        let mut groups: Vec<GroupStats> = self
            .groups
            .values()
            .map(|g| {
                let unread: u64 = g
                    .cursors
                    .iter()
                    .map(|(index, cursor)| {
                        let channel = &self.channels[*index];
                        (0..4)
                            .map(|lane| channel.unread(lane, cursor[lane]))
                            .sum::<u64>()
                    })
                    .sum();
                let in_flight = g
                    .pending
                    .values()
                    .filter(|p| matches!(p.state, PendingState::InFlight { .. }))
                    .count() as u64;
                GroupStats {
                    group: g.name.to_string(),
                    pattern: g.pattern.clone(),
                    members: g.members.len(),
                    pending: unread + g.pending.len() as u64 - in_flight,
                    in_flight,
                    delivered: g.delivered,
                    acked: g.acked,
                    redelivered: g.redelivered,
                    dead_lettered: g.dead_lettered,
                }
            })
            .collect();
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        EngineStats {
            engine: engine.to_string(),
            channels,
            groups,
            dead_letters: self.dead.len() as u64,
            rejected_full: self.rejected_full,
            expired: self.expired,
            details: Default::default(),
        }
    }
}

/// A UUIDv7 made of `now`'s milliseconds and a counter: time-ordered like
/// [`MessageId::new`] (the counter orders ids of the same millisecond), and the same
/// every time the same inputs come.
fn deterministic_id(now: DateTime<Utc>, counter: u64) -> MessageId {
    let millis = u64::try_from(now.timestamp_millis()).unwrap_or(0);
    // Bytes 0 and 2 carry the version and variant bits; the counter goes after them.
    let mut bytes = [0u8; 10];
    bytes[3..].copy_from_slice(&counter.to_be_bytes()[1..]);
    MessageId(uuid::Builder::from_unix_timestamp_millis(millis, &bytes).into_uuid())
}

fn already_settled(why: &str) -> Error {
    Error::new(
        ErrorKind::AlreadySettled,
        format!("this delivery can no longer be settled: {why}"),
    )
}

fn dead_not_found(id: MessageId) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("there is no dead letter with id {id}; `agentbus dlq list` shows the ids"),
    )
    .with_context("dead_letter", id)
}
