//! The cure's kernel boundary (issue 16): which of this host's server
//! sockets get TCP keepalive, with which settings, and what the kernel did.
//!
//! New connections are matched by path (server port and client prefix) in
//! an LPM trie at `PASSIVE_ESTABLISHED`; existing ones by socket cookie, in
//! a table user space fills before it runs the TCP iterator.

/// The path table's key data: the server port (network order), then the
/// client address (IPv6, or IPv4-mapped `::ffff:a.b.c.d`, as a dual-stack
/// socket sees an IPv4 client).
pub type RemedyNetData = [u8; 18];

/// Bits of the key before the address: the port's.
pub const REMEDY_PORT_BITS: u32 = 16;

/// Most paths remedied at once (the path table's size).
pub const MAX_REMEDY_PATHS: u32 = 1024;

/// Most sockets the kernel remembers covering at establishment before user
/// space reads them (a full table is counted, the socket left alone).
pub const MAX_NEW_COVERED: u32 = 65_536;

/// Most sockets one sweep changes (user space also bounds it per second).
pub const MAX_SWEEP_TARGETS: u32 = 4096;

/// `addr` (16 bytes, IPv4-mapped for IPv4) behind `port`, as the path
/// table's key data.
#[inline(always)]
pub fn remedy_net_data(port: u16, addr: &[u8; 16]) -> RemedyNetData {
    let mut d = [0u8; 18];
    let p = port.to_be_bytes();
    d[0] = p[0];
    d[1] = p[1];
    let mut i = 0;
    while i < 16 {
        d[2 + i] = addr[i];
        i += 1;
    }
    d
}

/// The key's prefix length for a client prefix of `prefix` bits (IPv4
/// prefixes sit behind the 96 bits of the mapping).
pub const fn remedy_prefix_len(v4: bool, prefix: u8) -> u32 {
    REMEDY_PORT_BITS + if v4 { 96 } else { 0 } + prefix as u32
}

/// The IPv4-mapped form of an IPv4 address, as the path table holds it.
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// TCP keepalive for one socket, and the path it is for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepaliveSetting {
    /// TCP_KEEPIDLE.
    pub idle_s: u32,
    /// TCP_KEEPINTVL.
    pub interval_s: u32,
    /// TCP_KEEPCNT.
    pub count: u32,
    /// The path's index in user space's list (for counting coverage).
    pub path: u32,
}
const _: () = assert!(core::mem::size_of::<KeepaliveSetting>() == 16);

/// `SweepTarget::flags`: turn keepalive on with `setting` (else: off).
pub const SWEEP_APPLY: u32 = 1;
/// `SweepTarget::flags`: keepalive on this socket is ours already (a new
/// setting, not an application's own keepalive to leave alone).
pub const SWEEP_OURS: u32 = 2;
/// `SweepTarget::flags`: set the idle time one second longer first, so the
/// keepalive timer is armed afresh for what remains (armed far ahead, a
/// timer fires up to an eighth of its wait late, and setting the same
/// value again leaves it where it was): a sounding probe on time.
pub const SWEEP_REARM: u32 = 4;
/// Linux's largest TCP_KEEPIDLE.
pub const MAX_KEEPIDLE: u32 = 32_767;

/// `SweepTarget::result` and the new-connection outcome: applied.
pub const REMEDY_DONE: i32 = 0;
/// The application keeps its own keepalive: left alone.
pub const REMEDY_OWN_KEEPALIVE: i32 = 1;
/// Not yet visited by a sweep (the socket closed first).
pub const REMEDY_PENDING: i32 = 2;

/// One socket a sweep changes, by cookie; the kernel writes `result`.
/// Taking keepalive back (no [`SWEEP_APPLY`]), `setting` holds the
/// timings to restore (the namespace's defaults; zero: leave them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepTarget {
    pub setting: KeepaliveSetting,
    /// The keepalive we set before (with [`SWEEP_OURS`], and to take it
    /// back): changed only if still exactly this.
    pub ours: KeepaliveSetting,
    pub flags: u32,
    /// [`REMEDY_DONE`], [`REMEDY_OWN_KEEPALIVE`], [`REMEDY_PENDING`], or a
    /// negative errno from `bpf_setsockopt`.
    pub result: i32,
}
const _: () = assert!(core::mem::size_of::<SweepTarget>() == 40);

/// What the remedy programs count (per CPU).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemedyCounter {
    /// New connections on a remedied path given keepalive.
    NewCovered = 0,
    /// New connections left alone: the application's own keepalive.
    NewOwnKeepalive = 1,
    /// New connections whose setsockopt failed.
    NewFailed = 2,
    /// New connections covered but not recorded: the table was full.
    NewTableFull = 3,
    /// Sockets a sweep gave keepalive.
    SweepApplied = 4,
    /// Sockets a sweep took keepalive from.
    SweepUndone = 5,
    /// Sockets whose setsockopt failed in a sweep.
    SweepFailed = 6,
}

impl RemedyCounter {
    pub const COUNT: u32 = 7;
    pub const ALL: [RemedyCounter; 7] = [
        RemedyCounter::NewCovered,
        RemedyCounter::NewOwnKeepalive,
        RemedyCounter::NewFailed,
        RemedyCounter::NewTableFull,
        RemedyCounter::SweepApplied,
        RemedyCounter::SweepUndone,
        RemedyCounter::SweepFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RemedyCounter::NewCovered => "new_covered",
            RemedyCounter::NewOwnKeepalive => "new_own_keepalive",
            RemedyCounter::NewFailed => "new_failed",
            RemedyCounter::NewTableFull => "new_table_full",
            RemedyCounter::SweepApplied => "sweep_applied",
            RemedyCounter::SweepUndone => "sweep_undone",
            RemedyCounter::SweepFailed => "sweep_failed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data without padding, every bit pattern valid.
    unsafe impl aya::Pod for super::KeepaliveSetting {}
    unsafe impl aya::Pod for super::SweepTarget {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_client_prefix_sits_behind_the_port_and_the_mapping() {
        let d = remedy_net_data(443, &v4_mapped([100, 64, 1, 7]));
        assert_eq!(&d[..2], &[1, 0xbb]);
        assert_eq!(&d[12..], &[0xff, 0xff, 100, 64, 1, 7]);
        assert_eq!(remedy_prefix_len(true, 24), 16 + 96 + 24);
        assert_eq!(remedy_prefix_len(false, 56), 16 + 56);
    }
}
