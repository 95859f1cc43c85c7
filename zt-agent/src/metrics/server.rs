//! The HTTP endpoint on `--metrics-addr` (loopback by default): `/metrics` for Prometheus,
//! `/healthz` (the process serves requests) and `/readyz` (the maps are loaded, the programs
//! attached and a policy is in force). It is bound before the datapath is loaded, so probes get
//! an answer — "not ready" — while the agent starts.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use anyhow::{Context as _, Result};
use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tokio::net::TcpListener;

use super::{Format, Sources};
use crate::datapath::StartKind;

pub const DEFAULT_ADDR: &str = "127.0.0.1:9090";

/// What the endpoint serves; empty until the agent is [`ready`](Endpoint::ready).
#[derive(Clone, Default)]
pub struct Endpoint {
    ready: Arc<OnceLock<Ready>>,
}

struct Ready {
    sources: Sources,
    /// Programs attached (TC, XDP and cgroup hooks).
    attachments: usize,
    /// Whether the agent took over pinned state or started on an empty bpffs directory.
    start: StartKind,
}

impl Endpoint {
    /// Called once everything is attached and the first policy is in force.
    pub fn ready(&self, sources: Sources, attachments: usize, start: StartKind) {
        if self.ready.set(Ready { sources, attachments, start }).is_err() {
            tracing::warn!("the metrics endpoint was made ready twice; keeping the first");
        }
    }
}

/// Binds the endpoint's socket; fails with what to change if the address is taken.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the metrics endpoint listens beyond loopback: whoever reaches it reads zt's counters");
    }
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint at {addr} (in use? pass another --metrics-addr)"))
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, endpoint: Endpoint) -> Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(endpoint);
    axum::serve(listener, router).await.context("serving the metrics endpoint")
}

fn plain(status: StatusCode, text: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

async fn readyz(State(endpoint): State<Endpoint>) -> Response {
    let Some(ready) = endpoint.ready.get() else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready: loading the datapath and the policy\n".into());
    };
    match ready.sources.probe.config() {
        Ok(config) if config.generation >= 1 => plain(
            StatusCode::OK,
            format!(
                "ready: policy generation {} in force, {} programs attached, {}\n",
                config.generation,
                ready.attachments,
                match ready.start {
                    StartKind::Adopted => "adopted the pinned datapath",
                    StartKind::Fresh => "started fresh",
                }
            ),
        ),
        Ok(_) => plain(StatusCode::SERVICE_UNAVAILABLE, "not ready: no policy in force\n".into()),
        Err(err) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: cannot read the datapath: {err:#}\n")),
    }
}

async fn metrics(State(endpoint): State<Endpoint>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let format = if openmetrics { Format::OpenMetrics } else { Format::Prometheus };
    if endpoint.ready.get().is_none() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready: loading the datapath and the policy\n".into());
    }
    // Walking the maps makes syscalls: off the async workers.
    let scraped = tokio::task::spawn_blocking(move || {
        let ready = endpoint.ready.get().expect("checked above; never unset");
        ready.sources.snapshot()?.encode(format).context("encoding the metrics")
    })
    .await;
    match scraped {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, format.content_type())], text).into_response(),
        Ok(Err(err)) => {
            tracing::warn!(error = %format!("{err:#}"), "metrics scrape failed");
            plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{err:#}\n"))
        }
        Err(err) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics scrape panicked: {err}\n")),
    }
}
