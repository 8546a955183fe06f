//! Checkpoints: a Hugging Face model directory (f32 master weights) plus `optimizer.safetensors`
//! and `trainer_state.json` (step, data position, metrics history, best checkpoint) — written
//! to a temporary directory, synced, and renamed, so a crash mid-save never leaves a broken
//! checkpoint under a final name. `checksums.json`, written last, records the SHA-256 of every
//! other file, so that a checkpoint damaged later (flipped bytes, truncation, a lost file) is
//! detected before it is used ([`verify_checkpoint`], [`latest_intact_checkpoint`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use train_data::DataPosition;
use train_model::FusedAutodiffBackend;
use train_model::{CausalLm, SaveOptions, StorageDtype, save_pretrained};

use crate::config::TrainerConfig;
use crate::error::{Result, RunnerError};
use crate::observer::{EvalRecord, StepRecord};
use crate::optim::AdamW;

/// Everything besides weights and moments that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    /// Progress in epochs.
    pub epoch: f64,
    /// Where the next step's data starts.
    pub data_position: DataPosition,
    /// Steps the run was planned for.
    pub total_steps: usize,
    /// Sum of the step losses so far (for the run's mean training loss).
    pub train_loss_sum: f64,
    /// Lowest evaluation loss so far.
    pub best_metric: Option<f64>,
    /// The checkpoint that had it.
    pub best_model_checkpoint: Option<PathBuf>,
    /// Every step and evaluation so far.
    pub log_history: Vec<Value>,
    /// The settings of the run.
    pub config: TrainerConfig,
    /// Fingerprint of the training data (a resume on other data is refused).
    pub data_fingerprint: String,
    /// The run this state belongs to: drawn when a run starts from scratch and kept by every
    /// resume. Rotation deletes only checkpoints of the run's own line, and a resume says which
    /// run it continues. Empty in checkpoints written before it was recorded.
    #[serde(default)]
    pub run_id: String,
    /// [`model_fingerprint`] of the `config.json` the run started from (a resume with another
    /// model is refused); empty when not recorded.
    #[serde(default)]
    pub model_fingerprint: String,
    /// The model directory the run started from, for messages.
    #[serde(default)]
    pub model_source: Option<PathBuf>,
    /// The length the training rows were packed to (`max_length` with packing; `None`: one
    /// example per row). A resume with another layout is refused.
    #[serde(default)]
    pub packed_to: Option<usize>,
    /// Data-parallel workers on each machine, and machines (a resume with others is refused:
    /// the global batch would change).
    #[serde(default = "one")]
    pub devices: usize,
    /// Machines of the run.
    #[serde(default = "one")]
    pub nodes: usize,
    /// What the run optimises ([`crate::Objective::name`]: `sft`, `dpo`, `grpo`); a resume
    /// with another objective is refused. `None` in checkpoints written before it was recorded.
    #[serde(default)]
    pub objective: Option<String>,
    /// The objective's settings ([`crate::Objective::settings`]), as the last run that wrote
    /// this state had them (for the record: they may change on resume, as the learning rate
    /// may).
    #[serde(default)]
    pub objective_settings: Option<Value>,
}

fn one() -> usize {
    1
}

/// A new run id: 16 hex digits from the clock, the process id and a counter.
pub fn new_run_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut h = Sha256::new();
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    format!("{:x}", h.finalize())[..16].to_string()
}

/// SHA-256 of a model's `config.json` as parsed (what a checkpoint records it was trained from).
pub fn model_fingerprint(raw_config: &Value) -> String {
    let bytes = serde_json::to_vec(raw_config).unwrap_or_default();
    format!("{:x}", Sha256::digest(&bytes))
}

impl TrainerState {
    /// The state of a run that has not started.
    pub fn new(config: TrainerConfig, total_steps: usize, data_fingerprint: String) -> Self {
        Self {
            global_step: 0,
            epoch: 0.0,
            data_position: DataPosition::default(),
            total_steps,
            train_loss_sum: 0.0,
            best_metric: None,
            best_model_checkpoint: None,
            log_history: Vec::new(),
            config,
            data_fingerprint,
            run_id: new_run_id(),
            model_fingerprint: String::new(),
            model_source: None,
            packed_to: None,
            devices: 1,
            nodes: 1,
            objective: None,
            objective_settings: None,
        }
    }

    /// Parses a `trainer_state.json`. States written before the data layout moved to the
    /// data side carry `packing` and `max_length` in their `config`, and before the workers
    /// moved to `Parallelism`, `devices` and `nodes`; they become [`TrainerState::packed_to`],
    /// [`TrainerState::devices`] and [`TrainerState::nodes`].
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        let mut value: Value = serde_json::from_str(text)?;
        if let Some(config) = value.get_mut("config").and_then(Value::as_object_mut) {
            let packing = config.remove("packing").and_then(|v| v.as_bool());
            let max_length = config.remove("max_length").and_then(|v| v.as_u64());
            let devices = config.remove("devices");
            let nodes = config.remove("nodes");
            if let Some(state) = value.as_object_mut() {
                if let (Some(true), Some(len)) = (packing, max_length)
                    && !state.contains_key("packed_to")
                {
                    state.insert("packed_to".into(), Value::from(len));
                }
                for (key, v) in [("devices", devices), ("nodes", nodes)] {
                    if let Some(v) = v
                        && !state.contains_key(key)
                    {
                        state.insert(key.into(), v);
                    }
                }
            }
        }
        serde_json::from_value(value)
    }

    pub(crate) fn log_step(&mut self, m: &StepRecord) {
        self.log_history
            .push(serde_json::to_value(m).unwrap_or(Value::Null));
    }

    pub(crate) fn log_eval(&mut self, m: &EvalRecord) {
        self.log_history
            .push(serde_json::to_value(m).unwrap_or(Value::Null));
    }
}

/// The directory name of the checkpoint of `step`.
pub fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// The checkpoint directories (`checkpoint-<step>`) under `output`, oldest first, whole or
/// damaged ([`verify_checkpoint`] tells), except those an interrupted set-aside
/// ([`set_aside`]) was moving away.
pub fn list_checkpoints(output: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output) else {
        return Vec::new();
    };
    let leaving = pending_set_aside(output)
        .map(|j| j.names)
        .unwrap_or_default();
    let mut out: Vec<(usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            if leaving.contains(&name) || !e.file_type().is_ok_and(|t| t.is_dir()) {
                return None;
            }
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The journal of a set-aside in progress: written before the first checkpoint moves, removed
/// after the last, so that a kill in between is completed by the next run and no checkpoint
/// being moved is ever taken for one of the current run.
const SET_ASIDE_JOURNAL: &str = ".set-aside.json";

/// Where checkpoints that no longer belong to the run in `OUTPUT` are moved.
pub const SET_ASIDE_DIR: &str = "set-aside";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SetAsideJournal {
    /// Destination, relative to the output directory.
    dest: String,
    /// Checkpoint directory names to move.
    names: Vec<String>,
}

fn pending_set_aside(output: &Path) -> Option<SetAsideJournal> {
    let text = train_model::read_text_file(&output.join(SET_ASIDE_JOURNAL), 1 << 20).ok()?;
    serde_json::from_str(&text).ok()
}

fn complete_set_aside(output: &Path, journal: &SetAsideJournal) -> Result<PathBuf> {
    let dest = output.join(&journal.dest);
    std::fs::create_dir_all(&dest).map_err(|e| RunnerError::io(&dest, e))?;
    for name in &journal.names {
        let from = output.join(name);
        if from.exists() {
            let to = dest.join(name);
            std::fs::rename(&from, &to).map_err(|e| RunnerError::io(&from, e))?;
        }
    }
    sync(&dest)?;
    sync(output)?;
    let path = output.join(SET_ASIDE_JOURNAL);
    std::fs::remove_file(&path).map_err(|e| RunnerError::io(&path, e))?;
    sync(output)?;
    Ok(dest)
}

/// Moves the checkpoints `names` of `output` into `output/set-aside/<label>/`, as one step:
/// a journal records the move first, so that if the process dies half-way the checkpoints still
/// to move are ignored by [`list_checkpoints`] and moved by the next run
/// (`remove_leftovers`). Returns the destination. Call while holding the output lock.
pub fn set_aside(output: &Path, names: &[String], label: &str) -> Result<PathBuf> {
    let journal = SetAsideJournal {
        dest: format!("{SET_ASIDE_DIR}/{label}"),
        names: names.to_vec(),
    };
    let path = output.join(SET_ASIDE_JOURNAL);
    let text = serde_json::to_string(&journal).map_err(|e| RunnerError::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    train_fs::write_atomic(&path, text.as_bytes()).map_err(|e| RunnerError::io(&path, e))?;
    sync(output)?;
    complete_set_aside(output, &journal)
}

/// The run id recorded in a checkpoint's trainer state, if it can be read.
pub fn checkpoint_run_id(dir: &Path) -> Option<String> {
    load_state(dir).ok().map(|s| s.run_id)
}

/// The newest complete checkpoint under `output` (not verified; see
/// [`latest_intact_checkpoint`]).
pub fn latest_checkpoint(output: &Path) -> Option<PathBuf> {
    list_checkpoints(output).pop().map(|(_, p)| p)
}

/// The file of a checkpoint that records the SHA-256 of every other file; written last.
pub const CHECKSUMS_FILE: &str = "checksums.json";

/// What [`CHECKSUMS_FILE`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Checksums {
    algorithm: String,
    files: BTreeMap<String, String>,
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| RunnerError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| RunnerError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Flushes a file or a directory to the disk.
fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| RunnerError::io(path, e))
}

/// Hashes and syncs every file of `dir`, then writes and syncs [`CHECKSUMS_FILE`] and `dir`.
fn seal(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| RunnerError::io(dir, e))? {
        let entry = entry.map_err(|e| RunnerError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name == CHECKSUMS_FILE || !path.is_file() {
            continue;
        }
        sync(&path)?;
        files.insert(name, sha256_file(&path)?);
    }
    let sums = Checksums {
        algorithm: "sha256".into(),
        files,
    };
    let path = dir.join(CHECKSUMS_FILE);
    let text = serde_json::to_string_pretty(&sums).map_err(|e| RunnerError::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&path, text).map_err(|e| RunnerError::io(&path, e))?;
    sync(&path)?;
    sync(dir)
}

/// Checks that the checkpoint `dir` is complete and unchanged since it was saved: every file
/// recorded in its [`CHECKSUMS_FILE`] is present with the same SHA-256, the files a resume
/// needs are among them, and its trainer state parses. Returns that state.
pub fn verify_checkpoint(dir: &Path) -> Result<TrainerState> {
    let bad = |message: String| RunnerError::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    if !dir.join("trainer_state.json").is_file() {
        return Err(bad("trainer_state.json is missing".into()));
    }
    let path = dir.join(CHECKSUMS_FILE);
    let text = train_model::read_text_file(&path, train_model::MAX_JSON_FILE_BYTES).map_err(|e| {
        bad(format!(
            "{CHECKSUMS_FILE} cannot be read ({e}): the checkpoint is incomplete or was not written by train-runner"
        ))
    })?;
    let sums: Checksums = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{CHECKSUMS_FILE} is damaged: {e}")))?;
    if sums.algorithm != "sha256" {
        return Err(bad(format!(
            "{CHECKSUMS_FILE}: unknown algorithm {:?}",
            sums.algorithm
        )));
    }
    // A full model (`config.json` + weights) or, for a LoRA run, a PEFT adapter.
    let adapter = sums.files.contains_key("adapter_config.json");
    let has_weights = if adapter {
        sums.files.contains_key("adapter_model.safetensors")
    } else {
        sums.files.contains_key("model.safetensors")
            || sums.files.contains_key("model.safetensors.index.json")
    };
    let config_file = if adapter {
        "adapter_config.json"
    } else {
        "config.json"
    };
    for needed in ["trainer_state.json", "optimizer.safetensors", config_file] {
        if !sums.files.contains_key(needed) {
            return Err(bad(format!("{needed} is not part of the checkpoint")));
        }
    }
    if !has_weights {
        return Err(bad("no model weights are part of the checkpoint".into()));
    }
    for (name, expected) in &sums.files {
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(bad(format!(
                "{CHECKSUMS_FILE} names an invalid file {name:?}"
            )));
        }
        let file = dir.join(name);
        if !file.is_file() {
            return Err(bad(format!("{name} is missing")));
        }
        let actual = sha256_file(&file)?;
        if &actual != expected {
            return Err(bad(format!(
                "{name} is damaged: its SHA-256 differs from the one recorded when it was saved"
            )));
        }
    }
    // A sealed checkpoint is exactly the files it sealed: anything added later (a shard index,
    // another weight file) would be read by a loader, so the checkpoint is refused.
    let entries = std::fs::read_dir(dir).map_err(|e| RunnerError::io(dir, e))?;
    let mut added: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != CHECKSUMS_FILE && !sums.files.contains_key(n))
        .collect();
    if !added.is_empty() {
        added.sort();
        return Err(bad(format!(
            "{} {} not part of the checkpoint as it was saved ({CHECKSUMS_FILE} does not list              {}); remove {} to use this checkpoint",
            added.join(", "),
            if added.len() == 1 { "is" } else { "are" },
            if added.len() == 1 { "it" } else { "them" },
            if added.len() == 1 { "it" } else { "them" },
        )));
    }
    load_state(dir)
}

/// The newest checkpoint under `output` that passes [`verify_checkpoint`], and every newer
/// one that did not, with the reason.
pub fn latest_intact_checkpoint(output: &Path) -> (Option<PathBuf>, Vec<(PathBuf, String)>) {
    let mut skipped = Vec::new();
    for (_, dir) in list_checkpoints(output).into_iter().rev() {
        match verify_checkpoint(&dir) {
            Ok(_) => return (Some(dir), skipped),
            Err(e) => skipped.push((dir, e.to_string())),
        }
    }
    (None, skipped)
}

/// Completes an interrupted [`set_aside`], then removes what interrupted saves and rotations
/// left behind (`.checkpoint-*.tmp-*`, `.old-*`, `.del-*` directories, a staged final model).
/// Called while holding the output lock, so no other run is writing them. Returns what the
/// user should be told (a completed move).
pub fn remove_leftovers(output: &Path) -> Result<Vec<String>> {
    let mut notices = Vec::new();
    if let Some(journal) = pending_set_aside(output) {
        let dest = complete_set_aside(output, &journal)?;
        notices.push(format!(
            "completed moving {} to {} (interrupted earlier)",
            journal.names.join(", "),
            dest.display()
        ));
    }
    let Ok(entries) = std::fs::read_dir(output) else {
        return Ok(notices);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let leftover = [".tmp-", ".old-", ".del-"].iter().any(|k| name.contains(k));
        if name.starts_with(SET_ASIDE_JOURNAL) && name.contains(".tmp-") {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| RunnerError::io(&path, e))?;
        } else if name.starts_with(".checkpoint-") && leftover {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(|e| RunnerError::io(&path, e))?;
        }
    }
    Ok(notices)
}

/// Writes `checkpoint-<step>` atomically (temporary directory, then rename).
pub fn save_checkpoint<B: FusedAutodiffBackend>(
    output: &Path,
    model: &CausalLm<B>,
    raw_config: &Value,
    companions_from: &Path,
    optimizer: &AdamW<B>,
    state: &TrainerState,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output, state.global_step);
    let tmp = output.join(format!(
        ".checkpoint-{}.tmp-{}",
        state.global_step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| RunnerError::io(&tmp, e))?;
    }
    let options = SaveOptions {
        dtype: Some(StorageDtype::F32),
        max_shard_bytes: None,
        companions_from: Some(companions_from.to_path_buf()),
    };
    if model.lora_config().is_some() {
        crate::run::save_adapter_dir(model, companions_from, &tmp)?;
    } else {
        save_pretrained(model, Some(raw_config), &tmp, &options)?;
    }
    optimizer.save(&tmp.join("optimizer.safetensors"))?;
    let text = serde_json::to_string_pretty(state).map_err(|e| RunnerError::Checkpoint {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(tmp.join("trainer_state.json"), text).map_err(|e| RunnerError::io(&tmp, e))?;
    seal(&tmp)?;
    if final_dir.exists() {
        // Saving a step again (after a resume): move the old one aside first, so that a
        // complete checkpoint of this step exists at every moment.
        let old = output.join(format!(
            ".checkpoint-{}.old-{}",
            state.global_step,
            std::process::id()
        ));
        std::fs::rename(&final_dir, &old).map_err(|e| RunnerError::io(&final_dir, e))?;
        std::fs::rename(&tmp, &final_dir).map_err(|e| RunnerError::io(&final_dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| RunnerError::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, &final_dir).map_err(|e| RunnerError::io(&final_dir, e))?;
    }
    sync(output)?;
    Ok(final_dir)
}

/// Reads `trainer_state.json` of a checkpoint.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = train_model::read_text_file(&path, train_model::MAX_JSON_FILE_BYTES << 2)?;
    TrainerState::from_json(&text).map_err(|e| RunnerError::Checkpoint {
        path,
        message: format!("invalid trainer state: {e}"),
    })
}

/// Deletes the oldest checkpoints of the run `run_id` beyond `limit`, never the best one nor
/// the newest. Checkpoints of any other run (another id, or a state that cannot be read) are
/// never deleted.
pub fn rotate_checkpoints(
    output: &Path,
    limit: usize,
    best: Option<&Path>,
    run_id: &str,
) -> Result<()> {
    let all: Vec<(usize, PathBuf)> = list_checkpoints(output)
        .into_iter()
        .filter(|(_, p)| checkpoint_run_id(p).as_deref() == Some(run_id))
        .collect();
    let mut removable: Vec<&PathBuf> = all
        .iter()
        .map(|(_, p)| p)
        .filter(|p| Some(p.as_path()) != best)
        .collect();
    let keep = if best.is_some_and(|b| all.iter().any(|(_, p)| p == b)) {
        limit.saturating_sub(1)
    } else {
        limit
    };
    let keep = keep.max(1);
    while removable.len() > keep {
        let p = removable.remove(0);
        remove_checkpoint(output, p)?;
    }
    Ok(())
}

/// Deletes a checkpoint directory without ever leaving a half-deleted one under its final
/// name: it is renamed to a hidden name first (a kill during the deletion leaves only that,
/// which [`remove_leftovers`] clears). Found by the SIGKILL test, which met checkpoints with
/// files missing after kills during rotation.
fn remove_checkpoint(output: &Path, dir: &Path) -> Result<()> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let doomed = output.join(format!(".{name}.del-{}", std::process::id()));
    std::fs::rename(dir, &doomed).map_err(|e| RunnerError::io(dir, e))?;
    sync(output)?;
    std::fs::remove_dir_all(&doomed).map_err(|e| RunnerError::io(&doomed, e))
}
