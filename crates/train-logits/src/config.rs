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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum TokenSeq {
    /// Token ids.
    Ids(Vec<u32>),
    /// Text, tokenized with the model's tokenizer.
    Text(String),
}

/// One `(sequence, bias)` entry of [`ProcessorConfig::SequenceBias`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BiasEntry {
    /// The sequence.
    pub sequence: TokenSeq,
    /// Added to the logit of its last token when the row ends with the rest.
    pub bias: f32,
}

/// One processor, as written in TOML (`type = "top_p"`, …). Order matters: processors run in
/// the order given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ProcessorConfig {
    /// Divides the logits by `temperature` ([`Temperature`], like `TemperatureLogitsWarper`).
    Temperature {
        /// Divides the logits.
        temperature: f32,
    },
    /// Keeps the `top_k` most likely tokens ([`TopK`], like `TopKLogitsWarper`).
    TopK {
        /// Tokens kept.
        top_k: usize,
        /// Lower bound on tokens kept.
        #[serde(default = "one")]
        min_tokens_to_keep: usize,
    },
    /// Keeps the smallest set of tokens whose probability reaches `top_p` ([`TopP`]).
    TopP {
        /// Probability mass kept.
        top_p: f32,
        /// Lower bound on tokens kept.
        #[serde(default = "one")]
        min_tokens_to_keep: usize,
    },
    /// Drops tokens less likely than `min_p` × the top probability ([`MinP`]).
    MinP {
        /// Fraction of the top probability below which tokens go.
        min_p: f32,
        /// Lower bound on tokens kept.
        #[serde(default = "one")]
        min_tokens_to_keep: usize,
    },
    /// Locally typical sampling: keeps the tokens closest to the expected information ([`Typical`]).
    Typical {
        /// Typical mass kept.
        typical_p: f32,
        /// Lower bound on tokens kept.
        #[serde(default = "one")]
        min_tokens_to_keep: usize,
    },
    /// Penalizes tokens already in the prompt or the answer ([`RepetitionPenalty`], the CTRL rule).
    RepetitionPenalty {
        /// > 1 discourages repeats.
        penalty: f32,
    },
    /// Forbids repeating any n-gram of `ngram_size` tokens ([`NoRepeatNGram`]).
    NoRepeatNgram {
        /// n.
        ngram_size: usize,
    },
    /// Forbids ending before `min_new_tokens` generated tokens ([`MinNewTokens`]; end ids: the model's end-of-turn and eos ids unless given).
    MinNewTokens {
        /// Tokens generated before an end is allowed.
        min_new_tokens: usize,
        /// Which ids count as an end.
        #[serde(default)]
        eos_token_ids: Vec<u32>,
    },
    /// Forbids the given tokens ([`SuppressTokens`]).
    SuppressTokens {
        /// Token ids.
        #[serde(default)]
        token_ids: Vec<u32>,
        /// Tokens by their vocabulary string (e.g. `"<think>"`).
        #[serde(default)]
        tokens: Vec<String>,
    },
    /// Adds a bias to the last token of a sequence when the row ends with the rest ([`SequenceBias`]).
    SequenceBias {
        /// The biased sequences.
        biases: Vec<BiasEntry>,
    },
    /// Forbids completing any of the given sequences ([`BadWords`]).
    BadWords {
        /// Sequences never to generate.
        sequences: Vec<TokenSeq>,
    },
    /// Forces an end id when `max_length` tokens (prompt and generated, as in `transformers`) are reached ([`ForcedEos`]).
    ForcedEos {
        /// Total length at which an end is forced.
        max_length: usize,
    },
    /// The origin's "emoji think" processor: penalizes the given tokens with a multiplier that follows a schedule of generated steps ([`ScheduledTokenPenalty`]).
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
    /// The origin's post-stop penalty: once a stop emoji run is generated, raises the end-of-turn ids and lowers every other token by `base`·`rate`^k ([`PostStopPenalty`] with a [`StopEmojiDetector`]).
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
        let text = read_toml_file(path)?;
        Self::from_toml(&text, path)
    }
}

/// Largest processors file read.
const MAX_TOML_BYTES: u64 = 16 << 20;

/// A processors file: a regular file (a FIFO would block) of at most 16 MiB.
fn read_toml_file(path: &Path) -> Result<String> {
    let bad = |message: String| LogitsError::File {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > MAX_TOML_BYTES {
        return Err(bad(format!(
            "{} bytes, above the limit of {MAX_TOML_BYTES}",
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))
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

/// The `type` names of the built-in processors ([`ProcessorConfig`]'s variants).
pub const BUILTIN_PROCESSORS: [&str; 14] = [
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical",
    "repetition_penalty",
    "no_repeat_ngram",
    "min_new_tokens",
    "suppress_tokens",
    "sequence_bias",
    "bad_words",
    "forced_eos",
    "scheduled_token_penalty",
    "post_stop_penalty",
];

/// Other names accepted for built-in processors (the origin's).
const BUILTIN_ALIASES: [&str; 2] = ["emoji_think", "stop_penalty"];

/// The options of one `[[processors]]` table (everything but `type`), handed to the builder of
/// a processor registered in a [`ProcessorRegistry`].
pub type ProcessorOptions = train_data::Options;

/// Builds a downstream processor from its options and the model context; an `Err` is a message
/// that the registry reports with the processor's position and type.
pub type ProcessorBuilder = train_data::Builder<Processors>;

/// The logits processors as a kind of `train_data::Plugin`: `[[processors]]` tables,
/// [`LogitsProcessor`] objects built with a [`ProcessorContext`], the built-ins of
/// [`ProcessorConfig`] (and the origin's names for two of them).
#[derive(Debug, Clone, Copy)]
pub struct Processors;

impl train_data::Plugin for Processors {
    type Output = dyn LogitsProcessor;
    type Context<'a> = ProcessorContext<'a>;
    const TABLE: &'static str = "processors";

    fn builtins(registry: &mut train_data::Registry<Self>) {
        let builder = || -> ProcessorBuilder {
            Box::new(|options, ctx| {
                let config: ProcessorConfig = options.parse_tagged()?;
                config.build(ctx).map_err(|e| e.to_string())
            })
        };
        // The names are distinct: registering them cannot fail.
        for name in BUILTIN_PROCESSORS {
            let _ = registry.register(name, builder());
        }
        for name in BUILTIN_ALIASES {
            let _ = registry.register_alias(name, builder());
        }
    }
}

/// The processor factory (`train_data::Registry` of [`Processors`]): the built-in processors
/// ([`ProcessorConfig`]), registered by `new()`, plus the ones you register under a `type`
/// name of your own, all buildable from one `[[processors]]` TOML file
/// ([`build_processors_toml`], [`read_processors`]).
///
/// ```
/// use train_logits::{LogitsProcessor, ProcessorContext, ProcessorRegistry, RowContext};
///
/// #[derive(Debug)]
/// struct Ban(u32);
/// impl LogitsProcessor for Ban {
///     fn name(&self) -> &'static str { "ban" }
///     fn process(&mut self, _row: usize, _ctx: &RowContext<'_>, logits: &mut [f32])
///         -> train_logits::Result<()> {
///         if let Some(l) = logits.get_mut(self.0 as usize) { *l = f32::NEG_INFINITY; }
///         Ok(())
///     }
/// }
///
/// let mut registry = ProcessorRegistry::new();
/// registry.register("ban", Box::new(|opts, _ctx| {
///     #[derive(serde::Deserialize)]
///     struct O { id: u32 }
///     let o: O = opts.parse()?;
///     Ok(Box::new(Ban(o.id)) as Box<dyn LogitsProcessor>)
/// }))?;
/// let ctx = ProcessorContext { tokenizer: None, end_ids: &[0] };
/// let processors = train_logits::build_processors_toml(
///     &registry,
///     "[[processors]]\ntype = \"ban\"\nid = 3\n[[processors]]\ntype = \"top_k\"\ntop_k = 2\n",
///     "inline.toml".as_ref(),
///     &ctx,
/// )?;
/// assert_eq!(processors.iter().map(|p| p.name()).collect::<Vec<_>>(), ["ban", "top_k"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type ProcessorRegistry = train_data::Registry<Processors>;

/// Builds the `[[processors]]` tables of a TOML document with `registry`, in order; built-in
/// and registered types may be mixed. `origin` names the document in errors, with the table
/// (`processors[2]`) and its type.
pub fn build_processors_toml(
    registry: &ProcessorRegistry,
    text: &str,
    origin: &Path,
    ctx: &ProcessorContext<'_>,
) -> Result<Vec<Box<dyn LogitsProcessor>>> {
    registry
        .build_toml(text, ctx)
        .map_err(|e| LogitsError::File {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
}

/// Reads a TOML file and builds its processors with `registry` (see
/// [`build_processors_toml`]).
pub fn read_processors(
    registry: &ProcessorRegistry,
    path: &Path,
    ctx: &ProcessorContext<'_>,
) -> Result<Vec<Box<dyn LogitsProcessor>>> {
    let text = read_toml_file(path)?;
    build_processors_toml(registry, &text, path, ctx)
}

/// Builds every processor of `configs`, in order (the seed's `get_processors`).
pub fn build_processors(
    configs: &[ProcessorConfig],
    ctx: &ProcessorContext<'_>,
) -> Result<Vec<Box<dyn LogitsProcessor>>> {
    configs.iter().map(|c| c.build(ctx)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::RowContext;

    #[test]
    fn every_builtin_name_is_a_variant() {
        for name in BUILTIN_PROCESSORS {
            let r: std::result::Result<ProcessorConfig, _> =
                toml::from_str(&format!("type = {name:?}"));
            if let Err(e) = r {
                assert!(!e.to_string().contains("unknown variant"), "{name}: {e}");
            }
        }
        let e = toml::from_str::<ProcessorConfig>("type = \"nope\"").unwrap_err();
        for name in BUILTIN_PROCESSORS {
            assert!(
                e.to_string().contains(&format!("`{name}`")),
                "{name} missing in {e}"
            );
        }
        let listed = e.to_string().matches('`').count() / 2 - 1;
        assert_eq!(
            listed,
            BUILTIN_PROCESSORS.len() + BUILTIN_ALIASES.len(),
            "{e}"
        );
    }

    #[derive(Debug)]
    struct AddOne;
    impl LogitsProcessor for AddOne {
        fn name(&self) -> &'static str {
            "add_one"
        }
        fn process(
            &mut self,
            _row: usize,
            _ctx: &RowContext<'_>,
            logits: &mut [f32],
        ) -> Result<()> {
            logits.iter_mut().for_each(|l| *l += 1.0);
            Ok(())
        }
    }

    #[test]
    fn registry_mixes_builtin_and_custom_and_names_errors() {
        let mut r = ProcessorRegistry::new();
        r.register(
            "add_one",
            Box::new(|o: &ProcessorOptions, ctx: &ProcessorContext<'_>| {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct O {
                    #[serde(default)]
                    fail: bool,
                }
                let o: O = o.parse()?;
                assert_eq!(ctx.end_ids, &[9]);
                if o.fail {
                    return Err("asked to fail".into());
                }
                Ok(Box::new(AddOne) as Box<dyn LogitsProcessor>)
            }),
        )
        .unwrap();
        assert!(
            r.register("top_k", Box::new(|_, _| Err(String::new())))
                .is_err()
        );
        assert!(
            r.register("stop_penalty", Box::new(|_, _| Err(String::new())))
                .is_err()
        );
        assert!(
            r.register("add_one", Box::new(|_, _| Err(String::new())))
                .is_err()
        );
        let ctx = ProcessorContext {
            tokenizer: None,
            end_ids: &[9],
        };
        let origin = Path::new("p.toml");
        let mut ps = build_processors_toml(
            &r,
            "[[processors]]\ntype = \"add_one\"\n[[processors]]\ntype = \"top_k\"\ntop_k = 1\n",
            origin,
            &ctx,
        )
        .unwrap();
        let mut logits = vec![0.0, 2.0, 1.0];
        let ids = [1u32];
        for p in &mut ps {
            p.start(1);
            p.process(0, &RowContext::new(&ids, 1), &mut logits)
                .unwrap();
        }
        assert_eq!(logits, [f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY]);
        let err = |t: &str| {
            build_processors_toml(&r, t, origin, &ctx)
                .unwrap_err()
                .to_string()
        };
        let e = err("[[processors]]\ntype = \"add_one\"\nfail = true\n");
        assert!(
            e.contains("p.toml") && e.contains("processors[0] (add_one): asked to fail"),
            "{e}"
        );
        let e = err("[[processors]]\ntype = \"add_one\"\nfial = true\n");
        assert!(
            e.contains("processors[0] (add_one)") && e.contains("fial"),
            "{e}"
        );
        let e = err("[[processors]]\ntype = \"top_k\"\ntop_k = 1\n[[processors]]\ntype = \"x\"\n");
        assert!(
            e.contains("processors[1].type") && e.contains("add_one"),
            "{e}"
        );
        let e = err("[[processors]]\ntype = \"top_p\"\ntop_p = 2.0\n");
        assert!(e.contains("processors[0] (top_p)"), "{e}");
        let e = err("[[processors]]\ntype = \"top_k\"\n");
        assert!(e.contains("top_k"), "{e}");
        assert!(err("x = 1").contains("unknown key `x`"));
        assert_eq!(r.type_names().len(), BUILTIN_PROCESSORS.len() + 1);
    }
}
