//! Client-side resets held back briefly before their verdict. An injector
//! that does not track the connection sprays RSTs with several sequence
//! numbers to land one in the window, microseconds apart; a client's stack
//! (or a box answering segment by segment) repeats the number it expects.
//! Where nothing else has decided a reset (its TTL, the next-packet timing),
//! such a burst can: so a reset the client might have sent waits up to
//! [`RESET_BURST_WINDOW`] (in event time) for the kernel's one report of a
//! second RST on the flow.

use std::time::Duration;

use monitor_common::FlowKey;

use super::{classify_close, Detector, Ending, FlowTrack, Output};
use crate::event::FlowEvent;

/// A second RST within this of the first belongs to the same burst.
pub(super) const RESET_BURST_WINDOW: Duration = Duration::from_millis(100);

/// Resets held at once, at most: beyond, a reset is judged without waiting
/// (so a flood of resets costs no memory).
const HELD_MAX: usize = 4096;

/// A closed flow whose verdict waits for a possible burst.
pub(super) struct HeldClose {
    ev: FlowEvent,
    flow: FlowTrack,
}

impl HeldClose {
    fn due(&self, now_ns: u64) -> bool {
        now_ns > self.ev.raw.ts_ns + RESET_BURST_WINDOW.as_nanos() as u64
    }
}

impl Detector {
    /// Hold the close `ev` of `flow` when a burst could still decide it (a
    /// client-side RST that would otherwise be the client's own, or a proxy
    /// timeout); else hand the flow back to be judged now.
    pub(super) fn hold(&mut self, ev: &FlowEvent, flow: FlowTrack) -> Option<FlowTrack> {
        if !ev.is_rst() || ev.dir != monitor_common::Dir::In || self.held.len() >= HELD_MAX {
            return Some(flow);
        }
        let facts = self.close_facts(ev, &flow);
        let mut evidence = facts.evidence(ev);
        match classify_close(&facts, &mut evidence) {
            Ending::ClientReset | Ending::ProxyTimeout => {
                self.held.insert(ev.raw.key, HeldClose { ev: *ev, flow });
                None
            }
            _ => Some(flow),
        }
    }

    /// Judge the held closes whose window has passed by `now_ns`.
    pub(super) fn conclude_held_due(&mut self, now_ns: u64, out: &mut Vec<Output>) {
        if self.held.is_empty() {
            return;
        }
        let due: Vec<FlowKey> = self
            .held
            .iter()
            .filter(|(_, h)| h.due(now_ns))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            if let Some(h) = self.held.remove(&key) {
                self.conclude(&h.ev, h.flow, false, out);
            }
        }
    }

    /// The end of the input (a capture's end): judge every held close.
    pub fn conclude_held(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        let held: Vec<HeldClose> = self.held.drain().map(|(_, h)| h).collect();
        for h in held {
            self.conclude(&h.ev, h.flow, false, &mut out);
        }
        out
    }

    /// The kernel's one report of a second client-side RST on a closed flow.
    /// A burst when it came within the window with another sequence number:
    /// the held verdict gets the signal, and the path counts it.
    pub(super) fn reset_again(&mut self, ev: &FlowEvent, out: &mut Vec<Output>) {
        let quick = ev.since_client().is_some_and(|d| d <= RESET_BURST_WINDOW);
        let burst = quick && ev.raw.seq != ev.raw.first_rst_seq;
        if burst {
            let path = self.path_of(ev.client().ip(), ev.server().port());
            self.path_mut(path, ev.raw.ts_ns).reset_bursts += 1;
        }
        if let Some(h) = self.held.remove(&ev.raw.key) {
            self.conclude(&h.ev, h.flow, burst, out);
        }
    }
}
