//! The harness's headless Chromium ([`rollgate_tests::browser`]) against a page that changes by
//! itself: a counter its own script advances, and Server-Sent Events the test pushes when it
//! chooses. What a later test of the coordinator's live page needs: the page shows each event
//! without being reloaded, and a screenshot can be taken.

use anyhow::{bail, ensure, Context, Result};
use rollgate_tests::browser::{Browser, WINDOW};
use rollgate_tests::eventually;
use rollgate_tests::owner::ProcessId;
use serde_json::Value;
use std::io::Read;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>rollgate browser self-test</title>
<style>body { font: 20px sans-serif; margin: 2em; } #last { color: #0a5; }</style></head>
<body>
<h1>rollgate browser self-test</h1>
<p>ticks: <span id="ticks">0</span></p>
<p>events: <span id="count">0</span>, last: <span id="last">none</span></p>
<script>
  let ticks = 0;
  setInterval(() => { document.getElementById('ticks').textContent = String(++ticks); }, 100);
  let count = 0;
  const source = new EventSource('/events');
  source.onopen = () => console.log('events open');
  source.onmessage = (e) => {
    count += 1;
    document.getElementById('count').textContent = String(count);
    document.getElementById('last').textContent = e.data;
  };
</script>
</body></html>
"#;

/// What the test server has seen.
#[derive(Debug, Default, Clone, PartialEq)]
struct Seen {
    pages: usize,
    streams: usize,
}

/// A minimal HTTP/1.1 server on 127.0.0.1: `/` is [`PAGE`], `/events` an event stream that
/// forwards every message sent on the returned channel, anything else 404.
async fn serve() -> Result<(String, broadcast::Sender<String>, watch::Receiver<Seen>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    let (push, _) = broadcast::channel::<String>(16);
    let (seen_tx, seen) = watch::channel(Seen::default());
    let push_for_server = push.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let push = push_for_server.clone();
            let seen = seen_tx.clone();
            tokio::spawn(async move {
                let _ = handle(conn, push, seen).await;
            });
        }
    });
    Ok((url, push, seen))
}

async fn handle(
    mut conn: TcpStream,
    push: broadcast::Sender<String>,
    seen: watch::Sender<Seen>,
) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    match path {
        "/" => {
            seen.send_modify(|s| s.pages += 1);
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{PAGE}",
                PAGE.len()
            );
            conn.write_all(resp.as_bytes()).await?;
        }
        "/events" => {
            // Subscribed before the page can know it is connected: no message is lost.
            let mut rx = push.subscribe();
            conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                  Cache-Control: no-cache\r\nConnection: keep-alive\r\n\r\n: hello\n\n",
            )
            .await?;
            seen.send_modify(|s| s.streams += 1);
            while let Ok(msg) = rx.recv().await {
                conn.write_all(format!("data: {msg}\n\n").as_bytes())
                    .await?;
            }
        }
        _ => {
            conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
        }
    }
    Ok(())
}

fn random_hex() -> Result<String> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex::encode(b))
}

/// The page's `#id` text.
async fn text(page: &rollgate_tests::browser::Page, id: &str) -> Result<String> {
    match page
        .eval(&format!("document.getElementById('{id}').textContent"))
        .await?
    {
        Value::String(s) => Ok(s),
        other => bail!("#{id} has no text: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sees_a_live_page_change_without_reloads_and_takes_a_screenshot() -> Result<()> {
    let (url, push, seen) = serve().await?;
    let t0 = Instant::now();
    let Some(browser) = Browser::start().await? else {
        return Ok(());
    };
    let started = t0.elapsed();
    let page = browser.open(&url).await?;
    let opened = t0.elapsed() - started;
    eprintln!(
        "{}: started in {started:.2?}, opened the page in {opened:.2?}",
        browser.version()
    );

    // Marks this very document: a reload would make a new one, without the marker.
    let marker = random_hex()?;
    let set = page
        .eval(&format!(
            "window.__loadMarker = '{marker}'; window.__loadMarker"
        ))
        .await?;
    ensure!(
        set == Value::String(marker.clone()),
        "set the marker, got {set}"
    );
    let same_document = || async {
        let m = page.eval("window.__loadMarker").await?;
        ensure!(
            m == Value::String(marker.clone()),
            "the page was reloaded: marker is {m}"
        );
        let n = page
            .eval("performance.getEntriesByType('navigation').length")
            .await?;
        ensure!(n == 1, "{n} navigations instead of 1");
        anyhow::Ok(())
    };

    // The page's own timer moves its counter while we look.
    let first: u64 = text(&page, "ticks").await?.parse()?;
    eventually(
        "the counter to advance by 3",
        Duration::from_secs(5),
        || async {
            let now: u64 = text(&page, "ticks").await.ok()?.parse().ok()?;
            (now >= first + 3).then_some(())
        },
    )
    .await?;

    // Each event the server pushes shows up, and only once the server pushes it.
    let mut seen_rx = seen.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        seen_rx.wait_for(|s| s.streams == 1),
    )
    .await
    .context("the page never opened its event stream")??;
    for i in 1..=3 {
        let data = format!("event {i} of {marker}");
        ensure!(
            text(&page, "last").await? != data,
            "the page shows {data:?} before it was sent"
        );
        let receivers = push
            .send(data.clone())
            .context("no event stream to push to")?;
        ensure!(receivers == 1, "{receivers} event streams instead of 1");
        eventually(
            &format!("the page to show {data:?}"),
            Duration::from_secs(5),
            || async {
                let last = text(&page, "last").await.ok()?;
                let count = text(&page, "count").await.ok()?;
                (last == data && count == i.to_string()).then_some(())
            },
        )
        .await?;
        same_document().await?;
    }

    // Errors thrown in the page come back as errors, promises are awaited.
    let err = page
        .eval("throw new Error('boom from the page')")
        .await
        .err()
        .context("a throwing script evaluated without error")?;
    ensure!(
        format!("{err:#}").contains("boom from the page"),
        "the error lost the exception's message: {err:#}"
    );
    let v = page
        .eval("new Promise(r => setTimeout(() => r(42), 50))")
        .await?;
    ensure!(v == 42, "awaited promise gave {v}");
    let console = page.console();
    ensure!(
        console.iter().any(|l| l == "log: events open"),
        "console: {console:?}"
    );

    let viewport = page.eval("[window.innerWidth, window.innerHeight]").await?;
    ensure!(
        viewport == serde_json::json!([WINDOW.0, WINDOW.1]),
        "viewport {viewport}"
    );
    let dir = tempfile::tempdir()?;
    let shot = dir.path().join("page.png");
    let size = page.screenshot(&shot).await?;
    let png = std::fs::read(&shot)?;
    ensure!(png.len() == size, "wrote {size} bytes, found {}", png.len());
    ensure!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {:?}",
        &png[..png.len().min(8)]
    );
    ensure!(
        (2_000..10_000_000).contains(&png.len()),
        "a {} byte screenshot",
        png.len()
    );
    // The IHDR chunk follows the signature: width and height, big-endian.
    let dim = |at: usize| {
        png.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    ensure!(
        (dim(16), dim(20)) == (Some(WINDOW.0), Some(WINDOW.1)),
        "screenshot is {:?}x{:?}, not {}x{}",
        dim(16),
        dim(20),
        WINDOW.0,
        WINDOW.1
    );

    // One page load, one event stream: nothing reloaded or reconnected behind our back.
    let s = seen.borrow().clone();
    ensure!(
        s == Seen {
            pages: 1,
            streams: 1
        },
        "server saw {s:?}"
    );

    // The same checks after a reload: the marker is gone. (The navigation count stays 1: it
    // counts the current document's navigations. The marker and the server are what tell.)
    page.goto(&url).await?;
    let m = page.eval("window.__loadMarker ?? null").await?;
    ensure!(m == Value::Null, "the marker survived a reload: {m}");
    ensure!(
        same_document().await.is_err(),
        "same_document() passed after a reload"
    );
    ensure!(seen.borrow().pages == 2, "server saw {:?}", seen.borrow());

    let main = ProcessId::of(browser.pid()).context("the browser process is not running")?;
    let tree: Vec<ProcessId> = browser
        .processes()
        .into_iter()
        .filter_map(ProcessId::of)
        .collect();
    ensure!(
        tree.len() > 1 && tree.contains(&main),
        "the browser's processes: {tree:?}"
    );
    let t_close = Instant::now();
    browser.close().await?;
    eventually(
        "every Chromium process to be gone",
        Duration::from_secs(5),
        || async { tree.iter().all(|p| !p.is_alive()).then_some(()) },
    )
    .await?;
    eprintln!(
        "closed {} processes in {:.2?}; whole test {:.2?}",
        tree.len(),
        t_close.elapsed(),
        t0.elapsed()
    );
    Ok(())
}
