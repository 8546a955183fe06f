//! The router's load-balancing loss of a mixture of experts in DPO and GRPO against TRL's
//! trainers on the tiny Qwen3-MoE (`tests/fixtures/moe.reference.json`, written by
//! `xtask/fixtures/make_fixtures.py --moe-out`): TRL adds `router_aux_loss_coef` × the model's
//! `aux_loss` to every MoE model's loss, with the config's coefficient (0.001 here, although the
//! config's `output_router_logits` is false), a coefficient given to the trainer, or none (0).
//! Per case: the loss, the total gradient norm and that of every parameter outside the experts
//! (the router's included), one micro-batch of two pairs / eight completions.
#![cfg(feature = "cpu")]

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use serde_json::Value;
use train_model::{CausalLm, LoadOptions, Precision, load_pretrained};
use train_runner::{
    Collate, Contribution, Dpo, DpoConfig, Grpo, GrpoConfig, GrpoLossType, Objective, PairRow,
    Rollout, completion_logps, weigh_router_loss,
};

use crate::grpo::{completions_batch, floats, ids, norms_against, rolled_out, sequence};

type B = Autodiff<Flex>;

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train-model/tests/fixtures/qwen3_moe")
}

/// A fixture model in f32.
fn load(dir: &Path) -> CausalLm<B> {
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    load_pretrained::<B>(dir, &options, &Default::default())
        .unwrap()
        .model
}

/// The fixture with the router's loss weighted as a run with `coef` weighs it.
fn model(coef: Option<f64>) -> CausalLm<B> {
    let mut model = load(&fixture_dir());
    weigh_router_loss(&mut model, coef).unwrap();
    model
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe.reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The loss, gradients and logged router term (`aux_loss`, after the objective's `metrics`
/// own metrics) against the case's TRL figures; returns the loss and the gradient norm.
fn compare(
    what: &str,
    policy: &CausalLm<B>,
    contribution: &Contribution,
    metrics: usize,
    case: &Value,
) -> (f64, f64) {
    match case["aux_loss"].as_f64() {
        Some(want) => {
            assert_eq!(contribution.metrics.len(), metrics + 1, "{what}");
            let got = contribution.metrics[metrics];
            println!("{what}: aux_loss {got:.7} vs TRL {want:.7}");
            assert!(
                (got - want).abs() <= 1e-5 * want,
                "{what}: aux_loss {got} vs {want}"
            );
        }
        None => assert_eq!(contribution.metrics.len(), metrics, "{what}"),
    }
    let want_loss = case["loss"].as_f64().unwrap();
    let loss = contribution.loss;
    assert!(
        (loss - want_loss).abs() <= 2e-6 * want_loss.abs().max(1e-2),
        "{what}: loss {loss} vs TRL's {want_loss}"
    );
    let (total, worst_param, compared) = norms_against(policy, &contribution.grads, case);
    let want_total = case["grad_norm"].as_f64().unwrap();
    let worst = worst_param.max((total - want_total).abs() / want_total);
    let want_norms = case["param_grad_norms"].as_object().unwrap();
    assert_eq!(compared, want_norms.len(), "{what}: parameters compared");
    println!(
        "{what}: loss {loss:.8} vs TRL {want_loss:.8}; grad norm {total:.6} vs {want_total:.6}; \
         worst of {compared} parameters {worst:.2e}"
    );
    assert!(worst < 1e-4, "{what}: gradient norms differ by {worst:.2e}");
    (loss, total)
}

fn coef_of(case: &Value) -> Option<f64> {
    case["router_aux_loss_coef"].as_f64()
}

#[test]
fn dpo_adds_the_routers_loss_as_trl() {
    let r = reference();
    let config = DpoConfig {
        beta: r["dpo"]["beta"].as_f64().unwrap(),
        ..DpoConfig::default()
    };
    let objective = Dpo {
        config,
        validation: &[],
    };
    let pairs = r["dpo"]["pairs"].as_array().unwrap();
    let rows = |refs: &[(f64, usize)]| {
        let n = pairs.len();
        let rows = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| PairRow {
                chosen: sequence(i, &ids(&p["prompt_ids"]), &ids(&p["chosen_ids"])),
                rejected: sequence(i, &ids(&p["prompt_ids"]), &ids(&p["rejected_ids"])),
                ref_chosen: refs.get(i).map_or(0.0, |r| r.0),
                ref_rejected: refs.get(n + i).map_or(0.0, |r| r.0),
            })
            .collect();
        PairRow::collate(rows, 0)
    };
    let device = Default::default();
    let mut losses = Vec::new();
    for case in r["dpo"]["cases"].as_array().unwrap() {
        let coef = coef_of(case);
        let policy = model(coef);
        // The reference model is the policy itself: its log-probabilities are the policy's.
        let refs = completion_logps(&policy, &rows(&[]).batch);
        let batch = rows(&refs);
        let contribution = objective.gradients(&policy, &[&batch], pairs.len() as f64, &device);
        losses.push(compare(
            &format!("dpo, coefficient {coef:?}"),
            &policy,
            &contribution,
            Objective::<B>::metric_names(&objective).len(),
            case,
        ));
    }
    // The term matters: the loss and the gradients differ with each coefficient.
    assert!(losses[0].0 > losses[2].0 + 1e-3 && losses[1].0 > losses[0].0 + 0.5);
    assert!((losses[0].1 - losses[2].1).abs() > 1e-5);
}

#[test]
fn grpo_adds_the_routers_loss_as_trl() {
    let r = reference();
    let g = &r["grpo"];
    let n = g["num_generations"].as_u64().unwrap() as usize;
    let prompts: Vec<Vec<u32>> = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let completions: Vec<Vec<u32>> = g["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let batch = completions_batch(&prompts, &completions, n);
    let tokens: usize = completions.iter().map(Vec::len).sum();
    let tokenizer = tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json")).unwrap();
    let device = Default::default();
    let mut losses = Vec::new();
    for case in g["cases"].as_array().unwrap() {
        let coef = coef_of(case);
        let policy = model(coef);
        let config = GrpoConfig {
            num_generations: n,
            loss_type: GrpoLossType::Grpo,
            beta: 0.0,
            ..GrpoConfig::default()
        };
        let objective = Grpo::<B>::new(config, &[], &tokenizer, Vec::new(), Vec::new(), None, 0);
        let generation_metrics = Objective::<B>::metric_names(&objective).len() - 3;
        let pb = rolled_out(
            &prompts[0],
            Rollout {
                batch: batch.clone(),
                advantages: floats(&g["advantages"]),
                old_logps: None,
                ref_logps: None,
                step_tokens: tokens,
                generation_metrics: vec![0.0; generation_metrics],
                samples: Vec::new(),
            },
        );
        let units = Objective::<B>::units(&objective, &pb);
        let contribution = objective.gradients(&policy, &[&pb], units as f64, &device);
        losses.push(compare(
            &format!("grpo, coefficient {coef:?}"),
            &policy,
            &contribution,
            Objective::<B>::metric_names(&objective).len(),
            case,
        ));
    }
    assert!(losses[0].0 > losses[2].0 + 1e-3 && losses[1].0 > losses[0].0 + 0.5);
}

/// A run's rule: a dense model refuses a weight, and 0 turns a mixture's loss off.
#[test]
fn a_dense_model_refuses_a_weight() {
    let mut dense =
        load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../train-model/tests/fixtures/qwen2"));
    let err = weigh_router_loss(&mut dense, Some(0.01)).unwrap_err();
    assert!(err.to_string().contains("router_aux_loss_coef"), "{err}");
    weigh_router_loss(&mut dense, Some(0.0)).unwrap();
    weigh_router_loss(&mut dense, None).unwrap();
    let moe = model(Some(0.0)).config.moe.unwrap();
    assert!(!moe.output_router_logits);
    let moe = model(None).config.moe.unwrap();
    assert!(moe.output_router_logits && moe.router_aux_loss_coef == 0.001);
}
