//! The kernel's per-packet logic, run in user space on timestamped packets:
//! the same state machine (`monitor-common`), a plain `HashMap` for the flow
//! table. Offline analysis and the detector's tests drive it.

use std::collections::HashMap;

use monitor_common::{
    flow::{flow_key, open_flow, wants_sample},
    on_packet, Config, Dir, Flow, FlowKey, Packet, SAMPLE_BYTES,
};

use crate::event::{FlowEvent, PayloadSample};

pub struct Replay {
    cfg: Config,
    flows: HashMap<FlowKey, Flow>,
}

impl Replay {
    pub fn new(cfg: Config) -> Self {
        Replay {
            cfg,
            flows: HashMap::new(),
        }
    }

    /// The direction of `pkt` as the server host sees it, if it is tracked.
    pub fn direction(&self, pkt: &Packet) -> Option<Dir> {
        if self.cfg.tracks(pkt.dst_port) {
            Some(Dir::In)
        } else if self.cfg.tracks(pkt.src_port) {
            Some(Dir::Out)
        } else {
            None
        }
    }

    /// Apply one packet seen at `ts_ns` going `dir`; the event it causes, if any.
    pub fn packet(&mut self, pkt: &Packet, dir: Dir, ts_ns: u64) -> Option<FlowEvent> {
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
    ) -> (Option<FlowEvent>, Option<PayloadSample>) {
        let key = flow_key(pkt, dir);
        let sample = self
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
        (self.event(key, pkt, dir, ts_ns), sample)
    }

    fn event(&mut self, key: FlowKey, pkt: &Packet, dir: Dir, ts_ns: u64) -> Option<FlowEvent> {
        let raw = match self.flows.get_mut(&key) {
            Some(flow) => on_packet(flow, &key, pkt, dir, ts_ns, self.cfg.gap_threshold_ns)?,
            None => {
                let (flow, ev) = open_flow(&key, pkt, dir, ts_ns)?;
                self.flows.insert(key, flow);
                ev
            }
        };
        // The state machine only emits valid kinds and directions.
        FlowEvent::from_event(raw).ok()
    }

    pub fn flows(&self) -> &HashMap<FlowKey, Flow> {
        &self.flows
    }
}
