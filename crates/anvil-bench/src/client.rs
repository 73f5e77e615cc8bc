//! HTTP/1.1 over a Unix socket with one keep-alive connection per client (the daemon's API
//! and Firecracker's API socket alike).

use crate::error::{Context, Error, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One answer, body fully read.
pub struct Resp {
    pub status: u16,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).ctx(format!(
            "answer is not JSON: {}",
            String::from_utf8_lossy(&self.body)
        ))
    }

    /// Fails unless the status is one of `ok`; the error carries the body.
    pub fn expect(self, what: &str, ok: &[u16]) -> Result<Resp> {
        if ok.contains(&self.status) {
            Ok(self)
        } else {
            Err(Error(format!(
                "{what}: HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body).trim()
            )))
        }
    }
}

/// A client bound to one socket; reconnects when the server closed the connection.
pub struct Client {
    socket: PathBuf,
    host: &'static str,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    pub async fn connect(socket: &Path, host: &'static str) -> Result<Client> {
        let mut c = Client {
            socket: socket.to_path_buf(),
            host,
            sender: None,
        };
        c.ensure().await?;
        Ok(c)
    }

    async fn ensure(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        let stale = match &mut self.sender {
            Some(s) => s.ready().await.is_err(),
            None => true,
        };
        if stale {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .ctx(format!("connect {}", self.socket.display()))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ctx("HTTP handshake")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        self.sender.as_mut().ctx("no connection")
    }

    pub async fn request(&mut self, method: Method, path: &str, body: Bytes) -> Result<Resp> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, self.host);
        if !body.is_empty() {
            b = b.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = b.body(Full::new(body)).ctx("build request")?;
        let sender = self.ensure().await?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(Error(format!("{method} {path}: {e}")));
            }
        };
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .ctx(format!("{method} {path}: read body"))?
            .to_bytes();
        Ok(Resp { status, body })
    }

    pub async fn get(&mut self, path: &str) -> Result<Resp> {
        self.request(Method::GET, path, Bytes::new()).await
    }

    pub async fn post(&mut self, path: &str, body: &Value) -> Result<Resp> {
        self.request(Method::POST, path, Bytes::from(body.to_string()))
            .await
    }

    pub async fn put_json(&mut self, path: &str, body: &Value) -> Result<Resp> {
        self.request(Method::PUT, path, Bytes::from(body.to_string()))
            .await
    }

    pub async fn patch(&mut self, path: &str, body: &Value) -> Result<Resp> {
        self.request(Method::PATCH, path, Bytes::from(body.to_string()))
            .await
    }

    pub async fn delete(&mut self, path: &str) -> Result<Resp> {
        self.request(Method::DELETE, path, Bytes::new()).await
    }
}
