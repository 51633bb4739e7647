//! ExportAdapter's side of the registry: a version's stored files as their library names
//! them, or a fully fine-tuned model converted to one GGUF file (`model::save::gguf_bytes`,
//! from the model's directory loaded on its own).

use candle_core::Device;

use super::{
    formats::{self as peft, Details, ImportError},
    registry::{prefix_of, AdapterRef, AdapterRegistry, RegistryError},
};
use crate::{
    model::{save, BaseModel},
    store::AdapterRow,
};

/// What ExportAdapter writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportFormat {
    /// The version's own files: an adapter's library's (PEFT, AdapterHub), a fully
    /// fine-tuned model's HF directory.
    #[default]
    Native,
    /// A fully fine-tuned model as one GGUF file, its matrices in this type.
    Gguf(save::GgufType),
}

impl ExportFormat {
    /// The request's `format` ("" for the version's own files, or "gguf") and
    /// `quantization` (GGUF only: f32, f16 (the default, as llama.cpp's converter), q8_0,
    /// q4_0, q4_1).
    pub fn parse(format: &str, quantization: &str) -> Result<Self, ImportError> {
        match format {
            "" | "native" if quantization.is_empty() => Ok(Self::Native),
            "" | "native" => Err(peft::err(
                "quantization",
                "is for format gguf only (an adapter's or model's own files are f32)",
            )),
            "gguf" if quantization.is_empty() => Ok(Self::Gguf(save::GgufType::F16)),
            "gguf" => save::GgufType::parse(quantization)
                .map(Self::Gguf)
                .ok_or_else(|| {
                    let known: Vec<&str> = save::GgufType::ALL.iter().map(|t| t.name()).collect();
                    peft::err(
                        "quantization",
                        format!("{quantization:?} is not one of {}", known.join(", ")),
                    )
                }),
            other => Err(peft::err(
                "format",
                format!("{other:?} is not \"gguf\" (or empty: the version's own files)"),
            )),
        }
    }
}

impl AdapterRegistry {
    /// The stored files of a version, named as their library names them: an adapter's
    /// config and weights, or a fully fine-tuned model's HF directory; with
    /// [`ExportFormat::Gguf`], a fully fine-tuned model as one GGUF file
    /// (`model-<type>.gguf`; an adapter is refused naming `format`).
    pub async fn export(
        &self,
        tenant: &str,
        r: &AdapterRef,
        format: ExportFormat,
    ) -> Result<(AdapterRow, Vec<(String, Vec<u8>)>), RegistryError> {
        let row = self.find(tenant, r).await?;
        let full = matches!(row.details, Details::Full { .. });
        if let ExportFormat::Gguf(ty) = format {
            if !full {
                return Err(peft::err(
                    "format",
                    format!(
                        "{r} is a {} adapter: GGUF is written for fully fine-tuned models (method full); an adapter exports as its library's files",
                        row.details.method()
                    ),
                )
                .into());
            }
            let dir = self.blobs.local_dir(&prefix_of(&row.dir)).await?;
            let r = r.clone();
            let bytes = tokio::task::spawn_blocking(move || {
                let m = BaseModel::load(&dir, &Device::Cpu)
                    .map_err(|e| RegistryError::Damaged(format!("{r}: {e}")))?;
                // What the model holds has no GGUF form here (its tokenizer's kind).
                save::gguf_bytes(&m, &r.name, ty).map_err(|e| {
                    RegistryError::from(peft::err(
                        "format",
                        format!("{r} cannot be written as GGUF: {e}"),
                    ))
                })
            })
            .await
            .map_err(|e| RegistryError::Storage(format!("GGUF export: {e}")))??;
            return Ok((row, vec![(format!("model-{}.gguf", ty.name()), bytes)]));
        }
        // A lease keeps an adapter's files in place while we read them. Files are
        // (the name the library gives it, the name on disk): an adapter's weights are stored
        // as `adapter_model.safetensors` whatever the method.
        let (files, _lease): (Vec<(&str, &str)>, _) = if full {
            (save::HF_FILES.iter().map(|&f| (f, f)).collect(), None)
        } else {
            let lease = match self.lease_row(tenant, r, row.clone()).await {
                Ok(lease) => Some(lease),
                // Files this server cannot serve as configured still export as they are,
                // read without a lease (as a fully fine-tuned model's are).
                Err(RegistryError::Unservable(_)) => None,
                Err(e) => return Err(e),
            };
            let files = vec![
                (peft::CONFIG_FILE, peft::CONFIG_FILE),
                (row.details.weights_file(), peft::WEIGHTS_FILE),
            ];
            (files, lease)
        };
        let prefix = prefix_of(&row.dir);
        let mut read = Vec::with_capacity(files.len());
        for (name, stored) in files {
            read.push((
                name.to_string(),
                self.blob(&prefix, stored, r).await?.to_vec(),
            ));
        }
        Ok((row, read))
    }
}
