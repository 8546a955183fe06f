//! `export_gguf` → `convert_to_hf`: every family the exporter writes (llama, mistral, qwen2,
//! qwen3, olmo2, smollm3, gemma3)
//! comes back from its GGUF file with logits equal to the original's within the error of the
//! stored type (f16, q8_0), with the same tokenizer (ids of a text equal), and the families it
//! does not write are refused by name.
#![cfg(all(feature = "gguf", feature = "cpu"))]

use burn::tensor::Tensor;
use train_model::{
    GgufOutType, LoadOptions, ModelInput, convert_to_hf, export_gguf, load_pretrained,
};

use crate::common::fixtures;

type B = burn::backend::Flex;

fn logits(dir: &std::path::Path, rows: &[Vec<u32>]) -> Vec<f32> {
    let device = Default::default();
    let model = load_pretrained::<B>(dir, &LoadOptions::default(), &device)
        .unwrap()
        .model;
    let input = ModelInput::<B>::from_rows(rows, &device).unwrap();
    let out: Tensor<B, 3> = model.forward(&input);
    out.into_data().to_vec::<f32>().unwrap()
}

/// A copy of fixture `src` named `name` with its config edited and the tensors `drop` names
/// left out.
fn variant(
    src: &std::path::Path,
    scratch: &std::path::Path,
    name: &str,
    edit: impl Fn(&mut serde_json::Value),
    drop: impl Fn(&str) -> bool,
) -> std::path::PathBuf {
    let copy = scratch.join(name);
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(copy.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(copy.join("config.json"), config.to_string()).unwrap();
    if !copy.join("model.safetensors").exists() {
        // Sharded (the Llama fixture): nothing to drop from it here.
        return copy;
    }
    let bytes = std::fs::read(copy.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .filter(|(n, _)| !drop(n))
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(copy.join("model.safetensors"), out).unwrap();
    copy
}

#[test]
fn exported_models_come_back_with_their_logits_and_tokenizer() {
    let text = "Hello, world! 12345 tokens: ünïcode\n\n  spaced   out.";
    let scratch = tempfile::tempdir().unwrap();
    // (fixture, GGUF architecture, tokens compared); the Llama fixture has Llama 3.1's RoPE
    // scaling (as llama.cpp's `rope_freqs` factors in the file).
    for (family, arch, tokens) in [
        ("llama", "llama", 16),
        ("qwen2", "qwen2", 16),
        ("qwen3", "qwen3", 16),
        // llama.cpp runs Mistral as `llama`, without the sliding window (8 in the fixture):
        // equal within the window.
        ("mistral", "llama", 8),
        ("olmo2", "olmo2", 16),
        ("smollm3", "smollm3", 16),
        ("gemma3", "gemma3", 16),
    ] {
        let mut src = fixtures().join(family);
        match family {
            "olmo2" => {
                // llama.cpp's OLMo 2 has no attention output bias: the fixture's biases are
                // refused, and the same model without them goes through.
                let e = export_gguf(&src, &scratch.path().join("x.gguf"), GgufOutType::F16)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("output bias"), "{e}");
                src = variant(
                    &src,
                    scratch.path(),
                    family,
                    |c| c["attention_bias"] = false.into(),
                    |n| n.ends_with(".bias"),
                );
            }
            "smollm3" => {
                // The fixture leaves RoPE out of layer 2 of 3; llama.cpp's SmolLM3 out of every
                // fourth layer only: refused, and the same weights with RoPE on every layer
                // (as llama.cpp runs three layers) go through.
                let e = export_gguf(&src, &scratch.path().join("x.gguf"), GgufOutType::F16)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("no_rope_layers"), "{e}");
                src = variant(
                    &src,
                    scratch.path(),
                    family,
                    |c| c["no_rope_layers"] = serde_json::json!([1, 1, 1]),
                    |_| false,
                );
            }
            "gemma3" => {
                // llama.cpp's Gemma 3 scales attention by the head width (16 here; the fixture
                // says 24): refused, and the same weights at 16 go through, with the fixture's
                // sliding layers, local rotary base and linear RoPE scaling of the global ones.
                let e = export_gguf(&src, &scratch.path().join("x.gguf"), GgufOutType::F16)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("query_pre_attn_scalar"), "{e}");
                src = variant(
                    &src,
                    scratch.path(),
                    family,
                    |c| c["query_pre_attn_scalar"] = 16.into(),
                    |_| false,
                );
            }
            _ => {}
        }
        let original = tokenizers::Tokenizer::from_file(src.join("tokenizer.json")).unwrap();
        let ids = original.encode(text, false).unwrap().get_ids().to_vec();
        assert!(ids.len() >= tokens);
        let rows = vec![ids.iter().copied().take(tokens).collect::<Vec<u32>>()];
        let reference = logits(&src, &rows);
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (outtype, tol) in [(GgufOutType::F16, 1e-2), (GgufOutType::Q8_0, 5e-2)] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("model.gguf");
            let e = export_gguf(&src, &file, outtype).unwrap();
            assert_eq!(e.architecture, arch);
            assert_eq!(e.notes.is_empty(), family != "mistral", "{:?}", e.notes);
            let back = dir.path().join("back");
            convert_to_hf(&file, &back).unwrap();
            let got = logits(&back, &rows);
            let err = reference
                .iter()
                .zip(&got)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            println!("{family} {outtype:?}: max |Δlogit| {err:.3e} of max |logit| {scale:.3}");
            assert!(
                err <= tol * scale.max(1.0),
                "{family} {outtype:?}: {err} vs {scale}"
            );
            let reread = tokenizers::Tokenizer::from_file(back.join("tokenizer.json")).unwrap();
            assert_eq!(
                reread.encode(text, false).unwrap().get_ids(),
                ids.as_slice(),
                "{family}: tokenizer"
            );
        }
    }
}

#[test]
fn other_families_and_bad_outputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = export_gguf(
        &fixtures().join("qwen3_vl"),
        &dir.path().join("g.gguf"),
        GgufOutType::F16,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("qwen3_vl") && e.contains("GGUF export"), "{e}");
    assert!(!dir.path().join("g.gguf").exists());
    let e = export_gguf(
        &fixtures().join("ministral"),
        &dir.path().join("m.gguf"),
        GgufOutType::F16,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("MinistralForCausalLM"), "{e}");
    assert!(!dir.path().join("m.gguf").exists());
    // A tokenizer with more ids than the embedding has rows: llama.cpp would not load it.
    let small = variant(
        &fixtures().join("qwen2"),
        dir.path(),
        "short-embedding",
        |_| {},
        |_| false,
    );
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(small.join("tokenizer.json")).unwrap())
            .unwrap();
    tok["added_tokens"].as_array_mut().unwrap().push(
        serde_json::json!({"id": 5000, "content": "<extra>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
    );
    std::fs::write(small.join("tokenizer.json"), tok.to_string()).unwrap();
    let e = export_gguf(&small, &dir.path().join("s.gguf"), GgufOutType::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than the embedding"), "{e}");
    assert!(!dir.path().join("s.gguf").exists());
}
