//! From kernel events to "this path kills connections after T seconds".
//! Pure logic, no I/O: the agent feeds it live events, offline analysis feeds
//! it events from a capture, tests feed it scripted events.

mod close;
pub mod config;
pub mod ending;
mod held;
pub mod keepalive;
pub mod middlebox;
pub mod path;
pub mod report;
mod tracks;
pub mod upstream;
pub mod window;

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
};

use monitor_common::{state, Dir, EventKind, FlowKey};

pub use config::{DetectorConfig, DetectorConfigError};
pub use ending::{BoxLocation, Ending, Evidence, HeartbeatSource, Signal, Verdict};
pub use path::{Estimate, PathKey, PathStats};
pub use window::{HbiAlert, HbiWindow};

use crate::{
    event::{client_of, server_of, FlowEvent},
    ping::{Heartbeat, PingRequest},
};
use close::{classify_close, is_premature, CloseFacts, ServerSend};
use path::{Kill, Probe};
use upstream::{Answer, GiveUp, Judged, Upstream};

const NS: f64 = 1e9;
/// Verdicts kept for `monitor events` and the report.
pub const RECENT_VERDICTS: usize = 1024;

/// What the detector concluded from one input.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// A flow ended; how, and why we think so.
    Verdict(Verdict),
    /// A hold time was measured: a heartbeat sample (seconds).
    HoldTime { path: PathKey, seconds: f64 },
    /// The 3033/1040-style window alert fired.
    Alert(HbiAlert),
    /// A client reconnected soon after one of its flows was killed.
    Churn { path: PathKey },
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Gap {
    silence_s: f64,
    dir: Dir,
    payload: bool,
    /// When the packet that ended it was seen (kernel clock ns).
    end_ns: u64,
    /// The server answered a request with it, after holding it this long
    /// (seconds): a heartbeat sample once the answer is proven delivered.
    hold_s: Option<f64>,
    /// The server owed the client an answer when it ended.
    owed: bool,
    /// Its payload could be a TLS alert (a close_notify): see [`TLS_ALERT_BYTES`].
    alert_sized: bool,
    /// The server's keepalive probe ended it: the client's answer, or the
    /// box's, is as telling as to data.
    probe: bool,
}

impl Gap {
    /// Survival is proven by the client: a silence survived when the client
    /// was heard after it (it ended the silence itself, or spoke after the
    /// server's send that did). A server send alone proves nothing: a
    /// middlebox that forgot the flow drops or resets what follows.
    fn proven_by(&self, ev: &FlowEvent) -> bool {
        self.dir == Dir::In || ev.dir == Dir::In || self.heard_after(ev)
    }

    /// The client was heard after the packet that ended this silence and
    /// before `ev` (which may be a box's RST, and proves nothing itself).
    fn heard_after(&self, ev: &FlowEvent) -> bool {
        ev.since_client().is_some_and(|since| {
            since.as_nanos() < u128::from(ev.raw.ts_ns.saturating_sub(self.end_ns))
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Suspect {
    since_ns: u64,
    silence_s: f64,
    /// When the device's own wait for that answer runs out at the latest:
    /// its request plus the heartbeat to cover. A device that got no
    /// answer reconnects by then, plus `black_hole_after`.
    gives_up_ns: u64,
    /// What went unanswered was a keepalive probe.
    probe: bool,
}

/// What the detector keeps of a followed flow, beside its key (whose
/// addresses are the client's and server's). Kept small: a million flows
/// are a million of these (issue 18); the rare parts are boxed.
#[derive(Clone, Debug)]
struct FlowTrack {
    path: PathKey,
    opened_ns: u64,
    /// The heartbeat the flow's latest Ping asked for (plaintext ports): exact.
    /// Whole seconds as a Ping states them: exact in an f32.
    ping_heartbeat_s: Option<f32>,
    /// The last idle gap, not yet known to have survived.
    pending_gap: Option<Gap>,
    /// An unanswered server retransmission after a silence.
    suspect: Option<Box<Suspect>>,
    /// Round-trip time measured at the handshake (SYN-ACK to the client's
    /// ACK), seconds: sizes the next-packet window.
    rtt_s: Option<f32>,
    /// A verdict was already given (black hole by timeout); ignore the rest.
    finalized: bool,
    /// An upstream leg: this host is the client (see [`upstream`]).
    upstream: bool,
    /// This host's proxy answered the device's request at its upstream
    /// timeout: when, and after how long a wait (see [`upstream`]).
    proxy_answered: Option<Box<(u64, f64)>>,
    /// The kernel lost an event of this flow (ring buffer full): what we
    /// know is incomplete, so its ending is not used for estimates.
    incomplete: bool,
}

// A million of these are followed at once (BENCHMARKS.md, section 3).
const _: () = assert!(std::mem::size_of::<Option<FlowTrack>>() == 112);

/// Heartbeat samples per client that its estimate is the maximum of: early
/// answers (new mail) come before the heartbeat, so the largest recent
/// sample is a no-change answer unless every one of them was early.
const CLIENT_SAMPLES: usize = 5;

/// Two answers this close (relative) are the same heartbeat: no-change
/// answers repeat the device's interval, early answers fall at random.
const SAME_HEARTBEAT: f64 = 0.02;

/// The silence `ev` ended, waiting for its proof; `hold_s`: the server
/// answered a request with it, after holding it this long; `probe`: a
/// keepalive probe ended it (the first, reported as unanswered so far).
fn gap_of(ev: &FlowEvent, hold_s: Option<f64>, probe: bool) -> Gap {
    Gap {
        silence_s: ev.silence().as_secs_f64(),
        dir: ev.dir,
        payload: ev.has_payload(),
        end_ns: ev.raw.ts_ns,
        hold_s,
        owed: ev.raw.last_payload_dir == Dir::In as u8,
        alert_sized: TLS_ALERT_BYTES.contains(&ev.raw.payload_len),
        probe,
    }
}

/// The handshake's round trip, from the event of the client's ACK that
/// completed it: the time since the server's SYN-ACK.
fn handshake_rtt(ev: &FlowEvent) -> Option<f64> {
    let joined_late = ev.raw.flow_state & state::MIDSTREAM != 0;
    (ev.kind == EventKind::Opened && ev.dir == Dir::In && !joined_late)
        .then(|| ev.since_server())
        .flatten()
        .map(|d| d.as_secs_f64())
}

#[derive(Clone, Copy, Debug, Default)]
struct ClientTrack {
    last_seen_ns: u64,
    last_kill_ns: Option<u64>,
    /// The client's heartbeat estimate (seconds): see [`ClientTrack::sample`].
    heartbeat_s: Option<f64>,
    /// Hold times of answers the client was heard after.
    delivered: Samples,
    /// Hold times of every answer, delivered or not (a killed no-change
    /// answer still shows the heartbeat it was held for).
    held: Samples,
    /// The heartbeat the client's latest Ping asked for (plaintext ports).
    asked_s: Option<f64>,
}

/// A client's recent hold times (those of at least the minimum heartbeat).
#[derive(Clone, Copy, Debug, Default)]
struct Samples {
    recent: [f64; CLIENT_SAMPLES],
    count: usize,
}

impl Samples {
    fn push(&mut self, h: f64) {
        self.recent[self.count % CLIENT_SAMPLES] = h;
        self.count += 1;
    }

    fn last_two_agree(&self) -> bool {
        self.count >= 2 && {
            let at = |back: usize| self.recent[(self.count - back) % CLIENT_SAMPLES];
            (at(1) - at(2)).abs() <= SAME_HEARTBEAT * at(1).max(at(2))
        }
    }

    /// The largest recent sample (early answers are shorter than the
    /// device's no-change answers), unless the last two agree below it: a
    /// device that backed off repeats its new, shorter interval. None until
    /// two samples: one alone may be early (new mail).
    fn estimate(&self) -> Option<f64> {
        if self.count < 2 {
            return None;
        }
        let at = |back: usize| self.recent[(self.count - back) % CLIENT_SAMPLES];
        let (last, previous) = (at(1), at(2));
        if (last - previous).abs() <= SAME_HEARTBEAT * last.max(previous) {
            return Some(last);
        }
        let n = self.count.min(CLIENT_SAMPLES);
        Some(self.recent[..n].iter().copied().fold(0.0, f64::max))
    }

    /// The largest recent sample another one repeats (within 2 %): a
    /// no-change answer held for the heartbeat, not an early one (those
    /// fall at random).
    fn repeated(&self) -> Option<f64> {
        let n = self.count.min(CLIENT_SAMPLES);
        let r = &self.recent[..n];
        r.iter()
            .enumerate()
            .filter(|(i, a)| {
                r.iter()
                    .enumerate()
                    .any(|(j, b)| j != *i && (*a - b).abs() <= SAME_HEARTBEAT * a.max(*b))
            })
            .map(|(_, a)| *a)
            .reduce(f64::max)
    }
}

impl ClientTrack {
    /// A hold time; `delivered`: the client was heard after the answer.
    /// Delivered answers decide, with answers the server held for the same
    /// time again and again (killed no-change answers repeat; early ones
    /// fall at random): the cases below.
    fn sample(&mut self, h: f64, delivered: bool) -> Option<f64> {
        if delivered {
            self.delivered.push(h);
        } else {
            self.held.push(h);
        }
        // Killed answers count only where they repeat: with mail arriving
        // the killed ones may be early too.
        let held = self.held.repeated();
        let one = self.delivered.recent[0];
        self.heartbeat_s = match self.delivered.count {
            0 => held,
            // One delivered answer may be early (new mail): no claim on it
            // alone; an answer held for the same time again and again
            // (killed, so never delivered) corroborates the heartbeat.
            1 => held.map(|h| h.max(one)),
            // The last two delivered agree: the device's interval now (a
            // back-off repeats its new one). Else its delivered answers
            // may all have been early while its no-change ones were
            // killed: a longer answer held again and again wins.
            _ if self.delivered.last_two_agree() => self.delivered.estimate(),
            _ => self
                .delivered
                .estimate()
                .map(|d| d.max(held.unwrap_or(0.0))),
        };
        self.heartbeat_s
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DetectorStats {
    pub endings: [u64; Ending::COUNT],
    pub premature: u64,
    pub churn: u64,
    pub hold_times: u64,
    /// Ping requests read on plaintext ports, and those stating a heartbeat.
    pub pings_read: u64,
    pub pings_stated: u64,
    pub paths_evicted: u64,
    pub flows_not_tracked: u64,
    /// Client-facing answers that were this host's proxy timing out.
    pub proxy_timeout_answers: u64,
    /// Flows that ended with events missing (ring buffer full).
    pub incomplete: u64,
}

pub struct Detector {
    cfg: DetectorConfig,
    table: Vec<middlebox::Middlebox>,
    flows: tracks::Tracks<FlowTrack>,
    paths: HashMap<PathKey, PathStats>,
    clients: HashMap<IpAddr, ClientTrack>,
    /// Device (DeviceId, else address) -> its last stated heartbeat and when
    /// it was seen: an empty Ping keeps the previous interval.
    devices: HashMap<String, (f64, u64)>,
    /// Client address -> its flows with an unanswered retransmission.
    suspects: HashMap<IpAddr, Vec<FlowKey>>,
    window: HbiWindow,
    recent: VecDeque<Verdict>,
    /// Client-side resets awaiting a possible second one: see [`held`].
    held: HashMap<FlowKey, held::HeldClose>,
    /// Upstream legs and the proxy's answers awaiting their pairing.
    upstream: Upstream,
    max_heartbeat_seen_s: f64,
    /// When idle clients and devices were last forgotten.
    last_forget_ns: u64,
    pub stats: DetectorStats,
}

/// Above the heartbeat, what a middlebox's idle timeout should allow (the
/// server answers a Ping up to one store poll late; Microsoft: 28-min
/// heartbeat, 30-min timeout).
pub const CURE_MARGIN_SECONDS: f64 = 120.0;

/// The sizes of an encrypted TLS alert record: 23 (TLS 1.2 ChaCha20), 24
/// (TLS 1.3), 31 (TLS 1.2 AES-GCM) up to 85 (TLS 1.2 CBC with SHA-384,
/// in Schannel's default order). A few bytes of a client's own data
/// before its FIN are no alert.
const TLS_ALERT_BYTES: std::ops::RangeInclusive<u32> = 23..=85;
/// A close_notify and the FIN or RST after it leave together.
const CLOSE_NOTIFY_NS: u64 = 1_000_000_000;

/// A client-facing flow closing this soon after the proxy's timeout
/// answer closed because of it (a device drops a connection whose Ping
/// failed at once).
const CLOSE_AFTER_PROXY_ANSWER_NS: u64 = 5_000_000_000;

/// Idle clients and devices are forgotten after hours: looking for them
/// once a minute is enough (every tick, it cost a day-long capture's
/// analysis a fifth of its time).
const FORGET_EVERY_NS: u64 = 60_000_000_000;

impl Detector {
    pub fn new(cfg: DetectorConfig) -> Result<Self, DetectorConfigError> {
        cfg.validate()?;
        Ok(Detector {
            window: HbiWindow::new(cfg.hbi_sample_size, cfg.hbi_alert_threshold.as_secs_f64()),
            table: middlebox::builtin(),
            cfg,
            flows: tracks::Tracks::default(),
            paths: HashMap::new(),
            clients: HashMap::new(),
            devices: HashMap::new(),
            suspects: HashMap::new(),
            recent: VecDeque::new(),
            held: HashMap::new(),
            upstream: Upstream::default(),
            max_heartbeat_seen_s: 0.0,
            last_forget_ns: 0,
            stats: DetectorStats::default(),
        })
    }

    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// On a proxy host: follow flows from this host's `local` addresses to
    /// `ports` as upstream legs (see [`upstream`]).
    pub fn set_upstream(&mut self, ports: &[u16], local: impl IntoIterator<Item = IpAddr>) {
        self.upstream.set(ports, local);
    }

    /// This host's addresses changed.
    pub fn set_local_addresses(&mut self, local: impl IntoIterator<Item = IpAddr>) {
        self.upstream.set_local(local);
    }

    /// A flow's path: its client prefix and port, or its upstream server.
    fn path_of_key(&self, key: &FlowKey) -> PathKey {
        if self.upstream.is_upstream(key) {
            let server = crate::event::server_of(key);
            PathKey::upstream(server.ip(), server.port())
        } else {
            self.path_of(crate::event::client_of(key).ip(), key.server_port)
        }
    }

    pub fn flows_tracked(&self) -> usize {
        self.flows.len()
    }

    /// Bytes the followed flows hold (by capacity: index and slots).
    pub fn flows_memory_bytes(&self) -> usize {
        self.flows.memory_bytes()
    }

    pub fn paths(&self) -> impl Iterator<Item = (&PathKey, &PathStats)> {
        self.paths.iter()
    }

    pub fn window(&self) -> &HbiWindow {
        &self.window
    }

    pub fn recent(&self) -> impl Iterator<Item = &Verdict> {
        self.recent.iter()
    }

    /// The heartbeat in force for a followed flow (seconds), if known.
    pub fn flow_heartbeat(&self, key: &FlowKey) -> Option<f64> {
        self.flows
            .get(key)
            .and_then(|f| self.heartbeat_in_force(key, f))
            .map(|h| h.0)
    }

    /// A Ping request read from a plaintext flow: the heartbeat in force,
    /// exactly (or, for an empty Ping, the device's previous one).
    pub fn ping(&mut self, key: &FlowKey, req: &PingRequest, now: u64) {
        let client = crate::event::client_of(key);
        let device = req
            .device_id
            .clone()
            .unwrap_or_else(|| client.ip().to_string());
        let stated = match req.heartbeat {
            Heartbeat::Stated(h) => Some(f64::from(h)),
            _ => None,
        };
        let h = match req.heartbeat {
            Heartbeat::Stated(h) => Some(f64::from(h)),
            Heartbeat::Unstated => self.devices.get(&device).map(|d| d.0),
            Heartbeat::Unreadable => None,
        };
        self.stats.pings_read += 1;
        if let Some(h) = stated {
            self.stats.pings_stated += 1;
            if self.devices.len() < self.cfg.max_flows || self.devices.contains_key(&device) {
                self.devices.insert(device.clone(), (h, now));
            }
            self.max_heartbeat_seen_s = self.max_heartbeat_seen_s.max(h);
        } else if let Some(d) = self.devices.get_mut(&device) {
            d.1 = now;
        }
        let path = self.path_of_key(key);
        self.path_mut(path, now).record_ping(&device, h);
        if let Some(h) = h {
            self.clients.entry(client.ip()).or_default().asked_s = Some(h);
        }
        if let (Some(f), Some(h)) = (self.flows.get_mut(key), h) {
            f.ping_heartbeat_s = Some(h as f32);
        }
    }

    pub fn path_of(&self, client: IpAddr, port: u16) -> PathKey {
        PathKey::new(client, port, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix)
    }

    /// Feed one kernel event.
    pub fn ingest(&mut self, ev: &FlowEvent) -> Vec<Output> {
        let mut out = Vec::new();
        let key = ev.raw.key;
        let now = ev.raw.ts_ns;
        let client = ev.client();
        self.conclude_held_due(now, &mut out);
        self.judge_answers(Some(now), &mut out);
        self.clients.entry(client.ip()).or_default().last_seen_ns = now;
        if ev.raw.flow_state & state::EVENT_LOST != 0 {
            if let Some(f) = self.flows.get_mut(&key) {
                f.incomplete = true;
            }
        }
        match ev.kind {
            EventKind::Opened => self.opened(ev, &mut out),
            EventKind::GapEnded => self.gap_ended(ev, &mut out),
            EventKind::Retransmit => self.retransmit(ev, &mut out),
            EventKind::RetransAnswered => {
                let Some(f) = self.flows.get_mut(&key) else {
                    return out;
                };
                if f.suspect.take().is_some() {
                    let path = f.path;
                    if let Some(g) = f.pending_gap.take() {
                        self.survived(client, path, g, now, &mut out);
                    }
                    self.unsuspect(client.ip(), &key);
                }
            }
            EventKind::Closed => self.closed(ev, &mut out),
            EventKind::ResetAgain => self.reset_again(ev, &mut out),
        }
        out
    }

    /// The server resends what it sent after a silence, to a client silent
    /// since: the flow is suspect until the client is heard or comes back.
    fn retransmit(&mut self, ev: &FlowEvent, out: &mut Vec<Output>) {
        let now = ev.raw.ts_ns;
        let client = ev.client().ip();
        let Some(f) = self.track(ev) else { return };
        if f.suspect.is_some() || f.finalized {
            return;
        }
        let path = f.path;
        if ev.is_probe() {
            // The silence before this one first, if the client proved it.
            if let Some(g) = f.pending_gap.filter(|g| g.proven_by(ev)) {
                f.pending_gap = None;
                self.survived(ev.client(), path, g, now, out);
            }
            // A probe of a silence no longer than one the path already
            // survived asks nothing new (a remedy's keepalive under the
            // timeout): the gap it ends, as any send's, so a client slow
            // to answer, or gone, is never a kill under the low end.
            let silence = ev.silence().as_secs_f64();
            let known = self.paths.get(&path).map_or(0.0, |p| p.longest_survived_s);
            if silence <= known {
                return self.gap_ended(ev, out);
            }
            // A keepalive probe is the send after the silence itself.
            let Some(f) = self.flows.get_mut(&ev.raw.key) else {
                return;
            };
            f.pending_gap = Some(gap_of(ev, None, true));
        }
        let Some(f) = self.flows.get_mut(&ev.raw.key) else {
            return;
        };
        // The send that goes unanswered and the silence before it; none
        // if that send followed no silence (an answer at once: no timer expired).
        let send = f
            .pending_gap
            .filter(|g| g.dir == Dir::Out && (g.payload || g.probe) && !g.heard_after(ev));
        // A probe's device waits from its request still owed, if any.
        let owed_request = (ev.is_probe() && ev.raw.last_payload_dir == Dir::In as u8)
            .then(|| ev.since_payload())
            .flatten()
            .map(|d| now.saturating_sub(d.as_nanos() as u64));
        // The device waits for its answer up to its heartbeat, which may
        // exceed any answer seen (a raise is what gets killed): up to the
        // largest heartbeat to cover.
        let heartbeat = (self.heartbeat_to_cover() * NS) as u64;
        let request = send
            .and_then(|g| Some(g.end_ns.saturating_sub((g.hold_s? * NS) as u64)))
            .or(owed_request);
        if let Some(f) = self.flows.get_mut(&ev.raw.key) {
            f.suspect = Some(Box::new(Suspect {
                since_ns: now,
                silence_s: send.map_or(0.0, |g| g.silence_s),
                gives_up_ns: request.map_or(now, |r| (r + heartbeat).max(now)),
                probe: send.is_some_and(|g| g.probe),
            }));
        }
        self.suspects.entry(client).or_default().push(ev.raw.key);
    }

    /// A packet ended a silence: the previous silence survived if this
    /// proves it; this one waits for its own proof.
    fn gap_ended(&mut self, ev: &FlowEvent, out: &mut Vec<Output>) {
        let now = ev.raw.ts_ns;
        let client = ev.client().ip();
        let Some(f) = self.track(ev) else { return };
        if f.finalized {
            return;
        }
        let path = f.path;
        // The server answering a client request after a silence: a hold
        // time. Not on an upstream leg: its client is this host, for every
        // device at once; the device's own flow has the answer too.
        let hold_s = (!f.upstream
            && ev.dir == Dir::Out
            && ev.has_payload()
            && ev.raw.last_payload_dir == Dir::In as u8)
            .then(|| ev.since_payload())
            .flatten()
            .map(|d| d.as_secs_f64());
        let previous = f.pending_gap.replace(gap_of(ev, hold_s, false));
        let upstream_leg = f.upstream;
        if let Some(g) = previous.filter(|g| g.proven_by(ev)) {
            self.survived(ev.client(), path, g, now, out);
        }
        if self.upstream.serves(&ev.raw.key) && !upstream_leg {
            // On a proxy host an answer may be the proxy's timeout: it
            // waits for its upstream leg's give-up (see [`upstream`]). So
            // may a send after a silence that follows a send of its own:
            // a TLS 1.3 session ticket written just after the device's
            // request makes the request look answered; the silence then
            // stands for the wait (and is never a hold time).
            // (Since the last data, as a hold time: a bare ACK or keepalive
            // in the silence does not shorten it.)
            let wait = hold_s.or_else(|| {
                let s = ev.silence().as_secs_f64();
                let since_data = ev.since_payload()?.as_secs_f64();
                (ev.dir == Dir::Out && ev.has_payload() && s >= self.cfg.min_silence.as_secs_f64())
                    .then_some(since_data)
            });
            let Some(wait) = wait else { return };
            let a = Answer {
                key: ev.raw.key,
                path,
                at_ns: now,
                hold_s: wait,
                is_hold: hold_s.is_some(),
                delivered: false,
            };
            if let Some(old) = self.upstream.answered(a) {
                let judged = self.upstream.judge(&old);
                self.judged_answer(old, judged, now, out);
            }
        } else if let Some(h) = hold_s {
            self.heartbeat_sample(client, path, h, false, now);
        }
    }

    /// Client-facing answers whose pairing window has passed (all, with
    /// `None`: the end of the input).
    fn judge_answers(&mut self, now_ns: Option<u64>, out: &mut Vec<Output>) {
        if !self.upstream.enabled() {
            return;
        }
        for (a, judged) in self.upstream.due(now_ns) {
            let now = now_ns.unwrap_or(a.at_ns);
            self.judged_answer(a, judged, now, out);
        }
    }

    /// A client-facing answer, judged: a hold time, or the proxy's timeout
    /// (never a heartbeat sample).
    fn judged_answer(&mut self, a: Answer, judged: Judged, now: u64, out: &mut Vec<Output>) {
        let client = crate::event::client_of(&a.key).ip();
        match judged {
            Judged::Answer if !a.is_hold => {}
            Judged::Answer => {
                self.heartbeat_sample(client, a.path, a.hold_s, false, now);
                if a.delivered {
                    self.hold_time(a.path, a.hold_s, now, out);
                    self.heartbeat_sample(client, a.path, a.hold_s, true, now);
                }
            }
            Judged::ProxyTimeout { path, .. } => {
                self.stats.proxy_timeout_answers += 1;
                self.path_mut(a.path, now).proxy_timeout_answers += 1;
                self.path_mut(path, now).record_answered_path(a.path);
                let held = self.held.get_mut(&a.key).map(|h| &mut h.flow);
                for f in self.flows.get_mut(&a.key).into_iter().chain(held) {
                    f.proxy_answered = Some(Box::new((a.at_ns, a.hold_s)));
                    // Its gap, proven later, is no hold time either.
                    if let Some(g) = f.pending_gap.as_mut().filter(|g| g.end_ns == a.at_ns) {
                        g.hold_s = None;
                    }
                }
            }
        }
    }

    /// A silence the client was heard after: it counts for the path, and
    /// the answer that ended it (if any) is a delivered hold time.
    fn survived(
        &mut self,
        client: SocketAddr,
        path: PathKey,
        g: Gap,
        now: u64,
        out: &mut Vec<Output>,
    ) {
        let min_silence = self.cfg.min_silence.as_secs_f64();
        let p = self.path_mut(path, now);
        // Only a probe that raised the low end is kept as evidence: a
        // remedy's probes well under the timeout come every few seconds.
        let raised = g.silence_s > p.longest_survived_s;
        p.record_survival(g.silence_s);
        if g.probe && raised && g.silence_s >= min_silence {
            p.record_probe(Probe {
                silence_seconds: g.silence_s,
                survived: true,
                at_ns: now,
                client,
            });
        }
        let client = client.ip();
        if let Some(h) = g.hold_s {
            // An answer still waiting for its pairing waits delivered.
            if self.upstream.enabled() && self.upstream.deliver_of(client, g.end_ns) {
                return;
            }
            self.hold_time(path, h, now, out);
            self.heartbeat_sample(client, path, h, true, now);
        }
    }

    /// Time passes: unanswered retransmissions stop waiting for their client
    /// `black_hole_after` past the device's own wait; idle client records
    /// are forgotten. (No output today: a black hole needs its client back.)
    pub fn tick(&mut self, now_ns: u64) -> Vec<Output> {
        let mut out = Vec::new();
        self.conclude_held_due(now_ns, &mut out);
        self.judge_answers(Some(now_ns), &mut out);
        // Past `black_hole_after` without the client coming back, a suspect
        // can no longer be told from a device gone dark: it waits for its
        // flow's end (vanished) and no later reconnect resolves it.
        let limit = self.cfg.black_hole_after.as_nanos() as u64;
        let flows = &self.flows;
        self.suspects.retain(|_, keys| {
            keys.retain(|k| {
                flows
                    .get(k)
                    .and_then(|f| f.suspect.as_deref())
                    .is_some_and(|s| now_ns < s.gives_up_ns.saturating_add(limit))
            });
            !keys.is_empty()
        });
        if now_ns.saturating_sub(self.last_forget_ns) >= FORGET_EVERY_NS {
            self.last_forget_ns = now_ns;
            let keep = (self.cfg.churn_window.max(self.cfg.max_heartbeat) * 2).as_nanos() as u64;
            self.clients
                .retain(|_, c| now_ns.saturating_sub(c.last_seen_ns) < keep);
            self.devices
                .retain(|_, d| now_ns.saturating_sub(d.1) < keep);
        }
        out
    }

    /// What the flow table says of each followed flow: when its client was
    /// last heard (`last_in_ns`). A silence the client was heard after has
    /// survived even if no event has said so yet (the next one would): for
    /// the end of a capture, where no next event comes.
    pub fn settle(
        &mut self,
        now_ns: u64,
        last_heard: impl Fn(&FlowKey) -> Option<u64>,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let proven: Vec<(FlowKey, SocketAddr, PathKey, Gap)> = self
            .flows
            .iter()
            .filter(|(_, f)| !f.finalized && f.suspect.is_none())
            .filter_map(|(k, f)| {
                let g = f.pending_gap?;
                let heard = last_heard(k)?;
                (g.dir == Dir::In || heard > g.end_ns).then_some((*k, client_of(k), f.path, g))
            })
            .collect();
        for (key, client, path, g) in proven {
            if let Some(f) = self.flows.get_mut(&key) {
                f.pending_gap = None;
            }
            self.survived(client, path, g, now_ns, &mut out);
        }
        out
    }

    /// Flows the kernel no longer holds (evicted or expired without a close).
    pub fn retire_missing(
        &mut self,
        now_ns: u64,
        present: impl Fn(&FlowKey) -> bool,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let gone: Vec<FlowKey> = self.flows.keys().filter(|k| !present(k)).copied().collect();
        for key in gone {
            if let Some(f) = self.flows.remove(&key) {
                self.unsuspect(client_of(&key).ip(), &key);
                if f.finalized {
                    continue;
                }
                let evidence = Evidence {
                    note: Some("no FIN or RST was seen".into()),
                    ..Evidence::default()
                };
                let v = self.verdict(&key, &f, Ending::Vanished, false, now_ns, evidence);
                self.finish(f.path, v, now_ns, &mut out);
            }
        }
        out
    }

    fn opened(&mut self, ev: &FlowEvent, out: &mut Vec<Output>) {
        let now = ev.raw.ts_ns;
        let client = ev.client();
        let path = self.path_of_key(&ev.raw.key);
        if path.upstream {
            // This host opens a leg per request or pool: no device
            // reconnecting, no churn, no give-up on an older leg.
            self.insert_flow(ev, path);
            return;
        }
        // The client's resets still held are judged first: a kill among
        // them makes this reconnect churn.
        self.conclude_held_of(client.ip(), out);
        // A client that opens a new flow when its wait for an old one's
        // unanswered answer ran out (within `black_hole_after` of its
        // request plus its heartbeat) has given up on it: a black hole.
        let limit = self.cfg.black_hole_after.as_nanos() as u64;
        let configured = self.cfg.next_packet_window.as_secs_f64();
        if let Some(keys) = self.suspects.get(&client.ip()).cloned() {
            for k in keys {
                // A probe is unanswered only once its client's round trip,
                // and the shortest silence counted, have passed (a phone
                // waking its radio answers late; a retransmission already
                // waited an RTO).
                let fresh = self.flows.get(&k).is_some_and(|f| {
                    let patience = close::next_packet_window(f.rtt_s.map(f64::from), configured)
                        .max(self.cfg.min_silence.as_secs_f64());
                    f.suspect.as_deref().is_some_and(|s| {
                        now <= s.gives_up_ns.saturating_add(limit)
                            && (!s.probe || now.saturating_sub(s.since_ns) as f64 > patience * NS)
                    })
                });
                if k != ev.raw.key && fresh {
                    self.black_hole(&k, now, "the client opened a new connection", out);
                }
            }
        }
        let window = self.cfg.churn_window.as_nanos() as u64;
        let c = self.clients.entry(client.ip()).or_default();
        if c.last_kill_ns
            .is_some_and(|k| now.saturating_sub(k) <= window)
        {
            c.last_kill_ns = None;
            self.stats.churn += 1;
            self.path_mut(path, now).churn += 1;
            out.push(Output::Churn { path });
        }
        self.insert_flow(ev, path);
    }

    fn insert_flow(&mut self, ev: &FlowEvent, path: PathKey) -> bool {
        if self.flows.len() >= self.cfg.max_flows && !self.flows.contains_key(&ev.raw.key) {
            self.stats.flows_not_tracked += 1;
            return false;
        }
        self.flows.insert(
            ev.raw.key,
            FlowTrack {
                path,
                opened_ns: if ev.kind == EventKind::Opened {
                    ev.raw.ts_ns
                } else {
                    ev.raw.first_seen_ns
                },
                ping_heartbeat_s: None,
                pending_gap: None,
                suspect: None,
                // Milliseconds to seconds: f32 keeps them to a microsecond.
                rtt_s: handshake_rtt(ev).map(|r| r as f32),
                finalized: false,
                upstream: path.upstream,
                proxy_answered: None,
                incomplete: ev.raw.flow_state & state::EVENT_LOST != 0,
            },
        );
        true
    }

    /// The flow's track, created if the flow predates us (or its Opened was lost).
    fn track(&mut self, ev: &FlowEvent) -> Option<&mut FlowTrack> {
        if !self.flows.contains_key(&ev.raw.key) {
            let path = self.path_of_key(&ev.raw.key);
            if !self.insert_flow(ev, path) {
                return None;
            }
        }
        self.flows.get_mut(&ev.raw.key)
    }

    fn path_mut(&mut self, path: PathKey, now: u64) -> &mut PathStats {
        if !self.paths.contains_key(&path) && self.paths.len() >= self.cfg.max_paths {
            let oldest = self
                .paths
                .iter()
                .min_by_key(|(_, p)| p.last_seen_ns)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.paths.remove(&k);
                self.stats.paths_evicted += 1;
            }
        }
        let p = self.paths.entry(path).or_default();
        p.last_seen_ns = now;
        p
    }

    fn unsuspect(&mut self, client: IpAddr, key: &FlowKey) {
        if let Some(v) = self.suspects.get_mut(&client) {
            v.retain(|k| k != key);
            if v.is_empty() {
                self.suspects.remove(&client);
            }
        }
    }

    /// A hold time, delivered or not: the server held the client's request
    /// this long, so the device's heartbeat is at least this (early answers
    /// are shorter; a killed no-change answer still shows the heartbeat).
    fn heartbeat_sample(
        &mut self,
        client: IpAddr,
        path: PathKey,
        h: f64,
        delivered: bool,
        now: u64,
    ) {
        // Answers before the shortest heartbeat a device may ask for are
        // early answers (new mail), not heartbeats.
        if h + 0.5 < self.cfg.min_heartbeat.as_secs_f64() {
            return;
        }
        self.max_heartbeat_seen_s = self.max_heartbeat_seen_s.max(h);
        let c = self.clients.entry(client).or_default();
        if let Some(estimate) = c.sample(h, delivered) {
            self.path_mut(path, now).record_heartbeat(client, estimate);
        }
    }

    /// A hold time whose answer the client was heard after: counted, and
    /// a sample of Exchange's heartbeat window.
    fn hold_time(&mut self, path: PathKey, h: f64, now: u64, out: &mut Vec<Output>) {
        self.stats.hold_times += 1;
        out.push(Output::HoldTime { path, seconds: h });
        if h + 0.5 < self.cfg.min_heartbeat.as_secs_f64() {
            return;
        }
        if let Some(a) = self.window.push(h, path, false, now) {
            out.push(Output::Alert(a));
        }
    }

    /// The Ping's own heartbeat where it was read; else the client's
    /// inferred one. Never a single flow's hold time: that may be an early
    /// answer (new mail), shorter than the heartbeat.
    fn heartbeat_in_force(&self, key: &FlowKey, f: &FlowTrack) -> Option<(f64, HeartbeatSource)> {
        if let Some(h) = f.ping_heartbeat_s {
            return Some((f64::from(h), HeartbeatSource::Ping));
        }
        self.clients
            .get(&client_of(key).ip())
            .and_then(|c| c.heartbeat_s)
            .map(|h| (h, HeartbeatSource::HoldTimes))
    }

    fn black_hole(&mut self, key: &FlowKey, now: u64, note: &'static str, out: &mut Vec<Output>) {
        let Some(f) = self.flows.get_mut(key) else {
            return;
        };
        let Some(s) = f.suspect.take() else { return };
        f.finalized = true;
        let f = f.clone();
        self.unsuspect(client_of(key).ip(), key);
        let evidence = Evidence {
            silence_seconds: s.silence_s,
            after_server_send_seconds: Some(now.saturating_sub(s.since_ns) as f64 / NS),
            server_owed_answer: true,
            signals: if s.probe {
                vec![Signal::KeepaliveProbe]
            } else {
                Vec::new()
            },
            note: Some(note.into()),
            ..Evidence::default()
        };
        let min_silence = self.cfg.min_silence.as_secs_f64();
        let premature = is_premature(Ending::BlackHole, &evidence, None, min_silence);
        let v = self.verdict(key, &f, Ending::BlackHole, premature, now, evidence);
        self.finish(f.path, v, now, out);
    }

    fn closed(&mut self, ev: &FlowEvent, out: &mut Vec<Output>) {
        let key = ev.raw.key;
        if self.track(ev).is_none() {
            return;
        }
        let Some(f) = self.flows.remove(&key) else {
            return;
        };
        self.unsuspect(client_of(&key).ip(), &key);
        if f.finalized {
            return;
        }
        // The device's close (or a box's on its side), not this host's own:
        // a leg this host closes after its own close of the device's flow
        // is still its give-up.
        if !f.upstream && ev.dir == Dir::In && self.upstream.serves(&key) {
            self.upstream
                .device_closed(ev.raw.ts_ns, self.close_facts(ev, &f).silence);
        }
        if let Some(f) = self.hold(ev, f, out) {
            self.conclude(ev, f, false, out);
        }
    }

    /// The verdict on a closed flow; `burst`: its RST came in a burst.
    fn conclude(&mut self, ev: &FlowEvent, f: FlowTrack, burst: bool, out: &mut Vec<Output>) {
        let now = ev.raw.ts_ns;
        let mut facts = self.close_facts(ev, &f);
        if burst {
            facts.forged.push(Signal::RstBurst);
        }
        let mut evidence = facts.evidence(ev);
        let ending = classify_close(&facts, &mut evidence);
        let ending = self.local_ending(ev, &f, &facts, ending, &mut evidence);
        // A kill's own packet (a box's RST, a proxy's FIN) proves nothing:
        // only the client heard before it. The proxy's error answer
        // survived nothing either.
        let proven = |g: &Gap| {
            if ending == Ending::LocalProxyTimeout {
                false
            } else if ending.is_kill() {
                g.heard_after(ev)
            } else {
                g.proven_by(ev)
            }
        };
        let key = &ev.raw.key;
        if let Some(g) = f.pending_gap.filter(proven) {
            self.survived(client_of(key), f.path, g, now, out);
        }
        let heartbeat = self.heartbeat_in_force(key, &f).map(|h| h.0);
        let premature = is_premature(ending, &evidence, heartbeat, facts.min_silence);
        let v = self.verdict(key, &f, ending, premature, now, evidence);
        self.finish(f.path, v, now, out);
    }

    /// On a proxy host, what its own timeouts make of a close (see
    /// [`upstream`]): an upstream leg this host closed after a silence
    /// while the server owed an answer is its give-up (remembered for
    /// pairing); a client-facing flow this host closed while the device
    /// waited, or that closed right after the proxy answered it at its
    /// timeout, is the local proxy's timeout.
    fn local_ending(
        &mut self,
        ev: &FlowEvent,
        f: &FlowTrack,
        facts: &CloseFacts,
        ending: Ending,
        evidence: &mut Evidence,
    ) -> Ending {
        if !self.upstream.enabled() {
            return ending;
        }
        let now = ev.raw.ts_ns;
        if f.upstream {
            return self.upstream_leg_ending(ev, f, facts, ending, evidence);
        }
        if !self.upstream.serves(&ev.raw.key) {
            // Forwarded through this host (a router): not its proxy's.
            return ending;
        }
        if ev.dir == Dir::Out && facts.owed {
            self.upstream.forget_answers_of(&ev.raw.key);
            evidence.note =
                Some("this host closed the device's flow while the device waited".into());
            return Ending::LocalProxyTimeout;
        }
        let answered = self
            .upstream
            .timed_out_answer(&ev.raw.key)
            .map(|(a, _)| (a.at_ns, a.hold_s))
            .or(f.proxy_answered.as_deref().copied())
            .filter(|(at, _)| now.saturating_sub(*at) <= CLOSE_AFTER_PROXY_ANSWER_NS);
        match answered {
            Some((_, hold)) => {
                evidence.silence_seconds = hold;
                evidence.server_owed_answer = true;
                evidence.note = Some(
                    "this host's proxy answered the device at its upstream timeout, then the flow closed"
                        .into(),
                );
                Ending::LocalProxyTimeout
            }
            None => ending,
        }
    }

    /// An upstream leg's close. This host's own (seen leaving it: no box
    /// forged it) while the server owed an answer is its give-up, unless it
    /// relayed a device's close. From the server's side, an RST while this
    /// host waited (Exchange answers a Ping, it never resets one) is a box
    /// between them, or the server failing: after this host's send
    /// following a silence, within the next-packet window, a box that
    /// forgot the leg; after a silence, one resetting at expiry.
    fn upstream_leg_ending(
        &mut self,
        ev: &FlowEvent,
        f: &FlowTrack,
        facts: &CloseFacts,
        ending: Ending,
        evidence: &mut Evidence,
    ) -> Ending {
        let now = ev.raw.ts_ns;
        if ev.dir == Dir::Out {
            if !ev.is_rst() {
                return ending;
            }
            let sent_after_silence = f
                .pending_gap
                .filter(|g| g.dir == Dir::In && g.payload && g.silence_s >= facts.min_silence);
            let quick = ev
                .since_client()
                .is_some_and(|d| d.as_secs_f64() <= facts.window_s);
            if let (Some(g), true) = (sent_after_silence, quick) {
                evidence.silence_seconds = g.silence_s;
                evidence.server_owed_answer = true;
                evidence.signals = vec![Signal::NextPacketTiming];
                evidence.note = Some("reset from the server's side right after this host's send on its upstream leg: a box between them forgot it".into());
                return Ending::ResetOnNextPacket;
            }
            if facts.owed {
                evidence.signals = vec![Signal::AfterSilence, Signal::AnswerOwed];
                evidence.note = Some("reset from the server's side after a silence while this host waited: a box between them at its timeout (or the server failing)".into());
                return Ending::InjectedReset;
            }
            return ending;
        }
        {
            if facts.owed && !self.upstream.relays_a_device_close(now, facts.silence) {
                self.upstream.gave_up(GiveUp {
                    at_ns: now,
                    silence_s: facts.silence,
                    server: server_of(&ev.raw.key),
                    path: f.path,
                });
                evidence.note = Some(
                    "this host closed its upstream leg while the server owed an answer".into(),
                );
                // This host, not a box: no place on a path to name.
                evidence.location = None;
                return Ending::UpstreamTimeout;
            }
            if facts.owed {
                evidence.note = Some("this host closed its upstream leg as the device's flow closed: the device's close, relayed".into());
                evidence.location = None;
                return if ev.is_rst() {
                    Ending::ClientReset
                } else {
                    Ending::ClientFin
                };
            }
            ending
        }
    }

    /// What the closing packet and the flow's history say, for [`classify_close`].
    fn close_facts(&self, ev: &FlowEvent, f: &FlowTrack) -> CloseFacts {
        let min_silence = self.cfg.min_silence.as_secs_f64();
        // A TLS-terminating side closes with a close_notify alert, then the
        // FIN or RST: the silence and the answer owed are those before the
        // alert.
        let notify = f.pending_gap.filter(|g| {
            g.dir == ev.dir
                && g.payload
                && g.alert_sized
                && g.owed
                && g.silence_s >= min_silence
                && ev.raw.ts_ns.saturating_sub(g.end_ns) <= CLOSE_NOTIFY_NS
        });
        let (silence, owed) = match notify {
            Some(g) => (g.silence_s, true),
            None => {
                let s = ev.silence().as_secs_f64();
                (
                    s,
                    ev.raw.last_payload_dir == Dir::In as u8 && s >= min_silence,
                )
            }
        };
        let tol = self.cfg.ttl_tolerance;
        let ttl = ev.raw.ttl;
        let configured = self.cfg.next_packet_window.as_secs_f64();
        CloseFacts {
            dir: ev.dir,
            rst: ev.is_rst(),
            silence,
            min_silence,
            since_server: ev.since_server().map(|d| d.as_secs_f64()),
            owed,
            // None: no baseline to compare with.
            ttl_is_clients: ev
                .ttl_baseline()
                .map(|(lo, hi)| ttl.saturating_add(tol) >= lo && ttl <= hi.saturating_add(tol)),
            after_server_gap: f
                .pending_gap
                .filter(|g| g.dir == Dir::Out && (g.payload || g.probe))
                .map(|g| ServerSend {
                    silence_s: g.silence_s,
                    probe: g.probe,
                }),
            window_s: close::next_packet_window(f.rtt_s.map(f64::from), configured),
            suspect_silence: f.suspect.as_ref().map(|s| s.silence_s),
            heartbeat: self.heartbeat_in_force(&ev.raw.key, f).map(|h| h.0),
            forged: close::forged_signals(ev),
        }
    }

    fn verdict(
        &self,
        key: &FlowKey,
        f: &FlowTrack,
        ending: Ending,
        premature: bool,
        now: u64,
        evidence: Evidence,
    ) -> Verdict {
        let heartbeat = self.heartbeat_in_force(key, f);
        Verdict {
            client: client_of(key),
            server: server_of(key),
            path: f.path.to_string(),
            ending,
            premature,
            heartbeat_seconds: heartbeat.map(|h| h.0),
            heartbeat_source: heartbeat.map(|h| h.1),
            incomplete: f.incomplete,
            at_ns: now,
            flow_age_seconds: now.saturating_sub(f.opened_ns) as f64 / NS,
            evidence,
        }
    }

    /// Count the verdict everywhere it matters and emit it.
    fn finish(&mut self, path: PathKey, v: Verdict, now: u64, out: &mut Vec<Output>) {
        self.stats.endings[v.ending as usize] += 1;
        let min_silence = self.cfg.min_silence.as_secs_f64();
        // A flow with lost events may have had a silence we never saw end:
        // counted, shown, never part of an estimate.
        let counts_for_estimate =
            v.ending.is_kill() && v.evidence.silence_seconds >= min_silence && !v.incomplete;
        if v.incomplete {
            self.stats.incomplete += 1;
            self.path_mut(path, now).incomplete += 1;
        }
        {
            let p = self.path_mut(path, now);
            p.flows_ended += 1;
            p.by_ending[v.ending as usize] += 1;
            if v.premature {
                p.premature += 1;
            }
            if let (true, Some(l)) = (v.ending.is_kill(), v.evidence.location) {
                p.record_location(l);
            }
            if counts_for_estimate {
                p.record_kill(Kill {
                    silence_s: v.evidence.silence_seconds,
                    ending: v.ending,
                    at_ns: now,
                });
                if v.evidence.signals.contains(&Signal::KeepaliveProbe) {
                    p.record_probe(Probe {
                        silence_seconds: v.evidence.silence_seconds,
                        survived: false,
                        at_ns: now,
                        client: v.client,
                    });
                }
            }
        }
        if v.premature {
            self.stats.premature += 1;
        }
        if v.ending.is_kill() {
            self.clients.entry(v.client.ip()).or_default().last_kill_ns = Some(now);
        }
        if counts_for_estimate && !path.upstream {
            // The device waited this long and got nothing: its heartbeat
            // effectively was the silence. This is what drags Exchange's mean down.
            if let Some(a) = self
                .window
                .push(v.evidence.silence_seconds, path, true, now)
            {
                out.push(Output::Alert(a));
            }
        }
        if self.recent.len() >= RECENT_VERDICTS {
            self.recent.pop_front();
        }
        self.recent.push_back(v.clone());
        out.push(Output::Verdict(v));
    }

    /// The heartbeat the recommendation must cover: the largest seen, or
    /// configured (`max_heartbeat`), whichever is larger.
    /// The idle timeout a killing path's middlebox needs: the heartbeat to
    /// cover plus [`CURE_MARGIN_SECONDS`].
    pub fn recommended_idle_timeout(&self) -> f64 {
        self.heartbeat_to_cover() + CURE_MARGIN_SECONDS
    }

    pub fn heartbeat_to_cover(&self) -> f64 {
        self.max_heartbeat_seen_s
            .max(self.cfg.max_heartbeat.as_secs_f64())
    }

    pub fn middleboxes(&self) -> &[middlebox::Middlebox] {
        &self.table
    }
}

#[cfg(test)]
mod tests;
