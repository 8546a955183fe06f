//! Reward functions for GRPO: built-in ones (exact or regex match against a dataset column,
//! format checks, DAPO's soft over-length punishment, the origin's stop-emoji pattern) and an
//! external command, read from a TOML file of `[[reward]]` tables, each weighted.
//!
//! ```toml
//! [[reward]]
//! type = "exact_match"        # the answer extracted from the completion equals a column
//! column = "answer"
//! extract = "<answer>(.*?)</answer>"
//! weight = 1.0
//!
//! [[reward]]
//! type = "think_format"       # a <think>…</think> block, then an answer
//! weight = 0.5
//!
//! [[reward]]
//! type = "command"            # JSON lines in on stdin, one number per line out
//! command = ["python3", "score.py"]
//! timeout_seconds = 60
//! ```
//!
//! A function returns one score per completion, or `None` where it does not apply (as TRL's
//! reward functions may return `None`): the weighted sum skips it, and a completion no function
//! scores gets no advantage.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};
use train_data::{Message, RowLocation};

use crate::error::{Result, RunnerError};

/// Largest reward file read.
pub const MAX_REWARD_FILE_BYTES: u64 = 1 << 20;
/// Most reward functions in a file.
pub const MAX_REWARD_FUNCTIONS: usize = 32;
/// Largest compiled regular expression (bytes of the compiled program).
pub const MAX_REGEX_BYTES: usize = 1 << 20;
/// Most bytes an external reward command may write to stdout per call.
pub const MAX_COMMAND_OUTPUT_BYTES: usize = 16 << 20;
/// Most bytes of an external reward command's stderr kept for an error message.
const MAX_COMMAND_STDERR_BYTES: usize = 4096;

/// What a reward function sees of one completion.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// The prompt's messages.
    pub prompt: &'a [Message],
    /// The generated text (special tokens skipped, the end-of-turn token excluded).
    pub completion: &'a str,
    /// Tokens generated (the end token included).
    pub completion_tokens: usize,
    /// The row's other columns.
    pub columns: &'a Map<String, Value>,
    /// Where the prompt's row came from.
    pub location: Option<&'a RowLocation>,
}

impl RewardInput<'_> {
    fn row(&self) -> String {
        self.location
            .map_or_else(|| "a prompt".to_string(), ToString::to_string)
    }
}

/// A reward function: a score per completion, `None` where it does not apply.
pub trait RewardFunction: Send + Sync + std::fmt::Debug {
    /// Its name in metrics (`rewards/<name>/mean`) and errors.
    fn name(&self) -> &str;
    /// The scores of `inputs`, in order. An error names the row it is about.
    fn score(&self, inputs: &[RewardInput<'_>]) -> std::result::Result<Vec<Option<f64>>, String>;
}

/// The settings of a built-in reward function (a `[[reward]]` table without its `weight` and
/// `name`).
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardConfig {
    /// 1 when the answer (the whole completion, or the first group of `extract` in it) equals
    /// the row's `column` (both trimmed; a number column compares as its JSON text), else 0.
    ExactMatch {
        /// The dataset column holding the expected answer.
        column: String,
        /// A regular expression whose first capture group is the answer (the first match);
        /// no match scores 0.
        #[serde(default)]
        extract: Option<String>,
    },
    /// 1 when `pattern` matches the completion (anywhere; anchor it with `^…$` for the
    /// whole text), else 0. With `column`, the pattern is the row's column value, taken
    /// literally.
    Regex {
        /// The regular expression (Rust `regex` syntax; `(?s)` lets `.` match newlines).
        #[serde(default)]
        pattern: Option<String>,
        /// A column whose text must appear in the completion (instead of `pattern`).
        #[serde(default)]
        column: Option<String>,
    },
    /// 1 when the completion has a `<think>…</think>` block (non-empty) followed by a
    /// non-empty answer, else 0. The tags can be changed.
    ThinkFormat {
        /// The opening tag.
        #[serde(default = "default_open")]
        open: String,
        /// The closing tag.
        #[serde(default = "default_close")]
        close: String,
    },
    /// DAPO's soft over-length punishment (TRL's `get_soft_overlong_punishment`): 0 up to
    /// `max_completion_len − soft_punish_cache` tokens, then falling linearly to −1 at
    /// `max_completion_len`, −1 beyond.
    SoftOverlong {
        /// L_max, in tokens.
        max_completion_len: usize,
        /// L_cache, in tokens.
        soft_punish_cache: usize,
    },
    /// 1 when the completion ends with a stop-emoji run (the origin's emojis repeated 2 to 4
    /// times, or `emojis` repeated `min_repeat..=max_repeat` times), else 0.
    StopEmoji {
        /// The emojis (default: the origin's).
        #[serde(default)]
        emojis: Option<Vec<String>>,
        /// Fewest repeats of a run.
        #[serde(default = "default_min_repeat")]
        min_repeat: usize,
        /// Most repeats of a run.
        #[serde(default = "default_max_repeat")]
        max_repeat: usize,
    },
    /// An external program: every completion of the step as one JSON object per line on its
    /// stdin (`prompt` (messages), `completion`, `completion_tokens` and the row's columns);
    /// it prints one number per line (or `null` where it does not apply), in order.
    Command {
        /// The program and its arguments (no shell).
        command: Vec<String>,
        /// Seconds it may run per step before it is killed.
        #[serde(default = "default_timeout")]
        timeout_seconds: f64,
    },
}

fn default_open() -> String {
    "<think>".into()
}
fn default_close() -> String {
    "</think>".into()
}
fn default_min_repeat() -> usize {
    2
}
fn default_max_repeat() -> usize {
    4
}
fn default_timeout() -> f64 {
    60.0
}

impl RewardConfig {
    /// The type name (`exact_match`, …), the default name of the function.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::ExactMatch { .. } => "exact_match",
            Self::Regex { .. } => "regex",
            Self::ThinkFormat { .. } => "think_format",
            Self::SoftOverlong { .. } => "soft_overlong",
            Self::StopEmoji { .. } => "stop_emoji",
            Self::Command { .. } => "command",
        }
    }

    /// The function, its settings checked; `name` names it in errors and metrics.
    pub fn build(&self, name: &str, base_dir: &Path) -> Result<Box<dyn RewardFunction>> {
        let bad = |message: String| RunnerError::Reward {
            function: name.to_string(),
            message,
        };
        let regex = |pattern: &str| {
            regex::RegexBuilder::new(pattern)
                .size_limit(MAX_REGEX_BYTES)
                .build()
                .map_err(|e| bad(format!("pattern {pattern:?}: {e}")))
        };
        let name = name.to_string();
        Ok(match self {
            Self::ExactMatch { column, extract } => Box::new(ExactMatch {
                name,
                column: column.clone(),
                extract: extract.as_deref().map(regex).transpose()?,
            }),
            Self::Regex { pattern, column } => {
                let matcher = match (pattern, column) {
                    (Some(p), None) => RegexSource::Pattern(regex(p)?),
                    (None, Some(c)) => RegexSource::Column(c.clone()),
                    _ => return Err(bad("give exactly one of `pattern` and `column`".into())),
                };
                Box::new(RegexReward { name, matcher })
            }
            Self::ThinkFormat { open, close } => {
                if open.is_empty() || close.is_empty() {
                    return Err(bad("the tags must not be empty".into()));
                }
                Box::new(ThinkFormat {
                    name,
                    open: open.clone(),
                    close: close.clone(),
                })
            }
            Self::SoftOverlong {
                max_completion_len,
                soft_punish_cache,
            } => {
                if *soft_punish_cache == 0 || soft_punish_cache > max_completion_len {
                    return Err(bad(format!(
                        "soft_punish_cache {soft_punish_cache} must be in 1..=max_completion_len \
                         {max_completion_len}"
                    )));
                }
                Box::new(SoftOverlong {
                    name,
                    max: *max_completion_len,
                    cache: *soft_punish_cache,
                })
            }
            Self::StopEmoji {
                emojis,
                min_repeat,
                max_repeat,
            } => {
                let detector = match emojis {
                    None if (*min_repeat, *max_repeat) == (2, 4) => {
                        train_logits::StopEmojiDetector::origin()
                    }
                    None => train_logits::StopEmojiDetector::new(
                        &train_logits::DEFAULT_STOP_EMOJIS
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>(),
                        *min_repeat,
                        *max_repeat,
                    )
                    .map_err(|e| bad(e.to_string()))?,
                    Some(e) => train_logits::StopEmojiDetector::new(e, *min_repeat, *max_repeat)
                        .map_err(|e| bad(e.to_string()))?,
                };
                Box::new(StopEmoji { name, detector })
            }
            Self::Command {
                command,
                timeout_seconds,
            } => {
                let Some(program) = command.first().filter(|p| !p.is_empty()) else {
                    return Err(bad("`command` is empty".into()));
                };
                if !(timeout_seconds.is_finite() && *timeout_seconds > 0.0) {
                    return Err(bad(format!(
                        "timeout_seconds must be a positive number, got {timeout_seconds}"
                    )));
                }
                // A relative program path with a directory part is relative to the reward
                // file, so that a file and its scorer can live together.
                let program_path = Path::new(program);
                let program = if program_path.components().count() > 1 && program_path.is_relative()
                {
                    base_dir.join(program_path)
                } else {
                    program_path.to_path_buf()
                };
                Box::new(CommandReward {
                    name,
                    program,
                    args: command[1..].to_vec(),
                    cwd: base_dir.to_path_buf(),
                    timeout: Duration::from_secs_f64(timeout_seconds.min(86_400.0)),
                })
            }
        })
    }
}

/// The text of a column as an answer: strings as they are, numbers and booleans as JSON.
fn column_text<'a>(input: &RewardInput<'a>, column: &str) -> std::result::Result<String, String> {
    match input.columns.get(column) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
        Some(other) => Err(format!(
            "{}: column `{column}` is {}, not a string or a number",
            input.row(),
            match other {
                Value::Null => "null",
                Value::Array(_) => "an array",
                _ => "an object",
            }
        )),
        None => Err(format!(
            "{}: no column `{column}` (the row has {})",
            input.row(),
            if input.columns.is_empty() {
                "only `prompt`".to_string()
            } else {
                input
                    .columns
                    .keys()
                    .take(8)
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )),
    }
}

fn indicator(b: bool) -> Option<f64> {
    Some(if b { 1.0 } else { 0.0 })
}

#[derive(Debug)]
struct ExactMatch {
    name: String,
    column: String,
    extract: Option<Regex>,
}

impl RewardFunction for ExactMatch {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, inputs: &[RewardInput<'_>]) -> std::result::Result<Vec<Option<f64>>, String> {
        inputs
            .iter()
            .map(|input| {
                let expected = column_text(input, &self.column)?;
                let answer = match &self.extract {
                    None => Some(input.completion),
                    Some(re) => re
                        .captures(input.completion)
                        .and_then(|c| c.get(1).or_else(|| c.get(0)).map(|m| m.as_str())),
                };
                Ok(indicator(
                    answer.is_some_and(|a| a.trim() == expected.trim()),
                ))
            })
            .collect()
    }
}

#[derive(Debug)]
enum RegexSource {
    Pattern(Regex),
    Column(String),
}

#[derive(Debug)]
struct RegexReward {
    name: String,
    matcher: RegexSource,
}

impl RewardFunction for RegexReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, inputs: &[RewardInput<'_>]) -> std::result::Result<Vec<Option<f64>>, String> {
        inputs
            .iter()
            .map(|input| match &self.matcher {
                RegexSource::Pattern(re) => Ok(indicator(re.is_match(input.completion))),
                RegexSource::Column(c) => {
                    let needle = column_text(input, c)?;
                    Ok(indicator(input.completion.contains(needle.trim())))
                }
            })
            .collect()
    }
}

#[derive(Debug)]
struct ThinkFormat {
    name: String,
    open: String,
    close: String,
}

impl RewardFunction for ThinkFormat {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, inputs: &[RewardInput<'_>]) -> std::result::Result<Vec<Option<f64>>, String> {
        Ok(inputs
            .iter()
            .map(|input| {
                let text = input.completion.trim_start();
                let ok = text.strip_prefix(self.open.as_str()).is_some_and(|rest| {
                    rest.split_once(self.close.as_str())
                        .is_some_and(|(thought, answer)| {
                            !thought.trim().is_empty()
                                && !answer.trim().is_empty()
                                && !thought.contains(self.open.as_str())
                        })
                });
                indicator(ok)
            })
            .collect())
    }
}

#[derive(Debug)]
struct SoftOverlong {
    name: String,
    max: usize,
    cache: usize,
}

impl RewardFunction for SoftOverlong {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, inputs: &[RewardInput<'_>]) -> std::result::Result<Vec<Option<f64>>, String> {
        let free = self.max - self.cache;
        Ok(inputs
            .iter()
            .map(|input| {
                let n = input.completion_tokens;
                Some(if n <= free {
                    0.0
                } else if n <= self.max {
                    (free as f64 - n as f64) / self.cache as f64
                } else {
                    -1.0
                })
            })
            .collect())
    }
}

#[derive(Debug)]
struct StopEmoji {
    name: String,
    detector: train_logits::StopEmojiDetector,
}

impl RewardFunction for StopEmoji {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, inputs: &[RewardInput<'_>]) -> std::result::Result<Vec<Option<f64>>, String> {
        Ok(inputs
            .iter()
            .map(|input| indicator(self.detector.detect(input.completion.trim_end()).is_some()))
            .collect())
    }
}

#[derive(Debug)]
struct CommandReward {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    cwd: PathBuf,
    timeout: Duration,
}

/// Reads at most `limit` bytes of `r`; true in the second place when there was more.
fn read_bounded(mut r: impl Read, limit: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut over = false;
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.len() + n > limit {
                    out.extend_from_slice(&buf[..limit - out.len()]);
                    over = true;
                    // Keep draining so that the program is not blocked on a full pipe.
                } else if !over {
                    out.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
    (out, over)
}

impl RewardFunction for CommandReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, inputs: &[RewardInput<'_>]) -> std::result::Result<Vec<Option<f64>>, String> {
        let mut input_text = String::new();
        for i in inputs {
            let mut obj = i.columns.clone();
            obj.insert(
                "prompt".into(),
                serde_json::to_value(i.prompt).map_err(|e| e.to_string())?,
            );
            obj.insert("completion".into(), Value::String(i.completion.to_string()));
            obj.insert("completion_tokens".into(), Value::from(i.completion_tokens));
            input_text.push_str(&Value::Object(obj).to_string());
            input_text.push('\n');
        }
        let shown = self.program.display();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .current_dir(&self.cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {shown}: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let writer = std::thread::spawn(move || {
            if let Some(mut s) = stdin {
                // A program that exits without reading everything closes the pipe: not an
                // error of ours (its output is checked below).
                let _ = s.write_all(input_text.as_bytes());
            }
        });
        // The readers hand their bytes over a channel, so that a grandchild still holding a
        // pipe open cannot make the wait unbounded.
        let (out_tx, out_rx) = std::sync::mpsc::channel();
        let (err_tx, err_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = out_tx.send(stdout.map(|s| read_bounded(s, MAX_COMMAND_OUTPUT_BYTES)));
        });
        std::thread::spawn(move || {
            let _ = err_tx.send(stderr.map(|s| read_bounded(s, MAX_COMMAND_STDERR_BYTES)));
        });
        let started = Instant::now();
        let deadline = started + self.timeout;
        let timed_out = || {
            format!(
                "{shown} did not finish within {:.0} s (timeout_seconds); it was killed",
                self.timeout.as_secs_f64()
            )
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(timed_out());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("waiting for {shown}: {e}")),
            }
        };
        let remaining =
            || deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let (out, over) = out_rx
            .recv_timeout(remaining())
            .map_err(|_| timed_out())?
            .unwrap_or_default();
        let (err, _) = err_rx
            .recv_timeout(remaining())
            .ok()
            .flatten()
            .unwrap_or_default();
        drop(writer);
        let stderr_text = String::from_utf8_lossy(&err);
        let stderr_note = if stderr_text.trim().is_empty() {
            String::new()
        } else {
            format!("; its stderr: {}", stderr_text.trim())
        };
        if !status.success() {
            return Err(format!("{shown} failed ({status}){stderr_note}"));
        }
        if over {
            return Err(format!(
                "{shown} wrote more than {MAX_COMMAND_OUTPUT_BYTES} bytes"
            ));
        }
        let text = String::from_utf8(out).map_err(|_| format!("{shown}: output is not UTF-8"))?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != inputs.len() {
            return Err(format!(
                "{shown} printed {} scores for {} completions (one number per line, in order){stderr_note}",
                lines.len(),
                inputs.len()
            ));
        }
        lines
            .iter()
            .zip(inputs)
            .enumerate()
            .map(|(k, (line, input))| {
                let t = line.trim();
                if matches!(t, "null" | "None" | "nan" | "NaN") {
                    return Ok(None);
                }
                match t.parse::<f64>() {
                    Ok(v) if v.is_finite() => Ok(Some(v)),
                    _ => Err(format!(
                        "{shown}: line {} ({:?}), for the completion of {}, is not a finite number",
                        k + 1,
                        t.chars().take(80).collect::<String>(),
                        input.row()
                    )),
                }
            })
            .collect()
    }
}

/// A reward function with its weight.
#[derive(Debug)]
pub struct WeightedReward {
    /// The function.
    pub function: Box<dyn RewardFunction>,
    /// Its weight in the sum.
    pub weight: f64,
}

/// The reward functions of a TOML file (see the module documentation). Names default to the
/// type, numbered when a type comes twice (`exact_match`, `exact_match_2`); `name` sets one.
pub fn read_rewards(path: &Path) -> Result<Vec<WeightedReward>> {
    let text = train_model::read_text_file(path, MAX_REWARD_FILE_BYTES).map_err(|e| {
        RunnerError::Reward {
            function: "(file)".into(),
            message: e.to_string(),
        }
    })?;
    let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
    parse_rewards(&text, path, base_dir)
}

/// [`read_rewards`] on `text`, which came from `origin`.
pub fn parse_rewards(text: &str, origin: &Path, base_dir: &Path) -> Result<Vec<WeightedReward>> {
    let file_error = |message: String| RunnerError::Reward {
        function: "(file)".into(),
        message: format!("{}: {message}", origin.display()),
    };
    let doc: toml::Table = toml::from_str(text).map_err(|e| file_error(e.to_string()))?;
    if let Some(other) = doc.keys().find(|k| k.as_str() != "reward") {
        return Err(file_error(format!(
            "unknown key `{other}` (the file holds [[reward]] tables)"
        )));
    }
    let tables = match doc.get("reward") {
        Some(toml::Value::Array(a)) => a.clone(),
        Some(_) => return Err(file_error("`reward` must be [[reward]] tables".into())),
        None => return Err(file_error("no [[reward]] table".into())),
    };
    if tables.len() > MAX_REWARD_FUNCTIONS {
        return Err(file_error(format!(
            "{} reward functions, over the limit of {MAX_REWARD_FUNCTIONS}",
            tables.len()
        )));
    }
    let mut out: Vec<WeightedReward> = Vec::with_capacity(tables.len());
    for (i, table) in tables.into_iter().enumerate() {
        let at = |message: String| file_error(format!("reward {}: {message}", i + 1));
        let toml::Value::Table(mut table) = table else {
            return Err(at("must be a table".into()));
        };
        let weight = match table.remove("weight") {
            None => 1.0,
            Some(toml::Value::Float(f)) => f,
            Some(toml::Value::Integer(n)) => n as f64,
            Some(other) => return Err(at(format!("`weight` must be a number, found {other}"))),
        };
        if !weight.is_finite() {
            return Err(at(format!("`weight` must be finite, found {weight}")));
        }
        let name = match table.remove("name") {
            None => None,
            Some(toml::Value::String(s)) if valid_name(&s) => Some(s),
            Some(other) => {
                return Err(at(format!(
                    "`name` must be a non-empty string of letters, digits, `_`, `-` or `.`, found {other}"
                )));
            }
        };
        let config: RewardConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| at(e.to_string()))?;
        let name = name.unwrap_or_else(|| {
            let base = config.type_name();
            let taken = |n: &str| out.iter().any(|r| r.function.name() == n);
            if !taken(base) {
                return base.to_string();
            }
            (2..)
                .map(|k| format!("{base}_{k}"))
                .find(|n| !taken(n))
                .unwrap_or_else(|| base.to_string())
        });
        if out.iter().any(|r| r.function.name() == name) {
            return Err(at(format!("the name `{name}` is used twice")));
        }
        let function = config
            .build(&name, base_dir)
            .map_err(|e| at(e.to_string()))?;
        out.push(WeightedReward { function, weight });
    }
    Ok(out)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use train_data::Role;

    fn inputs<'a>(
        prompt: &'a [Message],
        columns: &'a Map<String, Value>,
        completions: &'a [&'a str],
    ) -> Vec<RewardInput<'a>> {
        completions
            .iter()
            .map(|c| RewardInput {
                prompt,
                completion: c,
                completion_tokens: c.split_whitespace().count(),
                columns,
                location: None,
            })
            .collect()
    }

    fn one(toml: &str) -> Box<dyn RewardFunction> {
        let mut all = parse_rewards(toml, Path::new("r.toml"), Path::new(".")).unwrap();
        assert_eq!(all.len(), 1);
        all.remove(0).function
    }

    #[test]
    fn built_ins_score_as_documented() {
        let prompt = [Message::new(Role::User, "2+2?")];
        let mut columns = Map::new();
        columns.insert("answer".into(), Value::from(4));
        let completions = [
            "<think>add</think><answer> 4 </answer>",
            "<think></think>4",
            "4",
            "<answer>5</answer>",
        ];
        let x = inputs(&prompt, &columns, &completions);
        let exact = one(
            "[[reward]]\ntype = \"exact_match\"\ncolumn = \"answer\"\nextract = \"<answer>(.*?)</answer>\"",
        );
        assert_eq!(
            exact.score(&x).unwrap(),
            [Some(1.0), Some(0.0), Some(0.0), Some(0.0)]
        );
        let whole = one("[[reward]]\ntype = \"exact_match\"\ncolumn = \"answer\"");
        assert_eq!(
            whole.score(&x).unwrap(),
            [Some(0.0), Some(0.0), Some(1.0), Some(0.0)]
        );
        let think = one("[[reward]]\ntype = \"think_format\"");
        assert_eq!(
            think.score(&x).unwrap(),
            [Some(1.0), Some(0.0), Some(0.0), Some(0.0)]
        );
        let re = one("[[reward]]\ntype = \"regex\"\npattern = \"^<answer>\\\\d+</answer>$\"");
        assert_eq!(
            re.score(&x).unwrap(),
            [Some(0.0), Some(0.0), Some(0.0), Some(1.0)]
        );
        let col = one("[[reward]]\ntype = \"regex\"\ncolumn = \"answer\"");
        assert_eq!(
            col.score(&x).unwrap(),
            [Some(1.0), Some(1.0), Some(1.0), Some(0.0)]
        );
        let emoji = one("[[reward]]\ntype = \"stop_emoji\"");
        let y = inputs(&prompt, &columns, &["done 🛑🛑", "done 🛑", "🛑🛑 done"]);
        assert_eq!(emoji.score(&y).unwrap(), [Some(1.0), Some(0.0), Some(0.0)]);
    }

    #[test]
    fn soft_overlong_is_trls() {
        // TRL: L_max 20, L_cache 5: 0 up to 15 tokens, (15 − n) / 5 up to 20, −1 beyond.
        let f = one(
            "[[reward]]\ntype = \"soft_overlong\"\nmax_completion_len = 20\nsoft_punish_cache = 5",
        );
        let prompt = [Message::new(Role::User, "x")];
        let columns = Map::new();
        let words: Vec<String> = [10, 15, 16, 18, 20, 21]
            .iter()
            .map(|&n| vec!["w"; n].join(" "))
            .collect();
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        let got = f.score(&inputs(&prompt, &columns, &refs)).unwrap();
        assert_eq!(
            got,
            [
                Some(0.0),
                Some(0.0),
                Some(-0.2),
                Some(-0.6),
                Some(-1.0),
                Some(-1.0)
            ]
        );
    }

    #[test]
    fn file_errors_name_the_table() {
        let cases = [
            ("", "no [[reward]] table"),
            (
                "[[reward]]\ntype = \"exact_matc\"",
                "reward 1: unknown variant",
            ),
            (
                "[[reward]]\ntype = \"exact_match\"",
                "missing field `column`",
            ),
            (
                "[[reward]]\ntype = \"think_format\"\n[[reward]]\ntype = \"regex\"\npattern = \"(\"",
                "reward 2",
            ),
            ("[[reward]]\ntype = \"regex\"", "exactly one of"),
            (
                "[[reward]]\ntype = \"think_format\"\nweight = \"x\"",
                "`weight`",
            ),
            (
                "[[reward]]\ntype = \"think_format\"\ncolour = 1",
                "unknown field `colour`",
            ),
            (
                "[[reward]]\ntype = \"command\"\ncommand = []",
                "`command` is empty",
            ),
            (
                "[[reward]]\ntype = \"think_format\"\nname = \"a\"\n[[reward]]\ntype = \"regex\"\npattern = \"x\"\nname = \"a\"",
                "used twice",
            ),
            (
                "[[rewards]]\ntype = \"think_format\"",
                "unknown key `rewards`",
            ),
            (
                "[[reward]]\ntype = \"soft_overlong\"\nmax_completion_len = 4\nsoft_punish_cache = 5",
                "soft_punish_cache",
            ),
        ];
        for (text, want) in cases {
            let e = parse_rewards(text, Path::new("r.toml"), Path::new("."))
                .expect_err(text)
                .to_string();
            assert!(e.contains(want) && e.contains("r.toml"), "{text}: {e}");
        }
        let many = "[[reward]]\ntype = \"think_format\"\n".repeat(MAX_REWARD_FUNCTIONS + 1);
        assert!(parse_rewards(&many, Path::new("r.toml"), Path::new(".")).is_err());
    }

    #[test]
    fn names_default_to_the_type_and_are_numbered() {
        let all = parse_rewards(
            "[[reward]]\ntype = \"think_format\"\n[[reward]]\ntype = \"think_format\"\nweight = 0.5\n\
             [[reward]]\ntype = \"regex\"\npattern = \"x\"\nname = \"has_x\"",
            Path::new("r.toml"),
            Path::new("."),
        )
        .unwrap();
        let names: Vec<&str> = all.iter().map(|r| r.function.name()).collect();
        assert_eq!(names, ["think_format", "think_format_2", "has_x"]);
        assert_eq!(all[1].weight, 0.5);
    }

    #[test]
    fn a_missing_column_names_the_row() {
        let f = one("[[reward]]\ntype = \"exact_match\"\ncolumn = \"solution\"");
        let prompt = [Message::new(Role::User, "x")];
        let mut columns = Map::new();
        columns.insert("answer".into(), Value::from("4"));
        let location = RowLocation {
            path: "p.jsonl".into(),
            line: Some(7),
            row: 6,
        };
        let input = RewardInput {
            prompt: &prompt,
            completion: "4",
            completion_tokens: 1,
            columns: &columns,
            location: Some(&location),
        };
        let e = f.score(&[input]).unwrap_err();
        assert!(
            e.contains("p.jsonl")
                && e.contains('7')
                && e.contains("`solution`")
                && e.contains("`answer`"),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn external_commands() {
        let dir = tempfile::tempdir().unwrap();
        let prompt = [Message::new(Role::User, "x")];
        let mut columns = Map::new();
        columns.insert("answer".into(), Value::from("yes"));
        let x = inputs(&prompt, &columns, &["yes", "no", "yes sir"]);
        let script = |body: &str| {
            let p = dir.path().join("score.sh");
            std::fs::write(&p, body).unwrap();
            format!(
                "[[reward]]\ntype = \"command\"\ncommand = [\"sh\", \"{}\"]\ntimeout_seconds = 2",
                p.display()
            )
        };
        // Scores the completion equal to the column; reads the JSON lines with sed.
        let good = script(
            "while read -r line; do case \"$line\" in *'\"completion\":\"yes\"'*) echo 1;; *) echo 0.25;; esac; done\n",
        );
        let f = parse_rewards(&good, Path::new("r.toml"), dir.path())
            .unwrap()
            .remove(0)
            .function;
        assert_eq!(f.score(&x).unwrap(), [Some(1.0), Some(0.25), Some(0.25)]);
        for (body, want) in [
            ("cat > /dev/null; echo 1\n", "printed 1 scores for 3"),
            ("cat > /dev/null; echo oops >&2; exit 3\n", "oops"),
            ("cat > /dev/null; printf '1\\nx\\n2\\n'\n", "line 2"),
            ("cat > /dev/null; printf '1\\ninf\\n2\\n'\n", "line 2"),
            ("sleep 30\n", "timeout_seconds"),
        ] {
            let f = parse_rewards(&script(body), Path::new("r.toml"), dir.path())
                .unwrap()
                .remove(0)
                .function;
            let started = Instant::now();
            let e = f.score(&x).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{body}: not bounded"
            );
        }
        let nulls = script("cat > /dev/null; printf 'null\\n0.5\\nNone\\n'\n");
        let f = parse_rewards(&nulls, Path::new("r.toml"), dir.path())
            .unwrap()
            .remove(0)
            .function;
        assert_eq!(f.score(&x).unwrap(), [None, Some(0.5), None]);
        let missing = "[[reward]]\ntype = \"command\"\ncommand = [\"/nonexistent/scorer\"]";
        let f = parse_rewards(missing, Path::new("r.toml"), dir.path())
            .unwrap()
            .remove(0)
            .function;
        assert!(f.score(&x).unwrap_err().contains("cannot start"));
    }
}
