//! Reading the kernel's per-CPU counters from their map.

use std::borrow::Borrow;

use aya::maps::{MapData, PerCpuArray};
use monitor_common::Counter;

pub use monitor_core::counters::KernelCounters;

/// Sum every CPU's slot of every counter.
pub trait ReadCounters: Sized {
    fn read<T: Borrow<MapData>>(map: &PerCpuArray<T, u64>) -> Result<Self, aya::maps::MapError>;
}

impl ReadCounters for KernelCounters {
    fn read<T: Borrow<MapData>>(map: &PerCpuArray<T, u64>) -> Result<Self, aya::maps::MapError> {
        let mut out = KernelCounters::default();
        for c in Counter::ALL {
            let per_cpu = map.get(&(c as u32), 0)?;
            out.values[c as usize] = per_cpu.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }
}
