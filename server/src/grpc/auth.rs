//! Authentication at the edge: an interceptor on every graft service resolves the
//! `authorization: Bearer <key>` metadata to a [`Caller`] in the request's extensions, or
//! answers UNAUTHENTICATED before any handler runs. Health and reflection are not
//! intercepted. The key itself is never logged.

use std::sync::Arc;

use tonic::{service::Interceptor, Request, Status};

use super::error::ApiError;
use crate::tenancy::{Tenancy, Who};

/// Who is calling, and the tenancy to ask about quotas.
#[derive(Clone)]
pub struct Caller {
    pub who: Who,
    pub tenancy: Arc<Tenancy>,
}

impl Caller {
    /// The caller of a request that went through [`Authenticate`].
    pub fn of<T>(req: &Request<T>) -> Result<Self, ApiError> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Internal("request was not authenticated".into()))
    }

    /// The tenant this request acts for (see [`Tenancy::acting`]).
    pub fn acting(&self, requested: &str) -> Result<String, ApiError> {
        Ok(self.tenancy.acting(&self.who, requested)?)
    }
}

/// The interceptor.
#[derive(Clone)]
pub struct Authenticate {
    pub tenancy: Arc<Tenancy>,
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or(""));
        match self.tenancy.authenticate(header) {
            Ok(who) => {
                req.extensions_mut().insert(Caller {
                    who,
                    tenancy: self.tenancy.clone(),
                });
                Ok(req)
            }
            Err(e) => {
                metrics::counter!(crate::metrics::AUTH_FAILURES_TOTAL).increment(1);
                Err(ApiError::from(e).into())
            }
        }
    }
}
