//! The lab's namespaces, links, routes and middleboxes.
//!
//! ```text
//!  clients ns (path i) ── router ns (path i: conntrack/nftables, injector, HAProxy, nginx)
//!                                  │ 192.0.2.(10+i)
//!                        switch ns (bridge) ── server ns: srv0 192.0.2.1, agent, endpoint :443
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result};

use super::{
    addressing::*,
    scenario::{Middlebox, PathSpec, Scenario},
    tls::{lab_tls, LabTls},
};
use crate::{
    cmd::{self, sh_in},
    netns::{add_addr, add_veth, delete_netns, link_up, sh, unique_tag, Netns},
};

/// Namespaces are named `lab<tag>-<role>`; `down_all` finds them so.
const NETNS_PREFIX: &str = "lab";
const BRIDGE: &str = "br0";
/// A router's interface towards the switch, and towards its clients.
pub const ROUTER_UP: &str = "up0";
pub const ROUTER_DOWN: &str = "down0";
/// The clients' interface.
const CLIENTS_IF: &str = "cl0";

pub struct PathRuntime {
    pub spec: PathSpec,
    pub index: usize,
    pub router: Netns,
    pub clients: Netns,
    /// The path as the monitor names it (client prefix and port).
    pub monitor_path: String,
}

/// Namespaces and middleboxes; removed on drop.
pub struct Topology {
    pub tag: String,
    pub switch: Netns,
    pub server: Netns,
    pub server_if: String,
    pub paths: Vec<PathRuntime>,
    children: Vec<Child>,
    pub(super) workdir: PathBuf,
    /// The lab's certificate: the server's, and the proxy hosts'.
    pub tls: LabTls,
}

impl Topology {
    pub fn up(s: &Scenario) -> Result<Topology> {
        crate::setup::check_root()?;
        let mut topo = Topology::new()?;
        topo.wire_server();
        for (i0, spec) in s.paths.iter().enumerate() {
            let path = topo.add_path(i0 + 1, spec)?;
            topo.paths.push(path);
        }
        for i in 0..topo.paths.len() {
            topo.configure_middlebox(i)?;
        }
        Ok(topo)
    }

    /// A work directory, and the switch and server namespaces, not yet wired.
    fn new() -> Result<Topology> {
        let tag = unique_tag();
        let workdir = std::env::temp_dir().join(format!("monitor-lab-{tag}"));
        std::fs::create_dir_all(&workdir)?;
        let switch = Netns::new(format!("{NETNS_PREFIX}{tag}-sw"));
        let server = Netns::new(format!("{NETNS_PREFIX}{tag}-srv"));
        let tls = lab_tls()?;
        std::fs::write(workdir.join("lab.crt"), &tls.cert_pem)?;
        std::fs::write(workdir.join("lab.key"), &tls.key_pem)?;
        // HAProxy takes the certificate and its key in one file.
        std::fs::write(
            workdir.join("lab.pem"),
            format!("{}{}", tls.cert_pem, tls.key_pem),
        )?;
        Ok(Topology {
            tag,
            switch,
            server,
            server_if: "srv0".to_string(),
            paths: Vec::new(),
            children: Vec::new(),
            workdir,
            tls,
        })
    }

    /// The switch's bridge, and the server on it.
    fn wire_server(&self) {
        let (sw, srv, srv_if) = (&self.switch.name, &self.server.name, &self.server_if);
        sh(&["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge"]);
        link_up(sw, BRIDGE);
        add_veth((srv_if, srv), ("p-srv", sw));
        bridge_port(sw, "p-srv");
        add_addr(srv, &format!("{SERVER_V4}/24"), srv_if);
        add_addr(srv, &format!("{SERVER_V6}/64"), srv_if);
        link_up(srv, srv_if);
    }

    /// Path `i` (from 1): its router and clients namespaces, wired and routed.
    fn add_path(&self, i: usize, spec: &PathSpec) -> Result<PathRuntime> {
        let router = Netns::new(format!("{NETNS_PREFIX}{}-r{i}", self.tag));
        let clients = Netns::new(format!("{NETNS_PREFIX}{}-c{i}", self.tag));
        self.wire_router(i, &router.name, &clients.name)?;
        wire_clients(i, &clients.name, spec);
        self.route_to_clients(i);
        Ok(PathRuntime {
            spec: spec.clone(),
            index: i,
            router,
            clients,
            monitor_path: monitor_path(i, spec),
        })
    }

    /// Router `r` of path `i`: up to the switch, down to the clients `c`, forwarding.
    fn wire_router(&self, i: usize, r: &str, c: &str) -> Result<()> {
        let sw = &self.switch.name;
        let port = format!("p-r{i}");
        add_veth((ROUTER_UP, r), (&port, sw));
        bridge_port(sw, &port);
        add_veth((ROUTER_DOWN, r), (CLIENTS_IF, c));
        add_addr(r, &format!("{}/24", router_up_v4(i)), ROUTER_UP);
        add_addr(r, &format!("{}/64", router_up_v6(i)), ROUTER_UP);
        add_addr(r, &format!("{}/24", client_v4(i, ROUTER_HOST)), ROUTER_DOWN);
        add_addr(r, &format!("{}/64", client_v6(i, ROUTER_HOST)), ROUTER_DOWN);
        for ifname in [ROUTER_UP, ROUTER_DOWN] {
            link_up(r, ifname);
        }
        sh_in(
            r,
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        )?;
        Ok(())
    }

    /// The server's routes to path `i`'s clients (and their NAT address), through its router.
    fn route_to_clients(&self, i: usize) {
        let srv = &self.server.name;
        add_route(srv, &client_net_v4(i), &router_up_v4(i));
        add_route(srv, &client_net_v6(i), &router_up_v6(i));
        add_route(srv, &nat_net_v4(i), &router_up_v4(i));
    }

    fn configure_middlebox(&mut self, i: usize) -> Result<()> {
        let p = &self.paths[i];
        if p.spec.nat_random_ports {
            snat_random_ports(&p.router.name, p.index)?;
        }
        match p.spec.middlebox {
            Middlebox::Control | Middlebox::Injector => {}
            mb @ (Middlebox::ConntrackReset | Middlebox::ConntrackDrop) => {
                let nat = p.spec.nat_random_ports;
                conntrack_killer(&p.router.name, mb, p.spec.timeout_seconds, nat)?;
            }
            Middlebox::Proxy => {
                let child = self.start_haproxy(i)?;
                self.children.push(child);
            }
            Middlebox::Nginx => {
                let child = self.start_nginx(i)?;
                self.children.push(child);
            }
            Middlebox::HaproxyHttp => {
                let child = self.start_haproxy_http(i)?;
                self.children.push(child);
            }
        }
        Ok(())
    }

    /// nginx on path `paths[i]`'s router, the proxy host: the devices' TLS
    /// on 443, HTTPS to the server's IPv6 address, `proxy_read_timeout` of
    /// the path's timeout. Its files in a directory of its own.
    fn start_nginx(&self, i: usize) -> Result<Child> {
        let p = &self.paths[i];
        let dir = self.workdir.join(format!("nginx-{i}"));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("nginx.conf");
        let (d, w) = (dir.display(), self.workdir.display());
        let conf = [
            "daemon off;".to_string(),
            "master_process off;".into(),
            format!("pid {d}/nginx.pid;"),
            format!("error_log {d}/error.log warn;"),
            "events { worker_connections 512; }".into(),
            "http {".into(),
            "  access_log off;".into(),
            format!("  client_body_temp_path {d}/body;"),
            format!("  proxy_temp_path {d}/proxy;"),
            format!("  fastcgi_temp_path {d}/fastcgi;"),
            format!("  uwsgi_temp_path {d}/uwsgi;"),
            format!("  scgi_temp_path {d}/scgi;"),
            "  server {".into(),
            format!("    listen {}:443 ssl;", client_v4(p.index, ROUTER_HOST)),
            format!("    listen [{}]:443 ssl;", client_v6(p.index, ROUTER_HOST)),
            format!("    ssl_certificate {w}/lab.crt;"),
            format!("    ssl_certificate_key {w}/lab.key;"),
            "    location / {".into(),
            format!("      proxy_pass https://[{SERVER_V6}]:{SERVER_PORT};"),
            format!("      proxy_read_timeout {}s;", p.spec.timeout_seconds),
            "    }".into(),
            "  }".into(),
            "}".into(),
        ];
        std::fs::write(&cfg, conf.join("\n") + "\n")?;
        let mut c = cmd::child_in_netns(&p.router.name);
        c.args(["nginx", "-p"])
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&cfg);
        spawn_quiet(c, "nginx")
    }

    /// HAProxy in HTTP mode on path `paths[i]`'s router, the proxy host:
    /// the devices' TLS on 443, plain HTTP to the server's IPv6 plaintext
    /// port, `timeout server` of the path's timeout.
    fn start_haproxy_http(&self, i: usize) -> Result<Child> {
        let p = &self.paths[i];
        let cfg = self.workdir.join(format!("haproxy-http-{i}.cfg"));
        let pem = self.workdir.join("lab.pem");
        let pem = pem.display();
        let conf = [
            "global".to_string(),
            "  maxconn 1000".into(),
            "defaults".into(),
            "  mode http".into(),
            "  timeout connect 5s".into(),
            "  timeout client 600s".into(),
            format!("  timeout server {}s", p.spec.timeout_seconds),
            "  timeout http-keep-alive 600s".into(),
            "frontend fe".into(),
            format!(
                "  bind {}:443 ssl crt {pem}",
                client_v4(p.index, ROUTER_HOST)
            ),
            format!(
                "  bind [{}]:443 ssl crt {pem}",
                client_v6(p.index, ROUTER_HOST)
            ),
            "  default_backend be".into(),
            "backend be".into(),
            format!("  server exchange [{SERVER_V6}]:{PLAINTEXT_PORT}"),
        ];
        std::fs::write(&cfg, conf.join("\n") + "\n")?;
        haproxy(&p.router.name, &cfg)
    }

    /// HAProxy in TCP mode on path `paths[i]`'s router, idle timeouts of the path's timeout.
    fn start_haproxy(&self, i: usize) -> Result<Child> {
        let p = &self.paths[i];
        let cfg = self.workdir.join(format!("haproxy-{i}.cfg"));
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client {t}s\n  timeout server {t}s\n\
                 frontend fe\n  bind {}:{port}\n  default_backend be\nbackend be\n  server exchange {SERVER_V4}:{port}\n",
                client_v4(p.index, ROUTER_HOST),
                t = p.spec.timeout_seconds,
                port = p.spec.port(),
            ),
        )?;
        haproxy(&p.router.name, &cfg)
    }

    /// `lab<tag>`: the start of every namespace name of this lab.
    pub fn namespace_stem(&self) -> String {
        format!("{NETNS_PREFIX}{}", self.tag)
    }

    /// The switch's ports: the server's, then each path's router's.
    pub fn switch_ports(&self) -> Vec<String> {
        let mut ports = vec!["p-srv".to_string()];
        ports.extend(self.paths.iter().map(|p| format!("p-r{}", p.index)));
        ports
    }

    /// Where path `p`'s devices connect (the proxy, or the server itself).
    pub fn target(&self, p: &PathRuntime, ipv6: bool) -> SocketAddr {
        let proxy = p.spec.middlebox.terminates();
        let ip: IpAddr = match (proxy, ipv6) {
            (true, false) => client_v4(p.index, ROUTER_HOST).parse().expect("address"),
            (true, true) => client_v6(p.index, ROUTER_HOST).parse().expect("address"),
            (false, false) => SERVER_V4.parse().expect("address"),
            (false, true) => SERVER_V6.parse().expect("address"),
        };
        SocketAddr::new(ip, p.spec.port())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            cmd::kill_and_reap(c);
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
        // Namespaces go with their `Netns` guards (paths first, then the rest).
        self.paths.clear();
    }
}

/// HAProxy in the foreground in namespace `ns`, configured by `cfg`.
fn haproxy(ns: &str, cfg: &std::path::Path) -> Result<Child> {
    let mut c = cmd::child_in_netns(ns);
    c.args(["haproxy", "-db", "-f"]).arg(cfg);
    spawn_quiet(c, "haproxy")
}

/// Start `c` (Debian package `package`) with its output discarded.
fn spawn_quiet(mut c: Command, package: &str) -> Result<Child> {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {package} (Debian package {package})"))
}

/// Path `i`'s clients namespace `c`: an address per device, default routes via the router.
fn wire_clients(i: usize, c: &str, spec: &PathSpec) {
    let hosts: u32 = spec.devices.iter().map(|d| d.count).sum();
    for h in FIRST_DEVICE_HOST..FIRST_DEVICE_HOST + hosts as usize {
        add_addr(c, &format!("{}/24", client_v4(i, h)), CLIENTS_IF);
        add_addr(c, &format!("{}/64", client_v6(i, h)), CLIENTS_IF);
    }
    link_up(c, CLIENTS_IF);
    add_route(c, "default", &client_v4(i, ROUTER_HOST));
    add_route(c, "default", &client_v6(i, ROUTER_HOST));
}

/// The path as the monitor names it: the client prefix the server sees, and the port.
fn monitor_path(i: usize, spec: &PathSpec) -> String {
    let port = spec.port();
    match spec.middlebox {
        // The proxy is the client the server sees.
        Middlebox::Proxy => format!("{UPLINK_NET_V4}:{port}"),
        // The proxy hosts reach the server over IPv6 (HAProxy on its plaintext port).
        Middlebox::Nginx => format!("{UPLINK_PATH_V6}:{SERVER_PORT}"),
        Middlebox::HaproxyHttp => format!("{UPLINK_PATH_V6}:{PLAINTEXT_PORT}"),
        _ if spec.nat_random_ports => format!("{}:{port}", nat_net_v4(i)),
        _ => format!("{}:{port}", client_net_v4(i)),
    }
}

/// Enslave switch port `port` to the bridge, and bring it up.
fn bridge_port(sw: &str, port: &str) {
    sh(&["ip", "-n", sw, "link", "set", port, "master", BRIDGE, "up"]);
}

/// A route to `dest` via `via` (IPv6 if `via` is).
fn add_route(ns: &str, dest: &str, via: &str) {
    if via.contains(':') {
        sh(&["ip", "-n", ns, "-6", "route", "add", dest, "via", via]);
    } else {
        sh(&["ip", "-n", ns, "route", "add", dest, "via", via]);
    }
}

/// conntrack in router namespace `r` forgets established flows after
/// `timeout` seconds; the next packet is rejected with an RST or dropped.
/// Behind a NAT (`nat`) the server's packets for a forgotten mapping are
/// addressed to the router itself, so they meet the input hook instead.
fn conntrack_killer(r: &str, mb: Middlebox, timeout: u32, nat: bool) -> Result<()> {
    let verdict = if mb == Middlebox::ConntrackReset {
        "reject with tcp reset"
    } else {
        "drop"
    };
    // The rule loads conntrack in this namespace; then its sysctls exist.
    sh_in(r, &format!(
        "nft add table inet mb && nft 'add chain inet mb killer {{ type filter hook forward priority 0; policy accept; }}' && nft add rule inet mb killer ct state invalid {verdict}"
    ))?;
    if nat {
        // TCP only: untracked neighbour discovery also counts as invalid.
        sh_in(r, &format!(
            "nft 'add chain inet mb killer_in {{ type filter hook input priority 0; policy accept; }}' && nft add rule inet mb killer_in meta l4proto tcp ct state invalid {verdict}"
        ))?;
    }
    // Per-namespace timeout (nftables ct timeout objects did not take effect on this kernel).
    sh_in(r, &format!(
        "sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_established={timeout} net.netfilter.nf_conntrack_tcp_loose=0"
    ))?;
    Ok(())
}

/// Router `r` of path `i` source-NATs its clients' TCP to one address of
/// its own (so packets for a forgotten mapping end at the router), on a
/// random port per new connection, as carrier-grade NATs do.
fn snat_random_ports(r: &str, i: usize) -> Result<()> {
    add_addr(r, &format!("{}/32", nat_v4(i)), ROUTER_UP);
    sh_in(r, &format!(
        "nft add table ip labnat && nft 'add chain ip labnat post {{ type nat hook postrouting priority 100; }}' && \
         nft add rule ip labnat post oifname {ROUTER_UP} ip saddr {} meta l4proto tcp snat to {}:1024-65535 random",
        client_net_v4(i),
        nat_v4(i),
    ))?;
    Ok(())
}

/// Remove every lab namespace left by a run that was killed.
pub fn down_all() -> Result<usize> {
    let list = cmd::output(Command::new("ip").args(["netns", "list"]))?;
    let mut n = 0;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if name.starts_with(NETNS_PREFIX) && name.contains('-') {
            delete_netns(name);
            n += 1;
        }
    }
    Ok(n)
}
