//! The observer interface (the seed's `MonitoringBundle`: start / update / stop), and the
//! observer that writes `metrics.jsonl`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use train_model::CausalLm;
use train_model::FusedAutodiffBackend;
pub use train_monitor::{EvalRecord, StepRecord};
use train_monitor::{MetricsLog, MetricsRow};

/// What a run is about to do.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Optimizer steps the run will reach.
    pub total_steps: usize,
    /// Steps already done (non-zero when resuming).
    pub start_step: usize,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: usize,
    /// Training rows (examples, or packed rows).
    pub train_rows: usize,
    /// Validation examples.
    pub validation_examples: usize,
    /// Parameters of the model.
    pub parameters: usize,
    /// Parameters the optimizer updates (all of them, or the LoRA adapters' when training
    /// adapters on a frozen model).
    pub trainable_parameters: usize,
    /// The output directory.
    pub output_dir: PathBuf,
    /// Steps per row of `metrics.jsonl` (`TrainerConfig::logging_steps`).
    pub logging_steps: usize,
    /// What an evaluation's count (`EvalRecord::eval_tokens`) counts
    /// ([`crate::Objective::eval_unit`]: `tokens`, `pairs`).
    pub eval_unit: &'static str,
    /// The step metric a progress line shows next to the loss, with its label
    /// ([`crate::Objective::headline`]).
    pub headline: Option<(&'static str, &'static str)>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Reached its last step.
    Completed,
    /// Stopped on request (signal or control), after saving a checkpoint.
    Stopped,
    /// The loss or the gradients became NaN or infinite; nothing was saved after that.
    Crashed,
    /// An error ended it (I/O, configuration…).
    Failed,
}

/// What a run reports at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// How it ended.
    pub status: RunStatus,
    /// Steps done.
    pub global_step: usize,
    /// Mean of the step losses of this run.
    pub train_loss: Option<f64>,
    /// Last evaluation loss.
    pub eval_loss: Option<f64>,
    /// Input tokens per second over the run.
    pub tokens_per_sec: f64,
    /// The output directory.
    pub output: PathBuf,
    /// The last checkpoint written, if any.
    pub last_checkpoint: Option<PathBuf>,
    /// The checkpoint with the lowest evaluation loss, if any.
    pub best_checkpoint: Option<PathBuf>,
    /// Why it failed or crashed.
    pub error: Option<String>,
}

/// An event during a run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TrainEvent<'a> {
    /// An optimizer step finished.
    Step(&'a StepRecord),
    /// An evaluation finished.
    Eval(&'a EvalRecord),
    /// The run paused on request after `step` (until resumed or stopped).
    Paused {
        /// Steps done.
        step: usize,
    },
    /// The run goes on after a pause.
    Resumed {
        /// Steps done.
        step: usize,
    },
    /// Online training sampled and scored these completions for step `step`.
    Rollouts {
        /// The step they are trained in (1-based, as [`StepRecord::step`]).
        step: usize,
        /// The completions, prompts and rewards.
        samples: &'a [train_monitor::RolloutSample],
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Its step.
        step: usize,
        /// Its directory.
        path: &'a Path,
    },
}

/// Receives a run's progress and may look at the model it trains on backend `B` (an observer
/// that does not look at the model implements it for every `B`: `impl<B:
/// FusedAutodiffBackend> TrainObserver<B> for Mine`). `stop` is always called once `start`
/// was: on success, error, crash and interruption.
pub trait TrainObserver<B: FusedAutodiffBackend> {
    /// Something the user should know that is not progress: checkpoints moved aside, a lock
    /// taken over from a dead process. May come before [`TrainObserver::start`] (while the
    /// output directory is claimed); the library prints nothing itself.
    fn notice(&mut self, _message: &str) {}
    /// The run starts.
    fn start(&mut self, _info: &RunInfo) {}
    /// Something happened.
    fn update(&mut self, _event: &TrainEvent<'_>) {}
    /// Looks at the model between optimizer steps (layer statistics, live previews, probes):
    /// called before the first step of the run and after every step (after its
    /// [`TrainEvent::Step`]), with the updated model; `step` is the optimizer steps done.
    fn inspect(&mut self, _step: usize, _model: &CausalLm<B>) {}
    /// The run ended (`summary.status` says how).
    fn stop(&mut self, _summary: &RunSummary) {}
}

/// Forwards to several observers, in the order they were added.
pub struct Observers<'a, B: FusedAutodiffBackend> {
    list: Vec<&'a mut dyn TrainObserver<B>>,
}

impl<B: FusedAutodiffBackend> Default for Observers<'_, B> {
    fn default() -> Self {
        Self { list: Vec::new() }
    }
}

impl<'a, B: FusedAutodiffBackend> Observers<'a, B> {
    /// Adds an observer.
    pub fn push(&mut self, o: &'a mut dyn TrainObserver<B>) {
        self.list.push(o);
    }
}

impl<B: FusedAutodiffBackend> TrainObserver<B> for Observers<'_, B> {
    fn notice(&mut self, message: &str) {
        for o in &mut self.list {
            o.notice(message);
        }
    }
    fn start(&mut self, info: &RunInfo) {
        for o in &mut self.list {
            o.start(info);
        }
    }
    fn update(&mut self, event: &TrainEvent<'_>) {
        for o in &mut self.list {
            o.update(event);
        }
    }
    fn inspect(&mut self, step: usize, model: &CausalLm<B>) {
        for o in &mut self.list {
            o.inspect(step, model);
        }
    }
    fn stop(&mut self, summary: &RunSummary) {
        for o in &mut self.list {
            o.stop(summary);
        }
    }
}

/// Writes the run's `metrics.jsonl` in its output directory (`train_monitor::MetricsLog`):
/// one tagged row per step and per evaluation, appended when the run resumes. A run writes no
/// metrics file unless this observer is among its observers (the `train` binary always adds
/// it). Writing never stops the run: the first error is kept ([`MetricsObserver::error`]) for
/// whoever composed it to report, and no further row is written.
#[derive(Debug, Default)]
pub struct MetricsObserver {
    log: Option<MetricsLog>,
    window: Option<train_monitor::LogWindow>,
    error: Option<String>,
}

impl MetricsObserver {
    /// An observer that opens `<output_dir>/metrics.jsonl` when the run starts.
    pub fn new() -> Self {
        Self::default()
    }

    /// The first error met writing the file, if any (later rows were not written).
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    fn write(&mut self, row: &MetricsRow) {
        if let Some(log) = self.log.as_mut()
            && let Err(e) = log.write(row)
        {
            self.error.get_or_insert(e.to_string());
            self.log = None;
        }
    }
}

impl<B: FusedAutodiffBackend> TrainObserver<B> for MetricsObserver {
    fn start(&mut self, info: &RunInfo) {
        let path = info.output_dir.join(MetricsLog::FILE);
        let resumed_after = (info.start_step > 0).then_some(info.start_step);
        match MetricsLog::open_at(&path, resumed_after) {
            Ok(log) => self.log = Some(log),
            Err(e) => {
                self.error.get_or_insert(e.to_string());
            }
        }
        self.window = Some(train_monitor::LogWindow::new(
            info.logging_steps,
            info.total_steps,
        ));
    }

    fn update(&mut self, event: &TrainEvent<'_>) {
        match event {
            TrainEvent::Step(m) => {
                if let Some(row) = self.window.as_mut().and_then(|w| w.push(m)) {
                    self.write(&MetricsRow::Step(row));
                }
            }
            TrainEvent::Eval(m) => self.write(&MetricsRow::Eval((*m).clone())),
            _ => {}
        }
    }

    fn stop(&mut self, _summary: &RunSummary) {
        self.log = None;
    }
}
