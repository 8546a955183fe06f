//! The process's allocator: mimalloc, told to keep the memory it frees, and for the `cpu`
//! backend's large blocks a best-fit heap of its own.
//!
//! Data preparation allocates many small strings and vectors; mimalloc makes it ~20 % faster
//! than glibc's allocator (measured with `cargo xtask bench-data`). A training step allocates
//! and frees hundreds of tensor buffers of many megabytes each. By default mimalloc returns
//! freed memory to the kernel after a delay (`purge_delay`, 1 s in mimalloc 3), and the next
//! step faults it back in, every page zeroed by the kernel: on SmolLM2-135M (cpu backend,
//! sequence 512) 17 % of the process's samples were the kernel zeroing pages. Keeping the
//! memory (the way PyTorch's caching allocators keep theirs) made that step 45 % faster for
//! 8 % more peak RSS (`docs/benchmarks.md`). `MIMALLOC_PURGE_DELAY` set in the environment
//! still wins.
//!
//! mimalloc is built with `override` (`libmimalloc-sys`), so the executable defines C's
//! `malloc`, `free`, `posix_memalign`… and every C and C++ library of the process allocates
//! through mimalloc too, as glibc documents for replacing `malloc`. That matters for the tch
//! backend: libtorch allocates its tensors with `posix_memalign`, and glibc returns each large
//! buffer to the kernel on `free` (`munmap`), so libtorch's steps paid the same page faults
//! and zeroing. On SmolLM2-135M (tch, sequence 512) the override made steady-state steps
//! 13.7 % faster and peak RSS 16 % lower (4.46 → 3.76 GB) in interleaved runs; the cpu
//! backend's figures did not change.
//!
//! Once the `cpu` backend is chosen ([`place_large_blocks`]), blocks of [`LARGE_MIN`] bytes or
//! more that Rust allocates (its tensors) do not go to mimalloc: [`LargeBlocks`] places them by
//! best fit, merging freed neighbours, in segments it maps from the kernel and keeps. mimalloc serves such blocks from its arenas
//! first-fit in 64 KiB slices, and the freed spans it keeps accumulate: on SmolLM2-135M (cpu,
//! batch 2 × 512) its peak RSS stood 0.5–0.6 GiB above the live peak of the heap; with best fit
//! the blocks' memory stays within 1 % of their live peak (`ranges.rs`, and
//! `docs/benchmarks.md`, eleventh part). C's `malloc` (libtorch) stays with mimalloc.

mod ranges;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[global_allocator]
static GLOBAL: TrainAllocator = TrainAllocator;

/// Smallest block [`LargeBlocks`] places; smaller ones are mimalloc's.
pub const LARGE_MIN: usize = 1 << 20;
/// Blocks are placed in multiples of this (and aligned to the kernel's pages at least).
const GRANULE: usize = 64 << 10;
/// Least length of a segment mapped from the kernel; a larger block gets a segment its size.
const SEGMENT: usize = 256 << 20;
/// Most alignment a large block gets (a segment's base is page aligned, offsets are granules).
const MAX_ALIGN: usize = 4096;

/// The process's global allocator: [`LargeBlocks`] for blocks of [`LARGE_MIN`] bytes and
/// more, mimalloc for the rest and whenever the kernel refuses a new segment.
pub struct TrainAllocator;

/// Large blocks: best fit with coalescing ([`ranges::Ranges`]) over segments mapped once and
/// never returned, so that freed memory is reused without the kernel zeroing it again.
struct LargeBlocks {
    ranges: ranges::Ranges,
    /// Base address and length of each segment, by segment index.
    segments: Vec<(usize, usize)>,
}

static LARGE: Mutex<LargeBlocks> = Mutex::new(LargeBlocks {
    ranges: ranges::Ranges::new(),
    segments: Vec::new(),
});

/// Whether new large blocks go to [`LargeBlocks`] ([`place_large_blocks`]); never unset.
static PLACING: AtomicBool = AtomicBool::new(false);

/// From now on, place blocks of [`LARGE_MIN`] bytes or more in [`LargeBlocks`]. Called when the
/// `cpu` backend is chosen: its tensors are Rust allocations. The `tch` and `cuda` backends keep
/// their tensors elsewhere (libtorch's through C's `malloc`, GPU memory), and memory kept in
/// segments could not serve them: Rust's buffers of model loading would stay resident beside
/// libtorch's (`docs/benchmarks.md`, eleventh part).
pub fn place_large_blocks() {
    PLACING.store(true, Ordering::Relaxed);
}

/// Whether a block of this layout may lie in a segment (it does only if the segments hold its
/// address): the test for freeing, independent of [`PLACING`].
fn may_be_large(layout: Layout) -> bool {
    layout.size() >= LARGE_MIN && layout.align() <= MAX_ALIGN
}

/// Whether a new block of this layout goes to [`LargeBlocks`].
fn is_large(layout: Layout) -> bool {
    may_be_large(layout) && PLACING.load(Ordering::Relaxed)
}

fn granules(size: usize) -> usize {
    size.div_ceil(GRANULE) * GRANULE
}

fn large() -> std::sync::MutexGuard<'static, LargeBlocks> {
    // Nothing panics while the lock is held; a poisoned lock holds consistent ranges anyway.
    LARGE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Maps `len` bytes of zeroed, private memory (`None` when the kernel refuses).
#[cfg(unix)]
#[allow(unsafe_code)]
fn map_segment(len: usize) -> Option<usize> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choice touches no
    // existing memory; the result is checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as usize)
}

#[cfg(not(unix))]
fn map_segment(_len: usize) -> Option<usize> {
    None
}

impl LargeBlocks {
    /// A block of `size` bytes, and how many of its first bytes may hold old data.
    fn alloc(&mut self, size: usize) -> Option<(*mut u8, usize)> {
        let len = granules(size);
        let placed = match self.ranges.take(len) {
            Some(p) => p,
            None => {
                let seg_len = len.max(SEGMENT).next_multiple_of(2 << 20);
                let base = map_segment(seg_len)?;
                let id = self.ranges.add_segment(seg_len);
                debug_assert_eq!(id, self.segments.len());
                self.segments.push((base, seg_len));
                self.ranges.take(len)?
            }
        };
        let (base, _) = self.segments[placed.segment];
        let ptr = (base + placed.offset) as *mut u8;
        Some((ptr, placed.used_before.min(size)))
    }

    /// The segment `ptr` lies in, and its offset there.
    fn locate(&self, ptr: *mut u8) -> Option<(usize, usize)> {
        let addr = ptr as usize;
        self.segments
            .iter()
            .position(|&(base, len)| addr >= base && addr < base + len)
            .map(|segment| (segment, addr - self.segments[segment].0))
    }

    /// Frees `ptr` if it lies in a segment (`false`: not one of ours).
    fn dealloc(&mut self, ptr: *mut u8, size: usize) -> bool {
        let Some((segment, offset)) = self.locate(ptr) else {
            return false;
        };
        self.ranges.give_back(segment, offset, granules(size));
        true
    }

    fn owns(&self, ptr: *mut u8) -> bool {
        self.locate(ptr).is_some()
    }
}

impl TrainAllocator {
    /// A large block, zeroed when asked; null when neither heap has memory.
    #[allow(unsafe_code)]
    unsafe fn alloc_large(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let placed = large().alloc(layout.size());
        match placed {
            Some((ptr, used_before)) => {
                if zeroed && used_before > 0 {
                    // SAFETY: the block is ours and at least `used_before` bytes long; the
                    // bytes past it have never been written since the kernel zeroed them.
                    unsafe { std::ptr::write_bytes(ptr, 0, used_before) };
                }
                ptr
            }
            // SAFETY: forwarded with the caller's layout.
            None if zeroed => unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) },
            None => unsafe { mimalloc::MiMalloc.alloc(layout) },
        }
    }
}

// SAFETY: large blocks come from segments this allocator mapped and never unmaps, placed
// without overlap (`ranges`' property test), aligned to GRANULE within page-aligned segments
// (MAX_ALIGN or less is asked of them) and at least `layout.size()` long; every other block
// is mimalloc's, and a block is freed by the heap it came from (`LargeBlocks::dealloc` says
// whether an address lies in a segment).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for TrainAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout) {
            // SAFETY: forwarded with the caller's layout.
            return unsafe { self.alloc_large(layout, false) };
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout) {
            // SAFETY: forwarded with the caller's layout.
            return unsafe { self.alloc_large(layout, true) };
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if may_be_large(layout) && large().dealloc(ptr, layout.size()) {
            return;
        }
        // SAFETY: not in a segment, so the block is mimalloc's.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, does not
        // overflow `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let ours = may_be_large(layout) && large().owns(ptr);
        if !ours && !is_large(new_layout) {
            // SAFETY: the block is mimalloc's, and the new one is to be too.
            return unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) };
        }
        if ours && may_be_large(new_layout) && granules(layout.size()) == granules(new_size) {
            // The same granules hold the new size.
            return ptr;
        }
        // SAFETY: a fresh block of the new layout, the old one's bytes copied (the shorter of
        // the two lengths), then the old one freed by its own heap.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (the 16th option;
/// `libmimalloc-sys` names only some of them). The test below checks the number against the
/// option's documented default.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never purge freed memory (`purge_delay = -1`), unless the environment chose a delay.
/// Called first thing in `main`, before any other thread exists (`mi_option_set` is not
/// thread safe).
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` takes an option number and a value and touches nothing else;
    // the number is in range (see the test) and no other thread is running yet.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large blocks come from the segments, hold what is written, are zeroed when asked even
    /// where an earlier block left data, and grow and shrink by copying.
    #[test]
    #[allow(unsafe_code)]
    fn large_blocks_are_placed_zeroed_and_reallocated() {
        place_large_blocks();
        let layout = Layout::from_size_align(3 << 20, 64).unwrap();
        // SAFETY: every block is used within its layout and freed with it.
        unsafe {
            let a = GLOBAL.alloc(layout);
            assert!(!a.is_null());
            assert!(large().owns(a), "a 3 MiB block is not in a segment");
            assert_eq!(a as usize % 64, 0);
            std::ptr::write_bytes(a, 0xAB, layout.size());
            GLOBAL.dealloc(a, layout);
            // The best fit for the same size is where `a` was (or another freed range):
            // whatever it held, alloc_zeroed returns zeros.
            let z = GLOBAL.alloc_zeroed(layout);
            assert!(
                std::slice::from_raw_parts(z, layout.size())
                    .iter()
                    .all(|&b| b == 0)
            );
            std::ptr::write_bytes(z, 0x5A, layout.size());
            let grown = GLOBAL.realloc(z, layout, 5 << 20);
            let kept = std::slice::from_raw_parts(grown, layout.size());
            assert!(kept.iter().all(|&b| b == 0x5A), "realloc lost the data");
            let grown_layout = Layout::from_size_align(5 << 20, 64).unwrap();
            let small = GLOBAL.realloc(grown, grown_layout, 4096);
            assert!(!large().owns(small), "a 4 KiB block is mimalloc's");
            assert!(
                std::slice::from_raw_parts(small, 4096)
                    .iter()
                    .all(|&b| b == 0x5A)
            );
            GLOBAL.dealloc(small, Layout::from_size_align(4096, 64).unwrap());
        }
        // Through the ordinary collections too.
        let v = vec![7u64; 1 << 18];
        assert!(large().owns(v.as_ptr().cast_mut().cast()));
        assert_eq!(v.iter().sum::<u64>(), 7 << 18);
    }

    /// Threads allocating, filling, checking, growing and freeing large blocks at once (as the
    /// cpu backend's thread pool and data-parallel workers do): no block is handed to two
    /// owners, and every block keeps what its owner wrote.
    #[test]
    fn large_blocks_from_many_threads_never_overlap() {
        place_large_blocks();
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut kept: Vec<(u8, Vec<u8>)> = Vec::new();
                    for i in 0..64usize {
                        let len = (1 << 20) + ((i * 7919 + usize::from(t) * 104_729) % (3 << 20));
                        let mark = t.wrapping_mul(64).wrapping_add(i as u8);
                        let mut v = vec![mark; len];
                        if i % 3 == 0 {
                            v.resize(len + (1 << 20), mark);
                        }
                        kept.push((mark, v));
                        if i % 2 == 1 {
                            let (mark, old) = kept.swap_remove(i % kept.len());
                            assert!(old.iter().all(|&b| b == mark), "a block was overwritten");
                        }
                    }
                    for (mark, v) in &kept {
                        assert!(v.iter().all(|b| b == mark), "a block was overwritten");
                    }
                    kept.len()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 32);
        }
    }

    #[allow(unsafe_code)]
    fn purge_delay() -> std::ffi::c_long {
        // SAFETY: reads one option by its number.
        unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
    }

    /// C's `malloc` (what libtorch calls) is mimalloc's: a block from it lies in mimalloc's
    /// heap (one from glibc's allocator would not).
    #[test]
    #[allow(unsafe_code)]
    fn c_malloc_is_mimalloc() {
        // SAFETY: a plain allocation, checked and freed with the same allocator.
        unsafe {
            let p = libc::malloc(1 << 20);
            assert!(!p.is_null());
            let owned = libmimalloc_sys::mi_is_in_heap_region(p.cast_const());
            libc::free(p);
            assert!(owned, "C malloc does not allocate from mimalloc's heap");
        }
    }

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            // The environment chose; keep_freed_memory leaves it alone.
            let before = purge_delay();
            keep_freed_memory();
            assert_eq!(purge_delay(), before);
            return;
        }
        // mimalloc 3's documented default for purge_delay (options.c): no other option
        // defaults to 1000, so this pins the option number.
        assert_eq!(purge_delay(), 1000);
        keep_freed_memory();
        assert_eq!(purge_delay(), -1);
    }
}
