//! One path from "the kernel reported something" to "a verdict was
//! reached", shared by the live agent, `monitor analyze` and the scenario
//! generators: ring buffer records (events and request samples) and the
//! passing of time in; detector outputs and request readings out. The
//! callers only choose what to do with the outputs (metrics and followers
//! live, a list of verdicts offline).

use monitor_common::{EventKind, FlowKey};

use crate::{
    detector::{self, report::Report, Detector, DetectorConfig, DetectorConfigError, Verdict},
    event::{PayloadSample, Record},
    ping,
};

/// What one input gave.
#[derive(Clone, Debug)]
pub enum Output {
    /// A verdict, a hold time, an alert or churn.
    Detector(detector::Output),
    /// A plaintext request was read (a Ping's heartbeat went to the detector).
    Request(ping::Outcome),
}

impl Output {
    pub fn verdict(&self) -> Option<&Verdict> {
        match self {
            Output::Detector(detector::Output::Verdict(v)) => Some(v),
            _ => None,
        }
    }
}

/// The detector and the request reader, wired once.
pub struct Pipeline {
    detector: Detector,
    requests: ping::Reader,
}

impl Pipeline {
    pub fn new(cfg: DetectorConfig) -> Result<Self, DetectorConfigError> {
        Ok(Pipeline {
            detector: Detector::new(cfg)?,
            requests: ping::Reader::new(),
        })
    }

    /// One ring buffer record, in the order the kernel wrote them.
    pub fn record(&mut self, record: &Record) -> Vec<Output> {
        match record {
            Record::Event(ev) => {
                if ev.kind == EventKind::Closed {
                    // A request still being read on a closed flow never completes.
                    self.requests.forget(&ev.raw.key);
                }
                wrap(self.detector.ingest(ev))
            }
            Record::Sample(s) => self.sample(s),
        }
    }

    /// A request sample: what it completes, and the Pings' heartbeats to the detector.
    fn sample(&mut self, s: &PayloadSample) -> Vec<Output> {
        let read = self
            .requests
            .sample(&s.key, s.ts_ns, s.seq, s.payload_len, &s.data);
        for o in &read {
            if let ping::Outcome::Ping(p) = o {
                self.detector.ping(&s.key, p, s.ts_ns);
            }
        }
        read.into_iter().map(Output::Request).collect()
    }

    /// Time passes (at least once a second): black holes become due, idle
    /// clients and unfinished requests are forgotten.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Output> {
        self.requests.expire(now_ns);
        wrap(self.detector.tick(now_ns))
    }

    /// Flows the kernel table no longer holds (evicted or expired).
    pub fn retire_missing(
        &mut self,
        now_ns: u64,
        present: impl Fn(&FlowKey) -> bool,
    ) -> Vec<Output> {
        for key in self
            .requests
            .keys()
            .filter(|k| !present(k))
            .collect::<Vec<_>>()
        {
            self.requests.forget(&key);
        }
        wrap(self.detector.retire_missing(now_ns, present))
    }

    /// The end of the input: judge the resets held for a possible burst.
    pub fn conclude_held(&mut self) -> Vec<Output> {
        wrap(self.detector.conclude_held())
    }

    /// Silences proven survived by the flow table (the client's last
    /// packet), with no event to say so yet: see [`Detector::settle`].
    pub fn settle(
        &mut self,
        now_ns: u64,
        last_heard: impl Fn(&FlowKey) -> Option<u64>,
    ) -> Vec<Output> {
        wrap(self.detector.settle(now_ns, last_heard))
    }

    /// On a proxy host: follow this host's connections to `ports` as
    /// upstream legs (see [`detector::upstream`]).
    pub fn set_upstream(
        &mut self,
        ports: &[u16],
        local: impl IntoIterator<Item = std::net::IpAddr>,
    ) {
        self.detector.set_upstream(ports, local);
    }

    /// This host's addresses changed.
    pub fn set_local_addresses(&mut self, local: impl IntoIterator<Item = std::net::IpAddr>) {
        self.detector.set_local_addresses(local);
    }

    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    pub fn requests(&self) -> &ping::Reader {
        &self.requests
    }

    pub fn report(&self) -> Report {
        self.detector.report()
    }
}

fn wrap(out: Vec<detector::Output>) -> Vec<Output> {
    out.into_iter().map(Output::Detector).collect()
}
