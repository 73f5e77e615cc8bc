//! The OpenAPI 3 document, generated from the handlers' annotations.

use super::error::ErrorBody;
use super::handlers as h;
use crate::model::*;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "anvil",
        description = "Per-host sandbox daemon API (SPEC §4). Served on a Unix socket and optionally TCP (bearer token)."
    ),
    paths(
        h::health,
        h::list_instances,
        h::create_instance,
        h::get_instance,
        h::destroy_instance,
        h::delete_instance,
        h::checkpoint_instance,
        h::list_checkpoints,
        h::rollback_instance,
        h::delete_checkpoint,
        h::reset_instance,
        h::pause_instance,
        h::resume_instance,
        h::set_ttl,
        h::exec_instance,
        h::get_file,
        h::put_file,
        h::list_pools,
        h::get_pool,
        h::drain_pool,
        h::set_pool_sizing,
        h::list_templates,
        h::create_template,
        h::get_template,
        h::delete_template,
        h::gc_templates,
        h::list_policies,
        h::list_hooks,
        h::metrics,
        h::reload,
        h::host,
        h::openapi,
    ),
    components(schemas(ErrorBody, ExecStreamEvent))
)]
pub struct ApiDoc;

/// The document as pretty JSON (what `GET /v1/openapi.json` serves and `docs/openapi.json` holds).
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    /// The committed document must match the code. Regenerate with
    /// `cargo run -p anvil -- openapi > docs/openapi.json`.
    #[test]
    fn committed_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = super::document();
        assert!(
            committed.trim() == generated.trim(),
            "docs/openapi.json is stale; run `cargo run -p anvil -- openapi > docs/openapi.json`"
        );
    }

    #[test]
    fn document_has_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/health",
            "/v1/instances",
            "/v1/instances/{id}/exec",
            "/v1/instances/{id}/files",
            "/v1/pools/{backend}/{class}/sizing",
            "/v1/admin/reload",
            "/v1/host",
            "/v1/checkpoints/{checkpoint_id}",
            "/v1/templates/gc",
        ] {
            assert!(paths.contains_key(p), "missing {p}");
        }
    }
}
