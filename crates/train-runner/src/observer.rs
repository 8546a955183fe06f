//! The observer interface (the seed's `MonitoringBundle`: start / update / stop) and the
//! metrics log every run writes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use train_model::CausalLm;
use train_model::FusedAutodiffBackend;

use crate::error::{Result, RunnerError};

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
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based step number.
    pub step: usize,
    /// Progress in epochs.
    pub epoch: f64,
    /// Mean cross-entropy over the step's label tokens.
    pub loss: f64,
    /// Learning rate used by this step.
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens of the step (padding excluded).
    pub tokens: usize,
    /// Label tokens of the step.
    pub label_tokens: usize,
    /// Input tokens per second of this step.
    pub tokens_per_sec: f64,
}

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Step after which it ran.
    pub step: usize,
    /// Progress in epochs.
    pub epoch: f64,
    /// Mean cross-entropy over every validation label token.
    pub eval_loss: f64,
    /// Validation label tokens.
    pub eval_tokens: u64,
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
    Step(&'a StepMetrics),
    /// An evaluation finished.
    Eval(&'a EvalMetrics),
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
    /// A checkpoint was written.
    Checkpoint {
        /// Its step.
        step: usize,
        /// Its directory.
        path: &'a Path,
    },
}

/// Receives a run's progress. `stop` is always called once `start` was: on success, error,
/// crash and interruption.
pub trait TrainObserver {
    /// Something the user should know that is not progress: checkpoints moved aside, a lock
    /// taken over from a dead process. May come before [`TrainObserver::start`] (while the
    /// output directory is claimed); the library prints nothing itself.
    fn notice(&mut self, _message: &str) {}
    /// The run starts.
    fn start(&mut self, _info: &RunInfo) {}
    /// Something happened.
    fn update(&mut self, _event: &TrainEvent<'_>) {}
    /// The run ended (`summary.status` says how).
    fn stop(&mut self, _summary: &RunSummary) {}
}

/// Forwards to several observers.
#[derive(Default)]
pub struct Observers<'a> {
    list: Vec<&'a mut dyn TrainObserver>,
}

impl<'a> Observers<'a> {
    /// Adds an observer.
    pub fn push(&mut self, o: &'a mut dyn TrainObserver) {
        self.list.push(o);
    }
}

impl TrainObserver for Observers<'_> {
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
    fn stop(&mut self, summary: &RunSummary) {
        for o in &mut self.list {
            o.stop(summary);
        }
    }
}

/// `metrics.jsonl`: one object per step and per evaluation, appended (flushed each line).
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path`, appending when `append`, else truncating.
    pub fn open(path: &Path, append: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(path)
            .map_err(|e| RunnerError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one JSON line.
    pub fn write<T: Serialize>(&mut self, row: &T) -> Result<()> {
        let mut line = serde_json::to_string(row)
            .map_err(|e| RunnerError::io(&self.path, std::io::Error::other(e.to_string())))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| RunnerError::io(&self.path, e))?;
        self.file
            .flush()
            .map_err(|e| RunnerError::io(&self.path, e))
    }
}

/// Looks at the model between optimizer steps (layer statistics, live previews, probes):
/// [`ModelInspector::inspect`] is called before the first step of the run and after every step,
/// with the updated model.
pub trait ModelInspector<B: FusedAutodiffBackend> {
    /// `step`: optimizer steps done so far.
    fn inspect(&mut self, step: usize, model: &CausalLm<B>);
}

/// An inspector that looks at nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInspector;

impl<B: FusedAutodiffBackend> ModelInspector<B> for NoInspector {
    fn inspect(&mut self, _: usize, _: &CausalLm<B>) {}
}
