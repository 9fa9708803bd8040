//! Kernel timestamps are boot-time nanoseconds; convert them once, here.

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

/// Now, on the clock the kernel programs use (`bpf_ktime_get_boot_ns`).
pub fn boot_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// Wall-clock time of a boot-time timestamp.
pub fn to_system_time(boot_ns_then: u64) -> SystemTime {
    let now_boot = boot_ns();
    let now = SystemTime::now();
    if boot_ns_then <= now_boot {
        now - Duration::from_nanos(now_boot - boot_ns_then)
    } else {
        now + Duration::from_nanos(boot_ns_then - now_boot)
    }
}
