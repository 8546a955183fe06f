//! The loop's guarantees: loss invariance under packing / padding / accumulation, exact resume,
//! observer stop on every ending, NaN handling, the output lock.
#![cfg(feature = "cpu")]

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, ElementConversion, TensorData};
use train_data::{Batch, Example, IGNORE_INDEX, TrainRows, pack_examples};
use train_model::{
    CausalLm, LoadOptions, LoraConfig, ModelConfig, NamedParam, Precision, load_pretrained,
};
use train_runner::{
    Cluster, LrSchedule, MetricsObserver, OutputLock, Parallelism, Resume, RunControl, RunStatus,
    RunSummary, RunnerError, TrainEvent, TrainObserver, TrainSetup, TrainerConfig,
    global_grad_norm, latest_checkpoint, run, step_gradients,
};

type B = Autodiff<Flex>;

fn fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../train-model/tests/fixtures")
        .join(arch)
}

fn model() -> (CausalLm<B>, serde_json::Value) {
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    let p = load_pretrained::<B>(&fixture("qwen2"), &options, &Default::default()).unwrap();
    (p.model, p.raw_config)
}

/// Examples of different lengths with labels on their second half.
fn examples(n: usize) -> Vec<Example> {
    (0..n)
        .map(|row| {
            let len = 6 + (row * 5) % 13;
            let input_ids: Vec<u32> = (0..len)
                .map(|t| ((row * 31 + t * 7) % 900) as u32 + 3)
                .collect();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < len / 2 { IGNORE_INDEX } else { id as i32 })
                .collect();
            Example {
                row,
                input_ids,
                labels,
            }
        })
        .collect()
}

fn grads_by_name(
    model: &CausalLm<B>,
    grads: &burn::optim::GradientsParams,
) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    model.visit_named(|p| {
        let (name, g) = match p {
            NamedParam::Vector(n, t) => {
                (n, grads.get::<Flex, 1>(t.id).map(burn::Tensor::into_data))
            }
            NamedParam::Matrix(n, t) => {
                (n, grads.get::<Flex, 2>(t.id).map(burn::Tensor::into_data))
            }
        };
        out.push((
            name.to_string(),
            g.map(|d: TensorData| d.to_vec::<f32>().unwrap())
                .unwrap_or_default(),
        ));
    });
    out
}

fn max_rel(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    a.iter()
        .zip(b)
        .map(|((na, ga), (nb, gb))| {
            assert_eq!(na, nb);
            let num: f64 = ga
                .iter()
                .zip(gb)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum();
            let den: f64 = gb.iter().map(|y| f64::from(*y).powi(2)).sum();
            (num / den.max(1e-30)).sqrt()
        })
        .fold(0.0, f64::max)
}

#[test]
fn packing_padding_and_accumulation_give_the_same_loss_and_gradients() {
    let (model, _) = model();
    let device = Default::default();
    let ex = examples(8);
    let refs: Vec<&Example> = ex.iter().collect();
    // 1 × 8 padded.
    let one = vec![Batch::padded(&refs, 0)];
    // 4 × 2 padded (accumulation).
    let four: Vec<Batch> = refs.chunks(2).map(|c| Batch::padded(c, 0)).collect();
    // Packed into rows of 32 tokens.
    let (rows, _) = pack_examples(&ex, 32);
    assert!(rows.len() < 8, "some examples share a row");
    let packed = vec![Batch::collate(rows, 0, None)];
    // Packed rows split over two micro-batches.
    let (rows, _) = pack_examples(&ex, 32);
    let half = rows.len() / 2;
    let packed_acc = vec![
        Batch::collate(rows[..half].to_vec(), 0, None),
        Batch::collate(rows[half..].to_vec(), 0, None),
    ];
    // The fused attention on Flex trains a padded micro-batch as one padding-free row; the
    // decomposed one computes the padded rows as they are.
    let padded_as_is = model
        .clone()
        .with_attention(train_model::AttentionImpl::Standard);
    assert!(model.padding_free() && !padded_as_is.padding_free());
    assert!(one[0].padding_free().is_some());
    let mut results = Vec::new();
    for (name, model, batches) in [
        ("1x8", &model, &one),
        ("4x2", &model, &four),
        ("packed", &model, &packed),
        ("packed 2 micro", &model, &packed_acc),
        (
            "1x8 with its padding, decomposed attention",
            &padded_as_is,
            &one,
        ),
    ] {
        let (loss, grads) = step_gradients(model, batches, &device);
        let norm = global_grad_norm(model, &grads);
        results.push((name, loss, norm, grads_by_name(model, &grads)));
    }
    let (_, loss0, norm0, g0) = &results[0];
    for (name, loss, norm, g) in &results[1..] {
        let rel = max_rel(g, g0);
        println!(
            "{name}: loss {loss:.7} vs {loss0:.7}, grad norm {norm:.6} vs {norm0:.6}, worst gradient relative difference {rel:.2e}"
        );
        assert!(
            (loss - loss0).abs() <= 1e-5 * loss0,
            "{name}: loss {loss} vs {loss0}"
        );
        assert!(
            (norm - norm0).abs() <= 1e-4 * norm0,
            "{name}: grad norm {norm} vs {norm0}"
        );
        assert!(rel <= 1e-4, "{name}: gradients differ by {rel}");
    }
}

/// With `output_router_logits`, a Qwen3-MoE step adds `coef ·` the router's load-balancing loss
/// over the real tokens: the same whether the padded micro-batch runs as one padding-free row or
/// with its padding (left out by the real-token mask), and by exactly that term above the step
/// without it.
#[test]
fn the_router_loss_joins_the_step_loss_over_real_tokens() {
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    let device = Default::default();
    let plain = load_pretrained::<B>(&fixture("qwen3_moe"), &options, &device)
        .unwrap()
        .model;
    let coef = 0.05;
    let mut routed = plain.clone();
    if let Some(m) = routed.config.moe.as_mut() {
        m.output_router_logits = true;
        m.router_aux_loss_coef = coef;
    }
    let ex = examples(8);
    let refs: Vec<&Example> = ex.iter().collect();
    let one = vec![Batch::padded(&refs, 0)];
    let padded_as_is = routed
        .clone()
        .with_attention(train_model::AttentionImpl::Standard);
    assert!(routed.padding_free() && !padded_as_is.padding_free());
    let (without, _) = step_gradients(&plain, &one, &device);
    let (with, grads) = step_gradients(&routed, &one, &device);
    let (with_padding, grads_padding) = step_gradients(&padded_as_is, &one, &device);
    // The term itself, on the padding-free row of the same examples.
    let flat = one[0].padding_free().unwrap();
    let (input, _) = train_runner::batch_tensors::<B>(&flat, &device);
    let (_, aux) = routed.forward_hidden_with_router_loss(&input, None);
    let aux: f64 = aux.unwrap().into_scalar().elem::<f32>().into();
    println!(
        "router loss {aux:.6}: step loss {without:.7} without, {with:.7} with, {with_padding:.7} with the padding computed"
    );
    assert!(
        (with - without - coef * aux).abs() <= 1e-5,
        "{with} - {without} vs {coef} × {aux}"
    );
    assert!(
        (with_padding - with).abs() <= 1e-5 * with,
        "{with_padding} vs {with}"
    );
    let rel = max_rel(
        &grads_by_name(&padded_as_is, &grads_padding),
        &grads_by_name(&routed, &grads),
    );
    assert!(rel <= 1e-4, "gradients differ by {rel}");
}

struct Recorder {
    events: Vec<String>,
    stop_after: Option<(usize, RunControl)>,
    summary: Option<RunSummary>,
    /// `metrics.jsonl`, as the `train` binary writes it.
    metrics: MetricsObserver,
}

impl Recorder {
    fn new() -> Self {
        Self {
            events: Vec::new(),
            stop_after: None,
            summary: None,
            metrics: MetricsObserver::new(),
        }
    }
}

impl TrainObserver<B> for Recorder {
    fn start(&mut self, info: &train_runner::RunInfo) {
        TrainObserver::<B>::start(&mut self.metrics, info);
        self.events.push(format!("start {}", info.start_step));
    }
    fn update(&mut self, event: &TrainEvent<'_>) {
        TrainObserver::<B>::update(&mut self.metrics, event);
        match event {
            TrainEvent::Step(m) => {
                self.events.push(format!("step {}", m.step));
                if let Some((n, control)) = &self.stop_after
                    && m.step == *n
                {
                    control.request_stop();
                }
            }
            TrainEvent::Eval(m) => self.events.push(format!("eval {}", m.step)),
            TrainEvent::Checkpoint { step, .. } => self.events.push(format!("checkpoint {step}")),
            TrainEvent::Paused { step } => self.events.push(format!("paused {step}")),
            TrainEvent::Resumed { step } => self.events.push(format!("resumed {step}")),
            other => self.events.push(format!("{other:?}")),
        }
    }
    fn stop(&mut self, summary: &RunSummary) {
        TrainObserver::<B>::stop(&mut self.metrics, summary);
        assert_eq!(self.metrics.error(), None, "metrics.jsonl");
        self.events.push(format!("stop {:?}", summary.status));
        self.summary = Some(summary.clone());
    }
}

#[allow(clippy::needless_pass_by_value)] // test helper: call sites build the config inline
fn setup(
    out: &Path,
    model: CausalLm<B>,
    raw: serde_json::Value,
    config: TrainerConfig,
) -> TrainSetup<B> {
    let ex = examples(24);
    TrainSetup {
        model,
        raw_config: raw,
        companions_from: fixture("qwen2"),
        source_dtype: train_model::StorageDtype::F32,
        train: TrainRows::one_per_example(&ex[..20]),
        validation: ex[20..].to_vec(),
        pad_id: 0,
        config: TrainerConfig {
            output_dir: out.to_path_buf(),
            ..config
        },
        data_fingerprint: "test-data".into(),
        overwrite: false,
        parallelism: Parallelism::single(Default::default()),
        inputs: Vec::new(),
    }
}

fn config() -> TrainerConfig {
    TrainerConfig {
        batch_size: 4,
        gradient_accumulation_steps: 2,
        learning_rate: 5e-3,
        max_steps: Some(6),
        eval_steps: 2,
        save_steps: 2,
        warmup_steps: 1,
        lr_scheduler: LrSchedule::Cosine,
        weight_decay: 0.01,
        ..TrainerConfig::default()
    }
}

fn metric_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `config` for 6 steps in one go, and stopped after 3 then resumed; both must log the
/// same values and write the same `final_file`.
fn check_resume_is_exact(config: &TrainerConfig, final_file: &str) {
    let a = tempfile::tempdir().unwrap();
    let (m, raw) = model();
    let mut rec = Recorder::new();
    let full = run(
        setup(a.path(), m, raw.clone(), config.clone()),
        None,
        &mut rec,
        &RunControl::new(),
    )
    .unwrap();
    assert_eq!(full.status, RunStatus::Completed);
    assert_eq!(full.global_step, 6);

    let b = tempfile::tempdir().unwrap();
    let (m, _) = model();
    let control = RunControl::new();
    let mut rec = Recorder::new();
    rec.stop_after = Some((3, control.clone()));
    let stopped = run(
        setup(b.path(), m, raw.clone(), config.clone()),
        None,
        &mut rec,
        &control,
    )
    .unwrap();
    assert_eq!(stopped.status, RunStatus::Stopped);
    assert_eq!(stopped.global_step, 3);
    assert_eq!(rec.events.last().unwrap(), "stop Stopped");
    let ckpt = latest_checkpoint(b.path()).unwrap();
    assert!(ckpt.ends_with("checkpoint-3"), "{ckpt:?}");

    // Resume: the model comes from the checkpoint (f32 master weights).
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    let resumed_model = load_pretrained::<B>(&ckpt, &options, &Default::default())
        .unwrap()
        .model;
    let mut rec = Recorder::new();
    let resume = Resume::from_checkpoint(&ckpt).unwrap();
    let done = run(
        setup(b.path(), resumed_model, raw, config.clone()),
        Some(&resume),
        &mut rec,
        &RunControl::new(),
    )
    .unwrap();
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(rec.events.first().unwrap(), "start 3");

    let ra = metric_rows(a.path());
    let rb = metric_rows(b.path());
    let key = |r: &serde_json::Value| (r["step"].as_u64().unwrap(), r.get("eval_loss").is_some());
    let mut compared = 0;
    for row in &ra {
        // The last row for a step is the one that counts.
        let other = rb.iter().rev().find(|r| key(r) == key(row)).unwrap();
        for field in ["loss", "grad_norm", "learning_rate", "eval_loss"] {
            if let (Some(x), Some(y)) = (
                row.get(field).and_then(serde_json::Value::as_f64),
                other.get(field).and_then(serde_json::Value::as_f64),
            ) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1e-6),
                    "step {}: {field} {x} vs {y}",
                    row["step"]
                );
                compared += 1;
            }
        }
    }
    println!(
        "resume exactness: {compared} values of {} rows identical within 1e-6",
        ra.len()
    );
    assert!(compared >= 6 * 3 + 3);
    // Both final models are the same.
    assert_eq!(
        std::fs::read(a.path().join(final_file)).unwrap(),
        std::fs::read(b.path().join(final_file)).unwrap()
    );
}

#[test]
fn interrupted_and_resumed_run_equals_an_uninterrupted_one() {
    check_resume_is_exact(&config(), "model.safetensors");
}

/// The rows' layout comes from the data side (`Prepared::rows`); a checkpoint records it, and a
/// resume on rows packed differently is refused. States written when `packing` and
/// `max_length` were trainer settings still load, their layout carried over.
#[test]
fn a_resume_with_another_row_layout_is_refused_and_old_states_load() {
    let dir = tempfile::tempdir().unwrap();
    let (m, raw) = model();
    let control = RunControl::new();
    let mut rec = Recorder::new();
    rec.stop_after = Some((2, control.clone()));
    let stopped = run(
        setup(dir.path(), m, raw.clone(), config()),
        None,
        &mut rec,
        &control,
    )
    .unwrap();
    assert_eq!(stopped.status, RunStatus::Stopped);
    let ckpt = latest_checkpoint(dir.path()).unwrap();
    let resume = Resume::from_checkpoint(&ckpt).unwrap();
    assert_eq!(resume.state.packed_to, None);
    let (m, _) = model();
    let mut packed = setup(dir.path(), m, raw, config());
    packed.train = TrainRows::packed(&examples(24)[..20], 64);
    let err = run(
        packed,
        Some(&resume),
        &mut Recorder::new(),
        &RunControl::new(),
    )
    .expect_err("a resume on packed rows is refused")
    .to_string();
    assert!(err.contains("`packing` differs"), "{err}");

    let text = std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap();
    let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["packed_to", "devices", "nodes"] {
        old.as_object_mut().unwrap().remove(key);
    }
    for (packing, expected) in [(true, Some(64)), (false, None)] {
        let config = old["config"].as_object_mut().unwrap();
        config.insert("packing".into(), packing.into());
        config.insert("max_length".into(), 64.into());
        config.insert("devices".into(), 2.into());
        config.insert("nodes".into(), 1.into());
        let state = train_runner::TrainerState::from_json(&old.to_string()).unwrap();
        assert_eq!(state.packed_to, expected);
        assert_eq!((state.devices, state.nodes), (2, 1));
        assert_eq!(state.global_step, 2);
    }
    // A resume with two workers where the run had one is refused: the global batch would change.
    let (m, raw) = model();
    let mut two = setup(dir.path(), m, raw, config());
    two.parallelism = Parallelism::new(vec![Default::default(); 2], None).unwrap();
    let err = run(two, Some(&resume), &mut Recorder::new(), &RunControl::new())
        .expect_err("a resume on two workers is refused")
        .to_string();
    assert!(err.contains("`devices` differs"), "{err}");
}

fn lora_config() -> TrainerConfig {
    TrainerConfig {
        lora: Some(LoraConfig {
            r: 4,
            alpha: 8.0,
            target_modules: vec!["all-linear".into()],
            ..LoraConfig::default()
        }),
        ..config()
    }
}

#[test]
fn an_interrupted_and_resumed_lora_run_equals_an_uninterrupted_one() {
    check_resume_is_exact(&lora_config(), "adapter_model.safetensors");
}

#[test]
fn a_lora_run_trains_only_the_adapters_and_saves_a_peft_adapter() {
    let out = tempfile::tempdir().unwrap();
    let (m, raw) = model();
    let base: Vec<(String, Vec<f32>)> = {
        let mut v = Vec::new();
        m.visit_named(|p| match p {
            NamedParam::Vector(n, t) => {
                v.push((n.to_string(), t.val().into_data().to_vec().unwrap()));
            }
            NamedParam::Matrix(n, t) => {
                v.push((n.to_string(), t.val().into_data().to_vec().unwrap()));
            }
        });
        v
    };
    let mut rec = Recorder::new();
    let summary = run(
        setup(out.path(), m, raw, lora_config()),
        None,
        &mut rec,
        &RunControl::new(),
    )
    .unwrap();
    assert_eq!(summary.status, RunStatus::Completed);
    // The output is an adapter directory, not a model.
    assert!(out.path().join("adapter_config.json").is_file());
    assert!(out.path().join("adapter_model.safetensors").is_file());
    assert!(!out.path().join("model.safetensors").exists());
    // The optimizer kept state for adapter weights only (2 per projection, 7 projections a layer).
    let ckpt = latest_checkpoint(out.path()).unwrap();
    let bytes = std::fs::read(ckpt.join("optimizer.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    let (m, _) = model();
    let expected = 2 * 2 * 7 * m.layers.len();
    assert_eq!(names.len(), expected, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.contains(".lora_A.") || n.contains(".lora_B."))
    );
    // Reloaded (base + adapter), the base weights are untouched and the adapters are not zero.
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    let trained = load_pretrained::<B>(out.path(), &options, &Default::default()).unwrap();
    let mut i = 0;
    trained.model.visit_named(|p| {
        let (n, v): (&str, Vec<f32>) = match p {
            NamedParam::Vector(n, t) => (n, t.val().into_data().to_vec().unwrap()),
            NamedParam::Matrix(n, t) => (n, t.val().into_data().to_vec().unwrap()),
        };
        assert_eq!((n, &v), (base[i].0.as_str(), &base[i].1), "{n} changed");
        i += 1;
    });
    let mut moved = 0;
    trained.model.visit_adapters(|n, p| {
        let v: Vec<f32> = p.val().into_data().to_vec().unwrap();
        if n.contains("lora_B") && v.iter().any(|x| *x != 0.0) {
            moved += 1;
        }
    });
    assert_eq!(moved, 7 * m.layers.len());
}

#[test]
fn observer_stop_is_called_on_success_error_crash_and_interrupt() {
    // Success.
    let dir = tempfile::tempdir().unwrap();
    let (m, raw) = model();
    let mut rec = Recorder::new();
    let cfg = TrainerConfig {
        max_steps: Some(2),
        ..config()
    };
    run(
        setup(dir.path(), m, raw.clone(), cfg.clone()),
        None,
        &mut rec,
        &RunControl::new(),
    )
    .unwrap();
    assert_eq!(rec.events.last().unwrap(), "stop Completed");
    assert!(
        rec.events.contains(&"eval 2".to_string())
            && rec.events.contains(&"checkpoint 2".to_string())
    );

    // Error after the start: the checkpoint cannot be written (a file is in the way).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("checkpoint-2"), "in the way").unwrap();
    let (m, _) = model();
    let mut rec = Recorder::new();
    let e = run(
        setup(dir.path(), m, raw.clone(), cfg.clone()),
        None,
        &mut rec,
        &RunControl::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("checkpoint-2"), "{e}");
    assert_eq!(rec.events.last().unwrap(), "stop Failed");
    assert!(rec.summary.unwrap().error.is_some());

    // Crash: NaN weights give a NaN loss; nothing is saved, earlier checkpoints are untouched.
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = model();
    run(
        setup(dir.path(), m, raw.clone(), cfg.clone()),
        None,
        &mut Recorder::new(),
        &RunControl::new(),
    )
    .unwrap();
    let before = std::fs::read(dir.path().join("checkpoint-2/model.safetensors")).unwrap();
    let config: ModelConfig = ModelConfig::from_json("config.json".as_ref(), &raw).unwrap();
    let nan = CausalLm::<B>::from_source(&config, DType::F32, &Default::default(), |spec| {
        let n: usize = spec.shape.iter().product();
        Ok(TensorData::new(vec![f32::NAN; n], spec.shape.clone()))
    })
    .unwrap();
    let mut rec = Recorder::new();
    let mut s = setup(dir.path(), nan, raw.clone(), cfg.clone());
    s.overwrite = true;
    let crashed = run(s, None, &mut rec, &RunControl::new()).unwrap();
    assert_eq!(crashed.status, RunStatus::Crashed);
    assert_eq!(crashed.global_step, 0);
    assert_eq!(rec.events.last().unwrap(), "stop Crashed");
    // The restart (`overwrite`) moved the earlier run's checkpoint aside, whole, before its
    // first step.
    let aside = std::fs::read_dir(dir.path().join(train_runner::SET_ASIDE_DIR))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read(aside.join("checkpoint-2/model.safetensors")).unwrap(),
        before
    );
    assert!(!dir.path().join("checkpoint-2").exists());

    // Interrupt before the first step: a checkpoint of step 0 is still saved.
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = model();
    let control = RunControl::new();
    control.request_stop();
    let mut rec = Recorder::new();
    let stopped = run(setup(dir.path(), m, raw, cfg), None, &mut rec, &control).unwrap();
    assert_eq!(stopped.status, RunStatus::Stopped);
    assert_eq!(rec.events.last().unwrap(), "stop Stopped");
    assert!(dir.path().join("checkpoint-0/trainer_state.json").exists());
}

#[test]
fn a_locked_or_used_output_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (m, raw) = model();
    let lock = OutputLock::acquire(dir.path()).unwrap();
    let e = run(
        setup(dir.path(), m, raw.clone(), config()),
        None,
        &mut Recorder::new(),
        &RunControl::new(),
    )
    .unwrap_err();
    assert!(matches!(e, RunnerError::Locked { .. }), "{e}");
    assert!(
        e.to_string().contains(&std::process::id().to_string()),
        "{e}"
    );
    drop(lock);

    let cfg = TrainerConfig {
        max_steps: Some(2),
        ..config()
    };
    let (m, _) = model();
    run(
        setup(dir.path(), m, raw.clone(), cfg.clone()),
        None,
        &mut Recorder::new(),
        &RunControl::new(),
    )
    .unwrap();
    let (m, _) = model();
    let e = run(
        setup(dir.path(), m, raw.clone(), cfg.clone()),
        None,
        &mut Recorder::new(),
        &RunControl::new(),
    )
    .unwrap_err();
    assert!(matches!(e, RunnerError::OutputNotEmpty { .. }), "{e}");
    let (m, _) = model();
    let mut s = setup(dir.path(), m, raw, cfg);
    s.overwrite = true;
    assert_eq!(
        run(s, None, &mut Recorder::new(), &RunControl::new())
            .unwrap()
            .status,
        RunStatus::Completed
    );
}

#[test]
fn save_total_limit_keeps_the_newest_and_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let (m, raw) = model();
    let cfg = TrainerConfig {
        save_steps: 1,
        eval_steps: 1,
        save_total_limit: Some(2),
        ..config()
    };
    let summary = run(
        setup(dir.path(), m, raw, cfg),
        None,
        &mut Recorder::new(),
        &RunControl::new(),
    )
    .unwrap();
    let left: Vec<usize> = train_runner::list_checkpoints(dir.path())
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert!(left.len() <= 2 && left.contains(&6), "{left:?}");
    let best = summary.best_checkpoint.unwrap();
    assert!(best.exists(), "best checkpoint {best:?} kept");
}

/// [`grads_by_name`] and the gradients of the LoRA adapters (`<module>.lora_A` / `lora_B`).
fn all_grads(model: &CausalLm<B>, grads: &burn::optim::GradientsParams) -> Vec<(String, Vec<f32>)> {
    let mut out = grads_by_name(model, grads);
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, p) in layer.projections() {
            let Some(lora) = p.lora.as_ref() else {
                continue;
            };
            for (part, param) in [("lora_A", &lora.a), ("lora_B", &lora.b)] {
                let g = grads
                    .get::<Flex, 2>(param.id)
                    .map(|t| t.into_data().to_vec::<f32>().unwrap());
                out.push((format!("layers.{i}.{name}.{part}"), g.unwrap_or_default()));
            }
        }
    }
    out
}

/// Largest difference between two sets of gradients, relative to the largest gradient of each
/// parameter; also fails when a parameter has a gradient in one and none in the other.
fn worst_gradient_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f32, String) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0f32, String::new());
    for ((name, x), (other, y)) in a.iter().zip(b) {
        assert_eq!(
            (name, x.len()),
            (other, y.len()),
            "{name}: gradient present in both"
        );
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        if diff / scale > worst.0 {
            worst = (diff / scale, name.clone());
        }
    }
    worst
}

/// Gradient checkpointing (per-layer recomputation) gives the gradients of the plain backward
/// pass, in every family (sliding windows, local rotary tables, sandwich and post norms,
/// fused projections, routed experts with their load-balancing loss), on padded and packed
/// micro-batches, with LoRA adapters and with a frozen embedding.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    let device = Default::default();
    let ex = examples(6);
    let refs: Vec<&Example> = ex.iter().collect();
    let (rows, _) = pack_examples(&ex, 32);
    let shapes = [
        ("padded", vec![Batch::padded(&refs, 0)]),
        ("packed", vec![Batch::collate(rows, 0, None)]),
    ];
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        ..LoraConfig::default()
    };
    let families = [
        "llama",
        "qwen2",
        "qwen3",
        "gemma3",
        "mistral",
        "ministral",
        "olmo2",
        "phi3",
        "smollm3",
        "qwen3_moe",
    ];
    for family in families {
        let mut plain = load_pretrained::<B>(&fixture(family), &options, &device)
            .unwrap()
            .model;
        if family == "qwen3_moe" {
            // The router's load-balancing term, recomputed layer by layer too.
            train_runner::weigh_router_loss(&mut plain, Some(0.5)).unwrap();
        }
        let mut variants = vec![("full", plain.clone())];
        if family == "llama" {
            variants.push(("lora", plain.clone().with_lora(&lora, 3).unwrap()));
        }
        for (kind, model) in variants {
            let checkpointed = model.clone().with_gradient_checkpointing(true);
            for (shape, batches) in &shapes {
                let (l1, g1) = step_gradients(&model, batches, &device);
                let (l2, g2) = step_gradients(&checkpointed, batches, &device);
                let (a, b) = (all_grads(&model, &g1), all_grads(&checkpointed, &g2));
                let (worst, at) = worst_gradient_difference(&a, &b);
                let trained = a.iter().filter(|(_, g)| !g.is_empty()).count();
                println!(
                    "{family} {kind} {shape}: loss {l2:.7} vs {l1:.7}, {trained} gradients, \
                     worst relative difference {worst:.2e} ({at})"
                );
                assert!(trained > 0);
                assert!(
                    (l1 - l2).abs() <= 1e-6 * l1.abs(),
                    "{family} {kind} {shape}"
                );
                // Dense layers recompute bit for bit; a routed layer's input gradient sums its
                // experts' contributions in another order, and the router's term is summed
                // layer by layer instead of at once.
                let bound = if family == "qwen3_moe" { 1e-5 } else { 0.0 };
                assert!(worst <= bound, "{family} {kind} {shape}: {worst:e} at {at}");
            }
        }
    }
}

#[test]
fn bf16_compute_with_master_weights_trains() {
    let dir = tempfile::tempdir().unwrap();
    let options = LoadOptions {
        precision: Precision::Bf16,
        f32_master_weights: true,
        ..LoadOptions::default()
    };
    let p = load_pretrained::<B>(&fixture("qwen2"), &options, &Default::default()).unwrap();
    assert_eq!(p.model.dtype(), DType::F32);
    let cfg = TrainerConfig {
        max_steps: Some(4),
        ..config()
    };
    let summary = run(
        setup(dir.path(), p.model, p.raw_config, cfg),
        None,
        &mut Recorder::new(),
        &RunControl::new(),
    )
    .unwrap();
    assert_eq!(summary.status, RunStatus::Completed);
    let rows = metric_rows(dir.path());
    let losses: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.get("loss").and_then(serde_json::Value::as_f64))
        .collect();
    println!("bf16 compute, f32 master weights: losses {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()) && losses[3] < losses[0]);
}

#[test]
fn a_paused_run_waits_until_resumed_and_a_stop_ends_a_pause() {
    let (m, raw) = model();
    let cfg = TrainerConfig {
        max_steps: Some(2),
        ..config()
    };
    // Paused before its first step; another thread resumes it.
    let dir = tempfile::tempdir().unwrap();
    let control = RunControl::new();
    control.request_pause();
    let other = control.clone();
    let resumer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        other.resume();
    });
    let mut rec = Recorder::new();
    let started = std::time::Instant::now();
    let summary = run(
        setup(dir.path(), m, raw.clone(), cfg.clone()),
        None,
        &mut rec,
        &control,
    )
    .unwrap();
    resumer.join().unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(summary.status, RunStatus::Completed);
    let pos = |e: &str| rec.events.iter().position(|x| x == e).unwrap();
    assert!(pos("paused 0") < pos("resumed 0") && pos("resumed 0") < pos("stop Completed"));

    // A stop while paused ends the run as stopped, with a checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = model();
    let control = RunControl::new();
    control.request_pause();
    let other = control.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        other.request_stop();
    });
    let summary = run(
        setup(dir.path(), m, raw, cfg),
        None,
        &mut Recorder::new(),
        &control,
    )
    .unwrap();
    stopper.join().unwrap();
    assert_eq!(summary.status, RunStatus::Stopped);
}

#[test]
fn the_inspector_sees_the_model_before_the_first_step_and_after_each() {
    struct Steps(Vec<(usize, usize)>);
    impl TrainObserver<B> for Steps {
        fn inspect(&mut self, step: usize, model: &CausalLm<B>) {
            self.0.push((step, train_runner::layer_norms(model).len()));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, raw) = model();
    let layers = m.layers.len();
    let norms_before = train_runner::layer_norms(&m);
    assert!(norms_before.iter().all(|n| n.is_finite() && *n > 0.0));
    let cfg = TrainerConfig {
        max_steps: Some(2),
        ..config()
    };
    let mut seen = Steps(Vec::new());
    let mut recorder = Recorder::new();
    let mut observers = train_runner::Observers::default();
    observers.push(&mut recorder);
    observers.push(&mut seen);
    run(
        setup(dir.path(), m, raw, cfg),
        None,
        &mut observers,
        &RunControl::new(),
    )
    .unwrap();
    drop(observers);
    assert_eq!(seen.0, [(0, layers), (1, layers), (2, layers)]);
}

/// `transformers` embeds with `nn.Embedding(padding_idx=pad_token_id)`: the lookup sends no
/// gradient to the padding token's row (it matters when that token is in the data, e.g.
/// SmolLM2's pad `<|im_end|>`). Only that row changes; the loss does not.
#[test]
fn padding_row_of_the_embeddings_gets_no_lookup_gradient() {
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    // The Llama fixture has an untied LM head, so the embeddings' gradient is the lookup's.
    let mut model = load_pretrained::<B>(&fixture("llama"), &options, &Default::default())
        .unwrap()
        .model;
    let ex = examples(3);
    let pad = ex[0].input_ids[0];
    let refs: Vec<&Example> = ex.iter().collect();
    let batches = vec![Batch::padded(&refs, 0)];
    let hidden = model.config.hidden_size;
    let embed_grad = |model: &CausalLm<B>| {
        let (loss, grads) = step_gradients(model, &batches, &Default::default());
        let g = grads_by_name(model, &grads)
            .into_iter()
            .find(|(n, _)| n == "model.embed_tokens.weight")
            .unwrap()
            .1;
        (loss, g)
    };
    model.config.pad_token_id = None;
    let (loss_free, free) = embed_grad(&model);
    model.config.pad_token_id = Some(pad);
    let (loss_cut, cut) = embed_grad(&model);
    let row = |g: &[f32], r: u32| g[r as usize * hidden..(r as usize + 1) * hidden].to_vec();
    assert!(
        (loss_free - loss_cut).abs() < 1e-9,
        "{loss_free} vs {loss_cut}"
    );
    assert!(
        row(&free, pad).iter().any(|v| v.abs() > 1e-6),
        "the row had a gradient"
    );
    assert!(
        row(&cut, pad).iter().all(|&v| v == 0.0),
        "the padding row got a gradient"
    );
    let other = ex[0].input_ids[1];
    assert_ne!(other, pad);
    assert_eq!(row(&free, other), row(&cut, other));
}

/// `peft`'s first LoRA step on the fixture models (`lora.reference.safetensors`, made by
/// `cargo xtask fixtures`): the loss and the gradient of every adapter weight, with the adapter
/// `peft` saved loaded through `load_pretrained` (base + adapter directory).
#[test]
fn lora_gradients_match_peft() {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora.reference.safetensors"),
    )
    .unwrap();
    let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints = |name: &str| -> (Vec<i64>, Vec<usize>) {
        let v = reference.tensor(name).unwrap();
        let data = TensorData::from_bytes_vec(v.data().to_vec(), v.shape().to_vec(), DType::I64);
        (data.to_vec::<i64>().unwrap(), v.shape().to_vec())
    };
    let floats = |name: &str| -> Vec<f32> {
        let v = reference.tensor(name).unwrap();
        TensorData::from_bytes_vec(v.data().to_vec(), v.shape().to_vec(), DType::F32)
            .to_vec::<f32>()
            .unwrap()
    };
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    let device = Default::default();
    for arch in [
        "qwen3",
        "llama",
        "mistral",
        "olmo2",
        "smollm3",
        "gemma3",
        "phi3",
        "qwen3_moe",
    ] {
        let loaded =
            load_pretrained::<B>(&fixture(&format!("{arch}-lora")), &options, &device).unwrap();
        let model = loaded.model;
        assert!(model.lora_config().is_some());
        let (ids, shape) = ints(&format!("{arch}.input_ids"));
        let (labels, _) = ints(&format!("{arch}.labels"));
        let (mask, _) = ints(&format!("{arch}.attention_mask"));
        let seq = shape[1];
        let examples: Vec<Example> = (0..shape[0])
            .map(|r| {
                let len = mask[r * seq..(r + 1) * seq]
                    .iter()
                    .filter(|m| **m == 1)
                    .count();
                Example {
                    row: r,
                    input_ids: ids[r * seq..r * seq + len]
                        .iter()
                        .map(|&i| i as u32)
                        .collect(),
                    labels: labels[r * seq..r * seq + len]
                        .iter()
                        .map(|&l| l as i32)
                        .collect(),
                }
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let (loss, grads) = step_gradients(&model, &[Batch::padded(&refs, 0)], &device);
        let bytes = reference
            .tensor(&format!("{arch}.loss"))
            .unwrap()
            .data()
            .to_vec();
        let want_loss = f64::from_le_bytes(bytes.try_into().unwrap());
        assert!(
            (loss - want_loss).abs() <= 1e-5 * want_loss,
            "{arch}: loss {loss} vs peft {want_loss}"
        );
        // No base weight has a gradient.
        assert!(
            grads_by_name(&model, &grads)
                .iter()
                .all(|(_, g)| g.is_empty()),
            "{arch}: a frozen weight got a gradient"
        );
        let mut worst = 0f64;
        let mut n = 0;
        model.visit_adapters(|name, p| {
            let got: Vec<f32> = grads
                .get::<Flex, 2>(p.id)
                .unwrap()
                .into_data()
                .to_vec()
                .unwrap();
            let want = floats(&format!("{arch}.grad.base_model.model.{name}"));
            assert_eq!(got.len(), want.len(), "{name}");
            let num: f64 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum();
            let den: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
            let rel = (num / den.max(1e-30)).sqrt();
            assert!(
                rel <= 1e-4,
                "{arch} {name}: gradient differs from peft's by {rel:.2e}"
            );
            worst = worst.max(rel);
            n += 1;
        });
        // Every adapter weight peft trained has its gradient compared: every projection of
        // every layer (Phi-3's four fused ones, seven elsewhere); Qwen3-MoE's attention, and
        // its sparse layers' router and experts' `gate_up_proj` and `down_proj`.
        let peft_weights = reference
            .names()
            .iter()
            .filter(|k| k.starts_with(&format!("{arch}.grad.")))
            .count();
        assert_eq!(n, peft_weights, "{arch}");
        let per_layer = match arch {
            "phi3" => 4,
            "qwen3_moe" => 4,
            _ => 7,
        };
        let sparse = model
            .layers
            .iter()
            .filter(|l| matches!(l.mlp, train_model::FeedForward::Sparse(_)))
            .count();
        assert_eq!(n, 2 * per_layer * model.layers.len() + 2 * 3 * sparse);
        println!(
            "{arch}: loss {loss:.7} vs peft {want_loss:.7}; {n} adapter gradients, worst relative difference {worst:.2e}"
        );
    }
}

/// Two data-parallel workers (burn's collective all-reduce, both on the CPU) with batches of 4
/// train exactly as one worker with batches of 8: same losses, gradient norms and weights.
#[test]
fn two_data_parallel_workers_equal_one_worker_with_the_doubled_batch() {
    let run_with = |batch_size: usize, devices: usize| {
        let out = tempfile::tempdir().unwrap();
        let (m, raw) = model();
        let cfg = TrainerConfig {
            batch_size,
            gradient_accumulation_steps: 1,
            max_steps: Some(4),
            skip_validation: true,
            ..config()
        };
        let mut s = setup(out.path(), m, raw, cfg);
        s.parallelism = Parallelism::new(vec![Default::default(); devices], None).unwrap();
        let summary = run(s, None, &mut Recorder::new(), &RunControl::new()).unwrap();
        assert_eq!(summary.status, RunStatus::Completed);
        let rows = metric_rows(out.path());
        let options = LoadOptions {
            precision: Precision::Fp32,
            ..LoadOptions::default()
        };
        let trained = load_pretrained::<Flex>(out.path(), &options, &Default::default())
            .unwrap()
            .model;
        let mut weights = Vec::new();
        trained.visit_named(|p| match p {
            NamedParam::Vector(_, t) => {
                weights.extend(t.val().into_data().to_vec::<f32>().unwrap());
            }
            NamedParam::Matrix(_, t) => {
                weights.extend(t.val().into_data().to_vec::<f32>().unwrap());
            }
        });
        (rows, weights)
    };
    let (one, w1) = run_with(8, 1);
    let (two, w2) = run_with(4, 2);
    assert_eq!(one.len(), 4);
    assert_eq!(two.len(), 4);
    let mut worst = 0f64;
    for (a, b) in one.iter().zip(&two) {
        for field in ["loss", "grad_norm", "tokens", "label_tokens"] {
            let (x, y) = (a[field].as_f64().unwrap(), b[field].as_f64().unwrap());
            let rel = (x - y).abs() / x.abs().max(1e-12);
            println!(
                "step {}: {field} one worker {x:.7}, two workers {y:.7} (relative {rel:.1e})",
                a["step"]
            );
            assert!(rel <= 1e-5, "step {}: {field} {x} vs {y}", a["step"]);
            worst = worst.max(rel);
        }
    }
    // The updates (trained − initial weights) of both runs agree: the few gradient components
    // near zero, where AdamW's m / √v is sensitive to the summation order, stay within 1e-3 of
    // the update's norm.
    let (m0, _) = model();
    let mut w0 = Vec::new();
    m0.visit_named(|p| match p {
        NamedParam::Vector(_, t) => w0.extend(t.val().into_data().to_vec::<f32>().unwrap()),
        NamedParam::Matrix(_, t) => w0.extend(t.val().into_data().to_vec::<f32>().unwrap()),
    });
    let norm =
        |v: &mut dyn Iterator<Item = f32>| v.map(|x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let update = norm(&mut w1.iter().zip(&w0).map(|(a, b)| a - b));
    let apart = norm(&mut w1.iter().zip(&w2).map(|(a, b)| a - b));
    let max_weight_diff = w1
        .iter()
        .zip(&w2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!(
        "data parallel: worst relative difference of logged values {worst:.1e}; after 4 steps the weights differ by {:.1e} of the update's norm ({update:.3e}), at most {max_weight_diff:.1e} in one weight",
        apart / update
    );
    assert!(
        update > 0.0 && apart <= 1e-3 * update,
        "updates differ: {apart} vs {update}"
    );
}

/// Several machines need this machine's place (rank, orchestrator, its own address), checked
/// before anything connects; each mistake names its field.
#[test]
fn a_multi_machine_run_checks_its_cluster_settings() {
    let attempt =
        |cluster: Cluster| match Parallelism::<B>::new(vec![Default::default()], Some(cluster)) {
            Err(RunnerError::Config { field, message }) => format!("{field}: {message}"),
            other => panic!("expected a configuration error, got {other:?}"),
        };
    let good = Cluster {
        nodes: 2,
        node_rank: 1,
        orchestrator: "ws://127.0.0.1:3000".into(),
        node_address: "127.0.0.1:3001".into(),
    };
    // Checked once, where the value is made: a run gets only a valid one.
    let p = Parallelism::<B>::new(vec![Default::default(); 2], Some(good.clone())).unwrap();
    assert_eq!((p.devices().len(), p.nodes(), p.workers()), (2, 2, 4));
    let e = attempt(Cluster {
        node_rank: 2,
        ..good.clone()
    });
    assert_eq!(e, "node_rank: 2 is not below the 2 nodes");
    let e = attempt(Cluster {
        nodes: 0,
        ..good.clone()
    });
    assert!(e.starts_with("nodes: 0 is outside"), "{e}");
    let e = attempt(Cluster {
        orchestrator: "http://host/x".into(),
        ..good.clone()
    });
    assert!(
        e.starts_with("orchestrator: `http://host/x` is not HOST:PORT"),
        "{e}"
    );
    let e = attempt(Cluster {
        node_address: "127.0.0.1:0".into(),
        ..good
    });
    assert!(
        e.starts_with("node_address: `127.0.0.1:0` is not HOST:PORT"),
        "{e}"
    );
    let e = Parallelism::<B>::new(Vec::new(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("devices"), "{e}");
}
