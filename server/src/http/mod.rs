//! The OpenAI-compatible HTTP front (axum, its own port, off unless `--http-listen`): a
//! second door onto the same engine, registry and tenancy as gRPC, with no rules of its own.
//! Handlers parse OpenAI's bodies (`openai.rs`), convert them to the shared calls of
//! `crate::api` (naming fields as the client wrote them), and convert the answers back;
//! errors leave through the one mapping in `error.rs`.
//! - Auth: `Authorization: Bearer <key>`, the same keys as gRPC. An admin key names the
//!   tenant it acts for in `X-Graft-Tenant` (OpenAI's bodies have no such field).
//! - TLS: gRPC's certificate and key (and client CA) when set (`tls.rs`); plaintext only
//!   on loopback unless `--allow-plaintext`, as for gRPC.
//! - Metrics: each route is an `rpc` label of `graft_requests_total` (e.g.
//!   `POST /v1/chat/completions`), with the gRPC code names as `code`.

mod answers;
mod completions;
pub mod error;
mod files;
mod fine_tuning;
mod models;
pub mod openai;
mod tls;

use std::{net::SocketAddr, sync::Arc, time::Instant};

use axum::{
    extract::{DefaultBodyLimit, FromRequestParts},
    http::request::Parts,
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use self::error::HttpError;
use crate::{
    api::{error::ApiError, generate::RequestLimits, observe, ReadySlot},
    tenancy::Tenancy,
};

/// What every handler reads.
#[derive(Clone)]
pub struct HttpState {
    pub ready: ReadySlot,
    pub tenancy: Arc<Tenancy>,
    pub limits: RequestLimits,
    /// When the server started (unix seconds): the base model's `created`.
    pub started_unix: u64,
}

/// The caller, authenticated, and the tenant it acts for.
pub struct Auth {
    pub tenant: String,
}

/// The header an admin key names its tenant in.
pub const TENANT_HEADER: &str = "x-graft-tenant";

impl FromRequestParts<HttpState> for Auth {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HttpState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        let who = state.tenancy.authenticate(header).map_err(|e| {
            metrics::counter!(crate::metrics::AUTH_FAILURES_TOTAL).increment(1);
            HttpError(ApiError::from(e))
        })?;
        let named = parts
            .headers
            .get(TENANT_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let tenant = state
            .tenancy
            .acting(&who, named)
            .map_err(|e| HttpError::renamed(e, "tenant", TENANT_HEADER))?;
        Ok(Self { tenant })
    }
}

/// A JSON body, or a 400 naming the field that did not parse.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".into() } else { path };
        HttpError(ApiError::invalid(field, e.into_inner().to_string()))
    })
}

/// Runs a unary handler body and records its outcome under `route`.
pub async fn recorded<T: IntoResponse>(
    route: &'static str,
    f: impl std::future::Future<Output = Result<T, HttpError>>,
) -> Response {
    let started = Instant::now();
    match f.await {
        Ok(r) => {
            observe(route, tonic::Code::Ok, started);
            r.into_response()
        }
        Err(e) => {
            observe(route, e.0.code(), started);
            e.into_response()
        }
    }
}

fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::get))
        // The dataset upload caps its own size (--max-dataset-mb) as it streams.
        .route(
            "/v1/files",
            post(files::upload)
                .get(files::list)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/files/{id}", get(files::get).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route(
            "/v1/fine_tuning/jobs",
            post(fine_tuning::create).get(fine_tuning::list),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(fine_tuning::get))
        .route(
            "/v1/fine_tuning/jobs/{id}/cancel",
            post(fine_tuning::cancel),
        )
        .route("/v1/fine_tuning/jobs/{id}/events", get(fine_tuning::events))
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(fine_tuning::checkpoints),
        )
        .fallback(|| async {
            HttpError(ApiError::NotFound(
                "no such route; graft serves OpenAI's /v1 API (see docs/openai-compat.md)".into(),
            ))
        })
        .with_state(state)
}

/// How the HTTP front is reached: TLS with gRPC's certificate, or plaintext.
pub enum Transport {
    Tls(Arc<rustls::ServerConfig>),
    Plain,
}

impl Transport {
    /// TLS when gRPC has it (same files); plaintext only on loopback or when allowed, as
    /// for gRPC.
    pub fn of(cfg: &crate::config::ServerConfig, addr: SocketAddr) -> anyhow::Result<Self> {
        match &cfg.tls {
            Some(files) => Ok(Self::Tls(tls::server_config(files)?)),
            None => {
                anyhow::ensure!(
                    addr.ip().is_loopback() || cfg.allow_plaintext,
                    "refusing plaintext HTTP on {addr}: configure --tls-cert/--tls-key, or pass --allow-plaintext (e.g. behind a TLS-terminating proxy)"
                );
                Ok(Self::Plain)
            }
        }
    }
}

/// Serves the HTTP front on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    transport: Transport,
    state: HttpState,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match transport {
        Transport::Plain => {
            use axum::serve::ListenerExt as _;
            // TCP_NODELAY, as on the gRPC listener (no delayed-ACK stalls).
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, router(state))
                .with_graceful_shutdown(stop)
                .await
        }
        Transport::Tls(cfg) => {
            axum::serve(tls::TlsListener::new(listener, cfg)?, router(state))
                .with_graceful_shutdown(stop)
                .await
        }
    }
}
