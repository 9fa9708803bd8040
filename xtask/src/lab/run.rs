//! A whole lab run: topology, agent, capture, traffic, and their teardown.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::{device, placement::ProxyAgent, Agent, Capture, Mirror, Scenario, Topology, Traffic};

/// A whole lab run: topology, agent, traffic. Dropping it tears everything
/// down in the right order (traffic, capture, agents, namespaces).
pub struct LabRun {
    pub traffic: Option<Traffic>,
    pub capture: Option<Capture>,
    pub agent: Option<Agent>,
    /// The agent in tap mode on the switch's SPAN port, with its namespace.
    pub tap_agent: Option<Agent>,
    pub mirror: Option<Mirror>,
    /// The agent in router mode on a path's router, and that path's name.
    pub router_agent: Option<(String, Agent)>,
    /// The agent in router mode on a plain router's client-facing
    /// interface, and its path's names.
    pub client_side_router_agent: Option<(Vec<String>, Agent)>,
    /// The agents on the reverse proxies' hosts (upstream legs followed).
    pub proxy_agents: Vec<ProxyAgent>,
    pub topo: Topology,
    pub scenario: Scenario,
}

impl LabRun {
    pub fn start(s: &Scenario, monitor_bin: &Path) -> Result<LabRun> {
        LabRun::start_capturing(s, monitor_bin, None)
    }

    /// Also capture the server's port-443 traffic to `capture` (pcap) from
    /// before the first device connects.
    pub fn start_capturing(
        s: &Scenario,
        monitor_bin: &Path,
        capture: Option<&Path>,
    ) -> Result<LabRun> {
        LabRun::start_with(s, monitor_bin, capture, false)
    }

    /// With `placements`: also a SPAN port on the switch and an agent in
    /// tap mode behind it, and an agent in router mode on a router, watching
    /// the same traffic.
    pub fn start_with(
        s: &Scenario,
        monitor_bin: &Path,
        capture: Option<&Path>,
        placements: bool,
    ) -> Result<LabRun> {
        let topo = Topology::up(s)?;
        let agent = Agent::start(monitor_bin, &topo, s)?;
        let mirror = if placements {
            Some(Mirror::up(&topo)?)
        } else {
            None
        };
        let router_agent = if placements {
            super::placement::start_router_agent(monitor_bin, &topo, s)?
        } else {
            None
        };
        let client_side_router_agent = if placements {
            super::placement::start_client_side_router_agent(monitor_bin, &topo, s)?
        } else {
            None
        };
        let proxy_agents = if placements {
            super::placement::start_proxy_agents(monitor_bin, &topo, s)?
        } else {
            Vec::new()
        };
        let tap_agent = match &mirror {
            Some(m) => Some(m.start_agent(monitor_bin, &topo, s)?),
            None => None,
        };
        let capture = match capture {
            Some(p) => Some(Capture::start(&topo.server.name, &topo.server_if, p)?),
            None => None,
        };
        let traffic = Traffic::start(&topo, s)?;
        Ok(LabRun {
            traffic: Some(traffic),
            capture,
            agent: Some(agent),
            tap_agent,
            mirror,
            router_agent,
            client_side_router_agent,
            proxy_agents,
            topo,
            scenario: s.clone(),
        })
    }

    /// Stop the capture (traffic goes on); the pcap's path.
    pub fn stop_capture(&mut self) -> Result<Option<PathBuf>> {
        self.capture.take().map(Capture::stop).transpose()
    }

    pub fn agent(&self) -> &Agent {
        self.agent
            .as_ref()
            .expect("the agent runs until the lab stops")
    }

    /// The agent's report.
    pub fn report(&self) -> Result<monitor_core::detector::report::Report> {
        self.agent().report()
    }

    pub fn devices(&self) -> Vec<device::DeviceReport> {
        self.traffic
            .as_ref()
            .map(|t| t.device_reports())
            .unwrap_or_default()
    }

    /// Stop traffic and the agent; returns the agent's log.
    pub fn stop(mut self) -> Result<String> {
        if let Some(t) = self.traffic.take() {
            t.stop();
        }
        let proxies = std::mem::take(&mut self.proxy_agents)
            .into_iter()
            .map(|p| p.agent);
        for a in [
            self.tap_agent.take(),
            self.router_agent.take().map(|(_, a)| a),
            self.client_side_router_agent.take().map(|(_, a)| a),
        ]
        .into_iter()
        .flatten()
        .chain(proxies)
        {
            let log = a.stop()?;
            anyhow::ensure!(!log.contains("panicked"), "an agent panicked: {log}");
        }
        match self.agent.take() {
            Some(a) => a.stop(),
            None => Ok(String::new()),
        }
    }
}

impl Drop for LabRun {
    fn drop(&mut self) {
        if let Some(t) = self.traffic.take() {
            t.stop();
        }
        self.tap_agent.take();
        self.router_agent.take();
        self.client_side_router_agent.take();
        self.proxy_agents.clear();
        self.agent.take();
    }
}
