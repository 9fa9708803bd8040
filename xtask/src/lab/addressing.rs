//! The lab's address plan: the server, each path's router uplink, and the
//! devices behind it.
//!
//! Path i's clients live in 100.64.i.0/24 and 2001:db8:i::/64 (the router
//! is host 1, devices from host [`FIRST_DEVICE_HOST`]); its router's uplink
//! is 192.0.2.(10+i) on the switch, where the server is 192.0.2.1.

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
