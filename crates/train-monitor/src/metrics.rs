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

/// The rows of a run logged every `logging_steps` steps (`TrainingArguments.logging_steps`):
/// [`LogWindow::push`] takes every step and returns a row after each `logging_steps`-th one
/// and after the last step of the run. A row carries the last step's number, epoch, learning
/// rate and gradient norm, the mean loss and mean objective metrics of its steps, their token
/// counts summed, and tokens/s over their summed time.
#[derive(Debug, Clone)]
pub struct LogWindow {
    every: usize,
    last_step: usize,
    steps: Vec<StepRecord>,
}

impl LogWindow {
    /// A window of `every` steps (at least 1) in a run whose last step is `last_step`.
    pub fn new(every: usize, last_step: usize) -> Self {
        Self {
            every: every.max(1),
            last_step,
            steps: Vec::new(),
        }
    }

    /// Adds a step; returns the row to log when this step closes a window.
    pub fn push(&mut self, step: &StepRecord) -> Option<StepRecord> {
        if self.every == 1 {
            return Some(step.clone());
        }
        self.steps.push(step.clone());
        if !(step.step.is_multiple_of(self.every) || step.step >= self.last_step) {
            return None;
        }
        let steps = std::mem::take(&mut self.steps);
        let n = steps.len() as f64;
        let seconds: f64 = steps
            .iter()
            .map(|s| s.tokens as f64 / s.tokens_per_sec.max(1e-12))
            .sum();
        let tokens: usize = steps.iter().map(|s| s.tokens).sum();
        let mut metrics = ObjectiveMetrics::new();
        for s in &steps {
            for (k, v) in &s.metrics {
                *metrics.entry(k.clone()).or_default() += v / n;
            }
        }
        let last = steps.last()?;
        Some(StepRecord {
            step: last.step,
            epoch: last.epoch,
            loss: steps.iter().map(|s| s.loss).sum::<f64>() / n,
            learning_rate: last.learning_rate,
            grad_norm: last.grad_norm,
            tokens,
            label_tokens: steps.iter().map(|s| s.label_tokens).sum(),
            tokens_per_sec: if seconds > 0.0 {
                tokens as f64 / seconds
            } else {
                0.0
            },
            metrics,
        })
    }
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

#[cfg(test)]
mod window_tests {
    use super::*;

    fn step(step: usize, loss: f64, tokens: usize, seconds: f64) -> StepRecord {
        StepRecord {
            step,
            epoch: step as f64 / 10.0,
            loss,
            learning_rate: step as f64,
            grad_norm: 10.0 * step as f64,
            tokens,
            label_tokens: tokens / 2,
            tokens_per_sec: tokens as f64 / seconds,
            metrics: [("m".to_string(), loss * 2.0)].into_iter().collect(),
        }
    }

    #[test]
    fn rows_average_their_steps_and_the_last_step_closes_a_window() {
        let mut w = LogWindow::new(2, 5);
        let rows: Vec<StepRecord> = [
            step(1, 1.0, 100, 1.0),
            step(2, 3.0, 300, 1.0),
            step(3, 5.0, 10, 1.0),
            step(4, 7.0, 10, 1.0),
            step(5, 9.0, 50, 0.5),
        ]
        .iter()
        .filter_map(|s| w.push(s))
        .collect();
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), [2, 4, 5]);
        let r = &rows[0];
        assert_eq!((r.loss, r.tokens, r.label_tokens), (2.0, 400, 200));
        assert_eq!((r.learning_rate, r.grad_norm, r.epoch), (2.0, 20.0, 0.2));
        assert_eq!(r.tokens_per_sec, 200.0);
        assert_eq!(r.metrics["m"], 4.0);
        assert_eq!(rows[2].tokens_per_sec, 100.0);
        let mut every = LogWindow::new(1, 5);
        assert_eq!(
            every.push(&step(1, 1.0, 1, 1.0)),
            Some(step(1, 1.0, 1, 1.0))
        );
    }
}
