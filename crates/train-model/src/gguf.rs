//! Importing llama.cpp GGUF checkpoints as Hugging Face model directories.
//!
//! The reader validates every length and offset against the file size before it allocates, so
//! a hostile file gives an error, not a panic or a huge allocation. Supported tensor types:
//! F32, F16, BF16, Q8_0, Q4_0 and Q4_1 (dequantised to f32, exactly as `gguf-py` does).
//! Supported architectures: `llama` (whose q/k rows llama.cpp permuted for its rotary layout;
//! the permutation is undone here), `qwen2` and `qwen3`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::error::{ModelError, Result};
use crate::pretrained::{write_atomically, write_json};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MetaValue {
    /// Any unsigned integer type.
    UInt(u64),
    /// Any signed integer type.
    Int(i64),
    /// f32 or f64.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Self::UInt(v) => Some(*v),
            Self::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(v) => Some(*v),
            Self::UInt(v) => Some(*v as f64),
            Self::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone)]
pub(crate) struct GgufTensorInfo {
    /// GGUF name (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost first (ggml's `ne`).
    pub dims: Vec<u64>,
    /// ggml type id.
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file: metadata, tensor infos and the raw bytes.
pub(crate) struct GgufFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Key/value metadata.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor infos, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> ModelError {
        ModelError::weights(self.path, format!("GGUF: {what} (at byte {})", self.pos))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or_else(|| self.err("length overflow"))?;
        let s = self
            .bytes
            .get(self.pos..end)
            .ok_or_else(|| self.err("unexpected end of file"))?;
        self.pos = end;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self, min_item: usize) -> Result<usize> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| self.err("count too large"))?;
        // Every item needs at least `min_item` bytes: a count the file cannot hold is rejected
        // before anything is allocated for it.
        if n.saturating_mul(min_item.max(1)) > self.remaining() {
            return Err(self.err(&format!("count {n} exceeds the file size")));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len(1)?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::UInt(u64::from(self.u8()?)),
            1 => MetaValue::Int(i64::from(i8::from_le_bytes(self.arr()?))),
            2 => MetaValue::UInt(u64::from(u16::from_le_bytes(self.arr()?))),
            3 => MetaValue::Int(i64::from(i16::from_le_bytes(self.arr()?))),
            4 => MetaValue::UInt(u64::from(self.u32()?)),
            5 => MetaValue::Int(i64::from(i32::from_le_bytes(self.arr()?))),
            // The shortest decimal that round-trips the f32 (1e-5, not 9.999999747378752e-6).
            6 => {
                let v = f32::from_le_bytes(self.arr()?);
                MetaValue::Float(v.to_string().parse().unwrap_or(f64::from(v)))
            }
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let min = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(self.err(&format!("unknown metadata type {other}"))),
                };
                let n = self.len(min)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::UInt(self.u64()?),
            11 => MetaValue::Int(i64::from_le_bytes(self.arr()?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.arr()?)),
            other => return Err(self.err(&format!("unknown metadata type {other}"))),
        })
    }
}

/// (elements per block, bytes per block) of the ggml types we read.
fn block_layout(ggml_type: u32) -> Option<(usize, usize)> {
    match ggml_type {
        0 => Some((1, 4)),   // F32
        1 => Some((1, 2)),   // F16
        30 => Some((1, 2)),  // BF16
        2 => Some((32, 18)), // Q4_0
        3 => Some((32, 20)), // Q4_1
        8 => Some((32, 34)), // Q8_0
        _ => None,
    }
}

fn ggml_type_name(t: u32) -> String {
    match t {
        0 => "F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        6 => "Q5_0".into(),
        7 => "Q5_1".into(),
        8 => "Q8_0".into(),
        10..=15 => format!("K-quant type {t}"),
        30 => "BF16".into(),
        other => format!("type {other}"),
    }
}

impl GgufFile {
    /// Reads and validates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        if !meta.is_file() {
            return Err(ModelError::weights(path, "not a regular file"));
        }
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// Parses GGUF `bytes`; `path` is only used in messages.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let mut r = Reader {
            bytes: &bytes,
            pos: 0,
            path,
        };
        if r.take(4)? != b"GGUF" {
            return Err(r.err("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(&format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.len(24)?;
        let n_kv = r.len(12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.err(&format!("tensor {name}: {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(MetaValue::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let file = Self {
            path: path.to_path_buf(),
            bytes,
            metadata,
            tensors,
            data_start,
        };
        for t in &file.tensors {
            file.tensor_bytes(t)?;
        }
        Ok(file)
    }

    fn tensor_bytes(&self, t: &GgufTensorInfo) -> Result<&[u8]> {
        let (block, size) = block_layout(t.ggml_type).ok_or_else(|| {
            ModelError::weights(
                &self.path,
                format!(
                    "tensor {}: {} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)",
                    t.name,
                    ggml_type_name(t.ggml_type)
                ),
            )
        })?;
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                ModelError::weights(&self.path, format!("tensor {}: size overflows", t.name))
            })?;
        if n % block != 0 {
            return Err(ModelError::weights(
                &self.path,
                format!(
                    "tensor {}: {n} elements is not a whole number of blocks",
                    t.name
                ),
            ));
        }
        let len = (n / block).checked_mul(size);
        let start = usize::try_from(t.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start));
        let range = match (start, len) {
            (Some(s), Some(l)) => s.checked_add(l).map(|e| s..e),
            _ => None,
        };
        range.and_then(|r| self.bytes.get(r)).ok_or_else(|| {
            ModelError::weights(
                &self.path,
                format!("tensor {}: data lies outside the file", t.name),
            )
        })
    }

    /// The tensor's values as f32 (dequantised), innermost dimension fastest.
    pub fn dequantize(&self, t: &GgufTensorInfo) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(t)?;
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        Ok(match t.ggml_type {
            0 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            1 => bytes.chunks_exact(2).map(f16).collect(),
            30 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            2 => {
                let mut out = Vec::with_capacity(bytes.len() / 18 * 32);
                for b in bytes.chunks_exact(18) {
                    let d = f16(&b[0..2]);
                    let qs = &b[2..18];
                    out.extend(qs.iter().map(|q| d * (f32::from(q & 0x0F) - 8.0)));
                    out.extend(qs.iter().map(|q| d * (f32::from(q >> 4) - 8.0)));
                }
                out
            }
            3 => {
                let mut out = Vec::with_capacity(bytes.len() / 20 * 32);
                for b in bytes.chunks_exact(20) {
                    let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
                    let qs = &b[4..20];
                    out.extend(qs.iter().map(|q| d * f32::from(q & 0x0F) + m));
                    out.extend(qs.iter().map(|q| d * f32::from(q >> 4) + m));
                }
                out
            }
            8 => {
                let mut out = Vec::with_capacity(bytes.len() / 34 * 32);
                for b in bytes.chunks_exact(34) {
                    let d = f16(&b[0..2]);
                    out.extend(b[2..34].iter().map(|&q| d * f32::from(q as i8)));
                }
                out
            }
            other => {
                return Err(ModelError::weights(
                    &self.path,
                    format!("tensor {}: {}", t.name, ggml_type_name(other)),
                ));
            }
        })
    }

    fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key).and_then(MetaValue::as_u64).ok_or_else(|| {
            ModelError::weights(
                &self.path,
                format!("GGUF metadata `{key}` missing or not an integer"),
            )
        })
    }

    fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta(key).and_then(MetaValue::as_f64).ok_or_else(|| {
            ModelError::weights(
                &self.path,
                format!("GGUF metadata `{key}` missing or not a number"),
            )
        })
    }

    fn meta_str_array(&self, key: &str) -> Result<Vec<&str>> {
        match self.meta(key) {
            Some(MetaValue::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        ModelError::weights(
                            &self.path,
                            format!("GGUF metadata `{key}` holds a non-string"),
                        )
                    })
                })
                .collect(),
            _ => Err(ModelError::weights(
                &self.path,
                format!("GGUF metadata `{key}` missing or not an array"),
            )),
        }
    }
}

/// What [`convert_to_hf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufImport {
    /// The output directory.
    pub dir: PathBuf,
    /// `model_type` of the checkpoint.
    pub model_type: String,
    /// Number of tensors written.
    pub tensors: usize,
}

/// Inverse of llama.cpp's `permute` of q/k rows: GGUF row `h*hd + 2i + j` is Hugging Face row
/// `h*hd + j*hd/2 + i`.
pub(crate) fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Per-layer projections and q/k norms, the same in every family: (Hugging Face name,
/// llama.cpp name). The exporter maps the other way.
const PROJECTIONS: &[(&str, &str)] = &[
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// The layer norms of the Llama-like families (Llama, Mistral, Qwen2, Qwen3, SmolLM3).
pub(crate) const LLAMA_NORMS: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// OLMo 2's layer norms come after attention and the MLP, and llama.cpp names them so
/// (`post_attention_layernorm` is `post_attention_norm` here, not Llama's `ffn_norm`).
pub(crate) const OLMO2_NORMS: &[(&str, &str)] = &[
    ("post_attention_layernorm", "post_attention_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// Gemma 3's layer norms: before and after attention and the MLP each.
pub(crate) const GEMMA3_NORMS: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

/// A layer's modules under `norms`: its norms, then [`PROJECTIONS`].
pub(crate) fn layer_modules(
    norms: &'static [(&'static str, &'static str)],
) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    norms.iter().chain(PROJECTIONS)
}

/// How a family is stored in a llama.cpp GGUF file, shared by the importer and the exporter
/// (as llama.cpp's `convert_hf_to_gguf.py` writes it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GgufLayout {
    /// `general.architecture`.
    pub arch: &'static str,
    /// The Hugging Face `model_type` it reads back as.
    pub model_type: &'static str,
    /// Its `architectures[0]`.
    pub hf_class: &'static str,
    /// q/k rows are permuted into llama.cpp's rotary layout (the Llama-derived converters).
    pub permute_qk: bool,
    /// Per-layer norm names (the projections are [`PROJECTIONS`] in every family).
    pub norms: &'static [(&'static str, &'static str)],
    /// Added to every norm weight in the file (Gemma: 1, llama.cpp stores `1 + w`).
    pub norm_shift: f32,
}

/// Every layout the importer reads (and the exporter writes).
pub(crate) const LAYOUTS: &[GgufLayout] = &[
    GgufLayout {
        arch: "llama",
        model_type: "llama",
        hf_class: "LlamaForCausalLM",
        permute_qk: true,
        norms: LLAMA_NORMS,
        norm_shift: 0.0,
    },
    GgufLayout {
        arch: "qwen2",
        model_type: "qwen2",
        hf_class: "Qwen2ForCausalLM",
        permute_qk: false,
        norms: LLAMA_NORMS,
        norm_shift: 0.0,
    },
    GgufLayout {
        arch: "qwen3",
        model_type: "qwen3",
        hf_class: "Qwen3ForCausalLM",
        permute_qk: false,
        norms: LLAMA_NORMS,
        norm_shift: 0.0,
    },
    GgufLayout {
        arch: "olmo2",
        model_type: "olmo2",
        hf_class: "Olmo2ForCausalLM",
        permute_qk: false,
        norms: OLMO2_NORMS,
        norm_shift: 0.0,
    },
    GgufLayout {
        arch: "smollm3",
        model_type: "smollm3",
        hf_class: "SmolLM3ForCausalLM",
        permute_qk: true,
        norms: LLAMA_NORMS,
        norm_shift: 0.0,
    },
    GgufLayout {
        arch: "gemma3",
        model_type: "gemma3_text",
        hf_class: "Gemma3ForCausalLM",
        permute_qk: false,
        norms: GEMMA3_NORMS,
        norm_shift: 1.0,
    },
];

/// The factors llama.cpp's `rope_freqs` tensor holds for Llama 3's RoPE scaling, as
/// `convert_hf_to_gguf.py` computes them (in f32): each frequency of a `dim`-wide head is
/// divided by its factor.
pub(crate) fn llama3_rope_factors(
    base: f64,
    dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f32> {
    let (factor, low, high, original) = (factor as f32, low as f32, high as f32, original as f32);
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / (base as f32).powf((2 * i) as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Llama 3 RoPE parameters (factor, low and high frequency factors, original context) that
/// give `factors` (a `rope_freqs` tensor), or `None` when no such parameters reproduce them
/// within 1e-4. Only the smooth band's line is determined by the tensor, so the low factor, the
/// high factor and the original context are one representative of the parameters giving it.
pub(crate) fn llama3_from_factors(factors: &[f32], base: f64, dim: usize) -> Option<[f64; 4]> {
    let factor = f64::from(factors.iter().copied().fold(1.0f32, f32::max));
    if factors.len() != dim / 2 || factor <= 1.0 + 1e-6 {
        return None;
    }
    let inv_wavelen = |i: usize| {
        let freq = 1.0 / base.powf((2 * i) as f64 / dim as f64);
        freq / (2.0 * std::f64::consts::PI)
    };
    // smooth = A / wavelen − B in the band between; fit it by least squares.
    let points: Vec<(f64, f64)> = factors
        .iter()
        .enumerate()
        .filter(|(_, r)| f64::from(**r) > 1.0 + 1e-6 && f64::from(**r) < factor - 1e-6)
        .map(|(i, r)| {
            let s = (1.0 / f64::from(*r) - 1.0 / factor) / (1.0 - 1.0 / factor);
            (inv_wavelen(i), s)
        })
        .collect();
    let (a, b) = if points.len() >= 2 {
        let n = points.len() as f64;
        let (sx, sy) = points
            .iter()
            .fold((0.0, 0.0), |(x, y), p| (x + p.0, y + p.1));
        let (mx, my) = (sx / n, sy / n);
        let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let a = sxy / sxx;
        (a, a * mx - my)
    } else {
        // No band between: put its edges between the last unscaled and first scaled frequency.
        let last_one = factors.iter().rposition(|r| f64::from(*r) <= 1.0 + 1e-6)?;
        let first_scaled = factors
            .iter()
            .position(|r| f64::from(*r) >= factor - 1e-6)?;
        let (hi, lo) = (inv_wavelen(last_one), inv_wavelen(first_scaled));
        let a = 1.0 / (hi - lo);
        (a, a * lo)
    };
    // low = B, high = B + 1, original = A.
    let params = [factor, b, b + 1.0, a];
    let again = llama3_rope_factors(base, dim, params[0], params[1], params[2], params[3]);
    let fits = b > 0.0
        && a.is_finite()
        && again
            .iter()
            .zip(factors)
            .all(|(x, y)| (x - y).abs() <= 1e-4 * y.abs().max(1.0));
    fits.then_some(params)
}

/// The attention scale llama.cpp's Gemma 3 uses, as `query_pre_attn_scalar`: the head width,
/// or for the 62-layer (27B) model the residual width over the heads.
pub(crate) fn gemma3_query_scalar(
    layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
) -> usize {
    if layers == 62 {
        hidden / heads.max(1)
    } else {
        head_dim
    }
}

/// The layout of a GGUF `general.architecture`.
pub(crate) fn layout(arch: &str) -> Option<GgufLayout> {
    LAYOUTS.iter().find(|l| l.arch == arch).copied()
}

/// llama.cpp's SmolLM3 leaves the rotary embedding out of every fourth layer (its
/// `n_no_rope_layer_step`, fixed at 4; not read from the file).
pub(crate) const SMOLLM3_NO_ROPE_STEP: usize = 4;

/// Whether SmolLM3 layer `i` applies the rotary embedding in llama.cpp.
pub(crate) fn smollm3_rope_layer(i: usize) -> bool {
    !(i + 1).is_multiple_of(SMOLLM3_NO_ROPE_STEP)
}

pub(crate) fn hf_name(
    gguf: &str,
    norms: &'static [(&'static str, &'static str)],
) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = leaf.rsplit_once('.')?;
    let hf = layer_modules(norms)
        .find(|(_, g)| *g == module)
        .map(|(hf, _)| *hf)?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Converts a GGUF checkpoint into a Hugging Face directory (`config.json`,
/// `model.safetensors` in f32, `tokenizer.json`, `tokenizer_config.json`,
/// `generation_config.json`).
pub fn convert_to_hf(gguf_path: &Path, out_dir: &Path) -> Result<GgufImport> {
    let g = GgufFile::open(gguf_path)?;
    let arch = g
        .meta("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| {
            ModelError::weights(gguf_path, "GGUF metadata `general.architecture` missing")
        })?
        .to_string();
    let Some(layout) = layout(&arch) else {
        let names: Vec<&str> = LAYOUTS.iter().map(|l| l.arch).collect();
        return Err(ModelError::UnsupportedArchitecture {
            path: gguf_path.to_path_buf(),
            model_type: arch,
            hint: format!(" for GGUF import (supported: {})", names.join(", ")),
        });
    };
    let model_type = layout.model_type.to_string();
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = g.meta_u64(&key("embedding_length"))?;
    let heads = g.meta_u64(&key("attention.head_count"))?;
    let kv_heads = g
        .meta(&key("attention.head_count_kv"))
        .and_then(MetaValue::as_u64)
        .unwrap_or(heads);
    if heads == 0 || kv_heads == 0 {
        return Err(ModelError::weights(
            gguf_path,
            "GGUF head counts must be positive",
        ));
    }
    let head_dim = g
        .meta(&key("attention.key_length"))
        .and_then(MetaValue::as_u64)
        .unwrap_or(hidden / heads);
    let tokens = g.meta_str_array("tokenizer.ggml.tokens")?;
    let vocab = g
        .meta(&key("vocab_size"))
        .and_then(MetaValue::as_u64)
        .unwrap_or(tokens.len() as u64);
    let tied = !g.tensors.iter().any(|t| t.name == "output.weight");
    let scaling = g
        .meta(&key("rope.scaling.type"))
        .and_then(MetaValue::as_str)
        .unwrap_or("none");
    let rope_scaling = match scaling {
        "none" => Value::Null,
        // Position interpolation: every frequency divided by the factor.
        "linear" => json!({"rope_type": "linear",
            "factor": g.meta(&key("rope.scaling.factor")).and_then(MetaValue::as_f64).unwrap_or(1.0)}),
        other => {
            return Err(ModelError::weights(
                gguf_path,
                format!("GGUF RoPE scaling `{other}` is not supported by the importer"),
            ));
        }
    };
    // Llama 3's scaling, as llama.cpp's per-frequency `rope_freqs` factors.
    let mut rope_scaling = rope_scaling;
    if let Some(t) = g.tensors.iter().find(|t| t.name == "rope_freqs.weight") {
        let base = g
            .meta(&key("rope.freq_base"))
            .and_then(MetaValue::as_f64)
            .unwrap_or(10_000.0);
        let dim = g
            .meta(&key("rope.dimension_count"))
            .and_then(MetaValue::as_u64)
            .unwrap_or(head_dim) as usize;
        let factors = g.dequantize(t)?;
        let [factor, low, high, original] = llama3_from_factors(&factors, base, dim)
            .filter(|_| rope_scaling.is_null())
            .ok_or_else(|| {
                ModelError::weights(
                    gguf_path,
                    "GGUF `rope_freqs` that do not follow Llama 3's RoPE scaling are not \
                     supported by the importer",
                )
            })?;
        rope_scaling = json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original});
    }
    let token_id = |k: &str| g.meta(k).and_then(MetaValue::as_u64);
    let bos = token_id("tokenizer.ggml.bos_token_id");
    let eos = token_id("tokenizer.ggml.eos_token_id");
    let pad = token_id("tokenizer.ggml.padding_token_id");
    let unk = token_id("tokenizer.ggml.unknown_token_id");
    let mut config = json!({
        "architectures": [layout.hf_class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g.meta_u64(&key("feed_forward_length"))?,
        "num_hidden_layers": g.meta_u64(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": g.meta_u64(&key("context_length"))?,
        "rms_norm_eps": g.meta_f64(&key("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": g.meta(&key("rope.freq_base")).and_then(MetaValue::as_f64).unwrap_or(10_000.0),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": true,
    });
    let layers = g.meta_u64(&key("block_count"))?;
    // Per-layer lists are built from it below, before the config is checked.
    if layers > 1 << 12 {
        return Err(ModelError::weights(
            gguf_path,
            format!("GGUF `{arch}.block_count` {layers} is larger than any supported model"),
        ));
    }
    if let Value::Object(m) = &mut config {
        if matches!(arch.as_str(), "llama" | "olmo2" | "smollm3") {
            // Written only when present: llama.cpp's q/k/v biases.
            let biased = g.tensors.iter().any(|t| t.name.ends_with("attn_q.bias"));
            m.insert("attention_bias".into(), Value::Bool(biased));
            m.insert("mlp_bias".into(), Value::Bool(false));
        }
        if arch == "gemma3" {
            let layers = layers as usize;
            // The per-layer pattern (written by train-rs), or llama.cpp's default: every
            // sixth layer global.
            let sliding: Vec<bool> = match g.meta(&key("attention.sliding_window_pattern")) {
                Some(MetaValue::Array(v)) => v
                    .iter()
                    .map(|x| matches!(x, MetaValue::Bool(true)))
                    .collect(),
                Some(MetaValue::UInt(n)) if *n > 0 => {
                    (0..layers).map(|i| (i + 1) % (*n as usize) != 0).collect()
                }
                _ => (0..layers).map(|i| (i + 1) % 6 != 0).collect(),
            };
            let window = g
                .meta(&key("attention.sliding_window"))
                .and_then(MetaValue::as_u64);
            let types: Vec<&str> = sliding
                .iter()
                .map(|&s| {
                    if s && window.is_some() {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            m.remove("hidden_act");
            m.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            m.insert("attention_bias".into(), Value::Bool(false));
            m.insert(
                "query_pre_attn_scalar".into(),
                json!(gemma3_query_scalar(
                    layers,
                    hidden as usize,
                    heads as usize,
                    head_dim as usize
                )),
            );
            m.insert("sliding_window".into(), json!(window));
            m.insert("layer_types".into(), json!(types));
            m.insert(
                "rope_local_base_freq".into(),
                json!(
                    g.meta(&key("rope.freq_base_swa"))
                        .and_then(MetaValue::as_f64)
                        .unwrap_or(10_000.0)
                ),
            );
            m.insert("final_logit_softcapping".into(), Value::Null);
            m.insert("attn_logit_softcapping".into(), Value::Null);
        }
        if arch == "smollm3" {
            let no_rope: Vec<u8> = (0..layers as usize)
                .map(|i| u8::from(smollm3_rope_layer(i)))
                .collect();
            m.insert("no_rope_layers".into(), json!(no_rope));
            m.insert("no_rope_layer_interval".into(), json!(SMOLLM3_NO_ROPE_STEP));
            m.insert("use_sliding_window".into(), Value::Bool(false));
        }
    }
    // Check the config before converting gigabytes of weights.
    crate::config::ModelConfig::from_json(&out_dir.join("config.json"), &config)?;

    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" {
            continue;
        }
        let name = hf_name(&t.name, layout.norms).ok_or_else(|| {
            ModelError::weights(
                gguf_path,
                format!("tensor `{}` has no Hugging Face counterpart", t.name),
            )
        })?;
        let mut values = g.dequantize(t)?;
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if layout.permute_qk && shape.len() == 2 {
            let (rows, cols) = (shape[0], shape[1]);
            if t.name.ends_with("attn_q.weight") {
                values = unpermute_rows(&values, rows, cols, heads as usize);
            } else if t.name.ends_with("attn_k.weight") {
                values = unpermute_rows(&values, rows, cols, kv_heads as usize);
            }
        }
        if layout.norm_shift != 0.0 && t.name.ends_with("norm.weight") {
            values.iter_mut().for_each(|v| *v -= layout.norm_shift);
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.push((name, shape, bytes));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| ModelError::io(out_dir, e))?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::weights(gguf_path, format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let weights = out_dir.join("model.safetensors");
    let bytes = safetensors::serialize(
        views,
        Some([("format".to_string(), "pt".to_string())].into()),
    )
    .map_err(|e| ModelError::weights(&weights, e.to_string()))?;
    write_atomically(&weights, &bytes)?;
    write_json(&out_dir.join("config.json"), &config)?;

    let tokenizer = tokenizer_json(&g, &tokens)?;
    write_json(&out_dir.join("tokenizer.json"), &tokenizer)?;
    let name_of =
        |id: Option<u64>| id.and_then(|i| tokens.get(i as usize).map(|s| (*s).to_string()));
    let mut tok_cfg = json!({
        "add_bos_token": matches!(g.meta("tokenizer.ggml.add_bos_token"), Some(MetaValue::Bool(true))),
        "add_prefix_space": false,
        "bos_token": name_of(bos),
        "eos_token": name_of(eos),
        "pad_token": name_of(pad),
        "unk_token": name_of(unk),
        "clean_up_tokenization_spaces": false,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let (Some(t), Value::Object(m)) = (
        g.meta("tokenizer.chat_template")
            .and_then(MetaValue::as_str),
        &mut tok_cfg,
    ) {
        m.insert("chat_template".into(), Value::from(t));
    }
    write_json(&out_dir.join("tokenizer_config.json"), &tok_cfg)?;
    write_json(
        &out_dir.join("generation_config.json"),
        &json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}),
    )?;
    Ok(GgufImport {
        dir: out_dir.to_path_buf(),
        model_type,
        tensors: tensors.len(),
    })
}

/// Rebuilds a Hugging Face `tokenizer.json` from the GGUF tokenizer metadata (byte-level BPE).
fn tokenizer_json(g: &GgufFile, tokens: &[&str]) -> Result<Value> {
    let model = g
        .meta("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .unwrap_or("");
    let types: Vec<i64> = match g.meta("tokenizer.ggml.token_type") {
        Some(MetaValue::Array(v)) => v
            .iter()
            .map(|x| match x {
                MetaValue::Int(i) => *i,
                MetaValue::UInt(u) => *u as i64,
                _ => 1,
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let bos = g
        .meta("tokenizer.ggml.bos_token_id")
        .and_then(MetaValue::as_u64)
        .and_then(|i| tokens.get(i as usize))
        .filter(|_| {
            matches!(
                g.meta("tokenizer.ggml.add_bos_token"),
                Some(MetaValue::Bool(true))
            )
        });
    // Encoding starts with BOS when the file says so (Llama 3, Mistral).
    let with_bos = |other: Value| match bos {
        Some(b) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {*b: {"id": b, "ids": [tokens.iter().position(|t| t == b)], "tokens": [b]}}}),
        None => other,
    };
    match model {
        "gpt2" => {}
        "llama" => return sentencepiece_json(g, tokens, &types, &with_bos(Value::Null)),
        _ => {
            return Err(ModelError::weights(
                &g.path,
                format!(
                    "GGUF tokenizer model `{model}` is not supported (byte-level BPE `gpt2`, \
                     or SentencePiece-style `llama`)"
                ),
            ));
        }
    }
    let merges = g.meta_str_array("tokenizer.ggml.merges")?;
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), Value::from(i));
    }
    // Control (3) and user-defined (4) tokens are added tokens in Hugging Face terms.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types.get(i) == Some(&3)})
        })
        .collect();
    let pre = g
        .meta("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "default" | "gpt-2" | "gpt2" => byte_level,
        // Qwen2's and Llama 3's regexes (the latter groups digits by up to three), each then
        // byte-level without its own regex, as their tokenizer.json files write them.
        "qwen2" | "llama-bpe" => {
            let digits = if pre == "qwen2" {
                r"\p{N}"
            } else {
                r"\p{N}{1,3}"
            };
            let regex = format!(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            );
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
        }
        other => {
            return Err(ModelError::weights(
                &g.path,
                format!("GGUF pre-tokenizer `{other}` is not supported by the importer"),
            ));
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": with_bos(json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

/// Longest piece (bytes) whose merges the importer rebuilds; longer pieces (none in published
/// SentencePiece vocabularies) are only reachable whole, as added tokens are.
const MAX_MERGED_PIECE: usize = 256;

/// Most merges rebuilt from a SentencePiece-style vocabulary (Gemma 3's 262k pieces give well
/// under a million); bounds what a hostile file can make the importer allocate.
const MAX_MERGES: usize = 1 << 22;

/// A `tokenizer.json` for llama.cpp's SentencePiece-style vocabulary (`llama`): BPE with byte
/// fallback over `▁`-marked pieces, its merges rebuilt from the scores as `tokenizers`'
/// SentencePiece converter does (every split of a piece into two pieces of the vocabulary, by
/// the piece's score, highest first).
fn sentencepiece_json(
    g: &GgufFile,
    tokens: &[&str],
    types: &[i64],
    post_processor: &Value,
) -> Result<Value> {
    let scores: Vec<f64> = match g.meta("tokenizer.ggml.scores") {
        Some(MetaValue::Array(v)) => v.iter().map(|x| x.as_f64().unwrap_or(0.0)).collect(),
        _ => vec![0.0; tokens.len()],
    };
    let kind = |i: usize| types.get(i).copied().unwrap_or(1);
    let mut index = std::collections::HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        index.entry(*t).or_insert(i);
    }
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    // Normal and user-defined pieces merge (llama.cpp merges any adjacent pair whose
    // concatenation is in the vocabulary; Gemma's runs of `▁` are user-defined).
    let merges_into = |i: usize| matches!(kind(i), 1 | 4);
    for (i, t) in tokens.iter().enumerate() {
        if !merges_into(i) || t.len() > MAX_MERGED_PIECE {
            continue;
        }
        for (k, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(k);
            if let (Some(&l), Some(&r)) = (index.get(a), index.get(b))
                && merges_into(l)
                && merges_into(r)
            {
                merges.push((scores.get(i).copied().unwrap_or(0.0), i, l, r));
                if merges.len() > MAX_MERGES {
                    return Err(ModelError::weights(
                        &g.path,
                        format!(
                            "GGUF vocabulary splits into more than {MAX_MERGES} merges (a \
                             published one has far fewer)"
                        ),
                    ));
                }
            }
        }
    }
    merges.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then((x.1, x.2, x.3).cmp(&(y.1, y.2, y.3)))
    });
    let merges: Vec<Value> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([tokens[l], tokens[r]]))
        .collect();
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry((*t).to_string()).or_insert(Value::from(i));
    }
    let unk = tokens
        .iter()
        .enumerate()
        .find(|(i, _)| kind(*i) == 2)
        .map(|(_, t)| *t);
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(kind(*i), 2..=4))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": kind(i) != 4})
        })
        .collect();
    // llama.cpp's default for this vocabulary is to prepend a space.
    let prepend = !matches!(
        g.meta("tokenizer.ggml.add_space_prefix"),
        Some(MetaValue::Bool(false))
    );
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if prepend {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prepend {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: reshape(heads, 2, hd/2, cols).swapaxes(1, 2)
        let (heads, hd, cols) = (2, 4, 3);
        let rows = heads * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + j * (hd / 2) + i;
                    let dst = h * hd + i * 2 + j;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&permuted, rows, cols, heads), hf);
    }

    #[test]
    fn llama3_rope_factors_come_back_as_parameters() {
        // Llama 3.1 8B, the fixture's short-context variant, and a band with one point.
        for (base, dim, params) in [
            (500_000.0, 128, [8.0, 1.0, 4.0, 8192.0]),
            (500_000.0, 16, [8.0, 1.0, 4.0, 32.0]),
            (10_000.0, 64, [4.0, 2.0, 3.0, 4096.0]),
        ] {
            let [f, l, h, o] = params;
            let factors = llama3_rope_factors(base, dim, f, l, h, o);
            let [f2, l2, h2, o2] = llama3_from_factors(&factors, base, dim).unwrap();
            let again = llama3_rope_factors(base, dim, f2, l2, h2, o2);
            for (a, b) in again.iter().zip(&factors) {
                assert!((a - b).abs() <= 1e-4 * b.abs(), "{params:?}: {a} vs {b}");
            }
            assert_eq!(f2, f);
        }
        // Factors no Llama 3 parameters give, and none at all.
        assert!(llama3_from_factors(&[1.0, 3.0, 1.0, 3.0], 10_000.0, 8).is_none());
        assert!(llama3_from_factors(&[1.0; 4], 10_000.0, 8).is_none());
        assert!(llama3_from_factors(&[2.0; 3], 10_000.0, 8).is_none());
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight", LLAMA_NORMS).unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight", LLAMA_NORMS).unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight", LLAMA_NORMS).unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight", LLAMA_NORMS).is_none());
        assert_eq!(
            hf_name("blk.1.post_attention_norm.weight", OLMO2_NORMS).unwrap(),
            "model.layers.1.post_attention_layernorm.weight"
        );
        assert!(hf_name("blk.1.post_attention_norm.weight", LLAMA_NORMS).is_none());
    }

    #[test]
    fn hostile_headers_are_errors() {
        let p = Path::new("x.gguf");
        assert!(GgufFile::parse(p, b"GGML".to_vec()).is_err());
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes()); // tensor count the file cannot hold
        b.extend(0u64.to_le_bytes());
        let e = GgufFile::parse(p, b).unwrap_err().to_string();
        assert!(e.contains("count") || e.contains("end of file"), "{e}");
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(5u64.to_le_bytes());
        b.extend(b"key");
        let e = GgufFile::parse(p, b).unwrap_err().to_string();
        assert!(e.contains("end of file") || e.contains("exceeds"), "{e}");
    }

    #[test]
    fn q4_1_and_q8_0_dequantise_per_block() {
        let p = Path::new("t.gguf");
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(2u64.to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        for (name, ty, off) in [("a", 3u32, 0u64), ("b", 8u32, 32u64)] {
            bytes.extend((name.len() as u64).to_le_bytes());
            bytes.extend(name.as_bytes());
            bytes.extend(1u32.to_le_bytes());
            bytes.extend(32u64.to_le_bytes());
            bytes.extend(ty.to_le_bytes());
            bytes.extend(off.to_le_bytes());
        }
        while !bytes.len().is_multiple_of(32) {
            bytes.push(0);
        }
        // Q4_1: d = 0.5, m = -1, nibbles 0..15 low, 15..0 high.
        bytes.extend(half::f16::from_f32(0.5).to_le_bytes());
        bytes.extend(half::f16::from_f32(-1.0).to_le_bytes());
        bytes.extend((0u8..16).map(|i| i | ((15 - i) << 4)));
        bytes.extend([0u8; 12]); // pad to the next tensor's 32-byte offset
        // Q8_0: d = 0.25, q = -16..16.
        bytes.extend(half::f16::from_f32(0.25).to_le_bytes());
        bytes.extend((-16i8..16).map(|q| q as u8));
        let g = GgufFile::parse(p, bytes).unwrap();
        let a = g.dequantize(&g.tensors[0]).unwrap();
        assert_eq!(a[0], -1.0);
        assert_eq!(a[3], 0.5);
        assert_eq!(a[16], 6.5);
        let b = g.dequantize(&g.tensors[1]).unwrap();
        assert_eq!(b[0], -4.0);
        assert_eq!(b[31], 3.75);
    }
}
