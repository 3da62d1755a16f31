//! governor's keyed state, bounded: a `DashMap` of per-client GCRA states
//! that never holds more than `max` keys. Once full, clients it does not
//! already track share one overflow state, so a flood of new identities
//! (many addresses, or spoofed headers from a trusted proxy) is throttled as
//! one client instead of growing memory. Idle keys are dropped by the
//! limiter's periodic cleanup, making room for new ones.

use std::hash::Hash;

use dashmap::DashMap;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};

#[derive(Debug)]
pub struct BoundedStore<K: Hash + Eq> {
    map: DashMap<K, InMemoryState>,
    max: usize,
    overflow: InMemoryState,
}

impl<K: Hash + Eq + Clone> BoundedStore<K> {
    pub fn new(max: usize) -> Self {
        BoundedStore {
            map: DashMap::new(),
            max: max.max(1),
            overflow: InMemoryState::default(),
        }
    }
}

/// The stored theoretical arrival time, read without changing it.
fn peek(state: &InMemoryState) -> Option<Nanos> {
    let read: Result<(), Option<Nanos>> =
        state.measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>);
    read.err().flatten()
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        // Racing inserts may overshoot the bound by the number of threads;
        // it still holds to within a handful of entries.
        if self.map.len() >= self.max {
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let state = self.map.entry(key.clone()).or_default();
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.map
            .retain(|_, state| peek(state).is_some_and(|tat| tat > drop_below));
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
