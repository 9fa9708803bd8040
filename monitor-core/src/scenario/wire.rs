//! Packets as the server's capture sees them, and the connection scripts
//! that make them: sequence numbers, TTLs, IP IDs and windows of each side
//! (and of the boxes that forge the client's side).

use std::net::{IpAddr, SocketAddr};

use monitor_common::{TCP_ACK, TCP_FIN, TCP_SYN};

use super::knobs::IpIdPattern;
use crate::analyze::synthetic::Segment;

pub const MS: u64 = 1_000_000;
pub const S: u64 = 1_000_000_000;
pub const SERVER_PORT: u16 = 443;
/// The server's packets are captured at the server: its own initial TTL.
pub const SERVER_TTL: u8 = 64;
const SERVER_WINDOW: u16 = 64_240;

/// Who put a packet on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Client,
    Server,
    /// A middlebox speaking for the client (its RST or a proxy's FIN).
    Middlebox,
}

/// One captured packet.
#[derive(Clone, Copy, Debug)]
pub struct Pkt {
    /// Nanoseconds from the scenario's start.
    pub at: u64,
    pub conn: usize,
    pub client: SocketAddr,
    pub origin: Origin,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: u16,
    pub ttl: u8,
    pub ip_id: u16,
    pub window: u16,
}

impl Pkt {
    pub fn inbound(&self) -> bool {
        self.origin != Origin::Server
    }

    pub(crate) fn segment(&self, server: IpAddr) -> Segment {
        let (src, dst, sport, dport) = if self.inbound() {
            (self.client.ip(), server, self.client.port(), SERVER_PORT)
        } else {
            (server, self.client.ip(), SERVER_PORT, self.client.port())
        };
        Segment {
            src,
            dst,
            sport,
            dport,
            seq: self.seq,
            ack: if self.flags & TCP_ACK != 0 {
                self.ack
            } else {
                0
            },
            flags: self.flags,
            window: self.window,
            ttl: self.ttl,
            ip_id: if self.client.is_ipv4() { self.ip_id } else { 0 },
            payload: self.payload,
        }
    }
}

/// A client stack's IPv4 IDs.
#[derive(Clone, Debug)]
pub struct IpIds {
    pattern: IpIdPattern,
    next: u16,
}

impl IpIds {
    pub fn new(pattern: IpIdPattern, rng: &mut fastrand::Rng) -> IpIds {
        IpIds {
            pattern,
            next: rng.u16(1..),
        }
    }

    /// A new connection: a per-connection counter starts afresh.
    pub fn connection(&mut self, rng: &mut fastrand::Rng) {
        if self.pattern == IpIdPattern::PerConnection {
            self.next = rng.u16(1..);
        }
    }

    pub fn take(&mut self, rng: &mut fastrand::Rng) -> u16 {
        match self.pattern {
            IpIdPattern::Random => rng.u16(1..),
            IpIdPattern::PerConnection => {
                self.next = self.next.wrapping_add(1).max(1);
                self.next
            }
            IpIdPattern::Global => {
                // Other connections of the host take IDs in between.
                self.next = self.next.wrapping_add(1 + rng.u16(0..8)).max(1);
                self.next
            }
        }
    }
}

/// A connection being scripted.
pub struct Conn {
    pub id: usize,
    /// The client as the server sees it (after NAT, or the proxy).
    pub client: SocketAddr,
    /// The client's TTL as captured.
    pub ttl: u8,
    pub window: u16,
    pub ids: IpIds,
    cseq: u32,
    sseq: u32,
    server_id: u16,
    /// The latest packet's time.
    pub now: u64,
}

impl Conn {
    pub fn new(
        id: usize,
        client: SocketAddr,
        ttl: u8,
        window: u16,
        ids: IpIds,
        rng: &mut fastrand::Rng,
    ) -> Conn {
        Conn {
            id,
            client,
            ttl,
            window,
            ids,
            cseq: rng.u32(..),
            sseq: rng.u32(..),
            server_id: rng.u16(..),
            now: 0,
        }
    }

    fn pkt(&self, at: u64, origin: Origin, flags: u8, seq: u32, ack: u32) -> Pkt {
        Pkt {
            at,
            conn: self.id,
            client: self.client,
            origin,
            flags,
            seq,
            ack,
            payload: 0,
            ttl: 0,
            ip_id: 0,
            window: 0,
        }
    }

    fn advance(seq: &mut u32, flags: u8, payload: u16) {
        let adv = u32::from(payload) + u32::from(flags & (TCP_SYN | TCP_FIN) != 0);
        *seq = seq.wrapping_add(adv);
    }

    /// A packet the client sends, seen at `at`.
    pub fn client_sends(
        &mut self,
        out: &mut Vec<Pkt>,
        rng: &mut fastrand::Rng,
        at: u64,
        flags: u8,
        payload: u16,
    ) {
        let mut p = self.pkt(at, Origin::Client, flags, self.cseq, self.sseq);
        p.payload = payload;
        p.ttl = self.ttl;
        p.ip_id = self.ids.take(rng);
        p.window = self.window;
        out.push(p);
        Self::advance(&mut self.cseq, flags, payload);
        self.now = self.now.max(at);
    }

    /// A packet the server sends; returns its sequence number (for retransmitting).
    pub fn server_sends(&mut self, out: &mut Vec<Pkt>, at: u64, flags: u8, payload: u16) -> u32 {
        let seq = self.sseq;
        self.server_resends(out, at, flags, payload, seq);
        Self::advance(&mut self.sseq, flags, payload);
        seq
    }

    /// The server sends `payload` bytes from `seq` again.
    pub fn server_resends(
        &mut self,
        out: &mut Vec<Pkt>,
        at: u64,
        flags: u8,
        payload: u16,
        seq: u32,
    ) {
        let mut p = self.pkt(at, Origin::Server, flags, seq, self.cseq);
        p.payload = payload;
        p.ttl = SERVER_TTL;
        self.server_id = self.server_id.wrapping_add(1);
        p.ip_id = self.server_id;
        p.window = SERVER_WINDOW;
        out.push(p);
        self.now = self.now.max(at);
    }

    /// An injector's RSTs in the client's name that does not track the
    /// connection: the client's window copied, a spray of sequence numbers a
    /// segment apart to cover data in flight, 50 us apart, the exact one
    /// (the only one a modern stack accepts) first or last.
    #[allow(clippy::too_many_arguments)]
    pub fn middlebox_sprays(
        &mut self,
        out: &mut Vec<Pkt>,
        at: u64,
        flags: u8,
        ttl: u8,
        ip_id: u16,
        exact_first: bool,
    ) {
        const SEGMENT: u32 = 1460;
        let aheads = if exact_first {
            [0, SEGMENT, 2 * SEGMENT]
        } else {
            [SEGMENT, 2 * SEGMENT, 0]
        };
        let window = self.window;
        for (k, ahead) in aheads.into_iter().enumerate() {
            let seq = self.cseq.wrapping_add(ahead);
            let id = ip_id.wrapping_add(k as u16);
            self.forged(out, at + k as u64 * 50_000, flags, seq, (ttl, id, window));
        }
    }

    /// One packet a middlebox writes in the client's name at `seq`, with
    /// its (TTL, IP ID, window).
    fn forged(&mut self, out: &mut Vec<Pkt>, at: u64, flags: u8, seq: u32, ip: (u8, u16, u16)) {
        let mut p = self.pkt(at, Origin::Middlebox, flags, seq, self.sseq);
        (p.ttl, p.ip_id, p.window) = ip;
        out.push(p);
        self.now = self.now.max(at);
    }

    /// A middlebox's packet in the client's name (an RST, a proxy's FIN).
    #[allow(clippy::too_many_arguments)]
    pub fn middlebox_sends(
        &mut self,
        out: &mut Vec<Pkt>,
        at: u64,
        flags: u8,
        ttl: u8,
        ip_id: u16,
        window: u16,
    ) {
        self.forged(out, at, flags, self.cseq, (ttl, ip_id, window));
        Self::advance(&mut self.cseq, flags, 0);
    }
}
