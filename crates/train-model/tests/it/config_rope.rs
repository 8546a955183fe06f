//! `config.json` parsing of the fixtures and RoPE frequencies against `transformers`.

use std::path::Path;

use crate::common::fixtures;
use train_model::RopeScaling;
use train_model::{Architecture, ModelConfig, StorageDtype};

#[test]
fn fixture_configs_parse() {
    let (q3, _) = ModelConfig::from_file(&fixtures().join("qwen3/config.json")).unwrap();
    assert_eq!(q3.architecture, Architecture::Qwen3);
    assert_eq!((q3.head_dim, q3.num_heads, q3.num_kv_heads), (32, 4, 2));
    assert!(q3.qk_norm && q3.tie_word_embeddings);
    assert_eq!(q3.torch_dtype, StorageDtype::Bf16);
    let (q2, _) = ModelConfig::from_file(&fixtures().join("qwen2/config.json")).unwrap();
    assert_eq!(q2.head_dim, 16);
    assert!(q2.qkv_bias && !q2.o_bias);
    let (l, _) = ModelConfig::from_file(&fixtures().join("llama/config.json")).unwrap();
    assert!(!l.tie_word_embeddings);
    assert_eq!(l.torch_dtype, StorageDtype::F16);
    assert!(matches!(l.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
}

#[test]
fn rope_frequencies_match_transformers() {
    let text = std::fs::read_to_string(fixtures().join("rope.reference.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let config = ModelConfig::from_json(Path::new("config.json"), &case["config"]).unwrap();
        let (inv, scale) = config.rope.inv_freq();
        let expected: Vec<f64> = case["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(inv.len(), expected.len());
        for (i, (a, b)) in inv.iter().zip(&expected).enumerate() {
            let rel = (f64::from(*a) - b).abs() / b.abs();
            assert!(
                rel <= 1e-6,
                "{:?}: inv_freq[{i}] {a} vs {b}",
                config.rope.scaling
            );
        }
        let want = case["attention_scaling"].as_f64().unwrap();
        assert!(
            (f64::from(scale) - want).abs() <= 1e-6,
            "{:?}: scale {scale} vs {want}",
            config.rope.scaling
        );
    }
}
