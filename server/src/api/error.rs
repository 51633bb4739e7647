//! The errors both fronts answer with. Every domain error becomes an [`ApiError`] here, in
//! one place; each front has its one mapping from it to its wire form (gRPC status with
//! rich details in `grpc::error`, OpenAI's error object and HTTP status in `http::error`).
//! The status vocabulary is gRPC's codes (`tonic::Code`), which the metrics' `code` label
//! uses for every front.

use std::time::Duration;

use tonic::Code;

use crate::{
    adapters::RegistryError,
    blobs::BlobError,
    engine::{hosted::HostError, SubmitError},
    tenancy::TenancyError,
    train::jobs::TrainingError,
};

/// Every error a request can be answered with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{what}")]
    ResourceExhausted {
        what: String,
        /// None where waiting cannot help (the request can never fit).
        retry_after: Option<Duration>,
    },
    #[error("quota {quota} exceeded: {detail}")]
    Quota {
        quota: String,
        detail: String,
        retry_after: Option<Duration>,
    },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("{0}")]
    DataLoss(String),
    /// The request stream itself failed (the client went away, a message did not decode):
    /// answered with the stream's own code.
    #[error("reading the request stream: {message}")]
    Transport { code: Code, message: String },
    #[error("{0}")]
    Internal(String),
}

/// A database failure: a full disk is RESOURCE_EXHAUSTED with "no space left" (nothing was
/// stored); anything else is logged and INTERNAL.
pub fn db_error(d: crate::store::DbError) -> ApiError {
    tracing::error!(error = %d, "database");
    if d.is_disk_full() {
        ApiError::ResourceExhausted {
            what: "no space left on the server's disk (the database could not write)".into(),
            retry_after: None,
        }
    } else if d.is_unavailable() {
        ApiError::Unavailable(
            "the metadata database cannot be reached; nothing was written, try again later".into(),
        )
    } else {
        ApiError::Internal("database error".into())
    }
}

/// Longest message (and detail text) an answer carries: gRPC's travel in HTTP/2 trailers,
/// which peers cap, so text echoing a huge input is cut rather than breaking the stream.
pub const MAX_TEXT: usize = 1024;

pub fn clip(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::ResourceExhausted { .. } => Code::ResourceExhausted,
            Self::Quota { .. } => Code::ResourceExhausted,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::DataLoss(_) => Code::DataLoss,
            Self::Transport { code, .. } => *code,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let msg = e.to_string();
        match e {
            SubmitError::QueueFull { retry_after, .. } => ApiError::ResourceExhausted {
                what: msg,
                retry_after: Some(retry_after),
            },
            SubmitError::NeverFits { .. } => ApiError::ResourceExhausted {
                what: msg,
                retry_after: None,
            },
            SubmitError::HeadCannotGenerate | SubmitError::NoHead => {
                ApiError::invalid("adapter", msg)
            }
            SubmitError::Draining | SubmitError::Stopped => ApiError::Unavailable(msg),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(i) => ApiError::invalid(i.field, i.reason),
            RegistryError::NotFound(what) => {
                ApiError::NotFound(format!("adapter {what} not found"))
            }
            RegistryError::Storage(m) => {
                tracing::error!(error = %m, "adapter storage");
                ApiError::Internal(format!("adapter storage: {m}"))
            }
            RegistryError::NoSpace(doing) => ApiError::ResourceExhausted {
                what: format!("no space left on the server's disk ({doing})"),
                retry_after: None,
            },
            RegistryError::Damaged(m) => ApiError::DataLoss(m),
            RegistryError::Unservable(m) => ApiError::FailedPrecondition(m),
            RegistryError::Quota(q) => q.into(),
            RegistryError::Db(d) => db_error(d),
            RegistryError::Blob(b) => b.into(),
        }
    }
}

/// A blob store failure: a full local disk is RESOURCE_EXHAUSTED, a remote store that does
/// not answer is UNAVAILABLE (nothing was registered; worth a retry), a blob a row names but
/// the store lacks is DATA_LOSS.
impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        match e {
            e @ BlobError::NoSpace(_) => ApiError::ResourceExhausted {
                what: e.to_string(),
                retry_after: None,
            },
            e @ BlobError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
            e @ BlobError::NotFound(_) => ApiError::DataLoss(e.to_string()),
            e @ BlobError::Failed(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<TenancyError> for ApiError {
    fn from(e: TenancyError) -> Self {
        let msg = e.to_string();
        match e {
            TenancyError::Unauthenticated(m) => ApiError::Unauthenticated(m.into()),
            TenancyError::PermissionDenied(m) => ApiError::PermissionDenied(m),
            TenancyError::Invalid { field, reason } => ApiError::invalid(field, reason),
            TenancyError::NotFound(_) => ApiError::NotFound(msg),
            TenancyError::AlreadyExists(_) => ApiError::AlreadyExists(msg),
            TenancyError::FailedPrecondition(m) => ApiError::FailedPrecondition(m),
            TenancyError::Quota {
                quota,
                detail,
                retry_after,
            } => {
                metrics::counter!(crate::metrics::QUOTA_REJECTIONS_TOTAL, "quota" => quota)
                    .increment(1);
                ApiError::Quota {
                    quota: quota.into(),
                    detail,
                    retry_after,
                }
            }
            TenancyError::Db(d) => db_error(d),
        }
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        match e {
            // Busy models finish and become evictable: worth a retry.
            e @ HostError::NoRoom { .. } => ApiError::ResourceExhausted {
                what: e.to_string(),
                retry_after: Some(Duration::from_secs(1)),
            },
            e @ HostError::Load { .. } => ApiError::DataLoss(e.to_string()),
        }
    }
}

impl From<TrainingError> for ApiError {
    fn from(e: TrainingError) -> Self {
        match e {
            TrainingError::Invalid { field, reason } => ApiError::invalid(field, reason),
            TrainingError::NotFound(w) => ApiError::NotFound(format!("{w} not found")),
            TrainingError::AlreadyExists(w) => {
                ApiError::AlreadyExists(format!("{w} already exists"))
            }
            TrainingError::Storage(m) => {
                tracing::error!(error = %m, "training storage");
                ApiError::Internal(m)
            }
            TrainingError::NoSpace(doing) => ApiError::ResourceExhausted {
                what: format!("no space left on the server's disk ({doing})"),
                retry_after: None,
            },
            TrainingError::Quota(q) => q.into(),
            e @ TrainingError::Memory { .. } => ApiError::ResourceExhausted {
                what: e.to_string(),
                retry_after: None,
            },
            TrainingError::Registry(r) => r.into(),
            TrainingError::Failed(f) => ApiError::Internal(format!("training failed: {f}")),
            TrainingError::Internal(m) => {
                tracing::error!(error = %m, "training");
                ApiError::Internal(m)
            }
            TrainingError::Db(d) => db_error(d),
            TrainingError::Blob(b) => b.into(),
        }
    }
}
