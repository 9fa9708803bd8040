//! The diagnosis: which paths kill, after how long, how, the likely device,
//! and what to set. Serialisable for `--json`, printable for people.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{middlebox, Detector, Ending, Estimate};

#[derive(Clone, Debug, Serialize)]
pub struct PathReport {
    pub path: String,
    pub flows_ended: u64,
    pub endings: BTreeMap<&'static str, u64>,
    pub kills: u64,
    pub premature_kills: u64,
    pub reconnect_churn: u64,
    /// Flows that ended with events lost (kept out of the estimate).
    pub incomplete_flows: u64,
    /// The kill class seen most on this path.
    pub how: Option<Ending>,
    pub estimate: Option<Estimate>,
    pub confidence: Option<&'static str>,
    pub longest_survived_seconds: f64,
    pub likely_devices: Vec<String>,
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

#[derive(Clone, Debug, Serialize)]
pub struct WindowReport {
    pub samples: usize,
    pub size: usize,
    pub mean_seconds: Option<f64>,
    pub threshold_seconds: f64,
    pub alerting: bool,
    pub alerts_raised: u64,
    pub culprits: Vec<(String, usize)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub flows_tracked: usize,
    pub endings: BTreeMap<&'static str, u64>,
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

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Detector {
    pub fn report(&self) -> Report {
        let cover = self.heartbeat_to_cover();
        let tol = self.cfg.device_match_tolerance;
        let mut killing = Vec::new();
        let mut quiet = Vec::new();
        let mut quiet_heartbeats = Vec::new();
        for (key, p) in &self.paths {
            let endings: BTreeMap<_, _> = Ending::ALL
                .iter()
                .filter(|e| p.by_ending[**e as usize] > 0)
                .map(|e| (e.label(), p.by_ending[*e as usize]))
                .collect();
            let how = Ending::KILLS
                .iter()
                .copied()
                .filter(|e| p.by_ending[*e as usize] > 0)
                .max_by_key(|e| p.by_ending[*e as usize]);
            let estimate = p.estimate();
            let likely_devices = match &estimate {
                Some(Estimate::Point { seconds, .. }) => {
                    middlebox::near(&self.table, *seconds, tol)
                }
                Some(Estimate::Bracket {
                    low_seconds,
                    high_seconds,
                    ..
                }) => middlebox::within(&self.table, *low_seconds, *high_seconds),
                None => Vec::new(),
            }
            .into_iter()
            .map(|m| {
                format!(
                    "{} ({} s default; {})",
                    m.name, m.idle_timeout_seconds, m.at_expiry
                )
            })
            .collect();
            let kills = p.kills_total();
            let r = PathReport {
                path: key.to_string(),
                flows_ended: p.flows_ended,
                endings,
                kills,
                premature_kills: p.premature,
                reconnect_churn: p.churn,
                incomplete_flows: p.incomplete,
                how,
                confidence: estimate.as_ref().map(|e| e.confidence()),
                estimate,
                longest_survived_seconds: p.longest_survived_s,
                likely_devices,
                recommended_idle_timeout_seconds: (p.premature > 0).then_some(cover + 120.0),
                median_heartbeat_seconds: p.median_heartbeat(),
                requested_heartbeat_seconds: p.median_requested_heartbeat(),
                pings_read: p.pings_read,
                kill_silence_histogram: p.kill_histogram(8),
            };
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
        let w = &self.window;
        Report {
            flows_tracked: self.flows.len(),
            endings: Ending::ALL
                .iter()
                .filter(|e| self.stats.endings[**e as usize] > 0)
                .map(|e| (e.label(), self.stats.endings[*e as usize]))
                .collect(),
            premature_kills: self.stats.premature,
            reconnect_churn: self.stats.churn,
            median_heartbeat_elsewhere_seconds: median(quiet_heartbeats),
            heartbeat_to_cover_seconds: cover,
            killing_paths: killing,
            quiet_paths: quiet,
            window: WindowReport {
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
            },
        }
    }
}

impl Report {
    /// The diagnosis in plain words.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let total: u64 = self.endings.values().sum();
        let _ = writeln!(
            s,
            "{} flows ended, {} killed prematurely by a middlebox; {} flows open now.",
            total, self.premature_kills, self.flows_tracked
        );
        if self.killing_paths.is_empty() {
            let _ = writeln!(s, "No path kills connections before the heartbeat.");
        }
        for p in &self.killing_paths {
            let _ = writeln!(s);
            let how = p.how.map_or("killed", |h| h.describe());
            let _ = writeln!(
                s,
                "PATH {}: {} of {} flows killed before the heartbeat: {}.",
                p.path, p.premature_kills, p.flows_ended, how
            );
            match &p.estimate {
                Some(Estimate::Point {
                    seconds,
                    spread_seconds,
                    samples,
                }) => {
                    let _ = writeln!(
                        s,
                        "  idle timeout: {seconds:.1} s (median of {samples} kills, spread {spread_seconds:.2} s; confidence {})",
                        p.confidence.unwrap_or("low")
                    );
                }
                Some(Estimate::Bracket {
                    low_seconds,
                    high_seconds,
                    samples,
                }) if *low_seconds > 0.0 => {
                    let _ = writeln!(
                        s,
                        "  idle timeout: between {low_seconds:.1} s (longest silence that survived) and {high_seconds:.1} s (shortest that was killed), from {samples} kills; confidence {}",
                        p.confidence.unwrap_or("low")
                    );
                }
                // No silence has survived here yet (or none below the kills):
                // only the upper bound is known.
                Some(Estimate::Bracket {
                    high_seconds,
                    samples,
                    ..
                }) => {
                    let _ = writeln!(
                        s,
                        "  idle timeout: at most {high_seconds:.1} s (shortest silence that was killed; no shorter silence has survived yet), from {samples} kills; confidence {}",
                        p.confidence.unwrap_or("low")
                    );
                }
                None => {}
            }
            if p.likely_devices.is_empty() {
                let _ = writeln!(
                    s,
                    "  likely device: no known default matches (a custom timeout, or a scaled lab)"
                );
            } else {
                let _ = writeln!(s, "  likely device: {}", p.likely_devices.join("; or "));
            }
            if let Some(r) = p.recommended_idle_timeout_seconds {
                let _ = writeln!(
                    s,
                    "  cure: set its idle timeout to at least {r:.0} s (heartbeat {:.0} s + 120 s)",
                    self.heartbeat_to_cover_seconds
                );
            }
            if let Some(h) = p.requested_heartbeat_seconds {
                let inferred = p
                    .median_heartbeat_seconds
                    .map_or("none seen".to_string(), |i| format!("{i:.0} s"));
                let _ = writeln!(
                    s,
                    "  heartbeat in force: {h:.0} s, read from {} Ping requests (exact; inferred from hold times: {inferred})",
                    p.pings_read
                );
            }
            if p.incomplete_flows > 0 {
                let _ = writeln!(
                    s,
                    "  {} flows ended with events lost (ring buffer full): not used for the estimate",
                    p.incomplete_flows
                );
            }
            if p.reconnect_churn > 0 {
                let _ = writeln!(
                    s,
                    "  reconnect churn: {} reconnections soon after a kill",
                    p.reconnect_churn
                );
            }
            // Where kills come at expiry, before any heartbeat answer, the
            // only answers seen are early ones (new mail): no heartbeat claim.
            let answers_get_through = p.how.is_some_and(|h| !h.kills_at_expiry());
            if let (Some(here), Some(elsewhere), true) = (
                p.median_heartbeat_seconds,
                self.median_heartbeat_elsewhere_seconds,
                answers_get_through,
            ) {
                if here < 0.9 * elsewhere {
                    let _ = writeln!(
                        s,
                        "  devices here use shorter heartbeats: median {here:.0} s vs {elsewhere:.0} s on healthy paths (backing off after kills)"
                    );
                }
            }
            if !p.kill_silence_histogram.is_empty() {
                let _ = writeln!(s, "  silences before kills:");
                let max = p
                    .kill_silence_histogram
                    .iter()
                    .map(|b| b.1)
                    .max()
                    .unwrap_or(1)
                    .max(1);
                let mut lo = 0.0;
                for (hi, n) in &p.kill_silence_histogram {
                    if *n > 0 {
                        let bar = "#".repeat((n * 30).div_ceil(max));
                        let _ = writeln!(s, "    {lo:>7.1}-{hi:<7.1}s {bar} {n}");
                    }
                    lo = *hi;
                }
            }
        }
        if !self.quiet_paths.is_empty() {
            let _ = writeln!(s);
            let _ = writeln!(s, "Paths without premature kills:");
            for p in &self.quiet_paths {
                let mut hb = p
                    .median_heartbeat_seconds
                    .map_or(String::from("no heartbeat seen"), |h| {
                        format!("median heartbeat {h:.0} s")
                    });
                if let Some(h) = p.requested_heartbeat_seconds {
                    hb = format!(
                        "heartbeat {h:.0} s read from {} Pings ({hb} inferred)",
                        p.pings_read
                    );
                }
                let _ = writeln!(
                    s,
                    "  {}: {} flows ended, longest silence survived {:.1} s, {hb}",
                    p.path, p.flows_ended, p.longest_survived_seconds
                );
            }
        }
        let w = &self.window;
        let _ = writeln!(s);
        let mean = w
            .mean_seconds
            .map_or("-".to_string(), |m| format!("{m:.0} s"));
        let _ = writeln!(
            s,
            "Exchange 3033/1040-style window: {}/{} samples, mean {mean}, threshold {:.0} s: {}",
            w.samples,
            w.size,
            w.threshold_seconds,
            if w.alerting { "ALERT" } else { "ok" }
        );
        if w.alerting && !w.culprits.is_empty() {
            let names: Vec<String> = w
                .culprits
                .iter()
                .map(|(p, n)| format!("{p} ({n} kills)"))
                .collect();
            let _ = writeln!(s, "  the mean is pulled down by: {}", names.join(", "));
        }
        s
    }
}
