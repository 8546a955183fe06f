//! The loss and gradients of one optimizer step: Σ NLL over the step's label tokens / their
//! number, with the LM head and the loss fused.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{ElementConversion, IndexingUpdateOp, Int, Tensor, TensorData};
use train_model::FusedAutodiffBackend;
use train_model::{CausalLm, IGNORE_INDEX, causal_lm_nll, fused_linear_nll, nll_chunk_rows};

use crate::batches::batch_tensors;
use crate::dpo::backward_from_hidden;

/// The loss and the gradients of one optimizer step over `batches` (its micro-batches).
///
/// Loss = Σ NLL over every label token of the step / their number: each micro-batch contributes
/// its sum divided by the step's total, and the gradients of the micro-batches add up, so
/// padding, packing and accumulation leave both unchanged. Where the model's attention allows
/// ([`CausalLm::padding_free`]), a padded micro-batch runs as one padding-free row.
///
/// The LM head and the loss are fused ([`train_model::fused_linear_nll`]): only positions whose
/// next token is a label go through the head, chunk by chunk, and their gradients are computed
/// on the spot, so the `[tokens, vocab]` logits are never materialised nor kept for the
/// backward pass. The rest of the network is differentiated by autodiff from the final norm's
/// output with those gradients.
pub fn step_gradients<B: FusedAutodiffBackend>(
    model: &CausalLm<B>,
    batches: &[train_data::Batch],
    device: &burn::tensor::Device<B>,
) -> (f64, GradientsParams) {
    let label_tokens: usize = batches.iter().map(|b| b.label_tokens).sum();
    let (loss, grads, _) = gradients_over(model, batches, label_tokens.max(1) as f64, device);
    (loss, grads)
}

/// A micro-batch's router term `aux` (before its coefficient) weighed by the micro-batch's
/// `share` of the step's units: the loss to differentiate, `coef · share · aux`, and the term
/// logged as `aux_loss`, `share · aux` (its value in the loss is `coef` times it).
pub(crate) fn weigh_router<B: burn::tensor::backend::Backend>(
    aux: Tensor<B, 1>,
    coef: f64,
    share: f64,
) -> (Tensor<B, 1>, f64) {
    let term = share * f64::from(aux.clone().into_scalar().elem::<f32>());
    (aux.mul_scalar(coef * share), term)
}

/// Sums the router terms of micro-batches (`None`: no router loss).
pub(crate) fn add_router(total: Option<f64>, part: Option<f64>) -> Option<f64> {
    match (total, part) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

/// [`step_gradients`] of a part of a step: each micro-batch's NLL sum is divided by
/// `denominator`, the label tokens of the whole step (over every worker). Also the router's
/// load-balancing term as the step weighs it, before its coefficient (`aux_loss`, logged as
/// TRL logs it), when the model adds one.
pub(crate) fn gradients_over<'a, B: FusedAutodiffBackend>(
    model: &CausalLm<B>,
    batches: impl IntoIterator<Item = &'a train_data::Batch>,
    denominator: f64,
    device: &burn::tensor::Device<B>,
) -> (f64, GradientsParams, Option<f64>) {
    let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
    let mut step_loss = 0f64;
    let mut router = None;
    // A biased LM head (none of the supported architectures has one) takes the plain path.
    let fusable = model.lm_head.as_ref().is_none_or(|h| h.bias.is_none());
    let padding_free = model.padding_free();
    for batch in batches {
        // A padded micro-batch as one row of its examples when attention keeps them apart
        // without a mask: the same loss and gradients, no compute spent on the padding.
        let flat = padding_free.then(|| batch.padding_free()).flatten();
        let batch = flat.as_ref().unwrap_or(batch);
        let (loss, grads, term) = match label_rows(batch) {
            Some((rows, targets)) if fusable => {
                fused_micro_batch(model, batch, rows, targets, denominator, device)
            }
            _ => plain_micro_batch(model, batch, denominator, device),
        };
        step_loss += loss;
        router = add_router(router, term);
        accumulator.accumulate(model, grads);
    }
    (step_loss, accumulator.grads(), router)
}

/// Flattened positions (`row · seq + t`) whose next token is a label, and those labels; `None`
/// when the micro-batch has no label token.
fn label_rows(batch: &train_data::Batch) -> Option<(Vec<i64>, Vec<i64>)> {
    let s = batch.seq_len;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for r in 0..batch.batch_size {
        for t in 0..s.saturating_sub(1) {
            let label = i64::from(batch.labels[r * s + t + 1]);
            if label != IGNORE_INDEX {
                rows.push((r * s + t) as i64);
                targets.push(label);
            }
        }
    }
    (!rows.is_empty()).then_some((rows, targets))
}

/// `router_aux_loss_coef` when the model's router adds its load-balancing loss to the training
/// loss (a mixture of experts with `output_router_logits`).
///
/// Each micro-batch's term is weighted by its share of the step's units (`units /
/// denominator`): the step's loss then holds the coefficient times the units-weighted mean of
/// the micro-batches' terms, over every worker. TRL averages the term over the micro-batches
/// (gradient accumulation) and DDP over the ranks: the same for micro-batches of equal size,
/// and a step split differently into micro-batches keeps its weight.
pub(crate) fn router_aux_coef<B: burn::tensor::backend::Backend>(
    model: &CausalLm<B>,
) -> Option<f64> {
    model
        .config
        .moe
        .as_ref()
        .filter(|m| m.output_router_logits && m.router_aux_loss_coef != 0.0)
        .map(|m| m.router_aux_loss_coef)
}

/// Materialised logits, `causal_lm_nll`, autodiff through everything.
fn plain_micro_batch<B: FusedAutodiffBackend>(
    model: &CausalLm<B>,
    batch: &train_data::Batch,
    denominator: f64,
    device: &burn::tensor::Device<B>,
) -> (f64, GradientsParams, Option<f64>) {
    let (input, labels) = batch_tensors::<B>(batch, device);
    let (logits, aux) = match router_aux_coef(model) {
        Some(_) => model.forward_with_router_loss(&input, Some(&batch.real_mask())),
        None => (model.forward(&input), None),
    };
    let (sum, _) = causal_lm_nll(logits, labels);
    let mut loss = sum / denominator;
    let mut router = None;
    if let (Some(coef), Some(aux)) = (router_aux_coef(model), aux) {
        let (weighted, term) = weigh_router(aux, coef, batch.label_tokens as f64 / denominator);
        router = Some(term);
        loss = loss + weighted;
    }
    let value = f64::from(loss.clone().into_scalar().elem::<f32>());
    (
        value,
        GradientsParams::from_grads(loss.backward(), model),
        router,
    )
}

/// The fused LM head + loss on the label positions, then autodiff from the final norm's output.
fn fused_micro_batch<B: FusedAutodiffBackend>(
    model: &CausalLm<B>,
    batch: &train_data::Batch,
    rows: Vec<i64>,
    targets: Vec<i64>,
    denominator: f64,
    device: &burn::tensor::Device<B>,
) -> (f64, GradientsParams, Option<f64>) {
    let (input, _) = batch_tensors::<B>(batch, device);
    let (hidden, aux) = match router_aux_coef(model) {
        Some(_) => model.forward_hidden_with_router_loss(&input, Some(&batch.real_mask())),
        None => (model.forward_hidden(&input), None),
    };
    let [b, s, width] = hidden.dims();
    let flat = hidden.reshape([b * s, width]);
    let m = rows.len();
    let index = Tensor::<B::InnerBackend, 1, Int>::from_data(TensorData::new(rows, [m]), device);
    let targets =
        Tensor::<B::InnerBackend, 1, Int>::from_data(TensorData::new(targets, [m]), device);
    let selected = flat.clone().inner().select(0, index.clone());
    let head = model.lm_head_weight();
    let head_trained = head.is_require_grad();
    let out = fused_linear_nll(
        &selected,
        head.val().inner(),
        &targets,
        1.0 / denominator,
        nll_chunk_rows(m, model.config.vocab_size),
        head_trained,
    );
    let mut loss = f64::from(out.sum.into_scalar().elem::<f32>()) / denominator;
    let grad_flat = Tensor::<B::InnerBackend, 2>::zeros([b * s, width], (device, flat.dtype()))
        .select_assign(0, index, out.grad_hidden, IndexingUpdateOp::Add);
    let mut router = None;
    let mut weighted = None;
    if let (Some(coef), Some(aux)) = (router_aux_coef(model), aux) {
        // The router's load-balancing loss, weighted by the micro-batch's share of the step.
        let (loss_term, term) = weigh_router(aux, coef, batch.label_tokens as f64 / denominator);
        loss += coef * term;
        router = Some(term);
        weighted = Some(loss_term);
    }
    let grads = backward_from_hidden(model, flat, grad_flat, out.grad_weight, weighted);
    (loss, grads, router)
}
