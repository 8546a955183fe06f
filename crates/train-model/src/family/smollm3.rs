//! SmolLM3: Llama's layers (`attention_bias` on q, k, v and o, `mlp_bias`), where some layers
//! apply no rotary embedding (NoPE): `no_rope_layers` holds 1 for a layer with it and 0 for one
//! without; absent, every `no_rope_layer_interval`-th layer (default 4) has none, as
//! `transformers`' `SmolLM3Config` derives it. Sliding windows (`use_sliding_window`, off in
//! every published checkpoint) apply to the NoPE layers only, as `transformers` derives
//! `layer_types` from them.

use std::path::Path;

use serde_json::Value;

use super::{
    Attention, Family, Layout, PLAIN_ROPE, attention_bias_only, nothing_more, read_layer_types,
    silu_only, write_attention_bias,
};
use crate::config::{Architecture, HfConfig, LayerType};
use crate::error::{ModelError, Result};

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::SmolLm3,
    model_type: "smollm3",
    hf_class: "SmolLM3ForCausalLM",
    default_max_position_embeddings: 32768,
    default_rms_norm_eps: 1e-6,
    default_tie_word_embeddings: true,
    layout: |hf| Layout {
        mlp_bias: hf.mlp_bias.unwrap_or(false),
        ..attention_bias_only(hf)
    },
    attention,
    rope_layers,
    activation: silu_only,
    finish: nothing_more,
    rope: PLAIN_ROPE,
    write: |c, map| {
        write_attention_bias(c, map);
        map.insert("mlp_bias".into(), Value::Bool(c.mlp_bias));
        let no_rope: Vec<u8> = (0..c.num_layers)
            .map(|l| u8::from(c.layer_rope(l)))
            .collect();
        map.insert("no_rope_layers".into(), serde_json::json!(no_rope));
        map.insert(
            "use_sliding_window".into(),
            Value::Bool(c.sliding_window.is_some()),
        );
        map.insert("sliding_window".into(), serde_json::json!(c.sliding_window));
        if !c.layer_types.is_empty() {
            map.insert("layer_types".into(), serde_json::json!(c.layer_types));
        }
    },
};

fn rope_layers(path: &Path, hf: &HfConfig, layers: usize) -> Result<Vec<bool>> {
    match &hf.no_rope_layers {
        Some(flags) => {
            if flags.len() != layers {
                return Err(ModelError::config(
                    path,
                    "no_rope_layers",
                    format!(
                        "has {} entries for num_hidden_layers = {layers}",
                        flags.len()
                    ),
                ));
            }
            flags
                .iter()
                .map(|&f| match f {
                    0 => Ok(false),
                    1 => Ok(true),
                    other => Err(ModelError::config(
                        path,
                        "no_rope_layers",
                        format!("entry {other} is neither 0 (no rotary embedding) nor 1"),
                    )),
                })
                .collect()
        }
        None => {
            let interval = hf.no_rope_layer_interval.unwrap_or(4);
            if interval == 0 {
                return Err(ModelError::config(
                    path,
                    "no_rope_layer_interval",
                    "must be at least 1",
                ));
            }
            Ok((0..layers).map(|l| (l + 1) % interval != 0).collect())
        }
    }
}

fn attention(path: &Path, hf: &HfConfig, layers: usize) -> Result<Attention> {
    let window = match (&hf.sliding_window, hf.use_sliding_window) {
        (Some(v), Some(true)) if !v.is_null() => match v.as_u64() {
            Some(w) if w >= 1 => Some(usize::try_from(w).unwrap_or(usize::MAX)),
            _ => {
                return Err(ModelError::config(
                    path,
                    "sliding_window",
                    format!("{v} is not a number of tokens (at least 1) or null"),
                ));
            }
        },
        _ => None,
    };
    let Some(window) = window else {
        // A window applies only with `use_sliding_window`; the layers' types then say nothing.
        return Ok((None, Vec::new()));
    };
    let types = if hf.layer_types.is_some() {
        read_layer_types(path, hf, layers, LayerType::FullAttention)?
    } else {
        let rope = rope_layers(path, hf, layers)?;
        rope.iter()
            .map(|&r| {
                if r {
                    LayerType::FullAttention
                } else {
                    LayerType::SlidingAttention
                }
            })
            .collect()
    };
    Ok((Some(window), types))
}
