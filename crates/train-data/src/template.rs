//! Hugging Face chat templates, rendered with minijinja configured like `transformers`'
//! Jinja environment (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`, `strftime_now`, a `tojson` that writes what Python's `json.dumps` writes).
//!
//! Templates run sandboxed: no file or environment access (minijinja has none), and every
//! render is bounded inside the engine (train-rs' patched minijinja, `vendor/minijinja`):
//! instruction fuel, macro recursion, a memory budget charged wherever the template creates a
//! string, list or map (operators, filters, methods, captured and emitted output), and values
//! that outlive an expression may nest at most 128 levels (no namespace inside a namespace), so
//! a hostile template can neither hang the process, exhaust its memory, nor overflow its
//! stack. A render that exceeds a bound is a failure of the template itself, which
//! [`is_template_failure`] tells apart from a row the template rejects (`raise_exception`).

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};
use serde_json::Value as Json;

use crate::conversation::Message;
use crate::error::{DataError, Result};

/// Instruction budget of one render: the fixtures' templates (Qwen2/3, Llama 3, SmolLM2) take
/// under 8,000 for a conversation of 100 turns (`real_templates_use_little_fuel`), so this
/// leaves room for conversations hundreds of times longer, while a template that burns it all
/// stops within a fraction of a second.
const FUEL: u64 = 5_000_000;
/// Deepest macro recursion.
const RECURSION_LIMIT: usize = 100;
/// Most bytes one rendering may produce (a conversation is kilobytes; a hostile template that
/// loops over huge strings is stopped here instead of exhausting memory).
pub const MAX_RENDERED_BYTES: usize = 64 << 20;
/// Most bytes one render may allocate, output included: what the template creates is counted
/// (not what is alive), which real templates keep to a few times the size of their output.
pub const MAX_TEMPLATE_MEMORY: usize = 256 << 20;
/// Marks the messages of failures of the template itself (a bound exceeded, a broken
/// template), as opposed to a row that the template rejects.
const TEMPLATE_FAILURE: &str = "a failure of the template itself, not of this row";
/// Deepest nesting `tojson` serializes, and its largest indent.
const MAX_JSON_DEPTH: usize = 128;
const MAX_JSON_INDENT: usize = 64;
const TEMPLATE_NAME: &str = "chat_template";
/// Largest `tokenizer_config.json` or `chat_template.jinja` read (real ones are kilobytes; a few
/// carry megabytes of added-token tables).
const MAX_TEMPLATE_FILE_BYTES: u64 = 64 << 20;

/// A compiled chat template and the special tokens it can refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    source: String,
    special_tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Reads a special token of `tokenizer_config.json` (a string or an `AddedToken` object).
pub(crate) fn special_token(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in messages (e.g. `model/tokenizer_config.json`).
    pub fn new(source: &str, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        // `{% generation %}` only marks assistant spans for `return_assistant_tokens_mask`; the
        // labels here come from the rendering itself, so the markers are dropped.
        let source = strip_generation_tags(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(FUEL));
        env.set_memory_limit(Some(MAX_TEMPLATE_MEMORY));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(python_method);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| DataError::Template {
                template: origin.clone(),
                message: describe(&e),
            })?;
        Ok(Self {
            env,
            origin,
            source,
            special_tokens: BTreeMap::new(),
        })
    }

    /// The chat template of a Hugging Face model directory: `chat_template.jinja` if present
    /// (as `transformers` prefers), else `chat_template` of `tokenizer_config.json` (a string,
    /// or a list of named templates of which `default` is used). Special tokens (`bos_token`,
    /// `eos_token`, `pad_token`, `unk_token`) come from `tokenizer_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        // Regular files of bounded size only (a FIFO would block, a huge file exhaust memory).
        let config: Json = if std::fs::symlink_metadata(&config_path).is_ok() {
            let bytes = crate::load::read_bounded(
                &config_path,
                MAX_TEMPLATE_FILE_BYTES,
                "tokenizer_config.json",
            )?;
            serde_json::from_slice(&bytes)
                .map_err(|e| DataError::file(&config_path, format!("invalid JSON: {e}")))?
        } else {
            Json::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, origin) = if std::fs::symlink_metadata(&jinja).is_ok() {
            let bytes =
                crate::load::read_bounded(&jinja, MAX_TEMPLATE_FILE_BYTES, "a chat template")?;
            (
                String::from_utf8(bytes).map_err(|_| DataError::file(&jinja, "not UTF-8 text"))?,
                jinja.display().to_string(),
            )
        } else {
            let origin = format!("{} (chat_template)", config_path.display());
            match config.get("chat_template") {
                Some(Json::String(s)) => (s.clone(), origin),
                Some(Json::Array(list)) => {
                    let default = list
                        .iter()
                        .find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
                    match default
                        .and_then(|t| t.get("template"))
                        .and_then(Json::as_str)
                    {
                        Some(s) => (s.to_string(), origin),
                        None => {
                            return Err(DataError::file(
                                &config_path,
                                "chat_template list has no `default` entry",
                            ));
                        }
                    }
                }
                _ => {
                    return Err(DataError::file(
                        dir,
                        "no chat template: neither chat_template.jinja nor a `chat_template` in tokenizer_config.json",
                    ));
                }
            }
        };
        let mut template = Self::new(&source, origin)?;
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(tok) = special_token(&config, key) {
                template.special_tokens.insert(key.to_string(), tok);
            }
        }
        Ok(template)
    }

    /// Sets a special token the template can refer to (e.g. `bos_token`).
    pub fn set_special_token(&mut self, key: &str, token: &str) {
        self.special_tokens
            .insert(key.to_string(), token.to_string());
    }

    /// A special token known to the template.
    pub fn special_token(&self, key: &str) -> Option<&str> {
        self.special_tokens.get(key).map(String::as_str)
    }

    /// Where the template comes from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Renders with extra template variables (e.g. `enable_thinking`).
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Json>,
    ) -> Result<String> {
        let ctx = self.context(messages, add_generation_prompt, extra);
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| DataError::Template {
                template: self.origin.clone(),
                message: describe(&e),
            })?;
        let mut out = Bounded(Vec::new());
        template
            .render_captured_to(ctx, &mut out)
            .map_err(|e| DataError::Template {
                template: self.origin.clone(),
                message: render_failure(&e, out.0.len()),
            })?;
        String::from_utf8(out.0).map_err(|e| DataError::Template {
            template: self.origin.clone(),
            message: format!("the rendering is not UTF-8: {e}"),
        })
    }
}

impl ChatTemplate {
    fn context(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Json>,
    ) -> BTreeMap<String, Value> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Value::from(v.as_str()));
        }
        for (k, v) in extra {
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx
    }

    /// Fuel one render uses (for measuring real templates against [`FUEL`]); `None` when the
    /// template refuses the messages (Mistral's raises on a system turn).
    #[cfg(test)]
    fn fuel_used(&self, messages: &[Message], add_generation_prompt: bool) -> Option<u64> {
        let ctx = self.context(messages, add_generation_prompt, &serde_json::Map::new());
        let template = self.env.get_template(TEMPLATE_NAME).ok()?;
        let captured = template.render_captured(ctx).ok()?;
        captured.state().fuel_levels().map(|(used, _)| used)
    }
}

/// A writer that refuses to grow past [`MAX_RENDERED_BYTES`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            self.0.resize(MAX_RENDERED_BYTES, 0);
            return Err(std::io::Error::other("the rendering is too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `tojson` of `value` could produce more than [`MAX_RENDERED_BYTES`] or nests deeper
/// than [`MAX_JSON_DEPTH`]: the items are counted as often as they occur, since a value whose
/// parts are shared (`[a, a]`, nested) serializes exponentially larger than it is. Iterative,
/// and stops as soon as the answer is known.
fn json_too_large(value: &Value, indent: usize) -> Option<String> {
    let mut estimate = 0usize;
    let mut pending = vec![(value.clone(), 0usize)];
    while let Some((v, depth)) = pending.pop() {
        // Separators, the newline and its indent; strings at worst escape every byte.
        estimate = estimate.saturating_add(40 + indent.saturating_mul(depth + 1));
        if let Some(s) = v.as_str() {
            estimate = estimate.saturating_add(s.len().saturating_mul(6));
        }
        if estimate > MAX_RENDERED_BYTES {
            return Some(format!(
                "tojson: the JSON would exceed {MAX_RENDERED_BYTES} bytes"
            ));
        }
        let is_map = match v.kind() {
            ValueKind::Map => true,
            ValueKind::Seq | ValueKind::Iterable => false,
            _ => continue,
        };
        if depth >= MAX_JSON_DEPTH {
            return Some(format!("tojson: nesting deeper than {MAX_JSON_DEPTH}"));
        }
        let Ok(items) = v.try_iter() else { continue };
        for item in items {
            if is_map {
                if let Some(k) = item.as_str() {
                    estimate = estimate.saturating_add(k.len().saturating_mul(6));
                }
                pending.push((v.get_item(&item).unwrap_or_default(), depth + 1));
            } else {
                pending.push((item, depth + 1));
            }
        }
    }
    None
}

/// The message of a failed render that produced `rendered` bytes: failures of the template
/// itself (a bound exceeded, a filter, function or test that does not exist) are marked
/// [`TEMPLATE_FAILURE`], as they would fail on any row; the template's own
/// `raise_exception` and errors that depend on the row's data (an undefined method on a
/// missing field, say) are not.
fn render_failure(e: &Error, rendered: usize) -> String {
    let lead = if rendered >= MAX_RENDERED_BYTES {
        Some(format!("the rendering exceeds {MAX_RENDERED_BYTES} bytes"))
    } else {
        match e.kind() {
            ErrorKind::OutOfMemory => Some(format!(
                "the chat template allocated more than {} MiB",
                MAX_TEMPLATE_MEMORY >> 20
            )),
            ErrorKind::OutOfFuel => Some(format!(
                "the chat template ran out of fuel ({FUEL} instructions)"
            )),
            ErrorKind::NestingTooDeep => {
                Some("the chat template built a value nested too deeply".to_string())
            }
            ErrorKind::InvalidOperation if e.detail() == Some("recursion limit exceeded") => Some(
                format!("the chat template recursed deeper than {RECURSION_LIMIT} levels"),
            ),
            ErrorKind::UnknownFilter
            | ErrorKind::UnknownFunction
            | ErrorKind::UnknownTest
            | ErrorKind::SyntaxError
            | ErrorKind::TemplateNotFound
            | ErrorKind::BadInclude => Some("the chat template is broken".to_string()),
            _ => None,
        }
    };
    match lead {
        Some(lead) => format!("{lead} ({TEMPLATE_FAILURE}): {}", describe(e)),
        None => describe(e),
    }
}

/// Whether `error` is a failure of a chat template itself (fuel, memory or recursion
/// exhausted, a value nested too deeply, the output too large, a filter or function that does
/// not exist) rather than a row that the template rejects: such a failure would repeat on every
/// row, so a preparation stops at the first one instead of skipping rows.
pub fn is_template_failure(error: &DataError) -> bool {
    matches!(error, DataError::Template { message, .. } if message.contains(TEMPLATE_FAILURE))
}

fn describe(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn strip_generation_tags(source: &str) -> String {
    let mut out = source.to_string();
    for tag in ["generation", "endgeneration"] {
        for (open, close) in [("{%-", "-%}"), ("{%-", "%}"), ("{%", "-%}"), ("{%", "%}")] {
            out = out.replace(&format!("{open} {tag} {close}"), "");
        }
    }
    out
}

fn raise_exception(message: &str) -> std::result::Result<Value, Error> {
    // A rejection's message names a reason, not a payload: it is cut at 4 KiB. A row's text in
    // it must not pass for a failure of the template.
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < message.len() { "…" } else { "" };
    let message = format!("{}{cut}", &message[..end]).replace(TEMPLATE_FAILURE, "…");
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {message}"),
    ))
}

/// Length of `s.replace(from, to)` (at most `count` replacements) with `to` of `to_len`
/// bytes, as Python and Rust replace (an empty `from` matches around every character).
fn replaced_len(s: &str, from: &str, to_len: usize, count: Option<usize>) -> usize {
    let all = if from.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(from).count()
    };
    let n = count.map_or(all, |c| c.min(all));
    (s.len() - n * from.len()).saturating_add(n.saturating_mul(to_len))
}

/// Python's string methods (`minijinja_contrib::pycompat`), with what `str.replace` and
/// `str.join` build charged to the render's memory budget first; `join` takes strings only,
/// as Python's does (a displayed value can be exponentially larger than itself).
fn python_method(
    state: &minijinja::State<'_, '_>,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, Error> {
    if let Some(s) = value.as_str() {
        match (method, args) {
            ("replace", [from, to, rest @ ..]) => {
                if let (Some(from), Some(to)) = (from.as_str(), to.as_str()) {
                    let count = rest
                        .first()
                        .and_then(|c| i64::try_from(c.clone()).ok())
                        .and_then(|c| usize::try_from(c).ok());
                    state.charge_memory(replaced_len(s, from, to.len(), count))?;
                }
            }
            ("join", [items]) => {
                for (i, item) in items.try_iter()?.enumerate() {
                    let Some(text) = item.as_str() else {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "join: sequence item {i}: expected a string, found {}",
                                item.kind()
                            ),
                        ));
                    };
                    state.charge_memory(1 + text.len() + if i > 0 { s.len() } else { 0 })?;
                }
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `strftime_now(format)`: the current UTC time formatted like Python's `strftime`
/// (`%Y %m %d %H %M %S %y %b %B %a %A %j %e %%`).
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    format_time(secs, format)
}

pub(crate) fn format_time(unix_secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(is_leap && month > 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as `transformers` defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
#[allow(clippy::needless_pass_by_value)] // minijinja hands keyword arguments over by value
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    if indent.is_some_and(|n| n > MAX_JSON_INDENT) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: indent above {MAX_JSON_INDENT}"),
        ));
    }
    if separators.iter().flatten().any(|s| s.len() > 16) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: separators longer than 16 bytes",
        ));
    }
    if let Some(why) = json_too_large(value, indent.unwrap_or(0)) {
        return Err(Error::new(ErrorKind::InvalidOperation, why));
    }
    let json = serde_json::to_value(value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    python_dumps(
        &json,
        indent,
        &item_sep,
        &key_sep,
        sort_keys.unwrap_or(false),
        0,
        &mut out,
    );
    Ok(Value::from(out))
}

pub(crate) fn python_dumps(
    v: &Json,
    indent: Option<usize>,
    item_sep: &str,
    key_sep: &str,
    sort: bool,
    depth: usize,
    out: &mut String,
) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(&python_number(n)),
        Json::String(s) => python_string(s, out),
        Json::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_dumps(item, indent, item_sep, key_sep, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_string(k, out);
                out.push_str(key_sep);
                python_dumps(item, indent, item_sep, key_sep, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn python_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    // Python's repr: shortest round-trip digits, exponent with sign and two digits.
    let s = format!("{f:?}");
    if let Some((mantissa, exp)) = s.split_once('e') {
        let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
        format!("{mantissa}e{sign}{digits:0>2}")
    } else {
        s
    }
}

fn python_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Role;

    #[test]
    fn dates_format_like_python() {
        // 2024-07-26 12:34:56 UTC, a Friday.
        let t = 1_721_997_296;
        assert_eq!(format_time(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            format_time(t, "%A %B %e, %y %H:%M:%S %j %%"),
            "Friday July 26, 24 12:34:56 208 %"
        );
        assert_eq!(format_time(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", "test").unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert(
            "x".into(),
            serde_json::json!({"name": "f", "args": [1, 2.5, "é\n\"q\""], "ok": true, "n": null}),
        );
        let out = t.render_with(&[], false, &extra).unwrap();
        assert_eq!(
            out,
            "{\"name\": \"f\", \"args\": [1, 2.5, \"é\\n\\\"q\\\"\"], \"ok\": true, \"n\": null}|{\n  \"name\": \"f\",\n  \"args\": [\n    1,\n    2.5,\n    \"é\\n\\\"q\\\"\"\n  ],\n  \"ok\": true,\n  \"n\": null\n}"
        );
        let n: serde_json::Number = serde_json::from_str("1e-5").unwrap();
        assert_eq!(python_number(&n), "1e-05");
    }

    #[test]
    fn raise_exception_and_fuel_are_errors_not_hangs() {
        let t = ChatTemplate::new("{{ raise_exception('bad role') }}", "t.jinja").unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("t.jinja") && e.contains("bad role"), "{e}");
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "loop",
        )
        .unwrap();
        assert!(t.render(&[], false).is_err());
        assert!(
            ChatTemplate::new("{% for %}", "broken")
                .unwrap_err()
                .to_string()
                .contains("broken")
        );
    }

    #[test]
    fn hostile_templates_are_bounded_errors() {
        let err = |src: &str| {
            let t = ChatTemplate::new(src, "hostile.jinja").unwrap();
            t.render(&[], false).unwrap_err().to_string()
        };
        // Output far beyond the bound: stopped at MAX_RENDERED_BYTES, not at the memory.
        let e = err("{% for i in range(100000) %}{{ 'x' * 10000000 }}{% endfor %}");
        assert!(e.contains("exceeds") && e.contains("hostile.jinja"), "{e}");
        // Huge indents and deep nesting in tojson.
        assert!(err("{{ [1] | tojson(indent=1000000000000000) }}").contains("indent"));
        // (Template literals cannot nest that deep: the parser stops first; the check guards
        // values from elsewhere.)
        let mut deep = Value::from(1);
        for _ in 0..200 {
            deep = Value::from(vec![deep]);
        }
        assert!(json_too_large(&deep, 0).unwrap().contains("nesting"));
        let flat = Value::from(vec![Value::from(vec![1])]);
        assert_eq!(json_too_large(&flat, 2), None);
        // Shared parts: 2^40 leaves in a value of 40 lists.
        let mut shared = Value::from("x");
        for _ in 0..40 {
            shared = Value::from(vec![shared.clone(), shared]);
        }
        assert!(json_too_large(&shared, 0).unwrap().contains("exceed"));
        // No file access: include / import / extends find nothing.
        for src in [
            "{% include '/etc/passwd' %}",
            "{% import '/etc/passwd' as p %}",
            "{% extends '/etc/passwd' %}",
        ] {
            assert!(
                err(src).contains("not found") || err(src).contains("template"),
                "{src}"
            );
        }
        // Unbounded recursion and loops run out of their limits.
        let e = err("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
        assert!(e.contains("recursion") || e.contains("fuel"), "{e}");
        // Values nested deeper at every step are refused by the engine when they are stored
        // (their display and drop would recurse: 100,000 levels overflow the stack).
        for src in [
            "{% set ns = namespace(x=[]) %}{% for i in range(99999) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}",
            "{% set a = namespace(x=1) %}{% set b = namespace(y=1) %}{% for i in range(999) %}{% set a.x = b.y %}{%- set b.y = {'k': a.x} -%}{% endfor %}",
            "{% set ns = namespace(x=[1]) %}{% for i in range(999) %}{% set ns.x = ns.x | batch(1) | list %}{% endfor %}",
        ] {
            let e = err(src);
            assert!(
                e.contains("hostile.jinja") && e.contains("nested too deeply"),
                "{e}"
            );
        }
        // One level more, once, is an ordinary value.
        for src in [
            "{% set ns = namespace(x=[]) %}{% set ns.x = dict(a=ns.x) %}{{ ns.x }}",
            "{% set ns = namespace(x=[]) %}{% set ns.x = ns.x | batch(1) %}{{ ns.x }}",
            "{% set ns = namespace(x=[]) %}{% set ns.x = (ns.x, 1) %}{{ ns.x }}",
        ] {
            assert!(
                ChatTemplate::new(src, "once")
                    .unwrap()
                    .render(&[], false)
                    .is_ok(),
                "{src}"
            );
        }
        // Flat accumulation, as real templates do it, is fine.
        let t = ChatTemplate::new(
            "{% set ns = namespace(s='', items=[], n=0) %}{% for m in messages %}{% set ns.s = ns.s + m['content'] %}{%- set ns.items = ns.items + [m.role] -%}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.s }}|{{ ns.items|join(',') }}|{{ ns.n }}",
            "flat",
        )
        .unwrap();
        let msgs = [
            Message::new(Role::User, "a"),
            Message::new(Role::Assistant, "b"),
        ];
        assert_eq!(t.render(&msgs, false).unwrap(), "ab|user,assistant|2");
        // A normal rendering is unaffected.
        let t = ChatTemplate::new("{{ messages | tojson(indent=2) }}", "ok").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "[]");
    }

    /// Real templates (every fixture) use a tiny fraction of the fuel: a conversation of
    /// 100 turns stays under 1% of [`FUEL`].
    #[test]
    fn real_templates_use_little_fuel() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut dirs: Vec<std::path::PathBuf> = Vec::new();
        for fixtures in [
            root.join("tests/fixtures"),
            root.join("../train-model/tests/fixtures"),
        ] {
            for entry in std::fs::read_dir(fixtures).unwrap() {
                let dir = entry.unwrap().path();
                if dir.join("tokenizer_config.json").is_file()
                    || dir.join("chat_template.jinja").is_file()
                {
                    dirs.push(dir);
                }
            }
        }
        assert!(dirs.len() >= 6, "{dirs:?}");
        let turns: Vec<Message> = (0..50)
            .flat_map(|i| {
                [
                    Message::new(Role::User, format!("question {i}")),
                    Message::new(
                        Role::Assistant,
                        format!("<think>\nhm\n</think>\n\nanswer {i}"),
                    ),
                ]
            })
            .collect();
        let mut most = 0;
        for dir in &dirs {
            let Ok(t) = ChatTemplate::from_model_dir(dir) else {
                continue;
            };
            let mut with_system = vec![Message::new(Role::System, "Be brief.")];
            with_system.extend(turns.iter().cloned());
            let mut rendered = 0;
            for msgs in [&turns[..2], &turns[..], &with_system[..]] {
                if let Some(fuel) = t.fuel_used(msgs, true) {
                    most = most.max(fuel);
                    rendered += 1;
                }
            }
            assert!(rendered >= 2, "{}: renders almost nothing", dir.display());
        }
        println!("most fuel used by a fixture template: {most}");
        assert!(most > 0 && most < FUEL / 100, "{most}");
    }

    #[test]
    fn python_string_methods_and_generation_tags_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% generation %}{{ m.content.split('</think>')[-1].lstrip('\\n').upper() }}{% endgeneration %}{% endfor %}",
            "t",
        )
        .unwrap();
        let out = t
            .render(
                &[Message::new(Role::Assistant, "<think>x</think>\n\nhi")],
                false,
            )
            .unwrap();
        assert_eq!(out, "HI");
    }
}
