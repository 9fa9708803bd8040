//! Least privilege: once the programs are attached and the sockets bound,
//! the agent needs no capability (maps and ring buffer are read through file
//! descriptors it already holds), so it drops them all, for good.

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("dropping capabilities ({set}): {source}")]
    Drop {
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
}

/// What must stay: CAP_NET_ADMIN when `keep_net_admin` (a clsact qdisc we
/// added must be removed at exit, on kernels before TCX); CAP_BPF before
/// Linux 6.5, which refused every bpf() command (map reads on descriptors
/// we hold included) to a process without it when unprivileged BPF is off.
pub fn still_needed(keep_net_admin: bool) -> CapsHashSet {
    let mut keep = CapsHashSet::new();
    if keep_net_admin {
        keep.insert(Capability::CAP_NET_ADMIN);
    }
    let old = aya::util::KernelVersion::current()
        .map(|v| v < aya::util::KernelVersion::new(6, 5, 0))
        .unwrap_or(true);
    if old {
        keep.insert(Capability::CAP_BPF);
    }
    keep
}

/// Drop every capability from every set, except [`still_needed`].
pub fn drop_capabilities(keep_net_admin: bool) -> Result<CapsHashSet, PrivilegeError> {
    let keep = still_needed(keep_net_admin);
    let err = |set| move |source| PrivilegeError::Drop { set, source };
    // Bounding first (needs CAP_SETPCAP, which an unprivileged agent lacks:
    // then the ambient/inheritable/permitted drop below is what counts).
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for c in caps::read(None, CapSet::Bounding).map_err(err("bounding"))? {
            if !keep.contains(&c) {
                caps::drop(None, CapSet::Bounding, c).map_err(err("bounding"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err("ambient"))?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(err("inheritable"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(err("effective"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(err("permitted"))?;
    Ok(keep)
}
