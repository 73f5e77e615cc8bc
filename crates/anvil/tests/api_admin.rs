//! Metrics (SPEC §11), policy reload (admin endpoint, SIGHUP, `anvil daemon reload`), the
//! OpenAPI document over HTTP.
mod common;
use common::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

/// The value of the sample line `name{labels}` (labels given exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
    })
}

#[test]
fn metrics_count_requests_creates_destroys_pool_hits() {
    let mut o = Opts::default();
    o.policies
        .push(("pooled.toml".into(), MOCK_POOL_POLICY.into()));
    let d = Daemon::start(o);
    d.wait_for("warm pool", Duration::from_secs(10), || {
        d.warm_count("mock", "mock-pooled") == 3
    });
    let a = d.create(json!({"workload_class": "mock-class"}));
    let b = d.create(json!({"workload_class": "mock-class"}));
    let w = d.post("/v1/instances", json!({"workload_class": "mock-pooled"}));
    assert_eq!(w.json()["start_path"], "warm");
    d.post(&format!("/v1/instances/{b}/pause"), json!({}));
    d.post(&format!("/v1/instances/{a}/reset"), json!({}));
    d.post(&format!("/v1/instances/{a}/checkpoint"), json!({}));
    d.delete(&format!("/v1/instances/{a}"));
    d.get("/v1/instances/sb-missing");
    d.get("/v1/no-such-route");

    for path in ["/v1/metrics", "/metrics"] {
        let r = d.get(path);
        assert_eq!(r.status, 200);
        let ct = r
            .headers
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
            "{ct}"
        );
        let m = r.text();
        assert!(m.trim_end().ends_with("# EOF"), "OpenMetrics terminator");
        // HTTP requests by route template (not raw path) and status.
        assert!(
            sample(
                &m,
                "anvil_requests_total{method=\"POST\",route=\"/v1/instances\",status=\"201\"}"
            )
            .unwrap()
                >= 3.0,
            "{m}"
        );
        assert!(
            sample(
                &m,
                "anvil_requests_total{method=\"GET\",route=\"/v1/instances/{id}\",status=\"404\"}"
            )
            .unwrap()
                >= 1.0,
            "{m}"
        );
        assert!(
            sample(
                &m,
                "anvil_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}"
            )
            .unwrap()
                >= 1.0,
            "{m}"
        );
        assert!(!m.contains("sb-missing"), "raw ids never become labels");
        // Creates by backend and start path; destroys by reason.
        assert_eq!(
            sample(
                &m,
                "anvil_instances_created_total{backend=\"mock\",start_path=\"warm\"}"
            ),
            Some(1.0),
            "{m}"
        );
        assert!(
            sample(
                &m,
                "anvil_instances_created_total{backend=\"mock\",start_path=\"cold\"}"
            )
            .unwrap()
                >= 5.0,
            "2 + 3 warm-ups + refill: {m}"
        );
        assert_eq!(
            sample(
                &m,
                "anvil_instances_destroyed_total{backend=\"mock\",reason=\"requested\"}"
            ),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            sample(
                &m,
                "anvil_pool_hits_total{backend=\"mock\",workload_class=\"mock-pooled\"}"
            ),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            sample(
                &m,
                "anvil_instances_resets_total{backend=\"mock\",mode=\"overlayfs-rollback\"}"
            ),
            Some(1.0),
            "{m}"
        );
        // Histograms.
        assert!(
            m.contains("# TYPE anvil_create_duration_seconds histogram"),
            "{m}"
        );
        assert!(
            sample(
                &m,
                "anvil_create_duration_seconds_count{backend=\"mock\",start_path=\"cold\"}"
            )
            .unwrap()
                >= 2.0,
            "{m}"
        );
        assert_eq!(
            sample(
                &m,
                "anvil_create_duration_seconds_count{backend=\"mock\",start_path=\"warm\"}"
            ),
            Some(1.0),
            "{m}"
        );
        assert!(m.contains("anvil_create_duration_seconds_bucket{le=\"+Inf\",backend=\"mock\",start_path=\"cold\"}") || m.contains("anvil_create_duration_seconds_bucket{backend=\"mock\",start_path=\"cold\",le=\"+Inf\"}"), "{m}");
        assert_eq!(
            sample(
                &m,
                "anvil_checkpoint_duration_seconds_count{backend=\"mock\"}"
            ),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            sample(
                &m,
                "anvil_reset_duration_seconds_count{backend=\"mock\",mode=\"overlayfs-rollback\"}"
            ),
            Some(1.0),
            "{m}"
        );
        // Gauges by state, pool gauges.
        assert_eq!(
            sample(&m, "anvil_instances{state=\"paused\",backend=\"mock\"}"),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            sample(&m, "anvil_instances{state=\"running\",backend=\"mock\"}"),
            Some(1.0),
            "the claimed one: {m}"
        );
        assert!(
            sample(&m, "anvil_instances{state=\"warm\",backend=\"mock\"}").unwrap() >= 2.0,
            "{m}"
        );
        assert!(
            sample(&m, "anvil_instances{state=\"destroyed\",backend=\"mock\"}").is_none(),
            "destroyed is not live: {m}"
        );
        assert_eq!(
            sample(
                &m,
                "anvil_pool_target{backend=\"mock\",workload_class=\"mock-pooled\"}"
            ),
            Some(3.0),
            "{m}"
        );
        assert!(
            m.contains("anvil_pool_warm{backend=\"mock\",workload_class=\"mock-pooled\"}"),
            "{m}"
        );
        for name in [
            "anvil_pool_misses",
            "anvil_policy_eval_failures",
            "anvil_exec_duration_seconds",
            "anvil_restore_duration_seconds",
        ] {
            assert!(
                m.contains(&format!("# TYPE {name} ")),
                "{name} declared: {m}"
            );
        }
    }
    // The gauge follows the state: destroy the paused one.
    d.delete(&format!("/v1/instances/{b}"));
    let m = d.get("/metrics").text();
    assert!(
        sample(&m, "anvil_instances{state=\"paused\",backend=\"mock\"}").is_none(),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "anvil_instances_destroyed_total{backend=\"mock\",reason=\"requested\"}"
        ),
        Some(2.0),
        "{m}"
    );
}

#[test]
fn metrics_can_be_disabled() {
    let d = Daemon::start(Opts {
        extra: "[metrics]\nenabled = false\n".into(),
        ..Opts::default()
    });
    expect_error(&d.get("/metrics"), 404, Some("not_found"));
    expect_error(&d.get("/v1/metrics"), 404, Some("not_found"));
}

const NEW_POLICY: &str = r#"
manifest_version = 1
policy_name = "mock-new"
priority = 5
[match]
workload_class = ["new-class"]
[select]
backend_priority = ["mock"]
"#;

fn policy_names(d: &Daemon) -> Vec<String> {
    let r = d.get("/v1/policies");
    assert_eq!(r.status, 200);
    let mut v: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn cli_reload(d: &Daemon) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_anvil"))
        .args(["daemon", "reload", "--config"])
        .arg(&d.config)
        .output()
        .unwrap()
}

#[test]
fn reload_admin_endpoint_sighup_and_cli() {
    let d = Daemon::start(Opts::default());
    let pdir = d.dir.path().join("policies");
    assert_eq!(policy_names(&d), vec!["mock-default"]);

    // A bad file: 400 naming the file and key, old set kept.
    std::fs::write(
        pdir.join("zz-bad.toml"),
        format!("{NEW_POLICY}\n[quota]\nbogus_key = 1\n"),
    )
    .unwrap();
    let r = d.post("/v1/admin/reload", json!({}));
    let v = expect_error(&r, 400, Some("reload_failed"));
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("zz-bad.toml"), "names the file: {msg}");
    assert!(msg.contains("bogus_key"), "names the key: {msg}");
    assert_eq!(policy_names(&d), vec!["mock-default"], "old policies kept");
    expect_error(
        &d.post("/v1/instances", json!({"workload_class": "new-class"})),
        422,
        Some("no_matching_policy"),
    );
    // The CLI fails too, naming the file.
    let out = cli_reload(&d);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("zz-bad.toml"), "{err}");
    // A syntax error is reported the same way.
    std::fs::write(
        pdir.join("zz-bad.toml"),
        "manifest_version = 1\npolicy_name = \"x\n",
    )
    .unwrap();
    let v = expect_error(
        &d.post("/v1/admin/reload", json!({})),
        400,
        Some("reload_failed"),
    );
    assert!(v["error"].as_str().unwrap().contains("zz-bad.toml"), "{v}");

    // Fixed: 200 and the new policy is live.
    std::fs::write(pdir.join("zz-bad.toml"), NEW_POLICY).unwrap();
    let r = d.post("/v1/admin/reload", json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let mut names: Vec<String> = r.json()["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, vec!["mock-default", "mock-new"]);
    assert_eq!(policy_names(&d), vec!["mock-default", "mock-new"]);
    let c = d.post("/v1/instances", json!({"workload_class": "new-class"}));
    assert_eq!(c.status, 201, "{}", c.text());
    assert_eq!(c.json()["decision"]["policy"], "mock-new");

    // SIGHUP: a second new policy appears without any request.
    std::fs::write(
        pdir.join("hup.toml"),
        NEW_POLICY
            .replace("mock-new", "mock-hup")
            .replace("new-class", "hup-class"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    d.wait_for("SIGHUP reload", Duration::from_secs(5), || {
        policy_names(&d).contains(&"mock-hup".to_string())
    });
    // SIGHUP with a bad file keeps the old set, and the daemon keeps serving.
    std::fs::write(pdir.join("hup.toml"), "policy_name = 3\n").unwrap();
    d.signal(libc::SIGHUP);
    d.wait_for("reload failure logged", Duration::from_secs(5), || {
        d.log().contains("reload failed")
    });
    assert!(policy_names(&d).contains(&"mock-hup".to_string()));
    assert_eq!(d.get("/v1/health").status, 200);

    // The CLI: succeeds once the file is good again.
    std::fs::remove_file(pdir.join("hup.toml")).unwrap();
    let out = cli_reload(&d);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("mock-new"));
    assert!(
        !policy_names(&d).contains(&"mock-hup".to_string()),
        "removed policy is gone"
    );
    // The CLI with no daemon listening fails.
    let mut d = d;
    d.sigterm();
    assert!(!cli_reload(&d).status.success());
}

#[test]
fn openapi_over_http_equals_the_committed_document() {
    let d = Daemon::start(Opts::default());
    let r = d.get("/v1/openapi.json");
    assert_eq!(r.status, 200);
    assert!(r
        .headers
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let served = r.json();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        served, committed,
        "docs/openapi.json is stale: regenerate with `anvil openapi > docs/openapi.json`"
    );
    // Every route of SPEC §4 is in it.
    let paths = served["paths"].as_object().unwrap();
    for p in [
        "/v1/health",
        "/v1/instances",
        "/v1/instances/{id}",
        "/v1/instances/{id}/checkpoint",
        "/v1/instances/{id}/checkpoints",
        "/v1/instances/{id}/reset",
        "/v1/instances/{id}/destroy",
        "/v1/instances/{id}/exec",
        "/v1/instances/{id}/files",
        "/v1/instances/{id}/pause",
        "/v1/instances/{id}/resume",
        "/v1/instances/{id}/rollback",
        "/v1/instances/{id}/ttl",
        "/v1/checkpoints/{checkpoint_id}",
        "/v1/pools",
        "/v1/pools/{backend}/{class}",
        "/v1/pools/{backend}/{class}/drain",
        "/v1/pools/{backend}/{class}/sizing",
        "/v1/templates",
        "/v1/templates/{id}",
        "/v1/templates/gc",
        "/v1/policies",
        "/v1/hooks",
        "/v1/metrics",
        "/v1/admin/reload",
        "/v1/host",
        "/v1/openapi.json",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} missing from the OpenAPI document"
        );
    }
}
