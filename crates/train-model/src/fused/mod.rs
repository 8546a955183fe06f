//! Fused operations with their own backward: attention, RMSNorm, SwiGLU / GeGLU and rotary
//! embedding.
//!
//! burn's pattern for custom operations: [`FusedBackend`] is a backend-extension trait whose
//! methods have a default body ([`mod@reference`], written once with burn's tensor operations, so
//! every backend has them), which a backend may replace with its own kernels (libtorch's fused
//! attention on `tch`: `fused/tch.rs`). For `Autodiff<B>` each operation is implemented once
//! (`fused/autodiff.rs`) as **one** graph node with a hand-written backward that calls `B`'s backward
//! method: the decomposed chain of small operations (a dozen nodes for an RMSNorm, the
//! `[b, h, s, s]` scores and probabilities of attention and their gradients) is neither
//! recorded nor kept.
//!
//! A new backend gets every operation by `impl FusedBackend for MyBackend {}` and replaces a
//! method where it has something faster; its autodiff wrapper needs nothing more.
//!
//! The model calls the functions at the bottom of this module ([`attention`], [`rms_norm`],
//! [`gated`], [`rotary`]); [`crate::AttentionImpl::Standard`] keeps the decomposed path for
//! comparison.

mod autodiff;
#[cfg(feature = "cpu")]
mod flex;
#[cfg(feature = "cpu")]
mod flex_attention;
pub mod reference;
#[cfg(feature = "tch")]
mod tch;

use burn::tensor::{
    DType, Int, Tensor,
    backend::{AutodiffBackend, Backend},
    ops::{FloatTensor, IntTensor},
};

use reference::{float, prim};

pub use crate::config::Activation;

/// What an attention call computes besides `softmax(q kᵀ · scale) v`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Multiplies the scores (usually `1 / √head_dim`).
    pub scale: f64,
    /// Query `i` (absolute position `past + i`) sees only keys at positions `≤ past + i`.
    pub causal: bool,
    /// Keys cached before the first query (the queries' absolute positions start here).
    pub past: usize,
    /// Sliding window: query `i` sees key `j` only when `i − j < window` (Mistral, Gemma).
    pub window: Option<usize>,
    /// Scores become `cap · tanh(scores / cap)` before the mask (Gemma 2).
    pub softcap: Option<f64>,
}

impl AttentionSpec {
    /// Causal attention with `1 / √head_dim` scaling and nothing else.
    pub fn causal(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim.max(1) as f64).sqrt(),
            causal: true,
            past: 0,
            window: None,
            softcap: None,
        }
    }
}

/// One AdamW update (`torch.optim.AdamW`, single-tensor path): the hyper-parameters of this
/// parameter (`weight_decay` 0 for parameters that are not decayed), the step number (from 1)
/// and the factor the gradient is multiplied by first (the clipping coefficient).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate of this step.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub epsilon: f64,
    /// Decoupled weight decay (0: none).
    pub weight_decay: f64,
    /// The step number, from 1 (bias corrections).
    pub step: u64,
    /// The gradient is multiplied by this first.
    pub grad_scale: f64,
}

/// [`AdamWStep`]'s scalars as the f32 values burn's scalar operations use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWScalars {
    pub grad_scale: Option<f32>,
    pub decay: Option<f32>,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub sqrt_bias_correction2: f32,
    pub epsilon: f32,
    pub step_size: f32,
}

impl AdamWStep {
    pub(crate) fn scalars(&self) -> AdamWScalars {
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let bias_correction1 = 1.0 - self.beta1.powi(t);
        let bias_correction2 = 1.0 - self.beta2.powi(t);
        AdamWScalars {
            grad_scale: ((self.grad_scale - 1.0).abs() > f64::EPSILON)
                .then_some(self.grad_scale as f32),
            decay: (self.weight_decay != 0.0).then_some((1.0 - self.lr * self.weight_decay) as f32),
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            sqrt_bias_correction2: bias_correction2.sqrt() as f32,
            epsilon: self.epsilon as f32,
            step_size: (self.lr / bias_correction1) as f32,
        }
    }
}

impl AdamWScalars {
    /// One element: `(param, exp_avg, exp_avg_sq)` after the step, in the reference's order.
    /// (Used by the Flex and tch kernels; a build with neither, such as the fuzz targets', has
    /// no caller.)
    #[inline]
    #[cfg_attr(not(any(feature = "cpu", feature = "tch")), allow(dead_code))]
    pub(crate) fn update(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let g = self.grad_scale.map_or(g, |s| g * s);
        let p = self.decay.map_or(p, |d| p * d);
        let m = m + (g - m) * self.one_minus_beta1;
        let v = v * self.beta2 + g * g * self.one_minus_beta2;
        let denom = v.sqrt() / self.sqrt_bias_correction2 + self.epsilon;
        (p - m / denom * self.step_size, m, v)
    }

    /// [`Self::update`] over whole buffers of equal length, in place, in parallel chunks (the
    /// in-place AdamW of the backends that run on host memory).
    #[cfg(any(feature = "cpu", feature = "tch"))]
    pub(crate) fn update_slices(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 15;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    (p[i], m[i], v[i]) = self.update(p[i], g[i], m[i], v[i]);
                }
            });
    }
}

/// Segment ids of the queries `[b, sq]` and of the keys `[b, sk]`, as tensors.
pub type SegmentTensors<B> = (Tensor<B, 2, Int>, Tensor<B, 2, Int>);

/// Segment ids of the queries `[b, sq]` and of the keys `[b, sk]`: a query sees only keys of
/// its own segment (packed rows), without any `[s, s]` mask in memory.
pub type SegmentIds<B> = Option<(IntTensor<B>, IntTensor<B>)>;

/// A backend with the fused operations. Every method has a default body ([`mod@reference`]).
///
/// Shapes: attention `q [b, h, sq, d]`, `k`, `v` `[b, kvh, sk, d]` with `h` a multiple of `kvh`
/// (grouped-query attention without repeating keys and values); norms and gates on
/// `[rows, width]`; rotary on `[b, h, s, d]` with `cos`, `sin` broadcasting to it.
pub trait FusedBackend: Backend {
    /// True when [`Self::fused_attention`] with segment ids (each segment one contiguous run)
    /// on `device` in `dtype` computes only the scores within each segment, never an `[s, s]`
    /// mask or score tensor: one row of several segments then costs what separate rows cost,
    /// and the runner trains a padded micro-batch as one padding-free row of its examples
    /// (`train_data::Batch::padding_free`). The reference body materialises the mask: `false`.
    fn padding_free_attention(device: &Self::Device, dtype: DType) -> bool {
        let _ = (device, dtype);
        false
    }

    /// Attention output `[b, h, sq, d]`.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: SegmentIds<Self>,
        spec: &AttentionSpec,
    ) -> FloatTensor<Self> {
        Self::fused_attention_lse(q, k, v, segments, spec).0
    }

    /// Attention output and each row's log-sum-exp `[b, h, sq]` (f32), for the backward.
    fn fused_attention_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: SegmentIds<Self>,
        spec: &AttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::attention_forward::<Self>(q, k, v, segments, spec)
    }

    /// Gradients `(dq, dk, dv)` of attention from its output, log-sum-exp and output gradient.
    #[allow(clippy::too_many_arguments)]
    fn fused_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        segments: SegmentIds<Self>,
        spec: &AttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::attention_backward::<Self>(q, k, v, out, lse, grad, segments, spec)
    }

    /// RMSNorm of `x [rows, n]` with scale `weight + offset` `[n]`: the output and each row's
    /// reciprocal rms `[rows, 1]` (f32).
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        offset: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::rms_norm_forward::<Self, 2>(x, weight, eps, offset)
    }

    /// RMSNorm gradients `(dx, d weight)`.
    fn fused_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        offset: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::rms_norm_backward::<Self, 2>(x, weight, rstd, grad, offset)
    }

    /// The gated activation `act(gate) · up`, both `[rows, n]`: SwiGLU (`act` SiLU) or GeGLU
    /// (GELU, tanh approximation).
    fn fused_gated(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        act: Activation,
    ) -> FloatTensor<Self> {
        reference::gated_forward::<Self, 2>(gate, up, act)
    }

    /// Gradients `(d gate, d up)` of [`FusedBackend::fused_gated`].
    fn fused_gated_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: Activation,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::gated_backward::<Self, 2>(gate, up, grad, act)
    }

    /// The gated activation through a projection without bias: `fused_gated(gate, up, act) ·
    /// weightᵀ`, `gate`, `up` `[rows, n]`, `weight` `[out, n]` (an MLP's down projection),
    /// `[rows, out]`. Under autodiff it is one graph node that keeps `gate` and `up` (which the
    /// gate's backward needs anyway) but not the activation `[rows, n]`, which a matmul node
    /// would keep for the weight's gradient: its backward recomputes the activation, an
    /// element-wise pass, and saves one `[rows, intermediate]` buffer per layer of every
    /// training forward.
    fn fused_gated_linear(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        act: Activation,
    ) -> FloatTensor<Self> {
        let h = float::<Self, 2>(Self::fused_gated(gate, up, act));
        prim(crate::model::project(h, float::<Self, 2>(weight), None))
    }

    /// RMSNorm of `x [rows, n]` (scale `norm_weight + offset`) through projections without
    /// bias: `rms_norm(x) · Wᵢᵀ` for each `weights[i]` `[outᵢ, n]`, `[rows, outᵢ]` each (an
    /// attention block's q, k, v or an MLP's gate and up read one norm's output). Under autodiff
    /// each output is one graph node that keeps `x`, the norm's weight and reciprocal rms and
    /// `Wᵢ`, but not the normalised `[rows, n]`, which the projections' matmul nodes would keep
    /// for their weights' gradients: its backward recomputes it (an element-wise pass) and runs
    /// the norm's backward for its own share of the gradient. Saves two `[rows, hidden]`
    /// buffers per decoder layer of every training forward.
    fn fused_rms_norm_linears<const N: usize>(
        x: FloatTensor<Self>,
        norm_weight: FloatTensor<Self>,
        weights: [FloatTensor<Self>; N],
        eps: f64,
        offset: f64,
    ) -> [FloatTensor<Self>; N] {
        let h = float::<Self, 2>(Self::fused_rms_norm(x, norm_weight, eps, offset).0);
        weights.map(|w| prim(crate::model::project(h.clone(), float::<Self, 2>(w), None)))
    }

    /// One AdamW update of a flat f32 parameter `[n]` from its gradient and moments (`[n]`
    /// too): the new `(param, exp_avg, exp_avg_sq)`. The gradient may come in the parameter's
    /// own shape and in any layout (n elements, row-major order): a projection's weight
    /// gradient is often a transposed view, which a backend may read in place instead of
    /// copying it first. Runs on an inner backend (no autodiff).
    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        step: &AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::adamw::<Self>(param, grad, exp_avg, exp_avg_sq, step)
    }

    /// Softmax cross-entropy of f32 `logits [rows, vocab]` against `targets [rows]` (Int, each
    /// below `vocab`): the sum of the rows' NLL `[1]` (f32) and the gradient of
    /// `grad_scale · Σ NLL` with respect to the logits, `(softmax − one_hot) · grad_scale`
    /// `[rows, vocab]` (f32). The inner step of [`crate::fused_linear_nll`]; runs on an inner
    /// backend (no autodiff). A backend may reuse the logits' buffer for the gradient.
    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad_scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::cross_entropy::<Self>(logits, targets, grad_scale)
    }

    /// `acc + lhs · rhs` for `lhs [m, k]`, `rhs [k, n]` and `acc [m, n]` of one dtype: the
    /// chunked LM head's weight gradient summed over chunks ([`crate::fused_linear_nll`]). A
    /// backend may add into `acc`'s buffer in place (a GEMM that accumulates), so that no second
    /// `[m, n]` product exists beside the sum. Runs on an inner backend (no autodiff).
    fn fused_matmul_add(
        acc: FloatTensor<Self>,
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::matmul_add::<Self>(acc, lhs, rhs)
    }

    /// `Σ x²` over every element of `x` (any shape, any layout), in f32, `[1]`: one gradient's
    /// share of the global gradient norm. Runs on an inner backend (no autodiff). A backend may
    /// sum without making the squared copy the reference makes (a table-sized temporary for an
    /// embedding's gradient).
    fn fused_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::sum_squares::<Self>(x)
    }

    /// An embedding lookup: the rows `ids [n]` (Int, each below the table's length) of
    /// `table [vocab, width]`, `[n, width]`. Under autodiff its backward is
    /// [`FusedBackend::fused_embedding_backward`] with `padding`; the lookup itself does not use
    /// it.
    fn fused_embedding(
        table: FloatTensor<Self>,
        ids: IntTensor<Self>,
        padding: Option<i64>,
    ) -> FloatTensor<Self> {
        let _ = padding;
        <Self as burn::tensor::ops::FloatTensorOps<Self>>::float_select(table, 0, ids)
    }

    /// The gradient of [`FusedBackend::fused_embedding`] with respect to the table: `grad
    /// [n, width]` summed into the rows `ids [n]` of a zero `[vocab, width]` table, in `grad`'s
    /// dtype, leaving out the positions whose id is `padding` (`nn.Embedding(padding_idx=…)`:
    /// that row gets no gradient from the lookup). A backend builds it in one `[vocab, width]`
    /// buffer.
    fn fused_embedding_backward(
        grad: FloatTensor<Self>,
        ids: IntTensor<Self>,
        vocab: usize,
        padding: Option<i64>,
    ) -> FloatTensor<Self> {
        reference::embedding_backward::<Self>(grad, ids, vocab, padding)
    }

    /// Rotary embedding `x · cos + rotate_half(x) · sin`.
    fn fused_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::rotary_forward::<Self>(x, cos, sin)
    }

    /// Rotary gradient with respect to `x` (`cos`, `sin` are constants).
    fn fused_rotary_backward(
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::rotary_backward::<Self>(cos, sin, grad)
    }
}

/// An autodiff backend whose inner backend has the fused operations too (what training needs:
/// the trained model runs on `Self`, evaluation on `Self::InnerBackend`).
pub trait FusedAutodiffBackend: AutodiffBackend<InnerBackend: FusedBackend> + FusedBackend {}

impl<B> FusedAutodiffBackend for B
where
    B: AutodiffBackend + FusedBackend,
    B::InnerBackend: FusedBackend,
{
}

#[cfg(feature = "cuda")]
impl FusedBackend for burn::backend::Cuda {}

/// Each of the `rows` rows of `ids` (`[rows, len]` segment ids) as its runs `[lo, hi)` of equal
/// ids, or `None` when some row has a segment in more than one run (or `ids` is not
/// `rows × len`): what lets a kernel attend within each run alone.
#[cfg_attr(not(any(feature = "cpu", feature = "tch")), allow(dead_code))]
pub(crate) fn segment_runs(
    ids: &[i64],
    rows: usize,
    len: usize,
) -> Option<Vec<Vec<(usize, usize)>>> {
    if ids.len() != rows * len {
        return None;
    }
    let mut out = Vec::with_capacity(rows);
    let mut seen = std::collections::HashSet::new();
    for row in ids.chunks(len.max(1)).take(rows) {
        seen.clear();
        let mut runs = Vec::new();
        let mut lo = 0;
        while lo < row.len() {
            let id = row[lo];
            if !seen.insert(id) {
                return None;
            }
            let hi = lo + row[lo..].iter().take_while(|&&x| x == id).count();
            runs.push((lo, hi));
            lo = hi;
        }
        out.push(runs);
    }
    Some(out)
}

fn int_prim<B: Backend>(t: Tensor<B, 2, Int>) -> IntTensor<B> {
    t.into_primitive()
}

/// Attention of `q [b, h, sq, d]` against `k`, `v` `[b, kvh, sk, d]` (see [`AttentionSpec`]).
pub fn attention<B: FusedBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    segments: Option<SegmentTensors<B>>,
    spec: &AttentionSpec,
) -> Tensor<B, 4> {
    let segments = segments.map(|(a, b)| (int_prim(a), int_prim(b)));
    float(B::fused_attention(
        prim(q),
        prim(k),
        prim(v),
        segments,
        spec,
    ))
}

/// RMSNorm over the last dimension with scale `weight + offset`, in f32, returned in `x`'s
/// dtype.
pub fn rms_norm<B: FusedBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
    offset: f64,
) -> Tensor<B, D> {
    let dims = x.dims();
    let n = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let (y, _) = B::fused_rms_norm(prim(x.reshape([rows, n])), prim(weight), eps, offset);
    float::<B, 2>(y).reshape(dims)
}

/// `silu(gate) · up`.
pub fn swiglu<B: FusedBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    gated(gate, up, Activation::Silu)
}

/// `act(gate) · up`: SwiGLU or GeGLU.
pub fn gated<B: FusedBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    act: Activation,
) -> Tensor<B, D> {
    let dims = gate.dims();
    let n = dims[D - 1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = B::fused_gated(
        prim(gate.reshape([rows, n])),
        prim(up.reshape([rows, n])),
        act,
    );
    float::<B, 2>(y).reshape(dims)
}

/// `act(gate) · up` projected by `weight` `[out, n]` without bias (an MLP's down projection):
/// [`FusedBackend::fused_gated_linear`], which does not keep the activation for the backward.
pub fn gated_linear<B: FusedBackend>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    act: Activation,
) -> Tensor<B, 3> {
    let [b, s, n] = gate.dims();
    let out = weight.dims()[0];
    let y = B::fused_gated_linear(
        prim(gate.reshape([b * s, n])),
        prim(up.reshape([b * s, n])),
        prim(weight),
        act,
    );
    float::<B, 2>(y).reshape([b, s, out])
}

/// RMSNorm of `x [b, s, n]` (scale `norm_weight + offset`) through each of `weights` `[outᵢ, n]`
/// without bias: [`FusedBackend::fused_rms_norm_linears`], which does not keep the normalised
/// `x` for the backward. `[b, s, outᵢ]` each.
pub fn rms_norm_linears<B: FusedBackend, const N: usize>(
    x: Tensor<B, 3>,
    norm_weight: Tensor<B, 1>,
    weights: [Tensor<B, 2>; N],
    eps: f64,
    offset: f64,
) -> [Tensor<B, 3>; N] {
    let [b, s, n] = x.dims();
    let ys = B::fused_rms_norm_linears(
        prim(x.reshape([b * s, n])),
        prim(norm_weight),
        weights.map(prim),
        eps,
        offset,
    );
    ys.map(|y| {
        let y = float::<B, 2>(y);
        let out = y.dims()[1];
        y.reshape([b, s, out])
    })
}

/// The rows `ids [n]` of `table [vocab, width]`: [`FusedBackend::fused_embedding`], whose
/// gradient skips the positions holding `padding` and is built in one `[vocab, width]` buffer.
pub fn embedding<B: FusedBackend>(
    table: Tensor<B, 2>,
    ids: Tensor<B, 1, Int>,
    padding: Option<i64>,
) -> Tensor<B, 2> {
    float(B::fused_embedding(
        prim(table),
        ids.into_primitive(),
        padding,
    ))
}

/// Rotary embedding of `x [b, h, s, d]` (`cos`, `sin` broadcasting to it).
pub fn rotary<B: FusedBackend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    float(B::fused_rotary(
        prim(x),
        prim(cos.clone()),
        prim(sin.clone()),
    ))
}

#[cfg(test)]
mod tests {
    use super::segment_runs;

    #[test]
    fn segment_runs_are_the_runs_of_each_row_or_none_when_a_segment_comes_back() {
        assert_eq!(
            segment_runs(&[0, 0, 1, 2, 2, 2, 5, 5, 5, 5], 2, 5),
            Some(vec![vec![(0, 2), (2, 3), (3, 5)], vec![(0, 1), (1, 5)]])
        );
        // Ids are per row: the second row may reuse the first row's.
        assert_eq!(
            segment_runs(&[7, 7, 7, 7], 2, 2),
            Some(vec![vec![(0, 2)], vec![(0, 2)]])
        );
        assert_eq!(segment_runs(&[0, 1, 0], 1, 3), None);
        assert_eq!(segment_runs(&[0, 1, 0], 2, 3), None);
        assert_eq!(segment_runs(&[], 0, 3), Some(vec![]));
    }
}
