use super::*;
use crate::ping::{request::encode_base64_query, wbxml::tests::ping_body};

fn key() -> FlowKey {
    FlowKey {
        client_addr: [192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        server_addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        client_port: 40000,
        server_port: 8080,
        family: 4,
        _pad: [0; 3],
    }
}

fn ping_request(query: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /Microsoft-Server-ActiveSync?{query} HTTP/1.1\r\nHost: mail.example\r\n\
         Content-Type: application/vnd.ms-sync.wbxml\r\nMS-ASProtocolVersion: 14.1\r\n\
         Authorization: Basic amRvZTpzZWNyZXQ=\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Feed `bytes` as segments split at `cuts`, each copied up to `copy` bytes.
fn feed(r: &mut Reader, seq0: u32, bytes: &[u8], cuts: &[usize], copy: usize) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let seg = &bytes[start..end];
        let data = &seg[..seg.len().min(copy)];
        out.extend(r.sample(
            &key(),
            1,
            seq0.wrapping_add(start as u32),
            seg.len() as u32,
            data,
        ));
        start = end;
    }
    out
}

fn stated(h: u32, device: &str, base64: bool) -> Outcome {
    Outcome::Ping(PingRequest {
        device_id: Some(device.into()),
        base64_query: base64,
        heartbeat: Heartbeat::Stated(h),
    })
}

#[test]
fn a_ping_in_one_segment_gives_its_heartbeat() {
    let mut r = Reader::new();
    let req = ping_request(
        "Cmd=Ping&User=a&DeviceId=D1&DeviceType=x",
        &ping_body("480"),
    );
    assert_eq!(feed(&mut r, 1, &req, &[], 1024), [stated(480, "D1", false)]);
}

#[test]
fn a_ping_split_at_any_point_gives_the_same_heartbeat() {
    let req = ping_request(
        &encode_base64_query(request::PING_COMMAND_CODE, "D2", "Android"),
        &ping_body("900"),
    );
    for cut in 1..req.len() {
        let mut r = Reader::new();
        // Sequence numbers wrap inside the request for some cuts.
        let out = feed(&mut r, u32::MAX - 100, &req, &[cut], 1024);
        assert_eq!(out, [stated(900, "D2", true)], "split at {cut}");
    }
}

#[test]
fn later_segments_of_a_read_request_and_retransmissions_are_not_reread() {
    let mut r = Reader::new();
    let body = vec![0x03; 3000];
    let mut sync = format!(
        "POST /Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=D3 HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    sync.extend_from_slice(&body);
    assert_eq!(
        feed(&mut r, 1000, &sync, &[1448, 2896], 1024),
        [Outcome::Other("Sync".into())]
    );
    // The same first segment again (a retransmission): nothing new.
    assert!(r.sample(&key(), 2, 1000, 1448, &sync[..1024]).is_empty());
    // The next request starts right after the Sync's body.
    let ping = ping_request("Cmd=Ping&DeviceId=D3", &ping_body("60"));
    let next = 1000 + sync.len() as u32;
    assert_eq!(
        feed(&mut r, next, &ping, &[], 1024),
        [stated(60, "D3", false)]
    );
    assert_eq!(r.stats.pings, 1);
    assert_eq!(r.stats.other_commands, 1);
}

#[test]
fn a_head_longer_than_the_copy_is_unreadable_and_a_cut_body_is_a_ping_without_heartbeat() {
    let mut r = Reader::new();
    let long = format!("Cmd=Ping&DeviceId=D4&Pad={}", "x".repeat(1100));
    let out = feed(
        &mut r,
        1,
        &ping_request(&long, &ping_body("480")),
        &[],
        1024,
    );
    assert!(matches!(out[..], [Outcome::Unreadable(_)]), "{out:?}");
    // Head inside the copy, body beyond it.
    // Pad the head to 1,010 bytes: whole in the copy, the body beyond it.
    let head0 = ping_request("Cmd=Ping&DeviceId=D4&Pad=", b"").len();
    let pad = format!("Cmd=Ping&DeviceId=D4&Pad={}", "x".repeat(1010 - head0));
    let mut r = Reader::new();
    let out = feed(&mut r, 1, &ping_request(&pad, &ping_body("480")), &[], 1024);
    assert_eq!(
        out,
        [Outcome::Ping(PingRequest {
            device_id: Some("D4".into()),
            base64_query: false,
            heartbeat: Heartbeat::Unreadable,
        })]
    );
}

#[test]
fn an_empty_ping_states_no_heartbeat() {
    let mut r = Reader::new();
    let out = feed(
        &mut r,
        1,
        &ping_request("Cmd=Ping&DeviceId=D5", b""),
        &[],
        1024,
    );
    assert_eq!(
        out,
        [Outcome::Ping(PingRequest {
            device_id: Some("D5".into()),
            base64_query: false,
            heartbeat: Heartbeat::Unstated,
        })]
    );
}

#[test]
fn garbage_and_tls_are_unreadable_never_a_heartbeat() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..2000 {
        let mut r = Reader::new();
        let len = 1 + i % 700;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for o in feed(&mut r, i as u32, &bytes, &[len / 2], 1024) {
            assert!(!matches!(o, Outcome::Ping(_)), "{o:?}");
        }
    }
    let mut r = Reader::new();
    let out = feed(
        &mut r,
        1,
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        &[],
        1024,
    );
    assert!(matches!(out[..], [Outcome::Unreadable(_)]));
}

#[test]
fn a_request_whose_rest_was_never_sampled_is_reported_when_the_next_begins() {
    let mut r = Reader::new();
    let req = ping_request("Cmd=Ping&DeviceId=D6", &ping_body("480"));
    // Only the head arrives (its body segment was not sampled).
    let head_len = req.len() - ping_body("480").len();
    assert!(r
        .sample(&key(), 1, 1, head_len as u32, &req[..head_len])
        .is_empty());
    let next = 1 + req.len() as u32 + 500;
    let out = feed(&mut r, next, &req, &[], 1024);
    assert_eq!(out.len(), 2);
    assert!(matches!(
        &out[0],
        Outcome::Ping(PingRequest {
            heartbeat: Heartbeat::Unreadable,
            ..
        })
    ));
    assert_eq!(out[1], stated(480, "D6", false));
}
