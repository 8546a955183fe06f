//! Properties of the processors: what top-p / top-k keep, what the origin's penalties change,
//! per-row state, stop strings across token boundaries, and no panic whatever the input.

use proptest::prelude::*;
use train_logits::{
    LogitsProcessor, PostStopPenalty, ProcessorContext, ProcessorsFile, RowContext,
    ScheduledTokenPenalty, StopEmojiDetector, StopStrings, TopK, TopP, default_schedule, softmax,
};

fn logits(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-20.0f32..20.0, n)
}

proptest! {
    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p(l in logits(40), p in 0.05f32..0.95) {
        let probs = softmax(&l);
        let mut out = l.clone();
        TopP::new(p, 1).unwrap().process(0, &RowContext::new(&[], 0), &mut out).unwrap();
        let kept: Vec<usize> = (0..l.len()).filter(|&i| out[i] > f32::NEG_INFINITY).collect();
        prop_assert!(!kept.is_empty());
        let mass: f32 = kept.iter().map(|&i| probs[i]).sum();
        prop_assert!(mass >= p - 1e-5, "kept mass {mass} < {p}");
        // Minimal: without its least likely member the set no longer reaches p.
        let least = kept.iter().copied().min_by(|&a, &b| probs[a].total_cmp(&probs[b])).unwrap();
        prop_assert!(kept.len() == 1 || mass - probs[least] < p + 1e-5);
        // Kept tokens are the most likely ones, and keep their logits.
        let removed_max = (0..l.len()).filter(|i| !kept.contains(i)).map(|i| probs[i]).fold(0.0f32, f32::max);
        prop_assert!(kept.iter().all(|&i| probs[i] >= removed_max && out[i] == l[i]));
    }

    #[test]
    fn top_k_keeps_the_k_largest(l in logits(30), k in 1usize..40) {
        let mut out = l.clone();
        TopK::new(k, 1).unwrap().process(0, &RowContext::new(&[], 0), &mut out).unwrap();
        let kept = out.iter().filter(|x| **x > f32::NEG_INFINITY).count();
        prop_assert!(kept >= k.min(l.len()));
        let min_kept = (0..l.len()).filter(|&i| out[i] > f32::NEG_INFINITY).map(|i| l[i]).fold(f32::INFINITY, f32::min);
        prop_assert!((0..l.len()).filter(|&i| out[i] == f32::NEG_INFINITY).all(|i| l[i] < min_kept));
    }

    #[test]
    fn post_stop_penalty_raises_exactly_the_end_of_turn_ids(
        l in logits(50),
        eot in prop::collection::btree_set(0u32..50, 1..4),
        base in 0.5f32..10.0,
        rate in 1.0f32..3.0,
        reward in 0.0f32..5.0,
        after in 0usize..5,
    ) {
        let eot: Vec<u32> = eot.into_iter().collect();
        let mut p = PostStopPenalty::new(StopEmojiDetector::origin(), base, rate, reward, eot.clone()).unwrap();
        p.start(1);
        // Tokens 0..3 are text, then the stop, then `after` more tokens.
        let mut ids = vec![1u32; 3 + after];
        let mut text = String::from("ok\n🛑🛑");
        let mut out = l.clone();
        p.process(0, &RowContext::new(&ids[..3], 0).with_text("ok"), &mut out).unwrap();
        prop_assert_eq!(&out, &l, "nothing before a stop");
        for k in 0..=after {
            ids.truncate(3 + k);
            ids.resize(3 + k, 1);
            let mut out = l.clone();
            p.process(0, &RowContext::new(&ids, 0).with_text(&text), &mut out).unwrap();
            let pen = base * rate.powi(i32::try_from(k).unwrap());
            for (t, (&o, &x)) in out.iter().zip(&l).enumerate() {
                let want = if eot.contains(&(t as u32)) { x + pen + reward } else { x - pen };
                prop_assert!((o - want).abs() <= 1e-4 * want.abs().max(1.0), "token {}: {} vs {}", t, o, want);
            }
            text.push('x');
        }
        let s = p.row_stats()[0];
        prop_assert_eq!((s.stops_seen, s.hits, s.tokens_after_stop), (1, after + 1, after));
    }

    #[test]
    fn scheduled_penalty_follows_the_schedule(l in logits(20), step in 0usize..20, penalty in 0.0f32..100.0) {
        let mut p = ScheduledTokenPenalty::new(vec![2, 5], penalty, default_schedule()).unwrap();
        let m = [8.0, 8.0, 8.0, 8.0, 2.0, 2.0, 2.0, 2.0, 1.5, 1.5, 1.5, 1.5].get(step).copied().unwrap_or(1.0);
        prop_assert_eq!(p.multiplier(step), m);
        let ids = vec![0u32; 3 + step];
        let mut out = l.clone();
        p.process(0, &RowContext::new(&ids, 3), &mut out).unwrap();
        for (t, (&o, &x)) in out.iter().zip(&l).enumerate() {
            let want = if t == 2 || t == 5 { x - penalty * m } else { x };
            prop_assert_eq!(o, want);
        }
    }

    #[test]
    fn stop_strings_match_across_token_boundaries(
        prefix in "[a-z ]{0,12}",
        cuts in prop::collection::vec(1usize..5, 1..12),
    ) {
        let stop = "END🛑";
        let text = format!("{prefix}{stop}tail");
        // Split the text into "tokens" at char boundaries.
        let chars: Vec<char> = text.chars().collect();
        let mut pieces = Vec::new();
        let mut i = 0;
        for c in cuts.iter().cycle() {
            if i >= chars.len() { break; }
            let j = (i + c).min(chars.len());
            pieces.push(chars[i..j].iter().collect::<String>());
            i = j;
        }
        let s = StopStrings::new(vec![stop.to_string()]);
        let mut before = String::new();
        let mut found = None;
        for (k, piece) in pieces.iter().enumerate() {
            let after = format!("{before}{piece}");
            if s.completed(&before, &after).is_some() { found = Some(k); break; }
            before = after;
        }
        // It stops at the first piece whose text contains the whole stop string.
        let mut acc = String::new();
        let want = pieces.iter().position(|p| { acc.push_str(p); acc.contains(stop) });
        prop_assert_eq!(found, want);
    }

    #[test]
    fn processors_never_panic(
        l in prop::collection::vec(prop_oneof![Just(f32::NAN), Just(f32::NEG_INFINITY), Just(f32::INFINITY), -1e30f32..1e30], 0..24),
        ids in prop::collection::vec(0u32..20, 0..8),
        which in 0usize..14,
    ) {
        let configs = [
            r#"type = "temperature"
temperature = 0.5"#,
            r#"type = "top_k"
top_k = 3"#,
            r#"type = "top_p"
top_p = 0.5"#,
            r#"type = "min_p"
min_p = 0.2"#,
            r#"type = "typical"
typical_p = 0.5"#,
            r#"type = "repetition_penalty"
penalty = 1.5"#,
            r#"type = "no_repeat_ngram"
ngram_size = 2"#,
            r#"type = "min_new_tokens"
min_new_tokens = 3"#,
            r#"type = "suppress_tokens"
token_ids = [1, 50]"#,
            r#"type = "sequence_bias"
biases = [{sequence = [1, 2], bias = 1.0}, {sequence = [15], bias = -2.0}]"#,
            r#"type = "bad_words"
sequences = [[1, 2], [3]]"#,
            r#"type = "forced_eos"
max_length = 4"#,
            r#"type = "emoji_think"
token_ids = [4, 11]"#,
            r#"type = "post_stop_penalty""#,
        ];
        let file = ProcessorsFile::from_toml(&format!("[[processors]]\n{}", configs[which]), "p.toml".as_ref()).unwrap();
        let ctx = ProcessorContext { tokenizer: None, end_ids: &[0, 7] };
        let mut p = file.processors[0].build(&ctx).unwrap();
        p.start(1);
        let mut out = l.clone();
        let row = RowContext::new(&ids, ids.len() / 2).with_text("a🛑🛑");
        // An error is fine (empty row, ids outside a short vocabulary); a panic is not.
        let r = p.process(0, &row, &mut out);
        if l.is_empty() {
            prop_assert!(r.is_err());
        } else if l.len() > 15 {
            // Every id the configurations name fits: it must work, and keep the row's length.
            prop_assert!(r.is_ok(), "{:?}", r);
            prop_assert_eq!(out.len(), l.len());
        }
    }
}

#[test]
fn post_stop_state_is_per_row_and_restarts() {
    let mut p = PostStopPenalty::new(StopEmojiDetector::origin(), 5.0, 2.0, 0.0, vec![0]).unwrap();
    p.start(2);
    let l = vec![1.0f32; 4];
    let ids = [9u32, 9, 9];
    // Row 1 stops; row 0 (processed after it) must be untouched.
    let mut out1 = l.clone();
    p.process(
        1,
        &RowContext::new(&ids, 1).with_text("done ⛔⛔⛔"),
        &mut out1,
    )
    .unwrap();
    let mut out0 = l.clone();
    p.process(
        0,
        &RowContext::new(&ids, 1).with_text("still going"),
        &mut out0,
    )
    .unwrap();
    assert_eq!(out1, [6.0, -4.0, -4.0, -4.0]);
    assert_eq!(out0, l);
    let stats = p.stats().unwrap();
    assert_eq!(stats[1]["stops_seen"], 1);
    assert_eq!(stats[0]["stops_seen"], 0);
    // A new generation forgets everything.
    p.start(2);
    let mut again = l.clone();
    p.process(1, &RowContext::new(&ids, 1).with_text("fresh"), &mut again)
        .unwrap();
    assert_eq!(again, l);
    assert_eq!(p.stats().unwrap()[1]["hits"], 0);
}

#[test]
fn stop_emoji_detection_takes_the_longest_run_and_needs_two() {
    let d = StopEmojiDetector::origin();
    assert_eq!(d.detect("answer\n🛑🛑🛑🛑"), Some("🛑🛑🛑🛑"));
    assert_eq!(d.detect("answer\n⏹️⏹️"), Some("⏹️⏹️"));
    assert_eq!(d.detect("answer\n🛑"), None);
    assert_eq!(d.detect("🛑🛑 and more"), None);
    assert!(StopEmojiDetector::new(&[], 2, 4).is_err());
    assert!(StopEmojiDetector::new(&["x".into()], 3, 2).is_err());
}

#[test]
fn bad_settings_are_errors_naming_the_processor() {
    let ctx = ProcessorContext {
        tokenizer: None,
        end_ids: &[],
    };
    for (toml, what) in [
        ("type = \"temperature\"\ntemperature = 0.0", "temperature"),
        ("type = \"top_p\"\ntop_p = 1.5", "top_p"),
        ("type = \"top_k\"\ntop_k = 0", "top_k"),
        ("type = \"typical\"\ntypical_p = 1.0", "typical"),
        ("type = \"forced_eos\"\nmax_length = 3", "forced_eos"),
        ("type = \"post_stop_penalty\"", "post_stop_penalty"),
        (
            "type = \"scheduled_token_penalty\"\ntokens = [\"<think>\"]",
            "scheduled_token_penalty",
        ),
    ] {
        let file = ProcessorsFile::from_toml(&format!("[[processors]]\n{toml}"), "p.toml".as_ref())
            .unwrap();
        let err = file.processors[0].build(&ctx).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
    let err = ProcessorsFile::from_toml("[[processors]]\ntype = \"top_q\"", "p.toml".as_ref())
        .unwrap_err();
    assert!(
        err.to_string().contains("p.toml") && err.to_string().contains("top_q"),
        "{err}"
    );
    let unknown = ProcessorsFile::from_toml(
        "[[processors]]\ntype = \"top_k\"\ntop_k = 2\ntopk = 3",
        "p.toml".as_ref(),
    );
    assert!(unknown.is_err());
}
