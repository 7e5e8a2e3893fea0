//! `agentbus demo vehicle`: seed 000's predictive-maintenance system, end to end.
//!
//! Vehicle data → data analysis → customer engagement → scheduling → feedback →
//! manufacturing insights, with a master orchestrator tracking every workflow by
//! correlation id, per-agent subscription rules as in the seed, a primary scheduler
//! that is deliberately slow for some vehicles (its timeouts escalate: retry the same
//! agent → the backup scheduler → `channel.system.timeout`, where an operator desk
//! parks the case in dead letters), one malformed record from an external system
//! (dead-lettered as `schema`), and a closing scatter-gather status round.

mod messages;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbus::{
    Agent, AgentDescriptor, Bus, ChannelName, Context, DeadLetterFilter, Envelope, GatherSpec,
    HandlerOptions, HandlerResult, Message, Priority, PublishOptions, Reject,
};
use anyhow::Context as _;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Notify;

use messages::channels::*;
use messages::*;

/// `agentbus demo vehicle [--vehicles N] [--seed S] [--scheduling-timeout D]`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "agentbus demo vehicle",
    about = "Seed 000's predictive-maintenance system end to end: vehicle data → analysis → \
             customer engagement → scheduling (with timeout escalation) → feedback → \
             manufacturing insights"
)]
struct VehicleArgs {
    /// How many vehicles send data.
    #[arg(long, default_value_t = 24)]
    vehicles: usize,
    /// Seed of the sensor-data generator (same seed, same run).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// How long the orchestrator waits for a scheduling result before escalating.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    scheduling_timeout: Duration,
    /// Metrics endpoint, interaction store and audit files.
    #[command(flatten)]
    observe: crate::commands::observe::ObserveArgs,
}

/// Parses the demo's own arguments, runs it on the global backend and prints the
/// summary (one JSON object with `--json`).
///
/// # Errors
/// Usage errors (exit 2), backend errors, or a run that does not finish.
pub(crate) async fn run_cli(args: &[String], global: &crate::Global) -> anyhow::Result<()> {
    use clap::Parser as _;
    let parsed = match VehicleArgs::try_parse_from(
        std::iter::once("vehicle".to_string()).chain(args.iter().cloned()),
    ) {
        Ok(parsed) => parsed,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            return crate::output::line(e.to_string().trim_end());
        }
        Err(e) => {
            let first = e.to_string();
            let first = first
                .lines()
                .next()
                .unwrap_or("bad arguments")
                .trim_start_matches("error: ");
            return Err(crate::CliError::usage(first.to_string()).into());
        }
    };
    if parsed.vehicles == 0 {
        return Err(crate::CliError::usage("--vehicles must be at least 1").into());
    }
    let transport = crate::backend::open(&global.backend).await?;
    let (bus, observing) = parsed.observe.bus(transport).await?;
    let options = VehicleDemoOptions {
        vehicles: parsed.vehicles,
        seed: parsed.seed,
        scheduling_timeout: parsed.scheduling_timeout,
        ..VehicleDemoOptions::default()
    };
    let report = run(bus, &options).await?;
    let printed = if global.json {
        crate::output::json_line(&report)
    } else {
        crate::output::line(render(&report).trim_end())
    };
    observing.finish().await;
    printed
}

/// Settings of one demo run.
#[derive(Debug, Clone)]
pub(crate) struct VehicleDemoOptions {
    /// How many vehicles send data.
    pub(crate) vehicles: usize,
    /// Seed of the sensor-data generator.
    pub(crate) seed: u64,
    /// How long the orchestrator waits for a scheduling result before escalating.
    pub(crate) scheduling_timeout: Duration,
    /// Give up on the whole run after this long.
    pub(crate) run_timeout: Duration,
}

impl Default for VehicleDemoOptions {
    fn default() -> Self {
        VehicleDemoOptions {
            vehicles: 24,
            seed: 7,
            scheduling_timeout: Duration::from_millis(300),
            run_timeout: Duration::from_secs(60),
        }
    }
}

/// How a workflow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    /// No issue found.
    NoIssues,
    /// The customer declined the appointment.
    Declined,
    /// Analysed, scheduled, serviced, feedback processed.
    Serviced,
    /// Scheduling timed out everywhere; handed to a person.
    Escalated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Stage {
    Analysis,
    Engagement,
    Scheduling,
    Feedback,
}

#[derive(Debug)]
struct Workflow {
    started: Instant,
    stage: Stage,
    stage_started: Instant,
    scheduling_attempt: u32,
    tried: Vec<String>,
    scheduled_by: Option<String>,
    outcome: Option<Outcome>,
}

/// Escalation counts, by step.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub(crate) struct Escalations {
    retry_same_agent: u64,
    backup_agent: u64,
    manual_intervention: u64,
}

/// What the orchestrator knows; shared with the driver for the summary.
#[derive(Debug, Default)]
struct Tracker {
    workflows: Mutex<HashMap<String, Workflow>>,
    stage_latencies: Mutex<BTreeMap<Stage, Vec<Duration>>>,
    end_to_end: Mutex<Vec<Duration>>,
    escalations: Mutex<Escalations>,
    errors_reported: Mutex<Vec<String>>,
    insights: Mutex<Vec<ManufacturingInsight>>,
    late_results: Mutex<u64>,
    finished: Notify,
}

impl Tracker {
    fn start(&self, correlation: &str) {
        let now = Instant::now();
        self.workflows.lock().insert(
            correlation.to_string(),
            Workflow {
                started: now,
                stage: Stage::Analysis,
                stage_started: now,
                scheduling_attempt: 0,
                tried: Vec::new(),
                scheduled_by: None,
                outcome: None,
            },
        );
    }

    /// Moves a live workflow from `from` to `to`, recording the stage latency; false if
    /// the workflow is not at `from` (a late or duplicate message).
    fn advance(
        &self,
        correlation: &str,
        from: Stage,
        to: Option<Stage>,
        outcome: Option<Outcome>,
    ) -> bool {
        let mut workflows = self.workflows.lock();
        let Some(workflow) = workflows.get_mut(correlation) else {
            return false;
        };
        if workflow.outcome.is_some() || workflow.stage != from {
            *self.late_results.lock() += 1;
            return false;
        }
        let now = Instant::now();
        self.stage_latencies
            .lock()
            .entry(from)
            .or_default()
            .push(now - workflow.stage_started);
        workflow.stage_started = now;
        if let Some(to) = to {
            workflow.stage = to;
        }
        if let Some(outcome) = outcome {
            workflow.outcome = Some(outcome);
            self.end_to_end.lock().push(now - workflow.started);
            self.finished.notify_waiters();
        }
        true
    }

    fn finished_count(&self) -> usize {
        self.workflows
            .lock()
            .values()
            .filter(|w| w.outcome.is_some())
            .count()
    }
}

fn channel(name: &str) -> ChannelName {
    ChannelName::new(name).expect("the demo's channel names are valid")
}

fn correlation_of(ctx: &Context) -> String {
    ctx.envelope()
        .and_then(|e| e.header.correlation_id.clone())
        .unwrap_or_default()
}

/// The synthetic fleet: which vehicles have issues, decline, or hit a congested
/// scheduler. Deterministic for a seed.
struct Fleet {
    data: Vec<VehicleData>,
    /// The primary scheduler is too slow for these (both tries time out).
    congested: HashSet<String>,
    /// Even the backup scheduler is too slow for these.
    unschedulable: HashSet<String>,
    /// These customers decline.
    declining: HashSet<String>,
}

impl Fleet {
    fn generate(vehicles: usize, seed: u64) -> Fleet {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut data = Vec::new();
        let (mut congested, mut unschedulable, mut declining) =
            (HashSet::new(), HashSet::new(), HashSet::new());
        for i in 0..vehicles {
            let vehicle_id = format!("VEH-{:05}", 12_345 + i);
            let customer_id = format!("CUST-{:03}", i + 1);
            let jitter = |rng: &mut fastrand::Rng, spread: f64| (rng.f64() - 0.5) * spread;
            let mut sensors = Sensors {
                engine_temp_c: 90.0 + jitter(&mut rng, 6.0),
                oil_pressure_kpa: 300.0 + jitter(&mut rng, 40.0),
                brake_pad_mm: 8.0 + jitter(&mut rng, 2.0),
                battery_v: 12.6 + jitter(&mut rng, 0.4),
            };
            if i % 4 != 0 {
                match i % 3 {
                    0 => sensors.brake_pad_mm = 2.0 + jitter(&mut rng, 1.0),
                    1 => sensors.engine_temp_c = 118.0 + jitter(&mut rng, 8.0),
                    _ => sensors.battery_v = 11.4 + jitter(&mut rng, 0.4),
                }
                if i % 7 == 3 {
                    declining.insert(customer_id.clone());
                } else if i % 5 == 1 {
                    congested.insert(vehicle_id.clone());
                    if unschedulable.is_empty() && i > 1 {
                        unschedulable.insert(vehicle_id.clone());
                    }
                }
            }
            data.push(VehicleData {
                vehicle_id,
                customer_id,
                mileage_km: 20_000 + rng.u32(0..120_000),
                sensors,
            });
        }
        Fleet {
            data,
            congested,
            unschedulable,
            declining,
        }
    }
}

fn analyse(sensors: &Sensors) -> Vec<Issue> {
    let mut issues = Vec::new();
    if sensors.brake_pad_mm < 3.0 {
        issues.push(Issue {
            component: "brake_pads".into(),
            severity: if sensors.brake_pad_mm < 2.0 { 4 } else { 3 },
            predicted_failure_days: (sensors.brake_pad_mm * 10.0) as u32,
        });
    }
    if sensors.engine_temp_c > 110.0 {
        issues.push(Issue {
            component: "cooling_system".into(),
            severity: 3,
            predicted_failure_days: 14,
        });
    }
    if sensors.battery_v < 11.8 {
        issues.push(Issue {
            component: "battery".into(),
            severity: 2,
            predicted_failure_days: 30,
        });
    }
    if sensors.oil_pressure_kpa < 150.0 {
        issues.push(Issue {
            component: "oil_pump".into(),
            severity: 4,
            predicted_failure_days: 3,
        });
    }
    issues
}

fn priority_for(issues: &[Issue]) -> Priority {
    match issues.iter().map(|i| i.severity).max() {
        Some(4) => Priority::Critical,
        Some(3) => Priority::High,
        Some(_) => Priority::Normal,
        None => Priority::Low,
    }
}

/// Per-latency figures in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LatencySummary {
    count: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn summarize(samples: &[Duration]) -> LatencySummary {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let pick = |q: f64| -> f64 {
        if ms.is_empty() {
            return 0.0;
        }
        let index = ((ms.len() as f64 - 1.0) * q).round() as usize;
        (ms[index] * 1000.0).round() / 1000.0
    };
    LatencySummary {
        count: ms.len(),
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: pick(1.0),
    }
}

/// The run's summary; `--json` prints it as one object.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VehicleDemoReport {
    pub(crate) backend: String,
    pub(crate) vehicles: usize,
    pub(crate) messages_published: u64,
    pub(crate) messages_delivered: u64,
    pub(crate) messages_acked: u64,
    pub(crate) redeliveries: u64,
    pub(crate) workflows_completed: usize,
    pub(crate) workflows_escalated: usize,
    pub(crate) outcomes: BTreeMap<String, usize>,
    pub(crate) escalations: u64,
    pub(crate) escalation_steps: Escalations,
    pub(crate) dead_letters: u64,
    pub(crate) dead_letter_reasons: BTreeMap<String, u64>,
    pub(crate) dead_letter_details: Vec<DeadLetterLine>,
    pub(crate) late_or_duplicate_results: u64,
    pub(crate) errors_reported: usize,
    pub(crate) manufacturing_insights: Vec<InsightLine>,
    pub(crate) status_responders: Vec<String>,
    pub(crate) channels: Vec<ChannelLine>,
    pub(crate) stage_latency: BTreeMap<String, LatencySummary>,
    pub(crate) end_to_end_latency: LatencySummary,
    pub(crate) duration_ms: u64,
}

/// One dead letter, shortened.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeadLetterLine {
    id: String,
    channel: String,
    kind: String,
    reason: String,
    error: String,
}

/// One channel's traffic.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChannelLine {
    channel: String,
    published: u64,
}

/// One manufacturing insight, shortened.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct InsightLine {
    component: String,
    occurrences: u32,
    average_rating: f64,
    recommendation: String,
}

/// Runs the demo on `bus` and returns its report.
pub(crate) async fn run(
    bus: Bus,
    options: &VehicleDemoOptions,
) -> anyhow::Result<VehicleDemoReport> {
    let started = Instant::now();
    let fleet = Arc::new(Fleet::generate(options.vehicles, options.seed));
    let tracker = Arc::new(Tracker::default());
    let mut agents = Vec::new();

    agents.push(orchestrator(&bus, tracker.clone(), options.scheduling_timeout).await?);
    for instance in 1..=2 {
        agents.push(data_analysis(&bus, instance).await?);
    }
    agents.push(customer_engagement(&bus, fleet.clone()).await?);
    agents.push(
        scheduler(
            &bus,
            "scheduler",
            SCHEDULING_REQUEST,
            fleet.congested.clone(),
            options.scheduling_timeout,
        )
        .await?,
    );
    agents.push(
        scheduler(
            &bus,
            "backup_scheduler",
            SCHEDULING_BACKUP_REQUEST,
            fleet.unschedulable.clone(),
            options.scheduling_timeout,
        )
        .await?,
    );
    agents.push(customer_simulator(&bus).await?);
    agents.push(manufacturing(&bus).await?);
    agents.push(operator_desk(&bus).await?);

    // The external system: one malformed record (it does not use agentbus's typed API,
    // so nothing stops it at the sender), then the fleet's data.
    let mut bad = Envelope::new(
        channel(VEHICLE_DATA_INPUT),
        VehicleData::KIND,
        &br#"{"vehicle_id": 42, "sensors": "unreadable"}"#[..],
    );
    bad.header.sender = Some("external_system".into());
    bus.transport().publish(bad).await?;
    for vehicle in &fleet.data {
        let correlation = format!("wf-{}", vehicle.vehicle_id);
        let options = PublishOptions::new()
            .sender("external_system")
            .correlation(correlation);
        bus.publish_with(&channel(VEHICLE_DATA_INPUT), vehicle, &options)
            .await?;
    }

    let deadline = tokio::time::Instant::now() + options.run_timeout;
    loop {
        let notified = tracker.finished.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if tracker.finished_count() >= options.vehicles {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            let stuck: Vec<String> = tracker
                .workflows
                .lock()
                .iter()
                .filter(|(_, w)| w.outcome.is_none())
                .map(|(id, w)| {
                    format!(
                        "{id} at {:?} (scheduling attempt {})",
                        w.stage, w.scheduling_attempt
                    )
                })
                .collect();
            anyhow::bail!(
                "only {} of {} workflows finished within {:?}; unfinished: {}",
                tracker.finished_count(),
                options.vehicles,
                options.run_timeout,
                stuck.join(", ")
            );
        }
    }

    // Closing round: ask every worker for its status (scatter-gather); the
    // manufacturing system publishes its remaining insights before answering.
    let desk = Context::new(
        bus.clone(),
        AgentDescriptor::new("demo_driver", "demo_driver").sends::<Command>(),
    );
    let status = desk
        .gather::<Command, StatusReport>(
            &channel(ORCHESTRATOR_COMMAND),
            &Command {
                command: "status".into(),
            },
            &GatherSpec::new(Duration::from_secs(2)).max_replies(6),
        )
        .await?;
    // Give the orchestrator a moment to record the flushed insights it was sent.
    let insight_deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tracker.insights.lock().is_empty() && tokio::time::Instant::now() < insight_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for agent in agents {
        agent.shutdown(Duration::from_secs(3)).await;
    }

    let stats = bus.transport().stats().await?;
    let dead = bus
        .transport()
        .dead_letters(DeadLetterFilter::default())
        .await?;
    let mut dead_letter_reasons = BTreeMap::new();
    for letter in &dead {
        *dead_letter_reasons
            .entry(letter.reason.to_string())
            .or_insert(0u64) += 1;
    }
    let mut outcomes = BTreeMap::new();
    for workflow in tracker.workflows.lock().values() {
        if let Some(outcome) = workflow.outcome {
            let name = serde_json::to_value(outcome)?
                .as_str()
                .unwrap_or("unknown")
                .to_string();
            *outcomes.entry(name).or_insert(0usize) += 1;
        }
    }
    let escalated = outcomes.get("escalated").copied().unwrap_or(0);
    let escalations = *tracker.escalations.lock();
    let user_channels = stats.channels.iter().filter(|c| !c.channel.is_system());
    let mut channels: Vec<ChannelLine> = user_channels
        .map(|c| ChannelLine {
            channel: c.channel.to_string(),
            published: c.published,
        })
        .collect();
    channels.sort_by(|a, b| a.channel.cmp(&b.channel));
    let stage_latency = tracker
        .stage_latencies
        .lock()
        .iter()
        .map(|(stage, samples)| {
            let name = serde_json::to_value(stage)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            (name, summarize(samples))
        })
        .collect();
    let report = VehicleDemoReport {
        backend: bus.transport().name().to_string(),
        vehicles: options.vehicles,
        messages_published: stats.channels.iter().map(|c| c.published).sum(),
        messages_delivered: stats.groups.iter().map(|g| g.delivered).sum(),
        messages_acked: stats.groups.iter().map(|g| g.acked).sum(),
        redeliveries: stats.groups.iter().map(|g| g.redelivered).sum(),
        workflows_completed: tracker.finished_count() - escalated,
        workflows_escalated: escalated,
        outcomes,
        escalations: escalations.retry_same_agent
            + escalations.backup_agent
            + escalations.manual_intervention,
        escalation_steps: escalations,
        dead_letters: dead.len() as u64,
        dead_letter_reasons,
        dead_letter_details: dead
            .iter()
            .map(|letter| DeadLetterLine {
                id: letter.id.to_string(),
                channel: letter.envelope.channel.to_string(),
                kind: letter.envelope.header.kind.to_string(),
                reason: letter.reason.to_string(),
                error: letter.last_error.clone().unwrap_or_default(),
            })
            .collect(),
        late_or_duplicate_results: *tracker.late_results.lock(),
        errors_reported: tracker.errors_reported.lock().len(),
        manufacturing_insights: tracker
            .insights
            .lock()
            .iter()
            .map(|i| InsightLine {
                component: i.component.clone(),
                occurrences: i.occurrences,
                average_rating: i.average_rating,
                recommendation: i.recommendation.clone(),
            })
            .collect(),
        status_responders: status.responders,
        channels,
        stage_latency,
        end_to_end_latency: summarize(&tracker.end_to_end.lock()),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    Ok(report)
}

/// Renders the report for a person.
pub(crate) fn render(report: &VehicleDemoReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agentbus demo vehicle — seed 000's predictive-maintenance system on the {} engine",
        report.backend
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{} vehicles → {} workflows finished without a person, \
         {} escalated to manual handling ({} ms)",
        report.vehicles, report.workflows_completed, report.workflows_escalated, report.duration_ms
    );
    for (outcome, count) in &report.outcomes {
        let _ = writeln!(out, "  {outcome:<12} {count:>4}");
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "messages: {} published, {} delivered, {} acked, {} redelivered",
        report.messages_published,
        report.messages_delivered,
        report.messages_acked,
        report.redeliveries
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<40} {:>9}", "channel", "published");
    for line in &report.channels {
        let _ = writeln!(out, "{:<40} {:>9}", line.channel, line.published);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<12} {:>6} {:>10} {:>10} {:>10}",
        "stage", "count", "p50 ms", "p99 ms", "max ms"
    );
    for (stage, l) in &report.stage_latency {
        let _ = writeln!(
            out,
            "{stage:<12} {:>6} {:>10.3} {:>10.3} {:>10.3}",
            l.count, l.p50_ms, l.p99_ms, l.max_ms
        );
    }
    let e = &report.end_to_end_latency;
    let _ = writeln!(
        out,
        "{:<12} {:>6} {:>10.3} {:>10.3} {:>10.3}",
        "end to end", e.count, e.p50_ms, e.p99_ms, e.max_ms
    );
    let _ = writeln!(out);
    let s = &report.escalation_steps;
    let _ = writeln!(
        out,
        "escalations: {} (retry same agent {}, backup agent {}, manual intervention {})",
        report.escalations, s.retry_same_agent, s.backup_agent, s.manual_intervention
    );
    let reasons: Vec<String> = report
        .dead_letter_reasons
        .iter()
        .map(|(reason, count)| format!("{reason} {count}"))
        .collect();
    let _ = writeln!(
        out,
        "dead letters: {} ({})",
        report.dead_letters,
        reasons.join(", ")
    );
    for letter in &report.dead_letter_details {
        let _ = writeln!(
            out,
            "  [{}] {} ({}): {}",
            letter.reason, letter.channel, letter.kind, letter.error
        );
    }
    let _ = writeln!(
        out,
        "errors reported on channel.system.error: {}",
        report.errors_reported
    );
    let _ = writeln!(
        out,
        "late or duplicate results ignored: {}",
        report.late_or_duplicate_results
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "manufacturing insights:");
    for insight in &report.manufacturing_insights {
        let _ = writeln!(
            out,
            "  {:<16} {:>3} reports, avg rating {:.1}: {}",
            insight.component, insight.occurrences, insight.average_rating, insight.recommendation
        );
    }
    let _ = writeln!(
        out,
        "status round answered by: {}",
        report.status_responders.join(", ")
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "(on a durable backend, `agentbus dlq list --backend …` shows them; replay with `agentbus dlq replay ID`)"
    );
    out
}

async fn orchestrator(
    bus: &Bus,
    tracker: Arc<Tracker>,
    scheduling_timeout: Duration,
) -> anyhow::Result<Agent> {
    let descriptor = AgentDescriptor::new("master_orchestrator", "master_orchestrator")
        .capability("orchestration")
        .sends::<AnalysisRequest>()
        .sends::<CustomerEngagement>()
        .sends::<SchedulingRequest>()
        .sends::<FeedbackProcessed>()
        .sends::<TimeoutEscalation>();
    let wide = HandlerOptions::default().concurrency(8).prefetch(64);
    let t = tracker.clone();
    let on_vehicle = move |ctx: Context, data: VehicleData| {
        let t = t.clone();
        async move {
            let correlation = correlation_of(&ctx);
            t.start(&correlation);
            let request = AnalysisRequest {
                vehicle_id: data.vehicle_id,
                customer_id: data.customer_id,
                mileage_km: data.mileage_km,
                sensors: data.sensors,
            };
            ctx.send(&channel(DATA_ANALYSIS_REQUEST), &request).await?;
            Ok(())
        }
    };
    let t = tracker.clone();
    let on_analysis = move |ctx: Context, result: AnalysisResult| {
        let t = t.clone();
        async move {
            let correlation = correlation_of(&ctx);
            if result.issues.is_empty() {
                t.advance(&correlation, Stage::Analysis, None, Some(Outcome::NoIssues));
                return Ok(());
            }
            if !t.advance(&correlation, Stage::Analysis, Some(Stage::Engagement), None) {
                return Ok(());
            }
            let components: Vec<String> =
                result.issues.iter().map(|i| i.component.clone()).collect();
            let soonest = result
                .issues
                .iter()
                .map(|i| i.predicted_failure_days)
                .min()
                .unwrap_or(0);
            let engagement = CustomerEngagement {
                vehicle_id: result.vehicle_id.clone(),
                customer_id: result.customer_id,
                message: format!(
                    "Your vehicle {} needs attention ({}), predicted failure within {soonest} days.",
                    result.vehicle_id,
                    components.join(", ")
                ),
                contact_channel: if soonest < 7 { "phone".into() } else { "sms".into() },
                components,
            };
            let options = PublishOptions::new().priority(priority_for(&result.issues));
            ctx.send_with(&channel(CUSTOMER_ENGAGEMENT_REQUEST), &engagement, options)
                .await?;
            Ok(())
        }
    };
    let t = tracker.clone();
    let on_engagement = move |ctx: Context, answer: EngagementResult| {
        let t = t.clone();
        async move {
            let correlation = correlation_of(&ctx);
            if !answer.accepted {
                t.advance(
                    &correlation,
                    Stage::Engagement,
                    None,
                    Some(Outcome::Declined),
                );
                return Ok(());
            }
            if !t.advance(
                &correlation,
                Stage::Engagement,
                Some(Stage::Scheduling),
                None,
            ) {
                return Ok(());
            }
            let request = SchedulingRequest {
                vehicle_id: answer.vehicle_id,
                customer_id: answer.customer_id,
                components: answer.components,
                preferred_day: answer.preferred_day,
                attempt: 1,
            };
            send_scheduling(ctx, t, correlation, request, scheduling_timeout).await?;
            Ok(())
        }
    };
    let t = tracker.clone();
    let on_scheduled = move |ctx: Context, result: SchedulingResult| {
        let t = t.clone();
        async move {
            let correlation = correlation_of(&ctx);
            if t.advance(&correlation, Stage::Scheduling, Some(Stage::Feedback), None) {
                if let Some(w) = t.workflows.lock().get_mut(&correlation) {
                    w.scheduled_by = Some(result.scheduled_by);
                }
            }
            Ok(())
        }
    };
    let t = tracker.clone();
    let on_feedback = move |ctx: Context, feedback: Feedback| {
        let t = t.clone();
        async move {
            let correlation = correlation_of(&ctx);
            // The customer hears about the appointment on the same result channel as
            // the orchestrator, so feedback can overtake the orchestrator's own
            // bookkeeping. Not an error: nack it and let redelivery bring it back.
            let overtook = t
                .workflows
                .lock()
                .get(&correlation)
                .is_some_and(|w| w.outcome.is_none() && w.stage == Stage::Scheduling);
            if overtook {
                return Err(
                    "feedback arrived before the scheduling result was recorded; retrying".into(),
                );
            }
            if !t.advance(&correlation, Stage::Feedback, None, Some(Outcome::Serviced)) {
                return Ok(());
            }
            let sentiment = match feedback.rating {
                0..=2 => "negative",
                3 => "neutral",
                _ => "positive",
            };
            let processed = FeedbackProcessed {
                vehicle_id: feedback.vehicle_id,
                rating: feedback.rating,
                sentiment: sentiment.into(),
                components: feedback.components,
            };
            let options = PublishOptions::new().priority(Priority::Low);
            ctx.send_with(&channel(FEEDBACK_PROCESSED), &processed, options)
                .await?;
            Ok(())
        }
    };
    let t = tracker.clone();
    let on_insight = move |_ctx: Context, insight: ManufacturingInsight| {
        let t = t.clone();
        async move {
            t.insights.lock().push(insight);
            Ok(())
        }
    };
    let t = tracker.clone();
    let on_error = move |_ctx: Context, error: ErrorReport| {
        let t = t.clone();
        async move {
            t.errors_reported
                .lock()
                .push(format!("{}: {}", error.code, error.message));
            Ok(())
        }
    };
    let on_timeout = |_ctx: Context, escalation: TimeoutEscalation| async move {
        tracing::info!(vehicle = %escalation.vehicle_id, stage = %escalation.stage, "timeout escalated to manual handling");
        Ok(())
    };
    let agent = Agent::builder(descriptor)
        .handle_with(VEHICLE_DATA_INPUT, wide.clone(), on_vehicle)
        .handle_with(DATA_ANALYSIS_RESULT, wide.clone(), on_analysis)
        .handle_with(CUSTOMER_ENGAGEMENT_RESULT, wide.clone(), on_engagement)
        .handle_with(SCHEDULING_RESULT, wide.clone(), on_scheduled)
        .handle_with(FEEDBACK_INPUT, wide.clone().max_deliveries(20), on_feedback)
        .handle_with(MANUFACTURING_INSIGHTS, wide.clone(), on_insight)
        .handle_with(SYSTEM_ERROR, wide.clone(), on_error)
        .handle_with(SYSTEM_TIMEOUT, wide, on_timeout)
        .spawn(bus)
        .await
        .context("starting the orchestrator")?;
    Ok(agent)
}

/// Sends a scheduling request and arms its timeout: attempt 1 goes to the scheduler,
/// attempt 2 retries it, attempt 3 goes to the backup, and a third timeout hands the
/// case to a person on `channel.system.timeout`.
fn send_scheduling(
    ctx: Context,
    tracker: Arc<Tracker>,
    correlation: String,
    request: SchedulingRequest,
    timeout: Duration,
) -> futures::future::BoxFuture<'static, agentbus::Result<()>> {
    Box::pin(async move {
        let (target, agent) = if request.attempt <= 2 {
            (SCHEDULING_REQUEST, "scheduler")
        } else {
            (SCHEDULING_BACKUP_REQUEST, "backup_scheduler")
        };
        {
            let mut workflows = tracker.workflows.lock();
            if let Some(w) = workflows.get_mut(&correlation) {
                w.scheduling_attempt = request.attempt;
                w.tried.push(agent.to_string());
            }
        }
        // The request lives only as long as we wait for it: a scheduler that picks it
        // up later drops it instead of booking twice.
        let options = PublishOptions::new().priority(Priority::High).ttl(timeout);
        ctx.send_with(&channel(target), &request, options).await?;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let (still_waiting, tried) = {
                let workflows = tracker.workflows.lock();
                match workflows.get(&correlation) {
                    Some(w) => (
                        w.outcome.is_none()
                            && w.stage == Stage::Scheduling
                            && w.scheduling_attempt == request.attempt,
                        w.tried.clone(),
                    ),
                    None => (false, Vec::new()),
                }
            };
            if !still_waiting {
                return;
            }
            let mut next = request.clone();
            next.attempt += 1;
            let result = match request.attempt {
                1 => {
                    tracker.escalations.lock().retry_same_agent += 1;
                    send_scheduling(ctx, tracker.clone(), correlation, next, timeout).await
                }
                2 => {
                    tracker.escalations.lock().backup_agent += 1;
                    send_scheduling(ctx, tracker.clone(), correlation, next, timeout).await
                }
                _ => {
                    tracker.escalations.lock().manual_intervention += 1;
                    tracker.advance(
                        &correlation,
                        Stage::Scheduling,
                        None,
                        Some(Outcome::Escalated),
                    );
                    let escalation = TimeoutEscalation {
                        vehicle_id: request.vehicle_id.clone(),
                        stage: "scheduling".into(),
                        attempts: request.attempt,
                        tried,
                        action: "manual intervention required".into(),
                    };
                    let options = PublishOptions::new().priority(Priority::Critical);
                    ctx.send_with(&channel(SYSTEM_TIMEOUT), &escalation, options)
                        .await
                        .map(drop)
                }
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "escalation failed");
            }
        });
        Ok(())
    })
}

/// A worker also listens on the orchestrator's command channel and the error channel,
/// as the seed's subscription rules say; the status command is answered with a count.
fn with_worker_rules(
    builder: agentbus::AgentBuilder,
    handled: Arc<std::sync::atomic::AtomicU64>,
) -> agentbus::AgentBuilder {
    builder
        .handle(
            ORCHESTRATOR_COMMAND,
            move |ctx: Context, command: Command| {
                let handled = handled.clone();
                async move {
                    if command.command == "status" {
                        let report = StatusReport {
                            agent: ctx.agent().id.clone(),
                            handled: handled.load(std::sync::atomic::Ordering::Relaxed),
                        };
                        ctx.reply(&report).await?;
                    }
                    Ok(())
                }
            },
        )
        .handle(
            SYSTEM_ERROR,
            |_ctx: Context, error: ErrorReport| async move {
                tracing::debug!(code = %error.code, "worker saw a system error");
                Ok(())
            },
        )
}

async fn data_analysis(bus: &Bus, instance: usize) -> anyhow::Result<Agent> {
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let descriptor = AgentDescriptor::new(format!("data_analysis-{instance}"), "data_analysis")
        .capability("analysis")
        .sends::<AnalysisResult>()
        .sends::<ErrorReport>()
        .sends::<StatusReport>();
    let h = handled.clone();
    let builder = Agent::builder(descriptor).handle_with(
        DATA_ANALYSIS_REQUEST,
        HandlerOptions::default().concurrency(4),
        move |ctx: Context, request: AnalysisRequest| {
            let h = h.clone();
            async move {
                h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let issues = analyse(&request.sensors);
                if issues.iter().any(|i| i.severity == 4) {
                    let report = ErrorReport {
                        code: "SAFETY_CRITICAL".into(),
                        message: format!("{} has a safety-critical prediction", request.vehicle_id),
                        source_agent: ctx.agent().id.clone(),
                        vehicle_id: Some(request.vehicle_id.clone()),
                    };
                    ctx.send(&channel(SYSTEM_ERROR), &report).await?;
                }
                let risk = issues
                    .iter()
                    .map(|i| f64::from(i.severity) / 4.0)
                    .fold(0.0, f64::max);
                let result = AnalysisResult {
                    vehicle_id: request.vehicle_id,
                    customer_id: request.customer_id,
                    risk_score: risk,
                    analysed_by: ctx.agent().id.clone(),
                    issues: issues.clone(),
                };
                let options = PublishOptions::new().priority(priority_for(&issues));
                ctx.send_with(&channel(DATA_ANALYSIS_RESULT), &result, options)
                    .await?;
                Ok(())
            }
        },
    );
    Ok(with_worker_rules(builder, handled).spawn(bus).await?)
}

async fn customer_engagement(bus: &Bus, fleet: Arc<Fleet>) -> anyhow::Result<Agent> {
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let descriptor = AgentDescriptor::new("customer_engagement-1", "customer_engagement")
        .capability("engagement")
        .sends::<EngagementResult>()
        .sends::<StatusReport>();
    let h = handled.clone();
    let builder = Agent::builder(descriptor).handle_with(
        CUSTOMER_ENGAGEMENT_REQUEST,
        HandlerOptions::default().concurrency(4),
        move |ctx: Context, request: CustomerEngagement| {
            let (h, fleet) = (h.clone(), fleet.clone());
            async move {
                h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let answer = EngagementResult {
                    accepted: !fleet.declining.contains(&request.customer_id),
                    vehicle_id: request.vehicle_id,
                    customer_id: request.customer_id,
                    preferred_day: "next-monday".into(),
                    components: request.components,
                };
                ctx.send(&channel(CUSTOMER_ENGAGEMENT_RESULT), &answer)
                    .await?;
                Ok(())
            }
        },
    );
    Ok(with_worker_rules(builder, handled).spawn(bus).await?)
}

async fn scheduler(
    bus: &Bus,
    name: &str,
    input: &str,
    too_slow_for: HashSet<String>,
    orchestrator_timeout: Duration,
) -> anyhow::Result<Agent> {
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let descriptor = AgentDescriptor::new(format!("{name}-1"), name)
        .capability("scheduling")
        .sends::<SchedulingResult>()
        .sends::<StatusReport>();
    let too_slow_for = Arc::new(too_slow_for);
    let h = handled.clone();
    let service_center = if name == "scheduler" {
        "SC-NORTH"
    } else {
        "SC-BACKUP"
    };
    let builder = Agent::builder(descriptor).handle_with(
        input,
        HandlerOptions::default().concurrency(8).prefetch(32),
        move |ctx: Context, request: SchedulingRequest| {
            let (h, too_slow_for) = (h.clone(), too_slow_for.clone());
            async move {
                h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // The deliberately slow path: a congested calendar.
                let work = if too_slow_for.contains(&request.vehicle_id) {
                    orchestrator_timeout * 3
                } else {
                    Duration::from_millis(5)
                };
                tokio::time::sleep(work).await;
                let deadline = ctx.envelope().and_then(|e| e.header.deadline);
                if deadline.is_some_and(|d| d <= ctx.bus().clock().now()) {
                    tracing::debug!(vehicle = %request.vehicle_id, "request expired while working; not booking");
                    return Ok(());
                }
                let result = SchedulingResult {
                    appointment_id: format!("APT-{}-{}", request.vehicle_id, request.attempt),
                    service_center: service_center.into(),
                    slot: format!("{} 09:00", request.preferred_day),
                    scheduled_by: ctx.agent().id.clone(),
                    vehicle_id: request.vehicle_id,
                    customer_id: request.customer_id,
                    components: request.components,
                };
                ctx.send(&channel(SCHEDULING_RESULT), &result).await?;
                Ok(())
            }
        },
    );
    Ok(with_worker_rules(builder, handled).spawn(bus).await?)
}

/// The external world after a service visit: the customer rates it.
async fn customer_simulator(bus: &Bus) -> anyhow::Result<Agent> {
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let descriptor = AgentDescriptor::new("customer_simulator-1", "customer_simulator")
        .sends::<Feedback>()
        .sends::<StatusReport>();
    let h = handled.clone();
    let builder = Agent::builder(descriptor).handle_with(
        SCHEDULING_RESULT,
        HandlerOptions::default().concurrency(4),
        move |ctx: Context, result: SchedulingResult| {
            let h = h.clone();
            async move {
                let n = h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let rating = [5u8, 4, 2, 5, 3][(n % 5) as usize];
                let feedback = Feedback {
                    vehicle_id: result.vehicle_id,
                    customer_id: result.customer_id,
                    rating,
                    comment: format!("serviced at {}", result.service_center),
                    components: result.components,
                };
                let options = PublishOptions::new().priority(Priority::Low);
                ctx.send_with(&channel(FEEDBACK_INPUT), &feedback, options)
                    .await?;
                Ok(())
            }
        },
    );
    Ok(with_worker_rules(builder, handled).spawn(bus).await?)
}

#[derive(Default)]
struct ComponentStats {
    ratings: Vec<u8>,
    vehicles: Vec<String>,
    reported: usize,
}

/// Aggregates processed feedback per component; publishes an insight every third
/// report of a component, and the rest when asked for its status.
async fn manufacturing(bus: &Bus) -> anyhow::Result<Agent> {
    let descriptor = AgentDescriptor::new("manufacturing_system-1", "manufacturing_system")
        .capability("manufacturing")
        .sends::<ManufacturingInsight>()
        .sends::<StatusReport>();
    let components: Arc<Mutex<BTreeMap<String, ComponentStats>>> = Arc::default();
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (c, h) = (components.clone(), handled.clone());
    let on_processed = move |ctx: Context, processed: FeedbackProcessed| {
        let (c, h) = (c.clone(), h.clone());
        async move {
            h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let due: Vec<ManufacturingInsight> = {
                let mut components = c.lock();
                let mut due = Vec::new();
                for component in &processed.components {
                    let stats = components.entry(component.clone()).or_default();
                    stats.ratings.push(processed.rating);
                    stats.vehicles.push(processed.vehicle_id.clone());
                    if stats.ratings.len() % 3 == 0 {
                        stats.reported = stats.ratings.len();
                        due.push(insight(component, stats));
                    }
                }
                due
            };
            for insight in due {
                ctx.send(&channel(MANUFACTURING_INSIGHTS), &insight).await?;
            }
            Ok(())
        }
    };
    let (c, h) = (components.clone(), handled.clone());
    let on_command = move |ctx: Context, command: Command| {
        let (c, h) = (c.clone(), h.clone());
        async move {
            if command.command != "status" {
                return Ok(());
            }
            let due: Vec<ManufacturingInsight> = c
                .lock()
                .iter_mut()
                .filter(|(_, s)| s.ratings.len() > s.reported)
                .map(|(component, s)| {
                    s.reported = s.ratings.len();
                    insight(component, s)
                })
                .collect();
            for insight in due {
                ctx.send(&channel(MANUFACTURING_INSIGHTS), &insight).await?;
            }
            let report = StatusReport {
                agent: ctx.agent().id.clone(),
                handled: h.load(std::sync::atomic::Ordering::Relaxed),
            };
            ctx.reply(&report).await?;
            Ok(())
        }
    };
    let agent = Agent::builder(descriptor)
        .handle(FEEDBACK_PROCESSED, on_processed)
        .handle(ORCHESTRATOR_COMMAND, on_command)
        .spawn(bus)
        .await?;
    Ok(agent)
}

fn insight(component: &str, stats: &ComponentStats) -> ManufacturingInsight {
    let average =
        stats.ratings.iter().map(|r| f64::from(*r)).sum::<f64>() / stats.ratings.len() as f64;
    let recommendation = if average < 3.5 {
        format!("review {component} supplier quality; customers are unhappy after repairs")
    } else {
        format!("{component} wear is predictable; adjust the service interval")
    };
    ManufacturingInsight {
        component: component.to_string(),
        occurrences: stats.ratings.len() as u32,
        average_rating: (average * 10.0).round() / 10.0,
        recommendation,
        affected_vehicles: stats.vehicles.clone(),
    }
}

/// A person's queue: every timeout escalation is parked in dead letters, where an
/// operator can inspect and replay it (`agentbus dlq`).
async fn operator_desk(bus: &Bus) -> anyhow::Result<Agent> {
    let descriptor = AgentDescriptor::new("operator_desk-1", "operator_desk");
    let agent = Agent::builder(descriptor)
        .handle(
            SYSTEM_TIMEOUT,
            |_ctx: Context, escalation: TimeoutEscalation| async move {
                let why = format!(
                    "manual intervention required: {} for {} timed out at {}",
                    escalation.stage,
                    escalation.vehicle_id,
                    escalation.tried.join(" → ")
                );
                HandlerResult::Err(Box::new(Reject::new(why)))
            },
        )
        .spawn(bus)
        .await?;
    Ok(agent)
}
