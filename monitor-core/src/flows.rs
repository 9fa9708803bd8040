//! `monitor flows`: the live flows, answered from a snapshot of the kernel
//! table taken off the event loop, filtered, sorted and cut where the
//! snapshot is (the agent), so a query of a million-entry table costs a
//! pass over memory, not a second of syscalls under the agent's lock.

use std::{collections::BinaryHeap, net::IpAddr};

use clap::ValueEnum;
use monitor_common::{state, Flow, FlowKey, FAMILY_V4};
use serde::{Deserialize, Serialize};

use crate::{
    detector::{path::BadPath, PathKey},
    event::{client_of, key_addr, server_of},
};

#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowSort {
    /// Longest silence first.
    #[default]
    Silence,
    /// Oldest first.
    Age,
    /// Most bytes (both ways) first.
    Bytes,
    /// By client address.
    Client,
}

/// What a `flows` request asks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowQuery {
    pub sort: FlowSort,
    /// Only flows on this path, as printed (e.g. 198.51.100.0/24:443).
    pub path: Option<String>,
    /// Only flows silent for at least this many seconds.
    pub min_silence: Option<f64>,
    /// At most this many rows (0: all).
    pub limit: usize,
    /// Wait for a snapshot taken after the request (one walk of the table:
    /// about a second at a million entries) instead of the latest one.
    pub fresh: bool,
}

/// How a flow stands in the kernel table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    Open,
    /// A retransmission after client silence is unanswered so far.
    Retransmitting,
    /// A FIN or RST was seen.
    Closed,
}

impl FlowState {
    pub fn of(f: &FlowSummary) -> FlowState {
        if f.state & state::CLOSED != 0 {
            FlowState::Closed
        } else if f.state & state::RETRANS_REPORTED != 0 {
            FlowState::Retransmitting
        } else {
            FlowState::Open
        }
    }
}

impl std::fmt::Display for FlowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FlowState::Open => "open",
            FlowState::Retransmitting => "retransmitting",
            FlowState::Closed => "closed",
        })
    }
}

/// One live flow as `monitor flows` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRow {
    pub client: String,
    pub server: String,
    pub path: String,
    pub age_seconds: f64,
    /// Silence now, both directions.
    pub silence_seconds: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub packets_in: u32,
    pub packets_out: u32,
    pub heartbeat_seconds: Option<f64>,
    pub state: FlowState,
    /// First seen mid-connection (it predates the agent or its table entry).
    pub midstream: bool,
}

/// The answer: the rows, and how old the table walk behind them is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowList {
    /// Seconds between the table walk and the answer.
    pub snapshot_age_seconds: f64,
    /// Entries in the flow table at the walk.
    pub flows_in_table: u64,
    /// Entries that matched the filters (before the limit).
    pub matching: u64,
    pub rows: Vec<FlowRow>,
}

/// What a snapshot keeps of a kernel flow: what queries show, sort and
/// filter by, and what the detector settles on (the client last heard).
/// 56 bytes instead of the kernel's 96: a snapshot holds a million.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSummary {
    pub first_seen_ns: u64,
    pub last_in_ns: u64,
    pub last_out_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub pkts_in: u32,
    pub pkts_out: u32,
    /// [`Flow::state`]'s bits.
    pub state: u8,
}

const _: () = assert!(std::mem::size_of::<(FlowKey, FlowSummary)>() == 96);

impl From<&Flow> for FlowSummary {
    fn from(f: &Flow) -> FlowSummary {
        FlowSummary {
            first_seen_ns: f.first_seen_ns,
            last_in_ns: f.last_in_ns,
            last_out_ns: f.last_out_ns,
            bytes_in: f.bytes_in,
            bytes_out: f.bytes_out,
            pkts_in: f.pkts_in,
            pkts_out: f.pkts_out,
            state: f.state,
        }
    }
}

/// The flow table as one walk found it.
#[derive(Clone, Debug, Default)]
pub struct FlowSnapshot {
    /// When the walk ended (kernel clock ns).
    pub taken_ns: u64,
    /// Sorted by key.
    entries: Vec<(FlowKey, FlowSummary)>,
    /// Indexes of `entries` in each sort order (by [`FlowSort`] as usize),
    /// sorted by the scanner: a query without `--path` reads its rows off
    /// the front of one, and counts `--min-silence` matches by binary search
    /// in the silence order. 4 bytes an entry an order.
    orders: [Vec<u32>; FlowSort::ALL.len()],
}

impl FlowSort {
    pub const ALL: [FlowSort; 4] = [
        FlowSort::Silence,
        FlowSort::Age,
        FlowSort::Bytes,
        FlowSort::Client,
    ];
}

impl FlowSnapshot {
    /// Sorts the walk's entries (on the scanning thread, off the lock).
    pub fn new(taken_ns: u64, mut entries: Vec<(FlowKey, FlowSummary)>) -> FlowSnapshot {
        entries.sort_unstable_by_key(|e| e.0);
        // A walk of a table that changes under it restarts from the first
        // key when its current key is deleted: the same entry twice.
        entries.dedup_by_key(|e| e.0);
        // A walk's vector grew by doubling: up to twice what it holds, kept
        // until the next walk. (A big allocation shrinks in place: mremap.)
        entries.shrink_to_fit();
        let orders = FlowSort::ALL.map(|sort| {
            let mut idx: Vec<u32> = (0..entries.len() as u32).collect();
            idx.sort_unstable_by_key(|&i| {
                let (k, f) = &entries[i as usize];
                sort_key(sort, k, f)
            });
            idx
        });
        FlowSnapshot {
            taken_ns,
            entries,
            orders,
        }
    }

    pub fn entries(&self) -> &[(FlowKey, FlowSummary)] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes held, by capacity: the entries and the sort orders.
    pub fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(FlowKey, FlowSummary)>()
            + self.orders.iter().map(|o| o.capacity() * 4).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the walk found `key`; the entries must be sorted by key.
    pub fn contains(&self, key: &FlowKey) -> bool {
        self.get(key).is_some()
    }

    pub fn get(&self, key: &FlowKey) -> Option<&FlowSummary> {
        self.entries
            .binary_search_by(|e| e.0.cmp(key))
            .ok()
            .map(|i| &self.entries[i].1)
    }
}

/// How to name a flow's path (the detector's prefixes).
#[derive(Clone, Copy, Debug)]
pub struct Paths {
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
}

impl Paths {
    pub fn of(&self, client: IpAddr, port: u16) -> PathKey {
        PathKey::new(client, port, self.ipv4_prefix, self.ipv6_prefix)
    }
}

fn last_seen(f: &FlowSummary) -> u64 {
    f.last_in_ns.max(f.last_out_ns)
}

/// Ascending order for `sort`: smaller first.
fn sort_key(sort: FlowSort, k: &FlowKey, f: &FlowSummary) -> (u64, u128, u16) {
    match sort {
        FlowSort::Silence => (last_seen(f), 0, 0),
        FlowSort::Age => (f.first_seen_ns, 0, 0),
        FlowSort::Bytes => (u64::MAX - (f.bytes_in + f.bytes_out), 0, 0),
        // IPv4 before IPv6, then address, then port (as SocketAddr orders).
        FlowSort::Client => (
            u64::from(k.family != FAMILY_V4),
            u128::from_be_bytes(k.client_addr),
            k.client_port,
        ),
    }
}

/// The entries matching `q`, in its order, cut to its limit; and how many
/// matched. Without `--path`, from the snapshot's index of that order;
/// with it, one pass keeping the best `limit` in a heap.
pub fn select<'a>(
    snap: &'a FlowSnapshot,
    q: &FlowQuery,
    now_ns: u64,
    paths: Paths,
) -> Result<Selection<'a>, BadPath> {
    let min_silence_ns = q.min_silence.map(|s| (s.max(0.0) * 1e9) as u64);
    let path: Option<PathKey> = q.path.as_deref().map(str::parse).transpose()?;
    let limit = if q.limit == 0 { usize::MAX } else { q.limit };
    if path.is_none() {
        return Ok(from_index(snap, q.sort, now_ns, min_silence_ns, limit));
    }
    let mut best: BinaryHeap<((u64, u128, u16), usize)> = BinaryHeap::new();
    let mut matching = 0;
    for (i, (k, f)) in snap.entries.iter().enumerate() {
        let keep = min_silence_ns.is_none_or(|m| now_ns.saturating_sub(last_seen(f)) >= m)
            && path
                .is_none_or(|p| paths.of(key_addr(k.family, &k.client_addr), k.server_port) == p);
        if !keep {
            continue;
        }
        matching += 1;
        let key = sort_key(q.sort, k, f);
        if best.len() < limit {
            best.push((key, i));
        } else if best.peek().is_some_and(|top| key < top.0) {
            best.pop();
            best.push((key, i));
        }
    }
    let rows = best
        .into_sorted_vec()
        .into_iter()
        .map(|(_, i)| &snap.entries[i])
        .collect();
    Ok(Selection { matching, rows })
}

/// A query without `--path`: the matches are counted by a binary search in
/// the silence order, and the rows are the first matches of the query's order.
fn from_index(
    snap: &FlowSnapshot,
    sort: FlowSort,
    now_ns: u64,
    min_ns: Option<u64>,
    limit: usize,
) -> Selection<'_> {
    // Silent at least m: last seen at or before now - m.
    let cutoff = min_ns.map(|m| now_ns.saturating_sub(m));
    let matching = match cutoff {
        Some(c) => snap.orders[FlowSort::Silence as usize]
            .partition_point(|&i| last_seen(&snap.entries[i as usize].1) <= c),
        None => snap.entries.len(),
    };
    let rows = snap.orders[sort as usize]
        .iter()
        .map(|&i| &snap.entries[i as usize])
        .filter(|(_, f)| cutoff.is_none_or(|c| last_seen(f) <= c))
        .take(matching.min(limit))
        .collect();
    Selection { matching, rows }
}

/// What [`select`] picked.
pub struct Selection<'a> {
    /// Entries that matched the filters (before the limit).
    pub matching: usize,
    pub rows: Vec<&'a (FlowKey, FlowSummary)>,
}

/// One row as the CLI shows it.
pub fn row(
    key: &FlowKey,
    f: &FlowSummary,
    now_ns: u64,
    path: PathKey,
    heartbeat: Option<f64>,
) -> FlowRow {
    FlowRow {
        client: client_of(key).to_string(),
        server: server_of(key).to_string(),
        path: path.to_string(),
        age_seconds: now_ns.saturating_sub(f.first_seen_ns) as f64 / 1e9,
        silence_seconds: now_ns.saturating_sub(last_seen(f)) as f64 / 1e9,
        bytes_in: f.bytes_in,
        bytes_out: f.bytes_out,
        packets_in: f.pkts_in,
        packets_out: f.pkts_out,
        heartbeat_seconds: heartbeat,
        state: FlowState::of(f),
        midstream: f.state & state::MIDSTREAM != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16, last_ns: u64, bytes: u64) -> (FlowKey, FlowSummary) {
        let key = FlowKey {
            client_addr: [198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            server_addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_port: port,
            server_port: 443,
            family: monitor_common::FAMILY_V4,
            _pad: [0; 3],
        };
        let f = Flow {
            first_seen_ns: 1,
            last_in_ns: last_ns,
            bytes_in: bytes,
            ..Flow::default()
        };
        (key, FlowSummary::from(&f))
    }

    const PATHS: Paths = Paths {
        ipv4_prefix: 24,
        ipv6_prefix: 56,
    };

    #[test]
    fn the_limit_keeps_the_longest_silences_in_order() {
        let snap = FlowSnapshot::new(
            0,
            (0..1000u64)
                .map(|i| entry(i as u16, i * 1_000, 0))
                .collect(),
        );
        let q = FlowQuery {
            limit: 3,
            ..FlowQuery::default()
        };
        let sel = select(&snap, &q, 10_000_000, PATHS).unwrap();
        assert_eq!(sel.matching, 1000);
        let ports: Vec<u16> = sel.rows.iter().map(|(k, _)| k.client_port).collect();
        assert_eq!(ports, [0, 1, 2]);
    }

    #[test]
    fn filters_apply_before_the_limit() {
        let snap = FlowSnapshot::new(
            0,
            vec![entry(1, 9_000_000_000, 5), entry(2, 1_000_000_000, 50)],
        );
        let q = FlowQuery {
            min_silence: Some(5.0),
            path: Some("198.51.100.0/24:443".into()),
            sort: FlowSort::Bytes,
            ..FlowQuery::default()
        };
        let sel = select(&snap, &q, 10_000_000_000, PATHS).unwrap();
        assert_eq!(sel.matching, 1);
        assert_eq!(sel.rows[0].0.client_port, 2);
        let other_path = FlowQuery {
            path: Some("203.0.113.0/24:443".into()),
            ..FlowQuery::default()
        };
        let none = select(&snap, &other_path, 10_000_000_000, PATHS).unwrap();
        assert_eq!(none.matching, 0);
        // The index answers the default query as the full pass would.
        let silent = FlowQuery {
            min_silence: Some(5.0),
            ..FlowQuery::default()
        };
        let fast = select(&snap, &silent, 10_000_000_000, PATHS).unwrap();
        assert_eq!((fast.matching, fast.rows[0].0.client_port), (1, 2));
    }

    /// Every order's index answers as the full pass (the `--path` route) does.
    #[test]
    fn the_indexes_agree_with_a_full_pass_in_every_order() {
        let entries: Vec<_> = (0..500u64)
            .map(|i| {
                entry(
                    (i * 7919 % 500) as u16,
                    (i * 104_729 % 997) * 1_000_000,
                    i * 31 % 113,
                )
            })
            .collect();
        let snap = FlowSnapshot::new(0, entries);
        let now = 2_000_000_000;
        for sort in FlowSort::ALL {
            for min_silence in [None, Some(1.5)] {
                let q = FlowQuery {
                    sort,
                    min_silence,
                    limit: 20,
                    ..FlowQuery::default()
                };
                let on_path = FlowQuery {
                    path: Some("198.51.100.0/24:443".into()),
                    ..q.clone()
                };
                let fast = select(&snap, &q, now, PATHS).unwrap();
                let slow = select(&snap, &on_path, now, PATHS).unwrap();
                let keys = |s: &Selection| -> Vec<_> {
                    s.rows.iter().map(|(k, f)| sort_key(sort, k, f)).collect()
                };
                assert_eq!(fast.matching, slow.matching, "{sort:?} {min_silence:?}");
                assert_eq!(keys(&fast), keys(&slow), "{sort:?} {min_silence:?}");
            }
        }
        let bad = FlowQuery {
            path: Some("nowhere".into()),
            ..FlowQuery::default()
        };
        assert!(select(&snap, &bad, 0, PATHS).is_err());
    }
}
