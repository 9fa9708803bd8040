//! The kernel's per-CPU counters, summed at read time.

use std::borrow::Borrow;

use aya::maps::{MapData, PerCpuArray};
use monitor_common::Counter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub values: [u64; Counter::COUNT as usize],
}

impl KernelCounters {
    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize]
    }

    /// Sum every CPU's slot of every counter. A counter that cannot be read
    /// reads as zero and is reported in the error.
    pub fn read<T: Borrow<MapData>>(
        map: &PerCpuArray<T, u64>,
    ) -> Result<Self, aya::maps::MapError> {
        let mut out = KernelCounters::default();
        for c in Counter::ALL {
            let per_cpu = map.get(&(c as u32), 0)?;
            out.values[c as usize] = per_cpu.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(out)
    }
}

impl std::fmt::Display for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for c in Counter::ALL {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{}={}", c.name(), self.get(c))?;
        }
        Ok(())
    }
}
