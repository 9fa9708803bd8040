//! The upstream leg and this host's own proxy timeout.
//!
//! On a reverse proxy's host (nginx, HAProxy, Apache in front of Exchange)
//! the agent also follows the proxy's connections to Exchange: flows whose
//! client is this host and whose server port is one of `upstream_ports`.
//! The same state machine tracks them with the roles swapped (the "server"
//! is the remote side). There the proxy's own timeout shows plainly: it
//! closes a silent upstream leg while Exchange still owes the answer
//! ([`Ending::UpstreamTimeout`](super::Ending::UpstreamTimeout)), and at
//! the same moment answers the device's waiting request with an error
//! (nginx's 504 at `proxy_read_timeout`), which from the client side alone
//! looks like a heartbeat answer.
//!
//! **Pairing rule.** A client-facing answer that ended a wait of `h`
//! seconds at time `t` is the proxy's timeout when an upstream leg was
//! given up within [`PAIR_WINDOW_NS`] of `t` after a silence within
//! [`PAIR_HOLD_SECONDS`] of `h`: the same request window, both ends. It is
//! paired with that leg when exactly one leg matches; with several (devices
//! whose Pings started together) it is still the proxy's timeout, but no
//! one leg is named. Such answers are never heartbeat samples. An answer
//! waits up to [`PAIR_WINDOW_NS`] (event time) for a leg given up after it.
//! Failure cases: a proxy that keeps a timed-out upstream leg open (no
//! close to see) pairs nothing; two proxies on one host with the same
//! timeout cannot be told apart; a device that closes before the proxy's
//! give-up is seen (within the window) gets its close judged unpaired.
//!
//! **A relayed close is no give-up.** When a device's flow ends (its own
//! close, or a box's reset), the proxy closes that request's upstream leg at
//! once: a leg closed within [`PAIR_WINDOW_NS`] after a device-side close
//! whose silence matches within [`PAIR_HOLD_SECONDS`] was the device's
//! close relayed, not this host's timeout.

use std::{
    collections::{HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
};

use monitor_common::FlowKey;

use super::path::PathKey;
use crate::event::client_of;

/// An answer and a give-up this close in time can be one request's ends.
pub const PAIR_WINDOW_NS: u64 = 1_000_000_000;
/// ... and their silences this close (seconds).
pub const PAIR_HOLD_SECONDS: f64 = 1.0;
/// Answers and give-ups remembered at once (a proxy host under a storm of
/// timeouts pairs the most recent; older ones are judged unpaired).
const KEPT: usize = 4096;
/// Give-ups are kept this long for answers still waiting.
const GIVE_UPS_KEPT_NS: u64 = 3 * PAIR_WINDOW_NS;

/// This host gave up on an upstream leg while the server owed an answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct GiveUp {
    pub at_ns: u64,
    pub silence_s: f64,
    pub server: SocketAddr,
    pub path: PathKey,
}

/// A client-facing answer after a wait, not yet judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Answer {
    pub key: FlowKey,
    pub path: PathKey,
    pub at_ns: u64,
    /// How long the device had waited (its request's hold time, or the
    /// silence before the send where the request looked answered).
    pub hold_s: f64,
    /// `hold_s` is a hold time (a heartbeat sample unless the proxy's).
    pub is_hold: bool,
    /// The client was heard after it (a delivered hold time).
    pub delivered: bool,
}

/// What a client-facing answer was.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Judged {
    /// The server's answer: a hold time like any other.
    Answer,
    /// The proxy's timeout: its upstream leg on `path` was given up at the
    /// same moment; `leg` the one leg when exactly one matched.
    ProxyTimeout {
        path: PathKey,
        leg: Option<SocketAddr>,
    },
}

/// Which flows are upstream legs, and the answers awaiting their judgement.
#[derive(Debug, Default)]
pub struct Upstream {
    ports: Vec<u16>,
    local: HashSet<IpAddr>,
    give_ups: VecDeque<GiveUp>,
    answers: VecDeque<Answer>,
    /// Recent closes of devices' flows: (when, the silence before).
    device_closes: VecDeque<(u64, f64)>,
}

impl Upstream {
    /// Follow flows from `local` addresses to `ports` as upstream legs.
    pub fn set(&mut self, ports: &[u16], local: impl IntoIterator<Item = IpAddr>) {
        self.ports = ports.to_vec();
        self.set_local(local);
    }

    /// This host's addresses (they change: DHCP, a floating address).
    pub fn set_local(&mut self, local: impl IntoIterator<Item = IpAddr>) {
        self.local = local.into_iter().map(|a| a.to_canonical()).collect();
    }

    /// Upstream legs are followed: this host is a proxy.
    pub fn enabled(&self) -> bool {
        !self.ports.is_empty()
    }

    /// Is `key`'s server this host (a device's flow to the proxy, not one
    /// forwarded through a router)?
    pub fn serves(&self, key: &FlowKey) -> bool {
        self.enabled()
            && self
                .local
                .contains(&crate::event::server_of(key).ip().to_canonical())
    }

    /// A device's flow to this host closed at `at_ns` after `silence_s`.
    pub(super) fn device_closed(&mut self, at_ns: u64, silence_s: f64) {
        if self.device_closes.len() >= KEPT {
            self.device_closes.pop_front();
        }
        self.device_closes.push_back((at_ns, silence_s));
        while self
            .device_closes
            .front()
            .is_some_and(|(t, _)| at_ns.saturating_sub(*t) > GIVE_UPS_KEPT_NS)
        {
            self.device_closes.pop_front();
        }
    }

    /// A leg closed at `at_ns` after `silence_s` just after a device's flow
    /// closed after the same silence: the device's close, relayed.
    pub(super) fn relays_a_device_close(&self, at_ns: u64, silence_s: f64) -> bool {
        self.device_closes.iter().any(|(t, s)| {
            *t <= at_ns && at_ns - t <= PAIR_WINDOW_NS && (s - silence_s).abs() <= PAIR_HOLD_SECONDS
        })
    }

    /// Forget the waiting answers of flow `key` (its "answer" was the
    /// proxy's own close: a TLS alert before its FIN).
    pub(super) fn forget_answers_of(&mut self, key: &FlowKey) {
        self.answers.retain(|a| a.key != *key);
    }

    /// Is `key` an upstream leg: this host its client, the port an upstream one?
    pub fn is_upstream(&self, key: &FlowKey) -> bool {
        self.enabled()
            && self.ports.contains(&key.server_port)
            && self.local.contains(&client_of(key).ip().to_canonical())
    }

    pub(super) fn gave_up(&mut self, g: GiveUp) {
        if self.give_ups.len() >= KEPT {
            self.give_ups.pop_front();
        }
        self.give_ups.push_back(g);
    }

    /// Keep a client-facing answer until a give-up could still match it.
    pub(super) fn answered(&mut self, a: Answer) -> Option<Answer> {
        let evicted = (self.answers.len() >= KEPT)
            .then(|| self.answers.pop_front())
            .flatten();
        self.answers.push_back(a);
        evicted
    }

    /// `client` was heard after its answer at `end_ns`: true if that
    /// answer is still waiting (its hold time waits with it).
    pub(super) fn deliver_of(&mut self, client: IpAddr, end_ns: u64) -> bool {
        match self
            .answers
            .iter_mut()
            .find(|a| a.at_ns == end_ns && client_of(&a.key).ip() == client)
        {
            Some(a) => {
                a.delivered = true;
                true
            }
            None => false,
        }
    }

    /// What an answer was, by the give-ups known now.
    pub(super) fn judge(&self, a: &Answer) -> Judged {
        let mut matching = self.give_ups.iter().filter(|g| {
            g.at_ns.abs_diff(a.at_ns) <= PAIR_WINDOW_NS
                && (g.silence_s - a.hold_s).abs() <= PAIR_HOLD_SECONDS
        });
        let Some(first) = matching.next() else {
            return Judged::Answer;
        };
        let one = matching.next().is_none();
        Judged::ProxyTimeout {
            path: first.path,
            leg: one.then_some(first.server),
        }
    }

    /// The latest waiting answer on flow `key` that was the proxy's
    /// timeout, if any: the flow's close right after it is that timeout's.
    pub(super) fn timed_out_answer(&self, key: &FlowKey) -> Option<(Answer, Judged)> {
        self.answers
            .iter()
            .rev()
            .find(|a| a.key == *key)
            .map(|a| (*a, self.judge(a)))
            .filter(|(_, j)| *j != Judged::Answer)
    }

    /// Answers whose window has passed by `now_ns` (all with `None`),
    /// judged, oldest first; old give-ups are forgotten.
    pub(super) fn due(&mut self, now_ns: Option<u64>) -> Vec<(Answer, Judged)> {
        let mut out = Vec::new();
        while let Some(a) = self.answers.front().copied() {
            if now_ns.is_some_and(|now| now < a.at_ns.saturating_add(PAIR_WINDOW_NS)) {
                break;
            }
            self.answers.pop_front();
            out.push((a, self.judge(&a)));
        }
        if let Some(now) = now_ns {
            while self
                .give_ups
                .front()
                .is_some_and(|g| now.saturating_sub(g.at_ns) > GIVE_UPS_KEPT_NS)
            {
                self.give_ups.pop_front();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(client: [u8; 4], port: u16) -> FlowKey {
        let mut k = FlowKey {
            client_addr: [0; 16],
            server_addr: [0; 16],
            client_port: 40000,
            server_port: port,
            family: monitor_common::FAMILY_V4,
            _pad: [0; 3],
        };
        k.client_addr[..4].copy_from_slice(&client);
        k.server_addr[..4].copy_from_slice(&[192, 0, 2, 1]);
        k
    }

    fn exchange() -> SocketAddr {
        "192.0.2.1:443".parse().unwrap()
    }

    fn give_up(at_ns: u64, silence_s: f64) -> GiveUp {
        GiveUp {
            at_ns,
            silence_s,
            server: exchange(),
            path: PathKey::upstream(exchange().ip(), 443),
        }
    }

    fn answer(at_ns: u64, hold_s: f64) -> Answer {
        Answer {
            key: key([100, 64, 1, 10], 443),
            path: PathKey::test(1),
            at_ns,
            hold_s,
            is_hold: true,
            delivered: false,
        }
    }

    #[test]
    fn a_flow_from_this_host_to_an_upstream_port_is_an_upstream_leg() {
        let mut u = Upstream::default();
        let leg = key([192, 0, 2, 11], 443);
        assert!(!u.is_upstream(&leg), "nothing is upstream until asked");
        u.set(&[443], ["192.0.2.11".parse().unwrap()]);
        assert!(u.is_upstream(&leg));
        // A device's flow to this host: its client is not ours.
        assert!(!u.is_upstream(&key([100, 64, 1, 10], 443)));
        // Another remote port is not an upstream one.
        assert!(!u.is_upstream(&key([192, 0, 2, 11], 8443)));
    }

    #[test]
    fn an_answer_at_the_moment_and_silence_of_one_give_up_is_paired_with_that_leg() {
        let mut u = Upstream::default();
        u.gave_up(give_up(100 * S, 60.0));
        let j = u.judge(&answer(100 * S + S / 100, 60.01));
        assert_eq!(
            j,
            Judged::ProxyTimeout {
                path: PathKey::upstream(exchange().ip(), 443),
                leg: Some(exchange())
            }
        );
    }

    #[test]
    fn an_answer_matching_two_give_ups_is_the_proxys_but_names_no_leg() {
        let mut u = Upstream::default();
        u.gave_up(give_up(100 * S, 60.0));
        u.gave_up(give_up(100 * S + S / 2, 60.3));
        assert!(matches!(
            u.judge(&answer(100 * S + S / 4, 60.2)),
            Judged::ProxyTimeout { leg: None, .. }
        ));
    }

    #[test]
    fn an_answer_at_another_moment_or_after_another_wait_is_the_servers() {
        let mut u = Upstream::default();
        u.gave_up(give_up(100 * S, 60.0));
        // The same moment, another wait: another request's answer.
        assert_eq!(u.judge(&answer(100 * S, 40.0)), Judged::Answer);
        // The same wait, seconds apart: another request's.
        assert_eq!(u.judge(&answer(103 * S, 60.0)), Judged::Answer);
    }

    #[test]
    fn an_answer_waits_for_a_give_up_seen_after_it_then_is_judged_once() {
        let mut u = Upstream::default();
        u.answered(answer(100 * S, 60.0));
        // Its give-up comes a moment later (the proxy closed its leg after writing the error).
        u.gave_up(give_up(100 * S + S / 1000, 60.0));
        assert!(
            u.due(Some(100 * S + S / 2)).is_empty(),
            "still in its window"
        );
        let judged = u.due(Some(101 * S + 1));
        assert_eq!(judged.len(), 1);
        assert!(matches!(judged[0].1, Judged::ProxyTimeout { .. }));
        assert!(u.due(None).is_empty(), "judged once");
    }

    #[test]
    fn a_delivered_mark_reaches_only_a_waiting_answer() {
        let mut u = Upstream::default();
        let a = answer(100 * S, 30.0);
        u.answered(a);
        let client = client_of(&a.key).ip();
        assert!(u.deliver_of(client, a.at_ns));
        assert!(!u.deliver_of(client, a.at_ns + 1), "another answer's");
        let judged = u.due(None);
        assert!(judged[0].0.delivered);
        assert!(!u.deliver_of(client, a.at_ns), "judged: no longer waiting");
    }
}
