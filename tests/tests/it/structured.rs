//! Structured output on the real model: a JSON Schema holds for every seed at temperature 1,
//! a regex always matches, constrained and unconstrained sequences (with and without a LoRA)
//! share steps, a too-small `max_new_tokens` ends with LENGTH, and bad constraints are
//! INVALID_ARGUMENT naming the field, over gRPC and the OpenAI front.

use std::net::SocketAddr;

use futures::future::join_all;
use graft_client::GenerateOptions;
use graft_proto::v1::{self as pb, generate_request::Constraint};
use graft_tests::{fixture_adapter, real_model_path, start_with, TestServer, TENANT};
use serde_json::{json, Value};
use tonic::Code;

/// Nested objects, an array, enums, integers with bounds and required fields.
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "country": {"type": "string", "enum": ["France", "Germany", "Italy", "Spain"]},
            "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
            "landmarks": {
                "type": "array",
                "items": {"type": "string", "maxLength": 10},
                "maxItems": 3
            },
            "weather": {
                "type": "object",
                "properties": {
                    "season": {"enum": ["spring", "summer", "autumn", "winter"]},
                    "sunny": {"type": "boolean"}
                },
                "required": ["season", "sunny"],
                "additionalProperties": false
            }
        },
        "required": ["city", "country", "population", "weather"],
        "additionalProperties": false
    })
}

/// The schema's rules, checked by hand on a parsed answer.
fn check(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    for k in o.keys() {
        if !["city", "country", "population", "landmarks", "weather"].contains(&k.as_str()) {
            return Err(format!("unknown key {k}"));
        }
    }
    let city = o.get("city").and_then(Value::as_str).ok_or("city")?;
    if city.chars().count() > 12 {
        return Err(format!("city too long: {city}"));
    }
    let country = o.get("country").and_then(Value::as_str).ok_or("country")?;
    if !["France", "Germany", "Italy", "Spain"].contains(&country) {
        return Err(format!("country {country}"));
    }
    let pop = o
        .get("population")
        .and_then(Value::as_i64)
        .ok_or("population")?;
    if !(0..=99_999_999).contains(&pop) {
        return Err(format!("population {pop}"));
    }
    if let Some(l) = o.get("landmarks") {
        let l = l.as_array().ok_or("landmarks")?;
        if l.len() > 3
            || l.iter()
                .any(|x| x.as_str().is_none_or(|s| s.chars().count() > 10))
        {
            return Err(format!("landmarks {l:?}"));
        }
    }
    let w = o
        .get("weather")
        .and_then(Value::as_object)
        .ok_or("weather")?;
    if w.len() != 2
        || !w
            .get("season")
            .and_then(Value::as_str)
            .is_some_and(|s| ["spring", "summer", "autumn", "winter"].contains(&s))
        || !w.get("sunny").is_some_and(Value::is_boolean)
    {
        return Err(format!("weather {w:?}"));
    }
    Ok(())
}

fn ask(c: Option<Constraint>, seed: u64, max: u32) -> pb::GenerateRequest {
    let mut r = GenerateOptions {
        max_new_tokens: Some(max),
        temperature: Some(1.0),
        seed: Some(seed),
        ..Default::default()
    }
    .chat([("user", "Describe a European city as JSON.")]);
    r.constraint = c;
    r
}

async fn start() -> TestServer {
    start_with(real_model_path(), |c| {
        c.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_holds_for_fifty_seeds_at_temperature_one() {
    let ts = start().await;
    let c = Constraint::JsonSchema(schema().to_string());
    let answers = join_all((0..50).map(|seed| {
        let client = ts.client.clone();
        let req = ask(Some(c.clone()), seed, 160);
        async move { client.generate(req).await }
    }))
    .await;
    for (seed, a) in answers.into_iter().enumerate() {
        let a = a.expect("generate");
        assert_ne!(
            a.finish_reason,
            pb::FinishReason::Length as i32,
            "seed {seed} ran out of tokens: {}",
            a.text
        );
        let v: Value = serde_json::from_str(&a.text)
            .unwrap_or_else(|e| panic!("seed {seed}: not JSON ({e}): {}", a.text));
        check(&v).unwrap_or_else(|e| panic!("seed {seed}: {e}: {}", a.text));
    }
    // Unconstrained, the same request is not this JSON.
    let free = ts.client.generate(ask(None, 0, 40)).await.expect("free");
    assert!(
        serde_json::from_str::<Value>(&free.text).map_or(true, |v| check(&v).is_err()),
        "{}",
        free.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regexes_always_match_and_constraints_share_steps_with_lora_and_free_rows() {
    let ts = start().await;
    let (cfg, w) = fixture_adapter();
    ts.client
        .import_adapter("", "answers", cfg, w, false)
        .await
        .expect("import");
    let date = regex::Regex::new(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$").expect("re");
    let date_c = Constraint::Regex(r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])".into());
    // Free rows alone first: their tokens must not change when constrained rows join them.
    let free = |seed: u64, adapter: Option<&str>| {
        let mut r = ask(None, seed, 24);
        r.adapter = adapter.unwrap_or_default().into();
        r
    };
    let solo_base = ts.client.generate(free(5, None)).await.expect("solo");
    let solo_lora = ts
        .client
        .generate(free(6, Some("answers")))
        .await
        .expect("solo");
    let mut reqs = vec![free(5, None), free(6, Some("answers"))];
    for seed in 0..10 {
        let mut r = ask(Some(date_c.clone()), seed, 20);
        if seed % 2 == 0 {
            r.adapter = "answers".into();
        }
        reqs.push(r);
    }
    let answers = join_all(reqs.into_iter().map(|r| {
        let c = ts.client.clone();
        async move { c.generate(r).await.expect("generate") }
    }))
    .await;
    assert_eq!(
        answers[0].token_ids, solo_base.token_ids,
        "batch invariance, base"
    );
    assert_eq!(
        answers[1].token_ids, solo_lora.token_ids,
        "batch invariance, LoRA"
    );
    for a in &answers[2..] {
        assert!(date.is_match(&a.text), "{:?}", a.text);
        assert_ne!(a.finish_reason, pb::FinishReason::Length as i32);
    }
    // A Lark grammar.
    let mut r = ask(
        Some(Constraint::Grammar(
            "start: \"ANSWER: \" ans\nans: \"yes\" | \"no\"".into(),
        )),
        1,
        10,
    );
    r.adapter = "answers".into();
    let a = ts.client.generate(r).await.expect("grammar");
    assert!(
        a.text == "ANSWER: yes" || a.text == "ANSWER: no",
        "{}",
        a.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_budgets_end_with_length_and_bad_constraints_name_their_field() {
    let ts = start().await;
    let short = ts
        .client
        .generate(ask(
            Some(Constraint::JsonSchema(schema().to_string())),
            3,
            5,
        ))
        .await
        .expect("short");
    assert_eq!(short.finish_reason, pb::FinishReason::Length as i32);
    assert!(short.text.starts_with('{'), "{}", short.text);
    assert!(
        serde_json::from_str::<Value>(&short.text).is_err(),
        "cut short"
    );
    for (c, field) in [
        (Constraint::JsonSchema("{not json".into()), "json_schema"),
        (
            Constraint::JsonSchema(json!({"type": "nonsense"}).to_string()),
            "json_schema",
        ),
        (
            Constraint::JsonSchema(
                json!({"type": "string", "minLength": 5, "maxLength": 2}).to_string(),
            ),
            "json_schema",
        ),
        (Constraint::Regex("(unclosed".into()), "regex"),
        (
            Constraint::Grammar("start: undefined_rule".into()),
            "grammar",
        ),
        (Constraint::JsonObject(false), "json_object"),
    ] {
        let e = ts
            .client
            .generate(ask(Some(c.clone()), 1, 8))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{c:?}: {e:?}");
        let d = tonic_types::StatusExt::get_details_bad_request(&e).expect("field named");
        assert_eq!(d.field_violations[0].field, field, "{c:?}");
    }
    // Over HTTP: response_format json_schema, json_object, and a bad schema.
    let key = ts.admin.create_key(TENANT, "k").await.expect("key");
    let addr = ts.server.http_addr.expect("HTTP");
    let base = ts.server.engine().expect("ready").model().name.clone();
    for (rf, ok) in [
        (
            json!({"type": "json_schema", "json_schema": {"name": "city", "schema": schema()}}),
            true,
        ),
        (json!({"type": "json_object"}), true),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
            false,
        ),
    ] {
        let body = json!({
            "model": base, "temperature": 1, "seed": 2, "max_tokens": 160,
            "messages": [{"role": "user", "content": "Describe a European city as JSON."}],
            "response_format": rf,
        });
        let (status, answer) = post(addr, &key, &body).await;
        let v: Value = serde_json::from_str(&answer).expect("json");
        if ok {
            assert_eq!(status, 200, "{answer}");
            let text = v["choices"][0]["message"]["content"]
                .as_str()
                .expect("content");
            let parsed: Value = serde_json::from_str(text).expect("valid JSON");
            assert!(parsed.is_object(), "{text}");
            if rf["type"] == "json_schema" {
                check(&parsed).expect("validates");
            }
        } else {
            assert_eq!(status, 400, "{answer}");
            assert_eq!(
                v["error"]["param"], "response_format.json_schema.schema",
                "{v}"
            );
        }
    }
}

async fn post(addr: SocketAddr, key: &str, body: &Value) -> (u16, String) {
    let (status, _, body) =
        graft_tests::http_json(addr, "POST", "/v1/chat/completions", Some(key), Some(body)).await;
    (status, body)
}
