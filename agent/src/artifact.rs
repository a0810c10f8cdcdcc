//! Fetching an artifact and checking its sha256 before anything runs. The verified file is kept
//! in the state directory under its digest, so that a retry or a rollback reinstalls it without
//! a download.
//!
//! What a caller can make the agent read is limited: local paths only under `artifact_dirs`
//! (resolved, symlinks and all, before the check), regular files only, and a digest mismatch of
//! a local file does not say what the file's digest is, so that the agent cannot be used to
//! probe files on the server. URLs are shown without credentials, query or fragment (signed
//! URLs carry their secret there).

use rollgate_common::quote::quoted;
use sha2::{Digest, Sha256};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Why an artifact could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The sha256 given is not 64 hex digits.
    #[error("sha256 {} is not 64 hex digits", quoted(.0))]
    BadDigest(String),
    /// The source is neither a path nor a file/http/https URL.
    #[error("artifact {} is not an absolute local path or a file://, http:// or https:// URL", quoted(.0))]
    BadSource(String),
    /// The local path names something that cannot be opened as a file (a name too long, a
    /// symlink loop, no permission): the caller's input, not the agent's storage.
    #[error("artifact {} cannot be read as a file: {reason}", quoted(.source_name))]
    Unreadable {
        /// The path as given.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// A local source outside the directories the agent may read artifacts from.
    #[error("artifact {} is refused: {why}", quoted(.source_name))]
    NotAllowed {
        /// The path as given.
        source_name: String,
        /// Which rule it breaks.
        why: String,
    },
    /// The local file does not exist.
    #[error("artifact {} does not exist", quoted(.0))]
    NotFound(String),
    /// The local source is a FIFO, a device, a directory or a socket.
    #[error("artifact {} is a {kind}, not a regular file; nothing was read", quoted(.source_name))]
    NotRegular {
        /// The path as given.
        source_name: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// The download failed.
    #[error("artifact download {} failed: {message}", quoted(.url))]
    Download {
        /// What was fetched (redacted).
        url: String,
        /// Why it failed.
        message: String,
    },
    /// No connection to the artifact server within `fetch_connect_timeout`.
    #[error("artifact download {url}: no connection within fetch_connect_timeout ({}ms); nothing was installed", limit.as_millis())]
    ConnectTimedOut {
        /// What was fetched (redacted).
        url: String,
        /// The limit.
        limit: Duration,
    },
    /// The server sent nothing for `fetch_idle_timeout`, before or during the body.
    #[error("artifact download {url} stalled: nothing received for fetch_idle_timeout ({}ms); nothing was installed", limit.as_millis())]
    Stalled {
        /// What was fetched (redacted).
        url: String,
        /// The limit.
        limit: Duration,
    },
    /// The artifact is larger than allowed.
    #[error("artifact {source_name} is larger than the limit of {limit} bytes")]
    TooLarge {
        /// What was fetched (redacted).
        source_name: String,
        /// The limit.
        limit: u64,
    },
    /// The content does not match the sha256 given.
    #[error("{}", mismatch_message(source_name, expected, actual.as_deref()))]
    Mismatch {
        /// What was fetched (redacted).
        source_name: String,
        /// The digest the caller gave.
        expected: String,
        /// The digest of what arrived; only for downloads: for a local file it would tell the
        /// caller the digest of a file on this server.
        actual: Option<String>,
    },
    /// The whole fetch took longer than the agent's `fetch_timeout`.
    #[error("artifact {source_name} was not fetched within fetch_timeout ({}ms); nothing was installed", limit.as_millis())]
    TimedOut {
        /// What was fetched (redacted).
        source_name: String,
        /// The limit.
        limit: Duration,
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

fn mismatch_message(source_name: &str, expected: &str, actual: Option<&str>) -> String {
    match actual {
        Some(actual) => format!(
            "artifact {} has sha256 {actual}, not the expected {expected}: nothing was installed",
            quoted(source_name)
        ),
        None => format!(
            "artifact {} does not match the expected sha256 {expected}: nothing was installed",
            quoted(source_name)
        ),
    }
}

impl ArtifactError {
    /// True for failures that may go away when tried again (network, local disk).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ArtifactError::Download { .. }
                | ArtifactError::ConnectTimedOut { .. }
                | ArtifactError::Stalled { .. }
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

/// `source` fit to show in an error, a log or an event: a URL loses its user name and password,
/// its query and its fragment (a signed URL's signature lives there); anything else, such as a
/// local path, is returned as it is.
pub fn redact_url(source: &str) -> String {
    let Some(scheme_end) = source.find("://") else {
        return source.to_owned();
    };
    let (scheme, rest) = source.split_at(scheme_end + 3);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let mut out = String::with_capacity(source.len());
    out.push_str(scheme);
    match authority.rfind('@') {
        Some(at) => {
            out.push_str("<redacted>@");
            out.push_str(&authority[at + 1..]);
        }
        None => out.push_str(authority),
    }
    let path_end = tail.find(['?', '#']).unwrap_or(tail.len());
    out.push_str(&tail[..path_end]);
    match tail[path_end..].chars().next() {
        Some('?') => out.push_str("?<redacted>"),
        Some('#') => out.push_str("#<redacted>"),
        _ => {}
    }
    out
}

/// The secret parts of a URL (user info, query, fragment), to scrub from third-party messages
/// that may quote the URL.
fn url_secrets(url: &str) -> Vec<&str> {
    let Some(scheme_end) = url.find("://") else {
        return Vec::new();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let mut out = Vec::new();
    if let Some(at) = rest[..authority_end].rfind('@') {
        out.push(&rest[..at]);
    }
    let tail = &rest[authority_end..];
    if let Some(q) = tail.find(['?', '#']) {
        out.push(&tail[q + 1..]);
    }
    out.retain(|s| !s.is_empty());
    out
}

/// A reqwest error as one line without the URL it may quote: its own text and its causes'.
fn describe_http_error(e: reqwest::Error, url: &str) -> String {
    let e = e.without_url();
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    // Belt and braces: no layer below should quote the URL, but if one does, its secrets go.
    for secret in url_secrets(url) {
        message = message.replace(secret, "<redacted>");
    }
    message
}

/// How the agent fetches artifacts (from its config).
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// The largest artifact accepted, in bytes.
    pub max_bytes: u64,
    /// The whole fetch, cache check and download included.
    pub timeout: Duration,
    /// Connecting to the artifact server.
    pub connect_timeout: Duration,
    /// The longest silence from the artifact server, before the headers or within the body.
    pub idle_timeout: Duration,
    /// Local artifacts are read only from under these directories (empty: none).
    pub local_dirs: Vec<PathBuf>,
}

/// Fetches artifacts into one artifact store (a directory the agent alone can write).
#[derive(Debug, Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    store: PathBuf,
    policy: FetchPolicy,
}

enum Source {
    Local(PathBuf),
    Http(String),
}

fn classify(source: &str) -> Result<Source, ArtifactError> {
    // No artifact has a control character in its name; a NUL would fail deep in the open call
    // as if the agent's own storage had failed.
    if source.chars().any(char::is_control) {
        return Err(ArtifactError::BadSource(redact_url(source)));
    }
    if let Some(rest) = source.strip_prefix("file://") {
        if rest.starts_with('/') {
            return Ok(Source::Local(PathBuf::from(rest)));
        }
        return Err(ArtifactError::BadSource(redact_url(source)));
    }
    if source.starts_with("http://") || source.starts_with("https://") {
        // A URL that does not parse is the caller's mistake, not a download that may work
        // if tried again.
        return match reqwest::Url::parse(source) {
            Ok(_) => Ok(Source::Http(source.to_owned())),
            Err(_) => Err(ArtifactError::BadSource(redact_url(source))),
        };
    }
    if source.contains("://") || !source.starts_with('/') {
        return Err(ArtifactError::BadSource(redact_url(source)));
    }
    Ok(Source::Local(PathBuf::from(source)))
}

/// What a file that is not a regular one is, for messages.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens a file for reading without following a final symlink and without blocking on a FIFO,
/// and refuses anything but a regular file (checked on the opened descriptor, so that the file
/// cannot be swapped after the check).
async fn open_regular(path: &Path, shown: &str) -> Result<tokio::fs::File, ArtifactError> {
    let f = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ArtifactError::NotFound(shown.to_owned()),
            _ => ArtifactError::Io {
                path: path.to_owned(),
                source: e,
            },
        })?;
    let meta = f.metadata().await.map_err(|source| ArtifactError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(ArtifactError::NotRegular {
            source_name: shown.to_owned(),
            kind: kind_of(meta.file_type()),
        });
    }
    Ok(f)
}

/// The sha256 of everything `f` holds from its start.
async fn hash_file(f: &mut tokio::fs::File, path: &Path) -> Result<String, ArtifactError> {
    let io = |source| ArtifactError::Io {
        path: path.to_owned(),
        source,
    };
    f.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The prefix of staging files in the store (never pruned: a download may be writing one).
pub const STAGING_PREFIX: &str = ".incoming-";

/// A staging file, removed when dropped unless it was renamed into place: an error, a timeout
/// or a cancelled call leaves nothing behind.
struct Staging {
    path: PathBuf,
    kept: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates a new staging file in `store`: a random name, created exclusively (never an existing
/// file or a symlink planted under that name), readable and writable by the agent only.
fn create_staging(store: &Path) -> std::io::Result<(Staging, std::fs::File)> {
    let mut last = None;
    // A clash of 128 random bits means a broken random source; a few tries tell that apart
    // from bad luck.
    for _ in 0..4 {
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
        let path = store.join(format!("{STAGING_PREFIX}{}", hex::encode(id)));
        match crate::durable::create_private(&path) {
            Ok(f) => return Ok((Staging { path, kept: false }, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no staging file name found")))
}

impl Fetcher {
    /// A fetcher into `store` (which must exist) with its own HTTP client.
    pub fn new(store: PathBuf, policy: FetchPolicy) -> Result<Fetcher, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(policy.connect_timeout)
            .read_timeout(policy.idle_timeout)
            .build()?;
        Ok(Fetcher {
            http,
            store,
            policy,
        })
    }

    /// The HTTP client, shared with the health probe: one client (and one copy of the
    /// system's CA roots) per agent. The probe sets its own per-request timeout.
    pub fn client(&self) -> &reqwest::Client {
        &self.http
    }

    /// Where the verified artifact with `sha256` is kept.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.store.join(sha256)
    }

    /// Brings `source` into the store as `<store>/<sha256>` and checks its digest, all within
    /// `fetch_timeout`, and returns the path of the verified file. An artifact already in the
    /// store is hashed again and used without a download when it matches. On a mismatch or a
    /// timeout nothing new is kept.
    pub async fn fetch_verified(
        &self,
        source: &str,
        expected: &str,
    ) -> Result<PathBuf, ArtifactError> {
        let expected = parse_digest(expected)?;
        let shown = redact_url(source);
        let kind = classify(source)?;
        if let Source::Local(path) = &kind {
            // Before the cache: a refused source is refused whatever the cache holds.
            self.check_lexically(path, &shown)?;
        }
        let timeout = self.policy.timeout;
        let work = async {
            if let Some(hit) = self.cached(&expected).await? {
                return Ok(hit);
            }
            self.fetch_into_store(kind, &shown, &expected).await
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ArtifactError::TimedOut {
                source_name: shown,
                limit: timeout,
            }),
        }
    }

    /// The cached artifact, if it is there and still has its digest. One that does not (changed
    /// on disk behind the agent's back) is removed, so that nothing uses it.
    async fn cached(&self, expected: &str) -> Result<Option<PathBuf>, ArtifactError> {
        let path = self.path_of(expected);
        let shown = path.display().to_string();
        let mut f = match open_regular(&path, &shown).await {
            Ok(f) => f,
            Err(ArtifactError::NotFound(_)) => return Ok(None),
            Err(ArtifactError::NotRegular { kind, .. }) => {
                tracing::warn!(path = %shown, kind, "artifact cache entry is not a regular file; removing it");
                remove_cached(&path, None)?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let actual = hash_file(&mut f, &path).await?;
        let meta = f.metadata().await.map_err(|source| ArtifactError::Io {
            path: path.clone(),
            source,
        })?;
        if actual != expected {
            tracing::warn!(path = %shown, "cached artifact does not match its sha256; removing it and fetching again");
            remove_cached(&path, Some(meta.ino()))?;
            return Ok(None);
        }
        // A file cached by an older agent may still carry the default umask's mode.
        if meta.permissions().mode() & 0o077 != 0 {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .await
                .map_err(|source| ArtifactError::Io {
                    path: path.clone(),
                    source,
                })?;
        }
        tracing::debug!(sha256 = %expected, "artifact found verified in the cache");
        Ok(Some(path))
    }

    /// Local sources: absolute, without `..`, under one of `artifact_dirs` as written or as
    /// resolved. Checked without touching the file system beyond the listed directories, so
    /// that a refusal says nothing about what exists elsewhere.
    fn check_lexically(&self, path: &Path, shown: &str) -> Result<(), ArtifactError> {
        let refuse = |why: String| ArtifactError::NotAllowed {
            source_name: shown.to_owned(),
            why,
        };
        if self.policy.local_dirs.is_empty() {
            return Err(refuse(
                "local artifacts are not allowed on this agent (artifact_dirs is empty); \
                 use an http(s) URL or list the directory in artifact_dirs"
                    .into(),
            ));
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(refuse(
                "the path contains \"..\"; give the plain path of a file under artifact_dirs"
                    .into(),
            ));
        }
        let under = self.policy.local_dirs.iter().any(|d| {
            path.starts_with(d)
                || std::fs::canonicalize(d).is_ok_and(|canonical| path.starts_with(canonical))
        });
        if !under {
            return Err(refuse(format!(
                "it is not under artifact_dirs ({})",
                self.dirs_listed()
            )));
        }
        Ok(())
    }

    fn dirs_listed(&self) -> String {
        self.policy
            .local_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Resolves a local source (symlinks included) and checks that the file itself, not just
    /// the name given, is under one of `artifact_dirs`.
    async fn resolve_local(&self, path: &Path, shown: &str) -> Result<PathBuf, ArtifactError> {
        let real = tokio::fs::canonicalize(path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => ArtifactError::NotFound(shown.to_owned()),
                _ => ArtifactError::Io {
                    path: path.to_owned(),
                    source: e,
                },
            })?;
        let under = self
            .policy
            .local_dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .any(|d| real.starts_with(d));
        if !under {
            return Err(ArtifactError::NotAllowed {
                source_name: shown.to_owned(),
                why: format!(
                    "it resolves to a file outside artifact_dirs ({})",
                    self.dirs_listed()
                ),
            });
        }
        Ok(real)
    }

    async fn fetch_into_store(
        &self,
        kind: Source,
        shown: &str,
        expected: &str,
    ) -> Result<PathBuf, ArtifactError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ArtifactError::Io { path, source }
        };
        let (mut staging, file) = create_staging(&self.store).map_err(io(&self.store))?;
        let mut out = tokio::fs::File::from_std(file);
        let limit = self.policy.max_bytes;
        let too_large = || ArtifactError::TooLarge {
            source_name: shown.to_owned(),
            limit,
        };
        let mut total: u64 = 0;
        let local = matches!(kind, Source::Local(_));
        match kind {
            Source::Local(path) => {
                // Whatever goes wrong opening the caller's path is the caller's input; only the
                // artifact store's own files are the agent's storage.
                let unreadable = |e: ArtifactError| match e {
                    ArtifactError::Io { source, .. } => ArtifactError::Unreadable {
                        source_name: shown.to_owned(),
                        reason: source.to_string(),
                    },
                    other => other,
                };
                let real = self.resolve_local(&path, shown).await.map_err(unreadable)?;
                let mut f = open_regular(&real, shown).await.map_err(unreadable)?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = f.read(&mut buf).await.map_err(io(&real))?;
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                    if total > limit {
                        return Err(too_large());
                    }
                    out.write_all(&buf[..n]).await.map_err(io(&staging.path))?;
                }
            }
            Source::Http(url) => {
                let fail = |e: reqwest::Error| {
                    if e.is_timeout() && e.is_connect() {
                        ArtifactError::ConnectTimedOut {
                            url: shown.to_owned(),
                            limit: self.policy.connect_timeout,
                        }
                    } else if e.is_timeout() {
                        ArtifactError::Stalled {
                            url: shown.to_owned(),
                            limit: self.policy.idle_timeout,
                        }
                    } else {
                        ArtifactError::Download {
                            url: shown.to_owned(),
                            message: describe_http_error(e, &url),
                        }
                    }
                };
                let mut resp = self.http.get(&url).send().await.map_err(fail)?;
                if !resp.status().is_success() {
                    return Err(ArtifactError::Download {
                        url: shown.to_owned(),
                        message: format!("server answered {}", resp.status()),
                    });
                }
                while let Some(chunk) = resp.chunk().await.map_err(fail)? {
                    total += chunk.len() as u64;
                    if total > limit {
                        return Err(too_large());
                    }
                    out.write_all(&chunk).await.map_err(io(&staging.path))?;
                }
            }
        }
        out.flush().await.map_err(io(&staging.path))?;
        out.sync_all().await.map_err(io(&staging.path))?;
        // The digest is of the bytes on disk, read back through the same descriptor: what was
        // received is not necessarily what was stored.
        let actual = hash_file(&mut out, &staging.path).await?;
        if actual != expected {
            return Err(ArtifactError::Mismatch {
                source_name: shown.to_owned(),
                expected: expected.to_owned(),
                actual: (!local).then_some(actual),
            });
        }
        drop(out);
        let final_path = self.path_of(expected);
        tokio::fs::rename(&staging.path, &final_path)
            .await
            .map_err(io(&final_path))?;
        staging.kept = true;
        crate::durable::sync_dir(&self.store).map_err(io(&self.store))?;
        tracing::info!(source = %shown, sha256 = %expected, bytes = total, "artifact fetched and verified");
        Ok(final_path)
    }
}

/// Removes a bad cache entry; with `ino`, only if the path still names that file (another fetch
/// may have just renamed a good copy into place).
fn remove_cached(path: &Path, ino: Option<u64>) -> Result<(), ArtifactError> {
    if let Some(ino) = ino {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.ino() != ino => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(ArtifactError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ArtifactError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes cached artifacts other than `keep` (the current and previous versions).
pub fn prune(store: &Path, keep: &[&str]) {
    let Ok(entries) = std::fs::read_dir(store) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name.as_str()) && !name.starts_with(STAGING_PREFIX) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::Ordering;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const MINUTE: Duration = Duration::from_secs(60);

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    /// A fetcher into `<dir>/store` that may read local artifacts from `dir`.
    fn fetcher_in(dir: &Path, timeout: Duration) -> Result<Fetcher, Box<dyn std::error::Error>> {
        with_policy(
            dir,
            FetchPolicy {
                max_bytes: 1 << 20,
                timeout,
                connect_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(30),
                local_dirs: vec![dir.to_owned()],
            },
        )
    }

    fn with_policy(dir: &Path, policy: FetchPolicy) -> Result<Fetcher, Box<dyn std::error::Error>> {
        let store = dir.join("store");
        std::fs::create_dir_all(&store)?;
        Ok(Fetcher::new(store, policy)?)
    }

    /// What a test HTTP server does with each request it reads.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// Answers 200 with the body.
        Serve(&'static [u8]),
        /// Sends the headers and the first bytes of the body, then stalls with the socket open.
        StallMidBody(&'static [u8]),
        /// Answers 404.
        NotFound,
        /// Reads the request and never answers.
        NeverAnswer,
    }

    /// A real HTTP/1.1 server on 127.0.0.1 that counts the requests it reads.
    struct TestServer {
        addr: std::net::SocketAddr,
        requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve(behaviour: Behaviour) -> std::io::Result<TestServer> {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut sock, _)) = listener.accept().await {
                let counter = counter.clone();
                held.push(tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = match behaviour {
                        Behaviour::Serve(body) => {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = sock.write_all(head.as_bytes()).await;
                            sock.write_all(body).await
                        }
                        Behaviour::StallMidBody(first) => {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                first.len() + 1000
                            );
                            let _ = sock.write_all(head.as_bytes()).await;
                            let _ = sock.write_all(first).await;
                            // Held open, silent, until the server is dropped.
                            std::future::pending::<()>().await;
                            Ok(())
                        }
                        Behaviour::NeverAnswer => {
                            std::future::pending::<()>().await;
                            Ok(())
                        }
                        Behaviour::NotFound => {
                            sock.write_all(
                                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                            )
                            .await
                        }
                    };
                }));
            }
        });
        Ok(TestServer {
            addr,
            requests,
            task,
        })
    }

    fn mode_of(path: &Path) -> std::io::Result<u32> {
        Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
    }

    fn names_in(dir: &Path) -> std::io::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        v.sort();
        Ok(v)
    }

    #[tokio::test]
    async fn good_and_bad_digests() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = fetcher_in(dir.path(), MINUTE)?;
        let store = dir.path().join("store");
        let art = dir.path().join("a.bin");
        std::fs::write(&art, b"payload")?;
        let p = f
            .fetch_verified(
                &format!("file://{}", art.display()),
                &sha(b"payload").to_uppercase(),
            )
            .await?;
        assert_eq!(std::fs::read(&p)?, b"payload");
        assert_eq!(mode_of(&p)?, 0o600);
        let bad = f
            .fetch_verified(art.to_str().ok_or("path")?, &sha(b"other"))
            .await;
        assert!(
            matches!(bad, Err(ArtifactError::Mismatch { .. })),
            "{bad:?}"
        );
        // Only the verified artifact is left in the store.
        assert_eq!(names_in(&store)?, [sha(b"payload")]);
        let small = with_policy(
            dir.path(),
            FetchPolicy {
                max_bytes: 3,
                ..f.policy.clone()
            },
        )?;
        let too_big = small
            .fetch_verified(art.to_str().ok_or("path")?, &sha(b"x"))
            .await;
        assert!(matches!(too_big, Err(ArtifactError::TooLarge { .. })));
        let missing = dir.path().join("missing");
        let missing = f
            .fetch_verified(missing.to_str().ok_or("path")?, &sha(b"x"))
            .await;
        assert!(matches!(missing, Err(ArtifactError::NotFound(_))));
        assert!(matches!(
            parse_digest("abc"),
            Err(ArtifactError::BadDigest(_))
        ));
        for bad in ["ftp://x", "relative/path", "", "file://relative"] {
            assert!(
                matches!(classify(bad), Err(ArtifactError::BadSource(_))),
                "{bad:?}"
            );
        }
        assert_eq!(names_in(&store)?, [sha(b"payload")]);
        Ok(())
    }

    #[tokio::test]
    async fn local_artifacts_are_read_only_from_under_artifact_dirs() -> TestResult {
        let dir = tempfile::tempdir()?;
        let allowed = dir.path().join("incoming");
        let outside = dir.path().join("private");
        let lookalike = dir.path().join("incoming-evil");
        for d in [&allowed, &outside, &lookalike] {
            std::fs::create_dir(d)?;
        }
        std::fs::write(allowed.join("ok.bin"), b"ok")?;
        std::fs::write(outside.join("secret"), b"secret")?;
        std::fs::write(lookalike.join("x"), b"secret")?;
        std::os::unix::fs::symlink(outside.join("secret"), allowed.join("link-out"))?;
        std::os::unix::fs::symlink(&outside, allowed.join("dir-out"))?;
        let policy = |local_dirs: Vec<PathBuf>| FetchPolicy {
            max_bytes: 1 << 20,
            timeout: MINUTE,
            connect_timeout: MINUTE,
            idle_timeout: MINUTE,
            local_dirs,
        };
        let f = with_policy(dir.path(), policy(vec![allowed.clone()]))?;
        let secret = sha(b"secret");
        let refused = [
            outside.join("secret").display().to_string(),
            format!("file://{}", outside.join("secret").display()),
            format!("{}/../private/secret", allowed.display()),
            lookalike.join("x").display().to_string(),
            allowed.join("link-out").display().to_string(),
            allowed.join("dir-out").join("secret").display().to_string(),
            // Outside and missing: refused the same way, so existence is not revealed.
            "/nonexistent/file".into(),
        ];
        for source in &refused {
            let err = f.fetch_verified(source, &secret).await;
            assert!(
                matches!(err, Err(ArtifactError::NotAllowed { .. })),
                "{source}: {err:?}"
            );
            let err = err.err().ok_or("refused")?;
            assert!(!err.is_retryable());
            assert!(err.to_string().contains("artifact_dirs"), "{err}");
        }
        assert!(names_in(&dir.path().join("store"))?.is_empty());
        f.fetch_verified(allowed.join("ok.bin").to_str().ok_or("path")?, &sha(b"ok"))
            .await?;

        // An allowed directory named through a symlink works through either name.
        let via_link = dir.path().join("incoming-link");
        std::os::unix::fs::symlink(&allowed, &via_link)?;
        let f = with_policy(dir.path(), policy(vec![via_link.clone()]))?;
        for source in [allowed.join("ok.bin"), via_link.join("ok.bin")] {
            f.fetch_verified(source.to_str().ok_or("path")?, &sha(b"ok"))
                .await?;
        }

        // No directories: no local artifacts at all, but downloads still work.
        let f = with_policy(dir.path(), policy(Vec::new()))?;
        let err = f
            .fetch_verified(allowed.join("ok.bin").to_str().ok_or("path")?, &sha(b"ok"))
            .await
            .err()
            .ok_or("refused")?;
        assert!(err.to_string().contains("artifact_dirs is empty"), "{err}");
        let server = serve(Behaviour::Serve(b"ok")).await?;
        f.fetch_verified(&format!("http://{}/ok.bin", server.addr), &sha(b"ok"))
            .await?;
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_fetches_of_one_artifact_all_succeed() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = fetcher_in(dir.path(), MINUTE)?;
        let store = dir.path().join("store");
        let art = dir.path().join("a.bin");
        let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        std::fs::write(&art, &payload)?;
        let digest = sha(&payload);
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(16));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (f, art, digest, start) = (
                f.clone(),
                art.display().to_string(),
                digest.clone(),
                start.clone(),
            );
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                f.fetch_verified(&art, &digest).await
            }));
        }
        for t in tasks {
            let path = t.await??;
            assert_eq!(path, store.join(&digest));
        }
        assert_eq!(std::fs::read(store.join(&digest))?, payload);
        assert_eq!(mode_of(&store.join(&digest))?, 0o600);
        assert_eq!(names_in(&store)?, [digest], "no staging file left");
        Ok(())
    }

    #[test]
    fn staging_files_are_new_private_and_uniquely_named() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut held = Vec::new();
        let mut names = std::collections::HashSet::new();
        for _ in 0..200 {
            let (staging, file) = create_staging(dir.path())?;
            assert!(
                names.insert(staging.path.clone()),
                "{:?} twice",
                staging.path
            );
            assert_eq!(mode_of(&staging.path)?, 0o600);
            held.push((staging, file));
        }
        // Created exclusively: an existing file or a planted symlink is never opened.
        let taken = dir.path().join("taken");
        std::fs::write(&taken, b"x")?;
        let err = crate::durable::create_private(&taken)
            .err()
            .ok_or("reused")?;
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("target"), &link)?;
        assert!(crate::durable::create_private(&link).is_err());
        assert!(!dir.path().join("target").exists());
        // Dropped without being kept: removed.
        drop(held);
        assert_eq!(names_in(dir.path())?, ["link", "taken"]);
        Ok(())
    }

    #[tokio::test]
    async fn a_second_fetch_uses_the_verified_cache_and_a_tampered_one_is_fetched_again(
    ) -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = fetcher_in(dir.path(), MINUTE)?;
        let server = serve(Behaviour::Serve(b"release 2.0")).await?;
        let url = format!("http://{}/r.bin", server.addr);
        let digest = sha(b"release 2.0");
        let p = f.fetch_verified(&url, &digest).await?;
        let again = f.fetch_verified(&url, &digest).await?;
        assert_eq!(p, again);
        assert_eq!(
            server.requests.load(Ordering::SeqCst),
            1,
            "the second fetch must come from the cache"
        );
        // The cache is on disk and may be changed behind the agent's back: it is hashed again.
        std::fs::write(&p, b"tampered")?;
        let third = f.fetch_verified(&url, &digest).await?;
        assert_eq!(std::fs::read(&third)?, b"release 2.0");
        assert_eq!(server.requests.load(Ordering::SeqCst), 2);
        // A bad cache entry is removed even when the new download fails.
        std::fs::write(&p, b"tampered")?;
        drop(server);
        let err = f.fetch_verified(&url, &digest).await;
        assert!(err.is_err(), "{err:?}");
        assert!(!p.exists(), "the tampered file must not stay in the cache");
        Ok(())
    }

    #[tokio::test]
    async fn a_stall_mid_body_fails_at_the_idle_timeout_not_the_whole_fetch_timeout() -> TestResult
    {
        let dir = tempfile::tempdir()?;
        let f = with_policy(
            dir.path(),
            FetchPolicy {
                idle_timeout: Duration::from_millis(300),
                ..fetcher_in(dir.path(), Duration::from_secs(20))?.policy
            },
        )?;
        for behaviour in [
            Behaviour::StallMidBody(b"first bytes"),
            Behaviour::NeverAnswer,
        ] {
            let server = serve(behaviour).await?;
            let url = format!("http://{}/r.bin", server.addr);
            let started = std::time::Instant::now();
            let err = f
                .fetch_verified(&url, &sha(b"x"))
                .await
                .err()
                .ok_or("a stalled download must fail")?;
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "took {:?}: {err}",
                started.elapsed()
            );
            assert!(matches!(err, ArtifactError::Stalled { .. }), "{err:?}");
            assert!(
                err.to_string().contains("fetch_idle_timeout (300ms)"),
                "{err}"
            );
            assert!(err.is_retryable());
            assert_eq!(server.requests.load(Ordering::SeqCst), 1);
            assert!(
                names_in(&dir.path().join("store"))?.is_empty(),
                "no staging file left"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_server_that_never_accepts_fails_at_the_connect_timeout() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = with_policy(
            dir.path(),
            FetchPolicy {
                connect_timeout: Duration::from_millis(300),
                ..fetcher_in(dir.path(), Duration::from_secs(20))?.policy
            },
        )?;
        // A listener that never accepts, with its accept queue filled: Linux then drops further
        // SYNs, and a connect hangs as it does towards a dead host.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let listener = socket.listen(0)?;
        let addr = listener.local_addr()?;
        let mut queued = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(conn) => queued.push(conn?),
                Err(_) => break,
            }
            if std::time::Instant::now() > deadline {
                return Err("the accept queue never filled up".into());
            }
        }
        let started = std::time::Instant::now();
        let err = f
            .fetch_verified(&format!("http://{addr}/r.bin"), &sha(b"x"))
            .await
            .err()
            .ok_or("must fail")?;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}: {err}",
            started.elapsed()
        );
        assert!(
            matches!(err, ArtifactError::ConnectTimedOut { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("fetch_connect_timeout (300ms)"),
            "{err}"
        );
        assert!(err.is_retryable());
        drop(queued);
        Ok(())
    }

    #[tokio::test]
    async fn a_stalled_download_times_out_and_leaves_nothing() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = fetcher_in(dir.path(), Duration::from_millis(200))?;
        let server = serve(Behaviour::NeverAnswer).await?;
        let url = format!("http://{}/a.bin", server.addr);
        let err = f.fetch_verified(&url, &sha(b"x")).await;
        assert!(
            matches!(err, Err(ArtifactError::TimedOut { .. })),
            "{err:?}"
        );
        let err = err.err().ok_or("no error")?;
        assert!(err.is_retryable());
        assert!(err.to_string().contains("fetch_timeout (200ms)"), "{err}");
        assert!(
            names_in(&dir.path().join("store"))?.is_empty(),
            "no staging file left"
        );
        Ok(())
    }

    #[tokio::test]
    async fn urls_in_errors_carry_no_credentials_query_or_fragment() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = fetcher_in(dir.path(), MINUTE)?;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        let missing = serve(Behaviour::NotFound).await?;
        let wrong = serve(Behaviour::Serve(b"not it")).await?;
        for addr in [closed, missing.addr, wrong.addr] {
            let url = format!("http://user:secret@{addr}/a.bin?sig=XYZ#frag");
            let err = f
                .fetch_verified(&url, &sha(b"x"))
                .await
                .err()
                .ok_or("must fail")?;
            let text = format!("{err} {err:?}");
            for leak in ["secret", "XYZ", "frag", "user"] {
                assert!(!text.contains(leak), "{leak:?} shown in: {text}");
            }
            assert!(text.contains(&format!("{addr}/a.bin")), "{text}");
        }
        // A download's own digest may be shown: it says nothing about this server's files.
        let err = f
            .fetch_verified(&format!("http://{}/a.bin", wrong.addr), &sha(b"x"))
            .await
            .err()
            .ok_or("must fail")?;
        assert!(err.to_string().contains(&sha(b"not it")), "{err}");
        Ok(())
    }

    #[test]
    fn redact_url_keeps_scheme_host_and_path_only() {
        for (given, shown) in [
            (
                "https://user:pw@repo.example:8443/a/b.tgz?X-Amz-Signature=abc&x=1#top",
                "https://<redacted>@repo.example:8443/a/b.tgz?<redacted>",
            ),
            ("http://token@host/x", "http://<redacted>@host/x"),
            ("http://host/x#frag", "http://host/x#<redacted>"),
            ("http://host?sig=1", "http://host?<redacted>"),
            ("http://a@b@host/p", "http://<redacted>@host/p"),
            ("https://host/p", "https://host/p"),
            ("/var/lib/incoming/a?b.tgz", "/var/lib/incoming/a?b.tgz"),
            ("file:///srv/a.tgz", "file:///srv/a.tgz"),
        ] {
            assert_eq!(redact_url(given), shown, "{given}");
        }
    }

    #[tokio::test]
    async fn a_local_mismatch_does_not_reveal_the_file_digest() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = fetcher_in(dir.path(), MINUTE)?;
        let art = dir.path().join("secret.txt");
        std::fs::write(&art, b"private")?;
        let err = f
            .fetch_verified(art.to_str().ok_or("path")?, &sha(b"guess"))
            .await
            .err()
            .ok_or("must fail")?;
        assert!(matches!(err, ArtifactError::Mismatch { .. }), "{err:?}");
        let text = format!("{err} {err:?}");
        assert!(!text.contains(&sha(b"private")), "{text}");
        assert!(text.contains("does not match"), "{text}");
        Ok(())
    }

    #[tokio::test]
    async fn a_fifo_or_a_directory_is_refused_at_once() -> TestResult {
        let dir = tempfile::tempdir()?;
        let f = fetcher_in(dir.path(), Duration::from_secs(5))?;
        let fifo = dir.path().join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        let started = std::time::Instant::now();
        let err = f
            .fetch_verified(fifo.to_str().ok_or("path")?, &sha(b"x"))
            .await;
        // Whatever happened, release a reader stuck in open(2), or the runtime cannot shut down.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo);
        let err = err.err().ok_or("a fifo must be refused")?;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}: {err}",
            started.elapsed()
        );
        assert!(
            matches!(err, ArtifactError::NotRegular { kind: "fifo", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(!err.is_retryable());
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub)?;
        let err = f
            .fetch_verified(sub.to_str().ok_or("path")?, &sha(b"x"))
            .await;
        assert!(
            matches!(
                err,
                Err(ArtifactError::NotRegular {
                    kind: "directory",
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(names_in(&dir.path().join("store"))?.is_empty());
        Ok(())
    }
}
