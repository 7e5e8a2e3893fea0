//! `agentbus demo etl`: seed 003's agent-orchestrated ETL system, end to end.
//!
//! A supervisor runs one workflow per batch — extract → two parallel transforms
//! (clean, enrich) → validate → load — as a DAG across several worker agents found by
//! capability in the live registry, with least-loaded selection among the three
//! transformers. One transformer stops heartbeating in the middle of a task (it hangs,
//! then its process is gone): the registry marks it unhealthy after four missed
//! heartbeats, the supervisor redistributes its task to a healthy transformer, and the
//! workflow still records exactly one completion for the step. The summary shows the
//! workflows, per-step timings, per-agent statistics, the redistribution and the
//! escalation counters; `--json` prints it as one object.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::coordination::{
    AgentStats, Input, RegistryOptions, StepSpec, StepState, Strategy, Supervisor,
    SupervisorOptions, TaskError, TaskRequest, Worker, WorkflowSpec, WorkflowState, WorkflowStatus,
};
use agentbus::{AgentDescriptor, Bus};
use anyhow::Context as _;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// `agentbus demo etl [--batches N] [--rows N] [--seed S] [--no-failure]`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "agentbus demo etl",
    about = "Seed 003's agent-orchestrated ETL: extract → two parallel transforms → validate → \
             load as DAG workflows across worker agents, with a transformer that stops \
             heartbeating mid-run so its task is redistributed"
)]
struct EtlArgs {
    /// How many batches (one workflow each).
    #[arg(long, default_value_t = 6)]
    batches: usize,
    /// Records extracted per batch.
    #[arg(long, default_value_t = 200)]
    rows: usize,
    /// Seed of the record generator (same seed, same data).
    #[arg(long, default_value_t = 3)]
    seed: u64,
    /// Keep every transformer healthy (no redistribution).
    #[arg(long)]
    no_failure: bool,
    /// Heartbeat interval of the agents; unhealthy after four missed.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
}

/// Parses the demo's own arguments, runs it on the global backend and prints the
/// summary (one JSON object with `--json`).
///
/// # Errors
/// Usage errors (exit 2), backend errors, or a run that does not finish.
pub(crate) async fn run_cli(args: &[String], global: &crate::Global) -> anyhow::Result<()> {
    use clap::Parser as _;
    let parsed = match EtlArgs::try_parse_from(
        std::iter::once("etl".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(parsed) => parsed,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            return crate::output::line(e.to_string().trim_end());
        }
        Err(e) => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("bad arguments")
                .trim_start_matches("error: ");
            return Err(crate::CliError::usage(first.to_string()).into());
        }
    };
    if parsed.batches == 0 || parsed.rows == 0 {
        return Err(crate::CliError::usage("--batches and --rows must be at least 1").into());
    }
    if parsed.heartbeat.is_zero() {
        return Err(
            crate::CliError::usage("--heartbeat must be longer than zero, e.g. 100ms").into(),
        );
    }
    let transport = crate::backend::open(&global.backend).await?;
    let bus = Bus::new(transport);
    let options = EtlDemoOptions {
        batches: parsed.batches,
        rows: parsed.rows,
        seed: parsed.seed,
        stall_one_transformer: !parsed.no_failure,
        heartbeat: parsed.heartbeat,
    };
    let report = run(bus, &options).await?;
    if global.json {
        crate::output::json_line(&report)
    } else {
        crate::output::line(render(&report).trim_end())
    }
}

/// Settings of one demo run.
#[derive(Debug, Clone)]
pub(crate) struct EtlDemoOptions {
    pub(crate) batches: usize,
    pub(crate) rows: usize,
    pub(crate) seed: u64,
    pub(crate) stall_one_transformer: bool,
    pub(crate) heartbeat: Duration,
}

impl Default for EtlDemoOptions {
    fn default() -> Self {
        EtlDemoOptions {
            batches: 6,
            rows: 200,
            seed: 3,
            stall_one_transformer: true,
            heartbeat: Duration::from_millis(250),
        }
    }
}

/// The run's summary; `--json` prints it as one object.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EtlDemoReport {
    pub(crate) backend: String,
    pub(crate) batches: usize,
    pub(crate) workflows_completed: usize,
    pub(crate) workflows_failed: usize,
    /// Steps completed over every workflow.
    pub(crate) steps: usize,
    pub(crate) steps_per_workflow: usize,
    pub(crate) redistributed_tasks: u64,
    pub(crate) escalations: u64,
    pub(crate) retries: u64,
    pub(crate) timeouts: u64,
    pub(crate) stalled_agent: Option<String>,
    pub(crate) rows_extracted: u64,
    pub(crate) rows_rejected: u64,
    pub(crate) rows_loaded: u64,
    pub(crate) duplicate_rows_ignored: u64,
    pub(crate) step_timings: BTreeMap<String, StepTiming>,
    pub(crate) agents: Vec<AgentLine>,
    pub(crate) workflows: Vec<WorkflowLine>,
    pub(crate) duration_ms: u64,
}

/// Durations of one step over every workflow.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StepTiming {
    pub(crate) count: usize,
    pub(crate) p50_ms: u64,
    pub(crate) max_ms: u64,
}

/// One agent's statistics.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AgentLine {
    pub(crate) agent: String,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) timed_out: u64,
    pub(crate) redistributed_away: u64,
    pub(crate) success_rate: f64,
    pub(crate) latency_p50_ms: Option<u64>,
    pub(crate) latency_p99_ms: Option<u64>,
    pub(crate) breaker: String,
}

/// One workflow, shortened.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WorkflowLine {
    pub(crate) id: String,
    pub(crate) state: String,
    pub(crate) duration_ms: u64,
    pub(crate) steps: BTreeMap<String, String>,
}

/// One extracted record.
fn generate(batch: usize, rows: usize, seed: u64) -> Vec<Value> {
    let mut state = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(batch as u64);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    const COUNTRIES: [&str; 6] = ["DE", "FR", "US", "BR", "JP", "??"];
    (0..rows)
        .map(|i| {
            let amount = (next() % 20_000) as i64 - 1_000; // some negative: rejected
            let country = COUNTRIES[(next() % COUNTRIES.len() as u64) as usize];
            json!({ "id": format!("b{batch}-r{i}"), "amount_cents": amount, "country": country })
        })
        .collect()
}

fn region(country: &str) -> &'static str {
    match country {
        "DE" | "FR" => "emea",
        "US" | "BR" => "americas",
        "JP" => "apac",
        _ => "unknown",
    }
}

fn rows_of(task: &TaskRequest, field: &str) -> Result<Vec<Value>, TaskError> {
    task.input[field]
        .as_array()
        .cloned()
        .ok_or_else(|| TaskError::permanent(format!("input '{field}' is not a list of records")))
}

/// The five-step DAG of one batch.
fn etl_workflow(batch: usize) -> WorkflowSpec {
    WorkflowSpec::new(format!("etl-batch-{batch}"))
        .step(StepSpec::capability("extract", "extract").input("batch", Input::workflow("/batch")))
        .step(
            StepSpec::capability("transform-clean", "transform")
                .input("op", Input::value(json!("clean")))
                .input("rows", Input::step("extract", "/rows")),
        )
        .step(
            StepSpec::capability("transform-enrich", "transform")
                .input("op", Input::value(json!("enrich")))
                .input("rows", Input::step("extract", "/rows")),
        )
        .step(
            StepSpec::capability("validate", "validate")
                .input("clean", Input::step("transform-clean", "/rows"))
                .input("enriched", Input::step("transform-enrich", "/rows")),
        )
        .step(StepSpec::capability("load", "load").input("rows", Input::step("validate", "/rows")))
}

/// Runs the demo on `bus` and returns its report.
pub(crate) async fn run(bus: Bus, options: &EtlDemoOptions) -> anyhow::Result<EtlDemoReport> {
    let started = Instant::now();
    let heartbeat = options.heartbeat;
    let supervisor = Supervisor::start(
        &bus,
        SupervisorOptions {
            strategy: Strategy::LeastLoaded,
            timeout: Duration::from_secs(30),
            retries: 1,
            registry: RegistryOptions {
                unhealthy_after: 4,
                dead_after: 12,
                ..RegistryOptions::default()
            },
            ..SupervisorOptions::default()
        },
    )
    .await?;

    let rows_extracted = Arc::new(AtomicU64::new(0));
    // The warehouse: loaders upsert by record id, so a load task that runs twice (it
    // was redistributed while its first agent was in fact still working) loads each
    // record once; the second write is counted as a duplicate.
    let warehouse: Arc<Mutex<HashSet<String>>> = Arc::default();
    let duplicate_rows = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();

    let (rows, seed, counter) = (options.rows, options.seed, rows_extracted.clone());
    workers.push(
        spawn(&bus, "extractor-1", "extract", heartbeat, 4, move |task| {
            let counter = counter.clone();
            async move {
                let batch = task.input["batch"].as_u64().unwrap_or(0) as usize;
                let data = generate(batch, rows, seed);
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(json!({ "rows": data }))
            }
        })
        .await?,
    );
    for id in ["transformer-a", "transformer-c"] {
        workers.push(spawn(&bus, id, "transform", heartbeat, 2, transform).await?);
    }
    // transformer-b: hangs on its first task, and then its process is gone.
    let stalled = Arc::new(Notify::new());
    let stall = options.stall_one_transformer;
    let taken = Arc::new(AtomicU64::new(0));
    let (signal, hang) = (stalled.clone(), Arc::new(AtomicBool::new(stall)));
    let transformer_b = spawn(
        &bus,
        "transformer-b",
        "transform",
        heartbeat,
        2,
        move |task| {
            let n = taken.fetch_add(1, Ordering::SeqCst);
            let hang_now = n == 0 && hang.load(Ordering::SeqCst);
            let signal = signal.clone();
            async move {
                if hang_now {
                    signal.notify_one();
                    futures::future::pending::<()>().await;
                }
                transform(task).await
            }
        },
    )
    .await?;
    workers.push(
        spawn(
            &bus,
            "validator-1",
            "validate",
            heartbeat,
            4,
            |task| async move {
                let clean = rows_of(&task, "clean")?;
                let enriched = rows_of(&task, "enriched")?;
                let regions: BTreeMap<String, Value> = enriched
                    .iter()
                    .filter_map(|r| Some((r["id"].as_str()?.to_string(), r["region"].clone())))
                    .collect();
                let mut merged = Vec::with_capacity(clean.len());
                for row in clean {
                    let id = row["id"].as_str().unwrap_or_default().to_string();
                    let Some(region) = regions.get(&id) else {
                        return Err(TaskError::permanent(format!(
                            "record {id} missing from the enriched set"
                        )));
                    };
                    let mut row = row.clone();
                    row["region"] = region.clone();
                    merged.push(row);
                }
                Ok(json!({ "rows": merged, "rejected": enriched.len() - merged.len() }))
            },
        )
        .await?,
    );
    for id in ["loader-1", "loader-2"] {
        let (table, duplicates) = (warehouse.clone(), duplicate_rows.clone());
        workers.push(
            spawn(&bus, id, "load", heartbeat, 2, move |task| {
                let (table, duplicates) = (table.clone(), duplicates.clone());
                async move {
                    let rows = rows_of(&task, "rows")?;
                    let mut table = table.lock();
                    for row in &rows {
                        let id = row["id"].as_str().unwrap_or_default().to_string();
                        if !table.insert(id) {
                            duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(json!({ "loaded": rows.len() }))
                }
            })
            .await?,
        );
    }
    tokio::time::timeout(
        Duration::from_secs(10),
        supervisor.registry().wait_for(|agents| agents.len() == 7),
    )
    .await
    .context("the demo's agents did not all appear in the registry within 10 s")?;

    let mut handles = Vec::new();
    for batch in 0..options.batches {
        handles.push(
            supervisor
                .start_workflow(etl_workflow(batch), json!({ "batch": batch }))
                .await?,
        );
    }
    // When transformer-b hangs on its task, its process goes away: no more
    // heartbeats, no goodbye. (If it never gets a task, nothing stalls.)
    let mut transformer_b = Some(transformer_b);
    let mut stalled_agent = None;
    let all_done = async {
        let mut finished: Vec<WorkflowStatus> = Vec::new();
        for handle in &handles {
            finished.push(handle.clone().wait().await);
        }
        finished
    };
    tokio::pin!(all_done);
    let finished = tokio::time::timeout(Duration::from_secs(60), async {
        if stall {
            tokio::select! {
                finished = &mut all_done => return finished,
                _ = stalled.notified() => {
                    if let Some(worker) = transformer_b.take() {
                        worker.abort();
                    }
                    stalled_agent = Some("transformer-b".to_string());
                }
            }
        }
        (&mut all_done).await
    })
    .await
    .context("the workflows did not finish within 60 s")?;
    let stats = supervisor.stats();
    let agents = supervisor.agent_stats();
    supervisor.shutdown();
    if let Some(worker) = transformer_b {
        worker.stop(Duration::from_secs(1)).await;
    }
    for worker in workers {
        worker.stop(Duration::from_secs(1)).await;
    }
    let extracted = rows_extracted.load(Ordering::Relaxed);
    let loaded = warehouse.lock().len() as u64;
    let rejected = finished
        .iter()
        .filter_map(|w| w.step("validate")?.output.as_ref()?["rejected"].as_u64())
        .sum();
    Ok(EtlDemoReport {
        backend: bus.transport().name().to_string(),
        batches: options.batches,
        workflows_completed: finished
            .iter()
            .filter(|w| w.state == WorkflowState::Completed)
            .count(),
        workflows_failed: finished
            .iter()
            .filter(|w| w.state != WorkflowState::Completed)
            .count(),
        steps: finished.iter().map(|w| w.count(StepState::Completed)).sum(),
        steps_per_workflow: 5,
        redistributed_tasks: stats.redistributed,
        escalations: stats.escalated,
        retries: stats.retries,
        timeouts: stats.timeouts,
        stalled_agent,
        rows_extracted: extracted,
        rows_rejected: rejected,
        rows_loaded: loaded,
        duplicate_rows_ignored: duplicate_rows.load(Ordering::Relaxed),
        step_timings: timings(&finished),
        agents: agents.iter().map(agent_line).collect(),
        workflows: finished.iter().map(workflow_line).collect(),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

async fn spawn<F, Fut>(
    bus: &Bus,
    id: &str,
    capability: &str,
    heartbeat: Duration,
    concurrency: usize,
    handler: F,
) -> agentbus::Result<Worker>
where
    F: Fn(TaskRequest) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    Worker::builder(
        AgentDescriptor::new(id, capability)
            .capability(capability)
            .version(env!("CARGO_PKG_VERSION")),
    )
    .heartbeat(heartbeat)
    .concurrency(concurrency)
    .handle(handler)
    .spawn(bus)
    .await
}

/// The transformers: `clean` drops records with a negative amount and converts cents,
/// `enrich` adds the sales region of the country.
async fn transform(task: TaskRequest) -> Result<Value, TaskError> {
    let rows = rows_of(&task, "rows")?;
    // A little work, so the transforms overlap and the load balancing shows.
    tokio::time::sleep(Duration::from_millis(20)).await;
    match task.input["op"].as_str() {
        Some("clean") => {
            let rows: Vec<Value> = rows
                .into_iter()
                .filter(|r| r["amount_cents"].as_i64().is_some_and(|a| a >= 0))
                .map(|r| {
                    let cents = r["amount_cents"].as_i64().unwrap_or(0);
                    json!({ "id": r["id"], "amount": cents as f64 / 100.0, "country": r["country"] })
                })
                .collect();
            Ok(json!({ "rows": rows }))
        }
        Some("enrich") => {
            let rows: Vec<Value> = rows
                .into_iter()
                .map(|r| {
                    let country = r["country"].as_str().unwrap_or("??").to_string();
                    json!({ "id": r["id"], "region": region(&country) })
                })
                .collect();
            Ok(json!({ "rows": rows }))
        }
        other => Err(TaskError::permanent(format!("unknown transform {other:?}"))),
    }
}

fn timings(workflows: &[WorkflowStatus]) -> BTreeMap<String, StepTiming> {
    let mut by_step: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for workflow in workflows {
        for step in &workflow.steps {
            if let Some(ms) = step.duration_ms {
                by_step.entry(step.id.clone()).or_default().push(ms);
            }
        }
    }
    by_step
        .into_iter()
        .map(|(step, mut samples)| {
            samples.sort_unstable();
            let timing = StepTiming {
                count: samples.len(),
                p50_ms: samples[(samples.len() - 1) / 2],
                max_ms: samples.last().copied().unwrap_or(0),
            };
            (step, timing)
        })
        .collect()
}

fn agent_line(stats: &AgentStats) -> AgentLine {
    AgentLine {
        agent: stats.agent_id.clone(),
        completed: stats.completed,
        failed: stats.failed,
        timed_out: stats.timed_out,
        redistributed_away: stats.redistributed_away,
        success_rate: stats.success_rate,
        latency_p50_ms: stats.latency_p50_ms,
        latency_p99_ms: stats.latency_p99_ms,
        breaker: stats.breaker.as_str().to_string(),
    }
}

fn workflow_line(status: &WorkflowStatus) -> WorkflowLine {
    WorkflowLine {
        id: status.id.clone(),
        state: status.state.as_str().to_string(),
        duration_ms: status.finished_at.map_or(0, |end| {
            u64::try_from((end - status.started_at).num_milliseconds().max(0)).unwrap_or(0)
        }),
        steps: status
            .steps
            .iter()
            .map(|s| (s.id.clone(), s.agent.clone().unwrap_or_else(|| "-".into())))
            .collect(),
    }
}

/// The human summary.
pub(crate) fn render(report: &EtlDemoReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agentbus demo etl — seed 003's agent-orchestrated ETL on the {} engine",
        report.backend
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{} batches → {} workflows completed, {} failed; {} steps completed ({} per workflow) in {} ms",
        report.batches,
        report.workflows_completed,
        report.workflows_failed,
        report.steps,
        report.steps_per_workflow,
        report.duration_ms
    );
    let _ = writeln!(
        out,
        "records: {} extracted, {} rejected by the clean transform, {} loaded ({} duplicate writes ignored)",
        report.rows_extracted, report.rows_rejected, report.rows_loaded, report.duplicate_rows_ignored
    );
    match &report.stalled_agent {
        Some(agent) => {
            let _ = writeln!(
                out,
                "{agent} stopped heartbeating mid-task: {} task(s) redistributed to healthy transformers",
                report.redistributed_tasks
            );
        }
        None => {
            let _ = writeln!(
                out,
                "every agent stayed healthy ({} task(s) redistributed)",
                report.redistributed_tasks
            );
        }
    }
    let _ = writeln!(
        out,
        "escalations: {} (retries {}, timed-out attempts {})",
        report.escalations, report.retries, report.timeouts
    );
    let _ = writeln!(out);
    let rows: Vec<Vec<String>> = report
        .step_timings
        .iter()
        .map(|(step, t)| {
            vec![
                step.clone(),
                t.count.to_string(),
                t.p50_ms.to_string(),
                t.max_ms.to_string(),
            ]
        })
        .collect();
    out.push_str(&crate::output::table(
        &["step", "runs", "p50 ms", "max ms"],
        &rows,
    ));
    let _ = writeln!(out);
    let rows: Vec<Vec<String>> = report
        .agents
        .iter()
        .map(|a| {
            vec![
                a.agent.clone(),
                a.completed.to_string(),
                a.failed.to_string(),
                a.redistributed_away.to_string(),
                format!("{:.0}%", a.success_rate * 100.0),
                a.latency_p50_ms.map_or("-".into(), |v| v.to_string()),
                a.latency_p99_ms.map_or("-".into(), |v| v.to_string()),
                a.breaker.clone(),
            ]
        })
        .collect();
    out.push_str(&crate::output::table(
        &[
            "agent",
            "completed",
            "failed",
            "moved away",
            "success",
            "p50 ms",
            "p99 ms",
            "breaker",
        ],
        &rows,
    ));
    let _ = writeln!(out);
    for w in &report.workflows {
        let steps: Vec<String> = w.steps.iter().map(|(s, a)| format!("{s}@{a}")).collect();
        let _ = writeln!(
            out,
            "{} {} {} ms: {}",
            w.id,
            w.state,
            w.duration_ms,
            steps.join(" ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_etl_demo_completes_every_workflow_and_redistributes_the_stalled_task() {
        let report = run(
            Bus::memory(),
            &EtlDemoOptions {
                batches: 4,
                rows: 50,
                ..EtlDemoOptions::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(report.workflows_completed, 4, "{report:#?}");
        assert_eq!(report.steps, 20);
        assert_eq!(report.stalled_agent.as_deref(), Some("transformer-b"));
        assert!(report.redistributed_tasks >= 1, "{report:#?}");
        assert_eq!(report.rows_extracted, 200);
        // Every clean record is loaded exactly once.
        let expected: u64 = (0..4)
            .map(|b| {
                generate(b, 50, 3)
                    .iter()
                    .filter(|r| r["amount_cents"].as_i64().unwrap() >= 0)
                    .count() as u64
            })
            .sum();
        assert_eq!(report.rows_loaded, expected);
        let b = report
            .agents
            .iter()
            .find(|a| a.agent == "transformer-b")
            .unwrap();
        assert!(b.redistributed_away >= 1);
        let text = render(&report);
        assert!(
            text.contains("transformer-b stopped heartbeating"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        for key in [
            "workflows_completed",
            "steps",
            "redistributed_tasks",
            "escalations",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }

    #[tokio::test]
    async fn without_the_failure_nothing_is_redistributed() {
        let report = run(
            Bus::memory(),
            &EtlDemoOptions {
                batches: 2,
                rows: 10,
                stall_one_transformer: false,
                ..EtlDemoOptions::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(report.workflows_completed, 2);
        assert_eq!(report.redistributed_tasks, 0);
        assert!(report.stalled_agent.is_none());
    }
}
