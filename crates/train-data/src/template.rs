//! Hugging Face chat templates, rendered with minijinja configured like `transformers`'
//! Jinja environment (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`, `strftime_now`, a `tojson` that writes what Python's `json.dumps` writes).
//!
//! Templates run sandboxed: no file or environment access (minijinja has none), bounded
//! instruction fuel and recursion, so a hostile template cannot hang the process.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};
use serde_json::Value as Json;

use crate::conversation::Message;
use crate::error::{DataError, Result};

/// Instruction budget of one render (a few thousand times what real templates use).
const FUEL: u64 = 50_000_000;
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template and the special tokens it can refer to.
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
        env.set_recursion_limit(100);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
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
        let config: Json = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| DataError::file(&config_path, format!("invalid JSON: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Json::Null,
            Err(e) => return Err(DataError::io(&config_path, e)),
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, origin) = if jinja.is_file() {
            (
                std::fs::read_to_string(&jinja).map_err(|e| DataError::io(&jinja, e))?,
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
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| DataError::Template {
                template: self.origin.clone(),
                message: describe(&e),
            })?;
        template.render(ctx).map_err(|e| DataError::Template {
            template: self.origin.clone(),
            message: describe(&e),
        })
    }
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
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {message}"),
    ))
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
