//! What the query API answers: typed payloads the agent builds and the CLI
//! renders (as tables or plain words, or as JSON with `--json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    pub interface: String,
    pub xdp_mode: String,
    pub tc_mode: String,
    /// Where the agent sits (server, tap, router).
    #[serde(default)]
    pub mode: crate::placement::AgentMode,
}

impl AttachmentInfo {
    /// "XDP ingress (native), TC egress (tcx)" or "TC ingress and egress (tcx)".
    pub fn hooks(&self) -> String {
        self.mode.hooks(&self.xdp_mode, &self.tc_mode)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgramInfo {
    pub name: String,
    pub verified_instructions: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: f64,
    pub ports: Vec<u16>,
    /// Ports whose Pings are read (plaintext HTTP).
    pub plaintext_ports: Vec<u16>,
    pub gap_threshold_seconds: f64,
    pub attachments: Vec<AttachmentInfo>,
    pub programs: Vec<ProgramInfo>,
    pub flow_table_entries: u64,
    pub flow_table_capacity: u64,
    pub flow_table_fill_ratio: f64,
    /// Kernel memory of the flow table (bytes), as the kernel accounts it.
    pub flow_table_memory_bytes: Option<u64>,
    /// Flows pushed out of the full table (created minus present), at the last sweep.
    pub flow_table_evictions: u64,
    /// Connections whose handshake has not completed (a SYN flood lands here).
    pub half_open_entries: u64,
    pub half_open_capacity: u64,
    pub half_open_memory_bytes: Option<u64>,
    /// Half-open entries pushed out, never established, at the last sweep.
    pub half_open_evictions: u64,
    pub kernel_counters: BTreeMap<String, u64>,
    pub events_dropped: u64,
    pub event_decode_errors: u64,
    pub flows_followed: usize,
    /// Bytes the detector's followed flows hold (by capacity).
    pub flows_followed_memory_bytes: u64,
    /// Bytes the last table snapshot holds (for `flows` queries and for
    /// retiring flows that left the table), by capacity.
    pub snapshot_memory_bytes: u64,
    pub paths: usize,
    pub metrics_listen: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportPayload {
    pub text: String,
    pub report: crate::detector::report::Report,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventPayload {
    pub text: String,
    pub verdict: crate::detector::Verdict,
}

impl EventPayload {
    /// A verdict as the events stream carries it: in words and as JSON.
    pub fn of(v: &crate::detector::Verdict) -> EventPayload {
        EventPayload {
            text: v.to_string(),
            verdict: v.clone(),
        }
    }
}
