//! The kernel's two tables as plain host maps, for replaying packets outside
//! the kernel (offline analysis, fuzzing). The half-open table is bounded like
//! the kernel's, so a flood in a capture cannot exhaust memory; when it is
//! full an arbitrary entry makes room, as the kernel's LRU would evict one.

use std::collections::HashMap;

use crate::{Flow, FlowKey, FlowTables, DEFAULT_HALF_OPEN_TABLE_SIZE};

#[derive(Default)]
pub struct HostTables {
    pub flows: HashMap<FlowKey, Flow>,
    pub half_open: HashMap<FlowKey, Flow>,
    /// Half-open entries pushed out by newer ones.
    pub half_open_evicted: u64,
}

impl FlowTables for HostTables {
    fn flow(&mut self, key: &FlowKey) -> Option<&mut Flow> {
        self.flows.get_mut(key)
    }
    fn half_open(&mut self, key: &FlowKey) -> Option<&mut Flow> {
        self.half_open.get_mut(key)
    }
    fn insert_flow(&mut self, key: &FlowKey, flow: Flow) {
        self.flows.insert(*key, flow);
    }
    fn insert_half_open(&mut self, key: &FlowKey, flow: Flow) {
        if self.half_open.len() >= DEFAULT_HALF_OPEN_TABLE_SIZE as usize {
            if let Some(k) = self.half_open.keys().next().copied() {
                self.half_open.remove(&k);
                self.half_open_evicted += 1;
            }
        }
        self.half_open.insert(*key, flow);
    }
    fn remove_half_open(&mut self, key: &FlowKey) {
        self.half_open.remove(key);
    }
}
