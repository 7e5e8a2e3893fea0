//! The `agentbus` binary on the Redis backend (the real server at 127.0.0.1:6379, or
//! `AGENTBUS_REDIS_URL`): unlike the memory engine, what one invocation publishes the
//! next one receives. Every test uses its own key prefix and deletes it afterwards.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn server() -> String {
    std::env::var("AGENTBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix of its own, deleted when the test ends (passed or failed).
struct Prefix(String);

impl Prefix {
    fn new() -> Self {
        Prefix(format!("abcli-{:016x}", fastrand::u64(..)))
    }

    fn backend(&self) -> String {
        format!("{}/?prefix={}", server().trim_end_matches('/'), self.0)
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let prefix = self.0.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up");
            runtime.block_on(async {
                let options = agentbus_redis::RedisOptions::default().prefix(prefix);
                if let Ok(t) = agentbus_redis::RedisTransport::connect(&server(), options).await {
                    let _ = t.delete_everything().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

fn agentbus(prefix: &Prefix, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(args)
        .env("AGENTBUS_BACKEND", prefix.backend())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("the agentbus binary runs")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        out(o),
        err(o)
    );
    out(o)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn pub_in_one_process_sub_in_the_next() {
    let p = Prefix::new();
    let receipt = json(&ok(&agentbus(
        &p,
        &[
            "pub",
            "cli.orders",
            r#"{"n":7}"#,
            "--priority",
            "high",
            "--json",
        ],
    )));
    assert_eq!(receipt["sequence"], 1, "{receipt}");
    assert_eq!(receipt["duplicate"], false);
    let got = ok(&agentbus(
        &p,
        &[
            "sub",
            "cli.orders",
            "--group",
            "g",
            "--from",
            "earliest",
            "--count",
            "1",
            "--timeout",
            "10s",
            "--json",
        ],
    ));
    let message = json(got.lines().next().expect("one message"));
    assert_eq!(message["payload"]["n"], 7, "{message}");
    assert_eq!(message["priority"], "high");
    assert_eq!(message["id"], receipt["id"]);
    // Acked: the group has nothing left.
    let stats = json(&ok(&agentbus(&p, &["stats", "--json"])));
    let group = &stats["groups"][0];
    assert_eq!(group["group"], "g", "{stats}");
    assert_eq!(group["acked"], 1, "{stats}");
    assert_eq!(group["pending"], 0, "{stats}");
    assert_eq!(stats["engine"], "redis");
    assert!(
        stats["details"]["redis_version"].as_str().is_some(),
        "server facts in stats: {stats}"
    );
}

#[test]
fn rejected_messages_are_listed_replayed_and_purged() {
    let p = Prefix::new();
    ok(&agentbus(&p, &["pub", "cli.jobs", r#"{"job":1}"#]));
    ok(&agentbus(
        &p,
        &[
            "sub",
            "cli.jobs",
            "--group",
            "w",
            "--from",
            "earliest",
            "--count",
            "1",
            "--settle",
            "reject",
            "--timeout",
            "10s",
        ],
    ));
    let letters = json(&ok(&agentbus(&p, &["dlq", "list", "--json"])));
    let letters = letters.as_array().expect("an array");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["reason"], "rejected");
    let id = letters[0]["id"].as_str().expect("an id").to_string();
    let shown = ok(&agentbus(&p, &["dlq", "show", &id]));
    assert!(shown.contains("rejected"), "{shown}");

    ok(&agentbus(&p, &["dlq", "replay", &id]));
    assert_eq!(
        json(&ok(&agentbus(&p, &["dlq", "list", "--json"]))),
        json("[]")
    );
    // The replay reaches the group again, with the original as its cause.
    let again = ok(&agentbus(
        &p,
        &[
            "sub",
            "cli.jobs",
            "--group",
            "w",
            "--count",
            "1",
            "--timeout",
            "10s",
            "--json",
        ],
    ));
    let again = json(again.lines().next().expect("the replayed message"));
    assert_eq!(again["payload"]["job"], 1, "{again}");

    ok(&agentbus(&p, &["pub", "cli.jobs", r#"{"job":2}"#]));
    ok(&agentbus(
        &p,
        &[
            "sub",
            "cli.jobs",
            "--group",
            "w",
            "--count",
            "1",
            "--settle",
            "reject",
            "--timeout",
            "10s",
        ],
    ));
    let purged = ok(&agentbus(&p, &["dlq", "purge"]));
    assert!(purged.contains('1'), "{purged}");
    assert_eq!(
        json(&ok(&agentbus(&p, &["dlq", "list", "--json"]))),
        json("[]")
    );
}

#[test]
fn a_request_nobody_serves_fails_at_once_with_no_responders() {
    let p = Prefix::new();
    let start = Instant::now();
    let o = agentbus(&p, &["req", "cli.nobody.home", "{}", "--timeout", "20s"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("no responders"), "{}", err(&o));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "NoResponders must not wait for the timeout"
    );
}

#[test]
fn doctor_reads_the_persistence_settings() {
    let p = Prefix::new();
    let text = ok(&agentbus(&p, &["doctor"]));
    assert!(text.contains("backend: redis"), "{text}");
    for setting in ["appendonly", "appendfsync", "maxmemory-policy", "save"] {
        assert!(text.contains(setting), "{setting} missing: {text}");
    }
    assert!(text.contains("guarantee:"), "{text}");
    let report = json(&ok(&agentbus(&p, &["doctor", "--json"])));
    assert_eq!(report["engine"], "redis");
    assert!(report["guarantee"].as_str().is_some_and(|g| !g.is_empty()));
}

#[test]
fn a_bad_redis_address_is_a_clear_failure() {
    let o = Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(["stats", "--backend", "redis://127.0.0.1:1"])
        .env_remove("AGENTBUS_BACKEND")
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("redis"), "{}", err(&o));
}

#[test]
fn demo_vehicle_runs_on_redis() {
    let p = Prefix::new();
    let text = ok(&agentbus(&p, &["demo", "vehicle"]));
    assert!(text.contains("end to end"), "{text}");
    assert!(text.contains("dead letters"), "{text}");
}
