//! Exporting a Hugging Face model directory as a llama.cpp GGUF file (`train export --format
//! gguf`): the inverse of [`convert_to_hf`](crate::gguf::convert_to_hf).
//!
//! - Families, as llama.cpp's `convert_hf_to_gguf.py` writes them: `llama` (SmolLM2, Llama),
//!   `mistral` (as llama.cpp's `llama` architecture, which has no sliding window: a note says
//!   so when the window is shorter than the context), `qwen2`, `qwen3`, `olmo2` (without an
//!   attention output bias, which llama.cpp's OLMo 2 lacks), `smollm3` (when its layers without
//!   rotary embedding are llama.cpp's fixed every-fourth), `gemma3` (norm weights stored as
//!   `1 + w`, the sliding layers as a per-layer pattern, the local rotary base; when
//!   `query_pre_attn_scalar` is the scale llama.cpp computes). The importer reads each back.
//!   Ministral is refused by name (see [`export_gguf`]).
//! - Tensors get llama.cpp's names (`token_embd`, `blk.N.attn_q`, …, `output_norm`, `output`
//!   when the head is not tied); Llama's q/k rows are permuted into llama.cpp's rotary layout,
//!   as `convert_hf_to_gguf.py` does. Norms and biases are F32; the matrices F16, or Q8_0 with
//!   `--outtype q8_0` (rows whose length is not a multiple of 32 stay F16), quantised exactly
//!   as `gguf-py` does.
//! - Metadata: the architecture's hyper-parameters, `general.file_type`, the tokenizer
//!   (`tokenizer.ggml.*`: byte-level BPE tokens, token types, merges, special ids) and the chat
//!   template.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::gguf::GgufLayout;
use crate::rope::RopeScaling;
use crate::weights::WeightIndex;

/// The float type of the exported matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufOutType {
    /// IEEE half precision.
    F16,
    /// llama.cpp's 8-bit blocks of 32 with an f16 scale.
    Q8_0,
}

/// What [`export_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    /// The file.
    pub path: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// Tensors written.
    pub tensors: usize,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// What llama.cpp will do differently from `transformers` with this file, if anything.
    pub notes: Vec<String>,
}

const ALIGNMENT: usize = 32;
/// Most token ids exported (far above any published vocabulary).
const MAX_TOKENS: usize = 1 << 24;
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q8_0: u32 = 8;

/// A metadata value to write.
enum Kv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
    BoolArray(Vec<bool>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// An array value's type (9), its items' GGUF type and their count.
fn put_array_header(out: &mut Vec<u8>, item_type: u32, len: usize) {
    out.extend(9u32.to_le_bytes());
    out.extend(item_type.to_le_bytes());
    out.extend((len as u64).to_le_bytes());
}

fn put_kv(out: &mut Vec<u8>, key: &str, v: &Kv) {
    put_str(out, key);
    match v {
        Kv::U32(x) => {
            out.extend(4u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Kv::F32(x) => {
            out.extend(6u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Kv::Bool(x) => {
            out.extend(7u32.to_le_bytes());
            out.push(u8::from(*x));
        }
        Kv::Str(s) => {
            out.extend(8u32.to_le_bytes());
            put_str(out, s);
        }
        Kv::StrArray(items) => {
            put_array_header(out, 8, items.len());
            for s in items {
                put_str(out, s);
            }
        }
        Kv::I32Array(items) => {
            put_array_header(out, 5, items.len());
            out.extend(items.iter().flat_map(|x| x.to_le_bytes()));
        }
        Kv::BoolArray(items) => {
            put_array_header(out, 7, items.len());
            out.extend(items.iter().map(|&b| u8::from(b)));
        }
        Kv::F32Array(items) => {
            put_array_header(out, 6, items.len());
            out.extend(items.iter().flat_map(|x| x.to_le_bytes()));
        }
    }
}

/// llama.cpp's name of a Hugging Face tensor (the inverse of the importer's mapping).
fn gguf_name(hf: &str, norms: &'static [(&'static str, &'static str)]) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = leaf.rsplit_once('.')?;
    let g = crate::gguf::layer_modules(norms)
        .find(|(hf, _)| *hf == module)
        .map(|(_, g)| *g)?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// llama.cpp's `permute` of q/k rows for its rotary layout: Hugging Face row
/// `h*hd + j*hd/2 + i` becomes GGUF row `h*hd + 2i + j`.
pub(crate) fn permute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads.max(1);
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + j * half + i;
                let dst = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// `gguf-py`'s `np_roundf`: round half away from zero.
fn roundf(x: f32) -> f32 {
    let a = x.abs();
    let floored = a.floor();
    let b = floored + (2.0 * (a - floored)).floor();
    if x == 0.0 { 0.0 } else { b.copysign(x) }
}

/// Q8_0 blocks of `values` (a multiple of 32), as `gguf-py` quantises them.
pub(crate) fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend(half::f16::from_f32(d).to_le_bytes());
        for &v in block {
            out.push((roundf(v * id) as i8) as u8);
        }
    }
    out
}

/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;
const TOKEN_BYTE: i32 = 6;

/// Whether `token` is a byte-fallback piece (`<0x0A>`).
pub(crate) fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The tokenizer metadata of a `tokenizer.json`: byte-level BPE as llama.cpp's `gpt2` model
/// (tokens, types, merges, pre-tokenizer name), or a SentencePiece-style BPE with byte
/// fallback (Mistral, Llama 2, Gemma) as its `llama` model: tokens with `▁`, byte pieces
/// typed as bytes, and scores from the merge ranks (llama.cpp merges the adjacent pair whose
/// concatenation scores highest, which is the BPE order when a token's score is minus the
/// rank of the merge that makes it).
///
/// The token list is padded with `[PAD<id>]` pieces up to `vocab_size`, the embedding's rows
/// (Qwen's checkpoints have more rows than tokens), as llama.cpp's converter does: llama.cpp
/// checks that the two agree.
fn tokenizer_kvs(dir: &Path, vocab_size: usize, out: &mut Vec<(String, Kv)>) -> Result<()> {
    let path = dir.join("tokenizer.json");
    // The size train-data allows a tokenizer (the largest published are about 35 MB).
    let text = crate::read_text_file(&path, crate::MAX_JSON_FILE_BYTES)?;
    let tok: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let model = &tok["model"];
    if model["type"] != "BPE" {
        return Err(ModelError::weights(
            &path,
            "GGUF export writes BPE tokenizers only (`model.type` is not BPE)",
        ));
    }
    let sentencepiece = model["byte_fallback"].as_bool().unwrap_or(false);
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| ModelError::weights(&path, "`model.vocab` is not an object"))?;
    let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
    let mut set = |id: usize, token: &str, kind: i32| {
        if by_id.len() <= id {
            by_id.resize(id + 1, None);
        }
        by_id[id] = Some((token.to_string(), kind));
    };
    let unk = model["unk_token"].as_str().unwrap_or("");
    for (token, id) in vocab {
        if let Some(id) = id.as_u64() {
            let kind = if sentencepiece && is_byte_token(token) {
                TOKEN_BYTE
            } else if !unk.is_empty() && token == unk {
                TOKEN_UNKNOWN
            } else {
                TOKEN_NORMAL
            };
            set(id as usize, token, kind);
        }
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) {
            let kind = if content == unk && sentencepiece {
                TOKEN_UNKNOWN
            } else if added["special"].as_bool().unwrap_or(false) {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            };
            set(id as usize, content, kind);
        }
    }
    if by_id.len() > vocab_size {
        return Err(ModelError::weights(
            &path,
            format!(
                "the tokenizer has {} token ids, more than the embedding's {vocab_size} rows \
                 (llama.cpp requires as many tokens as rows)",
                by_id.len()
            ),
        ));
    }
    if by_id.len() < vocab_size && vocab_size <= MAX_TOKENS {
        by_id.resize(vocab_size, None);
    }
    if by_id.len() > MAX_TOKENS {
        return Err(ModelError::weights(
            &path,
            "more token ids than a GGUF export allows",
        ));
    }
    let (tokens, types): (Vec<String>, Vec<i32>) = by_id
        .into_iter()
        .enumerate()
        // Unused ids, as llama.cpp's converter names them.
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_UNUSED)))
        .unzip();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(pair) => Some(
                pair.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        })
        .collect();
    let config_path = dir.join("tokenizer_config.json");
    let cfg: Value = crate::read_text_file(&config_path, crate::MAX_JSON_FILE_BYTES)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let id_of = |key: &str| -> Option<u32> {
        let content = match &cfg[key] {
            Value::String(s) => s.as_str(),
            Value::Object(o) => o.get("content")?.as_str()?,
            _ => return None,
        };
        tokens
            .iter()
            .position(|t| t == content)
            .and_then(|i| u32::try_from(i).ok())
    };
    // The pre-tokenizer llama.cpp names: Qwen's regex (digits alone), Llama 3's (digits by up
    // to three), SmolLM's (digits alone, then GPT-2's), else GPT-2's.
    let steps = tok["pre_tokenizer"]["pretokenizers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let regex = steps
        .iter()
        .find_map(|x| x["pattern"]["Regex"].as_str().map(str::to_string))
        .unwrap_or_default();
    let pre = if regex.contains(r"\p{N}{1,3}") {
        "llama-bpe"
    } else if regex.contains(r"|\p{N}|") {
        "qwen2"
    } else if steps.iter().any(|x| x["type"] == "Digits") {
        "smollm"
    } else {
        "default"
    };
    let ids: Vec<(&str, u32)> = [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ]
    .into_iter()
    .filter_map(|(key, name)| id_of(key).map(|id| (name, id)))
    .collect();
    if sentencepiece {
        let index: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        // Minus the rank of the first merge that makes each token; 0 for the pieces no merge
        // makes (characters, bytes, specials), which llama.cpp never merges into.
        let mut scores = vec![0f32; tokens.len()];
        let mut made = vec![false; tokens.len()];
        for (rank, m) in merges.iter().enumerate() {
            let joined: String = m.split(' ').collect();
            if let Some(&id) = index.get(joined.as_str())
                && !made[id]
            {
                made[id] = true;
                scores[id] = -(rank as f32);
            }
        }
        // A piece of several characters that no merge makes cannot come out of BPE: the
        // lowest score keeps llama.cpp from preferring it.
        for (i, t) in tokens.iter().enumerate() {
            if !made[i] && types[i] == TOKEN_NORMAL && t.chars().count() > 1 {
                scores[i] = -1e9;
            }
        }
        let prepend = tok["normalizer"]["normalizers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(std::iter::once(&tok["normalizer"]))
            .any(|n| n["type"] == "Prepend" && n["prepend"] == "\u{2581}");
        out.push(("tokenizer.ggml.model".into(), Kv::Str("llama".into())));
        out.push(("tokenizer.ggml.pre".into(), Kv::Str("default".into())));
        out.push(("tokenizer.ggml.tokens".into(), Kv::StrArray(tokens)));
        out.push(("tokenizer.ggml.scores".into(), Kv::F32Array(scores)));
        out.push(("tokenizer.ggml.token_type".into(), Kv::I32Array(types)));
        out.push(("tokenizer.ggml.add_space_prefix".into(), Kv::Bool(prepend)));
    } else {
        out.push(("tokenizer.ggml.model".into(), Kv::Str("gpt2".into())));
        out.push(("tokenizer.ggml.pre".into(), Kv::Str(pre.into())));
        out.push(("tokenizer.ggml.tokens".into(), Kv::StrArray(tokens)));
        out.push(("tokenizer.ggml.token_type".into(), Kv::I32Array(types)));
        out.push(("tokenizer.ggml.merges".into(), Kv::StrArray(merges)));
    }
    let bos_id = ids
        .iter()
        .find(|(n, _)| *n == "tokenizer.ggml.bos_token_id")
        .map(|(_, id)| *id);
    for (name, id) in ids {
        out.push((name.into(), Kv::U32(id)));
    }
    // Whether encoding adds BOS: the tokenizer config says so, or else the tokenizer's own
    // post-processor starts every text with the BOS token (Llama 3, Mistral).
    let add_bos = cfg["add_bos_token"].as_bool().unwrap_or_else(|| {
        let first = &tok["post_processor"]["single"][0]["SpecialToken"]["id"];
        let bos = bos_id.and_then(|id| tok_at(&tok, id));
        first.as_str().is_some_and(|f| Some(f) == bos.as_deref())
    });
    out.push(("tokenizer.ggml.add_bos_token".into(), Kv::Bool(add_bos)));
    let template =
        crate::read_text_file(&dir.join("chat_template.jinja"), crate::MAX_JSON_FILE_BYTES)
            .ok()
            .or_else(|| cfg["chat_template"].as_str().map(str::to_string));
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), Kv::Str(t)));
    }
    Ok(())
}

/// The GGUF layout `config` is written in, with the notes of what llama.cpp does differently,
/// or why it cannot be written.
fn layout_for(
    config: &ModelConfig,
    config_path: &Path,
    index: &WeightIndex,
) -> Result<(GgufLayout, Vec<String>)> {
    let refuse = |why: &str| ModelError::weights(config_path, why.to_string());
    let mut notes = Vec::new();
    if config.vision_language {
        return Err(ModelError::UnsupportedArchitecture {
            path: config_path.to_path_buf(),
            model_type: "qwen3_vl".into(),
            hint: " for GGUF export (a vision-language checkpoint: llama.cpp takes its vision \
                   tower as a separate mmproj file, which this exporter does not write)"
                .into(),
        });
    }
    let arch = match config.architecture {
        Architecture::Llama => "llama",
        Architecture::Mistral => {
            if let Some(w) = config.sliding_window
                && w < config.max_position_embeddings
            {
                notes.push(format!(
                    "llama.cpp runs Mistral as its `llama` architecture, without the sliding \
                     window: its outputs differ from transformers' beyond {w} tokens"
                ));
            }
            "llama"
        }
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
        Architecture::Olmo2 => {
            if config.o_bias || index.names().iter().any(|n| n.ends_with("o_proj.bias")) {
                return Err(refuse(
                    "llama.cpp's olmo2 architecture has no attention output bias \
                     (`attention_bias: true`); this model cannot be written as GGUF",
                ));
            }
            if config.sliding_window.is_some() || !config.layer_types.is_empty() {
                return Err(refuse(
                    "OLMo sliding-window layers are not written to GGUF by this exporter",
                ));
            }
            "olmo2"
        }
        Architecture::SmolLm3 => {
            let rope = |i: usize| config.rope_layers.get(i).copied().unwrap_or(true);
            if (0..config.num_layers).any(|i| rope(i) != crate::gguf::smollm3_rope_layer(i)) {
                return Err(refuse(&format!(
                    "llama.cpp's smollm3 leaves the rotary embedding out of every {}th layer \
                     (fixed, not read from the file), and this model's `no_rope_layers` differ",
                    crate::gguf::SMOLLM3_NO_ROPE_STEP
                )));
            }
            if config.sliding_window.is_some() {
                return Err(refuse(
                    "SmolLM3 sliding-window attention is not written to GGUF by this exporter",
                ));
            }
            "smollm3"
        }
        Architecture::Gemma3 => {
            let want = crate::gguf::gemma3_query_scalar(
                config.num_layers,
                config.hidden_size,
                config.num_heads,
                config.head_dim,
            );
            if config
                .query_pre_attn_scalar
                .is_some_and(|q| (q - want as f64).abs() > 1e-9)
            {
                return Err(refuse(&format!(
                    "llama.cpp's gemma3 scales attention by {want}^-0.5 (the head width; the \
                     27B model's residual width over its heads), and this model's \
                     `query_pre_attn_scalar` differs"
                )));
            }
            if config
                .rope_local
                .as_ref()
                .is_some_and(|r| !matches!(r.scaling, RopeScaling::Default))
            {
                return Err(refuse(
                    "llama.cpp's gemma3 has no RoPE scaling on its sliding-window layers",
                ));
            }
            "gemma3"
        }
        other => {
            let hint = match other {
                Architecture::Ministral => {
                    " for GGUF export (llama.cpp's converter has no MinistralForCausalLM)"
                }
                Architecture::Qwen3Moe => {
                    " for GGUF export (the experts of Qwen3-MoE are not written by this exporter \
                     yet; llama.cpp's own convert_hf_to_gguf.py reads the saved checkpoint)"
                }
                Architecture::Phi3 => {
                    " for GGUF export (Phi-3's fused projections and LongRoPE factors are not \
                     written by this exporter yet; llama.cpp's own convert_hf_to_gguf.py reads \
                     the saved checkpoint)"
                }
                _ => {
                    " for GGUF export (supported: llama, mistral, qwen2, qwen3, olmo2, smollm3, \
                     gemma3)"
                }
            };
            return Err(ModelError::UnsupportedArchitecture {
                path: config_path.to_path_buf(),
                model_type: other.model_type().to_string(),
                hint: hint.into(),
            });
        }
    };
    let layout = crate::gguf::layout(arch).ok_or_else(|| refuse("no GGUF layout"))?;
    Ok((layout, notes))
}

/// The text of token `id` in `tok` (its vocabulary or added tokens).
fn tok_at(tok: &Value, id: u32) -> Option<String> {
    let id = u64::from(id);
    tok["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["id"].as_u64() == Some(id))
        .and_then(|a| a["content"].as_str())
        .or_else(|| {
            tok["model"]["vocab"]
                .as_object()?
                .iter()
                .find(|(_, v)| v.as_u64() == Some(id))
                .map(|(k, _)| k.as_str())
        })
        .map(str::to_string)
}

/// Writes the model in `model_dir` as a GGUF file at `out` (replaced atomically).
///
/// RoPE scaling: linear as `rope.scaling.*`; Llama 3's (Llama, Mistral, SmolLM3) as the
/// per-frequency `rope_freqs` tensor `convert_hf_to_gguf.py` computes. Refused: LoRA adapters
/// (merge first), the other RoPE scalings, vision-language checkpoints, Ministral (no llama.cpp
/// converter), and the family variants llama.cpp cannot run (see the module docs).
pub fn export_gguf(model_dir: &Path, out: &Path, outtype: GgufOutType) -> Result<GgufExport> {
    let config_path = model_dir.join("config.json");
    let (config, _raw) = ModelConfig::from_file(&config_path)?;
    let index = WeightIndex::open_dir(model_dir)?;
    let (layout, notes) = layout_for(&config, &config_path, &index)?;
    let arch = layout.arch;
    let mut linear = None;
    let mut rope_freqs = None;
    match config.rope.scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => linear = Some(factor),
        // llama.cpp's Llama-derived architectures take it as per-frequency factors.
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } if layout.permute_qk => {
            rope_freqs = Some(crate::gguf::llama3_rope_factors(
                config.rope.theta,
                config.rope.head_dim,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            ));
        }
        _ => {
            return Err(ModelError::weights(
                &config_path,
                "this RoPE scaling (`rope_scaling`: yarn, dynamic, longrope, or llama3 outside \
                 the Llama family) is not written to GGUF by this exporter",
            ));
        }
    }
    let c = &config;
    let key = |k: &str| format!("{arch}.{k}");
    let as_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let mut kvs: Vec<(String, Kv)> = vec![
        ("general.architecture".into(), Kv::Str(arch.into())),
        (
            "general.name".into(),
            Kv::Str(
                model_dir
                    .file_name()
                    .map_or_else(|| arch.to_string(), |n| n.to_string_lossy().into_owned()),
            ),
        ),
        (
            "general.file_type".into(),
            Kv::U32(match outtype {
                GgufOutType::F16 => 1,
                GgufOutType::Q8_0 => 7,
            }),
        ),
        ("general.quantization_version".into(), Kv::U32(2)),
        (key("vocab_size"), Kv::U32(as_u32(c.vocab_size))),
        (
            key("context_length"),
            Kv::U32(as_u32(c.max_position_embeddings)),
        ),
        (key("embedding_length"), Kv::U32(as_u32(c.hidden_size))),
        (key("block_count"), Kv::U32(as_u32(c.num_layers))),
        (
            key("feed_forward_length"),
            Kv::U32(as_u32(c.intermediate_size)),
        ),
        (key("attention.head_count"), Kv::U32(as_u32(c.num_heads))),
        (
            key("attention.head_count_kv"),
            Kv::U32(as_u32(c.num_kv_heads)),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            Kv::F32(c.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), Kv::F32(c.rope.theta as f32)),
        (key("attention.key_length"), Kv::U32(as_u32(c.head_dim))),
        (key("attention.value_length"), Kv::U32(as_u32(c.head_dim))),
        (key("rope.dimension_count"), Kv::U32(as_u32(c.head_dim))),
    ];
    if let Some(factor) = linear {
        kvs.push((key("rope.scaling.type"), Kv::Str("linear".into())));
        kvs.push((key("rope.scaling.factor"), Kv::F32(factor as f32)));
    }
    if arch == "gemma3" {
        if let Some(local) = &c.rope_local {
            kvs.push((key("rope.freq_base_swa"), Kv::F32(local.theta as f32)));
        }
        if let Some(window) = c.sliding_window {
            kvs.push((key("attention.sliding_window"), Kv::U32(as_u32(window))));
            let sliding = (0..c.num_layers)
                .map(|i| c.layer_window(i).is_some())
                .collect();
            kvs.push((
                key("attention.sliding_window_pattern"),
                Kv::BoolArray(sliding),
            ));
        }
    }
    // As many tokens as the embedding has rows.
    let rows = index
        .entry("model.embed_tokens.weight")
        .and_then(|(_, e)| e.shape.first().copied())
        .unwrap_or(c.vocab_size);
    tokenizer_kvs(model_dir, rows, &mut kvs)?;

    let mut names: Vec<&str> = index.names();
    names.sort_unstable();
    // The file's tensors, their types and offsets, known from the shapes alone: the header is
    // written first, then each tensor converted and written in turn (one in memory at a time).
    let mut plan: Vec<Planned<'_>> = Vec::new();
    let mut end = 0u64;
    for name in names {
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if c.tie_word_embeddings && name == "lm_head.weight" {
            continue;
        }
        let g = gguf_name(name, layout.norms).ok_or_else(|| {
            ModelError::weights(
                index.root(),
                format!("tensor `{name}` has no llama.cpp counterpart"),
            )
        })?;
        let shape = index
            .entry(name)
            .map(|(_, e)| e.shape.clone())
            .unwrap_or_default();
        let cols = shape.last().copied().unwrap_or(1);
        let ggml_type = if shape.len() < 2 {
            GGML_F32
        } else if outtype == GgufOutType::Q8_0 && cols.is_multiple_of(32) {
            GGML_Q8_0
        } else {
            GGML_F16
        };
        place(&mut plan, &mut end, Some(name), g, shape, ggml_type);
    }
    if let Some(factors) = &rope_freqs {
        let shape = vec![factors.len()];
        place(
            &mut plan,
            &mut end,
            None,
            "rope_freqs.weight".into(),
            shape,
            GGML_F32,
        );
    }

    let mut header: Vec<u8> = Vec::new();
    header.extend(b"GGUF");
    header.extend(3u32.to_le_bytes());
    header.extend((plan.len() as u64).to_le_bytes());
    header.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in &kvs {
        put_kv(&mut header, k, v);
    }
    for t in &plan {
        put_str(&mut header, &t.name);
        header.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            header.extend((*d as u64).to_le_bytes());
        }
        header.extend(t.ggml_type.to_le_bytes());
        header.extend(t.offset.to_le_bytes());
    }
    header.resize(header.len().next_multiple_of(ALIGNMENT), 0);

    // A tensor's values as stored: norms shifted, Llama's q/k rows permuted.
    let values_of = |t: &Planned<'_>| -> Result<Vec<f32>> {
        let Some(name) = t.source else {
            return Ok(rope_freqs.clone().unwrap_or_default());
        };
        let tensor = index.tensor_data(name, &t.shape)?;
        let mut values: Vec<f32> = tensor
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| ModelError::weights(index.root(), format!("tensor `{name}`: {e:?}")))?;
        if layout.norm_shift != 0.0 && name.ends_with("norm.weight") {
            values.iter_mut().for_each(|v| *v += layout.norm_shift);
        }
        if layout.permute_qk && t.shape.len() == 2 {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            if t.name.ends_with("attn_q.weight") {
                values = permute_rows(&values, rows, cols, c.num_heads);
            } else if t.name.ends_with("attn_k.weight") {
                values = permute_rows(&values, rows, cols, c.num_kv_heads);
            }
        }
        Ok(values)
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    }
    let mut failed: Option<ModelError> = None;
    let written = train_fs::replace_with(out, |file| -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(file);
        w.write_all(&header)?;
        let mut at = 0u64;
        for t in &plan {
            let values = match values_of(t) {
                Ok(v) => v,
                Err(e) => {
                    failed = Some(e);
                    return Err(std::io::Error::other("a tensor could not be read"));
                }
            };
            let bytes = encode(&values, t.ggml_type);
            w.write_all(&vec![0u8; (t.offset - at) as usize])?;
            w.write_all(&bytes)?;
            at = t.offset + bytes.len() as u64;
        }
        w.write_all(&vec![0u8; (end - at) as usize])?;
        w.flush()
    });
    if let Err(e) = written {
        return Err(failed.unwrap_or_else(|| ModelError::io(out, e)));
    }
    Ok(GgufExport {
        path: out.to_path_buf(),
        architecture: arch.to_string(),
        tensors: plan.len(),
        bytes: header.len() as u64 + end,
        notes,
    })
}

/// One tensor of an exported file: the checkpoint tensor it comes from (`None`: the
/// `rope_freqs` factors), its GGUF name, shape, type and offset in the data section.
struct Planned<'a> {
    source: Option<&'a str>,
    name: String,
    shape: Vec<usize>,
    ggml_type: u32,
    offset: u64,
}

/// Appends a tensor to `plan` at the data section's `end` (aligned), which it moves on.
fn place<'a>(
    plan: &mut Vec<Planned<'a>>,
    end: &mut u64,
    source: Option<&'a str>,
    name: String,
    shape: Vec<usize>,
    ggml_type: u32,
) {
    let offset = *end;
    let n: usize = shape.iter().product();
    *end = (offset + stored_bytes(ggml_type, n)).next_multiple_of(ALIGNMENT as u64);
    plan.push(Planned {
        source,
        name,
        shape,
        ggml_type,
        offset,
    });
}

/// Bytes `n` values take as `ggml_type` (F32, F16, or Q8_0 blocks of 32 with an f16 scale).
fn stored_bytes(ggml_type: u32, n: usize) -> u64 {
    let n = n as u64;
    match ggml_type {
        GGML_F32 => 4 * n,
        GGML_Q8_0 => n / 32 * 34,
        _ => 2 * n,
    }
}

/// `values` stored as `ggml_type`.
fn encode(values: &[f32], ggml_type: u32) -> Vec<u8> {
    match ggml_type {
        GGML_F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GGML_Q8_0 => quantize_q8_0(values),
        _ => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_inverts_the_importers_unpermute() {
        let (rows, cols, heads) = (8, 3, 2);
        let data: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let there = permute_rows(&data, rows, cols, heads);
        assert_ne!(there, data);
        assert_eq!(crate::gguf::unpermute_rows(&there, rows, cols, heads), data);
    }

    #[test]
    fn names_invert_the_importers() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.bias",
            "model.layers.1.self_attn.q_norm.weight",
            "model.layers.2.mlp.down_proj.weight",
            "model.layers.2.post_attention_layernorm.weight",
        ] {
            for layout in crate::gguf::LAYOUTS {
                let g = gguf_name(hf, layout.norms).unwrap();
                assert_eq!(
                    crate::gguf::hf_name(&g, layout.norms).as_deref(),
                    Some(hf),
                    "{g}"
                );
            }
        }
        for layout in crate::gguf::LAYOUTS {
            assert!(gguf_name("model.layers.0.self_attn.sinks", layout.norms).is_none());
        }
    }

    #[test]
    fn a_hostile_block_count_is_refused_before_lists_are_built() {
        let mut file = b"GGUF".to_vec();
        file.extend(3u32.to_le_bytes());
        file.extend(0u64.to_le_bytes());
        let kvs = [
            ("general.architecture", Kv::Str("smollm3".into())),
            ("smollm3.embedding_length", Kv::U32(64)),
            ("smollm3.attention.head_count", Kv::U32(4)),
            ("smollm3.feed_forward_length", Kv::U32(128)),
            ("smollm3.block_count", Kv::U32(u32::MAX)),
            ("smollm3.context_length", Kv::U32(512)),
            ("smollm3.attention.layer_norm_rms_epsilon", Kv::F32(1e-6)),
            ("tokenizer.ggml.tokens", Kv::StrArray(vec!["a".into()])),
        ];
        file.extend((kvs.len() as u64).to_le_bytes());
        for (k, v) in &kvs {
            put_kv(&mut file, k, v);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostile.gguf");
        std::fs::write(&path, file).unwrap();
        let e = crate::gguf::convert_to_hf(&path, &dir.path().join("out"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("block_count"), "{e}");
    }

    #[test]
    fn q8_0_matches_gguf_py() {
        // gguf-py: d = max|x| / 127 (stored as f16), q = round-half-away(x / d).
        let mut block = vec![0f32; 32];
        block[0] = 127.0;
        block[1] = -63.5;
        block[2] = 0.5;
        let q = quantize_q8_0(&block);
        assert_eq!(q.len(), 34);
        let d = half::f16::from_le_bytes([q[0], q[1]]).to_f32();
        assert_eq!(d, 1.0);
        assert_eq!(q[2] as i8, 127);
        assert_eq!(q[3] as i8, -64, "-63.5 rounds away from zero");
        assert_eq!(q[4] as i8, 1, "0.5 rounds away from zero");
        assert!(quantize_q8_0(&[0.0; 32])[2..].iter().all(|&b| b == 0));
    }
}
