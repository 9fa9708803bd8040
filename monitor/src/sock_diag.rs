//! This network namespace's established TCP sockets and their cookies,
//! read through NETLINK_SOCK_DIAG (inet_diag, what `ss` uses), so flows
//! the kernel programs key by socket cookie can be matched to sockets that
//! existed before the agent attached.
//!
//! The receive side is a pure parser ([`parse_datagram`]) over bytes the
//! kernel sent: nothing is cast from the buffer, every read is
//! length-checked, and a short or inconsistent reply is an error.

use std::io;
use std::mem::{offset_of, size_of};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// One established TCP socket of this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub cookie: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Its peer has not answered a retransmission or probe yet (a
    /// connection a box forgot lingers like this until the server gives up).
    pub unanswered: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("opening the NETLINK_SOCK_DIAG socket: {0}")]
    Open(#[source] io::Error),
    #[error("sending the inet_diag dump request: {0}")]
    Send(#[source] io::Error),
    #[error("receiving the inet_diag dump: {0}")]
    Receive(#[source] io::Error),
    #[error("truncated inet_diag reply: {0}")]
    Truncated(&'static str),
    #[error("malformed inet_diag reply: {0}")]
    Malformed(&'static str),
    #[error("the kernel refused the inet_diag dump: {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { errno: i32 },
    #[error("more than {limit} established TCP sockets")]
    TooManySockets { limit: usize },
    #[error("the inet_diag dump did not end after {datagrams} datagrams")]
    Unterminated { datagrams: usize },
    #[error("reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+): {0}")]
    NetnsCookie(#[source] io::Error),
}

// From linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h, net/tcp_states.h;
// typed as the wire fields they go into (libc's are c_int).
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_ESTABLISHED: u8 = 1;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Larger than any dump datagram: the kernel caps them at 32 KiB less skb
/// overhead. A larger one is caught (MSG_TRUNC) rather than cut silently.
const RECV_BUF: usize = 32 * 1024;
/// Far more than any host holds; past it the answer is an error, not a
/// partial list presented as whole.
const MAX_SOCKETS: usize = 1_000_000;
/// Every datagram but the last holds at least a page of entries (dozens of
/// sockets), so this passes MAX_SOCKETS several times over; it only stops a
/// dump that never says done.
const MAX_DATAGRAMS_PER_DUMP: usize = 65_536;
/// A kernel that stops answering must not hang the agent.
const RECV_TIMEOUT_SECS: libc::time_t = 5;

/// struct nlmsghdr.
#[repr(C)]
#[allow(dead_code)] // all fields kept so the layout is the kernel's
#[derive(Clone, Copy, Debug, Default)]
struct NlMsgHdr {
    nlmsg_len: u32,
    nlmsg_type: u16,
    nlmsg_flags: u16,
    nlmsg_seq: u32,
    nlmsg_pid: u32,
}
const _: () = assert!(size_of::<NlMsgHdr>() == 16);
const NLMSG_HDRLEN: usize = size_of::<NlMsgHdr>();

/// struct inet_diag_sockid. Ports and addresses are in network order, kept
/// as bytes so no one mistakes them for host-order integers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct InetDiagSockId {
    idiag_sport: [u8; 2],
    idiag_dport: [u8; 2],
    idiag_src: [u8; 16],
    idiag_dst: [u8; 16],
    idiag_if: u32,
    idiag_cookie: [u32; 2],
}
const _: () = assert!(size_of::<InetDiagSockId>() == 48);

/// struct inet_diag_req_v2.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct InetDiagReqV2 {
    sdiag_family: u8,
    sdiag_protocol: u8,
    idiag_ext: u8,
    pad: u8,
    idiag_states: u32,
    id: InetDiagSockId,
}
const _: () = assert!(size_of::<InetDiagReqV2>() == 56);

/// struct inet_diag_msg.
#[repr(C)]
#[allow(dead_code)] // all fields kept so the layout is the kernel's
#[derive(Clone, Copy, Debug, Default)]
struct InetDiagMsg {
    idiag_family: u8,
    idiag_state: u8,
    idiag_timer: u8,
    idiag_retrans: u8,
    id: InetDiagSockId,
    idiag_expires: u32,
    idiag_rqueue: u32,
    idiag_wqueue: u32,
    idiag_uid: u32,
    idiag_inode: u32,
}
const _: () = assert!(size_of::<InetDiagMsg>() == 72);

/// What goes on the wire: header and request back to back. The sizes add
/// up with no padding, so every byte handed to sendto is initialised.
#[repr(C)]
struct DumpRequest {
    hdr: NlMsgHdr,
    req: InetDiagReqV2,
}
const _: () = assert!(size_of::<DumpRequest>() == NLMSG_HDRLEN + 56);

/// Every ESTABLISHED TCP socket (IPv4 and IPv6) in this network namespace.
pub fn established_tcp() -> Result<Vec<TcpSocket>, SockDiagError> {
    let fd = open_sock_diag()?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut out = Vec::new();
    for (seq, family) in [(1, libc::AF_INET), (2, libc::AF_INET6)] {
        dump(fd.as_fd(), family as u8, seq, &mut buf, &mut out)?;
    }
    Ok(out)
}

/// This network namespace's cookie (getsockopt SO_NETNS_COOKIE = 71 on a
/// fresh socket; Linux 5.14+), the value bpf_get_netns_cookie() returns for
/// sockets of this namespace.
pub fn netns_cookie() -> Result<u64, SockDiagError> {
    // Any socket reports its namespace's cookie; AF_UNIX exists everywhere.
    let fd = socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0).map_err(SockDiagError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` outlive the call; `len` is its size, the
    // only size the kernel accepts for this option.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(SockDiagError::NetnsCookie(io::Error::last_os_error()));
    }
    if len as usize != size_of::<u64>() {
        return Err(SockDiagError::NetnsCookie(io::Error::other(
            "SO_NETNS_COOKIE returned an unexpected length",
        )));
    }
    Ok(cookie)
}

/// socket(2), owned at once so every later error path closes it.
fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; no pointers.
    let raw = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn open_sock_diag() -> Result<OwnedFd, SockDiagError> {
    let fd =
        socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_SOCK_DIAG).map_err(SockDiagError::Open)?;
    let tv = libc::timeval {
        tv_sec: RECV_TIMEOUT_SECS,
        tv_usec: 0,
    };
    // SAFETY: `tv` outlives the call and the length is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(SockDiagError::Open(io::Error::last_os_error()));
    }
    Ok(fd)
}

/// One family's dump: request, then datagrams until NLMSG_DONE.
fn dump(
    fd: BorrowedFd<'_>,
    family: u8,
    seq: u32,
    buf: &mut [u8],
    out: &mut Vec<TcpSocket>,
) -> Result<(), SockDiagError> {
    send_request(fd, family, seq)?;
    for _ in 0..MAX_DATAGRAMS_PER_DUMP {
        let Some(n) = recv_datagram(fd, buf)? else {
            continue; // interrupted by a signal: counts against the bound
        };
        let datagram = buf.get(..n).ok_or(SockDiagError::Truncated(
            "a datagram larger than the receive buffer",
        ))?;
        if parse_datagram(datagram, out, MAX_SOCKETS)? == Progress::Done {
            return Ok(());
        }
    }
    Err(SockDiagError::Unterminated {
        datagrams: MAX_DATAGRAMS_PER_DUMP,
    })
}

fn send_request(fd: BorrowedFd<'_>, family: u8, seq: u32) -> Result<(), SockDiagError> {
    let request = DumpRequest {
        hdr: NlMsgHdr {
            nlmsg_len: size_of::<DumpRequest>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: NLM_F_REQUEST | NLM_F_DUMP,
            nlmsg_seq: seq,
            nlmsg_pid: 0,
        },
        req: InetDiagReqV2 {
            sdiag_family: family,
            sdiag_protocol: libc::IPPROTO_TCP as u8,
            idiag_ext: 0,
            pad: 0,
            idiag_states: 1 << TCP_ESTABLISHED,
            id: InetDiagSockId::default(),
        },
    };
    // SAFETY: all-zero is a valid sockaddr_nl; pid 0 addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: both pointers are to live values of the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            std::ptr::from_ref(&request).cast(),
            size_of::<DumpRequest>(),
            0,
            std::ptr::from_ref(&kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(SockDiagError::Send(io::Error::last_os_error()));
    }
    if sent as usize != size_of::<DumpRequest>() {
        return Err(SockDiagError::Send(io::Error::new(
            io::ErrorKind::WriteZero,
            "the dump request was sent in part",
        )));
    }
    Ok(())
}

/// One datagram into `buf`: its full length (which may exceed `buf`, see
/// MSG_TRUNC), or None when a signal interrupted the wait.
fn recv_datagram(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<usize>, SockDiagError> {
    // MSG_TRUNC: netlink then returns the datagram's real length, so one
    // larger than the buffer is detected instead of silently cut.
    // SAFETY: `buf` is live and writable for its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(SockDiagError::Receive(e));
    }
    if n == 0 {
        return Err(SockDiagError::Malformed("an empty datagram"));
    }
    Ok(Some(n as usize))
}

/// Whether a datagram ended the dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

/// Walks the netlink messages of one received datagram, appending each
/// ESTABLISHED socket to `out` (at most `limit` in all).
fn parse_datagram(
    mut buf: &[u8],
    out: &mut Vec<TcpSocket>,
    limit: usize,
) -> Result<Progress, SockDiagError> {
    while !buf.is_empty() {
        let hdr = read_nlmsghdr(buf).ok_or(SockDiagError::Truncated("a netlink header"))?;
        let len = hdr.nlmsg_len as usize;
        if len < NLMSG_HDRLEN {
            return Err(SockDiagError::Malformed(
                "a netlink message shorter than its header",
            ));
        }
        let msg = buf
            .get(..len)
            .ok_or(SockDiagError::Truncated("a netlink message"))?;
        let payload = &msg[NLMSG_HDRLEN..];
        match hdr.nlmsg_type {
            NLMSG_DONE => {
                // A dump that failed part-way says so in DONE's payload.
                if let Some(errno) = read_i32(payload, 0).filter(|e| *e < 0) {
                    return Err(SockDiagError::Kernel {
                        errno: errno.saturating_neg(),
                    });
                }
                return Ok(Progress::Done);
            }
            NLMSG_ERROR => {
                let errno = read_i32(payload, 0)
                    .ok_or(SockDiagError::Truncated("an NLMSG_ERROR message"))?;
                if errno == 0 {
                    return Ok(Progress::Done); // an acknowledgement ends the request too
                }
                return Err(SockDiagError::Kernel {
                    errno: errno.saturating_neg(),
                });
            }
            SOCK_DIAG_BY_FAMILY => {
                let m = read_inet_diag_msg(payload)
                    .ok_or(SockDiagError::Truncated("an inet_diag_msg"))?;
                // The request asked for ESTABLISHED only; check anyway.
                if m.idiag_state == TCP_ESTABLISHED {
                    let s = tcp_socket(&m).ok_or(SockDiagError::Malformed(
                        "an inet_diag_msg of neither AF_INET nor AF_INET6",
                    ))?;
                    if out.len() >= limit {
                        return Err(SockDiagError::TooManySockets { limit });
                    }
                    out.push(s);
                }
            }
            _ => {} // NLMSG_NOOP and the like carry nothing for us
        }
        // NLMSG_ALIGN; the datagram's last message may omit its padding.
        let next = ((len + 3) & !3).min(buf.len());
        buf = &buf[next..];
    }
    Ok(Progress::More)
}

fn tcp_socket(m: &InetDiagMsg) -> Option<TcpSocket> {
    let id = &m.id;
    let sport = u16::from_be_bytes(id.idiag_sport);
    let dport = u16::from_be_bytes(id.idiag_dport);
    let (local, remote) = match i32::from(m.idiag_family) {
        libc::AF_INET => {
            let v4 = |a: &[u8; 16]| Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            (
                SocketAddr::V4(SocketAddrV4::new(v4(&id.idiag_src), sport)),
                SocketAddr::V4(SocketAddrV4::new(v4(&id.idiag_dst), dport)),
            )
        }
        libc::AF_INET6 => {
            // As getsockname/getpeername do: the bound interface is the
            // scope of a link-local address only.
            let v6 = |a: &[u8; 16], port| {
                let ip = Ipv6Addr::from(*a);
                let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
                let scope = if link_local { id.idiag_if } else { 0 };
                SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
            };
            (v6(&id.idiag_src, sport), v6(&id.idiag_dst, dport))
        }
        _ => return None,
    };
    let cookie = u64::from(id.idiag_cookie[0]) | (u64::from(id.idiag_cookie[1]) << 32);
    Some(TcpSocket {
        cookie,
        local,
        remote,
        // Timers 1 (retransmission), 2 (keepalive), 4 (zero window probe):
        // idiag_retrans counts what went unanswered.
        unanswered: matches!(m.idiag_timer, 1 | 2 | 4) && m.idiag_retrans > 0,
    })
}

/// `N` bytes of `b` at `at`, if it has them.
fn bytes<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    bytes(b, at).map(u32::from_ne_bytes)
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    bytes(b, at).map(i32::from_ne_bytes)
}

fn read_nlmsghdr(b: &[u8]) -> Option<NlMsgHdr> {
    Some(NlMsgHdr {
        nlmsg_len: read_u32(b, offset_of!(NlMsgHdr, nlmsg_len))?,
        nlmsg_type: bytes(b, offset_of!(NlMsgHdr, nlmsg_type)).map(u16::from_ne_bytes)?,
        nlmsg_flags: bytes(b, offset_of!(NlMsgHdr, nlmsg_flags)).map(u16::from_ne_bytes)?,
        nlmsg_seq: read_u32(b, offset_of!(NlMsgHdr, nlmsg_seq))?,
        nlmsg_pid: read_u32(b, offset_of!(NlMsgHdr, nlmsg_pid))?,
    })
}

fn read_inet_diag_msg(b: &[u8]) -> Option<InetDiagMsg> {
    // Checked once up front, so a short message never yields half a struct.
    if b.len() < size_of::<InetDiagMsg>() {
        return None;
    }
    let id = offset_of!(InetDiagMsg, id);
    let field = |off: usize| id + off;
    Some(InetDiagMsg {
        idiag_family: *b.get(offset_of!(InetDiagMsg, idiag_family))?,
        idiag_state: *b.get(offset_of!(InetDiagMsg, idiag_state))?,
        idiag_timer: *b.get(offset_of!(InetDiagMsg, idiag_timer))?,
        idiag_retrans: *b.get(offset_of!(InetDiagMsg, idiag_retrans))?,
        id: InetDiagSockId {
            idiag_sport: bytes(b, field(offset_of!(InetDiagSockId, idiag_sport)))?,
            idiag_dport: bytes(b, field(offset_of!(InetDiagSockId, idiag_dport)))?,
            idiag_src: bytes(b, field(offset_of!(InetDiagSockId, idiag_src)))?,
            idiag_dst: bytes(b, field(offset_of!(InetDiagSockId, idiag_dst)))?,
            idiag_if: read_u32(b, field(offset_of!(InetDiagSockId, idiag_if)))?,
            idiag_cookie: [
                read_u32(b, field(offset_of!(InetDiagSockId, idiag_cookie)))?,
                read_u32(b, field(offset_of!(InetDiagSockId, idiag_cookie) + 4))?,
            ],
        },
        idiag_expires: read_u32(b, offset_of!(InetDiagMsg, idiag_expires))?,
        idiag_rqueue: read_u32(b, offset_of!(InetDiagMsg, idiag_rqueue))?,
        idiag_wqueue: read_u32(b, offset_of!(InetDiagMsg, idiag_wqueue))?,
        idiag_uid: read_u32(b, offset_of!(InetDiagMsg, idiag_uid))?,
        idiag_inode: read_u32(b, offset_of!(InetDiagMsg, idiag_inode))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// Connects to a fresh listener on `ip` and checks both ends are listed.
    fn both_ends_are_listed(listener: TcpListener) {
        let server_addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(server_addr).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        let client_addr = client.local_addr().unwrap();
        assert_eq!(peer, client_addr);

        let all = established_tcp().unwrap();
        let find = |local, remote| {
            all.iter()
                .find(|s| s.local == local && s.remote == remote)
                .copied()
                .unwrap_or_else(|| panic!("no {local} -> {remote} in {all:#?}"))
        };
        let c = find(client_addr, server_addr);
        let s = find(server_addr, client_addr);
        assert_ne!(c.cookie, 0);
        assert_ne!(s.cookie, 0);
        assert_ne!(c.cookie, s.cookie);
    }

    #[test]
    fn an_established_loopback_connection_is_listed_with_both_ends_and_distinct_cookies() {
        both_ends_are_listed(TcpListener::bind("127.0.0.1:0").unwrap());
    }

    #[test]
    fn an_established_ipv6_loopback_connection_is_listed_with_both_ends_and_distinct_cookies() {
        match TcpListener::bind("[::1]:0") {
            Ok(l) => both_ends_are_listed(l),
            Err(e) => eprintln!("skipped: no IPv6 loopback here ({e})"),
        }
    }

    #[test]
    fn the_namespace_cookie_is_stable_and_non_zero() {
        let a = netns_cookie().unwrap();
        let b = netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, b);
    }

    /// A netlink message: header, payload, NLMSG_ALIGN padding.
    fn nl(ty: u16, payload: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
        v.extend_from_slice(&7u32.to_ne_bytes());
        v.extend_from_slice(&1234u32.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    /// An inet_diag_msg laid out byte by byte as the kernel writes it.
    fn diag(family: i32, state: u8, src: SocketAddr, dst: SocketAddr, cookie: u64) -> Vec<u8> {
        let addr = |a: SocketAddr| {
            let mut b = [0u8; 16];
            match a.ip() {
                std::net::IpAddr::V4(ip) => b[..4].copy_from_slice(&ip.octets()),
                std::net::IpAddr::V6(ip) => b = ip.octets(),
            }
            b
        };
        let mut v = vec![family as u8, state, 0, 0];
        v.extend_from_slice(&src.port().to_be_bytes());
        v.extend_from_slice(&dst.port().to_be_bytes());
        v.extend_from_slice(&addr(src));
        v.extend_from_slice(&addr(dst));
        v.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if
        v.extend_from_slice(&(cookie as u32).to_ne_bytes());
        v.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        for x in [0u32, 0, 0, 1000, 4242] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        assert_eq!(v.len(), 72);
        v
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A v4 and a v6 entry, one in another state (skipped), then DONE.
    fn sample() -> (Vec<u8>, Vec<TcpSocket>) {
        let v4 = TcpSocket {
            cookie: 0x1122_3344_5566_7788,
            local: sa("10.0.0.1:443"),
            remote: sa("192.168.1.2:51000"),
            unanswered: false,
        };
        let v6 = TcpSocket {
            cookie: 5,
            local: sa("[2001:db8::1]:8080"),
            remote: sa("[2001:db8::2]:40000"),
            unanswered: false,
        };
        let mut buf = nl(
            SOCK_DIAG_BY_FAMILY,
            &diag(libc::AF_INET, 1, v4.local, v4.remote, v4.cookie),
        );
        buf.extend(nl(
            SOCK_DIAG_BY_FAMILY,
            &diag(libc::AF_INET, 6, sa("1.1.1.1:1"), sa("2.2.2.2:2"), 9),
        ));
        buf.extend(nl(
            SOCK_DIAG_BY_FAMILY,
            &diag(libc::AF_INET6, 1, v6.local, v6.remote, v6.cookie),
        ));
        buf.extend(nl(NLMSG_DONE, &0i32.to_ne_bytes()));
        (buf, vec![v4, v6])
    }

    #[test]
    fn the_parser_reads_both_families_skips_other_states_and_stops_at_done() {
        let (buf, want) = sample();
        let mut out = Vec::new();
        assert_eq!(
            parse_datagram(&buf, &mut out, MAX_SOCKETS).unwrap(),
            Progress::Done
        );
        assert_eq!(out, want);
    }

    #[test]
    fn a_socket_retransmitting_or_probing_unanswered_is_marked_so() {
        let (l, r) = (sa("10.0.0.1:443"), sa("192.168.1.2:51000"));
        let mut out = Vec::new();
        for (timer, retrans) in [(1u8, 3u8), (2, 1), (1, 0), (0, 0)] {
            let mut d = diag(libc::AF_INET, 1, l, r, 7);
            d[2] = timer; // idiag_timer, then idiag_retrans
            d[3] = retrans;
            let mut buf = nl(SOCK_DIAG_BY_FAMILY, &d);
            buf.extend(nl(NLMSG_DONE, &0i32.to_ne_bytes()));
            parse_datagram(&buf, &mut out, MAX_SOCKETS).unwrap();
        }
        let marks: Vec<bool> = out.iter().map(|s| s.unanswered).collect();
        assert_eq!(marks, [true, true, false, false]);
    }

    #[test]
    fn a_datagram_without_done_asks_for_more() {
        let (buf, want) = sample();
        let without_done = &buf[..buf.len() - (NLMSG_HDRLEN + 4)];
        let mut out = Vec::new();
        assert_eq!(
            parse_datagram(without_done, &mut out, MAX_SOCKETS).unwrap(),
            Progress::More
        );
        assert_eq!(out, want);
    }

    #[test]
    fn a_truncated_message_is_an_error_not_a_panic() {
        let (buf, _) = sample();
        // Cut inside the first inet_diag_msg: the header claims more.
        let mut out = Vec::new();
        let e = parse_datagram(&buf[..NLMSG_HDRLEN + 40], &mut out, MAX_SOCKETS).unwrap_err();
        assert!(
            matches!(e, SockDiagError::Truncated("a netlink message")),
            "{e}"
        );
        // A header whose length fits but whose payload is short.
        let short = nl(SOCK_DIAG_BY_FAMILY, &[0u8; 40]);
        let e = parse_datagram(&short, &mut out, MAX_SOCKETS).unwrap_err();
        assert!(
            matches!(e, SockDiagError::Truncated("an inet_diag_msg")),
            "{e}"
        );
        // Half a header.
        let e = parse_datagram(&buf[..10], &mut out, MAX_SOCKETS).unwrap_err();
        assert!(
            matches!(e, SockDiagError::Truncated("a netlink header")),
            "{e}"
        );
        // Every prefix parses or fails, never panics.
        for n in 0..buf.len() {
            let _ = parse_datagram(&buf[..n], &mut Vec::new(), MAX_SOCKETS);
        }
    }

    #[test]
    fn a_header_shorter_than_itself_is_malformed() {
        let mut buf = nl(NLMSG_DONE, &[0u8; 4]);
        buf[..4].copy_from_slice(&8u32.to_ne_bytes());
        let e = parse_datagram(&buf, &mut Vec::new(), MAX_SOCKETS).unwrap_err();
        assert!(matches!(e, SockDiagError::Malformed(_)), "{e}");
    }

    #[test]
    fn a_kernel_error_reply_carries_its_errno() {
        let buf = nl(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        let e = parse_datagram(&buf, &mut Vec::new(), MAX_SOCKETS).unwrap_err();
        assert!(
            matches!(e, SockDiagError::Kernel { errno } if errno == libc::EPERM),
            "{e}"
        );
        // A dump that failed part-way reports it in DONE.
        let buf = nl(NLMSG_DONE, &(-libc::EINTR).to_ne_bytes());
        let e = parse_datagram(&buf, &mut Vec::new(), MAX_SOCKETS).unwrap_err();
        assert!(
            matches!(e, SockDiagError::Kernel { errno } if errno == libc::EINTR),
            "{e}"
        );
    }

    #[test]
    fn more_sockets_than_the_limit_is_an_error() {
        let (buf, _) = sample();
        let e = parse_datagram(&buf, &mut Vec::new(), 1).unwrap_err();
        assert!(
            matches!(e, SockDiagError::TooManySockets { limit: 1 }),
            "{e}"
        );
    }
}
