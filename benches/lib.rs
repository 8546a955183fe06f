//! Shared setup of the criterion benchmarks (see `model.rs` and `step.rs`).

use std::path::Path;

use train_model::{ModelConfig, ModelError};

/// A Qwen3-shaped configuration of roughly `layers` × 1.2 M parameters (hidden 256), for
/// benchmarks that need more than the tiny fixtures but must stay quick on two CPU cores.
pub fn bench_config(layers: usize) -> Result<ModelConfig, ModelError> {
    qwen3_config(4096, 256, 768, layers, 8, 4, 32)
}

/// A Qwen3-shaped configuration (random weights only need the shape).
pub fn qwen3_config(
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<ModelConfig, ModelError> {
    let json = serde_json::json!({
        "model_type": "qwen3", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true
    });
    ModelConfig::from_json(Path::new("bench-config.json"), &json)
}

/// `batch` rows of `seq` deterministic token ids below `vocab`.
pub fn token_rows(batch: usize, seq: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|r| {
            (0..seq)
                .map(|t| ((r * 7919 + t * 104_729 + 17) % vocab) as u32)
                .collect()
        })
        .collect()
}
