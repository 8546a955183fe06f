//! The origin's processors, done right: a scheduled token penalty, stop-emoji detection on the
//! decoded text, and the post-stop penalty, all with per-row state.

use serde::{Deserialize, Serialize};

use crate::error::{LogitsError, Result};
use crate::processor::{LogitsProcessor, RowContext, check_ids, check_row};

/// One window of a [`ScheduledTokenPenalty`] schedule: `steps` generated tokens with
/// `multiplier`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleWindow {
    /// How many generated tokens the window lasts.
    pub steps: usize,
    /// The penalty multiplier inside the window.
    pub multiplier: f32,
}

/// The origin's schedule: ×8 for the first 4 generated tokens, ×2 for the next 4, ×1.5 for the
/// next 4, then ×1.
pub fn default_schedule() -> Vec<ScheduleWindow> {
    [(4, 8.0), (4, 2.0), (4, 1.5)]
        .into_iter()
        .map(|(steps, multiplier)| ScheduleWindow { steps, multiplier })
        .collect()
}

/// The "emoji think" processor: subtracts `penalty × m(step)` from the logits of chosen token
/// ids, where `step` counts the tokens generated so far from 0 and `m` follows the schedule
/// (1 after its last window).
#[derive(Debug, Clone)]
pub struct ScheduledTokenPenalty {
    token_ids: Vec<u32>,
    penalty: f32,
    schedule: Vec<ScheduleWindow>,
}

impl ScheduledTokenPenalty {
    /// Penalizes `token_ids` by `penalty` (the origin's library default is 5, production 80).
    pub fn new(token_ids: Vec<u32>, penalty: f32, schedule: Vec<ScheduleWindow>) -> Result<Self> {
        const NAME: &str = "scheduled_token_penalty";
        if token_ids.is_empty() {
            return Err(LogitsError::config(NAME, "no token to penalize"));
        }
        if !penalty.is_finite() {
            return Err(LogitsError::config(
                NAME,
                format!("penalty {penalty} is not a finite number"),
            ));
        }
        if let Some(w) = schedule.iter().find(|w| !w.multiplier.is_finite()) {
            return Err(LogitsError::config(
                NAME,
                format!(
                    "schedule multiplier {} is not a finite number",
                    w.multiplier
                ),
            ));
        }
        Ok(Self {
            token_ids,
            penalty,
            schedule,
        })
    }

    /// The multiplier at generated step `step` (0 = the first generated token).
    pub fn multiplier(&self, step: usize) -> f32 {
        let mut start = 0usize;
        for w in &self.schedule {
            if step < start + w.steps {
                return w.multiplier;
            }
            start += w.steps;
        }
        1.0
    }
}

impl LogitsProcessor for ScheduledTokenPenalty {
    fn name(&self) -> &'static str {
        "scheduled_token_penalty"
    }
    fn process(&mut self, _: usize, ctx: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        check_ids(self.name(), "token_ids", &self.token_ids, logits.len())?;
        let amount = self.penalty * self.multiplier(ctx.generated().len());
        for &t in &self.token_ids {
            logits[t as usize] -= amount;
        }
        Ok(())
    }
}

/// The origin's stop emojis (the data's stop pattern picks one of them).
pub const DEFAULT_STOP_EMOJIS: [&str; 10] =
    ["🛑", "⛔", "🚫", "❌", "🔴", "⏹️", "🔚", "✋", "🚦", "🛡️"];

/// Detects a stop: the text ends with a stop emoji repeated `min_repeat..=max_repeat` times.
///
/// It looks at the decoded text, so it finds the stop whatever tokens the context made the
/// model use for it (the original pre-tokenized the emoji runs without context and could miss
/// them).
#[derive(Debug, Clone)]
pub struct StopEmojiDetector {
    /// Every emoji run, longest first.
    sequences: Vec<String>,
}

impl StopEmojiDetector {
    /// Runs of each of `emojis`, repeated `min_repeat..=max_repeat` times.
    pub fn new(emojis: &[String], min_repeat: usize, max_repeat: usize) -> Result<Self> {
        const NAME: &str = "post_stop_penalty";
        if emojis.is_empty() || emojis.iter().any(String::is_empty) {
            return Err(LogitsError::config(NAME, "needs non-empty stop emojis"));
        }
        if min_repeat == 0 || min_repeat > max_repeat {
            return Err(LogitsError::config(
                NAME,
                format!("repeats {min_repeat}..={max_repeat} must satisfy 1 ≤ min ≤ max"),
            ));
        }
        let mut sequences: Vec<String> = emojis
            .iter()
            .flat_map(|e| (min_repeat..=max_repeat).map(move |n| e.repeat(n)))
            .collect();
        sequences.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        sequences.dedup();
        Ok(Self { sequences })
    }

    /// The origin's emojis, repeated 2 to 4 times.
    pub fn origin() -> Self {
        Self {
            sequences: {
                let mut s: Vec<String> = DEFAULT_STOP_EMOJIS
                    .iter()
                    .flat_map(|e| (2..=4).map(move |n| e.repeat(n)))
                    .collect();
                s.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
                s
            },
        }
    }

    /// The stop sequence `text` ends with (the longest), if any.
    pub fn detect(&self, text: &str) -> Option<&str> {
        self.sequences
            .iter()
            .find(|s| text.ends_with(s.as_str()))
            .map(String::as_str)
    }
}

/// What the post-stop penalty saw in one row since the generation started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PostStopStats {
    /// How many times a stop sequence newly appeared at the end of the text.
    pub stops_seen: usize,
    /// How many next-token logits were penalized.
    pub hits: usize,
    /// Tokens generated after the first stop.
    pub tokens_after_stop: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct RowState {
    /// Generated length at which the first stop was complete.
    stop_at: Option<usize>,
    /// Whether the text ended with a stop at the previous call.
    ended_with_stop: bool,
    stats: PostStopStats,
}

/// Largest penalty applied, so that logits stay finite however long generation goes on.
const MAX_PENALTY: f64 = 1e30;

/// After a stop, pushes the model to end its turn: for the k-th token after the stop (k = 0
/// for the first one), every logit is lowered by `base × rate^k` and the end-of-turn ids are
/// raised by `base × rate^k + eot_reward` instead (from their original values). The penalty is
/// capped at 1e30 so logits stay finite.
#[derive(Debug, Clone)]
pub struct PostStopPenalty {
    detector: StopEmojiDetector,
    base: f32,
    rate: f32,
    eot_reward: f32,
    end_of_turn: Vec<u32>,
    rows: Vec<RowState>,
}

impl PostStopPenalty {
    /// Defaults of the origin: base 5, rate 2, reward 0 (production used 100 / 10 / 50).
    pub fn new(
        detector: StopEmojiDetector,
        base: f32,
        rate: f32,
        eot_reward: f32,
        end_of_turn_ids: Vec<u32>,
    ) -> Result<Self> {
        const NAME: &str = "post_stop_penalty";
        if end_of_turn_ids.is_empty() {
            return Err(LogitsError::config(
                NAME,
                "no end-of-turn token id to raise",
            ));
        }
        for (what, v) in [("base", base), ("rate", rate), ("eot_reward", eot_reward)] {
            if !v.is_finite() || v < 0.0 {
                return Err(LogitsError::config(
                    NAME,
                    format!("`{what}` {v} must be a non-negative number"),
                ));
            }
        }
        let mut end_of_turn = end_of_turn_ids;
        end_of_turn.sort_unstable();
        end_of_turn.dedup();
        Ok(Self {
            detector,
            base,
            rate,
            eot_reward,
            end_of_turn,
            rows: Vec::new(),
        })
    }

    /// The penalty for the k-th token after a stop.
    pub fn penalty(&self, k: usize) -> f32 {
        let k = i32::try_from(k).unwrap_or(i32::MAX);
        (f64::from(self.base) * f64::from(self.rate).powi(k)).min(MAX_PENALTY) as f32
    }

    /// Per-row statistics of the current generation.
    pub fn row_stats(&self) -> Vec<PostStopStats> {
        self.rows.iter().map(|r| r.stats).collect()
    }
}

impl LogitsProcessor for PostStopPenalty {
    fn name(&self) -> &'static str {
        "post_stop_penalty"
    }

    fn start(&mut self, rows: usize) {
        self.rows = vec![RowState::default(); rows];
    }

    fn process(&mut self, row: usize, ctx: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        check_ids(
            self.name(),
            "end-of-turn ids",
            &self.end_of_turn,
            logits.len(),
        )?;
        if row >= self.rows.len() {
            self.rows.resize(row + 1, RowState::default());
        }
        let generated = ctx.generated().len();
        let ends = self.detector.detect(ctx.text).is_some();
        let state = &mut self.rows[row];
        if ends && !state.ended_with_stop {
            state.stats.stops_seen += 1;
            state.stop_at.get_or_insert(generated);
        }
        state.ended_with_stop = ends;
        let Some(stop_at) = state.stop_at else {
            return Ok(());
        };
        let k = generated - stop_at;
        state.stats.tokens_after_stop = k;
        state.stats.hits += 1;
        let p = self.penalty(k);
        let raised: Vec<f32> = self
            .end_of_turn
            .iter()
            .map(|&t| logits[t as usize] + p + self.eot_reward)
            .collect();
        for x in logits.iter_mut() {
            *x -= p;
        }
        for (&t, v) in self.end_of_turn.iter().zip(raised) {
            logits[t as usize] = v;
        }
        Ok(())
    }

    fn stats(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.row_stats()).ok()
    }
}
