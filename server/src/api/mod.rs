//! What the fronts share (gRPC in `grpc/`, OpenAI-compatible HTTP in `http/`): the errors
//! they answer with, the server's ready state, and the one generation path. A front only
//! converts its wire form to these calls and back; the rules live here and below.

pub mod error;
pub mod generate;

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

/// Records one answered request (an RPC, or an HTTP route) in `graft_requests_total` and `graft_request_duration_seconds`.
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

/// Records a streamed answer (`rpc`, e.g. GenerateStream or an HTTP route with
/// `stream: true`) in the request metrics exactly once: with the code it ended with, or
/// CANCELLED when the client dropped it before its end.
pub struct StreamRecord {
    rpc: &'static str,
    started: Instant,
    done: bool,
}

impl StreamRecord {
    pub fn new(rpc: &'static str, started: Instant) -> Self {
        Self {
            rpc,
            started,
            done: false,
        }
    }

    pub fn end(&mut self, code: tonic::Code) {
        if !self.done {
            self.done = true;
            observe(self.rpc, code, self.started);
        }
    }
}

impl Drop for StreamRecord {
    fn drop(&mut self) {
        self.end(tonic::Code::Cancelled);
    }
}
