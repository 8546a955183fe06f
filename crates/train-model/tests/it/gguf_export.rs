//! `export_gguf` → `convert_to_hf`: every family the exporter writes (llama, qwen2, qwen3)
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

#[test]
fn exported_models_come_back_with_their_logits_and_tokenizer() {
    let text = "Hello, world! 12345 tokens: ünïcode\n\n  spaced   out.";
    let scratch = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2", "qwen3"] {
        let mut src = fixtures().join(arch);
        if arch == "llama" {
            // The Llama fixture scales RoPE (Llama 3.1's), which the exporter refuses (llama.cpp
            // takes it as a `rope_freqs` tensor the importer does not read back): the same
            // weights without the scaling go through the llama path.
            let e = export_gguf(&src, &scratch.path().join("x.gguf"), GgufOutType::F16)
                .unwrap_err()
                .to_string();
            assert!(e.contains("RoPE scaling"), "{e}");
            let copy = scratch.path().join("llama");
            std::fs::create_dir_all(&copy).unwrap();
            for entry in std::fs::read_dir(&src).unwrap() {
                let p = entry.unwrap().path();
                std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
            }
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(copy.join("config.json")).unwrap())
                    .unwrap();
            config["rope_parameters"] =
                serde_json::json!({"rope_type": "default", "rope_theta": 500000.0});
            std::fs::write(copy.join("config.json"), config.to_string()).unwrap();
            src = copy;
        }
        let original = tokenizers::Tokenizer::from_file(src.join("tokenizer.json")).unwrap();
        let ids = original.encode(text, false).unwrap().get_ids().to_vec();
        let rows = vec![ids.iter().copied().take(16).collect::<Vec<u32>>()];
        let reference = logits(&src, &rows);
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (outtype, tol) in [(GgufOutType::F16, 1e-2), (GgufOutType::Q8_0, 5e-2)] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("model.gguf");
            let e = export_gguf(&src, &file, outtype).unwrap();
            assert_eq!(e.architecture, arch);
            let back = dir.path().join("back");
            convert_to_hf(&file, &back).unwrap();
            let got = logits(&back, &rows);
            let err = reference
                .iter()
                .zip(&got)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            println!("{arch} {outtype:?}: max |Δlogit| {err:.3e} of max |logit| {scale:.3}");
            assert!(
                err <= tol * scale.max(1.0),
                "{arch} {outtype:?}: {err} vs {scale}"
            );
            let reread = tokenizers::Tokenizer::from_file(back.join("tokenizer.json")).unwrap();
            assert_eq!(
                reread.encode(text, false).unwrap().get_ids(),
                ids.as_slice(),
                "{arch}: tokenizer"
            );
        }
    }
}

#[test]
fn other_families_and_bad_outputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = export_gguf(
        &fixtures().join("gemma3"),
        &dir.path().join("g.gguf"),
        GgufOutType::F16,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("gemma3") && e.contains("GGUF export"), "{e}");
    assert!(!dir.path().join("g.gguf").exists());
}
