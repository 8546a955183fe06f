//! Feeds the runner's events to `train-monitor`: the status file, alerts, plots and report.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use train_monitor::{
    AlertConfig, History, MetricsLog, MonitorError, MonitoringBundle, MonitoringConfig, RunEnd,
    RunStart, Status,
};
use train_runner::{RunInfo, RunStatus, RunSummary, TrainEvent, TrainObserver};

/// The monitoring of one `train` run. Problems writing monitoring output are reported once and
/// never stop training.
pub struct Monitor {
    bundle: Rc<RefCell<MonitoringBundle>>,
    warned: bool,
    started: Instant,
    steps: usize,
    /// Time spent in monitoring and the run's wall time, once it stopped.
    pub overhead: Option<(Duration, Duration, usize)>,
}

impl Monitor {
    /// Status in `status_dir`, report, plots and logs in `output`, alerts at `alerts`.
    pub fn new(status_dir: PathBuf, output: PathBuf, alerts: AlertConfig) -> Self {
        let mut config = MonitoringConfig::new(status_dir, Some(output));
        config.alerts = alerts;
        Self {
            bundle: Rc::new(RefCell::new(MonitoringBundle::new(config))),
            warned: false,
            started: Instant::now(),
            steps: 0,
            overhead: None,
        }
    }

    /// The bundle, shared with the model inspector.
    pub fn bundle(&self) -> Rc<RefCell<MonitoringBundle>> {
        Rc::clone(&self.bundle)
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

impl TrainObserver for Monitor {
    fn start(&mut self, info: &RunInfo) {
        self.started = Instant::now();
        let history = if info.start_step > 0 {
            std::fs::read_to_string(info.output_dir.join(MetricsLog::FILE))
                .map(|t| History::from_metrics(&t, info.start_step))
                .unwrap_or_default()
        } else {
            History::default()
        };
        let r = self.bundle.borrow_mut().start(RunStart {
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
                let r = self.bundle.borrow_mut().step(m);
                for alert in self.check(r).unwrap_or_default() {
                    errln!("alert: {}", alert.message);
                }
            }
            TrainEvent::Eval(e) => {
                let r = self.bundle.borrow_mut().eval(e);
                self.check(r);
            }
            TrainEvent::Paused { .. } => {
                let r = self.bundle.borrow_mut().set_status(Status::Paused);
                self.check(r);
            }
            TrainEvent::Resumed { .. } => {
                let r = self.bundle.borrow_mut().set_status(Status::Training);
                self.check(r);
            }
            _ => {}
        }
    }

    fn stop(&mut self, summary: &RunSummary) {
        let status = match summary.status {
            RunStatus::Completed => Status::Completed,
            RunStatus::Stopped => Status::Stopped,
            RunStatus::Crashed | RunStatus::Failed => Status::Crashed,
        };
        let r = self.bundle.borrow_mut().stop(&RunEnd {
            status,
            step: summary.global_step,
            error: summary.error.clone(),
        });
        self.check(r);
        self.overhead = Some((
            self.bundle.borrow().time_spent(),
            self.started.elapsed(),
            self.steps,
        ));
    }
}
