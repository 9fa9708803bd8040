//! Scenario generator with ground truth, at real time scale: populations
//! of Direct Push devices through middlebox models, synthesised as the
//! server's packet capture in virtual time (hours in a fraction of a
//! second), run through the same pipeline as `monitor analyze`, and scored
//! against what the generator logged while generating.
//!
//! [`Knobs::draw`] draws a scenario from a seed; [`run`] generates, writes,
//! analyses and scores it; [`Summary`] adds scenarios up and writes the
//! accuracy table.

mod device;
mod explain;
mod generate;
mod knobs;
mod score;
mod table;
mod truth;
mod wire;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

pub use explain::explain;
pub use generate::{manner_ending, server_addr, Generated};
pub use knobs::{
    Departure, DeviceKnobs, IpIdPattern, Knobs, Manner, Middlebox, PathKnobs, Place, Profile,
};
pub use score::{Confusion, Figure, Miss, Ratio, Score};
pub use table::Summary;
pub use truth::{ConnTruth, PathTruth, Truth};

use crate::{
    analyze::{
        analyze_observed,
        synthetic::{Format, Sink},
        Analysis, AnalyzeOptions, Limits, Observer,
    },
    detector::DetectorConfig,
};
use wire::S;

/// The capture's zero: a plausible wall-clock time.
pub const EPOCH_NS: u64 = 1_700_000_000 * S;
/// The kernel's gap threshold (and the detector's min_silence).
pub const GAP_THRESHOLD: Duration = Duration::from_secs(5);
const SNAPLEN: u32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("writing the capture of scenario {seed} to {path}: {message}")]
    Write {
        seed: u64,
        path: PathBuf,
        message: String,
    },
    #[error("analysing the capture of scenario {seed}: {source}")]
    Analyze {
        seed: u64,
        #[source]
        source: crate::analyze::AnalyzeError,
    },
}

/// The detector's settings for a scenario at `scale` (like the lab's
/// `[detector]` for its scaled time): heartbeat bounds, the 3033/1040 window
/// threshold, the black-hole delay and the churn window shrink with time.
pub fn detector_config(scale: f64) -> DetectorConfig {
    let d = DetectorConfig::default();
    if scale >= 1.0 {
        return d;
    }
    let scaled = |x: Duration, floor: f64| {
        Duration::from_secs_f64((x.as_secs_f64() * scale).max(floor).round())
    };
    DetectorConfig {
        min_heartbeat: scaled(d.min_heartbeat, 1.0),
        max_heartbeat: scaled(d.max_heartbeat, 1.0),
        hbi_alert_threshold: scaled(d.hbi_alert_threshold, 1.0),
        black_hole_after: scaled(d.black_hole_after, 30.0),
        churn_window: scaled(d.churn_window, 60.0),
        ..d
    }
}

/// What `monitor analyze --port 443` runs with.
pub fn analyze_options(scale: f64) -> AnalyzeOptions {
    AnalyzeOptions {
        ports: vec![wire::SERVER_PORT],
        plaintext_ports: vec![],
        servers: vec![],
        upstream_ports: vec![],
        local_addresses: vec![],
        from: None,
        to: None,
        gap_threshold: GAP_THRESHOLD,
        detector: detector_config(scale),
    }
}

/// One scenario run: its knobs, truth, analysis and score.
pub struct Outcome {
    pub knobs: Knobs,
    pub truth: Truth,
    pub analysis: Analysis,
    pub score: Score,
    pub packets: usize,
}

/// Write `g`'s packets as a pcap at `path`; `mirrored`: each packet twice,
/// 1 us apart, as a switch mirroring both ports of a conversation shows it.
pub(crate) fn write_capture(
    seed: u64,
    g: &Generated,
    path: &Path,
    mirrored: bool,
) -> Result<(), ScenarioError> {
    let err = |e: &dyn std::fmt::Display| ScenarioError::Write {
        seed,
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut sink = Sink::create(path, Format::Pcap, SNAPLEN).map_err(|e| err(&e))?;
    let mut frame = Vec::with_capacity(1600);
    for p in &g.packets {
        let seg = p.segment(server_addr(p.client.is_ipv6()));
        crate::analyze::synthetic::build_segment(&mut frame, &seg);
        sink.packet(EPOCH_NS + p.at, &frame).map_err(|e| err(&*e))?;
        if mirrored {
            sink.packet(EPOCH_NS + p.at + 1_000, &frame)
                .map_err(|e| err(&*e))?;
        }
    }
    sink.finish().map_err(|e| err(&*e))
}

/// Generate the scenario of `knobs`, write its capture in `dir`, analyse
/// it as `monitor analyze` would, and score it (the capture is removed).
pub fn run(knobs: &Knobs, dir: &Path) -> Result<Outcome, ScenarioError> {
    run_observed(knobs, dir, None)
}

/// As [`run`], showing `observer` the pipeline's outputs as capture time
/// passes (what the agent's metrics would see).
pub fn run_observed(
    knobs: &Knobs,
    dir: &Path,
    observer: Option<&mut dyn Observer>,
) -> Result<Outcome, ScenarioError> {
    let seed = knobs.seed;
    let g = generate::generate(knobs, GAP_THRESHOLD.as_secs_f64());
    let path = dir.join(format!("scenario-{seed}.pcap"));
    write_capture(seed, &g, &path, false)?;
    let opts = analyze_options(knobs.scale);
    let analysis = analyze_observed(&path, &opts, Limits::default(), observer);
    let _ = std::fs::remove_file(&path);
    let analysis = analysis.map_err(|source| ScenarioError::Analyze { seed, source })?;
    // A black hole is called black_hole_after past the first unanswered
    // retransmission, at the capture's next packet (offline, time passes
    // only with packets): on a quiet capture, long after.
    let slack = 3600.0;
    let score = score::score(seed, &g.truth, &analysis, EPOCH_NS, slack);
    Ok(Outcome {
        knobs: knobs.clone(),
        packets: g.packets.len(),
        truth: g.truth,
        analysis,
        score,
    })
}

/// Draw the scenario of `seed` and [`run`] it.
pub fn run_seed(seed: u64, dir: &Path) -> Result<Outcome, ScenarioError> {
    run(&Knobs::draw(seed), dir)
}

#[cfg(test)]
mod tests;
