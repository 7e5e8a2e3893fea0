//! Faults: connections killed under load (`CLIENT KILL` on the shared Redis, aimed at
//! this test's own ACL user only) and a Redis server of the test's own, on a free port,
//! killed and restarted. Publishes either succeed or return an error — never a silent
//! loss — unacked deliveries come back, and `health` reports the outage and recovery.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentbus::{
    ChannelName, ChannelPattern, Consumer, Delivery, Envelope, SubscribeOptions, Transport,
};
use agentbus_redis::{RedisOptions, RedisTransport};

const WAIT: Duration = Duration::from_secs(20);

fn shared_url() -> String {
    std::env::var("AGENTBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn envelope(channel: &ChannelName, n: u64) -> Envelope {
    Envelope::new(
        channel.clone(),
        "fault.num",
        format!("{{\"n\":{n}}}").into_bytes(),
    )
}

fn number(d: &Delivery) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&d.envelope().payload).expect("json");
    v["n"].as_u64().expect("a number")
}

/// An ACL user of this test's own, so `CLIENT KILL USER` hits only our connections;
/// deleted (with its keys) on drop.
struct AclUser {
    admin: redis::Client,
    name: String,
    prefix: String,
}

impl AclUser {
    fn create() -> AclUser {
        let admin = redis::Client::open(shared_url()).expect("url");
        let name = format!("abfault-{:012x}", fastrand::u64(..1 << 48));
        let mut conn = admin.get_connection().expect("the shared redis is up");
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&name)
            .arg("on")
            .arg("nopass")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query(&mut conn)
            .expect("ACL SETUSER");
        AclUser {
            admin,
            prefix: name.clone(),
            name,
        }
    }

    fn url(&self) -> String {
        shared_url().replacen("redis://", &format!("redis://{}:x@", self.name), 1)
    }

    fn kill_with(admin: &redis::Client, name: &str) -> i64 {
        let Ok(mut conn) = admin.get_connection() else {
            return 0;
        };
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(name)
            .query(&mut conn)
            .unwrap_or(0)
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        if let Ok(mut conn) = self.admin.get_connection() {
            let _: redis::RedisResult<i64> = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&self.name)
                .query(&mut conn);
            let pattern = format!("{}:*", self.prefix);
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query(&mut conn)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<i64> = redis::cmd("UNLINK").arg(&keys).query(&mut conn);
            }
        }
    }
}

/// Receives (and acks) until `want` is covered or `WAIT` passes; returns what came.
async fn collect(consumer: &mut dyn Consumer, want: &BTreeSet<u64>) -> BTreeSet<u64> {
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while !want.is_subset(&got) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(2), consumer.next_batch(64)).await {
            Ok(Ok(batch)) => {
                for d in batch {
                    got.insert(number(&d));
                    let _ = d.ack().await;
                }
            }
            Ok(Err(e)) => {
                assert_eq!(e.kind(), agentbus::ErrorKind::Backend, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => {}
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_under_load_loses_nothing_acknowledged() {
    kill_under_load(600, 3).await;
}

/// The same, longer: 20,000 publishes, 100 kills 40 ms apart while they run. By hand:
/// `cargo nextest run -p agentbus-redis --test faults --run-ignored only --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: about a minute of publishing under repeated CLIENT KILL"]
async fn soak_client_kill_under_load() {
    kill_under_load(20_000, 100).await;
}

async fn kill_under_load(publishes: u64, kills: usize) {
    let user = AclUser::create();
    let options = RedisOptions::default().prefix(user.prefix.clone());
    let transport = RedisTransport::connect(&user.url(), options)
        .await
        .expect("connect as the test user");
    let channel = ChannelName::new("fault.kill.load").unwrap();
    let mut consumer = transport
        .subscribe(
            SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                .group("fault-kill")
                .ack_wait(Duration::from_millis(500)),
        )
        .await
        .unwrap();

    // A few deliveries held unacked across the kill must come back.
    for n in 0..5 {
        transport.publish(envelope(&channel, n)).await.unwrap();
    }
    let mut held = Vec::new();
    while held.len() < 5 {
        held.extend(consumer.next_batch(5 - held.len()).await.unwrap());
    }

    let publisher = {
        let transport = transport.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut ok = BTreeSet::new();
            let mut failed = 0;
            for n in 100..100 + publishes {
                match transport.publish(envelope(&channel, n)).await {
                    Ok(_) => {
                        ok.insert(n);
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), agentbus::ErrorKind::Backend, "{e}");
                        assert!(e.is_temporary(), "a dropped connection is temporary: {e}");
                        failed += 1;
                    }
                }
            }
            (ok, failed)
        })
    };
    let mut killed = 0;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let user_name = user.name.clone();
        let admin = user.admin.clone();
        killed += tokio::task::spawn_blocking(move || AclUser::kill_with(&admin, &user_name))
            .await
            .unwrap_or(0);
    }
    let (ok, failed) = publisher.await.unwrap();
    drop(held); // never settled: they must be redelivered after the ack wait
    assert!(killed > 0, "CLIENT KILL USER must have closed connections");

    let mut want = ok.clone();
    want.extend(0..5);
    let got = collect(&mut *consumer, &want).await;
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "acknowledged publishes or unacked deliveries lost after {killed} killed connections \
         ({failed} publishes failed with an error): missing {missing:?}"
    );
    assert!(transport.health().await.up);
    println!(
        "killed {killed} connections; {} publishes ok, {failed} failed with an error; \
         everything acknowledged arrived",
        ok.len()
    );
}

/// A redis-server of the test's own on a free port, killed on drop.
struct OwnServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl OwnServer {
    fn start() -> OwnServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("agentbus-redis-fault-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = OwnServer {
            child: None,
            port,
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "own redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_reconnects_and_health_follows() {
    let mut server = OwnServer::start();
    let options = RedisOptions::default()
        .prefix("fault")
        .response_timeout(Duration::from_secs(1))
        .reconnect_retries(2);
    let transport = RedisTransport::connect(&server.url(), options)
        .await
        .expect("connect to the own server");
    assert!(transport.health().await.up);
    let channel = ChannelName::new("fault.restart").unwrap();
    let mut consumer = transport
        .subscribe(
            SubscribeOptions::new(ChannelPattern::from(channel.clone()))
                .group("fault-restart")
                .ack_wait(Duration::from_millis(500)),
        )
        .await
        .unwrap();
    let mut ok = BTreeSet::new();
    for n in 0..20 {
        transport.publish(envelope(&channel, n)).await.unwrap();
        ok.insert(n);
    }
    // Hold some deliveries unacked across the crash.
    let held = consumer.next_batch(5).await.unwrap();
    assert!(!held.is_empty());

    server.kill(); // SIGKILL: AOF with appendfsync always keeps every receipt
    let health = transport.health().await;
    assert!(!health.up, "health must report the outage: {health:?}");
    assert!(health.error.is_some());
    let during = transport.publish(envelope(&channel, 1000)).await;
    let error = during.expect_err("a publish while the server is down must fail, not vanish");
    assert_eq!(error.kind(), agentbus::ErrorKind::Backend, "{error}");
    assert!(error.is_temporary(), "{error}");
    drop(held);

    server.spawn();
    let deadline = Instant::now() + WAIT;
    loop {
        let health = transport.health().await;
        if health.up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health must report the recovery: {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Publishes work again (retrying the first ones while the connection settles).
    for n in 20..40 {
        let deadline = Instant::now() + WAIT;
        loop {
            match transport.publish(envelope(&channel, n)).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline && e.is_temporary() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("publish after the restart failed: {e}"),
            }
        }
        ok.insert(n);
    }
    let got = collect(&mut *consumer, &ok).await;
    let missing: Vec<_> = ok.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "acknowledged publishes or unacked deliveries lost across the restart: {missing:?}"
    );
}
