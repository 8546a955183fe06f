//! Progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use train_runner::{RunInfo, RunSummary, TrainEvent, TrainObserver};

/// Prints steps, loss, tokens/s and the time left.
pub struct Progress {
    tty: bool,
    started: Instant,
    total: usize,
    first_step: usize,
    smoothed_tps: Option<f64>,
    drawn: bool,
    eval_unit: &'static str,
    headline: Option<(&'static str, &'static str)>,
}

impl Progress {
    /// A progress printer for stderr.
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            total: 0,
            first_step: 0,
            smoothed_tps: None,
            drawn: false,
            eval_unit: "tokens",
            headline: None,
        }
    }

    fn clear(&mut self) {
        if self.tty && self.drawn {
            errp!("\r\x1b[2K");
            self.drawn = false;
        }
    }
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

impl<B: train_model::FusedAutodiffBackend> TrainObserver<B> for Progress {
    fn notice(&mut self, message: &str) {
        self.clear();
        errln!("{message}");
    }

    fn start(&mut self, info: &RunInfo) {
        self.started = Instant::now();
        self.total = info.total_steps;
        self.first_step = info.start_step;
        self.eval_unit = info.eval_unit;
        self.headline = info.headline;
        let resumed = if info.start_step > 0 {
            format!(", resuming after step {}", info.start_step)
        } else {
            String::new()
        };
        let trainable = if info.trainable_parameters == info.parameters {
            String::new()
        } else {
            format!(" ({} trainable)", info.trainable_parameters)
        };
        errln!(
            "training {} steps ({} per epoch) on {} rows, {} validation examples, {} parameters{trainable}{resumed}",
            info.total_steps,
            info.steps_per_epoch,
            info.train_rows,
            info.validation_examples,
            info.parameters
        );
    }

    fn update(&mut self, event: &TrainEvent<'_>) {
        match event {
            TrainEvent::Step(m) => {
                let tps = match self.smoothed_tps {
                    Some(s) => 0.9 * s + 0.1 * m.tokens_per_sec,
                    None => m.tokens_per_sec,
                };
                self.smoothed_tps = Some(tps);
                let done = m.step - self.first_step;
                let elapsed = self.started.elapsed().as_secs_f64();
                let eta = elapsed / done.max(1) as f64 * (self.total - m.step) as f64;
                let headline = self
                    .headline
                    .and_then(|(key, label)| m.metrics.get(key).map(|v| format!(" {label} {v:.3}")))
                    .unwrap_or_default();
                let line = format!(
                    "step {}/{} epoch {:.2} loss {:.4}{headline} lr {:.2e} grad {:.3} {:.0} tok/s ETA {}",
                    m.step,
                    self.total,
                    m.epoch,
                    m.loss,
                    m.learning_rate,
                    m.grad_norm,
                    tps,
                    duration(eta)
                );
                if self.tty {
                    let width = 24;
                    let filled = (m.step * width / self.total.max(1)).min(width);
                    errp!(
                        "\r\x1b[2K[{}{}] {line}",
                        "#".repeat(filled),
                        ".".repeat(width - filled)
                    );
                    let _ = std::io::stderr().flush();
                    self.drawn = true;
                } else {
                    errln!("{line}");
                }
            }
            TrainEvent::Eval(m) => {
                self.clear();
                errln!(
                    "eval after step {}: loss {:.4} over {} {}",
                    m.step,
                    m.eval_loss,
                    m.eval_tokens,
                    self.eval_unit
                );
            }
            TrainEvent::Paused { step } => {
                self.clear();
                errln!("paused after step {step} (train control resume OUTPUT goes on)");
            }
            TrainEvent::Resumed { step } => {
                self.clear();
                errln!("resumed after step {step}");
            }
            TrainEvent::Checkpoint { path, .. } => {
                self.clear();
                errln!("saved {}", path.display());
            }
            _ => {}
        }
    }

    fn stop(&mut self, s: &RunSummary) {
        self.clear();
        let loss = s
            .train_loss
            .map_or_else(|| "-".into(), |l| format!("{l:.4}"));
        let eval = s
            .eval_loss
            .map_or_else(|| "-".into(), |l| format!("{l:.4}"));
        errln!(
            "{:?} after {} steps in {}: train loss {loss}, eval loss {eval}, {:.0} tokens/s; output in {}",
            s.status,
            s.global_step,
            duration(self.started.elapsed().as_secs_f64()),
            s.tokens_per_sec,
            s.output.display()
        );
        // A failed run returns its error, which `main` prints; a crash (a NaN) returns none.
        if let Some(e) = &s.error
            && s.status != train_runner::RunStatus::Failed
        {
            errln!("error: {e}");
        }
        if s.status == train_runner::RunStatus::Stopped {
            errln!(
                "to go on: run the same command with --resume (it continues from the newest checkpoint in {})",
                s.output.display()
            );
        }
    }
}
