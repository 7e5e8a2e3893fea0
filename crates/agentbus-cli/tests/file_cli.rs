//! The CLI on the durable log (`--backend file:DIR`), across processes one after
//! another: what one invocation publishes, a later one receives; dead letters,
//! statistics, the lock file and `agentbus repair`.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn agentbus(dir: &Path, args: &[&str]) -> Output {
    let backend = format!("file:{}", dir.display());
    Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(args)
        .args(["--backend", &backend])
        .env_remove("AGENTBUS_BACKEND")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("the agentbus binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "code {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn ok(output: Output) -> String {
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn pub_then_sub_dlq_and_stats_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    for n in 1..=3 {
        ok(agentbus(
            dir.path(),
            &["pub", "orders.created", &format!("{{\"n\":{n}}}")],
        ));
    }
    // A later process, a new group from the earliest message: sees all three; the
    // first is rejected to dead letters.
    let out = ok(agentbus(
        dir.path(),
        &[
            "sub", "orders.>", "--group", "g", "--from", "earliest", "--count", "1", "--settle",
            "reject",
        ],
    ));
    assert!(out.contains("{\"n\":1}"), "{out}");
    let out = ok(agentbus(
        dir.path(),
        &["sub", "orders.>", "--group", "g", "--count", "2", "--json"],
    ));
    assert!(out.contains("\"n\":2") && out.contains("\"n\":3"), "{out}");
    // The group's position survived: nothing left for it.
    let out = ok(agentbus(
        dir.path(),
        &["sub", "orders.>", "--group", "g", "--timeout", "300ms"],
    ));
    assert!(out.trim().is_empty(), "acked messages came back: {out}");

    let out = ok(agentbus(dir.path(), &["dlq", "list", "--json"]));
    let letters: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(letters.as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(letters[0]["reason"], "rejected");

    let out = ok(agentbus(dir.path(), &["stats"]));
    assert!(out.contains("orders.created"), "{out}");
    assert!(out.contains("fsync: always"), "{out}");
    assert!(out.contains("segments: 1"), "{out}");
    assert!(out.contains("log_bytes: "), "{out}");
    assert!(
        out.contains("segment_files: 00000000000000000001.seg ("),
        "{out}"
    );
    let json = ok(agentbus(dir.path(), &["stats", "--json"]));
    let stats: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(stats["engine"], "file");
    assert_eq!(stats["groups"][0]["group"], "g");
    assert_eq!(stats["dead_letters"], 1);
}

#[test]
fn a_running_process_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let backend = format!("file:{}", dir.path().display());
    let mut holder = Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(["sub", "x.>", "--timeout", "20s", "--backend", &backend])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = holder.id().to_string();
    // Wait until it has the directory open (its PID is in the lock file).
    let lock = dir.path().join("LOCK");
    for _ in 0..800 {
        if std::fs::read_to_string(&lock).is_ok_and(|s| s.trim() == pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let out = agentbus(dir.path(), &["stats"]);
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another process") && err.contains(&pid),
        "{err}"
    );
    // Killed, the holder's lock is gone.
    ok(agentbus(dir.path(), &["stats"]));
}

#[test]
fn damage_is_refused_then_repaired() {
    let dir = tempfile::tempdir().unwrap();
    for n in 0..20 {
        ok(agentbus(
            dir.path(),
            &["pub", "a.b", &format!("{{\"n\":{n}}}")],
        ));
    }
    let segment = dir.path().join("00000000000000000001.seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&segment, &bytes).unwrap();

    let out = agentbus(dir.path(), &["stats"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("00000000000000000001.seg") && err.contains("offset"),
        "{err}"
    );
    assert!(err.contains("agentbus repair"), "{err}");

    let repair = Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(["repair", &dir.path().display().to_string(), "--json"])
        .output()
        .unwrap();
    let out = ok(repair);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        report["repaired"]["damage"]["file"],
        "00000000000000000001.seg"
    );
    assert!(report["repaired"]["bytes"].as_u64().unwrap() > 0, "{out}");
    let out = ok(agentbus(dir.path(), &["stats", "--json"]));
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let kept = stats["channels"][0]["messages"].as_u64().unwrap();
    assert!(
        kept < 20,
        "the damaged record and what follows it are gone: {kept}"
    );
    assert_eq!(
        kept + report["repaired"]["publishes_lost"].as_u64().unwrap() + 1,
        20,
        "the report accounts for every lost publish: {out}"
    );
}
