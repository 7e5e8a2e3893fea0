//! Restart and recovery: what survives a reopen, torn tails, damage, repair, the
//! lock file, and a failing fsync.

use std::sync::Arc;
use std::time::Duration;

use agentbus::{
    ChannelName, ChannelPattern, DeadLetterFilter, DeadReason, Envelope, ErrorKind, MessageId,
    StartPosition, SubscribeOptions, Transport,
};
use agentbus_file::fault::{Faults, FaultyStorage};
use agentbus_file::segment::segment_name;
use agentbus_file::{FileEngine, FileOptions, Storage};

const WAIT: Duration = Duration::from_secs(10);

fn channel() -> ChannelName {
    ChannelName::new("orders.created").unwrap()
}

fn sub(group: &str) -> SubscribeOptions {
    SubscribeOptions::new(ChannelPattern::new("orders.>").unwrap())
        .group(group)
        .start(StartPosition::Earliest)
        .ack_wait(Duration::from_secs(60))
}

async fn publish_n(engine: &FileEngine, n: usize) -> Vec<MessageId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let receipt = engine
            .publish(Envelope::new(channel(), "order", format!("{{\"n\":{i}}}")))
            .await
            .unwrap();
        ids.push(receipt.id);
    }
    ids
}

async fn take(consumer: &mut Box<dyn agentbus::Consumer>, n: usize) -> Vec<agentbus::Delivery> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(WAIT, consumer.next_batch(n - out.len()))
            .await
            .expect("deliveries in time")
            .unwrap();
        out.extend(batch);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ids = {
        let engine = FileEngine::open(dir.path(), FileOptions::default()).unwrap();
        let mut consumer = engine.subscribe(sub("g")).await.unwrap();
        let ids = publish_n(&engine, 6).await;
        let got = take(&mut consumer, 6).await;
        // Ack 0, 2, 4; reject 1; leave 3 and 5 unsettled.
        got[0].ack().await.unwrap();
        got[2].ack().await.unwrap();
        got[4].ack().await.unwrap();
        got[1]
            .reject(DeadReason::Rejected, "bad order")
            .await
            .unwrap();
        // Dedup state is journaled too.
        let mut again = Envelope::new(channel(), "order", "{}");
        again.header.id = ids[0];
        assert!(engine.publish(again).await.unwrap().duplicate);
        engine.close().await.unwrap();
        ids
    };
    let engine = FileEngine::open(dir.path(), FileOptions::default()).unwrap();
    assert!(engine.recovery().records > 10);
    let mut consumer = engine.subscribe(sub("g")).await.unwrap();
    let got = take(&mut consumer, 2).await;
    let mut redelivered: Vec<MessageId> = got.iter().map(|d| d.envelope().header.id).collect();
    redelivered.sort();
    assert_eq!(redelivered, vec![ids[3], ids[5]]);
    assert!(got.iter().all(|d| d.attempt() == 2), "a redelivery counts");
    for d in &got {
        d.ack().await.unwrap();
    }
    let quiet = tokio::time::timeout(Duration::from_millis(300), consumer.next_batch(1)).await;
    assert!(quiet.is_err(), "acked messages never come back");
    let dead = engine
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.header.id, ids[1]);
    assert_eq!(dead[0].last_error.as_deref(), Some("bad order"));
    let mut again = Envelope::new(channel(), "order", "{}");
    again.header.id = ids[2];
    assert!(engine.publish(again).await.unwrap().duplicate);
    let stats = engine.stats().await.unwrap();
    assert_eq!(stats.details["fsync"], "always");
    assert!(stats.details.contains_key("segments"));
    drop(consumer);
    engine.close().await.unwrap();

    // A dead letter replayed, then a restart: the replay and the letter's removal
    // are one record.
    let engine = FileEngine::open(dir.path(), FileOptions::default()).unwrap();
    let dead_id = engine
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap()[0]
        .id;
    engine.replay_dead_letter(dead_id).await.unwrap();
    engine.close().await.unwrap();
    let engine = FileEngine::open(dir.path(), FileOptions::default()).unwrap();
    assert!(engine
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap()
        .is_empty());
    let mut consumer = engine.subscribe(sub("g")).await.unwrap();
    let got = take(&mut consumer, 1).await;
    assert_eq!(got[0].envelope().header.causation_id, Some(ids[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_open_is_data_dir_locked_naming_the_pid() {
    let dir = tempfile::tempdir().unwrap();
    let engine = FileEngine::open(dir.path(), FileOptions::default()).unwrap();
    let err = FileEngine::open(dir.path(), FileOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DataDirLocked);
    assert!(
        err.to_string().contains(&std::process::id().to_string()),
        "{err}"
    );
    engine.close().await.unwrap();
    FileEngine::open(dir.path(), FileOptions::default()).unwrap();
}

/// An engine on `storage` with `n` acknowledged publishes; returns their ids.
async fn seeded(storage: &FaultyStorage, n: usize) -> Vec<MessageId> {
    let engine =
        FileEngine::open_with_storage(Arc::new(storage.clone()), FileOptions::default()).unwrap();
    let ids = publish_n(&engine, n).await;
    engine.close().await.unwrap();
    ids
}

async fn all_ids(engine: &FileEngine) -> Vec<MessageId> {
    let stats = engine.stats().await.unwrap();
    let n = stats.channels.first().map_or(0, |c| c.messages) as usize;
    if n == 0 {
        return Vec::new();
    }
    let mut consumer = engine.subscribe(sub("check")).await.unwrap();
    let got = take(&mut consumer, n).await;
    got.iter().map(|d| d.envelope().header.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_and_zero_filled_tails_are_cut_and_reported() {
    for (what, damage) in [
        ("incomplete", b"\x40\x00\x00\x00".to_vec()),
        ("zero-filled", vec![0u8; 300]),
    ] {
        let storage = FaultyStorage::new(1);
        let ids = seeded(&storage, 5).await;
        storage
            .damage(&segment_name(1), |bytes| {
                // A record header promising 64 bytes, cut short; or zeros.
                let mut tail = damage.clone();
                if what == "incomplete" {
                    tail.extend_from_slice(&crc32c::crc32c(&damage).to_le_bytes());
                    tail.extend_from_slice(&[7u8; 10]);
                }
                bytes.extend_from_slice(&tail);
            })
            .unwrap();
        let engine =
            FileEngine::open_with_storage(Arc::new(storage.clone()), FileOptions::default())
                .unwrap();
        let torn = engine
            .recovery()
            .torn
            .clone()
            .expect("a torn tail reported");
        assert_eq!(torn.file, segment_name(1));
        assert!(torn.dropped_bytes > 0);
        assert_eq!(
            all_ids(&engine).await,
            ids,
            "{what}: every acknowledged publish kept"
        );
        engine.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_mid_segment_refuses_to_open_until_repaired() {
    let storage = FaultyStorage::new(2);
    let ids = seeded(&storage, 20).await;
    let name = segment_name(1);
    let len = storage.read(&name).unwrap().len();
    let at = len / 2;
    storage.damage(&name, |b| b[at] ^= 0x04).unwrap();
    let err = FileEngine::open_with_storage(Arc::new(storage.clone()), FileOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let text = err.to_string();
    assert!(text.contains(&name) && text.contains("offset"), "{text}");
    assert!(text.contains("agentbus repair"), "{text}");
    // Refusing changed nothing.
    assert_eq!(storage.read(&name).unwrap().len(), len);

    let engine = FileEngine::open_with_storage(
        Arc::new(storage.clone()),
        FileOptions::default().repair(true),
    )
    .unwrap();
    let report = engine.recovery().repaired.clone().expect("a repair report");
    assert!(
        report.bytes > 0 && !report.quarantined.is_empty(),
        "{report}"
    );
    let kept = all_ids(&engine).await;
    assert!(
        kept.len() < ids.len(),
        "the damaged record and those after are gone"
    );
    assert_eq!(
        kept[..],
        ids[..kept.len()],
        "what is kept is an exact prefix"
    );
    assert_eq!(
        report.publishes_lost as usize + kept.len() + 1,
        ids.len(),
        "{report}"
    );
    engine.close().await.unwrap();
    // Quarantine files stay for forensics; the log opens normally now.
    assert!(storage
        .list()
        .unwrap()
        .iter()
        .any(|n| n.contains("quarantined")));
    FileEngine::open_with_storage(Arc::new(storage), FileOptions::default()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_segment_is_named() {
    let storage = FaultyStorage::new(3);
    let engine = FileEngine::open_with_storage(
        Arc::new(storage.clone()),
        FileOptions::default().segment_bytes(1024),
    )
    .unwrap();
    publish_n(&engine, 40).await;
    engine.close().await.unwrap();
    let segments: Vec<String> = storage
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    assert!(segments.len() >= 3, "{segments:?}");
    storage.remove(&segment_name(2)).unwrap();
    let err = FileEngine::open_with_storage(Arc::new(storage.clone()), FileOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains(&segment_name(2)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_error_is_fatal_and_reopen_recovers() {
    let storage = FaultyStorage::new(4);
    let engine =
        FileEngine::open_with_storage(Arc::new(storage.clone()), FileOptions::default()).unwrap();
    let ids = publish_n(&engine, 5).await;
    storage.set_faults(Faults {
        sync_error: 1.0,
        read_flip: 0.0,
    });
    let err = engine
        .publish(Envelope::new(channel(), "order", "{}"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    assert!(!err.is_temporary());
    assert!(err.to_string().contains("reopen"), "{err}");
    // It stops acknowledging, even though a retried fsync would now "succeed".
    storage.set_faults(Faults::default());
    let err = engine
        .publish(Envelope::new(channel(), "order", "{}"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    assert!(engine.stats().await.unwrap().details.contains_key("failed"));
    drop(engine);
    let after = storage.crash();
    let engine = FileEngine::open_with_storage(Arc::new(after), FileOptions::default()).unwrap();
    let kept = all_ids(&engine).await;
    assert!(
        kept.len() >= ids.len(),
        "every acknowledged publish survived"
    );
    assert_eq!(kept[..ids.len()], ids[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynced_settlements_still_persist_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let options = || FileOptions::default().sync_settlements(false);
    let ids = {
        let engine = FileEngine::open(dir.path(), options()).unwrap();
        let mut consumer = engine.subscribe(sub("g")).await.unwrap();
        let ids = publish_n(&engine, 4).await;
        let got = take(&mut consumer, 4).await;
        for d in &got[..3] {
            d.ack().await.unwrap();
        }
        drop(consumer);
        engine.close().await.unwrap();
        ids
    };
    let engine = FileEngine::open(dir.path(), options()).unwrap();
    let mut consumer = engine.subscribe(sub("g")).await.unwrap();
    let got = take(&mut consumer, 1).await;
    assert_eq!(got[0].envelope().header.id, ids[3]);
    let quiet = tokio::time::timeout(Duration::from_millis(300), consumer.next_batch(1)).await;
    assert!(quiet.is_err(), "acks written before the close are kept");
}

/// `FileEngine::open` is synchronous and waits for its own journal record; called from
/// a tokio task that has used up its cooperative-scheduling budget, that wait once
/// spun forever (tokio's budget check kept answering "yield" to a nested executor
/// that never returns to the scheduler). The open must finish whatever the budget.
#[test]
fn open_from_a_task_with_an_exhausted_budget_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            // Every `recv` of a ready message spends one unit of the task's budget
            // (128 per poll); 1,000 in a row leave none.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for i in 0..1_000 {
                tx.send(i).unwrap();
            }
            let mut received = 0;
            while futures::FutureExt::now_or_never(rx.recv()).is_some() {
                received += 1;
            }
            // A ready message refused: the budget is spent (else the test proves nothing).
            assert!(received < 1_000, "the task's budget never ran out");
            let engine = FileEngine::open(&path, FileOptions::default()).unwrap();
            engine.close().await.unwrap();
        });
        let _ = done.send(());
    });
    assert!(
        finished.recv_timeout(Duration::from_secs(60)).is_ok(),
        "FileEngine::open did not return within 60 s"
    );
}
