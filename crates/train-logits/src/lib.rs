//! # train-logits
//!
//! Logits processors and generation for the burn models of `train-model`:
//!
//! * [`LogitsProcessor`]: sees one row at a time — its logits, its prompt and generated tokens
//!   and their decoded text — and may keep state per row.
//! * The standard set with `transformers` semantics (each checked against fixtures made by the
//!   `transformers` processor itself): [`Temperature`], [`TopK`], [`TopP`], [`MinP`],
//!   [`Typical`], [`RepetitionPenalty`], [`NoRepeatNGram`], [`MinNewTokens`],
//!   [`SuppressTokens`], [`SequenceBias`], [`BadWords`], [`ForcedEos`]; and [`StopStrings`], a
//!   stopping criterion matched on text across token boundaries.
//! * The origin's processors: [`ScheduledTokenPenalty`] (the "emoji think" penalty),
//!   [`StopEmojiDetector`] and [`PostStopPenalty`].
//! * [`ProcessorConfig`] (serde-tagged, from TOML) and [`build_processors`], the factory.
//! * [`generate()`]: batch generation with a KV cache, greedy or seeded sampling, per-row stop.
//!
//! ## Cargo features and backends
//!
//! Generation is generic over `burn::tensor::backend::Backend`. The features pick which
//! backends `train-model` compiles: `cpu` (default, burn's Flex), `tch` (libtorch 2.9.0),
//! `cuda` (burn-cuda). The processors themselves work on plain `&mut [f32]` rows.
//!
//! ## Errors
//!
//! [`LogitsError`]: `Config` (a processor's settings are invalid, naming the processor),
//! `Input` (logits that do not fit a processor: empty row, ids outside the vocabulary), `File`
//! (a processors TOML file cannot be read or parsed, naming the file and the table),
//! `Generation` (no prompt, an empty prompt, NaN logits from the model), and the `Model`,
//! `Data` and `Tokenizer` errors of the crates underneath. Processors never panic.
//!
//! ## Example
//!
//! ```
//! use train_logits::{LogitsProcessor, ProcessorsFile, ProcessorContext, RowContext, build_processors};
//!
//! # fn main() -> Result<(), train_logits::LogitsError> {
//! let file = ProcessorsFile::from_toml(
//!     r#"
//!     [[processors]]
//!     type = "repetition_penalty"
//!     penalty = 2.0
//!
//!     [[processors]]
//!     type = "top_k"
//!     top_k = 2
//!     "#,
//!     "inline.toml".as_ref(),
//! )?;
//! let ctx = ProcessorContext { tokenizer: None, end_ids: &[0] };
//! let mut processors = build_processors(&file.processors, &ctx)?;
//! let mut logits = vec![1.0, 4.0, 3.0, -1.0];
//! let ids = [7, 1]; // prompt 7, generated 1 so far
//! for p in processors.iter_mut() {
//!     p.start(1);
//!     p.process(0, &RowContext::new(&ids, 1), &mut logits)?;
//! }
//! assert_eq!(logits, [f32::NEG_INFINITY, 2.0, 3.0, f32::NEG_INFINITY]);
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod generate;
mod origin;
mod processor;
mod standard;
mod stop;

pub use config::{
    BUILTIN_PROCESSORS, BiasEntry, ProcessorBuilder, ProcessorConfig, ProcessorContext,
    ProcessorOptions, ProcessorRegistry, Processors, ProcessorsFile, TokenSeq, build_processors,
    build_processors_toml, read_processors,
};
pub use error::{LogitsError, Result};
pub use generate::{
    Decoding, Generation, GenerationConfig, StopReason, end_ids, generate, generate_until,
};
pub use origin::{
    DEFAULT_STOP_EMOJIS, PostStopPenalty, PostStopStats, ScheduleWindow, ScheduledTokenPenalty,
    StopEmojiDetector, default_schedule,
};
pub use processor::{LogitsProcessor, RowContext, apply_all, argmax, log_softmax, softmax};
pub use standard::{
    BadWords, ForcedEos, MinNewTokens, MinP, NoRepeatNGram, RepetitionPenalty, SequenceBias,
    SuppressTokens, Temperature, TopK, TopP, Typical,
};
pub use stop::StopStrings;
