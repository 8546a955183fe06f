//! What a Parquet file declares, checked before polars decodes anything: every size and count
//! in the footer and in each page header that polars sizes an allocation by.
//!
//! polars trusts these numbers: a column chunk's `num_values` (an `i64` in the footer) becomes
//! the capacity of the column's value and offset buffers, a page's `num_values` the capacity of
//! the page's, and a page's `uncompressed_page_size` the size of its decompression buffer. A
//! 1 kB file that claims ten billion values makes it ask for tens of gigabytes, and a failed
//! allocation aborts the process (no `catch_unwind` can stop that). So each declared value is
//! charged [`BYTES_PER_DECLARED_VALUE`] against the decoding budget, as is each declared
//! uncompressed byte, and a file over the budget is refused with the place that overdraws it.
//! Before any of that, the footer's own thrift lists are checked by a budgeted parse (polars'
//! footer decoder reserves each list's declared length too).

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;

use polars::prelude::*;
use polars_parquet_format::PageHeader;
use polars_parquet_format::thrift::protocol::TCompactInputProtocol;

use crate::error::{DataError, Result};

/// What each value a Parquet file declares costs against its decoding budget: a decoded value
/// takes at least four bytes (a `u32` token id), and polars reserves up to sixteen for each
/// declared value before it decodes any, so honouring the budget at four bytes a value keeps
/// every reservation within a small multiple of it.
pub(crate) const BYTES_PER_DECLARED_VALUE: u64 = 4;

/// The number a file declares, as a count: negative numbers are refused (polars would read
/// them as huge unsigned ones).
fn count(path: &Path, what: &dyn Fn() -> String, n: i64) -> Result<u64> {
    u64::try_from(n)
        .map_err(|_| DataError::file(path, format!("Parquet: {}: {n} is negative", what())))
}

/// The cost of `values` declared values and `bytes` declared uncompressed bytes.
fn cost(values: u64, bytes: u64) -> u64 {
    values.saturating_mul(BYTES_PER_DECLARED_VALUE).max(bytes)
}

/// Checks the footer of `reader`'s file (`file_len` bytes at `path`) and then every page
/// header of every column chunk (read through `pages`, a second handle on the same file)
/// against `limit` decoded bytes.
pub(crate) fn check_declared_sizes(
    path: &Path,
    reader: &mut ParquetReader<File>,
    pages: File,
    file_len: u64,
    limit: u64,
) -> Result<()> {
    let mut pages = pages;
    check_footer_lists(path, &mut pages, file_len)?;
    let meta = reader
        .get_metadata()
        .map_err(|e| DataError::file(path, format!("Parquet: {e}")))?
        .clone();
    let over = |declared: u64, place: String| {
        DataError::file(
            path,
            format!(
                "Parquet: {place} declares {declared} bytes of decoded data (counting \
                 {BYTES_PER_DECLARED_VALUE} bytes a value) in a {file_len}-byte file, over the decoding limit \
                 of {limit} bytes ({} times the file size, at least {}): refused as a decompression bomb",
                crate::parquet::MAX_PARQUET_EXPANSION,
                crate::parquet::MIN_PARQUET_DECODED_BYTES
            ),
        )
    };
    let file_rows = cost(meta.num_rows as u64, 0);
    if file_rows > limit {
        return Err(over(file_rows, "the footer's row count".into()));
    }
    // The footer: every row group's rows and every column chunk's values and sizes.
    let mut declared: u64 = 0;
    for (g, rg) in meta.row_groups.iter().enumerate() {
        let mut columns: u64 = 0;
        for c in rg.parquet_columns() {
            let name = column_name(c);
            let place = || format!("row group {g}, column `{name}`");
            let values = count(
                path,
                &|| format!("{}, number of values", place()),
                c.num_values(),
            )?;
            let bytes = count(
                path,
                &|| format!("{}, uncompressed size", place()),
                c.uncompressed_size(),
            )?;
            columns = columns.saturating_add(cost(values, bytes));
            let so_far = declared.saturating_add(columns);
            if so_far > limit {
                return Err(over(
                    so_far,
                    format!("{}, with the data before it,", place()),
                ));
            }
        }
        let group = columns.max(cost(rg.num_rows() as u64, rg.total_byte_size() as u64));
        declared = declared.saturating_add(group);
        if declared > limit {
            return Err(over(
                declared,
                format!("row group {g}, with the row groups before it,"),
            ));
        }
    }
    // The page headers, which polars trusts as it trusts the footer.
    let mut pages = BufReader::new(pages);
    let mut declared: u64 = 0;
    for (g, rg) in meta.row_groups.iter().enumerate() {
        for c in rg.parquet_columns() {
            let name = column_name(c);
            let at = |pos: u64| format!("row group {g}, column `{name}`, the page at byte {pos}");
            declared = declared.saturating_add(chunk_pages(path, &mut pages, c, file_len, &at)?);
            if declared > limit {
                return Err(over(
                    declared,
                    format!("row group {g}, column `{name}`, with the pages before it,"),
                ));
            }
        }
    }
    Ok(())
}

/// What the footer's thrift lists may declare: polars' own footer decoder reserves each list's
/// declared length before reading an element (a 1 kB file whose schema list claims 2^31
/// elements made it ask for 32 GB and abort; found by the `parquet_reader` fuzz target). The
/// footer is first parsed by `polars_parquet_format`'s reader, which charges every declared
/// list element 8 bytes, every struct 2 and every string its length against a budget before it
/// allocates: with [`FOOTER_BUDGET_PER_BYTE`] times the footer's length, every footer whose
/// lists hold what they declare parses, and a lying one is refused before polars sees it.
fn check_footer_lists(path: &Path, file: &mut File, file_len: u64) -> Result<()> {
    use std::io::Read;
    let io = |e: std::io::Error| DataError::io(path, e);
    let unreadable = |why: String| {
        DataError::file(
            path,
            format!("not a readable Parquet file (its footer: {why})"),
        )
    };
    if file_len < 12 {
        return Err(unreadable(format!(
            "a {file_len}-byte file is too short to hold one"
        )));
    }
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::Start(file_len - 8)).map_err(io)?;
    file.read_exact(&mut tail).map_err(io)?;
    let footer_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if &tail[4..] != b"PAR1" || footer_len + 12 > file_len {
        // polars says what is wrong with the magic bytes or the length.
        return Ok(());
    }
    file.seek(SeekFrom::Start(file_len - 8 - footer_len))
        .map_err(io)?;
    let mut footer = Vec::new();
    file.by_ref()
        .take(footer_len)
        .read_to_end(&mut footer)
        .map_err(io)?;
    let budget = usize::try_from(footer_len)
        .unwrap_or(usize::MAX)
        .saturating_mul(FOOTER_BUDGET_PER_BYTE);
    let mut protocol = TCompactInputProtocol::new(footer.as_slice(), budget);
    polars_parquet_format::FileMetaData::read_from_in_protocol(&mut protocol)
        .map_err(|e| unreadable(e.to_string()))?;
    Ok(())
}

/// The thrift reader's allocation budget per byte of footer: a list element costs 8, its struct
/// 2 more, and each takes at least one byte, so 16 admits every honest footer.
const FOOTER_BUDGET_PER_BYTE: usize = 16;

fn column_name(c: &polars_parquet::parquet::metadata::ColumnChunkMetadata) -> String {
    c.descriptor().path_in_schema.join(".")
}

/// The declared cost of the pages of column chunk `c`, walked as polars walks them: from the
/// chunk's first byte, page after page, until the chunk's values are all seen or its byte range
/// ends. Each header is parsed with at most the bytes left in the chunk.
fn chunk_pages(
    path: &Path,
    pages: &mut BufReader<File>,
    c: &polars_parquet::parquet::metadata::ColumnChunkMetadata,
    file_len: u64,
    at: &dyn Fn(u64) -> String,
) -> Result<u64> {
    let range = c.byte_range();
    if range.start > range.end || range.end > file_len {
        return Err(DataError::file(
            path,
            format!(
                "Parquet: {}: the column chunk's bytes {}..{} are not inside the {file_len}-byte file",
                at(range.start),
                range.start,
                range.end
            ),
        ));
    }
    let want = u64::try_from(c.num_values()).unwrap_or(0);
    let io = |e: std::io::Error| DataError::io(path, e);
    pages.seek(SeekFrom::Start(range.start)).map_err(io)?;
    let (mut pos, mut seen, mut declared) = (range.start, 0u64, 0u64);
    while seen < want && pos < range.end {
        // The protocol's budget counts what the header would allocate: 8 bytes a list element
        // (each at least a byte on disk), 2 a struct, a string's length; so 8 times the bytes
        // left in the chunk admits every header that fits in it and bounds any other.
        let budget = usize::try_from(range.end - pos)
            .unwrap_or(usize::MAX)
            .saturating_mul(8);
        let header = {
            let mut protocol = TCompactInputProtocol::new(&mut *pages, budget);
            PageHeader::read_from_in_protocol(&mut protocol).map_err(|e| {
                DataError::file(
                    path,
                    format!("Parquet: {}: not a readable page header ({e})", at(pos)),
                )
            })?
        };
        let page_start = pos;
        let after_header = pages.stream_position().map_err(io)?;
        let field = |f: &str| format!("{}, field {f}", at(pos));
        let compressed = count(
            path,
            &|| field("compressed_page_size"),
            header.compressed_page_size.into(),
        )?;
        let uncompressed = count(
            path,
            &|| field("uncompressed_page_size"),
            header.uncompressed_page_size.into(),
        )?;
        let (values, is_data) = if let Some(h) = &header.data_page_header {
            (
                count(path, &|| field("num_values"), h.num_values.into())?,
                true,
            )
        } else if let Some(h) = &header.data_page_header_v2 {
            let values = count(path, &|| field("num_values"), h.num_values.into())?;
            let rows = count(path, &|| field("num_rows"), h.num_rows.into())?;
            (values.max(rows), true)
        } else if let Some(h) = &header.dictionary_page_header {
            (
                count(path, &|| field("num_values"), h.num_values.into())?,
                false,
            )
        } else {
            (0, false)
        };
        if is_data {
            seen = seen.saturating_add(values);
        }
        declared = declared.saturating_add(cost(values, uncompressed));
        pos = after_header.saturating_add(compressed);
        if pos > range.end {
            return Err(DataError::file(
                path,
                format!(
                    "Parquet: {}: the page's {compressed} bytes run past the end of its column chunk (byte {})",
                    at(page_start),
                    range.end
                ),
            ));
        }
        pages.seek(SeekFrom::Start(pos)).map_err(io)?;
    }
    Ok(declared)
}
