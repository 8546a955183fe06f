//! Llama 2/3 and the models that reuse it (SmolLM2): `attention_bias` and `mlp_bias` as
//! configured.

use super::{
    Family, Layout, PLAIN_ROPE, attention_bias_only, full_attention_only, nothing_more,
    rope_everywhere, silu_only, write_attention_bias,
};
use crate::config::Architecture;

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Llama,
    model_type: "llama",
    hf_class: "LlamaForCausalLM",
    default_max_position_embeddings: 2048,
    default_rms_norm_eps: 1e-6,
    default_tie_word_embeddings: false,
    layout: |hf| Layout {
        mlp_bias: hf.mlp_bias.unwrap_or(false),
        ..attention_bias_only(hf)
    },
    attention: full_attention_only,
    rope_layers: rope_everywhere,
    activation: silu_only,
    rope: PLAIN_ROPE,
    finish: nothing_more,
    write: |c, map| {
        write_attention_bias(c, map);
        map.insert("mlp_bias".into(), serde_json::Value::Bool(c.mlp_bias));
    },
};
