//! Scenarios added up, and the accuracy table in Markdown.

use std::{collections::BTreeMap, fmt::Write};

use crate::detector::Ending;

use super::{
    knobs::{Departure, Knobs},
    score::{Figure, Ratio, Score},
    Outcome,
};

/// Misses listed per figure in the table (all are counted).
pub const MISSES_LISTED: usize = 150;

/// How the figures are counted, for the reader of the table.
const RULES: &str = "## How it is counted\n\n\
- Each scenario is drawn from its seed (`Knobs::draw`): 2-5 paths, each its own client prefix, 3-8 devices each, 3-6 h of virtual traffic (30% of scenarios scaled to 1/10 with the detector's settings scaled alike). The generator logs the truth while it generates; the capture goes through `analyze_within` as `monitor analyze --port 443` would.\n\
- *Killing path*: a path whose box truly killed at least one connection; found when it is in `killing_paths` with `how` = the box's manner (in series, the shorter timeout's).\n\
- *Estimate right*: boxes acting at expiry (reset at expiry, proxy): `Point` within 1 s of T; silent forgetting: a `Bracket` holding T whose ends are within 0.5 s of the longest silence the client truly survived (heard again on the same connection) and the shortest truly killed.\n\
- *Endings*: every connection that ended in the capture, matched to the verdict with the same client address and port, same server, from its opening on. A device gone dark whose flow gets no verdict counts as `vanished` (the replay never drops an open flow: no table pressure).\n\
- *Healthy path*: no box, or a box whose timeout no silence reached; any `premature` verdict there is a miss.\n\
- *Heartbeat*: per matched verdict, its `heartbeat_seconds` against the heartbeat the device's outstanding Ping asked for, counted only where the traffic had shown that value (answered in full, no mail, before). Reported; not one of the issue's targets.\n\
- Devices leaving with a FIN do so right after an answer (a FIN mid-Ping is what a client-side proxy's timeout looks like).\n\
- A listed miss's story, packet by packet with its truth and verdicts: `cargo xtask scenarios --seed N --explain ADDR:PORT`.\n\n";

/// Many scenarios' figures and knobs, added up.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub scenarios: u64,
    pub packets: u64,
    pub virtual_seconds: f64,
    pub score: Score,
    /// Knob -> how many paths (or scenarios, devices) had it.
    pub mix: BTreeMap<String, u64>,
}

fn bump(m: &mut BTreeMap<String, u64>, k: impl Into<String>) {
    *m.entry(k.into()).or_default() += 1;
}

fn count_knobs(m: &mut BTreeMap<String, u64>, k: &Knobs) {
    bump(m, format!("scenario: scale {}", k.scale));
    bump(m, format!("scenario: mail {}/h", k.mail_per_hour));
    for p in &k.paths {
        match p.boxes.as_slice() {
            [] => bump(m, "path: no middlebox"),
            [b] => bump(m, format!("path: {}", b.manner.label())),
            [b, ..] => bump(
                m,
                format!("path: two in series, shorter {}", b.manner.label()),
            ),
        }
        for (on, name) in [(p.nat, "NAT"), (p.v6, "IPv6"), (p.loss > 0.0, "loss")] {
            if on {
                bump(m, format!("path: {name}"));
            }
        }
        for d in &p.devices {
            bump(m, format!("device: {}", d.profile.label()));
            match d.departure {
                Departure::Fin(_) => bump(m, "device: leaves with a FIN"),
                Departure::Silent(_) => bump(m, "device: goes dark"),
                Departure::Stays => {}
            }
        }
    }
}

impl Summary {
    pub fn add(&mut self, o: Outcome) {
        self.scenarios += 1;
        self.packets += o.packets as u64;
        self.virtual_seconds += o.knobs.duration_s;
        count_knobs(&mut self.mix, &o.knobs);
        self.score.merge(o.score);
    }

    /// Another summary's scenarios added to this one's.
    pub fn merge(&mut self, o: Summary) {
        self.scenarios += o.scenarios;
        self.packets += o.packets;
        self.virtual_seconds += o.virtual_seconds;
        for (k, n) in o.mix {
            *self.mix.entry(k).or_default() += n;
        }
        self.score.merge(o.score);
    }

    /// Misses in seed order (workers finish in any order).
    pub fn sort_misses(&mut self) {
        self.score.misses.sort_by(|a, b| {
            a.figure
                .cmp(&b.figure)
                .then(a.seed.cmp(&b.seed))
                .then(a.path.cmp(&b.path))
        });
    }

    /// The figures against the targets: (name, ratio, target %, met).
    pub fn figures(&self) -> Vec<(&'static str, Ratio, f64, bool)> {
        let s = &self.score;
        let healthy = Ratio {
            right: s.healthy_verdicts - s.healthy_premature,
            total: s.healthy_verdicts,
        };
        vec![
            (
                "killing paths found with the right manner",
                s.paths_found,
                99.0,
                s.paths_found.percent() >= 99.0,
            ),
            (
                "estimates right",
                s.estimates,
                98.0,
                s.estimates.percent() >= 98.0,
            ),
            (
                "endings in the right class",
                s.endings,
                98.0,
                s.endings.percent() >= 98.0,
            ),
            (
                "verdicts on healthy paths not premature kills",
                healthy,
                100.0,
                s.healthy_premature == 0,
            ),
            (
                "heartbeats within 2%, devices on their own address (per verdict, where shown)",
                s.heartbeats,
                98.0,
                s.heartbeats.percent() >= 98.0,
            ),
        ]
    }

    /// The accuracy table: `command` and `seed` say how to get it again.
    pub fn markdown(
        &self,
        command: &str,
        first_seed: u64,
        wall_seconds: f64,
        all_misses: bool,
    ) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# Detection accuracy over generated scenarios\n");
        let _ = writeln!(
            o,
            "`{command}`: {} scenarios (seeds {first_seed}..{}), {} packets, {:.0} hours of virtual traffic, analysed in {wall_seconds:.0} s.\n",
            self.scenarios,
            first_seed + self.scenarios.saturating_sub(1),
            self.packets,
            self.virtual_seconds / 3600.0
        );
        self.figures_table(&mut o);
        o.push_str(RULES);
        self.mix_table(&mut o);
        self.confusion_table(&mut o);
        self.misses_list(
            &mut o,
            if all_misses {
                usize::MAX
            } else {
                MISSES_LISTED
            },
        );
        o
    }

    fn figures_table(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "| figure | right / of | % | target | met |\n|---|---|---|---|---|"
        );
        for (name, r, target, met) in self.figures() {
            let _ = writeln!(
                o,
                "| {name} | {} / {} | {:.2} | {target} | {} |",
                r.right,
                r.total,
                r.percent(),
                if met { "yes" } else { "**no**" }
            );
        }
        let s = &self.score;
        let _ = writeln!(
            o,
            "\nHealthy paths (no box, or a box whose timeout no silence reached): {}; premature-kill verdicts on them: {}. Black holes whose device never came back before the capture ended (from the server, a device gone dark; not counted among the endings, nor in the paths' kills): {}. Heartbeats of devices behind a shared address (NAT, full proxy: from the server one client whose devices' heartbeats mix; reported, no target): {} / {} = {:.2}% within 2%.\n",
            s.healthy_paths,
            s.healthy_premature,
            s.undecidable,
            s.heartbeats_shared.right,
            s.heartbeats_shared.total,
            s.heartbeats_shared.percent()
        );
    }

    fn mix_table(&self, o: &mut String) {
        let _ = writeln!(o, "## Knobs drawn\n\n| knob | count |\n|---|---|");
        for (k, n) in &self.mix {
            let _ = writeln!(o, "| {k} | {n} |");
        }
        o.push('\n');
    }

    fn confusion_table(&self, o: &mut String) {
        let _ = writeln!(o, "## Endings: truth (rows) x verdict (columns)\n");
        let mut head = String::from("| truth \\ verdict |");
        let mut rule = String::from("|---|");
        for e in Ending::ALL {
            let _ = write!(head, " {} |", e.label());
            rule.push_str("---|");
        }
        let _ = writeln!(o, "{head} no verdict |\n{rule}---|");
        for t in Ending::ALL {
            let row: Vec<u64> = Ending::ALL
                .iter()
                .map(|v| Some(*v))
                .chain([None])
                .map(|v| self.score.confusion.get(&(t, v)).copied().unwrap_or(0))
                .collect();
            if row.iter().all(|n| *n == 0) {
                continue;
            }
            let cells: Vec<String> = row.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(o, "| {} | {} |", t.label(), cells.join(" | "));
        }
        o.push('\n');
    }

    fn misses_list(&self, o: &mut String, listed: usize) {
        let _ = writeln!(o, "## Misses\n");
        let mut by: BTreeMap<Figure, Vec<_>> = BTreeMap::new();
        for m in &self.score.misses {
            by.entry(m.figure).or_default().push(m);
        }
        for (f, ms) in by {
            let _ = writeln!(o, "### {} ({} misses)\n", f.label(), ms.len());
            let _ = writeln!(
                o,
                "| seed | path | knobs | expected | said |\n|---|---|---|---|---|"
            );
            for m in ms.iter().take(listed) {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} |",
                    m.seed, m.path, m.knobs, m.expected, m.got
                );
            }
            if ms.len() > listed {
                let _ = writeln!(
                    o,
                    "\n... and {} more (the command lists them all with --all-misses).",
                    ms.len() - listed
                );
            }
            o.push('\n');
        }
    }
}
