//! The whole preparation: transforms, truncation, split, stats, caching, determinism.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use train_data::{
    ChatTokenizer, DatasetConfig, ErrorPolicy, LabelMode, LoadOptions, ProblemKind, Transform,
    TransformContext, TransformPipeline, Truncation, prepare, prepare_cached, read_prepared,
    write_prepared,
};

fn tok() -> ChatTokenizer {
    ChatTokenizer::from_model_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2"),
    )
    .unwrap()
}

fn data(dir: &Path, rows: usize) -> PathBuf {
    let mut text = String::new();
    for i in 0..rows {
        let answer = "word ".repeat(1 + i % 7);
        text.push_str(&format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"Question {i}?\"}}, {{\"role\": \"assistant\", \"content\": \"{}\"}}]}}\n",
            answer.trim()
        ));
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn config(path: PathBuf) -> DatasetConfig {
    DatasetConfig {
        dataset_path: path,
        max_length: 64,
        ..DatasetConfig::default()
    }
}

#[test]
fn prepare_splits_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DatasetConfig {
        max_length: 256,
        ..config(data(dir.path(), 40))
    };
    let p = prepare(&cfg, &tok(), None).unwrap();
    assert_eq!((p.stats.rows_read, p.stats.examples), (40, 40));
    assert_eq!((p.train.len(), p.validation.len()), (36, 4));
    assert_eq!(
        p.stats.label_tokens,
        p.train
            .iter()
            .chain(&p.validation)
            .map(train_data::Example::label_tokens)
            .sum::<usize>()
    );
    assert!(
        p.stats.packing_efficiency > 0.5 && p.stats.packing_efficiency <= 1.0,
        "{}",
        p.stats.packing_efficiency
    );
    assert!(p.stats.packed_rows < p.train.len());
    // Deterministic: a rerun gives identical data.
    let again = prepare(&cfg, &tok(), None).unwrap();
    assert_eq!(p.train, again.train);
    assert_eq!(p.validation, again.validation);
    // Another seed, another split.
    let other = prepare(
        &DatasetConfig {
            seed: 7,
            ..cfg.clone()
        },
        &tok(),
        None,
    )
    .unwrap();
    assert_ne!(p.validation, other.validation);
}

#[test]
fn truncation_and_rows_left_without_labels_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = data(dir.path(), 10);
    // 12 tokens keep the user turn but cut every answer.
    let cfg = DatasetConfig {
        max_length: 12,
        validation_split: 0.0,
        ..config(path.clone())
    };
    let p = prepare(&cfg, &tok(), None).unwrap();
    assert_eq!(p.stats.examples, 0);
    assert_eq!(p.stats.rows_without_labels, 10);
    assert_eq!(p.stats.truncated_rows, 10);
    assert!(
        p.problems
            .iter()
            .all(|x| x.kind == ProblemKind::AllLabelsTruncated && x.location.line.is_some())
    );
    let dropped = prepare(
        &DatasetConfig {
            truncation: Truncation::Drop,
            ..cfg
        },
        &tok(),
        None,
    )
    .unwrap();
    assert_eq!(dropped.stats.dropped_rows, 10);
    assert!(
        dropped
            .problems
            .iter()
            .all(|x| x.kind == ProblemKind::TooLong)
    );
}

#[test]
fn configured_transforms_and_label_mode_apply() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DatasetConfig {
        system_prompt: Some("Be brief.".into()),
        apply_thinking_pattern: true,
        thinking_emoji: "🤔".into(),
        label_mode: LabelMode::Everything,
        validation_split: 0.0,
        ..config(data(dir.path(), 3))
    };
    let p = prepare(&cfg, &tok(), None).unwrap();
    let t = tok();
    let text = t.tokenizer().decode(&p.train[0].input_ids, false).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nBe brief.<|im_end|>"),
        "{text}"
    );
    assert!(
        text.contains("think with 🤔 /") && text.contains("<|im_start|>assistant\n🤔🤔"),
        "{text}"
    );
    assert_eq!(p.train[0].label_tokens(), p.train[0].len() - 1);
}

struct Shout;
impl Transform for Shout {
    fn name(&self) -> &str {
        "shout"
    }
    fn apply(&self, c: &mut train_data::Conversation, _ctx: &TransformContext) {
        for m in &mut c.messages {
            m.content = m.content.to_uppercase();
        }
    }
}

#[test]
fn custom_transforms_plug_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = TransformPipeline::default();
    extra.push(Box::new(Shout));
    let cfg = DatasetConfig {
        validation_split: 0.0,
        ..config(data(dir.path(), 2))
    };
    let p = prepare(&cfg, &tok(), Some(&extra)).unwrap();
    let text = tok()
        .tokenizer()
        .decode(&p.train[0].input_ids, false)
        .unwrap();
    assert!(text.contains("QUESTION 0?"), "{text}");
}

#[test]
fn cache_skips_tokenization_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = config(data(dir.path(), 30));
    let (first, hit) = prepare_cached(&cfg, &tok(), &cache).unwrap();
    assert!(!hit);
    let (second, hit) = prepare_cached(&cfg, &tok(), &cache).unwrap();
    assert!(hit);
    assert_eq!(first.train, second.train);
    assert_eq!(first.validation, second.validation);
    assert_eq!(first.stats, second.stats);
    // A different configuration is another key.
    let (_, hit) = prepare_cached(
        &DatasetConfig {
            max_length: 65,
            ..cfg.clone()
        },
        &tok(),
        &cache,
    )
    .unwrap();
    assert!(!hit);
    // A changed data file is another key too.
    data(dir.path(), 31);
    let (_, hit) = prepare_cached(&cfg, &tok(), &cache).unwrap();
    assert!(!hit);

    let out = dir.path().join("prepared");
    write_prepared(&out, &first).unwrap();
    let back = read_prepared(&out).unwrap();
    assert_eq!(back.train, first.train);
}

#[test]
fn strict_policy_stops_and_skip_reports() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    std::fs::write(&path, "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\nnot json\n").unwrap();
    let e = prepare(&config(path.clone()), &tok(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("d.jsonl:2"), "{e}");
    let cfg = DatasetConfig {
        load: LoadOptions {
            policy: ErrorPolicy::Skip,
            ..LoadOptions::default()
        },
        validation_split: 0.0,
        ..config(path)
    };
    let p = prepare(&cfg, &tok(), None).unwrap();
    assert_eq!((p.stats.examples, p.stats.invalid_rows), (1, 1));
}
