//! The adversarial campaign, kept: commands and inputs a careless or hostile user would try,
//! run against the `train` binary under a memory cap (`ulimit -v`) and a time limit. Each case
//! asserts a clean refusal (exit 1 or 2, the culprit named, no panic, no backtrace) or the
//! documented outcome, and that nothing already saved changed. The counts are printed for
//! `docs/reliability.md` (`--nocapture`).
#![cfg(feature = "cpu")]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{base, data, model, root};
use train_runner::load_state;
use train_runner::{list_checkpoints, verify_checkpoint};

/// Address space a case may use (the tiny runs need well under 1 GiB resident; mimalloc and the
/// thread pools reserve more address space than they touch).
const MEMORY_KB: u64 = 8 << 20;
/// Wall-clock limit of one case: a hang fails the test instead of stalling CI.
const LIMIT: Duration = Duration::from_secs(120);

struct Outcome {
    code: Option<i32>,
    stderr: String,
    stdout: String,
    seconds: f64,
}

/// Runs `train ARGS` under the memory cap and the time limit (killed past it, and reported as a
/// hang).
fn bounded(dir: &Path, args: &[&str]) -> Outcome {
    bounded_with(dir, "", args)
}

/// [`bounded`], with `shell` (e.g. more limits) run first in the same shell.
fn bounded_with(dir: &Path, shell: &str, args: &[&str]) -> Outcome {
    // One line per command, counted for docs/reliability.md (`--nocapture`).
    eprintln!("hostile case: {shell} train {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -v {MEMORY_KB}; {shell} exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .env("TRAIN_MODEL_REGISTRY", dir.join("models.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`train {}` hung: killed after {} s",
                args.join(" "),
                LIMIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Asserts a clean refusal: one of `codes`, `culprit` in the message, no panic.
fn refused(o: &Outcome, codes: &[i32], culprit: &str) {
    assert!(
        o.code.is_some_and(|c| codes.contains(&c)),
        "exit {:?} (expected one of {codes:?}):\n{}",
        o.code,
        o.stderr
    );
    // (`data check` prints its problems on stdout.)
    assert!(
        o.stderr.contains(culprit) || o.stdout.contains(culprit),
        "the message does not name {culprit:?}:\n{}{}",
        o.stderr,
        o.stdout
    );
    clean(o);
}

/// No panic, no backtrace, no internal error.
fn clean(o: &Outcome) {
    for bad in [
        "panicked",
        "RUST_BACKTRACE",
        "internal error",
        "stack backtrace",
    ] {
        assert!(!o.stderr.contains(bad), "{bad} in:\n{}", o.stderr);
    }
}

fn ok(o: &Outcome) {
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    clean(o);
}

/// Every file under `dir` (but the lock file and the data cache, which any run rewrites) and
/// its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new(".train.lock") || rel.starts_with(".cache") {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn assert_unchanged(before: &BTreeMap<PathBuf, Vec<u8>>, dir: &Path) {
    let after = snapshot(dir);
    let changed: Vec<&PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(changed.is_empty(), "files changed: {changed:?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `train` with the quick flags and `extra`.
fn run(dir: &Path, m: &Path, d: &Path, out: &Path, extra: &[&str]) -> Outcome {
    let mut args = base(m, d, out);
    args.extend(["--eval-steps", "100", "--preview-prompts", "0"]);
    args.extend(extra);
    bounded(dir, &args)
}

fn names(out: &Path) -> Vec<String> {
    list_checkpoints(out)
        .iter()
        .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn resuming_an_older_checkpoint_never_deletes_the_newer_line() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    let steps = ["--save-steps", "1", "--save-total-limit", "2"];
    ok(&run(
        dir.path(),
        &m,
        &d,
        &out,
        &[&["--max-steps", "4"][..], &steps].concat(),
    ));
    assert_eq!(names(&out), ["checkpoint-3", "checkpoint-4"]);
    let newer = snapshot(&out.join("checkpoint-4"));
    let before = snapshot(&out);
    let older = out.join("checkpoint-3");
    let older = older.to_str().unwrap();
    // Without --yes: refused, nothing changed.
    let o = run(
        dir.path(),
        &m,
        &d,
        &out,
        &[&["--max-steps", "6", "--resume", older][..], &steps].concat(),
    );
    refused(&o, &[1], "would abandon checkpoint-4");
    // The library states the fact; the binary says what to do.
    assert!(
        o.stderr
            .contains("; resume from the newest (a bare --resume), or pass --yes to move them"),
        "{}",
        o.stderr
    );
    assert_unchanged(&before, &out);
    // With --yes: the newer checkpoint is moved aside whole, and rotation keeps the new line.
    let o = run(
        dir.path(),
        &m,
        &d,
        &out,
        &[
            &["--max-steps", "6", "--resume", older, "--yes"][..],
            &steps,
        ]
        .concat(),
    );
    ok(&o);
    assert!(o.stderr.contains("moved checkpoint-4 to"), "{}", o.stderr);
    assert_eq!(names(&out), ["checkpoint-5", "checkpoint-6"]);
    let aside: Vec<PathBuf> = std::fs::read_dir(out.join("set-aside"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(aside.len(), 1);
    assert!(
        aside[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("abandoned-after-step-3-")
    );
    assert_eq!(snapshot(&aside[0].join("checkpoint-4")), newer);
    verify_checkpoint(&aside[0].join("checkpoint-4")).unwrap();
}

#[test]
fn a_yes_restart_leaves_no_checkpoint_of_the_old_run_for_a_bare_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    ok(&run(
        dir.path(),
        &m,
        &d,
        &out,
        &["--max-steps", "2", "--save-steps", "1"],
    ));
    let old_run = load_state(&out.join("checkpoint-2")).unwrap().run_id;
    let old = snapshot(&out.join("checkpoint-2"));
    // Restart for 1 step with --yes: the old run's checkpoints are set aside before any save.
    let o = run(
        dir.path(),
        &m,
        &d,
        &out,
        &["--max-steps", "1", "--save-steps", "1", "--yes"],
    );
    ok(&o);
    assert_eq!(names(&out), ["checkpoint-1"]);
    let new_run = load_state(&out.join("checkpoint-1")).unwrap().run_id;
    assert_ne!(new_run, old_run);
    let aside = std::fs::read_dir(out.join("set-aside"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    assert_eq!(snapshot(&aside.join("checkpoint-2")), old);
    // A bare --resume continues the new run, and says which.
    let o = run(
        dir.path(),
        &m,
        &d,
        &out,
        &["--max-steps", "2", "--save-steps", "1", "--resume"],
    );
    ok(&o);
    assert!(
        o.stderr.contains(&format!("resuming run {new_run} from")),
        "{}",
        o.stderr
    );
}

#[test]
fn resuming_with_another_model_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    ok(&run(dir.path(), &m, &d, &out, &["--max-steps", "1"]));
    // Another architecture (qwen3's config and weights) with the same tokenizer files.
    let other = dir.path().join("other");
    copy_dir(
        &root().join("crates/train-model/tests/fixtures/qwen3"),
        &other,
    );
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        std::fs::copy(m.join(f), other.join(f)).unwrap();
    }
    let before = snapshot(&out);
    let o = run(
        dir.path(),
        &other,
        &d,
        &out,
        &["--max-steps", "2", "--resume"],
    );
    refused(&o, &[1], "it was trained from");
    assert!(o.stderr.contains("other"), "{}", o.stderr);
    assert!(o.stderr.contains("; resume with --model "), "{}", o.stderr);
    assert_unchanged(&before, &out);
}

#[test]
fn no_command_replaces_a_model_without_yes_or_writes_into_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path(), 24);
    // A private copy of the base model, so that nothing here can touch the repository's.
    let m = dir.path().join("base");
    copy_dir(&model(), &m);
    let base_before = snapshot(&m);
    let out = dir.path().join("lora");
    ok(&run(
        dir.path(),
        &m,
        &d,
        &out,
        &["--max-steps", "1", "--lora-r", "4"],
    ));
    let run_before = snapshot(&out);
    let merge = |output: &Path, extra: &[&str]| {
        let mut args = vec!["merge", out.to_str().unwrap(), "--output"];
        args.push(output.to_str().unwrap());
        args.extend(extra);
        bounded(dir.path(), &args)
    };
    let ckpt = out.join("checkpoint-1");
    refused(&merge(&ckpt, &["--yes"]), &[1], "saved training checkpoint");
    refused(
        &merge(&m, &["--yes"]),
        &[1],
        "never writes into its own inputs",
    );
    refused(
        &merge(&out, &["--yes"]),
        &[1],
        "never writes into its own inputs",
    );
    let merged = dir.path().join("merged");
    ok(&merge(&merged, &[]));
    let merged_before = snapshot(&merged);
    let o = merge(&merged, &[]);
    refused(&o, &[1], "already holds a model");
    assert!(
        o.stderr
            .contains("; pass --yes to replace it, or choose another --output"),
        "{}",
        o.stderr
    );
    assert_unchanged(&merged_before, &merged);
    ok(&merge(&merged, &["--yes"]));
    // `train` into its own model, and into a directory holding a model but no checkpoints.
    refused(
        &run(dir.path(), &m, &d, &m, &["--max-steps", "1", "--yes"]),
        &[1],
        "never writes into its own inputs",
    );
    // Not even the data cache or the lock goes into it (the snapshots leave those two out).
    for written in [".cache", ".train.lock"] {
        assert!(
            !m.join(written).exists(),
            "{written} written into the model"
        );
    }
    // Nor into the base of an adapter given as the model.
    refused(
        &run(dir.path(), &out, &d, &m, &["--max-steps", "1", "--yes"]),
        &[1],
        "never writes into its own inputs",
    );
    for written in [".cache", ".train.lock"] {
        assert!(
            !m.join(written).exists(),
            "{written} written into the base model"
        );
    }
    let merged_now = snapshot(&merged);
    refused(
        &run(dir.path(), &m, &d, &merged, &["--max-steps", "1"]),
        &[1],
        "already holds a model",
    );
    assert_unchanged(&merged_now, &merged);
    assert_unchanged(&base_before, &m);
    assert_unchanged(&run_before, &out);
    // Adapter settings that select nothing the weights carry are errors, not no-ops.
    for (name, key, value, culprit) in [
        (
            "layers",
            "layers_to_transform",
            serde_json::json!([99]),
            "layers_to_transform",
        ),
        (
            "targets",
            "target_modules",
            serde_json::json!(["q_proj", "v_proj", "no_such_proj"]),
            "no_such_proj",
        ),
    ] {
        let bad = dir.path().join(format!("adapter-{name}"));
        copy_dir(&out, &bad);
        let path = bad.join("adapter_config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config[key] = value;
        std::fs::write(&path, config.to_string()).unwrap();
        let o = bounded(
            dir.path(),
            &[
                "eval",
                "--model",
                bad.to_str().unwrap(),
                "--dataset",
                d.to_str().unwrap(),
            ],
        );
        refused(&o, &[1], culprit);
    }
}

#[test]
fn a_sealed_checkpoint_is_exactly_what_it_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    ok(&run(
        dir.path(),
        &m,
        &d,
        &out,
        &["--max-steps", "2", "--save-steps", "1"],
    ));
    let ck2 = out.join("checkpoint-2");
    // An index and a shard added after the seal: refused, naming them.
    std::fs::write(
        ck2.join("model.safetensors.index.json"),
        "{\"weight_map\": {}}",
    )
    .unwrap();
    std::fs::copy(
        ck2.join("model.safetensors"),
        ck2.join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    let o = run(
        dir.path(),
        &m,
        &d,
        &out,
        &["--max-steps", "3", "--resume", ck2.to_str().unwrap()],
    );
    refused(&o, &[1], "model.safetensors.index.json");
    assert!(
        o.stderr.contains("not part of the checkpoint"),
        "{}",
        o.stderr
    );
    // A missing trainer state is reported like other damage.
    let ck1 = out.join("checkpoint-1");
    std::fs::remove_file(ck1.join("trainer_state.json")).unwrap();
    let o = run(
        dir.path(),
        &m,
        &d,
        &out,
        &["--max-steps", "3", "--resume", ck1.to_str().unwrap()],
    );
    refused(&o, &[1], "trainer_state.json is missing");
    let o = run(dir.path(), &m, &d, &out, &["--max-steps", "3", "--resume"]);
    refused(&o, &[1], "no intact checkpoint");
    assert!(
        o.stderr.contains("skipping checkpoint-1: ")
            && o.stderr.contains("trainer_state.json is missing"),
        "{}",
        o.stderr
    );
}

#[test]
fn control_and_status_know_when_no_run_is_alive() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    std::fs::create_dir_all(&out).unwrap();
    // No live run: `control` is an error.
    for cmd in ["stop", "pause"] {
        let o = bounded(dir.path(), &["control", cmd, out.to_str().unwrap()]);
        refused(&o, &[1], "no live run");
    }
    // A stale control file (another process, a clock in the future) does not pause a new run.
    std::fs::write(
        out.join("control.json"),
        r#"{"command": "pause", "pid": "1", "requested_at": 99999999999.0}"#,
    )
    .unwrap();
    ok(&run(dir.path(), &m, &d, &out, &["--max-steps", "2"]));
    // `status --watch` on a run whose process was killed says so and ends.
    let mut args = base(&m, &d, &out);
    args.extend(["--max-steps", "100000", "--save-steps", "100000", "--yes"]);
    let (mut child, _lines) = crate::common::spawn_until(dir.path(), &args, "step 1/");
    child.kill().unwrap();
    child.wait().unwrap();
    let o = bounded(dir.path(), &["status", out.to_str().unwrap(), "--watch"]);
    refused(&o, &[1], "is not running");
}

#[test]
fn counts_and_sizes_are_bounded_where_they_are_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 8), dir.path().join("out"));
    // Without the quick flags: these set --max-length and --batch-size themselves.
    let raw = |extra: &[&str]| {
        let mut args = vec![
            "--model",
            m.to_str().unwrap(),
            "--dataset",
            d.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        bounded(dir.path(), &args)
    };
    let cases: &[(&[&str], &str)] = &[
        (&["--lora-r", "1000000000000"], "--lora-r"),
        (
            &["--gradient-accumulation", "18446744073709551615"],
            "--gradient-accumulation",
        ),
        (&["--devices", "100000"], "--devices"),
        (&["--nodes", "100000"], "--nodes"),
        (
            &["--max-length", "100000000000", "--packing"],
            "--max-length",
        ),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--batch-size", "99999999999"], "--batch-size"),
        (&["--epochs", "18446744073709551615"], "--epochs"),
        (
            &["--preview-max-new-tokens", "99999999999"],
            "--preview-max-new-tokens",
        ),
    ];
    for (extra, flag) in cases {
        refused(&raw(extra), &[2], flag);
    }
    // The product of two bounded values is bounded too.
    let o = raw(&[
        "--max-length",
        "1048576",
        "--batch-size",
        "65536",
        "--packing",
    ]);
    refused(&o, &[1, 2], "max_length");
    // The same through --config, and a transform count.
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "lora_r = 1000000000000\n").unwrap();
    let o = run(
        dir.path(),
        &m,
        &d,
        &out,
        &["--config", cfg.to_str().unwrap()],
    );
    refused(&o, &[1, 2], "--lora-r");
    let t = dir.path().join("t.toml");
    std::fs::write(
        &t,
        "[[transform]]\ntype = \"thinking_pattern\"\nmin_count = 1\nmax_count = 1000000000000\n",
    )
    .unwrap();
    let o = run(
        dir.path(),
        &m,
        &d,
        &out,
        &["--transforms", t.to_str().unwrap()],
    );
    refused(&o, &[1], "max_count");
    assert!(!out.join("checkpoint-1").exists());
}

/// A FIFO at `path` (nothing ever writes to it: whoever opens it for reading would wait forever).
fn fifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success());
}

#[test]
fn special_files_and_broken_model_directories_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 8), dir.path().join("out"));
    let pipe = dir.path().join("pipe");
    fifo(&pipe);
    let p = pipe.to_str().unwrap();
    for flag in ["--config", "--alerts", "--transforms", "--processors"] {
        let o = run(dir.path(), &m, &d, &out, &[flag, p, "--max-steps", "1"]);
        refused(&o, &[1, 2], "not a regular file");
    }
    // A model directory whose config.json is a FIFO, whose weights are a FIFO.
    for file in ["config.json", "model.safetensors"] {
        let bad = dir.path().join(format!("bad-{file}"));
        copy_dir(&m, &bad);
        std::fs::remove_file(bad.join(file)).unwrap();
        fifo(&bad.join(file));
        let o = run(dir.path(), &bad, &d, &out, &["--max-steps", "1"]);
        refused(&o, &[1], "not a regular file");
    }
    // A directory as the dataset: the reason once.
    let o = run(dir.path(), &m, dir.path(), &out, &["--max-steps", "1"]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    clean(&o);
    if let Some(reason) = o.stderr.find("(os error") {
        let tail = &o.stderr[reason..];
        let first = &tail[..tail.find(')').unwrap() + 1];
        assert_eq!(o.stderr.matches(first).count(), 1, "{}", o.stderr);
    }
    // `train export` of a model whose tokenizer.json, or whose chat template, is a FIFO: named,
    // never waited on; no file written.
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        let bad = dir.path().join(format!("export-{file}"));
        copy_dir(&m, &bad);
        let _ = std::fs::remove_file(bad.join(file));
        fifo(&bad.join(file));
        let gguf = dir.path().join(format!("{file}.gguf"));
        let o = bounded(
            dir.path(),
            &[
                "export",
                bad.to_str().unwrap(),
                "--format",
                "gguf",
                "--output",
                gguf.to_str().unwrap(),
            ],
        );
        if file == "tokenizer.json" {
            refused(&o, &[1], "not a regular file");
            assert!(!gguf.exists());
        } else {
            // Optional files: skipped (the export goes on without them), not waited on.
            assert_eq!(o.code, Some(0), "{file}: {}", o.stderr);
        }
    }
    // max_position_embeddings 0 is named, not a NaN downstream.
    let zero = dir.path().join("zero");
    copy_dir(&m, &zero);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(zero.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = 0.into();
    std::fs::write(zero.join("config.json"), config.to_string()).unwrap();
    let o = run(dir.path(), &zero, &d, &out, &["--max-steps", "1"]);
    refused(&o, &[1], "max_position_embeddings");
    // A tokenizer whose ids exceed the model's vocabulary (qwen3's tokenizer on qwen2's 959
    // embedding rows).
    let mixed = dir.path().join("mixed");
    copy_dir(&m, &mixed);
    std::fs::copy(
        root().join("crates/train-model/tests/fixtures/qwen3/tokenizer.json"),
        mixed.join("tokenizer.json"),
    )
    .unwrap();
    let o = run(dir.path(), &mixed, &d, &out, &["--max-steps", "1"]);
    refused(&o, &[1], "vocab_size");
    let o = bounded(
        dir.path(),
        &[
            "eval",
            "--model",
            mixed.to_str().unwrap(),
            "--dataset",
            d.to_str().unwrap(),
        ],
    );
    refused(&o, &[1], "vocab_size");
    let o = bounded(
        dir.path(),
        &[
            "generate",
            "--model",
            mixed.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
    );
    refused(&o, &[1], "vocab_size");
    assert!(!out.join("checkpoint-1").exists());
}

#[test]
fn eval_of_nothing_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let m = model();
    let o = bounded(
        dir.path(),
        &[
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--dataset",
            empty.to_str().unwrap(),
        ],
    );
    refused(&o, &[1], "empty.jsonl");
    assert!(!o.stdout.contains("\"loss\": 0"), "{}", o.stdout);
    eprintln!("eval of an empty file: {:.1} s", o.seconds);
}

#[test]
fn a_final_save_on_a_full_disk_leaves_the_previous_model_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    ok(&run(dir.path(), &m, &d, &out, &["--max-steps", "2"]));
    let before = snapshot(&out);
    // Resuming the completed run only writes the final model again; under a 100 kB file-size
    // limit (SIGXFSZ ignored, so writes fail with EFBIG as on a full disk) that fails.
    let mut args = base(&m, &d, &out);
    args.extend([
        "--eval-steps",
        "100",
        "--preview-prompts",
        "0",
        "--max-steps",
        "2",
        "--resume",
    ]);
    let o = bounded_with(dir.path(), "trap '' XFSZ; ulimit -f 100;", &args);
    refused(&o, &[1], "File too large");
    // The final model of the first run is still there, whole; nothing half-written is left.
    let after = snapshot(&out);
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(
            before.get(Path::new(name)),
            after.get(Path::new(name)),
            "{name}"
        );
    }
    let hidden: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".staging") || n.contains(".tmp"))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    // Without the limit the same command completes.
    ok(&bounded(dir.path(), &args));
}

/// A private copy of the qwen3 fixture whose chat template and tokenizer a case may change.
fn qwen3_copy(dir: &Path, name: &str) -> PathBuf {
    let m = dir.join(name);
    copy_dir(&root().join("crates/train-model/tests/fixtures/qwen3"), &m);
    m
}

fn one_row(user: &str, assistant: &str) -> String {
    serde_json::json!({"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant}
    ]})
    .to_string()
        + "\n"
}

#[test]
fn hostile_data_files_are_refused_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let check = |path: &Path| bounded(dir.path(), &["data", "check", path.to_str().unwrap()]);
    // A FIFO as the dataset: refused at once, for `data check` and for a run.
    let pipe = dir.path().join("pipe.jsonl");
    fifo(&pipe);
    refused(&check(&pipe), &[1], "not a regular file");
    let out = dir.path().join("out");
    refused(
        &run(dir.path(), &m, &pipe, &out, &["--max-steps", "1"]),
        &[1],
        "not a regular file",
    );
    // An empty file is an error for `data check`.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    refused(&check(&empty), &[1], "empty");
    // One line over 64 MiB: named by file and line, without being kept in memory.
    let long = dir.path().join("long.jsonl");
    std::fs::write(&long, vec![b'x'; (64 << 20) + 16]).unwrap();
    refused(&check(&long), &[1], "long.jsonl:1");
    // A 2 MiB word without whitespace would reach BPE: refused per field.
    let word = dir.path().join("word.jsonl");
    std::fs::write(&word, one_row("Hi", &"a".repeat(2 << 20))).unwrap();
    let o = check(&word);
    refused(&o, &[1], "messages[1].content");
    assert!(o.stdout.contains("without whitespace"), "{}", o.stdout);
    // 3,000 turn pairs in one row (quadratic label masking before): a bounded count.
    let turns = dir.path().join("turns.jsonl");
    let messages: Vec<serde_json::Value> = (0..6000)
        .map(|i| {
            serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "ok"})
        })
        .collect();
    std::fs::write(
        &turns,
        serde_json::json!({"messages": messages}).to_string() + "\n",
    )
    .unwrap();
    let o = run(dir.path(), &m, &turns, &out, &["--max-steps", "1"]);
    refused(&o, &[1], "over the limit of 1024");
    // A tampered data cache (a token id past the vocabulary) is rebuilt, and said so.
    let d = data(dir.path(), 24);
    let cached = dir.path().join("cached");
    ok(&run(dir.path(), &m, &d, &cached, &["--max-steps", "1"]));
    let entry = std::fs::read_dir(cached.join(".cache/data"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let file = entry.join("train.parquet");
    let mut rows = train_data::read_examples(&file).unwrap();
    rows[0].input_ids[1] = 1_000_000;
    train_data::write_examples(&file, &rows).unwrap();
    let o = run(
        dir.path(),
        &m,
        &d,
        &cached,
        &["--max-steps", "2", "--resume"],
    );
    ok(&o);
    assert!(o.stderr.contains("has been rebuilt"), "{}", o.stderr);
}

#[test]
fn hostile_tokenizer_json_options_are_refused_or_neutralised() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path(), 8);
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let m = qwen3_copy(dir.path(), name);
        let path = m.join("tokenizer.json");
        let mut t: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut t);
        std::fs::write(&path, t.to_string()).unwrap();
        m
    };
    let stats = |m: &Path| {
        bounded(
            dir.path(),
            &[
                "data",
                "stats",
                "--model",
                m.to_str().unwrap(),
                "--dataset",
                d.to_str().unwrap(),
            ],
        )
    };
    // A normalizer chain that multiplies the text (12 × Replace('' → 'xx')).
    let grow = edit("grow", &|t| {
        let replace =
            serde_json::json!({"type": "Replace", "pattern": {"Regex": ""}, "content": "xx"});
        t["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": vec![replace; 12]});
    });
    refused(&stats(&grow), &[1], "can grow a text");
    // Truncation with stride ≥ max_length (a panic in tokenizers) and padding to 2^40 tokens:
    // cleared, since the toolkit truncates and pads itself.
    let trunc = edit("trunc", &|t| {
        t["truncation"] = serde_json::json!({"direction": "Right", "max_length": 4,
            "strategy": "LongestFirst", "stride": 8});
        t["padding"] = serde_json::json!({"strategy": {"Fixed": 1u64 << 40}, "direction": "Right",
            "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "x"});
    });
    ok(&stats(&trunc));
    // A vocabulary id of 4e9.
    let huge = edit("huge", &|t| {
        t["model"]["vocab"]["zzzz"] = 4_000_000_000u64.into();
    });
    refused(&stats(&huge), &[1], "tokenizer.json");
}

#[test]
fn hostile_chat_templates_are_bounded_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = data(dir.path(), 24);
    let attacks = [
        (
            "alias",
            "{% set ns = namespace(x=[]) %}{% set a = ns %}{% for i in range(100000) %}{% set a.x = [a.x] %}{% endfor %}{{ ns.x }}",
            "nested too deeply",
        ),
        (
            "via-variable",
            "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set y = ns.x %}{% set ns.x = [y] %}{% endfor %}{{ ns.x }}",
            "nested too deeply",
        ),
        (
            "whitespace",
            "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{%- set ns.x = [ns.x] -%}{% endfor %}{{ ns.x }}",
            "nested too deeply",
        ),
        (
            "doubling",
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "allocated more than",
        ),
        ("repeat", "{{ 'x' * 10**12 }}", "allocated more than"),
        (
            "raise",
            "{{ raise_exception('x' * 10**12) }}",
            "allocated more than",
        ),
        (
            "join",
            "{{ (['x' * 1000000] * 1000) | join('') }}",
            "allocated more than",
        ),
        (
            "format",
            "{{ '%999999999s' | format('x') }}",
            "allocated more than",
        ),
        (
            "fuel",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "ran out of fuel",
        ),
    ];
    for (name, template, culprit) in attacks {
        let m = qwen3_copy(dir.path(), name);
        std::fs::write(m.join("chat_template.jinja"), template).unwrap();
        let o = bounded(
            dir.path(),
            &[
                "data",
                "stats",
                "--model",
                m.to_str().unwrap(),
                "--dataset",
                d.to_str().unwrap(),
            ],
        );
        refused(&o, &[1], culprit);
        assert!(
            o.stderr.contains("chat_template.jinja"),
            "{name}: {}",
            o.stderr
        );
        eprintln!(
            "template attack {name}: exit {:?} in {:.1} s",
            o.code, o.seconds
        );
    }
}

/// `train data check bad.jsonl | head -2`: the reader goes away after two lines. The check
/// still ends with its own exit status (1: the file has errors), never a panic (101) or an
/// internal error (70), whether stderr goes to the closed pipe too or not.
#[test]
fn a_closed_pipe_is_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    // Every row of another shape, each with its own key: thousands of distinct lines, far
    // more than a pipe buffers.
    let rows: String = (0..3000)
        .map(|i| format!("{{\"key_{i}\": {i}}}\n"))
        .collect();
    std::fs::write(&bad, rows).unwrap();
    for redirect in ["2>/dev/null", "2>&1"] {
        let script = format!(
            "\"$0\" data check \"$1\" {redirect} | head -2 >/dev/null; echo \"status ${{PIPESTATUS[0]}}\""
        );
        let o = Command::new("bash")
            .args(["-c", &script, env!("CARGO_BIN_EXE_train")])
            .arg(&bad)
            .env("TRAIN_MODEL_REGISTRY", dir.path().join("models.json"))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(out.trim(), "status 1", "{redirect}: {out} {err}");
        assert!(
            !err.contains("panicked") && !err.contains("internal error"),
            "{err}"
        );
    }
}

/// A file of another shape gets one summary naming the keys its first rows have and the shapes
/// supported; a problem repeated row after row gets a few lines, then one line counting the
/// rest — not one identical line per row (`--json` keeps them all).
#[test]
fn a_repeated_problem_is_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("qa.jsonl");
    let rows: String = (0..50)
        .map(|i| format!("{{\"question\": \"q{i}\", \"answer\": \"a\"}}\n"))
        .collect();
    std::fs::write(&other, rows).unwrap();
    let o = bounded(dir.path(), &["data", "check", other.to_str().unwrap()]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", o.stdout);
    assert!(
        lines[0].contains("qa.jsonl:1: error: 50 rows have no supported shape")
            && lines[0].contains("TRL `prompt` + `completion`")
            && lines[0].contains("the keys of the first: `answer`, `question`"),
        "{}",
        lines[0]
    );
    let bad = dir.path().join("other.jsonl");
    let rows: String = (0..50)
        .map(|i| format!("{{\"prompt\": \"q{i}\", \"answer\": \"a\"}}\n"))
        .collect();
    std::fs::write(&bad, rows).unwrap();
    let o = bounded(dir.path(), &["data", "check", bad.to_str().unwrap()]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", o.stdout);
    for (i, line) in lines[..3].iter().enumerate() {
        assert!(line.contains(&format!(":{}: error", i + 1)), "{line}");
        assert!(
            line.contains(
                "field `completion`: missing (a row with `prompt` needs its `completion`)"
            ),
            "{line}"
        );
    }
    assert!(
        lines[3].contains("… and 47 more of the same error") && lines[3].contains("`completion`"),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].contains("50 rows, 0 valid, 50 invalid"),
        "{}",
        lines[4]
    );
    let json = bounded(
        dir.path(),
        &["data", "check", bad.to_str().unwrap(), "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(50));
}

/// An `--output` that exists and is not a directory (a file, `/dev/null`) is refused before
/// anything is prepared, naming it once, with what to do; the file is left as it was.
#[test]
fn an_output_that_is_not_a_directory_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (model(), data(dir.path(), 8));
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    for output in [file.to_str().unwrap(), "/dev/null"] {
        let mut args = base(&m, &d, Path::new(output));
        args.extend(["--max-steps", "1"]);
        let o = bounded(dir.path(), &args);
        assert_eq!(o.code, Some(1), "{}", o.stderr);
        assert!(
            o.stderr
                .contains(&format!("{output}: --output exists and is not a directory"))
                && o.stderr.contains("choose another --output")
                && o.stderr.matches("error:").count() == 1
                && !o.stderr.contains("os error"),
            "{}",
            o.stderr
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}
