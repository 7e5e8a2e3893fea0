//! Load figures for the coordination layer on the memory engine: supervised task
//! round trips (submit → worker → report → completed) and one 1,000-step DAG
//! workflow. Run with `cargo run --release -p agentbus --example coordination_load`
//! (optional arguments: tasks, workers, in-flight); figures go in
//! docs/PERFORMANCE.md.

use std::time::{Duration, Instant};

use agentbus::coordination::{
    Input, StepSpec, Supervisor, SupervisorOptions, TaskSpec, TaskStatus, Worker, WorkflowSpec,
    WorkflowState,
};
use agentbus::{AgentDescriptor, Bus};
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::main]
async fn main() -> agentbus::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tasks = args.first().copied().unwrap_or(20_000);
    let workers_n = args.get(1).copied().unwrap_or(4);
    let window = args.get(2).copied().unwrap_or(256);

    let bus = Bus::memory();
    let supervisor = Supervisor::start(
        &bus,
        SupervisorOptions {
            keep_finished: 1_000,
            ..SupervisorOptions::default()
        },
    )
    .await?;
    let mut workers = Vec::new();
    for i in 0..workers_n {
        workers.push(
            Worker::builder(AgentDescriptor::new(format!("w-{i}"), "w").capability("work"))
                .concurrency(64)
                .handle(|task| async move { Ok(json!({ "n": task.input.get("n").cloned() })) })
                .spawn(&bus)
                .await?,
        );
    }
    supervisor
        .registry()
        .wait_for(|a| a.len() == workers_n)
        .await;

    // Round trips with `window` tasks in flight.
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(tasks);
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut submitted = 0;
    while submitted < tasks || !in_flight.is_empty() {
        while submitted < tasks && in_flight.len() < window {
            let handle = supervisor
                .submit(TaskSpec::capability("work").input(json!({ "n": submitted })))
                .await?;
            let t0 = Instant::now();
            in_flight.push(async move { (handle.wait().await, t0.elapsed()) });
            submitted += 1;
        }
        if let Some((outcome, latency)) = futures::StreamExt::next(&mut in_flight).await {
            assert_eq!(outcome.status, TaskStatus::Completed);
            latencies.push(latency);
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    println!(
        "tasks: {tasks} through {workers_n} workers, {window} in flight: {:.0} tasks/s, \
         latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        tasks as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        percentile(&latencies, 1.0).as_secs_f64() * 1e3,
    );

    // One 1,000-step DAG: step i depends on i-1 and i/2 (a long chain with fan-in).
    let mut spec = WorkflowSpec::new("dag-1000");
    for i in 0..1000usize {
        let mut step = StepSpec::capability(format!("s{i}"), "work");
        if i > 0 {
            step = step.input("prev", Input::step(format!("s{}", i - 1), ""));
        }
        if i > 1 {
            step = step.after([format!("s{}", i / 2)]);
        }
        spec = spec.step(step);
    }
    let started = Instant::now();
    let status = supervisor
        .start_workflow(spec, json!({}))
        .await?
        .wait()
        .await;
    assert_eq!(status.state, WorkflowState::Completed);
    println!(
        "workflow: 1,000 dependent steps (a chain) in {:.0} ms ({:.2} ms per step)",
        started.elapsed().as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3 / 1000.0
    );
    let mut wide = WorkflowSpec::new("wide-1000").step(StepSpec::capability("root", "work"));
    for i in 0..998usize {
        wide = wide.step(StepSpec::capability(format!("p{i}"), "work").after(["root"]));
    }
    wide = wide
        .step(StepSpec::capability("sink", "work").after((0..998usize).map(|i| format!("p{i}"))));
    let started = Instant::now();
    let status = supervisor
        .start_workflow(wide, json!({}))
        .await?
        .wait()
        .await;
    assert_eq!(status.state, WorkflowState::Completed);
    println!(
        "workflow: 1,000 steps, 998 in parallel, in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    for worker in workers {
        worker.stop(Duration::from_secs(1)).await;
    }
    supervisor.shutdown();
    Ok(())
}
