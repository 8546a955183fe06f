//! Control of a running `train` from outside: `train control pause|resume|stop OUTPUT` writes
//! `OUTPUT/control.json`; the run polls it between steps (and while paused).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use train_runner::RunControl;

/// What `train control` asks.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlCommand {
    /// Wait after the current step.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Save a checkpoint after the current step and end (status `stopped`).
    Stop,
}

impl ControlCommand {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Stop => "stop",
        }
    }
}

/// The control file of a run's output directory.
pub fn control_file(output: &Path) -> PathBuf {
    output.join("control.json")
}

/// `train control COMMAND OUTPUT`: addressed to the live run that holds `OUTPUT`'s lock (its
/// process id is in the file), so that a file left behind never affects a later run.
pub fn send(command: ControlCommand, output: &Path) -> Result<()> {
    if !output.is_dir() {
        bail!("{}: no such output directory", output.display());
    }
    let Some(pid) = train_runner::OutputLock::live_owner(output) else {
        bail!(
            "{}: no live run (no process holds {}); nothing to {}",
            output.display(),
            output.join(".train.lock").display(),
            command.as_str()
        );
    };
    let body = serde_json::json!({"command": command.as_str(), "pid": pid, "requested_at": train_monitor::unix_now()});
    let path = control_file(output);
    train_fs::write_atomic(&path, format!("{body}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    errln!(
        "asked the run in {} (process {pid}) to {}",
        output.display(),
        command.as_str()
    );
    Ok(())
}

/// The command in the control file if it is addressed to this process and was written after
/// `since` (a file of an earlier run, or one with a clock in the future, is ignored).
fn read_command(path: &Path, since: f64) -> Option<ControlCommand> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > 4096 {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v["pid"].as_str() != Some(std::process::id().to_string().as_str()) {
        return None;
    }
    if v["requested_at"].as_f64().is_none_or(|t| t < since) {
        return None;
    }
    match v["command"].as_str()? {
        "pause" => Some(ControlCommand::Pause),
        "resume" => Some(ControlCommand::Resume),
        "stop" => Some(ControlCommand::Stop),
        _ => None,
    }
}

/// Polls the control file every 200 ms and applies it to `control`, until dropped.
pub struct ControlWatcher {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlWatcher {
    /// Watches `output`'s control file, ignoring commands written before now.
    pub fn start(output: &Path, control: &RunControl) -> Self {
        let path = control_file(output);
        let since = train_monitor::unix_now();
        let done = Arc::new(AtomicBool::new(false));
        let (d, c) = (Arc::clone(&done), control.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                match read_command(&path, since) {
                    Some(ControlCommand::Pause) => c.request_pause(),
                    Some(ControlCommand::Resume) => c.resume(),
                    Some(ControlCommand::Stop) => {
                        c.resume();
                        c.request_stop();
                    }
                    None => {}
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for ControlWatcher {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
