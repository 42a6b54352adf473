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

/// This machine's address on the route to `peer` (`host:port`): what a
/// process on `peer` would see connections from. No packet is sent (a UDP
/// socket is only connected).
pub fn route_address(peer: &str) -> std::io::Result<std::net::IpAddr> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let target = peer
        .to_socket_addrs()?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{peer}: no IPv4 address"),
            )
        })?;
    let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

/// The first IPv4 address of an interface that is up and not loopback (of
/// `interface` only, when given): where other machines reach this one.
pub fn host_address(interface: Option<&str>) -> std::io::Result<std::net::IpAddr> {
    let mut addresses: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut addresses) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = None;
    let mut cursor = addresses;
    while !cursor.is_null() {
        // SAFETY: cursor walks the list getifaddrs returned.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and ifa_name a C string.
        let (family, name) = unsafe {
            (
                (*entry.ifa_addr).sa_family as i32,
                std::ffi::CStr::from_ptr(entry.ifa_name).to_string_lossy(),
            )
        };
        let up = entry.ifa_flags & libc::IFF_UP as u32 != 0;
        let loopback = entry.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
        if family != libc::AF_INET || !up || interface.is_some_and(|wanted| wanted != name) {
            continue;
        }
        if loopback && interface.is_none() {
            continue;
        }
        // SAFETY: an AF_INET address is a sockaddr_in.
        let raw = unsafe {
            (*(entry.ifa_addr as *const libc::sockaddr_in))
                .sin_addr
                .s_addr
        };
        found = Some(std::net::IpAddr::V4(Ipv4Addr::from(u32::from_be(raw))));
        break;
    }
    // SAFETY: the list came from getifaddrs.
    unsafe { libc::freeifaddrs(addresses) };
    found.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            match interface {
                Some(name) => format!("no IPv4 address on interface {name}"),
                None => "no IPv4 address on an interface that is up (other than loopback)".into(),
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_to_loopback_starts_at_loopback() {
        assert_eq!(
            route_address("127.0.0.1:9").unwrap(),
            std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
    }

    #[test]
    fn the_loopback_interface_is_found_by_name() {
        assert_eq!(
            host_address(Some("lo")).unwrap(),
            std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        let error = host_address(Some("no-such-interface0")).unwrap_err();
        assert!(error.to_string().contains("no-such-interface0"), "{error}");
    }
}
