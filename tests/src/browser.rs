//! A real, headless Chromium for tests of web pages: [`Browser`] starts Debian's `chromium` and
//! drives it over the Chrome DevTools Protocol (CDP); [`Page`] is one tab, where a test
//! evaluates JavaScript ([`Page::eval`]) and takes screenshots ([`Page::screenshot`]).
//!
//! # The pipe
//!
//! Chromium is started with `--remote-debugging-pipe`: it reads commands from its fd 3 and
//! writes responses and events to its fd 4, each message one JSON object followed by a NUL
//! byte. No port, so nothing else on the machine can talk to it and nothing races for a port.
//! A child started from safe Rust has only fds 0, 1 and 2, so it is started through `sh`, which
//! moves them into place before it `exec`s Chromium (same pid):
//!
//! ```text
//! sh -c 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2' chromium --remote-debugging-pipe ...
//! ```
//!
//! Redirections apply left to right: fd 3 becomes a copy of our stdin pipe (Chromium reads our
//! commands there), fd 4 a copy of our stdout pipe (we read its answers), then fd 0 is pointed
//! at /dev/null and fd 1 at fd 2, the log file: after the redirections only fds 3 and 4 hold the
//! pipes, and whatever Chromium prints goes to the log.
//!
//! # Lifetime
//!
//! Chromium is started through [`crate::owner::tied_std`], so the kernel SIGKILLs it when the
//! test process dies, also when no `Drop` runs; its helper processes (zygotes, renderers, the
//! GPU and network processes) exit when it does. It runs in a process group of its own, which
//! [`Browser::close`] and `Drop` kill as a whole. Its profile, its `HOME` and its log live in a
//! temporary directory (under `TMPDIR`, so `scripts/test` finds a browser left behind).

use crate::{ci, eventually};
use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long one CDP command may take before it fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// How long Chromium may take to start and answer its first command.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Browser::close`] waits for the whole process tree to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The window and every page's viewport (CSS pixels, scale 1): screenshots have this size.
pub const WINDOW: (u32, u32) = (1280, 900);

/// The Chromium to run: `ROLLGATE_CHROMIUM` when set, else `chromium` on PATH (Debian's
/// launcher, `/usr/bin/chromium`).
pub fn chromium_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ROLLGATE_CHROMIUM") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
}

/// The last [`Event`] of a browser: not Chromium's, sent when its pipe closes.
pub const PIPE_CLOSED: &str = "Rollgate.pipeClosed";

/// An event Chromium sent (a message without an id), or [`PIPE_CLOSED`].
#[derive(Debug, Clone)]
pub struct Event {
    /// E.g. `Page.lifecycleEvent`.
    pub method: String,
    /// Its parameters.
    pub params: Value,
    /// The session (tab) it is about; `None` for the browser itself.
    pub session_id: Option<String>,
}

type Reply = Result<Value, String>;

/// The connection to Chromium, shared by the browser and its pages.
struct Conn {
    next_id: AtomicU64,
    /// Commands sent and not yet answered, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    /// To the writer task: one message, without its NUL.
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    events: broadcast::Sender<Event>,
    /// Console messages and uncaught exceptions, by session.
    console: Mutex<HashMap<String, Vec<String>>>,
    /// Set when the pipe is gone: commands then fail at once.
    closed: AtomicBool,
    /// The log file, for error messages.
    log: PathBuf,
}

impl Conn {
    /// Sends `method` with `params` (to `session` when given) and waits for its answer.
    async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        if self.closed.load(Ordering::SeqCst) {
            bail!(
                "cannot send {method}: Chromium's pipe is closed{}",
                self.log_tail()
            );
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let (Some(s), Some(obj)) = (session, msg.as_object_mut()) {
            obj.insert("sessionId".into(), Value::String(s.to_owned()));
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        // The reader may have shut between the check above and the insert.
        if self.closed.load(Ordering::SeqCst) {
            lock(&self.pending).remove(&id);
            bail!(
                "cannot send {method}: Chromium's pipe is closed{}",
                self.log_tail()
            );
        }
        if self.outbox.send(serde_json::to_vec(&msg)?).is_err() {
            lock(&self.pending).remove(&id);
            bail!(
                "cannot send {method}: the writer is gone{}",
                self.log_tail()
            );
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(e))) => bail!("Chromium refused {method}: {e}"),
            Ok(Err(_)) => bail!(
                "Chromium closed the pipe before answering {method}{}",
                self.log_tail()
            ),
            Err(_) => {
                lock(&self.pending).remove(&id);
                bail!(
                    "Chromium did not answer {method} within {COMMAND_TIMEOUT:?}{}",
                    self.log_tail()
                )
            }
        }
    }

    /// The end of Chromium's log, as a suffix for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("\nChromium's log ({}) ends:\n{tail}", self.log.display())
        }
    }

    /// Handles one message from Chromium.
    fn dispatch(&self, raw: &[u8]) {
        let Ok(msg) = serde_json::from_slice::<Value>(raw) else {
            eprintln!(
                "browser: ignoring a message that is not JSON: {:?}",
                String::from_utf8_lossy(raw)
            );
            return;
        };
        if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            let reply = match msg.get("error") {
                Some(e) => Err(format!(
                    "{} (code {})",
                    e.get("message").and_then(Value::as_str).unwrap_or("?"),
                    e.get("code").unwrap_or(&Value::Null)
                )),
                None => Ok(msg.get("result").cloned().unwrap_or(Value::Null)),
            };
            if let Some(tx) = lock(&self.pending).remove(&id) {
                let _ = tx.send(reply);
            }
            return;
        }
        let Some(method) = msg.get("method").and_then(Value::as_str) else {
            return;
        };
        let event = Event {
            method: method.to_owned(),
            params: msg.get("params").cloned().unwrap_or(Value::Null),
            session_id: msg
                .get("sessionId")
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        if let (Some(line), Some(session)) = (console_line(&event), &event.session_id) {
            lock(&self.console)
                .entry(session.clone())
                .or_default()
                .push(line);
        }
        // Nobody listening is fine: events are only kept for whoever waits for one.
        let _ = self.events.send(event);
    }

    /// Fails every command still waiting, and wakes whoever waits for an event: the pipe is
    /// gone.
    fn shut(&self) {
        self.closed.store(true, Ordering::SeqCst);
        lock(&self.pending).clear();
        let _ = self.events.send(Event {
            method: PIPE_CLOSED.to_owned(),
            params: Value::Null,
            session_id: None,
        });
    }
}

/// A console message or an uncaught exception, as one line.
fn console_line(e: &Event) -> Option<String> {
    match e.method.as_str() {
        "Runtime.consoleAPICalled" => {
            let kind = e
                .params
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("log");
            let args: Vec<String> = e
                .params
                .get("args")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(remote_object_text).collect())
                .unwrap_or_default();
            Some(format!("{kind}: {}", args.join(" ")))
        }
        "Runtime.exceptionThrown" => Some(format!(
            "exception: {}",
            exception_text(e.params.get("exceptionDetails").unwrap_or(&Value::Null))
        )),
        _ => None,
    }
}

/// A `Runtime.RemoteObject` as text: its value when it has one, else its description.
fn remote_object_text(o: &Value) -> String {
    match o.get("value") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => o
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("undefined")
            .to_owned(),
    }
}

/// A `Runtime.ExceptionDetails` as text: "Uncaught Error: boom" and where.
fn exception_text(d: &Value) -> String {
    let text = d.get("text").and_then(Value::as_str).unwrap_or("exception");
    let what = d
        .get("exception")
        .map(|e| match e.get("description").and_then(Value::as_str) {
            // The first line; the rest is the stack, with CDP's own frames.
            Some(s) => s.lines().next().unwrap_or_default().to_owned(),
            None => remote_object_text(e),
        })
        .unwrap_or_default();
    let line = d.get("lineNumber").and_then(Value::as_u64).unwrap_or(0) + 1;
    let col = d.get("columnNumber").and_then(Value::as_u64).unwrap_or(0) + 1;
    if what.is_empty() {
        format!("{text} (line {line}:{col})")
    } else {
        format!("{text} {what} (line {line}:{col})")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes each message and its NUL to Chromium's fd 3.
async fn write_loop(mut stdin: ChildStdin, mut outbox: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(mut msg) = outbox.recv().await {
        msg.push(0);
        if stdin.write_all(&msg).await.is_err() || stdin.flush().await.is_err() {
            break;
        }
    }
}

/// Reads NUL-terminated messages from Chromium's fd 4 until it closes.
async fn read_loop(stdout: ChildStdout, conn: Arc<Conn>) {
    let mut r = BufReader::with_capacity(1 << 20, stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(0, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if buf.last() == Some(&0) {
                    buf.pop();
                    conn.dispatch(&buf);
                } else {
                    // The pipe closed in the middle of a message.
                    break;
                }
            }
        }
    }
    conn.shut();
}

/// A running headless Chromium, killed (with all its processes) by [`Browser::close`] or on
/// drop.
pub struct Browser {
    conn: Arc<Conn>,
    child: Option<Child>,
    pid: u32,
    dir: tempfile::TempDir,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    version: String,
}

impl Browser {
    /// Starts Chromium and waits until it answers. `Ok(None)` when Chromium is not installed,
    /// so the caller can skip — except under CI (`CI=true`), where a missing Chromium is an
    /// error: tests must fail there, not silently skip.
    pub async fn start() -> anyhow::Result<Option<Browser>> {
        let Some(bin) = chromium_binary() else {
            let what = match std::env::var_os("ROLLGATE_CHROMIUM") {
                Some(p) => format!("ROLLGATE_CHROMIUM={} is not a file", p.to_string_lossy()),
                None => "chromium not found on PATH".to_owned(),
            };
            if ci() {
                bail!("{what}: install it (Debian: apt-get install chromium)");
            }
            eprintln!("{what}: skipping (install chromium to run this test)");
            return Ok(None);
        };
        Browser::start_with(&bin).await.map(Some)
    }

    /// Starts the Chromium at `bin`.
    pub async fn start_with(bin: &Path) -> anyhow::Result<Browser> {
        let dir = tempfile::Builder::new()
            .prefix("rollgate-chromium-")
            .tempdir()?;
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home)?;
        let log = dir.path().join("chromium.log");
        let log_file = std::fs::File::create(&log)?;
        let (w, h) = WINDOW;
        let mut cmd = crate::owner::tied_std("sh")?;
        cmd.arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2"#)
            .arg(bin)
            .args([
                "--headless=new",
                // As root, Chromium's sandbox cannot start (and containers rarely allow it).
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--no-default-browser-check",
                // Nothing from Google: no updates, no sync, no metrics, no field trials.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--metrics-recording-only",
                "--password-store=basic",
                "--use-mock-keychain",
                // A page's timers run at full speed although no one looks at it.
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--mute-audio",
                "--hide-scrollbars",
            ])
            .arg(format!("--window-size={w},{h}"))
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .arg("about:blank")
            // Whatever Chromium (and the libraries it loads) writes under $HOME or in the
            // temp dir (its singleton socket) stays here, and goes with it.
            .env("HOME", &home)
            .env("TMPDIR", dir.path())
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file);
        // Its own process group, so that its helpers can be killed with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = crate::owner::spawn_tokio(cmd)
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("chromium exited at once"))?;
        let (stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => (i, o),
            _ => bail!("chromium's pipes were not set up"),
        };
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            outbox,
            events: broadcast::channel(4096).0,
            console: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            log,
        });
        let reader = tokio::spawn(read_loop(stdout, conn.clone()));
        let writer = tokio::spawn(write_loop(stdin, outbox_rx));
        let mut browser = Browser {
            conn,
            child: Some(child),
            pid,
            dir,
            reader,
            writer,
            version: String::new(),
        };
        let version = tokio::time::timeout(
            START_TIMEOUT,
            browser.conn.call(None, "Browser.getVersion", json!({})),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "Chromium did not answer within {START_TIMEOUT:?}{}",
                browser.conn.log_tail()
            )
        })?
        .context("Chromium did not start")?;
        browser.version = version
            .get("product")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        Ok(browser)
    }

    /// What Chromium says it is, e.g. `Chrome/120.0.6099.224`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The browser process's pid (its helpers have others: [`Browser::processes`]).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Chromium's log so far (for failure messages): its stdout and stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.conn.log).unwrap_or_default()
    }

    /// The pids of every running process of this browser: the browser and its helpers, which
    /// all name its profile directory on their command lines.
    pub fn processes(&self) -> Vec<u32> {
        processes_naming(&self.dir.path().join("profile"))
    }

    /// Subscribes to Chromium's events from now on (all sessions).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.conn.events.subscribe()
    }

    /// Sends a browser-level CDP command (no session) and returns its result.
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.conn.call(None, method, params).await
    }

    /// Opens `url` in a new tab and waits until its `load` event has fired.
    pub async fn open(&self, url: &str) -> anyhow::Result<Page> {
        let target = self
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target
            .get("targetId")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("Target.createTarget answered without a targetId: {target}"))?
            .to_owned();
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session_id = attached
            .get("sessionId")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                anyhow!("Target.attachToTarget answered without a sessionId: {attached}")
            })?
            .to_owned();
        let page = Page {
            conn: self.conn.clone(),
            target_id,
            session_id,
        };
        page.call("Page.enable", json!({})).await?;
        page.call("Page.setLifecycleEventsEnabled", json!({ "enabled": true }))
            .await?;
        page.call("Runtime.enable", json!({})).await?;
        // Headless Chromium takes room for a browser frame it does not draw out of the
        // window: the viewport would be shorter than the window. Set it outright instead.
        let (width, height) = WINDOW;
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await?;
        page.goto(url).await?;
        Ok(page)
    }

    /// Closes Chromium: asks it to quit, kills what is left of its process group, and waits
    /// until none of its processes runs.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let profile = self.dir.path().join("profile");
        // A polite close first: Chromium ends its helpers itself. Its answer may be lost as it
        // goes, which is fine.
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            self.conn.call(None, "Browser.close", json!({})),
        )
        .await;
        let polite = eventually("Chromium to quit", Duration::from_secs(3), || async {
            processes_naming(&profile).is_empty().then_some(())
        })
        .await;
        if let Some(mut child) = self.child.take() {
            if polite.is_err() {
                // Before the browser process is reaped: until then its pid, which names the
                // group, cannot be reused, so this kills only what it started.
                kill_group(self.pid);
                child.start_kill()?;
            }
            tokio::time::timeout(EXIT_TIMEOUT, child.wait())
                .await
                .context("the browser process did not exit after SIGKILL")??;
        }
        let left = eventually("every Chromium process to exit", EXIT_TIMEOUT, || async {
            processes_naming(&profile).is_empty().then_some(())
        })
        .await;
        self.reader.abort();
        self.writer.abort();
        left.with_context(|| format!("still running: {:?}", processes_naming(&profile)))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Not reaped yet (only close() waits for it): the group is still ours to kill.
        if let Some(mut child) = self.child.take() {
            kill_group(self.pid);
            // kill_on_drop: tokio reaps it.
            let _ = child.start_kill();
        }
        self.reader.abort();
        self.writer.abort();
    }
}

/// SIGKILLs process group `pgid` (no-op when it is empty).
fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The pids of running processes (zombies excepted) whose command line mentions `needle`.
fn processes_naming(needle: &Path) -> Vec<u32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
        })
        .filter(|&pid| crate::owner::ProcessId::of(pid).is_some())
        .collect();
    pids.sort_unstable();
    pids
}

/// One tab of a [`Browser`], attached over a CDP session.
pub struct Page {
    conn: Arc<Conn>,
    target_id: String,
    session_id: String,
}

impl Page {
    /// The tab's CDP target id.
    pub fn target_id(&self) -> &str {
        &self.target_id
    }

    /// The CDP session this page is driven through.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Sends a CDP command to this page and returns its result.
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.conn.call(Some(&self.session_id), method, params).await
    }

    /// Navigates to `url` and waits until the new document's `load` event has fired.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        // Subscribed before navigating, so the load event cannot be missed.
        let mut events = self.conn.events.subscribe();
        let nav = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(err) = nav.get("errorText").and_then(Value::as_str) {
            bail!("cannot open {url}: {err}");
        }
        // No loader: a same-document navigation (a fragment), which has no load event.
        let Some(loader) = nav.get("loaderId").and_then(Value::as_str) else {
            return Ok(());
        };
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(e) if e.method == PIPE_CLOSED => {
                        bail!(
                            "Chromium closed the pipe while {url} loaded{}",
                            self.conn.log_tail()
                        )
                    }
                    Ok(e) => {
                        if e.session_id.as_deref() == Some(self.session_id.as_str())
                            && e.method == "Page.lifecycleEvent"
                            && e.params.get("name").and_then(Value::as_str) == Some("load")
                            && e.params.get("loaderId").and_then(Value::as_str) == Some(loader)
                        {
                            return Ok(());
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        eprintln!("browser: {n} events dropped while waiting for {url} to load");
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        bail!("Chromium closed the pipe while {url} loaded")
                    }
                }
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, wait)
            .await
            .map_err(|_| anyhow!("{url} did not finish loading within {COMMAND_TIMEOUT:?}"))?
    }

    /// Evaluates `js` in the page (awaiting it if it is a promise) and returns its value as
    /// JSON (`null` for `undefined` and for what JSON cannot hold). A thrown exception or a
    /// rejected promise is an error carrying its message.
    pub async fn eval(&self, js: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({
                    "expression": js,
                    "returnByValue": true,
                    "awaitPromise": true,
                    "userGesture": false,
                }),
            )
            .await?;
        if let Some(d) = r.get("exceptionDetails") {
            bail!("{js:?} threw: {}", exception_text(d));
        }
        Ok(r.get("result")
            .and_then(|o| o.get("value"))
            .cloned()
            .unwrap_or(Value::Null))
    }

    /// The page's console messages and uncaught exceptions so far, one line each
    /// (`log: hello`, `exception: Uncaught Error: boom (line 3:7)`).
    pub fn console(&self) -> Vec<String> {
        lock(&self.conn.console)
            .get(&self.session_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Takes a PNG screenshot of the viewport and writes it to `path`; returns its size in
    /// bytes.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<usize> {
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let data = r
            .get("data")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("Page.captureScreenshot answered without data"))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .context("the screenshot is not valid base64")?;
        std::fs::write(path, &png).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(png.len())
    }

    /// Closes the tab.
    pub async fn close(self) -> anyhow::Result<()> {
        self.conn
            .call(
                None,
                "Target.closeTarget",
                json!({ "targetId": self.target_id }),
            )
            .await?;
        Ok(())
    }
}
