//! The kernel's two tables as plain host maps, for replaying packets outside
//! the kernel (offline analysis, fuzzing). Both are bounded like the
//! kernel's, so a day of traffic (or a flood) in a capture cannot exhaust
//! memory:
//!
//! - the half-open table: when full, an arbitrary entry makes room, as the
//!   kernel's LRU would evict one;
//! - the flow table: [`HostTables::sweep`] drops closed flows once they have
//!   been idle a while (the kernel keeps them until its LRU needs the slot;
//!   a replay that never fills would keep them for ever), then the least
//!   recently seen flows beyond the capacity, as the kernel's LRU does.
//!
//! The sweep runs when the caller says (offline analysis: on the capture's
//! clock, as the agent scans the kernel table), and names what it dropped so
//! the detector's state for those flows can be retired too.

use std::collections::{HashMap, VecDeque};
use std::vec::Vec;

use crate::{
    state, Flow, FlowKey, FlowTables, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_HALF_OPEN_TABLE_SIZE,
};

pub struct HostTables {
    pub flows: HashMap<FlowKey, Flow>,
    pub half_open: HashMap<FlowKey, Flow>,
    /// Half-open entries pushed out by newer ones.
    pub half_open_evicted: u64,
    /// Second copies of a packet passed over (a mirror port's capture).
    pub duplicates: u64,
    /// Flows the table holds before the sweep evicts the least recently seen.
    pub flow_capacity: usize,
    /// Flows evicted for room (least recently seen beyond the capacity).
    pub flows_evicted: u64,
    /// Closed flows dropped after lingering idle.
    pub closed_expired: u64,
    /// Flows as they closed, oldest first: the sweep looks at these only,
    /// not at the whole table.
    closing: VecDeque<(u64, FlowKey)>,
}

impl Default for HostTables {
    fn default() -> Self {
        HostTables::with_capacity(DEFAULT_FLOW_TABLE_SIZE as usize)
    }
}

/// When a flow was last seen, either way.
fn last_seen(f: &Flow) -> u64 {
    f.first_seen_ns.max(f.last_in_ns).max(f.last_out_ns)
}

impl HostTables {
    pub fn with_capacity(flow_capacity: usize) -> Self {
        HostTables {
            flows: HashMap::new(),
            half_open: HashMap::new(),
            half_open_evicted: 0,
            duplicates: 0,
            flow_capacity: flow_capacity.max(1),
            flows_evicted: 0,
            closed_expired: 0,
            closing: VecDeque::new(),
        }
    }

    /// The flow `key` closed at `now_ns` (its `Closed` event was emitted):
    /// a candidate for [`HostTables::sweep`].
    pub fn note_closed(&mut self, key: &FlowKey, now_ns: u64) {
        self.closing.push_back((now_ns, *key));
    }

    /// Drop closed flows idle for at least `linger_ns`, then, beyond the
    /// capacity, the least recently seen; the keys dropped go to `dropped`.
    pub fn sweep(&mut self, now_ns: u64, linger_ns: u64, dropped: &mut Vec<FlowKey>) {
        self.expire_closed(now_ns, linger_ns, dropped);
        if self.flows.len() > self.flow_capacity {
            self.evict_least_recent(dropped);
        }
    }

    fn expire_closed(&mut self, now_ns: u64, linger_ns: u64, dropped: &mut Vec<FlowKey>) {
        while let Some(&(at, key)) = self.closing.front() {
            if now_ns.saturating_sub(at) < linger_ns {
                break;
            }
            self.closing.pop_front();
            let Some(f) = self.flows.get(&key) else {
                continue; // Evicted already.
            };
            if f.state & state::CLOSED == 0 {
                continue; // Reopened: noted again when it closes again.
            }
            let seen = last_seen(f);
            if now_ns.saturating_sub(seen) >= linger_ns {
                self.flows.remove(&key);
                self.closed_expired += 1;
                dropped.push(key);
            } else {
                // Stray packets after the close (a retransmitted FIN):
                // linger from the latest.
                self.closing.push_back((seen, key));
            }
        }
    }

    /// Evict the least recently seen flows down to a sixteenth below the
    /// capacity: one pass over the table frees room for many new flows, so
    /// a table kept full by a busy server is not scanned once per flow.
    fn evict_least_recent(&mut self, dropped: &mut Vec<FlowKey>) {
        let target = self.flow_capacity - self.flow_capacity / 16;
        let excess = self.flows.len().saturating_sub(target);
        if excess == 0 {
            return;
        }
        let mut seen: Vec<u64> = self.flows.values().map(last_seen).collect();
        let (_, &mut cutoff, _) = seen.select_nth_unstable(excess - 1);
        drop(seen);
        // Older than the cutoff all go; at the cutoff, as many as needed.
        let older = self
            .flows
            .values()
            .filter(|f| last_seen(f) < cutoff)
            .count();
        let mut at_cutoff = excess - older;
        let before = dropped.len();
        self.flows.retain(|k, f| {
            let s = last_seen(f);
            let keep = s > cutoff || (s == cutoff && at_cutoff == 0);
            if !keep {
                if s == cutoff {
                    at_cutoff -= 1;
                }
                dropped.push(*k);
            }
            keep
        });
        self.flows_evicted += (dropped.len() - before) as u64;
    }
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
    fn duplicate(&mut self) {
        self.duplicates += 1;
    }
}
