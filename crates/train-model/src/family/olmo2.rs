//! OLMo 2: no norm before attention or the MLP, one after each (before the residual add:
//! `post_attention_layernorm`, `post_feedforward_layernorm`); RMSNorms of queries and keys over
//! the whole projection (all heads at once), before the rotary embedding; `attention_bias` on
//! q, k, v and o; full attention.
//!
//! `transformers`' `Olmo2RMSNorm` multiplies by the weight before casting back to the input
//! dtype (Llama's casts first): the same in f32, one rounding apart in bf16.

use super::{
    Family, Layout, PLAIN_ROPE, attention_bias_only, full_attention_only, nothing_more,
    rope_everywhere, silu_only, write_attention_bias,
};
use crate::config::{Architecture, NormPlacement};

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Olmo2,
    model_type: "olmo2",
    hf_class: "Olmo2ForCausalLM",
    default_max_position_embeddings: 2048,
    default_rms_norm_eps: 1e-5,
    default_tie_word_embeddings: false,
    layout: |hf| Layout {
        qk_norm: true,
        qk_norm_whole: true,
        norm_placement: NormPlacement::Post,
        ..attention_bias_only(hf)
    },
    attention: full_attention_only,
    rope_layers: rope_everywhere,
    activation: silu_only,
    rope: PLAIN_ROPE,
    finish: nothing_more,
    write: write_attention_bias,
};
