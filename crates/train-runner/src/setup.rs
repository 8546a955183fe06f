//! What a run needs ([`TrainSetup`], [`Resume`]) and the checks before its first step: a
//! resume continues its own run from its own model, the output directory is claimed (earlier
//! checkpoints moved aside or refused), the token ids fit the model.

use std::path::{Path, PathBuf};

use serde_json::Value;
use train_data::{Example, TrainRows};
use train_model::FusedAutodiffBackend;
use train_model::{CausalLm, IGNORE_INDEX, Pretrained, StorageDtype};

use crate::checkpoint::{
    TrainerState, checkpoint_run_id, list_checkpoints, set_aside, verify_checkpoint,
};
use crate::config::TrainerConfig;
use crate::error::{Result, RunnerError};
use crate::observer::TrainObserver;

/// Everything a run needs.
pub struct TrainSetup<B: FusedAutodiffBackend> {
    /// The model to train (loaded from the checkpoint when resuming).
    pub model: CausalLm<B>,
    /// The source `config.json` (carried into checkpoints and the final model).
    pub raw_config: Value,
    /// The source model directory (its tokenizer files are carried along).
    pub companions_from: PathBuf,
    /// The dtype of the source weights (the final model's default dtype).
    pub source_dtype: StorageDtype,
    /// The training rows (`train_data::Prepared::rows`: one per example, or packed).
    pub train: TrainRows,
    /// Validation examples.
    pub validation: Vec<Example>,
    /// Padding token id.
    pub pad_id: u32,
    /// The settings.
    pub config: TrainerConfig,
    /// Fingerprint of the data (from `train_data::cache_key`), recorded in checkpoints.
    pub data_fingerprint: String,
    /// Start over in an output directory that already holds checkpoints (the seed's `--yes`).
    pub overwrite: bool,
    /// The workers: this machine's devices and its place in a multi-machine run (one worker on
    /// the model's device by default).
    pub parallelism: crate::Parallelism<B>,
    /// Other directories the run reads (e.g. the adapter directory given as the model): the
    /// output may not be any of them, nor `companions_from`, nor the checkpoint resumed.
    pub inputs: Vec<PathBuf>,
}

impl<B: FusedAutodiffBackend> TrainSetup<B> {
    /// A setup that trains `source` (a loaded checkpoint, whose directory provides the
    /// configuration and tokenizer files carried into checkpoints) on `train` (e.g.
    /// [`TrainRows::one_per_example`] or `prepared.rows`), evaluating on
    /// `validation`; no data fingerprint, and an output directory with checkpoints is refused
    /// (set `overwrite` to start over in it).
    pub fn new(
        source: Pretrained<B>,
        train: TrainRows,
        validation: Vec<Example>,
        pad_id: u32,
        config: TrainerConfig,
    ) -> Self {
        let device = source.model.embed_tokens.val().device();
        Self {
            parallelism: crate::Parallelism::single(device),
            model: source.model,
            raw_config: source.raw_config,
            companions_from: source.dir,
            source_dtype: source.source_dtype,
            train,
            validation,
            pad_id,
            config,
            data_fingerprint: String::new(),
            overwrite: false,
            inputs: Vec::new(),
        }
    }
}

/// The state of a checkpoint to continue from.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Its trainer state.
    pub state: TrainerState,
}

impl Resume {
    /// Verifies the checkpoint `dir` ([`verify_checkpoint`]: every file present and unchanged
    /// since it was saved) and reads its state.
    pub fn from_checkpoint(dir: &Path) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            state: verify_checkpoint(dir)?,
        })
    }
}

pub(crate) fn check_resumable(
    config: &TrainerConfig,
    packed_to: Option<usize>,
    workers: (usize, usize),
    resume: &Resume,
    fingerprint: &str,
    model: &str,
    model_dir: &Path,
) -> Result<()> {
    let old = &resume.state.config;
    let same: [(&str, bool); 8] = [
        ("batch_size", old.batch_size == config.batch_size),
        (
            "gradient_accumulation_steps",
            old.gradient_accumulation_steps == config.gradient_accumulation_steps,
        ),
        ("seed", old.seed == config.seed),
        ("shuffle", old.shuffle == config.shuffle),
        (
            "packing",
            resume.state.packed_to.is_some() == packed_to.is_some(),
        ),
        ("max_length", resume.state.packed_to == packed_to),
        ("devices", resume.state.devices == workers.0),
        ("nodes", resume.state.nodes == workers.1),
    ];
    if let Some((field, _)) = same.iter().find(|(_, ok)| !ok) {
        return Err(RunnerError::Checkpoint {
            path: resume.dir.clone(),
            message: format!(
                "`{field}` differs from the interrupted run; resume with the same data settings"
            ),
        });
    }
    if resume.state.data_fingerprint != fingerprint {
        return Err(RunnerError::Checkpoint {
            path: resume.dir.clone(),
            message: "the dataset (or its tokenization settings) changed since this checkpoint was written".into(),
        });
    }
    let recorded = &resume.state.model_fingerprint;
    if !recorded.is_empty() && recorded != model {
        let source = resume
            .state
            .model_source
            .as_ref()
            .map_or_else(|| "another model".to_string(), |p| p.display().to_string());
        return Err(RunnerError::OtherModel {
            path: resume.dir.clone(),
            trained_from: source,
            trained_hash: recorded.chars().take(12).collect(),
            given: model_dir.display().to_string(),
            given_hash: model.chars().take(12).collect(),
        });
    }
    Ok(())
}

/// True when `a` and `b` name the same existing directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Makes sure that no checkpoint in `output` can be taken for one of this run's: a run from
/// scratch owns none of them, a resume owns those of its own run up to the step it resumes
/// from. The others — of an earlier run, or newer ones that a resume from an older checkpoint
/// abandons — are refused unless `overwrite` (`--yes`), and then moved to
/// `OUTPUT/set-aside/…` (never deleted) before the first save; damaged ones that a resume
/// skipped are moved there without asking.
pub(crate) fn claim_output<B: FusedAutodiffBackend>(
    output: &Path,
    resume: Option<&Resume>,
    overwrite: bool,
    observer: &mut dyn TrainObserver<B>,
) -> Result<()> {
    let all = list_checkpoints(output);
    let ours = |step: usize, dir: &Path| {
        resume.is_some_and(|r| {
            step <= r.state.global_step
                && std::path::absolute(&r.dir)
                    .ok()
                    .and_then(|d| d.parent().map(|p| same_dir(p, output)))
                    .unwrap_or(false)
                && checkpoint_run_id(dir).as_deref() == Some(r.state.run_id.as_str())
        })
    };
    let (mut foreign, mut damaged) = (Vec::new(), Vec::new());
    for (step, dir) in &all {
        if ours(*step, dir) {
            continue;
        }
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if resume.is_some() && verify_checkpoint(dir).is_err() {
            damaged.push(name);
        } else {
            foreign.push(name);
        }
    }
    let stamp = train_monitor_stamp();
    if !damaged.is_empty() {
        let dest = set_aside(output, &damaged, &format!("damaged-{stamp}"))?;
        observer.notice(&format!(
            "moved the damaged {} to {}",
            damaged.join(", "),
            dest.display()
        ));
    }
    if foreign.is_empty() {
        return Ok(());
    }
    if !overwrite {
        return Err(match resume {
            None => RunnerError::OutputNotEmpty {
                path: output.to_path_buf(),
            },
            Some(r) => RunnerError::WouldAbandon {
                path: r.dir.clone(),
                step: r.state.global_step,
                abandoned: foreign,
                output: output.to_path_buf(),
            },
        });
    }
    let label = match resume {
        None => format!("previous-run-{stamp}"),
        Some(r) => format!("abandoned-after-step-{}-{stamp}", r.state.global_step),
    };
    let dest = set_aside(output, &foreign, &label)?;
    observer.notice(&format!(
        "moved {} to {} (delete it when you no longer need it)",
        foreign.join(", "),
        dest.display()
    ));
    Ok(())
}

/// Seconds since the epoch, for names of set-aside directories.
pub(crate) fn train_monitor_stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refuses examples with a token id or label the model cannot take (outside its vocabulary):
/// a tokenizer that does not belong to the model, or an altered data cache.
pub fn check_token_ids(examples: &[Example], vocab_size: usize) -> Result<()> {
    check_ids(
        examples.iter().map(|e| {
            (
                format!("row {}", e.row + 1),
                &e.input_ids[..],
                &e.labels[..],
            )
        }),
        vocab_size,
    )
}

/// [`check_token_ids`] for the training rows (packed rows are named by their index).
pub(crate) fn check_row_ids(
    rows: &[train_data::Sequence],
    packed_to: Option<usize>,
    vocab_size: usize,
) -> Result<()> {
    check_ids(
        rows.iter().enumerate().map(|(i, r)| {
            let name = match packed_to {
                Some(_) => format!("packed training row {}", i + 1),
                None => format!("training row {}", i + 1),
            };
            (name, &r.input_ids[..], &r.labels[..])
        }),
        vocab_size,
    )
}

/// Refuses micro-batches larger than [`limits::MAX_MICRO_BATCH_TOKENS`](crate::limits): `batch_size`
/// rows of the longest training row (of `max_length` with packing).
pub(crate) fn check_micro_batch(
    rows: &[train_data::Sequence],
    packed_to: Option<usize>,
    batch_size: usize,
) -> Result<()> {
    use crate::config::limits::MAX_MICRO_BATCH_TOKENS;
    let (row, what) = match packed_to {
        Some(len) => (len, "max_length (packing)"),
        None => (
            rows.iter()
                .map(train_data::Sequence::len)
                .max()
                .unwrap_or(0),
            "the longest example",
        ),
    };
    let tokens = batch_size.saturating_mul(row);
    if tokens > MAX_MICRO_BATCH_TOKENS {
        return Err(RunnerError::config(
            "max_length",
            format!(
                "batch_size {batch_size} × {what} {row} = {tokens} tokens per micro-batch, above \
                 the limit {MAX_MICRO_BATCH_TOKENS}"
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_ids<'a>(
    rows: impl Iterator<Item = (String, &'a [u32], &'a [i32])>,
    vocab_size: usize,
) -> Result<()> {
    for (name, input_ids, labels) in rows {
        let bad_id = input_ids.iter().find(|&&t| t as usize >= vocab_size);
        let bad_label = labels
            .iter()
            .find(|&&l| l != IGNORE_INDEX as i32 && (l < 0 || l as usize >= vocab_size));
        if let Some(t) = bad_id
            .map(|&t| i64::from(t))
            .or(bad_label.map(|&l| i64::from(l)))
        {
            return Err(RunnerError::config(
                "dataset",
                format!(
                    "{name}: token id {t} is outside the model's vocabulary (vocab_size {vocab_size}); \
                     the tokenizer does not belong to this model, or the tokenized data was altered"
                ),
            ));
        }
        if labels.len() != input_ids.len() {
            return Err(RunnerError::config(
                "dataset",
                format!(
                    "{name}: {} labels for {} tokens (the tokenized data was altered)",
                    labels.len(),
                    input_ids.len()
                ),
            ));
        }
    }
    Ok(())
}
