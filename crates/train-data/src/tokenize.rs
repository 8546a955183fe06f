//! Chat template + tokenizer = token ids and assistant-only labels.
//!
//! The masking rule (`cli-contract.md`): the label tokens of an assistant turn are the tokens of
//! the rendered text after that turn's header (the generation prompt) up to and including the
//! template's end-of-turn token; everything else gets no loss. Text the template itself inserts
//! inside the turn (Qwen3's empty `<think>\n\n</think>\n\n`) is part of the turn and is trained,
//! and counted in [`Encoded::template_label_tokens`].
//!
//! `tokenizer.json` is untrusted input: it is checked once, when loaded (size, vocabulary,
//! added tokens, how much its normalizers and pre-tokenizers can grow a text), its own
//! truncation and padding are cleared, and a panic of the `tokenizers` crate while loading or
//! encoding becomes a [`DataError::Tokenizer`] naming the file.

use std::panic::{AssertUnwindSafe, catch_unwind};
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

/// Largest `tokenizer.json`, in bytes (the biggest published ones are about 35 MB).
pub const MAX_TOKENIZER_JSON_BYTES: u64 = 64 << 20;
/// Most token ids a tokenizer may have (its largest id + 1). Published vocabularies stay under
/// 300,000; labels are `i32`, so ids must stay far below 2^31.
pub const MAX_VOCAB_SIZE: usize = 1 << 24;
/// Most entries of `added_tokens` (published tokenizers have a few thousand at most; each one
/// is a pattern the tokenizer looks for in every text).
pub const MAX_ADDED_TOKENS: usize = 1 << 17;
/// Largest worst-case growth of a text through the normalizers and pre-tokenizers of a
/// `tokenizer.json` (bytes out per byte in, the product over the chain; see [`text_growth`]).
/// Published tokenizers stay under 1,000 (SentencePiece ones with a precompiled character map
/// are the largest); a chain of `Replace` or `Prepend` steps that each multiply the text is not
/// a tokenizer but a memory bomb.
pub const MAX_TEXT_GROWTH: u64 = 4096;
/// Largest text the tokenizer may make of one conversation: its length times the worst-case
/// growth of the tokenizer's normalizers and pre-tokenizers, in bytes.
pub const MAX_NORMALIZED_BYTES: u64 = 128 << 20;
/// Most bytes rendered to locate the label tokens of one row: every assistant turn renders the
/// conversation up to that turn, so a long conversation costs its length times its turns.
pub const MAX_LABEL_RENDER_BYTES: u64 = 1 << 30;

/// A chat template with its tokenizer. A clone is a deep copy (its own regex pools and BPE
/// cache), which the preparation gives each worker thread so that they share no locks.
#[derive(Debug, Clone)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    end_of_turn: Vec<String>,
    label_mode: LabelMode,
    source: PathBuf,
    vocab_size: usize,
    growth: u64,
}

/// A panic payload as text.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown failure".into())
}

impl ChatTokenizer {
    /// `tokenizer.json` and the chat template of a Hugging Face model directory.
    ///
    /// The file is checked before the `tokenizers` crate parses it: a regular file of at most
    /// [`MAX_TOKENIZER_JSON_BYTES`], at most [`MAX_ADDED_TOKENS`] added tokens, a well-formed
    /// precompiled character map, normalizers and pre-tokenizers that grow a text at most
    /// [`MAX_TEXT_GROWTH`] times, and, once parsed, ids below [`MAX_VOCAB_SIZE`]. A panic of
    /// the parser is an error naming the file. Its `truncation` and `padding` are cleared (see
    /// [`ChatTokenizer::new`]).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let fail = |message: String| DataError::Tokenizer {
            path: path.clone(),
            message,
        };
        // The template's files are read by `ChatTemplate`; refuse a FIFO or a device there
        // before it opens them (an open of a FIFO blocks).
        for name in ["tokenizer_config.json", "chat_template.jinja"] {
            let p = dir.join(name);
            if std::fs::symlink_metadata(&p).is_ok() {
                drop(crate::load::open_regular(&p)?);
            }
        }
        let bytes = crate::load::read_bounded(&path, MAX_TOKENIZER_JSON_BYTES, "a tokenizer.json")?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            fail(format!(
                "broken JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            ))
        })?;
        check_tokenizer_json(&json).map_err(fail)?;
        drop(json);
        let parsed = catch_unwind(|| Tokenizer::from_bytes(&bytes));
        let tokenizer = match parsed {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(payload) => {
                return Err(fail(format!(
                    "the tokenizers crate failed on this file: {}",
                    panic_text(payload.as_ref())
                )));
            }
        };
        let template = ChatTemplate::from_model_dir(dir)?;
        let tok = Self::new(tokenizer, template, path.clone());
        if tok.vocab_size > MAX_VOCAB_SIZE {
            return Err(fail(format!(
                "field `model.vocab`: the largest token id is {}, over the limit of {MAX_VOCAB_SIZE} ids",
                tok.vocab_size - 1
            )));
        }
        if tok.growth > MAX_TEXT_GROWTH {
            return Err(fail(format!(
                "fields `normalizer` / `pre_tokenizer`: they can grow a text {} times, over the limit of {MAX_TEXT_GROWTH}",
                tok.growth
            )));
        }
        Ok(tok)
    }

    /// Combines a tokenizer and a template; `source` names the tokenizer in messages.
    ///
    /// The tokenizer's own truncation and padding are cleared (`with_truncation(None)`,
    /// `with_padding(None)`): this crate truncates ([`fit`](crate::fit)) and pads
    /// ([`Batch`](crate::Batch)) itself, and tokenizer-side truncation would silently cut
    /// conversations (and their labels) before the label masks are computed, while the
    /// `tokenizers` crate panics on some settings (a `stride` not below `max_length`) and
    /// allocates whatever a padding length asks for.
    pub fn new(mut tokenizer: Tokenizer, template: ChatTemplate, source: PathBuf) -> Self {
        // Clearing cannot fail: only setting truncation parameters is checked.
        let _ = tokenizer.with_truncation(None);
        tokenizer.with_padding(None);
        let vocab_size = tokenizer
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        let growth = match (
            serde_json::to_value(tokenizer.get_normalizer()),
            serde_json::to_value(tokenizer.get_pre_tokenizer()),
        ) {
            (Ok(n), Ok(p)) => text_growth(&n, &p).unwrap_or(u64::MAX),
            _ => u64::MAX,
        };
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
            vocab_size,
            growth,
        }
    }

    /// The number of token ids (the largest id, added tokens included, plus one): every id
    /// this tokenizer produces is below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
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
    ///
    /// `text` may be at most [`MAX_NORMALIZED_BYTES`] divided by the worst-case growth of the
    /// tokenizer's normalizers and pre-tokenizers; a panic of the `tokenizers` crate is an
    /// error naming the tokenizer.
    pub fn tokenize(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.tokenize_with(text, false)
    }

    /// [`tokenize`](Self::tokenize), adding the tokenizer's own special tokens (its
    /// post-processor's BOS, as `tokenizer(text)` does in Python) when `special`.
    pub fn tokenize_with(&self, text: &str, special: bool) -> Result<tokenizers::Encoding> {
        let fail = |message: String| DataError::Tokenizer {
            path: self.source.clone(),
            message,
        };
        let worst = (text.len() as u64).saturating_mul(self.growth);
        if worst > MAX_NORMALIZED_BYTES {
            return Err(fail(format!(
                "a text of {} bytes, which this tokenizer's normalizers and pre-tokenizers can grow {} times, \
                 is over the limit of {MAX_NORMALIZED_BYTES} bytes",
                text.len(),
                self.growth
            )));
        }
        match catch_unwind(AssertUnwindSafe(|| self.tokenizer.encode(text, special))) {
            Ok(r) => r.map_err(|e| fail(e.to_string())),
            Err(payload) => Err(fail(format!(
                "the tokenizers crate failed while encoding: {}",
                panic_text(payload.as_ref())
            ))),
        }
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
    ///
    /// Refuses rows over the size limits first (messages, field bytes, runs without
    /// whitespace: see [`MAX_MESSAGES_PER_ROW`](crate::validate::MAX_MESSAGES_PER_ROW)), naming
    /// the row and field. Locating the turns renders one prefix per assistant turn (at most
    /// [`MAX_LABEL_RENDER_BYTES`] in all); the tokens are then assigned to turns in one pass.
    pub fn encode_with_mode(&self, c: &Conversation, mode: LabelMode) -> Result<Encoded> {
        if let Some(p) = crate::validate::size_problem(c) {
            return Err(DataError::Row(Box::new(p)));
        }
        let wrap = |e: DataError| match e {
            DataError::Template { message, .. } => self.template_error(c, &message),
            DataError::Tokenizer { path, message } => {
                let row = c
                    .location
                    .as_ref()
                    .map_or_else(String::new, |l| format!("{l}: "));
                DataError::Tokenizer {
                    path,
                    message: format!("{row}{message}"),
                }
            }
            other => other,
        };
        if c.plain {
            return self.encode_plain(c, mode).map_err(wrap);
        }
        let tools = c
            .tools
            .as_deref()
            .map(serde_json::from_str::<serde_json::Value>)
            .transpose()
            .map_err(|e| self.template_error(c, &format!("`tools`: {e}")))?;
        let mut extra = serde_json::Map::new();
        if let Some(tools) = tools {
            extra.insert("tools".into(), tools);
        }
        let render = |messages: &[Message], add_generation_prompt: bool| {
            self.template
                .render_with(messages, add_generation_prompt, &extra)
        };
        let full = render(&c.messages, false).map_err(wrap)?;
        let encoding = self.tokenize(&full).map_err(wrap)?;
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
        // A prompt/completion row trains everything after its prompt (TRL's completion mask:
        // the tokens after the prompt rendered with the generation prompt): one turn, from its
        // first message to the end.
        let from = c.completion_from.unwrap_or(0);
        let assistant: Vec<usize> = c
            .indices_of(Role::Assistant)
            .filter(|&i| i >= from)
            .collect();
        let turns: &[usize] = match mode {
            _ if c.completion_from.is_some() => assistant.first().map_or(&[], std::slice::from_ref),
            LabelMode::LastAssistant => assistant.last().map_or(&[], std::slice::from_ref),
            _ => &assistant,
        };
        // Byte span [start, end) of each trained turn in `full`, with its message.
        let mut spans: Vec<(usize, usize, usize)> = Vec::with_capacity(turns.len());
        let mut rendered = full.len() as u64;
        for &i in turns {
            let prefix = render(&c.messages[..i], true).map_err(wrap)?;
            rendered += prefix.len() as u64;
            if rendered > MAX_LABEL_RENDER_BYTES {
                return Err(self.template_error(
                    c,
                    &format!(
                        "locating the {} assistant turns renders more than {MAX_LABEL_RENDER_BYTES} bytes \
                         (the limit per row); split the conversation",
                        turns.len()
                    ),
                ));
            }
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
            let end = if c.completion_from.is_some() {
                full.len()
            } else {
                self.turn_end(&full, start, &c.messages[..=i], &extra, &mut rendered)
            };
            spans.push((start, end, i));
        }
        let mut labels = vec![IGNORE_INDEX; ids.len()];
        let mut template_label_tokens = 0;
        // Offsets are sorted by start for every tokenizer met so far; then each turn's tokens
        // are found by binary search. Otherwise every turn scans every token.
        let sorted = offsets.windows(2).all(|w| w[0].0 <= w[1].0);
        for &(start, end, i) in &spans {
            let data_spans = data_spans(&full[start..end], &c.messages[i]);
            let range = if sorted {
                offsets.partition_point(|o| o.0 < start)..offsets.partition_point(|o| o.0 < end)
            } else {
                0..offsets.len()
            };
            for t in range {
                let (a, b) = offsets[t];
                if a >= start && a < end && b > a {
                    labels[t] = ids[t] as i32;
                    let (ra, rb) = (a - start, b - start);
                    let in_data = data_spans.iter().any(|&(s, e)| ra < e && rb > s);
                    let is_eot = self
                        .end_of_turn
                        .iter()
                        .any(|eot| full.get(a..b) == Some(eot.as_str()));
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

    /// A row rendered without the chat template, as TRL's `SFTTrainer` tokenizes `text` and
    /// plain-string prompt/completion rows: the end-of-sequence token appended to the text (or
    /// the completion) unless it already ends with it, the tokenizer's special tokens added;
    /// a prompt/completion row trains the tokens after the longest common prefix of the
    /// tokenized prompt and the tokenized prompt + completion.
    fn encode_plain(&self, c: &Conversation, mode: LabelMode) -> Result<Encoded> {
        let eos = self.template.special_token("eos_token").unwrap_or("");
        let with_eos = |text: &str| {
            if eos.is_empty() || text.ends_with(eos) {
                text.to_string()
            } else {
                format!("{text}{eos}")
            }
        };
        let (prompt, completion) = match c.messages.as_slice() {
            [only] => ("", only.content.as_str()),
            [p, done] => (p.content.as_str(), done.content.as_str()),
            _ => {
                return Err(self
                    .template_error(c, "a plain row holds a text, or a prompt and a completion"));
            }
        };
        let prompt_ids: Vec<u32> = if prompt.is_empty() {
            Vec::new()
        } else {
            self.tokenize_with(prompt, true)?.get_ids().to_vec()
        };
        let ids = self
            .tokenize_with(&format!("{prompt}{}", with_eos(completion)), true)?
            .get_ids()
            .to_vec();
        let trained_from = if c.completion_from.is_some() && mode != LabelMode::Everything {
            prompt_ids
                .iter()
                .zip(&ids)
                .take_while(|(a, b)| a == b)
                .count()
        } else {
            0
        };
        let labels = ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                if t >= trained_from {
                    id as i32
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        Ok(Encoded {
            input_ids: ids,
            labels,
            template_label_tokens: 0,
        })
    }

    /// End (exclusive, in bytes) of the assistant turn starting at `start`: just after the first
    /// end-of-turn string, else where the rendering of the conversation up to this turn ends.
    fn turn_end(
        &self,
        full: &str,
        start: usize,
        upto: &[Message],
        extra: &serde_json::Map<String, serde_json::Value>,
        rendered: &mut u64,
    ) -> usize {
        let rest = &full[start..];
        let first = self
            .end_of_turn
            .iter()
            .filter_map(|eot| rest.find(eot.as_str()).map(|p| p + eot.len()))
            .min();
        if let Some(end) = first {
            return start + end;
        }
        // Counted for the limit, which the next turn checks.
        match self.template.render_with(upto, false, extra) {
            Ok(t) => {
                *rendered += t.len() as u64;
                if full.starts_with(&t) && t.len() > start {
                    t.len()
                } else {
                    full.len()
                }
            }
            Err(_) => full.len(),
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

/// Checks of the parsed `tokenizer.json` that must come before the `tokenizers` crate parses
/// it: the number of added tokens, the normalizers' and pre-tokenizers' growth (which also
/// checks each precompiled character map's header, whose trie length the parser allocates
/// unchecked).
fn check_tokenizer_json(json: &serde_json::Value) -> std::result::Result<(), String> {
    if let Some(added) = json
        .get("added_tokens")
        .and_then(serde_json::Value::as_array)
        && added.len() > MAX_ADDED_TOKENS
    {
        return Err(format!(
            "field `added_tokens`: {} entries, over the limit of {MAX_ADDED_TOKENS}",
            added.len()
        ));
    }
    let null = serde_json::Value::Null;
    let growth = text_growth(
        json.get("normalizer").unwrap_or(&null),
        json.get("pre_tokenizer").unwrap_or(&null),
    )?;
    if growth > MAX_TEXT_GROWTH {
        return Err(format!(
            "fields `normalizer` / `pre_tokenizer`: they can grow a text {growth} times, over the limit of {MAX_TEXT_GROWTH}"
        ));
    }
    Ok(())
}

/// Deepest nesting of `Sequence` normalizers or pre-tokenizers.
const MAX_SEQUENCE_DEPTH: usize = 8;

/// The worst-case growth of a text through `normalizer` then `pre_tokenizer` (their
/// `tokenizer.json` form): bytes out per byte in, the product of each step's bound, saturating.
///
/// Each step's bound is an upper bound on its output for any input of `n ≥ 1` bytes, divided by
/// `n`: Unicode normalization NFC/NFD 3 and NFKC/NFKD 11 (U+FDFA becomes 33 bytes),
/// lowercasing 2, the BERT normalizer 12, byte-level mapping 3, `Prepend(s)` 1 + |s|,
/// `Replace` of a non-empty literal of `p` bytes by `c` bytes max(1, ⌈c/p⌉) and of a regular
/// expression (which may match the empty string, at most 2n + 1 matches) 1 + 3c, a precompiled
/// character map its longest replacement, `Metaspace` twice its replacement's bytes; splitting
/// steps 1. Bounding this product is what keeps a `Sequence` of growing steps, or one step that
/// inserts a long text at every position, from turning a short message into gigabytes.
pub fn text_growth(
    normalizer: &serde_json::Value,
    pre_tokenizer: &serde_json::Value,
) -> std::result::Result<u64, String> {
    Ok(
        step_growth(normalizer, "normalizer", 0)?.saturating_mul(step_growth(
            pre_tokenizer,
            "pre_tokenizer",
            0,
        )?),
    )
}

fn step_growth(
    v: &serde_json::Value,
    field: &str,
    depth: usize,
) -> std::result::Result<u64, String> {
    use serde_json::Value;
    if v.is_null() {
        return Ok(1);
    }
    if depth > MAX_SEQUENCE_DEPTH {
        return Err(format!(
            "field `{field}`: Sequence nested deeper than {MAX_SEQUENCE_DEPTH}"
        ));
    }
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    let text = |key: &str| v.get(key).and_then(Value::as_str).map_or(0, str::len) as u64;
    Ok(match kind {
        "Sequence" => {
            let key = if field.starts_with("normalizer") {
                "normalizers"
            } else {
                "pretokenizers"
            };
            let steps = v
                .get(key)
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice);
            let mut g: u64 = 1;
            for (i, step) in steps.iter().enumerate() {
                g = g.saturating_mul(step_growth(
                    step,
                    &format!("{field}.{key}[{i}]"),
                    depth + 1,
                )?);
            }
            g
        }
        "NFC" | "NFD" => 3,
        "NFKC" | "NFKD" => 11,
        "Lowercase" => 2,
        "BertNormalizer" => 12,
        "ByteLevel" => 3,
        "Prepend" => 1 + text("prepend"),
        "Replace" => {
            let c = text("content");
            match v.get("pattern") {
                Some(Value::Object(p)) => match p.get("String").and_then(Value::as_str) {
                    Some(lit) if !lit.is_empty() => c.div_ceil(lit.len() as u64).max(1),
                    _ => 1 + 3 * c,
                },
                _ => 1 + 3 * c,
            }
        }
        "Precompiled" => {
            let map = v
                .get("precompiled_charsmap")
                .and_then(Value::as_str)
                .unwrap_or("");
            longest_replacement(map)
                .map_err(|e| format!("field `{field}.precompiled_charsmap`: {e}"))?
                .max(1)
        }
        "Metaspace" => 2 * (text("replacement").max(1)),
        _ => 1,
    })
}

/// The longest replacement of a SentencePiece precompiled character map (base64 of: a
/// little-endian `u32` trie length in bytes, the trie, then NUL-terminated replacements).
fn longest_replacement(base64: &str) -> std::result::Result<u64, String> {
    let blob = decode_base64(base64).ok_or("not valid base64")?;
    let Some(head) = blob.get(..4) else {
        return if blob.is_empty() {
            Ok(1)
        } else {
            Err("shorter than its 4-byte header".into())
        };
    };
    let trie = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let Some(pool) = blob.get(4 + (trie / 4) * 4..) else {
        return Err(format!(
            "its header declares a {trie}-byte trie in a {}-byte map",
            blob.len()
        ));
    };
    Ok(pool.split(|&b| b == 0).map(<[u8]>::len).max().unwrap_or(0) as u64)
}

/// Standard base64 with optional padding; `None` on any other byte.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in s.bytes().filter(|&b| b != b'=' && !b.is_ascii_whitespace()) {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
