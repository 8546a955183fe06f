//! The `train` binary as scripts use it: exit codes, `--json` on the last line, `--config`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn train(args: &[&str], registry: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .env("TRAIN_MODEL_REGISTRY", registry)
        .output()
        .unwrap()
}

/// Asserts that the command exited 0, showing its stderr when it did not.
fn succeeded(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train-model/tests/fixtures/qwen2")
}

fn data(dir: &Path) -> PathBuf {
    let p = dir.join("d.jsonl");
    let rows: String = (0..20)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"Q{i}\"}}, {{\"role\": \"assistant\", \"content\": \"Answer {i}\"}}]}}\n"))
        .collect();
    std::fs::write(&p, rows).unwrap();
    p
}

#[test]
fn data_check_exit_codes_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("models.json");
    let good = data(dir.path());
    let out = train(&["data", "check", good.to_str().unwrap(), "--json"], &reg);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(last_json(&out)["valid_rows"], 20);

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n").unwrap();
    let out = train(&["data", "check", bad.to_str().unwrap()], &reg);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("bad.jsonl:2") && text.contains("messages[0].role") && text.contains("robot"),
        "{text}"
    );
}

#[test]
fn data_stats_and_prepare() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("models.json");
    let d = data(dir.path());
    let m = model();
    let out = train(
        &[
            "data",
            "stats",
            "--model",
            m.to_str().unwrap(),
            "--dataset",
            d.to_str().unwrap(),
            "--json",
        ],
        &reg,
    );
    succeeded(&out);
    let s = last_json(&out);
    assert_eq!(s["examples"], 20);
    assert_eq!(s["train_examples"], 18);
    assert!(s["packing_efficiency"].as_f64().unwrap() > 0.0);

    let prepared = dir.path().join("prepared");
    let out = train(
        &[
            "data",
            "prepare",
            "--model",
            m.to_str().unwrap(),
            "--dataset",
            d.to_str().unwrap(),
            "--output",
            prepared.to_str().unwrap(),
        ],
        &reg,
    );
    succeeded(&out);
    let back = train_data::read_prepared(&prepared).unwrap();
    assert_eq!(back.train.len(), 18);

    // A model that does not exist: exit 1 with a clear message.
    let out = train(
        &[
            "data",
            "stats",
            "--model",
            "no-such-model",
            "--dataset",
            d.to_str().unwrap(),
        ],
        &reg,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-model"));
}

/// `--seed` seeds the data's split unless `--data-seed` is given (Hugging Face's `data_seed`
/// defaults to `seed` the same way).
#[test]
fn data_seed_defaults_to_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("models.json");
    let d = data(dir.path());
    let m = model();
    let split = |name: &str, seeds: &[&str]| -> Vec<usize> {
        let out_dir = dir.path().join(name);
        let mut args = vec![
            "data",
            "prepare",
            "--model",
            m.to_str().unwrap(),
            "--dataset",
            d.to_str().unwrap(),
            "--output",
            out_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(seeds);
        let out = train(&args, &reg);
        succeeded(&out);
        let back = train_data::read_prepared(&out_dir).unwrap();
        back.validation.iter().map(|e| e.row).collect()
    };
    let seven = split("a", &["--seed", "7"]);
    assert_eq!(split("b", &["--seed", "1", "--data-seed", "7"]), seven);
    assert_ne!(split("c", &["--seed", "1"]), seven);
}

#[test]
fn config_file_supplies_flags_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("models.json");
    let d = data(dir.path());
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"{}\"\ndataset = \"{}\"\nvalidation_split = 5\nmax_length = 8\n",
            model().display(),
            d.display()
        ),
    )
    .unwrap();
    let out = train(
        &[
            "data",
            "stats",
            "--config",
            cfg.to_str().unwrap(),
            "--max-length",
            "64",
            "--json",
        ],
        &reg,
    );
    succeeded(&out);
    let s = last_json(&out);
    assert_eq!(s["validation_examples"], 5);
    assert_eq!(s["max_length"], 64);
}

/// A config file's `[data]` and `[trainer]` sections are the library configurations (their
/// documented keys); flags in the file win over them, the command line over both; unknown keys
/// are refused naming the key.
#[test]
fn config_sections_take_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("models.json");
    let d = data(dir.path());
    let out_dir = dir.path().join("out");
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"{}\"\noutput_dir = \"{}\"\nskip_validation = true\n\
             [data]\ndataset_path = \"{}\"\nvalidation_split = 4\nmax_length = 64\npacking = true\n\
             [trainer]\nnum_epochs = 50\nmax_steps = 3\nbatch_size = 2\nlearning_rate = 1e-3\n",
            model().display(),
            out_dir.display(),
            d.display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let stats = train(&["data", "stats", "--config", c, "--json"], &reg);
    succeeded(&stats);
    let s = last_json(&stats);
    assert_eq!(s["validation_examples"], 4);
    assert_eq!(s["max_length"], 64);
    let run = train(&["--config", c, "--max-steps", "2", "--json"], &reg);
    succeeded(&run);
    assert_eq!(last_json(&run)["global_step"], 2, "the command line wins");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("checkpoint-2/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["config"]["batch_size"], 2);
    assert_eq!(state["config"]["learning_rate"], 1e-3);
    assert_eq!(state["config"]["num_epochs"], 50);
    assert_eq!(state["packed_to"], 64, "[data] packing reached the loop");

    std::fs::write(&cfg, "[trainer]\nnum_epoch = 2\n").unwrap();
    let bad = train(&["data", "stats", "--config", c], &reg);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("num_epoch") && err.contains("run.toml"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2_and_models_registry_works() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("models.json");
    assert_eq!(train(&["data", "frobnicate"], &reg).status.code(), Some(2));
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../train-model/tests/fixtures");
    let out = train(
        &["models", "scan", fixtures.to_str().unwrap(), "--json"],
        &reg,
    );
    succeeded(&out);
    // Ten text models, a Qwen3-VL model and eight LoRA adapters listed with their base model.
    let found = last_json(&out)["found"].as_array().unwrap().clone();
    assert_eq!(found.len(), 19, "{found:?}");
    let entry = |name: &str| found.iter().find(|e| e["name"] == name).unwrap().clone();
    assert_eq!(entry("qwen3-lora")["kind"], "adapter");
    assert_eq!(entry("qwen3-lora")["base_model"], "../qwen3");
    assert_eq!(entry("llama-lora")["base_model"], "../llama");
    assert_eq!(entry("olmo2")["model_type"], "olmo2");
    assert_eq!(entry("gemma3")["model_type"], "gemma3_text");
    assert_eq!(entry("smollm3-lora")["base_model"], "../smollm3");
    assert_eq!(entry("qwen3_vl")["model_type"], "qwen3_vl");
    assert_eq!(entry("phi3")["model_type"], "phi3");
    assert_eq!(entry("phi3-lora")["base_model"], "../phi3");
    assert_eq!(entry("qwen3_moe")["model_type"], "qwen3_moe");
    let out = train(&["models", "show", "qwen2", "--json"], &reg);
    assert_eq!(last_json(&out)["hidden_size"], 64);
    // A registered name works wherever a model directory is expected.
    let d = data(dir.path());
    let out = train(
        &[
            "data",
            "stats",
            "--model",
            "qwen2",
            "--dataset",
            d.to_str().unwrap(),
            "--json",
        ],
        &reg,
    );
    succeeded(&out);
    assert_eq!(
        train(&["models", "show", "nope"], &reg).status.code(),
        Some(1)
    );
}
