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
