//! A data transform defined outside the library, registered in the transform factory under a
//! `type` of its own, configured from the same TOML as the built-in ones and run by
//! `train_data::prepare`.
//!
//! ```sh
//! cargo run --release -p train-examples --example custom_transform
//! ```

use std::path::PathBuf;

use serde::Deserialize;
use train_data::{
    ChatTokenizer, Conversation, DatasetConfig, Role, Transform, TransformContext,
    TransformRegistry, prepare,
};

/// Puts a fixed signature under every assistant answer.
struct Signature {
    text: String,
}

impl Transform for Signature {
    fn name(&self) -> &str {
        "signature"
    }
    fn apply(&self, conversation: &mut Conversation, _ctx: &TransformContext) {
        for m in conversation
            .messages
            .iter_mut()
            .filter(|m| m.role == Role::Assistant)
        {
            m.content = format!("{}\n-- {}", m.content, self.text);
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    text: String,
}

const CONFIG: &str = r#"
[[transform]]
type = "strip_think"      # built in

[[transform]]
type = "signature"        # ours
text = "your assistant"
"#;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("crates/train-model/tests/fixtures/qwen3");
    let tok = ChatTokenizer::from_model_dir(&model)?;

    let mut registry = TransformRegistry::new();
    registry.register(
        "signature",
        Box::new(|options, ()| {
            let o: Options = options.parse()?;
            Ok(Box::new(Signature { text: o.text }) as Box<dyn Transform>)
        }),
    )?;
    let pipeline = registry.pipeline_from_toml(CONFIG)?;
    println!("pipeline: {pipeline:?}");

    let data = DatasetConfig {
        dataset_path: root.join("crates/train-data/tests/fixtures/sample.jsonl"),
        max_length: 512,
        ..DatasetConfig::default()
    };
    let plain = prepare(&data, &tok, None)?;
    let signed = prepare(&data, &tok, Some(&pipeline))?;
    println!(
        "label tokens: {} without the transform, {} with it",
        plain.stats.label_tokens, signed.stats.label_tokens
    );
    let first = &signed.train[0];
    println!(
        "first training example:\n{}",
        tok.tokenizer()
            .decode(&first.input_ids, false)
            .map_err(anyhow::Error::msg)?
    );
    anyhow::ensure!(
        signed.stats.label_tokens > plain.stats.label_tokens,
        "the signature was not trained"
    );
    Ok(())
}
