//! Helpers shared by the integration tests that drive the `train` binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Output, Stdio};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `train ARGS` with its model registry in `dir`.
pub fn train(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .env("TRAIN_MODEL_REGISTRY", dir.join("models.json"))
        .output()
        .unwrap()
}

/// The JSON object on the last line of stdout.
pub fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}

/// Starts `train ARGS` in the background and waits until a stderr line starts with `until`;
/// returns the process and the rest of its stderr.
pub fn spawn_until(
    dir: &Path,
    args: &[&str],
    until: &str,
) -> (Child, Lines<BufReader<ChildStderr>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .env("TRAIN_MODEL_REGISTRY", dir.join("models.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    wait_for(&mut lines, until);
    (child, lines)
}

/// Reads stderr lines until one starts with `prefix`.
pub fn wait_for(lines: &mut Lines<BufReader<ChildStderr>>, prefix: &str) {
    for line in lines.by_ref() {
        if line.unwrap().starts_with(prefix) {
            return;
        }
    }
    panic!("the process ended before printing a line starting with {prefix:?}");
}

/// Runs `train ARGS` and asserts that it succeeded (showing its stderr otherwise).
pub fn train_ok(dir: &Path, args: &[&str]) -> Output {
    let o = train(dir, args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The tiny Qwen2 checkpoint that ships with the repository.
pub fn model() -> PathBuf {
    root().join("crates/train-model/tests/fixtures/qwen2")
}

/// The first `rows` shipped conversations, as `dir/d.jsonl`.
pub fn data(dir: &Path, rows: usize) -> PathBuf {
    let p = dir.join("d.jsonl");
    let sample =
        std::fs::read_to_string(root().join("crates/train-data/tests/fixtures/sample.jsonl"))
            .unwrap();
    std::fs::write(
        &p,
        sample
            .lines()
            .take(rows)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    p
}

/// The flags of a small, quick run.
pub fn base<'a>(model: &'a Path, data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--batch-size",
        "4",
        "--max-length",
        "256",
        "--learning-rate",
        "1e-3",
    ]
}
