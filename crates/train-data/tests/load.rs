//! Loading every supported format, and a precise error (file, line, field) for every kind of
//! bad row — never a panic, whatever the bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use train_data::{
    DataError, DataFormat, ErrorPolicy, LoadOptions, ProblemKind, Role, RowSchema, check_file,
    load_conversations,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn skip() -> LoadOptions {
    LoadOptions {
        policy: ErrorPolicy::Skip,
        ..LoadOptions::default()
    }
}

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;

#[test]
fn jsonl_messages_and_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        format!("{GOOD}\n\n{GOOD}\r\n").as_bytes(),
    );
    let l = load_conversations(&p, &LoadOptions::default()).unwrap();
    assert_eq!(l.conversations.len(), 2);
    assert_eq!(l.rows_read, 2);
    assert_eq!(l.conversations[1].location.as_ref().unwrap().line, Some(3));
    assert_eq!(l.conversations[0].messages[1].role, Role::Assistant);
}

#[test]
fn every_bad_row_is_reported_with_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<&[u8]> = vec![
        GOOD.as_bytes(),
        b"{\"messages\": [",                                                                   // 2 broken JSON
        b"{\"text\": \"x\"}",                                                                  // 3 missing messages
        b"{\"messages\": []}",                                                                 // 4 empty
        b"{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}",                          // 5 unknown role
        b"{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"u\"}]}", // 6 order
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"  \"}, {\"role\": \"assistant\", \"content\": \"a\"}]}", // 7 empty content
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"u\"}]}",                           // 8 no assistant
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}",                   // 9 invalid UTF-8
        b"[1, 2]",                                                                             // 10 not an object
        b"{\"messages\": \"hi\"}",                                                             // 11 wrong type
    ];
    let p = write(dir.path(), "bad.jsonl", &lines.join(&b"\n"[..]));
    let l = load_conversations(&p, &skip()).unwrap();
    assert_eq!(l.conversations.len(), 1);
    assert_eq!(l.rows_read, 11);
    let found: Vec<(usize, ProblemKind, String)> = l
        .problems
        .iter()
        .map(|p| (p.location.line.unwrap(), p.kind, p.field.clone()))
        .collect();
    let expect = [
        (2, ProblemKind::BrokenJson, ""),
        (3, ProblemKind::MissingMessages, "messages"),
        (4, ProblemKind::EmptyMessages, "messages"),
        (5, ProblemKind::UnknownRole, "messages[0].role"),
        (6, ProblemKind::WrongTurnOrder, "messages[0].role"),
        (7, ProblemKind::EmptyContent, "messages[0].content"),
        (8, ProblemKind::NoAssistantTurn, "messages"),
        (9, ProblemKind::InvalidUtf8, ""),
        (10, ProblemKind::WrongType, ""),
        (11, ProblemKind::WrongType, "messages"),
    ];
    for (line, kind, field) in expect {
        assert!(
            found
                .iter()
                .any(|(l, k, f)| *l == line && *k == kind && f == field),
            "line {line}: {kind:?} {field} not in {found:?}"
        );
    }
    let shown = l
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::UnknownRole)
        .unwrap()
        .to_string();
    assert!(
        shown.contains("bad.jsonl:5")
            && shown.contains("messages[0].role")
            && shown.contains("`tool`"),
        "{shown}"
    );

    // Strict: the first bad row stops the load, naming it.
    let e = load_conversations(&p, &LoadOptions::default()).unwrap_err();
    assert!(matches!(e, DataError::Row(_)));
    assert!(e.to_string().contains("bad.jsonl:2"), "{e}");
}

#[test]
fn json_array_alpaca_and_sharegpt_are_normalized() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "mixed.json",
        br#"[
          {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact."},
          {"instruction": "Say hi", "output": "hi"},
          {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
          {"messages": [{"role": "user", "content": [{"type": "text", "text": "multi"}, {"type": "text", "text": "part"}]}, {"role": "assistant", "content": "ok"}]}
        ]"#,
    );
    let l = load_conversations(&p, &LoadOptions::default()).unwrap();
    assert_eq!(l.conversations.len(), 4);
    let a = &l.conversations[0].messages;
    assert_eq!(
        (a[0].role, a[0].content.as_str()),
        (Role::System, "Be exact.")
    );
    assert_eq!(a[1].content, "Add\n\n2 and 3");
    assert_eq!(a[2].content, "5");
    assert_eq!(l.conversations[1].messages[0].content, "Say hi");
    assert_eq!(l.conversations[2].messages[1].role, Role::Assistant);
    assert_eq!(l.conversations[3].messages[0].content, "multipart");
    assert_eq!(l.conversations[3].location.as_ref().unwrap().row, 3);

    // Forcing a schema that does not fit is an error naming the field.
    let forced = LoadOptions {
        schema: RowSchema::ShareGpt,
        policy: ErrorPolicy::Skip,
        ..LoadOptions::default()
    };
    let l = load_conversations(&p, &forced).unwrap();
    assert_eq!(l.conversations.len(), 1);
    assert!(
        l.problems
            .iter()
            .any(|p| p.field == "conversations" && p.location.row == 0)
    );

    let bad = write(dir.path(), "bad.json", b"[{\"messages\": [}");
    let e = load_conversations(&bad, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.json") && e.contains("line 1"), "{e}");
    let obj = write(dir.path(), "obj.json", b"{\"messages\": []}");
    assert!(
        load_conversations(
            &obj,
            &LoadOptions {
                format: DataFormat::Json,
                ..LoadOptions::default()
            }
        )
        .is_err()
    );
}

#[test]
fn parquet_with_a_list_of_struct_column() {
    use polars::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.parquet");
    // Build the file through polars' JSON-like constructors: one row per conversation.
    let role = Series::new("role".into(), &["user", "assistant"]);
    let content = Series::new("content".into(), &["Hi", "Hello"]);
    let msgs = StructChunked::from_series("messages".into(), 2, [role, content].iter())
        .unwrap()
        .into_series();
    let list: ListChunked = vec![Some(msgs.clone()), Some(msgs)].into_iter().collect();
    let mut df = DataFrame::new(2, vec![list.with_name("messages".into()).into_column()]).unwrap();
    ParquetWriter::new(std::fs::File::create(&path).unwrap())
        .finish(&mut df)
        .unwrap();
    let l = load_conversations(&path, &LoadOptions::default()).unwrap();
    assert_eq!(l.conversations.len(), 2);
    assert_eq!(l.conversations[1].messages[1].content, "Hello");
    assert_eq!(l.conversations[1].location.as_ref().unwrap().row, 1);
}

#[test]
fn a_malformed_parquet_file_found_by_the_fuzzer_is_an_error_not_a_panic() {
    // polars' Parquet decoder panics on this footer ("thrift bool field"); the loader turns
    // that into an error naming the file. Found by `cargo xtask fuzz` (data_loader).
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz/parquet-thrift-panic.parquet");
    for policy in [ErrorPolicy::Strict, ErrorPolicy::Skip] {
        let options = LoadOptions {
            policy,
            ..LoadOptions::default()
        };
        let e = load_conversations(&path, &options).unwrap_err().to_string();
        assert!(
            e.contains("parquet-thrift-panic.parquet") && e.contains("not a readable Parquet file"),
            "{e}"
        );
    }
}

#[test]
fn check_reports_duplicates_and_leakage() {
    let dir = tempfile::tempdir().unwrap();
    let leak = r#"{"messages": [{"role": "user", "content": "Repeat: the quick brown fox jumps"}, {"role": "assistant", "content": "The quick brown fox jumps"}]}"#;
    let p = write(
        dir.path(),
        "c.jsonl",
        format!("{GOOD}\n{leak}\n{GOOD}\n{{oops\n").as_bytes(),
    );
    let r = check_file(&p, &LoadOptions::default(), None).unwrap();
    assert_eq!((r.rows, r.valid_rows, r.invalid_rows), (4, 3, 1));
    assert_eq!((r.duplicates, r.leakage, r.errors), (1, 1, 1));
    assert!(!r.is_ok());
    let dup = r
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::Duplicate)
        .unwrap();
    assert_eq!(dup.location.line, Some(3));
    assert!(dup.message.contains("line 1"));
}

#[test]
fn check_with_a_tokenizer_counts_tokens_lost() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "c.jsonl", format!("{GOOD}\n").as_bytes());
    let tok = train_data::ChatTokenizer::from_model_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2"),
    )
    .unwrap();
    let n = tok
        .encode(
            &load_conversations(&p, &LoadOptions::default())
                .unwrap()
                .conversations[0],
        )
        .unwrap()
        .input_ids
        .len();
    let r = check_file(&p, &LoadOptions::default(), Some((&tok, n - 3))).unwrap();
    assert_eq!((r.too_long, r.tokens_lost), (1, 3));
    assert!(r.is_ok(), "too long is a warning");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the bytes, loading gives rows and problems (or an I/O error), never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        for name in ["x.jsonl", "x.json"] {
            let p = write(dir.path(), name, &bytes);
            if let Ok(l) = load_conversations(&p, &skip()) {
                prop_assert!(l.conversations.len() + l.problems.len() >= l.rows_read.min(1) || l.rows_read == 0);
            }
            let _ = check_file(&p, &LoadOptions::default(), None);
        }
    }

    /// Mutations of a valid row: a conversation or a problem with a line number.
    #[test]
    fn mutated_rows_never_panic(pos in 0usize..GOOD.len(), byte in any::<u8>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut b = GOOD.as_bytes().to_vec();
        b[pos] = byte;
        let p = write(dir.path(), "m.jsonl", &b);
        let l = load_conversations(&p, &skip()).unwrap();
        // A newline splits the row in two lines.
        let last_line = if byte == b'\n' { 2 } else { 1 };
        prop_assert!(l.problems.iter().all(|p| p.location.line.is_some_and(|n| (1..=last_line).contains(&n))));
    }
}
