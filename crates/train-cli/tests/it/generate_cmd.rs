//! `train generate` per the contract: greedy ids equal to `transformers` `generate`, processors
//! from TOML, clear errors.
#![cfg(feature = "cpu")]

use crate::common::{last_json, root, train, train_ok};

#[test]
fn greedy_answer_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            root().join("crates/train-logits/tests/fixtures/generate.reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let model = root().join("crates/train-model/tests/fixtures/qwen3");
    let o = train_ok(
        dir.path(),
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Hello, how are you?",
            "--max-new-tokens",
            "16",
            "--json",
        ],
    );
    let g = last_json(&o);
    assert_eq!(
        g["token_ids"],
        reference["arches"]["qwen3"]["rows"][0]["generated"]
    );
    assert_eq!(g["tokens"], 16);
    assert_eq!(g["stop_reason"], "max_new_tokens");
    assert!(g["text"].is_string());
}

#[test]
fn processors_file_and_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("crates/train-model/tests/fixtures/qwen3");
    let procs = dir.path().join("p.toml");
    std::fs::write(
        &procs,
        "[[processors]]\ntype = \"emoji_think\"\ntokens = [\"<think>\", \"</think>\"]\npenalty = 80.0\n\n\
         [[processors]]\ntype = \"post_stop_penalty\"\nbase = 100.0\nrate = 10.0\neot_reward = 50.0\n",
    )
    .unwrap();
    let args = |seed: &'static str| {
        vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Hi",
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "6",
            "--processors",
            procs.to_str().unwrap(),
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let run = |seed| {
        let a = args(seed);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let o = train_ok(dir.path(), &a);
        last_json(&o)
    };
    let (a, b) = (run("3"), run("3"));
    assert_eq!(a["token_ids"], b["token_ids"], "same seed, same tokens");
    assert_eq!(a["tokens"], 6);
    assert_eq!(a["processors"][0]["processor"], "post_stop_penalty");
    assert_eq!(a["processors"][0]["rows"][0]["stops_seen"], 0);
}

#[test]
fn bad_requests_exit_1_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("crates/train-model/tests/fixtures/qwen3");
    let m = model.to_str().unwrap();
    let o = train(
        dir.path(),
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--temperature",
            "0",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("temperature"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[processors]]\ntype = \"top_q\"\n").unwrap();
    let o = train(
        dir.path(),
        &[
            "generate",
            "--model",
            m,
            "--prompt",
            "x",
            "--processors",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
    let o = train(
        dir.path(),
        &["generate", "--model", "/nonexistent/model", "--prompt", "x"],
    );
    assert_eq!(o.status.code(), Some(1));
}
