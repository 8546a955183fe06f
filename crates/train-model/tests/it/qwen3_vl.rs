//! Qwen3-VL: the text decoder of a tiny random `Qwen3VLForConditionalGeneration` (written by
//! `cargo xtask fixtures`) against `transformers` on text-only rows (logits, loss, gradients),
//! and a save that carries the vision tower over byte for byte.
#![cfg(feature = "cpu")]

use crate::common::{fixtures, raw_tensors, rel_err};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Int, Tensor, TensorData};
use safetensors::SafeTensors;
use train_model::{
    LoadOptions, ModelInput, NamedParam, Precision, SaveOptions, causal_lm_loss, load_pretrained,
    save_pretrained,
};

type A = Autodiff<Flex>;

fn options() -> LoadOptions {
    LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    }
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load() -> Self {
        Self {
            bytes: std::fs::read(fixtures().join("qwen3_vl.reference.safetensors")).unwrap(),
        }
    }
    fn get(&self, name: &str, dtype: DType) -> TensorData {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st.tensor(name).unwrap();
        TensorData::from_bytes_vec(v.data().to_vec(), v.shape().to_vec(), dtype)
    }
}

#[test]
fn text_only_logits_loss_and_gradients_match_transformers() {
    let r = Reference::load();
    let device = Default::default();
    let loaded = load_pretrained::<A>(&fixtures().join("qwen3_vl"), &options(), &device).unwrap();
    assert!(loaded.config.vision_language);
    let model = loaded.model;
    let ids = r.get("input_ids", DType::I64);
    let mask = r.get("attention_mask", DType::I64).to_vec::<i64>().unwrap();
    let [b, s] = [ids.shape[0], ids.shape[1]];
    let rows: Vec<Vec<u32>> = ids
        .to_vec::<i64>()
        .unwrap()
        .chunks(s)
        .map(|c| c.iter().map(|&i| i as u32).collect())
        .collect();
    let input = ModelInput::<A>::from_rows(&rows, &device).unwrap();
    let logits = model.forward(&input);
    // Positions under the mask (right padding does not reach them in a causal model).
    let got = logits.clone().into_data().to_vec::<f32>().unwrap();
    let want = r.get("logits", DType::F32).to_vec::<f32>().unwrap();
    let vocab = want.len() / (b * s);
    let mut worst = 0f32;
    for (pos, m) in mask.iter().enumerate() {
        if *m == 1 {
            for v in 0..vocab {
                let i = pos * vocab + v;
                worst = worst.max((got[i] - want[i]).abs());
            }
        }
    }
    assert!(worst < 1e-4, "logits differ by {worst}");
    let labels = Tensor::<A, 2, Int>::from_data(r.get("labels", DType::I64), &device);
    let loss = causal_lm_loss(logits, labels);
    let got_loss: f32 = loss.clone().into_scalar();
    let want_loss = r.get("loss", DType::F32).to_vec::<f32>().unwrap()[0];
    assert!(
        (got_loss - want_loss).abs() < 1e-5,
        "loss {got_loss} vs {want_loss}"
    );
    let grads = loss.backward();
    let mut checked = 0;
    let mut worst_grad = 0f64;
    model.visit_named(|p| {
        let file = loaded.config.file_tensor_name(match &p {
            NamedParam::Vector(n, _) | NamedParam::Matrix(n, _) => n,
        });
        let st = SafeTensors::deserialize(&r.bytes).unwrap();
        if st.tensor(&format!("grad.{file}")).is_err() {
            return;
        }
        let got: Vec<f32> = match p {
            NamedParam::Vector(_, t) => t.grad(&grads).unwrap().into_data().to_vec().unwrap(),
            NamedParam::Matrix(_, t) => t.grad(&grads).unwrap().into_data().to_vec().unwrap(),
        };
        let want = r
            .get(&format!("grad.{file}"), DType::F32)
            .to_vec::<f32>()
            .unwrap();
        let rel = rel_err(&got, &want);
        assert!(rel < 1e-4, "{file}: gradient differs by {rel:.2e}");
        worst_grad = worst_grad.max(rel);
        checked += 1;
    });
    assert_eq!(checked, 4);
    println!(
        "qwen3_vl text path: logits within {worst:.1e}, loss {got_loss:.6} vs {want_loss:.6}, {checked} gradients within {worst_grad:.1e} relative"
    );
}

#[test]
fn saving_keeps_the_vision_tower_byte_for_byte() {
    let src = fixtures().join("qwen3_vl");
    let loaded = load_pretrained::<Flex>(&src, &options(), &Default::default()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let options = SaveOptions {
        dtype: None,
        max_shard_bytes: Some(200_000),
        companions_from: Some(src.clone()),
    };
    save_pretrained(
        &loaded.model,
        Some(&loaded.raw_config),
        out.path(),
        &options,
    )
    .unwrap();
    let (a, b) = (raw_tensors(&src), raw_tensors(out.path()));
    assert_eq!(a.len(), b.len());
    let visual = a.keys().filter(|k| k.starts_with("model.visual.")).count();
    assert!(visual > 10);
    for (name, value) in &a {
        assert_eq!(b.get(name), Some(value), "{name} changed");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen3_vl");
    assert!(out.path().join("model.safetensors.index.json").is_file());
    // Without a source to carry the vision tower from, saving refuses instead of dropping it.
    let e = save_pretrained(
        &loaded.model,
        Some(&loaded.raw_config),
        &out.path().join("x"),
        &SaveOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("companions_from"), "{e}");
}
