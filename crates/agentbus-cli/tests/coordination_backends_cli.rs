//! `agentbus agents`, `tasks` and `workflow status` show live data across processes on
//! a shared backend: workers and a supervisor run inside this test process on an
//! `agentbus-redis` transport (the real server at 127.0.0.1:6379, or
//! `AGENTBUS_REDIS_URL`) and the `agentbus` binary, a separate process, reads the same
//! key prefix. Every test uses its own prefix and deletes it afterwards.

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agentbus::coordination::{
    Input, StepSpec, StepState, Supervisor, SupervisorOptions, TaskError, TaskRequest, Worker,
    WorkflowSpec, WorkflowState, WorkflowStatus,
};
use agentbus::{AgentDescriptor, Bus};
use agentbus_redis::{RedisOptions, RedisTransport};
use serde_json::{json, Value};
use tokio::sync::Notify;

const BOUND: Duration = Duration::from_secs(30);

fn server() -> String {
    std::env::var("AGENTBUS_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix of its own, deleted when the test ends (passed or failed).
struct Prefix(String);

impl Prefix {
    fn new() -> Self {
        Prefix(format!("abcoord-{:016x}", fastrand::u64(..)))
    }

    fn backend(&self) -> String {
        format!("{}/?prefix={}", server().trim_end_matches('/'), self.0)
    }

    async fn bus(&self) -> Bus {
        let transport = RedisTransport::connect(&server(), RedisOptions::default().prefix(&self.0))
            .await
            .expect("Redis is reachable");
        Bus::new(Arc::new(transport))
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
                let options = RedisOptions::default().prefix(prefix);
                if let Ok(t) = RedisTransport::connect(&server(), options).await {
                    let _ = t.delete_everything().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Runs the binary (off the async threads) on the prefix's backend and parses its one
/// JSON line.
async fn cli_json(prefix: &Prefix, args: &[&str]) -> Value {
    let backend = prefix.backend();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let shown = args.join(" ");
    let output: Output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_agentbus"))
            .args(&args)
            .arg("--json")
            .env("AGENTBUS_BACKEND", backend)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("the agentbus binary runs")
    })
    .await
    .expect("the CLI thread finishes");
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "agentbus {shown}\nstdout: {out}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(out.lines().count(), 1, "one JSON line: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

async fn worker<F, Fut>(bus: &Bus, id: &str, capability: &str, f: F) -> Worker
where
    F: Fn(TaskRequest) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    Worker::builder(AgentDescriptor::new(id, format!("{capability} worker")).capability(capability))
        .heartbeat(Duration::from_millis(300))
        .concurrency(2)
        .handle(f)
        .spawn(bus)
        .await
        .expect("the worker starts")
}

async fn until(
    sup: &Supervisor,
    id: &str,
    what: &str,
    check: impl Fn(&WorkflowStatus) -> bool,
) -> WorkflowStatus {
    tokio::time::timeout(BOUND, async {
        loop {
            if let Some(status) = sup.workflow(id) {
                if check(&status) {
                    return status;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}; now {:?}", sup.workflow(id)))
}

fn agent<'a>(agents: &'a Value, id: &str) -> &'a Value {
    agents["agents"]
        .as_array()
        .and_then(|list| list.iter().find(|a| a["id"] == id))
        .unwrap_or_else(|| panic!("agent {id} listed: {agents}"))
}

fn step<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["steps"]
        .as_array()
        .and_then(|list| list.iter().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("step {id} shown: {status}"))
}

fn task<'a>(tasks: &'a Value, id: &str) -> &'a Value {
    tasks["tasks"]
        .as_array()
        .and_then(|list| list.iter().find(|t| t["task_id"] == id))
        .unwrap_or_else(|| panic!("task {id} listed: {tasks}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_tasks_and_workflow_status_show_live_data_from_another_process_on_redis() {
    let prefix = Prefix::new();
    let bus = prefix.bus().await;
    let sup = Supervisor::start(&bus, SupervisorOptions::default())
        .await
        .expect("the supervisor starts");
    let extract = worker(&bus, "extract-1", "extract", |task| async move {
        let n = task.input["n"].as_i64().unwrap_or(0);
        Ok(json!({ "rows": (1..=n).collect::<Vec<i64>>() }))
    })
    .await;
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let load = worker(&bus, "load-1", "load", move |task| {
        let g = g.clone();
        async move {
            g.notified().await;
            let rows = task.input["rows"].as_array().map_or(0, Vec::len);
            Ok(json!({ "loaded": rows }))
        }
    })
    .await;
    tokio::time::timeout(BOUND, sup.registry().wait_for(|a| a.len() == 2))
        .await
        .expect("both agents registered");

    let spec = WorkflowSpec::new("cli-live")
        .id("wf-cli-live")
        .step(StepSpec::capability("extract", "extract").input("n", Input::workflow("/n")))
        .step(StepSpec::capability("load", "load").input("rows", Input::step("extract", "/rows")));
    let handle = sup
        .start_workflow(spec, json!({ "n": 3 }))
        .await
        .expect("the workflow starts");
    let mid = until(&sup, "wf-cli-live", "extract done, load running", |s| {
        s.step("extract").map(|x| x.state) == Some(StepState::Completed)
            && s.step("load").map(|x| x.state) == Some(StepState::Running)
    })
    .await;
    let extract_task = mid.step("extract").unwrap().task_id.clone().unwrap();
    let load_task = mid.step("load").unwrap().task_id.clone().unwrap();

    // Mid-run, from another process.
    let agents = cli_json(&prefix, &["agents", "--wait", "1500ms"]).await;
    assert_eq!(agents["backend"], "redis", "{agents}");
    assert_eq!(agents["agents"].as_array().unwrap().len(), 2, "{agents}");
    let a = agent(&agents, "load-1");
    assert_eq!(a["health"], "healthy", "{agents}");
    assert_eq!(a["capabilities"], json!(["load"]), "{agents}");
    assert_eq!(a["name"], "load worker", "{agents}");
    assert_eq!(
        a["load"]["in_flight"], 1,
        "the running task shows: {agents}"
    );
    assert_eq!(a["load"]["capacity"], 2, "{agents}");
    assert_eq!(agent(&agents, "extract-1")["load"]["in_flight"], 0);
    let only = cli_json(
        &prefix,
        &["agents", "--wait", "1s", "--capability", "extract"],
    )
    .await;
    assert_eq!(only["agents"].as_array().unwrap().len(), 1, "{only}");
    assert_eq!(only["agents"][0]["id"], "extract-1", "{only}");

    let tasks = cli_json(&prefix, &["tasks"]).await;
    assert_eq!(tasks["backend"], "redis", "{tasks}");
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 2, "{tasks}");
    let t = task(&tasks, &extract_task);
    assert_eq!(t["status"], "completed", "{tasks}");
    assert_eq!(t["agent"], "extract-1", "{tasks}");
    assert_eq!(t["supervisor"], sup.id(), "{tasks}");
    let t = task(&tasks, &load_task);
    assert!(
        t["status"] == "running" || t["status"] == "assigned",
        "the load task is out: {tasks}"
    );
    assert_eq!(t["agent"], "load-1", "{tasks}");
    let completed = cli_json(&prefix, &["tasks", "--status", "completed"]).await;
    assert_eq!(
        completed["tasks"].as_array().unwrap().len(),
        1,
        "{completed}"
    );
    assert_eq!(completed["tasks"][0]["task_id"], extract_task.as_str());

    let status = cli_json(&prefix, &["workflow", "status", "wf-cli-live"]).await;
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["name"], "cli-live", "{status}");
    assert_eq!(status["supervisor"], sup.id(), "{status}");
    assert_eq!(step(&status, "extract")["state"], "completed", "{status}");
    assert_eq!(
        step(&status, "extract")["output"],
        json!({ "rows": [1, 2, 3] }),
        "{status}"
    );
    assert_eq!(step(&status, "extract")["agent"], "extract-1", "{status}");
    assert_eq!(step(&status, "load")["state"], "running", "{status}");
    // The workflow stream names a step's agent when it completes; which agent runs it
    // now is in the task history, joined by task id.
    assert_eq!(
        step(&status, "load")["task_id"],
        load_task.as_str(),
        "{status}"
    );
    assert_eq!(step(&status, "extract")["task_id"], extract_task.as_str());

    // Let it finish: the next invocations see the new state.
    gate.notify_one();
    let done = tokio::time::timeout(BOUND, handle.wait())
        .await
        .expect("the workflow finishes");
    assert_eq!(done.state, WorkflowState::Completed, "{done:?}");
    let status = cli_json(&prefix, &["workflow", "status", "wf-cli-live"]).await;
    assert_eq!(status["state"], "completed", "{status}");
    assert!(status["finished_at"].is_string(), "{status}");
    assert_eq!(step(&status, "load")["output"], json!({ "loaded": 3 }));
    let tasks = cli_json(&prefix, &["tasks", "--status", "completed"]).await;
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 2, "{tasks}");

    // A worker that stops says goodbye and leaves the view; the other stays.
    extract.stop(Duration::from_secs(2)).await;
    let agents = cli_json(&prefix, &["agents", "--wait", "1s"]).await;
    let ids: Vec<&Value> = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["id"])
        .collect();
    assert_eq!(ids, [&json!("load-1")], "{agents}");
    assert_eq!(agent(&agents, "load-1")["load"]["in_flight"], 0, "{agents}");

    sup.shutdown();
    load.stop(Duration::from_secs(2)).await;
    let _ = bus.transport().close().await;
}
