//! anvil-agent: the first process in every sandbox. Serves the daemon's requests (health,
//! exec, files) over the `anvil-protocol` frames on a Unix socket or vsock, reaps zombies,
//! and with `--init` mounts what a minimal init mounts.
//!
//! std threads only: one accept loop, a thread per connection, one reaper, one signal thread.

mod args;
mod exec;
mod files;
mod init;
mod net;
mod reaper;
mod server;

use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(&format!("fatal: {e}"));
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args = match args::parse(std::env::args().skip(1))? {
        Some(a) => a,
        None => return Ok(()),
    };
    // Before any thread exists, so every thread inherits the mask and only the signal
    // thread sees SIGTERM/SIGINT (exec'd children get a clean mask from std).
    init::block_termination_signals()?;
    if args.init {
        init::setup();
    }
    init::ensure_path_env();
    init::become_reaper();
    server::serve(args)
}

/// Logs to stderr (the sandbox's log file or the VM's serial console).
pub(crate) fn log(msg: &str) {
    eprintln!("anvil-agent[{}]: {msg}", std::process::id());
}
