//! HTTP handlers: validate, call the manager, shape the answer. Nothing else lives here.

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{JsonBody, OptJsonBody, Path, Query, RawBody};
use super::AppState;
use crate::model::*;
use anvil_backends::agent::ExecEvent;
use anvil_core::backend::BackendKind;
use anvil_core::lifecycle::{SandboxState, TerminationReason};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Instant;
use utoipa::IntoParams;

fn check_id(id: &str) -> ApiResult<()> {
    anvil_core::ids::validate_instance_id(id)
        .map_err(|e| ApiError::bad_request(format!("id `{id}`: {e}")))
}

fn parse_backend(s: &str) -> ApiResult<BackendKind> {
    s.parse::<BackendKind>()
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "not_found", e))
}

#[utoipa::path(get, path = "/v1/health", tag = "daemon", responses((status = 200, body = HealthResponse)))]
pub async fn health() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only instances in this state (`destroyed` lists recently destroyed ones).
    pub state: Option<String>,
    pub workload_class: Option<String>,
    /// `key=value`; several as `k1=v1,k2=v2`.
    pub label: Option<String>,
}

#[utoipa::path(get, path = "/v1/instances", tag = "instances", params(ListQuery),
    responses((status = 200, body = [Instance]), (status = 400, body = ErrorBody)))]
pub async fn list_instances(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<Instance>>> {
    let state = match &q.state {
        Some(st) => Some(st.parse::<SandboxState>().map_err(ApiError::bad_request)?),
        None => None,
    };
    let mut labels = BTreeMap::new();
    if let Some(l) = &q.label {
        for pair in l.split(',') {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                ApiError::bad_request(format!("label filter `{pair}` must be key=value"))
            })?;
            labels.insert(k.to_string(), v.to_string());
        }
    }
    let out =
        s.m.list()
            .await
            .into_iter()
            .filter(|i| match state {
                Some(st) => i.state == st,
                None => i.state != SandboxState::Destroyed,
            })
            .filter(|i| {
                q.workload_class
                    .as_ref()
                    .is_none_or(|c| &i.workload_class == c)
            })
            .filter(|i| labels.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
            .collect();
    Ok(Json(out))
}

#[utoipa::path(post, path = "/v1/instances", tag = "instances", request_body = CreateRequest,
    responses((status = 201, body = CreateResponse), (status = 200, description = "idempotent replay", body = CreateResponse),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_instance(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<CreateRequest>,
) -> ApiResult<Response> {
    let (resp, created) = s.m.create(req).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(resp)).into_response())
}

#[utoipa::path(get, path = "/v1/instances/{id}", tag = "instances", params(("id" = String, Path)),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody)))]
pub async fn get_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Instance>> {
    check_id(&id)?;
    Ok(Json(s.m.get(&id).await?))
}

#[utoipa::path(post, path = "/v1/instances/{id}/destroy", tag = "instances", params(("id" = String, Path)),
    responses((status = 200, body = DestroyResponse), (status = 404, body = ErrorBody)))]
pub async fn destroy_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<DestroyResponse>> {
    check_id(&id)?;
    let inst = s.m.destroy(&id, TerminationReason::Requested).await?;
    Ok(Json(DestroyResponse {
        destroyed: true,
        instance_id: inst.id,
    }))
}

#[utoipa::path(delete, path = "/v1/instances/{id}", tag = "instances", params(("id" = String, Path)),
    responses((status = 200, body = DestroyResponse), (status = 404, body = ErrorBody)))]
pub async fn delete_instance(
    state: State<AppState>,
    id: Path<String>,
) -> ApiResult<Json<DestroyResponse>> {
    destroy_instance(state, id).await
}

#[utoipa::path(post, path = "/v1/instances/{id}/checkpoint", tag = "instances", params(("id" = String, Path)),
    request_body(content = CheckpointRequest, description = "optional"),
    responses((status = 200, body = CheckpointResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn checkpoint_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
    OptJsonBody(req): OptJsonBody<CheckpointRequest>,
) -> ApiResult<Json<CheckpointResponse>> {
    check_id(&id)?;
    Ok(Json(s.m.checkpoint(&id, req.stop).await?))
}

#[utoipa::path(get, path = "/v1/instances/{id}/checkpoints", tag = "checkpoints", params(("id" = String, Path)),
    responses((status = 200, body = [Checkpoint]), (status = 404, body = ErrorBody)))]
pub async fn list_checkpoints(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<Checkpoint>>> {
    check_id(&id)?;
    s.m.slot(&id)?;
    Ok(Json(s.m.checkpoints_of(&id)))
}

#[utoipa::path(post, path = "/v1/instances/{id}/rollback", tag = "checkpoints", params(("id" = String, Path)), request_body = RollbackRequest,
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn rollback_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<RollbackRequest>,
) -> ApiResult<Json<Instance>> {
    check_id(&id)?;
    check_id(&req.checkpoint_id)?;
    Ok(Json(s.m.rollback(&id, &req.checkpoint_id).await?))
}

#[utoipa::path(delete, path = "/v1/checkpoints/{checkpoint_id}", tag = "checkpoints", params(("checkpoint_id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_checkpoint(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    check_id(&id)?;
    s.m.delete_checkpoint(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/instances/{id}/reset", tag = "instances", params(("id" = String, Path)),
    request_body(content = ResetRequest, description = "optional"),
    responses((status = 200, body = ResetResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn reset_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
    OptJsonBody(req): OptJsonBody<ResetRequest>,
) -> ApiResult<Json<ResetResponse>> {
    check_id(&id)?;
    Ok(Json(s.m.reset(&id, req.return_to_pool).await?))
}

#[utoipa::path(post, path = "/v1/instances/{id}/pause", tag = "instances", params(("id" = String, Path)),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn pause_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Instance>> {
    check_id(&id)?;
    Ok(Json(s.m.pause(&id).await?))
}

#[utoipa::path(post, path = "/v1/instances/{id}/resume", tag = "instances", params(("id" = String, Path)),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Instance>> {
    check_id(&id)?;
    Ok(Json(s.m.resume(&id).await?))
}

#[utoipa::path(post, path = "/v1/instances/{id}/ttl", tag = "instances", params(("id" = String, Path)), request_body = TtlRequest,
    responses((status = 200, body = Instance), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn set_ttl(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<TtlRequest>,
) -> ApiResult<Json<Instance>> {
    check_id(&id)?;
    Ok(Json(s.m.set_ttl(&id, req.ttl_secs).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExecQuery {
    /// Stream NDJSON events instead of one JSON answer.
    #[serde(default)]
    pub stream: bool,
}

#[utoipa::path(post, path = "/v1/instances/{id}/exec", tag = "exec", params(("id" = String, Path), ExecQuery), request_body = ExecRequest,
    responses((status = 200, description = "the result, or with ?stream=true an NDJSON stream of ExecStreamEvent", body = ExecResponse),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn exec_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ExecQuery>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> ApiResult<Response> {
    check_id(&id)?;
    let target = s.m.exec_target(&id).await?;
    if !q.stream {
        return Ok(Json(s.m.exec_run(&target, req).await?).into_response());
    }
    let t0 = Instant::now();
    let stream = s.m.exec_start(&target, req).await?;
    let m = s.m.clone();
    let backend = target.backend;
    // One NDJSON line per event; the connection to the agent closes when the client goes away.
    let body = futures::stream::unfold(Some(stream), move |st| {
        let m = m.clone();
        async move {
            let mut st = st?;
            let ev = match st.next().await {
                None => return None,
                Some(Ok(ExecEvent::Stdout(b))) => ExecStreamEvent::data("stdout", &b),
                Some(Ok(ExecEvent::Stderr(b))) => ExecStreamEvent::data("stderr", &b),
                Some(Ok(ExecEvent::Exit(x))) => {
                    m.observe_exec(backend, t0.elapsed());
                    let mut line = serde_json::to_vec(&ExecStreamEvent::exit(
                        x.exit_code,
                        x.signal,
                        x.timed_out,
                        x.duration_ms,
                    ))
                    .unwrap_or_default();
                    line.push(b'\n');
                    return Some((
                        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
                        None,
                    ));
                }
                Some(Err(e)) => {
                    let mut line = serde_json::to_vec(&ExecStreamEvent::error(e.to_string()))
                        .unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok(bytes::Bytes::from(line)), None));
                }
            };
            let mut line = serde_json::to_vec(&ev).unwrap_or_default();
            line.push(b'\n');
            Some((Ok(bytes::Bytes::from(line)), Some(st)))
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Octal mode for PUT (default 644).
    pub mode: Option<String>,
    /// GET: list a directory as JSON instead of reading a file.
    #[serde(default)]
    pub list: bool,
}

#[utoipa::path(get, path = "/v1/instances/{id}/files", tag = "files", params(("id" = String, Path), FileQuery),
    responses((status = 200, description = "the file's bytes (or a JSON listing with list=true)", content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn get_file(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> ApiResult<Response> {
    check_id(&id)?;
    if q.list {
        return Ok(Json(s.m.list_dir(&id, &q.path).await?).into_response());
    }
    let data = s.m.read_file(&id, &q.path).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

#[utoipa::path(put, path = "/v1/instances/{id}/files", tag = "files", params(("id" = String, Path), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = FileWriteResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put_file(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    RawBody(body): RawBody,
) -> ApiResult<Json<FileWriteResponse>> {
    check_id(&id)?;
    let mode = match &q.mode {
        Some(m) => u32::from_str_radix(m, 8)
            .map_err(|_| ApiError::bad_request(format!("mode `{m}` is not octal")))?,
        None => 0o644,
    };
    let bytes = s.m.write_file(&id, &q.path, &body, mode).await?;
    Ok(Json(FileWriteResponse {
        path: q.path,
        bytes,
    }))
}

#[utoipa::path(get, path = "/v1/pools", tag = "pools", responses((status = 200, body = [PoolView])))]
pub async fn list_pools(State(s): State<AppState>) -> Json<Vec<PoolView>> {
    Json(s.m.pools.views(None, None))
}

#[utoipa::path(get, path = "/v1/pools/{backend}/{class}", tag = "pools", params(("backend" = String, Path), ("class" = String, Path)),
    responses((status = 200, body = [PoolView]), (status = 404, body = ErrorBody)))]
pub async fn get_pool(
    State(s): State<AppState>,
    Path((backend, class)): Path<(String, String)>,
) -> ApiResult<Json<Vec<PoolView>>> {
    let b = parse_backend(&backend)?;
    Ok(Json(s.m.pools.views(Some(b), Some(&class))))
}

#[utoipa::path(post, path = "/v1/pools/{backend}/{class}/drain", tag = "pools", params(("backend" = String, Path), ("class" = String, Path)),
    responses((status = 200, body = DrainResponse), (status = 404, body = ErrorBody)))]
pub async fn drain_pool(
    State(s): State<AppState>,
    Path((backend, class)): Path<(String, String)>,
) -> ApiResult<Json<DrainResponse>> {
    let b = parse_backend(&backend)?;
    let drained = s.m.drain(b, &class).await;
    Ok(Json(DrainResponse {
        count: drained.len(),
        drained,
    }))
}

#[utoipa::path(put, path = "/v1/pools/{backend}/{class}/sizing", tag = "pools", params(("backend" = String, Path), ("class" = String, Path)), request_body = SizingRequest,
    responses((status = 200, body = [PoolView]), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn set_pool_sizing(
    State(s): State<AppState>,
    Path((backend, class)): Path<(String, String)>,
    JsonBody(req): JsonBody<SizingRequest>,
) -> ApiResult<Json<Vec<PoolView>>> {
    let b = parse_backend(&backend)?;
    Ok(Json(s.m.set_sizing(b, &class, req).await?))
}

#[utoipa::path(get, path = "/v1/templates", tag = "templates", responses((status = 200, body = [anvil_core::template::TemplateRecord])))]
pub async fn list_templates(
    State(s): State<AppState>,
) -> Json<Vec<anvil_core::template::TemplateRecord>> {
    Json(s.m.list_templates())
}

#[utoipa::path(post, path = "/v1/templates", tag = "templates", request_body = TemplateRequest,
    responses((status = 201, body = anvil_core::template::TemplateRecord), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_template(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<TemplateRequest>,
) -> ApiResult<Response> {
    let t = s.m.import_template(req).await?;
    Ok((StatusCode::CREATED, Json(t)).into_response())
}

#[utoipa::path(get, path = "/v1/templates/{id}", tag = "templates", params(("id" = String, Path)),
    responses((status = 200, body = anvil_core::template::TemplateRecord), (status = 404, body = ErrorBody)))]
pub async fn get_template(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<anvil_core::template::TemplateRecord>> {
    Ok(Json(s.m.get_template(&id)?))
}

#[utoipa::path(delete, path = "/v1/templates/{id}", tag = "templates", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_template(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.m.delete_template(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/templates/gc", tag = "templates", responses((status = 200, body = TemplateGcResponse)))]
pub async fn gc_templates(State(s): State<AppState>) -> ApiResult<Json<TemplateGcResponse>> {
    Ok(Json(s.m.gc_templates()?))
}

#[utoipa::path(get, path = "/v1/policies", tag = "daemon", responses((status = 200, body = [PolicyView])))]
pub async fn list_policies(State(s): State<AppState>) -> Json<Vec<PolicyView>> {
    let set = s.m.policies.load();
    Json(
        set.policies()
            .iter()
            .map(|p| PolicyView {
                name: p.policy_name.clone(),
                priority: p.priority,
                workload_class: p.matches.workload_class.clone(),
                backend_priority: p.select.backend_priority.clone(),
            })
            .collect(),
    )
}

#[utoipa::path(get, path = "/v1/hooks", tag = "daemon", responses((status = 200, body = [anvil_core::hooks::HookView])))]
pub async fn list_hooks(State(s): State<AppState>) -> Json<Vec<anvil_core::hooks::HookView>> {
    Json(s.m.hooks.list())
}

#[utoipa::path(get, path = "/v1/metrics", tag = "daemon", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(s): State<AppState>) -> ApiResult<Response> {
    if !s.m.cfg.metrics.enabled {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "metrics are disabled ([metrics].enabled = false)",
        ));
    }
    s.m.refresh_gauges().await;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.m.metrics.encode(),
    )
        .into_response())
}

#[utoipa::path(post, path = "/v1/admin/reload", tag = "daemon",
    responses((status = 200, body = ReloadResponse), (status = 400, body = ErrorBody)))]
pub async fn reload(State(s): State<AppState>) -> ApiResult<Json<ReloadResponse>> {
    let names =
        s.m.reload_policies()
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "reload_failed", e))?;
    Ok(Json(ReloadResponse {
        reloaded: true,
        policies: names,
    }))
}

#[utoipa::path(get, path = "/v1/host", tag = "daemon", responses((status = 200, body = HostView)))]
pub async fn host(State(s): State<AppState>) -> Json<HostView> {
    Json(s.m.host_view().await)
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "daemon", responses((status = 200, description = "this document")))]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::document(),
    )
        .into_response()
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method {method} is not allowed on {}", uri.path()),
    )
}
