//! How a flow ended, and the evidence for it.

use std::{fmt, net::SocketAddr};

use serde::{Deserialize, Serialize};

/// How a flow ended. The four "kills" are the middlebox's doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// FIN, client first.
    ClientFin = 0,
    /// FIN, server first.
    ServerFin = 1,
    /// RST with the client's own TTL.
    ClientReset = 2,
    /// RST from the server.
    ServerReset = 3,
    /// RST whose TTL is off the client's baseline, after a silence: a
    /// middlebox resetting at expiry.
    InjectedReset = 4,
    /// RST right after the server's first send following a silence: a
    /// middlebox that forgot the flow answers its next packet.
    ResetOnNextPacket = 5,
    /// The server retransmits after a silence and nobody answers.
    BlackHole = 6,
    /// The client side (a full proxy) closes while the server still owes an
    /// answer, after a silence: the proxy's idle timeout.
    ProxyTimeout = 7,
    /// The flow left the table without a close (evicted, expired).
    Vanished = 8,
    /// An upstream leg (this host the client, a reverse proxy's connection
    /// to Exchange): this host closed it after a silence while the server
    /// owed an answer. The proxy on this host gave up: its own timeout.
    UpstreamTimeout = 9,
    /// A client-facing flow on a proxy host: this host answered the
    /// device's waiting request when its upstream leg timed out (an error
    /// such as nginx's 504), or closed the flow while the device waited.
    LocalProxyTimeout = 10,
}

impl Ending {
    pub const COUNT: usize = 11;
    pub const ALL: [Ending; Ending::COUNT] = [
        Ending::ClientFin,
        Ending::ServerFin,
        Ending::ClientReset,
        Ending::ServerReset,
        Ending::InjectedReset,
        Ending::ResetOnNextPacket,
        Ending::BlackHole,
        Ending::ProxyTimeout,
        Ending::Vanished,
        Ending::UpstreamTimeout,
        Ending::LocalProxyTimeout,
    ];
    pub const KILLS: [Ending; 6] = [
        Ending::InjectedReset,
        Ending::ResetOnNextPacket,
        Ending::BlackHole,
        Ending::ProxyTimeout,
        Ending::UpstreamTimeout,
        Ending::LocalProxyTimeout,
    ];

    pub fn is_kill(self) -> bool {
        Ending::KILLS.contains(&self)
    }

    /// The kill happens when the timer expires, so its silence is the timeout.
    pub fn kills_at_expiry(self) -> bool {
        matches!(
            self,
            Ending::InjectedReset
                | Ending::ProxyTimeout
                | Ending::UpstreamTimeout
                | Ending::LocalProxyTimeout
        )
    }

    /// This host's own proxy timed out: no box on a path to name, a
    /// setting on this host to change.
    pub fn is_local(self) -> bool {
        matches!(self, Ending::UpstreamTimeout | Ending::LocalProxyTimeout)
    }

    /// Stable label for metrics and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Ending::ClientFin => "client_fin",
            Ending::ServerFin => "server_fin",
            Ending::ClientReset => "client_reset",
            Ending::ServerReset => "server_reset",
            Ending::InjectedReset => "injected_reset",
            Ending::ResetOnNextPacket => "reset_on_next_packet",
            Ending::BlackHole => "black_hole",
            Ending::ProxyTimeout => "proxy_timeout",
            Ending::Vanished => "vanished",
            Ending::UpstreamTimeout => "upstream_timeout",
            Ending::LocalProxyTimeout => "local_proxy_timeout",
        }
    }

    /// In plain words, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Ending::ClientFin => "closed normally by the client",
            Ending::ServerFin => "closed normally by the server",
            Ending::ClientReset => "reset by the client itself",
            Ending::ServerReset => "reset by the server",
            Ending::InjectedReset => "reset injected by a middlebox at its idle timeout",
            Ending::ResetOnNextPacket => {
                "forgotten silently, reset when the server answered (RST on the next packet)"
            }
            Ending::BlackHole => "forgotten silently, the server's answer vanished (black hole)",
            Ending::ProxyTimeout => {
                "closed by a proxy at its idle timeout while the server owed an answer"
            }
            Ending::Vanished => "left the flow table without a close",
            Ending::UpstreamTimeout => {
                "given up by this host's proxy while the upstream server owed an answer (the proxy's own timeout)"
            }
            Ending::LocalProxyTimeout => {
                "answered with an error or closed by this host's proxy at its timeout while the device waited"
            }
        }
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Where the box that sent a reset sits, from its TTL against the client's
/// (only the timing says whether it was a kill; the TTL only says where).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxLocation {
    /// A TTL off the client's: a box between the client and the server
    /// (nearer the server than the client, or a stack of its own).
    OnThePath,
    /// The client's own TTL: a carrier NAT, the client's own router, or the
    /// device itself lost the connection's state.
    AtOrNextToClient,
}

impl BoxLocation {
    pub fn describe(self) -> &'static str {
        match self {
            BoxLocation::OnThePath => "on the path (its RSTs' TTL is not the client's)",
            BoxLocation::AtOrNextToClient => {
                "at or next to the client (its RSTs carry the client's TTL): a carrier NAT, the client's own router, or the device lost its state"
            }
        }
    }
}

/// One observation about a client-side RST that tells a forged one from the
/// client's own (Weaver, Sommer, Paxson, NDSS 2009; Cloudflare, SIGCOMM
/// 2023). Each verdict lists those that were present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// The TTL is off the client's baseline by more than the tolerance.
    ForeignTtl,
    /// The TTL is within the client's baseline: the TTL cannot tell.
    ClientTtl,
    /// No client TTL baseline to compare with.
    NoTtlBaseline,
    /// It came within the next-packet window after the server's first send
    /// following a silence: state was forgotten before that send.
    NextPacketTiming,
    /// It came after a silence with nothing sent since: a timer expired.
    AfterSilence,
    /// IPv4 ID 0 where the client's packets carry IDs.
    IpIdZero,
    /// IPv4 ID far from the client's last one.
    IpIdOffPattern,
    /// TCP window different from the client's last one.
    WindowOffClient,
    /// RST without ACK (a stack resetting its own established connection
    /// acknowledges; a box answering a packet need not).
    RstWithoutAck,
    /// The silence was shorter than the heartbeat in force: the client had
    /// no reason to give up.
    BeforeHeartbeat,
    /// The client's request was unanswered: it was waiting, not leaving.
    AnswerOwed,
    /// Its sequence number is not the client's next one: the client's own
    /// stack resets at its next number, and so does a box that tracks it or
    /// answers the server's segment (whose ack is that number). A number
    /// behind it races the client's data (an injector's guess).
    SeqOffClient,
    /// It acknowledges bytes the server never sent: no client can.
    AckAheadOfServer,
    /// The ACK flag with acknowledgment number 0.
    AckZero,
    /// A second RST followed within 100 ms with another sequence number: an
    /// injector's spray (a client's stack repeats its number).
    RstBurst,
    /// What the box forgot before was the server's keepalive probe, sent
    /// at a chosen age of the silence (sounding, or any keepalive).
    KeepaliveProbe,
}

impl Signal {
    pub fn label(self) -> &'static str {
        match self {
            Signal::ForeignTtl => "foreign_ttl",
            Signal::ClientTtl => "client_ttl",
            Signal::NoTtlBaseline => "no_ttl_baseline",
            Signal::NextPacketTiming => "next_packet_timing",
            Signal::AfterSilence => "after_silence",
            Signal::IpIdZero => "ip_id_zero",
            Signal::IpIdOffPattern => "ip_id_off_pattern",
            Signal::WindowOffClient => "window_off_client",
            Signal::RstWithoutAck => "rst_without_ack",
            Signal::BeforeHeartbeat => "before_heartbeat",
            Signal::SeqOffClient => "seq_off_client",
            Signal::AckAheadOfServer => "ack_ahead_of_server",
            Signal::AckZero => "ack_zero",
            Signal::RstBurst => "rst_burst",
            Signal::AnswerOwed => "answer_owed",
            Signal::KeepaliveProbe => "keepalive_probe",
        }
    }
}

/// Why a verdict was reached: the numbers behind it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The silence the middlebox timed out on (seconds).
    pub silence_seconds: f64,
    /// The RST's TTL / hop limit, and the client's baseline.
    pub rst_ttl: Option<u8>,
    pub client_ttl_min: Option<u8>,
    pub client_ttl_max: Option<u8>,
    pub rst_ip_id: Option<u16>,
    pub client_ip_id: Option<u16>,
    pub rst_window: Option<u16>,
    pub client_window: Option<u16>,
    /// How long after the server's last send the closing packet came (seconds).
    pub after_server_send_seconds: Option<f64>,
    /// The server still owed an answer to a client request.
    pub server_owed_answer: bool,
    /// Where the box that reset sits (resets only, when a TTL baseline exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<BoxLocation>,
    /// The observations that decided a client-side RST's class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<Signal>,
    /// The next-packet window used for this flow (seconds): from its RTT
    /// where measured, else the configured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_packet_window_seconds: Option<f64>,
    pub note: Option<std::borrow::Cow<'static, str>>,
}

/// How the heartbeat in force was known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeartbeatSource {
    /// Read from the device's Ping request (plaintext port): exact.
    Ping,
    /// Inferred from how long the server held the device's requests.
    HoldTimes,
}

/// The detector's word on one ended flow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub path: String,
    pub ending: Ending,
    /// Killed before the heartbeat in force: the device's Ping failed.
    pub premature: bool,
    /// The heartbeat in force for this flow, if known (seconds).
    pub heartbeat_seconds: Option<f64>,
    /// Where that heartbeat came from.
    pub heartbeat_source: Option<HeartbeatSource>,
    /// Events of this flow were lost (ring buffer full): the verdict rests on
    /// part of the story and is kept out of estimates.
    pub incomplete: bool,
    /// Kernel clock (CLOCK_MONOTONIC) ns of the ending.
    pub at_ns: u64,
    pub flow_age_seconds: f64,
    pub evidence: Evidence,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {} after {:.1}s of silence",
            self.client, self.server, self.ending, self.evidence.silence_seconds
        )?;
        if self.premature {
            f.write_str(" (premature")?;
            if let Some(h) = self.heartbeat_seconds {
                write!(f, ": heartbeat {h:.0}s")?;
                if self.heartbeat_source == Some(HeartbeatSource::Ping) {
                    f.write_str(" read from its Ping")?;
                }
            }
            f.write_str(")")?;
        }
        if self.incomplete {
            f.write_str(" [incomplete: events were lost]")?;
        }
        if let (Some(t), Some(lo), Some(hi)) = (
            self.evidence.rst_ttl,
            self.evidence.client_ttl_min,
            self.evidence.client_ttl_max,
        ) {
            write!(f, " rst ttl {t} vs client {lo}..{hi}")?;
        }
        match self.evidence.location {
            Some(BoxLocation::OnThePath) => f.write_str(" (box on the path)")?,
            Some(BoxLocation::AtOrNextToClient) => {
                f.write_str(" (box at or next to the client)")?
            }
            None => {}
        }
        Ok(())
    }
}
