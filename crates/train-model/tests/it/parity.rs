//! Parity with `transformers` on the tiny fixture checkpoints (Qwen3, Qwen2, Llama, Mistral,
//! Ministral): logits,
//! hidden states, loss, gradients of every parameter, one AdamW step, packed rows, the KV
//! cache and both attention paths — on every backend compiled in.

use crate::common::{ARCHES, Reference, fixtures, max_abs_diff, rel_err};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{DType, Int, Tensor, TensorData};
use train_model::{
    AttentionImpl, CausalLm, FusedAutodiffBackend, FusedBackend, KvCache, LayerType, LoadOptions,
    ModelInput, NamedParam, Precision, causal_lm_loss, causal_lm_nll, load_pretrained,
};

/// Tolerances of the issue: logits max abs error ≤ 1e-4 (f32), gradients relative error ≤ 1e-3.
const LOGITS_TOL: f32 = 1e-4;
const GRAD_TOL: f64 = 1e-3;

fn f32s<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(burn::tensor::FloatDType::F32)
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

fn labels<B: FusedBackend>(r: &Reference, device: &B::Device) -> Tensor<B, 2, Int> {
    let t = r.get("labels");
    Tensor::from_data(
        TensorData::new(t.i64.clone(), [t.shape[0], t.shape[1]]),
        device,
    )
}

fn load<B: FusedBackend>(
    arch: &str,
    precision: Precision,
    attention: AttentionImpl,
    device: &B::Device,
) -> CausalLm<B> {
    let options = LoadOptions {
        precision,
        attention,
        ..LoadOptions::default()
    };
    load_pretrained::<B>(&fixtures().join(arch), &options, device)
        .unwrap()
        .model
}

/// Logits, hidden states, loss and every gradient against the reference.
pub fn forward_backward<B: FusedAutodiffBackend>(arch: &str, device: &B::Device) {
    forward_backward_with::<B>(arch, AttentionImpl::Standard, device);
}

/// [`forward_backward`] with the given kernels.
pub fn forward_backward_with<B: FusedAutodiffBackend>(
    arch: &str,
    attention: AttentionImpl,
    device: &B::Device,
) {
    let r = Reference::load(arch);
    let model = load::<B>(arch, Precision::Fp32, attention, device);
    let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
    let (logits, hidden) = model.forward_with_hidden(&input);

    let err = max_abs_diff(&f32s(logits.clone()), &r.get("logits").f32);
    println!("{arch} {}: logits max abs error {err:.3e}", B::name(device));
    assert!(err <= LOGITS_TOL, "{arch}: logits max abs error {err}");
    let mut states = vec![("hidden.embed".to_string(), hidden.embeddings)];
    states.extend(
        hidden
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, h)| (format!("hidden.layer.{i}"), h)),
    );
    states.push(("hidden.final_norm".to_string(), hidden.final_norm));
    for (name, h) in states {
        let err = max_abs_diff(&f32s(h), &r.get(&name).f32);
        assert!(err <= LOGITS_TOL, "{arch}: {name} max abs error {err}");
    }

    let loss = causal_lm_loss(logits, labels::<B>(&r, device));
    let value = f64::from(f32s(loss.clone())[0]);
    let expected = r.scalar("loss");
    println!("{arch}: loss {value:.7} vs transformers {expected:.7}");
    assert!(
        (value - expected).abs() <= 1e-5 * expected.abs().max(1.0),
        "{arch}: loss {value} vs {expected}"
    );

    let grads = loss.backward();
    let mut worst = (0.0f64, String::new());
    let mut checked = 0;
    model.visit_named(|p| {
        let (name, g) = match p {
            NamedParam::Vector(n, t) => (n.to_string(), t.val().grad(&grads).map(f32s)),
            NamedParam::Matrix(n, t) => (n.to_string(), t.val().grad(&grads).map(f32s)),
        };
        let g = g.unwrap_or_else(|| panic!("{arch}: no gradient for {name}"));
        let e = rel_err(&g, &r.get(&format!("grad.{name}")).f32);
        if e > worst.0 {
            worst = (e, name.clone());
        }
        checked += 1;
    });
    println!(
        "{arch}: {checked} gradients, worst relative error {:.3e} ({})",
        worst.0, worst.1
    );
    assert_eq!(
        checked,
        r.meta["num_grads"].as_u64().unwrap() as usize,
        "{arch}: gradient count"
    );
    assert!(
        worst.0 <= GRAD_TOL,
        "{arch}: gradient of {} relative error {}",
        worst.1,
        worst.0
    );
}

/// The windows of the Mistral fixture (8 tokens of 48, every layer) and of the Ministral one
/// (6 tokens, layers 0 and 2 only) are what make their logits right: without a window, or with
/// Ministral's full-attention layer sliding too, the same weights miss transformers' logits by
/// far more than the tolerance; so the parity tests check the windows, and that each layer
/// gets its own, on both attention paths.
pub fn windows_matter<B: FusedBackend>(attention: AttentionImpl, device: &B::Device) {
    for (arch, window) in [("mistral", 8), ("ministral", 6), ("gemma3", 6), ("phi3", 8)] {
        let r = Reference::load(arch);
        let mut model = load::<B>(arch, Precision::Fp32, attention, device);
        assert_eq!(model.config.sliding_window, Some(window));
        let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
        let mut errors = vec![max_abs_diff(
            &f32s(model.forward(&input)),
            &r.get("logits").f32,
        )];
        if arch == "ministral" {
            assert_eq!(model.config.layer_window(1), None);
            let types = model.config.layer_types.clone();
            model.config.layer_types = vec![LayerType::SlidingAttention; types.len()];
            errors.push(max_abs_diff(
                &f32s(model.forward(&input)),
                &r.get("logits").f32,
            ));
            model.config.layer_types = types;
        }
        model.config.sliding_window = None;
        errors.push(max_abs_diff(
            &f32s(model.forward(&input)),
            &r.get("logits").f32,
        ));
        println!("{arch} {attention:?}: logits error {errors:?} (right windows, then wrong)");
        assert!(errors[0] <= LOGITS_TOL, "{arch}: {errors:?}");
        assert!(
            errors[1..].iter().all(|e| *e > 100.0 * LOGITS_TOL),
            "{arch}: {errors:?}"
        );
    }
}

/// SmolLM3's layers without rotary embedding (layer 1 of the fixture's three) are what make its
/// logits right: with the rotary embedding on every layer, the same weights miss transformers'
/// logits by far more than the tolerance.
pub fn nope_layers_matter<B: FusedBackend>(attention: AttentionImpl, device: &B::Device) {
    let r = Reference::load("smollm3");
    let mut model = load::<B>("smollm3", Precision::Fp32, attention, device);
    let rope: Vec<bool> = model.layers.iter().map(|l| l.self_attn.rope).collect();
    assert_eq!(rope, [true, false, true]);
    let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
    let right = max_abs_diff(&f32s(model.forward(&input)), &r.get("logits").f32);
    model.layers[1].self_attn.rope = true;
    let wrong = max_abs_diff(&f32s(model.forward(&input)), &r.get("logits").f32);
    println!(
        "smollm3 {attention:?}: logits error {right:.3e} with its NoPE layer, {wrong:.3e} without"
    );
    assert!(right <= LOGITS_TOL, "{right}");
    assert!(wrong > 100.0 * LOGITS_TOL, "{wrong}");
}

/// Each of Gemma 3's details is what makes its fixture's logits right: without the sliding
/// layers' own rotary base, with `head_dim^-0.5` instead of `query_pre_attn_scalar^-0.5`,
/// Phi-3's details are what make the fixture's logits right: its rows (48 tokens) reach beyond
/// LongRoPE's pre-training context (32), so their forward uses the long factors (the short
/// ones, or no LongRoPE at all, miss transformers' logits by far); the packed segments
/// (19 and 29 tokens) stay within it and use the short ones (checked by `packed`); the rotary
/// embedding covers 12 of each head's 16 channels (all 16 miss too).
pub fn phi3_details_matter<B: FusedBackend>(attention: AttentionImpl, device: &B::Device) {
    use train_model::RopeScaling;
    let r = Reference::load("phi3");
    let model = load::<B>("phi3", Precision::Fp32, attention, device);
    let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
    let error = |m: &CausalLm<B>| max_abs_diff(&f32s(m.forward(&input)), &r.get("logits").f32);
    let right = error(&model);
    assert!(right <= LOGITS_TOL, "{right}");
    let c = model.config.clone();
    assert!(c.fused_qkv && c.fused_gate_up);
    assert_eq!((c.head_dim, c.rope.head_dim), (16, 12));
    let RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings,
        attention_factor,
    } = c.rope.scaling.clone()
    else {
        panic!("not LongRoPE: {:?}", c.rope.scaling)
    };
    assert_eq!(original_max_position_embeddings, 32.0);
    // sqrt(1 + ln(128 / 32) / ln(32)), as transformers derives it.
    assert!((attention_factor - (1.0 + 4f64.ln() / 32f64.ln()).sqrt()).abs() < 1e-12);
    let mut wrong = Vec::new();
    let mut m = model;
    if let RopeScaling::LongRope { long_factor: l, .. } = &mut m.config.rope.scaling {
        l.clone_from(&short_factor);
    }
    wrong.push(("short factors on long rows", error(&m)));
    m.config.rope.scaling = RopeScaling::Default;
    wrong.push(("no LongRoPE", error(&m)));
    m.config = c.clone();
    m.config.rope.head_dim = 16;
    if let RopeScaling::LongRope {
        short_factor: s,
        long_factor: l,
        ..
    } = &mut m.config.rope.scaling
    {
        s.extend([1.0, 1.0]);
        l.extend(long_factor.iter().take(2).copied());
    }
    wrong.push(("every channel rotated", error(&m)));
    println!("phi3 {attention:?}: logits error {right:.3e}; without each detail {wrong:?}");
    for (what, e) in wrong {
        assert!(e > 100.0 * LOGITS_TOL, "{what}: {e}");
    }
}

/// The router's load-balancing loss (`output_router_logits`) against `transformers`: its value
/// and the training loss it is added to, the routers' gradients through it, and the same with
/// the second row cut to 30 tokens and right-padded (padding left out by the real-token mask,
/// as by `transformers`' attention mask).
pub fn router_aux_loss<B: FusedAutodiffBackend>(device: &B::Device) {
    use train_model::FeedForward;
    let r = Reference::load("qwen3_moe");
    let meta = &r.meta["router_aux"];
    let coef = meta["coef"].as_f64().unwrap();
    let model = load::<B>("qwen3_moe", Precision::Fp32, AttentionImpl::Auto, device);
    let rows = r.rows("input_ids");
    let input = ModelInput::from_rows(&rows, device).unwrap();
    let (logits, aux) = model.forward_with_router_loss(&input, None);
    let aux = aux.expect("a sparse model has a load-balancing loss");
    let aux_value = f64::from(f32s(aux.clone())[0]);
    let want = meta["aux_loss"].as_f64().unwrap();
    assert!(
        (aux_value - want).abs() <= 1e-5 * want,
        "aux {aux_value} vs {want}"
    );
    let loss = causal_lm_loss(logits, labels::<B>(&r, device)) + aux.mul_scalar(coef);
    let value = f64::from(f32s(loss.clone())[0]);
    let want_loss = meta["loss"].as_f64().unwrap();
    assert!(
        (value - want_loss).abs() <= 1e-5 * want_loss,
        "loss {value} vs {want_loss}"
    );
    let grads = loss.backward();
    let mut worst = 0f64;
    for (l, layer) in model.layers.iter().enumerate() {
        if let FeedForward::Sparse(moe) = &layer.mlp {
            let g = f32s(moe.gate.val().grad(&grads).unwrap());
            let e = rel_err(
                &g,
                &r.get(&format!("aux.grad.model.layers.{l}.mlp.gate.weight"))
                    .f32,
            );
            worst = worst.max(e);
        }
    }
    assert!(worst <= GRAD_TOL, "router gradients {worst}");
    // Padded: the second row's last 18 tokens are padding, left out of the loss.
    let cut = usize::try_from(meta["padded"]["cut"].as_u64().unwrap()).unwrap();
    let pad = model.config.pad_token_id.unwrap();
    let mut padded = rows.clone();
    for t in &mut padded[1][cut..] {
        *t = pad;
    }
    let seq = rows[0].len();
    let real: Vec<bool> = (0..2 * seq).map(|i| i < seq + cut).collect();
    let input = ModelInput::from_rows(&padded, device).unwrap();
    let (_, aux_b) = model.forward_with_router_loss(&input, Some(&real));
    let aux_b = f64::from(f32s(aux_b.unwrap())[0]);
    let want_b = meta["padded"]["aux_loss"].as_f64().unwrap();
    assert!(
        (aux_b - want_b).abs() <= 1e-5 * want_b,
        "padded aux {aux_b} vs {want_b}"
    );
    println!(
        "qwen3_moe {}: load-balancing loss {aux_value:.7} vs transformers {want:.7}, total \
         {value:.7} vs {want_loss:.7}, router gradients {worst:.2e}; padded {aux_b:.7} vs {want_b:.7}",
        B::name(device)
    );
}

/// Qwen3-MoE's routing is what makes the fixture's logits right: without renormalising the
/// top-2 probabilities, or with one expert a token instead of two, the same weights miss
/// transformers' logits by far more than the tolerance.
pub fn qwen3_moe_details_matter<B: FusedBackend>(attention: AttentionImpl, device: &B::Device) {
    use train_model::FeedForward;
    let r = Reference::load("qwen3_moe");
    let mut model = load::<B>("qwen3_moe", Precision::Fp32, attention, device);
    let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
    let error = |m: &CausalLm<B>| max_abs_diff(&f32s(m.forward(&input)), &r.get("logits").f32);
    let right = error(&model);
    assert!(right <= LOGITS_TOL, "{right}");
    let sparse: Vec<bool> = model
        .layers
        .iter()
        .map(|l| matches!(l.mlp, FeedForward::Sparse(_)))
        .collect();
    assert_eq!(sparse, [true, false, true]);
    let mut wrong = Vec::new();
    let set = |m: &mut CausalLm<B>, norm: bool, k: usize| {
        for l in &mut m.layers {
            if let FeedForward::Sparse(moe) = &mut l.mlp {
                moe.norm_topk_prob = norm;
                moe.top_k = k;
            }
        }
    };
    set(&mut model, false, 2);
    wrong.push(("top-k probabilities not renormalised", error(&model)));
    set(&mut model, true, 1);
    wrong.push(("one expert a token", error(&model)));
    println!("qwen3_moe {attention:?}: logits error {right:.3e}; without each detail {wrong:?}");
    for (what, e) in wrong {
        assert!(e > 100.0 * LOGITS_TOL, "{what}: {e}");
    }
}

/// without the embedding scale, or with SwiGLU instead of GeGLU, the same weights miss
/// transformers' logits by far more than the tolerance.
pub fn gemma3_details_matter<B: FusedBackend>(attention: AttentionImpl, device: &B::Device) {
    let r = Reference::load("gemma3");
    let model = load::<B>("gemma3", Precision::Fp32, attention, device);
    let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
    let error = |m: &CausalLm<B>| max_abs_diff(&f32s(m.forward(&input)), &r.get("logits").f32);
    let right = error(&model);
    assert!(right <= LOGITS_TOL, "{right}");
    let c = model.config.clone();
    assert_eq!(c.query_pre_attn_scalar, Some(24.0));
    assert_eq!(c.norm_offset, 1.0);
    let mut wrong = Vec::new();
    let mut m = model;
    m.config.rope_local = None;
    wrong.push(("local rotary base", error(&m)));
    m.config = c.clone();
    m.config.query_pre_attn_scalar = None;
    wrong.push(("attention scale", error(&m)));
    m.config = c.clone();
    m.config.embedding_scale = None;
    wrong.push(("embedding scale", error(&m)));
    m.config = c;
    for layer in &mut m.layers {
        if let train_model::FeedForward::Dense(mlp) = &mut layer.mlp {
            mlp.gelu_tanh = false;
        }
    }
    wrong.push(("GeGLU", error(&m)));
    println!("gemma3 {attention:?}: logits error {right:.3e}; without each detail {wrong:?}");
    for (what, e) in wrong {
        assert!(e > 100.0 * LOGITS_TOL, "{what}: {e}");
    }
}

/// The loss after one AdamW step with PyTorch's hyper-parameters.
pub fn adamw_step<B: FusedAutodiffBackend>(arch: &str, device: &B::Device) {
    let r = Reference::load(arch);
    let h = &r.meta["adamw"];
    let model = load::<B>(arch, Precision::Fp32, AttentionImpl::Standard, device);
    let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
    let loss = causal_lm_loss(model.forward(&input), labels::<B>(&r, device));
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut optim = AdamWConfig::new()
        .with_beta_1(h["beta1"].as_f64().unwrap() as f32)
        .with_beta_2(h["beta2"].as_f64().unwrap() as f32)
        .with_epsilon(h["eps"].as_f64().unwrap() as f32)
        .with_weight_decay(h["weight_decay"].as_f64().unwrap() as f32)
        .init::<B, CausalLm<B>>();
    let model = optim.step(h["lr"].as_f64().unwrap(), model, grads);
    let after = f64::from(
        f32s(causal_lm_loss(
            model.forward(&input),
            labels::<B>(&r, device),
        ))[0],
    );
    let expected = r.scalar("loss_after_adamw");
    println!("{arch}: loss after one AdamW step {after:.6} vs transformers {expected:.6}");
    assert!(
        (after - expected).abs() <= 1e-4 * expected,
        "{arch}: {after} vs {expected}"
    );
}

/// A packed row (two segments back to back) gives each segment's own logits.
pub fn packed<B: FusedBackend>(arch: &str, attention: AttentionImpl, device: &B::Device) {
    let r = Reference::load(arch);
    let model = load::<B>(arch, Precision::Fp32, attention, device);
    let ids = r.rows("packed.input_ids");
    let segs = r.rows("packed.segment_ids");
    let input = ModelInput::packed(&ids, &segs, device).unwrap();
    let err = max_abs_diff(&f32s(model.forward(&input)), &r.get("packed.logits").f32);
    println!("{arch} {attention:?}: packed logits max abs error {err:.3e}");
    assert!(
        err <= LOGITS_TOL,
        "{arch} {attention:?}: packed logits error {err}"
    );
}

/// Fused and standard attention agree (inference backend, where the fused kernel runs).
pub fn fused_matches_standard<B: FusedBackend>(arch: &str, device: &B::Device) {
    let r = Reference::load(arch);
    let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
    let fused =
        f32s(load::<B>(arch, Precision::Fp32, AttentionImpl::Fused, device).forward(&input));
    let standard =
        f32s(load::<B>(arch, Precision::Fp32, AttentionImpl::Standard, device).forward(&input));
    let err = max_abs_diff(&fused, &standard);
    println!("{arch}: fused vs standard max abs difference {err:.3e}");
    assert!(err <= 1e-5, "{arch}: fused vs standard {err}");
    assert!(max_abs_diff(&fused, &r.get("logits").f32) <= LOGITS_TOL);

    // A long row (640² scores) takes the backends' tiled / flash kernels rather than the naive one.
    let vocab = r.get("logits").shape[2] as u32;
    let long: Vec<u32> = (0..640u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let segs: Vec<u32> = (0..640u32).map(|i| u32::from(i >= 300)).collect();
    for input in [
        ModelInput::from_rows(std::slice::from_ref(&long), device).unwrap(),
        ModelInput::packed(std::slice::from_ref(&long), &[segs], device).unwrap(),
    ] {
        let fused =
            f32s(load::<B>(arch, Precision::Fp32, AttentionImpl::Fused, device).forward(&input));
        let standard =
            f32s(load::<B>(arch, Precision::Fp32, AttentionImpl::Standard, device).forward(&input));
        let err = max_abs_diff(&fused, &standard);
        println!("{arch}: 640 tokens, fused vs standard max abs difference {err:.3e}");
        assert!(err <= 1e-4, "{arch}: long fused vs standard {err}");
    }
}

/// `rows` cut to LongRoPE's pre-training context (Phi-3's fixture: 32 of 48 tokens), whole
/// for other models. LongRoPE rotates by other frequencies once a forward reaches beyond it
/// (as `transformers`), so a shorter forward, or a decoding step, is only comparable with a
/// full forward inside it; the switch itself is checked against `transformers.generate`
/// (train-logits' greedy test, whose Phi-3 rows cross it) and by `phi3_details_matter`.
fn within_context<B: FusedBackend>(model: &CausalLm<B>, mut rows: Vec<Vec<u32>>) -> Vec<Vec<u32>> {
    if let train_model::RopeScaling::LongRope {
        original_max_position_embeddings,
        ..
    } = model.config.rope.scaling
    {
        for r in &mut rows {
            r.truncate(original_max_position_embeddings as usize);
        }
    }
    rows
}

/// Decoding token by token through the KV cache gives the logits of one full forward. With
/// LongRoPE (Phi-3's fixture: 48-token rows, pre-training context 32), each step gives those of
/// a full forward over the tokens so far: the short factors up to 32 tokens, then (the cache
/// recomputed once, as `transformers`' generation does) the long ones.
pub fn kv_cache<B: FusedBackend>(arch: &str, attention: AttentionImpl, device: &B::Device) {
    let r = Reference::load(arch);
    let model = load::<B>(arch, Precision::Fp32, attention, device);
    if model.config.rope.switch_length().is_some() {
        return kv_cache_step_by_step(arch, &model, &r.rows("input_ids"), device);
    }
    let rows = r.rows("input_ids");
    let seq = rows[0].len();
    let full = f32s(model.forward(&ModelInput::from_rows(&rows, device).unwrap()));
    let mut cache = KvCache::for_model(&model);
    // A prefix of 5 tokens, then one token at a time.
    let mut start = 0;
    let mut steps = Vec::new();
    for end in std::iter::once(5).chain(6..=seq) {
        let chunk: Vec<Vec<u32>> = rows.iter().map(|r| r[start..end].to_vec()).collect();
        let mut input = ModelInput::from_rows(&chunk, device).unwrap();
        let pos: Vec<i64> = (0..rows.len())
            .flat_map(|_| start as i64..end as i64)
            .collect();
        input.position_ids =
            Tensor::from_data(TensorData::new(pos, [rows.len(), end - start]), device);
        steps.push(f32s(model.forward_cached(&input, &mut cache).unwrap()));
        start = end;
    }
    assert_eq!(cache.len(), seq);
    let vocab = model.config.vocab_size;
    let mut worst = 0f32;
    for (b, row_full) in full.chunks(seq * vocab).enumerate() {
        let mut t = 0;
        for step in &steps {
            let n = step.len() / rows.len() / vocab;
            let row = &step[b * n * vocab..(b + 1) * n * vocab];
            worst = worst.max(max_abs_diff(row, &row_full[t * vocab..(t + n) * vocab]));
            t += n;
        }
    }
    println!(
        "{arch} {attention:?}: cached decoding vs full forward max abs difference {worst:.3e}"
    );
    assert!(worst <= 1e-4, "{arch}: cached decoding differs by {worst}");
}

fn kv_cache_step_by_step<B: FusedBackend>(
    arch: &str,
    model: &CausalLm<B>,
    rows: &[Vec<u32>],
    device: &B::Device,
) {
    let seq = rows[0].len();
    let limit = model.config.rope.switch_length().unwrap();
    assert!(seq > limit + 2, "{arch}: the rows must cross the switch");
    let vocab = model.config.vocab_size;
    let mut cache = KvCache::for_model(model);
    let mut start = 0;
    let mut worst = 0f32;
    // A prefix of 5 tokens, then one at a time, then a chunk of 3 across the switch.
    let ends: Vec<usize> = std::iter::once(5)
        .chain(6..limit)
        .chain([limit + 2])
        .chain(limit + 3..=seq)
        .collect();
    for end in ends {
        let chunk: Vec<Vec<u32>> = rows.iter().map(|r| r[start..end].to_vec()).collect();
        let mut input = ModelInput::from_rows(&chunk, device).unwrap();
        let pos: Vec<i64> = (0..rows.len())
            .flat_map(|_| start as i64..end as i64)
            .collect();
        input.position_ids =
            Tensor::from_data(TensorData::new(pos, [rows.len(), end - start]), device);
        let step = f32s(model.forward_cached(&input, &mut cache).unwrap());
        let prefix: Vec<Vec<u32>> = rows.iter().map(|r| r[..end].to_vec()).collect();
        let full = f32s(model.forward(&ModelInput::from_rows(&prefix, device).unwrap()));
        let n = end - start;
        for b in 0..rows.len() {
            worst = worst.max(max_abs_diff(
                &step[b * n * vocab..(b + 1) * n * vocab],
                &full[(b * end + start) * vocab..(b + 1) * end * vocab],
            ));
        }
        start = end;
    }
    assert_eq!(cache.len(), seq);
    println!(
        "{arch}: cached decoding across LongRoPE's switch vs full forwards of each prefix {worst:.3e}"
    );
    assert!(worst <= 1e-4, "{arch}: cached decoding differs by {worst}");
}

/// A forward over the first `n` tokens of each row gives the first `n` positions of the full
/// forward (causality), also for rows shorter than a head: libtorch lays the projections of
/// such rows out with a strided last dimension, which its flash kernel must not be handed.
pub fn prefixes<B: FusedBackend>(arch: &str, attention: AttentionImpl, device: &B::Device) {
    let r = Reference::load(arch);
    let model = load::<B>(arch, Precision::Fp32, attention, device);
    let rows = within_context(&model, r.rows("input_ids"));
    let seq = rows[0].len();
    let vocab = model.config.vocab_size;
    let full = f32s(model.forward(&ModelInput::from_rows(&rows, device).unwrap()));
    for n in [1, 3, 5, 8, 17] {
        let chunk: Vec<Vec<u32>> = rows.iter().map(|r| r[..n].to_vec()).collect();
        let short = f32s(model.forward(&ModelInput::from_rows(&chunk, device).unwrap()));
        let worst = (0..rows.len())
            .map(|b| {
                max_abs_diff(
                    &short[b * n * vocab..(b + 1) * n * vocab],
                    &full[b * seq * vocab..(b * seq + n) * vocab],
                )
            })
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-4,
            "{arch} {attention:?}: the first {n} tokens alone differ from the full forward by {worst}"
        );
    }
}

/// bf16 compute stays close to transformers' bf16 logits (and to the f32 reference).
pub fn bf16_close<B: FusedBackend>(device: &B::Device) {
    let r = Reference::load("qwen3");
    let model = load::<B>("qwen3", Precision::Bf16, AttentionImpl::Standard, device);
    assert_eq!(model.dtype(), DType::BF16);
    let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
    let logits = f32s(model.forward(&input));
    let vs_torch = max_abs_diff(&logits, &r.get("logits_bf16").f32);
    let vs_f32 = max_abs_diff(&logits, &r.get("logits").f32);
    println!(
        "qwen3 bf16: max abs error vs transformers bf16 {vs_torch:.3e}, vs f32 reference {vs_f32:.3e}"
    );
    assert!(
        vs_torch <= 0.1 && vs_f32 <= 0.2,
        "bf16 logits too far: {vs_torch} / {vs_f32}"
    );
    let nll = causal_lm_nll(model.forward(&input), labels::<B>(&r, device)).0;
    assert!(f32s(nll)[0].is_finite());
}

/// f32 master weights with bf16 compute: gradients arrive in f32 for every parameter, and the
/// loss stays close to the f32 reference.
pub fn mixed_precision<B: FusedAutodiffBackend>(device: &B::Device) {
    let r = Reference::load("qwen2");
    let options = LoadOptions {
        precision: Precision::Bf16,
        f32_master_weights: true,
        ..LoadOptions::default()
    };
    let model = load_pretrained::<B>(&fixtures().join("qwen2"), &options, device)
        .unwrap()
        .model;
    assert_eq!(model.dtype(), DType::F32);
    assert_eq!(model.activation_dtype(), DType::BF16);
    let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
    let loss = causal_lm_loss(model.forward(&input), labels::<B>(&r, device));
    let value = f64::from(f32s(loss.clone())[0]);
    let expected = r.scalar("loss");
    println!(
        "qwen2 bf16 compute / f32 master weights: loss {value:.5} vs f32 reference {expected:.5}"
    );
    assert!(
        (value - expected).abs() < 0.05 * expected,
        "{value} vs {expected}"
    );
    let grads = loss.backward();
    let mut seen = 0;
    model.visit_named(|p| {
        let (name, g) = match p {
            NamedParam::Vector(n, t) => (
                n.to_string(),
                t.val().grad(&grads).map(|g| (g.dtype(), f32s(g))),
            ),
            NamedParam::Matrix(n, t) => (
                n.to_string(),
                t.val().grad(&grads).map(|g| (g.dtype(), f32s(g))),
            ),
        };
        let (dtype, values) = g.expect("every parameter gets a gradient");
        assert_eq!(dtype, DType::F32, "{name}");
        assert!(values.iter().all(|v| v.is_finite()));
        seen += 1;
    });
    assert_eq!(seen, 26);
}

/// Gradient checkpointing (each layer recomputed in the backward pass) on the fused path:
/// every gradient against `transformers`' and against the plain backward pass's, every family.
pub fn checkpointed<B: FusedAutodiffBackend>(device: &B::Device) {
    for arch in ARCHES {
        let r = Reference::load(arch);
        let model = load::<B>(arch, Precision::Fp32, AttentionImpl::Auto, device);
        let input = ModelInput::from_rows(&r.rows("input_ids"), device).unwrap();
        let grads_of = |m: &CausalLm<B>| -> Vec<(String, Vec<f32>)> {
            let forward = m.forward_for_training(&input, None, false);
            let loss = causal_lm_loss(m.logits(forward.hidden), labels::<B>(&r, device));
            let grads = forward.backprop.gradients(m, &loss);
            let mut out = Vec::new();
            m.visit_named(|p| {
                let (name, g) = match p {
                    NamedParam::Vector(n, t) => {
                        (n, grads.get::<B::InnerBackend, 1>(t.id).map(f32s))
                    }
                    NamedParam::Matrix(n, t) => {
                        (n, grads.get::<B::InnerBackend, 2>(t.id).map(f32s))
                    }
                };
                out.push((name.to_string(), g.unwrap_or_default()));
            });
            out
        };
        let plain = grads_of(&model);
        let checkpointed = grads_of(&model.clone().with_gradient_checkpointing(true));
        let (mut worst_ref, mut worst_plain) = (0f64, 0f64);
        for ((name, g), (_, p)) in checkpointed.iter().zip(&plain) {
            assert!(!g.is_empty(), "{arch}: no gradient for {name}");
            worst_ref = worst_ref.max(rel_err(g, &r.get(&format!("grad.{name}")).f32));
            worst_plain = worst_plain.max(rel_err(g, p));
        }
        println!(
            "{arch} {}: checkpointed gradients, worst relative error {worst_ref:.2e} vs \
             transformers, {worst_plain:.2e} vs the plain backward",
            B::name(device)
        );
        assert!(worst_ref <= GRAD_TOL, "{arch}: {worst_ref}");
        // A routed layer's input gradient sums its experts' contributions, in another order
        // once the layer is differentiated alone: last digits only.
        let bound = if *arch == "qwen3_moe" { 1e-5 } else { 1e-6 };
        assert!(worst_plain <= bound, "{arch}: {worst_plain}");
    }
}

/// Evaluation mode (`valid()`) of an autodiff model gives the same logits on the inner backend.
pub fn valid_matches<B: FusedAutodiffBackend>(arch: &str, device: &B::Device) {
    let r = Reference::load(arch);
    let model = load::<B>(arch, Precision::Fp32, AttentionImpl::Auto, device);
    let inner = model.valid();
    let input = ModelInput::<B::InnerBackend>::from_rows(&r.rows("input_ids"), device).unwrap();
    let err = max_abs_diff(&f32s(inner.forward(&input)), &r.get("logits").f32);
    assert!(err <= LOGITS_TOL, "{arch}: valid() logits error {err}");
}

macro_rules! backend_tests {
    ($module:ident, $inner:ty, $device:expr) => {
        mod $module {
            use super::*;
            type Inner = $inner;
            type Ad = burn::backend::Autodiff<Inner>;

            fn device() -> burn::tensor::Device<Inner> {
                $device
            }

            #[test]
            fn qwen3_forward_backward() {
                forward_backward::<Ad>("qwen3", &device());
            }
            #[test]
            fn qwen2_forward_backward() {
                forward_backward::<Ad>("qwen2", &device());
            }
            #[test]
            fn llama_forward_backward() {
                forward_backward::<Ad>("llama", &device());
            }
            #[test]
            fn mistral_forward_backward() {
                forward_backward::<Ad>("mistral", &device());
            }
            #[test]
            fn ministral_forward_backward() {
                forward_backward::<Ad>("ministral", &device());
            }
            #[test]
            fn olmo2_forward_backward() {
                forward_backward::<Ad>("olmo2", &device());
            }
            #[test]
            fn smollm3_forward_backward() {
                forward_backward::<Ad>("smollm3", &device());
            }
            #[test]
            fn gemma3_forward_backward() {
                forward_backward::<Ad>("gemma3", &device());
            }
            #[test]
            fn phi3_forward_backward() {
                forward_backward::<Ad>("phi3", &device());
            }
            #[test]
            fn qwen3_moe_forward_backward() {
                forward_backward::<Ad>("qwen3_moe", &device());
            }
            #[test]
            fn fused_ops_forward_backward_match_transformers() {
                for arch in ARCHES {
                    forward_backward_with::<Ad>(arch, AttentionImpl::Auto, &device());
                }
            }
            #[test]
            fn adamw_steps_match() {
                for arch in ARCHES {
                    adamw_step::<Ad>(arch, &device());
                }
            }
            #[test]
            fn packed_rows_do_not_attend_to_each_other() {
                for arch in ARCHES {
                    packed::<Inner>(arch, AttentionImpl::Standard, &device());
                    packed::<Inner>(arch, AttentionImpl::Fused, &device());
                    packed::<Ad>(arch, AttentionImpl::Auto, &device());
                }
            }
            #[test]
            fn fused_and_standard_attention_agree() {
                for arch in ARCHES {
                    fused_matches_standard::<Inner>(arch, &device());
                }
            }
            #[test]
            fn prefixes_match_the_full_forward() {
                for arch in ARCHES {
                    prefixes::<Inner>(arch, AttentionImpl::Standard, &device());
                    prefixes::<Inner>(arch, AttentionImpl::Fused, &device());
                }
            }

            #[test]
            fn kv_cache_matches_full_forward() {
                for arch in ARCHES {
                    kv_cache::<Inner>(arch, AttentionImpl::Standard, &device());
                    kv_cache::<Inner>(arch, AttentionImpl::Fused, &device());
                }
            }
            #[test]
            fn the_sliding_window_is_honoured() {
                windows_matter::<Inner>(AttentionImpl::Standard, &device());
                windows_matter::<Inner>(AttentionImpl::Fused, &device());
            }
            #[test]
            fn layers_without_rotary_embedding_are_honoured() {
                nope_layers_matter::<Inner>(AttentionImpl::Standard, &device());
                nope_layers_matter::<Inner>(AttentionImpl::Fused, &device());
            }
            #[test]
            fn gemma3_details_are_honoured() {
                gemma3_details_matter::<Inner>(AttentionImpl::Standard, &device());
                gemma3_details_matter::<Inner>(AttentionImpl::Fused, &device());
            }
            #[test]
            fn phi3_details_are_honoured() {
                phi3_details_matter::<Inner>(AttentionImpl::Standard, &device());
                phi3_details_matter::<Inner>(AttentionImpl::Fused, &device());
            }
            #[test]
            fn qwen3_moe_router_loss_matches_transformers() {
                router_aux_loss::<Ad>(&device());
            }
            #[test]
            fn qwen3_moe_details_are_honoured() {
                qwen3_moe_details_matter::<Inner>(AttentionImpl::Standard, &device());
                qwen3_moe_details_matter::<Inner>(AttentionImpl::Fused, &device());
            }
            #[test]
            fn bf16_is_close_to_reference() {
                bf16_close::<Inner>(&device());
            }
            #[test]
            fn bf16_compute_with_f32_master_weights() {
                mixed_precision::<Ad>(&device());
            }
            #[test]
            fn gradient_checkpointing_matches_transformers() {
                checkpointed::<Ad>(&device());
            }
            #[test]
            fn valid_model_matches() {
                valid_matches::<Ad>("qwen2", &device());
            }
        }
    };
}

#[cfg(feature = "cpu")]
backend_tests!(cpu, burn::backend::Flex, Default::default());

#[cfg(feature = "tch")]
backend_tests!(
    tch,
    burn::backend::LibTorch,
    burn::backend::libtorch::LibTorchDevice::Cpu
);

// Runs on a machine with an NVIDIA GPU (`cargo test -p train-model --features cuda --test it parity::cuda`);
// CI only compiles it.
#[cfg(feature = "cuda")]
backend_tests!(cuda, burn::backend::Cuda, Default::default());
