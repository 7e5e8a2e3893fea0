//! What a receipt guarantees on this NATS deployment (DESIGN §5, durability honesty).

use std::collections::BTreeMap;
use std::time::Duration;

use agentbus::{DurabilityReport, Result};
use async_nats::jetstream::stream::StorageType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::transport::{backend, humanize, Inner};

/// JetStream's default interval between fsyncs of its file store.
const DEFAULT_SYNC: &str = "2m";

/// Reads stream and server settings and says what a receipt guarantees.
pub(crate) async fn durability(inner: &Inner) -> Result<DurabilityReport> {
    let mut stream = inner.stream.clone();
    let info = stream
        .info()
        .await
        .map_err(|e| backend("reading the stream", e))?
        .clone();
    let server = inner.client.server_info();
    let mut settings = BTreeMap::new();
    settings.insert(
        "server".to_string(),
        format!("nats-server {}", server.version),
    );
    settings.insert("stream".to_string(), info.config.name.clone());
    let file = info.config.storage == StorageType::File;
    settings.insert(
        "storage".to_string(),
        if file { "file" } else { "memory" }.to_string(),
    );
    settings.insert("replicas".to_string(), info.config.num_replicas.to_string());
    settings.insert(
        "duplicate_window".to_string(),
        humanize(info.config.duplicate_window),
    );
    let sync = match &inner.options.monitor_url {
        Some(url) => match read_sync_interval(url).await {
            Ok(Some(s)) => Some(s),
            Ok(None) => Some(format!(
                "{DEFAULT_SYNC} (the server default: its /varz shows no sync_interval setting)"
            )),
            Err(e) => {
                settings.insert("monitor".to_string(), format!("unreadable: {e}"));
                None
            }
        },
        None => None,
    };
    let sync_always = sync.as_deref() == Some("always");
    settings.insert(
        "jetstream.sync_interval".to_string(),
        sync.clone().unwrap_or_else(|| {
            format!(
                "unknown (not readable over a client connection; pass a monitoring URL to read \
                 it); the server default is {DEFAULT_SYNC}"
            )
        }),
    );
    let replicas = info.config.num_replicas;
    let guarantee = if !file {
        format!(
            "A receipt means {} server(s) hold the message in memory: it survives the loss of \
             this process, but a restart of the NATS server{} loses it.",
            replicas,
            if replicas > 1 { "s holding it" } else { "" }
        )
    } else if sync_always {
        format!(
            "A receipt means the message was written and fsynced to disk on {replicas} server(s): \
             it survives process crashes, server restarts and a power loss."
        )
    } else {
        format!(
            "A receipt means the message is stored by {replicas} JetStream server(s) in their file \
             store and survives a crash or restart of the server process; it is flushed to disk \
             only every sync interval ({}), so a power loss or kernel crash of {} can lose \
             acknowledged messages (as Jepsen's 2025 analysis of NATS 2.12.1 showed).",
            sync.as_deref().unwrap_or("2 minutes by default"),
            if replicas > 1 {
                "a majority of the replicas at once"
            } else {
                "that machine"
            }
        )
    };
    let mut advice = Vec::new();
    if !file {
        advice.push(
            "Use file storage (NatsOptions::storage(NatsStorage::File)) so messages survive a \
             server restart."
                .to_string(),
        );
    }
    if !sync_always {
        advice.push(
            "Set `jetstream { sync_interval: always }` in the server config (NATS >= 2.10) so \
             every acknowledged message is fsynced before the receipt."
                .to_string(),
        );
    }
    if replicas < 3 {
        advice.push(
            "Run a 3-node JetStream cluster and use replicas = 3 so a receipt means a quorum \
             of servers stored the message."
                .to_string(),
        );
    }
    Ok(DurabilityReport {
        engine: "nats".to_string(),
        settings,
        guarantee,
        advice,
    })
}

/// Reads `jetstream.config.sync_interval` (or `sync_always`) from the monitoring
/// endpoint's `/varz`. `Ok(None)` when the server does not report it.
async fn read_sync_interval(url: &str) -> std::result::Result<Option<String>, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("monitoring URL '{url}' must start with http://"))?;
    let host = rest.trim_end_matches('/');
    let read = async {
        let mut conn = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| format!("connecting to {host}: {e}"))?;
        let request = format!("GET /varz HTTP/1.0\r\nHost: {host}\r\n\r\n");
        conn.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        conn.read_to_end(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<Vec<u8>, String>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| format!("{url} did not answer within 5 s"))??;
    let text = String::from_utf8_lossy(&body);
    let json = text.split_once("\r\n\r\n").map_or(&*text, |(_, b)| b);
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("/varz is not JSON: {e}"))?;
    let config = &value["jetstream"]["config"];
    if config["sync_always"].as_bool() == Some(true) {
        return Ok(Some("always".to_string()));
    }
    Ok(match &config["sync_interval"] {
        serde_json::Value::Number(n) => n.as_u64().map(|ns| humanize(Duration::from_nanos(ns))),
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    })
}
