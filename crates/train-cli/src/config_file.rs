//! `--config run.toml`: every flag can come from a TOML file (keys are the flag names in
//! snake_case); a flag given on the command line wins.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// Returns `argv` with the flags of the `--config` file appended, skipping the flags the
/// command line already sets.
pub fn merge(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let mut path: Option<PathBuf> = None;
    let mut given: Vec<String> = Vec::new();
    let mut iter = argv.iter().skip(1).peekable();
    while let Some(arg) = iter.next() {
        let s = arg.to_string_lossy();
        if s == "--" {
            break;
        }
        if let Some(rest) = s.strip_prefix("--") {
            let (name, inline) = rest
                .split_once('=')
                .map_or((rest, None), |(n, v)| (n, Some(v)));
            if name == "config" {
                path = match inline {
                    Some(v) => Some(PathBuf::from(v)),
                    None => iter.next().map(PathBuf::from),
                };
                continue;
            }
            given.push(name.to_string());
        }
    }
    let Some(path) = path else { return Ok(argv) };
    let text = crate::read_settings(&path, "--config")?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("--config {}: invalid TOML", path.display()))?;
    let mut out = argv;
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if given.contains(&flag) {
            continue;
        }
        let mut push = |v: &toml::Value| -> Result<()> {
            match v {
                toml::Value::Boolean(true) => out.push(format!("--{flag}").into()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => {
                    out.push(format!("--{flag}").into());
                    out.push(s.into());
                }
                toml::Value::Integer(i) => {
                    out.push(format!("--{flag}").into());
                    out.push(i.to_string().into());
                }
                toml::Value::Float(f) => {
                    out.push(format!("--{flag}").into());
                    out.push(f.to_string().into());
                }
                other => bail!(
                    "--config {}: key `{key}` has an unsupported value {other}",
                    path.display()
                ),
            }
            Ok(())
        };
        match &value {
            toml::Value::Array(items) => {
                for item in items {
                    push(item)?;
                }
            }
            v => push(v)?,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_flags_fill_in_and_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("run.toml");
        std::fs::write(&cfg, "max_length = 128\nseed = 7\nthinking_pattern = true\nstop_pattern = false\nsystem_prompt = \"Be brief.\"\n").unwrap();
        let argv: Vec<OsString> = [
            "train",
            "data",
            "stats",
            "--seed",
            "1",
            "--config",
            cfg.to_str().unwrap(),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let merged: Vec<String> = merge(argv)
            .unwrap()
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let joined = merged.join(" ");
        assert!(joined.contains("--max-length 128"), "{joined}");
        assert!(
            joined.contains("--thinking-pattern") && !joined.contains("--stop-pattern"),
            "{joined}"
        );
        assert!(joined.contains("--system-prompt Be brief."), "{joined}");
        assert_eq!(
            merged.iter().filter(|a| *a == "--seed").count(),
            1,
            "{joined}"
        );
    }
}
