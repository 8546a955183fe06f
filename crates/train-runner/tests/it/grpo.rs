//! The GRPO objective against TRL's `GRPOTrainer` on the tiny Qwen2: for fixed prompts,
//! completions and rewards (`tests/fixtures/grpo.reference.json`, written by
//! `xtask/fixtures/make_fixtures.py --grpo-out`), the advantages, the loss, the gradient of
//! every parameter and the KL / clipping metrics of each loss type, with and without an old
//! policy and a KL reference.
#![cfg(feature = "cpu")]

use std::path::Path;
use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::optim::GradientsParams;
use serde_json::Value;
use train_data::{Batch, Example, IGNORE_INDEX, PromptRow, Sequence};
use train_model::{CausalLm, LoadOptions, NamedParam, Precision, load_pretrained};
use train_runner::{
    Contribution, Grpo, GrpoConfig, GrpoLossType, GrpoRow, Objective, PromptBatch, Rollout,
    ScaleRewards, group_advantages,
};

type B = Autodiff<Flex>;

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train-model/tests/fixtures/qwen2")
}

fn model() -> CausalLm<B> {
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    load_pretrained::<B>(&fixture_dir(), &options, &Default::default())
        .unwrap()
        .model
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/grpo.reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub(crate) fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

pub(crate) fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn per_token(v: &Value) -> Option<Vec<Vec<f32>>> {
    v.as_array().map(|rows| {
        rows.iter()
            .map(|r| floats(r).into_iter().map(|x| x as f32).collect())
            .collect()
    })
}

/// `prompt` then `completion`, the completion trained.
pub(crate) fn sequence(row: usize, prompt: &[u32], completion: &[u32]) -> Sequence {
    let mut input_ids = prompt.to_vec();
    input_ids.extend(completion);
    let mut labels = vec![IGNORE_INDEX; prompt.len()];
    labels.extend(completion.iter().map(|&t| t as i32));
    Sequence::pack(&[&Example {
        row,
        input_ids,
        labels,
    }])
}

/// The completions, `g` a prompt, each after its prompt, in one padded batch.
pub(crate) fn completions_batch(prompts: &[Vec<u32>], completions: &[Vec<u32>], g: usize) -> Batch {
    let sequences = completions
        .iter()
        .enumerate()
        .map(|(i, c)| sequence(i, &prompts[i / g], c))
        .collect();
    Batch::collate(sequences, 0, None)
}

/// A micro-batch of two prompts whose sampling gave `rollout`.
pub(crate) fn rolled_out(prompt: &[u32], rollout: Rollout) -> PromptBatch {
    let row = Arc::new(PromptRow {
        prompt: Vec::new(),
        columns: serde_json::Map::new(),
        location: None,
    });
    PromptBatch {
        prompts: vec![
            GrpoRow {
                prompt_ids: prompt.to_vec(),
                row,
            };
            2
        ],
        pad_id: 0,
        rollout: Some(Arc::new(rollout)),
    }
}

/// Against a TRL reference `case` (its `param_grad_norms`): the total gradient norm of
/// `grads`, the worst relative difference of one parameter's norm from TRL's, and how many
/// parameters both have.
pub(crate) fn norms_against(
    model: &CausalLm<B>,
    grads: &GradientsParams,
    case: &Value,
) -> (f64, f64, usize) {
    let norms = grad_norms(model, grads);
    let total = norms.iter().map(|(_, n)| n * n).sum::<f64>().sqrt();
    let want_norms = case["param_grad_norms"].as_object().unwrap();
    let mut worst = 0f64;
    let mut compared = 0;
    for (param, norm) in &norms {
        if let Some(want) = want_norms.get(param).and_then(Value::as_f64) {
            worst = worst.max((norm - want).abs() / want.max(1e-3));
            compared += 1;
        }
    }
    (total, worst, compared)
}

pub(crate) fn grad_norms(model: &CausalLm<B>, grads: &GradientsParams) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    model.visit_named(|p| {
        let (name, data) = match p {
            NamedParam::Vector(n, t) => {
                (n, grads.get::<Flex, 1>(t.id).map(burn::Tensor::into_data))
            }
            NamedParam::Matrix(n, t) => {
                (n, grads.get::<Flex, 2>(t.id).map(burn::Tensor::into_data))
            }
        };
        if let Some(d) = data {
            let v: Vec<f32> = d.to_vec().unwrap();
            let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            out.push((name.to_string(), norm));
        }
    });
    out
}

#[test]
fn loss_gradients_and_metrics_equal_trls() {
    let r = reference();
    let g = r["num_generations"].as_u64().unwrap() as usize;
    let prompts: Vec<Vec<u32>> = r["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let completions: Vec<Vec<u32>> = r["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let rewards = floats(&r["rewards"]);
    let want_adv = floats(&r["advantages"]);
    let (advantages, _) = group_advantages(&rewards, g, ScaleRewards::Group);
    for (a, b) in advantages.iter().zip(&want_adv) {
        assert!((a - b).abs() < 1e-6, "advantage {a} vs TRL's {b}");
    }
    let batch = completions_batch(&prompts, &completions, g);
    let tokens: usize = completions.iter().map(Vec::len).sum();
    let tokenizer = tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json")).unwrap();
    let policy = model();
    let device = Default::default();
    for (case_index, case) in r["cases"].as_array().unwrap().iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let mut config: GrpoConfig = serde_json::from_value(case["settings"].clone()).unwrap();
        config.num_generations = g;
        config.max_new_tokens = r["max_completion_length"].as_u64().unwrap() as usize;
        config.temperature = case["temperature"].as_f64().unwrap();
        let old_logps = per_token(&case["old_logps"]);
        let ref_logps = per_token(&case["ref_logps"]);
        // Every other case with chunks of 5 completion tokens (the LM head and the token
        // losses are computed a chunk at a time).
        let mut objective =
            Grpo::<B>::new(config, &[], &tokenizer, Vec::new(), Vec::new(), None, 0);
        if case_index % 2 == 1 {
            objective = objective.with_logit_chunk(5);
        }
        let names = Objective::<B>::metric_names(&objective);
        let generation_metrics = names.len() - 3 - usize::from(config.beta != 0.0);
        let pb = rolled_out(
            &prompts[0],
            Rollout {
                batch: batch.clone(),
                advantages: advantages.clone(),
                old_logps,
                ref_logps,
                step_tokens: tokens,
                generation_metrics: vec![0.0; generation_metrics],
                samples: Vec::new(),
            },
        );
        let units = Objective::<B>::units(&objective, &pb);
        assert_eq!(
            units,
            if config.loss_type == GrpoLossType::Dapo {
                tokens
            } else {
                completions.len()
            }
        );
        let Contribution {
            loss,
            metrics,
            grads,
        } = objective.gradients(&policy, &[&pb], units as f64, &device);
        let want_loss = case["loss"].as_f64().unwrap();
        assert!(
            (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1e-2),
            "{name}: loss {loss} vs TRL's {want_loss}"
        );
        let (total, worst_param, compared) = norms_against(&policy, &grads, case);
        let want_total = case["grad_norm"].as_f64().unwrap();
        let worst = worst_param.max((total - want_total).abs() / want_total);
        let want_norms = case["param_grad_norms"].as_object().unwrap();
        assert!(
            compared >= want_norms.len() - 1,
            "{name}: {compared} parameters compared"
        );
        assert!(
            worst < 1e-4,
            "{name}: gradient norms differ from TRL's by {worst:.2e} relative"
        );
        for (metric, want) in case["metrics"].as_object().unwrap() {
            let at = names.iter().position(|n| n == metric).unwrap();
            let want = want.as_f64().unwrap();
            assert!(
                (metrics[at] - want).abs() < 1e-5 * want.abs().max(1.0),
                "{name} {metric}: {} vs TRL's {want}",
                metrics[at]
            );
        }
        println!(
            "{name}: loss {loss:.8} vs TRL {want_loss:.8}; grad norm {total:.6} vs {want_total:.6}; worst parameter {worst:.2e} ({compared} parameters)"
        );
    }
}

/// Raises `flag` on its first token of the `at`-th generation, and counts the tokens it sees in
/// that generation afterwards.
#[derive(Debug)]
struct StopDuring {
    flag: Arc<std::sync::atomic::AtomicBool>,
    generation: usize,
    at: usize,
    after: Arc<std::sync::atomic::AtomicUsize>,
}

impl train_logits::LogitsProcessor for StopDuring {
    fn name(&self) -> &'static str {
        "stop_during"
    }

    fn start(&mut self, _rows: usize) {
        self.generation += 1;
    }

    fn process(
        &mut self,
        row: usize,
        _ctx: &train_logits::RowContext<'_>,
        _logits: &mut [f32],
    ) -> train_logits::Result<()> {
        use std::sync::atomic::Ordering;
        if self.generation == self.at && row == 0 && self.flag.swap(true, Ordering::SeqCst) {
            self.after.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A stop requested while GRPO samples a step's completions (Ctrl-C) abandons the sampling at
/// once and stops the run as between steps: the last completed step is saved, and a resume goes
/// on from it.
#[test]
fn a_stop_during_sampling_saves_the_last_step_at_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Quiet;
    impl train_runner::TrainObserver<B> for Quiet {}
    let out = tempfile::tempdir().unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json")).unwrap();
    let row = Arc::new(PromptRow {
        prompt: Vec::new(),
        columns: serde_json::Map::new(),
        location: None,
    });
    let prompts: Vec<GrpoRow> = (0..4)
        .map(|i| GrpoRow {
            prompt_ids: vec![3 + i, 17, 40 + i, 9],
            row: row.clone(),
        })
        .collect();
    let control = train_runner::RunControl::new();
    let after = Arc::new(AtomicUsize::new(0));
    let processor = StopDuring {
        flag: control.flag(),
        generation: 0,
        at: 2,
        after: Arc::clone(&after),
    };
    let config = GrpoConfig {
        num_generations: 2,
        max_new_tokens: 400,
        ..GrpoConfig::default()
    };
    let objective = Grpo::<B>::new(
        config,
        &[],
        &tokenizer,
        Vec::new(),
        vec![Box::new(processor)],
        None,
        0,
    )
    .with_stop(control.flag());
    let (raw, _) = train_model::ModelConfig::from_file(&fixture_dir().join("config.json")).unwrap();
    let setup = train_runner::TrainSetup {
        model: model(),
        raw_config: raw.to_hf_json(),
        companions_from: fixture_dir(),
        source_dtype: train_model::StorageDtype::F32,
        train: train_data::TrainRows::default(),
        validation: Vec::new(),
        pad_id: 0,
        config: train_runner::TrainerConfig {
            output_dir: out.path().to_path_buf(),
            batch_size: 1,
            max_steps: Some(4),
            save_steps: 100,
            skip_validation: true,
            ..train_runner::TrainerConfig::default()
        },
        data_fingerprint: "prompts".into(),
        overwrite: false,
        parallelism: train_runner::Parallelism::single(Default::default()),
        inputs: Vec::new(),
    };
    let summary =
        train_runner::run_grpo(setup, prompts, &objective, None, &mut Quiet, &control).unwrap();
    assert_eq!(summary.status, train_runner::RunStatus::Stopped);
    assert_eq!(
        summary.global_step, 1,
        "the step being sampled is not counted"
    );
    assert!(out.path().join("checkpoint-1/trainer_state.json").exists());
    // No token of the interrupted generation after the one that raised the flag (400 allowed).
    assert_eq!(after.load(Ordering::SeqCst), 0);
}
