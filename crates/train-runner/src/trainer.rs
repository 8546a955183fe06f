//! The training loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, IndexingUpdateOp, Int, Tensor, TensorData};
use serde_json::Value;
use train_data::Example;
use train_model::{
    CausalLm, IGNORE_INDEX, Pretrained, SaveOptions, StorageDtype, causal_lm_nll, fused_linear_nll,
    nll_chunk_rows, save_pretrained,
};

use crate::batches::{BatchPlan, batch_tensors};
use crate::checkpoint::{
    TrainerState, checkpoint_run_id, list_checkpoints, model_fingerprint, remove_leftovers,
    rotate_checkpoints, save_checkpoint, set_aside, verify_checkpoint,
};
use crate::config::TrainerConfig;
use crate::error::{Result, RunnerError};
use crate::eval::evaluate;
use crate::observer::{
    EvalMetrics, MetricsLog, RunInfo, RunStatus, RunSummary, StepMetrics, TrainEvent, TrainObserver,
};
use crate::optim::{AdamW, AdamWConfig, ParamTable, global_grad_norm};

/// Lets another thread (a signal handler, a control file watcher) ask the run to stop after
/// the current step — the run then saves a checkpoint and ends with status `stopped` — or to
/// pause between steps until resumed.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
}

impl RunControl {
    /// A control with no stop requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// The flag behind it (e.g. for `signal_hook::flag::register`).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Asks the run to stop after the current step.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// True once a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Asks the run to wait after the current step until [`RunControl::resume`] (or a stop).
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
    }

    /// Lets a paused run go on.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// True while a pause is requested.
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }
}

/// Everything a run needs.
pub struct TrainSetup<B: AutodiffBackend> {
    /// The model to train (loaded from the checkpoint when resuming).
    pub model: CausalLm<B>,
    /// The source `config.json` (carried into checkpoints and the final model).
    pub raw_config: Value,
    /// The source model directory (its tokenizer files are carried along).
    pub companions_from: PathBuf,
    /// The dtype of the source weights (the final model's default dtype).
    pub source_dtype: StorageDtype,
    /// Training examples.
    pub train: Vec<Example>,
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
    /// The device of each data-parallel worker (`config.devices` of them); empty: every worker
    /// on the model's device (several CPU workers, or one GPU).
    pub devices: Vec<burn::tensor::Device<B>>,
    /// This machine's place in a run over `config.nodes` machines (needed when there are more
    /// than one).
    pub cluster: Option<crate::Cluster>,
    /// Other directories the run reads (e.g. the adapter directory given as the model): the
    /// output may not be any of them, nor `companions_from`, nor the checkpoint resumed.
    pub inputs: Vec<PathBuf>,
}

impl<B: AutodiffBackend> TrainSetup<B> {
    /// A setup that trains `source` (a loaded checkpoint, whose directory provides the
    /// configuration and tokenizer files carried into checkpoints) on `train`, evaluating on
    /// `validation`; no data fingerprint, and an output directory with checkpoints is refused
    /// (set `overwrite` to start over in it).
    pub fn new(
        source: Pretrained<B>,
        train: Vec<Example>,
        validation: Vec<Example>,
        pad_id: u32,
        config: TrainerConfig,
    ) -> Self {
        Self {
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
            devices: Vec::new(),
            cluster: None,
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

fn check_resumable(
    config: &TrainerConfig,
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
        ("packing", old.packing == config.packing),
        ("max_length", old.max_length == config.max_length),
        ("devices", old.devices == config.devices),
        ("nodes", old.nodes == config.nodes),
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
        return Err(RunnerError::Checkpoint {
            path: resume.dir.clone(),
            message: format!(
                "it was trained from {source} (config.json SHA-256 {}…), not from {}                  (SHA-256 {}…); resume with --model {source}",
                &recorded[..recorded.len().min(12)],
                model_dir.display(),
                &model[..model.len().min(12)],
            ),
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
fn claim_output(output: &Path, resume: Option<&Resume>, overwrite: bool) -> Result<()> {
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
        eprintln!(
            "moved the damaged {} to {}",
            damaged.join(", "),
            dest.display()
        );
    }
    if foreign.is_empty() {
        return Ok(());
    }
    if !overwrite {
        return Err(match resume {
            None => RunnerError::OutputNotEmpty {
                path: output.to_path_buf(),
            },
            Some(r) => RunnerError::Checkpoint {
                path: r.dir.clone(),
                message: format!(
                    "resuming from step {} would abandon {} in {} (newer, or of another run); \
                     resume from the newest (a bare --resume), or pass --yes to move them to \
                     {}/{}/ and continue from here",
                    r.state.global_step,
                    foreign.join(", "),
                    output.display(),
                    output.display(),
                    crate::checkpoint::SET_ASIDE_DIR,
                ),
            },
        });
    }
    let label = match resume {
        None => format!("previous-run-{stamp}"),
        Some(r) => format!("abandoned-after-step-{}-{stamp}", r.state.global_step),
    };
    let dest = set_aside(output, &foreign, &label)?;
    eprintln!(
        "moved {} to {} (delete it when you no longer need it)",
        foreign.join(", "),
        dest.display()
    );
    Ok(())
}

/// Seconds since the epoch, for names of set-aside directories.
fn train_monitor_stamp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Refuses examples with a token id or label the model cannot take (outside its vocabulary):
/// a tokenizer that does not belong to the model, or an altered data cache.
pub fn check_token_ids(examples: &[Example], vocab_size: usize) -> Result<()> {
    for e in examples {
        let bad_id = e.input_ids.iter().find(|&&t| t as usize >= vocab_size);
        let bad_label = e
            .labels
            .iter()
            .find(|&&l| l != IGNORE_INDEX as i32 && (l < 0 || l as usize >= vocab_size));
        if let Some(t) = bad_id
            .map(|&t| i64::from(t))
            .or(bad_label.map(|&l| i64::from(l)))
        {
            return Err(RunnerError::config(
                "dataset",
                format!(
                    "row {}: token id {t} is outside the model's vocabulary (vocab_size {vocab_size}); \
                     the tokenizer does not belong to this model, or the tokenized data was altered",
                    e.row + 1
                ),
            ));
        }
        if e.labels.len() != e.input_ids.len() {
            return Err(RunnerError::config(
                "dataset",
                format!(
                    "row {}: {} labels for {} tokens (the tokenized data was altered)",
                    e.row + 1,
                    e.labels.len(),
                    e.input_ids.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Looks at the model between optimizer steps (layer statistics, live previews, probes):
/// [`ModelInspector::inspect`] is called before the first step of the run and after every step,
/// with the updated model.
pub trait ModelInspector<B: AutodiffBackend> {
    /// `step`: optimizer steps done so far.
    fn inspect(&mut self, step: usize, model: &CausalLm<B>);
}

/// An inspector that looks at nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInspector;

impl<B: AutodiffBackend> ModelInspector<B> for NoInspector {
    fn inspect(&mut self, _: usize, _: &CausalLm<B>) {}
}

/// Runs training to the end (or to a stop request, or a NaN). `observer.stop` is called in every
/// case once `observer.start` was. Errors before the start (configuration, lock, resume checks)
/// are returned without calling the observer.
pub fn run<B: AutodiffBackend>(
    setup: TrainSetup<B>,
    resume: Option<&Resume>,
    observer: &mut dyn TrainObserver,
    control: &RunControl,
) -> Result<RunSummary> {
    run_inspected(setup, resume, observer, control, &mut NoInspector)
}

/// [`run`], with `inspector` looking at the model between steps.
pub fn run_inspected<B: AutodiffBackend>(
    setup: TrainSetup<B>,
    resume: Option<&Resume>,
    observer: &mut dyn TrainObserver,
    control: &RunControl,
    inspector: &mut dyn ModelInspector<B>,
) -> Result<RunSummary> {
    let config = setup.config.clone();
    config.validate()?;
    let output = config.output_dir.clone();
    let lock = crate::lock::OutputLock::acquire(&output)?;
    if let Some(pid) = &lock.stale_owner {
        eprintln!(
            "warning: taking over {} left by process {pid}, which is gone",
            lock.path().display()
        );
    }
    remove_leftovers(&output)?;
    // Checkpoints of an earlier run first: that message says how to resume them.
    if resume.is_none() && !setup.overwrite && !list_checkpoints(&output).is_empty() {
        return Err(RunnerError::OutputNotEmpty { path: output });
    }
    let mut inputs: Vec<&Path> = vec![setup.companions_from.as_path()];
    inputs.extend(setup.inputs.iter().map(PathBuf::as_path));
    if let Some(r) = resume {
        inputs.push(&r.dir);
    }
    // A resume continues its own final model; a run from scratch replaces one only with --yes.
    train_model::check_output_dir(
        &output,
        &inputs,
        setup.overwrite || resume.is_some(),
        "--output",
    )?;
    let model_print = model_fingerprint(&setup.raw_config);
    if let Some(r) = resume {
        check_resumable(
            &config,
            r,
            &setup.data_fingerprint,
            &model_print,
            &setup.companions_from,
        )?;
    }
    check_token_ids(&setup.train, setup.model.config.vocab_size)?;
    check_token_ids(&setup.validation, setup.model.config.vocab_size)?;
    claim_output(&output, resume, setup.overwrite)?;
    let mut setup = setup;
    if let Some(lora) = &config.lora {
        setup.model = match setup.model.lora_config() {
            None => setup.model.with_lora(lora, config.seed)?,
            // A resumed run, or an adapter loaded to train further.
            Some(have)
                if have.r == lora.r
                    && have.alpha == lora.alpha
                    && have.use_rslora == lora.use_rslora =>
            {
                setup.model
            }
            Some(have) => {
                return Err(RunnerError::config(
                    "lora",
                    format!(
                        "the model already carries an adapter with r = {}, alpha = {}; \
                         train it with those settings or start from the base model",
                        have.r, have.alpha
                    ),
                ));
            }
        };
    }
    // Each worker of each machine runs `gradient_accumulation_steps` micro-batches of every step.
    let plan_config = TrainerConfig {
        gradient_accumulation_steps: config.gradient_accumulation_steps
            * config.devices
            * config.nodes,
        ..config.clone()
    };
    let plan = BatchPlan::new(&setup.train, &plan_config, setup.pad_id);
    let devices = if setup.devices.is_empty() {
        vec![setup.model.embed_tokens.val().device(); config.devices]
    } else if setup.devices.len() == config.devices {
        setup.devices.clone()
    } else {
        return Err(RunnerError::config(
            "devices",
            format!(
                "{} workers asked for, {} devices given",
                config.devices,
                setup.devices.len()
            ),
        ));
    };
    if plan.is_empty() {
        return Err(RunnerError::config("dataset", "no training examples"));
    }
    match (&setup.cluster, config.nodes) {
        (Some(c), n) => c.validate(n)?,
        (None, 1) => {}
        (None, n) => {
            return Err(RunnerError::config(
                "nodes",
                format!("{n} machines need this machine's rank and the orchestrator's address"),
            ));
        }
    }
    let total_steps = config
        .max_steps
        .unwrap_or(config.num_epochs * plan.steps_per_epoch());
    let mut optimizer = AdamW::<B>::new(AdamWConfig {
        beta1: config.adam_beta1,
        beta2: config.adam_beta2,
        epsilon: config.adam_epsilon,
        weight_decay: config.weight_decay,
    });
    let mut state = match resume {
        Some(r) => {
            let device = setup.model.embed_tokens.val().device();
            optimizer.load(&r.dir.join("optimizer.safetensors"), &device)?;
            let mut s = r.state.clone();
            s.total_steps = total_steps;
            s.config = config.clone();
            if s.model_fingerprint.is_empty() {
                s.model_fingerprint = model_print;
                s.model_source = Some(setup.companions_from.clone());
            }
            s
        }
        None => {
            let mut s =
                TrainerState::new(config.clone(), total_steps, setup.data_fingerprint.clone());
            s.model_fingerprint = model_print;
            s.model_source = Some(
                std::path::absolute(&setup.companions_from)
                    .unwrap_or_else(|_| setup.companions_from.clone()),
            );
            s
        }
    };
    let mut metrics = MetricsLog::open(&output.join("metrics.jsonl"), resume.is_some())?;

    let info = RunInfo {
        total_steps,
        start_step: state.global_step,
        steps_per_epoch: plan.steps_per_epoch(),
        train_rows: plan.len(),
        validation_examples: setup.validation.len(),
        parameters: setup.model.config.num_parameters(),
        trainable_parameters: if setup.model.lora_config().is_some() {
            setup.model.num_adapter_parameters()
        } else {
            setup.model.config.num_parameters()
        },
        output_dir: output.clone(),
    };
    observer.start(&info);
    let mut ctx = Loop {
        plan: &plan,
        config: &config,
        setup_validation: &setup.validation,
        pad_id: setup.pad_id,
        raw_config: &setup.raw_config,
        companions_from: &setup.companions_from,
        optimizer: &mut optimizer,
        devices,
        cluster: setup.cluster.clone(),
        state: &mut state,
        metrics: &mut metrics,
        observer: &mut *observer,
        inspector,
        control,
        last_checkpoint: None,
        last_eval: None,
        tokens_seen: 0,
        seconds: 0.0,
        steps_this_run: 0,
        loss_this_run: 0.0,
    };
    let outcome = ctx.train(setup.model);
    let (status, model, error) = match outcome {
        Ok((status, model)) => (status, Some(model), None),
        Err(e) => (RunStatus::Failed, None, Some(e)),
    };
    // The final model (completed runs only), in the source dtype unless told otherwise.
    let mut final_error = error;
    if status == RunStatus::Completed
        && let Some(model) = &model
    {
        let options = SaveOptions {
            dtype: Some(config.save_dtype.unwrap_or(setup.source_dtype)),
            max_shard_bytes: None,
            companions_from: Some(setup.companions_from.clone()),
        };
        // Staged, then moved into place: a full disk leaves the output without a half-written
        // model (the checkpoints hold the work).
        let saved = train_model::staging_dir(&output).and_then(|staged| {
            let written = if model.lora_config().is_some() {
                save_adapter_dir(model, &setup.companions_from, &staged)
            } else {
                save_pretrained(model, Some(&setup.raw_config), &staged, &options).map(|_| ())
            };
            match written {
                Ok(()) => train_model::install_model(&staged, &output),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staged);
                    Err(e)
                }
            }
        });
        if let Err(e) = saved {
            final_error = Some(e.into());
        }
    }
    let status = if final_error.is_some() {
        RunStatus::Failed
    } else {
        status
    };
    let summary = RunSummary {
        status,
        global_step: ctx.state.global_step,
        train_loss: (ctx.steps_this_run > 0).then(|| ctx.loss_this_run / ctx.steps_this_run as f64),
        eval_loss: ctx.last_eval.as_ref().map(|e| e.eval_loss),
        tokens_per_sec: if ctx.seconds > 0.0 {
            ctx.tokens_seen as f64 / ctx.seconds
        } else {
            0.0
        },
        output: output.clone(),
        last_checkpoint: ctx.last_checkpoint.clone(),
        best_checkpoint: ctx.state.best_model_checkpoint.clone(),
        error: match (&final_error, status) {
            (Some(e), _) => Some(e.to_string()),
            (None, RunStatus::Crashed) => {
                Some("the loss or the gradient norm is not finite".into())
            }
            _ => None,
        },
    };
    ctx.observer.stop(&summary);
    drop(lock);
    match final_error {
        Some(e) => Err(e),
        None => Ok(summary),
    }
}

/// Writes `model`'s adapters to `dir` as a PEFT adapter directory whose base model is
/// `base_dir` (recorded as an absolute path), with `base_dir`'s tokenizer files, as
/// `peft`'s `save_pretrained` and `transformers.Trainer` leave an adapter run's output.
pub fn save_adapter_dir<B: Backend>(
    model: &CausalLm<B>,
    base_dir: &Path,
    dir: &Path,
) -> train_model::Result<()> {
    let base = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
    train_model::save_adapter(model, dir, &base.to_string_lossy())?;
    train_model::copy_companions(base_dir, dir)
}

/// The loss and the gradients of one optimizer step over `batches` (its micro-batches).
///
/// Loss = Σ NLL over every label token of the step / their number: each micro-batch contributes
/// its sum divided by the step's total, and the gradients of the micro-batches add up, so
/// padding, packing and accumulation leave both unchanged.
///
/// The LM head and the loss are fused ([`train_model::fused_linear_nll`]): only positions whose
/// next token is a label go through the head, chunk by chunk, and their gradients are computed
/// on the spot, so the `[tokens, vocab]` logits are never materialised nor kept for the
/// backward pass. The rest of the network is differentiated by autodiff from the final norm's
/// output with those gradients.
pub fn step_gradients<B: AutodiffBackend>(
    model: &CausalLm<B>,
    batches: &[train_data::Batch],
    device: &burn::tensor::Device<B>,
) -> (f64, GradientsParams) {
    let label_tokens: usize = batches.iter().map(|b| b.label_tokens).sum();
    gradients_over(model, batches, label_tokens.max(1) as f64, device)
}

/// [`step_gradients`] of a part of a step: each micro-batch's NLL sum is divided by
/// `denominator`, the label tokens of the whole step (over every worker).
pub(crate) fn gradients_over<'a, B: AutodiffBackend>(
    model: &CausalLm<B>,
    batches: impl IntoIterator<Item = &'a train_data::Batch>,
    denominator: f64,
    device: &burn::tensor::Device<B>,
) -> (f64, GradientsParams) {
    let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
    let mut step_loss = 0f64;
    // A biased LM head (none of the supported architectures has one) takes the plain path.
    let fusable = model.lm_head.as_ref().is_none_or(|h| h.bias.is_none());
    for batch in batches {
        let (loss, grads) = match label_rows(batch) {
            Some((rows, targets)) if fusable => {
                fused_micro_batch(model, batch, rows, targets, denominator, device)
            }
            _ => plain_micro_batch(model, batch, denominator, device),
        };
        step_loss += loss;
        accumulator.accumulate(model, grads);
    }
    (step_loss, accumulator.grads())
}

/// Flattened positions (`row · seq + t`) whose next token is a label, and those labels; `None`
/// when the micro-batch has no label token.
fn label_rows(batch: &train_data::Batch) -> Option<(Vec<i64>, Vec<i64>)> {
    let s = batch.seq_len;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for r in 0..batch.batch_size {
        for t in 0..s.saturating_sub(1) {
            let label = i64::from(batch.labels[r * s + t + 1]);
            if label != IGNORE_INDEX {
                rows.push((r * s + t) as i64);
                targets.push(label);
            }
        }
    }
    (!rows.is_empty()).then_some((rows, targets))
}

/// Materialised logits, `causal_lm_nll`, autodiff through everything.
fn plain_micro_batch<B: AutodiffBackend>(
    model: &CausalLm<B>,
    batch: &train_data::Batch,
    denominator: f64,
    device: &burn::tensor::Device<B>,
) -> (f64, GradientsParams) {
    let (input, labels) = batch_tensors::<B>(batch, device);
    let (sum, _) = causal_lm_nll(model.forward(&input), labels);
    let loss = sum / denominator;
    let value = f64::from(loss.clone().into_scalar().elem::<f32>());
    (value, GradientsParams::from_grads(loss.backward(), model))
}

/// The fused LM head + loss on the label positions, then autodiff from the final norm's output.
fn fused_micro_batch<B: AutodiffBackend>(
    model: &CausalLm<B>,
    batch: &train_data::Batch,
    rows: Vec<i64>,
    targets: Vec<i64>,
    denominator: f64,
    device: &burn::tensor::Device<B>,
) -> (f64, GradientsParams) {
    let (input, _) = batch_tensors::<B>(batch, device);
    let hidden = model.forward_hidden(&input);
    let [b, s, width] = hidden.dims();
    let flat = hidden.reshape([b * s, width]);
    let m = rows.len();
    let index = Tensor::<B::InnerBackend, 1, Int>::from_data(TensorData::new(rows, [m]), device);
    let targets =
        Tensor::<B::InnerBackend, 1, Int>::from_data(TensorData::new(targets, [m]), device);
    let selected = flat.clone().inner().select(0, index.clone());
    let head = model.lm_head_weight();
    let head_trained = head.is_require_grad();
    let out = fused_linear_nll(
        &selected,
        head.val().inner(),
        &targets,
        1.0 / denominator,
        nll_chunk_rows(m, model.config.vocab_size),
        head_trained,
    );
    let loss = f64::from(out.sum.into_scalar().elem::<f32>()) / denominator;
    let grad_flat = Tensor::<B::InnerBackend, 2>::zeros([b * s, width], (device, flat.dtype()))
        .select_assign(0, index, out.grad_hidden, IndexingUpdateOp::Add);
    let surrogate = (flat * Tensor::<B, 2>::from_inner(grad_flat)).sum();
    let mut grads = GradientsParams::from_grads(surrogate.backward(), model);
    if let Some(grad_head) = out.grad_weight {
        let grad_head = grad_head.cast(head.val().dtype());
        let total = match grads.remove::<B::InnerBackend, 2>(head.id) {
            Some(g) => g + grad_head,
            None => grad_head,
        };
        grads.register::<B::InnerBackend, 2>(head.id, total);
    }
    (loss, grads)
}

struct Loop<'a, B: AutodiffBackend> {
    plan: &'a BatchPlan,
    config: &'a TrainerConfig,
    setup_validation: &'a [Example],
    pad_id: u32,
    raw_config: &'a Value,
    companions_from: &'a Path,
    optimizer: &'a mut AdamW<B>,
    devices: Vec<burn::tensor::Device<B>>,
    cluster: Option<crate::Cluster>,
    state: &'a mut TrainerState,
    metrics: &'a mut MetricsLog,
    observer: &'a mut dyn TrainObserver,
    inspector: &'a mut dyn ModelInspector<B>,
    control: &'a RunControl,
    last_checkpoint: Option<PathBuf>,
    last_eval: Option<EvalMetrics>,
    tokens_seen: usize,
    seconds: f64,
    steps_this_run: usize,
    loss_this_run: f64,
}

impl<B: AutodiffBackend> Loop<'_, B> {
    fn train(&mut self, model: CausalLm<B>) -> Result<(RunStatus, CausalLm<B>)> {
        let parallel = if self.devices.len() > 1 || self.config.nodes > 1 {
            Some(crate::DataParallel::start(
                self.devices.clone(),
                self.config.nodes,
                self.cluster.as_ref(),
            )?)
        } else {
            None
        };
        let outcome = self.train_steps(model, parallel.as_ref())?;
        if let Some(p) = parallel {
            p.finish()?;
        }
        Ok(outcome)
    }

    fn train_steps(
        &mut self,
        mut model: CausalLm<B>,
        parallel: Option<&crate::DataParallel<B>>,
    ) -> Result<(RunStatus, CausalLm<B>)> {
        let table = ParamTable::new(&model);
        // With several machines, a stop request is acted on when all have learnt of it (in a
        // step's all-reduce), so that they stop at the same step; pausing stays local (the
        // others wait for this machine in the next all-reduce).
        let several_machines = self.config.nodes > 1;
        let mut agreed_stop = false;
        let device = model.embed_tokens.val().device();
        let mut last_saved = None;
        let mut last_eval_step = None;
        self.inspector.inspect(self.state.global_step, &model);
        while self.state.global_step < self.state.total_steps {
            if self.control.pause_requested() && !self.control.stop_requested() {
                let step = self.state.global_step;
                self.observer.update(&TrainEvent::Paused { step });
                while self.control.pause_requested() && !self.control.stop_requested() {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                self.observer.update(&TrainEvent::Resumed { step });
            }
            let stop = if several_machines {
                agreed_stop
            } else {
                self.control.stop_requested()
            };
            if stop {
                if last_saved != Some(self.state.global_step) {
                    self.checkpoint(&model)?;
                }
                return Ok((RunStatus::Stopped, model));
            }
            let started = Instant::now();
            let (batches, next_position) = self.plan.step_batches(self.state.data_position);
            let label_tokens: usize = batches.iter().map(|b| b.label_tokens).sum();
            let tokens: usize = batches.iter().map(|b| b.real_tokens).sum();
            let (step_loss, grads) = match parallel {
                Some(p) => {
                    let outcome = p.step(&model, &batches, self.control.stop_requested())?;
                    agreed_stop = outcome.stop;
                    (outcome.loss, outcome.grads)
                }
                None => step_gradients(&model, &batches, &device),
            };
            if !step_loss.is_finite() {
                return Ok((RunStatus::Crashed, model));
            }
            let grad_norm = global_grad_norm(&model, &grads);
            if !grad_norm.is_finite() {
                return Ok((RunStatus::Crashed, model));
            }
            let clip = if self.config.max_grad_norm > 0.0 && grad_norm > self.config.max_grad_norm {
                self.config.max_grad_norm / (grad_norm + 1e-6)
            } else {
                1.0
            };
            let lr = self.config.lr_scheduler.lr_at(
                self.config.learning_rate,
                self.state.global_step,
                self.state.total_steps,
                self.config.warmup_steps,
            );
            model = self.optimizer.step(model, &table, grads, lr, clip);
            let seconds = started.elapsed().as_secs_f64();
            self.state.global_step += 1;
            self.state.data_position = next_position;
            self.state.epoch = self.plan.epoch_progress(next_position);
            self.state.train_loss_sum += step_loss;
            self.tokens_seen += tokens;
            self.seconds += seconds;
            self.steps_this_run += 1;
            self.loss_this_run += step_loss;
            let m = StepMetrics {
                step: self.state.global_step,
                epoch: self.state.epoch,
                loss: step_loss,
                learning_rate: lr,
                grad_norm,
                tokens,
                label_tokens,
                tokens_per_sec: tokens as f64 / seconds.max(1e-9),
            };
            self.metrics.write(&m)?;
            self.state.log_step(&m);
            self.observer.update(&TrainEvent::Step(&m));
            self.inspector.inspect(self.state.global_step, &model);

            let step = self.state.global_step;
            let last = step == self.state.total_steps;
            if (step.is_multiple_of(self.config.eval_steps) || last)
                && self.evaluate_now(&model, step)?
            {
                last_eval_step = Some(step);
            }
            if step.is_multiple_of(self.config.save_steps) || last {
                self.checkpoint(&model)?;
                last_saved = Some(step);
            }
        }
        if last_eval_step != Some(self.state.global_step) {
            self.evaluate_now(&model, self.state.global_step)?;
        }
        Ok((RunStatus::Completed, model))
    }

    /// Evaluates on the validation split; false when there is nothing to evaluate.
    fn evaluate_now(&mut self, model: &CausalLm<B>, step: usize) -> Result<bool> {
        if self.config.skip_validation || self.setup_validation.is_empty() {
            return Ok(false);
        }
        let batch_size = self
            .config
            .eval_batch_size
            .unwrap_or(self.config.batch_size);
        let (sum, tokens) = evaluate(
            &model.valid(),
            self.setup_validation,
            batch_size,
            self.pad_id,
        );
        let m = EvalMetrics {
            step,
            epoch: self.state.epoch,
            eval_loss: sum / tokens.max(1) as f64,
            eval_tokens: tokens,
        };
        self.metrics.write(&m)?;
        self.state.log_eval(&m);
        self.observer.update(&TrainEvent::Eval(&m));
        let better = self.state.best_metric.is_none_or(|b| m.eval_loss < b);
        if better && m.eval_loss.is_finite() {
            self.state.best_metric = Some(m.eval_loss);
            // The checkpoint of this step (written right after, or at the next save).
            self.state.best_model_checkpoint = Some(crate::checkpoint::checkpoint_dir(
                &self.config.output_dir,
                step,
            ));
        }
        self.last_eval = Some(m);
        Ok(true)
    }

    fn checkpoint(&mut self, model: &CausalLm<B>) -> Result<()> {
        let output = &self.config.output_dir;
        // The best checkpoint is only known to exist if it was written.
        if let Some(best) = &self.state.best_model_checkpoint
            && !best.exists()
            && !best.ends_with(format!("checkpoint-{}", self.state.global_step))
        {
            self.state.best_model_checkpoint = None;
        }
        let dir = save_checkpoint(
            output,
            model,
            self.raw_config,
            self.companions_from,
            self.optimizer,
            self.state,
        )?;
        self.observer.update(&TrainEvent::Checkpoint {
            step: self.state.global_step,
            path: &dir,
        });
        if let Some(limit) = self.config.save_total_limit {
            rotate_checkpoints(
                output,
                limit,
                self.state.best_model_checkpoint.as_deref(),
                &self.state.run_id,
            )?;
        }
        self.last_checkpoint = Some(dir);
        Ok(())
    }
}
