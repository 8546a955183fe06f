//! The one place where a burn backend is chosen: `--backend cpu|tch|cuda` (+ `--device`,
//! `--gradient-checkpointing`) → a concrete autodiff backend type.

use anyhow::{Result, bail};
use burn::tensor::backend::AutodiffBackend;
use clap::ValueEnum;

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

/// Something to run on a backend chosen at run time.
pub trait WithBackend {
    /// What it returns.
    type Output;
    /// Runs on `B`.
    fn run<B: AutodiffBackend>(self, device: burn::tensor::Device<B>) -> Result<Self::Output>;
}

/// Runs `work` on the backend the flags ask for, or says why it is not available.
pub fn dispatch<W: WithBackend>(
    backend: BackendArg,
    device: Option<&str>,
    checkpointing: bool,
    work: W,
) -> Result<W::Output> {
    match backend {
        BackendArg::Cpu => cpu(device, checkpointing, work),
        BackendArg::Tch => tch(device, checkpointing, work),
        BackendArg::Cuda => cuda(device, checkpointing, work),
    }
}

#[cfg(feature = "cpu")]
fn cpu<W: WithBackend>(device: Option<&str>, checkpointing: bool, work: W) -> Result<W::Output> {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::{Autodiff, Flex};
    if let Some(d) = device
        && d != "cpu"
    {
        bail!("--device {d}: the cpu backend has only the `cpu` device");
    }
    if checkpointing {
        work.run::<Autodiff<Flex, BalancedCheckpointing>>(Default::default())
    } else {
        work.run::<Autodiff<Flex>>(Default::default())
    }
}

#[cfg(not(feature = "cpu"))]
fn cpu<W: WithBackend>(_: Option<&str>, _: bool, _: W) -> Result<W::Output> {
    bail!("this `train` was built without the cpu backend (cargo feature `cpu`)")
}

#[cfg(feature = "tch")]
fn tch<W: WithBackend>(device: Option<&str>, checkpointing: bool, work: W) -> Result<W::Output> {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::libtorch::LibTorchDevice;
    use burn::backend::{Autodiff, LibTorch};
    let dev = match device {
        None | Some("cpu") => LibTorchDevice::Cpu,
        Some(d) => match d.strip_prefix("cuda").map(|r| r.trim_start_matches(':')) {
            Some("") => LibTorchDevice::Cuda(0),
            Some(i) => match i.parse() {
                Ok(i) => LibTorchDevice::Cuda(i),
                Err(_) => bail!("--device {d}: expected cpu, cuda or cuda:N"),
            },
            None => bail!("--device {d}: expected cpu, cuda or cuda:N"),
        },
    };
    if checkpointing {
        work.run::<Autodiff<LibTorch, BalancedCheckpointing>>(dev)
    } else {
        work.run::<Autodiff<LibTorch>>(dev)
    }
}

#[cfg(not(feature = "tch"))]
fn tch<W: WithBackend>(_: Option<&str>, _: bool, _: W) -> Result<W::Output> {
    bail!(
        "this `train` was built without the libtorch backend; rebuild with `--features tch` (see the README)"
    )
}

#[cfg(feature = "cuda")]
fn cuda<W: WithBackend>(device: Option<&str>, checkpointing: bool, work: W) -> Result<W::Output> {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::backend::cuda::CudaDevice;
    use burn::backend::{Autodiff, Cuda};
    let index = match device.map(|d| d.trim_start_matches("cuda").trim_start_matches(':')) {
        None | Some("") => 0,
        Some(i) => match i.parse() {
            Ok(i) => i,
            Err(_) => bail!("--device {i}: expected a GPU index"),
        },
    };
    let dev = CudaDevice { index };
    if checkpointing {
        work.run::<Autodiff<Cuda, BalancedCheckpointing>>(dev)
    } else {
        work.run::<Autodiff<Cuda>>(dev)
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda<W: WithBackend>(_: Option<&str>, _: bool, _: W) -> Result<W::Output> {
    bail!("this `train` was built without the cuda backend; rebuild with `--features cuda`")
}
