//! `train` (fine-tuning) as scripts drive it: exit codes 0 / 1 / 3 / 130, the `--json` summary,
//! resume, the lock, `--config`, and nothing already written lost on bad input.
#![cfg(feature = "cpu")]

use std::process::{Command, Output};

use crate::common::{base, data, model, root, spawn_until, train, train_ok, wait_for};

fn summary(out: &Output) -> serde_json::Value {
    crate::common::last_json(out)
}

#[test]
fn trains_resumes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--eval-steps",
        "2",
        "--json",
    ]);
    let o = train_ok(dir.path(), &args);
    let s = summary(&o);
    assert_eq!(s["status"], "completed");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("status/training_status.json")).unwrap())
            .unwrap();
    assert_eq!(
        (status["status"].as_str(), status["step"].as_u64()),
        (Some("completed"), Some(4))
    );
    assert!(status["eval_loss"].as_f64().is_some() && status["schema_version"] == 1);
    assert!(
        std::fs::read_to_string(out.join("report.html"))
            .unwrap()
            .contains("<svg")
    );
    assert!(out.join("plots/loss.svg").exists());
    assert_eq!(s["global_step"], 4);
    assert!(s["train_loss"].as_f64().unwrap() > 0.0 && s["eval_loss"].as_f64().is_some());
    assert!(
        out.join("checkpoint-2/optimizer.safetensors").exists()
            && out.join("checkpoint-4/trainer_state.json").exists()
    );
    assert!(out.join("model.safetensors").exists() && out.join("tokenizer.json").exists());
    let rows = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "epoch",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens",
        "tokens_per_sec",
    ] {
        assert!(first.get(key).is_some(), "metrics row lacks {key}: {first}");
    }
    assert!(rows.lines().any(|l| l.contains("eval_loss")));

    // The same output again without --resume or --yes: refused, nothing touched.
    let before = std::fs::read(out.join("checkpoint-4/model.safetensors")).unwrap();
    let o = train(dir.path(), &args);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    assert_eq!(
        std::fs::read(out.join("checkpoint-4/model.safetensors")).unwrap(),
        before
    );

    // --resume with more steps continues from checkpoint-4; metrics are appended.
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "6",
        "--save-steps",
        "2",
        "--eval-steps",
        "2",
        "--resume",
        "--json",
    ]);
    let o = train_ok(dir.path(), &args);
    assert_eq!(summary(&o)["global_step"], 6);
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);

    // `train eval` on the result.
    let o = train_ok(
        dir.path(),
        &[
            "eval",
            "--model",
            out.to_str().unwrap(),
            "--dataset",
            d.to_str().unwrap(),
            "--json",
        ],
    );
    let e = summary(&o);
    assert_eq!(e["examples"], 24);
    assert!(e["loss"].as_f64().unwrap() > 0.0 && e["tokens"].as_u64().unwrap() > 0);
}

#[test]
fn bad_configuration_and_bad_data_exit_1_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 8), dir.path().join("out"));
    // Something a previous run left behind must survive failed runs.
    std::fs::create_dir_all(out.join("checkpoint-7")).unwrap();
    std::fs::write(out.join("checkpoint-7/trainer_state.json"), "{}").unwrap();
    let mut args = base(&m, &d, &out);
    args.push("--weight-decay=-1");
    let o = train(dir.path(), &args);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("weight_decay"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}\n{{\"messages\": [{{\"role\": \"user\"}}]}}\n",
            std::fs::read_to_string(&d).unwrap().lines().next().unwrap()
        ),
    )
    .unwrap();
    let o = train(dir.path(), &base(&m, &bad, &out));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.jsonl:2"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("checkpoint-7/trainer_state.json")).unwrap(),
        "{}"
    );

    // A bad alerts file names itself and its field.
    let alerts = dir.path().join("alerts.toml");
    std::fs::write(&alerts, "max_eval_gap = 0.1\nmax_gap = 3\n").unwrap();
    let mut args = base(&m, &d, &out);
    args.extend(["--alerts", alerts.to_str().unwrap()]);
    let o = train(dir.path(), &args);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("alerts.toml") && err.contains("max_gap"),
        "{err}"
    );

    // A router's loss weight for a dense model, or a negative one: refused, nothing lost.
    for flag in ["--router-aux-loss-coef=0.1", "--router-aux-loss-coef=-1"] {
        let mut args = base(&m, &d, &out);
        args.push(flag);
        let o = train(dir.path(), &args);
        assert_eq!(o.status.code(), Some(1), "{flag}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("router_aux_loss_coef"), "{flag}: {err}");
        assert_eq!(
            std::fs::read_to_string(out.join("checkpoint-7/trainer_state.json")).unwrap(),
            "{}"
        );
    }

    // Usage errors are 2.
    assert_eq!(train(dir.path(), &["--epochs", "x"]).status.code(), Some(2));
}

/// A mixture of experts trains with its router's load-balancing loss as TRL's trainers add it:
/// the config's coefficient by default (its `output_router_logits` is false), the flag's when
/// given, none with 0. The first step's logged loss orders them.
#[test]
fn a_mixture_of_experts_adds_its_routers_loss() {
    let dir = tempfile::tempdir().unwrap();
    let m = root().join("crates/train-model/tests/fixtures/qwen3_moe");
    let d = data(dir.path(), 8);
    let first_loss = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = base(&m, &d, &out);
        args.extend(["--max-steps", "1", "--skip-validation"]);
        args.extend(extra);
        train_ok(dir.path(), &args);
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let row: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        (row["loss"].as_f64().unwrap(), row["aux_loss"].as_f64())
    };
    let (off, no_term) = first_loss("off", &["--router-aux-loss-coef", "0"]);
    let (default, term) = first_loss("default", &[]);
    let (large, same_term) = first_loss("large", &["--router-aux-loss-coef", "0.5"]);
    println!(
        "first-step loss: {off} without the router's loss, {default} with 0.001, {large} with \
         0.5; aux_loss {term:?} / {same_term:?}"
    );
    // The term is about 2 (8 experts, 2 a token), logged as `aux_loss` (the same before the
    // first update whatever its weight), and its weight times it joins the loss.
    let term = term.unwrap();
    assert!(no_term.is_none() && (same_term.unwrap() - term).abs() < 1e-6);
    assert!((1.5..3.0).contains(&term), "{term}");
    assert!(
        (default - off - 0.001 * term).abs() < 1e-4,
        "{off} / {default}"
    );
    assert!(
        (large - off - 0.5 * term).abs() < 1e-3 * large,
        "{off} / {large}"
    );
}

#[test]
fn config_file_drives_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 8), dir.path().join("out"));
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"{}\"\ndataset = \"{}\"\noutput = \"{}\"\nmax_steps = 2\nbatch_size = 4\nskip_validation = true\n",
            m.display(),
            d.display(),
            out.display()
        ),
    )
    .unwrap();
    let o = train_ok(
        dir.path(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--max-steps",
            "1",
            "--json",
        ],
    );
    assert_eq!(
        summary(&o)["global_step"],
        1,
        "the command line wins over the file"
    );
}

/// `[trainer] gradient_checkpointing` in a config file: `true` trains as the flag does (the
/// same first loss), a value of another type is refused naming the key, before the output
/// directory is made.
#[test]
fn gradient_checkpointing_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (model(), data(dir.path(), 8));
    let first_loss = |out: &std::path::Path| -> f64 {
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let row: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        row["loss"].as_f64().unwrap()
    };
    let cfg = dir.path().join("run.toml");
    let write = |value: &str| {
        std::fs::write(
            &cfg,
            format!("[trainer]\ngradient_checkpointing = {value}\nmax_steps = 1\nskip_validation = true\n"),
        )
        .unwrap();
    };
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = base(&m, &d, &out);
        args.extend(extra);
        (train(dir.path(), &args), out)
    };
    write("\"yes\"");
    let (o, out) = run("refused", &["--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("trainer.gradient_checkpointing") && err.contains("boolean"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
    write("true");
    let (o, from_file) = run("file", &["--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, from_flag) = run(
        "flag",
        &[
            "--gradient-checkpointing",
            "--max-steps",
            "1",
            "--skip-validation",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(first_loss(&from_file), first_loss(&from_flag));
}

#[test]
fn nan_loss_exits_3_and_keeps_earlier_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let nan = dir.path().join("nan-model");
    std::fs::create_dir_all(&nan).unwrap();
    for e in std::fs::read_dir(model()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), nan.join(e.file_name())).unwrap();
    }
    let weights = std::fs::read(model().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.shape().to_vec(),
                f32::NAN.to_le_bytes().repeat(v.data().len() / 4),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &nan.join("model.safetensors")).unwrap();
    let (d, out) = (data(dir.path(), 8), dir.path().join("out"));
    let mut args = base(&nan, &d, &out);
    args.extend(["--max-steps", "3", "--json"]);
    let o = train(dir.path(), &args);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(summary(&o)["status"], "crashed");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("status/training_status.json")).unwrap())
            .unwrap();
    assert_eq!(status["status"], "crashed");
    assert!(
        status["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    assert!(
        train_runner::list_checkpoints(&out).is_empty(),
        "nothing saved after the NaN"
    );
}

#[test]
fn sigint_finishes_the_step_saves_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 60), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend(["--epochs", "50", "--json"]);
    // Wait for the first step, then interrupt.
    let (child, lines) = spawn_until(dir.path(), &args, "step 1/");
    // A second run into the same directory meanwhile: refused, naming the process.
    let o = train(dir.path(), &base(&m, &d, &out));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&child.id().to_string()), "{err}");

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", rest.join("\n"));
    // The stop says how to go on.
    assert!(
        rest.iter()
            .any(|l| l.starts_with("to go on: run the same command with --resume")),
        "{}",
        rest.join("\n")
    );
    let s = summary(&o);
    assert_eq!(s["status"], "stopped");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("status/training_status.json")).unwrap())
            .unwrap();
    assert_eq!(status["status"], "stopped");
    let step = s["global_step"].as_u64().unwrap();
    assert!(step >= 1);
    assert!(
        out.join(format!("checkpoint-{step}/trainer_state.json"))
            .exists()
    );

    // --resume after the interruption continues from there.
    let next = (step + 1).to_string();
    let mut args = base(&m, &d, &out);
    args.extend(["--max-steps", &next, "--resume", "--json"]);
    let o = train_ok(dir.path(), &args);
    assert_eq!(summary(&o)["global_step"], step + 1);
}

#[test]
fn train_control_pauses_and_stops_a_run_and_train_status_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 60), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend(["--epochs", "50", "--json"]);
    let (child, mut lines) = spawn_until(dir.path(), &args, "step 1/");
    let o = train(dir.path(), &["control", "pause", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    wait_for(&mut lines, "paused after step");
    let o = train(dir.path(), &["status", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("paused"), "{text}");
    let paused_at: serde_json::Value = serde_json::from_slice(
        &train(dir.path(), &["status", out.to_str().unwrap(), "--json"]).stdout,
    )
    .unwrap();
    // Still paused a moment later: no step ran.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let later: serde_json::Value = serde_json::from_slice(
        &train(dir.path(), &["status", out.to_str().unwrap(), "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(
        (later["status"].as_str(), &later["step"]),
        (Some("paused"), &paused_at["step"])
    );
    assert_eq!(
        train(dir.path(), &["control", "stop", out.to_str().unwrap()])
            .status
            .code(),
        Some(0)
    );
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", rest.join("\n"));
    assert_eq!(summary(&o)["status"], "stopped");
    let o = train(dir.path(), &["status", out.to_str().unwrap(), "--watch"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("stopped"));
    // Commands for a directory that does not exist are errors.
    assert_eq!(
        train(dir.path(), &["control", "stop", "/nonexistent/out"])
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn previews_layer_history_and_evolution_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 16), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "10",
        "--preview-prompts",
        "2",
        "--preview-max-new-tokens",
        "8",
    ]);
    // Thresholds from a file: a loss variance limit of 0 fires at once.
    let alerts = dir.path().join("alerts.toml");
    std::fs::write(&alerts, "max_loss_variance = 0.0\n").unwrap();
    args.extend(["--alerts", alerts.to_str().unwrap()]);
    let o = train_ok(dir.path(), &args);
    assert!(String::from_utf8_lossy(&o.stderr).contains("alert: loss variance"));
    let rows = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join(name))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // Previews every max(10, eval_steps / 10) = 10 steps; probes at steps 0 and 10.
    let previews = rows("previews.jsonl");
    assert_eq!(previews.len(), 2);
    assert!(
        previews
            .iter()
            .all(|p| p["step"] == 10 && p["golden"].as_str().is_some_and(|g| !g.is_empty()))
    );
    let evolution = rows("evolution.jsonl");
    assert_eq!(
        evolution
            .iter()
            .map(|p| p["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 0, 10, 10]
    );
    // Layer snapshots at the first step and every 10 steps: 2 layers each.
    let layers = rows("layer_history.jsonl");
    assert_eq!(layers.len(), 4);
    assert!(layers[2]["change"].as_f64().unwrap() != 0.0);
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("status/training_status.json")).unwrap())
            .unwrap();
    assert_eq!(status["previews"].as_array().unwrap().len(), 2);
    assert_eq!(status["alerts"][0]["kind"], "loss_variance");
}

/// `--lora-r` trains adapters and writes a PEFT adapter directory; `train eval` and `train
/// generate` take that directory as a model; `train merge` folds it into a plain model with
/// the same loss; a target that matches nothing is refused with its name.
#[test]
fn lora_trains_an_adapter_that_evaluates_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 16), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "3",
        "--lora-r",
        "4",
        "--lora-alpha",
        "16",
        "--lora-target",
        "q_proj,v_proj,down_proj",
        "--json",
    ]);
    let o = train_ok(dir.path(), &args);
    assert_eq!(summary(&o)["status"], "completed");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("trainable"), "{stderr}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["r"].as_u64(), config["lora_alpha"].as_u64()),
        (Some(4), Some(16))
    );
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert!(!out.join("model.safetensors").exists());
    assert!(out.join("checkpoint-3/adapter_model.safetensors").is_file());

    let eval = |model: &std::path::Path| -> f64 {
        let o = train_ok(
            dir.path(),
            &[
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--dataset",
                d.to_str().unwrap(),
                "--json",
            ],
        );
        crate::common::last_json(&o)["loss"].as_f64().unwrap()
    };
    let merged = dir.path().join("merged");
    let o = train_ok(
        dir.path(),
        &[
            "merge",
            out.to_str().unwrap(),
            "--output",
            merged.to_str().unwrap(),
            "--dtype",
            "fp32",
            "--json",
        ],
    );
    assert_eq!(crate::common::last_json(&o)["dtype"], "float32");
    assert!(merged.join("config.json").is_file() && merged.join("tokenizer.json").is_file());
    let (with_adapter, with_merged, base_loss) = (eval(&out), eval(&merged), eval(&m));
    println!("eval loss: adapter {with_adapter}, merged {with_merged}, base {base_loss}");
    assert!((with_adapter - with_merged).abs() <= 1e-4 * with_adapter);
    assert!(
        (with_adapter - base_loss).abs() > 1e-4,
        "the adapter changed nothing"
    );
    let o = train_ok(
        dir.path(),
        &[
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "4",
        ],
    );
    assert!(!o.stdout.is_empty());

    // Merging something that is not an adapter, and a target that selects nothing.
    let o = crate::common::train(
        dir.path(),
        &[
            "merge",
            m.to_str().unwrap(),
            "--output",
            dir.path().join("x").to_str().unwrap(),
        ],
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a LoRA adapter directory"));
    let out2 = dir.path().join("out2");
    let mut args = base(&m, &d, &out2);
    args.extend([
        "--max-steps",
        "1",
        "--lora-r",
        "4",
        "--lora-target",
        "qproj",
    ]);
    let o = crate::common::train(dir.path(), &args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr.contains("`qproj` selects no module"), "{stderr}");
}

/// A Qwen3-VL checkpoint trains on text-only data: the saved checkpoint is a whole Qwen3-VL
/// checkpoint whose vision tensors are byte-identical to the source's, with a trained text
/// decoder.
#[test]
fn qwen3_vl_trains_its_text_decoder_and_keeps_the_vision_tower() {
    let dir = tempfile::tempdir().unwrap();
    let m = crate::common::root().join("crates/train-model/tests/fixtures/qwen3_vl");
    let (d, out) = (data(dir.path(), 16), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend(["--max-steps", "2", "--skip-validation"]);
    train_ok(dir.path(), &args);
    let read = |dir: &std::path::Path| -> std::collections::HashMap<String, Vec<u8>> {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(n, v)| (n, v.data().to_vec()))
            .collect()
    };
    let (a, b) = (read(&m), read(&out));
    assert_eq!(a.len(), b.len());
    let mut visual = 0;
    let mut changed = 0;
    for (name, bytes) in &a {
        if name.starts_with("model.visual.") {
            assert_eq!(Some(bytes), b.get(name), "{name} changed");
            visual += 1;
        } else if b.get(name) != Some(bytes) {
            changed += 1;
        }
    }
    assert!(
        visual > 10 && changed > 10,
        "{visual} vision tensors, {changed} changed"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen3_vl");
}

/// `--devices 2` (two data-parallel workers on the CPU, burn's collective all-reduce) logs the
/// same steps as one worker with the doubled batch.
#[test]
fn two_devices_train_like_one_with_the_doubled_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (model(), data(dir.path(), 16));
    let run = |name: &str, batch: &str, devices: &str| -> Vec<serde_json::Value> {
        let out = dir.path().join(name);
        let mut args = base(&m, &d, &out);
        args.retain(|a| *a != "4");
        args.retain(|a| *a != "--batch-size");
        args.extend([
            "--batch-size",
            batch,
            "--devices",
            devices,
            "--max-steps",
            "2",
            "--skip-validation",
        ]);
        train_ok(dir.path(), &args);
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let one = run("one", "4", "1");
    let two = run("two", "2", "2");
    assert_eq!(one.len(), 2);
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a["tokens"], b["tokens"]);
        for field in ["loss", "grad_norm"] {
            let (x, y) = (a[field].as_f64().unwrap(), b[field].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * x, "{field}: {x} vs {y}");
        }
    }
}

/// `--gradient-checkpointing` (each layer recomputed in the backward pass) trains exactly as
/// the plain backward pass: the same losses, gradient norms and final weights, on a dense
/// model with two data-parallel workers and on a mixture of experts with its router's loss.
#[test]
fn gradient_checkpointing_trains_exactly_like_the_plain_backward() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path(), 8);
    let moe = root().join("crates/train-model/tests/fixtures/qwen3_moe");
    let dense = model();
    for (m, extra) in [
        (&dense, vec!["--devices", "2", "--lr-scheduler", "constant"]),
        (&moe, vec!["--router-aux-loss-coef", "0.5"]),
    ] {
        let run = |name: &str, checkpointing: bool| -> (Vec<serde_json::Value>, Vec<u8>) {
            let out = dir.path().join(name);
            let mut args = base(m, &d, &out);
            args.extend(["--max-steps", "3", "--skip-validation"]);
            args.extend(&extra);
            if checkpointing {
                args.push("--gradient-checkpointing");
            }
            train_ok(dir.path(), &args);
            let rows = std::fs::read_to_string(out.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (rows, std::fs::read(out.join("model.safetensors")).unwrap())
        };
        let tag = m.file_name().unwrap().to_str().unwrap();
        let (plain, plain_weights) = run(&format!("{tag}-plain"), false);
        let (ck, ck_weights) = run(&format!("{tag}-checkpointed"), true);
        assert_eq!(plain.len(), 3);
        for (a, b) in plain.iter().zip(&ck) {
            println!(
                "{tag} step {}: loss {} / {}, grad_norm {} / {}",
                a["step"], a["loss"], b["loss"], a["grad_norm"], b["grad_norm"]
            );
            for field in ["loss", "grad_norm", "aux_loss"] {
                let (x, y) = (a[field].as_f64(), b[field].as_f64());
                assert_eq!(x.is_some(), y.is_some(), "{field}");
                if let (Some(x), Some(y)) = (x, y) {
                    // The router's term is summed layer by layer: last digits only.
                    let bound = if tag == "qwen3_moe" {
                        1e-5 * x.abs()
                    } else {
                        0.0
                    };
                    assert!((x - y).abs() <= bound, "{tag} {field}: {x} vs {y}");
                }
            }
        }
        if tag != "qwen3_moe" {
            assert!(plain_weights == ck_weights, "the same final weights");
        }
    }
    // A run saved without it resumes with it (as `transformers` allows): the same end.
    let out = dir.path().join("switch");
    let mut args = base(&dense, &d, &out);
    args.extend(["--skip-validation", "--devices", "2", "--save-steps", "2"]);
    // (A constant rate: the first command's schedule ends at its own --max-steps.)
    args.extend(["--lr-scheduler", "constant"]);
    let mut first = args.clone();
    first.extend(["--max-steps", "2"]);
    train_ok(dir.path(), &first);
    args.extend(["--max-steps", "3", "--resume", "--gradient-checkpointing"]);
    train_ok(dir.path(), &args);
    let resumed = std::fs::read(out.join("model.safetensors")).unwrap();
    let straight = std::fs::read(dir.path().join("qwen2-plain/model.safetensors")).unwrap();
    assert!(
        resumed == straight,
        "resumed with checkpointing = uninterrupted without"
    );
}

/// LoRA dropout draws its masks from the run's seed, the step and the worker: the same command
/// trains the same adapter twice, a run resumed from a checkpoint ends where the uninterrupted
/// run ends, gradient checkpointing draws the same masks, and the masks do apply (another seed,
/// or no dropout, trains another adapter). Before, the masks came from an unseeded generator.
#[test]
fn lora_dropout_is_reproducible_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path(), 8);
    let m = model();
    let run_with = |name: &str, dropout: &str, extra: &[&str]| -> (Vec<f64>, Vec<u8>) {
        let out = dir.path().join(name);
        let mut args = base(&m, &d, &out);
        args.extend(["--skip-validation", "--lr-scheduler", "constant"]);
        args.extend(["--lora-r", "4", "--lora-dropout", dropout]);
        args.extend(extra);
        train_ok(dir.path(), &args);
        let losses = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
            .collect();
        (
            losses,
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        )
    };
    let run = |name: &str, extra: &[&str]| run_with(name, "0.3", extra);
    let four = ["--max-steps", "4"];
    let (a, a_weights) = run("a", &four);
    let (b, b_weights) = run("b", &four);
    println!("losses {a:?} / {b:?}");
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "the same command, the same losses");
    assert!(a_weights == b_weights, "the same command, the same adapter");
    // Two workers, each with its own stream: reproducible too.
    let two = ["--max-steps", "4", "--devices", "2"];
    let (c, c_weights) = run("c", &two);
    let (d2, d_weights) = run("d", &two);
    assert_eq!(c, d2);
    assert!(c_weights == d_weights);
    // Checkpointing recomputes each layer with the masks the plain forward drew.
    let (e, e_weights) = run("e", &["--max-steps", "4", "--gradient-checkpointing"]);
    assert_eq!(a, e, "checkpointing draws the same masks");
    assert!(a_weights == e_weights);
    // Interrupted after step 2 and resumed: the uninterrupted run's adapter.
    run("r", &["--max-steps", "2", "--save-steps", "2"]);
    let (_, r_weights) = run("r", &["--max-steps", "4", "--save-steps", "2", "--resume"]);
    assert!(r_weights == a_weights, "resumed = uninterrupted");
    // The masks apply: another seed, or no dropout, trains another adapter.
    let (f, f_weights) = run("f", &["--max-steps", "4", "--seed", "7"]);
    let (g, g_weights) = run_with("g", "0", &four);
    println!("seed 7 {f:?}, no dropout {g:?}");
    assert!(f_weights != a_weights && g_weights != a_weights && f_weights != g_weights);
}

/// A free TCP port on this machine (the port of a listener that is closed again).
fn free_port() -> String {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    l.local_addr().unwrap().port().to_string()
}

/// A machine of a loopback cluster: `train run` with its stdout and stderr in files (which a
/// long run cannot fill up, unlike pipes).
struct Node {
    child: std::process::Child,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl Node {
    /// `train ARGS --nodes 2 --node-rank RANK --orchestrator ADDRESS --node-address …`.
    fn start(dir: &std::path::Path, args: &[String], rank: usize, orchestrator: &str) -> Self {
        let (stdout, stderr) = (
            dir.join(format!("node-{rank}.out")),
            dir.join(format!("node-{rank}.err")),
        );
        let rank = rank.to_string();
        let address = format!("127.0.0.1:{}", free_port());
        let cluster = [
            "--nodes",
            "2",
            "--node-rank",
            &rank,
            "--orchestrator",
            orchestrator,
            "--node-address",
            &address,
        ];
        let child = Command::new(env!("CARGO_BIN_EXE_train"))
            .args(args)
            .args(cluster)
            .env("TRAIN_MODEL_REGISTRY", dir.join("models.json"))
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits until its stderr has a line starting with `prefix` (at most 300 s).
    fn wait_for(&self, prefix: &str) {
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(&self.stderr)
            .unwrap()
            .lines()
            .any(|l| l.starts_with(prefix))
        {
            assert!(start.elapsed().as_secs() < 300, "no line {prefix:?}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Its exit code and `--json` summary, waiting at most 600 s (then killing it).
    fn finish(mut self) -> (Option<i32>, serde_json::Value) {
        let start = std::time::Instant::now();
        while self.child.try_wait().unwrap().is_none() && start.elapsed().as_secs() < 600 {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let code = self.child.wait().unwrap().code();
        let stdout = std::fs::read_to_string(&self.stdout).unwrap();
        let stderr = std::fs::read_to_string(&self.stderr).unwrap();
        let summary = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("no JSON summary (exit {code:?}): {stderr}"));
        (code, summary)
    }
}

/// An orchestrator on a free port, and its address.
fn orchestrator(dir: &std::path::Path) -> (std::process::Child, String) {
    let port = free_port();
    let (child, _) = spawn_until(
        dir,
        &["orchestrator", "--port", &port],
        "orchestrator listening",
    );
    (child, format!("127.0.0.1:{port}"))
}

/// The flags of a small run in `out` with micro-batches of `batch`.
fn run_args(
    m: &std::path::Path,
    d: &std::path::Path,
    out: &std::path::Path,
    batch: &str,
) -> Vec<String> {
    let mut a: Vec<String> = base(m, d, out).iter().map(ToString::to_string).collect();
    a[7] = batch.into(); // --batch-size
    a.extend(["--skip-validation", "--json"].map(String::from));
    a
}

/// Two machines on loopback (`train orchestrator` and two `train run --nodes 2` processes, burn's
/// global collective) train like one process with the doubled batch, and end with identical
/// models.
#[test]
fn two_machines_on_loopback_train_like_one_with_the_doubled_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (model(), data(dir.path(), 16));
    let (mut orchestrator, address) = orchestrator(dir.path());
    let outs: Vec<_> = ["n0", "n1", "one"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    let args = |out: &std::path::Path, batch: &str| {
        let mut a = run_args(&m, &d, out, batch);
        a.extend(["--max-steps", "3"].map(String::from));
        a
    };
    let nodes: Vec<Node> = (0..2)
        .map(|rank| Node::start(dir.path(), &args(&outs[rank], "2"), rank, &address))
        .collect();
    for node in nodes {
        let (code, summary) = node.finish();
        assert_eq!((code, summary["global_step"].as_u64()), (Some(0), Some(3)));
    }
    orchestrator.kill().unwrap();
    orchestrator.wait().unwrap();
    let one = args(&outs[2], "4");
    train_ok(
        dir.path(),
        &one.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let metrics = |out: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (n0, n1, single) = (metrics(&outs[0]), metrics(&outs[1]), metrics(&outs[2]));
    assert_eq!(single.len(), 3);
    for ((a, b), c) in n0.iter().zip(&n1).zip(&single) {
        assert_eq!(a["tokens"], c["tokens"]);
        for field in ["loss", "grad_norm"] {
            let (x, y, z) = (
                a[field].as_f64().unwrap(),
                b[field].as_f64().unwrap(),
                c[field].as_f64().unwrap(),
            );
            println!(
                "step {}: {field} node 0 {x:.9}, node 1 {y:.9}, one process {z:.9} (relative {:.1e})",
                a["step"],
                (x - z).abs() / z
            );
            assert_eq!(x, y, "{field}: the machines disagree");
            assert!((x - z).abs() <= 1e-5 * z, "{field}: {x} vs {z}");
        }
    }
    // Both machines applied the same reduced gradients: the same model, byte for byte.
    let weights = |out: &std::path::Path| std::fs::read(out.join("model.safetensors")).unwrap();
    assert!(
        weights(&outs[0]) == weights(&outs[1]),
        "the machines' models differ"
    );
}

/// `train control stop` on one machine stops every machine of the run at the same step, each
/// with its checkpoint of that step.
#[test]
fn a_stop_on_one_machine_stops_all_at_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (model(), data(dir.path(), 60));
    let (mut orchestrator, address) = orchestrator(dir.path());
    let outs: Vec<_> = (0..2).map(|r| dir.path().join(format!("n{r}"))).collect();
    let nodes: Vec<Node> = (0..2)
        .map(|rank| {
            let mut a = run_args(&m, &d, &outs[rank], "2");
            a.extend(["--epochs", "50"].map(String::from));
            Node::start(dir.path(), &a, rank, &address)
        })
        .collect();
    nodes[1].wait_for("step 2/");
    let o = train(dir.path(), &["control", "stop", outs[1].to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    let ends: Vec<_> = nodes.into_iter().map(Node::finish).collect();
    orchestrator.kill().unwrap();
    orchestrator.wait().unwrap();
    let step = ends[0].1["global_step"].as_u64().unwrap();
    println!("both machines stopped after step {step}");
    for ((code, summary), out) in ends.iter().zip(&outs) {
        assert_eq!(*code, Some(130));
        assert_eq!(summary["status"], "stopped");
        assert_eq!(summary["global_step"].as_u64(), Some(step));
        assert!(out.join(format!("checkpoint-{step}")).is_dir());
    }
}

/// `--device` can list one device per worker; a list that does not match `--devices` is refused.
#[test]
fn a_device_list_gives_one_device_per_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 8), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "1",
        "--skip-validation",
        "--device",
        "cpu,cpu",
    ]);
    let o = train(dir.path(), &args);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("--device lists 2 devices for 1 worker(s); give --devices 2"),
        "{stderr}"
    );
    args.extend(["--devices", "2"]);
    train_ok(dir.path(), &args);
    let out2 = dir.path().join("out2");
    let mut args = base(&m, &d, &out2);
    args.extend(["--max-steps", "1", "--device", "gpu"]);
    let o = train(dir.path(), &args);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--device gpu: the cpu backend has only"));
}
