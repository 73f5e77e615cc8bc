//! bubblewrap on the real daemon: exec, files and path escapes (issue 3 acceptance 1),
//! isolation from the host (2), streaming exec (6), and the host after destroy (5).
mod bwrap_support;
mod common;

use bwrap_support::*;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

const CLASS: &str = "bw-exec";

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("anvil-{tag}-{}-{nanos}", std::process::id())
}

#[test]
fn exec_files_and_path_escapes_stay_inside() {
    let Some(bw) = Bw::start(vec![("bw.toml", bwrap_policy(CLASS, ""))]) else {
        return;
    };
    let id = bw.create(CLASS);
    let fp = bw.footprint(&id);

    let v = bw.exec(&id, &["echo", "hi"]);
    assert_eq!(v["stdout"], "hi\n", "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    assert!(v["signal"].is_null() && v["timed_out"] == false, "{v}");

    // A file written with PUT reads back through GET and through `cat` inside, and lives in
    // the instance's overlay upper layer on the host.
    let body = b"hello from the host\nline two\n".to_vec();
    let r = bw.d.put(
        &format!("/v1/instances/{id}/files?path=/root/hello.txt&mode=640"),
        body.clone(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["bytes"], body.len());
    let r = bw.get_file(&id, "/root/hello.txt");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, body);
    assert_eq!(bw.sh(&id, "cat /root/hello.txt").as_bytes(), &body[..]);
    assert_eq!(bw.sh(&id, "stat -c %a /root/hello.txt"), "640\n");
    assert_eq!(
        std::fs::read(fp.instance_dir.join("upper/root/hello.txt")).unwrap(),
        body
    );

    // `..` cannot climb out of the sandbox root: the write lands in the sandbox's /tmp.
    let name = unique("dotdot");
    let r = bw.put_file(&id, &format!("/../../../../tmp/{name}"), b"dotdot");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !Path::new("/tmp").join(&name).exists(),
        "a `..` path reached the host's /tmp"
    );
    assert_eq!(bw.sh(&id, &format!("cat /tmp/{name}")), "dotdot");
    let r = bw.get_file(&id, &format!("/tmp/../../../tmp/{name}"));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"dotdot"[..]));

    // Reading through symlinks to `/` (absolute and relative) resolves inside the sandbox.
    let tpl_passwd = std::fs::read(bw.template_rootfs.join("etc/passwd")).unwrap();
    let tpl_hostname = std::fs::read(bw.template_rootfs.join("etc/hostname")).unwrap();
    assert_ne!(
        std::fs::read("/etc/passwd").unwrap(),
        tpl_passwd,
        "host and template passwd must differ for this check"
    );
    bw.sh(
        &id,
        "ln -s / /tmp/esc && ln -s ../../../../../../.. /tmp/up",
    );
    for p in [
        "/tmp/esc/etc/passwd",
        "/tmp/up/etc/passwd",
        "/tmp/esc/tmp/../etc/passwd",
    ] {
        let r = bw.get_file(&id, p);
        assert_eq!(r.status, 200, "{p}: {}", r.text());
        assert_eq!(
            r.body, tpl_passwd,
            "{p} did not resolve to the sandbox's file"
        );
    }
    let r = bw.get_file(&id, "/tmp/esc/etc/hostname");
    assert_eq!(r.body, tpl_hostname);

    // Writing through a symlink to an absolute path that exists on the host (/root) never
    // touches the host: the agent replaces the link itself (temp file + rename), and a
    // directory link resolves to the sandbox's /root.
    let name = unique("link");
    bw.sh(
        &id,
        &format!("ln -s /root/{name} /tmp/wlink && ln -s /root /tmp/rootlink"),
    );
    let r = bw.put_file(&id, "/tmp/wlink", b"through a link");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !Path::new("/root").join(&name).exists(),
        "a symlinked write reached the host's /root"
    );
    assert_eq!(bw.sh(&id, "cat /tmp/wlink"), "through a link");
    let r = bw.put_file(&id, &format!("/tmp/rootlink/{name}"), b"via dir link");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !Path::new("/root").join(&name).exists(),
        "a write through a directory link reached the host's /root"
    );
    assert_eq!(bw.sh(&id, &format!("cat /root/{name}")), "via dir link");
    assert!(fp.instance_dir.join("upper/root").join(&name).is_file());

    // A symlink to a host-only directory (the repo) leads nowhere inside the sandbox.
    let repo = env!("CARGO_MANIFEST_DIR");
    let name = unique("repo");
    bw.sh(&id, &format!("ln -s {repo} /tmp/repo"));
    let r = bw.put_file(&id, &format!("/tmp/repo/{name}"), b"evil");
    assert_ne!(
        r.status,
        200,
        "write under a missing directory succeeded: {}",
        r.text()
    );
    assert!(
        !Path::new(repo).join(&name).exists(),
        "a symlinked write reached the host repo"
    );
    let r = bw.get_file(&id, "/tmp/repo/Cargo.toml");
    assert_ne!(
        r.status, 200,
        "read the host's Cargo.toml through a symlink"
    );
    // Relative paths are refused outright.
    assert_eq!(bw.get_file(&id, "etc/passwd").status, 400);

    // Destroy, then nothing of the sandbox is left on the host.
    let r = bw.d.delete(&format!("/v1/instances/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"destroyed": true, "instance_id": id}));
    let v = bw.instance(&id);
    assert_eq!(
        (v["state"].as_str(), v["termination_reason"].as_str()),
        (Some("destroyed"), Some("requested")),
        "{v}"
    );
    bw.assert_gone(&fp);
    bw.finish();
}

#[test]
fn sandbox_sees_no_host_files_and_only_loopback() {
    let Some(bw) = Bw::start(vec![("bw.toml", bwrap_policy(CLASS, ""))]) else {
        return;
    };
    let a = bw.create(CLASS);
    let b = bw.create(CLASS);
    let fp_a = bw.footprint(&a);
    let fp_b = bw.footprint(&b);

    // The repo checkout exists on the host but not inside.
    let repo = env!("CARGO_MANIFEST_DIR");
    assert!(Path::new(repo).join("Cargo.toml").is_file());
    let v = bw.exec(
        &a,
        &[
            "/bin/sh",
            "-c",
            &format!("test -e {repo} || test -e {repo}/Cargo.toml"),
        ],
    );
    assert_eq!(
        v["exit_code"], 1,
        "the repo checkout is visible inside: {v}"
    );
    let v = bw.exec(&a, &["cat", &format!("{repo}/Cargo.toml")]);
    assert_ne!(v["exit_code"], 0, "{v}");
    // The root holds the template plus what bwrap mounts, nothing else of the host.
    let mut tpl: Vec<String> = std::fs::read_dir(&bw.template_rootfs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    tpl.sort();
    let inside: Vec<String> = bw.sh(&a, "ls -A /").lines().map(String::from).collect();
    assert_eq!(inside, tpl, "sandbox / differs from the template");
    // Nor the daemon's state dir or the host's passwd.
    let state = bw.d.state_dir();
    let v = bw.exec(&a, &["test", "-e", state.to_str().unwrap()]);
    assert_eq!(v["exit_code"], 1, "{v}");

    // Only loopback.
    let dev = bw.sh(&a, "cat /proc/net/dev");
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, vec!["lo"], "{dev}");
    let host_ifaces = std::fs::read_to_string("/proc/net/dev").unwrap();
    eprintln!(
        "host interfaces: {:?}",
        host_ifaces
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect::<Vec<_>>()
    );

    // Own pid namespace with the agent as pid 1; no capabilities; own hostname.
    assert!(bw.sh(&a, "cat /proc/1/cmdline").contains("anvil-agent"));
    let ps = bw.sh(&a, "ls /proc | grep -c '^[0-9]'");
    let n: usize = ps.trim().parse().unwrap();
    assert!(n <= 5, "sandbox sees {n} processes");
    let caps = bw.sh(&a, "grep CapEff /proc/self/status");
    assert!(caps.trim().ends_with("0000000000000000"), "{caps}");
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_ne!(bw.sh(&a, "hostname"), host_name);

    // Sandbox B's files and processes are invisible from A.
    bw.put_file(&b, "/root/secret-b", b"b only");
    let v = bw.exec(&a, &["cat", "/root/secret-b"]);
    assert_ne!(v["exit_code"], 0, "{v}");
    let b_host_pid = fp_b.procs[0].0;
    let v = bw.exec(&a, &["kill", "-0", &b_host_pid.to_string()]);
    assert!(v["exit_code"] != 0 || b_host_pid <= 5, "{v}");
    assert_eq!(bw.sh(&b, "echo alive"), "alive\n");

    for (id, fp) in [(&a, &fp_a), (&b, &fp_b)] {
        assert_eq!(
            bw.d.post(&format!("/v1/instances/{id}/destroy"), json!({}))
                .status,
            200
        );
        bw.assert_gone(fp);
    }
    bw.finish();
}

#[test]
fn streaming_exec_delivers_first_line_before_the_second_is_printed() {
    let Some(bw) = Bw::start(vec![("bw.toml", bwrap_policy(CLASS, ""))]) else {
        return;
    };
    let id = bw.create(CLASS);
    let fp = bw.footprint(&id);
    let body = json!({"cmd": ["/bin/sh", "-c", "echo one; sleep 0.5; echo two"]});
    let (status, lines) = bw.d.stream_lines(
        "POST",
        &format!("/v1/instances/{id}/exec?stream=true"),
        Some(serde_json::to_vec(&body).unwrap()),
    );
    assert_eq!(status, 200, "{lines:?}");
    let events: Vec<(Duration, serde_json::Value)> = lines
        .iter()
        .map(|l| {
            (
                l.at,
                serde_json::from_str(&l.line)
                    .unwrap_or_else(|e| panic!("bad NDJSON line {:?}: {e}", l.line)),
            )
        })
        .collect();
    let at = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        events.iter().find(|(_, e)| pred(e)).map(|(t, _)| *t)
    };
    let one =
        at(&|e| e["stream"] == "stdout" && e["data"].as_str().is_some_and(|d| d.contains("one")))
            .expect("no `one` event");
    let two =
        at(&|e| e["stream"] == "stdout" && e["data"].as_str().is_some_and(|d| d.contains("two")))
            .expect("no `two` event");
    let exit = at(&|e| e["stream"] == "exit").expect("no exit event");
    let (_, last) = events.last().unwrap();
    assert_eq!(
        last["stream"], "exit",
        "the exit event must be last: {events:?}"
    );
    assert_eq!(last["exit_code"], 0, "{last}");
    eprintln!("one at {one:?}, two at {two:?}, exit at {exit:?}");
    assert!(
        exit >= one + Duration::from_millis(300),
        "`one` arrived at {one:?}, exit at {exit:?}: not streamed"
    );
    assert!(
        two >= one + Duration::from_millis(300),
        "`one` at {one:?}, `two` at {two:?}"
    );

    assert_eq!(bw.d.delete(&format!("/v1/instances/{id}")).status, 200);
    bw.assert_gone(&fp);
    bw.finish();
}

#[test]
fn a_sandbox_cannot_redirect_the_daemon_to_another_sandboxs_agent() {
    let Some(bw) = Bw::start(vec![("bw.toml", bwrap_policy(CLASS, ""))]) else {
        return;
    };
    let a = bw.create(CLASS);
    let b = bw.create(CLASS);
    assert_eq!(bw.put_file(&b, "/root/secret", b"b's secret").status, 200);
    // A replaces its agent socket with a symlink to B's socket (a host path).
    let b_sock = bw.instance_dir(&b).join("run/agent.sock");
    let v = bw.exec(
        &a,
        &[
            "/bin/sh",
            "-c",
            &format!(
                "rm -f /run/anvil/agent.sock && ln -s {} /run/anvil/agent.sock",
                b_sock.display()
            ),
        ],
    );
    eprintln!("replacing the socket inside A: {v}");
    let r = bw.d.post(
        &format!("/v1/instances/{a}/exec"),
        json!({"cmd": ["cat", "/root/secret"]}),
    );
    eprintln!("exec on A after the swap: {} {}", r.status, r.text());
    assert!(
        !r.text().contains("b's secret"),
        "an exec on A ran in B: {}",
        r.text()
    );
    let r = bw.get_file(&a, "/root/secret");
    assert_ne!(r.body, b"b's secret", "a file read on A was served by B");
    bw.finish();
}
