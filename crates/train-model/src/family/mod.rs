//! The decoder families, each in its own file: what it changes on top of the shared decoder.
//!
//! The decoder in [`crate::model`] reads only resolved options of [`ModelConfig`] (biases, q/k
//! norms, each layer's attention window); a family's file says how its `config.json` sets them,
//! its names in `transformers`, and what it writes back. Nothing else in the crate matches on
//! the family. Adding one (see `docs/ARCHITECTURE.md`, "Adding a family"): a file here with its
//! [`Family`], a variant of [`Architecture`], and its line in [`FAMILIES`].

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::{Activation, Architecture, HfConfig, LayerType, ModelConfig, NormPlacement};
use crate::error::{ModelError, Result};

mod gemma3;
mod llama;
mod ministral;
mod mistral;
mod olmo2;
mod phi3;
mod qwen2;
mod qwen3;
mod qwen3_moe;
mod smollm3;

/// What a family's configuration resolves to.
pub(crate) struct Family {
    /// The variant naming it.
    pub architecture: Architecture,
    /// `model_type` in `config.json`.
    pub model_type: &'static str,
    /// The `architectures[0]` class of `transformers`.
    pub hf_class: &'static str,
    /// `max_position_embeddings` when `config.json` has none (the default of the family's
    /// configuration class in `transformers`).
    pub default_max_position_embeddings: usize,
    /// `rms_norm_eps` when `config.json` has none (the configuration class's default).
    pub default_rms_norm_eps: f64,
    /// `tie_word_embeddings` when `config.json` has none (the configuration class's default:
    /// `transformers` leaves a value equal to it out of the files it writes).
    pub default_tie_word_embeddings: bool,
    /// Projection biases, q/k norms and where the layers normalise.
    pub layout: fn(&HfConfig) -> Layout,
    /// The sliding window and each layer's attention (`num_hidden_layers` given).
    pub attention: fn(&Path, &HfConfig, usize) -> Result<Attention>,
    /// Whether each layer applies the rotary embedding (empty: every layer).
    pub rope_layers: fn(&Path, &HfConfig, usize) -> Result<Vec<bool>>,
    /// The MLP's activation, from the family's key for it.
    pub activation: fn(&Path, &HfConfig) -> Result<Activation>,
    /// How the family's configuration class reads the rotary embedding's keys.
    pub rope: RopeRules,
    /// Sets the family's remaining options on the resolved configuration (Gemma: norm offset,
    /// embedding scale, attention scale, local rotary embedding).
    pub finish: fn(&Path, &HfConfig, &mut ModelConfig) -> Result<()>,
    /// The family's own keys of a `config.json` written from a [`ModelConfig`].
    pub write: fn(&ModelConfig, &mut Map<String, Value>),
}

/// How a family's configuration class reads the rotary embedding's keys beyond what every
/// family reads (`rope_theta`, `rope_scaling` / `rope_parameters`).
pub(crate) struct RopeRules {
    /// `partial_rotary_factor` is read (in `rope_parameters`, else at the top level): the
    /// rotary embedding covers that fraction of each head. Other families refuse a factor
    /// other than 1.
    pub partial_rotary: bool,
    /// `rope_type` names the family's class renames before reading them (Phi-3: `su` and
    /// `yarn` are `longrope`).
    pub type_aliases: &'static [(&'static str, &'static str)],
    /// The configuration class has a top-level `original_max_position_embeddings` with this
    /// default, which overrides the one in the rotary parameters (Phi-3).
    pub top_level_original_max: Option<usize>,
}

/// What every family reads and nothing more.
pub(crate) const PLAIN_ROPE: RopeRules = RopeRules {
    partial_rotary: false,
    type_aliases: &[],
    top_level_original_max: None,
};

/// Biases and norms of a family's layers.
pub(crate) struct Layout {
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// RMSNorm of queries and keys.
    pub qk_norm: bool,
    /// The q/k norms span the whole projection rather than each head.
    pub qk_norm_whole: bool,
    /// Where the layers normalise.
    pub norm_placement: NormPlacement,
    /// q, k and v are one projection, `qkv_proj` (Phi-3).
    pub fused_qkv: bool,
    /// gate and up are one projection, `gate_up_proj` (Phi-3).
    pub fused_gate_up: bool,
}

/// The sliding window and the attention of each layer (empty: full attention everywhere).
pub(crate) type Attention = (Option<usize>, Vec<LayerType>);

/// Every family this crate implements.
pub(crate) static FAMILIES: &[&Family] = &[
    &qwen3::FAMILY,
    &qwen2::FAMILY,
    &llama::FAMILY,
    &mistral::FAMILY,
    &ministral::FAMILY,
    &olmo2::FAMILY,
    &smollm3::FAMILY,
    &gemma3::FAMILY,
    &phi3::FAMILY,
    &qwen3_moe::FAMILY,
];

/// The family of `architecture`.
pub(crate) fn of(architecture: Architecture) -> &'static Family {
    match architecture {
        Architecture::Qwen3 => &qwen3::FAMILY,
        Architecture::Qwen2 => &qwen2::FAMILY,
        Architecture::Llama => &llama::FAMILY,
        Architecture::Mistral => &mistral::FAMILY,
        Architecture::Ministral => &ministral::FAMILY,
        Architecture::Olmo2 => &olmo2::FAMILY,
        Architecture::SmolLm3 => &smollm3::FAMILY,
        Architecture::Gemma3 => &gemma3::FAMILY,
        Architecture::Phi3 => &phi3::FAMILY,
        Architecture::Qwen3Moe => &qwen3_moe::FAMILY,
    }
}

/// The family whose `model_type` is `model_type`.
pub(crate) fn by_model_type(model_type: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.model_type == model_type)
}

/// `qwen3, qwen2, …`: the supported `model_type`s, for error messages.
pub(crate) fn supported() -> String {
    FAMILIES
        .iter()
        .map(|f| f.model_type)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Full attention on every layer: `use_sliding_window: true` and any `layer_types` entry but
/// `full_attention` are refused (Qwen2/Qwen3's sliding variant is not implemented; no published
/// checkpoint enables it).
pub(crate) fn full_attention_only(path: &Path, hf: &HfConfig, _layers: usize) -> Result<Attention> {
    if hf.use_sliding_window == Some(true) {
        return Err(ModelError::config(
            path,
            "use_sliding_window",
            "sliding-window attention is not supported; set it to false (every published Qwen2/Qwen3 checkpoint does)",
        ));
    }
    if let Some(types) = &hf.layer_types
        && let Some(bad) = types.iter().find(|t| t.as_str() != "full_attention")
    {
        return Err(ModelError::config(
            path,
            "layer_types",
            format!("layer type `{bad}` is not supported (only full_attention)"),
        ));
    }
    Ok((None, Vec::new()))
}

/// `attention_bias` on q, k, v and o; no MLP bias; no q/k norm.
pub(crate) fn attention_bias_only(hf: &HfConfig) -> Layout {
    let b = hf.attention_bias.unwrap_or(false);
    Layout {
        qkv_bias: b,
        o_bias: b,
        ..NO_BIAS
    }
}

/// No bias anywhere, no q/k norm, pre-norm layers (Mistral, Ministral).
pub(crate) const NO_BIAS: Layout = Layout {
    qkv_bias: false,
    o_bias: false,
    mlp_bias: false,
    qk_norm: false,
    qk_norm_whole: false,
    norm_placement: NormPlacement::Pre,
    fused_qkv: false,
    fused_gate_up: false,
};

/// `hidden_act` `silu` (or `swish`, or absent).
pub(crate) fn silu_only(path: &Path, hf: &HfConfig) -> Result<Activation> {
    match hf.hidden_act.as_deref() {
        None | Some("silu" | "swish") => Ok(Activation::Silu),
        Some(act) => Err(ModelError::config(
            path,
            "hidden_act",
            format!("`{act}` is not supported (only silu)"),
        )),
    }
}

/// Nothing more to set.
pub(crate) fn nothing_more(_: &Path, _: &HfConfig, _: &mut ModelConfig) -> Result<()> {
    Ok(())
}

/// The rotary embedding on every layer.
pub(crate) fn rope_everywhere(_: &Path, _: &HfConfig, _: usize) -> Result<Vec<bool>> {
    Ok(Vec::new())
}

/// `sliding_window` as `transformers`' Mistral-style configurations read it: absent means their
/// default of 4096 tokens, `null` means no window.
pub(crate) fn read_window(path: &Path, hf: &HfConfig) -> Result<Option<usize>> {
    match &hf.sliding_window {
        None => Ok(Some(4096)),
        Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(w) if w >= 1 => Ok(Some(usize::try_from(w).unwrap_or(usize::MAX))),
            _ => Err(ModelError::config(
                path,
                "sliding_window",
                format!("{v} is not a number of tokens (at least 1) or null"),
            )),
        },
    }
}

/// `layer_types` (`full_attention` / `sliding_attention`, one per layer), or `default` for
/// every layer when absent.
pub(crate) fn read_layer_types(
    path: &Path,
    hf: &HfConfig,
    layers: usize,
    default: LayerType,
) -> Result<Vec<LayerType>> {
    let Some(types) = &hf.layer_types else {
        return Ok(vec![default; layers]);
    };
    if types.len() != layers {
        return Err(ModelError::config(
            path,
            "layer_types",
            format!(
                "has {} entries for num_hidden_layers = {layers}",
                types.len()
            ),
        ));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(LayerType::FullAttention),
            "sliding_attention" => Ok(LayerType::SlidingAttention),
            other => Err(ModelError::config(
                path,
                "layer_types",
                format!(
                    "layer type `{other}` is not supported (full_attention, sliding_attention)"
                ),
            )),
        })
        .collect()
}

/// Writes nothing of its own.
pub(crate) fn nothing(_: &ModelConfig, _: &mut Map<String, Value>) {}

/// Writes `attention_bias`.
pub(crate) fn write_attention_bias(c: &ModelConfig, map: &mut Map<String, Value>) {
    map.insert("attention_bias".into(), Value::Bool(c.o_bias));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_and_the_variants_agree() {
        for f in FAMILIES {
            assert!(std::ptr::eq(of(f.architecture), *f), "{}", f.model_type);
            assert!(std::ptr::eq(by_model_type(f.model_type).unwrap(), *f));
        }
        let mut types: Vec<_> = FAMILIES.iter().map(|f| f.model_type).collect();
        types.sort_unstable();
        types.dedup();
        assert_eq!(types.len(), FAMILIES.len());
    }
}
