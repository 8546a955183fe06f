//! `train grpo` end to end on the tiny Qwen2 checkpoint: both prompt forms with extra columns
//! handed to the rewards, built-in and external reward functions, TRL's metric names, the
//! completions table, a seeded run reproduced exactly (and resumed exactly), several
//! iterations per batch, LoRA with a KL reference, two devices like accumulation on one; bad
//! prompts, reward files, reward commands and flags refused with the file, line and function.

use std::path::{Path, PathBuf};

use crate::common::{last_json, model, train, train_ok};

/// Eight prompts in TRL's two forms, each with an `answer` column.
fn prompts(dir: &Path) -> PathBuf {
    let mut lines = Vec::new();
    for i in 0..8 {
        let line = if i % 2 == 0 {
            serde_json::json!({"prompt": format!("What is {i} plus {i}?"), "answer": 2 * i})
        } else {
            serde_json::json!({
                "prompt": [{"role": "system", "content": "Answer with a number."},
                           {"role": "user", "content": format!("What is {i} times two?")}],
                "answer": format!("{}", 2 * i),
            })
        };
        lines.push(line.to_string());
    }
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// Rewards whose scores vary between the tiny model's (random) completions.
fn rewards(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("rewards.toml");
    std::fs::write(
        &path,
        format!(
            "[[reward]]\ntype = \"regex\"\npattern = \"(?i)[aeiou]{{2}}\"\nname = \"vowels\"\n\n\
             [[reward]]\ntype = \"exact_match\"\ncolumn = \"answer\"\nweight = 2.0\n\n\
             [[reward]]\ntype = \"soft_overlong\"\nmax_completion_len = 12\nsoft_punish_cache = 6\n\
             weight = 0.5\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// The command for these files; the defaults of the tests (2 prompts a micro-batch, 4
/// completions of at most 12 tokens each, seed 5) unless `extra` sets them.
fn with<'a>(m: &'a str, d: &'a str, r: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "grpo",
        "--model",
        m,
        "--dataset",
        d,
        "--reward",
        r,
        "--output",
        out,
    ];
    a.extend(["--learning-rate", "1e-2", "--preview-prompts", "0"]);
    for (flag, value) in [
        ("--batch-size", "2"),
        ("--num-generations", "4"),
        ("--max-new-tokens", "12"),
        ("--seed", "5"),
    ] {
        let given =
            |e: &&str| *e == flag || e.strip_prefix(flag).is_some_and(|r| r.starts_with('='));
        if !extra.iter().any(given) {
            a.extend([flag, value]);
        }
    }
    a.extend(extra);
    a
}

fn args<'a>(m: &'a str, d: &'a str, r: &'a str, out: &'a str) -> Vec<&'a str> {
    with(m, d, r, out, &[])
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn steps(out: &Path) -> Vec<serde_json::Value> {
    lines(&out.join("metrics.jsonl"))
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .collect()
}

#[test]
fn trains_reproducibly_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let d = prompts(dir.path());
    // An external scorer too: the completion's length in characters, capped (reads the JSON
    // lines with sed, prints one number per line).
    let script = dir.path().join("score.sh");
    std::fs::write(
        &script,
        "while IFS= read -r line; do\n  n=$(printf '%s' \"$line\" | sed 's/.*\"completion\":\"\\([^\"]*\\)\".*/\\1/' | wc -c)\n  \
         if [ \"$n\" -gt 20 ]; then echo 1; else echo 0; fi\ndone\n",
    )
    .unwrap();
    let r = rewards(
        dir.path(),
        &format!(
            "\n[[reward]]\ntype = \"command\"\ncommand = [\"sh\", \"{}\"]\nname = \"long\"\n",
            script.display()
        ),
    );
    let (m, d, r) = (
        m.to_str().unwrap(),
        d.to_str().unwrap(),
        r.to_str().unwrap(),
    );
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.path().join(name);
        let out_s = out.to_str().unwrap();
        let mut extra = extra.to_vec();
        extra.extend(["--max-steps", "4", "--save-steps", "2"]);
        train_ok(dir.path(), &with(m, d, r, out_s, &extra));
        out
    };
    let first = run("first", &["--json"]);
    let rows = steps(&first);
    assert_eq!(rows.len(), 4);
    for key in [
        "loss",
        "grad_norm",
        "reward",
        "reward_std",
        "rewards/vowels/mean",
        "rewards/vowels/std",
        "rewards/exact_match/mean",
        "rewards/soft_overlong/mean",
        "rewards/long/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/min_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "clip_ratio/region_mean",
    ] {
        assert!(rows.iter().all(|x| x[key].is_f64()), "{key} in {rows:?}");
    }
    assert!(
        rows.iter().all(|x| x.get("kl").is_none()),
        "no KL without β"
    );
    // The rewards vary, so the policy gets a gradient.
    assert!(
        rows.iter().any(|x| x["grad_norm"].as_f64().unwrap() > 0.0),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .all(|x| x["completions/max_length"].as_f64().unwrap() <= 12.0)
    );
    // Every completion of every step, with its rewards and advantage.
    let table = lines(&first.join("completions.jsonl"));
    assert_eq!(table.len(), 4 * 2 * 4);
    for row in &table {
        for f in ["vowels", "exact_match", "soft_overlong", "long"] {
            assert!(row["rewards"][f].is_f64(), "{row}");
        }
        assert!(row["advantage"].is_f64() && row["prompt"].is_string());
    }
    assert!(first.join("model.safetensors").exists() && first.join("checkpoint-2").is_dir());

    // The same seed: the same completions and losses. Another seed: other completions.
    let again = run("again", &[]);
    assert_eq!(
        steps(&again).iter().map(|x| &x["loss"]).collect::<Vec<_>>(),
        rows.iter().map(|x| &x["loss"]).collect::<Vec<_>>()
    );
    assert_eq!(lines(&again.join("completions.jsonl")), table);
    let other = run("other", &["--seed", "6"]);
    assert_ne!(lines(&other.join("completions.jsonl")), table);

    // Resumed from checkpoint 2 after losing the rest: steps 3 and 4 sample and train the same,
    // and the logs keep no second copy of the rows of the steps done again.
    std::fs::remove_file(again.join("model.safetensors")).unwrap();
    std::fs::remove_dir_all(again.join("checkpoint-4")).unwrap();
    let ckpt = again.join("checkpoint-2");
    run("again", &["--resume", ckpt.to_str().unwrap()]);
    assert_eq!(lines(&again.join("completions.jsonl")), table);
    let resumed: Vec<f64> = steps(&again)
        .iter()
        .map(|x| x["loss"].as_f64().unwrap())
        .collect();
    let want: Vec<f64> = rows.iter().map(|x| x["loss"].as_f64().unwrap()).collect();
    assert_eq!(resumed, want);
}

#[test]
fn iterations_lora_with_a_reference_and_two_devices() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let d = prompts(dir.path());
    let r = rewards(dir.path(), "");
    let (m, d, r) = (
        m.to_str().unwrap(),
        d.to_str().unwrap(),
        r.to_str().unwrap(),
    );
    let run = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let out = dir.path().join(name);
        train_ok(dir.path(), &with(m, d, r, out.to_str().unwrap(), extra));
        steps(&out)
    };
    // Two iterations per batch: 4 steps on 2 batches of completions; the second step of each
    // batch sees a policy that moved (ratios off 1) and the same rewards.
    let flags = [
        "--max-steps",
        "4",
        "--num-iterations",
        "2",
        "--beta",
        "0.04",
    ];
    let mu = run("mu", &flags);
    assert_eq!(mu.len(), 4);
    assert_eq!(mu[0]["reward"], mu[1]["reward"]);
    assert_eq!(mu[2]["reward"], mu[3]["reward"]);
    // Each iteration advances the epoch by its share of the batch, as TRL's dataloader (which
    // yields a batch once per iteration) counts it: four steps of two iterations over the
    // first two of four batches of prompts.
    let epochs: Vec<f64> = mu.iter().map(|r| r["epoch"].as_f64().unwrap()).collect();
    for (got, want) in epochs.iter().zip([0.125, 0.25, 0.375, 0.5]) {
        assert!((got - want).abs() < 1e-9, "{epochs:?}");
    }
    assert!(
        mu[0]["kl"].as_f64().unwrap().abs() < 1e-6,
        "the policy starts as the reference"
    );
    assert!(mu[1]["kl"].as_f64().unwrap() > 0.0);
    // With --gradient-checkpointing (each layer recomputed in the backward pass): the same
    // completions, losses and gradient norms.
    let ck = run(
        "mu-checkpointed",
        &[&flags[..], &["--gradient-checkpointing"]].concat(),
    );
    for (a, b) in mu.iter().zip(&ck) {
        for key in ["loss", "grad_norm", "reward", "kl"] {
            assert!(a[key].is_number(), "{key}");
            assert_eq!(a[key], b[key], "{key}");
        }
    }
    // LoRA with a KL reference (the base without the adapter): an adapter is saved.
    let out = dir.path().join("lora");
    let lora = run(
        "lora",
        &[
            "--max-steps",
            "2",
            "--lora-r",
            "4",
            "--beta",
            "0.1",
            "--loss-type",
            "grpo",
        ],
    );
    assert_eq!(lora.len(), 2);
    assert!(lora[0]["kl"].as_f64().unwrap().abs() < 1e-6);
    assert!(out.join("adapter_model.safetensors").exists());
    // Two workers of one micro-batch each = one worker accumulating two: the same completions
    // (seeded per step and micro-batch) and the same loss.
    let one = run(
        "one",
        &[
            "--max-steps",
            "2",
            "--batch-size",
            "1",
            "--gradient-accumulation",
            "2",
            "--no-shuffle",
        ],
    );
    let two = run(
        "two",
        &[
            "--max-steps",
            "2",
            "--batch-size",
            "1",
            "--devices",
            "2",
            "--no-shuffle",
        ],
    );
    for (a, b) in one.iter().zip(&two) {
        for key in ["loss", "reward", "completions/mean_length"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1e-2),
                "{key}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn bad_prompts_rewards_and_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let m = m.to_str().unwrap();
    let d = prompts(dir.path());
    let d = d.to_str().unwrap();
    let r = rewards(dir.path(), "");
    let r = r.to_str().unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    let refused = |a: &[&str], want: &[&str]| {
        let o = train(dir.path(), a);
        assert_ne!(o.status.code(), Some(0), "{a:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        for w in want {
            assert!(err.contains(w), "{a:?}: want {w:?} in {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.join("model.safetensors").exists());
    };
    // A row without a prompt, naming its line and the keys it has.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\"}\n{\"question\": \"b\", \"answer\": 1}\n",
    )
    .unwrap();
    refused(
        &args(m, bad.to_str().unwrap(), r, out_s),
        &["bad.jsonl:2", "`question`"],
    );
    // A prompt ending with an assistant turn.
    std::fs::write(
        &bad,
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    )
    .unwrap();
    refused(
        &args(m, bad.to_str().unwrap(), r, out_s),
        &["bad.jsonl:1", "prompt[1].role"],
    );
    // Reward files.
    for (text, want) in [
        ("[[reward]]\ntype = \"telepathy\"\n", "reward 1"),
        ("[[reward]]\ntype = \"regex\"\npattern = \"(\"\n", "pattern"),
        ("", "no [[reward]] table"),
        ("not toml at all [", "rewards.toml"),
    ] {
        let f = dir.path().join("bad_rewards.toml");
        std::fs::write(&f, text).unwrap();
        refused(
            &args(m, d, f.to_str().unwrap(), out_s),
            &["rewards.toml", want],
        );
    }
    refused(
        &args(m, d, "/nonexistent/r.toml", out_s),
        &["/nonexistent/r.toml"],
    );
    // A reward that fails while training names the function and the row; what was saved stays.
    let f = dir.path().join("bad_rewards.toml");
    std::fs::write(
        &f,
        "[[reward]]\ntype = \"exact_match\"\ncolumn = \"solution\"\n",
    )
    .unwrap();
    let mut a = args(m, d, f.to_str().unwrap(), out_s);
    a.extend(["--max-steps", "2"]);
    refused(
        &a,
        &["exact_match", "prompts.jsonl:", "`solution`", "`answer`"],
    );
    std::fs::write(
        &f,
        "[[reward]]\ntype = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; echo broken >&2; exit 2\"]\nname = \"judge\"\n",
    )
    .unwrap();
    let o = train(dir.path(), &a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("judge") && err.contains("broken"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "one error line: {err}");
    // Flags.
    for (flag, value, want) in [
        ("--num-generations", "1", "num_generations"),
        ("--temperature", "0", "temperature"),
        ("--beta", "-1", "beta"),
        ("--epsilon", "1.5", "epsilon"),
        ("--num-iterations", "0", "num_iterations"),
        ("--loss-type", "ppo", "--loss-type"),
        ("--max-new-tokens", "0", "max_new_tokens"),
    ] {
        let given = format!("{flag}={value}");
        refused(&with(m, d, r, out_s, &[&given]), &[want]);
    }
    for flag in [
        &["--packing"][..],
        &["--thinking-pattern"],
        &["--system-prompt", "Hi"],
    ] {
        let mut a = args(m, d, r, out_s);
        a.extend(flag);
        refused(&a, &[flag[0]]);
    }
    // Far too many tokens per micro-batch.
    refused(
        &with(
            m,
            d,
            r,
            out_s,
            &["--num-generations", "1024", "--max-new-tokens", "100000"],
        ),
        &["max_new_tokens"],
    );
    // A prompt longer than --max-length: refused naming its line, dropped with --truncation drop.
    let long = dir.path().join("long.jsonl");
    let mut text = std::fs::read_to_string(d).unwrap();
    text.push_str(&serde_json::json!({"prompt": "word ".repeat(300)}).to_string());
    text.push('\n');
    std::fs::write(&long, text).unwrap();
    let mut a = args(m, long.to_str().unwrap(), r, out_s);
    a.extend(["--max-length", "64", "--max-steps", "1"]);
    refused(&a, &["long.jsonl:9", "max_length 64"]);
    a.extend(["--truncation", "drop", "--json"]);
    let o = train_ok(dir.path(), &a);
    assert_eq!(last_json(&o)["status"], "completed");
}
