//! Loading and saving Hugging Face directories: bit-identical round trips, sharding, tied
//! weights, companion files, and a clear error (never a panic) for every kind of bad checkpoint.
#![cfg(feature = "cpu")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::{ARCHES, fixtures, raw_tensors};
use burn::backend::Flex;
use proptest::prelude::*;
use safetensors::Dtype;
use train_model::SafetensorsFile;
use train_model::{
    LoadOptions, ModelError, NamedParam, Precision, SaveOptions, StorageDtype, load_pretrained,
};

type B = Flex;

fn options() -> LoadOptions {
    LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    }
}

fn param_bits(model: &train_model::CausalLm<B>) -> BTreeMap<String, Vec<u32>> {
    let mut out = BTreeMap::new();
    model.visit_named(|p| {
        let (name, data) = match p {
            NamedParam::Vector(n, t) => (n, t.val().into_data()),
            NamedParam::Matrix(n, t) => (n, t.val().into_data()),
        };
        out.insert(
            name.to_string(),
            data.to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect(),
        );
    });
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn round_trip_is_bit_identical_for_every_architecture() {
    let device = Default::default();
    for arch in ARCHES {
        let src = fixtures().join(arch);
        let loaded = load_pretrained::<B>(&src, &options(), &device).unwrap();
        let out = tempfile::tempdir().unwrap();
        let saved = loaded.save(out.path(), &SaveOptions::default()).unwrap();
        // Same dtype as the source by default, same bytes for every tensor.
        assert_eq!(saved.dtype, loaded.source_dtype, "{arch}");
        assert_eq!(
            raw_tensors(&src),
            raw_tensors(out.path()),
            "{arch}: tensor bytes differ"
        );
        let again = load_pretrained::<B>(out.path(), &options(), &device).unwrap();
        assert_eq!(
            param_bits(&loaded.model),
            param_bits(&again.model),
            "{arch}: reloaded params differ"
        );
        assert_eq!(again.config, loaded.config, "{arch}: config changed");
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "generation_config.json",
        ] {
            assert_eq!(
                std::fs::read(src.join(name)).unwrap(),
                std::fs::read(out.path().join(name)).unwrap(),
                "{arch}: {name} not carried over"
            );
        }
    }
}

#[test]
fn tied_weights_are_stored_once() {
    let device = Default::default();
    let loaded = load_pretrained::<B>(&fixtures().join("qwen3"), &options(), &device).unwrap();
    assert!(loaded.config.tie_word_embeddings && loaded.model.lm_head.is_none());
    let out = tempfile::tempdir().unwrap();
    loaded.save(out.path(), &SaveOptions::default()).unwrap();
    let names: Vec<String> = raw_tensors(out.path()).into_keys().collect();
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    assert!(!names.iter().any(|n| n == "lm_head.weight"));
}

#[test]
fn shards_get_an_index_and_load_back() {
    let device = Default::default();
    let loaded = load_pretrained::<B>(&fixtures().join("qwen2"), &options(), &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    let saved = loaded
        .save(
            out.path(),
            &SaveOptions {
                max_shard_bytes: Some(100_000),
                ..SaveOptions::default()
            },
        )
        .unwrap();
    assert!(
        saved.weight_files.len() > 2,
        "expected several shards, got {:?}",
        saved.weight_files
    );
    for f in &saved.weight_files {
        // A tensor larger than the limit gets a shard of its own; others respect the limit.
        let file = SafetensorsFile::open(f).unwrap();
        let bytes: usize = file
            .entries()
            .map(|(n, _)| file.bytes(n).unwrap().len())
            .sum();
        assert!(
            bytes <= 100_000 || file.entries().count() == 1,
            "{f:?} holds {bytes} bytes"
        );
    }
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        saved.total_bytes
    );
    assert!(!out.path().join("model.safetensors").exists());
    let again = load_pretrained::<B>(out.path(), &options(), &device).unwrap();
    assert_eq!(param_bits(&loaded.model), param_bits(&again.model));

    // Saving again unsharded into the same directory removes the shards and the index.
    loaded.save(out.path(), &SaveOptions::default()).unwrap();
    assert!(out.path().join("model.safetensors").exists());
    assert!(!out.path().join("model.safetensors.index.json").exists());
    assert_eq!(
        std::fs::read_dir(out.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("model-")
            })
            .count(),
        0
    );
}

#[test]
fn dtype_is_chosen_by_the_user() {
    let device = Default::default();
    let loaded = load_pretrained::<B>(&fixtures().join("qwen3"), &options(), &device).unwrap();
    assert_eq!(loaded.source_dtype, StorageDtype::Bf16);
    let out = tempfile::tempdir().unwrap();
    loaded
        .save(
            out.path(),
            &SaveOptions {
                dtype: Some(StorageDtype::F32),
                ..SaveOptions::default()
            },
        )
        .unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["dtype"], "float32");
    assert!(
        raw_tensors(out.path())
            .values()
            .all(|(d, _, _)| *d == Dtype::F32)
    );
    let again = load_pretrained::<B>(out.path(), &options(), &device).unwrap();
    // bf16 → f32 is exact, so the values are unchanged.
    assert_eq!(param_bits(&loaded.model), param_bits(&again.model));
}

/// Rewrites the fixture's weights through `edit` into a temporary directory.
fn edited_qwen3(
    edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("qwen3"), dir.path());
    let mut tensors = raw_tensors(dir.path());
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> ModelError {
    load_pretrained::<B>(dir, &options(), &Default::default()).unwrap_err()
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let dir = edited_qwen3(|t| {
        t.remove("model.layers.1.self_attn.k_norm.weight");
    });
    let e = load_err(dir.path());
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("model.layers.1.self_attn.k_norm.weight") && msg.contains("[32]"),
        "{msg}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = edited_qwen3(|t| {
        t.insert(
            "model.layers.0.mlp.extra.weight".into(),
            (Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("model.layers.0.mlp.extra.weight"), "{msg}");
}

#[test]
fn wrong_shape_names_both_shapes() {
    let dir = edited_qwen3(|t| {
        t.insert(
            "model.norm.weight".into(),
            (Dtype::BF16, vec![32], vec![0; 64]),
        );
    });
    let e = load_err(dir.path());
    let msg = e.to_string();
    assert!(matches!(e, ModelError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("model.norm.weight") && msg.contains("[32]") && msg.contains("[64]"),
        "{msg}"
    );
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn integer_weights_are_rejected_with_the_dtype() {
    let dir = edited_qwen3(|t| {
        t.insert(
            "model.norm.weight".into(),
            (Dtype::I16, vec![64], vec![0; 128]),
        );
    });
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("model.norm.weight") && msg.contains("I16"),
        "{msg}"
    );
}

#[test]
fn truncated_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("qwen3"), dir.path());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, ModelError::InvalidWeights { .. }), "{e:?}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn header_claiming_100_gb_does_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let header = r#"{"w":{"dtype":"F32","shape":[25000000000],"data_offsets":[0,100000000000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 16]);
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let e = SafetensorsFile::open(&path).unwrap_err();
    assert!(e.to_string().contains("invalid safetensors header"), "{e}");
}

#[test]
fn shard_index_naming_a_missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("llama"), dir.path());
    std::fs::remove_file(dir.path().join("model-00003-of-00006.safetensors")).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("model-00003-of-00006.safetensors"), "{msg}");
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"model.norm.weight": "../escape.safetensors"}}"#,
    )
    .unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("plain file name"), "{msg}");
}

#[test]
fn bad_config_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("qwen2"), dir.path());
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"qwen2\", \"vocab_size\": ",
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(matches!(e, ModelError::Json { .. }), "{e:?}");
    assert!(e.to_string().contains("config.json"));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(matches!(load_err(dir.path()), ModelError::Io { .. }));
    let missing = PathBuf::from("/nonexistent/model");
    assert!(load_pretrained::<B>(&missing, &options(), &Default::default()).is_err());
}

#[test]
fn precision_is_applied_on_load() {
    let device = Default::default();
    let dir = fixtures().join("llama");
    for (p, d) in [
        (Precision::Fp32, burn::tensor::DType::F32),
        (Precision::Bf16, burn::tensor::DType::BF16),
        (Precision::Fp16, burn::tensor::DType::F16),
        (Precision::Auto, burn::tensor::DType::F32),
    ] {
        let m = load_pretrained::<B>(
            &dir,
            &LoadOptions {
                precision: p,
                ..LoadOptions::default()
            },
            &device,
        )
        .unwrap();
        assert_eq!(m.model.dtype(), d, "{p}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes as a safetensors file: an error or a valid file, never a panic.
    #[test]
    fn arbitrary_weight_files_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256), header_len in 0u64..300) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut bytes = header_len.to_le_bytes().to_vec();
        bytes.extend(body);
        std::fs::write(&path, bytes).unwrap();
        if let Ok(f) = SafetensorsFile::open(&path) {
            for (name, _) in f.entries() {
                prop_assert!(f.bytes(name).is_some());
            }
        }
    }

    /// Mutated real headers: an error or a loadable file, never a panic.
    #[test]
    fn mutated_headers_never_panic(pos in 8usize..200, byte in any::<u8>()) {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&fixtures().join("qwen2"), dir.path());
        let path = dir.path().join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[pos] = byte;
        std::fs::write(&path, bytes).unwrap();
        let _ = load_pretrained::<B>(dir.path(), &options(), &Default::default());
    }
}
