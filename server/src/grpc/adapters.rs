//! `graft.v1.Adapters`: import/export PEFT files, list, get, delete. Thin: every rule lives
//! in `adapters::registry` and `adapters::peft`.

use std::pin::Pin;

use futures::Stream;
use graft_proto::v1::{self as pb, adapters_server::Adapters, import_adapter_request::Part};
use tonic::{Request, Response, Status, Streaming};

use super::{
    auth::Caller,
    convert::adapter_ref,
    error::{transport, ApiError},
    ready, recorded, ReadySlot,
};
use crate::{
    adapters::{
        peft::{adapterhub::WEIGHTS_FILE as ADAPTERHUB_WEIGHTS, CONFIG_FILE, WEIGHTS_FILE},
        ExportFormat,
    },
    store::{AdapterRow, Details},
};

const CHUNK: usize = 1 << 20;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;

pub struct AdaptersService {
    ready: ReadySlot,
}

impl AdaptersService {
    pub fn new(ready: ReadySlot) -> Self {
        Self { ready }
    }
}

impl From<AdapterRow> for pb::AdapterVersion {
    // The deprecated LoRA fields stay filled for one release.
    #[allow(deprecated)]
    fn from(r: AdapterRow) -> Self {
        use pb::adapter_version::Details as D;
        let n = |v: &usize| *v as u32;
        let virtual_tokens = r.details.virtual_tokens() as u32;
        let method = r.details.method().to_string();
        let (kind, rank, alpha, target_modules) = match &r.details {
            Details::Lora {
                rank,
                alpha,
                target_modules,
                ..
            } => ("lora".into(), n(rank), *alpha, target_modules.clone()),
            _ => (String::new(), 0, 0.0, vec![]),
        };
        let details = match r.details {
            Details::Lora {
                rank,
                alpha,
                target_modules,
                use_rslora,
                use_dora,
            } => D::Lora(pb::LoraDetails {
                rank: rank as u32,
                alpha,
                target_modules,
                use_rslora,
                use_dora,
            }),
            Details::Ia3 {
                target_modules,
                feedforward_modules,
            } => D::Ia3(pb::Ia3Details {
                target_modules,
                feedforward_modules,
            }),
            Details::Bottleneck(s) => D::Bottleneck(pb::BottleneckDetails {
                after_attention: s.after_attention,
                after_ffn: s.after_ffn,
                reduction_factor: s.reduction_factor,
                leave_out: s.leave_out.iter().map(|&l| l as u32).collect(),
                non_linearity: s.non_linearity,
                original_ln_before: s.original_ln_before,
                original_ln_after: s.original_ln_after,
                residual_before_ln: s.residual_before_ln,
                ln_before: s.ln_before,
                ln_after: s.ln_after,
                scaling: s.scaling,
                adapter_residual_before_ln: s.adapter_residual_before_ln,
                name: s.name,
            }),
            Details::PromptTuning { num_virtual_tokens } => {
                D::PromptTuning(pb::PromptTuningDetails {
                    num_virtual_tokens: n(&num_virtual_tokens),
                })
            }
            Details::PTuning {
                num_virtual_tokens,
                encoder,
                encoder_hidden_size,
            } => D::PTuning(pb::PTuningDetails {
                num_virtual_tokens: n(&num_virtual_tokens),
                encoder,
                encoder_hidden_size: n(&encoder_hidden_size),
            }),
            Details::PrefixTuning {
                num_virtual_tokens,
                encoder_hidden_size,
            } => D::PrefixTuning(pb::PrefixTuningDetails {
                num_virtual_tokens: n(&num_virtual_tokens),
                encoder_hidden_size: n(&encoder_hidden_size),
            }),
            Details::PTuningV2 { num_virtual_tokens } => D::PTuningV2(pb::PTuningV2Details {
                num_virtual_tokens: n(&num_virtual_tokens),
            }),
            Details::Full {
                layers,
                embeddings,
                norms,
                trained_parameters,
            } => D::Full(pb::FullDetails {
                layers: layers.iter().map(n).collect(),
                embeddings,
                norms,
                trained_parameters,
            }),
        };
        Self {
            tenant: r.tenant,
            name: r.name,
            version: r.version,
            kind,
            rank,
            alpha,
            target_modules,
            size_bytes: r.size_bytes,
            sha256: r.sha256,
            created_at_unix: r.created_at,
            base_model_fingerprint: r.base_fingerprint,
            method,
            details: Some(details),
            virtual_tokens,
            head: r.head.map(|h| pb::ClassificationHead {
                reward_model: h.labels.len() == 1,
                labels: h.labels,
            }),
            lm_head: r.lm_head,
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::AdapterFileChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Adapters for AdaptersService {
    async fn import_adapter(
        &self,
        req: Request<Streaming<pb::ImportAdapterRequest>>,
    ) -> Result<Response<pb::AdapterVersion>, Status> {
        recorded("ImportAdapter", async {
            let ready = ready(&self.ready)?;
            let caller = Caller::of(&req)?;
            let mut stream = req.into_inner();
            let header = match stream.message().await.map_err(transport)? {
                Some(pb::ImportAdapterRequest { part: Some(Part::Header(h)) }) => h,
                _ => return Err(ApiError::invalid("header", "the first message must be an ImportHeader")),
            };
            let tenant = caller.acting(&header.tenant)?;
            let (mut config, mut weights) = (Vec::new(), Vec::new());
            while let Some(msg) = stream.message().await.map_err(transport)? {
                let Some(Part::Chunk(c)) = msg.part else {
                    return Err(ApiError::invalid("header", "only the first message may be a header"));
                };
                // Checked as bytes arrive, so memory never exceeds the cap.
                ready.adapters.check_upload_size(config.len() + weights.len() + c.data.len())?;
                match c.file_name.as_str() {
                    CONFIG_FILE => config.extend_from_slice(&c.data),
                    // PEFT's name, or AdapterHub's.
                    WEIGHTS_FILE | ADAPTERHUB_WEIGHTS => weights.extend_from_slice(&c.data),
                    other => {
                        return Err(ApiError::invalid(
                            "chunk.file_name",
                            format!("{other:?} is not an adapter file ({CONFIG_FILE}, {WEIGHTS_FILE} or {ADAPTERHUB_WEIGHTS})"),
                        ))
                    }
                }
            }
            let row = ready.adapters.import(&tenant, &header.name, config, weights, header.force, header.labels).await?;
            tracing::info!(tenant = %row.tenant, name = %row.name, version = row.version, "adapter imported");
            Ok(row.into())
        })
        .await
    }

    type ExportAdapterStream = ChunkStream;

    async fn export_adapter(
        &self,
        req: Request<pb::ExportAdapterRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        recorded("ExportAdapter", async {
            let ready = ready(&self.ready)?;
            let caller = Caller::of(&req)?;
            let req = req.into_inner();
            let tenant = caller.acting(&req.tenant)?;
            let r = adapter_ref("adapter", &req.adapter)?;
            let format = ExportFormat::parse(&req.format, &req.quantization)
                .map_err(|e| ApiError::invalid(e.field, e.reason))?;
            let (_, files) = ready.adapters.export(&tenant, &r, format).await?;
            // Chunks are cut as the stream is read: a model's weights are not held twice.
            let chunks = files.into_iter().flat_map(|(name, data)| {
                let n = data.len().div_ceil(CHUNK);
                (0..n).map(move |i| {
                    Ok(pb::AdapterFileChunk {
                        file_name: name.clone(),
                        data: data[i * CHUNK..((i + 1) * CHUNK).min(data.len())].to_vec(),
                    })
                })
            });
            Ok(Box::pin(futures::stream::iter(chunks)) as ChunkStream)
        })
        .await
    }

    async fn list_adapters(
        &self,
        req: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        recorded("ListAdapters", async {
            let ready = ready(&self.ready)?;
            let caller = Caller::of(&req)?;
            let req = req.into_inner();
            let tenant = caller.acting(&req.tenant)?;
            let size = match req.page_size {
                0 => DEFAULT_PAGE,
                n if n > MAX_PAGE => {
                    return Err(ApiError::invalid(
                        "page_size",
                        format!("{n} is above {MAX_PAGE}"),
                    ))
                }
                n => n,
            };
            let after = match req.page_token.as_str() {
                "" => None,
                t => {
                    let r = adapter_ref("page_token", t)?;
                    Some((
                        r.name,
                        r.version.ok_or_else(|| {
                            ApiError::invalid("page_token", "not a token from ListAdapters")
                        })?,
                    ))
                }
            };
            let name = (!req.name.is_empty()).then_some(req.name.as_str());
            let rows = ready.adapters.list(&tenant, name, after, size + 1).await?;
            let more = rows.len() > size as usize;
            let rows: Vec<_> = rows.into_iter().take(size as usize).collect();
            let next_page_token = match (more, rows.last()) {
                (true, Some(r)) => format!("{}@{}", r.name, r.version),
                _ => String::new(),
            };
            Ok(pb::ListAdaptersResponse {
                adapters: rows.into_iter().map(Into::into).collect(),
                next_page_token,
            })
        })
        .await
    }

    async fn get_adapter(
        &self,
        req: Request<pb::GetAdapterRequest>,
    ) -> Result<Response<pb::AdapterVersion>, Status> {
        recorded("GetAdapter", async {
            let ready = ready(&self.ready)?;
            let caller = Caller::of(&req)?;
            let req = req.into_inner();
            let tenant = caller.acting(&req.tenant)?;
            let r = adapter_ref("adapter", &req.adapter)?;
            Ok(ready.adapters.find(&tenant, &r).await?.into())
        })
        .await
    }

    async fn delete_adapter(
        &self,
        req: Request<pb::DeleteAdapterRequest>,
    ) -> Result<Response<pb::DeleteAdapterResponse>, Status> {
        recorded("DeleteAdapter", async {
            let ready = ready(&self.ready)?;
            let caller = Caller::of(&req)?;
            let req = req.into_inner();
            let tenant = caller.acting(&req.tenant)?;
            let r = adapter_ref("adapter", &req.adapter)?;
            let rows = ready.adapters.delete(&tenant, &r).await?;
            Ok(pb::DeleteAdapterResponse {
                deleted_versions: rows.iter().map(|r| r.version).collect(),
            })
        })
        .await
    }
}
