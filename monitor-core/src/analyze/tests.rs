//! Captures written in every supported form, analysed.

use std::{borrow::Cow, net::IpAddr, path::PathBuf, time::Duration};

use monitor_common::{craft::Tcp, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};
use pcap_file::{
    pcap::{PcapHeader, PcapPacket, PcapWriter},
    pcapng::{
        blocks::{
            enhanced_packet::EnhancedPacketBlock, interface_description::InterfaceDescriptionBlock,
        },
        PcapNgWriter,
    },
    DataLink,
};

use super::*;
use crate::detector::Ending;
use crate::replay::Replay;

fn opts() -> AnalyzeOptions {
    AnalyzeOptions {
        ports: vec![443],
        plaintext_ports: vec![],
        servers: vec![],
        upstream_ports: vec![],
        local_addresses: vec![],
        from: None,
        to: None,
        gap_threshold: Duration::from_secs(5),
        detector: DetectorConfig {
            min_heartbeat: Duration::from_secs(10),
            max_heartbeat: Duration::from_secs(60),
            ..DetectorConfig::default()
        },
    }
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("analyze-{}-{name}", std::process::id()))
}

/// A device whose Ping is reset at 20 s of silence by a middlebox (TTL 64
/// against the client's 50): (timestamp, Ethernet frame).
fn reset_at_expiry(t0: f64) -> Vec<(f64, Vec<u8>)> {
    let c: IpAddr = "198.51.100.7".parse().unwrap();
    let s: IpAddr = "192.0.2.1".parse().unwrap();
    let mk = |src, dst, sport, dport, flags, payload, seq, ttl| {
        let mut t = Tcp::syn(src, dst);
        t.sport = sport;
        t.dport = dport;
        t.flags = flags;
        t.payload = payload;
        t.seq = seq;
        t.ttl = ttl;
        t.frame()
    };
    vec![
        (t0, mk(c, s, 40001, 443, TCP_SYN, 0, 1000, 50)),
        (
            t0 + 0.001,
            mk(s, c, 443, 40001, TCP_SYN | TCP_ACK, 0, 9000, 64),
        ),
        (t0 + 0.002, mk(c, s, 40001, 443, TCP_ACK, 0, 1001, 50)),
        (
            t0 + 1.0,
            mk(c, s, 40001, 443, TCP_ACK | TCP_PSH, 300, 1001, 50),
        ),
        (t0 + 1.001, mk(s, c, 443, 40001, TCP_ACK, 0, 9001, 64)),
        (t0 + 21.001, mk(c, s, 40001, 443, TCP_RST, 0, 1301, 64)),
    ]
}

fn write_pcap(
    path: &PathBuf,
    link: DataLink,
    snaplen: u32,
    frames: &[(f64, Vec<u8>)],
    strip: usize,
    prefix: &[u8],
) {
    let f = std::fs::File::create(path).unwrap();
    let header = PcapHeader {
        datalink: link,
        snaplen,
        ..PcapHeader::default()
    };
    let mut w = PcapWriter::with_header(f, header).unwrap();
    for (t, frame) in frames {
        let mut data = prefix.to_vec();
        data.extend_from_slice(&frame[strip..]);
        let orig = data.len() as u32;
        data.truncate(snaplen as usize);
        w.write_packet(&PcapPacket::new(Duration::from_secs_f64(*t), orig, &data))
            .unwrap();
    }
}

fn the_one_verdict(a: &Analysis) -> &Verdict {
    assert_eq!(a.verdicts.len(), 1, "{:#?}", a.verdicts);
    &a.verdicts[0]
}

#[test]
fn an_ethernet_pcap_gives_the_injected_reset_and_its_silence() {
    let p = tmp("eth.pcap");
    write_pcap(
        &p,
        DataLink::ETHERNET,
        65535,
        &reset_at_expiry(1_700_000_000.0),
        0,
        &[],
    );
    let a = analyze(&p, &opts()).unwrap();
    let v = the_one_verdict(&a);
    assert_eq!(v.ending, Ending::InjectedReset);
    assert!(v.premature);
    assert!((v.evidence.silence_seconds - 20.0).abs() < 1e-3, "{v:?}");
    assert_eq!(a.capture.tracked, 6);
    assert_eq!(a.report.killing_paths[0].path, "198.51.100.0/24:443");
    let _ = std::fs::remove_file(p);
}

#[test]
fn raw_ip_linux_cooked_and_loopback_links_read_the_same() {
    let frames = reset_at_expiry(1_700_000_000.0);
    let sll = [0u8, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x00];
    for (name, link, prefix) in [
        ("raw", DataLink::RAW, &[][..]),
        ("sll", DataLink::LINUX_SLL, &sll[..]),
        ("null", DataLink::NULL, &[2u8, 0, 0, 0][..]),
    ] {
        let p = tmp(&format!("{name}.pcap"));
        write_pcap(&p, link, 65535, &frames, 14, prefix);
        let a = analyze(&p, &opts()).unwrap();
        assert_eq!(the_one_verdict(&a).ending, Ending::InjectedReset, "{name}");
        let _ = std::fs::remove_file(p);
    }
}

/// A pcapng file in microseconds (the format's default, what dumpcap
/// writes) or nanoseconds (if_tsresol 9) reads like a pcap.
#[test]
fn a_pcapng_file_reads_like_a_pcap_in_either_timestamp_unit() {
    use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
    for (name, options, unit_ns) in [
        ("ng-us.pcapng", vec![], 1_000u64),
        (
            "ng-ns.pcapng",
            vec![InterfaceDescriptionOption::IfTsResol(9)],
            1,
        ),
    ] {
        let p = tmp(name);
        let f = std::fs::File::create(&p).unwrap();
        let mut w = PcapNgWriter::new(f).unwrap();
        w.write_pcapng_block(InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: 0,
            options,
        })
        .unwrap();
        for (t, frame) in reset_at_expiry(1_700_000_000.0) {
            // The raw count of units, which pcap-file carries as nanoseconds.
            let raw = (t * 1e9) as u64 / unit_ns;
            w.write_pcapng_block(EnhancedPacketBlock {
                interface_id: 0,
                timestamp: Duration::from_nanos(raw),
                original_len: frame.len() as u32,
                data: Cow::Owned(frame),
                options: vec![],
            })
            .unwrap();
        }
        drop(w);
        let a = analyze(&p, &opts()).unwrap();
        let v = the_one_verdict(&a);
        assert_eq!(v.ending, Ending::InjectedReset, "{name}");
        let first = a.capture.first_seconds.unwrap();
        assert!((first - 1_700_000_000.0).abs() < 1.0, "{name}: {first}");
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn a_small_snaplen_keeps_whole_headers_and_skips_cut_ones_counted() {
    let frames = reset_at_expiry(1_700_000_000.0);
    // 64 bytes hold Ethernet + IPv4 + TCP (54): everything is usable.
    let p = tmp("snap64.pcap");
    write_pcap(&p, DataLink::ETHERNET, 64, &frames, 0, &[]);
    let a = analyze(&p, &opts()).unwrap();
    assert_eq!(the_one_verdict(&a).ending, Ending::InjectedReset);
    assert_eq!(
        a.capture.cut_by_snaplen, 1,
        "only the 354-byte Ping was longer"
    );
    // 40 bytes cut every TCP header: nothing usable, all counted, no panic.
    write_pcap(&p, DataLink::ETHERNET, 40, &frames, 0, &[]);
    let a = analyze(&p, &opts()).unwrap();
    assert_eq!(a.capture.truncated, 6);
    assert!(a.verdicts.is_empty());
    assert!(a.capture.summary().contains("6 with headers cut short"));
    let _ = std::fs::remove_file(p);
}

#[test]
fn timestamps_going_backwards_are_counted_and_clamped() {
    let mut frames = reset_at_expiry(1_700_000_000.0);
    frames[4].0 = frames[2].0 - 0.5;
    let p = tmp("ooo.pcap");
    write_pcap(&p, DataLink::ETHERNET, 65535, &frames, 0, &[]);
    let a = analyze(&p, &opts()).unwrap();
    assert_eq!(a.capture.out_of_order, 1);
    assert!(a.capture.summary().contains("going backwards"));
    let _ = std::fs::remove_file(p);
}

#[test]
fn an_unsupported_link_type_is_a_clear_error_and_garbage_too() {
    let p = tmp("wifi.pcap");
    write_pcap(
        &p,
        DataLink::IEEE802_11,
        65535,
        &reset_at_expiry(1.0),
        0,
        &[],
    );
    let e = analyze(&p, &opts()).unwrap_err().to_string();
    assert!(
        e.contains("no packet of a supported link type") && e.contains("IEEE802_11"),
        "{e}"
    );
    std::fs::write(&p, b"not a capture at all").unwrap();
    let e = analyze(&p, &opts()).unwrap_err().to_string();
    assert!(e.starts_with("reading the capture"), "{e}");
    let e = analyze(&tmp("missing.pcap"), &opts())
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("opening the capture"), "{e}");
    let _ = std::fs::remove_file(p);
}

#[test]
fn the_time_window_and_server_filter_select_packets() {
    let p = tmp("window.pcap");
    write_pcap(
        &p,
        DataLink::ETHERNET,
        65535,
        &reset_at_expiry(1_700_000_000.0),
        0,
        &[],
    );
    let a = analyze(
        &p,
        &AnalyzeOptions {
            to: Some(10.0),
            ..opts()
        },
    )
    .unwrap();
    assert!(a.verdicts.is_empty(), "the RST is after 10 s");
    let a = analyze(
        &p,
        &AnalyzeOptions {
            servers: vec!["192.0.2.99".parse().unwrap()],
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(a.capture.tracked, 0);
    let _ = std::fs::remove_file(p);
}

/// A device on plaintext port 8080 sends a Ping (head and body in two
/// segments) asking for a 40 s heartbeat; a proxy closes at 20 s of silence.
fn plaintext_ping_killed_at_20s() -> Vec<(f64, Vec<u8>)> {
    let c: IpAddr = "198.51.100.8".parse().unwrap();
    let s: IpAddr = "192.0.2.1".parse().unwrap();
    let body = crate::ping::wbxml::tests::ping_body("40");
    let head = format!(
        "POST /Microsoft-Server-ActiveSync?Cmd=Ping&User=u&DeviceId=PLAIN1&DeviceType=Lab HTTP/1.1\r\n\
         Host: mail\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mk = |src, dst, sport, dport, flags, bytes: &[u8], seq| {
        let mut t = Tcp::syn(src, dst);
        t.sport = sport;
        t.dport = dport;
        t.flags = flags;
        t.payload = bytes.len();
        t.seq = seq;
        t.ttl = 50;
        let mut f = t.frame();
        let n = f.len();
        f[n - bytes.len()..].copy_from_slice(bytes);
        f
    };
    let h = head.as_bytes();
    let seq_body = 1001 + h.len() as u32;
    vec![
        (0.0, mk(c, s, 40002, 8080, TCP_SYN, b"", 1000)),
        (0.001, mk(s, c, 8080, 40002, TCP_SYN | TCP_ACK, b"", 9000)),
        (0.002, mk(c, s, 40002, 8080, TCP_ACK, b"", 1001)),
        (1.0, mk(c, s, 40002, 8080, TCP_ACK | TCP_PSH, h, 1001)),
        (
            1.001,
            mk(c, s, 40002, 8080, TCP_ACK | TCP_PSH, &body, seq_body),
        ),
        (1.002, mk(s, c, 8080, 40002, TCP_ACK, b"", 9001)),
        (
            21.002,
            mk(
                c,
                s,
                40002,
                8080,
                TCP_ACK | monitor_common::TCP_FIN,
                b"",
                seq_body + body.len() as u32,
            ),
        ),
    ]
}

#[test]
fn a_plaintext_ping_gives_the_exact_heartbeat_that_inference_cannot() {
    let path = tmp("plaintext.pcap");
    write_pcap(
        &path,
        DataLink::ETHERNET,
        65535,
        &plaintext_ping_killed_at_20s(),
        0,
        &[],
    );
    let exact = analyze(
        &path,
        &AnalyzeOptions {
            ports: vec![8080],
            plaintext_ports: vec![8080],
            ..opts()
        },
    )
    .unwrap();
    let inferred = analyze(
        &path,
        &AnalyzeOptions {
            ports: vec![8080],
            ..opts()
        },
    )
    .unwrap();
    let _ = std::fs::remove_file(&path);
    let v = &exact.verdicts[0];
    assert_eq!(v.ending, Ending::ProxyTimeout);
    assert_eq!(v.heartbeat_seconds, Some(40.0));
    assert_eq!(
        v.heartbeat_source,
        Some(crate::detector::HeartbeatSource::Ping)
    );
    let p = &exact.report.killing_paths[0];
    assert_eq!(
        (p.pings_read, p.requested_heartbeat_seconds),
        (1, Some(40.0))
    );
    assert!(exact
        .report
        .to_text()
        .contains("heartbeat in force: 40 s, read from 1 Ping"));
    // Without reading the Ping, the same traffic gives no heartbeat at all.
    let w = &inferred.verdicts[0];
    assert_eq!((w.heartbeat_seconds, w.heartbeat_source), (None, None));
    assert_eq!(inferred.report.killing_paths[0].pings_read, 0);
}

#[test]
fn without_a_port_the_server_side_is_inferred_from_syns() {
    let path = tmp("infer.pcap");
    let mut frames = reset_at_expiry(0.0);
    frames.extend(plaintext_ping_killed_at_20s());
    frames.sort_by(|a, b| a.0.total_cmp(&b.0));
    write_pcap(&path, DataLink::ETHERNET, 65535, &frames, 0, &[]);
    let a = analyze(
        &path,
        &AnalyzeOptions {
            ports: vec![],
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(a.capture.inferred_ports, Some(vec![(443, 1), (8080, 1)]));
    assert_eq!(a.capture.server_ports, vec![443, 8080]);
    assert_eq!(a.verdicts.len(), 2, "{:?}", a.verdicts);
    assert!(a
        .capture
        .summary()
        .contains("inferred from SYNs: 443 (1 SYNs)"));
    // Mid-stream only (no SYN): a clear error, not a guess.
    let late: Vec<_> = reset_at_expiry(0.0).into_iter().skip(1).collect();
    write_pcap(&path, DataLink::ETHERNET, 65535, &late, 0, &[]);
    let e = analyze(
        &path,
        &AnalyzeOptions {
            ports: vec![],
            ..opts()
        },
    )
    .unwrap_err();
    let _ = std::fs::remove_file(&path);
    assert!(e.to_string().contains("--port"), "{e}");
}

/// A small synthetic capture: a few dozen connections, every kind of ending.
fn small_synthetic(format: synthetic::Format) -> Vec<u8> {
    let p = tmp(&format!("small-{format:?}"));
    let spec = synthetic::Spec {
        seed: 3,
        packets: 600,
        clients: 300,
        concurrent: 30,
        snaplen: 96,
        format,
    };
    synthetic::write(&p, &spec).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let _ = std::fs::remove_file(p);
    bytes
}

/// Where each record (pcap) or block (pcapng) starts, headers excluded.
fn record_starts(bytes: &[u8], format: synthetic::Format) -> Vec<usize> {
    let u32le = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let (mut at, len_of): (usize, &dyn Fn(usize) -> usize) = match format {
        synthetic::Format::Pcap => (24, &|at| 16 + u32le(at + 8)),
        synthetic::Format::PcapNg => (0, &|at| u32le(at + 4)),
    };
    let mut starts = Vec::new();
    while at < bytes.len() {
        starts.push(at);
        at += len_of(at);
    }
    assert_eq!(at, bytes.len());
    starts
}

/// Verdicts and report as JSON: compared whole.
fn outcome(a: &Analysis) -> serde_json::Value {
    serde_json::json!({ "verdicts": a.verdicts, "report": a.report })
}

#[test]
fn a_capture_cut_inside_its_last_record_reads_as_the_whole_minus_it_and_says_so() {
    for format in [synthetic::Format::Pcap, synthetic::Format::PcapNg] {
        let bytes = small_synthetic(format);
        let last = *record_starts(&bytes, format).last().unwrap();
        let p = tmp(&format!("cut-{format:?}"));
        std::fs::write(&p, &bytes[..last]).unwrap();
        let whole = analyze(&p, &opts()).unwrap();
        assert!(
            !whole.verdicts.is_empty(),
            "{format:?}: a capture with endings"
        );
        assert_eq!(whole.capture.cut_at_end, None);
        for cut in last + 1..bytes.len() {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let a = analyze(&p, &opts()).unwrap_or_else(|e| panic!("{format:?} cut at {cut}: {e}"));
            assert_eq!(outcome(&a), outcome(&whole), "{format:?} cut at {cut}");
            let c = a.capture.cut_at_end.expect("said to be cut");
            assert_eq!((c.offset, c.present), (last as u64, (cut - last) as u64));
            let header = if format == synthetic::Format::Pcap {
                12
            } else {
                8
            };
            let declared = (cut - last >= header).then_some((bytes.len() - last) as u64);
            assert_eq!(c.declared, declared, "{format:?} cut at {cut}");
            assert_eq!(
                CaptureStats {
                    cut_at_end: None,
                    ..a.capture.clone()
                },
                whole.capture
            );
            let summary = a.capture.summary();
            assert!(
                summary.contains(&format!(
                    "the file ends mid-record: the record at byte {last} is cut"
                )),
                "{summary}"
            );
        }
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn a_corrupt_record_in_the_middle_is_an_error_naming_the_file_and_the_byte() {
    for format in [synthetic::Format::Pcap, synthetic::Format::PcapNg] {
        let mut bytes = small_synthetic(format);
        let starts = record_starts(&bytes, format);
        let mid = starts[starts.len() / 2];
        match format {
            // A packet length no capture has.
            synthetic::Format::Pcap => bytes[mid + 8..mid + 12].copy_from_slice(&[0, 0, 0, 0x40]),
            // A block whose trailing length disagrees with its leading one.
            synthetic::Format::PcapNg => {
                let len = u32::from_le_bytes(bytes[mid + 4..mid + 8].try_into().unwrap()) as usize;
                bytes[mid + len - 4] ^= 0x04;
            }
        }
        let p = tmp(&format!("corrupt-{format:?}"));
        std::fs::write(&p, &bytes).unwrap();
        let e = analyze(&p, &opts()).unwrap_err().to_string();
        let _ = std::fs::remove_file(&p);
        assert!(
            e.starts_with(&format!(
                "reading the capture {}: at byte {mid}:",
                p.display()
            )),
            "{format:?}: {e}"
        );
    }
}

/// `n` clients, one every 20 s, each opening a connection that never closes.
fn connections_left_open(n: u8) -> Vec<(f64, Vec<u8>)> {
    let s: IpAddr = "192.0.2.1".parse().unwrap();
    let mut frames = Vec::new();
    for i in 0..n {
        let c = IpAddr::from([198, 51, 100, i + 1]);
        let t0 = f64::from(i) * 20.0;
        let mut syn = Tcp::syn(c, s);
        syn.ttl = 50;
        let mut synack = Tcp::syn(s, c).flags(TCP_SYN | TCP_ACK);
        (synack.sport, synack.dport) = (443, 40000);
        let mut ack = syn.clone().flags(TCP_ACK);
        ack.seq = 1001;
        frames.push((t0, syn.frame()));
        frames.push((t0 + 0.001, synack.frame()));
        frames.push((t0 + 0.002, ack.frame()));
    }
    frames
}

#[test]
fn open_flows_beyond_the_flow_table_are_evicted_and_retired_as_vanished() {
    let p = tmp("evict.pcap");
    write_pcap(
        &p,
        DataLink::ETHERNET,
        65535,
        &connections_left_open(6),
        0,
        &[],
    );
    let limits = Limits {
        flow_table: 2,
        ..Limits::default()
    };
    let a = analyze_within(&p, &opts(), limits).unwrap();
    let all = analyze(&p, &opts()).unwrap();
    let _ = std::fs::remove_file(p);
    // The sweeps at 60, 80 and 100 s (before that second's client) each
    // found three flows for two slots.
    assert_eq!(a.capture.flows_evicted, 3, "{:?}", a.capture);
    assert_eq!(a.verdicts.len(), 3, "{:#?}", a.verdicts);
    assert!(a.verdicts.iter().all(|v| v.ending == Ending::Vanished));
    let evicted: Vec<_> = a.verdicts.iter().map(|v| v.client.ip()).collect();
    let first_three: Vec<IpAddr> = (1..=3).map(|i| IpAddr::from([198, 51, 100, i])).collect();
    assert_eq!(evicted, first_three, "the least recently seen go first");
    assert!(a.capture.summary().contains("3 open flows evicted"));
    // The kernel's own capacity holds them all: nothing vanishes.
    assert!(all.verdicts.is_empty());
    assert_eq!(all.capture.flows_evicted, 0);
}

#[test]
fn a_closed_flow_leaves_the_replay_table_after_lingering_idle_and_not_before() {
    let mut r = Replay::new(Config::DEFAULT);
    let frames = reset_at_expiry(0.0);
    let (last_t, _) = frames[frames.len() - 1];
    for (t, f) in &frames {
        let pkt = parse_ethernet(f.as_slice()).unwrap();
        let dir = r.direction(&pkt).unwrap();
        r.packet(&pkt, dir, (t * 1e9) as u64);
    }
    let closed_ns = (last_t * 1e9) as u64;
    let mut dropped = Vec::new();
    r.sweep(
        closed_ns + crate::replay::CLOSED_LINGER_NS - 1,
        &mut dropped,
    );
    assert!(dropped.is_empty());
    assert_eq!(r.flows().len(), 1);
    r.sweep(closed_ns + crate::replay::CLOSED_LINGER_NS, &mut dropped);
    assert_eq!(dropped.len(), 1);
    assert!(r.flows().is_empty());
    assert_eq!((r.closed_expired(), r.flows_evicted()), (1, 0));
}

#[test]
fn only_the_first_verdicts_of_each_kind_are_listed_and_the_rest_counted() {
    let path = tmp("listed.pcap");
    let mut frames = reset_at_expiry(0.0);
    frames.extend(reset_at_expiry(30.0).into_iter().map(|(t, mut f)| {
        // Another client: the last byte of its IPv4 address, source or destination.
        let inbound = f[36..38] == 443u16.to_be_bytes();
        f[if inbound { 29 } else { 33 }] = 8;
        (t, f)
    }));
    write_pcap(&path, DataLink::ETHERNET, 65535, &frames, 0, &[]);
    let limits = Limits {
        listed_verdicts: 1,
        ..Limits::default()
    };
    let a = analyze_within(&path, &opts(), limits).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(a.verdicts.len(), 1);
    assert_eq!(a.capture.verdicts_not_listed, 1);
    assert_eq!(a.report.killing_paths[0].kills, 2, "the report counts both");
    assert!(a.capture.summary().contains("1 verdict(s) not listed"));
}

/// A reverse proxy's host (192.0.2.11) gives up on its leg to Exchange
/// after 60 s (close_notify, FIN), answers the device with an error and
/// the device closes: (timestamp, Ethernet frame).
fn proxy_gives_up(t0: f64) -> Vec<(f64, Vec<u8>)> {
    let dev: IpAddr = "100.64.1.10".parse().unwrap();
    let proxy: IpAddr = "192.0.2.11".parse().unwrap();
    let exchange: IpAddr = "192.0.2.1".parse().unwrap();
    // (seq, ack): each side acknowledges all the other has sent.
    let mk = |src, dst, sport, dport, flags, payload, (seq, ack)| {
        let mut t = Tcp::syn(src, dst);
        (t.sport, t.dport, t.flags, t.payload) = (sport, dport, flags, payload);
        (t.seq, t.ack) = (seq, ack);
        t.frame()
    };
    let (a, s, p) = (TCP_ACK, TCP_SYN, TCP_PSH);
    vec![
        (t0, mk(dev, proxy, 40001, 443, s, 0, (1000, 0))),
        (
            t0 + 0.001,
            mk(proxy, dev, 443, 40001, s | a, 0, (9000, 1001)),
        ),
        (t0 + 0.002, mk(dev, proxy, 40001, 443, a, 0, (1001, 9001))),
        (
            t0 + 1.0,
            mk(dev, proxy, 40001, 443, a | p, 300, (1001, 9001)),
        ),
        (t0 + 1.001, mk(proxy, dev, 443, 40001, a, 0, (9001, 1301))),
        (t0 + 1.002, mk(proxy, exchange, 50001, 443, s, 0, (5000, 0))),
        (
            t0 + 1.003,
            mk(exchange, proxy, 443, 50001, s | a, 0, (7000, 5001)),
        ),
        (
            t0 + 1.004,
            mk(proxy, exchange, 50001, 443, a, 0, (5001, 7001)),
        ),
        (
            t0 + 1.005,
            mk(proxy, exchange, 50001, 443, a | p, 300, (5001, 7001)),
        ),
        (
            t0 + 1.006,
            mk(exchange, proxy, 443, 50001, a, 0, (7001, 5301)),
        ),
        // 60 s later: the proxy's close_notify and FIN, its 504, the device's FIN.
        (
            t0 + 61.006,
            mk(proxy, exchange, 50001, 443, a | p, 31, (5301, 7001)),
        ),
        (
            t0 + 61.0061,
            mk(proxy, exchange, 50001, 443, a | TCP_FIN, 0, (5332, 7001)),
        ),
        (
            t0 + 61.007,
            mk(proxy, dev, 443, 40001, a | p, 180, (9001, 1301)),
        ),
        (
            t0 + 61.03,
            mk(dev, proxy, 40001, 443, a | TCP_FIN, 0, (1301, 9181)),
        ),
    ]
}

#[test]
fn a_proxy_hosts_capture_names_its_own_timeout_given_its_upstream_port_and_address() {
    let p = tmp("proxy.pcap");
    write_pcap(
        &p,
        DataLink::ETHERNET,
        65535,
        &proxy_gives_up(1_700_000_000.0),
        0,
        &[],
    );
    let proxy_host = AnalyzeOptions {
        upstream_ports: vec![443],
        local_addresses: vec!["192.0.2.11".parse().unwrap()],
        ..opts()
    };
    let a = analyze(&p, &proxy_host).unwrap();
    let endings: Vec<(String, Ending)> = a
        .verdicts
        .iter()
        .map(|v| (v.path.clone(), v.ending))
        .collect();
    assert_eq!(
        endings,
        [
            (
                "upstream:192.0.2.1/32:443".to_string(),
                Ending::UpstreamTimeout
            ),
            ("100.64.1.0/24:443".to_string(), Ending::LocalProxyTimeout),
        ]
    );
    let t = &a.report.local_proxy_timeouts;
    assert!(t.len() == 1 && (t[0].seconds - 60.0).abs() < 0.01, "{t:#?}");
    // Without the proxy host's address the leg is one more client's flow.
    let a = analyze(&p, &opts()).unwrap();
    let _ = std::fs::remove_file(&p);
    assert!(a.report.local_proxy_timeouts.is_empty());
    assert!(a.verdicts.iter().all(|v| !matches!(
        v.ending,
        Ending::UpstreamTimeout | Ending::LocalProxyTimeout
    )));
}
