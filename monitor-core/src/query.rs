//! The local query API: newline-delimited JSON over a Unix socket with
//! owner-only permissions. One request line, one response line; `events`
//! with `follow` keeps streaming verdicts, one per line.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::flows::FlowQuery;

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Wire", into = "Wire")]
pub enum Request {
    Status,
    Flows(FlowQuery),
    Report,
    Events {
        follow: bool,
    },
    /// The cure in force (`monitor remedy status`).
    Remedy,
}

/// The request as it travels: strict about unknown fields (serde cannot be
/// strict on the unit variants of a tagged enum).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    cmd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    follow: Option<bool>,
    /// With `flows`: filters, order, limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    query: Option<FlowQuery>,
}

/// Why a request line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error("bad request: {0}")]
    Syntax(String),
    #[error("unknown cmd {0:?} (status, flows, report, events, remedy)")]
    UnknownCmd(String),
    #[error("cmd {cmd:?} takes no {field:?}")]
    Field { cmd: String, field: &'static str },
}

impl TryFrom<Wire> for Request {
    type Error = RequestError;
    fn try_from(w: Wire) -> Result<Self, RequestError> {
        let r = match w.cmd.as_str() {
            "status" => Request::Status,
            "flows" => Request::Flows(w.query.clone().unwrap_or_default()),
            "report" => Request::Report,
            "remedy" => Request::Remedy,
            "events" => Request::Events {
                follow: w.follow.unwrap_or(false),
            },
            other => return Err(RequestError::UnknownCmd(other.to_string())),
        };
        let stray = |field| RequestError::Field {
            cmd: w.cmd.clone(),
            field,
        };
        if w.follow.is_some() && !matches!(r, Request::Events { .. }) {
            return Err(stray("follow"));
        }
        if w.query.is_some() && !matches!(r, Request::Flows(_)) {
            return Err(stray("query"));
        }
        Ok(r)
    }
}

impl From<Request> for Wire {
    fn from(r: Request) -> Wire {
        let (cmd, follow, query) = match r {
            Request::Status => ("status", None, None),
            Request::Flows(q) => ("flows", None, Some(q)),
            Request::Report => ("report", None, None),
            Request::Remedy => ("remedy", None, None),
            Request::Events { follow } => ("events", Some(follow), None),
        };
        Wire {
            cmd: cmd.to_string(),
            follow,
            query,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response<T> {
    Ok(T),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "no agent is running: nothing listens on {path} ({source}); start one with `monitor run`"
    )]
    NoAgent {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's answer did not parse: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the agent refused the request: {0}")]
    Refused(String),
    #[error("the agent closed the connection without an answer")]
    NoAnswer,
}

/// Parse one request line, with errors that say what was wrong.
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLong);
    }
    // serde wraps our TryFrom error in its own message: keep it as text.
    serde_json::from_str(line.trim()).map_err(|e| RequestError::Syntax(e.to_string()))
}

pub struct Client {
    stream: BufReader<UnixStream>,
    path: String,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, QueryError> {
        let p = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| QueryError::NoAgent {
            path: p.clone(),
            source,
        })?;
        Ok(Client {
            stream: BufReader::new(stream),
            path: p,
        })
    }

    fn io(&self, source: std::io::Error) -> QueryError {
        QueryError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub fn send(&mut self, req: &Request) -> Result<(), QueryError> {
        let mut line = serde_json::to_string(req)?;
        line.push('\n');
        let s = self.stream.get_mut();
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| self.io(e))?;
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| self.io(e))
    }

    /// Read one response line; `None` at end of stream.
    pub fn read_line(&mut self) -> Result<Option<serde_json::Value>, QueryError> {
        let mut line = String::new();
        let n = self.stream.read_line(&mut line).map_err(|e| self.io(e))?;
        if n == 0 {
            return Ok(None);
        }
        let resp: Response<serde_json::Value> = serde_json::from_str(&line)?;
        match resp {
            Response::Ok(v) => Ok(Some(v)),
            Response::Error(e) => Err(QueryError::Refused(e)),
        }
    }

    /// One request, one answer.
    pub fn call(path: &Path, req: &Request) -> Result<serde_json::Value, QueryError> {
        let mut c = Client::connect(path)?;
        c.stream
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| c.io(e))?;
        c.send(req)?;
        c.read_line()?.ok_or(QueryError::NoAnswer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_say_why() {
        assert_eq!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(r#"{"cmd":"events","follow":true}"#),
            Ok(Request::Events { follow: true })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"events"}"#),
            Ok(Request::Events { follow: false })
        );
        let err = |l: &str| parse_request(l).unwrap_err().to_string();
        assert!(err(r#"{"cmd":"reboot"}"#).contains("reboot"));
        assert!(err("not json").starts_with("bad request"));
        assert!(err(r#"{"cmd":"status","x":1}"#).contains('x'));
        assert!(err(r#"{"cmd":"status","query":{}}"#).contains("query"));
        let long = format!(r#"{{"cmd":"status","pad":"{}"}}"#, "a".repeat(5000));
        assert_eq!(parse_request(&long), Err(RequestError::TooLong));
        let q = r#"{"cmd":"flows","query":{"sort":"bytes","limit":5}}"#;
        let Ok(Request::Flows(q)) = parse_request(q) else {
            panic!("a flows query parses")
        };
        assert_eq!((q.sort, q.limit), (crate::flows::FlowSort::Bytes, 5));
    }

    #[test]
    fn connecting_without_an_agent_says_so() {
        let e = Client::connect(Path::new("/nonexistent/monitor.sock"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("no agent is running"), "{e}");
    }
}
