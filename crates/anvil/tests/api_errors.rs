//! The error contract of SPEC §4: 400, 404, 405, 409, 413, 422, 503, each with the JSON body
//! `{error, code, status}` (plus `instance_id` where an instance is concerned).
mod common;
use common::*;
use serde_json::json;

const BW_ONLY_POLICY: &str = r#"
manifest_version = 1
policy_name = "bw-only"
priority = 10
[match]
workload_class = ["bw-class"]
[select]
backend_priority = ["bubblewrap"]
"#;

fn raw(d: &Daemon, method: &str, path: &str, body: &[u8]) -> Response {
    d.request(method, path, Some(body.to_vec()))
}

#[test]
fn bad_requests_answer_400() {
    let d = Daemon::start(Opts::default());
    let id = d.create(json!({"workload_class": "mock-class"}));
    // Malformed JSON, wrong types, missing and unknown fields.
    for b in [
        &b"{not json"[..],
        b"[1,2",
        b"{\"workload_class\": 5}",
        b"{}",
        b"",
        b"{\"workload_class\":\"mock-class\",\"bogus\":1}",
    ] {
        let v = expect_error(
            &raw(&d, "POST", "/v1/instances", b),
            400,
            Some("bad_request"),
        );
        if b.starts_with(b"{\"workload_class\":\"mock-class\",\"bogus\"") {
            assert!(
                v["error"].as_str().unwrap().contains("bogus"),
                "names the unknown field: {v}"
            );
        }
    }
    expect_error(
        &raw(
            &d,
            "POST",
            &format!("/v1/instances/{id}/ttl"),
            b"{\"ttl_secs\": 5, \"extra\": true}",
        ),
        400,
        Some("bad_request"),
    );
    expect_error(
        &raw(
            &d,
            "POST",
            &format!("/v1/instances/{id}/ttl"),
            b"{\"ttl_secs\": 0}",
        ),
        400,
        Some("bad_request"),
    );
    expect_error(
        &raw(
            &d,
            "POST",
            &format!("/v1/instances/{id}/reset"),
            b"{\"return_to_pool\": \"yes\"}",
        ),
        400,
        Some("bad_request"),
    );
    expect_error(
        &raw(&d, "POST", &format!("/v1/instances/{id}/rollback"), b"{}"),
        400,
        Some("bad_request"),
    );
    expect_error(
        &raw(
            &d,
            "PUT",
            "/v1/pools/mock/mock-class/sizing",
            b"{\"min\": 3, \"target\": 2, \"max\": 4}",
        ),
        400,
        Some("bad_request"),
    );
    // Bad ids: in the path, in bodies.
    for bad in ["bad.id", "-leading", &"x".repeat(65), "a%20b"] {
        let v = expect_error(
            &d.get(&format!("/v1/instances/{bad}")),
            400,
            Some("bad_request"),
        );
        assert!(v["error"].as_str().unwrap().contains("id"), "{v}");
        expect_error(
            &d.post(&format!("/v1/instances/{bad}/destroy"), json!({})),
            400,
            Some("bad_request"),
        );
    }
    expect_error(
        &d.post(
            "/v1/instances",
            json!({"workload_class": "mock-class", "id": "no/slash"}),
        ),
        400,
        Some("bad_request"),
    );
    expect_error(
        &d.post(
            "/v1/instances",
            json!({"workload_class": "mock-class", "ttl_secs": 0}),
        ),
        400,
        Some("bad_request"),
    );
    expect_error(
        &d.post("/v1/instances", json!({"workload_class": " "})),
        400,
        Some("bad_request"),
    );
    expect_error(
        &d.post(
            &format!("/v1/instances/{id}/rollback"),
            json!({"checkpoint_id": "../x"}),
        ),
        400,
        Some("bad_request"),
    );
    // File paths must be absolute and may not leave the sandbox.
    expect_error(
        &d.get(&format!("/v1/instances/{id}/files?path=etc/passwd")),
        400,
        Some("bad_request"),
    );
    expect_error(
        &d.put(
            &format!("/v1/instances/{id}/files?path=relative.txt"),
            b"x".to_vec(),
        ),
        400,
        Some("bad_request"),
    );
    expect_error(
        &d.get(&format!("/v1/instances/{id}/files?path=/../../etc/passwd")),
        400,
        None,
    );
    expect_error(&d.get(&format!("/v1/instances/{id}/files")), 400, None);
    expect_error(
        &d.put(
            &format!("/v1/instances/{id}/files?path=/x&mode=99z"),
            b"x".to_vec(),
        ),
        400,
        Some("bad_request"),
    );
    // Bad list filters.
    expect_error(
        &d.get("/v1/instances?state=sleeping"),
        400,
        Some("bad_request"),
    );
    expect_error(
        &d.get("/v1/instances?label=novalue"),
        400,
        Some("bad_request"),
    );
    // The instance is untouched by all of this.
    assert_eq!(d.state_of(&id), "running");
}

#[test]
fn unknown_things_answer_404() {
    let d = Daemon::start(Opts::default());
    let id = d.create(json!({"workload_class": "mock-class"}));
    for p in [
        "/nope",
        "/v1",
        "/v1/instance",
        "/v1/instances/x/y/z",
        "/v2/health",
    ] {
        let v = expect_error(&d.get(p), 404, Some("not_found"));
        assert!(v["error"].as_str().unwrap().contains(p), "{v}");
    }
    let v = expect_error(&d.get("/v1/instances/sb-nope"), 404, Some("not_found"));
    assert_eq!(v["instance_id"], "sb-nope");
    for (m, p) in [
        ("POST", "/v1/instances/sb-nope/destroy"),
        ("DELETE", "/v1/instances/sb-nope"),
        ("POST", "/v1/instances/sb-nope/pause"),
        ("POST", "/v1/instances/sb-nope/resume"),
        ("POST", "/v1/instances/sb-nope/checkpoint"),
        ("POST", "/v1/instances/sb-nope/reset"),
        ("GET", "/v1/instances/sb-nope/checkpoints"),
    ] {
        let v = expect_error(&d.request(m, p, None), 404, Some("not_found"));
        assert_eq!(v["instance_id"], "sb-nope", "{m} {p}: {v}");
    }
    expect_error(
        &d.post("/v1/instances/sb-nope/ttl", json!({"ttl_secs": 5})),
        404,
        Some("not_found"),
    );
    expect_error(
        &d.get("/v1/instances/sb-nope/files?path=/a"),
        404,
        Some("not_found"),
    );
    expect_error(
        &d.post("/v1/instances/sb-nope/exec", json!({"cmd": ["true"]})),
        404,
        Some("not_found"),
    );
    // Unknown checkpoints.
    expect_error(&d.delete("/v1/checkpoints/ck-nope"), 404, Some("not_found"));
    expect_error(
        &d.post(
            &format!("/v1/instances/{id}/rollback"),
            json!({"checkpoint_id": "ck-nope"}),
        ),
        404,
        Some("not_found"),
    );
    expect_error(
        &d.post(
            "/v1/instances",
            json!({"workload_class": "mock-class", "from_checkpoint": "ck-nope"}),
        ),
        404,
        Some("not_found"),
    );
    // Unknown templates, pools, files.
    expect_error(&d.get("/v1/templates/tpl-nope"), 404, Some("not_found"));
    expect_error(&d.delete("/v1/templates/tpl-nope"), 404, Some("not_found"));
    expect_error(
        &d.get("/v1/pools/no-such-backend/mock-class"),
        404,
        Some("not_found"),
    );
    expect_error(
        &d.post("/v1/pools/no-such-backend/mock-class/drain", json!({})),
        404,
        Some("not_found"),
    );
    let v = expect_error(
        &d.get(&format!("/v1/instances/{id}/files?path=/missing.txt")),
        404,
        None,
    );
    assert_eq!(v["instance_id"], id.as_str());
}

#[test]
fn wrong_methods_answer_405_with_json() {
    let d = Daemon::start(Opts::default());
    for (m, p) in [
        ("DELETE", "/v1/health"),
        ("PUT", "/v1/instances"),
        ("POST", "/v1/instances/sb-x"),
        ("GET", "/v1/instances/sb-x/destroy"),
        ("GET", "/v1/instances/sb-x/checkpoint"),
        ("POST", "/v1/instances/sb-x/checkpoints"),
        ("DELETE", "/v1/instances/sb-x/files"),
        ("GET", "/v1/checkpoints/ck-x"),
        ("POST", "/v1/pools"),
        ("GET", "/v1/pools/mock/c/drain"),
        ("POST", "/v1/pools/mock/c/sizing"),
        ("PUT", "/v1/templates/gc"),
        ("GET", "/v1/admin/reload"),
        ("POST", "/metrics"),
        ("PATCH", "/v1/host"),
    ] {
        let r = d.request(m, p, None);
        let v = expect_error(&r, 405, Some("method_not_allowed"));
        let allow = r
            .headers
            .get("allow")
            .unwrap_or_else(|| panic!("{m} {p}: no Allow header"))
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            !allow.is_empty() && !allow.contains(m),
            "{m} {p}: Allow `{allow}`"
        );
        assert!(v["error"].as_str().unwrap().contains(m), "{m} {p}: {v}");
    }
}

#[test]
fn conflicts_answer_409() {
    let d = Daemon::start(Opts::default());
    let id = d.create(json!({"workload_class": "mock-class"}));
    // Illegal transitions.
    let v = expect_error(
        &d.post(&format!("/v1/instances/{id}/resume"), json!({})),
        409,
        Some("state_conflict"),
    );
    assert_eq!(v["instance_id"], id.as_str());
    d.post(&format!("/v1/instances/{id}/pause"), json!({}));
    expect_error(
        &d.post(&format!("/v1/instances/{id}/pause"), json!({})),
        409,
        Some("state_conflict"),
    );
    expect_error(
        &d.post(&format!("/v1/instances/{id}/reset"), json!({})),
        409,
        Some("state_conflict"),
    );
    expect_error(
        &d.put(&format!("/v1/instances/{id}/files?path=/a"), b"x".to_vec()),
        409,
        Some("state_conflict"),
    );
    d.post(&format!("/v1/instances/{id}/destroy"), json!({}));
    for op in ["pause", "resume", "checkpoint", "reset"] {
        let v = expect_error(
            &d.post(&format!("/v1/instances/{id}/{op}"), json!({})),
            409,
            Some("state_conflict"),
        );
        assert_eq!(v["instance_id"], id.as_str(), "{op}");
    }
    expect_error(
        &d.post(&format!("/v1/instances/{id}/ttl"), json!({"ttl_secs": 9})),
        409,
        Some("state_conflict"),
    );

    // Idempotent create: same id, different body.
    let body = json!({"workload_class": "mock-class", "id": "client-1", "labels": {"a": "1"}});
    assert_eq!(d.post("/v1/instances", body.clone()).status, 201);
    let v = expect_error(
        &d.post(
            "/v1/instances",
            json!({"workload_class": "mock-class", "id": "client-1", "labels": {"a": "2"}}),
        ),
        409,
        Some("idempotency_conflict"),
    );
    assert_eq!(v["instance_id"], "client-1");
    assert_eq!(
        d.instance("client-1")["labels"]["a"],
        "1",
        "the conflicting request changed nothing"
    );

    // A checkpoint that holds a hibernated instance cannot be deleted.
    let h = d.create(json!({"workload_class": "mock-class"}));
    let ck = d
        .post(
            &format!("/v1/instances/{h}/checkpoint"),
            json!({"stop": true}),
        )
        .json()["checkpoint_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(d.state_of(&h), "checkpointed");
    expect_error(
        &d.delete(&format!("/v1/checkpoints/{ck}")),
        409,
        Some("checkpoint_in_use"),
    );
    assert_eq!(
        d.post(&format!("/v1/instances/{h}/resume"), json!({}))
            .status,
        200
    );
    assert_eq!(d.delete(&format!("/v1/checkpoints/{ck}")).status, 204);

    // A template in use cannot be deleted; a duplicate name is refused.
    let src = d.dir.path().join("rootfs");
    std::fs::create_dir_all(&src).unwrap();
    let t = d.post("/v1/templates", json!({"name": "t1", "rootfs_dir": src}));
    assert_eq!(t.status, 201, "{}", t.text());
    expect_error(
        &d.post("/v1/templates", json!({"name": "t1", "rootfs_dir": src})),
        409,
        Some("template_exists"),
    );
    d.create(json!({"workload_class": "mock-class", "template": "t1"}));
    expect_error(&d.delete("/v1/templates/t1"), 409, Some("template_in_use"));
}

#[test]
fn oversized_bodies_answer_413() {
    let d = Daemon::start(Opts {
        extra: "[limits]\nmax_json_body = \"1KiB\"\nmax_file_body = \"4KiB\"\n".into(),
        ..Opts::default()
    });
    let id = d.create(json!({"workload_class": "mock-class"}));
    let big = json!({"workload_class": "mock-class", "labels": {"k": "v".repeat(1000)}, "env": {"A": "b".repeat(500)}});
    assert!(serde_json::to_vec(&big).unwrap().len() > 1024);
    expect_error(&d.post("/v1/instances", big), 413, Some("too_large"));
    expect_error(
        &d.post(
            &format!("/v1/instances/{id}/exec"),
            json!({"cmd": ["x".repeat(2000)]}),
        ),
        413,
        Some("too_large"),
    );
    // Files have their own, larger limit: 3 KiB passes the file route but not a JSON route.
    let three_k = vec![b'z'; 3 * 1024];
    assert_eq!(
        d.put(
            &format!("/v1/instances/{id}/files?path=/ok.bin"),
            three_k.clone()
        )
        .status,
        200
    );
    assert_eq!(
        d.get(&format!("/v1/instances/{id}/files?path=/ok.bin"))
            .body,
        three_k
    );
    expect_error(
        &d.put(
            &format!("/v1/instances/{id}/files?path=/big.bin"),
            vec![b'z'; 5 * 1024],
        ),
        413,
        Some("too_large"),
    );
    expect_error(
        &d.get(&format!("/v1/instances/{id}/files?path=/big.bin")),
        404,
        None,
    );
    // Only one instance exists: the oversized create did nothing.
    assert_eq!(d.ids(""), vec![id]);
}

#[test]
fn policy_rejections_answer_422() {
    let d = Daemon::start(Opts::default());
    let v = expect_error(
        &d.post("/v1/instances", json!({"workload_class": "no-such-class"})),
        422,
        Some("no_matching_policy"),
    );
    assert!(
        v["error"].as_str().unwrap().contains("no-such-class"),
        "{v}"
    );
    expect_error(
        &d.post(
            "/v1/instances",
            json!({"workload_class": "mock-class", "template": "nope"}),
        ),
        422,
        Some("unknown_template"),
    );
    expect_error(
        &d.post(
            "/v1/instances",
            json!({"workload_class": "mock-class", "image_digest": "sha256:00"}),
        ),
        422,
        Some("digest_mismatch"),
    );
    let id = d.create(json!({"workload_class": "mock-class"}));
    let v = expect_error(
        &d.post(
            &format!("/v1/instances/{id}/exec"),
            json!({"cmd": ["echo", "hi"]}),
        ),
        422,
        Some("not_supported"),
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("not supported by backend mock"),
        "{v}"
    );
    assert_eq!(v["instance_id"], id.as_str());
    expect_error(
        &d.post(
            &format!("/v1/instances/{id}/exec?stream=true"),
            json!({"cmd": ["echo"]}),
        ),
        422,
        Some("not_supported"),
    );
    // The failed evaluations are counted.
    let m = d.get("/v1/metrics").text();
    assert!(
        m.lines()
            .any(|l| l.starts_with("anvil_policy_eval_failures_total ") && !l.ends_with(" 0")),
        "{m}"
    );
}

#[test]
fn no_backend_answers_503_with_retry_after() {
    let d = Daemon::start(Opts {
        policies: vec![
            ("mock.toml".into(), MOCK_POLICY.into()),
            ("bw.toml".into(), BW_ONLY_POLICY.into()),
        ],
        ..Opts::default()
    });
    let r = d.post("/v1/instances", json!({"workload_class": "bw-class"}));
    let v = expect_error(&r, 503, Some("no_backend_available"));
    assert!(
        v["error"].as_str().unwrap().contains("bubblewrap"),
        "names the skipped backend: {v}"
    );
    let ra: u64 = r
        .headers
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ra >= 1);
    assert!(d.ids("state=destroyed").is_empty(), "nothing was made");
}

#[test]
fn capacity_answers_503_with_retry_after() {
    let d = Daemon::start(Opts {
        daemon_extra: "max_instances = 2\n".into(),
        ..Opts::default()
    });
    let a = d.create(json!({"workload_class": "mock-class"}));
    d.create(json!({"workload_class": "mock-class"}));
    let r = d.post("/v1/instances", json!({"workload_class": "mock-class"}));
    expect_error(&r, 503, Some("at_capacity"));
    assert!(r.headers.get("retry-after").is_some());
    let host = d.get("/v1/host").json();
    assert_eq!(host["capacity"]["max_instances"], 2);
    assert_eq!(host["capacity"]["used"], 2);
    // Room again after a destroy.
    d.delete(&format!("/v1/instances/{a}"));
    d.create(json!({"workload_class": "mock-class"}));
}

#[test]
fn bad_query_strings_and_paths_answer_json_400() {
    let d = Daemon::start(Opts::default());
    let id = d.create(json!({"workload_class": "mock-class"}));
    expect_error(
        &d.get(&format!("/v1/instances/{id}/files")),
        400,
        Some("bad_request"),
    );
    expect_error(
        &d.get(&format!("/v1/instances/{id}/files?path=/a&list=maybe")),
        400,
        Some("bad_request"),
    );
    expect_error(
        &d.post(
            &format!("/v1/instances/{id}/exec?stream=perhaps"),
            json!({"cmd": ["true"]}),
        ),
        400,
        Some("bad_request"),
    );
    expect_error(&d.get("/v1/instances/%FF%FE"), 400, Some("bad_request"));
    expect_error(&d.get("/v1/pools/mock/%FF"), 400, Some("bad_request"));
}
