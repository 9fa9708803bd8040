//! Client-side resets held back briefly before their verdict. An injector
//! that does not track the connection sprays RSTs with several sequence
//! numbers to land one in the window, microseconds apart; a client's stack
//! (or a box answering segment by segment) repeats the number it expects.
//! Where nothing else has decided a reset (its TTL, the next-packet timing),
//! such a burst can: so a reset the client might have sent waits up to
//! [`RESET_BURST_WINDOW`] (in event time) for the kernel's one report of a
//! second RST on the flow.

use std::{net::IpAddr, time::Duration};

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
    pub(super) flow: FlowTrack,
}

impl HeldClose {
    fn due(&self, now_ns: u64) -> bool {
        now_ns > self.ev.raw.ts_ns + RESET_BURST_WINDOW.as_nanos() as u64
    }
}

impl Detector {
    /// Hold the close `ev` of `flow` when a burst could still decide it (a
    /// client-side RST after a silence that would otherwise be the
    /// client's own, or a proxy timeout); else hand the flow back to be
    /// judged now.
    pub(super) fn hold(
        &mut self,
        ev: &FlowEvent,
        flow: FlowTrack,
        out: &mut Vec<Output>,
    ) -> Option<FlowTrack> {
        // An upstream leg's client is this host: its reset is its own.
        if !ev.is_rst() || ev.dir != monitor_common::Dir::In || flow.upstream {
            return Some(flow);
        }
        let facts = self.close_facts(ev, &flow);
        if facts.silence < facts.min_silence {
            // A burst decides nothing without a silence before it.
            return Some(flow);
        }
        let mut evidence = facts.evidence(ev);
        if !matches!(
            classify_close(&facts, &mut evidence),
            Ending::ClientReset | Ending::ProxyTimeout
        ) {
            return Some(flow);
        }
        // The same 4-tuple's earlier close (the tuple reopened meanwhile),
        // or no room: judged now, nothing overwritten.
        if let Some(old) = self.held.remove(&ev.raw.key) {
            self.conclude(&old.ev, old.flow, false, out);
        }
        if self.held.len() >= HELD_MAX {
            return Some(flow);
        }
        self.held.insert(ev.raw.key, HeldClose { ev: *ev, flow });
        None
    }

    /// Judge the held closes whose window has passed by `now_ns`.
    pub(super) fn conclude_held_due(&mut self, now_ns: u64, out: &mut Vec<Output>) {
        self.conclude_held_where(out, |h| h.due(now_ns));
    }

    /// Judge the held closes of `client` (it reconnects: churn needs them).
    pub(super) fn conclude_held_of(&mut self, client: IpAddr, out: &mut Vec<Output>) {
        self.conclude_held_where(out, |h| h.ev.client().ip() == client);
    }

    /// The end of the input (a capture's end, the agent's exit): judge
    /// every held close.
    pub fn conclude_held(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        self.conclude_held_where(&mut out, |_| true);
        self.judge_answers(None, &mut out);
        out
    }

    /// Judge the held closes `pick` selects, oldest first (the map's own
    /// order would differ from run to run).
    fn conclude_held_where(&mut self, out: &mut Vec<Output>, pick: impl Fn(&HeldClose) -> bool) {
        if self.held.is_empty() {
            return;
        }
        let mut keys: Vec<(u64, FlowKey)> = self
            .held
            .iter()
            .filter(|(_, h)| pick(h))
            .map(|(k, h)| (h.ev.raw.ts_ns, *k))
            .collect();
        keys.sort_unstable();
        for (_, key) in keys {
            if let Some(h) = self.held.remove(&key) {
                self.conclude(&h.ev, h.flow, false, out);
            }
        }
    }

    /// The kernel's one report of a second client-side RST on a closed flow.
    /// A burst when it came within the window with another sequence number:
    /// the held verdict gets the signal, and the path (if followed) counts it.
    pub(super) fn reset_again(&mut self, ev: &FlowEvent, out: &mut Vec<Output>) {
        let quick = ev.since_client().is_some_and(|d| d <= RESET_BURST_WINDOW);
        let burst = quick && ev.raw.seq != ev.raw.first_rst_seq;
        if let Some(h) = self.held.remove(&ev.raw.key) {
            self.conclude(&h.ev, h.flow, burst, out);
        }
        if burst {
            let path = self.path_of_key(&ev.raw.key);
            if let Some(p) = self.paths.get_mut(&path) {
                p.reset_bursts += 1;
            }
        }
    }
}
