//! Coordination on the durable engine: a workflow whose supervisor, workers and engine
//! go away mid-run (closed in-process, or the whole process SIGKILLed) is resumed by a
//! new supervisor on an engine reopened from the same directory. Completed steps are
//! not run again; the step that was running is; the final outputs are right.
//!
//! The workflow: `extract` → (`fast`, `slow`) → `load`. In the first life `extract`
//! and `fast` complete and `slow` hangs; then everything is torn down.
//!
//! The kill -9 version re-runs this test binary as `restart_child` (like `crash.rs`):
//! the child prints `RUN <step>` when a handler starts and `MIDRUN` once `extract` and
//! `fast` are recorded complete and `slow` is running; the parent then SIGKILLs it.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbus::coordination::{
    Input, StepSpec, StepState, Supervisor, SupervisorOptions, TaskError, TaskRequest, Worker,
    WorkflowEvent, WorkflowRecord, WorkflowSpec, WorkflowState, WorkflowStatus,
};
use agentbus::{AgentDescriptor, Bus, ChannelPattern, StartPosition, SubscribeOptions, Transport};
use agentbus_file::{FileEngine, FileOptions};
use serde_json::{json, Value};

const WORKFLOW: &str = "wf-durable-1";
const CHILD_ENV: &str = "AGENTBUS_RESTART_CHILD_DIR";
const BOUND: Duration = Duration::from_secs(30);

/// How often each step's handler started in one life.
#[derive(Default)]
struct Runs {
    extract: AtomicU32,
    fast: AtomicU32,
    slow: AtomicU32,
    load: AtomicU32,
}

impl Runs {
    fn get(&self) -> [u32; 4] {
        [
            self.extract.load(Ordering::SeqCst),
            self.fast.load(Ordering::SeqCst),
            self.slow.load(Ordering::SeqCst),
            self.load.load(Ordering::SeqCst),
        ]
    }
}

fn spec() -> WorkflowSpec {
    WorkflowSpec::new("durable-etl")
        .id(WORKFLOW)
        .step(StepSpec::capability("extract", "extract").input("n", Input::workflow("/n")))
        .step(StepSpec::capability("fast", "fast").input("rows", Input::step("extract", "/rows")))
        .step(StepSpec::capability("slow", "slow").input("rows", Input::step("extract", "/rows")))
        .step(
            StepSpec::capability("load", "load")
                .input("a", Input::step("fast", "/sum"))
                .input("b", Input::step("slow", "/max")),
        )
}

fn rows(input: &Value) -> Vec<i64> {
    input["rows"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default()
}

/// Starts the four workers (same agent ids in every life, as a restarted deployment
/// would). When `slow_hangs`, the `slow` handler never returns; `on_start` is called
/// with the step name whenever a handler starts.
async fn workers(bus: &Bus, runs: &Arc<Runs>, slow_hangs: bool, on_start: fn(&str)) -> Vec<Worker> {
    async fn spawn<F, Fut>(bus: &Bus, id: &str, capability: &str, f: F) -> Worker
    where
        F: Fn(TaskRequest) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        Worker::builder(AgentDescriptor::new(id, capability).capability(capability))
            .heartbeat(Duration::from_millis(500))
            .concurrency(2)
            .handle(f)
            .spawn(bus)
            .await
            .expect("the worker starts")
    }
    let r = runs.clone();
    let extract = spawn(bus, "extract-1", "extract", move |task| {
        r.extract.fetch_add(1, Ordering::SeqCst);
        on_start("extract");
        let n = task.input["n"].as_i64().unwrap_or(0);
        async move { Ok(json!({ "rows": (1..=n).collect::<Vec<i64>>() })) }
    })
    .await;
    let r = runs.clone();
    let fast = spawn(bus, "fast-1", "fast", move |task| {
        r.fast.fetch_add(1, Ordering::SeqCst);
        on_start("fast");
        let sum: i64 = rows(&task.input).iter().sum();
        async move { Ok(json!({ "sum": sum })) }
    })
    .await;
    let r = runs.clone();
    let slow = spawn(bus, "slow-1", "slow", move |task| {
        r.slow.fetch_add(1, Ordering::SeqCst);
        on_start("slow");
        let max = rows(&task.input).into_iter().max().unwrap_or(0);
        async move {
            if slow_hangs {
                std::future::pending::<()>().await;
            }
            Ok(json!({ "max": max }))
        }
    })
    .await;
    let r = runs.clone();
    let load = spawn(bus, "load-1", "load", move |task| {
        r.load.fetch_add(1, Ordering::SeqCst);
        on_start("load");
        let total = task.input["a"].as_i64().unwrap_or(-1) + task.input["b"].as_i64().unwrap_or(-1);
        async move { Ok(json!({ "total": total })) }
    })
    .await;
    vec![extract, fast, slow, load]
}

fn quiet(_: &str) {}

fn say(step: &str) {
    println!("RUN {step}");
}

async fn supervisor(bus: &Bus) -> Supervisor {
    let options = SupervisorOptions {
        timeout: Duration::from_secs(60),
        ..SupervisorOptions::default()
    };
    Supervisor::start(bus, options)
        .await
        .expect("the supervisor starts")
}

/// Polls the supervisor until `check` holds for the workflow's status.
async fn until(
    sup: &Supervisor,
    what: &str,
    check: impl Fn(&WorkflowStatus) -> bool,
) -> WorkflowStatus {
    tokio::time::timeout(BOUND, async {
        loop {
            if let Some(status) = sup.workflow(WORKFLOW) {
                if check(&status) {
                    return status;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out waiting for: {what}; now {:?}",
            sup.workflow(WORKFLOW)
        )
    })
}

fn mid_run(status: &WorkflowStatus) -> bool {
    let state = |id: &str| status.step(id).map(|s| s.state);
    state("extract") == Some(StepState::Completed)
        && state("fast") == Some(StepState::Completed)
        && state("slow") == Some(StepState::Running)
}

/// First life: runs until `extract` and `fast` completed and `slow` is running.
async fn first_life(engine: &Arc<FileEngine>, runs: &Arc<Runs>, on_start: fn(&str)) -> Vec<Worker> {
    let bus = Bus::new(engine.clone());
    let sup = supervisor(&bus).await;
    let workers = workers(&bus, runs, true, on_start).await;
    tokio::time::timeout(BOUND, sup.registry().wait_for(|a| a.len() == 4))
        .await
        .expect("four agents registered");
    sup.start_workflow(spec(), json!({ "n": 4 }))
        .await
        .expect("the workflow starts");
    let status = until(&sup, "extract and fast done, slow running", mid_run).await;
    assert_eq!(status.state, WorkflowState::Running, "{status:?}");
    assert_eq!(status.step("load").unwrap().state, StepState::Waiting);
    sup.shutdown();
    workers
}

/// Second life on the reopened engine: the workflow resumes and completes. Returns
/// its final status and the runs of this life.
async fn second_life(dir: &Path) -> (WorkflowStatus, [u32; 4], Vec<WorkflowEvent>) {
    let engine = Arc::new(FileEngine::open(dir, FileOptions::default()).expect("the log reopens"));
    assert!(engine.recovery().records > 0, "{:?}", engine.recovery());
    let bus = Bus::new(engine.clone());
    let runs = Arc::new(Runs::default());
    // Workers first, so the resumed steps find their agents at once.
    let workers = workers(&bus, &runs, false, quiet).await;
    let sup = supervisor(&bus).await;
    let status = until(&sup, "the resumed workflow finishes", |s| {
        s.state.is_final()
    })
    .await;
    let events = workflow_events(&bus).await;
    sup.shutdown();
    for w in workers {
        w.stop(Duration::from_secs(2)).await;
    }
    engine.close().await.expect("the engine closes");
    (status, runs.get(), events)
}

async fn workflow_events(bus: &Bus) -> Vec<WorkflowEvent> {
    bus.register::<WorkflowRecord>();
    let mut sub = bus
        .subscribe_typed::<WorkflowRecord>(
            SubscribeOptions::new(
                ChannelPattern::new(format!("_sys.workflows.{WORKFLOW}")).unwrap(),
            )
            .start(StartPosition::Earliest),
        )
        .await
        .expect("the workflow channel can be read");
    let mut events = Vec::new();
    while let Ok(Ok(record)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        let _ = record.delivery.ack().await;
        events.push(record.message.event);
    }
    events
}

fn completions(events: &[WorkflowEvent], step: &str) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, WorkflowEvent::StepCompleted { step: s, .. } if s == step))
        .count()
}

/// What every resumed run must show, whatever killed the first life.
fn assert_resumed(status: &WorkflowStatus, second: [u32; 4], events: &[WorkflowEvent]) {
    assert_eq!(status.state, WorkflowState::Completed, "{status:?}");
    let [extract, fast, slow, load] = second;
    assert_eq!(extract, 0, "a completed step is not run again: {status:?}");
    assert_eq!(fast, 0, "a completed step is not run again: {status:?}");
    // The resumed workflow starts `slow` as a new task; the first life's unacked
    // assignment may also be redelivered to the restarted `slow-1` (at least once).
    assert!(
        (1..=2).contains(&slow),
        "the step that was running runs again: {slow}"
    );
    assert_eq!(load, 1, "the pending step runs once");
    let output = |id: &str| status.step(id).and_then(|s| s.output.clone());
    assert_eq!(output("extract"), Some(json!({ "rows": [1, 2, 3, 4] })));
    assert_eq!(output("fast"), Some(json!({ "sum": 10 })));
    assert_eq!(output("slow"), Some(json!({ "max": 4 })));
    assert_eq!(output("load"), Some(json!({ "total": 14 })));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, WorkflowEvent::Resumed { .. })),
        "a resumed event is recorded"
    );
    for step in ["extract", "fast", "slow", "load"] {
        assert_eq!(completions(events, step), 1, "one completion of {step}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_resumes_after_the_engine_is_closed_and_reopened() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine =
            Arc::new(FileEngine::open(dir.path(), FileOptions::default()).expect("the log opens"));
        let runs = Arc::new(Runs::default());
        let workers = first_life(&engine, &runs, quiet).await;
        assert_eq!(runs.get(), [1, 1, 1, 0]);
        for w in workers {
            w.abort();
        }
        engine.close().await.expect("the engine closes");
    }
    let (status, second, events) = second_life(dir.path()).await;
    assert_resumed(&status, second, &events);
}

/// The child's body for the kill -9 test; a no-op unless started by the parent.
#[test]
fn restart_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let engine = match FileEngine::open(&dir, FileOptions::default()) {
            Ok(engine) => Arc::new(engine),
            Err(e) => {
                eprintln!("OPEN FAILED: {e}");
                std::process::exit(3);
            }
        };
        let runs = Arc::new(Runs::default());
        let _workers = first_life(&engine, &runs, say).await;
        println!("MIDRUN");
        // Wait to be killed.
        std::future::pending::<()>().await;
    });
}

#[test]
fn a_workflow_resumes_after_its_process_is_killed() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "restart_child",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the child starts");
    // Kill the child however this test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut started = Vec::new();
    loop {
        match rx.recv_timeout(BOUND) {
            // libtest may print its own text on the same line as the child's first
            // output, so the markers are looked for anywhere in a line.
            Ok(line) if line.ends_with("MIDRUN") => break,
            Ok(line) => {
                if let Some(at) = line.find("RUN ") {
                    started.push(line[at + 4..].trim().to_string());
                }
            }
            Err(_) => {
                let _ = child.0.kill();
                let mut err = String::new();
                if let Some(mut e) = child.0.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("the child never reached mid-run (saw {started:?}): {err}");
            }
        }
    }
    child.0.kill().expect("SIGKILL the child");
    child.0.wait().expect("the child is reaped");
    started.sort();
    assert_eq!(started, ["extract", "fast", "slow"], "the first life");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (status, second, events) = runtime.block_on(second_life(dir.path()));
    assert_resumed(&status, second, &events);
}
