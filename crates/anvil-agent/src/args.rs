//! Command line, parsed by hand to keep the binary small.

use std::path::PathBuf;

/// A socket address the agent listens on or connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    /// `cid` is ignored for listening (the agent binds `VMADDR_CID_ANY`).
    Vsock {
        cid: u32,
        port: u32,
    },
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Vsock {
                cid: u32::MAX,
                port,
            } => write!(f, "vsock:{port}"),
            Addr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub listen: Addr,
    pub notify: Option<Addr>,
    pub init: bool,
}

const USAGE: &str = "usage: anvil-agent --listen unix:<path>|vsock:<port> \
[--notify unix:<path>|vsock:<cid>:<port>] [--init]";

/// `Ok(None)` when only help or the version was asked for (already printed).
pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let (mut listen, mut notify, mut init) = (None, None, false);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen" => listen = Some(parse_addr(&value(&mut it, "--listen")?, false)?),
            "--notify" => notify = Some(parse_addr(&value(&mut it, "--notify")?, true)?),
            "--init" => init = true,
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--version" => {
                println!(
                    "anvil-agent {} (protocol {})",
                    env!("CARGO_PKG_VERSION"),
                    anvil_protocol::PROTOCOL_VERSION
                );
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    Ok(Some(Args {
        listen,
        notify,
        init,
    }))
}

fn value(it: &mut impl Iterator<Item = String>, flag: &str) -> Result<String, String> {
    it.next().ok_or_else(|| format!("{flag} needs a value"))
}

/// `unix:/path`, `vsock:<port>` (listen) or `vsock:<cid>:<port>` (connect).
pub fn parse_addr(s: &str, connect: bool) -> Result<Addr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("unix socket path must be absolute: {s:?}"));
        }
        return Ok(Addr::Unix(PathBuf::from(path)));
    }
    if let Some(rest) = s.strip_prefix("vsock:") {
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("bad number {v:?} in {s:?}"))
        };
        return match rest.split_once(':') {
            Some((cid, port)) => Ok(Addr::Vsock {
                cid: num(cid)?,
                port: num(port)?,
            }),
            // Connecting without a CID means the host (CID 2).
            None => Ok(Addr::Vsock {
                cid: if connect { 2 } else { u32::MAX },
                port: num(rest)?,
            }),
        };
    }
    Err(format!("address must start with unix: or vsock: ({s:?})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Option<Args>, String> {
        parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_forms() {
        let a = args(&[
            "--listen",
            "unix:/run/a.sock",
            "--notify",
            "vsock:2:1025",
            "--init",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(a.listen, Addr::Unix("/run/a.sock".into()));
        assert_eq!(a.notify, Some(Addr::Vsock { cid: 2, port: 1025 }));
        assert!(a.init);
        let a = args(&["--listen", "vsock:1024"]).unwrap().unwrap();
        assert_eq!(
            a.listen,
            Addr::Vsock {
                cid: u32::MAX,
                port: 1024
            }
        );
        assert_eq!(a.notify, None);
        assert!(!a.init);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(args(&[]).is_err());
        assert!(args(&["--listen"]).is_err());
        assert!(args(&["--listen", "tcp:1"]).is_err());
        assert!(args(&["--listen", "unix:rel.sock"]).is_err());
        assert!(args(&["--listen", "vsock:x"]).is_err());
        assert!(args(&["--listen", "unix:/a", "--bogus"]).is_err());
    }
}
