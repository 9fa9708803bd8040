//! The kernel's per-packet logic, run in user space on timestamped packets:
//! the same state machine and table choreography (`monitor-common`), plain
//! maps for the flow and half-open tables, bounded as the kernel's are (see
//! [`Replay::sweep`]). Offline analysis and the detector's tests drive it.

use std::collections::HashMap;

use monitor_common::{
    flow::{flow_key, wants_sample},
    step,
    tables::HostTables,
    Config, Dir, EventKind, Flow, FlowKey, Packet, SAMPLE_BYTES,
};

use crate::event::{FlowEvent, PayloadSample, Record};

pub struct Replay {
    cfg: Config,
    tables: HostTables,
}

/// How long a closed flow stays in the replay's table after its last
/// packet: long enough for the stray packets of a close (a retransmitted
/// FIN, the last ACK) to find it closed, as they do within TIME_WAIT (60 s
/// on Linux, up to 120 s on Windows servers), instead of opening a new
/// half-open entry.
pub const CLOSED_LINGER_NS: u64 = 120_000_000_000;

impl Replay {
    /// A replay whose flow table holds as many flows as the kernel's by
    /// default.
    pub fn new(cfg: Config) -> Self {
        Replay {
            cfg,
            tables: HostTables::default(),
        }
    }

    /// A replay whose flow table holds at most `flows` (beyond that, the
    /// sweep evicts the least recently seen).
    pub fn with_capacity(cfg: Config, flows: usize) -> Self {
        Replay {
            cfg,
            tables: HostTables::with_capacity(flows),
        }
    }

    /// The direction of `pkt` as the server host sees it, if it is tracked:
    /// a capture is read as tap mode reads a mirror port.
    pub fn direction(&self, pkt: &Packet) -> Option<Dir> {
        monitor_common::flow::tap_direction(&self.cfg, pkt, |_| true)
    }

    /// Apply one packet seen at `ts_ns` going `dir`; the events it causes
    /// (an establishing packet gives `Opened`, then possibly its own).
    pub fn packet(&mut self, pkt: &Packet, dir: Dir, ts_ns: u64) -> Vec<FlowEvent> {
        self.packet_with_payload(pkt, dir, ts_ns, &[]).0
    }

    /// As [`Replay::packet`], given the frame the packet was parsed from:
    /// also the request sample the kernel would copy (plaintext ports), from
    /// the bytes the frame holds.
    pub fn packet_with_payload(
        &mut self,
        pkt: &Packet,
        dir: Dir,
        ts_ns: u64,
        frame: &[u8],
    ) -> (Vec<FlowEvent>, Option<PayloadSample>) {
        let key = flow_key(pkt, dir);
        // Only flows already in the flow table are sampled (as in the kernel).
        let sample = self
            .tables
            .flows
            .get(&key)
            .filter(|f| wants_sample(self.cfg.plaintext(pkt.dst_port), f, pkt, dir))
            .map(|_| {
                let start = (pkt.payload_off as usize).min(frame.len());
                let end = (start + (pkt.payload_len as usize).min(SAMPLE_BYTES)).min(frame.len());
                PayloadSample {
                    key,
                    ts_ns,
                    seq: pkt.seq,
                    payload_len: pkt.payload_len,
                    data: frame[start..end].to_vec(),
                }
            });
        let events = step(
            &mut self.tables,
            &key,
            pkt,
            dir,
            ts_ns,
            self.cfg.gap_threshold_ns,
        )
        .into_iter()
        .flatten()
        // The state machine only emits valid kinds and directions.
        .filter_map(|raw| FlowEvent::from_event(raw).ok())
        .collect::<Vec<_>>();
        if events.iter().any(|e| e.kind == EventKind::Closed) {
            self.tables.note_closed(&key, ts_ns);
        }
        (events, sample)
    }

    /// Drop what the kernel's table would no longer hold at `now_ns`:
    /// closed flows idle for [`CLOSED_LINGER_NS`], then the least recently
    /// seen beyond the capacity. The keys dropped are appended to `dropped`
    /// (their detector state is to be retired, as the agent does after a
    /// table scan).
    pub fn sweep(&mut self, now_ns: u64, dropped: &mut Vec<FlowKey>) {
        self.tables.sweep(now_ns, CLOSED_LINGER_NS, dropped);
    }

    /// As [`Replay::packet_with_payload`], as the ring buffer would carry
    /// it: the request sample (if any) first, then the events.
    pub fn records(&mut self, pkt: &Packet, dir: Dir, ts_ns: u64, frame: &[u8]) -> Vec<Record> {
        let (events, sample) = self.packet_with_payload(pkt, dir, ts_ns, frame);
        sample
            .map(Record::Sample)
            .into_iter()
            .chain(events.into_iter().map(Record::Event))
            .collect()
    }

    pub fn flows(&self) -> &HashMap<FlowKey, Flow> {
        &self.tables.flows
    }

    /// Connections whose handshake has not completed.
    pub fn half_open(&self) -> usize {
        self.tables.half_open.len()
    }

    /// Half-open entries dropped to stay within the bound.
    pub fn half_open_evicted(&self) -> u64 {
        self.tables.half_open_evicted
    }

    /// Flows evicted from the flow table to stay within its capacity.
    pub fn flows_evicted(&self) -> u64 {
        self.tables.flows_evicted
    }

    /// Second copies of a packet passed over (a mirror port's capture).
    pub fn duplicates(&self) -> u64 {
        self.tables.duplicates
    }

    /// Closed flows dropped after lingering idle.
    pub fn closed_expired(&self) -> u64 {
        self.tables.closed_expired
    }
}
