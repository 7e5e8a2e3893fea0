//! The `agentbus` binary as users and scripts see it: output, exit codes, error lines.
//!
//! Each invocation is its own process with its own memory engine, so nothing here can
//! publish in one command and receive in another; the subscribe loop with messages is
//! covered by the unit tests of `commands::subscribe`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// Runs `agentbus args…` with a clean environment for the variables it reads.
fn agentbus(args: &[&str]) -> Output {
    agentbus_with_stdin(args, None)
}

fn agentbus_with_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentbus"));
    command
        .args(args)
        .env_remove("AGENTBUS_BACKEND")
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("the agentbus binary runs");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .expect("stdin accepts the payload");
    }
    child
        .wait_with_output()
        .expect("the agentbus binary finishes")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the exit code, showing both streams when it is wrong.
fn assert_code(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
}

/// Asserts an error the CLI reports itself: exactly one `error: …` line on stderr,
/// nothing on stdout.
fn assert_one_line_error(output: &Output, code: i32, needle: &str) {
    assert_code(output, code);
    let err = stderr(output);
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(stdout(output).is_empty(), "stdout: {}", stdout(output));
}

fn receipt(output: &Output) -> Value {
    assert_code(output, 0);
    let value: Value = serde_json::from_str(stdout(output).trim()).expect("a JSON receipt");
    assert!(
        value["id"].as_str().is_some_and(|id| id.len() == 36),
        "{value}"
    );
    assert_eq!(value["sequence"], 1, "{value}");
    assert_eq!(value["duplicate"], false, "{value}");
    value
}

#[test]
fn pub_prints_a_json_receipt() {
    let output = agentbus(&[
        "pub",
        "orders.created",
        r#"{"order":17}"#,
        "--json",
        "--priority",
        "high",
        "--ttl",
        "5s",
        "--delay",
        "1s",
        "--correlation",
        "wf-1",
        "--reply-to",
        "orders.replies",
        "--header",
        "source=test",
        "--kind",
        "order.created",
    ]);
    let value = receipt(&output);
    assert_eq!(value["channel"], "orders.created");
    assert_eq!(stdout(&output).lines().count(), 1);
}

#[test]
fn pub_uses_the_given_id() {
    let id = "01900000-0000-7000-8000-000000000001";
    let output = agentbus(&["pub", "a.b", "{}", "--id", id, "--json"]);
    assert_eq!(receipt(&output)["id"], id);
}

#[test]
fn pub_prints_a_human_receipt_by_default() {
    let output = agentbus(&["pub", "orders.created", "1"]);
    assert_code(&output, 0);
    let out = stdout(&output);
    assert!(out.starts_with("published "), "{out}");
    assert!(
        out.contains("orders.created") && out.contains("sequence 1"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1);
}

#[test]
fn pub_reads_the_payload_from_stdin() {
    let output = agentbus_with_stdin(
        &["pub", "a.b", "-", "--json"],
        Some("{\"from\": \"stdin\"}\n"),
    );
    receipt(&output);
}

#[test]
fn pub_reads_the_payload_from_a_file() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("agentbus-cli-payload-{}.json", std::process::id()));
    std::fs::write(&path, "{\n  \"from\": \"file\"\n}\n").unwrap();
    let arg = format!("@{}", path.display());
    let output = agentbus(&["pub", "a.b", &arg, "--json"]);
    let _ = std::fs::remove_file(&path);
    receipt(&output);
}

#[test]
fn pub_rejects_a_missing_payload_file() {
    let output = agentbus(&["pub", "a.b", "@/no/such/agentbus/payload.json"]);
    assert_one_line_error(&output, 2, "/no/such/agentbus/payload.json");
}

#[test]
fn bad_channel_is_exit_2_naming_the_token() {
    let output = agentbus(&["pub", "orders..created", "{}"]);
    assert_one_line_error(&output, 2, "token 2");
    let output = agentbus(&["pub", "orders.cre ated", "{}"]);
    assert_one_line_error(&output, 2, "token 2 'cre ated'");
    let output = agentbus(&["sub", "orders.>.x", "--timeout", "10ms"]);
    assert_one_line_error(&output, 2, "token 2");
}

#[test]
fn bad_json_payload_is_exit_2() {
    for payload in ["{not json", "hello", ""] {
        let output = agentbus(&["pub", "a.b", payload]);
        assert_one_line_error(&output, 2, "not valid JSON");
    }
    let output = agentbus_with_stdin(&["pub", "a.b", "-"], Some("nope"));
    assert_one_line_error(&output, 2, "stdin is not valid JSON");
}

#[test]
fn bad_priority_is_exit_2() {
    let output = agentbus(&["pub", "a.b", "{}", "--priority", "urgent"]);
    assert_one_line_error(&output, 2, "low, normal, high or critical");
}

#[test]
fn bad_durations_are_exit_2() {
    for args in [
        &["pub", "a.b", "{}", "--ttl", "5"][..],
        &["pub", "a.b", "{}", "--delay", "soon"],
        &["sub", "a.b", "--timeout", "forever"],
        &["req", "a.b", "{}", "--timeout", "0s"],
    ] {
        let output = agentbus(args);
        assert_one_line_error(&output, 2, "duration");
    }
}

#[test]
fn bad_flags_are_exit_2() {
    let output = agentbus(&["pub", "a.b", "{}", "--no-such-flag"]);
    assert_code(&output, 2);
    let output = agentbus(&["sub", "a.b", "--settle", "maybe"]);
    assert_code(&output, 2);
    let output = agentbus(&["pub", "a.b", "{}", "--header", "novalue"]);
    assert_one_line_error(&output, 2, "key=value");
    let output = agentbus(&["sub", "a.b", "--group", "two words", "--timeout", "10ms"]);
    assert_one_line_error(&output, 2, "group");
}

#[test]
fn sub_times_out_quietly_on_an_empty_bus() {
    let output = agentbus(&["sub", "orders.>", "--timeout", "300ms", "--json"]);
    assert_code(&output, 0);
    assert!(stdout(&output).is_empty(), "{}", stdout(&output));
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
}

#[test]
fn req_without_responders_is_exit_1() {
    let output = agentbus(&["req", "scheduling.request", r#"{"v":1}"#, "--timeout", "2s"]);
    assert_one_line_error(&output, 1, "no responders");
}

#[test]
fn dlq_list_is_an_empty_json_array() {
    let output = agentbus(&["dlq", "list", "--json"]);
    assert_code(&output, 0);
    assert_eq!(stdout(&output).trim(), "[]");
    let output = agentbus(&[
        "dlq",
        "list",
        "--channel",
        "orders.>",
        "--reason",
        "expired",
    ]);
    assert_code(&output, 0);
    assert_eq!(stdout(&output).trim(), "no dead letters");
}

#[test]
fn dlq_show_and_replay_of_an_unknown_id_are_exit_1() {
    let id = "01900000-0000-7000-8000-000000000001";
    assert_one_line_error(&agentbus(&["dlq", "show", id]), 1, id);
    assert_one_line_error(&agentbus(&["dlq", "replay", id, "--json"]), 1, id);
    assert_one_line_error(&agentbus(&["dlq", "show", "not-an-id"]), 2, "UUID");
}

#[test]
fn dlq_purge_reports_a_count() {
    let output = agentbus(&["dlq", "purge", "--json"]);
    assert_code(&output, 0);
    let value: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(value, serde_json::json!({"purged": 0}));
}

#[test]
fn stats_json_parses() {
    let output = agentbus(&["stats", "--json"]);
    assert_code(&output, 0);
    let value: Value = serde_json::from_str(stdout(&output).trim()).expect("stats JSON");
    assert_eq!(value["engine"], "memory");
    assert!(value["channels"].is_array() && value["groups"].is_array());
    assert_eq!(value["dead_letters"], 0);

    let output = agentbus(&["stats"]);
    assert_code(&output, 0);
    let out = stdout(&output);
    assert!(out.contains("CHANNEL") && out.contains("GROUP"), "{out}");
}

#[test]
fn unknown_backend_is_exit_2_listing_the_forms() {
    let output = agentbus(&["stats", "--backend", "mongodb://x"]);
    assert_one_line_error(&output, 2, "file:DIR");
}

#[test]
fn later_backends_are_exit_1_not_available() {
    for (spec, name) in [
        ("kafka://localhost:9092", "kafka"),
        ("amqp://localhost:5672", "amqp"),
        ("postgres://localhost/test", "postgres"),
    ] {
        let output = agentbus(&["pub", "a.b", "{}", "--backend", spec]);
        assert_one_line_error(&output, 1, "not available");
        assert!(stderr(&output).contains(&format!("backend '{name}'")));
    }
}

#[test]
fn the_backend_comes_from_the_environment_too() {
    let output = Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(["dlq", "list"])
        .env("AGENTBUS_BACKEND", "kafka://broker:9092")
        .output()
        .unwrap();
    assert_one_line_error(&output, 1, "backend 'kafka' is not available");
}

#[test]
fn unknown_demo_is_exit_2() {
    let output = agentbus(&["demo", "no-such-demo", "--fast"]);
    assert_one_line_error(&output, 2, "unknown demo 'no-such-demo'");
}

#[test]
fn help_documents_the_contract() {
    let output = agentbus(&["pub", "--help"]);
    assert_code(&output, 0);
    let help = stdout(&output);
    assert!(help.contains("cli.message"), "default kind");
    assert!(help.contains("AGENTBUS_BACKEND"), "backend env var");
    assert!(
        help.contains("not seen by a `sub` in another"),
        "memory caveat"
    );
    let output = agentbus(&["sub", "--help"]);
    assert!(stdout(&output).contains("no message arrived for --timeout"));
}

#[test]
fn demo_vehicle_json_reports_the_whole_run() {
    let output = agentbus(&["demo", "vehicle", "--json", "--vehicles", "12"]);
    assert_code(&output, 0);
    let report: Value = serde_json::from_str(stdout(&output).trim()).expect("one JSON object");
    for key in [
        "messages_published",
        "messages_delivered",
        "workflows_completed",
        "escalations",
        "dead_letters",
    ] {
        assert!(report.get(key).is_some(), "missing key {key} in {report}");
    }
    let finished = report["workflows_completed"].as_u64().unwrap()
        + report["workflows_escalated"].as_u64().unwrap();
    assert_eq!(finished, 12, "every workflow ends: {report}");
    // The seeded fleet has congested vehicles: their timeouts escalate, and one goes
    // all the way to manual handling (a dead letter), next to the malformed record.
    assert!(
        report["escalation_steps"]["retry_same_agent"]
            .as_u64()
            .unwrap()
            >= 1,
        "{report}"
    );
    assert!(
        report["escalation_steps"]["backup_agent"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert_eq!(
        report["escalation_steps"]["manual_intervention"], 1,
        "{report}"
    );
    assert_eq!(report["dead_letter_reasons"]["schema"], 1, "{report}");
    assert_eq!(report["dead_letter_reasons"]["rejected"], 1, "{report}");
    assert!(
        report["messages_delivered"].as_u64().unwrap()
            >= report["messages_published"].as_u64().unwrap() / 2
    );
}

#[test]
fn demo_vehicle_prints_a_readable_summary() {
    let output = agentbus(&["demo", "vehicle", "--vehicles", "8"]);
    assert_code(&output, 0);
    let text = stdout(&output);
    for needle in [
        "channel.scheduling.request",
        "escalations:",
        "dead letters:",
        "end to end",
    ] {
        assert!(text.contains(needle), "summary lacks '{needle}':\n{text}");
    }
}

#[test]
fn demo_vehicle_rejects_bad_arguments() {
    assert_code(&agentbus(&["demo", "vehicle", "--vehicles", "0"]), 2);
    assert_code(&agentbus(&["demo", "vehicle", "--nope"]), 2);
}
