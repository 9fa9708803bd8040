//! The exact heartbeat, where it is readable: ActiveSync Ping requests on
//! plaintext ports (behind a TLS-terminating load balancer). The kernel
//! copies the first bytes of the first segments of each client request
//! ([`monitor_common::Sample`]); this module puts a request back together
//! from them and reads its command and HeartbeatInterval.

pub mod request;
pub mod wbxml;

use std::collections::HashMap;

use monitor_common::{flow::seq_after, FlowKey};
use serde::Serialize;

pub use request::{QueryForm, RequestError};

/// What a Ping says of the heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Heartbeat {
    /// HeartbeatInterval, in seconds.
    Stated(u32),
    /// No HeartbeatInterval (an empty Ping): the server keeps the device's last one.
    Unstated,
    /// The body was not captured whole or did not parse.
    Unreadable,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PingRequest {
    pub device_id: Option<String>,
    pub base64_query: bool,
    pub heartbeat: Heartbeat,
}

/// What one client request on a plaintext port turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ping(PingRequest),
    /// Another ActiveSync command (Sync, FolderSync...).
    Other(String),
    /// Not readable as an ActiveSync request (not HTTP, cut, garbled).
    Unreadable(String),
}

/// Requests followed at once; beyond it new ones are counted, not read.
pub const MAX_PARTIALS: usize = 65_536;
/// A request not completed within this long is abandoned.
const PARTIAL_TTL_NS: u64 = 120_000_000_000;

#[derive(Debug)]
enum State {
    /// Bytes of a request so far; `cut`: a segment was longer than its copy.
    Reading { buf: Vec<u8>, cut: bool, ping: bool },
    /// A request was read; segments before `next_seq` belong to it.
    Done,
}

#[derive(Debug)]
struct Partial {
    state: State,
    /// Sequence number of the request's first byte.
    start_seq: u32,
    next_seq: u32,
    last_ns: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReaderStats {
    pub pings: u64,
    pub other_commands: u64,
    pub unreadable: u64,
    /// Requests not followed because [`MAX_PARTIALS`] were in progress.
    pub not_followed: u64,
}

/// Reassembles requests from samples, per flow.
#[derive(Debug, Default)]
pub struct Reader {
    flows: HashMap<FlowKey, Partial>,
    pub stats: ReaderStats,
}

impl Reader {
    pub fn new() -> Self {
        Self::default()
    }

    /// One sample: `data` is the first bytes (possibly all) of a segment of
    /// `payload_len` bytes starting at sequence number `seq`.
    pub fn sample(
        &mut self,
        key: &FlowKey,
        ts_ns: u64,
        seq: u32,
        payload_len: u32,
        data: &[u8],
    ) -> Vec<Outcome> {
        let mut out = Vec::new();
        let end = seq.wrapping_add(payload_len);
        let cut = (data.len() as u32) < payload_len;
        let continues = match self.flows.get_mut(key) {
            Some(p) if !seq_after(end, p.next_seq) => return out, // already seen
            Some(p)
                if seq == p.next_seq && matches!(p.state, State::Reading { cut: false, .. }) =>
            {
                if let State::Reading { buf, cut: c, .. } = &mut p.state {
                    buf.extend_from_slice(data);
                    *c = cut;
                }
                p.next_seq = end;
                p.last_ns = ts_ns;
                true
            }
            Some(p) if matches!(p.state, State::Done) && seq_after(p.next_seq, seq) => return out,
            _ => false,
        };
        if !continues {
            // A new request; one still being read was left incomplete.
            if let Some(old) = self.flows.remove(key) {
                if let State::Reading { ping, .. } = old.state {
                    out.push(self.abandon(ping, "its later segments were not sampled"));
                }
            }
            if self.flows.len() >= MAX_PARTIALS {
                self.stats.not_followed += 1;
                return out;
            }
            self.flows.insert(
                *key,
                Partial {
                    state: State::Reading {
                        buf: data.to_vec(),
                        cut,
                        ping: false,
                    },
                    start_seq: seq,
                    next_seq: end,
                    last_ns: ts_ns,
                },
            );
        }
        if let Some(o) = self.evaluate(key) {
            out.push(o);
        }
        out
    }

    fn abandon(&mut self, ping: bool, why: &str) -> Outcome {
        if ping {
            self.stats.pings += 1;
            Outcome::Ping(PingRequest {
                device_id: None,
                base64_query: false,
                heartbeat: Heartbeat::Unreadable,
            })
        } else {
            self.stats.unreadable += 1;
            Outcome::Unreadable(why.to_string())
        }
    }

    /// Read what the flow's request holds so far.
    fn evaluate(&mut self, key: &FlowKey) -> Option<Outcome> {
        let p = self.flows.get_mut(key)?;
        let State::Reading { buf, cut, ping } = &mut p.state else {
            return None;
        };
        let cut = *cut;
        let mut request_end = None;
        let outcome = match request::parse_head(buf) {
            Err(e) => {
                self.stats.unreadable += 1;
                Outcome::Unreadable(e.to_string())
            }
            Ok(None) if cut => {
                self.stats.unreadable += 1;
                Outcome::Unreadable("the request head is longer than the bytes copied".into())
            }
            Ok(None) => return None,
            Ok(Some(head)) if !head.is_ping() => {
                request_end = Some(head.body_offset + head.content_length.unwrap_or(0));
                self.stats.other_commands += 1;
                Outcome::Other(head.command)
            }
            Ok(Some(head)) => {
                *ping = true;
                let body_len = head.content_length.unwrap_or(0);
                request_end = Some(head.body_offset + body_len);
                let have = buf.len() - head.body_offset;
                let heartbeat = if body_len == 0 {
                    Heartbeat::Unstated
                } else if have >= body_len {
                    let body = &buf[head.body_offset..head.body_offset + body_len];
                    match wbxml::heartbeat_interval(body) {
                        Ok(Some(h)) => Heartbeat::Stated(h),
                        Ok(None) => Heartbeat::Unstated,
                        Err(_) => Heartbeat::Unreadable,
                    }
                } else if cut {
                    Heartbeat::Unreadable
                } else {
                    return None;
                };
                self.stats.pings += 1;
                Outcome::Ping(PingRequest {
                    device_id: head.device_id,
                    base64_query: head.form == QueryForm::Base64,
                    heartbeat,
                })
            }
        };
        // Later segments of this request are not read again.
        p.state = State::Done;
        if let Some(n) = request_end {
            let end = p.start_seq.wrapping_add(n as u32);
            if seq_after(end, p.next_seq) {
                p.next_seq = end;
            }
        }
        Some(outcome)
    }

    /// The flow ended: forget it.
    pub fn forget(&mut self, key: &FlowKey) {
        self.flows.remove(key);
    }

    /// Drop requests idle too long (their flows went quiet or away).
    pub fn expire(&mut self, now_ns: u64) {
        self.flows
            .retain(|_, p| now_ns.saturating_sub(p.last_ns) < PARTIAL_TTL_NS);
    }

    /// Flows with a request being read.
    pub fn keys(&self) -> impl Iterator<Item = FlowKey> + '_ {
        self.flows.keys().copied()
    }

    pub fn in_progress(&self) -> usize {
        self.flows.len()
    }
}

#[cfg(test)]
mod tests;
