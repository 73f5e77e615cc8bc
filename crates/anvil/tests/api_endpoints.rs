//! Every endpoint of SPEC §4, over real HTTP, on the Unix socket and on TCP (with a token).
mod common;
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "s3cret-token-for-tests";

type Call<'a> = &'a dyn Fn(&str, &str, Option<Vec<u8>>) -> Response;

fn body(v: Value) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(&v).unwrap())
}

fn ok(r: Response, status: u16, what: &str) -> Response {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    r
}

/// Walks every route with a successful request (and the expected refusals of the mock).
/// `tag` keeps template names apart when the same daemon is walked twice.
fn walk(d: &Daemon, call: Call, tag: &str) {
    let h = ok(call("GET", "/v1/health", None), 200, "health").json();
    assert_eq!(h["status"], "ok");
    assert!(!h["version"].as_str().unwrap().is_empty());

    // Templates: import a rootfs directory.
    let src = d.dir.path().join(format!("rootfs-{tag}"));
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), tag).unwrap();
    let tname = format!("walk-{tag}");
    let t = ok(
        call(
            "POST",
            "/v1/templates",
            body(json!({"name": tname, "rootfs_dir": src})),
        ),
        201,
        "import template",
    )
    .json();
    let tid = t["id"].as_str().unwrap().to_string();
    assert!(
        t["image_digest"].as_str().unwrap().starts_with("sha256:"),
        "{t}"
    );
    assert!(
        d.state_dir()
            .join("templates")
            .join(&tid)
            .join("rootfs/etc/hostname")
            .is_file(),
        "template rootfs copied"
    );
    let list = ok(call("GET", "/v1/templates", None), 200, "templates").json();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == tid.as_str()),
        "{list}"
    );
    let one = ok(
        call("GET", &format!("/v1/templates/{tid}"), None),
        200,
        "template",
    )
    .json();
    assert_eq!(one["name"], tname.as_str());

    // Create with that template, then every instance route.
    let c = ok(
        call(
            "POST",
            "/v1/instances",
            body(
                json!({"workload_class": "mock-class", "template": tname, "labels": {"walk": tag}}),
            ),
        ),
        201,
        "create",
    )
    .json();
    assert_eq!(c["start_path"], "cold");
    assert_eq!(c["decision"]["policy"], "mock-default");
    assert_eq!(c["decision"]["backend"], "mock");
    let id = c["instance"]["id"].as_str().unwrap().to_string();
    assert_eq!(c["instance"]["template"], tid.as_str());
    let inst = ok(
        call("GET", &format!("/v1/instances/{id}"), None),
        200,
        "get",
    )
    .json();
    assert_eq!(inst["state"], "running");
    let listed = ok(
        call("GET", &format!("/v1/instances?label=walk={tag}"), None),
        200,
        "list",
    )
    .json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    let w = ok(
        call(
            "PUT",
            &format!("/v1/instances/{id}/files?path=/data/a.txt"),
            Some(b"walk data".to_vec()),
        ),
        200,
        "put file",
    )
    .json();
    assert_eq!(w["bytes"], 9);
    let f = ok(
        call(
            "GET",
            &format!("/v1/instances/{id}/files?path=/data/a.txt"),
            None,
        ),
        200,
        "get file",
    );
    assert_eq!(f.body, b"walk data");
    expect_error(
        &call(
            "POST",
            &format!("/v1/instances/{id}/exec"),
            body(json!({"cmd": ["true"]})),
        ),
        422,
        Some("not_supported"),
    );

    assert_eq!(
        ok(
            call("POST", &format!("/v1/instances/{id}/pause"), None),
            200,
            "pause"
        )
        .json()["state"],
        "paused"
    );
    assert_eq!(
        ok(
            call("POST", &format!("/v1/instances/{id}/resume"), None),
            200,
            "resume"
        )
        .json()["state"],
        "running"
    );

    let ck = ok(
        call("POST", &format!("/v1/instances/{id}/checkpoint"), None),
        200,
        "checkpoint",
    )
    .json();
    let ck_id = ck["checkpoint_id"].as_str().unwrap().to_string();
    assert_eq!(ck["instance_id"], id.as_str());
    assert_eq!(ck["kind"], "filesystem");
    assert!(ck["size_bytes"].as_u64().unwrap() >= 9, "{ck}");
    let cks = ok(
        call("GET", &format!("/v1/instances/{id}/checkpoints"), None),
        200,
        "checkpoints",
    )
    .json();
    assert_eq!(cks.as_array().unwrap().len(), 1);
    assert_eq!(cks[0]["checkpoint_id"], ck_id.as_str());

    ok(
        call(
            "PUT",
            &format!("/v1/instances/{id}/files?path=/data/a.txt"),
            Some(b"changed".to_vec()),
        ),
        200,
        "overwrite",
    );
    ok(
        call(
            "POST",
            &format!("/v1/instances/{id}/rollback"),
            body(json!({"checkpoint_id": ck_id})),
        ),
        200,
        "rollback",
    );
    assert_eq!(
        call(
            "GET",
            &format!("/v1/instances/{id}/files?path=/data/a.txt"),
            None
        )
        .body,
        b"walk data"
    );

    let ttl = ok(
        call(
            "POST",
            &format!("/v1/instances/{id}/ttl"),
            body(json!({"ttl_secs": 600})),
        ),
        200,
        "ttl",
    )
    .json();
    assert_eq!(ttl["ttl_secs"], 600);
    assert!(ttl["expires_at"].is_string());

    let reset = ok(
        call("POST", &format!("/v1/instances/{id}/reset"), None),
        200,
        "reset",
    )
    .json();
    assert_eq!(reset["instance"]["reset_count"], 1);
    assert_eq!(reset["mode"], "overlayfs-rollback");

    // The template is in use by the instance and the checkpoint.
    expect_error(
        &call("DELETE", &format!("/v1/templates/{tid}"), None),
        409,
        Some("template_in_use"),
    );

    let des = ok(
        call("POST", &format!("/v1/instances/{id}/destroy"), None),
        200,
        "destroy",
    )
    .json();
    assert_eq!(des, json!({"destroyed": true, "instance_id": id}));
    let id2 = ok(
        call(
            "POST",
            "/v1/instances",
            body(json!({"workload_class": "mock-class"})),
        ),
        201,
        "create 2",
    )
    .json()["instance"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let des = ok(
        call("DELETE", &format!("/v1/instances/{id2}"), None),
        200,
        "delete",
    )
    .json();
    assert_eq!(des["destroyed"], true);
    assert_eq!(d.state_of(&id2), "destroyed");

    assert_eq!(
        ok(
            call("DELETE", &format!("/v1/checkpoints/{ck_id}"), None),
            204,
            "delete checkpoint"
        )
        .body
        .len(),
        0
    );
    ok(
        call("DELETE", &format!("/v1/templates/{tid}"), None),
        204,
        "delete template",
    );
    assert!(
        !d.state_dir().join("templates").join(&tid).exists(),
        "template files removed"
    );
    let gc = ok(call("POST", "/v1/templates/gc", None), 200, "gc").json();
    assert!(
        gc["removed"].is_array() && gc["freed_bytes"].is_u64(),
        "{gc}"
    );

    // Pools.
    let pools = ok(call("GET", "/v1/pools", None), 200, "pools").json();
    let p = pools
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["key"]["workload_class"] == "mock-pooled")
        .unwrap_or_else(|| panic!("{pools}"));
    assert_eq!(p["key"]["backend"], "mock");
    assert_eq!(p["key"]["image_digest"], "none");
    for k in [
        "warm_count",
        "target",
        "total_hits",
        "total_misses",
        "evict_count",
        "refill_failures",
    ] {
        assert!(p["stats"][k].is_u64(), "stats.{k}: {p}");
    }
    let one = ok(call("GET", "/v1/pools/mock/mock-pooled", None), 200, "pool").json();
    assert_eq!(one.as_array().unwrap().len(), 1, "{one}");
    let sized = ok(
        call(
            "PUT",
            "/v1/pools/mock/mock-pooled/sizing",
            body(json!({"min": 1, "target": 2, "max": 4, "enabled": true})),
        ),
        200,
        "sizing",
    )
    .json();
    assert_eq!(sized[0]["stats"]["target"], 2, "{sized}");
    let drained = ok(
        call("POST", "/v1/pools/mock/mock-pooled/drain", None),
        200,
        "drain",
    )
    .json();
    assert_eq!(
        drained["count"].as_u64().unwrap() as usize,
        drained["drained"].as_array().unwrap().len()
    );

    // Daemon views.
    let pol = ok(call("GET", "/v1/policies", None), 200, "policies").json();
    let names: Vec<_> = pol
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"mock-default") && names.contains(&"mock-pooled"),
        "{pol}"
    );
    let mp = pol
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "mock-pooled")
        .unwrap();
    assert_eq!(mp["priority"], 20);
    assert_eq!(mp["workload_class"], json!(["mock-pooled"]));
    assert_eq!(mp["backend_priority"], json!(["mock"]));
    let hooks = ok(call("GET", "/v1/hooks", None), 200, "hooks").json();
    assert!(!hooks.as_array().unwrap().is_empty(), "{hooks}");
    assert!(
        hooks[0]["name"].is_string() && hooks[0]["owners"].is_array(),
        "{hooks}"
    );
    let host = ok(call("GET", "/v1/host", None), 200, "host").json();
    let mock = host["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"] == "mock")
        .unwrap_or_else(|| panic!("{host}"));
    assert_eq!(mock["available"], true);
    assert!(host["capacity"]["max_instances"].as_u64().unwrap() > 0);
    assert!(host["cgroup_mode"].is_string());
    for path in ["/v1/metrics", "/metrics"] {
        let m = ok(call("GET", path, None), 200, path);
        assert!(
            m.text().contains("anvil_requests_total{"),
            "{path}: {}",
            m.text()
        );
    }
    let api = ok(call("GET", "/v1/openapi.json", None), 200, "openapi").json();
    assert!(api["openapi"].as_str().unwrap().starts_with("3."));
    let rel = ok(call("POST", "/v1/admin/reload", None), 200, "reload").json();
    assert_eq!(rel["reloaded"], true);
}

fn start_with_tcp() -> Daemon {
    let mut o = Opts {
        tcp: true,
        token: Some(TOKEN.into()),
        ..Opts::default()
    };
    o.policies
        .push(("pooled.toml".into(), MOCK_POOL_POLICY.into()));
    Daemon::start(o)
}

#[test]
fn every_endpoint_over_unix_socket() {
    let d = start_with_tcp();
    walk(&d, &|m, p, b| d.request(m, p, b), "unix");
}

#[test]
fn every_endpoint_over_tcp_with_token() {
    let d = start_with_tcp();
    walk(&d, &|m, p, b| d.tcp(m, p, b, Some(TOKEN)), "tcp");
}

#[test]
fn tcp_requires_the_bearer_token() {
    let d = start_with_tcp();
    for (m, p, b) in [
        ("GET", "/v1/health", None),
        ("GET", "/v1/instances", None),
        (
            "POST",
            "/v1/instances",
            body(json!({"workload_class": "mock-class"})),
        ),
        ("GET", "/v1/metrics", None),
        ("GET", "/v1/nope", None),
    ] {
        let r = d.tcp(m, p, b.clone(), None);
        expect_error(&r, 401, Some("unauthorized"));
        assert_eq!(
            r.headers
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap()),
            Some("Bearer"),
            "{m} {p}"
        );
        expect_error(
            &d.tcp(m, p, b.clone(), Some("wrong-token")),
            401,
            Some("unauthorized"),
        );
        expect_error(
            &d.tcp(m, p, b, Some(&format!("{TOKEN}x"))),
            401,
            Some("unauthorized"),
        );
    }
    // Nothing was created by the refused POSTs.
    assert!(d.ids("workload_class=mock-class").is_empty());
    let r = d.tcp("GET", "/v1/health", None, Some(TOKEN));
    assert_eq!(r.status, 200);
    let r = d.tcp(
        "POST",
        "/v1/instances",
        body(json!({"workload_class": "mock-class"})),
        Some(TOKEN),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["instance"]["id"].as_str().unwrap().to_string();
    // The Unix socket needs no token and sees the same instance.
    assert_eq!(d.state_of(&id), "running");
    // Routing errors over TCP keep the JSON contract once authenticated.
    expect_error(
        &d.tcp("GET", "/v1/nope", None, Some(TOKEN)),
        404,
        Some("not_found"),
    );
    expect_error(
        &d.tcp("DELETE", "/v1/health", None, Some(TOKEN)),
        405,
        Some("method_not_allowed"),
    );
}
