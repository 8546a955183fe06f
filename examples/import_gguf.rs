//! Converts a llama.cpp GGUF checkpoint (llama / qwen2 / qwen3 / olmo2 / smollm3 / gemma3; F32,
//! F16, BF16, Q8_0, Q4_0, Q4_1 tensors; byte-level or SentencePiece-style vocabularies) into a
//! Hugging Face directory that this project and `transformers` load.
//!
//! ```sh
//! cargo run --release -p train-examples --example import_gguf -- model.gguf out_dir
//! ```

use std::path::PathBuf;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(gguf), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: import_gguf MODEL.gguf OUT_DIR");
    };
    let import = train_model::convert_to_hf(&PathBuf::from(&gguf), &PathBuf::from(&out))
        .with_context(|| format!("converting {gguf}"))?;
    println!(
        "{}: {} tensors of a {} model written to {}",
        gguf,
        import.tensors,
        import.model_type,
        import.dir.display()
    );
    Ok(())
}
