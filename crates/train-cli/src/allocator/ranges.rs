//! The bookkeeping of the large-block heap (`super::LargeBlocks`): best-fit placement with
//! coalescing over segments, in offsets only, so that it is tested without touching memory.
//!
//! Why best fit: replaying the ≥ 1 MiB allocations of three SmolLM2-135M training steps (cpu
//! backend, batch 2 × 512; `docs/benchmarks.md`, eleventh part) against placement policies, with
//! 256 MiB segments, the memory ever touched was 2,322 MiB for best fit with coalescing against a
//! live peak of 2,308 MiB; first fit touched 2,512 MiB and one free list per exact size (a
//! caching allocator without splitting) 3,022 MiB.

use std::collections::{BTreeMap, BTreeSet};

/// One segment: its length, its free ranges (offset → length) and how far into it blocks were
/// ever placed (everything past `touched` is still the kernel's zeroed memory).
#[derive(Debug)]
struct Segment {
    len: usize,
    free: BTreeMap<usize, usize>,
    touched: usize,
}

/// Where a block was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Index of the segment ([`Ranges::add_segment`]'s return value).
    pub segment: usize,
    /// Offset of the block in the segment.
    pub offset: usize,
    /// How many of the block's first bytes were handed out before (may hold old data); the
    /// rest has never been used and reads as zeros.
    pub used_before: usize,
}

/// Free space of the segments. Every length and offset the caller passes must be a multiple of
/// one granule (the caller's rounding); `Ranges` itself works in bytes.
#[derive(Debug)]
pub struct Ranges {
    segments: Vec<Segment>,
    /// Every free range as (length, segment, offset): the first at or after `(len, 0, 0)` is the
    /// smallest that holds `len`, the lowest segment and offset among equals.
    by_len: BTreeSet<(usize, usize, usize)>,
}

impl Ranges {
    /// No segment yet.
    pub const fn new() -> Self {
        Self {
            segments: Vec::new(),
            by_len: BTreeSet::new(),
        }
    }

    /// Adds a free segment of `len` bytes; returns its index.
    pub fn add_segment(&mut self, len: usize) -> usize {
        let id = self.segments.len();
        self.segments.push(Segment {
            len,
            free: BTreeMap::from([(0, len)]),
            touched: 0,
        });
        self.by_len.insert((len, id, 0));
        id
    }

    /// Places a block of `len` bytes in the smallest free range that holds it (best fit), at
    /// that range's start; `None` when no range is large enough.
    pub fn take(&mut self, len: usize) -> Option<Placement> {
        let &(free_len, segment, offset) = self.by_len.range((len, 0, 0)..).next()?;
        self.by_len.remove(&(free_len, segment, offset));
        let s = &mut self.segments[segment];
        s.free.remove(&offset);
        if free_len > len {
            s.free.insert(offset + len, free_len - len);
            self.by_len.insert((free_len - len, segment, offset + len));
        }
        let used_before = s.touched.saturating_sub(offset).min(len);
        s.touched = s.touched.max(offset + len);
        Some(Placement {
            segment,
            offset,
            used_before,
        })
    }

    /// Frees the block of `len` bytes at `offset` of `segment` (as placed by [`Ranges::take`]),
    /// merging it with the free ranges on either side.
    pub fn give_back(&mut self, segment: usize, offset: usize, len: usize) {
        let Some(s) = self.segments.get_mut(segment) else {
            return;
        };
        debug_assert!(offset + len <= s.len, "block past its segment");
        let (mut start, mut merged) = (offset, len);
        if let Some((&before, &before_len)) = s.free.range(..offset).next_back()
            && before + before_len == offset
        {
            s.free.remove(&before);
            self.by_len.remove(&(before_len, segment, before));
            start = before;
            merged += before_len;
        }
        if let Some(after_len) = s.free.remove(&(offset + len)) {
            self.by_len.remove(&(after_len, segment, offset + len));
            merged += after_len;
        }
        debug_assert!(
            s.free.range(start..start + merged).next().is_none(),
            "block freed twice"
        );
        s.free.insert(start, merged);
        self.by_len.insert((merged, segment, start));
    }

    /// Bytes of every segment that were ever handed out.
    #[cfg(test)]
    pub fn touched(&self) -> usize {
        self.segments.iter().map(|s| s.touched).sum()
    }

    /// Bytes free in every segment.
    #[cfg(test)]
    pub fn free_bytes(&self) -> usize {
        self.segments.iter().flat_map(|s| s.free.values()).sum()
    }

    /// The free ranges of a segment, in address order.
    #[cfg(test)]
    fn free_ranges(&self, segment: usize) -> Vec<(usize, usize)> {
        self.segments[segment]
            .free
            .iter()
            .map(|(&o, &l)| (o, l))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn best_fit_takes_the_smallest_range_that_holds_the_block() {
        let mut r = Ranges::new();
        let seg = r.add_segment(100);
        let a = r.take(30).unwrap();
        let b = r.take(10).unwrap();
        let c = r.take(20).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, 30, 40));
        // Free ranges now: [0, 30) and [60, 100) once a is freed; 25 fits both, best fit is
        // the 30 at 0, not the 40 at 60.
        r.give_back(seg, a.offset, 30);
        let d = r.take(25).unwrap();
        assert_eq!(d.offset, 0);
        assert_eq!(d.used_before, 25, "reused memory is reported as used");
        let e = r.take(40).unwrap();
        assert_eq!(
            (e.offset, e.used_before),
            (60, 0),
            "fresh memory is reported as unused"
        );
        assert!(r.take(6).is_none(), "only 5 bytes are left");
        assert_eq!(r.take(5).unwrap().offset, 25);
    }

    #[test]
    fn freed_neighbours_merge_into_one_range() {
        let mut r = Ranges::new();
        let seg = r.add_segment(64);
        let blocks: Vec<Placement> = (0..4).map(|_| r.take(16).unwrap()).collect();
        r.give_back(seg, blocks[0].offset, 16);
        r.give_back(seg, blocks[2].offset, 16);
        assert_eq!(r.free_ranges(seg), vec![(0, 16), (32, 16)]);
        r.give_back(seg, blocks[1].offset, 16);
        assert_eq!(r.free_ranges(seg), vec![(0, 48)]);
        r.give_back(seg, blocks[3].offset, 16);
        assert_eq!(r.free_ranges(seg), vec![(0, 64)]);
        assert_eq!(
            r.take(64).unwrap().offset,
            0,
            "the whole segment is one range again"
        );
    }

    #[test]
    fn a_block_goes_to_the_segment_with_the_tightest_range() {
        let mut r = Ranges::new();
        let first = r.add_segment(100);
        let second = r.add_segment(50);
        let p = r.take(40).unwrap();
        assert_eq!((p.segment, p.offset), (second, 0));
        let q = r.take(60).unwrap();
        assert_eq!((q.segment, q.offset), (first, 0));
        assert!(r.take(50).is_none());
    }

    proptest! {
        /// Any sequence of allocations and frees: blocks never overlap, stay inside their
        /// segment, `used_before` covers exactly the bytes handed out before, and freeing
        /// everything leaves every segment one free range.
        #[test]
        fn blocks_never_overlap_and_everything_merges_back(
            ops in proptest::collection::vec((1usize..40, any::<bool>(), any::<prop::sample::Index>()), 1..200)
        ) {
            let mut r = Ranges::new();
            let sizes = [128usize, 64, 256];
            for len in sizes {
                r.add_segment(len);
            }
            // What each byte last held: None never used, Some(false) free, Some(true) live.
            let mut bytes: Vec<Vec<Option<bool>>> = sizes.iter().map(|&n| vec![None; n]).collect();
            let mut live: Vec<(Placement, usize)> = Vec::new();
            for (len, free, pick) in ops {
                if free && !live.is_empty() {
                    let (p, l) = live.swap_remove(pick.index(live.len()));
                    r.give_back(p.segment, p.offset, l);
                    for b in &mut bytes[p.segment][p.offset..p.offset + l] {
                        *b = Some(false);
                    }
                    continue;
                }
                if let Some(p) = r.take(len) {
                    let span = &mut bytes[p.segment][p.offset..p.offset + len];
                    prop_assert!(span.iter().all(|b| *b != Some(true)), "overlap");
                    let used = span.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
                    prop_assert!(p.used_before >= used, "old data not reported");
                    for b in span.iter_mut() {
                        *b = Some(true);
                    }
                    live.push((p, len));
                } else {
                    // Nothing was free that long.
                    for (s, seg) in bytes.iter().enumerate() {
                        let longest = seg
                            .split(|b| *b == Some(true))
                            .map(<[Option<bool>]>::len)
                            .max()
                            .unwrap_or(0);
                        prop_assert!(longest < len, "segment {s} had {longest} free bytes in a row");
                    }
                }
            }
            let touched: usize = bytes.iter().flatten().filter(|b| b.is_some()).count();
            prop_assert!(r.touched() >= touched);
            for (p, l) in live.drain(..) {
                r.give_back(p.segment, p.offset, l);
            }
            prop_assert_eq!(r.free_bytes(), sizes.iter().sum::<usize>());
            for (s, &n) in sizes.iter().enumerate() {
                prop_assert_eq!(r.free_ranges(s), vec![(0, n)]);
            }
        }
    }
}
