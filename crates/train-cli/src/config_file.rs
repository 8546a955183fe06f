//! `--config run.toml` (or `run.yaml`): the run's configuration in one file.
//!
//! - TOML, or YAML when the file ends in `.yaml` / `.yml` (same keys; a YAML `null` is a key
//!   left out).
//! - `[data]` is a `train_data::DatasetConfig` and `[trainer]` a `train_runner::TrainerConfig`,
//!   deserialised directly: their keys are exactly those `docs/reference/configuration.md`
//!   lists (`num_epochs`, `gradient_accumulation_steps`, `[trainer.lora]`, …), unknown keys are
//!   refused.
//! - Every other key is a flag, named as on the command line in snake_case (`max_length`,
//!   `lora_r`, `system_prompt`), or by one of the flag's aliases (the Hugging Face
//!   `TrainingArguments` names: `num_train_epochs`, `per_device_train_batch_size`, `bf16`, …),
//!   or by the key of the setting it fills where that differs (`num_epochs` for `--epochs`),
//!   or by the axolotl key for the same thing (`base_model`, `sequence_len`, `val_set_size`,
//!   `sample_packing`). Every unknown key is named in one message; one that looks like an
//!   axolotl config says which of its keys have no counterpart here.
//!
//! What wins: a flag on the command line, then a flag in the file, then the file's sections,
//! then the library's defaults (the only place a default is written; the flags' help shows it).
//! The command builds each configuration once from its section and the flags given
//! ([`Given`]).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::Deserialize;
use train_data::DatasetConfig;
use train_runner::TrainerConfig;

/// Keys of a file that fill a flag of another name: the library settings' keys, where they
/// differ from the flag.
const KEY_ALIASES: &[(&str, &str)] = &[
    ("num_epochs", "epochs"),
    ("dataset_path", "dataset"),
    ("eval_dataset_path", "eval_dataset"),
    // axolotl's names.
    ("base_model", "model"),
    ("sequence_len", "max_length"),
    ("val_set_size", "validation_split"),
];

/// The config file's own key aliases (key, flag), for the generated reference.
pub fn key_aliases() -> &'static [(&'static str, &'static str)] {
    KEY_ALIASES
}

/// Keys by which an axolotl config is recognised.
const AXOLOTL_KEYS: &[&str] = &[
    "base_model",
    "datasets",
    "sequence_len",
    "micro_batch_size",
    "adapter",
    "val_set_size",
    "sample_packing",
];

/// The sections of a `--config` file (its flags go into the command line).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// `[data]`.
    #[serde(default)]
    pub data: Option<DatasetConfig>,
    /// `[trainer]`.
    #[serde(default)]
    pub trainer: Option<TrainerConfig>,
}

/// Which flags of a (sub)command the command line or the file's flag keys set, as opposed to
/// their defaults: the ids of its arguments (their field names).
#[derive(Debug, Clone, Default)]
pub struct Given(std::collections::BTreeSet<String>);

impl Given {
    /// The flags given in `matches` (a subcommand's).
    pub fn new(matches: &ArgMatches) -> Self {
        Self(
            matches
                .ids()
                .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
                .map(|id| id.as_str().to_string())
                .collect(),
        )
    }

    /// True when the flag with this id (its field name) was given.
    pub fn has(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

/// The long flags of the (sub)command `argv` runs, and those of every command: one file serves
/// several commands (`train data stats` skips the trainer's flags of a run's file), while a key
/// that no command knows is refused.
fn known_flags(
    argv: &[OsString],
    cli: &clap::Command,
) -> (Vec<String>, std::collections::BTreeMap<String, String>) {
    fn longs(c: &clap::Command) -> impl Iterator<Item = String> + '_ {
        c.get_arguments()
            .filter_map(|a| a.get_long())
            .map(str::to_string)
    }
    /// Every long flag and alias of `c` and its subcommands, to the long flag it names.
    fn all(c: &clap::Command, out: &mut std::collections::BTreeMap<String, String>) {
        for a in c.get_arguments() {
            if let Some(long) = a.get_long() {
                out.insert(long.to_string(), long.to_string());
                for alias in a.get_all_aliases().into_iter().flatten() {
                    out.insert(alias.to_string(), long.to_string());
                }
            }
        }
        for sub in c.get_subcommands() {
            all(sub, out);
        }
    }
    let mut every = std::collections::BTreeMap::new();
    all(cli, &mut every);
    let mut cmd = cli;
    let mut tokens = argv.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(t) = tokens.next() {
        if t == "--config" {
            tokens.next();
            continue;
        }
        if t.starts_with('-') {
            break;
        }
        match cmd.find_subcommand(t.as_ref()) {
            Some(sub) => cmd = sub,
            None => break,
        }
    }
    (longs(cmd).collect(), every)
}

/// The top-level table of a settings file: TOML, or YAML for `.yaml` / `.yml`.
fn parse_table(path: &std::path::Path, text: &str) -> Result<toml::Table> {
    let yaml = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    if !yaml {
        return toml::from_str(text).with_context(|| format!("--config {}", path.display()));
    }
    let value: serde_json::Value = serde_saphyr::from_str(text)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("--config {}", path.display()))?;
    match yaml_to_toml(value, "") {
        Ok(Some(toml::Value::Table(t))) => Ok(t),
        Ok(None) => Ok(toml::Table::new()),
        Ok(Some(_)) => bail!(
            "--config {}: the document must be a mapping of keys to values",
            path.display()
        ),
        Err(e) => bail!("--config {}: {e}", path.display()),
    }
}

/// A YAML value as TOML: `null` is a key left out (`None`); numbers outside TOML's range and
/// `null` inside a list are refused, naming the key.
fn yaml_to_toml(
    v: serde_json::Value,
    key: &str,
) -> std::result::Result<Option<toml::Value>, String> {
    use serde_json::Value as J;
    Ok(Some(match v {
        J::Null => return Ok(None),
        J::Bool(b) => toml::Value::Boolean(b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => toml::Value::Integer(i),
            (None, Some(f)) if n.is_f64() => toml::Value::Float(f),
            _ => return Err(format!("`{key}`: {n} is out of range")),
        },
        J::String(s) => toml::Value::String(s),
        J::Array(items) => toml::Value::Array(
            items
                .into_iter()
                .map(|i| yaml_to_toml(i, key)?.ok_or_else(|| format!("`{key}`: a list holds null")))
                .collect::<std::result::Result<_, _>>()?,
        ),
        J::Object(map) => {
            let mut t = toml::Table::new();
            for (k, v) in map {
                if let Some(v) = yaml_to_toml(v, &k)? {
                    t.insert(k, v);
                }
            }
            toml::Value::Table(t)
        }
    }))
}

/// Returns `argv` with the flag keys of the `--config` file appended (skipping the flags the
/// command line already sets, and those of other commands), and the file's sections. `argv`
/// names its subcommand (`train run …`) and `cli` is the whole command line interface.
pub fn merge(argv: Vec<OsString>, cli: &clap::Command) -> Result<(Vec<OsString>, RunConfig)> {
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
    let Some(path) = path else {
        return Ok((argv, RunConfig::default()));
    };
    let text = crate::read_settings(&path, "--config")?;
    let mut table = parse_table(&path, &text)?;
    let mut sections = toml::Table::new();
    for name in ["data", "trainer"] {
        if let Some(v) = table.remove(name) {
            if !v.is_table() {
                bail!(
                    "--config {}: `{name}` must be a table (`[{name}]`) of the keys in \
                     docs/reference/configuration.md",
                    path.display()
                );
            }
            sections.insert(name.into(), v);
        }
    }
    let config: RunConfig = toml::Value::Table(sections)
        .try_into()
        .with_context(|| format!("--config {}", path.display()))?;
    let (here, anywhere) = known_flags(&argv, cli);
    let unknown: Vec<&String> = table
        .keys()
        .filter(|key| {
            let name = KEY_ALIASES
                .iter()
                .find(|(k, _)| k == key)
                .map_or(key.as_str(), |(_, flag)| *flag);
            // axolotl's `adapter: lora` is what `lora_r` implies.
            let lora_adapter = key.as_str() == "adapter"
                && table.get("adapter").and_then(toml::Value::as_str) == Some("lora");
            !(anywhere.contains_key(&name.replace('_', "-")) || lora_adapter)
        })
        .collect();
    if !unknown.is_empty() {
        let names = unknown
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let axolotl = table.keys().any(|k| AXOLOTL_KEYS.contains(&k.as_str()));
        if axolotl {
            bail!(
                "--config {}: this looks like an axolotl config; these keys have no counterpart \
                 here: {names}. The data file is --dataset (`dataset_path`, one file of \
                 messages, ShareGPT, Alpaca, prompt/completion or text rows); see \
                 docs/reference/configuration.md for the keys a file accepts",
                path.display()
            );
        }
        bail!(
            "--config {}: unknown key{} {names} (not a flag of any command, nor the sections \
             [data] and [trainer]; see docs/reference/configuration.md)",
            path.display(),
            if unknown.len() > 1 { "s" } else { "" }
        );
    }
    // A flag given on the command line by an alias is given by its long name.
    let given: Vec<String> = given
        .iter()
        .map(|g| anywhere.get(g).cloned().unwrap_or_else(|| g.clone()))
        .collect();
    let mut out = argv;
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in table {
        if key == "adapter" {
            continue;
        }
        let name = KEY_ALIASES
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(key.as_str(), |(_, flag)| *flag)
            .replace('_', "-");
        let Some(flag) = anywhere.get(&name).cloned() else {
            continue;
        };
        if seen.contains(&flag) {
            bail!(
                "--config {}: `{key}` sets --{flag}, which another key of the file sets too",
                path.display()
            );
        }
        seen.push(flag.clone());
        if given.contains(&flag) || !here.contains(&flag) {
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
                toml::Value::Table(_) => bail!(
                    "--config {}: unknown section `[{key}]` (the sections are [data] and \
                     [trainer])",
                    path.display()
                ),
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
    Ok((out, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(file: &str, args: &[&str]) -> Result<(String, RunConfig)> {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("run.toml");
        std::fs::write(&cfg, file).unwrap();
        let mut argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        argv.push("--config".into());
        argv.push(cfg.into_os_string());
        let (out, config) = merge(argv, &crate::cli_command())?;
        let joined = out
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        Ok((joined, config))
    }

    #[test]
    fn file_flags_fill_in_and_command_line_wins() {
        let (joined, _) = merged(
            "max_length = 128\nseed = 7\nthinking_pattern = true\nstop_pattern = false\nsystem_prompt = \"Be brief.\"\n",
            &["train", "data", "stats", "--seed", "1"],
        )
        .unwrap();
        assert!(joined.contains("--max-length 128"), "{joined}");
        assert!(
            joined.contains("--thinking-pattern") && !joined.contains("--stop-pattern"),
            "{joined}"
        );
        assert!(joined.contains("--system-prompt Be brief."), "{joined}");
        assert_eq!(joined.matches("--seed").count(), 1, "{joined}");
    }

    #[test]
    fn sections_are_the_library_configurations_and_keys_may_be_the_settings_names() {
        let (joined, config) = merged(
            "num_epochs = 2\noutput_dir = \"out\"\n[data]\nmax_length = 64\npacking = true\n\
             [trainer]\nlearning_rate = 1e-3\ngradient_accumulation_steps = 4\n[trainer.lora]\nr = 4\n",
            &["train", "run"],
        )
        .unwrap();
        assert!(joined.contains("--epochs 2"), "{joined}");
        assert!(joined.contains("--output out"), "{joined}");
        let data = config.data.unwrap();
        assert_eq!((data.max_length, data.packing), (64, Some(true)));
        let trainer = config.trainer.unwrap();
        assert_eq!(trainer.learning_rate, 1e-3);
        assert_eq!(trainer.gradient_accumulation_steps, 4);
        assert_eq!(trainer.lora.unwrap().r, 4);
        assert_eq!(trainer.batch_size, TrainerConfig::default().batch_size);
    }

    #[test]
    fn unknown_keys_and_double_settings_are_refused_by_name() {
        for (file, expected) in [
            ("[trainer]\nnum_epoch = 2\n", "num_epoch"),
            ("[data]\nmax_lenght = 2\n", "max_lenght"),
            ("[model]\nx = 1\n", "[model]"),
            ("trainer = 3\n", "`trainer` must be a table"),
            ("epochs = 2\nnum_epochs = 3\n", "--epochs"),
            ("epoch = 2\n", "unknown key `epoch`"),
            ("[trainer]\nlearning_rate = \"fast\"\n", "learning_rate"),
        ] {
            let e = format!("{:#}", merged(file, &["train", "run"]).unwrap_err());
            assert!(e.contains(expected), "{file:?}: {e}");
        }
    }
}
