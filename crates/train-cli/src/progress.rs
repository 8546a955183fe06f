//! Progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// A progress bar is drawn on the terminal's last line (without a newline): any other line
/// printed to stderr clears it first ([`clear_bar`], called by `errln!`), so that alerts,
/// warnings and evaluation lines never land on the bar's line.
static BAR_DRAWN: AtomicBool = AtomicBool::new(false);

/// Clears the progress bar, if one is drawn, so that a line can be printed in its place (the
/// next step draws the bar again below it).
pub(crate) fn clear_bar() {
    if BAR_DRAWN.swap(false, Ordering::Relaxed) {
        let _ = write!(std::io::stderr(), "\r\x1b[2K");
    }
}

/// Columns of the terminal on stderr (`None` when it is not a terminal or does not say).
fn terminal_columns() -> Option<usize> {
    terminal_size::terminal_size_of(std::io::stderr()).map(|(w, _)| usize::from(w.0))
}

/// The bar and the line fitted to `columns`: the bar shrinks (to nothing) before the line is
/// cut at its last whole field.
fn fit_line(line: &str, fraction: f64, columns: usize) -> String {
    let len = line.chars().count();
    let room = columns.saturating_sub(1);
    let bar = 24.min(room.saturating_sub(len + 3));
    if bar >= 8 {
        let filled = ((fraction * bar as f64) as usize).min(bar);
        return format!(
            "[{}{}] {line}",
            "#".repeat(filled),
            ".".repeat(bar - filled)
        );
    }
    if len <= room {
        return line.to_string();
    }
    let mut cut: String = line.chars().take(room).collect();
    if let Some(space) = cut.rfind(' ') {
        cut.truncate(space);
    }
    cut
}

use train_runner::{RunInfo, RunSummary, TrainEvent, TrainObserver};

/// Prints steps, loss, tokens/s and the time left.
pub struct Progress {
    tty: bool,
    started: Instant,
    total: usize,
    first_step: usize,
    /// What is trained, where: printed at the start (model family, backend, device,
    /// precision).
    context: Option<String>,
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
            context: None,
            eval_unit: "tokens",
            headline: None,
        }
    }

    /// Says in the start line what is trained and where (`qwen3 on cpu, backend cpu, fp32`).
    pub fn with_context(mut self, context: String) -> Self {
        self.context = Some(context);
        self
    }

    fn clear(&mut self) {
        clear_bar();
    }
}

/// `1234567` as `1,234,567`.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
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
            "all trainable".to_string()
        } else {
            format!("{} trainable", grouped(info.trainable_parameters))
        };
        let what = self
            .context
            .as_ref()
            .map_or_else(String::new, |c| format!("{c}; "));
        errln!(
            "training {what}{} parameters ({trainable}); {} steps ({} per epoch) on {} rows, {} validation examples{resumed}",
            grouped(info.parameters),
            info.total_steps,
            info.steps_per_epoch,
            info.train_rows,
            info.validation_examples,
        );
    }

    fn update(&mut self, event: &TrainEvent<'_>) {
        match event {
            TrainEvent::Step(m) => {
                // The step's own figure, as in its metrics.jsonl row.
                let tps = m.tokens_per_sec;
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
                    let fraction = m.step as f64 / self.total.max(1) as f64;
                    let shown = fit_line(&line, fraction, terminal_columns().unwrap_or(80));
                    clear_bar();
                    errp!("{shown}");
                    let _ = std::io::stderr().flush();
                    BAR_DRAWN.store(true, Ordering::Relaxed);
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
            "{:?} after {} steps in {}: train loss {loss}, eval loss {eval}, {:.0} tokens/s (the run's tokens over its steps' time); output in {}",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_fit_the_terminal() {
        let line = "step 15/24 epoch 1.27 loss 5.9145 lr 4.63e-4 grad 1.691 15234 tok/s ETA 0s";
        for columns in [40, 60, 80, 100, 200] {
            let shown = fit_line(line, 0.5, columns);
            assert!(shown.chars().count() < columns, "{columns}: {shown}");
            assert!(shown.contains("step 15/24"), "{columns}: {shown}");
        }
        assert!(fit_line(line, 0.5, 200).starts_with("[############............] step"));
        assert_eq!(fit_line(line, 0.5, 80), line);
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(999), "999");
    }
}
