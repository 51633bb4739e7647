//! Dataset uploads, end to end in the domain: the bytes stream into a temporary file as they
//! arrive (hashed and capped on the way); at the end the file is validated line by line
//! (`dataset::validate_reader`: memory bounded by the longest allowed line), counted against
//! the tenant's storage quota under its storage lock, made durable under its final name and
//! only then recorded by a row.
//! Invariant: a temporary file never outlives its upload — it is removed on every path that
//! does not finish (`Drop`), a client that goes away and a full disk included.

use std::{io::BufReader, path::PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{
    dataset::{self, Format},
    jobs::{dataset_key, invalid, io_error, new_id, problems_text, TrainingError, TrainingService},
};
use crate::{names, store::training::DatasetRow, tenancy::NewObject};

/// An upload in progress. Feed it with [`DatasetUpload::write`], end it with
/// [`TrainingService::finish_upload`]; dropping it removes what it wrote.
pub struct DatasetUpload {
    tenant: String,
    name: String,
    format: Option<Format>,
    id: String,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    size: usize,
    cap: usize,
    filename: Option<String>,
}

impl Drop for DatasetUpload {
    fn drop(&mut self) {
        // Stored or not, the local file is done with.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl DatasetUpload {
    /// Records the client's file name with the dataset (at most 255 bytes, kept whole or
    /// cut on a character boundary; it is shown, never used as a path).
    pub fn set_filename(&mut self, name: &str) {
        let mut end = name.len().min(255);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        self.filename = Some(name[..end].to_string());
    }

    /// Appends a chunk; more than the configured cap is refused.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), TrainingError> {
        self.size += chunk.len();
        if self.size > self.cap {
            return Err(invalid(
                "chunk",
                format!("the dataset exceeds the {}-byte cap", self.cap),
            ));
        }
        self.hasher.update(chunk);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| TrainingError::Storage("the upload is closed".into()))?;
        file.write_all(chunk)
            .await
            .map_err(|e| io_error("writing the dataset", e))
    }
}

impl TrainingService {
    /// Starts an upload of dataset `name` (checked, and not taken yet).
    pub async fn begin_upload(
        &self,
        tenant: &str,
        name: &str,
        format: Option<Format>,
    ) -> Result<DatasetUpload, TrainingError> {
        names::validate(name, "dataset name").map_err(|e| invalid("name", e))?;
        if self.db().dataset_by_name(tenant, name).await?.is_some() {
            return Err(TrainingError::AlreadyExists(format!("dataset {name:?}")));
        }
        let dir = self.uploads_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| io_error("creating the upload directory", e))?;
        let id = new_id("ds");
        let tmp = dir.join(format!(".{id}.jsonl.tmp"));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| io_error("creating the dataset file", e))?;
        Ok(DatasetUpload {
            tenant: tenant.into(),
            name: name.into(),
            format,
            id,
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
            cap: self.config().max_dataset_bytes,
            filename: None,
        })
    }

    /// Validates, charges, stores and records an upload.
    pub async fn finish_upload(&self, mut up: DatasetUpload) -> Result<DatasetRow, TrainingError> {
        if let Some(mut f) = up.file.take() {
            f.flush()
                .await
                .map_err(|e| io_error("writing the dataset", e))?;
            f.sync_all()
                .await
                .map_err(|e| io_error("writing the dataset", e))?;
        }
        let model = self.model().clone();
        let (tmp, format) = (up.tmp.clone(), up.format);
        let validated = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&tmp)?;
            let render = |m: &[crate::model::ChatMessage], g: bool| model.chat.render(m, g);
            dataset::validate_reader(
                BufReader::with_capacity(1 << 16, file),
                format,
                &render,
                &model.tokenizer,
                2048,
            )
        })
        .await
        .map_err(|e| TrainingError::Storage(e.to_string()))?
        .map_err(|e| io_error("reading the dataset", e))?
        .map_err(|p| invalid("dataset", problems_text(&p)))?;
        let tenancy = self.tenancy();
        let _storage = tenancy.storage_guard(&up.tenant).await?;
        tenancy
            .check_storage(&up.tenant, NewObject::Dataset, up.size as u64)
            .await?;
        let file = format!("{}.jsonl", up.id);
        let key = dataset_key(&file);
        // Durable in the store before the row names it; a failure stores nothing.
        if let Err(e) = self.blobs().put_file(&key, &up.tmp).await {
            let _ = self.blobs().delete(&key).await;
            return Err(e.into());
        }
        let row = DatasetRow {
            id: up.id.clone(),
            tenant: up.tenant.clone(),
            name: up.name.clone(),
            format: validated.format.name().into(),
            examples: validated.stats.examples as u64,
            tokens: validated.stats.tokens as u64,
            truncated: validated.stats.truncated as u64,
            size_bytes: up.size as u64,
            sha256: format!("{:x}", std::mem::take(&mut up.hasher).finalize()),
            file: file.clone(),
            created_at: 0,
            label_counts: validated.stats.labels.clone(),
            filename: up.filename.clone(),
        };
        let remove = || async {
            if let Err(e) = self.blobs().delete(&key).await {
                tracing::warn!(key, error = %e, "removing an unrecorded dataset file (left to the sweep)");
            }
        };
        match self.db().insert_dataset(&row).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => {
                remove().await;
                Err(TrainingError::AlreadyExists(format!(
                    "dataset {:?}",
                    up.name
                )))
            }
            Err(e) => {
                remove().await;
                Err(e.into())
            }
        }
    }

    /// Validates and stores a whole dataset held in memory (tools and tests).
    pub async fn upload_dataset(
        &self,
        tenant: &str,
        name: &str,
        format: Option<Format>,
        bytes: Vec<u8>,
    ) -> Result<DatasetRow, TrainingError> {
        let mut up = self.begin_upload(tenant, name, format).await?;
        up.write(&bytes).await?;
        self.finish_upload(up).await
    }
}
