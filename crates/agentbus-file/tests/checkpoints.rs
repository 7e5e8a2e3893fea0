//! Checkpoints and segment deletion on the real file system: opening starts from the
//! newest checkpoint and replays only what followed it, the state is the same as a
//! full replay's, old segments go, and a damaged checkpoint is refused, then repaired
//! by falling back to the previous one.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use agentbus::{
    ChannelName, ChannelPattern, DeadLetterFilter, DeadReason, Envelope, ErrorKind, MessageId,
    StartPosition, SubscribeOptions, Transport,
};
use agentbus_file::checkpoint::{checkpoint_name, parse_checkpoint_name};
use agentbus_file::segment::{parse_segment_name, segment_name};
use agentbus_file::{FileEngine, FileOptions};

const WAIT: Duration = Duration::from_secs(10);

fn options() -> FileOptions {
    FileOptions::default()
        .segment_bytes(8 * 1024)
        .checkpoint_bytes(Some(16 * 1024))
}

fn group() -> SubscribeOptions {
    SubscribeOptions::new(ChannelPattern::new("ck.>").unwrap())
        .group("workers")
        .start(StartPosition::Earliest)
        .ack_wait(Duration::from_secs(600))
        .prefetch(100_000)
}

/// Files of a kind in `dir`: (segment indexes, checkpoint indexes).
fn files(dir: &Path) -> (Vec<u64>, Vec<u64>) {
    let mut segments = Vec::new();
    let mut checkpoints = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(i) = parse_segment_name(&name) {
            segments.push(i);
        }
        if let Some(i) = parse_checkpoint_name(&name) {
            checkpoints.push(i);
        }
    }
    segments.sort_unstable();
    checkpoints.sort_unstable();
    (segments, checkpoints)
}

/// What a workload left: the ids still owed to the group and the dead letters.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    owed: BTreeSet<MessageId>,
    dead: BTreeSet<MessageId>,
}

/// Publishes `rounds` × 50 messages; after each round the group acks most of what it
/// got, rejects some and leaves some unsettled (redelivered after the restart).
async fn workload(engine: &FileEngine, rounds: usize) -> Outcome {
    let mut consumer = engine.subscribe(group()).await.unwrap();
    let mut owed = BTreeSet::new();
    let mut dead = BTreeSet::new();
    for round in 0..rounds {
        let batch: Vec<Envelope> = (0..50)
            .map(|i| {
                Envelope::new(
                    ChannelName::new(format!("ck.{}", i % 3)).unwrap(),
                    "job",
                    vec![round as u8; 120],
                )
            })
            .collect();
        for receipt in engine.publish_batch(batch).await {
            owed.insert(receipt.unwrap().id);
        }
        let mut got = Vec::new();
        while got.len() < 50 {
            let batch = tokio::time::timeout(WAIT, consumer.next_batch(50 - got.len()))
                .await
                .expect("deliveries in time")
                .unwrap();
            got.extend(batch);
        }
        for (n, d) in got.into_iter().enumerate() {
            let id = d.envelope().header.id;
            match n % 10 {
                0 => {
                    d.reject(DeadReason::Rejected, "bad input").await.unwrap();
                    owed.remove(&id);
                    dead.insert(id);
                }
                1 => drop(d), // unsettled: owed again after the restart
                _ => {
                    d.ack().await.unwrap();
                    owed.remove(&id);
                }
            }
        }
    }
    Outcome { owed, dead }
}

/// What a reopened engine owes the group and holds as dead letters.
async fn observe(engine: &FileEngine, expected_owed: usize) -> Outcome {
    let mut consumer = engine.subscribe(group()).await.unwrap();
    let mut owed = BTreeSet::new();
    while owed.len() < expected_owed {
        let batch = tokio::time::timeout(WAIT, consumer.next_batch(100_000))
            .await
            .expect("what is owed is delivered")
            .unwrap();
        owed.extend(batch.iter().map(|d| d.envelope().header.id));
    }
    // Nothing more than that.
    let extra = tokio::time::timeout(Duration::from_millis(200), consumer.next_batch(10)).await;
    assert!(
        extra.is_err(),
        "more was delivered than was owed: {extra:?}"
    );
    let dead = engine
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.envelope.header.id)
        .collect();
    Outcome { owed, dead }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_starts_from_the_newest_checkpoint_and_old_segments_go() {
    let dir = tempfile::tempdir().unwrap();
    let expected = {
        let engine = FileEngine::open(dir.path(), options()).unwrap();
        let outcome = workload(&engine, 40).await;
        let stats = engine.stats().await.unwrap();
        let written: u64 = stats.details["checkpoints_written"].parse().unwrap();
        assert!(
            written >= 3,
            "only {written} checkpoints in {:?}",
            stats.details
        );
        assert!(
            stats.details["segments_deleted"].parse::<u64>().unwrap() > 0,
            "{:?}",
            stats.details
        );
        // The files listed are the files on disk, with their sizes.
        let on_disk = |extension: &str| {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|name| name.ends_with(extension))
                .collect();
            names.sort();
            names
        };
        for (detail, extension) in [("segment_files", ".seg"), ("checkpoint_files", ".ckpt")] {
            // A checkpoint may be retiring files right now: compare a listing taken
            // while the directory held still.
            let (names, stats) = loop {
                let before = (on_disk(".seg"), on_disk(".ckpt"));
                let stats = engine.stats().await.unwrap();
                if (on_disk(".seg"), on_disk(".ckpt")) == before {
                    break (on_disk(extension), stats);
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            };
            let listed = &stats.details[detail];
            assert!(!names.is_empty());
            if names.len() <= 16 {
                let listed: Vec<(String, u64)> = listed
                    .split(", ")
                    .map(|entry| {
                        let (name, bytes) = entry.split_once(" (").unwrap();
                        (
                            name.to_string(),
                            bytes.trim_end_matches(" B)").parse().unwrap(),
                        )
                    })
                    .collect();
                let listed_names: Vec<&String> = listed.iter().map(|(name, _)| name).collect();
                assert_eq!(listed_names, names.iter().collect::<Vec<_>>());
                // Every file but the segment still written to has its final size.
                for (name, bytes) in &listed[..listed.len() - usize::from(extension == ".seg")] {
                    let on_disk = std::fs::metadata(dir.path().join(name)).unwrap().len();
                    assert_eq!(*bytes, on_disk, "{name}");
                }
            } else {
                assert!(listed.contains(&names[0]), "{listed}");
                assert!(
                    listed.contains(&format!("… {} more …", names.len() - 16)),
                    "{listed}"
                );
            }
        }
        engine.close().await.unwrap();
        outcome
    };
    let (segments, checkpoints) = files(dir.path());
    assert_eq!(
        checkpoints.len(),
        2,
        "the newest and one fallback: {checkpoints:?}"
    );
    assert!(
        segments[0] > 1 && segments[0] == checkpoints[0],
        "segments before the previous checkpoint are deleted: {segments:?} {checkpoints:?}"
    );
    // Every segment from the fallback checkpoint on is still there, with no gap.
    assert_eq!(
        segments,
        (segments[0]..=*segments.last().unwrap()).collect::<Vec<_>>()
    );

    let engine = FileEngine::open(dir.path(), options()).unwrap();
    let recovery = engine.recovery().clone();
    assert_eq!(
        recovery.checkpoint.as_deref(),
        Some(checkpoint_name(checkpoints[1]).as_str())
    );
    let after = observe(&engine, expected.owed.len()).await;
    assert_eq!(after, expected);
    engine.close().await.unwrap();

    // The same history with checkpoints off replays everything and ends the same.
    let full = tempfile::tempdir().unwrap();
    let engine = FileEngine::open(
        full.path(),
        FileOptions::default()
            .segment_bytes(8 * 1024)
            .checkpoint_bytes(None),
    )
    .unwrap();
    let outcome = workload(&engine, 40).await;
    engine.close().await.unwrap();
    let engine =
        FileEngine::open(full.path(), FileOptions::default().checkpoint_bytes(None)).unwrap();
    assert!(engine.recovery().checkpoint.is_none());
    assert!(
        engine.recovery().records > recovery.records * 3,
        "a full replay reads far more records ({}) than one after a checkpoint ({})",
        engine.recovery().records,
        recovery.records
    );
    assert_eq!(
        files(full.path()).0[0],
        1,
        "nothing deleted without checkpoints"
    );
    let replayed = observe(&engine, outcome.owed.len()).await;
    assert_eq!(replayed.owed.len(), after.owed.len());
    assert_eq!(replayed.dead.len(), after.dead.len());
    engine.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_checkpoint_is_refused_then_repaired_from_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let expected = {
        let engine = FileEngine::open(dir.path(), options()).unwrap();
        let outcome = workload(&engine, 30).await;
        engine.close().await.unwrap();
        outcome
    };
    let (_, checkpoints) = files(dir.path());
    assert_eq!(checkpoints.len(), 2);
    let newest = checkpoint_name(checkpoints[1]);
    let path = dir.path().join(&newest);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let err = FileEngine::open(dir.path(), options()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.message().contains(&newest), "{err}");
    assert!(err.message().contains("agentbus repair"), "{err}");

    let recovery = agentbus_file::repair(dir.path()).unwrap();
    let report = recovery.repaired.expect("a repair report");
    assert_eq!(report.damage.unwrap().file, newest);
    assert_eq!(
        recovery.checkpoint.as_deref(),
        Some(checkpoint_name(checkpoints[0]).as_str()),
        "fell back to the previous checkpoint"
    );
    // Nothing was lost: the previous checkpoint and the log after it hold it all.
    let engine = FileEngine::open(dir.path(), options()).unwrap();
    assert_eq!(observe(&engine, expected.owed.len()).await, expected);
    engine.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_checkpoint_is_removed_and_a_missing_segment_named() {
    let dir = tempfile::tempdir().unwrap();
    let expected = {
        let engine = FileEngine::open(dir.path(), options()).unwrap();
        let outcome = workload(&engine, 12).await;
        engine.close().await.unwrap();
        outcome
    };
    let (_, checkpoints) = files(dir.path());
    let newest = *checkpoints.last().expect("a checkpoint was written");
    // A crash mid-checkpoint leaves a temporary file: ignored and removed.
    let tmp = format!("{}.tmp", checkpoint_name(newest + 5));
    std::fs::write(dir.path().join(&tmp), b"half a checkpoint").unwrap();
    {
        let engine = FileEngine::open(dir.path(), options()).unwrap();
        assert!(!dir.path().join(&tmp).exists());
        assert_eq!(observe(&engine, expected.owed.len()).await, expected);
        engine.close().await.unwrap();
    }
    // The segment the newest checkpoint continues in is gone: named, not skipped.
    // (The reopen above may have written a checkpoint of its own: look again.)
    let (segments, checkpoints) = files(dir.path());
    let newest = *checkpoints.last().unwrap();
    assert!(segments.contains(&newest));
    std::fs::remove_file(dir.path().join(segment_name(newest))).unwrap();
    let err = FileEngine::open(dir.path(), options()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.message().contains(&segment_name(newest)), "{err}");
}
