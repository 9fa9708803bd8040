//! Pinning in bpffs, so that a restart (kill -9 included) loses nothing: the
//! maps (flow tables, counters, the event ring buffer) and the attachment
//! links live on in `pin_path` while no agent runs; the programs keep
//! tracking, and events queue in the ring buffer. The next agent reuses the
//! maps and swaps its programs into the existing links (atomically, with
//! `bpf_link_update`: no moment without a program, never two at once).
//!
//! Layout of `pin_path`: one file per map (`FLOWS`, `HALF_OPEN`, `EVENTS`,
//! `COUNTERS`) and per link (`link-<hook>-<interface>`).

use std::path::{Path, PathBuf};

use monitor_common::{Flow, FlowKey};

/// Where the shipped configurations pin.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/activesync-monitor";

/// Maps that outlive the agent.
pub const PINNED_MAPS: [&str; 4] = ["FLOWS", "HALF_OPEN", "EVENTS", "COUNTERS"];

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("pin path {path}: {source} (is bpffs mounted at /sys/fs/bpf?)")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing the pin {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where one hook's link on one interface is pinned.
pub fn link_path(dir: &Path, hook: &str, iface: &str) -> PathBuf {
    dir.join(format!("link-{hook}-{iface}"))
}

/// The size each pinned map must have for this configuration (key, value,
/// max_entries); a pin that differs belongs to another version or setting.
fn expected(name: &str, flow_table_size: u32, half_open_size: u32) -> Option<(u32, u32, u32)> {
    let key = std::mem::size_of::<FlowKey>() as u32;
    let flow = std::mem::size_of::<Flow>() as u32;
    match name {
        "FLOWS" => Some((key, flow, flow_table_size)),
        "HALF_OPEN" => Some((key, flow, half_open_size)),
        "EVENTS" => Some((0, 0, monitor_common::EVENT_RING_BYTES)),
        "COUNTERS" => Some((4, 8, monitor_common::Counter::COUNT)),
        _ => None,
    }
}

/// Pinned maps in `dir` that this configuration cannot reuse, with why.
pub fn incompatible(dir: &Path, flow_table_size: u32, half_open_size: u32) -> Vec<String> {
    PINNED_MAPS
        .iter()
        .filter_map(|name| {
            let p = dir.join(name);
            if !p.exists() {
                return None;
            }
            let want = expected(name, flow_table_size, half_open_size)?;
            match aya::maps::MapInfo::from_pin(&p) {
                Ok(i) => {
                    let got = (i.key_size(), i.value_size(), i.max_entries());
                    (got != want)
                        .then(|| format!("{name}: pinned {got:?}, this agent needs {want:?}"))
                }
                Err(e) => Some(format!("{name}: {e}")),
            }
        })
        .collect()
}

/// Remove every pin in `dir`, then `dir`. Unpinning a link detaches its
/// program once no process holds it; unpinning a map frees it with the last
/// user. Returns what was removed.
pub fn remove_all(dir: &Path) -> Result<Vec<String>, PinsError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(source) => {
            return Err(PinsError::Dir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    for e in entries.flatten() {
        let p = e.path();
        std::fs::remove_file(&p).map_err(|source| PinsError::Remove {
            path: p.clone(),
            source,
        })?;
        removed.push(e.file_name().to_string_lossy().into_owned());
    }
    std::fs::remove_dir(dir).map_err(|source| PinsError::Remove {
        path: dir.to_path_buf(),
        source,
    })?;
    removed.sort();
    Ok(removed)
}

/// Create `dir` (bpffs supports directories).
pub fn ensure_dir(dir: &Path) -> Result<(), PinsError> {
    std::fs::create_dir_all(dir).map_err(|source| PinsError::Dir {
        path: dir.to_path_buf(),
        source,
    })
}
