//! Blobs in a real S3-protocol server (moto's, a throw-away one of each test's own, in both
//! passes of the suite): the store's operations, and graftd when that server goes away.

use std::time::Duration;

use graft_client::GenerateOptions;
use graft_server::{adapters::testing::random_peft, blobs::Blobs, model::BaseModel};
use graft_tests::{
    process::{Graftd, GraftdOptions, S3Server},
    test_database, tiny_model_path,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_bucket_stores_lists_downloads_and_deletes_blobs() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tmp");
    let blobs =
        Blobs::open_with(Some("s3://graft-test/unit"), dir.path(), &s3.options()).expect("open");
    assert!(!blobs.is_local());
    blobs
        .put("adapters/a1/x.json", &b"{}"[..])
        .await
        .expect("put");
    blobs
        .put("adapters/a1/w.bin", vec![7u8; 100])
        .await
        .expect("put");
    blobs
        .put("datasets/d.jsonl", &b"{}\n"[..])
        .await
        .expect("put");
    assert_eq!(
        &blobs.get("adapters/a1/w.bin").await.expect("get")[..],
        &[7u8; 100][..]
    );
    assert_eq!(blobs.names("adapters").await.expect("names"), ["a1"]);
    assert_eq!(
        blobs.names("").await.expect("names"),
        ["adapters", "datasets"]
    );
    // Nothing is an hour old yet; everything is older than nothing.
    let old = |age| blobs.entries_older_than("adapters", age);
    assert!(old(Duration::from_secs(3600))
        .await
        .expect("list")
        .is_empty());
    assert_eq!(old(Duration::ZERO).await.expect("list"), ["a1"]);
    // A download for code that needs files: complete, cached, and gone with the blobs.
    let local = blobs.local_dir("adapters/a1").await.expect("download");
    assert_eq!(
        std::fs::read(local.join("w.bin")).expect("cached"),
        vec![7u8; 100]
    );
    assert_eq!(blobs.cached_names("adapters").await, ["a1"]);
    // Forgetting the download keeps the blobs; the next use downloads them again.
    blobs.drop_cached("adapters/a1").await;
    assert!(!local.exists());
    assert!(blobs.cached_names("adapters").await.is_empty());
    assert_eq!(blobs.local_dir("adapters/a1").await.expect("again"), local);
    assert!(local.join("w.bin").exists());
    blobs.delete_prefix("adapters/a1").await.expect("delete");
    assert!(blobs.names("adapters").await.expect("names").is_empty());
    assert!(!local.exists(), "the cached copy goes too");
    assert!(matches!(
        blobs.get("adapters/a1/w.bin").await,
        Err(graft_server::blobs::BlobError::NotFound(_))
    ));
    // A file past the writer's 10 MiB buffer goes up streamed, as a multipart upload.
    let big: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    let file = dir.path().join("big.jsonl");
    std::fs::write(&file, &big).expect("write");
    blobs
        .put_file("datasets/big.jsonl", &file)
        .await
        .expect("put_file");
    assert!(blobs.get("datasets/big.jsonl").await.expect("get")[..] == big[..]);
    // A stopped server: UNAVAILABLE-class errors within the retry budget, not a hang.
    s3.stop();
    let started = std::time::Instant::now();
    let e = blobs
        .put("adapters/b/x", &b"x"[..])
        .await
        .expect_err("down");
    assert!(
        matches!(e, graft_server::blobs::BlobError::Unavailable(_)),
        "{e:?}"
    );
    let e = blobs
        .put_file("datasets/again.jsonl", &file)
        .await
        .expect_err("down");
    assert!(
        matches!(e, graft_server::blobs::BlobError::Unavailable(_)),
        "{e:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// The S3 server stopped under a running graftd (a process of its own): an import fails
/// with UNAVAILABLE and registers nothing; serving goes on with what is in memory; once the
/// server is back, the same import succeeds without restarting graftd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_s3_server_fails_an_import_cleanly_and_a_retry_succeeds() {
    let s3 = S3Server::start();
    let data = tempfile::tempdir().expect("data");
    let g = Graftd::spawn(GraftdOptions {
        model: &tiny_model_path(),
        data: data.path(),
        database_url: test_database(data.path()).await,
        blob_store: Some("s3://graft-test/outage".into()),
        env: s3.env(),
    })
    .await;
    let c = g.client(graft_tests::TENANT).await;
    let m = BaseModel::load(&tiny_model_path(), &candle_core::Device::Cpu).expect("tiny");
    let (cfg, w) = random_peft(&m, 2, 4);
    c.import_adapter("", "kept", cfg.clone(), w.clone(), false)
        .await
        .expect("import");
    let ask = |adapter: &str| {
        GenerateOptions {
            adapter: Some(adapter.into()),
            ..GenerateOptions::greedy(4)
        }
        .prompt("hello")
    };
    let before = c.generate(ask("kept")).await.expect("served").text;

    s3.stop();
    let err = c
        .import_adapter("", "new", cfg.clone(), w.clone(), false)
        .await
        .expect_err("no blob store");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("blob store is unavailable"),
        "{}",
        err.message()
    );
    let names: Vec<String> = c
        .list_adapters("")
        .await
        .expect("list")
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(
        names,
        ["kept"],
        "nothing of the failed import is registered"
    );
    // The adapter in memory serves on, with the same tokens.
    assert_eq!(c.generate(ask("kept")).await.expect("served").text, before);

    s3.resume();
    let v = c
        .import_adapter("", "new", cfg, w, false)
        .await
        .expect("the retry succeeds");
    assert_eq!(v.version, 1);
    c.generate(ask("new"))
        .await
        .expect("the new adapter serves");
    g.kill().await;
}
