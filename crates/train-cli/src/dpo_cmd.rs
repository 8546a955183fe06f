//! `train dpo`: preference training on pairs of completions (TRL's `DPOTrainer`), with every
//! training flag of `train run`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::module::AutodiffModule;
use clap::{Args, ValueEnum};
use train_data::{
    ChatTokenizer, DataError, EncodedPair, ErrorPolicy, Example, LabelMode, Problem, ProblemKind,
    Sequence, TrainRows, Truncation, ValidationSplit, load_preferences, split_indices,
};
use train_model::{CausalLm, FusedAutodiffBackend, FusedBackend, load_pretrained};
use train_runner::{
    Collate, DpoConfig, DpoLossType, MetricsObserver, Observers, PairBatch, PairRow, Parallelism,
    Resume, RunControl, RunSummary, TrainSetup, TrainerConfig, completion_logps,
};

use crate::backend::{Placement, WithBackend};
use crate::control::ControlWatcher;
use crate::monitor::Monitor;
use crate::progress::Progress;
use crate::run_cmd::{
    RunArgs, check_output, execute, read_alerts, resolve_resume, stop_on_signals,
};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossTypeArg {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
}

/// `train dpo`.
#[derive(Args, Debug, Clone)]
pub struct DpoArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// β: how far the policy may move from the reference (TRL's default 0.1).
    #[arg(long, default_value_t = DpoConfig::default().beta)]
    pub beta: f64,
    /// The loss: sigmoid (the DPO paper's), ipo, hinge (SLiC) or robust.
    #[arg(long, value_enum, default_value_t = LossTypeArg::Sigmoid)]
    pub loss_type: LossTypeArg,
    /// The assumed rate of flipped preference labels (sigmoid and robust).
    #[arg(long, default_value_t = DpoConfig::default().label_smoothing)]
    pub label_smoothing: f64,
    /// The reference model (default: the starting weights of --model; for a LoRA run, the base
    /// model without the adapter).
    #[arg(long, value_name = "DIR")]
    pub ref_model: Option<String>,
}

impl DpoArgs {
    fn dpo_config(&self) -> DpoConfig {
        DpoConfig {
            beta: self.beta,
            loss_type: match self.loss_type {
                LossTypeArg::Sigmoid => DpoLossType::Sigmoid,
                LossTypeArg::Ipo => DpoLossType::Ipo,
                LossTypeArg::Hinge => DpoLossType::Hinge,
                LossTypeArg::Robust => DpoLossType::Robust,
            },
            label_smoothing: self.label_smoothing,
        }
    }
}

/// One tokenized pair, before its reference log-probabilities are known.
struct Tokenized {
    chosen: Sequence,
    rejected: Sequence,
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
    let path = &config.dataset_path;
    let loaded = load_preferences(path, &config.load)?;
    for p in &loaded.problems {
        errln!("{p}");
    }
    let mut out = Vec::with_capacity(loaded.pairs.len());
    for pair in &loaded.pairs {
        let EncodedPair { chosen, rejected } = tok.encode_pair(pair)?;
        let location = pair.location.clone().unwrap_or(train_data::RowLocation {
            path: path.clone(),
            line: None,
            row: 0,
        });
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
            let drop_long = p.kind == ProblemKind::TooLong && config.truncation == Truncation::Drop;
            if config.load.policy == ErrorPolicy::Strict && !drop_long {
                return Err(DataError::Row(Box::new(p)).into());
            }
            errln!("{p}");
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
    let mut out: Vec<PairRow> = pairs
        .into_iter()
        .map(|p| PairRow {
            chosen: p.chosen,
            rejected: p.rejected,
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        })
        .collect();
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

struct DpoTraining<'a> {
    args: &'a DpoArgs,
    cluster: Option<train_runner::Cluster>,
    trainer: TrainerConfig,
    model_dir: PathBuf,
    tok: ChatTokenizer,
    train: Vec<Tokenized>,
    validation: Vec<Tokenized>,
    fingerprint: String,
    resume: Option<Resume>,
    control: RunControl,
    alerts: train_monitor::AlertConfig,
}

impl WithBackend for DpoTraining<'_> {
    type Output = RunSummary;

    fn run<B: FusedAutodiffBackend>(self, placement: Placement<B>) -> Result<RunSummary> {
        let device = placement.main;
        let args = &self.args.run;
        let options = args.compute.load_options(true);
        let source = load_pretrained::<B>(&self.model_dir, &options, &device)
            .with_context(|| format!("loading {}", self.model_dir.display()))?;
        crate::check_tokenizer_fits(&self.tok, &self.model_dir, source.config.vocab_size)?;
        let pad_id = self.tok.pad_id();
        let eval_batch = self
            .trainer
            .eval_batch_size
            .unwrap_or(self.trainer.batch_size);
        // The reference: the starting weights (for a resumed run too: --model, not the
        // checkpoint), or --ref-model. Its log-probabilities are computed once, here.
        let (train, validation) = {
            let reference = match &self.args.ref_model {
                Some(r) => {
                    let dir = crate::registry()?.resolve(r)?;
                    load_pretrained::<B::InnerBackend>(
                        &dir,
                        &args.compute.load_options(false),
                        &device,
                    )
                    .with_context(|| format!("loading the reference model {}", dir.display()))?
                    .model
                }
                None => source.model.valid(),
            };
            if reference.config.vocab_size != source.config.vocab_size {
                bail!(
                    "the reference model's vocabulary ({}) differs from the model's ({})",
                    reference.config.vocab_size,
                    source.config.vocab_size
                );
            }
            errln!(
                "reference log-probabilities of {} training and {} validation pairs",
                self.train.len(),
                self.validation.len()
            );
            let train = with_reference(&reference, self.train, eval_batch, pad_id);
            let validation: Vec<PairBatch> =
                with_reference(&reference, self.validation, eval_batch, pad_id)
                    .chunks(eval_batch.max(1))
                    .map(|c| PairRow::collate(c.to_vec(), pad_id))
                    .collect();
            (train, validation)
        };
        let (model, resume) = match self.resume {
            Some(resume) => {
                let ckpt = load_pretrained::<B>(&resume.dir, &options, &device)
                    .with_context(|| format!("loading checkpoint {}", resume.dir.display()))?;
                (ckpt.model, Some(resume))
            }
            None => (source.model, None),
        };
        let output = self.trainer.output_dir.clone();
        let setup = TrainSetup {
            model,
            raw_config: source.raw_config,
            companions_from: source.dir.clone(),
            source_dtype: source.source_dtype,
            train: TrainRows::default(),
            validation: Vec::new(),
            pad_id,
            config: self.trainer,
            data_fingerprint: self.fingerprint,
            overwrite: args.yes,
            parallelism: Parallelism::new(placement.workers, self.cluster)?,
            inputs: vec![self.model_dir.clone()],
        };
        let status_dir = args
            .status_dir
            .clone()
            .unwrap_or_else(|| output.join("status"));
        let mut monitor = Monitor::new(status_dir, output, self.alerts);
        let mut metrics = MetricsObserver::new();
        let mut progress = Progress::new();
        let mut observers = Observers::default();
        observers.push(&mut monitor);
        observers.push(&mut metrics);
        observers.push(&mut progress);
        let summary = train_runner::run_dpo(
            setup,
            train,
            &validation,
            self.args.dpo_config(),
            resume.as_ref(),
            &mut observers,
            &self.control,
        );
        drop(observers);
        if let Some(e) = metrics.error() {
            errln!("warning: metrics.jsonl: {e} (training went on without it)");
        }
        Ok(summary?)
    }
}

/// `train dpo`.
pub fn dpo(args: &DpoArgs) -> Result<ExitCode> {
    let run = &args.run;
    let data = run.data.config()?;
    if data.packing {
        bail!("--packing: preference pairs are not packed (each pair is a micro-batch row)");
    }
    // The SFT data options that would change what is trained, which pairs do not go through.
    let unused = [
        (data.apply_thinking_pattern, "--thinking-pattern"),
        (data.apply_stop_pattern, "--stop-pattern"),
        (data.system_prompt.is_some(), "--system-prompt"),
        (!data.transforms.is_empty(), "--transforms"),
        (data.label_mode != LabelMode::default(), "--label-mode"),
    ];
    if let Some((_, flag)) = unused.iter().find(|(given, _)| *given) {
        bail!(
            "{flag}: `train dpo` does not transform preference pairs (its completion is always the \
             final assistant turn); transform the data file first"
        );
    }
    let trainer = run.trainer_config();
    trainer.validate()?;
    args.dpo_config().validate()?;
    let cluster = run.cluster()?;
    let (model_dir, tok) = crate::tokenizer_for(&run.data.model)?;
    let resume = resolve_resume(run.resume.as_deref(), &trainer.output_dir)?;
    check_output(&trainer.output_dir, &model_dir, resume.as_ref())?;
    let fingerprint = train_data::cache_key(&data, &tok)?;
    let mut pairs: Vec<Option<Tokenized>> = tokenized_pairs(&data, &tok)?
        .into_iter()
        .map(Some)
        .collect();
    let split = ValidationSplit::from_value(data.validation_split)?;
    let (train_idx, validation_idx) = split_indices(pairs.len(), split, data.seed);
    let mut take = |idx: Vec<usize>| -> Vec<Tokenized> {
        idx.into_iter().filter_map(|i| pairs[i].take()).collect()
    };
    let train = take(train_idx);
    let validation = take(validation_idx);
    if train.is_empty() {
        bail!(
            "{}: no training pairs left after loading",
            data.dataset_path.display()
        );
    }
    let control = stop_on_signals()?;
    let alerts = read_alerts(run.alerts.as_deref())?;
    let watcher = ControlWatcher::start(&trainer.output_dir, &control);
    let work = DpoTraining {
        args,
        cluster,
        trainer,
        model_dir,
        tok,
        train,
        validation,
        fingerprint,
        resume,
        control,
        alerts,
    };
    execute(run, watcher, work)
}
