//! Builds Ethernet frames carrying TCP, for tests and benchmarks: IPv4 with
//! options, IPv6 with extension headers, an 802.1Q tag. Checksums are left
//! zero: the monitor never reads them.

use std::net::IpAddr;
use std::vec::Vec;

use crate::types::{TCP_ACK, TCP_SYN};

#[derive(Clone, Debug)]
pub struct Tcp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub ttl: u8,
    pub ip_id: u16,
    pub payload: usize,
    /// 802.1Q VLAN id, if tagged.
    pub vlan: Option<u16>,
    /// IPv4 option bytes (a multiple of 4, at most 40).
    pub ipv4_options: usize,
    /// IPv6 extension headers to insert, by next-header number (0, 43, 60, 44).
    pub ipv6_ext: Vec<u8>,
    /// TCP option bytes (a multiple of 4, at most 40).
    pub tcp_options: usize,
}

impl Tcp {
    /// A client SYN to port 443.
    pub fn syn(src: IpAddr, dst: IpAddr) -> Tcp {
        Tcp {
            src,
            dst,
            sport: 40000,
            dport: 443,
            seq: 1000,
            ack: 0,
            flags: TCP_SYN,
            window: 64240,
            ttl: 64,
            ip_id: 1,
            payload: 0,
            vlan: None,
            ipv4_options: 0,
            ipv6_ext: Vec::new(),
            tcp_options: 0,
        }
    }

    pub fn flags(mut self, flags: u8) -> Tcp {
        self.flags = flags;
        self
    }

    pub fn payload(mut self, n: usize) -> Tcp {
        self.payload = n;
        self.flags |= TCP_ACK;
        self
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128 + self.payload);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        if let Some(vid) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        let tcp_len = 20 + self.tcp_options + self.payload;
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let ihl = 20 + self.ipv4_options;
                let total = (ihl + tcp_len) as u16;
                f.push(0x40 | (ihl / 4) as u8);
                f.push(0);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&self.ip_id.to_be_bytes());
                f.extend_from_slice(&0x4000u16.to_be_bytes()); // DF
                f.push(self.ttl);
                f.push(6);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                // NOP options.
                f.extend(std::iter::repeat_n(1u8, self.ipv4_options));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext_len = self.ipv6_ext.len() * 8;
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((ext_len + tcp_len) as u16).to_be_bytes());
                f.push(*self.ipv6_ext.first().unwrap_or(&6));
                f.push(self.ttl);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                for (i, _) in self.ipv6_ext.iter().enumerate() {
                    let next = *self.ipv6_ext.get(i + 1).unwrap_or(&6);
                    // 8 bytes each: next header, length 0 (= 8 bytes), padding.
                    f.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
                }
            }
            _ => panic!("craft: source and destination must be the same family"),
        }
        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&self.ack.to_be_bytes());
        f.push((((20 + self.tcp_options) / 4) as u8) << 4);
        f.push(self.flags);
        f.extend_from_slice(&self.window.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend(std::iter::repeat_n(1u8, self.tcp_options));
        f.extend(std::iter::repeat_n(0xabu8, self.payload));
        f
    }
}

/// Offsets at which `frame` has a header boundary (where truncation tests cut).
pub fn header_boundaries(t: &Tcp) -> Vec<usize> {
    let mut b = std::vec![0, 14];
    let mut l3 = 14;
    if t.vlan.is_some() {
        l3 += 4;
        b.push(l3);
    }
    let l4 = if t.src.is_ipv4() {
        b.push(l3 + 20);
        l3 + 20 + t.ipv4_options
    } else {
        b.push(l3 + 40);
        let mut off = l3 + 40;
        for _ in &t.ipv6_ext {
            off += 8;
            b.push(off);
        }
        off
    };
    b.push(l4);
    b.push(l4 + 20);
    b.sort_unstable();
    b.dedup();
    b
}
