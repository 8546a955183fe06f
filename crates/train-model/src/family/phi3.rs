//! Phi-3 and Phi-4-mini (`phi3`, `Phi3ForCausalLM`), as `transformers`' `Phi3Config` reads it:
//!
//! - Llama's pre-norm layers without any bias, with the q, k and v projections fused into one
//!   `qkv_proj` (rows: queries, keys, values) and gate and up into one `gate_up_proj` (rows:
//!   gate, up), loaded and saved in that layout;
//! - a partial rotary embedding (`partial_rotary_factor`, in `rope_parameters` or at the top
//!   level: Phi-4-mini rotates 3/4 of each head);
//! - LongRoPE (`rope_scaling` of type `longrope`, or its older names `su` and `yarn`), whose
//!   pre-training context is the top-level `original_max_position_embeddings` (default 4096),
//!   which wins over one inside the rotary parameters;
//! - `sliding_window` on every layer when set (Phi-3-mini-4k: 2047), none when absent or null.

use std::path::Path;

use serde_json::Value;

use super::{
    Attention, Family, Layout, NO_BIAS, RopeRules, nothing_more, rope_everywhere, silu_only,
};
use crate::config::{Architecture, HfConfig, LayerType};
use crate::error::{ModelError, Result};
use crate::rope::RopeScaling;

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Phi3,
    model_type: "phi3",
    hf_class: "Phi3ForCausalLM",
    default_max_position_embeddings: 4096,
    default_rms_norm_eps: 1e-5,
    default_tie_word_embeddings: false,
    layout: |_| Layout {
        fused_qkv: true,
        fused_gate_up: true,
        ..NO_BIAS
    },
    attention,
    rope_layers: rope_everywhere,
    activation: silu_only,
    rope: RopeRules {
        partial_rotary: true,
        type_aliases: &[("su", "longrope"), ("yarn", "longrope")],
        top_level_original_max: Some(4096),
    },
    finish: nothing_more,
    write: |c, map| {
        map.insert("sliding_window".into(), serde_json::json!(c.sliding_window));
        if c.rope.head_dim != c.head_dim {
            // A factor that `int(head_dim * factor)` turns back into the rotated width.
            let mut factor = c.rope.head_dim as f64 / c.head_dim as f64;
            if ((c.head_dim as f64 * factor) as usize) < c.rope.head_dim {
                factor = factor.next_up();
            }
            map.insert("partial_rotary_factor".into(), Value::from(factor));
        }
        if let RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } = c.rope.scaling
        {
            map.insert(
                "original_max_position_embeddings".into(),
                Value::from(original_max_position_embeddings as u64),
            );
        }
    },
};

/// A window on every layer when `sliding_window` is a number; full attention when it is
/// absent or null (`Phi3Config`'s default).
fn attention(path: &Path, hf: &HfConfig, layers: usize) -> Result<Attention> {
    match &hf.sliding_window {
        None | Some(Value::Null) => Ok((None, Vec::new())),
        Some(v) => match v.as_u64() {
            Some(w) if w >= 1 => Ok((
                Some(usize::try_from(w).unwrap_or(usize::MAX)),
                vec![LayerType::SlidingAttention; layers],
            )),
            _ => Err(ModelError::config(
                path,
                "sliding_window",
                format!("{v} is not a number of tokens (at least 1) or null"),
            )),
        },
    }
}
