//! Kernel timestamps are CLOCK_MONOTONIC nanoseconds (read coarse or
//! precise by the programs, see the loader); convert them once, here.

use std::time::{Duration, SystemTime};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Now, on the clock the kernel programs use (`bpf_ktime_get_coarse_ns`
/// or `bpf_ktime_get_ns`: CLOCK_MONOTONIC).
pub fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Wall-clock time of a kernel timestamp.
pub fn to_system_time(then_ns: u64) -> SystemTime {
    let now_kernel = now_ns();
    let now = SystemTime::now();
    if then_ns <= now_kernel {
        now - Duration::from_nanos(now_kernel - then_ns)
    } else {
        now + Duration::from_nanos(then_ns - now_kernel)
    }
}
