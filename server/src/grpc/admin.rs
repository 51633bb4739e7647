//! `graft.v1.Admin`: tenants, keys and quotas, for the admin key only.

use std::time::Duration;

use graft_proto::v1::{self as pb, admin_server::Admin};
use tonic::{Request, Response, Status};

use super::{auth::Caller, error::ApiError, recorded};
use crate::tenancy::{KeyInfo, Quotas, TenantInfo};

#[derive(Default)]
pub struct AdminService;

fn admin<T>(req: &Request<T>) -> Result<Caller, ApiError> {
    let c = Caller::of(req)?;
    c.tenancy.require_admin(&c.who)?;
    Ok(c)
}

fn quotas(q: Option<pb::Quotas>) -> Quotas {
    let q = q.unwrap_or_default();
    Quotas {
        max_adapters: q.max_adapters,
        max_stored_bytes: q.max_stored_bytes,
        max_datasets: q.max_datasets,
        max_running_jobs: q.max_running_jobs,
        max_queued_jobs: q.max_queued_jobs,
        max_concurrent_streams: q.max_concurrent_streams,
        max_tokens_per_minute: q.max_tokens_per_minute,
    }
}

impl From<TenantInfo> for pb::Tenant {
    fn from(t: TenantInfo) -> Self {
        let l = t.limits;
        pb::Tenant {
            name: t.name,
            quotas: Some(pb::Quotas {
                max_adapters: Some(l.max_adapters),
                max_stored_bytes: Some(l.max_stored_bytes),
                max_datasets: Some(l.max_datasets),
                max_running_jobs: Some(l.max_running_jobs),
                max_queued_jobs: Some(l.max_queued_jobs),
                max_concurrent_streams: Some(l.max_concurrent_streams),
                max_tokens_per_minute: Some(l.max_tokens_per_minute),
            }),
            usage: Some(pb::TenantUsage {
                adapters: t.usage.adapters,
                stored_bytes: t.usage.stored_bytes,
                datasets: t.usage.datasets,
                running_jobs: t.usage.running_jobs,
                unfinished_jobs: t.usage.unfinished_jobs,
                streams: t.streams,
            }),
            created_at: t.created_at,
        }
    }
}

impl From<KeyInfo> for pb::ApiKey {
    fn from(k: KeyInfo) -> Self {
        pb::ApiKey {
            id: k.id,
            tenant: k.tenant,
            description: k.description,
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        recorded("CreateTenant", async {
            let c = admin(&req)?;
            let r = req.into_inner();
            let t = c.tenancy.create_tenant(&r.name, quotas(r.quotas)).await?;
            tracing::info!(tenant = %t.name, "tenant created");
            Ok(t.into())
        })
        .await
    }

    async fn get_tenant(
        &self,
        req: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        recorded("GetTenant", async {
            let c = admin(&req)?;
            Ok(c.tenancy.tenant(&req.into_inner().name).await?.into())
        })
        .await
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        recorded("ListTenants", async {
            let c = admin(&req)?;
            let tenants = c.tenancy.tenants().await?;
            Ok(pb::ListTenantsResponse {
                tenants: tenants.into_iter().map(Into::into).collect(),
            })
        })
        .await
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        recorded("DeleteTenant", async {
            let c = admin(&req)?;
            let name = req.into_inner().name;
            c.tenancy.delete_tenant(&name).await?;
            tracing::info!(tenant = %name, "tenant deleted");
            Ok(pb::DeleteTenantResponse {})
        })
        .await
    }

    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        recorded("CreateKey", async {
            let c = admin(&req)?;
            let r = req.into_inner();
            let ttl = (r.ttl_seconds > 0).then(|| Duration::from_secs(r.ttl_seconds));
            let (key, secret) = c.tenancy.create_key(&r.tenant, &r.description, ttl).await?;
            tracing::info!(tenant = %key.tenant, key = %key.id, "API key created");
            Ok(pb::CreateKeyResponse {
                key: Some(key.into()),
                secret,
            })
        })
        .await
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        recorded("ListKeys", async {
            let c = admin(&req)?;
            let keys = c.tenancy.keys_of(&req.into_inner().tenant)?;
            Ok(pb::ListKeysResponse {
                keys: keys.into_iter().map(Into::into).collect(),
            })
        })
        .await
    }

    async fn revoke_key(
        &self,
        req: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        recorded("RevokeKey", async {
            let c = admin(&req)?;
            let k = c.tenancy.revoke_key(&req.into_inner().id).await?;
            tracing::info!(tenant = %k.tenant, key = %k.id, "API key revoked");
            Ok(k.into())
        })
        .await
    }

    async fn set_quotas(
        &self,
        req: Request<pb::SetQuotasRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        recorded("SetQuotas", async {
            let c = admin(&req)?;
            let r = req.into_inner();
            let t = c
                .tenancy
                .set_quotas(&r.tenant, quotas(r.quotas), r.reset)
                .await?;
            Ok(t.into())
        })
        .await
    }
}
