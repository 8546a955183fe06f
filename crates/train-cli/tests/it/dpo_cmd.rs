//! `train dpo` end to end on the tiny Qwen2 checkpoint: every form of TRL's preference rows,
//! the first step's loss at log 2 (the policy starts as its reference), evaluation, checkpoints
//! and the final model, exact resume; bad rows and flags refused with the file, line and field.

use std::path::{Path, PathBuf};

use crate::common::{last_json, model, train, train_ok};

/// Twelve pairs in TRL's three forms.
fn prefs(dir: &Path) -> PathBuf {
    let mut lines = Vec::new();
    for i in 0..12 {
        let line = match i % 3 {
            0 => serde_json::json!({
                "prompt": format!("What is {i} plus {i}?"),
                "chosen": format!("It is {}.", 2 * i),
                "rejected": "I do not know, and I will not say.",
            }),
            1 => serde_json::json!({
                "prompt": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": format!("Name a colour number {i}.")}],
                "chosen": [{"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "assistant", "content": "Colours are a social construct, so no."}],
            }),
            _ => serde_json::json!({
                "chosen": [{"role": "user", "content": format!("Say hi {i} times.")},
                           {"role": "assistant", "content": "Hi!"}],
                "rejected": [{"role": "user", "content": format!("Say hi {i} times.")},
                             {"role": "assistant", "content": "No."}],
            }),
        };
        lines.push(line.to_string());
    }
    let path = dir.join("prefs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn args<'a>(m: &'a str, d: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "dpo",
        "--model",
        m,
        "--dataset",
        d,
        "--output",
        out,
        "--batch-size",
        "2",
        "--learning-rate",
        "1e-3",
        "--validation-split",
        "2",
        "--preview-prompts",
        "0",
    ]
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn trains_on_every_form_of_preference_rows_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let d = prefs(dir.path());
    let (m, d) = (m.to_str().unwrap(), d.to_str().unwrap());
    let full = dir.path().join("full");
    let mut a = args(m, d, full.to_str().unwrap());
    a.extend([
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--eval-steps",
        "2",
        "--no-shuffle",
        "--json",
    ]);
    let o = train_ok(dir.path(), &a);
    let s = last_json(&o);
    assert_eq!(s["status"], "completed");
    assert_eq!(s["global_step"], 4);
    // An evaluation counts pairs, and says so.
    let err = String::from_utf8_lossy(&o.stderr);
    // The progress line shows the accuracy (0 at the first step: the policy is the reference).
    assert!(
        err.contains("step 1/4 ") && err.contains(" acc 0.000 "),
        "{err}"
    );
    assert!(
        err.contains("eval after step 2: loss") && err.contains(" over 2 pairs"),
        "{err}"
    );
    assert!(s["eval_loss"].as_f64().is_some_and(f64::is_finite));
    assert!(full.join("model.safetensors").exists() && full.join("checkpoint-2").is_dir());
    let rows = metrics(&full);
    let steps: Vec<&serde_json::Value> = rows.iter().filter(|r| r["kind"] == "step").collect();
    assert_eq!(steps.len(), 4, "{rows:?}");
    // The policy starts as the reference: every pair's margin is 0, the sigmoid loss log 2.
    let first = steps[0]["loss"].as_f64().unwrap();
    assert!(
        (first - std::f64::consts::LN_2).abs() < 1e-4,
        "first step's loss {first}"
    );
    assert!(steps.iter().all(|r| r["grad_norm"].as_f64().unwrap() > 0.0));
    // TRL's metrics in every row: at the first step the policy is the reference, so every reward
    // is 0 and no pair is ranked right yet.
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(steps.iter().all(|r| r[key].is_f64()), "{key} in {rows:?}");
    }
    for key in ["rewards/chosen", "rewards/margins", "rewards/accuracies"] {
        assert!(
            steps[0][key].as_f64().unwrap().abs() < 1e-5,
            "{key}: {}",
            steps[0]
        );
    }
    assert!(steps[0]["logps/chosen"].as_f64().unwrap() < 0.0);
    let evals: Vec<&serde_json::Value> = rows.iter().filter(|r| r["kind"] == "eval").collect();
    assert!(!evals.is_empty() && evals.iter().all(|r| r["eval_rewards/margins"].is_f64()));
    // The monitor charts them.
    assert!(full.join("plots/rewards_margins.svg").exists());
    assert!(full.join("plots/rewards_accuracies.svg").exists());

    // The same run, its last checkpoint and final model lost, resumed from checkpoint 2: the
    // same losses for steps 3 and 4.
    let part = dir.path().join("part");
    let mut a: Vec<String> = args(m, d, part.to_str().unwrap())
        .into_iter()
        .map(str::to_string)
        .collect();
    for x in [
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--eval-steps",
        "2",
        "--no-shuffle",
    ] {
        a.push(x.to_string());
    }
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    train_ok(dir.path(), &refs);
    std::fs::remove_file(part.join("model.safetensors")).unwrap();
    std::fs::remove_dir_all(part.join("checkpoint-4")).unwrap();
    let cut: Vec<String> = std::fs::read_to_string(part.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["step"].as_u64().unwrap_or(0) <= 2
        })
        .map(str::to_string)
        .collect();
    std::fs::write(part.join("metrics.jsonl"), cut.join("\n") + "\n").unwrap();
    let mut a2 = a.clone();
    a2.push("--resume".into());
    a2.push(part.join("checkpoint-2").to_string_lossy().into_owned());
    let refs: Vec<&str> = a2.iter().map(String::as_str).collect();
    train_ok(dir.path(), &refs);
    let again: Vec<f64> = metrics(&part)
        .iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    let want: Vec<f64> = steps.iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    assert_eq!(again, want);
}

#[test]
fn bad_rows_and_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let m = m.to_str().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n\
         {\"prompt\": \"a\", \"chosen\": [{\"role\": \"assistant\", \"content\": \"b\"}], \"rejected\": \"c\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = train(
        dir.path(),
        &args(m, bad.to_str().unwrap(), out.to_str().unwrap()),
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("field `chosen`"),
        "{err}"
    );
    // One `error:`, after the location (not `error: bad.jsonl:2: error: …`).
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("{}:2: error: ", bad.display())),
        "{err}"
    );
    assert!(!out.join("model.safetensors").exists());
    let d = prefs(dir.path());
    for (flag, value) in [
        ("--beta", "0"),
        ("--label-smoothing", "0.5"),
        ("--loss-type", "nope"),
    ] {
        let mut a = args(m, d.to_str().unwrap(), out.to_str().unwrap());
        a.extend([flag, value]);
        let o = train(dir.path(), &a);
        assert_ne!(o.status.code(), Some(0), "{flag} {value}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&flag[2..].replace('-', "_")) || err.contains(flag),
            "{flag}: {err}"
        );
    }
    for flag in [
        &["--packing"][..],
        &["--thinking-pattern"],
        &["--system-prompt", "Be nice."],
        &["--label-mode", "everything"],
    ] {
        let mut a = args(m, d.to_str().unwrap(), out.to_str().unwrap());
        a.extend(flag);
        let o = train(dir.path(), &a);
        assert_eq!(o.status.code(), Some(1), "{flag:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(flag[0]),
            "{flag:?}"
        );
    }
    // A pair longer than --max-length: refused, naming its line; dropped with --truncation drop.
    let long = dir.path().join("long.jsonl");
    let mut text = std::fs::read_to_string(&d).unwrap();
    text.push_str(
        &serde_json::json!({"prompt": "x", "chosen": "y ".repeat(400), "rejected": "z"})
            .to_string(),
    );
    text.push('\n');
    std::fs::write(&long, text).unwrap();
    let mut a = args(m, long.to_str().unwrap(), out.to_str().unwrap());
    a.extend(["--max-length", "128", "--max-steps", "1"]);
    let o = train(dir.path(), &a);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("long.jsonl:13") && err.contains("max_length 128"),
        "{err}"
    );
    a.extend(["--truncation", "drop"]);
    train_ok(dir.path(), &a);
    // Nothing to train on.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let o = train(
        dir.path(),
        &args(m, empty.to_str().unwrap(), out.to_str().unwrap()),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no training pairs"));
    // A reference model of another vocabulary.
    let llama = crate::common::root().join("crates/train-model/tests/fixtures/llama");
    let mut a = args(m, d.to_str().unwrap(), out.to_str().unwrap());
    a.extend(["--ref-model", llama.to_str().unwrap()]);
    let o = train(dir.path(), &a);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("vocabulary"));
}

#[test]
fn two_devices_train_like_one_with_the_doubled_batch() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let d = prefs(dir.path());
    let (m, d) = (m.to_str().unwrap(), d.to_str().unwrap());
    let run = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let out = dir.path().join(name);
        let out_s = out.to_str().unwrap();
        let mut a = vec!["dpo", "--model", m, "--dataset", d, "--output", out_s];
        a.extend(["--learning-rate", "1e-3", "--validation-split", "0"]);
        a.extend(["--max-steps", "2", "--no-shuffle", "--preview-prompts", "0"]);
        a.extend(extra);
        train_ok(dir.path(), &a);
        metrics(&out)
            .into_iter()
            .filter(|r| r["kind"] == "step")
            .collect()
    };
    let one = run("one", &["--batch-size", "2"]);
    let two = run("two", &["--batch-size", "1", "--devices", "2"]);
    assert_eq!(one.len(), 2);
    for (a, b) in one.iter().zip(&two) {
        for key in [
            "loss",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
        ] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1e-2),
                "{key}: {x} vs {y}"
            );
        }
    }
}

/// `--gradient-checkpointing` trains DPO and ORPO exactly as the plain backward pass.
#[test]
fn gradient_checkpointing_gives_the_same_steps() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let d = prefs(dir.path());
    let (m, d) = (m.to_str().unwrap(), d.to_str().unwrap());
    for command in ["dpo", "orpo"] {
        let run = |checkpointing: bool| -> Vec<serde_json::Value> {
            let out = dir.path().join(format!("{command}-{checkpointing}"));
            let out_s = out.to_str().unwrap();
            let mut a = vec![command, "--model", m, "--dataset", d, "--output", out_s];
            a.extend(["--learning-rate", "1e-3", "--validation-split", "0"]);
            a.extend(["--max-steps", "2", "--no-shuffle", "--preview-prompts", "0"]);
            a.extend(["--batch-size", "2"]);
            if checkpointing {
                a.push("--gradient-checkpointing");
            }
            train_ok(dir.path(), &a);
            metrics(&out)
                .into_iter()
                .filter(|r| r["kind"] == "step")
                .collect()
        };
        let (plain, ck) = (run(false), run(true));
        assert_eq!(plain.len(), 2);
        for (a, b) in plain.iter().zip(&ck) {
            println!("{command}: loss {} / {}", a["loss"], b["loss"]);
            for key in ["loss", "grad_norm", "rewards/margins", "logps/chosen"] {
                assert!(a[key].is_number(), "{key}");
                assert_eq!(a[key], b[key], "{command} {key}");
            }
        }
    }
}

/// `train dpo --no-shuffle --max-steps 3` against a plain PyTorch DPO loop (the `loop` of
/// `crates/train-runner/tests/fixtures/dpo.reference.json`, made by `cargo xtask fixtures`):
/// each step's loss and gradient norm within 2e-3 relative.
#[test]
fn matches_a_pytorch_dpo_loop() {
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            crate::common::root().join("crates/train-runner/tests/fixtures/dpo.reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let expect = &reference["loop"];
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = expect["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let out = dir.path().join("out");
    let m = model();
    let mut a = vec![
        "dpo",
        "--model",
        m.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    a.extend([
        "--no-shuffle",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--beta",
        "0.1",
    ]);
    a.extend(["--learning-rate", "1e-3", "--weight-decay", "0.01"]);
    a.extend(["--lr-scheduler", "constant", "--max-grad-norm", "1.0"]);
    a.extend([
        "--validation-split",
        "0",
        "--skip-validation",
        "--preview-prompts",
        "0",
    ]);
    train_ok(dir.path(), &a);
    let steps: Vec<serde_json::Value> = metrics(&out)
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .collect();
    assert_eq!(steps.len(), 3);
    for (i, row) in steps.iter().enumerate() {
        for (field, key) in [("loss", "losses"), ("grad_norm", "grad_norms")] {
            let got = row[field].as_f64().unwrap();
            let want = expect[key][i].as_f64().unwrap();
            let rel = (got - want).abs() / want.abs();
            println!(
                "step {}: {field} {got:.6} vs PyTorch {want:.6} (relative {rel:.2e})",
                i + 1
            );
            assert!(rel <= 2e-3, "step {}: {field} {got} vs {want}", i + 1);
        }
    }
}

/// `--precompute-ref-logps`: the reference's log-probabilities are kept in the cache directory
/// and a second run reads them (the same losses, no reference pass); a damaged or foreign cache
/// file is not used.
#[test]
fn reference_log_probabilities_are_cached() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let d = prefs(dir.path());
    let cache = dir.path().join("cache");
    let (m, d, c) = (
        m.to_str().unwrap(),
        d.to_str().unwrap(),
        cache.to_str().unwrap(),
    );
    let run = |name: &str| -> (String, Vec<serde_json::Value>) {
        let out = dir.path().join(name);
        let mut a = args(m, d, out.to_str().unwrap());
        a.extend([
            "--max-steps",
            "2",
            "--no-shuffle",
            "--precompute-ref-logps",
            "--cache-dir",
            c,
        ]);
        let o = train_ok(dir.path(), &a);
        let mut rows = metrics(&out);
        for r in &mut rows {
            r.as_object_mut().unwrap().remove("tokens_per_sec");
        }
        (String::from_utf8_lossy(&o.stderr).into_owned(), rows)
    };
    let (err, first) = run("a");
    assert!(!err.contains("read from"), "{err}");
    let files: Vec<PathBuf> = std::fs::read_dir(cache.join("reference-logps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let (err, second) = run("b");
    assert!(err.contains("read from"), "{err}");
    assert_eq!(first, second);
    // A file that does not fit these pairs is not used.
    std::fs::write(&files[0], "[[1, 2]]").unwrap();
    let (err, third) = run("c");
    assert!(err.contains("not a reference cache"), "{err}");
    assert_eq!(first, third);
    std::fs::write(&files[0], "garbage").unwrap();
    let (_, fourth) = run("d");
    assert_eq!(first, fourth);
}

/// SimPO needs no reference (no reference pass is announced) and trains; a checkpoint of
/// another objective is not resumed by `train dpo`.
#[test]
fn simpo_and_objectives_are_not_mixed_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let d = prefs(dir.path());
    let (m, d) = (m.to_str().unwrap(), d.to_str().unwrap());
    let out = dir.path().join("simpo");
    let mut a = args(m, d, out.to_str().unwrap());
    a.extend([
        "--loss-type",
        "simpo",
        "--simpo-gamma",
        "0.3",
        "--max-steps",
        "2",
    ]);
    let o = train_ok(dir.path(), &a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("reference log-probabilities"), "{err}");
    let rows = metrics(&out);
    let first = rows.iter().find(|r| r["kind"] == "step").unwrap();
    // β·avg log p < 0 on both sides: the rewards are negative from the first step.
    assert!(first["rewards/chosen"].as_f64().unwrap() < 0.0, "{first}");
    // SimPO's reward is β (0.1) times the per-token average log-probability, which it logs.
    let (logp, reward) = (
        first["logps/chosen"].as_f64().unwrap(),
        first["rewards/chosen"].as_f64().unwrap(),
    );
    assert!((logp - reward / 0.1).abs() <= 1e-6 * logp.abs(), "{first}");
    // An SFT checkpoint, resumed by `train dpo`: refused, naming both objectives.
    let sft = dir.path().join("sft");
    let data = crate::common::data(dir.path(), 8);
    train_ok(
        dir.path(),
        &[
            "--model",
            m,
            "--dataset",
            data.to_str().unwrap(),
            "--output",
            sft.to_str().unwrap(),
            "--max-steps",
            "1",
            "--preview-prompts",
            "0",
        ],
    );
    let ckpt = sft.join("checkpoint-1");
    let mut a = args(m, d, sft.to_str().unwrap());
    a.extend(["--resume", ckpt.to_str().unwrap()]);
    let o = train(dir.path(), &a);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`sft` run, not `dpo`"), "{err}");
}

#[test]
fn eval_dataset_pairs_are_the_evaluation_and_every_pair_of_the_data_is_trained() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let d = prefs(dir.path());
    let eval = dir.path().join("eval.jsonl");
    let text = std::fs::read_to_string(&d).unwrap();
    std::fs::write(&eval, text.lines().take(3).collect::<Vec<_>>().join("\n")).unwrap();
    let out = dir.path().join("out");
    let (m, d) = (m.to_str().unwrap(), d.to_str().unwrap());
    let mut a = args(m, d, out.to_str().unwrap());
    // --validation-split is not used with --eval-dataset: 12 pairs trained, 6 steps of 2.
    a.extend([
        "--eval-dataset",
        eval.to_str().unwrap(),
        "--eval-steps",
        "3",
        "--epochs",
        "1",
    ]);
    let o = train_ok(dir.path(), &a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("step 6/6 ") && err.contains(" over 3 pairs"),
        "{err}"
    );
    let rows = metrics(&out);
    let evals: Vec<u64> = rows
        .iter()
        .filter(|r| r["kind"] == "eval")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [3, 6]);
    // `train grpo` does not evaluate: the flag is refused, not ignored.
    let o = train(
        dir.path(),
        &[
            "grpo",
            "--model",
            m,
            "--dataset",
            d,
            "--eval-dataset",
            eval.to_str().unwrap(),
            "--reward",
            "r.toml",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() != Some(0) && err.contains("--eval-dataset"),
        "{err}"
    );
}

/// `train orpo`: no reference pass; every step's loss is the chosen conversations' NLL minus β
/// times the mean `log σ(log odds)` (TRL's `ORPOTrainer` metrics, logged with the loss);
/// training lowers the NLL; a DPO output is not resumed by ORPO; reference flags are refused.
#[test]
fn orpo_trains_without_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let d = prefs(dir.path());
    let (m, d) = (m.to_str().unwrap(), d.to_str().unwrap());
    let out = dir.path().join("orpo");
    let mut a = args(m, d, out.to_str().unwrap());
    a[0] = "orpo";
    a.extend([
        "--max-steps",
        "6",
        "--eval-steps",
        "3",
        "--save-steps",
        "3",
        "--beta",
        "0.2",
        "--json",
    ]);
    let o = train_ok(dir.path(), &a);
    assert_eq!(last_json(&o)["status"], "completed");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("reference log-probabilities"), "{err}");
    let rows = metrics(&out);
    let steps: Vec<&serde_json::Value> = rows.iter().filter(|r| r["kind"] == "step").collect();
    assert_eq!(steps.len(), 6);
    for r in &steps {
        let at = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
        let want = at("nll_loss") - 0.2 * at("log_odds_ratio");
        assert!(
            (at("loss") - want).abs() <= 1e-5 * want.abs(),
            "loss {} vs nll_loss − β log_odds_ratio {want}",
            at("loss")
        );
        assert!(at("log_odds_ratio") < 0.0 && at("logps/chosen") < 0.0);
        // ORPO's rewards are β times the per-token average log-probabilities.
        assert!((at("rewards/chosen") - 0.2 * at("logps/chosen")).abs() < 1e-6);
        assert!(r["log_odds_chosen"].is_f64());
    }
    let first = steps[0]["nll_loss"].as_f64().unwrap();
    let last = steps[5]["nll_loss"].as_f64().unwrap();
    assert!(last < first, "the NLL did not fall: {first} -> {last}");
    let evals: Vec<&serde_json::Value> = rows.iter().filter(|r| r["kind"] == "eval").collect();
    assert!(!evals.is_empty() && evals.iter().all(|r| r["eval_nll_loss"].is_f64()));
    assert!(out.join("model.safetensors").exists());

    // A DPO run's checkpoint is not resumed by ORPO (nor the other way round).
    let dpo_out = dir.path().join("dpo");
    let mut a = args(m, d, dpo_out.to_str().unwrap());
    a.extend(["--max-steps", "2", "--save-steps", "2"]);
    train_ok(dir.path(), &a);
    let checkpoint = dpo_out.join("checkpoint-2");
    let mut a = args(m, d, dpo_out.to_str().unwrap());
    a[0] = "orpo";
    a.extend(["--max-steps", "4", "--resume", checkpoint.to_str().unwrap()]);
    let o = train(dir.path(), &a);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("dpo") && err.contains("orpo"), "{err}");
    assert!(checkpoint.join("model.safetensors").exists() || checkpoint.is_dir());

    // No reference model to name, and no DPO loss to pick.
    for extra in [
        &["--ref-model", m][..],
        &["--loss-type", "sigmoid"],
        &["--precompute-ref-logps"],
        &["--beta=-1"],
    ] {
        let mut a = args(m, d, out.to_str().unwrap());
        a[0] = "orpo";
        a.extend(extra);
        let o = train(dir.path(), &a);
        assert_ne!(o.status.code(), Some(0), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(extra[0]) || err.contains("beta"),
            "{extra:?}: {err}"
        );
    }
}
