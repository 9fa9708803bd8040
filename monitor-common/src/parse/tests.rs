use std::net::IpAddr;
use std::vec;

use super::*;
use crate::craft::{header_boundaries, Tcp};
use crate::types::Config;
use crate::types::{TCP_ACK, TCP_SYN};

fn v4() -> (IpAddr, IpAddr) {
    ("192.0.2.2".parse().unwrap(), "192.0.2.1".parse().unwrap())
}
fn v6() -> (IpAddr, IpAddr) {
    (
        "2001:db8::2".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
    )
}

#[test]
fn ipv4_syn_parses_ports_flags_ttl_and_addresses() {
    let (c, s) = v4();
    let mut t = Tcp::syn(c, s);
    t.ttl = 57;
    t.ip_id = 0x1234;
    let p = parse_ethernet(t.frame().as_slice()).unwrap();
    assert_eq!(p.family, FAMILY_V4);
    assert_eq!((p.src_port, p.dst_port), (40000, 443));
    assert_eq!(p.tcp_flags, TCP_SYN);
    assert_eq!((p.ttl, p.ip_id, p.seq), (57, 0x1234, 1000));
    assert_eq!(&p.src_addr[..4], &[192, 0, 2, 2]);
    assert_eq!(&p.src_addr[4..], &[0u8; 12]);
    assert_eq!(p.payload_len, 0);
}

#[test]
fn ipv4_options_and_tcp_options_are_skipped_and_payload_measured() {
    let (c, s) = v4();
    let mut t = Tcp::syn(c, s).payload(100);
    t.ipv4_options = 12;
    t.tcp_options = 12;
    let p = parse_ethernet(t.frame().as_slice()).unwrap();
    assert_eq!(p.payload_len, 100);
    assert_eq!(p.ip_len, 20 + 12 + 20 + 12 + 100);
    assert_eq!(p.tcp_flags, TCP_SYN | TCP_ACK);
}

#[test]
fn ipv6_with_extension_headers_parses() {
    let (c, s) = v6();
    let mut t = Tcp::syn(c, s).payload(7);
    t.ipv6_ext = vec![0, 60, 44];
    let p = parse_ethernet(t.frame().as_slice()).unwrap();
    assert_eq!(p.family, FAMILY_V6);
    assert_eq!(p.payload_len, 7);
    assert_eq!(p.dst_port, 443);
    assert_eq!(p.src_addr[0..2], [0x20, 0x01]);
}

#[test]
fn ipv6_extension_chain_longer_than_the_bound_is_not_tcp() {
    let (c, s) = v6();
    let mut t = Tcp::syn(c, s);
    t.ipv6_ext = vec![60; MAX_IPV6_EXT_HEADERS + 1];
    assert_eq!(
        parse_ethernet(t.frame().as_slice()),
        Err(ParseError::NotTcp)
    );
}

#[test]
fn vlan_tagged_frame_parses() {
    let (c, s) = v4();
    let mut t = Tcp::syn(c, s);
    t.vlan = Some(42);
    assert_eq!(parse_ethernet(t.frame().as_slice()).unwrap().dst_port, 443);
}

#[test]
fn stacked_vlan_tags_are_not_ip() {
    let (c, s) = v4();
    let mut t = Tcp::syn(c, s);
    t.vlan = Some(42);
    let mut f = t.frame();
    // Insert a second 802.1Q tag after the first.
    f.splice(16..16, [0x81, 0x00, 0x00, 0x07]);
    assert_eq!(parse_ethernet(f.as_slice()), Err(ParseError::NotIp));
}

#[test]
fn truncation_at_every_header_boundary_is_truncated_not_a_panic() {
    let (c4, s4) = v4();
    let (c6, s6) = v6();
    let mut vlan = Tcp::syn(c4, s4);
    vlan.vlan = Some(7);
    let mut opts = Tcp::syn(c4, s4);
    opts.ipv4_options = 8;
    let mut ext = Tcp::syn(c6, s6);
    ext.ipv6_ext = vec![0, 43];
    for t in [Tcp::syn(c4, s4), vlan, opts, ext] {
        let f = t.frame();
        for cut in 0..f.len() {
            let r = parse_ethernet(&f[..cut]);
            assert_eq!(r, Err(ParseError::Truncated), "cut at {cut} of {t:?}");
        }
        assert!(parse_ethernet(f.as_slice()).is_ok());
        assert!(header_boundaries(&t).iter().all(|&b| b <= f.len()));
    }
}

#[test]
fn bad_ihl_and_bad_data_offset_are_malformed() {
    let (c, s) = v4();
    let mut f = Tcp::syn(c, s).frame();
    f[14] = 0x44; // IHL 4 words = 16 bytes
    assert_eq!(parse_ethernet(f.as_slice()), Err(ParseError::Malformed));
    let mut f = Tcp::syn(c, s).frame();
    f[14 + 20 + 12] = 0x40; // data offset 4 words
    assert_eq!(parse_ethernet(f.as_slice()), Err(ParseError::Malformed));
    let mut f = Tcp::syn(c, s).frame();
    f[14 + 20 + 12] = 0xf0; // data offset 60 > segment
    assert_eq!(parse_ethernet(f.as_slice()), Err(ParseError::Malformed));
}

#[test]
fn non_first_fragments_and_udp_are_not_tcp() {
    let (c, s) = v4();
    let mut f = Tcp::syn(c, s).frame();
    f[14 + 6] = 0x00;
    f[14 + 7] = 0x10; // fragment offset 16
    assert_eq!(parse_ethernet(f.as_slice()), Err(ParseError::NotTcp));
    let mut f = Tcp::syn(c, s).frame();
    f[14 + 9] = 17;
    assert_eq!(parse_ethernet(f.as_slice()), Err(ParseError::NotTcp));
}

#[test]
fn arp_is_not_ip_and_not_a_failure() {
    let mut f = vec![0u8; 42];
    f[12] = 0x08;
    f[13] = 0x06;
    let e = parse_ethernet(f.as_slice()).unwrap_err();
    assert_eq!(e, ParseError::NotIp);
    assert!(!e.is_failure());
}

/// What the kernel decided before `quick` existed: the glance, then the full
/// parse and the port check. `quick` must agree wherever it settles a frame.
fn glance_then_parse(f: &[u8], ingress: bool, cfg: &Config) -> Quick {
    match glance(f, ingress) {
        Glance::NotTcp => return Quick::Pass,
        Glance::LocalPort(p) if !cfg.tracks(p) => return Quick::Pass,
        _ => {}
    }
    match parse_ethernet(f) {
        Ok(p) => {
            let local = if ingress { p.dst_port } else { p.src_port };
            match cfg.port_index(local) {
                Some(i) => Quick::Tracked(p, i),
                None => Quick::Pass,
            }
        }
        Err(e) if e.is_failure() => Quick::Unsure,
        Err(_) => Quick::Pass,
    }
}

#[test]
fn quick_agrees_with_glance_then_parse_on_random_frames() {
    let (c4, s4) = v4();
    let (c6, s6) = v6();
    let mut bases = vec![];
    for (c, s) in [(c4, s4), (c6, s6)] {
        let mut t = Tcp::syn(c, s).payload(30);
        bases.push(t.frame());
        t.dport = 8080;
        bases.push(t.frame());
        let mut o = Tcp::syn(c, s);
        o.tcp_options = 12;
        bases.push(o.frame());
    }
    let cfg = Config::DEFAULT;
    // xorshift: reproducible without a dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut plain, mut all) = (0u64, 0u64);
    for i in 0..200_000 {
        let mut f = bases[i % bases.len()].clone();
        // Mutate a few header bytes, and sometimes cut the frame short.
        for _ in 0..(next() % 4) {
            let at = (next() % 80) as usize % f.len();
            f[at] = next() as u8;
        }
        if next() % 4 == 0 {
            let len = (next() as usize) % f.len();
            f.truncate(len);
        }
        for ingress in [true, false] {
            let q = quick(f.as_slice(), ingress, &cfg);
            let r = glance_then_parse(&f, ingress, &cfg);
            if q != Quick::Unsure {
                assert_eq!(q, r, "frame {f:02x?}, ingress {ingress}");
            }
            // What the glance settled (not TCP, or another port) the one
            // pass settles too: untracked traffic is never a full parse,
            // a counted failure or a pull of the skb.
            let settled = match glance(f.as_slice(), ingress) {
                Glance::NotTcp => true,
                Glance::LocalPort(p) => !cfg.tracks(p),
                Glance::Unsure => false,
            };
            if settled {
                assert_eq!(q, Quick::Pass, "frame {f:02x?}, ingress {ingress}");
            }
            if settled || matches!(r, Quick::Tracked(..)) {
                plain += u64::from(q != Quick::Unsure);
                all += 1;
            }
        }
    }
    // Plain frames (no VLAN tag, no extension header, whole headers) take
    // the one pass; most of the random ones are plain.
    assert!(
        plain * 10 >= all * 9,
        "settled in one pass: {plain} of {all}"
    );
}
