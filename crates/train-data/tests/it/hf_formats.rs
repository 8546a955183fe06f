//! TRL's row shapes against TRL itself (`hf_formats.reference.json`, made by `cargo xtask
//! fixtures` with `SFTTrainer`'s own dataset preparation): `text` rows and plain-string
//! prompt/completion rows tokenized without the chat template (EOS appended, the tokenizer's
//! BOS added), conversational prompt/completion rows trained on the completion only; and
//! conversations with `tools` and `tool_calls` rendered byte for byte as
//! `apply_chat_template(messages, tools=tools)` renders them.

use std::path::{Path, PathBuf};

use serde_json::Value;
use train_data::{ChatTokenizer, IGNORE_INDEX, LoadOptions, Role, load_conversations};

fn model_dir(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../train-model/tests/fixtures")
        .join(arch)
}

fn cases() -> Vec<Value> {
    serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_formats.reference.json"),
        )
        .unwrap(),
    )
    .unwrap()
}

fn numbers(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The row as this crate loads it from a JSONL file.
fn load(row: &Value) -> train_data::Conversation {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("row.jsonl");
    std::fs::write(&path, format!("{row}\n")).unwrap();
    let mut loaded = load_conversations(&path, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.conversations.len(), 1, "{row}");
    loaded.conversations.remove(0)
}

#[test]
fn every_shape_tokenizes_and_masks_as_trl() {
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for case in cases() {
        let arch = case["arch"].as_str().unwrap();
        let shape = case["shape"].as_str().unwrap();
        let tok = ChatTokenizer::from_model_dir(&model_dir(arch)).unwrap();
        let conversation = load(&case["row"]);
        let encoded = tok.encode(&conversation).unwrap();
        let ids: Vec<i64> = encoded.input_ids.iter().map(|&t| i64::from(t)).collect();
        assert_eq!(
            ids,
            numbers(&case["input_ids"]),
            "{arch} {shape}: {}",
            case["row"]
        );
        if shape == "tools" {
            let tools: Value =
                serde_json::from_str(conversation.tools.as_deref().unwrap()).unwrap();
            let mut extra = serde_json::Map::new();
            extra.insert("tools".into(), tools);
            let text = tok
                .template()
                .render_with(&conversation.messages, false, &extra)
                .unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{arch} tools");
            // The tool answers are context; the assistant turns (tool calls included) are
            // trained.
            let trained: String = encoded
                .input_ids
                .iter()
                .zip(&encoded.labels)
                .filter(|(_, l)| **l != IGNORE_INDEX)
                .map(|(&t, _)| tok.tokenizer().id_to_token(t).unwrap())
                .collect();
            for m in &conversation.messages {
                let piece = m.content.replace(' ', "Ġ");
                match m.role {
                    Role::Assistant if !m.content.is_empty() => {
                        assert!(trained.contains(&piece), "{piece} in {trained}");
                    }
                    Role::Tool | Role::User => {
                        assert!(!trained.contains(&piece), "{piece} in {trained}");
                    }
                    _ => {}
                }
            }
            assert!(trained.contains("get_weather"), "{trained}");
        } else {
            let labels: Vec<i64> = encoded.labels.iter().map(|&l| i64::from(l)).collect();
            assert_eq!(
                labels,
                numbers(&case["labels"]),
                "{arch} {shape}: {}",
                case["row"]
            );
        }
        *seen.entry(format!("{arch} {shape}")).or_default() += 1;
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
}

#[test]
fn rows_of_no_shape_and_bad_shapes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (row, expected) in [
        (r#"{"prompt": "a"}"#, "field `completion`: missing"),
        (r#"{"completion": "a"}"#, "field `prompt`: missing"),
        (
            r#"{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}"#,
            "both be strings or both lists",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}"#,
            "completion[0].role",
        ),
        (r#"{"text": 3}"#, "field `text`: must be a string"),
        (r#"{"text": "  "}"#, "empty `text`"),
        (r#"{"prompt": "a", "completion": ""}"#, "empty `completion`"),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "not json"}"#,
            "field `tools`: a string that is not JSON",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": [1]}"#,
            "field `tools`: must be a list of tool schemas",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}"#,
            "found tool",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a", "tool_calls": []}, {"role": "assistant", "content": "b"}]}"#,
            "only an assistant message calls tools",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}, {"role": "user", "content": "b"}]}"#,
            "expected a tool turn",
        ),
        (r#"{"foo": 1}"#, "no supported shape"),
    ] {
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, format!("{row}\n")).unwrap();
        let e = load_conversations(&path, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(expected) && e.contains("bad.jsonl:1"),
            "{row}: {e}"
        );
    }
}
