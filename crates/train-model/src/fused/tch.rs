//! libtorch's own fused kernels for the `tch` backend.
//!
//! Attention on a CPU device with plain causal masking (no segments, window, softcap or cache)
//! runs libtorch's flash-attention CPU kernel forward and backward
//! (`_scaled_dot_product_flash_attention_for_cpu[_backward]`, what PyTorch's
//! `scaled_dot_product_attention` picks on CPU); grouped key/value heads are repeated inside
//! libtorch and their gradients summed back. Everything else, and any call libtorch refuses,
//! takes the reference body ([`mod@super::reference`]). On CUDA devices the reference body runs
//! too (not yet measured on a GPU).

use burn::backend::libtorch::{LibTorch, TchElement, TchTensor};
use burn::tensor::ops::FloatTensor;

use super::{AttentionSpec, FusedBackend, SegmentIds, reference};

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
