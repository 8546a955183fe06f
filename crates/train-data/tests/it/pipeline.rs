//! The whole preparation: transforms, truncation, split, stats, caching, determinism.

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

/// Packing is the data side's: the prepared dataset carries the rows, packed once (the same
/// packing as the statistics), and one cache entry serves both layouts; the fingerprint is the
/// cache key, computed once.
#[test]
fn prepared_rows_follow_packing_and_share_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = DatasetConfig {
        max_length: 256,
        ..config(data(dir.path(), 30))
    };
    let (plain, hit) = prepare_cached(&cfg, &tok(), &cache).unwrap();
    assert!(!hit);
    assert_eq!(plain.rows.packed_to, None);
    assert_eq!(plain.rows.len(), plain.train.len());
    assert_eq!(
        plain.fingerprint,
        train_data::cache_key(&cfg, &tok()).unwrap()
    );
    let packing = DatasetConfig {
        packing: Some(true),
        ..cfg.clone()
    };
    assert_eq!(
        train_data::cache_key(&packing, &tok()).unwrap(),
        plain.fingerprint,
        "packing does not change the tokenized examples"
    );
    let (packed, hit) = prepare_cached(&packing, &tok(), &cache).unwrap();
    assert!(
        hit,
        "the entry written without packing serves the packed layout"
    );
    assert_eq!(packed.rows.packed_to, Some(256));
    assert!(packed.rows.len() < plain.rows.len(), "examples share rows");
    assert_eq!(packed.rows.len(), packed.stats.packed_rows);
    assert_eq!(
        packed.rows.packing_efficiency,
        Some(packed.stats.packing_efficiency)
    );
    let tokens = |rows: &train_data::TrainRows| {
        rows.rows
            .iter()
            .map(train_data::Sequence::len)
            .sum::<usize>()
    };
    assert_eq!(tokens(&packed.rows), tokens(&plain.rows));
    assert!(packed.rows.rows.iter().all(|r| r.len() <= 256));
    // Uncached, the same rows.
    let direct = prepare(&packing, &tok(), None).unwrap();
    assert_eq!(direct.rows, packed.rows);
    assert!(direct.fingerprint.is_empty());
    // One check of max_length, wherever it is set.
    for bad in [0, 1, train_data::MAX_LENGTH + 1] {
        let e = prepare(
            &DatasetConfig {
                max_length: bad,
                ..cfg.clone()
            },
            &tok(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_length"), "{e}");
        assert!(train_data::check_max_length(bad).is_err());
    }
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

/// A tampered cache entry (token ids beyond the vocabulary, labels that are not the tokens at
/// their positions) is not used: the dataset is rebuilt from the data file and the problems
/// name the cache file and what was wrong.
#[test]
fn r_tampered_cache_is_rebuilt_and_reported() {
    use train_data::{Example, cache_key};
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = config(data(dir.path(), 12));
    let tok = tok();
    let (first, hit) = prepare_cached(&cfg, &tok, &cache).unwrap();
    assert!(!hit);
    let entry = cache.join(cache_key(&cfg, &tok).unwrap());
    let tamper = |f: &dyn Fn(&mut Example)| {
        let mut train = first.train.clone();
        f(&mut train[3]);
        train_data::write_examples(&entry.join("train.parquet"), &train).unwrap();
    };
    let vocab = tok.vocab_size() as u32;
    type Tamper<'a> = &'a dyn Fn(&mut Example);
    let cases: [(Tamper<'_>, &str); 3] = [
        (
            &|e| e.input_ids[2] = vocab + 7,
            "is not below the tokenizer's vocabulary size",
        ),
        (&|e| e.labels[1] = -7, "is neither ignored nor the token id"),
        (
            &|e| {
                e.input_ids.extend(std::iter::repeat_n(1, 100));
                e.labels.extend(std::iter::repeat_n(-100, 100));
            },
            "over the maximum length of 64",
        ),
    ];
    for (f, why) in cases {
        tamper(f);
        let (again, hit) = prepare_cached(&cfg, &tok, &cache).unwrap();
        assert!(!hit, "{why}");
        assert_eq!(again.train, first.train);
        let p = &again.problems[0];
        assert_eq!(p.kind, ProblemKind::InvalidCache);
        assert!(
            p.message.contains("train.parquet") && p.message.contains(why),
            "{}",
            p.message
        );
        // The rebuilt entry is used by the next run.
        let (_, hit) = prepare_cached(&cfg, &tok, &cache).unwrap();
        assert!(hit);
    }
}

/// A FIFO as the data file is refused at once by the cache too (its key hashes the file).
#[test]
fn r_fifo_dataset_is_refused_by_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap()
            .success()
    );
    let cache = dir.path().join("cache");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(
            prepare_cached(&config(p), &tok(), &cache)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        );
    });
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("hung on a FIFO")
        .unwrap_err();
    assert!(e.contains("d.jsonl") && e.contains("FIFO"), "{e}");
}

/// When truncation to `max_length` removed the labels, the problem says so (and where the
/// labels were), rather than "no label tokens".
#[test]
fn r_truncation_is_named_when_it_removed_the_labels() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DatasetConfig {
        max_length: 12,
        validation_split: 0.0,
        ..config(data(dir.path(), 3))
    };
    let p = prepare(&cfg, &tok(), None).unwrap();
    for x in &p.problems {
        assert!(
            x.message
                .contains("truncation to max_length 12 removed every label token")
                && !x.message.contains("no label tokens"),
            "{}",
            x.message
        );
    }
    assert_eq!(p.problems.len(), 3);
    let r = train_data::check_file(
        &cfg.dataset_path,
        &LoadOptions::default(),
        Some((&tok(), 12)),
    )
    .unwrap();
    let truncated: Vec<_> = r
        .problems
        .iter()
        .filter(|x| x.kind == ProblemKind::AllLabelsTruncated)
        .collect();
    assert_eq!(truncated.len(), 3);
    assert!(
        truncated[0]
            .message
            .contains("truncation to max_length 12 would remove every label token")
    );
}

/// Past a few thousand rows every worker thread encodes with its own copy of the tokenizer;
/// the result is the same as encoding the rows one by one with the original, in file order,
/// on two threads and on one.
#[test]
fn prepare_with_tokenizer_copies_matches_row_by_row() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DatasetConfig {
        max_length: 256,
        validation_split: 0.0,
        ..config(data(dir.path(), 5000))
    };
    let tok = tok();
    let loaded = train_data::load_conversations(&cfg.dataset_path, &cfg.load).unwrap();
    let expected: Vec<(Vec<u32>, Vec<i32>)> = loaded
        .conversations
        .iter()
        .map(|c| {
            let e = tok.encode_with_mode(c, cfg.label_mode).unwrap();
            (e.input_ids, e.labels)
        })
        .collect();
    for threads in [2, 1] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let p = pool.install(|| prepare(&cfg, &tok, None)).unwrap();
        let got: Vec<(Vec<u32>, Vec<i32>)> = p
            .train
            .into_iter()
            .map(|e| (e.input_ids, e.labels))
            .collect();
        assert_eq!(got.len(), 5000);
        assert!(got == expected, "{threads} threads: rows differ");
    }
}
