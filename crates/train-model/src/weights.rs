//! Reading safetensors checkpoints (single file or sharded with an index), memory-mapped.
//!
//! Headers are validated against the file size before anything is allocated: a header that
//! claims more data than the file holds is an error, not an allocation.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::StorageDtype;
use crate::error::{ModelError, Result};

/// One memory-mapped `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorEntry>,
}

/// Where a tensor lives inside its file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Element type on disk.
    pub dtype: Dtype,
    /// Shape on disk.
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub range: (usize, usize),
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<Mmap> {
    // Opening a FIFO would block until a writer comes: only regular files are mapped.
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if !meta.is_file() {
        return Err(ModelError::weights(path, "not a regular file"));
    }
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the file is opened read-only and only read through this map. Like every
    // mmap-based loader (safetensors, candle), we rely on no other process truncating or
    // rewriting a checkpoint while it is being loaded; checkpoints are written to a temporary
    // name and renamed, so our own writers never do.
    unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))
}

impl SafetensorsFile {
    /// Maps `path` and validates its header (offsets, sizes, dtypes) against the file length.
    pub fn open(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let (n, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| ModelError::weights(path, format!("invalid safetensors header: {e}")))?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                (
                    name,
                    TensorEntry {
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: info.data_offsets,
                    },
                )
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            map,
            data_start: 8 + n,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names and entries of every tensor, sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &TensorEntry)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The raw little-endian bytes of `name`.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let e = self.tensors.get(name)?;
        self.map
            .get(self.data_start + e.range.0..self.data_start + e.range.1)
    }
}

/// Every tensor of a checkpoint, across shards.
#[derive(Debug)]
pub struct WeightIndex {
    files: Vec<SafetensorsFile>,
    by_name: HashMap<String, usize>,
    root: PathBuf,
}

/// Converts a safetensors dtype to our storage dtype, if it is a float type we read.
pub(crate) fn storage_dtype(dtype: Dtype) -> Option<StorageDtype> {
    match dtype {
        Dtype::F32 => Some(StorageDtype::F32),
        Dtype::BF16 => Some(StorageDtype::Bf16),
        Dtype::F16 => Some(StorageDtype::F16),
        _ => None,
    }
}

impl WeightIndex {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            Self::open_index(&index)
        } else if single.exists() {
            // (Not a regular file: `open` says so instead of blocking on a FIFO.)
            let file = SafetensorsFile::open(&single)?;
            Self::from_files(dir, vec![file])
        } else {
            Err(ModelError::weights(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ))
        }
    }

    /// Opens the shards named by a `model.safetensors.index.json` (`weight_map`: tensor → file).
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = crate::read_text_file(index, crate::MAX_JSON_FILE_BYTES)?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Json {
                path: index.to_path_buf(),
                message: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| ModelError::config(index, "weight_map", "missing or not an object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                ModelError::config(index, format!("weight_map.{tensor}"), "not a file name")
            })?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(ModelError::config(
                    index,
                    format!("weight_map.{tensor}"),
                    format!("shard name `{file}` must be a plain file name in the model directory"),
                ));
            }
            if !shard_names.contains(&file) {
                shard_names.push(file);
            }
        }
        shard_names.sort_unstable();
        let files = shard_names
            .iter()
            .map(|name| SafetensorsFile::open(&dir.join(name)))
            .collect::<Result<Vec<_>>>()?;
        let out = Self::from_files(dir, files)?;
        for (tensor, file) in map {
            match out.by_name.get(tensor) {
                Some(&i)
                    if out.files[i].path.file_name().and_then(|f| f.to_str()) == file.as_str() => {}
                _ => {
                    return Err(ModelError::weights(
                        index,
                        format!(
                            "weight_map says `{tensor}` is in {file}, but that file does not hold it"
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn from_files(root: &Path, files: Vec<SafetensorsFile>) -> Result<Self> {
        let mut by_name = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for (name, _) in f.entries() {
                if by_name.insert(name.to_string(), i).is_some() {
                    return Err(ModelError::weights(
                        &f.path,
                        format!("tensor `{name}` appears in more than one shard"),
                    ));
                }
            }
        }
        Ok(Self {
            files,
            by_name,
            root: root.to_path_buf(),
        })
    }

    /// The checkpoint directory (or the single file's directory).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The entry of `name` and the file holding it.
    pub fn entry(&self, name: &str) -> Option<(&SafetensorsFile, &TensorEntry)> {
        let f = &self.files[*self.by_name.get(name)?];
        Some((f, f.tensors.get(name)?))
    }

    /// The most common float dtype among the tensors (the checkpoint's storage dtype).
    pub fn dominant_dtype(&self) -> Option<StorageDtype> {
        let mut counts: HashMap<StorageDtype, usize> = HashMap::new();
        for f in &self.files {
            for (_, e) in f.entries() {
                if let Some(d) = storage_dtype(e.dtype) {
                    *counts.entry(d).or_default() += e.shape.iter().product::<usize>();
                }
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    /// Host data of `name`, checked against `expected` shape, in its on-disk float type.
    pub fn tensor_data(&self, name: &str, expected: &[usize]) -> Result<TensorData> {
        let (file, entry) = self.entry(name).ok_or_else(|| ModelError::MissingTensor {
            path: self.root.clone(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
        })?;
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: file.path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let dtype = match storage_dtype(entry.dtype) {
            Some(d) => d.to_burn(),
            None => {
                return Err(ModelError::weights(
                    &file.path,
                    format!(
                        "tensor `{name}` has dtype {:?}; only F32, BF16 and F16 are read",
                        entry.dtype
                    ),
                ));
            }
        };
        let bytes = file.bytes(name).ok_or_else(|| {
            ModelError::weights(&file.path, format!("tensor `{name}` lies outside the file"))
        })?;
        Ok(TensorData::from_bytes_vec(
            bytes.to_vec(),
            entry.shape.clone(),
            dtype,
        ))
    }
}

/// Burn dtype → safetensors dtype for the float types we write.
pub(crate) fn to_safetensors_dtype(d: StorageDtype) -> Dtype {
    match d {
        StorageDtype::F32 => Dtype::F32,
        StorageDtype::Bf16 => Dtype::BF16,
        StorageDtype::F16 => Dtype::F16,
    }
}
