//! `train --no-shuffle --max-steps 3` against a plain PyTorch loop (`loop.reference.json`, made by
//! `cargo xtask fixtures`): per-step losses and gradient norms within 2e-3 relative, for each
//! fixture architecture, on every backend compiled in. The same for LoRA: `train --model
//! <arch>-lora` (a PEFT adapter directory saved by `peft`) continues training the adapter, against
//! `peft` running the same loop (`lora.reference.json`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn check(backend: &str) {
    compare(
        backend,
        "loop.reference.json",
        "",
        &["qwen3", "qwen2", "llama"],
        &[],
    );
}

fn check_lora(backend: &str) {
    compare(
        backend,
        "lora.reference.json",
        "-lora",
        &["qwen3", "llama"],
        &[],
    );
    // Qwen3-MoE's adapter on the attention, the router and the experts' stacked weights;
    // `peft`'s loop trains without the router's load-balancing term (its config leaves
    // `output_router_logits` off), which `train` adds unless told not to.
    compare(
        backend,
        "lora.reference.json",
        "-lora",
        &["qwen3_moe"],
        &["--router-aux-loss-coef", "0"],
    );
}

/// Trains `<arch><suffix>` for 3 steps (with `extra` arguments) and compares every step with
/// `reference`.
fn compare(backend: &str, reference: &str, suffix: &str, arches: &[&str], extra: &[&str]) {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(reference),
        )
        .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("first12.jsonl");
    let sample =
        std::fs::read_to_string(root().join("crates/train-data/tests/fixtures/sample.jsonl"))
            .unwrap();
    std::fs::write(
        &data,
        sample
            .lines()
            .take(12)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let mut worst = 0f64;
    for &arch in arches {
        let out = dir.path().join(arch);
        let model = root()
            .join("crates/train-model/tests/fixtures")
            .join(format!("{arch}{suffix}"));
        let status = Command::new(env!("CARGO_BIN_EXE_train"))
            .args([
                "--model",
                model.to_str().unwrap(),
                "--dataset",
                data.to_str().unwrap(),
            ])
            .args([
                "--output",
                out.to_str().unwrap(),
                "--no-shuffle",
                "--max-steps",
                "3",
                "--batch-size",
                "4",
            ])
            .args([
                "--learning-rate",
                "1e-3",
                "--weight-decay",
                "0.01",
                "--lr-scheduler",
                "constant",
            ])
            .args([
                "--validation-split",
                "0",
                "--skip-validation",
                "--backend",
                backend,
            ])
            .args(extra)
            .env("TRAIN_MODEL_REGISTRY", dir.path().join("models.json"))
            .status()
            .unwrap();
        assert!(status.success(), "{arch} on {backend}: train failed");
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let expect = &reference["arches"][arch];
        for (i, row) in rows.iter().enumerate() {
            for (field, key) in [("loss", "losses"), ("grad_norm", "grad_norms")] {
                let got = row[field].as_f64().unwrap();
                let want = expect[key][i].as_f64().unwrap();
                let rel = (got - want).abs() / want.abs();
                worst = worst.max(rel);
                println!(
                    "{backend} {arch} step {}: {field} {got:.6} vs PyTorch {want:.6} (relative {rel:.2e})",
                    i + 1
                );
                assert!(
                    rel <= 2e-3,
                    "{backend} {arch} step {}: {field} {got} vs {want}",
                    i + 1
                );
            }
        }
        assert_eq!(rows.len(), 3);
        if !suffix.is_empty() {
            assert!(out.join("adapter_model.safetensors").is_file());
        }
    }
    println!("{backend}{suffix}: worst relative difference {worst:.2e}");
}

#[cfg(feature = "cpu")]
#[test]
fn matches_a_pytorch_loop_on_cpu() {
    check("cpu");
}

#[cfg(feature = "tch")]
#[test]
fn matches_a_pytorch_loop_on_tch() {
    check("tch");
}

#[cfg(feature = "cpu")]
#[test]
fn lora_matches_a_peft_loop_on_cpu() {
    check_lora("cpu");
}

#[cfg(feature = "tch")]
#[test]
fn lora_matches_a_peft_loop_on_tch() {
    check_lora("tch");
}
