//! `--model org/name`: a Hugging Face Hub id, resolved in the local Hugging Face cache and
//! downloaded into it, against a server on loopback that answers as the Hub does (the revision
//! API, `resolve` URLs that redirect large files to a CDN with `X-Linked-Etag`, ETags, a 404,
//! a transfer cut short). Nothing here touches the internet.
#![cfg(feature = "cpu")]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::root;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The tiny Qwen3 checkpoint's files, served as repo `tiny/qwen3`; `tiny/broken` cuts its
/// weights short; any other repo is a 404.
struct Hub {
    port: u16,
    requests: Arc<AtomicUsize>,
}

fn files() -> Vec<(String, Vec<u8>)> {
    let dir = root().join("crates/train-model/tests/fixtures/qwen3");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.push(("README.md".into(), b"# not needed".to_vec()));
    out.sort();
    out
}

fn etag(bytes: &[u8]) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}{:08x}", h.finish(), bytes.len())
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| *k == "Content-Length") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn serve(mut stream: TcpStream, files: &[(String, Vec<u8>)]) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_or(true, |n| n == 0) || line == "\r\n" {
            break;
        }
    }
    let path = request.split(' ').nth(1).unwrap_or("/").to_string();
    let find = |name: &str| files.iter().find(|(n, _)| n == name);
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let repo = rest.split("/revision/").next().unwrap_or("");
        if repo != "tiny/qwen3" && repo != "tiny/broken" {
            return respond(
                &mut stream,
                "404 Not Found",
                &[],
                b"{\"error\": \"Repository not found\"}",
            );
        }
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|(n, _)| serde_json::json!({ "rfilename": n }))
            .collect();
        let body =
            serde_json::json!({ "id": repo, "sha": COMMIT, "siblings": siblings }).to_string();
        return respond(&mut stream, "200 OK", &[], body.as_bytes());
    }
    if let Some(name) = path.strip_prefix("/cdn/") {
        let broken = name.starts_with("broken/");
        let name = name.trim_start_matches("broken/");
        let Some((_, bytes)) = find(name) else {
            return respond(&mut stream, "404 Not Found", &[], b"");
        };
        if broken {
            // The whole length announced, half of it sent, then the connection closes.
            let len = bytes.len().to_string();
            return respond(
                &mut stream,
                "200 OK",
                &[("Content-Length", len)],
                &bytes[..bytes.len() / 2],
            );
        }
        return respond(&mut stream, "200 OK", &[], bytes);
    }
    for (repo, cdn) in [
        ("/tiny/qwen3/resolve/", "/cdn/"),
        ("/tiny/broken/resolve/", "/cdn/broken/"),
    ] {
        if let Some(rest) = path.strip_prefix(repo) {
            let name = rest.strip_prefix(&format!("{COMMIT}/")).unwrap_or("");
            let Some((_, bytes)) = find(name) else {
                return respond(&mut stream, "404 Not Found", &[], b"");
            };
            let tag = format!("\"{}\"", etag(bytes));
            if name.ends_with(".safetensors") {
                // Large files: a redirect to the CDN, the file's ETag in X-Linked-Etag.
                return respond(
                    &mut stream,
                    "302 Found",
                    &[
                        ("Location", format!("{cdn}{name}")),
                        ("X-Linked-Etag", tag),
                        ("ETag", "\"redirect\"".into()),
                    ],
                    b"",
                );
            }
            return respond(&mut stream, "200 OK", &[("ETag", tag)], bytes);
        }
    }
    respond(&mut stream, "404 Not Found", &[], b"");
}

impl Hub {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let files = files();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                counted.fetch_add(1, Ordering::SeqCst);
                serve(stream, &files);
            }
        });
        Self { port, requests }
    }
}

fn generate(home: &Path, hub: &Hub, model: &str, offline: bool) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_train"));
    c.args([
        "generate",
        "--model",
        model,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
    ])
    .env("TRAIN_MODEL_REGISTRY", home.join("models.json"))
    .env("HF_HOME", home.join("hf"))
    .env_remove("HF_HUB_CACHE")
    .env("HF_ENDPOINT", format!("http://127.0.0.1:{}", hub.port));
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    } else {
        c.env_remove("HF_HUB_OFFLINE");
    }
    c.output().unwrap()
}

fn repo_dir(home: &Path, repo: &str) -> PathBuf {
    home.join("hf/hub")
        .join(format!("models--{}", repo.replace('/', "--")))
}

#[test]
fn a_hub_id_is_downloaded_into_the_cache_once_and_then_read_offline() {
    let hub = Hub::start();
    let home = tempfile::tempdir().unwrap();
    let o = generate(home.path(), &hub, "tiny/qwen3", false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("downloading tiny/qwen3"), "{err}");
    // huggingface_hub's layout: refs/main → the commit, snapshot files linked to blobs.
    let repo = repo_dir(home.path(), "tiny/qwen3");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    let snapshot = repo.join("snapshots").join(COMMIT);
    let weights = snapshot.join("model.safetensors");
    let link = std::fs::read_link(&weights).unwrap();
    let served = files();
    let bytes = &served
        .iter()
        .find(|(n, _)| n == "model.safetensors")
        .unwrap()
        .1;
    assert_eq!(link, Path::new("../../blobs").join(etag(bytes)));
    assert_eq!(&std::fs::read(&weights).unwrap(), bytes);
    assert!(
        !snapshot.join("README.md").exists(),
        "only the files a model needs"
    );
    // Again, offline: from the cache, no request.
    let before = hub.requests.load(Ordering::SeqCst);
    let o = generate(home.path(), &hub, "tiny/qwen3", true);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(hub.requests.load(Ordering::SeqCst), before);
    // A pinned commit resolves from the cache too.
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_train"));
    c.args([
        "generate",
        "--model",
        "tiny/qwen3",
        "--revision",
        COMMIT,
        "--prompt",
        "Hi",
    ])
    .args(["--max-new-tokens", "1"])
    .env("TRAIN_MODEL_REGISTRY", home.path().join("models.json"))
    .env("HF_HOME", home.path().join("hf"))
    .env("HF_HUB_OFFLINE", "1");
    let o = c.output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn missing_repos_cut_transfers_and_offline_misses_are_clear_errors_that_leave_nothing() {
    let hub = Hub::start();
    let home = tempfile::tempdir().unwrap();
    let o = generate(home.path(), &hub, "tiny/absent", false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tiny/absent") && err.contains("not found (404)"),
        "{err}"
    );
    assert_eq!(err.matches("error:").count(), 1, "{err}");

    let o = generate(home.path(), &hub, "tiny/broken", false);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("model.safetensors") && err.contains("transfer"),
        "{err}"
    );
    // No blob of the cut file, complete or not, and no ref to a snapshot without weights.
    let repo = repo_dir(home.path(), "tiny/broken");
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        blobs.iter().all(|b| !b.ends_with(".incomplete")),
        "{blobs:?}"
    );
    assert!(!repo.join("refs/main").exists());
    assert!(
        !repo
            .join("snapshots")
            .join(COMMIT)
            .join("model.safetensors")
            .exists()
    );

    let o = generate(home.path(), &hub, "tiny/other", true);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    // A cache whose ref is a FIFO (nothing ever writes it): not read, a plain miss.
    let refs = repo_dir(home.path(), "tiny/fifo").join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(refs.join("main"))
        .status()
        .unwrap();
    assert!(st.success());
    let o = generate(home.path(), &hub, "tiny/fifo", true);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}
