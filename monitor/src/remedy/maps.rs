//! The remedy's kernel tables and its sweep: the path table new
//! connections are matched against, the record of connections covered at
//! establishment, and one walk of the TCP iterator over the sweep's work.

use std::{
    io::Read,
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::{
    maps::{lpm_trie::Key, HashMap as BpfHashMap, LpmTrie, MapData},
    programs::Iter,
};
use monitor_common::remedy::{
    remedy_net_data, remedy_prefix_len, v4_mapped, KeepaliveSetting, RemedyNetData, SweepTarget,
    MAX_REMEDY_PATHS, REMEDY_DONE, REMEDY_OWN_KEEPALIVE, REMEDY_PENDING, SWEEP_APPLY,
};
use monitor_core::detector::{keepalive::Keepalive, path::PathKey};

use super::{map_err, prog_err, setting, Covered, RemedyError, RemedyRuntime, SWEEP_PROGRAM};

/// A walk that takes longer than this is reported (it is never cut: the
/// kernel ends it).
const SLOW_WALK: Duration = Duration::from_secs(10);

impl RemedyRuntime {
    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, RemedyError> {
        self.ebpf.map_mut(name).ok_or(RemedyError::MissingMap(name))
    }

    /// The path table: `wanted`, at most [`MAX_REMEDY_PATHS`] of them (the
    /// rest wait; logged). Entries are recorded as they go in, so a
    /// failure leaves nothing behind that a later sync would not remove.
    pub(super) fn set_table(&mut self, wanted: &[(PathKey, Keepalive)]) -> Result<(), RemedyError> {
        let wanted = &wanted[..wanted.len().min(MAX_REMEDY_PATHS as usize)];
        let old = std::mem::take(&mut self.table);
        let mut t: LpmTrie<&mut MapData, RemedyNetData, KeepaliveSetting> =
            LpmTrie::try_from(self.map("REMEDY_PATHS")?).map_err(map_err("REMEDY_PATHS"))?;
        for k in &old {
            if !wanted.iter().any(|(w, _)| w == k) {
                // Gone already is fine.
                let _ = t.remove(&lpm_key(k));
            }
        }
        let mut table = Vec::with_capacity(wanted.len());
        let mut failed = None;
        for (i, (k, ka)) in wanted.iter().enumerate() {
            match t.insert(&lpm_key(k), setting(ka, i as u32), 0) {
                Ok(()) => table.push(*k),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // What stayed in the kernel from before is still ours to remove.
        let kept: Vec<PathKey> = old
            .iter()
            .filter(|k| !table.contains(k) && wanted.iter().any(|(w, _)| w == *k))
            .copied()
            .collect();
        table.extend(kept);
        self.table = table;
        match failed {
            Some(e) => Err(map_err("REMEDY_PATHS")(e)),
            None => Ok(()),
        }
    }

    /// Move the kernel's record of connections covered at establishment
    /// into ours.
    pub(super) fn drain_new(&mut self) -> Result<(), RemedyError> {
        let mut m: BpfHashMap<&mut MapData, u64, KeepaliveSetting> =
            BpfHashMap::try_from(self.map("NEW_COVERED")?).map_err(map_err("NEW_COVERED"))?;
        let entries: Vec<(u64, KeepaliveSetting)> = m.iter().filter_map(Result::ok).collect();
        for (cookie, _) in &entries {
            let _ = m.remove(cookie);
        }
        for (cookie, s) in entries {
            // The path is set from the socket's addresses at the next
            // listing; until then the table's, or none known.
            let path = self.table.get(s.path as usize).copied().unwrap_or_else(|| {
                PathKey::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0, 0, 0)
            });
            self.covered.insert(cookie, Covered { path, setting: s });
        }
        Ok(())
    }

    /// One walk of this namespace's TCP sockets doing `targets`; records
    /// what became of each. Returns the failures.
    pub(super) fn sweep(
        &mut self,
        targets: &[(u64, (PathKey, SweepTarget))],
    ) -> Result<usize, RemedyError> {
        if targets.is_empty() {
            return Ok(0);
        }
        let written = self.write_targets(targets);
        let walked = written.and_then(|()| self.walk());
        // Read back and cleared whatever happened: no stale work is left
        // for a later walk.
        let results: Vec<i32> = {
            let mut m: BpfHashMap<&mut MapData, u64, SweepTarget> =
                BpfHashMap::try_from(self.map("SWEEP_TARGETS")?)
                    .map_err(map_err("SWEEP_TARGETS"))?;
            targets
                .iter()
                .map(|(cookie, _)| {
                    let done = m.get(cookie, 0).map_or(REMEDY_PENDING, |d| d.result);
                    let _ = m.remove(cookie);
                    done
                })
                .collect()
        };
        if walked.is_err() {
            return walked.map(|()| 0);
        }
        let mut failed = 0;
        for ((cookie, (path, t)), done) in targets.iter().zip(results) {
            match done {
                REMEDY_DONE if t.flags & SWEEP_APPLY != 0 => {
                    let c = Covered {
                        path: *path,
                        setting: t.setting,
                    };
                    self.covered.insert(*cookie, c);
                }
                REMEDY_DONE => {
                    self.covered.remove(cookie);
                }
                REMEDY_OWN_KEEPALIVE => {
                    // The application's keepalive now: not ours to undo.
                    self.covered.remove(cookie);
                    self.left_alone.insert(*cookie);
                }
                // Closed before the walk reached it.
                REMEDY_PENDING => {}
                _ => {
                    failed += 1;
                    self.left_alone.insert(*cookie);
                }
            }
        }
        Ok(failed)
    }

    fn write_targets(
        &mut self,
        targets: &[(u64, (PathKey, SweepTarget))],
    ) -> Result<(), RemedyError> {
        let mut m: BpfHashMap<&mut MapData, u64, SweepTarget> =
            BpfHashMap::try_from(self.map("SWEEP_TARGETS")?).map_err(map_err("SWEEP_TARGETS"))?;
        for (cookie, (_, t)) in targets {
            m.insert(cookie, t, 0).map_err(map_err("SWEEP_TARGETS"))?;
        }
        Ok(())
    }

    /// Run the iterator once over every TCP socket of this namespace.
    fn walk(&mut self) -> Result<(), RemedyError> {
        let sweep: &mut Iter = self
            .ebpf
            .program_mut(SWEEP_PROGRAM)
            .ok_or(RemedyError::MissingProgram(SWEEP_PROGRAM))?
            .try_into()
            .map_err(prog_err(SWEEP_PROGRAM))?;
        let id = sweep.attach().map_err(prog_err(SWEEP_PROGRAM))?;
        let link = sweep.take_link(id).map_err(prog_err(SWEEP_PROGRAM))?;
        let mut f = link
            .into_file()
            .map_err(|e| RemedyError::SweepLink(Box::new(e)))?;
        // The program writes nothing: a read returns 0 at the walk's end.
        // EAGAIN: the kernel paused a long walk (a million sockets); go on.
        let started = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => return Err(RemedyError::Sweep(e)),
            }
        }
        if started.elapsed() > SLOW_WALK {
            log::warn!(
                "remedy: a walk of this host's TCP sockets took {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }
}

/// The path table's key for `k`'s client prefix behind its port.
fn lpm_key(k: &PathKey) -> Key<RemedyNetData> {
    let addr = if k.v4 {
        v4_mapped([k.net[0], k.net[1], k.net[2], k.net[3]])
    } else {
        k.net
    };
    Key::new(
        remedy_prefix_len(k.v4, k.prefix),
        remedy_net_data(k.port, &addr),
    )
}
