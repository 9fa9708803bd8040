//! The simulation: each path's devices, Ping after Ping, through the path's
//! middlebox, in virtual time; every packet the server would capture, and
//! the truth of what happened, logged as it happens.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use monitor_common::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};

use super::{
    device::Heartbeat,
    knobs::{Departure, DeviceKnobs, Knobs, Manner, Middlebox, PathKnobs, Place},
    truth::{survived_silences, ConnTruth, PathTruth, Truth},
    wire::{Conn, IpIds, Pkt, MS, S},
};
use crate::detector::{Ending, PathKey};

/// Bounds on every loop: no device runs more connections or Pings than this.
const MAX_CONNECTIONS: usize = 5_000;
const MAX_PINGS: usize = 20_000;
/// Linux gives up on an unanswered segment after about 15 retransmissions.
const MAX_RETRIES: u32 = 15;
const MAX_RTO_NS: u64 = 120 * S;

/// A generated scenario: its packets (time order) and its truth.
pub struct Generated {
    pub packets: Vec<Pkt>,
    pub truth: Truth,
}

pub fn server_addr(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
    }
}

/// Each path its own client prefix: 100.64.P.0/24 or 2001:db8:P::/56.
fn client_addr(path: u8, host: u8, v6: bool) -> IpAddr {
    if v6 {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        b[5] = path;
        b[15] = host;
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        IpAddr::V4(Ipv4Addr::new(100, 64, path, host))
    }
}

fn ns(seconds: f64) -> u64 {
    (seconds.max(0.0) * S as f64) as u64
}

fn secs(ns: u64) -> f64 {
    ns as f64 / S as f64
}

/// Generate a scenario; silences shorter than `min_silence_s` are not logged
/// as survived (the detector never sees them as silences).
pub fn generate(k: &Knobs, min_silence_s: f64) -> Generated {
    let mut packets = Vec::new();
    let mut truth = Truth::default();
    let mut next_conn = 0;
    for (i, path) in k.paths.iter().enumerate() {
        let mut sim = PathSim::new(k, path, i, next_conn, min_silence_s);
        sim.run(&mut packets, &mut truth.conns);
        super::truth::mark_evident(&mut truth.conns);
        next_conn = sim.next_conn;
        truth.paths.push(sim.path_truth(&truth.conns));
    }
    packets.sort_by_key(|p| p.at);
    Generated { packets, truth }
}

struct Device {
    index: usize,
    k: DeviceKnobs,
    hb: Heartbeat,
    /// As the server sees it.
    addr: IpAddr,
    ttl: u8,
    window: u16,
    ids: Option<IpIds>,
    port: u16,
    next_mail: u64,
    /// Heartbeats answered in full (no mail) so far.
    shown: Vec<f64>,
}

/// How one Ping went.
enum Step {
    /// The client's next request arrives at this time.
    Next(u64),
    End(End),
}

struct End {
    class: Option<Ending>,
    at: u64,
    kill_silence_s: Option<f64>,
    /// When the device opens its next connection (None: it does not).
    next: Option<u64>,
}

impl End {
    fn open(at: u64) -> End {
        End {
            class: None,
            at,
            kill_silence_s: None,
            next: None,
        }
    }
}

struct PathSim<'a> {
    k: &'a PathKnobs,
    index: usize,
    scale: f64,
    end_ns: u64,
    mail_mean_ns: Option<f64>,
    min_silence_s: f64,
    rng: fastrand::Rng,
    next_conn: usize,
    nat_port: u16,
    survived: Vec<f64>,
}

impl<'a> PathSim<'a> {
    fn new(k: &'a Knobs, p: &'a PathKnobs, index: usize, next_conn: usize, min: f64) -> Self {
        let mut rng = fastrand::Rng::with_seed(
            k.seed
                .wrapping_mul(0x9e37_79b9)
                .wrapping_add(p.index.into()),
        );
        PathSim {
            k: p,
            index,
            scale: k.scale,
            end_ns: ns(k.duration_s),
            mail_mean_ns: (k.mail_per_hour > 0.0)
                .then(|| 3600.0 * k.scale / k.mail_per_hour * S as f64),
            min_silence_s: min,
            nat_port: rng.u16(1024..30_000),
            rng,
            next_conn,
            survived: Vec::new(),
        }
    }

    fn run(&mut self, out: &mut Vec<Pkt>, conns: &mut Vec<ConnTruth>) {
        let devices: Vec<DeviceKnobs> = self.k.devices.clone();
        for (i, d) in devices.iter().enumerate() {
            let mut dev = self.device(i, d);
            self.run_device(&mut dev, out, conns);
        }
    }

    fn device(&mut self, index: usize, d: &DeviceKnobs) -> Device {
        let shared = self.k.nat || self.k.proxy().is_some();
        let host = if shared { 1 } else { 10 + index as u8 };
        let (ttl, window, pattern) = match self.k.proxy() {
            Some(true) => (
                64 - self.k.hops,
                65_535,
                super::knobs::IpIdPattern::PerConnection,
            ),
            Some(false) => (63, 65_535, super::knobs::IpIdPattern::PerConnection),
            None => (d.initial_ttl - self.k.hops, d.window, d.ip_id),
        };
        let first = self.rng.u64(..ns(60.0 * self.scale).max(1));
        let mut dev = Device {
            index,
            k: *d,
            hb: Heartbeat::new(d.profile, self.scale),
            addr: client_addr(self.k.index, host, self.k.v6),
            ttl,
            window,
            ids: Some(IpIds::new(pattern, &mut self.rng)),
            port: self.rng.u16(32_768..60_000),
            next_mail: 0,
            shown: Vec::new(),
        };
        dev.next_mail = self.mail_after(first);
        dev
    }

    fn mail_after(&mut self, t: u64) -> u64 {
        match self.mail_mean_ns {
            Some(mean) => t + (-(1.0 - self.rng.f64()).ln() * mean) as u64,
            None => u64::MAX,
        }
    }

    fn run_device(&mut self, dev: &mut Device, out: &mut Vec<Pkt>, conns: &mut Vec<ConnTruth>) {
        let mut t = self.rng.u64(..ns(60.0 * self.scale).max(1));
        for _ in 0..MAX_CONNECTIONS {
            if t >= self.end_ns {
                return;
            }
            let first = out.len();
            let mut conn = self.open(dev, t);
            let opened = t;
            let end = self.run_connection(dev, &mut conn, out, t);
            dev.ids = Some(conn.ids.clone());
            let mut mine: Vec<Pkt> = out[first..].to_vec();
            mine.sort_by_key(|p| p.at);
            self.survived
                .extend(survived_silences(&mine, self.min_silence_s));
            let h = dev.hb.current();
            conns.push(ConnTruth {
                id: conn.id,
                path: self.index,
                device: dev.index,
                client: conn.client,
                opened_ns: opened,
                ended_ns: end.at,
                class: end.class,
                heartbeat_s: h,
                heartbeat_shown: dev.shown.contains(&h),
                kill_silence_s: end.kill_silence_s,
                evident: true,
            });
            match end.next {
                Some(n) => t = n,
                None => return,
            }
        }
    }

    /// A new connection from the device: its port (the NAT's, or its own).
    fn open(&mut self, dev: &mut Device, _t: u64) -> Conn {
        let port = if self.k.nat || self.k.proxy().is_some() {
            self.nat_port = self.nat_port.wrapping_add(1).max(1024);
            self.nat_port
        } else {
            dev.port = if dev.port >= 60_999 {
                32_768
            } else {
                dev.port + 1
            };
            dev.port
        };
        let mut ids = dev
            .ids
            .take()
            .unwrap_or_else(|| IpIds::new(dev.k.ip_id, &mut self.rng));
        ids.connection(&mut self.rng);
        let id = self.next_conn;
        self.next_conn += 1;
        Conn::new(
            id,
            SocketAddr::new(dev.addr, port),
            dev.ttl,
            dev.window,
            ids,
            &mut self.rng,
        )
    }

    fn run_connection(
        &mut self,
        dev: &mut Device,
        c: &mut Conn,
        out: &mut Vec<Pkt>,
        t: u64,
    ) -> End {
        let mut t = self.handshake(c, out, t);
        for _ in 0..MAX_PINGS {
            if t >= self.end_ns {
                return End::open(t);
            }
            match self.ping(dev, c, out, t) {
                Step::Next(n) => t = n,
                Step::End(e) => return e,
            }
        }
        End::open(t)
    }

    fn rtt(&mut self) -> u64 {
        ns(self.k.rtt_s + self.k.jitter_s * self.rng.f64())
    }

    /// Linux: RTO = max(200 ms, srtt + 4 rttvar).
    fn rto(&self) -> u64 {
        let rttvar = self.k.jitter_s.max(self.k.rtt_s / 4.0);
        ns((self.k.rtt_s + 4.0 * rttvar).max(0.2))
    }

    fn lost(&mut self) -> bool {
        self.rng.f64() < self.k.loss
    }

    /// TCP and TLS handshakes; when the first Ping arrives.
    fn handshake(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, t: u64) -> u64 {
        let rtt = self.rtt();
        let rng = &mut self.rng;
        c.client_sends(out, rng, t, TCP_SYN, 0);
        c.server_sends(out, t + MS / 5, TCP_SYN | TCP_ACK, 0);
        c.client_sends(out, rng, t + rtt, TCP_ACK, 0);
        c.client_sends(out, rng, t + rtt + MS, TCP_PSH | TCP_ACK, 517);
        c.server_sends(out, t + rtt + 3 * MS, TCP_PSH | TCP_ACK, 1400);
        c.client_sends(out, rng, t + 2 * rtt + 3 * MS, TCP_PSH | TCP_ACK, 80);
        c.server_sends(out, t + 2 * rtt + 4 * MS, TCP_PSH | TCP_ACK, 250);
        t + 3 * rtt + 10 * MS
    }

    /// One Ping arriving at `t`: held, answered (early for mail), killed,
    /// or left unanswered by a device that went away.
    fn ping(&mut self, dev: &mut Device, c: &mut Conn, out: &mut Vec<Pkt>, t: u64) -> Step {
        let r = if self.lost() { t + self.rto() } else { t };
        let len = self.rng.u16(300..=600);
        c.client_sends(out, &mut self.rng, r, TCP_PSH | TCP_ACK, len);
        let ack_at = r + self.rng.u64(1..=40) * MS;
        c.server_sends(out, ack_at, TCP_ACK, 0);
        let h = dev.hb.current();
        let full_at = r + ns(h) + self.rng.u64(1..=30) * MS;
        let early = dev.next_mail < full_at;
        let answer_at = if early {
            dev.next_mail.max(r + 50 * MS)
        } else {
            full_at
        };
        if let Departure::Silent(d) = dev.k.departure {
            if ns(d) < answer_at {
                return Step::End(self.vanish(c, out, ack_at, answer_at));
            }
        }
        if let Some(b) = self.k.killer() {
            if secs(answer_at - ack_at) > b.timeout_s {
                let mut e = self.kill(b, c, out, ack_at, answer_at);
                dev.hb.failed();
                e.next = e.next.or(Some(r + ns(h + dev.k.grace_s)));
                return Step::End(e);
            }
        }
        if early {
            dev.next_mail = self.mail_after(answer_at);
        }
        let next = self.answer(c, out, answer_at);
        dev.hb.answered();
        if !early && !dev.shown.contains(&h) {
            dev.shown.push(h);
        }
        if let Departure::Fin(d) = dev.k.departure {
            if ns(d) <= next {
                return Step::End(self.client_fin(c, out, next));
            }
        }
        Step::Next(if early { self.sync(c, out, next) } else { next })
    }

    /// The server's answer, retransmitted once if it (or the ACK) was lost;
    /// when the client's next request, carrying its ACK, arrives.
    fn answer(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, at: u64) -> u64 {
        let len = self.rng.u16(100..=400);
        let seq = c.server_sends(out, at, TCP_PSH | TCP_ACK, len);
        let rtt = self.rtt();
        if self.lost() {
            let again = at + self.rto();
            c.server_resends(out, again, TCP_PSH | TCP_ACK, len, seq);
            return again + rtt;
        }
        at + rtt + self.rng.u64(1..=20) * MS
    }

    /// After new mail: a Sync exchange, then the next Ping.
    fn sync(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, t: u64) -> u64 {
        let len = self.rng.u16(200..=500);
        c.client_sends(out, &mut self.rng, t, TCP_PSH | TCP_ACK, len);
        let work = self.rng.u64(50..=300) * MS;
        let len = self.rng.u16(500..=1400);
        c.server_sends(out, t + work, TCP_PSH | TCP_ACK, len);
        t + work + self.rtt() + 5 * MS
    }

    /// The device leaves after an answer: FIN, the server's FIN, the last ACK.
    fn client_fin(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, at: u64) -> End {
        c.client_sends(out, &mut self.rng, at, TCP_FIN | TCP_ACK, 0);
        c.server_sends(out, at + MS, TCP_FIN | TCP_ACK, 0);
        let rtt = self.rtt();
        c.client_sends(out, &mut self.rng, at + MS + rtt, TCP_ACK, 0);
        End {
            class: Some(Ending::ClientFin),
            at,
            kill_silence_s: None,
            next: None,
        }
    }

    /// One-way delay from the box to the server.
    fn box_delay(&self, place: Place) -> u64 {
        match place {
            Place::NearServer => MS / 2,
            Place::NearClient => ns(self.k.rtt_s / 2.0).max(MS),
        }
    }

    /// The TTL of the box's RSTs at the server: off the client's by more
    /// than the tolerance near the server, within it near the client.
    fn box_ttl(&mut self, place: Place, client_ttl: u8) -> u8 {
        match place {
            Place::NearClient => client_ttl.saturating_add(self.rng.u8(0..=2)),
            Place::NearServer => {
                let mut c = [254u8, 63, 127];
                self.rng.shuffle(&mut c);
                let far = c.into_iter().find(|t| t.abs_diff(client_ttl) > 4);
                far.unwrap_or(254)
            }
        }
    }

    /// A forged RST in the client's name, IP ID 0 or random, RST or RST|ACK:
    /// from a box that tracks the connection (window 0, the client's next
    /// number), or from an injector that does not (the client's window
    /// copied, a spray of numbers: [`Conn::middlebox_sprays`]).
    fn forge_rst(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, at: u64, place: Place) {
        let ttl = self.box_ttl(place, c.ttl);
        let flags = if self.rng.bool() {
            TCP_RST
        } else {
            TCP_RST | TCP_ACK
        };
        let ip_id = if self.rng.bool() { 0 } else { self.rng.u16(..) };
        // Which forger, from the IP ID already drawn: no new draw, so the
        // rest of the scenario's random stream stays as it was.
        match ip_id % 4 {
            0 | 2 => c.middlebox_sends(out, at, flags, ttl, ip_id, 0),
            exact_first => c.middlebox_sprays(out, at, flags, ttl, ip_id, exact_first == 1),
        }
    }

    /// The box acts on a silence longer than its timeout.
    fn kill(
        &mut self,
        b: Middlebox,
        c: &mut Conn,
        out: &mut Vec<Pkt>,
        ack_at: u64,
        answer_at: u64,
    ) -> End {
        let timeout = ns(b.timeout_s);
        let (class, at) = match b.manner {
            Manner::ResetAtExpiry(place) => {
                let at = ack_at + timeout + 2 * self.box_delay(place);
                self.forge_rst(c, out, at, place);
                (Ending::InjectedReset, at)
            }
            Manner::ProxyTimeout { client_side } => {
                let d = if client_side {
                    self.box_delay(Place::NearClient)
                } else {
                    MS / 2
                };
                let at = ack_at + timeout + 2 * d;
                self.proxy_close(c, out, at, d);
                (Ending::ProxyTimeout, at)
            }
            Manner::ResetOnNextPacket(place) => {
                let len = self.rng.u16(100..=400);
                c.server_sends(out, answer_at, TCP_PSH | TCP_ACK, len);
                let rst = answer_at + 2 * self.box_delay(place);
                self.forge_rst(c, out, rst, place);
                (Ending::ResetOnNextPacket, answer_at)
            }
            Manner::BlackHole => {
                self.unanswered(c, out, answer_at);
                (Ending::BlackHole, answer_at)
            }
        };
        // Boxes acting at expiry tell the device at once: it reconnects soon.
        let next = b
            .manner
            .at_expiry()
            .then(|| at + self.rng.u64(200..=3000) * MS);
        End {
            class: Some(class),
            at,
            kill_silence_s: Some(secs(at - ack_at)),
            next,
        }
    }

    /// A full proxy closes the idle connection: its FIN, the server's, its ACK.
    fn proxy_close(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, at: u64, d: u64) {
        c.client_sends(out, &mut self.rng, at, TCP_FIN | TCP_ACK, 0);
        c.server_sends(out, at + MS, TCP_FIN | TCP_ACK, 0);
        c.client_sends(out, &mut self.rng, at + MS + 2 * d, TCP_ACK, 0);
    }

    /// The server's answer, never acknowledged: Linux's retransmissions with
    /// exponential backoff, then it gives up without a word.
    fn unanswered(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, at: u64) {
        let len = self.rng.u16(100..=400);
        let seq = c.server_sends(out, at, TCP_PSH | TCP_ACK, len);
        let mut rto = self.rto();
        let mut t = at;
        for _ in 0..MAX_RETRIES {
            t += rto;
            c.server_resends(out, t, TCP_PSH | TCP_ACK, len, seq);
            rto = (rto * 2).min(MAX_RTO_NS);
        }
    }

    /// The device went dark during this hold. A box may still act on the
    /// silence; else the answer goes unacknowledged (a proxy acknowledges
    /// it, and closes the idle connection at its timeout).
    fn vanish(&mut self, c: &mut Conn, out: &mut Vec<Pkt>, ack_at: u64, answer_at: u64) -> End {
        let killer = self.k.killer();
        if let Some(b) = killer.filter(|b| secs(answer_at - ack_at) > b.timeout_s) {
            let mut e = self.kill(b, c, out, ack_at, answer_at);
            e.next = None;
            return e;
        }
        if let Some(b) = killer.filter(|b| matches!(b.manner, Manner::ProxyTimeout { .. })) {
            let len = self.rng.u16(100..=400);
            c.server_sends(out, answer_at, TCP_PSH | TCP_ACK, len);
            let rtt = self.rtt();
            c.client_sends(out, &mut self.rng, answer_at + rtt, TCP_ACK, 0);
            let at = answer_at + rtt + ns(b.timeout_s);
            self.proxy_close(c, out, at, rtt / 2);
            let class = Some(Ending::ClientFin);
            return End {
                class,
                at,
                kill_silence_s: None,
                next: None,
            };
        }
        self.unanswered(c, out, answer_at);
        End {
            class: Some(Ending::Vanished),
            at: answer_at,
            kill_silence_s: None,
            next: None,
        }
    }

    fn path_truth(&self, conns: &[ConnTruth]) -> PathTruth {
        let mine = || conns.iter().filter(|c| c.path == self.index);
        let killer = self.k.killer();
        // Kills the capture shows: not a black hole whose device never came back.
        let kills: Vec<f64> = mine()
            .filter(|c| c.evident)
            .filter_map(|c| c.kill_silence_s)
            .collect();
        let addr = client_addr(self.k.index, 1, self.k.v6);
        let mut heartbeats = Vec::new();
        for d in 0..self.k.devices.len() {
            if let Some(c) = mine().rfind(|c| c.device == d) {
                heartbeats.push(c.heartbeat_s);
            }
        }
        PathTruth {
            key: PathKey::new(addr, super::wire::SERVER_PORT, 24, 56).to_string(),
            knobs: self.k.describe(),
            manner: killer.map(|b| manner_ending(b.manner)),
            timeout_s: killer.map(|b| b.timeout_s),
            longest_survived_s: self.survived.iter().copied().fold(0.0, f64::max),
            shortest_killed_s: kills.iter().copied().reduce(f64::min),
            kills: kills.len(),
            heartbeats,
            shared_address: self.k.nat || self.k.proxy().is_some(),
        }
    }
}

/// The detector's name for what a box does.
pub fn manner_ending(m: Manner) -> Ending {
    match m {
        Manner::ResetAtExpiry(_) => Ending::InjectedReset,
        Manner::ResetOnNextPacket(_) => Ending::ResetOnNextPacket,
        Manner::BlackHole => Ending::BlackHole,
        Manner::ProxyTimeout { .. } => Ending::ProxyTimeout,
    }
}
