//! Many distinct TCP frames, sent raw from a namespace: how the benchmarks
//! fill the flow table and churn events without a million real sockets.

use std::{ffi::CString, net::IpAddr, time::Duration};

use monitor_common::craft::Tcp;

/// An AF_PACKET socket bound to one interface (in the calling thread's namespace).
pub struct RawSender {
    fd: i32,
    ifindex: i32,
}

impl RawSender {
    pub fn open(iface: &str) -> std::io::Result<RawSender> {
        let name = CString::new(iface).map_err(std::io::Error::other)?;
        // SAFETY: plain syscalls with valid arguments; the fd is owned here.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            if ifindex == 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(RawSender { fd, ifindex })
        }
    }

    /// Send one Ethernet frame; retries briefly while the device queue is full.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: sockaddr_ll zeroed then filled; frame is a valid buffer.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        for _ in 0..1000 {
            let r = unsafe {
                libc::sendto(
                    self.fd,
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                    &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if r >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOBUFS) && e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Err(std::io::Error::other("device queue stayed full"))
    }
}

impl Drop for RawSender {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.fd) };
    }
}

/// A raw sender on `iface` of namespace `ns`. The socket stays in that
/// namespace whichever thread then uses it.
pub fn sender_in(ns: &xtask::netns::Netns, iface: &str) -> RawSender {
    let iface = iface.to_string();
    ns.run(move || RawSender::open(&iface).expect("raw socket"))
}

fn client_of(i: u32) -> (IpAddr, u16) {
    let host = i / 8;
    let client: IpAddr =
        std::net::Ipv4Addr::new(198, 18 + (host >> 16) as u8, (host >> 8) as u8, host as u8).into();
    (client, 20000 + (i % 8) as u16)
}

/// Nobody's MAC (locally administered): the receiving stack drops the frame
/// after the hooks have seen it (no RST answers, no half-open sockets).
const NOBODY: [u8; 6] = [0x02, 0, 0, 0, 0xbe, 0xef];

/// Flow `i` of many: a distinct client address and port in 198.18.0.0/15
/// (the benchmarking range), to `server`:`port`.
pub fn flow_frame(i: u32, server: IpAddr, port: u16, flags: u8) -> Vec<u8> {
    let (client, cport) = client_of(i);
    let mut t = Tcp::syn(client, server);
    t.sport = cport;
    t.dport = port;
    t.flags = flags;
    let mut f = t.frame();
    f[..6].copy_from_slice(&NOBODY);
    f
}

/// The server's answer to flow `i`'s SYN, sent from the server's side (it
/// passes the TC egress hook).
pub fn synack_frame(i: u32, server: IpAddr, port: u16) -> Vec<u8> {
    let (client, cport) = client_of(i);
    let mut t = Tcp::syn(server, client);
    t.sport = port;
    t.dport = cport;
    t.flags = monitor_common::TCP_SYN | monitor_common::TCP_ACK;
    let mut f = t.frame();
    f[..6].copy_from_slice(&NOBODY);
    f
}

/// Establish flows `first..first + n` (SYN, SYN-ACK, ACK), in batches so
/// each SYN-ACK finds its half-open entry (the half-open table is smaller
/// than a million).
pub fn establish(client: &RawSender, server_side: &RawSender, server: IpAddr, first: u32, n: u32) {
    use monitor_common::{TCP_ACK, TCP_SYN};
    let batch = 512;
    let mut i = first;
    while i < first + n {
        let end = (i + batch).min(first + n);
        for j in i..end {
            client
                .send(&flow_frame(j, server, 443, TCP_SYN))
                .expect("send");
        }
        for j in i..end {
            server_side
                .send(&synack_frame(j, server, 443))
                .expect("send");
        }
        for j in i..end {
            client
                .send(&flow_frame(j, server, 443, TCP_ACK))
                .expect("send");
        }
        i = end;
    }
}
