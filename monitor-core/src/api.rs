//! What the query API answers: typed payloads the agent builds and the CLI
//! renders (as tables or plain words, or as JSON with `--json`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    pub interface: String,
    pub xdp_mode: String,
    pub tc_mode: String,
    /// Tap mode: ingress only, both directions (a mirror port).
    #[serde(default)]
    pub tap: bool,
}

impl AttachmentInfo {
    /// "XDP ingress (native), TC egress (tcx)" or "TC ingress and egress (tcx)".
    pub fn hooks(&self) -> String {
        hooks(&self.xdp_mode, &self.tc_mode, self.tap)
    }
}

/// The hooks of one attachment in words; `xdp_mode` "off" means TC ingress.
pub fn hooks(xdp_mode: &str, tc_mode: &str, tap: bool) -> String {
    match (xdp_mode, tap) {
        ("off", true) => format!("TC ingress ({tc_mode}), tap: both directions"),
        (_, true) => format!("XDP ingress ({xdp_mode}), tap: both directions"),
        ("off", false) => format!("TC ingress and egress ({tc_mode})"),
        _ => format!("XDP ingress ({xdp_mode}), TC egress ({tc_mode})"),
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
