//! Per-class scores of a classifier: under non-IID data a global accuracy can hide a class that
//! only one node holds, so evaluation keeps the whole confusion matrix.

use crate::data::NUM_CLASSES;

/// Counts of (true class, predicted class) pairs over a test set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfusionMatrix {
    /// `counts[true][predicted]`.
    counts: [[u64; NUM_CLASSES]; NUM_CLASSES],
}

impl Default for ConfusionMatrix {
    fn default() -> Self {
        Self {
            counts: [[0; NUM_CLASSES]; NUM_CLASSES],
        }
    }
}

impl ConfusionMatrix {
    /// Counts one example of class `truth` predicted as `predicted`; labels outside the
    /// classes are ignored (a dataset reader refuses them before this point).
    pub fn record(&mut self, truth: usize, predicted: usize) {
        if let Some(cell) = self
            .counts
            .get_mut(truth)
            .and_then(|row| row.get_mut(predicted))
        {
            *cell += 1;
        }
    }

    /// Adds another matrix's counts, for summing partial evaluations.
    pub fn merge(&mut self, other: &ConfusionMatrix) {
        for (row, other_row) in self.counts.iter_mut().zip(&other.counts) {
            for (cell, other_cell) in row.iter_mut().zip(other_row) {
                *cell += other_cell;
            }
        }
    }

    /// How often class `truth` was predicted as `predicted`.
    pub fn count(&self, truth: usize, predicted: usize) -> u64 {
        self.counts[truth][predicted]
    }

    /// Examples of class `truth` in the test set.
    pub fn examples(&self, truth: usize) -> u64 {
        self.counts[truth].iter().sum()
    }

    /// Examples counted in all.
    pub fn total(&self) -> u64 {
        (0..NUM_CLASSES).map(|c| self.examples(c)).sum()
    }

    /// Examples predicted correctly.
    pub fn correct(&self) -> u64 {
        (0..NUM_CLASSES).map(|c| self.counts[c][c]).sum()
    }

    /// Fraction of class `truth` predicted correctly (its recall); `None` when the test set
    /// holds none of it.
    pub fn class_accuracy(&self, truth: usize) -> Option<f64> {
        let n = self.examples(truth);
        (n > 0).then(|| self.counts[truth][truth] as f64 / n as f64)
    }

    /// The wrong class that `truth` is most often predicted as, with the fraction of `truth`'s
    /// examples that went there; `None` when no example of it was misclassified.
    pub fn most_confused_with(&self, truth: usize) -> Option<(usize, f64)> {
        let n = self.examples(truth);
        (0..NUM_CLASSES)
            .filter(|&p| p != truth && self.counts[truth][p] > 0)
            .max_by_key(|&p| (self.counts[truth][p], std::cmp::Reverse(p)))
            .map(|p| (p, self.counts[truth][p] as f64 / n as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn class_scores_come_from_the_rows() {
        let mut m = ConfusionMatrix::default();
        for (truth, predicted, times) in [(0, 0, 8), (0, 6, 2), (6, 6, 3), (6, 0, 4), (6, 2, 3)] {
            for _ in 0..times {
                m.record(truth, predicted);
            }
        }
        assert_eq!(m.total(), 20);
        assert_eq!(m.correct(), 11);
        assert_eq!(m.class_accuracy(0), Some(0.8));
        assert_eq!(m.class_accuracy(6), Some(0.3));
        assert_eq!(m.class_accuracy(1), None);
        assert_eq!(m.most_confused_with(0), Some((6, 0.2)));
        assert_eq!(m.most_confused_with(6), Some((0, 0.4)));
        assert_eq!(m.most_confused_with(1), None);
        m.record(10, 0);
        assert_eq!(m.total(), 20, "an out-of-range label is not counted");
    }

    #[test]
    fn ties_go_to_the_lower_class() {
        let mut m = ConfusionMatrix::default();
        m.record(5, 9);
        m.record(5, 7);
        assert_eq!(m.most_confused_with(5), Some((7, 0.5)));
    }

    proptest! {
        #[test]
        fn merging_partial_counts_equals_counting_everything(
            pairs in prop::collection::vec((0..NUM_CLASSES, 0..NUM_CLASSES), 0..200),
            cut in 0usize..200,
        ) {
            let cut = cut.min(pairs.len());
            let mut whole = ConfusionMatrix::default();
            let mut first = ConfusionMatrix::default();
            let mut second = ConfusionMatrix::default();
            for (i, &(t, p)) in pairs.iter().enumerate() {
                whole.record(t, p);
                if i < cut { first.record(t, p) } else { second.record(t, p) }
            }
            first.merge(&second);
            prop_assert_eq!(first, whole);
            prop_assert_eq!(whole.total(), pairs.len() as u64);
            let correct = pairs.iter().filter(|(t, p)| t == p).count() as u64;
            prop_assert_eq!(whole.correct(), correct);
        }
    }
}
