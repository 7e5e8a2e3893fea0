//! Property tests: every on-disk record type round-trips and rejects truncation, and
//! a state-machine test holds the engine against a simple model of the contract
//! across random publish / consume / ack / nack / reject / crash / reopen sequences.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use agentbus::{
    ChannelConfig, ChannelName, ChannelPattern, DeadLetterFilter, DeadReason, Discard, Envelope,
    Header, MessageId, Priority, Settlement, StartPosition, SubscribeOptions, Transport,
};
use agentbus_file::codec::{read_frame, write_frame, Frame, Op};
use agentbus_file::fault::FaultyStorage;
use agentbus_file::{FileEngine, FileOptions};
use chrono::{DateTime, Utc};
use proptest::prelude::*;

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..4_000_000_000, 0u32..1_000_000_000)
        .prop_map(|(s, n)| DateTime::from_timestamp(s, n).expect("in range"))
}

fn duration() -> impl Strategy<Value = Duration> {
    (0u64..1_000_000, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n))
}

fn channel() -> impl Strategy<Value = ChannelName> {
    "[a-z0-9_-]{1,8}(\\.[a-zA-Z0-9_-]{1,8}){0,3}".prop_map(|s| ChannelName::new(&s).unwrap())
}

fn pattern() -> impl Strategy<Value = ChannelPattern> {
    prop_oneof![
        "[a-z]{1,6}\\.>",
        "[a-z]{1,6}\\.\\*\\.[a-z]{1,4}",
        "[a-z]{1,6}(\\.[a-z]{1,4}){0,2}",
    ]
    .prop_map(|s| ChannelPattern::new(&s).unwrap())
}

fn id() -> impl Strategy<Value = MessageId> {
    any::<u128>().prop_map(|n| MessageId(uuid::Uuid::from_u128(n)))
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let head = (
        channel(),
        id(),
        proptest::option::of(text()),
        proptest::option::of(id()),
        time(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        "[a-z.]{1,20}",
    );
    let tail = (
        1u8..=4,
        proptest::option::of(channel()),
        proptest::option::of(time()),
        proptest::option::of(time()),
        any::<u32>(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::collection::btree_map(text(), text(), 0..4),
        text(),
        proptest::collection::vec(any::<u8>(), 0..200),
    );
    (head, tail).prop_map(
        |(
            (channel, id, correlation_id, causation_id, timestamp, sender, receiver, kind),
            (p, reply_to, deadline, not_before, attempt, tenant, trace, headers, ct, payload),
        )| Envelope {
            channel,
            header: Header {
                id,
                correlation_id,
                causation_id,
                timestamp,
                sender,
                receiver,
                kind,
                priority: Priority::from_u8(p).unwrap(),
                reply_to,
                deadline,
                not_before,
                attempt,
                tenant,
                trace,
                headers: headers.into_iter().collect::<BTreeMap<_, _>>(),
                content_type: ct.into(),
            },
            payload: payload.into(),
        },
    )
}

fn reason() -> impl Strategy<Value = DeadReason> {
    prop_oneof![
        Just(DeadReason::MaxDeliveries),
        Just(DeadReason::Expired),
        Just(DeadReason::Schema),
        Just(DeadReason::Rejected),
    ]
}

fn settlement() -> impl Strategy<Value = Settlement> {
    prop_oneof![
        Just(Settlement::Ack),
        (duration(), proptest::option::of(text()))
            .prop_map(|(delay, error)| Settlement::Nack { delay, error }),
        (reason(), text()).prop_map(|(reason, error)| Settlement::Reject { reason, error }),
    ]
}

fn start() -> impl Strategy<Value = StartPosition> {
    prop_oneof![
        Just(StartPosition::New),
        Just(StartPosition::Earliest),
        time().prop_map(StartPosition::Time),
        any::<u64>().prop_map(StartPosition::Sequence),
    ]
}

fn options() -> impl Strategy<Value = SubscribeOptions> {
    (
        pattern(),
        proptest::option::of("[a-zA-Z0-9_-]{1,16}"),
        start(),
        duration(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(pattern, group, start, ack_wait, max, prefetch)| {
            let mut o = SubscribeOptions::new(pattern)
                .start(start)
                .ack_wait(ack_wait)
                .max_deliveries(max)
                .prefetch(prefetch as usize);
            o.group = group;
            o
        })
}

fn config() -> impl Strategy<Value = ChannelConfig> {
    (
        proptest::option::of(duration()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        any::<bool>(),
        duration(),
    )
        .prop_map(
            |(max_age, max_bytes, max_messages, drop, dedup_window)| ChannelConfig {
                max_age,
                max_bytes,
                max_messages,
                discard: if drop {
                    Discard::DropOldest
                } else {
                    Discard::RejectNew
                },
                dedup_window,
            },
        )
}

/// Every record type.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (time(), any::<u64>()).prop_map(|(now, max_dead_letters)| Op::Open {
            now,
            max_dead_letters
        }),
        (time(), envelope(), any::<u64>()).prop_map(|(now, envelope, expect)| Op::Publish {
            now,
            envelope,
            expect
        }),
        (time(), options()).prop_map(|(now, options)| Op::Join { now, options }),
        (any::<u64>(), any::<u64>()).prop_map(|(group, member)| Op::Leave { group, member }),
        (
            time(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(now, group, member, max, expect)| Op::Take {
                now,
                group,
                member,
                max,
                expect
            }),
        (time(), any::<u64>(), any::<u64>(), settlement()).prop_map(
            |(now, group, key, settlement)| Op::Settle {
                now,
                group,
                key,
                settlement
            }
        ),
        time().prop_map(|now| Op::FireTimers { now }),
        (pattern(), config()).prop_map(|(pattern, config)| Op::Configure { pattern, config }),
        "[a-zA-Z0-9_-]{1,16}".prop_map(|name| Op::DeleteGroup { name }),
        (time(), id(), id(), any::<u64>()).prop_map(|(now, id, new_id, expect)| {
            Op::ReplayDeadLetter {
                now,
                id,
                new_id,
                expect,
            }
        }),
        (
            proptest::option::of(pattern()),
            proptest::option::of(reason()),
            proptest::option::of(0usize..1000)
        )
            .prop_map(|(pattern, reason, limit)| Op::PurgeDeadLetters {
                filter: DeadLetterFilter {
                    pattern,
                    reason,
                    limit
                }
            }),
    ]
}

proptest! {
    #[test]
    fn every_record_type_round_trips(op in op()) {
        let mut payload = Vec::new();
        op.encode(&mut payload);
        prop_assert_eq!(Op::decode(&payload).unwrap(), op.clone());
        // Framed, it reads back whole; any cut is incomplete, never another record.
        let mut framed = Vec::new();
        write_frame(&mut framed, &payload);
        prop_assert_eq!(read_frame(&framed), Frame::Ok(&payload[..], framed.len()));
        for cut in [1, framed.len() / 2, framed.len() - 1] {
            prop_assert!(matches!(read_frame(&framed[..cut]), Frame::Incomplete | Frame::Zeros));
        }
        // A strict prefix of a payload never decodes.
        for cut in 0..payload.len().min(64) {
            prop_assert!(Op::decode(&payload[..cut]).is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Op::decode(&bytes);
        if !bytes.is_empty() {
            let _ = read_frame(&bytes);
        }
    }
}

// ---------------------------------------------------------------- model test

#[derive(Debug, Clone)]
enum Cmd {
    Publish(usize),
    /// Take up to n and settle each by the codes: 0/1 ack, 2 nack, 3 reject, 4 leave unsettled.
    Consume(Vec<u8>),
    /// Power loss (the engine's process dies with it).
    Crash,
    /// Clean close and reopen.
    Reopen,
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        4 => (1usize..6).prop_map(Cmd::Publish),
        4 => proptest::collection::vec(0u8..5, 1..6).prop_map(Cmd::Consume),
        1 => Just(Cmd::Crash),
        1 => Just(Cmd::Reopen),
    ]
}

#[derive(Default, Debug)]
struct Model {
    published: Vec<MessageId>,
    acked: HashSet<MessageId>,
    dead: HashSet<MessageId>,
}

impl Model {
    fn deliverable(&self) -> HashSet<MessageId> {
        self.published
            .iter()
            .filter(|id| !self.acked.contains(id) && !self.dead.contains(id))
            .copied()
            .collect()
    }
}

fn group() -> SubscribeOptions {
    SubscribeOptions::new(ChannelPattern::new("m.>").unwrap())
        .group("g")
        .start(StartPosition::Earliest)
        .ack_wait(Duration::from_secs(600))
        .max_deliveries(1_000)
        .prefetch(10_000)
}

async fn check(engine: &FileEngine, model: &Model) -> Result<(), TestCaseError> {
    let expected = model.deliverable();
    let stats = engine.stats().await.unwrap();
    let pending = stats
        .groups
        .iter()
        .find(|g| g.group == "g")
        .map_or(0, |g| g.pending);
    prop_assert_eq!(pending as usize, expected.len(), "pending count");
    let mut consumer = engine.subscribe(group()).await.unwrap();
    let mut got = HashSet::new();
    while got.len() < expected.len() {
        let batch = tokio::time::timeout(Duration::from_secs(5), consumer.next_batch(10_000))
            .await
            .expect("deliveries")
            .unwrap();
        got.extend(batch.iter().map(|d| d.envelope().header.id));
    }
    prop_assert_eq!(&got, &expected);
    let dead: HashSet<MessageId> = engine
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.envelope.header.id)
        .collect();
    prop_assert_eq!(&dead, &model.dead);
    Ok(())
}

async fn run_model(cmds: Vec<Cmd>) -> Result<(), TestCaseError> {
    let mut storage = FaultyStorage::new(7);
    let open = |s: &FaultyStorage| {
        // Small segments and frequent checkpoints: reopening loads a checkpoint and
        // replays only what followed it, and old segments are deleted as it goes.
        let options = FileOptions::default()
            .segment_bytes(1024)
            .checkpoint_bytes(Some(512));
        FileEngine::open_with_storage(Arc::new(s.clone()), options).unwrap()
    };
    let mut engine = open(&storage);
    let mut consumer = Some(engine.subscribe(group()).await.unwrap());
    let mut model = Model::default();
    let channel = ChannelName::new("m.x").unwrap();
    for cmd in cmds {
        match cmd {
            Cmd::Publish(n) => {
                for _ in 0..n {
                    let r = engine
                        .publish(Envelope::new(channel.clone(), "t", "{}"))
                        .await
                        .unwrap();
                    model.published.push(r.id);
                }
            }
            Cmd::Consume(codes) => {
                let c = consumer.as_mut().expect("subscribed");
                let Ok(batch) =
                    tokio::time::timeout(Duration::from_millis(5), c.next_batch(codes.len())).await
                else {
                    continue;
                };
                for (d, code) in batch.unwrap().into_iter().zip(codes) {
                    let id = d.envelope().header.id;
                    prop_assert!(
                        model.deliverable().contains(&id),
                        "delivered {} not deliverable",
                        id
                    );
                    match code {
                        0 | 1 => {
                            d.ack().await.unwrap();
                            model.acked.insert(id);
                        }
                        2 => d.nack(Duration::ZERO, None).await.unwrap(),
                        3 => {
                            d.reject(DeadReason::Rejected, "no").await.unwrap();
                            model.dead.insert(id);
                        }
                        _ => {}
                    }
                }
            }
            Cmd::Crash => {
                drop(consumer.take());
                storage = storage.crash();
                engine = open(&storage);
                check(&engine, &model).await?;
                consumer = Some(engine.subscribe(group()).await.unwrap());
            }
            Cmd::Reopen => {
                drop(consumer.take());
                engine.close().await.unwrap();
                engine = open(&storage);
                check(&engine, &model).await?;
                consumer = Some(engine.subscribe(group()).await.unwrap());
            }
        }
    }
    drop(consumer);
    engine.close().await.unwrap();
    let engine = open(&storage);
    check(&engine, &model).await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_model(cmds in proptest::collection::vec(cmd(), 1..30)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_model(cmds))?;
    }
}
