//! The lab's address plan: the server, each path's router uplink, and the
//! devices behind it.
//!
//! Path i's clients live in 100.64.i.0/24 and 2001:db8:i::/64 (the router
//! is host 1, devices from host [`FIRST_DEVICE_HOST`]); its router's uplink
//! is 192.0.2.(10+i) on the switch, where the server is 192.0.2.1. A path
//! whose router source-NATs its clients shows them to the server as
//! 100.65.i.1 (its own prefix, so the monitor sees it as its own path).

use std::net::IpAddr;

pub const SERVER_V4: &str = "192.0.2.1";
pub const SERVER_V6: &str = "2001:db8:ffff::1";
pub const SERVER_PORT: u16 = 443;
/// The endpoint's plaintext port, as behind a TLS-terminating load balancer:
/// the agent reads its Pings for the exact heartbeat.
pub const PLAINTEXT_PORT: u16 = 8080;
/// The device's initial TTL / hop limit.
pub const DEVICE_TTL: u32 = 50;

/// The switch's IPv4 network (the server and every router's uplink).
pub(super) const UPLINK_NET_V4: &str = "192.0.2.0/24";
/// The switch's IPv6 network as the monitor names a path (its /56): the
/// proxy hosts reach the server over IPv6, apart from the IPv4 proxies.
pub(super) const UPLINK_PATH_V6: &str = "[2001:db8:ffff::/56]";
/// The client-side host number of a path's router.
pub(super) const ROUTER_HOST: usize = 1;
/// The host number of a path's first device.
pub(super) const FIRST_DEVICE_HOST: usize = 10;

pub(super) fn client_v4(path: usize, host: usize) -> String {
    format!("100.64.{path}.{host}")
}

pub(super) fn client_v6(path: usize, host: usize) -> String {
    format!("2001:db8:{path:x}::{host:x}")
}

pub(super) fn client_net_v4(path: usize) -> String {
    format!("100.64.{path}.0/24")
}

/// Path `path`'s IPv6 clients as the monitor names their path (its /56).
pub(super) fn client_path_v6(path: usize) -> String {
    format!("2001:db8:{path:x}::/56")
}

pub(super) fn client_net_v6(path: usize) -> String {
    format!("2001:db8:{path:x}::/64")
}

/// Path `path`'s router on the switch.
pub(super) fn router_up_v4(path: usize) -> String {
    format!("192.0.2.{}", 10 + path)
}

pub(super) fn router_up_v6(path: usize) -> String {
    format!("2001:db8:ffff::{:x}", 10 + path)
}

/// The address path `path`'s router source-NATs its clients to.
pub(super) fn nat_v4(path: usize) -> String {
    format!("100.65.{path}.1")
}

pub(super) fn nat_net_v4(path: usize) -> String {
    format!("100.65.{path}.0/24")
}

/// The path (from 1) a connection the server accepted comes from: a
/// device's own address, its NAT's, or its proxy's (the router's uplink).
pub fn path_of(peer: IpAddr) -> Option<usize> {
    match peer.to_canonical() {
        IpAddr::V4(a) => match a.octets() {
            [100, 64 | 65, i, _] => Some(usize::from(i)),
            [192, 0, 2, h] => usize::from(h).checked_sub(10),
            _ => None,
        },
        IpAddr::V6(a) => match a.segments() {
            [0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, h] => usize::from(h).checked_sub(10),
            [0x2001, 0xdb8, i, ..] => Some(usize::from(i)),
            _ => None,
        },
    }
    .filter(|&i| i > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn path_of_finds_the_path_behind_device_nat_and_proxy_addresses() {
        assert_eq!(path_of(ip(&client_v4(3, 12))), Some(3));
        assert_eq!(path_of(ip(&client_v6(11, 10))), Some(11));
        assert_eq!(path_of(ip(&nat_v4(10))), Some(10));
        assert_eq!(path_of(ip(&router_up_v4(4))), Some(4));
        assert_eq!(path_of(ip(&router_up_v6(7))), Some(7));
        // As a dual-stack listener reports an IPv4 peer.
        assert_eq!(path_of(ip("::ffff:100.64.2.10")), Some(2));
    }

    #[test]
    fn path_of_knows_no_path_for_the_server_or_strangers() {
        assert_eq!(path_of(ip(SERVER_V4)), None);
        assert_eq!(path_of(ip(SERVER_V6)), None);
        assert_eq!(path_of(ip("198.51.100.7")), None);
    }
}
