//! Where the agent sits: on the server (its client-facing interface, one
//! direction per hook), on a mirror port (tap mode: both directions on one
//! interface's ingress), or on a router (both hooks); off the server, the
//! server's port and address tell the directions apart.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// `[agent] mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    /// On the server or a router: ingress is client to server, egress the reverse.
    #[default]
    Server,
    /// On a mirror (SPAN) port or a network tap: every packet arrives on
    /// ingress; the tracked port (and `servers`) say which side is the server.
    /// Nothing is ever transmitted.
    Tap,
    /// On a router or firewall in the path, any interface: both hooks, and
    /// as in tap mode the tracked port (and `servers`) say which side is
    /// the server, whichever way the interface faces.
    Router,
}

impl AgentMode {
    /// Direction from the ports (tap, router), not from the hook.
    pub fn by_port(self) -> bool {
        self != AgentMode::Server
    }

    /// Hooks in words, for `status` and the log.
    pub fn hooks(self, xdp_mode: &str, tc_mode: &str) -> String {
        let ingress = match xdp_mode {
            "off" => format!("TC ingress ({tc_mode})"),
            m => format!("XDP ingress ({m})"),
        };
        match self {
            AgentMode::Server if xdp_mode == "off" => format!("TC ingress and egress ({tc_mode})"),
            AgentMode::Server => format!("{ingress}, TC egress ({tc_mode})"),
            AgentMode::Tap => format!("{ingress}, tap: both directions"),
            AgentMode::Router => format!("{ingress}, TC egress ({tc_mode}), direction by port"),
        }
    }
}

/// A server address or prefix (`192.0.2.1`, `2001:db8::/64`) for tap and
/// router modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl ServerPrefix {
    /// The family's byte and the address as the kernel's server table keys them.
    pub fn key(&self) -> (u8, [u8; 16]) {
        let mut a = [0u8; 16];
        match self.addr {
            IpAddr::V4(v4) => {
                a[..4].copy_from_slice(&v4.octets());
                (monitor_common::FAMILY_V4, a)
            }
            IpAddr::V6(v6) => (monitor_common::FAMILY_V6, v6.octets()),
        }
    }
}

impl FromStr for ServerPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(ServerPrefix { addr, len })
    }
}

impl TryFrom<String> for ServerPrefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ServerPrefix> for String {
    fn from(p: ServerPrefix) -> String {
        p.to_string()
    }
}

impl fmt::Display for ServerPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_prefixes_parse_with_or_without_a_length_and_refuse_nonsense() {
        let p: ServerPrefix = "192.0.2.1".parse().unwrap();
        assert_eq!(p.len, 32);
        let p: ServerPrefix = "2001:db8::/64".parse().unwrap();
        assert_eq!((p.len, p.to_string().as_str()), (64, "2001:db8::/64"));
        assert!("192.0.2.0/33".parse::<ServerPrefix>().is_err());
        assert!("mail.example".parse::<ServerPrefix>().is_err());
        let (family, addr) = "192.0.2.1".parse::<ServerPrefix>().unwrap().key();
        assert_eq!((family, &addr[..5]), (4, &[192, 0, 2, 1, 0][..]));
    }
}
