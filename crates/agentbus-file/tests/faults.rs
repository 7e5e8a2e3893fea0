//! Seeded runs on the fault-injecting file layer: concurrent publishes, consumes,
//! acks, nacks and rejects while fsync may fail, then a power loss (unsynced bytes
//! dropped, torn or zero-filled) and a reopen. Nothing acknowledged may be lost or
//! corrupted, no acked message may come back, dead letters survive; and bit flips on
//! read are always refused, never accepted silently.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use agentbus::{
    ChannelName, ChannelPattern, DeadLetterFilter, DeadReason, Envelope, ErrorKind, MessageId,
    StartPosition, SubscribeOptions, Transport,
};
use agentbus_file::fault::{Faults, FaultyStorage};
use agentbus_file::{FileEngine, FileOptions};

fn group() -> SubscribeOptions {
    SubscribeOptions::new(ChannelPattern::new("f.>").unwrap())
        .group("g")
        .start(StartPosition::Earliest)
        .ack_wait(Duration::from_secs(600))
        .max_deliveries(1_000)
        .prefetch(1_000)
}

#[derive(Default, Debug)]
struct Acked {
    published: HashSet<MessageId>,
    acked: HashSet<MessageId>,
    dead: HashSet<MessageId>,
}

async fn one_run(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let storage = FaultyStorage::new(seed);
    let segment_bytes = if rng.bool() { 512 } else { 64 * 1024 };
    // Checkpoints (and the segment deletion they allow) now and then, often, or never:
    // a power loss may hit one half written, or between its rename and the deletions.
    let checkpoint_bytes = match rng.u8(0..4) {
        0 => None,
        1 => Some(256),
        2 => Some(2048),
        _ => Some(64 * 1024),
    };
    let options = || {
        FileOptions::default()
            .segment_bytes(segment_bytes)
            .checkpoint_bytes(checkpoint_bytes)
    };
    let engine = FileEngine::open_with_storage(Arc::new(storage.clone()), options()).unwrap();
    let mut seen = Acked::default();
    let channels = [
        ChannelName::new("f.a").unwrap(),
        ChannelName::new("f.b").unwrap(),
    ];
    let mut consumer = engine.subscribe(group()).await.unwrap();
    if rng.u8(0..4) == 0 {
        storage.set_faults(Faults {
            sync_error: 0.1,
            read_flip: 0.0,
        });
    }
    'run: for _ in 0..rng.usize(1..6) {
        // A burst of concurrent publishes: one group commit or a few.
        let burst: Vec<Envelope> = (0..rng.usize(1..12))
            .map(|i| {
                Envelope::new(
                    channels[i % 2].clone(),
                    "t",
                    vec![rng.u8(..); rng.usize(0..300)],
                )
            })
            .collect();
        let results = futures::future::join_all(burst.into_iter().map(|e| engine.publish(e))).await;
        for r in results {
            match r {
                Ok(receipt) => {
                    seen.published.insert(receipt.id);
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
                    break 'run;
                }
            }
        }
        let Ok(Ok(batch)) = tokio::time::timeout(
            Duration::from_millis(10),
            consumer.next_batch(rng.usize(1..8)),
        )
        .await
        else {
            break 'run;
        };
        for d in batch {
            let id = d.envelope().header.id;
            let outcome = match rng.u8(0..4) {
                0 | 1 => d.ack().await.map(|()| seen.acked.insert(id)),
                2 => d
                    .nack(Duration::ZERO, Some("again".into()))
                    .await
                    .map(|()| false),
                _ => d
                    .reject(DeadReason::Rejected, "no")
                    .await
                    .map(|()| seen.dead.insert(id)),
            };
            if outcome.is_err() {
                break 'run;
            }
        }
    }
    drop(consumer);
    // Power loss while the old engine may still be running.
    let after = storage.crash();
    drop(engine);
    let engine = FileEngine::open_with_storage(Arc::new(after), options())
        .unwrap_or_else(|e| panic!("seed {seed}: the log must open after a power loss: {e}"));
    check(&engine, &seen, seed).await;
    engine.close().await.unwrap();
}

async fn check(engine: &FileEngine, seen: &Acked, seed: u64) {
    let stats = engine.stats().await.unwrap();
    let present: HashSet<MessageId> = ordered_ids(engine).await.into_iter().collect();
    for id in &seen.published {
        assert!(
            present.contains(id),
            "seed {seed}: acknowledged publish {id} lost"
        );
    }
    let dead: HashSet<MessageId> = engine
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.envelope.header.id)
        .collect();
    for id in &seen.dead {
        assert!(dead.contains(id), "seed {seed}: dead letter {id} lost");
    }
    // Everything the group will deliver (its pending count, taken without waiting
    // for a quiet period): no acked or dead-lettered message among it.
    let pending = stats
        .groups
        .iter()
        .find(|g| g.group == "g")
        .map_or(0, |g| g.pending);
    let mut g = engine.subscribe(group()).await.unwrap();
    let mut got = 0;
    while got < pending {
        let batch = tokio::time::timeout(Duration::from_secs(5), g.next_batch(100_000))
            .await
            .expect("pending messages delivered")
            .unwrap();
        for d in batch {
            got += 1;
            let id = d.envelope().header.id;
            assert!(
                !seen.acked.contains(&id),
                "seed {seed}: acked {id} came back"
            );
            assert!(
                !seen.dead.contains(&id),
                "seed {seed}: dead letter {id} redelivered"
            );
        }
    }
}

async fn runs(seeds: std::ops::Range<u64>) {
    let base = std::env::var("AGENTBUS_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0u64);
    for seed in seeds {
        one_run(base.wrapping_add(seed)).await;
    }
}

/// 2,000 seeded power-loss runs (a few seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_power_loss_runs() {
    runs(0..2_000).await;
}

/// 50,000 more: `cargo nextest run -p agentbus-file --run-ignored only many_seeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 50,000 seeded runs"]
async fn many_seeded_power_loss_runs() {
    runs(2_000..52_000).await;
}

/// A flipped bit anywhere in a cleanly written log is refused with `Corrupt`, never
/// read as data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flips_on_read_are_refused() {
    for seed in 0..300u64 {
        let storage = FaultyStorage::new(seed);
        let engine = FileEngine::open_with_storage(
            Arc::new(storage.clone()),
            FileOptions::default().segment_bytes(2048),
        )
        .unwrap();
        for i in 0..(seed % 20 + 1) {
            engine
                .publish(Envelope::new(
                    ChannelName::new("f.a").unwrap(),
                    "t",
                    format!("{i}"),
                ))
                .await
                .unwrap();
        }
        engine.close().await.unwrap();
        storage.set_faults(Faults {
            sync_error: 0.0,
            read_flip: 1.0,
        });
        let err = FileEngine::open_with_storage(Arc::new(storage.clone()), FileOptions::default())
            .expect_err("a flipped bit must not be accepted");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "seed {seed}: {err}");
        assert!(err.to_string().contains(".seg"), "names the file: {err}");
    }
}

/// Under `interval` and `never`, a power loss may lose recent receipts (that is the
/// trade), but the log always opens, keeps an exact prefix of what was published, and
/// a clean close loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weaker_policies_lose_only_a_suffix() {
    use agentbus_file::FsyncPolicy;
    for seed in 0..200u64 {
        let policy = if seed % 2 == 0 {
            FsyncPolicy::Interval(Duration::from_millis(2))
        } else {
            FsyncPolicy::Never
        };
        let storage = FaultyStorage::new(seed);
        let options = || FileOptions::default().fsync(policy).segment_bytes(1024);
        let engine = FileEngine::open_with_storage(Arc::new(storage.clone()), options()).unwrap();
        let channel = ChannelName::new("f.a").unwrap();
        let mut ids = Vec::new();
        for i in 0..(seed % 30 + 1) {
            let r = engine
                .publish(Envelope::new(channel.clone(), "t", format!("{i}")))
                .await
                .unwrap();
            ids.push(r.id);
        }
        let crashed = storage.crash();
        let after = FileEngine::open_with_storage(Arc::new(crashed), options())
            .unwrap_or_else(|e| panic!("seed {seed}: opens after a power loss: {e}"));
        let kept = ordered_ids(&after).await;
        assert_eq!(kept[..], ids[..kept.len()], "seed {seed}: an exact prefix");
        after.close().await.unwrap();
        engine.close().await.unwrap();
        let reopened = FileEngine::open_with_storage(Arc::new(storage), options()).unwrap();
        assert_eq!(
            ordered_ids(&reopened).await,
            ids,
            "seed {seed}: a clean close keeps all"
        );
        reopened.close().await.unwrap();
    }
}

async fn ordered_ids(engine: &FileEngine) -> Vec<MessageId> {
    let stats = engine.stats().await.unwrap();
    let stored: u64 = stats.channels.iter().map(|c| c.messages).sum();
    let mut all = engine
        .subscribe(
            SubscribeOptions::new(ChannelPattern::new("f.>").unwrap())
                .start(StartPosition::Earliest)
                .prefetch(100_000),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    while (ids.len() as u64) < stored {
        let batch = tokio::time::timeout(Duration::from_secs(5), all.next_batch(100_000))
            .await
            .expect("stored messages delivered")
            .unwrap();
        ids.extend(batch.iter().map(|d| d.envelope().header.id));
    }
    ids
}
