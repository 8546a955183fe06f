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
}

impl Role {
    /// Parses `system` / `user` / `assistant`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            _ => None,
        }
    }

    /// The name chat templates expect.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
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
}

impl Message {
    /// A message without separate reasoning.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            reasoning_content: None,
        }
    }
}

/// A conversation and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The messages, in order.
    pub messages: Vec<Message>,
    /// The source row (not serialized into datasets).
    #[serde(skip)]
    pub location: Option<RowLocation>,
}

impl Conversation {
    /// A conversation without a source location.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
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
            h.update([1]);
        }
        h.finalize().into()
    }
}
