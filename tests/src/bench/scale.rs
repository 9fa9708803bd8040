//! Scale: the flow table full at 1,048,576 flows, the agent running beside
//! it: kernel memory per flow, agent memory, scrape and report cost, series.

use std::{net::IpAddr, path::Path, time::Instant};

use serde_json::Value;
use xtask::{
    lab::{Agent, AgentOptions},
    netns::{Pair, SERVER_V4},
};

use super::frames::{establish, sender_in};

#[derive(Clone, Debug, Default)]
pub struct Scale {
    pub flows_sent: u32,
    pub table_entries: u64,
    pub table_capacity: u64,
    pub table_memory_bytes: u64,
    pub send_seconds: f64,
    pub agent_rss_before_bytes: u64,
    pub agent_rss_after_bytes: u64,
    pub flows_followed: u64,
    /// The agent's own account of its two per-flow structures (bytes, by
    /// capacity): the detector's followed flows, the table snapshot.
    pub followed_memory_bytes: u64,
    pub snapshot_memory_bytes: u64,
    pub events_sent: u64,
    pub events_dropped: u64,
    pub scrape_seconds: f64,
    pub scrape_bytes: usize,
    pub series_before: usize,
    pub series_after: usize,
    /// Series in the second scrape, not in the first (names with labels).
    pub series_new: Vec<String>,
    pub report_seconds: f64,
    pub report_bytes: usize,
    pub status_seconds: f64,
}

pub fn series(scrape: &str) -> usize {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count()
}

fn status(agent: &Agent) -> Value {
    let s = agent.cli(&["status", "--json"]).expect("monitor status");
    serde_json::from_str(&s).expect("status JSON")
}

/// Fill a table of `flows` entries with `flows` distinct SYNs.
pub fn run(agent_bin: &Path, flows: u32) -> Scale {
    let pair = Pair::new();
    let workdir = std::env::temp_dir().join(format!("bench-scale-{}", std::process::id()));
    let mut o = AgentOptions::new(&pair.server_if, workdir.clone());
    o.config.agent.flow_table_size = flows;
    let agent = Agent::start_in(agent_bin, &pair.server, o).expect("agent starts");
    let first = agent.scrape().expect("scrape");
    let mut s = Scale {
        flows_sent: flows,
        agent_rss_before_bytes: xtask::soak::rss_bytes(agent.pid()),
        series_before: series(&first),
        ..Scale::default()
    };
    let server: IpAddr = SERVER_V4.parse().expect("address");
    let client = sender_in(&pair.client, &pair.client_if);
    let server_side = sender_in(&pair.server, &pair.server_if);
    let t = Instant::now();
    establish(&client, &server_side, server, 0, flows);
    s.send_seconds = t.elapsed().as_secs_f64();
    // A walk of the table that starts after the burst (a walk during it
    // finds part of the table): what the agent then holds is measured.
    agent
        .cli(&["flows", "--fresh", "--limit", "1"])
        .expect("a fresh walk of the table");
    let st = status(&agent);
    s.table_entries = st["flow_table_entries"].as_u64().unwrap_or(0);
    s.table_capacity = st["flow_table_capacity"].as_u64().unwrap_or(0);
    s.table_memory_bytes = st["flow_table_memory_bytes"].as_u64().unwrap_or(0);
    s.flows_followed = st["flows_followed"].as_u64().unwrap_or(0);
    s.followed_memory_bytes = st["flows_followed_memory_bytes"].as_u64().unwrap_or(0);
    s.snapshot_memory_bytes = st["snapshot_memory_bytes"].as_u64().unwrap_or(0);
    s.events_sent = st["kernel_counters"]["events_sent"].as_u64().unwrap_or(0);
    s.events_dropped = st["kernel_counters"]["events_dropped"]
        .as_u64()
        .unwrap_or(0);
    s.agent_rss_after_bytes = xtask::soak::rss_bytes(agent.pid());
    let t = Instant::now();
    let scrape = agent.scrape().expect("scrape");
    s.scrape_seconds = t.elapsed().as_secs_f64();
    s.scrape_bytes = scrape.len();
    s.series_after = series(&scrape);
    let names = |t: &str| -> std::collections::BTreeSet<String> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.rsplit_once(' ').map(|(n, _)| n.to_string()))
            .collect()
    };
    s.series_new = names(&scrape).difference(&names(&first)).cloned().collect();
    let t = Instant::now();
    let report = agent.cli(&["report", "--json"]).expect("report");
    s.report_seconds = t.elapsed().as_secs_f64();
    s.report_bytes = report.len();
    let t = Instant::now();
    let _ = status(&agent);
    s.status_seconds = t.elapsed().as_secs_f64();
    let _ = agent.stop();
    let _ = std::fs::remove_dir_all(&workdir);
    s
}

impl Scale {
    /// Memory per flow in the table, all told (the kernel's table and the
    /// agent's growth), and where it goes: (what, bytes per flow).
    pub fn per_flow(&self) -> (f64, Vec<(&'static str, f64)>) {
        let n = self.table_entries.max(1) as f64;
        let grown = self
            .agent_rss_after_bytes
            .saturating_sub(self.agent_rss_before_bytes);
        let rest = grown
            .saturating_sub(self.followed_memory_bytes)
            .saturating_sub(self.snapshot_memory_bytes);
        let parts = vec![
            (
                "kernel flow table (fdinfo memlock / capacity)",
                self.table_memory_bytes as f64 / self.table_capacity.max(1) as f64,
            ),
            (
                "agent: followed flows (slots + index buckets, by capacity)",
                self.followed_memory_bytes as f64 / n,
            ),
            (
                "agent: table snapshot (summaries + 4 sort orders, by capacity)",
                self.snapshot_memory_bytes as f64 / n,
            ),
            (
                "agent: the rest of its growth (clients, allocator, ring buffer)",
                rest as f64 / n,
            ),
        ];
        ((self.table_memory_bytes + grown) as f64 / n, parts)
    }

    pub fn profile_markdown(&self) -> String {
        let (total, parts) = self.per_flow();
        let mut md = String::from("| where | bytes per flow |\n|---|---|\n");
        for (what, b) in parts {
            md.push_str(&format!("| {what} | {b:.0} |\n"));
        }
        md.push_str(&format!(
            "| **all told** (kernel table + agent growth) / flows in the table | **{total:.0}** |\n"
        ));
        md
    }

    pub fn markdown(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        format!(
            "| measure | value |\n|---|---|\n\
             | distinct connections established (SYN, SYN-ACK, ACK as raw frames, {:.1} s) | {} |\n\
             | flow table entries / capacity | {} / {} |\n\
             | kernel memory of the table (fdinfo memlock) | {:.1} MiB, {:.0} bytes per flow |\n\
             | agent resident memory before / after | {:.1} MiB / {:.1} MiB |\n\
             | flows the detector follows (bound `max_flows`) | {} |\n\
             | events sent / dropped (ring buffer full while the burst lasted) | {} / {} |\n\
             | one `/metrics` scrape | {:.1} ms, {} bytes |\n\
             | series before / after the million flows | {} / {} (new: {}) |\n\
             | one `monitor report --json` | {:.1} ms, {} bytes |\n\
             | one `monitor status --json` | {:.1} ms |\n",
            self.send_seconds,
            self.flows_sent,
            self.table_entries,
            self.table_capacity,
            mib(self.table_memory_bytes),
            self.table_memory_bytes as f64 / self.table_capacity.max(1) as f64,
            mib(self.agent_rss_before_bytes),
            mib(self.agent_rss_after_bytes),
            self.flows_followed,
            self.events_sent,
            self.events_dropped,
            self.scrape_seconds * 1e3,
            self.scrape_bytes,
            self.series_before,
            self.series_after,
            if self.series_new.is_empty() {
                "none".to_string()
            } else {
                self.series_new.join(", ")
            },
            self.report_seconds * 1e3,
            self.report_bytes,
            self.status_seconds * 1e3,
        )
    }
}
