//! The model registry (the original's "ModelDatabase"): a JSON file listing known model
//! directories and the LoRA adapters found beside them, so that `--model qwen3` can name a
//! model instead of a path.
//!
//! Writers take an exclusive lock on a sidecar `.lock` file and replace the JSON atomically,
//! so concurrent `scan` / `add` calls never corrupt it and never lose each other's entries.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::pretrained::write_atomically;

/// The environment variable that the `train` binary reads to relocate the registry file.
pub const REGISTRY_ENV: &str = "TRAIN_MODEL_REGISTRY";

/// What a registry entry points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A full model directory (`config.json` + weights).
    Model,
    /// A LoRA adapter directory (`adapter_config.json`).
    Adapter,
}

/// One known model or adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The name to look it up by.
    pub name: String,
    /// Absolute path of the directory.
    pub path: PathBuf,
    /// Model or adapter.
    pub kind: EntryKind,
    /// `model_type` (models) or the base model's path or name (adapters).
    pub model_type: Option<String>,
    /// Bytes of the files in the directory.
    pub size_bytes: u64,
    /// Width of the residual stream (models).
    pub hidden_size: Option<usize>,
    /// Decoder layers (models).
    pub num_layers: Option<usize>,
    /// Vocabulary size (models).
    pub vocab_size: Option<usize>,
    /// `base_model_name_or_path` of an adapter.
    pub base_model: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryData {
    schema_version: u32,
    models: BTreeMap<String, ModelEntry>,
}

/// A registry stored in one JSON file.
#[derive(Debug, Clone)]
pub struct ModelRegistry {
    path: PathBuf,
}

impl ModelRegistry {
    /// The registry in the user's configuration directory (`~/.config/train-rs/models.json` on
    /// Linux), if the platform has one.
    pub fn default_path() -> Option<PathBuf> {
        dirs::config_dir().map(|d| d.join("train-rs").join("models.json"))
    }

    /// A registry stored at `path` (created on the first write).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The registry file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<RegistryData> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::Registry {
                path: self.path.clone(),
                message: format!("invalid JSON ({e}); fix or delete the file"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryData {
                schema_version: 1,
                models: BTreeMap::new(),
            }),
            Err(e) => Err(ModelError::io(&self.path, e)),
        }
    }

    /// Runs `f` on the data under the writer lock and saves the result atomically.
    fn update<T>(&self, f: impl FnOnce(&mut RegistryData) -> Result<T>) -> Result<T> {
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
        }
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| ModelError::io(&lock_path, e))?;
        lock.lock().map_err(|e| ModelError::io(&lock_path, e))?;
        let result = (|| {
            let mut data = self.read()?;
            data.schema_version = 1;
            let out = f(&mut data)?;
            let mut text =
                serde_json::to_string_pretty(&data).map_err(|e| ModelError::Registry {
                    path: self.path.clone(),
                    message: e.to_string(),
                })?;
            text.push('\n');
            write_atomically(&self.path, text.as_bytes())?;
            Ok(out)
        })();
        unlock(&lock);
        result
    }

    /// Every entry, sorted by name.
    pub fn list(&self) -> Result<Vec<ModelEntry>> {
        Ok(self.read()?.models.into_values().collect())
    }

    /// The entry called `name`, if any.
    pub fn get(&self, name: &str) -> Result<Option<ModelEntry>> {
        Ok(self.read()?.models.remove(name))
    }

    /// Records the model or adapter directory `dir` under `name` (replacing an entry of that name).
    pub fn add(&self, name: &str, dir: &Path) -> Result<ModelEntry> {
        let entry = describe(name, dir)?;
        let e = entry.clone();
        self.update(move |data| {
            data.models.insert(e.name.clone(), e);
            Ok(())
        })?;
        Ok(entry)
    }

    /// Finds every directory under `root` (itself included, up to 4 levels deep) holding a
    /// `config.json` (a model) or an `adapter_config.json` (a LoRA adapter) and records it
    /// under its directory name. Returns the entries found.
    pub fn scan(&self, root: &Path) -> Result<Vec<ModelEntry>> {
        let mut found = Vec::new();
        walk(root, 0, &mut found)?;
        let entries = found
            .iter()
            .map(|dir| {
                let name = dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("model")
                    .to_string();
                describe(&name, dir)
            })
            .collect::<Result<Vec<_>>>()?;
        let copy = entries.clone();
        self.update(move |data| {
            for e in copy {
                data.models.insert(e.name.clone(), e);
            }
            Ok(())
        })?;
        Ok(entries)
    }

    /// The directory `name_or_path` refers to: a registry name first, else an existing
    /// directory (whose files are checked by whoever reads them).
    pub fn resolve(&self, name_or_path: &str) -> Result<PathBuf> {
        if let Some(e) = self.get(name_or_path)? {
            return Ok(e.path);
        }
        let p = PathBuf::from(name_or_path);
        if p.is_dir() {
            return Ok(p);
        }
        Err(ModelError::Registry {
            path: self.path.clone(),
            message: format!(
                "`{name_or_path}` is neither a registered model name nor a directory \
                 (list known models with `train models list`, add one with `train models add NAME DIR`)"
            ),
        })
    }
}

fn unlock(file: &File) {
    // Dropping the file releases the lock too; an explicit unlock failure changes nothing.
    let _ = file.unlock();
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    if dir.join("config.json").is_file() || dir.join("adapter_config.json").is_file() {
        out.push(dir.canonicalize().map_err(|e| ModelError::io(dir, e))?);
    }
    if depth >= 4 {
        return Ok(());
    }
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for sub in subdirs {
        walk(&sub, depth + 1, out)?;
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .flatten()
    {
        if let Ok(meta) = entry.metadata()
            && meta.is_file()
        {
            total += meta.len();
        }
    }
    Ok(total)
}

fn describe(name: &str, dir: &Path) -> Result<ModelEntry> {
    let path = dir.canonicalize().map_err(|e| ModelError::io(dir, e))?;
    let size_bytes = dir_size(&path)?;
    let adapter = path.join("adapter_config.json");
    if adapter.is_file() {
        let text = crate::read_text_file(&adapter, crate::MAX_JSON_FILE_BYTES)?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: adapter.clone(),
            message: e.to_string(),
        })?;
        let base = v
            .get("base_model_name_or_path")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        return Ok(ModelEntry {
            name: name.to_string(),
            path,
            kind: EntryKind::Adapter,
            model_type: v
                .get("peft_type")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string),
            size_bytes,
            hidden_size: None,
            num_layers: None,
            vocab_size: None,
            base_model: base,
        });
    }
    let (cfg, _) = ModelConfig::from_file(&path.join("config.json"))?;
    Ok(ModelEntry {
        name: name.to_string(),
        path,
        kind: EntryKind::Model,
        model_type: Some(if cfg.vision_language {
            "qwen3_vl".to_string()
        } else {
            cfg.architecture.model_type().to_string()
        }),
        size_bytes,
        hidden_size: Some(cfg.hidden_size),
        num_layers: Some(cfg.num_layers),
        vocab_size: Some(cfg.vocab_size),
        base_model: None,
    })
}
