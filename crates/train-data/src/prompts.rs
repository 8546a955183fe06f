//! Prompts for online training (GRPO), in TRL's prompt-only format: `{"prompt": [messages]}`
//! (conversational) or `{"prompt": "…"}` (one user turn), plus any other columns, which are
//! kept for the reward functions (an `answer` to match, a `solution`, …).

use std::path::Path;

use serde_json::{Map, Value};

use crate::conversation::{Conversation, Message, Role};
use crate::error::{Problem, ProblemKind, Result, RowLocation};
use crate::load::{LoadOptions, RowSchema, kind_of, load_rows, message_list};

/// One prompt and the row's other columns.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    /// The conversation so far; its last message is a user turn, which the model answers.
    pub prompt: Vec<Message>,
    /// Every column of the row but `prompt`, as read.
    pub columns: Map<String, Value>,
    /// Where the row came from.
    pub location: Option<RowLocation>,
}

/// The prompts of a file and the problems met on the way.
#[derive(Debug, Clone, Default)]
pub struct LoadedPrompts {
    /// Valid prompts, in file order.
    pub prompts: Vec<PromptRow>,
    /// Problems of the rows that were dropped (only with [`ErrorPolicy::Skip`](crate::ErrorPolicy::Skip)).
    pub problems: Vec<Problem>,
    /// Rows read (valid or not, blank lines excluded).
    pub rows_read: usize,
}

/// Loads the prompts of `path` (JSONL, a JSON array or Parquet, as for conversations;
/// `options.schema` is not used: every row is a prompt row).
pub fn load_prompts(path: &Path, options: &LoadOptions) -> Result<LoadedPrompts> {
    let (prompts, problems, rows_read) = load_rows(path, options, normalize_prompt)?;
    Ok(LoadedPrompts {
        prompts,
        problems,
        rows_read,
    })
}

/// One prompt row as a checked [`PromptRow`], or the row's problems.
pub(crate) fn normalize_prompt(
    value: &Value,
    location: RowLocation,
    _schema: RowSchema,
) -> std::result::Result<PromptRow, Vec<Problem>> {
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
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
            return Err(problem(
                "prompt",
                ProblemKind::MissingMessages,
                format!(
                    "missing `prompt` (a prompt row is {{\"prompt\": [messages]}} or \
                     {{\"prompt\": \"text\"}}; this row has {})",
                    if keys.is_empty() {
                        "no key".to_string()
                    } else {
                        format!("`{}`", keys.join("`, `"))
                    }
                ),
            ));
        }
        Some(Value::String(s)) => vec![Message::new(Role::User, s.clone())],
        Some(Value::Array(_)) => message_list(obj, "prompt", &location)?,
        Some(other) => {
            return Err(problem(
                "prompt",
                ProblemKind::WrongType,
                format!(
                    "must be a string or a list of messages, found {}",
                    kind_of(other)
                ),
            ));
        }
    };
    let conversation = Conversation {
        location: Some(location.clone()),
        ..Conversation::new(prompt)
    };
    let mut problems: Vec<Problem> = crate::validate::structure_problems(&conversation)
        .into_iter()
        .filter(|p| p.kind != ProblemKind::NoAssistantTurn)
        .map(|mut p| {
            p.field = p.field.replacen("messages", "prompt", 1);
            p
        })
        .collect();
    if problems.is_empty()
        && let Some(last) = conversation.messages.last()
        && last.role != Role::User
    {
        problems.push(Problem::new(
            location.clone(),
            format!("prompt[{}].role", conversation.messages.len() - 1),
            ProblemKind::WrongTurnOrder,
            format!(
                "a prompt ends with the user turn the model answers, found {}",
                last.role.as_str()
            ),
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut columns = obj.clone();
    columns.remove("prompt");
    Ok(PromptRow {
        prompt: conversation.messages,
        columns,
        location: Some(location),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(json: &str) -> std::result::Result<PromptRow, Vec<Problem>> {
        let value: Value = serde_json::from_str(json).unwrap();
        let location = RowLocation {
            path: "prompts.jsonl".into(),
            line: Some(4),
            row: 3,
        };
        normalize_prompt(&value, location, RowSchema::Auto)
    }

    #[test]
    fn both_forms_and_the_other_columns() {
        let p = row(r#"{"prompt": "2+2?", "answer": "4", "level": 1}"#).unwrap();
        assert_eq!(p.prompt, [Message::new(Role::User, "2+2?")]);
        assert_eq!(p.columns["answer"], "4");
        assert_eq!(p.columns["level"], 1);
        assert!(!p.columns.contains_key("prompt"));
        let p = row(
            r#"{"prompt": [{"role": "system", "content": "Think first."}, {"role": "user", "content": "2+2?"}]}"#,
        )
        .unwrap();
        assert_eq!(p.prompt.len(), 2);
        assert!(p.columns.is_empty());
    }

    #[test]
    fn bad_rows_name_the_field() {
        let cases = [
            (r#"[1]"#, ""),
            (r#"{"question": "x", "answer": "y"}"#, "prompt"),
            (r#"{"prompt": 3}"#, "prompt"),
            (r#"{"prompt": []}"#, "prompt"),
            (
                r#"{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
                "prompt[1].role",
            ),
            (
                r#"{"prompt": [{"role": "assistant", "content": "y"}]}"#,
                "prompt[0].role",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": " "}]}"#,
                "prompt[0].content",
            ),
            (
                r#"{"prompt": [{"role": "wizard", "content": "x"}]}"#,
                "prompt[0].role",
            ),
        ];
        for (json, field) in cases {
            let problems = row(json).expect_err(json);
            assert_eq!(problems[0].field, field, "{json}: {problems:?}");
            assert_eq!(problems[0].location.line, Some(4));
        }
        let missing = row(r#"{"question": "x", "answer": "y"}"#).unwrap_err();
        assert!(
            missing[0].message.contains("`question`, `answer`"),
            "{}",
            missing[0].message
        );
    }
}
