//! The one mapping from [`ApiError`] to `tonic::Status`, with rich error details
//! (`BadRequest` naming the field, `RetryInfo` with a delay).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::api::error::clip;
pub use crate::api::error::{db_error, ApiError};

/// A failure reading a client stream, which is not the caller's bad argument.
pub fn transport(s: Status) -> ApiError {
    let code = match s.code() {
        Code::Ok => Code::Unknown,
        c => c,
    };
    ApiError::Transport {
        code,
        message: s.message().to_string(),
    }
}

impl From<ApiError> for Status {
    /// The code comes from [`ApiError::code`], the one table; this adds the details.
    fn from(e: ApiError) -> Self {
        let code = e.code();
        let msg = clip(e.to_string());
        match e {
            ApiError::InvalidArgument { field, reason } => Status::with_error_details(
                code,
                msg,
                ErrorDetails::with_bad_request_violation(clip(field), clip(reason)),
            ),
            ApiError::ResourceExhausted {
                retry_after: Some(retry_after),
                ..
            } => Status::with_error_details(
                code,
                format!("{msg}; retry after {}s", retry_after.as_secs_f64()),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            ApiError::Quota {
                quota,
                detail,
                retry_after,
            } => {
                let mut details = ErrorDetails::with_quota_failure_violation(quota, clip(detail));
                let msg = match retry_after {
                    Some(r) => {
                        details.set_retry_info(Some(r));
                        format!("{msg}; retry after {}s", r.as_secs_f64().ceil())
                    }
                    None => msg,
                };
                Status::with_error_details(code, msg, details)
            }
            ApiError::ResourceExhausted {
                retry_after: None, ..
            }
            | ApiError::Unauthenticated(_)
            | ApiError::PermissionDenied(_)
            | ApiError::FailedPrecondition(_)
            | ApiError::NotFound(_)
            | ApiError::AlreadyExists(_)
            | ApiError::Unavailable(_)
            | ApiError::DeadlineExceeded
            | ApiError::DataLoss(_)
            | ApiError::Transport { .. }
            | ApiError::Internal(_) => Status::new(code, msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_messages_are_clipped_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let st = Status::from(ApiError::invalid("name", long.clone()));
        assert!(
            st.message().len() <= crate::api::error::MAX_TEXT + 3,
            "{}",
            st.message().len()
        );
        assert!(st.message().ends_with('…'));
        assert_eq!(clip("short".into()), "short");
    }
}
