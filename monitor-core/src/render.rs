//! Text rendering of query answers for people.

use std::fmt::Write as _;

use crate::{
    api::Status,
    detector::{
        path::Confidence,
        report::{PathReport, Report, WindowReport},
        Estimate,
    },
    flows::FlowList,
};

pub fn status(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "monitor {} up {:.0} s, ports {:?} (plaintext, Pings read: {:?}), gap threshold {} s",
        s.version, s.uptime_seconds, s.ports, s.plaintext_ports, s.gap_threshold_seconds
    );
    for a in &s.attachments {
        let _ = writeln!(o, "  {}: {}", a.interface, a.hooks());
    }
    for p in &s.programs {
        let n = p
            .verified_instructions
            .map_or("?".to_string(), |n| n.to_string());
        let _ = writeln!(o, "  program {}: {n} instructions verified", p.name);
    }
    let _ = writeln!(
        o,
        "flow table: {} of {} entries ({:.2}% full); {} flows followed on {} paths",
        s.flow_table_entries,
        s.flow_table_capacity,
        100.0 * s.flow_table_fill_ratio,
        s.flows_followed,
        s.paths
    );
    let _ = writeln!(
        o,
        "memory: followed flows {:.1} MiB, table snapshot {:.1} MiB",
        s.flows_followed_memory_bytes as f64 / 1048576.0,
        s.snapshot_memory_bytes as f64 / 1048576.0
    );
    let _ = writeln!(
        o,
        "events dropped (ring buffer full): {}; undecodable: {}",
        s.events_dropped, s.event_decode_errors
    );
    let counters: Vec<String> = s
        .kernel_counters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(o, "kernel counters: {}", counters.join(" "));
    if let Some(m) = &s.metrics_listen {
        let _ = writeln!(o, "metrics: http://{m}/metrics");
    }
    o
}

pub fn flows(list: &FlowList) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} of {} matching flows ({} in the table as of {:.1} s ago)",
        list.rows.len(),
        list.matching,
        list.flows_in_table,
        list.snapshot_age_seconds
    );
    let _ = writeln!(
        o,
        "{:<44} {:>9} {:>9} {:>12} {:>12} {:>9}  STATE",
        "CLIENT", "AGE_S", "SILENT_S", "BYTES_IN", "BYTES_OUT", "HB_S"
    );
    for r in &list.rows {
        let hb = r
            .heartbeat_seconds
            .map_or("-".to_string(), |h| format!("{h:.1}"));
        let _ = writeln!(
            o,
            "{:<44} {:>9.1} {:>9.1} {:>12} {:>12} {:>9}  {}{}",
            r.client,
            r.age_seconds,
            r.silence_seconds,
            r.bytes_in,
            r.bytes_out,
            hb,
            r.state,
            if r.midstream { " (midstream)" } else { "" }
        );
    }
    o
}

/// The diagnosis in plain words.
pub fn report(r: &Report) -> String {
    let mut s = String::new();
    let total: u64 = r.endings.values().sum();
    let _ = writeln!(
        s,
        "{} flows ended, {} killed prematurely by a middlebox; {} flows open now.",
        total, r.premature_kills, r.flows_tracked
    );
    if r.killing_paths.is_empty() {
        let _ = writeln!(s, "No path kills connections before the heartbeat.");
    }
    for p in &r.killing_paths {
        killing_path(&mut s, p, r);
    }
    for t in &r.local_proxy_timeouts {
        local_timeout(&mut s, t);
    }
    if let Some(c) = &r.held_requests_capped {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "HELD REQUESTS CAPPED: held requests end at {:.1} s for {} clients on {} though their Pings ask for at least {:.0} s: a proxy or server timeout, not the devices' heartbeat.",
            c.seconds,
            c.clients,
            c.paths.join(", "),
            c.asked_seconds
        );
    }
    quiet_paths(&mut s, &r.quiet_paths);
    window(&mut s, &r.window);
    if let Some(m) = &r.remedy {
        let _ = writeln!(s);
        s.push_str(&remedy(m));
    }
    s
}

/// The cure in force (`monitor remedy status`, and the report's section).
pub fn remedy(m: &crate::remedy::RemedyStatus) -> String {
    use crate::remedy::PathRemedyState as St;
    let mut s = String::new();
    if let Some(e) = &m.error {
        let _ = writeln!(s, "REMEDY: not running: {e}");
        return s;
    }
    if !m.enabled {
        let _ = writeln!(
            s,
            "REMEDY: off (set [remedy] keepalive = true to keep connections alive through boxes that forget idle flows)."
        );
        sounding(&mut s, m);
        return s;
    }
    let on = m
        .paths
        .iter()
        .filter(|p| matches!(p.state, St::On { .. }))
        .count();
    let _ = writeln!(s, "REMEDY: TCP keepalive in force on {on} path(s).");
    if let Some(e) = &m.sync_error {
        let _ = writeln!(s, "  the last sync failed (retried every 2 s): {e}");
    }
    for p in &m.paths {
        match p.state {
            St::On { keepalive: k, .. } => {
                let _ = writeln!(
                    s,
                    "  {}: keepalive idle {} s, probes {} s apart, {} unanswered end it; {} connection(s) covered; {} premature kill(s) since.",
                    p.path, k.idle_seconds, k.interval_seconds, k.count, p.sockets_covered, p.kills_while_remedied
                );
                if p.kills_while_remedied > 0 {
                    let _ = writeln!(s, "    STILL KILLING although remedied: the box's timeout may be shorter than estimated, or another box is on the path.");
                }
            }
            St::Lifted { .. } => {
                let _ = writeln!(
                    s,
                    "  {}: lifted after a quiet spell, to see whether the box was fixed; it returns if the path kills again.",
                    p.path
                );
            }
            St::NotRemediable { why } => {
                let _ = writeln!(s, "  {}: not remediable: {}.", p.path, why.describe());
            }
        }
    }
    for (name, v) in &m.counters {
        let _ = writeln!(s, "  kernel {name}: {v}");
    }
    sounding(&mut s, m);
    s
}

/// The sounding's part of the remedy status.
fn sounding(s: &mut String, m: &crate::remedy::RemedyStatus) {
    if !m.sounding_enabled {
        return;
    }
    let _ = writeln!(
        s,
        "SOUNDING: {} path(s) known only as a bracket; one connection at a time gets a keepalive probe at a silence inside it.",
        m.sounding.iter().filter(|p| !p.done).count()
    );
    for p in &m.sounding {
        let now = match (&p.active, p.done) {
            (_, true) => "done: the estimate is a point".to_string(),
            (Some(a), _) => format!(
                "probe at {} s of silence on {}'s connection (bracket ({:.1}, {:.1}])",
                a.keepalive.idle_seconds, a.client, a.low_seconds, a.high_seconds
            ),
            (None, _) => "waiting (the hourly budget, or a connection to probe)".to_string(),
        };
        let _ = writeln!(
            s,
            "  {}: {now}; {} probe(s) this hour, {} in all, {} without an outcome.",
            p.path, p.probes_last_hour, p.probes_total, p.abandoned
        );
    }
}

fn killing_path(s: &mut String, p: &PathReport, r: &Report) {
    let _ = writeln!(s);
    let how = p.how.map_or("killed", |h| h.describe());
    let _ = writeln!(
        s,
        "PATH {}: {} of {} flows killed before the heartbeat: {}.",
        p.path, p.premature_kills, p.flows_ended, how
    );
    if let Some(e) = &p.estimate {
        let confidence = p.confidence.unwrap_or(Confidence::Low);
        let _ = writeln!(
            s,
            "  idle timeout: {}; confidence {confidence}",
            estimate(e)
        );
    }
    let local = p.how.is_some_and(|h| h.is_local());
    if !local {
        likely_device(s, p);
    }
    if let Some(l) = p.box_location {
        let _ = writeln!(s, "  where: {}", l.describe());
    }
    if p.reset_bursts > 0 {
        let _ = writeln!(
            s,
            "  {} resets came in bursts of different sequence numbers: an injector guessing the window (a client's stack repeats its number)",
            p.reset_bursts
        );
    }
    if local {
        let _ = writeln!(
            s,
            "  cure: this host's proxy timeout, not a box on the path (below: LOCAL PROXY TIMEOUT)"
        );
    } else if let Some(t) = p.recommended_idle_timeout_seconds {
        let _ = writeln!(
            s,
            "  cure: set its idle timeout to at least {t:.0} s (heartbeat {:.0} s + {:.0} s)",
            r.heartbeat_to_cover_seconds,
            crate::detector::CURE_MARGIN_SECONDS
        );
        keepalive_cure(s, p);
    }
    path_heartbeats(s, p, r);
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
    histogram(s, &p.kill_silence_histogram);
}

/// This host's proxy gives up on its upstream at a steady silence: the
/// held requests it ended, and its own setting to change.
fn local_timeout(s: &mut String, t: &crate::detector::report::LocalTimeoutReport) {
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "LOCAL PROXY TIMEOUT: this host gives up on {} after {:.1} s of silence while the server owes the answer ({} give-ups, spread {:.2} s).",
        t.upstream, t.seconds, t.give_ups, t.spread_seconds
    );
    let ended: u64 = t.client_paths.iter().map(|(_, n)| n).sum();
    if ended > 0 {
        let paths: Vec<String> = t
            .client_paths
            .iter()
            .map(|(p, n)| format!("{p} ({n})"))
            .collect();
        let _ = writeln!(
            s,
            "  held requests end at {:.1} s on {}: this host's proxy timeout, not the devices' heartbeat",
            t.seconds,
            paths.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "  cure: let the proxy hold a Ping for at least {:.0} s:",
        t.recommended_timeout_seconds
    );
    for c in &t.cure {
        let _ = writeln!(s, "    {c}");
    }
}

/// A device only where the estimate pins one; else the defaults it fits.
fn likely_device(s: &mut String, p: &PathReport) {
    if !p.likely_devices.is_empty() {
        let _ = writeln!(s, "  likely device: {}", p.likely_devices.join("; or "));
    } else if !p.defaults_in_range.is_empty() {
        let n = p.defaults_in_range.len();
        let plural = if n == 1 { "" } else { "s" };
        let _ = writeln!(
            s,
            "  likely device: not pinned; a bracket this wide fits {n} known default{plural}: {}",
            p.defaults_in_range.join("; ")
        );
    } else {
        let _ = writeln!(
            s,
            "  likely device: no known default matches (a custom timeout, or a scaled lab)"
        );
    }
}

/// An estimate of the idle timeout, saying only what the evidence pins.
fn estimate(e: &Estimate) -> String {
    match e {
        Estimate::Point {
            seconds,
            spread_seconds,
            samples,
        } => format!(
            "{seconds:.1} s (median of {samples} kills, spread {spread_seconds:.2} s)"
        ),
        Estimate::Bracket {
            low_seconds,
            high_seconds,
            samples,
        } if *low_seconds > 0.0 => format!(
            "between {low_seconds:.1} s (longest silence that survived) and {high_seconds:.1} s (shortest that was killed), from {samples} kills"
        ),
        Estimate::Sounded {
            seconds,
            low_seconds,
            high_seconds,
            probes,
        } => {
            let shown: Vec<String> = probes
                .iter()
                .map(|p| {
                    let outcome = if p.survived { "answered" } else { "killed" };
                    format!("{:.1} s {outcome}", p.silence_seconds)
                })
                .collect();
            format!(
                "{seconds:.1} s, sounded: between {low_seconds:.1} s (survived) and {high_seconds:.1} s (killed); keepalive probes: {}",
                shown.join(", ")
            )
        }
        // No silence has survived below the kills: only the upper bound is known.
        Estimate::Bracket {
            high_seconds,
            samples,
            ..
        } => format!(
            "at most {high_seconds:.1} s (shortest silence that was killed; no shorter silence has survived yet), from {samples} kills"
        ),
    }
}

/// Where the box cannot be changed: the keepalive that keeps its state,
/// as each proxy spells it; or why keepalive would not help.
fn keepalive_cure(s: &mut String, p: &PathReport) {
    if let Some(k) = p.keepalive_cure {
        let (i, n, c) = (k.idle_seconds, k.interval_seconds, k.count);
        let port = p.path.rsplit_once(':').map_or("443", |(_, port)| port);
        let _ = writeln!(
            s,
            "  where it cannot be changed: TCP keepalive from the server's end of each connection (the ActiveSync server, or the reverse proxy that publishes it) keeps its state: idle {i} s, probes {n} s apart, {c} unanswered end it:"
        );
        let _ = writeln!(
            s,
            "    nginx: so_keepalive={i}s:{n}s:{c} on the listen directive of port {port}"
        );
        let _ = writeln!(
            s,
            "    HAProxy (2.2+): option clitcpka, clitcpka-idle {i}s, clitcpka-intvl {n}s, clitcpka-cnt {c}"
        );
        let _ = writeln!(
            s,
            "    a Linux server's own sockets: SO_KEEPALIVE with TCP_KEEPIDLE {i}, TCP_KEEPINTVL {n}, TCP_KEEPCNT {c}"
        );
    } else if p.how == Some(crate::detector::Ending::ProxyTimeout) {
        let _ = writeln!(
            s,
            "  TCP keepalive would not help: a proxy that terminates TCP answers it itself and still times out the request"
        );
    }
}

/// The heartbeat read from Pings, and devices backing off after kills.
fn path_heartbeats(s: &mut String, p: &PathReport, r: &Report) {
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
    // Where kills come at expiry, before any heartbeat answer, the only
    // answers seen are early ones (new mail): no heartbeat claim.
    let answers_get_through = p.how.is_some_and(|h| !h.kills_at_expiry());
    if let (Some(here), Some(elsewhere), true) = (
        p.median_heartbeat_seconds,
        r.median_heartbeat_elsewhere_seconds,
        answers_get_through,
    ) {
        if here < 0.9 * elsewhere {
            let _ = writeln!(
                s,
                "  devices here use shorter heartbeats: median {here:.0} s vs {elsewhere:.0} s on healthy paths (backing off after kills)"
            );
        }
    }
}

fn histogram(s: &mut String, bins: &[(f64, usize)]) {
    if bins.is_empty() {
        return;
    }
    let _ = writeln!(s, "  silences before kills:");
    let max = bins.iter().map(|b| b.1).max().unwrap_or(1).max(1);
    let mut lo = 0.0;
    for (hi, n) in bins {
        if *n > 0 {
            let bar = "#".repeat((n * 30).div_ceil(max));
            let _ = writeln!(s, "    {lo:>7.1}-{hi:<7.1}s {bar} {n}");
        }
        lo = *hi;
    }
}

fn quiet_paths(s: &mut String, paths: &[PathReport]) {
    if paths.is_empty() {
        return;
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Paths without premature kills:");
    for p in paths {
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

fn window(s: &mut String, w: &WindowReport) {
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
}

impl Report {
    /// The diagnosis in plain words (see [`report`]).
    pub fn to_text(&self) -> String {
        report(self)
    }
}

impl crate::analyze::CaptureStats {
    /// One paragraph on what was read and what was not.
    pub fn summary(&self) -> String {
        let span = match (self.first_seconds, self.last_seconds) {
            (Some(a), Some(b)) => format!("{:.1} s", b - a),
            _ => "no time".into(),
        };
        let mut s = format!(
            "capture: {} packets over {span}; {} tracked, {} not ours",
            self.packets, self.tracked, self.not_ours
        );
        if let Some(found) = &self.inferred_ports {
            let list: Vec<String> = found
                .iter()
                .map(|(p, n)| format!("{p} ({n} SYNs)"))
                .collect();
            s.push_str(&format!(
                "; server ports inferred from SYNs: {}",
                list.join(", ")
            ));
        }
        if self.cut_by_snaplen > 0 {
            s.push_str(&format!(
                ", {} cut by snaplen (headers whole, used)",
                self.cut_by_snaplen
            ));
        }
        if self.truncated > 0 {
            s.push_str(&format!(
                ", {} with headers cut short (skipped)",
                self.truncated
            ));
        }
        if self.malformed > 0 {
            s.push_str(&format!(", {} malformed (skipped)", self.malformed));
        }
        if self.duplicates > 0 {
            s.push_str(&format!(
                ", {} second copies of a packet (a mirror of both ports: counted once)",
                self.duplicates
            ));
        }
        if self.out_of_order > 0 {
            s.push_str(&format!(
                ", {} with timestamps going backwards (clamped: gaps near them are approximate)",
                self.out_of_order
            ));
        }
        for (link, n) in &self.unsupported_link {
            s.push_str(&format!(", {n} of unsupported link type {link} (skipped)"));
        }
        if self.flows_evicted > 0 {
            s.push_str(&format!(
                ", {} open flows evicted from the full flow table (vanished)",
                self.flows_evicted
            ));
        }
        if self.verdicts_not_listed > 0 {
            s.push_str(&format!(
                "; {} verdict(s) not listed (the report counts them)",
                self.verdicts_not_listed
            ));
        }
        if let Some(c) = &self.cut_at_end {
            s.push_str(&format!("; {}", c.describe()));
        }
        s
    }
}
