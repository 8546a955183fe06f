//! Data checks: the structure of each conversation, and the dataset-level warnings of the
//! original trainer (duplicates, rows over the maximum length, answer leakage).

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::conversation::{Conversation, Role};
use crate::error::{Problem, ProblemKind, Result, RowLocation, Severity};
use crate::load::{ErrorPolicy, LoadOptions, load_conversations};
use crate::tokenize::ChatTokenizer;

fn location(c: &Conversation) -> RowLocation {
    c.location.clone().unwrap_or(RowLocation {
        path: "<memory>".into(),
        line: None,
        row: 0,
    })
}

/// Structural problems of one conversation: empty content, roles out of order, no assistant
/// turn. Empty when the conversation can be trained on.
pub fn structure_problems(c: &Conversation) -> Vec<Problem> {
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
    for (i, m) in c.messages.iter().enumerate() {
        if m.content.trim().is_empty()
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
    // Optional system first, then user / assistant alternating, starting with user.
    let start = usize::from(c.messages[0].role == Role::System);
    for (i, m) in c.messages.iter().enumerate().skip(start) {
        let expected = if (i - start) % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if m.role != expected {
            let msg = if m.role == Role::System {
                "a system message may only come first".to_string()
            } else {
                format!(
                    "expected a {} turn, found {} (turns must alternate user / assistant)",
                    expected.as_str(),
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
pub fn leakage_problems(c: &Conversation) -> Vec<Problem> {
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
    /// Every problem, in file order.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when no row has an error.
    pub fn is_ok(&self) -> bool {
        self.errors == 0
    }
}

/// Checks a data file: every row's structure, duplicates, answer leakage and, given a
/// tokenizer, rows over `max_length` tokens (with the number of tokens lost).
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
    let mut report = CheckReport {
        path: path.display().to_string(),
        rows: loaded.rows_read,
        ..CheckReport::default()
    };
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
                Ok(enc) if enc.input_ids.len() > max_length => {
                    let lost = enc.input_ids.len() - max_length;
                    report.too_long += 1;
                    report.tokens_lost += lost;
                    problems.push(Problem::new(
                        loc,
                        "",
                        ProblemKind::TooLong,
                        format!("{} tokens, over the maximum of {max_length}: {lost} tokens would be lost", enc.input_ids.len()),
                    ));
                }
                Ok(_) => {}
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
    report.errors = problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .count();
    report.warnings = problems.len() - report.errors;
    report.problems = problems;
    Ok(report)
}
