//! The model registry: scanning, lookup by name or path, adapters, concurrent writers.

use crate::common::fixtures;
use train_model::registry::{EntryKind, ModelRegistry};

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
