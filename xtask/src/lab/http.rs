//! Minimal HTTP/1.1 framing for the lab's Ping exchange (Content-Length bodies).

use std::io::{self, Read, Write};

/// Longest header block accepted.
const MAX_HEADER: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

pub struct Message {
    pub start_line: String,
    pub body: Vec<u8>,
}

/// Read one message; `Ok(None)` on a clean end of stream before it starts.
pub fn read_message<S: Read>(s: &mut S) -> io::Result<Option<Message>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte)? {
            0 if head.is_empty() => return Ok(None),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "end of stream inside headers",
                ))
            }
            _ => head.push(byte[0]),
        }
        if head.len() > MAX_HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "headers too long",
            ));
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let start_line = lines.next().unwrap_or_default().to_string();
    let mut len = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length")
                })?;
            }
        }
    }
    if len > MAX_BODY {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "body too long"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(Some(Message { start_line, body }))
}

/// The base64 query value (MS-ASHTTP 2.2.1.1.1.1): protocol 14.1, command
/// Ping (18), locale en-US, DeviceId, no policy key, DeviceType. Apart from
/// the monitor's decoder on purpose (see `wbxml`).
fn base64_query(device: &str) -> String {
    use base64::Engine as _;
    let mut b = vec![141, 18, 0x09, 0x04, device.len() as u8];
    b.extend_from_slice(device.as_bytes());
    b.extend_from_slice(&[0, 3]);
    b.extend_from_slice(b"Lab");
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A Ping request; head and body in two writes (two segments on a plain
/// socket, as many clients send them).
pub fn write_ping_request<S: Write + ?Sized>(
    s: &mut S,
    user: &str,
    base64_form: bool,
    body: &[u8],
) -> io::Result<()> {
    let query = if base64_form {
        base64_query(user)
    } else {
        format!("Cmd=Ping&User={user}&DeviceId={user}&DeviceType=Lab")
    };
    let head = format!(
        "POST /Microsoft-Server-ActiveSync?{query} HTTP/1.1\r\n\
         Host: {}\r\nMS-ASProtocolVersion: 14.1\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n\
         Content-Length: {}\r\n\r\n",
        super::tls::SERVER_NAME,
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

pub fn write_response<S: Write>(s: &mut S, body: &[u8]) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}
