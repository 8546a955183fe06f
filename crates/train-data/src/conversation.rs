//! Conversations: the normalized form every input format is turned into.

use serde::{Deserialize, Serialize};

use crate::error::RowLocation;

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The user.
    User,
    /// The model: its turns are what is trained.
    Assistant,
    /// A tool's answer to an assistant's tool call (context, never trained).
    Tool,
}

impl Role {
    /// Parses `system` / `user` / `assistant` / `tool`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            "tool" => Some(Self::Tool),
            _ => None,
        }
    }

    /// The name chat templates expect.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
    /// Separate reasoning of an assistant turn (Qwen3's `reasoning_content`), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The tool calls of an assistant turn, as the row gave them (JSON text of a list), handed
    /// to the chat template as `message.tool_calls` (a list, as `apply_chat_template` gets it).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "json_text")]
    pub tool_calls: Option<String>,
    /// The call a tool message answers (`tool_call_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The tool of a tool message (`name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A JSON value kept as its text (so that messages stay `Eq` and `Hash`), serialized as the
/// value itself.
mod json_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(text) => serde_json::from_str::<serde_json::Value>(text)
                .map_err(serde::ser::Error::custom)?
                .serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<serde_json::Value>::deserialize(d)?.map(|v| v.to_string()))
    }
}

impl Message {
    /// A message without separate reasoning.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            reasoning_content: None,
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// A conversation and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The messages, in order.
    pub messages: Vec<Message>,
    /// The tools the conversation may call (JSON text of the row's `tools` list), handed to
    /// the chat template as `tools`, as `apply_chat_template(tools=...)` does (serialized as
    /// the list itself).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "json_text")]
    pub tools: Option<String>,
    /// Prompt/completion rows: the index of the first message of the completion. Only the
    /// assistant turns from there on are trained (TRL's `completion_only_loss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_from: Option<usize>,
    /// Rendered without the chat template, as TRL tokenizes `text` rows (one assistant
    /// message: every token trained) and plain-string `prompt` / `completion` rows (a user and
    /// an assistant message: the completion trained): the texts joined, the end-of-sequence
    /// token appended, the tokenizer's own special tokens added.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain: bool,
    /// The source row (not serialized into datasets).
    #[serde(skip)]
    pub location: Option<RowLocation>,
}

impl Conversation {
    /// A conversation without a source location.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            tools: None,
            completion_from: None,
            plain: false,
            location: None,
        }
    }

    /// Index of the messages with `role`.
    pub fn indices_of(&self, role: Role) -> impl Iterator<Item = usize> + '_ {
        self.messages
            .iter()
            .enumerate()
            .filter(move |(_, m)| m.role == role)
            .map(|(i, _)| i)
    }

    /// A stable hash of the content (roles and texts), for duplicate detection and caching.
    pub fn content_hash(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for m in &self.messages {
            h.update(m.role.as_str().as_bytes());
            h.update([0]);
            h.update(m.content.as_bytes());
            h.update([0]);
            if let Some(r) = &m.reasoning_content {
                h.update(r.as_bytes());
            }
            for x in [&m.tool_calls, &m.tool_call_id, &m.name]
                .into_iter()
                .flatten()
            {
                h.update([2]);
                h.update(x.as_bytes());
            }
            h.update([1]);
        }
        if let Some(t) = &self.tools {
            h.update([3]);
            h.update(t.as_bytes());
        }
        if let Some(i) = self.completion_from {
            h.update([4]);
            h.update((i as u64).to_le_bytes());
        }
        if self.plain {
            h.update([5]);
        }
        h.finalize().into()
    }
}
