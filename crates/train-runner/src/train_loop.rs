//! The loop over optimizer steps: accumulation, clipping, the optimizer, evaluation,
//! checkpoints, pause and stop, data parallelism — the same for every [`Objective`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use serde_json::Value;
use train_model::CausalLm;
use train_model::FusedAutodiffBackend;

use crate::batches::BatchPlan;
use crate::checkpoint::{TrainerState, rotate_checkpoints, save_checkpoint};
use crate::config::{IntervalStrategy, TrainerConfig};
use crate::control::RunControl;
use crate::error::Result;
use crate::objective::{Collate, Objective};
use crate::observer::{EvalRecord, RunStatus, StepRecord, TrainEvent, TrainObserver};
use crate::optim::{AdamW, ParamTable, global_grad_norm};
use crate::parallel::{step_dropout_seed, worker_dropout_seed};

pub(crate) struct Loop<'a, B, R, O>
where
    B: FusedAutodiffBackend,
    R: Collate,
    O: Objective<B, Batch = R::Batch>,
{
    pub(crate) objective: &'a O,
    pub(crate) plan: &'a BatchPlan<R>,
    pub(crate) config: &'a TrainerConfig,
    pub(crate) raw_config: &'a Value,
    pub(crate) companions_from: &'a Path,
    pub(crate) optimizer: &'a mut AdamW<B>,
    pub(crate) parallelism: &'a crate::Parallelism<B>,
    pub(crate) state: &'a mut TrainerState,
    pub(crate) observer: &'a mut dyn TrainObserver<B>,
    pub(crate) control: &'a RunControl,
    pub(crate) last_checkpoint: Option<PathBuf>,
    pub(crate) last_eval: Option<EvalRecord>,
    pub(crate) tokens_seen: usize,
    pub(crate) seconds: f64,
    pub(crate) steps_this_run: usize,
    pub(crate) loss_this_run: f64,
}

impl<B, R, O> Loop<'_, B, R, O>
where
    B: FusedAutodiffBackend,
    R: Collate,
    O: Objective<B, Batch = R::Batch>,
{
    pub(crate) fn train(&mut self, model: CausalLm<B>) -> Result<(RunStatus, CausalLm<B>)> {
        let parallel = if self.parallelism.workers() > 1 {
            Some(crate::DataParallel::start(self.parallelism)?)
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
        let several_machines = self.parallelism.nodes() > 1;
        let mut agreed_stop = false;
        let device = model.embed_tokens.val().device();
        let mut last_saved = None;
        let mut last_eval_step = None;
        self.observer.inspect(self.state.global_step, &model);
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
            let step_index = self.state.global_step;
            let iterations = self.objective.iterations().max(1);
            let (batches, next_position) = self.plan.step_batches(self.state.data_position);
            let batches = match self.objective.prepare(&model, step_index, batches) {
                Ok(b) => b,
                // A stop requested while the step's data was being made (GRPO's sampling):
                // stopped as between steps, the last completed step saved.
                Err(crate::RunnerError::Generation(train_logits::LogitsError::Cancelled)) => {
                    if last_saved != Some(self.state.global_step) {
                        self.checkpoint(&model)?;
                    }
                    return Ok((RunStatus::Stopped, model));
                }
                Err(e) => return Err(e),
            };
            if step_index.is_multiple_of(iterations) {
                let rollouts = self.objective.rollouts(&batches);
                if !rollouts.is_empty() {
                    self.observer.update(&TrainEvent::Rollouts {
                        step: step_index + 1,
                        samples: &rollouts,
                    });
                }
            }
            // With several iterations per batch of data, the plan moves on after the last; the
            // epoch logged after each iteration advances by its share of the batch (TRL's
            // dataloader yields the batch once per iteration: 0.125, 0.25, … for 4 batches of 2).
            let iteration = step_index % iterations;
            let epoch = if iteration + 1 == iterations {
                self.plan.epoch_progress(next_position)
            } else {
                let start = self.plan.epoch_progress(self.state.data_position);
                let end = self.plan.epoch_progress(next_position);
                start + (end - start) * (iteration + 1) as f64 / iterations as f64
            };
            let next_position = if iteration + 1 == iterations {
                next_position
            } else {
                self.state.data_position
            };
            let label_tokens: usize = batches.iter().map(|b| self.objective.label_tokens(b)).sum();
            let tokens: usize = batches.iter().map(|b| self.objective.tokens(b)).sum();
            let units: usize = batches.iter().map(|b| self.objective.units(b)).sum();
            let dropout_seed = step_dropout_seed(self.config.seed, step_index);
            let (step_loss, metrics, grads) = match parallel {
                Some(p) => {
                    let outcome = p.step_seeded(
                        self.objective,
                        &model,
                        &batches,
                        self.control.stop_requested(),
                        Some(dropout_seed),
                    )?;
                    agreed_stop = outcome.stop;
                    (outcome.loss, outcome.metrics, outcome.grads)
                }
                None => {
                    let share: Vec<&O::Batch> = batches.iter().collect();
                    let seed = worker_dropout_seed(dropout_seed, 0);
                    let c = train_model::with_lora_dropout_seed(seed, || {
                        self.objective
                            .gradients(&model, &share, units.max(1) as f64, &device)
                    });
                    (c.loss, c.metrics, c.grads)
                }
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
                self.config.warmup_for(self.state.total_steps),
            );
            model = self.optimizer.step(model, &table, grads, lr, clip);
            let seconds = started.elapsed().as_secs_f64();
            self.state.global_step += 1;
            self.state.data_position = next_position;
            self.state.epoch = epoch;
            self.state.train_loss_sum += step_loss;
            self.tokens_seen += tokens;
            self.seconds += seconds;
            self.steps_this_run += 1;
            self.loss_this_run += step_loss;
            let m = StepRecord {
                step: self.state.global_step,
                epoch: self.state.epoch,
                loss: step_loss,
                learning_rate: lr,
                grad_norm,
                tokens,
                label_tokens,
                tokens_per_sec: tokens as f64 / seconds.max(1e-9),
                metrics: self
                    .step_metric_names(&model)
                    .into_iter()
                    .zip(metrics)
                    .collect(),
            };
            self.state.log_step(&m);
            self.observer.update(&TrainEvent::Step(&m));
            self.observer.inspect(self.state.global_step, &model);

            let step = self.state.global_step;
            let last = step == self.state.total_steps;
            // An epoch ends when the plan has gone through every row (after the last iteration
            // of a batch of data).
            let epoch_end = next_position.index >= self.plan.len()
                && (step_index + 1).is_multiple_of(iterations);
            let due = |strategy: IntervalStrategy, every: usize| match strategy {
                IntervalStrategy::Steps => step.is_multiple_of(every) || last,
                IntervalStrategy::Epoch => epoch_end || last,
                IntervalStrategy::No => false,
            };
            if due(self.config.eval_strategy, self.config.eval_steps)
                && self.evaluate_now(&model, step)?
            {
                last_eval_step = Some(step);
            }
            if due(self.config.save_strategy, self.config.save_steps) {
                self.checkpoint(&model)?;
                last_saved = Some(step);
            }
        }
        if last_eval_step != Some(self.state.global_step)
            && self.config.eval_strategy != IntervalStrategy::No
        {
            self.evaluate_now(&model, self.state.global_step)?;
        }
        Ok((RunStatus::Completed, model))
    }

    /// Evaluates on the validation data; false when there is nothing to evaluate.
    /// The names of a step's metrics: the objective's, then `aux_loss` (the router's
    /// load-balancing term, as TRL logs it) when the model adds one.
    fn step_metric_names(&self, model: &CausalLm<B>) -> Vec<String> {
        let mut names = self.objective.metric_names();
        if crate::step::router_aux_coef(model).is_some() {
            names.push("aux_loss".to_string());
        }
        names
    }

    fn evaluate_now(&mut self, model: &CausalLm<B>, step: usize) -> Result<bool> {
        if self.config.skip_validation || self.config.eval_strategy == IntervalStrategy::No {
            return Ok(false);
        }
        let Some(score) = self.objective.evaluate(&model.valid()) else {
            return Ok(false);
        };
        let m = EvalRecord {
            step,
            epoch: self.state.epoch,
            eval_loss: score.loss,
            eval_tokens: score.units,
            metrics: self
                .objective
                .metric_names()
                .iter()
                .map(|n| format!("eval_{n}"))
                .zip(score.metrics)
                .collect(),
        };
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
