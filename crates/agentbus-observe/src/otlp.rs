//! OpenTelemetry export (cargo feature `otlp`): spans of every message, sent to an
//! OTLP/HTTP collector as JSON (`POST <endpoint>/v1/traces`, the protocol's JSON
//! encoding).
//!
//! Spans come from bus events and the W3C trace context every bus publish stamps
//! (`agentbus::trace_context`):
//!
//! - a **producer** span per published message: span id = the span id of its
//!   `traceparent`, parent = the `trace.parent_span_id` header (the span it continues),
//!   from the header timestamp to the engine's receipt;
//! - a **consumer** span per settlement: a new span id whose parent is the message's
//!   publish span, from delivery to settlement, with the group and the outcome.
//!
//! So one trace shows a request going through several agents, on any engine. Spans go
//! through a bounded channel to an export task that posts batches (up to 512 spans, or
//! what arrived within a second); a span that does not fit is dropped and counted
//! (`agentbus_otlp_dropped_total`), and a failed post is logged and counted, never
//! retried forever. The HTTP client is a small plain-HTTP/1.1 one over tokio, enough
//! for a collector on localhost or a sidecar; put a TLS-terminating collector in front
//! for anything else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbus::trace_context::{TraceParent, PARENT_SPAN_HEADER};
use agentbus::{BusEvent, BusObserver, Error, ErrorKind, Result, Settlement};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// OTLP span kinds used here.
const KIND_PRODUCER: u8 = 4;
const KIND_CONSUMER: u8 = 5;

/// Where and how to export.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The collector's base URL, `http://host:port` (the path `/v1/traces` is added).
    pub endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Spans buffered before new ones are dropped.
    pub capacity: usize,
    /// Longest wait before a partial batch is sent.
    pub flush_every: Duration,
}

impl OtlpConfig {
    /// Export to `endpoint` as service `agentbus`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        OtlpConfig {
            endpoint: endpoint.into(),
            service_name: "agentbus".into(),
            capacity: 8192,
            flush_every: Duration::from_secs(1),
        }
    }
}

/// Counters of an [`OtlpExporter`].
#[derive(Debug, Default)]
struct Counters {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

enum Command {
    Span(Value),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The exporter: a [`BusObserver`] turning message events into OTLP spans.
#[derive(Debug)]
pub struct OtlpExporter {
    tx: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl Drop for OtlpExporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Target {
    host_port: String,
    path: String,
}

fn parse_endpoint(endpoint: &str) -> Result<Target> {
    let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidInput,
            format!(
                "OTLP endpoint '{endpoint}' must start with http:// (e.g. http://127.0.0.1:4318); \
                 for https put a collector or sidecar in front"
            ),
        )
    })?;
    let (host_port, base) = rest.split_once('/').unwrap_or((rest, ""));
    if host_port.is_empty() || !host_port.contains(':') {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "OTLP endpoint '{endpoint}' needs a host and a port, e.g. http://127.0.0.1:4318"
            ),
        ));
    }
    let base = base.trim_end_matches('/');
    Ok(Target {
        host_port: host_port.to_string(),
        path: if base.is_empty() {
            "/v1/traces".into()
        } else {
            format!("/{base}/v1/traces")
        },
    })
}

impl OtlpExporter {
    /// Starts the export task (needs a tokio runtime).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for an endpoint that is not `http://host:port[/base]`.
    pub fn start(config: OtlpConfig) -> Result<OtlpExporter> {
        let target = parse_endpoint(&config.endpoint)?;
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(export_loop(rx, target, config, counters.clone()));
        Ok(OtlpExporter { tx, counters, task })
    }

    /// Sends what is buffered and waits for the post (at most 10 s).
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] when the export task does not answer in time;
    /// [`ErrorKind::Closed`] when it has stopped.
    pub async fn flush(&self) -> Result<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "the OTLP export task has stopped"))?;
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    "the OTLP export did not finish within 10 s",
                )
            })?
            .map_err(|_| Error::new(ErrorKind::Closed, "the OTLP export task has stopped"))
    }

    /// `(exported, dropped, failed)` span counts so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.counters.exported.load(Ordering::Relaxed),
            self.counters.dropped.load(Ordering::Relaxed),
            self.counters.failed.load(Ordering::Relaxed),
        )
    }

    fn push(&self, span: Value) {
        if self.tx.try_send(Command::Span(span)).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("agentbus_otlp_dropped_total").increment(1);
        }
    }
}

fn nanos(at: DateTime<Utc>) -> String {
    at.timestamp_nanos_opt()
        .unwrap_or_default()
        .max(0)
        .to_string()
}

fn attr(key: &str, value: impl Into<Value>) -> Value {
    match value.into() {
        Value::Number(n) if n.is_u64() || n.is_i64() => {
            json!({"key": key, "value": {"intValue": n.to_string()}})
        }
        Value::String(s) => json!({"key": key, "value": {"stringValue": s}}),
        other => json!({"key": key, "value": {"stringValue": other.to_string()}}),
    }
}

impl BusObserver for OtlpExporter {
    fn on_event(&self, event: &BusEvent<'_>) {
        let envelope = event.envelope();
        let h = &envelope.header;
        let Some(tp) = h.trace.as_deref().and_then(TraceParent::parse) else {
            return;
        };
        let mut attributes = vec![
            attr("messaging.system", "agentbus"),
            attr("messaging.destination.name", envelope.channel.as_str()),
            attr("messaging.message.id", h.id.to_string()),
            attr("agentbus.kind", h.kind.as_str()),
        ];
        if let Some(c) = &h.correlation_id {
            attributes.push(attr("messaging.message.conversation_id", c.as_str()));
        }
        if let Some(s) = &h.sender {
            attributes.push(attr("agentbus.sender", s.as_str()));
        }
        let span = match event {
            BusEvent::Published { at, .. } => json!({
                "traceId": tp.trace_id_hex(),
                "spanId": tp.span_id_hex(),
                "parentSpanId": h.headers.get(PARENT_SPAN_HEADER).cloned().unwrap_or_default(),
                "name": format!("publish {}", envelope.channel),
                "kind": KIND_PRODUCER,
                "startTimeUnixNano": nanos(h.timestamp.min(*at)),
                "endTimeUnixNano": nanos(*at),
                "attributes": attributes,
            }),
            BusEvent::Settled {
                group,
                settlement,
                held,
                at,
                agent,
                ..
            } => {
                attributes.push(attr("messaging.consumer.group.name", *group));
                attributes.push(attr("agentbus.outcome", event.name()));
                attributes.push(attr("agentbus.attempt", u64::from(h.attempt)));
                if let Some(agent) = crate::handler_of(*agent, group) {
                    attributes.push(attr("agentbus.agent", agent));
                }
                let start = chrono::Duration::from_std(*held)
                    .ok()
                    .and_then(|d| at.checked_sub_signed(d))
                    .unwrap_or(*at);
                let status = match settlement {
                    Settlement::Ack => json!({"code": 1}),
                    Settlement::Nack { error, .. } => {
                        json!({"code": 2, "message": error.clone().unwrap_or_default()})
                    }
                    Settlement::Reject { reason, error } => {
                        json!({"code": 2, "message": format!("{reason}: {error}")})
                    }
                };
                json!({
                    "traceId": tp.trace_id_hex(),
                    "spanId": tp.child().span_id_hex(),
                    "parentSpanId": tp.span_id_hex(),
                    "name": format!("process {}", envelope.channel),
                    "kind": KIND_CONSUMER,
                    "startTimeUnixNano": nanos(start),
                    "endTimeUnixNano": nanos(*at),
                    "attributes": attributes,
                    "status": status,
                })
            }
            _ => return,
        };
        self.push(span);
    }
}

async fn export_loop(
    mut rx: mpsc::Receiver<Command>,
    target: Target,
    config: OtlpConfig,
    counters: Arc<Counters>,
) {
    let mut batch: Vec<Value> = Vec::new();
    loop {
        // None: the exporter is gone; Some(None): the batch waited long enough.
        let next = if batch.is_empty() {
            rx.recv().await.map(Some)
        } else {
            match tokio::time::timeout(config.flush_every, rx.recv()).await {
                Ok(command) => command.map(Some),
                Err(_) => Some(None),
            }
        };
        match next {
            None => {
                if !batch.is_empty() {
                    post(&target, &config, std::mem::take(&mut batch), &counters).await;
                }
                return;
            }
            Some(None) => post(&target, &config, std::mem::take(&mut batch), &counters).await,
            Some(Some(Command::Span(span))) => {
                batch.push(span);
                if batch.len() >= 512 {
                    post(&target, &config, std::mem::take(&mut batch), &counters).await;
                }
            }
            Some(Some(Command::Flush(done))) => {
                if !batch.is_empty() {
                    post(&target, &config, std::mem::take(&mut batch), &counters).await;
                }
                let _ = done.send(());
            }
        }
    }
}

async fn post(target: &Target, config: &OtlpConfig, spans: Vec<Value>, counters: &Counters) {
    let n = spans.len() as u64;
    let body = json!({"resourceSpans": [{
        "resource": {"attributes": [attr("service.name", config.service_name.as_str())]},
        "scopeSpans": [{"scope": {"name": "agentbus", "version": env!("CARGO_PKG_VERSION")}, "spans": spans}],
    }]})
    .to_string();
    match tokio::time::timeout(Duration::from_secs(10), send(target, &body)).await {
        Ok(Ok(())) => {
            counters.exported.fetch_add(n, Ordering::Relaxed);
        }
        Ok(Err(e)) => {
            counters.failed.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(error = %e, endpoint = %config.endpoint, spans = n, "OTLP export failed");
        }
        Err(_) => {
            counters.failed.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(endpoint = %config.endpoint, spans = n, "OTLP export timed out");
        }
    }
}

async fn send(target: &Target, body: &str) -> std::io::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(&target.host_port).await?;
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        target.path,
        target.host_port,
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let status_line = response.split(|b| *b == b'\n').next().unwrap_or_default();
    let status = String::from_utf8_lossy(status_line);
    if status
        .split_whitespace()
        .nth(1)
        .is_some_and(|c| c.starts_with('2'))
    {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "collector answered '{}'",
            status.trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let t = parse_endpoint("http://127.0.0.1:4318").unwrap();
        assert_eq!(
            (t.host_port.as_str(), t.path.as_str()),
            ("127.0.0.1:4318", "/v1/traces")
        );
        let t = parse_endpoint("http://collector:4318/otlp/").unwrap();
        assert_eq!(t.path, "/otlp/v1/traces");
        for bad in ["https://x:1", "127.0.0.1:4318", "http://nohost", "http://"] {
            assert_eq!(
                parse_endpoint(bad).err().map(|e| e.kind()),
                Some(ErrorKind::InvalidInput),
                "{bad}"
            );
        }
    }
}
