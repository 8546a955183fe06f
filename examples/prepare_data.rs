//! `train-data` on its own: load, validate, transform, render, mask and pack the shipped
//! conversations, then print statistics. No tensor library involved.
//!
//! ```sh
//! cargo run --release -p train-examples --example prepare_data [-- DATA.jsonl MODEL_DIR]
//! ```

use std::path::PathBuf;

use train_data::{
    ChatTokenizer, Example, IGNORE_INDEX, LoadOptions, TransformConfig, TransformPipeline,
    check_file, load_conversations, pack_examples,
};

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = std::env::args().skip(1);
    let data = args.next().map_or_else(
        || root.join("crates/train-data/tests/fixtures/sample.jsonl"),
        PathBuf::from,
    );
    let model = args.next().map_or_else(
        || root.join("crates/train-model/tests/fixtures/qwen3"),
        PathBuf::from,
    );
    let max_length = 512;

    // The model's tokenizer.json and chat template.
    let tok = ChatTokenizer::from_model_dir(&model)?;

    // 1. Validate the whole file first: every problem names the line and the field.
    let report = check_file(&data, &LoadOptions::default(), Some((&tok, max_length)))?;
    println!(
        "{}: {} rows, {} valid, {} invalid",
        report.path, report.rows, report.valid_rows, report.invalid_rows
    );

    // 2. Load (JSONL / JSON / Parquet; messages, Alpaca or ShareGPT rows).
    let loaded = load_conversations(&data, &LoadOptions::default())?;

    // 3. Transforms: drop <think> blocks, add the origin's thinking pattern.
    let pipeline = TransformPipeline::from_configs(&[
        TransformConfig::StripThink,
        TransformConfig::ThinkingPattern {
            emoji: None,
            min_count: 2,
            max_count: 4,
        },
    ])?;

    // 4. Render with the chat template and mask: only assistant tokens are trained.
    let mut examples = Vec::new();
    for mut conversation in loaded.conversations {
        let row = conversation.location.as_ref().map_or(0, |l| l.row);
        pipeline.apply(&mut conversation, 42, row);
        let encoded = tok.encode(&conversation)?;
        examples.push(Example {
            row,
            input_ids: encoded.input_ids,
            labels: encoded.labels,
        });
    }
    let first = &examples[0];
    let trained: Vec<u32> = first
        .input_ids
        .iter()
        .zip(&first.labels)
        .filter(|(_, l)| **l != IGNORE_INDEX)
        .map(|(id, _)| *id)
        .collect();
    println!(
        "row 0 rendered:\n{}",
        tok.tokenizer()
            .decode(&first.input_ids, false)
            .map_err(anyhow::Error::msg)?
    );
    println!(
        "row 0 trained tokens ({} of {}): {:?}",
        trained.len(),
        first.input_ids.len(),
        tok.tokenizer()
            .decode(&trained, false)
            .map_err(anyhow::Error::msg)?
    );

    // 5. Pack into rows of `max_length`; each example keeps its own positions and segment.
    let (rows, efficiency) = pack_examples(&examples, max_length);
    let tokens: usize = examples.iter().map(Example::len).sum();
    let label_tokens: usize = examples.iter().map(Example::label_tokens).sum();
    println!(
        "{} examples, {tokens} tokens ({label_tokens} trained), longest {}, packed into {} rows of {max_length} ({:.1} % full)",
        examples.len(),
        examples.iter().map(Example::len).max().unwrap_or(0),
        rows.len(),
        efficiency * 100.0
    );
    Ok(())
}
