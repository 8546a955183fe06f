//! Hugging Face Hub model ids (`Qwen/Qwen3-0.6B`): resolved in the local Hugging Face cache
//! the way `huggingface_hub` lays it out, and downloaded into it when missing.
//!
//! - The cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`. A repo
//!   lives in `models--{org}--{name}/`: `refs/{revision}` holds a commit hash,
//!   `snapshots/{commit}/` the files (links into `blobs/{etag}`), exactly as `huggingface_hub`
//!   writes it, so either tool reuses the other's downloads.
//! - A revision (`--revision`, default `main`) is a branch or tag (looked up in `refs/`) or a
//!   40-hex commit.
//! - Missing files are downloaded from `$HF_ENDPOINT` (default `https://huggingface.co`):
//!   `GET /api/models/{repo}/revision/{revision}` lists the files and the commit, then
//!   `GET /{repo}/resolve/{commit}/{file}` each needed file (the model's configuration,
//!   tokenizer, chat template and safetensors weights), following redirects, into
//!   `blobs/{etag}.incomplete`, renamed when complete. A transfer shorter than its
//!   `Content-Length` is an error and leaves no blob. `$HF_TOKEN` is sent when set.
//!   `HF_HUB_OFFLINE=1` never touches the network.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{ModelError, Result};

/// Largest API answer read (the file list of a repo).
const MAX_API_BYTES: u64 = 16 << 20;
/// Redirects followed for one file.
const MAX_REDIRECTS: usize = 8;

/// Files of a repo that a model directory needs.
fn wanted(file: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    !file.contains('/')
        && (matches!(
            name,
            "config.json"
                | "generation_config.json"
                | "tokenizer.json"
                | "tokenizer_config.json"
                | "special_tokens_map.json"
                | "chat_template.jinja"
                | "chat_template.json"
                | "model.safetensors.index.json"
        ) || name.ends_with(".safetensors"))
}

/// True when `s` has the form of a Hub model id (`org/name`, the characters the Hub allows).
pub fn is_hub_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 96
            && !part.starts_with(['.', '-'])
            && !part.contains("..")
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match s.split_once('/') {
        Some((org, name)) => ok(org) && ok(name),
        None => false,
    }
}

/// The Hugging Face cache directory of the environment.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("hub"));
    }
    let home = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(home.join("huggingface").join("hub"))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

fn hub_error(id: &str, message: impl Into<String>) -> ModelError {
    ModelError::Hub {
        id: id.to_string(),
        message: message.into(),
    }
}

/// The model directory of `id` at `revision` (default `main`): the cached snapshot, downloaded
/// first when it is missing (and the environment allows). `progress` is told each file before
/// it is downloaded.
pub fn resolve(
    id: &str,
    revision: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let revision = revision.unwrap_or("main");
    if revision.is_empty() || revision.contains("..") || revision.starts_with('/') {
        return Err(hub_error(id, format!("`{revision}` is not a revision")));
    }
    let cache = cache_dir().ok_or_else(|| {
        hub_error(
            id,
            "no Hugging Face cache directory: set HF_HOME or HF_HUB_CACHE",
        )
    })?;
    let repo_dir = cache.join(format!("models--{}", id.replace('/', "--")));
    if let Some(dir) = cached(&repo_dir, revision) {
        return Ok(dir);
    }
    if offline() {
        return Err(hub_error(
            id,
            format!(
                "not in the Hugging Face cache ({}) at revision `{revision}`, and HF_HUB_OFFLINE is set",
                cache.display()
            ),
        ));
    }
    download(id, revision, &repo_dir, progress)
}

/// The cached snapshot of `revision`, when it holds a `config.json`.
fn cached(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        // A commit hash: bounded, and a regular file (a FIFO would never end).
        crate::read_text_file(&repo_dir.join("refs").join(revision), 4096)
            .ok()?
            .trim()
            .to_string()
    };
    if !is_commit(&commit) {
        return None;
    }
    let dir = repo_dir.join("snapshots").join(commit);
    dir.join("config.json").is_file().then_some(dir)
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("train-rs/", env!("CARGO_PKG_VERSION")))
        .build()
}

fn get(agent: &ureq::Agent, url: &str) -> std::result::Result<ureq::Response, Box<ureq::Error>> {
    let mut request = agent.get(url);
    if let Ok(token) = std::env::var("HF_TOKEN")
        && !token.trim().is_empty()
    {
        request = request.set("Authorization", &format!("Bearer {}", token.trim()));
    }
    request.call().map_err(Box::new)
}

/// What an HTTP failure means to a user.
fn http_error(id: &str, what: &str, e: Box<ureq::Error>) -> ModelError {
    match *e {
        ureq::Error::Status(401 | 403, _) => hub_error(
            id,
            format!("{what}: access refused (a gated or private repo: set HF_TOKEN)"),
        ),
        ureq::Error::Status(404, _) => hub_error(id, format!("{what}: not found (404)")),
        ureq::Error::Status(code, _) => hub_error(id, format!("{what}: HTTP {code}")),
        ureq::Error::Transport(t) => hub_error(
            id,
            format!("{what}: {t} (offline? set HF_HUB_OFFLINE=1 to use the cache only)"),
        ),
    }
}

/// Downloads the files a model directory needs into the cache; returns the snapshot.
fn download(
    id: &str,
    revision: &str,
    repo_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let base = endpoint();
    let agent = agent();
    let api = format!("{base}/api/models/{id}/revision/{revision}");
    let info: serde_json::Value = {
        let response = follow(&agent, &api).map_err(|e| match e {
            Fetch::Http(e) => http_error(id, &format!("revision `{revision}`"), e),
            Fetch::Other(m) => hub_error(id, m),
        })?;
        let mut body = Vec::new();
        response
            .into_reader()
            .take(MAX_API_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|e| hub_error(id, format!("reading {api}: {e}")))?;
        if body.len() as u64 > MAX_API_BYTES {
            return Err(hub_error(
                id,
                format!("{api}: an answer over {MAX_API_BYTES} bytes"),
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| hub_error(id, format!("{api}: not the Hub's JSON: {e}")))?
    };
    let commit = info
        .get("sha")
        .and_then(serde_json::Value::as_str)
        .filter(|c| is_commit(c))
        .ok_or_else(|| hub_error(id, format!("{api}: no commit (`sha`) in the answer")))?
        .to_string();
    let files: Vec<String> = info
        .get("siblings")
        .and_then(serde_json::Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(|f| f.get("rfilename").and_then(serde_json::Value::as_str))
                .filter(|f| wanted(f))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if !files.iter().any(|f| f == "config.json") {
        return Err(hub_error(
            id,
            format!("revision `{revision}` has no config.json: not a transformers model repo"),
        ));
    }
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let blobs = repo_dir.join("blobs");
    for dir in [&snapshot, &blobs] {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    }
    for file in &files {
        let target = snapshot.join(file);
        if target.is_file() {
            continue;
        }
        progress(file);
        let url = format!("{base}/{id}/resolve/{commit}/{file}");
        let (etag, response) = fetch_file(&agent, &url).map_err(|e| match e {
            Fetch::Http(e) => http_error(id, file, e),
            Fetch::Other(m) => hub_error(id, format!("{file}: {m}")),
        })?;
        let blob = blobs.join(&etag);
        if !blob.is_file() {
            write_blob(id, file, response, &blob)?;
        }
        link(&blob, &target, &etag)?;
    }
    if !is_commit(revision) {
        let refs = repo_dir.join("refs");
        std::fs::create_dir_all(&refs).map_err(|e| ModelError::io(&refs, e))?;
        train_fs::write_atomic(&refs.join(revision), commit.as_bytes())
            .map_err(|e| ModelError::io(refs.join(revision), e))?;
    }
    Ok(snapshot)
}

enum Fetch {
    Http(Box<ureq::Error>),
    Other(String),
}

/// GET `url`, following up to [`MAX_REDIRECTS`] redirects (relative ones too).
fn follow(agent: &ureq::Agent, url: &str) -> std::result::Result<ureq::Response, Fetch> {
    Ok(fetch(agent, url)?.1)
}

/// GET `url` with its redirects, and the file's ETag (see [`fetch`]), which must be usable as
/// a blob's name.
fn fetch_file(
    agent: &ureq::Agent,
    url: &str,
) -> std::result::Result<(String, ureq::Response), Fetch> {
    let (etag, response) = fetch(agent, url)?;
    let etag = etag
        .filter(|e| {
            !e.is_empty()
                && e.len() <= 128
                && e.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .ok_or_else(|| Fetch::Other(format!("no usable ETag from {url}")))?;
    Ok((etag, response))
}

/// GET `url` with its redirects; the ETag is the first response's `X-Linked-Etag` (large
/// files, stored apart) or `ETag`, as `huggingface_hub` reads it.
fn fetch(
    agent: &ureq::Agent,
    url: &str,
) -> std::result::Result<(Option<String>, ureq::Response), Fetch> {
    let mut url = url.to_string();
    let mut etag: Option<String> = None;
    for _ in 0..=MAX_REDIRECTS {
        let response = get(agent, &url).map_err(Fetch::Http)?;
        if etag.is_none() {
            etag = response
                .header("x-linked-etag")
                .or_else(|| response.header("etag"))
                .map(|e| {
                    e.trim()
                        .trim_start_matches("W/")
                        .trim_matches('"')
                        .to_string()
                });
        }
        if (300..400).contains(&response.status()) {
            let location = response
                .header("location")
                .ok_or_else(|| Fetch::Other(format!("a redirect without Location from {url}")))?;
            url = if location.starts_with("http://") || location.starts_with("https://") {
                location.to_string()
            } else {
                let origin_end = url
                    .find("://")
                    .and_then(|i| url[i + 3..].find('/').map(|j| i + 3 + j))
                    .unwrap_or(url.len());
                format!(
                    "{}/{}",
                    &url[..origin_end],
                    location.trim_start_matches('/')
                )
            };
            continue;
        }
        return Ok((etag, response));
    }
    Err(Fetch::Other(format!("more than {MAX_REDIRECTS} redirects")))
}

/// Writes the body into `blob` through `blob.incomplete`: complete (as long as its
/// `Content-Length`) or not at all.
fn write_blob(id: &str, file: &str, response: ureq::Response, blob: &Path) -> Result<()> {
    let expected: Option<u64> = response
        .header("content-length")
        .and_then(|l| l.trim().parse().ok());
    let partial = blob.with_extension("incomplete");
    let result = (|| -> std::io::Result<u64> {
        let mut out = std::fs::File::create(&partial)?;
        let n = std::io::copy(&mut response.into_reader(), &mut out)?;
        out.flush()?;
        out.sync_all()?;
        Ok(n)
    })();
    let fail = |message: String| {
        let _ = std::fs::remove_file(&partial);
        Err(hub_error(id, format!("{file}: {message}")))
    };
    match result {
        Err(e) => fail(format!("the transfer broke off: {e}")),
        Ok(n) if expected.is_some_and(|len| len != n) => fail(format!(
            "the transfer stopped after {n} of {} bytes",
            expected.unwrap_or(0)
        )),
        Ok(_) => std::fs::rename(&partial, blob).map_err(|e| ModelError::io(blob, e)),
    }
}

/// `target` → `blob` (a relative link, as `huggingface_hub` makes them; a copy where links
/// cannot be made).
fn link(blob: &Path, target: &Path, etag: &str) -> Result<()> {
    let _ = std::fs::remove_file(target);
    #[cfg(unix)]
    {
        let depth = 2; // snapshots/<commit>/<file> → ../../blobs/<etag>
        let mut relative = PathBuf::new();
        for _ in 0..depth {
            relative.push("..");
        }
        relative.push("blobs");
        relative.push(etag);
        if std::os::unix::fs::symlink(&relative, target).is_ok() {
            return Ok(());
        }
    }
    std::fs::copy(blob, target)
        .map(|_| ())
        .map_err(|e| ModelError::io(target, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_revisions() {
        for ok in [
            "Qwen/Qwen3-0.6B",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "a/b.c_d",
        ] {
            assert!(is_hub_id(ok), "{ok}");
        }
        for bad in [
            "Qwen3",
            "/abs/path",
            "a/b/c",
            "../x",
            "a/..",
            "./x",
            "a/",
            "a b/c",
            "",
        ] {
            assert!(!is_hub_id(bad), "{bad}");
        }
        assert!(is_commit(&"a".repeat(40)) && !is_commit("main"));
        assert!(wanted("model-00001-of-00002.safetensors") && wanted("tokenizer.json"));
        assert!(!wanted("pytorch_model.bin") && !wanted("onnx/model.safetensors"));
    }
}
