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

/// Flow `i` of many: a distinct client address and port in 198.18.0.0/15
/// (the benchmarking range), to `server`:`port`. Its destination MAC is not
/// the server's, so the server's stack drops it after XDP has tracked it:
/// no RST answers, no half-open sockets, the flow stays open in the table.
pub fn flow_frame(i: u32, server: IpAddr, port: u16, flags: u8) -> Vec<u8> {
    let host = i / 8;
    let client: IpAddr =
        std::net::Ipv4Addr::new(198, 18 + (host >> 16) as u8, (host >> 8) as u8, host as u8).into();
    let mut t = Tcp::syn(client, server);
    t.sport = 20000 + (i % 8) as u16;
    t.dport = port;
    t.flags = flags;
    let mut f = t.frame();
    // Destination MAC: locally administered, nobody's.
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0xbe, 0xef]);
    f
}
