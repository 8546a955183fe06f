//! Writing a model directory without losing one: the checks every command makes before it
//! writes a model into a directory ([`check_output_dir`]), and the installation of a complete,
//! staged model into it ([`install_model`]), so that a failure (a full disk, a kill) leaves
//! either the old model, the new one, or none — never a mixture, never a directory with weights
//! and no tokenizer.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// The files that are the model itself (as opposed to its tokenizer and generation files):
/// `config.json`, `adapter_config.json`, and the weights (`model*.safetensors`, the shard index,
/// `adapter_model.safetensors`).
pub(crate) fn is_model_file(name: &str) -> bool {
    matches!(
        name,
        "config.json" | "adapter_config.json" | "adapter_model.safetensors"
    ) || (name.starts_with("model")
        && (name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")))
}

/// The model files present in `dir`, sorted.
pub(crate) fn model_files_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_model_file(n))
        .collect();
    names.sort();
    names
}

/// Largest JSON file of a model directory read whole (`config.json`, `adapter_config.json`,
/// a shard index, `generation_config.json`): real ones are kilobytes to a few megabytes.
pub const MAX_JSON_FILE_BYTES: u64 = 64 << 20;

/// Reads a small text file of a model or run directory: it must be a regular file (a FIFO or a
/// device would block or never end) of at most `max_bytes`.
pub fn read_text_file(path: &Path, max_bytes: u64) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    if meta.len() > max_bytes {
        return Err(ModelError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} bytes, above the limit of {max_bytes} for this file",
                    meta.len()
                ),
            ),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))
}

fn resolved(path: &Path) -> Option<PathBuf> {
    path.canonicalize().ok()
}

/// Why [`check_output_dir`] refused a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputRefusal {
    /// It is one of the command's inputs: never written.
    Input,
    /// It is a sealed training checkpoint: never written.
    Checkpoint,
    /// It already holds a model, and replacing it was not allowed.
    HoldsModel,
    /// It exists and is not a directory (a file, `/dev/null`).
    NotADirectory,
}

/// True when `dir` is a checkpoint sealed by train-runner (`checksums.json` next to
/// `trainer_state.json`): writing anything into it would break its seal.
pub fn is_sealed_checkpoint(dir: &Path) -> bool {
    dir.join("checksums.json").is_file() && dir.join("trainer_state.json").is_file()
}

/// Refuses to write a model into `output` when that would destroy something:
/// - `output` is one of the command's `inputs` (the model being trained or merged, its base,
///   the checkpoint being resumed): always refused;
/// - `output` is a sealed training checkpoint: always refused;
/// - `output` already holds a model (`config.json`, weights, an adapter) and `replace` is false
///   (the CLI's `--yes`).
///
/// `what` names the directory in messages (`the output directory`, or a CLI's flag); the error's
/// [`OutputRefusal`] says which case it is, so that a caller can say what to do.
pub fn check_output_dir(output: &Path, inputs: &[&Path], replace: bool, what: &str) -> Result<()> {
    let refuse = |refusal: OutputRefusal, message: String| ModelError::Output {
        path: output.to_path_buf(),
        refusal,
        message,
    };
    let flag = what;
    if std::fs::metadata(output).is_ok_and(|m| !m.is_dir()) {
        return Err(refuse(
            OutputRefusal::NotADirectory,
            format!("{flag} exists and is not a directory"),
        ));
    }
    if let Some(out) = resolved(output) {
        for input in inputs {
            if resolved(input).is_some_and(|i| i == out) {
                return Err(refuse(
                    OutputRefusal::Input,
                    format!(
                        "{flag} is also an input of this command ({}); a command never writes \
                         into its own inputs",
                        input.display()
                    ),
                ));
            }
        }
    }
    if is_sealed_checkpoint(output) {
        return Err(refuse(
            OutputRefusal::Checkpoint,
            format!(
                "{flag} is a saved training checkpoint; writing a model into it would break it"
            ),
        ));
    }
    let existing = model_files_in(output);
    if !replace && !existing.is_empty() {
        return Err(refuse(
            OutputRefusal::HoldsModel,
            format!("{flag} already holds a model ({})", existing.join(", ")),
        ));
    }
    Ok(())
}

/// A hidden directory inside `dir` to stage a model in before [`install_model`] moves it into
/// place (on the same file system, so the moves are renames). Leftovers of interrupted saves
/// (`.staging-*`, `.model-old-*` of processes that are gone) are removed first.
pub fn staging_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    remove_stale_leftovers(dir)?;
    let staged = dir.join(format!(".staging-{}", std::process::id()));
    if staged.exists() {
        std::fs::remove_dir_all(&staged).map_err(|e| ModelError::io(&staged, e))?;
    }
    Ok(staged)
}

fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

fn remove_stale_leftovers(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(".staging-")
            .or_else(|| name.strip_prefix(".model-old-"))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && (pid == std::process::id() || !pid_alive(pid))
            && entry.file_type().is_ok_and(|t| t.is_dir())
        {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(|e| ModelError::io(&path, e))?;
        }
    }
    Ok(())
}

/// Where a file goes in the installation order: tokenizer and other files first, then weight
/// shards, then the file a loader opens first (`model.safetensors`, the index, the adapter
/// weights), and the configuration last — so that until the last rename the directory holds
/// no `config.json` / `adapter_config.json` and is plainly not a model.
fn install_rank(name: &str) -> u8 {
    match name {
        "config.json" | "adapter_config.json" => 3,
        "model.safetensors" | "model.safetensors.index.json" | "adapter_model.safetensors" => 2,
        n if is_model_file(n) => 1,
        _ => 0,
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(dir, e))
}

/// Moves the complete model directory `staged` (written by [`crate::save_pretrained`] or
/// [`crate::save_adapter`] into [`staging_dir`]) into `dir`, replacing the model there:
/// the old model files are moved aside first, the new files are renamed in with the
/// configuration last, then the old ones are deleted. Renames on one file system need no
/// space, so a full disk fails while staging, before anything in `dir` changed.
pub fn install_model(staged: &Path, dir: &Path) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(staged)
        .map_err(|e| ModelError::io(staged, e))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort_by_key(|n| (install_rank(n), n.clone()));
    for name in &names {
        let path = staged.join(name);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| ModelError::io(&path, e))?;
    }
    let old = dir.join(format!(".model-old-{}", std::process::id()));
    let previous = model_files_in(dir);
    if !previous.is_empty() {
        std::fs::create_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
        // The configuration first: from here on the directory is plainly not a model.
        let mut previous = previous;
        previous.sort_by_key(|n| std::cmp::Reverse(install_rank(n)));
        for name in &previous {
            let from = dir.join(name);
            std::fs::rename(&from, old.join(name)).map_err(|e| ModelError::io(&from, e))?;
        }
        sync_dir(dir)?;
    }
    for name in &names {
        let to = dir.join(name);
        std::fs::rename(staged.join(name), &to).map_err(|e| ModelError::io(&to, e))?;
    }
    sync_dir(dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
    }
    std::fs::remove_dir_all(staged).map_err(|e| ModelError::io(staged, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) {
        std::fs::write(dir.join(name), body).unwrap();
    }

    #[test]
    fn inputs_checkpoints_and_existing_models_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        write(&model, "config.json", "{}");
        let e = check_output_dir(&model, &[&model], true, "--output").unwrap_err();
        assert!(
            e.to_string().contains("never writes into its own inputs"),
            "{e}"
        );
        let e = check_output_dir(&model, &[], false, "--output").unwrap_err();
        assert!(
            e.to_string()
                .contains("already holds a model (config.json)"),
            "{e}"
        );
        assert!(check_output_dir(&model, &[], true, "--output").is_ok());
        let ckpt = root.path().join("checkpoint-2");
        std::fs::create_dir_all(&ckpt).unwrap();
        write(&ckpt, "checksums.json", "{}");
        write(&ckpt, "trainer_state.json", "{}");
        let e = check_output_dir(&ckpt, &[], true, "--output").unwrap_err();
        assert!(e.to_string().contains("saved training checkpoint"), "{e}");
        assert!(check_output_dir(&root.path().join("new"), &[&model], false, "--output").is_ok());
    }

    #[test]
    fn install_replaces_the_model_and_keeps_other_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        write(dir, "config.json", "old");
        write(dir, "model-00001-of-00002.safetensors", "old");
        write(dir, "model.safetensors.index.json", "old");
        write(dir, "metrics.jsonl", "keep");
        let staged = staging_dir(dir).unwrap();
        std::fs::create_dir_all(&staged).unwrap();
        write(&staged, "config.json", "new");
        write(&staged, "model.safetensors", "new");
        write(&staged, "tokenizer.json", "new");
        install_model(&staged, dir).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "config.json",
                "metrics.jsonl",
                "model.safetensors",
                "tokenizer.json"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("config.json")).unwrap(),
            "new"
        );
    }
}
