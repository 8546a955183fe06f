//! Qwen2 / Qwen2.5: GQA with biases on the q, k and v projections (always, whatever the
//! configuration says, as `transformers`' `Qwen2Attention`).

use super::{Family, Layout, full_attention_only, nothing};
use crate::config::Architecture;

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Qwen2,
    model_type: "qwen2",
    hf_class: "Qwen2ForCausalLM",
    default_max_position_embeddings: 2048,
    layout: |_| Layout {
        qkv_bias: true,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
    },
    attention: full_attention_only,
    write: nothing,
};
