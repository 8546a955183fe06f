//! The loss and gradients of one optimizer step: Σ NLL over the step's label tokens / their
//! number, with the LM head and the loss fused.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{ElementConversion, IndexingUpdateOp, Int, Tensor, TensorData};
use train_model::{
    Backprop, CausalLm, FusedAutodiffBackend, IGNORE_INDEX, TrainingForward, causal_lm_nll,
    fused_linear_nll, nll_chunk_rows,
};

use crate::batches::batch_tensors;
use crate::dpo::as_run;

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
    let coef = router_aux_coef(model);
    let forward = forward_rows(model, batch, &input, coef.is_some());
    let (sum, _) = causal_lm_nll(model.logits(forward.hidden), labels);
    let mut loss = sum / denominator;
    let mut router = None;
    if let (Some(coef), Some(aux)) = (coef, forward.router_loss) {
        let (weighted, term) = weigh_router(aux, coef, batch.label_tokens as f64 / denominator);
        router = Some(term);
        loss = loss + weighted;
    }
    let value = f64::from(loss.clone().into_scalar().elem::<f32>());
    (value, forward.backprop.gradients(model, &loss), router)
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
    let TrainingForward {
        hidden,
        router_loss: aux,
        backprop,
    } = forward_rows(model, batch, &input, router_aux_coef(model).is_some());
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
    let grads = backward_from_hidden(model, backprop, flat, grad_flat, out.grad_weight, weighted);
    (loss, grads, router)
}

/// A training forward of a micro-batch ([`training_hidden`]).
pub(crate) struct TrainingHidden<'b, B: FusedAutodiffBackend> {
    /// The batch as it ran (as one padding-free row when the model runs padded batches so;
    /// positions then index that row).
    pub run: std::borrow::Cow<'b, train_data::Batch>,
    /// The final hidden states, `[rows · seq, width]`.
    pub flat: Tensor<B, 2>,
    /// The router's load-balancing loss before its coefficient, when asked for.
    pub aux: Option<Tensor<B, 1>>,
    /// The backward pass of the forward.
    pub backprop: Backprop<B>,
}

/// The training forward of `batch` ([`CausalLm::forward_for_training`]): its final hidden
/// states flattened and, with `router_loss` (the caller's [`router_aux_coef`] is set), the
/// router's load-balancing loss of the mixture of experts over the real tokens of every row
/// (chosen and rejected alike, as TRL's concatenated forward).
pub(crate) fn training_hidden<'b, B: FusedAutodiffBackend>(
    model: &CausalLm<B>,
    batch: &'b train_data::Batch,
    device: &burn::tensor::Device<B>,
    router_loss: bool,
) -> TrainingHidden<'b, B> {
    let run = as_run(model, batch);
    let (input, _) = batch_tensors::<B>(&run, device);
    let forward = forward_rows(model, &run, &input, router_loss);
    let [b, s, width] = forward.hidden.dims();
    TrainingHidden {
        run,
        flat: forward.hidden.reshape([b * s, width]),
        aux: forward.router_loss,
        backprop: forward.backprop,
    }
}

/// [`CausalLm::forward_for_training`] of `batch` (as `input`); its real tokens are listed only
/// when the router's term, which leaves padding out, is wanted.
fn forward_rows<B: FusedAutodiffBackend>(
    model: &CausalLm<B>,
    batch: &train_data::Batch,
    input: &train_model::ModelInput<B>,
    router_loss: bool,
) -> TrainingForward<B> {
    let real = router_loss.then(|| batch.real_mask());
    model.forward_for_training(input, real.as_deref(), router_loss)
}

/// The model's gradients from those of its final hidden states `flat` (`[rows, width]`, the
/// LM head's input, computed outside the autodiff graph as `grad_flat`) and, for a trained
/// head, the head's own gradient `grad_head` (f32): `backprop` carries `grad_flat` back through
/// the model (`Σ flat · grad_flat` has it as its gradient), and `grad_head` is added to the
/// head's (the embedding's, when tied). `extra`, a scalar loss of the same forward (the
/// router's load-balancing term), is differentiated with it.
pub(crate) fn backward_from_hidden<B: FusedAutodiffBackend>(
    model: &CausalLm<B>,
    backprop: Backprop<B>,
    flat: Tensor<B, 2>,
    grad_flat: Tensor<B::InnerBackend, 2>,
    grad_head: Option<Tensor<B::InnerBackend, 2>>,
    extra: Option<Tensor<B, 1>>,
) -> GradientsParams {
    let mut surrogate = (flat * Tensor::<B, 2>::from_inner(grad_flat)).sum();
    if let Some(extra) = extra {
        let dtype = surrogate.dtype();
        surrogate = surrogate + extra.cast(dtype);
    }
    let mut grads = backprop.gradients(model, &surrogate);
    if let Some(grad_head) = grad_head {
        let head = model.lm_head_weight();
        let grad_head = grad_head.cast(head.val().dtype());
        let total = match grads.remove::<B::InnerBackend, 2>(head.id) {
            Some(g) => g + grad_head,
            None => grad_head,
        };
        grads.register::<B::InnerBackend, 2>(head.id, total);
    }
    grads
}
