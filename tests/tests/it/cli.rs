//! The `graft` command line against a real server: keys from the environment, JSON output,
//! training with `--watch`, the loss plot, completions, and errors that print the server's
//! message with a non-zero exit code.

use std::process::Output;

use graft_tests::start_tiny;

/// The `graft` binary `cargo test` built beside this test binary.
fn graft_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("graft");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bin graft` (make test does)",
        bin.display()
    );
    bin
}

async fn graft(url: &str, key: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(graft_bin())
        .args(["--addr", url])
        .args(args)
        .env("GRAFT_API_KEY", key)
        .env_remove("GRAFT_TENANT")
        .output()
        .await
        .expect("run graft")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_trains_lists_plots_and_fails_loudly() {
    let t = start_tiny().await;
    let url = t.url();
    let key = t
        .admin
        .create_key(graft_tests::TENANT, "cli")
        .await
        .expect("key");
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\":\"a b\",\"completion\":\"c d e\"}\n".repeat(20),
    )
    .expect("write");

    let o = graft(
        &url,
        &key,
        &[
            "datasets",
            "upload",
            data.to_str().expect("utf8"),
            "--name",
            "d",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = graft(&url, &key, &["--output", "json", "datasets", "ls"]).await;
    let v: serde_json::Value =
        serde_json::from_str(text(&o.stdout).trim()).expect("one JSON object");
    assert_eq!(
        (v["name"].as_str(), v["examples"].as_u64()),
        (Some("d"), Some(20))
    );

    let o = graft(
        &url,
        &key,
        &[
            "jobs",
            "create",
            "--dataset",
            "d",
            "--adapter",
            "cli",
            "--epochs",
            "2",
            "--validation-split",
            "0.2",
            "--watch",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("succeeded"), "{}", text(&o.stdout));
    let o = graft(&url, &key, &["--output", "json", "jobs", "ls"]).await;
    let job: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().next().expect("a job")).expect("json");
    let png = dir.path().join("loss.png");
    let o = graft(
        &url,
        &key,
        &[
            "jobs",
            "plot",
            job["id"].as_str().expect("id"),
            "--out",
            png.to_str().expect("utf8"),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("validation points"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(&std::fs::read(&png).expect("png")[..4], b"\x89PNG");

    let o = graft(&url, &key, &["--output", "json", "adapters", "show", "cli"]).await;
    let a: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).expect("json");
    assert_eq!(a["version"].as_u64(), Some(1));

    // Errors: the server's message, a non-zero exit.
    let o = graft(&url, &key, &["adapters", "show", "nope"]).await;
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("adapter nope not found"),
        "{}",
        text(&o.stderr)
    );
    let o = graft(&url, "wrong", &["adapters", "ls"]).await;
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("Unauthenticated"),
        "{}",
        text(&o.stderr)
    );

    let o = graft(
        &url,
        &key,
        &["--output", "json", "generate", "abc", "-n", "3", "-t", "0"],
    )
    .await;
    let g: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).expect("json");
    assert_eq!(
        g["completion_tokens"].as_u64().map(|n| n >= 1),
        Some(true),
        "{g}"
    );
    let o = graft(
        &url,
        graft_tests::ADMIN_KEY,
        &[
            "--output",
            "json",
            "admin",
            "tenants",
            "show",
            graft_tests::TENANT,
        ],
    )
    .await;
    let tj: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).expect("json");
    assert_eq!(tj["usage"]["datasets"].as_u64(), Some(1), "{tj}");
    let o = graft(&url, &key, &["admin", "tenants", "ls"]).await;
    assert!(!o.status.success() && text(&o.stderr).contains("admin key"));
    let o = graft(&url, &key, &["health"]).await;
    assert_eq!(text(&o.stdout).trim(), "SERVING");
    let o = graft(&url, &key, &["completions", "bash"]).await;
    assert!(o.status.success() && text(&o.stdout).contains("_graft"));
}

/// `graft ... | head`: a reader that goes away ends the command quietly, without a panic.
#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    use std::process::{Command, Stdio};
    for _ in 0..3 {
        let mut child = Command::new(graft_bin())
            .args(["completions", "bash"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run graft");
        drop(child.stdout.take()); // the reader is gone before the first write
        let o = child.wait_with_output().expect("wait");
        let err = text(&o.stderr);
        assert!(o.status.success(), "{:?}: {err}", o.status);
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `jobs create` takes a method and its settings from flags and from a `--config` file
/// (flags win), and `adapters ls` shows the method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_a_prompt_tuning_job_from_a_config_file() {
    let t = start_tiny().await;
    let url = t.url();
    let key = t
        .admin
        .create_key(graft_tests::TENANT, "cli-config")
        .await
        .expect("key");
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\":\"a b\",\"completion\":\"c d e\"}\n".repeat(12),
    )
    .expect("write");
    let o = graft(
        &url,
        &key,
        &[
            "datasets",
            "upload",
            data.to_str().expect("utf8"),
            "--name",
            "d",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cfg = dir.path().join("job.toml");
    std::fs::write(
        &cfg,
        "dataset = \"d\"\nadapter = \"pt\"\nmethod = \"prompt_tuning\"\nnum_virtual_tokens = 9\n\
         init = \"vocab\"\nepochs = 1\nmax_seq_len = 64\nlr_scheduler = \"cosine\"\n",
    )
    .expect("write");
    let o = graft(
        &url,
        &key,
        &[
            "jobs",
            "create",
            "--config",
            cfg.to_str().expect("utf8"),
            "--num-virtual-tokens",
            "4",
            "--watch",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("succeeded"), "{}", text(&o.stdout));
    let o = graft(&url, &key, &["adapters", "ls"]).await;
    let out = text(&o.stdout);
    assert!(
        out.contains("pt@1\tprompt_tuning\tvirtual_tokens=4"),
        "{out}"
    );
    // An unknown setting in the file is an error naming it, not silently ignored.
    std::fs::write(&cfg, "dataset = \"d\"\nrnak = 4\n").expect("write");
    let o = graft(
        &url,
        &key,
        &["jobs", "create", "--config", cfg.to_str().expect("utf8")],
    )
    .await;
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("rnak"), "{}", text(&o.stderr));
}

/// `jobs create` trains a bottleneck adapter from flags; `adapters export` writes it as
/// AdapterHub's files (`adapter.safetensors`) and `adapters import` reads that directory back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_trains_exports_and_imports_a_bottleneck_adapter() {
    let t = start_tiny().await;
    let url = t.url();
    let key = t
        .admin
        .create_key(graft_tests::TENANT, "cli-bn")
        .await
        .expect("key");
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\":\"a b\",\"completion\":\"c d e\"}\n".repeat(12),
    )
    .expect("write");
    let path = |p: &std::path::Path| p.to_str().expect("utf8").to_string();
    let o = graft(
        &url,
        &key,
        &["datasets", "upload", &path(&data), "--name", "d"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = graft(
        &url,
        &key,
        &[
            "jobs",
            "create",
            "--dataset",
            "d",
            "--adapter",
            "bn",
            "--method",
            "bottleneck",
            "--bottleneck-size",
            "8",
            "--non-linearity",
            "relu",
            "--placement",
            "after_ffn",
            "--epochs",
            "1",
            "--max-seq-len",
            "64",
            "--watch",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("succeeded"), "{}", text(&o.stdout));
    let o = graft(&url, &key, &["adapters", "ls"]).await;
    let out = text(&o.stdout);
    assert!(
        out.contains("bn@1\tbottleneck\treduction_factor=8\trelu\tafter ffn"),
        "{out}"
    );
    let exported = dir.path().join("bn");
    let o = graft(
        &url,
        &key,
        &["adapters", "export", "bn", "--out", &path(&exported)],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(exported.join("adapter.safetensors").is_file());
    assert!(!exported.join("adapter_model.safetensors").exists());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exported.join("adapter_config.json")).expect("c"))
            .expect("json");
    assert_eq!(cfg["config"]["output_adapter"], true);
    let o = graft(
        &url,
        &key,
        &["adapters", "import", &path(&exported), "--name", "bn-again"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = graft(&url, &key, &["adapters", "show", "bn-again"]).await;
    assert!(
        text(&o.stdout).contains("bottleneck"),
        "{}",
        text(&o.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_imports_a_classifier_with_labels_and_classifies() {
    let t = graft_tests::start_real().await;
    let url = t.url();
    let key = t
        .admin
        .create_key(graft_tests::TENANT, "cli-cls")
        .await
        .expect("key");
    let dir = graft_tests::fixtures().join("peft-methods/seq-cls/adapter");
    let o = graft(
        &url,
        &key,
        &[
            "adapters",
            "import",
            dir.to_str().expect("utf8"),
            "--name",
            "topic",
            "--labels",
            "food,sport,weather",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("head=food,sport,weather"),
        "{}",
        text(&o.stdout)
    );
    let o = graft(
        &url,
        &key,
        &[
            "classify",
            "--adapter",
            "topic",
            "The referee showed a red card after the tackle.",
            "Roast the carrots with honey and thyme.",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines: Vec<String> = text(&o.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("sport\tfood="), "{}", lines[0]);
    assert!(lines[1].starts_with("food\t"), "{}", lines[1]);
    assert!(lines[1].ends_with("\tRoast the carrots with honey and thyme."));

    // One text per stdin line, as JSON.
    let mut child = tokio::process::Command::new(graft_bin())
        .args([
            "--addr",
            &url,
            "--output",
            "json",
            "classify",
            "--adapter",
            "topic",
        ])
        .env("GRAFT_API_KEY", &key)
        .env_remove("GRAFT_TENANT")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"A rainbow appeared when the shower ended.\n\n")
            .await
            .expect("write");
    }
    let o = child.wait_with_output().await.expect("wait");
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one json line");
    assert_eq!(v["label"], "weather");
    let p = v["scores"]["weather"]["probability"].as_f64().expect("p");
    assert!(p > 0.5 && p <= 1.0, "{v}");

    // A classifier trained from the CLI: the dataset's label counts, and the evaluation's
    // accuracy and per-class F1 printed while it is followed (stderr is not a terminal here).
    let data = graft_tests::fixtures().join("classification-sentences.jsonl");
    let o = graft(
        &url,
        &key,
        &[
            "datasets",
            "upload",
            data.to_str().expect("utf8"),
            "--name",
            "topics",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("labels food=14 sport=14 weather=14"),
        "{}",
        text(&o.stdout)
    );
    let o = graft(
        &url,
        &key,
        &[
            "jobs",
            "create",
            "--dataset",
            "topics",
            "--adapter",
            "topics",
            "--objective",
            "classification",
            "--target-modules",
            "q_proj,v_proj",
            "--rank",
            "4",
            "--epochs",
            "1",
            "--learning-rate",
            "1e-3",
            "--validation-split",
            "0.2",
            "--watch",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("eval at step") && err.contains("macro F1") && err.contains("(F1: food "),
        "{err}"
    );
    let o = graft(&url, &key, &["adapters", "show", "topics"]).await;
    assert!(
        text(&o.stdout).contains("head=food,sport,weather"),
        "{}",
        text(&o.stdout)
    );

    // A missing adapter: the server's message, a failing exit.
    let o = graft(&url, &key, &["classify", "--adapter", "nobody", "x"]).await;
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("NotFound"), "{}", text(&o.stderr));
}

/// RLHF from the CLI on the tiny model: a reward model trained on the public pairs and
/// `score` ranking with it; a GRPO job with a JSON grader and `--beta`, watched, and its
/// reward and KL drawn by `jobs plot --metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_trains_a_reward_model_scores_and_plots_an_rl_jobs_reward() {
    let t = start_tiny().await;
    let url = t.url();
    let key = t
        .admin
        .create_key(graft_tests::TENANT, "cli-rl")
        .await
        .expect("key");
    let dir = tempfile::tempdir().expect("tmp");
    let pairs = graft_tests::fixtures().join("preference-pairs-brief.jsonl");
    let questions = dir.path().join("q.jsonl");
    std::fs::write(
        &questions,
        (0..8)
            .map(|i| format!("{{\"prompt\": \"Say {i}.\", \"answer\": \"{i}\"}}\n"))
            .collect::<String>(),
    )
    .expect("write");
    for (file, name) in [(pairs.as_path(), "pairs"), (questions.as_path(), "q")] {
        let o = graft(
            &url,
            &key,
            &[
                "datasets",
                "upload",
                file.to_str().expect("utf8"),
                "--name",
                name,
            ],
        )
        .await;
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    let o = graft(
        &url,
        &key,
        &[
            "jobs",
            "create",
            "--dataset",
            "pairs",
            "--adapter",
            "rm",
            "--objective",
            "reward_model",
            "--epochs",
            "1",
            "--max-seq-len",
            "512",
            "--watch",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = graft(
        &url,
        &key,
        &[
            "--output",
            "json",
            "score",
            "--adapter",
            "rm",
            "--prompt",
            "How many legs does a spider have?",
            "Eight.",
            "Spiders have eight legs.",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let scores: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(scores.len(), 2);
    assert!(
        scores.iter().all(|s| s["reward"].as_f64().is_some()),
        "{scores:?}"
    );
    let o = graft(
        &url,
        &key,
        &[
            "jobs",
            "create",
            "--dataset",
            "q",
            "--adapter",
            "rl",
            "--objective",
            "grpo",
            "--num-generations",
            "4",
            "--max-new-tokens",
            "6",
            "--beta",
            "0.04",
            "--max-seq-len",
            "128",
            "--epochs",
            "2",
            "--grader",
            r#"{"type": "string_match", "reference": "{{row.answer}}", "contains": true}"#,
            "--watch",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = graft(&url, &key, &["--output", "json", "jobs", "ls"]).await;
    let job = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|j| j["objective"] == "grpo")
        .expect("the grpo job");
    let png = dir.path().join("reward.png");
    let o = graft(
        &url,
        &key,
        &[
            "jobs",
            "plot",
            job["id"].as_str().expect("id"),
            "--metrics",
            "reward,kl",
            "--out",
            png.to_str().expect("utf8"),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("reward, kl of 4 steps"),
        "{}",
        text(&o.stdout)
    );
    assert_eq!(&std::fs::read(&png).expect("png")[..4], b"\x89PNG");
}
