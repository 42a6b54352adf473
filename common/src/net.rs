//! Port helpers for local clusters and tests.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// A port that was free a moment ago on 127.0.0.1 (bind-and-release; the
/// caller binds it soon after).
pub fn free_local_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(listener.local_addr()?.port())
}

/// The first port of `count` consecutive ports that are all bindable on
/// `127.0.0.1` right now, searched from a random start in [20000, 60000).
pub fn free_local_port_range(count: u16) -> std::io::Result<u16> {
    for _ in 0..200 {
        let first: u16 = 20_000 + (rand::random::<u16>() % 40_000);
        let all_free = (0..count).all(|offset| {
            TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, first + offset))).is_ok()
        });
        if all_free {
            return Ok(first);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no {count} consecutive free ports found in 20000..60000"),
    ))
}
