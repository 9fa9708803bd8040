//! Network namespaces joined by veth pairs,
//! created per test with unique names and removed on drop (every exit path,
//! panics included), and helpers to run code inside a namespace.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::cmd;
pub use crate::cmd::{die_with_parent, sh};

/// Kernel tests need root; fail loudly rather than skip (a skipped kernel
/// test proves nothing).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "kernel tests load BPF programs and create network namespaces: run them as root"
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for names (interface names are limited to 15 bytes).
pub fn unique_tag() -> String {
    format!(
        "{:x}{:x}",
        std::process::id() & 0xffff,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        link_up(&ns.name, "lo");
        ns
    }

    /// Run `f` on a thread inside this namespace and return its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Start `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

/// Delete namespace `name` (and the veth ends inside it), if it exists.
pub fn delete_netns(name: &str) {
    let _ = cmd::run(Command::new("ip").args(["netns", "del", name]));
}

/// Move the calling thread into the namespace at `path`.
pub fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: valid fd; CLONE_NEWNET affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also removes the veth ends inside it.
        delete_netns(&self.name);
    }
}

/// A veth pair: interface `a.0` in namespace `a.1`, its peer `b.0` in `b.1`.
pub fn add_veth(a: (&str, &str), b: (&str, &str)) {
    sh(&[
        "ip", "link", "add", a.0, "netns", a.1, "type", "veth", "peer", "name", b.0, "netns", b.1,
    ]);
}

/// Add an address (IPv6 without duplicate address detection: the namespace
/// is ready at once).
pub fn add_addr(ns: &str, cidr: &str, dev: &str) {
    if cidr.contains(':') {
        sh(&[
            "ip", "-n", ns, "-6", "addr", "add", cidr, "dev", dev, "nodad",
        ]);
    } else {
        sh(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
    }
}

/// Bring interface `dev` of namespace `ns` up.
pub fn link_up(ns: &str, dev: &str) {
    sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
}

/// Two namespaces joined by a veth pair, with IPv4 and IPv6 addresses:
/// client `192.0.2.2` / `2001:db8::2`, server `192.0.2.1` / `2001:db8::1`
/// (documentation ranges, reachable only inside these namespaces).
pub struct Pair {
    pub client: Netns,
    pub server: Netns,
    /// The server's interface (where the monitor attaches).
    pub server_if: String,
    pub client_if: String,
}

pub const CLIENT_V4: &str = "192.0.2.2";
pub const SERVER_V4: &str = "192.0.2.1";
pub const CLIENT_V6: &str = "2001:db8::2";
pub const SERVER_V6: &str = "2001:db8::1";

impl Pair {
    pub fn new() -> Pair {
        require_root();
        let tag = unique_tag();
        let client = Netns::new(format!("mtc-{tag}"));
        let server = Netns::new(format!("mts-{tag}"));
        let server_if = format!("ms{tag}");
        let client_if = format!("mc{tag}");
        add_veth((&server_if, &server.name), (&client_if, &client.name));
        for (ns, ifname, v4, v6) in [
            (&server, &server_if, SERVER_V4, SERVER_V6),
            (&client, &client_if, CLIENT_V4, CLIENT_V6),
        ] {
            add_addr(&ns.name, &format!("{v4}/24"), ifname);
            add_addr(&ns.name, &format!("{v6}/64"), ifname);
            link_up(&ns.name, ifname);
        }
        Pair {
            client,
            server,
            server_if,
            client_if,
        }
    }
}

impl Default for Pair {
    fn default() -> Self {
        Pair::new()
    }
}

/// Poll `f` every 20 ms until it returns `Some`, or give up after `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// HTTP GET `path` from `addr` inside namespace `ns`; the body of a 200 answer.
pub fn http_get_in(ns: &str, addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    let ns_path = format!("/run/netns/{ns}");
    let path = path.to_string();
    thread::spawn(move || -> Result<String, String> {
        use std::io::{Read, Write};
        enter(&ns_path);
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        // HTTP/1.0: the answer comes whole, never chunked.
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
        let mut body = String::new();
        s.read_to_string(&mut body).map_err(|e| e.to_string())?;
        match body.split_once("\r\n\r\n") {
            Some((head, b))
                if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") =>
            {
                Ok(b.to_string())
            }
            _ => Err(format!(
                "GET {path}: {}",
                body.lines().next().unwrap_or_default()
            )),
        }
    })
    .join()
    .map_err(|_| "the HTTP thread panicked".to_string())?
}
