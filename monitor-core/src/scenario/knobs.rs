//! What a scenario is made of, every knob drawn from one seed: the time
//! scale, the paths (their middlebox, network and devices) and the mail.

use std::fmt;

/// How a device chooses its heartbeat (DOMAIN.md, "How clients choose").
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Profile {
    /// Windows Mobile: raise by `step` after each answered Ping; after a
    /// failure go back to the last good value.
    IncrementRevert {
        start: f64,
        step: f64,
        max: f64,
    },
    /// AOSP Exchange: 470 s start, +180 s, 290..1010 s; after a failure
    /// lower by a step and never raise again (for the session).
    Android,
    /// iOS-like: a long fixed heartbeat of its own choosing.
    IosLong(f64),
    Fixed(f64),
}

impl Profile {
    pub fn label(&self) -> &'static str {
        match self {
            Profile::IncrementRevert { .. } => "wm",
            Profile::Android => "android",
            Profile::IosLong(_) => "ios",
            Profile::Fixed(_) => "fixed",
        }
    }
}

/// How a device leaves, if it does before the capture ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Departure {
    Stays,
    /// Closes its connection with a FIN at this time (seconds from the start).
    Fin(f64),
    /// Goes dark (battery, coverage) at this time: nothing more is heard.
    Silent(f64),
}

/// A client stack's IPv4 ID pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpIdPattern {
    PerConnection,
    Global,
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceKnobs {
    pub profile: Profile,
    pub departure: Departure,
    /// Initial TTL of the device's stack (64 or 128).
    pub initial_ttl: u8,
    pub ip_id: IpIdPattern,
    pub window: u16,
    /// How long after its heartbeat the device gives up on an unanswered Ping.
    pub grace_s: f64,
}

/// Where a resetting box sits, as its RST's TTL shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Near the server: its TTL is far from the client's.
    NearServer,
    /// Near the client: its TTL within the tolerance of the client's.
    NearClient,
}

/// What a middlebox does when its idle timer expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manner {
    ResetAtExpiry(Place),
    ResetOnNextPacket(Place),
    BlackHole,
    /// A full proxy closing idle connections with a FIN; `client_side`:
    /// the proxy sits at the clients' site, else in front of the server.
    ProxyTimeout {
        client_side: bool,
    },
}

impl Manner {
    pub fn label(&self) -> &'static str {
        match self {
            Manner::ResetAtExpiry(Place::NearServer) => "rst-expiry-far-ttl",
            Manner::ResetAtExpiry(Place::NearClient) => "rst-expiry-near-ttl",
            Manner::ResetOnNextPacket(Place::NearServer) => "rst-next-far-ttl",
            Manner::ResetOnNextPacket(Place::NearClient) => "rst-next-near-ttl",
            Manner::BlackHole => "black-hole",
            Manner::ProxyTimeout { client_side: true } => "proxy-client-side",
            Manner::ProxyTimeout { client_side: false } => "proxy-server-side",
        }
    }

    /// The box acts when its timer expires (its kills' silences are T).
    pub fn at_expiry(&self) -> bool {
        matches!(self, Manner::ResetAtExpiry(_) | Manner::ProxyTimeout { .. })
    }
}

/// One middlebox: its manner and idle timeout (seconds, already scaled).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Middlebox {
    pub manner: Manner,
    pub timeout_s: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PathKnobs {
    /// Index in the scenario: the path's own client prefix.
    pub index: u8,
    pub v6: bool,
    /// The boxes on the path (none, one, or two in series: the shorter wins).
    pub boxes: Vec<Middlebox>,
    /// A NAT: every device behind one public address, a new port each connection.
    pub nat: bool,
    pub rtt_s: f64,
    /// Each exchange's RTT varies by up to this (seconds).
    pub jitter_s: f64,
    /// Chance each Ping's request, answer or ACK is lost once.
    pub loss: f64,
    pub hops: u8,
    pub devices: Vec<DeviceKnobs>,
}

impl PathKnobs {
    /// The box that kills first (in series, the shorter timeout wins).
    pub fn killer(&self) -> Option<Middlebox> {
        self.boxes
            .iter()
            .copied()
            .min_by(|a, b| a.timeout_s.total_cmp(&b.timeout_s))
    }

    pub fn proxy(&self) -> Option<bool> {
        match self.killer()?.manner {
            Manner::ProxyTimeout { client_side } => Some(client_side),
            _ => None,
        }
    }

    /// A short description for tables: "black-hole T=312s nat v6 rtt=40ms".
    pub fn describe(&self) -> String {
        let mut s = match self.boxes.as_slice() {
            [] => "none".to_string(),
            [b] => format!("{} T={:.0}s", b.manner.label(), b.timeout_s),
            bs => bs
                .iter()
                .map(|b| format!("{} T={:.0}s", b.manner.label(), b.timeout_s))
                .collect::<Vec<_>>()
                .join(" + "),
        };
        if self.nat {
            s.push_str(" nat");
        }
        if self.v6 {
            s.push_str(" v6");
        }
        let profiles: Vec<&str> = self.devices.iter().map(|d| d.profile.label()).collect();
        s.push_str(&format!(
            " rtt={:.0}ms loss={:.1}% hops={} devices={}",
            self.rtt_s * 1e3,
            self.loss * 100.0,
            self.hops,
            profiles.join(",")
        ));
        s
    }
}

/// The whole scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Knobs {
    pub seed: u64,
    /// Every time of the scenario (heartbeats, timeouts, grace, duration)
    /// is multiplied by this; the detector's settings are scaled alike.
    pub scale: f64,
    pub duration_s: f64,
    /// New mail per device per hour (scaled time): Poisson.
    pub mail_per_hour: f64,
    pub paths: Vec<PathKnobs>,
}

impl fmt::Display for Knobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scale {} duration {:.0}s mail {:.1}/h",
            self.scale, self.duration_s, self.mail_per_hour
        )
    }
}

/// Log-uniform in [lo, hi]: timeouts and heartbeats spread over decades.
fn log_uniform(rng: &mut fastrand::Rng, lo: f64, hi: f64) -> f64 {
    (lo.ln() + rng.f64() * (hi.ln() - lo.ln())).exp()
}

/// A whole number of seconds (devices and boxes are configured so).
fn whole(x: f64) -> f64 {
    x.round().max(1.0)
}

impl Knobs {
    /// Draw every knob from `seed`.
    pub fn draw(seed: u64) -> Knobs {
        let mut rng = fastrand::Rng::with_seed(seed);
        let scale = if rng.u8(0..10) < 3 { 0.1 } else { 1.0 };
        let duration_s = whole(rng.f64().mul_add(3.0 * 3600.0, 3.0 * 3600.0) * scale);
        let mail_per_hour = [0.0, 0.5, 2.0, 6.0][rng.usize(0..4)];
        let n_paths = rng.u8(2..=5);
        let paths = (0..n_paths)
            .map(|i| draw_path(&mut rng, i + 1, scale, duration_s))
            .collect();
        Knobs {
            seed,
            scale,
            duration_s,
            mail_per_hour,
            paths,
        }
    }
}

fn draw_box(rng: &mut fastrand::Rng, scale: f64) -> Middlebox {
    let place = |rng: &mut fastrand::Rng| {
        if rng.bool() {
            Place::NearServer
        } else {
            Place::NearClient
        }
    };
    let manner = match rng.u8(0..5) {
        0 => Manner::ResetAtExpiry(place(rng)),
        1 => Manner::ResetOnNextPacket(place(rng)),
        2 => Manner::BlackHole,
        3 => Manner::ProxyTimeout {
            client_side: rng.bool(),
        },
        _ => Manner::BlackHole,
    };
    Middlebox {
        manner,
        timeout_s: whole(log_uniform(rng, 60.0, 3600.0) * scale),
    }
}

fn draw_boxes(rng: &mut fastrand::Rng, scale: f64) -> Vec<Middlebox> {
    match rng.u8(0..10) {
        0..=2 => Vec::new(),
        3 => {
            // Two in series; the longer one forgets silently (its manner
            // never shows: the shorter wins).
            let first = draw_box(rng, scale);
            let second = Middlebox {
                manner: Manner::BlackHole,
                timeout_s: whole(first.timeout_s * (1.2 + rng.f64())),
            };
            vec![first, second]
        }
        _ => vec![draw_box(rng, scale)],
    }
}

fn draw_path(rng: &mut fastrand::Rng, index: u8, scale: f64, duration_s: f64) -> PathKnobs {
    let boxes = draw_boxes(rng, scale);
    let proxy = boxes
        .iter()
        .any(|b| matches!(b.manner, Manner::ProxyTimeout { .. }));
    let rtt_s = log_uniform(rng, 0.005, 0.8);
    let n_devices = rng.usize(3..=8);
    let devices = (0..n_devices)
        .map(|_| draw_device(rng, scale, duration_s))
        .collect();
    PathKnobs {
        index,
        v6: rng.u8(0..4) == 0,
        boxes,
        nat: !proxy && rng.u8(0..5) == 0,
        rtt_s,
        jitter_s: rtt_s * 0.2 * rng.f64(),
        loss: [0.0, 0.0, 0.005, 0.02][rng.usize(0..4)],
        hops: rng.u8(2..=25),
        devices,
    }
}

fn draw_profile(rng: &mut fastrand::Rng, scale: f64) -> Profile {
    match rng.u8(0..4) {
        0 => {
            let start = whole(rng.f64().mul_add(240.0, 60.0) * scale);
            let step = whole(rng.f64().mul_add(240.0, 60.0) * scale);
            Profile::IncrementRevert {
                start,
                step,
                max: whole(log_uniform(rng, 900.0, 3540.0) * scale),
            }
        }
        1 => Profile::Android,
        2 => Profile::IosLong(whole(1680.0 * scale)),
        _ => Profile::Fixed(whole(log_uniform(rng, 60.0, 3540.0) * scale)),
    }
}

fn draw_device(rng: &mut fastrand::Rng, scale: f64, duration_s: f64) -> DeviceKnobs {
    let departure = match rng.u8(0..20) {
        0 | 1 => Departure::Fin(duration_s * rng.f64()),
        2 => Departure::Silent(duration_s * rng.f64()),
        _ => Departure::Stays,
    };
    DeviceKnobs {
        profile: draw_profile(rng, scale),
        departure,
        initial_ttl: if rng.bool() { 64 } else { 128 },
        ip_id: [
            IpIdPattern::PerConnection,
            IpIdPattern::Global,
            IpIdPattern::Random,
        ][rng.usize(0..3)],
        window: [65535, 64240, 29200, 502, 4096][rng.usize(0..5)],
        grace_s: whole(rng.f64().mul_add(50.0, 10.0) * scale),
    }
}
