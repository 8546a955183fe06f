//! Hugging Face `config.json` parsing and the model's own configuration.
//!
//! [`HfConfig`] mirrors the JSON file as it is found in the wild (old and new field names);
//! [`ModelConfig`] is what the decoder needs, with every default resolved and every field checked.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::rope::{RopeConfig, RopeScaling};

/// The decoder families this crate implements (each described in its own file of the crate's
/// `family` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// Qwen3: GQA, RMSNorm on queries and keys per head, no biases by default.
    Qwen3,
    /// Qwen2 / Qwen2.5: GQA with biases on the q, k and v projections.
    Qwen2,
    /// Llama 2/3 and the models that reuse it (SmolLM2).
    Llama,
    /// Mistral: Llama's layers with sliding-window attention on every layer.
    Mistral,
    /// Ministral: Mistral's layers, sliding or full attention per layer (`layer_types`).
    Ministral,
}

impl Architecture {
    /// The `model_type` string Hugging Face uses.
    pub fn model_type(self) -> &'static str {
        crate::family::of(self).model_type
    }

    /// The `architectures[0]` class name Hugging Face uses.
    pub fn hf_class(self) -> &'static str {
        crate::family::of(self).hf_class
    }

    fn from_model_type(path: &Path, model_type: &str) -> Result<Self> {
        if let Some(f) = crate::family::by_model_type(model_type) {
            return Ok(f.architecture);
        }
        let hint = match model_type {
            "qwen3_vl_text" | "qwen3_vl_moe" => " (Qwen3-VL is read from the full checkpoint, \
                model_type `qwen3_vl`; its mixture-of-experts variant is not implemented)"
                .to_string(),
            _ => format!(" (supported: {})", crate::family::supported()),
        };
        Err(ModelError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            model_type: model_type.to_string(),
            hint,
        })
    }
}

/// A floating-point storage type of weights on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageDtype {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl StorageDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    /// The name `transformers` writes in `torch_dtype` / `dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// Parses `float32` / `bfloat16` / `float16` (and the short forms `f32`, `bf16`, `fp16`, …).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" | "float" => Some(Self::F32),
            "bfloat16" | "bf16" => Some(Self::Bf16),
            "float16" | "f16" | "fp16" | "half" => Some(Self::F16),
            _ => None,
        }
    }

    pub(crate) fn to_burn(self) -> burn::tensor::DType {
        match self {
            Self::F32 => burn::tensor::DType::F32,
            Self::Bf16 => burn::tensor::DType::BF16,
            Self::F16 => burn::tensor::DType::F16,
        }
    }
}

impl std::fmt::Display for StorageDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// `config.json` as written by `transformers` (4.x and 5.x field names both accepted).
///
/// Unknown fields are ignored here; the raw JSON is kept by [`ModelConfig`] so that a saved
/// checkpoint carries them over unchanged.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    pub use_sliding_window: Option<bool>,
    /// `None`: absent; `Some(Value::Null)`: written as `null` (Mistral's default differs).
    #[serde(default, deserialize_with = "present")]
    pub sliding_window: Option<Value>,
    pub layer_types: Option<Vec<String>>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
}

/// Keeps a field written as `null` apart from an absent one (`#[serde(default)]` gives `None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// What one decoder layer's attention sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    /// Every earlier token (of the same packed row).
    FullAttention,
    /// Only the last [`ModelConfig::sliding_window`] tokens, itself included.
    SlidingAttention,
}

/// The text decoder's `config.json` fields of a Qwen3-VL `config.json`, as a Qwen3 one: the
/// `text_config` object, with `model_type` `qwen3`, the top-level `tie_word_embeddings` (where
/// `transformers` 5 keeps it; `text_config`'s otherwise), dtype and special tokens where
/// `text_config` has none, and the multimodal rotary keys removed.
fn vl_text_config(path: &Path, raw: &Value) -> Result<Value> {
    let mut text = match raw.get("text_config") {
        Some(Value::Object(map)) => map.clone(),
        Some(_) => return Err(ModelError::config(path, "text_config", "must be an object")),
        None => return Err(ModelError::config(path, "text_config", "missing")),
    };
    text.insert("model_type".into(), Value::from("qwen3"));
    let present = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
    if let Some(v) = present(raw.get("tie_word_embeddings")) {
        text.insert("tie_word_embeddings".into(), v);
    }
    for key in [
        "dtype",
        "torch_dtype",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ] {
        if present(text.get(key)).is_none()
            && let Some(v) = present(raw.get(key))
        {
            text.insert(key.into(), v);
        }
    }
    for key in ["rope_parameters", "rope_scaling"] {
        if let Some(Value::Object(rope)) = text.get_mut(key) {
            rope.remove("mrope_section");
            rope.remove("mrope_interleaved");
            if matches!(
                rope.get("rope_type")
                    .or(rope.get("type"))
                    .and_then(Value::as_str),
                Some("mrope")
            ) {
                rope.insert("rope_type".into(), Value::from("default"));
                rope.remove("type");
            }
        }
    }
    Ok(Value::Object(text))
}

/// Everything the decoder needs, resolved and checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which decoder family.
    pub architecture: Architecture,
    /// Rows of the embedding matrix (may exceed the tokenizer's size).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Rotary embedding parameters.
    pub rope: RopeConfig,
    /// Longest sequence the checkpoint was configured for.
    pub max_position_embeddings: usize,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// RMSNorm of queries and keys per head (Qwen3).
    pub qk_norm: bool,
    /// The LM head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The dtype `config.json` declares for the weights.
    pub torch_dtype: StorageDtype,
    /// Beginning-of-sequence token id, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// Padding token id, if any.
    pub pad_token_id: Option<u32>,
    /// The text decoder of a Qwen3-VL checkpoint (`model_type` `qwen3_vl`): its tensors are
    /// stored under `model.language_model.` and the vision tower (`model.visual.`) is carried
    /// through loading and saving untouched.
    #[serde(default)]
    pub vision_language: bool,
    /// Keys a sliding-window layer sees: query `i` attends to key `j` when `i - j < window`.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// The attention of each layer; empty means full attention everywhere.
    #[serde(default)]
    pub layer_types: Vec<LayerType>,
}

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<(Self, Value)> {
        let text = crate::read_text_file(path, crate::MAX_JSON_FILE_BYTES)?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let cfg = Self::from_json(path, &raw)?;
        Ok((cfg, raw))
    }

    /// Checks a parsed `config.json`; `path` is only used in error messages.
    ///
    /// A Qwen3-VL `config.json` (`model_type` `qwen3_vl`) describes its text decoder in
    /// `text_config`, a Qwen3 decoder whose rotary embedding is multimodal (`mrope_section`); on
    /// text-only input the three position axes are equal and it reduces to Qwen3's 1-D rotary
    /// embedding, which is what is built.
    pub fn from_json(path: &Path, raw: &Value) -> Result<Self> {
        if raw.get("model_type").and_then(Value::as_str) == Some("qwen3_vl") {
            let text = vl_text_config(path, raw)?;
            let mut config = Self::from_json(path, &text)?;
            config.vision_language = true;
            return Ok(config);
        }
        let hf: HfConfig = serde_json::from_value(raw.clone()).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_hf(path, &hf)
    }

    /// Resolves defaults and checks a [`HfConfig`].
    pub fn from_hf(path: &Path, hf: &HfConfig) -> Result<Self> {
        let model_type = hf
            .model_type
            .as_deref()
            .ok_or_else(|| ModelError::config(path, "model_type", "missing"))?;
        let architecture = Architecture::from_model_type(path, model_type)?;
        let family = crate::family::of(architecture);
        // Upper bounds far above any published checkpoint, so that a hostile config.json cannot
        // make sizes overflow or ask for absurd allocations before a weight is read.
        let limit = |field: &str| -> usize {
            match field {
                "vocab_size" => 1 << 24,
                "hidden_size" | "intermediate_size" => 1 << 20,
                "num_hidden_layers"
                | "num_attention_heads"
                | "num_key_value_heads"
                | "head_dim" => 1 << 12,
                _ => usize::MAX,
            }
        };
        let need = |v: Option<usize>, field: &str| -> Result<usize> {
            match v {
                None => Err(ModelError::config(path, field, "missing")),
                Some(0) => Err(ModelError::config(path, field, "must be greater than 0")),
                Some(n) if n > limit(field) => Err(ModelError::config(
                    path,
                    field,
                    format!(
                        "{n} is larger than any supported model (at most {})",
                        limit(field)
                    ),
                )),
                Some(n) => Ok(n),
            }
        };
        let vocab_size = need(hf.vocab_size, "vocab_size")?;
        let hidden_size = need(hf.hidden_size, "hidden_size")?;
        let intermediate_size = need(hf.intermediate_size, "intermediate_size")?;
        let num_layers = need(hf.num_hidden_layers, "num_hidden_layers")?;
        let num_heads = need(hf.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = need(
            Some(hf.num_key_value_heads.unwrap_or(num_heads)),
            "num_key_value_heads",
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(ModelError::config(
                path,
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
            ));
        }
        let head_dim = match hf.head_dim {
            Some(0) => {
                return Err(ModelError::config(
                    path,
                    "head_dim",
                    "must be greater than 0",
                ));
            }
            Some(d) => need(Some(d), "head_dim")?,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(ModelError::config(
                        path,
                        "head_dim",
                        format!(
                            "missing, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
                        ),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::config(
                path,
                "head_dim",
                format!("{head_dim} is odd; rotary embeddings need an even head size"),
            ));
        }
        if let Some(act) = hf.hidden_act.as_deref()
            && act != "silu"
            && act != "swish"
        {
            return Err(ModelError::config(
                path,
                "hidden_act",
                format!("`{act}` is not supported (only silu)"),
            ));
        }
        let (sliding_window, layer_types) = (family.attention)(path, hf, num_layers)?;
        let rms_norm_eps = hf.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
            return Err(ModelError::config(
                path,
                "rms_norm_eps",
                "must be a positive number",
            ));
        }
        let max_position_embeddings = hf
            .max_position_embeddings
            .unwrap_or(family.default_max_position_embeddings);
        if max_position_embeddings == 0 {
            return Err(ModelError::config(
                path,
                "max_position_embeddings",
                "must be at least 1",
            ));
        }
        let rope = parse_rope(path, hf, head_dim, max_position_embeddings)?;
        let crate::family::Layout {
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
        } = (family.layout)(hf);
        let dtype_name = hf.dtype.as_deref().or(hf.torch_dtype.as_deref());
        let torch_dtype = match dtype_name {
            None => StorageDtype::F32,
            Some(name) => StorageDtype::parse(name).ok_or_else(|| {
                let field = if hf.dtype.is_some() {
                    "dtype"
                } else {
                    "torch_dtype"
                };
                ModelError::config(
                    path,
                    field,
                    format!("`{name}` is not a supported float type"),
                )
            })?,
        };
        let token = |v: &Option<Value>, field: &str| -> Result<Vec<u32>> {
            match v {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(|n| vec![n])
                    .ok_or_else(|| ModelError::config(path, field, "not a token id")),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|it| {
                        it.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or_else(|| ModelError::config(path, field, "not a token id"))
                    })
                    .collect(),
                Some(_) => Err(ModelError::config(path, field, "not a token id")),
            }
        };
        let bos = token(&hf.bos_token_id, "bos_token_id")?;
        let eos_token_ids = token(&hf.eos_token_id, "eos_token_id")?;
        let pad = token(&hf.pad_token_id, "pad_token_id")?;
        for (field, ids) in [
            ("bos_token_id", &bos),
            ("eos_token_id", &eos_token_ids),
            ("pad_token_id", &pad),
        ] {
            if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                return Err(ModelError::config(
                    path,
                    field,
                    format!("token id {id} is outside the vocabulary (vocab_size {vocab_size})"),
                ));
            }
        }
        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            rope,
            max_position_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            torch_dtype,
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            pad_token_id: pad.first().copied(),
            vision_language: false,
            sliding_window,
            layer_types,
        })
    }

    /// The name under which the tensor this crate calls `name` (Qwen3's names:
    /// `model.layers.0.mlp.up_proj.weight`) is stored in this checkpoint's files.
    pub fn file_tensor_name(&self, name: &str) -> String {
        match name.strip_prefix("model.") {
            Some(rest) if self.vision_language => format!("model.language_model.{rest}"),
            _ => name.to_string(),
        }
    }

    /// The inverse of [`ModelConfig::file_tensor_name`]; `None` for a tensor of another part of
    /// the checkpoint (the vision tower of a vision-language model), which is carried unchanged.
    pub fn internal_tensor_name(&self, file_name: &str) -> Option<String> {
        if !self.vision_language {
            return Some(file_name.to_string());
        }
        match file_name.strip_prefix("model.language_model.") {
            Some(rest) => Some(format!("model.{rest}")),
            None if file_name.starts_with("model.") => None,
            None => Some(file_name.to_string()),
        }
    }

    /// The sliding window of layer `layer`, `None` for a full-attention layer.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(LayerType::SlidingAttention) => self.sliding_window,
            _ => None,
        }
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        crate::names::tensor_specs(self)
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// A `config.json` for this configuration, in the layout `transformers` 4.x writes (top-level
    /// `rope_theta` / `rope_scaling`, `torch_dtype`), which both 4.x and 5.x read.
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": self.rope.scaling.to_hf_json(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype.torch_name(),
            "use_cache": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => Value::from(*one),
                many => Value::from(many.to_vec()),
            },
            "pad_token_id": self.pad_token_id,
        });
        if let Value::Object(map) = &mut v {
            (crate::family::of(self.architecture).write)(self, map);
        }
        v
    }
}

fn parse_rope(
    path: &Path,
    hf: &HfConfig,
    head_dim: usize,
    max_position_embeddings: usize,
) -> Result<RopeConfig> {
    if let Some(p) = hf.partial_rotary_factor
        && (p - 1.0).abs() > f64::EPSILON
    {
        return Err(ModelError::config(
            path,
            "partial_rotary_factor",
            format!("{p} is not supported (only 1.0)"),
        ));
    }
    // transformers 5.x: `rope_parameters` (possibly nested per layer type); 4.x: `rope_scaling`.
    let (field, params) = match (&hf.rope_parameters, &hf.rope_scaling) {
        (Some(Value::Object(p)), _) => ("rope_parameters", Some(p.clone())),
        (_, Some(Value::Object(s))) => ("rope_scaling", Some(s.clone())),
        (_, Some(Value::Null) | None) => ("rope_scaling", None),
        (_, Some(_)) => {
            return Err(ModelError::config(
                path,
                "rope_scaling",
                "must be an object or null",
            ));
        }
    };
    let params = match params {
        Some(p) if p.values().all(Value::is_object) && !p.is_empty() => {
            // Nested by layer type: all layers here are full attention.
            match p.get("full_attention") {
                Some(Value::Object(inner)) => Some(inner.clone()),
                _ => {
                    return Err(ModelError::config(
                        path,
                        field,
                        "nested per-layer-type RoPE parameters without a `full_attention` entry",
                    ));
                }
            }
        }
        other => other,
    };
    let get_f = |key: &str| -> Result<Option<f64>> {
        match params.as_ref().and_then(|p| p.get(key)) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ModelError::config(path, format!("{field}.{key}"), "not a number")),
        }
    };
    let theta = match get_f("rope_theta")? {
        Some(t) => t,
        None => hf.rope_theta.unwrap_or(10_000.0),
    };
    if !(theta > 1.0 && theta.is_finite()) {
        return Err(ModelError::config(
            path,
            "rope_theta",
            format!("{theta} must be a finite number above 1"),
        ));
    }
    let rope_type = params
        .as_ref()
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let need_f = |key: &str| -> Result<f64> {
        get_f(key)?.ok_or_else(|| {
            ModelError::config(
                path,
                format!("{field}.{key}"),
                format!("required by rope_type `{rope_type}`"),
            )
        })
    };
    let original = match get_f("original_max_position_embeddings")? {
        Some(v) if v.is_finite() && v >= 1.0 => v,
        Some(v) => {
            return Err(ModelError::config(
                path,
                format!("{field}.original_max_position_embeddings"),
                format!("{v} must be a number of positions (at least 1)"),
            ));
        }
        None => max_position_embeddings as f64,
    };
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need_f("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need_f("factor")?,
            low_freq_factor: need_f("low_freq_factor")?,
            high_freq_factor: need_f("high_freq_factor")?,
            original_max_position_embeddings: original,
        },
        "yarn" => RopeScaling::Yarn {
            factor: match get_f("factor")? {
                Some(f) => f,
                None => max_position_embeddings as f64 / original,
            },
            original_max_position_embeddings: original,
            attention_factor: get_f("attention_factor")?,
            beta_fast: get_f("beta_fast")?.unwrap_or(32.0),
            beta_slow: get_f("beta_slow")?.unwrap_or(1.0),
            mscale: get_f("mscale")?,
            mscale_all_dim: get_f("mscale_all_dim")?,
            truncate: params
                .as_ref()
                .and_then(|p| p.get("truncate"))
                .and_then(Value::as_bool)
                .unwrap_or(true),
        },
        other => {
            return Err(ModelError::config(
                path,
                format!("{field}.rope_type"),
                format!("`{other}` is not supported (supported: default, linear, llama3, yarn)"),
            ));
        }
    };
    let rope = RopeConfig {
        theta,
        head_dim,
        scaling,
    };
    rope.validate()
        .map_err(|m| ModelError::config(path, field, m))?;
    Ok(rope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "qwen3", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16"
        })
    }

    fn parse(v: &Value) -> Result<ModelConfig> {
        ModelConfig::from_json(Path::new("config.json"), v)
    }

    #[test]
    fn qwen3_fields_resolve() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert_eq!(c.head_dim, 32);
        assert!(c.qk_norm && c.tie_word_embeddings && !c.qkv_bias);
        assert_eq!(c.torch_dtype, StorageDtype::Bf16);
        assert!((c.rope.theta - 1e6).abs() < 1e-9);
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_allocated() {
        for (field, value) in [
            ("num_hidden_layers", json!(1_000_000_000_000_u64)),
            ("vocab_size", json!(1_u64 << 40)),
            ("hidden_size", json!(usize::MAX)),
            ("head_dim", json!(1_u64 << 40)),
            ("num_attention_heads", json!(1_u64 << 33)),
        ] {
            let mut v = base();
            v[field] = value;
            let e = parse(&v).unwrap_err().to_string();
            assert!(
                e.contains(field) && e.contains("larger than any supported"),
                "{e}"
            );
        }
        let mut v = base();
        v["num_attention_heads"] = json!(-4);
        assert!(parse(&v).is_err());
    }

    #[test]
    fn new_style_rope_parameters_and_dtype_are_read() {
        let mut v = base();
        let m = v.as_object_mut().unwrap();
        m.remove("rope_theta");
        m.remove("torch_dtype");
        m.insert("dtype".into(), json!("float16"));
        m.insert(
            "rope_parameters".into(),
            json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
        );
        let c = parse(&v).unwrap();
        assert_eq!(c.torch_dtype, StorageDtype::F16);
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert!((c.rope.theta - 5000.0).abs() < 1e-9);
    }

    #[test]
    fn old_style_type_key_is_read() {
        let mut v = base();
        v["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
        assert_eq!(
            parse(&v).unwrap().rope.scaling,
            RopeScaling::Linear { factor: 4.0 }
        );
    }

    #[test]
    fn derived_head_dim() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("head_dim");
        assert_eq!(parse(&v).unwrap().head_dim, 16);
        v["head_dim"] = Value::Null;
        assert_eq!(parse(&v).unwrap().head_dim, 16);
    }

    #[test]
    fn unknown_model_type_is_named() {
        let mut v = base();
        v["model_type"] = json!("mamba");
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("`mamba`") && e.contains("qwen3, qwen2, llama, mistral"),
            "{e}"
        );
    }

    #[test]
    fn qwen3_vl_reads_its_text_config() {
        let text = base();
        let mut v =
            json!({"model_type": "qwen3_vl", "tie_word_embeddings": true, "text_config": text});
        v["text_config"]["model_type"] = json!("qwen3_vl_text");
        v["text_config"]["rope_scaling"] =
            json!({"rope_type": "mrope", "mrope_section": [24, 20, 20]});
        let c = parse(&v).unwrap();
        assert!(c.vision_language && c.tie_word_embeddings);
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert_eq!(
            c.file_tensor_name("model.layers.0.mlp.up_proj.weight"),
            "model.language_model.layers.0.mlp.up_proj.weight"
        );
        assert_eq!(c.file_tensor_name("lm_head.weight"), "lm_head.weight");
        assert_eq!(
            c.internal_tensor_name("model.visual.blocks.0.attn.qkv.weight"),
            None
        );
        assert_eq!(
            c.internal_tensor_name("model.language_model.norm.weight")
                .as_deref(),
            Some("model.norm.weight")
        );
        let e = parse(&json!({"model_type": "qwen3_vl"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("text_config") && e.contains("missing"), "{e}");
        let mut v = base();
        v["model_type"] = json!("qwen3_vl_moe");
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("qwen3_vl_moe") && e.contains("mixture-of-experts"),
            "{e}"
        );
    }

    #[test]
    fn inconsistent_heads_name_the_field() {
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(
            parse(&v)
                .unwrap_err()
                .to_string()
                .contains("`hidden_size`: missing")
        );
    }

    #[test]
    fn unsupported_rope_and_dtype_are_errors() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
        assert!(parse(&v).unwrap_err().to_string().contains("dynamic"));
        let mut v = base();
        v["torch_dtype"] = json!("int8");
        assert!(parse(&v).unwrap_err().to_string().contains("torch_dtype"));
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        assert!(
            parse(&v)
                .unwrap_err()
                .to_string()
                .contains("low_freq_factor")
        );
    }

    #[test]
    fn qwen2_has_qkv_bias_and_llama_reads_mlp_bias() {
        let mut v = base();
        v["model_type"] = json!("qwen2");
        let c = parse(&v).unwrap();
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm);
        v["model_type"] = json!("llama");
        v["mlp_bias"] = json!(true);
        v["attention_bias"] = json!(true);
        let c = parse(&v).unwrap();
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias && !c.qk_norm);
    }

    #[test]
    fn mistral_slides_as_transformers_reads_it() {
        let mut v = base();
        v["model_type"] = json!("mistral");
        v["attention_bias"] = json!(true);
        // Absent: MistralConfig's default window of 4096 on every layer; no biases whatever
        // attention_bias says (Mistral has none).
        let c = parse(&v).unwrap();
        assert_eq!(c.architecture, Architecture::Mistral);
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.layer_window(0), Some(4096));
        assert_eq!(c.layer_window(1), Some(4096));
        assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias && !c.qk_norm);
        assert_eq!(c.max_position_embeddings, 131_072);
        // `null`: full attention (Mistral 7B v0.2 and later).
        v["sliding_window"] = Value::Null;
        let c = parse(&v).unwrap();
        assert_eq!((c.sliding_window, c.layer_window(0)), (None, None));
        v["sliding_window"] = json!(8);
        let c = parse(&v).unwrap();
        assert_eq!(c.layer_window(1), Some(8));
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
        for bad in [json!(0), json!(-3), json!("4096"), json!(2.5)] {
            v["sliding_window"] = bad.clone();
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains("sliding_window"), "{bad}: {e}");
        }
        // Llama ignores the field, as transformers does.
        v["model_type"] = json!("llama");
        v["sliding_window"] = json!(8);
        assert_eq!(parse(&v).unwrap().layer_window(0), None);
    }

    #[test]
    fn ministral_reads_the_attention_of_each_layer() {
        let mut v = base();
        v["model_type"] = json!("ministral");
        v["num_hidden_layers"] = json!(3);
        v["sliding_window"] = json!(6);
        // Absent: every layer slides.
        let c = parse(&v).unwrap();
        assert_eq!(c.architecture, Architecture::Ministral);
        assert_eq!(
            (0..3).map(|l| c.layer_window(l)).collect::<Vec<_>>(),
            [Some(6); 3]
        );
        v["layer_types"] = json!(["sliding_attention", "full_attention", "sliding_attention"]);
        let c = parse(&v).unwrap();
        assert_eq!(
            (0..3).map(|l| c.layer_window(l)).collect::<Vec<_>>(),
            [Some(6), None, Some(6)]
        );
        assert!(!c.qkv_bias && !c.o_bias && !c.qk_norm);
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
        // No window: sliding layers see everything.
        v["sliding_window"] = Value::Null;
        assert_eq!(parse(&v).unwrap().layer_window(0), None);
        v["sliding_window"] = json!(6);
        for (bad, needle) in [
            (
                json!(["full_attention"]),
                "has 1 entries for num_hidden_layers = 3",
            ),
            (
                json!(["full_attention", "chunked_attention", "full_attention"]),
                "`chunked_attention`",
            ),
        ] {
            v["layer_types"] = bad;
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains("layer_types") && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn to_hf_json_round_trips() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        v["model_type"] = json!("llama");
        v["eos_token_id"] = json!([1, 2]);
        let c = parse(&v).unwrap();
        let again = parse(&c.to_hf_json()).unwrap();
        assert_eq!(c, again);
    }
}
