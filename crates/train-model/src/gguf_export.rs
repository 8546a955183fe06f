//! Exporting a Hugging Face model directory as a llama.cpp GGUF file (`train export --format
//! gguf`): the inverse of [`convert_to_hf`](crate::gguf::convert_to_hf).
//!
//! - Families: `llama` (SmolLM2, Llama), `qwen2`, `qwen3` — those whose GGUF layout the
//!   importer reads back; the others are refused by name.
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
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
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
            out.extend(9u32.to_le_bytes());
            out.extend(8u32.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for s in items {
                put_str(out, s);
            }
        }
        Kv::I32Array(items) => {
            out.extend(9u32.to_le_bytes());
            out.extend(5u32.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for x in items {
                out.extend(x.to_le_bytes());
            }
        }
    }
}

/// llama.cpp's name of a Hugging Face tensor (the inverse of the importer's mapping).
fn gguf_name(hf: &str) -> Option<String> {
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
    let g = crate::gguf::LAYER_MODULES
        .iter()
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

/// The tokenizer metadata of a `tokenizer.json` (byte-level BPE only).
fn tokenizer_kvs(dir: &Path, out: &mut Vec<(String, Kv)>) -> Result<()> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let tok: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let model = &tok["model"];
    if model["type"] != "BPE" {
        return Err(ModelError::weights(
            &path,
            "GGUF export writes byte-level BPE tokenizers only (`model.type` is not BPE)",
        ));
    }
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
    for (token, id) in vocab {
        if let Some(id) = id.as_u64() {
            set(id as usize, token, 1);
        }
    }
    for added in tok["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) {
            let kind = if added["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
            set(id as usize, content, kind);
        }
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
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), 5)))
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
    let cfg: Value = std::fs::read_to_string(&config_path)
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
    out.push(("tokenizer.ggml.model".into(), Kv::Str("gpt2".into())));
    out.push(("tokenizer.ggml.pre".into(), Kv::Str(pre.into())));
    out.push(("tokenizer.ggml.tokens".into(), Kv::StrArray(tokens)));
    out.push(("tokenizer.ggml.token_type".into(), Kv::I32Array(types)));
    out.push(("tokenizer.ggml.merges".into(), Kv::StrArray(merges)));
    for (name, id) in ids {
        out.push((name.into(), Kv::U32(id)));
    }
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        Kv::Bool(cfg["add_bos_token"].as_bool().unwrap_or(false)),
    ));
    let template = std::fs::read_to_string(dir.join("chat_template.jinja"))
        .ok()
        .or_else(|| cfg["chat_template"].as_str().map(str::to_string));
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), Kv::Str(t)));
    }
    Ok(())
}

/// Writes the model in `model_dir` as a GGUF file at `out` (replaced atomically).
pub fn export_gguf(model_dir: &Path, out: &Path, outtype: GgufOutType) -> Result<GgufExport> {
    let config_path = model_dir.join("config.json");
    let (config, _raw) = ModelConfig::from_file(&config_path)?;
    let arch = match config.architecture {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
        other => {
            return Err(ModelError::UnsupportedArchitecture {
                path: config_path,
                model_type: other.model_type().to_string(),
                hint: " for GGUF export (supported: llama, qwen2, qwen3)".into(),
            });
        }
    };
    if !matches!(config.rope.scaling, RopeScaling::Default) {
        return Err(ModelError::weights(
            &config_path,
            "RoPE scaling (`rope_scaling`) is not written to GGUF by this exporter",
        ));
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
    tokenizer_kvs(model_dir, &mut kvs)?;

    let index = WeightIndex::open_dir(model_dir)?;
    let mut names: Vec<&str> = index.names();
    names.sort_unstable();
    let mut infos: Vec<u8> = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut count = 0usize;
    for name in names {
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        if c.tie_word_embeddings && name == "lm_head.weight" {
            continue;
        }
        let g = gguf_name(name).ok_or_else(|| {
            ModelError::weights(
                index.root(),
                format!("tensor `{name}` has no llama.cpp counterpart"),
            )
        })?;
        let shape = index
            .entry(name)
            .map(|(_, e)| e.shape.clone())
            .unwrap_or_default();
        let tensor = index.tensor_data(name, &shape)?;
        let mut values: Vec<f32> = tensor
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| ModelError::weights(index.root(), format!("tensor `{name}`: {e:?}")))?;
        if arch == "llama" && shape.len() == 2 {
            let (rows, cols) = (shape[0], shape[1]);
            if g.ends_with("attn_q.weight") {
                values = permute_rows(&values, rows, cols, c.num_heads);
            } else if g.ends_with("attn_k.weight") {
                values = permute_rows(&values, rows, cols, c.num_kv_heads);
            }
        }
        let cols = shape.last().copied().unwrap_or(1);
        let (ggml_type, bytes): (u32, Vec<u8>) = if shape.len() < 2 {
            (
                GGML_F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        } else if outtype == GgufOutType::Q8_0 && cols.is_multiple_of(32) {
            (GGML_Q8_0, quantize_q8_0(&values))
        } else {
            (
                GGML_F16,
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            )
        };
        put_str(&mut infos, &g);
        infos.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            infos.extend((*d as u64).to_le_bytes());
        }
        infos.extend(ggml_type.to_le_bytes());
        infos.extend((data.len() as u64).to_le_bytes());
        data.extend(&bytes);
        data.resize(data.len().next_multiple_of(ALIGNMENT), 0);
        count += 1;
    }

    let mut file: Vec<u8> = Vec::with_capacity(data.len() + infos.len() + (1 << 20));
    file.extend(b"GGUF");
    file.extend(3u32.to_le_bytes());
    file.extend((count as u64).to_le_bytes());
    file.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in &kvs {
        put_kv(&mut file, k, v);
    }
    file.extend(&infos);
    file.resize(file.len().next_multiple_of(ALIGNMENT), 0);
    file.extend(&data);
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    }
    let tmp = out.with_extension("gguf.partial");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&file)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, out));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(ModelError::io(out, e));
    }
    Ok(GgufExport {
        path: out.to_path_buf(),
        architecture: arch.to_string(),
        tensors: count,
        bytes: file.len() as u64,
    })
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
            let g = gguf_name(hf).unwrap();
            assert_eq!(crate::gguf::hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert!(gguf_name("model.layers.0.self_attn.sinks").is_none());
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
