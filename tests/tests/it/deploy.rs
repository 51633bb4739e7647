//! The files under `deploy/` checked against the real server: every metric the Grafana
//! dashboard and the alert rules query is one a running graftd exports (scraped after
//! traffic that exercises every path), the manifests parse with the expected kinds, and the
//! ConfigMap's graft.toml is a configuration graftd accepts.

use std::collections::BTreeSet;

use graft_client::{proto as pb, GenerateOptions};
use graft_server::config::Settings;
use graft_tests::{random_peft, repo_root, start_with, tiny_model_path};

fn deploy(path: &str) -> String {
    std::fs::read_to_string(repo_root().join("deploy").join(path))
        .unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// Names of the series in a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty() && !l.starts_with("HTTP"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .filter(|n| n.starts_with("graft_"))
        .map(String::from)
        .collect()
}

/// `graft_*` metric names in a PromQL expression.
fn queried(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r"graft_[a-z_]+").expect("regex");
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let t = start_with(tiny_model_path(), |c| c.adapter_cache_bytes = 1).await;
    let model = t.server.engine().expect("ready").model().clone();
    // Traffic through every path that records a metric.
    t.client
        .generate(GenerateOptions::greedy(4).prompt("abc"))
        .await
        .expect("generate");
    for (i, name) in ["a", "b"].iter().enumerate() {
        let (c, w) = random_peft(&model, i as u64, 2);
        t.client
            .import_adapter("", name, c, w, false)
            .await
            .expect("import");
        let opts = GenerateOptions {
            adapter: Some(name.to_string()),
            ..GenerateOptions::greedy(2)
        };
        t.client
            .generate(opts.prompt("abc"))
            .await
            .expect("with adapter");
        t.client
            .generate(opts.prompt("abc"))
            .await
            .expect("with adapter again");
    }
    // `a` was evicted by `b` (a one-byte budget): a miss and a load.
    let opts = GenerateOptions {
        adapter: Some("a".into()),
        ..GenerateOptions::greedy(2)
    };
    t.client
        .generate(opts.prompt("abc"))
        .await
        .expect("reload a");
    t.client
        .upload_dataset(
            "",
            "d",
            "",
            "{\"prompt\":\"a b\",\"completion\":\"c d\"}\n"
                .repeat(8)
                .into_bytes(),
        )
        .await
        .expect("dataset");
    let job = t
        .client
        .create_job(pb::CreateJobRequest {
            dataset: "d".into(),
            adapter_name: "trained".into(),
            hyperparameters: Some(pb::Hyperparameters {
                epochs: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("job");
    let (_, done) = t.client.follow_job("", &job.id).await.expect("follow");
    assert_eq!(done.status, "succeeded");
    let _ = t.anonymous().list_adapters("").await;
    t.admin
        .admin()
        .set_quotas(pb::SetQuotasRequest {
            tenant: graft_tests::TENANT.into(),
            quotas: Some(pb::Quotas {
                max_datasets: Some(0),
                ..Default::default()
            }),
            reset: false,
        })
        .await
        .expect("quota");
    let _ = t
        .client
        .upload_dataset("", "e", "", b"{\"text\":\"x\"}\n".to_vec())
        .await;

    let scraped = t.scrape().await;
    let names = exported(&scraped);
    let known = |m: &str| {
        names.contains(m)
            || ["_bucket", "_sum", "_count"].iter().any(|s| {
                m.strip_suffix(s)
                    .is_some_and(|base| names.iter().any(|n| n.starts_with(base)))
            })
    };
    // The dashboard.
    let dash: serde_json::Value =
        serde_json::from_str(&deploy("grafana/dashboards/graft.json")).expect("dashboard JSON");
    let mut checked = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let ms = queried(expr);
            assert!(!ms.is_empty(), "{expr}");
            for m in ms {
                assert!(known(&m), "dashboard panel {:?} queries {m}, which graftd does not export; exported: {names:?}", panel["title"]);
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked} dashboard queries");
    // The alert rules.
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&deploy("prometheus/alerts.yml")).expect("alerts YAML");
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            for m in queried(expr) {
                assert!(
                    known(&m),
                    "alert {:?} queries {m}, which graftd does not export",
                    rule["alert"]
                );
            }
            alerts += 1;
        }
    }
    assert!(alerts >= 4);
    // Every panel the issue names is there.
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in [
        "Requests",
        "Errors",
        "first token",
        "Inter-token",
        "Tokens per second",
        "Queue",
        "cache hit",
        "resident",
        "Training jobs",
        "Training throughput",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no panel for {want}: {titles:?}"
        );
    }
}

/// The replicated setup (`deploy/kubernetes/`; the schemas are checked by `make
/// check-deploy` with kubernetes-validate): three replicas on PostgreSQL and a bucket from
/// the Secret and ConfigMap, a disruption budget, and a grace period above the drain timeout.
#[test]
fn the_replicated_manifests_fit_together() {
    use clap::Parser;
    let dir = repo_root().join("deploy/kubernetes");
    let mut docs = std::collections::BTreeMap::new();
    let mut services = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
        let v: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        let kind = v["kind"].as_str().expect("kind").to_string();
        if kind == "Service" {
            services.push(v.clone());
        }
        docs.insert(kind, v);
    }
    let d = &docs["Deployment"];
    let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
    // One Service balancing connections, one headless listing the pods for the client's
    // adapter-affine routing; both select the Deployment's pods.
    assert_eq!(services.len(), 2);
    for s in &services {
        assert_eq!(&s["spec"]["selector"], pod_labels, "{s:?}");
    }
    assert!(
        services
            .iter()
            .any(|s| s["spec"]["clusterIP"].as_str() == Some("None")),
        "a headless Service for routing"
    );
    assert_eq!(d["spec"]["replicas"].as_u64(), Some(3));
    let pod = &d["spec"]["template"]["spec"];
    let env: Vec<&str> = pod["containers"][0]["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for want in [
        "GRAFT_DATABASE_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        assert!(env.contains(&want), "{want} in {env:?}");
    }
    assert_eq!(
        docs["PodDisruptionBudget"]["spec"]["selector"],
        d["spec"]["selector"]
    );
    let toml = docs["ConfigMap"]["data"]["graft.toml"]
        .as_str()
        .expect("toml");
    let tmp = tempfile::tempdir().expect("tmp");
    let p = tmp.path().join("graft.toml");
    std::fs::write(&p, toml).expect("write");
    let cfg = Settings::parse_from(["graftd", "--config", p.to_str().expect("utf8")])
        .resolve()
        .expect("graftd accepts the configuration");
    assert!(cfg
        .blob_store
        .as_deref()
        .is_some_and(|u| u.starts_with("s3://")));
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert!(
        grace > cfg.drain_timeout.as_secs(),
        "grace {grace} s must exceed the drain timeout {:?}",
        cfg.drain_timeout
    );
}

#[test]
fn manifests_parse_with_the_expected_kinds_and_config() {
    let mut kinds = BTreeSet::new();
    let dir = repo_root().join("deploy/k8s");
    for entry in std::fs::read_dir(&dir).expect("deploy/k8s") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let kind = v["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no kind", path.display()))
                .to_string();
            assert!(
                v["apiVersion"].as_str().is_some(),
                "{}: no apiVersion",
                path.display()
            );
            if kind == "Deployment" {
                let c = &v["spec"]["template"]["spec"]["containers"][0];
                for probe in ["readinessProbe", "livenessProbe"] {
                    assert!(
                        c[probe]["grpc"]["port"].as_u64().is_some(),
                        "{probe} is a gRPC probe"
                    );
                }
                assert!(c["resources"]["requests"]["cpu"].as_str().is_some());
                assert!(
                    c["env"][0]["valueFrom"]["secretKeyRef"]["name"]
                        .as_str()
                        .is_some(),
                    "admin key from a Secret"
                );
            }
            if kind == "ConfigMap" {
                let toml = v["data"]["graft.toml"].as_str().expect("graft.toml");
                let tmp = tempfile::tempdir().expect("tmp");
                let p = tmp.path().join("graft.toml");
                std::fs::write(&p, toml).expect("write");
                use clap::Parser;
                Settings::parse_from(["graftd", "--config", p.to_str().expect("utf8")])
                    .resolve()
                    .expect("graftd accepts the ConfigMap's configuration");
            }
            kinds.insert(kind);
        }
    }
    let want: BTreeSet<String> = [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
        "ServiceMonitor",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, want);
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&deploy("compose.yaml")).expect("compose YAML");
    for s in ["graftd", "prometheus", "grafana"] {
        assert!(compose["services"][s].is_mapping(), "compose service {s}");
    }
    compose_replicas_profile();
    // The Dockerfile builds what `make build` builds.
    let dockerfile = deploy("Dockerfile");
    let make = std::fs::read_to_string(repo_root().join("Makefile")).expect("Makefile");
    let build = "cargo build --release --bin graftd --bin graft";
    assert!(
        dockerfile.contains(build) && make.contains("build --release --bin graftd --bin graft")
    );
}

/// `--profile replicas` of compose.yaml: PostgreSQL, an S3-compatible server with its
/// bucket, and two graftd replicas configured for both, each on its own port and cache.
fn compose_replicas_profile() {
    let mut compose: serde_yaml::Value =
        serde_yaml::from_str(&deploy("compose.yaml")).expect("compose YAML");
    compose.apply_merge().expect("merge keys");
    let services = compose["services"].as_mapping().expect("services");
    let in_profile: Vec<&str> = services
        .iter()
        .filter(|(_, s)| {
            s["profiles"]
                .as_sequence()
                .is_some_and(|p| p.iter().any(|x| x.as_str() == Some("replicas")))
        })
        .filter_map(|(k, _)| k.as_str())
        .collect();
    for want in ["postgres", "s3", "s3-bucket", "graftd-a", "graftd-b"] {
        assert!(in_profile.contains(&want), "{want} in {in_profile:?}");
    }
    let password = compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
        .as_str()
        .expect("password");
    let s3_secret = compose["services"]["s3"]["environment"]["MINIO_ROOT_PASSWORD"]
        .as_str()
        .expect("secret");
    let mut ports = BTreeSet::new();
    for r in ["graftd-a", "graftd-b"] {
        let env = &compose["services"][r]["environment"];
        let get = |k: &str| env[k].as_str().unwrap_or_else(|| panic!("{r}: {k}"));
        assert_eq!(
            get("GRAFT_DATABASE_URL"),
            format!("postgres://graft:{password}@postgres:5432/graft")
        );
        assert!(get("GRAFT_BLOB_STORE").starts_with("s3://graft-blobs/"));
        assert_eq!(get("AWS_ENDPOINT"), "http://s3:9000");
        assert_eq!(get("AWS_SECRET_ACCESS_KEY"), s3_secret);
        assert!(
            compose["services"][r]["build"].is_mapping(),
            "{r} builds graftd"
        );
        ports.insert(compose["services"][r]["ports"][0].as_str().expect("port"));
        let volumes = format!("{:?}", compose["services"][r]["volumes"]);
        assert!(
            volumes.contains(&format!("graft-cache-{}", &r[7..])),
            "{volumes}"
        );
    }
    assert_eq!(ports.len(), 2, "each replica on its own port");
    let bucket = compose["services"]["s3-bucket"]["entrypoint"][2]
        .as_str()
        .expect("bucket command");
    assert!(bucket.contains("graft-blobs"), "{bucket}");
}

use serde::Deserialize as _;
