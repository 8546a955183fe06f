//! Shared setup of the criterion benchmarks (see `model.rs`).

use std::path::Path;

use train_model::{ModelConfig, ModelError};

/// A Qwen3-shaped configuration of roughly `layers` × 1.2 M parameters (hidden 256), for
/// benchmarks that need more than the tiny fixtures but must stay quick on two CPU cores.
pub fn bench_config(layers: usize) -> Result<ModelConfig, ModelError> {
    let json = serde_json::json!({
        "model_type": "qwen3", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 32, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true
    });
    ModelConfig::from_json(Path::new("bench-config.json"), &json)
}
