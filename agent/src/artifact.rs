//! Fetching an artifact and checking its sha256 before anything runs. The verified file is kept
//! in the state directory under its digest, so a rollback can reinstall it without a download.

use rollgate_common::quote::quoted;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Why an artifact could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The sha256 given is not 64 hex digits.
    #[error("sha256 {} is not 64 hex digits", quoted(.0))]
    BadDigest(String),
    /// The source is neither a path nor a file/http/https URL.
    #[error("artifact {} is not a local path or a file://, http:// or https:// URL{}", quoted(.source_name), .why)]
    BadSource {
        /// What was given.
        source_name: String,
        /// What is wrong with it, when more can be said (starts with "; ").
        why: String,
    },
    /// The local file does not exist.
    #[error("artifact {} does not exist", quoted(.0))]
    NotFound(String),
    /// The local path names something that cannot be read as a file (a directory, a device,
    /// a name too long, no permission): the caller's input, not the agent's storage.
    #[error("artifact {} cannot be read as a file: {reason}", quoted(.source_name))]
    Unreadable {
        /// What was given.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// The download failed.
    #[error("artifact download {} failed: {message}", quoted(.url))]
    Download {
        /// What was fetched.
        url: String,
        /// Why it failed.
        message: String,
    },
    /// The artifact is larger than allowed.
    #[error("artifact {} is larger than the limit of {limit} bytes", quoted(.source_name))]
    TooLarge {
        /// What was fetched.
        source_name: String,
        /// The limit.
        limit: u64,
    },
    /// The content does not match the sha256 given.
    #[error("artifact {} has sha256 {actual}, not the expected {expected}: nothing was installed", quoted(.source_name))]
    Mismatch {
        /// What was fetched.
        source_name: String,
        /// The digest the caller gave.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// The whole fetch took longer than the agent's `fetch_timeout`.
    #[error("artifact {} was not fetched within fetch_timeout ({}ms); nothing was installed", quoted(.source_name), limit.as_millis())]
    TimedOut {
        /// What was fetched.
        source_name: String,
        /// The limit.
        limit: std::time::Duration,
    },
    /// Local I/O failed.
    #[error("artifact store {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl ArtifactError {
    /// True for failures that may go away when tried again (network, local disk).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ArtifactError::Download { .. }
                | ArtifactError::TimedOut { .. }
                | ArtifactError::Io { .. }
        )
    }
}

/// Normalises a sha256 to lower-case hex, or says why it is not one.
pub fn parse_digest(s: &str) -> Result<String, ArtifactError> {
    let t = s.trim().to_ascii_lowercase();
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(t)
    } else {
        Err(ArtifactError::BadDigest(s.to_owned()))
    }
}

enum Source {
    Local(PathBuf),
    Http(String),
}

fn classify(source: &str) -> Result<Source, ArtifactError> {
    let bad = |why: &str| ArtifactError::BadSource {
        source_name: source.to_owned(),
        why: why.to_owned(),
    };
    // No artifact has a control character in its name; a NUL would fail deep in the open call
    // as if the agent's own storage had failed.
    if source.chars().any(char::is_control) {
        return Err(bad("; it contains a control character"));
    }
    if let Some(rest) = source.strip_prefix("file://") {
        if rest.starts_with('/') {
            return Ok(Source::Local(PathBuf::from(rest)));
        }
        return Err(bad("; a file:// URL needs an absolute path"));
    }
    if source.starts_with("http://") || source.starts_with("https://") {
        // A URL that does not parse is the caller's mistake, not a download that may work
        // if tried again.
        return match reqwest::Url::parse(source) {
            Ok(_) => Ok(Source::Http(source.to_owned())),
            Err(e) => Err(bad(&format!("; the URL does not parse: {e}"))),
        };
    }
    if source.contains("://") || source.is_empty() {
        return Err(bad(""));
    }
    Ok(Source::Local(PathBuf::from(source)))
}

/// Brings `source` into `store` as `<store>/<sha256>` and checks its digest, all within
/// `timeout`. On a mismatch or a timeout nothing is kept. Returns the path of the verified file.
pub async fn fetch_verified(
    http: &reqwest::Client,
    source: &str,
    expected: &str,
    store: &Path,
    limit: u64,
    timeout: std::time::Duration,
) -> Result<PathBuf, ArtifactError> {
    let expected = parse_digest(expected)?;
    let final_path = store.join(&expected);
    let kind = classify(source)?;
    let staging = store.join(format!(
        ".incoming-{}-{}",
        std::process::id(),
        rollgate_common::time::now_ms()
    ));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ArtifactError::Io { path, source }
    };
    let fetch = async {
        let mut out = tokio::fs::File::create(&staging)
            .await
            .map_err(io(&staging))?;
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        match kind {
            Source::Local(path) => {
                use tokio::io::AsyncReadExt;
                // Whatever goes wrong with the caller's path is reported as such: only the
                // artifact store's own files are the agent's storage.
                let unreadable = |reason: String| ArtifactError::Unreadable {
                    source_name: source.to_owned(),
                    reason,
                };
                let mut f = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(ArtifactError::NotFound(path.display().to_string()))
                    }
                    Err(e) => return Err(unreadable(e.to_string())),
                };
                // A directory, a FIFO or a device is not an artifact (and /dev/zero would be
                // read until the size limit).
                match f.metadata().await {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => return Err(unreadable("not a regular file".into())),
                    Err(e) => return Err(unreadable(e.to_string())),
                }
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = f
                        .read(&mut buf)
                        .await
                        .map_err(|e| unreadable(e.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                    if total > limit {
                        return Err(ArtifactError::TooLarge {
                            source_name: source.to_owned(),
                            limit,
                        });
                    }
                    hasher.update(&buf[..n]);
                    out.write_all(&buf[..n]).await.map_err(io(&staging))?;
                }
            }
            Source::Http(url) => {
                let dl = |message: String| ArtifactError::Download {
                    url: url.clone(),
                    message,
                };
                let mut resp = http.get(&url).send().await.map_err(|e| dl(e.to_string()))?;
                if !resp.status().is_success() {
                    return Err(dl(format!("server answered {}", resp.status())));
                }
                while let Some(chunk) = resp.chunk().await.map_err(|e| dl(e.to_string()))? {
                    total += chunk.len() as u64;
                    if total > limit {
                        return Err(ArtifactError::TooLarge {
                            source_name: url.clone(),
                            limit,
                        });
                    }
                    hasher.update(&chunk);
                    out.write_all(&chunk).await.map_err(io(&staging))?;
                }
            }
        }
        out.sync_all().await.map_err(io(&staging))?;
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            return Err(ArtifactError::Mismatch {
                source_name: source.to_owned(),
                expected: expected.clone(),
                actual,
            });
        }
        tokio::fs::rename(&staging, &final_path)
            .await
            .map_err(io(&final_path))?;
        crate::durable::sync_dir(store).map_err(io(store))?;
        Ok(final_path.clone())
    };
    // The timeout wraps the fetch but not the clean-up below, so that an abandoned download
    // leaves no staging file behind.
    let result = match tokio::time::timeout(timeout, fetch).await {
        Ok(r) => r,
        Err(_) => Err(ArtifactError::TimedOut {
            source_name: source.to_owned(),
            limit: timeout,
        }),
    };
    if result.is_err() {
        let _ = tokio::fs::remove_file(&staging).await;
    }
    result
}

/// Removes cached artifacts other than `keep` (the current and previous versions).
pub fn prune(store: &Path, keep: &[&str]) {
    let Ok(entries) = std::fs::read_dir(store) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name.as_str()) && !name.starts_with(".incoming-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: std::time::Duration = std::time::Duration::from_secs(60);

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[tokio::test]
    async fn good_and_bad_digests() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("store");
        std::fs::create_dir(&store)?;
        let art = dir.path().join("a.bin");
        std::fs::write(&art, b"payload")?;
        let http = reqwest::Client::new();
        let p = fetch_verified(
            &http,
            &format!("file://{}", art.display()),
            &sha(b"payload").to_uppercase(),
            &store,
            1 << 20,
            MINUTE,
        )
        .await?;
        assert_eq!(std::fs::read(&p)?, b"payload");
        let bad = fetch_verified(
            &http,
            art.to_str().ok_or("path")?,
            &sha(b"other"),
            &store,
            1 << 20,
            MINUTE,
        )
        .await;
        assert!(
            matches!(bad, Err(ArtifactError::Mismatch { .. })),
            "{bad:?}"
        );
        // Only the verified artifact is left in the store.
        assert_eq!(std::fs::read_dir(&store)?.count(), 1);
        let too_big = fetch_verified(
            &http,
            art.to_str().ok_or("path")?,
            &sha(b"payload"),
            &store,
            3,
            MINUTE,
        )
        .await;
        assert!(matches!(too_big, Err(ArtifactError::TooLarge { .. })));
        let missing = fetch_verified(&http, "/nonexistent/x", &sha(b"x"), &store, 10, MINUTE).await;
        assert!(matches!(missing, Err(ArtifactError::NotFound(_))));
        assert!(matches!(
            parse_digest("abc"),
            Err(ArtifactError::BadDigest(_))
        ));
        for bad in [
            "ftp://x",
            "",
            "file://relative",
            "http://",
            "http://[::1",
            "http://127.0.0.1:99999/x",
            "/tmp/a\0b",
            "/tmp/a\nb",
        ] {
            assert!(
                matches!(classify(bad), Err(ArtifactError::BadSource { .. })),
                "{bad:?}"
            );
        }
        let dir = fetch_verified(&http, "/", &sha(b"x"), &store, 10, MINUTE).await;
        assert!(
            matches!(dir, Err(ArtifactError::Unreadable { .. })),
            "{dir:?}"
        );
        assert_eq!(
            std::fs::read_dir(&store)?.count(),
            1,
            "no staging file left"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_stalled_download_times_out_and_leaves_nothing(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = dir.path().join("store");
        std::fs::create_dir(&store)?;
        // A server that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/a.bin", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((sock, _)) = listener.accept().await {
                held.push(sock);
            }
        });
        let err = fetch_verified(
            &reqwest::Client::new(),
            &url,
            &sha(b"x"),
            &store,
            1 << 20,
            std::time::Duration::from_millis(200),
        )
        .await;
        server.abort();
        assert!(
            matches!(err, Err(ArtifactError::TimedOut { .. })),
            "{err:?}"
        );
        let err = err.err().ok_or("no error")?;
        assert!(err.is_retryable());
        assert!(err.to_string().contains("fetch_timeout (200ms)"), "{err}");
        assert_eq!(
            std::fs::read_dir(&store)?.count(),
            0,
            "no staging file left"
        );
        Ok(())
    }
}
