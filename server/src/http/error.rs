//! The one mapping from [`ApiError`] to an HTTP answer in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}` with the status OpenAI uses for the
//! same failure, and `Retry-After` (whole seconds) where waiting helps.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use crate::api::error::{clip, ApiError};

/// An error on its way to an HTTP client.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl HttpError {
    /// The same error with field `from` (as the shared path names it) called `to`, the
    /// request field the client wrote.
    pub fn renamed(e: impl Into<ApiError>, from: &str, to: &str) -> Self {
        match e.into() {
            ApiError::InvalidArgument { field, reason } if field == from => {
                Self(ApiError::invalid(to, reason))
            }
            other => Self(other),
        }
    }

    pub fn status(&self) -> StatusCode {
        match &self.0 {
            ApiError::InvalidArgument { .. } | ApiError::Transport { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::AlreadyExists(_) | ApiError::FailedPrecondition(_) => StatusCode::CONFLICT,
            ApiError::ResourceExhausted { .. } | ApiError::Quota { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ApiError::DataLoss(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type`, `param` and `code` for this error.
    fn parts(&self) -> (&'static str, Option<String>, Option<String>) {
        match &self.0 {
            ApiError::InvalidArgument { field, .. } => {
                ("invalid_request_error", Some(field.clone()), None)
            }
            ApiError::Transport { .. } => ("invalid_request_error", None, None),
            ApiError::NotFound(_) => ("invalid_request_error", None, Some("not_found".into())),
            ApiError::AlreadyExists(_) | ApiError::FailedPrecondition(_) => {
                ("invalid_request_error", None, Some("conflict".into()))
            }
            ApiError::Quota { quota, .. } => ("rate_limit_error", None, Some(quota.clone())),
            ApiError::ResourceExhausted { .. } => {
                ("rate_limit_error", None, Some("resource_exhausted".into()))
            }
            ApiError::Unauthenticated(_) => (
                "invalid_request_error",
                None,
                Some("invalid_api_key".into()),
            ),
            ApiError::PermissionDenied(_) => ("permission_error", None, None),
            ApiError::Unavailable(_) | ApiError::DeadlineExceeded => ("server_error", None, None),
            ApiError::DataLoss(_) | ApiError::Internal(_) => ("server_error", None, None),
        }
    }

    /// Seconds to wait before a retry helps (rounded up), where it does.
    fn retry_after(&self) -> Option<u64> {
        match &self.0 {
            ApiError::ResourceExhausted {
                retry_after: Some(r),
                ..
            }
            | ApiError::Quota {
                retry_after: Some(r),
                ..
            } => Some(r.as_secs_f64().ceil().max(1.0) as u64),
            _ => None,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (kind, param, code) = self.parts();
        let retry = self.retry_after();
        let body = json!({
            "error": {
                "message": clip(self.0.to_string()),
                "type": kind,
                "param": param,
                "code": code,
            }
        });
        let mut resp = (status, Json(body)).into_response();
        if let Some(s) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn statuses_types_and_retry_after_follow_openai() {
        let e = HttpError(ApiError::invalid("temperature", "too hot"));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.parts().1.as_deref(), Some("temperature"));
        let q = HttpError(ApiError::Quota {
            quota: "max_concurrent_streams".into(),
            detail: "4 of 4".into(),
            retry_after: Some(Duration::from_millis(1500)),
        });
        assert_eq!(q.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(q.retry_after(), Some(2));
        let resp = q.into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let never = HttpError(ApiError::ResourceExhausted {
            what: "never fits".into(),
            retry_after: None,
        });
        assert_eq!(never.retry_after(), None);
        assert_eq!(
            HttpError(ApiError::Unauthenticated("no key".into())).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            HttpError(ApiError::NotFound("adapter x not found".into())).status(),
            StatusCode::NOT_FOUND
        );
        let renamed = HttpError::renamed(
            ApiError::invalid("adapter", "has a head"),
            "adapter",
            "model",
        );
        assert_eq!(renamed.parts().1.as_deref(), Some("model"));
    }
}
