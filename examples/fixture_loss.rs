//! Loads the tiny Qwen3 checkpoint that ships in the repository and prints its loss on a
//! shipped conversation (token ids and assistant-only labels recorded by the fixture script).
//!
//! ```sh
//! cargo run --release -p train-examples --example fixture_loss [-- MODEL_DIR]
//! ```

use std::path::PathBuf;

use anyhow::Context;
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use train_model::{LoadOptions, ModelInput, causal_lm_nll, load_pretrained};

fn main() -> anyhow::Result<()> {
    let fixtures =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crates/train-model/tests/fixtures");
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| fixtures.join("qwen3"), PathBuf::from);
    let device = Default::default();
    let model = load_pretrained::<Flex>(&dir, &LoadOptions::default(), &device)
        .with_context(|| format!("loading {}", dir.display()))?;
    println!(
        "{}: {} layers, hidden {}, {} parameters, stored as {}",
        dir.display(),
        model.config.num_layers,
        model.config.hidden_size,
        model.config.num_parameters(),
        model.source_dtype
    );

    // The conversation the fixture script rendered with the model's own chat template.
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures.join("qwen3.reference.json"),
    )?)?;
    let rows = read_ids(&fixtures.join("qwen3.reference.safetensors"), "input_ids")?;
    let labels = read_ids(&fixtures.join("qwen3.reference.safetensors"), "labels")?;
    let first = &meta["conversations"][0];
    println!("conversation: {}", serde_json::to_string(first)?);

    let input = ModelInput::from_rows(&[rows[0].iter().map(|&t| t as u32).collect()], &device)?;
    let labels = Tensor::<Flex, 2, Int>::from_data(
        TensorData::new(labels[0].clone(), [1, labels[0].len()]),
        &device,
    );
    let (sum, count) = causal_lm_nll(model.model.forward(&input), labels);
    let (sum, count): (f32, f32) = (sum.into_scalar(), count.into_scalar());
    println!(
        "loss {:.6} over {} assistant tokens",
        sum / count,
        count as u64
    );
    Ok(())
}

fn read_ids(path: &std::path::Path, name: &str) -> anyhow::Result<Vec<Vec<i64>>> {
    let file = train_model::SafetensorsFile::open(path)?;
    let (_, entry) = file
        .entries()
        .find(|(n, _)| *n == name)
        .context("tensor not found")?;
    let bytes = file.bytes(name).context("tensor bytes")?;
    let values: Vec<i64> = bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    Ok(values.chunks(entry.shape[1]).map(<[i64]>::to_vec).collect())
}
