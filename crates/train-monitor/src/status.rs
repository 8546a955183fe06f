//! The status file `training_status.json`: its schema and a writer that replaces it atomically,
//! at most every `min_interval` unless forced.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::alerts::Alert;
use crate::error::Result;
use crate::memory::MemoryInfo;
use crate::samples::Sample;
use crate::write_atomic;

/// Version of [`TrainingStatus`]'s layout; bumped when a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

/// The state of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not started.
    #[default]
    Idle,
    /// Training.
    Training,
    /// Paused on request.
    Paused,
    /// Stopped on request, after a checkpoint.
    Stopped,
    /// Ended by a NaN loss or an error (`error` says which).
    Crashed,
    /// Reached its last step.
    Completed,
}

/// Everything `training_status.json` holds (schema version [`SCHEMA_VERSION`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TrainingStatus {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The state of the run.
    pub status: Status,
    /// Optimizer steps done.
    pub step: usize,
    /// Optimizer steps the run will reach.
    pub total_steps: usize,
    /// Progress in epochs.
    pub epoch: f64,
    /// Loss of the last step.
    pub loss: Option<f64>,
    /// Learning rate of the last step.
    pub learning_rate: Option<f64>,
    /// Global gradient norm (before clipping) of the last step.
    pub grad_norm: Option<f64>,
    /// Input tokens per second, exponentially smoothed.
    pub tokens_per_sec: Option<f64>,
    /// Last validation loss.
    pub eval_loss: Option<f64>,
    /// Last validation loss minus the mean training loss of the recent steps.
    pub eval_train_gap: Option<f64>,
    /// Variance of the recent losses around their trend.
    pub loss_variance: Option<f64>,
    /// Slope of the recent losses per step (negative: falling).
    pub loss_trend: Option<f64>,
    /// Active alerts.
    pub alerts: Vec<Alert>,
    /// Host memory.
    pub memory: Option<MemoryInfo>,
    /// The last live previews.
    pub previews: Vec<Sample>,
    /// Why the run crashed or failed.
    pub error: Option<String>,
    /// Output directory of the run.
    pub output_dir: Option<PathBuf>,
    /// Seconds since the Unix epoch when the run started.
    pub started_at: f64,
    /// Seconds since the Unix epoch of this write.
    pub updated_at: f64,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Writes `training_status.json` atomically, at most once per `min_interval` unless forced.
#[derive(Debug)]
pub struct StatusWriter {
    path: PathBuf,
    min_interval: Duration,
    last: Option<Instant>,
    writes: usize,
}

impl StatusWriter {
    /// Writes `dir/training_status.json`.
    pub fn new(dir: &Path, min_interval: Duration) -> Self {
        Self {
            path: dir.join("training_status.json"),
            min_interval,
            last: None,
            writes: 0,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times the file was written.
    pub fn writes(&self) -> usize {
        self.writes
    }

    /// Writes `status` when forced or when `min_interval` has passed since the last write;
    /// returns whether it wrote.
    pub fn write(&mut self, status: &TrainingStatus, force: bool) -> Result<bool> {
        if !force && self.last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return Ok(false);
        }
        let mut s = status.clone();
        s.schema_version = SCHEMA_VERSION;
        s.updated_at = unix_now();
        let mut bytes = serde_json::to_vec_pretty(&s).unwrap_or_default();
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes)?;
        self.last = Some(Instant::now());
        self.writes += 1;
        Ok(true)
    }
}
