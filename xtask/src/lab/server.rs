//! The ActiveSync-like endpoint: TLS on port 443, plain HTTP on 8080; holds each Ping until its
//! heartbeat expires (Status 1) or until scripted "new mail" arrives (Status 2).

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::{addressing::path_of, http, wbxml, Scenario};

/// How often new mail ends a Ping early, by the path a connection comes
/// from: each path may have its own chance, beside the scenario's.
#[derive(Clone, Debug, Default)]
pub struct MailPlan {
    default: f64,
    /// Indexed by path (from 1; index 0 unused).
    by_path: Vec<f64>,
}

impl MailPlan {
    pub fn new(s: &Scenario) -> MailPlan {
        MailPlan {
            default: s.mail_probability,
            by_path: (0..=s.paths.len())
                .map(|i| s.mail_probability_of(i))
                .collect(),
        }
    }

    /// The chance for a connection from `peer`.
    pub fn of(&self, peer: IpAddr) -> f64 {
        path_of(peer)
            .and_then(|i| self.by_path.get(i).copied())
            .unwrap_or(self.default)
    }
}

#[derive(Default, Debug)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub pings: AtomicU64,
    pub answered_at_heartbeat: AtomicU64,
    pub answered_early: AtomicU64,
}

/// Sleep up to `d`, waking early when `stop` is set.
pub fn sleep_until_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

fn serve_connection(
    tcp: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    mail_probability: f64,
    seed: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
) {
    // Bounded: a connection whose client vanished ends here.
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(300)));
    match tls {
        Some(tls) => {
            let Ok(conn) = ServerConnection::new(tls) else {
                return;
            };
            let s = StreamOwned::new(conn, tcp);
            serve_pings(s, mail_probability, seed, stop, stats)
        }
        // The plaintext port: as behind a TLS-terminating load balancer.
        None => serve_pings(tcp, mail_probability, seed, stop, stats),
    }
}

fn serve_pings<S: std::io::Read + std::io::Write>(
    mut s: S,
    mail_probability: f64,
    seed: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
) {
    // Seeded, so runs are reproducible.
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Ordering::Relaxed) {
        let msg = match http::read_message(&mut s) {
            Ok(Some(m)) => m,
            _ => return,
        };
        // The plain query names the command; the base64 form is opaque to
        // the lab, whose devices only ever Ping.
        if !msg.start_line.contains("Cmd=Ping") && wbxml::heartbeat_of(&msg.body).is_none() {
            return;
        }
        stats.pings.fetch_add(1, Ordering::Relaxed);
        let hb = wbxml::heartbeat_of(&msg.body).unwrap_or(60);
        let hold = Duration::from_secs(u64::from(hb));
        // New mail arrives during this Ping with some probability: answer early.
        let (wait, status) = if rng.f64() < mail_probability {
            stats.answered_early.fetch_add(1, Ordering::Relaxed);
            (hold.mul_f64(0.2 + 0.5 * rng.f64()), 2)
        } else {
            stats.answered_at_heartbeat.fetch_add(1, Ordering::Relaxed);
            (hold, 1)
        };
        sleep_until_stopped(wait, &stop);
        if http::write_response(&mut s, &wbxml::ping_response(status)).is_err() {
            return;
        }
    }
}

/// Serve on `addr` until `stop`. Call from a thread inside the server's namespace.
pub fn serve(
    addr: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
    mail: &MailPlan,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
) -> std::io::Result<()> {
    let l = TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nonblocking(false);
                n += 1;
                stats.connections.fetch_add(1, Ordering::Relaxed);
                let mail_probability = mail.of(peer.ip());
                let (tls, stop, stats) = (tls.clone(), stop.clone(), stats.clone());
                thread::spawn(move || {
                    serve_connection(tcp, tls, mail_probability, n * 7919, stop, stats)
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(())
}
