//! The followed flows, by key: an index from key to slot, and the slots.
//! Apart because at a million flows a hash map has twice as many buckets
//! as entries (its load stays under 7/8 and it grows by doubling): buckets
//! of a key and a slot number (48 bytes) instead of a key and a whole
//! track cost about 100 bytes less per followed flow (issue 18).

use std::collections::HashMap;

use monitor_common::FlowKey;

pub(super) struct Tracks<T> {
    index: HashMap<FlowKey, u32>,
    /// `None`: a free slot, listed in `free`.
    slots: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Tracks<T> {
    fn default() -> Self {
        Tracks {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Tracks<T> {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn contains_key(&self, key: &FlowKey) -> bool {
        self.index.contains_key(key)
    }

    pub fn get(&self, key: &FlowKey) -> Option<&T> {
        let i = *self.index.get(key)?;
        self.slots.get(i as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, key: &FlowKey) -> Option<&mut T> {
        let i = *self.index.get(key)?;
        self.slots.get_mut(i as usize)?.as_mut()
    }

    /// Insert or replace; the replaced track is returned.
    pub fn insert(&mut self, key: FlowKey, track: T) -> Option<T> {
        if let Some(slot) = self.get_mut(&key) {
            return Some(std::mem::replace(slot, track));
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(track);
                i
            }
            None => {
                // The detector's `max_flows` bound keeps this far below u32.
                self.slots.push(Some(track));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(key, i);
        None
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<T> {
        let i = self.index.remove(key)?;
        let track = self.slots.get_mut(i as usize)?.take();
        self.free.push(i);
        track
    }

    pub fn keys(&self) -> impl Iterator<Item = &FlowKey> {
        self.index.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &T)> {
        self.index
            .iter()
            .filter_map(|(k, &i)| Some((k, self.slots.get(i as usize)?.as_ref()?)))
    }

    /// Bytes held (by capacity): the index's buckets (a control byte each)
    /// and the slots.
    pub fn memory_bytes(&self) -> usize {
        let buckets = buckets_for(self.index.capacity());
        buckets * (std::mem::size_of::<(FlowKey, u32)>() + 1)
            + self.slots.capacity() * std::mem::size_of::<Option<T>>()
            + self.free.capacity() * 4
    }
}

/// The buckets behind a hash map of this capacity (std's table keeps at
/// most 7/8 of its buckets full, and has a power of two of them).
fn buckets_for(capacity: usize) -> usize {
    if capacity == 0 {
        0
    } else if capacity < 8 {
        if capacity < 4 {
            4
        } else {
            8
        }
    } else {
        (capacity * 8 / 7).next_power_of_two()
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
        for p in 0..10u16 {
            assert!(t.insert(key(p), p).is_none());
        }
        assert_eq!(t.remove(&key(3)), Some(3));
        assert_eq!(t.remove(&key(3)), None);
        assert!(t.insert(key(100), 100).is_none());
        assert_eq!(t.slots.len(), 10, "the freed slot was reused");
        assert_eq!(t.insert(key(100), 101), Some(100), "replaced");
        assert_eq!(t.len(), 10);
        for p in (0..10u16).filter(|&p| p != 3) {
            assert_eq!(t.get(&key(p)), Some(&p));
        }
        assert_eq!(t.get(&key(100)), Some(&101));
        assert!(!t.contains_key(&key(3)));
        let mut seen: Vec<u16> = t.iter().map(|(_, v)| *v).collect();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 4, 5, 6, 7, 8, 9, 101]);
        assert_eq!(t.keys().count(), 10);
    }
}
