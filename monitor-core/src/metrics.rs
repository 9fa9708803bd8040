//! Prometheus metrics. Labels come from fixed sets (ending, family) plus a
//! `path` label for at most `top_paths` killing paths (the rest are "other");
//! a path that stops killing for an hour loses its series. Client addresses
//! appear only if the operator opts in, under the same bound.

use std::{collections::HashMap, net::IpAddr};

use monitor_common::Counter;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::{
    counters::KernelCounters,
    detector::{Detector, Ending, Output, PathKey, Verdict},
    pipeline,
};

const NS: &str = "activesync_monitor";
/// A labelled path or client with no kill for this long loses its series.
const LABEL_RETENTION_NS: u64 = 3600 * 1_000_000_000;
/// Buckets resolving 1 s (scaled labs) through 60 s .. 3600 s (real heartbeats and timeouts).
pub const SILENCE_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 240.0, 300.0, 350.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
pub const OTHER: &str = "other";

/// Which keys get their own label: at most `k`, first come while there is
/// room, released after an hour without a kill.
#[derive(Debug)]
struct Labeller<K> {
    k: usize,
    labelled: HashMap<K, u64>,
}

impl<K: std::hash::Hash + Eq + Copy> Labeller<K> {
    fn new(k: usize) -> Self {
        Labeller {
            k,
            labelled: HashMap::new(),
        }
    }

    /// Is `key` labelled (making room for it if possible)?
    fn label(&mut self, key: K, now: u64) -> bool {
        if let Some(t) = self.labelled.get_mut(&key) {
            *t = now;
            return true;
        }
        if self.labelled.len() < self.k {
            self.labelled.insert(key, now);
            return true;
        }
        false
    }

    /// Keys to release (their series are removed by the caller).
    fn expire(&mut self, now: u64) -> Vec<K> {
        let old: Vec<K> = self
            .labelled
            .iter()
            .filter(|(_, t)| now.saturating_sub(**t) >= LABEL_RETENTION_NS)
            .map(|(k, _)| *k)
            .collect();
        for k in &old {
            self.labelled.remove(k);
        }
        old
    }
}

pub struct Metrics {
    registry: Registry,
    paths: Labeller<PathKey>,
    clients: Option<Labeller<IpAddr>>,
    kernel_last: KernelCounters,

    flows_open: IntGauge,
    flows_ended: IntCounterVec,
    premature: IntCounterVec,
    incomplete: IntCounter,
    path_premature: IntCounterVec,
    client_premature: Option<IntCounterVec>,
    churn: IntCounterVec,
    kill_silence: HistogramVec,
    hold_time: Histogram,
    requests: IntCounterVec,
    ping_heartbeat: Histogram,
    path_estimate: GaugeVec,
    path_recommended: GaugeVec,
    window_mean: Gauge,
    window_samples: IntGauge,
    window_alert: IntGauge,
    window_alerts: IntCounter,
    kernel: Vec<(Counter, IntCounter)>,
    table_entries: IntGauge,
    table_capacity: IntGauge,
    table_fill: Gauge,
    table_memory: IntGauge,
    table_evictions: IntCounter,
    half_open_entries: IntGauge,
    half_open_capacity: IntGauge,
    half_open_memory: IntGauge,
    half_open_evictions: IntCounter,
    /// Last eviction totals seen (the counters move by the difference).
    evictions_last: (u64, u64),
    decode_errors: IntGauge,
    paths_evicted: IntGauge,
    flows_untracked: IntGauge,
    remedy: RemedyMetrics,
}

/// The cure's families (`activesync_monitor_remedy_*`): per-path series
/// for at most `top_paths` remedied paths.
struct RemedyMetrics {
    top_paths: usize,
    paths: IntGaugeVec,
    idle: GaugeVec,
    covered: IntGaugeVec,
    kills: IntCounterVec,
    kills_last: std::collections::BTreeMap<String, u64>,
    sockets: IntCounterVec,
    sockets_last: std::collections::BTreeMap<String, u64>,
}

/// Remedy states, as the `state` label spells them.
const REMEDY_STATES: [&str; 3] = ["on", "lifted", "not_remediable"];

/// Both kernel tables, as of the agent's last sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub entries: u64,
    pub capacity: u64,
    pub memory_bytes: u64,
    pub evictions: u64,
    pub half_open_entries: u64,
    pub half_open_capacity: u64,
    pub half_open_memory_bytes: u64,
    pub half_open_evictions: u64,
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

fn name(n: &str) -> String {
    format!("{NS}_{n}")
}

macro_rules! reg {
    ($r:expr, $m:expr) => {{
        let m = $m;
        $r.register(Box::new(m.clone()))?;
        m
    }};
}

/// The metric name and help of a kernel counter. Metric names are
/// Prometheus' (`_total`, what they count), kept apart from the counters'
/// short names so dashboards do not break when a counter is renamed.
fn kernel_metric(c: Counter) -> (&'static str, &'static str) {
    match c {
        Counter::FullParses => (
            "kernel_full_parses_total",
            "Packets the first pass could not settle (VLAN tag, IPv6 extension headers, short or malformed headers; all in the by-port modes: mirror port, router, proxy host), parsed in full.",
        ),
        Counter::PacketsTracked => (
            "kernel_packets_tracked_total",
            "Packets of tracked TCP flows.",
        ),
        Counter::ParseFailures => (
            "kernel_parse_failures_total",
            "IP/TCP packets too short or malformed to parse (passed untouched).",
        ),
        Counter::FlowInsertFailed => (
            "kernel_flow_insert_failures_total",
            "Flow table inserts the kernel refused.",
        ),
        Counter::EventsDropped => (
            "kernel_ring_buffer_drops_total",
            "Events lost because the ring buffer was full.",
        ),
        Counter::FlowsCreated => (
            "kernel_flows_created_total",
            "Flows established (handshake completed) and entered into the kernel flow table.",
        ),
        Counter::EventsSent => (
            "kernel_events_total",
            "Events the kernel wrote to the ring buffer.",
        ),
        Counter::SamplesSent => (
            "kernel_request_samples_total",
            "First bytes of plaintext client requests copied to user space.",
        ),
        Counter::SamplesDropped => (
            "kernel_request_samples_dropped_total",
            "Plaintext request samples lost (ring buffer full or copy failed).",
        ),
        Counter::HalfOpenCreated => (
            "kernel_half_open_created_total",
            "Connections entered into the half-open table (handshake not yet complete).",
        ),
        Counter::Duplicates => (
            "kernel_duplicate_packets_total",
            "Tap mode: second copies of a packet (a mirror of both switch ports), counted once.",
        ),
    }
}

impl Metrics {
    pub fn new(top_paths: usize, client_addresses: bool) -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        let hist = |n: &str, help: &str, labels: &[&str]| {
            HistogramVec::new(
                HistogramOpts::new(name(n), help).buckets(SILENCE_BUCKETS.to_vec()),
                labels,
            )
        };
        let build = reg!(
            r,
            IntGaugeVec::new(
                Opts::new(
                    name("build_info"),
                    "Build information; the value is always 1."
                ),
                &["version"],
            )?
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let mut kernel = Vec::new();
        for c in Counter::ALL {
            let (n, h) = kernel_metric(c);
            kernel.push((c, reg!(r, IntCounter::new(name(n), h)?)));
        }
        let client_premature = if client_addresses {
            Some(reg!(
                r,
                IntCounterVec::new(
                    Opts::new(name("client_premature_kills_total"), "Premature kills per client address (top clients; the rest are \"other\"). Opt-in."),
                    &["client"]
                )?
            ))
        } else {
            None
        };
        Ok(Metrics {
            flows_open: reg!(r, IntGauge::new(name("flows_open"), "Flows followed now (opened and not yet ended).")?),
            flows_ended: reg!(r, IntCounterVec::new(Opts::new(name("flows_ended_total"), "Flows ended, by how they ended."), &["ending", "family"])?),
            incomplete: reg!(r, IntCounter::new(name("flows_incomplete_total"), "Flows that ended with events lost in the kernel (ring buffer full); kept out of estimates.")?),
            premature: reg!(r, IntCounterVec::new(Opts::new(name("premature_kills_total"), "Flows killed by a middlebox before the heartbeat in force."), &["ending"])?),
            path_premature: reg!(r, IntCounterVec::new(Opts::new(name("path_premature_kills_total"), "Premature kills per path (client prefix and port; top paths, the rest \"other\")."), &["path"])?),
            client_premature,
            churn: reg!(r, IntCounterVec::new(Opts::new(name("reconnect_churn_total"), "Clients reconnecting soon after one of their flows was killed, per path."), &["path"])?),
            kill_silence: reg!(r, hist("kill_silence_seconds", "Silence before each kill.", &["ending"])?),
            hold_time: reg!(r, Histogram::with_opts(HistogramOpts::new(name("hold_time_seconds"), "Time the server held a client request before answering (heartbeat or early answer).").buckets(SILENCE_BUCKETS.to_vec()))?),
            requests: reg!(r, IntCounterVec::new(Opts::new(name("plaintext_requests_total"), "Client requests read on plaintext ports, by ActiveSync command (ping, other) or unreadable."), &["command"])?),
            ping_heartbeat: reg!(r, Histogram::with_opts(HistogramOpts::new(name("ping_heartbeat_interval_seconds"), "HeartbeatInterval stated in Ping requests read on plaintext ports (exact heartbeats).").buckets(SILENCE_BUCKETS.to_vec()))?),
            path_estimate: reg!(r, GaugeVec::new(Opts::new(name("path_idle_timeout_estimate_seconds"), "Estimated middlebox idle timeout per killing path (point estimate, sounded point, or the bracket's upper end)."), &["path"])?),
            path_recommended: reg!(r, GaugeVec::new(Opts::new(name("path_recommended_idle_timeout_seconds"), "Idle timeout the path's middlebox needs: the heartbeat to cover plus 120 s."), &["path"])?),
            window_mean: reg!(r, Gauge::new(name("heartbeat_window_mean_seconds"), "Mean of the Exchange 3033/1040-style heartbeat window.")?),
            window_samples: reg!(r, IntGauge::new(name("heartbeat_window_samples"), "Samples in the heartbeat window.")?),
            window_alert: reg!(r, IntGauge::new(name("heartbeat_window_alert"), "1 when the window is full and its mean is at or below the alert threshold.")?),
            window_alerts: reg!(r, IntCounter::new(name("heartbeat_window_alerts_total"), "Window alerts raised (at most one an hour).")?),
            kernel,
            table_entries: reg!(r, IntGauge::new(name("flow_table_entries"), "Entries in the kernel flow table at the last sweep.")?),
            table_capacity: reg!(r, IntGauge::new(name("flow_table_capacity"), "Size of the kernel flow table.")?),
            table_fill: reg!(r, Gauge::new(name("flow_table_fill_ratio"), "Kernel flow table entries over its size, at the last sweep.")?),
            table_memory: reg!(r, IntGauge::new(name("flow_table_memory_bytes"), "Kernel memory of the flow table, as the kernel accounts it.")?),
            table_evictions: reg!(r, IntCounter::new(name("flow_table_evictions_total"), "Flows pushed out of the full flow table since the agent started (created minus present, at the last sweep).")?),
            half_open_entries: reg!(r, IntGauge::new(name("half_open_table_entries"), "Connections whose handshake has not completed, at the last sweep (a SYN flood lands here, not in the flow table).")?),
            half_open_capacity: reg!(r, IntGauge::new(name("half_open_table_capacity"), "Size of the kernel half-open table.")?),
            half_open_memory: reg!(r, IntGauge::new(name("half_open_table_memory_bytes"), "Kernel memory of the half-open table, as the kernel accounts it.")?),
            half_open_evictions: reg!(r, IntCounter::new(name("half_open_table_evictions_total"), "Half-open connections pushed out without being established, since the agent started (at the last sweep).")?),
            decode_errors: reg!(r, IntGauge::new(name("event_decode_errors"), "Ring buffer records that did not decode.")?),
            paths_evicted: reg!(r, IntGauge::new(name("detector_paths_evicted"), "Paths the detector forgot to stay within its bound.")?),
            flows_untracked: reg!(r, IntGauge::new(name("detector_flows_untracked"), "Flows the detector could not follow (its flow bound was reached).")?),
            remedy: RemedyMetrics {
                top_paths,
                paths: reg!(r, IntGaugeVec::new(Opts::new(name("remedy_paths"), "Killing paths by where their keepalive remedy stands: on, lifted (quiet, retesting the box) or not remediable."), &["state"])?),
                idle: reg!(r, GaugeVec::new(Opts::new(name("remedy_keepalive_idle_seconds"), "TCP keepalive idle time in force per remedied path (top paths by connections covered)."), &["path"])?),
                covered: reg!(r, IntGaugeVec::new(Opts::new(name("remedy_sockets_covered"), "Connections with the path's keepalive in force, at the last sweep (top paths)."), &["path"])?),
                kills: reg!(r, IntCounterVec::new(Opts::new(name("remedy_premature_kills_total"), "Premature kills on a remedied path of silences that began after its connections were covered: a remedy that does not work (top paths)."), &["path"])?),
                kills_last: std::collections::BTreeMap::new(),
                sockets: reg!(r, IntCounterVec::new(Opts::new(name("remedy_sockets_total"), "Sockets the remedy programs changed or left alone, by outcome (new_covered, new_own_keepalive, new_failed, new_table_full, sweep_applied, sweep_undone, sweep_failed)."), &["outcome"])?),
                sockets_last: std::collections::BTreeMap::new(),
            },
            paths: Labeller::new(top_paths),
            clients: client_addresses.then(|| Labeller::new(top_paths)),
            kernel_last: KernelCounters::default(),
            evictions_last: (0, 0),
            registry: r,
        })
    }

    fn path_label(&mut self, path: PathKey, now: u64) -> String {
        if self.paths.label(path, now) {
            path.to_string()
        } else {
            OTHER.to_string()
        }
    }

    fn verdict(&mut self, v: &Verdict, path: PathKey) {
        self.flows_ended
            .with_label_values(&[v.ending.label(), family(v.client.ip())])
            .inc();
        if v.incomplete {
            self.incomplete.inc();
        }
        if v.ending.is_kill() {
            self.kill_silence
                .with_label_values(&[v.ending.label()])
                .observe(v.evidence.silence_seconds);
        }
        if v.premature {
            self.premature.with_label_values(&[v.ending.label()]).inc();
            let label = self.path_label(path, v.at_ns);
            self.path_premature.with_label_values(&[&label]).inc();
            if let (Some(l), Some(c)) = (self.clients.as_mut(), self.client_premature.as_ref()) {
                let ip = v.client.ip();
                let label = if l.label(ip, v.at_ns) {
                    ip.to_string()
                } else {
                    OTHER.to_string()
                };
                c.with_label_values(&[&label]).inc();
            }
        }
    }

    /// Count what the pipeline concluded.
    pub fn observe(&mut self, out: &pipeline::Output, det: &Detector) {
        match out {
            pipeline::Output::Detector(o) => self.detector_output(o, det),
            pipeline::Output::Request(r) => self.request(r),
        }
    }

    /// Count a request read on a plaintext port.
    fn request(&mut self, o: &crate::ping::Outcome) {
        use crate::ping::{Heartbeat, Outcome};
        let command = match o {
            Outcome::Ping(p) => {
                if let Heartbeat::Stated(h) = p.heartbeat {
                    self.ping_heartbeat.observe(f64::from(h));
                }
                "ping"
            }
            Outcome::Other(_) => "other",
            Outcome::Unreadable(_) => "unreadable",
        };
        self.requests.with_label_values(&[command]).inc();
    }

    fn detector_output(&mut self, out: &Output, det: &Detector) {
        match out {
            Output::Verdict(v) => {
                let path = det.path_of(v.client.ip(), v.server.port());
                self.verdict(v, path);
            }
            Output::HoldTime { seconds, .. } => self.hold_time.observe(*seconds),
            Output::Alert(_) => self.window_alerts.inc(),
            Output::Churn { path } => {
                let label = if self.paths.labelled.contains_key(path) {
                    path.to_string()
                } else {
                    OTHER.to_string()
                };
                self.churn.with_label_values(&[&label]).inc();
            }
        }
    }

    /// Refresh gauges from the detector and the kernel, then encode.
    pub fn render(
        &mut self,
        det: &Detector,
        kernel: Option<&KernelCounters>,
        table: Option<TableStats>,
        decode_errors: u64,
        now_ns: u64,
    ) -> Result<String, prometheus::Error> {
        for gone in self.paths.expire(now_ns) {
            let l = gone.to_string();
            for v in [&self.path_premature, &self.churn] {
                let _ = v.remove_label_values(&[&l]);
            }
            for g in [&self.path_estimate, &self.path_recommended] {
                let _ = g.remove_label_values(&[&l]);
            }
        }
        if let (Some(l), Some(c)) = (self.clients.as_mut(), self.client_premature.as_ref()) {
            for gone in l.expire(now_ns) {
                let _ = c.remove_label_values(&[&gone.to_string()]);
            }
        }
        self.flows_open.set(det.flows_tracked() as i64);
        let cover = det.heartbeat_to_cover();
        for (key, p) in det.paths() {
            if !self.paths.labelled.contains_key(key) {
                continue;
            }
            let l = key.to_string();
            if let Some(e) = p.estimate() {
                self.path_estimate.with_label_values(&[&l]).set(e.seconds());
                self.path_recommended
                    .with_label_values(&[&l])
                    .set(cover + crate::detector::CURE_MARGIN_SECONDS);
            }
        }
        let w = det.window();
        self.window_mean.set(w.mean().unwrap_or(0.0));
        self.window_samples.set(w.len() as i64);
        self.window_alert.set(i64::from(w.alerting()));
        if let Some(k) = kernel {
            for (c, m) in &self.kernel {
                let delta = k.get(*c).saturating_sub(self.kernel_last.get(*c));
                m.inc_by(delta);
            }
            self.kernel_last = *k;
        }
        if let Some(t) = table {
            self.table_memory.set(t.memory_bytes as i64);
            self.table_entries.set(t.entries as i64);
            self.table_capacity.set(t.capacity as i64);
            self.table_fill
                .set(t.entries as f64 / t.capacity.max(1) as f64);
            self.table_evictions
                .inc_by(t.evictions.saturating_sub(self.evictions_last.0));
            self.half_open_entries.set(t.half_open_entries as i64);
            self.half_open_capacity.set(t.half_open_capacity as i64);
            self.half_open_memory.set(t.half_open_memory_bytes as i64);
            self.half_open_evictions
                .inc_by(t.half_open_evictions.saturating_sub(self.evictions_last.1));
            self.evictions_last = (
                t.evictions.max(self.evictions_last.0),
                t.half_open_evictions.max(self.evictions_last.1),
            );
        }
        self.decode_errors.set(decode_errors as i64);
        self.paths_evicted.set(det.stats.paths_evicted as i64);
        self.flows_untracked.set(det.stats.flows_not_tracked as i64);
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// The cure's state: per-path series for the top remedied paths, reset
    /// each time so a lifted path's series go.
    pub fn set_remedy(&mut self, status: &crate::remedy::RemedyStatus) {
        use crate::remedy::PathRemedyState as St;
        let m = &mut self.remedy;
        let mut counts = [0i64; 3];
        for p in &status.paths {
            let i = match p.state {
                St::On { .. } => 0,
                St::Lifted { .. } => 1,
                St::NotRemediable { .. } => 2,
            };
            counts[i] += 1;
        }
        for (state, n) in REMEDY_STATES.iter().zip(counts) {
            m.paths.with_label_values(&[*state]).set(n);
        }
        m.idle.reset();
        m.covered.reset();
        let mut on: Vec<_> = status
            .paths
            .iter()
            .filter_map(|p| match p.state {
                St::On { keepalive, .. } => Some((p, keepalive)),
                _ => None,
            })
            .collect();
        on.sort_by_key(|p| std::cmp::Reverse(p.0.sockets_covered));
        on.truncate(m.top_paths);
        // A counter's series go with their path (out of the top, or lifted).
        let shown: Vec<&str> = on.iter().map(|(p, _)| p.path.as_str()).collect();
        let kills = &m.kills;
        m.kills_last.retain(|path, _| {
            let keep = shown.contains(&path.as_str());
            if !keep {
                let _ = kills.remove_label_values(&[path]);
            }
            keep
        });
        for (p, k) in on {
            let l = [p.path.as_str()];
            m.idle.with_label_values(&l).set(f64::from(k.idle_seconds));
            m.covered
                .with_label_values(&l)
                .set(p.sockets_covered as i64);
            let last = m.kills_last.insert(p.path.clone(), p.kills_while_remedied);
            let delta = p.kills_while_remedied.saturating_sub(last.unwrap_or(0));
            m.kills.with_label_values(&l).inc_by(delta);
        }
        for (outcome, v) in &status.counters {
            let last = m.sockets_last.get(outcome).copied().unwrap_or(0);
            m.sockets
                .with_label_values(&[outcome.as_str()])
                .inc_by(v.saturating_sub(last));
            m.sockets_last.insert(outcome.clone(), *v);
        }
    }

    /// Series a scrape can hold at most (families x label sets x buckets).
    pub fn max_series(top_paths: usize, client_addresses: bool) -> usize {
        let buckets = SILENCE_BUCKETS.len() + 3; // +Inf, _sum, _count
        let paths = top_paths + 1;
        1 // build info
            + 1 // flows_open
            + 1 // flows_incomplete
            + Ending::COUNT * 2 // flows_ended by ending x family
            + Ending::KILLS.len() // premature by ending
            + paths * 4 // path premature, churn, estimate, recommended
            + Ending::KILLS.len() * buckets // kill silence histogram
            + buckets // hold time histogram
            + 3 // plaintext requests by command
            + buckets // ping heartbeat histogram
            + 4 // window
            + Counter::COUNT as usize
            + 9 // both tables
            + 3 // decode errors, paths evicted, flows untracked
            + REMEDY_STATES.len() // remedy paths by state
            + top_paths * 3 // remedy idle, covered, kills while remedied
            + monitor_common::remedy::RemedyCounter::COUNT as usize // remedy sockets by outcome
            + if client_addresses { paths } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_beyond_top_k_is_other_and_an_idle_path_loses_its_label() {
        let mut l = Labeller::new(2);
        let (a, b, c) = (PathKey::test(1), PathKey::test(2), PathKey::test(3));
        assert!(l.label(a, 0));
        assert!(l.label(b, 10));
        assert!(!l.label(c, 20), "no room: folded into other");
        assert_eq!(l.expire(LABEL_RETENTION_NS + 5), vec![a]);
        assert!(l.label(c, LABEL_RETENTION_NS + 6), "room again");
    }

    #[test]
    fn the_readme_states_the_default_series_bound() {
        let readme = include_str!("../../README.md");
        let n = Metrics::max_series(20, false);
        assert!(
            readme.contains(&format!("at most **{n} series**")),
            "README should state {n}"
        );
    }
}
