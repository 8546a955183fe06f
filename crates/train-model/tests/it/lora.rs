//! LoRA adapters: a fresh adapter changes nothing, save → load is exact, merging gives the
//! adapter's logits, the adapter `peft` saved loads and changes the logits, only adapter weights
//! get gradients, and every bad adapter directory is a clear error naming the file and field.
#![cfg(feature = "cpu")]

use std::path::Path;

use crate::common::fixtures;
use burn::backend::{Autodiff, Flex};
use burn::tensor::Tensor;
use train_model::{
    CausalLm, LoadOptions, LoraConfig, ModelError, ModelInput, NamedParam, Precision, load_adapter,
    load_pretrained, save_adapter,
};

type B = Flex;

fn options() -> LoadOptions {
    LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    }
}

fn base(arch: &str) -> CausalLm<B> {
    load_pretrained::<B>(&fixtures().join(arch), &options(), &Default::default())
        .unwrap()
        .model
}

fn input() -> ModelInput<B> {
    ModelInput::from_rows(
        &[
            vec![5, 17, 99, 3, 250, 8, 41],
            vec![7, 7, 300, 12, 2, 90, 11],
        ],
        &Default::default(),
    )
    .unwrap()
}

fn max_diff(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
    (a - b).abs().max().into_scalar()
}

fn config(targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: targets.iter().map(|t| (*t).to_string()).collect(),
        ..LoraConfig::default()
    }
}

/// Sets every `lora_B` to small non-zero values (a fresh adapter's B is zero).
fn perturb(model: CausalLm<B>) -> CausalLm<B> {
    let mut model = model;
    for layer in &mut model.layers {
        for (name, proj) in layer.projections_mut() {
            if !matches!(
                name,
                "self_attn.q_proj" | "self_attn.v_proj" | "mlp.down_proj"
            ) {
                continue;
            }
            if let Some(l) = proj.lora.as_mut() {
                let b = l.b.val();
                let n = b.shape().num_elements();
                let values: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.01)
                    .collect();
                let t =
                    Tensor::<B, 1>::from_floats(values.as_slice(), &b.device()).reshape(b.shape());
                l.b = burn::module::Param::initialized(l.b.id, t);
            }
        }
    }
    model
}

#[test]
fn a_fresh_adapter_changes_nothing_and_counts_its_weights() {
    let plain = base("qwen3").forward(&input());
    let model = base("qwen3")
        .with_lora(&config(&["q_proj", "v_proj"]), 1)
        .unwrap();
    assert_eq!(max_diff(plain, model.forward(&input())), 0.0);
    let c = &model.config;
    let q = 4 * (c.hidden_size + c.num_heads * c.head_dim);
    let v = 4 * (c.hidden_size + c.num_kv_heads * c.head_dim);
    assert_eq!(model.num_adapter_parameters(), c.num_layers * (q + v));
}

#[test]
fn save_load_and_merge_keep_the_logits() {
    let model = perturb(
        base("qwen3")
            .with_lora(&config(&["q_proj", "v_proj", "mlp.down_proj"]), 3)
            .unwrap(),
    );
    let with_adapter = model.forward(&input());
    assert!(max_diff(with_adapter.clone(), base("qwen3").forward(&input())) > 1e-3);
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, dir.path(), "../somewhere").unwrap();
    let loaded = load_adapter(base("qwen3"), dir.path()).unwrap();
    assert_eq!(
        max_diff(with_adapter.clone(), loaded.forward(&input())),
        0.0
    );
    assert_eq!(loaded.lora_config().unwrap().r, 4);
    let merged = loaded.merge_lora();
    assert!(merged.lora_config().is_none());
    let d = max_diff(with_adapter, merged.forward(&input()));
    assert!(d < 1e-5, "merged logits differ by {d}");
}

#[test]
fn the_adapter_peft_saved_loads_through_load_pretrained() {
    for arch in ["qwen3", "llama"] {
        let dir = fixtures().join(format!("{arch}-lora"));
        let loaded = load_pretrained::<B>(&dir, &options(), &Default::default()).unwrap();
        assert_eq!(loaded.adapter_dir.as_deref(), Some(dir.as_path()));
        assert!(loaded.dir.ends_with(arch));
        let lora = loaded.model.lora_config().unwrap().clone();
        assert_eq!((lora.r, lora.alpha), (4, 8.0));
        assert_eq!(lora.target_modules.len(), 7);
        let d = max_diff(loaded.model.forward(&input()), base(arch).forward(&input()));
        assert!(d > 1e-3, "{arch}: the adapter does not change the logits");
    }
}

#[test]
fn only_adapter_weights_get_gradients() {
    type A = Autodiff<Flex>;
    let model = load_pretrained::<A>(
        &fixtures().join("qwen3-lora"),
        &options(),
        &Default::default(),
    )
    .unwrap()
    .model;
    let input =
        ModelInput::<A>::from_rows(&[vec![5, 17, 99, 3, 250]], &Default::default()).unwrap();
    let grads = model.forward(&input).sum().backward();
    model.visit_named(|p| {
        let (name, has) = match p {
            NamedParam::Vector(n, t) => (n, t.grad(&grads).is_some()),
            NamedParam::Matrix(n, t) => (n, t.grad(&grads).is_some()),
        };
        assert!(!has, "{name} is frozen but got a gradient");
    });
    let mut n = 0;
    model.visit_adapters(|name, p| {
        assert!(p.grad(&grads).is_some(), "{name} got no gradient");
        n += 1;
    });
    assert_eq!(n, 2 * 7 * model.layers.len());
}

fn adapter_copy(dir: &Path) {
    let src = fixtures().join("qwen3-lora");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // The copy is elsewhere: point it at the base model by absolute path.
    edit_config(dir, |c| {
        c["base_model_name_or_path"] = fixtures().join("qwen3").to_str().unwrap().into();
    });
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
}

#[test]
fn fused_and_expert_models_name_their_own_modules() {
    // Phi-3's fused projections are the targets; the default `q_proj` names none of them.
    let e = base("phi3")
        .with_lora(&LoraConfig::default(), 0)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("its modules: qkv_proj, o_proj, gate_up_proj, down_proj"),
        "{e}"
    );
    let m = base("phi3")
        .with_lora(&config(&["qkv_proj", "gate_up_proj"]), 0)
        .unwrap();
    let mut names = Vec::new();
    m.visit_adapters(|n, _| names.push(n.to_string()));
    assert_eq!(names.len(), 2 * 2 * m.layers.len());
    assert!(
        names[0].ends_with("self_attn.qkv_proj.lora_A.weight"),
        "{names:?}"
    );
    // Qwen3-MoE: as PEFT converts them for transformers 5, the MLP names adapt the experts'
    // stacked `gate_up_proj` (gate_proj and up_proj together, twice the rank) and `down_proj`,
    // `gate` the router, `all-linear` all of them; the dense layer's MLP gets none.
    let e = base("qwen3_moe")
        .with_lora(&config(&["gate_proj"]), 0)
        .unwrap_err();
    assert!(e.to_string().contains("without `up_proj`"), "{e}");
    let e = base("qwen3_moe")
        .with_lora(
            &LoraConfig {
                dropout: 0.1,
                ..config(&["all-linear"])
            },
            0,
        )
        .unwrap_err();
    assert!(e.to_string().contains("no dropout"), "{e}");
    let m = base("qwen3_moe")
        .with_lora(&config(&["q_proj", "k_proj", "v_proj", "o_proj"]), 0)
        .unwrap();
    let mut names = Vec::new();
    m.visit_adapters(|n, _| names.push(n.to_string()));
    assert_eq!(names.len(), 2 * 4 * 3);
    let m = base("qwen3_moe")
        .with_lora(&config(&["all-linear"]), 0)
        .unwrap();
    let c = m.config.clone();
    let moe = c.moe.clone().unwrap();
    let (e, h, i) = (moe.num_experts, c.hidden_size, moe.intermediate_size);
    let mut shapes = std::collections::BTreeMap::new();
    m.visit_adapters(|n, p| {
        shapes.insert(n.to_string(), p.shape().dims::<2>());
    });
    // Layers 0 and 2 are sparse, layer 1 dense: attention everywhere, no dense MLP adapter.
    assert_eq!(shapes.len(), 2 * 4 * 3 + 2 * 3 * 2, "{shapes:?}");
    assert!(!shapes.keys().any(|n| n.starts_with("model.layers.1.mlp")));
    let p = "model.layers.2.mlp";
    assert_eq!(shapes[&format!("{p}.gate.lora_A.weight")], [4, h]);
    assert_eq!(shapes[&format!("{p}.gate.lora_B.weight")], [e, 4]);
    assert_eq!(
        shapes[&format!("{p}.experts.base_layer.lora_A.weight")],
        [8 * e, h]
    );
    assert_eq!(
        shapes[&format!("{p}.experts.base_layer.lora_B.weight")],
        [2 * i, 8 * e]
    );
    assert_eq!(shapes[&format!("{p}.experts.lora_A.weight")], [4 * e, i]);
    assert_eq!(shapes[&format!("{p}.experts.lora_B.weight")], [h, 4 * e]);
    // A fresh adapter changes nothing.
    assert_eq!(
        max_diff(m.forward(&input()), base("qwen3_moe").forward(&input())),
        0.0
    );
    // One parameter alone is the outer (only) wrapper: `experts.lora_A`.
    let m = base("qwen3_moe")
        .with_lora(&config(&["up_proj", "gate_proj"]), 0)
        .unwrap();
    let mut shapes = std::collections::BTreeMap::new();
    m.visit_adapters(|n, p| {
        shapes.insert(n.to_string(), p.shape().dims::<2>());
    });
    assert_eq!(shapes.len(), 2 * 2, "{shapes:?}");
    assert_eq!(
        shapes["model.layers.0.mlp.experts.lora_A.weight"],
        [8 * e, h]
    );
}

/// The adapter `peft` saved for Qwen3-MoE (attention, router and the experts' stacked
/// weights, B not zero): it loads, changes the logits, saves as PEFT saved it (its
/// `target_parameters`, `rank_pattern` and `alpha_pattern`), loads back to the same logits,
/// and merges into the experts' weights with the adapter's logits.
#[test]
fn expert_adapters_save_load_and_merge_keep_the_logits() {
    let dir = fixtures().join("qwen3_moe-lora");
    let loaded = load_adapter(base("qwen3_moe"), &dir).unwrap();
    let with_adapter = loaded.forward(&input());
    let d = max_diff(with_adapter.clone(), base("qwen3_moe").forward(&input()));
    assert!(d > 1e-3, "the adapter does not change the logits ({d})");
    let mut names = Vec::new();
    loaded.visit_adapters(|n, _| names.push(n.to_string()));
    assert!(names.contains(&"model.layers.0.mlp.experts.base_layer.lora_B.weight".to_string()));

    let out = tempfile::tempdir().unwrap();
    save_adapter(&loaded, out.path(), "../qwen3_moe").unwrap();
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("adapter_config.json")).unwrap())
            .unwrap();
    let peft: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    let sorted = |v: &serde_json::Value| {
        let mut names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    for field in ["target_modules", "target_parameters"] {
        assert_eq!(sorted(&saved[field]), sorted(&peft[field]), "{field}");
    }
    for field in ["rank_pattern", "alpha_pattern", "r", "lora_alpha"] {
        assert_eq!(saved[field], peft[field], "{field}");
    }
    let again = load_adapter(base("qwen3_moe"), out.path()).unwrap();
    assert_eq!(max_diff(with_adapter.clone(), again.forward(&input())), 0.0);

    let merged = again.merge_lora();
    assert!(merged.lora_config().is_none());
    let d = max_diff(with_adapter, merged.forward(&input()));
    assert!(d < 1e-5, "merged logits differ by {d}");
}

/// A copy of the Qwen3-MoE adapter `peft` saved, its config edited by `edit`: what loading it
/// says (it must fail).
fn moe_adapter_error(edit: impl FnOnce(&mut serde_json::Value), onto: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("qwen3_moe-lora");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    edit_config(dir.path(), edit);
    load_adapter(base(onto), dir.path())
        .unwrap_err()
        .to_string()
}

/// Expert and router adapters whose config does not fit them, or that this crate cannot
/// train as PEFT would: clear errors naming the field or the tensor.
#[test]
fn bad_expert_adapters_are_clear_errors() {
    use serde_json::json;
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str, &str)> = vec![
        (
            "target_parameters",
            Box::new(|c| c["target_parameters"] = json!(["experts.w1"])),
            "qwen3_moe",
            "`experts.w1` is not supported",
        ),
        (
            "target_parameters",
            Box::new(|c| c["target_parameters"] = json!("gate_up_proj")),
            "qwen3_moe",
            "expected a list",
        ),
        (
            "rank_pattern",
            Box::new(|c| c["rank_pattern"] = json!({"q_proj": 8})),
            "qwen3_moe",
            "per-module ranks",
        ),
        (
            "rank_pattern",
            Box::new(|c| c["rank_pattern"] = json!({r".*\.gate_up_proj": 2.5})),
            "qwen3_moe",
            "positive integer",
        ),
        (
            "alpha_pattern",
            Box::new(|c| c["alpha_pattern"] = json!({r".*\.gate_up_proj": -1})),
            "qwen3_moe",
            "positive number",
        ),
        (
            "lora_dropout",
            Box::new(|c| c["lora_dropout"] = json!(0.1)),
            "qwen3_moe",
            "no dropout",
        ),
        // The same parameters on a model without experts.
        (
            "target_parameters",
            Box::new(|_| {}),
            "qwen3",
            "no mixture-of-experts layer",
        ),
        // Ranks past any real adapter's (their products with the experts would overflow).
        (
            "r",
            Box::new(|c| c["r"] = json!(1_000_000_000_000_000u64)),
            "qwen3_moe",
            "at most",
        ),
        (
            "rank_pattern",
            Box::new(|c| c["rank_pattern"] = json!({r".*\.gate_up_proj": 1e300})),
            "qwen3_moe",
            "at most",
        ),
        // A rank that disagrees with the tensors.
        (
            "rank",
            Box::new(|c| c["rank_pattern"] = json!({r".*\.gate_up_proj": 4})),
            "qwen3_moe",
            "mlp.experts.base_layer.lora_A.weight",
        ),
        // Only `down_proj` listed: the `gate_up_proj` tensors fit nothing.
        (
            "unexpected",
            Box::new(|c| c["target_parameters"] = json!(["down_proj", "gate.weight"])),
            "qwen3_moe",
            "experts.base_layer",
        ),
    ];
    for (what, edit, onto, says) in cases {
        let text = moe_adapter_error(edit, onto);
        assert!(text.contains(says), "{what}: {text}");
    }
}

#[test]
fn bad_adapters_are_clear_errors() {
    // Unknown target.
    let e = base("qwen3").with_lora(&config(&["qproj"]), 0).unwrap_err();
    assert!(e.to_string().contains("`qproj` selects no module"), "{e}");
    // Out-of-range settings.
    let e = base("qwen3")
        .with_lora(
            &LoraConfig {
                r: 0,
                ..LoraConfig::default()
            },
            0,
        )
        .unwrap_err();
    assert!(e.to_string().contains("lora r"), "{e}");

    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "use_dora",
            Box::new(|c| c["use_dora"] = true.into()),
            "DoRA",
        ),
        (
            "peft_type",
            Box::new(|c| c["peft_type"] = "IA3".into()),
            "IA3",
        ),
        (
            "r",
            Box::new(|c| c["r"] = "four".into()),
            "positive integer",
        ),
        (
            "modules_to_save",
            Box::new(|c| c["modules_to_save"] = serde_json::json!(["lm_head"])),
            "not supported",
        ),
        (
            "base_model_name_or_path",
            Box::new(|c| c["base_model_name_or_path"] = "/nowhere/at/all".into()),
            "not a model directory",
        ),
        ("r", Box::new(|c| c["r"] = 8.into()), "has shape"),
    ];
    for (field, edit, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        adapter_copy(dir.path());
        edit_config(dir.path(), edit);
        let e = load_pretrained::<B>(dir.path(), &options(), &Default::default()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(says), "{field}: {text}");
        if !matches!(e, ModelError::ShapeMismatch { .. }) {
            assert!(
                text.contains("adapter_config.json") && text.contains(field),
                "{text}"
            );
        }
    }
    // Missing weights, and a lora_A without its lora_B.
    let dir = tempfile::tempdir().unwrap();
    adapter_copy(dir.path());
    std::fs::remove_file(dir.path().join("adapter_model.safetensors")).unwrap();
    let e = load_adapter(base("qwen3"), dir.path()).unwrap_err();
    assert!(e.to_string().contains("adapter_model.safetensors"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    adapter_copy(dir.path());
    let src = fixtures().join("qwen3-lora/adapter_model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("adapter_model.safetensors"))
        .unwrap();
    let e = load_adapter(base("qwen3"), dir.path()).unwrap_err();
    assert!(
        e.to_string().contains("layers.1.mlp.up_proj.lora_B.weight"),
        "{e}"
    );
}
