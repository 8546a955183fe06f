//! Transforms applied to conversations before rendering: strip `<think>` blocks, a default
//! system prompt, the origin's thinking and stop patterns — or your own [`Transform`].
//!
//! Every random choice comes from a generator seeded by `(seed, row index, transform
//! position)`, so a rerun produces identical data whatever the order rows are processed in.

use serde::{Deserialize, Serialize};

use crate::conversation::{Conversation, Message, Role};
use crate::error::{DataError, Result};
use crate::rng::SplitMix64;

/// What a transform knows about the row it changes.
#[derive(Debug, Clone, Copy)]
pub struct TransformContext {
    /// The run's data seed.
    pub seed: u64,
    /// Index of the row in the loaded file (stable across reruns).
    pub row_index: usize,
    /// Position of the transform in the pipeline.
    pub position: usize,
}

impl TransformContext {
    /// A random generator that depends only on the seed, the row and the transform position.
    pub fn rng(&self) -> SplitMix64 {
        SplitMix64::from_parts(&[self.seed, self.row_index as u64, self.position as u64])
    }
}

/// A change applied to every conversation. Implement it to plug your own step into a
/// [`TransformPipeline`] next to the built-in ones.
pub trait Transform: Send + Sync {
    /// A short name for reports.
    fn name(&self) -> &str;
    /// Changes `conversation` in place; must be deterministic given `ctx`.
    fn apply(&self, conversation: &mut Conversation, ctx: &TransformContext);
}

/// The built-in transforms, as they appear in configuration (TOML `[[transform]]` tables with
/// a `type` key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum TransformConfig {
    /// Removes `<think>…</think>` blocks (and `reasoning_content`) from assistant turns.
    StripThink,
    /// Inserts a system message when the conversation has none.
    SystemPrompt {
        /// The system prompt.
        prompt: String,
    },
    /// The origin's thinking pattern: the user turn asks to "think with 🤔 /five/ times" and the
    /// answer starts with the emoji repeated that many times and a newline.
    ThinkingPattern {
        /// A fixed emoji; by default one of 🤔 💭 🧠 💡 🎯 🔍 🤨 🧐 ⚡ ✨ per turn.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        emoji: Option<String>,
        /// Fewest repetitions (default 2).
        #[serde(default = "two")]
        min_count: usize,
        /// Most repetitions (default 8).
        #[serde(default = "eight")]
        max_count: usize,
    },
    /// The origin's stop pattern: the user turn asks to "stop with 🛑 /three/ times" and the
    /// answer ends with a newline and the emoji repeated that many times.
    StopPattern {
        /// A fixed emoji; by default one of 🛑 ⛔ 🚫 ❌ 🔴 ⏹️ 🔚 ✋ 🚦 🛡️ per turn.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        emoji: Option<String>,
        /// Fewest repetitions (default 2).
        #[serde(default = "two")]
        min_count: usize,
        /// Most repetitions (default 4).
        #[serde(default = "four")]
        max_count: usize,
    },
}

fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn eight() -> usize {
    8
}

/// The emojis of the thinking pattern.
pub const THINKING_EMOJIS: &[&str] = &["🤔", "💭", "🧠", "💡", "🎯", "🔍", "🤨", "🧐", "⚡", "✨"];
/// The emojis of the stop pattern.
pub const STOP_EMOJIS: &[&str] = &["🛑", "⛔", "🚫", "❌", "🔴", "⏹️", "🔚", "✋", "🚦", "🛡️"];

/// English words for the counts the patterns use.
pub(crate) fn number_word(n: usize) -> String {
    const WORDS: [&str; 13] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
    ];
    WORDS
        .get(n)
        .map_or_else(|| n.to_string(), |w| (*w).to_string())
}

/// Most repetitions of a pattern's emoji (the origin used 2 to 8): a count is a size.
pub const MAX_PATTERN_COUNT: usize = 1000;
/// Longest fixed emoji of a pattern, in bytes.
pub const MAX_EMOJI_BYTES: usize = 64;

impl TransformConfig {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::ThinkingPattern {
                min_count,
                max_count,
                emoji,
            }
            | Self::StopPattern {
                min_count,
                max_count,
                emoji,
            } => {
                if *min_count == 0 || min_count > max_count {
                    return Err(DataError::config(
                        "transform.min_count",
                        format!("need 1 <= min_count <= max_count, got {min_count}..{max_count}"),
                    ));
                }
                if *max_count > MAX_PATTERN_COUNT {
                    return Err(DataError::config(
                        "transform.max_count",
                        format!("{max_count} is above the limit {MAX_PATTERN_COUNT}"),
                    ));
                }
                if emoji.as_deref().is_some_and(str::is_empty) {
                    return Err(DataError::config(
                        "transform.emoji",
                        "must not be empty (omit it for a random emoji)",
                    ));
                }
                if emoji.as_deref().is_some_and(|e| e.len() > MAX_EMOJI_BYTES) {
                    return Err(DataError::config(
                        "transform.emoji",
                        format!("longer than {MAX_EMOJI_BYTES} bytes"),
                    ));
                }
                Ok(())
            }
            Self::SystemPrompt { prompt } if prompt.trim().is_empty() => Err(DataError::config(
                "transform.prompt",
                "the system prompt is empty",
            )),
            _ => Ok(()),
        }
    }

    /// Builds the transform.
    pub fn build(&self) -> Result<Box<dyn Transform>> {
        self.validate()?;
        Ok(match self.clone() {
            Self::StripThink => Box::new(StripThink),
            Self::SystemPrompt { prompt } => Box::new(SystemPrompt { prompt }),
            Self::ThinkingPattern {
                emoji,
                min_count,
                max_count,
            } => Box::new(EmojiPattern {
                kind: PatternKind::Thinking,
                emoji,
                min_count,
                max_count,
            }),
            Self::StopPattern {
                emoji,
                min_count,
                max_count,
            } => Box::new(EmojiPattern {
                kind: PatternKind::Stop,
                emoji,
                min_count,
                max_count,
            }),
        })
    }
}

/// An ordered list of transforms.
#[derive(Default)]
pub struct TransformPipeline {
    transforms: Vec<Box<dyn Transform>>,
}

impl std::fmt::Debug for TransformPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.transforms.iter().map(|t| t.name()))
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlTransforms {
    #[serde(default)]
    transform: Vec<TransformConfig>,
}

impl TransformPipeline {
    /// Builds the built-in transforms of `configs`, in order.
    pub fn from_configs(configs: &[TransformConfig]) -> Result<Self> {
        Ok(Self {
            transforms: configs
                .iter()
                .map(TransformConfig::build)
                .collect::<Result<_>>()?,
        })
    }

    /// Parses `[[transform]]` tables from TOML, e.g.
    ///
    /// ```toml
    /// [[transform]]
    /// type = "strip_think"
    /// [[transform]]
    /// type = "system_prompt"
    /// prompt = "You are helpful."
    /// ```
    pub fn configs_from_toml(text: &str) -> Result<Vec<TransformConfig>> {
        let parsed: TomlTransforms =
            toml::from_str(text).map_err(|e| DataError::config("transform", e.to_string()))?;
        for c in &parsed.transform {
            c.validate()?;
        }
        Ok(parsed.transform)
    }

    /// Appends a transform (a built-in one or your own).
    pub fn push(&mut self, transform: Box<dyn Transform>) {
        self.transforms.push(transform);
    }

    /// Number of transforms.
    pub fn len(&self) -> usize {
        self.transforms.len()
    }

    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.transforms.is_empty()
    }

    /// Applies every transform, in order, to the conversation of row `row_index`.
    pub fn apply(&self, conversation: &mut Conversation, seed: u64, row_index: usize) {
        for (position, t) in self.transforms.iter().enumerate() {
            t.apply(
                conversation,
                &TransformContext {
                    seed,
                    row_index,
                    position,
                },
            );
        }
    }
}

/// The options of one `[[transform]]` table (everything but `type`), handed to the builder of a
/// transform registered in a [`TransformRegistry`].
pub type TransformOptions = crate::registry::Options;

/// Builds a downstream transform from its options (transforms get no other context: `()`); an
/// `Err` is a message that the registry reports with the transform's position and type.
pub type TransformBuilder = crate::registry::Builder<Transforms>;

/// The data transforms as a kind of [`Plugin`](crate::Plugin): `[[transform]]` tables,
/// [`Transform`] objects, the built-ins of [`TransformConfig`].
#[derive(Debug, Clone, Copy)]
pub struct Transforms;

/// The `type` names of the built-in transforms (the variants of [`TransformConfig`]).
pub const BUILTIN_TRANSFORMS: [&str; 4] = [
    "strip_think",
    "system_prompt",
    "thinking_pattern",
    "stop_pattern",
];

impl crate::registry::Plugin for Transforms {
    type Output = dyn Transform;
    type Context<'a> = ();
    const TABLE: &'static str = "transform";

    fn builtins(registry: &mut crate::registry::Registry<Self>) {
        for name in BUILTIN_TRANSFORMS {
            let builder: TransformBuilder = Box::new(|options, ()| {
                let config: TransformConfig = options.parse_tagged()?;
                config.build().map_err(|e| e.to_string())
            });
            // The names are distinct: registering them cannot fail.
            let _ = registry.register(name, builder);
        }
    }
}

/// The transform factory ([`Registry`](crate::Registry) of [`Transforms`]): the built-in
/// transforms ([`TransformConfig`]), registered by `new()`, plus the ones you register under a
/// `type` name of your own, all buildable from the same `[[transform]]` TOML.
///
/// ```
/// use train_data::{Conversation, Transform, TransformContext, TransformRegistry};
///
/// struct Shout;
/// impl Transform for Shout {
///     fn name(&self) -> &str { "shout" }
///     fn apply(&self, c: &mut Conversation, _ctx: &TransformContext) {
///         for m in &mut c.messages { m.content = m.content.to_uppercase(); }
///     }
/// }
///
/// let mut registry = TransformRegistry::new();
/// registry.register("shout", Box::new(|_opts, ()| Ok(Box::new(Shout) as Box<dyn Transform>)))?;
/// let pipeline = registry.pipeline_from_toml(r#"
///     [[transform]]
///     type = "strip_think"
///     [[transform]]
///     type = "shout"
/// "#)?;
/// assert_eq!(pipeline.len(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub type TransformRegistry = crate::registry::Registry<Transforms>;

impl crate::registry::Registry<Transforms> {
    /// Builds the `[[transform]]` tables of a TOML document, in order; built-in and
    /// registered types may be mixed. Errors name the table (`transform[2]`) and its type.
    pub fn pipeline_from_toml(&self, text: &str) -> Result<TransformPipeline> {
        let transforms = self.build_toml(text, &()).map_err(|e| {
            DataError::config(e.field.unwrap_or_else(|| "transform".into()), e.message)
        })?;
        let mut pipeline = TransformPipeline::default();
        for t in transforms {
            pipeline.push(t);
        }
        Ok(pipeline)
    }
}

/// Removes `<think>…</think>` blocks from assistant turns.
#[derive(Debug, Clone, Copy)]
pub struct StripThink;

/// `text` without its `<think>…</think>` blocks (leading whitespace after a leading block is
/// dropped too).
pub fn strip_think(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<think>") {
        let Some(len) = rest[start..].find("</think>") else {
            break;
        };
        let before = &rest[..start];
        out.push_str(before);
        rest = &rest[start + len + "</think>".len()..];
        if out.trim().is_empty() {
            out.clear();
            rest = rest.trim_start();
        }
    }
    out.push_str(rest);
    out
}

impl Transform for StripThink {
    fn name(&self) -> &str {
        "strip_think"
    }
    fn apply(&self, c: &mut Conversation, _ctx: &TransformContext) {
        for m in c.messages.iter_mut().filter(|m| m.role == Role::Assistant) {
            m.content = strip_think(&m.content);
            m.reasoning_content = None;
        }
    }
}

/// Inserts a system message when there is none.
#[derive(Debug, Clone)]
pub struct SystemPrompt {
    /// The prompt.
    pub prompt: String,
}

impl Transform for SystemPrompt {
    fn name(&self) -> &str {
        "system_prompt"
    }
    fn apply(&self, c: &mut Conversation, _ctx: &TransformContext) {
        if c.messages.first().is_none_or(|m| m.role != Role::System) {
            c.messages
                .insert(0, Message::new(Role::System, self.prompt.clone()));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatternKind {
    Thinking,
    Stop,
}

/// The thinking / stop emoji patterns.
#[derive(Debug, Clone)]
struct EmojiPattern {
    kind: PatternKind,
    emoji: Option<String>,
    min_count: usize,
    max_count: usize,
}

impl Transform for EmojiPattern {
    fn name(&self) -> &str {
        match self.kind {
            PatternKind::Thinking => "thinking_pattern",
            PatternKind::Stop => "stop_pattern",
        }
    }

    fn apply(&self, c: &mut Conversation, ctx: &TransformContext) {
        let mut rng = ctx.rng();
        let choices = match self.kind {
            PatternKind::Thinking => THINKING_EMOJIS,
            PatternKind::Stop => STOP_EMOJIS,
        };
        for i in 1..c.messages.len() {
            if c.messages[i].role != Role::Assistant || c.messages[i - 1].role != Role::User {
                continue;
            }
            let emoji = self
                .emoji
                .clone()
                .unwrap_or_else(|| choices[rng.below(choices.len())].to_string());
            let count = self.min_count + rng.below(self.max_count - self.min_count + 1);
            let run = emoji.repeat(count);
            let word = number_word(count);
            let (user, answer) = (&c.messages[i - 1].content, &c.messages[i].content);
            let (user, answer) = match self.kind {
                PatternKind::Thinking => (
                    format!("{user}\n\nthink with {emoji} /{word}/ times"),
                    format!("{run}\n{answer}"),
                ),
                PatternKind::Stop => (
                    format!("{user}\n\nstop with {emoji} /{word}/ times"),
                    format!("{answer}\n{run}"),
                ),
            };
            c.messages[i - 1].content = user;
            c.messages[i].content = answer;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Conversation {
        Conversation::new(vec![
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "<think>\nhmm\n</think>\n\nHello!"),
            Message::new(Role::User, "Bye"),
            Message::new(Role::Assistant, "See you"),
        ])
    }

    #[test]
    fn strip_think_removes_blocks() {
        assert_eq!(strip_think("<think>\nx\n</think>\n\nHello"), "Hello");
        assert_eq!(strip_think("a <think>b</think> c"), "a  c");
        assert_eq!(strip_think("no block"), "no block");
        assert_eq!(strip_think("<think>unclosed"), "<think>unclosed");
    }

    #[test]
    fn patterns_follow_the_origin_and_are_deterministic() {
        let p = TransformPipeline::from_configs(&[
            TransformConfig::StripThink,
            TransformConfig::ThinkingPattern {
                emoji: None,
                min_count: 2,
                max_count: 8,
            },
            TransformConfig::StopPattern {
                emoji: Some("🛑".into()),
                min_count: 3,
                max_count: 3,
            },
        ])
        .unwrap();
        let mut a = conv();
        p.apply(&mut a, 7, 3);
        let mut b = conv();
        p.apply(&mut b, 7, 3);
        assert_eq!(a, b);
        let answer = &a.messages[1].content;
        let first = answer.chars().next().unwrap().to_string();
        assert!(THINKING_EMOJIS.contains(&first.as_str()), "{answer}");
        let run: String = answer.split('\n').next().unwrap().to_string();
        let count = run.chars().count() / first.chars().count();
        assert!((2..=8).contains(&count));
        assert!(answer.ends_with("Hello!\n🛑🛑🛑"), "{answer}");
        assert!(a.messages[0].content.contains(&format!(
            "think with {first} /{}/ times",
            number_word(count)
        )));
        assert!(
            a.messages[0]
                .content
                .ends_with("stop with 🛑 /three/ times")
        );
        let mut c = conv();
        p.apply(&mut c, 8, 3);
        let mut d = conv();
        p.apply(&mut d, 7, 4);
        assert!(c != a || d != a, "seed and row must matter");
    }

    #[test]
    fn toml_configs_parse_and_validate() {
        let cfgs = TransformPipeline::configs_from_toml(
            "[[transform]]\ntype = \"system_prompt\"\nprompt = \"Be brief.\"\n[[transform]]\ntype = \"stop_pattern\"\n",
        )
        .unwrap();
        assert_eq!(cfgs.len(), 2);
        assert_eq!(
            cfgs[1],
            TransformConfig::StopPattern {
                emoji: None,
                min_count: 2,
                max_count: 4
            }
        );
        let e = TransformPipeline::configs_from_toml(
            "[[transform]]\ntype = \"thinking_pattern\"\nmin_count = 5\nmax_count = 2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("min_count"), "{e}");
        assert!(TransformPipeline::configs_from_toml("[[transform]]\ntype = \"nope\"\n").is_err());
    }

    #[test]
    fn system_prompt_only_when_missing() {
        let t = SystemPrompt { prompt: "S".into() };
        let ctx = TransformContext {
            seed: 0,
            row_index: 0,
            position: 0,
        };
        let mut c = conv();
        t.apply(&mut c, &ctx);
        t.apply(&mut c, &ctx);
        assert_eq!(
            c.messages.iter().filter(|m| m.role == Role::System).count(),
            1
        );
    }

    struct Suffix(String);
    impl Transform for Suffix {
        fn name(&self) -> &str {
            "suffix"
        }
        fn apply(&self, c: &mut Conversation, _ctx: &TransformContext) {
            for m in c.messages.iter_mut().filter(|m| m.role == Role::Assistant) {
                m.content.push_str(&self.0);
            }
        }
    }

    fn registry() -> TransformRegistry {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Opts {
            text: String,
        }
        let mut r = TransformRegistry::new();
        r.register(
            "suffix",
            Box::new(|o: &TransformOptions, (): &()| {
                let opts: Opts = o.parse()?;
                if opts.text.is_empty() {
                    return Err("text is empty".to_string());
                }
                Ok(Box::new(Suffix(opts.text)) as Box<dyn Transform>)
            }),
        )
        .unwrap();
        r
    }

    #[test]
    fn registry_builds_builtin_and_custom_in_order() {
        let p = registry()
            .pipeline_from_toml(
                "[[transform]]\ntype = \"strip_think\"\n[[transform]]\ntype = \"suffix\"\ntext = \" (ok)\"\n",
            )
            .unwrap();
        assert_eq!(format!("{p:?}"), r#"["strip_think", "suffix"]"#);
        let mut c = conv();
        p.apply(&mut c, 0, 0);
        assert_eq!(c.messages[1].content, "Hello! (ok)");
        assert_eq!(c.messages[3].content, "See you (ok)");
    }

    #[test]
    fn registry_errors_name_the_table() {
        let r = registry();
        let err = |text: &str| r.pipeline_from_toml(text).unwrap_err().to_string();
        let e = err("[[transform]]\ntype = \"strip_think\"\n[[transform]]\ntype = \"nope\"\n");
        assert!(
            e.contains("transform[1].type") && e.contains("suffix"),
            "{e}"
        );
        let e = err("[[transform]]\ntype = \"suffix\"\ntext = \"\"\n");
        assert!(
            e.contains("transform[0] (suffix)") && e.contains("text is empty"),
            "{e}"
        );
        let e = err("[[transform]]\ntype = \"suffix\"\ntxt = \"x\"\n");
        assert!(
            e.contains("transform[0] (suffix)") && e.contains("txt"),
            "{e}"
        );
        let e = err("[[transform]]\ntype = \"system_prompt\"\nprompt = \" \"\n");
        assert!(e.contains("empty"), "{e}");
        let e = err("[[transform]]\ntype = \"stop_pattern\"\nmin_count = \"x\"\n");
        assert!(e.contains("transform[0] (stop_pattern)"), "{e}");
        let e = err("[[transform]]\nprompt = \"x\"\n");
        assert!(e.contains("type"), "{e}");
        let e = err("other = 1\n");
        assert!(e.contains("other"), "{e}");
        let mut r = registry();
        assert!(
            r.register("strip_think", Box::new(|_, ()| Err(String::new())))
                .is_err()
        );
        assert!(
            r.register("suffix", Box::new(|_, ()| Err(String::new())))
                .is_err()
        );
        assert_eq!(r.type_names().len(), BUILTIN_TRANSFORMS.len() + 1);
    }

    #[test]
    fn builtin_names_are_exactly_the_variants() {
        for name in BUILTIN_TRANSFORMS {
            if let Err(e) = toml::from_str::<TransformConfig>(&format!("type = {name:?}")) {
                assert!(!e.to_string().contains("unknown variant"), "{name}: {e}");
            }
        }
        let e = toml::from_str::<TransformConfig>("type = \"nope\"").unwrap_err();
        let listed = e.to_string().matches('`').count() / 2 - 1;
        assert_eq!(listed, BUILTIN_TRANSFORMS.len(), "{e}");
    }
}
