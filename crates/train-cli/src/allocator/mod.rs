//! The process's allocator: mimalloc, told to keep the memory it frees.
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

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
