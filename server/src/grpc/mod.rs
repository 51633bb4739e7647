//! The gRPC edge: thin tonic services. Only this module (and `main.rs`/`server.rs`) touch
//! tonic and proto types; handlers validate, convert to domain calls and convert back.

pub mod adapters;
pub mod admin;
pub mod auth;
pub mod convert;
pub mod error;
pub mod generation;
mod job_request;
pub mod training;

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use crate::{adapters::AdapterRegistry, engine::EngineHandle, train::jobs::TrainingService};

/// What the services need once the model is loaded.
pub struct Ready {
    pub engine: EngineHandle,
    pub adapters: Arc<AdapterRegistry>,
    pub training: Arc<TrainingService>,
    /// Fully fine-tuned models, each served by its own engine.
    pub hosted: Arc<crate::engine::hosted::HostedModels>,
}

/// Filled once, when the model is loaded and warm; empty before (requests get UNAVAILABLE).
pub type ReadySlot = Arc<OnceLock<Ready>>;

/// The services' view of a ready server, or UNAVAILABLE while it loads.
pub fn ready(slot: &ReadySlot) -> Result<&Ready, error::ApiError> {
    slot.get()
        .ok_or_else(|| error::ApiError::Unavailable("the model is still loading".into()))
}

/// Records one answered RPC in `graft_requests_total` and `graft_request_duration_seconds`.
pub fn observe(rpc: &'static str, code: tonic::Code, started: Instant) {
    metrics::counter!(crate::metrics::REQUESTS_TOTAL, "rpc" => rpc, "code" => code_label(code))
        .increment(1);
    metrics::histogram!(crate::metrics::REQUEST_DURATION, "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
}

fn code_label(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

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
