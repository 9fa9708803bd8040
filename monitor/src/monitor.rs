//! A running monitor: attached programs, their event ring buffer and counters.
//! The agent drives it from tokio; tests drive it directly.

use std::{
    os::fd::{AsRawFd, RawFd},
    time::Instant,
};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use monitor_common::{Flow, FlowKey};

use crate::{
    config::AgentConfig,
    counters::{KernelCounters, ReadCounters},
    event::{FlowEvent, Record},
    loader::{self, Attached, LoadError},
};

pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The kernel's event ring buffer. Readable (for epoll) when events are pending.
pub struct EventReader {
    ring: RingBuf<MapData>,
    /// Ring buffer records that did not decode (counted, never fatal).
    pub decode_errors: u64,
}

impl EventReader {
    /// Hand every pending event to `f` (request samples are skipped); returns
    /// how many records were read.
    pub fn drain(&mut self, mut f: impl FnMut(FlowEvent)) -> usize {
        self.drain_records(|r| {
            if let Record::Event(ev) = r {
                f(ev)
            }
        })
    }

    /// Hand every pending record to `f`; returns how many were read.
    pub fn drain_records(&mut self, mut f: impl FnMut(Record)) -> usize {
        let mut n = 0;
        let mut errors = 0;
        while let Some(item) = self.ring.next() {
            n += 1;
            match Record::decode(&item) {
                Ok(r) => f(r),
                Err(e) => {
                    errors += 1;
                    log::warn!("{e}");
                }
            }
        }
        self.decode_errors += errors;
        n
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// Own handles on the two tables, for scanning them on another thread while
/// the event loop keeps draining the ring buffer (a scan of a million
/// entries takes about a second of syscalls).
pub struct TableScanner {
    flows: BpfHashMap<MapData, FlowKey, Flow>,
    half_open: BpfHashMap<MapData, FlowKey, Flow>,
}

/// What one scan found.
pub struct Scan {
    /// The flow table, sorted by key (looked up by binary search).
    pub flows: monitor_core::flows::FlowSnapshot,
    pub half_open_entries: u64,
}

impl TableScanner {
    /// Walk both tables (two syscalls an entry: about 2 s at a million).
    pub fn scan(&self) -> Scan {
        // Kept as summaries (56 bytes, not 96): a snapshot holds the table.
        let entries: Vec<_> = self
            .flows
            .iter()
            .filter_map(Result::ok)
            .map(|(k, f)| (k, monitor_core::flows::FlowSummary::from(&f)))
            .collect();
        Scan {
            flows: monitor_core::flows::FlowSnapshot::new(crate::clock::now_ns(), entries),
            half_open_entries: self.half_open.keys().filter_map(Result::ok).count() as u64,
        }
    }
}

pub struct Monitor {
    attached: Attached,
    events: Option<EventReader>,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<KernelLogger>,
    pub config: AgentConfig,
    pub started: Instant,
}

impl Monitor {
    /// Validate, load, attach. On error nothing stays attached.
    pub fn start(cfg: &AgentConfig) -> Result<Self, StartError> {
        Self::start_for(cfg, &loader::KernelFeatures::current()?)
    }

    /// `start` as if on a kernel with `kernel`'s features (tests: the clsact
    /// attachment of kernels before 6.6, the XDP program of those before 5.18).
    pub fn start_for(
        cfg: &AgentConfig,
        kernel: &loader::KernelFeatures,
    ) -> Result<Self, StartError> {
        cfg.validate()?;
        let mut attached = loader::attach_for(cfg, kernel)?;
        let logger = match aya_log::EbpfLogger::init(&mut attached.ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!("kernel program log unavailable: {e}");
                None
            }
        };
        let events = attached
            .ebpf
            .take_map("EVENTS")
            .ok_or(LoadError::MissingMap { map: "EVENTS" })?;
        let events = RingBuf::try_from(events).map_err(|source| LoadError::MapType {
            map: "EVENTS",
            source,
        })?;
        let counters = attached
            .ebpf
            .take_map("COUNTERS")
            .ok_or(LoadError::MissingMap { map: "COUNTERS" })?;
        let counters = PerCpuArray::try_from(counters).map_err(|source| LoadError::MapType {
            map: "COUNTERS",
            source,
        })?;
        Ok(Monitor {
            attached,
            events: Some(EventReader {
                ring: events,
                decode_errors: 0,
            }),
            counters,
            logger,
            config: cfg.clone(),
            started: Instant::now(),
        })
    }

    /// Must keep CAP_NET_ADMIN to undo its attachment at exit.
    pub fn needs_net_admin_to_detach(&self) -> bool {
        self.attached.added_qdisc()
    }

    pub fn attachments(&self) -> &[loader::Attachment] {
        &self.attached.attachments
    }

    pub fn programs(&self) -> &[loader::ProgramStats] {
        &self.attached.programs
    }

    /// Hand every pending event to `f` (while the reader was not taken).
    pub fn drain(&mut self, f: impl FnMut(FlowEvent)) -> usize {
        self.events.as_mut().map_or(0, |r| r.drain(f))
    }

    /// Hand every pending record, events and request samples, to `f`.
    pub fn drain_records(&mut self, f: impl FnMut(Record)) -> usize {
        self.events.as_mut().map_or(0, |r| r.drain_records(f))
    }

    /// Ring buffer records that did not decode (while the reader was not taken).
    pub fn decode_errors(&self) -> u64 {
        self.events.as_ref().map_or(0, |r| r.decode_errors)
    }

    /// Move the event reader out, to be polled on its own.
    pub fn take_event_reader(&mut self) -> Option<EventReader> {
        self.events.take()
    }

    /// The reader of the kernel programs' aya-log records, to be polled on
    /// its own (it forwards them to `log`).
    pub fn take_kernel_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    pub fn counters(&self) -> Result<KernelCounters, aya::maps::MapError> {
        KernelCounters::read(&self.counters)
    }

    pub fn flow_table_size(&self) -> u32 {
        self.config.flow_table_size
    }

    pub fn half_open_table_size(&self) -> u32 {
        self.config.half_open_table_size
    }

    /// Kernel memory of the flow table, as the kernel accounts it (the
    /// `memlock` line of the map's fdinfo).
    pub fn flow_table_memory_bytes(&self) -> Option<u64> {
        self.map_memory_bytes("FLOWS")
    }

    /// Kernel memory of the half-open table.
    pub fn half_open_memory_bytes(&self) -> Option<u64> {
        self.map_memory_bytes("HALF_OPEN")
    }

    fn map_memory_bytes(&self, name: &str) -> Option<u64> {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = match self.attached.ebpf.map(name)? {
            aya::maps::Map::LruHashMap(data) => data.fd().as_fd().as_raw_fd(),
            _ => return None,
        };
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The live flow table (read-only view).
    pub fn flows(&self) -> Result<BpfHashMap<&MapData, FlowKey, Flow>, LoadError> {
        self.table("FLOWS")
    }

    /// Handles on both tables that can move to another thread.
    pub fn table_scanner(&self) -> Result<TableScanner, LoadError> {
        let own = |name: &'static str| -> Result<BpfHashMap<MapData, FlowKey, Flow>, LoadError> {
            use std::os::fd::AsFd;
            let fd = match self.attached.ebpf.map(name) {
                Some(aya::maps::Map::LruHashMap(data)) => data
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| LoadError::MapType {
                        map: name,
                        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                            call: "dup",
                            io_error: e,
                        }),
                    })?,
                _ => return Err(LoadError::MissingMap { map: name }),
            };
            let data =
                MapData::from_fd(fd).map_err(|source| LoadError::MapType { map: name, source })?;
            BpfHashMap::try_from(aya::maps::Map::LruHashMap(data))
                .map_err(|source| LoadError::MapType { map: name, source })
        };
        Ok(TableScanner {
            flows: own("FLOWS")?,
            half_open: own("HALF_OPEN")?,
        })
    }

    /// The live half-open table (read-only view).
    pub fn half_open(&self) -> Result<BpfHashMap<&MapData, FlowKey, Flow>, LoadError> {
        self.table("HALF_OPEN")
    }

    fn table(&self, name: &'static str) -> Result<BpfHashMap<&MapData, FlowKey, Flow>, LoadError> {
        let map = self
            .attached
            .ebpf
            .map(name)
            .ok_or(LoadError::MissingMap { map: name })?;
        BpfHashMap::try_from(map).map_err(|source| LoadError::MapType { map: name, source })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Load(#[from] LoadError),
}
