//! Captures written in every supported form, analysed.

use std::{borrow::Cow, net::IpAddr, path::PathBuf, time::Duration};

use monitor_common::{craft::Tcp, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN};
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

fn opts() -> AnalyzeOptions {
    AnalyzeOptions {
        ports: vec![443],
        plaintext_ports: vec![],
        servers: vec![],
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

#[test]
fn a_pcapng_file_reads_like_a_pcap() {
    let p = tmp("ng.pcapng");
    let f = std::fs::File::create(&p).unwrap();
    let mut w = PcapNgWriter::new(f).unwrap();
    w.write_pcapng_block(InterfaceDescriptionBlock {
        linktype: DataLink::ETHERNET,
        snaplen: 0,
        options: vec![],
    })
    .unwrap();
    for (t, frame) in reset_at_expiry(1_700_000_000.0) {
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_secs_f64(t),
            original_len: frame.len() as u32,
            data: Cow::Owned(frame),
            options: vec![],
        })
        .unwrap();
    }
    drop(w);
    let a = analyze(&p, &opts()).unwrap();
    assert_eq!(the_one_verdict(&a).ending, Ending::InjectedReset);
    let _ = std::fs::remove_file(p);
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
