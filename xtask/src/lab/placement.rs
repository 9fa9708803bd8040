//! Placements of the agent besides the server:
//! - a SPAN port on the lab's switch ([`Mirror`]): every switch port's
//!   ingress and egress is copied (tc `mirred`) to a port whose other end,
//!   `mir0`, sits in a namespace of its own, where an agent in tap mode
//!   watches: each packet arrives there twice (as it enters the switch and
//!   as it leaves), as on a switch mirroring both ports of a conversation;
//! - a router in the path ([`start_router_agent`]): an agent in router mode
//!   on a path's router, on its interface toward the server; and one on a
//!   plain router's interface toward its clients
//!   ([`start_client_side_router_agent`]);
//! - a reverse proxy's host ([`start_proxy_agents`]): an agent on each
//!   nginx or HTTP-mode HAProxy router, on both its interfaces, following
//!   the proxy's upstream legs to the server too.

use anyhow::Result;

use super::{
    addressing::{PLAINTEXT_PORT, SERVER_PORT},
    agent::AgentOptions,
    topology::{ROUTER_DOWN, ROUTER_UP},
    Agent, Middlebox, Scenario, Topology,
};
use crate::{
    cmd::sh_in,
    netns::{add_veth, link_up, Netns},
};

/// The capture interface in the mirror's namespace.
pub const MIRROR_IF: &str = "mir0";
/// Its peer on the switch: the SPAN destination (not a bridge port).
const SPAN_PORT: &str = "p-mir";

/// The SPAN port's namespace; removed on drop.
pub struct Mirror {
    pub ns: Netns,
}

impl Mirror {
    /// Copy every port of `topo`'s switch, both ways, to `mir0`.
    pub fn up(topo: &Topology) -> Result<Mirror> {
        let ns = Netns::new(format!("{}-tap", topo.namespace_stem()));
        let sw = &topo.switch.name;
        add_veth((MIRROR_IF, &ns.name), (SPAN_PORT, sw));
        link_up(&ns.name, MIRROR_IF);
        link_up(sw, SPAN_PORT);
        for port in topo.switch_ports() {
            sh_in(
                sw,
                &format!(
                    "tc qdisc add dev {port} clsact && \
                     tc filter add dev {port} ingress protocol all u32 match u32 0 0 action mirred egress mirror dev {SPAN_PORT} && \
                     tc filter add dev {port} egress protocol all u32 match u32 0 0 action mirred egress mirror dev {SPAN_PORT}"
                ),
            )?;
        }
        Ok(Mirror { ns })
    }

    /// An agent in tap mode on `mir0`, with the scenario's detector settings.
    pub fn start_agent(
        &self,
        bin: &std::path::Path,
        topo: &Topology,
        s: &Scenario,
    ) -> Result<Agent> {
        let mut o = AgentOptions::new(MIRROR_IF, topo.workdir.join("tap"));
        o.config.detector = s.detector.clone();
        o.config.agent.mode = monitor_core::config::AgentMode::Tap;
        // A veth: TC keeps GRO (XDP on veth gives it up).
        o.config.agent.ingress = monitor_core::config::IngressHook::Tc;
        Agent::start_in(bin, &self.ns, o)
    }
}

/// An agent in router mode on the router of the first path whose box is a
/// Linux firewall (conntrack resetting forgotten flows), on the router's
/// interface toward the server: the box then lies on the clients' side, as
/// it does for the server. The path's name and the agent; none without such
/// a path.
pub fn start_router_agent(
    bin: &std::path::Path,
    topo: &Topology,
    s: &Scenario,
) -> Result<Option<(String, Agent)>> {
    let Some(p) = topo
        .paths
        .iter()
        .find(|p| p.spec.middlebox == Middlebox::ConntrackReset && !p.spec.nat_random_ports)
    else {
        return Ok(None);
    };
    let mut o = AgentOptions::new(ROUTER_UP, topo.workdir.join(format!("router-{}", p.index)));
    o.config.detector = s.detector.clone();
    o.config.agent.mode = monitor_core::config::AgentMode::Router;
    o.config.agent.ingress = monitor_core::config::IngressHook::Tc;
    let agent = Agent::start_in(bin, &p.router, o)?;
    Ok(Some((p.monitor_path.clone(), agent)))
}

/// An agent in router mode on the plain router of the first control path,
/// on its interface toward the clients: forwarded flows cross it both
/// ways, and the ports alone say which way is which. The path's names
/// (IPv4 and IPv6, as the monitor prints them) and the agent.
pub fn start_client_side_router_agent(
    bin: &std::path::Path,
    topo: &Topology,
    s: &Scenario,
) -> Result<Option<(Vec<String>, Agent)>> {
    let Some(p) = topo
        .paths
        .iter()
        .find(|p| p.spec.middlebox == Middlebox::Control && !p.spec.plaintext)
    else {
        return Ok(None);
    };
    let dir = topo.workdir.join(format!("router-down-{}", p.index));
    let mut o = AgentOptions::new(ROUTER_DOWN, dir);
    o.config.detector = s.detector.clone();
    o.config.agent.mode = monitor_core::config::AgentMode::Router;
    o.config.agent.ingress = monitor_core::config::IngressHook::Tc;
    let agent = Agent::start_in(bin, &p.router, o)?;
    let names = vec![
        p.monitor_path.clone(),
        format!(
            "[{}]:{}",
            super::addressing::client_path_v6(p.index),
            p.spec.port()
        ),
    ];
    Ok(Some((names, agent)))
}

/// An agent on a reverse proxy's host, and the path it sits on.
pub struct ProxyAgent {
    /// The path as the scenario names it.
    pub name: String,
    /// Its devices' path as the agent names it (client prefix and port).
    pub client_path: String,
    pub agent: Agent,
}

/// An agent on each proxy host's router (nginx, HAProxy in HTTP mode):
/// server mode on its interfaces toward the devices and toward the
/// server, with the proxy's connections to the server as upstream legs.
pub fn start_proxy_agents(
    bin: &std::path::Path,
    topo: &Topology,
    s: &Scenario,
) -> Result<Vec<ProxyAgent>> {
    let mut agents = Vec::new();
    for p in topo
        .paths
        .iter()
        .filter(|p| p.spec.middlebox.is_proxy_host())
    {
        let mut o = AgentOptions::new(ROUTER_DOWN, topo.workdir.join(format!("proxy-{}", p.index)));
        o.interfaces.push(ROUTER_UP.to_string());
        o.config.detector = s.detector.clone();
        o.config.agent.upstream_ports = vec![SERVER_PORT, PLAINTEXT_PORT];
        o.config.agent.ingress = monitor_core::config::IngressHook::Tc;
        agents.push(ProxyAgent {
            name: p.spec.name.clone(),
            client_path: format!(
                "{}:{SERVER_PORT}",
                super::addressing::client_net_v4(p.index)
            ),
            agent: Agent::start_in(bin, &p.router, o)?,
        });
    }
    Ok(agents)
}
