//! Loading every supported format, and a precise error (file, line, field) for every kind of
//! bad row — never a panic, whatever the bytes.

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
        b"{\"txt\": \"x\"}",                                                                   // 3 no shape
        b"{\"messages\": []}",                                                                 // 4 empty
        b"{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}",                         // 5 unknown role
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
            && shown.contains("`robot`"),
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
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.parquet");
    // Built through polars' JSON-like constructors: one row per conversation.
    std::fs::write(&path, crate::parquet_bounds::conversations()).unwrap();
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

fn mkfifo(path: &Path) {
    assert!(
        std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap()
            .success()
    );
}

/// Runs `f` on another thread; fails the test if it takes more than `secs` (a refusal that
/// does not happen would block forever on a FIFO).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("did not finish in time")
}

/// A FIFO given as the dataset (whatever its extension) is refused before it is opened,
/// by the loader and by `data check`.
#[test]
fn r_fifo_dataset_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["d.jsonl", "d.json", "d.parquet", "d.txt"] {
        let p = dir.path().join(name);
        mkfifo(&p);
        let q = p.clone();
        let e = within(10, move || {
            load_conversations(&q, &LoadOptions::default())
                .unwrap_err()
                .to_string()
        });
        assert!(
            e.contains(name) && e.contains("not a regular file (a FIFO)"),
            "{e}"
        );
        let e = within(10, move || {
            check_file(&p, &LoadOptions::default(), None)
                .unwrap_err()
                .to_string()
        });
        assert!(e.contains(name) && e.contains("FIFO"), "{e}");
    }
    // A directory is refused the same way.
    let e = load_conversations(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("a directory"), "{e}");
}

/// A JSONL line over 64 MiB (a file without newlines) is not read into memory whole: an error
/// naming the file and the line, and under the skip policy the next lines still load.
#[test]
fn r_jsonl_line_over_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend(std::iter::repeat_n(b'x', train_data::MAX_LINE_BYTES + 10));
    bytes.extend(format!("\n{GOOD}\n").as_bytes());
    let p = write(dir.path(), "long.jsonl", &bytes);
    drop(bytes);
    let e = load_conversations(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("long.jsonl:2") && e.contains("longer than the limit of 67108864 bytes"),
        "{e}"
    );
    let l = load_conversations(&p, &skip()).unwrap();
    assert_eq!((l.rows_read, l.conversations.len()), (3, 2));
    assert_eq!(l.conversations[1].location.as_ref().unwrap().line, Some(3));
    assert_eq!(l.problems[0].kind, ProblemKind::TooLarge);
    assert!(t0.elapsed().as_secs() < 20, "{:?}", t0.elapsed());
}

/// A Parquet file of a few kilobytes whose column decompresses to 128 MiB (a decompression
/// bomb) is refused from its footer, before anything is decompressed, naming the file.
#[test]
fn r_parquet_decompression_bomb() {
    use polars::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.parquet");
    {
        let big = "a".repeat(1 << 20);
        // Distinct values, so that the writer does not dictionary-encode them.
        let rows: Vec<String> = (0..128).map(|i| format!("{i:04}{big}")).collect();
        let text = Series::new("text".into(), rows);
        let mut df = DataFrame::new(128, vec![text.into_column()]).unwrap();
        ParquetWriter::new(std::fs::File::create(&path).unwrap())
            .finish(&mut df)
            .unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size < (1 << 20), "{size}");
    let t0 = std::time::Instant::now();
    for policy in [ErrorPolicy::Strict, ErrorPolicy::Skip] {
        let options = LoadOptions {
            policy,
            ..LoadOptions::default()
        };
        let e = load_conversations(&path, &options).unwrap_err().to_string();
        assert!(
            e.contains("bomb.parquet") && e.contains("decoding limit"),
            "{e}"
        );
    }
    let e = train_data::read_examples(&path).unwrap_err().to_string();
    assert!(
        e.contains("bomb.parquet") && e.contains("decoding limit"),
        "{e}"
    );
    assert!(t0.elapsed().as_secs() < 5, "{:?}", t0.elapsed());
}

/// A 48 MB word (no whitespace) would take BPE minutes: a field over 16 MiB, or a run without
/// whitespace over 1 MiB, is refused at load, naming the line and the field. So is a row of
/// 3,000 turn pairs.
#[test]
fn r_long_words_and_many_turns_are_refused_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let row = |answer: &str| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "Hi"}}, {{"role": "assistant", "content": "{answer}"}}]}}"#
        )
    };
    let huge = row(&"a".repeat(48_000_000));
    let word = row(&format!("fine {} thanks", "b".repeat(2 << 20)));
    let turns: Vec<String> = (0..3000)
        .map(|i| format!(r#"{{"role": "user", "content": "q{i}"}}, {{"role": "assistant", "content": "a{i}"}}"#))
        .collect();
    let many = format!(r#"{{"messages": [{}]}}"#, turns.join(", "));
    let p = write(
        dir.path(),
        "big.jsonl",
        format!("{GOOD}\n{huge}\n{word}\n{many}\n").as_bytes(),
    );
    drop(huge);
    let e = load_conversations(&p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("big.jsonl:2")
            && e.contains("messages[1].content")
            && e.contains("48000000 bytes, over the limit of 16777216 bytes per field"),
        "{e}"
    );
    let l = load_conversations(&p, &skip()).unwrap();
    assert_eq!(l.conversations.len(), 1);
    let found: Vec<(Option<usize>, ProblemKind, &str)> = l
        .problems
        .iter()
        .map(|p| (p.location.line, p.kind, p.field.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (Some(2), ProblemKind::TooLarge, "messages[1].content"),
            (Some(3), ProblemKind::TooLarge, "messages[1].content"),
            (Some(4), ProblemKind::TooLarge, "messages"),
        ]
    );
    assert!(
        l.problems[1]
            .message
            .contains("a run of 2097152 bytes without whitespace (from byte 5), over the limit of 1048576 bytes"),
        "{}",
        l.problems[1].message
    );
    assert!(
        l.problems[2]
            .message
            .contains("6000 messages, over the limit of 1024")
    );
    let r = check_file(&p, &LoadOptions::default(), None).unwrap();
    assert_eq!((r.rows, r.invalid_rows), (4, 3));
    assert!(!r.is_ok());
    assert!(t0.elapsed().as_secs() < 20, "{:?}", t0.elapsed());
}

/// `data check` of a file without rows (empty, blank lines, `[]`, a Parquet file of 0 rows)
/// is an error naming the file, not a success.
#[test]
fn r_empty_dataset_is_an_error_for_check() {
    use polars::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let mut paths = vec![
        write(dir.path(), "empty.jsonl", b""),
        write(dir.path(), "blank.jsonl", b"\n  \n\r\n"),
        write(dir.path(), "empty.json", b"[]"),
    ];
    let pq = dir.path().join("empty.parquet");
    let mut df = DataFrame::new(
        0,
        vec![Series::new("instruction".into(), Vec::<String>::new()).into_column()],
    )
    .unwrap();
    ParquetWriter::new(std::fs::File::create(&pq).unwrap())
        .finish(&mut df)
        .unwrap();
    paths.push(pq);
    for p in paths {
        let e = check_file(&p, &LoadOptions::default(), None)
            .unwrap_err()
            .to_string();
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(
            e.contains(name) && e.contains("the dataset is empty"),
            "{e}"
        );
    }
    // A file with a row is fine.
    let p = write(dir.path(), "one.jsonl", GOOD.as_bytes());
    let r = check_file(&p, &LoadOptions::default(), None).unwrap();
    assert!(r.is_ok() && r.trainable_rows == 1);
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
