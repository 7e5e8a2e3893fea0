//! Faults: a private nats-server (its own free port and store dir) is killed and
//! restarted while a producer publishes and a group consumes. The transport
//! reconnects; every message whose publish returned a receipt is delivered; deliveries
//! held unacknowledged across the restart come back.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{ChannelName, Envelope, SubscribeOptions, Transport};
use agentbus_nats::{NatsOptions, NatsStorage, NatsTransport};
use parking_lot::Mutex;

const NATS_SERVER: &str = "/usr/sbin/nats-server";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// A nats-server child process with JetStream; killed on drop.
struct Server {
    child: Option<Child>,
    port: u16,
    monitor: u16,
    dir: PathBuf,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let mut server = Server {
            child: None,
            port: free_port(),
            monitor: free_port(),
            dir: dir.to_path_buf(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts (is /usr/sbin/nats-server installed?)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nats-server did not listen on {} within 20 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the server gets no chance to flush or say goodbye.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn store_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "agentbus-nats-fault-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("a temporary store dir");
    dir
}

fn envelope(channel: &ChannelName, n: u64) -> Envelope {
    Envelope::new(
        channel.clone(),
        "fault.num",
        format!("{{\"n\":{n}}}").into_bytes(),
    )
}

fn number(envelope: &Envelope) -> u64 {
    serde_json::from_slice::<serde_json::Value>(&envelope.payload)
        .ok()
        .and_then(|v| v["n"].as_u64())
        .expect("a fault.num payload")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_under_load_loses_nothing_acknowledged() {
    const TOTAL: u64 = 1500;
    const KILL_AFTER: u64 = 400;
    let mut server = Server::start(&store_dir());
    let options = NatsOptions::default()
        .prefix("faults")
        .storage(NatsStorage::File)
        .monitor_url(format!("http://127.0.0.1:{}", server.monitor));
    let transport = Arc::new(
        NatsTransport::connect(&server.url(), options)
            .await
            .expect("connecting to the private nats-server"),
    );

    // Deliveries held, unsettled, across the restart must come back.
    let held_channel = ChannelName::new("held.x").unwrap();
    let mut holder = transport
        .subscribe(
            SubscribeOptions::new(held_channel.clone().into())
                .group("holders")
                .ack_wait(Duration::from_secs(2)),
        )
        .await
        .expect("subscribing the holders");
    for n in 0..3 {
        transport
            .publish(envelope(&held_channel, n))
            .await
            .expect("publishing a held message");
    }
    let mut held = Vec::new();
    while held.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(10), holder.next_batch(3))
            .await
            .expect("the held messages arrive")
            .expect("next_batch");
        held.extend(batch);
    }

    let load = ChannelName::new("load.x").unwrap();
    let mut consumer = transport
        .subscribe(
            SubscribeOptions::new(load.clone().into())
                .group("workers")
                .ack_wait(Duration::from_secs(2))
                .prefetch(32),
        )
        .await
        .expect("subscribing the workers");
    let delivered = Arc::new(Mutex::new(BTreeSet::new()));
    // The workers start only after the restart, so the messages published before the
    // kill are an acknowledged, unconsumed backlog that must survive it.
    let (restarted, mut go) = tokio::sync::watch::channel(false);
    let consuming = {
        let delivered = delivered.clone();
        tokio::spawn(async move {
            let _ = go.wait_for(|r| *r).await;
            loop {
                let Ok(Ok(batch)) =
                    tokio::time::timeout(Duration::from_secs(60), consumer.next_batch(32)).await
                else {
                    return;
                };
                for delivery in batch {
                    delivered.lock().insert(number(delivery.envelope()));
                    // An ack lost in the restart only means a redelivery.
                    let _ = delivery.ack().await;
                }
            }
        })
    };

    let mut acknowledged = BTreeSet::new();
    let mut failed = 0u64;
    for n in 0..TOTAL {
        if n == KILL_AFTER {
            server.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.spawn();
            restarted.send_replace(true);
        }
        match transport.publish(envelope(&load, n)).await {
            Ok(_) => {
                acknowledged.insert(n);
            }
            Err(_) => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(
        acknowledged.len() as u64 > TOTAL / 2,
        "only {} of {TOTAL} publishes were acknowledged ({failed} failed): the transport did \
         not reconnect",
        acknowledged.len()
    );

    let start = Instant::now();
    loop {
        let missing: Vec<u64> = acknowledged
            .difference(&delivered.lock())
            .copied()
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} acknowledged messages were never delivered after the restart, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The held deliveries come back once their ack wait passed.
    let mut back = BTreeSet::new();
    let start = Instant::now();
    while back.len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "held deliveries came back: {back:?}, expected all of 0..3"
        );
        if let Ok(Ok(batch)) =
            tokio::time::timeout(Duration::from_secs(5), holder.next_batch(3)).await
        {
            for delivery in batch {
                // Usually attempt 2; after a SIGKILL JetStream may have lost the
                // consumer's record of the first delivery and count this one as 1.
                assert!(delivery.attempt() >= 1, "attempts count from 1");
                back.insert(number(delivery.envelope()));
                delivery.ack().await.expect("acking a redelivered message");
            }
        }
    }
    drop(held);

    let report = transport
        .durability()
        .await
        .expect("durability after the restart");
    assert_eq!(
        report.settings.get("storage").map(String::as_str),
        Some("file")
    );
    assert!(
        report.settings["jetstream.sync_interval"].starts_with("2m"),
        "sync interval read from the monitoring endpoint: {report:?}"
    );
    println!(
        "faults: {} of {TOTAL} publishes acknowledged, {failed} failed during the restart, {} \
         distinct messages delivered, every acknowledged one among them",
        acknowledged.len(),
        delivered.lock().len()
    );
    transport.close().await.expect("closing");
    consuming.abort();
}
