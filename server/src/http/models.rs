//! `GET /v1/models` and `GET /v1/models/{id}`: the base model and the caller's adapters
//! (each name once, as its newest version; `name@version` is accepted wherever a model is
//! named).

use axum::{
    extract::{Path, State},
    response::Response,
    Json,
};

use super::{completions::model_ref, error::HttpError, openai as oa, recorded, Auth, HttpState};
use crate::{
    api::{error::ApiError, ready, Ready},
    store::AdapterRow,
};

/// Rows listed per page while reading a tenant's adapters.
const PAGE: u32 = 500;

fn base(ready: &Ready, st: &HttpState) -> oa::Model {
    oa::Model {
        id: ready.engine.model().name.clone(),
        object: "model",
        created: st.started_unix as i64,
        owned_by: "graft".into(),
        parent: None,
    }
}

fn adapter(ready: &Ready, row: &AdapterRow, id: String) -> oa::Model {
    oa::Model {
        id,
        object: "model",
        created: row.created_at,
        owned_by: row.tenant.clone(),
        parent: Some(ready.engine.model().name.clone()),
    }
}

pub async fn list(State(st): State<HttpState>, auth: Auth) -> Response {
    recorded("GET /v1/models", async {
        let ready = ready(&st.ready)?;
        let mut data = vec![base(ready, &st)];
        let mut after = None;
        loop {
            let rows = ready
                .adapters
                .list(&auth.tenant, None, after.clone(), PAGE)
                .await
                .map_err(ApiError::from)?;
            // Rows come by name, then version: the last row of a name is its newest.
            for row in &rows {
                match data.last_mut() {
                    Some(m) if m.parent.is_some() && m.id == row.name => {
                        *m = adapter(ready, row, row.name.clone())
                    }
                    _ => data.push(adapter(ready, row, row.name.clone())),
                }
            }
            match rows.last() {
                Some(r) if rows.len() == PAGE as usize => after = Some((r.name.clone(), r.version)),
                _ => break,
            }
        }
        Ok::<_, HttpError>(Json(oa::List {
            object: "list",
            data,
        }))
    })
    .await
}

pub async fn get(State(st): State<HttpState>, auth: Auth, Path(id): Path<String>) -> Response {
    recorded("GET /v1/models/{id}", async {
        let ready = ready(&st.ready)?;
        match model_ref(ready, &id)? {
            None => Ok(Json(base(ready, &st))),
            Some(r) => {
                let row = ready
                    .adapters
                    .find(&auth.tenant, &r)
                    .await
                    .map_err(|e| HttpError::renamed(e, "adapter", "model"))?;
                Ok(Json(adapter(ready, &row, id)))
            }
        }
    })
    .await
}
