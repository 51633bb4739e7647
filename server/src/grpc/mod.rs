//! The gRPC edge: thin tonic services. Only this module (and `main.rs`/`server.rs`) touch
//! tonic and proto types; handlers validate, convert to domain calls and convert back.

pub mod adapters;
pub mod admin;
pub mod auth;
pub mod convert;
pub mod error;
pub mod generation;
pub(crate) mod job_request;
pub mod training;

use std::time::Instant;

pub use crate::api::{observe, ready, Ready, ReadySlot};

/// Runs an RPC body, records its outcome and converts it for tonic.
pub async fn recorded<T>(
    rpc: &'static str,
    f: impl std::future::Future<Output = Result<T, error::ApiError>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let started = Instant::now();
    let r = f.await;
    observe(
        rpc,
        r.as_ref()
            .map_or_else(error::ApiError::code, |_| tonic::Code::Ok),
        started,
    );
    r.map(tonic::Response::new).map_err(Into::into)
}
