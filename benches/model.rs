//! Hot paths of the model: forward, forward + backward, one decoder layer, attention and the
//! loss, on Qwen3-shaped models with random weights (CPU backend).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use train_benches::{qwen3_config, token_rows};
use train_model::{AttentionMask, scaled_dot_product};
use train_model::{CausalLm, ModelInput, causal_lm_loss, causal_lm_nll};

type B = Flex;

fn inputs(seq: usize, vocab: usize) -> (Vec<Vec<u32>>, Vec<i64>) {
    let row: Vec<u32> = (0..seq as u32)
        .map(|i| (i * 2654435761u32.wrapping_mul(i + 1)) % vocab as u32)
        .collect();
    let labels = row.iter().map(|&t| i64::from(t)).collect();
    (vec![row], labels)
}

fn forward(c: &mut Criterion) {
    let config = train_bench_config();
    let device = Default::default();
    let model = CausalLm::<B>::random(&config, 0.02, 1, DType::F32, &device).unwrap();
    let (rows, _) = inputs(256, config.vocab_size);
    let input = ModelInput::from_rows(&rows, &device).unwrap();
    c.bench_function("forward 2 layers x 256 tokens", |b| {
        b.iter(|| model.forward(&input).into_data());
    });
}

fn forward_backward(c: &mut Criterion) {
    let config = train_bench_config();
    let device = Default::default();
    let model = CausalLm::<Autodiff<B>>::random(&config, 0.02, 1, DType::F32, &device).unwrap();
    let (rows, labels) = inputs(256, config.vocab_size);
    let input = ModelInput::from_rows(&rows, &device).unwrap();
    let labels =
        Tensor::<Autodiff<B>, 2, Int>::from_data(TensorData::new(labels, [1, 256]), &device);
    c.bench_function("forward+backward 2 layers x 256 tokens", |b| {
        b.iter(|| {
            let loss = causal_lm_loss(model.forward(&input), labels.clone());
            loss.backward()
        });
    });
}

fn loss(c: &mut Criterion) {
    let device = Default::default();
    let logits = Tensor::<B, 3>::random(
        [1, 512, 4096],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let labels = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            (0..512)
                .map(|i| i64::from(i * 7 % 4096))
                .collect::<Vec<_>>(),
            [1, 512],
        ),
        &device,
    );
    c.bench_function("loss 512 tokens x 4096 vocab", |b| {
        b.iter(|| causal_lm_loss(logits.clone(), labels.clone()).into_scalar());
    });
}

fn train_bench_config() -> train_model::ModelConfig {
    train_benches::bench_config(2).unwrap()
}

/// Forward + backward of one decoder layer: a one-layer model with a 256-token vocabulary,
/// so that the layer (hidden 384, MLP 1024, 6 heads of 64) dominates.
fn layer(c: &mut Criterion) {
    let config = qwen3_config(256, 384, 1024, 1, 6, 2, 64).unwrap();
    let device = Default::default();
    let model = CausalLm::<Autodiff<B>>::random(&config, 0.02, 1, DType::F32, &device).unwrap();
    let input = ModelInput::from_rows(&token_rows(2, 512, 256), &device).unwrap();
    let labels = input.input_ids.clone();
    let mut g = c.benchmark_group("layer");
    g.throughput(Throughput::Elements(2 * 512));
    g.bench_function("forward+backward one layer h384 2x512", |b| {
        b.iter(|| {
            let (sum, _) = causal_lm_nll(model.forward(&input), labels.clone());
            sum.backward()
        });
    });
    g.finish();
}

/// Causal attention alone, the standard path (matmul, f32 softmax, matmul) and the backend's
/// fused kernel.
fn attention(c: &mut Criterion) {
    let device = Default::default();
    let qkv = || Tensor::<B, 4>::random([2, 6, 512, 64], Distribution::Normal(0.0, 1.0), &device);
    let (q, k, v) = (qkv(), qkv(), qkv());
    let mut g = c.benchmark_group("attention");
    for (name, fused) in [("standard", false), ("fused", true)] {
        g.bench_function(format!("causal {name} 2x6x512x64"), |b| {
            b.iter(|| {
                let mask = AttentionMask::causal();
                scaled_dot_product(q.clone(), k.clone(), v.clone(), &mask, fused).into_data()
            });
        });
    }
    g.finish();
}

/// The loss and its backward over SmolLM2's vocabulary size (the full-vocabulary logits).
fn loss_backward(c: &mut Criterion) {
    let device = Default::default();
    let (seq, vocab) = (512, 49_152);
    let logits =
        Tensor::<Autodiff<B>, 3>::random([1, seq, vocab], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
    let labels = Tensor::<Autodiff<B>, 2, Int>::from_data(
        TensorData::new(
            token_rows(1, seq, vocab)
                .concat()
                .into_iter()
                .map(i64::from)
                .collect::<Vec<_>>(),
            [1, seq],
        ),
        &device,
    );
    let mut g = c.benchmark_group("loss");
    g.throughput(Throughput::Elements(seq as u64));
    g.bench_function("forward+backward 512 tokens x 49152 vocab", |b| {
        b.iter(|| {
            let (sum, _) = causal_lm_nll(logits.clone(), labels.clone());
            sum.backward()
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = forward, forward_backward, loss, layer, attention, loss_backward
}
criterion_main!(benches);
