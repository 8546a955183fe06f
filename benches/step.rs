//! The optimizer step on the cpu backend: AdamW (with the global gradient norm used for
//! clipping) over every parameter of a Qwen3-shaped model of ~10M parameters.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::DType;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use train_benches::qwen3_config;
use train_model::{CausalLm, ModelInput, causal_lm_nll};
use train_runner::{AdamW, AdamWConfig, ParamTable, global_grad_norm};

type Ad = Autodiff<Flex>;

fn bench(c: &mut Criterion) {
    let device = Default::default();
    let cfg = qwen3_config(8192, 384, 1024, 4, 6, 2, 64).unwrap();
    let model = CausalLm::<Ad>::random(&cfg, 0.02, 0, DType::F32, &device).unwrap();
    let ids: Vec<Vec<u32>> = vec![(0..64).collect()];
    let input = ModelInput::from_rows(&ids, &device).unwrap();
    let gradients = || {
        let (sum, _) = causal_lm_nll(model.forward(&input), input.input_ids.clone());
        GradientsParams::from_grads(sum.backward(), &model)
    };
    let table = ParamTable::new(&model);
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.01,
    };
    let mut g = c.benchmark_group("optimizer");
    g.bench_function(
        format!(
            "adamw_step_and_grad_norm_{}_parameters",
            cfg.num_parameters()
        ),
        |b| {
            // The optimizer and its state persist across iterations; the gradients (ids are
            // stable across updates) are computed outside the timed part.
            let mut optimizer = AdamW::<Ad>::new(config);
            let mut current = model.clone();
            b.iter_batched(
                gradients,
                |grads| {
                    let norm = global_grad_norm(&current, &grads);
                    current =
                        optimizer.step(current.clone(), &table, grads, 1e-4, 1.0 / norm.max(1.0));
                    current.valid().layers.len()
                },
                BatchSize::PerIteration,
            );
        },
    );
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench
}
criterion_main!(benches);
