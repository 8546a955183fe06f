//! Helpers shared by the integration tests: fixture paths and reference tensors.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use train_model::{SafetensorsFile, WeightIndex};

/// The families of the fixture models (each with its transformers reference).
pub const ARCHES: &[&str] = &[
    "qwen3",
    "qwen2",
    "llama",
    "mistral",
    "ministral",
    "olmo2",
    "smollm3",
    "gemma3",
    "phi3",
    "qwen3_moe",
];

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// A reference tensor as f32 (floats) or i64 (ids), with its shape.
#[derive(Debug, Clone)]
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

pub struct Reference {
    pub tensors: HashMap<String, RefTensor>,
    pub meta: serde_json::Value,
}

impl Reference {
    pub fn load(arch: &str) -> Self {
        let dir = fixtures();
        let file =
            SafetensorsFile::open(&dir.join(format!("{arch}.reference.safetensors"))).unwrap();
        let mut tensors = HashMap::new();
        for (name, entry) in file.entries() {
            let bytes = file.bytes(name).unwrap();
            let mut t = RefTensor {
                shape: entry.shape.clone(),
                f32: vec![],
                i64: vec![],
            };
            match entry.dtype {
                Dtype::F32 => {
                    t.f32 = bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                }
                Dtype::I64 => {
                    t.i64 = bytes
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                }
                other => panic!("unexpected dtype {other:?} for {name}"),
            }
            tensors.insert(name.to_string(), t);
        }
        let meta = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{arch}.reference.json"))).unwrap(),
        )
        .unwrap();
        Self { tensors, meta }
    }

    pub fn get(&self, name: &str) -> &RefTensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference has no {name}"))
    }

    /// Rows of token ids of a `[batch, seq]` i64 tensor.
    pub fn rows(&self, name: &str) -> Vec<Vec<u32>> {
        let t = self.get(name);
        t.i64
            .chunks(t.shape[1])
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect()
    }

    pub fn scalar(&self, key: &str) -> f64 {
        self.meta[key].as_f64().unwrap()
    }
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// ||a - b|| / ||b||.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// name → (dtype, shape, bytes) of every tensor of a checkpoint directory.
pub fn raw_tensors(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let index = WeightIndex::open_dir(dir).unwrap();
    index
        .names()
        .into_iter()
        .map(|n| {
            let (file, e) = index.entry(n).unwrap();
            (
                n.to_string(),
                (e.dtype, e.shape.clone(), file.bytes(n).unwrap().to_vec()),
            )
        })
        .collect()
}
