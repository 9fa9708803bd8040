//! Kernel side: thin. Parse headers (shared parser), look up the flow, call the
//! shared state machine, bump per-CPU counters, emit events. Every path returns
//! XDP_PASS / TC_ACT_OK: a monitor never drops or changes a packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, BPF_NOEXIST, TC_ACT_OK},
    helpers::bpf_ktime_get_boot_ns,
    macros::{classifier, map, xdp},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use monitor_common::{
    flow::{classify, fill_event, flow_key, new_flow, opens_flow, update},
    parse_ethernet, Config, Counter, Dir, Event, EventKind, Flow, FlowKey, Frame, Packet,
    DEFAULT_FLOW_TABLE_SIZE, EVENT_RING_BYTES,
};

/// Written by the agent at load time (ports, gap threshold).
#[no_mangle]
static CONFIG: Config = Config::DEFAULT;

/// The flow table; the agent sets its size at load time.
#[map]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Packet bytes between two kernel pointers; every read checked against the end.
struct Bytes {
    start: usize,
    end: usize,
}

impl Frame for Bytes {
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let p = self.start + off;
        if p + N > self.end {
            return None;
        }
        // SAFETY: bounds checked just above; [u8; N] has alignment 1.
        Some(unsafe { (p as *const [u8; N]).read_unaligned() })
    }
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *v += 1 };
    }
}

/// Write the event for `pkt` straight into a ring buffer slot (no stack copy).
#[inline(always)]
fn emit(kind: EventKind, key: &FlowKey, flow: &Flow, pkt: &Packet, dir: Dir, now: u64) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            fill_event(
                unsafe { &mut *slot.as_mut_ptr() },
                kind,
                key,
                flow,
                pkt,
                dir,
                now,
            );
            slot.submit(0);
            count(Counter::EventsSent);
        }
        None => count(Counter::EventsDropped),
    }
}

/// Shared by both hooks.
#[inline(always)]
fn track<C: aya_ebpf::EbpfContext>(ctx: &C, bytes: &Bytes, dir: Dir) {
    count(Counter::PacketsSeen);
    let pkt = match parse_ethernet(bytes) {
        Ok(p) => p,
        Err(e) => {
            if e.is_failure() {
                count(Counter::ParseFailures);
            }
            return;
        }
    };
    let cfg = unsafe { core::ptr::read_volatile(&CONFIG) };
    let local_port = match dir {
        Dir::In => pkt.dst_port,
        Dir::Out => pkt.src_port,
    };
    if !cfg.tracks(local_port) {
        return;
    }
    count(Counter::PacketsTracked);
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let key = flow_key(&pkt, dir);

    if let Some(flow) = FLOWS.get_ptr_mut(&key) {
        // XDP and TC may update one flow on two CPUs at once; a lost update
        // skews a counter by a packet, which a monitor can accept.
        let flow = unsafe { &mut *flow };
        let kind = classify(flow, &pkt, dir, now, cfg.gap_threshold_ns);
        if let Some(kind) = kind {
            emit(kind, &key, flow, &pkt, dir, now);
        }
        update(flow, &pkt, dir, now, kind);
        return;
    }
    if !opens_flow(&pkt) {
        return;
    }
    let mut flow = new_flow(&pkt, dir, now);
    update(&mut flow, &pkt, dir, now, None);
    match FLOWS.insert(&key, &flow, BPF_NOEXIST as u64) {
        Ok(()) => {
            count(Counter::FlowsCreated);
            // The event shows the flow before its first packet, like every event.
            let before = new_flow(&pkt, dir, now);
            emit(EventKind::Opened, &key, &before, &pkt, dir, now);
        }
        Err(err) => {
            count(Counter::FlowInsertFailed);
            warn!(ctx, "flow table insert failed: {}", err);
        }
    }
}

#[xdp]
pub fn monitor_xdp(ctx: XdpContext) -> u32 {
    let bytes = Bytes {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    track(&ctx, &bytes, Dir::In);
    xdp_action::XDP_PASS
}

/// Headers we may need in the linear part of an skb: Ethernet + VLAN + IPv6
/// with extension headers + TCP, capped.
const TC_PULL_BYTES: u32 = 256;

#[classifier]
pub fn monitor_tc(ctx: TcContext) -> i32 {
    // Locally built packets keep headers linear; pull only when they are not.
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let want = if ctx.len() < TC_PULL_BYTES {
        ctx.len()
    } else {
        TC_PULL_BYTES
    };
    if linear < want {
        let _ = ctx.pull_data(want);
    }
    let bytes = Bytes {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    track(&ctx, &bytes, Dir::Out);
    TC_ACT_OK
}

/// Benchmark references: the cheapest programs of each kind. The agent never
/// loads them; `cargo xtask bench` compares ours against them.
#[xdp]
pub fn baseline_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn baseline_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
