//! Smoke test of the harness itself: the real binary starts, answers, stops.
mod common;
use common::*;

#[test]
fn daemon_starts_and_answers_health() {
    let d = Daemon::start(Opts::default());
    let r = d.get("/v1/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    let id = d.create(serde_json::json!({"workload_class": "mock-class"}));
    let r = d.get(&format!("/v1/instances/{id}"));
    assert_eq!(r.json()["state"], "running");
}
