//! Simulated ActiveSync devices: Ping with a heartbeat, adapt it the way real
//! clients do, reconnect on failure.

use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rustls::{pki_types::ServerName, ClientConfig, ClientConnection, StreamOwned};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use super::{http, server::sleep_until_stopped, tls::SERVER_NAME, wbxml};

/// How a device chooses its heartbeat (seconds).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "profile", rename_all = "kebab-case")]
pub enum Profile {
    /// Always the same heartbeat (iOS-like: relies on the server's maximum).
    Fixed { heartbeat: u32 },
    /// Windows Mobile: raise by `step` after each successful Ping; after a
    /// failure go back to the last good value (or the minimum).
    WindowsMobile {
        start: u32,
        step: u32,
        min: u32,
        max: u32,
    },
    /// Android AOSP Exchange: start, raise by `step` up to `max`; after a
    /// failure lower by `step` (not below `min`) and never raise again.
    Android {
        start: u32,
        step: u32,
        min: u32,
        max: u32,
    },
}

/// Heartbeat state machine of one device.
#[derive(Clone, Debug)]
pub struct Adapt {
    pub profile: Profile,
    pub current: u32,
    last_good: Option<u32>,
    failed_once: bool,
}

impl Adapt {
    pub fn new(profile: Profile) -> Adapt {
        let current = match &profile {
            Profile::Fixed { heartbeat } => *heartbeat,
            Profile::WindowsMobile { start, .. } | Profile::Android { start, .. } => *start,
        };
        Adapt {
            profile,
            current,
            last_good: None,
            failed_once: false,
        }
    }

    pub fn success(&mut self) {
        match self.profile {
            Profile::Fixed { .. } => {}
            Profile::WindowsMobile { step, max, .. } => {
                self.last_good = Some(self.current);
                self.current = (self.current + step).min(max);
            }
            Profile::Android { step, max, .. } => {
                if !self.failed_once {
                    self.current = (self.current + step).min(max);
                }
            }
        }
    }

    pub fn failure(&mut self) {
        match self.profile {
            Profile::Fixed { .. } => {}
            Profile::WindowsMobile { min, .. } => self.current = self.last_good.unwrap_or(min),
            Profile::Android { step, min, .. } => {
                self.failed_once = true;
                self.current = self.current.saturating_sub(step).max(min);
            }
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceReport {
    pub name: String,
    pub path: String,
    pub source: String,
    pub pings_ok: u64,
    pub pings_failed: u64,
    pub connections: u64,
    /// Heartbeat of each Ping sent, in order.
    pub heartbeats: Vec<u32>,
    /// Pings answered early for new mail (Status 2) that reached the
    /// device: each a silence shorter than the heartbeat that survived.
    pub early_answers: u64,
    /// The local port of each connection, in order (a NAT may show the
    /// server others).
    pub local_ports: Vec<u16>,
}

pub struct DeviceSpec {
    pub name: String,
    pub path: String,
    pub source: IpAddr,
    pub server: SocketAddr,
    pub profile: Profile,
    /// Initial IP TTL / hop limit: a device ~15 hops away arrives with ~49.
    pub ttl: u32,
    /// How long past its heartbeat the device waits before giving up.
    pub grace: Duration,
    /// Plain HTTP (the server's plaintext port) instead of TLS.
    pub plaintext: bool,
    /// Name the command in the base64 query form.
    pub base64_query: bool,
}

/// A device's connection, TLS or plain.
trait Stream: io::Read + io::Write + Send {
    fn read_timeout(&mut self, d: Duration);
}

impl Stream for TcpStream {
    fn read_timeout(&mut self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
    }
}

impl Stream for StreamOwned<ClientConnection, TcpStream> {
    fn read_timeout(&mut self, d: Duration) {
        let _ = self.sock.set_read_timeout(Some(d));
    }
}

fn connect(spec: &DeviceSpec) -> io::Result<TcpStream> {
    let domain = if spec.source.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if spec.source.is_ipv4() {
        s.set_ttl_v4(spec.ttl)?;
    } else {
        s.set_unicast_hops_v6(spec.ttl)?;
    }
    s.bind(&SocketAddr::new(spec.source, 0).into())?;
    s.connect_timeout(&spec.server.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

/// One Ping: Ok(status) answered (1 or 2), Err on failure.
fn ping<S: io::Read + io::Write>(s: &mut S, spec: &DeviceSpec, hb: u32) -> io::Result<u8> {
    http::write_ping_request(s, &spec.name, spec.base64_query, &wbxml::ping_request(hb))?;
    match http::read_message(s)? {
        Some(m) if m.start_line.starts_with("HTTP/1.1 200") => {
            Ok(wbxml::status_of(&m.body).unwrap_or(0))
        }
        Some(m) => Err(io::Error::other(format!(
            "unexpected answer {:?}",
            m.start_line
        ))),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        )),
    }
}

/// Run the device until `stop`. Call from a thread inside its namespace.
pub fn run(
    spec: DeviceSpec,
    tls: Arc<ClientConfig>,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<DeviceReport>>,
) {
    let mut adapt = Adapt::new(spec.profile.clone());
    let Ok(server_name) = ServerName::try_from(SERVER_NAME) else {
        return;
    };
    while !stop.load(Ordering::Relaxed) {
        let tcp = match connect(&spec) {
            Ok(t) => t,
            Err(_) => {
                sleep_until_stopped(Duration::from_secs(1), &stop);
                continue;
            }
        };
        if let Ok(mut r) = report.lock() {
            r.connections += 1;
            if let Ok(a) = tcp.local_addr() {
                r.local_ports.push(a.port());
            }
        }
        let mut s: Box<dyn Stream> = if spec.plaintext {
            Box::new(tcp)
        } else {
            let Ok(conn) = ClientConnection::new(tls.clone(), server_name.clone()) else {
                return;
            };
            Box::new(StreamOwned::new(conn, tcp))
        };
        ping_until_failure(&mut s, &spec, &mut adapt, &stop, &report);
        // Reconnect after a short pause, as devices do.
        sleep_until_stopped(Duration::from_secs(1), &stop);
    }
}

/// Ping on one connection until a Ping fails or `stop`, adapting the heartbeat.
fn ping_until_failure(
    s: &mut Box<dyn Stream>,
    spec: &DeviceSpec,
    adapt: &mut Adapt,
    stop: &AtomicBool,
    report: &Mutex<DeviceReport>,
) {
    while !stop.load(Ordering::Relaxed) {
        let hb = adapt.current;
        s.read_timeout(Duration::from_secs(u64::from(hb)) + spec.grace);
        if let Ok(mut r) = report.lock() {
            r.heartbeats.push(hb);
        }
        let started = Instant::now();
        match ping(s, spec, hb) {
            Ok(status) => {
                if let Ok(mut r) = report.lock() {
                    r.pings_ok += 1;
                    r.early_answers += u64::from(status == 2);
                }
                // Status 1 at the heartbeat is the success that lets a device raise it.
                if status == 1
                    && started.elapsed() + Duration::from_millis(500)
                        >= Duration::from_secs(u64::from(hb))
                {
                    adapt.success();
                }
            }
            Err(_) => {
                if let Ok(mut r) = report.lock() {
                    r.pings_failed += 1;
                }
                adapt.failure();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_mobile_raises_then_reverts_to_last_good() {
        let mut a = Adapt::new(Profile::WindowsMobile {
            start: 11,
            step: 4,
            min: 8,
            max: 40,
        });
        a.success();
        a.success();
        assert_eq!(a.current, 19);
        a.failure();
        assert_eq!(a.current, 15);
        let mut fresh = Adapt::new(Profile::WindowsMobile {
            start: 11,
            step: 4,
            min: 8,
            max: 40,
        });
        fresh.failure();
        assert_eq!(fresh.current, 8);
    }

    #[test]
    fn android_never_raises_after_a_failure() {
        let mut a = Adapt::new(Profile::Android {
            start: 47,
            step: 18,
            min: 29,
            max: 101,
        });
        a.success();
        assert_eq!(a.current, 65);
        a.failure();
        assert_eq!(a.current, 47);
        a.success();
        assert_eq!(a.current, 47);
        a.failure();
        a.failure();
        assert_eq!(a.current, 29);
    }
}
