//! kill -9 crash test: a real child process (this test binary, re-run as
//! `crash_child`) publishes from many concurrent tasks and consumes, acks and
//! rejects; the parent SIGKILLs it at random moments, restarts it, and finally checks
//! that every publish whose receipt was returned is stored, no acked message comes
//! back, no record is corrupt (the log opens), and every dead letter survived.
//!
//! The child prints `P <id>` after a publish receipt, `A <id>` after an ack returned
//! and `D <id>` after a reject returned; the parent only trusts whole lines.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentbus::{
    ChannelName, ChannelPattern, DeadLetterFilter, DeadReason, Envelope, MessageId, StartPosition,
    SubscribeOptions, Transport,
};
use agentbus_file::{FileEngine, FileOptions};

const CHILD_ENV: &str = "AGENTBUS_CRASH_CHILD_DIR";
const PUBLISHERS: usize = 16;

/// Small segments and frequent checkpoints, so that kills also land while a
/// checkpoint is written and while the segments it covers are deleted.
fn crash_options() -> FileOptions {
    FileOptions::default()
        .segment_bytes(64 * 1024)
        .checkpoint_bytes(Some(32 * 1024))
}

fn group_options() -> SubscribeOptions {
    SubscribeOptions::new(ChannelPattern::new("crash.>").unwrap())
        .group("workers")
        .start(StartPosition::Earliest)
        .ack_wait(Duration::from_secs(60))
        .max_deliveries(1_000_000)
        .prefetch(32)
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// The child's body; a no-op unless started by the parent.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let engine = match FileEngine::open(&dir, crash_options()) {
            Ok(engine) => engine,
            Err(e) => {
                eprintln!("OPEN FAILED: {e}");
                std::process::exit(3);
            }
        };
        say("READY\n".into());
        let channel = ChannelName::new("crash.jobs").unwrap();
        for p in 0..PUBLISHERS {
            let engine = engine.clone();
            let channel = channel.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let envelope = Envelope::new(channel.clone(), "job", format!("{p}-{i}"));
                    match engine.publish(envelope).await {
                        Ok(receipt) => say(format!("P {}\n", receipt.id)),
                        Err(e) => {
                            eprintln!("PUBLISH FAILED: {e}");
                            std::process::exit(4);
                        }
                    }
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            });
        }
        let mut consumer = engine.subscribe(group_options()).await.unwrap();
        let mut n = 0u64;
        loop {
            let batch = consumer.next_batch(16).await.unwrap();
            for delivery in batch {
                n += 1;
                let id = delivery.envelope().header.id;
                if n % 7 == 0 {
                    delivery
                        .reject(DeadReason::Rejected, "every seventh")
                        .await
                        .unwrap();
                    say(format!("D {id}\n"));
                } else {
                    delivery.ack().await.unwrap();
                    say(format!("A {id}\n"));
                }
            }
        }
    });
}

#[derive(Default)]
struct Seen {
    published: HashSet<MessageId>,
    acked: HashSet<MessageId>,
    dead: HashSet<MessageId>,
}

fn run_child(dir: &Path, run_for: Duration, seen: &mut Seen) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "crash_child",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the child starts");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    std::thread::sleep(run_for);
    if let Some(status) = child.try_wait().unwrap() {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        panic!("the child exited by itself ({status}): {err}");
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let bytes = reader.join().unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let whole = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    for line in whole.lines() {
        let Some((tag, id)) = line.split_once(' ') else {
            continue;
        };
        let Ok(id) = id.parse::<MessageId>() else {
            continue;
        };
        match tag {
            "P" => seen.published.insert(id),
            "A" => seen.acked.insert(id),
            "D" => seen.dead.insert(id),
            _ => false,
        };
    }
}

async fn verify(dir: &Path, seen: &Seen) {
    let engine = FileEngine::open(dir, crash_options()).expect("the log opens: no corrupt record");
    let stats = engine.stats().await.unwrap();
    // The kills landed on a log that checkpoints and deletes segments as it goes.
    let files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let checkpoints = files.iter().filter(|f| f.ends_with(".ckpt")).count();
    let first_segment = files
        .iter()
        .filter_map(|f| agentbus_file::segment::parse_segment_name(f))
        .min();
    println!(
        "recovered from {:?} ({} records replayed); {checkpoints} checkpoint file(s), first \
         segment {first_segment:?}",
        engine.recovery().checkpoint,
        engine.recovery().records
    );
    assert!(
        (1..=2).contains(&checkpoints),
        "expected one or two checkpoints, found {files:?}"
    );
    assert!(
        engine.recovery().checkpoint.is_some(),
        "the open did not start from a checkpoint"
    );
    let stored = stats.channels.first().map_or(0, |c| c.messages);
    // Everything stored, via a private group from the earliest message.
    let mut all = engine
        .subscribe(
            SubscribeOptions::new(ChannelPattern::new("crash.>").unwrap())
                .start(StartPosition::Earliest)
                .prefetch(1_000_000),
        )
        .await
        .unwrap();
    let mut present = HashSet::new();
    while (present.len() as u64) < stored {
        let batch = tokio::time::timeout(Duration::from_secs(10), all.next_batch(100_000))
            .await
            .expect("the stored messages are delivered")
            .unwrap();
        present.extend(batch.iter().map(|d| d.envelope().header.id));
    }
    let lost: Vec<_> = seen
        .published
        .iter()
        .filter(|id| !present.contains(id) && !seen.acked.contains(id) && !seen.dead.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged publishes are missing: {lost:?}",
        lost.len()
    );
    // Dead letters survive.
    let dead: HashSet<MessageId> = engine
        .dead_letters(DeadLetterFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.envelope.header.id)
        .collect();
    let missing: Vec<_> = seen.dead.iter().filter(|id| !dead.contains(id)).collect();
    assert!(missing.is_empty(), "dead letters lost: {missing:?}");
    // No acked message comes back to the group.
    let mut group = engine
        .subscribe(group_options().prefetch(1_000_000))
        .await
        .unwrap();
    let mut back = 0usize;
    while let Ok(batch) =
        tokio::time::timeout(Duration::from_millis(500), group.next_batch(100_000)).await
    {
        for d in batch.unwrap() {
            let id = d.envelope().header.id;
            assert!(!seen.acked.contains(&id), "acked message {id} came back");
            assert!(
                !seen.dead.contains(&id),
                "dead-lettered message {id} came back"
            );
            back += 1;
        }
    }
    println!(
        "verified: {} receipts, {} acks, {} dead letters seen; {} stored, {} redelivered after the last kill",
        seen.published.len(),
        seen.acked.len(),
        seen.dead.len(),
        stored,
        back
    );
    drop(group);
    drop(all);
    engine.close().await.unwrap();
}

fn crash_loop(kills: usize, budget: Duration) {
    let seed = std::env::var("AGENTBUS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("crash loop: {kills} kills, seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Seen::default();
    let started = Instant::now();
    let mut done = 0;
    while done < kills {
        let run_for = Duration::from_millis(rng.u64(30..250));
        run_child(dir.path(), run_for, &mut seen);
        done += 1;
        if started.elapsed() > budget {
            break;
        }
    }
    println!("{done} kills in {:.1?}", started.elapsed());
    assert!(done >= kills.min(50), "only {done} kills fit in {budget:?}");
    assert!(!seen.published.is_empty(), "the child never published");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(verify(dir.path(), &seen));
}

/// 50 SIGKILLs at random moments (about 10–20 s).
#[test]
fn kill_9_fifty_times() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    crash_loop(50, Duration::from_secs(120));
}

/// 1,000 SIGKILLs: run by hand with `cargo nextest run -p agentbus-file --run-ignored
/// only kill_9_thousand_times`.
#[test]
#[ignore = "long: 1,000 kills, several minutes"]
fn kill_9_thousand_times() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    crash_loop(1_000, Duration::from_secs(3_600));
}
