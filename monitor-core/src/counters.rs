//! The kernel's per-CPU counters, summed (the agent reads them from the map).

use monitor_common::Counter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub values: [u64; Counter::COUNT as usize],
}

impl KernelCounters {
    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize]
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
