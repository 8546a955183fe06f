//! A logits processor defined outside the library, registered in the processor factory under
//! a `type` of its own and built from the same TOML as the built-in ones.
//!
//! ```sh
//! cargo run --release -p train-examples --example custom_processor
//! ```

use std::path::PathBuf;

use burn::backend::Flex;
use serde::Deserialize;
use train_data::{ChatTokenizer, Message, Role};
use train_logits::{
    GenerationConfig, LogitsProcessor, ProcessorContext, ProcessorRegistry, RowContext, end_ids,
    generate,
};
use train_model::{LoadOptions, load_pretrained};

/// Forbids every token whose text contains one of the given characters, and counts per row how
/// often it had to.
#[derive(Debug)]
struct NoCharacters {
    banned: Vec<u32>,
    hits: Vec<usize>,
}

impl LogitsProcessor for NoCharacters {
    fn name(&self) -> &'static str {
        "no_characters"
    }
    fn start(&mut self, rows: usize) {
        self.hits = vec![0; rows];
    }
    fn process(
        &mut self,
        row: usize,
        _ctx: &RowContext<'_>,
        logits: &mut [f32],
    ) -> train_logits::Result<()> {
        let best = train_logits::argmax(logits);
        if best.is_some_and(|b| self.banned.contains(&(b as u32))) {
            self.hits[row] += 1;
        }
        for &id in &self.banned {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
    fn stats(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "banned_tokens": self.banned.len(), "hits_per_row": self.hits }))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    characters: String,
}

const CONFIG: &str = r#"
[[processors]]
type = "repetition_penalty"   # built in
penalty = 1.3

[[processors]]
type = "no_characters"        # ours
characters = "aeiou"
"#;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/train-model/tests/fixtures/qwen3");
    let model = load_pretrained::<Flex>(&dir, &LoadOptions::default(), &Default::default())?;
    let tok = ChatTokenizer::from_model_dir(&dir)?;

    let mut registry = ProcessorRegistry::new();
    registry.register(
        "no_characters",
        Box::new(|options, ctx: &ProcessorContext<'_>| {
            let o: Options = options.parse()?;
            let tokenizer = ctx.tokenizer.ok_or("needs the tokenizer")?;
            let banned = (0..tokenizer.get_vocab_size(true) as u32)
                .filter(|&id| {
                    tokenizer
                        .decode(&[id], false)
                        .is_ok_and(|t| t.chars().any(|c| o.characters.contains(c)))
                })
                .collect();
            Ok(Box::new(NoCharacters {
                banned,
                hits: Vec::new(),
            }) as Box<dyn LogitsProcessor>)
        }),
    )?;

    let ends = end_ids(&dir, &model.config.eos_token_ids, &tok);
    let ctx = ProcessorContext {
        tokenizer: Some(tok.tokenizer()),
        end_ids: &ends,
    };
    let mut processors = train_logits::build_processors_toml(
        &registry,
        CONFIG,
        "custom_processor.rs".as_ref(),
        &ctx,
    )?;
    println!(
        "processors: {:?}",
        processors.iter().map(|p| p.name()).collect::<Vec<_>>()
    );

    let prompt = tok.encode_prompt(&[Message::new(Role::User, "Say something.")])?;
    let config = GenerationConfig {
        max_new_tokens: 16,
        stop_token_ids: ends.clone(),
        ..GenerationConfig::default()
    };
    let out = generate(
        &model.model,
        Some(tok.tokenizer()),
        &[prompt],
        &mut processors,
        &config,
    )?;
    println!("generated {:?}", out[0].text);
    let vowels = out[0].text.chars().filter(|c| "aeiou".contains(*c)).count();
    println!("vowels in the answer: {vowels}");
    for p in &processors {
        if let Some(s) = p.stats() {
            println!("{}: {s}", p.name());
        }
    }
    anyhow::ensure!(vowels == 0, "the custom processor let a vowel through");
    Ok(())
}
