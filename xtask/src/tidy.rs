//! `cargo xtask tidy`: the house rules a grep can see (`../shared/docs/house-style.md`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::root;

/// House rules a grep can see (see `../shared/docs/house-style.md`).
pub(crate) fn tidy() -> Result<()> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for dir in ["crates", "xtask/src", "examples"] {
        collect_rs(&root().join(dir), &mut files)?;
    }
    let forbidden = [
        ["#[", "ignore]"].concat(),
        ["should", "_panic"].concat(),
        ["todo", "!("].concat(),
        ["unimplemented", "!("].concat(),
    ];
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let rel = file
            .strip_prefix(root())
            .unwrap_or(file)
            .display()
            .to_string();
        for (i, line) in text.lines().enumerate() {
            for f in &forbidden {
                if line.contains(f.as_str()) {
                    problems.push(format!("{rel}:{}: `{f}` is not allowed", i + 1));
                }
            }
        }
        // Library sources: no unwrap/expect before the first test module unless marked.
        let is_library =
            rel.starts_with("crates/") && rel.contains("/src/") && !rel.ends_with("main.rs");
        if is_library {
            for (i, line) in text.lines().enumerate() {
                if line.contains("#[cfg(test)]") || line.contains("#[cfg(all(test,") {
                    break;
                }
                let bad = line.contains(".unwrap()") || line.contains(".expect(");
                if bad && !line.contains("// invariant:") && !line.trim_start().starts_with("//") {
                    problems.push(format!(
                        "{rel}:{}: unwrap/expect in library code without `// invariant:`",
                        i + 1
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        eprintln!("tidy: {} files clean", files.len());
        Ok(())
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        bail!("tidy: {} problem(s)", problems.len())
    }
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n == "target" || n == "fixtures")
            {
                continue;
            }
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}
