//! The diagnosis: which paths kill, after how long, how, the likely device,
//! and what to set. Serialisable for `--json`, printable for people.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    middlebox,
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
        }
    }

    fn path_report(&self, key: &PathKey, p: &PathStats) -> PathReport {
        let estimate = p.estimate();
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
            how: Ending::KILLS
                .iter()
                .copied()
                .filter(|e| p.by_ending[*e as usize] > 0)
                .max_by_key(|e| p.by_ending[*e as usize]),
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
            Some(Estimate::Bracket {
                low_seconds,
                high_seconds,
                ..
            }) if *low_seconds > 0.0 => {
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

fn describe(m: &middlebox::Middlebox) -> String {
    format!(
        "{} ({} s default; {})",
        m.name, m.idle_timeout_seconds, m.at_expiry
    )
}
