//! Qwen3: GQA, an RMSNorm on queries and keys per head, optional attention biases.

use super::{Family, Layout, attention_bias_only, full_attention_only, write_attention_bias};
use crate::config::Architecture;

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Qwen3,
    model_type: "qwen3",
    hf_class: "Qwen3ForCausalLM",
    default_max_position_embeddings: 2048,
    layout: |hf| Layout {
        qk_norm: true,
        ..attention_bias_only(hf)
    },
    attention: full_attention_only,
    write: write_attention_bias,
};
