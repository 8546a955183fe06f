//! `cargo xtask ci`: every check, cheapest first, in the order that lets them share builds.
//!
//! A cold run is dominated by compiling, so the steps are arranged around the builds they
//! share: one dev-profile check build (clippy, with the cuda backend, then rustdoc), one
//! release build with [`RELEASE_FEATURES`] (binaries, examples, every test including the ones
//! against the real SmolLM2 checkpoint and tokenizers, doc tests, benches, the report), one
//! release build with the tch backend on top (its parity tests), and the instrumented fuzz
//! build. The downloads (the Python venv with PyPI torch, the asset packages) run on a thread
//! of their own from the start, while the first builds compile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::downloads::{assets, qwen3_tokenizer_dir, venv};
use crate::{
    LOG, RELEASE_FEATURES, TCH_TEST_FEATURES, build_release_binaries, cache, cargo, cargo_tool,
    library_crates, publishable_crates, release, release_bin, root, run, smollm2, target_dir,
    torch_env, which,
};

/// Features of every dev-profile step (clippy, rustdoc): the cuda backend builds without a
/// GPU, so clippy checks its code with everything else instead of a separate `cargo check`.
const CHECK_FEATURES: &[&str] = &[
    "train-model/cuda",
    "train-logits/cuda",
    "train-runner/cuda",
    "train-cli/cuda",
    "train-examples/cuda",
    "train-model/real-checkpoint",
    "train-data/real-tokenizers",
    "train-model/gguf",
];

/// `cargo <verb>` for a dev-profile step. `RUSTC_BOOTSTRAP=1` (which rustdoc's JSON output
/// needs) is set for all of them: build scripts that probe for nightly features watch it, so a
/// step without it would rebuild their crates and every crate above them.
fn check_cargo(verb: &str) -> Command {
    let mut c = cargo();
    c.arg(verb).env("RUSTC_BOOTSTRAP", "1");
    c
}

/// Time taken by each step, printed at the end whether the run passed or not.
#[derive(Default)]
struct Timings(Vec<(String, f64)>);

impl Timings {
    fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let t = Instant::now();
        let result = f();
        self.0.push((name.to_string(), t.elapsed().as_secs_f64()));
        result.with_context(|| format!("ci step `{name}` failed"))
    }

    fn print(&self, started: Instant, passed: bool) {
        eprintln!(
            "\nxtask ci: {} in {:.1} min",
            if passed {
                "all checks passed"
            } else {
                "FAILED"
            },
            started.elapsed().as_secs_f64() / 60.0
        );
        for (name, secs) in &self.0 {
            eprintln!("  {name:<32} {secs:>7.1} s");
        }
    }
}

/// The downloads, started on a thread of their own; [`Downloads::wait`] joins it once.
struct Downloads(Option<JoinHandle<Result<()>>>);

impl Downloads {
    fn start() -> Downloads {
        Downloads(Some(std::thread::spawn(|| -> Result<()> {
            let log = cache().join("logs/downloads.log");
            std::fs::create_dir_all(log.parent().context("log directory")?)?;
            let file = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            LOG.with(|l| *l.borrow_mut() = Some(file));
            let result = venv(true).and_then(|_| assets()).map(drop);
            result.with_context(|| format!("the downloads failed; their log: {}", log.display()))
        })))
    }

    fn wait(&mut self) -> Result<()> {
        match self.0.take() {
            Some(handle) => match handle.join() {
                Ok(result) => result,
                Err(_) => bail!("the download thread panicked"),
            },
            None => Ok(()),
        }
    }
}

pub(crate) fn ci() -> Result<()> {
    let started = Instant::now();
    forget_other_checkouts_tests()?;
    let mut timings = Timings::default();
    let result = steps(&mut timings);
    timings.print(started, result.is_ok());
    result
}

/// Test executables carry the checkout they were built in (`env!("CARGO_MANIFEST_DIR")` finds
/// their fixtures), but the target directory is shared by every checkout of the machine (CI's
/// clean clone, a developer's tree) and cargo reuses a test binary built in another checkout
/// without rebuilding it: its fixture paths then point into that other checkout, or nowhere.
/// When the release profile was last used from another checkout, its test executables are
/// removed so that cargo builds them again here.
fn forget_other_checkouts_tests() -> Result<()> {
    let release = target_dir().join("release");
    let mark = release.join(".train-rs-checkout");
    let here = root().display().to_string();
    if std::fs::read_to_string(&mark).is_ok_and(|m| m == here) {
        return Ok(());
    }
    if let Ok(entries) = std::fs::read_dir(release.join("deps")) {
        for entry in entries.flatten() {
            let path = entry.path();
            // Executables are `name-hash`, without an extension (libraries, `.d`, `.rmeta`…
            // have one).
            if path.extension().is_none() && path.is_file() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    std::fs::create_dir_all(&release)?;
    std::fs::write(&mark, here).with_context(|| format!("writing {}", mark.display()))?;
    Ok(())
}

fn steps(t: &mut Timings) -> Result<()> {
    t.step("fmt", || {
        let mut c = cargo();
        c.args(["fmt", "--all", "--check"]);
        run("fmt", c)
    })?;
    t.step("tidy", crate::tidy::tidy)?;
    let mut downloads = Downloads::start();
    t.step("clippy (cuda backend included)", || {
        let mut c = check_cargo("clippy");
        c.args(["--workspace", "--all-targets", "--features"])
            .arg(CHECK_FEATURES.join(","))
            .args(["--", "-D", "warnings"]);
        run("clippy, warnings denied", c)
    })?;
    t.step("docs and public API", || api(false))?;
    t.step("release build", build_release_binaries)?;
    t.step("downloads (wait)", || downloads.wait())?;
    t.step("test (cpu)", || {
        let smol = smollm2()?;
        // Not `--examples`: they hold no tests, and their test harnesses were eleven more
        // release binaries to compile (the examples step runs the built examples).
        let mut c = release("test", &["--lib", "--bins", "--tests"]);
        c.env("TRAIN_SMOLLM2_DIR", &smol)
            .env("TRAIN_QWEN3_TOKENIZER_DIR", qwen3_tokenizer_dir()?);
        run(
            "tests, cpu backend (with the real SmolLM2 checkpoint and the genuine Qwen3 and \
             SmolLM2 tokenizers vs transformers)",
            c,
        )
    })?;
    t.step("doc tests", || {
        run("doc tests", release("test", &["--doc"]))
    })?;
    t.step("examples", run_examples)?;
    t.step("peft / transformers round trips", python_round_trips)?;
    t.step("bench build", || {
        // `cargo bench` has no `--release` (the bench profile inherits release's settings, so
        // it shares the release build).
        let mut c = cargo();
        c.args([
            "bench",
            "--workspace",
            "--no-run",
            "--features",
            RELEASE_FEATURES,
        ]);
        run("benches compile", c)
    })?;
    t.step("bench-gpu dry run", || {
        crate::bench::bench_gpu(&["--dry-run".to_string()])
    })?;
    t.step("report (chromium)", report_png)?;
    t.step("test (tch)", || {
        let mut c = cargo();
        // The model, loop and generation parity modules, the fused operations and the loading
        // of libtorch's libraries of the crates' test binaries (the filters also match
        // `loop_parity::`): only the packages
        // that hold them (train-runner's test binary would be compiled against libtorch for
        // nothing), with workspace-hack so that the shared dependencies keep the release
        // build's features (`cargo tree -e features` of this selection and of the whole
        // workspace list the same features for every dependency).
        c.args(["test", "--release", "--features", TCH_TEST_FEATURES]);
        for k in ["train-model", "train-logits", "train-cli", "workspace-hack"] {
            c.args(["-p", k]);
        }
        c.args([
            "--test",
            "it",
            "--",
            "parity::",
            "generate::",
            "fused_ops::",
            "libtorch::",
        ])
        .envs(torch_env()?);
        run(
            "model, training-loop and generation parity, tch backend (libtorch 2.9.0)",
            c,
        )
    })?;
    t.step("fuzz (15 s a target)", || fuzz(15))?;
    t.step("package", || {
        // One invocation, so that crates depending on each other resolve through cargo's local
        // overlay of the workspace instead of crates.io.
        let crates = publishable_crates()?;
        let mut c = cargo();
        c.args(["package", "--no-verify", "--allow-dirty"]);
        for k in &crates {
            c.args(["-p", k]);
        }
        run(&format!("package {}", crates.join(", ")), c)
    })
}

/// A LoRA adapter trained and merged by `train` (built by the examples step) is loaded by
/// Python `peft` onto its base model: its logits must equal those of the merged model. A
/// Qwen3-VL checkpoint trained by `train` loads in `transformers` with its vision tower intact.
pub(crate) fn python_round_trips() -> Result<()> {
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
    let check = |mode: &str, paths: &[&Path]| {
        let mut c = Command::new(venv.join("bin/python"));
        c.arg(root().join("xtask/fixtures/make_fixtures.py"))
            .arg("--assets")
            .arg(&assets)
            .arg("--out")
            .arg(&fixtures)
            .arg(mode)
            .args(paths);
        c
    };

    // An adapter on every projection (Qwen3-MoE: also on the router and the experts' stacked
    // weights, PEFT's `target_parameters`, which peft loads onto transformers 5's fused
    // experts), merged by `train merge`, loaded by peft.
    for (arch, what) in [("qwen3", "adapter"), ("qwen3_moe", "experts' adapter")] {
        let (adapter, merged) = (
            work.join(format!("{arch}-adapter")),
            work.join(format!("{arch}-merged")),
        );
        let mut c = train(&fixtures.join(arch), &adapter, "4");
        c.args([
            "--lora-r",
            "8",
            "--lora-alpha",
            "16",
            "--lora-target",
            "all-linear",
        ]);
        run(&format!("train a LoRA {what} on {arch} with train"), c)?;
        let mut c = Command::new(release_bin("train"));
        c.arg("merge")
            .arg(&adapter)
            .arg("--output")
            .arg(&merged)
            .args(["--dtype", "fp32"]);
        run("merge it with train merge", c)?;
        run(
            &format!("load the {what} with peft; compare with the merged model"),
            check("--check-adapter", &[&adapter, &merged]),
        )?;
    }

    // Qwen3-VL: train the text decoder, then transformers loads the whole checkpoint back.
    let trained = work.join("qwen3_vl");
    run(
        "train the text decoder of the tiny Qwen3-VL with train",
        train(&fixtures.join("qwen3_vl"), &trained, "3"),
    )?;
    run(
        "load it with transformers; vision tower unchanged",
        check("--check-vl", &[&fixtures.join("qwen3_vl"), &trained]),
    )?;

    // TensorBoard: the event files of `--report-to tensorboard`, read by tensorboard's own
    // event reader, hold metrics.jsonl's rows, the evaluations and the previews.
    let logged = work.join("tensorboard");
    let mut c = Command::new(release_bin("train"));
    c.arg("--model")
        .arg(fixtures.join("qwen3"))
        .arg("--dataset")
        .arg(root().join("crates/train-data/tests/fixtures/sample.jsonl"))
        .arg("--output")
        .arg(&logged)
        .args([
            "--max-steps",
            "20",
            "--batch-size",
            "4",
            "--eval-steps",
            "10",
        ])
        .args(["--logging-steps", "3", "--report-to", "tensorboard"]);
    run("train with --report-to tensorboard", c)?;
    run(
        "read its event files with tensorboard's EventAccumulator",
        check("--check-tensorboard", &[&logged]),
    )?;

    // GGUF: `train export` of every family it writes, read back by the gguf package: the
    // fixtures as they are (Llama with its RoPE scaling as `rope_freqs`, Mistral's
    // SentencePiece-style tokenizer), and for OLMo 2, SmolLM3 and Gemma 3 (whose fixtures are
    // variants llama.cpp cannot run, refused) the variants the refusals point to.
    let variants = work.join("gguf-variants");
    let mut c = Command::new(venv.join("bin/python"));
    c.arg(root().join("xtask/fixtures/llama_cpp_check.py"))
        .arg("--fixtures")
        .arg(&fixtures)
        .arg("--variants-only")
        .arg(&variants);
    run("write the OLMo 2, SmolLM3 and Gemma 3 variants", c)?;
    let models = ["qwen2", "qwen3", "llama", "mistral"]
        .map(|a| (a, fixtures.join(a)))
        .into_iter()
        .chain(["olmo2", "smollm3", "gemma3"].map(|a| (a, variants.join(a))));
    // Every file exported, then all read back in one Python process (torch imported once).
    let mut pairs = Vec::new();
    for (arch, model) in models {
        let file = work.join(format!("{arch}.gguf"));
        let mut c = Command::new(release_bin("train"));
        c.arg("export")
            .arg(&model)
            .args(["--format", "gguf", "--output"])
            .arg(&file);
        run(&format!("train export --format gguf ({arch})"), c)?;
        pairs.push(file);
        pairs.push(model);
    }
    let pairs: Vec<&Path> = pairs.iter().map(PathBuf::as_path).collect();
    run(
        "read the GGUF files with the gguf package",
        check("--check-gguf", &pairs),
    )?;
    Ok(())
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

/// rustdoc of the library crates in one invocation (one feature resolution), as JSON (what
/// `public-api` reads) with warnings denied: rustdoc's lints (broken intra-doc links,
/// missing docs, links to private items) run for this output format too, so one pass checks the
/// documentation and feeds the API snapshots (it also reported a redundant link that the HTML
/// pass had not). Dev profile, like clippy, with clippy's features and environment, so that it
/// reuses clippy's check build of the dependencies.
fn rustdoc_json() -> Result<()> {
    let libraries = library_crates()?;
    let features: Vec<&str> = CHECK_FEATURES
        .iter()
        .copied()
        .filter(|f| libraries.iter().any(|k| f.starts_with(&format!("{k}/"))))
        .collect();
    let mut c = check_cargo("doc");
    c.args(["--no-deps", "--features", &features.join(",")]);
    for k in &libraries {
        c.args(["-p", k]);
    }
    // Selected so that the host dependencies resolve with the features of the other steps
    // (its only purpose: see workspace-hack/src/lib.rs); without it, this step would compile
    // every proc macro and the crates above them a second time.
    c.args(["-p", "workspace-hack"]);
    // The JSON output is unstable rustdoc; the pinned stable toolchain produces it under
    // RUSTC_BOOTSTRAP=1 (format 57 with Rust 1.95, what public-api 0.52.0 reads).
    c.env(
        "RUSTDOCFLAGS",
        "-D warnings -Z unstable-options --output-format json",
    );
    run("rustdoc of the library crates (JSON), warnings denied", c)
}

/// The library crates' documentation builds without a warning (broken links, missing docs).
pub(crate) fn docs() -> Result<()> {
    rustdoc_json()
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

/// Runs every fuzz target for `seconds`, starting from the committed seeds in
/// `fuzz/seeds/<target>` plus the corpus grown by earlier runs (kept in the cache). A crash
/// fails the command and leaves its input in `fuzz/artifacts/<target>/`; commit it as a seed
/// and fix the bug (the seed then replays in every later run).
pub(crate) fn fuzz(seconds: u64) -> Result<()> {
    let tool = cargo_tool("fuzz", CARGO_FUZZ_VERSION)?;
    let fuzz_dir = root().join("fuzz");
    let fuzz_command = |verb: &str| {
        let mut c = Command::new(&tool);
        c.current_dir(&fuzz_dir)
            .args(["fuzz", verb, "--sanitizer", "none", "--release"])
            // cargo-fuzz compiles a release build as one codegen unit a crate (for ThinLTO's
            // inlining, i.e. fuzzing speed); 16 lets LLVM use both cores inside the big crates
            // (polars, burn) of a cold build.
            .args(["--codegen-units", "16"])
            // Stable toolchain (rust-toolchain.toml); cargo-fuzz's instrumentation flags are
            // stable but it asks for unstable ones on the side.
            .env("RUSTC_BOOTSTRAP", "1")
            .env("CARGO_TARGET_DIR", cache().join("fuzz-target"));
        c
    };
    // Every target in one build (both cores busy), then the runs two at a time: libFuzzer
    // runs one process on one core, so each target gets the same fuzzing time as alone.
    run("build the fuzz targets", fuzz_command("build"))?;
    // The targets write their inputs to scratch files in the temporary directory, and
    // libFuzzer ends a run with `exit`, past any clean-up: give the runs a directory of their
    // own under the cache, emptied before and after.
    let scratch = cache().join("fuzz-tmp");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = fuzz_runs(seconds, &fuzz_dir, &scratch, &fuzz_command);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// The runs of [`fuzz`], two targets at a time, with `scratch` as their temporary directory.
fn fuzz_runs(
    seconds: u64,
    fuzz_dir: &Path,
    scratch: &Path,
    fuzz_command: &dyn Fn(&str) -> Command,
) -> Result<()> {
    for pair in FUZZ_TARGETS.chunks(2) {
        let started = Instant::now();
        let mut children = Vec::new();
        for target in pair {
            let corpus = cache().join("fuzz-corpus").join(target);
            std::fs::create_dir_all(&corpus)?;
            let seeds = fuzz_dir.join("seeds").join(target);
            let artifacts = fuzz_dir.join("artifacts").join(target);
            std::fs::create_dir_all(&artifacts)?;
            let mut c = fuzz_command("run");
            c.env("TMPDIR", scratch)
                .arg(target)
                .arg(&corpus)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .args(["-rss_limit_mb=4096", "-timeout=20", "-print_final_stats=1"]);
            // libFuzzer reports every new input; keep that in a log and show the summary.
            let log = cache().join("fuzz-logs").join(format!("{target}.log"));
            std::fs::create_dir_all(log.parent().context("log directory")?)?;
            let file = std::fs::File::create(&log)?;
            c.stdout(file.try_clone()?).stderr(file);
            eprintln!("\n==> fuzz {target} for {seconds} s\n    {c:?}");
            let child = c
                .spawn()
                .with_context(|| format!("fuzz {target}: could not start {c:?}"))?;
            children.push((target, child, log));
        }
        let mut failed = Vec::new();
        for (target, mut child, log) in children {
            let status = child.wait()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let shown: Vec<&str> = if status.success() {
                lines
                    .iter()
                    .filter(|l| l.starts_with("stat::") || l.starts_with("Done "))
                    .copied()
                    .collect()
            } else {
                failed.push(format!("fuzz {target} failed ({status})"));
                lines[lines.len().saturating_sub(80)..].to_vec()
            };
            eprintln!("{}\n(full log: {})", shown.join("\n"), log.display());
            if status.success() {
                eprintln!("<== fuzz {target}: ok in {:.1?}", started.elapsed());
            }
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
    }
    Ok(())
}

/// `xtask/api-list` (the `public-api` library, the one cargo-public-api is made of), built in
/// its own workspace and dev profile; returns its executable.
fn api_lister() -> Result<std::path::PathBuf> {
    let target = cache().join("tools-target");
    let mut c = cargo();
    c.args(["build", "--locked", "--quiet", "--manifest-path"])
        .arg(root().join("xtask/api-list/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target);
    run("build xtask/api-list", c)?;
    Ok(target.join("debug/train-api-list"))
}

/// The public API of every library crate (`public-api` over rustdoc JSON, blanket and
/// auto-trait impls left out, as `cargo public-api -ss`) against `api/<crate>.txt`. `bless`
/// rewrites the snapshots.
pub(crate) fn api(bless: bool) -> Result<()> {
    let tool = api_lister()?;
    rustdoc_json()?;
    let mut problems = Vec::new();
    for k in library_crates()? {
        let json = target_dir()
            .join("doc")
            .join(format!("{}.json", k.replace('-', "_")));
        let out = Command::new(&tool)
            .arg(&json)
            .output()
            .with_context(|| format!("running {}", tool.display()))?;
        if !out.status.success() {
            bail!(
                "train-api-list failed on {}:\n{}",
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

/// `cargo xtask report-png`: a short run of the README's first command (tiny Qwen3, 2 epochs),
/// then its `report.html` rendered by a real headless browser (Debian's `chromium`, installed
/// with apt when missing) to `<cache>/report/report.png`; fails when the page does not render.
pub(crate) fn report_png() -> Result<()> {
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
    build_release_binaries()?;
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
