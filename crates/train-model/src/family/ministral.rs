//! Ministral: Mistral's layers, each layer's attention given by `layer_types` (sliding or
//! full; every layer slides when it is absent and a window is set), as `transformers`'
//! `MinistralConfig` reads it.

use std::path::Path;

use super::{
    Attention, Family, NO_BIAS, PLAIN_ROPE, nothing_more, read_layer_types, read_window,
    rope_everywhere, silu_only,
};
use crate::config::{Architecture, HfConfig, LayerType};
use crate::error::Result;

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Ministral,
    model_type: "ministral",
    hf_class: "MinistralForCausalLM",
    default_max_position_embeddings: 4096 * 32,
    default_rms_norm_eps: 1e-6,
    default_tie_word_embeddings: false,
    layout: |_| NO_BIAS,
    attention: per_layer,
    rope_layers: rope_everywhere,
    activation: silu_only,
    rope: PLAIN_ROPE,
    finish: nothing_more,
    write: |c, map| {
        map.insert("sliding_window".into(), serde_json::json!(c.sliding_window));
        map.insert("layer_types".into(), serde_json::json!(c.layer_types));
    },
};

fn per_layer(path: &Path, hf: &HfConfig, layers: usize) -> Result<Attention> {
    let window = read_window(path, hf)?;
    let default = if window.is_some() {
        LayerType::SlidingAttention
    } else {
        LayerType::FullAttention
    };
    Ok((window, read_layer_types(path, hf, layers, default)?))
}
