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
use burn::tensor::{DType, Distribution, FloatDType, Tensor, TensorData, backend::Backend};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ModelError, Result};
use crate::model::{CausalLm, Projection, cast_to, project};
use crate::weights::{SafetensorsFile, WeightIndex};

/// The adapter's configuration file.
pub(crate) const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights.
pub(crate) const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
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
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks the ranges (rank ≥ 1, finite alpha, dropout in [0, 1), some target).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, message: &str| {
            Err(ModelError::InvalidInput(format!("lora {field}: {message}")))
        };
        if self.r == 0 {
            return bad("r", "the rank must be at least 1");
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
        let param = |d: TensorData| {
            let d = d.convert_dtype(DType::F32);
            Param::from_tensor(Tensor::<B, 2>::from_data(d, (device, DType::F32)))
        };
        Self {
            a: param(a),
            b: param(b),
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

impl<B: Backend> CausalLm<B> {
    /// Freezes every weight and adds fresh adapters (`A` Kaiming-uniform from `seed`, `B` zero)
    /// to the projections `config` targets. A target that selects no projection is an error,
    /// as is a model that already carries adapters.
    pub fn with_lora(self, config: &LoraConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        self.check_targets(config)?;
        let mut rng = crate::init::NormalRng::new(seed);
        let r = config.r;
        self.attach(config, |_, [out, inp]| {
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

    fn check_targets(&self, config: &LoraConfig) -> Result<()> {
        if self.lora.is_some() {
            return Err(ModelError::InvalidInput(
                "this model already carries LoRA adapters".into(),
            ));
        }
        if self.config.moe.is_some()
            && let Some(t) = config.target_modules.iter().find(|t| {
                t.as_str() == "all-linear"
                    || ["gate_proj", "up_proj", "down_proj", "gate_up_proj"]
                        .iter()
                        .any(|m| t.as_str() == *m || t.ends_with(&format!(".{m}")))
            })
        {
            // PEFT turns MLP names, and `all-linear`, into adapters on the experts' 3-D
            // parameters and the router (`target_parameters`), not on the dense layers' MLPs:
            // not implemented here, so refused rather than saved as an adapter PEFT would read
            // differently.
            return Err(ModelError::InvalidInput(format!(
                "lora target_modules: `{t}` would adapt the experts (and router) of this \
                 mixture-of-experts model in PEFT, which is not supported; target the attention: \
                 q_proj, k_proj, v_proj, o_proj"
            )));
        }
        let keys: Vec<String> = projections(self).into_iter().map(|(k, _)| k).collect();
        if let Some(t) = config
            .target_modules
            .iter()
            .find(|t| !keys.iter().any(|k| LoraConfig::target_matches(t, k)))
        {
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
            return Err(ModelError::InvalidInput(format!(
                "lora target_modules: `{t}` selects no module of this model (its modules: {}, all-linear)",
                known.join(", ")
            )));
        }
        Ok(())
    }

    /// Freezes the model and gives every projection `config` selects the adapter `init` makes
    /// for it (`(A, B)` host data, from the module name and `[out, in]`).
    fn attach(
        self,
        config: &LoraConfig,
        mut init: impl FnMut(&str, [usize; 2]) -> Result<(TensorData, TensorData)>,
    ) -> Result<Self> {
        let device = self.embed_tokens.val().device();
        let mut model = self.no_grad();
        for (key, proj) in projections_mut(&mut model) {
            if !config.matches(&key) {
                continue;
            }
            let (a, b) = init(&key, proj.weight.dims())?;
            proj.lora = Some(LoraAdapter::new(a, b, config, &device));
        }
        model.lora = Some(config.clone());
        Ok(model)
    }

    /// The adapters' configuration, when the model carries adapters.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Visits every adapter weight with its PEFT name without the `base_model.model.` prefix
    /// (`model.layers.0.self_attn.q_proj.lora_A.weight`), in checkpoint order.
    pub fn visit_adapters(&self, mut f: impl FnMut(&str, &Param<Tensor<B, 2>>)) {
        for (key, proj) in projections(self) {
            if let Some(l) = &proj.lora {
                f(&format!("{key}.lora_A.weight"), &l.a);
                f(&format!("{key}.lora_B.weight"), &l.b);
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
    /// weight's dtype) and drops the adapters: a plain model, as PEFT's `merge_and_unload`.
    pub fn merge_lora(mut self) -> Self {
        for (_, proj) in projections_mut(&mut self) {
            if let Some(l) = proj.lora.take() {
                let w = proj.weight.val();
                let dtype = w.dtype();
                let merged = (w.cast(FloatDType::F32) + l.weight_delta()).cast(dtype);
                proj.weight = Param::initialized(proj.weight.id, merged);
            }
        }
        self.lora = None;
        self
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
    let mut modules: Vec<String> = Vec::new();
    model.visit_adapters(|name, p| {
        let data = p.val().into_data().convert_dtype(DType::F32);
        tensors.push((
            format!("{PEFT_PREFIX}{}", model.config.file_tensor_name(name)),
            data.shape.to_vec(),
            data.into_bytes().to_vec(),
        ));
        let module = name
            .trim_end_matches(".lora_A.weight")
            .trim_end_matches(".lora_B.weight")
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_string();
        if !modules.contains(&module) {
            modules.push(module);
        }
    });
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
    let alpha = if config.alpha.fract() == 0.0 {
        json!(config.alpha as i64)
    } else {
        json!(config.alpha)
    };
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": modules,
        "use_rslora": config.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
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
    for name in ["rank_pattern", "alpha_pattern"] {
        if field(name).is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())) {
            return Err(bad(name, "per-module ranks or alphas are not supported"));
        }
    }
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
    let keys: HashSet<String> = projections(&model).into_iter().map(|(k, _)| k).collect();
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
    // The projections that carry tensors are the targets, whatever the config's list says.
    let mut targets: Vec<String> = present.iter().cloned().collect();
    targets.sort();
    let recorded = std::mem::replace(&mut lora.target_modules, targets);
    let r = lora.r;
    let name_in_file = |key: &str, part: &str| {
        let bare = config.file_tensor_name(&format!("{key}.{part}.weight"));
        let prefixed = format!("{PEFT_PREFIX}{bare}");
        if names.contains(&prefixed) {
            prefixed
        } else {
            bare
        }
    };
    let mut model = model.attach(&lora, |key, [out, inp]| {
        let read = |part: &str, shape: [usize; 2]| -> Result<TensorData> {
            index.tensor_data(&name_in_file(key, part), &shape)
        };
        Ok((read("lora_A", [r, inp])?, read("lora_B", [out, r])?))
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
