//! Qwen3: GQA, an RMSNorm on queries and keys per head, optional attention biases.

use super::{
    Family, Layout, PLAIN_ROPE, attention_bias_only, full_attention_only, nothing_more,
    rope_everywhere, silu_only, write_attention_bias,
};
use crate::config::Architecture;

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Qwen3,
    model_type: "qwen3",
    hf_class: "Qwen3ForCausalLM",
    default_max_position_embeddings: 2048,
    default_rms_norm_eps: 1e-6,
    default_tie_word_embeddings: false,
    layout: |hf| Layout {
        qk_norm: true,
        ..attention_bias_only(hf)
    },
    attention: full_attention_only,
    rope_layers: rope_everywhere,
    activation: silu_only,
    rope: PLAIN_ROPE,
    finish: nothing_more,
    write: write_attention_bias,
};
