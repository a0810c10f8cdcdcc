//! The coordinator's HTTP side: `/metrics`, and a live, read-only web view of the fleet.
//!
//! `/` is one page embedded in the binary (no build step). It opens `/api/stream`, a
//! server-sent-events stream of the whole view as JSON, pushed whenever it changes; `/api/state`
//! is the same view once. Every coordinator serves it: readiness comes from the agents this
//! coordinator watches (followers watch them too), upgrades and events from what the leader
//! stored, so a follower shows the leader's data.
//!
//! One task builds the view, and only while someone is watching; every stream shares it.

use crate::control::Control;
use crate::progress::EventRange;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use rollgate_common::http::hyper_reexport::{Incoming, Method, Request, Response, StatusCode};
use rollgate_common::http::{full, respond, text, Body, Handler};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const PAGE: &str = include_str!("web/index.html");

/// How often the view is rebuilt while someone watches.
const REFRESH: Duration = Duration::from_millis(250);
/// A comment line this often keeps proxies from closing an idle stream.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Events shown per pool.
const EVENTS_SHOWN: usize = 40;

/// The view as JSON: who leads, the newest roll-out, and per pool its readiness, its upgrade
/// and its latest events.
pub async fn snapshot(control: &Control) -> serde_json::Value {
    let node = control.node();
    let lead = node.leadership();
    let leader = control.leader().await.ok();
    let mut pools = Vec::new();
    for p in &node.cfg.pools {
        let readiness = match control.readiness(&p.name).await {
            Ok((r, failed_over)) => {
                crate::cli::readiness_json(&crate::api::readiness_of(&r, failed_over))
            }
            Err(e) => serde_json::json!({"pool": p.name, "error": e.to_string()}),
        };
        let upgrade = match control.upgrade(&p.name).await {
            Ok(u) => crate::cli::status_json(&crate::api::status_of(
                u.as_ref(),
                &p.name,
                false,
                lead.as_ref().map_or(0, |l| l.epoch.get()),
                String::new(),
            )),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        };
        let range = EventRange {
            after: None,
            before: None,
            limit: EVENTS_SHOWN,
        };
        let events: Vec<serde_json::Value> = match control.events(&p.name, range).await {
            Ok(page) => page
                .events
                .into_iter()
                .map(|e| crate::cli::event_json(&crate::api::event_of(e)))
                .collect(),
            Err(_) => Vec::new(),
        };
        pools.push(serde_json::json!({
            "name": p.name,
            "readiness": readiness,
            "upgrade": upgrade,
            "events": events,
        }));
    }
    // The newest roll-out, while it runs and after (until the next one).
    let rollout = match control.rollout(None).await {
        Ok(r) => r.map(|r| crate::cli::rollout_json(&crate::api::rollout_of(&r, false))),
        Err(e) => Some(serde_json::json!({"error": e.to_string()})),
    };
    serde_json::json!({
        "coordinator": node.cfg.id,
        "this_is_leader": lead.is_some(),
        "rollout": rollout,
        "leader": leader.as_ref().and_then(|l| l.leader.as_ref()).map(|l| serde_json::json!({
            "id": l.id, "address": l.address, "epoch": l.epoch.get(),
        })),
        "pools": pools,
    })
}

/// The shared view: rebuilt every [`REFRESH`] while a stream is open, published only when it
/// changed.
pub struct Views {
    tx: watch::Sender<Arc<String>>,
}

impl Views {
    /// Starts the builder task on `tasks`; it ends at `shutdown`.
    pub fn start(
        control: Control,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Views> {
        let (tx, _) = watch::channel(Arc::new(String::new()));
        let views = Arc::new(Views { tx });
        let me = Arc::clone(&views);
        tasks.spawn(async move {
            loop {
                if me.tx.receiver_count() > 0 {
                    let view = snapshot(&control).await.to_string();
                    me.tx.send_if_modified(|cur| {
                        if **cur == view {
                            false
                        } else {
                            *cur = Arc::new(view);
                            true
                        }
                    });
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(REFRESH) => {}
                }
            }
        });
        views
    }

    /// A server-sent-events body: the view now, then each change, until `shutdown`.
    fn stream(&self, shutdown: CancellationToken) -> Body {
        let mut rx = self.tx.subscribe();
        // Anything already built counts as new to this client.
        rx.mark_changed();
        let frames = futures_util::stream::unfold((rx, shutdown), |(mut rx, stop)| async move {
            let chunk = tokio::select! {
                _ = stop.cancelled() => return None,
                r = rx.changed() => {
                    if r.is_err() {
                        return None;
                    }
                    let view = rx.borrow_and_update().clone();
                    if view.is_empty() {
                        // The first build is still running.
                        Bytes::from_static(b": waiting\n\n")
                    } else {
                        Bytes::from(format!("event: view\ndata: {view}\n\n"))
                    }
                }
                _ = tokio::time::sleep(KEEPALIVE) => Bytes::from_static(b": keepalive\n\n"),
            };
            Some((
                Ok::<_, Infallible>(hyper::body::Frame::data(chunk)),
                (rx, stop),
            ))
        });
        StreamBody::new(frames).boxed()
    }
}

/// The HTTP handler: `/`, `/api/state`, `/api/stream`, `/metrics`. GET only.
pub fn handler(control: Control, views: Arc<Views>, shutdown: CancellationToken) -> Handler {
    Arc::new(move |req: Request<Incoming>| {
        let (control, views, shutdown) = (control.clone(), Arc::clone(&views), shutdown.clone());
        Box::pin(async move {
            if req.method() != Method::GET {
                return text(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET only\n");
            }
            match req.uri().path() {
                "/" | "/index.html" => {
                    let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", full(PAGE));
                    harden(&mut r);
                    r
                }
                "/api/state" => {
                    let mut r = respond(
                        StatusCode::OK,
                        "application/json",
                        full(snapshot(&control).await.to_string()),
                    );
                    harden(&mut r);
                    r
                }
                "/api/stream" => {
                    let mut r =
                        respond(StatusCode::OK, "text/event-stream", views.stream(shutdown));
                    r.headers_mut().insert(
                        hyper::header::CACHE_CONTROL,
                        hyper::header::HeaderValue::from_static("no-cache"),
                    );
                    r
                }
                "/metrics" => crate::metrics::METRICS.scrape(&control).await,
                _ => text(StatusCode::NOT_FOUND, "not found\n"),
            }
        })
    })
}

/// The page loads nothing from elsewhere and may not be framed.
fn harden(r: &mut Response<Body>) {
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        hyper::header::HeaderValue::from_static(
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        hyper::header::HeaderValue::from_static("nosniff"),
    );
}
