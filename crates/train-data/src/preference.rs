//! Preference pairs for DPO-family training, in TRL's preference format: a prompt and two
//! completions, the chosen one preferred over the rejected one.
//!
//! Every form TRL accepts for a row:
//! - conversational, explicit prompt: `{"prompt": [messages], "chosen": [messages],
//!   "rejected": [messages]}`;
//! - conversational, implicit prompt: `{"chosen": [conversation], "rejected": [conversation]}`,
//!   the messages the two share from the start being the prompt;
//! - plain text: `{"prompt": "…", "chosen": "…", "rejected": "…"}`, one user turn and one
//!   assistant turn.
//!
//! A pair is tokenized as two whole conversations (prompt + chosen, prompt + rejected), each
//! rendered by the chat template once, so the prompt's tokens are those of the rendering (no
//! second BOS); the completion tokens are the final assistant turn, by the SFT masking rule
//! ([`LabelMode::LastAssistant`]).

use std::path::Path;

use serde_json::Value;

use crate::conversation::{Conversation, Message, Role};
use crate::error::{Problem, ProblemKind, Result, RowLocation};
use crate::load::{LoadOptions, RowSchema, kind_of, load_rows, message_list};
use crate::tokenize::{ChatTokenizer, Encoded, LabelMode};

/// One preference pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    /// The prompt: every message before the completions.
    pub prompt: Vec<Message>,
    /// The preferred completion (its last message is an assistant turn).
    pub chosen: Vec<Message>,
    /// The other completion (its last message is an assistant turn).
    pub rejected: Vec<Message>,
    /// Where the row came from.
    pub location: Option<RowLocation>,
}

impl PreferencePair {
    /// The prompt followed by the chosen completion.
    pub fn chosen_conversation(&self) -> Conversation {
        self.conversation(&self.chosen)
    }

    /// The prompt followed by the rejected completion.
    pub fn rejected_conversation(&self) -> Conversation {
        self.conversation(&self.rejected)
    }

    fn conversation(&self, completion: &[Message]) -> Conversation {
        let mut messages = Vec::with_capacity(self.prompt.len() + completion.len());
        messages.extend(self.prompt.iter().cloned());
        messages.extend(completion.iter().cloned());
        Conversation {
            location: self.location.clone(),
            ..Conversation::new(messages)
        }
    }
}

/// The pairs of a file and the problems met on the way.
#[derive(Debug, Clone, Default)]
pub struct LoadedPairs {
    /// Valid pairs, in file order.
    pub pairs: Vec<PreferencePair>,
    /// Problems of the rows that were dropped (only with [`ErrorPolicy::Skip`](crate::ErrorPolicy::Skip)).
    pub problems: Vec<Problem>,
    /// Rows read (valid or not, blank lines excluded).
    pub rows_read: usize,
}

/// Loads the preference pairs of `path` (JSONL, a JSON array or Parquet, as for
/// conversations; `options.schema` is not used: every row is a preference row).
pub fn load_preferences(path: &Path, options: &LoadOptions) -> Result<LoadedPairs> {
    let (pairs, problems, rows_read) = load_rows(path, options, normalize_pair)?;
    Ok(LoadedPairs {
        pairs,
        problems,
        rows_read,
    })
}

/// A side of a row: plain text or a list of messages.
enum Side {
    Text(String),
    Messages(Vec<Message>),
}

/// One preference row (any of TRL's forms) as a checked pair, or the row's problems.
pub(crate) fn normalize_pair(
    value: &Value,
    location: RowLocation,
    _schema: RowSchema,
) -> std::result::Result<PreferencePair, Vec<Problem>> {
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
    let side = |key: &str| -> std::result::Result<Option<Side>, Vec<Problem>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(Side::Text(s.clone()))),
            Some(Value::Array(_)) => Ok(Some(Side::Messages(message_list(obj, key, &location)?))),
            Some(other) => Err(problem(
                key,
                ProblemKind::WrongType,
                format!(
                    "must be a string or a list of messages, found {}",
                    kind_of(other)
                ),
            )),
        }
    };
    let required = |key: &str| -> std::result::Result<Side, Vec<Problem>> {
        side(key)?.ok_or_else(|| {
            problem(
                key,
                ProblemKind::MissingMessages,
                format!(
                    "missing `{key}` (a preference row has `chosen` and `rejected`, and a \
                     `prompt` unless they are whole conversations)"
                ),
            )
        })
    };
    let prompt = side("prompt")?;
    let chosen = required("chosen")?;
    let rejected = required("rejected")?;
    let (prompt, chosen, rejected) = match (prompt, chosen, rejected) {
        (Some(Side::Text(p)), Side::Text(c), Side::Text(r)) => (
            vec![Message::new(Role::User, p)],
            vec![Message::new(Role::Assistant, c)],
            vec![Message::new(Role::Assistant, r)],
        ),
        (Some(Side::Messages(p)), Side::Messages(c), Side::Messages(r)) => (p, c, r),
        (None, Side::Messages(c), Side::Messages(r)) => implicit_prompt(c, r, &location)?,
        (None, Side::Text(_), Side::Text(_)) => {
            return Err(problem(
                "prompt",
                ProblemKind::MissingMessages,
                "missing: plain-text `chosen` and `rejected` need a `prompt`".into(),
            ));
        }
        _ => {
            return Err(problem(
                "chosen",
                ProblemKind::WrongType,
                "`prompt`, `chosen` and `rejected` must be all plain text or all lists of \
                 messages"
                    .into(),
            ));
        }
    };
    let pair = PreferencePair {
        prompt,
        chosen,
        rejected,
        location: Some(location),
    };
    let problems = pair_problems(&pair);
    if problems.is_empty() {
        Ok(pair)
    } else {
        Err(problems)
    }
}

/// A pair's prompt, chosen and rejected messages.
type Split = (Vec<Message>, Vec<Message>, Vec<Message>);

/// TRL's implicit prompt: the messages `chosen` and `rejected` share from the start.
fn implicit_prompt(
    chosen: Vec<Message>,
    rejected: Vec<Message>,
    location: &RowLocation,
) -> std::result::Result<Split, Vec<Problem>> {
    let shared = chosen
        .iter()
        .zip(&rejected)
        .take_while(|(c, r)| c == r)
        .count();
    let problem = |msg: &str| {
        vec![Problem::new(
            location.clone(),
            "chosen",
            ProblemKind::EmptyMessages,
            msg.to_string(),
        )]
    };
    if shared == 0 {
        return Err(problem(
            "`chosen` and `rejected` share no leading message, so there is no prompt (give \
             `prompt` explicitly)",
        ));
    }
    if shared == chosen.len() || shared == rejected.len() {
        return Err(problem(
            "after the messages `chosen` and `rejected` share, one of them has nothing left \
             (identical conversations, or one a prefix of the other)",
        ));
    }
    let mut chosen = chosen;
    let mut rejected = rejected;
    let prompt: Vec<Message> = chosen.drain(..shared).collect();
    rejected.drain(..shared);
    Ok((prompt, chosen, rejected))
}

/// Problems of a pair: each whole conversation (prompt + completion) must be one the SFT
/// loader accepts, and each completion must end with an assistant turn. Fields are named
/// `prompt[i]`, `chosen[i]`, `rejected[i]`.
fn pair_problems(pair: &PreferencePair) -> Vec<Problem> {
    let Some(location) = &pair.location else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if pair.prompt.is_empty() {
        out.push(Problem::new(
            location.clone(),
            "prompt",
            ProblemKind::EmptyMessages,
            "the prompt is empty",
        ));
        return out;
    }
    for (name, completion, conversation) in [
        ("chosen", &pair.chosen, pair.chosen_conversation()),
        ("rejected", &pair.rejected, pair.rejected_conversation()),
    ] {
        if completion.last().is_none_or(|m| m.role != Role::Assistant) {
            out.push(Problem::new(
                location.clone(),
                name,
                ProblemKind::NoAssistantTurn,
                format!("`{name}` must end with an assistant message"),
            ));
            continue;
        }
        for mut p in crate::validate::structure_problems(&conversation) {
            p.field = rename_field(&p.field, pair.prompt.len(), name);
            if !out.iter().any(|q: &Problem| q.field == p.field) {
                out.push(p);
            }
        }
    }
    out
}

/// `messages[i]…` of a whole conversation as `prompt[i]…` or `<completion>[i - prompt]…`.
fn rename_field(field: &str, prompt_len: usize, completion: &str) -> String {
    let Some(rest) = field.strip_prefix("messages[") else {
        return field.to_string();
    };
    let Some((index, tail)) = rest.split_once(']') else {
        return field.to_string();
    };
    match index.parse::<usize>() {
        Ok(i) if i < prompt_len => format!("prompt[{i}]{tail}"),
        Ok(i) => format!("{completion}[{}]{tail}", i - prompt_len),
        Err(_) => field.to_string(),
    }
}

/// A tokenized preference pair: the two whole conversations, labels on each one's final
/// assistant turn (the completion whose log-probability DPO compares).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    /// Prompt + chosen completion.
    pub chosen: Encoded,
    /// Prompt + rejected completion.
    pub rejected: Encoded,
}

impl ChatTokenizer {
    /// Tokenizes `pair`: two whole conversations, labels on each one's final assistant turn
    /// (see [`EncodedPair`]).
    pub fn encode_pair(&self, pair: &PreferencePair) -> Result<EncodedPair> {
        let chosen =
            self.encode_with_mode(&pair.chosen_conversation(), LabelMode::LastAssistant)?;
        let rejected =
            self.encode_with_mode(&pair.rejected_conversation(), LabelMode::LastAssistant)?;
        Ok(EncodedPair { chosen, rejected })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(json: &str) -> std::result::Result<PreferencePair, Vec<Problem>> {
        let value: Value = serde_json::from_str(json).unwrap();
        let location = RowLocation {
            path: "prefs.jsonl".into(),
            line: Some(3),
            row: 2,
        };
        normalize_pair(&value, location, RowSchema::Auto)
    }

    fn m(role: Role, content: &str) -> Message {
        Message::new(role, content)
    }

    #[test]
    fn plain_text_is_one_user_and_one_assistant_turn() {
        let p = row(r#"{"prompt": "2+2?", "chosen": "4", "rejected": "5"}"#).unwrap();
        assert_eq!(p.prompt, [m(Role::User, "2+2?")]);
        assert_eq!(p.chosen, [m(Role::Assistant, "4")]);
        assert_eq!(p.rejected, [m(Role::Assistant, "5")]);
    }

    #[test]
    fn explicit_conversational_prompt() {
        let p = row(
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "Go away."}]}"#,
        )
        .unwrap();
        assert_eq!(p.prompt.len(), 2);
        assert_eq!(p.chosen_conversation().messages.len(), 3);
        assert_eq!(p.rejected[0].content, "Go away.");
    }

    #[test]
    fn implicit_prompt_is_the_shared_start() {
        let p = row(
            r#"{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                           {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Ann."}],
                "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "No."}]}"#,
        )
        .unwrap();
        assert_eq!(p.prompt.len(), 3);
        assert_eq!(p.chosen, [m(Role::Assistant, "Ann.")]);
        assert_eq!(p.rejected, [m(Role::Assistant, "No.")]);
    }

    #[test]
    fn bad_rows_name_the_field() {
        let cases = [
            (r#"[1]"#, ""),
            (r#"{"prompt": "x", "chosen": "y"}"#, "rejected"),
            (r#"{"chosen": "y", "rejected": "z"}"#, "prompt"),
            (r#"{"prompt": "x", "chosen": 3, "rejected": "z"}"#, "chosen"),
            (
                r#"{"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "z"}"#,
                "chosen",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
                   "rejected": [{"role": "user", "content": "z"}]}"#,
                "rejected",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": ""}],
                   "rejected": [{"role": "assistant", "content": "z"}]}"#,
                "chosen[0].content",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "wizard", "content": "a"}],
                   "rejected": [{"role": "assistant", "content": "z"}]}"#,
                "chosen[0].role",
            ),
            (
                r#"{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                   "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
                "chosen",
            ),
            (
                r#"{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                   "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "b"}]}"#,
                "chosen",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
                   "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "z"}]}"#,
                "prompt[1].role",
            ),
        ];
        for (json, field) in cases {
            let problems = row(json).expect_err(json);
            assert_eq!(problems[0].field, field, "{json}: {problems:?}");
            assert_eq!(problems[0].location.line, Some(3));
        }
    }
}
