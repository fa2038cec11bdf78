//! The server's counters added up over successive reads of a `metrics-util` debugging
//! recorder. Each read of that recorder resets its counters, so a benchmark that reads it after
//! every round, or tests that read it concurrently, see only what was counted since the last
//! read unless they keep the totals.

use std::collections::BTreeMap;

use metrics::Key;
use metrics_util::debugging::{DebugValue, Snapshot};

/// Counter name -> labels (`limit=node_calls`; empty when none) -> total so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CounterTotals(BTreeMap<String, BTreeMap<String, u64>>);

impl CounterTotals {
    /// No counts yet (`const`, so that a `static` can hold one).
    pub const fn new() -> Self {
        Self(BTreeMap::new())
    }

    /// Adds `count` to the counter `key` (its name and labels).
    pub fn add(&mut self, key: &Key, count: u64) {
        let labels = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect::<Vec<_>>()
            .join(",");
        *self
            .0
            .entry(key.name().to_string())
            .or_default()
            .entry(labels)
            .or_default() += count;
    }

    /// Adds every counter of `snapshot`; its gauges and histograms are left out.
    pub fn add_snapshot(&mut self, snapshot: Snapshot) {
        for (key, _, _, value) in snapshot.into_vec() {
            if let DebugValue::Counter(count) = value {
                self.add(key.key(), count);
            }
        }
    }

    /// The counter `name`'s totals by labels (`None` when nothing has counted it).
    pub fn by_labels(&self, name: &str) -> Option<&BTreeMap<String, u64>> {
        self.0.get(name)
    }

    /// The counter `name` with exactly `labels` (`limit=node_calls`), 0 when never counted.
    pub fn get(&self, name: &str, labels: &str) -> u64 {
        self.by_labels(name)
            .and_then(|by_labels| by_labels.get(labels))
            .copied()
            .unwrap_or(0)
    }

    /// The counter `name`'s total over all its labels (0 when nothing has counted it).
    pub fn total(&self, name: &str) -> u64 {
        self.by_labels(name)
            .map_or(0, |by_labels| by_labels.values().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_by_name_and_labels() {
        let mut totals = CounterTotals::default();
        let refused = Key::from_parts("refusals", vec![metrics::Label::new("limit", "a")]);
        totals.add(&refused, 3);
        totals.add(&refused, 1);
        totals.add(&Key::from_name("opened"), 2);
        assert_eq!(totals.get("refusals", "limit=a"), 4);
        assert_eq!(totals.get("refusals", "limit=b"), 0);
        assert_eq!(totals.total("refusals"), 4);
        assert_eq!(totals.get("opened", ""), 2);
        assert_eq!(totals.total("never"), 0);
        assert!(totals.by_labels("never").is_none());
    }
}
