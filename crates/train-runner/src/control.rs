//! Asking a run to stop or pause from another thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Lets another thread (a signal handler, a control file watcher) ask the run to stop after
/// the current step — the run then saves a checkpoint and ends with status `stopped` — or to
/// pause between steps until resumed.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
}

impl RunControl {
    /// A control with no stop requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// The flag behind it (e.g. for `signal_hook::flag::register`).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Asks the run to stop after the current step.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// True once a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Asks the run to wait after the current step until [`RunControl::resume`] (or a stop).
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
    }

    /// Lets a paused run go on.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// True while a pause is requested.
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }
}
