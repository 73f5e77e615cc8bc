//! The HTTP API (SPEC §4): one router served on the Unix socket and, when configured, TCP.

pub mod error;
pub mod extract;
pub mod handlers;
pub mod openapi;

use crate::manager::Manager;
use crate::metrics::RouteLabels;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use error::ApiError;
use handlers as h;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

#[derive(Clone)]
pub struct AppState {
    pub m: Arc<Manager>,
}

/// Bearer tokens accepted on TCP (empty = unauthenticated, only when explicitly allowed).
#[derive(Clone, Default)]
pub struct Tokens(pub Arc<Vec<String>>);

/// Builds the router with every route, limits, metrics and request timeouts.
pub fn router(m: Arc<Manager>) -> Router {
    let json_limit = m.cfg.limits.max_json_body.bytes() as usize;
    let file_limit = m.cfg.limits.max_file_body.bytes() as usize;
    let timeout = m.cfg.limits.request_timeout.get();
    let state = AppState { m };
    let files = Router::new()
        .route(
            "/v1/instances/{id}/files",
            get(h::get_file).put(h::put_file),
        )
        .layer(DefaultBodyLimit::max(file_limit));
    Router::new()
        .route("/v1/health", get(h::health))
        .route(
            "/v1/instances",
            get(h::list_instances).post(h::create_instance),
        )
        .route(
            "/v1/instances/{id}",
            get(h::get_instance).delete(h::delete_instance),
        )
        .route("/v1/instances/{id}/destroy", post(h::destroy_instance))
        .route(
            "/v1/instances/{id}/checkpoint",
            post(h::checkpoint_instance),
        )
        .route("/v1/instances/{id}/checkpoints", get(h::list_checkpoints))
        .route("/v1/instances/{id}/rollback", post(h::rollback_instance))
        .route("/v1/instances/{id}/reset", post(h::reset_instance))
        .route("/v1/instances/{id}/pause", post(h::pause_instance))
        .route("/v1/instances/{id}/resume", post(h::resume_instance))
        .route("/v1/instances/{id}/ttl", post(h::set_ttl))
        .route("/v1/instances/{id}/exec", post(h::exec_instance))
        .route(
            "/v1/checkpoints/{checkpoint_id}",
            axum::routing::delete(h::delete_checkpoint),
        )
        .route("/v1/pools", get(h::list_pools))
        .route("/v1/pools/{backend}/{class}", get(h::get_pool))
        .route("/v1/pools/{backend}/{class}/drain", post(h::drain_pool))
        .route(
            "/v1/pools/{backend}/{class}/sizing",
            put(h::set_pool_sizing),
        )
        .route(
            "/v1/templates",
            get(h::list_templates).post(h::create_template),
        )
        .route("/v1/templates/gc", post(h::gc_templates))
        .route(
            "/v1/templates/{id}",
            get(h::get_template).delete(h::delete_template),
        )
        .route("/v1/policies", get(h::list_policies))
        .route("/v1/hooks", get(h::list_hooks))
        .route("/v1/metrics", get(h::metrics))
        .route("/metrics", get(h::metrics))
        .route("/v1/admin/reload", post(h::reload))
        .route("/v1/host", get(h::host))
        .route("/v1/openapi.json", get(h::openapi))
        .layer(DefaultBodyLimit::max(json_limit))
        .merge(files)
        .fallback(h::not_found)
        .method_not_allowed_fallback(h::method_not_allowed)
        .layer(middleware::from_fn(run_to_completion))
        .layer(middleware::from_fn_with_state(timeout, request_timeout))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The same router behind bearer-token authentication (TCP).
pub fn tcp_router(m: Arc<Manager>, tokens: Tokens) -> Router {
    router(m).layer(middleware::from_fn_with_state(tokens, bearer_auth))
}

/// Counts and times every request by method, route template and status; logs it with the
/// instance id when the route has one.
async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let path = req.uri().path().to_string();
    let instance_id = path
        .strip_prefix("/v1/instances/")
        .and_then(|r| r.split('/').next())
        .unwrap_or("")
        .to_string();
    let span = tracing::info_span!("request", %method, %route, instance_id = %instance_id);
    let t0 = Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let labels = RouteLabels {
        method,
        route,
        status,
    };
    s.m.metrics.requests_total.get_or_create(&labels).inc();
    s.m.metrics
        .http_request_duration
        .get_or_create(&labels)
        .observe(t0.elapsed().as_secs_f64());
    span.in_scope(|| tracing::debug!(status, ms = t0.elapsed().as_millis() as u64, path = %path, "request done"));
    resp
}

/// Operations that change state run to completion in their own task even when the request
/// is cut short (request timeout, client gone): a destroy, reset or checkpoint dropped
/// half-way would leave a half-torn-down sandbox or an orphan checkpoint copy. Exec stays
/// tied to its request (a client that leaves kills its command); creates handle being
/// abandoned themselves (the sandbox is destroyed, see `Manager::create`); reads are free.
async fn run_to_completion(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let tied = req.method() == axum::http::Method::GET
        || path.ends_with("/exec")
        || path == "/v1/instances";
    if tied {
        return next.run(req).await;
    }
    match tokio::spawn(next.run(req)).await {
        Ok(r) => r,
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("request task failed: {e}"),
        )
        .into_response(),
    }
}

async fn request_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::unavailable(
            "request_timeout",
            format!("request took longer than {limit:?} ([limits].request_timeout)"),
            1,
        )
        .into_response(),
    }
}

/// Constant-time comparison, so a token cannot be guessed byte by byte from timing.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn bearer_auth(State(tokens): State<Tokens>, req: Request, next: Next) -> Response {
    if tokens.0.is_empty() {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t)
            if tokens
                .0
                .iter()
                .fold(false, |ok, good| ok | ct_eq(t.as_bytes(), good.as_bytes())) =>
        {
            next.run(req).await
        }
        _ => {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid bearer token",
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq() {
        assert!(super::ct_eq(b"abc", b"abc"));
        assert!(!super::ct_eq(b"abc", b"abd"));
        assert!(!super::ct_eq(b"abc", b"abcd"));
    }
}
