//! Direct preference optimisation: the per-pair losses of TRL's `DPOTrainer.dpo_loss`, their
//! derivatives with respect to the policy's log-probabilities (what a training step needs to
//! turn the log-probabilities' gradients into the loss's), and the implicit rewards TRL logs.
//!
//! With `logits = (π_c − π_r) − (ref_c − ref_r)` (log-probabilities of the chosen and rejected
//! completions under the policy and the reference) and `z = β · logits`:
//!
//! | loss | per pair |
//! |---|---|
//! | `sigmoid` | `−(1 − ε) log σ(z) − ε log σ(−z)` (ε: label smoothing) |
//! | `robust` | `(−(1 − ε) log σ(z) + ε log σ(−z)) / (1 − 2ε)` |
//! | `hinge` | `max(0, 1 − z)` |
//! | `ipo` | `(δ − 1 / (2β))²`, δ the same difference of log-ratios each divided by its completion's tokens |
//! | `simpo` | `−(1 − ε) log σ(z) − ε log σ(−z)`, `z = β (π_c / n_c − π_r / n_r) − γ` (no reference; `n` a completion's tokens) |
//! | `orpo` | `NLL_c − β log σ(o)`, `o = (a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r}))`, `a = π / n` (no reference; `NLL_c` the mean NLL of the whole chosen conversation, prompt included) |
//!
//! The log-probabilities are summed over each completion's tokens; the rewards TRL logs are
//! `β (π_c − ref_c)` and `β (π_r − ref_r)` (summed, for IPO too). `sigmoid` with label
//! smoothing is cDPO, as TRL's `sigmoid` was before 1.0 (TRL 1.16 ignores `label_smoothing` for
//! `sigmoid`). ORPO is TRL's (experimental) `ORPOTrainer`: its rewards are `β a_c` and `β a_r`,
//! and it also logs `nll_loss`, `log_odds_ratio` (`log σ(o)`) and `log_odds_chosen` (`o`).

use burn::optim::GradientsAccumulator;
use burn::tensor::{ElementConversion, IndexingUpdateOp, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use train_data::{Batch, Sequence};
use train_model::{
    CausalLm, FusedAutodiffBackend, FusedBackend, IGNORE_INDEX, fused_linear_nll, nll_chunk_rows,
};

use crate::batches::batch_tensors;
use crate::objective::{Collate, Contribution, Evaluation, Objective};
use crate::step::{
    TrainingHidden, add_router, backward_from_hidden, router_aux_coef, training_hidden,
    weigh_router,
};

/// Which DPO loss (TRL's `loss_type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// The DPO paper's loss, with optional label smoothing (cDPO).
    #[default]
    Sigmoid,
    /// Identity preference optimisation: a squared loss on log-probabilities averaged per
    /// token.
    Ipo,
    /// The SLiC hinge loss.
    Hinge,
    /// Robust DPO (unbiased under label noise of rate `label_smoothing`).
    Robust,
    /// SimPO: no reference model; the margin of the per-token average log-probabilities,
    /// scaled by β, must exceed γ (`simpo_gamma`), as TRL's `CPOTrainer` with
    /// `loss_type="simpo"` and `cpo_alpha=0`.
    Simpo,
    /// ORPO (odds ratio preference optimisation, `train orpo`): no reference model; the
    /// chosen conversation's mean NLL (prompt included) minus β times the log-sigmoid of the
    /// log odds ratio of the completions' per-token average probabilities, as TRL's
    /// `ORPOTrainer`.
    Orpo,
}

/// The settings of the DPO loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// β: how far the policy may move from the reference (TRL's default 0.1).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// The loss.
    #[serde(default)]
    pub loss_type: DpoLossType,
    /// ε, the assumed rate of flipped labels (`sigmoid`, `robust` and `simpo`; TRL's default
    /// 0).
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's target margin γ (TRL's default 0.5).
    #[serde(default = "default_simpo_gamma")]
    pub simpo_gamma: f64,
}

fn default_simpo_gamma() -> f64 {
    0.5
}

fn default_beta() -> f64 {
    0.1
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: default_beta(),
            loss_type: DpoLossType::default(),
            label_smoothing: 0.0,
            simpo_gamma: default_simpo_gamma(),
        }
    }
}

impl DpoConfig {
    /// Checks the settings: β > 0 and finite; ε in [0, 0.5) (`robust` divides by 1 − 2ε), and
    /// 0 for the losses that do not use it.
    pub fn validate(&self) -> crate::Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(crate::RunnerError::config(
                "beta",
                format!("must be a positive number, got {}", self.beta),
            ));
        }
        let e = self.label_smoothing;
        if !(e.is_finite() && (0.0..0.5).contains(&e)) {
            return Err(crate::RunnerError::config(
                "label_smoothing",
                format!("must be in [0, 0.5), got {e}"),
            ));
        }
        if !self.simpo_gamma.is_finite() {
            return Err(crate::RunnerError::config(
                "simpo_gamma",
                format!("must be a finite number, got {}", self.simpo_gamma),
            ));
        }
        if e != 0.0
            && matches!(
                self.loss_type,
                DpoLossType::Ipo | DpoLossType::Hinge | DpoLossType::Orpo
            )
        {
            return Err(crate::RunnerError::config(
                "label_smoothing",
                format!(
                    "the {:?} loss has no label smoothing (only sigmoid, robust and simpo do)",
                    self.loss_type
                ),
            ));
        }
        Ok(())
    }
}

/// The log-probabilities of one pair's completions, summed over their tokens, and the number
/// of those tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    /// Chosen completion under the policy.
    pub chosen: f64,
    /// Rejected completion under the policy.
    pub rejected: f64,
    /// Chosen completion under the reference.
    pub ref_chosen: f64,
    /// Rejected completion under the reference.
    pub ref_rejected: f64,
    /// Tokens of the chosen completion (IPO averages over them).
    pub chosen_tokens: usize,
    /// Tokens of the rejected completion.
    pub rejected_tokens: usize,
    /// ORPO: the policy's mean NLL over the tokens of the whole chosen conversation (prompt
    /// included, every token after the first); not used by the other losses.
    pub chosen_nll: f64,
}

impl DpoConfig {
    /// Whether the loss compares with a reference model (all but SimPO and ORPO).
    pub fn uses_reference(&self) -> bool {
        !matches!(self.loss_type, DpoLossType::Simpo | DpoLossType::Orpo)
    }

    /// Whether the chosen conversation's NLL is part of the loss (ORPO).
    pub fn uses_chosen_nll(&self) -> bool {
        self.loss_type == DpoLossType::Orpo
    }

    /// Whether the log-probabilities are averaged over a completion's tokens (SimPO, ORPO), as
    /// the loss and TRL's logs use them.
    fn averages_logps(&self) -> bool {
        matches!(self.loss_type, DpoLossType::Simpo | DpoLossType::Orpo)
    }
}

/// One pair's loss, its derivatives and its rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLoss {
    /// The loss.
    pub loss: f64,
    /// ∂loss / ∂(policy's summed log-probability of the chosen completion).
    pub d_chosen: f64,
    /// ∂loss / ∂(policy's summed log-probability of the rejected completion).
    pub d_rejected: f64,
    /// `β (π_c − ref_c)` (SimPO, ORPO: `β π_c / n_c`).
    pub chosen_reward: f64,
    /// `β (π_r − ref_r)` (SimPO, ORPO: `β π_r / n_r`).
    pub rejected_reward: f64,
    /// ORPO's log odds ratio `o` (0 for the other losses).
    pub log_odds: f64,
}

/// `log σ(x)`, stable for any `x`.
fn log_sigmoid(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

/// `σ(x)`, stable for any `x`.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log(1 − e^x)` for `x < 0`, without cancellation (as TRL's `log1mexp`); `x` is taken
/// as at most −1e-12 (a probability of 1 has no odds).
fn log1mexp(x: f64) -> f64 {
    let x = x.min(-1e-12);
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// The loss of one pair under `config` (as TRL's `dpo_loss`), with its derivatives.
pub fn dpo_pair_loss(config: &DpoConfig, p: &PairLogps) -> PairLoss {
    let beta = config.beta;
    let eps = config.label_smoothing;
    let chosen_ratio = p.chosen - p.ref_chosen;
    let rejected_ratio = p.rejected - p.ref_rejected;
    let logits = chosen_ratio - rejected_ratio;
    let z = beta * logits;
    // (loss, ∂loss/∂chosen, ∂loss/∂rejected); for the losses of `logits`,
    // ∂logits/∂chosen = 1 and ∂logits/∂rejected = −1.
    let of_logits = |loss: f64, d: f64| (loss, d, -d);
    let (loss, d_chosen, d_rejected) = match config.loss_type {
        DpoLossType::Sigmoid => of_logits(
            -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z),
            beta * (-(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)),
        ),
        DpoLossType::Robust => of_logits(
            (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps),
            beta * (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)) / (1.0 - 2.0 * eps),
        ),
        // torch's relu has a zero gradient at 0.
        DpoLossType::Hinge => of_logits((1.0 - z).max(0.0), if z < 1.0 { -beta } else { 0.0 }),
        DpoLossType::Ipo => {
            let nc = p.chosen_tokens.max(1) as f64;
            let nr = p.rejected_tokens.max(1) as f64;
            let d = chosen_ratio / nc - rejected_ratio / nr - 1.0 / (2.0 * beta);
            (d * d, 2.0 * d / nc, -2.0 * d / nr)
        }
        DpoLossType::Simpo => {
            let nc = p.chosen_tokens.max(1) as f64;
            let nr = p.rejected_tokens.max(1) as f64;
            let (ac, ar) = (p.chosen / nc, p.rejected / nr);
            let z = beta * (ac - ar) - config.simpo_gamma;
            let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
            return PairLoss {
                loss: -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z),
                d_chosen: dz * beta / nc,
                d_rejected: -dz * beta / nr,
                chosen_reward: beta * ac,
                rejected_reward: beta * ar,
                log_odds: 0.0,
            };
        }
        DpoLossType::Orpo => {
            let nc = p.chosen_tokens.max(1) as f64;
            let nr = p.rejected_tokens.max(1) as f64;
            let (ac, ar) = (p.chosen / nc, p.rejected / nr);
            let o = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
            // ∂o/∂a = 1 / (1 − e^a) = −1 / expm1(a); ∂(−β log σ(o))/∂o = −β σ(−o).
            let d_o = -beta * sigmoid(-o);
            let odds = |a: f64| -1.0 / a.min(-1e-12).exp_m1();
            return PairLoss {
                loss: p.chosen_nll - beta * log_sigmoid(o),
                d_chosen: d_o * odds(ac) / nc,
                d_rejected: -d_o * odds(ar) / nr,
                chosen_reward: beta * ac,
                rejected_reward: beta * ar,
                log_odds: o,
            };
        }
    };
    PairLoss {
        loss,
        d_chosen,
        d_rejected,
        chosen_reward: beta * chosen_ratio,
        rejected_reward: beta * rejected_ratio,
        log_odds: 0.0,
    }
}

/// One training pair: the two tokenized conversations (labels on each completion) and the
/// reference model's log-probabilities of the completions, summed over their tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRow {
    /// Prompt + chosen completion.
    pub chosen: Sequence,
    /// Prompt + rejected completion.
    pub rejected: Sequence,
    /// The reference's log-probability of the chosen completion (summed).
    pub ref_chosen: f64,
    /// The reference's log-probability of the rejected completion (summed).
    pub ref_rejected: f64,
}

/// A micro-batch of `n` pairs: one batch of `2n` rows, the chosen conversations first, then the
/// rejected ones in the same order (one forward pass for both), and the reference
/// log-probabilities of each pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PairBatch {
    /// `2n` rows.
    pub batch: Batch,
    /// Per pair: the reference's summed log-probabilities (chosen, rejected).
    pub reference: Vec<(f64, f64)>,
}

impl Collate for PairRow {
    type Batch = PairBatch;

    fn collate(rows: Vec<PairRow>, pad_id: u32) -> PairBatch {
        let reference = rows
            .iter()
            .map(|r| (r.ref_chosen, r.ref_rejected))
            .collect();
        let mut sequences = Vec::with_capacity(2 * rows.len());
        let mut rejected = Vec::with_capacity(rows.len());
        for r in rows {
            sequences.push(r.chosen);
            rejected.push(r.rejected);
        }
        sequences.extend(rejected);
        PairBatch {
            batch: Batch::collate(sequences, pad_id, None),
            reference,
        }
    }
}

/// Per row: the flattened positions (`row · seq + t`) a loss scores and the tokens each
/// predicts.
pub(crate) type RowPositions = Vec<(Vec<i64>, Vec<i64>)>;

/// Flattened positions (`row · seq + t`) whose next token is a completion label, and those
/// labels, per row of `batch` (per segment for a padding-free batch).
pub(crate) fn completion_positions(batch: &Batch, rows: usize) -> RowPositions {
    let s = batch.seq_len;
    let mut out = vec![(Vec::new(), Vec::new()); rows];
    for r in 0..batch.batch_size {
        for t in 0..s.saturating_sub(1) {
            let next = r * s + t + 1;
            let label = batch.labels[next];
            if i64::from(label) == IGNORE_INDEX {
                continue;
            }
            let owner = if batch.packed {
                batch.segment_ids[next] as usize
            } else {
                r
            };
            if let Some((positions, targets)) = out.get_mut(owner) {
                positions.push((r * s + t) as i64);
                targets.push(i64::from(label));
            }
        }
    }
    out
}

/// Flattened positions whose next token belongs to the same conversation, and those tokens,
/// per row of `batch` (per segment for a padding-free batch): what a language-model loss over
/// the whole conversation, prompt included, scores (ORPO's NLL of the chosen side, as TRL's
/// labels are the input ids wherever the attention mask is 1).
pub(crate) fn sequence_positions(batch: &Batch, rows: usize) -> RowPositions {
    let s = batch.seq_len;
    let mut out = vec![(Vec::new(), Vec::new()); rows];
    for r in 0..batch.batch_size {
        for t in 0..s.saturating_sub(1) {
            let (here, next) = (r * s + t, r * s + t + 1);
            let segment = batch.segment_ids[next];
            if batch.segment_ids[here] != segment {
                continue;
            }
            // A padded row's example is segment 0 (its padding is segment 1).
            let owner = if batch.packed {
                segment as usize
            } else if segment == 0 {
                r
            } else {
                continue;
            };
            if let Some((positions, targets)) = out.get_mut(owner) {
                positions.push(here as i64);
                targets.push(i64::from(batch.input_ids[next]));
            }
        }
    }
    out
}

/// The final hidden states of `batch` flattened to `[rows · seq, width]`, and the batch as it
/// ran: as one padding-free row when the model runs padded batches so (positions then index
/// that row). No gradients are kept ([`crate::step::training_hidden`] is the training forward).
pub(crate) fn final_hidden<'b, B: FusedBackend>(
    model: &CausalLm<B>,
    batch: &'b Batch,
    device: &burn::tensor::Device<B>,
) -> (std::borrow::Cow<'b, Batch>, Tensor<B, 2>) {
    let run = as_run(model, batch);
    let (input, _) = batch_tensors::<B>(&run, device);
    let hidden = model.forward_hidden(&input);
    let [b, s, width] = hidden.dims();
    (run, hidden.reshape([b * s, width]))
}

/// `batch` as the model runs it: as one padding-free row of its examples when the model runs
/// padded batches so ([`CausalLm::padding_free`]).
pub(crate) fn as_run<'b, B: FusedBackend>(
    model: &CausalLm<B>,
    batch: &'b Batch,
) -> std::borrow::Cow<'b, Batch> {
    match model.padding_free().then(|| batch.padding_free()).flatten() {
        Some(flat) => std::borrow::Cow::Owned(flat),
        None => std::borrow::Cow::Borrowed(batch),
    }
}

/// The summed log-probability of each row's completion in `batch` (rows in order), and the
/// number of completion tokens of each. No gradients are kept.
pub fn completion_logps<B: FusedBackend>(model: &CausalLm<B>, batch: &Batch) -> Vec<(f64, usize)> {
    logps_at(model, batch, &[completion_positions]).remove(0)
}

/// For each of `positions` (see [`completion_positions`], [`sequence_positions`]): the summed
/// log-probability of the tokens at those positions of each row of `batch`, and how many there
/// are, from one forward pass. No gradients are kept.
fn logps_at<B: FusedBackend>(
    model: &CausalLm<B>,
    batch: &Batch,
    positions: &[fn(&Batch, usize) -> RowPositions],
) -> Vec<Vec<(f64, usize)>> {
    let device = model.embed_tokens.val().device();
    let (run, hidden) = final_hidden(model, batch, &device);
    let head = model.lm_head_weight().val();
    positions
        .iter()
        .map(|at| {
            row_nlls(&hidden, &head, false, at(&run, batch.batch_size))
                .into_iter()
                .map(|r| r.map_or((0.0, 0), |r| (-r.nll, r.tokens)))
                .collect()
        })
        .collect()
}

/// DPO over [`PairBatch`]es: the loss of each pair ([`dpo_pair_loss`]), averaged over the
/// step's pairs; validation is the same mean over `validation`'s pairs. ORPO
/// ([`DpoLossType::Orpo`]) is this objective with the chosen conversations' NLL added.
pub struct Dpo<'a> {
    /// The loss.
    pub config: DpoConfig,
    /// Validation pairs, already in micro-batches.
    pub validation: &'a [PairBatch],
}

/// The pairs' terms of one micro-batch from its rows' completion log-probabilities and, for
/// ORPO, the chosen conversations' mean NLL (empty otherwise).
fn pair_terms(
    config: &DpoConfig,
    batch: &PairBatch,
    logps: &[(f64, usize)],
    chosen_nll: &[f64],
) -> Vec<PairLoss> {
    let n = batch.reference.len();
    (0..n)
        .map(|i| {
            let (chosen, chosen_tokens) = logps[i];
            let (rejected, rejected_tokens) = logps[n + i];
            let (ref_chosen, ref_rejected) = batch.reference[i];
            dpo_pair_loss(
                config,
                &PairLogps {
                    chosen,
                    rejected,
                    ref_chosen,
                    ref_rejected,
                    chosen_tokens,
                    rejected_tokens,
                    chosen_nll: chosen_nll.get(i).copied().unwrap_or(0.0),
                },
            )
        })
        .collect()
}

/// The metrics TRL's `DPOTrainer` logs (besides the loss), each a mean over pairs.
pub const DPO_METRICS: [&str; 6] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
];

/// The metrics TRL's `ORPOTrainer` logs besides [`DPO_METRICS`]: the chosen conversations'
/// NLL, `log σ(o)` and the log odds ratio `o`, each a mean over pairs.
pub const ORPO_METRICS: [&str; 3] = ["nll_loss", "log_odds_ratio", "log_odds_chosen"];

impl DpoConfig {
    /// The names of the metrics the objective reports for this loss.
    fn metric_names(&self) -> Vec<&'static str> {
        let mut names = DPO_METRICS.to_vec();
        if self.uses_chosen_nll() {
            names.extend(ORPO_METRICS);
        }
        names
    }
}

/// The metrics of one micro-batch's pairs, summed, in [`DpoConfig::metric_names`] order. The
/// log-probabilities are per-token averages for SimPO and ORPO (as TRL's `CPOTrainer` and
/// `ORPOTrainer` log them), sums otherwise.
fn metric_sums(
    config: &DpoConfig,
    terms: &[PairLoss],
    logps: &[(f64, usize)],
    chosen_nll: &[f64],
) -> Vec<f64> {
    let n = terms.len();
    let logp = |(sum, tokens): (f64, usize)| {
        if config.averages_logps() {
            sum / tokens.max(1) as f64
        } else {
            sum
        }
    };
    let mut out = vec![0f64; config.metric_names().len()];
    for (i, t) in terms.iter().enumerate() {
        let mut values = vec![
            t.chosen_reward,
            t.rejected_reward,
            t.chosen_reward - t.rejected_reward,
            f64::from(u8::from(t.chosen_reward > t.rejected_reward)),
            logp(logps[i]),
            logp(logps[n + i]),
        ];
        if config.uses_chosen_nll() {
            values.extend([
                chosen_nll.get(i).copied().unwrap_or(0.0),
                log_sigmoid(t.log_odds),
                t.log_odds,
            ]);
        }
        for (o, v) in out.iter_mut().zip(values) {
            *o += v;
        }
    }
    out
}

/// One row's NLL at its scored positions, with its gradients at scale 1.
struct RowNll<B: burn::tensor::backend::Backend> {
    nll: f64,
    tokens: usize,
    index: Tensor<B, 1, Int>,
    out: train_model::LinearNll<B>,
}

/// The NLL of each row at `positions` (one entry per row; `None` for a row without any), from
/// the flattened final hidden states `hidden` and the head `weight`, with their gradients at
/// scale 1 (the head's only when `head_trained`).
fn row_nlls<B: FusedBackend>(
    hidden: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    head_trained: bool,
    positions: RowPositions,
) -> Vec<Option<RowNll<B>>> {
    let device = hidden.device();
    let vocab = weight.dims()[0];
    positions
        .into_iter()
        .map(|(positions, targets)| {
            let m = positions.len();
            if m == 0 {
                return None;
            }
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [m]), &device);
            let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [m]), &device);
            let out = fused_linear_nll(
                &hidden.clone().select(0, index.clone()),
                weight.clone(),
                &targets,
                1.0,
                nll_chunk_rows(m, vocab),
                head_trained,
            );
            let nll = f64::from(out.sum.clone().into_scalar().elem::<f32>());
            Some(RowNll {
                nll,
                tokens: m,
                index,
                out,
            })
        })
        .collect()
}

/// Adds `k ×` the gradients of `rows` (see [`row_nlls`]) to `grad_flat` and `grad_head`.
fn add_scaled<B: burn::tensor::backend::Backend>(
    rows: Vec<Option<RowNll<B>>>,
    k: impl Fn(usize) -> f64,
    grad_flat: &mut Tensor<B, 2>,
    grad_head: &mut Option<Tensor<B, 2>>,
) {
    for (row, r) in rows.into_iter().enumerate() {
        let Some(RowNll { index, out, .. }) = r else {
            continue;
        };
        let k = k(row);
        *grad_flat = grad_flat.clone().select_assign(
            0,
            index,
            out.grad_hidden.mul_scalar(k),
            IndexingUpdateOp::Add,
        );
        if let Some(g) = out.grad_weight {
            let g = g.mul_scalar(k);
            *grad_head = Some(match grad_head.take() {
                Some(total) => total + g,
                None => g,
            });
        }
    }
}

/// The mean NLL of each of the first `pairs` rows (the chosen conversations) from their
/// summed NLLs and token counts.
fn chosen_means(sums: impl Iterator<Item = (f64, usize)>, pairs: usize) -> Vec<f64> {
    sums.take(pairs)
        .map(|(nll, tokens)| nll / tokens.max(1) as f64)
        .collect()
}

impl<B: FusedAutodiffBackend> Objective<B> for Dpo<'_> {
    type Batch = PairBatch;

    fn name(&self) -> &'static str {
        if self.config.loss_type == DpoLossType::Orpo {
            "orpo"
        } else {
            "dpo"
        }
    }

    fn eval_unit(&self) -> &'static str {
        "pairs"
    }

    fn headline(&self) -> Option<(&'static str, &'static str)> {
        Some(("rewards/accuracies", "acc"))
    }

    fn settings(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.config).ok()
    }

    fn units(&self, batch: &PairBatch) -> usize {
        batch.reference.len()
    }

    fn label_tokens(&self, batch: &PairBatch) -> usize {
        batch.batch.label_tokens
    }

    fn metric_names(&self) -> Vec<String> {
        self.config
            .metric_names()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn tokens(&self, batch: &PairBatch) -> usize {
        batch.batch.real_tokens
    }

    fn gradients(
        &self,
        model: &CausalLm<B>,
        batches: &[&PairBatch],
        denominator: f64,
        device: &burn::tensor::Device<B>,
    ) -> Contribution {
        let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
        let mut step_loss = 0f64;
        let mut metrics = vec![0f64; self.config.metric_names().len()];
        let mut router_term = None;
        let coef = router_aux_coef(model);
        for pairs in batches {
            let rows = pairs.batch.batch_size;
            let n = pairs.reference.len();
            let TrainingHidden {
                run,
                flat,
                aux,
                backprop,
            } = training_hidden(model, &pairs.batch, device, coef.is_some());
            // The router's load-balancing term, weighted by the micro-batch's share of the
            // step's pairs (see `router_aux_coef`).
            let router = match (aux, coef) {
                (Some(aux), Some(coef)) => {
                    let (weighted, term) = weigh_router(aux, coef, n as f64 / denominator);
                    step_loss += coef * term;
                    router_term = add_router(router_term, Some(term));
                    Some(weighted)
                }
                _ => None,
            };
            let [rows_flat, width] = flat.dims();
            let inner = flat.clone().inner();
            let head = model.lm_head_weight();
            let head_trained = head.is_require_grad();
            let weight = head.val().inner();
            // Each row's NLL and its gradients at scale 1; the loss's gradient is their
            // combination with the pair's derivatives (the gradients are linear in the scale).
            let per_row = row_nlls(
                &inner,
                &weight,
                head_trained,
                completion_positions(&run, rows),
            );
            let logps: Vec<(f64, usize)> = per_row
                .iter()
                .map(|r| r.as_ref().map_or((0.0, 0), |r| (-r.nll, r.tokens)))
                .collect();
            // ORPO: the chosen conversations' NLL over every token, prompt included.
            let chosen_rows = if self.config.uses_chosen_nll() {
                let mut positions = sequence_positions(&run, rows);
                positions.truncate(n);
                row_nlls(&inner, &weight, head_trained, positions)
            } else {
                Vec::new()
            };
            let chosen_nll = chosen_means(
                chosen_rows
                    .iter()
                    .map(|r| r.as_ref().map_or((0.0, 0), |r| (r.nll, r.tokens))),
                n,
            );
            let terms = pair_terms(&self.config, pairs, &logps, &chosen_nll);
            for (m, v) in
                metrics
                    .iter_mut()
                    .zip(metric_sums(&self.config, &terms, &logps, &chosen_nll))
            {
                *m += v / denominator;
            }
            // ∂loss/∂(summed log-probability) of each row, over the step's pairs.
            let mut scale = vec![0f64; rows];
            for (i, t) in terms.iter().enumerate() {
                step_loss += t.loss / denominator;
                scale[i] = t.d_chosen / denominator;
                scale[n + i] = t.d_rejected / denominator;
            }
            let mut grad_flat =
                Tensor::<B::InnerBackend, 2>::zeros([rows_flat, width], (device, inner.dtype()));
            let mut grad_head: Option<Tensor<B::InnerBackend, 2>> = None;
            // NLL = −log-probability: its gradients enter with the opposite sign.
            add_scaled(per_row, |row| -scale[row], &mut grad_flat, &mut grad_head);
            // ORPO's NLL term: the mean over each chosen conversation's tokens (∂/∂sum = 1/m).
            let tokens: Vec<usize> = chosen_rows
                .iter()
                .map(|r| r.as_ref().map_or(1, |r| r.tokens))
                .collect();
            add_scaled(
                chosen_rows,
                |row| 1.0 / (tokens[row].max(1) as f64 * denominator),
                &mut grad_flat,
                &mut grad_head,
            );
            accumulator.accumulate(
                model,
                backward_from_hidden(model, backprop, flat, grad_flat, grad_head, router),
            );
        }
        metrics.extend(router_term);
        Contribution {
            loss: step_loss,
            metrics,
            grads: accumulator.grads(),
        }
    }

    fn evaluate(&self, model: &CausalLm<B::InnerBackend>) -> Option<Evaluation> {
        let mut sum = 0f64;
        let mut pairs = 0u64;
        let mut metrics = vec![0f64; self.config.metric_names().len()];
        for batch in self.validation {
            // ORPO also scores every token of the chosen conversations, from the same forward.
            let (logps, chosen_nll) = if self.config.uses_chosen_nll() {
                let mut both = logps_at(
                    model,
                    &batch.batch,
                    &[completion_positions, sequence_positions],
                );
                let whole = both.pop().unwrap_or_default();
                let nll = chosen_means(
                    whole.into_iter().map(|(logp, m)| (-logp, m)),
                    batch.reference.len(),
                );
                (both.pop().unwrap_or_default(), nll)
            } else {
                (completion_logps(model, &batch.batch), Vec::new())
            };
            let terms = pair_terms(&self.config, batch, &logps, &chosen_nll);
            for (m, v) in
                metrics
                    .iter_mut()
                    .zip(metric_sums(&self.config, &terms, &logps, &chosen_nll))
            {
                *m += v;
            }
            for t in terms {
                sum += t.loss;
                pairs += 1;
            }
        }
        (pairs > 0).then(|| Evaluation {
            loss: sum / pairs as f64,
            units: pairs,
            metrics: metrics.iter().map(|m| m / pairs as f64).collect(),
        })
    }
}

/// Runs DPO on `pairs` (their reference log-probabilities filled in) to the end, as
/// [`crate::run`] runs supervised fine-tuning: the same loop, checkpoints, resume, observer and
/// final save. `validation` is scored every `eval_steps` (the mean DPO loss over its pairs).
/// The `train` and `validation` fields of `setup` are not used.
pub fn run_dpo<B: FusedAutodiffBackend>(
    setup: crate::TrainSetup<B>,
    pairs: Vec<PairRow>,
    validation: &[PairBatch],
    config: DpoConfig,
    resume: Option<&crate::Resume>,
    observer: &mut dyn crate::TrainObserver<B>,
    control: &crate::RunControl,
) -> crate::Result<crate::RunSummary> {
    config.validate()?;
    let objective = Dpo { config, validation };
    let training = crate::run::Training {
        rows: pairs,
        packed_to: None,
        packing_efficiency: None,
        validation_len: validation.iter().map(|b| b.reference.len()).sum(),
        check: |rows: &[PairRow], trainer: &crate::TrainerConfig, vocab: usize| {
            use crate::config::limits::MAX_MICRO_BATCH_TOKENS;
            let longest = rows
                .iter()
                .map(|r| r.chosen.len().max(r.rejected.len()))
                .max()
                .unwrap_or(0);
            let tokens = trainer.batch_size.saturating_mul(2).saturating_mul(longest);
            if tokens > MAX_MICRO_BATCH_TOKENS {
                return Err(crate::RunnerError::config(
                    "max_length",
                    format!(
                        "batch_size {} pairs × 2 × the longest conversation {longest} = {tokens} \
                         tokens per micro-batch, above the limit {MAX_MICRO_BATCH_TOKENS}",
                        trainer.batch_size
                    ),
                ));
            }
            let named = rows.iter().enumerate().flat_map(|(i, r)| {
                [
                    (format!("pair {} (chosen)", i + 1), &r.chosen),
                    (format!("pair {} (rejected)", i + 1), &r.rejected),
                ]
            });
            crate::setup::check_ids(
                named.map(|(name, s)| (name, &s.input_ids[..], &s.labels[..])),
                vocab,
            )?;
            let named = validation.iter().flat_map(|b| {
                let s = b.batch.seq_len;
                (0..b.batch.batch_size).map(move |r| {
                    (
                        format!("validation pair row {}", r + 1),
                        &b.batch.input_ids[r * s..(r + 1) * s],
                        &b.batch.labels[r * s..(r + 1) * s],
                    )
                })
            });
            crate::setup::check_ids(named, vocab)
        },
    };
    crate::run::run_objective(setup, training, &objective, resume, observer, control)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIRS: [PairLogps; 4] = [
        PairLogps {
            chosen: -12.5,
            rejected: -15.25,
            ref_chosen: -13.0,
            ref_rejected: -14.0,
            chosen_tokens: 5,
            rejected_tokens: 9,
            chosen_nll: 2.5,
        },
        PairLogps {
            chosen: -40.0,
            rejected: -8.0,
            ref_chosen: -39.0,
            ref_rejected: -9.5,
            chosen_tokens: 30,
            rejected_tokens: 4,
            chosen_nll: 1.25,
        },
        PairLogps {
            chosen: -3.0,
            rejected: -3.0,
            ref_chosen: -3.0,
            ref_rejected: -3.0,
            chosen_tokens: 2,
            rejected_tokens: 2,
            chosen_nll: 0.75,
        },
        PairLogps {
            chosen: -0.5,
            rejected: -900.0,
            ref_chosen: -1.0,
            ref_rejected: -20.0,
            chosen_tokens: 1,
            rejected_tokens: 700,
            chosen_nll: 0.1,
        },
    ];

    fn configs() -> Vec<DpoConfig> {
        let mut out = Vec::new();
        for (loss_type, eps) in [
            (DpoLossType::Sigmoid, 0.0),
            (DpoLossType::Sigmoid, 0.1),
            (DpoLossType::Robust, 0.2),
            (DpoLossType::Hinge, 0.0),
            (DpoLossType::Ipo, 0.0),
            (DpoLossType::Simpo, 0.0),
            (DpoLossType::Simpo, 0.1),
            (DpoLossType::Orpo, 0.0),
        ] {
            for beta in [0.1, 0.5] {
                out.push(DpoConfig {
                    beta,
                    loss_type,
                    label_smoothing: eps,
                    ..DpoConfig::default()
                });
            }
        }
        out
    }

    #[test]
    fn derivatives_match_finite_differences() {
        for config in configs() {
            for p in PAIRS {
                let got = dpo_pair_loss(&config, &p);
                let h = 1e-5;
                let at = |dc: f64, dr: f64| {
                    let q = PairLogps {
                        chosen: p.chosen + dc,
                        rejected: p.rejected + dr,
                        ..p
                    };
                    dpo_pair_loss(&config, &q).loss
                };
                let num_c = (at(h, 0.0) - at(-h, 0.0)) / (2.0 * h);
                let num_r = (at(0.0, h) - at(0.0, -h)) / (2.0 * h);
                // The hinge's kink at z = 1 is not met by these pairs.
                assert!(
                    (got.d_chosen - num_c).abs() < 1e-6 * (1.0 + num_c.abs()),
                    "{config:?} {p:?}: {} vs {num_c}",
                    got.d_chosen
                );
                assert!(
                    (got.d_rejected - num_r).abs() < 1e-6 * (1.0 + num_r.abs()),
                    "{config:?} {p:?}: {} vs {num_r}",
                    got.d_rejected
                );
                assert!(got.loss.is_finite());
            }
        }
    }

    #[test]
    fn known_values() {
        // logits = (−12.5 + 15.25) − (−13 + 14) = 1.75; β = 0.1: z = 0.175.
        let p = PAIRS[0];
        let sig = dpo_pair_loss(&DpoConfig::default(), &p);
        assert!((sig.loss - (1.0 + (-0.175f64).exp()).ln()).abs() < 1e-15);
        assert!((sig.chosen_reward - 0.05).abs() < 1e-15);
        assert!((sig.rejected_reward - -0.125).abs() < 1e-15);
        let ipo = dpo_pair_loss(
            &DpoConfig {
                loss_type: DpoLossType::Ipo,
                ..DpoConfig::default()
            },
            &p,
        );
        // IPO: (0.5 / 5 − (−1.25) / 9 − 5)².
        let delta: f64 = 0.5 / 5.0 + 1.25 / 9.0;
        assert!((ipo.loss - (delta - 5.0).powi(2)).abs() < 1e-12);
        assert!((ipo.chosen_reward - 0.05).abs() < 1e-15, "summed, as TRL");
        let hinge = dpo_pair_loss(
            &DpoConfig {
                loss_type: DpoLossType::Hinge,
                ..DpoConfig::default()
            },
            &p,
        );
        assert!((hinge.loss - 0.825).abs() < 1e-15);
        // A pair the policy has not moved on: log 2 for sigmoid.
        let tie = dpo_pair_loss(&DpoConfig::default(), &PAIRS[2]);
        assert!((tie.loss - std::f64::consts::LN_2).abs() < 1e-15);
        // ORPO: a_c = −2.5, a_r = −15.25 / 9; o = (a_c − a_r) − (ln(1 − e^a_c) − ln(1 − e^a_r)).
        let orpo = dpo_pair_loss(
            &DpoConfig {
                loss_type: DpoLossType::Orpo,
                ..DpoConfig::default()
            },
            &p,
        );
        let (ac, ar) = (-2.5f64, -15.25f64 / 9.0);
        let o = (ac - ar) - ((1.0 - ac.exp()).ln() - (1.0 - ar.exp()).ln());
        assert!((orpo.log_odds - o).abs() < 1e-12);
        let want = 2.5 + 0.1 * (1.0 + (-o).exp()).ln();
        assert!((orpo.loss - want).abs() < 1e-12, "{} vs {want}", orpo.loss);
        assert!((orpo.chosen_reward - 0.1 * ac).abs() < 1e-15);
        // Far in the tail the loss stays finite and its gradient vanishes.
        let far = dpo_pair_loss(&DpoConfig::default(), &PAIRS[3]);
        assert!(far.loss >= 0.0 && far.loss < 1e-30 && far.d_chosen.abs() < 1e-30);
    }

    #[test]
    fn settings_are_checked() {
        let bad = [
            DpoConfig {
                beta: 0.0,
                ..DpoConfig::default()
            },
            DpoConfig {
                beta: f64::NAN,
                ..DpoConfig::default()
            },
            DpoConfig {
                label_smoothing: 0.5,
                ..DpoConfig::default()
            },
            DpoConfig {
                loss_type: DpoLossType::Hinge,
                label_smoothing: 0.1,
                ..DpoConfig::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        for c in configs() {
            c.validate().unwrap();
        }
        let parsed: DpoConfig =
            serde_json::from_str(r#"{"beta": 0.2, "loss_type": "ipo"}"#).unwrap();
        assert_eq!(parsed.loss_type, DpoLossType::Ipo);
        assert!(serde_json::from_str::<DpoConfig>(r#"{"betta": 0.2}"#).is_err());
    }
}
