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
    /// OLMo 2: norms after attention and after the MLP (post-norm), q/k norms over the whole
    /// projection.
    Olmo2,
    /// SmolLM3: Llama's layers, some without the rotary embedding (`no_rope_layers`).
    SmolLm3,
    /// Gemma 3's text decoder: sliding and global layers with their own rotary bases, `(1 + w)`
    /// RMSNorms before and after attention and the MLP, a GeGLU MLP, embeddings scaled by
    /// √hidden.
    Gemma3,
    /// Phi-3 / Phi-4-mini: Llama's layers with fused `qkv_proj` and `gate_up_proj`
    /// projections, a partial rotary embedding and LongRoPE.
    Phi3,
    /// Qwen3-MoE: Qwen3's attention, and MLPs of routed experts (top-k of a softmax router).
    Qwen3Moe,
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
            "gemma3" => " (the multimodal Gemma 3 checkpoints are not supported yet; the text \
                models, model_type `gemma3_text`, are)"
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
    /// Gemma's name for `hidden_act`.
    pub hidden_activation: Option<String>,
    /// Gemma: the attention scale is `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3 (transformers 4.x): the rotary base of the sliding layers.
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3: every this-many-th layer is global (without `layer_types`).
    pub sliding_window_pattern: Option<usize>,
    /// The same, as transformers 5 keeps it beside `layer_types`.
    #[serde(rename = "_sliding_window_pattern")]
    pub sliding_window_pattern_private: Option<usize>,
    /// Gemma 2: soft-capping of the final logits (refused when set).
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Value>,
    /// Gemma 2: soft-capping of the attention scores (refused when set).
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Value>,
    /// Gemma 3 used as an encoder (refused when true).
    pub use_bidirectional_attention: Option<bool>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    /// Phi-3: the pre-training context of LongRoPE, at the top level.
    pub original_max_position_embeddings: Option<usize>,
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
    /// SmolLM3: 1 where a layer applies the rotary embedding, 0 where it does not.
    pub no_rope_layers: Option<Vec<i64>>,
    /// SmolLM3: without `no_rope_layers`, every this-many-th layer has no rotary embedding.
    pub no_rope_layer_interval: Option<usize>,
    /// Mixture of experts: the number of routed experts (`num_local_experts` in some configs).
    pub num_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    /// Experts each token is routed to.
    pub num_experts_per_tok: Option<usize>,
    /// Width of each expert's MLP.
    pub moe_intermediate_size: Option<usize>,
    /// The top-k routing weights are renormalised to sum to 1.
    pub norm_topk_prob: Option<bool>,
    /// Every this-many-th layer is sparse.
    pub decoder_sparse_step: Option<usize>,
    /// Layers whose MLP stays dense.
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Weight of the router's load-balancing loss.
    pub router_aux_loss_coef: Option<f64>,
    /// The load-balancing loss is added to the training loss.
    pub output_router_logits: Option<bool>,
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

/// Where a decoder layer normalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(rename_all = "snake_case")]
pub enum NormPlacement {
    /// Before attention (`input_layernorm`) and before the MLP (`post_attention_layernorm`):
    /// Llama, Qwen, Mistral.
    #[default]
    Pre,
    /// After attention (`post_attention_layernorm`) and after the MLP
    /// (`post_feedforward_layernorm`), each before its residual add: OLMo 2.
    Post,
    /// Both: before attention (`input_layernorm`), after it (`post_attention_layernorm`),
    /// before the MLP (`pre_feedforward_layernorm`) and after it
    /// (`post_feedforward_layernorm`): Gemma 2 and 3.
    Sandwich,
}

/// A mixture-of-experts MLP (Qwen3-MoE): a softmax router picks `top_k` of `num_experts`
/// expert MLPs per token, their outputs summed with the routing weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Routed experts per sparse layer.
    pub num_experts: usize,
    /// Experts each token goes to.
    pub top_k: usize,
    /// Width of each expert's MLP.
    pub intermediate_size: usize,
    /// The top-k weights are renormalised to sum to 1 (else they are the router's
    /// probabilities as they are).
    pub norm_topk_prob: bool,
    /// Which layers are sparse (the others keep a dense MLP of `intermediate_size`).
    pub sparse_layers: Vec<bool>,
    /// Weight of the load-balancing loss.
    pub router_aux_loss_coef: f64,
    /// The load-balancing loss is added to the training loss (`output_router_logits`).
    pub output_router_logits: bool,
}

/// The activation of the MLP's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU (SwiGLU): `silu` / `swish`.
    #[default]
    Silu,
    /// GELU with the tanh approximation (GeGLU): `gelu_pytorch_tanh`.
    GeluTanh,
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
    /// RMSNorm of queries and keys (Qwen3: per head; OLMo 2: over the whole projection, see
    /// [`ModelConfig::qk_norm_whole`]).
    pub qk_norm: bool,
    /// The q/k norms span the whole projection (all heads at once, OLMo 2) rather than each
    /// head.
    #[serde(default)]
    pub qk_norm_whole: bool,
    /// Where each layer normalises.
    #[serde(default)]
    pub norm_placement: NormPlacement,
    /// q, k and v are one projection, `qkv_proj`, whose rows are the queries', the keys' and
    /// the values' (Phi-3).
    #[serde(default)]
    pub fused_qkv: bool,
    /// gate and up are one projection, `gate_up_proj`, whose rows are the gate's then the up
    /// projection's (Phi-3).
    #[serde(default)]
    pub fused_gate_up: bool,
    /// Whether each layer applies the rotary embedding; empty means every layer does (SmolLM3's
    /// `no_rope_layers`).
    #[serde(default)]
    pub rope_layers: Vec<bool>,
    /// Every RMSNorm scales by `weight + norm_offset` (Gemma: 1, its weights are stored around
    /// 0), computing the product in f32 before casting back.
    #[serde(default)]
    pub norm_offset: f64,
    /// The embeddings are multiplied by this (Gemma: √hidden, in the weights' dtype).
    #[serde(default)]
    pub embedding_scale: Option<f64>,
    /// The activation of the MLP's gate.
    #[serde(default)]
    pub activation: Activation,
    /// The attention scale is `query_pre_attn_scalar^-0.5` (Gemma) instead of `head_dim^-0.5`.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// The rotary embedding of the sliding-window layers when it differs from [`Self::rope`]
    /// (Gemma 3's local base).
    #[serde(default)]
    pub rope_local: Option<RopeConfig>,
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
    /// The experts of the sparse layers (Qwen3-MoE), if any.
    #[serde(default)]
    pub moe: Option<MoeConfig>,
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
        let activation = (family.activation)(path, hf)?;
        let (sliding_window, layer_types) = (family.attention)(path, hf, num_layers)?;
        let rms_norm_eps = hf.rms_norm_eps.unwrap_or(family.default_rms_norm_eps);
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
        let rope = parse_rope(
            path,
            hf,
            head_dim,
            max_position_embeddings,
            RopeLayers::Global,
            &family.rope,
        )?;
        let crate::family::Layout {
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            qk_norm_whole,
            norm_placement,
            fused_qkv,
            fused_gate_up,
        } = (family.layout)(hf);
        let rope_layers = (family.rope_layers)(path, hf, num_layers)?;
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
        let mut config = Self {
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
            qk_norm_whole,
            norm_placement,
            fused_qkv,
            fused_gate_up,
            rope_layers,
            tie_word_embeddings: hf
                .tie_word_embeddings
                .unwrap_or(family.default_tie_word_embeddings),
            torch_dtype,
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            pad_token_id: pad.first().copied(),
            vision_language: false,
            sliding_window,
            layer_types,
            norm_offset: 0.0,
            embedding_scale: None,
            activation,
            query_pre_attn_scalar: None,
            rope_local: None,
            moe: None,
        };
        (family.finish)(path, hf, &mut config)?;
        Ok(config)
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

    /// The attention's scale: `query_pre_attn_scalar^-0.5` or `head_dim^-0.5`.
    pub fn attention_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(q) => 1.0 / q.sqrt(),
            None => 1.0 / (self.head_dim.max(1) as f64).sqrt(),
        }
    }

    /// Whether layer `layer`'s MLP is a mixture of experts.
    pub fn layer_sparse(&self, layer: usize) -> bool {
        self.moe
            .as_ref()
            .is_some_and(|m| m.sparse_layers.get(layer).copied().unwrap_or(false))
    }

    /// Whether layer `layer` applies the rotary embedding.
    pub fn layer_rope(&self, layer: usize) -> bool {
        self.rope_layers.get(layer).copied().unwrap_or(true)
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

/// Which layers' rotary embedding [`parse_rope`] reads: the global (full-attention) layers', or
/// the sliding layers' of a family with a local base (Gemma 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeLayers {
    Global,
    Local,
}

pub(crate) fn parse_rope(
    path: &Path,
    hf: &HfConfig,
    head_dim: usize,
    max_position_embeddings: usize,
    layers: RopeLayers,
    rules: &crate::family::RopeRules,
) -> Result<RopeConfig> {
    // transformers 5.x: `rope_parameters` (possibly nested per layer type); 4.x: `rope_scaling`.
    let (field, params) = match (&hf.rope_parameters, &hf.rope_scaling) {
        // transformers 4.x's flat `rope_scaling` is the global layers' (Gemma 3's local layers
        // have the default rotary embedding with `rope_local_base_freq`).
        (None | Some(Value::Null), _) if layers == RopeLayers::Local => ("rope_scaling", None),
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
            // Nested by layer type.
            let key = match layers {
                RopeLayers::Global => "full_attention",
                RopeLayers::Local => "sliding_attention",
            };
            match p.get(key) {
                Some(Value::Object(inner)) => Some(inner.clone()),
                _ => {
                    return Err(ModelError::config(
                        path,
                        field,
                        format!("nested per-layer-type RoPE parameters without a `{key}` entry"),
                    ));
                }
            }
        }
        // A flat set is the global layers' only.
        _ if layers == RopeLayers::Local => None,
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
    // `partial_rotary_factor`: the rotary parameters' own, else the top-level one.
    let (partial_field, partial) = match get_f("partial_rotary_factor")? {
        Some(p) => (format!("{field}.partial_rotary_factor"), p),
        None => (
            "partial_rotary_factor".to_string(),
            hf.partial_rotary_factor.unwrap_or(1.0),
        ),
    };
    let rotary_dim = if (partial - 1.0).abs() <= f64::EPSILON {
        head_dim
    } else if !rules.partial_rotary {
        return Err(ModelError::config(
            path,
            partial_field,
            format!("{partial} is not supported for this model type (only 1.0)"),
        ));
    } else {
        // `int(head_dim * partial_rotary_factor)`, as `transformers`.
        let dim = head_dim as f64 * partial;
        if !(partial > 0.0 && partial < 1.0 && dim >= 2.0 && (dim as usize).is_multiple_of(2)) {
            return Err(ModelError::config(
                path,
                partial_field,
                format!(
                    "{partial} must be in (0, 1] and give an even number of rotated channels \
                     (head_dim {head_dim} × {partial} = {dim})"
                ),
            ));
        }
        dim as usize
    };
    let theta = match (get_f("rope_theta")?, layers) {
        (Some(t), _) => t,
        (None, RopeLayers::Global) => hf.rope_theta.unwrap_or(10_000.0),
        (None, RopeLayers::Local) => hf.rope_local_base_freq.unwrap_or(10_000.0),
    };
    if !(theta > 1.0 && theta.is_finite()) {
        let key = match layers {
            RopeLayers::Local if params.is_none() => "rope_local_base_freq",
            _ => "rope_theta",
        };
        return Err(ModelError::config(
            path,
            key,
            format!("{theta} must be a finite number above 1"),
        ));
    }
    let rope_type = params
        .as_ref()
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let rope_type = rules
        .type_aliases
        .iter()
        .find(|(from, _)| *from == rope_type)
        .map_or(rope_type, |(_, to)| *to)
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
    let original = match (
        rules.top_level_original_max,
        get_f("original_max_position_embeddings")?,
    ) {
        // Phi-3's configuration class keeps its own (default 4096) and lets it win.
        (Some(default), _) => match hf.original_max_position_embeddings.unwrap_or(default) {
            0 => {
                return Err(ModelError::config(
                    path,
                    "original_max_position_embeddings",
                    "must be a number of positions (at least 1)",
                ));
            }
            n => n as f64,
        },
        (None, Some(v)) if v.is_finite() && v >= 1.0 => v,
        (None, Some(v)) => {
            return Err(ModelError::config(
                path,
                format!("{field}.original_max_position_embeddings"),
                format!("{v} must be a number of positions (at least 1)"),
            ));
        }
        (None, None) => max_position_embeddings as f64,
    };
    let factors = |key: &str| -> Result<Vec<f64>> {
        match params.as_ref().and_then(|p| p.get(key)) {
            Some(Value::Array(items)) if items.len() <= 1 << 16 => items
                .iter()
                .map(|v| {
                    v.as_f64().ok_or_else(|| {
                        ModelError::config(path, format!("{field}.{key}"), "not a list of numbers")
                    })
                })
                .collect(),
            Some(Value::Array(_)) => Err(ModelError::config(
                path,
                format!("{field}.{key}"),
                "has more entries than any rotary embedding",
            )),
            None | Some(Value::Null) => Err(ModelError::config(
                path,
                format!("{field}.{key}"),
                format!("required by rope_type `{rope_type}`"),
            )),
            Some(_) => Err(ModelError::config(
                path,
                format!("{field}.{key}"),
                "not a list of numbers",
            )),
        }
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
        "longrope" => {
            // The extension factor is the context's growth unless given; the attention factor
            // follows from it unless given (`_compute_longrope_parameters`).
            let factor = get_f("factor")?.unwrap_or(max_position_embeddings as f64 / original);
            let attention_factor = match get_f("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / original.ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(ModelError::config(
                path,
                format!("{field}.rope_type"),
                format!(
                    "`{other}` is not supported (supported: default, linear, llama3, yarn, longrope)"
                ),
            ));
        }
    };
    let rope = RopeConfig {
        theta,
        head_dim: rotary_dim,
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
    fn olmo2_is_post_norm_with_whole_projection_qk_norms() {
        let mut v = base();
        v["model_type"] = json!("olmo2");
        v["attention_bias"] = json!(true);
        v.as_object_mut().unwrap().remove("rms_norm_eps");
        v.as_object_mut().unwrap().remove("tie_word_embeddings");
        let c = parse(&v).unwrap();
        assert_eq!(c.architecture, Architecture::Olmo2);
        assert_eq!(c.norm_placement, NormPlacement::Post);
        assert!(c.qk_norm && c.qk_norm_whole && c.qkv_bias && c.o_bias && !c.mlp_bias);
        // Olmo2Config's defaults.
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert!(!c.tie_word_embeddings);
        let names: Vec<String> = crate::names::tensor_specs(&c)
            .into_iter()
            .filter(|t| t.name.starts_with("model.layers.0.") && t.name.contains("norm"))
            .map(|t| format!("{} {:?}", t.name, t.shape))
            .collect();
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        assert_eq!(
            names,
            [
                format!("model.layers.0.self_attn.q_norm.weight [{q}]"),
                format!("model.layers.0.self_attn.k_norm.weight [{kv}]"),
                format!(
                    "model.layers.0.post_attention_layernorm.weight [{}]",
                    c.hidden_size
                ),
                format!(
                    "model.layers.0.post_feedforward_layernorm.weight [{}]",
                    c.hidden_size
                ),
            ]
        );
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
    }

    #[test]
    fn smollm3_reads_its_nope_layers_as_transformers_does() {
        let mut v = base();
        v["model_type"] = json!("smollm3");
        v["num_hidden_layers"] = json!(8);
        v.as_object_mut().unwrap().remove("tie_word_embeddings");
        // Absent: every 4th layer has no rotary embedding; tied embeddings by default.
        let c = parse(&v).unwrap();
        assert_eq!(c.architecture, Architecture::SmolLm3);
        let rope = |c: &ModelConfig| (0..8).map(|l| c.layer_rope(l)).collect::<Vec<_>>();
        assert_eq!(rope(&c), [true, true, true, false, true, true, true, false]);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.norm_placement, NormPlacement::Pre);
        assert_eq!((c.sliding_window, c.layer_types.len()), (None, 0));
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
        v["no_rope_layer_interval"] = json!(2);
        assert_eq!(
            rope(&parse(&v).unwrap()),
            [true, false, true, false, true, false, true, false]
        );
        v["no_rope_layers"] = json!([0, 1, 1, 1, 1, 1, 1, 0]);
        let c = parse(&v).unwrap();
        assert_eq!(rope(&c), [false, true, true, true, true, true, true, false]);
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
        // A window only with use_sliding_window, and then on the NoPE layers.
        v["sliding_window"] = json!(16);
        assert_eq!(parse(&v).unwrap().layer_window(0), None);
        v["use_sliding_window"] = json!(true);
        let c = parse(&v).unwrap();
        assert_eq!(
            (0..8).map(|l| c.layer_window(l)).collect::<Vec<_>>(),
            [Some(16), None, None, None, None, None, None, Some(16)]
        );
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
        for (bad, needle) in [
            (json!([1, 1]), "has 2 entries for num_hidden_layers = 8"),
            (json!([1, 1, 1, 2, 1, 1, 1, 1]), "entry 2"),
        ] {
            v["no_rope_layers"] = bad;
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains("no_rope_layers") && e.contains(needle), "{e}");
        }
        v.as_object_mut().unwrap().remove("no_rope_layers");
        v["no_rope_layer_interval"] = json!(0);
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("no_rope_layer_interval"), "{e}");
    }

    #[test]
    fn gemma3_reads_its_layers_and_rotary_embeddings_as_transformers_does() {
        let mut v = base();
        v["model_type"] = json!("gemma3_text");
        v["num_hidden_layers"] = json!(7);
        v["head_dim"] = json!(16);
        v["hidden_activation"] = json!("gelu_pytorch_tanh");
        for key in ["tie_word_embeddings", "rope_theta"] {
            v.as_object_mut().unwrap().remove(key);
        }
        // transformers 5: nested rotary parameters; no layer_types: every 6th layer global.
        v["rope_parameters"] = json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}});
        let c = parse(&v).unwrap();
        assert_eq!(c.architecture, Architecture::Gemma3);
        assert_eq!(c.norm_placement, NormPlacement::Sandwich);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!((c.norm_offset, c.embedding_scale), (1.0, Some(8.0)));
        assert!(c.qk_norm && !c.qk_norm_whole && c.tie_word_embeddings);
        assert_eq!(c.query_pre_attn_scalar, Some(256.0));
        assert!((c.attention_scale() - 1.0 / 16.0).abs() < 1e-12);
        let windows: Vec<_> = (0..7).map(|l| c.layer_window(l)).collect();
        let s = Some(4096);
        assert_eq!(windows, [s, s, s, s, s, None, s]);
        assert_eq!(c.rope.theta, 1_000_000.0);
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 8.0 });
        let local = c.rope_local.clone().unwrap();
        assert_eq!(
            (local.theta, &local.scaling),
            (10_000.0, &RopeScaling::Default)
        );
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
        // transformers 4.x: flat rope_scaling for the global layers, rope_local_base_freq.
        v.as_object_mut().unwrap().remove("rope_parameters");
        v["rope_theta"] = json!(500_000.0);
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 4.0});
        v["rope_local_base_freq"] = json!(20_000.0);
        v["sliding_window_pattern"] = json!(2);
        v["sliding_window"] = json!(512);
        v["query_pre_attn_scalar"] = json!(24);
        let c = parse(&v).unwrap();
        let local = c.rope_local.clone().unwrap();
        assert_eq!((c.rope.theta, local.theta), (500_000.0, 20_000.0));
        assert_eq!(local.scaling, RopeScaling::Default);
        assert_eq!(c.layer_window(0), Some(512));
        assert_eq!(c.layer_window(1), None);
        assert!((c.attention_scale() - 24f64.powf(-0.5)).abs() < 1e-12);
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
        // What is not implemented is refused by name.
        for (key, value) in [
            ("final_logit_softcapping", json!(30.0)),
            ("attn_logit_softcapping", json!(50.0)),
            ("use_bidirectional_attention", json!(true)),
            ("hidden_activation", json!("relu")),
            ("sliding_window_pattern", json!(0)),
            ("query_pre_attn_scalar", json!(-1)),
            ("rope_local_base_freq", json!(0.5)),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let e = parse(&bad).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let mut nulls = v.clone();
        nulls["final_logit_softcapping"] = Value::Null;
        nulls["attn_logit_softcapping"] = Value::Null;
        assert!(parse(&nulls).is_ok());
        let mut multimodal = v;
        multimodal["model_type"] = json!("gemma3");
        let e = parse(&multimodal).unwrap_err().to_string();
        assert!(e.contains("gemma3"), "{e}");
    }

    fn phi3() -> Value {
        // Phi-4-mini's shape of config (its sizes cut down): 3/4 of each head rotated, LongRoPE
        // with a top-level pre-training context.
        json!({
            "model_type": "phi3", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 131_072, "original_max_position_embeddings": 4096,
            "partial_rotary_factor": 0.75, "rope_theta": 10_000.0, "sliding_window": null,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5],
                             "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]},
            "tie_word_embeddings": true, "torch_dtype": "bfloat16"
        })
    }

    #[test]
    fn phi3_reads_fused_projections_partial_rotary_and_longrope_as_transformers_does() {
        let c = parse(&phi3()).unwrap();
        assert!(c.fused_qkv && c.fused_gate_up && !c.qkv_bias && !c.mlp_bias);
        assert_eq!((c.head_dim, c.rope.head_dim), (16, 12));
        assert_eq!((c.sliding_window, c.layer_types.len()), (None, 0));
        let RopeScaling::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } = &c.rope.scaling
        else {
            panic!("{:?}", c.rope.scaling)
        };
        assert_eq!(*original_max_position_embeddings, 4096.0);
        let want = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
        assert!((attention_factor - want).abs() < 1e-12);
        assert_eq!(c.rope.switch_length(), Some(4096));
        // Short factors within the context, long ones beyond, the same attention factor.
        let (short, s1) = c.rope.inv_freq_for(4096);
        let (long, s2) = c.rope.inv_freq_for(4097);
        assert_eq!(s1, s2);
        assert!(
            (short[1] / long[1] - 2.0).abs() < 1e-6,
            "{short:?} {long:?}"
        );
        // Phi-3's names: `su` (and `yarn`) are LongRoPE; the top-level context wins over one in
        // the rotary parameters, and defaults to 4096.
        let mut v = phi3();
        v["rope_scaling"]["type"] = json!("su");
        v["rope_scaling"]["original_max_position_embeddings"] = json!(64);
        assert_eq!(parse(&v).unwrap().rope.switch_length(), Some(4096));
        v.as_object_mut()
            .unwrap()
            .remove("original_max_position_embeddings");
        assert_eq!(parse(&v).unwrap().rope.switch_length(), Some(4096));
        // A window on every layer when set.
        let mut v = phi3();
        v["sliding_window"] = json!(2047);
        let c = parse(&v).unwrap();
        assert_eq!(c.layer_window(1), Some(2047));
        // Written back and read again: the same configuration.
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
    }

    #[test]
    fn bad_phi3_rotary_settings_name_the_field() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("partial_rotary_factor", json!(0.7), "even number"),
            ("partial_rotary_factor", json!(1.5), "in (0, 1]"),
            ("partial_rotary_factor", json!(0.0), "in (0, 1]"),
            ("original_max_position_embeddings", json!(0), "at least 1"),
            ("sliding_window", json!(0), "sliding_window"),
        ];
        for (key, value, want) in cases {
            let mut v = phi3();
            v[key] = value.clone();
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(want), "{key} = {value}: {e}");
        }
        let rope_cases: Vec<(&str, Value, &str)> = vec![
            (
                "short_factor",
                json!([1.0, 2.0]),
                "short_factor has 2 entries",
            ),
            (
                "long_factor",
                json!([1.0, 2.0, 3.0, 4.0, 5.0, -1.0]),
                "positive",
            ),
            ("short_factor", json!("many"), "not a list of numbers"),
            (
                "long_factor",
                Value::Null,
                "required by rope_type `longrope`",
            ),
            ("attention_factor", json!(-2.0), "attention_factor"),
        ];
        for (key, value, want) in rope_cases {
            let mut v = phi3();
            v["rope_scaling"][key] = value.clone();
            let e = parse(&v).unwrap_err().to_string();
            assert!(
                e.contains("rope_scaling") && e.contains(want),
                "{key} = {value}: {e}"
            );
        }
        // Other families refuse a partial rotary embedding rather than ignore it.
        let mut v = base();
        v["partial_rotary_factor"] = json!(0.5);
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("partial_rotary_factor"), "{e}");
    }

    fn qwen3_moe() -> Value {
        let mut v = base();
        v["model_type"] = json!("qwen3_moe");
        v["num_hidden_layers"] = json!(4);
        v["moe_intermediate_size"] = json!(32);
        v["num_experts"] = json!(8);
        v["num_experts_per_tok"] = json!(2);
        v["norm_topk_prob"] = json!(true);
        v["mlp_only_layers"] = json!([2]);
        v
    }

    #[test]
    fn qwen3_moe_reads_its_experts_as_transformers_does() {
        let c = parse(&qwen3_moe()).unwrap();
        let m = c.moe.clone().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.intermediate_size), (8, 2, 32));
        assert!(m.norm_topk_prob && !m.output_router_logits);
        assert_eq!(m.sparse_layers, [true, true, false, true]);
        assert!(c.qk_norm && !c.qk_norm_whole);
        // `num_local_experts` (what transformers 5 writes) and `decoder_sparse_step`.
        let mut v = qwen3_moe();
        v.as_object_mut().unwrap().remove("num_experts");
        v["num_local_experts"] = json!(4);
        v["decoder_sparse_step"] = json!(2);
        v["mlp_only_layers"] = json!([]);
        let c = parse(&v).unwrap();
        let m = c.moe.clone().unwrap();
        assert_eq!(m.num_experts, 4);
        assert_eq!(m.sparse_layers, [false, true, false, true]);
        // Written back and read again: the same configuration.
        assert_eq!(parse(&c.to_hf_json()).unwrap(), c);
        // The tensors of a sparse layer: the router and each expert's MLP.
        let names: Vec<String> = crate::names::tensor_specs(&c)
            .into_iter()
            .map(|s| s.name)
            .filter(|n| n.starts_with("model.layers.1.mlp"))
            .collect();
        assert_eq!(names.len(), 1 + 4 * 3);
        assert_eq!(names[0], "model.layers.1.mlp.gate.weight");
        assert_eq!(names[3], "model.layers.1.mlp.experts.0.down_proj.weight");
    }

    #[test]
    fn bad_qwen3_moe_settings_name_the_field() {
        for (key, value, want) in [
            ("num_experts_per_tok", json!(9), "between 1 and num_experts"),
            ("num_experts_per_tok", json!(0), "between 1 and num_experts"),
            (
                "num_experts",
                json!(1 << 20),
                "more than any supported model",
            ),
            ("moe_intermediate_size", json!(0), "between 1"),
            ("decoder_sparse_step", json!(0), "at least 1"),
            ("router_aux_loss_coef", json!(-1.0), "at least 0"),
        ] {
            let mut v = qwen3_moe();
            v[key] = value.clone();
            let e = parse(&v).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(want), "{key} = {value}: {e}");
        }
        let mut v = qwen3_moe();
        v["output_router_logits"] = json!(true);
        v["router_aux_loss_coef"] = json!(0.02);
        let m = parse(&v).unwrap().moe.unwrap();
        assert!(m.output_router_logits && (m.router_aux_loss_coef - 0.02).abs() < 1e-12);
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
