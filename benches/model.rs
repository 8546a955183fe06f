//! Hot paths of the model: forward, forward + backward, and the loss, on a Qwen3-shaped model
//! with random weights (CPU backend).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Int, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use train_model::{CausalLm, ModelInput, causal_lm_loss};

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

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = forward, forward_backward, loss
}
criterion_main!(benches);
