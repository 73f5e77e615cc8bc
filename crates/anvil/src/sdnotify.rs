//! systemd's sd_notify protocol: a datagram to $NOTIFY_SOCKET (no libsystemd needed).

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) when run under systemd; does nothing otherwise.
/// A `RELOADING=1` message gets `MONOTONIC_USEC=` added: systemd >= 253 requires it to tie the
/// reload to the READY=1 that ends it (Type=notify-reload); older versions ignore it.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let msg = with_monotonic(state);
    let bytes = path.as_encoded_bytes();
    let res = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

fn with_monotonic(state: &str) -> String {
    if !state.lines().any(|l| l == "RELOADING=1") {
        return state.to_string();
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return state.to_string();
    }
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    format!("{state}\nMONOTONIC_USEC={usec}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn reloading_carries_monotonic_usec() {
        let m = super::with_monotonic("RELOADING=1");
        let usec: u64 = m
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{m:?}"));
        assert!(usec > 0);
        assert_eq!(super::with_monotonic("READY=1"), "READY=1");
    }
}
