//! The `agentbus` binary on `--backend nats://…` against the real nats-server with
//! JetStream (`AGENTBUS_NATS_URL`, default nats://127.0.0.1:4222). Unlike the memory
//! engine, the server keeps messages between invocations, so one process publishes
//! and another consumes. Every test uses its own prefix (stream) and deletes it.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn server() -> String {
    std::env::var("AGENTBUS_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

/// A fresh prefix on the server; its streams are deleted on drop.
struct Prefix {
    name: String,
}

impl Prefix {
    fn new() -> Self {
        Prefix {
            name: format!("cli{}", uuid::Uuid::new_v4().simple()),
        }
    }

    fn backend(&self) -> String {
        format!("{}?prefix={}&storage=memory", server(), self.name)
    }

    fn run(&self, args: &[&str]) -> Output {
        let backend = self.backend();
        let mut all = vec!["--backend", backend.as_str()];
        all.extend_from_slice(args);
        Command::new(env!("CARGO_BIN_EXE_agentbus"))
            .args(&all)
            .env_remove("AGENTBUS_BACKEND")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("the agentbus binary runs")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let output = self.run(&all);
        assert_code(&output, 0);
        serde_json::from_str(text(&output.stdout).trim()).expect("JSON on stdout")
    }

    /// `sub --json` prints one JSON object per line.
    fn json_lines(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let output = self.run(&all);
        assert_code(&output, 0);
        text(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let name = self.name.clone();
        let cleaned = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| {
                    rt.block_on(agentbus_nats::NatsTransport::delete_prefix_at(
                        &server(),
                        &name,
                    ))
                })
        })
        .join();
        if let Ok(Ok(Err(e))) = cleaned {
            eprintln!("cleaning up prefix {}: {e}", self.name);
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_code(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

#[test]
fn pub_in_one_process_sub_in_another_in_priority_order() {
    let p = Prefix::new();
    let low = p.json(&["pub", "jobs.a", r#"{"n":1}"#, "--priority", "low"]);
    assert_eq!(low["groups"], 0, "{low}");
    assert_eq!(low["duplicate"], false, "{low}");
    p.json(&["pub", "jobs.b", r#"{"n":2}"#, "--priority", "critical"]);
    let got = p.json_lines(&[
        "sub",
        "jobs.>",
        "--group",
        "workers",
        "--from",
        "earliest",
        "--count",
        "2",
        "--timeout",
        "10s",
    ]);
    let numbers: Vec<&Value> = got.iter().map(|m| &m["payload"]["n"]).collect();
    assert_eq!(
        numbers,
        [&Value::from(2), &Value::from(1)],
        "critical first: {got:?}"
    );
    // The group is durable on the server: a later publish counts it and reaches it.
    let third = p.json(&["pub", "jobs.c", r#"{"n":3}"#]);
    assert_eq!(third["groups"], 1, "{third}");
    let got = p.json_lines(&[
        "sub",
        "jobs.>",
        "--group",
        "workers",
        "--count",
        "1",
        "--timeout",
        "10s",
    ]);
    assert_eq!(got[0]["payload"]["n"], 3, "{got:?}");
}

#[test]
fn rejected_message_is_listed_replayed_and_purged() {
    let p = Prefix::new();
    p.json(&["pub", "orders.new", r#"{"id":7}"#]);
    let got = p.json_lines(&[
        "sub",
        "orders.new",
        "--group",
        "billing",
        "--from",
        "earliest",
        "--count",
        "1",
        "--settle",
        "reject",
        "--timeout",
        "10s",
    ]);
    assert_eq!(got.len(), 1);
    let letters = p.json(&["dlq", "list"]);
    let letters = letters.as_array().expect("an array of dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["reason"], "rejected");
    assert_eq!(letters[0]["group"], "billing");
    let id = letters[0]["id"].as_str().expect("an id").to_string();
    let shown = p.run(&["dlq", "show", &id]);
    assert_code(&shown, 0);
    assert!(
        text(&shown.stdout).contains("rejected"),
        "{}",
        text(&shown.stdout)
    );

    let replayed = p.run(&["dlq", "replay", &id]);
    assert_code(&replayed, 0);
    let again = p.json_lines(&[
        "sub",
        "orders.new",
        "--group",
        "billing",
        "--count",
        "1",
        "--timeout",
        "10s",
    ]);
    assert_eq!(again[0]["payload"]["id"], 7, "{again:?}");
    assert_eq!(p.json(&["dlq", "list"]).as_array().map(Vec::len), Some(0));

    p.json_lines(&["pub", "orders.new", r#"{"id":8}"#]);
    p.run(&[
        "sub",
        "orders.new",
        "--group",
        "billing",
        "--count",
        "1",
        "--settle",
        "reject",
        "--timeout",
        "10s",
    ]);
    let purged = p.run(&["dlq", "purge"]);
    assert_code(&purged, 0);
    assert!(
        text(&purged.stdout).contains("purged 1"),
        "{}",
        text(&purged.stdout)
    );
    let missing = p.run(&["dlq", "show", &id]);
    assert_code(&missing, 1);
}

#[test]
fn request_without_responders_fails_at_once() {
    let p = Prefix::new();
    let started = std::time::Instant::now();
    let output = p.run(&["req", "svc.nobody", "{}", "--timeout", "30s"]);
    assert_code(&output, 1);
    assert!(
        text(&output.stderr).contains("no responders"),
        "{}",
        text(&output.stderr)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "NoResponders must not wait for the timeout"
    );
}

#[test]
fn doctor_reads_stream_and_server_settings() {
    let p = Prefix::new();
    let report = p.json(&["doctor"]);
    assert_eq!(report["engine"], "nats");
    let settings = &report["settings"];
    assert_eq!(settings["storage"], "memory", "{report}");
    assert_eq!(settings["replicas"], "1", "{report}");
    assert_eq!(settings["stream"], p.name.as_str(), "{report}");
    assert!(
        settings["server"]
            .as_str()
            .is_some_and(|s| s.starts_with("nats-server")),
        "{report}"
    );
    assert!(settings["jetstream.sync_interval"].is_string(), "{report}");
    let guarantee = report["guarantee"].as_str().unwrap_or_default();
    assert!(guarantee.contains("memory"), "{guarantee}");
    assert!(
        report["advice"].as_array().is_some_and(|a| !a.is_empty()),
        "{report}"
    );

    let human = p.run(&["doctor"]);
    assert_code(&human, 0);
    assert!(
        text(&human.stdout).contains("guarantee:"),
        "{}",
        text(&human.stdout)
    );
}

#[test]
fn stats_show_channels_groups_and_server_details() {
    let p = Prefix::new();
    p.json(&["pub", "metrics.cpu", r#"{"v":1}"#]);
    p.json(&["pub", "metrics.cpu", r#"{"v":2}"#]);
    p.json_lines(&[
        "sub",
        "metrics.*",
        "--group",
        "dash",
        "--from",
        "earliest",
        "--count",
        "1",
        "--timeout",
        "10s",
    ]);
    let stats = p.json(&["stats"]);
    assert_eq!(stats["engine"], "nats");
    let channels = stats["channels"].as_array().expect("channels");
    let cpu = channels
        .iter()
        .find(|c| c["channel"] == "metrics.cpu")
        .expect("metrics.cpu in stats");
    assert_eq!(cpu["messages"], 2, "{stats}");
    let groups = stats["groups"].as_array().expect("groups");
    let dash = groups
        .iter()
        .find(|g| g["group"] == "dash")
        .expect("group dash in stats");
    assert_eq!(dash["pattern"], "metrics.*", "{stats}");
    assert_eq!(dash["acked"], 1, "{stats}");
    assert!(
        stats["details"]["server"]
            .as_str()
            .is_some_and(|s| s.contains("nats-server")),
        "{stats}"
    );
}

#[test]
fn demo_vehicle_runs_end_to_end_on_nats() {
    let p = Prefix::new();
    let output = p.run(&["demo", "vehicle"]);
    assert_code(&output, 0);
    let out = text(&output.stdout);
    assert!(out.contains("manufacturing insights"), "{out}");
}

#[test]
fn bad_nats_url_parameters_are_usage_errors() {
    let output = Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(["--backend", "nats://127.0.0.1:4222?storage=tape", "stats"])
        .env_remove("AGENTBUS_BACKEND")
        .output()
        .expect("the agentbus binary runs");
    assert_code(&output, 2);
    assert!(
        text(&output.stderr).contains("storage"),
        "{}",
        text(&output.stderr)
    );
}
