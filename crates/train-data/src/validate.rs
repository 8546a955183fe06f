//! Data checks: the structure of each conversation, and the dataset-level warnings of the
//! original trainer (duplicates, rows over the maximum length, answer leakage).

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::batch::IGNORE_INDEX;
use crate::conversation::{Conversation, Message, Role};
use crate::error::{DataError, Problem, ProblemKind, Result, RowLocation, Severity};
use crate::load::{ErrorPolicy, LoadOptions, load_conversations};
use crate::tokenize::ChatTokenizer;

/// Most messages in one row. Locating the label tokens renders the conversation once per
/// assistant turn (a template's rendering of a prefix is the only way to know where a turn
/// starts), so the cost of a row grows with the square of its turns: 3,000 turn pairs took
/// minutes. 1,024 messages is far beyond real conversations and renders in well under a second.
pub const MAX_MESSAGES_PER_ROW: usize = 1024;
/// Largest message field (`content`, `reasoning_content`), in bytes.
pub const MAX_FIELD_BYTES: usize = 16 << 20;
/// Longest run of text without whitespace in a field, in bytes. Pre-tokenizers split at
/// whitespace at the latest, and the BPE merge loop is superlinear in the length of what is
/// left: a 48 MB word did not finish. Longer runs (base64 blobs, minified files) are not text a
/// model learns from.
pub const MAX_WORD_BYTES: usize = 1 << 20;

/// The first size limit `c` is over: the number of messages, a field's bytes, a run without
/// whitespace. Checked when rows are loaded and again before tokenizing (transforms may have
/// changed the messages).
pub(crate) fn size_problem(c: &Conversation) -> Option<Problem> {
    let problem = |field: String, message: String| {
        Some(Problem::new(
            location(c),
            field,
            ProblemKind::TooLarge,
            message,
        ))
    };
    if c.messages.len() > MAX_MESSAGES_PER_ROW {
        return problem(
            "messages".into(),
            format!(
                "{} messages, over the limit of {MAX_MESSAGES_PER_ROW} per row",
                c.messages.len()
            ),
        );
    }
    for (i, m) in c.messages.iter().enumerate() {
        let fields = [
            ("content", Some(&m.content)),
            ("reasoning_content", m.reasoning_content.as_ref()),
        ];
        for (name, text) in fields {
            let Some(text) = text else { continue };
            if text.len() > MAX_FIELD_BYTES {
                return problem(
                    format!("messages[{i}].{name}"),
                    format!(
                        "{} bytes, over the limit of {MAX_FIELD_BYTES} bytes per field",
                        text.len()
                    ),
                );
            }
            let (at, run) = longest_word(text);
            if run > MAX_WORD_BYTES {
                return problem(
                    format!("messages[{i}].{name}"),
                    format!(
                        "a run of {run} bytes without whitespace (from byte {at}), over the limit of {MAX_WORD_BYTES} bytes"
                    ),
                );
            }
        }
    }
    None
}

/// Start and length in bytes of the longest run of non-whitespace characters of `text`.
fn longest_word(text: &str) -> (usize, usize) {
    let (mut best, mut start) = ((0, 0), None);
    for (i, ch) in text.char_indices() {
        if ch.is_whitespace() {
            if let Some(s) = start.take()
                && i - s > best.1
            {
                best = (s, i - s);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start
        && text.len() - s > best.1
    {
        best = (s, text.len() - s);
    }
    best
}

fn location(c: &Conversation) -> RowLocation {
    c.location.clone().unwrap_or(RowLocation {
        path: "<memory>".into(),
        line: None,
        row: 0,
    })
}

/// Structural problems of one conversation: empty content, roles out of order, no assistant
/// turn. Empty when the conversation can be trained on.
pub(crate) fn structure_problems(c: &Conversation) -> Vec<Problem> {
    let loc = location(c);
    let mut out = Vec::new();
    if c.messages.is_empty() {
        out.push(Problem::new(
            loc,
            "messages",
            ProblemKind::EmptyMessages,
            "the list is empty",
        ));
        return out;
    }
    if let Some(p) = size_problem(c) {
        // Nothing more is looked at in a row this large.
        out.push(p);
        return out;
    }
    if c.plain {
        // A `text` row or a plain prompt/completion: the trained text must not be empty (an
        // empty prompt is allowed).
        if let Some(last) = c.messages.last()
            && last.content.trim().is_empty()
        {
            let field = if c.completion_from.is_some() {
                "completion"
            } else {
                "text"
            };
            out.push(Problem::new(
                loc,
                field,
                ProblemKind::EmptyContent,
                format!("empty `{field}`: nothing to train on"),
            ));
        }
        return out;
    }
    for (i, m) in c.messages.iter().enumerate() {
        if m.content.trim().is_empty()
            && m.tool_calls.is_none()
            && m.reasoning_content
                .as_deref()
                .is_none_or(|r| r.trim().is_empty())
        {
            out.push(Problem::new(
                loc.clone(),
                format!("messages[{i}].content"),
                ProblemKind::EmptyContent,
                format!("empty {} message", m.role.as_str()),
            ));
        }
    }
    // Optional system first, then user / assistant alternating, starting with user; an
    // assistant turn that calls tools is followed by the tools' answers, then the assistant.
    let start = usize::from(c.messages[0].role == Role::System);
    let mut previous: Option<&Message> = None;
    for (i, m) in c.messages.iter().enumerate().skip(start) {
        let allowed: &[Role] = match previous {
            None => &[Role::User],
            Some(p) if p.role == Role::User => &[Role::Assistant],
            Some(p) if p.role == Role::Assistant && p.tool_calls.is_some() => &[Role::Tool],
            Some(p) if p.role == Role::Assistant => &[Role::User],
            Some(_) => &[Role::Tool, Role::Assistant],
        };
        previous = Some(m);
        if !allowed.contains(&m.role) {
            let expected = allowed
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(" or ");
            let msg = if m.role == Role::System {
                "a system message may only come first".to_string()
            } else if m.role == Role::Tool {
                format!(
                    "expected a {expected} turn, found tool (a tool message answers an assistant \
                     turn's `tool_calls`)"
                )
            } else {
                format!(
                    "expected a {expected} turn, found {} (turns must alternate user / assistant)",
                    m.role.as_str()
                )
            };
            out.push(Problem::new(
                loc.clone(),
                format!("messages[{i}].role"),
                ProblemKind::WrongTurnOrder,
                msg,
            ));
            break;
        }
    }
    if !c.messages.iter().any(|m| m.role == Role::Assistant) {
        out.push(Problem::new(
            loc,
            "messages",
            ProblemKind::NoAssistantTurn,
            "no assistant turn: nothing to train on",
        ));
    }
    out
}

fn normalize(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Answer leakage: an assistant answer (at least 3 words and 12 characters) that already
/// appears verbatim (ignoring case and spacing) in an earlier system or user message.
pub(crate) fn leakage_problems(c: &Conversation) -> Vec<Problem> {
    let loc = location(c);
    let mut prompt = String::new();
    let mut out = Vec::new();
    for (i, m) in c.messages.iter().enumerate() {
        let text = normalize(&m.content);
        if m.role == Role::Assistant {
            if text.len() >= 12 && text.split(' ').count() >= 3 && prompt.contains(&text) {
                out.push(Problem::new(
                    loc.clone(),
                    format!("messages[{i}].content"),
                    ProblemKind::AnswerLeakage,
                    "the assistant's answer already appears in the prompt",
                ));
            }
        } else {
            prompt.push_str(&text);
            prompt.push('\n');
        }
    }
    out
}

/// What `train data check` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// The data file.
    pub path: String,
    /// Rows read.
    pub rows: usize,
    /// Rows without errors.
    pub valid_rows: usize,
    /// Rows with at least one error.
    pub invalid_rows: usize,
    /// Number of problems of severity error.
    pub errors: usize,
    /// Number of problems of severity warning.
    pub warnings: usize,
    /// Rows repeating an earlier row.
    pub duplicates: usize,
    /// Rows whose answer is already in the prompt.
    pub leakage: usize,
    /// Rows over the maximum length (only with a tokenizer).
    pub too_long: usize,
    /// Tokens that truncation would drop (only with a tokenizer).
    pub tokens_lost: usize,
    /// Valid rows with something to train: (with a tokenizer) at least one label token before
    /// truncation.
    pub trainable_rows: usize,
    /// Every problem, in file order.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when no row has an error and at least one row would be trained on.
    pub fn is_ok(&self) -> bool {
        self.errors == 0 && self.trainable_rows > 0
    }
}

/// Checks a data file: every row's structure, duplicates, answer leakage and, given a
/// tokenizer, rows over `max_length` tokens (with the number of tokens lost) and rows left
/// without label tokens.
///
/// A file without any row is an error ([`DataError::File`]): there is nothing to train on. A
/// file whose rows would all be dropped gives a report that is not [`CheckReport::is_ok`].
pub fn check_file(
    path: &Path,
    options: &LoadOptions,
    tokenizer: Option<(&ChatTokenizer, usize)>,
) -> Result<CheckReport> {
    let loaded = load_conversations(
        path,
        &LoadOptions {
            policy: ErrorPolicy::Skip,
            ..*options
        },
    )?;
    if loaded.rows_read == 0 {
        return Err(DataError::file(
            path,
            "the dataset is empty: no rows to train on",
        ));
    }
    let mut report = CheckReport {
        path: path.display().to_string(),
        rows: loaded.rows_read,
        ..CheckReport::default()
    };
    let mut untrainable = 0;
    let mut problems = loaded.problems;
    let mut seen: HashMap<[u8; 32], RowLocation> = HashMap::new();
    for c in &loaded.conversations {
        let loc = location(c);
        if let Some(first) = seen.get(&c.content_hash()) {
            problems.push(Problem::new(
                loc.clone(),
                "",
                ProblemKind::Duplicate,
                format!(
                    "same conversation as {}",
                    first
                        .line
                        .map_or_else(|| format!("row {}", first.row), |l| format!("line {l}"))
                ),
            ));
            report.duplicates += 1;
        } else {
            seen.insert(c.content_hash(), loc.clone());
        }
        let leaks = leakage_problems(c);
        report.leakage += usize::from(!leaks.is_empty());
        problems.extend(leaks);
        if let Some((tok, max_length)) = tokenizer {
            match tok.encode(c) {
                Ok(enc) => {
                    let n = enc.input_ids.len();
                    if n > max_length {
                        let lost = n - max_length;
                        report.too_long += 1;
                        report.tokens_lost += lost;
                        problems.push(Problem::new(
                            loc.clone(),
                            "",
                            ProblemKind::TooLong,
                            format!("{n} tokens, over the maximum of {max_length}: {lost} tokens would be lost"),
                        ));
                    }
                    // Position 0 is never trained (as in `Example::label_tokens`).
                    let trained = |upto: usize| {
                        enc.labels
                            .iter()
                            .take(upto)
                            .skip(1)
                            .filter(|&&l| l != IGNORE_INDEX)
                            .count()
                    };
                    if trained(n) == 0 {
                        untrainable += 1;
                        problems.push(Problem::new(
                            loc,
                            "",
                            ProblemKind::AllLabelsTruncated,
                            format!(
                                "no label tokens: the rendering has no assistant tokens to train with label mode {:?}",
                                tok.label_mode()
                            ),
                        ));
                    } else if trained(max_length) == 0 {
                        // A warning, like the length itself: a larger max_length trains it.
                        problems.push(Problem::new(
                            loc,
                            "",
                            ProblemKind::AllLabelsTruncated,
                            format!(
                                "truncation to max_length {max_length} would remove every label token of this {n}-token row"
                            ),
                        ));
                    }
                }
                Err(e) => {
                    problems.push(Problem::new(loc, "", ProblemKind::Template, e.to_string()));
                }
            }
        }
    }
    problems.sort_by_key(|p| p.location.row);
    let mut bad_rows: Vec<usize> = problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| p.location.row)
        .collect();
    bad_rows.dedup();
    report.invalid_rows = bad_rows.len();
    report.valid_rows = report.rows - report.invalid_rows;
    report.trainable_rows = report.valid_rows.saturating_sub(untrainable);
    report.errors = problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .count();
    report.warnings = problems.len() - report.errors;
    report.problems = problems;
    Ok(report)
}
