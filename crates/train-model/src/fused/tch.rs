//! libtorch's own fused kernels for the `tch` backend.
//!
//! Attention on a CPU device with plain causal masking (no segments, window, softcap or cache)
//! runs libtorch's flash-attention CPU kernel forward and backward
//! (`_scaled_dot_product_flash_attention_for_cpu[_backward]`, what PyTorch's
//! `scaled_dot_product_attention` picks on CPU); grouped key/value heads are repeated inside
//! libtorch and their gradients summed back. Everything else, and any call libtorch refuses,
//! takes the reference body ([`mod@super::reference`]). On CUDA devices the reference body runs
//! too (not yet measured on a GPU).
//!
//! The AdamW step on CPU tensors that own their storage updates the parameter and both moments
//! in place in one pass over the four buffers (what `torch.optim.AdamW(fused=True)` does; tch
//! has no binding for `_fused_adamw_`), instead of a dozen element-wise libtorch calls.

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
    for (((p, &g), m), v) in ps.iter_mut().zip(gs).zip(ms.iter_mut()).zip(vs.iter_mut()) {
        (*p, *m, *v) = k.update(*p, g, *m, *v);
    }
    true
}

/// True when libtorch's CPU flash kernel computes exactly this call.
fn flash_cpu_applies(q: &TchTensor, k: &TchTensor, segmented: bool, spec: &AttentionSpec) -> bool {
    let (qs, ks) = (q.tensor.size(), k.tensor.size());
    !segmented
        && spec.causal
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

/// Keys or values with each of the `kvh` heads repeated `h / kvh` times.
fn repeated(x: &tch::Tensor, group: i64) -> Result<tch::Tensor, tch::TchError> {
    if group == 1 {
        Ok(x.shallow_clone())
    } else {
        x.f_repeat_interleave_self_int(group, 1, None)
    }
}

fn flash_forward(
    q: &TchTensor,
    k: &TchTensor,
    v: &TchTensor,
    spec: &AttentionSpec,
) -> Result<(TchTensor, TchTensor), tch::TchError> {
    let group = q.tensor.size()[1] / k.tensor.size()[1];
    let (out, lse) = tch::Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
        &q.tensor,
        &repeated(&k.tensor, group)?,
        &repeated(&v.tensor, group)?,
        0.0,
        true,
        None::<tch::Tensor>,
        spec.scale,
    )?;
    Ok((TchTensor::new(out), TchTensor::new(lse)))
}

#[allow(clippy::too_many_arguments)]
fn flash_backward(
    q: &TchTensor,
    k: &TchTensor,
    v: &TchTensor,
    out: &TchTensor,
    lse: &TchTensor,
    grad: &TchTensor,
    spec: &AttentionSpec,
) -> Result<(TchTensor, TchTensor, TchTensor), tch::TchError> {
    let ks = k.tensor.size();
    let group = q.tensor.size()[1] / ks[1];
    let (dq, dk, dv) = tch::Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
        &grad.tensor,
        &q.tensor,
        &repeated(&k.tensor, group)?,
        &repeated(&v.tensor, group)?,
        &out.tensor,
        &lse.tensor,
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
    Ok((
        TchTensor::new(dq),
        TchTensor::new(fold(dk)?),
        TchTensor::new(fold(dv)?),
    ))
}

impl<E: TchElement> FusedBackend for LibTorch<E> {
    fn fused_adamw(
        mut param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mut exp_avg: FloatTensor<Self>,
        mut exp_avg_sq: FloatTensor<Self>,
        step: &AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
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

    fn fused_attention_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: SegmentIds<Self>,
        spec: &AttentionSpec,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if flash_cpu_applies(&q, &k, segments.is_some(), spec)
            && let Ok(done) = flash_forward(&q, &k, &v, spec)
        {
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
        if flash_cpu_applies(&q, &k, segments.is_some(), spec)
            && let Ok(done) = flash_backward(&q, &k, &v, &out, &lse, &grad, spec)
        {
            return done;
        }
        reference::attention_backward::<Self>(q, k, v, out, lse, grad, segments, spec)
    }
}
