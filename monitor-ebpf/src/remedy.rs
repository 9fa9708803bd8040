//! The cure (issue 16): TCP keepalive on this host's server sockets of the
//! paths whose box forgets idle flows, so a packet crosses the box before
//! its timer runs out. Two programs, loaded only with `[remedy] keepalive`:
//!
//! - `remedy_new` (sock_ops, root cgroup): a connection this host accepts,
//!   in the agent's network namespace, on a remedied path (server port and
//!   client prefix, in `REMEDY_PATHS`) gets the path's keepalive as it is
//!   established (Linux 5.15: keepalive options and the namespace cookie);
//! - `remedy_sweep` (TCP iterator): the connections user space lists by
//!   cookie in `SWEEP_TARGETS` get it, or lose it, in one walk (Linux 5.15:
//!   `bpf_setsockopt` from an iterator, on the locked socket).
//!
//! Neither ever touches a packet; both leave a socket whose application
//! set its own keepalive alone, and take back only a keepalive that is
//! still exactly theirs (reading options from BPF: Linux 6.1).
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt, bpf_setsockopt,
    },
    macros::{map, sock_ops},
    maps::{lpm_trie::Key as LpmKey, HashMap, LpmTrie, PerCpuArray},
    programs::SockOpsContext,
};
use monitor_common::remedy::{
    remedy_net_data, v4_mapped, KeepaliveSetting, RemedyCounter, RemedyNetData, SweepTarget,
    MAX_KEEPIDLE, MAX_NEW_COVERED, MAX_REMEDY_PATHS, MAX_SWEEP_TARGETS, REMEDY_DONE,
    REMEDY_OWN_KEEPALIVE, SWEEP_APPLY, SWEEP_OURS, SWEEP_REARM,
};

const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The agent's network namespace (its cookie), set by the loader: a
/// cgroup program sees every namespace's sockets, the cure only its own.
#[no_mangle]
static NETNS_COOKIE: u64 = 0;

/// Remedied paths: server port and client prefix → keepalive.
#[map]
static REMEDY_PATHS: LpmTrie<RemedyNetData, KeepaliveSetting> =
    LpmTrie::with_max_entries(MAX_REMEDY_PATHS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Connections covered as they were established (cookie → setting), for
/// user space to count and, when the path heals, undo.
#[map]
static NEW_COVERED: HashMap<u64, KeepaliveSetting> = HashMap::with_max_entries(MAX_NEW_COVERED, 0);

/// The next sweep's work, by socket cookie; results written in place.
#[map]
static SWEEP_TARGETS: HashMap<u64, SweepTarget> = HashMap::with_max_entries(MAX_SWEEP_TARGETS, 0);

#[map]
static REMEDY_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(RemedyCounter::COUNT, 0);

#[inline(always)]
fn count(c: RemedyCounter) {
    if let Some(v) = REMEDY_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot: no other CPU writes it.
        unsafe { *v += 1 };
    }
}

/// `setsockopt(level, name, value)` through the helper; 0 or -errno.
#[inline(always)]
fn set(sk: *mut c_void, level: i32, name: i32, value: u32) -> i64 {
    let mut v = value as i32;
    // SAFETY: `sk` is the program's socket argument; `v` lives on the stack.
    unsafe { bpf_setsockopt(sk, level, name, &mut v as *mut i32 as *mut c_void, 4) }
}

/// `getsockopt(level, name)` through the helper (Linux 6.1 for these).
#[inline(always)]
fn get(sk: *mut c_void, level: i32, name: i32) -> Option<u32> {
    let mut v: i32 = 0;
    // SAFETY: as in `set`.
    let r = unsafe { bpf_getsockopt(sk, level, name, &mut v as *mut i32 as *mut c_void, 4) };
    (r == 0).then_some(v as u32)
}

/// Keepalive on `sk` is exactly `ours`: switched on, with our timings.
/// Anything else is the application's doing (or unreadable): not ours.
#[inline(always)]
fn still_ours(sk: *mut c_void, ours: &KeepaliveSetting) -> bool {
    get(sk, SOL_SOCKET, SO_KEEPALIVE) == Some(1)
        && get(sk, SOL_TCP, TCP_KEEPIDLE) == Some(ours.idle_s)
        && get(sk, SOL_TCP, TCP_KEEPINTVL) == Some(ours.interval_s)
        && get(sk, SOL_TCP, TCP_KEEPCNT) == Some(ours.count)
}

/// The keepalive of `s` on `sk`, unless the application keeps its own
/// (`ours`: what we set before, which must still be in force). Switched on
/// first: the timings set after it re-arm the timer from the last packet
/// received, so a connection already silent for a while is probed at once
/// instead of a whole idle time from now. 0, [`REMEDY_OWN_KEEPALIVE`], or
/// -errno (keepalive switched back off if it was not on before). `rearm`:
/// see [`SWEEP_REARM`].
#[inline(never)]
fn apply(
    sk: *mut c_void,
    s: &KeepaliveSetting,
    ours: Option<&KeepaliveSetting>,
    rearm: bool,
) -> i32 {
    let mine = match ours {
        Some(o) => still_ours(sk, o),
        // Unreadable counts as the application's: never overwrite a
        // keepalive we cannot see.
        None => get(sk, SOL_SOCKET, SO_KEEPALIVE) == Some(0),
    };
    if !mine {
        return REMEDY_OWN_KEEPALIVE;
    }
    let mut r = set(sk, SOL_SOCKET, SO_KEEPALIVE, 1);
    if r == 0 && rearm && s.idle_s < MAX_KEEPIDLE {
        r = set(sk, SOL_TCP, TCP_KEEPIDLE, s.idle_s + 1);
    }
    if r == 0 {
        r = set(sk, SOL_TCP, TCP_KEEPIDLE, s.idle_s);
    }
    if r == 0 {
        r = set(sk, SOL_TCP, TCP_KEEPINTVL, s.interval_s);
    }
    if r == 0 {
        r = set(sk, SOL_TCP, TCP_KEEPCNT, s.count);
    }
    if r != 0 && ours.is_none() {
        set(sk, SOL_SOCKET, SO_KEEPALIVE, 0);
    }
    r as i32
}

/// Keepalive off, and the timings back to `defaults` (the namespace's
/// sysctls, as user space read them; none when zero), so an application
/// that switches keepalive on later gets what it would have had; unless
/// the socket's keepalive is no longer `ours` (its application changed it
/// since: left alone).
#[inline(never)]
fn undo(sk: *mut c_void, defaults: &KeepaliveSetting, ours: &KeepaliveSetting) -> i32 {
    if !still_ours(sk, ours) {
        return REMEDY_OWN_KEEPALIVE;
    }
    let mut r = set(sk, SOL_SOCKET, SO_KEEPALIVE, 0);
    if r == 0 && defaults.idle_s != 0 {
        r = set(sk, SOL_TCP, TCP_KEEPIDLE, defaults.idle_s);
        if r == 0 {
            r = set(sk, SOL_TCP, TCP_KEEPINTVL, defaults.interval_s);
        }
        if r == 0 {
            r = set(sk, SOL_TCP, TCP_KEEPCNT, defaults.count);
        }
    }
    r as i32
}

#[sock_ops]
pub fn remedy_new(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        on_established(&ctx);
    }
    // 1: carry on (a sock_ops program's verdict is not a packet's fate).
    1
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let sk = ctx.ops as *mut c_void;
    // SAFETY: a volatile read of our static, so the compiler leaves the
    // value the loader wrote instead of folding 0.
    let ours = unsafe { core::ptr::read_volatile(&NETNS_COOKIE) };
    // SAFETY: the program's own context.
    if unsafe { bpf_get_netns_cookie(sk) } != ours {
        return;
    }
    let addr = match ctx.family() {
        AF_INET => v4_mapped(ctx.remote_ip4().to_ne_bytes()),
        AF_INET6 => {
            // Each word at its own constant offset: the verifier refuses a
            // context pointer moved and then read (as a copied array is).
            let ops = ctx.ops;
            // SAFETY: fields of the program's own context.
            let w = unsafe {
                [
                    core::ptr::read_volatile(core::ptr::addr_of!((*ops).remote_ip6[0])),
                    core::ptr::read_volatile(core::ptr::addr_of!((*ops).remote_ip6[1])),
                    core::ptr::read_volatile(core::ptr::addr_of!((*ops).remote_ip6[2])),
                    core::ptr::read_volatile(core::ptr::addr_of!((*ops).remote_ip6[3])),
                ]
            };
            let mut a = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let b = w[i].to_ne_bytes();
                a[4 * i] = b[0];
                a[4 * i + 1] = b[1];
                a[4 * i + 2] = b[2];
                a[4 * i + 3] = b[3];
                i += 1;
            }
            a
        }
        _ => return,
    };
    // On the stack, not a per-CPU slot: a run in process context (the
    // listener's backlog) can be interrupted by one in softirq on this CPU.
    let key = LpmKey::new(128 + 16, remedy_net_data(ctx.local_port() as u16, &addr));
    let Some(setting) = REMEDY_PATHS.get(&key).copied() else {
        return;
    };
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    // Recorded first: a socket given keepalive is always one user space
    // knows to take it back from.
    if NEW_COVERED.insert(&cookie, &setting, 0).is_err() {
        count(RemedyCounter::NewTableFull);
        return;
    }
    let r = apply(sk, &setting, None, false);
    if r == REMEDY_DONE {
        count(RemedyCounter::NewCovered);
        return;
    }
    let _ = NEW_COVERED.remove(&cookie);
    count(if r == REMEDY_OWN_KEEPALIVE {
        RemedyCounter::NewOwnKeepalive
    } else {
        RemedyCounter::NewFailed
    });
}

/// `struct bpf_iter__tcp`: the iterator's arguments, 8 bytes each.
#[repr(C)]
pub struct IterTcp {
    meta: *mut c_void,
    sk_common: *mut c_void,
    uid: u64,
}

#[no_mangle]
#[link_section = "iter/tcp"]
pub extern "C" fn remedy_sweep(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the iterator's context; `sk_common` is null at the end.
    let sk = unsafe { (*ctx).sk_common };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: a socket the kernel hands the iterator.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    let Some(t) = SWEEP_TARGETS.get_ptr_mut(&cookie) else {
        return 0;
    };
    // SAFETY: a value of our table, written by this walk only.
    unsafe {
        let flags = (*t).flags;
        let r = if flags & SWEEP_APPLY == 0 {
            undo(sk, &(*t).setting, &(*t).ours)
        } else if flags & SWEEP_OURS != 0 {
            apply(
                sk,
                &(*t).setting,
                Some(&(*t).ours),
                flags & SWEEP_REARM != 0,
            )
        } else {
            apply(sk, &(*t).setting, None, flags & SWEEP_REARM != 0)
        };
        (*t).result = r;
        match (r, flags & SWEEP_APPLY != 0) {
            (REMEDY_DONE, true) => count(RemedyCounter::SweepApplied),
            (REMEDY_DONE, false) => count(RemedyCounter::SweepUndone),
            (REMEDY_OWN_KEEPALIVE, _) => {}
            _ => count(RemedyCounter::SweepFailed),
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
