//! Seeded train / validation split, per-epoch shuffling and a resumable data position.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::SplitMix64;

const SPLIT_STREAM: u64 = 0x5B17;
const EPOCH_STREAM: u64 = 0xE90C;

/// How many rows go to validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ValidationSplit {
    /// A fraction in `[0, 1)` of the rows (at least one row when non-zero and there are two
    /// rows or more).
    Fraction(f64),
    /// A number of rows.
    Count(usize),
}

impl ValidationSplit {
    /// Reads the seed's `validation_split`: values below 1 are fractions, whole numbers from 1
    /// up are row counts.
    pub fn from_value(v: f64) -> Result<Self> {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(DataError::config(
                "validation_split",
                format!("{v} must be a fraction in [0, 1) or a row count"),
            ));
        }
        if v < 1.0 {
            Ok(Self::Fraction(v))
        } else if v.fract() == 0.0 {
            Ok(Self::Count(v as usize))
        } else {
            Err(DataError::config(
                "validation_split",
                format!("{v}: counts must be whole numbers"),
            ))
        }
    }

    /// Validation rows out of `n`.
    pub fn count(self, n: usize) -> usize {
        let k = match self {
            Self::Fraction(f) if f <= 0.0 => 0,
            Self::Fraction(f) => ((n as f64 * f).round() as usize).max(1),
            Self::Count(c) => c,
        };
        if n < 2 { 0 } else { k.min(n - 1) }
    }
}

/// Splits `0..n` into (train, validation) indices, each in ascending order; the same `seed`
/// always gives the same split.
pub fn split_indices(n: usize, split: ValidationSplit, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let k = split.count(n);
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::from_parts(&[seed, SPLIT_STREAM]).shuffle(&mut order);
    let mut validation = order[..k].to_vec();
    let mut train = order[k..].to_vec();
    validation.sort_unstable();
    train.sort_unstable();
    (train, validation)
}

/// Where a run is in its data: epoch and the number of items of that epoch already consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataPosition {
    /// 0-based epoch.
    pub epoch: usize,
    /// Items of the epoch's order already consumed.
    pub index: usize,
}

/// The order in which items are visited, epoch after epoch: a seeded permutation per epoch
/// (or the file order without shuffling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochOrder {
    /// Number of items.
    pub len: usize,
    /// The data seed.
    pub seed: u64,
    /// Shuffle each epoch.
    pub shuffle: bool,
}

impl EpochOrder {
    /// The visiting order of `epoch`.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            SplitMix64::from_parts(&[self.seed, EPOCH_STREAM, epoch as u64]).shuffle(&mut order);
        }
        order
    }

    /// The next `batch_size` items from `position` (fewer at the end of an epoch; none when
    /// the epoch is exhausted), and the position after them.
    pub fn next_batch(
        &self,
        position: DataPosition,
        batch_size: usize,
    ) -> (Vec<usize>, DataPosition) {
        let order = self.order(position.epoch);
        let start = position.index.min(order.len());
        let end = (start + batch_size.max(1)).min(order.len());
        (
            order[start..end].to_vec(),
            DataPosition {
                epoch: position.epoch,
                index: end,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_and_counts() {
        assert_eq!(ValidationSplit::from_value(0.1).unwrap().count(100), 10);
        assert_eq!(ValidationSplit::from_value(0.1).unwrap().count(3), 1);
        assert_eq!(ValidationSplit::from_value(0.0).unwrap().count(100), 0);
        assert_eq!(ValidationSplit::from_value(25.0).unwrap().count(100), 25);
        assert_eq!(ValidationSplit::from_value(500.0).unwrap().count(100), 99);
        assert!(ValidationSplit::from_value(2.5).is_err());
        assert!(ValidationSplit::from_value(-0.1).is_err());
    }

    #[test]
    fn resuming_sees_the_same_batches() {
        let order = EpochOrder {
            len: 10,
            seed: 3,
            shuffle: true,
        };
        let mut pos = DataPosition::default();
        let mut all = Vec::new();
        loop {
            let (b, next) = order.next_batch(pos, 3);
            if b.is_empty() {
                break;
            }
            all.push(b);
            pos = next;
        }
        let (resumed, _) = order.next_batch(DataPosition { epoch: 0, index: 6 }, 3);
        assert_eq!(resumed, all[2]);
        assert_ne!(order.order(0), order.order(1));
    }
}
