//! The whole preparation: load → transform → render and tokenize → truncate → split, with
//! statistics, and a tokenized-dataset cache keyed by everything that shapes the result.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::batch::{Example, Fitted, MAX_LENGTH, TrainRows, Truncation, fit};
use crate::error::{DataError, Problem, ProblemKind, Result, RowLocation, Severity};
use crate::load::{ErrorPolicy, LoadOptions, load_conversations};
use crate::load::{open_regular, read_bounded};
use crate::parquet::{check_examples, read_examples, write_examples};
use crate::split::{ValidationSplit, split_indices};
use crate::tokenize::{ChatTokenizer, LabelMode};
use crate::transform::{TransformConfig, TransformPipeline};

/// The names [`DatasetConfig`] accepts for its keys besides their own (alias, key): its serde
/// aliases, listed for the documentation (a test keeps the two equal).
pub const DATASET_KEY_ALIASES: &[(&str, &str)] = &[("max_seq_length", "max_length")];

/// The data side of a run (the seed's `DatasetConfig`, plus what the original CLI had).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// The data file.
    pub dataset_path: PathBuf,
    /// A data file to evaluate on: all its rows are validation examples and all of
    /// `dataset_path`'s are trained (`validation_split` is then not used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_dataset_path: Option<PathBuf>,
    /// Longest example, in tokens, and with `packing` the length of a packed row (default
    /// 4096, at most 2^20). `max_seq_length` is accepted for it (TRL's older name).
    #[serde(alias = "max_seq_length")]
    pub max_length: usize,
    /// Pack the training examples into rows of `max_length` tokens instead of one example per
    /// row (no attention across examples). Default (unset): packed when every row of the data
    /// file is a `text` row (language modelling, as `run_clm.py` groups texts), else not.
    pub packing: Option<bool>,
    /// Validation rows: a fraction below 1, or a count (default 0.1).
    pub validation_split: f64,
    /// Add the origin's thinking pattern.
    pub apply_thinking_pattern: bool,
    /// Fixed emoji of the thinking pattern (empty: random per turn).
    pub thinking_emoji: String,
    /// Add the origin's stop pattern.
    pub apply_stop_pattern: bool,
    /// Insert this system prompt in rows without one.
    pub system_prompt: Option<String>,
    /// Further transforms, applied first, in order.
    pub transforms: Vec<TransformConfig>,
    /// Which tokens are trained.
    pub label_mode: LabelMode,
    /// Examples over `max_length`: truncate or drop.
    pub truncation: Truncation,
    /// Seed of transforms and the split.
    pub seed: u64,
    /// Format, row schema and error policy.
    pub load: LoadOptions,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            dataset_path: PathBuf::new(),
            eval_dataset_path: None,
            max_length: DEFAULT_MAX_LENGTH,
            packing: None,
            validation_split: 0.1,
            apply_thinking_pattern: false,
            thinking_emoji: String::new(),
            apply_stop_pattern: false,
            system_prompt: None,
            transforms: Vec::new(),
            label_mode: LabelMode::default(),
            truncation: Truncation::default(),
            seed: 42,
            load: LoadOptions::default(),
        }
    }
}

impl DatasetConfig {
    /// The transforms this configuration asks for, in order: the explicit list, the system
    /// prompt, the thinking pattern, the stop pattern.
    pub fn transform_configs(&self) -> Vec<TransformConfig> {
        let mut out = self.transforms.clone();
        if let Some(prompt) = &self.system_prompt {
            out.push(TransformConfig::SystemPrompt {
                prompt: prompt.clone(),
            });
        }
        if self.apply_thinking_pattern {
            let emoji = (!self.thinking_emoji.is_empty()).then(|| self.thinking_emoji.clone());
            out.push(TransformConfig::ThinkingPattern {
                emoji,
                min_count: 2,
                max_count: 8,
            });
        }
        if self.apply_stop_pattern {
            out.push(TransformConfig::StopPattern {
                emoji: None,
                min_count: 2,
                max_count: 4,
            });
        }
        out
    }

    /// Checks the settings (ranges, transforms); [`prepare`] does it first.
    pub fn validate(&self) -> Result<()> {
        check_max_length(self.max_length)?;
        ValidationSplit::from_value(self.validation_split)?;
        Ok(())
    }
}

/// `max_length` when none is given.
pub const DEFAULT_MAX_LENGTH: usize = 4096;

/// The one check of a `max_length`: from 2 (one input and one predicted token) to
/// [`MAX_LENGTH`].
pub fn check_max_length(max_length: usize) -> Result<()> {
    if max_length < 2 {
        return Err(DataError::config(
            "max_length",
            format!("{max_length} is too small (at least 2)"),
        ));
    }
    if max_length > MAX_LENGTH {
        return Err(DataError::config(
            "max_length",
            format!("{max_length} is above the limit of {MAX_LENGTH}"),
        ));
    }
    Ok(())
}

/// Counts that describe a prepared dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// Rows read from the file.
    pub rows_read: usize,
    /// Rows dropped as invalid (skip policy) or failing the template.
    pub invalid_rows: usize,
    /// Examples kept.
    pub examples: usize,
    /// Of which in the training split.
    pub train_examples: usize,
    /// Of which in the validation split.
    pub validation_examples: usize,
    /// Tokens of the kept examples (after truncation).
    pub tokens: usize,
    /// Tokens that contribute to the loss.
    pub label_tokens: usize,
    /// Label tokens the chat template inserted (e.g. Qwen3's empty `<think>` block).
    pub template_label_tokens: usize,
    /// Examples cut to `max_length`.
    pub truncated_rows: usize,
    /// Examples dropped for length (`truncation = "drop"`).
    pub dropped_rows: usize,
    /// Tokens removed by truncation or dropping.
    pub tokens_lost: usize,
    /// Examples excluded because truncation left them without label tokens.
    pub rows_without_labels: usize,
    /// The maximum length.
    pub max_length: usize,
    /// Longest kept example.
    pub longest: usize,
    /// Mean tokens per kept example.
    pub mean_tokens: f64,
    /// Rows of `max_length` that best-fit-decreasing packing of the training split needs.
    pub packed_rows: usize,
    /// Tokens / (packed rows × `max_length`).
    pub packing_efficiency: f64,
    /// Every example of the data file came from a `text` row (then packing is the default).
    #[serde(default)]
    pub all_text: bool,
}

/// A prepared dataset.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// Training examples, in file order.
    pub train: Vec<Example>,
    /// Validation examples, in file order.
    pub validation: Vec<Example>,
    /// The training split as the loop visits it (packed when the configuration asks for it).
    pub rows: TrainRows,
    /// [`cache_key`] of the preparation when it went through [`prepare_cached`] (empty
    /// otherwise): what a checkpoint records to refuse a resume on other data.
    pub fingerprint: String,
    /// The numbers.
    pub stats: DataStats,
    /// Problems met (dropped rows, warnings).
    pub problems: Vec<Problem>,
}

/// Prepares `config.dataset_path` with `tokenizer` (its label mode is replaced by the
/// configuration's). `extra` transforms run after the configured ones.
pub fn prepare(
    config: &DatasetConfig,
    tokenizer: &ChatTokenizer,
    extra: Option<&TransformPipeline>,
) -> Result<Prepared> {
    config.validate()?;
    let mut problems = Vec::new();
    let mut stats = DataStats {
        max_length: config.max_length,
        ..DataStats::default()
    };
    let (examples, all_text) = encode_file(
        &config.dataset_path,
        config,
        tokenizer,
        extra,
        &mut stats,
        &mut problems,
    )?;
    let (train, validation) = match &config.eval_dataset_path {
        Some(eval) => {
            let (validation, _) =
                encode_file(eval, config, tokenizer, extra, &mut stats, &mut problems)?;
            (examples, validation)
        }
        None => split_examples(examples, config)?,
    };
    stats.all_text = all_text;
    let rows = fill_stats(
        &mut stats,
        &train,
        &validation,
        config.packing.unwrap_or(all_text),
    );
    // Rows of the evaluation file come after those of the data file.
    problems.sort_by_key(|p| (p.location.path != config.dataset_path, p.location.row));
    Ok(Prepared {
        train,
        validation,
        rows,
        fingerprint: String::new(),
        stats,
        problems,
    })
}

/// Splits the examples of the data file into training and validation examples.
fn split_examples(
    examples: Vec<Example>,
    config: &DatasetConfig,
) -> Result<(Vec<Example>, Vec<Example>)> {
    let split = ValidationSplit::from_value(config.validation_split)?;
    let (train_idx, val_idx) = split_indices(examples.len(), split, config.seed);
    let mut slots: Vec<Option<Example>> = examples.into_iter().map(Some).collect();
    let take = |idx: &[usize], slots: &mut Vec<Option<Example>>| -> Vec<Example> {
        idx.iter()
            .filter_map(|&i| slots.get_mut(i).and_then(Option::take))
            .collect()
    };
    let validation = take(&val_idx, &mut slots);
    let train = take(&train_idx, &mut slots);
    Ok((train, validation))
}

/// Loads, transforms and tokenizes the rows of `path`, fitting them to `max_length`: the
/// examples to train or evaluate on, and whether every one came from a `text` row. Counts go
/// into `stats`, the rows' problems into `problems`.
fn encode_file(
    path: &Path,
    config: &DatasetConfig,
    tokenizer: &ChatTokenizer,
    extra: Option<&TransformPipeline>,
    stats: &mut DataStats,
    problems: &mut Vec<Problem>,
) -> Result<(Vec<Example>, bool)> {
    let loaded = load_conversations(path, &config.load)?;
    let pipeline = TransformPipeline::from_configs(&config.transform_configs())?;
    let mut conversations = loaded.conversations;
    for c in conversations.iter_mut().filter(|c| !c.plain) {
        // Rows without a chat template (`text`, plain prompt/completion) are not transformed:
        // the transforms work on turns.
        let row = c.location.as_ref().map_or(0, |l| l.row);
        pipeline.apply(c, config.seed, row);
        if let Some(extra) = extra {
            // A seed of their own, so adding a custom transform never changes the built-ins' choices.
            extra.apply(c, config.seed ^ 0xC057_0000, row);
        }
    }
    stats.rows_read += loaded.rows_read;
    stats.invalid_rows += loaded
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| p.location.row)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    problems.extend(loaded.problems);

    let mode = config.label_mode;
    // A failure of the template itself (a bound exceeded, see `is_template_failure`) would
    // repeat on every row: the first one stops the preparation, whatever the error policy.
    let copies = worker_copies(tokenizer, conversations.len());
    let encoded: Vec<Result<crate::tokenize::Encoded>> = conversations
        .par_iter()
        .map(|c| {
            let tokenizer = rayon::current_thread_index()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| copies.get(i))
                .unwrap_or(tokenizer);
            tokenizer.encode_with_mode(c, mode)
        })
        .map(|enc| match enc {
            Err(e) if crate::template::is_template_failure(&e) => Err(e),
            enc => Ok(enc),
        })
        .collect::<Result<_>>()?;
    let mut examples = Vec::with_capacity(conversations.len());
    for (c, enc) in conversations.iter().zip(encoded) {
        let location = c.location.clone().unwrap_or(RowLocation {
            path: path.to_path_buf(),
            line: None,
            row: 0,
        });
        let enc = match enc {
            Ok(e) => e,
            Err(e) if config.load.policy == ErrorPolicy::Skip => {
                problems.push(Problem::new(
                    location,
                    "",
                    ProblemKind::Template,
                    e.to_string(),
                ));
                stats.invalid_rows += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let example = Example {
            row: location.row,
            input_ids: enc.input_ids,
            labels: enc.labels,
        };
        let had_labels = example.label_tokens() > 0;
        let tokens = example.len();
        // Position 0 is never trained (nothing precedes it), as in `Example::label_tokens`.
        let first_label = example
            .labels
            .iter()
            .skip(1)
            .position(|&l| l != crate::batch::IGNORE_INDEX)
            .map_or(0, |p| p + 1);
        let example = match fit(example, config.max_length, config.truncation) {
            Fitted::Unchanged(e) => e,
            Fitted::Truncated { example, lost } => {
                stats.truncated_rows += 1;
                stats.tokens_lost += lost;
                example
            }
            Fitted::Dropped { tokens } => {
                stats.dropped_rows += 1;
                stats.tokens_lost += tokens;
                problems.push(Problem::new(
                    location,
                    "",
                    ProblemKind::TooLong,
                    format!(
                        "{tokens} tokens, over the maximum of {}: dropped",
                        config.max_length
                    ),
                ));
                continue;
            }
        };
        if example.label_tokens() == 0 {
            stats.rows_without_labels += 1;
            let why = if had_labels {
                format!(
                    "truncation to max_length {} removed every label token (the first label token was at \
                     position {first_label} of {tokens})",
                    config.max_length
                )
            } else {
                format!(
                    "no label tokens: the rendering has no assistant tokens to train with label_mode {}",
                    serde_json::to_string(&config.label_mode)
                        .unwrap_or_default()
                        .trim_matches('"')
                )
            };
            problems.push(Problem::new(
                location,
                "",
                ProblemKind::AllLabelsTruncated,
                format!("{why}: the row is not trained"),
            ));
            continue;
        }
        stats.template_label_tokens += enc.template_label_tokens.min(example.label_tokens());
        examples.push(example);
    }
    let all_text = !conversations.is_empty()
        && conversations
            .iter()
            .all(|c| c.plain && c.completion_from.is_none());
    Ok((examples, all_text))
}

/// Rows from which each worker thread after the first gets a copy of the tokenizer: a shared
/// `tokenizers::Tokenizer` makes the threads contend for its regex pools and BPE cache (two
/// threads spent 1.7 s more CPU than one on 24k rows), while a copy costs tens of ms.
const ROWS_PER_TOKENIZER_COPY: usize = 2048;

/// Copies of `tokenizer` for the rayon threads with index 1, 2, … (thread 0 uses the original).
fn worker_copies(tokenizer: &ChatTokenizer, rows: usize) -> Vec<ChatTokenizer> {
    let wanted =
        (rows / ROWS_PER_TOKENIZER_COPY).min(rayon::current_num_threads().saturating_sub(1));
    (0..wanted)
        .into_par_iter()
        .map(|_| tokenizer.clone())
        .collect()
}

/// Fills the counts of `stats` and returns the training rows: packing runs once, for the
/// statistics (packing efficiency) and, with `packing`, for the rows.
fn fill_stats(
    stats: &mut DataStats,
    train: &[Example],
    validation: &[Example],
    packing: bool,
) -> TrainRows {
    let all = train.iter().chain(validation);
    stats.train_examples = train.len();
    stats.validation_examples = validation.len();
    stats.examples = train.len() + validation.len();
    stats.tokens = all.clone().map(Example::len).sum();
    stats.label_tokens = all.clone().map(Example::label_tokens).sum();
    stats.longest = all.map(Example::len).max().unwrap_or(0);
    stats.mean_tokens = if stats.examples == 0 {
        0.0
    } else {
        stats.tokens as f64 / stats.examples as f64
    };
    let packed = TrainRows::packed(train, stats.max_length);
    stats.packed_rows = packed.len();
    stats.packing_efficiency = packed.packing_efficiency.unwrap_or(1.0);
    if packing {
        packed
    } else {
        TrainRows::one_per_example(train)
    }
}

/// Writes a prepared dataset: `train.parquet`, `validation.parquet`, `stats.json` and
/// `problems.json`.
pub fn write_prepared(dir: &Path, prepared: &Prepared) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    write_examples(&dir.join("train.parquet"), &prepared.train)?;
    write_examples(&dir.join("validation.parquet"), &prepared.validation)?;
    write_json(&dir.join("problems.json"), &prepared.problems)?;
    write_json(&dir.join("stats.json"), &prepared.stats)
}

/// Largest `stats.json` / `problems.json` of a prepared dataset, in bytes.
const MAX_SIDE_FILE_BYTES: u64 = 256 << 20;

/// Reads a dataset written by [`write_prepared`] (its training rows one per example: the
/// directory does not record packing). The examples' structure is checked (see
/// [`read_examples`]); their token ids are checked against a tokenizer by
/// [`check_examples`], which [`prepare_cached`] does.
pub fn read_prepared(dir: &Path) -> Result<Prepared> {
    read_laid_out(dir, None)
}

/// How the training rows of a read dataset are laid out: packed to a length (with `packing`,
/// or when unset for a dataset of `text` rows), or one per example.
type Layout = Option<(usize, Option<bool>)>;

/// [`read_prepared`] with the training rows laid out once: packed (see [`Layout`]), or one
/// per example.
fn read_laid_out(dir: &Path, layout: Layout) -> Result<Prepared> {
    let stats_path = dir.join("stats.json");
    let stats: DataStats = serde_json::from_slice(&read_bounded(
        &stats_path,
        MAX_SIDE_FILE_BYTES,
        "stats.json",
    )?)
    .map_err(|e| DataError::file(&stats_path, e.to_string()))?;
    let train = read_examples(&dir.join("train.parquet"))?;
    let packed_to =
        layout.and_then(|(len, packing)| packing.unwrap_or(stats.all_text).then_some(len));
    Ok(Prepared {
        rows: match packed_to {
            Some(len) => TrainRows::packed(&train, len),
            None => TrainRows::one_per_example(&train),
        },
        train,
        validation: read_examples(&dir.join("validation.parquet"))?,
        fingerprint: String::new(),
        stats,
        problems: Vec::new(),
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| DataError::file(path, e.to_string()))?;
    train_fs::write_atomic(path, text.as_bytes()).map_err(|e| DataError::io(path, e))
}

/// The cache key of a preparation: the data file, the tokenizer, the template and its special
/// tokens, the configuration and this crate's version.
pub fn cache_key(config: &DatasetConfig, tokenizer: &ChatTokenizer) -> Result<String> {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    let mut file = open_regular(&config.dataset_path)?;
    std::io::copy(&mut file, &mut HashWriter(&mut h))
        .map_err(|e| DataError::io(&config.dataset_path, e))?;
    if let Some(eval) = &config.eval_dataset_path {
        h.update(b"\0eval\0");
        let mut file = open_regular(eval)?;
        std::io::copy(&mut file, &mut HashWriter(&mut h)).map_err(|e| DataError::io(eval, e))?;
    }
    let tok = tokenizer
        .tokenizer()
        .to_string(false)
        .map_err(|e| DataError::config("tokenizer", e.to_string()))?;
    h.update(tok.as_bytes());
    h.update(tokenizer.template().source().as_bytes());
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        h.update(
            tokenizer
                .template()
                .special_token(key)
                .unwrap_or("")
                .as_bytes(),
        );
        h.update([0]);
    }
    let mut cfg = config.clone();
    cfg.dataset_path = PathBuf::new();
    if cfg.eval_dataset_path.is_some() {
        cfg.eval_dataset_path = Some(PathBuf::new());
    }
    let mut cfg =
        serde_json::to_value(&cfg).map_err(|e| DataError::config("dataset", e.to_string()))?;
    // The tokenized examples do not depend on packing (the rows are built from them when the
    // dataset is read), so one cache entry serves both layouts, and a key is what it was
    // before the setting existed (the workspace's serde_json keeps the fields' order).
    if let Some(fields) = cfg.as_object_mut() {
        fields.shift_remove("packing");
    }
    h.update(cfg.to_string().as_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// [`prepare`] through an on-disk cache under `cache_dir`: a second run with the same data
/// file, tokenizer, template and configuration reads the tokenized dataset instead of
/// tokenizing again. Returns the dataset (its [`Prepared::fingerprint`] is the cache key: the
/// data file is hashed once) and whether it came from the cache.
///
/// A cache entry is checked before it is used: its Parquet files go through the decoding
/// bounds and structure checks of [`read_examples`], and every token id must be below the
/// tokenizer's vocabulary size and every example within `max_length`. An entry that fails
/// (tampered with, damaged, or written by something else) is not used: the dataset is prepared
/// again from the data file, which replaces the entry, and a [`ProblemKind::InvalidCache`]
/// warning naming the cache file and what was wrong is added to the problems. Rebuilding is the
/// safe choice: the entry is only derived data, and the rebuilt one comes from the data file
/// that the cache key vouches for.
pub fn prepare_cached(
    config: &DatasetConfig,
    tokenizer: &ChatTokenizer,
    cache_dir: &Path,
) -> Result<(Prepared, bool)> {
    let key = cache_key(config, tokenizer)?;
    let dir = cache_dir.join(&key);
    let mut rejected = None;
    if dir.join("stats.json").is_file() {
        match read_cached(&dir, config, tokenizer) {
            Ok(mut cached) => {
                cached.fingerprint = key;
                return Ok((cached, true));
            }
            Err(e) => rejected = Some(e),
        }
    }
    let mut prepared = prepare(config, tokenizer, None)?;
    prepared.fingerprint = key.clone();
    let tmp = cache_dir.join(format!("{key}.tmp-{}", std::process::id()));
    write_prepared(&tmp, &prepared)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| DataError::io(&dir, e))?;
    if let Some(e) = rejected {
        prepared.problems.insert(
            0,
            Problem::new(
                RowLocation {
                    path: dir.clone(),
                    line: None,
                    row: 0,
                },
                "",
                ProblemKind::InvalidCache,
                format!("the cached tokenized dataset was not used and has been rebuilt: {e}"),
            ),
        );
    }
    Ok((prepared, false))
}

/// A cache entry, checked against the tokenizer and the configuration.
fn read_cached(dir: &Path, config: &DatasetConfig, tokenizer: &ChatTokenizer) -> Result<Prepared> {
    let mut cached = read_laid_out(dir, Some((config.max_length, config.packing)))?;
    let vocab = tokenizer.vocab_size();
    check_examples(
        &dir.join("train.parquet"),
        &cached.train,
        vocab,
        config.max_length,
    )?;
    check_examples(
        &dir.join("validation.parquet"),
        &cached.validation,
        vocab,
        config.max_length,
    )?;
    let problems_path = dir.join("problems.json");
    if let Ok(bytes) = read_bounded(&problems_path, MAX_SIDE_FILE_BYTES, "problems.json") {
        cached.problems = serde_json::from_slice::<Vec<ProblemRecord>>(&bytes)
            .map(|v| v.into_iter().map(ProblemRecord::into_problem).collect())
            .unwrap_or_default();
    }
    Ok(cached)
}

#[derive(Deserialize)]
struct ProblemRecord {
    location: LocationRecord,
    field: String,
    kind: ProblemKind,
    message: String,
}

#[derive(Deserialize)]
struct LocationRecord {
    path: PathBuf,
    line: Option<usize>,
    row: usize,
}

impl ProblemRecord {
    fn into_problem(self) -> Problem {
        Problem::new(
            RowLocation {
                path: self.location.path,
                line: self.location.line,
                row: self.location.row,
            },
            self.field,
            self.kind,
            self.message,
        )
    }
}
