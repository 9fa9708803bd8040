//! The diagnosis: which paths kill, after how long, how, the likely device,
//! and what to set. Serialisable for `--json`, printable for people.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    keepalive, middlebox,
    path::{median, Confidence, PathKey, PathStats},
    BoxLocation, Detector, Ending, Estimate,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathReport {
    pub path: String,
    pub flows_ended: u64,
    pub endings: BTreeMap<Ending, u64>,
    pub kills: u64,
    pub premature_kills: u64,
    pub reconnect_churn: u64,
    /// Flows that ended with events lost (kept out of the estimate).
    pub incomplete_flows: u64,
    /// The kill class seen most on this path.
    pub how: Option<Ending>,
    pub estimate: Option<Estimate>,
    pub confidence: Option<Confidence>,
    pub longest_survived_seconds: f64,
    /// Where the box sits, from its resets' TTL (reset kills only).
    pub box_location: Option<BoxLocation>,
    /// Flows whose reset came in a burst of different sequence numbers.
    #[serde(default)]
    pub reset_bursts: u64,
    /// Known defaults the estimate pins: a point near one, or a bracket
    /// closed on both sides that holds exactly one.
    pub likely_devices: Vec<String>,
    /// Where the estimate pins no device: the known defaults it still fits.
    pub defaults_in_range: Vec<String>,
    pub recommended_idle_timeout_seconds: Option<f64>,
    /// Inferred from hold times: median over clients of their estimate.
    pub median_heartbeat_seconds: Option<f64>,
    /// Read from Pings (plaintext ports): median over devices of the
    /// HeartbeatInterval of their latest Ping. Exact where present.
    pub requested_heartbeat_seconds: Option<f64>,
    pub pings_read: u64,
    /// (upper bound in seconds, kills) bins of the silences before kills.
    pub kill_silence_histogram: Vec<(f64, usize)>,
    /// Answers that were this host's proxy timing out (a proxy host with
    /// upstream legs followed): never heartbeat samples.
    #[serde(default)]
    pub proxy_timeout_answers: u64,
    /// Where the box cannot be changed: TCP keepalive from this host that
    /// keeps its state (kills a packet before its timer prevents, with a
    /// timeout known to be safe above the floor).
    #[serde(default)]
    pub keepalive_cure: Option<super::keepalive::Keepalive>,
    /// The path's latest keepalive probes with an outcome (sounding reads
    /// its own here), most recent last.
    #[serde(default)]
    pub recent_probes: Vec<super::path::Probe>,
}

/// Held requests that end at one value, below what the devices' Pings ask
/// for: a proxy or server timeout caps them, not the devices' heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldCap {
    /// Where their hold times end (the median of the clients' estimates).
    pub seconds: f64,
    /// Clients whose held requests end there though their Pings ask for more.
    pub clients: usize,
    /// The least their Pings asked for.
    pub asked_seconds: f64,
    /// The paths those clients are on.
    pub paths: Vec<String>,
}

/// Clients that must agree before a cap is named: one or two devices may
/// share a heartbeat by chance, a population does not.
pub const HOLD_CAP_MIN_CLIENTS: usize = 3;

/// This host's own proxy timeout, from its upstream legs (see
/// [`super::upstream`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalTimeoutReport {
    /// The upstream leg's path whose give-ups show it.
    pub upstream: String,
    /// The silence after which this host gives up (median of give-ups).
    pub seconds: f64,
    pub spread_seconds: f64,
    pub give_ups: usize,
    /// Client-facing paths whose requests its give-ups ended (answered
    /// with an error or closed at that moment), with how many.
    pub client_paths: Vec<(String, u64)>,
    /// The setting that holds the Ping for the heartbeat to cover.
    pub recommended_timeout_seconds: f64,
    /// Where to set it, per proxy.
    pub cure: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowReport {
    pub samples: usize,
    pub size: usize,
    pub mean_seconds: Option<f64>,
    pub threshold_seconds: f64,
    pub alerting: bool,
    pub alerts_raised: u64,
    pub culprits: Vec<(String, usize)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub flows_tracked: usize,
    pub endings: BTreeMap<Ending, u64>,
    pub premature_kills: u64,
    pub reconnect_churn: u64,
    /// Median over clients on paths that do not kill of their heartbeat
    /// estimate (what devices use when nothing interferes).
    pub median_heartbeat_elsewhere_seconds: Option<f64>,
    pub heartbeat_to_cover_seconds: f64,
    pub killing_paths: Vec<PathReport>,
    pub quiet_paths: Vec<PathReport>,
    pub window: WindowReport,
    /// This host's own proxy timeouts (a proxy host following upstream legs).
    #[serde(default)]
    pub local_proxy_timeouts: Vec<LocalTimeoutReport>,
    /// Held requests capped below the heartbeat the Pings ask for.
    #[serde(default)]
    pub held_requests_capped: Option<HoldCap>,
    /// The cure in force, where the agent applies it (`[remedy]`); the
    /// detector leaves it empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remedy: Option<crate::remedy::RemedyStatus>,
}

impl Detector {
    pub fn report(&self) -> Report {
        let mut killing = Vec::new();
        let mut quiet = Vec::new();
        let mut quiet_heartbeats = Vec::new();
        for (key, p) in &self.paths {
            let r = self.path_report(key, p);
            if p.premature > 0 {
                killing.push(r);
            } else {
                quiet_heartbeats.extend(p.latest_by_client.values().copied());
                quiet.push(r);
            }
        }
        killing.sort_by(|a, b| {
            b.premature_kills
                .cmp(&a.premature_kills)
                .then(a.path.cmp(&b.path))
        });
        quiet.sort_by(|a, b| b.flows_ended.cmp(&a.flows_ended).then(a.path.cmp(&b.path)));
        Report {
            flows_tracked: self.flows.len(),
            endings: Ending::ALL
                .iter()
                .filter(|e| self.stats.endings[**e as usize] > 0)
                .map(|e| (*e, self.stats.endings[*e as usize]))
                .collect(),
            premature_kills: self.stats.premature,
            reconnect_churn: self.stats.churn,
            median_heartbeat_elsewhere_seconds: (!quiet_heartbeats.is_empty())
                .then(|| median(&mut quiet_heartbeats)),
            heartbeat_to_cover_seconds: self.heartbeat_to_cover(),
            killing_paths: killing,
            quiet_paths: quiet,
            window: self.window_report(),
            local_proxy_timeouts: self.local_timeouts(),
            held_requests_capped: self.hold_cap(),
            remedy: None,
        }
    }

    /// Clients whose held requests end below what their Pings ask for
    /// (plaintext ports): where most of them end at one value (within 2 %),
    /// that value caps the holds. Evidence: the Ping's stated interval
    /// against the hold times the server (or a proxy) kept. Fails where a
    /// device states one interval and ends its Pings sooner itself (none
    /// known), and where Pings are unreadable (TLS): then nothing is said.
    fn hold_cap(&self) -> Option<HoldCap> {
        let capped: Vec<(std::net::IpAddr, f64, f64)> = self
            .clients
            .iter()
            .filter_map(|(ip, c)| {
                let (held, asked) = (c.heartbeat_s?, c.asked_s?);
                (held * (1.0 + super::SAME_HEARTBEAT) < asked).then_some((*ip, held, asked))
            })
            .collect();
        let near = |a: f64, b: f64| (a - b).abs() <= super::SAME_HEARTBEAT * a.max(b);
        let (v, _) = capped
            .iter()
            .map(|(_, h, _)| (*h, capped.iter().filter(|(_, o, _)| near(*h, *o)).count()))
            .fold(None, |best: Option<(f64, usize)>, (h, n)| match best {
                Some((_, m)) if m >= n => best,
                _ => Some((h, n)),
            })
            .filter(|(_, n)| *n >= HOLD_CAP_MIN_CLIENTS)?;
        let at: Vec<&(std::net::IpAddr, f64, f64)> =
            capped.iter().filter(|(_, h, _)| near(v, *h)).collect();
        let mut held: Vec<f64> = at.iter().map(|c| c.1).collect();
        let mut paths: Vec<String> = self
            .paths
            .iter()
            .filter(|(_, p)| at.iter().any(|c| p.latest_by_client.contains_key(&c.0)))
            .map(|(k, _)| k.to_string())
            .collect();
        paths.sort();
        Some(HoldCap {
            seconds: median(&mut held),
            clients: at.len(),
            asked_seconds: at.iter().map(|c| c.2).fold(f64::INFINITY, f64::min),
            paths,
        })
    }

    /// Upstream legs this host gave up on at a steady silence: its proxy's
    /// timeout, with the client-facing requests it ended.
    fn local_timeouts(&self) -> Vec<LocalTimeoutReport> {
        let recommended = self.recommended_idle_timeout();
        let mut out: Vec<LocalTimeoutReport> = self
            .paths
            .iter()
            .filter(|(k, p)| k.upstream && p.by_ending[Ending::UpstreamTimeout as usize] > 0)
            .filter_map(|(k, p)| match p.estimate()? {
                Estimate::Point {
                    seconds,
                    spread_seconds,
                    samples: _,
                } => Some(LocalTimeoutReport {
                    upstream: k.to_string(),
                    seconds,
                    spread_seconds,
                    give_ups: p.by_ending[Ending::UpstreamTimeout as usize] as usize,
                    client_paths: p
                        .answered_paths
                        .iter()
                        .map(|(c, n)| (c.to_string(), *n))
                        .collect(),
                    recommended_timeout_seconds: recommended,
                    cure: proxy_cure(recommended),
                }),
                Estimate::Bracket { .. } | Estimate::Sounded { .. } => None,
            })
            .collect();
        out.sort_by(|a, b| a.upstream.cmp(&b.upstream));
        out
    }

    fn path_report(&self, key: &PathKey, p: &PathStats) -> PathReport {
        let estimate = p.estimate();
        let how = Ending::KILLS
            .iter()
            .copied()
            .filter(|e| p.by_ending[*e as usize] > 0)
            .max_by_key(|e| p.by_ending[*e as usize]);
        // Not on an upstream leg (its keepalive is the proxy's toward the
        // server, spelled otherwise). Never over the shortest kill of any
        // kind: a path may mix boxes, and a point is a median.
        let keepalive_cure = estimate
            .as_ref()
            .filter(|_| !key.upstream && p.premature > 0)
            .filter(|_| how.is_some_and(keepalive::remediable))
            .and_then(keepalive::safe_timeout)
            .map(|t| p.shortest_kill_silence().map_or(t, |k| t.min(k)))
            .and_then(|t| keepalive::keepalive_for(t, self.cfg.keepalive_floor_seconds));
        PathReport {
            path: key.to_string(),
            flows_ended: p.flows_ended,
            endings: Ending::ALL
                .iter()
                .filter(|e| p.by_ending[**e as usize] > 0)
                .map(|e| (*e, p.by_ending[*e as usize]))
                .collect(),
            kills: p.kills_total(),
            premature_kills: p.premature,
            reconnect_churn: p.churn,
            incomplete_flows: p.incomplete,
            how,
            confidence: estimate.as_ref().map(|e| e.confidence()),
            box_location: p.box_location(),
            reset_bursts: p.reset_bursts,
            likely_devices: self.likely_devices(estimate.as_ref()),
            defaults_in_range: self.defaults_in_range(estimate.as_ref()),
            estimate,
            longest_survived_seconds: p.longest_survived_s,
            recommended_idle_timeout_seconds: (p.premature > 0)
                .then(|| self.recommended_idle_timeout()),
            median_heartbeat_seconds: p.median_heartbeat(),
            requested_heartbeat_seconds: p.median_requested_heartbeat(),
            pings_read: p.pings_read,
            kill_silence_histogram: p.kill_histogram(8),
            proxy_timeout_answers: p.proxy_timeout_answers,
            keepalive_cure,
            recent_probes: p
                .probes
                .iter()
                .skip(p.probes.len().saturating_sub(super::path::PROBES_SHOWN))
                .copied()
                .collect(),
        }
    }

    /// Known middlebox defaults the estimate pins, in words: a point within
    /// tolerance of a default, or a bracket with a lower bound that holds
    /// one default and no other. A bracket open below (no silence has
    /// survived) pins nothing: its top is only the server's own answer time.
    fn likely_devices(&self, estimate: Option<&Estimate>) -> Vec<String> {
        let found = match estimate {
            Some(Estimate::Point { seconds, .. }) => {
                middlebox::near(&self.table, *seconds, self.cfg.device_match_tolerance)
            }
            Some(
                Estimate::Bracket {
                    low_seconds,
                    high_seconds,
                    ..
                }
                | Estimate::Sounded {
                    low_seconds,
                    high_seconds,
                    ..
                },
            ) if *low_seconds > 0.0 => {
                let inside = middlebox::within(&self.table, *low_seconds, *high_seconds);
                if inside.len() == 1 {
                    inside
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        };
        found.into_iter().map(describe).collect()
    }

    /// A bracket that pins no device: the known defaults it holds.
    fn defaults_in_range(&self, estimate: Option<&Estimate>) -> Vec<String> {
        let Some(Estimate::Bracket {
            low_seconds,
            high_seconds,
            ..
        }) = estimate
        else {
            return Vec::new();
        };
        if !self.likely_devices(estimate).is_empty() {
            return Vec::new();
        }
        middlebox::within(&self.table, *low_seconds, *high_seconds)
            .into_iter()
            .map(describe)
            .collect()
    }

    fn window_report(&self) -> WindowReport {
        let w = &self.window;
        WindowReport {
            samples: w.len(),
            size: self.cfg.hbi_sample_size,
            mean_seconds: w.mean(),
            threshold_seconds: self.cfg.hbi_alert_threshold.as_secs_f64(),
            alerting: w.alerting(),
            alerts_raised: w.alerts_raised,
            culprits: w
                .culprits()
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect(),
        }
    }
}

/// The proxies' own settings that end a held request, at `seconds`
/// (their documentation: nginx ngx_http_proxy_module, HAProxy's
/// configuration manual, Apache mod_proxy).
pub fn proxy_cure(seconds: f64) -> Vec<String> {
    let t = seconds.ceil();
    vec![
        format!("nginx: proxy_read_timeout {t:.0}s; (default 60 s) in the location that proxies /Microsoft-Server-ActiveSync"),
        format!("HAProxy: timeout server {t:.0}s (HTTP mode; the backend of ActiveSync), and timeout client at least as long"),
        format!("Apache httpd: ProxyTimeout {t:.0} (default: Timeout, 60 s), or timeout={t:.0} on the ProxyPass"),
    ]
}

fn describe(m: &middlebox::Middlebox) -> String {
    format!(
        "{} ({} s default; {})",
        m.name, m.idle_timeout_seconds, m.at_expiry
    )
}
