//! `agentbus demo etl`, `agents`, `tasks` and `workflow status` as users and scripts
//! see them. Each invocation has its own memory engine, so `agents`, `tasks` and
//! `workflow status` see an empty bus here; their rendering of live data is covered by
//! the unit tests of `commands::coordination`.

use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn agentbus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(args)
        .env_remove("AGENTBUS_BACKEND")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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

fn json(output: &Output) -> Value {
    assert_code(output, 0);
    let out = text(&output.stdout);
    assert_eq!(out.lines().count(), 1, "one JSON line: {out}");
    serde_json::from_str(out.trim()).expect("JSON on stdout")
}

fn one_line_error(output: &Output, code: i32, needle: &str) {
    assert_code(output, code);
    let err = text(&output.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
    assert!(output.stdout.is_empty());
}

#[test]
fn demo_etl_json_reports_workflows_steps_redistribution_and_escalations() {
    let report = json(&agentbus(&[
        "demo",
        "etl",
        "--json",
        "--batches",
        "3",
        "--rows",
        "40",
    ]));
    assert_eq!(report["workflows_completed"], 3, "{report}");
    assert_eq!(report["workflows_failed"], 0, "{report}");
    assert_eq!(report["steps"], 15, "{report}");
    assert!(
        report["redistributed_tasks"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(report["escalations"].is_u64(), "{report}");
    assert_eq!(report["stalled_agent"], "transformer-b");
    assert_eq!(report["rows_extracted"], 120);
    assert_eq!(
        report["rows_loaded"].as_u64().unwrap() + report["rows_rejected"].as_u64().unwrap(),
        120,
        "every record is loaded or rejected: {report}"
    );
    assert_eq!(report["workflows"].as_array().unwrap().len(), 3);
}

#[test]
fn demo_etl_prints_a_readable_summary() {
    let output = agentbus(&["demo", "etl", "--batches", "2", "--rows", "10"]);
    assert_code(&output, 0);
    let out = text(&output.stdout);
    assert!(out.starts_with("agentbus demo etl"), "{out}");
    assert!(out.contains("2 workflows completed"), "{out}");
    assert!(out.contains("transformer-b stopped heartbeating"), "{out}");
    assert!(out.contains("escalations: "), "{out}");
    assert!(text(&output.stderr).is_empty(), "{}", text(&output.stderr));
}

#[test]
fn demo_etl_rejects_bad_arguments() {
    one_line_error(
        &agentbus(&["demo", "etl", "--batches", "0"]),
        2,
        "at least 1",
    );
    one_line_error(&agentbus(&["demo", "etl", "--bogus"]), 2, "--bogus");
}

#[test]
fn agents_and_tasks_on_an_empty_bus_are_empty_not_errors() {
    let agents = json(&agentbus(&["agents", "--json", "--wait", "50ms"]));
    assert_eq!(agents["agents"], Value::Array(Vec::new()));
    assert_eq!(agents["backend"], "memory");
    let tasks = json(&agentbus(&["tasks", "--json"]));
    assert_eq!(tasks["tasks"], Value::Array(Vec::new()));
    let human = agentbus(&["agents", "--wait", "10ms"]);
    assert_code(&human, 0);
    assert!(
        text(&human.stdout).contains("AGENT"),
        "{}",
        text(&human.stdout)
    );
    one_line_error(&agentbus(&["tasks", "--status", "done"]), 2, "escalated");
    one_line_error(&agentbus(&["agents", "--wait", "soon"]), 2, "--wait");
}

#[test]
fn workflow_status_of_an_unknown_id_fails_with_one_line() {
    one_line_error(
        &agentbus(&["workflow", "status", "wf-missing"]),
        1,
        "no workflow 'wf-missing'",
    );
    one_line_error(
        &agentbus(&["workflow", "status", "a.b"]),
        2,
        "workflow id 'a.b'",
    );
}
