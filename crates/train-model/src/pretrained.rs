//! Hugging Face model directories: load a checkpoint into a [`CausalLm`], save one back.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, backend::Backend};
use serde_json::Value;

use crate::attention::AttentionImpl;
use crate::config::{ModelConfig, StorageDtype};
use crate::error::{ModelError, Result};
use crate::model::{CausalLm, NamedParam};
use crate::names::tensor_specs;
use crate::precision::Precision;
use crate::weights::{WeightIndex, to_safetensors_dtype};

/// Files of a model directory that are not weights and travel with it on save.
pub(crate) const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
];

/// How to load a checkpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// The precision to compute in.
    pub precision: Precision,
    /// The attention kernel.
    pub attention: AttentionImpl,
    /// Keep the parameters in f32 and compute in `precision` (training with master weights);
    /// otherwise the parameters themselves are stored in `precision` (inference).
    pub f32_master_weights: bool,
}

/// A model loaded from a Hugging Face directory, with what is needed to save it back.
#[derive(Debug)]
pub struct Pretrained<B: Backend> {
    /// The model.
    pub model: CausalLm<B>,
    /// Its checked configuration.
    pub config: ModelConfig,
    /// `config.json` as found (unknown fields are carried over on save).
    pub raw_config: Value,
    /// The directory the base model was loaded from.
    pub dir: PathBuf,
    /// The PEFT adapter directory applied on top of it, when one was loaded.
    pub adapter_dir: Option<PathBuf>,
    /// The float type of the weights on disk (the default when saving).
    pub source_dtype: StorageDtype,
    /// Tensors in the files that the model does not use and that are known to be harmless
    /// (`rotary_emb.inv_freq` buffers, an `lm_head.weight` of a tied model).
    pub ignored_tensors: Vec<String>,
}

fn is_ignorable(name: &str, config: &ModelConfig) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
        || (config.tie_word_embeddings && name == "lm_head.weight")
}

/// Loads `dir` (`config.json` + `model.safetensors` or a sharded index) on `device`.
///
/// Every tensor the architecture needs must be present with the shape the config implies; a
/// tensor the architecture does not use is an error (unless it is one of the known harmless
/// buffers, reported in [`Pretrained::ignored_tensors`]).
///
/// A PEFT adapter directory (`adapter_config.json`, no `config.json`) loads its base model
/// (`base_model_name_or_path`, as written or relative to the adapter) with the adapter on top,
/// as `peft`'s `AutoPeftModelForCausalLM` does.
pub fn load_pretrained<B: Backend>(
    dir: &Path,
    options: &LoadOptions,
    device: &B::Device,
) -> Result<Pretrained<B>> {
    if crate::lora::is_adapter_dir(dir) {
        let adapter = crate::lora::read_adapter_config(dir)?;
        let base = crate::lora::resolve_base_model(dir, adapter.base_model.as_deref())?;
        let mut pretrained = load_pretrained::<B>(&base, options, device)?;
        pretrained.model = crate::lora::load_adapter(pretrained.model, dir)?;
        pretrained.adapter_dir = Some(dir.to_path_buf());
        return Ok(pretrained);
    }
    let (config, raw_config) = ModelConfig::from_file(&dir.join("config.json"))?;
    let index = WeightIndex::open_dir(dir)?;
    let specs = tensor_specs(&config);
    let wanted: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut ignored = Vec::new();
    let mut unexpected = Vec::new();
    for name in index.names() {
        // `None`: a tensor of another tower (Qwen3-VL's vision), carried over on save.
        let Some(internal) = config.internal_tensor_name(name) else {
            continue;
        };
        if wanted.contains(internal.as_str()) {
            continue;
        }
        if is_ignorable(&internal, &config) {
            ignored.push(name.to_string());
        } else {
            unexpected.push(name.to_string());
        }
    }
    if let Some(spec) = specs
        .iter()
        .find(|s| index.entry(&config.file_tensor_name(&s.name)).is_none())
    {
        return Err(ModelError::MissingTensor {
            path: dir.to_path_buf(),
            tensor: config.file_tensor_name(&spec.name),
            expected: spec.shape.clone(),
        });
    }
    if !unexpected.is_empty() {
        unexpected.truncate(8);
        return Err(ModelError::UnexpectedTensors {
            path: dir.to_path_buf(),
            tensors: unexpected,
        });
    }
    let compute = options.precision.resolve::<B>(device)?;
    let storage = if options.f32_master_weights {
        burn::tensor::DType::F32
    } else {
        compute
    };
    let mut model = CausalLm::from_source(&config, storage, device, |spec| {
        index.tensor_data(&config.file_tensor_name(&spec.name), &spec.shape)
    })?
    .with_attention(options.attention);
    if storage != compute {
        model = model.with_compute_dtype(compute);
    }
    let source_dtype = index.dominant_dtype().unwrap_or(config.torch_dtype);
    Ok(Pretrained {
        model,
        config,
        raw_config,
        dir: dir.to_path_buf(),
        adapter_dir: None,
        source_dtype,
        ignored_tensors: ignored,
    })
}

/// How to save a model directory.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// The float type on disk; `None` keeps the source's (or the config's) type.
    pub dtype: Option<StorageDtype>,
    /// Split the weights into shards of at most this many bytes (a tensor larger than the
    /// limit gets a shard of its own); `None` writes one `model.safetensors`.
    pub max_shard_bytes: Option<u64>,
    /// A directory whose tokenizer files and `generation_config.json` are copied along.
    pub companions_from: Option<PathBuf>,
}

/// What [`save_pretrained`] wrote.
#[derive(Debug, Clone)]
pub struct SavedModel {
    /// The weight files, in order.
    pub weight_files: Vec<PathBuf>,
    /// Total bytes of tensor data.
    pub total_bytes: u64,
    /// The float type written.
    pub dtype: StorageDtype,
}

/// A tensor to write into a safetensors file, converted to host bytes only when the file
/// reaches it ([`write_safetensors`]): a file of many tensors never holds a host copy of more
/// than one (the whole model or optimizer state copied at once doubled a checkpoint's memory).
pub struct LazyTensor<'a> {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    len: usize,
    bytes: LazyBytes<'a>,
}

enum LazyBytes<'a> {
    /// Bytes made on demand (a device tensor read back and converted).
    Made(Box<dyn Fn() -> Vec<u8> + 'a>),
    /// Bytes already in memory (a mapped file's).
    Borrowed(&'a [u8]),
}

impl<'a> LazyTensor<'a> {
    /// `tensor` (a float tensor) as `name`, stored in `dtype`.
    pub fn from_tensor<B: Backend, const D: usize>(
        name: impl Into<String>,
        tensor: burn::tensor::Tensor<B, D>,
        dtype: StorageDtype,
    ) -> Self {
        let shape = tensor.shape().to_vec();
        let len = shape.iter().product::<usize>() * dtype.size();
        Self {
            name: name.into(),
            dtype: to_safetensors_dtype(dtype),
            shape,
            len,
            bytes: LazyBytes::Made(Box::new(move || {
                let data = tensor.clone().into_data();
                let data = if data.dtype == dtype.to_burn() {
                    data
                } else {
                    data.convert_dtype(dtype.to_burn())
                };
                data.into_bytes().to_vec()
            })),
        }
    }

    /// Bytes already laid out as the file stores them.
    pub(crate) fn borrowed(
        name: impl Into<String>,
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        bytes: &'a [u8],
    ) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
            len: bytes.len(),
            bytes: LazyBytes::Borrowed(bytes),
        }
    }
}

impl safetensors::View for &LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match &self.bytes {
            LazyBytes::Made(make) => {
                let bytes = make();
                debug_assert_eq!(bytes.len(), self.len, "{}", self.name);
                Cow::Owned(bytes)
            }
            LazyBytes::Borrowed(b) => Cow::Borrowed(b),
        }
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

/// Writes `tensors` into the safetensors file `path` (with `metadata`), each converted to host
/// bytes only when it is written.
pub fn write_safetensors(
    tensors: &[LazyTensor<'_>],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    safetensors::serialize_to_file(
        tensors.iter().map(|t| (t.name.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| ModelError::weights(path, format!("could not write safetensors: {e}")))
}

/// Replaces `path` with `bytes` by `train_fs`'s rule (temporary file, data synced, rename).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    train_fs::write_atomic(path, bytes).map_err(|e| ModelError::io(path, e))
}

/// For a vision-language model, the source checkpoint whose other towers `save_pretrained`
/// copies unchanged (`options.companions_from`); `None` for a text-only model.
fn carried_tensors<B: Backend>(
    model: &CausalLm<B>,
    options: &SaveOptions,
) -> Result<Option<WeightIndex>> {
    if !model.config.vision_language {
        return Ok(None);
    }
    let src = options.companions_from.as_ref().ok_or_else(|| {
        ModelError::InvalidInput(
            "saving a vision-language model needs SaveOptions::companions_from (the checkpoint \
             whose vision tower is carried over)"
                .into(),
        )
    })?;
    WeightIndex::open_dir(src).map(Some)
}

/// Copies the tokenizer and generation files of the model directory `src` into `dir` (each
/// atomically); nothing when both are the same directory.
pub fn copy_companions(src: &Path, dir: &Path) -> Result<()> {
    if src.canonicalize().ok() == dir.canonicalize().ok() {
        return Ok(());
    }
    for name in COMPANION_FILES {
        let from = src.join(name);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| ModelError::io(&from, e))?;
            write_atomically(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// Saves `model` as a Hugging Face directory: `config.json` (from `raw_config` with the dtype
/// updated, or generated), weights under their Hugging Face names (tied weights once), an index
/// when sharded, and the companion files of `options.companions_from`.
pub fn save_pretrained<B: Backend>(
    model: &CausalLm<B>,
    raw_config: Option<&Value>,
    dir: &Path,
    options: &SaveOptions,
) -> Result<SavedModel> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let dtype = options.dtype.unwrap_or(model.config.torch_dtype);

    // Plan shards from the shapes alone, so that only one shard is ever converted in memory.
    let config = &model.config;
    let mut order: Vec<(String, u64)> = Vec::new();
    model.visit_named(|p| {
        let (name, n) = match p {
            NamedParam::Vector(n, t) => (n, t.shape().num_elements()),
            NamedParam::Matrix(n, t) => (n, t.shape().num_elements()),
        };
        order.push((config.file_tensor_name(name), (n * dtype.size()) as u64));
    });
    // A vision-language model's other towers are copied byte for byte from the source.
    let carried = carried_tensors(model, options)?;
    if let Some(index) = &carried {
        for name in index.names() {
            if config.internal_tensor_name(name).is_none()
                && let Some((_, entry)) = index.entry(name)
            {
                order.push((name.to_string(), (entry.range.1 - entry.range.0) as u64));
            }
        }
    }
    let mut shards: Vec<Vec<String>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, bytes) in &order {
        if let Some(limit) = options.max_shard_bytes
            && current > 0
            && current + bytes > limit
        {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(name.clone());
        }
    }
    let n_shards = shards.len();
    let file_name = |i: usize| {
        if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards)
        }
    };
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut weight_map = BTreeMap::new();
    let mut weight_files = Vec::new();
    let mut total_bytes = 0u64;
    for (i, names) in shards.iter().enumerate() {
        let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut views: Vec<LazyTensor<'_>> = Vec::with_capacity(names.len());
        let mut error = None;
        model.visit_named(|p| {
            let internal = match &p {
                NamedParam::Vector(n, _) | NamedParam::Matrix(n, _) => *n,
            };
            let file_name = config.file_tensor_name(internal);
            if !wanted.contains(file_name.as_str()) {
                return;
            }
            let found = match &p {
                NamedParam::Vector(_, t) => t.val().dtype(),
                NamedParam::Matrix(_, t) => t.val().dtype(),
            };
            if !matches!(found, DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
                error = Some(ModelError::InvalidInput(format!(
                    "parameter {file_name} has dtype {found:?}"
                )));
                return;
            }
            views.push(match p {
                NamedParam::Vector(_, t) => LazyTensor::from_tensor(file_name, t.val(), dtype),
                NamedParam::Matrix(_, t) => LazyTensor::from_tensor(file_name, t.val(), dtype),
            });
        });
        if let Some(e) = error {
            return Err(e);
        }
        if let Some(index) = &carried {
            for name in names {
                if config.internal_tensor_name(name).is_some() {
                    continue;
                }
                if let Some((file, entry)) = index.entry(name) {
                    let data = file.bytes(name).ok_or_else(|| {
                        ModelError::weights(
                            file.path(),
                            format!("tensor `{name}` lies outside the file"),
                        )
                    })?;
                    views.push(LazyTensor::borrowed(
                        name.clone(),
                        entry.dtype,
                        entry.shape.clone(),
                        data,
                    ));
                }
            }
        }
        let fname = file_name(i);
        let path = dir.join(&fname);
        for v in &views {
            total_bytes += v.len as u64;
            weight_map.insert(v.name.clone(), fname.clone());
        }
        let tmp = train_fs::temporary_name(&path);
        write_safetensors(&views, metadata.clone(), &tmp).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        train_fs::install(&tmp, &path).map_err(|e| ModelError::io(&path, e))?;
        weight_files.push(path);
    }

    let index_path = dir.join("model.safetensors.index.json");
    if n_shards > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total_bytes},
            "weight_map": weight_map,
        });
        write_json(&index_path, &index)?;
    }
    remove_stale_weights(dir, &weight_files, n_shards > 1)?;

    let mut config = raw_config
        .cloned()
        .unwrap_or_else(|| model.config.to_hf_json());
    if let Value::Object(map) = &mut config {
        if map.contains_key("dtype") {
            map.insert("dtype".into(), Value::from(dtype.torch_name()));
        }
        if map.contains_key("torch_dtype") || !map.contains_key("dtype") {
            map.insert("torch_dtype".into(), Value::from(dtype.torch_name()));
        }
    }
    write_json(&dir.join("config.json"), &config)?;

    if let Some(src) = &options.companions_from {
        copy_companions(src, dir)?;
    }
    Ok(SavedModel {
        weight_files,
        total_bytes,
        dtype,
    })
}

impl<B: Backend> Pretrained<B> {
    /// Saves the (possibly trained) model to `dir`, keeping the source's dtype unless
    /// `options.dtype` says otherwise, and carrying the tokenizer files along.
    pub fn save(&self, dir: &Path, options: &SaveOptions) -> Result<SavedModel> {
        let mut options = options.clone();
        options.dtype = Some(options.dtype.unwrap_or(self.source_dtype));
        if options.companions_from.is_none() {
            options.companions_from = Some(self.dir.clone());
        }
        save_pretrained(&self.model, Some(&self.raw_config), dir, &options)
    }
}

/// Writes pretty JSON (with a final newline) atomically.
pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.push('\n');
    write_atomically(path, text.as_bytes())
}

/// Removes weight files of an earlier save into the same directory that the new save does not
/// use (a single file after sharding, shards after a single file, an index no longer valid).
fn remove_stale_weights(dir: &Path, keep: &[PathBuf], sharded: bool) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let is_weights = name == "model.safetensors"
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        let stale_index = name == "model.safetensors.index.json" && !sharded;
        if (is_weights && !keep.contains(&path)) || stale_index {
            std::fs::remove_file(&path).map_err(|e| ModelError::io(&path, e))?;
        }
    }
    Ok(())
}
