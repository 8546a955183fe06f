//! Examples, truncation, contamination-free packing and padding into plain-Rust batches.
//!
//! Packing puts several examples into one row of `capacity` tokens (best-fit decreasing).
//! Each packed example gets its own segment id and positions restarting at 0, and the label of
//! its first token is dropped, so that neither attention nor the loss crosses from one example
//! into the next: a packed row trains exactly like the examples in separate padded rows.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Label value that takes no part in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// One tokenized conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Index of the source row in the loaded file.
    pub row: usize,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` ([`IGNORE_INDEX`] = not trained).
    pub labels: Vec<i32>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True for an example without tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens that contribute to the loss: labels at positions 1.. (position 0 has no
    /// preceding token to predict it from).
    pub fn label_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// What to do with an example longer than the maximum length.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the first `max_length` tokens.
    #[default]
    Truncate,
    /// Drop the example.
    Drop,
}

/// Outcome of fitting an example into `max_length`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fitted {
    /// It fit as it was.
    Unchanged(Example),
    /// It was cut; `lost` tokens were removed.
    Truncated {
        /// The shortened example.
        example: Example,
        /// Tokens removed.
        lost: usize,
    },
    /// It was dropped (too long with [`Truncation::Drop`]).
    Dropped {
        /// Its tokens.
        tokens: usize,
    },
}

/// Fits `example` into `max_length` tokens.
pub fn fit(mut example: Example, max_length: usize, mode: Truncation) -> Fitted {
    let n = example.len();
    if n <= max_length {
        return Fitted::Unchanged(example);
    }
    match mode {
        Truncation::Drop => Fitted::Dropped { tokens: n },
        Truncation::Truncate => {
            example.input_ids.truncate(max_length);
            example.labels.truncate(max_length);
            Fitted::Truncated {
                example,
                lost: n - max_length,
            }
        }
    }
}

/// A row for the model: tokens, labels, rotary positions and segment ids, all of one length.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sequence {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels ([`IGNORE_INDEX`] = no loss).
    pub labels: Vec<i32>,
    /// Positions, restarting at 0 for each segment.
    pub position_ids: Vec<u32>,
    /// Which packed example each token belongs to (padding has its own id).
    pub segment_ids: Vec<u32>,
}

impl Sequence {
    /// Number of tokens (padding included).
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens that contribute to the loss (labels at positions 1..).
    pub fn label_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    /// The examples of `parts` back to back, each its own segment.
    pub fn pack(parts: &[&Example]) -> Self {
        let mut s = Self::default();
        for (seg, ex) in parts.iter().enumerate() {
            s.input_ids.extend_from_slice(&ex.input_ids);
            s.labels.extend_from_slice(&ex.labels);
            if let Some(first) = s.labels.len().checked_sub(ex.len())
                && !ex.is_empty()
            {
                // The previous segment's last token must not learn to predict this one.
                s.labels[first] = IGNORE_INDEX;
            }
            s.position_ids.extend(0..ex.len() as u32);
            s.segment_ids
                .extend(std::iter::repeat_n(seg as u32, ex.len()));
        }
        s
    }

    /// Pads to `len` with `pad_id`: no labels, positions continuing, a segment of its own.
    pub fn pad_to(&mut self, len: usize, pad_id: u32) {
        if self.len() >= len {
            return;
        }
        let seg = self.segment_ids.iter().max().map_or(0, |m| m + 1);
        let start = self.position_ids.last().map_or(0, |p| p + 1);
        let n = len - self.len();
        self.input_ids.extend(std::iter::repeat_n(pad_id, n));
        self.labels.extend(std::iter::repeat_n(IGNORE_INDEX, n));
        self.position_ids.extend(start..start + n as u32);
        self.segment_ids.extend(std::iter::repeat_n(seg, n));
    }
}

/// A batch of rows of equal length, as flat row-major vectors ready to become tensors.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Batch {
    /// Rows.
    pub batch_size: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// `[batch_size * seq_len]` token ids.
    pub input_ids: Vec<u32>,
    /// `[batch_size * seq_len]` labels.
    pub labels: Vec<i32>,
    /// `[batch_size * seq_len]` positions.
    pub position_ids: Vec<u32>,
    /// `[batch_size * seq_len]` segment ids.
    pub segment_ids: Vec<u32>,
    /// Tokens that contribute to the loss.
    pub label_tokens: usize,
    /// Tokens that are not padding.
    pub real_tokens: usize,
    /// Some row holds more than one example (packing): attention needs the segment ids. When
    /// false, every row is one example followed by padding, and plain causal attention already
    /// keeps real tokens from seeing the padding after them.
    pub packed: bool,
    /// Tokens of each row before its padding (empty: no padding anywhere).
    #[serde(default)]
    pub row_lengths: Vec<usize>,
}

impl Batch {
    /// `[batch_size * seq_len]`: true for a real token, false for padding (what
    /// `transformers`' `attention_mask` holds).
    pub fn real_mask(&self) -> Vec<bool> {
        let s = self.seq_len;
        (0..self.batch_size * s)
            .map(|i| {
                self.row_lengths
                    .get(i / s.max(1))
                    .is_none_or(|&len| i % s.max(1) < len)
            })
            .collect()
    }

    /// Pads `rows` to the longest (or to `pad_to`, if longer) and flattens them.
    pub fn collate(rows: Vec<Sequence>, pad_id: u32, pad_to: Option<usize>) -> Self {
        let longest = rows.iter().map(Sequence::len).max().unwrap_or(0);
        let seq_len = pad_to.map_or(longest, |p| p.max(longest));
        let mut b = Self {
            batch_size: rows.len(),
            seq_len,
            ..Self::default()
        };
        for mut r in rows {
            b.packed |= r.segment_ids.last().is_some_and(|&s| s > 0);
            b.real_tokens += r.len();
            b.row_lengths.push(r.len());
            b.label_tokens += r.label_tokens();
            r.pad_to(seq_len, pad_id);
            b.input_ids.extend(r.input_ids);
            b.labels.extend(r.labels);
            b.position_ids.extend(r.position_ids);
            b.segment_ids.extend(r.segment_ids);
        }
        b
    }

    /// The same examples as **one row without padding**: each row's tokens before its padding,
    /// back to back, each its own segment, positions as they were, the label of each row's
    /// first token dropped (nothing predicts it, as in its own row). Attention that keeps
    /// segments apart without an `[s, s]` mask then gives the same loss and gradients as the
    /// padded rows without computing the padding (TRL's `padding_free`). `None` when there is
    /// nothing to remove: one row, no padding, or rows already packed.
    pub fn padding_free(&self) -> Option<Self> {
        let s = self.seq_len;
        if self.packed || self.batch_size < 2 || self.real_tokens >= self.batch_size * s {
            return None;
        }
        let mut out = Self {
            batch_size: 1,
            label_tokens: self.label_tokens,
            real_tokens: self.real_tokens,
            packed: true,
            ..Self::default()
        };
        for r in 0..self.batch_size {
            let row = r * s..(r + 1) * s;
            // Unpacked rows: the example is segment 0, its padding segment 1.
            let len = self.segment_ids[row.clone()]
                .iter()
                .take_while(|&&id| id == 0)
                .count();
            let keep = row.start..row.start + len;
            let start = out.input_ids.len();
            out.input_ids
                .extend_from_slice(&self.input_ids[keep.clone()]);
            out.labels.extend_from_slice(&self.labels[keep.clone()]);
            out.position_ids
                .extend_from_slice(&self.position_ids[keep.clone()]);
            out.segment_ids.extend(std::iter::repeat_n(r as u32, len));
            if let Some(first) = out.labels.get_mut(start) {
                *first = IGNORE_INDEX;
            }
        }
        out.seq_len = out.input_ids.len();
        out.row_lengths = vec![out.seq_len];
        Some(out)
    }

    /// One row per example (padding collation).
    pub fn padded(examples: &[&Example], pad_id: u32) -> Self {
        Self::collate(
            examples
                .iter()
                .map(|e| Sequence::pack(std::slice::from_ref(e)))
                .collect(),
            pad_id,
            None,
        )
    }
}

/// Best-fit-decreasing bin packing of `lengths` into bins of `capacity`: returns the bins as
/// lists of indices (each bin in decreasing length order). Deterministic: ties keep index
/// order. Items longer than `capacity` get a bin of their own.
pub fn best_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // (remaining capacity, bin index) of bins that still have room.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = lengths[i];
        match open.range((len, 0)..).next().copied() {
            Some((remaining, bin)) => {
                open.remove(&(remaining, bin));
                bins[bin].push(i);
                if remaining > len {
                    open.insert((remaining - len, bin));
                }
            }
            None => {
                bins.push(vec![i]);
                if capacity > len {
                    open.insert((capacity - len, bins.len() - 1));
                }
            }
        }
    }
    bins
}

/// Packs `examples` into rows of at most `capacity` tokens (best-fit decreasing); returns the
/// rows and the packing efficiency (tokens / (rows × capacity); a row holding one example
/// longer than `capacity` counts at its own length).
pub fn pack_examples(examples: &[Example], capacity: usize) -> (Vec<Sequence>, f64) {
    let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
    let bins = best_fit_decreasing(&lengths, capacity);
    let rows: Vec<Sequence> = bins
        .iter()
        .map(|bin| Sequence::pack(&bin.iter().map(|&i| &examples[i]).collect::<Vec<_>>()))
        .collect();
    let tokens: usize = lengths.iter().sum();
    let room: usize = rows.iter().map(|r| r.len().max(capacity)).sum();
    let efficiency = if rows.is_empty() {
        1.0
    } else {
        tokens as f64 / room as f64
    };
    (rows, efficiency)
}

/// Longest `max_length` (tokens of one example or packed row) a preparation accepts: far above
/// any real model's context, low enough that no row length overflows an index.
pub const MAX_LENGTH: usize = 1 << 20;

/// The training split as the loop visits it: one row per example, or (packing) examples packed
/// best-fit decreasing into rows of at most `max_length` tokens, with no attention across
/// them. Built once, by the preparation that owns `packing` and `max_length`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainRows {
    /// The rows.
    pub rows: Vec<Sequence>,
    /// With packing, the length the rows were packed up to (`max_length`); `None`: one
    /// example per row.
    pub packed_to: Option<usize>,
    /// With packing, tokens / (rows × `max_length`).
    pub packing_efficiency: Option<f64>,
}

impl TrainRows {
    /// One row per example.
    pub fn one_per_example(examples: &[Example]) -> Self {
        Self {
            rows: examples.iter().map(|e| Sequence::pack(&[e])).collect(),
            packed_to: None,
            packing_efficiency: None,
        }
    }

    /// `examples` packed into rows of at most `max_length` tokens ([`pack_examples`]).
    pub fn packed(examples: &[Example], max_length: usize) -> Self {
        let (rows, efficiency) = pack_examples(examples, max_length);
        Self {
            rows,
            packed_to: Some(max_length),
            packing_efficiency: Some(efficiency),
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when there is nothing to train on.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(row: usize, n: usize) -> Example {
        Example {
            row,
            input_ids: (0..n as u32).map(|t| t + 10 * row as u32).collect(),
            labels: (0..n as i32)
                .map(|t| if t == 0 { IGNORE_INDEX } else { t })
                .collect(),
        }
    }

    #[test]
    fn packed_rows_restart_positions_and_drop_boundary_labels() {
        let a = ex(1, 3);
        let b = ex(2, 2);
        let s = Sequence::pack(&[&a, &b]);
        assert_eq!(s.position_ids, [0, 1, 2, 0, 1]);
        assert_eq!(s.segment_ids, [0, 0, 0, 1, 1]);
        assert_eq!(s.labels[3], IGNORE_INDEX);
        assert_eq!(s.label_tokens(), a.label_tokens() + b.label_tokens());
    }

    #[test]
    fn padding_is_a_segment_without_labels() {
        let b = Batch::padded(&[&ex(1, 3), &ex(2, 1)], 99);
        assert_eq!(b.seq_len, 3);
        assert_eq!(&b.input_ids[3..], &[20, 99, 99]);
        assert_eq!(&b.labels[4..], &[IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(&b.segment_ids[3..], &[0, 1, 1]);
        assert_eq!(b.real_tokens, 4);
    }

    #[test]
    fn a_padding_free_batch_is_its_examples_packed_into_one_row() {
        for lengths in [&[3, 1][..], &[1, 5, 2, 5], &[4, 4, 1], &[2, 1, 1, 1, 1]] {
            let examples: Vec<Example> = lengths
                .iter()
                .enumerate()
                .map(|(i, &n)| ex(i + 1, n))
                .collect();
            let refs: Vec<&Example> = examples.iter().collect();
            let padded = Batch::padded(&refs, 99);
            let free = padded.padding_free().expect("padding to remove");
            assert_eq!(free, Batch::collate(vec![Sequence::pack(&refs)], 99, None));
            assert_eq!(free.label_tokens, padded.label_tokens);
            assert_eq!(free.real_tokens, padded.real_tokens);
            assert_eq!(free.seq_len, lengths.iter().sum::<usize>());
        }
        // Nothing to remove: equal lengths, one row, or packed rows.
        let (a, b, c) = (ex(1, 3), ex(2, 3), ex(3, 2));
        assert_eq!(Batch::padded(&[&a, &b], 0).padding_free(), None);
        assert_eq!(Batch::padded(&[&c], 0).padding_free(), None);
        let packed = Batch::collate(
            vec![Sequence::pack(&[&a, &c]), Sequence::pack(&[&b])],
            0,
            None,
        );
        assert_eq!(packed.padding_free(), None);
    }

    #[test]
    fn bfd_fills_the_tightest_bin() {
        let bins = best_fit_decreasing(&[5, 4, 3, 2, 2, 1], 6);
        assert_eq!(bins, vec![vec![0, 5], vec![1, 3], vec![2, 4]]);
    }

    #[test]
    fn truncation_modes() {
        assert!(matches!(
            fit(ex(0, 5), 3, Truncation::Truncate),
            Fitted::Truncated { lost: 2, .. }
        ));
        assert_eq!(
            fit(ex(0, 5), 3, Truncation::Drop),
            Fitted::Dropped { tokens: 5 }
        );
        assert!(matches!(
            fit(ex(0, 3), 3, Truncation::Drop),
            Fitted::Unchanged(_)
        ));
    }
}
