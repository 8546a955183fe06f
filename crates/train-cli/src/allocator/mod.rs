//! The process's allocator: mimalloc, told to keep the memory it frees, and once a backend
//! that trains on the host is chosen a best-fit heap of its own for large blocks, of Rust and
//! of C alike.
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
//! The executable defines C's `malloc`, `free`, `posix_memalign`… ([`c`]), so every C and C++
//! library of the process allocates through this module too, as glibc documents for replacing
//! `malloc`. That matters for the tch backend: libtorch allocates its tensors with
//! `posix_memalign`, and glibc returns each large buffer to the kernel on `free` (`munmap`), so
//! libtorch's steps paid the same page faults and zeroing. On SmolLM2-135M (tch, sequence 512)
//! sending C's allocations to mimalloc made steady-state steps 13.7 % faster and peak RSS 16 %
//! lower (4.46 → 3.76 GB) in interleaved runs.
//!
//! Once the `cpu` or `tch` backend is chosen ([`place_large_blocks`]), blocks of [`LARGE_MIN`]
//! bytes or more (Rust's tensors and libtorch's) do not go to mimalloc: [`LargeBlocks`] places
//! them by best fit, merging freed neighbours, in segments it maps from the kernel and keeps.
//! mimalloc serves such blocks from its arenas first-fit in 64 KiB slices, and the freed spans
//! it keeps accumulate: on SmolLM2-135M (batch 2 × 512) its peak RSS stood 0.5–0.6 GiB above
//! the live peak of the heap on `cpu`, ~0.4 GiB on `tch`; with best fit the blocks' memory
//! stays within 1 % of their live peak (`ranges.rs`, and `docs/benchmarks.md`, eleventh and
//! twelfth parts). One heap for both languages also lets libtorch reuse the memory that Rust's
//! buffers of model loading held.

// Defining `malloc` replaces glibc's (ELF symbol interposition); other systems keep their own.
#[cfg(target_os = "linux")]
mod c;
mod ranges;

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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
/// Most segments ever mapped (1 TiB of 256 MiB segments); past it large blocks are mimalloc's.
const MAX_SEGMENTS: usize = 4096;

/// The process's global allocator: [`LargeBlocks`] for blocks of [`LARGE_MIN`] bytes and
/// more, mimalloc for the rest and whenever the kernel refuses a new segment.
pub struct TrainAllocator;

/// Large blocks: best fit with coalescing ([`ranges::Ranges`]) over segments mapped once and
/// never returned, so that freed memory is reused without the kernel zeroing it again.
struct LargeBlocks {
    ranges: ranges::Ranges,
    /// Length (whole granules) of every block handed out, by address: C's `free` and
    /// `malloc_usable_size` are not told it.
    lens: BTreeMap<usize, usize>,
}

static LARGE: Mutex<LargeBlocks> = Mutex::new(LargeBlocks {
    ranges: ranges::Ranges::new(),
    lens: BTreeMap::new(),
});

/// Base address and length of each segment, by segment index: written under [`LARGE`]'s lock
/// before [`SEGMENT_COUNT`] publishes them, read without it (a segment is never unmapped, so
/// an entry once published never changes). `free` asks whether an address is ours for every
/// block C frees, most of them small ones of mimalloc's.
static SEGMENT_BASE: [AtomicUsize; MAX_SEGMENTS] = [const { AtomicUsize::new(0) }; MAX_SEGMENTS];
static SEGMENT_LEN: [AtomicUsize; MAX_SEGMENTS] = [const { AtomicUsize::new(0) }; MAX_SEGMENTS];
static SEGMENT_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Whether new large blocks go to [`LargeBlocks`] ([`place_large_blocks`]); never unset.
static PLACING: AtomicBool = AtomicBool::new(false);

/// From now on, place blocks of [`LARGE_MIN`] bytes or more in [`LargeBlocks`], Rust's and C's.
/// Called when the `cpu` or `tch` backend is chosen: their tensors are host allocations (Rust's,
/// libtorch's through C's `malloc`). The `cuda` backend's live in GPU memory.
pub fn place_large_blocks() {
    PLACING.store(true, Ordering::Relaxed);
}

/// Whether a block of this layout may lie in a segment (it does only if the segments hold its
/// address): the test for freeing, independent of [`PLACING`].
fn may_be_large(layout: Layout) -> bool {
    layout.size() >= LARGE_MIN && layout.align() <= MAX_ALIGN
}

/// Whether a new block of `size` bytes aligned to `align` goes to [`LargeBlocks`].
fn is_large(size: usize, align: usize) -> bool {
    size >= LARGE_MIN && align <= MAX_ALIGN && PLACING.load(Ordering::Relaxed)
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

/// Whether `ptr` lies in a segment (then [`LargeBlocks`] placed it). Takes no lock.
fn in_segment(ptr: *const u8) -> bool {
    LargeBlocks::locate(ptr).is_some()
}

/// Alignment of a segment's base: the size of a transparent huge page on x86-64 and aarch64.
const HUGE_PAGE: usize = 2 << 20;

/// Maps `len` bytes (a multiple of [`HUGE_PAGE`]) of zeroed, private memory at a base aligned to
/// [`HUGE_PAGE`], and asks the kernel to back it with transparent huge pages (`None` when the
/// kernel refuses the mapping). mimalloc asks the same for its arenas: without it a SmolLM2 step
/// on the tch backend ran 4–8 % slower from this heap than from mimalloc's (`docs/benchmarks.md`,
/// twelfth part): a 3 GB working set in 4 KiB pages misses the TLB.
#[cfg(unix)]
#[allow(unsafe_code)]
fn map_segment(len: usize) -> Option<usize> {
    let padded = len.checked_add(HUGE_PAGE)?;
    // SAFETY: an anonymous private mapping at an address of the kernel's choice touches no
    // existing memory; the result is checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            padded,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    let start = p as usize;
    let base = start.next_multiple_of(HUGE_PAGE);
    let (head, tail) = (base - start, start + padded - (base + len));
    // SAFETY: the head and the tail lie inside the mapping just made, outside [base, base +
    // len), and nothing uses them; madvise only advises on the segment itself. A failure of
    // either leaves memory mapped but unused (munmap) or in small pages (madvise).
    unsafe {
        if head > 0 {
            libc::munmap(start as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((base + len) as *mut libc::c_void, tail);
        }
        libc::madvise(base as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    Some(base)
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
                let id = SEGMENT_COUNT.load(Ordering::Relaxed);
                if id == MAX_SEGMENTS {
                    return None;
                }
                let seg_len = len.max(SEGMENT).next_multiple_of(HUGE_PAGE);
                let base = map_segment(seg_len)?;
                let added = self.ranges.add_segment(seg_len);
                debug_assert_eq!(added, id);
                SEGMENT_BASE[id].store(base, Ordering::Relaxed);
                SEGMENT_LEN[id].store(seg_len, Ordering::Relaxed);
                SEGMENT_COUNT.store(id + 1, Ordering::Release);
                self.ranges.take(len)?
            }
        };
        let ptr = SEGMENT_BASE[placed.segment].load(Ordering::Relaxed) + placed.offset;
        self.lens.insert(ptr, len);
        Some((ptr as *mut u8, placed.used_before.min(size)))
    }

    /// The segment `ptr` lies in, and its offset there. Takes no lock.
    fn locate(ptr: *const u8) -> Option<(usize, usize)> {
        let addr = ptr as usize;
        let count = SEGMENT_COUNT.load(Ordering::Acquire);
        (0..count).find_map(|i| {
            let base = SEGMENT_BASE[i].load(Ordering::Relaxed);
            (addr >= base && addr - base < SEGMENT_LEN[i].load(Ordering::Relaxed))
                .then_some((i, addr - base))
        })
    }

    /// Frees the block at `offset` of `segment` that starts at `ptr` ([`free_large`]); an
    /// address that starts no block (a caller's bug) is left alone.
    fn dealloc(&mut self, segment: usize, offset: usize, ptr: *const u8) {
        if let Some(len) = self.lens.remove(&(ptr as usize)) {
            self.ranges.give_back(segment, offset, len);
        }
    }

    /// The length of the block at `ptr` (whole granules), if it is one of ours.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn len_of(&self, ptr: *const u8) -> Option<usize> {
        self.lens.get(&(ptr as usize)).copied()
    }
}

/// Frees `ptr` if it lies in a segment (one scan of the segment table, then the lock); `false`:
/// the block is not ours.
fn free_large(ptr: *const u8) -> bool {
    let Some((segment, offset)) = LargeBlocks::locate(ptr) else {
        return false;
    };
    large().dealloc(segment, offset, ptr);
    true
}

/// A block of `size` bytes from the segments, zeroed when asked (only its bytes that an earlier
/// block used are written); `None` when the kernel refuses a segment.
#[allow(unsafe_code)]
fn alloc_large(size: usize, zeroed: bool) -> Option<*mut u8> {
    let (ptr, used_before) = large().alloc(size)?;
    if zeroed && used_before > 0 {
        // SAFETY: the block is ours and at least `used_before` bytes long; the bytes past it
        // have never been written since the kernel zeroed them.
        unsafe { std::ptr::write_bytes(ptr, 0, used_before) };
    }
    Some(ptr)
}

// SAFETY: large blocks come from segments this allocator mapped and never unmaps, placed
// without overlap (`ranges`' property test), aligned to GRANULE within page-aligned segments
// (MAX_ALIGN or less is asked of them) and at least `layout.size()` long; every other block
// is mimalloc's, and a block is freed by the heap it came from (`free_large` frees it when its
// address lies in a segment).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for TrainAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align())
            && let Some(ptr) = alloc_large(layout.size(), false)
        {
            return ptr;
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(layout.size(), layout.align())
            && let Some(ptr) = alloc_large(layout.size(), true)
        {
            return ptr;
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if may_be_large(layout) && free_large(ptr) {
            return;
        }
        // SAFETY: not in a segment, so the block is mimalloc's.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`, does not
        // overflow `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let ours = may_be_large(layout) && in_segment(ptr);
        if !ours && !is_large(new_size, layout.align()) {
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
            assert!(in_segment(a), "a 3 MiB block is not in a segment");
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
            assert!(!in_segment(small), "a 4 KiB block is mimalloc's");
            assert!(
                std::slice::from_raw_parts(small, 4096)
                    .iter()
                    .all(|&b| b == 0x5A)
            );
            GLOBAL.dealloc(small, Layout::from_size_align(4096, 64).unwrap());
        }
        // Through the ordinary collections too.
        let v = vec![7u64; 1 << 18];
        assert!(in_segment(v.as_ptr().cast()));
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

    /// C's allocation functions (what libtorch calls) are this module's: small blocks lie in
    /// mimalloc's heap (one from glibc's allocator would not), large ones in a segment once
    /// placing is on; `calloc` zeroes over old data, `realloc` keeps the bytes across the
    /// threshold both ways, the aligned functions align, and `malloc_usable_size` covers the
    /// size asked.
    #[test]
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    fn c_allocations_go_to_mimalloc_or_the_segments() {
        place_large_blocks();
        let mi_owns = |p: *mut libc::c_void| {
            // SAFETY: reads mimalloc's arena bookkeeping for an address.
            unsafe { libmimalloc_sys::mi_is_in_heap_region(p.cast_const()) }
        };
        // SAFETY: every block is used within its size and freed once with `free`.
        unsafe {
            let small = libc::malloc(4096);
            assert!(!small.is_null() && mi_owns(small) && !in_segment(small.cast()));
            assert!(libc::malloc_usable_size(small) >= 4096);
            libc::free(small);

            let big = libc::malloc(3 << 20);
            assert!(
                in_segment(big.cast()),
                "a 3 MiB C block is not in a segment"
            );
            assert!(libc::malloc_usable_size(big) >= 3 << 20);
            std::ptr::write_bytes(big.cast::<u8>(), 0xC3, 3 << 20);
            libc::free(big);
            // Best fit puts a block of the same size where `big` was (or in another freed
            // range): calloc must zero whatever is there.
            let z = libc::calloc(3 << 18, 4);
            assert!(in_segment(z.cast()));
            assert!(
                std::slice::from_raw_parts(z.cast::<u8>(), 3 << 20)
                    .iter()
                    .all(|&b| b == 0)
            );
            std::ptr::write_bytes(z.cast::<u8>(), 0x3C, 3 << 20);
            let grown = libc::realloc(z, 5 << 20);
            assert!(in_segment(grown.cast()));
            assert!(
                std::slice::from_raw_parts(grown.cast::<u8>(), 3 << 20)
                    .iter()
                    .all(|&b| b == 0x3C)
            );
            let shrunk = libc::realloc(grown, 100);
            assert!(!in_segment(shrunk.cast()), "a 100-byte block is mimalloc's");
            assert!(
                std::slice::from_raw_parts(shrunk.cast::<u8>(), 100)
                    .iter()
                    .all(|&b| b == 0x3C)
            );
            let regrown = libc::realloc(shrunk, 2 << 20);
            assert!(in_segment(regrown.cast()));
            assert!(
                std::slice::from_raw_parts(regrown.cast::<u8>(), 100)
                    .iter()
                    .all(|&b| b == 0x3C)
            );
            libc::free(regrown);

            // libtorch's CPU tensors: posix_memalign with 64-byte alignment.
            let mut p = std::ptr::null_mut();
            assert_eq!(libc::posix_memalign(&mut p, 64, 2 << 20), 0);
            assert!(in_segment(p.cast()) && (p as usize).is_multiple_of(64));
            libc::free(p);
            // An alignment past a segment's pages goes to mimalloc, aligned.
            assert_eq!(libc::posix_memalign(&mut p, 1 << 21, 2 << 20), 0);
            assert!(!in_segment(p.cast()) && (p as usize).is_multiple_of(1 << 21));
            libc::free(p);
            assert_eq!(libc::posix_memalign(&mut p, 24, 64), libc::EINVAL);
            let a = libc::aligned_alloc(4096, 1 << 20);
            assert!(in_segment(a.cast()) && (a as usize).is_multiple_of(4096));
            libc::free(a);
            // Overflow is refused, not wrapped (`black_box`: the compiler knows `calloc` and
            // may fold away an allocation whose pointer is only compared with null).
            let huge = std::hint::black_box(libc::calloc(std::hint::black_box(usize::MAX / 2), 4));
            assert!(huge.is_null());
            libc::free(std::ptr::null_mut());
            assert_eq!(libc::malloc_usable_size(std::ptr::null_mut()), 0);
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
