//! One scenario, one client, in words: its packets as generated, its
//! connections' truth, the verdicts on it, and the paths' truth. For
//! reading a miss of ACCURACY.md (`cargo xtask scenarios --seed N --explain ADDR:PORT`).

use std::{fmt::Write, path::Path};

use super::{generate, run, Knobs, ScenarioError, EPOCH_NS, GAP_THRESHOLD};

/// The story of `client` (as the server sees it, `addr:port`) in scenario `seed`.
pub fn explain(seed: u64, client: &str, dir: &Path) -> Result<String, ScenarioError> {
    let k = Knobs::draw(seed);
    let g = generate::generate(&k, GAP_THRESHOLD.as_secs_f64());
    let mut s = String::new();
    for p in g.packets.iter().filter(|p| p.client.to_string() == client) {
        let _ = writeln!(
            s,
            "{:>12.3} {:?} flags {:#04x} len {} ttl {}",
            p.at as f64 / 1e9,
            p.origin,
            p.flags,
            p.payload,
            p.ttl
        );
    }
    let o = run(&k, dir)?;
    for c in o
        .truth
        .conns
        .iter()
        .filter(|c| c.client.to_string() == client)
    {
        let _ = writeln!(s, "truth: {c:?}");
    }
    for v in o
        .analysis
        .verdicts
        .iter()
        .filter(|v| v.client.to_string() == client)
    {
        let at = v.at_ns.saturating_sub(EPOCH_NS) as f64 / 1e9;
        let _ = writeln!(s, "verdict at {at:.3}: {v} {:?}", v.evidence);
    }
    for p in &o.truth.paths {
        let _ = writeln!(s, "path: {p:?}");
    }
    Ok(s)
}
