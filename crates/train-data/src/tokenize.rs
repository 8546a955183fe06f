//! Chat template + tokenizer = token ids and assistant-only labels.
//!
//! The masking rule (`cli-contract.md`): the label tokens of an assistant turn are the tokens of
//! the rendered text after that turn's header (the generation prompt) up to and including the
//! template's end-of-turn token; everything else gets no loss. Text the template itself inserts
//! inside the turn (Qwen3's empty `<think>\n\n</think>\n\n`) is part of the turn and is trained,
//! and counted in [`Encoded::template_label_tokens`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::batch::IGNORE_INDEX;
use crate::conversation::{Conversation, Message, Role};
use crate::error::{DataError, Result};
use crate::template::ChatTemplate;

/// Which tokens are trained.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LabelMode {
    /// Every assistant turn (the default).
    #[default]
    AllAssistant,
    /// Only the last assistant turn.
    LastAssistant,
    /// Every token of the rendered conversation.
    Everything,
}

/// A tokenized conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids of the rendered conversation.
    pub input_ids: Vec<u32>,
    /// Per token: its id when trained, [`IGNORE_INDEX`] otherwise (aligned with `input_ids`,
    /// as in `transformers`: position `t` is predicted from the tokens before it).
    pub labels: Vec<i32>,
    /// Label tokens that the template inserted (not from the messages, not end-of-turn).
    pub template_label_tokens: usize,
}

/// End-of-turn tokens of the common templates, in the order they are looked for.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_turn|>",
    "<end_of_turn>",
    "<|end|>",
    "<|eot|>",
];

/// A chat template with its tokenizer.
#[derive(Debug)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    end_of_turn: Vec<String>,
    label_mode: LabelMode,
    source: PathBuf,
}

impl ChatTokenizer {
    /// `tokenizer.json` and the chat template of a Hugging Face model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let template = ChatTemplate::from_model_dir(dir)?;
        Ok(Self::new(tokenizer, template, path))
    }

    /// Combines a tokenizer and a template; `source` names the tokenizer in messages.
    pub fn new(tokenizer: Tokenizer, template: ChatTemplate, source: PathBuf) -> Self {
        let mut end_of_turn: Vec<String> = END_OF_TURN
            .iter()
            .filter(|t| tokenizer.token_to_id(t).is_some())
            .map(|t| (*t).to_string())
            .collect();
        if let Some(eos) = template.special_token("eos_token")
            && !end_of_turn.iter().any(|t| t == eos)
        {
            end_of_turn.push(eos.to_string());
        }
        Self {
            tokenizer,
            template,
            end_of_turn,
            label_mode: LabelMode::default(),
            source,
        }
    }

    /// Chooses which tokens are trained.
    #[must_use]
    pub fn with_label_mode(mut self, mode: LabelMode) -> Self {
        self.label_mode = mode;
        self
    }

    /// The label mode.
    pub fn label_mode(&self) -> LabelMode {
        self.label_mode
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The strings that end an assistant turn for this template.
    pub fn end_of_turn(&self) -> &[String] {
        &self.end_of_turn
    }

    /// Token ids of the end-of-turn strings.
    pub fn end_of_turn_ids(&self) -> Vec<u32> {
        self.end_of_turn
            .iter()
            .filter_map(|t| self.tokenizer.token_to_id(t))
            .collect()
    }

    /// The id of the padding token (`pad_token`, else the first end-of-turn token, else 0).
    pub fn pad_id(&self) -> u32 {
        self.template
            .special_token("pad_token")
            .and_then(|t| self.tokenizer.token_to_id(t))
            .or_else(|| self.end_of_turn_ids().first().copied())
            .unwrap_or(0)
    }

    /// Token ids of `text` without adding special tokens (templates already emit them).
    pub fn tokenize(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.tokenizer
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer {
                path: self.source.clone(),
                message: e.to_string(),
            })
    }

    /// The prompt for generation: the rendered messages plus the assistant header.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        Ok(self.tokenize(&text)?.get_ids().to_vec())
    }

    fn template_error(&self, c: &Conversation, message: &str) -> DataError {
        let row = c
            .location
            .as_ref()
            .map_or_else(String::new, |l| format!("{l}: "));
        DataError::Template {
            template: self.template.origin().to_string(),
            message: format!("{row}{message}"),
        }
    }

    /// Renders and tokenizes `c`, with labels per the label mode.
    pub fn encode(&self, c: &Conversation) -> Result<Encoded> {
        self.encode_with_mode(c, self.label_mode)
    }

    /// Renders and tokenizes `c`, with labels per `mode`.
    pub fn encode_with_mode(&self, c: &Conversation, mode: LabelMode) -> Result<Encoded> {
        let wrap = |e: DataError| match e {
            DataError::Template { message, .. } => self.template_error(c, &message),
            other => other,
        };
        let full = self.template.render(&c.messages, false).map_err(wrap)?;
        let encoding = self.tokenize(&full)?;
        let ids = encoding.get_ids().to_vec();
        let offsets = encoding.get_offsets();
        if mode == LabelMode::Everything {
            let labels = ids.iter().map(|&t| t as i32).collect();
            return Ok(Encoded {
                input_ids: ids,
                labels,
                template_label_tokens: 0,
            });
        }
        let mut labels = vec![IGNORE_INDEX; ids.len()];
        let mut template_label_tokens = 0;
        let assistant: Vec<usize> = c.indices_of(Role::Assistant).collect();
        let turns: &[usize] = match mode {
            LabelMode::LastAssistant => assistant.last().map_or(&[], std::slice::from_ref),
            _ => &assistant,
        };
        for &i in turns {
            let prefix = self.template.render(&c.messages[..i], true).map_err(wrap)?;
            if !full.starts_with(&prefix) {
                return Err(self.template_error(
                    c,
                    &format!(
                        "the rendering of the first {i} messages with the generation prompt is not a prefix of the \
                         whole conversation, so assistant turn {i} cannot be located"
                    ),
                ));
            }
            let start = prefix.len();
            let end = self.turn_end(&full, start, &c.messages[..=i]);
            let data_spans = data_spans(&full[start..end], &c.messages[i]);
            for (t, &(a, b)) in offsets.iter().enumerate() {
                if a >= start && a < end && b > a {
                    labels[t] = ids[t] as i32;
                    let (ra, rb) = (a - start, b - start);
                    let in_data = data_spans.iter().any(|&(s, e)| ra < e && rb > s);
                    let is_eot = self.end_of_turn.iter().any(|eot| &full[a..b] == eot);
                    if !in_data && !is_eot {
                        template_label_tokens += 1;
                    }
                }
            }
        }
        Ok(Encoded {
            input_ids: ids,
            labels,
            template_label_tokens,
        })
    }

    /// End (exclusive, in bytes) of the assistant turn starting at `start`: just after the first
    /// end-of-turn string, else where the rendering of the conversation up to this turn ends.
    fn turn_end(&self, full: &str, start: usize, upto: &[Message]) -> usize {
        let rest = &full[start..];
        let first = self
            .end_of_turn
            .iter()
            .filter_map(|eot| rest.find(eot.as_str()).map(|p| p + eot.len()))
            .min();
        if let Some(end) = first {
            return start + end;
        }
        match self.template.render(upto, false) {
            Ok(t) if full.starts_with(&t) && t.len() > start => t.len(),
            _ => full.len(),
        }
    }
}

/// Byte ranges of `span` that hold text from the message (content, reasoning, the parts of a
/// content with `<think>` blocks), as opposed to text the template inserted.
fn data_spans(span: &str, m: &Message) -> Vec<(usize, usize)> {
    let mut pieces: Vec<&str> = Vec::new();
    for part in m.content.split("<think>").flat_map(|p| p.split("</think>")) {
        pieces.push(part.trim());
    }
    if let Some(r) = &m.reasoning_content {
        pieces.push(r.trim());
    }
    let mut out = Vec::new();
    for p in pieces.into_iter().filter(|p| !p.is_empty()) {
        if let Some(pos) = span.find(p) {
            out.push((pos, pos + p.len()));
        }
    }
    out
}
