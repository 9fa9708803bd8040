//! Sounding (issue 16, item 2): a bracket (lo, hi] made a point. One
//! connection of the path gets TCP keepalive with an idle time `a` inside
//! the bracket. Its probe leaves this host at a silence of `a`: the client's
//! answer means the box kept the state that long (the low end rises, and
//! the probe refreshed the state); the box's reset, or no answer and the
//! device back on a new connection, means it forgot by then (the high end
//! falls). The detector reads the outcome from the packets like any other
//! silence (`detector::path::Probe`); this only chooses `a` and the
//! connection, bisecting until the bracket is under
//! [`SOUNDED_WIDTH`](crate::detector::path::SOUNDED_WIDTH) wide, at most
//! `probes_per_hour` probes per path.
//!
//! A probe that goes unanswered costs that connection (the box had already
//! forgotten it: the device would have lost it at its next answer anyway).

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
};

use serde::{Deserialize, Serialize};

use crate::detector::{
    keepalive::Keepalive,
    path::{PathKey, Probe, SOUNDED_WIDTH},
    report::Report,
    Estimate,
};

const NS: u64 = 1_000_000_000;
const HOUR_NS: u64 = 3600 * NS;

/// Probes a probe's connection gets before its server gives up on it: with
/// their interval, long enough that a device whose box dropped the probe
/// reconnects first (that reconnect is the black hole's proof).
const PROBE_COUNT: u32 = 8;

/// Connections of a path a probe is not put on again while others remain.
const TRIED_KEPT: usize = 16;

/// Linux's largest TCP_KEEPIDLE (and TCP_KEEPINTVL).
const MAX_KEEPALIVE_S: u32 = monitor_common::remedy::MAX_KEEPIDLE;

/// The probe age to try inside (lo, hi]: the whole second nearest its
/// middle (TCP_KEEPIDLE counts seconds). None once the bracket is narrower
/// than [`SOUNDED_WIDTH`], or where no whole second a second above `min_s`
/// (the shortest silence the detector counts: the silence a probe ends can
/// be a little shorter than its age) lies strictly inside it.
pub fn next_age(lo: f64, hi: f64, min_s: f64) -> Option<u32> {
    if !(lo >= 0.0 && hi - lo >= SOUNDED_WIDTH && hi.is_finite()) {
        return None;
    }
    let a = ((lo + hi) / 2.0).round().max(min_s.ceil() + 1.0);
    (a > lo && a < hi && a <= f64::from(MAX_KEEPALIVE_S)).then_some(a as u32)
}

/// What bounds a sounding: from the detector's configuration and report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub probes_per_hour: u32,
    /// Silences shorter than this are no evidence (`detector.min_silence`).
    pub min_silence_s: f64,
    /// How long after its device's wait a black hole is still proven by
    /// its reconnect (`detector.black_hole_after`).
    pub black_hole_after_s: f64,
}

/// The keepalive that puts one probe at `age` seconds of silence, and keeps
/// the connection `heartbeat_s + black_hole_after_s` after an unanswered one.
fn probe_keepalive(age: u32, heartbeat_s: f64, l: &Limits) -> Keepalive {
    let wait = (heartbeat_s + l.black_hole_after_s).max(1.0);
    let interval = (wait / f64::from(PROBE_COUNT))
        .ceil()
        .clamp(5.0, f64::from(MAX_KEEPALIVE_S));
    Keepalive {
        idle_seconds: age,
        interval_seconds: interval as u32,
        count: PROBE_COUNT,
    }
}

/// A probe in flight.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActiveProbe {
    /// The connection's socket cookie.
    pub cookie: u64,
    pub client: SocketAddr,
    pub keepalive: Keepalive,
    /// When it was set (agent clock).
    pub since_ns: u64,
    /// The path's bracket when it was set: any change is its outcome (or
    /// other evidence; the next probe starts from the new bracket).
    pub low_seconds: f64,
    pub high_seconds: f64,
    /// Listings that found its connection gone, and the last one counted.
    #[serde(skip)]
    pub gone: u8,
    #[serde(skip)]
    pub gone_listing: u64,
}

/// One path's sounding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathSounding {
    pub path: String,
    pub active: Option<ActiveProbe>,
    /// Probes set in the last hour (the budget).
    pub probes_last_hour: usize,
    /// Probes set since the agent started, and those abandoned (no
    /// outcome: the connection closed, or never fell silent that long).
    pub probes_total: u64,
    pub abandoned: u64,
    /// The path's estimate is a sounded point.
    pub done: bool,
    #[serde(skip)]
    started: VecDeque<u64>,
    #[serde(skip)]
    tried: VecDeque<SocketAddr>,
}

/// What a sync saw of the connections, for the sounding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidates {
    /// Per path being sounded, connections a probe could go on (socket
    /// cookie, client): answering, and not keeping their own keepalive.
    pub ready: BTreeMap<PathKey, Vec<(u64, SocketAddr)>>,
    /// The probes' connections still open (answering or not), not those
    /// whose application keeps its own keepalive (the probe never went on).
    pub probed_open: std::collections::BTreeSet<u64>,
    /// When the sockets were listed (agent clock; 0: never).
    pub listed_ns: u64,
}

/// Every path's sounding.
#[derive(Clone, Debug, Default)]
pub struct Sounder {
    paths: BTreeMap<PathKey, PathSounding>,
    /// Clients whose connections carried a probe (the remedy does not
    /// count their kills against itself).
    probed: VecDeque<SocketAddr>,
}

/// Clients remembered as probed.
const PROBED_KEPT: usize = 1024;

impl Sounder {
    /// Resolve, abandon or start probes from `report` at `now_ns`; `sound`:
    /// which paths may be sounded (the lists, the path's kind).
    pub fn update(
        &mut self,
        report: &Report,
        candidates: &Candidates,
        now_ns: u64,
        limits: &Limits,
        sound: impl Fn(&PathKey) -> bool,
    ) {
        let mut seen = std::collections::BTreeSet::new();
        for p in &report.killing_paths {
            let Ok(key) = p.path.parse::<PathKey>() else {
                continue;
            };
            if key.upstream || !sound(&key) {
                continue;
            }
            let Some(bracket) = p.estimate.as_ref().and_then(bracket) else {
                // A point (sounded, or kills at expiry): nothing to sound.
                if let Some(s) = self.paths.get_mut(&key) {
                    s.active = None;
                    s.done = true;
                    seen.insert(key);
                }
                continue;
            };
            seen.insert(key);
            let s = self.paths.entry(key).or_insert_with(|| PathSounding {
                path: p.path.clone(),
                ..PathSounding::default()
            });
            s.done = false;
            let live = candidates.ready.get(&key).map_or(&[][..], |v| &v[..]);
            let deadline = (report.heartbeat_to_cover_seconds + limits.black_hole_after_s) as u64;
            s.settle(bracket, &p.recent_probes, candidates, now_ns, deadline * NS);
            while s
                .started
                .front()
                .is_some_and(|t| now_ns.saturating_sub(*t) >= HOUR_NS)
            {
                s.started.pop_front();
            }
            s.probes_last_hour = s.started.len();
            if s.active.is_some() || s.started.len() >= limits.probes_per_hour as usize {
                continue;
            }
            let Some(age) = next_age(bracket.0, bracket.1, limits.min_silence_s) else {
                continue;
            };
            let Some((cookie, client)) = s.pick(live) else {
                continue;
            };
            let keepalive = probe_keepalive(age, report.heartbeat_to_cover_seconds, limits);
            s.start(ActiveProbe {
                cookie,
                client,
                keepalive,
                since_ns: now_ns,
                low_seconds: bracket.0,
                high_seconds: bracket.1,
                gone: 0,
                gone_listing: 0,
            });
            if self.probed.len() >= PROBED_KEPT {
                self.probed.pop_front();
            }
            self.probed.push_back(client);
        }
        self.paths.retain(|k, _| seen.contains(k));
    }

    /// The probes to set: socket cookie and its keepalive.
    pub fn probes(&self) -> Vec<(u64, Keepalive)> {
        self.paths
            .values()
            .filter_map(|s| s.active.map(|a| (a.cookie, a.keepalive)))
            .collect()
    }

    /// Paths that want a connection to probe.
    pub fn wanting(&self) -> impl Iterator<Item = &PathKey> {
        self.paths.iter().filter(|(_, s)| !s.done).map(|(k, _)| k)
    }

    /// Did a probe go on a connection of `client`?
    pub fn probed(&self, client: SocketAddr) -> bool {
        self.probed.contains(&client)
    }

    pub fn status(&self) -> Vec<PathSounding> {
        self.paths.values().cloned().collect()
    }
}

/// A bracket still to sound: (low, high).
fn bracket(e: &Estimate) -> Option<(f64, f64)> {
    match e {
        Estimate::Bracket {
            low_seconds,
            high_seconds,
            ..
        } => Some((*low_seconds, *high_seconds)),
        _ => None,
    }
}

impl PathSounding {
    /// The active probe's outcome: its connection's probe is among the
    /// path's latest, or the bracket moved (resolved); else its connection
    /// closed (missing from two listings made after it was set: its
    /// reset's verdict is in the report by then) or it waited past
    /// `deadline_ns` after its age (abandoned: the device never fell
    /// silent that long, or never came back).
    fn settle(
        &mut self,
        bracket: (f64, f64),
        probes: &[Probe],
        listed: &Candidates,
        now: u64,
        deadline_ns: u64,
    ) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let moved =
            (bracket.0 - a.low_seconds).abs() > 1e-6 || (bracket.1 - a.high_seconds).abs() > 1e-6;
        // Both clocks are CLOCK_MONOTONIC (the kernel's and the agent's).
        let answered = probes
            .iter()
            .any(|p| p.client == a.client && p.at_ns >= a.since_ns);
        if moved || answered {
            self.active = None;
            return;
        }
        let fresh = listed.listed_ns > a.since_ns && listed.listed_ns != a.gone_listing;
        if fresh && !listed.probed_open.contains(&a.cookie) {
            a.gone = a.gone.saturating_add(1);
            a.gone_listing = listed.listed_ns;
        }
        let idle_ns = u64::from(a.keepalive.idle_seconds) * NS;
        if a.gone >= 2 || now.saturating_sub(a.since_ns) > idle_ns + deadline_ns {
            self.active = None;
            self.abandoned += 1;
        }
    }

    /// A connection not tried lately, else the one tried longest ago.
    fn pick(&mut self, live: &[(u64, SocketAddr)]) -> Option<(u64, SocketAddr)> {
        let fresh = live.iter().find(|(_, c)| !self.tried.contains(c));
        let chosen = fresh.or_else(|| {
            self.tried
                .iter()
                .find_map(|t| live.iter().find(|(_, c)| c == t))
        })?;
        self.tried.retain(|c| *c != chosen.1);
        if self.tried.len() >= TRIED_KEPT {
            self.tried.pop_front();
        }
        self.tried.push_back(chosen.1);
        Some(*chosen)
    }

    fn start(&mut self, a: ActiveProbe) {
        self.started.push_back(a.since_ns);
        self.probes_last_hour = self.started.len();
        self.probes_total += 1;
        self.active = Some(a);
    }
}

#[cfg(test)]
mod tests;
