//! `graft admin ...`: tenants, API keys and quotas (needs the admin key).

use clap::{Args, Subcommand};
use graft_client::{proto as pb, GraftClient};

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Create, list, show and delete tenants.
    #[command(subcommand)]
    Tenants(TenantCmd),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(KeyCmd),
    /// Override a tenant's quotas (fields not given keep their value).
    Quotas {
        tenant: String,
        #[command(flatten)]
        quotas: QuotaArgs,
        /// Drop every override first.
        #[arg(long)]
        reset: bool,
    },
}

#[derive(Subcommand)]
pub enum TenantCmd {
    /// Create tenant NAME.
    Create {
        name: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// List tenants with their quotas and usage.
    Ls,
    /// A tenant's quotas and usage.
    Show { name: String },
    /// Delete an empty tenant and its keys.
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// A new key for TENANT; the secret is printed once.
    Create {
        tenant: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Seconds until the key expires (default: never).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Keys of TENANT (ids only, never secrets).
    Ls { tenant: String },
    /// Revoke key ID.
    Revoke { id: String },
}

#[derive(Args, Default)]
pub struct QuotaArgs {
    #[arg(long)]
    max_adapters: Option<u64>,
    #[arg(long)]
    max_stored_bytes: Option<u64>,
    #[arg(long)]
    max_datasets: Option<u64>,
    #[arg(long)]
    max_running_jobs: Option<u32>,
    #[arg(long)]
    max_queued_jobs: Option<u32>,
    #[arg(long)]
    max_concurrent_streams: Option<u32>,
    #[arg(long)]
    max_tokens_per_minute: Option<u64>,
}

impl From<QuotaArgs> for pb::Quotas {
    fn from(q: QuotaArgs) -> Self {
        pb::Quotas {
            max_adapters: q.max_adapters,
            max_stored_bytes: q.max_stored_bytes,
            max_datasets: q.max_datasets,
            max_running_jobs: q.max_running_jobs,
            max_queued_jobs: q.max_queued_jobs,
            max_concurrent_streams: q.max_concurrent_streams,
            max_tokens_per_minute: q.max_tokens_per_minute,
        }
    }
}

fn print_tenant(t: &pb::Tenant, json: bool) {
    let q = t.quotas.unwrap_or_default();
    let u = t.usage.unwrap_or_default();
    if json {
        let v = serde_json::json!({
            "name": t.name, "created_at": t.created_at,
            "quotas": {
                "max_adapters": q.max_adapters, "max_stored_bytes": q.max_stored_bytes,
                "max_datasets": q.max_datasets, "max_running_jobs": q.max_running_jobs,
                "max_queued_jobs": q.max_queued_jobs,
                "max_concurrent_streams": q.max_concurrent_streams,
                "max_tokens_per_minute": q.max_tokens_per_minute,
            },
            "usage": {
                "adapters": u.adapters, "stored_bytes": u.stored_bytes, "datasets": u.datasets,
                "running_jobs": u.running_jobs, "unfinished_jobs": u.unfinished_jobs,
                "streams": u.streams,
            },
        });
        outln!("{v}");
        return;
    }
    outln!("{}", t.name);
    outln!(
        "  adapters {}/{}  datasets {}/{}  stored {}/{} bytes",
        u.adapters,
        q.max_adapters.unwrap_or_default(),
        u.datasets,
        q.max_datasets.unwrap_or_default(),
        u.stored_bytes,
        q.max_stored_bytes.unwrap_or_default()
    );
    outln!(
        "  jobs running {}/{}  unfinished {}/{}  streams {}/{}  tokens/min {}",
        u.running_jobs,
        q.max_running_jobs.unwrap_or_default(),
        u.unfinished_jobs,
        q.max_queued_jobs.unwrap_or_default(),
        u.streams,
        q.max_concurrent_streams.unwrap_or_default(),
        q.max_tokens_per_minute.unwrap_or_default()
    );
}

fn print_key(k: &pb::ApiKey, json: bool) {
    if json {
        let v = serde_json::json!({
            "id": k.id, "tenant": k.tenant, "description": k.description,
            "created_at": k.created_at, "expires_at": k.expires_at, "revoked_at": k.revoked_at,
        });
        outln!("{v}");
        return;
    }
    let state = match (k.revoked_at, k.expires_at) {
        (Some(_), _) => "revoked".to_string(),
        (None, Some(e)) => format!("expires {e}"),
        (None, None) => "active".to_string(),
    };
    outln!("{}\t{}\t{}\t{}", k.id, k.tenant, state, k.description);
}

pub async fn run(client: &GraftClient, cmd: AdminCmd, json: bool) -> Result<(), tonic::Status> {
    let mut a = client.admin();
    match cmd {
        AdminCmd::Tenants(TenantCmd::Create { name, quotas }) => {
            let t = a
                .create_tenant(pb::CreateTenantRequest {
                    name,
                    quotas: Some(quotas.into()),
                })
                .await?
                .into_inner();
            print_tenant(&t, json);
        }
        AdminCmd::Tenants(TenantCmd::Ls) => {
            for t in a
                .list_tenants(pb::ListTenantsRequest {})
                .await?
                .into_inner()
                .tenants
            {
                print_tenant(&t, json);
            }
        }
        AdminCmd::Tenants(TenantCmd::Show { name }) => {
            print_tenant(
                &a.get_tenant(pb::GetTenantRequest { name })
                    .await?
                    .into_inner(),
                json,
            );
        }
        AdminCmd::Tenants(TenantCmd::Rm { name }) => {
            a.delete_tenant(pb::DeleteTenantRequest { name: name.clone() })
                .await?;
            outln!("deleted {name}");
        }
        AdminCmd::Keys(KeyCmd::Create {
            tenant,
            description,
            ttl,
        }) => {
            let r = a
                .create_key(pb::CreateKeyRequest {
                    tenant,
                    description,
                    ttl_seconds: ttl.unwrap_or(0),
                })
                .await?
                .into_inner();
            if let Some(k) = &r.key {
                eprintln!(
                    "key {} for tenant {} (shown once; store it now):",
                    k.id, k.tenant
                );
            }
            outln!("{}", r.secret);
        }
        AdminCmd::Keys(KeyCmd::Ls { tenant }) => {
            for k in a
                .list_keys(pb::ListKeysRequest { tenant })
                .await?
                .into_inner()
                .keys
            {
                print_key(&k, json);
            }
        }
        AdminCmd::Keys(KeyCmd::Revoke { id }) => {
            print_key(
                &a.revoke_key(pb::RevokeKeyRequest { id })
                    .await?
                    .into_inner(),
                json,
            );
        }
        AdminCmd::Quotas {
            tenant,
            quotas,
            reset,
        } => {
            let t = a
                .set_quotas(pb::SetQuotasRequest {
                    tenant,
                    quotas: Some(quotas.into()),
                    reset,
                })
                .await?
                .into_inner();
            print_tenant(&t, json);
        }
    }
    Ok(())
}
