//! The fused operations written once with burn's tensor operations, for every backend.
//!
//! These are the default bodies of [`super::FusedBackend`]'s methods. Run on an inner backend
//! (no autodiff) they are one graph node each under [`burn::backend::Autodiff`], whose backward
//! is the matching `*_backward` function here; nothing but the inputs and a few row statistics
//! is kept for it. Attention is tiled over query blocks: no `[s, s]` tensor per head ever
//! exists, the forward keeps the log-sum-exp of each row and the backward recomputes the
//! probabilities from it (FlashAttention's scheme, in blocks of whole key rows).

use burn::tensor::{
    Bool, DType, FloatDType, Int, Tensor, TensorPrimitive,
    activation::sigmoid,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};

use super::{Activation, AdamWStep, AttentionSpec, SegmentTensors};

/// Bytes of f32 scores one attention block may hold (`[b, h, rows, keys]`).
const BLOCK_SCORE_BYTES: usize = 32 << 20;
/// Query rows per attention block at most: blocks let causal attention skip the keys after a
/// block's last query.
const MAX_BLOCK_ROWS: usize = 128;

pub(crate) fn float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

pub(crate) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn int<B: Backend, const D: usize>(p: IntTensor<B>) -> Tensor<B, D, Int> {
    Tensor::from_primitive(p)
}

fn f32_of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(FloatDType::F32)
    }
}

fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// Query rows per block for `[b, h, sq, d] × [b, kvh, sk, d]`.
fn block_rows(b: usize, h: usize, sq: usize, sk: usize) -> usize {
    let per_row = (b * h * sk * 4).max(1);
    (BLOCK_SCORE_BYTES / per_row)
        .clamp(1, MAX_BLOCK_ROWS)
        .min(sq.max(1))
}

/// The keys queries `q0 .. q0 + rows` may see at all: `[start, end)`.
fn key_range(spec: &AttentionSpec, q0: usize, rows: usize, sk: usize) -> (usize, usize) {
    let first = spec.past + q0;
    let last = first + rows - 1;
    let end = if spec.causal { (last + 1).min(sk) } else { sk };
    let start = match spec.window {
        Some(w) if w > 0 => (first + 1).saturating_sub(w).min(end),
        _ => 0,
    };
    (start, end.max(start))
}

/// `[b | 1, 1, 1, rows, keys]` additive f32 bias of one block (0 allowed, `f32::MIN` not), or
/// `None` when every pair in the block is allowed.
#[allow(clippy::too_many_arguments)]
fn block_bias<B: Backend>(
    spec: &AttentionSpec,
    segments: Option<&SegmentTensors<B>>,
    batch: usize,
    q0: usize,
    rows: usize,
    k0: usize,
    keys: usize,
    device: &B::Device,
) -> Option<Tensor<B, 5>> {
    let first = spec.past + q0;
    let mut forbidden: Option<Tensor<B, 3, Bool>> = None;
    let q_idx = || {
        Tensor::<B, 1, Int>::arange(first as i64..(first + rows) as i64, device)
            .reshape([1, rows, 1])
            .expand([1, rows, keys])
    };
    let k_idx = || {
        Tensor::<B, 1, Int>::arange(k0 as i64..(k0 + keys) as i64, device)
            .reshape([1, 1, keys])
            .expand([1, rows, keys])
    };
    let union = |acc: Option<Tensor<B, 3, Bool>>, m: Tensor<B, 3, Bool>| {
        Some(match acc {
            None => m,
            Some(a) => {
                let [ab, ..] = a.dims();
                let [mb, ..] = m.dims();
                let n = ab.max(mb);
                a.expand([n, rows, keys]).bool_or(m.expand([n, rows, keys]))
            }
        })
    };
    if spec.causal && k0 + keys > first + 1 {
        forbidden = union(forbidden, k_idx().greater(q_idx()));
    }
    if let Some(w) = spec.window.filter(|w| *w > 0)
        && k0 + w < first + rows
    {
        // Query i sees key j when i - j < w.
        let too_old = k_idx().add_scalar(w as i64).lower_equal(q_idx());
        forbidden = union(forbidden, too_old);
    }
    if let Some((sq, sk)) = segments {
        let a = sq
            .clone()
            .narrow(1, q0, rows)
            .reshape([batch, rows, 1])
            .expand([batch, rows, keys]);
        let b = sk
            .clone()
            .narrow(1, k0, keys)
            .reshape([batch, 1, keys])
            .expand([batch, rows, keys]);
        forbidden = union(forbidden, a.not_equal(b));
    }
    forbidden.map(|m| {
        let [n, ..] = m.dims();
        Tensor::<B, 3>::zeros([n, rows, keys], (device, DType::F32))
            .mask_fill(m, f32::MIN)
            .reshape([n, 1, 1, rows, keys])
    })
}

/// The pieces of one attention block: `[b, kvh, n, rows, keys]` raw f32 scores (scaled, before
/// the softcap), and the same after softcap and mask.
struct Scores<B: Backend> {
    raw: Option<Tensor<B, 5>>,
    masked: Tensor<B, 5>,
}

#[allow(clippy::too_many_arguments)]
fn block_scores<B: Backend>(
    qb: &Tensor<B, 4>,
    kb: &Tensor<B, 4>,
    spec: &AttentionSpec,
    segments: Option<&SegmentTensors<B>>,
    group: usize,
    q0: usize,
    k0: usize,
    keep_raw: bool,
) -> Scores<B> {
    let [b, kvh, gr, _] = qb.dims();
    let rows = gr / group;
    let keys = kb.dims()[2];
    let device = qb.device();
    let s = f32_of(qb.clone().matmul(kb.clone().transpose())).mul_scalar(spec.scale);
    let raw = s.reshape([b, kvh, group, rows, keys]);
    let capped = match spec.softcap {
        Some(cap) => raw.clone().div_scalar(cap).tanh().mul_scalar(cap),
        None => raw.clone(),
    };
    let masked = match block_bias(spec, segments, b, q0, rows, k0, keys, &device) {
        Some(bias) => capped + bias,
        None => capped,
    };
    Scores {
        raw: (keep_raw && spec.softcap.is_some()).then_some(raw),
        masked,
    }
}

/// `q [b, h, sq, d]` with `h = kvh · group` as `[b, kvh, group, sq, d]`.
fn grouped<B: Backend>(q: Tensor<B, 4>, kvh: usize) -> Tensor<B, 5> {
    let [b, h, s, d] = q.dims();
    q.reshape([b, kvh, h / kvh, s, d])
}

/// Rows `q0 .. q0 + rows` of a grouped `[b, kvh, group, s, d]` tensor as `[b, kvh, group·rows, d]`.
fn rows_of<B: Backend>(x: &Tensor<B, 5>, q0: usize, rows: usize) -> Tensor<B, 4> {
    let [b, kvh, g, _, d] = x.dims();
    x.clone().narrow(3, q0, rows).reshape([b, kvh, g * rows, d])
}

type Segments<B> = Option<(IntTensor<B>, IntTensor<B>)>;

fn segments_of<B: Backend>(s: Segments<B>) -> Option<SegmentTensors<B>> {
    s.map(|(a, b)| (int(a), int(b)))
}

/// Attention forward: the output `[b, h, sq, d]` and each row's log-sum-exp `[b, h, sq]` (f32).
pub fn attention_forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    segments: Segments<B>,
    spec: &AttentionSpec,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let rows = attention_block_rows::<B>(&q, &k);
    attention_forward_in_blocks::<B>(q, k, v, segments, spec, rows)
}

fn attention_block_rows<B: Backend>(q: &FloatTensor<B>, k: &FloatTensor<B>) -> usize {
    use burn::tensor::TensorMetadata;
    let (qs, ks) = (q.shape(), k.shape());
    block_rows(qs[0], qs[1], qs[2], ks[2])
}

/// [`attention_forward`] with `block_rows` query rows per block (any block size gives the same
/// result up to rounding; exposed for tests and tuning).
pub fn attention_forward_in_blocks<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    segments: Segments<B>,
    spec: &AttentionSpec,
    block_rows: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let q = float::<B, 4>(q);
    let k = float::<B, 4>(k);
    let v = float::<B, 4>(v);
    let segments = segments_of::<B>(segments);
    let [b, h, sq, d] = q.dims();
    let [_, kvh, sk, _] = k.dims();
    let dtype = q.dtype();
    let group = h / kvh.max(1);
    let q5 = grouped(q, kvh);
    let rows_per = block_rows.max(1);
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let mut q0 = 0;
    while q0 < sq {
        let rows = rows_per.min(sq - q0);
        let (k0, k1) = key_range(spec, q0, rows, sk);
        let qb = rows_of(&q5, q0, rows);
        let kb = k.clone().narrow(2, k0, k1 - k0);
        let vb = v.clone().narrow(2, k0, k1 - k0);
        let s = block_scores(&qb, &kb, spec, segments.as_ref(), group, q0, k0, false).masked;
        let max = s.clone().max_dim(4);
        let e = (s - max.clone()).exp();
        let sum = e.clone().sum_dim(4);
        let p = to_dtype(e / sum.clone(), dtype).reshape([b, kvh, group * rows, k1 - k0]);
        outs.push(p.matmul(vb).reshape([b, kvh, group, rows, d]));
        lses.push(max + sum.log());
        q0 += rows;
    }
    let out = Tensor::cat(outs, 3).reshape([b, h, sq, d]);
    let lse = Tensor::cat(lses, 3).reshape([b, h, sq]);
    (prim(out), prim(lse))
}

/// Attention backward from the forward's output and log-sum-exp: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
    segments: Segments<B>,
    spec: &AttentionSpec,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let rows = attention_block_rows::<B>(&q, &k);
    attention_backward_in_blocks::<B>(q, k, v, out, lse, grad, segments, spec, rows)
}

/// [`attention_backward`] with `block_rows` query rows per block.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_in_blocks<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
    segments: Segments<B>,
    spec: &AttentionSpec,
    block_rows: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let q = float::<B, 4>(q);
    let k = float::<B, 4>(k);
    let v = float::<B, 4>(v);
    let segments = segments_of::<B>(segments);
    let [b, h, sq, d] = q.dims();
    let [_, kvh, sk, _] = k.dims();
    let dtype = q.dtype();
    let device = q.device();
    let group = h / kvh.max(1);
    let q5 = grouped(q, kvh);
    let grad5 = grouped(to_dtype(float::<B, 4>(grad), dtype), kvh);
    // D = rowsum(dO ∘ O), once for all rows.
    let delta = (f32_of(grad5.clone()) * f32_of(grouped(float::<B, 4>(out), kvh))).sum_dim(4);
    let lse = float::<B, 3>(lse).reshape([b, kvh, group, sq, 1]);
    let mut dk = Tensor::<B, 4>::zeros([b, kvh, sk, d], (&device, DType::F32));
    let mut dv = Tensor::<B, 4>::zeros([b, kvh, sk, d], (&device, DType::F32));
    let mut dqs = Vec::new();
    let rows_per = block_rows.max(1);
    let mut q0 = 0;
    while q0 < sq {
        let rows = rows_per.min(sq - q0);
        let (k0, k1) = key_range(spec, q0, rows, sk);
        let keys = k1 - k0;
        let qb = rows_of(&q5, q0, rows);
        let gb = rows_of(&grad5, q0, rows);
        let kb = k.clone().narrow(2, k0, keys);
        let vb = v.clone().narrow(2, k0, keys);
        let scores = block_scores(&qb, &kb, spec, segments.as_ref(), group, q0, k0, true);
        let p = (scores.masked - lse.clone().narrow(3, q0, rows)).exp();
        let p4 = p.clone().reshape([b, kvh, group * rows, keys]);
        let dv_b = to_dtype(p4, dtype).transpose().matmul(gb.clone());
        let dp = f32_of(gb.matmul(vb.transpose())).reshape([b, kvh, group, rows, keys]);
        let mut ds = p * (dp - delta.clone().narrow(3, q0, rows));
        if let (Some(cap), Some(raw)) = (spec.softcap, scores.raw) {
            let t = raw.div_scalar(cap).tanh();
            ds = ds * (t.clone() * t).neg().add_scalar(1.0);
        }
        let ds = to_dtype(
            ds.mul_scalar(spec.scale)
                .reshape([b, kvh, group * rows, keys]),
            dtype,
        );
        dqs.push(ds.clone().matmul(kb).reshape([b, kvh, group, rows, d]));
        let dk_b = ds.transpose().matmul(qb);
        // Update in place: the sums are formed first, so `dk` / `dv` are unshared when assigned.
        let range = [0..b, 0..kvh, k0..k1, 0..d];
        let dk_sum = dk.clone().slice(range.clone()) + f32_of(dk_b);
        dk = dk.slice_assign(range.clone(), dk_sum);
        let dv_sum = dv.clone().slice(range.clone()) + f32_of(dv_b);
        dv = dv.slice_assign(range, dv_sum);
        q0 += rows;
    }
    let dq = Tensor::cat(dqs, 3).reshape([b, h, sq, d]);
    (
        prim(dq),
        prim(to_dtype(dk, k.dtype())),
        prim(to_dtype(dv, v.dtype())),
    )
}

/// RMSNorm forward over the last dimension: `y = (x / rms(x)) · (w + offset)` computed in f32
/// and returned in `x`'s dtype (the weight cast to it, as `transformers`), with the reciprocal
/// rms of each row `[..., 1]` (f32).
pub fn rms_norm_forward<B: Backend, const D: usize>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
    offset: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = float::<B, D>(x);
    let dtype = x.dtype();
    let xf = f32_of(x);
    let rstd = (xf.clone().square().mean_dim(D - 1) + eps).sqrt().recip();
    let normed = to_dtype(xf * rstd.clone(), dtype);
    let w = scale_of::<B, D>(weight, offset, dtype);
    (prim(normed * w), prim(rstd))
}

/// `(w + offset)` in `dtype`, shaped to broadcast over the last dimension of a rank-`D` tensor.
fn scale_of<B: Backend, const D: usize>(
    weight: FloatTensor<B>,
    offset: f64,
    dtype: DType,
) -> Tensor<B, D> {
    let w = float::<B, 1>(weight);
    let w = if offset == 0.0 {
        w
    } else {
        w.add_scalar(offset)
    };
    let n = w.dims()[0];
    let mut shape = [1usize; D];
    shape[D - 1] = n;
    to_dtype(w, dtype).reshape(shape)
}

/// RMSNorm backward: `(dx, dw)` (`dw` in the weight's dtype).
pub fn rms_norm_backward<B: Backend, const D: usize>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    rstd: FloatTensor<B>,
    grad: FloatTensor<B>,
    offset: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = float::<B, D>(x);
    let dtype = x.dtype();
    let w_dtype = burn::tensor::TensorMetadata::dtype(&weight);
    let n = x.dims()[D - 1];
    let rstd = float::<B, D>(rstd);
    let g = float::<B, D>(grad);
    let xhat = f32_of(x) * rstd.clone();
    // dw: the forward multiplies the dtype-rounded normalised value by the weight.
    let dw = (f32_of(g.clone()) * f32_of(to_dtype(xhat.clone(), dtype)))
        .reshape([g.dims()[..D - 1].iter().product::<usize>(), n])
        .sum_dim(0)
        .reshape([n]);
    let gw = f32_of(g) * f32_of(scale_of::<B, D>(weight, offset, dtype));
    let mean = (gw.clone() * xhat.clone()).mean_dim(D - 1);
    let dx = (gw - xhat * mean) * rstd;
    (prim(to_dtype(dx, dtype)), prim(to_dtype(dw, w_dtype)))
}

/// √(2/π), the constant of GELU's tanh approximation.
pub(crate) const GELU_K: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of GELU's tanh approximation.
pub(crate) const GELU_C: f64 = 0.044_715;

/// `act(g)` and `d act / d g`.
fn activation_and_derivative<B: Backend, const D: usize>(
    g: Tensor<B, D>,
    act: Activation,
) -> (Tensor<B, D>, Tensor<B, D>) {
    match act {
        Activation::GeluTanh => {
            // gelu(g) = ½ g (1 + t), t = tanh(k (g + c g³));
            // d/dg = ½ (1 + t) + ½ g (1 − t²) k (1 + 3 c g²).
            let g2 = g.clone() * g.clone();
            let inner = (g.clone() * (g2.clone() * GELU_C).add_scalar(1.0)) * GELU_K;
            let t = inner.tanh();
            let one_plus_t = t.clone().add_scalar(1.0);
            let value = g.clone() * one_plus_t.clone() * 0.5;
            let sech2 = (t.clone() * t).neg().add_scalar(1.0);
            let d = one_plus_t * 0.5
                + g * sech2 * (g2 * (3.0 * GELU_C)).add_scalar(1.0) * (0.5 * GELU_K);
            (value, d)
        }
        _ => {
            let s = sigmoid(g.clone());
            let value = g.clone() * s.clone();
            // d silu / d g = s · (1 + g · (1 − s)).
            let d = s.clone() * (g * (s.neg().add_scalar(1.0))).add_scalar(1.0);
            (value, d)
        }
    }
}

/// The gated activation `act(gate) · up` (SwiGLU, GeGLU).
pub fn gated_forward<B: Backend, const D: usize>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    act: Activation,
) -> FloatTensor<B> {
    let g = float::<B, D>(gate);
    let value = match act {
        Activation::GeluTanh => burn::tensor::activation::gelu_approximate(g),
        _ => g.clone() * sigmoid(g),
    };
    prim(value * float::<B, D>(up))
}

/// `acc + lhs · rhs` ([`super::FusedBackend::fused_matmul_add`]'s default body).
pub fn matmul_add<B: Backend>(
    acc: FloatTensor<B>,
    lhs: FloatTensor<B>,
    rhs: FloatTensor<B>,
) -> FloatTensor<B> {
    prim(float::<B, 2>(acc) + float::<B, 2>(lhs).matmul(float::<B, 2>(rhs)))
}

/// Its backward: `(d gate, d up)`.
pub fn gated_backward<B: Backend, const D: usize>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
    act: Activation,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let g = float::<B, D>(gate);
    let u = float::<B, D>(up);
    let dy = float::<B, D>(grad);
    let (value, d) = activation_and_derivative(g, act);
    let du = dy.clone() * value;
    (prim(dy * u * d), prim(du))
}

/// Rotary embedding: `x · cos + rotate_half(x) · sin` over the last dimension; `cos`, `sin`
/// broadcast to `x` (`[b | 1, 1, s, d]` against `[b, h, s, d]`).
pub fn rotary_forward<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
) -> FloatTensor<B> {
    let x = float::<B, 4>(x);
    let dtype = x.dtype();
    let cos = to_dtype(float::<B, 4>(cos), dtype);
    let sin = to_dtype(float::<B, 4>(sin), dtype);
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    prim(x * cos + rotated * sin)
}

/// Rotary backward: `dy · cos + rotate_halfᵀ(dy · sin)`, with `rotate_halfᵀ([a, b]) = [b, −a]`.
pub fn rotary_backward<B: Backend>(
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let g = float::<B, 4>(grad);
    let dtype = g.dtype();
    let cos = to_dtype(float::<B, 4>(cos), dtype);
    let sin = to_dtype(float::<B, 4>(sin), dtype);
    let d = g.dims()[3];
    let gs = g.clone() * sin;
    let a = gs.clone().narrow(3, 0, d / 2);
    let b = gs.narrow(3, d / 2, d / 2);
    prim(g * cos + Tensor::cat(vec![b, a.neg()], 3))
}

/// One AdamW update (`torch.optim.AdamW`, single-tensor path, operation by operation):
/// `(param, exp_avg, exp_avg_sq)` after the step.
pub fn adamw<B: Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    exp_avg: FloatTensor<B>,
    exp_avg_sq: FloatTensor<B>,
    step: &AdamWStep,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let k = step.scalars();
    let mut p = float::<B, 1>(param);
    let grad = B::float_reshape(grad, p.shape());
    let mut g = float::<B, 1>(grad);
    let m = float::<B, 1>(exp_avg);
    let v = float::<B, 1>(exp_avg_sq);
    if let Some(s) = k.grad_scale {
        g = g.mul_scalar(s);
    }
    if let Some(d) = k.decay {
        p = p.mul_scalar(d);
    }
    let m = m.clone() + (g.clone() - m).mul_scalar(k.one_minus_beta1);
    let v = v.mul_scalar(k.beta2) + (g.clone() * g).mul_scalar(k.one_minus_beta2);
    let denom = v
        .clone()
        .sqrt()
        .div_scalar(k.sqrt_bias_correction2)
        .add_scalar(k.epsilon);
    let p = p - (m.clone() / denom).mul_scalar(k.step_size);
    (prim(p), prim(m), prim(v))
}

/// [`super::FusedBackend::fused_sum_squares`] in burn's tensor operations: flattened, cast to
/// f32, squared, summed.
pub fn sum_squares<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    use burn::tensor::TensorMetadata;
    let n = x.shape().num_elements();
    let flat = float::<B, 1>(B::float_reshape(x, burn::tensor::Shape::new([n])));
    prim(flat.cast(FloatDType::F32).square().sum())
}

/// [`super::FusedBackend::fused_embedding_backward`] in burn's tensor operations: the gradient
/// rows (those at `padding` zeroed) added into a zero table by `select_assign`.
pub fn embedding_backward<B: Backend>(
    grad: FloatTensor<B>,
    ids: IntTensor<B>,
    vocab: usize,
    padding: Option<i64>,
) -> FloatTensor<B> {
    let grad = float::<B, 2>(grad);
    let [n, width] = grad.dims();
    let ids = Tensor::<B, 1, Int>::from_primitive(ids);
    let grad = match padding {
        Some(pad) => {
            let keep = ids
                .clone()
                .not_equal_elem(pad)
                .float()
                .cast(grad.dtype())
                .reshape([n, 1]);
            grad * keep
        }
        None => grad,
    };
    let zeros = Tensor::<B, 2>::zeros([vocab, width], (&grad.device(), grad.dtype()));
    prim(zeros.select_assign(0, ids, grad, burn::tensor::IndexingUpdateOp::Add))
}

/// [`super::FusedBackend::fused_cross_entropy`] in burn's tensor operations: max, `exp`,
/// sum, log-sum-exp and the gathered target logit per row; the gradient as
/// `(e / Σe + scatter(−1 at the target)) · grad_scale`.
pub fn cross_entropy<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    grad_scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let logits = float::<B, 2>(logits);
    let [rows, _] = logits.dims();
    let device = logits.device();
    let t = Tensor::<B, 1, Int>::from_primitive(targets).reshape([rows, 1]);
    let max = logits.clone().max_dim(1);
    let exp = (logits.clone() - max.clone()).exp();
    let total = exp.clone().sum_dim(1);
    let picked = logits.gather(1, t.clone());
    let sum = (total.clone().log() + max - picked).sum();
    let minus_one = Tensor::<B, 2>::full([rows, 1], -1.0, (&device, DType::F32));
    let grad = (exp / total)
        .scatter(1, t, minus_one, burn::tensor::IndexingUpdateOp::Add)
        .mul_scalar(grad_scale);
    (prim(sum), prim(grad))
}
