//! Just enough WBXML for ActiveSync Ping (MS-ASWBXML code page 13): the
//! request with its HeartbeatInterval, and the response with its Status.
//! Written apart from the monitor's reader (`monitor_core::ping::wbxml`) on
//! purpose: the lab's devices are a second implementation, so a misreading
//! of the spec in one shows up as a disagreement instead of hiding in both.

const HEADER: [u8; 4] = [0x03, 0x01, 0x6a, 0x00]; // WBXML 1.3, public id 1, UTF-8, no string table
const SWITCH_PAGE: u8 = 0x00;
const END: u8 = 0x01;
const STR_I: u8 = 0x03;
const PAGE_PING: u8 = 13;
const CONTENT: u8 = 0x40;
const PING: u8 = 0x05;
const STATUS: u8 = 0x07;
const HEARTBEAT_INTERVAL: u8 = 0x08;
const FOLDERS: u8 = 0x09;
const FOLDER: u8 = 0x0a;
const ID: u8 = 0x0b;
const CLASS: u8 = 0x0c;

fn string(out: &mut Vec<u8>, tag: u8, s: &str) {
    out.extend_from_slice(&[tag | CONTENT, STR_I]);
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(&[0x00, END]);
}

/// `<Ping><HeartbeatInterval>h</HeartbeatInterval><Folders><Folder><Id>1</Id><Class>Email</Class></Folder></Folders></Ping>`
pub fn ping_request(heartbeat_s: u32) -> Vec<u8> {
    let mut b = HEADER.to_vec();
    b.extend_from_slice(&[SWITCH_PAGE, PAGE_PING, PING | CONTENT]);
    string(&mut b, HEARTBEAT_INTERVAL, &heartbeat_s.to_string());
    b.extend_from_slice(&[FOLDERS | CONTENT, FOLDER | CONTENT]);
    string(&mut b, ID, "1");
    string(&mut b, CLASS, "Email");
    b.extend_from_slice(&[END, END, END]);
    b
}

/// `<Ping><Status>s</Status></Ping>`: 1 no change, 2 changes.
pub fn ping_response(status: u8) -> Vec<u8> {
    let mut b = HEADER.to_vec();
    b.extend_from_slice(&[SWITCH_PAGE, PAGE_PING, PING | CONTENT]);
    string(&mut b, STATUS, &status.to_string());
    b.push(END);
    b
}

fn inline_string_after(body: &[u8], tag: u8) -> Option<&str> {
    let start = body.windows(2).position(|w| w == [tag | CONTENT, STR_I])? + 2;
    let len = body[start..].iter().position(|&c| c == 0)?;
    std::str::from_utf8(&body[start..start + len]).ok()
}

pub fn heartbeat_of(body: &[u8]) -> Option<u32> {
    inline_string_after(body, HEARTBEAT_INTERVAL)?.parse().ok()
}

pub fn status_of(body: &[u8]) -> Option<u8> {
    inline_string_after(body, STATUS)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_round_trips_heartbeat_and_status() {
        assert_eq!(heartbeat_of(&ping_request(480)), Some(480));
        assert_eq!(status_of(&ping_response(2)), Some(2));
        assert_eq!(heartbeat_of(&ping_response(1)), None);
    }
}
