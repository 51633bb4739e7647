//! `docs/openai-compat.md` stays true: every row of its field table is sent to a running
//! server with its example value, and the answer must be what the row says (supported and
//! ignored fields are answered, refused ones are a 400 naming the field).

use std::net::SocketAddr;

use graft_tests::{repo_root, start_with, tiny_model_path, TENANT};
use serde_json::{json, Value};

struct Row {
    route: String,
    field: String,
    graft: String,
    example: Value,
}

/// The rows of the table under `## Fields`.
fn rows() -> Vec<Row> {
    let doc = std::fs::read_to_string(repo_root().join("docs/openai-compat.md")).expect("doc");
    let table = doc
        .split("## Fields")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Fields section");
    table
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| route"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            assert!(cells.len() >= 4, "a row of five cells: {l}");
            let example = cells[3].trim_matches('`');
            Row {
                route: cells[0].into(),
                field: cells[1].into(),
                graft: cells[2].into(),
                example: serde_json::from_str(example)
                    .unwrap_or_else(|e| panic!("{l}: the example is not JSON: {e}")),
            }
        })
        .collect()
}

/// `(status, body)` of one request.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let (status, _, body) = graft_tests::http_json(addr, method, path, Some(key), body).await;
    (status, body)
}

/// A multipart upload of `bytes` as a fine-tuning file; its id.
async fn upload(addr: SocketAddr, key: &str, bytes: &[u8]) -> String {
    let boundary = "graftboundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (_, head, body) = graft_tests::http_raw(addr, head.as_bytes(), &body).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    let v: Value = serde_json::from_str(&body).expect("file object");
    v["id"].as_str().expect("id").to_string()
}

/// Replaces the placeholders `"base"` and `"FILE"` in an example.
fn fill(v: &Value, base: &str, file: &str) -> Value {
    match v {
        Value::String(s) if s == "base" => json!(base),
        Value::String(s) if s == "FILE" => json!(file),
        other => other.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_compatibility_table_holds() {
    let ts = start_with(tiny_model_path(), |c| {
        c.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)))
    })
    .await;
    let key = ts.admin.create_key(TENANT, "compat").await.expect("key");
    let addr = ts.server.http_addr.expect("HTTP front");
    let base = ts.server.engine().expect("ready").model().name.clone();
    let rows = rows();
    assert!(rows.len() > 40, "the table has its rows: {}", rows.len());
    let lines: String = (0..12)
        .map(|i| {
            json!({"messages": [
                {"role": "user", "content": format!("Question {i}?")},
                {"role": "assistant", "content": format!("Answer {i}.")},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    let file = upload(addr, &key, lines.as_bytes()).await;
    for row in &rows {
        let example = fill(&row.example, &base, &file);
        let (path, mut body) = match row.route.as_str() {
            "chat" => (
                "/v1/chat/completions",
                json!({"model": base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
            ),
            "completions" => (
                "/v1/completions",
                json!({"model": base, "prompt": "Once", "max_tokens": 3}),
            ),
            "fine_tuning" => (
                "/v1/fine_tuning/jobs",
                json!({"model": base, "training_file": file, "graft": {"max_seq_len": 256}}),
            ),
            other => panic!("unknown route {other:?}"),
        };
        match example.as_object() {
            // The field with its companions (e.g. top_logprobs with logprobs).
            Some(o) if o.contains_key(&row.field) => {
                for (k, v) in o {
                    body[k.as_str()] = v.clone();
                }
            }
            _ => body[row.field.as_str()] = example,
        }
        let (status, answer) = call(addr, "POST", path, &key, Some(&body)).await;
        let what = format!(
            "{} {} ({}): {body} -> {status} {answer}",
            row.route, row.field, row.graft
        );
        match row.graft.as_str() {
            "supported" | "ignored" => {
                assert_eq!(status, 200, "{what}");
                if row.route == "fine_tuning" {
                    // Answered; the job itself is not needed.
                    let job: Value = serde_json::from_str(&answer).expect("job");
                    let id = job["id"].as_str().expect("job id");
                    let (s, _) = call(
                        addr,
                        "POST",
                        &format!("/v1/fine_tuning/jobs/{id}/cancel"),
                        &key,
                        None,
                    )
                    .await;
                    assert_eq!(s, 200, "{what}");
                }
            }
            "refused" => {
                assert_eq!(status, 400, "{what}");
                let v: Value = serde_json::from_str(&answer).expect("error object");
                let param = v["error"]["param"].as_str().unwrap_or_default();
                assert!(
                    param == row.field || param.starts_with(&format!("{}.", row.field)),
                    "{what}"
                );
            }
            other => panic!(
                "{}: graft is {other:?}; expected supported, ignored or refused",
                row.field
            ),
        }
    }
}
