//! `/v1/files`: OpenAI's files are graft's datasets. An upload (`multipart/form-data` with
//! `purpose=fine-tune` and `file`) streams into `TrainingService`'s dataset upload, so it is
//! validated (OpenAI's chat JSONL, with `weight` on assistant turns, and graft's other
//! formats), counted and stored exactly as a gRPC `UploadDataset`. A file's `id` is the
//! dataset's name (`file-<hex>` for uploads through this route); datasets uploaded over gRPC
//! are listed too, and either kind can be a job's `training_file`.

use axum::{
    body::Body,
    extract::{multipart::MultipartRejection, Multipart, Path, State},
    http::header,
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;

use super::{error::HttpError, recorded, Auth, HttpState};
use crate::{
    api::{error::ApiError, ready},
    store::training::DatasetRow,
};

#[derive(Debug, Serialize)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: &'static str,
    pub status: &'static str,
    pub status_details: Option<String>,
}

impl From<DatasetRow> for FileObject {
    fn from(d: DatasetRow) -> Self {
        Self {
            filename: d.filename.unwrap_or_else(|| d.name.clone()),
            id: d.name,
            object: "file",
            bytes: d.size_bytes,
            created_at: d.created_at,
            purpose: "fine-tune",
            // Stored only once validated.
            status: "processed",
            status_details: None,
        }
    }
}

/// A training error's field, in the words of this route.
fn upload_error(e: impl Into<ApiError>) -> HttpError {
    match e.into() {
        ApiError::InvalidArgument { field, reason } if field != "purpose" => {
            HttpError(ApiError::invalid("file", format!("{field}: {reason}")))
        }
        other => HttpError(other),
    }
}

pub async fn upload(
    State(st): State<HttpState>,
    auth: Auth,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    recorded("POST /v1/files", async {
        let ready = ready(&st.ready)?;
        let mut form = form.map_err(|e| HttpError(ApiError::invalid("file", e.body_text())))?;
        let bad = |f: &str, r: String| HttpError(ApiError::invalid(f, r));
        let (mut purpose, mut upload) = (None, None);
        while let Some(mut field) = form
            .next_field()
            .await
            .map_err(|e| bad("file", e.body_text()))?
        {
            match field.name() {
                Some("purpose") => {
                    purpose = Some(
                        field
                            .text()
                            .await
                            .map_err(|e| bad("purpose", e.body_text()))?,
                    )
                }
                Some("file") if upload.is_none() => {
                    let name = format!("file-{:024x}", rand::random::<u128>() >> 32);
                    let mut up = ready
                        .training
                        .begin_upload(&auth.tenant, &name, None)
                        .await
                        .map_err(upload_error)?;
                    if let Some(f) = field.file_name() {
                        up.set_filename(f);
                    }
                    while let Some(chunk) = field
                        .chunk()
                        .await
                        .map_err(|e| bad("file", e.body_text()))?
                    {
                        up.write(&chunk).await.map_err(upload_error)?;
                    }
                    upload = Some(up);
                }
                Some("file") => return Err(bad("file", "give one file".into())),
                // OpenAI's other upload fields (e.g. expires_after) do not apply.
                _ => {}
            }
        }
        match purpose.as_deref() {
            Some("fine-tune") => {}
            Some(p) => {
                return Err(bad(
                    "purpose",
                    format!("{p:?}: graft stores files for fine-tuning only (fine-tune)"),
                ))
            }
            None => return Err(bad("purpose", "required (fine-tune)".into())),
        }
        let up = upload.ok_or_else(|| bad("file", "required".into()))?;
        let row = ready
            .training
            .finish_upload(up)
            .await
            .map_err(upload_error)?;
        Ok(Json(FileObject::from(row)))
    })
    .await
}

#[derive(Debug, Serialize)]
struct FileList {
    object: &'static str,
    data: Vec<FileObject>,
    has_more: bool,
}

pub async fn list(State(st): State<HttpState>, auth: Auth) -> Response {
    recorded("GET /v1/files", async {
        let rows = ready(&st.ready)?
            .training
            .datasets(&auth.tenant)
            .await
            .map_err(ApiError::from)?;
        Ok::<_, HttpError>(Json(FileList {
            object: "list",
            data: rows.into_iter().map(FileObject::from).collect(),
            has_more: false,
        }))
    })
    .await
}

pub async fn get(State(st): State<HttpState>, auth: Auth, Path(id): Path<String>) -> Response {
    recorded("GET /v1/files/{id}", async {
        let row = ready(&st.ready)?
            .training
            .dataset(&auth.tenant, &id)
            .await
            .map_err(ApiError::from)?;
        Ok::<_, HttpError>(Json(FileObject::from(row)))
    })
    .await
}

#[derive(Debug, Serialize)]
struct Deleted {
    id: String,
    object: &'static str,
    deleted: bool,
}

pub async fn delete(State(st): State<HttpState>, auth: Auth, Path(id): Path<String>) -> Response {
    recorded("DELETE /v1/files/{id}", async {
        let row = ready(&st.ready)?
            .training
            .delete_dataset(&auth.tenant, &id)
            .await
            .map_err(ApiError::from)?;
        Ok::<_, HttpError>(Json(Deleted {
            id: row.name,
            object: "file",
            deleted: true,
        }))
    })
    .await
}

/// The file's bytes as uploaded (streamed from disk).
pub async fn content(State(st): State<HttpState>, auth: Auth, Path(id): Path<String>) -> Response {
    recorded("GET /v1/files/{id}/content", async {
        let (_, path) = ready(&st.ready)?
            .training
            .dataset_file(&auth.tenant, &id)
            .await
            .map_err(ApiError::from)?;
        let file = tokio::fs::File::open(&path).await.map_err(|e| {
            tracing::error!(error = %e, "dataset file");
            HttpError(ApiError::DataLoss("the stored file cannot be read".into()))
        })?;
        let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
        Ok::<_, HttpError>(([(header::CONTENT_TYPE, "application/jsonl")], body).into_response())
    })
    .await
}
