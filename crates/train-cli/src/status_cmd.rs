//! `train status OUTPUT [--watch]`: a compact summary of a running or finished run, from its
//! status file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use train_monitor::{Status, TrainingStatus};

fn read(path: &Path) -> Result<TrainingStatus> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a training status file", path.display()))
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "–".into(), |x| format!("{x:.digits$}"))
}

/// One line about `s`.
pub fn summary_line(s: &TrainingStatus) -> String {
    let alerts = if s.alerts.is_empty() {
        "none".to_string()
    } else {
        s.alerts
            .iter()
            .map(|a| a.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut line = format!(
        "{:<9} step {}/{} (epoch {:.2})  loss {}  eval {}  lr {}  {} tokens/s  alerts: {alerts}",
        format!("{:?}", s.status).to_lowercase(),
        s.step,
        s.total_steps,
        s.epoch,
        num(s.loss, 4),
        num(s.eval_loss, 4),
        s.learning_rate
            .map_or_else(|| "–".into(), |x| format!("{x:.2e}")),
        num(s.tokens_per_sec, 0),
    );
    if let Some(e) = &s.error {
        line.push_str(&format!("  error: {e}"));
    }
    line
}

/// Runs `train status`.
pub fn run(
    output: &Path,
    status_dir: Option<&PathBuf>,
    watch: bool,
    json: bool,
) -> Result<ExitCode> {
    let path = status_dir
        .cloned()
        .unwrap_or_else(|| output.join("status"))
        .join("training_status.json");
    let mut last = String::new();
    loop {
        let s = read(&path)?;
        let line = if json {
            serde_json::to_string(&s)?
        } else {
            summary_line(&s)
        };
        if line != last {
            outln!("{line}");
            last = line;
        }
        let finished = matches!(
            s.status,
            Status::Completed | Status::Stopped | Status::Crashed
        );
        if !finished && train_runner::OutputLock::live_owner(output).is_none() {
            // The status says running, but no process holds the run's lock: it was killed.
            errln!(
                "the run in {} is not running: no live process holds {} (it was killed or \
                 crashed without recording an end); `train --resume` continues it from its \
                 newest checkpoint",
                output.display(),
                output.join(".train.lock").display()
            );
            return Ok(ExitCode::from(1));
        }
        if !watch || finished {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}
