//! Text rendering of query answers for people.

use std::fmt::Write as _;

use crate::api::{FlowRow, Status};

pub fn status(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "monitor {} up {:.0} s, ports {:?} (plaintext, Pings read: {:?}), gap threshold {} s",
        s.version, s.uptime_seconds, s.ports, s.plaintext_ports, s.gap_threshold_seconds
    );
    for a in &s.attachments {
        let _ = writeln!(
            o,
            "  {}: {}",
            a.interface,
            crate::loader::Attachment::hooks(&a.xdp_mode, &a.tc_mode)
        );
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

pub fn flows(rows: &[FlowRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<44} {:>9} {:>9} {:>12} {:>12} {:>9}  STATE",
        "CLIENT", "AGE_S", "SILENT_S", "BYTES_IN", "BYTES_OUT", "HB_S"
    );
    for r in rows {
        let hb = r
            .heartbeat_seconds
            .map_or("-".to_string(), |h| format!("{h:.1}"));
        let _ = writeln!(
            o,
            "{:<44} {:>9.1} {:>9.1} {:>12} {:>12} {:>9}  {}",
            r.client, r.age_seconds, r.silence_seconds, r.bytes_in, r.bytes_out, hb, r.state
        );
    }
    o
}
