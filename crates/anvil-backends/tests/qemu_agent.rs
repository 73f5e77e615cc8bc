//! The real VM guest image (Debian cloud kernel, initramfs, rootfs with anvil-agent as pid 1)
//! booted under QEMU TCG with vhost-device-vsock, driven through anvil's host vsock client
//! (`AgentEndpoint::Vsock`, `CONNECT <port>` handshake; `ready` on `<uds>_1025`) — the same
//! code the Firecracker backend uses. See `qemu_support` for how the tools are found.
//!
//! Skips (with `SKIP:` on stderr) when qemu-system-x86_64 or vhost-device-vsock is missing,
//! or when the image is missing and this host cannot build it.

mod qemu_support;

use anvil_backends::agent::{AgentClient, EntryKind, ExecOutput, ExecRequest};
use qemu_support::{GuestImage, QemuVm, Tools, VmOptions};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

fn tools_and_image(test: &str) -> Option<(Tools, GuestImage)> {
    let tools = Tools::find(test)?;
    let image = GuestImage::build_or_find(test).expect("building the guest image")?;
    Some((tools, image))
}

async fn run(agent: &AgentClient, argv: &[&str]) -> ExecOutput {
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        timeout_ms: Some(20_000),
        stdin: false,
    };
    let out = agent
        .exec(req, None)
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"));
    assert_eq!(
        out.exit.exit_code,
        Some(0),
        "{argv:?} failed: {:?}, stderr {:?}",
        out.exit,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn guest_image_serves_exec_and_files_over_vsock() {
    let test = "guest_image_serves_exec_and_files_over_vsock";
    let Some((tools, image)) = tools_and_image(test) else {
        return;
    };
    let mut vm = match QemuVm::boot(&tools, &image, &VmOptions::default()).await {
        Ok(vm) => vm,
        Err(e) => panic!("booting the guest image under QEMU: {e}"),
    };
    eprintln!(
        "agent {} ready {:.1} s after QEMU started",
        vm.ready.version,
        vm.boot_time.as_secs_f64()
    );
    let diag = |vm: &QemuVm| vm.diagnostics();
    // The agent is the guest's init.
    assert_eq!(vm.ready.pid, 1, "{}", diag(&vm));
    let agent = vm.agent();
    let started = Instant::now();

    let health = agent.health().await.expect("health over vsock");
    assert_eq!(health.pid, 1);

    // The Debian kernel the image was built from is the one running.
    let out = run(&agent, &["uname", "-r"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        image.kernel_version,
        "{}",
        diag(&vm)
    );

    // The root is the tmpfs-backed overlay over the read-only ext4 image.
    let mounts =
        String::from_utf8_lossy(&run(&agent, &["cat", "/proc/mounts"]).await.stdout).into_owned();
    assert!(
        mounts.lines().any(|l| l.starts_with("overlay / overlay ")),
        "root is not the overlay:\n{mounts}"
    );

    // A file written through the agent reads back, through the agent and inside the guest.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let written = agent
        .write_file("/root/blob.bin", &data, 0o640)
        .await
        .expect("write_file");
    assert_eq!(written, data.len() as u64);
    assert_eq!(
        agent.read_file("/root/blob.bin").await.expect("read_file"),
        data
    );
    let text = b"written by the host over vsock\n";
    agent
        .write_file("/root/hello.txt", text, 0o600)
        .await
        .expect("write_file");
    let out = run(&agent, &["cat", "/root/hello.txt"]).await;
    assert_eq!(&out.stdout[..], &text[..]);
    let out = run(&agent, &["stat", "-c", "%a %s", "/root/blob.bin"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "640 200000");
    let entries = agent.list_dir("/root").await.expect("list_dir");
    let hello = entries
        .iter()
        .find(|e| e.name == "hello.txt")
        .expect("hello.txt listed");
    assert_eq!(hello.kind, EntryKind::File);
    assert_eq!(hello.size, text.len() as u64);

    // A file written inside the guest reads back through the agent.
    run(&agent, &["sh", "-c", "uname -r > /tmp/kver"]).await;
    let kver = agent.read_file("/tmp/kver").await.expect("read_file");
    assert_eq!(String::from_utf8_lossy(&kver).trim(), image.kernel_version);
    eprintln!(
        "exec/files round trips took {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // Teardown leaves no process and no file behind.
    let pids = vm.pids();
    let dir = vm.dir().expect("vm dir");
    vm.shutdown();
    assert_gone(&pids, &dir);
}

#[tokio::test]
async fn guest_without_rootfs_fails_fast_and_cleans_up() {
    let test = "guest_without_rootfs_fails_fast_and_cleans_up";
    let Some((tools, image)) = tools_and_image(test) else {
        return;
    };
    // No drive: /init cannot mount /dev/vda, exits, the kernel panics and (-no-reboot) QEMU
    // exits — the harness must report that instead of waiting for the boot timeout.
    let opts = VmOptions {
        attach_rootfs: false,
        ..VmOptions::default()
    };
    let started = Instant::now();
    let err = match QemuVm::boot(&tools, &image, &opts).await {
        Ok(vm) => panic!("booted without a rootfs:\n{}", vm.diagnostics()),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < opts.boot_timeout,
        "waited for the timeout instead of noticing QEMU's exit"
    );
    assert!(
        err.message
            .contains("QEMU exited before the agent was ready"),
        "{err}"
    );
    assert!(
        err.message.contains("anvil-init: error: no /dev/vda"),
        "{err}"
    );
    assert_eq!(err.pids.len(), 2, "{err}");
    assert_gone(&err.pids, &err.dir);
}

fn assert_gone(pids: &[u32], dir: &Path) {
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists"
        );
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
}
