//! The `train` binary built with the tch backend loads libtorch's CUDA library only when a CUDA
//! device is asked for (`src/torch_cuda.rs`): a CPU run never maps it, and `--device cuda`
//! loads it before libtorch is asked about GPUs. The dynamic loader's own trace
//! (`LD_DEBUG=libs`, glibc) says which libraries were initialised.
#![cfg(all(feature = "tch", target_os = "linux"))]

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{base, data, model};

/// `train ARGS` with the loader tracing the libraries it initialises.
fn traced(dir: &Path, args: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .env("TRAIN_MODEL_REGISTRY", dir.join("models.json"))
        .env("LD_DEBUG", "libs")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// The path of the initialised library whose file name is `name`, from the loader's trace.
fn initialised<'a>(trace: &'a str, name: &str) -> Option<&'a str> {
    trace
        .lines()
        .filter_map(|l| l.split("calling init: ").nth(1))
        .map(str::trim)
        .find(|p| Path::new(p).file_name().is_some_and(|f| f == name))
}

#[test]
fn a_cpu_run_never_loads_libtorch_cuda() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 8), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend(["--backend", "tch", "--max-steps", "2", "--yes"]);
    let (o, trace) = traced(dir.path(), &args);
    assert_eq!(o.status.code(), Some(0), "{trace}");
    assert!(out.join("model.safetensors").is_file());
    assert!(
        initialised(&trace, "libtorch_cpu.so").is_some(),
        "the trace names no libtorch_cpu.so: {trace}"
    );
    assert_eq!(initialised(&trace, "libtorch_cuda.so"), None);
}

#[test]
fn a_cuda_device_loads_libtorch_cuda_first() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 8), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    // A GPU no machine has: the run stops at the check, after the library was loaded.
    args.extend([
        "--backend",
        "tch",
        "--device",
        "cuda:4096",
        "--max-steps",
        "1",
    ]);
    let (o, trace) = traced(dir.path(), &args);
    assert_eq!(o.status.code(), Some(1), "{trace}");
    assert!(!out.join("model.safetensors").exists());
    let cpu = initialised(&trace, "libtorch_cpu.so").expect("libtorch_cpu.so in the trace");
    let beside = Path::new(cpu).parent().unwrap().join("libtorch_cuda.so");
    if beside.is_file() {
        // libtorch's CUDA hooks answered: the runtime version comes from them, and a libtorch
        // without its CUDA library loaded has none to give.
        assert!(
            trace.contains("cuda:4096 does not exist (libtorch sees ")
                && trace.contains("GPU(s), CUDA runtime "),
            "{trace}"
        );
        assert!(initialised(&trace, "libtorch_cuda.so").is_some(), "{trace}");
    } else {
        assert!(
            trace.contains("it is a CPU-only build of PyTorch"),
            "{trace}"
        );
    }
}
