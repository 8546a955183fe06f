//! `metrics.jsonl`: the rows of a run's steps and evaluations, one tagged JSON object per line
//! (`"kind": "step"` or `"eval"`), written by [`MetricsLog`] and read back by
//! [`History::from_metrics`](crate::History::from_metrics).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{MonitorError, Result};

/// An objective's own metrics of a step or an evaluation, by name (TRL's for DPO:
/// `rewards/chosen`, `rewards/margins`, …; evaluations prefix them with `eval_`), written into
/// the same `metrics.jsonl` row as the record's fields. Empty for supervised fine-tuning.
pub type ObjectiveMetrics = BTreeMap<String, f64>;

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
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
    #[serde(default)]
    pub tokens: usize,
    /// Label tokens of the step.
    #[serde(default)]
    pub label_tokens: usize,
    /// Input tokens per second of this step.
    pub tokens_per_sec: f64,
    /// The objective's own metrics, each a mean over the step's units.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: ObjectiveMetrics,
}

/// One evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Step after which it ran.
    pub step: usize,
    /// Progress in epochs.
    #[serde(default)]
    pub epoch: f64,
    /// Mean cross-entropy over every validation label token.
    pub eval_loss: f64,
    /// Validation label tokens (for an objective over pairs: validation pairs).
    #[serde(default)]
    pub eval_tokens: u64,
    /// The objective's own metrics over the validation data (names prefixed `eval_`).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: ObjectiveMetrics,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricsRow {
    /// An optimizer step.
    Step(StepRecord),
    /// An evaluation.
    Eval(EvalRecord),
}

impl MetricsRow {
    /// Parses one line; `None` for a line that is no row. Lines written before the rows were
    /// tagged (no `kind`) are evaluations when they carry `eval_loss`, steps otherwise.
    pub fn parse(line: &str) -> Option<Self> {
        if let Ok(row) = serde_json::from_str::<Self>(line) {
            return Some(row);
        }
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v.get("kind").is_some() {
            return None;
        }
        if v.get("eval_loss").is_some() {
            serde_json::from_value(v).ok().map(Self::Eval)
        } else {
            serde_json::from_value(v).ok().map(Self::Step)
        }
    }
}

/// Appends rows to a run's `metrics.jsonl`, one line each, flushed.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// The file name in a run's output directory.
    pub const FILE: &'static str = "metrics.jsonl";

    /// Opens `path` (its directory created), appending when `append` (a resumed run), else
    /// truncating.
    pub fn open(path: &Path, append: bool) -> Result<Self> {
        Self::open_at(path, append.then_some(0))
    }

    /// [`MetricsLog::open`] for a run that starts after `resumed_after` steps (`None`: from
    /// scratch, the file truncated): the rows of the steps it does again are removed first
    /// (when the file can be: see [`crate::drop_rows_from_step`]).
    pub fn open_at(path: &Path, resumed_after: Option<usize>) -> Result<Self> {
        let append = resumed_after.is_some();
        if let Some(step) = resumed_after.filter(|&s| s > 0) {
            // Best effort: a log that cannot be cut (over the size bound, unreadable) keeps its
            // rows and is appended to.
            let _ = crate::drop_rows_from_step(path, step + 1);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| MonitorError::io(dir, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(path)
            .map_err(|e| MonitorError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one row.
    pub fn write(&mut self, row: &MetricsRow) -> Result<()> {
        let mut line = serde_json::to_string(row)
            .map_err(|e| MonitorError::io(&self.path, std::io::Error::other(e.to_string())))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| MonitorError::io(&self.path, e))
    }
}
