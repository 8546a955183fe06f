//! The model registry (the original's "ModelDatabase"): a JSON file listing known model
//! directories and the LoRA adapters found beside them, so that `--model qwen3` can name a
//! model instead of a path. Application code: it lives in the binary, not in `train-model`.
//!
//! Writers take an exclusive lock on a sidecar `.lock` file and replace the JSON atomically,
//! so concurrent `scan` / `add` calls never corrupt it and never lose each other's entries.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};
use train_model::{MAX_JSON_FILE_BYTES, ModelConfig, ModelError, read_text_file};

/// An error about the registry file itself.
fn registry_error(path: &Path, message: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("model registry {}: {message}", path.display())
}

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
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                registry_error(
                    &self.path,
                    format!("invalid JSON ({e}); fix or delete the file"),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryData {
                schema_version: 1,
                models: BTreeMap::new(),
            }),
            Err(e) => Err(ModelError::io(&self.path, e).into()),
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
                serde_json::to_string_pretty(&data).map_err(|e| registry_error(&self.path, e))?;
            text.push('\n');
            train_fs::write_atomic(&self.path, text.as_bytes())
                .map_err(|e| ModelError::io(&self.path, e))?;
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
    /// directory (whose files are checked by whoever reads them), else a Hugging Face Hub id
    /// (`org/name`, at `--revision`), from the Hugging Face cache or downloaded into it.
    pub fn resolve(&self, name_or_path: &str) -> Result<PathBuf> {
        if let Some(e) = self.get(name_or_path)? {
            return Ok(e.path);
        }
        let p = PathBuf::from(name_or_path);
        if p.is_dir() {
            return Ok(p);
        }
        if train_model::hub::is_hub_id(name_or_path) {
            return train_model::hub::resolve(
                name_or_path,
                HUB_REVISION.get().map(String::as_str),
                &mut |file| errln!("downloading {name_or_path}/{file}"),
            )
            .map_err(Into::into);
        }
        Err(registry_error(
            &self.path,
            format!(
                "`{name_or_path}` is neither a registered model name, a directory nor a Hugging \
                 Face Hub id `org/name` (list known models with `train models list`, add one \
                 with `train models add NAME DIR`)"
            ),
        ))
    }
}

/// `--revision`: the revision of Hub model ids (set once, from the command line).
pub(crate) static HUB_REVISION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

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
        let text = read_text_file(&adapter, MAX_JSON_FILE_BYTES)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid JSON: {e}", adapter.display()))?;
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

/// Scanning, lookup by name or path, adapters, concurrent writers.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// The tiny fixture models of train-model.
    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../train-model/tests/fixtures")
    }
    #[test]
    fn scan_finds_models_and_adapters() {
        let home = tempfile::tempdir().unwrap();
        let models = home.path().join("models");
        std::fs::create_dir_all(models.join("my-lora")).unwrap();
        std::fs::write(
            models.join("my-lora/adapter_config.json"),
            r#"{"peft_type": "LORA", "base_model_name_or_path": "qwen3", "r": 8}"#,
        )
        .unwrap();
        for arch in ["qwen3", "llama"] {
            let dst = models.join(arch);
            std::fs::create_dir_all(&dst).unwrap();
            for e in std::fs::read_dir(fixtures().join(arch)).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
            }
        }
        let registry = ModelRegistry::at(home.path().join("config/models.json"));
        let found = registry.scan(&models).unwrap();
        assert_eq!(found.len(), 3);
        let list = registry.list().unwrap();
        let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["llama", "my-lora", "qwen3"]);
        let qwen3 = registry.get("qwen3").unwrap().unwrap();
        assert_eq!(qwen3.kind, EntryKind::Model);
        assert_eq!(qwen3.model_type.as_deref(), Some("qwen3"));
        assert_eq!(
            (qwen3.hidden_size, qwen3.num_layers, qwen3.vocab_size),
            (Some(64), Some(2), Some(963))
        );
        assert!(qwen3.size_bytes > 300_000, "{}", qwen3.size_bytes);
        let lora = registry.get("my-lora").unwrap().unwrap();
        assert_eq!(lora.kind, EntryKind::Adapter);
        assert_eq!(lora.base_model.as_deref(), Some("qwen3"));

        // Lookup by name first, else the argument is a path.
        assert_eq!(
            registry.resolve("llama").unwrap(),
            models.join("llama").canonicalize().unwrap()
        );
        let by_path = fixtures().join("qwen2");
        assert_eq!(
            registry.resolve(by_path.to_str().unwrap()).unwrap(),
            by_path
        );
        let e = registry.resolve("no-such-model").unwrap_err().to_string();
        assert!(
            e.contains("no-such-model") && e.contains("train models list"),
            "{e}"
        );
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("models.json");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let registry = ModelRegistry::at(path);
                    for j in 0..3 {
                        registry
                            .add(&format!("m{i}-{j}"), &fixtures().join("qwen2"))
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let registry = ModelRegistry::at(&path);
        assert_eq!(registry.list().unwrap().len(), 24);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["schema_version"], 1);
    }

    #[test]
    fn corrupt_registry_is_a_clear_error() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("models.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = ModelRegistry::at(&path).list().unwrap_err().to_string();
        assert!(
            e.contains("models.json") && e.contains("invalid JSON"),
            "{e}"
        );
        assert!(
            ModelRegistry::at(&path)
                .add("x", &fixtures().join("qwen2"))
                .is_err()
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{not json",
            "a failed write must not touch the file"
        );
    }
}
