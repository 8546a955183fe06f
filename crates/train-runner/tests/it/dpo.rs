//! The DPO objective: its loss and gradients (per-row fused LM head + NLL, combined with each
//! pair's derivatives) against plain autodiff through the materialised logits, for every loss
//! type, padded and padding-free; the completions' log-probabilities the same either way; the
//! tokenization, log-probabilities, losses and rewards of real pairs against TRL's DPOTrainer;
//! two data-parallel workers against one.
#![cfg(feature = "cpu")]

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use train_data::{ChatTokenizer, Example, IGNORE_INDEX, Sequence, load_preferences};
use train_model::{AttentionImpl, CausalLm, LoadOptions, NamedParam, Precision, load_pretrained};
use train_runner::{
    Collate, Contribution, DPO_METRICS, Dpo, DpoConfig, DpoLossType, ORPO_METRICS, Objective,
    PairBatch, PairLogps, PairRow, batch_tensors, completion_logps, dpo_pair_loss,
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
    logps_autodiff_of(model, batch, false)
}

/// Summed log-probability of every row's completion (or, with `whole`, of every token of the
/// conversation after the first: what ORPO's NLL scores), as autodiff tensors.
fn logps_autodiff_of(
    model: &CausalLm<B>,
    batch: &PairBatch,
    whole: bool,
) -> (Tensor<B, 1>, Vec<(f64, usize)>) {
    let device = Default::default();
    let (input, labels) = batch_tensors::<B>(&batch.batch, &device);
    let logits = model.forward(&input);
    let [rows, s, v] = logits.dims();
    let logp = log_softmax(logits, 2).slice([0..rows, 0..s - 1, 0..v]);
    let (targets, mask) = if whole {
        // Every real token after the first: the padding of a row is segment 1.
        let segments: Vec<i64> = batch
            .batch
            .segment_ids
            .iter()
            .map(|&x| i64::from(x))
            .collect();
        let segments =
            Tensor::<B, 2, Int>::from_data(TensorData::new(segments, [rows, s]), &device);
        let mask = segments.slice([0..rows, 1..s]).equal_elem(0).float();
        (input.input_ids.clone().slice([0..rows, 1..s]), mask)
    } else {
        let targets: Tensor<B, 2, Int> = labels.slice([0..rows, 1..s]);
        let mask = targets.clone().not_equal_elem(IGNORE_INDEX).float();
        (targets, mask)
    };
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

/// The loss and gradients by autodiff: `Σ_r (∂loss/∂logp_r) · logp_r` has the loss's gradient.
/// The loss and gradients by autodiff (`Σ_r (∂loss/∂logp_r) · logp_r` has the loss's
/// gradient), and TRL's metrics (means over the pairs).
fn reference(
    model: &CausalLm<B>,
    batch: &PairBatch,
    config: &DpoConfig,
) -> (f64, GradientsParams, Vec<f64>) {
    let orpo = config.loss_type == DpoLossType::Orpo;
    let averaged = matches!(config.loss_type, DpoLossType::Simpo | DpoLossType::Orpo);
    let (per_row, logps) = logps_autodiff(model, batch);
    let (whole_rows, whole) = logps_autodiff_of(model, batch, true);
    let n = batch.reference.len();
    let mut weights = vec![0f32; 2 * n];
    let mut whole_weights = vec![0f32; 2 * n];
    let mut loss = 0.0;
    let mut metrics = vec![0f64; if orpo { 9 } else { 6 }];
    for i in 0..n {
        let (c, nc) = logps[i];
        let (r, nr) = logps[n + i];
        let (rc, rr) = batch.reference[i];
        let chosen_nll = -whole[i].0 / whole[i].1 as f64;
        let t = dpo_pair_loss(
            config,
            &PairLogps {
                chosen: c,
                rejected: r,
                ref_chosen: rc,
                ref_rejected: rr,
                chosen_tokens: nc,
                rejected_tokens: nr,
                chosen_nll,
            },
        );
        loss += t.loss / n as f64;
        if orpo {
            whole_weights[i] = (-1.0 / (whole[i].1 as f64 * n as f64)) as f32;
        }
        let mut values = vec![
            t.chosen_reward,
            t.rejected_reward,
            t.chosen_reward - t.rejected_reward,
            if t.chosen_reward > t.rejected_reward {
                1.0
            } else {
                0.0
            },
            if averaged { c / nc as f64 } else { c },
            if averaged { r / nr as f64 } else { r },
        ];
        if orpo {
            let log_sigmoid = -(1.0 + (-t.log_odds).exp()).ln();
            values.extend([chosen_nll, log_sigmoid, t.log_odds]);
        }
        for (m, v) in metrics.iter_mut().zip(values) {
            *m += v / n as f64;
        }
        weights[i] = (t.d_chosen / n as f64) as f32;
        weights[n + i] = (t.d_rejected / n as f64) as f32;
    }
    let w = Tensor::<B, 1>::from_data(TensorData::new(weights, [2 * n]), &Default::default());
    let ww =
        Tensor::<B, 1>::from_data(TensorData::new(whole_weights, [2 * n]), &Default::default());
    let surrogate = (per_row * w).sum() + (whole_rows * ww).sum();
    (
        loss,
        GradientsParams::from_grads(surrogate.backward(), model),
        metrics,
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
        (DpoLossType::Simpo, 0.1),
        (DpoLossType::Orpo, 0.0),
    ] {
        let config = DpoConfig {
            beta: 0.5,
            loss_type,
            label_smoothing,
            ..DpoConfig::default()
        };
        let objective = Dpo {
            config,
            validation: &[],
        };
        let (want_loss, want, want_metrics) = reference(&padded, &batch, &config);
        let want = flat_grads(&padded, &want);
        for (name, m) in [("padding-free", &fused), ("padded", &padded)] {
            let Contribution {
                loss,
                metrics,
                grads,
            } = objective.gradients(m, &[&batch], 3.0, &device);
            let names = Objective::<B>::metric_names(&objective);
            let mut want_names: Vec<&str> = DPO_METRICS.to_vec();
            if loss_type == DpoLossType::Orpo {
                want_names.extend(ORPO_METRICS);
            }
            assert_eq!(names, want_names);
            assert_eq!(metrics.len(), want_metrics.len());
            for ((name, got), want) in names.iter().zip(&metrics).zip(&want_metrics) {
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{loss_type:?} {name}: {got} vs {want}"
                );
            }
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
    assert_eq!(score.metrics.len(), DPO_METRICS.len());
    // logps/chosen and logps/rejected: the means of the rows' log-probabilities.
    let mean = |rows: &[(f64, usize)]| rows.iter().map(|r| r.0).sum::<f64>() / 3.0;
    assert!((score.metrics[4] - mean(&a[..3])).abs() < 1e-9);
    assert!((score.metrics[5] - mean(&a[3..])).abs() < 1e-9);
    assert!(score.loss.is_finite() && score.loss > 0.0);
}

/// The committed TRL reference (`cargo xtask fixtures`: TRL's `DPOTrainer._compute_loss`, one
/// pair a batch, on the tiny Qwen2 against a perturbed copy of it).
fn trl_reference() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpo.reference.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `a` within 1e-5 of `b`, relative to `scale` (TRL logs float32 values).
fn close(a: f64, b: f64, scale: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-5 * scale.abs().max(1e-3),
        "{what}: {a} vs TRL's {b}"
    );
}

#[test]
fn pairs_tokenize_score_and_lose_as_in_trl() {
    let reference = trl_reference();
    let rows = reference["rows"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs.jsonl");
    let lines: Vec<String> = rows.iter().map(|r| r["pair"].to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let pairs = load_preferences(&path, &Default::default()).unwrap().pairs;
    let model_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../train-model/tests/fixtures/qwen2");
    let tok = ChatTokenizer::from_model_dir(&model_dir).unwrap();
    let policy = model().valid();
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let mut logps = Vec::new();
    for (pair, row) in pairs.iter().zip(rows) {
        // Our tokenization: the whole conversation rendered once, the final assistant turn labelled.
        let enc = tok.encode_pair(pair).unwrap();
        for (side, e) in [("chosen", &enc.chosen), ("rejected", &enc.rejected)] {
            let want_ids = ids(&row[format!("{side}_ids")]);
            let want_labels = ids(&row[format!("{side}_labels")]);
            let got_ids: Vec<i64> = e.input_ids.iter().map(|&t| i64::from(t)).collect();
            let got_labels: Vec<i64> = e.labels.iter().map(|&t| i64::from(t)).collect();
            assert_eq!(got_ids, want_ids, "{side} ids");
            assert_eq!(got_labels, want_labels, "{side} labels");
        }
        let batch = PairRow::collate(
            vec![PairRow {
                chosen: Sequence::pack(&[&Example {
                    row: 0,
                    input_ids: enc.chosen.input_ids.clone(),
                    labels: enc.chosen.labels.clone(),
                }]),
                rejected: Sequence::pack(&[&Example {
                    row: 0,
                    input_ids: enc.rejected.input_ids.clone(),
                    labels: enc.rejected.labels.clone(),
                }]),
                ref_chosen: 0.0,
                ref_rejected: 0.0,
            }],
            0,
        );
        let ours = completion_logps(&policy, &batch.batch);
        let torch = row["policy_logps"].as_array().unwrap();
        let (c, r) = (torch[0].as_f64().unwrap(), torch[1].as_f64().unwrap());
        close(ours[0].0, c, c, "chosen log-probability");
        close(ours[1].0, r, r, "rejected log-probability");
        logps.push(ours);
    }
    for (name, case) in reference["losses"].as_object().unwrap() {
        if name == "orpo" {
            // Its own test below: ORPO needs the chosen conversation's NLL too.
            continue;
        }
        let settings = &case["settings"];
        let config = DpoConfig {
            beta: settings["beta"].as_f64().unwrap(),
            loss_type: serde_json::from_value(settings["loss_type"][0].clone()).unwrap(),
            label_smoothing: settings["label_smoothing"].as_f64().unwrap_or(0.0),
            simpo_gamma: settings["simpo_gamma"].as_f64().unwrap_or(0.5),
        };
        let simpo = config.loss_type == DpoLossType::Simpo;
        for ((row, want), ours) in rows
            .iter()
            .zip(case["pairs"].as_array().unwrap())
            .zip(&logps)
        {
            let refs = row["ref_logps"].as_array().unwrap();
            let t = dpo_pair_loss(
                &config,
                &PairLogps {
                    chosen: ours[0].0,
                    rejected: ours[1].0,
                    ref_chosen: refs[0].as_f64().unwrap(),
                    ref_rejected: refs[1].as_f64().unwrap(),
                    chosen_tokens: ours[0].1,
                    rejected_tokens: ours[1].1,
                    chosen_nll: 0.0,
                },
            );
            let at = |k: &str| want[k].as_f64().unwrap();
            println!(
                "{name}: loss {:.7} vs TRL {:.7}, margin {:.7} vs {:.7}",
                t.loss,
                at("loss"),
                t.chosen_reward - t.rejected_reward,
                at("rewards/margins")
            );
            close(t.loss, at("loss"), at("loss"), &format!("{name} loss"));
            // A reward is β times a difference of log-probabilities: relative to those.
            let scale = config.beta * ours[0].0.abs().max(ours[1].0.abs());
            for (k, v) in [
                ("rewards/chosen", t.chosen_reward),
                ("rewards/rejected", t.rejected_reward),
                ("rewards/margins", t.chosen_reward - t.rejected_reward),
            ] {
                close(v, at(k), scale, &format!("{name} {k}"));
            }
            let accuracy = f64::from(u8::from(t.chosen_reward > t.rejected_reward));
            assert_eq!(
                accuracy,
                at("rewards/accuracies"),
                "{name} rewards/accuracies"
            );
            // TRL's CPOTrainer logs SimPO's per-token averages.
            let (c, r) = if simpo {
                (ours[0].0 / ours[0].1 as f64, ours[1].0 / ours[1].1 as f64)
            } else {
                (ours[0].0, ours[1].0)
            };
            close(c, at("logps/chosen"), c, &format!("{name} logps/chosen"));
            close(
                r,
                at("logps/rejected"),
                r,
                &format!("{name} logps/rejected"),
            );
        }
    }
}

/// ORPO against TRL's `ORPOTrainer` (its `get_batch_loss_metrics` and a backward pass, one pair
/// a batch, on our tokenization of the pairs): the objective's loss, metrics and the gradient
/// norm of every parameter.
#[test]
fn orpo_loss_metrics_and_gradients_equal_trls() {
    let reference = trl_reference();
    let rows = reference["rows"].as_array().unwrap();
    let case = &reference["losses"]["orpo"];
    let config = DpoConfig {
        beta: case["settings"]["beta"].as_f64().unwrap(),
        loss_type: DpoLossType::Orpo,
        ..DpoConfig::default()
    };
    let objective = Dpo {
        config,
        validation: &[],
    };
    let names = Objective::<B>::metric_names(&objective);
    let policy = model();
    let device = Default::default();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let labels = |v: &serde_json::Value| -> Vec<i32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect()
    };
    let side = |row: &serde_json::Value, side: &str| {
        Sequence::pack(&[&Example {
            row: 0,
            input_ids: ids(&row[format!("{side}_ids")]),
            labels: labels(&row[format!("{side}_labels")]),
        }])
    };
    for (row, want) in rows.iter().zip(case["pairs"].as_array().unwrap()) {
        let batch = PairRow::collate(
            vec![PairRow {
                chosen: side(row, "chosen"),
                rejected: side(row, "rejected"),
                ref_chosen: 0.0,
                ref_rejected: 0.0,
            }],
            0,
        );
        let Contribution {
            loss,
            metrics,
            grads,
        } = objective.gradients(&policy, &[&batch], 1.0, &device);
        let want_loss = want["loss"].as_f64().unwrap();
        close(loss, want_loss, want_loss, "orpo loss");
        for (name, got) in names.iter().zip(&metrics) {
            let w = want[name.as_str()].as_f64().unwrap();
            close(*got, w, w.abs().max(1.0), &format!("orpo {name}"));
        }
        let (total, worst, compared) = crate::grpo::norms_against(&policy, &grads, want);
        let want_norms = want["param_grad_norms"].as_object().unwrap();
        assert!(
            compared >= want_norms.len() - 1,
            "{compared} parameters compared"
        );
        let want_total = want["grad_norm"].as_f64().unwrap();
        println!(
            "orpo: loss {loss:.8} vs TRL {want_loss:.8}; grad norm {total:.6} vs {want_total:.6}; \
             worst parameter {worst:.2e} ({compared} parameters)"
        );
        assert!(worst < 1e-4, "orpo: gradient norms differ by {worst:.2e}");
        assert!((total - want_total).abs() <= 1e-4 * want_total);
    }
}

#[test]
fn data_parallel_workers_split_the_pairs() {
    let fused = model();
    let rows = vec![pairs(), pairs()];
    let objective = Dpo {
        config: DpoConfig::default(),
        validation: &[],
    };
    let device = Default::default();
    let session = train_runner::DataParallel::start(
        &train_runner::Parallelism::new(vec![device; 2], None).unwrap(),
    )
    .unwrap();
    let outcome = session.step(&objective, &fused, &rows, false).unwrap();
    session.finish().unwrap();
    let one = objective.gradients(&fused, &[&rows[0], &rows[1]], 6.0, &Default::default());
    assert!(
        (outcome.loss - one.loss).abs() < 1e-6 * one.loss,
        "{} vs {}",
        outcome.loss,
        one.loss
    );
    // The metrics travel in the same all-reduce (summed in f32).
    for ((name, a), b) in DPO_METRICS.iter().zip(&outcome.metrics).zip(&one.metrics) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{name}: {a} vs {b}"
        );
    }
    let (a, b) = (
        train_runner::global_grad_norm(&fused, &outcome.grads),
        train_runner::global_grad_norm(&fused, &one.grads),
    );
    assert!((a - b).abs() <= 1e-5 * b, "gradient norm {a} vs {b}");
}
