//! Faults a long run meets: the process killed (SIGKILL) at any moment, checkpoints damaged on
//! disk afterwards, a full disk (a file-size limit, so that writes fail with EFBIG), the data
//! changed before a resume. Nothing already saved may be lost, nothing partial may appear
//! under a final name, the status file must always parse, and every failure must say what
//! happened. Counts are printed for `docs/reliability.md` (`--nocapture`).
#![cfg(feature = "cpu")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{base, data, model, train};
use train_runner::{latest_intact_checkpoint, list_checkpoints, verify_checkpoint};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every checkpoint under a final name verifies; the status file, when present, parses.
fn assert_consistent(out: &Path) -> usize {
    let checkpoints = list_checkpoints(out);
    for (_, dir) in &checkpoints {
        if let Err(e) = verify_checkpoint(dir) {
            panic!("{} is damaged after a kill: {e}", dir.display());
        }
    }
    let status = out.join("status/training_status.json");
    if status.exists() {
        let bytes = std::fs::read(&status).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("status file is not valid JSON after a kill: {e}"));
        assert_eq!(v["schema_version"], 1);
    }
    checkpoints.len()
}

#[test]
fn sigkill_at_random_moments_never_damages_a_checkpoint_and_resume_always_works() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    // Far more steps than the loop gives it time for: every run is killed mid-way.
    let steps = "100000";
    let (mut kills, mut during_save, mut finished_first) = (0, 0, 0);
    let mut seed: u64 = 0x5EED;
    let iterations = 20;
    let saving = |out: &Path| {
        std::fs::read_dir(out)
            .map(|e| {
                e.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".checkpoint-"))
            })
            .unwrap_or(false)
    };
    for i in 0..iterations {
        let mut args = base(&m, &d, &out);
        args.extend([
            "--max-steps",
            steps,
            "--save-steps",
            "1",
            "--eval-steps",
            "100",
        ]);
        args.extend(["--save-total-limit", "3"]);
        args.push(if list_checkpoints(&out).is_empty() {
            "--yes"
        } else {
            "--resume"
        });
        let mut child = Command::new(env!("CARGO_BIN_EXE_train"))
            .args(&args)
            .env("TRAIN_MODEL_REGISTRY", dir.path().join("models.json"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let started = Instant::now();
        if i % 2 == 0 {
            // A pseudo-random moment between 0.2 s and 2.2 s (start-up takes about 0.5 s, then
            // a step and its checkpoint take tens of milliseconds).
            let delay = Duration::from_millis(200 + (seed >> 33) % 2000);
            while started.elapsed() < delay && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            // Aimed at a checkpoint write: 0-15 ms after its temporary directory appears.
            let since = Duration::from_micros((seed >> 33) % 15_000);
            while !saving(&out)
                && started.elapsed() < Duration::from_secs(10)
                && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(since);
        }
        if child.try_wait().unwrap().is_some() {
            finished_first += 1;
        } else {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            kills += 1;
            during_save += usize::from(saving(&out));
        }
        assert_consistent(&out);
    }
    // Whatever happened, the run resumes from its newest checkpoint and goes on.
    let (latest, damaged) = latest_intact_checkpoint(&out);
    assert!(damaged.is_empty(), "{damaged:?}");
    let reached = latest.map_or(0, |p| verify_checkpoint(&p).unwrap().global_step);
    let target = (reached + 3).to_string();
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        &target,
        "--save-steps",
        "1",
        "--eval-steps",
        "100",
        "--json",
    ]);
    args.push(if reached == 0 { "--yes" } else { "--resume" });
    let o = train(dir.path(), &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(crate::common::last_json(&o)["global_step"], reached + 3);
    let checkpoints = assert_consistent(&out);
    eprintln!(
        "sigkill: {iterations} runs, {kills} killed ({during_save} of them while a checkpoint was \
         being written or rotated), {finished_first} finished before the kill; every checkpoint verified \
         after every kill; resumed from step {reached} to {target}, {checkpoints} intact checkpoints"
    );
    assert!(
        kills >= iterations / 2,
        "too few kills to mean anything: {kills}"
    );
}

fn flip_byte(path: &Path, at: f64) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = ((bytes.len() as f64) * at) as usize;
    bytes[i] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn damaged_checkpoints_are_named_and_resume_falls_back_to_the_newest_intact_one() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    let run = |extra: &[&str]| {
        let mut args = base(&m, &d, &out);
        args.extend([
            "--max-steps",
            "6",
            "--save-steps",
            "2",
            "--eval-steps",
            "100",
            "--json",
        ]);
        args.extend(extra);
        train(dir.path(), &args)
    };
    assert!(run(&[]).status.success());
    let ck = |n: usize| out.join(format!("checkpoint-{n}"));

    // Flipped bytes in the weights of the newest checkpoint.
    flip_byte(&ck(6).join("model.safetensors"), 0.7);
    let o = run(&["--resume", ck(6).to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("model.safetensors is damaged"),
        "{}",
        stderr(&o)
    );
    // A bare --resume skips it, says so, and resumes from checkpoint-4.
    let o = run(&["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("skipping checkpoint-6") && e.contains("model.safetensors is damaged"),
        "{e}"
    );
    assert!(
        e.contains("checkpoint-4, the newest intact checkpoint"),
        "{e}"
    );
    assert_eq!(crate::common::last_json(&o)["global_step"], 6);
    verify_checkpoint(&ck(6)).unwrap(); // saved again by the resumed run

    // A truncated optimizer state, a missing one, a damaged trainer state.
    let opt = ck(4).join("optimizer.safetensors");
    let len = std::fs::metadata(&opt).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&opt)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::fs::remove_file(ck(2).join("optimizer.safetensors")).unwrap();
    flip_byte(&ck(6).join("trainer_state.json"), 0.5);
    let (intact, skipped) = latest_intact_checkpoint(&out);
    assert_eq!(intact, None);
    let reasons: Vec<&str> = skipped.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        reasons[0].contains("trainer_state.json is damaged"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("optimizer.safetensors is damaged"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("optimizer.safetensors is missing"),
        "{reasons:?}"
    );
    let o = run(&["--resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no intact checkpoint"),
        "{}",
        stderr(&o)
    );

    // A damaged checksum file is itself detected.
    std::fs::write(ck(6).join("checksums.json"), "{ not json").unwrap();
    let e = verify_checkpoint(&ck(6)).unwrap_err().to_string();
    assert!(e.contains("checksums.json is damaged"), "{e}");
}

/// A run of 2 steps with its checkpoint: (its directory, the data file, the output).
fn two_saved_steps() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (m, d, out) = (model(), data(dir.path(), 24), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "2",
        "--save-steps",
        "2",
        "--eval-steps",
        "100",
    ]);
    assert!(train(dir.path(), &args).status.success());
    (dir, d, out)
}

#[test]
fn a_full_disk_fails_with_a_clear_error_and_keeps_what_was_saved() {
    let (dir, d, out) = two_saved_steps();
    let m = model();
    let before = std::fs::read(out.join("checkpoint-2/model.safetensors")).unwrap();

    // Resume under a 600 kB file-size limit: the next checkpoint (an f32 model of ~750 kB)
    // cannot be written. SIGXFSZ is ignored so that the write fails with EFBIG, as on a full
    // disk, instead of killing the process.
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--eval-steps",
        "100",
        "--resume",
    ]);
    let script = format!(
        "trap '' XFSZ; ulimit -f 600; exec \"$0\" {}",
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let o = Command::new("bash")
        .args(["-c", &script, env!("CARGO_BIN_EXE_train")])
        .env("TRAIN_MODEL_REGISTRY", dir.path().join("models.json"))
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("File too large") && e.contains(".safetensors"),
        "{e}"
    );
    // Nothing partial under a final name; the earlier checkpoint is untouched and intact.
    assert!(!out.join("checkpoint-4").exists());
    assert_eq!(list_checkpoints(&out).len(), 1);
    verify_checkpoint(&out.join("checkpoint-2")).unwrap();
    assert_eq!(
        std::fs::read(out.join("checkpoint-2/model.safetensors")).unwrap(),
        before
    );
    assert_consistent(&out);
    eprintln!("full disk: exit 1 with: {}", e.lines().last().unwrap_or(""));
}

#[test]
fn a_dataset_changed_since_the_checkpoint_is_refused_on_resume() {
    let (dir, d, out) = two_saved_steps();
    let m = model();
    let mut text = std::fs::read_to_string(&d).unwrap();
    text.push_str(&text.lines().next().unwrap().replace("the", "a"));
    text.push('\n');
    std::fs::write(&d, text).unwrap();
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "2",
        "--save-steps",
        "2",
        "--eval-steps",
        "100",
        "--resume",
    ]);
    let o = train(dir.path(), &args);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("changed since this checkpoint was written"),
        "{}",
        stderr(&o)
    );
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Directories `dir_mode`, files `file_mode`, recursively.
fn set_modes(path: &Path, dir_mode: u32, file_mode: u32) {
    for entry in std::fs::read_dir(path).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            set_modes(&p, dir_mode, file_mode);
        } else {
            set_mode(&p, file_mode);
        }
    }
    set_mode(path, dir_mode);
}

/// Every file under `path` with its bytes.
fn snapshot(path: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_read_only_output_directory_fails_with_a_clear_error_and_changes_nothing() {
    // CI runs as root, for whom permission bits do not apply: the run under test goes into an
    // unprivileged user namespace (`unshare --user`), where it is a user with no rights over
    // these root-owned files.
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for entry in std::fs::read_dir(model()).unwrap().flatten() {
        std::fs::copy(entry.path(), m.join(entry.file_name())).unwrap();
    }
    let (d, out) = (data(dir.path(), 24), dir.path().join("out"));
    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "2",
        "--save-steps",
        "2",
        "--eval-steps",
        "100",
    ]);
    assert!(train(dir.path(), &args).status.success());
    set_modes(dir.path(), 0o755, 0o644);
    set_modes(&out, 0o555, 0o444);
    let before = snapshot(&out);

    let mut args = base(&m, &d, &out);
    args.extend([
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--eval-steps",
        "100",
        "--resume",
    ]);
    let o = Command::new("unshare")
        .arg("--user")
        .arg(env!("CARGO_BIN_EXE_train"))
        .args(&args)
        .env("TRAIN_MODEL_REGISTRY", dir.path().join("models.json"))
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("Permission denied") && e.contains("out"), "{e}");
    assert!(
        before == snapshot(&out),
        "a file under the read-only output changed"
    );
    verify_checkpoint(&out.join("checkpoint-2")).unwrap();
    set_modes(&out, 0o755, 0o644);
    eprintln!(
        "read-only output: exit 1 with: {}",
        e.lines().last().unwrap_or("")
    );
}
