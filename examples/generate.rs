//! Generation with the origin's processors: the scheduled "think" token penalty and the
//! post-stop penalty with its stop-emoji detector, on a batch of chat prompts, with the
//! statistics every processor kept for every row.
//!
//! ```sh
//! cargo run --release -p train-examples --example generate [-- MODEL_DIR]
//! ```

use std::path::PathBuf;

use burn::backend::Flex;
use train_data::{ChatTokenizer, Message, Role};
use train_logits::{
    GenerationConfig, ProcessorContext, ProcessorsFile, build_processors, end_ids, generate,
};
use train_model::{LoadOptions, load_pretrained};

const PROCESSORS: &str = r#"
[[processors]]
type = "scheduled_token_penalty"   # the origin's "emoji think": penalize 🤔 early in the answer
tokens = ["🤔"]
penalty = 5.0

[[processors]]
type = "post_stop_penalty"         # after 🛑🛑, push the end of turn, penalize everything else
stop_emojis = ["🛑"]
base = 5.0
rate = 2.0
"#;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::args().nth(1).map_or_else(
        || root.join("crates/train-model/tests/fixtures/qwen3"),
        PathBuf::from,
    );
    let device = Default::default();
    let loaded = load_pretrained::<Flex>(&dir, &LoadOptions::default(), &device)?;
    let tok = ChatTokenizer::from_model_dir(&dir)?;

    let questions = [
        "What is the capital of France?",
        "Tell me a joke. stop with 🛑 /two/ times",
    ];
    let prompts = questions
        .iter()
        .map(|q| tok.encode_prompt(&[Message::new(Role::User, *q)]))
        .collect::<Result<Vec<_>, _>>()?;

    let ends = end_ids(&dir, &loaded.config.eos_token_ids, &tok);
    let file = ProcessorsFile::from_toml(PROCESSORS, "generate.rs".as_ref())?;
    let ctx = ProcessorContext {
        tokenizer: Some(tok.tokenizer()),
        end_ids: &ends,
    };
    let mut processors = build_processors(&file.processors, &ctx)?;

    let config = GenerationConfig {
        max_new_tokens: 24,
        stop_token_ids: ends.clone(),
        pad_token_id: tok.pad_id(),
        ..GenerationConfig::default()
    };
    let out = generate(
        &loaded.model,
        Some(tok.tokenizer()),
        &prompts,
        &mut processors,
        &config,
    )?;
    for (q, g) in questions.iter().zip(&out) {
        println!(
            "{q}\n  → {:?} ({} tokens, stopped by {})",
            g.text,
            g.token_ids.len(),
            g.stop_reason.as_str()
        );
    }
    for p in &processors {
        println!(
            "{}: {}",
            p.name(),
            p.stats()
                .map_or_else(|| "no statistics".into(), |s| s.to_string())
        );
    }
    Ok(())
}
