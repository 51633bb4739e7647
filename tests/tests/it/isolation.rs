//! Isolation between tenants: another tenant's adapters, versions, datasets, jobs and event
//! streams answer exactly like missing ones, whatever the RPC, the name trick or the guess,
//! and the victim's data is unchanged afterwards.

use graft_client::{proto as pb, GenerateOptions, GraftClient};
use graft_tests::{random_peft, start_tiny};
use tonic::Code;

use super::tenancy::{job, JSONL};

/// Asserts `r` failed exactly like a request for a missing object named `missing` does
/// (`probe` gives that one): same code, same message with the name swapped.
fn like_missing<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    name: &str,
    probe: &tonic::Status,
    missing: &str,
) {
    let e = r.expect_err("another tenant's object must not be reachable");
    assert_eq!(e.code(), Code::NotFound, "{name}: {e:?}");
    assert_eq!(
        e.message().replace(name, "<>"),
        probe.message().replace(missing, "<>"),
        "the answer shows that {name} exists"
    );
}

/// The victim's data, as the victim sees it.
async fn snapshot(
    v: &GraftClient,
    job_id: &str,
) -> (Vec<pb::AdapterVersion>, Vec<u8>, Vec<String>, String) {
    let adapters = v.list_adapters("").await.expect("list");
    let (_, weights) = v.export_adapter("", "secret@2").await.expect("export");
    let datasets = v
        .training()
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect("datasets")
        .into_inner()
        .datasets
        .into_iter()
        .map(|d| format!("{}:{}:{}", d.name, d.id, d.examples))
        .collect();
    let job = v.get_job("", job_id).await.expect("job");
    (
        adapters,
        weights,
        datasets,
        format!("{}:{}", job.status, job.adapter_version),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_objects_are_invisible_and_untouchable() {
    let t = start_tiny().await;
    let model = t.server.engine().expect("ready").model().clone();
    let victim = t.tenant("victim").await;
    let mallory = t.tenant("mallory").await;
    let (cfg, w1) = random_peft(&model, 1, 2);
    let (_, w2) = random_peft(&model, 2, 2);
    victim
        .import_adapter("", "secret", cfg.clone(), w1, false)
        .await
        .expect("v1");
    victim
        .import_adapter("", "secret", cfg.clone(), w2, false)
        .await
        .expect("v2");
    victim
        .upload_dataset("", "ds", "", JSONL.repeat(8).into_bytes())
        .await
        .expect("dataset");
    let vjob = victim.create_job(job("ds", "trained")).await.expect("job");
    let (_, done) = victim.follow_job("", &vjob.id).await.expect("follow");
    assert_eq!(done.status, "succeeded");
    let with = |adapter: &str| GenerateOptions {
        adapter: Some(adapter.into()),
        ..GenerateOptions::greedy(4)
    };
    let victim_tokens = victim
        .generate(with("secret").prompt("abc"))
        .await
        .expect("gen")
        .token_ids;
    let before = snapshot(&victim, &vjob.id).await;

    let mut attempts = 0;
    let mut count = |n: usize| attempts += n;

    // Adapters: get, generate with, export, delete — by name and by version.
    let probe = mallory
        .get_adapter("", "nothere")
        .await
        .expect_err("missing");
    for r in ["secret", "secret@1", "secret@2", "trained"] {
        like_missing(mallory.get_adapter("", r).await, r, &probe, "nothere");
        let gprobe = mallory
            .generate(with("nothere").prompt("abc"))
            .await
            .expect_err("missing");
        like_missing(
            mallory.generate(with(r).prompt("abc")).await,
            r,
            &gprobe,
            "nothere",
        );
        let eprobe = mallory
            .export_adapter("", "nothere")
            .await
            .expect_err("missing");
        like_missing(mallory.export_adapter("", r).await, r, &eprobe, "nothere");
        let dprobe = mallory
            .delete_adapter("", "nothere")
            .await
            .expect_err("missing");
        like_missing(mallory.delete_adapter("", r).await, r, &dprobe, "nothere");
        count(4);
    }
    // Streaming generation too.
    let sprobe = mallory
        .generate_stream(with("nothere").prompt("x"))
        .await
        .expect_err("missing");
    like_missing(
        mallory
            .generate_stream(with("secret").prompt("x"))
            .await
            .map(drop),
        "secret",
        &sprobe,
        "nothere",
    );
    count(1);
    // Listing shows nothing of the victim's, filtered or not.
    assert!(mallory.list_adapters("").await.expect("list").is_empty());
    let filtered = mallory
        .adapters()
        .list_adapters(pb::ListAdaptersRequest {
            name: "secret".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(filtered.adapters.is_empty());
    count(2);
    // Importing under the same name makes mallory's own adapter and touches nothing else.
    let (_, wm) = random_peft(&model, 3, 2);
    let mine = mallory
        .import_adapter("", "secret", cfg.clone(), wm, false)
        .await
        .expect("own");
    assert_eq!((mine.version, mine.tenant.as_str()), (1, "mallory"));
    count(1);
    // Datasets.
    let mut tr = mallory.training();
    let dprobe = tr
        .get_dataset(pb::GetDatasetRequest {
            tenant: String::new(),
            name: "nothere".into(),
        })
        .await
        .expect_err("missing");
    like_missing(
        tr.get_dataset(pb::GetDatasetRequest {
            tenant: String::new(),
            name: "ds".into(),
        })
        .await,
        "ds",
        &dprobe,
        "nothere",
    );
    let ddprobe = tr
        .delete_dataset(pb::DeleteDatasetRequest {
            tenant: String::new(),
            name: "nothere".into(),
        })
        .await
        .expect_err("missing");
    like_missing(
        tr.delete_dataset(pb::DeleteDatasetRequest {
            tenant: String::new(),
            name: "ds".into(),
        })
        .await,
        "ds",
        &ddprobe,
        "nothere",
    );
    let listed = tr
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.datasets.is_empty());
    count(3);
    // Training on the victim's dataset (as training or validation set).
    let jprobe = mallory
        .create_job(job("nothere", "x"))
        .await
        .expect_err("missing");
    like_missing(
        mallory.create_job(job("ds", "x")).await,
        "ds",
        &jprobe,
        "nothere",
    );
    mallory
        .upload_dataset("", "mine", "", JSONL.repeat(8).into_bytes())
        .await
        .expect("own dataset");
    let vprobe = mallory
        .create_job(pb::CreateJobRequest {
            validation_dataset: "nothere".into(),
            ..job("mine", "x")
        })
        .await
        .expect_err("missing");
    like_missing(
        mallory
            .create_job(pb::CreateJobRequest {
                validation_dataset: "ds".into(),
                ..job("mine", "x")
            })
            .await,
        "ds",
        &vprobe,
        "nothere",
    );
    count(2);
    // Jobs: get, cancel, watch the victim's id, and guessed ids.
    let fake = "job-0000000000000000000000";
    let probe = mallory.get_job("", fake).await.expect_err("missing");
    like_missing(mallory.get_job("", &vjob.id).await, &vjob.id, &probe, fake);
    let cprobe = mallory.cancel_job("", fake).await.expect_err("missing");
    like_missing(
        mallory.cancel_job("", &vjob.id).await,
        &vjob.id,
        &cprobe,
        fake,
    );
    let wprobe = mallory.watch_job("", fake, 0).await.expect_err("missing");
    like_missing(
        mallory.watch_job("", &vjob.id, 0).await.map(drop),
        &vjob.id,
        &wprobe,
        fake,
    );
    let prefix = &vjob.id[..vjob.id.len() - 3];
    for guess in [
        format!("{prefix}000"),
        format!("{prefix}fff"),
        "job-1".into(),
        "%".into(),
        "*".into(),
    ] {
        let e = mallory.get_job("", &guess).await.expect_err("guess");
        assert!(
            matches!(e.code(), Code::NotFound | Code::InvalidArgument),
            "{guess}: {e:?}"
        );
        count(1);
    }
    let jobs = tr
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(jobs.jobs.iter().all(|j| j.id != vjob.id));
    count(4);
    // Naming the victim in the tenant field is refused for a tenant key, whatever the RPC.
    let named = [
        mallory.get_adapter("victim", "secret").await.map(drop),
        mallory.list_adapters("victim").await.map(drop),
        mallory.export_adapter("victim", "secret").await.map(drop),
        mallory.delete_adapter("victim", "secret").await.map(drop),
        mallory.get_job("victim", &vjob.id).await.map(drop),
        mallory.cancel_job("victim", &vjob.id).await.map(drop),
        mallory
            .generate(
                GenerateOptions {
                    tenant: Some("victim".into()),
                    ..with("secret")
                }
                .prompt("x"),
            )
            .await
            .map(drop),
        mallory
            .upload_dataset("victim", "ds", "", JSONL.as_bytes().to_vec())
            .await
            .map(drop),
        mallory
            .import_adapter(
                "victim",
                "secret",
                cfg.clone(),
                random_peft(&model, 4, 2).1,
                false,
            )
            .await
            .map(drop),
    ];
    for r in named {
        assert_eq!(
            r.expect_err("other tenant named").code(),
            Code::PermissionDenied
        );
        count(1);
    }
    // Path tricks and hostile names never reach anything.
    let long = "a".repeat(5000);
    for name in [
        "../victim/secret",
        "/etc/passwd",
        "..",
        "secret\0",
        "secret/../secret",
        "victim/secret",
        "\\..\\x",
        long.as_str(),
    ] {
        let e = mallory
            .get_adapter("", name)
            .await
            .expect_err("hostile name");
        assert!(
            matches!(e.code(), Code::InvalidArgument | Code::NotFound),
            "{name:?}: {e:?}"
        );
        let e = mallory
            .import_adapter("", name, cfg.clone(), random_peft(&model, 5, 2).1, false)
            .await
            .expect_err("hostile import name");
        assert_eq!(e.code(), Code::InvalidArgument, "{name:?}");
        let e = mallory
            .upload_dataset("", name, "", JSONL.as_bytes().to_vec())
            .await
            .expect_err("hostile dataset");
        assert_eq!(e.code(), Code::InvalidArgument, "{name:?}");
        count(3);
    }
    for tenant in ["../victim", "victim\0", "/", long.as_str()] {
        let e = mallory
            .list_adapters(tenant)
            .await
            .expect_err("hostile tenant");
        assert_eq!(e.code(), Code::PermissionDenied, "{tenant:?}");
        count(1);
    }
    // Administration is not for tenants.
    let e = mallory
        .create_key("victim", "steal")
        .await
        .expect_err("tenant key");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = mallory
        .admin()
        .list_keys(pb::ListKeysRequest {
            tenant: "victim".into(),
        })
        .await
        .expect_err("tenant key");
    assert_eq!(e.code(), Code::PermissionDenied);
    count(2);

    assert!(attempts >= 30, "only {attempts} attempts");
    // The victim's world is exactly as it was.
    assert_eq!(snapshot(&victim, &vjob.id).await, before);
    assert_eq!(
        victim
            .generate(with("secret").prompt("abc"))
            .await
            .expect("gen")
            .token_ids,
        victim_tokens
    );
    assert_eq!(
        mallory.list_adapters("").await.expect("list").len(),
        1,
        "mallory's own secret only"
    );
}
