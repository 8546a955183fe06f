//! The Hugging Face names and shapes of every tensor of a checkpoint.
//!
//! One table drives loading, saving, random initialisation and gradient reports, so the four
//! can never disagree on a name.

use crate::config::{ModelConfig, NormPlacement};

/// What kind of parameter a tensor is (used to pick an initialiser, and by optimisers to skip
/// weight decay on norms and biases as `transformers.Trainer` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A projection or embedding matrix.
    Matrix,
    /// A projection bias.
    Bias,
    /// An RMSNorm scale.
    Norm,
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Its shape, in Hugging Face layout (`[out, in]` for projections).
    pub shape: Vec<usize>,
    /// What kind of parameter it is.
    pub kind: ParamKind,
}

impl TensorSpec {
    fn new(name: String, shape: Vec<usize>, kind: ParamKind) -> Self {
        Self { name, shape, kind }
    }
}

/// Every tensor a checkpoint of `config` holds, in model order (tied embeddings listed once).
pub fn tensor_specs(config: &ModelConfig) -> Vec<TensorSpec> {
    let h = config.hidden_size;
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let i = config.intermediate_size;
    let mut out = vec![TensorSpec::new(
        "model.embed_tokens.weight".into(),
        vec![config.vocab_size, h],
        ParamKind::Matrix,
    )];
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}");
        let mut proj = |name: &str, out_dim: usize, in_dim: usize, bias: bool| {
            out.push(TensorSpec::new(
                format!("{p}.{name}.weight"),
                vec![out_dim, in_dim],
                ParamKind::Matrix,
            ));
            if bias {
                out.push(TensorSpec::new(
                    format!("{p}.{name}.bias"),
                    vec![out_dim],
                    ParamKind::Bias,
                ));
            }
        };
        if config.fused_qkv {
            proj("self_attn.qkv_proj", q + 2 * kv, h, config.qkv_bias);
        } else {
            proj("self_attn.q_proj", q, h, config.qkv_bias);
            proj("self_attn.k_proj", kv, h, config.qkv_bias);
            proj("self_attn.v_proj", kv, h, config.qkv_bias);
        }
        proj("self_attn.o_proj", h, q, config.o_bias);
        if let Some(moe) = config.moe.as_ref().filter(|_| config.layer_sparse(l)) {
            // The router, then each expert's MLP (the layout of the published checkpoints).
            proj("mlp.gate", moe.num_experts, h, false);
            for e in 0..moe.num_experts {
                let m = moe.intermediate_size;
                proj(&format!("mlp.experts.{e}.gate_proj"), m, h, false);
                proj(&format!("mlp.experts.{e}.up_proj"), m, h, false);
                proj(&format!("mlp.experts.{e}.down_proj"), h, m, false);
            }
        } else {
            if config.fused_gate_up {
                proj("mlp.gate_up_proj", 2 * i, h, config.mlp_bias);
            } else {
                proj("mlp.gate_proj", i, h, config.mlp_bias);
                proj("mlp.up_proj", i, h, config.mlp_bias);
            }
            proj("mlp.down_proj", h, i, config.mlp_bias);
        }
        if config.qk_norm {
            let (qn, kn) = if config.qk_norm_whole {
                (q, kv)
            } else {
                (config.head_dim, config.head_dim)
            };
            out.push(TensorSpec::new(
                format!("{p}.self_attn.q_norm.weight"),
                vec![qn],
                ParamKind::Norm,
            ));
            out.push(TensorSpec::new(
                format!("{p}.self_attn.k_norm.weight"),
                vec![kn],
                ParamKind::Norm,
            ));
        }
        for name in layer_norm_names(config) {
            out.push(TensorSpec::new(
                format!("{p}.{name}.weight"),
                vec![h],
                ParamKind::Norm,
            ));
        }
    }
    out.push(TensorSpec::new(
        "model.norm.weight".into(),
        vec![h],
        ParamKind::Norm,
    ));
    if !config.tie_word_embeddings {
        out.push(TensorSpec::new(
            "lm_head.weight".into(),
            vec![config.vocab_size, h],
            ParamKind::Matrix,
        ));
    }
    out
}

/// The names of a layer's norms (without the layer prefix), in checkpoint order.
pub(crate) fn layer_norm_names(config: &ModelConfig) -> &'static [&'static str] {
    match config.norm_placement {
        NormPlacement::Pre => &["input_layernorm", "post_attention_layernorm"],
        NormPlacement::Post => &["post_attention_layernorm", "post_feedforward_layernorm"],
        NormPlacement::Sandwich => &[
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ],
    }
}
