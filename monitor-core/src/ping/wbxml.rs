//! The HeartbeatInterval of an ActiveSync Ping body: WBXML 1.3
//! (MS-ASWBXML), code page 13 (Ping). A token walk, bounded and total: any
//! byte string gives an answer or an error, never a panic.

/// Global tokens (WBXML 1.3 section 7.1).
const SWITCH_PAGE: u8 = 0x00;
const END: u8 = 0x01;
const ENTITY: u8 = 0x02;
const STR_I: u8 = 0x03;
const LITERAL: u8 = 0x04;
const EXT_I_0: u8 = 0x40;
const EXT_I_2: u8 = 0x42;
const PI: u8 = 0x43;
const LITERAL_C: u8 = 0x44;
const EXT_T_0: u8 = 0x80;
const EXT_T_2: u8 = 0x82;
const STR_T: u8 = 0x83;
const LITERAL_A: u8 = 0x84;
const EXT_0: u8 = 0xc0;
const EXT_2: u8 = 0xc2;
const OPAQUE: u8 = 0xc3;
const LITERAL_AC: u8 = 0xc4;

const CONTENT: u8 = 0x40;
const ATTRIBUTES: u8 = 0x80;

/// MS-ASWBXML code page 13 (Ping).
pub const PAGE_PING: u8 = 13;
pub const TAG_PING: u8 = 0x05;
pub const TAG_HEARTBEAT_INTERVAL: u8 = 0x08;

/// Why a body gave no heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WbxmlError {
    #[error("reading a WBXML Ping body: it ends early")]
    Truncated,
    #[error("reading a WBXML Ping body: unsupported WBXML version {0:#04x}")]
    Version(u8),
    #[error("reading a WBXML Ping body: the root element is not Ping (code page 13)")]
    NotPing,
    #[error("reading a WBXML Ping body: token {0:#04x} is not used by ActiveSync")]
    Token(u8),
    #[error("reading a WBXML Ping body: HeartbeatInterval is not a number of seconds")]
    BadInterval,
    #[error("reading a WBXML Ping body: nested deeper than any Ping")]
    TooDeep,
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Result<u8, WbxmlError> {
        let v = *self.b.get(self.i).ok_or(WbxmlError::Truncated)?;
        self.i += 1;
        Ok(v)
    }

    /// A WBXML multi-byte unsigned integer (at most 5 bytes for 32 bits).
    fn mb_u32(&mut self) -> Result<u32, WbxmlError> {
        let mut v: u32 = 0;
        for _ in 0..5 {
            let b = self.byte()?;
            v = (v << 7) | u32::from(b & 0x7f);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WbxmlError::Truncated)
    }

    fn skip(&mut self, n: u32) -> Result<(), WbxmlError> {
        let end = self
            .i
            .checked_add(n as usize)
            .ok_or(WbxmlError::Truncated)?;
        if end > self.b.len() {
            return Err(WbxmlError::Truncated);
        }
        self.i = end;
        Ok(())
    }

    /// An inline string, up to its terminating NUL.
    fn str_i(&mut self) -> Result<&'a [u8], WbxmlError> {
        let rest = &self.b[self.i..];
        let n = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or(WbxmlError::Truncated)?;
        self.i += n + 1;
        Ok(&rest[..n])
    }
}

/// Text content of the element just opened: inline string or opaque data.
fn text<'a>(c: &mut Cursor<'a>) -> Result<&'a [u8], WbxmlError> {
    match c.byte()? {
        STR_I => c.str_i(),
        OPAQUE => {
            let n = c.mb_u32()?;
            let start = c.i;
            c.skip(n)?;
            Ok(&c.b[start..start + n as usize])
        }
        _ => Err(WbxmlError::BadInterval),
    }
}

/// Deepest nesting walked (a Ping is 4 deep).
const MAX_DEPTH: usize = 16;

/// The HeartbeatInterval (seconds) of a Ping body; `Ok(None)` if the Ping
/// states none (the server then keeps the device's previous one).
pub fn heartbeat_interval(body: &[u8]) -> Result<Option<u32>, WbxmlError> {
    let mut c = Cursor { b: body, i: 0 };
    let version = c.byte()?;
    if !(0x01..=0x03).contains(&version) {
        return Err(WbxmlError::Version(version));
    }
    if c.mb_u32()? == 0 {
        // Public id given as a string table index.
        c.mb_u32()?;
    }
    c.mb_u32()?; // charset
    let table = c.mb_u32()?;
    c.skip(table)?;
    let mut page = 0u8;
    let mut depth = 0usize;
    let mut root_seen = false;
    while c.i < c.b.len() {
        let t = c.byte()?;
        match t {
            SWITCH_PAGE => page = c.byte()?,
            END => {
                depth = depth.saturating_sub(1);
                if depth == 0 && root_seen {
                    return Ok(None);
                }
            }
            STR_I => {
                c.str_i()?;
            }
            OPAQUE => {
                let n = c.mb_u32()?;
                c.skip(n)?;
            }
            ENTITY | EXT_T_0..=EXT_T_2 | STR_T => {
                c.mb_u32()?;
            }
            EXT_I_0..=EXT_I_2 => {
                c.str_i()?;
            }
            EXT_0..=EXT_2 => {}
            LITERAL | PI | LITERAL_C | LITERAL_A | LITERAL_AC => return Err(WbxmlError::Token(t)),
            _ if t & ATTRIBUTES != 0 => return Err(WbxmlError::Token(t)),
            _ => {
                let tag = t & 0x3f;
                if !root_seen {
                    if page != PAGE_PING || tag != TAG_PING {
                        return Err(WbxmlError::NotPing);
                    }
                    root_seen = true;
                }
                if t & CONTENT == 0 {
                    continue;
                }
                if page == PAGE_PING && tag == TAG_HEARTBEAT_INTERVAL {
                    let v = text(&mut c)?;
                    let s = std::str::from_utf8(v).map_err(|_| WbxmlError::BadInterval)?;
                    return s
                        .trim()
                        .parse::<u32>()
                        .map(Some)
                        .map_err(|_| WbxmlError::BadInterval);
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(WbxmlError::TooDeep);
                }
            }
        }
    }
    if root_seen {
        Err(WbxmlError::Truncated)
    } else {
        Err(WbxmlError::NotPing)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A Ping request built token by token from MS-ASWBXML / MS-ASCMD:
    /// `<Ping><HeartbeatInterval>h</HeartbeatInterval><Folders><Folder>
    /// <Id>1</Id><Class>Email</Class></Folder></Folders></Ping>`.
    pub fn ping_body(heartbeat: &str) -> Vec<u8> {
        let mut b = vec![
            0x03,
            0x01,
            0x6a,
            0x00,
            SWITCH_PAGE,
            PAGE_PING,
            0x45,
            0x48,
            STR_I,
        ];
        b.extend_from_slice(heartbeat.as_bytes());
        b.extend_from_slice(&[0x00, END, 0x49, 0x4a, 0x4b, STR_I, b'1', 0, END]);
        b.extend_from_slice(&[0x4c, STR_I]);
        b.extend_from_slice(b"Email\0");
        b.extend_from_slice(&[END, END, END, END]);
        b
    }

    #[test]
    fn heartbeat_interval_is_read_from_a_spec_ping() {
        assert_eq!(heartbeat_interval(&ping_body("480")), Ok(Some(480)));
        assert_eq!(heartbeat_interval(&ping_body("3540")), Ok(Some(3540)));
    }

    #[test]
    fn folders_before_the_interval_and_opaque_text_are_read() {
        // Folders first, then HeartbeatInterval as OPAQUE data.
        let b = [
            0x03, 0x01, 0x6a, 0x00, 0x00, 13, 0x45, 0x49, 0x4a, 0x4b, 0x03, b'7', 0, 0x01, 0x01,
            0x01, 0x48, 0xc3, 0x03, b'9', b'0', b'0', 0x01, 0x01,
        ];
        assert_eq!(heartbeat_interval(&b), Ok(Some(900)));
    }

    #[test]
    fn a_ping_without_interval_states_none() {
        // <Ping><Folders/></Ping>: the server keeps the previous interval.
        let b = [0x03, 0x01, 0x6a, 0x00, 0x00, 13, 0x45, 0x09, 0x01];
        assert_eq!(heartbeat_interval(&b), Ok(None));
    }

    #[test]
    fn other_commands_truncation_and_garbage_are_errors() {
        // FolderSync (code page 7) root.
        let sync = [
            0x03, 0x01, 0x6a, 0x00, 0x00, 7, 0x56, 0x52, 0x03, b'0', 0, 0x01, 0x01,
        ];
        assert_eq!(heartbeat_interval(&sync), Err(WbxmlError::NotPing));
        let full = ping_body("480");
        for cut in 0..full.len() - 4 {
            // Cut before the interval's terminator: never a wrong number.
            let r = heartbeat_interval(&full[..cut]);
            assert!(r.is_err() || r == Ok(Some(480)), "cut at {cut}: {r:?}");
        }
        assert!(heartbeat_interval(&ping_body("soon")).is_err());
        assert!(heartbeat_interval(b"<Ping><HeartbeatInterval>").is_err());
        assert!(heartbeat_interval(&[]).is_err());
        // A deep tower of opened elements stops at the bound.
        let mut deep = vec![0x03, 0x01, 0x6a, 0x00, 0x00, 13, 0x45];
        deep.extend(std::iter::repeat_n(0x49, 100));
        assert_eq!(heartbeat_interval(&deep), Err(WbxmlError::TooDeep));
    }
}
