//! An ActiveSync HTTP request as the server sees it behind a TLS-terminating
//! load balancer: the request line (command from the plain query,
//! MS-ASHTTP 2.2.1.1.1.2, or the base64 query, 2.2.1.1.1.1), the
//! Content-Length, and where the body starts.

use base64::Engine as _;

/// MS-ASHTTP 2.2.1.1.1.1.2: the Ping command's code in the base64 form.
pub const PING_COMMAND_CODE: u8 = 18;
/// Longest request head read (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryForm {
    Plain,
    Base64,
}

/// What a request head says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The ActiveSync command (`Ping`, `Sync`, ...; for an unknown base64
    /// code, its number).
    pub command: String,
    pub form: QueryForm,
    /// DeviceId (the base64 form's binary ids are shown in hex).
    pub device_id: Option<String>,
    pub content_length: Option<usize>,
    /// Offset of the body in the bytes read.
    pub body_offset: usize,
}

impl Head {
    pub fn is_ping(&self) -> bool {
        self.command.eq_ignore_ascii_case("Ping")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("reading an HTTP request: {0}")]
    NotHttp(httparse::Error),
    #[error(
        "reading an HTTP request: not an ActiveSync request (no /Microsoft-Server-ActiveSync)"
    )]
    NotActiveSync,
    #[error("reading an ActiveSync request: no command in the query")]
    NoCommand,
    #[error("reading an ActiveSync request: base64 query: {0}")]
    Base64(&'static str),
    #[error("reading an HTTP request: bad Content-Length")]
    ContentLength,
    #[error("reading an HTTP request: head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("reading an HTTP request: a method longer than {MAX_METHOD} letters")]
    MethodTooLong,
}

/// Longest method taken for one (ActiveSync uses POST, OPTIONS and GET): a
/// longer run of capitals is refused before its head could complete.
const MAX_METHOD: usize = 16;

/// Headers read at most (ActiveSync clients send about a dozen).
const MAX_HEADERS: usize = 64;

/// `Ok(None)`: the head is not complete yet. httparse reads the head; it
/// fails at the first byte no HTTP/1 request can have, so a TLS record or
/// garbage is refused at once, whole or cut.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, RequestError> {
    if buf.iter().take_while(|c| c.is_ascii_uppercase()).count() > MAX_METHOD {
        return Err(RequestError::MethodTooLong);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(buf).map_err(RequestError::NotHttp)?;
    let httparse::Status::Complete(body_offset) = status else {
        if buf.len() > MAX_HEAD {
            return Err(RequestError::HeadTooLong);
        }
        // The request line is whole: refuse what is not ActiveSync early.
        if let (Some(target), Some(_)) = (req.path, req.version) {
            request_target(target)?;
        }
        return Ok(None);
    };
    let (command, form, device_id) = request_target(req.path.unwrap_or(""))?;
    let content_length = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or(RequestError::ContentLength)
        })
        .transpose()?;
    Ok(Some(Head {
        command,
        form,
        device_id,
        content_length,
        body_offset,
    }))
}

/// The command, query form and device of a request target.
fn request_target(target: &str) -> Result<(String, QueryForm, Option<String>), RequestError> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path
        .to_ascii_lowercase()
        .ends_with("/microsoft-server-activesync")
    {
        return Err(RequestError::NotActiveSync);
    }
    // The plain form has `Cmd=`; the base64 form is one token (which may end in `=` padding).
    let plain = query.split('&').any(|kv| {
        kv.split_once('=')
            .is_some_and(|(k, _)| k.eq_ignore_ascii_case("Cmd"))
    });
    if plain || query.contains('&') {
        let mut command = None;
        let mut device = None;
        for kv in query.split('&') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            if k.eq_ignore_ascii_case("Cmd") {
                command = Some(v.to_string());
            } else if k.eq_ignore_ascii_case("DeviceId") {
                device = Some(v.to_string());
            }
        }
        let command = command.ok_or(RequestError::NoCommand)?;
        return Ok((command, QueryForm::Plain, device));
    }
    if query.is_empty() {
        return Err(RequestError::NoCommand);
    }
    let (code, device) = base64_query(query)?;
    Ok((command_name(code), QueryForm::Base64, device))
}

/// Undo URL escaping of the base64 alphabet (`%2B`, `%2F`, `%3D`).
fn unescape(q: &str) -> String {
    q.replace("%2B", "+")
        .replace("%2b", "+")
        .replace("%2F", "/")
        .replace("%2f", "/")
        .replace("%3D", "=")
        .replace("%3d", "=")
}

/// The command code and DeviceId of a base64-encoded query value.
pub fn base64_query(q: &str) -> Result<(u8, Option<String>), RequestError> {
    let q = unescape(q);
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let b = engine
        .decode(q.as_bytes())
        .map_err(|_| RequestError::Base64("not base64"))?;
    // Protocol version, command code, locale (2), device id length.
    if b.len() < 5 {
        return Err(RequestError::Base64("shorter than its fixed fields"));
    }
    let code = b[1];
    let id_len = b[4] as usize;
    let id = b
        .get(5..5 + id_len)
        .ok_or(RequestError::Base64("device id runs past the end"))?;
    if id_len == 0 {
        return Err(RequestError::Base64("empty device id"));
    }
    let device = if id.iter().all(|c| c.is_ascii_graphic()) {
        String::from_utf8_lossy(id).into_owned()
    } else {
        id.iter().map(|c| format!("{c:02x}")).collect()
    };
    Ok((code, Some(device)))
}

/// MS-ASHTTP 2.2.1.1.1.1.2.
fn command_name(code: u8) -> String {
    let name = match code {
        0 => "Sync",
        1 => "SendMail",
        2 => "SmartForward",
        3 => "SmartReply",
        4 => "GetAttachment",
        9 => "FolderSync",
        10 => "FolderCreate",
        11 => "FolderDelete",
        12 => "FolderUpdate",
        13 => "MoveItems",
        14 => "GetItemEstimate",
        15 => "MeetingResponse",
        16 => "Search",
        17 => "Settings",
        PING_COMMAND_CODE => "Ping",
        19 => "ItemOperations",
        20 => "Provision",
        21 => "ResolveRecipients",
        22 => "ValidateCert",
        n => return format!("command {n}"),
    };
    name.to_string()
}

/// Build a base64 query value (for tests and the lab's devices).
pub fn encode_base64_query(code: u8, device_id: &str, device_type: &str) -> String {
    let mut b = vec![141, code, 0x09, 0x04, device_id.len() as u8];
    b.extend_from_slice(device_id.as_bytes());
    b.push(0); // no policy key
    b.push(device_type.len() as u8);
    b.extend_from_slice(device_type.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Head {
        parse_head(s.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn plain_query_ping_is_read_with_device_and_body_offset() {
        let h = head("POST /Microsoft-Server-ActiveSync?User=jdoe&DeviceId=ABC123&DeviceType=iPhone&Cmd=Ping HTTP/1.1\r\nHost: mail\r\ncontent-length: 13\r\n\r\nBODY");
        assert!(h.is_ping());
        assert_eq!(h.form, QueryForm::Plain);
        assert_eq!(h.device_id.as_deref(), Some("ABC123"));
        assert_eq!(h.content_length, Some(13));
        assert_eq!(
            &"POST /Microsoft-Server-ActiveSync?User=jdoe&DeviceId=ABC123&DeviceType=iPhone&Cmd=Ping HTTP/1.1\r\nHost: mail\r\ncontent-length: 13\r\n\r\nBODY"[h.body_offset..],
            "BODY"
        );
        assert!(
            !head("POST /Microsoft-Server-ActiveSync?Cmd=Sync&DeviceId=A HTTP/1.1\r\n\r\n")
                .is_ping()
        );
    }

    #[test]
    fn the_specs_base64_example_is_a_sync_from_v140device() {
        // MS-ASHTTP 2.2.1.1.1.1: protocol 140, command 0 (Sync), locale 0x0409.
        let h = head("POST /Microsoft-Server-ActiveSync?jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l HTTP/1.1\r\n\r\n");
        assert_eq!(h.form, QueryForm::Base64);
        assert_eq!(h.command, "Sync");
        assert_eq!(h.device_id.as_deref(), Some("v140Device"));
    }

    #[test]
    fn base64_ping_is_read_escaped_or_not() {
        let q = encode_base64_query(PING_COMMAND_CODE, "Dev?>>1", "Android");
        assert_eq!(
            base64_query(&q),
            Ok((PING_COMMAND_CODE, Some("Dev?>>1".into())))
        );
        let escaped = q
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D");
        let h = head(&format!(
            "POST /Microsoft-Server-ActiveSync?{escaped} HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(h.is_ping());
        assert_eq!(h.content_length, Some(0));
    }

    #[test]
    fn an_incomplete_head_asks_for_more_and_garbage_fails_early() {
        assert_eq!(parse_head(b"POS"), Ok(None));
        assert_eq!(
            parse_head(b"POST /Microsoft-Server-ActiveSync?Cmd=Ping HTTP/1.1\r\nHost"),
            Ok(None)
        );
        assert!(parse_head(b"\x16\x03\x01\x02\x00").is_err(), "a TLS record");
        assert!(parse_head(b"GET /index.html HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"POST /Microsoft-Server-ActiveSync?!!!! HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(b"POST /Microsoft-Server-ActiveSync?AAAA HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_head(
            b"POST /Microsoft-Server-ActiveSync?Cmd=Ping HTTP/1.1\r\nContent-Length: x\r\n\r\n"
        )
        .is_err());
        assert!(parse_head(&[b'A'; MAX_HEAD + 10]).is_err());
        assert_eq!(parse_head(&[b'A'; 40]), Err(RequestError::MethodTooLong));
    }
}
