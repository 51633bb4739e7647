//! Property tests ("fuzz targets" run on every `make test`, bounded by a fixed number of
//! cases) for the three parsers of untrusted input: the dataset parser, the PEFT adapter
//! importer and generation-request validation. Each must answer every input with a value
//! or a clean error, never a panic, and what it accepts must satisfy its invariants.
//! A finding becomes a named regression test below the properties.

use std::sync::OnceLock;

use graft_proto::v1 as pb;
use graft_server::{
    adapters::{
        peft::{self, ImportPolicy},
        testing::random_peft,
    },
    grpc::convert::{validate_generate, RequestLimits},
    model::{
        tiny::{write_tiny_gguf, TinySpec},
        BaseModel, ChatMessage, ModelError,
    },
    train::dataset::{parse_jsonl, Format},
};
use proptest::prelude::*;

fn tiny() -> &'static BaseModel {
    static M: OnceLock<BaseModel> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("graft-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("tiny.gguf");
        write_tiny_gguf(&p, &TinySpec::default()).expect("tiny");
        BaseModel::load(&p, &candle_core::Device::Cpu).expect("load")
    })
}

fn render(m: &[ChatMessage], _gen: bool) -> Result<String, ModelError> {
    Ok(m.iter()
        .map(|m| format!("{}: {}\n", m.role, m.content))
        .collect())
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("instruction".to_string()),
                        Just("input".to_string()),
                        Just("output".to_string()),
                        Just("messages".to_string()),
                        Just("role".to_string()),
                        Just("content".to_string()),
                        Just("prompt".to_string()),
                        Just("completion".to_string()),
                        Just("text".to_string()),
                        Just("system".to_string()),
                        Just("history".to_string()),
                        Just("weight".to_string()),
                        "[a-z]{1,6}",
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn dataset_line() -> impl Strategy<Value = String> {
    prop_oneof![
        json_value().prop_map(|v| v.to_string()),
        ".{0,40}",
        Just(String::new()),
    ]
}

fn format() -> impl Strategy<Value = Option<Format>> {
    prop_oneof![
        Just(None),
        Just(Format::parse("alpaca")),
        Just(Format::parse("chat")),
        Just(Format::parse("prompt_completion")),
        Just(Format::parse("text")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn dataset_parser_never_panics(lines in prop::collection::vec(dataset_line(), 0..12), forced in format()) {
        let text = lines.join("\n");
        match parse_jsonl(&text, forced, &render) {
            Ok((examples, _)) => prop_assert!(!examples.is_empty() || text.trim().is_empty()),
            Err(problems) => {
                prop_assert!(!problems.is_empty());
                prop_assert!(problems.len() <= 10);
                for p in problems {
                    prop_assert!(p.line == 0 || p.line <= lines.len().max(1));
                }
            }
        }
    }

    #[test]
    fn dataset_parser_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_jsonl(&text, None, &render);
    }
}

fn policy() -> ImportPolicy {
    ImportPolicy {
        max_rank: 16,
        max_virtual_tokens: 128,
        force: true,
        base_aliases: vec![],
    }
}

/// A valid adapter's files, mutated.
#[derive(Debug, Clone)]
enum Mutation {
    TruncateWeights(usize),
    FlipWeights(Vec<(usize, u8)>),
    FlipConfig(Vec<(usize, u8)>),
    ConfigField(String, serde_json::Value),
    /// A field of AdapterHub's nested `config` object.
    NestedField(String, serde_json::Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::TruncateWeights),
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..8).prop_map(Mutation::FlipWeights),
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..4).prop_map(Mutation::FlipConfig),
        (
            prop_oneof![
                Just("r".to_string()),
                Just("lora_alpha".to_string()),
                Just("target_modules".to_string()),
                Just("peft_type".to_string()),
                Just("use_rslora".to_string()),
                Just("use_dora".to_string()),
                Just("layers_to_transform".to_string()),
                Just("rank_pattern".to_string()),
                Just("alpha_pattern".to_string()),
                Just("modules_to_save".to_string()),
                Just("base_model_name_or_path".to_string()),
            ],
            json_value()
        )
            .prop_map(|(k, v)| Mutation::ConfigField(k, v)),
    ]
}

fn apply(m: &Mutation, mut config: Vec<u8>, mut weights: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let flip = |buf: &mut Vec<u8>, at: &[(usize, u8)]| {
        if !buf.is_empty() {
            let n = buf.len();
            for &(i, x) in at {
                buf[i % n] ^= x | 1;
            }
        }
    };
    match m {
        Mutation::TruncateWeights(n) => {
            let n = n % (weights.len() + 1);
            weights.truncate(n);
        }
        Mutation::FlipWeights(at) => flip(&mut weights, at),
        Mutation::FlipConfig(at) => flip(&mut config, at),
        Mutation::ConfigField(k, v) => {
            let mut c: serde_json::Value = serde_json::from_slice(&config).expect("valid config");
            c[k.as_str()] = v.clone();
            config = c.to_string().into_bytes();
        }
        Mutation::NestedField(k, v) => {
            let mut c: serde_json::Value = serde_json::from_slice(&config).expect("valid config");
            if c["config"].is_object() {
                c["config"][k.as_str()] = v.clone();
            }
            config = c.to_string().into_bytes();
        }
    }
    (config, weights)
}

/// The mutations of IA3's and AdapterHub's configs: their own fields.
fn other_mutation() -> impl Strategy<Value = Mutation> {
    let top = prop_oneof![
        Just("target_modules".to_string()),
        Just("feedforward_modules".to_string()),
        Just("peft_type".to_string()),
        Just("modules_to_save".to_string()),
        Just("config".to_string()),
        Just("name".to_string()),
        Just("hidden_size".to_string()),
        Just("model_type".to_string()),
    ];
    let nested = prop_oneof![
        Just("reduction_factor".to_string()),
        Just("non_linearity".to_string()),
        Just("mh_adapter".to_string()),
        Just("output_adapter".to_string()),
        Just("ln_before".to_string()),
        Just("ln_after".to_string()),
        Just("scaling".to_string()),
        Just("leave_out".to_string()),
        Just("residual_before_ln".to_string()),
        Just("original_ln_before".to_string()),
        Just("architecture".to_string()),
        Just("is_parallel".to_string()),
    ];
    prop_oneof![
        any::<usize>().prop_map(Mutation::TruncateWeights),
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..8).prop_map(Mutation::FlipWeights),
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..4).prop_map(Mutation::FlipConfig),
        (top, json_value()).prop_map(|(k, v)| Mutation::ConfigField(k, v)),
        (nested, json_value()).prop_map(|(k, v)| Mutation::NestedField(k, v)),
    ]
}

/// Valid IA3 (PEFT) and bottleneck (AdapterHub) files for the tiny model, from the
/// trainer's fresh parameters.
fn other_files() -> &'static [(Vec<u8>, Vec<u8>); 2] {
    use graft_server::{
        adapters::formats::{self, BnSettings},
        train::trainable::Trainable,
        train::weight_vars::{BottleneckVars, Ia3Vars},
    };
    static F: OnceLock<[(Vec<u8>, Vec<u8>); 2]> = OnceLock::new();
    F.get_or_init(|| {
        let m = tiny();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ia3 = Ia3Vars::init(
            m.config(),
            &names(&["k_proj", "v_proj", "down_proj"]),
            &names(&["down_proj"]),
        )
        .expect("ia3")
        .export()
        .expect("export");
        let mut bn = BnSettings::houlsby("fuzz");
        bn.reduction_factor = 8.0;
        let bn = BottleneckVars::init(m.config(), &bn, 3)
            .expect("bn")
            .export()
            .expect("export");
        [
            formats::write(&ia3, m.config(), &m.name).expect("ia3 files"),
            formats::write(&bn, m.config(), &m.name).expect("bn files"),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn peft_importer_refuses_damaged_adapters_cleanly(seed in 0u64..4, m in mutation()) {
        let model = tiny();
        let (config, weights) = random_peft(model, seed, 2);
        let (config, weights) = apply(&m, config, weights);
        if let Ok(parsed) = peft::parse(&config, &weights, model.config(), &model.name, &policy()) {
            let graft_server::adapters::peft::Details::Lora { rank, target_modules, .. } = &parsed.details else {
                panic!("a LoRA adapter parsed as another method");
            };
            prop_assert!(*rank >= 1 && *rank <= 16);
            prop_assert!(!target_modules.is_empty());
        }
    }

    #[test]
    fn ia3_and_adapterhub_importers_refuse_damaged_adapters_cleanly(which in 0usize..2, m in other_mutation()) {
        let model = tiny();
        let (config, weights) = other_files()[which].clone();
        let (config, weights) = apply(&m, config, weights);
        if let Ok(parsed) = peft::parse(&config, &weights, model.config(), &model.name, &policy()) {
            // What is accepted is servable: it compiles and runs a step.
            let a = parsed.compile(&model.llama).expect("compiles");
            let mut pool = model.llama.kv_pool(64).expect("KV pool");
            let mut cache = graft_server::model::KvCache::new();
            let out = model.llama.forward_batch(&mut pool, &mut [graft_server::model::SeqChunk {
                tokens: &[1, 2, 3],
                cache: &mut cache,
                want_logits: true,
                decode: false,
                adapter: Some(&a),
            }]);
            prop_assert!(out.is_ok());
        }
    }

    #[test]
    fn peft_importer_survives_arbitrary_files(
        config in prop::collection::vec(any::<u8>(), 0..256),
        weights in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let model = tiny();
        prop_assert!(peft::parse(&config, &weights, model.config(), &model.name, &policy()).is_err());
    }
}

fn float() -> impl Strategy<Value = Option<f32>> {
    prop_oneof![
        Just(None),
        Just(Some(f32::NAN)),
        Just(Some(f32::INFINITY)),
        Just(Some(f32::NEG_INFINITY)),
        (-10.0f32..10.0).prop_map(Some),
        any::<f32>().prop_map(Some),
    ]
}

fn request() -> impl Strategy<Value = pb::GenerateRequest> {
    (
        ".{0,20}",
        prop::collection::vec(any::<u8>(), 0..8),
        prop::collection::vec(("[a-z]{0,10}", ".{0,10}"), 0..3),
        "[a-z@0-9./]{0,12}",
        (
            any::<Option<u32>>(),
            float(),
            float(),
            any::<Option<i32>>(),
            float(),
        ),
        prop::collection::vec(".{0,6}", 0..10),
        (float(), float(), any::<bool>(), 0u32..30),
    )
        .prop_map(
            |(
                prompt,
                raw,
                msgs,
                adapter,
                (max, temp, top_p, top_k, rep),
                stop,
                (presence, frequency, logprobs, top_logprobs),
            )| {
                pb::GenerateRequest {
                    prompt,
                    raw_prompt: raw,
                    messages: msgs
                        .into_iter()
                        .map(|(role, content)| pb::ChatMessage { role, content })
                        .collect(),
                    adapter,
                    parameters: Some(pb::SamplingParameters {
                        max_new_tokens: max,
                        temperature: temp,
                        top_p,
                        top_k,
                        repetition_penalty: rep,
                        stop,
                        seed: None,
                        logprobs,
                        presence_penalty: presence,
                        frequency_penalty: frequency,
                        top_logprobs,
                    }),
                    ..Default::default()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8192, ..ProptestConfig::default() })]

    #[test]
    fn accepted_requests_satisfy_the_engine_invariants(req in request()) {
        let limits = RequestLimits::new(4096);
        if let Ok(v) = validate_generate(req, &limits) {
            let p = v.params;
            prop_assert!(p.max_new_tokens >= 1 && p.max_new_tokens <= 4096);
            prop_assert!(p.temperature.is_finite() && p.temperature >= 0.0);
            prop_assert!(p.top_p.is_finite() && p.top_p > 0.0 && p.top_p <= 1.0);
            prop_assert!(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0);
            prop_assert!(p.stop.len() <= limits.max_stop_sequences);
            prop_assert!(p.stop.iter().all(|s| !s.is_empty()));
            prop_assert!((-2.0..=2.0).contains(&p.presence_penalty));
            prop_assert!((-2.0..=2.0).contains(&p.frequency_penalty));
            prop_assert!(p.top_logprobs <= 20 && (p.top_logprobs == 0 || p.logprobs));
        }
    }
}

/// Regression (found by the cross-tenant suite): a 5,000-character name used to be echoed
/// whole into the error, which overflowed the HTTP/2 trailers; the message stays short.
#[test]
fn a_huge_adapter_name_gives_a_short_error() {
    let req = pb::GenerateRequest {
        prompt: "x".into(),
        adapter: "a".repeat(5000),
        ..Default::default()
    };
    let e = validate_generate(req, &RequestLimits::new(16)).expect_err("too long");
    let status = tonic::Status::from(e);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().len() < 400, "{}", status.message().len());
}

/// Regression (found by `dataset_parser_never_panics`): lines that are JSON but not objects
/// were reported past the 10-problem cap.
#[test]
fn at_most_ten_problems_are_reported() {
    let text = "null\n".repeat(11);
    let problems = parse_jsonl(&text, None, &render).expect_err("no objects");
    assert_eq!(problems.len(), 10);
}
