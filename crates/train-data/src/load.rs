//! Loading conversations from the formats users bring, normalized to [`Conversation`]s.
//!
//! Containers: JSONL (one row a line, read as a stream), a JSON array, Parquet. Row shapes:
//! `{"messages": [{"role", "content"}]}` (the seed's format), Alpaca
//! (`instruction` / `input` / `output`) and ShareGPT (`conversations` with `from` / `value`).
//! Both are detected automatically and can be forced. Every problem names the file, the line
//! (or row) and the field; bytes that are not even text give an error, never a panic.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::conversation::{Conversation, Message, Role};
use crate::error::{DataError, Problem, ProblemKind, Result, RowLocation, Severity};

/// Longest JSONL line, in bytes (a row is kilobytes; a file without newlines would otherwise
/// be read into memory whole).
pub const MAX_LINE_BYTES: usize = 64 << 20;
/// Largest `.json` array file, in bytes: it is parsed whole, so it is bounded (JSONL is
/// streamed and has no such limit).
pub const MAX_JSON_FILE_BYTES: u64 = 1 << 30;

/// Opens `path` for reading after checking that it is a regular file (following symlinks):
/// a FIFO would block the open itself, a device could be read forever, so both are refused
/// before opening. The type is checked again on the opened handle, in case the path was
/// swapped in between. Every file this crate reads goes through here.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    refuse_special(path, &meta)?;
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let meta = file.metadata().map_err(|e| DataError::io(path, e))?;
    refuse_special(path, &meta)?;
    Ok(file)
}

fn refuse_special(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    let kind = file_kind(meta);
    Err(DataError::file(
        path,
        format!("not a regular file ({kind}): refused"),
    ))
}

#[cfg(unix)]
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

#[cfg(not(unix))]
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    if meta.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// Reads the regular file `path` whole, refusing one over `limit` bytes; `what` names the
/// limit in the message.
pub(crate) fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let too_big = |n: u64| {
        DataError::file(
            path,
            format!("{n} bytes, over the limit of {limit} bytes for {what}"),
        )
    };
    if len > limit {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // The length can change while reading (a file still being written): bound the read too.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| DataError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// The file container.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// From the extension (`.parquet`, `.json`, `.jsonl`) and, for `.json`, the first byte.
    #[default]
    Auto,
    /// One JSON object a line.
    Jsonl,
    /// One JSON array of objects.
    Json,
    /// A Parquet file (read with polars).
    Parquet,
}

/// The shape of a row.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RowSchema {
    /// Per row: `messages`, else `conversations` (ShareGPT), else `instruction` (Alpaca), else
    /// `prompt` + `completion` (TRL), else `text` (TRL's language modelling).
    #[default]
    Auto,
    /// `{"messages": [{"role": ..., "content": ...}]}`.
    Messages,
    /// `{"instruction", "input", "output", "system"?}`.
    Alpaca,
    /// `{"conversations": [{"from": ..., "value": ...}], "system"?}`.
    ShareGpt,
    /// TRL's prompt/completion: `{"prompt", "completion"}`, both strings (no chat template)
    /// or both lists of messages; only the completion is trained.
    #[serde(rename = "prompt_completion")]
    PromptCompletion,
    /// TRL's language modelling: `{"text": "..."}`, no chat template, every token trained.
    Text,
}

/// What to do with an invalid row.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ErrorPolicy {
    /// Stop at the first invalid row (the error names it).
    #[default]
    Strict,
    /// Drop invalid rows, reporting each.
    Skip,
}

/// How to load a data file.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct LoadOptions {
    /// Container format.
    #[serde(default)]
    pub format: DataFormat,
    /// Row shape.
    #[serde(default)]
    pub schema: RowSchema,
    /// Invalid rows: stop or skip.
    #[serde(default)]
    pub policy: ErrorPolicy,
}

/// The conversations of a file and the problems met on the way.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Valid conversations, in file order.
    pub conversations: Vec<Conversation>,
    /// Problems of the rows that were dropped (only with [`ErrorPolicy::Skip`]).
    pub problems: Vec<Problem>,
    /// Rows read (valid or not, blank lines excluded).
    pub rows_read: usize,
}

/// Loads `path` according to `options`.
pub fn load_conversations(path: &Path, options: &LoadOptions) -> Result<Loaded> {
    let (conversations, problems, rows_read) = load_rows(path, options, normalize_row)?;
    Ok(Loaded {
        conversations,
        problems,
        rows_read,
    })
}

/// The rows of `path` (any container), each checked by `normalize`: the valid ones in file
/// order, the problems of the others (a strict policy stops at the first error), and the rows
/// read.
pub(crate) fn load_rows<T>(
    path: &Path,
    options: &LoadOptions,
    normalize: Normalize<T>,
) -> Result<(Vec<T>, Vec<Problem>, usize)> {
    let format = match options.format {
        DataFormat::Auto => detect_format(path)?,
        f => f,
    };
    let (mut valid, mut problems, mut read) = (Vec::new(), Vec::new(), 0);
    let mut accept = |row: std::result::Result<T, Vec<Problem>>| -> Result<()> {
        read += 1;
        match row {
            Ok(v) => valid.push(v),
            Err(found) => {
                if options.policy == ErrorPolicy::Strict
                    && let Some(first) = found.iter().find(|p| p.severity == Severity::Error)
                {
                    return Err(DataError::Row(Box::new(first.clone())));
                }
                problems.extend(found);
            }
        }
        Ok(())
    };
    match format {
        DataFormat::Jsonl | DataFormat::Auto => {
            for row in JsonlRows::open_with(path, options.schema, normalize)? {
                accept(row?)?;
            }
        }
        DataFormat::Json => {
            for row in json_array_rows(path, options.schema, normalize)? {
                accept(row)?;
            }
        }
        DataFormat::Parquet => {
            for row in crate::parquet::parquet_rows(path, options.schema, normalize)? {
                accept(row)?;
            }
        }
    }
    Ok((valid, problems, read))
}

pub(crate) fn detect_format(path: &Path) -> Result<DataFormat> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "parquet" | "pq" => return Ok(DataFormat::Parquet),
        "jsonl" | "ndjson" => return Ok(DataFormat::Jsonl),
        _ => {}
    }
    // Otherwise peek at the first non-blank byte: `[` is a JSON array, anything else JSONL.
    let mut file = open_regular(path)?;
    let mut buf = [0u8; 4096];
    let n = file.read(&mut buf).map_err(|e| DataError::io(path, e))?;
    let first = buf[..n]
        .iter()
        .copied()
        .find(|b| !b.is_ascii_whitespace() && *b != 0xEF && *b != 0xBB && *b != 0xBF);
    if buf[..n].starts_with(b"PAR1") {
        return Ok(DataFormat::Parquet);
    }
    Ok(if first == Some(b'[') {
        DataFormat::Json
    } else {
        DataFormat::Jsonl
    })
}

/// Turns one parsed row into a checked value (a conversation, a preference pair), or the row's
/// problems.
pub(crate) type Normalize<T> =
    fn(&Value, RowLocation, RowSchema) -> std::result::Result<T, Vec<Problem>>;

/// Streams the rows of a JSONL file: each item is a normalized row (a conversation, a pair)
/// or the problems of its row.
pub(crate) struct JsonlRows<T> {
    path: PathBuf,
    reader: BufReader<File>,
    schema: RowSchema,
    normalize: Normalize<T>,
    line: usize,
    row: usize,
    buf: Vec<u8>,
}

impl<T> JsonlRows<T> {
    /// Opens `path`, whose rows `normalize` checks.
    pub fn open_with(path: &Path, schema: RowSchema, normalize: Normalize<T>) -> Result<Self> {
        let file = open_regular(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 16, file),
            schema,
            normalize,
            line: 0,
            row: 0,
            buf: Vec::new(),
        })
    }
}

impl<T> Iterator for JsonlRows<T> {
    type Item = Result<std::result::Result<T, Vec<Problem>>>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            let limit = MAX_LINE_BYTES as u64 + 2;
            match (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut self.buf)
            {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(DataError::io(&self.path, e))),
            }
            self.line += 1;
            let ended = self.buf.last() == Some(&b'\n');
            if self.buf.len() - usize::from(ended) > MAX_LINE_BYTES {
                // Skip the rest of the line without keeping it, so a skipping policy can go on.
                let location = RowLocation {
                    path: self.path.clone(),
                    line: Some(self.line),
                    row: self.row,
                };
                self.row += 1;
                self.buf.clear();
                if !ended && let Err(e) = skip_line(&mut self.reader) {
                    return Some(Err(DataError::io(&self.path, e)));
                }
                return Some(Ok(Err(vec![Problem::new(
                    location,
                    "",
                    ProblemKind::TooLarge,
                    format!("the line is longer than the limit of {MAX_LINE_BYTES} bytes"),
                )])));
            }
            let mut bytes = self.buf.as_slice();
            if self.line == 1 {
                bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let location = RowLocation {
                path: self.path.clone(),
                line: Some(self.line),
                row: self.row,
            };
            self.row += 1;
            let text = match std::str::from_utf8(bytes) {
                Ok(t) => t,
                Err(e) => {
                    return Some(Ok(Err(vec![Problem::new(
                        location,
                        "",
                        ProblemKind::InvalidUtf8,
                        format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
                    )])));
                }
            };
            let value: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    return Some(Ok(Err(vec![Problem::new(
                        location,
                        "",
                        ProblemKind::BrokenJson,
                        format!("broken JSON at column {}: {e}", e.column()),
                    )])));
                }
            };
            return Some(Ok((self.normalize)(&value, location, self.schema)));
        }
    }
}

/// Consumes input up to and including the next newline, holding one buffer at a time.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            reader.consume(i + 1);
            return Ok(());
        }
        let n = buf.len();
        reader.consume(n);
    }
}

pub(crate) fn json_array_rows<T>(
    path: &Path,
    schema: RowSchema,
    normalize: Normalize<T>,
) -> Result<Vec<std::result::Result<T, Vec<Problem>>>> {
    let bytes = read_bounded(path, MAX_JSON_FILE_BYTES, "a .json array (use JSONL)")?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        DataError::file(
            path,
            format!(
                "broken JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })?;
    let Value::Array(rows) = value else {
        return Err(DataError::file(
            path,
            "a .json data file must hold an array of rows (use .jsonl for one row a line)",
        ));
    };
    Ok(rows
        .iter()
        .enumerate()
        .map(|(i, v)| {
            normalize(
                v,
                RowLocation {
                    path: path.to_path_buf(),
                    line: None,
                    row: i,
                },
                schema,
            )
        })
        .collect())
}

/// Turns one row (any supported shape) into a checked conversation, or the row's problems.
pub(crate) fn normalize_row(
    value: &Value,
    location: RowLocation,
    schema: RowSchema,
) -> std::result::Result<Conversation, Vec<Problem>> {
    let problem = |field: &str, kind: ProblemKind, msg: String| {
        vec![Problem::new(location.clone(), field, kind, msg)]
    };
    let Value::Object(obj) = value else {
        return Err(problem(
            "",
            ProblemKind::WrongType,
            format!("a row must be a JSON object, found {}", kind_of(value)),
        ));
    };
    let schema = match schema {
        RowSchema::Auto if obj.contains_key("messages") => RowSchema::Messages,
        RowSchema::Auto if obj.contains_key("conversations") => RowSchema::ShareGpt,
        RowSchema::Auto if obj.contains_key("instruction") => RowSchema::Alpaca,
        RowSchema::Auto if obj.contains_key("prompt") || obj.contains_key("completion") => {
            RowSchema::PromptCompletion
        }
        RowSchema::Auto if obj.contains_key("text") => RowSchema::Text,
        RowSchema::Auto => {
            const SHOWN: usize = 8;
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            let mut found = keys
                .iter()
                .take(SHOWN)
                .map(|k| {
                    // A hostile file's key may be megabytes long: show its start.
                    let cut: String = k.chars().take(40).collect();
                    if cut.len() < k.len() {
                        format!("`{cut}…`")
                    } else {
                        format!("`{k}`")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            if keys.len() > SHOWN {
                found.push_str(&format!(" and {} more", keys.len() - SHOWN));
            }
            if keys.is_empty() {
                found = "none".into();
            }
            return Err(problem(
                "messages",
                ProblemKind::MissingMessages,
                format!("{NO_SHAPE}; the row's keys: {found}"),
            ));
        }
        s => s,
    };
    let mut conversation = match schema {
        RowSchema::Messages | RowSchema::Auto => {
            Conversation::new(messages_schema(obj, &location)?)
        }
        RowSchema::ShareGpt => Conversation::new(sharegpt_schema(obj, &location)?),
        RowSchema::Alpaca => Conversation::new(alpaca_schema(obj, &location)?),
        RowSchema::PromptCompletion => prompt_completion_schema(obj, &location)?,
        RowSchema::Text => {
            let text = plain_text(obj, "text", &location)?;
            Conversation {
                plain: true,
                ..Conversation::new(vec![Message::new(Role::Assistant, text)])
            }
        }
    };
    if !conversation.plain {
        conversation.tools = tools_column(obj, &location)?;
    }
    conversation.location = Some(location);
    let problems = crate::validate::structure_problems(&conversation);
    if problems.is_empty() {
        Ok(conversation)
    } else {
        Err(problems)
    }
}

/// What a row without any supported shape is told (one summary names it for a whole file).
pub const NO_SHAPE: &str = "no supported shape: `messages`, ShareGPT `conversations`, Alpaca \
                            `instruction`, TRL `prompt` + `completion`, or `text`";

/// A string field of a row (required).
fn plain_text(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    location: &RowLocation,
) -> std::result::Result<String, Vec<Problem>> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(vec![Problem::new(
            location.clone(),
            key,
            ProblemKind::MissingMessages,
            "missing",
        )]),
        Some(other) => Err(vec![Problem::new(
            location.clone(),
            key,
            ProblemKind::WrongType,
            format!("must be a string, found {}", kind_of(other)),
        )]),
    }
}

/// TRL's prompt/completion row: two strings (rendered without the chat template) or two lists
/// of messages (the completion's assistant turns are trained).
fn prompt_completion_schema(
    obj: &serde_json::Map<String, Value>,
    location: &RowLocation,
) -> std::result::Result<Conversation, Vec<Problem>> {
    let problem = |field: &str, kind: ProblemKind, msg: String| {
        vec![Problem::new(location.clone(), field, kind, msg)]
    };
    match (obj.get("prompt"), obj.get("completion")) {
        (Some(Value::String(_)), Some(Value::String(_))) => {
            let prompt = plain_text(obj, "prompt", location)?;
            let completion = plain_text(obj, "completion", location)?;
            Ok(Conversation {
                plain: true,
                completion_from: Some(1),
                ..Conversation::new(vec![
                    Message::new(Role::User, prompt),
                    Message::new(Role::Assistant, completion),
                ])
            })
        }
        (Some(Value::Array(_)), Some(Value::Array(_))) => {
            let mut messages = message_list(obj, "prompt", location)?;
            let completion = message_list(obj, "completion", location)?;
            if let Some(i) = completion
                .iter()
                .position(|m| m.role != Role::Assistant && m.role != Role::Tool)
            {
                return Err(problem(
                    &format!("completion[{i}].role"),
                    ProblemKind::WrongTurnOrder,
                    format!(
                        "a completion holds assistant (and tool) messages, found {}",
                        completion[i].role.as_str()
                    ),
                ));
            }
            let from = messages.len();
            messages.extend(completion);
            Ok(Conversation {
                completion_from: Some(from),
                ..Conversation::new(messages)
            })
        }
        (None, _) => Err(problem(
            "prompt",
            ProblemKind::MissingMessages,
            "missing (a row with `completion` needs its `prompt`)".into(),
        )),
        (_, None) => Err(problem(
            "completion",
            ProblemKind::NoAssistantTurn,
            "missing (a row with `prompt` needs its `completion`)".into(),
        )),
        (Some(p), Some(c)) => Err(problem(
            "completion",
            ProblemKind::WrongType,
            format!(
                "`prompt` and `completion` must both be strings or both lists of messages; \
                 found {} and {}",
                kind_of(p),
                kind_of(c)
            ),
        )),
    }
}

/// Largest `tools` column, in bytes of JSON.
const MAX_TOOLS_BYTES: usize = 1 << 20;

/// The `tools` column: a list of tool schemas, or the JSON text of one (as TRL accepts).
fn tools_column(
    obj: &serde_json::Map<String, Value>,
    location: &RowLocation,
) -> std::result::Result<Option<String>, Vec<Problem>> {
    let wrong = |msg: String| {
        vec![Problem::new(
            location.clone(),
            "tools",
            ProblemKind::WrongType,
            msg,
        )]
    };
    let list = match obj.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v) => v,
            Err(e) => return Err(wrong(format!("a string that is not JSON: {e}"))),
        },
        Some(v) => v.clone(),
    };
    match &list {
        Value::Null => Ok(None),
        Value::Array(items) if items.iter().all(Value::is_object) => {
            let text = list.to_string();
            if text.len() > MAX_TOOLS_BYTES {
                return Err(wrong(format!(
                    "{} bytes of tool schemas, over the limit of {MAX_TOOLS_BYTES}",
                    text.len()
                )));
            }
            Ok((!items.is_empty()).then_some(text))
        }
        other => Err(wrong(format!(
            "must be a list of tool schemas (objects), found {}",
            kind_of(other)
        ))),
    }
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Message content: a string, or a list of `{"type": "text", "text": ...}` parts (joined).
fn content_text(
    v: Option<&Value>,
    field: &str,
    location: &RowLocation,
) -> std::result::Result<String, Vec<Problem>> {
    let wrong = |msg: String| {
        vec![Problem::new(
            location.clone(),
            field,
            ProblemKind::WrongType,
            msg,
        )]
    };
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (i, part) in parts.iter().enumerate() {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text") | None, Some(t)) => out.push_str(t),
                    (Some(other), _) => {
                        return Err(wrong(format!(
                            "part {i} has type `{other}`; only text content is supported"
                        )));
                    }
                    _ => return Err(wrong(format!("part {i} is not a text part"))),
                }
            }
            Ok(out)
        }
        Some(other) => Err(wrong(format!("must be a string, found {}", kind_of(other)))),
    }
}

fn messages_schema(
    obj: &serde_json::Map<String, Value>,
    location: &RowLocation,
) -> std::result::Result<Vec<Message>, Vec<Problem>> {
    message_list(obj, "messages", location)
}

/// The list of `{"role", "content"}` messages under `key`; problems name `key[i].field`.
pub(crate) fn message_list(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    location: &RowLocation,
) -> std::result::Result<Vec<Message>, Vec<Problem>> {
    let problem = |field: String, kind: ProblemKind, msg: String| {
        vec![Problem::new(location.clone(), field, kind, msg)]
    };
    let list = match obj.get(key) {
        None => {
            return Err(problem(
                key.into(),
                ProblemKind::MissingMessages,
                "missing".into(),
            ));
        }
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(problem(
                key.into(),
                ProblemKind::WrongType,
                format!("must be a list, found {}", kind_of(other)),
            ));
        }
    };
    if list.is_empty() {
        return Err(problem(
            key.into(),
            ProblemKind::EmptyMessages,
            "the list is empty".into(),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(problem(
                format!("{key}[{i}]"),
                ProblemKind::WrongType,
                format!("must be an object, found {}", kind_of(m)),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => Role::parse(r).ok_or_else(|| {
                problem(
                    format!("{key}[{i}].role"),
                    ProblemKind::UnknownRole,
                    format!("unknown role `{r}` (expected system, user, assistant or tool)"),
                )
            })?,
            None => {
                return Err(problem(
                    format!("{key}[{i}].role"),
                    ProblemKind::WrongType,
                    "missing".into(),
                ));
            }
            Some(other) => {
                return Err(problem(
                    format!("{key}[{i}].role"),
                    ProblemKind::WrongType,
                    format!("must be a string, found {}", kind_of(other)),
                ));
            }
        };
        let content = content_text(m.get("content"), &format!("{key}[{i}].content"), location)?;
        let reasoning_content = match m.get("reasoning_content") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(problem(
                    format!("{key}[{i}].reasoning_content"),
                    ProblemKind::WrongType,
                    format!("must be a string, found {}", kind_of(other)),
                ));
            }
        };
        let text_field = |field: &str| -> std::result::Result<Option<String>, Vec<Problem>> {
            match m.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(problem(
                    format!("{key}[{i}].{field}"),
                    ProblemKind::WrongType,
                    format!("must be a string, found {}", kind_of(other)),
                )),
            }
        };
        let tool_calls = match m.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(Value::Array(calls)) if role == Role::Assistant => {
                if let Some(j) = calls.iter().position(|c| !c.is_object()) {
                    return Err(problem(
                        format!("{key}[{i}].tool_calls[{j}]"),
                        ProblemKind::WrongType,
                        format!("must be an object, found {}", kind_of(&calls[j])),
                    ));
                }
                (!calls.is_empty()).then(|| Value::Array(calls.clone()).to_string())
            }
            Some(Value::Array(_)) => {
                return Err(problem(
                    format!("{key}[{i}].tool_calls"),
                    ProblemKind::WrongType,
                    format!(
                        "only an assistant message calls tools, not a {} one",
                        role.as_str()
                    ),
                ));
            }
            Some(other) => {
                return Err(problem(
                    format!("{key}[{i}].tool_calls"),
                    ProblemKind::WrongType,
                    format!("must be a list, found {}", kind_of(other)),
                ));
            }
        };
        out.push(Message {
            role,
            content,
            reasoning_content,
            tool_calls,
            tool_call_id: text_field("tool_call_id")?,
            name: text_field("name")?,
        });
    }
    Ok(out)
}

fn system_field(
    obj: &serde_json::Map<String, Value>,
    location: &RowLocation,
) -> std::result::Result<Option<Message>, Vec<Problem>> {
    match obj.get("system") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(Message::new(Role::System, s.clone()))),
        Some(other) => Err(vec![Problem::new(
            location.clone(),
            "system",
            ProblemKind::WrongType,
            format!("must be a string, found {}", kind_of(other)),
        )]),
    }
}

fn sharegpt_schema(
    obj: &serde_json::Map<String, Value>,
    location: &RowLocation,
) -> std::result::Result<Vec<Message>, Vec<Problem>> {
    let problem = |field: String, kind: ProblemKind, msg: String| {
        vec![Problem::new(location.clone(), field, kind, msg)]
    };
    let list = match obj.get("conversations") {
        None => {
            return Err(problem(
                "conversations".into(),
                ProblemKind::MissingMessages,
                "missing".into(),
            ));
        }
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(problem(
                "conversations".into(),
                ProblemKind::WrongType,
                format!("must be a list, found {}", kind_of(other)),
            ));
        }
    };
    if list.is_empty() {
        return Err(problem(
            "conversations".into(),
            ProblemKind::EmptyMessages,
            "the list is empty".into(),
        ));
    }
    let mut out: Vec<Message> = system_field(obj, location)?.into_iter().collect();
    for (i, m) in list.iter().enumerate() {
        let from = m.get("from").and_then(Value::as_str).ok_or_else(|| {
            problem(
                format!("conversations[{i}].from"),
                ProblemKind::WrongType,
                "missing or not a string".into(),
            )
        })?;
        let role = match from {
            "system" => Role::System,
            "human" | "user" => Role::User,
            "gpt" | "assistant" | "chatgpt" | "model" | "bard" | "bing" => Role::Assistant,
            other => {
                return Err(problem(
                    format!("conversations[{i}].from"),
                    ProblemKind::UnknownRole,
                    format!(
                        "unknown speaker `{other}` (expected system, human/user or gpt/assistant)"
                    ),
                ));
            }
        };
        let content = content_text(
            m.get("value"),
            &format!("conversations[{i}].value"),
            location,
        )?;
        out.push(Message::new(role, content));
    }
    Ok(out)
}

fn alpaca_schema(
    obj: &serde_json::Map<String, Value>,
    location: &RowLocation,
) -> std::result::Result<Vec<Message>, Vec<Problem>> {
    let text = |key: &str, required: bool| -> std::result::Result<String, Vec<Problem>> {
        match obj.get(key) {
            None | Some(Value::Null) if required => Err(vec![Problem::new(
                location.clone(),
                key,
                if key == "output" {
                    ProblemKind::NoAssistantTurn
                } else {
                    ProblemKind::MissingMessages
                },
                "missing",
            )]),
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(vec![Problem::new(
                location.clone(),
                key,
                ProblemKind::WrongType,
                format!("must be a string, found {}", kind_of(other)),
            )]),
        }
    };
    let instruction = text("instruction", true)?;
    let input = text("input", false)?;
    let output = text("output", true)?;
    let user = if input.trim().is_empty() {
        instruction
    } else {
        format!("{instruction}\n\n{input}")
    };
    let mut out: Vec<Message> = system_field(obj, location)?.into_iter().collect();
    out.push(Message::new(Role::User, user));
    out.push(Message::new(Role::Assistant, output));
    Ok(out)
}
