//! [`MonitoringBundle`]: the seed's start / update / stop over the status file, alerts and the
//! report.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::alerts::{Alert, AlertConfig, AlertInputs, AlertKind, evaluate};
use crate::error::Result;
use crate::jsonl::JsonlWriter;
use crate::layers::{LayerMonitor, LayerRecord};
use crate::memory::MemoryInfo;
use crate::metrics::{EvalRecord, StepRecord};
use crate::report::{History, write_report};
use crate::samples::Sample;
use crate::stats::{Ema, LossWindow};
use crate::status::{Status, StatusWriter, TrainingStatus, unix_now};

/// What to monitor and where to write.
#[derive(Debug, Clone)]
pub struct MonitoringConfig {
    /// Directory of `training_status.json` (the contract: `<output>/status`).
    pub status_dir: PathBuf,
    /// Directory of `report.html`, `plots/` and the JSON-lines logs (`layer_history.jsonl`,
    /// `previews.jsonl`, `evolution.jsonl`): the output directory; `None`: none of them.
    pub report_dir: Option<PathBuf>,
    /// Write the status file (the origin's `enable_live_monitor`; on).
    pub enable_live_monitor: bool,
    /// Keep `layer_history.jsonl` (on).
    pub enable_layer_monitor: bool,
    /// Keep `evolution.jsonl` (on).
    pub enable_evolution_tracker: bool,
    /// Least time between two status writes that are not forced (2 s).
    pub status_interval: Duration,
    /// Alert thresholds.
    pub alerts: AlertConfig,
    /// Losses in the variance / trend window (20).
    pub loss_window: usize,
    /// Write TensorBoard event files in this directory (`--report-to tensorboard`; none).
    pub tensorboard_dir: Option<PathBuf>,
    /// Steps per TensorBoard scalar point, averaged as `metrics.jsonl`'s rows are
    /// ([`crate::LogWindow`]; 1).
    pub logging_steps: usize,
    /// The run's settings, `(name, value)`, shown in `report.html` (model, data, every
    /// hyper-parameter; none).
    pub settings: Vec<(String, String)>,
}

impl MonitoringConfig {
    /// Status in `status_dir`, report in `report_dir`, the origin's defaults elsewhere.
    pub fn new(status_dir: PathBuf, report_dir: Option<PathBuf>) -> Self {
        Self {
            status_dir,
            report_dir,
            status_interval: Duration::from_secs(2),
            enable_live_monitor: true,
            enable_layer_monitor: true,
            enable_evolution_tracker: true,
            alerts: AlertConfig::default(),
            loss_window: 20,
            tensorboard_dir: None,
            logging_steps: 1,
            settings: Vec::new(),
        }
    }
}

/// How a run starts.
#[derive(Debug, Clone)]
pub struct RunStart {
    /// Steps the run will reach.
    pub total_steps: usize,
    /// Steps already done (resume).
    pub start_step: usize,
    /// The output directory.
    pub output_dir: PathBuf,
    /// The earlier part of a resumed run, for the report.
    pub history: History,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunEnd {
    /// `Completed`, `Stopped` or `Crashed`.
    pub status: Status,
    /// Steps done.
    pub step: usize,
    /// Why it crashed.
    pub error: Option<String>,
}

/// The status file, alerts and report of one run. Writing problems are returned, never
/// panicked on; a caller may report them and go on training.
#[derive(Debug)]
pub struct MonitoringBundle {
    config: MonitoringConfig,
    writer: StatusWriter,
    status: TrainingStatus,
    throughput: Ema,
    window: LossWindow,
    baseline: Vec<f64>,
    baseline_value: Option<f64>,
    history: History,
    active: HashSet<AlertKind>,
    spent: Duration,
    layers: LayerMonitor,
    layer_log: Option<JsonlWriter>,
    preview_log: Option<JsonlWriter>,
    evolution_log: Option<JsonlWriter>,
    rollout_log: Option<JsonlWriter>,
    tensorboard: Option<(crate::tensorboard::EventWriter, crate::metrics::LogWindow)>,
}

/// Previews as Markdown for TensorBoard's text plugin: each prompt, golden and generated
/// answer in a code block, so that their newlines and markup are shown as they are.
fn previews_markdown(samples: &[Sample]) -> String {
    let block = |t: &str| format!("```\n{}\n```\n", t.replace("```", "`\u{200b}``"));
    let mut out = String::new();
    for s in samples {
        out.push_str(&format!(
            "**preview {}**{}\n\nprompt:\n{}golden:\n{}generated:\n{}\n",
            s.index,
            if s.exact_match { " (exact match)" } else { "" },
            block(&s.prompt),
            block(&s.golden),
            block(&s.generated)
        ));
    }
    out
}

/// Previews kept in the status file.
const STATUS_PREVIEWS: usize = 4;

impl MonitoringBundle {
    /// A bundle writing where `config` says.
    pub fn new(config: MonitoringConfig) -> Self {
        let log = |name: &str| {
            config
                .report_dir
                .as_ref()
                .map(|d| JsonlWriter::new(&d.join(name)))
        };
        Self {
            layer_log: log("layer_history.jsonl"),
            preview_log: log("previews.jsonl"),
            evolution_log: log("evolution.jsonl"),
            rollout_log: log("completions.jsonl"),
            layers: LayerMonitor::new(),
            writer: StatusWriter::new(&config.status_dir, config.status_interval),
            window: LossWindow::new(config.loss_window),
            config,
            status: TrainingStatus::default(),
            throughput: Ema::new(0.3),
            baseline: Vec::new(),
            baseline_value: None,
            history: History::default(),
            active: HashSet::new(),
            spent: Duration::ZERO,
            tensorboard: None,
        }
    }

    /// What it monitors and where it writes.
    pub fn config(&self) -> &MonitoringConfig {
        &self.config
    }

    /// The current status.
    pub fn status(&self) -> &TrainingStatus {
        &self.status
    }

    /// The history so far.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The status file.
    pub fn status_path(&self) -> PathBuf {
        self.writer.path().to_path_buf()
    }

    /// Time spent inside the bundle (its overhead on the run).
    pub fn time_spent(&self) -> Duration {
        self.spent
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let t = Instant::now();
        let out = f(self);
        self.spent += t.elapsed();
        out
    }

    /// The run starts: status `training`, written at once.
    pub fn start(&mut self, run: RunStart) -> Result<()> {
        self.timed(|b| {
            // A resumed run does the steps after `start_step` again: their rows go (the
            // inspection logs' rows of `start_step` too, which it writes again before its first
            // step).
            if run.start_step > 0 {
                for (log, first_dropped) in [
                    (&b.layer_log, run.start_step),
                    (&b.preview_log, run.start_step),
                    (&b.evolution_log, run.start_step),
                    (&b.rollout_log, run.start_step + 1),
                ] {
                    // Best effort, as for `metrics.jsonl`: a log that cannot be cut is
                    // appended to.
                    if let Some(log) = log {
                        let _ = crate::drop_rows_from_step(log.path(), first_dropped);
                    }
                }
            }
            for s in &run.history.steps {
                b.window.push(s.step, s.loss);
            }
            if let Some(dir) = &b.config.tensorboard_dir {
                b.tensorboard = Some((
                    crate::tensorboard::EventWriter::create(dir)?,
                    crate::metrics::LogWindow::new(b.config.logging_steps, run.total_steps),
                ));
            }
            b.history = run.history;
            b.status = TrainingStatus {
                status: Status::Training,
                step: run.start_step,
                total_steps: run.total_steps,
                output_dir: Some(run.output_dir),
                started_at: unix_now(),
                memory: Some(MemoryInfo::read()),
                ..TrainingStatus::default()
            };
            b.write(true)
        })
    }

    /// A step finished; returns the alerts it newly raised.
    pub fn step(&mut self, s: &StepRecord) -> Result<Vec<Alert>> {
        self.timed(|b| {
            if let Some((tb, window)) = b.tensorboard.as_mut()
                && let Some(row) = window.push(s)
            {
                let mut values = vec![
                    ("train/loss".to_string(), row.loss),
                    ("train/learning_rate".to_string(), row.learning_rate),
                    ("train/grad_norm".to_string(), row.grad_norm),
                    ("train/epoch".to_string(), row.epoch),
                    ("train/tokens_per_sec".to_string(), row.tokens_per_sec),
                ];
                values.extend(row.metrics.iter().map(|(k, v)| (format!("train/{k}"), *v)));
                tb.scalars(row.step, &values)?;
                tb.flush()?;
            }
            b.history.steps.push(s.clone());
            b.window.push(s.step, s.loss);
            let smoothed = b.throughput.push(s.tokens_per_sec);
            // The first step of a run warms up; the next ones make the baseline.
            if b.baseline_value.is_none() && s.tokens_per_sec.is_finite() {
                b.baseline.push(s.tokens_per_sec);
                if b.baseline.len() > b.config.alerts.baseline_steps {
                    let rest = &b.baseline[1..];
                    b.baseline_value = Some(rest.iter().sum::<f64>() / rest.len() as f64);
                }
            }
            let memory = MemoryInfo::read();
            let st = &mut b.status;
            st.step = s.step;
            st.epoch = s.epoch;
            st.loss = Some(s.loss);
            st.learning_rate = Some(s.learning_rate);
            st.grad_norm = Some(s.grad_norm);
            st.tokens_per_sec = smoothed;
            st.loss_variance = b.window.variance();
            st.loss_trend = b.window.trend();
            st.memory = Some(memory);
            if let (Some(e), Some(m)) = (st.eval_loss, b.window.mean()) {
                st.eval_train_gap = Some(e - m);
            }
            let alerts = evaluate(
                &b.config.alerts,
                &AlertInputs {
                    step: s.step,
                    loss: s.loss,
                    tokens_per_sec: smoothed,
                    baseline_tokens_per_sec: b.baseline_value,
                    eval_gap: st.eval_train_gap,
                    loss_variance: st.loss_variance,
                    available_bytes: memory.available_bytes,
                },
            );
            let new: Vec<Alert> = alerts
                .iter()
                .filter(|a| !b.active.contains(&a.kind))
                .cloned()
                .collect();
            b.active = alerts.iter().map(|a| a.kind).collect();
            // Keep the step an alert was first raised at.
            let previous = std::mem::take(&mut st.alerts);
            st.alerts = alerts
                .into_iter()
                .map(|a| {
                    previous
                        .iter()
                        .find(|p| p.kind == a.kind)
                        .cloned()
                        .map_or(a.clone(), |p| Alert { step: p.step, ..a })
                })
                .collect();
            let force = !new.is_empty();
            b.write(force)?;
            Ok(new)
        })
    }

    /// An evaluation finished: status written at once, report refreshed.
    pub fn eval(&mut self, e: &EvalRecord) -> Result<()> {
        self.timed(|b| {
            if let Some((tb, _)) = b.tensorboard.as_mut() {
                let mut values = vec![("eval/loss".to_string(), e.eval_loss)];
                values.extend(
                    e.metrics.iter().map(|(k, v)| {
                        (format!("eval/{}", k.strip_prefix("eval_").unwrap_or(k)), *v)
                    }),
                );
                tb.scalars(e.step, &values)?;
                tb.flush()?;
            }
            b.history.evals.push(e.clone());
            b.status.eval_loss = Some(e.eval_loss);
            b.status.eval_train_gap = b.window.mean().map(|m| e.eval_loss - m);
            b.write(true)?;
            b.report()
        })
    }

    /// Counts monitoring work done outside the bundle (layer norms, previews) in
    /// [`MonitoringBundle::time_spent`].
    pub fn account(&mut self, spent: Duration) {
        self.spent += spent;
    }

    /// Whether the configuration asks for the layer monitor.
    pub fn wants_layers(&self) -> bool {
        self.config.enable_layer_monitor
    }

    /// Whether the configuration asks for the evolution tracker.
    pub fn wants_evolution(&self) -> bool {
        self.config.enable_evolution_tracker
    }

    /// A layer snapshot: every layer's weight norm after `step`; appended to
    /// `layer_history.jsonl`.
    pub fn layers(&mut self, step: usize, norms: &[f64]) -> Result<Vec<LayerRecord>> {
        self.timed(|b| {
            if !b.config.enable_layer_monitor {
                return Ok(Vec::new());
            }
            let rows = b.layers.record(step, norms);
            if let Some(log) = b.layer_log.as_mut() {
                log.append(&rows)?;
            }
            Ok(rows)
        })
    }

    /// Live previews: appended to `previews.jsonl`, the last ones kept in the status file.
    pub fn previews(&mut self, samples: &[Sample]) -> Result<()> {
        self.timed(|b| {
            if let Some(log) = b.preview_log.as_mut() {
                log.append(samples)?;
            }
            if let (Some((tb, _)), Some(first)) = (b.tensorboard.as_mut(), samples.first()) {
                tb.text(first.step, "previews", &previews_markdown(samples))?;
                tb.flush()?;
            }
            let keep = samples.len().saturating_sub(STATUS_PREVIEWS);
            b.status.previews = samples[keep..].to_vec();
            b.write(true)
        })
    }

    /// Sampled completions of online training and their rewards: appended to
    /// `completions.jsonl`.
    pub fn rollouts(&mut self, samples: &[crate::RolloutSample]) -> Result<()> {
        self.timed(|b| match b.rollout_log.as_mut() {
            Some(log) => log.append(samples),
            None => Ok(()),
        })
    }

    /// Predictions on the probe set: appended to `evolution.jsonl`.
    pub fn evolution(&mut self, samples: &[Sample]) -> Result<()> {
        self.timed(|b| {
            if !b.config.enable_evolution_tracker {
                return Ok(());
            }
            match b.evolution_log.as_mut() {
                Some(log) => log.append(samples),
                None => Ok(()),
            }
        })
    }

    fn write(&mut self, force: bool) -> Result<()> {
        if self.config.enable_live_monitor {
            self.writer.write(&self.status, force)?;
        }
        Ok(())
    }

    /// The run pauses (`Paused`) or goes on (`Training`): written at once.
    pub fn set_status(&mut self, status: Status) -> Result<()> {
        self.timed(|b| {
            b.status.status = status;
            b.write(true)
        })
    }

    /// The run ended: final status written at once, report refreshed.
    pub fn stop(&mut self, end: &RunEnd) -> Result<()> {
        self.timed(|b| {
            b.status.status = end.status;
            b.status.step = end.step;
            b.status.error.clone_from(&end.error);
            b.status.memory = Some(MemoryInfo::read());
            let written = b.write(true);
            let reported = b.report();
            written.and(reported)
        })
    }

    fn report(&self) -> Result<()> {
        match &self.config.report_dir {
            Some(dir) => write_report(dir, &self.status, &self.history, &self.config.settings),
            None => Ok(()),
        }
    }
}
