//! LoRA adapters (Hu et al., 2021) as PEFT defines them, so that adapters move freely between
//! this crate and Python's `peft`.
//!
//! A targeted projection `y = x Wᵀ (+ b)` becomes `y = x Wᵀ (+ b) + scaling · B(A(dropout(x)))`
//! with `A: [r, in]`, `B: [out, r]`, `scaling = alpha / r` (`alpha / √r` with rsLoRA). `A` starts
//! Kaiming-uniform (`U(−1/√in, 1/√in)`, PEFT's `init_lora_weights=True`), `B` at zero, so a fresh
//! adapter leaves the model unchanged. Every base weight is frozen
//! ([`burn::module::Module::no_grad`]): it gets no gradient and no optimizer state. Adapter
//! weights live in f32 whatever the base dtype (PEFT's `autocast_adapter_dtype`).
//!
//! On disk an adapter is PEFT's directory: `adapter_config.json` and
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::tensor::{DType, Distribution, FloatDType, Int, Tensor, TensorData, backend::Backend};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ModelError, Result};
use crate::model::{CausalLm, FeedForward, Projection, SparseMoe, cast_to, project};
use crate::weights::{SafetensorsFile, WeightIndex};

/// The adapter's configuration file.
pub(crate) const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights.
pub(crate) const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The `rank_pattern` / `alpha_pattern` key PEFT writes for the experts' `gate_up_proj` when
/// it doubles their rank and alpha ([`MoeTargets`]).
const GATE_UP_PATTERN: &str = r".*\.gate_up_proj";
/// The largest rank an adapter may have (far above any published one; bounds what an
/// adapter's config can make this crate allocate or multiply).
const MAX_ADAPTER_RANK: usize = 1 << 20;
/// What PEFT puts before a module's name in `adapter_model.safetensors`.
pub(crate) const PEFT_PREFIX: &str = "base_model.model.";
/// The projections an adapter can target (the decoder's linear layers; `all-linear` means all).
/// `qkv_proj` and `gate_up_proj` are the fused projections of the families that have them
/// (Phi-3).
pub const LORA_MODULES: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
];

/// Rank, scaling, dropout and targets of the adapters (PEFT's `LoraConfig`, same defaults:
/// `r = 8`, `lora_alpha = 8`, no dropout, `q_proj` and `v_proj`, the default targets PEFT
/// chooses for Qwen2/Qwen3/Llama).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the update. Default 8.
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `alpha / r`. Default 8.
    pub alpha: f64,
    /// Dropout on the adapter's input during training. Default 0.
    pub dropout: f64,
    /// Module names (`q_proj`, …, or dotted suffixes such as `self_attn.q_proj`), or
    /// `all-linear`. Default `["q_proj", "v_proj"]`.
    pub target_modules: Vec<String>,
    /// rsLoRA: scale by `alpha / √r` instead. Default false.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor applied to `B·A`.
    pub fn scaling(&self) -> f64 {
        scaling(self.r, self.alpha, self.use_rslora)
    }

    /// Checks the ranges (rank ≥ 1, finite alpha, dropout in [0, 1), some target).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, message: &str| {
            Err(ModelError::InvalidInput(format!("lora {field}: {message}")))
        };
        if self.r == 0 {
            return bad("r", "the rank must be at least 1");
        }
        if self.r > MAX_ADAPTER_RANK {
            return bad("r", &format!("the rank must be at most {MAX_ADAPTER_RANK}"));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad("alpha", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", "must be in [0, 1)");
        }
        if self.target_modules.is_empty() {
            return bad(
                "target_modules",
                "name at least one module (or `all-linear`)",
            );
        }
        Ok(())
    }

    /// Whether the target `target` selects the module named `key` (`model.layers.3.mlp.up_proj`):
    /// the whole name or a dotted suffix of it, as PEFT matches a list of names.
    fn target_matches(target: &str, key: &str) -> bool {
        if target == "all-linear" {
            return key
                .rsplit('.')
                .next()
                .is_some_and(|last| LORA_MODULES.contains(&last));
        }
        key == target || key.ends_with(&format!(".{target}"))
    }

    /// Whether any target selects `key`.
    pub fn matches(&self, key: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| Self::target_matches(t, key))
    }

    /// Whether `target` names something of a sparse layer ([`MoeTargets`]).
    fn names_moe(target: &str) -> bool {
        target == "all-linear"
            || ["gate_proj", "up_proj", "gate_up_proj", "down_proj", "gate"]
                .contains(&target.rsplit('.').next().unwrap_or(target))
    }

    /// What the targets adapt in a mixture-of-experts model's sparse layers, as PEFT converts
    /// them ([`MoeTargets`]).
    pub(crate) fn moe_targets(&self) -> Result<MoeTargets> {
        let mut t = MoeTargets::default();
        let (mut gate, mut up, mut gate_up) = (false, false, false);
        for target in &self.target_modules {
            if target == "all-linear" {
                (gate, up, t.down, t.router) = (true, true, true, true);
                continue;
            }
            match target.rsplit('.').next().unwrap_or(target) {
                "gate_proj" => gate = true,
                "up_proj" => up = true,
                "gate_up_proj" => gate_up = true,
                "down_proj" => t.down = true,
                "gate" => t.router = true,
                _ => {}
            }
        }
        if gate != up {
            let (named, missing) = if gate {
                ("gate_proj", "up_proj")
            } else {
                ("up_proj", "gate_proj")
            };
            return Err(ModelError::InvalidInput(format!(
                "lora target_modules: `{named}` without `{missing}` on a mixture-of-experts model: \
                 the experts' two are one `gate_up_proj` parameter (as in PEFT), target both"
            )));
        }
        if gate && up {
            // PEFT's conversion: one adapter for the two, of twice the rank and alpha.
            t.gate_up = Some((2 * self.r, 2.0 * self.alpha));
        } else if gate_up {
            t.gate_up = Some((self.r, self.alpha));
        }
        if t.any() && self.dropout > 0.0 {
            return Err(ModelError::InvalidInput(
                "lora dropout: the adapters of a mixture-of-experts model's experts and router \
                 have no dropout (PEFT refuses it for parameters); set it to 0 or target the \
                 attention only"
                    .into(),
            ));
        }
        Ok(t)
    }
}

/// The low-rank update of one projection.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `lora_A.weight`, `[r, in]`.
    pub a: Param<Tensor<B, 2>>,
    /// `lora_B.weight`, `[out, r]`.
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / r`.
    pub scaling: f64,
    /// Dropout on the input while gradients are tracked.
    pub dropout: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// An adapter from host data (stored in f32, tracked for gradients).
    pub fn new(a: TensorData, b: TensorData, config: &LoraConfig, device: &B::Device) -> Self {
        Self {
            a: adapter_param(a, device),
            b: adapter_param(b, device),
            scaling: config.scaling(),
            dropout: config.dropout,
        }
    }

    /// `scaling · B(A(dropout(x)))`, in `x`'s dtype. Dropout applies only when the backend
    /// tracks gradients (training), as `nn.Dropout` in train mode.
    ///
    /// Inside [`with_lora_dropout_seed`] (the trainer's steps) the masks come from that seed's
    /// stream, so a run draws the same masks every time it runs and when it resumes; outside
    /// it, from the backend's generator. Under gradient checkpointing (in a layer's dropout
    /// stream: its forward and its recomputation) they come from the layer's stream and apply
    /// whatever the backend: the same masks for the same stream.
    pub fn delta<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let keep = 1.0 - self.dropout;
        let training = B::ad_enabled(&x.device());
        let x = if self.dropout <= 0.0 {
            x
        } else if let Some(seed) = next_dropout_seed(training) {
            let mut rng = crate::init::NormalRng::new(seed);
            let shape = x.shape();
            let values: Vec<f32> = (0..shape.num_elements())
                .map(|_| f32::from(u8::from(rng.uniform() <= keep)))
                .collect();
            let mask = Tensor::<B, D>::from_data(TensorData::new(values, shape), &x.device());
            (x * mask.cast(dtype)).mul_scalar(1.0 / keep)
        } else if training {
            let mask = x.random_like(Distribution::Bernoulli(keep));
            (x * mask).mul_scalar(1.0 / keep)
        } else {
            x
        };
        let h = project(x, cast_to(self.a.val(), dtype), None);
        project(h, cast_to(self.b.val(), dtype), None).mul_scalar(self.scaling)
    }

    /// `scaling · B·A`, `[out, in]`, in f32.
    pub fn weight_delta(&self) -> Tensor<B, 2> {
        let a = self.a.val().cast(FloatDType::F32);
        let b = self.b.val().cast(FloatDType::F32);
        b.matmul(a).mul_scalar(self.scaling)
    }
}

/// LoRA on the stacked weights of a sparse layer's experts, as PEFT's `ParamWrapper` adapts a
/// 3-D parameter (`target_parameters`: `transformers` 5 keeps an MoE layer's experts as one
/// `[experts, out, in]` tensor): one `A` and one `B` for all the experts, expert `e`'s update
/// `scaling · B_e·A_e` with `A_e` the rows `e·r .. (e+1)·r` of `A` and `B_e` the columns
/// `e, e + experts, e + 2·experts, …` of `B` (PEFT reshapes `A` to `[experts, r, in]` and `B` to
/// `[out, r, experts]`). PEFT has no dropout for these.
#[derive(Module, Debug)]
pub struct ExpertsLora<B: Backend> {
    /// `lora_A.weight`, `[r · experts, in]`.
    pub a: Param<Tensor<B, 2>>,
    /// `lora_B.weight`, `[out, r · experts]`.
    pub b: Param<Tensor<B, 2>>,
    /// The rank of each expert's update.
    pub rank: usize,
    /// Experts.
    pub experts: usize,
    /// `lora_alpha` of these weights (PEFT's `alpha_pattern` when it is not the config's).
    pub alpha: f64,
    /// `alpha / rank` (`alpha / √rank` with rsLoRA).
    pub scaling: f64,
}

impl<B: Backend> ExpertsLora<B> {
    /// Adapters from host data (stored in f32, tracked for gradients).
    pub fn new(
        a: TensorData,
        b: TensorData,
        rank: usize,
        experts: usize,
        alpha: f64,
        use_rslora: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            a: adapter_param(a, device),
            b: adapter_param(b, device),
            rank,
            experts,
            alpha,
            scaling: scaling(rank, alpha, use_rslora),
        }
    }

    /// Expert `e`'s `A_e` `[r, in]` and `B_e` `[out, r]`.
    fn factors(&self, e: usize) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let a = self.a.val().narrow(0, e * self.rank, self.rank);
        let columns: Vec<i64> = (0..self.rank)
            .map(|j| (j * self.experts + e) as i64)
            .collect();
        let b = self.b.val();
        let columns =
            Tensor::<B, 1, Int>::from_data(TensorData::new(columns, [self.rank]), &b.device());
        (a, b.select(1, columns))
    }

    /// `scaling · (x A_eᵀ) B_eᵀ` for expert `e`'s rows `x` `[m, in]`, in `x`'s dtype.
    pub fn delta(&self, e: usize, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let dtype = x.dtype();
        let (a, b) = self.factors(e);
        let h = project(x, cast_to(a, dtype), None);
        project(h, cast_to(b, dtype), None).mul_scalar(self.scaling)
    }

    /// Expert `e`'s `scaling · B_e·A_e`, `[out, in]`, in f32.
    pub fn weight_delta(&self, e: usize) -> Tensor<B, 2> {
        let (a, b) = self.factors(e);
        b.cast(FloatDType::F32)
            .matmul(a.cast(FloatDType::F32))
            .mul_scalar(self.scaling)
    }
}

/// An adapter weight from host data: stored in f32 whatever the base dtype, tracked for
/// gradients.
fn adapter_param<B: Backend>(d: TensorData, device: &B::Device) -> Param<Tensor<B, 2>> {
    let d = d.convert_dtype(DType::F32);
    Param::from_tensor(Tensor::<B, 2>::from_data(d, (device, DType::F32)))
}

/// `alpha / r`, or `alpha / √r` with rsLoRA.
fn scaling(r: usize, alpha: f64, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// What an adapter adapts in the sparse (mixture-of-experts) layers. PEFT (0.21, with
/// `transformers` 5, whose experts are 3-D parameters and whose router is no linear layer)
/// turns the MLP names into these: `gate_proj` with `up_proj` into the experts' `gate_up_proj`
/// (rank and alpha doubled, `rank_pattern` / `alpha_pattern`), `down_proj` into theirs, `gate`
/// into the router's `gate.weight`, `all-linear` into all three; the dense MLPs of such a model
/// then get no adapter.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct MoeTargets {
    /// The experts' `gate_up_proj`: rank and alpha.
    pub gate_up: Option<(usize, f64)>,
    /// The experts' `down_proj` (the config's rank and alpha).
    pub down: bool,
    /// The router (`gate.weight`, the config's rank and alpha).
    pub router: bool,
}

impl MoeTargets {
    fn any(&self) -> bool {
        self.gate_up.is_some() || self.down || self.router
    }
}

/// A stream of LoRA dropout masks on this thread.
#[derive(Debug, Clone, Copy)]
struct DropoutStream {
    seed: u64,
    /// Masks (or seeds of nested streams) drawn so far.
    drawn: u64,
    /// Dropout applies on any backend (a checkpointed layer's forward outside the graph and
    /// its recomputation), not only where the backend tracks gradients.
    forced: bool,
}

thread_local! {
    /// The dropout stream of [`with_lora_dropout_seed`] / [`with_dropout_stream`].
    static DROPOUT_STREAM: std::cell::Cell<Option<DropoutStream>> = const { std::cell::Cell::new(None) };
}

fn in_dropout_stream<R>(stream: DropoutStream, f: impl FnOnce() -> R) -> R {
    let before = DROPOUT_STREAM.with(|s| s.replace(Some(stream)));
    let out = f();
    DROPOUT_STREAM.with(|s| s.set(before));
    out
}

/// Runs `f` (a training forward, or a whole optimizer step's forwards) with the LoRA dropout
/// masks drawn from a stream of `seed` on this thread (the `k`-th mask from `seed` and `k`)
/// instead of the backend's generator: the same seed draws the same masks, on every backend
/// and whatever other threads draw. The trainer seeds each step from the run's seed, the step
/// and the worker, so that a run is reproducible and a resumed run draws the masks the
/// uninterrupted one drew (`transformers` restores its RNG states from the checkpoint for
/// this). Dropout still applies only where the backend tracks gradients.
pub fn with_lora_dropout_seed<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    in_dropout_stream(
        DropoutStream {
            seed,
            drawn: 0,
            forced: false,
        },
        f,
    )
}

/// Runs `f` with the LoRA dropout masks drawn from a stream of `seed`, applied on any backend:
/// a forward pass run twice in the same stream draws the same masks, which gradient
/// checkpointing needs (PyTorch's checkpoint restores the RNG state for the same reason).
pub(crate) fn with_dropout_stream<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    in_dropout_stream(
        DropoutStream {
            seed,
            drawn: 0,
            forced: true,
        },
        f,
    )
}

/// The seed of the next mask of the current dropout stream, if there is one that applies
/// (`training`: the backend tracks gradients); also the seed of a forward's layer streams.
pub(crate) fn next_dropout_seed(training: bool) -> Option<u64> {
    DROPOUT_STREAM.with(|s| {
        let mut stream = s.get()?;
        if !(training || stream.forced) {
            return None;
        }
        let drawn = stream.drawn;
        stream.drawn += 1;
        s.set(Some(stream));
        Some(stream.seed ^ drawn.wrapping_mul(0xD1B5_4A32_D192_ED03))
    })
}

/// Layer `layer`'s stream seed in a forward whose seed is `seed`: each decoder layer draws its
/// masks from a stream of its own, so a checkpointed layer's recomputation, and the same
/// forward without checkpointing, draw the same masks.
pub(crate) fn layer_stream_seed(seed: u64, layer: usize) -> u64 {
    seed.wrapping_add((layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A PEFT adapter directory's configuration as this crate uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// Rank, alpha, dropout, targets.
    pub lora: LoraConfig,
    /// `base_model_name_or_path`, when recorded.
    pub base_model: Option<String>,
    /// `layers_to_transform`: the only layers that carry adapters, when restricted.
    pub layers_to_transform: Option<Vec<usize>>,
    /// `target_parameters`: the adapted parameters of a mixture-of-experts model's sparse
    /// layers (`gate_up_proj`, `down_proj`, `gate.weight`), as PEFT names them.
    pub target_parameters: Vec<String>,
    /// The rank and alpha of the experts' `gate_up_proj` adapters when `rank_pattern` /
    /// `alpha_pattern` set them (PEFT doubles both when it converts `gate_proj` and `up_proj`).
    pub gate_up_rank_alpha: Option<(usize, f64)>,
}

/// The names of the decoder's projections, `model.layers.<l>.<self_attn|mlp>.<name>`, with the
/// projection, in checkpoint order.
fn projections_mut<B: Backend>(model: &mut CausalLm<B>) -> Vec<(String, &mut Projection<B>)> {
    let mut out = Vec::new();
    for (l, layer) in model.layers.iter_mut().enumerate() {
        for (name, proj) in layer.projections_mut() {
            out.push((format!("model.layers.{l}.{name}"), proj));
        }
    }
    out
}

/// Like [`projections_mut`], read-only.
fn projections<B: Backend>(model: &CausalLm<B>) -> Vec<(String, &Projection<B>)> {
    let mut out = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for (name, proj) in layer.projections() {
            out.push((format!("model.layers.{l}.{name}"), proj));
        }
    }
    out
}

/// PEFT's module names of a sparse layer's adapters below `prefix` (`model.layers.<l>.mlp`):
/// the router's, the experts' `gate_up_proj` (the inner of PEFT's two nested wrappers,
/// `experts.base_layer`, when `down_proj` is adapted too) and the experts' `down_proj`.
fn moe_site_names(prefix: &str, down: bool) -> [String; 3] {
    let gate_up = if down {
        format!("{prefix}.experts.base_layer")
    } else {
        format!("{prefix}.experts")
    };
    [
        format!("{prefix}.gate"),
        gate_up,
        format!("{prefix}.experts"),
    ]
}

/// Which adapter of a sparse layer a module name of [`moe_site_names`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MoeSite {
    /// The router's (`gate.weight`).
    Router,
    /// The experts' `gate_up_proj`.
    GateUp,
    /// The experts' `down_proj`.
    Down,
}

/// `w + delta` (in f32, stored back in `w`'s dtype), the same parameter.
fn add_delta<B: Backend>(w: &mut Param<Tensor<B, 2>>, delta: Tensor<B, 2>) {
    let v = w.val();
    let dtype = v.dtype();
    *w = Param::initialized(w.id, (v.cast(FloatDType::F32) + delta).cast(dtype));
}

impl<B: Backend> CausalLm<B> {
    /// Freezes every weight and adds fresh adapters (`A` Kaiming-uniform from `seed`, `B` zero)
    /// to the projections `config` targets. A target that selects no projection is an error,
    /// as is a model that already carries adapters. On a mixture-of-experts model the MLP
    /// names adapt the experts and `gate` the router, as PEFT converts them for `transformers` 5.
    pub fn with_lora(self, config: &LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let moe = self.check_targets(config)?;
        let mut rng = crate::init::NormalRng::new(seed);
        let is_moe = self.config.moe.is_some();
        let select = |key: &str| config.matches(key) && !(is_moe && key.contains(".mlp."));
        self.attach(config, moe, select, |_, [out, inp], r| {
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..r * inp)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect();
            Ok((
                TensorData::new(a, [r, inp]),
                TensorData::new(vec![0f32; out * r], [out, r]),
            ))
        })
    }

    /// Checks `config`'s targets against the model; what they adapt in its sparse layers.
    fn check_targets(&self, config: &LoraConfig) -> Result<MoeTargets> {
        if self.lora.is_some() {
            return Err(ModelError::InvalidInput(
                "this model already carries LoRA adapters".into(),
            ));
        }
        let is_moe = self.config.moe.is_some();
        let moe = if is_moe {
            config.moe_targets()?
        } else {
            MoeTargets::default()
        };
        let sparse = self
            .layers
            .iter()
            .any(|l| matches!(l.mlp, FeedForward::Sparse(_)));
        // A mixture-of-experts model's MLP names are its experts' (PEFT leaves its dense
        // layers' MLPs alone).
        let keys: Vec<String> = projections(self)
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !(is_moe && k.contains(".mlp.")))
            .collect();
        if let Some(t) = config.target_modules.iter().find(|t| {
            let selects = keys.iter().any(|k| LoraConfig::target_matches(t, k))
                || (sparse && LoraConfig::names_moe(t));
            !selects
        }) {
            // The module names this model has, in checkpoint order (Phi-3's are fused:
            // `qkv_proj`, `gate_up_proj`).
            let mut known: Vec<&str> = Vec::new();
            for k in &keys {
                if let Some(last) = k.rsplit('.').next()
                    && !known.contains(&last)
                {
                    known.push(last);
                }
            }
            if sparse {
                known.extend(["gate_proj", "up_proj", "down_proj", "gate"]);
            }
            return Err(ModelError::InvalidInput(format!(
                "lora target_modules: `{t}` selects no module of this model (its modules: {}, all-linear)",
                known.join(", ")
            )));
        }
        Ok(moe)
    }

    /// Freezes the model and gives every projection `select` accepts, and the sparse layers'
    /// parts `moe` names, the adapter `init` makes for it (`(A, B)` host data, from the
    /// module's PEFT name, its `[out, in]` and the rows of `A`: the rank, times the experts for
    /// the experts' stacked weights).
    fn attach(
        self,
        config: &LoraConfig,
        moe: MoeTargets,
        select: impl Fn(&str) -> bool,
        mut init: impl FnMut(&str, [usize; 2], usize) -> Result<(TensorData, TensorData)>,
    ) -> Result<Self> {
        let device = self.embed_tokens.val().device();
        let mut model = self.no_grad();
        for (key, proj) in projections_mut(&mut model) {
            if !select(&key) {
                continue;
            }
            let (a, b) = init(&key, proj.weight.dims(), config.r)?;
            proj.lora = Some(LoraAdapter::new(a, b, config, &device));
        }
        for (l, layer) in model.layers.iter_mut().enumerate() {
            let FeedForward::Sparse(sparse) = &mut layer.mlp else {
                continue;
            };
            let Some([hidden, inner]) = sparse.experts.first().map(|e| e.down_proj.weight.dims())
            else {
                continue;
            };
            let experts = sparse.experts.len();
            let [router, gate_up, down] =
                moe_site_names(&format!("model.layers.{l}.mlp"), moe.down);
            if moe.router {
                let (a, b) = init(&router, [experts, hidden], config.r)?;
                sparse.gate_lora = Some(LoraAdapter::new(a, b, config, &device));
            }
            if let Some((rank, alpha)) = moe.gate_up {
                let (a, b) = init(&gate_up, [2 * inner, hidden], rank * experts)?;
                sparse.gate_up_lora = Some(ExpertsLora::new(
                    a,
                    b,
                    rank,
                    experts,
                    alpha,
                    config.use_rslora,
                    &device,
                ));
            }
            if moe.down {
                let (a, b) = init(&down, [hidden, inner], config.r * experts)?;
                sparse.down_lora = Some(ExpertsLora::new(
                    a,
                    b,
                    config.r,
                    experts,
                    config.alpha,
                    config.use_rslora,
                    &device,
                ));
            }
        }
        model.lora = Some(config.clone());
        Ok(model)
    }

    /// The adapters' configuration, when the model carries adapters.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Visits every adapter weight with its PEFT name without the `base_model.model.` prefix
    /// (`model.layers.0.self_attn.q_proj.lora_A.weight`; a sparse layer's
    /// `mlp.gate.lora_A.weight`, `mlp.experts.lora_A.weight`, …), layer by layer in checkpoint
    /// order.
    pub fn visit_adapters(&self, mut f: impl FnMut(&str, &Param<Tensor<B, 2>>)) {
        let mut pair = |key: &str, a: &Param<Tensor<B, 2>>, b: &Param<Tensor<B, 2>>| {
            f(&format!("{key}.lora_A.weight"), a);
            f(&format!("{key}.lora_B.weight"), b);
        };
        for (l, layer) in self.layers.iter().enumerate() {
            for (name, proj) in layer.projections() {
                if let Some(lora) = &proj.lora {
                    pair(&format!("model.layers.{l}.{name}"), &lora.a, &lora.b);
                }
            }
            if let FeedForward::Sparse(sparse) = &layer.mlp {
                let [router, gate_up, down] =
                    moe_site_names(&format!("model.layers.{l}.mlp"), sparse.down_lora.is_some());
                if let Some(lora) = &sparse.gate_lora {
                    pair(&router, &lora.a, &lora.b);
                }
                if let Some(lora) = &sparse.gate_up_lora {
                    pair(&gate_up, &lora.a, &lora.b);
                }
                if let Some(lora) = &sparse.down_lora {
                    pair(&down, &lora.a, &lora.b);
                }
            }
        }
    }

    /// Adapter weights, in total.
    pub fn num_adapter_parameters(&self) -> usize {
        let mut n = 0;
        self.visit_adapters(|_, p| n += p.shape().num_elements());
        n
    }

    /// Folds every adapter into its base weight (`W + scaling · B·A`, in f32, stored back in the
    /// weight's dtype; each expert's share of the experts' adapters into that expert's
    /// projections) and drops the adapters: a plain model, as PEFT's `merge_and_unload`.
    pub fn merge_lora(mut self) -> Self {
        for (_, proj) in projections_mut(&mut self) {
            if let Some(l) = proj.lora.take() {
                add_delta(&mut proj.weight, l.weight_delta());
            }
        }
        for layer in &mut self.layers {
            let FeedForward::Sparse(sparse) = &mut layer.mlp else {
                continue;
            };
            merge_experts(sparse);
        }
        self.lora = None;
        self
    }
}

/// [`CausalLm::merge_lora`] of one sparse layer.
fn merge_experts<B: Backend>(sparse: &mut SparseMoe<B>) {
    if let Some(l) = sparse.gate_lora.take() {
        add_delta(&mut sparse.gate, l.weight_delta());
    }
    let gate_up = sparse.gate_up_lora.take();
    let down = sparse.down_lora.take();
    for (e, expert) in sparse.experts.iter_mut().enumerate() {
        if let Some(l) = &gate_up {
            let delta = l.weight_delta(e);
            match &mut expert.gate_up {
                crate::model::GateUpProjections::Separate(p) => {
                    let i = p.gate_proj.weight.dims()[0];
                    add_delta(&mut p.gate_proj.weight, delta.clone().narrow(0, 0, i));
                    add_delta(&mut p.up_proj.weight, delta.narrow(0, i, i));
                }
                crate::model::GateUpProjections::Fused(p) => add_delta(&mut p.weight, delta),
            }
        }
        if let Some(l) = &down {
            add_delta(&mut expert.down_proj.weight, l.weight_delta(e));
        }
    }
}

/// Writes `model`'s adapters as a PEFT adapter directory: `adapter_model.safetensors` (f32) and
/// `adapter_config.json` naming `base_model` as `base_model_name_or_path`. Each file is written
/// atomically.
pub fn save_adapter<B: Backend>(model: &CausalLm<B>, dir: &Path, base_model: &str) -> Result<()> {
    let config = model
        .lora_config()
        .ok_or_else(|| ModelError::InvalidInput("the model has no LoRA adapters to save".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    model.visit_adapters(|name, p| {
        let data = p.val().into_data().convert_dtype(DType::F32);
        tensors.push((
            format!("{PEFT_PREFIX}{}", model.config.file_tensor_name(name)),
            data.shape.to_vec(),
            data.into_bytes().to_vec(),
        ));
    });
    // The adapted linear layers by name (`target_modules`), and the sparse layers' adapted
    // parameters (`target_parameters`, with the experts' `gate_up_proj` rank and alpha).
    let mut modules: Vec<String> = Vec::new();
    for (key, proj) in projections(model) {
        if proj.lora.is_some()
            && let Some(last) = key.rsplit('.').next()
            && !modules.iter().any(|m| m == last)
        {
            modules.push(last.to_string());
        }
    }
    let mut parameters: Vec<&str> = Vec::new();
    let mut gate_up: Option<(usize, f64)> = None;
    for layer in &model.layers {
        let FeedForward::Sparse(sparse) = &layer.mlp else {
            continue;
        };
        for (present, name) in [
            (sparse.gate_up_lora.is_some(), "gate_up_proj"),
            (sparse.down_lora.is_some(), "down_proj"),
            (sparse.gate_lora.is_some(), "gate.weight"),
        ] {
            if present && !parameters.contains(&name) {
                parameters.push(name);
            }
        }
        if let Some(l) = &sparse.gate_up_lora {
            gate_up = Some((l.rank, l.alpha));
        }
    }
    let number = |x: f64| {
        if x.fract() == 0.0 {
            json!(x as i64)
        } else {
            json!(x)
        }
    };
    let (mut rank_pattern, mut alpha_pattern) = (json!({}), json!({}));
    if let Some((rank, alpha)) = gate_up.filter(|&(r, a)| (r, a) != (config.r, config.alpha)) {
        rank_pattern = json!({ GATE_UP_PATTERN: rank });
        alpha_pattern = json!({ GATE_UP_PATTERN: number(alpha) });
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::weights(dir.join(ADAPTER_WEIGHTS), e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| ModelError::weights(dir.join(ADAPTER_WEIGHTS), e.to_string()))?;
    crate::pretrained::write_atomically(&dir.join(ADAPTER_WEIGHTS), &bytes)?;
    let alpha = number(config.alpha);
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": modules,
        "target_parameters": parameters,
        "use_rslora": config.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&adapter_config)
        .map_err(|e| ModelError::InvalidInput(e.to_string()))?;
    crate::pretrained::write_atomically(&dir.join(ADAPTER_CONFIG), text.as_bytes())
}

/// Whether `dir` is an adapter directory (an `adapter_config.json` and no `config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file() && !dir.join("config.json").is_file()
}

/// Reads `dir/adapter_config.json`. Options this crate does not implement (DoRA, trained
/// biases, `modules_to_save`, per-module rank or alpha patterns, `fan_in_fan_out`) are errors
/// that name the field, never silently ignored.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = crate::read_text_file(&path, crate::MAX_JSON_FILE_BYTES)?;
    let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let field = |name: &str| json.get(name).filter(|v| !v.is_null());
    let bad = |name: &str, message: &str| ModelError::config(&path, name, message);
    let peft_type = field("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(bad(
            "peft_type",
            &format!("`{peft_type}` adapters are not supported (only LORA)"),
        ));
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("r", "expected a positive integer"))?;
    if r > MAX_ADAPTER_RANK as u64 {
        return Err(bad("r", &format!("at most {MAX_ADAPTER_RANK}")));
    }
    let alpha = match field("lora_alpha") {
        None => 8.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| bad("lora_alpha", "expected a number"))?,
    };
    let dropout = match field("lora_dropout") {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .ok_or_else(|| bad("lora_dropout", "expected a number"))?,
    };
    let flag = |name: &str| field(name).and_then(Value::as_bool).unwrap_or(false);
    if flag("use_dora") {
        return Err(bad("use_dora", "DoRA adapters are not supported"));
    }
    if flag("lora_bias") {
        return Err(bad(
            "lora_bias",
            "a trained bias of lora_B is not supported",
        ));
    }
    if flag("fan_in_fan_out") {
        return Err(bad(
            "fan_in_fan_out",
            "transposed (Conv1D) base layers are not supported",
        ));
    }
    if let Some(b) = field("bias").and_then(Value::as_str)
        && b != "none"
    {
        return Err(bad(
            "bias",
            "trained biases are not supported (only \"none\")",
        ));
    }
    if field("modules_to_save").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(bad(
            "modules_to_save",
            "fully trained extra modules are not supported",
        ));
    }
    // Per-module ranks and alphas: only the one PEFT writes for the experts' `gate_up_proj`.
    let pattern = |name: &str| -> Result<Option<f64>> {
        let Some(v) = field(name) else {
            return Ok(None);
        };
        let unsupported = || bad(name, "per-module ranks or alphas are not supported");
        let object = v.as_object().ok_or_else(unsupported)?;
        match object.iter().next() {
            None => Ok(None),
            Some((key, value)) if object.len() == 1 && key == GATE_UP_PATTERN => value
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .map(Some)
                .ok_or_else(|| {
                    bad(
                        name,
                        "expected a positive number for the experts' gate_up_proj",
                    )
                }),
            Some(_) => Err(unsupported()),
        }
    };
    let gate_up_rank = pattern("rank_pattern")?;
    let gate_up_alpha = pattern("alpha_pattern")?;
    let target_modules = match field("target_modules") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("target_modules", "expected a list of names"))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad("target_modules", "expected a list of names")),
    };
    let target_parameters: Vec<String> = match field("target_parameters") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("target_parameters", "expected a list of names"))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(bad("target_parameters", "expected a list of names")),
    };
    if let Some(t) = target_parameters.iter().find(|t| {
        !["gate_up_proj", "down_proj", "gate.weight"]
            .iter()
            .any(|p| t == p || t.ends_with(&format!(".{p}")))
    }) {
        return Err(bad(
            "target_parameters",
            &format!(
                "`{t}` is not supported (the experts' gate_up_proj and down_proj and the \
                 router's gate.weight are)"
            ),
        ));
    }
    if gate_up_rank.is_some_and(|x| x.fract() != 0.0 || x < 1.0) {
        return Err(bad("rank_pattern", "expected a positive integer rank"));
    }
    if gate_up_rank.is_some_and(|x| x > MAX_ADAPTER_RANK as f64) {
        return Err(bad("rank_pattern", &format!("at most {MAX_ADAPTER_RANK}")));
    }
    let gate_up_rank_alpha = (gate_up_rank.is_some() || gate_up_alpha.is_some()).then(|| {
        (
            gate_up_rank.map_or(r as usize, |x| x as usize),
            gate_up_alpha.unwrap_or(alpha),
        )
    });
    let lora = LoraConfig {
        r: r as usize,
        alpha,
        dropout,
        target_modules,
        use_rslora: flag("use_rslora"),
    };
    let layers_to_transform = match field("layers_to_transform") {
        None => None,
        Some(Value::Number(n)) => Some(vec![
            n.as_u64()
                .ok_or_else(|| bad("layers_to_transform", "expected a layer index"))?
                as usize,
        ]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_u64()
                        .map(|l| l as usize)
                        .ok_or_else(|| bad("layers_to_transform", "expected layer indices"))
                })
                .collect::<Result<_>>()?,
        ),
        Some(_) => return Err(bad("layers_to_transform", "expected layer indices")),
    };
    Ok(AdapterConfig {
        lora,
        base_model: field("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
        layers_to_transform,
        target_parameters,
        gate_up_rank_alpha,
    })
}

/// Puts the adapter saved in `dir` (PEFT's format, by us or by `peft`) on `model`, freezing the
/// base weights. Which projections get adapters is read from the tensors present, so adapters
/// whose `target_modules` is a regular expression load too. A tensor that fits no projection,
/// a missing `lora_B` for a `lora_A` or a shape that disagrees with the rank and the projection
/// is an error naming the file and the tensor.
pub fn load_adapter<B: Backend>(model: CausalLm<B>, dir: &Path) -> Result<CausalLm<B>> {
    let AdapterConfig {
        mut lora,
        layers_to_transform,
        target_parameters,
        gate_up_rank_alpha,
        ..
    } = read_adapter_config(dir)?;
    lora.validate()
        .map_err(|e| ModelError::config(dir.join(ADAPTER_CONFIG), "lora", e.to_string()))?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (adapter_model.bin, a pickle, is not read: re-save the adapter with safetensors)"
        } else {
            ""
        };
        return Err(ModelError::weights(
            &path,
            format!("the adapter's weights are missing{hint}"),
        ));
    }
    if model.lora.is_some() {
        return Err(ModelError::InvalidInput(
            "this model already carries LoRA adapters".into(),
        ));
    }
    let index = WeightIndex::from_files(dir, vec![SafetensorsFile::open(&path)?])?;
    let names: HashSet<String> = index.names().into_iter().map(str::to_string).collect();
    let config = model.config.clone();
    let key_of = |name: &str| -> Option<String> {
        let rest = config.internal_tensor_name(name.strip_prefix(PEFT_PREFIX).unwrap_or(name))?;
        let key = rest
            .strip_suffix(".lora_A.weight")
            .or_else(|| rest.strip_suffix(".lora_B.weight"))?;
        Some(key.to_string())
    };
    // The sparse layers' adapted parameters, under the module names PEFT gives them for these
    // `target_parameters`.
    let targets = |p: &str| {
        target_parameters
            .iter()
            .any(|t| t == p || t.ends_with(&format!(".{p}")))
    };
    let (gate_up_listed, down_listed, router_listed) = (
        targets("gate_up_proj"),
        targets("down_proj"),
        targets("gate.weight"),
    );
    let mut moe_sites: HashMap<String, MoeSite> = HashMap::new();
    for (l, layer) in model.layers.iter().enumerate() {
        if matches!(layer.mlp, FeedForward::Sparse(_)) {
            let names = moe_site_names(&format!("model.layers.{l}.mlp"), down_listed);
            let kinds = [
                (MoeSite::Router, router_listed),
                (MoeSite::GateUp, gate_up_listed),
                (MoeSite::Down, down_listed),
            ];
            for ((kind, listed), name) in kinds.into_iter().zip(names) {
                if listed {
                    moe_sites.insert(name, kind);
                }
            }
        }
    }
    if !target_parameters.is_empty() && moe_sites.is_empty() {
        return Err(ModelError::config(
            dir.join(ADAPTER_CONFIG),
            "target_parameters",
            "this model has no mixture-of-experts layer whose parameters these could adapt",
        ));
    }
    let mut keys: HashSet<String> = projections(&model).into_iter().map(|(k, _)| k).collect();
    keys.extend(moe_sites.keys().cloned());
    let unexpected: Vec<String> = names
        .iter()
        .filter(|n| key_of(n).is_none_or(|k| !keys.contains(&k)))
        .take(8)
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        return Err(ModelError::UnexpectedTensors {
            path,
            tensors: unexpected,
        });
    }
    let present: HashSet<String> = names.iter().filter_map(|n| key_of(n)).collect();
    if present.is_empty() {
        return Err(ModelError::weights(&path, "no lora_A / lora_B tensors"));
    }
    // Settings that select nothing the weights carry are mistakes, not no-ops.
    let config_path = dir.join(ADAPTER_CONFIG);
    if let Some(layers) = &layers_to_transform {
        let n = config.num_layers;
        if let Some(l) = layers.iter().find(|&&l| l >= n) {
            return Err(ModelError::config(
                &config_path,
                "layers_to_transform",
                format!("layer {l} does not exist (the model has {n} layers)"),
            ));
        }
        let layer_of = |key: &str| {
            key.strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok())
        };
        if let Some(k) = present
            .iter()
            .find(|k| layer_of(k).is_none_or(|l| !layers.contains(&l)))
        {
            return Err(ModelError::config(
                &config_path,
                "layers_to_transform",
                format!("{layers:?} does not include the layer of the adapter's `{k}`"),
            ));
        }
    }
    if let Some(t) = lora
        .target_modules
        .iter()
        // A plain name (PEFT reads a single string as a regular expression: not checked).
        .filter(|t| {
            t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        })
        .find(|t| !present.iter().any(|k| LoraConfig::target_matches(t, k)))
    {
        return Err(ModelError::config(
            &config_path,
            "target_modules",
            format!("`{t}` matches none of the adapter's weights"),
        ));
    }
    // The projections that carry tensors are the targets, whatever the config's list says;
    // likewise the sparse layers' parts.
    let mut targets: Vec<String> = present.iter().cloned().collect();
    targets.sort();
    let carried = |kind: MoeSite| {
        present
            .iter()
            .any(|k| moe_sites.get(k).is_some_and(|&s| s == kind))
    };
    let moe = MoeTargets {
        router: carried(MoeSite::Router),
        gate_up: carried(MoeSite::GateUp)
            .then(|| gate_up_rank_alpha.unwrap_or((lora.r, lora.alpha))),
        down: carried(MoeSite::Down),
    };
    if moe.any() && lora.dropout > 0.0 {
        return Err(ModelError::config(
            &config_path,
            "lora_dropout",
            "the adapters of the experts and router (target_parameters) have no dropout",
        ));
    }
    let recorded = std::mem::replace(&mut lora.target_modules, targets);
    let name_in_file = |key: &str, part: &str| {
        let bare = config.file_tensor_name(&format!("{key}.{part}.weight"));
        let prefixed = format!("{PEFT_PREFIX}{bare}");
        if names.contains(&prefixed) {
            prefixed
        } else {
            bare
        }
    };
    let select = |key: &str| present.contains(key);
    let mut model = model.attach(&lora, moe, select, |key, [out, inp], rows| {
        let read = |part: &str, shape: [usize; 2]| -> Result<TensorData> {
            index.tensor_data(&name_in_file(key, part), &shape)
        };
        Ok((read("lora_A", [rows, inp])?, read("lora_B", [out, rows])?))
    })?;
    // Keep the names the adapter was configured with (they are what gets saved again).
    if let Some(config) = model.lora.as_mut()
        && !recorded.is_empty()
    {
        config.target_modules = recorded;
    }
    Ok(model)
}

/// Resolves an adapter's `base_model_name_or_path`: the path as written, or relative to the
/// adapter directory.
pub fn resolve_base_model(adapter_dir: &Path, base: Option<&str>) -> Result<PathBuf> {
    let path = adapter_dir.join(ADAPTER_CONFIG);
    let base = base.ok_or_else(|| {
        ModelError::config(
            &path,
            "base_model_name_or_path",
            "the adapter does not say which model it was trained on",
        )
    })?;
    let candidates = [PathBuf::from(base), adapter_dir.join(base)];
    candidates
        .into_iter()
        .find(|p| p.join("config.json").is_file())
        .ok_or_else(|| {
            ModelError::config(
                &path,
                "base_model_name_or_path",
                format!("`{base}` is not a model directory on this machine"),
            )
        })
}
