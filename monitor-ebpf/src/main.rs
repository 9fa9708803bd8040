//! Kernel side: thin. Parse headers (shared parser), look up the flow, call the
//! shared state machine, bump per-CPU counters, emit events. Every path returns
//! XDP_PASS or TC_ACT_UNSPEC: a monitor never drops or changes a packet, and
//! never ends the chain of TC programs it shares a hook with.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, BPF_NOEXIST, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    macros::{classifier, map, xdp},
    maps::{lpm_trie::Key as LpmKey, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use monitor_common::{
    flow::{
        classify, fill_event, flow_key, half_open_packet, is_duplicate, new_flow, opens_flow,
        packet_sig, remember_sig, tap_direction, update, wants_sample,
    },
    parse_ethernet, quick, state, Config, Counter, Dir, Event, EventKind, Flow, FlowKey, Frame,
    Packet, ParseError, Quick, Sample, ServerKeyData, DEFAULT_FLOW_TABLE_SIZE,
    DEFAULT_HALF_OPEN_TABLE_SIZE, EVENT_RING_BYTES, MAX_SERVER_PREFIXES, SAMPLE_BYTES,
};

mod floor;

/// Written by the agent at load time (ports, gap threshold). `mut` so the
/// compiler reads it where it lies (the loader rewrites it) instead of
/// folding the default in or copying it to the 512-byte stack.
#[no_mangle]
static mut CONFIG: Config = Config::DEFAULT;

/// 1: stamp packets with `bpf_ktime_get_coarse_ns` (Linux 5.11+: a cached
/// read, one tick of resolution, 4 ms at HZ=250, ample for silences of
/// seconds); 0: `bpf_ktime_get_ns`. Both are CLOCK_MONOTONIC. Not `mut`: it
/// lies in `.rodata`, which the loader sets and the kernel freezes, so the
/// verifier knows it and never checks the helper an older kernel lacks.
#[no_mangle]
static COARSE_CLOCK: u8 = 1;

/// Now, for a packet. Tap mode always reads the precise clock: a mirror's
/// two copies of a packet arrive within 2 ms, under one tick.
#[inline(always)]
fn clock<const TAP: bool>() -> u64 {
    // SAFETY: a read of our own static; volatile so the compiler leaves the
    // value the loader wrote to the kernel instead of folding the default.
    let coarse = unsafe { core::ptr::read_volatile(&COARSE_CLOCK) } != 0;
    // SAFETY: helpers without arguments.
    unsafe {
        if !TAP && coarse {
            bpf_ktime_get_coarse_ns()
        } else {
            bpf_ktime_get_ns()
        }
    }
}

/// The flow table; the agent sets its size at load time.
#[map]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Connections whose handshake has not completed, apart from the flow table
/// so that a SYN flood evicts only its own kind.
#[map]
static HALF_OPEN: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(DEFAULT_HALF_OPEN_TABLE_SIZE, 0);

/// Where a new flow is built before it enters the half-open table: a map
/// value, not the stack. The object allows misaligned access (word loads
/// from packets), and LLVM then merges a new flow's zero stores into
/// misaligned words, which the verifier accepts in a map value on this
/// architecture but never on the stack.
#[map]
static NEW_FLOW: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// Tap mode's server addresses and prefixes (with `Config::server_filter`):
/// on a mirror of several servers, only these are servers.
#[map]
static SERVERS: LpmTrie<ServerKeyData, u8> =
    LpmTrie::with_max_entries(MAX_SERVER_PREFIXES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Where the server table's lookup key is built: a map value, not the stack
/// (its 17-byte data draws misaligned stores, as [`NEW_FLOW`] says).
#[map]
static SERVER_KEY: PerCpuArray<LpmKey<ServerKeyData>> = PerCpuArray::with_max_entries(1, 0);

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
    fn read<const N: usize>(&self, off: usize) -> Option<&[u8; N]> {
        let p = self.start + off;
        if p + N > self.end {
            return None;
        }
        // SAFETY: bounds checked just above; [u8; N] has alignment 1, and
        // the packet outlives the program's run.
        Some(unsafe { &*(p as *const [u8; N]) })
    }
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *v += 1 };
    }
}

/// Write the event for `pkt` straight into a ring buffer slot (no stack
/// copy). False when the ring buffer was full (counted).
#[inline(always)]
fn emit(kind: EventKind, key: &FlowKey, flow: &Flow, pkt: &Packet, dir: Dir, now: u64) -> bool {
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
            true
        }
        None => {
            count(Counter::EventsDropped);
            false
        }
    }
}

/// Copies payload bytes out of a packet (for samples of client segments,
/// which arrive on ingress: XDP, or TC ingress).
trait Payload: EbpfContext {
    /// False where copying needs a helper the kernel may lack: the program
    /// then never samples (a constant, so the copy is compiled out).
    const SAMPLES: bool = true;
    /// Copy `len` (1..=SAMPLE_BYTES) bytes at `off` to `dst`; false if the
    /// packet does not hold them.
    fn copy(&self, off: u32, dst: *mut u8, len: u32) -> bool;
}

impl Payload for XdpContext {
    #[inline(always)]
    fn copy(&self, off: u32, dst: *mut u8, len: u32) -> bool {
        // The helper also reads fragments of multi-buffer frames.
        unsafe { bpf_xdp_load_bytes(self.ctx, off, dst as *mut _, len) == 0 }
    }
}

/// XDP on kernels before 5.18: no `bpf_xdp_load_bytes`, so no samples.
struct XdpNoSamples<'a>(&'a XdpContext);

impl EbpfContext for XdpNoSamples<'_> {
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.0.as_ptr()
    }
}

impl Payload for XdpNoSamples<'_> {
    const SAMPLES: bool = false;

    #[inline(always)]
    fn copy(&self, _off: u32, _dst: *mut u8, _len: u32) -> bool {
        false
    }
}

impl Payload for TcContext {
    #[inline(always)]
    fn copy(&self, off: u32, dst: *mut u8, len: u32) -> bool {
        // Reads the non-linear part of the skb too.
        unsafe { bpf_skb_load_bytes(self.skb.skb as *const _, off, dst as *mut _, len) == 0 }
    }
}

/// Copy the first bytes of a plaintext request segment into the ring buffer.
#[inline(always)]
fn emit_sample<C: Payload>(ctx: &C, key: &FlowKey, pkt: &Packet, now: u64) {
    let Some(mut slot) = EVENTS.reserve::<Sample>(0) else {
        count(Counter::SamplesDropped);
        return;
    };
    let s = unsafe { &mut *slot.as_mut_ptr() };
    let mut len = pkt.payload_len;
    if len > SAMPLE_BYTES as u32 {
        len = SAMPLE_BYTES as u32;
    }
    // Bounds the verifier can see: 1..=SAMPLE_BYTES.
    if len == 0 || !ctx.copy(pkt.payload_off, s.data.as_mut_ptr(), len) {
        slot.discard(0);
        count(Counter::SamplesDropped);
        return;
    }
    s.key = *key;
    s.ts_ns = now;
    s.seq = pkt.seq;
    s.payload_len = pkt.payload_len;
    s.captured = len;
    s._pad = 0;
    slot.submit(0);
    count(Counter::SamplesSent);
}

/// The full header parse into `out`, in a function of its own (a
/// BPF-to-BPF call): the chain probe's, which keeps its packet on the stack.
#[inline(never)]
fn parse(start: usize, end: usize, out: &mut Packet) -> Result<(), ParseError> {
    *out = parse_ethernet(&Bytes { start, end })?;
    Ok(())
}

/// How far `track` goes: all the way for the agent's programs; the
/// benchmark's stage programs stop after a stage, so `cargo xtask bench`
/// can measure what each stage of the packet path costs.
const ALL_STAGES: u8 = 0;
const STOP_AFTER_PARSE: u8 = 1;
const STOP_AFTER_KEY: u8 = 2;
const STOP_AFTER_LOOKUP: u8 = 3;

/// Is `addr` a server's, for tap mode? Any address without a server table.
#[inline(always)]
fn is_server(cfg: &Config, family: u8, addr: &[u8; 16]) -> bool {
    if cfg.server_filter == 0 {
        return true;
    }
    let Some(key) = SERVER_KEY.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's own slot, used only here within one packet.
    let key = unsafe { &mut *key };
    // Field by field: a whole key built first would be a stack temporary.
    key.prefix_len = if family == monitor_common::FAMILY_V4 {
        8 + 32
    } else {
        8 + 128
    };
    key.data[0] = family;
    let mut i = 0;
    while i < 16 {
        key.data[1 + i] = addr[i];
        i += 1;
    }
    SERVERS.get(key).is_some()
}

/// Shared by every hook. Returns false when the headers run past `bytes`
/// and `more` says the packet holds more (an skb's non-linear part): pull,
/// then call again. `TAP`: a mirror port's ingress, where both directions
/// arrive and the ports say which is which (`dir` is then ignored).
#[inline(always)]
fn track<C: Payload, const STOP: u8, const TAP: bool>(
    ctx: &C,
    bytes: &Bytes,
    dir: Dir,
    more: bool,
) -> bool {
    if !TAP {
        // SAFETY: never written after load.
        let cfg = unsafe { &*core::ptr::addr_of!(CONFIG) };
        // One pass settles the common frames: not ours, or ours parsed
        // with its port's index.
        match quick(bytes, dir == Dir::In, cfg) {
            Quick::Pass => return true,
            Quick::Tracked(pkt, i) => {
                tracked::<C, STOP, TAP>(ctx, bytes, &pkt, dir, i);
                return true;
            }
            Quick::Unsure => {}
        }
    }
    full_track::<C, STOP, TAP>(ctx, bytes.start, bytes.end, dir, more)
}

/// The frames the one pass leaves (VLAN tags, IPv6 extension headers, short
/// or malformed headers, every frame in tap mode): the full parse, then the
/// same path. A function of its own, so the common path never carries its
/// stack or joins its packet with the quick one's.
#[inline(never)]
fn full_track<C: Payload, const STOP: u8, const TAP: bool>(
    ctx: &C,
    start: usize,
    end: usize,
    dir: Dir,
    more: bool,
) -> bool {
    // SAFETY: never written after load.
    let cfg = unsafe { &*core::ptr::addr_of!(CONFIG) };
    let pkt = match parse_ethernet(&Bytes { start, end }) {
        Ok(pkt) => {
            count(Counter::FullParses);
            pkt
        }
        // Counted when called again on the pulled headers.
        Err(ParseError::Truncated) if more => return false,
        Err(e) => {
            count(Counter::FullParses);
            if e.is_failure() {
                count(Counter::ParseFailures);
            }
            return true;
        }
    };
    let dir = if TAP {
        match tap_direction(cfg, &pkt, |a| is_server(cfg, pkt.family, a)) {
            Some(d) => d,
            None => return true,
        }
    } else {
        dir
    };
    let local_port = match dir {
        Dir::In => pkt.dst_port,
        Dir::Out => pkt.src_port,
    };
    if let Some(i) = cfg.port_index(local_port) {
        tracked::<C, STOP, TAP>(ctx, &Bytes { start, end }, &pkt, dir, i);
    }
    true
}

/// A packet of a tracked port, parsed from `bytes`: its flow looked up and
/// stepped.
#[inline(always)]
fn tracked<C: Payload, const STOP: u8, const TAP: bool>(
    ctx: &C,
    bytes: &Bytes,
    pkt: &Packet,
    dir: Dir,
    port_index: u32,
) -> bool {
    // SAFETY: never written after load.
    let cfg = unsafe { &*core::ptr::addr_of!(CONFIG) };
    if STOP == STOP_AFTER_PARSE {
        // Every field the state machine reads, folded, so that none of the
        // parse is optimised away.
        let fold = pkt.seq
            ^ pkt.ack
            ^ pkt.ip_len
            ^ pkt.payload_len
            ^ pkt.payload_off
            ^ u32::from(pkt.src_port) << 16
            ^ u32::from(pkt.dst_port)
            ^ u32::from(pkt.ip_id) << 16
            ^ u32::from(pkt.window)
            ^ u32::from(pkt.tcp_flags) << 8
            ^ u32::from(pkt.ttl)
            ^ u32::from_ne_bytes([
                pkt.src_addr[0],
                pkt.src_addr[1],
                pkt.src_addr[2],
                pkt.src_addr[3],
            ])
            ^ u32::from_ne_bytes([
                pkt.dst_addr[0],
                pkt.dst_addr[1],
                pkt.dst_addr[2],
                pkt.dst_addr[3],
            ]);
        // SAFETY: a read of our own stack.
        return unsafe { core::ptr::read_volatile(&fold) } != 0;
    }
    count(Counter::PacketsTracked);
    let now = clock::<TAP>();
    let key = flow_key(pkt, dir);
    if STOP == STOP_AFTER_KEY {
        // SAFETY: as above, for the whole key (built in memory, as the
        // lookup needs it) and the clock.
        return unsafe { core::ptr::read_volatile(&key) }.client_port as u64 != now;
    }

    let found = FLOWS.get_ptr_mut(&key);
    if STOP == STOP_AFTER_LOOKUP {
        return found.is_some();
    }
    if let Some(flow) = found {
        // A mirror of both switch ports shows each packet twice.
        let sig = if TAP { packet_sig(pkt, dir) } else { 0 };
        if TAP && is_duplicate(unsafe { &*flow }, sig, dir, now) {
            count(Counter::Duplicates);
            return true;
        }
        let step = Step {
            now,
            gap_threshold_ns: cfg.gap_threshold_ns,
            dir,
            plaintext: C::SAMPLES && cfg.plaintext_at(port_index),
        };
        // XDP and TC may update one flow on two CPUs at once; a lost update
        // skews a counter by a packet, which a monitor can accept.
        if known(ctx, unsafe { &mut *flow }, &key, pkt, &step) {
            mark_lost(flow);
        }
        if TAP {
            // SAFETY: the live map value this packet looked up.
            remember_sig(unsafe { &mut *flow }, sig);
        }
        return true;
    }
    if unknown(ctx, &key, bytes, dir, now) {
        if let Some(flow) = FLOWS.get_ptr_mut(&key) {
            // The establishing packet, applied to the new flow (not sampled:
            // offline replay decides samples before the move, the same way).
            let step = Step {
                now,
                gap_threshold_ns: cfg.gap_threshold_ns,
                dir,
                plaintext: false,
            };
            if known(ctx, unsafe { &mut *flow }, &key, pkt, &step) {
                mark_lost(flow);
            }
            if TAP {
                // Its mirror copy, next, is a copy too.
                remember_sig(unsafe { &mut *flow }, packet_sig(pkt, dir));
            }
        }
    }
    true
}

/// What a packet of a known flow needs besides the flow, key and packet
/// (BPF functions take at most five arguments).
struct Step {
    now: u64,
    gap_threshold_ns: u64,
    dir: Dir,
    plaintext: bool,
}

/// A packet of a flow in the table, inline: no call on the established
/// packet's path (the stack allows it since the rare paths, `unknown` and
/// `full_track`, keep their packets in frames of their own). Returns
/// whether its event was lost, for the caller to mark the flow.
#[inline(always)]
fn known<C: Payload>(ctx: &C, flow: &mut Flow, key: &FlowKey, pkt: &Packet, step: &Step) -> bool {
    let (dir, now) = (step.dir, step.now);
    if wants_sample(step.plaintext, flow, pkt, dir) {
        emit_sample(ctx, key, pkt, now);
    }
    let kind = classify(flow, pkt, dir, now, step.gap_threshold_ns);
    let lost = match kind {
        Some(kind) => !emit(kind, key, flow, pkt, dir, now),
        None => false,
    };
    update(flow, pkt, dir, now, kind);
    lost
}

/// Later events of a flow that lost one carry the mark: user space calls
/// the flow incomplete.
#[inline(always)]
fn mark_lost(flow: *mut Flow) {
    // SAFETY: a live map value pointer from a lookup on this packet's path.
    unsafe { (*flow).state |= state::EVENT_LOST };
}

/// A packet of a flow not in the flow table. A connection starts in the
/// half-open table; the packet that establishes it (see
/// `monitor_common::flow::established`) moves it to the flow table with an
/// `Opened` event, and true is returned: the caller then applies the packet
/// to the flow as to any other. Its own function too (stack), which parses
/// the packet again from `bytes` (the headers `key` was built from): passed
/// by reference, the parsed packet would be kept in memory on every
/// packet's path for this rare call.
#[inline(never)]
fn unknown<C: Payload>(ctx: &C, key: &FlowKey, bytes: &Bytes, dir: Dir, now: u64) -> bool {
    let Ok(pkt) = parse_ethernet(bytes) else {
        return false;
    };
    let pkt = &pkt;
    if let Some(h) = HALF_OPEN.get_ptr_mut(key) {
        // The connection as it was goes in this CPU's scratch flow, not on
        // the stack (96 bytes the 512-byte stack cannot spare).
        let Some(before) = NEW_FLOW.get_ptr_mut(0) else {
            return false;
        };
        // SAFETY: this CPU's own slot, used only here within one packet;
        // `h` the live half-open entry this packet looked up (two map
        // values: a word-wise copy, never a call to memmove).
        let before = unsafe {
            core::ptr::copy_nonoverlapping(h, before, 1);
            &mut *before
        };
        if !half_open_packet(unsafe { &mut *h }, pkt, dir, now) {
            return false;
        }
        let _ = HALF_OPEN.remove(key);
        return match FLOWS.insert(key, &*before, BPF_NOEXIST as u64) {
            Ok(()) => {
                count(Counter::FlowsCreated);
                if !emit(EventKind::Opened, key, before, pkt, dir, now) {
                    if let Some(f) = FLOWS.get_ptr_mut(key) {
                        unsafe { (*f).state |= state::EVENT_LOST };
                    }
                }
                true
            }
            Err(err) => {
                count(Counter::FlowInsertFailed);
                warn!(ctx, "flow table insert failed: {}", err);
                false
            }
        };
    }
    if !opens_flow(pkt) {
        return false;
    }
    let Some(flow) = NEW_FLOW.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's own slot, used only here within one packet.
    let flow = unsafe { &mut *flow };
    *flow = new_flow(pkt, dir, now);
    update(flow, pkt, dir, now, None);
    match HALF_OPEN.insert(key, flow, BPF_NOEXIST as u64) {
        Ok(()) => count(Counter::HalfOpenCreated),
        Err(err) => {
            count(Counter::FlowInsertFailed);
            warn!(ctx, "half-open table insert failed: {}", err);
        }
    }
    false
}

/// `frags`: multi-buffer aware. Headers are always in the first buffer
/// (`data..data_end`, what the parser reads); request samples use
/// `bpf_xdp_load_bytes`, which reads across buffers. Without it a device must
/// linearise large frames for us (veth then gives up GRO: a 6x loss).
#[xdp(frags)]
pub fn monitor_xdp(ctx: XdpContext) -> u32 {
    xdp_track::<_, ALL_STAGES, false>(&ctx, &ctx)
}

/// Tap mode on XDP: a mirror port's ingress, both directions (multi-buffer
/// aware, as `monitor_xdp`).
#[xdp(frags)]
pub fn monitor_xdp_tap(ctx: XdpContext) -> u32 {
    xdp_track::<_, ALL_STAGES, true>(&ctx, &ctx)
}

/// `monitor_xdp` for kernels before 5.18, which refuse `frags` programs
/// (BPF_F_XDP_HAS_FRAGS) and lack `bpf_xdp_load_bytes`: the same tracking,
/// no request samples. The loader picks one of the two.
#[xdp]
pub fn monitor_xdp_nofrags(ctx: XdpContext) -> u32 {
    xdp_track::<_, ALL_STAGES, false>(&XdpNoSamples(&ctx), &ctx)
}

#[inline(always)]
fn xdp_track<C: Payload, const STOP: u8, const TAP: bool>(ctx: &C, xdp: &XdpContext) -> u32 {
    let bytes = Bytes {
        start: xdp.data(),
        end: xdp.data_end(),
    };
    // Headers are always in the first buffer: nothing more to pull.
    track::<_, STOP, TAP>(ctx, &bytes, Dir::In, false);
    xdp_action::XDP_PASS
}

/// Headers we may need in the linear part of an skb: Ethernet + VLAN + IPv6
/// with extension headers + TCP, capped.
const TC_PULL_BYTES: u32 = 256;

/// Egress: server to client.
#[classifier]
pub fn monitor_tc(ctx: TcContext) -> i32 {
    tc_track::<false>(ctx, Dir::Out)
}

/// Ingress through TC instead of XDP (`ingress = "tc"`): for interfaces where
/// XDP costs more than it saves (veth and other virtual devices, where an XDP
/// program makes the device give up GRO).
#[classifier]
pub fn monitor_tc_ingress(ctx: TcContext) -> i32 {
    tc_track::<false>(ctx, Dir::In)
}

/// Tap mode on TC: a mirror port's ingress, both directions.
#[classifier]
pub fn monitor_tc_tap(ctx: TcContext) -> i32 {
    tc_track::<true>(ctx, Dir::In)
}

#[inline(always)]
fn tc_track<const TAP: bool>(ctx: TcContext, dir: Dir) -> i32 {
    // An skb's headers are usually linear already (locally built, or after
    // GRO): parse in place, and pull (a copy) only if they run past it.
    let bytes = Bytes {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let more = ctx.data_end() - ctx.data() < ctx.len() as usize;
    if !track::<_, ALL_STAGES, TAP>(&ctx, &bytes, dir, more) {
        let want = if ctx.len() < TC_PULL_BYTES {
            ctx.len()
        } else {
            TC_PULL_BYTES
        };
        let _ = ctx.pull_data(want);
        let bytes = Bytes {
            start: ctx.data(),
            end: ctx.data_end(),
        };
        track::<_, ALL_STAGES, TAP>(&ctx, &bytes, dir, false);
    }
    // Not TC_ACT_OK: under TCX that is TCX_PASS, which skips the programs
    // after ours (and the clsact filters after TCX); on clsact it ends the
    // classification. UNSPEC (TCX_NEXT) hands the packet on unchanged.
    TC_ACT_UNSPEC
}

/// Benchmark references: the cheapest programs of each kind. The agent never
/// loads them; `cargo xtask bench` compares ours against them.
#[xdp]
pub fn baseline_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn baseline_tc(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Benchmark stages: the XDP program cut short after a stage of its packet
/// path (never loaded by the agent).
#[xdp]
pub fn stage_parse_xdp(ctx: XdpContext) -> u32 {
    xdp_track::<_, STOP_AFTER_PARSE, false>(&ctx, &ctx)
}

#[xdp]
pub fn stage_key_xdp(ctx: XdpContext) -> u32 {
    xdp_track::<_, STOP_AFTER_KEY, false>(&ctx, &ctx)
}

#[xdp]
pub fn stage_lookup_xdp(ctx: XdpContext) -> u32 {
    xdp_track::<_, STOP_AFTER_LOOKUP, false>(&ctx, &ctx)
}

/// Chain tests' fixture (tests/tests/chain.rs), never loaded by the agent: a
/// second TC program on the same hook as ours. Counts the packets of the
/// tracked ports it sees, per slot below, and passes them on as a passive
/// program should. Each test load of the object has its own counts.
#[map]
static CHAIN_PROBE: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_SLOTS, 0);

/// CHAIN_PROBE slots: packets to a tracked port (client to server), from one
/// (server to client), and every packet.
const PROBE_TO_PORT: u32 = 0;
const PROBE_FROM_PORT: u32 = 1;
const PROBE_ALL: u32 = 2;
const PROBE_SLOTS: u32 = 3;

#[classifier]
pub fn chain_probe_tc(ctx: TcContext) -> i32 {
    probe_count(PROBE_ALL);
    let mut pkt = Packet::default();
    let mut parsed = parse(ctx.data(), ctx.data_end(), &mut pkt);
    if parsed.is_err() && ctx.data_end() - ctx.data() < ctx.len() as usize {
        let want = if ctx.len() < TC_PULL_BYTES {
            ctx.len()
        } else {
            TC_PULL_BYTES
        };
        let _ = ctx.pull_data(want);
        parsed = parse(ctx.data(), ctx.data_end(), &mut pkt);
    }
    if parsed.is_ok() {
        // SAFETY: never written after load.
        let cfg = unsafe { &*core::ptr::addr_of!(CONFIG) };
        if cfg.tracks(pkt.dst_port) {
            probe_count(PROBE_TO_PORT);
        }
        if cfg.tracks(pkt.src_port) {
            probe_count(PROBE_FROM_PORT);
        }
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn probe_count(slot: u32) {
    if let Some(v) = CHAIN_PROBE.get_ptr_mut(slot) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *v += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
