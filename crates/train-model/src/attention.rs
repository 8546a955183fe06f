//! Attention implementations and the masks that keep packed rows apart.

use std::str::FromStr;

use burn::tensor::{
    Bool, FloatDType, Int, Tensor, activation::softmax, backend::Backend, module::attention,
    ops::AttentionModuleOptions,
};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Which kernels the decoder runs (the seed's flash-attention probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionImpl {
    /// The fused operations of [`FusedBackend`](crate::FusedBackend) (tiled attention,
    /// RMSNorm, SwiGLU, rotary, each
    /// one autodiff node with its own backward), in training and inference alike.
    #[default]
    Auto,
    /// The same as `Auto` (the name the seed's probe used).
    Fused,
    /// Decomposed operations: matmul, f32 softmax, matmul with repeated key/value heads and an
    /// `[s, s]` mask, RMSNorm and rotary from elementary operations: the `transformers` "eager"
    /// path, kept for comparison.
    Standard,
}

impl FromStr for AttentionImpl {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "fused" | "flash" | "sdpa" => Ok(Self::Fused),
            "standard" | "eager" => Ok(Self::Standard),
            other => Err(ModelError::InvalidInput(format!(
                "attention implementation `{other}` is unknown (expected auto, fused or standard)"
            ))),
        }
    }
}

impl AttentionImpl {
    /// True when this choice runs the fused operations.
    pub fn is_fused(self) -> bool {
        !matches!(self, Self::Standard)
    }
}

/// Where each query may look: causal order, and only within its own segment (packed row).
///
/// Holds the segment ids themselves; the `[batch, 1, seq_q, seq_k]` mask only the standard
/// (decomposed) path needs is built on first use, the fused path never builds it.
#[derive(Debug, Clone)]
pub struct AttentionMask<B: Backend> {
    /// Segment ids of the queries `[b, sq]` and of the keys `[b, sk]`; `None`: plain causal.
    segments: Option<crate::fused::SegmentTensors<B>>,
    /// Keys cached before the first query.
    past: usize,
    /// Sliding window: query `i` sees key `j` only when `i - j < window`.
    window: Option<usize>,
    /// `[batch, 1, seq_q, seq_k]`, `true` where attention is forbidden (standard path only).
    mask: std::cell::OnceCell<Option<Tensor<B, 4, Bool>>>,
    /// The same as an additive f32 bias (0 or `f32::MIN`), built once per forward for the
    /// standard path: a broadcast add is much cheaper than filling through a broadcast mask.
    bias: std::cell::OnceCell<Tensor<B, 4>>,
}

impl<B: Backend> AttentionMask<B> {
    /// Causal attention over one row per batch entry, no cache.
    pub fn causal() -> Self {
        Self {
            segments: None,
            past: 0,
            window: None,
            mask: std::cell::OnceCell::new(),
            bias: std::cell::OnceCell::new(),
        }
    }

    /// Causal attention restricted to equal segment ids; queries start at absolute index
    /// `past` (the number of cached keys before them).
    pub fn segmented(
        segments_q: Tensor<B, 2, Int>,
        segments_k: Tensor<B, 2, Int>,
        past: usize,
    ) -> Self {
        Self {
            segments: Some((segments_q, segments_k)),
            past,
            window: None,
            mask: std::cell::OnceCell::new(),
            bias: std::cell::OnceCell::new(),
        }
    }

    /// The same mask restricted to a sliding window (`None`: none); the standard path's
    /// materialised mask is built anew for it.
    #[must_use]
    pub fn with_window(&self, window: Option<usize>) -> Self {
        Self {
            segments: self.segments.clone(),
            past: self.past,
            window: window.filter(|w| *w > 0),
            mask: std::cell::OnceCell::new(),
            bias: std::cell::OnceCell::new(),
        }
    }

    /// The sliding window, if any.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// Segment ids of queries and keys, if any.
    pub fn segments(&self) -> Option<&crate::fused::SegmentTensors<B>> {
        self.segments.as_ref()
    }

    /// Keys cached before the first query.
    pub fn past(&self) -> usize {
        self.past
    }

    /// `[batch | 1, 1, seq_q, seq_k]`, `true` where attention is forbidden; `None` for plain
    /// causal attention without a window (the standard path then uses a lower-triangular mask).
    pub(crate) fn mask(
        &self,
        sq: usize,
        sk: usize,
        device: &B::Device,
    ) -> Option<Tensor<B, 4, Bool>> {
        self.mask
            .get_or_init(|| self.build_mask(sq, sk, device))
            .clone()
    }

    fn build_mask(&self, sq: usize, sk: usize, device: &B::Device) -> Option<Tensor<B, 4, Bool>> {
        if self.segments.is_none() && self.window.is_none() {
            return None;
        }
        let b = self.segments.as_ref().map_or(1, |(q, _)| q.dims()[0]);
        let past = self.past;
        let q_idx = Tensor::<B, 1, Int>::arange(past as i64..(past + sq) as i64, device)
            .reshape([1, sq, 1])
            .expand([b, sq, sk]);
        let k_idx = Tensor::<B, 1, Int>::arange(0..sk as i64, device)
            .reshape([1, 1, sk])
            .expand([b, sq, sk]);
        let mut forbidden = k_idx.clone().greater(q_idx.clone());
        if let Some(w) = self.window {
            forbidden = forbidden.bool_or(k_idx.add_scalar(w as i64).lower_equal(q_idx));
        }
        if let Some((segments_q, segments_k)) = self.segments.clone() {
            let other_segment = segments_q
                .reshape([b, sq, 1])
                .expand([b, sq, sk])
                .not_equal(segments_k.reshape([b, 1, sk]).expand([b, sq, sk]));
            forbidden = forbidden.bool_or(other_segment);
        }
        Some(forbidden.unsqueeze_dim(1))
    }

    /// `[1 or batch, 1, seq_q, seq_k]` additive bias: 0 where attention is allowed.
    fn additive(&self, sq: usize, sk: usize, device: &B::Device) -> Tensor<B, 4> {
        self.bias
            .get_or_init(|| {
                let forbidden = match self.mask(sq, sk, device) {
                    Some(m) => m,
                    None => {
                        Tensor::<B, 2, Bool>::tril_mask([sq, sk], 0, device).reshape([1, 1, sq, sk])
                    }
                };
                let dims = forbidden.dims();
                Tensor::<B, 4>::zeros(dims, (device, burn::tensor::DType::F32))
                    .mask_fill(forbidden, f32::MIN)
            })
            .clone()
    }
}

/// Scaled dot-product attention of `q [b, h, sq, d]` against `k`, `v` `[b, h, sk, d]`.
pub fn scaled_dot_product<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
    fused: bool,
) -> Tensor<B, 4> {
    let [b, h, sq, d] = q.dims();
    let sk = k.dims()[2];
    let scale = 1.0 / (d as f64).sqrt();
    if fused {
        let full_mask = mask
            .mask(sq, sk, &q.device())
            .map(|m| m.expand([b, h, sq, sk]));
        let full_mask = full_mask.map(|m| {
            if mask_means_attend::<B>(&m.device()) {
                m.bool_not()
            } else {
                m
            }
        });
        let options = AttentionModuleOptions {
            scale: Some(scale),
            is_causal: full_mask.is_none(),
            softcap: None,
        };
        return attention(q, k, v, full_mask, None, options);
    }
    scaled_dot_product_scaled(q, k, v, mask, scale)
}

/// The decomposed attention (`transformers`' eager path) with the given score scale.
pub(crate) fn scaled_dot_product_scaled<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
    scale: f64,
) -> Tensor<B, 4> {
    let [_, _, sq, _] = q.dims();
    let sk = k.dims()[2];
    let dtype = q.dtype();
    let device = q.device();
    let scores = (q.matmul(k.transpose()) * scale).cast(FloatDType::F32);
    let scores = scores + mask.additive(sq, sk, &device);
    let probs = softmax(scores, 3).cast(dtype);
    probs.matmul(v)
}

/// burn-tch 0.21 hands burn's boolean mask (`true` = masked) straight to
/// `torch.scaled_dot_product_attention`, where `true` means "may attend"; the mask must be
/// inverted for that backend's fused kernel (under autodiff burn uses its own decomposition, which
/// follows burn's convention, and the backend name starts with `autodiff<`).
fn mask_means_attend<B: Backend>(device: &B::Device) -> bool {
    B::name(device).starts_with("libtorch")
}

/// Repeats each key/value head `n` times (`kv0, kv0, kv1, kv1`), as `transformers`' `repeat_kv`.
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n, s, d])
        .reshape([b, kvh * n, s, d])
}
