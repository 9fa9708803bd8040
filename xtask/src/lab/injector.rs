//! A reset-at-expiry middlebox (F5 FastL4-like): watches forwarded TCP on a
//! router interface, learns each flow's sequence numbers, and after `timeout`
//! of silence resets both ends, with the router's own TTL. IPv4 only.

use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use monitor_common::{
    parse::{parse_ip, Packet},
    TCP_FIN, TCP_RST, TCP_SYN,
};

#[derive(Default, Debug)]
pub struct InjectorStats {
    pub resets_sent: AtomicU64,
}

struct FlowSeq {
    last_seen: Instant,
    /// Next sequence number each side will send (what the other expects).
    client_next: Option<u32>,
    server_next: Option<u32>,
}

fn os_err<T>(r: i64, what: &str) -> io::Result<T>
where
    T: Default,
{
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(T::default())
    }
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 + TCP RST from `src` to `dst` with sequence `seq`, TTL 64.
pub fn rst_packet(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seq: u32) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64; // the router's own TTL
    p[9] = 6;
    p[12..16].copy_from_slice(&src.0.octets());
    p[16..20].copy_from_slice(&dst.0.octets());
    let ip_sum = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&src.1.to_be_bytes());
    t[2..4].copy_from_slice(&dst.1.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = TCP_RST;
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.0.octets());
    pseudo.extend_from_slice(&dst.0.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let mut sum = 0u32;
    for c in pseudo.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    let tcp_sum = checksum(&p[20..], sum);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

fn send_raw(fd: &OwnedFd, pkt: &[u8], dst: Ipv4Addr) -> io::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid buffer and address for the duration of the call.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr() as *const libc::c_void,
            pkt.len(),
            0,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    os_err::<()>(r as i64, "sending an injected RST")
}

/// A packet socket on `iface` for IPv4, with a 100 ms receive timeout (so
/// the loop sees `stop`).
fn packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let eth_p_ip = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket calls; fds are owned right after creation.
    let rx = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(eth_p_ip)) };
    os_err::<()>(i64::from(rx), "opening a packet socket")?;
    let rx = unsafe { OwnedFd::from_raw_fd(rx) };
    let cname = std::ffi::CString::new(iface).map_err(io::Error::other)?;
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::other(format!("no interface {iface}")));
    }
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = eth_p_ip;
    sll.sll_ifindex = ifindex as i32;
    let r = unsafe {
        libc::bind(
            rx.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    os_err::<()>(i64::from(r), "binding the packet socket")?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    let r = unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    os_err::<()>(i64::from(r), "setting the receive timeout")?;
    Ok(rx)
}

/// A raw IPv4 socket to send whole packets (the RSTs) from.
fn raw_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the fd is owned right after creation.
    let tx = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    os_err::<()>(i64::from(tx), "opening a raw socket")?;
    Ok(unsafe { OwnedFd::from_raw_fd(tx) })
}

/// The next packet from `rx` into `buf`; `None` on the receive timeout.
fn recv(rx: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: valid buffer of `buf.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::recv(
            rx.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        )
    };
    (n > 0).then_some(n as usize)
}

/// (client address, client port, server address).
type FlowKey = (Ipv4Addr, u16, Ipv4Addr);

/// The flows to the server port `port` seen on the interface.
struct Flows {
    port: u16,
    by_key: HashMap<FlowKey, FlowSeq>,
}

impl Flows {
    /// Learn from a packet of either direction; a FIN or RST forgets the flow.
    fn learn(&mut self, p: &Packet) {
        let from_client = p.dst_port == self.port;
        if p.family != 4 || !(from_client || p.src_port == self.port) {
            return;
        }
        let a = |b: &[u8; 16]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        let (c, s) = if from_client {
            (a(&p.src_addr), a(&p.dst_addr))
        } else {
            (a(&p.dst_addr), a(&p.src_addr))
        };
        let cport = if from_client { p.src_port } else { p.dst_port };
        let key = (c, cport, s);
        if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            self.by_key.remove(&key);
            return;
        }
        let f = self.by_key.entry(key).or_insert(FlowSeq {
            last_seen: Instant::now(),
            client_next: None,
            server_next: None,
        });
        f.last_seen = Instant::now();
        let next = p
            .seq
            .wrapping_add(p.payload_len)
            .wrapping_add(u32::from(p.tcp_flags & TCP_SYN != 0));
        if from_client {
            f.client_next = Some(next);
        } else {
            f.server_next = Some(next);
        }
    }

    /// Forget the flows silent for `timeout`, and return them.
    fn take_expired(&mut self, timeout: Duration) -> Vec<(FlowKey, FlowSeq)> {
        let due: Vec<_> = self
            .by_key
            .iter()
            .filter(|(_, f)| f.last_seen.elapsed() >= timeout)
            .map(|(k, _)| *k)
            .collect();
        due.into_iter()
            .filter_map(|k| self.by_key.remove(&k).map(|f| (k, f)))
            .collect()
    }
}

/// Reset both ends of a flow, each at the sequence number it expects.
fn reset(tx: &OwnedFd, (c, cport, s): FlowKey, port: u16, f: &FlowSeq) {
    if let Some(seq) = f.client_next {
        let _ = send_raw(tx, &rst_packet((c, cport), (s, port), seq), s);
    }
    if let Some(seq) = f.server_next {
        let _ = send_raw(tx, &rst_packet((s, port), (c, cport), seq), c);
    }
}

/// Run until `stop`. Call from a thread inside the router's namespace;
/// `iface` is the router's client-facing interface.
pub fn run(
    iface: &str,
    port: u16,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    stats: Arc<InjectorStats>,
    ready: std::sync::mpsc::Sender<()>,
) -> io::Result<()> {
    let rx = packet_socket(iface)?;
    let tx = raw_socket()?;
    // Devices start only now: a flow whose first request the injector missed
    // would not be learnt until its next one, a whole heartbeat later.
    let _ = ready.send(());

    let mut flows = Flows {
        port,
        by_key: HashMap::new(),
    };
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if let Some(n) = recv(&rx, &mut buf) {
            if let Ok(p) = parse_ip(&buf[..n], 0) {
                flows.learn(&p);
            }
        }
        for (key, f) in flows.take_expired(timeout) {
            reset(&tx, key, port, &f);
            stats.resets_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_rst_parses_with_ttl_64_and_valid_checksums() {
        let p = rst_packet(
            (Ipv4Addr::new(100, 64, 1, 10), 40000),
            (Ipv4Addr::new(192, 0, 2, 1), 443),
            12345,
        );
        let parsed = parse_ip(p.as_slice(), 0).unwrap();
        assert_eq!(
            (parsed.ttl, parsed.tcp_flags, parsed.seq),
            (64, TCP_RST, 12345)
        );
        assert_eq!(checksum(&p[..20], 0), 0, "IP checksum verifies to zero");
    }
}
