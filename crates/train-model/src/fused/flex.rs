//! Kernels of their own for burn's Flex (CPU) backend: RMSNorm, SwiGLU and AdamW as single
//! passes over f32 rows, in parallel over row chunks, instead of a chain of element-wise
//! operations that each allocate a fresh buffer; the embedding's gradient in one zeroed table
//! (burn's `select_add` on the reference's zeros made a second one). Other dtypes and non-f32 inputs take the
//! reference body. Attention forward and backward: [`mod@super::flex_attention`].
//!
//! Each kernel performs the reference's floating-point operations in the reference's order on
//! each element, so results are the same to the last bit where the reference's reductions are
//! sequential (AdamW, SwiGLU) and within rounding of a row's sum (RMSNorm).

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{
    DType, Shape, TensorData,
    ops::{FloatTensor, IntTensor},
};
use rayon::prelude::*;

use super::{Activation, AdamWStep, AttentionSpec, FusedBackend, SegmentIds, reference};

/// Elements per parallel chunk of the element-wise kernels.
const CHUNK: usize = 1 << 15;

/// The tensor's f32 values in logical order (a copy only when it is not contiguous).
pub(super) fn values(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    if t.dtype() != DType::F32 {
        return None;
    }
    match t.as_slice::<f32>() {
        Some(s) => Some(std::borrow::Cow::Borrowed(s)),
        None => Some(std::borrow::Cow::Owned(
            t.to_contiguous().as_slice::<f32>()?.to_vec(),
        )),
    }
}

pub(super) fn tensor(v: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

/// `e^x` for `x ≤ 0` (softmax arguments): Cody–Waite reduction to `2^k · e^r`, `|r| ≤ ln2 / 2`,
/// and Cephes' degree-6 polynomial (about 1 ulp), in operations that vectorise.
#[inline(always)]
pub(super) fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5 · 2²³ trick (no libm call).
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // k ∈ [-126, 0] here, so the biased exponent is a normal one.
    y * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

/// `[rows, n]` f32 inputs of a row kernel, or `None` for the reference.
fn rows_of(t: &FlexTensor) -> Option<(usize, usize)> {
    match dims(t).as_slice() {
        [rows, n] if *n > 0 => Some((*rows, *n)),
        _ => None,
    }
}

fn rms_forward(x: &[f32], w: &[f32], n: usize, eps: f64, offset: f64) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / n;
    let mut y = vec![0f32; x.len()];
    let mut rstd = vec![0f32; rows];
    let scale: Vec<f32> = w.iter().map(|&w| (f64::from(w) + offset) as f32).collect();
    let scale = if offset == 0.0 { w } else { &scale[..] };
    let rows_per = (CHUNK / n).max(1);
    y.par_chunks_mut(rows_per * n)
        .zip(rstd.par_chunks_mut(rows_per))
        .zip(x.par_chunks(rows_per * n))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_mut(n).zip(r.iter_mut()).zip(x.chunks(n)) {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
                let s = 1.0 / (ms + eps as f32).sqrt();
                *r = s;
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(scale) {
                    *y = x * s * w;
                }
            }
        });
    (y, rstd)
}

#[allow(clippy::type_complexity)]
fn rms_backward(
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    g: &[f32],
    n: usize,
    offset: f64,
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = w.iter().map(|&w| (f64::from(w) + offset) as f32).collect();
    let mut dx = vec![0f32; x.len()];
    let rows_per = (CHUNK / n).max(1);
    let dw = dx
        .par_chunks_mut(rows_per * n)
        .zip(x.par_chunks(rows_per * n))
        .zip(g.par_chunks(rows_per * n))
        .zip(rstd.par_chunks(rows_per))
        .map(|(((dx, x), g), r)| {
            let mut dw = vec![0f32; n];
            for (((dx, x), g), &s) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)).zip(r) {
                let mut dot = 0f32;
                for i in 0..n {
                    let xhat = x[i] * s;
                    dw[i] += g[i] * xhat;
                    dot += g[i] * scale[i] * xhat;
                }
                let mean = dot / n as f32;
                for i in 0..n {
                    dx[i] = (g[i] * scale[i] - x[i] * s * mean) * s;
                }
            }
            dw
        })
        .reduce(
            || vec![0f32; n],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(b) {
                    *a += b;
                }
                a
            },
        );
    (dx, dw)
}

/// `[b, h, s, d]` and cos/sin `[cb, 1, s, d]` with `cb` 1 or `b`: the cos/sin row of each `x`
/// row, or `None` when the shapes are not that.
fn rotary_rows(x: &FlexTensor, c: &FlexTensor) -> Option<impl Fn(usize) -> usize + Sync> {
    let (xd, cd) = (dims(x), dims(c));
    let ([b, h, s, d], [cb, 1, cs, cdd]) = (xd.as_slice(), cd.as_slice()) else {
        return None;
    };
    let (b, h, s, d, cb) = (*b, *h, *s, *d, *cb);
    if *cs != s || *cdd != d || d % 2 != 0 || !(cb == 1 || cb == b) {
        return None;
    }
    Some(move |row: usize| {
        let (bi, si) = (row / (h * s), row % s);
        (if cb == 1 { 0 } else { bi }) * s + si
    })
}

fn rotary_kernel(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    d: usize,
    crow: &(impl Fn(usize) -> usize + Sync),
    backward: bool,
) -> Vec<f32> {
    let half = d / 2;
    let mut y = vec![0f32; x.len()];
    let rows_per = (CHUNK / d).max(1);
    y.par_chunks_mut(rows_per * d)
        .enumerate()
        .for_each(|(chunk, y)| {
            for (r, y) in y.chunks_mut(d).enumerate() {
                let row = chunk * rows_per + r;
                let x = &x[row * d..(row + 1) * d];
                let k = crow(row) * d;
                let (c, s) = (&cos[k..k + d], &sin[k..k + d]);
                for j in 0..d {
                    y[j] = if !backward {
                        // x·cos + rotate_half(x)·sin, rotate_half(x) = [−x₂, x₁].
                        let rot = if j < half { -x[j + half] } else { x[j - half] };
                        x[j] * c[j] + rot * s[j]
                    } else if j < half {
                        // g·cos + rotate_halfᵀ(g·sin), rotate_halfᵀ([a, b]) = [b, −a].
                        x[j] * c[j] + x[j + half] * s[j + half]
                    } else {
                        x[j] * c[j] + -(x[j - half] * s[j - half])
                    };
                }
            }
        });
    y
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SiLU and its derivative: `g σ(g)`, `σ(g) (1 + g (1 − σ(g)))`.
fn silu(g: f32) -> (f32, f32) {
    let s = sigmoid(g);
    (g * s, s * (g * (1.0 - s) + 1.0))
}

/// `act(g) · u` element-wise, in parallel chunks.
fn gated_values(g: &[f32], u: &[f32], act: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = act(g) * u;
            }
        });
    y
}

/// `(d gate, d up)` of `act(g) · u` from the output gradient `dy`; `act` gives the value and
/// the derivative.
fn gated_grads(
    g: &[f32],
    u: &[f32],
    dy: &[f32],
    act: impl Fn(f32) -> (f32, f32) + Sync,
) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            g.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((g, u), dy))| {
            for i in 0..g.len() {
                let (value, d) = act(g[i]);
                du[i] = dy[i] * value;
                dg[i] = dy[i] * u[i] * d;
            }
        });
    (dg, du)
}

/// GELU with the tanh approximation and its derivative, with one `exp`: ½ (1 + tanh z) is
/// σ(2z), so gelu(g) = g σ(2z) with z = k (g + c g³), and its derivative is
/// σ(2z) + g σ(2z) (1 − σ(2z)) · 2k (1 + 3c g²).
fn gelu_tanh(g: f32) -> (f32, f32) {
    const K: f32 = reference::GELU_K as f32;
    const C: f32 = reference::GELU_C as f32;
    let g2 = g * g;
    let s = sigmoid(2.0 * K * g * (1.0 + C * g2));
    let value = g * s;
    let d = s + value * (1.0 - s) * 2.0 * K * (1.0 + 3.0 * C * g2);
    (value, d)
}

impl FusedBackend for Flex {
    /// The Flex kernel (`fused/flex_attention.rs`) splits its query blocks at segment runs and
    /// sees only their keys, in f32 (other dtypes take the reference).
    fn padding_free_attention(_: &Self::Device, dtype: DType) -> bool {
        dtype == DType::F32
    }

    fn fused_attention_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: SegmentIds<Self>,
        spec: &AttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if let Some(done) = super::flex_attention::forward(&q, &k, &v, segments.as_ref(), spec) {
            return done;
        }
        reference::attention_forward::<Self>(q, k, v, segments, spec)
    }

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
        if let Some(done) =
            super::flex_attention::backward(&q, &k, &v, &out, &lse, &grad, segments.as_ref(), spec)
        {
            return done;
        }
        reference::attention_backward::<Self>(q, k, v, out, lse, grad, segments, spec)
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        offset: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if let (Some((rows, n)), Some(xs), Some(ws)) = (rows_of(&x), values(&x), values(&weight))
            && ws.len() == n
        {
            let (y, r) = rms_forward(&xs, &ws, n, eps, offset);
            return (
                tensor(y, Shape::from([rows, n])),
                tensor(r, Shape::from([rows, 1])),
            );
        }
        reference::rms_norm_forward::<Self, 2>(x, weight, eps, offset)
    }

    fn fused_rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        offset: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if let (Some((rows, n)), Some(xs), Some(ws), Some(rs), Some(gs)) = (
            rows_of(&x),
            values(&x),
            values(&weight),
            values(&rstd),
            values(&grad),
        ) && ws.len() == n
            && rs.len() == rows
            && gs.len() == xs.len()
        {
            let (dx, dw) = rms_backward(&xs, &ws, &rs, &gs, n, offset);
            return (
                tensor(dx, Shape::from([rows, n])),
                tensor(dw, Shape::from([n])),
            );
        }
        reference::rms_norm_backward::<Self, 2>(x, weight, rstd, grad, offset)
    }

    fn fused_gated(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        act: Activation,
    ) -> FloatTensor<Self> {
        if let (Some(g), Some(u)) = (values(&gate), values(&up))
            && g.len() == u.len()
        {
            let y = match act {
                Activation::GeluTanh => gated_values(&g, &u, |g| gelu_tanh(g).0),
                _ => gated_values(&g, &u, |g| silu(g).0),
            };
            return tensor(y, gate.layout().shape().clone());
        }
        reference::gated_forward::<Self, 2>(gate, up, act)
    }

    fn fused_gated_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: Activation,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if let (Some(g), Some(u), Some(dy)) = (values(&gate), values(&up), values(&grad))
            && g.len() == u.len()
            && g.len() == dy.len()
        {
            let (dg, du) = match act {
                Activation::GeluTanh => gated_grads(&g, &u, &dy, gelu_tanh),
                _ => gated_grads(&g, &u, &dy, silu),
            };
            let shape = gate.layout().shape().clone();
            return (tensor(dg, shape.clone()), tensor(du, shape));
        }
        reference::gated_backward::<Self, 2>(gate, up, grad, act)
    }

    fn fused_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if let (Some(crow), Some(xs), Some(c), Some(s)) = (
            rotary_rows(&x, &cos),
            values(&x),
            values(&cos),
            values(&sin),
        ) && c.len() == s.len()
        {
            let shape = x.layout().shape().clone();
            let d = shape[3];
            return tensor(rotary_kernel(&xs, &c, &s, d, &crow, false), shape);
        }
        reference::rotary_forward::<Self>(x, cos, sin)
    }

    fn fused_rotary_backward(
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        if let (Some(crow), Some(gs), Some(c), Some(s)) = (
            rotary_rows(&grad, &cos),
            values(&grad),
            values(&cos),
            values(&sin),
        ) && c.len() == s.len()
        {
            let shape = grad.layout().shape().clone();
            let d = shape[3];
            return tensor(rotary_kernel(&gs, &c, &s, d, &crow, true), shape);
        }
        reference::rotary_backward::<Self>(cos, sin, grad)
    }

    fn fused_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.dtype() == DType::F32
            && let Some(v) = x
                .as_slice::<f32>()
                .or_else(|| transposed_2d(&x).map(|(v, _, _)| v))
        {
            return tensor(vec![sum_squares(v)], Shape::new([1]));
        }
        reference::sum_squares::<Self>(x)
    }

    fn fused_embedding_backward(
        grad: FloatTensor<Self>,
        ids: IntTensor<Self>,
        vocab: usize,
        padding: Option<i64>,
    ) -> FloatTensor<Self> {
        match embedding_backward_rows(&grad, &ids, vocab, padding) {
            Some(table) => table,
            None => reference::embedding_backward::<Self>(grad, ids, vocab, padding),
        }
    }

    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad_scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match cross_entropy_in_place(logits, &targets, grad_scale) {
            Ok(out) => out,
            Err(logits) => reference::cross_entropy::<Self>(logits, targets, grad_scale),
        }
    }

    fn fused_matmul_add(
        acc: FloatTensor<Self>,
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match matmul_add_in_place(acc, &lhs, &rhs) {
            Ok(sum) => sum,
            Err(acc) => reference::matmul_add::<Self>(acc, lhs, rhs),
        }
    }

    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        step: &AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (param, exp_avg, exp_avg_sq) =
            match adamw_in_place(param, &grad, exp_avg, exp_avg_sq, step) {
                Ok(updated) => return updated,
                Err(inputs) => inputs,
            };
        if let (Some(p), Some(g), Some(m), Some(v)) = (
            values(&param),
            values(&grad),
            values(&exp_avg),
            values(&exp_avg_sq),
        ) && p.len() == g.len()
            && p.len() == m.len()
            && p.len() == v.len()
        {
            let k = step.scalars();
            let n = p.len();
            let (mut po, mut mo, mut vo) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            po.par_chunks_mut(CHUNK)
                .zip(mo.par_chunks_mut(CHUNK))
                .zip(vo.par_chunks_mut(CHUNK))
                .zip(
                    p.par_chunks(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))),
                )
                .for_each(|(((po, mo), vo), ((p, g), (m, v)))| {
                    for i in 0..p.len() {
                        let (p, m, v) = k.update(p[i], g[i], m[i], v[i]);
                        po[i] = p;
                        mo[i] = m;
                        vo[i] = v;
                    }
                });
            let shape = Shape::from([n]);
            return (
                tensor(po, shape.clone()),
                tensor(mo, shape.clone()),
                tensor(vo, shape),
            );
        }
        reference::adamw::<Self>(param, grad, exp_avg, exp_avg_sq, step)
    }
}

/// `Σ x²` of f32 values without a squared copy: chunks in parallel, each summed in f64 over
/// eight lanes, the chunks' sums added in order (the same result on every run).
fn sum_squares(v: &[f32]) -> f32 {
    let parts: Vec<f64> = v
        .par_chunks(CHUNK)
        .map(|c| {
            let mut lanes = [0f64; 8];
            let mut blocks = c.chunks_exact(8);
            for b in &mut blocks {
                for (l, &x) in lanes.iter_mut().zip(b) {
                    *l += f64::from(x) * f64::from(x);
                }
            }
            let tail: f64 = blocks
                .remainder()
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum();
            lanes.iter().sum::<f64>() + tail
        })
        .collect();
    parts.iter().sum::<f64>() as f32
}

/// The `len` indices of an Int tensor, each below `bound`; `None` for another length, dtype or
/// an index out of range.
fn indices(t: &FlexTensor, len: usize, bound: usize) -> Option<Vec<usize>> {
    let t = t.to_contiguous();
    let v: Vec<usize> = match t.dtype() {
        DType::I64 => t
            .as_slice::<i64>()?
            .iter()
            .map(|&x| usize::try_from(x).unwrap_or(usize::MAX))
            .collect(),
        DType::I32 => t
            .as_slice::<i32>()?
            .iter()
            .map(|&x| usize::try_from(x).unwrap_or(usize::MAX))
            .collect(),
        _ => return None,
    };
    (v.len() == len && v.iter().all(|&x| x < bound)).then_some(v)
}

/// [`FusedBackend::fused_embedding_backward`] on f32 rows: one zeroed `[vocab, width]` table,
/// each gradient row added into its id's row in order of position (the reference's
/// `select_assign` order), the padding id's positions skipped. `None` (the reference body) for
/// other dtypes or ids out of range.
fn embedding_backward_rows(
    grad: &FlexTensor,
    ids: &FlexTensor,
    vocab: usize,
    padding: Option<i64>,
) -> Option<FlexTensor> {
    let (n, width) = rows_of(grad)?;
    let g = values(grad)?;
    let ids = indices(ids, n, vocab)?;
    let pad = padding.and_then(|p| usize::try_from(p).ok());
    let mut table = vec![0f32; vocab.checked_mul(width)?];
    for (row, &id) in g.chunks_exact(width).zip(&ids) {
        if Some(id) != pad {
            for (t, x) in table[id * width..(id + 1) * width].iter_mut().zip(row) {
                *t += *x;
            }
        }
    }
    Some(tensor(table, Shape::new([vocab, width])))
}

/// [`FusedBackend::fused_cross_entropy`] on Flex: one parallel task per chunk of rows, two
/// passes over each row (max; then `e = exp(x − max)` written over the logit while summing),
/// then the gradient `(e / Σe [− 1 at the target]) · grad_scale` written over `e`: the
/// reference's operations per element, in its order, without its five fresh `[rows, vocab]`
/// buffers and serial element-wise passes. The logits are returned (`Err`) for the reference
/// when they are not a uniquely owned, contiguous f32 `[rows, vocab]` buffer or a target is out
/// of range.
#[allow(clippy::result_large_err)]
fn cross_entropy_in_place(
    mut logits: FlexTensor,
    targets: &FlexTensor,
    grad_scale: f64,
) -> Result<(FlexTensor, FlexTensor), FlexTensor> {
    let Some((rows, vocab)) = rows_of(&logits) else {
        return Err(logits);
    };
    let whole = logits.layout().contiguous_offsets() == Some((0, rows * vocab));
    let Some(t) = indices(targets, rows, vocab) else {
        return Err(logits);
    };
    if logits.dtype() != DType::F32 || !whole || !logits.is_unique() {
        return Err(logits);
    }
    let Some(data) = logits.try_storage_mut::<f32>() else {
        return Err(logits);
    };
    let scale = grad_scale as f32;
    // Rows per task: enough work per task to amortise it, and every core busy.
    let per_task = (CHUNK / vocab).max(1);
    let nll: Vec<f32> = data[..rows * vocab]
        .par_chunks_mut(vocab * per_task)
        .zip(t.par_chunks(per_task))
        .flat_map_iter(|(block, t)| {
            block
                .chunks_mut(vocab)
                .zip(t)
                .map(|(row, &t)| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let picked = row[t];
                    // Sixteen partial sums: the loop vectorises, and the sum of a
                    // 50k-entry row keeps the accuracy of a pairwise one.
                    let mut lanes = [0f32; LANES];
                    let mut blocks = row.chunks_exact_mut(LANES);
                    for block in &mut blocks {
                        for (x, acc) in block.iter_mut().zip(lanes.iter_mut()) {
                            let e = exp_neg(*x - max);
                            *x = e;
                            *acc += e;
                        }
                    }
                    for (x, acc) in blocks.into_remainder().iter_mut().zip(lanes.iter_mut()) {
                        let e = exp_neg(*x - max);
                        *x = e;
                        *acc += e;
                    }
                    let total = pairwise_sum(&mut lanes);
                    let e_t = row[t];
                    for x in row.iter_mut() {
                        *x = (*x / total) * scale;
                    }
                    row[t] = (e_t / total - 1.0) * scale;
                    total.ln() + max - picked
                })
                .collect::<Vec<f32>>()
        })
        .collect();
    let sum: f32 = nll.iter().sum();
    Ok((tensor(vec![sum], Shape::from([1])), logits))
}

/// Partial sums per row in [`cross_entropy_in_place`].
const LANES: usize = 16;

/// The sum of `v` by halving (pairwise), in place.
fn pairwise_sum(v: &mut [f32; LANES]) -> f32 {
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// The three tensors an AdamW update writes.
type AdamWState = (FlexTensor, FlexTensor, FlexTensor);

/// [`FusedBackend::fused_adamw`] in place: where the parameter and both moments are uniquely
/// owned, whole, contiguous f32 buffers of the gradient's length (the optimizer's own state
/// between steps), each element is updated where it lies (the same [`AdamWStep`] arithmetic as
/// the allocating kernel), instead of three fresh buffers of the parameter's size per step.
/// A gradient that is a transposed view ([`transposed_2d`]) is read where it lies, a tile at a
/// time. Otherwise the tensors come back (`Err`) unchanged.
#[allow(clippy::result_large_err)]
fn adamw_in_place(
    mut param: FlexTensor,
    grad: &FlexTensor,
    mut exp_avg: FlexTensor,
    mut exp_avg_sq: FlexTensor,
    step: &AdamWStep,
) -> Result<AdamWState, AdamWState> {
    let n = grad.layout().num_elements();
    let whole = |t: &FlexTensor| {
        t.dtype() == DType::F32
            && t.is_unique()
            && t.layout().contiguous_offsets() == Some((0, n))
            && t.layout().shape().num_elements() == n
    };
    if grad.dtype() != DType::F32 || !(whole(&param) && whole(&exp_avg) && whole(&exp_avg_sq)) {
        return Err((param, exp_avg, exp_avg_sq));
    }
    let k = step.scalars();
    let (Some(p), Some(m), Some(v)) = (
        param.try_storage_mut::<f32>(),
        exp_avg.try_storage_mut::<f32>(),
        exp_avg_sq.try_storage_mut::<f32>(),
    ) else {
        return Err((param, exp_avg, exp_avg_sq));
    };
    let (p, m, v) = (&mut p[..n], &mut m[..n], &mut v[..n]);
    if let Some((t, rows, cols)) = transposed_2d(grad) {
        adamw_transposed(&k, p, m, v, t, rows, cols);
    } else {
        let Some(g) = values(grad) else {
            return Err((param, exp_avg, exp_avg_sq));
        };
        k.update_slices(p, m, v, &g);
    }
    Ok((param, exp_avg, exp_avg_sq))
}

/// An f32 2-D tensor's buffer from its first element, rows and columns, and row and column
/// strides (non-negative).
fn strided_2d(t: &FlexTensor) -> Option<(&[f32], usize, usize, usize, usize)> {
    let (rows, cols, rs, cs) = t.layout().as_2d_strides()?;
    if t.dtype() != DType::F32 || rs < 0 || cs < 0 {
        return None;
    }
    let start = t.layout().start_offset();
    let data = t.storage::<f32>().get(start..)?;
    Some((data, rows, cols, rs as usize, cs as usize))
}

/// [`FusedBackend::fused_matmul_add`] on Flex: a GEMM that accumulates into `acc` (f32,
/// contiguous, uniquely owned) reading `lhs` and `rhs` through their strides (the transposed
/// logits gradient is read in place). `acc` comes back (`Err`) for the reference otherwise.
#[allow(clippy::result_large_err)]
fn matmul_add_in_place(
    mut acc: FlexTensor,
    lhs: &FlexTensor,
    rhs: &FlexTensor,
) -> Result<FlexTensor, FlexTensor> {
    let (Some((l, m, k, l_rs, l_cs)), Some((r, k2, n, r_rs, r_cs))) =
        (strided_2d(lhs), strided_2d(rhs))
    else {
        return Err(acc);
    };
    let whole = acc.dtype() == DType::F32
        && acc.is_unique()
        && acc.layout().shape().dims::<2>() == [m, n]
        && acc.layout().contiguous_offsets() == Some((0, m * n));
    if k != k2 || !whole || m == 0 || n == 0 {
        return Err(acc);
    }
    let Some(dst) = acc.try_storage_mut::<f32>() else {
        return Err(acc);
    };
    super::flex_attention::gemm(
        (m, n, k),
        &mut dst[..m * n],
        n,
        true,
        (l, l_rs, l_cs),
        (r, r_rs, r_cs),
        1.0,
        gemm::Parallelism::Rayon(0),
    );
    Ok(acc)
}

/// An f32 `[rows, cols]` tensor laid out as the transpose of a contiguous `[cols, rows]`
/// buffer (strides `[1, rows]`): the weight gradient of `x · Wᵀ` as burn's matmul backward
/// leaves it. Returns that buffer, `rows` and `cols`.
fn transposed_2d(t: &FlexTensor) -> Option<(&[f32], usize, usize)> {
    let l = t.layout();
    let dims = l.shape().to_vec();
    let [rows, cols] = dims[..] else { return None };
    if t.dtype() != DType::F32 || rows < 2 || cols < 2 || l.strides() != [1, rows as isize] {
        return None;
    }
    let start = l.start_offset();
    let buf = t.storage::<f32>().get(start..start + rows * cols)?;
    Some((buf, rows, cols))
}

/// The AdamW update of a row-major `[rows, cols]` parameter (`p`, `m`, `v`) from a gradient
/// given as its transpose `t` (`[cols, rows]`, row-major): bands of [`BAND`] parameter rows in
/// parallel; in each, a `[BAND, TILE]` tile of the gradient is gathered from `TILE` rows of `t`
/// (each read contiguously), then applied to the band's rows contiguously.
fn adamw_transposed(
    k: &crate::fused::AdamWScalars,
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    t: &[f32],
    rows: usize,
    cols: usize,
) {
    const BAND: usize = 16;
    const TILE: usize = 256;
    p.par_chunks_mut(BAND * cols)
        .zip(m.par_chunks_mut(BAND * cols))
        .zip(v.par_chunks_mut(BAND * cols))
        .enumerate()
        .for_each(|(b, ((p, m), v))| {
            let r0 = b * BAND;
            let nr = p.len() / cols;
            let mut tile = [0f32; BAND * TILE];
            for j0 in (0..cols).step_by(TILE) {
                let nj = TILE.min(cols - j0);
                for j in 0..nj {
                    let src = &t[(j0 + j) * rows + r0..][..nr];
                    for (r, &g) in src.iter().enumerate() {
                        tile[r * TILE + j] = g;
                    }
                }
                for r in 0..nr {
                    let at = r * cols + j0;
                    let (p, m, v) = (
                        &mut p[at..at + nj],
                        &mut m[at..at + nj],
                        &mut v[at..at + nj],
                    );
                    let g = &tile[r * TILE..r * TILE + nj];
                    for j in 0..nj {
                        (p[j], m[j], v[j]) = k.update(p[j], g[j], m[j], v[j]);
                    }
                }
            }
        });
}
