//! Feeds the runner's events to `train-monitor`: the status file, alerts, plots and report.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use train_model::{CausalLm, FusedAutodiffBackend};
use train_monitor::{
    AlertConfig, History, MetricsLog, MonitorError, MonitoringBundle, MonitoringConfig, RunEnd,
    RunStart, Status,
};
use train_runner::{RunInfo, RunStatus, RunSummary, TrainEvent, TrainObserver};

use crate::inspect::Inspector;

/// The monitoring of one `train` run: the bundle fed by the run's events, and the inspector
/// that looks at the model between steps for it. Problems writing monitoring output are
/// reported once and never stop training.
pub struct Monitor<'a> {
    bundle: MonitoringBundle,
    inspector: Option<Inspector<'a>>,
    warned: bool,
    started: Instant,
    steps: usize,
    /// Time spent in monitoring and the run's wall time, once it stopped.
    pub overhead: Option<(Duration, Duration, usize)>,
}

impl<'a> Monitor<'a> {
    /// Status in `status_dir`, report, plots and logs in `output`, alerts at `alerts`.
    pub fn new(status_dir: PathBuf, output: PathBuf, alerts: AlertConfig) -> Self {
        let mut config = MonitoringConfig::new(status_dir, Some(output));
        config.alerts = alerts;
        Self {
            bundle: MonitoringBundle::new(config),
            inspector: None,
            warned: false,
            started: Instant::now(),
            steps: 0,
            overhead: None,
        }
    }

    /// Also writes TensorBoard event files in `tensorboard` (when given), a scalar point every
    /// `logging_steps` steps.
    pub fn reporting(self, tensorboard: Option<PathBuf>, logging_steps: usize) -> Self {
        self.reconfigured(|c| {
            c.tensorboard_dir = tensorboard;
            c.logging_steps = logging_steps;
        })
    }

    /// The same monitor with `change` made to its bundle's configuration (before the run).
    fn reconfigured(mut self, change: impl FnOnce(&mut MonitoringConfig)) -> Self {
        let mut config = self.bundle.config().clone();
        change(&mut config);
        self.bundle = MonitoringBundle::new(config);
        self
    }

    /// Shows the run's settings in `report.html`: `(name, value)` pairs.
    pub fn with_settings(self, settings: Vec<(String, String)>) -> Self {
        self.reconfigured(|c| c.settings = settings)
    }

    /// Looks at the model between steps with `inspector` (layer norms, previews, probes).
    pub fn with_inspector(mut self, inspector: Inspector<'a>) -> Self {
        self.inspector = Some(inspector);
        self
    }

    fn check<T>(&mut self, r: Result<T, MonitorError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                if !self.warned {
                    errln!("warning: monitoring: {e} (training goes on)");
                    self.warned = true;
                }
                None
            }
        }
    }
}

impl<B: FusedAutodiffBackend> TrainObserver<B> for Monitor<'_> {
    fn start(&mut self, info: &RunInfo) {
        self.started = Instant::now();
        let history = if info.start_step > 0 {
            std::fs::read_to_string(info.output_dir.join(MetricsLog::FILE))
                .map(|t| History::from_metrics(&t, info.start_step))
                .unwrap_or_default()
        } else {
            History::default()
        };
        let r = self.bundle.start(RunStart {
            total_steps: info.total_steps,
            start_step: info.start_step,
            output_dir: info.output_dir.clone(),
            history,
        });
        self.check(r);
    }

    fn update(&mut self, event: &TrainEvent<'_>) {
        match event {
            TrainEvent::Step(m) => {
                self.steps += 1;
                let r = self.bundle.step(m);
                for alert in self.check(r).unwrap_or_default() {
                    errln!("alert: {}", alert.message);
                }
            }
            TrainEvent::Eval(e) => {
                let r = self.bundle.eval(e);
                self.check(r);
            }
            TrainEvent::Rollouts { samples, .. } => {
                let r = self.bundle.rollouts(samples);
                self.check(r);
            }
            TrainEvent::Paused { .. } => {
                let r = self.bundle.set_status(Status::Paused);
                self.check(r);
            }
            TrainEvent::Resumed { .. } => {
                let r = self.bundle.set_status(Status::Training);
                self.check(r);
            }
            _ => {}
        }
    }

    fn inspect(&mut self, step: usize, model: &CausalLm<B>) {
        if let Some(inspector) = self.inspector.as_mut() {
            inspector.inspect(step, model, &mut self.bundle);
        }
    }

    fn stop(&mut self, summary: &RunSummary) {
        let status = match summary.status {
            RunStatus::Completed => Status::Completed,
            RunStatus::Stopped => Status::Stopped,
            RunStatus::Crashed | RunStatus::Failed => Status::Crashed,
        };
        let r = self.bundle.stop(&RunEnd {
            status,
            step: summary.global_step,
            error: summary.error.clone(),
        });
        self.check(r);
        self.overhead = Some((self.bundle.time_spent(), self.started.elapsed(), self.steps));
    }
}
