//! `train dpo`: preference training on pairs of completions (TRL's `DPOTrainer`), with every
//! training flag of `train run`; `train orpo` (TRL's `ORPOTrainer`) is the same command with
//! the ORPO loss and no reference model.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use train_data::{
    ChatTokenizer, EncodedPair, Example, Problem, ProblemKind, Sequence, TrainRows,
    ValidationSplit, load_preferences, split_indices,
};
use train_model::{CausalLm, FusedAutodiffBackend, FusedBackend};
use train_runner::{
    Collate, DpoConfig, DpoLossType, PairBatch, PairRow, Parallelism, RunControl, RunSummary,
    TrainSetup, completion_logps,
};

use crate::backend::{Placement, WithBackend};
use crate::run_cmd::{
    Launch, RunArgs, execute, observed_plain, reference_model, refuse_sft_options, row_location,
    skip_row,
};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossTypeArg {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    Simpo,
    /// Only through `train orpo`.
    #[value(skip)]
    Orpo,
}

/// `train dpo`.
#[derive(Args, Debug, Clone)]
pub struct DpoArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// β: how far the policy may move from the reference (TRL's default 0.1).
    #[arg(long, default_value_t = DpoConfig::default().beta)]
    pub beta: f64,
    /// The loss: sigmoid (the DPO paper's), ipo, hinge (SLiC), robust, or simpo (no reference
    /// model; length-normalised, with --simpo-gamma).
    #[arg(long, value_enum, default_value_t = LossTypeArg::Sigmoid)]
    pub loss_type: LossTypeArg,
    /// The assumed rate of flipped preference labels (sigmoid, robust and simpo).
    #[arg(long, default_value_t = DpoConfig::default().label_smoothing)]
    pub label_smoothing: f64,
    /// SimPO's target reward margin γ.
    #[arg(long, default_value_t = DpoConfig::default().simpo_gamma)]
    pub simpo_gamma: f64,
    /// The reference model (default: the starting weights of --model; for a LoRA run, the base
    /// model without the adapter).
    #[arg(long, value_name = "DIR")]
    pub ref_model: Option<String>,
    /// Also keep the reference's log-probabilities on disk with the prepared data (in
    /// --cache-dir, or OUTPUT/.cache), keyed by the tokenized data and the reference's weights,
    /// so that another run or a resume on the same data skips the reference pass. They are
    /// always computed once, before the first step.
    #[arg(long)]
    pub precompute_ref_logps: bool,
}

/// `train orpo`.
#[derive(Args, Debug, Clone)]
pub struct OrpoArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// λ (TRL's `beta`): the weight of the odds-ratio term next to the chosen conversation's
    /// NLL (TRL's default 0.1).
    #[arg(long, default_value_t = DpoConfig::default().beta)]
    pub beta: f64,
}

/// `train orpo`: `train dpo` with the ORPO loss (no reference model).
pub fn orpo(args: &OrpoArgs) -> Result<ExitCode> {
    dpo(&DpoArgs {
        run: args.run.clone(),
        beta: args.beta,
        loss_type: LossTypeArg::Orpo,
        label_smoothing: 0.0,
        simpo_gamma: DpoConfig::default().simpo_gamma,
        ref_model: None,
        precompute_ref_logps: false,
    })
}

impl DpoArgs {
    /// The command, as messages name it.
    fn command(&self) -> &'static str {
        if self.loss_type == LossTypeArg::Orpo {
            "train orpo"
        } else {
            "train dpo"
        }
    }

    fn dpo_config(&self) -> DpoConfig {
        DpoConfig {
            beta: self.beta,
            loss_type: match self.loss_type {
                LossTypeArg::Sigmoid => DpoLossType::Sigmoid,
                LossTypeArg::Ipo => DpoLossType::Ipo,
                LossTypeArg::Hinge => DpoLossType::Hinge,
                LossTypeArg::Robust => DpoLossType::Robust,
                LossTypeArg::Simpo => DpoLossType::Simpo,
                LossTypeArg::Orpo => DpoLossType::Orpo,
            },
            label_smoothing: self.label_smoothing,
            simpo_gamma: self.simpo_gamma,
        }
    }
}

/// One tokenized pair, before its reference log-probabilities are known.
struct Tokenized {
    chosen: Sequence,
    rejected: Sequence,
}

impl Tokenized {
    /// The pair as a training row, its reference log-probabilities 0 until known.
    fn unscored(self) -> PairRow {
        PairRow {
            chosen: self.chosen,
            rejected: self.rejected,
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        }
    }
}

fn sequence(row: usize, e: train_data::Encoded) -> Sequence {
    Sequence::pack(&[&Example {
        row,
        input_ids: e.input_ids,
        labels: e.labels,
    }])
}

/// Loads, checks and tokenizes the pairs of `config.dataset_path`: a pair longer than
/// `max_length` (either conversation) or without a completion token is a problem of its row,
/// reported and skipped or fatal per the error policy.
fn tokenized_pairs(
    config: &train_data::DatasetConfig,
    tok: &ChatTokenizer,
) -> Result<Vec<Tokenized>> {
    tokenized_pairs_of(&config.dataset_path, config, tok)
}

/// The pairs of `path` (the data file or the evaluation file), tokenized.
fn tokenized_pairs_of(
    path: &std::path::Path,
    config: &train_data::DatasetConfig,
    tok: &ChatTokenizer,
) -> Result<Vec<Tokenized>> {
    let loaded = load_preferences(path, &config.load)?;
    for p in &loaded.problems {
        errln!("{p}");
    }
    let mut out = Vec::with_capacity(loaded.pairs.len());
    for pair in &loaded.pairs {
        let EncodedPair { chosen, rejected } = tok.encode_pair(pair)?;
        let location = row_location(pair.location.as_ref(), config);
        let longest = chosen.input_ids.len().max(rejected.input_ids.len());
        let problem = if longest > config.max_length {
            Some(Problem::new(
                location.clone(),
                "",
                ProblemKind::TooLong,
                format!(
                    "{longest} tokens, longer than max_length {} (a pair is not truncated: \
                     raise --max-length, or drop such pairs with --truncation drop)",
                    config.max_length
                ),
            ))
        } else if [&chosen, &rejected].iter().any(|e| {
            e.labels
                .iter()
                .skip(1)
                .all(|&l| l == train_data::IGNORE_INDEX)
        }) {
            Some(Problem::new(
                location.clone(),
                "",
                ProblemKind::AllLabelsTruncated,
                "a completion has no token to score",
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            skip_row(config, p)?;
            continue;
        }
        out.push(Tokenized {
            chosen: sequence(location.row, chosen),
            rejected: sequence(location.row, rejected),
        });
    }
    Ok(out)
}

/// The reference's summed log-probabilities of each pair's completions, in micro-batches of
/// `batch_size` pairs.
fn with_reference<B: FusedBackend>(
    reference: &CausalLm<B>,
    pairs: Vec<Tokenized>,
    batch_size: usize,
    pad_id: u32,
) -> Vec<PairRow> {
    let mut out: Vec<PairRow> = pairs.into_iter().map(Tokenized::unscored).collect();
    for chunk in out.chunks_mut(batch_size.max(1)) {
        let batch = PairRow::collate(chunk.to_vec(), pad_id);
        let logps = completion_logps(reference, &batch.batch);
        let n = chunk.len();
        for (i, row) in chunk.iter_mut().enumerate() {
            row.ref_chosen = logps[i].0;
            row.ref_rejected = logps[n + i].0;
        }
    }
    out
}

/// The reference's log-probabilities of a dataset's pairs on disk: one JSON file per
/// (tokenized data, reference weights, backend, precision, micro-batch size), since each changes
/// the numbers.
struct ReferenceCache {
    path: PathBuf,
}

/// Largest reference cache file read.
const MAX_REFERENCE_CACHE_BYTES: u64 = 1 << 30;

impl ReferenceCache {
    fn new<B: FusedBackend>(
        dir: &Path,
        data_fingerprint: &str,
        reference: &CausalLm<B>,
        batch: usize,
    ) -> Result<Self> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"train-rs dpo reference log-probabilities v1\0");
        h.update(data_fingerprint.as_bytes());
        h.update(std::any::type_name::<B>().as_bytes());
        h.update(format!("\0{:?}\0{batch}\0", reference.dtype()).as_bytes());
        let mut failed = None;
        reference.visit_named(|p| {
            let data = match p {
                train_model::NamedParam::Vector(n, t) => (n, t.val().into_data()),
                train_model::NamedParam::Matrix(n, t) => (n, t.val().into_data()),
            };
            h.update(data.0.as_bytes());
            match data.1.convert::<f32>().to_vec::<f32>() {
                Ok(v) => v.iter().for_each(|x| h.update(x.to_le_bytes())),
                Err(e) => failed = Some(format!("{e:?}")),
            }
        });
        if let Some(e) = failed {
            bail!("reading the reference's weights: {e}");
        }
        let key = format!("{:x}", h.finalize());
        Ok(Self {
            path: dir.join(format!("{}.json", &key[..32])),
        })
    }

    /// The pairs with their reference log-probabilities from the cache, when it has an entry
    /// that fits them (as many pairs, every value finite and ≤ 0).
    fn read(&self, pairs: &[Tokenized]) -> Option<Vec<PairRow>> {
        let text = train_model::read_text_file(&self.path, MAX_REFERENCE_CACHE_BYTES).ok()?;
        // Bit patterns: exact, whatever the JSON float parser rounds.
        let bits: Vec<[u64; 2]> = serde_json::from_str(&text).ok().unwrap_or_default();
        let values: Vec<[f64; 2]> = bits.iter().map(|p| p.map(f64::from_bits)).collect();
        let fits = values.len() == pairs.len()
            && values.iter().flatten().all(|v| v.is_finite() && *v <= 0.0);
        if !fits {
            errln!(
                "warning: {}: not a reference cache for these pairs; computing them again",
                self.path.display()
            );
            return None;
        }
        Some(
            pairs
                .iter()
                .zip(values)
                .map(|(p, [c, r])| PairRow {
                    chosen: p.chosen.clone(),
                    rejected: p.rejected.clone(),
                    ref_chosen: c,
                    ref_rejected: r,
                })
                .collect(),
        )
    }

    fn write(&self, rows: &[PairRow]) -> Result<()> {
        let values: Vec<[u64; 2]> = rows
            .iter()
            .map(|r| [r.ref_chosen.to_bits(), r.ref_rejected.to_bits()])
            .collect();
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        train_fs::write_atomic(&self.path, serde_json::to_string(&values)?.as_bytes())?;
        Ok(())
    }
}

struct DpoTraining<'a> {
    args: &'a DpoArgs,
    launch: Launch,
    pairs: Vec<Tokenized>,
    /// Indices of `pairs` trained on, and validated on.
    split: (Vec<usize>, Vec<usize>),
    cache_dir: Option<PathBuf>,
    fingerprint: String,
    control: RunControl,
    alerts: train_monitor::AlertConfig,
}

impl WithBackend for DpoTraining<'_> {
    type Output = RunSummary;

    fn run<B: FusedAutodiffBackend>(self, placement: Placement<B>) -> Result<RunSummary> {
        let device = placement.main;
        let args = &self.args.run;
        let source = self.launch.source::<B>(&args.compute, &device)?;
        let pad_id = self.launch.tok.pad_id();
        let trainer = &self.launch.trainer;
        let eval_batch = trainer.eval_batch_size.unwrap_or(trainer.batch_size);
        // The reference: the starting weights (for a resumed run too: --model, not the
        // checkpoint), or --ref-model. Its log-probabilities of every pair are computed once,
        // here (or read from the cache), and the model dropped.
        let all = if !self.args.dpo_config().uses_reference() {
            // SimPO compares the policy with nothing: no reference pass.
            self.pairs.into_iter().map(Tokenized::unscored).collect()
        } else {
            let reference = reference_model(
                self.args.ref_model.as_deref(),
                &args.compute,
                &source.model,
                &device,
            )?;
            let cached = match &self.cache_dir {
                Some(dir) => Some(ReferenceCache::new(
                    dir,
                    &self.fingerprint,
                    &reference,
                    eval_batch,
                )?),
                None => None,
            };
            match cached.as_ref().and_then(|c| c.read(&self.pairs)) {
                Some(rows) => {
                    errln!(
                        "reference log-probabilities of {} pairs read from {}",
                        rows.len(),
                        cached
                            .as_ref()
                            .map_or_else(String::new, |c| c.path.display().to_string())
                    );
                    rows
                }
                None => {
                    errln!("reference log-probabilities of {} pairs", self.pairs.len());
                    let rows = with_reference(&reference, self.pairs, eval_batch, pad_id);
                    if let Some(c) = &cached
                        && let Err(e) = c.write(&rows)
                    {
                        errln!(
                            "warning: {}: {e:#} (the run goes on without the cache)",
                            c.path.display()
                        );
                    }
                    rows
                }
            }
        };
        let mut all: Vec<Option<PairRow>> = all.into_iter().map(Some).collect();
        let mut take = |idx: &[usize]| -> Vec<PairRow> {
            idx.iter().filter_map(|&i| all.get_mut(i)?.take()).collect()
        };
        let train = take(&self.split.0);
        let validation: Vec<PairBatch> = take(&self.split.1)
            .chunks(eval_batch.max(1))
            .map(|c| PairRow::collate(c.to_vec(), pad_id))
            .collect();
        let context = args
            .compute
            .describe::<B>(&device, source.config.architecture.model_type());
        let model = self.launch.model(&args.compute, &device, source.model)?;
        let Launch {
            cluster,
            trainer,
            model_dir,
            resume,
            ..
        } = self.launch;
        let output = trainer.output_dir.clone();
        let setup = TrainSetup {
            model,
            raw_config: source.raw_config,
            companions_from: source.dir.clone(),
            source_dtype: source.source_dtype,
            train: TrainRows::default(),
            validation: Vec::new(),
            pad_id,
            config: trainer,
            data_fingerprint: self.fingerprint,
            overwrite: args.yes,
            parallelism: Parallelism::new(placement.workers, cluster)?,
            inputs: vec![model_dir],
        };
        let config = self.args.dpo_config();
        observed_plain(args, output, self.alerts, context, |observers| {
            train_runner::run_dpo(
                setup,
                train,
                &validation,
                config,
                resume.as_ref(),
                observers,
                &self.control,
            )
        })
    }
}

/// `train dpo`.
pub fn dpo(args: &DpoArgs) -> Result<ExitCode> {
    let run = &args.run;
    let data = run.data.config()?;
    if data.packing == Some(true) {
        bail!("--packing: preference pairs are not packed (each pair is a micro-batch row)");
    }
    let config = args.dpo_config();
    if !config.uses_reference() {
        // SimPO and ORPO compare the policy with no reference model.
        if args.ref_model.is_some() {
            bail!(
                "--ref-model: the {:?} loss uses no reference model",
                config.loss_type
            );
        }
        if args.precompute_ref_logps {
            bail!(
                "--precompute-ref-logps: the {:?} loss uses no reference model",
                config.loss_type
            );
        }
    }
    refuse_sft_options(
        &data,
        args.command(),
        "its completion is always the final assistant turn",
    )?;
    config.validate()?;
    let launch = Launch::new(run)?;
    let fingerprint = train_data::cache_key(&data, &launch.tok)?;
    let mut pairs = tokenized_pairs(&data, &launch.tok)?;
    let split = match &data.eval_dataset_path {
        // Every pair of the data file is trained; those of --eval-dataset follow them.
        Some(eval) => {
            let train = pairs.len();
            pairs.extend(tokenized_pairs_of(eval, &data, &launch.tok)?);
            ((0..train).collect(), (train..pairs.len()).collect())
        }
        None => {
            let split = ValidationSplit::from_value(data.validation_split)?;
            split_indices(pairs.len(), split, data.seed)
        }
    };
    if split.0.is_empty() {
        bail!(
            "{}: no training pairs left after loading",
            data.dataset_path.display()
        );
    }
    let (control, alerts, watcher) = launch.arm(run)?;
    // With the prepared data: --cache-dir, or the output directory's cache (as `train`'s).
    let cache_dir = args.precompute_ref_logps.then(|| {
        run.data.cache_dir.clone().map_or_else(
            || {
                launch
                    .trainer
                    .output_dir
                    .join(".cache")
                    .join("reference-logps")
            },
            |d| d.join("reference-logps"),
        )
    });
    let work = DpoTraining {
        args,
        launch,
        pairs,
        split,
        cache_dir,
        fingerprint,
        control,
        alerts,
    };
    execute(run, watcher, work)
}
