//! `rediss://`: a redis-server of the test's own with TLS only (a self-signed
//! certificate made with openssl, on a free port), reached through the transport.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentbus::{ChannelName, ChannelPattern, Envelope, SubscribeOptions, Transport};
use agentbus_redis::{RedisOptions, RedisTransport};

struct TlsServer {
    child: Child,
    dir: std::path::PathBuf,
    port: u16,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start() -> TlsServer {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = std::env::temp_dir().join(format!("agentbus-redis-tls-{port}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    // A CA, and a server certificate for 127.0.0.1 signed by it.
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?} failed");
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("san file");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=agentbus-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "server.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "cert.pem",
    ]);
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(dir.join("cert.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("key.pem"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.pem"))
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let server = TlsServer { child, dir, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the TLS redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_receive_over_tls() {
    let server = start();
    let url = format!("rediss://127.0.0.1:{}/", server.port);
    let cert = std::fs::read(server.dir.join("ca.pem")).expect("the CA certificate");
    let transport = RedisTransport::connect(&url, RedisOptions::default().tls_root_cert(cert))
        .await
        .expect("connect over TLS");
    let channel = ChannelName::new("tls.check").unwrap();
    let mut consumer = transport
        .subscribe(SubscribeOptions::new(ChannelPattern::from(channel.clone())).group("tls"))
        .await
        .unwrap();
    transport
        .publish(Envelope::new(channel, "tls.num", &b"{\"n\":1}"[..]))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), consumer.next_batch(1))
        .await
        .expect("a delivery over TLS")
        .unwrap();
    assert_eq!(got.len(), 1);
    got[0].ack().await.unwrap();

    // Without trusting it, the self-signed certificate is refused.
    let error = RedisTransport::connect(&url, RedisOptions::default().reconnect_retries(0))
        .await
        .expect_err("an unverifiable certificate must be refused");
    assert_eq!(error.kind(), agentbus::ErrorKind::Backend, "{error}");
}
