//! The live web view in a real browser: Debian's headless Chromium loads a follower
//! coordinator's page during a real upgrade, and the page shows every server and each version
//! change as it happens, pushed over server-sent events, without a reload.

use crate::coordinator::{etcd_store, start_req, wait_ready, wait_status};
use anyhow::{bail, Context};
use rollgate_common::tls::RoleKind;
use rollgate_proto::operator::names;
use rollgate_tests::browser::Browser;
use rollgate_tests::cluster::{operator_client, wait_leader, Fleet};
use rollgate_tests::{eventually, http_get, make_artifact};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(90);

/// The versions the page shows, per server, read from the DOM.
const VERSIONS_JS: &str = r#"JSON.stringify(Array.from(document.querySelectorAll('[data-server]')).map(e => [e.getAttribute('data-server'), e.querySelector('[data-version]').textContent]))"#;

fn versions(v: &serde_json::Value) -> anyhow::Result<Vec<(String, String)>> {
    let text = v.as_str().context("a JSON string")?;
    Ok(serde_json::from_str(text)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_web_view_shows_the_upgrade_live_in_a_real_browser() -> anyhow::Result<()> {
    let _cluster = rollgate_tests::cluster_lock().await?;
    let Some(browser) = Browser::start().await? else {
        return Ok(());
    };
    let Some(etcd) = rollgate_tests::etcd::EtcdCluster::start(1).await? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let fleet = Fleet::start(root, "pool-a", 6, 3, "1.0").await?;
    let store = format!(
        "{}\n[http]\nlisten = \"127.0.0.1:0\"",
        etcd_store(&etcd.endpoints(), 2)
    );
    let coords = fleet
        .coordinators(root, &["c1", "c2"], &store, &fleet.pool_toml(""))
        .await?;
    let op = fleet.pki.issue(RoleKind::Operator, "tester")?;
    let c = operator_client(coords[0].addr, &op).await?;
    let (leader, _) = wait_leader(&c, 0, Duration::from_secs(20)).await?;
    let lead = coords.iter().find(|c| c.id == leader).context("leader")?;
    let follower = coords.iter().find(|c| c.id != leader).context("follower")?;
    let mut lc = operator_client(lead.addr, &op).await?;
    wait_ready(&lc, "pool-a").await?;

    // The page and its data, from the follower.
    let http = follower.http_addr()?;
    let (status, page) = http_get(http, "/").await?;
    assert_eq!(status, 200);
    assert!(page.contains("EventSource(\"/api/stream\")"), "{page}");
    let (status, state) = http_get(http, "/api/state").await?;
    assert_eq!(status, 200, "{state}");
    let state: serde_json::Value = serde_json::from_str(&state)?;
    assert_eq!(state["this_is_leader"], false, "{state}");
    assert_eq!(state["leader"]["id"], leader.as_str(), "{state}");

    let page = browser.open(&format!("http://{http}/")).await?;
    let ids: Vec<String> = fleet.servers.iter().map(|s| s.id.clone()).collect();
    eventually("the page to show every server on 1.0", LONG, || {
        let (page, ids) = (&page, &ids);
        async move {
            let shown = versions(&page.eval(VERSIONS_JS).await.ok()?).ok()?;
            let names: Vec<&String> = shown.iter().map(|(s, _)| s).collect();
            (names.len() == ids.len()
                && ids.iter().all(|i| names.contains(&i))
                && shown.iter().all(|(_, v)| v == "1.0"))
            .then_some(())
        }
    })
    .await?;
    page.eval("window.__marker = 'loaded-once'; true").await?;

    let (artifact, sha) = make_artifact(root, "2.0")?;
    let mut req = start_req("pool-a", &artifact, &sha);
    req.verify_stable_ms = Some(1500);
    rollgate_tests::cluster::start_upgrade(&mut lc, req).await?;

    // A first server shows 2.0 while others still show 1.0: the page changed under the
    // browser, mid-upgrade. That moment is the screenshot.
    eventually("a first server to show 2.0 on the page", LONG, || {
        let page = &page;
        async move {
            let shown = versions(&page.eval(VERSIONS_JS).await.ok()?).ok()?;
            (shown.iter().any(|(_, v)| v == "2.0") && shown.iter().any(|(_, v)| v == "1.0"))
                .then_some(())
        }
    })
    .await?;
    let shot = std::env::var_os("ROLLGATE_WEB_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("web-view.png"));
    page.screenshot(&shot).await?;
    let png = std::fs::read(&shot)?;
    if !png.starts_with(b"\x89PNG\r\n\x1a\n") || png.len() < 10_000 {
        bail!("{} is not a plausible screenshot", shot.display());
    }
    let end = wait_status(&[lead.addr], &op, "pool-a", LONG, |s| s.ended).await?;
    assert_eq!(names::upgrade_state(end.status), "completed", "{end:?}");
    eventually("every server to show 2.0 on the page", LONG, || {
        let page = &page;
        async move {
            let shown = versions(&page.eval(VERSIONS_JS).await.ok()?).ok()?;
            (shown.len() == 6 && shown.iter().all(|(_, v)| v == "2.0")).then_some(())
        }
    })
    .await?;
    // All of that without a reload: the same document, updated by pushed views.
    let same = page
        .eval("window.__marker === 'loaded-once' && performance.getEntriesByType('navigation').length === 1 && window.__views > 2")
        .await?;
    assert_eq!(same, serde_json::Value::Bool(true), "the page was reloaded");
    let text = page.eval("document.body.innerText").await?;
    let text = text.as_str().unwrap_or_default();
    assert!(text.contains("completed"), "{text}");
    Ok(())
}
