//! libtorch's own fused kernels for the `tch` backend.
//!
//! Attention on a CPU device with plain causal masking (no window, softcap or cache) runs
//! libtorch's flash-attention CPU kernel forward and backward
//! (`_scaled_dot_product_flash_attention_for_cpu[_backward]`, what PyTorch's
//! `scaled_dot_product_attention` picks on CPU); grouped key/value heads are repeated inside
//! libtorch and their gradients summed back. Segmented rows (packed, or a padded batch made
//! padding-free) run it once per segment run, each run a causal attention of its own, so no
//! `[s, s]` mask is built. Everything else, and any call libtorch refuses,
//! takes the reference body ([`mod@super::reference`]). On CUDA devices the reference body runs
//! too (not yet measured on a GPU).
//!
//! The AdamW step on CPU tensors that own their storage updates the parameter and both moments
//! in place in one pass over the four buffers (what `torch.optim.AdamW(fused=True)` does; tch
//! has no binding for `_fused_adamw_`), instead of a dozen element-wise libtorch calls. The
//! chunked LM head's cross-entropy turns an f32 chunk of logits into its gradient in the same
//! buffer (libtorch's in-place operations, any device). The embedding's gradient is libtorch's
//! `embedding_backward` (one zeroed table, rows added in place; any device).

use burn::backend::libtorch::{LibTorch, TchElement, TchTensor};
use burn::tensor::ops::FloatTensor;

use super::{AdamWScalars, AdamWStep, AttentionSpec, FusedBackend, SegmentIds, reference};

/// A CPU f32 tensor laid out densely from its data pointer.
fn dense_cpu_f32(t: &TchTensor, numel: usize) -> bool {
    t.tensor.device() == tch::Device::Cpu
        && t.tensor.kind() == tch::Kind::Float
        && t.tensor.is_contiguous()
        && t.tensor.numel() == numel
}

/// The AdamW step in place, one pass, when all four tensors are dense CPU f32 of one length and
/// the parameter and moments own their storage. Returns `false` (nothing touched) otherwise.
#[allow(unsafe_code)]
fn adamw_in_place(
    p: &mut TchTensor,
    g: &TchTensor,
    m: &mut TchTensor,
    v: &mut TchTensor,
    k: &AdamWScalars,
) -> bool {
    let n = p.tensor.numel();
    if n == 0
        || ![&*p, g, &*m, &*v].iter().all(|t| dense_cpu_f32(t, n))
        || !(p.can_mut() && m.can_mut() && v.can_mut())
    {
        return false;
    }
    // SAFETY: each pointer is the start of a contiguous CPU buffer of `n` f32 (checked above).
    // `p`, `m` and `v` own their storage (`can_mut`: no other burn tensor shares it, so they do
    // not alias each other or `g`, and nobody else reads or writes them while we hold `&mut`);
    // `g` is only read. The slices do not outlive the borrows of the tensors.
    let (ps, gs, ms, vs) = unsafe {
        (
            std::slice::from_raw_parts_mut(p.tensor.data_ptr().cast::<f32>(), n),
            std::slice::from_raw_parts(g.tensor.data_ptr().cast::<f32>().cast_const(), n),
            std::slice::from_raw_parts_mut(m.tensor.data_ptr().cast::<f32>(), n),
            std::slice::from_raw_parts_mut(v.tensor.data_ptr().cast::<f32>(), n),
        )
    };
    // In parallel: libtorch's threads are idle during the optimizer step, and one core
    // updating 135M parameters was 1 % of the samples of a SmolLM2 step, all of them serial.
    k.update_slices(ps, ms, vs, gs);
    true
}

/// Softmax cross-entropy of f32 `logits [rows, vocab]` in the logits' own buffer, which becomes
/// the gradient: the row maxima and target logits are read first, then the buffer is shifted,
/// exponentiated, normalised, given −1 at each target and scaled in place (libtorch's in-place
/// operations, any device). The reference allocates three `[rows, vocab]` tensors besides the
/// logits (the shifted exponentials, their quotient, the scatter's result), and a chunk's
/// logits are 64 MiB for SmolLM2's vocabulary at the very moment a training step's memory peaks
/// (every activation is still held). `Err` hands the logits back untouched: not an f32 matrix
/// laid out densely, shared with another tensor, or targets that are not one index per row.
fn cross_entropy_in_place(
    mut logits: TchTensor,
    targets: &TchTensor,
    grad_scale: f64,
) -> Result<(TchTensor, TchTensor), TchTensor> {
    let size = logits.tensor.size();
    let [rows, vocab] = size[..] else {
        return Err(logits);
    };
    if logits.tensor.kind() != tch::Kind::Float
        || !logits.tensor.is_contiguous()
        || !logits.can_mut()
        || rows == 0
        || vocab == 0
        || targets.tensor.numel() != usize::try_from(rows).unwrap_or(0)
    {
        return Err(logits);
    }
    // Everything that can fail (a target out of range among them) before the buffer changes.
    let read = || -> Result<_, tch::TchError> {
        let index = targets
            .tensor
            .f_to_kind(tch::Kind::Int64)?
            .f_reshape([rows, 1])?;
        let max = logits.tensor.f_amax([1i64].as_slice(), true)?;
        let picked = logits.tensor.f_gather(1, &index, false)?;
        let minus_one = index.f_full_like(-1.0)?.f_to_kind(tch::Kind::Float)?;
        Ok((index, max, picked, minus_one))
    };
    let Ok((index, max, picked, minus_one)) = read() else {
        return Err(logits);
    };
    let t = &mut logits.tensor;
    // From here on every operation is an element-wise or reducing one on shapes checked above.
    let _ = t.g_sub_(&max);
    let _ = t.exp_();
    let total = t.sum_dim_intlist([1i64].as_slice(), true, tch::Kind::Float);
    let sum = (total.log() + max - picked)
        .sum(tch::Kind::Float)
        .reshape([1]);
    let _ = t.g_div_(&total);
    let _ = t.scatter_add_(1, &index, &minus_one);
    if grad_scale != 1.0 {
        let _ = t.g_mul_scalar_(grad_scale);
    }
    Ok((TchTensor::new(sum), logits))
}

/// True when libtorch's CPU flash kernel computes exactly this call (segments aside: see
/// [`runs`]).
fn flash_cpu_applies(q: &TchTensor, k: &TchTensor, spec: &AttentionSpec) -> bool {
    let (qs, ks) = (q.tensor.size(), k.tensor.size());
    spec.causal
        && spec.past == 0
        && spec.window.is_none()
        && spec.softcap.is_none()
        && qs.len() == 4
        && ks.len() == 4
        && qs[2] == ks[2]
        && ks[1] > 0
        && qs[1] % ks[1] == 0
        && q.tensor.device() == tch::Device::Cpu
}

/// Where the flash kernel runs: over each batch row whole (no segments), or over each run of
/// one segment id separately (packed or padding-free rows, when queries and keys carry the
/// same ids and every segment is one contiguous run): the causal kernel on a run attends
/// exactly within it. `None`: the segments need the reference's mask.
fn runs(
    q: &TchTensor,
    segments: Option<&(TchTensor, TchTensor)>,
) -> Option<Vec<Vec<(usize, usize)>>> {
    let size = q.tensor.size();
    let (b, s) = (
        usize::try_from(size[0]).ok()?,
        usize::try_from(size[2]).ok()?,
    );
    let Some((sq, sk)) = segments else {
        return Some(vec![vec![(0, s)]; b]);
    };
    let read = |t: &TchTensor| -> Option<Vec<i64>> {
        let flat = t
            .tensor
            .f_reshape([-1])
            .ok()?
            .f_to_kind(tch::Kind::Int64)
            .ok()?;
        Vec::<i64>::try_from(&flat).ok()
    };
    let (a, c) = (read(sq)?, read(sk)?);
    if a != c {
        return None;
    }
    super::segment_runs(&a, b, s)
}

/// `f` on each run of each row of `inputs` (all `[b, ·, s, …]`), its outputs put back together
/// along the sequence and then the batch.
fn per_run<const N: usize>(
    inputs: &[&tch::Tensor],
    runs: &[Vec<(usize, usize)>],
    f: impl Fn(&[tch::Tensor]) -> Result<[tch::Tensor; N], tch::TchError>,
) -> Result<[tch::Tensor; N], tch::TchError> {
    // Rows that are one run each (no segments): one call on the whole tensors.
    let len = inputs.first().map_or(0, |t| t.size()[2]);
    if runs
        .iter()
        .all(|r| matches!(r.as_slice(), [(0, hi)] if *hi as i64 == len))
    {
        let all: Vec<tch::Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        return f(&all);
    }
    let mut rows: Vec<[Vec<tch::Tensor>; N]> = Vec::with_capacity(runs.len());
    for (r, row_runs) in runs.iter().enumerate() {
        let mut parts: [Vec<tch::Tensor>; N] = std::array::from_fn(|_| Vec::new());
        for &(lo, hi) in row_runs {
            let slice = inputs
                .iter()
                .map(|t| {
                    t.f_narrow(0, r as i64, 1)?
                        .f_narrow(2, lo as i64, (hi - lo) as i64)
                })
                .collect::<Result<Vec<_>, _>>()?;
            for (part, out) in parts.iter_mut().zip(f(&slice)?) {
                part.push(out);
            }
        }
        rows.push(parts);
    }
    let mut out: [Vec<tch::Tensor>; N] = std::array::from_fn(|_| Vec::new());
    for parts in rows {
        for (o, p) in out.iter_mut().zip(parts) {
            o.push(tch::Tensor::f_cat(&p, 2)?);
        }
    }
    let mut done = Vec::with_capacity(N);
    for o in out {
        done.push(tch::Tensor::f_cat(&o, 0)?);
    }
    done.try_into()
        .map_err(|_| tch::TchError::Shape("per_run: output count".into()))
}

/// Keys or values with each of the `kvh` heads repeated `h / kvh` times.
fn repeated(x: &tch::Tensor, group: i64) -> Result<tch::Tensor, tch::TchError> {
    if group == 1 {
        Ok(x.shallow_clone())
    } else {
        x.f_repeat_interleave_self_int(group, 1, None)
    }
}

/// `x` itself when its last dimension is dense (stride 1), else a contiguous copy. The flash
/// kernel reads each head vector as contiguous memory; PyTorch's `scaled_dot_product_attention`
/// checks this before it picks the kernel, and calling the kernel directly skips that check.
/// libtorch's matmul hands back such layouts for short rows (e.g. `[b, h, s, d]` with strides
/// `[s, s·d·h, 1, s·b]`), and the kernel then computes garbage.
fn dense_last(x: &tch::Tensor) -> Result<tch::Tensor, tch::TchError> {
    if x.stride().last() == Some(&1) {
        Ok(x.shallow_clone())
    } else {
        x.f_contiguous()
    }
}

fn flash_forward(
    [q, k, v]: [&tch::Tensor; 3],
    spec: &AttentionSpec,
) -> Result<[tch::Tensor; 2], tch::TchError> {
    let (q, k, v) = (&dense_last(q)?, &dense_last(k)?, &dense_last(v)?);
    let group = q.size()[1] / k.size()[1];
    let (out, lse) = tch::Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
        q,
        &repeated(k, group)?,
        &repeated(v, group)?,
        0.0,
        true,
        None::<tch::Tensor>,
        spec.scale,
    )?;
    Ok([out, lse])
}

fn flash_backward(
    [q, k, v, out, lse, grad]: [&tch::Tensor; 6],
    spec: &AttentionSpec,
) -> Result<[tch::Tensor; 3], tch::TchError> {
    let [q, k, v, out, lse, grad] = [q, k, v, out, lse, grad].map(dense_last);
    let (q, k, v, out, lse, grad) = (&q?, &k?, &v?, &out?, &lse?, &grad?);
    let ks = k.size();
    let group = q.size()[1] / ks[1];
    let (dq, dk, dv) = tch::Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
        grad,
        q,
        &repeated(k, group)?,
        &repeated(v, group)?,
        out,
        lse,
        0.0,
        true,
        None::<tch::Tensor>,
        spec.scale,
    )?;
    let fold = |g: tch::Tensor| -> Result<tch::Tensor, tch::TchError> {
        if group == 1 {
            return Ok(g);
        }
        g.f_view([ks[0], ks[1], group, ks[2], ks[3]])?
            .f_sum_dim_intlist([2i64].as_slice(), false, None)
    };
    Ok([dq, fold(dk)?, fold(dv)?])
}

impl<E: TchElement> FusedBackend for LibTorch<E> {
    fn fused_matmul_add(
        mut acc: FloatTensor<Self>,
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // libtorch's `addmm_` (a GEMM with beta 1) into a buffer no other tensor shares.
        let fits = acc.can_mut()
            && acc.tensor.dim() == 2
            && acc.tensor.kind() == lhs.tensor.kind()
            && acc.tensor.kind() == rhs.tensor.kind()
            && lhs.tensor.size().first() == acc.tensor.size().first()
            && lhs.tensor.size().get(1) == rhs.tensor.size().first()
            && rhs.tensor.size().get(1) == acc.tensor.size().get(1);
        if fits {
            let _ = acc.tensor.addmm_(&lhs.tensor, &rhs.tensor);
            return acc;
        }
        reference::matmul_add::<Self>(acc, lhs, rhs)
    }

    fn fused_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        // libtorch's 2-norm reads the tensor through its strides (a transposed gradient as it
        // lies) without a squared copy; squared back in f32.
        if x.tensor.kind() == tch::Kind::Float
            && let Ok(norm) = x.tensor.f_norm()
        {
            return TchTensor::new(norm.square().reshape([1]));
        }
        reference::sum_squares::<Self>(x)
    }

    fn fused_embedding_backward(
        grad: FloatTensor<Self>,
        ids: burn::tensor::ops::IntTensor<Self>,
        vocab: usize,
        padding: Option<i64>,
    ) -> FloatTensor<Self> {
        // libtorch's `embedding_backward` (PyTorch's own path for `nn.Embedding`): one zeroed
        // table the rows are added into in place; burn's `select_assign` adds into a copy of
        // the zeros it is given (a second `[vocab, width]` buffer).
        match (
            i64::try_from(vocab),
            padding.filter(|p| *p >= 0).unwrap_or(-1),
        ) {
            (Ok(n), pad) => TchTensor::new(tch::Tensor::embedding_backward(
                &grad.tensor,
                &ids.tensor,
                n,
                pad,
                false,
                false,
            )),
            (Err(_), _) => reference::embedding_backward::<Self>(grad, ids, vocab, padding),
        }
    }

    fn fused_cross_entropy(
        logits: FloatTensor<Self>,
        targets: burn::tensor::ops::IntTensor<Self>,
        grad_scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match cross_entropy_in_place(logits, &targets, grad_scale) {
            Ok(out) => out,
            Err(logits) => reference::cross_entropy::<Self>(logits, targets, grad_scale),
        }
    }

    fn fused_adamw(
        mut param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mut exp_avg: FloatTensor<Self>,
        mut exp_avg_sq: FloatTensor<Self>,
        step: &AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Flat, as the parameter (a copy when the gradient is a transposed view).
        let grad = {
            use burn::tensor::TensorMetadata;
            use burn::tensor::ops::FloatTensorOps;
            Self::float_reshape(grad, param.shape())
        };
        if adamw_in_place(
            &mut param,
            &grad,
            &mut exp_avg,
            &mut exp_avg_sq,
            &step.scalars(),
        ) {
            return (param, exp_avg, exp_avg_sq);
        }
        reference::adamw::<Self>(param, grad, exp_avg, exp_avg_sq, step)
    }

    /// Packed and padding-free rows run the flash kernel per segment run on CPU devices (any
    /// float dtype the kernel takes).
    fn padding_free_attention(device: &Self::Device, dtype: burn::tensor::DType) -> bool {
        use burn::tensor::DType;
        matches!(device, burn::backend::libtorch::LibTorchDevice::Cpu)
            && matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64)
    }

    fn fused_attention_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: SegmentIds<Self>,
        spec: &AttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if flash_cpu_applies(&q, &k, spec)
            && let Some(runs) = runs(&q, segments.as_ref())
            && let Ok([out, lse]) = per_run(&[&q.tensor, &k.tensor, &v.tensor], &runs, |t| {
                flash_forward([&t[0], &t[1], &t[2]], spec)
            })
        {
            return (TchTensor::new(out), TchTensor::new(lse));
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
        if flash_cpu_applies(&q, &k, spec)
            && let Some(runs) = runs(&q, segments.as_ref())
            && let Ok([dq, dk, dv]) = per_run(
                &[
                    &q.tensor,
                    &k.tensor,
                    &v.tensor,
                    &out.tensor,
                    &lse.tensor,
                    &grad.tensor,
                ],
                &runs,
                |t| flash_backward([&t[0], &t[1], &t[2], &t[3], &t[4], &t[5]], spec),
            )
        {
            return (TchTensor::new(dq), TchTensor::new(dk), TchTensor::new(dv));
        }
        reference::attention_backward::<Self>(q, k, v, out, lse, grad, segments, spec)
    }
}
