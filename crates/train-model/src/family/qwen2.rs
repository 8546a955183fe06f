//! Qwen2 / Qwen2.5: GQA with biases on the q, k and v projections (always, whatever the
//! configuration says, as `transformers`' `Qwen2Attention`).

use super::{
    Family, Layout, NO_BIAS, PLAIN_ROPE, full_attention_only, nothing, nothing_more,
    rope_everywhere, silu_only,
};
use crate::config::Architecture;

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Qwen2,
    model_type: "qwen2",
    hf_class: "Qwen2ForCausalLM",
    default_max_position_embeddings: 2048,
    default_rms_norm_eps: 1e-6,
    default_tie_word_embeddings: false,
    layout: |_| Layout {
        qkv_bias: true,
        ..NO_BIAS
    },
    attention: full_attention_only,
    rope_layers: rope_everywhere,
    activation: silu_only,
    rope: PLAIN_ROPE,
    finish: nothing_more,
    write: nothing,
};
