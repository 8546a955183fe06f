//! Parquet files that lie about their sizes. polars sizes its buffers by what the footer and
//! the page headers declare, so a small file that declares billions of values made it ask for
//! tens of gigabytes and abort the process (found by the `data_loader` fuzz target: a 1 kB file
//! with a `messages` column, 76 GB asked for). Each lie below is made by editing a real file's
//! footer or page header with the thrift types polars itself reads them with; both readers must
//! refuse it with an error naming the file and the place, and the untouched round trip must
//! still load (so the refusals come from the lies).

use std::path::{Path, PathBuf};

use polars::prelude::*;
use polars_parquet_format::thrift::protocol::{TCompactInputProtocol, TCompactOutputProtocol};
use polars_parquet_format::{FileMetaData, PageHeader};
use train_data::{ErrorPolicy, LoadOptions, load_conversations};

/// A real Parquet file of two conversations (a `messages` list-of-struct column).
pub(crate) fn conversations() -> Vec<u8> {
    let role = Series::new("role".into(), &["user", "assistant"]);
    let content = Series::new("content".into(), &["Hi", "Hello"]);
    let msgs = StructChunked::from_series("messages".into(), 2, [role, content].iter())
        .unwrap()
        .into_series();
    let list: ListChunked = vec![Some(msgs.clone()), Some(msgs)].into_iter().collect();
    let mut df = DataFrame::new(2, vec![list.with_name("messages".into()).into_column()]).unwrap();
    let mut out = Vec::new();
    ParquetWriter::new(&mut out).finish(&mut df).unwrap();
    out
}

/// A real tokenized dataset as the data cache writes it.
fn examples(dir: &Path) -> Vec<u8> {
    let path = dir.join("written.parquet");
    let examples = vec![
        train_data::Example {
            row: 0,
            input_ids: vec![1, 2, 3],
            labels: vec![-100, 2, 3],
        };
        3
    ];
    train_data::write_examples(&path, &examples).unwrap();
    std::fs::read(&path).unwrap()
}

/// The file's bytes before its footer, and its footer.
fn split(bytes: &[u8]) -> (Vec<u8>, FileMetaData) {
    let n = bytes.len();
    assert_eq!(&bytes[n - 4..], b"PAR1");
    let len = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
    let footer = &bytes[n - 8 - len..n - 8];
    let mut protocol = TCompactInputProtocol::new(footer, len * 8);
    let meta = FileMetaData::read_from_in_protocol(&mut protocol).unwrap();
    (bytes[..n - 8 - len].to_vec(), meta)
}

/// `body` followed by `meta` as a footer.
fn join(mut body: Vec<u8>, meta: &FileMetaData) -> Vec<u8> {
    let mut footer = Vec::new();
    meta.write_to_out_protocol(&mut TCompactOutputProtocol::new(&mut footer))
        .unwrap();
    body.extend_from_slice(&footer);
    body.extend_from_slice(&u32::try_from(footer.len()).unwrap().to_le_bytes());
    body.extend_from_slice(b"PAR1");
    body
}

/// `bytes` with its footer edited by `edit`.
fn with_footer(bytes: &[u8], edit: impl FnOnce(&mut FileMetaData)) -> Vec<u8> {
    let (body, mut meta) = split(bytes);
    edit(&mut meta);
    join(body, &meta)
}

/// `bytes` with the header of the first page of the last column chunk edited by `edit` (the
/// last chunk, so that no other chunk's offsets move; its sizes in the footer follow the
/// header's new length).
fn with_page_header(bytes: &[u8], edit: impl FnOnce(&mut PageHeader)) -> Vec<u8> {
    let (body, mut meta) = split(bytes);
    let chunk = meta
        .row_groups
        .iter_mut()
        .flat_map(|g| g.columns.iter_mut())
        .filter_map(|c| c.meta_data.as_mut())
        .max_by_key(|m| m.dictionary_page_offset.unwrap_or(m.data_page_offset))
        .unwrap();
    let start = usize::try_from(
        chunk
            .dictionary_page_offset
            .unwrap_or(chunk.data_page_offset),
    )
    .unwrap();
    let mut rest = &body[start..];
    let before = rest.len();
    let mut header = {
        let mut protocol = TCompactInputProtocol::new(&mut rest, before * 8);
        PageHeader::read_from_in_protocol(&mut protocol).unwrap()
    };
    let old_len = before - rest.len();
    edit(&mut header);
    let mut new = Vec::new();
    header
        .write_to_out_protocol(&mut TCompactOutputProtocol::new(&mut new))
        .unwrap();
    let delta = i64::try_from(new.len()).unwrap() - i64::try_from(old_len).unwrap();
    chunk.total_compressed_size += delta;
    chunk.total_uncompressed_size += delta;
    if chunk.dictionary_page_offset.is_none() {
        // The data page offset is the header's own position: unchanged.
    } else if chunk.data_page_offset > i64::try_from(start).unwrap() {
        chunk.data_page_offset += delta;
    }
    for g in &mut meta.row_groups {
        if let Some(t) = g.total_compressed_size.as_mut() {
            *t += delta;
        }
    }
    let mut out = body[..start].to_vec();
    out.extend_from_slice(&new);
    out.extend_from_slice(&body[start + old_len..]);
    join(out, &meta)
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Both error policies of the conversation loader.
fn load_errors(path: &Path) -> Vec<String> {
    [ErrorPolicy::Strict, ErrorPolicy::Skip]
        .into_iter()
        .map(|policy| {
            let options = LoadOptions {
                policy,
                ..LoadOptions::default()
            };
            match load_conversations(path, &options) {
                Ok(l) => format!("loaded {} conversations", l.conversations.len()),
                Err(e) => e.to_string(),
            }
        })
        .collect()
}

/// The tokenized-data reader's error on `path`.
fn examples_error(path: &Path) -> String {
    train_data::read_examples(path).unwrap_err().to_string()
}

fn assert_refused(errors: &[String], name: &str, words: &[&str]) {
    for e in errors {
        assert!(e.contains(name), "{e}");
        for w in words {
            assert!(e.contains(w), "`{w}` not in: {e}");
        }
    }
}

#[test]
fn the_unedited_round_trip_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(
        dir.path(),
        "same.parquet",
        &with_footer(&conversations(), |_| {}),
    );
    for e in load_errors(&path) {
        assert_eq!(e, "loaded 2 conversations");
    }
    let same = with_page_header(&conversations(), |_| {});
    assert_eq!(
        load_errors(&save(dir.path(), "same-page.parquet", &same)),
        ["loaded 2 conversations"; 2]
    );
    let ex = save(
        dir.path(),
        "ex.parquet",
        &with_footer(&examples(dir.path()), |_| {}),
    );
    assert_eq!(train_data::read_examples(&ex).unwrap().len(), 3);
    let ex = save(
        dir.path(),
        "ex-page.parquet",
        &with_page_header(&examples(dir.path()), |_| {}),
    );
    assert_eq!(train_data::read_examples(&ex).unwrap().len(), 3);
}

#[test]
fn a_column_chunk_that_declares_ten_billion_values_is_refused_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let lie = |bytes: &[u8]| {
        with_footer(bytes, |m| {
            for c in &mut m.row_groups[0].columns {
                c.meta_data.as_mut().unwrap().num_values = 10_000_000_000;
            }
        })
    };
    let path = save(dir.path(), "values.parquet", &lie(&conversations()));
    assert_refused(
        &load_errors(&path),
        "values.parquet",
        &["row group 0, column `messages.", "decoding limit"],
    );
    let path = save(dir.path(), "ex-values.parquet", &lie(&examples(dir.path())));
    let e = examples_error(&path);
    assert_refused(
        &[e],
        "ex-values.parquet",
        &["row group 0, column `", "decoding limit"],
    );
}

#[test]
fn negative_counts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = with_footer(&conversations(), |m| {
        m.row_groups[0].columns[0]
            .meta_data
            .as_mut()
            .unwrap()
            .num_values = -1;
    });
    let path = save(dir.path(), "negative.parquet", &bytes);
    assert_refused(
        &load_errors(&path),
        "negative.parquet",
        &["number of values: -1 is negative"],
    );
    let bytes = with_page_header(&conversations(), |h| h.uncompressed_page_size = -5);
    let path = save(dir.path(), "negative-page.parquet", &bytes);
    assert_refused(
        &load_errors(&path),
        "negative-page.parquet",
        &["the page at byte", "uncompressed_page_size: -5 is negative"],
    );
}

#[test]
fn a_row_count_of_ten_billion_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = with_footer(&conversations(), |m| {
        m.num_rows = 10_000_000_000;
        m.row_groups[0].num_rows = 10_000_000_000;
    });
    let path = save(dir.path(), "rows.parquet", &bytes);
    assert_refused(
        &load_errors(&path),
        "rows.parquet",
        &["row count", "decoding limit"],
    );
    let bytes = with_footer(&conversations(), |m| {
        m.row_groups[0].num_rows = 10_000_000_000;
    });
    let path = save(dir.path(), "group-rows.parquet", &bytes);
    assert_refused(
        &load_errors(&path),
        "group-rows.parquet",
        &["row group 0", "decoding limit"],
    );
}

#[test]
fn a_page_that_declares_two_billion_values_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lie = |h: &mut PageHeader| {
        if let Some(d) = h.data_page_header.as_mut() {
            d.num_values = i32::MAX;
        }
        if let Some(d) = h.dictionary_page_header.as_mut() {
            d.num_values = i32::MAX;
        }
        if let Some(d) = h.data_page_header_v2.as_mut() {
            d.num_values = i32::MAX;
        }
    };
    let path = save(
        dir.path(),
        "page.parquet",
        &with_page_header(&conversations(), lie),
    );
    assert_refused(
        &load_errors(&path),
        "page.parquet",
        &["column `messages.", "decoding limit"],
    );
    let path = save(
        dir.path(),
        "ex-page.parquet",
        &with_page_header(&examples(dir.path()), lie),
    );
    let e = examples_error(&path);
    assert_refused(&[e], "ex-page.parquet", &["decoding limit"]);
}

#[test]
fn a_page_that_declares_two_gigabytes_uncompressed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = with_page_header(&conversations(), |h| h.uncompressed_page_size = i32::MAX);
    let path = save(dir.path(), "big-page.parquet", &bytes);
    assert_refused(&load_errors(&path), "big-page.parquet", &["decoding limit"]);
}

#[test]
fn a_page_that_runs_past_its_column_chunk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = with_page_header(&conversations(), |h| h.compressed_page_size = 1 << 30);
    let path = save(dir.path(), "long-page.parquet", &bytes);
    assert_refused(
        &load_errors(&path),
        "long-page.parquet",
        &["run past the end of its column chunk"],
    );
}

#[test]
fn a_column_chunk_outside_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = with_footer(&conversations(), |m| {
        m.row_groups[0].columns[0]
            .meta_data
            .as_mut()
            .unwrap()
            .total_compressed_size = 1 << 40;
    });
    let path = save(dir.path(), "outside.parquet", &bytes);
    assert_refused(&load_errors(&path), "outside.parquet", &["not inside the"]);
}

/// Found by the `parquet_reader` fuzz target: an 876-byte file whose footer's thrift list
/// declares more elements than it holds; polars' footer decoder reserved them all (32 GB) and
/// the process aborted. The footer is now parsed by a budgeted reader first.
#[test]
fn a_footer_list_that_declares_billions_of_elements_is_refused_not_an_abort() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz/parquet-footer-list-abort.parquet");
    assert_refused(
        &load_errors(&path),
        "parquet-footer-list-abort.parquet",
        &["not a readable Parquet file (its footer:"],
    );
    let e = examples_error(&path);
    assert_refused(&[e], "parquet-footer-list-abort.parquet", &["its footer"]);
}

/// polars' own footer decoder reads fields by id whatever their wire type and sizes each list
/// from its header: the `parquet_reader` fuzz target found an 805-byte file that the
/// wire-typed budgeted parse accepted and on which polars then asked for 51 GB and aborted.
#[test]
fn a_footer_read_by_field_id_that_declares_a_huge_list_is_refused_not_an_abort() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz/parquet-footer-id-dispatch-abort.parquet");
    let name = "parquet-footer-id-dispatch-abort.parquet";
    assert_refused(
        &load_errors(&path),
        name,
        &["not a readable Parquet file (its footer:"],
    );
    let e = examples_error(&path);
    assert_refused(&[e], name, &["its footer"]);
}
