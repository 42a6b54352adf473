//! Port helpers for local clusters and tests.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// Linux's default ephemeral range, used where /proc cannot be read.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);
/// The lowest port handed out (above the registered services people run on
/// a training machine: etcd 2379, TensorBoard 6006, Prometheus 9090, …).
const LOWEST: u16 = 20_000;

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut numbers = text.split_whitespace().map(str::parse::<u16>);
            Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
        })
        .unwrap_or(DEFAULT_EPHEMERAL)
}

fn bindable(port: u16) -> bool {
    // Servers here listen on loopback or on every address: check both.
    TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).is_ok()
        && TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).is_ok()
}

/// A port that is free now on 127.0.0.1 and on the wildcard address, for a
/// server the caller starts soon after (etcd, rank 0's TCP store, …).
///
/// It lies outside the kernel's ephemeral range. A port from `bind(0)` is
/// ephemeral: between the check and the server's bind, the kernel may give
/// it to any outgoing connection or Gloo pair socket on the machine, and
/// the server then fails with EADDRINUSE (seen in CI with tests running
/// side by side). A port outside the range can only be taken by a program
/// asking for that very port.
pub fn free_local_port() -> std::io::Result<u16> {
    free_local_port_range(1).or_else(|_| {
        // No room outside the range (an unusual sysctl): let the kernel choose.
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        Ok(listener.local_addr()?.port())
    })
}

/// The first port of `count` consecutive ports that are all free right now,
/// from [`LOWEST`] up and outside the ephemeral range (see
/// [`free_local_port`]), searched from random starts.
pub fn free_local_port_range(count: u16) -> std::io::Result<u16> {
    let (low, high) = ephemeral_range();
    let last_of = |first: u16| u32::from(first) + u32::from(count.max(1)) - 1;
    // Starts whose whole run lies below or above the ephemeral range.
    let starts: Vec<u16> = (LOWEST..=u16::MAX)
        .filter(|&first| last_of(first) < u32::from(low) || first > high)
        .filter(|&first| last_of(first) <= u32::from(u16::MAX))
        .collect();
    for _ in 0..starts.len().min(500) {
        let first = starts[rand::random::<u32>() as usize % starts.len()];
        if (first..=last_of(first) as u16).all(bindable) {
            return Ok(first);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!(
            "no {count} consecutive free ports found from {LOWEST} up outside the ephemeral range {low}-{high}"
        ),
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
    fn free_ports_are_free_and_outside_the_ephemeral_range() {
        let (low, high) = ephemeral_range();
        let port = free_local_port().unwrap();
        assert!(port >= LOWEST && !(low..=high).contains(&port), "{port}");
        TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).unwrap();
        let first = free_local_port_range(8).unwrap();
        for port in first..first + 8 {
            assert!(port >= LOWEST && !(low..=high).contains(&port), "{port}");
            TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).unwrap();
        }
    }

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
