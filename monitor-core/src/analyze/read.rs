//! Reading pcap and pcapng files record by record, in chunks parsed in
//! place. We keep the buffer (not pcap-file's readers) so we know where
//! each record starts and how long it says it is: a file that ends inside
//! its last record (tcpdump killed, a file still being written) is read up
//! to that record and said to be cut, while a record that is corrupt in the
//! middle of the file is still an error.

use std::{
    fs::File,
    io::{ErrorKind, Read},
    path::Path,
    time::Duration,
};

use pcap_file::{
    pcap::PcapParser,
    pcapng::{Block, PcapNgParser},
    DataLink, Endianness, PcapError, TsResolution,
};
use serde::Serialize;

use super::AnalyzeError;

/// One record of a capture file.
pub(super) enum Record<'a> {
    Packet {
        link: DataLink,
        ts: Duration,
        orig_len: u32,
        data: &'a [u8],
    },
    /// A pcapng simple packet block: no timestamp.
    Untimed,
    /// A timestamp whose fraction is out of range.
    BadTimestamp,
}

/// Where a capture ends inside a record, and what is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CutRecord {
    /// Byte offset of the record that was cut (everything before it was read).
    pub offset: u64,
    /// Bytes of it the file holds.
    pub present: u64,
    /// Bytes its header says it has (None: the file ends inside that header).
    pub declared: Option<u64>,
}

impl CutRecord {
    /// In words, for the capture summary.
    pub fn describe(&self) -> String {
        let of = match self.declared {
            Some(d) => format!("{} of its {d} bytes", self.present),
            None => format!("{} bytes, its header cut", self.present),
        };
        format!(
            "the file ends mid-record: the record at byte {} is cut ({of}); everything before it was analysed",
            self.offset
        )
    }
}

/// Initial buffer: many records per read.
const CHUNK: usize = 1 << 20;
/// No record is longer: a length field beyond it is corruption, not a big
/// packet (the buffer would otherwise grow to whatever garbage says).
const MAX_RECORD: usize = 64 << 20;
/// A pcap record longer than this and than the snaplen is corrupt.
const MAX_PCAP_PACKET: u32 = 262_144;

/// What the bytes at the front of the buffer hold.
enum Need {
    /// A whole record of this many bytes.
    Have(usize),
    /// A record that goes on past the buffer; its length if its header is whole.
    More(Option<usize>),
    /// A record header no valid file has.
    Corrupt(String),
}

struct Chunks<'p> {
    path: &'p Path,
    file: File,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// File offset of `buf[start]`.
    offset: u64,
    eof: bool,
}

impl<'p> Chunks<'p> {
    fn open(path: &'p Path) -> Result<Self, AnalyzeError> {
        let file = File::open(path).map_err(|source| AnalyzeError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Chunks {
            path,
            file,
            buf: vec![0; CHUNK],
            start: 0,
            end: 0,
            offset: 0,
            eof: false,
        })
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    fn err(&self, e: impl std::fmt::Display) -> AnalyzeError {
        super::format_err(self.path, format!("at byte {}: {e}", self.offset))
    }

    /// Read more, making room for at least `want` bytes from `start`.
    /// False at the end of the file.
    fn fill(&mut self, want: usize) -> Result<bool, AnalyzeError> {
        if self.eof {
            return Ok(false);
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if want > self.buf.len() {
            self.buf.resize(want.next_power_of_two(), 0);
        }
        let before = self.end;
        while self.end < self.buf.len() {
            match self.file.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(format!("reading: {e}"))),
            }
        }
        Ok(self.end > before)
    }

    /// At least `n` bytes at the front, unless the file ends first.
    fn ensure(&mut self, n: usize) -> Result<bool, AnalyzeError> {
        while self.end - self.start < n {
            if !self.fill(n)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The next whole record's length; None at the end of the file, with
    /// `cut` set if it ends inside a record.
    fn next(
        &mut self,
        need: &dyn Fn(&[u8]) -> Need,
        cut: &mut Option<CutRecord>,
    ) -> Result<Option<usize>, AnalyzeError> {
        loop {
            let declared = match need(self.bytes()) {
                Need::Have(n) => return Ok(Some(n)),
                Need::Corrupt(m) => return Err(self.err(m)),
                Need::More(declared) => declared,
            };
            if self.fill(declared.unwrap_or(0).max(CHUNK))? {
                continue;
            }
            let present = (self.end - self.start) as u64;
            if present > 0 {
                *cut = Some(CutRecord {
                    offset: self.offset,
                    present,
                    declared: declared.map(|d| d as u64),
                });
            }
            return Ok(None);
        }
    }
}

/// Hand every record of a pcap or pcapng file to `f`; where it ends inside
/// its last record, if it does.
pub(super) fn read_capture(
    path: &Path,
    f: &mut dyn FnMut(Record),
) -> Result<Option<CutRecord>, AnalyzeError> {
    let mut c = Chunks::open(path)?;
    if !c.ensure(4)? {
        return Err(c.err("too short for a capture"));
    }
    if c.bytes()[..4] == [0x0a, 0x0d, 0x0d, 0x0a] {
        read_pcapng(&mut c, f)
    } else {
        read_pcap(&mut c, f)
    }
}

fn u32_at(b: &[u8], at: usize, big: bool) -> Option<u32> {
    let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(if big {
        u32::from_be_bytes(a)
    } else {
        u32::from_le_bytes(a)
    })
}

/// A pcap record: a 16-byte header, then as many bytes as it says.
fn pcap_need(b: &[u8], big: bool, snaplen: u32) -> Need {
    let Some(incl) = u32_at(b, 8, big) else {
        return Need::More(None);
    };
    if incl > snaplen.max(MAX_PCAP_PACKET) || incl as usize > MAX_RECORD {
        return Need::Corrupt(format!(
            "a packet record of {incl} bytes, beyond the snaplen ({snaplen}): corrupt"
        ));
    }
    if u32_at(b, 12, big).is_some_and(|orig| incl > orig) {
        return Need::Corrupt(format!(
            "a packet record of {incl} bytes, more than it had on the wire: corrupt"
        ));
    }
    let n = 16 + incl as usize;
    if b.len() >= n {
        Need::Have(n)
    } else {
        Need::More(Some(n))
    }
}

fn read_pcap(c: &mut Chunks, f: &mut dyn FnMut(Record)) -> Result<Option<CutRecord>, AnalyzeError> {
    if !c.ensure(24)? {
        return Err(c.err("too short for a pcap header"));
    }
    let (_, parser) = PcapParser::new(c.bytes()).map_err(|e| c.err(e))?;
    c.consume(24);
    let header = parser.header();
    let link = header.datalink;
    let nanos = header.ts_resolution == TsResolution::NanoSecond;
    let big = header.endianness == Endianness::Big;
    let need = |b: &[u8]| pcap_need(b, big, header.snaplen);
    let mut cut = None;
    while let Some(n) = c.next(&need, &mut cut)? {
        // Raw records: pcap-file 2.0 rejects packets longer on the wire than
        // the snaplen, which is exactly what a snaplen-limited capture holds.
        let (_, p) = parser
            .next_raw_packet(&c.bytes()[..n])
            .map_err(|e| c.err(e))?;
        let frac_ns = if nanos {
            u64::from(p.ts_frac)
        } else {
            u64::from(p.ts_frac) * 1000
        };
        if frac_ns >= 1_000_000_000 {
            f(Record::BadTimestamp);
        } else {
            f(Record::Packet {
                link,
                ts: Duration::new(u64::from(p.ts_sec), frac_ns as u32),
                orig_len: p.orig_len,
                data: &p.data,
            });
        }
        c.consume(n);
    }
    Ok(cut)
}

/// A pcapng block: type, total length, body, total length again. A section
/// header gives its own byte order (by its magic); other blocks use their
/// section's.
fn pcapng_need(b: &[u8], big: bool) -> Need {
    let big = if b.get(..4) == Some(&[0x0a, 0x0d, 0x0d, 0x0a]) {
        match b.get(8..12) {
            Some([0x1a, 0x2b, 0x3c, 0x4d]) => true,
            Some([0x4d, 0x3c, 0x2b, 0x1a]) => false,
            Some(_) => return Need::Corrupt("a section header with a bad magic".into()),
            None => return Need::More(None),
        }
    } else {
        big
    };
    let Some(len) = u32_at(b, 4, big) else {
        return Need::More(None);
    };
    let len = len as usize;
    if len < 12 || !len.is_multiple_of(4) || len > MAX_RECORD {
        return Need::Corrupt(format!("a block of impossible length {len}"));
    }
    if b.len() >= len {
        Need::Have(len)
    } else {
        Need::More(Some(len))
    }
}

fn read_pcapng(
    c: &mut Chunks,
    f: &mut dyn FnMut(Record),
) -> Result<Option<CutRecord>, AnalyzeError> {
    let mut cut = None;
    let Some(n) = c.next(&|b| pcapng_need(b, false), &mut cut)? else {
        return Err(c.err("too short for a pcapng section header"));
    };
    let (_, mut parser) = PcapNgParser::new(&c.bytes()[..n]).map_err(|e| c.err(e))?;
    c.consume(n);
    // Each interface block gives the link type and the timestamp unit of
    // the packets that name it.
    let mut links: Vec<(DataLink, u8)> = Vec::new();
    loop {
        let big = parser.section().endianness == Endianness::Big;
        let Some(n) = c.next(&|b| pcapng_need(b, big), &mut cut)? else {
            return Ok(cut);
        };
        // The block is whole: any error in it (even "need more bytes") is corruption.
        let (_, block) = parser
            .next_block(&c.bytes()[..n])
            .map_err(|e: PcapError| c.err(e))?;
        match block {
            Block::SectionHeader(_) => links.clear(),
            Block::InterfaceDescription(i) => links.push((i.linktype, ts_resolution(&i))),
            Block::EnhancedPacket(p) => {
                let (link, resol) = links
                    .get(p.interface_id as usize)
                    .copied()
                    .unwrap_or((DataLink::Unknown(u32::MAX), DEFAULT_TSRESOL));
                f(Record::Packet {
                    link,
                    ts: in_units(p.timestamp, resol),
                    orig_len: p.original_len,
                    data: &p.data,
                });
            }
            Block::SimplePacket(_) => f(Record::Untimed),
            _ => {}
        }
        c.consume(n);
    }
}

/// pcapng's default timestamp unit: microseconds (if_tsresol 6).
const DEFAULT_TSRESOL: u8 = 6;

fn ts_resolution(
    i: &pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock,
) -> u8 {
    use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
    i.options
        .iter()
        .find_map(|o| match o {
            InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
            _ => None,
        })
        .unwrap_or(DEFAULT_TSRESOL)
}

/// pcap-file hands an enhanced packet's raw 64-bit timestamp over as if it
/// counted nanoseconds; it counts units of `resol` (if_tsresol: 10^-n
/// seconds, or 2^-n with the top bit set).
fn in_units(raw: Duration, resol: u8) -> Duration {
    let raw = raw.as_nanos();
    let exp = u32::from(resol & 0x7f);
    let ns = if resol & 0x80 != 0 {
        (raw * 1_000_000_000) >> exp.min(127)
    } else if exp <= 9 {
        raw * 10u128.pow(9 - exp)
    } else {
        raw / 10u128.pow((exp - 9).min(38))
    };
    Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64)
}

#[cfg(test)]
mod units {
    use super::*;

    #[test]
    fn pcapng_timestamps_are_read_in_their_interfaces_unit() {
        let raw = Duration::from_nanos(1_700_000_000_123_456);
        assert_eq!(in_units(raw, 6), Duration::new(1_700_000_000, 123_456_000));
        assert_eq!(
            in_units(Duration::from_nanos(5), 9),
            Duration::from_nanos(5)
        );
        assert_eq!(
            in_units(Duration::from_nanos(1024), 0x80 | 10),
            Duration::from_secs(1)
        );
        assert_eq!(
            in_units(Duration::from_nanos(30), 10),
            Duration::from_nanos(3)
        );
    }
}
