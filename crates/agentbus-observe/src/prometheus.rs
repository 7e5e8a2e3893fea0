//! The Prometheus endpoint: installs the process-wide `metrics` recorder
//! (metrics-exporter-prometheus) and serves its text exposition on `GET /metrics`.
//!
//! The HTTP side is deliberately tiny (one request per connection, `Connection:
//! close`): a scrape is one GET every few seconds, and owning the listener lets the
//! caller bind port 0 and learn the address, which the exporter's own listener does
//! not tell. [`EngineGauges`] adds what only the engine knows (queue depth, in-flight,
//! dead letters, expired) by polling [`Transport::stats`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentbus::{DeadLetterFilter, DeadReason, Error, ErrorKind, Result, Transport};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Buckets of every `*_seconds` histogram: 50 µs to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The largest request head read from a scraper.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// A running `/metrics` endpoint. Dropping it stops serving (the recorder stays
/// installed: the `metrics` facade has one recorder per process).
#[derive(Debug)]
pub struct PrometheusEndpoint {
    addr: SocketAddr,
    handle: PrometheusHandle,
    server: JoinHandle<()>,
}

impl Drop for PrometheusEndpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl PrometheusEndpoint {
    /// Installs the Prometheus recorder as the process's `metrics` recorder and serves
    /// it on `addr` (`127.0.0.1:0` picks a free port; see [`PrometheusEndpoint::addr`]).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when another recorder is already installed in this
    /// process; [`ErrorKind::Backend`] when the address cannot be bound (in use, or no
    /// permission), naming it.
    pub async fn start(addr: SocketAddr) -> Result<PrometheusEndpoint> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                format!(
                    "cannot serve metrics on {addr}: {e}; pick another address, e.g. \
                     127.0.0.1:9464, or 127.0.0.1:0 for any free port"
                ),
            )
            .with_source(e)
        })?;
        let addr = listener.local_addr().map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                format!("metrics listener has no address: {e}"),
            )
        })?;
        let handle = install_recorder()?;
        let server = tokio::spawn(serve(listener, handle.clone()));
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
        Ok(PrometheusEndpoint {
            addr,
            handle,
            server,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current exposition text (what a scrape returns).
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

fn install_recorder() -> Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("bad histogram buckets: {e}")))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| {
        Error::new(
            ErrorKind::InvalidInput,
            "a metrics recorder is already installed in this process; start one metrics \
             endpoint per process",
        )
    })?;
    // The exporter's histograms and summaries need periodic upkeep.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, &handle)).await
            {
                tracing::debug!(error = %e, "metrics scrape timed out");
            }
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_REQUEST_BYTES {
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            )
            .await;
            return;
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let result = match (method, path) {
        ("GET", "/metrics") => {
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &handle.render(),
            )
            .await
        }
        ("GET", _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "try GET /metrics\n",
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET /metrics is served\n",
            )
            .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "metrics response not sent");
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Polls a transport's statistics into gauges, so `/metrics` shows what only the
/// engine knows:
///
/// | metric | labels |
/// |---|---|
/// | `agentbus_queue_depth` (pending) | group |
/// | `agentbus_in_flight` | group |
/// | `agentbus_group_members` | group |
/// | `agentbus_group_dead_lettered` | group |
/// | `agentbus_channel_messages` | channel |
/// | `agentbus_channel_dropped` | channel |
/// | `agentbus_dead_letters` | — |
/// | `agentbus_expired` (engine total) | — |
/// | `agentbus_expired_dead_letters` (kept, reason expired) | channel |
/// | `agentbus_rejected_full` | — |
///
/// Dropping it stops the polling.
#[derive(Debug)]
pub struct EngineGauges {
    task: JoinHandle<()>,
}

impl Drop for EngineGauges {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EngineGauges {
    /// Polls `transport` every `every` (first poll at once).
    pub fn start(transport: Arc<dyn Transport>, every: Duration) -> EngineGauges {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = poll_once(transport.as_ref()).await {
                    tracing::debug!(error = %e, "engine stats poll failed");
                }
            }
        });
        EngineGauges { task }
    }
}

/// One poll: reads stats and the expired dead letters, sets the gauges.
///
/// # Errors
/// The transport's errors.
pub async fn poll_once(transport: &dyn Transport) -> Result<()> {
    let stats = transport.stats().await?;
    for group in &stats.groups {
        let name = group.group.clone();
        metrics::gauge!("agentbus_queue_depth", "group" => name.clone()).set(group.pending as f64);
        metrics::gauge!("agentbus_in_flight", "group" => name.clone()).set(group.in_flight as f64);
        metrics::gauge!("agentbus_group_members", "group" => name.clone())
            .set(group.members as f64);
        metrics::gauge!("agentbus_group_dead_lettered", "group" => name)
            .set(group.dead_lettered as f64);
    }
    for channel in &stats.channels {
        let name = channel.channel.as_str().to_owned();
        metrics::gauge!("agentbus_channel_messages", "channel" => name.clone())
            .set(channel.messages as f64);
        metrics::gauge!("agentbus_channel_dropped", "channel" => name).set(channel.dropped as f64);
    }
    metrics::gauge!("agentbus_dead_letters").set(stats.dead_letters as f64);
    metrics::gauge!("agentbus_expired").set(stats.expired as f64);
    metrics::gauge!("agentbus_rejected_full").set(stats.rejected_full as f64);
    let expired = transport
        .dead_letters(DeadLetterFilter {
            reason: Some(DeadReason::Expired),
            limit: Some(100_000),
            ..DeadLetterFilter::default()
        })
        .await?;
    let mut per_channel = std::collections::BTreeMap::<String, u64>::new();
    for letter in &expired {
        *per_channel
            .entry(letter.envelope.channel.as_str().to_owned())
            .or_default() += 1;
    }
    for (channel, n) in per_channel {
        metrics::gauge!("agentbus_expired_dead_letters", "channel" => channel).set(n as f64);
    }
    Ok(())
}
