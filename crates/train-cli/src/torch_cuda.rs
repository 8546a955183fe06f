//! libtorch's CUDA library, loaded when a CUDA device is asked for rather than at start.
//!
//! A PyPI build of PyTorch ships `libtorch_cuda.so` beside `libtorch_cpu.so`. burn-tch makes
//! every binary that uses it depend on the former (its `dummy_cuda_dependency` refers to two of
//! its functions, and is never called), so the dynamic loader mapped it — and cuBLAS, cuBLASLt,
//! cuSPARSELt, cuFFT, nvJitLink… with it — into every `train` process, and ran their static
//! initialisers: ~260 MB of resident memory (117 MB of it anonymous) before anything ran, on a
//! CPU-only run as much as on a GPU one (measured with `ctypes` on PyTorch 2.9.0 cu128: 122 MB
//! resident with `libtorch_cpu` alone, 383 MB with `libtorch_cuda` too).
//!
//! The executable defines those two functions itself ([`get_current_cuda_blas_handle`],
//! [`warp_size`]), so the linker resolves burn-tch's references here and, linking with
//! `--as-needed` as rustc does, records no dependency on `libtorch_cuda.so`. [`load`] opens it
//! with `dlopen` (from the directory `libtorch_cpu.so` was loaded from) when `--backend tch`
//! is given a `cuda` device, before any tensor exists: its static initialisers then register
//! the CUDA kernels and libtorch's CUDA hooks, as they do when the loader maps it at start.
//! libtorch settles whether CUDA is there on the first question it is asked
//! (`at::detail::getCUDAHooks` is initialised once), so nothing may ask before [`load`]: the
//! dispatcher asks `device_count` only after it.
//!
//! The two definitions are hidden (not in the executable's dynamic symbol table), so once
//! loaded `libtorch_cuda.so` keeps calling its own. Were they ever called, they forward to the
//! loaded library's functions, or answer "no CUDA" without it.

// dlopen, dlsym and two functions under libtorch's names.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, bail};

/// The library [`load`] opens.
const LIBRARY: &str = "libtorch_cuda.so";

/// `at::cuda::getCurrentCUDABlasHandle()`.
const BLAS_HANDLE: &CStr = c"_ZN2at4cuda24getCurrentCUDABlasHandleEv";
/// `at::cuda::warp_size()`.
const WARP_SIZE: &CStr = c"_ZN2at4cuda9warp_sizeEv";
/// `torch::cuda::device_count()`, in `libtorch_cpu.so`: how [`libtorch_dir`] finds it.
const DEVICE_COUNT: &CStr = c"_ZN5torch4cuda12device_countEv";

/// The outcome of the one attempt to load the library: its handle, or why it failed.
static LOADED: OnceLock<Result<usize, String>> = OnceLock::new();

/// Loads `libtorch_cuda.so` (once; later calls return the first outcome). Call it before any
/// CUDA device is used or asked about.
pub fn load() -> Result<()> {
    match LOADED.get_or_init(open) {
        Ok(_) => Ok(()),
        Err(why) => bail!("{why}"),
    }
}

fn open() -> Result<usize, String> {
    let dir = libtorch_dir().ok_or_else(|| {
        format!("--device cuda: could not find the directory libtorch ({DEVICE_COUNT:?}) was loaded from")
    })?;
    let path = dir.join(LIBRARY);
    if !path.is_file() {
        return Err(format!(
            "--device cuda: this libtorch ({}) has no {LIBRARY}: it is a CPU-only build of \
             PyTorch; install a CUDA build of PyTorch 2.9.0 to train on a GPU with --backend tch",
            dir.display()
        ));
    }
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("--device cuda: {} holds a NUL byte", path.display()))?;
    // SAFETY: a NUL-terminated path; the handle is kept for the life of the process.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(format!(
            "--device cuda: could not load {}: {}",
            path.display(),
            dl_error()
        ));
    }
    Ok(handle as usize)
}

/// The directory of the `libtorch_cpu.so` this process runs on.
fn libtorch_dir() -> Option<PathBuf> {
    // SAFETY: dlsym on the global scope with a NUL-terminated name; dladdr fills `info` only
    // when it returns non-zero, and its file name points into the loader's own tables.
    unsafe {
        let symbol = libc::dlsym(libc::RTLD_DEFAULT, DEVICE_COUNT.as_ptr());
        if symbol.is_null() {
            return None;
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(symbol, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let file = CStr::from_ptr(info.dli_fname).to_str().ok()?;
        Some(Path::new(file).parent()?.to_path_buf())
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message owned by the loader.
    unsafe {
        let e: *const c_char = libc::dlerror();
        if e.is_null() {
            "unknown error".to_owned()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

/// `name` in the loaded library, or null when it is not loaded.
fn loaded_symbol(name: &CStr) -> *mut c_void {
    match LOADED.get() {
        // SAFETY: a handle dlopen returned, never closed; a NUL-terminated name.
        Some(Ok(handle)) => unsafe { libc::dlsym(*handle as *mut c_void, name.as_ptr()) },
        _ => std::ptr::null_mut(),
    }
}

// The two names, defined with hidden visibility: they satisfy burn-tch's references when the
// executable is linked, and stay out of its dynamic symbol table, so `libtorch_cuda.so`'s own
// calls to them (cuBLAS's handle on every GEMM) are never routed here once it is loaded.
// (`#[unsafe(export_name)]` would export them from the executable.)
std::arch::global_asm!(
    ".globl _ZN2at4cuda24getCurrentCUDABlasHandleEv",
    ".hidden _ZN2at4cuda24getCurrentCUDABlasHandleEv",
    ".set _ZN2at4cuda24getCurrentCUDABlasHandleEv, {blas_handle}",
    ".globl _ZN2at4cuda9warp_sizeEv",
    ".hidden _ZN2at4cuda9warp_sizeEv",
    ".set _ZN2at4cuda9warp_sizeEv, {warp_size}",
    blas_handle = sym get_current_cuda_blas_handle,
    warp_size = sym warp_size,
);

/// `at::cuda::getCurrentCUDABlasHandle()`, which burn-tch refers to: the loaded library's, or
/// null (no cuBLAS handle) without it. (The C++ function takes no argument and returns a
/// pointer, which the C ABI passes the same way.)
extern "C-unwind" fn get_current_cuda_blas_handle() -> *mut c_void {
    let f = loaded_symbol(BLAS_HANDLE);
    if f.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: the library's function of that name and signature.
    unsafe { std::mem::transmute::<*mut c_void, extern "C-unwind" fn() -> *mut c_void>(f)() }
}

/// `at::cuda::warp_size()`, which burn-tch refers to: the loaded library's, or 0 without it.
extern "C-unwind" fn warp_size() -> c_int {
    let f = loaded_symbol(WARP_SIZE);
    if f.is_null() {
        return 0;
    }
    // SAFETY: the library's function of that name and signature.
    unsafe { std::mem::transmute::<*mut c_void, extern "C-unwind" fn() -> c_int>(f)() }
}

/// The CUDA runtime version libtorch's CUDA library was built with (e.g. 12080), once loaded.
pub fn runtime_version() -> Option<i64> {
    match LOADED.get() {
        Some(Ok(_)) => Some(tch::utils::version_cudart()),
        _ => None,
    }
}
