//! Parquet through polars: reading conversation rows, writing and reading tokenized datasets.

use std::fs::File;
use std::path::Path;

use polars::prelude::*;
use serde_json::Value;

use crate::batch::Example;
use crate::error::{DataError, Problem, Result, RowLocation};
use crate::load::{Normalize, RowSchema, open_regular};

/// Decoded bytes a Parquet file may hold per byte of file (text compresses 3–10×, columns of
/// token ids less): a file claiming more is a decompression bomb.
pub const MAX_PARQUET_EXPANSION: u64 = 64;
/// Decoded bytes any Parquet file may hold, whatever its size (small files compress worst).
pub const MIN_PARQUET_DECODED_BYTES: u64 = 64 << 20;

/// The decoding budget of a file of `file_len` bytes.
fn decoded_limit(file_len: u64) -> u64 {
    file_len
        .saturating_mul(MAX_PARQUET_EXPANSION)
        .max(MIN_PARQUET_DECODED_BYTES)
}

/// Opens the Parquet file `path` and checks, from its footer and page headers and before
/// anything is decompressed, that what it declares fits the decoding budget
/// ([`MAX_PARQUET_EXPANSION`] times the file size, at least [`MIN_PARQUET_DECODED_BYTES`]):
/// see [`parquet_bounds`](crate::parquet_bounds).
/// Returns the reader and the budget (also applied to what the rows are turned into).
fn bounded_reader(path: &Path) -> Result<(ParquetReader<File>, u64)> {
    let file = open_regular(path)?;
    let file_len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let limit = decoded_limit(file_len);
    let pages = file.try_clone().map_err(|e| DataError::io(path, e))?;
    let mut reader = ParquetReader::new(file);
    crate::parquet_bounds::check_declared_sizes(path, &mut reader, pages, file_len, limit)?;
    Ok((reader, limit))
}

fn polars_err(path: &Path, e: &PolarsError) -> DataError {
    DataError::file(path, format!("Parquet: {e}"))
}

/// A polars value as JSON (strings, numbers, booleans, lists and structs). Every value costs
/// its bytes (at least 8) from `budget`; `None` once the budget is spent. Dictionary and
/// run-length encodings make a few stored bytes decode to many values, so what the rows turn
/// into is bounded as well as what is decompressed.
fn to_json(v: AnyValue<'_>, budget: &mut u64) -> Option<Value> {
    fn spend(budget: &mut u64, n: usize) -> Option<()> {
        *budget = budget.checked_sub((n as u64).max(8))?;
        Some(())
    }
    Some(match v.into_static() {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(b),
        AnyValue::StringOwned(s) => {
            spend(budget, s.len())?;
            Value::String(s.to_string())
        }
        AnyValue::String(s) => {
            spend(budget, s.len())?;
            Value::String(s.to_string())
        }
        AnyValue::List(series) => {
            spend(budget, series.len())?;
            let mut out = Vec::with_capacity(series.len().min(1 << 16));
            for v in series.iter() {
                out.push(to_json(v, budget)?);
            }
            Value::Array(out)
        }
        AnyValue::StructOwned(payload) => {
            let (values, fields) = *payload;
            let mut out = serde_json::Map::new();
            for (f, v) in fields.iter().zip(values) {
                spend(budget, f.name().len())?;
                out.insert(f.name().to_string(), to_json(v, budget)?);
            }
            Value::Object(out)
        }
        other => match other.extract::<f64>() {
            Some(x) if other.is_integer() => Value::from(x as i64),
            Some(x) => serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number),
            None => {
                let s = other.to_string();
                spend(budget, s.len())?;
                Value::String(s)
            }
        },
    })
}

/// Runs `f`, which reads the Parquet file `path` with polars, turning a panic of the reader
/// (polars' Parquet decoder panics on some malformed files; found by the `data_loader` fuzz
/// target) into an error that names the file.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(DataError::file(
            path,
            format!("not a readable Parquet file (the Parquet reader failed: {why})"),
        ))
    })
}

/// The rows of a Parquet file (a `messages` list-of-struct column, or Alpaca / ShareGPT
/// columns), normalized like JSON rows.
pub(crate) fn parquet_rows<T>(
    path: &Path,
    schema: RowSchema,
    normalize: Normalize<T>,
) -> Result<Vec<std::result::Result<T, Vec<Problem>>>> {
    guarded(path, || parquet_rows_unguarded(path, schema, normalize))
}

fn parquet_rows_unguarded<T>(
    path: &Path,
    schema: RowSchema,
    normalize: Normalize<T>,
) -> Result<Vec<std::result::Result<T, Vec<Problem>>>> {
    let (reader, mut budget) = bounded_reader(path)?;
    let limit = budget;
    let df = reader.finish().map_err(|e| polars_err(path, &e))?;
    let columns = df.columns();
    let mut out = Vec::with_capacity(df.height().min(1 << 20));
    for row in 0..df.height() {
        let mut obj = serde_json::Map::new();
        for c in columns {
            let v = c.get(row).map_err(|e| polars_err(path, &e))?;
            let Some(v) = to_json(v, &mut budget) else {
                return Err(DataError::file(
                    path,
                    format!(
                        "Parquet: row {row}, column `{}`: the decoded rows exceed the decoding limit of {limit} bytes \
                         ({MAX_PARQUET_EXPANSION} times the file size, at least {MIN_PARQUET_DECODED_BYTES})",
                        c.name()
                    ),
                ));
            };
            obj.insert(c.name().to_string(), v);
        }
        let location = RowLocation {
            path: path.to_path_buf(),
            line: None,
            row,
        };
        out.push(normalize(&Value::Object(obj), location, schema));
    }
    Ok(out)
}

/// Writes examples as Parquet: `row` (u64), `input_ids` (list of u32), `labels` (list of i32).
pub fn write_examples(path: &Path, examples: &[Example]) -> Result<()> {
    let rows: Vec<u64> = examples.iter().map(|e| e.row as u64).collect();
    let ids: ListChunked = examples
        .iter()
        .map(|e| Some(Series::new(PlSmallStr::EMPTY, e.input_ids.as_slice())))
        .collect();
    let labels: ListChunked = examples
        .iter()
        .map(|e| Some(Series::new(PlSmallStr::EMPTY, e.labels.as_slice())))
        .collect();
    let columns = vec![
        Column::new("row".into(), rows),
        ids.with_name("input_ids".into()).into_column(),
        labels.with_name("labels".into()).into_column(),
    ];
    let mut df = DataFrame::new(examples.len(), columns).map_err(|e| polars_err(path, &e))?;
    let mut failed = None;
    train_fs::replace_with(path, |file| {
        ParquetWriter::new(file).finish(&mut df).map_err(|e| {
            let message = polars_err(path, &e);
            failed = Some(message);
            std::io::Error::other("parquet")
        })?;
        Ok::<(), std::io::Error>(())
    })
    .map_err(|e| failed.take().unwrap_or_else(|| DataError::io(path, e)))
}

/// Reads examples written by [`write_examples`], through the same decoding bounds as data
/// files, and checks their structure: no nulls, `input_ids` and `labels` of one non-zero
/// length, and every label either [`IGNORE_INDEX`](crate::IGNORE_INDEX) or the token at its
/// position (what [`ChatTokenizer::encode`](crate::ChatTokenizer::encode) produces). Token ids
/// are not checked against a vocabulary here: [`check_examples`] does, and
/// [`prepare_cached`](crate::prepare_cached) calls it with its tokenizer.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    guarded(path, || read_examples_unguarded(path))
}

/// Checks `examples` (read from `path`) against a tokenizer of `vocab_size` ids and a maximum
/// length: every id below the vocabulary size, no example longer than `max_length`.
pub fn check_examples(
    path: &Path,
    examples: &[Example],
    vocab_size: usize,
    max_length: usize,
) -> Result<()> {
    for (i, e) in examples.iter().enumerate() {
        if e.len() > max_length {
            return Err(DataError::file(
                path,
                format!(
                    "example {i} (row {}): {} tokens, over the maximum length of {max_length}",
                    e.row,
                    e.len()
                ),
            ));
        }
        if let Some((t, id)) = e
            .input_ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= vocab_size)
        {
            return Err(DataError::file(
                path,
                format!(
                    "example {i} (row {}), field `input_ids[{t}]`: token id {id} is not below the tokenizer's \
                     vocabulary size {vocab_size}",
                    e.row
                ),
            ));
        }
    }
    Ok(())
}

fn read_examples_unguarded(path: &Path) -> Result<Vec<Example>> {
    let (reader, _) = bounded_reader(path)?;
    let df = reader.finish().map_err(|e| polars_err(path, &e))?;
    let err = |e: PolarsError| polars_err(path, &e);
    let rows = df.column("row").map_err(err)?.u64().map_err(err)?;
    let ids = df.column("input_ids").map_err(err)?.list().map_err(err)?;
    let labels = df.column("labels").map_err(err)?.list().map_err(err)?;
    let bad = |i: usize, what: String| DataError::file(path, format!("example {i}: {what}"));
    let mut out = Vec::with_capacity(df.height().min(1 << 20));
    for (i, ((row, ids), labels)) in rows
        .iter()
        .zip(ids.series_iter())
        .zip(labels.series_iter())
        .enumerate()
    {
        let (Some(row), Some(ids), Some(labels)) = (row, ids, labels) else {
            return Err(bad(i, "null value in a tokenized dataset".into()));
        };
        let input_ids: Option<Vec<u32>> = ids.u32().map_err(err)?.iter().collect();
        let labels: Option<Vec<i32>> = labels.i32().map_err(err)?.iter().collect();
        let (Some(input_ids), Some(labels)) = (input_ids, labels) else {
            return Err(bad(i, format!("row {row}: null token id or label")));
        };
        if input_ids.len() != labels.len() {
            return Err(bad(
                i,
                format!(
                    "row {row}: input_ids and labels differ in length ({} and {})",
                    input_ids.len(),
                    labels.len()
                ),
            ));
        }
        if input_ids.is_empty() {
            return Err(bad(i, format!("row {row}: no tokens")));
        }
        if let Some(t) = (0..labels.len()).find(|&t| {
            labels[t] != crate::IGNORE_INDEX && i64::from(labels[t]) != i64::from(input_ids[t])
        }) {
            return Err(bad(
                i,
                format!(
                    "row {row}, field `labels[{t}]`: label {} is neither ignored nor the token id {} at its position",
                    labels[t], input_ids[t]
                ),
            ));
        }
        let Ok(row) = usize::try_from(row) else {
            return Err(bad(i, format!("row {row} out of range")));
        };
        out.push(Example {
            row,
            input_ids,
            labels,
        });
    }
    Ok(out)
}
