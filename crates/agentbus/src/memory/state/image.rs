//! A plain-data picture of a [`State`], for checkpoints.
//!
//! The durable log engine writes one of these (a snapshot) so that opening a directory
//! replays only the records written after it instead of the whole history. The image
//! holds everything the state machine's future behaviour depends on: messages,
//! cursors, pending deliveries with their generations, timers, dedup entries, dead
//! letters and every counter, including the ones that make ids deterministic. It is
//! canonical: hash maps become vectors sorted by key and heaps sorted vectors, so two
//! states that behave the same have equal images (`==`), which is how the tests check
//! that a restored state is the state that was pictured.
//!
//! Messages are shared (`Arc`), so taking an image under the engine's lock copies
//! pointers, not payloads.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap as HashMap;

use super::{
    ChannelState, GroupId, GroupState, Member, MemberId, Msg, Pending, PendingState, ReadyEntry,
    State, Stored, Timer,
};
use crate::channel::{ChannelName, ChannelPattern};
use crate::envelope::{Envelope, MessageId, Priority};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{ChannelConfig, DeadLetter, PublishReceipt};

/// Everything a [`State`] is, as plain data (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateImage {
    /// Channels in creation order (their index is their position).
    pub channels: Vec<ChannelImage>,
    /// Every `configure` call, in order (later ones win).
    pub channel_configs: Vec<(ChannelPattern, ChannelConfig)>,
    /// Groups by id.
    pub groups: Vec<GroupImage>,
    /// Scheduled deliveries and nack delays, sorted (stale ones included: their
    /// generation no longer matches, and firing them does nothing, as before).
    pub timers: Vec<TimerImage>,
    /// Remembered publish receipts for dedup, by id.
    pub dedup: Vec<DedupImage>,
    /// Dedup expiries in insertion order (may name ids already forgotten).
    pub dedup_order: Vec<(DateTime<Utc>, MessageId)>,
    /// Dead letters, oldest id first.
    pub dead: Vec<DeadLetter>,
    /// Messages a group still holds unsettled after retention removed them from their
    /// channel's log (pending entries refer to them by key).
    pub detached: Vec<MessageImage>,
    /// The next message key.
    pub next_key: u64,
    /// The next group id.
    pub next_group: u64,
    /// The next member id.
    pub next_member: u64,
    /// Publishes refused because a channel was full.
    pub rejected_full: u64,
    /// Messages whose deadline passed.
    pub expired: u64,
    /// Indexes of the channels with an age limit.
    pub aged_channels: Vec<u64>,
    /// The most dead letters kept.
    pub max_dead_letters: u64,
    /// Dead letters dropped beyond `max_dead_letters`.
    pub dead_dropped: u64,
    /// Whether dead-letter ids are derived from time and a counter.
    pub deterministic_dead_ids: bool,
    /// That counter.
    pub dead_id_counter: u64,
}

/// One stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageImage {
    /// Engine-wide unique key (the delivery token).
    pub key: u64,
    /// Sequence in its channel.
    pub sequence: u64,
    /// Position in its priority lane.
    pub lane_index: u64,
    /// Index of its channel.
    pub channel: u64,
    /// The message (stored with attempt 1).
    pub envelope: Arc<Envelope>,
    /// When it was stored.
    pub stored_at: DateTime<Utc>,
    /// Its size as counted against the channel's byte limit.
    pub size: u64,
}

/// One channel: its log per priority lane and its counters.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelImage {
    /// The channel's name.
    pub name: ChannelName,
    /// Its retention settings.
    pub config: ChannelConfig,
    /// Messages per lane (lowest priority first), oldest first.
    pub lanes: [Vec<MessageImage>; 4],
    /// The lane index the next message of each lane gets.
    pub lane_next: [u64; 4],
    /// The next sequence.
    pub next_sequence: u64,
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Messages ever published.
    pub published: u64,
    /// Messages dropped unread by retention.
    pub dropped: u64,
    /// Groups reading it, in the order they were attached.
    pub groups: Vec<u64>,
}

/// The state of one unsettled message in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingImageState {
    /// Handed to this member, awaiting its settlement.
    InFlight(u64),
    /// Waiting for a timer (delayed delivery or a nack's delay).
    Scheduled,
    /// Due for redelivery.
    Ready,
}

/// One unsettled message of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingImage {
    /// The message's key.
    pub key: u64,
    /// Deliveries made so far.
    pub attempts: u32,
    /// Where it stands.
    pub state: PendingImageState,
    /// Bumped on every state change; timers carry the generation they were set for.
    pub generation: u64,
    /// The last error a consumer reported.
    pub last_error: Option<String>,
}

/// One member of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberImage {
    /// Its id.
    pub id: u64,
    /// The most unsettled deliveries it may hold.
    pub prefetch: u64,
    /// How many it holds.
    pub in_flight: u64,
}

/// One consumer group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupImage {
    /// Its id.
    pub id: u64,
    /// Its name (`_private-N` for a subscription without a group).
    pub name: String,
    /// The channels it reads.
    pub pattern: ChannelPattern,
    /// Whether it disappears with its last member.
    pub ephemeral: bool,
    /// How long a delivery may stay unsettled.
    pub ack_wait: Duration,
    /// Deliveries before a message is dead-lettered.
    pub max_deliveries: u32,
    /// Cursor per channel index and lane, sorted by channel index.
    pub cursors: Vec<(u64, [u64; 4])>,
    /// Unsettled messages, by key.
    pub pending: Vec<PendingImage>,
    /// Ready entries (priority, key), sorted.
    pub ready: Vec<(Priority, u64)>,
    /// Ack-wait expiries in delivery order: (due, key, generation).
    pub ack_deadlines: Vec<(DateTime<Utc>, u64, u64)>,
    /// Members, by id.
    pub members: Vec<MemberImage>,
    /// Deliveries made.
    pub delivered: u64,
    /// Acks.
    pub acked: u64,
    /// Redeliveries.
    pub redelivered: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
}

/// A timer: at `due`, look at `key` in `group`; act if `generation` still matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimerImage {
    /// When it fires.
    pub due: DateTime<Utc>,
    /// The group.
    pub group: u64,
    /// The message's key.
    pub key: u64,
    /// The pending entry's generation when the timer was set.
    pub generation: u64,
}

/// A remembered publish, for dedup.
#[derive(Debug, Clone, PartialEq)]
pub struct DedupImage {
    /// When it is forgotten.
    pub expires: DateTime<Utc>,
    /// The receipt a duplicate gets (with `duplicate` set).
    pub receipt: PublishReceipt,
}

fn message_image(msg: &Stored) -> MessageImage {
    MessageImage {
        key: msg.key,
        sequence: msg.sequence,
        lane_index: msg.lane_index,
        channel: msg.channel as u64,
        envelope: msg.envelope.clone(),
        stored_at: msg.stored_at,
        size: msg.size,
    }
}

fn stored(image: MessageImage) -> Msg {
    Arc::new(Stored {
        key: image.key,
        sequence: image.sequence,
        lane_index: image.lane_index,
        channel: image.channel as usize,
        envelope: image.envelope,
        stored_at: image.stored_at,
        size: image.size,
    })
}

fn sorted<K: Ord + Copy, V>(map: &HashMap<K, V>) -> Vec<(K, &V)> {
    let mut entries: Vec<(K, &V)> = map.iter().map(|(k, v)| (*k, v)).collect();
    entries.sort_unstable_by_key(|(k, _)| *k);
    entries
}

fn invalid_image(why: impl Into<String>) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "a checkpoint does not describe a consistent state ({}); it cannot be restored",
            why.into()
        ),
    )
}

fn index(value: u64, what: &str) -> Result<usize> {
    usize::try_from(value).map_err(|_| invalid_image(format!("{what} {value} is out of range")))
}

impl State {
    /// A picture of the whole state (messages shared, not copied).
    pub fn image(&self) -> StateImage {
        let mut in_logs = rustc_hash::FxHashSet::default();
        let channels = self
            .channels
            .iter()
            .map(|c| ChannelImage {
                name: c.name.clone(),
                config: c.config.clone(),
                lanes: std::array::from_fn(|lane| {
                    c.lanes[lane]
                        .iter()
                        .map(|m| {
                            in_logs.insert(m.key);
                            message_image(m)
                        })
                        .collect()
                }),
                lane_next: c.lane_next,
                next_sequence: c.next_sequence,
                messages: c.messages,
                bytes: c.bytes,
                published: c.published,
                dropped: c.dropped,
                groups: c.groups.clone(),
            })
            .collect();
        let mut detached = Vec::new();
        let groups = sorted(&self.groups)
            .into_iter()
            .map(|(id, g)| {
                let pending = sorted(&g.pending)
                    .into_iter()
                    .map(|(key, p)| {
                        if !in_logs.contains(&key) {
                            in_logs.insert(key);
                            detached.push(message_image(&p.msg));
                        }
                        PendingImage {
                            key,
                            attempts: p.attempts,
                            state: match p.state {
                                PendingState::InFlight { member } => {
                                    PendingImageState::InFlight(member)
                                }
                                PendingState::Scheduled => PendingImageState::Scheduled,
                                PendingState::Ready => PendingImageState::Ready,
                            },
                            generation: p.generation,
                            last_error: p.last_error.clone(),
                        }
                    })
                    .collect();
                let mut ready: Vec<(Priority, u64)> =
                    g.ready.iter().map(|e| (e.priority, e.key)).collect();
                ready.sort_unstable();
                GroupImage {
                    id,
                    name: g.name.to_string(),
                    pattern: g.pattern.clone(),
                    ephemeral: g.ephemeral,
                    ack_wait: g.ack_wait,
                    max_deliveries: g.max_deliveries,
                    cursors: sorted(&g.cursors)
                        .into_iter()
                        .map(|(index, cursor)| (index as u64, *cursor))
                        .collect(),
                    pending,
                    ready,
                    ack_deadlines: g.ack_deadlines.iter().copied().collect(),
                    members: sorted(&g.members)
                        .into_iter()
                        .map(|(id, m)| MemberImage {
                            id,
                            prefetch: m.prefetch as u64,
                            in_flight: m.in_flight as u64,
                        })
                        .collect(),
                    delivered: g.delivered,
                    acked: g.acked,
                    redelivered: g.redelivered,
                    dead_lettered: g.dead_lettered,
                }
            })
            .collect();
        detached.sort_unstable_by_key(|m| m.key);
        let mut timers: Vec<TimerImage> = self
            .timers
            .iter()
            .map(|Reverse(t)| TimerImage {
                due: t.due,
                group: t.group,
                key: t.key,
                generation: t.generation,
            })
            .collect();
        timers.sort_unstable();
        let mut dedup: Vec<DedupImage> = self
            .dedup
            .values()
            .map(|(expires, receipt)| DedupImage {
                expires: *expires,
                receipt: receipt.clone(),
            })
            .collect();
        dedup.sort_unstable_by_key(|d| d.receipt.id);
        StateImage {
            channels,
            channel_configs: self.channel_configs.clone(),
            groups,
            timers,
            dedup,
            dedup_order: self.dedup_order.iter().copied().collect(),
            dead: self.dead.values().cloned().collect(),
            detached,
            next_key: self.next_key,
            next_group: self.next_group,
            next_member: self.next_member,
            rejected_full: self.rejected_full,
            expired: self.expired,
            aged_channels: self.aged_channels.iter().map(|&i| i as u64).collect(),
            max_dead_letters: self.max_dead_letters as u64,
            dead_dropped: self.dead_dropped,
            deterministic_dead_ids: self.deterministic_dead_ids,
            dead_id_counter: self.dead_id_counter,
        }
    }

    /// Rebuilds the state an [`image`](State::image) pictured.
    ///
    /// # Errors
    /// [`ErrorKind::Corrupt`] when the image is inconsistent (an index out of range, a
    /// pending entry naming a message that is not in it): a damaged checkpoint that
    /// still passed its checksums.
    pub fn from_image(image: StateImage) -> Result<State> {
        let mut messages: HashMap<u64, Msg> = HashMap::default();
        let mut channels = Vec::with_capacity(image.channels.len());
        let mut channel_index = HashMap::default();
        for (position, c) in image.channels.into_iter().enumerate() {
            let mut lanes: [VecDeque<Msg>; 4] = Default::default();
            for (lane, list) in c.lanes.into_iter().enumerate() {
                for m in list {
                    if m.channel as usize != position {
                        return Err(invalid_image(format!(
                            "message {} is in channel {position}'s log but names channel {}",
                            m.key, m.channel
                        )));
                    }
                    let msg = stored(m);
                    messages.insert(msg.key, msg.clone());
                    lanes[lane].push_back(msg);
                }
            }
            channel_index.insert(c.name.clone(), position);
            channels.push(ChannelState {
                name: c.name,
                config: c.config,
                lanes,
                lane_next: c.lane_next,
                next_sequence: c.next_sequence,
                messages: c.messages,
                bytes: c.bytes,
                published: c.published,
                dropped: c.dropped,
                groups: c.groups,
            });
        }
        for m in image.detached {
            let msg = stored(m);
            messages.insert(msg.key, msg);
        }
        let channel_count = channels.len();
        let mut groups: HashMap<GroupId, GroupState> = HashMap::default();
        let mut group_names = HashMap::default();
        for g in image.groups {
            let mut pending = HashMap::default();
            for p in g.pending {
                let msg = messages.get(&p.key).cloned().ok_or_else(|| {
                    invalid_image(format!(
                        "group '{}' holds message {} which the checkpoint does not contain",
                        g.name, p.key
                    ))
                })?;
                let state = match p.state {
                    PendingImageState::InFlight(member) => PendingState::InFlight { member },
                    PendingImageState::Scheduled => PendingState::Scheduled,
                    PendingImageState::Ready => PendingState::Ready,
                };
                pending.insert(
                    p.key,
                    Pending {
                        msg,
                        attempts: p.attempts,
                        state,
                        generation: p.generation,
                        last_error: p.last_error,
                    },
                );
            }
            let mut cursors = HashMap::default();
            for (channel, cursor) in g.cursors {
                let channel = index(channel, "a cursor's channel")?;
                if channel >= channel_count {
                    return Err(invalid_image(format!(
                        "group '{}' has a cursor on channel {channel} of {channel_count}",
                        g.name
                    )));
                }
                cursors.insert(channel, cursor);
            }
            let members: HashMap<MemberId, Member> = g
                .members
                .iter()
                .map(|m| {
                    Ok((
                        m.id,
                        Member {
                            prefetch: index(m.prefetch, "a prefetch")?,
                            in_flight: index(m.in_flight, "an in-flight count")?,
                        },
                    ))
                })
                .collect::<Result<_>>()?;
            let name: Arc<str> = Arc::from(g.name);
            if !g.ephemeral {
                group_names.insert(name.clone(), g.id);
            }
            groups.insert(
                g.id,
                GroupState {
                    name,
                    pattern: g.pattern,
                    ephemeral: g.ephemeral,
                    ack_wait: g.ack_wait,
                    max_deliveries: g.max_deliveries,
                    cursors,
                    pending,
                    ready: g
                        .ready
                        .into_iter()
                        .map(|(priority, key)| ReadyEntry { priority, key })
                        .collect::<BinaryHeap<_>>(),
                    ack_deadlines: g.ack_deadlines.into_iter().collect(),
                    members,
                    delivered: g.delivered,
                    acked: g.acked,
                    redelivered: g.redelivered,
                    dead_lettered: g.dead_lettered,
                },
            );
        }
        let aged_channels = image
            .aged_channels
            .into_iter()
            .map(|i| {
                let i = index(i, "an aged channel")?;
                if i >= channel_count {
                    return Err(invalid_image(format!(
                        "aged channel {i} of {channel_count}"
                    )));
                }
                Ok(i)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(State {
            channels,
            channel_index,
            channel_configs: image.channel_configs,
            groups,
            group_names,
            timers: image
                .timers
                .into_iter()
                .map(|t| {
                    Reverse(Timer {
                        due: t.due,
                        group: t.group,
                        key: t.key,
                        generation: t.generation,
                    })
                })
                .collect(),
            dedup: image
                .dedup
                .into_iter()
                .map(|d| (d.receipt.id, (d.expires, d.receipt)))
                .collect(),
            dedup_order: image.dedup_order.into_iter().collect(),
            dead: image.dead.into_iter().map(|l| (l.id, l)).collect(),
            next_key: image.next_key,
            next_group: image.next_group,
            next_member: image.next_member,
            rejected_full: image.rejected_full,
            expired: image.expired,
            aged_channels,
            timer_sleeping_until: None,
            timer_wake: false,
            max_dead_letters: index(image.max_dead_letters, "max_dead_letters")?,
            dead_dropped: image.dead_dropped,
            deterministic_dead_ids: image.deterministic_dead_ids,
            dead_id_counter: image.dead_id_counter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Take;
    use super::*;
    use crate::transport::{Discard, Settlement, StartPosition, SubscribeOptions};
    use crate::DeadReason;
    use proptest::prelude::*;

    /// One call on the state machine, with small numbers so that the calls collide:
    /// the same ids (dedup), the same groups, deliveries that expire or run out.
    #[derive(Debug, Clone)]
    enum Call {
        Publish {
            channel: u8,
            priority: u8,
            id: Option<u8>,
            deadline_ms: Option<u16>,
            delay_ms: Option<u16>,
        },
        Join {
            group: u8,
            private: bool,
            wildcard: bool,
            earliest: bool,
            prefetch: u8,
        },
        Take {
            member: u8,
            max: u8,
        },
        Settle {
            nth: u8,
            how: u8,
        },
        Leave {
            member: u8,
        },
        Advance {
            ms: u16,
        },
        Configure {
            channel: u8,
            max_messages: u8,
            drop_oldest: bool,
            max_age_ms: Option<u16>,
        },
        DeleteGroup {
            group: u8,
        },
        ReplayDead,
        Purge,
    }

    fn call() -> impl Strategy<Value = Call> {
        prop_oneof![
            4 => (0u8..3, 1u8..=4, proptest::option::of(0u8..6), proptest::option::of(0u16..400), proptest::option::weighted(0.2, 0u16..300))
                .prop_map(|(channel, priority, id, deadline_ms, delay_ms)| Call::Publish { channel, priority, id, deadline_ms, delay_ms }),
            1 => (0u8..3, any::<bool>(), any::<bool>(), any::<bool>(), 1u8..5)
                .prop_map(|(group, private, wildcard, earliest, prefetch)| Call::Join { group, private, wildcard, earliest, prefetch }),
            4 => (0u8..8, 1u8..4).prop_map(|(member, max)| Call::Take { member, max }),
            4 => (any::<u8>(), 0u8..4).prop_map(|(nth, how)| Call::Settle { nth, how }),
            1 => (0u8..8).prop_map(|member| Call::Leave { member }),
            2 => (0u16..1500).prop_map(|ms| Call::Advance { ms }),
            1 => (0u8..3, 1u8..6, any::<bool>(), proptest::option::of(100u16..2000))
                .prop_map(|(channel, max_messages, drop_oldest, max_age_ms)| Call::Configure { channel, max_messages, drop_oldest, max_age_ms }),
            1 => (0u8..3).prop_map(|group| Call::DeleteGroup { group }),
            1 => Just(Call::ReplayDead),
            1 => Just(Call::Purge),
        ]
    }

    /// Drives a state and records every outcome it reports.
    struct Driver {
        state: State,
        now: DateTime<Utc>,
        members: Vec<(GroupId, MemberId)>,
        tokens: Vec<(GroupId, u64)>,
        outcomes: Vec<String>,
        published: u128,
    }

    fn at(base: DateTime<Utc>, ms: u16) -> DateTime<Utc> {
        base + chrono::Duration::milliseconds(i64::from(ms))
    }

    impl Driver {
        fn new() -> Driver {
            let mut state = State::new();
            state.deterministic_dead_ids = true;
            state.max_dead_letters = 5;
            Driver {
                state,
                now: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                members: Vec::new(),
                tokens: Vec::new(),
                outcomes: Vec::new(),
                published: 0,
            }
        }

        fn apply(&mut self, call: &Call) {
            let now = self.now;
            let mut wake = Vec::new();
            let outcome = match call.clone() {
                Call::Publish {
                    channel,
                    priority,
                    id,
                    deadline_ms,
                    delay_ms,
                } => {
                    let name = ChannelName::new(format!("c.{channel}")).unwrap();
                    let mut e = Envelope::new(name, "k", vec![channel; 16])
                        .with_priority(Priority::from_u8(priority).unwrap());
                    // Ids and timestamps from the driver, not the system, so that both
                    // drivers publish identical envelopes.
                    self.published += 1;
                    let id = id.map_or(1000 + self.published, u128::from);
                    e.header.id = MessageId(uuid::Uuid::from_u128(id + 1));
                    e.header.timestamp = now;
                    e.header.deadline = deadline_ms.map(|ms| at(now, ms));
                    e.header.not_before = delay_ms.map(|ms| at(now, ms));
                    format!(
                        "{:?}",
                        self.state.publish(e, now, &mut wake).map(|r| (
                            r.sequence,
                            r.duplicate,
                            r.groups
                        ))
                    )
                }
                Call::Join {
                    group,
                    private,
                    wildcard,
                    earliest,
                    prefetch,
                } => {
                    let pattern = if wildcard {
                        "c.*".to_string()
                    } else {
                        format!("c.{group}")
                    };
                    let mut options = SubscribeOptions::new(ChannelPattern::new(pattern).unwrap())
                        .ack_wait(Duration::from_millis(500))
                        .max_deliveries(3)
                        .prefetch(usize::from(prefetch));
                    if !private {
                        options = options.group(format!("g{group}{wildcard}"));
                    }
                    if earliest {
                        options = options.start(StartPosition::Earliest);
                    }
                    let joined = self.state.join(&options, now);
                    if let Ok((g, m, _)) = &joined {
                        self.members.push((*g, *m));
                    }
                    format!("{:?}", joined.map(|(g, m, name)| (g, m, name.to_string())))
                }
                Call::Take { member, max } => {
                    let Some(&(g, m)) = self
                        .members
                        .get(usize::from(member) % self.members.len().max(1))
                    else {
                        return;
                    };
                    self.state.fire_timers(now, &mut wake);
                    match self.state.take(g, m, usize::from(max), now) {
                        Ok(Take::Some(handouts, more)) => {
                            let out: Vec<_> = handouts
                                .iter()
                                .map(|h| (h.key, h.sequence, h.envelope.header.attempt))
                                .collect();
                            self.tokens.extend(handouts.iter().map(|h| (g, h.key)));
                            format!("{out:?} {more}")
                        }
                        Ok(Take::Empty) => "empty".into(),
                        Ok(Take::PrefetchFull) => "full".into(),
                        Err(e) => e.kind().to_string(),
                    }
                }
                Call::Settle { nth, how } => {
                    if self.tokens.is_empty() {
                        return;
                    }
                    let (g, key) = self.tokens.remove(usize::from(nth) % self.tokens.len());
                    let settlement = match how {
                        0 | 1 => Settlement::Ack,
                        2 => Settlement::Nack {
                            delay: Duration::from_millis(u64::from(nth) * 3),
                            error: Some("no".into()),
                        },
                        _ => Settlement::Reject {
                            reason: DeadReason::Rejected,
                            error: "bad".into(),
                        },
                    };
                    format!(
                        "{:?}",
                        self.state
                            .settle(g, key, settlement, now, &mut wake)
                            .map_err(|e| e.kind())
                    )
                }
                Call::Leave { member } => {
                    if self.members.is_empty() {
                        return;
                    }
                    let (g, m) = self
                        .members
                        .remove(usize::from(member) % self.members.len());
                    self.state.leave(g, m, &mut wake);
                    "left".into()
                }
                Call::Advance { ms } => {
                    self.now = at(now, ms);
                    self.state.fire_timers(self.now, &mut wake);
                    "fired".into()
                }
                Call::Configure {
                    channel,
                    max_messages,
                    drop_oldest,
                    max_age_ms,
                } => {
                    let config = ChannelConfig {
                        max_age: max_age_ms.map(|ms| Duration::from_millis(u64::from(ms))),
                        max_messages: Some(u64::from(max_messages)),
                        discard: if drop_oldest {
                            Discard::DropOldest
                        } else {
                            Discard::RejectNew
                        },
                        ..ChannelConfig::default()
                    };
                    self.state
                        .configure(ChannelPattern::new(format!("c.{channel}")).unwrap(), config);
                    "configured".into()
                }
                Call::DeleteGroup { group } => {
                    format!(
                        "{:?}",
                        self.state
                            .delete_group(&format!("g{group}false"))
                            .map_err(|e| e.kind())
                    )
                }
                Call::ReplayDead => {
                    let first = self
                        .state
                        .dead_letters(&Default::default())
                        .first()
                        .map(|l| l.id);
                    match first {
                        Some(id) => {
                            let letter = self.state.take_dead_letter(id).unwrap();
                            format!("{:?} {:?}", letter.reason, letter.attempts)
                        }
                        None => "none".into(),
                    }
                }
                Call::Purge => format!(
                    "{}",
                    self.state
                        .purge_dead_letters(&crate::transport::DeadLetterFilter {
                            limit: Some(1),
                            ..Default::default()
                        })
                ),
            };
            wake.sort_unstable();
            wake.dedup();
            self.outcomes.push(format!(
                "{outcome} wake={wake:?} due={:?}",
                self.state.next_due()
            ));
        }

        /// A driver continuing from a state restored from this one's image.
        fn restored(&self) -> Driver {
            let image = self.state.image();
            let state = State::from_image(image.clone()).expect("an image restores");
            assert_eq!(state.image(), image, "restoring an image changed it");
            Driver {
                state,
                now: self.now,
                members: self.members.clone(),
                tokens: self.tokens.clone(),
                outcomes: Vec::new(),
                published: self.published,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A state restored from its image behaves exactly as the original: the same
        /// outcome for every later call (receipts, deliveries and their attempts,
        /// settlements, dead-letter ids, wake-ups, timer due times) and the same final
        /// picture.
        #[test]
        fn a_restored_state_behaves_as_the_original(
            before in proptest::collection::vec(call(), 0..120),
            after in proptest::collection::vec(call(), 0..120),
        ) {
            let mut original = Driver::new();
            for c in &before {
                original.apply(c);
            }
            let mut restored = original.restored();
            original.outcomes.clear();
            for c in &after {
                original.apply(c);
                restored.apply(c);
            }
            prop_assert_eq!(&original.outcomes, &restored.outcomes);
            prop_assert_eq!(original.state.image(), restored.state.image());
        }
    }

    #[test]
    fn an_inconsistent_image_is_refused_not_trusted() {
        let mut driver = Driver::new();
        for c in [
            Call::Join {
                group: 0,
                private: false,
                wildcard: false,
                earliest: true,
                prefetch: 4,
            },
            Call::Publish {
                channel: 0,
                priority: 2,
                id: None,
                deadline_ms: None,
                delay_ms: None,
            },
            Call::Take { member: 0, max: 1 },
        ] {
            driver.apply(&c);
        }
        let mut image = driver.state.image();
        assert_eq!(image.groups[0].pending.len(), 1);
        image.channels[0].lanes[1].clear();
        let err = State::from_image(image).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.message().contains("does not contain"), "{err}");
    }
}
