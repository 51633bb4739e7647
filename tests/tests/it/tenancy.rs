//! Tenants over the real gRPC stack: keys, the Admin service, quotas, and fair sharing of
//! the engine (isolation is `isolation.rs`).

use std::time::{Duration, Instant};

use futures::future::join_all;
use graft_client::{proto as pb, GenerateOptions};
use graft_tests::{random_peft, start_tiny, start_with, tiny_model_path, TestServer};
use tonic::Code;
use tonic_types::StatusExt;

pub(crate) const JSONL: &str = "{\"prompt\":\"a b\",\"completion\":\"c d e\"}\n";

pub(crate) fn job(dataset: &str, adapter: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        dataset: dataset.into(),
        adapter_name: adapter.into(),
        hyperparameters: Some(pb::Hyperparameters {
            epochs: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_graft_rpc_needs_a_valid_key_but_health_and_reflection_do_not() {
    let t = start_tiny().await;
    let anon = t.anonymous();
    let no_key = [
        anon.generate(GenerateOptions::greedy(2).prompt("hi"))
            .await
            .map(drop),
        anon.list_adapters("").await.map(drop),
        anon.training()
            .list_datasets(pb::ListDatasetsRequest::default())
            .await
            .map(drop),
        anon.create_tenant("x").await.map(drop),
    ];
    for r in no_key {
        assert_eq!(r.expect_err("no key").code(), Code::Unauthenticated);
    }
    for bad in [
        "nonsense",
        "graft_0011_2233",
        graft_tests::ADMIN_KEY.trim_end_matches('9'),
    ] {
        let c = t.admin.with_api_key(Some(bad)).expect("ascii");
        let e = c.list_adapters("").await.expect_err("bad key");
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(!e.message().contains(bad), "the key is not echoed");
    }
    // Health and reflection answer without a key.
    let channel = tonic::transport::Channel::from_shared(t.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no key");

    // Revoked and expired keys stop working; others keep working.
    let key = t
        .admin
        .create_key(graft_tests::TENANT, "to revoke")
        .await
        .expect("key");
    let c = t.admin.with_api_key(Some(&key)).expect("ascii");
    c.list_adapters("").await.expect("fresh key works");
    let id = key.split('_').nth(1).expect("id").to_string();
    let listed = t
        .admin
        .admin()
        .list_keys(pb::ListKeysRequest {
            tenant: graft_tests::TENANT.into(),
        })
        .await
        .expect("list keys")
        .into_inner()
        .keys;
    assert!(listed.iter().any(|k| k.id == id));
    let revoked = t
        .admin
        .admin()
        .revoke_key(pb::RevokeKeyRequest { id })
        .await
        .expect("revoke")
        .into_inner();
    assert!(revoked.revoked_at.is_some());
    let e = c.list_adapters("").await.expect_err("revoked");
    assert_eq!(e.code(), Code::Unauthenticated);
    t.client
        .list_adapters("")
        .await
        .expect("other keys still work");
    let short = t
        .admin
        .admin()
        .create_key(pb::CreateKeyRequest {
            tenant: graft_tests::TENANT.into(),
            description: "short".into(),
            ttl_seconds: 1,
        })
        .await
        .expect("key")
        .into_inner()
        .secret;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = t
        .admin
        .with_api_key(Some(&short))
        .expect("ascii")
        .list_adapters("")
        .await
        .expect_err("expired");
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_key_and_tenant_keys_have_their_own_powers() {
    let t = start_tiny().await;
    // A tenant key cannot administer.
    let e = t
        .client
        .create_tenant("evil")
        .await
        .expect_err("tenant key");
    assert_eq!(e.code(), Code::PermissionDenied);
    // The admin key acts as a tenant only when one is named.
    let e = t
        .admin
        .generate(GenerateOptions::greedy(2).prompt("hi"))
        .await
        .expect_err("admin without tenant");
    assert_eq!(e.code(), Code::InvalidArgument);
    let named = GenerateOptions {
        tenant: Some(graft_tests::TENANT.into()),
        ..GenerateOptions::greedy(2)
    };
    t.admin
        .generate(named.prompt("hi"))
        .await
        .expect("admin naming a tenant");
    let nobody = GenerateOptions {
        tenant: Some("nobody".into()),
        ..GenerateOptions::greedy(2)
    };
    let e = t
        .admin
        .generate(nobody.prompt("hi"))
        .await
        .expect_err("no tenant");
    assert_eq!(e.code(), Code::NotFound);
    // Tenants, usage and quotas through the Admin service.
    let mut admin = t.admin.admin();
    let created = admin
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
            quotas: Some(pb::Quotas {
                max_datasets: Some(3),
                ..Default::default()
            }),
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        created.quotas.as_ref().and_then(|q| q.max_datasets),
        Some(3)
    );
    let e = admin
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
            quotas: None,
        })
        .await
        .expect_err("twice");
    assert_eq!(e.code(), Code::AlreadyExists);
    for bad in ["", "../x", "a/b", "x\0y", &"n".repeat(200)] {
        let e = admin
            .create_tenant(pb::CreateTenantRequest {
                name: bad.into(),
                quotas: None,
            })
            .await
            .expect_err("bad name");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
    }
    let acme = t.tenant("acme").await;
    acme.upload_dataset("", "d", "", JSONL.repeat(4).into_bytes())
        .await
        .expect("upload");
    let got = admin
        .get_tenant(pb::GetTenantRequest {
            name: "acme".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.usage.as_ref().map(|u| u.datasets), Some(1));
    // A tenant with data is not deleted; an empty one is, with its keys.
    let e = admin
        .delete_tenant(pb::DeleteTenantRequest {
            name: "acme".into(),
        })
        .await
        .expect_err("has data");
    assert_eq!(e.code(), Code::FailedPrecondition);
    acme.training()
        .delete_dataset(pb::DeleteDatasetRequest {
            tenant: String::new(),
            name: "d".into(),
        })
        .await
        .expect("delete dataset");
    admin
        .delete_tenant(pb::DeleteTenantRequest {
            name: "acme".into(),
        })
        .await
        .expect("empty tenant deletes");
    let e = acme.list_adapters("").await.expect_err("keys gone");
    assert_eq!(e.code(), Code::Unauthenticated);
    let names: Vec<String> = admin
        .list_tenants(pb::ListTenantsRequest {})
        .await
        .expect("list")
        .into_inner()
        .tenants
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec![graft_tests::TENANT.to_string()]);
}

fn quota_of(e: &tonic::Status) -> String {
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let d = e.get_error_details();
    let v = d.quota_failure().expect("QuotaFailure detail");
    v.violations[0].subject.clone()
}

/// The bytes `tenant` stores (and holds for unfinished jobs), as the admin sees them.
async fn stored_bytes(t: &TestServer, tenant: &str) -> u64 {
    t.admin
        .admin()
        .get_tenant(pb::GetTenantRequest {
            name: tenant.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .usage
        .expect("usage")
        .stored_bytes
}

async fn set_quotas(t: &TestServer, tenant: &str, q: pb::Quotas) {
    t.admin
        .admin()
        .set_quotas(pb::SetQuotasRequest {
            tenant: tenant.into(),
            quotas: Some(q),
            reset: false,
        })
        .await
        .expect("set quotas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_with_the_quota_named_and_change_nothing() {
    let t = start_tiny().await;
    let model = t.server.engine().expect("ready").model().clone();
    let c = t.tenant("small").await;
    let (cfg, w) = random_peft(&model, 1, 2);
    set_quotas(
        &t,
        "small",
        pb::Quotas {
            max_adapters: Some(1),
            max_datasets: Some(1),
            ..Default::default()
        },
    )
    .await;
    c.import_adapter("", "a", cfg.clone(), w.clone(), false)
        .await
        .expect("first");
    c.import_adapter("", "a", cfg.clone(), w.clone(), false)
        .await
        .expect("a new version is no new adapter");
    let e = c
        .import_adapter("", "b", cfg.clone(), w.clone(), false)
        .await
        .expect_err("second name");
    assert_eq!(quota_of(&e), "max_adapters");
    assert!(e.message().contains("max_adapters"), "{}", e.message());
    assert_eq!(
        c.list_adapters("").await.expect("list").len(),
        2,
        "nothing stored"
    );
    c.upload_dataset("", "d1", "", JSONL.repeat(4).into_bytes())
        .await
        .expect("first dataset");
    let e = c
        .upload_dataset("", "d2", "", JSONL.repeat(4).into_bytes())
        .await
        .expect_err("second");
    assert_eq!(quota_of(&e), "max_datasets");
    // Bytes.
    let used = stored_bytes(&t, "small").await;
    set_quotas(
        &t,
        "small",
        pb::Quotas {
            max_stored_bytes: Some(used + 10),
            max_adapters: Some(10),
            ..Default::default()
        },
    )
    .await;
    let e = c
        .import_adapter("", "a", cfg.clone(), w.clone(), false)
        .await
        .expect_err("bytes");
    assert_eq!(quota_of(&e), "max_stored_bytes");
    assert_eq!(c.list_adapters("").await.expect("list").len(), 2);
    // A job whose adapter would not fit is refused before it trains.
    let e = c.create_job(job("d1", "x")).await.expect_err("job bytes");
    assert_eq!(quota_of(&e), "max_stored_bytes");
    // Unfinished jobs.
    set_quotas(
        &t,
        "small",
        pb::Quotas {
            max_queued_jobs: Some(0),
            ..Default::default()
        },
    )
    .await;
    let e = c.create_job(job("d1", "x")).await.expect_err("jobs");
    assert_eq!(quota_of(&e), "max_queued_jobs");
    assert!(e.get_error_details().retry_info().is_some(), "a retry hint");
    assert!(c
        .training()
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("jobs")
        .into_inner()
        .jobs
        .is_empty());
    // Concurrent streams: of 16 long requests at once with a quota of 1, some are refused
    // (and the others run).
    set_quotas(
        &t,
        "small",
        pb::Quotas {
            max_concurrent_streams: Some(1),
            ..Default::default()
        },
    )
    .await;
    let long = GenerateOptions {
        stop: vec![],
        ..GenerateOptions::greedy(400)
    }
    .prompt("abc");
    let results = join_all((0..16).map(|_| c.generate(long.clone()))).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        !refused.is_empty() && refused.len() < 16,
        "{} of 16 refused",
        refused.len()
    );
    for e in refused {
        assert_eq!(quota_of(e), "max_concurrent_streams");
    }
    t.client
        .generate(GenerateOptions::greedy(2).prompt("abc"))
        .await
        .expect("other tenants unaffected");
    c.generate(GenerateOptions::greedy(2).prompt("abc"))
        .await
        .expect("the slot was given back");
    // Tokens per minute: admission holds max_new_tokens (as OpenAI counts max_tokens), so
    // a request that could never fit is refused outright and the minute is never overdrawn.
    set_quotas(
        &t,
        "small",
        pb::Quotas {
            max_tokens_per_minute: Some(20),
            ..Default::default()
        },
    )
    .await;
    let fresh = t.tenant("small").await; // quotas apply per tenant, not per key
    let big = fresh
        .generate(GenerateOptions::greedy(30).prompt("abc"))
        .await
        .expect_err("more than a minute's tokens");
    assert_eq!(quota_of(&big), "max_tokens_per_minute");
    assert!(
        big.message().contains("max_new_tokens"),
        "{}",
        big.message()
    );
    assert!(
        big.get_error_details().retry_info().is_none(),
        "waiting cannot help"
    );
    let r = GenerateOptions {
        stop: vec![],
        ..GenerateOptions::greedy(10)
    };
    let started = std::time::Instant::now();
    let mut generated = 0;
    let e = loop {
        match fresh.generate(r.prompt("abc")).await {
            Ok(out) => generated += out.token_ids.len(),
            Err(e) => break e,
        }
        assert!(generated < 200, "never refused after {generated} tokens");
    };
    // The bucket refills at one token every 3 s while the loop runs.
    let refill = (started.elapsed().as_secs_f64() / 3.0).ceil() as usize;
    assert!(
        (10..=20 + refill).contains(&generated),
        "refused after {generated} tokens (refill {refill})"
    );
    assert_eq!(quota_of(&e), "max_tokens_per_minute");
    let wait = e
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("retry delay");
    assert!(wait > Duration::from_secs(1), "{wait:?}");
}

/// An unfinished job holds the bytes its adapter will store, so two queued jobs cannot
/// together promise more than the quota; the hold ends with the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_jobs_hold_their_adapters_bytes() {
    let t = start_tiny().await;
    let c = t.tenant("holder").await;
    c.upload_dataset("", "d", "", JSONL.repeat(4).into_bytes())
        .await
        .expect("dataset");
    let before = stored_bytes(&t, "holder").await;
    let mut long = job("d", "long");
    long.hyperparameters = Some(pb::Hyperparameters {
        epochs: Some(5000),
        ..Default::default()
    });
    let long = c.create_job(long).await.expect("long");
    let held = stored_bytes(&t, "holder").await - before;
    assert!(held > 0, "the job holds its adapter's bytes");
    set_quotas(
        &t,
        "holder",
        pb::Quotas {
            max_stored_bytes: Some(before + held + held / 2),
            ..Default::default()
        },
    )
    .await;
    let e = c.create_job(job("d", "second")).await.expect_err("no room");
    assert_eq!(quota_of(&e), "max_stored_bytes");
    c.cancel_job("", &long.id).await.expect("cancel");
    let (_, done) = tokio::time::timeout(Duration::from_secs(30), c.follow_job("", &long.id))
        .await
        .expect("the job ends")
        .expect("watch");
    assert_eq!(done.status, "cancelled");
    assert_eq!(
        stored_bytes(&t, "holder").await,
        before,
        "a cancelled job holds nothing"
    );
    c.create_job(job("d", "second"))
        .await
        .expect("room again once the first job ended");
}

/// One tenant floods 100 streams; another's single stream is admitted at once and finishes
/// while most of the flood still waits. (Under first-come-first-served it would wait for
/// all 100.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_starve_a_single_stream() {
    let t = start_with(tiny_model_path(), |c| {
        c.engine.max_active_sequences = 8;
        c.engine.max_active_per_tenant = 6;
        c.engine.limits.max_batch_tokens = 64;
    })
    .await;
    let flood = t.tenant("flood").await;
    set_quotas(
        &t,
        "flood",
        pb::Quotas {
            max_concurrent_streams: Some(200),
            ..Default::default()
        },
    )
    .await;
    let victim = t.tenant("victim").await;
    let req = GenerateOptions {
        stop: vec![],
        ..GenerateOptions::greedy(48)
    }
    .prompt("flood the engine");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..100 {
        let (c, r, done) = (flood.clone(), req.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let out = c.generate(r).await;
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            out
        }));
    }
    // Let the flood fill the batch and the queue.
    assert!(
        graft_tests::eventually(Duration::from_secs(20), || {
            t.server.engine().is_some_and(|e| e.queue_depth() > 50)
        })
        .await,
        "the flood is queued"
    );
    let started = Instant::now();
    let v = victim.generate(req.clone()).await.expect("victim");
    let finished_before = done.load(std::sync::atomic::Ordering::SeqCst);
    let timings = v.timings.expect("timings");
    eprintln!(
        "victim: {} tokens in {:?}, queued {:.3}s; flood streams finished before it: {finished_before}",
        v.token_ids.len(),
        started.elapsed(),
        timings.queue_seconds
    );
    assert!(
        finished_before <= 24,
        "{finished_before} of the flood's 100 streams finished before the victim's one"
    );
    for h in join_all(handles).await {
        h.expect("task").expect("flood stream completes");
    }
}
