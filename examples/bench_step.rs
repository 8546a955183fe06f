//! Training-step throughput of a randomly initialised model on one backend: forward, backward,
//! global-norm clipping and an AdamW step on random tokens, timed after warm-up. Prints one JSON
//! line: tokens/s, seconds per step, model FLOP/s (6 · parameters · tokens / time) and, given
//! the device's peak, the model FLOPs utilisation. `cargo xtask bench-gpu` runs it on a GPU
//! (`cuda` and `tch` backends, bf16, Qwen3-0.6B shape, sequence 2048) and CI runs its CPU
//! dry-run.
//!
//! ```sh
//! cargo run --release -p train-examples --example bench_step -- \
//!     --backend cpu --shape tiny --seq 64 --batch 2 --steps 3 --warmup 1
//! ```

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::DType;
use train_data::{Batch, Sequence};
use train_model::FusedAutodiffBackend;
use train_model::{AttentionImpl, CausalLm, LoraConfig, ModelConfig};
use train_runner::{AdamW, AdamWConfig, ParamTable, global_grad_norm, step_gradients};

/// What the command line asks for.
struct Args {
    backend: String,
    device: Option<String>,
    shape: String,
    seq: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
    bf16: bool,
    checkpointing: bool,
    peak_tflops: Option<f64>,
    /// `--attention standard`: the decomposed operations instead of the fused ones.
    attention: AttentionImpl,
    /// Train only a LoRA adapter of this rank (alpha 2r, every projection).
    lora: Option<usize>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        backend: "cpu".into(),
        device: None,
        shape: "tiny".into(),
        seq: 64,
        batch: 2,
        steps: 3,
        warmup: 1,
        bf16: false,
        checkpointing: false,
        peak_tflops: None,
        attention: AttentionImpl::Auto,
        lora: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => a.backend = value()?,
            "--device" => a.device = Some(value()?),
            "--shape" => a.shape = value()?,
            "--seq" => a.seq = value()?.parse()?,
            "--batch" => a.batch = value()?.parse()?,
            "--steps" => a.steps = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "--precision" => {
                a.bf16 = match value()?.as_str() {
                    "bf16" => true,
                    "fp32" => false,
                    p => bail!("--precision {p}: expected fp32 or bf16"),
                }
            }
            "--checkpointing" => a.checkpointing = true,
            "--attention" => a.attention = value()?.parse()?,
            "--lora" => a.lora = Some(value()?.parse()?),
            "--peak-tflops" => a.peak_tflops = Some(value()?.parse()?),
            f => bail!(
                "unknown flag {f} (flags: --backend cpu|tch|cuda --device D --shape \
                 tiny|qwen3-30m|qwen3-0.6b --seq N --batch N --steps N --warmup N \
                 --precision fp32|bf16 --checkpointing --peak-tflops X \
                 --attention auto|standard --lora R)"
            ),
        }
    }
    if a.steps == 0 || a.seq < 2 || a.batch == 0 {
        bail!("--steps, --batch must be positive and --seq at least 2");
    }
    Ok(a)
}

/// `config.json` of a shape (Qwen3; random weights, so only the shape matters).
fn shape(name: &str) -> Result<serde_json::Value> {
    let (vocab, hidden, inter, layers, heads, kv, head_dim) = match name {
        "tiny" => (512, 64, 128, 2, 4, 2, 16),
        "qwen3-30m" => (49_152, 384, 1024, 6, 6, 2, 64),
        "qwen3-0.6b" => (151_936, 1024, 3072, 28, 16, 8, 128),
        s => bail!("--shape {s}: expected tiny, qwen3-30m or qwen3-0.6b"),
    };
    Ok(serde_json::json!({
        "model_type": "qwen3", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "max_position_embeddings": 40_960,
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "tie_word_embeddings": true,
        "torch_dtype": "float32"
    }))
}

/// Deterministic pseudo-random token rows (a 64-bit LCG), labels = inputs.
fn batch(rows: usize, seq: usize, vocab: usize, seed: u64) -> Batch {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let sequences = (0..rows)
        .map(|_| {
            let ids: Vec<u32> = (0..seq)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % vocab as u64) as u32
                })
                .collect();
            Sequence {
                labels: ids.iter().map(|&t| t as i32).collect(),
                position_ids: (0..seq as u32).collect(),
                segment_ids: vec![0; seq],
                input_ids: ids,
            }
        })
        .collect();
    Batch::collate(sequences, 0, None)
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn bench<B: FusedAutodiffBackend>(args: &Args, device: &B::Device) -> Result<serde_json::Value> {
    let raw = shape(&args.shape)?;
    let config = ModelConfig::from_json(Path::new("<bench shape>"), &raw)?;
    let mut model = CausalLm::<B>::random(&config, 0.02, 0, DType::F32, device)?
        .with_attention(args.attention)
        .with_gradient_checkpointing(args.checkpointing);
    if let Some(r) = args.lora {
        let lora = LoraConfig {
            r,
            alpha: 2.0 * r as f64,
            // Every projection of the shape (LORA_MODULES also names Phi-3's fused ones).
            target_modules: vec!["all-linear".into()],
            ..LoraConfig::default()
        };
        model = model.with_lora(&lora, 0)?;
    }
    if args.bf16 {
        model = model.with_compute_dtype(DType::BF16);
    }
    let parameters = config.num_parameters();
    let table = ParamTable::new(&model);
    let mut optimizer = AdamW::<B>::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.01,
    });
    let mut losses = Vec::new();
    let mut step_seconds = Vec::new();
    let mut timed_start = None;
    for step in 0..args.warmup + args.steps {
        if step == args.warmup {
            B::sync(device)?;
            timed_start = Some(Instant::now());
        }
        let t = Instant::now();
        let b = batch(args.batch, args.seq, config.vocab_size, step as u64);
        let (loss, grads) = step_gradients(&model, std::slice::from_ref(&b), device);
        let norm = global_grad_norm(&model, &grads);
        let clip = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
        model = optimizer.step(model, &table, grads, 1e-4, clip);
        losses.push(loss);
        step_seconds.push(t.elapsed().as_secs_f64());
    }
    B::sync(device)?;
    let seconds = timed_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let tokens = (args.steps * args.batch * args.seq) as f64;
    let flops = 6.0 * parameters as f64 * tokens / seconds;
    Ok(serde_json::json!({
        "backend": args.backend,
        "device": args.device,
        "shape": args.shape,
        "parameters": parameters,
        "precision": if args.bf16 { "bf16 (f32 master weights)" } else { "fp32" },
        "checkpointing": args.checkpointing,
        "attention": format!("{:?}", args.attention).to_lowercase(),
        "lora_rank": args.lora,
        "seq": args.seq,
        "batch": args.batch,
        "timed_steps": args.steps,
        "tokens_per_sec": tokens / seconds,
        "seconds_per_step": seconds / args.steps as f64,
        "model_tflops_per_sec": flops / 1e12,
        "mfu": args.peak_tflops.map(|p| flops / (p * 1e12)),
        "step_seconds": step_seconds,
        "losses": losses,
        "host_peak_rss_bytes": peak_rss_bytes(),
    }))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let out = match args.backend.as_str() {
        "cpu" => bench::<burn::backend::Autodiff<burn::backend::Flex>>(&args, &Default::default())?,
        "tch" => tch(&args)?,
        "cuda" => cuda(&args)?,
        b => bail!("--backend {b}: expected cpu, tch or cuda"),
    };
    println!("{out}");
    Ok(())
}

#[cfg(feature = "tch")]
fn tch(args: &Args) -> Result<serde_json::Value> {
    use burn::backend::libtorch::LibTorchDevice;
    use burn::backend::{Autodiff, LibTorch};
    let device = match args.device.as_deref() {
        None | Some("cpu") => LibTorchDevice::Cpu,
        Some("cuda") => LibTorchDevice::Cuda(0),
        Some(d) => match d.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(i)) => LibTorchDevice::Cuda(i),
            _ => bail!("--device {d}: expected cpu, cuda or cuda:N"),
        },
    };
    bench::<Autodiff<LibTorch>>(args, &device)
}

#[cfg(not(feature = "tch"))]
fn tch(_: &Args) -> Result<serde_json::Value> {
    bail!("built without the tch backend (cargo feature `tch` of train-examples)")
}

#[cfg(feature = "cuda")]
fn cuda(args: &Args) -> Result<serde_json::Value> {
    use burn::backend::cuda::CudaDevice;
    use burn::backend::{Autodiff, Cuda};
    let index = match args.device.as_deref() {
        None => 0,
        Some(d) => d
            .parse()
            .with_context(|| format!("--device {d}: a GPU index"))?,
    };
    let device = CudaDevice { index };
    bench::<Autodiff<Cuda>>(args, &device)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: &Args) -> Result<serde_json::Value> {
    bail!("built without the cuda backend (cargo feature `cuda` of train-examples)")
}
