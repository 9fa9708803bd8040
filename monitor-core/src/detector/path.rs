//! A path is the client's network prefix and the server port: the unit a
//! middlebox's timeout applies to. Per path: the longest silence that
//! survived, the silences that were killed, and from them the estimate.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

use super::ending::{BoxLocation, Ending};

/// Client prefix (address masked, as 16 bytes) + prefix length + server
/// port; or, for an upstream leg (this host the client: a reverse proxy's
/// connection to Exchange), the server's address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathKey {
    pub net: [u8; 16],
    pub v4: bool,
    pub prefix: u8,
    pub port: u16,
    /// An upstream leg: `net` is the server's address, not the clients'.
    pub upstream: bool,
}

/// How an upstream leg's path is printed first: `upstream:192.0.2.1/32:443`.
pub const UPSTREAM_PREFIX: &str = "upstream:";

impl PathKey {
    pub fn new(client: IpAddr, port: u16, v4_prefix: u8, v6_prefix: u8) -> PathKey {
        let (mut net, v4, prefix) = match client {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&a.octets());
                (b, true, v4_prefix.min(32))
            }
            IpAddr::V6(a) => (a.octets(), false, v6_prefix.min(128)),
        };
        let len = if v4 { 4 } else { 16 };
        for (i, byte) in net.iter_mut().enumerate().take(len) {
            let bits_before = (i * 8) as u8;
            if prefix <= bits_before {
                *byte = 0;
            } else if prefix < bits_before + 8 {
                *byte &= 0xffu8 << (8 - (prefix - bits_before));
            }
        }
        PathKey {
            net,
            v4,
            prefix,
            port,
            upstream: false,
        }
    }

    /// The upstream leg to `server`: each server its own path (this host
    /// is every such flow's client, so the clients' prefix says nothing).
    pub fn upstream(server: IpAddr, port: u16) -> PathKey {
        PathKey {
            upstream: true,
            ..PathKey::new(server, port, 32, 128)
        }
    }

    #[cfg(test)]
    pub fn test(n: u8) -> PathKey {
        PathKey::new(IpAddr::V4(Ipv4Addr::new(198, 51, n, 0)), 443, 24, 56)
    }

    pub fn network(&self) -> IpAddr {
        if self.v4 {
            IpAddr::V4(Ipv4Addr::new(
                self.net[0],
                self.net[1],
                self.net[2],
                self.net[3],
            ))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.net))
        }
    }
}

impl fmt::Display for PathKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.upstream {
            f.write_str(UPSTREAM_PREFIX)?;
        }
        match self.network() {
            IpAddr::V4(a) => write!(f, "{a}/{}:{}", self.prefix, self.port),
            IpAddr::V6(a) => write!(f, "[{a}/{}]:{}", self.prefix, self.port),
        }
    }
}

/// A string that does not name a path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a path like 198.51.100.0/24:443, [2001:db8::/56]:443 or upstream:192.0.2.1/32:443")]
pub struct BadPath(pub String);

/// A path as printed: `198.51.100.0/24:443` or `[2001:db8::/56]:443`.
impl std::str::FromStr for PathKey {
    type Err = BadPath;
    fn from_str(s: &str) -> Result<PathKey, BadPath> {
        let bad = || BadPath(s.to_string());
        let (upstream, s) = match s.strip_prefix(UPSTREAM_PREFIX) {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (net, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let net = net.trim_start_matches('[').trim_end_matches(']');
        let net: ipnet::IpNet = net.parse().map_err(|_| bad())?;
        let len = net.prefix_len();
        Ok(PathKey {
            upstream,
            ..PathKey::new(net.addr(), port, len, len)
        })
    }
}

impl Serialize for PathKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Client-facing paths an upstream leg remembers ending requests on.
pub const ANSWERED_PATHS_KEPT: usize = 32;

/// How many kill silences each path keeps (the most recent).
pub const KILLS_KEPT: usize = 256;

/// How far an estimate can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    Low,
    High,
}

impl std::fmt::Display for Confidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Confidence::Low => "low",
            Confidence::High => "high",
        })
    }
}

/// What a path's kills say about its middlebox's idle timeout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Estimate {
    /// Kills at expiry (RST or proxy close after T of silence): T directly.
    Point {
        seconds: f64,
        /// Median absolute deviation of the kill silences.
        spread_seconds: f64,
        samples: usize,
    },
    /// Silent forgetting: only (longest survived, shortest killed] is known.
    Bracket {
        /// Longest silence that survived (0 when none seen yet).
        low_seconds: f64,
        high_seconds: f64,
        samples: usize,
    },
    /// A bracket that keepalive probes at chosen silences (sounding, issue
    /// 16) closed to under [`SOUNDED_WIDTH`]: the timeout is its middle,
    /// within half its width either way.
    Sounded {
        seconds: f64,
        low_seconds: f64,
        high_seconds: f64,
        /// The path's probes, most recent last (at most [`PROBES_SHOWN`]).
        probes: Vec<ProbeOutcome>,
    },
}

/// A bracket narrower than this is a point (seconds).
pub const SOUNDED_WIDTH: f64 = 2.0;
/// Probes an estimate shows as its evidence.
pub const PROBES_SHOWN: usize = 8;
/// Probes each path keeps.
pub const PROBES_KEPT: usize = 64;

/// One keepalive probe's outcome, as evidence.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    /// The silence the probe ended (seconds).
    pub silence_seconds: f64,
    /// The client answered it (else the box reset it or dropped it).
    pub survived: bool,
}

/// A keepalive probe of one of the path's connections and what came of it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub silence_seconds: f64,
    pub survived: bool,
    /// When its outcome was known (kernel clock).
    pub at_ns: u64,
    /// The connection's client end.
    pub client: std::net::SocketAddr,
}

impl Estimate {
    /// A single number for gauges and device matching (the bracket's top:
    /// the timeout is at most that).
    pub fn seconds(&self) -> f64 {
        match self {
            Estimate::Point { seconds, .. } => *seconds,
            Estimate::Bracket { high_seconds, .. } => *high_seconds,
            Estimate::Sounded { seconds, .. } => *seconds,
        }
    }

    /// How sure: "high" for 3+ agreeing point samples, or for a bracket
    /// closed on both sides and narrow (within a quarter of its upper end);
    /// "low" otherwise.
    pub fn confidence(&self) -> Confidence {
        match self {
            Estimate::Point {
                samples,
                spread_seconds,
                seconds,
            } if *samples >= 3 && *spread_seconds <= (0.05 * seconds).max(1.0) => Confidence::High,
            Estimate::Bracket {
                low_seconds,
                high_seconds,
                samples,
            } if *low_seconds > 0.0
                && *samples >= 2
                && high_seconds - low_seconds <= 0.25 * high_seconds =>
            {
                Confidence::High
            }
            Estimate::Sounded { .. } => Confidence::High,
            _ => Confidence::Low,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Kill {
    pub silence_s: f64,
    pub ending: Ending,
    pub at_ns: u64,
}

#[derive(Clone, Debug, Default)]
pub struct PathStats {
    pub last_seen_ns: u64,
    pub flows_ended: u64,
    pub by_ending: [u64; Ending::COUNT],
    pub premature: u64,
    pub churn: u64,
    /// Flows that ended with events lost (not used for the estimate).
    pub incomplete: u64,
    /// Longest silence that survived (seconds).
    pub longest_survived_s: f64,
    /// Reset kills by where their TTL put the box.
    pub on_the_path: u64,
    pub at_or_next_to_client: u64,
    /// Closed flows whose client side sent a second RST with another
    /// sequence number right after the first: an injector's spray.
    pub reset_bursts: u64,
    /// Client-facing answers that were this host's proxy timing out.
    pub proxy_timeout_answers: u64,
    /// An upstream leg's: the client-facing paths whose requests its
    /// give-ups ended (at most [`ANSWERED_PATHS_KEPT`]).
    pub answered_paths: std::collections::BTreeMap<PathKey, u64>,
    pub kills: VecDeque<Kill>,
    /// Keepalive probes whose outcome is known (at most [`PROBES_KEPT`]).
    pub probes: VecDeque<Probe>,
    /// Recent heartbeat samples (hold times), most recent last.
    pub heartbeats: VecDeque<f64>,
    /// Each client's current heartbeat estimate (the largest of its last few
    /// samples): what devices use *now*, after backing off from kills.
    pub latest_by_client: HashMap<IpAddr, f64>,
    /// Ping requests read on plaintext ports.
    pub pings_read: u64,
    /// Each device's latest HeartbeatInterval, read from its Ping (exact).
    pub requested_by_device: HashMap<String, f64>,
}

/// Heartbeat samples kept per path.
pub const HEARTBEATS_KEPT: usize = 256;
/// Clients whose latest heartbeat a path remembers.
pub const CLIENTS_KEPT: usize = 1024;

/// The median (0 for none: callers check for emptiness where it matters).
pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl PathStats {
    pub fn record_survival(&mut self, silence_s: f64) {
        if silence_s > self.longest_survived_s {
            self.longest_survived_s = silence_s;
        }
    }

    /// A client-facing request on `client_path` ended by this upstream
    /// leg's give-up.
    pub fn record_answered_path(&mut self, client_path: PathKey) {
        if self.answered_paths.len() < ANSWERED_PATHS_KEPT
            || self.answered_paths.contains_key(&client_path)
        {
            *self.answered_paths.entry(client_path).or_default() += 1;
        }
    }

    pub fn record_location(&mut self, location: BoxLocation) {
        match location {
            BoxLocation::OnThePath => self.on_the_path += 1,
            BoxLocation::AtOrNextToClient => self.at_or_next_to_client += 1,
        }
    }

    /// Where most of the path's reset kills put the box.
    pub fn box_location(&self) -> Option<BoxLocation> {
        match (self.on_the_path, self.at_or_next_to_client) {
            (0, 0) => None,
            (a, b) if b > a => Some(BoxLocation::AtOrNextToClient),
            _ => Some(BoxLocation::OnThePath),
        }
    }

    pub fn record_kill(&mut self, kill: Kill) {
        if self.kills.len() >= KILLS_KEPT {
            self.kills.pop_front();
        }
        self.kills.push_back(kill);
    }

    pub fn record_probe(&mut self, probe: Probe) {
        if self.probes.len() >= PROBES_KEPT {
            self.probes.pop_front();
        }
        self.probes.push_back(probe);
    }

    pub fn record_heartbeat(&mut self, client: IpAddr, seconds: f64) {
        if self.heartbeats.len() >= HEARTBEATS_KEPT {
            self.heartbeats.pop_front();
        }
        self.heartbeats.push_back(seconds);
        if self.latest_by_client.len() >= CLIENTS_KEPT
            && !self.latest_by_client.contains_key(&client)
        {
            // Bounded: forget an arbitrary client to make room.
            if let Some(k) = self.latest_by_client.keys().next().copied() {
                self.latest_by_client.remove(&k);
            }
        }
        self.latest_by_client.insert(client, seconds);
    }

    /// A Ping request read; `device` stated `seconds` (or `None`: unstated or unreadable).
    pub fn record_ping(&mut self, device: &str, seconds: Option<f64>) {
        self.pings_read += 1;
        let Some(h) = seconds else { return };
        if self.requested_by_device.len() >= CLIENTS_KEPT
            && !self.requested_by_device.contains_key(device)
        {
            if let Some(k) = self.requested_by_device.keys().next().cloned() {
                self.requested_by_device.remove(&k);
            }
        }
        self.requested_by_device.insert(device.to_string(), h);
    }

    /// Median over devices of the heartbeat their latest Ping asked for.
    pub fn median_requested_heartbeat(&self) -> Option<f64> {
        (!self.requested_by_device.is_empty()).then(|| {
            median(
                &mut self
                    .requested_by_device
                    .values()
                    .copied()
                    .collect::<Vec<_>>(),
            )
        })
    }

    /// Median over clients of their latest heartbeat.
    pub fn median_heartbeat(&self) -> Option<f64> {
        (!self.latest_by_client.is_empty())
            .then(|| median(&mut self.latest_by_client.values().copied().collect::<Vec<_>>()))
    }

    pub fn kills_total(&self) -> u64 {
        Ending::KILLS
            .iter()
            .map(|e| self.by_ending[*e as usize])
            .sum()
    }

    /// The estimate from the kills kept. Kills at expiry (injected RST at
    /// expiry, proxy timeout) give the timeout directly: their median is
    /// robust to outliers and RTT jitter. Otherwise the bracket.
    pub fn estimate(&self) -> Option<Estimate> {
        let mut at_expiry: Vec<f64> = self
            .kills
            .iter()
            .filter(|k| k.ending.kills_at_expiry())
            .map(|k| k.silence_s)
            .collect();
        if !at_expiry.is_empty() {
            let m = median(&mut at_expiry);
            let mut dev: Vec<f64> = at_expiry.iter().map(|s| (s - m).abs()).collect();
            return Some(Estimate::Point {
                seconds: m,
                spread_seconds: median(&mut dev),
                samples: at_expiry.len(),
            });
        }
        let silent: Vec<f64> = self
            .kills
            .iter()
            .filter(|k| !k.ending.kills_at_expiry())
            .map(|k| k.silence_s)
            .collect();
        // The timeout is below every killed silence: the shortest bounds it.
        let high = silent.iter().copied().fold(f64::INFINITY, f64::min);
        if !high.is_finite() {
            return None;
        }
        // Survivals above the shortest kill contradict it (jitter, another
        // middlebox); keep the bracket honest by ignoring them.
        let low = if self.longest_survived_s < high {
            self.longest_survived_s
        } else {
            0.0
        };
        // Sounded: probes, not the devices alone, closed it (one of its
        // ends is a probe's silence).
        let bounds = |p: &Probe| {
            let end = if p.survived { low } else { high };
            (p.silence_seconds - end).abs() < 1e-9
        };
        if low > 0.0 && high - low < SOUNDED_WIDTH && self.probes.iter().any(bounds) {
            let skip = self.probes.len().saturating_sub(PROBES_SHOWN);
            return Some(Estimate::Sounded {
                seconds: (low + high) / 2.0,
                low_seconds: low,
                high_seconds: high,
                probes: self
                    .probes
                    .iter()
                    .skip(skip)
                    .map(|p| ProbeOutcome {
                        silence_seconds: p.silence_seconds,
                        survived: p.survived,
                    })
                    .collect(),
            });
        }
        Some(Estimate::Bracket {
            low_seconds: low,
            high_seconds: high,
            samples: silent.len(),
        })
    }

    /// The shortest silence before a kill of any kind (recent kills).
    pub fn shortest_kill_silence(&self) -> Option<f64> {
        self.kills.iter().map(|k| k.silence_s).reduce(f64::min)
    }

    /// Silences before kills, binned for a text histogram: (upper bound s, count).
    pub fn kill_histogram(&self, bins: usize) -> Vec<(f64, usize)> {
        let max = self.kills.iter().map(|k| k.silence_s).fold(0.0, f64::max);
        if self.kills.is_empty() || bins == 0 {
            return Vec::new();
        }
        let width = (max / bins as f64).max(1e-9);
        let mut counts = vec![0usize; bins];
        for k in &self.kills {
            let i = ((k.silence_s / width).ceil() as usize).clamp(1, bins) - 1;
            counts[i] += 1;
        }
        counts
            .into_iter()
            .enumerate()
            .map(|(i, c)| ((i + 1) as f64 * width, c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_key_masks_the_client_prefix() {
        let a: IpAddr = "198.51.100.77".parse().unwrap();
        let b: IpAddr = "198.51.100.3".parse().unwrap();
        assert_eq!(PathKey::new(a, 443, 24, 56), PathKey::new(b, 443, 24, 56));
        assert_ne!(PathKey::new(a, 443, 24, 56), PathKey::new(a, 8443, 24, 56));
        assert_eq!(
            PathKey::new(a, 443, 24, 56).to_string(),
            "198.51.100.0/24:443"
        );
        assert_eq!(
            PathKey::new(a, 443, 20, 56).to_string(),
            "198.51.96.0/20:443"
        );
        let v6: IpAddr = "2001:db8:aa:bbcc::1".parse().unwrap();
        assert_eq!(
            PathKey::new(v6, 443, 24, 56).to_string(),
            "[2001:db8:aa:bb00::/56]:443"
        );
    }

    #[test]
    fn an_upstream_leg_is_its_servers_own_path_apart_from_a_client_prefix() {
        let exchange: IpAddr = "192.0.2.1".parse().unwrap();
        let up = PathKey::upstream(exchange, 443);
        assert_eq!(up.to_string(), "upstream:192.0.2.1/32:443");
        assert_ne!(up, PathKey::new(exchange, 443, 32, 128));
        assert_eq!("upstream:192.0.2.1/32:443".parse::<PathKey>(), Ok(up));
        let v6: IpAddr = "2001:db8:ffff::1".parse().unwrap();
        let up6 = PathKey::upstream(v6, 443);
        assert_eq!(up6.to_string(), "upstream:[2001:db8:ffff::1/128]:443");
        assert_eq!(up6.to_string().parse::<PathKey>(), Ok(up6));
    }

    fn kill(silence_s: f64, ending: Ending) -> Kill {
        Kill {
            silence_s,
            ending,
            at_ns: 0,
        }
    }

    #[test]
    fn kills_at_expiry_give_a_median_point_estimate_robust_to_an_outlier() {
        let mut p = PathStats::default();
        for s in [20.02, 20.05, 19.98, 20.01, 35.0] {
            p.record_kill(kill(s, Ending::InjectedReset));
        }
        match p.estimate().unwrap() {
            Estimate::Point {
                seconds, samples, ..
            } => {
                assert!((seconds - 20.02).abs() < 1e-9);
                assert_eq!(samples, 5);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(p.estimate().unwrap().confidence(), Confidence::High);
    }

    #[test]
    fn silent_kills_give_a_bracket_from_longest_survived_to_shortest_killed() {
        let mut p = PathStats::default();
        p.record_survival(15.0);
        p.record_survival(18.0);
        p.record_kill(kill(25.0, Ending::ResetOnNextPacket));
        p.record_kill(kill(22.0, Ending::BlackHole));
        assert_eq!(
            p.estimate(),
            Some(Estimate::Bracket {
                low_seconds: 18.0,
                high_seconds: 22.0,
                samples: 2
            })
        );
    }

    #[test]
    fn a_wide_bracket_is_low_confidence_and_a_narrow_one_high() {
        let b = |low_seconds, high_seconds| Estimate::Bracket {
            low_seconds,
            high_seconds,
            samples: 4,
        };
        assert_eq!(b(19.0, 23.0).confidence(), Confidence::High);
        assert_eq!(b(19.1, 40.0).confidence(), Confidence::Low);
        assert_eq!(b(0.0, 23.0).confidence(), Confidence::Low);
    }

    #[test]
    fn a_bracket_the_devices_closed_is_no_sounded_point() {
        let mut p = PathStats::default();
        p.record_survival(19.5);
        p.record_kill(kill(21.0, Ending::BlackHole));
        // A probe elsewhere on the path bounds nothing here.
        let client = "198.51.100.7:40000".parse().unwrap();
        let probe = |silence_seconds, survived| Probe {
            silence_seconds,
            survived,
            at_ns: 0,
            client,
        };
        p.record_probe(probe(30.0, false));
        assert!(matches!(p.estimate(), Some(Estimate::Bracket { .. })));
        // One that ends it does.
        p.record_probe(probe(19.5, true));
        assert!(matches!(p.estimate(), Some(Estimate::Sounded { .. })));
    }

    #[test]
    fn no_kills_no_estimate() {
        let mut p = PathStats::default();
        p.record_survival(100.0);
        assert_eq!(p.estimate(), None);
    }

    #[test]
    fn kills_kept_are_bounded() {
        let mut p = PathStats::default();
        for i in 0..(KILLS_KEPT + 10) {
            p.record_kill(kill(i as f64, Ending::InjectedReset));
        }
        assert_eq!(p.kills.len(), KILLS_KEPT);
        assert_eq!(p.kills.front().unwrap().silence_s, 10.0);
    }
}
