//! Processors from configuration: a serde-tagged [`ProcessorConfig`] per processor, a TOML file
//! of them, and the factory (the seed's `get_processors`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{LogitsError, Result};
use crate::origin::{
    DEFAULT_STOP_EMOJIS, PostStopPenalty, ScheduleWindow, ScheduledTokenPenalty, StopEmojiDetector,
    default_schedule,
};
use crate::processor::LogitsProcessor;
use crate::standard::{
    BadWords, ForcedEos, MinNewTokens, MinP, NoRepeatNGram, RepetitionPenalty, SequenceBias,
    SuppressTokens, Temperature, TopK, TopP, Typical,
};

fn one() -> usize {
    1
}
fn default_penalty() -> f32 {
    5.0
}
fn default_emojis() -> Vec<String> {
    DEFAULT_STOP_EMOJIS
        .iter()
        .map(|e| (*e).to_string())
        .collect()
}
fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn default_base() -> f32 {
    5.0
}
fn default_rate() -> f32 {
    2.0
}

/// A token sequence given as ids or as text (tokenized without special tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenSeq {
    /// Token ids.
    Ids(Vec<u32>),
    /// Text, tokenized with the model's tokenizer.
    Text(String),
}

/// One `(sequence, bias)` entry of [`ProcessorConfig::SequenceBias`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiasEntry {
    /// The sequence.
    pub sequence: TokenSeq,
    /// Added to the logit of its last token when the row ends with the rest.
    pub bias: f32,
}

/// One processor, as written in TOML (`type = "top_p"`, …). Order matters: processors run in
/// the order given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ProcessorConfig {
    /// [`Temperature`].
    Temperature {
        /// Divides the logits.
        temperature: f32,
    },
    /// [`TopK`].
    TopK {
        /// Tokens kept.
        top_k: usize,
        /// Lower bound on tokens kept.
        #[serde(default = "one")]
        min_tokens_to_keep: usize,
    },
    /// [`TopP`].
    TopP {
        /// Probability mass kept.
        top_p: f32,
        /// Lower bound on tokens kept.
        #[serde(default = "one")]
        min_tokens_to_keep: usize,
    },
    /// [`MinP`].
    MinP {
        /// Fraction of the top probability below which tokens go.
        min_p: f32,
        /// Lower bound on tokens kept.
        #[serde(default = "one")]
        min_tokens_to_keep: usize,
    },
    /// [`Typical`].
    Typical {
        /// Typical mass kept.
        typical_p: f32,
        /// Lower bound on tokens kept.
        #[serde(default = "one")]
        min_tokens_to_keep: usize,
    },
    /// [`RepetitionPenalty`].
    RepetitionPenalty {
        /// > 1 discourages repeats.
        penalty: f32,
    },
    /// [`NoRepeatNGram`].
    NoRepeatNgram {
        /// n.
        ngram_size: usize,
    },
    /// [`MinNewTokens`] (end-of-sequence ids: the model's end-of-turn and eos ids unless given).
    MinNewTokens {
        /// Tokens generated before an end is allowed.
        min_new_tokens: usize,
        /// Which ids count as an end.
        #[serde(default)]
        eos_token_ids: Vec<u32>,
    },
    /// [`SuppressTokens`].
    SuppressTokens {
        /// Token ids.
        #[serde(default)]
        token_ids: Vec<u32>,
        /// Tokens by their vocabulary string (e.g. `"<think>"`).
        #[serde(default)]
        tokens: Vec<String>,
    },
    /// [`SequenceBias`].
    SequenceBias {
        /// The biased sequences.
        biases: Vec<BiasEntry>,
    },
    /// [`BadWords`].
    BadWords {
        /// Sequences never to generate.
        sequences: Vec<TokenSeq>,
    },
    /// [`ForcedEos`] (`max_length` counts prompt and generated tokens, as in `transformers`).
    ForcedEos {
        /// Total length at which an end is forced.
        max_length: usize,
    },
    /// [`ScheduledTokenPenalty`] (the origin's "emoji think" processor).
    #[serde(alias = "emoji_think")]
    ScheduledTokenPenalty {
        /// Token ids.
        #[serde(default)]
        token_ids: Vec<u32>,
        /// Tokens by their vocabulary string, or text whose every token is penalized.
        #[serde(default)]
        tokens: Vec<String>,
        /// Base penalty (origin default 5; production 80).
        #[serde(default = "default_penalty")]
        penalty: f32,
        /// Windows of generated steps and their multipliers (origin: 4×8, 4×2, 4×1.5, then 1).
        #[serde(default = "default_schedule")]
        schedule: Vec<ScheduleWindow>,
    },
    /// [`PostStopPenalty`] with a [`StopEmojiDetector`].
    #[serde(alias = "stop_penalty")]
    PostStopPenalty {
        /// The stop emojis.
        #[serde(default = "default_emojis")]
        stop_emojis: Vec<String>,
        /// Fewest repeats that make a stop.
        #[serde(default = "two")]
        min_repeat: usize,
        /// Most repeats looked for.
        #[serde(default = "four")]
        max_repeat: usize,
        /// Penalty of the first token after a stop.
        #[serde(default = "default_base")]
        base: f32,
        /// Growth of the penalty per token.
        #[serde(default = "default_rate")]
        rate: f32,
        /// Extra raise of the end-of-turn ids.
        #[serde(default)]
        eot_reward: f32,
    },
}

/// A processors file: `[[processors]]` tables in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorsFile {
    /// The processors, in the order they run.
    #[serde(default)]
    pub processors: Vec<ProcessorConfig>,
}

impl ProcessorsFile {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| LogitsError::File {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Reads and parses a TOML file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LogitsError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text, path)
    }
}

/// What the factory needs to know about the model.
#[derive(Debug, Clone, Copy)]
pub struct ProcessorContext<'a> {
    /// Turns token strings and texts into ids; without it only ids can be given.
    pub tokenizer: Option<&'a Tokenizer>,
    /// Ids that end a turn or the sequence (eos ∪ end-of-turn).
    pub end_ids: &'a [u32],
}

fn token_ids(
    name: &str,
    ctx: &ProcessorContext<'_>,
    ids: &[u32],
    tokens: &[String],
) -> Result<Vec<u32>> {
    let mut out = ids.to_vec();
    for t in tokens {
        let tok = ctx.tokenizer.ok_or_else(|| {
            LogitsError::config(name, format!("token {t:?} given by text but no tokenizer"))
        })?;
        match tok.token_to_id(t) {
            Some(id) => out.push(id),
            None => out.extend(encode(name, tok, t)?),
        }
    }
    Ok(out)
}

fn encode(name: &str, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| LogitsError::config(name, format!("cannot tokenize {text:?}: {e}")))?;
    if enc.get_ids().is_empty() {
        return Err(LogitsError::config(
            name,
            format!("{text:?} tokenizes to nothing"),
        ));
    }
    Ok(enc.get_ids().to_vec())
}

fn sequence(name: &str, ctx: &ProcessorContext<'_>, seq: &TokenSeq) -> Result<Vec<u32>> {
    match seq {
        TokenSeq::Ids(ids) => Ok(ids.clone()),
        TokenSeq::Text(text) => {
            let tok = ctx.tokenizer.ok_or_else(|| {
                LogitsError::config(name, format!("{text:?} given by text but no tokenizer"))
            })?;
            encode(name, tok, text)
        }
    }
}

impl ProcessorConfig {
    /// Builds the processor.
    pub fn build(&self, ctx: &ProcessorContext<'_>) -> Result<Box<dyn LogitsProcessor>> {
        let end_ids = |given: &[u32]| -> Vec<u32> {
            if given.is_empty() {
                ctx.end_ids.to_vec()
            } else {
                given.to_vec()
            }
        };
        Ok(match self {
            Self::Temperature { temperature } => Box::new(Temperature::new(*temperature)?),
            Self::TopK {
                top_k,
                min_tokens_to_keep,
            } => Box::new(TopK::new(*top_k, *min_tokens_to_keep)?),
            Self::TopP {
                top_p,
                min_tokens_to_keep,
            } => Box::new(TopP::new(*top_p, *min_tokens_to_keep)?),
            Self::MinP {
                min_p,
                min_tokens_to_keep,
            } => Box::new(MinP::new(*min_p, *min_tokens_to_keep)?),
            Self::Typical {
                typical_p,
                min_tokens_to_keep,
            } => Box::new(Typical::new(*typical_p, *min_tokens_to_keep)?),
            Self::RepetitionPenalty { penalty } => Box::new(RepetitionPenalty::new(*penalty)?),
            Self::NoRepeatNgram { ngram_size } => Box::new(NoRepeatNGram::new(*ngram_size)?),
            Self::MinNewTokens {
                min_new_tokens,
                eos_token_ids,
            } => Box::new(MinNewTokens::new(*min_new_tokens, end_ids(eos_token_ids))?),
            Self::SuppressTokens { token_ids, tokens } => Box::new(SuppressTokens::new(
                self::token_ids("suppress_tokens", ctx, token_ids, tokens)?,
            )),
            Self::SequenceBias { biases } => Box::new(SequenceBias::new(
                biases
                    .iter()
                    .map(|b| Ok((sequence("sequence_bias", ctx, &b.sequence)?, b.bias)))
                    .collect::<Result<_>>()?,
            )?),
            Self::BadWords { sequences } => Box::new(BadWords::new(
                sequences
                    .iter()
                    .map(|s| sequence("bad_words", ctx, s))
                    .collect::<Result<_>>()?,
                ctx.end_ids,
            )?),
            Self::ForcedEos { max_length } => Box::new(ForcedEos::new(*max_length, end_ids(&[]))?),
            Self::ScheduledTokenPenalty {
                token_ids,
                tokens,
                penalty,
                schedule,
            } => Box::new(ScheduledTokenPenalty::new(
                self::token_ids("scheduled_token_penalty", ctx, token_ids, tokens)?,
                *penalty,
                schedule.clone(),
            )?),
            Self::PostStopPenalty {
                stop_emojis,
                min_repeat,
                max_repeat,
                base,
                rate,
                eot_reward,
            } => Box::new(PostStopPenalty::new(
                StopEmojiDetector::new(stop_emojis, *min_repeat, *max_repeat)?,
                *base,
                *rate,
                *eot_reward,
                end_ids(&[]),
            )?),
        })
    }
}

/// Builds every processor of `configs`, in order (the seed's `get_processors`).
pub fn build_processors(
    configs: &[ProcessorConfig],
    ctx: &ProcessorContext<'_>,
) -> Result<Vec<Box<dyn LogitsProcessor>>> {
    configs.iter().map(|c| c.build(ctx)).collect()
}
