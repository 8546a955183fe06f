//! The causal language-modelling loss over label tokens.

use burn::tensor::{
    FloatDType, Int, Tensor, TensorPrimitive, activation::log_softmax, backend::Backend,
};

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

/// What [`fused_linear_nll`] returns.
#[derive(Debug, Clone)]
pub struct LinearNll<B: Backend> {
    /// Sum of the negative log-likelihoods (f32, one element).
    pub sum: Tensor<B, 1>,
    /// `grad_scale ×` d sum / d hidden, `[rows, hidden]`, in the hidden states' dtype.
    pub grad_hidden: Tensor<B, 2>,
    /// `grad_scale ×` d sum / d weight, `[vocab, hidden]`, in f32; `None` when not asked for
    /// (a frozen head).
    pub grad_weight: Option<Tensor<B, 2>>,
}

/// Most f32 logits one chunk of [`fused_linear_nll`] holds: 2²⁴ (64 MiB), unless that is
/// fewer than [`MIN_NLL_CHUNK_ROWS`] rows.
pub const NLL_CHUNK_LOGITS: usize = 1 << 24;

/// Fewest rows of a chunk of [`fused_linear_nll`] (when there are that many): below it the
/// per-chunk `[vocab, hidden]` gradient addition and head packing outweigh the GEMMs.
pub const MIN_NLL_CHUNK_ROWS: usize = 256;

/// How many rows [`fused_linear_nll`] takes at a time for `rows` label tokens over a vocabulary
/// of `vocab`: as few equal chunks as keep each chunk's `[chunk, vocab]` f32 logits within
/// [`NLL_CHUNK_LOGITS`] (at least [`MIN_NLL_CHUNK_ROWS`] rows). Few large chunks matter for
/// speed: every chunk multiplies by the whole `[vocab, hidden]` head (packing it again) and
/// adds a `[vocab, hidden]` weight gradient whose inner dimension is the chunk; 128-row chunks
/// made the 28M bench shape's step spend more in GEMM packing and gradient additions than
/// PyTorch's whole-logits head.
pub fn nll_chunk_rows(rows: usize, vocab: usize) -> usize {
    let cap = (NLL_CHUNK_LOGITS / vocab.max(1)).max(MIN_NLL_CHUNK_ROWS);
    let rows = rows.max(1);
    rows.div_ceil(rows.div_ceil(cap))
}

/// Negative log-likelihood of `targets` under the logits `hidden @ weight^T` **and its
/// gradients**, computed `chunk_rows` rows at a time: a fused linear + cross-entropy (as
/// Liger-Kernel's), so that the full `[rows, vocab]` logits, their softmax and their gradient
/// never exist at once and nothing of them is kept for a backward pass.
///
/// `hidden` holds only rows that have a label (`[rows, hidden]`, e.g. the final norm's output
/// at positions whose next token is trained), `weight` is the LM head `[vocab, hidden]`,
/// `targets` the label of each row. Per chunk: logits in the hidden dtype, log-sum-exp and
/// softmax in f32 (as [`causal_lm_nll`]), `d logits = (softmax − one_hot) · grad_scale`, then
/// `d hidden = d logits @ weight` and, when `weight_grad`, `d weight += d logitsᵀ @ hidden`.
/// Mathematically the same as differentiating [`causal_lm_nll`]; only the summation order
/// differs.
pub fn fused_linear_nll<B: crate::FusedBackend>(
    hidden: &Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: &Tensor<B, 1, Int>,
    grad_scale: f64,
    chunk_rows: usize,
    weight_grad: bool,
) -> LinearNll<B> {
    let [rows, width] = hidden.dims();
    let [vocab, _] = weight.dims();
    let device = hidden.device();
    let dtype = hidden.dtype();
    let weight = if weight.dtype() == dtype {
        weight
    } else {
        weight.cast(dtype)
    };
    let mut sum = Tensor::<B, 1>::zeros([1], (&device, burn::tensor::DType::F32));
    let mut grad_weight: Option<Tensor<B, 2>> = None;
    let mut grad_hidden = Vec::new();
    let chunk = chunk_rows.max(1);
    let mut start = 0;
    while start < rows {
        let len = chunk.min(rows - start);
        let h = hidden.clone().narrow(0, start, len);
        let t = targets.clone().narrow(0, start, len);
        let logits = h
            .clone()
            .matmul(weight.clone().transpose())
            .cast(FloatDType::F32);
        let (nll, grad) = B::fused_cross_entropy(
            logits.into_primitive().tensor(),
            t.into_primitive(),
            grad_scale,
        );
        sum = sum + Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(nll));
        let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad));
        let grad = if dtype == burn::tensor::DType::F32 {
            grad
        } else {
            grad.cast(dtype)
        };
        grad_hidden.push(grad.clone().matmul(weight.clone()));
        if weight_grad {
            grad_weight = Some(match grad_weight {
                // Added into the sum in place where the backend can: no second
                // `[vocab, hidden]` product beside it.
                Some(acc) if dtype == burn::tensor::DType::F32 => {
                    Tensor::from_primitive(TensorPrimitive::Float(B::fused_matmul_add(
                        acc.into_primitive().tensor(),
                        grad.transpose().into_primitive().tensor(),
                        h.into_primitive().tensor(),
                    )))
                }
                Some(acc) => acc + grad.transpose().matmul(h).cast(FloatDType::F32),
                None => grad.transpose().matmul(h).cast(FloatDType::F32),
            });
        }
        start += len;
    }
    LinearNll {
        sum,
        grad_hidden: if grad_hidden.is_empty() {
            Tensor::zeros([0, width], (&device, dtype))
        } else {
            Tensor::cat(grad_hidden, 0)
        },
        grad_weight: grad_weight.or_else(|| {
            weight_grad.then(|| Tensor::zeros([vocab, width], (&device, burn::tensor::DType::F32)))
        }),
    }
}

#[cfg(test)]
#[cfg(feature = "cpu")]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData};

    type Ad = Autodiff<Flex>;

    fn max_abs_diff(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The fused chunks give the loss and the gradients that autodiff gives through
    /// `causal_lm_nll` on materialised logits, for every chunk size.
    #[test]
    fn fused_matches_autodiff_of_the_plain_loss() {
        let device = Default::default();
        let (rows, width, vocab) = (7, 5, 11);
        let hidden =
            Tensor::<Flex, 2>::random([rows, width], Distribution::Normal(0.0, 1.0), &device);
        let weight =
            Tensor::<Flex, 2>::random([vocab, width], Distribution::Normal(0.0, 1.0), &device);
        let targets: Vec<i64> = (0..rows as i64)
            .map(|i| (i * 5 + 3) % vocab as i64)
            .collect();

        // Reference: the rows as one sequence of length rows + 1 whose labels are the targets
        // shifted by one, through autodiff.
        let h = Tensor::<Ad, 2>::from_inner(hidden.clone()).require_grad();
        let w = Tensor::<Ad, 2>::from_inner(weight.clone()).require_grad();
        let logits = h.clone().matmul(w.clone().transpose());
        let pad = Tensor::<Ad, 2>::zeros([1, vocab], &device);
        let logits = Tensor::cat(vec![logits, pad], 0).reshape([1, rows + 1, vocab]);
        let mut labels = vec![IGNORE_INDEX];
        labels.extend(&targets);
        let labels =
            Tensor::<Ad, 2, Int>::from_data(TensorData::new(labels, [1, rows + 1]), &device);
        let (sum, _) = causal_lm_nll(logits, labels);
        let scale = 0.25;
        let grads = (sum.clone() * scale).backward();
        let (ref_gh, ref_gw) = (h.grad(&grads).unwrap(), w.grad(&grads).unwrap());
        let ref_sum: f32 = sum.inner().into_scalar();

        let t = Tensor::<Flex, 1, Int>::from_data(TensorData::new(targets, [rows]), &device);
        for chunk in [1, 3, rows, 100] {
            let out = fused_linear_nll(&hidden, weight.clone(), &t, scale, chunk, true);
            let got: f32 = out.sum.into_scalar();
            assert!(
                (got - ref_sum).abs() < 1e-4,
                "chunk {chunk}: sum {got} vs {ref_sum}"
            );
            let dh = max_abs_diff(out.grad_hidden, ref_gh.clone());
            let dw = max_abs_diff(out.grad_weight.expect("asked for"), ref_gw.clone());
            assert!(
                dh < 1e-5 && dw < 1e-5,
                "chunk {chunk}: grad diffs {dh} {dw}"
            );
        }
    }

    #[test]
    fn chunk_rows_bounds() {
        // 64 MiB of logits is 341 rows of 49 152: three equal chunks, or four of 256.
        assert_eq!(nll_chunk_rows(1022, 49_152), 341);
        assert_eq!(nll_chunk_rows(1023, 49_152), 341);
        assert_eq!(nll_chunk_rows(1024, 49_152), 256);
        // Qwen3's vocabulary: 64 MiB is 110 rows, so the 256-row floor.
        assert_eq!(nll_chunk_rows(8188, 151_936), 256);
        assert_eq!(nll_chunk_rows(300, 151_936), 150);
        assert_eq!(nll_chunk_rows(10, 100), 10);
        assert_eq!(nll_chunk_rows(0, 100), 1);
    }
}
