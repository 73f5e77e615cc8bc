//! Reliability (issue 5): fault injection. Each fault ends in a defined state with a reason,
//! an error that names the cause, and nothing leaked (processes, cgroups, mounts, dirs).
mod bwrap_support;
mod common;

use bwrap_support::*;
use common::*;
use redb::ReadableTable;
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CLASS: &str = "rel";

fn policy() -> Vec<(&'static str, String)> {
    vec![(
        "rel.toml",
        bwrap_policy(
            CLASS,
            "[pool]\nenabled = false\nreset_mode = \"overlayfs-rollback\"\n",
        ),
    )]
}

fn find_in_cgroup(bw: &Bw, name: &str, argv0_suffix: &str) -> i32 {
    bw.cgroup_procs(name)
        .into_iter()
        .find(|p| {
            cmdline(*p).is_some_and(|c| {
                c.split(' ')
                    .next()
                    .is_some_and(|a| a.ends_with(argv0_suffix))
            })
        })
        .unwrap_or_else(|| panic!("no `{argv0_suffix}` process in the cgroup of {name}"))
}

#[test]
fn bwrap_killed_from_outside_is_destroyed_as_exited_within_a_second() {
    let Some(bw) = Bw::start(policy()) else {
        return;
    };
    let id = bw.create(CLASS);
    let fp = bw.footprint(&id);
    let bwrap = find_in_cgroup(&bw, &id, "bwrap");
    let t0 = Instant::now();
    unsafe { libc::kill(bwrap, libc::SIGKILL) };
    let v = bw.wait_destroyed(&id, Duration::from_secs(5));
    let took = t0.elapsed();
    eprintln!("bwrap SIGKILL → destroyed `exited` after {took:?}");
    assert!(took < Duration::from_millis(1500), "noticed after {took:?}");
    assert_eq!(v["termination_reason"], "exited", "{v}");
    bw.assert_gone(&fp);
    let r = bw.d.post(
        &format!("/v1/instances/{id}/exec"),
        json!({"cmd": ["true"]}),
    );
    let e = expect_error(&r, 409, Some("state_conflict"));
    assert!(e["error"].as_str().unwrap().contains("destroyed"), "{e}");
    bw.finish();
}

#[test]
fn agent_killed_inside_ends_the_sandbox_as_exited() {
    let Some(bw) = Bw::start(policy()) else {
        return;
    };
    let id = bw.create(CLASS);
    let other = bw.create(CLASS);
    let fp = bw.footprint(&id);
    let agent = find_in_cgroup(&bw, &id, "anvil-agent");
    let t0 = Instant::now();
    unsafe { libc::kill(agent, libc::SIGKILL) };
    let v = bw.wait_destroyed(&id, Duration::from_secs(5));
    eprintln!("agent SIGKILL → destroyed after {:?}", t0.elapsed());
    assert_eq!(v["termination_reason"], "exited", "{v}");
    bw.assert_gone(&fp);
    // The other sandbox is untouched.
    assert_eq!(bw.sh(&other, "echo still-here"), "still-here\n");
    bw.finish();
}

#[test]
fn agent_killed_from_inside_the_sandbox_ends_it_as_exited() {
    let Some(bw) = Bw::start(policy()) else {
        return;
    };
    let id = bw.create(CLASS);
    let fp = bw.footprint(&id);
    // pid 1 inside is the agent; kill -9 from within (no capabilities: the kernel refuses
    // signals to a pid-namespace init from inside unless it handles them — either way the
    // sandbox must end up in a defined state).
    let r = bw.d.post(
        &format!("/v1/instances/{id}/exec"),
        json!({"cmd": ["/bin/sh", "-c", "kill -9 1; echo rc=$?"], "timeout_ms": 5000}),
    );
    eprintln!("kill -9 1 from inside: {} {}", r.status, r.text());
    let v = bw.instance(&id);
    if v["state"] == "running" {
        // SIGKILL to the namespace init from inside is ignored by the kernel: still works.
        assert_eq!(bw.sh(&id, "echo alive"), "alive\n");
        let _ = bw.d.delete(&format!("/v1/instances/{id}"));
    } else {
        let v = bw.wait_destroyed(&id, Duration::from_secs(5));
        assert_eq!(v["termination_reason"], "exited", "{v}");
    }
    bw.wait_destroyed(&id, Duration::from_secs(5));
    bw.assert_gone(&fp);
    bw.finish();
}

/// Mounts a tmpfs of `size` on `dir`.
fn mount_tmpfs(dir: &Path, size: &str) {
    let st = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0755"),
            "tmpfs",
        ])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs on {}", dir.display());
}

fn umount(dir: &Path) {
    let st = Command::new("umount").arg(dir).status().unwrap();
    assert!(st.success(), "umount {}", dir.display());
}

/// Fills the filesystem of `dir` with a file until ENOSPC (bounded by `max` bytes).
fn fill(path: &Path, max: usize) -> usize {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut n = 0;
    while n < max {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "fill: {e}");
                break;
            }
        }
    }
    n
}

#[test]
fn full_instances_filesystem_fails_writes_and_creates_cleanly() {
    let Some(bw) = Bw::start(policy()) else {
        return;
    };
    let inst = bw.instances_dir();
    mount_tmpfs(&inst, "16m");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let id = bw.create(CLASS);
        let fp = bw.footprint(&id);
        // Fill the filesystem from inside the sandbox (its upper layer lives there).
        let v = bw.exec(
            &id,
            &[
                "/bin/sh",
                "-c",
                "dd if=/dev/zero of=/fill bs=1M count=64 2>&1; echo rc=$?",
            ],
        );
        let out = v["stdout"].as_str().unwrap();
        assert!(
            out.contains("No space left") || out.contains("rc=1"),
            "filling from inside: {v}"
        );
        // A file upload now fails with an error that names the cause.
        let r = bw.put_file(&id, "/upload.bin", &vec![1u8; 1 << 20]);
        eprintln!("PUT on a full disk: {} {}", r.status, r.text());
        let e = expect_error(&r, 507, Some("insufficient_storage"));
        let msg = e["error"].as_str().unwrap().to_lowercase();
        assert!(
            msg.contains("space") || msg.contains("enospc"),
            "error names the cause: {e}"
        );
        assert_ne!(r.status, 500, "not an internal error: {e}");
        // No partial file is visible inside.
        let ls = bw.exec(&id, &["/bin/sh", "-c", "ls -a / | grep -c upload || true"]);
        assert_eq!(
            ls["stdout"].as_str().unwrap().trim(),
            "0",
            "partial upload visible: {ls}"
        );
        // Take the last free blocks from the host too, then create: it fails cleanly naming
        // the full filesystem, or succeeds (a sandbox needs almost no blocks); never leaks.
        let host_fill = inst.join("host-fill");
        fill(&host_fill, 32 << 20);
        let r = bw.d.post("/v1/instances", json!({"workload_class": CLASS}));
        std::fs::remove_file(&host_fill).unwrap();
        eprintln!("create on a full disk: {} {}", r.status, r.text());
        if r.status != 201 {
            let e = expect_error(&r, 503, Some("spawn_failed"));
            let msg = e["error"].as_str().unwrap().to_lowercase();
            assert!(msg.contains("space"), "create error names the cause: {e}");
            assert!(r.headers.get("retry-after").is_some());
            let failed = e["instance_id"].as_str().map(str::to_string);
            if let Some(fid) = failed {
                assert!(
                    !bw.instance_dir(&fid).exists(),
                    "failed create left its dir"
                );
                for d in bw.cgroup_dirs(&fid) {
                    assert!(!d.exists(), "failed create left cgroup {}", d.display());
                }
            }
        } else {
            let nid = r.json()["instance"]["id"].as_str().unwrap().to_string();
            bw.d.delete(&format!("/v1/instances/{nid}"));
        }
        // The daemon keeps serving; freeing the space makes writes work again.
        assert_eq!(bw.d.get("/v1/health").status, 200);
        bw.sh(&id, "rm -f /fill");
        let r = bw.put_file(&id, "/upload.bin", &vec![1u8; 1 << 20]);
        assert_eq!(r.status, 200, "PUT after freeing space: {}", r.text());
        let r = bw.d.delete(&format!("/v1/instances/{id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        bw.assert_gone(&fp);
        let left: Vec<_> = std::fs::read_dir(&inst)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left on the instances tmpfs: {left:?}");
    }));
    umount(&inst);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    bw.finish();
}

/// Moves the daemon's state dir onto a tmpfs of `size` (the daemon must be stopped).
fn state_on_tmpfs(d: &Daemon, size: &str) -> PathBuf {
    let state = d.state_dir();
    let staging = d.dir.path().join("state.staging");
    std::fs::rename(&state, &staging).unwrap();
    std::fs::create_dir(&state).unwrap();
    mount_tmpfs(&state, size);
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cp -a '{}'/. '{}'/",
            staging.display(),
            state.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::remove_dir_all(&staging).unwrap();
    state
}

#[test]
fn full_state_dir_fails_cleanly_and_recovers_without_a_restart() {
    let Some(mut bw) = Bw::start(policy()) else {
        return;
    };
    assert!(bw.d.sigterm().is_some_and(|s| s.success()));
    let state = state_on_tmpfs(&bw.d, "16m");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        bw.d.spawn();
        let a = bw.create(CLASS);
        let fp = bw.footprint(&a);
        let r = bw.put_file(&a, "/data.bin", &vec![3u8; 2 << 20]);
        assert_eq!(r.status, 200, "{}", r.text());
        let filler = state.join("filler");
        let n = fill(&filler, 32 << 20);
        eprintln!("filled the state tmpfs with {} KiB", n / 1024);

        // A checkpoint copies the upper layer into the state dir: it cannot fit.
        let r =
            bw.d.post(&format!("/v1/instances/{a}/checkpoint"), json!({}));
        eprintln!("checkpoint on a full state dir: {} {}", r.status, r.text());
        expect_error(&r, 507, Some("insufficient_storage"));
        assert_ne!(
            r.status,
            500,
            "a full disk is not an internal bug: {}",
            r.text()
        );
        let e = r.json();
        let msg = e["error"].as_str().unwrap_or("").to_lowercase();
        assert!(msg.contains("space"), "error names the cause: {e}");
        let cks = bw.d.get(&format!("/v1/instances/{a}/checkpoints")).json();
        assert_eq!(
            cks.as_array().map(Vec::len),
            Some(0),
            "no checkpoint recorded: {cks}"
        );
        let ck_dirs: Vec<_> = std::fs::read_dir(state.join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(ck_dirs.is_empty(), "partial checkpoint left: {ck_dirs:?}");
        assert_eq!(
            bw.instance(&a)["state"],
            "running",
            "the instance keeps running"
        );

        // Store writes on the full filesystem: create/destroy until something refuses.
        let mut refused = None;
        for _ in 0..20 {
            let r = bw.d.post("/v1/instances", json!({"workload_class": CLASS}));
            if r.status != 201 {
                refused = Some(r);
                break;
            }
            let id = r.json()["instance"]["id"].as_str().unwrap().to_string();
            let r = bw.d.delete(&format!("/v1/instances/{id}"));
            assert_eq!(r.status, 200, "destroy on a full disk: {}", r.text());
        }
        match &refused {
            Some(r) => {
                eprintln!(
                    "create refused on a full state dir: {} {}",
                    r.status,
                    r.text()
                );
                assert_ne!(r.status, 500, "{}", r.text());
                let msg = r.json()["error"].as_str().unwrap_or("").to_lowercase();
                assert!(msg.contains("space"), "error names the cause: {}", r.text());
            }
            None => eprintln!("20 create/destroy cycles fitted in the store's free pages"),
        }
        // The daemon keeps serving, the existing sandbox keeps working.
        assert_eq!(bw.d.get("/v1/health").status, 200);
        assert_eq!(bw.sh(&a, "echo works"), "works\n");
        assert_eq!(
            bw.instance_dir_names(),
            vec![a.clone()],
            "instance dirs on the full disk"
        );

        // Space freed: everything works again without a restart.
        std::fs::remove_file(&filler).unwrap();
        let r =
            bw.d.post(&format!("/v1/instances/{a}/checkpoint"), json!({}));
        assert_eq!(
            r.status,
            200,
            "checkpoint after freeing space: {}",
            r.text()
        );
        let b = bw.create(CLASS);
        assert_eq!(bw.sh(&b, "echo ok"), "ok\n");
        for id in [&a, &b] {
            let r = bw.d.delete(&format!("/v1/instances/{id}"));
            assert_eq!(r.status, 200, "{}", r.text());
        }
        bw.assert_gone(&fp);
    }));
    // shutdown = destroy: nothing of ours keeps the tmpfs busy afterwards.
    bw.d.sigterm();
    // Keep the state across the unmount so finish() can start the daemon again.
    let staging = bw.d.dir.path().join("state.staging");
    let _ = std::fs::remove_file(state.join("filler"));
    let st = Command::new("cp")
        .arg("-a")
        .arg(&state)
        .arg(&staging)
        .status()
        .unwrap();
    assert!(st.success());
    umount(&state);
    std::fs::remove_dir(&state).unwrap();
    std::fs::rename(&staging, &state).unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    bw.d.spawn();
    bw.finish();
}

#[test]
fn bwrap_binary_removed_while_running() {
    let Some(mut bw) = Bw::start(policy()) else {
        return;
    };
    let bindir = tempfile::tempdir().unwrap();
    let copy = bindir.path().join("bwrap");
    std::fs::copy(BWRAP, &copy).unwrap();
    let text = std::fs::read_to_string(&bw.d.config).unwrap();
    std::fs::write(
        &bw.d.config,
        text.replace(
            &format!("bubblewrap = \"{BWRAP}\""),
            &format!("bubblewrap = \"{}\"", copy.display()),
        ),
    )
    .unwrap();
    assert!(bw.d.sigterm().is_some_and(|s| s.success()));
    bw.d.spawn();
    let a = bw.create(CLASS);
    bw.put_file(&a, "/before.txt", b"x");
    std::fs::remove_file(&copy).unwrap();
    let r = bw.d.post("/v1/instances", json!({"workload_class": CLASS}));
    eprintln!("create without the bwrap binary: {} {}", r.status, r.text());
    let e = expect_error(&r, 503, None);
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains(&copy.display().to_string()) || msg.contains("No such file"),
        "error names the missing binary: {e}"
    );
    assert!(r.headers.get("retry-after").is_some(), "Retry-After on 503");
    // Nothing of the failed create is left: only `a` has a directory and a cgroup.
    assert_eq!(bw.instance_dir_names(), vec![a.clone()]);
    for h in hierarchies() {
        let n = std::fs::read_dir(h.join(&bw.root))
            .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).count())
            .unwrap_or(0);
        assert!(n <= 1, "cgroups under {}: {n}", h.display());
    }
    // The running sandbox keeps working.
    assert_eq!(bw.sh(&a, "cat /before.txt"), "x");
    assert_eq!(bw.get_file(&a, "/before.txt").body, b"x");
    let fp = bw.footprint(&a);
    let r = bw.d.delete(&format!("/v1/instances/{a}"));
    assert_eq!(r.status, 200, "{}", r.text());
    bw.assert_gone(&fp);
    bw.finish();
}

// ---- state store corruption (mock backend: the store is what is under test) ----

const INSTANCES: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("instances");

#[test]
fn corrupt_store_record_is_reported_by_key_and_the_rest_served() {
    let mut d = Daemon::start(Opts::default());
    let a = d.create(json!({"workload_class": "mock-class", "labels": {"n": "a"}}));
    let b = d.create(json!({"workload_class": "mock-class", "labels": {"n": "b"}}));
    assert_eq!(d.sigterm().map(|s| s.success()), Some(true));
    {
        let db = redb::Database::create(d.state_dir().join("anvil.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(INSTANCES).unwrap();
            let good = t.get(a.as_str()).unwrap().unwrap().value().to_vec();
            // A bad value under a's key, and a truncated copy under a new key.
            t.insert(a.as_str(), b"\x00\xffnot json".as_slice())
                .unwrap();
            t.insert("sb-truncated", &good[..good.len() / 2]).unwrap();
        }
        txn.commit().unwrap();
    }
    d.spawn();
    let log = d.log();
    for key in [a.as_str(), "sb-truncated"] {
        assert!(
            log.lines()
                .any(|l| l.contains("corrupt state store record") && l.contains(key)),
            "log reports the corrupt record {key}:\n{log}"
        );
    }
    expect_error(
        &d.get(&format!("/v1/instances/{a}")),
        404,
        Some("not_found"),
    );
    let v = d.instance(&b);
    assert_eq!(v["labels"]["n"], "b", "{v}");
    // New work is served, and the corrupt records are gone for the next start.
    let c = d.create(json!({"workload_class": "mock-class"}));
    assert_eq!(d.state_of(&c), "running");
    d.kill9();
    d.spawn();
    let again = d.log();
    let reports = again
        .lines()
        .filter(|l| l.contains("corrupt state store record"))
        .count();
    assert_eq!(
        reports, 2,
        "corrupt records dropped after being reported once"
    );
}

#[test]
fn truncated_store_file_is_refused_with_the_path_or_recovered() {
    let mut d = Daemon::start(Opts::default());
    for _ in 0..3 {
        d.create(json!({"workload_class": "mock-class"}));
    }
    assert_eq!(d.sigterm().map(|s| s.success()), Some(true));
    let db = d.state_dir().join("anvil.redb");
    let len = std::fs::metadata(&db).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.set_len(len / 3).unwrap();
    drop(f);
    // Run the daemon by hand: it may refuse to start, which the harness treats as a bug.
    let mut child = Command::new(env!("CARGO_BIN_EXE_anvil"))
        .args(["daemon", "start", "--config"])
        .arg(&d.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut served = false;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if let Ok(r) = d.try_request("GET", "/v1/health", None, &[]) {
            if r.status == 200 {
                served = true;
                break None;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "daemon neither served nor exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    if served {
        eprintln!("truncated store: the daemon repaired it and serves");
        let r = d.get("/v1/instances");
        assert_eq!(r.status, 200);
        let id = d.create(json!({"workload_class": "mock-class"}));
        assert_eq!(d.state_of(&id), "running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = child.wait().unwrap();
        assert!(st.success(), "{st}");
    } else {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let all = format!("{out}{err}");
        eprintln!("truncated store: daemon refused to start ({status:?}): {all}");
        assert!(!status.unwrap().success());
        assert!(
            all.contains("anvil.redb"),
            "the error names the store file: {all}"
        );
        assert!(!d.socket.exists(), "refusing daemon left its socket behind");
    }
}

#[test]
fn bad_policy_on_reload_is_rejected_naming_the_file_and_the_old_set_kept() {
    let d = Daemon::start(Opts::default());
    let before = d.get("/v1/policies").json();
    let pdir = d.dir.path().join("policies");
    std::fs::write(
        pdir.join("broken.toml"),
        "manifest_version = 1\npolicy_name = \"broken\"\npriority = \"high\"\n",
    )
    .unwrap();
    let r = d.post("/v1/admin/reload", json!({}));
    let e = expect_error(&r, 400, None);
    let msg = e["error"].as_str().unwrap();
    assert!(msg.contains("broken.toml"), "names the file: {e}");
    assert!(msg.contains("priority"), "names the key: {e}");
    assert_eq!(d.get("/v1/policies").json(), before, "old policy set kept");
    let id = d.create(json!({"workload_class": "mock-class"}));
    assert_eq!(d.state_of(&id), "running");
    // SIGHUP with the same bad file: the log says so, the daemon keeps the set.
    d.signal(libc::SIGHUP);
    d.wait_for("reload failure logged", Duration::from_secs(5), || {
        d.log().contains("reload failed")
    });
    assert_eq!(d.get("/v1/policies").json(), before);
}

/// Sends a raw HTTP request on the daemon's socket and returns the open stream.
fn raw_request(d: &Daemon, head: &str, body: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

#[test]
fn client_disconnect_mid_exec_kills_the_process_inside() {
    let Some(bw) = Bw::start(policy()) else {
        return;
    };
    let id = bw.create(CLASS);
    let body = serde_json::to_vec(
        &json!({"cmd": ["/bin/sh", "-c", "echo $$ > /tmp/exec.pid; exec sleep 300"], "timeout_ms": 600000}),
    )
    .unwrap();
    let head = format!(
        "POST /v1/instances/{id}/exec HTTP/1.1\r\nHost: anvil\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let s = raw_request(&bw.d, &head, &body);
    wait_until("the exec'd sleep runs", Duration::from_secs(10), || {
        let v = bw.exec(&id, &["/bin/sh", "-c", "cat /tmp/exec.pid 2>/dev/null"]);
        v["exit_code"] == 0
    });
    let pid = bw.sh(&id, "cat /tmp/exec.pid").trim().to_string();
    let host_sleep = || {
        bw.cgroup_procs(&id)
            .into_iter()
            .filter(|p| cmdline(*p).is_some_and(|c| c.starts_with("sleep 300")))
            .count()
    };
    assert_eq!(host_sleep(), 1, "sleep 300 running in the sandbox cgroup");
    drop(s);
    let t0 = Instant::now();
    wait_until(
        "the exec'd process killed after the client left",
        Duration::from_secs(10),
        || {
            let v = bw.exec(
                &id,
                &["/bin/sh", "-c", &format!("kill -0 {pid} 2>/dev/null")],
            );
            v["exit_code"] != 0 && host_sleep() == 0
        },
    );
    eprintln!(
        "process inside killed {:?} after the client disconnected",
        t0.elapsed()
    );
    assert_eq!(bw.sh(&id, "echo alive"), "alive\n", "sandbox still serves");
    bw.finish();
}

#[test]
fn client_disconnect_mid_upload_leaves_no_partial_file() {
    let Some(bw) = Bw::start(policy()) else {
        return;
    };
    let id = bw.create(CLASS);
    let total = 8 << 20;
    let head = format!(
        "PUT /v1/instances/{id}/files?path=/partial.bin HTTP/1.1\r\nHost: anvil\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\n\r\n"
    );
    let mut s = raw_request(&bw.d, &head, &vec![7u8; 3 << 20]);
    std::thread::sleep(Duration::from_millis(300));
    s.flush().unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    let r = bw.get_file(&id, "/partial.bin");
    assert_eq!(
        r.status,
        404,
        "partial upload visible: {} bytes",
        r.body.len()
    );
    let ls = bw.sh(&id, "ls -a /");
    assert!(
        !ls.contains("partial"),
        "no temp file of the upload inside: {ls}"
    );
    // A complete upload to the same path works afterwards.
    let r = bw.put_file(&id, "/partial.bin", &vec![7u8; 1 << 20]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(bw.get_file(&id, "/partial.bin").body.len(), 1 << 20);
    bw.finish();
}

// ---- Firecracker: the VMM killed ----

const MARKER: &str = "ANVIL-TEST-GUEST-READY";

#[test]
fn firecracker_killed_is_destroyed_as_exited() {
    if let Some(r) = fc_skip_reason() {
        eprintln!("SKIP: {r}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (kernel, image) = test_guest_assets(tmp.path());
    let policy = "manifest_version = 1\npolicy_name = \"vm\"\npriority = 10\n[match]\nworkload_class = [\"vm\"]\n[select]\nbackend_priority = [\"firecracker\"]\ntemplates = [\"guest\"]\nfallback_on_missing_hook = \"continue\"\n[pool]\nenabled = false\nreset_mode = \"mm-template\"\n";
    let d = Daemon::start(Opts {
        backends: format!("firecracker = \"{FIRECRACKER}\""),
        policies: vec![("vm.toml".into(), policy.into())],
        ..Default::default()
    });
    let t = d.post(
        "/v1/templates",
        json!({"name": "guest", "kernel": kernel, "rootfs_image": image, "ready_marker": MARKER}),
    );
    assert_eq!(t.status, 201, "{}", t.text());
    let vm = d.create(json!({"workload_class": "vm"}));
    let fc: Vec<i32> = all_pids()
        .into_iter()
        .filter(|p| {
            cgroup_paths(*p)
                .iter()
                .any(|c| c.ends_with(&format!("/{vm}")))
        })
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.starts_with("firecracker"))
        })
        .collect();
    assert_eq!(fc.len(), 1, "firecracker of {vm}: {fc:?}");
    let t0 = Instant::now();
    unsafe { libc::kill(fc[0], libc::SIGKILL) };
    d.wait_for("VM destroyed", Duration::from_secs(5), || {
        d.state_of(&vm) == "destroyed"
    });
    eprintln!("firecracker SIGKILL → destroyed after {:?}", t0.elapsed());
    let v = d.instance(&vm);
    assert_eq!(v["termination_reason"], "exited", "{v}");
    let left: Vec<_> = std::fs::read_dir(d.state_dir().join("instances"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "instance dirs left: {left:?}");
    let in_cg: Vec<i32> = all_pids()
        .into_iter()
        .filter(|p| {
            cgroup_paths(*p)
                .iter()
                .any(|c| c.ends_with(&format!("/{vm}")))
        })
        .collect();
    assert!(
        in_cg.is_empty(),
        "processes left in the VM's cgroup: {in_cg:?}"
    );
    let socks: Vec<_> = std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&vm))
        .map(String::from)
        .collect();
    assert!(socks.is_empty(), "unix sockets of the VM left: {socks:?}");
}
