//! LoRA through the libraries, on two data-parallel workers: adapters on every projection of the
//! frozen tiny Qwen3, trained by two CPU workers whose gradients burn's collective engine sums,
//! saved as a PEFT adapter directory, loaded back (base + adapter) and merged into a plain model.
//!
//! ```sh
//! cargo run --release -p train-examples --example lora [-- OUTPUT_DIR]
//! ```

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use train_data::{ChatTokenizer, DatasetConfig, prepare};
use train_model::{LoadOptions, LoraConfig, SaveOptions, load_pretrained, save_pretrained};
use train_runner::{Observers, Parallelism, RunControl, TrainSetup, TrainerConfig, run};

type Backend = Autodiff<Flex>;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model_dir = root.join("crates/train-model/tests/fixtures/qwen3");
    let output = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join(format!("train-rs-lora-{}", std::process::id())),
        PathBuf::from,
    );
    let tokenizer = ChatTokenizer::from_model_dir(&model_dir)?;
    let data = DatasetConfig {
        dataset_path: root.join("crates/train-data/tests/fixtures/sample.jsonl"),
        max_length: 512,
        ..DatasetConfig::default()
    };
    let prepared = prepare(&data, &tokenizer, None)?;

    let device = Default::default();
    let source = load_pretrained::<Backend>(&model_dir, &LoadOptions::default(), &device)?;
    let config = TrainerConfig {
        output_dir: output.join("adapter"),
        batch_size: 4,
        learning_rate: 5e-3,
        max_steps: Some(6),
        eval_steps: 6,
        lora: Some(LoraConfig {
            r: 8,
            alpha: 16.0,
            target_modules: vec!["all-linear".into()],
            ..LoraConfig::default()
        }),
        ..TrainerConfig::default()
    };
    let mut setup = TrainSetup::new(
        source,
        prepared.rows,
        prepared.validation,
        tokenizer.pad_id(),
        config,
    );
    // Two data-parallel CPU workers: global batch 4 × 2.
    setup.parallelism = Parallelism::new(vec![device; 2], None)?;
    let summary = run(setup, None, &mut Observers::default(), &RunControl::new())?;
    println!(
        "{:?} after {} steps on 2 workers: train loss {:.3}, eval loss {:.3}",
        summary.status,
        summary.global_step,
        summary.train_loss.unwrap_or(f64::NAN),
        summary.eval_loss.unwrap_or(f64::NAN),
    );

    // The output is a PEFT adapter directory; loading it brings its base model along.
    let adapter =
        load_pretrained::<Flex>(&output.join("adapter"), &LoadOptions::default(), &device)?;
    println!(
        "adapter {}: {} weights on {} (base {})",
        output.join("adapter").display(),
        adapter.model.num_adapter_parameters(),
        adapter.config.architecture.model_type(),
        adapter.dir.display()
    );
    let merged = adapter.model.merge_lora();
    let options = SaveOptions {
        companions_from: Some(adapter.dir.clone()),
        ..SaveOptions::default()
    };
    save_pretrained(
        &merged,
        Some(&adapter.raw_config),
        &output.join("merged"),
        &options,
    )?;
    println!("merged model in {}", output.join("merged").display());
    Ok(())
}
