//! The metrics listener: `/metrics` (Prometheus text format), `/` (the status
//! page, self-contained, no external assets) and `/status.json` (what the page
//! polls). Loopback by default (`[daemon] metrics_listen`). Every answer comes
//! from the reconciler through the same channel as the control socket's.

use std::net::SocketAddr;

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{Html, IntoResponse, Response as HttpResponse},
    routing::get,
    Router,
};
use tokio::sync::{mpsc, oneshot};

use crate::control::{Envelope, Request, Response};

const PAGE: &str = include_str!("web/status.html");

/// Binds `addr` and serves until the task is aborted.
pub async fn serve(
    addr: SocketAddr,
    to_owner: mpsc::Sender<Envelope>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/metrics", get(metrics))
        .route("/status.json", get(status))
        .with_state(to_owner);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    }))
}

/// Why the daemon gave no answer.
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("the daemon is stopping")]
    Stopping,
    #[error("no answer")]
    NoAnswer,
    /// The daemon's own message.
    #[error("{0}")]
    Refused(String),
}

async fn ask(
    to_owner: &mpsc::Sender<Envelope>,
    req: Request,
) -> Result<serde_json::Value, AskError> {
    let (tx, rx) = oneshot::channel();
    to_owner
        .send((req, tx))
        .await
        .map_err(|_| AskError::Stopping)?;
    match rx.await.map_err(|_| AskError::NoAnswer)? {
        Response::Ok(v) => Ok(v),
        Response::Error(e) => Err(AskError::Refused(e)),
    }
}

async fn metrics(State(to_owner): State<mpsc::Sender<Envelope>>) -> HttpResponse {
    match ask(&to_owner, Request::Metrics).await {
        Ok(v) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            v["text"].as_str().unwrap_or_default().to_owned(),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn status(State(to_owner): State<mpsc::Sender<Envelope>>) -> HttpResponse {
    match ask(&to_owner, Request::Status).await {
        Ok(v) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            v.to_string(),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}
