//! Qwen3-MoE (`qwen3_moe`, `Qwen3MoeForCausalLM`): Qwen3's attention (per-head q/k norms,
//! `attention_bias`), with the MLP of most layers replaced by routed experts, as `transformers`'
//! `Qwen3MoeConfig` reads it:
//!
//! - `num_experts` (or `num_local_experts`) experts of width `moe_intermediate_size`, each token
//!   sent to `num_experts_per_tok` of them by a softmax router (`mlp.gate`), their outputs summed
//!   with the top-k probabilities, renormalised when `norm_topk_prob`;
//! - a layer is sparse unless it is in `mlp_only_layers`, when `(layer + 1)` is a multiple of
//!   `decoder_sparse_step` (default 1: every layer); the dense ones keep an MLP of
//!   `intermediate_size`;
//! - with `output_router_logits`, the router's load-balancing loss times
//!   `router_aux_loss_coef` is added to each micro-batch's training loss, as `transformers`
//!   adds it (`CausalLm::forward_hidden_with_router_loss`).
//!
//! Each expert is stored as `mlp.experts.<e>.{gate,up,down}_proj.weight`, as the published
//! checkpoints (and `transformers`' `save_pretrained`) write them.

use std::path::Path;

use serde_json::Value;

use super::{
    Family, Layout, PLAIN_ROPE, attention_bias_only, full_attention_only, rope_everywhere,
    silu_only, write_attention_bias,
};
use crate::config::{Architecture, HfConfig, ModelConfig, MoeConfig};
use crate::error::{ModelError, Result};

pub(super) static FAMILY: Family = Family {
    architecture: Architecture::Qwen3Moe,
    model_type: "qwen3_moe",
    hf_class: "Qwen3MoeForCausalLM",
    default_max_position_embeddings: 32768,
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
    finish,
    write: |c, map| {
        write_attention_bias(c, map);
        if let Some(m) = &c.moe {
            let dense: Vec<usize> = (0..c.num_layers)
                .filter(|&l| !m.sparse_layers.get(l).copied().unwrap_or(false))
                .collect();
            for (k, v) in [
                ("num_experts", Value::from(m.num_experts)),
                ("num_experts_per_tok", Value::from(m.top_k)),
                ("moe_intermediate_size", Value::from(m.intermediate_size)),
                ("norm_topk_prob", Value::Bool(m.norm_topk_prob)),
                ("decoder_sparse_step", Value::from(1)),
                ("mlp_only_layers", serde_json::json!(dense)),
                ("router_aux_loss_coef", Value::from(m.router_aux_loss_coef)),
                ("output_router_logits", Value::Bool(m.output_router_logits)),
            ] {
                map.insert(k.into(), v);
            }
        }
    },
};

/// Largest number of experts (published models have at most a few hundred).
const MAX_EXPERTS: usize = 1 << 12;

fn finish(path: &Path, hf: &HfConfig, c: &mut ModelConfig) -> Result<()> {
    let num_experts = hf.num_experts.or(hf.num_local_experts).unwrap_or(128);
    if num_experts > MAX_EXPERTS {
        return Err(ModelError::config(
            path,
            "num_experts",
            format!("{num_experts} is more than any supported model (at most {MAX_EXPERTS})"),
        ));
    }
    let top_k = hf.num_experts_per_tok.unwrap_or(8);
    if num_experts > 0 && !(1..=num_experts).contains(&top_k) {
        return Err(ModelError::config(
            path,
            "num_experts_per_tok",
            format!("{top_k} must be between 1 and num_experts ({num_experts})"),
        ));
    }
    let intermediate_size = hf.moe_intermediate_size.unwrap_or(768);
    if intermediate_size == 0 || intermediate_size > 1 << 20 {
        return Err(ModelError::config(
            path,
            "moe_intermediate_size",
            format!("{intermediate_size} must be between 1 and 2^20"),
        ));
    }
    let step = hf.decoder_sparse_step.unwrap_or(1);
    if step == 0 {
        return Err(ModelError::config(
            path,
            "decoder_sparse_step",
            "must be at least 1",
        ));
    }
    let dense = hf.mlp_only_layers.clone().unwrap_or_default();
    let sparse_layers: Vec<bool> = (0..c.num_layers)
        .map(|l| !dense.contains(&l) && num_experts > 0 && (l + 1) % step == 0)
        .collect();
    let router_aux_loss_coef = hf.router_aux_loss_coef.unwrap_or(0.001);
    if !router_aux_loss_coef.is_finite() || router_aux_loss_coef < 0.0 {
        return Err(ModelError::config(
            path,
            "router_aux_loss_coef",
            format!("{router_aux_loss_coef} must be a number of at least 0"),
        ));
    }
    let output_router_logits = hf.output_router_logits.unwrap_or(false);
    c.moe = Some(MoeConfig {
        num_experts,
        top_k,
        intermediate_size,
        norm_topk_prob: hf.norm_topk_prob.unwrap_or(false),
        sparse_layers,
        router_aux_loss_coef,
        output_router_logits,
    });
    Ok(())
}
