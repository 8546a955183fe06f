//! `cargo xtask bench-train` and `cargo xtask bench-gpu`: the training-throughput comparisons
//! with PyTorch, measured in one invocation on one machine.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::downloads::{
    BENCH_PACKAGES, TRL_PACKAGES, assets, pip_install, qwen3_tokenizer_dir, venv,
};
use crate::{
    RELEASE_FEATURES, TCH_FEATURES, build_release_binaries, cache, cargo, last_json_line,
    release_bin, root, run, smollm2, torch_env,
};

/// The outcome of a child process measured by `wait4`.
struct Measured {
    wall_seconds: f64,
    peak_rss_bytes: u64,
}

/// Runs `cmd` and returns its wall time and its own peak resident set (`ru_maxrss` of exactly
/// this child, from `wait4`).
fn measured(step: &str, cmd: &mut Command) -> Result<Measured> {
    eprintln!("\n==> {step}\n    {cmd:?}");
    let started = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {step}"))?;
    let pid = libc::pid_t::try_from(child.id())?;
    let mut status = 0;
    // SAFETY: `rusage` is plain old data; `wait4` fills it for the child we just spawned and
    // have not waited for yet.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
    if waited != pid {
        bail!("{step}: wait4 failed: {}", std::io::Error::last_os_error());
    }
    let wall_seconds = started.elapsed().as_secs_f64();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{step} failed (wait status {status})");
    }
    eprintln!("<== {step}: ok in {wall_seconds:.1}s");
    Ok(Measured {
        wall_seconds,
        peak_rss_bytes: u64::try_from(usage.ru_maxrss)? * 1024,
    })
}

/// One contestant of `bench-train`.
struct Contestant {
    name: String,
    /// Per timed step (warm-up excluded): seconds.
    step_seconds: Vec<f64>,
    /// Real (not padding) tokens of each timed step.
    step_tokens: Vec<usize>,
    /// Positions computed (batch × longest row) over the timed steps, when reported.
    padded_positions: usize,
    first_loss: f64,
    last_loss: f64,
    peak_rss_bytes: u64,
    wall_seconds: f64,
    /// Trained a LoRA adapter (the frozen model) rather than every weight.
    lora: bool,
    /// Recomputed each layer in the backward pass (gradient checkpointing).
    checkpointing: bool,
}

impl Contestant {
    fn seconds_per_step(&self) -> f64 {
        self.step_seconds.iter().sum::<f64>() / self.step_seconds.len() as f64
    }

    fn tokens_per_sec(&self) -> f64 {
        self.step_tokens.iter().sum::<usize>() as f64 / self.step_seconds.iter().sum::<f64>()
    }
}

/// Settings of `bench-train`.
struct TrainBench {
    model: String,
    steps: usize,
    warmup: usize,
    batch: usize,
    seq: usize,
    only: Vec<String>,
    /// Also train a LoRA adapter of this rank (alpha 2r, every projection) for each contestant.
    lora: Option<usize>,
    /// Chat rows of their own lengths (up to `seq`) padded to the longest of each batch,
    /// instead of rows all exactly `seq` long.
    padded: bool,
}

const LR: &str = "1e-4";
const WEIGHT_DECAY: &str = "0.01";
const MAX_GRAD_NORM: &str = "1.0";

fn parse_train_args(args: &[String]) -> Result<TrainBench> {
    let mut b = TrainBench {
        model: "qwen3-30m".into(),
        steps: 20,
        warmup: 2,
        batch: 2,
        seq: 512,
        only: vec!["cpu".into(), "tch".into(), "pytorch".into()],
        lora: None,
        padded: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--padded" {
            b.padded = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => b.model.clone_from(value),
            "--steps" => b.steps = value.parse()?,
            "--warmup" => b.warmup = value.parse()?,
            "--batch" => b.batch = value.parse()?,
            "--seq" => b.seq = value.parse()?,
            "--only" => b.only = value.split(',').map(str::to_string).collect(),
            "--lora" => b.lora = Some(value.parse()?),
            f => bail!(
                "unknown flag {f} (bench-train [--model qwen3-30m|gemma3-30m|olmo2-30m|smollm3-30m|mistral-30m|phi3-30m|qwen3_moe-30m|smollm2] [--steps N] \
                 [--warmup N] [--batch N] [--seq N] [--only cpu,cpu-standard,cpu-checkpointing,tch,tch-standard,tch-checkpointing,pytorch,pytorch-checkpointing] [--lora R] [--padded])"
            ),
        }
    }
    if b.steps == 0 {
        bail!("--steps must be positive");
    }
    Ok(b)
}

/// The random ~28M-parameter models `bench-train` can make (`xtask/bench/bench_train.py`'s
/// `SHAPES`): the Qwen3 one and the same size in other families.
const SHAPES: &[&str] = &[
    "qwen3-30m",
    "gemma3-30m",
    "olmo2-30m",
    "smollm3-30m",
    "mistral-30m",
    "phi3-30m",
    "qwen3_moe-30m",
];

/// `cargo xtask bench-train`: the same fine-tuning job run by `train` on the cpu backend, by
/// `train` on the tch backend, and by PyTorch + `transformers` eager, one after the other.
pub fn bench_train(args: &[String]) -> Result<()> {
    let b = parse_train_args(args)?;
    let python = venv(true)?.join("bin/python");
    let script = root().join("xtask/bench/bench_train.py");
    let dir = cache().join("bench-train");
    std::fs::create_dir_all(&dir)?;
    let smol = smollm2()?;
    let model = match b.model.as_str() {
        "smollm2" => smol.clone(),
        shape if SHAPES.contains(&shape) => {
            let m = dir.join(shape);
            if !m.join("model.safetensors").is_file() {
                let mut c = Command::new(&python);
                c.arg(&script)
                    .args(["make-model", "--shape", shape, "--tokenizer-dir"])
                    .arg(&smol)
                    .arg("--out")
                    .arg(&m);
                run(&format!("random {shape} model (~28M parameters)"), c)?;
            }
            m
        }
        m => bail!(
            "--model {m}: expected smollm2 or one of {}",
            SHAPES.join(", ")
        ),
    };
    let rows = (b.steps + b.warmup) * b.batch;
    // Rows longer than --seq: 4,000 characters (1,000+ tokens) cover 512; longer sequences
    // need about 6 characters a token, in files of their own.
    let min_chars = (6 * b.seq).max(4000);
    let data = dir.join(match (b.padded, min_chars) {
        (true, _) => format!("varied-{rows}.jsonl"),
        (false, 4000) => format!("long-{rows}.jsonl"),
        (false, c) => format!("long-{c}c-{rows}.jsonl"),
    });
    if !data.is_file() {
        let mut c = Command::new(&python);
        c.arg(&script)
            .args(["make-data", "--rows", &rows.to_string(), "--assets"])
            .arg(assets()?)
            .arg("--out")
            .arg(&data);
        if b.padded {
            // Conversations of about 100 to 3000 characters: a few dozen to several hundred
            // tokens, some cut at --seq.
            c.args(["--min-chars", "100", "--max-chars", "3000"]);
        } else {
            c.args(["--min-chars", &min_chars.to_string()]);
        }
        run("conversations (chatterbot-corpus)", c)?;
    }
    let env = torch_env()?;
    // The cpu rows run the default build, as a cpu user has it: no libtorch linked. (A build
    // with the tch backend maps `libtorch_cpu.so` at start, ~110 MB of resident memory before
    // anything runs, which a cpu-only user never pays; its CUDA library, another ~260 MB, only
    // on `--device cuda`.) It is copied aside, because the tch build below writes the same
    // path.
    let cpu_bin = dir.join("train-cpu");
    if b.only.iter().any(|o| o.starts_with("cpu")) {
        let mut build = cargo();
        build.args(["build", "--workspace", "--release", "--bins", "--features"]);
        build.arg(RELEASE_FEATURES);
        run("build train (default features)", build)?;
        std::fs::copy(release_bin("train"), &cpu_bin)
            .with_context(|| format!("copying the train binary to {}", cpu_bin.display()))?;
    }
    if b.only.iter().any(|o| o.starts_with("tch")) {
        let mut build = cargo();
        build.args(["build", "--workspace", "--release", "--bins", "--features"]);
        build.arg(TCH_FEATURES);
        build.envs(env.iter().map(|(k, v)| (k, v)));
        run("build train (with the tch backend)", build)?;
    }

    // With --lora, everyone also trains the same fresh PEFT adapter (made once by peft).
    let adapter = match b.lora {
        Some(r) => {
            let a = dir.join(format!("{}-lora-r{r}", b.model));
            if !a.join("adapter_model.safetensors").is_file() {
                let mut c = Command::new(&python);
                c.arg(&script)
                    .args(["make-adapter", "--r", &r.to_string(), "--model"])
                    .arg(&model)
                    .arg("--out")
                    .arg(&a);
                run("a fresh LoRA adapter (peft)", c)?;
            }
            Some(a)
        }
        None => None,
    };
    let mut results = Vec::new();
    // `cpu-standard` / `tch-standard`: the same backend with the decomposed operations
    // (`--attention standard`), the before of the fused operations in the same invocation;
    // `*-checkpointing`: with `--gradient-checkpointing` (PyTorch: `gradient_checkpointing_enable`).
    for backend in [
        "cpu",
        "cpu-standard",
        "cpu-checkpointing",
        "tch",
        "tch-standard",
        "tch-checkpointing",
    ] {
        if b.only.iter().any(|o| o == backend) {
            results.push(rust_run(&b, backend, &model, &data, &dir, &env)?);
            if let Some(a) = &adapter {
                results.push(rust_run(&b, backend, a, &data, &dir, &env)?);
            }
        }
    }
    for (name, checkpointing) in [("pytorch", false), ("pytorch-checkpointing", true)] {
        if b.only.iter().any(|o| o == name) {
            let job = TorchJob {
                python: &python,
                script: &script,
                model: &model,
                data: &data,
                env: &env,
                checkpointing,
            };
            results.push(torch_run(&b, &job, None)?);
            if let Some(a) = &adapter {
                results.push(torch_run(&b, &job, Some(a))?);
            }
        }
    }
    // A fresh adapter leaves the model unchanged: every first loss agrees.
    check_first_losses(&results)?;
    // Padded: everyone counted the same real tokens in every step (same rows, same batches).
    if let Some(first) = results.first()
        && let Some(r) = results.iter().find(|r| r.step_tokens != first.step_tokens)
    {
        bail!(
            "{} and {} counted different tokens per step: not the same batches",
            first.name,
            r.name
        );
    }
    for lora in [false, true] {
        let group: Vec<&Contestant> = results.iter().filter(|r| r.lora == lora).collect();
        check_same_job(&group)?;
    }
    let table = train_table(&b, &results);
    println!("\n{table}");
    // The 28M Qwen3 job's table heads the page; every other model has a section of its own.
    let mut section = match (b.padded, b.lora.is_some(), b.model.as_str()) {
        (true, _, _) => "bench-padded".to_string(),
        (false, true, "qwen3-30m") => "bench-lora".to_string(),
        (false, true, model) => format!("bench-lora-{model}"),
        (false, false, "qwen3-30m") => "bench-train".to_string(),
        (false, false, model) => format!("bench-train-{model}"),
    };
    if b.seq != 512 {
        section.push_str(&format!("-s{}", b.seq));
    }
    if results.iter().any(|r| r.checkpointing) {
        section.push_str("-checkpointing");
    }
    write_section(
        &section,
        &format!("{}\n{table}", machine_and_versions(&python)?),
    )?;
    Ok(())
}

fn rust_run(
    b: &TrainBench,
    backend: &str,
    model: &Path,
    data: &Path,
    dir: &Path,
    env: &[(String, OsString)],
) -> Result<Contestant> {
    let lora = model.join("adapter_config.json").is_file();
    let (backend, variant) = backend.split_once('-').unwrap_or((backend, ""));
    let attention = if variant == "standard" {
        "standard"
    } else {
        "auto"
    };
    let checkpointing = variant == "checkpointing";
    let out = dir.join(format!(
        "run-{backend}{}{}",
        if checkpointing { "-checkpointing" } else { "" },
        if lora { "-lora" } else { "" }
    ));
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let total = b.steps + b.warmup;
    let bin = match backend {
        "cpu" => dir.join("train-cpu"),
        _ => release_bin("train"),
    };
    let mut c = Command::new(bin);
    c.args(["run", "--backend", backend, "--model"])
        .arg(model)
        .arg("--dataset")
        .arg(data)
        .arg("--output")
        .arg(&out)
        .args([
            "--max-length",
            &b.seq.to_string(),
            "--truncation",
            "truncate",
            "--label-mode",
            "everything",
            "--validation-split",
            "0",
            "--skip-validation",
            "--no-shuffle",
            "--batch-size",
            &b.batch.to_string(),
            "--max-steps",
            &total.to_string(),
            "--learning-rate",
            LR,
            "--lr-scheduler",
            "constant",
            "--warmup-steps",
            "0",
            "--weight-decay",
            WEIGHT_DECAY,
            "--max-grad-norm",
            MAX_GRAD_NORM,
            "--save-steps",
            "1000000",
            "--preview-prompts",
            "0",
            "--precision",
            "fp32",
            "--attention",
            attention,
            // The reference's loop adds no router loss (its configs leave
            // `output_router_logits` false): the same job for a mixture of experts.
            "--router-aux-loss-coef",
            "0",
            "--yes",
        ])
        .args(checkpointing.then_some("--gradient-checkpointing"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null());
    let m = measured(
        &format!("train run --backend {backend} --attention {attention}"),
        &mut c,
    )?;
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))
        .with_context(|| format!("{}", out.join("metrics.jsonl").display()))?;
    let mut steps = Vec::new();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if let (Some(tokens), Some(rate), Some(loss)) = (
            v["tokens"].as_u64(),
            v["tokens_per_sec"].as_f64(),
            v["loss"].as_f64(),
        ) {
            steps.push((tokens as usize, tokens as f64 / rate, loss));
        }
    }
    if steps.len() != total {
        bail!(
            "{}: {} steps logged, {total} expected",
            out.display(),
            steps.len()
        );
    }
    let tokens_per_step = b.batch * b.seq;
    if let Some(s) = steps.iter().find(|s| s.0 != tokens_per_step && !b.padded) {
        bail!(
            "a step of `train run --backend {backend}` had {} tokens, not {tokens_per_step}: the \
             data rows must all be longer than --seq",
            s.0
        );
    }
    Ok(Contestant {
        name: format!(
            "train-rs, {backend} backend{}{}{}",
            if attention == "standard" {
                ", decomposed ops"
            } else {
                ""
            },
            if checkpointing {
                ", gradient checkpointing"
            } else {
                ""
            },
            if lora { ", LoRA" } else { "" }
        ),
        lora,
        checkpointing,
        step_seconds: steps[b.warmup..].iter().map(|s| s.1).collect(),
        step_tokens: steps[b.warmup..].iter().map(|s| s.0).collect(),
        padded_positions: 0,
        first_loss: steps[0].2,
        last_loss: steps[total - 1].2,
        peak_rss_bytes: m.peak_rss_bytes,
        wall_seconds: m.wall_seconds,
    })
}

/// What the PyTorch reference runs: the interpreter, `bench_train.py`, the model, the data, the
/// environment and whether it checkpoints its layers.
struct TorchJob<'a> {
    python: &'a Path,
    script: &'a Path,
    model: &'a Path,
    data: &'a Path,
    env: &'a [(String, OsString)],
    checkpointing: bool,
}

fn torch_run(b: &TrainBench, job: &TorchJob<'_>, adapter: Option<&Path>) -> Result<Contestant> {
    let TorchJob {
        python,
        script,
        model,
        data,
        env,
        checkpointing,
    } = *job;
    let json = cache().join("bench-train/pytorch.json");
    let mut c = Command::new(python);
    if let Some(a) = adapter {
        c.arg(script).arg("torch").arg("--adapter").arg(a);
    } else {
        c.arg(script).arg("torch");
    }
    if b.padded {
        c.arg("--padded");
    }
    if checkpointing {
        c.arg("--gradient-checkpointing");
    }
    c.arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .args([
            "--steps",
            &b.steps.to_string(),
            "--warmup",
            &b.warmup.to_string(),
            "--batch",
            &b.batch.to_string(),
            "--seq",
            &b.seq.to_string(),
            "--lr",
            LR,
            "--weight-decay",
            WEIGHT_DECAY,
            "--max-grad-norm",
            MAX_GRAD_NORM,
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::fs::File::create(&json)?);
    let m = measured("PyTorch + transformers (eager, sdpa attention)", &mut c)?;
    let text = std::fs::read_to_string(&json)?;
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or("{}"))
        .with_context(|| format!("{}: no JSON result", json.display()))?;
    let f64s = |key: &str| -> Vec<f64> {
        v[key]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (seconds, losses) = (f64s("step_seconds"), f64s("losses"));
    let tokens: Vec<usize> = f64s("step_tokens").iter().map(|&t| t as usize).collect();
    if seconds.len() != b.steps + b.warmup
        || losses.len() != seconds.len()
        || tokens.len() != seconds.len()
    {
        bail!("{}: unexpected result {v}", json.display());
    }
    Ok(Contestant {
        name: format!(
            "PyTorch {} + transformers {}{}{} (eager, {} threads)",
            v["torch"].as_str().unwrap_or("?"),
            v["transformers"].as_str().unwrap_or("?"),
            if adapter.is_some() {
                " + peft, LoRA"
            } else {
                ""
            },
            if checkpointing {
                ", gradient checkpointing"
            } else {
                ""
            },
            v["threads"]
        ),
        lora: adapter.is_some(),
        checkpointing,
        step_seconds: seconds[b.warmup..].to_vec(),
        step_tokens: tokens[b.warmup..].to_vec(),
        padded_positions: f64s("step_positions")
            .get(b.warmup..)
            .map_or(0.0, |v| v.iter().sum::<f64>()) as usize,
        first_loss: losses[0],
        last_loss: losses[losses.len() - 1],
        peak_rss_bytes: m.peak_rss_bytes,
        wall_seconds: m.wall_seconds,
    })
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// The contestants ran the same job when their first losses (same weights, same rows, before
/// any update) agree.
fn check_first_losses(results: &[Contestant]) -> Result<()> {
    if let Some(first) = results.first() {
        for r in &results[1..] {
            if relative(r.first_loss, first.first_loss) > 1e-4 {
                bail!(
                    "first-step losses differ ({} {:.6} vs {} {:.6}): not the same job",
                    first.name,
                    first.first_loss,
                    r.name,
                    r.first_loss
                );
            }
        }
    }
    Ok(())
}

/// Contestants that train the same weights trained them the same way when their last losses
/// still agree.
fn check_same_job(results: &[&Contestant]) -> Result<()> {
    if let Some(first) = results.first() {
        for r in &results[1..] {
            if relative(r.last_loss, first.last_loss) > 1e-3 {
                bail!(
                    "last-step losses differ ({} {:.6} vs {} {:.6}): the updates are not the same",
                    first.name,
                    first.last_loss,
                    r.name,
                    r.last_loss
                );
            }
        }
    }
    Ok(())
}

fn train_table(b: &TrainBench, results: &[Contestant]) -> String {
    // Each row against PyTorch training the same weights (all of them, or the adapter),
    // plainly: the reference without gradient checkpointing when it ran.
    let reference = |lora: bool| {
        let mut pytorch = results
            .iter()
            .filter(|r| r.name.starts_with("PyTorch") && r.lora == lora);
        let first = pytorch.clone().next();
        pytorch
            .find(|r| !r.checkpointing)
            .or(first)
            .map(|r| (r.tokens_per_sec(), r.peak_rss_bytes))
    };
    let mut s = String::new();
    let rows = if b.padded {
        let real: usize = results.first().map_or(0, |r| r.step_tokens.iter().sum());
        let positions = results
            .iter()
            .map(|r| r.padded_positions)
            .max()
            .unwrap_or(0);
        format!(
            "rows are chat conversations of their own lengths (cut at {}), padded to the longest \
             of each batch ({real} real tokens in {positions} padded positions over the timed \
             steps, {:.0} %; PyTorch passes the attention mask and labels −100 on the padding), \
             tokens/s counts real tokens",
            b.seq,
            100.0 * real as f64 / positions.max(1) as f64,
        )
    } else {
        format!(
            "every row exactly {} tokens (long conversations truncated), {} tokens a step",
            b.seq,
            b.batch * b.seq
        )
    };
    let _ = writeln!(
        s,
        "Job: `{}`, sequence {}, batch {}, fp32, AdamW lr {LR} (constant), weight decay \
         {WEIGHT_DECAY}, clipping {MAX_GRAD_NORM}; {} timed steps after {} warm-up steps; \
         {rows}; all tokens trained. Peak RSS is the whole process's (`wait4`).\n",
        b.model, b.seq, b.batch, b.steps, b.warmup,
    );
    if let Some(r) = b.lora {
        let _ = writeln!(
            s,
            "LoRA rows: the same job training only a LoRA adapter (r {r}, alpha {}, no dropout, \
             all seven projections) on the frozen model, every contestant starting from the same \
             fresh adapter written by `peft`; rows are compared with PyTorch training the same \
             weights (all, or the adapter).\n",
            2 * r
        );
    }
    if results.iter().any(|r| r.checkpointing) {
        s.push_str(
            "Gradient-checkpointing rows recompute each decoder layer in the backward pass \
             (`train --gradient-checkpointing`; PyTorch: \
             `gradient_checkpointing_enable(use_reentrant=False)`); the ratios are against \
             PyTorch without it, and PyTorch's own checkpointing row is in the table.\n\n",
        );
    }
    s.push_str(
        "| run | tokens/s | s/step | peak RSS | tokens/s vs PyTorch | RSS vs PyTorch | loss step 1 → last | wall (s) |\n\
         |---|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for r in results {
        let (speed, mem) = reference(r.lora).map_or(("–".into(), "–".into()), |(t, m)| {
            (
                format!("{:.2}×", r.tokens_per_sec() / t),
                format!("{:.2}×", r.peak_rss_bytes as f64 / m as f64),
            )
        });
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.3} | {:.2} GiB | {speed} | {mem} | {:.4} → {:.4} | {:.1} |",
            r.name,
            r.tokens_per_sec(),
            r.seconds_per_step(),
            r.peak_rss_bytes as f64 / f64::from(1u32 << 30),
            r.first_loss,
            r.last_loss,
            r.wall_seconds
        );
    }
    s
}

/// The machine and the versions, for the record.
fn machine_and_versions(python: &Path) -> Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown CPU")
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / f64::from(1u32 << 20));
    let rustc = Command::new("rustc").arg("--version").output()?;
    let torch = Command::new(python)
        .args([
            "-c",
            "import torch, transformers; print(torch.__version__, transformers.__version__)",
        ])
        .output()?;
    Ok(format!(
        "Measured {} on {cpu}, {cores} cores available, {mem_gib:.0} GiB; {}, burn 0.21.0, \
         PyTorch / transformers {}.\n",
        utc_date(),
        String::from_utf8_lossy(&rustc.stdout).trim(),
        String::from_utf8_lossy(&torch.stdout).trim()
    ))
}

fn utc_date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map_or_else(
            |_| "?".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )
}

/// Replaces the generated section `name` of `docs/benchmarks.md` (between its markers).
fn write_section(name: &str, body: &str) -> Result<()> {
    let path = root().join("docs/benchmarks.md");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let (begin, end) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let (Some(a), Some(z)) = (text.find(&begin), text.find(&end)) else {
        bail!("{}: markers {begin} / {end} not found", path.display());
    };
    let new = format!("{}{begin}\n{body}{}", &text[..a], &text[z..]);
    std::fs::write(&path, new)?;
    eprintln!("wrote the {name} table to {}", path.display());
    Ok(())
}

/// `cargo xtask bench-gpu [--dry-run]`: training throughput and model FLOPs utilisation of a
/// Qwen3-0.6B-shaped model (random weights, bf16 compute with f32 master weights, sequence
/// 2048) on the first NVIDIA GPU, with the `cuda` backend and with `tch` on the same GPU.
/// `--dry-run` runs the same program on the CPU with a tiny shape (what CI can do).
pub fn bench_gpu(args: &[String]) -> Result<()> {
    let dry = match args.first().map(String::as_str) {
        None => false,
        Some("--dry-run") => true,
        Some(other) => bail!("unknown bench-gpu argument `{other}` (expected --dry-run)"),
    };
    let example = |features: Option<&str>, env: &[(String, OsString)]| -> Result<PathBuf> {
        let mut c = cargo();
        c.args([
            "build",
            "--workspace",
            "--release",
            "--example",
            "bench_step",
        ])
        .args(["--features", features.unwrap_or(RELEASE_FEATURES)]);
        c.envs(env.iter().map(|(k, v)| (k, v)));
        run("build the bench_step example", c)?;
        Ok(release_bin("examples/bench_step"))
    };
    let mut runs: Vec<(String, Vec<String>)> = Vec::new();
    let binary;
    let mut env: Vec<(String, OsString)> = Vec::new();
    if dry {
        binary = example(None, &[])?;
        for (backend, ckpt, extra) in [
            ("cpu", false, &[][..]),
            ("cpu", true, &[][..]),
            ("cpu", false, &["--lora", "4"][..]),
            ("cpu", false, &["--attention", "standard"][..]),
        ] {
            let mut a: Vec<String> = [
                "--backend",
                backend,
                "--shape",
                "tiny",
                "--seq",
                "64",
                "--batch",
                "2",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--precision",
                "fp32",
            ]
            .map(str::to_string)
            .to_vec();
            if ckpt {
                a.push("--checkpointing".into());
            }
            a.extend(extra.iter().map(|x| (*x).to_string()));
            runs.push((
                format!(
                    "dry run: {backend}{}{}",
                    if ckpt { ", checkpointing" } else { "" },
                    if extra.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", extra.join(" "))
                    }
                ),
                a,
            ));
        }
    } else {
        let gpu = Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader"])
            .output()
            .context("nvidia-smi (no NVIDIA GPU here? use --dry-run)")?;
        let name = String::from_utf8_lossy(&gpu.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let peak = peak_bf16_tflops(&name)
            .with_context(|| format!("no known bf16 peak for GPU `{name}`"))?;
        let with_tch = match torch_env() {
            Ok(e) => {
                env = e;
                true
            }
            Err(e) => {
                eprintln!("no libtorch for the tch comparison ({e:#}); cuda only");
                false
            }
        };
        binary = if with_tch {
            example(Some("train-examples/cuda,train-examples/tch"), &env)?
        } else {
            example(Some("train-examples/cuda"), &[])?
        };
        let common = |backend: &str, device: &str| -> Vec<String> {
            [
                "--backend",
                backend,
                "--device",
                device,
                "--shape",
                "qwen3-0.6b",
                "--seq",
                "2048",
                "--batch",
                "4",
                "--steps",
                "10",
                "--warmup",
                "3",
                "--precision",
                "bf16",
                "--peak-tflops",
            ]
            .map(str::to_string)
            .into_iter()
            .chain([peak.to_string()])
            .collect()
        };
        // The fused operations and the transformers parity on the GPU first: a fast wrong
        // step is worth nothing.
        let mut t = cargo();
        t.args([
            "test",
            "--workspace",
            "--release",
            "--features",
            "train-model/cuda",
            "--test",
            "it",
            "--",
            "fused_ops::cuda",
            "parity::cuda",
        ]);
        run("fused-op and parity tests on the GPU (cuda backend)", t)?;
        let lora = |mut a: Vec<String>| {
            a.extend(["--lora", "16"].map(str::to_string));
            a
        };
        runs.push((format!("cuda backend, {name}"), common("cuda", "0")));
        runs.push((
            format!("cuda backend, LoRA r16, {name}"),
            lora(common("cuda", "0")),
        ));
        if with_tch {
            runs.push((format!("tch backend, {name}"), common("tch", "cuda:0")));
            runs.push((
                format!("tch backend, LoRA r16, {name}"),
                lora(common("tch", "cuda:0")),
            ));
        }
    }
    let mut table = String::from(
        "| run | parameters | tokens/s | s/step | model TFLOP/s | MFU | loss first → last |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
    );
    let out_dir = cache().join("bench-gpu");
    std::fs::create_dir_all(&out_dir)?;
    for (i, (label, a)) in runs.iter().enumerate() {
        let mut c = Command::new(&binary);
        c.args(a).envs(env.iter().map(|(k, v)| (k, v)));
        let v = last_json_line(&mut c, label)?;
        std::fs::write(out_dir.join(format!("run-{i}.json")), v.to_string())?;
        let rate = v["tokens_per_sec"].as_f64().unwrap_or(f64::NAN);
        let losses: Vec<f64> = v["losses"]
            .as_array()
            .map(|l| l.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default();
        if !(rate.is_finite() && rate > 0.0)
            || losses.is_empty()
            || losses.iter().any(|l| !l.is_finite())
        {
            bail!("{label}: implausible result {v}");
        }
        let _ = writeln!(
            table,
            "| {label} | {} | {rate:.0} | {:.3} | {:.2} | {} | {:.4} → {:.4} |",
            v["parameters"],
            v["seconds_per_step"].as_f64().unwrap_or(f64::NAN),
            v["model_tflops_per_sec"].as_f64().unwrap_or(f64::NAN),
            v["mfu"]
                .as_f64()
                .map_or_else(|| "–".to_string(), |m| format!("{:.1} %", m * 100.0)),
            losses[0],
            losses[losses.len() - 1],
        );
    }
    println!("\n{table}");
    if !dry {
        write_section(
            "bench-gpu",
            &format!(
                "Measured {} with `examples/bench_step.rs`.\n\n{table}",
                utc_date()
            ),
        )?;
    }
    Ok(())
}

/// Dense bf16 peak (TFLOP/s) of the GPUs we know, from their data sheets.
fn peak_bf16_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    [
        ("H200", 989.4),
        ("H100 PCIE", 756.0),
        ("H100", 989.4),
        ("A100", 312.0),
        ("L40S", 362.05),
        ("L4", 121.0),
        ("A10", 125.0),
        ("RTX 4090", 165.2),
    ]
    .iter()
    .find(|(k, _)| n.contains(k))
    .map(|&(_, p)| p)
}

/// `cargo xtask bench-data`: the same 24k real conversations prepared by `train data prepare`
/// and by Python (`datasets.map` + `apply_chat_template` + tokenizer, assistant-only labels),
/// one after the other; prints rows/s of both and the ratio, and checks the outputs agree.
pub fn bench_data() -> Result<()> {
    let venv = venv(true)?;
    let python = venv.join("bin/python");
    let has_datasets = Command::new(&python)
        .args(["-c", "import datasets, pyarrow"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_datasets {
        pip_install(&venv, "install datasets", BENCH_PACKAGES)?;
    }
    let model = qwen3_tokenizer_dir()?;
    let dir = cache().join("bench-data");
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("chatterbot-24k.jsonl");
    let script = root().join("xtask/bench/bench_data.py");
    let mut c = Command::new(&python);
    c.arg(&script)
        .args(["gen", "--rows", "24000", "--assets"])
        .arg(assets()?)
        .arg("--out")
        .arg(&data);
    run("generate 24k conversations", c)?;
    build_release_binaries()?;
    let train = release_bin("train");
    let rust_out = dir.join("rust");
    let mut rust_secs = f64::INFINITY;
    for _ in 0..2 {
        let _ = std::fs::remove_dir_all(&rust_out);
        let t = Instant::now();
        let mut c = Command::new(&train);
        c.args([
            "data",
            "prepare",
            "--validation-split",
            "0",
            "--max-length",
            "100000",
            "--model",
        ])
        .arg(&model)
        .arg("--dataset")
        .arg(&data)
        .arg("--output")
        .arg(&rust_out);
        run("train data prepare (Rust)", c)?;
        rust_secs = rust_secs.min(t.elapsed().as_secs_f64());
    }
    let py_out = dir.join("python.parquet");
    let mut py_cmd = Command::new(&python);
    py_cmd
        .arg(&script)
        .args(["run", "--num-proc", "2", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&py_out);
    let py = last_json_line(&mut py_cmd, "the Python benchmark")?;
    let mut c = Command::new(&python);
    c.arg(&script)
        .args(["compare", "--python"])
        .arg(&py_out)
        .arg("--rust")
        .arg(&rust_out);
    run("compare token ids and labels of every row", c)?;
    let rows = py["rows"].as_f64().unwrap_or(0.0);
    let py_secs = py["seconds"].as_f64().unwrap_or(f64::NAN);
    let rust_rate = rows / rust_secs;
    let py_rate = rows / py_secs;
    println!(
        "\nbench-data: {rows} conversations (chatterbot-corpus, expanded), Qwen3 tokenizer and chat template, assistant-only labels"
    );
    println!(
        "  train-data (train data prepare, whole process, 2 cores)  {rust_secs:>8.2} s  {rust_rate:>10.0} rows/s"
    );
    println!(
        "  Python datasets.map (num_proc=2, load + map)             {py_secs:>8.2} s  {py_rate:>10.0} rows/s"
    );
    println!(
        "  ratio                                                    {:>8.2} x",
        rust_rate / py_rate
    );
    Ok(())
}

/// `cargo xtask bench-generate`: greedy answers to the same prompts from the real SmolLM2-135M
/// checkpoint by `train generate` (cpu backend) and by `transformers` `generate` (PyTorch, 2
/// threads), one after the other; checks the tokens are identical and prints tokens/s of both
/// (prefill included, model loading excluded) and the ratio.
pub fn bench_generate() -> Result<()> {
    const PROMPTS: [&str; 3] = [
        "What is the capital of France? Answer at length.",
        "Write a short story about a robot who learns to paint.",
        "Explain how a bicycle works.",
    ];
    let max_new = "64";
    let model = smollm2()?;
    let python = venv(true)?.join("bin/python");
    build_release_binaries()?;
    let train = release_bin("train");
    let mut rust_tokens = 0usize;
    let mut rust_secs = 0.0f64;
    let mut rust_ids = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        // The first prompt twice: the first run warms the page cache.
        for _ in 0..if i == 0 { 2 } else { 1 } {
            let mut c = Command::new(&train);
            c.args([
                "generate",
                "--json",
                "--max-new-tokens",
                max_new,
                "--prompt",
                p,
                "--model",
            ])
            .arg(&model);
            let v = last_json_line(&mut c, "train generate")?;
            let n = v["tokens"].as_u64().unwrap_or(0) as usize;
            let rate = v["tokens_per_sec"].as_f64().unwrap_or(f64::NAN);
            if rust_ids.len() == i {
                rust_ids.push(v["token_ids"].clone());
            } else {
                rust_ids[i] = v["token_ids"].clone();
                continue;
            }
            rust_tokens += n;
            rust_secs += n as f64 / rate;
        }
    }
    let mut c = Command::new(&python);
    c.arg(root().join("xtask/bench/bench_generate.py"))
        .args(["--max-new-tokens", max_new, "--model"])
        .arg(&model)
        .args(PROMPTS);
    let py = last_json_line(&mut c, "the Python benchmark")?;
    let rows = py["rows"].as_array().cloned().unwrap_or_default();
    let mut py_tokens = 0usize;
    let mut py_secs = 0.0f64;
    for (i, row) in rows.iter().enumerate() {
        if row["token_ids"] != rust_ids[i] {
            bail!(
                "prompt {i}: train generate and transformers generate differ:\n  {}\n  {}",
                rust_ids[i],
                row["token_ids"]
            );
        }
        py_tokens += row["token_ids"].as_array().map_or(0, Vec::len);
        py_secs += row["seconds"].as_f64().unwrap_or(f64::NAN);
    }
    let (r, p) = (rust_tokens as f64 / rust_secs, py_tokens as f64 / py_secs);
    println!(
        "\nbench-generate: SmolLM2-135M-Instruct, {} prompts, greedy, up to {max_new} new tokens, f32, 2 cores; tokens identical",
        PROMPTS.len()
    );
    println!(
        "  train generate (burn cpu backend, KV cache)   {rust_tokens:>5} tokens  {rust_secs:>7.2} s  {r:>7.1} tokens/s"
    );
    println!(
        "  transformers generate (torch {}, 2 threads)  {py_tokens:>5} tokens  {py_secs:>7.2} s  {p:>7.1} tokens/s",
        py["torch"].as_str().unwrap_or("?")
    );
    println!(
        "  ratio                                          {:>7.2} x",
        r / p
    );
    Ok(())
}

/// The step rows of a run's `metrics.jsonl` (or its evaluation rows).
fn metric_rows(out: &Path, kind: &str) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))
        .with_context(|| format!("reading {}", out.join("metrics.jsonl").display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == kind)
        .collect())
}

/// `cargo xtask rl-smollm2`: the learning checks of `train grpo` and `train dpo` on the real
/// SmolLM2-135M-Instruct, and GRPO's generation throughput against TRL's on the same model,
/// prompts and settings. Prints the curves and the figures for `docs/benchmarks.md`.
pub fn rl_smollm2(args: &[String]) -> Result<()> {
    let steps: usize = match args {
        [flag, n] if flag == "--steps" => n.parse().context("--steps N")?,
        [] => 30,
        _ => bail!("usage: cargo xtask rl-smollm2 [--steps N]"),
    };
    let model = smollm2()?;
    build_release_binaries()?;
    let train = release_bin("train");
    let work = cache().join("rl-smollm2");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // Sums of two numbers in 1..=20, the same for every run (a fixed LCG).
    let mut state = 12_345u64;
    let mut next = |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n + 1
    };
    let mut prompts = String::new();
    let mut pairs = String::new();
    for _ in 0..96 {
        let (a, b) = (next(20), next(20));
        let question = format!("What is {a} + {b}? Answer with just the number.");
        prompts.push_str(
            &serde_json::json!({"prompt": [{"role": "user", "content": question}], "answer": (a + b).to_string()})
                .to_string(),
        );
        prompts.push('\n');
        pairs.push_str(
            &serde_json::json!({
                "prompt": question,
                "chosen": format!("{}", a + b),
                "rejected": format!("Let me think about that. {a} plus {b} is a sum of two numbers, and I would say it is {}.", a + b + next(5)),
            })
            .to_string(),
        );
        pairs.push('\n');
    }
    let prompts_path = work.join("math.jsonl");
    let pairs_path = work.join("pairs.jsonl");
    let rewards_path = work.join("rewards.toml");
    std::fs::write(&prompts_path, &prompts)?;
    std::fs::write(&pairs_path, &pairs)?;
    std::fs::write(
        &rewards_path,
        "# The format the prompt asks for: the answer starts with a number.\n\
         [[reward]]\ntype = \"regex\"\npattern = \"^\\\\s*-?\\\\d\"\nname = \"starts_with_number\"\n\n\
         # Correctness: the first number of the completion is the sum.\n\
         [[reward]]\ntype = \"exact_match\"\ncolumn = \"answer\"\nextract = \"(-?\\\\d+)\"\nname = \"correct\"\n",
    )?;
    let (generations, max_new, batch) = ("8", "32", "2");

    // 1. GRPO: the mean reward per step.
    let grpo_out = work.join("grpo");
    let mut c = Command::new(&train);
    c.args(["grpo", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&prompts_path)
        .arg("--reward")
        .arg(&rewards_path)
        .arg("--output")
        .arg(&grpo_out)
        .args([
            "--num-generations",
            generations,
            "--max-new-tokens",
            max_new,
        ])
        .args(["--batch-size", batch, "--learning-rate", "5e-6"])
        .args(["--lr-scheduler", "constant", "--warmup-steps", "0"])
        .args(["--max-steps", &steps.to_string(), "--save-steps", "100000"])
        .args(["--preview-prompts", "0", "--seed", "42", "--yes"]);
    run("train grpo on SmolLM2-135M-Instruct", c)?;
    let rows = metric_rows(&grpo_out, "step")?;
    let get = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\nGRPO learning check: SmolLM2-135M-Instruct, {steps} steps × {batch} prompts × {generations} completions (≤ {max_new} tokens), lr 5e-6, rewards starts_with_number + correct"
    );
    println!("  step  reward  starts_with_number  correct  mean_length");
    for r in &rows {
        println!(
            "  {:>4}  {:>6.3}  {:>18.3}  {:>7.3}  {:>11.1}",
            get(r, "step"),
            get(r, "reward"),
            get(r, "rewards/starts_with_number/mean"),
            get(r, "rewards/correct/mean"),
            get(r, "completions/mean_length")
        );
    }
    let window = 5.min(rows.len());
    let mean = |rs: &[serde_json::Value]| {
        rs.iter().map(|r| get(r, "reward")).sum::<f64>() / rs.len().max(1) as f64
    };
    println!(
        "  mean reward: first {window} steps {:.3}, last {window} steps {:.3}",
        mean(&rows[..window]),
        mean(&rows[rows.len() - window..])
    );
    let rates: Vec<f64> = rows
        .iter()
        .skip(1)
        .map(|r| get(r, "generation/tokens_per_sec"))
        .collect();
    let ours = rates.iter().sum::<f64>() / rates.len().max(1) as f64;

    // 2. TRL's GRPO generation, same model, prompts and settings.
    let env = venv(true)?;
    pip_install(&env, "install trl (TRL's GRPO generation)", TRL_PACKAGES)?;
    let python = env.join("bin/python");
    let mut c = Command::new(&python);
    c.arg(root().join("xtask/bench/bench_grpo_generate.py"))
        .arg("--model")
        .arg(&model)
        .arg("--prompts")
        .arg(&prompts_path)
        .args(["--batches", "4", "--batch-size", batch])
        .args([
            "--num-generations",
            generations,
            "--max-new-tokens",
            max_new,
        ]);
    let trl = last_json_line(&mut c, "TRL's GRPO generation")?;
    let theirs = trl["tokens_per_sec"].as_f64().unwrap_or(f64::NAN);
    println!(
        "\nGRPO generation throughput (completion tokens/s; {batch} prompts × {generations} completions, ≤ {max_new} new tokens, T = 1, f32, 2 cores)"
    );
    println!("  train grpo (steps 2..{steps}, mean)        {ours:>7.1}");
    println!(
        "  TRL {} GRPOTrainer generation (torch {}) {theirs:>7.1}",
        trl["trl"].as_str().unwrap_or(""),
        trl["torch"].as_str().unwrap_or("?")
    );
    println!(
        "  ratio                                 {:>7.2} x",
        ours / theirs
    );

    // 3. DPO: held-out accuracy of the implicit reward.
    let dpo_out = work.join("dpo");
    let mut c = Command::new(&train);
    c.args(["dpo", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&pairs_path)
        .arg("--output")
        .arg(&dpo_out)
        .args([
            "--validation-split",
            "16",
            "--eval-steps",
            "5",
            "--max-steps",
            "20",
        ])
        .args([
            "--batch-size",
            "4",
            "--learning-rate",
            "5e-6",
            "--warmup-steps",
            "0",
        ])
        .args([
            "--save-steps",
            "100000",
            "--preview-prompts",
            "0",
            "--seed",
            "42",
            "--yes",
        ]);
    run("train dpo on SmolLM2-135M-Instruct", c)?;
    println!(
        "\nDPO learning check: 80 training pairs, 16 held out, 20 steps × 4 pairs, lr 5e-6, β 0.1"
    );
    println!("  step  eval_loss  eval_rewards/accuracies  eval_rewards/margins");
    for r in metric_rows(&dpo_out, "eval")? {
        println!(
            "  {:>4}  {:>9.4}  {:>23.3}  {:>20.4}",
            get(&r, "step"),
            get(&r, "eval_loss"),
            get(&r, "eval_rewards/accuracies"),
            get(&r, "eval_rewards/margins")
        );
    }
    Ok(())
}
