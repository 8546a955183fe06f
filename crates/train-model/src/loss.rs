//! The causal language-modelling loss over label tokens.

use burn::tensor::{FloatDType, Int, Tensor, activation::log_softmax, backend::Backend};

/// Label value that takes no part in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Sum of the negative log-likelihoods of every label token, and the number of label tokens.
///
/// `labels` are aligned with the inputs, as in `transformers`: position `t` predicts
/// `labels[t + 1]`; labels equal to [`IGNORE_INDEX`] are skipped. The log-softmax runs in f32
/// whatever the logits' dtype. Returning the sum (not the mean) lets a trainer divide by the
/// label count of a whole optimizer step, so that padding, packing and gradient accumulation do
/// not change the loss.
pub fn causal_lm_nll<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [b, s, v] = logits.dims();
    let device = logits.device();
    if s < 2 {
        let zero = Tensor::<B, 1>::zeros([1], &device);
        return (zero.clone(), zero);
    }
    let n = b * (s - 1);
    let logits = logits
        .narrow(1, 0, s - 1)
        .reshape([n, v])
        .cast(FloatDType::F32);
    let targets = labels.narrow(1, 1, s - 1).reshape([n]);
    let keep = targets.clone().not_equal_elem(IGNORE_INDEX);
    let safe = targets.mask_fill(keep.clone().bool_not(), 0);
    let nll = log_softmax(logits, 1)
        .gather(1, safe.reshape([n, 1]))
        .reshape([n])
        .neg();
    let k = keep.float().cast(FloatDType::F32);
    ((nll * k.clone()).sum(), k.sum())
}

/// Mean cross-entropy over the label tokens (what `transformers` reports as `loss`).
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let (sum, count) = causal_lm_nll(logits, labels);
    sum / count.clamp_min(1.0)
}
