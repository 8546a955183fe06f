//! Loads a Hugging Face model directory and saves it again (optionally in another dtype or in
//! shards): the library path of "load, train, save", minus the training.
//!
//! ```sh
//! cargo run --release -p train-examples --example resave -- SRC_DIR OUT_DIR [f32|bf16|f16] [MAX_SHARD_BYTES]
//! ```

use std::path::PathBuf;

use anyhow::{Context, bail};
use burn::backend::Flex;
use train_model::{LoadOptions, SaveOptions, StorageDtype, load_pretrained};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, out, rest @ ..] = args.as_slice() else {
        bail!("usage: resave SRC_DIR OUT_DIR [f32|bf16|f16] [MAX_SHARD_BYTES]");
    };
    let dtype = match rest.first() {
        Some(d) => Some(StorageDtype::parse(d).with_context(|| format!("unknown dtype `{d}`"))?),
        None => None,
    };
    let max_shard_bytes = rest
        .get(1)
        .map(|s| s.parse::<u64>())
        .transpose()
        .context("MAX_SHARD_BYTES")?;
    let device = Default::default();
    let model = load_pretrained::<Flex>(&PathBuf::from(src), &LoadOptions::default(), &device)
        .with_context(|| format!("loading {src}"))?;
    let saved = model.save(
        &PathBuf::from(out),
        &SaveOptions {
            dtype,
            max_shard_bytes,
            companions_from: None,
        },
    )?;
    println!(
        "{src} -> {out}: {} weight file(s), {} bytes of {}",
        saved.weight_files.len(),
        saved.total_bytes,
        saved.dtype
    );
    Ok(())
}
