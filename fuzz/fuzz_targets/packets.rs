//! Hostile input through the code the kernel runs on every packet, shared
//! with offline analysis: the one pass (`quick`), the glance, the full
//! parse, the two-table state machine. Input: a sequence of frames, each
//! `[len: u16 le][dir: u8][dt_ms: u8][frame bytes]`.
//!
//! Checked beyond "no panic": the glance never contradicts the full parse
//! (it may only settle packets the parse would also call not ours); the one
//! pass never contradicts either (what it passes is not a tracked packet,
//! what it parses is the full parse's packet and port), and passes what the
//! glance settles; every event the state machine emits decodes, and no
//! connection is in both tables.
#![no_main]

use libfuzzer_sys::fuzz_target;
use monitor_common::{
    flow::{flow_key, wants_sample},
    glance, parse_ethernet, quick, step,
    tables::HostTables,
    Config, Dir, EventKind, Glance, Quick,
};

fuzz_target!(|data: &[u8]| {
    let mut tables = HostTables::default();
    let mut now = 1u64;
    let mut rest = data;
    while rest.len() >= 4 {
        let len = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 4);
        let dir = if rest[2] & 1 == 0 { Dir::In } else { Dir::Out };
        now += u64::from(rest[3]) * 1_000_000;
        let frame = &rest[4..4 + len];
        rest = &rest[4 + len..];

        let g = glance(frame, dir == Dir::In);
        let parsed = parse_ethernet(frame);
        match (&g, &parsed) {
            (Glance::NotTcp, Ok(p)) => panic!("glance said not TCP, the parse found {p:?}"),
            (Glance::LocalPort(port), Ok(p)) => {
                let local = if dir == Dir::In {
                    p.dst_port
                } else {
                    p.src_port
                };
                assert_eq!(*port, local, "glance and parse disagree on the port");
            }
            _ => {}
        }
        let cfg = Config::DEFAULT;
        let local = |p: &monitor_common::Packet| {
            if dir == Dir::In {
                p.dst_port
            } else {
                p.src_port
            }
        };
        match quick(frame, dir == Dir::In, &cfg) {
            Quick::Pass => {
                if let Ok(p) = &parsed {
                    assert!(!cfg.tracks(local(p)), "passed a tracked packet {p:?}");
                }
            }
            Quick::Tracked(p, i) => {
                assert_eq!(Ok(p), parsed, "the one pass and the full parse disagree");
                assert_eq!(cfg.port_index(local(&p)), Some(i), "port index");
            }
            Quick::Unsure => {
                let settled = match g {
                    Glance::NotTcp => true,
                    Glance::LocalPort(p) => !cfg.tracks(p),
                    Glance::Unsure => false,
                };
                assert!(!settled, "the glance settled what the one pass left");
            }
        }
        let Ok(pkt) = parsed else { continue };
        let key = flow_key(&pkt, dir);
        if let Some(f) = tables.flows.get(&key) {
            let _ = wants_sample(true, f, &pkt, dir);
        }
        for ev in step(&mut tables, &key, &pkt, dir, now, 5_000_000_000)
            .into_iter()
            .flatten()
        {
            assert!(
                EventKind::from_u8(ev.kind).is_some(),
                "event kind {}",
                ev.kind
            );
            assert!(Dir::from_u8(ev.dir).is_some(), "event direction {}", ev.dir);
            assert_eq!(ev.key, key);
        }
        assert!(
            tables
                .flows
                .keys()
                .all(|k| !tables.half_open.contains_key(k)),
            "a flow in both tables"
        );
    }
});
