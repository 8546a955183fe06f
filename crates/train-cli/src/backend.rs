//! The one place where a burn backend is chosen: `--backend cpu|tch|cuda` (+ `--device`,
//! `--devices`) → a concrete autodiff backend type and devices.

use anyhow::{Result, bail};
use clap::ValueEnum;
use train_model::FusedAutodiffBackend;

/// `--backend`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    /// burn's pure-Rust CPU backend (Flex).
    Cpu,
    /// libtorch (PyTorch 2.9.0) on CPU, or on a GPU with `--device cuda:N`.
    Tch,
    /// burn-cuda on an NVIDIA GPU (`--device N` picks it).
    Cuda,
}

/// The devices a command runs on.
pub struct Placement<B: FusedAutodiffBackend> {
    /// Where the model is loaded (the first worker's device).
    pub main: burn::tensor::Device<B>,
    /// One device per data-parallel worker (`main` first); one entry without `--devices`.
    pub workers: Vec<burn::tensor::Device<B>>,
}

/// Something to run on a backend chosen at run time.
pub trait WithBackend {
    /// What it returns.
    type Output;
    /// Runs on `B`.
    fn run<B: FusedAutodiffBackend>(self, placement: Placement<B>) -> Result<Self::Output>;
}

/// Runs `work` on the backend the flags ask for, with `workers` data-parallel workers, or says
/// why it is not available.
///
/// `device` is `--device`: one device, or a comma-separated list of one per worker. One device
/// with several workers means: on CPU, every worker on it; on GPUs, consecutive GPUs from it
/// (`cuda:0` with 4 workers: `cuda:0` … `cuda:3`).
pub fn dispatch<W: WithBackend>(
    backend: BackendArg,
    device: Option<&str>,
    workers: usize,
    work: W,
) -> Result<W::Output> {
    let list: Vec<&str> = device
        .map(|d| d.split(',').map(str::trim).collect())
        .unwrap_or_default();
    if list.len() > 1 && list.len() != workers {
        bail!(
            "--device lists {} devices for {workers} worker(s); give --devices {} (one worker per device)",
            list.len(),
            list.len()
        );
    }
    let spec = DeviceSpec {
        list,
        workers: workers.max(1),
    };
    match backend {
        BackendArg::Cpu => {
            crate::allocator::place_large_blocks();
            cpu(&spec, work)
        }
        BackendArg::Tch => {
            crate::allocator::place_large_blocks();
            tch(&spec, work)
        }
        BackendArg::Cuda => cuda(&spec, work),
    }
}

/// `--device` split at commas (empty: the backend's default), and the number of workers.
struct DeviceSpec<'a> {
    list: Vec<&'a str>,
    workers: usize,
}

impl DeviceSpec<'_> {
    /// One device per worker: the list as given, or `parse(first)` followed by `next(i)` for the
    /// other workers.
    fn devices<D: Clone>(
        &self,
        default: &str,
        parse: impl Fn(&str) -> Result<D>,
        next: impl Fn(&D, usize) -> D,
    ) -> Result<Vec<D>> {
        if self.list.len() > 1 {
            return self.list.iter().map(|d| parse(d)).collect();
        }
        let first = parse(self.list.first().copied().unwrap_or(default))?;
        Ok((0..self.workers).map(|i| next(&first, i)).collect())
    }
}

fn placement<B: FusedAutodiffBackend>(
    workers: Vec<burn::tensor::Device<B>>,
) -> Result<Placement<B>> {
    match workers.first() {
        Some(main) => Ok(Placement {
            main: main.clone(),
            workers,
        }),
        None => bail!("no device"),
    }
}

#[cfg(feature = "cpu")]
fn cpu<W: WithBackend>(spec: &DeviceSpec<'_>, work: W) -> Result<W::Output> {
    use burn::backend::{Autodiff, Flex};
    // Every worker on the one CPU device.
    let devices = spec.devices(
        "cpu",
        |d| {
            if d == "cpu" {
                Ok(())
            } else {
                bail!("--device {d}: the cpu backend has only the `cpu` device")
            }
        },
        |(), _| (),
    )?;
    let workers = devices.iter().map(|()| Default::default()).collect();
    work.run::<Autodiff<Flex>>(placement(workers)?)
}

#[cfg(not(feature = "cpu"))]
fn cpu<W: WithBackend>(_: &DeviceSpec<'_>, _: W) -> Result<W::Output> {
    bail!("this `train` was built without the cpu backend (cargo feature `cpu`)")
}

#[cfg(feature = "tch")]
fn tch<W: WithBackend>(spec: &DeviceSpec<'_>, work: W) -> Result<W::Output> {
    use burn::backend::libtorch::LibTorchDevice;
    use burn::backend::{Autodiff, LibTorch};
    let parse = |d: &str| -> Result<LibTorchDevice> {
        Ok(match d {
            "cpu" => LibTorchDevice::Cpu,
            _ => match d.strip_prefix("cuda").map(|r| r.trim_start_matches(':')) {
                Some("") => LibTorchDevice::Cuda(0),
                Some(i) => match i.parse() {
                    Ok(i) => LibTorchDevice::Cuda(i),
                    Err(_) => bail!("--device {d}: expected cpu, cuda or cuda:N"),
                },
                None => bail!("--device {d}: expected cpu, cuda or cuda:N"),
            },
        })
    };
    let workers = spec.devices("cpu", parse, |first, i| match first {
        LibTorchDevice::Cuda(k) => LibTorchDevice::Cuda(k + i),
        other => *other,
    })?;
    if workers.iter().any(|w| matches!(w, LibTorchDevice::Cuda(_))) {
        // libtorch's CUDA library is loaded only now, and before libtorch is asked anything
        // about CUDA (it decides once): see `torch_cuda`.
        #[cfg(target_os = "linux")]
        crate::torch_cuda::load()?;
        let gpus = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
        for w in &workers {
            if let LibTorchDevice::Cuda(i) = w
                && *i >= gpus
            {
                #[cfg(target_os = "linux")]
                let runtime = crate::torch_cuda::runtime_version()
                    .map(|v| format!(", CUDA runtime {}.{}", v / 1000, v % 1000 / 10))
                    .unwrap_or_default();
                #[cfg(not(target_os = "linux"))]
                let runtime = "";
                bail!("--device: cuda:{i} does not exist (libtorch sees {gpus} GPU(s){runtime})");
            }
        }
    }
    work.run::<Autodiff<LibTorch>>(placement(workers)?)
}

#[cfg(not(feature = "tch"))]
fn tch<W: WithBackend>(_: &DeviceSpec<'_>, _: W) -> Result<W::Output> {
    bail!(
        "this `train` was built without the libtorch backend; rebuild with `--features tch` (see the README)"
    )
}

#[cfg(feature = "cuda")]
fn cuda<W: WithBackend>(spec: &DeviceSpec<'_>, work: W) -> Result<W::Output> {
    use burn::backend::cuda::CudaDevice;
    use burn::backend::{Autodiff, Cuda};
    let parse = |d: &str| -> Result<CudaDevice> {
        match d.trim_start_matches("cuda").trim_start_matches(':') {
            "" => Ok(CudaDevice { index: 0 }),
            i => match i.parse() {
                Ok(index) => Ok(CudaDevice { index }),
                Err(_) => bail!("--device {d}: expected a GPU index (N or cuda:N)"),
            },
        }
    };
    let workers = spec.devices("0", parse, |first, i| CudaDevice {
        index: first.index + i,
    })?;
    work.run::<Autodiff<Cuda>>(placement(workers)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda<W: WithBackend>(_: &DeviceSpec<'_>, _: W) -> Result<W::Output> {
    bail!("this `train` was built without the cuda backend; rebuild with `--features cuda`")
}
