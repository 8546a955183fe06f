//! C's allocation functions, defined by the executable: every C and C++ library of the process
//! (libtorch's tensors among them) allocates through the same two heaps as Rust — large blocks
//! in [`super::LargeBlocks`] once placing is on, everything else mimalloc's. glibc documents
//! which functions a replacement `malloc` must define (`malloc`, `free`, `calloc`, `realloc`,
//! and for completeness `aligned_alloc`, `malloc_usable_size`, `memalign`, `posix_memalign`,
//! `pvalloc`, `valloc`); the `__libc_*` names and `cfree`, `reallocarray` are defined too, as
//! mimalloc's own override defines them, so that no caller reaches glibc's heap and hands its
//! blocks to the wrong `free`. C++'s `operator new`/`delete` in libstdc++ call `malloc`,
//! `aligned_alloc` and `free`.
//!
//! A block is freed by the heap whose memory holds it ([`super::free_large`]: the segment table
//! is read without a lock).
//! Placement is decided when a block is made, so blocks made before placing began stay
//! mimalloc's.

#![allow(unsafe_code)]

use std::ffi::{c_int, c_void};

use libmimalloc_sys as mi;

use super::{LARGE_MIN, alloc_large, free_large, granules, in_segment, is_large, large};

/// The alignment `malloc` guarantees on x86-64 and aarch64 glibc, and mimalloc's
/// `mi_malloc` too.
const MIN_ALIGN: usize = 16;

fn set_errno(code: c_int) {
    // SAFETY: `__errno_location` returns the calling thread's `errno`, valid for its lifetime.
    unsafe { *libc::__errno_location() = code };
}

/// A block of `size` bytes aligned to `align` (a power of two): from the segments when it is
/// large and placing is on, else mimalloc's. Null (and `errno` ENOMEM) when neither has memory.
fn allocate(size: usize, align: usize, zeroed: bool) -> *mut c_void {
    if is_large(size, align)
        && let Some(p) = alloc_large(size, zeroed)
    {
        return p.cast();
    }
    // SAFETY: mimalloc's allocation functions take any size and a power-of-two alignment.
    let p = unsafe {
        match (align <= MIN_ALIGN, zeroed) {
            (true, false) => mi::mi_malloc(size),
            (true, true) => mi::mi_zalloc(size),
            (false, false) => mi::mi_malloc_aligned(size, align),
            (false, true) => mi::mi_zalloc_aligned(size, align),
        }
    };
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p
}

/// Frees a block of either heap. An address inside a segment that does not start a block (a
/// caller's bug) is left alone rather than handed to mimalloc.
fn release(ptr: *mut c_void) {
    if ptr.is_null() {
        return;
    }
    if free_large(ptr.cast_const().cast()) {
        return;
    }
    // SAFETY: not in a segment: a block mimalloc made (C's contract: `ptr` came from this
    // family of functions).
    unsafe { mi::mi_free(ptr) }
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// # Safety
/// C's `malloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    allocate(size, MIN_ALIGN, false)
}

/// # Safety
/// C's `calloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn calloc(count: usize, size: usize) -> *mut c_void {
    let Some(total) = count.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    allocate(total, MIN_ALIGN, true)
}

/// # Safety
/// C's `free`: `ptr` is null or a live block of this family of functions.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    release(ptr);
}

/// # Safety
/// C's `realloc`: `ptr` is null or a live block of this family of functions.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    if ptr.is_null() {
        return allocate(size, MIN_ALIGN, false);
    }
    let old_len = if in_segment(ptr.cast_const().cast()) {
        let Some(len) = large().len_of(ptr.cast_const().cast()) else {
            set_errno(libc::EINVAL);
            return std::ptr::null_mut();
        };
        if size >= LARGE_MIN && granules(size) == len {
            // The same granules hold the new size.
            return ptr;
        }
        len
    } else if is_large(size, MIN_ALIGN) {
        // SAFETY: a live block of mimalloc's.
        unsafe { mi::mi_usable_size(ptr) }
    } else {
        // SAFETY: a live block of mimalloc's, and the new one is to be mimalloc's too.
        let p = unsafe { mi::mi_realloc(ptr, size) };
        if p.is_null() {
            set_errno(libc::ENOMEM);
        }
        return p;
    };
    let new = allocate(size, MIN_ALIGN, false);
    if !new.is_null() {
        // SAFETY: both blocks are live, distinct, and at least the shorter length long.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), new.cast::<u8>(), old_len.min(size));
        }
        release(ptr);
    }
    // Null: the old block is left as it was, as C requires.
    new
}

/// # Safety
/// C's `reallocarray`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn reallocarray(ptr: *mut c_void, count: usize, size: usize) -> *mut c_void {
    let Some(total) = count.checked_mul(size) else {
        set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    // SAFETY: forwarded with the caller's block.
    unsafe { realloc(ptr, total) }
}

/// # Safety
/// C's `posix_memalign`: `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let p = allocate(size, align, false);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller's pointer to write the block's address to.
    unsafe { *out = p };
    0
}

/// # Safety
/// C's `aligned_alloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    allocate(size, align, false)
}

/// # Safety
/// C's `memalign` (an alignment that is not a power of two is rounded up to one, as glibc's).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    match align.max(1).checked_next_power_of_two() {
        Some(align) => allocate(size, align, false),
        None => {
            set_errno(libc::EINVAL);
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// C's `valloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    allocate(size, page_size(), false)
}

/// # Safety
/// C's `pvalloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = page_size();
    match size.max(1).checked_next_multiple_of(page) {
        Some(size) => allocate(size, page, false),
        None => {
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// C's `malloc_usable_size`: `ptr` is null or a live block of this family of functions.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(ptr: *mut c_void) -> usize {
    if ptr.is_null() {
        return 0;
    }
    if in_segment(ptr.cast_const().cast()) {
        return large().len_of(ptr.cast_const().cast()).unwrap_or(0);
    }
    // SAFETY: a live block of mimalloc's.
    unsafe { mi::mi_usable_size(ptr) }
}

/// # Safety
/// `free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cfree(ptr: *mut c_void) {
    release(ptr);
}

/// # Safety
/// `malloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_malloc(size: usize) -> *mut c_void {
    allocate(size, MIN_ALIGN, false)
}

/// # Safety
/// `calloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_calloc(count: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarded.
    unsafe { calloc(count, size) }
}

/// # Safety
/// `realloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarded with the caller's block.
    unsafe { realloc(ptr, size) }
}

/// # Safety
/// `free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_free(ptr: *mut c_void) {
    release(ptr);
}

/// # Safety
/// `memalign`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarded.
    unsafe { memalign(align, size) }
}

/// # Safety
/// `valloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_valloc(size: usize) -> *mut c_void {
    allocate(size, page_size(), false)
}

/// # Safety
/// `pvalloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __libc_pvalloc(size: usize) -> *mut c_void {
    // SAFETY: forwarded.
    unsafe { pvalloc(size) }
}
