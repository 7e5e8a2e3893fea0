//! `--metrics`, `--store`, `--audit`, `agentbus trace`, `agentbus log` and `agentbus
//! stats --store` as users see them. Each test works in its own temporary directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

fn command(args: &[&str], dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentbus"));
    command
        .args(args)
        .current_dir(dir)
        .env_remove("AGENTBUS_BACKEND")
        .env_remove("AGENTBUS_STORE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn agentbus(args: &[&str], dir: &Path) -> Output {
    command(args, dir)
        .output()
        .expect("the agentbus binary runs")
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

/// Kills the child on drop, so a failed assertion leaves no process behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scrape(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The sum of every series of `name` (all label sets).
fn total(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn demo_vehicle_serves_metrics_that_match_the_store_and_writes_audit_files() {
    let dir = tempfile::tempdir().unwrap();
    let child = command(
        &[
            "demo",
            "vehicle",
            "--vehicles",
            "3",
            "--metrics",
            "127.0.0.1:0",
            "--metrics-hold",
            "60s",
            "--store",
            "s.db",
            "--audit",
            "audit",
        ],
        dir.path(),
    )
    .spawn()
    .unwrap();
    let mut child = Killed(child);
    let stderr = child.0.stderr.take().unwrap();
    let mut addr = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("serving Prometheus metrics on http://") {
            addr = rest.strip_suffix("/metrics").map(str::to_string);
        }
        if line.starts_with("holding http://") {
            break;
        }
    }
    let addr = addr.expect("the demo prints the metrics address");
    let body = scrape(&addr);

    // The store (flushed before the hold) and the metrics saw the same bus.
    let log = agentbus(
        &["log", "--store", "s.db", "--json", "--limit", "100000"],
        dir.path(),
    );
    assert_code(&log, 0);
    let published = text(&log.stdout).lines().count() as f64;
    assert!(published > 10.0, "{published}");
    assert_eq!(
        total(&body, "agentbus_published_total"),
        published,
        "{body}"
    );
    assert!(total(&body, "agentbus_acked_total") > 0.0);
    assert!(total(&body, "agentbus_delivered_total") >= total(&body, "agentbus_acked_total"));
    // The demo sends one malformed message on purpose: dead-lettered with `schema`.
    assert!(body.contains("reason=\"schema\""), "{body}");
    assert!(body.contains("agentbus_queue_depth{"), "{body}");
    drop(child);

    // One file per category (named by the UTC day, which may have just turned).
    let names: Vec<String> = std::fs::read_dir(dir.path().join("audit"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for category in [
        "agent_activity",
        "message_audit",
        "task_history",
        "performance",
        "errors",
    ] {
        let name = names
            .iter()
            .find(|n| n.starts_with(&format!("{category}-")) && n.ends_with(".jsonl"))
            .unwrap_or_else(|| panic!("no {category} file in {names:?}"));
        let content = std::fs::read_to_string(dir.path().join("audit").join(name)).unwrap();
        let first: Value = serde_json::from_str(content.lines().next().unwrap()).unwrap();
        assert_eq!(first["category"], category);
    }
}

#[test]
fn trace_log_and_stats_read_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let run = agentbus(
        &["demo", "vehicle", "--vehicles", "2", "--store", "s.db"],
        dir.path(),
    );
    assert_code(&run, 0);

    // log --agent: every line involves the agent.
    let log = agentbus(
        &[
            "log",
            "--store",
            "s.db",
            "--agent",
            "master_orchestrator",
            "--since",
            "10m",
            "--json",
        ],
        dir.path(),
    );
    assert_code(&log, 0);
    let rows: Vec<Value> = text(&log.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!rows.is_empty());
    for row in &rows {
        assert_eq!(row["event"], "published");
        assert!(
            row["sender"] == "master_orchestrator" || row["receiver"] == "master_orchestrator",
            "{row}"
        );
    }
    let correlation = rows
        .iter()
        .find_map(|r| {
            r["correlation_id"]
                .as_str()
                .filter(|c| c.starts_with("wf-"))
        })
        .expect("a workflow thread")
        .to_string();

    let trace = agentbus(
        &["trace", &correlation, "--store", "s.db", "--json"],
        dir.path(),
    );
    assert_code(&trace, 0);
    let trace: Value = serde_json::from_str(text(&trace.stdout).trim()).unwrap();
    let steps = trace["steps"].as_array().unwrap();
    assert!(steps.len() >= 3, "{trace}");
    assert_eq!(steps[0]["kind"], "vehicle.data");
    assert_eq!(steps[0]["to"][0], "master_orchestrator");
    assert!(steps.iter().all(|s| s["outcome"] == "acked"), "{trace}");
    assert!(steps[0]["ack_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(trace["status"]["status"], "completed");

    let human = agentbus(&["trace", &correlation, "--store", "s.db"], dir.path());
    assert_code(&human, 0);
    let human = text(&human.stdout);
    assert!(
        human.starts_with(&format!("thread {correlation}: ")),
        "{human}"
    );
    assert!(human.contains("vehicle.data"), "{human}");

    let stats = agentbus(
        &[
            "stats",
            "--store",
            "s.db",
            "--correlation",
            &correlation,
            "--log",
            "5",
            "--json",
        ],
        dir.path(),
    );
    assert_code(&stats, 0);
    let stats: Value = serde_json::from_str(text(&stats.stdout).trim()).unwrap();
    assert_eq!(stats["message_log"].as_array().unwrap().len(), 5);
    assert_eq!(stats["workflow"]["status"], "completed");
    assert_eq!(stats["queues"]["engine"], "memory");

    // Errors say what to do.
    let unknown = agentbus(&["trace", "no-such-thread", "--store", "s.db"], dir.path());
    assert_code(&unknown, 1);
    assert!(text(&unknown.stderr).contains("no messages with correlation id 'no-such-thread'"));
    let missing = agentbus(&["trace", "x", "--store", "missing.db"], dir.path());
    assert_code(&missing, 1);
    assert!(
        text(&missing.stderr).contains("no interaction store at 'missing.db'"),
        "{}",
        text(&missing.stderr)
    );
    let bad = agentbus(&["log", "--store", "s.db", "--since", "soon"], dir.path());
    assert_code(&bad, 2);
}

#[test]
fn demo_context_reports_responders_timeouts_and_merged_items() {
    let dir = tempfile::tempdir().unwrap();
    let run = agentbus(
        &[
            "demo",
            "context",
            "--json",
            "--peers",
            "3",
            "--slow",
            "1",
            "--tasks",
            "2",
            "--timeout",
            "1500ms",
            "--store-dir",
            "stores",
        ],
        dir.path(),
    );
    assert_code(&run, 0);
    let report: Value = serde_json::from_str(text(&run.stdout).trim()).unwrap();
    let mut responders: Vec<&str> = report["responders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    responders.sort_unstable();
    assert_eq!(
        responders,
        ["marketing-agent-1", "product-agent-1"],
        "{report}"
    );
    assert_eq!(report["timed_out"], serde_json::json!(["sales-agent-1"]));
    // Each answering peer: 2 tasks assigned to it + 2 reports it sent back.
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), 8, "{report}");
    assert!(items
        .iter()
        .all(|i| i["sender"] == "planner-1" || i["receiver"] == "planner-1"));
    // The peers' stores stay on disk and read like any other.
    let log = agentbus(
        &[
            "log",
            "--store",
            "stores/sales-agent-1.db",
            "--agent",
            "planner-1",
            "--json",
        ],
        dir.path(),
    );
    assert_code(&log, 0);
    assert_eq!(text(&log.stdout).lines().count(), 4);

    let bad = agentbus(&["demo", "context", "--peers", "0"], dir.path());
    assert_code(&bad, 2);

    // With --store the whole run is recorded too: the broadcast and the replies.
    let run = agentbus(
        &[
            "demo", "context", "--peers", "2", "--slow", "0", "--store", "all.db",
        ],
        dir.path(),
    );
    assert_code(&run, 0);
    let log = agentbus(
        &[
            "log",
            "--store",
            "all.db",
            "--kind",
            "context.reply",
            "--json",
        ],
        dir.path(),
    );
    assert_code(&log, 0);
    let replies: Vec<Value> = text(&log.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replies.len(), 2);
    assert!(
        replies.iter().all(|r| r["receiver"] == "reconstructor-1"),
        "{replies:?}"
    );
}

#[test]
fn sub_and_ueba_take_the_observe_options() {
    let dir = tempfile::tempdir().unwrap();
    let sub = agentbus(
        &[
            "sub",
            "nothing.here",
            "--timeout",
            "200ms",
            "--store",
            "sub.db",
            "--audit",
            "a",
        ],
        dir.path(),
    );
    assert_code(&sub, 0);
    assert!(dir.path().join("sub.db").exists());
    assert!(dir.path().join("a").is_dir());
    let bad = agentbus(&["sub", "x", "--metrics", "not-an-address"], dir.path());
    assert_code(&bad, 2);

    // Learning for 50 ms: the status reports every agent sends at the end of the demo
    // are a kind (and a peer) none of them sent before.
    let run = agentbus(
        &["demo", "vehicle", "--vehicles", "2", "--ueba-learn", "50ms"],
        dir.path(),
    );
    assert_code(&run, 0);
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains("anomalies published on _sys.security.anomaly"),
        "{stderr}"
    );
    assert!(
        stderr.contains("detector=new_kind") || stderr.contains("new_kind"),
        "{stderr}"
    );
}

#[test]
fn a_metrics_address_in_use_is_a_clear_failure() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let run = agentbus(
        &["demo", "vehicle", "--vehicles", "1", "--metrics", &addr],
        dir.path(),
    );
    assert_code(&run, 1);
    let stderr = text(&run.stderr);
    assert!(
        stderr.contains(&format!("cannot serve metrics on {addr}")),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error: ")).count(),
        1,
        "{stderr}"
    );
}
