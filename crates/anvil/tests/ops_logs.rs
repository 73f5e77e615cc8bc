//! Operator logs (issue 7): `[daemon].log_format = "json"` gives one JSON object per line;
//! instance operations and every request on an instance route carry the instance id;
//! `[daemon].log_level` is honoured and `ANVIL_LOG` overrides it; text logs written to a file
//! have no terminal colour codes.
mod ops_support;

use ops_support::OpsDaemon;
use serde_json::Value;
use std::time::Duration;

fn json_lines(d: &OpsDaemon) -> Vec<Value> {
    let log = d.log();
    assert!(!log.trim().is_empty(), "empty log");
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}\n--- log:\n{log}"))
        })
        .collect()
}

fn ok(d: &OpsDaemon, method: &str, path: &str, body: Option<&str>) -> String {
    let (st, b) = d.request(method, path, body);
    assert!((200..300).contains(&st), "{method} {path}: {st} {b}");
    b
}

fn create(d: &OpsDaemon) -> String {
    let b = ok(
        d,
        "POST",
        "/v1/instances",
        Some(r#"{"workload_class":"mock-class"}"#),
    );
    let v: Value = serde_json::from_str(&b).unwrap();
    v["instance"]["id"].as_str().unwrap().to_string()
}

fn stop(d: &mut OpsDaemon) {
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        d.log()
    );
}

/// The line whose message is `msg` and whose own field `instance_id` is `id`.
fn event<'a>(lines: &'a [Value], msg: &str, id: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["message"] == msg && l["instance_id"] == id)
        .unwrap_or_else(|| {
            panic!(
                "no `{msg}` line with instance_id {id}:\n{}",
                lines
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
}

#[test]
fn json_logs_carry_the_instance_id() {
    let mut d = OpsDaemon::new("log_level = \"debug\"\nlog_format = \"json\"");
    d.spawn(&[]);
    d.wait_serving(Duration::from_secs(20));
    let id = create(&d);
    let ops: [(&str, String, Option<&str>); 7] = [
        ("GET", format!("/v1/instances/{id}"), None),
        ("POST", format!("/v1/instances/{id}/pause"), Some("{}")),
        ("POST", format!("/v1/instances/{id}/resume"), Some("{}")),
        (
            "POST",
            format!("/v1/instances/{id}/ttl"),
            Some(r#"{"ttl_secs":600}"#),
        ),
        ("POST", format!("/v1/instances/{id}/checkpoint"), Some("{}")),
        ("POST", format!("/v1/instances/{id}/reset"), Some("{}")),
        ("DELETE", format!("/v1/instances/{id}"), None),
    ];
    for (m, p, b) in &ops {
        ok(&d, m, p, *b);
    }
    // A request for an unknown instance is logged with that id too.
    assert_eq!(
        d.request("GET", "/v1/instances/no-such-instance", None).0,
        404
    );
    stop(&mut d);

    let lines = json_lines(&d);
    for l in &lines {
        for k in ["timestamp", "level", "target"] {
            assert!(l.get(k).is_some(), "JSON log line without `{k}`: {l}");
        }
    }
    // Instance operations name the instance as a field of their own.
    let created = event(&lines, "instance created", &id);
    assert_eq!(created["level"], "INFO");
    assert_eq!(created["backend"], "mock");
    event(&lines, "checkpoint taken", &id);
    event(&lines, "instance reset", &id);
    event(&lines, "instance destroyed", &id);

    // Every line logged inside a request on an instance route carries the id in its span.
    let on_instance_route: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["span"]["route"]
                .as_str()
                .is_some_and(|r| r.starts_with("/v1/instances/{id}"))
        })
        .collect();
    assert!(!on_instance_route.is_empty(), "no request spans in the log");
    for l in &on_instance_route {
        let sid = l["span"]["instance_id"].as_str().unwrap_or("");
        assert!(
            sid == id || sid == "no-such-instance",
            "line in an instance request without its id: {l}"
        );
    }
    // ...and each request is logged when done, with method, route and status.
    for (m, p, _) in &ops {
        let route = p.replace(&id, "{id}");
        let done = lines.iter().find(|l| {
            l["message"] == "request done"
                && l["span"]["method"] == *m
                && l["span"]["route"] == route.as_str()
        });
        let done = done.unwrap_or_else(|| panic!("no `request done` line for {m} {route}"));
        assert_eq!(done["span"]["instance_id"], id.as_str(), "{done}");
        assert!(done["status"].as_u64().is_some_and(|s| s < 300), "{done}");
    }
    let missing = lines
        .iter()
        .find(|l| l["message"] == "request done" && l["status"] == 404)
        .expect("the 404 request is logged");
    assert_eq!(missing["span"]["instance_id"], "no-such-instance");
}

#[test]
fn log_level_is_honoured_and_anvil_log_overrides_it() {
    let mut d = OpsDaemon::new("log_level = \"info\"\nlog_format = \"json\"");
    d.spawn(&[]);
    d.wait_serving(Duration::from_secs(20));
    let id = create(&d);
    ok(&d, "POST", &format!("/v1/instances/{id}/pause"), Some("{}"));
    ok(&d, "DELETE", &format!("/v1/instances/{id}"), None);
    stop(&mut d);
    let lines = json_lines(&d);
    let below: Vec<&Value> = lines
        .iter()
        .filter(|l| l["level"] == "DEBUG" || l["level"] == "TRACE")
        .collect();
    assert!(below.is_empty(), "log_level = info but: {below:?}");
    event(&lines, "instance created", &id);
    event(&lines, "instance destroyed", &id);

    // Same config, ANVIL_LOG=debug: debug lines appear.
    d.spawn(&[("ANVIL_LOG", "debug")]);
    d.wait_serving(Duration::from_secs(20));
    let id = create(&d);
    stop(&mut d);
    let lines = json_lines(&d);
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "ANVIL_LOG=debug gave no DEBUG line"
    );
    event(&lines, "instance created", &id);
}

#[test]
fn text_logs_to_a_file_are_plain_and_name_the_instance() {
    let mut d = OpsDaemon::new("log_level = \"info\"");
    d.spawn(&[]);
    d.wait_serving(Duration::from_secs(20));
    let id = create(&d);
    stop(&mut d);
    let log = d.log();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("instance created"))
        .unwrap_or_else(|| panic!("no `instance created` line:\n{log}"));
    assert!(line.contains(&format!("instance_id={id}")), "{line}");
    assert!(line.contains("INFO"), "{line}");
    assert!(
        serde_json::from_str::<Value>(line).is_err(),
        "text format should not be JSON"
    );
}
