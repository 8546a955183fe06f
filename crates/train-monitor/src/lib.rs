//! # train-monitor
//!
//! See a fine-tuning run while it trains, without a tensor library:
//!
//! * [`StatusWriter`] / [`TrainingStatus`]: `training_status.json` with a documented schema
//!   ([`SCHEMA_VERSION`]), replaced atomically (temporary file + rename, so a reader never sees
//!   a partial file) and at most every 2 s unless forced.
//! * [`Ema`], [`LossWindow`]: smoothed throughput, loss trend and detrended variance.
//! * [`evaluate_alerts`]: throughput below 60 % of its baseline, validation–train gap above 0.3, a noisy
//!   loss, low host memory, NaN loss; thresholds in [`AlertConfig`].
//! * [`write_report`]: loss / eval loss / learning-rate / gradient-norm / throughput curves as SVG
//!   (plotters) and a self-contained `report.html`.
//! * [`LayerMonitor`]: per-layer weight norms and their changes (`layer_history.jsonl`).
//! * [`Sample`]: live previews against the golden answer (`previews.jsonl`, the last ones in the
//!   status file) and the evolution tracker's probe predictions (`evolution.jsonl`, at steps
//!   0, 10, 25, 50, 100, 250, …).
//! * [`MetricsLog`], [`MetricsRow`]: `metrics.jsonl`, tagged step and evaluation rows.
//! * [`MonitoringBundle`]: the seed's start / update / stop over all of it, fed plain values.
//!
//! ## Cargo features
//!
//! None; no tensor library. Plots are drawn with plotters' SVG backend (no system fonts or
//! libraries needed).
//!
//! ## Errors
//!
//! [`MonitorError`]: `Io` (a status, JSONL, plot or report file cannot be written, with its
//! path) and `Plot` (plotters failed to draw). The bundle returns them and keeps going; a
//! caller reports them without stopping training.
//!
//! ## Example
//!
//! ```
//! use train_monitor::{MonitoringBundle, MonitoringConfig, RunEnd, RunStart, Status, StepRecord, History};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let out = tempfile::tempdir()?;
//! let mut m = MonitoringBundle::new(MonitoringConfig::new(out.path().join("status"), Some(out.path().into())));
//! m.start(RunStart { total_steps: 2, start_step: 0, output_dir: out.path().into(), history: History::default() })?;
//! for step in 1..=2 {
//!     m.step(&StepRecord { step, epoch: step as f64 / 2.0, loss: 3.0 / step as f64,
//!         learning_rate: 1e-4, grad_norm: 1.0, tokens: 500, label_tokens: 200, tokens_per_sec: 1000.0,
//!         metrics: Default::default() })?;
//! }
//! m.stop(&RunEnd { status: Status::Completed, step: 2, error: None })?;
//! let status: serde_json::Value = serde_json::from_slice(&std::fs::read(m.status_path())?)?;
//! assert_eq!(status["status"], "completed");
//! assert!(out.path().join("report.html").exists() && out.path().join("plots/loss.svg").exists());
//! # Ok(())
//! # }
//! ```

mod alerts;
mod bundle;
mod error;
mod jsonl;
mod layers;
mod memory;
mod metrics;
mod plots;
mod report;
mod samples;
mod stats;
mod status;
mod tensorboard;

pub use alerts::{Alert, AlertConfig, AlertInputs, AlertKind, evaluate as evaluate_alerts};
pub use bundle::{MonitoringBundle, MonitoringConfig, RunEnd, RunStart};
pub use error::{MonitorError, Result};
pub use jsonl::{JsonlWriter, MAX_RESUMED_LOG_BYTES, drop_rows_from_step};
pub use layers::{LayerMonitor, LayerRecord};
pub use memory::MemoryInfo;
pub use metrics::{EvalRecord, LogWindow, MetricsLog, MetricsRow, ObjectiveMetrics, StepRecord};
pub use plots::{Series, line_chart};
pub use report::{History, MAX_METRIC_CHARTS, charts, render_html, write_report};
pub use samples::{RolloutSample, Sample, evolution_due, preview_interval};
pub use stats::{Ema, LossWindow};
pub use status::{SCHEMA_VERSION, Status, StatusWriter, TrainingStatus, unix_now};
pub use tensorboard::EventWriter;

/// Creates the directory of `path`, then replaces the file by `train_fs`'s rule (a reader sees
/// the old content or the new, never a part).
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| MonitorError::io(dir, e))?;
    train_fs::write_atomic(path, bytes).map_err(|e| MonitorError::io(path, e))
}
