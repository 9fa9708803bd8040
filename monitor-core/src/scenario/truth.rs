//! The generator's own log of what happened: written while it generates,
//! never derived from the detector.

use std::net::SocketAddr;

use crate::detector::Ending;

use super::wire::{Origin, Pkt, S};

/// One connection as generated.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnTruth {
    pub id: usize,
    /// Index of its path in the scenario.
    pub path: usize,
    pub device: usize,
    /// As the server sees it (after NAT, or the proxy's).
    pub client: SocketAddr,
    pub opened_ns: u64,
    /// When the server could first see how it ended (the RST, FIN, or the
    /// server's first unanswered send).
    pub ended_ns: u64,
    /// How it ended; None: still open when the capture ends.
    pub class: Option<Ending>,
    /// The heartbeat the device's outstanding Ping asked for at the end.
    pub heartbeat_s: f64,
    /// That heartbeat had been answered in full before (no mail): timing
    /// could show it.
    pub heartbeat_shown: bool,
    /// A kill: the silence it followed (server-side measure).
    pub kill_silence_s: Option<f64>,
    /// The capture holds what tells its class. False only for a black hole
    /// whose client is not seen again before the capture ends: from the
    /// server, that is also a device gone dark (out of coverage).
    pub evident: bool,
}

/// One path as generated.
#[derive(Clone, Debug, PartialEq)]
pub struct PathTruth {
    /// As the detector prints it: `100.64.3.0/24:443`.
    pub key: String,
    /// The knobs, in words.
    pub knobs: String,
    /// The killing box's manner (None: no box).
    pub manner: Option<Ending>,
    pub timeout_s: Option<f64>,
    /// The longest silence after which the client was heard again on the
    /// same connection (0: none of at least the gap threshold).
    pub longest_survived_s: f64,
    /// The shortest silence that was truly killed.
    pub shortest_killed_s: Option<f64>,
    pub kills: usize,
    /// Each device's heartbeat in force at the end (seconds).
    pub heartbeats: Vec<f64>,
    /// Its devices share one address (a NAT, a full proxy): from the
    /// server, one client whose heartbeats mix.
    pub shared_address: bool,
}

impl PathTruth {
    /// It truly killed at least one connection in the capture.
    pub fn killing(&self) -> bool {
        self.kills > 0
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Truth {
    pub paths: Vec<PathTruth>,
    pub conns: Vec<ConnTruth>,
}

/// Mark each black hole evident when its client's address opens another
/// connection after it, within the capture (the device came back).
pub fn mark_evident(conns: &mut [ConnTruth]) {
    let opened: Vec<(std::net::IpAddr, u64)> =
        conns.iter().map(|c| (c.client.ip(), c.opened_ns)).collect();
    for c in conns.iter_mut() {
        c.evident = c.class != Some(Ending::BlackHole)
            || opened
                .iter()
                .any(|(ip, at)| *ip == c.client.ip() && *at > c.ended_ns);
    }
}

/// The silences of one connection's packets (time order) that the client
/// survived: at least `min_silence_s` long, and a packet of the client's own
/// came after them.
pub fn survived_silences(pkts: &[Pkt], min_silence_s: f64) -> Vec<f64> {
    let last_client = pkts.iter().rposition(|p| p.origin == Origin::Client);
    let Some(last_client) = last_client else {
        return Vec::new();
    };
    pkts.windows(2)
        .take(last_client)
        .map(|w| w[1].at.saturating_sub(w[0].at) as f64 / S as f64)
        .filter(|s| *s >= min_silence_s)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::wire::MS;

    fn p(at_s: f64, origin: Origin) -> Pkt {
        Pkt {
            at: (at_s * 1000.0) as u64 * MS,
            conn: 0,
            client: "192.0.2.9:4000".parse().unwrap(),
            origin,
            flags: 0,
            seq: 0,
            ack: 0,
            payload: 0,
            ttl: 0,
            ip_id: 0,
            window: 0,
        }
    }

    #[test]
    fn a_silence_survives_only_when_the_client_is_heard_after_it() {
        use Origin::*;
        let pkts = [
            p(0.0, Client),
            p(0.001, Server),
            p(60.0, Server),
            p(60.1, Client),
            p(60.2, Server),
            p(160.0, Server),
            p(160.5, Server),
        ];
        assert_eq!(survived_silences(&pkts, 5.0), vec![59.999]);
    }
}
