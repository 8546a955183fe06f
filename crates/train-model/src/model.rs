//! The decoder: embeddings, RMSNorm, rotary attention with GQA, SwiGLU MLP and the LM head.
//!
//! Parameters keep the Hugging Face layout (`[out, in]` projections) and names, so loading and
//! saving are plain copies and gradients can be reported under the names users know.

use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::tensor::{
    DType, ElementConversion, FloatDType, IndexingUpdateOp, Int, Tensor, TensorData,
    activation::{gelu_approximate, silu},
    backend::Backend,
};

use crate::attention::{AttentionImpl, AttentionMask, repeat_kv, scaled_dot_product_scaled};
use crate::cache::{KvCache, LayerKv};
use crate::config::{Activation, ModelConfig, NormPlacement};
use crate::error::{ModelError, Result};
use crate::fused::{self, AttentionSpec, FusedBackend};
use crate::lora::{ExpertsLora, LoraAdapter, LoraConfig};
use crate::names::{TensorSpec, tensor_specs};
use crate::rope::{Rotary, apply_rotary};

/// A linear projection stored as Hugging Face stores it: weight `[out, in]`, optional bias.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// `[out, in]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA adapter added to the output ([`LoraAdapter`](crate::LoraAdapter)).
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Projection<B> {
    /// `x @ weight^T + bias`, computed in `x`'s dtype (weights are cast when stored in another
    /// one, e.g. f32 master weights under bf16 compute).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let weight = cast_to(self.weight.val(), dtype);
        let bias = self.bias.as_ref().map(|b| cast_to(b.val(), dtype));
        match &self.lora {
            None => project(x, weight, bias),
            Some(lora) => {
                let delta = lora.delta(x.clone());
                project(x, weight, bias) + delta
            }
        }
    }
}

/// Up to this many rows, [`project`] multiplies the weight from the left.
const SMALL_ROWS: usize = 16;

/// `x @ weight^T + bias` as one 2-D matmul over all leading dimensions. burn's `linear` would
/// reshape the transposed `[out, in]` weight to `[1, in, out]`, which makes backends that cannot
/// reshape a strided view (burn-flex) copy the whole weight on every call; a 2-D matmul reads
/// the transposed view in place.
pub(crate) fn project<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let [out, inner] = weight.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let x = x.reshape([rows, inner]);
    // A few rows (decoding): `(W x^T)^T` keeps the weight in its stored layout, so the matmul
    // does not have to repack all of it for every token.
    let mut y = if rows <= SMALL_ROWS {
        weight.matmul(x.transpose()).transpose()
    } else {
        x.matmul(weight.transpose())
    };
    if let Some(b) = bias {
        y = y + b.unsqueeze::<2>();
    }
    let mut shape = dims;
    shape[D - 1] = out;
    y.reshape(shape)
}

pub(crate) fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// Root-mean-square normalisation, computed in f32 whatever the input dtype (as `transformers`).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// The scale, `[dim]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
    /// The norm scales by `weight + offset` (Gemma: 1).
    pub offset: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Normalises over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let xf = x.cast(FloatDType::F32);
        let variance = xf.clone().square().mean_dim(D - 1);
        let normed = xf * (variance + self.eps).sqrt().recip();
        let dims = normed.dims();
        let mut shape = [1usize; D];
        shape[D - 1] = dims[D - 1];
        if self.offset != 0.0 {
            // Gemma: `(x * (1 + w.float())).type_as(x)`, the product in f32.
            let w = cast_to(self.weight.val(), DType::F32).add_scalar(self.offset);
            return cast_to(normed * w.reshape(shape), dtype);
        }
        // Llama: `w * x.to(input_dtype)`.
        let w = cast_to(self.weight.val(), dtype);
        normed.cast(dtype) * w.reshape(shape)
    }
}

impl<B: FusedBackend> RmsNorm<B> {
    /// [`RmsNorm::forward`], by the fused operation when `fused`.
    pub(crate) fn apply<const D: usize>(&self, x: Tensor<B, D>, fused: bool) -> Tensor<B, D> {
        if fused {
            fused::rms_norm(x, self.weight.val(), self.eps, self.offset)
        } else {
            self.forward(x)
        }
    }

    /// This norm of `x` through each of `projections`: by [`fused::rms_norm_linears`] when
    /// `fused` and no projection has a LoRA adapter (the normalised `x` is then recomputed in
    /// the backward instead of kept; a bias is added after it), else the norm's output through
    /// each projection's forward. One output per projection, in order.
    pub(crate) fn project<const N: usize>(
        &self,
        x: Tensor<B, 3>,
        projections: [&Projection<B>; N],
        fused: bool,
    ) -> [Tensor<B, 3>; N] {
        if fused && projections.iter().all(|p| p.lora.is_none()) {
            let dtype = x.dtype();
            let weights = projections.map(|p| cast_to(p.weight.val(), dtype));
            let ys = fused::rms_norm_linears(x, self.weight.val(), weights, self.eps, self.offset);
            let mut bias = projections.iter().map(|p| p.bias.as_ref());
            return ys.map(|y| match bias.next().flatten() {
                Some(b) => y + cast_to(b.val(), dtype).unsqueeze::<3>(),
                None => y,
            });
        }
        let normed = self.apply(x, fused);
        projections.map(|p| p.forward(normed.clone()))
    }
}

/// A block's input: the residual stream, and the norm its projections read it through (none:
/// as is).
pub(crate) struct BlockInput<'a, B: Backend> {
    x: Tensor<B, 3>,
    norm: Option<&'a RmsNorm<B>>,
}

impl<'a, B: FusedBackend> BlockInput<'a, B> {
    /// `x` through `norm` (if any).
    fn new(x: Tensor<B, 3>, norm: Option<&'a RmsNorm<B>>) -> Self {
        Self { x, norm }
    }

    /// The input through each of `projections` ([`RmsNorm::project`] behind a norm).
    fn project<const N: usize>(
        self,
        projections: [&Projection<B>; N],
        fused: bool,
    ) -> [Tensor<B, 3>; N] {
        match self.norm {
            Some(n) => n.project(self.x, projections, fused),
            None => projections.map(|p| p.forward(self.x.clone())),
        }
    }

    /// The input as the block sees it (normalised, if behind a norm).
    fn value(self, fused: bool) -> Tensor<B, 3> {
        match self.norm {
            Some(n) => n.apply(self.x, fused),
            None => self.x,
        }
    }
}

/// Multi-head attention with grouped key/value heads, optional per-head q/k RMSNorm (Qwen3).
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    /// The query, key and value projections.
    pub qkv: QkvProjections<B>,
    /// Output projection.
    pub o_proj: Projection<B>,
    /// RMSNorm of queries: per head (Qwen3), or over the whole projection (OLMo 2,
    /// [`SelfAttention::qk_norm_whole`]).
    pub q_norm: Option<RmsNorm<B>>,
    /// RMSNorm of keys, as `q_norm`.
    pub k_norm: Option<RmsNorm<B>>,
    /// The q/k norms act on the whole projection, before it is split into heads.
    pub qk_norm_whole: bool,
    /// The layer applies the rotary embedding (SmolLM3's NoPE layers do not).
    pub rope: bool,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// The query, key and value projections of an attention block.
#[derive(Module, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per layer, built once: boxing would only add an indirection to the forward"
)]
pub enum QkvProjections<B: Backend> {
    /// Three projections: `q_proj`, `k_proj`, `v_proj`.
    Separate(SeparateQkv<B>),
    /// One projection whose output rows are the queries', then the keys', then the values'
    /// (`qkv_proj`: Phi-3).
    Fused(Projection<B>),
}

/// `q_proj`, `k_proj` and `v_proj`.
#[derive(Module, Debug)]
pub struct SeparateQkv<B: Backend> {
    /// Query projection.
    pub q_proj: Projection<B>,
    /// Key projection.
    pub k_proj: Projection<B>,
    /// Value projection.
    pub v_proj: Projection<B>,
}

impl<B: FusedBackend> SelfAttention<B> {
    /// Queries `[b, s, heads * head_dim]`, keys and values `[b, s, kv_heads * head_dim]`.
    fn project_qkv(
        &self,
        x: BlockInput<'_, B>,
        fused: bool,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        match &self.qkv {
            QkvProjections::Separate(p) => {
                let [q, k, v] = x.project([&p.q_proj, &p.k_proj, &p.v_proj], fused);
                (q, k, v)
            }
            QkvProjections::Fused(p) => {
                let q = self.num_heads * self.head_dim;
                let kv = self.num_kv_heads * self.head_dim;
                let [y] = x.project([p], fused);
                (
                    y.clone().narrow(2, 0, q),
                    y.clone().narrow(2, q, kv),
                    y.narrow(2, q + kv, kv),
                )
            }
        }
    }
}

/// Per-forward context shared by every layer.
pub(crate) struct LayerContext<'a, B: Backend> {
    pub cos: &'a Tensor<B, 4>,
    pub sin: &'a Tensor<B, 4>,
    /// Where the sparse layers record their routing, when the load-balancing loss is wanted.
    pub router: Option<&'a std::cell::RefCell<RouterLog<B>>>,
    pub mask: &'a AttentionMask<B>,
    pub fused: bool,
    /// Multiplies the attention scores.
    pub scale: f64,
}

/// What every decoder layer of one forward takes besides its input: the rotary tables (global
/// and, where the family has one, local), the attention masks (causal or segmented, and the
/// sliding layers' own) and the attention's options.
pub(crate) struct LayerInputs<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    /// The sliding layers' own rotary tables (Gemma 3's local base), if any.
    local: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    mask: AttentionMask<B>,
    /// The sliding layers' mask, when the window hides some key from some query.
    sliding: Option<AttentionMask<B>>,
    pub fused: bool,
    scale: f64,
}

impl<B: Backend> LayerInputs<B> {
    /// The layers' inputs for `input` (`cache`: its past keys, whose segments the new ones
    /// join).
    pub(crate) fn new(
        config: &ModelConfig,
        attention: AttentionImpl,
        input: &ModelInput<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Self {
        let [b, s] = input.input_ids.dims();
        let device = input.input_ids.device();
        // LongRoPE picks its frequencies by the largest position of this forward (as
        // `transformers` does: `max(position_ids) + 1`); only then is it read back.
        let seq_len = if config.rope.depends_on_length() {
            let max: i64 = input.position_ids.clone().max().into_scalar().elem();
            usize::try_from(max).unwrap_or(0) + 1
        } else {
            0
        };
        let rotary = Rotary::<B>::new(&config.rope, seq_len, &device);
        let (cos, sin) = rotary.cos_sin(input.position_ids.clone());
        let local = config.rope_local.as_ref().map(|rope| {
            Rotary::<B>::new(rope, seq_len, &device).cos_sin(input.position_ids.clone())
        });
        let mask = match (cache, &input.segment_ids) {
            (None, None) => AttentionMask::causal(),
            (None, Some(seg)) => AttentionMask::segmented(seg.clone(), seg.clone(), 0),
            (Some(c), seg) => {
                let seg = seg
                    .clone()
                    .unwrap_or_else(|| Tensor::<B, 2, Int>::zeros([b, s], &device));
                let past = c.len();
                let keys = c.push_segments(seg.clone());
                AttentionMask::segmented(seg, keys, past)
            }
        };
        // Sliding-window layers share one mask of their own, unless the window reaches back
        // to the first key of every query (then it changes nothing, and the attention keeps
        // its plain causal kernels: a 4096-token window on shorter rows).
        let sliding = config
            .sliding_window
            .filter(|&w| w < mask.past() + s)
            .map(|w| mask.with_window(Some(w)));
        Self {
            cos,
            sin,
            local,
            mask,
            sliding,
            fused: attention.is_fused(),
            scale: config.attention_scale(),
        }
    }

    /// Layer `layer`'s context; its sparse block records its routing in `router`, if given.
    pub(crate) fn context<'a>(
        &'a self,
        config: &ModelConfig,
        layer: usize,
        router: Option<&'a std::cell::RefCell<RouterLog<B>>>,
    ) -> LayerContext<'a, B> {
        let slides = config.layer_window(layer).is_some();
        let (cos, sin) = match &self.local {
            Some((c, s)) if slides => (c, s),
            _ => (&self.cos, &self.sin),
        };
        LayerContext {
            cos,
            sin,
            router,
            mask: match (&self.sliding, slides) {
                (Some(m), true) => m,
                _ => &self.mask,
            },
            fused: self.fused,
            scale: self.scale,
        }
    }
}

impl<B: FusedBackend> SelfAttention<B> {
    fn forward(
        &self,
        x: BlockInput<'_, B>,
        ctx: &LayerContext<'_, B>,
        cache: Option<&mut LayerKv<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (mut q, mut k, v) = self.project_qkv(x, ctx.fused);
        if self.qk_norm_whole {
            if let Some(n) = &self.q_norm {
                q = n.apply(q, ctx.fused);
            }
            if let Some(n) = &self.k_norm {
                k = n.apply(k, ctx.fused);
            }
        }
        let mut q = q.reshape([b, s, h, d]);
        let mut k = k.reshape([b, s, kvh, d]);
        let v = v.reshape([b, s, kvh, d]).swap_dims(1, 2);
        if !self.qk_norm_whole {
            if let Some(n) = &self.q_norm {
                q = n.apply(q, ctx.fused);
            }
            if let Some(n) = &self.k_norm {
                k = n.apply(k, ctx.fused);
            }
        }
        let rotate = |x: Tensor<B, 4>| {
            if ctx.fused {
                fused::rotary(x, ctx.cos, ctx.sin)
            } else {
                apply_rotary(x, ctx.cos, ctx.sin)
            }
        };
        // Partial rotary embedding (Phi-4-mini): the tables cover the first channels of each
        // head; the others pass through unrotated.
        let rotary_dim = ctx.cos.dims()[3];
        let rope = |x: Tensor<B, 4>| {
            if !self.rope {
                x
            } else if rotary_dim < d {
                let pass = x.clone().narrow(3, rotary_dim, d - rotary_dim);
                Tensor::cat(vec![rotate(x.narrow(3, 0, rotary_dim)), pass], 3)
            } else {
                rotate(x)
            }
        };
        let q = rope(q.swap_dims(1, 2));
        let mut k = rope(k.swap_dims(1, 2));
        let mut v = v;
        if let Some(slot) = cache {
            if let (Some(pk), Some(pv)) = (slot.0.take(), slot.1.take()) {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            *slot = (Some(k.clone()), Some(v.clone()));
        }
        let out = if ctx.fused {
            let spec = AttentionSpec {
                past: ctx.mask.past(),
                window: ctx.mask.window(),
                scale: ctx.scale,
                ..AttentionSpec::causal(d)
            };
            fused::attention(q, k, v, ctx.mask.segments().cloned(), &spec)
        } else {
            let k = repeat_kv(k, h / kvh);
            let v = repeat_kv(v, h / kvh);
            scaled_dot_product_scaled(q, k, v, ctx.mask, ctx.scale)
        };
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, h * d]))
    }
}

/// The gated feed-forward block: `down(act(gate(x)) * up(x))`, SwiGLU (SiLU) or GeGLU (GELU,
/// tanh approximation: Gemma).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// The gate and up projections.
    pub gate_up: GateUpProjections<B>,
    /// Down projection.
    pub down_proj: Projection<B>,
    /// The gate's activation is GELU with the tanh approximation rather than SiLU.
    pub gelu_tanh: bool,
}

/// The gate and up projections of an MLP.
#[derive(Module, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per layer, built once: boxing would only add an indirection to the forward"
)]
pub enum GateUpProjections<B: Backend> {
    /// Two projections: `gate_proj`, `up_proj`.
    Separate(SeparateGateUp<B>),
    /// One projection whose output rows are the gate's, then the up projection's
    /// (`gate_up_proj`: Phi-3).
    Fused(Projection<B>),
}

/// `gate_proj` and `up_proj`.
#[derive(Module, Debug)]
pub struct SeparateGateUp<B: Backend> {
    /// Gate projection (through the activation).
    pub gate_proj: Projection<B>,
    /// Up projection.
    pub up_proj: Projection<B>,
}

impl<B: Backend> Mlp<B> {
    /// The gate's input to the activation and the up projection, `[b, s, intermediate]` each.
    fn project_gate_up(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        match &self.gate_up {
            GateUpProjections::Separate(p) => {
                (p.gate_proj.forward(x.clone()), p.up_proj.forward(x))
            }
            GateUpProjections::Fused(p) => {
                let y = p.forward(x);
                let i = y.dims()[2] / 2;
                (y.clone().narrow(2, 0, i), y.narrow(2, i, i))
            }
        }
    }

    /// Applies the block.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = self.project_gate_up(x);
        self.down_proj.forward(self.activate_reference(gate, up))
    }

    /// `act(gate) · up` by the decomposed operations.
    fn activate_reference<const D: usize>(
        &self,
        gate: Tensor<B, D>,
        up: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let gate = if self.gelu_tanh {
            gelu_approximate(gate)
        } else {
            silu(gate)
        };
        gate * up
    }

    /// The gate's activation.
    fn activation(&self) -> Activation {
        if self.gelu_tanh {
            Activation::GeluTanh
        } else {
            Activation::Silu
        }
    }
}

impl<B: FusedBackend> Mlp<B> {
    /// `act(gate) · up`, by the fused operation when `fused`.
    fn activate<const D: usize>(
        &self,
        gate: Tensor<B, D>,
        up: Tensor<B, D>,
        fused: bool,
    ) -> Tensor<B, D> {
        if fused {
            fused::gated(gate, up, self.activation())
        } else {
            self.activate_reference(gate, up)
        }
    }
}

impl<B: FusedBackend> Mlp<B> {
    /// [`Mlp::forward`], the gate by the fused operation when `fused`.
    fn apply(&self, x: Tensor<B, 3>, fused: bool) -> Tensor<B, 3> {
        self.apply_input(BlockInput::new(x, None), fused)
    }

    /// [`Mlp::apply`] of an input behind a norm ([`RmsNorm::project`] when `fused`).
    fn apply_input(&self, x: BlockInput<'_, B>, fused: bool) -> Tensor<B, 3> {
        if !fused {
            return self.forward(x.value(fused));
        }
        let act = self.activation();
        let (gate, up) = match &self.gate_up {
            GateUpProjections::Separate(p) => {
                let [gate, up] = x.project([&p.gate_proj, &p.up_proj], fused);
                (gate, up)
            }
            GateUpProjections::Fused(p) => {
                let [y] = x.project([p], fused);
                let i = y.dims()[2] / 2;
                (y.clone().narrow(2, 0, i), y.narrow(2, i, i))
            }
        };
        let down = &self.down_proj;
        if down.lora.is_none() && down.bias.is_none() {
            // One node that recomputes the activation in the backward instead of keeping it.
            let weight = cast_to(down.weight.val(), gate.dtype());
            return fused::gated_linear(gate, up, weight, act);
        }
        down.forward(fused::gated(gate, up, act))
    }
}

/// A layer's feed-forward block: one MLP, or routed experts (Qwen3-MoE).
#[derive(Module, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per layer, built once: boxing would only add an indirection to the forward"
)]
pub enum FeedForward<B: Backend> {
    /// One gated MLP.
    Dense(Mlp<B>),
    /// A mixture of experts.
    Sparse(SparseMoe<B>),
}

/// Routed experts: a softmax router (`mlp.gate`) sends each token to its `top_k` most probable
/// experts (`mlp.experts.<e>`), whose outputs are summed with those probabilities (renormalised
/// to sum to 1 when `norm_topk_prob`), as `transformers`' `Qwen3MoeSparseMoeBlock`. The tokens
/// are grouped per expert (one pass over the experts, none over the tokens).
#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// The router, `[num_experts, hidden]`.
    pub gate: Param<Tensor<B, 2>>,
    /// The experts' MLPs.
    pub experts: Vec<Mlp<B>>,
    /// Experts per token.
    pub top_k: usize,
    /// The top-k probabilities are renormalised to sum to 1.
    pub norm_topk_prob: bool,
    /// LoRA on the router (PEFT's `target_parameters` `gate.weight`).
    pub gate_lora: Option<LoraAdapter<B>>,
    /// LoRA on the experts' stacked gate and up projections (PEFT's `gate_up_proj`: each
    /// expert's update has the gate's rows, then the up projection's).
    pub gate_up_lora: Option<ExpertsLora<B>>,
    /// LoRA on the experts' stacked down projections (PEFT's `down_proj`).
    pub down_lora: Option<ExpertsLora<B>>,
}

impl<B: FusedBackend> FeedForward<B> {
    fn apply(
        &self,
        x: BlockInput<'_, B>,
        fused: bool,
        router: Option<&std::cell::RefCell<RouterLog<B>>>,
    ) -> Tensor<B, 3> {
        match self {
            Self::Dense(m) => m.apply_input(x, fused),
            Self::Sparse(m) => {
                let (out, routing) = m.route(x.value(fused), fused);
                if let Some(log) = router {
                    log.borrow_mut().add(&routing);
                }
                out
            }
        }
    }
}

/// One sparse layer's routing: its router probabilities `[tokens, experts]` (f32, on the
/// graph) and the experts each token went to (`top_k` a token, row-major).
pub(crate) struct Routing<B: Backend> {
    probs: Tensor<B, 2>,
    chosen: Vec<usize>,
    top_k: usize,
}

/// The routing of every sparse layer of a forward, summed as `transformers`'
/// `load_balancing_loss_func` sums it: top-k assignments and router probabilities per expert,
/// over the real tokens (`mask`; padding left out, as its `attention_mask` does).
pub(crate) struct RouterLog<B: Backend> {
    mask: Option<(Vec<bool>, Tensor<B, 2>)>,
    counts: Vec<f64>,
    prob_sum: Option<Tensor<B, 1>>,
    rows: f64,
}

/// The top-k assignments per expert and the real tokens of a forward's routing, which the
/// load-balancing loss weighs the router probabilities by (no gradient flows through them).
#[derive(Debug, Clone)]
pub(crate) struct RouterCounts {
    counts: Vec<f64>,
    rows: f64,
}

impl<B: Backend> RouterLog<B> {
    pub(crate) fn new(real: Option<&[bool]>, device: &B::Device) -> Self {
        let mask = real.map(|m| {
            let values: Vec<f32> = m.iter().map(|&r| f32::from(u8::from(r))).collect();
            let t = Tensor::<B, 2>::from_data(TensorData::new(values, [m.len(), 1]), device);
            (m.to_vec(), t)
        });
        Self {
            mask,
            counts: Vec::new(),
            prob_sum: None,
            rows: 0.0,
        }
    }

    pub(crate) fn add(&mut self, r: &Routing<B>) {
        let [t, n] = r.probs.dims();
        self.counts.resize(n, 0.0);
        for tok in 0..t {
            if self
                .mask
                .as_ref()
                .is_none_or(|(m, _)| m.get(tok).copied().unwrap_or(true))
            {
                for &e in &r.chosen[tok * r.top_k..(tok + 1) * r.top_k] {
                    self.counts[e] += 1.0;
                }
                self.rows += 1.0;
            }
        }
        let weighted = match &self.mask {
            Some((_, m)) if m.dims()[0] == t => r.probs.clone() * m.clone(),
            _ => r.probs.clone(),
        };
        let sum = weighted.sum_dim(0).reshape([n]);
        self.prob_sum = Some(match self.prob_sum.take() {
            Some(p) => p + sum,
            None => sum,
        });
    }

    /// `experts · Σ_e (assignments_e / rows) · (probability_e / rows)`; `None` without a
    /// sparse layer or a real token.
    pub(crate) fn loss(self) -> Option<Tensor<B, 1>> {
        let counts = self.counts();
        self.loss_with(&counts)
    }

    /// The assignments and real tokens recorded so far.
    pub(crate) fn counts(&self) -> RouterCounts {
        RouterCounts {
            counts: self.counts.clone(),
            rows: self.rows,
        }
    }

    /// [`RouterLog::loss`] with the probabilities recorded here and the assignments and tokens
    /// of `totals`: a part of a forward's routing (one layer) weighed as the whole forward
    /// weighs it, whose parts then add up to the whole's loss.
    pub(crate) fn loss_with(self, totals: &RouterCounts) -> Option<Tensor<B, 1>> {
        let prob_sum = self.prob_sum?;
        if totals.rows == 0.0 {
            return None;
        }
        let n = totals.counts.len();
        let device = prob_sum.device();
        let counts: Vec<f32> = totals.counts.iter().map(|&c| c as f32).collect();
        let counts = Tensor::<B, 1>::from_data(TensorData::new(counts, [n]), &device);
        let scale = n as f64 / (totals.rows * totals.rows);
        Some((prob_sum * counts).sum().mul_scalar(scale))
    }
}

impl<B: FusedBackend> SparseMoe<B> {
    /// Applies the block to `x` `[batch, seq, hidden]`.
    pub fn apply(&self, x: Tensor<B, 3>, fused: bool) -> Tensor<B, 3> {
        self.route(x, fused).0
    }

    /// [`SparseMoe::apply`], and how the tokens were routed.
    fn route(&self, x: Tensor<B, 3>, fused: bool) -> (Tensor<B, 3>, Routing<B>) {
        let [b, s, h] = x.dims();
        let (t, n, k) = (b * s, self.experts.len(), self.top_k);
        let dtype = x.dtype();
        let device = x.device();
        let xf = x.reshape([t, h]);
        // Router probabilities in f32 (`softmax(..., dtype=torch.float)`).
        let mut logits = project(xf.clone(), cast_to(self.gate.val(), dtype), None);
        if let Some(lora) = &self.gate_lora {
            logits = logits + lora.delta(xf.clone());
        }
        let probs = burn::tensor::activation::softmax(logits.cast(FloatDType::F32), 1);
        // The top-k choice is made on the host, where the tokens of each expert are grouped:
        // the most probable first, ties to the lower index (no gradient flows through it).
        let host: Vec<f32> = probs.clone().into_data().iter::<f32>().collect();
        let mut chosen = vec![0usize; t * k];
        let mut order: Vec<usize> = Vec::with_capacity(n);
        for (row, slots) in host.chunks(n.max(1)).zip(chosen.chunks_mut(k.max(1))) {
            order.clear();
            order.extend(0..n);
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            slots.copy_from_slice(&order[..k]);
        }
        let index = Tensor::<B, 2, Int>::from_data(
            TensorData::new(chosen.iter().map(|&e| e as i64).collect(), [t, k]),
            &device,
        );
        let mut weights = probs.clone().gather(1, index);
        if self.norm_topk_prob {
            weights = weights.clone() / weights.sum_dim(1);
        }
        let weights = cast_to(weights, dtype).reshape([t * k]);
        let mut out = Tensor::<B, 2>::zeros([t, h], (&device, dtype));
        let mut slots_of: Vec<Vec<i64>> = vec![Vec::new(); n];
        for (slot, &e) in chosen.iter().enumerate() {
            slots_of[e].push(slot as i64);
        }
        for (e, (expert, slots)) in self.experts.iter().zip(slots_of).enumerate() {
            if slots.is_empty() {
                // No token chose this expert. `transformers` keeps all experts in one tensor,
                // whose gradient is then zero for it (and AdamW still decays it): a zero
                // gradient here too, rather than none.
                out = out + zero_gradient_touch(expert, dtype);
                continue;
            }
            let m = slots.len();
            let tokens: Vec<i64> = slots.iter().map(|&p| p / k as i64).collect();
            let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [m]), &device);
            let slots = Tensor::<B, 1, Int>::from_data(TensorData::new(slots, [m]), &device);
            let rows = xf.clone().select(0, tokens.clone());
            let y = if self.gate_up_lora.is_none() && self.down_lora.is_none() {
                expert.apply(rows.unsqueeze_dim(0), fused).reshape([m, h])
            } else {
                self.expert_with_lora(e, expert, rows, fused)
            };
            let w = weights.clone().select(0, slots).unsqueeze_dim(1);
            out = out.select_assign(0, tokens, y * w, IndexingUpdateOp::Add);
        }
        let routing = Routing {
            probs,
            chosen,
            top_k: k,
        };
        (out.reshape([b, s, h]), routing)
    }

    /// Expert `e` on its rows `x` `[m, hidden]` with the experts' adapters: their updates added
    /// to the expert's gate and up outputs and to its down projection's output, which equals
    /// PEFT's forward with the updated stacked weights.
    fn expert_with_lora(
        &self,
        e: usize,
        expert: &Mlp<B>,
        x: Tensor<B, 2>,
        fused: bool,
    ) -> Tensor<B, 2> {
        let m = x.dims()[0];
        let (gate, up) = expert.project_gate_up(x.clone().unsqueeze_dim(0));
        let i = gate.dims()[2];
        let (mut gate, mut up) = (gate.reshape([m, i]), up.reshape([m, i]));
        if let Some(lora) = &self.gate_up_lora {
            let d = lora.delta(e, x);
            gate = gate + d.clone().narrow(1, 0, i);
            up = up + d.narrow(1, i, i);
        }
        let hidden = expert.activate(gate, up, fused);
        let y = expert.down_proj.forward(hidden.clone());
        match &self.down_lora {
            Some(lora) => y + lora.delta(e, hidden),
            None => y,
        }
    }
}

/// `0 · Σ weights` of a trainable expert (shape `[1, 1]`), so that it gets a zero gradient;
/// a zero without any graph when it is frozen.
fn zero_gradient_touch<B: Backend>(expert: &Mlp<B>, dtype: DType) -> Tensor<B, 2> {
    let device = expert.down_proj.weight.val().device();
    let mut touch = Tensor::<B, 2>::zeros([1, 1], (&device, dtype));
    for p in expert.named_projections().into_iter().map(|(_, p)| p) {
        let w = p.weight.val();
        if w.is_require_grad() {
            touch = touch + cast_to(w.sum().mul_scalar(0.0), dtype).reshape([1, 1]);
        }
    }
    touch
}

/// Pushes an MLP's projections onto `$out` in checkpoint order, each named `$prefix` + its
/// Hugging Face name; `$r` is `&` or `&mut` (the one list behind [`Mlp::named_projections`]
/// and [`DecoderLayer::projections`] / [`DecoderLayer::projections_mut`]).
macro_rules! push_mlp_projections {
    ($out:ident, $prefix:literal, $gate_up:expr, $down:expr, $($r:tt)+) => {
        match $gate_up {
            GateUpProjections::Separate(p) => {
                $out.push((concat!($prefix, "gate_proj"), $($r)+ p.gate_proj));
                $out.push((concat!($prefix, "up_proj"), $($r)+ p.up_proj));
            }
            GateUpProjections::Fused(p) => $out.push((concat!($prefix, "gate_up_proj"), p)),
        }
        $out.push((concat!($prefix, "down_proj"), $down));
    };
}

/// Pushes an attention block's projections onto `$out` in checkpoint order (`self_attn.`
/// names); `$r` is `&` or `&mut`.
macro_rules! push_attention_projections {
    ($out:ident, $qkv:expr, $o:expr, $($r:tt)+) => {
        match $qkv {
            QkvProjections::Separate(p) => {
                $out.push(("self_attn.q_proj", $($r)+ p.q_proj));
                $out.push(("self_attn.k_proj", $($r)+ p.k_proj));
                $out.push(("self_attn.v_proj", $($r)+ p.v_proj));
            }
            QkvProjections::Fused(p) => $out.push(("self_attn.qkv_proj", p)),
        }
        $out.push(("self_attn.o_proj", $o));
    };
}

impl<B: Backend> Mlp<B> {
    /// The projections, named below the MLP (`gate_proj`, `up_proj` or `gate_up_proj`, then
    /// `down_proj`).
    pub fn named_projections(&self) -> Vec<(&'static str, &Projection<B>)> {
        let mut out = Vec::with_capacity(3);
        push_mlp_projections!(out, "", &self.gate_up, &self.down_proj, &);
        out
    }
}

/// One decoder layer: pre-norm (Llama, Qwen, Mistral), post-norm (OLMo 2) or both (Gemma), as
/// [`crate::NormPlacement`] says; the norms keep their Hugging Face names.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention block.
    pub self_attn: SelfAttention<B>,
    /// Feed-forward block.
    pub mlp: FeedForward<B>,
    /// Norm before attention (pre-norm layers; `None` in post-norm ones).
    pub input_layernorm: Option<RmsNorm<B>>,
    /// Pre-norm: the norm before the MLP. Post-norm: the norm of the attention's output.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Sandwich: the norm before the MLP (`None` otherwise).
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    /// Post-norm and sandwich: the norm of the MLP's output (`None` in pre-norm layers).
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
}

impl<B: Backend> DecoderLayer<B> {
    /// The layer's projections, named below the layer (`self_attn.q_proj`), in checkpoint
    /// order.
    pub fn projections(&self) -> Vec<(&'static str, &Projection<B>)> {
        let mut out = Vec::with_capacity(7);
        push_attention_projections!(out, &self.self_attn.qkv, &self.self_attn.o_proj, &);
        // A dense MLP's projections; the experts of a sparse one are not linear layers to PEFT
        // (3-D parameters in `transformers` 5), so not among them.
        if let FeedForward::Dense(m) = &self.mlp {
            push_mlp_projections!(out, "mlp.", &m.gate_up, &m.down_proj, &);
        }
        out
    }

    /// [`DecoderLayer::projections`], mutable.
    pub fn projections_mut(&mut self) -> Vec<(&'static str, &mut Projection<B>)> {
        let mut out = Vec::with_capacity(7);
        let SelfAttention { qkv, o_proj, .. } = &mut self.self_attn;
        push_attention_projections!(out, qkv, o_proj, &mut);
        if let FeedForward::Dense(Mlp {
            gate_up, down_proj, ..
        }) = &mut self.mlp
        {
            push_mlp_projections!(out, "mlp.", gate_up, down_proj, &mut);
        }
        out
    }
}

impl<B: FusedBackend> DecoderLayer<B> {
    pub(crate) fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<'_, B>,
        cache: Option<&mut LayerKv<B>>,
    ) -> Tensor<B, 3> {
        let fused = ctx.fused;
        let attn_in = BlockInput::new(x.clone(), self.input_layernorm.as_ref());
        let attn = self.self_attn.forward(attn_in, ctx, cache);
        match &self.post_feedforward_layernorm {
            // Post-norm and sandwich: each block's output is normalised before its residual
            // add (and, in a sandwich, the MLP's input too).
            Some(post_mlp) => {
                let h = x + self.post_attention_layernorm.apply(attn, fused);
                let mlp_in = BlockInput::new(h.clone(), self.pre_feedforward_layernorm.as_ref());
                let mlp = self.mlp.apply(mlp_in, fused, ctx.router);
                h + post_mlp.apply(mlp, fused)
            }
            None => {
                let h = x + attn;
                let mlp_in = BlockInput::new(h.clone(), Some(&self.post_attention_layernorm));
                h + self.mlp.apply(mlp_in, fused, ctx.router)
            }
        }
    }
}

/// The inputs of one forward pass.
///
/// `position_ids` restart at 0 for each packed row and `segment_ids` say which packed row a
/// token belongs to: a token only attends to earlier tokens of its own segment.
#[derive(Debug, Clone)]
pub struct ModelInput<B: Backend> {
    /// `[batch, seq]` token ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]` rotary positions.
    pub position_ids: Tensor<B, 2, Int>,
    /// `[batch, seq]` segment (packed row) ids; `None` means one segment per batch row.
    pub segment_ids: Option<Tensor<B, 2, Int>>,
}

impl<B: burn::tensor::backend::AutodiffBackend> ModelInput<B> {
    /// The same input on the inner (non-autodiff) backend.
    pub fn inner(&self) -> ModelInput<B::InnerBackend> {
        ModelInput {
            input_ids: self.input_ids.clone().inner(),
            position_ids: self.position_ids.clone().inner(),
            segment_ids: self.segment_ids.clone().map(Tensor::inner),
        }
    }
}

impl<B: Backend> ModelInput<B> {
    /// Unpacked rows of equal length: positions `0..seq`, one segment per row.
    pub fn from_rows(rows: &[Vec<u32>], device: &B::Device) -> Result<Self> {
        let seq = rows.first().map_or(0, Vec::len);
        if seq == 0 || rows.iter().any(|r| r.len() != seq) {
            return Err(ModelError::InvalidInput(
                "rows must be non-empty and of equal length".into(),
            ));
        }
        let ids: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
        let pos: Vec<i64> = (0..rows.len()).flat_map(|_| 0..seq as i64).collect();
        Ok(Self {
            input_ids: int_tensor(ids, [rows.len(), seq], device),
            position_ids: int_tensor(pos, [rows.len(), seq], device),
            segment_ids: None,
        })
    }

    /// Packed rows: every batch row is a concatenation of segments; `segments[b][t]` is the
    /// segment of token `t`. Positions restart at 0 at each segment boundary.
    pub fn packed(rows: &[Vec<u32>], segments: &[Vec<u32>], device: &B::Device) -> Result<Self> {
        let seq = rows.first().map_or(0, Vec::len);
        if seq == 0
            || rows.iter().any(|r| r.len() != seq)
            || segments.len() != rows.len()
            || segments.iter().any(|s| s.len() != seq)
        {
            return Err(ModelError::InvalidInput(
                "rows and segments must be non-empty and of equal shape".into(),
            ));
        }
        let ids: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
        let pos: Vec<i64> = segments
            .iter()
            .flat_map(|s| positions_from_segments(s).into_iter().map(i64::from))
            .collect();
        let seg: Vec<i64> = segments.iter().flatten().map(|&s| i64::from(s)).collect();
        let shape = [rows.len(), seq];
        Ok(Self {
            input_ids: int_tensor(ids, shape, device),
            position_ids: int_tensor(pos, shape, device),
            segment_ids: Some(int_tensor(seg, shape, device)),
        })
    }
}

/// Position ids that restart at 0 whenever the segment id changes.
pub(crate) fn positions_from_segments(segments: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(segments.len());
    let mut pos = 0u32;
    for (i, s) in segments.iter().enumerate() {
        if i > 0 && segments[i - 1] != *s {
            pos = 0;
        }
        out.push(pos);
        pos += 1;
    }
    out
}

pub(crate) fn int_tensor<B: Backend>(
    values: Vec<i64>,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Builds parameters from host data, checking each tensor's shape against its spec.
struct ParamLoader<'a, B: Backend, F> {
    specs: HashMap<String, TensorSpec>,
    source: &'a mut F,
    device: &'a B::Device,
    dtype: DType,
}

impl<B: Backend, F: FnMut(&TensorSpec) -> Result<TensorData>> ParamLoader<'_, B, F> {
    fn data(&mut self, name: &str) -> Result<TensorData> {
        let spec = self.specs.get(name).ok_or_else(|| {
            ModelError::InvalidInput(format!("no tensor named {name} in this architecture"))
        })?;
        let data = (self.source)(spec)?;
        if data.shape.as_slice() != spec.shape.as_slice() {
            return Err(ModelError::ShapeMismatch {
                path: "<source>".into(),
                tensor: name.to_string(),
                expected: spec.shape.clone(),
                found: data.shape.to_vec(),
            });
        }
        Ok(data)
    }

    fn vector(&mut self, name: &str) -> Result<Param<Tensor<B, 1>>> {
        Ok(Param::from_tensor(Tensor::from_data(
            self.data(name)?,
            (self.device, self.dtype),
        )))
    }

    fn matrix(&mut self, name: &str) -> Result<Param<Tensor<B, 2>>> {
        Ok(Param::from_tensor(Tensor::from_data(
            self.data(name)?,
            (self.device, self.dtype),
        )))
    }

    fn projection(&mut self, prefix: &str, bias: bool) -> Result<Projection<B>> {
        let weight = self.matrix(&format!("{prefix}.weight"))?;
        let bias = if bias {
            Some(self.vector(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        Ok(Projection {
            weight,
            bias,
            lora: None,
        })
    }
}

/// Hidden states of every stage, as `transformers` reports them with `output_hidden_states`
/// (embeddings, each layer's output) plus the final norm's output.
#[derive(Debug, Clone)]
pub struct HiddenStates<B: Backend> {
    /// Output of the embedding lookup.
    pub embeddings: Tensor<B, 3>,
    /// Output of each decoder layer.
    pub layers: Vec<Tensor<B, 3>>,
    /// Output of the final norm (the LM head's input).
    pub final_norm: Tensor<B, 3>,
}

/// A decoder-only causal language model (any family of [`crate::Architecture`]).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// `[vocab, hidden]` token embeddings (`model.embed_tokens.weight`).
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// The final norm.
    pub norm: RmsNorm<B>,
    /// The LM head; `None` when tied to the embeddings.
    pub lm_head: Option<Projection<B>>,
    /// The configuration the model was built from.
    pub config: ModelConfig,
    /// Which attention kernel the forward uses.
    pub attention: AttentionImpl,
    /// The dtype activations are computed in; `None` means the parameters' dtype. With f32
    /// parameters and bf16 here, the parameters act as f32 master weights.
    pub compute_dtype: Option<DType>,
    /// The configuration of the LoRA adapters the projections carry, if any
    /// ([`CausalLm::with_lora`]).
    pub lora: Option<LoraConfig>,
    /// Gradient checkpointing: [`CausalLm::forward_for_training`] keeps only each decoder
    /// layer's input and recomputes the layer in the backward pass
    /// ([`CausalLm::with_gradient_checkpointing`]).
    pub gradient_checkpointing: bool,
}

/// A parameter of either rank, with its Hugging Face name.
pub enum NamedParam<'a, B: Backend> {
    /// A vector (norm scale or bias).
    Vector(&'a str, &'a Param<Tensor<B, 1>>),
    /// A matrix (projection or embedding).
    Matrix(&'a str, &'a Param<Tensor<B, 2>>),
}

impl<B: Backend> CausalLm<B> {
    /// Builds a model, asking `source` for the host data of each tensor (in Hugging Face layout)
    /// and uploading it in `dtype`.
    pub fn from_source(
        config: &ModelConfig,
        dtype: DType,
        device: &B::Device,
        mut source: impl FnMut(&TensorSpec) -> Result<TensorData>,
    ) -> Result<Self> {
        let mut params = ParamLoader {
            specs: tensor_specs(config)
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
            source: &mut source,
            device,
            dtype,
        };
        let embed_tokens = params.matrix("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}");
            let norm = |params: &mut ParamLoader<'_, B, _>, name: &str| -> Result<RmsNorm<B>> {
                Ok(RmsNorm {
                    weight: params.vector(&format!("{p}.{name}.weight"))?,
                    eps: config.rms_norm_eps,
                    offset: config.norm_offset,
                })
            };
            let (q_norm, k_norm) = if config.qk_norm {
                (
                    Some(norm(&mut params, "self_attn.q_norm")?),
                    Some(norm(&mut params, "self_attn.k_norm")?),
                )
            } else {
                (None, None)
            };
            layers.push(DecoderLayer {
                self_attn: SelfAttention {
                    qkv: if config.fused_qkv {
                        QkvProjections::Fused(
                            params
                                .projection(&format!("{p}.self_attn.qkv_proj"), config.qkv_bias)?,
                        )
                    } else {
                        QkvProjections::Separate(SeparateQkv {
                            q_proj: params
                                .projection(&format!("{p}.self_attn.q_proj"), config.qkv_bias)?,
                            k_proj: params
                                .projection(&format!("{p}.self_attn.k_proj"), config.qkv_bias)?,
                            v_proj: params
                                .projection(&format!("{p}.self_attn.v_proj"), config.qkv_bias)?,
                        })
                    },
                    o_proj: params.projection(&format!("{p}.self_attn.o_proj"), config.o_bias)?,
                    q_norm,
                    k_norm,
                    qk_norm_whole: config.qk_norm_whole,
                    rope: config.layer_rope(l),
                    num_heads: config.num_heads,
                    num_kv_heads: config.num_kv_heads,
                    head_dim: config.head_dim,
                },
                mlp: if let Some(moe) = config.moe.as_ref().filter(|_| config.layer_sparse(l)) {
                    let mut experts = Vec::with_capacity(moe.num_experts);
                    for e in 0..moe.num_experts {
                        let q = format!("{p}.mlp.experts.{e}");
                        experts.push(Mlp {
                            gate_up: GateUpProjections::Separate(SeparateGateUp {
                                gate_proj: params.projection(&format!("{q}.gate_proj"), false)?,
                                up_proj: params.projection(&format!("{q}.up_proj"), false)?,
                            }),
                            down_proj: params.projection(&format!("{q}.down_proj"), false)?,
                            gelu_tanh: config.activation == Activation::GeluTanh,
                        });
                    }
                    FeedForward::Sparse(SparseMoe {
                        gate: params.matrix(&format!("{p}.mlp.gate.weight"))?,
                        experts,
                        top_k: moe.top_k,
                        norm_topk_prob: moe.norm_topk_prob,
                        gate_lora: None,
                        gate_up_lora: None,
                        down_lora: None,
                    })
                } else {
                    FeedForward::Dense(Mlp {
                        gate_up: if config.fused_gate_up {
                            GateUpProjections::Fused(
                                params.projection(
                                    &format!("{p}.mlp.gate_up_proj"),
                                    config.mlp_bias,
                                )?,
                            )
                        } else {
                            GateUpProjections::Separate(SeparateGateUp {
                                gate_proj: params
                                    .projection(&format!("{p}.mlp.gate_proj"), config.mlp_bias)?,
                                up_proj: params
                                    .projection(&format!("{p}.mlp.up_proj"), config.mlp_bias)?,
                            })
                        },
                        down_proj: params
                            .projection(&format!("{p}.mlp.down_proj"), config.mlp_bias)?,
                        gelu_tanh: config.activation == Activation::GeluTanh,
                    })
                },
                input_layernorm: match config.norm_placement {
                    NormPlacement::Pre | NormPlacement::Sandwich => {
                        Some(norm(&mut params, "input_layernorm")?)
                    }
                    NormPlacement::Post => None,
                },
                post_attention_layernorm: norm(&mut params, "post_attention_layernorm")?,
                pre_feedforward_layernorm: match config.norm_placement {
                    NormPlacement::Sandwich => {
                        Some(norm(&mut params, "pre_feedforward_layernorm")?)
                    }
                    NormPlacement::Pre | NormPlacement::Post => None,
                },
                post_feedforward_layernorm: match config.norm_placement {
                    NormPlacement::Pre => None,
                    NormPlacement::Post | NormPlacement::Sandwich => {
                        Some(norm(&mut params, "post_feedforward_layernorm")?)
                    }
                },
            });
        }
        let norm = RmsNorm {
            weight: params.vector("model.norm.weight")?,
            eps: config.rms_norm_eps,
            offset: config.norm_offset,
        };
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(params.projection("lm_head", false)?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config: config.clone(),
            attention: AttentionImpl::default(),
            compute_dtype: None,
            lora: None,
            gradient_checkpointing: false,
        })
    }

    /// A randomly initialised model (`transformers`' scheme: normal(0, `std`) matrices, zero
    /// biases, unit norms), deterministic in `seed`.
    pub fn random(
        config: &ModelConfig,
        std: f32,
        seed: u64,
        dtype: DType,
        device: &B::Device,
    ) -> Result<Self> {
        let mut rng = crate::init::NormalRng::new(seed);
        Self::from_source(config, dtype, device, |spec| Ok(rng.init(spec, std)))
    }

    /// Selects the attention kernel.
    #[must_use]
    pub fn with_attention(mut self, attention: AttentionImpl) -> Self {
        self.attention = attention;
        self
    }

    /// Gradient checkpointing on or off: with it, a training forward
    /// ([`CausalLm::forward_for_training`]) keeps each decoder layer's input only, and the
    /// backward pass recomputes one layer at a time (`transformers`'
    /// `gradient_checkpointing_enable()`): the activations a step holds are then those of one
    /// layer, for one more forward pass of compute. Gradients are unchanged.
    #[must_use]
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    /// Computes in `dtype` whatever the parameters' dtype (mixed precision with master weights).
    #[must_use]
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = Some(dtype);
        self
    }

    /// The float type the parameters are stored in.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.val().dtype()
    }

    /// The float type activations are computed in.
    pub fn activation_dtype(&self) -> DType {
        self.compute_dtype.unwrap_or_else(|| self.dtype())
    }

    /// Visits every parameter with its Hugging Face name, in checkpoint order.
    pub fn visit_named(&self, mut f: impl FnMut(NamedParam<'_, B>)) {
        f(NamedParam::Matrix(
            "model.embed_tokens.weight",
            &self.embed_tokens,
        ));
        for (l, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            for (name, proj) in layer.projections() {
                f(NamedParam::Matrix(
                    &format!("{p}.{name}.weight"),
                    &proj.weight,
                ));
                if let Some(b) = &proj.bias {
                    f(NamedParam::Vector(&format!("{p}.{name}.bias"), b));
                }
            }
            if let FeedForward::Sparse(moe) = &layer.mlp {
                f(NamedParam::Matrix(
                    &format!("{p}.mlp.gate.weight"),
                    &moe.gate,
                ));
                for (e, expert) in moe.experts.iter().enumerate() {
                    for (name, proj) in expert.named_projections() {
                        f(NamedParam::Matrix(
                            &format!("{p}.mlp.experts.{e}.{name}.weight"),
                            &proj.weight,
                        ));
                    }
                }
            }
            let a = &layer.self_attn;
            if let Some(n) = &a.q_norm {
                f(NamedParam::Vector(
                    &format!("{p}.self_attn.q_norm.weight"),
                    &n.weight,
                ));
            }
            if let Some(n) = &a.k_norm {
                f(NamedParam::Vector(
                    &format!("{p}.self_attn.k_norm.weight"),
                    &n.weight,
                ));
            }
            if let Some(n) = &layer.input_layernorm {
                f(NamedParam::Vector(
                    &format!("{p}.input_layernorm.weight"),
                    &n.weight,
                ));
            }
            f(NamedParam::Vector(
                &format!("{p}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm.weight,
            ));
            if let Some(n) = &layer.pre_feedforward_layernorm {
                f(NamedParam::Vector(
                    &format!("{p}.pre_feedforward_layernorm.weight"),
                    &n.weight,
                ));
            }
            if let Some(n) = &layer.post_feedforward_layernorm {
                f(NamedParam::Vector(
                    &format!("{p}.post_feedforward_layernorm.weight"),
                    &n.weight,
                ));
            }
        }
        f(NamedParam::Vector("model.norm.weight", &self.norm.weight));
        if let Some(head) = &self.lm_head {
            f(NamedParam::Matrix("lm_head.weight", &head.weight));
        }
    }
}

impl<B: FusedBackend> CausalLm<B> {
    /// True when a padded batch costs less as one padding-free row of its examples: the fused
    /// attention keeps segments apart without an `[s, s]` mask on this device and dtype
    /// ([`FusedBackend::padding_free_attention`]); never with the decomposed attention.
    pub fn padding_free(&self) -> bool {
        self.attention.is_fused()
            && B::padding_free_attention(&self.embed_tokens.val().device(), self.activation_dtype())
    }

    /// Logits `[batch, seq, vocab]` (in the model's dtype).
    pub fn forward(&self, input: &ModelInput<B>) -> Tensor<B, 3> {
        let h = self.run(input, None, None);
        self.logits(h)
    }

    /// Output of the final norm, `[batch, seq, hidden]`: the LM head's input (what a fused
    /// linear + cross-entropy such as [`crate::fused_linear_nll`] starts from).
    pub fn forward_hidden(&self, input: &ModelInput<B>) -> Tensor<B, 3> {
        self.run(input, None, None)
    }

    /// The LM head's weight `[vocab, hidden]`: `lm_head.weight`, or the embeddings when tied.
    pub fn lm_head_weight(&self) -> &Param<Tensor<B, 2>> {
        self.lm_head
            .as_ref()
            .map_or(&self.embed_tokens, |h| &h.weight)
    }

    /// Logits and every hidden state.
    pub fn forward_with_hidden(&self, input: &ModelInput<B>) -> (Tensor<B, 3>, HiddenStates<B>) {
        let mut hidden = Vec::with_capacity(self.layers.len() + 1);
        let h = self.run(input, None, Some(&mut hidden));
        let embeddings = hidden.remove(0);
        let states = HiddenStates {
            embeddings,
            layers: hidden,
            final_norm: h.clone(),
        };
        (self.logits(h), states)
    }

    /// [`CausalLm::forward_hidden`] and the router's load-balancing loss of a mixture-of-experts
    /// model (`transformers`' `load_balancing_loss_func`: the experts times the sum over experts
    /// of the fraction of top-k assignments and the mean router probability, over every sparse
    /// layer), not yet multiplied by `router_aux_loss_coef`; `None` for a dense model. `real`
    /// (`[batch * seq]`) marks the tokens that are not padding; `None` counts them all.
    pub fn forward_hidden_with_router_loss(
        &self,
        input: &ModelInput<B>,
        real: Option<&[bool]>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        if self.config.moe.is_none() {
            return (self.run(input, None, None), None);
        }
        let device = input.input_ids.device();
        let log = std::cell::RefCell::new(RouterLog::new(real, &device));
        let h = self.run_routed(input, None, None, Some(&log));
        (h, log.into_inner().loss())
    }

    /// [`CausalLm::forward`] and the router's load-balancing loss, as
    /// [`CausalLm::forward_hidden_with_router_loss`].
    pub fn forward_with_router_loss(
        &self,
        input: &ModelInput<B>,
        real: Option<&[bool]>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let (h, aux) = self.forward_hidden_with_router_loss(input, real);
        (self.logits(h), aux)
    }

    /// Forward with a KV cache: `input` holds the new tokens only (their positions continue the
    /// cached ones); keys and values are appended to `cache`.
    pub fn forward_cached(
        &self,
        input: &ModelInput<B>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        cache.check(self, input)?;
        if let Some(limit) = self.config.rope.switch_length() {
            // LongRoPE rotates by other frequencies once a forward reaches beyond `limit`: when
            // decoding first crosses it, the keys cached with the short factors are stale, and
            // the whole sequence is computed again with the long ones (as `transformers`'
            // `Phi3ForCausalLM.prepare_inputs_for_generation` drops its cache there).
            let past = cache.len();
            let s = input.input_ids.dims()[1];
            let all = cache.record(input);
            if past > 0 && past <= limit && past + s > limit {
                cache.clear_keys();
                let h = self.run(&all, Some(cache), None);
                return Ok(self.logits(h.narrow(1, past, s)));
            }
        }
        let h = self.run(input, Some(cache), None);
        Ok(self.logits(h))
    }

    /// Output of the final norm, `[batch, seq, hidden]`.
    fn run(
        &self,
        input: &ModelInput<B>,
        cache: Option<&mut KvCache<B>>,
        hidden: Option<&mut Vec<Tensor<B, 3>>>,
    ) -> Tensor<B, 3> {
        self.run_routed(input, cache, hidden, None)
    }

    /// [`CausalLm::run`], the sparse layers recording their routing in `router`.
    fn run_routed(
        &self,
        input: &ModelInput<B>,
        mut cache: Option<&mut KvCache<B>>,
        mut hidden: Option<&mut Vec<Tensor<B, 3>>>,
        router: Option<&std::cell::RefCell<RouterLog<B>>>,
    ) -> Tensor<B, 3> {
        let s = input.input_ids.dims()[1];
        let mut x = self.embed(input);
        if let Some(hs) = hidden.as_deref_mut() {
            hs.push(x.clone());
        }
        let around = LayerInputs::new(&self.config, self.attention, input, cache.as_deref_mut());
        // LoRA dropout inside the trainer's stream: one stream per layer, as a checkpointed
        // forward draws them (the same masks with and without checkpointing).
        let dropout = self
            .lora
            .as_ref()
            .filter(|l| l.dropout > 0.0)
            .and_then(|_| crate::lora::next_dropout_seed(B::ad_enabled(&x.device())));
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.layer_mut(i));
            let context = around.context(&self.config, i, router);
            x = match dropout {
                Some(seed) => crate::lora::with_lora_dropout_seed(
                    crate::lora::layer_stream_seed(seed, i),
                    || layer.forward(x, &context, slot),
                ),
                None => layer.forward(x, &context, slot),
            };
            if let Some(hs) = hidden.as_deref_mut() {
                hs.push(x.clone());
            }
        }
        if let Some(c) = cache {
            c.advance(s);
        }
        self.norm.apply(x, around.fused)
    }

    /// The first decoder layer's input `[batch, seq, hidden]`: the token embeddings (scaled
    /// where the family scales them) in the activation dtype.
    pub(crate) fn embed(&self, input: &ModelInput<B>) -> Tensor<B, 3> {
        let [b, s] = input.input_ids.dims();
        let ids = input.input_ids.clone().reshape([b * s]);
        // `transformers` builds the embeddings as `nn.Embedding(..., padding_idx=pad)`: the
        // lookup sends no gradient to the padding token's row. The fused lookup's backward
        // leaves the positions holding that token out.
        let padding = self.config.pad_token_id.map(i64::from);
        let mut emb = fused::embedding(self.embed_tokens.val(), ids, padding);
        if let Some(scale) = self.config.embedding_scale {
            // Gemma: `embed(ids) * embed_scale.to(weight.dtype)`: the scale rounded to the
            // table's dtype (√3072 = 55.43 is 55.5 in bf16), the product in that dtype.
            let scale = match emb.dtype() {
                DType::BF16 => half::bf16::from_f64(scale).to_f64(),
                DType::F16 => half::f16::from_f64(scale).to_f64(),
                _ => scale,
            };
            emb = emb.mul_scalar(scale);
        }
        cast_to(
            emb.reshape([b, s, self.config.hidden_size]),
            self.activation_dtype(),
        )
    }

    /// The LM head on hidden states `h` (the final norm's output): logits `[batch, seq,
    /// vocab]`.
    pub fn logits(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => project(h.clone(), cast_to(self.embed_tokens.val(), h.dtype()), None),
        }
    }
}
