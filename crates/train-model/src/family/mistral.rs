//! Mistral: Llama's layers without any bias, and sliding-window attention on every layer.
//!
//! `sliding_window` is read as `transformers`' `MistralConfig` reads it: absent means 4096,
//! `null` means full attention (Mistral 7B v0.2 and later); `layer_types` is ignored (it
//! warns and does the same).

use std::path::Path;

use super::{
    Attention, Family, NO_BIAS, PLAIN_ROPE, nothing_more, read_window, rope_everywhere, silu_only,
};
use crate::config::{Architecture, HfConfig, LayerType};
use crate::error::Result;

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Mistral,
    model_type: "mistral",
    hf_class: "MistralForCausalLM",
    default_max_position_embeddings: 4096 * 32,
    default_rms_norm_eps: 1e-6,
    default_tie_word_embeddings: false,
    layout: |_| NO_BIAS,
    attention: every_layer_slides,
    rope_layers: rope_everywhere,
    activation: silu_only,
    rope: PLAIN_ROPE,
    finish: nothing_more,
    write: |c, map| {
        map.insert("sliding_window".into(), serde_json::json!(c.sliding_window));
    },
};

fn every_layer_slides(path: &Path, hf: &HfConfig, layers: usize) -> Result<Attention> {
    let window = read_window(path, hf)?;
    let kind = if window.is_some() {
        LayerType::SlidingAttention
    } else {
        LayerType::FullAttention
    };
    Ok((window, vec![kind; layers]))
}
