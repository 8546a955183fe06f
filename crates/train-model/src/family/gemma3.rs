//! Gemma 3's text decoder (`gemma3_text`, `Gemma3ForCausalLM`), as `transformers`' `Gemma3TextConfig`
//! reads it:
//!
//! - sliding and global layers: `layer_types`, or every `sliding_window_pattern`-th layer
//!   (default 6) global; `sliding_window` default 4096;
//! - the global layers' rotary embedding (`rope_parameters.full_attention`, or `rope_theta` /
//!   `rope_scaling`) and the sliding layers' own (`rope_parameters.sliding_attention`, or
//!   `rope_local_base_freq`, default 10 000);
//! - four RMSNorms per layer (before and after attention, before and after the MLP), each
//!   scaling by `1 + weight`, as do the final norm and the per-head q/k norms;
//! - a GeGLU MLP (`hidden_activation` `gelu_pytorch_tanh`), embeddings multiplied by √hidden,
//!   the attention scaled by `query_pre_attn_scalar^-0.5`, tied embeddings by default.
//!
//! Gemma 2's soft-capping (`final_logit_softcapping`, `attn_logit_softcapping`) and the
//! bidirectional variant (`use_bidirectional_attention`) are refused, as are multimodal
//! `gemma3` checkpoints (`Gemma3ForConditionalGeneration`).

use std::path::Path;

use serde_json::Value;

use super::{
    Attention, Family, Layout, PLAIN_ROPE, attention_bias_only, read_layer_types, rope_everywhere,
};
use crate::config::{
    Activation, Architecture, HfConfig, LayerType, ModelConfig, NormPlacement, RopeLayers,
    parse_rope,
};
use crate::error::{ModelError, Result};

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Gemma3,
    model_type: "gemma3_text",
    hf_class: "Gemma3ForCausalLM",
    default_max_position_embeddings: 131_072,
    default_rms_norm_eps: 1e-6,
    default_tie_word_embeddings: true,
    layout: |hf| Layout {
        qk_norm: true,
        norm_placement: NormPlacement::Sandwich,
        ..attention_bias_only(hf)
    },
    attention,
    rope_layers: rope_everywhere,
    activation,
    finish,
    rope: PLAIN_ROPE,
    write: |c, map| {
        map.insert("attention_bias".into(), Value::Bool(c.o_bias));
        map.remove("hidden_act");
        map.insert("hidden_activation".into(), Value::from("gelu_pytorch_tanh"));
        map.insert(
            "query_pre_attn_scalar".into(),
            serde_json::json!(c.query_pre_attn_scalar),
        );
        if let Some(local) = &c.rope_local {
            map.insert(
                "rope_local_base_freq".into(),
                serde_json::json!(local.theta),
            );
        }
        map.insert("sliding_window".into(), serde_json::json!(c.sliding_window));
        map.insert("layer_types".into(), serde_json::json!(c.layer_types));
    },
};

fn activation(path: &Path, hf: &HfConfig) -> Result<Activation> {
    let (field, value) = match (&hf.hidden_activation, &hf.hidden_act) {
        (Some(a), _) => ("hidden_activation", a.as_str()),
        (None, Some(a)) => ("hidden_act", a.as_str()),
        (None, None) => return Ok(Activation::GeluTanh),
    };
    match value {
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Activation::GeluTanh),
        other => Err(ModelError::config(
            path,
            field,
            format!("`{other}` is not supported (only gelu_pytorch_tanh)"),
        )),
    }
}

fn attention(path: &Path, hf: &HfConfig, layers: usize) -> Result<Attention> {
    let window = match &hf.sliding_window {
        None => Some(4096),
        Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(w) if w >= 1 => Some(usize::try_from(w).unwrap_or(usize::MAX)),
            _ => {
                return Err(ModelError::config(
                    path,
                    "sliding_window",
                    format!("{v} is not a number of tokens (at least 1) or null"),
                ));
            }
        },
    };
    let types = if hf.layer_types.is_some() {
        read_layer_types(path, hf, layers, LayerType::FullAttention)?
    } else {
        let pattern = hf
            .sliding_window_pattern
            .or(hf.sliding_window_pattern_private)
            .unwrap_or(6);
        if pattern == 0 {
            return Err(ModelError::config(
                path,
                "sliding_window_pattern",
                "must be at least 1",
            ));
        }
        (0..layers)
            .map(|l| {
                if (l + 1) % pattern == 0 {
                    LayerType::FullAttention
                } else {
                    LayerType::SlidingAttention
                }
            })
            .collect()
    };
    Ok((window, types))
}

fn finish(path: &Path, hf: &HfConfig, c: &mut ModelConfig) -> Result<()> {
    for (field, value) in [
        ("final_logit_softcapping", &hf.final_logit_softcapping),
        ("attn_logit_softcapping", &hf.attn_logit_softcapping),
    ] {
        if let Some(v) = value
            && !v.is_null()
        {
            return Err(ModelError::config(
                path,
                field,
                format!("soft-capping ({v}) is not supported (Gemma 3 has none; set it to null)"),
            ));
        }
    }
    if hf.use_bidirectional_attention == Some(true) {
        return Err(ModelError::config(
            path,
            "use_bidirectional_attention",
            "bidirectional attention is not supported (only the causal decoder)",
        ));
    }
    let scalar = hf.query_pre_attn_scalar.unwrap_or(256.0);
    if !(scalar > 0.0 && scalar.is_finite()) {
        return Err(ModelError::config(
            path,
            "query_pre_attn_scalar",
            format!("{scalar} must be a positive number"),
        ));
    }
    c.query_pre_attn_scalar = Some(scalar);
    c.norm_offset = 1.0;
    c.embedding_scale = Some((c.hidden_size as f64).sqrt());
    let local = parse_rope(
        path,
        hf,
        c.head_dim,
        c.max_position_embeddings,
        RopeLayers::Local,
        &PLAIN_ROPE,
    )?;
    c.rope_local = Some(local);
    Ok(())
}
