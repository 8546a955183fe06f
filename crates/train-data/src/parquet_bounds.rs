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
    // polars reads a footer that fills the whole file but its last 8 bytes (the leading
    // magic bytes included); a longer one, or a wrong magic, it refuses itself.
    if &tail[4..] != b"PAR1" || footer_len + 8 > file_len {
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
    polars_footer::Walk::new(&footer)
        .file_metadata()
        .map_err(unreadable)?;
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

/// The footer walked as polars 0.55's own footer decoder reads it (its handwritten thrift
/// reader, `polars-parquet`'s `file_metadata_thrift.rs`), without allocating: that decoder
/// dispatches on field ids whatever their wire type, and sizes every list it keeps with
/// `Vec::with_capacity` from the list's header before reading one element. A reader that
/// follows the wire types (the budgeted parse above) can therefore see a different structure
/// in the same bytes: an 805-byte file found by the `parquet_reader` fuzz target passed it, and
/// polars then asked for 51 GB and the process aborted. Each list polars keeps must declare
/// at most as many elements as bytes remain (every element takes at least one), which bounds
/// what polars reserves by a small multiple of the footer's length. Anything polars would
/// refuse is an error here too (`Err` holds why); both agree on what an honest footer is.
mod polars_footer {
    type Step = std::result::Result<(), String>;

    pub(super) struct Walk<'a> {
        buf: &'a [u8],
    }

    /// Wire type of a boolean field (its value is the type: 1 true, 2 false).
    const BOOL_TRUE: u8 = 1;
    const BOOL_FALSE: u8 = 2;

    impl<'a> Walk<'a> {
        pub(super) fn new(buf: &'a [u8]) -> Self {
            Walk { buf }
        }

        fn byte(&mut self) -> std::result::Result<u8, String> {
            let (&b, rest) = self.buf.split_first().ok_or("ends early")?;
            self.buf = rest;
            Ok(b)
        }

        fn skip_bytes(&mut self, n: usize) -> Step {
            self.buf = self.buf.get(n..).ok_or("ends early")?;
            Ok(())
        }

        fn vlq(&mut self) -> std::result::Result<u64, String> {
            let mut value = 0u64;
            let mut shift = 0u32;
            loop {
                let b = self.byte()?;
                value |= u64::from(b & 0x7f).wrapping_shl(shift);
                if b & 0x80 == 0 {
                    return Ok(value);
                }
                shift = shift.wrapping_add(7);
            }
        }

        fn skip_vlq(&mut self) -> Step {
            self.vlq().map(drop)
        }

        fn skip_binary(&mut self) -> Step {
            let len = self.vlq()? as usize;
            self.skip_bytes(len)
        }

        /// A list header: the declared element count (as polars reads it, an `i32`) and the
        /// element type.
        fn list_begin(&mut self) -> std::result::Result<(i32, u8), String> {
            let header = self.byte()?;
            let (count, kind) = (header >> 4, header & 0x0f);
            if !(kind == 0 && count == 0 || (1..=12).contains(&kind)) {
                return Err(format!("a list of unknown element type {kind}"));
            }
            let size = if count != 15 {
                i32::from(count)
            } else {
                self.vlq()? as i32
            };
            Ok((size, kind))
        }

        /// A list polars keeps in a `Vec` sized from its header.
        fn kept_list(&mut self, mut element: impl FnMut(&mut Self) -> Step) -> Step {
            let (size, _) = self.list_begin()?;
            if usize::try_from(size).is_ok_and(|n| n > self.buf.len()) {
                return Err(format!(
                    "a list declares {size} elements where {} bytes remain",
                    self.buf.len()
                ));
            }
            for _ in 0..size.max(0) {
                element(self)?;
            }
            Ok(())
        }

        /// The fields of a struct, up to its stop field: `arm(walk, id, wire type)` reads the
        /// fields polars reads (returning `true`), the others are skipped by their wire type.
        fn fields(&mut self, mut arm: impl FnMut(&mut Self, i16, u8) -> StepOr) -> Step {
            let mut last: i16 = 0;
            loop {
                let b = self.byte()?;
                let (delta, kind) = (b >> 4, b & 0x0f);
                if kind > 12 {
                    return Err(format!("a field of unknown type {kind}"));
                }
                if kind == 0 {
                    return Ok(());
                }
                let id = if delta != 0 {
                    last.checked_add(i16::from(delta))
                        .ok_or("a field id overflows")?
                } else {
                    self.vlq()
                        .map(|v| ((v >> 1) as i64 ^ -((v & 1) as i64)) as i16)?
                };
                if !arm(self, id, kind)? {
                    self.skip(kind, 64)?;
                }
                last = id;
            }
        }

        fn skip(&mut self, kind: u8, depth: u8) -> Step {
            if depth == 0 {
                return Err("nested too deeply".into());
            }
            match kind {
                BOOL_TRUE | BOOL_FALSE => Ok(()),
                3 => self.byte().map(drop),
                4..=6 => self.skip_vlq(),
                7 => self.skip_bytes(8),
                8 => self.skip_binary(),
                12 => self.fields(|w, _, k| w.skip(k, depth - 1).map(|()| true)),
                9 => {
                    let (size, element) = self.list_begin()?;
                    match element {
                        // Booleans take no bytes: the walk ends where it began.
                        0..=2 => Ok(()),
                        3..=9 | 12 => {
                            for _ in 0..size.max(0) {
                                self.skip(element, depth - 1)?;
                            }
                            Ok(())
                        }
                        k => Err(format!("a list of type {k} where none is allowed")),
                    }
                }
                k => Err(format!("a field of type {k} where none is allowed")),
            }
        }

        fn skip_list_of(&mut self, element: fn(&mut Self) -> Step) -> Step {
            let (size, _) = self.list_begin()?;
            for _ in 0..size.max(0) {
                element(self)?;
            }
            Ok(())
        }

        fn boolean(kind: u8) -> StepOr {
            if kind == BOOL_TRUE || kind == BOOL_FALSE {
                Ok(true)
            } else {
                Err("a boolean field of another type".into())
            }
        }

        fn empty_struct(&mut self) -> Step {
            self.fields(|_, _, _| Ok(false))
        }

        pub(super) fn file_metadata(&mut self) -> Step {
            self.fields(|w, id, _| {
                match id {
                    1 | 3 => w.skip_vlq()?,
                    2 => w.kept_list(Self::schema_element)?,
                    4 => w.kept_list(Self::row_group)?,
                    5 => w.kept_list(Self::key_value)?,
                    6 => w.skip_binary()?,
                    7 => w.kept_list(Self::column_order)?,
                    _ => return Ok(false),
                }
                Ok(true)
            })
        }

        fn schema_element(&mut self) -> Step {
            self.fields(|w, id, _| {
                match id {
                    1..=3 | 5..=9 => w.skip_vlq()?,
                    4 => w.skip_binary()?,
                    10 => w.logical_type()?,
                    _ => return Ok(false),
                }
                Ok(true)
            })
        }

        fn logical_type(&mut self) -> Step {
            self.fields(|w, id, _| {
                match id {
                    1..=4 | 6 | 11..=15 => w.empty_struct()?,
                    5 => w.fields(|w, id, _| match id {
                        1 | 2 => w.skip_vlq().map(|()| true),
                        _ => Ok(false),
                    })?,
                    7 | 8 => w.fields(|w, id, kind| match id {
                        1 => Self::boolean(kind),
                        2 => w
                            .fields(|w, id, _| match id {
                                1..=3 => w.empty_struct().map(|()| true),
                                _ => Ok(false),
                            })
                            .map(|()| true),
                        _ => Ok(false),
                    })?,
                    10 => w.fields(|w, id, kind| match id {
                        1 => w.byte().map(|_| true),
                        2 => Self::boolean(kind),
                        _ => Ok(false),
                    })?,
                    _ => return Ok(false),
                }
                Ok(true)
            })
        }

        fn row_group(&mut self) -> Step {
            self.fields(|w, id, _| {
                match id {
                    1 => w.kept_list(Self::column_chunk)?,
                    2 | 3 | 5..=7 => w.skip_vlq()?,
                    4 => w.kept_list(Self::sorting_column)?,
                    _ => return Ok(false),
                }
                Ok(true)
            })
        }

        fn column_chunk(&mut self) -> Step {
            self.fields(|w, id, _| {
                match id {
                    1 => w.skip_binary()?,
                    2 | 4..=7 => w.skip_vlq()?,
                    3 => w.column_meta_data()?,
                    _ => return Ok(false),
                }
                Ok(true)
            })
        }

        fn column_meta_data(&mut self) -> Step {
            self.fields(|w, id, _| {
                match id {
                    1 | 4..=7 | 9..=11 | 14 | 15 => w.skip_vlq()?,
                    2 => w.skip_list_of(Self::skip_vlq)?,
                    3 => w.skip_list_of(Self::skip_binary)?,
                    12 => w.statistics()?,
                    _ => return Ok(false),
                }
                Ok(true)
            })
        }

        fn statistics(&mut self) -> Step {
            self.fields(|w, id, kind| {
                match id {
                    1 | 2 => w.skip_binary()?,
                    3 | 4 => w.skip_vlq()?,
                    5 | 6 => {
                        let len = w.vlq()? as u32;
                        w.skip_bytes(len as usize)?;
                    }
                    7 | 8 => return Self::boolean(kind),
                    _ => return Ok(false),
                }
                Ok(true)
            })
        }

        fn key_value(&mut self) -> Step {
            self.fields(|w, id, _| match id {
                1 | 2 => w.skip_binary().map(|()| true),
                _ => Ok(false),
            })
        }

        fn sorting_column(&mut self) -> Step {
            self.fields(|w, id, kind| match id {
                1 => w.skip_vlq().map(|()| true),
                2 | 3 => Self::boolean(kind),
                _ => Ok(false),
            })
        }

        fn column_order(&mut self) -> Step {
            self.fields(|w, id, _| match id {
                1 | 2 => w.empty_struct().map(|()| true),
                _ => Ok(false),
            })
        }
    }

    type StepOr = std::result::Result<bool, String>;
}

#[cfg(test)]
mod tests {
    use super::polars_footer::Walk;

    /// `FileMetaData` field 4 (`row_groups`) sent with the wire type of an `i32`: a reader that
    /// follows wire types skips one varint, polars reads a list header there, of 2^31 − 1 row
    /// groups, and would reserve them all. The walk refuses it; the same bytes with a list of
    /// one empty row group pass.
    #[test]
    fn a_list_read_by_field_id_is_checked_against_the_bytes_left() {
        let lie = [0x45, 0xFC, 0xFF, 0xFF, 0xFF, 0xFF, 0x07, 0x00];
        let Err(e) = Walk::new(&lie).file_metadata() else {
            panic!("the lying footer was accepted");
        };
        assert!(
            e.contains("declares 2147483647 elements where 1 bytes remain"),
            "{e}"
        );
        let honest = [0x49, 0x1C, 0x00, 0x00];
        assert_eq!(Walk::new(&honest).file_metadata(), Ok(()));
        // A skipped list of booleans takes no bytes, however long it says it is.
        let bools = [0x89, 0xF1, 0xFF, 0xFF, 0xFF, 0xFF, 0x07, 0x00];
        assert_eq!(Walk::new(&bools).file_metadata(), Ok(()));
    }
}
