//! # train-data
//!
//! From raw conversations to packed, correctly masked training batches for decoder LLMs —
//! without any tensor library. The output is plain Rust: token ids, labels (with an ignore
//! value), position ids and segment ids, ready for whatever trainer turns them into tensors.
//!
//! The steps, each usable on its own:
//!
//! 1. **Load** ([`load_conversations`]): JSONL (streamed), JSON arrays and Parquet, with rows
//!    in the `messages` format, Alpaca or ShareGPT, normalized to [`Conversation`]s. Every
//!    problem names the file, the line (or row) and the field; a [`ErrorPolicy`] says whether to
//!    stop or skip. [`check_file`] adds the dataset-level checks (duplicates, answer leakage,
//!    rows over the maximum length).
//! 2. **Transform** ([`TransformPipeline`]): strip `<think>` blocks, a default system prompt,
//!    the thinking and stop emoji patterns — or your own [`Transform`]. Deterministic from the
//!    seed and the row index.
//! 3. **Render and tokenize** ([`ChatTokenizer`]): the model's own Jinja chat template
//!    (rendered like `transformers.apply_chat_template`) and `tokenizer.json`. Labels cover
//!    each assistant turn from after its header through its end-of-turn token.
//! 4. **Truncate, split, pack** ([`fit`], [`split_indices`], [`pack_examples`], [`Batch`]):
//!    best-fit-decreasing packing where each packed example keeps its own positions and segment
//!    so nothing leaks between examples; padding as the alternative.
//!
//! Preference pairs for DPO-family training ([`load_preferences`], [`PreferencePair`],
//! [`ChatTokenizer::encode_pair`]) come in every form of TRL's preference format, with the same
//! per-row errors.
//!
//! [`prepare`] runs the whole chain from a [`DatasetConfig`] (the seed's `DatasetConfig`:
//! `max_length` 4096, `validation_split` 0.1, thinking pattern…) and reports [`DataStats`];
//! [`prepare_cached`] keeps the tokenized result in Parquet, keyed by a hash of everything
//! that shapes it.
//!
//! ## Cargo features
//!
//! None that change the library (it has no backend: no burn, no tensor library in its
//! dependency tree). `real-tokenizers` only enables a test against the genuine Qwen3 and
//! SmolLM2 tokenizers.
//!
//! ## Errors
//!
//! Every fallible function returns [`DataError`]: `Io` (a file cannot be read or written,
//! with its path), `Row` (a row is invalid: a [`Problem`] with the file, the line or row, the
//! field and a [`ProblemKind`]), `File` (a whole file is unusable: unknown format, broken
//! Parquet), `Template` (the chat template fails to compile or render, or exceeds its fuel),
//! `Tokenizer` (`tokenizer.json` cannot be read or used) and `Config` (a setting out of range,
//! naming the setting). Under [`ErrorPolicy::Skip`] invalid rows become [`Problem`]s in
//! [`Loaded::problems`] instead of errors.
//!
//! ## Example
//!
//! ```
//! use train_data::{ChatTokenizer, Conversation, Message, Role, Sequence, Example, IGNORE_INDEX};
//!
//! # let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen2"));
//! let tok = ChatTokenizer::from_model_dir(dir)?; // tokenizer.json + chat template
//! let conv = Conversation::new(vec![
//!     Message::new(Role::User, "What is the capital of France?"),
//!     Message::new(Role::Assistant, "Paris."),
//! ]);
//! let enc = tok.encode(&conv)?;
//! // Only "Paris.<|im_end|>" is trained.
//! let trained: Vec<u32> = enc.labels.iter().filter(|&&l| l != IGNORE_INDEX).map(|&l| l as u32).collect();
//! assert_eq!(tok.tokenizer().decode(&trained, false)?, "Paris.<|im_end|>");
//!
//! // Two examples packed into one row: positions restart, segments differ.
//! let a = Example { row: 0, input_ids: enc.input_ids.clone(), labels: enc.labels.clone() };
//! let row = Sequence::pack(&[&a, &a]);
//! assert_eq!(row.position_ids[a.len()], 0);
//! assert_eq!(row.segment_ids[a.len()], 1);
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! ```

mod batch;
mod conversation;
mod error;
mod load;
mod parquet;
mod parquet_bounds;
mod pipeline;
mod preference;
mod prompts;
mod registry;
mod rng;
mod split;
mod template;
mod tokenize;
mod transform;
mod validate;

pub use batch::{
    Batch, Example, Fitted, IGNORE_INDEX, MAX_LENGTH, Sequence, TrainRows, Truncation,
    best_fit_decreasing, fit, pack_examples,
};
pub use conversation::{Conversation, Message, Role};
pub use error::{DataError, Problem, ProblemKind, Result, RowLocation, Severity};
pub use load::{
    DataFormat, ErrorPolicy, LoadOptions, Loaded, NO_SHAPE, RowSchema, load_conversations,
};
pub use load::{MAX_JSON_FILE_BYTES, MAX_LINE_BYTES};
pub use parquet::{
    MAX_PARQUET_EXPANSION, MIN_PARQUET_DECODED_BYTES, check_examples, read_examples, write_examples,
};
pub use pipeline::{
    DATASET_KEY_ALIASES, DEFAULT_MAX_LENGTH, DataStats, DatasetConfig, Prepared, cache_key,
    check_max_length, prepare, prepare_cached, read_prepared, write_prepared,
};
pub use preference::{EncodedPair, LoadedPairs, PreferencePair, load_preferences};
pub use prompts::{LoadedPrompts, PromptRow, load_prompts};
pub use registry::{Builder, Options, Plugin, Registry, RegistryError};
pub use rng::SplitMix64;
pub use split::{DataPosition, EpochOrder, ValidationSplit, split_indices};
pub use template::ChatTemplate;
pub use template::{MAX_RENDERED_BYTES, MAX_TEMPLATE_MEMORY, is_template_failure};
pub use tokenize::{ChatTokenizer, Encoded, LabelMode};
pub use tokenize::{
    MAX_ADDED_TOKENS, MAX_LABEL_RENDER_BYTES, MAX_NORMALIZED_BYTES, MAX_TEXT_GROWTH,
    MAX_TOKENIZER_JSON_BYTES, MAX_VOCAB_SIZE, text_growth,
};
pub use transform::{
    BUILTIN_TRANSFORMS, Transform, TransformBuilder, TransformConfig, TransformContext,
    TransformOptions, TransformPipeline, TransformRegistry, Transforms,
};
pub use transform::{
    MAX_EMOJI_BYTES, MAX_PATTERN_COUNT, STOP_EMOJIS, StripThink, SystemPrompt, THINKING_EMOJIS,
    strip_think,
};
pub use validate::{
    CheckReport, MAX_FIELD_BYTES, MAX_MESSAGES_PER_ROW, MAX_WORD_BYTES, check_file,
};
