//! Greedy generation against `transformers` `generate` on the tiny fixture models, batching,
//! per-row stops and the processors inside the loop.

use std::path::{Path, PathBuf};

use serde_json::Value;
use train_data::{ChatTokenizer, Message, Role};
use train_logits::{
    Decoding, GenerationConfig, LogitsProcessor, ProcessorConfig, ProcessorContext, StopReason,
    generate,
};
use train_model::{CausalLm, FusedBackend, LoadOptions, Precision, load_pretrained};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> Value {
    let text =
        std::fs::read_to_string(root().join("tests/fixtures/generate.reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model_dir(arch: &str) -> PathBuf {
    root().join("../train-model/tests/fixtures").join(arch)
}

fn load<B: FusedBackend>(dir: &Path, device: &B::Device) -> CausalLm<B> {
    let options = LoadOptions {
        precision: Precision::Fp32,
        ..LoadOptions::default()
    };
    load_pretrained::<B>(dir, &options, device).unwrap().model
}

fn as_ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

const QUESTIONS: [&str; 3] = [
    "Hello, how are you?",
    "What is a computer?",
    "Tell me a joke about cats and dogs, please.",
];

/// The families of the fixture models.
const ARCHES: &[&str] = &[
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

fn config(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        ..GenerationConfig::default()
    }
}

fn greedy_tokens_match_transformers_alone_and_batched<B: FusedBackend>(device: &B::Device) {
    let r = reference();
    let n = usize::try_from(r["max_new_tokens"].as_u64().unwrap()).unwrap();
    for arch in ARCHES {
        let dir = model_dir(arch);
        let model = load::<B>(&dir, device);
        let tok = ChatTokenizer::from_model_dir(&dir).unwrap();
        let rows = r["arches"][arch]["rows"].as_array().unwrap();
        let mut prompts = Vec::new();
        for (q, row) in QUESTIONS.iter().zip(rows) {
            // Our chat template and tokenizer give transformers' prompt ids.
            let prompt = tok.encode_prompt(&[Message::new(Role::User, *q)]).unwrap();
            assert_eq!(prompt, as_ids(&row["prompt"]), "{arch}: prompt of {q:?}");
            prompts.push(prompt);
        }
        let want: Vec<Vec<u32>> = rows.iter().map(|row| as_ids(&row["generated"])).collect();
        for (p, w) in prompts.iter().zip(&want) {
            let got = generate(
                &model,
                Some(tok.tokenizer()),
                std::slice::from_ref(p),
                &mut [],
                &config(n),
            )
            .unwrap();
            assert_eq!(&got[0].token_ids, w, "{arch}: alone");
            assert_eq!(got[0].stop_reason, StopReason::MaxNewTokens);
        }
        // All prompts at once, left-padded to the longest: the tokens of each alone, except
        // with LongRoPE (Phi-3), whose frequencies follow the batch's longest row: then
        // transformers' own left-padded batch.
        let want = match r["arches"][arch].get("batched") {
            Some(b) => b["generated"]
                .as_array()
                .unwrap()
                .iter()
                .map(as_ids)
                .collect(),
            None => want,
        };
        let got = generate(&model, Some(tok.tokenizer()), &prompts, &mut [], &config(n)).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(&g.token_ids, w, "{arch}: batched");
            assert_eq!(g.text, tok.tokenizer().decode(w, true).unwrap());
        }
        eprintln!(
            "{arch}: {} prompts × {n} greedy tokens identical to transformers, alone and batched",
            prompts.len()
        );
    }
}

fn rows_stop_on_their_own_end_token_and_stop_string<B: FusedBackend>(device: &B::Device) {
    let r = reference();
    let dir = model_dir("qwen2");
    let model = load::<B>(&dir, device);
    let tok = ChatTokenizer::from_model_dir(&dir).unwrap();
    let rows = r["arches"]["qwen2"]["rows"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = rows.iter().map(|row| as_ids(&row["prompt"])).collect();
    let want: Vec<Vec<u32>> = rows.iter().map(|row| as_ids(&row["generated"])).collect();
    // Row 0's 4th greedy token ends row 0 only (unless another row produces it too).
    let end = want[0][3];
    let cfg = GenerationConfig {
        stop_token_ids: vec![end],
        ..config(16)
    };
    let got = generate(&model, Some(tok.tokenizer()), &prompts, &mut [], &cfg).unwrap();
    assert_eq!(got[0].stop_reason, StopReason::Eos);
    assert_eq!(got[0].token_ids, want[0][..4]);
    assert_eq!(
        got[0].text,
        tok.tokenizer().decode(&want[0][..3], true).unwrap()
    );
    for (g, w) in got.iter().zip(&want).skip(1) {
        let stop = w.iter().position(|&t| t == end).map_or(w.len(), |i| i + 1);
        assert_eq!(g.token_ids, w[..stop], "other rows go on");
    }
    // A stop string made of the text of row 1's tokens 2..5, whatever their boundaries.
    let text = tok.tokenizer().decode(&want[1], false).unwrap();
    let upto = tok.tokenizer().decode(&want[1][..5], false).unwrap();
    let from = tok.tokenizer().decode(&want[1][..2], false).unwrap();
    let s = upto[from.len()..].to_string();
    assert!(!s.is_empty() && text.contains(&s));
    let cfg = GenerationConfig {
        stop_strings: vec![s.clone()],
        ..config(16)
    };
    let got = generate(&model, Some(tok.tokenizer()), &prompts[1..2], &mut [], &cfg).unwrap();
    assert_eq!(got[0].stop_reason, StopReason::StopString);
    assert_eq!(got[0].stop_string.as_deref(), Some(s.as_str()));
    let first = (1..=want[1].len())
        .find(|&k| {
            tok.tokenizer()
                .decode(&want[1][..k], false)
                .unwrap()
                .contains(&s)
        })
        .unwrap();
    assert_eq!(got[0].token_ids, want[1][..first]);
}

fn stop_strings_stop_where_transformers_does<B: FusedBackend>(device: &B::Device) {
    let r = reference();
    let mut checked = 0;
    for arch in ARCHES {
        let dir = model_dir(arch);
        let model = load::<B>(&dir, device);
        let tok = ChatTokenizer::from_model_dir(&dir).unwrap();
        let rows = r["arches"][arch]["rows"].as_array().unwrap();
        for case in r["arches"][arch]["stop_strings"].as_array().unwrap() {
            let row = &rows[usize::try_from(case["row"].as_u64().unwrap()).unwrap()];
            let s = case["string"].as_str().unwrap().to_string();
            let cfg = GenerationConfig {
                stop_strings: vec![s.clone()],
                ..config(16)
            };
            let got = generate(
                &model,
                Some(tok.tokenizer()),
                &[as_ids(&row["prompt"])],
                &mut [],
                &cfg,
            );
            if s.contains('\u{fffd}') {
                // transformers never matches it (it compares token bytes); we refuse it.
                assert!(
                    got.is_err() && case["stops_after"].is_null(),
                    "{arch} {s:?}"
                );
                continue;
            }
            let got = got.unwrap().remove(0);
            match case["stops_after"].as_u64() {
                Some(k) => {
                    assert_eq!(got.stop_reason, StopReason::StopString, "{arch} {s:?}");
                    assert_eq!(got.token_ids.len() as u64, k, "{arch} {s:?}");
                }
                None => assert_eq!(got.stop_reason, StopReason::MaxNewTokens, "{arch} {s:?}"),
            }
            checked += 1;
        }
    }
    eprintln!(
        "{checked} stop strings stop after the same token as transformers' StopStringCriteria"
    );
    assert!(checked >= 20);
}

fn processors_steer_generation_and_sampling_is_seeded<B: FusedBackend>(device: &B::Device) {
    let r = reference();
    let dir = model_dir("llama");
    let model = load::<B>(&dir, device);
    let tok = ChatTokenizer::from_model_dir(&dir).unwrap();
    let rows = r["arches"]["llama"]["rows"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = rows.iter().map(|row| as_ids(&row["prompt"])).collect();
    let want0 = as_ids(&rows[0]["generated"]);
    // Suppressing the first greedy token changes the first token and nothing panics.
    let ends = [0u32];
    let ctx = ProcessorContext {
        tokenizer: Some(tok.tokenizer()),
        end_ids: &ends,
    };
    let mut procs: Vec<Box<dyn LogitsProcessor>> = vec![
        ProcessorConfig::SuppressTokens {
            token_ids: vec![want0[0]],
            tokens: vec![],
        }
        .build(&ctx)
        .unwrap(),
    ];
    let got = generate(
        &model,
        Some(tok.tokenizer()),
        &prompts[..1],
        &mut procs,
        &config(4),
    )
    .unwrap();
    assert_ne!(got[0].token_ids[0], want0[0]);
    assert!(!got[0].token_ids.contains(&want0[0]));

    // Seeded sampling: same seed, same tokens; a row's draws do not depend on the batch.
    let sample = |seed, prompts: &[Vec<u32>]| {
        let cfg = GenerationConfig {
            decoding: Decoding::Sample { seed },
            ..config(8)
        };
        generate(&model, Some(tok.tokenizer()), prompts, &mut [], &cfg).unwrap()
    };
    let a = sample(7, &prompts);
    let b = sample(7, &prompts);
    assert_eq!(a, b);
    let alone = sample(7, &prompts[..1]);
    assert_eq!(alone[0].token_ids, a[0].token_ids);
    let c = sample(8, &prompts);
    assert_ne!(a, c);
}

fn bad_requests_are_errors<B: FusedBackend>(device: &B::Device) {
    let model = load::<B>(&model_dir("qwen2"), device);
    assert!(generate(&model, None, &[], &mut [], &config(4)).is_err());
    assert!(generate(&model, None, &[vec![]], &mut [], &config(4)).is_err());
    assert!(generate(&model, None, &[vec![1, 1_000_000]], &mut [], &config(4)).is_err());
    let cfg = GenerationConfig {
        stop_strings: vec!["x".into()],
        ..config(4)
    };
    assert!(generate(&model, None, &[vec![1, 2]], &mut [], &cfg).is_err());
    let zero = generate(&model, None, &[vec![1, 2]], &mut [], &config(0)).unwrap();
    assert!(zero[0].token_ids.is_empty());
    assert_eq!(zero[0].stop_reason, StopReason::MaxNewTokens);
}

macro_rules! backend_tests {
    ($name:ident, $backend:ty, $device:expr) => {
        mod $name {
            type B = $backend;

            fn device() -> burn::tensor::Device<B> {
                $device
            }

            #[test]
            fn greedy_tokens_match_transformers_alone_and_batched() {
                super::greedy_tokens_match_transformers_alone_and_batched::<B>(&device());
            }
            #[test]
            fn rows_stop_on_their_own_end_token_and_stop_string() {
                super::rows_stop_on_their_own_end_token_and_stop_string::<B>(&device());
            }
            #[test]
            fn stop_strings_stop_where_transformers_does() {
                super::stop_strings_stop_where_transformers_does::<B>(&device());
            }
            #[test]
            fn processors_steer_generation_and_sampling_is_seeded() {
                super::processors_steer_generation_and_sampling_is_seeded::<B>(&device());
            }
            #[test]
            fn bad_requests_are_errors() {
                super::bad_requests_are_errors::<B>(&device());
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

// Runs on a machine with an NVIDIA GPU (`cargo test -p train-logits --features cuda --test it generate::cuda`);
// CI only compiles it.
#[cfg(feature = "cuda")]
backend_tests!(cuda, burn::backend::Cuda, Default::default());
