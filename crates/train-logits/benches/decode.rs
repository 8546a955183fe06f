//! Decode speed: greedy generation with the KV cache on the shipped tiny Qwen3 (cpu backend).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use burn::backend::Flex;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use train_logits::{GenerationConfig, generate};
use train_model::{LoadOptions, load_pretrained};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../train-model/tests/fixtures/qwen3")
}

fn bench(c: &mut Criterion) {
    let device = Default::default();
    let loaded = load_pretrained::<Flex>(&fixture(), &LoadOptions::default(), &device).unwrap();
    let model = loaded.model;
    let prompts = vec![(1..33).collect::<Vec<u32>>(); 1];
    let config = GenerationConfig {
        max_new_tokens: 64,
        ..GenerationConfig::default()
    };
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(64));
    g.bench_function("tiny_qwen3_greedy_64_tokens", |b| {
        b.iter(|| generate(&model, None, &prompts, &mut [], &config));
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
