//! Reliability/security (issue 5): TLS on the TCP listener (`[listen].tls_cert`/`tls_key`)
//! with a self-signed certificate made in the test, plus the bearer token on top of it.
mod common;

use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_rustls::rustls::{self, pki_types::ServerName, RootCertStore};

const TOKEN: &str = "tls-test-token-0123456789";

/// A self-signed certificate for localhost/127.0.0.1: (cert PEM path, key PEM path, DER).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

/// Adds TLS keys to the harness's `[listen]` section and restarts the daemon.
fn enable_tls(d: &mut Daemon, cert: &Path, key: &Path) {
    let text = std::fs::read_to_string(&d.config).unwrap();
    let text = text.replacen(
        "[listen]\n",
        &format!(
            "[listen]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        1,
    );
    std::fs::write(&d.config, text).unwrap();
    assert!(d.sigterm().is_some_and(|s| s.success()));
    d.spawn();
    d.wait_for("TLS listener up", Duration::from_secs(10), || {
        d.log().contains("listening on tcp with TLS")
    });
}

fn connector(trusted_der: Option<&[u8]>) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    if let Some(der) = trusted_der {
        roots.add(der.to_vec().into()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// One HTTPS request; Err(message) if TLS or HTTP fails.
fn https(
    d: &Daemon,
    trusted_der: Option<&[u8]>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    token: Option<&str>,
) -> Result<(u16, serde_json::Value), String> {
    let addr = d.tcp_addr.clone().unwrap();
    let conn = connector(trusted_der);
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let req = b
        .body(Full::new(bytes::Bytes::from(
            body.map(|v| serde_json::to_vec(&v).unwrap())
                .unwrap_or_default(),
        )))
        .unwrap();
    d.rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| e.to_string())?;
        let tls = conn
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    })
}

#[test]
fn tls_listener_serves_https_with_bearer_tokens() {
    let mut d = Daemon::start(Opts {
        tcp: true,
        token: Some(TOKEN.into()),
        ..Default::default()
    });
    let (cert, key, der) = self_signed(d.dir.path());
    enable_tls(&mut d, &cert, &key);

    let (st, v) = https(&d, Some(&der), "GET", "/v1/health", None, Some(TOKEN)).unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "ok", "{v}");
    let (st, v) = https(
        &d,
        Some(&der),
        "POST",
        "/v1/instances",
        Some(json!({"workload_class": "mock-class"})),
        Some(TOKEN),
    )
    .unwrap();
    assert_eq!(st, 201, "create over HTTPS: {v}");
    // The token is still required over TLS.
    let (st, v) = https(&d, Some(&der), "GET", "/v1/instances", None, None).unwrap();
    assert_eq!(st, 401, "no token over TLS: {v}");
    let (st, _) = https(&d, Some(&der), "GET", "/v1/instances", None, Some("wrong")).unwrap();
    assert_eq!(st, 401, "wrong token over TLS");

    // A client that does not trust the certificate fails the handshake.
    let e = https(&d, None, "GET", "/v1/health", None, Some(TOKEN)).unwrap_err();
    assert!(e.starts_with("TLS:"), "untrusted certificate: {e}");

    // Plain HTTP on the TLS port is not served.
    let addr = d.tcp_addr.clone().unwrap();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::Write;
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tls-test-token-0123456789\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        !String::from_utf8_lossy(&buf).contains("\"ok\""),
        "plaintext request answered on the TLS port"
    );

    // A client that connects and never starts the handshake does not block others.
    let silent: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let t0 = Instant::now();
    let (st, _) = https(&d, Some(&der), "GET", "/v1/health", None, Some(TOKEN)).unwrap();
    assert_eq!(st, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "HTTPS request behind silent clients took {:?}",
        t0.elapsed()
    );
    drop(silent);
    // The Unix socket is unaffected by TLS.
    assert_eq!(d.get("/v1/health").status, 200);
}

#[test]
fn unusable_tls_files_stop_the_daemon_with_the_file_named() {
    let d = Daemon::start(Opts {
        tcp: true,
        token: Some(TOKEN.into()),
        ..Default::default()
    });
    let bad_cert = d.dir.path().join("bad-cert.pem");
    std::fs::write(&bad_cert, "not a certificate\n").unwrap();
    let (_, key, _) = self_signed(d.dir.path());
    let base = std::fs::read_to_string(&d.config).unwrap();
    for (cert, key, expect) in [
        (bad_cert.clone(), key.clone(), "tls_cert"),
        (d.dir.path().join("missing.pem"), key.clone(), "missing.pem"),
        (d.dir.path().join("cert.pem"), bad_cert.clone(), "tls_key"),
    ] {
        let cfg = d.dir.path().join("tls-config.toml");
        std::fs::write(
            &cfg,
            base.replacen(
                "[listen]\n",
                &format!(
                    "[listen]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                    cert.display(),
                    key.display()
                ),
                1,
            )
            .replace("socket = \"api.sock\"", "socket = \"api2.sock\""),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_anvil"))
            .args(["daemon", "start", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "started with {cert:?}/{key:?}: {text}"
        );
        assert!(text.contains(expect), "the error names {expect}: {text}");
        assert!(
            !d.dir.path().join("api2.sock").exists(),
            "socket left behind"
        );
    }
}

#[test]
fn unix_socket_is_0660_with_the_configured_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let d = Daemon::start(Opts {
        daemon_extra: "socket_group = \"nogroup\"\n".into(),
        ..Default::default()
    });
    let md = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o660, "socket mode");
    assert_eq!(md.gid(), 65534, "socket group is nogroup");
    // A group that does not exist stops the daemon with the key named.
    let cfg = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace(
            "socket_group = \"nogroup\"",
            "socket_group = \"no-such-group-anvil\"",
        )
        .replace("socket = \"api.sock\"", "socket = \"api3.sock\"");
    let path = d.dir.path().join("bad-group.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anvil"))
        .args(["daemon", "start", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("socket_group"), "{text}");
}

#[test]
fn tcp_without_tokens_needs_explicit_allow_unauthenticated() {
    let d = Daemon::start(Opts::default());
    let cfg = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("socket = \"api.sock\"", "socket = \"api4.sock\"")
        + "\n[listen]\nhttp_addr = \"127.0.0.1:1\"\n";
    let path = d.dir.path().join("no-token.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anvil"))
        .args(["daemon", "start", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started TCP without tokens: {text}");
    assert!(
        text.contains("tokens_file") && text.contains("allow_unauthenticated"),
        "{text}"
    );
}
