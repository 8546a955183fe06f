//! The DPO objective: its loss and gradients (per-row fused LM head + NLL, combined with each
//! pair's derivatives) against plain autodiff through the materialised logits, for every loss
//! type, padded and padding-free; the completions' log-probabilities the same either way.
#![cfg(feature = "cpu")]

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use train_data::{Example, IGNORE_INDEX, Sequence};
use train_model::{AttentionImpl, CausalLm, LoadOptions, NamedParam, Precision, load_pretrained};
use train_runner::{
    Collate, Dpo, DpoConfig, DpoLossType, Objective, PairBatch, PairLogps, PairRow, batch_tensors,
    completion_logps, dpo_pair_loss,
};

type B = Autodiff<Flex>;

fn model() -> CausalLm<B> {
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../train-model/tests/fixtures/qwen2");
    load_pretrained::<B>(&dir, &options, &Default::default())
        .unwrap()
        .model
}

/// A conversation-like row: `prompt` tokens, then `completion` trained tokens.
fn row(seed: usize, prompt: usize, completion: usize) -> Sequence {
    let len = prompt + completion;
    let input_ids: Vec<u32> = (0..len)
        .map(|t| ((seed * 37 + t * 11) % 900) as u32 + 3)
        .collect();
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(t, &id)| if t < prompt { IGNORE_INDEX } else { id as i32 })
        .collect();
    let e = Example {
        row: seed,
        input_ids,
        labels,
    };
    Sequence::pack(&[&e])
}

/// Three pairs of different lengths (so the batch is padded), with reference log-probabilities
/// near the policy's.
fn pairs() -> PairBatch {
    let rows = vec![
        PairRow {
            chosen: row(1, 5, 4),
            rejected: row(2, 5, 7),
            ref_chosen: -27.0,
            ref_rejected: -50.5,
        },
        PairRow {
            chosen: row(3, 8, 3),
            rejected: row(4, 8, 2),
            ref_chosen: -20.25,
            ref_rejected: -13.0,
        },
        PairRow {
            chosen: row(5, 3, 9),
            rejected: row(6, 3, 5),
            ref_chosen: -61.0,
            ref_rejected: -35.0,
        },
    ];
    PairRow::collate(rows, 0)
}

/// Summed log-probability of every row's completion, as autodiff tensors through the logits.
fn logps_autodiff(model: &CausalLm<B>, batch: &PairBatch) -> (Tensor<B, 1>, Vec<(f64, usize)>) {
    let device = Default::default();
    let (input, labels) = batch_tensors::<B>(&batch.batch, &device);
    let logits = model.forward(&input);
    let [rows, s, v] = logits.dims();
    let logp = log_softmax(logits, 2).slice([0..rows, 0..s - 1, 0..v]);
    let targets: Tensor<B, 2, Int> = labels.slice([0..rows, 1..s]);
    let mask = targets.clone().not_equal_elem(IGNORE_INDEX).float();
    let picked = logp
        .gather(2, targets.clone().clamp_min(0).unsqueeze_dim(2))
        .squeeze_dim::<2>(2);
    let per_row = (picked * mask.clone()).sum_dim(1).squeeze_dim::<1>(1);
    let values: Vec<f32> = per_row.clone().into_data().to_vec().unwrap();
    let counts: Vec<f32> = mask.sum_dim(1).into_data().to_vec().unwrap();
    let out = values
        .iter()
        .zip(&counts)
        .map(|(v, c)| (f64::from(*v), *c as usize))
        .collect();
    (per_row, out)
}

fn scaled(config: &DpoConfig, value: f64, tokens: usize) -> f64 {
    if config.loss_type.averages_tokens() {
        value / tokens as f64
    } else {
        value
    }
}

/// The loss and gradients by autodiff: `Σ_r (∂loss/∂logp_r) · logp_r` has the loss's gradient.
fn reference(model: &CausalLm<B>, batch: &PairBatch, config: &DpoConfig) -> (f64, GradientsParams) {
    let (per_row, logps) = logps_autodiff(model, batch);
    let n = batch.reference.len();
    let mut weights = vec![0f32; 2 * n];
    let mut loss = 0.0;
    for i in 0..n {
        let (c, nc) = logps[i];
        let (r, nr) = logps[n + i];
        let (rc, rr) = batch.reference[i];
        let t = dpo_pair_loss(
            config,
            &PairLogps {
                chosen: scaled(config, c, nc),
                rejected: scaled(config, r, nr),
                ref_chosen: scaled(config, rc, nc),
                ref_rejected: scaled(config, rr, nr),
            },
        );
        loss += t.loss / n as f64;
        weights[i] = (scaled(config, t.d_chosen, nc) / n as f64) as f32;
        weights[n + i] = (scaled(config, t.d_rejected, nr) / n as f64) as f32;
    }
    let w = Tensor::<B, 1>::from_data(TensorData::new(weights, [2 * n]), &Default::default());
    let surrogate = (per_row * w).sum();
    (
        loss,
        GradientsParams::from_grads(surrogate.backward(), model),
    )
}

fn flat_grads(model: &CausalLm<B>, grads: &GradientsParams) -> Vec<f32> {
    let mut out = Vec::new();
    model.visit_named(|p| {
        let g = match p {
            NamedParam::Vector(_, t) => grads.get::<Flex, 1>(t.id).map(burn::Tensor::into_data),
            NamedParam::Matrix(_, t) => grads.get::<Flex, 2>(t.id).map(burn::Tensor::into_data),
        };
        if let Some(g) = g {
            out.extend(g.to_vec::<f32>().unwrap());
        }
    });
    out
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn loss_and_gradients_equal_autodiff_through_the_logits() {
    let fused = model();
    let padded = fused.clone().with_attention(AttentionImpl::Standard);
    let batch = pairs();
    assert_eq!(batch.batch.batch_size, 6);
    assert!(batch.batch.padding_free().is_some(), "the pairs are padded");
    let device = Default::default();
    for (loss_type, label_smoothing) in [
        (DpoLossType::Sigmoid, 0.0),
        (DpoLossType::Sigmoid, 0.2),
        (DpoLossType::Robust, 0.1),
        (DpoLossType::Hinge, 0.0),
        (DpoLossType::Ipo, 0.0),
    ] {
        let config = DpoConfig {
            beta: 0.5,
            loss_type,
            label_smoothing,
        };
        let objective = Dpo {
            config,
            validation: &[],
        };
        let (want_loss, want) = reference(&padded, &batch, &config);
        let want = flat_grads(&padded, &want);
        for (name, m) in [("padding-free", &fused), ("padded", &padded)] {
            let (loss, grads) = objective.gradients(m, &[&batch], 3.0, &device);
            let got = flat_grads(m, &grads);
            let r = rel(&got, &want);
            println!(
                "{loss_type:?} ε {label_smoothing}, {name}: loss {loss:.8} vs {want_loss:.8}, gradients {r:.2e}"
            );
            assert!(
                (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1e-3),
                "{loss_type:?} {name}: {loss} vs {want_loss}"
            );
            assert!(r <= 1e-4, "{loss_type:?} {name}: gradients differ by {r}");
            assert!(want.iter().any(|g| *g != 0.0));
        }
    }
}

#[test]
fn completion_logps_are_the_same_padded_or_padding_free() {
    let fused = model();
    let padded = fused.clone().with_attention(AttentionImpl::Standard);
    let batch = pairs();
    let (_, want) = logps_autodiff(&padded, &batch);
    let a = completion_logps(&fused.valid(), &batch.batch);
    let b = completion_logps(&padded.valid(), &batch.batch);
    for ((x, y), (w, n)) in a.iter().zip(&b).zip(&want) {
        assert_eq!((x.1, y.1), (*n, *n));
        assert!((x.0 - w).abs() <= 1e-4 * w.abs(), "{x:?} vs {w}");
        assert!((y.0 - w).abs() <= 1e-4 * w.abs(), "{y:?} vs {w}");
    }
    // Units and tokens of the micro-batch, and the evaluation over it.
    let objective = Dpo {
        config: DpoConfig::default(),
        validation: std::slice::from_ref(&batch),
    };
    assert_eq!(Objective::<B>::units(&objective, &batch), 3);
    let score = Objective::<B>::evaluate(&objective, &fused.valid()).unwrap();
    assert_eq!(score.units, 3);
    assert!(score.loss.is_finite() && score.loss > 0.0);
}
