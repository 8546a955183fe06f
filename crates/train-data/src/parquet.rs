//! Parquet through polars: reading conversation rows, writing and reading tokenized datasets.

use std::fs::File;
use std::path::Path;

use polars::prelude::*;
use serde_json::Value;

use crate::batch::Example;
use crate::conversation::Conversation;
use crate::error::{DataError, Problem, Result, RowLocation};
use crate::load::{RowSchema, normalize_row};

fn polars_err(path: &Path, e: &PolarsError) -> DataError {
    DataError::file(path, format!("Parquet: {e}"))
}

/// A polars value as JSON (strings, numbers, booleans, lists and structs).
fn to_json(v: AnyValue<'_>) -> Value {
    match v.into_static() {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(b),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::String(s) => Value::String(s.to_string()),
        AnyValue::List(series) => Value::Array(series.iter().map(to_json).collect()),
        AnyValue::StructOwned(payload) => {
            let (values, fields) = *payload;
            Value::Object(
                fields
                    .iter()
                    .zip(values)
                    .map(|(f, v)| (f.name().to_string(), to_json(v)))
                    .collect(),
            )
        }
        other => match other.extract::<f64>() {
            Some(x) if other.is_integer() => Value::from(x as i64),
            Some(x) => serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number),
            None => Value::String(other.to_string()),
        },
    }
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
pub(crate) fn parquet_rows(
    path: &Path,
    schema: RowSchema,
) -> Result<Vec<std::result::Result<Conversation, Vec<Problem>>>> {
    guarded(path, || parquet_rows_unguarded(path, schema))
}

fn parquet_rows_unguarded(
    path: &Path,
    schema: RowSchema,
) -> Result<Vec<std::result::Result<Conversation, Vec<Problem>>>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let df = ParquetReader::new(file)
        .finish()
        .map_err(|e| polars_err(path, &e))?;
    let columns = df.columns();
    let mut out = Vec::with_capacity(df.height());
    for row in 0..df.height() {
        let mut obj = serde_json::Map::new();
        for c in columns {
            let v = c.get(row).map_err(|e| polars_err(path, &e))?;
            obj.insert(c.name().to_string(), to_json(v));
        }
        let location = RowLocation {
            path: path.to_path_buf(),
            line: None,
            row,
        };
        out.push(normalize_row(&Value::Object(obj), location, schema));
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
    let tmp = path.with_extension("parquet.tmp");
    let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    ParquetWriter::new(file)
        .finish(&mut df)
        .map_err(|e| polars_err(path, &e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

/// Reads examples written by [`write_examples`].
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    guarded(path, || read_examples_unguarded(path))
}

fn read_examples_unguarded(path: &Path) -> Result<Vec<Example>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let df = ParquetReader::new(file)
        .finish()
        .map_err(|e| polars_err(path, &e))?;
    let err = |e: PolarsError| polars_err(path, &e);
    let rows = df.column("row").map_err(err)?.u64().map_err(err)?;
    let ids = df.column("input_ids").map_err(err)?.list().map_err(err)?;
    let labels = df.column("labels").map_err(err)?.list().map_err(err)?;
    let mut out = Vec::with_capacity(df.height());
    for ((row, ids), labels) in rows.iter().zip(ids.series_iter()).zip(labels.series_iter()) {
        let (Some(row), Some(ids), Some(labels)) = (row, ids, labels) else {
            return Err(DataError::file(path, "null value in a tokenized dataset"));
        };
        let input_ids: Vec<u32> = ids
            .u32()
            .map_err(err)?
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect();
        let labels: Vec<i32> = labels
            .i32()
            .map_err(err)?
            .iter()
            .map(|v| v.unwrap_or(-100))
            .collect();
        if input_ids.len() != labels.len() {
            return Err(DataError::file(
                path,
                format!("row {row}: input_ids and labels differ in length"),
            ));
        }
        out.push(Example {
            row: row as usize,
            input_ids,
            labels,
        });
    }
    Ok(out)
}
