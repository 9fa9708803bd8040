//! The cure, decided (issue 16): which paths get TCP keepalive from this
//! host's end of their connections, with which settings, and how it went.
//! Pure: the agent feeds it reports and verdicts, applies what it says
//! (`monitor::remedy`), and tells it how many sockets each path covers.
//!
//! A path is remedied when its diagnosis names a box that forgets idle
//! flows with a timeout known to be safe above the floor (the report's
//! `keepalive_cure`), and the allow and deny lists let it. While remedied,
//! its kills stop (that is the point), so the diagnosis cannot say when
//! the box was fixed: after `retest_after_seconds` without a kill the
//! remedy is lifted, and it comes back only if the path kills again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::detector::{
    keepalive::Keepalive, path::PathKey, report::Report, DetectorConfig, Ending, Verdict,
};

pub mod sound;

use sound::{Candidates, Limits, PathSounding, Sounder};

/// `[remedy]` in the configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemedyConfig {
    /// Give the sockets of paths whose box forgets idle flows TCP keepalive.
    pub keepalive: bool,
    /// Only paths inside these prefixes (none: every path).
    pub allow: Vec<ipnet::IpNet>,
    /// Never paths inside these prefixes (wins over `allow`).
    pub deny: Vec<ipnet::IpNet>,
    /// Never a keepalive idle time under this (seconds).
    pub floor_seconds: f64,
    /// Most sockets changed per second (existing connections).
    pub sockets_per_second: u32,
    /// A remedied path with no kill for this long is lifted, to see
    /// whether its box was fixed (seconds).
    pub retest_after_seconds: u64,
    /// The cgroup v2 root the sock_ops program attaches to (default: the
    /// first cgroup2 mount; in a container, the host's, mounted in).
    pub cgroup: Option<std::path::PathBuf>,
    /// Sound the timeout of paths known only as a bracket: one connection
    /// at a time gets a keepalive probe at a chosen silence inside it.
    pub sound: bool,
    /// Most probes per path per hour (each unanswered one costs its
    /// connection, already forgotten by the box).
    pub probes_per_hour: u32,
}

impl Default for RemedyConfig {
    fn default() -> Self {
        RemedyConfig {
            keepalive: false,
            allow: Vec::new(),
            deny: Vec::new(),
            floor_seconds: crate::detector::keepalive::FLOOR_SECONDS,
            sockets_per_second: 200,
            retest_after_seconds: 86_400,
            cgroup: None,
            sound: false,
            probes_per_hour: 4,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RemedyConfigError {
    #[error("floor_seconds: must be between 1 and 7200, got {0}")]
    Floor(f64),
    #[error("sockets_per_second: must be between 1 and 100000, got {0}")]
    Rate(u32),
    #[error("retest_after_seconds: must be at least 60, got {0}")]
    Retest(u64),
    #[error("probes_per_hour: must be between 1 and 60, got {0}")]
    ProbesPerHour(u32),
}

impl RemedyConfig {
    pub fn validate(&self) -> Result<(), RemedyConfigError> {
        if !(1.0..=7200.0).contains(&self.floor_seconds) {
            return Err(RemedyConfigError::Floor(self.floor_seconds));
        }
        if !(1..=100_000).contains(&self.sockets_per_second) {
            return Err(RemedyConfigError::Rate(self.sockets_per_second));
        }
        if self.retest_after_seconds < 60 {
            return Err(RemedyConfigError::Retest(self.retest_after_seconds));
        }
        if !(1..=60).contains(&self.probes_per_hour) {
            return Err(RemedyConfigError::ProbesPerHour(self.probes_per_hour));
        }
        Ok(())
    }

    /// Whether the remedy's programs run: for keepalive, or sounding alone.
    pub fn runs(&self) -> bool {
        self.keepalive || self.sound
    }

    /// Whether the lists let `path` be remedied.
    pub fn permits(&self, path: &PathKey) -> bool {
        let net = path.network();
        let inside = |n: &ipnet::IpNet| n.contains(&net) && n.prefix_len() <= path.prefix;
        !self.deny.iter().any(inside) && (self.allow.is_empty() || self.allow.iter().any(inside))
    }
}

/// Why a killing path gets no keepalive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotRemediable {
    /// A proxy's timeout: it answers the probes itself and still times
    /// out the request.
    ProxyTimeout,
    /// An upstream leg: the proxy's own connection, not a device's.
    UpstreamLeg,
    /// No timeout known to be safe above the floor (a bracket open below,
    /// or a box faster than the floor allows).
    NoSafeTimeout,
    /// The allow or deny list.
    Excluded,
}

impl NotRemediable {
    pub fn describe(self) -> &'static str {
        match self {
            NotRemediable::ProxyTimeout => {
                "a proxy times out the request: TCP keepalive would not help"
            }
            NotRemediable::UpstreamLeg => "an upstream leg: set the proxy's own keepalive",
            NotRemediable::NoSafeTimeout => {
                "no timeout known to be safe above the floor (remedy.floor_seconds)"
            }
            NotRemediable::Excluded => "excluded by remedy.allow or remedy.deny",
        }
    }
}

/// Where a path's remedy stands.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PathRemedyState {
    /// Keepalive in force since `since_ns` (agent clock).
    On {
        keepalive: Keepalive,
        since_ns: u64,
    },
    /// Lifted after a quiet spell; back if kills pass `premature_at_lift`.
    Lifted {
        premature_at_lift: u64,
    },
    NotRemediable {
        why: NotRemediable,
    },
}

/// One path's remedy and its effect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathRemedy {
    pub path: String,
    #[serde(flatten)]
    pub state: PathRemedyState,
    /// Connections with the keepalive in force (the last sweep's count).
    pub sockets_covered: u64,
    /// Premature kills whose silence began after the remedy covered the
    /// path's connections (a sync with none left to change): a remedy that
    /// does not work. Counted over the path's whole life.
    pub kills_while_remedied: u64,
    /// When a sync first found every connection of the path covered, since
    /// it was last switched on (agent clock).
    pub covered_since_ns: Option<u64>,
    /// Premature kills on the path when it was last remedied or lifted.
    #[serde(skip)]
    premature_seen: u64,
    #[serde(skip)]
    last_kill_ns: u64,
    /// Premature kills of connections the sounding probed: its own, on
    /// purpose, never the remedy's failure nor a reason to retest later.
    #[serde(skip)]
    sounding_kills: u64,
}

/// What `monitor remedy status` shows, and the report's section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RemedyStatus {
    pub enabled: bool,
    pub paths: Vec<PathRemedy>,
    /// The kernel's counts (new connections covered, sweeps, failures).
    pub counters: BTreeMap<String, u64>,
    /// Why the remedy is not running, where it failed to start.
    pub error: Option<String>,
    /// The last sync's failure, while the remedy runs (cleared by the next
    /// sync that works).
    #[serde(default)]
    pub sync_error: Option<String>,
    /// `remedy.sound`, and the paths being sounded.
    #[serde(default)]
    pub sounding_enabled: bool,
    #[serde(default)]
    pub sounding: Vec<PathSounding>,
}

/// The remedy's state machine over the agent's reports.
#[derive(Clone, Debug, Default)]
pub struct Remedy {
    cfg: RemedyConfig,
    paths: BTreeMap<PathKey, PathRemedy>,
    sounder: Sounder,
    limits: Limits,
    /// Connections a probe could go on, from the last sync.
    candidates: Candidates,
}

impl Remedy {
    pub fn new(cfg: RemedyConfig) -> Remedy {
        let limits = Limits {
            probes_per_hour: cfg.probes_per_hour,
            min_silence_s: 0.0,
            black_hole_after_s: 0.0,
        };
        Remedy {
            cfg,
            paths: BTreeMap::new(),
            sounder: Sounder::default(),
            limits,
            candidates: Candidates::default(),
        }
        .with_detector(&DetectorConfig::default())
    }

    /// What the sounding needs of the detector's settings: the shortest
    /// silence it counts, and how long a black hole waits for its proof.
    pub fn with_detector(mut self, d: &DetectorConfig) -> Remedy {
        self.limits.min_silence_s = d.min_silence.as_secs_f64();
        self.limits.black_hole_after_s = d.black_hole_after.as_secs_f64();
        self
    }

    pub fn config(&self) -> &RemedyConfig {
        &self.cfg
    }

    /// Bring each path's remedy up to date with `report` at `now_ns`.
    pub fn update(&mut self, report: &Report, now_ns: u64) {
        let retest_ns = self.cfg.retest_after_seconds.saturating_mul(1_000_000_000);
        let mut seen = std::collections::BTreeSet::new();
        // Sounding alone: no path's connections get keepalive.
        let paths = if self.cfg.keepalive {
            &report.killing_paths[..]
        } else {
            &[]
        };
        for p in paths {
            let Ok(key) = p.path.parse::<PathKey>() else {
                continue;
            };
            seen.insert(key);
            let decided = self.decide(&key, p);
            let entry = self.paths.entry(key).or_insert_with(|| PathRemedy {
                path: p.path.clone(),
                state: PathRemedyState::NotRemediable {
                    why: NotRemediable::NoSafeTimeout,
                },
                sockets_covered: 0,
                kills_while_remedied: 0,
                covered_since_ns: None,
                premature_seen: 0,
                last_kill_ns: now_ns,
                sounding_kills: 0,
            });
            let premature = p.premature_kills.saturating_sub(entry.sounding_kills);
            if premature > entry.premature_seen {
                entry.last_kill_ns = now_ns;
            }
            entry.state = next_state(entry, decided, premature, now_ns, retest_ns);
            if !matches!(entry.state, PathRemedyState::On { .. }) {
                entry.covered_since_ns = None;
            }
            if !matches!(entry.state, PathRemedyState::Lifted { .. }) {
                entry.premature_seen = premature;
            }
        }
        // A path the detector forgot is healthy: nothing to keep in force.
        self.paths.retain(|k, _| seen.contains(k));
        if self.cfg.sound {
            let cfg = &self.cfg;
            self.sounder
                .update(report, &self.candidates, now_ns, &self.limits, |k| {
                    cfg.permits(k)
                });
        }
    }

    /// The probes to set: socket cookie and keepalive (over the path's).
    pub fn probes(&self) -> Vec<(u64, Keepalive)> {
        self.sounder.probes()
    }

    /// Paths that want a connection to probe.
    pub fn sounding_paths(&self) -> Vec<PathKey> {
        self.sounder.wanting().copied().collect()
    }

    /// The connections a probe could go on, from a sync.
    pub fn set_candidates(&mut self, candidates: Candidates) {
        self.candidates = candidates;
    }

    /// What the diagnosis of `p` allows.
    fn decide(
        &self,
        key: &PathKey,
        p: &crate::detector::report::PathReport,
    ) -> Result<Keepalive, NotRemediable> {
        if key.upstream {
            return Err(NotRemediable::UpstreamLeg);
        }
        if matches!(
            p.how,
            Some(Ending::ProxyTimeout | Ending::LocalProxyTimeout | Ending::UpstreamTimeout)
        ) {
            return Err(NotRemediable::ProxyTimeout);
        }
        if !self.cfg.permits(key) {
            return Err(NotRemediable::Excluded);
        }
        p.keepalive_cure.ok_or(NotRemediable::NoSafeTimeout)
    }

    /// A verdict: a premature kill on a remedied path, of a silence that
    /// began after a sync covered the path's connections, is one the
    /// remedy failed to stop.
    pub fn observe(&mut self, v: &Verdict) {
        if !(v.premature && v.ending.is_kill()) {
            return;
        }
        let Ok(key) = v.path.parse::<PathKey>() else {
            return;
        };
        let Some(p) = self.paths.get_mut(&key) else {
            return;
        };
        // A probe's kill is the sounding's, on purpose.
        if self.sounder.probed(v.client) {
            p.sounding_kills += 1;
            return;
        }
        let silence_ns = (v.evidence.silence_seconds.max(0.0) * 1e9) as u64;
        if let (PathRemedyState::On { .. }, Some(since)) = (p.state, p.covered_since_ns) {
            if v.at_ns.saturating_sub(silence_ns) >= since {
                p.kills_while_remedied += 1;
            }
        }
    }

    /// The paths to give keepalive, and with what.
    pub fn in_force(&self) -> Vec<(PathKey, Keepalive)> {
        self.paths
            .iter()
            .filter_map(|(k, p)| match p.state {
                PathRemedyState::On { keepalive, .. } => Some((*k, keepalive)),
                _ => None,
            })
            .collect()
    }

    /// A sync ended at `now_ns`; `complete`: it left no connection to
    /// change (the rate bound deferred none). Paths on since before it are
    /// covered from then.
    pub fn synced(&mut self, now_ns: u64, complete: bool) {
        if !complete {
            return;
        }
        for p in self.paths.values_mut() {
            if matches!(p.state, PathRemedyState::On { .. }) && p.covered_since_ns.is_none() {
                p.covered_since_ns = Some(now_ns);
            }
        }
    }

    /// How many connections each path's keepalive covers now.
    pub fn set_coverage(&mut self, covered: &BTreeMap<PathKey, u64>) {
        for (k, p) in &mut self.paths {
            p.sockets_covered = covered.get(k).copied().unwrap_or(0);
        }
    }

    pub fn status(&self) -> RemedyStatus {
        RemedyStatus {
            enabled: self.cfg.keepalive,
            paths: self.paths.values().cloned().collect(),
            counters: BTreeMap::new(),
            error: None,
            sync_error: None,
            sounding_enabled: self.cfg.sound,
            sounding: self.sounder.status(),
        }
    }
}

/// A path's next state: on while the diagnosis allows it; lifted after a
/// quiet `retest_ns`; back on when the path kills again after a lift.
fn next_state(
    p: &PathRemedy,
    decided: Result<Keepalive, NotRemediable>,
    premature: u64,
    now_ns: u64,
    retest_ns: u64,
) -> PathRemedyState {
    let keepalive = match decided {
        Err(why) => return PathRemedyState::NotRemediable { why },
        Ok(k) => k,
    };
    match p.state {
        PathRemedyState::On { .. } if now_ns.saturating_sub(p.last_kill_ns) >= retest_ns => {
            PathRemedyState::Lifted {
                premature_at_lift: premature,
            }
        }
        // A new estimate (sounding, more evidence) may move the idle time.
        PathRemedyState::On { since_ns, .. } => PathRemedyState::On {
            keepalive,
            since_ns,
        },
        PathRemedyState::Lifted { premature_at_lift } if premature <= premature_at_lift => p.state,
        _ => PathRemedyState::On {
            keepalive,
            since_ns: now_ns,
        },
    }
}

#[cfg(test)]
mod tests;
