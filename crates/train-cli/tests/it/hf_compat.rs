//! What a Hugging Face (Trainer, TRL, axolotl) user brings: `TrainingArguments` names on the
//! command line and in TOML or YAML config files, `--eval-dataset`, `--warmup-ratio`,
//! `--logging-steps`, `--eval-strategy` / `--save-strategy`, and a clear message for an axolotl
//! config.
#![cfg(feature = "cpu")]

use std::path::Path;

use crate::common::{base, data, model, train, train_ok};

fn rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn steps_of(rows: &[serde_json::Value], kind: &str) -> Vec<u64> {
    rows.iter()
        .filter(|r| r["kind"] == kind)
        .map(|r| r["step"].as_u64().unwrap())
        .collect()
}

/// The first `n` shipped conversations after the first `skip`, as `dir/name`.
fn slice(dir: &Path, name: &str, skip: usize, n: usize) -> std::path::PathBuf {
    let all = std::fs::read_to_string(
        crate::common::root().join("crates/train-data/tests/fixtures/sample.jsonl"),
    )
    .unwrap();
    let p = dir.join(name);
    std::fs::write(
        &p,
        all.lines()
            .skip(skip)
            .take(n)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    p
}

#[test]
fn a_yaml_config_with_training_arguments_names_runs_by_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let train_file = slice(dir.path(), "train.jsonl", 0, 16);
    let eval_file = slice(dir.path(), "eval.jsonl", 16, 5);
    let out = dir.path().join("out");
    let m = model();
    let yaml = format!(
        "# TrainingArguments / SFTConfig names\n\
         model_name_or_path: {}\n\
         dataset_path: {}\n\
         eval_dataset: {}\n\
         output_dir: {}\n\
         num_train_epochs: 2\n\
         per_device_train_batch_size: 4\n\
         gradient_accumulation_steps: 1\n\
         lr_scheduler_type: cosine\n\
         warmup_ratio: 0.25\n\
         logging_steps: 3\n\
         eval_strategy: epoch\n\
         save_strategy: epoch\n\
         max_seq_length: 256\n\
         learning_rate: 1.0e-3\n\
         report_to: null\n\
         preview_prompts: 0\n",
        m.display(),
        train_file.display(),
        eval_file.display(),
        out.display()
    );
    let cfg = dir.path().join("run.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    train_ok(dir.path(), &["run", "--config", cfg.to_str().unwrap()]);
    let rows = rows(&out);
    // 16 rows / 4 = 4 steps an epoch, 8 in all: a row every 3 steps and after the last.
    assert_eq!(steps_of(&rows, "step"), [3, 6, 8]);
    // Evaluated and saved at the end of each epoch, on the 5 rows of the evaluation file.
    assert_eq!(steps_of(&rows, "eval"), [4, 8]);
    assert!(out.join("checkpoint-4").is_dir() && out.join("checkpoint-8").is_dir());
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("checkpoint-8/trainer_state.json")).unwrap(),
    )
    .unwrap();
    let c = &state["config"];
    assert_eq!(
        (
            c["num_epochs"].as_u64(),
            c["batch_size"].as_u64(),
            c["lr_scheduler"].as_str(),
            c["warmup_ratio"].as_f64()
        ),
        (Some(2), Some(4), Some("cosine"), Some(0.25))
    );
    // Warm-up over ceil(0.25 × 8) = 2 steps: the first step's rate is 0, the third's the peak's
    // cosine decay; the logged row of steps 1-3 carries the third's.
    let lr = rows[0]["learning_rate"].as_f64().unwrap();
    let expected = 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * (2.0 - 2.0) / 6.0).cos());
    assert!((lr - expected).abs() < 1e-12, "{lr} vs {expected}");
    // A row's loss is the mean of its steps' (the trainer state keeps every step).
    let history = state["log_history"].as_array().unwrap();
    let losses: Vec<f64> = history
        .iter()
        .filter(|h| h.get("loss").is_some() && h["step"].as_u64().unwrap() <= 3)
        .map(|h| h["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 3, "{history:?}");
    let mean = losses.iter().sum::<f64>() / 3.0;
    assert!((rows[0]["loss"].as_f64().unwrap() - mean).abs() < 1e-12);
    let eval = rows.iter().find(|r| r["kind"] == "eval").unwrap();
    assert!(eval["eval_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn command_line_aliases_and_no_strategies() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path(), 12);
    let out = dir.path().join("out");
    let m = model();
    let mut args = vec![
        "run",
        "--model-name-or-path",
        m.to_str().unwrap(),
        "--dataset",
        d.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--num-train-epochs",
        "1",
        "--per-device-train-batch-size",
        "4",
        "--gradient-accumulation-steps",
        "1",
        "--max-seq-length",
        "256",
        "--lr-scheduler-type",
        "constant",
        "--eval-strategy",
        "no",
        "--save-strategy",
        "no",
        "--preview-prompts",
        "0",
        "--json",
    ];
    let o = train_ok(dir.path(), &args);
    let rows = rows(&out);
    assert!(steps_of(&rows, "eval").is_empty(), "{rows:?}");
    assert!(
        !std::fs::read_dir(&out).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("checkpoint-")),
        "no checkpoint with --save-strategy no"
    );
    assert!(out.join("model.safetensors").is_file());
    assert_eq!(crate::common::last_json(&o)["status"], "completed");
    // --bf16 is --precision bf16, and cannot be given with it.
    args.extend(["--bf16", "--precision", "fp32"]);
    let o = train(dir.path(), &args);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--bf16") && err.contains("--precision"),
        "{err}"
    );
}

#[test]
fn config_files_name_every_unknown_key_once_and_recognise_axolotl() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("axolotl.yml");
    std::fs::write(
        &cfg,
        "base_model: Qwen/Qwen3-0.6B\nsequence_len: 512\nmicro_batch_size: 2\nadapter: lora\n\
         lora_r: 8\nlora_target_modules: [q_proj, v_proj]\ndatasets:\n  - path: d.jsonl\n    \
         type: chat_template\nwandb_project: x\n",
    )
    .unwrap();
    let o = train(dir.path(), &["run", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("axolotl")
            && err.contains("`datasets`, `wandb_project`")
            && !err.contains("`sequence_len`")
            && !err.contains("`adapter`"),
        "{err}"
    );
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, "num_train_epochs = 1\nfoo = 1\nbar = 2\n").unwrap();
    let o = train(dir.path(), &["run", "--config", toml.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unknown keys `bar`, `foo`") && err.matches("error:").count() == 1,
        "{err}"
    );
    // Broken YAML, a list where a mapping belongs, and a YAML bomb are refused, naming the file.
    for (name, text) in [
        ("broken.yaml", "a: [1, 2\nb: {"),
        ("list.yaml", "- 1\n- 2\n"),
        (
            "bomb.yaml",
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
             c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
             e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n\
             g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n",
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let o = train(dir.path(), &["run", "--config", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            matches!(o.status.code(), Some(1 | 2)) && err.contains(name),
            "{name}: {err}"
        );
    }
}

#[test]
fn eval_dataset_replaces_the_split_and_warmup_ratio_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path(), 8);
    let eval = slice(dir.path(), "eval.jsonl", 8, 3);
    let out = dir.path().join("out");
    let m = model();
    let mut args = base(&m, &d, &out);
    args.extend([
        "--eval-dataset",
        eval.to_str().unwrap(),
        "--max-steps",
        "2",
        "--preview-prompts",
        "0",
        "--json",
    ]);
    let o = train_ok(dir.path(), &args);
    let s = crate::common::last_json(&o);
    assert_eq!(s["status"], "completed");
    let stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read_dir(out.join(".cache/data"))
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path().join("stats.json")).unwrap())
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            stats["train_examples"].as_u64(),
            stats["validation_examples"].as_u64()
        ),
        (Some(8), Some(3))
    );
    // An evaluation file that is not there is named.
    let mut bad = base(&m, &d, &out);
    bad.extend(["--eval-dataset", "missing.jsonl", "--yes"]);
    let o = train(dir.path(), &bad);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() != Some(0) && err.contains("missing.jsonl"),
        "{err}"
    );
    let mut bad = base(&m, &d, &out);
    bad.extend(["--warmup-ratio", "1.5", "--yes"]);
    let o = train(dir.path(), &bad);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() != Some(0) && err.contains("warmup_ratio"),
        "{err}"
    );
}

#[test]
fn text_rows_are_packed_by_default_and_prompt_completion_rows_train_their_completion() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let text = dir.path().join("text.jsonl");
    let rows: String = (0..24)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"text": format!("Document {i}: the quick brown fox jumps over the lazy dog {i} times.")})
            )
        })
        .collect();
    std::fs::write(&text, rows).unwrap();
    let out = dir.path().join("lm");
    let mut args = base(&m, &text, &out);
    args.extend(["--max-steps", "2", "--preview-prompts", "0", "--json"]);
    let o = train_ok(dir.path(), &args);
    let err = String::from_utf8_lossy(&o.stderr);
    // 24 short documents packed into rows of 256 tokens: a few rows, not 22 (24 less a 10 % validation split).
    let rows_line = err.lines().find(|l| l.starts_with("training ")).unwrap();
    // The start line says what is trained, where, in which precision, and how many parameters.
    assert!(
        rows_line.starts_with("training qwen2, backend cpu, device Cpu, f32; ")
            && rows_line.contains(" parameters (all trainable); 2 steps"),
        "{rows_line}"
    );
    let trained: usize = rows_line
        .split(" on ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{rows_line}"));
    assert!(trained < 10, "{rows_line}");
    // --no-packing keeps one document a row.
    let out2 = dir.path().join("lm2");
    let mut args = base(&m, &text, &out2);
    args.extend(["--max-steps", "1", "--preview-prompts", "0", "--no-packing"]);
    let o = train_ok(dir.path(), &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(" on 22 rows"), "{err}");

    let pc = dir.path().join("pc.jsonl");
    let mut rows = String::new();
    for i in 0..12 {
        rows.push_str(
            &serde_json::json!({"prompt": format!("What is {i} + {i}?"), "completion": format!(" {}", 2 * i)})
                .to_string(),
        );
        rows.push('\n');
        rows.push_str(
            &serde_json::json!({
                "prompt": [{"role": "user", "content": format!("Say {i}.")}],
                "completion": [{"role": "assistant", "content": format!("{i}.")}],
            })
            .to_string(),
        );
        rows.push('\n');
    }
    std::fs::write(&pc, rows).unwrap();
    let out3 = dir.path().join("pc");
    let mut args = base(&m, &pc, &out3);
    args.extend(["--max-steps", "2", "--preview-prompts", "0", "--json"]);
    let o = train_ok(dir.path(), &args);
    assert_eq!(crate::common::last_json(&o)["status"], "completed");
    let o = train(dir.path(), &["data", "check", pc.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn export_writes_gguf_files_and_refuses_what_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = crate::common::root().join("crates/train-model/tests/fixtures");
    for (outtype, name) in [("f16", "f16.gguf"), ("q8_0", "q8.gguf")] {
        let file = dir.path().join(name);
        let o = train_ok(
            dir.path(),
            &[
                "export",
                fixtures.join("qwen3").to_str().unwrap(),
                "--format",
                "gguf",
                "--outtype",
                outtype,
                "--output",
                file.to_str().unwrap(),
                "--json",
            ],
        );
        let v = crate::common::last_json(&o);
        assert_eq!(v["architecture"], "qwen3");
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(v["bytes"].as_u64(), Some(bytes.len() as u64));
    }
    // q8_0 is smaller than f16.
    let size = |n: &str| std::fs::metadata(dir.path().join(n)).unwrap().len();
    assert!(size("q8.gguf") < size("f16.gguf"));
    // Mistral is written as llama.cpp's `llama`, which has no sliding window: said on stderr
    // and in the JSON.
    let file = dir.path().join("mistral.gguf");
    let o = train_ok(
        dir.path(),
        &[
            "export",
            fixtures.join("mistral").to_str().unwrap(),
            "--format",
            "gguf",
            "--output",
            file.to_str().unwrap(),
            "--json",
        ],
    );
    let v = crate::common::last_json(&o);
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["notes"].as_array().map(Vec::len), Some(1), "{v}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("note: llama.cpp runs Mistral") && err.contains("beyond 8 tokens"),
        "{err}"
    );
    for (model, output, expected) in [
        (
            fixtures.join("ministral"),
            dir.path().join("g.gguf"),
            "GGUF export",
        ),
        (
            fixtures.join("phi3"),
            dir.path().join("g.gguf"),
            "fused projections",
        ),
        // A variant llama.cpp would run differently: refused, saying why.
        (
            fixtures.join("gemma3"),
            dir.path().join("g.gguf"),
            "query_pre_attn_scalar",
        ),
        (
            fixtures.join("qwen3-lora"),
            dir.path().join("a.gguf"),
            "train merge",
        ),
        (
            fixtures.join("qwen3"),
            dir.path().to_path_buf(),
            "a directory",
        ),
        // The model's own weights file: never replaced.
        (
            fixtures.join("qwen3"),
            fixtures.join("qwen3/model.safetensors"),
            "inside the model directory",
        ),
    ] {
        let o = train(
            dir.path(),
            &[
                "export",
                model.to_str().unwrap(),
                "--format",
                "gguf",
                "--output",
                output.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(expected), "{err}");
    }
    assert!(!dir.path().join("g.gguf").exists() && !dir.path().join("a.gguf").exists());
}
