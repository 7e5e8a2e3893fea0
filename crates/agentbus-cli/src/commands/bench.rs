//! `agentbus bench`: throughput and latency of the backend, with percentiles.
//!
//! Runs the workloads of the `agentbus-bench` crate: publish → deliver → ack with 1:1
//! and 4:4 producers and consumers, and the request/reply round trip. Backends whose
//! raw client can run the same workload print it beside ours (later issues). On Redis
//! everything runs under a scratch key prefix that is deleted at the end.

use clap::Args;

use crate::Global;

/// `agentbus bench [--messages N] [--payload BYTES] [--batch N] [--round-trips N]`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Messages per pipeline run.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Messages per publish batch and per fetch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// The most messages waiting in the channel: producers that run ahead meet `Full`
    /// and wait, so the run measures a steady state and the latency of a bounded queue.
    #[arg(long, default_value_t = 8_192)]
    backlog: u64,
    /// Request/reply round trips.
    #[arg(long, default_value_t = 20_000)]
    round_trips: u64,
    /// Producer:consumer shapes to run, e.g. `1:1,4:4`.
    #[arg(long, default_value = "1:1,4:4")]
    shapes: String,
}

fn parse_shapes(text: &str) -> Result<Vec<(usize, usize)>, crate::CliError> {
    text.split(',')
        .map(|shape| {
            let (p, c) = shape.split_once(':').ok_or_else(|| {
                crate::CliError::usage(format!(
                    "bad shape '{shape}': use PRODUCERS:CONSUMERS, e.g. 4:4"
                ))
            })?;
            let parse = |n: &str| {
                n.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| {
                        crate::CliError::usage(format!(
                            "bad count '{n}' in shape '{shape}': use 1-256"
                        ))
                    })
            };
            Ok((parse(p)?, parse(c)?))
        })
        .collect()
}

/// Runs the benchmark suite on the global backend.
///
/// # Errors
/// Bad shapes (exit 2) or any backend error.
pub(crate) async fn run(global: &Global, args: BenchArgs) -> anyhow::Result<()> {
    let shapes = parse_shapes(&args.shapes)?;
    if args.batch == 0 || args.messages == 0 || args.backlog == 0 {
        return Err(
            crate::CliError::usage("--messages, --batch and --backlog must be at least 1").into(),
        );
    }
    // On Redis the runs work under a scratch key prefix, deleted afterwards (also when
    // a run fails), so a benchmark leaves no streams, groups or dedup keys in the bus.
    let scratch = redis_scratch(&global.backend, std::process::id());
    let backend = scratch.clone().unwrap_or_else(|| global.backend.clone());
    let result = run_all(global, &args, shapes, &backend).await;
    if let Some(url) = scratch {
        // Dropped subscriptions hand their deliveries back in tasks of their own:
        // let them finish before the keys go.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let redis =
            agentbus_redis::RedisTransport::connect(&url, agentbus_redis::RedisOptions::default())
                .await?;
        redis.delete_everything().await?;
    }
    result
}

/// For a `redis://` / `rediss://` backend: the same URL with a scratch prefix
/// (`<prefix>-bench-<pid>`, the prefix being the URL's or the default `agentbus`).
fn redis_scratch(backend: &str, pid: u32) -> Option<String> {
    if !(backend.starts_with("redis://") || backend.starts_with("rediss://")) {
        return None;
    }
    let (base, query) = backend.split_once('?').unwrap_or((backend, ""));
    let mut prefix = agentbus_redis::RedisOptions::default().prefix;
    let mut pairs: Vec<String> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("prefix=") {
            Some(p) => prefix = p.to_string(),
            None => pairs.push(pair.to_string()),
        }
    }
    pairs.push(format!("prefix={prefix}-bench-{pid}"));
    Some(format!("{base}?{}", pairs.join("&")))
}

async fn run_all(
    global: &Global,
    args: &BenchArgs,
    shapes: Vec<(usize, usize)>,
    backend: &str,
) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for (producers, consumers) in shapes {
        // A fresh engine per run, so one run's leftovers never slow the next.
        let transport = crate::backend::open(backend).await?;
        let spec = agentbus_bench::PipelineSpec {
            producers,
            consumers,
            messages: args.messages,
            payload_bytes: args.payload,
            batch: args.batch,
            backlog: args.backlog,
        };
        let report = agentbus_bench::pipeline(transport, spec).await?;
        if !global.json {
            crate::output::line(report.line())?;
        }
        reports.push(report);
    }
    if args.round_trips > 0 {
        let transport = crate::backend::open(backend).await?;
        let mut report = agentbus_bench::request_reply(transport, args.round_trips, 64).await?;
        report.name.push_str(" (multi-thread)");
        if !global.json {
            crate::output::line(report.line())?;
        }
        reports.push(report);
        let report = round_trips_on_one_thread(backend.to_string(), args.round_trips).await?;
        if !global.json {
            crate::output::line(report.line())?;
        }
        reports.push(report);
    }
    if global.json {
        crate::output::json_line(&reports)?;
    }
    Ok(())
}

/// The round-trip workload on a current-thread runtime of its own: requester,
/// responder and inbox share one thread, so the figure is the bus's own cost without
/// the cross-thread wake-ups a multi-thread runtime adds to every hop.
async fn round_trips_on_one_thread(
    backend: String,
    round_trips: u64,
) -> anyhow::Result<agentbus_bench::BenchReport> {
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let transport = crate::backend::open(&backend).await?;
            let mut report = agentbus_bench::request_reply(transport, round_trips, 64).await?;
            report.name.push_str(" (one thread)");
            Ok(report)
        })
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_benchmarks_run_under_a_scratch_prefix() {
        assert_eq!(
            redis_scratch("redis://h:6379", 7).as_deref(),
            Some("redis://h:6379?prefix=agentbus-bench-7")
        );
        assert_eq!(
            redis_scratch("redis://h:6379/0?prefix=bus1&protocol=resp3", 7).as_deref(),
            Some("redis://h:6379/0?protocol=resp3&prefix=bus1-bench-7")
        );
        assert_eq!(
            redis_scratch("rediss://h?prefix=x", 1).as_deref(),
            Some("rediss://h?prefix=x-bench-1")
        );
        assert_eq!(redis_scratch("memory", 7), None);
        assert_eq!(redis_scratch("nats://h:4222", 7), None);
    }

    #[test]
    fn shapes_parse_and_bad_ones_are_usage_errors() {
        assert_eq!(parse_shapes("1:1,4:4").unwrap(), vec![(1, 1), (4, 4)]);
        assert_eq!(parse_shapes("4").unwrap_err().code(), 2);
        assert_eq!(parse_shapes("0:1").unwrap_err().code(), 2);
    }
}
