//! The generated references under `docs/reference/` must match the code: the configuration
//! reference is rendered from the serde configuration types (their JSON schemas, doc comments
//! included) and the CLI reference from `train --help` of every command. To update them after
//! a deliberate change: `TRAIN_BLESS=1 cargo test --workspace --release --test it reference::`.

use std::fmt::Write as _;
use std::process::Command;

use serde_json::Value;

fn check(relative: &str, rendered: &str) {
    let path = crate::common::root().join(relative);
    if std::env::var_os("TRAIN_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, rendered).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != rendered {
        let line = committed
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(rendered.lines().count()));
        panic!(
            "{relative} is out of date (first difference at line {}):\n  committed: {:?}\n  generated: {:?}\n\
             Regenerate it with `TRAIN_BLESS=1 cargo test --workspace --release --test it reference::`.",
            line + 1,
            committed.lines().nth(line).unwrap_or("<end of file>"),
            rendered.lines().nth(line).unwrap_or("<end of file>"),
        );
    }
}

// ---- configuration reference ----

fn schema<T: schemars::JsonSchema>() -> Value {
    serde_json::to_value(schemars::schema_for!(T)).unwrap()
}

/// Doc text on one line, intra-doc links (`` [`Name`] ``) turned into plain code spans.
fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("[`", "`")
        .replace("`]", "`")
        .replace('|', "\\|")
}

/// A short type name for a property schema.
fn type_name(s: &Value) -> String {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        return format!("[`{name}`](#{})", name.to_lowercase());
    }
    if let Some(values) = s["enum"].as_array() {
        return values
            .iter()
            .map(|v| format!("`{v}`"))
            .collect::<Vec<_>>()
            .join(" / ");
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = s[key].as_array() {
            return alts.iter().map(type_name).collect::<Vec<_>>().join(" or ");
        }
    }
    if let Some(c) = s.get("const") {
        return format!("`{c}`");
    }
    let base = match &s["type"] {
        Value::String(t) => t.clone(),
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".into(),
    };
    if base.starts_with("array") {
        return format!("array of {}", type_name(&s["items"]));
    }
    base
}

fn properties_table(out: &mut String, schema: &Value, skip: &[&str]) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let rows: Vec<_> = props
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .collect();
    if rows.is_empty() {
        out.push_str("No options.\n\n");
        return;
    }
    out.push_str("| key | type | default | description |\n|---|---|---|---|\n");
    for (key, p) in rows {
        let default = match p.get("default") {
            Some(d) => format!("`{d}`"),
            None if required.contains(&key.as_str()) => "required".into(),
            None => "—".into(),
        };
        let _ = writeln!(
            out,
            "| `{key}` | {} | {default} | {} |",
            type_name(p),
            one_line(p["description"].as_str().unwrap_or(""))
        );
    }
    out.push('\n');
}

/// A tagged enum (`type = "…"`): one subsection per variant.
fn variants(out: &mut String, schema: &Value, tag: &str) {
    for v in schema["oneOf"].as_array().into_iter().flatten() {
        let name = v["properties"][tag]["const"].as_str().unwrap_or("?");
        let _ = writeln!(out, "#### `{tag} = \"{name}\"`\n");
        if let Some(d) = v["description"].as_str() {
            let _ = writeln!(out, "{}\n", one_line(d));
        }
        properties_table(out, v, &[tag]);
    }
}

fn definitions(out: &mut String, schemas: &[&Value]) {
    let mut seen = std::collections::BTreeMap::new();
    for s in schemas {
        for (name, def) in s["$defs"].as_object().into_iter().flatten() {
            seen.insert(name.clone(), def.clone());
        }
    }
    out.push_str("## Value types\n\n");
    for (name, def) in seen {
        let _ = writeln!(out, "### `{name}`\n");
        if let Some(d) = def["description"].as_str() {
            let _ = writeln!(out, "{}\n", one_line(d));
        }
        if def.get("properties").is_some() {
            properties_table(out, &def, &[]);
        } else if let Some(alts) = def["oneOf"].as_array().or_else(|| def["anyOf"].as_array()) {
            for a in alts {
                let _ = writeln!(
                    out,
                    "- {}: {}",
                    type_name(a),
                    one_line(a["description"].as_str().unwrap_or(""))
                );
            }
            out.push('\n');
        } else {
            let _ = writeln!(out, "One of {}.\n", type_name(&def));
        }
    }
}

/// The names a serde struct accepts besides its own keys: its `deny_unknown_fields` error lists
/// every field name and alias; the schema's properties are the keys.
fn serde_aliases<T: serde::de::DeserializeOwned + schemars::JsonSchema>() -> Vec<String> {
    let err = serde_json::from_str::<T>(r#"{"\u0001": 0}"#)
        .err()
        .expect("unknown keys are refused")
        .to_string();
    let listed = err
        .split("expected one of ")
        .nth(1)
        .unwrap_or_else(|| panic!("no field list in {err}"));
    let keys = schema::<T>();
    let keys = keys["properties"].as_object().unwrap();
    listed
        .split(", ")
        .map(|n| {
            n.split('`')
                .nth(1)
                .unwrap_or_else(|| panic!("{n} in {err}"))
                .to_string()
        })
        .filter(|n| !keys.contains_key(n))
        .collect()
}

/// The alias table: `train reference-aliases` (every flag's visible aliases, the config file's
/// key aliases) and the sections' documented serde aliases, which must be exactly the aliases
/// serde accepts, each setting what it says.
fn alias_table() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("reference-aliases")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut rows: Vec<(String, String)> = Vec::new();
    for f in v["flags"].as_array().unwrap() {
        for a in f["aliases"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            rows.push((
                format!("`{a}`, key `{}`", a[2..].replace('-', "_")),
                format!("`{}`", f["flag"].as_str().unwrap()),
            ));
        }
    }
    for pair in v["file_keys"].as_array().unwrap() {
        let (key, flag) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        rows.push((
            format!("key `{key}`"),
            format!("`--{}`", flag.replace('_', "-")),
        ));
    }
    for (section, documented, accepted) in [
        (
            "trainer",
            train_runner::TRAINER_KEY_ALIASES,
            serde_aliases::<train_runner::TrainerConfig>(),
        ),
        (
            "data",
            train_data::DATASET_KEY_ALIASES,
            serde_aliases::<train_data::DatasetConfig>(),
        ),
    ] {
        let mut listed: Vec<&str> = documented.iter().map(|(a, _)| *a).collect();
        let mut accepted: Vec<&str> = accepted.iter().map(String::as_str).collect();
        listed.sort_unstable();
        accepted.sort_unstable();
        assert_eq!(
            listed, accepted,
            "[{section}]: documented vs serde's aliases"
        );
        for (alias, key) in documented {
            rows.push((
                format!("`[{section}] {alias}`"),
                format!("`[{section}] {key}`"),
            ));
        }
    }
    let mut table = String::from("| name | is |\n|---|---|\n");
    for (a, b) in rows {
        let _ = writeln!(table, "| {a} | {b} |");
    }
    table
}

fn config_reference() -> String {
    let dataset = schema::<train_data::DatasetConfig>();
    let trainer = schema::<train_runner::TrainerConfig>();
    let alerts = schema::<train_monitor::AlertConfig>();
    let transform = schema::<train_data::TransformConfig>();
    let processor = schema::<train_logits::ProcessorConfig>();
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the serde configuration types and their documentation by\n\
         `crates/train-cli/tests/it/reference.rs`; CI fails when this file and the code disagree.\n\
         Regenerate with `TRAIN_BLESS=1 cargo test --workspace --release --test it reference::`.\n\n\
         Every table lists the keys a TOML file (or `serde` from any format) accepts, their types\n\
         and their defaults (a missing key takes its default; unknown keys are refused).\n\n\
         `train --config run.toml` (TOML; YAML when the file ends in `.yaml` or `.yml`, with the\n\
         same keys, a `null` being a key left out) reads the first two as sections: `[data]` is a\n\
         `DatasetConfig` and `[trainer]` a `TrainerConfig` (`[trainer.lora]` its LoRA settings),\n\
         deserialised as they are. Its other keys are flags in snake_case (`max_length = 512`,\n\
         `lora_r = 16`), or the key of the setting a flag fills where the names differ\n\
         (`num_epochs`, `dataset_path`, `eval_dataset_path`). A flag on the command line wins over\n\
         one in the file, a flag in the file over the sections, and the sections over the\n\
         defaults below. Every unknown key of a file is named in one message.\n\n\
         Hugging Face, TRL and axolotl names are aliases, on the command line and as keys (a\n\
         flag's alias in snake_case is a key too). This table is generated from the flags'\n\
         aliases, the config file's key aliases and the sections' serde aliases:\n\n",
    );
    out.push_str(&alias_table());
    out.push_str(
        "\nAlso: `bf16: true` / `fp16: true` are the flags `--bf16` / `--fp16` (`precision`), and\n\
         axolotl's `adapter: lora` is implied by `lora_r`.\n\n",
    );
    let sections: [(&str, &str, &Value); 3] = [
        (
            "Dataset: `train_data::DatasetConfig`",
            "What `train_data::prepare` does with a data file. It owns the data's settings, `max_length` and `packing` included: the prepared dataset carries the training rows. The `train` flags `--dataset`, `--eval-dataset`, `--max-length`, `--packing`, `--validation-split`, `--thinking-pattern`, `--stop-pattern`, `--system-prompt`, `--transforms`, `--label-mode`, `--truncation`, `--data-seed` (default `--seed`), `--format`, `--schema` and `--on-error` fill it.",
            &dataset,
        ),
        (
            "Trainer: `train_runner::TrainerConfig`",
            "The training loop's settings (`transformers.TrainingArguments` semantics, the seed's defaults). The `train` flags fill it: `--output` sets `output_dir`, `--epochs` sets `num_epochs`, `--gradient-accumulation` sets `gradient_accumulation_steps`, `--no-shuffle` sets `shuffle = false`, the others have the names of their keys. The keys it accepts for others are in the alias table above.",
            &trainer,
        ),
        (
            "Alerts: `train_monitor::AlertConfig` (`train --alerts FILE.toml`)",
            "Thresholds of the monitor's alerts.",
            &alerts,
        ),
    ];
    for (title, intro, s) in sections {
        let _ = writeln!(out, "## {title}\n\n{intro}\n");
        properties_table(&mut out, s, &[]);
    }
    out.push_str(
        "## Transforms: `[[transform]]` tables (`train --transforms FILE.toml`, `train_data::TransformConfig`)\n\n\
         Applied in order to every conversation before rendering. Downstream types registered in a\n\
         `train_data::TransformRegistry` are configured the same way.\n\n",
    );
    variants(&mut out, &transform, "type");
    out.push_str(
        "## Logits processors: `[[processors]]` tables (`train generate --processors FILE.toml`, `train_logits::ProcessorConfig`)\n\n\
         Run in order on the next-token logits of every row. Downstream types registered in a\n\
         `train_logits::ProcessorRegistry` are configured the same way.\n\n",
    );
    variants(&mut out, &processor, "type");
    definitions(
        &mut out,
        &[&dataset, &trainer, &alerts, &transform, &processor],
    );
    out.trim_end().to_string() + "\n"
}

#[test]
fn configuration_reference_is_current() {
    check("docs/reference/configuration.md", &config_reference());
}

// ---- CLI reference ----

fn help(path: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(path)
        .arg("--help")
        .env("COLUMNS", "100")
        .output()
        .unwrap();
    assert!(out.status.success(), "train {path:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Subcommand names listed under `Commands:` in a help text.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

fn cli_section(out: &mut String, path: &mut Vec<String>) {
    let args: Vec<&str> = path.iter().map(String::as_str).collect();
    let text = help(&args);
    let depth = path.len().min(2) + 2;
    let _ = writeln!(
        out,
        "{} `train{}`\n\n```text\n{}\n```\n",
        "#".repeat(depth),
        path.iter().map(|p| format!(" {p}")).collect::<String>(),
        text.trim_end()
    );
    for sub in subcommands(&text) {
        path.push(sub);
        cli_section(out, path);
        path.pop();
    }
}

#[test]
fn cli_reference_is_current() {
    let mut out = String::from(
        "# CLI reference\n\n\
         The `--help` of every `train` command, generated by `crates/train-cli/tests/it/reference.rs`;\n\
         CI fails when this file and the binary disagree. The contract behind it (exit codes,\n\
         outputs) is in the user guide. Every flag can also come from `--config FILE.toml` (keys are\n\
         the flag names in snake_case; the command line wins), which may also hold `[data]` and\n\
         `[trainer]` sections with the keys of the configuration reference.\n\n",
    );
    cli_section(&mut out, &mut Vec::new());
    check(
        "docs/reference/cli.md",
        &(out.trim_end().to_string() + "\n"),
    );
}

// ---- the user guide's library quick start is the example CI runs ----

#[test]
fn guide_quick_start_is_the_finetune_example() {
    let guide = std::fs::read_to_string(crate::common::root().join("docs/guide.md")).unwrap();
    let example =
        std::fs::read_to_string(crate::common::root().join("examples/finetune.rs")).unwrap();
    let start = guide
        .find("<!-- examples/finetune.rs -->\n```rust\n")
        .expect("the marked code block in docs/guide.md");
    let body = &guide[start..];
    let body = &body[body.find("```rust\n").unwrap() + "```rust\n".len()..];
    let body = &body[..body.find("\n```").unwrap() + 1];
    assert!(
        body == example,
        "docs/guide.md's quick-start code differs from examples/finetune.rs; copy the example into the guide"
    );
}
