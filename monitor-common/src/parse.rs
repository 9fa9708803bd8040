//! Bounds-checked header parsing over any byte source: a packet in the kernel
//! (XDP or TC) or a slice on the host (tests, captures, fuzzing).
//!
//! Ethernet, one optional 802.1Q tag, IPv4 (options skipped) or IPv6 (a bounded
//! chain of extension headers skipped), then TCP. Anything else is "not ours".

use crate::types::{Config, FAMILY_V4, FAMILY_V6};

/// A source of packet bytes. Reads take a whole fixed-size header at once,
/// bounds-checked, and return `None` past the end. One check per header keeps
/// the kernel verifier happy (a one-byte check can be folded by LLVM into a
/// form the verifier cannot use) and costs fewer instructions.
///
/// A read is a reference into the frame, not a copy: fields are then loaded
/// where they are used, as wide loads (a copied header array is split into
/// single bytes and spilled to the stack).
pub trait Frame {
    fn read<const N: usize>(&self, off: usize) -> Option<&[u8; N]>;
}

impl Frame for [u8] {
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<&[u8; N]> {
        self.get(off..off.checked_add(N)?)?.try_into().ok()
    }
}

#[inline(always)]
fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

#[inline(always)]
fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Why a frame was not turned into a [`Packet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not IPv4/IPv6 (ARP, LLDP, stacked VLANs...): not ours, not an error.
    NotIp,
    /// IP but not TCP, or a non-first fragment: not ours, not an error.
    NotTcp,
    /// Ends inside a header it announces.
    Truncated,
    /// A header field is impossible (IHL < 5, TCP data offset < 5, bad version...).
    Malformed,
}

impl ParseError {
    /// Failures are counted; "not ours" is not.
    pub fn is_failure(self) -> bool {
        matches!(self, ParseError::Truncated | ParseError::Malformed)
    }
}

/// The header fields the state machine needs from one TCP packet.
///
/// A fixed layout, aligned to 8 with the addresses first: the kernel builds
/// addresses as 8-byte words, and a word the verifier finds misaligned on
/// the stack is refused (the object allows misaligned packet loads, so
/// LLVM merges stores freely).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Packet {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub seq: u32,
    pub ack: u32,
    /// Bytes of IP packet (header included), as the IP header states.
    pub ip_len: u32,
    /// TCP payload bytes, as the headers state (not what was captured).
    pub payload_len: u32,
    /// Offset of the TCP payload from the start of the frame.
    pub payload_off: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub ip_id: u16,
    pub window: u16,
    pub family: u8,
    pub tcp_flags: u8,
    pub ttl: u8,
}
const _: () = assert!(core::mem::size_of::<Packet>() == 64);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
/// How many IPv6 extension headers we walk before giving up (verifier bound).
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

/// What a glance at the first header bytes says, before the full parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Glance {
    /// IPv4/IPv6 without options to skip, not TCP; or not IP at all.
    NotTcp,
    /// TCP, with this local port (the destination for ingress, the source
    /// for egress).
    LocalPort(u16),
    /// Needs the full parse to say (VLAN tag, IPv6 extension headers,
    /// fragments, truncation, malformed headers).
    Unsure,
}

/// A cheap first look: settles most packets (not for a tracked port) in a
/// few loads, never deciding anything the full parse would count as a
/// failure. The kernel's first step before [`quick`] replaced it; kept as
/// the reference the property test holds [`quick`] to (glance, then the
/// full parse, must agree with the one pass wherever it settles a frame).
#[inline(always)]
pub fn glance<F: Frame + ?Sized>(f: &F, ingress: bool) -> Glance {
    // Ethernet header and the first 10 bytes of an IP header, in one read.
    let Some(h): Option<&[u8; 24]> = f.read(0) else {
        return Glance::Unsure;
    };
    let (l4, proto_ok) = match be16(h, 12) {
        ETH_P_IP => {
            if h[14] >> 4 != 4 || h[14] & 0x0f < 5 || be16(h, 20) & 0x1fff != 0 {
                return Glance::Unsure;
            }
            (
                ETH_HLEN + ((h[14] & 0x0f) as usize) * 4,
                h[23] == IPPROTO_TCP,
            )
        }
        ETH_P_IPV6 => {
            if h[14] >> 4 != 6 {
                return Glance::Unsure;
            }
            match h[20] {
                IPPROTO_TCP => (ETH_HLEN + IPV6_HLEN, true),
                // Extension headers the full parse walks.
                0 | 43 | 44 | 60 => return Glance::Unsure,
                _ => return Glance::NotTcp,
            }
        }
        ETH_P_8021Q | ETH_P_8021AD => return Glance::Unsure,
        _ => return Glance::NotTcp,
    };
    if !proto_ok {
        return Glance::NotTcp;
    }
    let Some(ports): Option<&[u8; 4]> = f.read(l4) else {
        return Glance::Unsure;
    };
    Glance::LocalPort(if ingress {
        be16(ports, 2)
    } else {
        be16(ports, 0)
    })
}

/// What the kernel's one pass over a frame says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quick {
    /// Not TCP to a tracked port, settled without a failure to count.
    Pass,
    /// TCP to the tracked port at this index, parsed in full: what
    /// [`parse_ethernet`] returns for the frame.
    Tracked(Packet, u32),
    /// Not settled here (VLAN tags, IPv6 extension headers, short or
    /// malformed headers of tracked or unknown ports): [`parse_ethernet`]
    /// decides.
    Unsure,
}

/// The common frames in one pass: plain IPv4 or IPv6 (no VLAN tag, no
/// extension headers) with a whole TCP header. Reads each header once,
/// checks the local port against `cfg` as soon as it is known, and for a
/// tracked port finishes the parse from the headers already read; a frame
/// it leaves, the glance may still pass. Whatever it settles, it settles
/// exactly as [`glance`] then [`parse_ethernet`] would, and whatever the
/// glance settles, it passes (a property test holds it to both).
#[inline(always)]
pub fn quick<F: Frame + ?Sized>(f: &F, ingress: bool, cfg: &Config) -> Quick {
    match one_pass(f, ingress, cfg) {
        // Short frames and the rest: what the glance settles (not TCP, or
        // another port) is passed too, so traffic for other ports is never
        // a full parse, a counted failure or a pull of the skb.
        Quick::Unsure => match glance(f, ingress) {
            Glance::NotTcp => Quick::Pass,
            Glance::LocalPort(p) if !cfg.tracks(p) => Quick::Pass,
            _ => Quick::Unsure,
        },
        settled => settled,
    }
}

#[inline(always)]
fn one_pass<F: Frame + ?Sized>(f: &F, ingress: bool, cfg: &Config) -> Quick {
    // Ethernet and a 20-byte IPv4 header (or the start of IPv6) in one read.
    let Some(h): Option<&[u8; ETH_HLEN + 20]> = f.read(0) else {
        return Quick::Unsure;
    };
    // Compared as loaded (network order), not swapped first.
    match u16::from_ne_bytes([h[12], h[13]]) {
        NE_ETH_P_IP => quick_v4(f, ingress, cfg, h),
        NE_ETH_P_IPV6 => quick_v6(f, ingress, cfg),
        NE_ETH_P_8021Q | NE_ETH_P_8021AD => Quick::Unsure,
        _ => Quick::Pass,
    }
}

/// A big-endian 16-bit field's value as a native load reads it.
const fn ne(v: u16) -> u16 {
    u16::from_ne_bytes(v.to_be_bytes())
}
const NE_ETH_P_IP: u16 = ne(ETH_P_IP);
const NE_ETH_P_IPV6: u16 = ne(ETH_P_IPV6);
const NE_ETH_P_8021Q: u16 = ne(ETH_P_8021Q);
const NE_ETH_P_8021AD: u16 = ne(ETH_P_8021AD);
/// The fragment offset bits of IPv4's flags-and-offset field.
const NE_FRAG_OFFSET: u16 = ne(0x1fff);

#[inline(always)]
fn quick_v4<F: Frame + ?Sized>(f: &F, ingress: bool, cfg: &Config, h: &[u8; 34]) -> Quick {
    let vihl = h[ETH_HLEN];
    // Version 4 with a header length of at least 5 words: 0x45..=0x4f.
    if vihl.wrapping_sub(0x45) > 0x0a {
        return Quick::Unsure;
    }
    // Non-first fragments and other protocols: "not TCP", never a failure.
    if h[23] != IPPROTO_TCP || u16::from_ne_bytes([h[20], h[21]]) & NE_FRAG_OFFSET != 0 {
        return Quick::Pass;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let l4 = ETH_HLEN + ihl;
    let Some(t): Option<&[u8; 20]> = f.read(l4) else {
        return Quick::Unsure;
    };
    let Some(index) = cfg.port_index(local_port(t, ingress)) else {
        return Quick::Pass;
    };
    // The IPv4 header, the end of the read above (no second bounds check).
    let Some(ip) = h.last_chunk::<20>() else {
        return Quick::Unsure;
    };
    let total_len = be16(ip, 2) as u32;
    if total_len < ihl as u32 {
        return Quick::Unsure;
    }
    match tcp_fields(t, l4, total_len - ihl as u32, v4_packet(ip)) {
        Ok(p) => Quick::Tracked(p, index),
        Err(_) => Quick::Unsure,
    }
}

#[inline(always)]
fn quick_v6<F: Frame + ?Sized>(f: &F, ingress: bool, cfg: &Config) -> Quick {
    let Some(ip): Option<&[u8; IPV6_HLEN]> = f.read(ETH_HLEN) else {
        return Quick::Unsure;
    };
    if ip[0] >> 4 != 6 {
        return Quick::Unsure;
    }
    match ip[6] {
        IPPROTO_TCP => {}
        // Extension headers: the full parse walks them.
        0 | 43 | 44 | 60 => return Quick::Unsure,
        _ => return Quick::Pass,
    }
    let l4 = ETH_HLEN + IPV6_HLEN;
    let Some(t): Option<&[u8; 20]> = f.read(l4) else {
        return Quick::Unsure;
    };
    let Some(index) = cfg.port_index(local_port(t, ingress)) else {
        return Quick::Pass;
    };
    match tcp_fields(t, l4, be16(ip, 4) as u32, v6_packet(ip)) {
        Ok(p) => Quick::Tracked(p, index),
        Err(_) => Quick::Unsure,
    }
}

/// The destination port for ingress, the source port for egress.
#[inline(always)]
fn local_port(t: &[u8; 20], ingress: bool) -> u16 {
    if ingress {
        be16(t, 2)
    } else {
        be16(t, 0)
    }
}

/// Parse an Ethernet frame down to TCP.
#[inline(always)]
pub fn parse_ethernet<F: Frame + ?Sized>(f: &F) -> Result<Packet, ParseError> {
    let eth: &[u8; ETH_HLEN] = f.read(0).ok_or(ParseError::Truncated)?;
    let mut ethertype = be16(eth, 12);
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        // One tag only: stacked tags (QinQ) fall through as "not IP".
        let tag: &[u8; 4] = f.read(ETH_HLEN).ok_or(ParseError::Truncated)?;
        ethertype = be16(tag, 2);
        l3 += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(f, l3),
        ETH_P_IPV6 => parse_ipv6(f, l3),
        _ => Err(ParseError::NotIp),
    }
}

/// Parse from an IP header at `l3` (raw-IP captures).
#[inline(always)]
pub fn parse_ip<F: Frame + ?Sized>(f: &F, l3: usize) -> Result<Packet, ParseError> {
    let v: &[u8; 1] = f.read(l3).ok_or(ParseError::Truncated)?;
    match v[0] >> 4 {
        4 => parse_ipv4(f, l3),
        6 => parse_ipv6(f, l3),
        _ => Err(ParseError::Malformed),
    }
}

#[inline(always)]
fn parse_ipv4<F: Frame + ?Sized>(f: &F, l3: usize) -> Result<Packet, ParseError> {
    let h: &[u8; 20] = f.read(l3).ok_or(ParseError::Truncated)?;
    if h[0] >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(ParseError::Malformed);
    }
    let total_len = be16(h, 2) as u32;
    if h[9] != IPPROTO_TCP || be16(h, 6) & 0x1fff != 0 {
        // Non-first fragments carry no TCP header.
        return Err(ParseError::NotTcp);
    }
    if total_len < ihl as u32 {
        return Err(ParseError::Malformed);
    }
    parse_tcp(f, l3 + ihl, total_len - ihl as u32, v4_packet(h))
}

/// The IPv4 header's share of a [`Packet`].
#[inline(always)]
fn v4_packet(h: &[u8; 20]) -> Packet {
    let mut p = Packet {
        family: FAMILY_V4,
        ttl: h[8],
        ip_id: be16(h, 4),
        ip_len: be16(h, 2) as u32,
        ..Packet::default()
    };
    p.src_addr = v4_addr(h, 12);
    p.dst_addr = v4_addr(h, 16);
    p
}

/// An IPv4 address at `i` in its 16-byte field, built as one wide value:
/// written byte by byte, the kernel's copy of the packet is split into
/// single bytes and spilled to the stack.
#[inline(always)]
fn v4_addr(h: &[u8; 20], i: usize) -> [u8; 16] {
    (u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]) as u128).to_le_bytes()
}

#[inline(always)]
fn parse_ipv6<F: Frame + ?Sized>(f: &F, l3: usize) -> Result<Packet, ParseError> {
    let h: &[u8; IPV6_HLEN] = f.read(l3).ok_or(ParseError::Truncated)?;
    if h[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload_len = be16(h, 4) as u32;
    let mut next = h[6];
    let mut off = l3 + IPV6_HLEN;
    let mut ext_len: u32 = 0;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        // Every extension header we skip is at least 8 bytes: read them whole.
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units, minus one.
            0 | 43 | 60 => {
                let e: &[u8; 8] = f.read(off).ok_or(ParseError::Truncated)?;
                let len = (e[1] as usize + 1) * 8;
                next = e[0];
                off += len;
                ext_len += len as u32;
            }
            // Fragment header: fixed 8 bytes; only the first fragment carries TCP.
            44 => {
                let e: &[u8; 8] = f.read(off).ok_or(ParseError::Truncated)?;
                if be16(e, 2) & 0xfff8 != 0 {
                    return Err(ParseError::NotTcp);
                }
                next = e[0];
                off += 8;
                ext_len += 8;
            }
            _ => break,
        }
        i += 1;
    }
    if next != IPPROTO_TCP {
        return Err(ParseError::NotTcp);
    }
    if payload_len < ext_len {
        return Err(ParseError::Malformed);
    }
    parse_tcp(f, off, payload_len - ext_len, v6_packet(h))
}

/// The IPv6 header's share of a [`Packet`].
#[inline(always)]
fn v6_packet(h: &[u8; IPV6_HLEN]) -> Packet {
    let mut p = Packet {
        family: FAMILY_V6,
        ttl: h[7],
        ip_len: be16(h, 4) as u32 + IPV6_HLEN as u32,
        ..Packet::default()
    };
    p.src_addr.copy_from_slice(&h[8..24]);
    p.dst_addr.copy_from_slice(&h[24..40]);
    p
}

/// `l4_len`: TCP header plus payload, as the IP header states.
#[inline(always)]
fn parse_tcp<F: Frame + ?Sized>(
    f: &F,
    l4: usize,
    l4_len: u32,
    p: Packet,
) -> Result<Packet, ParseError> {
    let t: &[u8; 20] = f.read(l4).ok_or(ParseError::Truncated)?;
    tcp_fields(t, l4, l4_len, p)
}

/// The TCP header's share of a [`Packet`]; `t` read at `l4`.
#[inline(always)]
fn tcp_fields(t: &[u8; 20], l4: usize, l4_len: u32, mut p: Packet) -> Result<Packet, ParseError> {
    p.src_port = be16(t, 0);
    p.dst_port = be16(t, 2);
    p.seq = be32(t, 4);
    p.ack = be32(t, 8);
    let doff = ((t[12] >> 4) as u32) * 4;
    p.tcp_flags = t[13];
    p.window = be16(t, 14);
    if doff < 20 || doff > l4_len {
        return Err(ParseError::Malformed);
    }
    p.payload_len = l4_len - doff;
    p.payload_off = l4 as u32 + doff;
    Ok(p)
}

#[cfg(test)]
mod tests;
