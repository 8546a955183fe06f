//! A run from start to end: checks, claiming the output, the loop, the final save.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use train_model::FusedAutodiffBackend;
use train_model::{CausalLm, SaveOptions, save_pretrained};

use crate::batches::BatchPlan;
use crate::checkpoint::{TrainerState, list_checkpoints, model_fingerprint, remove_leftovers};
use crate::config::TrainerConfig;
use crate::control::RunControl;
use crate::error::{Result, RunnerError};
use crate::objective::{Collate, NextToken, Objective};
use crate::observer::{RunInfo, RunStatus, RunSummary, TrainObserver};
use crate::optim::{AdamW, AdamWConfig};
use crate::setup::{
    Resume, TrainSetup, check_micro_batch, check_resumable, check_row_ids, check_token_ids,
    claim_output,
};
use crate::train_loop::Loop;
use train_data::TrainRows;

/// Runs supervised fine-tuning to the end (or to a stop request, or a NaN). `observer.stop` is
/// called in every case once `observer.start` was. Errors before the start (configuration,
/// lock, resume checks) are returned without calling the observer.
pub fn run<B: FusedAutodiffBackend>(
    setup: TrainSetup<B>,
    resume: Option<&Resume>,
    observer: &mut dyn TrainObserver<B>,
    control: &RunControl,
) -> Result<RunSummary> {
    let mut setup = setup;
    let train = std::mem::take(&mut setup.train);
    let validation = std::mem::take(&mut setup.validation);
    let objective = NextToken {
        validation: &validation,
        eval_batch_size: setup
            .config
            .eval_batch_size
            .unwrap_or(setup.config.batch_size),
        pad_id: setup.pad_id,
    };
    let TrainRows {
        rows,
        packed_to,
        packing_efficiency,
    } = train;
    let training = Training {
        rows,
        packed_to,
        packing_efficiency,
        validation_len: validation.len(),
        check: |rows: &[train_data::Sequence], config: &TrainerConfig, vocab: usize| {
            check_micro_batch(rows, packed_to, config.batch_size)?;
            check_row_ids(rows, packed_to, vocab)?;
            check_token_ids(&validation, vocab)
        },
    };
    run_objective(setup, training, &objective, resume, observer, control)
}

/// What a run of any objective trains on: the rows its [`BatchPlan`] puts into micro-batches
/// (the `train` and `validation` of the [`TrainSetup`] are not used), and the checks the rows
/// must pass before the output directory is claimed.
pub struct Training<R, C> {
    /// The training rows.
    pub rows: Vec<R>,
    /// With packing, the length the rows were packed up to (recorded in checkpoints).
    pub packed_to: Option<usize>,
    /// With packing, tokens / (rows × `max_length`).
    pub packing_efficiency: Option<f64>,
    /// Validation items (examples, pairs), as reported when the run starts.
    pub validation_len: usize,
    /// Checks of the rows (and the validation data) against the settings and the model's
    /// vocabulary size.
    pub check: C,
}

/// Turns a mixture-of-experts model's router load-balancing loss on with the weight TRL's
/// trainers give it: `coef` when set, else the model's own `router_aux_loss_coef`; a weight of
/// 0 turns it off. The training step then adds it as the model's config says
/// (`output_router_logits`). Only the model in memory changes: the saved `config.json` is the
/// source's, and a resumed run applies the same rule again.
///
/// # Errors
/// A non-zero `coef` for a model without a router.
pub fn weigh_router_loss<B: burn::tensor::backend::Backend>(
    model: &mut CausalLm<B>,
    coef: Option<f64>,
) -> Result<()> {
    match model.config.moe.as_mut() {
        Some(moe) => {
            let coef = coef.unwrap_or(moe.router_aux_loss_coef);
            moe.router_aux_loss_coef = coef;
            moe.output_router_logits = coef != 0.0;
            Ok(())
        }
        None if coef.is_some_and(|c| c != 0.0) => Err(RunnerError::config(
            "router_aux_loss_coef",
            "the model is not a mixture of experts: it has no router whose load-balancing \
             loss could be weighted",
        )),
        None => Ok(()),
    }
}

/// Runs `objective` on `training`'s rows to the end, as [`run`] does for supervised
/// fine-tuning (which it is, with [`NextToken`]).
pub fn run_objective<B, R, O, C>(
    setup: TrainSetup<B>,
    training: Training<R, C>,
    objective: &O,
    resume: Option<&Resume>,
    observer: &mut dyn TrainObserver<B>,
    control: &RunControl,
) -> Result<RunSummary>
where
    B: FusedAutodiffBackend,
    R: Collate,
    O: Objective<B, Batch = R::Batch>,
    C: FnOnce(&[R], &TrainerConfig, usize) -> Result<()>,
{
    let mut setup = setup;
    let config = setup.config.clone();
    config.validate()?;
    weigh_router_loss(&mut setup.model, config.router_aux_loss_coef)?;
    setup.model.gradient_checkpointing = config.gradient_checkpointing;
    let output = config.output_dir.clone();
    let mut inputs: Vec<&Path> = vec![setup.companions_from.as_path()];
    inputs.extend(setup.inputs.iter().map(PathBuf::as_path));
    if let Some(r) = resume {
        inputs.push(&r.dir);
    }
    // Nothing is written (not even the lock) into an input or a sealed checkpoint.
    train_model::check_output_dir(&output, &inputs, true, "the output directory")?;
    let lock = crate::lock::OutputLock::acquire(&output)?;
    if let Some(pid) = &lock.stale_owner {
        observer.notice(&format!(
            "warning: taking over {} left by process {pid}, which is gone",
            lock.path().display()
        ));
    }
    for notice in remove_leftovers(&output)? {
        observer.notice(&notice);
    }
    // Checkpoints of an earlier run first: that message says how to resume them.
    if resume.is_none() && !setup.overwrite && !list_checkpoints(&output).is_empty() {
        return Err(RunnerError::OutputNotEmpty { path: output });
    }
    // A resume continues its own final model; a run from scratch replaces one only with --yes.
    train_model::check_output_dir(
        &output,
        &inputs,
        setup.overwrite || resume.is_some(),
        "the output directory",
    )?;
    let model_print = model_fingerprint(&setup.raw_config);
    if let Some(r) = resume
        && let Some(recorded) = &r.state.objective
        && recorded != objective.name()
    {
        return Err(RunnerError::Checkpoint {
            path: r.dir.clone(),
            message: format!(
                "it was written by a `{recorded}` run, not `{}`: resume it with the same command, \
                 or start a new run from it (--model {})",
                objective.name(),
                r.dir.display()
            ),
        });
    }
    if let Some(r) = resume {
        check_resumable(
            &config,
            training.packed_to,
            (setup.parallelism.devices().len(), setup.parallelism.nodes()),
            r,
            &setup.data_fingerprint,
            &model_print,
            &setup.companions_from,
        )?;
    }
    let Training {
        rows,
        packed_to,
        packing_efficiency,
        validation_len,
        check,
    } = training;
    check(&rows, &config, setup.model.config.vocab_size)?;
    claim_output(&output, resume, setup.overwrite, observer)?;
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
            * setup.parallelism.workers(),
        ..config.clone()
    };
    let mut plan = BatchPlan::from_rows(rows, &plan_config, setup.pad_id);
    plan.packing_efficiency = packing_efficiency;
    if plan.is_empty() {
        return Err(RunnerError::config("dataset", "no training examples"));
    }
    let total_steps = config
        .max_steps
        .unwrap_or(config.num_epochs * plan.steps_per_epoch() * objective.iterations().max(1));
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
            s.objective = Some(objective.name().to_string());
            s.objective_settings = objective.settings();
            if s.model_fingerprint.is_empty() {
                s.model_fingerprint = model_print;
                s.model_source = Some(setup.companions_from.clone());
            }
            s
        }
        None => {
            let mut s =
                TrainerState::new(config.clone(), total_steps, setup.data_fingerprint.clone());
            s.packed_to = packed_to;
            s.devices = setup.parallelism.devices().len();
            s.nodes = setup.parallelism.nodes();
            s.objective = Some(objective.name().to_string());
            s.objective_settings = objective.settings();
            s.model_fingerprint = model_print;
            s.model_source = Some(
                std::path::absolute(&setup.companions_from)
                    .unwrap_or_else(|_| setup.companions_from.clone()),
            );
            s
        }
    };

    let info = RunInfo {
        total_steps,
        start_step: state.global_step,
        steps_per_epoch: plan.steps_per_epoch() * objective.iterations().max(1),
        train_rows: plan.len(),
        validation_examples: validation_len,
        parameters: setup.model.config.num_parameters(),
        trainable_parameters: if setup.model.lora_config().is_some() {
            setup.model.num_adapter_parameters()
        } else {
            setup.model.config.num_parameters()
        },
        output_dir: output.clone(),
        logging_steps: config.logging_steps,
        eval_unit: objective.eval_unit(),
        headline: objective.headline(),
    };
    observer.start(&info);
    let mut ctx = Loop {
        objective,
        plan: &plan,
        config: &config,
        raw_config: &setup.raw_config,
        companions_from: &setup.companions_from,
        optimizer: &mut optimizer,
        parallelism: &setup.parallelism,
        state: &mut state,
        observer: &mut *observer,
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
