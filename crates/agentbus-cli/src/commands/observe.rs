//! Observability from the command line: `agentbus trace`, `agentbus log`, `agentbus
//! stats --store …`, and the `--metrics` / `--store` / `--audit` options long-running
//! commands share ([`ObserveArgs`]).
//!
//! `trace`, `log` and the store part of `stats` read the SQLite interaction store a
//! bus wrote with `--store PATH` (any process, any backend): the store is a file, so a
//! later command can read what an earlier one recorded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentbus::{Bus, MetricsObserver, Transport};
use agentbus_observe::audit::{AuditConfig, AuditSink};
use agentbus_observe::otlp::{OtlpConfig, OtlpExporter};
use agentbus_observe::store::{Interaction, InteractionStore, Query, TimelineStep, WorkflowStatus};
use agentbus_observe::ueba::{UebaConfig, UebaDetector};
use agentbus_observe::{EngineGauges, PrometheusEndpoint};
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::{output, CliError, Global};

/// Where `trace`, `log` and `stats` look for the interaction store by default.
pub(crate) const DEFAULT_STORE: &str = "agentbus-interactions.db";

/// `--metrics`, `--store` and `--audit` for commands that host a bus.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct ObserveArgs {
    /// Serve Prometheus metrics on ADDR (e.g. 127.0.0.1:9464) at /metrics while the
    /// command runs.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Keep serving /metrics this long after the work is done, so a scraper can read
    /// the final numbers.
    #[arg(long, value_name = "D", value_parser = super::parse_duration)]
    pub(crate) metrics_hold: Option<Duration>,
    /// Record every message in the SQLite interaction store at PATH (read it with
    /// `agentbus trace` and `agentbus log`).
    #[arg(long, value_name = "PATH")]
    pub(crate) store: Option<PathBuf>,
    /// Write JSON Lines audit files (one per category and UTC day) into DIR.
    #[arg(long, value_name = "DIR")]
    pub(crate) audit: Option<PathBuf>,
    /// Export a span per message to an OpenTelemetry collector over OTLP/HTTP, e.g.
    /// http://127.0.0.1:4318.
    #[arg(long, value_name = "URL")]
    pub(crate) otlp: Option<String>,
    /// Learn each agent's baseline (kinds, peers, rate) for D from its first message,
    /// then publish deviations on _sys.security.anomaly (and count them in metrics).
    #[arg(long, value_name = "D", value_parser = super::parse_positive_duration)]
    pub(crate) ueba_learn: Option<Duration>,
}

/// What [`ObserveArgs::bus`] started; [`Observing::finish`] flushes and holds it.
#[derive(Debug, Default)]
pub(crate) struct Observing {
    endpoint: Option<PrometheusEndpoint>,
    gauges: Option<EngineGauges>,
    transport: Option<Arc<dyn Transport>>,
    store: Option<Arc<InteractionStore>>,
    audit: Option<Arc<AuditSink>>,
    otlp: Option<Arc<OtlpExporter>>,
    ueba: Option<(Arc<UebaDetector>, tokio::task::JoinHandle<()>)>,
    hold: Option<Duration>,
}

impl ObserveArgs {
    /// A bus on `transport` with the observers these options ask for.
    ///
    /// # Errors
    /// Exit 1 when the metrics address cannot be bound or the store / audit directory
    /// cannot be opened.
    pub(crate) async fn bus(
        &self,
        transport: Arc<dyn Transport>,
    ) -> anyhow::Result<(Bus, Observing)> {
        self.bus_with(transport, Vec::new()).await
    }

    /// Like [`ObserveArgs::bus`], with `extra` observers of the command's own.
    ///
    /// # Errors
    /// As [`ObserveArgs::bus`].
    pub(crate) async fn bus_with(
        &self,
        transport: Arc<dyn Transport>,
        extra: Vec<Arc<dyn agentbus::BusObserver>>,
    ) -> anyhow::Result<(Bus, Observing)> {
        let mut builder = Bus::builder(transport.clone());
        for observer in extra {
            builder = builder.observer(observer);
        }
        let mut observing = Observing {
            hold: self.metrics_hold,
            ..Observing::default()
        };
        if let Some(addr) = self.metrics {
            let endpoint = PrometheusEndpoint::start(addr).await?;
            eprintln!(
                "serving Prometheus metrics on http://{}/metrics",
                endpoint.addr()
            );
            builder = builder.observer(Arc::new(MetricsObserver));
            observing.gauges = Some(EngineGauges::start(
                transport.clone(),
                Duration::from_secs(1),
            ));
            observing.endpoint = Some(endpoint);
            observing.transport = Some(transport);
        }
        if let Some(path) = &self.store {
            let store = Arc::new(InteractionStore::open(path)?);
            builder = builder.observer(store.clone());
            observing.store = Some(store);
        }
        if let Some(dir) = &self.audit {
            let audit = Arc::new(AuditSink::start(AuditConfig::new(dir))?);
            builder = builder.observer(audit.clone());
            observing.audit = Some(audit);
        }
        if let Some(endpoint) = &self.otlp {
            let exporter = Arc::new(OtlpExporter::start(OtlpConfig::new(endpoint.clone()))?);
            builder = builder.observer(exporter.clone());
            observing.otlp = Some(exporter);
        }
        let detector = self.ueba_learn.map(|learn_for| {
            UebaDetector::new(UebaConfig {
                learn_for,
                bucket: (learn_for / 6).clamp(Duration::from_millis(100), Duration::from_secs(10)),
                ..UebaConfig::default()
            })
        });
        if let Some(detector) = &detector {
            builder = builder.observer(detector.clone());
        }
        let bus = builder.build();
        if let Some(detector) = detector {
            if let Some(task) = detector.start_publisher(&bus) {
                observing.ueba = Some((detector, task));
            }
        }
        Ok((bus, observing))
    }
}

impl Observing {
    /// Writes out what the store and the audit sink hold, updates the engine gauges,
    /// and keeps /metrics up for the hold time. Problems are reported on stderr: the
    /// command's own result stands.
    pub(crate) async fn finish(self) {
        if let Some(store) = &self.store {
            let result = store.flush();
            let stats = store.stats();
            if let Err(e) = result {
                eprintln!("warning: interaction store: {e}");
            }
            if stats.dropped > 0 || stats.write_errors > 0 {
                eprintln!(
                    "warning: interaction store at {} lost {} rows ({} dropped: the writer fell behind; {} write errors)",
                    store.path().display(),
                    stats.dropped + stats.write_errors,
                    stats.dropped,
                    stats.write_errors
                );
            }
        }
        if let Some(audit) = &self.audit {
            if let Err(e) = audit.flush() {
                eprintln!("warning: audit: {e}");
            }
            let stats = audit.stats();
            if stats.dropped > 0 {
                eprintln!(
                    "warning: the audit sink dropped {} records (it fell behind)",
                    stats.dropped
                );
            }
        }
        if let Some((detector, task)) = &self.ueba {
            let (detected, dropped) = detector.counts();
            if detected > 0 {
                eprintln!(
                    "UEBA: {detected} anomalies published on {} ({dropped} not published: the publisher was behind)",
                    agentbus_observe::ueba::ANOMALY_CHANNEL
                );
            }
            task.abort();
        }
        if let Some(otlp) = &self.otlp {
            if let Err(e) = otlp.flush().await {
                eprintln!("warning: OTLP export: {e}");
            }
            let (_, dropped, failed) = otlp.counts();
            if dropped + failed > 0 {
                eprintln!("warning: OTLP export lost {} spans ({dropped} dropped, {failed} not accepted by the collector)", dropped + failed);
            }
        }
        if let (Some(endpoint), Some(transport)) = (&self.endpoint, &self.transport) {
            let _ = agentbus_observe::prometheus::poll_once(transport.as_ref()).await;
            if let Some(hold) = self.hold.filter(|h| !h.is_zero()) {
                eprintln!(
                    "holding http://{}/metrics for {} (Ctrl-C to stop)",
                    endpoint.addr(),
                    humantime::format_duration(hold)
                );
                tokio::select! {
                    _ = tokio::time::sleep(hold) => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
        }
    }
}

/// `agentbus trace <CORRELATION>`.
#[derive(Debug, clap::Args)]
pub(crate) struct TraceArgs {
    /// The correlation (thread / workflow) id.
    #[arg(value_name = "CORRELATION")]
    correlation: String,
    /// The interaction store a bus wrote with `--store`.
    #[arg(long, value_name = "PATH", env = "AGENTBUS_STORE", default_value = DEFAULT_STORE)]
    store: PathBuf,
}

/// `agentbus log`.
#[derive(Debug, clap::Args)]
pub(crate) struct LogArgs {
    /// Only messages this agent sent, received or handled.
    #[arg(long, value_name = "A")]
    agent: Option<String>,
    /// Only the last D (e.g. 10m, 2h).
    #[arg(long, value_name = "D", value_parser = super::parse_positive_duration)]
    since: Option<Duration>,
    /// Only this kind.
    #[arg(long, value_name = "K")]
    kind: Option<String>,
    /// Only this thread.
    #[arg(long, value_name = "C")]
    correlation: Option<String>,
    /// Every event (delivered, acked, …), not only one line per published message.
    #[arg(long)]
    events: bool,
    /// At most N lines, the newest.
    #[arg(long, value_name = "N", default_value_t = 200)]
    limit: usize,
    /// The interaction store a bus wrote with `--store`.
    #[arg(long, value_name = "PATH", env = "AGENTBUS_STORE", default_value = DEFAULT_STORE)]
    store: PathBuf,
}

/// `agentbus stats`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatsArgs {
    /// Also read this interaction store: the message log and, with --correlation, a
    /// workflow's status.
    #[arg(long, value_name = "PATH")]
    store: Option<PathBuf>,
    /// The status of this workflow (correlation id), from the store.
    #[arg(long, value_name = "C", requires = "store")]
    correlation: Option<String>,
    /// How many of the newest messages the message log shows.
    #[arg(long, value_name = "N", default_value_t = 20)]
    log: usize,
}

fn open_store(path: &std::path::Path) -> anyhow::Result<InteractionStore> {
    Ok(InteractionStore::open_read_only(path)?)
}

/// Milliseconds as a short human figure.
fn ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.1}"))
}

/// The timeline for humans: one row per message, times relative to the first.
pub(crate) fn render_timeline(
    correlation: &str,
    status: &WorkflowStatus,
    steps: &[TimelineStep],
) -> String {
    let start = steps.first().map(|s| s.sent_at);
    let rows: Vec<Vec<String>> = steps
        .iter()
        .map(|s| {
            let offset = start
                .and_then(|t| (s.sent_at - t).to_std().ok())
                .map_or(0.0, |d| d.as_secs_f64() * 1e3);
            vec![
                format!("+{offset:.1}"),
                output::safe(&s.from).into_owned(),
                if s.to.is_empty() {
                    "-".into()
                } else {
                    output::safe(&s.to.join(",")).into_owned()
                },
                output::safe(&s.kind).into_owned(),
                s.channel.clone(),
                s.outcome.clone(),
                ms(s.ack_ms),
                s.error
                    .as_deref()
                    .map_or(String::new(), |e| output::safe(e).into_owned()),
            ]
        })
        .collect();
    [
        format!(
            "thread {}: {} messages, {} ({} acked, {} pending, {} failed); agents: {}",
            output::safe(correlation),
            status.messages,
            status.status,
            status.acked,
            status.pending,
            status.failed,
            if status.agents.is_empty() {
                "-".into()
            } else {
                status.agents.join(", ")
            }
        ),
        output::table(
            &[
                "AT MS", "FROM", "TO", "KIND", "CHANNEL", "OUTCOME", "ACK MS", "ERROR",
            ],
            &rows,
        ),
    ]
    .join("\n")
}

/// Runs `agentbus trace`.
pub(crate) async fn run_trace(global: &Global, args: TraceArgs) -> anyhow::Result<()> {
    let store = open_store(&args.store)?;
    let steps = store.timeline(&args.correlation)?;
    let status = store.workflow_status(&args.correlation)?;
    if steps.is_empty() && !global.json {
        return Err(CliError::failed(format!(
            "no messages with correlation id '{}' in {}; check the id (agentbus log shows recent ones)",
            output::safe(&args.correlation),
            args.store.display()
        ))
        .into());
    }
    if global.json {
        output::json_line(
            &json!({"correlation_id": args.correlation, "status": status, "steps": steps}),
        )
    } else {
        output::line(render_timeline(&args.correlation, &status, &steps))
    }
}

/// The log for humans.
pub(crate) fn render_log(rows: &[Interaction], events: bool) -> String {
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![r.at.format("%Y-%m-%d %H:%M:%S%.3f").to_string()];
            if events {
                row.push(r.event.clone());
            }
            row.extend([
                output::safe(&r.kind).into_owned(),
                r.channel.clone(),
                output::safe(r.sender.as_deref().unwrap_or("-")).into_owned(),
                output::safe(r.agent.as_deref().or(r.receiver.as_deref()).unwrap_or("-"))
                    .into_owned(),
                output::safe(r.correlation_id.as_deref().unwrap_or("-")).into_owned(),
            ]);
            row
        })
        .collect();
    let mut headers = vec!["TIME (UTC)"];
    if events {
        headers.push("EVENT");
    }
    headers.extend(["KIND", "CHANNEL", "FROM", "TO", "CORRELATION"]);
    output::table(&headers, &table)
}

/// Runs `agentbus log`.
pub(crate) async fn run_log(global: &Global, args: LogArgs) -> anyhow::Result<()> {
    let store = open_store(&args.store)?;
    let mut query = Query::new().limit(args.limit.max(1));
    query.agent = args.agent;
    query.kind = args.kind;
    query.correlation_id = args.correlation;
    if let Some(since) = args.since {
        let since = chrono::Duration::from_std(since)
            .ok()
            .and_then(|d| Utc::now().checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        query.since = Some(since);
    }
    if !args.events {
        query.events = vec!["published".into()];
    }
    let rows = store.query(&query)?;
    if global.json {
        for row in &rows {
            output::json_line(row)?;
        }
        Ok(())
    } else {
        output::line(render_log(&rows, args.events))
    }
}

/// Runs `agentbus stats`: the engine's queue statistics, and with `--store` the
/// message log and a workflow's status (seed 000's `get_queue_stats`,
/// `get_message_log`, workflow status).
pub(crate) async fn run_stats(global: &Global, args: StatsArgs) -> anyhow::Result<()> {
    let Some(path) = &args.store else {
        return super::stats::run(global).await;
    };
    let transport = crate::backend::open(&global.backend).await?;
    let stats = transport.stats().await?;
    let store = open_store(path)?;
    let log = store.query(&Query::new().events(["published"]).limit(args.log.max(1)))?;
    let workflow = match &args.correlation {
        Some(c) => Some(store.workflow_status(c)?),
        None => None,
    };
    if global.json {
        return output::json_line(
            &json!({"queues": stats, "message_log": log, "workflow": workflow}),
        );
    }
    let mut text = vec![
        super::stats::render(&stats),
        String::new(),
        format!("message log ({}):", path.display()),
        render_log(&log, false),
    ];
    if let Some(w) = workflow {
        text.push(String::new());
        text.push(format!(
            "workflow {}: {} — {} messages, {} acked, {} pending, {} failed; agents: {}",
            output::safe(&w.correlation_id),
            w.status,
            w.messages,
            w.acked,
            w.pending,
            w.failed,
            if w.agents.is_empty() {
                "-".into()
            } else {
                w.agents.join(", ")
            }
        ));
    }
    output::line(text.join("\n"))
}
