//! One scenario's analysis against its truth: paths found with their
//! manner, estimates, every ending's class, kills on healthy paths,
//! heartbeats. Each miss is kept with what was expected and what was said.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use crate::{
    analyze::Analysis,
    detector::{report::PathReport, Ending, Estimate, Verdict},
};

use super::{
    generate::server_addr,
    truth::{ConnTruth, PathTruth, Truth},
    wire::{S, SERVER_PORT},
};

/// The figures' parts: how many right of how many.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ratio {
    pub right: u64,
    pub total: u64,
}

impl Ratio {
    pub fn add(&mut self, right: bool) {
        self.total += 1;
        self.right += u64::from(right);
    }

    pub fn merge(&mut self, o: Ratio) {
        self.right += o.right;
        self.total += o.total;
    }

    /// Percent right (100 when there was nothing to get right).
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            100.0 * self.right as f64 / self.total as f64
        }
    }
}

/// Which figure a miss counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Figure {
    PathFound,
    Estimate,
    Ending,
    HealthyKill,
    Heartbeat,
}

impl Figure {
    pub fn label(self) -> &'static str {
        match self {
            Figure::PathFound => "killing path found with its manner",
            Figure::Estimate => "estimate right",
            Figure::Ending => "ending in the right class",
            Figure::HealthyKill => "premature kill on a healthy path",
            Figure::Heartbeat => "heartbeat within 2%",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Miss {
    pub seed: u64,
    pub figure: Figure,
    /// The path's key and knobs.
    pub path: String,
    pub knobs: String,
    pub expected: String,
    pub got: String,
}

impl Miss {
    fn on(seed: u64, p: &PathTruth, figure: Figure, expected: String, got: String) -> Miss {
        Miss {
            seed,
            figure,
            path: p.key.clone(),
            knobs: p.knobs.clone(),
            expected,
            got,
        }
    }
}

/// Truth class (rows) x verdict class (columns; None: no verdict).
pub type Confusion = BTreeMap<(Ending, Option<Ending>), u64>;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Score {
    pub paths_found: Ratio,
    pub estimates: Ratio,
    pub endings: Ratio,
    pub confusion: Confusion,
    pub healthy_paths: u64,
    pub healthy_verdicts: u64,
    pub healthy_premature: u64,
    /// Black holes whose device never came back in the capture: not
    /// counted among the endings (a device gone dark looks the same).
    pub undecidable: u64,
    /// Devices on an address of their own.
    pub heartbeats: Ratio,
    /// Devices behind a shared address (NAT, proxy): reported, not a target.
    pub heartbeats_shared: Ratio,
    pub misses: Vec<Miss>,
}

/// Score `a` against `truth`; `epoch_ns`: the capture time of the scenario's zero.
pub fn score(seed: u64, truth: &Truth, a: &Analysis, epoch_ns: u64, slack_s: f64) -> Score {
    let mut s = Score::default();
    let reports: HashMap<&str, &PathReport> = a
        .report
        .killing_paths
        .iter()
        .chain(&a.report.quiet_paths)
        .map(|r| (r.path.as_str(), r))
        .collect();
    for p in &truth.paths {
        let r = reports.get(p.key.as_str()).copied();
        let miss = |figure, expected, got| Miss::on(seed, p, figure, expected, got);
        if p.killing() {
            s.killing_path(p, r, &a.report.killing_paths, miss);
        } else {
            s.healthy_path(p, &a.verdicts, miss);
        }
    }
    let by_client = verdicts_by_client(&a.verdicts);
    for c in &truth.conns {
        let p = &truth.paths[c.path];
        let v = matching_verdict(&by_client, c, epoch_ns, slack_s);
        s.conn(seed, p, c, v);
    }
    s
}

fn verdicts_by_client(vs: &[Verdict]) -> HashMap<SocketAddr, Vec<&Verdict>> {
    let mut m: HashMap<SocketAddr, Vec<&Verdict>> = HashMap::new();
    for v in vs {
        m.entry(v.client).or_default().push(v);
    }
    m
}

/// The verdict on this connection: same client address and port, same
/// server, between its opening and its end plus the slack.
fn matching_verdict<'a>(
    m: &HashMap<SocketAddr, Vec<&'a Verdict>>,
    c: &ConnTruth,
    epoch_ns: u64,
    slack_s: f64,
) -> Option<&'a Verdict> {
    let server = SocketAddr::new(server_addr(c.client.is_ipv6()), SERVER_PORT);
    let from = epoch_ns + c.opened_ns;
    let to = epoch_ns + c.ended_ns + (slack_s * S as f64) as u64;
    m.get(&c.client)?
        .iter()
        .copied()
        .filter(|v| v.server == server && v.at_ns >= from && (c.class.is_none() || v.at_ns <= to))
        .min_by_key(|v| v.at_ns)
}

fn describe_estimate(e: Option<&Estimate>) -> String {
    match e {
        None => "no estimate".into(),
        Some(Estimate::Point { seconds, .. }) => format!("point {seconds:.1}s"),
        Some(Estimate::Bracket {
            low_seconds,
            high_seconds,
            ..
        }) => format!("bracket ({low_seconds:.1}, {high_seconds:.1}]"),
        Some(Estimate::Sounded { seconds, .. }) => format!("sounded {seconds:.1}s"),
    }
}

fn expected_estimate(p: &PathTruth) -> String {
    let t = p.timeout_s.unwrap_or(0.0);
    if p.manner.is_some_and(|m| m.kills_at_expiry()) {
        format!("point {t:.0}s ±1")
    } else {
        format!(
            "bracket ({:.1}, {:.1}] holding {t:.0}s",
            p.longest_survived_s,
            p.shortest_killed_s.unwrap_or(0.0)
        )
    }
}

/// The rule: a point within 1 s of T for boxes acting at expiry; else a
/// bracket holding T whose ends are the tightest the traffic allowed (±0.5 s).
fn estimate_right(p: &PathTruth, e: Option<&Estimate>) -> bool {
    let Some(t) = p.timeout_s else { return false };
    let at_expiry = p.manner.is_some_and(|m| m.kills_at_expiry());
    match e {
        Some(Estimate::Point { seconds, .. }) => at_expiry && (seconds - t).abs() <= 1.0,
        // Probes closed the bracket: within a second, like a point.
        Some(Estimate::Sounded { seconds, .. }) => !at_expiry && (seconds - t).abs() <= 1.0,
        Some(Estimate::Bracket {
            low_seconds,
            high_seconds,
            ..
        }) => {
            let killed = p.shortest_killed_s.unwrap_or(f64::NAN);
            // The box survives a silence of exactly T (it kills beyond):
            // T may sit on either end, to the millisecond.
            !at_expiry
                && *low_seconds <= t + 1e-3
                && t <= *high_seconds + 1e-3
                && (low_seconds - p.longest_survived_s).abs() <= 0.5
                && (high_seconds - killed).abs() <= 0.5
        }
        None => false,
    }
}

impl Score {
    fn killing_path(
        &mut self,
        p: &PathTruth,
        r: Option<&PathReport>,
        killing: &[PathReport],
        miss: impl Fn(Figure, String, String) -> Miss,
    ) {
        let listed = killing.iter().find(|k| k.path == p.key);
        let found = listed.is_some_and(|k| k.how == p.manner);
        self.paths_found.add(found);
        if !found {
            let got = match (listed, r) {
                (Some(k), _) => format!("killing, how {:?}", k.how),
                (None, Some(q)) => format!("quiet; endings {:?}", q.endings),
                (None, None) => "path not reported".into(),
            };
            let expected = format!("killing, how {:?}", p.manner);
            self.misses.push(miss(Figure::PathFound, expected, got));
        }
        let e = r.and_then(|r| r.estimate.as_ref());
        let right = estimate_right(p, e);
        self.estimates.add(right);
        if !right {
            let got = format!(
                "{} (longest survived {:.1}s)",
                describe_estimate(e),
                r.map_or(0.0, |r| r.longest_survived_seconds)
            );
            self.misses
                .push(miss(Figure::Estimate, expected_estimate(p), got));
        }
    }

    fn healthy_path(
        &mut self,
        p: &PathTruth,
        verdicts: &[Verdict],
        miss: impl Fn(Figure, String, String) -> Miss,
    ) {
        self.healthy_paths += 1;
        for v in verdicts.iter().filter(|v| v.path == p.key) {
            self.healthy_verdicts += 1;
            if v.premature {
                self.healthy_premature += 1;
                let got = format!(
                    "{} {} after {:.1}s (heartbeat {:?})",
                    v.client, v.ending, v.evidence.silence_seconds, v.heartbeat_seconds
                );
                self.misses
                    .push(miss(Figure::HealthyKill, "no premature kill".into(), got));
            }
        }
    }

    fn conn(&mut self, seed: u64, p: &PathTruth, c: &ConnTruth, v: Option<&Verdict>) {
        let miss = |figure, expected, got| Miss::on(seed, p, figure, expected, got);
        if c.class.is_some() && !c.evident {
            self.undecidable += 1;
        }
        if let Some(class) = c.class.filter(|_| c.evident) {
            let said = v.map(|v| v.ending);
            *self.confusion.entry((class, said)).or_default() += 1;
            let right = said == Some(class) || (class == Ending::Vanished && said.is_none());
            self.endings.add(right);
            if !right {
                let expected = format!("{} {class} (silence {:?})", c.client, c.kill_silence_s);
                let got = v.map_or("no verdict".into(), |v| {
                    format!("{} after {:.1}s", v.ending, v.evidence.silence_seconds)
                });
                self.misses.push(miss(Figure::Ending, expected, got));
            }
        }
        let Some(v) = v.filter(|_| c.heartbeat_shown) else {
            return;
        };
        let right = v
            .heartbeat_seconds
            .is_some_and(|h| (h - c.heartbeat_s).abs() <= 0.02 * c.heartbeat_s);
        if p.shared_address {
            self.heartbeats_shared.add(right);
            return;
        }
        self.heartbeats.add(right);
        if !right {
            let expected = format!("{} heartbeat {:.0}s", c.client, c.heartbeat_s);
            let got = format!("{:?} ({})", v.heartbeat_seconds, v.ending);
            self.misses.push(miss(Figure::Heartbeat, expected, got));
        }
    }

    pub fn merge(&mut self, o: Score) {
        self.paths_found.merge(o.paths_found);
        self.estimates.merge(o.estimates);
        self.endings.merge(o.endings);
        for (k, n) in o.confusion {
            *self.confusion.entry(k).or_default() += n;
        }
        self.healthy_paths += o.healthy_paths;
        self.healthy_verdicts += o.healthy_verdicts;
        self.healthy_premature += o.healthy_premature;
        self.undecidable += o.undecidable;
        self.heartbeats.merge(o.heartbeats);
        self.heartbeats_shared.merge(o.heartbeats_shared);
        self.misses.extend(o.misses);
    }
}
