//! # train-model
//!
//! Load, run and save Hugging Face decoder checkpoints — Qwen3, Qwen2 and Llama (SmolLM2) —
//! with [burn](https://burn.dev), on any burn backend.
//!
//! * [`ModelConfig`] parses `config.json` in every form found in the wild (old `rope_scaling` /
//!   `torch_dtype` and new `rope_parameters` / `dtype`), and names the field at fault otherwise.
//! * [`load_pretrained`] reads `model.safetensors` or a sharded index (memory-mapped, validated
//!   against the file size), casts to the compute [`Precision`], and checks every tensor's name
//!   and shape. [`save_pretrained`] writes the same layout back (dtype of your choice, tied
//!   weights once, shards with an index, tokenizer files carried over).
//! * [`CausalLm`] is the decoder. Its forward takes per-token position ids and segment ids so
//!   that packed rows restart their positions and never attend to each other; [`KvCache`] makes
//!   incremental decoding give the same logits as a full forward.
//! * [`causal_lm_nll`] / [`causal_lm_loss`] compute the masked loss exactly as `transformers`.
//! * `gguf` (cargo feature `gguf`) writes a model as a llama.cpp GGUF file
//!   (`export_gguf`: llama, qwen2, qwen3; F16 or Q8_0) and turns a llama.cpp GGUF checkpoint into a Hugging Face
//!   directory.
//!
//! Parity with `transformers` is tested against committed reference outputs (logits, hidden
//! states, loss, gradients of every parameter, one AdamW step) on tiny Qwen3, Qwen2 and Llama
//! checkpoints, on the CPU and libtorch backends.
//!
//! ## Backends
//!
//! The code is generic over `B: burn::tensor::backend::Backend`; the binary picks one. Cargo
//! features: `cpu` (default; burn's pure-Rust Flex backend), `tch` (libtorch 2.9.0),
//! `cuda` (burn-cuda; builds without a GPU).
//!
//! ## Errors
//!
//! [`ModelError`]: `Io` and `Json` (with the path), `Config` (a `config.json` field missing or
//! out of range, named), `UnsupportedArchitecture`, `InvalidWeights` (a safetensors header,
//! offset or dtype that does not fit the file: checked before anything is allocated),
//! `MissingTensor` / `UnexpectedTensors` / `ShapeMismatch` (the checkpoint does not match its
//! configuration, listing the tensors), `UnsupportedPrecision` (the backend cannot compute in
//! the asked dtype), `InvalidInput` (inputs of inconsistent shapes) and `Output` (a model directory that may
//! not be written, and why: [`OutputRefusal`]).
//!
//! ## Example
//!
//! ```
//! use burn::backend::Flex;
//! use train_model::{CausalLm, ModelConfig, ModelInput, causal_lm_loss};
//! use burn::tensor::{DType, Int, Tensor, TensorData};
//!
//! let json = serde_json::json!({
//!     "model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
//!     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
//!     "head_dim": 8, "tie_word_embeddings": true
//! });
//! let config = ModelConfig::from_json(std::path::Path::new("config.json"), &json)?;
//! let device = Default::default();
//! let model = CausalLm::<Flex>::random(&config, 0.02, 7, DType::F32, &device)?;
//! let input = ModelInput::from_rows(&[vec![1, 5, 9, 3]], &device)?;
//! let logits = model.forward(&input);
//! assert_eq!(logits.dims(), [1, 4, 64]);
//! let labels = Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![-100i64, 5, 9, 3], [1, 4]), &device);
//! let loss: f32 = causal_lm_loss(logits, labels).into_scalar();
//! assert!((loss - 64f32.ln()).abs() < 0.5); // near-uniform predictions at initialisation
//! # Ok::<(), train_model::ModelError>(())
//! ```

mod attention;
mod cache;
mod config;
mod error;
mod family;
mod fused;
#[cfg(feature = "gguf")]
mod gguf;
#[cfg(feature = "gguf")]
mod gguf_export;
pub mod hub;
mod init;
mod lora;
mod loss;
mod model;
mod names;
mod output;
mod precision;
mod pretrained;
mod recompute;
mod rope;
mod weights;

pub use attention::{AttentionImpl, AttentionMask, repeat_kv, scaled_dot_product};
pub use cache::KvCache;
pub use config::{
    Activation, Architecture, HfConfig, LayerType, ModelConfig, MoeConfig, NormPlacement,
    StorageDtype,
};
pub use error::{ModelError, Result};
pub use fused::{
    AdamWStep, AttentionSpec, FusedAutodiffBackend, FusedBackend, SegmentIds, SegmentTensors,
    attention, embedding, gated, gated_linear, reference, rms_norm, rms_norm_linears, rotary,
    swiglu,
};
#[cfg(feature = "gguf")]
pub use gguf::{GgufImport, convert_to_hf};
#[cfg(feature = "gguf")]
pub use gguf_export::{GgufExport, GgufOutType, export_gguf};
pub use lora::{
    AdapterConfig, ExpertsLora, LORA_MODULES, LoraAdapter, LoraConfig, is_adapter_dir,
    load_adapter, read_adapter_config, resolve_base_model, save_adapter, with_lora_dropout_seed,
};
pub use loss::{
    IGNORE_INDEX, LinearNll, MIN_NLL_CHUNK_ROWS, NLL_CHUNK_LOGITS, causal_lm_loss, causal_lm_nll,
    fused_linear_nll, nll_chunk_rows,
};
pub use model::{
    CausalLm, DecoderLayer, FeedForward, GateUpProjections, HiddenStates, Mlp, ModelInput,
    NamedParam, Projection, QkvProjections, RmsNorm, SelfAttention, SeparateGateUp, SeparateQkv,
    SparseMoe,
};
pub use names::{ParamKind, TensorSpec, tensor_specs};
pub use output::{
    MAX_JSON_FILE_BYTES, OutputRefusal, check_output_dir, install_model, is_sealed_checkpoint,
    read_text_file, staging_dir,
};
pub use precision::Precision;
pub use pretrained::{
    LazyTensor, LoadOptions, Pretrained, SaveOptions, SavedModel, copy_companions, load_pretrained,
    save_pretrained, write_safetensors,
};
pub use recompute::{Backprop, TrainingForward};
pub use rope::{RopeConfig, RopeScaling, apply_rotary};
pub use weights::{SafetensorsFile, TensorEntry, WeightIndex};
