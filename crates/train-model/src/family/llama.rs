//! Llama 2/3 and the models that reuse it (SmolLM2): `attention_bias` and `mlp_bias` as
//! configured.

use super::{Family, Layout, attention_bias_only, full_attention_only, write_attention_bias};
use crate::config::Architecture;

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Llama,
    model_type: "llama",
    hf_class: "LlamaForCausalLM",
    default_max_position_embeddings: 2048,
    layout: |hf| Layout {
        mlp_bias: hf.mlp_bias.unwrap_or(false),
        ..attention_bias_only(hf)
    },
    attention: full_attention_only,
    write: |c, map| {
        write_attention_bias(c, map);
        map.insert("mlp_bias".into(), serde_json::Value::Bool(c.mlp_bias));
    },
};
