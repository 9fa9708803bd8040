//! The kernel's per-packet logic, run in user space on timestamped packets:
//! the same state machine (`monitor-common`), a plain `HashMap` for the flow
//! table. Offline analysis and the detector's tests drive it.

use std::collections::HashMap;

use monitor_common::{
    flow::{flow_key, open_flow},
    on_packet, Config, Dir, Flow, FlowKey, Packet,
};

use crate::event::FlowEvent;

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
        let key = flow_key(pkt, dir);
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
