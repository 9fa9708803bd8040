//! Benchmark floors (issue 18): the leanest programs doing the work each
//! measured case needs, so `cargo xtask bench` can say what our programs
//! cost over the work itself, not only over an empty program. The agent
//! never loads them (the loader loads its programs by name).
//!
//! One program per hook and variant serves every case, as ours does: a
//! frame that is not IPv4/TCP passes after the parse, one to another port
//! after the port check, and a packet of a flow in the table is keyed, looked
//! up once, stamped by one clock read, and folded in with plain stores of
//! last-seen, counters and the longest gap. IPv4 without VLAN tags only (the
//! benchmark's frames); no counters, events or state machine.

// Keys by reference: a copy into the helper's argument is the stack work the
// floors are meant to avoid.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{classifier, map, xdp},
    maps::LruHashMap,
    programs::{TcContext, XdpContext},
};
use monitor_common::{Flow, FlowKey, FAMILY_V4};

use crate::{CONFIG, FLOWS};

/// The cheapest key for IPv4: addresses and ports in 16 bytes. Small: it
/// only ever holds the benchmark's one flow.
#[map]
static FLOOR_FLOWS16: LruHashMap<[u64; 2], Flow> = LruHashMap::with_max_entries(64, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// What the floors need of an IPv4/TCP frame. Addresses as loaded (network
/// byte order in memory), ports in host order.
struct V4 {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    ip_len: u16,
}

/// # Safety
/// `start + off + size_of::<T>() <= end` checked by the caller.
#[inline(always)]
unsafe fn at<T>(start: usize, off: usize) -> T {
    ((start + off) as *const T).read_unaligned()
}

/// Ethernet, IPv4 (options skipped, first fragments only), TCP ports.
#[inline(always)]
fn v4_tcp(start: usize, end: usize) -> Option<V4> {
    if start + ETH_HLEN + 20 > end {
        return None;
    }
    // SAFETY: 34 bytes checked above.
    let (ethertype, vihl, frag, proto) = unsafe {
        (
            at::<u16>(start, 12),
            at::<u8>(start, 14),
            at::<u16>(start, 20),
            at::<u8>(start, 23),
        )
    };
    if ethertype != ETH_P_IP_BE || vihl >> 4 != 4 || vihl & 0x0f < 5 || proto != 6 {
        return None;
    }
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    let l4 = start + ETH_HLEN + ((vihl & 0x0f) as usize) * 4;
    // One pointer, checked then read: the verifier loses the bound if LLVM
    // recomputes it.
    let ports: [u16; 2] = read(l4, end)?;
    // SAFETY: the IPv4 header, checked above.
    unsafe {
        Some(V4 {
            src: at(start, 26),
            dst: at(start, 30),
            ip_len: u16::from_be(at(start, 16)),
            sport: u16::from_be(ports[0]),
            dport: u16::from_be(ports[1]),
        })
    }
}

#[inline(always)]
fn read<T>(p: usize, end: usize) -> Option<T> {
    if p + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: bounds checked just above.
    Some(unsafe { (p as *const T).read_unaligned() })
}

/// The one tracked port (the benchmark configures one).
#[inline(always)]
fn port() -> u16 {
    // SAFETY: never written after load.
    unsafe { (*core::ptr::addr_of!(CONFIG)).ports[0] }
}

/// The whole floor: parse, port check, then one lookup, one clock read, plain stores.
/// `CHEAP`: the 16-byte key; otherwise our 40-byte [`FlowKey`] in our flow
/// table. Both read the coarse clock, as ours does.
#[inline(always)]
fn established<const CHEAP: bool>(start: usize, end: usize, ingress: bool) {
    let Some(h) = v4_tcp(start, end) else {
        return;
    };
    let (client, server, cport, sport) = if ingress {
        (h.src, h.dst, h.sport, h.dport)
    } else {
        (h.dst, h.src, h.dport, h.sport)
    };
    if sport != port() {
        return;
    }
    let flow = if CHEAP {
        let key = [
            client as u64 | (server as u64) << 32,
            cport as u64 | (sport as u64) << 16,
        ];
        FLOOR_FLOWS16.get_ptr_mut(&key)
    } else {
        // FlowKey's bytes: addresses in the first 4 of 16, then the ports,
        // the family and zero padding.
        let key: [u64; 5] = [
            client as u64,
            0,
            server as u64,
            0,
            cport as u64 | (sport as u64) << 16 | (FAMILY_V4 as u64) << 32,
        ];
        // SAFETY: [u64; 5] has FlowKey's size and a stricter alignment.
        FLOWS.get_ptr_mut(unsafe { &*(key.as_ptr() as *const FlowKey) })
    };
    let Some(flow) = flow else {
        if CHEAP {
            seed16(client, server, cport, sport);
        }
        return;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a map value; lost updates between CPUs are accepted, as in ours.
    let f = unsafe { &mut *flow };
    let last = if f.last_in_ns > f.last_out_ns {
        f.last_in_ns
    } else {
        f.last_out_ns
    };
    if last != 0 && now - last > f.max_gap_ns {
        f.max_gap_ns = now - last;
    }
    if ingress {
        f.last_in_ns = now;
        f.pkts_in += 1;
        f.bytes_in += h.ip_len as u64;
    } else {
        f.last_out_ns = now;
        f.pkts_out += 1;
        f.bytes_out += h.ip_len as u64;
    }
}

/// The cheap floor's table starts empty: its first packet enters the flow
/// (outside the measured path).
#[inline(never)]
fn seed16(client: u32, server: u32, cport: u16, sport: u16) {
    let key = [
        client as u64 | (server as u64) << 32,
        cport as u64 | (sport as u64) << 16,
    ];
    let flow = Flow {
        last_payload_dir: 0xff,
        ..Flow::default()
    };
    let _ = FLOOR_FLOWS16.insert(&key, &flow, 0);
}

#[xdp]
pub fn floor_xdp(ctx: XdpContext) -> u32 {
    established::<false>(ctx.data(), ctx.data_end(), true);
    xdp_action::XDP_PASS
}

#[classifier]
pub fn floor_tc(ctx: TcContext) -> i32 {
    established::<false>(ctx.data(), ctx.data_end(), false);
    TC_ACT_UNSPEC
}

#[xdp]
pub fn floor_cheapest_xdp(ctx: XdpContext) -> u32 {
    established::<true>(ctx.data(), ctx.data_end(), true);
    xdp_action::XDP_PASS
}

#[classifier]
pub fn floor_cheapest_tc(ctx: TcContext) -> i32 {
    established::<true>(ctx.data(), ctx.data_end(), false);
    TC_ACT_UNSPEC
}
