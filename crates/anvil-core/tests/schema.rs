//! The API-facing types produce OpenAPI schemas with the wire shapes the daemon serves.

use anvil_core::hooks::{HookCheck, HookView};
use anvil_core::policy::{Policy, PolicySummary};
use anvil_core::pool::{PoolKey, PoolSizing, PoolStats};
use anvil_core::quantity::{ByteSize, DurationValue};
use anvil_core::selector::Decision;
use anvil_core::template::TemplateRecord;
use utoipa::PartialSchema;

fn json<T: PartialSchema>() -> serde_json::Value {
    serde_json::to_value(T::schema()).unwrap()
}

#[test]
fn quantities_are_strings() {
    assert_eq!(json::<ByteSize>()["type"], "string");
    assert_eq!(json::<DurationValue>()["type"], "string");
}

#[test]
fn api_types_have_their_fields() {
    for (schema, fields) in [
        (
            json::<Decision>(),
            &["policy", "backend", "skipped", "notes"][..],
        ),
        (
            json::<PoolKey>(),
            &["backend", "workload_class", "image_digest"][..],
        ),
        (
            json::<PoolStats>(),
            &[
                "warm_count",
                "target",
                "total_hits",
                "total_misses",
                "evict_count",
                "refill_failures",
            ][..],
        ),
        (
            json::<PoolSizing>(),
            &[
                "min",
                "target",
                "max",
                "enabled",
                "image_digest",
                "warm_ttl_secs",
            ][..],
        ),
        (
            json::<PolicySummary>(),
            &["name", "priority", "workload_class", "backend_priority"][..],
        ),
        (
            json::<HookView>(),
            &["name", "description", "owners", "available", "reason"][..],
        ),
        (
            json::<HookCheck>(),
            &["backend", "fallback", "missing", "notes"][..],
        ),
        (
            json::<TemplateRecord>(),
            &[
                "id",
                "name",
                "image_digest",
                "rootfs_dir",
                "status",
                "size_bytes",
            ][..],
        ),
        (
            json::<Policy>(),
            &[
                "manifest_version",
                "policy_name",
                "match",
                "select",
                "pool",
                "quota",
            ][..],
        ),
    ] {
        let props = schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{schema}"));
        for f in fields {
            assert!(props.contains_key(*f), "missing `{f}` in {schema}");
        }
    }
    // The file path of a policy is not part of its wire shape.
    assert!(!json::<Policy>()["properties"]
        .as_object()
        .unwrap()
        .contains_key("origin"));
}
