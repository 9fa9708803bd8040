//! The followed flows, by key: slots holding each key and its track, and
//! an index of slot numbers hashed by the key their slot holds. At a
//! million flows a hash table has up to twice as many buckets as entries
//! (its load stays under 7/8 and it grows by doubling): buckets of a 4-byte
//! slot number instead of a key and a whole track save about 150 bytes per
//! followed flow (issue 18).

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use monitor_common::FlowKey;

pub(super) struct Tracks<T> {
    index: HashTable<u32>,
    hasher: RandomState,
    /// `None`: a free slot, listed in `free`.
    slots: Vec<Option<(FlowKey, T)>>,
    free: Vec<u32>,
}

impl<T> Default for Tracks<T> {
    fn default() -> Self {
        Tracks {
            index: HashTable::new(),
            hasher: RandomState::new(),
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

/// The key a slot holds (free slots match nothing).
fn key_of<T>(slots: &[Option<(FlowKey, T)>], i: u32) -> Option<&FlowKey> {
    slots.get(i as usize)?.as_ref().map(|(k, _)| k)
}

impl<T> Tracks<T> {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    fn slot_of(&self, key: &FlowKey) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        self.index
            .find(hash, |&i| key_of(slots, i) == Some(key))
            .copied()
    }

    pub fn contains_key(&self, key: &FlowKey) -> bool {
        self.slot_of(key).is_some()
    }

    pub fn get(&self, key: &FlowKey) -> Option<&T> {
        let i = self.slot_of(key)?;
        self.slots.get(i as usize)?.as_ref().map(|(_, t)| t)
    }

    pub fn get_mut(&mut self, key: &FlowKey) -> Option<&mut T> {
        let i = self.slot_of(key)?;
        self.slots.get_mut(i as usize)?.as_mut().map(|(_, t)| t)
    }

    /// Insert or replace; the replaced track is returned.
    pub fn insert(&mut self, key: FlowKey, track: T) -> Option<T> {
        if let Some(slot) = self.get_mut(&key) {
            return Some(std::mem::replace(slot, track));
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some((key, track));
                i
            }
            None => {
                // The detector's `max_flows` bound keeps this far below u32.
                self.slots.push(Some((key, track)));
                (self.slots.len() - 1) as u32
            }
        };
        let Tracks {
            index,
            hasher,
            slots,
            ..
        } = self;
        let rehash = |&j: &u32| key_of(slots, j).map_or(0, |k| hasher.hash_one(k));
        index.insert_unique(hasher.hash_one(key), i, rehash);
        None
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<T> {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        let entry = self
            .index
            .find_entry(hash, |&i| key_of(slots, i) == Some(key))
            .ok()?;
        let (i, _) = entry.remove();
        self.free.push(i);
        self.slots.get_mut(i as usize)?.take().map(|(_, t)| t)
    }

    pub fn keys(&self) -> impl Iterator<Item = &FlowKey> {
        self.iter().map(|(k, _)| k)
    }

    /// In slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &T)> {
        self.slots.iter().flatten().map(|(k, t)| (k, t))
    }

    /// Bytes held (by capacity): the index's buckets (4 bytes and a control
    /// byte each) and the slots.
    pub fn memory_bytes(&self) -> usize {
        buckets_for(self.index.capacity()) * (4 + 1)
            + self.slots.capacity() * std::mem::size_of::<Option<(FlowKey, T)>>()
            + self.free.capacity() * 4
    }
}

/// The buckets behind a hash table of this capacity (it keeps at most 7/8
/// of its buckets full, and has a power of two of them).
fn buckets_for(capacity: usize) -> usize {
    match capacity {
        0 => 0,
        1..=3 => 4,
        4..=7 => 8,
        c => (c * 8 / 7).next_power_of_two(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            client_port: port,
            ..FlowKey::ZERO
        }
    }

    #[test]
    fn a_removed_tracks_slot_is_reused_and_the_others_stay_found() {
        let mut t = Tracks::default();
        for p in 0..1000u16 {
            assert!(t.insert(key(p), p).is_none());
        }
        assert_eq!(t.remove(&key(3)), Some(3));
        assert_eq!(t.remove(&key(3)), None);
        assert!(t.insert(key(5000), 5000).is_none());
        assert_eq!(t.slots.len(), 1000, "the freed slot was reused");
        assert_eq!(t.insert(key(5000), 5001), Some(5000), "replaced");
        assert_eq!(t.len(), 1000);
        for p in (0..1000u16).filter(|&p| p != 3) {
            assert_eq!(t.get(&key(p)), Some(&p));
        }
        *t.get_mut(&key(7)).unwrap() = 70;
        assert_eq!(t.get(&key(7)), Some(&70));
        assert_eq!(t.get(&key(5000)), Some(&5001));
        assert!(!t.contains_key(&key(3)));
        assert!(t.iter().all(|(k, v)| t.get(k) == Some(v)));
        assert_eq!(t.keys().count(), 1000);
    }

    #[test]
    fn the_index_costs_five_bytes_a_bucket_not_a_key_and_a_track() {
        let mut t: Tracks<[u64; 14]> = Tracks::default();
        for p in 0..10_000u16 {
            t.insert(key(p), [0; 14]);
        }
        let slots = t.slots.capacity() * std::mem::size_of::<Option<(FlowKey, [u64; 14])>>();
        let index = t.memory_bytes() - slots;
        // 10,000 entries: 16,384 buckets.
        assert_eq!(index, 16_384 * 5);
    }
}
