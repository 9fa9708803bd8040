//! What the agent's tasks share: the monitor, the pipeline, the metrics and
//! the latest table snapshot, behind one lock that is never held across a
//! syscall-heavy walk (table scans run on a blocking thread, flow queries
//! work on a copy-free handle on the snapshot).

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use monitor_common::Counter;
use tokio::sync::broadcast;

use crate::{
    api::{self, AttachmentInfo, EventPayload, ProgramInfo},
    clock,
    config::FileConfig,
    counters::KernelCounters,
    detector::Output,
    flows::{FlowSnapshot, Paths},
    metrics::{Metrics, TableStats},
    monitor::{Monitor, Scan},
    pipeline::{self, Pipeline},
    query::Response,
};

pub struct Shared {
    pub monitor: Monitor,
    pub pipeline: Pipeline,
    pub metrics: Metrics,
    /// The flow table as the last scan found it (sorted by key).
    pub snapshot: Arc<FlowSnapshot>,
    pub half_open_entries: u64,
    pub decode_errors: u64,
    pub started: Instant,
    pub config: FileConfig,
    /// Verdicts as JSON lines for `events --follow` clients.
    pub followers: broadcast::Sender<String>,
    /// The cure's decisions (`[remedy]`), and what the kernel did.
    pub remedy: monitor_core::remedy::Remedy,
    pub remedy_kernel: std::collections::BTreeMap<String, u64>,
    /// Why the remedy is not running, where it was asked for.
    pub remedy_error: Option<String>,
    /// The remedy's last sync failure (cleared by one that works).
    pub remedy_sync_error: Option<String>,
}

pub type State = Arc<Mutex<Shared>>;

/// Lock, surviving a poisoned lock (a panicked task must not stop the agent).
pub fn lock(state: &State) -> MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Feed pipeline outputs into the metrics, the log and to followers.
    pub fn absorb(&mut self, outputs: Vec<pipeline::Output>) {
        for o in outputs {
            self.metrics.observe(&o, self.pipeline.detector());
            match &o {
                pipeline::Output::Detector(Output::Verdict(v)) => {
                    log::debug!("verdict: {v}");
                    self.remedy.observe(v);
                    // Rendering costs more than the detector's own work: only
                    // for someone following.
                    if self.followers.receiver_count() > 0 {
                        if let Ok(line) = serde_json::to_string(&Response::Ok(EventPayload::of(v)))
                        {
                            // No followers left is fine.
                            let _ = self.followers.send(line);
                        }
                    }
                }
                pipeline::Output::Detector(Output::Alert(a)) => log::warn!("{a}"),
                pipeline::Output::Request(r) => log::debug!("request read: {r:?}"),
                _ => {}
            }
        }
    }

    /// Apply a scan of the kernel tables: keep it for queries, retire
    /// flows that left the flow table, and count the silences their clients
    /// were heard after (as `analyze` does at the end of a capture).
    pub fn apply_scan(&mut self, scan: Scan) {
        self.half_open_entries = scan.half_open_entries;
        let snap = Arc::new(scan.flows);
        let now = clock::now_ns();
        let out = self.pipeline.retire_missing(now, |k| snap.contains(k));
        self.absorb(out);
        let out = self
            .pipeline
            .settle(now, |k| snap.get(k).map(|f| f.last_in_ns));
        self.absorb(out);
        self.snapshot = snap;
    }

    pub fn paths(&self) -> Paths {
        let cfg = self.pipeline.detector().config();
        Paths {
            ipv4_prefix: cfg.ipv4_prefix,
            ipv6_prefix: cfg.ipv6_prefix,
        }
    }

    fn table_entries(&self) -> u64 {
        self.snapshot.len() as u64
    }

    pub fn status(&self) -> api::Status {
        let counters = self.monitor.counters().unwrap_or_default();
        let tables = self.tables(&counters);
        let detector = self.pipeline.detector();
        api::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            ports: self.config.agent.ports.clone(),
            plaintext_ports: self.config.agent.plaintext_ports.clone(),
            gap_threshold_seconds: self.config.agent.gap_threshold.as_secs_f64(),
            attachments: self
                .monitor
                .attachments()
                .iter()
                .map(|a| AttachmentInfo {
                    interface: a.iface.clone(),
                    xdp_mode: a.xdp_mode.to_string(),
                    tc_mode: a.tc_mode.to_string(),
                    mode: a.mode,
                })
                .collect(),
            programs: self
                .monitor
                .programs()
                .iter()
                .map(|p| ProgramInfo {
                    name: p.name.to_string(),
                    verified_instructions: p.verified_instructions,
                })
                .collect(),
            flow_table_entries: tables.entries,
            flow_table_capacity: tables.capacity,
            flow_table_fill_ratio: tables.entries as f64 / tables.capacity.max(1) as f64,
            flow_table_memory_bytes: self.monitor.flow_table_memory_bytes(),
            flow_table_evictions: tables.evictions,
            half_open_entries: tables.half_open_entries,
            half_open_capacity: tables.half_open_capacity,
            half_open_memory_bytes: self.monitor.half_open_memory_bytes(),
            half_open_evictions: tables.half_open_evictions,
            kernel_counters: Counter::ALL
                .iter()
                .map(|c| (c.name().to_string(), counters.get(*c)))
                .collect(),
            events_dropped: counters.get(Counter::EventsDropped),
            event_decode_errors: self.decode_errors,
            flows_followed: detector.flows_tracked(),
            flows_followed_memory_bytes: detector.flows_memory_bytes() as u64,
            snapshot_memory_bytes: self.snapshot.memory_bytes() as u64,
            paths: detector.paths().count(),
            metrics_listen: self
                .config
                .metrics
                .enabled
                .then(|| self.config.metrics.listen.to_string()),
        }
    }

    /// Both tables as of the last scan. Entries leave the flow table only
    /// by eviction, and the half-open table by eviction or by being
    /// established, so the counters give the evictions.
    fn tables(&self, k: &KernelCounters) -> TableStats {
        let created = k.get(Counter::FlowsCreated);
        let entries = self.table_entries();
        let half_open_capacity = u64::from(self.monitor.half_open_table_size());
        // A walk of a table that changes under it (a SYN flood) restarts
        // when its current key is evicted, and counts entries again.
        let half_open_entries = self.half_open_entries.min(half_open_capacity);
        TableStats {
            entries,
            capacity: u64::from(self.monitor.flow_table_size()),
            memory_bytes: self.monitor.flow_table_memory_bytes().unwrap_or(0),
            evictions: created.saturating_sub(entries),
            half_open_entries,
            half_open_capacity,
            half_open_memory_bytes: self.monitor.half_open_memory_bytes().unwrap_or(0),
            half_open_evictions: k
                .get(Counter::HalfOpenCreated)
                .saturating_sub(created)
                .saturating_sub(half_open_entries),
        }
    }

    /// `monitor remedy status`: decisions, coverage, the kernel's counts.
    pub fn remedy_status(&self) -> monitor_core::remedy::RemedyStatus {
        let mut st = self.remedy.status();
        st.counters = self.remedy_kernel.clone();
        st.error = self.remedy_error.clone();
        st.sync_error = self.remedy_sync_error.clone();
        st
    }

    /// The report, with the remedy's section where one was asked for.
    pub fn report(&self) -> crate::detector::report::Report {
        let mut r = self.pipeline.report();
        if self.config.remedy.runs() {
            r.remedy = Some(self.remedy_status());
        }
        r
    }

    pub fn metrics_text(&mut self) -> Result<String, prometheus::Error> {
        if self.config.remedy.runs() {
            let st = self.remedy_status();
            self.metrics.set_remedy(&st);
        }
        let kernel = self.monitor.counters().ok();
        let table = kernel.as_ref().map(|k| self.tables(k));
        let decode = self.decode_errors;
        let now = clock::now_ns();
        let Shared {
            metrics, pipeline, ..
        } = self;
        metrics.render(pipeline.detector(), kernel.as_ref(), table, decode, now)
    }
}
