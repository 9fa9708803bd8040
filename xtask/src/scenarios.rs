//! `cargo xtask scenarios`: generated scenarios with ground truth, scored,
//! the accuracy table written (ACCURACY.md). No root, no kernel: the
//! captures go through the same pipeline as `monitor analyze`.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result};
pub use monitor_core::scenario::{self, Summary};

/// A directory removed with what is in it when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Print one client's story in scenario `seed` (see [`scenario::explain`]).
pub fn explain(seed: u64, client: &str) -> Result<()> {
    let dir =
        TempDir(std::env::temp_dir().join(format!("scenario-explain-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {:?}", dir.0))?;
    print!("{}", scenario::explain(seed, client, &dir.0)?);
    Ok(())
}

/// Run `count` scenarios from `seed` (seeds seed, seed+1, ...), each on
/// one of `threads` workers.
pub fn run_range(seed: u64, count: u64, threads: usize) -> Result<Summary> {
    let dir = TempDir(std::env::temp_dir().join(format!("scenarios-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {:?}", dir.0))?;
    let threads = threads.clamp(1, 64) as u64;
    let results: Vec<Result<Summary>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|w| {
                let d = dir.0.clone();
                s.spawn(move || worker(&d, seed, count, w, threads))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a scenario worker panicked")))
            })
            .collect()
    });
    let mut total = Summary::default();
    for r in results {
        total.merge(r?);
    }
    Ok(total)
}

fn worker(dir: &Path, seed: u64, count: u64, w: u64, threads: u64) -> Result<Summary> {
    let mut s = Summary::default();
    for i in (w..count).step_by(threads as usize) {
        let o = scenario::run_seed(seed + i, dir)?;
        s.add(o);
    }
    Ok(s)
}

/// The command: run, print the figures, write the table to `out`.
pub fn run(seed: u64, count: u64, out: Option<&Path>, all_misses: bool) -> Result<()> {
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut summary = run_range(seed, count, threads)?;
    summary.sort_misses();
    let wall = started.elapsed().as_secs_f64();
    let command = format!("cargo xtask scenarios --seed {seed} --count {count}");
    let md = summary.markdown(&command, seed, wall, all_misses);
    for (name, r, target, met) in summary.figures() {
        println!(
            "{name}: {}/{} = {:.2}% (target {target}%){}",
            r.right,
            r.total,
            r.percent(),
            if met { "" } else { "  MISSED" }
        );
    }
    println!(
        "{} scenarios, {} packets, {wall:.1} s",
        summary.scenarios, summary.packets
    );
    if let Some(p) = out {
        std::fs::write(p, md).with_context(|| format!("writing the accuracy table {p:?}"))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}
